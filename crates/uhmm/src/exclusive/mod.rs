//! Device-exclusive access (`make_device_exclusive`): a device gets a range
//! to itself (for atomics); any CPU access takes it back.
//!
//! The kernel replaces each page-table entry with a device-exclusive entry
//! pointing at the same page. uhmm moves the page (`UFFDIO_MOVE`, no copy)
//! out of the region into a page of a holding area, where the device reaches
//! it ([`SystemPage`]); the region's entry is empty, so a CPU read or write
//! faults, and the fault engine moves the page back — after telling the
//! device ([`InvalidateEvent::Clear`]) — before the access retries.

use std::ops::Range;
use std::sync::Arc;

use crate::fork::gate::InFlight;
use crate::mirror::range_fault;
use crate::mm::{AddressSpace, Mm};
use crate::notifier::InvalidateEvent;
use crate::page::Owner;
use crate::pte::State;
use crate::staging::SystemPage;
use crate::vma::{Backing, Prot, Vma};
use crate::{Error, ErrorKind, Result};
use uhmm_sys::PAGE_SIZE;

pub(crate) mod revoke;

/// Pages made exclusive to a device, still locked: the device records them
/// in its page table, then drops this (which unlocks them; a CPU access from
/// then on takes them back).
#[derive(Debug)]
pub struct ExclusiveGrant {
    space: Arc<Mm>,
    region: Arc<Vma>,
    first: usize,
    held: Vec<Held>,
    _in_flight: InFlight,
}

/// One page of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Not locked by the grant (someone else held it, or it was not in RAM).
    Skipped,
    /// Locked, but it could not be moved away (pinned, shared).
    Stayed,
    /// Moved to this page of the holding area.
    At(usize),
}

impl ExclusiveGrant {
    /// Pages in the range.
    pub fn npages(&self) -> usize {
        self.held.len()
    }

    /// How many pages the device got.
    pub fn cpages(&self) -> usize {
        self.held.iter().filter(|h| matches!(h, Held::At(_))).count()
    }

    /// The page the device uses for page `i`, unless it was skipped (busy,
    /// or on a device).
    pub fn page(&self, i: usize) -> Option<SystemPage> {
        match self.held.get(i) {
            Some(Held::At(off)) => Some(self.space.holding.page(*off)),
            _ => None,
        }
    }
}

impl Drop for ExclusiveGrant {
    fn drop(&mut self) {
        for (i, held) in self.held.iter().enumerate() {
            let idx = self.first + i;
            let state = match held {
                Held::Skipped => continue,
                Held::Stayed => State::Cpu,
                Held::At(off) => State::Exclusive((off / PAGE_SIZE) as u64),
            };
            self.space.unlock_wake(&self.region, idx, state);
        }
    }
}

impl AddressSpace {
    /// `make_device_exclusive`: gives `owner`'s device exclusive access to
    /// `range` (page-aligned, in one read-write anonymous region). Pages are
    /// faulted in first (holes filled, other devices' pages brought back);
    /// a page locked by someone else, or on `owner`'s own device, is skipped.
    pub fn make_device_exclusive(&self, range: Range<usize>, owner: Owner) -> Result<ExclusiveGrant> {
        let space = &self.inner;
        space.check_usable()?;
        let (region, pages) = space.region_pages(range.clone())?;
        if region.backing != Backing::Anonymous {
            return Err(Error::invalid("exclusive access needs private anonymous memory"));
        }
        if region.prot_runs(pages.clone()).iter().any(|(_, p)| *p != Prot::READ_WRITE) {
            return Err(Error::new(ErrorKind::Permission, "exclusive access needs read-write memory"));
        }
        drop(range_fault(self, range.clone(), true, owner)?.release());
        let in_flight = InFlight::enter();
        let mut held = vec![Held::Skipped; pages.len()];
        for idx in pages.clone() {
            match region.pt.try_lock(idx) {
                Some(State::Cpu) => held[idx - pages.start] = Held::Stayed,
                Some(other) => space.unlock_wake(&region, idx, other),
                None => {}
            }
        }
        let _inv = space.notifiers.invalidate(range, InvalidateEvent::Exclusive { owner });
        let mut grant = ExclusiveGrant {
            space: space.clone(),
            region: region.clone(),
            first: pages.start,
            held,
            _in_flight: in_flight,
        };
        for i in 0..grant.held.len() {
            if grant.held[i] != Held::Stayed {
                continue;
            }
            // The grant unlocks what it holds even if this fails.
            let off = space.holding.take()?;
            let dst = space.holding.addr(off);
            let moved = space.uffd.move_pages(dst, &region.map, (pages.start + i) * PAGE_SIZE, PAGE_SIZE, false, true);
            // The kernel can move a page and still answer an error (see
            // migrate.rs): the page table says whether it moved. If even
            // that cannot be read, count it held: revoking finds it either
            // way, while a page wrongly counted as staying would be lost.
            let moved = moved.is_ok() || !matches!(space.is_present(region.addr_of(pages.start + i)), Ok(true));
            if moved {
                grant.held[i] = Held::At(off);
            } else {
                // Pinned or shared (EBUSY): it stays with the CPU.
                tracing::debug!("page not made exclusive");
                space.holding.give_back(off);
            }
        }
        Ok(grant)
    }
}
