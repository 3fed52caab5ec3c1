//! Device memory as uhmm sees it: a pagemap's page frames (`struct
//! dev_pagemap` and the `struct page`s of its ZONE_DEVICE memory). The
//! driver behind a pagemap is the address space's to call (`mm.rs`).
//!
//! A driver creates a [`DevicePagemap`] for its memory with
//! [`AddressSpace::register_pagemap`](crate::AddressSpace::register_pagemap).
//! Each device page has a frame here: a reference count, the reverse map to
//! the (region, page) that maps it, and a word of driver data. The page lock
//! of a device page is the lock of the software page-table entry that points
//! to it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::page::{DevicePage, DevicePfn, Owner};
use crate::vma::RegionId;

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
    pub(crate) fn new(id: u16, owner: Owner, coherent: bool, npages: u64) -> DevicePagemap {
        let chunks = usize::try_from(npages).unwrap_or(usize::MAX).div_ceil(FRAME_CHUNK);
        DevicePagemap { id, owner, coherent, npages, frames: (0..chunks).map(|_| OnceLock::new()).collect() }
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
    pub(crate) fn rmap(&self, pfn: DevicePfn) -> Option<(RegionId, usize)> {
        let w = self.peek_frame(pfn)?.rmap.load(Ordering::Acquire);
        (w != RMAP_NONE && w != RMAP_RESERVED).then_some((RegionId((w >> 40) as u32), (w & ((1 << 40) - 1)) as usize))
    }

    pub(crate) fn set_rmap(&self, pfn: DevicePfn, at: Option<(RegionId, usize)>) {
        let w = at.map_or(RMAP_NONE, |(region, idx)| (u64::from(region.0) << 40) | idx as u64);
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

    /// Clears the reverse map of `pfns`: no address maps them any more
    /// (the caller hands them back to the driver).
    pub(crate) fn unmap(&self, pfns: &[DevicePfn]) {
        for &pfn in pfns {
            self.set_rmap(pfn, None);
        }
    }
}
