//! The program's managed memory: one address space with the compressed
//! store as its device and, with a budget, a `Tier` over every block; the
//! table of blocks the hooks handed out, and what each memory call does to
//! them.

use std::collections::BTreeMap;
use std::ffi::{c_int, c_void};
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use uhmm::{AddressSpace, PAGE_SIZE, Prot, Region};
use uhmm_devices::compress::{CompressConfig, CompressStore};
use uhmm_devices::far::FarStore;
use uhmm_devices::store::{PageStore, StoreDevice, StoreDeviceConfig};
use uhmm_devices::tier::{Tier, TierConfig, space_config};

use crate::heap::Heap;
use crate::real;
use crate::report::Report;
use crate::settings::Settings;

/// What a block was made by: `free` takes only the allocator's,
/// `munmap` both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Malloc,
    Mmap,
}

/// A block of the program's memory that uhmm manages (or managed, until a
/// call it cannot follow detached it into plain memory at the same
/// addresses).
#[derive(Debug)]
struct Block {
    /// The region; `None` once detached.
    region: Option<Region>,
    /// The block's addresses (whole pages).
    range: Range<usize>,
    /// The pointer handed to the program.
    user: usize,
    kind: Kind,
    /// Pages `munmap`ed out of the middle (the region keeps them
    /// reserved until the whole block goes).
    unmapped_pages: usize,
}

impl Block {
    /// Whether the program unmapped (or moved) all of the block with a
    /// call the hooks did not see: its addresses are not uhmm's any more.
    fn is_gone(&self) -> bool {
        self.region.as_ref().is_some_and(Region::is_gone)
    }

    /// The part of `range` inside the block: its addresses, and its
    /// offsets in the block's region.
    fn part(&self, range: &Range<usize>) -> (Range<usize>, Range<usize>) {
        let part = range.start.max(self.range.start)..range.end.min(self.range.end);
        let off = part.start - self.range.start..part.end - self.range.start;
        (part, off)
    }
}

/// Counters for the report.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) blocks: AtomicU64,
    pub(crate) bytes_now: AtomicU64,
    pub(crate) bytes_peak: AtomicU64,
    pub(crate) detached: AtomicU64,
}

/// Where the program's cold pages go.
#[derive(Debug)]
pub(crate) enum Store {
    /// The compressed store in RAM (the default).
    Compress(Arc<CompressStore>),
    /// A far store (`UHMM_DEVICE`).
    Far(FarStore),
}

