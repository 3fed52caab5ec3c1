//! `Serving`: the fault a handler thread serves, handed to the driver's
//! migrations through the address-space handle (`AddressSpace::serving`).

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use uhmm_sys::PAGE_SIZE;
use uhmm_sys::mman::Mapping;

/// The fault a handle serves. A migration set up through the handle is the
/// fault's: a faulting thread waits for it (its copies are shared with the
/// copy helper in smaller pieces), and it notes whether it woke the
/// faulting page, so the handler does not wake it a second time. Each
/// handler thread has one, begun again for each fault it serves: a fault
/// allocates nothing for it.
#[derive(Debug, Default)]
pub(crate) struct Serving {
    /// The faulting page's address.
    addr: AtomicUsize,
    woken: AtomicBool,
    /// RAM pages a migration made for the fault fills in place and has
    /// copied into the region (`UFFDIO_COPY`): no pool page to populate, no
    /// page to move out of the pool, so no TLB flush on other CPUs (which
    /// waits for an idle vCPU to wake). Allocated at first use.
    scratch: std::sync::OnceLock<Option<Arc<Mapping>>>,
    /// A migration holds the scratch pages.
    scratch_taken: AtomicBool,
}

/// Pages of a handler's scratch ([`Serving::take_scratch`]): the largest
/// fault-around window (a scan's), 2 MiB of RAM a handler thread keeps.
pub(crate) const SCRATCH_PAGES: usize = crate::BATCH_PAGES;

impl Serving {
    /// The scratch pages, for one migration at a time (`None` while
    /// another holds them, or when they cannot be mapped).
    pub(crate) fn take_scratch(&self) -> Option<Arc<Mapping>> {
        if self.scratch_taken.swap(true, Ordering::Acquire) {
            return None;
        }
        let rw = uhmm_sys::mman::Protection::ReadWrite;
        let map = self
            .scratch
            .get_or_init(|| Mapping::anonymous(SCRATCH_PAGES * PAGE_SIZE, rw, PAGE_SIZE).ok().map(Arc::new));
        if map.is_none() {
            self.scratch_taken.store(false, Ordering::Release);
        }
        map.clone()
    }

    /// Gives the scratch pages back (their data copied out).
    pub(crate) fn give_back_scratch(&self) {
        self.scratch_taken.store(false, Ordering::Release);
    }

    /// Starts serving a fault at `addr`: nothing woken yet.
    pub(crate) fn begin(&self, addr: usize) {
        self.addr.store(addr, Ordering::Relaxed);
        self.woken.store(false, Ordering::Relaxed);
    }

    /// Notes a wake of the threads faulting in `range` (addresses).
    pub(crate) fn note_wake(&self, range: Range<usize>) {
        if range.contains(&self.addr.load(Ordering::Relaxed)) {
            self.woken.store(true, Ordering::Relaxed);
        }
    }

    /// Whether a wake covered the faulting page.
    pub(crate) fn woken(&self) -> bool {
        self.woken.load(Ordering::Relaxed)
    }
}
