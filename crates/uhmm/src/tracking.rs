//! What a memory policy (a RAM budget and its reclaim) reads of an address
//! space and sets in it: which pages hold RAM, which were written since it
//! last looked (userfaultfd write protection in async mode, read back with
//! `PAGEMAP_SCAN`), and the charge hook of the fault path.

use std::ops::Range;
use std::sync::Weak;
use std::sync::atomic::Ordering;

use uhmm_sys::pagemap::{Query, category};

use crate::charge::{Arriving, ChargeOps};
use crate::mm::{AddressSpace, Mm};
use crate::vma::Backing;
use crate::{Error, ErrorKind, Result};

impl AddressSpace {
    /// The runs of pages of `range` (page-aligned, inside one region) that
    /// hold RAM: present, and not the shared zero page. One `PAGEMAP_SCAN`,
    /// tens of nanoseconds a page.
    pub fn resident(&self, range: Range<usize>) -> Result<Vec<Range<usize>>> {
        self.inner.region_pages(range.clone())?;
        let q = Query { mask: category::PRESENT | category::PFNZERO, inverted: category::PFNZERO, ..Query::default() };
        Ok(self.inner.scan(range.start, range.end, q)?.into_iter().map(|r| r.start..r.end).collect())
    }

    /// The runs of RAM pages of `range` (page-aligned, inside one region)
    /// written since the last call that covered them, or since they came
    /// into RAM; each is write-protected again in the same walk
    /// (`PAGEMAP_SCAN` with `PAGE_IS_WRITTEN` and `PM_SCAN_WP_MATCHING`),
    /// so the next call reports only newer writes. Needs
    /// [`Config::track_writes`](crate::Config::track_writes) (otherwise [`ErrorKind::Unsupported`]).
    /// Pages moved in by uhmm (coming back from a device, say) count as
    /// written.
    pub fn written(&self, range: Range<usize>) -> Result<Vec<Range<usize>>> {
        if !self.inner.config.track_writes {
            return Err(Error::new(ErrorKind::Unsupported, "written: the address space does not track writes"));
        }
        let (region, _) = self.inner.region_pages(range.clone())?;
        if region.backing != Backing::Anonymous {
            return Ok(Vec::new());
        }
        let q = Query {
            mask: category::PRESENT | category::WRITTEN | category::PFNZERO,
            inverted: category::PFNZERO,
            ..Query::default()
        };
        let mut runs = Vec::new();
        self.inner
            .pagemap_file
            .scan_written_and_protect(range.start, range.end, q, &mut runs)
            .map_err(|e| Error::sys("PAGEMAP_SCAN", e))?;
        Ok(runs.into_iter().map(|r| r.start..r.end).collect())
    }

    /// Pages brought into RAM so far: zero-filled on first touch, or
    /// migrated to RAM (`zero_filled_pages + pages_to_ram`). A policy
    /// estimates resident pages as a [`resident`](Self::resident) scan plus
    /// what came since (and less what went): this is "now", and
    /// [`pages_in_at_scan`](Self::pages_in_at_scan) the base.
    pub fn pages_in(&self) -> u64 {
        let s = &self.inner.stats;
        s.zero_filled_pages.load(Ordering::SeqCst) + s.pages_to_ram.load(Ordering::SeqCst)
    }

    /// [`pages_in`](Self::pages_in) for the base of an estimate, read just
    /// after a scan: pages a fault handler is installing now count as in
    /// already. The scan may have seen them installed before they were
    /// counted; counted as they are later, they would count twice. (Those
    /// it did not see are missed until the next scan: the estimate errs
    /// low by a window, never high.)
    pub fn pages_in_at_scan(&self) -> u64 {
        // The gauge first: read without a window, that window is counted.
        let arriving = self.inner.arriving.load(Ordering::SeqCst);
        arriving + self.pages_in()
    }

    /// Sets (or, with `None`, clears) the hook a fault handler calls before
    /// it brings pages into RAM: a RAM budget's reclaim gate
    /// ([`ChargeOps`]). Held weakly: it stops being called once dropped.
    pub fn set_charge(&self, ops: Option<Weak<dyn ChargeOps>>) {
        *self.inner.charge.write().unwrap_or_else(|e| e.into_inner()) = ops;
    }
}

impl Mm {
    /// Asks the RAM charge hook, if any, for room for `pages` pages.
    pub(crate) fn charge(&self, pages: usize) {
        let ops = self.charge.read().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(Weak::upgrade);
        if let Some(ops) = ops {
            ops.charge(pages);
        }
    }

    /// Counts `pages` pages arriving until the guard drops: take it before
    /// installing them, drop it once those that came are counted.
    pub(crate) fn arriving(&self, pages: usize) -> Arriving<'_> {
        Arriving::new(&self.arriving, pages as u64)
    }
}
