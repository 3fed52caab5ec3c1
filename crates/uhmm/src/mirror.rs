//! Device access to a range through the CPU page table (`hmm_range_fault`
//! with `HMM_PFN_REQ_FAULT`): bring every page of a range to where a device
//! can use it, and hold it there while the device reads or writes.
//!
//! [`range_fault`] faults holes in (the zero page), brings pages that live on
//! another owner's device back through that driver's `migrate_to_ram`, and
//! returns a [`RangeAccess`] that holds the page locks: while it lives no
//! migration can take the pages away, so the device's copies are safe. Pages
//! of the caller's own device are reported as such (the device reads its own
//! memory), as the kernel does for `dev_private_owner`.
//!
//! A device that keeps a mirror between accesses uses
//! [`RangeAccess::release`] and an interval notifier (`notifier.rs`) instead
//! of holding the pages. A device that reads and writes RAM pages in place
//! (DMA to host memory, as a driver `dma_map_page`s the pfns
//! `hmm_range_fault` gave it) reaches them through [`RegionMemory`].

use std::ops::Range;
use std::sync::Arc;

use crate::migrate::CpuFault;
use crate::mm::{AddressSpace, Mm};
use crate::page::{DevicePage, Owner};
use crate::pte::State;
use crate::vma::{Backing, Prot, Vma};
use crate::{Error, ErrorKind, Result};
use uhmm_sys::PAGE_SIZE;
use uhmm_sys::pagemap::{Query, category};

/// One page of a [`RangeAccess`] (an `hmm_pfn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessPage {
    /// In RAM: read or write it with [`RangeAccess::read`] / [`RangeAccess::write`].
    System {
        /// Whether the region lets the page be written (`HMM_PFN_WRITE`).
        writable: bool,
    },
    /// On the caller's own device: the device uses its own memory.
    Device(DevicePage),
}

/// Pages of one region held present for a device access. Unlocks on drop.
#[derive(Debug)]
pub struct RangeAccess {
    space: Arc<Mm>,
    region: Arc<Vma>,
    first: usize,
    pages: Vec<AccessPage>,
    faulted: bool,
}

/// Faults `range` (page-aligned, inside one region) in for a device access
/// by `owner`'s device: for reading, or for writing when `write`.
///
/// Errors, as the kernel's: [`ErrorKind::InvalidArgument`] for a bad range;
/// [`ErrorKind::Fault`] when a page cannot be read (no access, poisoned);
/// [`ErrorKind::Permission`] when `write` and a page is read-only. On error
/// nothing is held and no page changed.
pub fn range_fault(space: &AddressSpace, range: Range<usize>, write: bool, owner: Owner) -> Result<RangeAccess> {
    let space = &space.inner;
    space.check_usable()?;
    let (region, pages) = space.region_pages(range)?;
    let (first, n) = (pages.start, pages.len());
    for (_, prot) in region.prot_runs(first..first + n) {
        if !prot.contains(Prot::READ) {
            return Err(Error::new(ErrorKind::Fault, "no read access to the range"));
        }
        if write && !prot.contains(Prot::WRITE) {
            return Err(Error::new(ErrorKind::Permission, "write access to a read-only range"));
        }
    }
    // Another owner's device-private page must come back first; coherent
    // pages are mapped and CPU-addressable, so a device uses them in place.
    let foreign = |s: State| matches!(s, State::Device(p) if space.pagemap(p.pagemap).is_none_or(|pm| !pm.is_coherent() && pm.owner() != owner));
    for _attempt in 0..100 {
        // Bring other devices' pages back first, without holding locks: one
        // migrate_to_ram per run of pages on the same device.
        let mut faulted = false;
        let mut idx = first;
        while idx < first + n {
            let state = region.pt.load(idx).state();
            if let State::Exclusive(slot) = state {
                // A device's exclusive access ends when another one faults the
                // page (if the page is still held, the lock pass retries).
                let _ = crate::exclusive::revoke::revoke(space, &region, idx, slot);
                idx += 1;
                continue;
            }
            let State::Device(page) = state else {
                idx += 1;
                continue;
            };
            if !foreign(state) {
                idx += 1;
                continue;
            }
            let same_device = |i| matches!(region.pt.load(i).state(), State::Device(p) if p.pagemap == page.pagemap);
            let end = (idx + 1..first + n).find(|&i| !same_device(i)).unwrap_or(first + n);
            faulted = true;
            migrate_foreign(space, &region, idx..end, page)?;
            idx = end;
        }
        // Lock in ascending order. Waiting is fine: every path that waits for
        // page locks takes them in address order, and the best-effort paths
        // (setup, migrate_device_range, fills) never wait while holding any.
        let mut pages = Vec::with_capacity(n);
        let mut retry = false;
        for idx in first..first + n {
            let s = region.pt.lock(idx, &space.waits);
            let page = match s {
                State::Cpu => AccessPage::System { writable: region.prot_at(idx).contains(Prot::WRITE) },
                State::Device(p) if space.is_coherent(&p) => {
                    AccessPage::System { writable: region.prot_at(idx).contains(Prot::WRITE) }
                }
                State::Device(p) if !foreign(s) => AccessPage::Device(p),
                State::Device(_) | State::Exclusive(_) => {
                    retry = true;
                    AccessPage::System { writable: false }
                }
                State::Poisoned => {
                    unlock_all(space, &region, first, idx + 1, &pages, Some(s));
                    return Err(Error::new(ErrorKind::Fault, "a page of the range is poisoned"));
                }
            };
            pages.push(page);
            if retry {
                break;
            }
        }
        // An unmap that held some of the pages while we waited has made
        // them inaccessible (the kernel refuses to fill them): as if it had
        // come first.
        let unmapped = region.has_unmapped(&(first..first + n));
        if retry || unmapped || region.is_dead() {
            let done = first + pages.len();
            unlock_all(space, &region, first, done, &pages, None);
            if region.is_dead() {
                return Err(Error::new(ErrorKind::Fault, "the region was unmapped"));
            }
            if unmapped {
                return Err(Error::invalid("the range includes unmapped pages"));
            }
            continue;
        }
        match fill_holes(space, &region, first, &pages, write) {
            Ok(filled) => faulted |= filled,
            Err(e) => {
                unlock_all(space, &region, first, first + n, &pages, None);
                return Err(e);
            }
        }
        return Ok(RangeAccess { space: space.clone(), region, first, pages, faulted });
    }
    Err(Error::new(ErrorKind::Busy, "the range kept moving; gave up after 100 attempts"))
}