/// The managed memory of the program.
pub(crate) struct Runtime {
    pub(crate) settings: Settings,
    pub(crate) space: AddressSpace,
    pub(crate) store: Store,
    /// Held for the runtime's life: its pagemap goes with it.
    _device: Arc<StoreDevice>,
    pub(crate) tier: Option<Tier>,
    blocks: Mutex<BTreeMap<usize, Block>>,
    /// The small-object heap, and the bounds of its chunks (a pointer
    /// outside them is not the heap's, without taking the lock).
    heap: Mutex<Heap>,
    heap_bounds: (AtomicUsize, AtomicUsize),
    pub(crate) counters: Counters,
    pub(crate) started: Instant,
    /// Set in a forked child: the space belongs to the parent, so the
    /// child's memory calls go straight to the kernel and its blocks are
    /// plain memory.
    pub(crate) forked: AtomicBool,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// Rounds `n` up to whole pages (`None` on overflow).
pub(crate) fn page_up(n: usize) -> Option<usize> {
    n.checked_add(PAGE_SIZE - 1).map(|n| n & !(PAGE_SIZE - 1))
}

impl Runtime {
    /// Makes the address space, store, device and (with a budget) tier.
    pub(crate) fn new(settings: Settings) -> Result<Runtime, String> {
        let err = |what: &'static str| move |e: uhmm::Error| format!("{what}: {e}");
        // The stores' worker threads are uhmm's own (`uhmm-…`): their
        // allocations never come from the heap they may be moving.
        let _ = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("uhmm-worker-{i}")).build_global();
        // Raw munmap and mremap calls on blocks are seen (`uhmm::foreign`).
        let config = uhmm::Config { non_cooperative: true, ..space_config() };
        let space = AddressSpace::new(config).map_err(err("address space"))?;
        if space.user_mode_only() {
            return Err("only user-mode userfaultfd is available: the program's own system calls on \
                        its memory would fail"
                .into());
        }
        let (store, page_store): (Store, Arc<dyn PageStore>) = match &settings.device {
            None => {
                let s = Arc::new(CompressStore::new(CompressConfig::default()).map_err(err("compressed store"))?);
                (Store::Compress(s.clone()), s)
            }
            Some(address) => {
                let far = address.open().map_err(err("far store"))?;
                let s = far.page_store();
                (Store::Far(far), s)
            }
        };
        let device =
            Arc::new(StoreDevice::new(&space, page_store, StoreDeviceConfig::default()).map_err(err("device"))?);
        let tier = match settings.ram_budget {
            Some(b) => Some(
                Tier::new(&space, device.clone(), TierConfig { budget_bytes: b, ..TierConfig::default() })
                    .map_err(err("tier"))?,
            ),
            None => None,
        };
        Ok(Runtime {
            settings,
            space,
            store,
            _device: device,
            tier,
            blocks: Mutex::new(BTreeMap::new()),
            heap: Mutex::new(Heap::new()),
            heap_bounds: (AtomicUsize::new(usize::MAX), AtomicUsize::new(0)),
            counters: Counters::default(),
            started: Instant::now(),
            forked: AtomicBool::new(false),
        })
    }

    /// What uhmm did so far.
    pub(crate) fn report(&self) -> Report {
        let c = &self.counters;
        let space = self.space.stats();
        let (stored_bytes, store_bytes, compression_ratio) = match &self.store {
            Store::Compress(s) => {
                let s = s.stats();
                (s.orig_data_size, s.mem_used_total, s.ratio())
            }
            Store::Far(f) => {
                let u = f.usage();
                (u.orig_bytes, u.used_bytes, 0.0)
            }
        };
        let tier = self.tier.as_ref().map(|t| t.stats()).unwrap_or_default();
        Report {
            ram_budget: self.settings.ram_budget,
            min_size: self.settings.min_size as u64,
            blocks: c.blocks.load(Ordering::Relaxed),
            managed_peak_bytes: c.bytes_peak.load(Ordering::Relaxed),
            detached_blocks: c.detached.load(Ordering::Relaxed),
            heap_bytes: self.heap.try_lock().map_or(0, |h| h.bytes() as u64),
            foreign_unmapped_pages: space.foreign_unmapped_pages,
            regions_followed: space.regions_followed,
            faults: space.faults,
            demoted_pages: space.pages_to_device,
            promoted_pages: space.pages_to_ram,
            tier_peak_resident_bytes: tier.peak_resident_bytes,
            device: self.settings.device.as_ref().map_or_else(|| "compress".into(), |a| a.to_string()),
            stored_bytes,
            store_bytes,
            compression_ratio,
            tier_seconds: (tier.tracking_cpu + tier.reclaim_cpu).as_secs_f64(),
            seconds: self.started.elapsed().as_secs_f64(),
            ..Report::default()
        }
    }

    /// At exit: removes what a far store holds outside the process (its
    /// values on a server; they would otherwise wait for their expiry).
    pub(crate) fn close_store(&self) {
        if let Store::Far(far) = &self.store {
            far.close();
        }
    }

    /// Before `fork`: takes the block table's and the heap's locks, so
    /// that the child's copies are not held by a thread that does not
    /// exist there.
    pub(crate) fn lock_for_fork(&self) {
        std::mem::forget(self.blocks.lock());
        std::mem::forget(self.heap.lock());
    }

