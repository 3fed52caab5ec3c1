//! The RAM charge of the fault path: a hook a memory policy sets so that a
//! fault handler asks before it brings pages into RAM — the kernel's
//! `mem_cgroup_charge`, whose `try_charge` reclaims (or waits) when a memory
//! cgroup is at its limit. The core only calls the hook; the policy (a RAM
//! budget and its reclaim) lives with the drivers.

/// What a fault handler asks before it brings pages into RAM; see
/// [`AddressSpace::set_charge`](crate::AddressSpace::set_charge).
pub trait ChargeOps: Send + Sync {
    /// A fault handler is about to bring about `pages` pages into RAM (a
    /// first-touch zero fill, or a `migrate_to_ram` window). The hook may
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