/// The memory behind a range of one region, for a device that reads and
/// writes its RAM pages in place ([`AddressSpace::region_memory`]). It
/// keeps the region's memory mapped, not its pages where they are: a
/// device keeps them in place with [`range_fault`] and an interval
/// notifier, whose invalidation it must obey before the pages change.
#[derive(Debug, Clone)]
pub struct RegionMemory {
    region: Arc<Vma>,
    offset: usize,
    len: usize,
}

impl RegionMemory {
    /// The range's first address.
    pub fn addr(&self) -> usize {
        self.region.start() + self.offset
    }

    /// The range's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: the range is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The range lent for direct access by a device.
    pub fn dma_range(&self) -> Result<uhmm_sys::mman::DmaRange<'_>> {
        self.region.map.dma_range(self.offset, self.len).map_err(|e| Error::sys("dma range", e))
    }
}

impl AddressSpace {
    /// The memory behind `range` (page-aligned, non-empty, inside one
    /// region), for a device's direct access (see [`RegionMemory`]).
    pub fn region_memory(&self, range: Range<usize>) -> Result<RegionMemory> {
        let (region, pages) = self.inner.region_pages(range)?;
        Ok(RegionMemory { offset: pages.start * PAGE_SIZE, len: pages.len() * PAGE_SIZE, region })
    }
}

/// Makes the RAM pages of a locked access present; returns whether any page
/// had to be filled. Anonymous holes get the zero page (a device write then
/// takes the kernel's copy-on-write); other mappings are populated by the
/// kernel, which they do not involve uhmm's userfaultfd in.
fn fill_holes(space: &Mm, region: &Vma, first: usize, pages: &[AccessPage], write: bool) -> Result<bool> {
    let (a, b) = (region.addr_of(first), region.addr_of(first + pages.len()));
    if region.backing != Backing::Anonymous {
        let (off, len) = (a - region.start(), b - a);
        let r = if write { region.map.populate_write(off, len) } else { region.map.populate_read(off, len) };
        r.map_err(|e| Error::sys("MADV_POPULATE", e))?;
        return Ok(false);
    }
    let holes = space.scan(a, b, Query::none_of(category::PRESENT | category::SWAPPED))?;
    let mut filled = false;
    for h in &holes {
        let hole = (h.start - a) / PAGE_SIZE..(h.end - a) / PAGE_SIZE;
        // Device pages look like holes to the kernel; one VMA per ioctl.
        for (run, _) in region.prot_runs(first + hole.start..first + hole.end) {
            let mut i = run.start - first;
            while i < run.end - first {
                if !matches!(pages[i], AccessPage::System { .. }) {
                    i += 1;
                    continue;
                }
                let j = (i..run.end - first)
                    .find(|&j| !matches!(pages[j], AccessPage::System { .. }))
                    .unwrap_or(run.end - first);
                filled = true;
                match space.uffd.zeropage(region.addr_of(first + i), (j - i) * PAGE_SIZE, true) {
                    Ok(_) => {}
                    Err(p) if p.errno == rustix::io::Errno::EXIST => {}
                    Err(p) => return Err(Error::sys("UFFDIO_ZEROPAGE", std::io::Error::from(p.errno))),
                }
                i = j;
            }
        }
    }
    Ok(filled)
}

