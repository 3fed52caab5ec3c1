//! Counters of an address space: faults, zero fills, migrations, pages and
//! bytes moved. Relaxed atomics; read them with [`AddressSpace::stats`](crate::AddressSpace::stats).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        #[derive(Debug, Default)]
        pub(crate) struct Stats { $(pub(crate) $name: AtomicU64,)* }

        /// A copy of the counters at one moment.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct StatsSnapshot { $($(#[$doc])* pub $name: u64,)* }

        impl Stats {
            pub(crate) fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Userfaults read from the kernel.
    faults,
    /// Pages of regions the program unmapped or moved away behind uhmm's
    /// back (non-cooperative events), given up.
    foreign_unmapped_pages,
    /// Regions made to follow pages the program moved behind uhmm's back
    /// (`mremap`).
    regions_followed,
    /// Ranges the program grew in place behind uhmm's back, handed back
    /// to the kernel (unregistered) at their first fault (counted as the
    /// unregistration starts).
    unmanaged_ranges,
    /// Faults that repeated one already queued (same page, same batch).
    duplicate_faults,
    /// Faults on device pages read before the page moved there: only woken
    /// (a thread that still waits faults again).
    stale_faults,
    /// Faults on locked pages, parked until the unlock wakes them.
    deferred_faults,
    /// Resolving ioctls that returned `EAGAIN` (events pending) and were retried.
    eagain,
    /// Resolving ioctls that found the page already installed (`EEXIST`).
    eexist,
    /// Pages zero-filled on first touch.
    zero_filled_pages,
    /// First touches filled with one huge page (2 MiB).
    huge_fills,
    /// Calls of a driver's `migrate_to_ram` from the fault path.
    migrate_to_ram,
    /// Of those, read-aheads: the next window of a sequential scan, brought
    /// back by an idle handler before the scan faults on it.
    read_aheads,
    /// Migrations finalized (or dropped).
    migrations,
    /// Pages collected by migrations (`cpages`).
    collected_pages,
    /// Pages that moved to a device.
    pages_to_device,
    /// Pages that moved to RAM.
    pages_to_ram,
    /// Pages a driver could not bring back, now poisoned.
    poisoned_pages,
    /// Pages `migrate_pages` moved (the kernel's `pgmigrate_success`).
    list_moved_pages,
    /// Pages `migrate_pages` gave up on (the kernel's `pgmigrate_fail`).
    list_failed_pages,
    /// Pages skipped by `setup` because they were locked or pinned.
    busy_pages,
    /// Pages copied into regions by the helper thread, beside finalize's own.
    helper_copied_pages,
    /// Pages whose copy back to RAM was given kept staging pages (to be
    /// moved in rather than allocated by the kernel; a failed move falls
    /// back to `UFFDIO_COPY` and is still counted here).
    kept_copied_pages,
    /// Kept staging pages emptied because copies back had the kernel
    /// allocate as many pages instead (a fault's copy is too small for kept
    /// pages): the pages that came back replace them.
    kept_shed_pages,
    /// Copies whose caller waited a stall's length for the helper's last
    /// piece (its CPU stopped by the host), after which copies are not
    /// shared for a while: copying alone beats waiting on a stopped helper again.
    helper_stalls,
    /// Stalls of a fault handler in the middle of a fault or a read-ahead,
    /// after which it kept off its CPU for a while, since the host may stop that CPU again.
    handler_stalls,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
