//! Device memory as uhmm sees it: device page frames, owners, and the driver
//! trait (`struct dev_pagemap` and `dev_pagemap_ops` in the kernel).
//!
//! A driver creates a [`DevicePagemap`] for its memory with
//! [`AddressSpace::register_pagemap`](crate::AddressSpace::register_pagemap).
//! Each device page has a frame here: a reference count, the reverse map to
//! the (region, page) that maps it, and a word of driver data. The page lock
//! of a device page is the lock of the software page-table entry that points
//! to it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, Weak};

use crate::fault::CpuFault;
use crate::migrate::{Collected, Migrated, Migration};
use crate::{Error, ErrorKind, Result};

/// A device page number, local to one [`DevicePagemap`].
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

/// What a device driver must do for uhmm (`dev_pagemap_ops`).
pub trait DevicePagemapOps: Send + Sync {
    /// The device page `pfn` is no longer used by any address: give it back
    /// to the device's allocator. Called after the page is unmapped. It may
    /// be called while the core holds the lock of the page's old address (a
    /// region being unmapped frees its device pages under their locks), so
    /// it must not touch region memory or wait for a migration.
    fn page_free(&self, pfn: DevicePfn);

    /// [`page_free`](Self::page_free) of several pages at once (a finished
    /// migration's sources): a driver can take its locks once. The default
    /// frees them one by one.
    fn pages_free(&self, pfns: &[DevicePfn]) {
        for &pfn in pfns {
            self.page_free(pfn);
        }
    }

    /// A CPU thread faulted on `fault.addr()`, which lives on this device:
    /// migrate it (and any of `fault.window()` the driver chooses) back to
    /// RAM with a [`Migration`] selecting
    /// [`Select::DEVICE_PRIVATE`](crate::Select::DEVICE_PRIVATE) (for a
    /// coherent pagemap, [`Select::DEVICE_COHERENT`](crate::Select::DEVICE_COHERENT):
    /// a long-term pin brings its pages back through here) and this
    /// pagemap's owner. On a CPU fault, an error of kind `NoMemory` or
    /// `Busy` is taken as transient and the fault is retried;
    /// `InvalidArgument` has the fault retried with a window of the one
    /// page; any other error makes the faulting page poisoned (SIGBUS), so
    /// return one only for unrecoverable device state. Other callers
    /// (`range_fault` and pins, fork, read-ahead, `move_pages`) each handle
    /// an error their own way (the repository's `docs/drivers.md` has the
    /// table).
    fn migrate_to_ram(&self, fault: &CpuFault) -> Result<()>;

    /// [`move_pages`](crate::move_pages()) to this device: `m` was set up with
    /// [`Select::SYSTEM`](crate::Select::SYSTEM) and this pagemap's owner.
    /// Allocate device pages of this pagemap for its collected pages (RAM
    /// pages; a hole gets a zero-filled page), copy (waiting for the copy's
    /// fence) and set each destination with
    /// [`Migration::set_dst_device`]. A page left without a destination
    /// stays where it is and is reported as out of memory; an error of kind
    /// `NoMemory` or `Busy` marks the whole batch so, any other error stops
    /// `move_pages`. The default supports no moves to this device
    /// ([`ErrorKind::Unsupported`]).
    fn alloc_and_copy(&self, m: &mut Migration<Collected>) -> Result<()> {
        let _ = m;
        Err(Error::new(ErrorKind::Unsupported, "this device does not support move_pages to it"))
    }

    /// After [`alloc_and_copy`](DevicePagemapOps::alloc_and_copy) and
    /// [`Migration::pages`], before `finalize`: update the device's page
    /// table for the pages that moved, while they are still locked. The
    /// default does nothing.
    fn finalize_and_map(&self, m: &Migration<Migrated>) {
        let _ = m;
    }
}

/// An empty reverse-map word.
const RMAP_NONE: u64 = u64::MAX;
/// Claimed as a migration's destination, not mapped yet.
const RMAP_RESERVED: u64 = u64::MAX - 1;

/// One device page frame (`struct page` of ZONE_DEVICE memory).
#[derive(Debug)]
struct Frame {
    /// `region id << 40 | page index`, or [`RMAP_NONE`].
    rmap: AtomicU64,
    /// Driver data.
    data: AtomicU64,
}

const FRAME_CHUNK: usize = 4096;

/// The device memory of one driver in one address space.
pub struct DevicePagemap {
    id: u16,
    owner: Owner,
    /// Device-coherent (CPU-addressable, mapped in regions) rather than
    /// device-private memory.
    coherent: bool,
    npages: u64,
    ops: Weak<dyn DevicePagemapOps>,
    frames: Box<[OnceLock<Box<[Frame]>>]>,
}

impl std::fmt::Debug for DevicePagemap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicePagemap")
            .field("id", &self.id)
            .field("owner", &self.owner)
            .field("npages", &self.npages)
            .finish_non_exhaustive()
    }
}