/// Brings the device-coherent pages of `range` back to RAM through their
/// drivers' `migrate_to_ram` (a long-term pin's duty).
pub(crate) fn evict_coherent(space: &Arc<Mm>, range: Range<usize>) -> Result<()> {
    let (region, pages) = space.region_pages(range)?;
    let mut idx = pages.start;
    while idx < pages.end {
        let State::Device(page) = region.pt.load(idx).state() else {
            idx += 1;
            continue;
        };
        if !space.is_coherent(&page) {
            idx += 1;
            continue;
        }
        let same = |i| matches!(region.pt.load(i).state(), State::Device(p) if p.pagemap == page.pagemap);
        let end = (idx + 1..pages.end).find(|&i| !same(i)).unwrap_or(pages.end);
        migrate_foreign(space, &region, idx..end, page)?;
        idx = end;
    }
    Ok(())
}

/// Brings pages `pages` of another device (the one holding `page`, the
/// first) back with its driver's `migrate_to_ram`.
fn migrate_foreign(space: &Arc<Mm>, region: &Vma, pages: Range<usize>, page: DevicePage) -> Result<()> {
    let Some(ops) = space.driver(page.pagemap) else {
        return Err(Error::new(ErrorKind::Fault, "a page lives on a device that is gone"));
    };
    let (start, end) = (region.addr_of(pages.start), region.addr_of(pages.end));
    let fault = CpuFault::new(AddressSpace::from(space.clone()), start, start..end, page);
    ops.migrate_to_ram(&fault)
}

fn unlock_all(space: &Mm, region: &Vma, first: usize, end: usize, pages: &[AccessPage], last: Option<State>) {
    for idx in first..end {
        let state = match pages.get(idx - first) {
            Some(AccessPage::Device(p)) => State::Device(*p),
            Some(AccessPage::System { .. }) => region.pt.load(idx).state(),
            None => last.unwrap_or(State::Cpu),
        };
        space.unlock_wake(region, idx, state);
    }
}

impl RangeAccess {
    /// Number of pages.
    pub fn npages(&self) -> usize {
        self.pages.len()
    }

    /// Page `i`: in RAM, or on the caller's device (`None` past the end).
    pub fn page(&self, i: usize) -> Option<AccessPage> {
        self.pages.get(i).copied()
    }

    /// Ends the access and returns what each page was (`hmm_range_fault`'s
    /// pfns). The pages are no longer held: a mirror must check its
    /// notifier's [`read_retry`](crate::IntervalNotifier::read_retry) under
    /// its own lock before trusting them.
    pub fn release(self) -> Vec<AccessPage> {
        self.pages.clone()
    }

    /// Whether anything had to be faulted in (a fault round in dmirror's terms).
    pub fn faulted(&self) -> bool {
        self.faulted
    }

    /// Copies RAM page `i` from `offset` into `buf`.
    pub fn read(&self, i: usize, offset: usize, buf: &mut [u8]) -> Result<()> {
        let off = self.offset(i, offset, buf.len())?;
        self.region.map.read(off, buf).map_err(|e| Error::sys("read", e))
    }

    /// Copies `buf` into RAM page `i` at `offset`.
    pub fn write(&self, i: usize, offset: usize, buf: &[u8]) -> Result<()> {
        let off = self.offset(i, offset, buf.len())?;
        if !self.region.prot_at(self.first + i).contains(Prot::WRITE) {
            return Err(Error::new(ErrorKind::Permission, "page is read-only"));
        }
        self.region.map.write(off, buf).map_err(|e| Error::sys("write", e))
    }

    fn offset(&self, i: usize, offset: usize, len: usize) -> Result<usize> {
        if !matches!(self.pages.get(i), Some(AccessPage::System { .. })) {
            return Err(Error::invalid("not a RAM page of this access"));
        }
        match offset.checked_add(len) {
            Some(end) if end <= PAGE_SIZE => Ok((self.first + i) * PAGE_SIZE + offset),
            _ => Err(Error::invalid("access beyond the page")),
        }
    }
}

impl Drop for RangeAccess {
    fn drop(&mut self) {
        let end = self.first + self.pages.len();
        unlock_all(&self.space, &self.region, self.first, end, &self.pages, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    #[test]
    fn region_memory_lends_a_range_of_one_region_and_refuses_others() {
        let space = AddressSpace::new(Config::default()).expect("userfaultfd");
        let r = space.map(8 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
        let mem = space.region_memory(r.addr() + 2 * PAGE_SIZE..r.addr() + 5 * PAGE_SIZE).unwrap();
        assert_eq!((mem.addr(), mem.len()), (r.addr() + 2 * PAGE_SIZE, 3 * PAGE_SIZE));
        let dma = mem.dma_range().unwrap();
        assert_eq!((dma.addr(), dma.len()), (mem.addr(), mem.len()));
        for bad in [r.addr() + 1..r.addr() + PAGE_SIZE, r.addr()..r.addr(), r.addr()..r.addr() + 9 * PAGE_SIZE] {
            let e = space.region_memory(bad.clone()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad:x?}");
        }
    }
}
