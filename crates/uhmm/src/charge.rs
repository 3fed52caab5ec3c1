//! The RAM charge of the fault path: a hook a memory policy sets so that a
//! fault handler asks before it brings pages into RAM — the kernel's
//! `mem_cgroup_charge`, whose `try_charge` reclaims (or waits) when a memory
//! cgroup is at its limit. The core only calls the hook; the policy (a RAM
//! budget and its reclaim) lives with the drivers. Also the gauge of pages
//! being brought in, which keeps a policy's estimate from counting a window
//! twice ([`AddressSpace::pages_in_at_scan`](crate::AddressSpace::pages_in_at_scan)).

use std::sync::atomic::{AtomicU64, Ordering};

/// What a fault handler asks before it brings pages into RAM; see
/// [`AddressSpace::set_charge`](crate::AddressSpace::set_charge).
pub trait ChargeOps: Send + Sync {
    /// A fault handler is about to bring about `pages` pages into RAM (a
    /// first-touch zero fill, its pages locked already and counted exactly,
    /// or a `migrate_to_ram` window, at most that many). The hook may
    /// block while room is made (the faulting thread waits meanwhile, as
    /// under direct reclaim), but only for a bounded time, and it must not
    /// wait for a fault to be served (it runs on a fault handler thread):
    /// it may migrate pages, which only try-locks them.
    fn charge(&self, pages: usize);
}

impl std::fmt::Debug for dyn ChargeOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChargeOps")
    }
}

/// Pages a fault handler is bringing into RAM, counted in a gauge from
/// before they are installed until after they are counted in
/// `zero_filled_pages` or `pages_to_ram` (see `AddressSpace::pages_in_at_scan`).
#[must_use = "the pages count as arriving only while the guard lives"]
pub(crate) struct Arriving<'a> {
    gauge: &'a AtomicU64,
    pages: u64,
}

impl<'a> Arriving<'a> {
    pub(crate) fn new(gauge: &'a AtomicU64, pages: u64) -> Self {
        gauge.fetch_add(pages, Ordering::SeqCst);
        Arriving { gauge, pages }
    }
}

impl Drop for Arriving<'_> {
    fn drop(&mut self) {
        // After the count: a reader that sees the gauge without these pages
        // sees them counted.
        self.gauge.fetch_sub(self.pages, Ordering::SeqCst);
    }
}