    /// After `fork`, in parent and child: lets the lock
    /// [`lock_for_fork`](Self::lock_for_fork) took go.
    pub(crate) fn unlock_after_fork(&self, child: bool) {
        if child {
            self.forked.store(true, Ordering::Relaxed);
        }
        // SAFETY: `lock_for_fork` took the locks in the forking thread and
        // forgot their guards; this is that thread (or its copy in the child).
        unsafe {
            self.blocks.force_unlock();
            self.heap.force_unlock();
        }
    }

    fn forked(&self) -> bool {
        self.forked.load(Ordering::Relaxed)
    }

    /// A new block of at least `len` bytes whose pointer is aligned to
    /// `align` (a power of two); null when uhmm cannot make one (the
    /// caller then asks the C library).
    pub(crate) fn alloc(&self, len: usize, align: usize, kind: Kind) -> *mut c_void {
        if self.forked() {
            return std::ptr::null_mut();
        }
        let extra = align.saturating_sub(PAGE_SIZE);
        let Some(size) = len.checked_add(extra).and_then(page_up) else { return std::ptr::null_mut() };
        let Ok(region) = self.space.map(size, Prot::READ_WRITE) else { return std::ptr::null_mut() };
        let range = region.range();
        let user = range.start.next_multiple_of(align.max(1));
        if let Some(tier) = &self.tier
            && tier.manage(range.clone()).is_err()
        {
            return std::ptr::null_mut();
        }
        let c = &self.counters;
        c.blocks.fetch_add(1, Ordering::Relaxed);
        let now = c.bytes_now.fetch_add(size as u64, Ordering::Relaxed) + size as u64;
        c.bytes_peak.fetch_max(now, Ordering::Relaxed);
        let block = Block { region: Some(region), range: range.clone(), user, kind, unmapped_pages: 0 };
        let mut blocks = self.blocks.lock();
        // Blocks the program unmapped behind the hooks' back may have
        // left their addresses to this one.
        let gone: Vec<usize> = blocks.range(..range.end).filter(|(_, b)| b.is_gone()).map(|(&s, _)| s).collect();
        let gone: Vec<Block> = gone.into_iter().filter_map(|s| blocks.remove(&s)).collect();
        blocks.insert(range.start, block);
        drop(blocks);
        for b in gone {
            self.release(b);
        }
        user as *mut c_void
    }

    /// `size` bytes from the small-object heap (a new chunk when none has
    /// room); null when uhmm cannot (the caller asks the C library).
    pub(crate) fn small_alloc(&self, size: usize) -> *mut c_void {
        if self.forked() {
            return std::ptr::null_mut();
        }
        let mut heap = self.heap.lock();
        if let Some(p) = heap.alloc(size) {
            return p.as_ptr().cast();
        }
        let Ok(region) = self.space.map(Heap::chunk_for(size), Prot::READ_WRITE) else { return std::ptr::null_mut() };
        if let Some(tier) = &self.tier
            && tier.manage(region.range()).is_err()
        {
            return std::ptr::null_mut();
        }
        let range = region.range();
        self.heap_bounds.0.fetch_min(range.start, Ordering::Relaxed);
        self.heap_bounds.1.fetch_max(range.end, Ordering::Relaxed);
        heap.add_chunk(region);
        heap.alloc(size).map_or(std::ptr::null_mut(), |p| p.as_ptr().cast())
    }

    /// `ptr` as the heap's allocation, if it may be one (within the
    /// chunks' bounds; the caller checks ownership under the lock).
    fn in_heap_bounds(&self, ptr: usize) -> Option<NonNull<u8>> {
        let (lo, hi) = (&self.heap_bounds.0, &self.heap_bounds.1);
        (lo.load(Ordering::Relaxed) <= ptr && ptr < hi.load(Ordering::Relaxed)).then(|| NonNull::new(ptr as *mut u8))?
    }

    /// Whether `ptr` is the heap's.
    pub(crate) fn small_owns(&self, ptr: usize) -> bool {
        self.in_heap_bounds(ptr).is_some() && self.heap.lock().owns(ptr)
    }