impl DevicePagemap {
    pub(crate) fn new(
        id: u16,
        owner: Owner,
        coherent: bool,
        npages: u64,
        ops: Weak<dyn DevicePagemapOps>,
    ) -> DevicePagemap {
        let chunks = usize::try_from(npages).unwrap_or(usize::MAX).div_ceil(FRAME_CHUNK);
        DevicePagemap { id, owner, coherent, npages, ops, frames: (0..chunks).map(|_| OnceLock::new()).collect() }
    }

    /// Whether this is device-coherent memory (`MEMORY_DEVICE_COHERENT`):
    /// its pages stay mapped in regions and the CPU uses them without
    /// faulting; they come back to RAM only by explicit migration (or a
    /// long-term pin).
    pub fn is_coherent(&self) -> bool {
        self.coherent
    }

    /// The id of this pagemap in its address space.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The owner token.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// How many device pages it can hold.
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// The device page `pfn` of this pagemap, if `pfn` is in range.
    pub fn page(&self, pfn: DevicePfn) -> Option<DevicePage> {
        (pfn.0 < self.npages).then_some(DevicePage { pagemap: self.id, pfn })
    }

    /// The driver, unless it is gone.
    pub(crate) fn ops(&self) -> Option<std::sync::Arc<dyn DevicePagemapOps>> {
        self.ops.upgrade()
    }

    /// The frame of `pfn`, allocating its chunk; `None` out of range.
    fn frame(&self, pfn: DevicePfn) -> Option<&Frame> {
        if pfn.0 >= self.npages {
            return None;
        }
        let i = usize::try_from(pfn.0).ok()?;
        let chunk = self.frames[i / FRAME_CHUNK].get_or_init(|| {
            (0..FRAME_CHUNK).map(|_| Frame { rmap: AtomicU64::new(RMAP_NONE), data: AtomicU64::new(0) }).collect()
        });
        Some(&chunk[i % FRAME_CHUNK])
    }

    /// The frame of `pfn` if its chunk exists (never allocates).
    fn peek_frame(&self, pfn: DevicePfn) -> Option<&Frame> {
        let i = usize::try_from(pfn.0).ok().filter(|_| pfn.0 < self.npages)?;
        self.frames[i / FRAME_CHUNK].get().map(|c| &c[i % FRAME_CHUNK])
    }

    /// Driver data of page `pfn` (`None` out of range).
    pub fn data(&self, pfn: DevicePfn) -> Option<u64> {
        Some(self.peek_frame(pfn).map_or(0, |f| f.data.load(Ordering::Relaxed))).filter(|_| pfn.0 < self.npages)
    }

    /// Sets the driver data of page `pfn`; false out of range.
    pub fn set_data(&self, pfn: DevicePfn, data: u64) -> bool {
        self.frame(pfn).map(|f| f.data.store(data, Ordering::Relaxed)).is_some()
    }

    /// Whether page `pfn` is mapped at some address, or claimed as a
    /// migration's destination (its reference count: uhmm does not share
    /// device pages between addresses).
    pub fn is_mapped(&self, pfn: DevicePfn) -> bool {
        self.peek_frame(pfn).is_some_and(|f| f.rmap.load(Ordering::Acquire) != RMAP_NONE)
    }

    /// Whether any page is mapped or claimed (scans only frames that exist).
    pub(crate) fn any_mapped(&self) -> bool {
        self.frames
            .iter()
            .filter_map(|c| c.get())
            .any(|c| c.iter().any(|f| f.rmap.load(Ordering::Acquire) != RMAP_NONE))
    }

    /// The (region id, page index) that maps `pfn`.
    pub(crate) fn rmap(&self, pfn: DevicePfn) -> Option<(u32, usize)> {
        let w = self.peek_frame(pfn)?.rmap.load(Ordering::Acquire);
        (w != RMAP_NONE && w != RMAP_RESERVED).then_some(((w >> 40) as u32, (w & ((1 << 40) - 1)) as usize))
    }

    pub(crate) fn set_rmap(&self, pfn: DevicePfn, at: Option<(u32, usize)>) {
        let w = at.map_or(RMAP_NONE, |(region, idx)| (u64::from(region) << 40) | idx as u64);
        if let Some(f) = self.frame(pfn) {
            f.rmap.store(w, Ordering::Release);
        }
    }

    /// Claims `pfn` as a migration's destination; false if it is mapped or
    /// claimed already (one device page can back only one address).
    pub(crate) fn reserve(&self, pfn: DevicePfn) -> bool {
        self.frame(pfn).is_some_and(|f| {
            f.rmap.compare_exchange(RMAP_NONE, RMAP_RESERVED, Ordering::AcqRel, Ordering::Acquire).is_ok()
        })
    }

    /// Unmaps `pfn` and hands it back to the driver (`page_free`).
    pub(crate) fn free_page(&self, pfn: DevicePfn) {
        self.free_pages(&[pfn]);
    }

    /// Unmaps `pfns` and hands them back to the driver (`pages_free`).
    pub(crate) fn free_pages(&self, pfns: &[DevicePfn]) {
        for &pfn in pfns {
            self.set_rmap(pfn, None);
        }
        if let Some(ops) = self.ops() {
            ops.pages_free(pfns);
        }
    }
}
