//! Device page identities: a device page number ([`DevicePfn`]), a device
//! page ([`DevicePage`]: which pagemap, which page) and the owner token that
//! selects device memory for a migration ([`Owner`], `pgmap_owner`). Plain
//! values every layer of the core names, from the page table up.

use std::sync::atomic::{AtomicU64, Ordering};

/// A device page number, local to one [`DevicePagemap`](crate::DevicePagemap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevicePfn(pub u64);

/// A device page: which pagemap, which page in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DevicePage {
    /// The pagemap's id in its address space.
    pub pagemap: u16,
    /// The page number in that pagemap.
    pub pfn: DevicePfn,
}

/// The owner token of device memory (`pgmap_owner`): a migration selects only
/// device pages whose pagemap has the migration's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Owner(u64);

impl Owner {
    /// A fresh owner, distinct from every other one in this process.
    pub fn new() -> Owner {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Owner(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for Owner {
    fn default() -> Self {
        Owner::new()
    }
}