    /// Frees `ptr` if it is the heap's (false: it is not). Without
    /// waiting: a free from a signal handler that interrupted the heap on
    /// its own thread leaves a heap pointer to the process's end. In a
    /// forked child the heap's memory is plain memory: a free leaves it.
    pub(crate) fn small_free(&self, ptr: usize, wait: bool) -> bool {
        let Some(p) = self.in_heap_bounds(ptr) else { return false };
        let Some(mut heap) = (if wait { Some(self.heap.lock()) } else { self.heap.try_lock() }) else {
            return true;
        };
        if !heap.owns(ptr) {
            return false;
        }
        if !self.forked() {
            // SAFETY: a live allocation of the heap (the caller frees it).
            unsafe { heap.free(p) };
        }
        true
    }

    /// The size of the heap's allocation `ptr`, if it is one.
    pub(crate) fn small_usable(&self, ptr: usize) -> Option<usize> {
        let p = self.in_heap_bounds(ptr)?;
        // SAFETY: owned by the heap: a live allocation (the caller's).
        self.heap.lock().owns(ptr).then(|| unsafe { Heap::usable(p) })
    }

    /// Resizes the heap's allocation `ptr` within the heap; `None` when it
    /// cannot (the caller moves the data itself).
    pub(crate) fn small_realloc(&self, ptr: usize, size: usize) -> Option<*mut c_void> {
        let p = self.in_heap_bounds(ptr)?;
        if self.forked() {
            return None;
        }
        let mut heap = self.heap.lock();
        if !heap.owns(ptr) {
            return None;
        }
        // SAFETY: a live allocation of the heap (the caller's contract).
        unsafe { heap.realloc(p, size) }.map(|q| q.as_ptr().cast())
    }

    /// The block holding `addr`: its start. Blocks the program unmapped
    /// behind the hooks' back hold nothing.
    fn find(blocks: &BTreeMap<usize, Block>, addr: usize) -> Option<usize> {
        let (&start, b) = blocks.range(..=addr).next_back()?;
        (addr < b.range.end && !b.is_gone()).then_some(start)
    }

    /// The usable bytes from `ptr` to its block's end, if `ptr` is a
    /// block's pointer.
    pub(crate) fn usable(&self, ptr: usize) -> Option<usize> {
        let blocks = self.blocks.lock();
        let b = blocks.get(&Self::find(&blocks, ptr)?)?;
        (b.user == ptr).then(|| b.range.end - ptr)
    }

    /// Whether `ptr` is a block's pointer, without waiting for the table's
    /// lock (`None` while another holds it).
    pub(crate) fn owns_now(&self, ptr: usize) -> Option<bool> {
        let blocks = self.blocks.try_lock()?;
        Some(Self::find(&blocks, ptr).is_some_and(|s| blocks[&s].user == ptr))
    }

    /// Frees the allocator block whose pointer is `ptr`; false when `ptr`
    /// is not one.
    pub(crate) fn free(&self, ptr: usize) -> bool {
        let mut blocks = self.blocks.lock();
        let Some(start) = Self::find(&blocks, ptr) else { return false };
        if blocks[&start].user != ptr || blocks[&start].kind != Kind::Malloc {
            return false;
        }
        let block = blocks.remove(&start);
        drop(blocks);
        if let Some(b) = block {
            self.release(b);
        }
        true
    }

    /// Gives a whole block's memory back.
    fn release(&self, b: Block) {
        let len = b.range.len();
        match b.region {
            // Unmapped behind the hooks: nothing is left to unmap.
            Some(region) if region.is_gone() => {
                if let Some(tier) = &self.tier {
                    tier.unmanage(b.range.clone());
                }
                drop(region);
            }
            Some(region) if !self.forked() => {
                if let Some(tier) = &self.tier {
                    tier.unmanage(b.range.clone());
                }
                drop(region);
            }
            Some(region) => {
                // The child's copy of the parent's region: plain memory
                // here; the parent's space must not be touched.
                std::mem::forget(region);
                real::munmap(b.range.start as *mut c_void, len);
            }
            None => {
                real::munmap(b.range.start as *mut c_void, len);
            }
        }
        self.counters.bytes_now.fetch_sub(len as u64, Ordering::Relaxed);
    }

    /// The parts of `range` no block covers.
    fn gaps(blocks: &BTreeMap<usize, Block>, range: Range<usize>) -> Vec<Range<usize>> {
        let mut gaps = Vec::new();
        let mut at = range.start;
        let first = Self::find(blocks, range.start).unwrap_or(range.start);
        for b in blocks.range(first..range.end).map(|(_, b)| b).filter(|b| !b.is_gone()) {
            if b.range.start > at {
                gaps.push(at..b.range.start.min(range.end));
            }
            at = at.max(b.range.end);
        }
        if at < range.end {
            gaps.push(at..range.end);
        }
        gaps
    }

    /// The starts of the blocks `range` overlaps.
    fn overlapping(blocks: &BTreeMap<usize, Block>, range: &Range<usize>) -> Vec<usize> {
        let first = Self::find(blocks, range.start).unwrap_or(range.start);
        blocks.range(first..range.end).filter(|(_, b)| !b.is_gone()).map(|(&s, _)| s).collect()
    }

    /// Whether `range` touches a block (the hooks' fast check).
    pub(crate) fn touches(&self, range: &Range<usize>) -> bool {
        !Self::overlapping(&self.blocks.lock(), range).is_empty()
    }

    /// `munmap` of `range` (page-aligned), which touches blocks: whole
    /// blocks are freed, parts unmapped inside their region, the rest
    /// handed to the kernel.
    pub(crate) fn munmap(&self, range: Range<usize>) -> c_int {
        let mut blocks = self.blocks.lock();
        let mut whole = Vec::new();
        for start in Self::overlapping(&blocks, &range) {
            let b = blocks.get_mut(&start).expect("listed");
            let (part, off) = b.part(&range);
            let all = part == b.range;
            match (&b.region, all) {
                (Some(region), false) if !self.forked() => {
                    if region.unmap(off).is_ok() {
                        b.unmapped_pages += part.len() / PAGE_SIZE;
                    }
                    if b.unmapped_pages * PAGE_SIZE >= b.range.len() {
                        whole.push(start);
                    }
                }
                (None, false) => {
                    real::munmap(part.start as *mut c_void, part.len());
                }
                _ if all => whole.push(start),
                // A forked child's partial unmap of a parent's region:
                // plain memory here.
                _ => {
                    real::munmap(part.start as *mut c_void, part.len());
                }
            }
        }
        let freed: Vec<Block> = whole.into_iter().filter_map(|s| blocks.remove(&s)).collect();
        let gaps = Self::gaps(&blocks, range);
        drop(blocks);
        for b in freed {
            self.release(b);
        }
        for g in gaps {
            real::munmap(g.start as *mut c_void, g.len());
        }
        0
    }

    /// `madvise` of `range`, which touches blocks: advice that drops pages
    /// drops them through uhmm; any other goes to the kernel.
    pub(crate) fn madvise(&self, range: Range<usize>, advice: c_int) -> c_int {
        let drops = matches!(advice, libc::MADV_DONTNEED | libc::MADV_FREE | libc::MADV_REMOVE);
        if !drops || self.forked() {
            return real::madvise(range.start as *mut c_void, range.len(), advice);
        }
        let kernel = |r: Range<usize>| real::madvise(r.start as *mut c_void, r.len(), advice) == 0;
        self.apply(range, false, libc::EINVAL, |region, off| region.discard(off).is_ok(), kernel)
    }

    /// `mprotect` of `range`, which touches blocks: read and write through
    /// uhmm; execute detaches the block into plain memory first.
    pub(crate) fn mprotect(&self, range: Range<usize>, prot: c_int) -> c_int {
        if self.forked() {
            return real::mprotect(range.start as *mut c_void, range.len(), prot);
        }
        let mut p = Prot::NONE;
        if prot & libc::PROT_READ != 0 {
            p |= Prot::READ;
        }
        if prot & libc::PROT_WRITE != 0 {
            p |= Prot::WRITE;
        }
        let plain = prot & !(libc::PROT_READ | libc::PROT_WRITE) != 0;
        let kernel = |r: Range<usize>| real::mprotect(r.start as *mut c_void, r.len(), prot) == 0;
        self.apply(range, plain, libc::ENOMEM, |region, off| region.protect(off, p).is_ok(), kernel)
    }

    /// Does a call on `range`: on each block's part through its region
    /// (`via_region`, given the offsets) or, for a detached block (all of
    /// them first when `detach`), through the kernel (`via_kernel`, given
    /// the addresses), which also takes the parts no block covers. Returns
    /// 0, or -1 with `errno` set (`region_errno` when uhmm refused).
    fn apply(
        &self,
        range: Range<usize>,
        detach: bool,
        region_errno: c_int,
        via_region: impl Fn(&Region, Range<usize>) -> bool,
        via_kernel: impl Fn(Range<usize>) -> bool,
    ) -> c_int {
        let mut blocks = self.blocks.lock();
        for start in Self::overlapping(&blocks, &range) {
            let b = blocks.get_mut(&start).expect("listed");
            if detach {
                self.detach(b);
            }
            let (part, off) = b.part(&range);
            let done = match &b.region {
                Some(region) => {
                    via_region(region, off) || {
                        real::set_errno(region_errno);
                        false
                    }
                }
                None => via_kernel(part),
            };
            if !done {
                return -1;
            }
        }
        if Self::gaps(&blocks, range).into_iter().all(via_kernel) { 0 } else { -1 }
    }

    /// Detaches every block `range` touches (for `mremap` and fixed
    /// mappings over them, which uhmm does not follow): each becomes plain
    /// memory at the same addresses, with its data.
    pub(crate) fn detach_range(&self, range: Range<usize>) {
        let mut blocks = self.blocks.lock();
        for start in Self::overlapping(&blocks, &range) {
            self.detach(blocks.get_mut(&start).expect("listed"));
        }
    }

    /// Turns a block into plain anonymous memory at the same addresses:
    /// its data copied (faulting every page back) into a fresh mapping,
    /// the region dropped, the mapping moved onto the block's addresses.
    /// Pages unmapped out of the block stay unmapped. When no fresh mapping
    /// can be made, the block stays as it was: the region goes only once
    /// its data is safe elsewhere.
    fn detach(&self, b: &mut Block) {
        if self.forked() {
            if let Some(region) = b.region.take() {
                std::mem::forget(region);
            }
            return;
        }
        let Some(region) = &b.region else { return };
        let len = b.range.len();
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let copy = real::mmap(std::ptr::null_mut(), len, rw, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
        if copy == libc::MAP_FAILED {
            return;
        }
        // SAFETY: `copy` was just mapped read-write, `len` bytes, and no
        // one else knows of it.
        let data = unsafe { std::slice::from_raw_parts_mut(copy.cast::<u8>(), len) };
        let mut holes = Vec::new();
        for (page, chunk) in data.chunks_mut(PAGE_SIZE).enumerate() {
            if region.read(page * PAGE_SIZE, chunk).is_err() {
                holes.push(page * PAGE_SIZE);
            }
        }
        if let Some(tier) = &self.tier {
            tier.unmanage(b.range.clone());
        }
        b.region = None;
        let start = b.range.start as *mut c_void;
        let fixed = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
        if real::mremap(copy, len, len, fixed, start) != start {
            // Moving onto addresses just freed fails only when the process
            // is out of mappings: the data is kept at `copy`, and said so.
            eprintln!("uhmm: could not move a detached block's data back to {start:p}: it is at {copy:p}");
            return;
        }
        for at in holes {
            real::munmap((b.range.start + at) as *mut c_void, PAGE_SIZE);
        }
        self.counters.detached.fetch_add(1, Ordering::Relaxed);
    }
}
