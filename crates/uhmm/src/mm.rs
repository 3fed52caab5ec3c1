//! The mm of uhmm, the hub every layer above reaches: [`AddressSpace`] (the
//! shared handle) and `Mm` (its state: one userfaultfd, the engine's
//! threads, the staging areas, the regions and the device pagemaps with
//! their drivers), with the calls that need nothing above it — pagemap
//! registration, notifiers, reads and writes by address, snapshots, unmap.
//! `space.rs` brings an address space to life; `region.rs` maps regions.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use uhmm_sys::PAGE_SIZE;
use uhmm_sys::mman::Mapping;
use uhmm_sys::pagemap::{PageRun, Pagemap, Query, category};
use uhmm_sys::uffd::{Origin, Uffd};

use crate::charge::ChargeOps;
use crate::config::Config;
use crate::copier::Copier;
use crate::driver::DevicePagemapOps;
use crate::fault::engine::Engine;
use crate::fault::serving::Serving;
use crate::foreign::{own::OwnChanges, reaper::Reaper};
use crate::holding::Holding;
use crate::notifier::{IntervalNotifierOps, InvalidateEvent, NotifierHandle, NotifierList};
use crate::page::{DevicePage, DevicePfn, Owner};
use crate::pagemap::DevicePagemap;
use crate::pte::{State, WaitTable};
use crate::staging::Arena;
use crate::stats::{Stats, StatsSnapshot};
use crate::vma::{Backing, Prot, RegionId, Vma};
use crate::{Error, ErrorKind, Result};

/// What one page looks like from outside, without faulting anything
/// (`hmm_range_fault` without `HMM_PFN_REQ_FAULT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// No region maps the address.
    Unmapped,
    /// A hole: never populated.
    None,
    /// The shared zero page.
    Zero,
    /// A RAM page.
    Ram,
    /// On a device (device-private: not mapped), whose pagemap has this owner.
    Device(DevicePage, Owner),
    /// On a device-coherent device (mapped, CPU-addressable), whose pagemap
    /// has this owner.
    Coherent(DevicePage, Owner),
    /// Lost; accesses get SIGBUS.
    Poisoned,
    /// In RAM but held for a device's exclusive access; a CPU access takes
    /// it back.
    Exclusive,
}

/// One page of a [`AddressSpace::snapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSnapshot {
    /// Where the page is.
    pub residency: Residency,
    /// The region's protection at the page (`NONE` when unmapped).
    pub prot: Prot,
    /// Mapped by a huge page (RAM pages only).
    pub huge: bool,
}

/// The managed part of a process's address space.
///
/// Cheap to clone (a shared handle). The fault-handling threads stop when
/// the last handle, region and device referring to it are gone.
///
/// A program makes one, maps [`Region`](crate::Region)s in it and uses their memory; device
/// drivers register their memory with it
/// ([`register_pagemap`](AddressSpace::register_pagemap)) and move pages
/// with a [`Migration`](crate::Migration).
///
/// ```
/// use uhmm::{AddressSpace, Config, PAGE_SIZE, Prot, Residency};
///
/// # fn main() -> uhmm::Result<()> {
/// let space = AddressSpace::new(Config::default())?; // fails without userfaultfd
/// let region = space.map(4 * PAGE_SIZE, Prot::READ_WRITE)?;
/// region.write(0, b"hello")?; // first touch: the page is zero-filled, then written
///
/// // Where each page is, without faulting anything in.
/// let pages = space.snapshot(region.range())?;
/// assert_eq!(pages[0].residency, Residency::Ram);
/// assert_eq!(pages.len(), 4);
///
/// // Devices reach RAM pages by address.
/// let mut buf = [0; 5];
/// space.read_at(region.addr(), &mut buf)?;
/// assert_eq!(&buf, b"hello");
/// assert!(space.stats().faults >= 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct AddressSpace {
    pub(crate) inner: Arc<Mm>,
    /// Set on the handle a fault hands its driver
    /// ([`CpuFault::space`](crate::CpuFault::space)): the fault that
    /// migrations made through it serve.
    pub(crate) serving: Option<Arc<Serving>>,
}

impl From<Arc<Mm>> for AddressSpace {
    fn from(inner: Arc<Mm>) -> AddressSpace {
        AddressSpace { inner, serving: None }
    }
}

impl AddressSpace {
    /// The handle given to the driver serving a fault (or a read-ahead)
    /// on a handler thread: `serving`, the handler's, was just
    /// [`begun`](Serving::begin) for the fault.
    pub(crate) fn serving(inner: &Arc<Mm>, serving: &Arc<Serving>) -> AddressSpace {
        AddressSpace { inner: inner.clone(), serving: Some(serving.clone()) }
    }
}

/// A pagemap of the address space and the driver behind it (held weakly:
/// the driver owns itself and its pagemap).
#[derive(Debug)]
struct Registered {
    pagemap: Arc<DevicePagemap>,
    ops: Weak<dyn DevicePagemapOps>,
}

/// The state of an address space (the kernel's `mm_struct`), shared by
/// its handles, regions, migrations and handler threads.
#[derive(Debug)]
pub(crate) struct Mm {
    pub(crate) uffd: Arc<Uffd>,
    /// A second CPU for big copies into regions (finalize).
    pub(crate) copier: Copier,
    pub(crate) pagemap_file: Arc<Pagemap>,
    pub(crate) config: Config,
    regions: RwLock<BTreeMap<usize, Arc<Vma>>>,
    next_region: AtomicU32,
    pagemaps: RwLock<Vec<Option<Registered>>>,
    pub(crate) stage: Arc<Arena>,
    pub(crate) pool: Arc<Arena>,
    /// Like the pool, but huge-page backed: RAM for whole 2 MiB blocks.
    pub(crate) huge_pool: Arc<Arena>,
    /// Pages held away for devices' exclusive access.
    pub(crate) holding: Holding,
    pub(crate) waits: WaitTable,
    pub(crate) notifiers: Arc<NotifierList>,
    pub(crate) stats: Stats,
    /// Pages fault handlers are bringing into RAM now (`charge::Arriving`).
    pub(crate) arriving: AtomicU64,
    /// Counts finalizes that put pages on a device. A fault read before the
    /// count moved past a region's [`Vma::to_device_at`] may predate
    /// the page's move to the device: see `fault::resolve`.
    pub(crate) to_device_epoch: AtomicU64,
    /// Inherited across `fork`: the threads and devices belong to the parent.
    orphaned: AtomicBool,
    /// `zero_fill_pages` pages of zeros, the source of first-touch writes:
    /// read-only anonymous memory populated for reading, so every page is
    /// the kernel's one zero page and a copy reads one cache-hot page.
    pub(crate) zeros: Mapping,
    engine: Mutex<Option<Engine>>,
    /// The RAM charge a fault asks before bringing pages in (a policy's).
    pub(crate) charge: RwLock<Option<Weak<dyn ChargeOps>>>,
    /// Unmaps and moves of region memory that are uhmm's own (`foreign`).
    pub(crate) own_changes: OwnChanges,
    /// The thread that frees what the program unmapped (`foreign`).
    pub(crate) reaper: std::sync::OnceLock<Reaper>,
}

impl AddressSpace {
    /// Whether this handle was inherited across `fork`: its threads,
    /// userfaultfd and devices belong to the parent, and it refuses new
    /// work. Drop it (or [`adopt`](AddressSpace::adopt) its regions).
    pub fn is_orphaned(&self) -> bool {
        self.inner.is_orphaned()
    }

    /// Registers device-private memory of `npages` pages owned by `owner`,
    /// served by `ops` (held weakly: the driver owns itself and its pagemap).
    pub fn register_pagemap(
        &self,
        ops: Weak<dyn DevicePagemapOps>,
        owner: Owner,
        npages: u64,
    ) -> Result<Arc<DevicePagemap>> {
        self.register(ops, owner, npages, false)
    }

    /// Registers device-coherent memory: CPU-addressable, so its pages stay
    /// mapped in regions (a migration to it installs the page the driver
    /// filled, from [`Migration::system_dst`](crate::Migration::system_dst));
    /// the CPU never faults on them, and only an explicit migration (or a
    /// long-term pin) brings them back to RAM.
    pub fn register_coherent_pagemap(
        &self,
        ops: Weak<dyn DevicePagemapOps>,
        owner: Owner,
        npages: u64,
    ) -> Result<Arc<DevicePagemap>> {
        self.register(ops, owner, npages, true)
    }

    fn register(
        &self,
        ops: Weak<dyn DevicePagemapOps>,
        owner: Owner,
        npages: u64,
        coherent: bool,
    ) -> Result<Arc<DevicePagemap>> {
        if npages == 0 || npages > crate::pte::MAX_DEVICE_PFN {
            return Err(Error::invalid("a pagemap needs 1 ..= 2^40 pages"));
        }
        let mut maps = self.inner.pagemaps.write().unwrap_or_else(|e| e.into_inner());
        // Ids are never reused: a stale entry can never reach another driver.
        let id16 = u16::try_from(maps.len()).map_err(|_| Error::new(ErrorKind::NoMemory, "too many pagemaps"))?;
        let pm = Arc::new(DevicePagemap::new(id16, owner, coherent, npages));
        maps.push(Some(Registered { pagemap: pm.clone(), ops }));
        Ok(pm)
    }

    /// Removes a pagemap. Its pages must have been evicted first
    /// ([`migrate_device_range`](crate::migrate_device_range)); pages still
    /// mapped make this fail with [`ErrorKind::Busy`].
    pub fn unregister_pagemap(&self, pagemap: &DevicePagemap) -> Result<()> {
        let mut maps = self.inner.pagemaps.write().unwrap_or_else(|e| e.into_inner());
        if pagemap.any_mapped() {
            return Err(Error::new(ErrorKind::Busy, "device pages are still mapped"));
        }
        if let Some(slot) = maps.get_mut(usize::from(pagemap.id())) {
            *slot = None;
        }
        Ok(())
    }

    /// Registers an interval notifier over `interval` (`mmu_interval_notifier_insert`):
    /// `ops` is told before pages of the interval move, go away or change
    /// protection. Held weakly; unregistered when the handle drops.
    pub fn insert_notifier(
        &self,
        interval: Range<usize>,
        ops: std::sync::Weak<dyn IntervalNotifierOps>,
    ) -> NotifierHandle {
        self.inner.notifiers.insert(interval, ops)
    }

    /// The counters of this address space.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// The configuration it was created with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// How the userfaultfd was obtained (full, or user-mode only).
    pub fn uffd_origin(&self) -> Origin {
        self.inner.uffd.origin()
    }

    /// Whether the userfaultfd catches only user-mode faults
    /// (`UFFD_USER_MODE_ONLY`: no access to `/dev/userfaultfd`, no
    /// `vm.unprivileged_userfaultfd`). Then loads and stores work as ever,
    /// but a system call that touches region memory not in RAM (on a
    /// device, in flight, never touched) fails with `EFAULT` instead of
    /// waiting for it. Do file I/O on region memory with
    /// [`Region::pread`](crate::Region::pread) and
    /// [`Region::pwrite`](crate::Region::pwrite), and hand a buffer to any
    /// other system call under a pin:
    ///
    /// ```no_run
    /// # fn main() -> uhmm::Result<()> {
    /// # let space = uhmm::AddressSpace::new(uhmm::Config::default())?;
    /// # let region = space.map(1 << 20, uhmm::Prot::READ_WRITE)?;
    /// let pin = space.pin(region.range(), uhmm::PinKind::ShortTerm)?; // every page in RAM, and kept there
    /// // ... recv(2), sendmsg(2), io_uring, … on region.as_ptr() ...
    /// drop(pin);
    /// # Ok(()) }
    /// ```
    pub fn user_mode_only(&self) -> bool {
        self.uffd_origin() == Origin::UserModeOnly
    }

    /// A watch on the fault-handling threads: how many are running. Stays
    /// valid after the address space is gone. The threads stop when the
    /// space's last handle is dropped; one busy with an event at that moment
    /// finishes it first, so the count reaches 0 shortly after the drop.
    pub fn handler_watch(&self) -> HandlerWatch {
        let engine = self.inner.engine.lock().unwrap_or_else(|e| e.into_inner());
        HandlerWatch(engine.as_ref().map(|e| e.alive.clone()).unwrap_or_default())
    }

    /// The protection runs of `range` (page-aligned, inside one region), as
    /// address ranges: what `/proc/self/maps` would say of it.
    pub fn protection(&self, range: Range<usize>) -> Result<Vec<(Range<usize>, Prot)>> {
        let (region, pages) = self.inner.region_pages(range)?;
        let runs = region.prot_runs(pages);
        Ok(runs.into_iter().map(|(r, p)| (region.addr_of(r.start)..region.addr_of(r.end), p)).collect())
    }

    /// The state of each page of `range` (page-aligned), without faulting.
    pub fn snapshot(&self, range: Range<usize>) -> Result<Vec<PageSnapshot>> {
        self.inner.snapshot(range)
    }
}

/// Counts running fault-handling threads; see [`AddressSpace::handler_watch`].
#[derive(Debug, Clone)]
pub struct HandlerWatch(Arc<std::sync::atomic::AtomicUsize>);

impl HandlerWatch {
    /// Threads still running.
    pub fn alive(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Mm {
    /// The mm of a new address space over `uffd`: its staging areas, copy
    /// helper and tables, with no engine yet (`AddressSpace::new` starts
    /// it). `allowed`: the CPUs the copy helper may use.
    pub(crate) fn new(config: Config, uffd: Uffd, allowed: Vec<usize>) -> Result<Arc<Mm>> {
        let stage = Arena::new(config.staging_bytes, Some(&uffd), config.keep_staging_bytes)?;
        let stage = Arc::new(stage.keeping_for(config.keep_staging_for));
        let pool = Arc::new(Arena::new(config.staging_bytes, None, 0)?);
        let huge_pool = Arc::new(Arena::new(config.staging_bytes, None, 0)?);
        if let Err(err) = huge_pool.map.advise_huge(0, huge_pool.map.len()) {
            tracing::warn!(%err, "no transparent huge pages: huge regions use small pages");
        }
        let holding = Holding::new(Arc::new(Arena::new(config.staging_bytes, Some(&uffd), 0)?));
        let uffd = Arc::new(uffd);
        Ok(Arc::new(Mm {
            pagemap_file: Arc::new(Pagemap::open().map_err(|e| Error::sys("open /proc/self/pagemap", e))?),
            copier: Copier::new(uffd.clone(), stage.clone(), allowed),
            uffd,
            regions: RwLock::new(BTreeMap::new()),
            next_region: AtomicU32::new(1),
            pagemaps: RwLock::new(Vec::new()),
            stage,
            pool,
            huge_pool,
            holding,
            waits: WaitTable::new(),
            notifiers: Arc::new(NotifierList::default()),
            stats: Stats::default(),
            arriving: AtomicU64::new(0),
            to_device_epoch: AtomicU64::new(0),
            orphaned: AtomicBool::new(false),
            zeros: zero_pages(config.zero_fill_pages)?,
            engine: Mutex::new(None),
            charge: RwLock::new(None),
            own_changes: OwnChanges::default(),
            reaper: std::sync::OnceLock::new(),
            config,
        }))
    }

    /// Registers a private anonymous mapping with the userfaultfd: MISSING
    /// faults, and write protection when writes are tracked.
    pub(crate) fn register_anonymous(&self, map: &Mapping) -> Result<()> {
        self.uffd
            .register(map, 0, map.len(), self.config.track_writes)
            .map_err(|e| Error::sys("UFFDIO_REGISTER", e))?;
        Ok(())
    }

    /// Hands the address space its started engine (stopped on drop).
    pub(crate) fn set_engine(&self, engine: Engine) {
        *self.engine.lock().unwrap_or_else(|e| e.into_inner()) = Some(engine);
    }

    pub(crate) fn is_orphaned(&self) -> bool {
        self.orphaned.load(Ordering::SeqCst)
    }

    pub(crate) fn orphan(&self) {
        self.orphaned.store(true, Ordering::SeqCst);
    }

    /// Fails in a forked child, on a space inherited from the parent.
    pub(crate) fn check_usable(&self) -> Result<()> {
        if self.is_orphaned() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "this address space was inherited across fork; make a new one and adopt its regions",
            ));
        }
        Ok(())
    }

    /// Runs `mv`, which moves `region` to a new address, with the region
    /// out of the table, and files it under its new start.
    pub(crate) fn rekey_region(&self, region: &Arc<Vma>, mv: impl FnOnce() -> Result<usize>) -> Result<usize> {
        // Not held across `mv`: a handler looking at the move's event may
        // need the table (faults on the region meanwhile find none, retry).
        self.remove_region(region);
        let r = mv();
        self.regions.write().unwrap_or_else(|e| e.into_inner()).insert(region.start(), region.clone());
        r
    }

    /// Whether a new region can be filed (ids are never reused).
    pub(crate) fn has_region_ids(&self) -> bool {
        self.next_region.load(Ordering::Relaxed) < 1 << 24
    }

    /// Files `map` (registered with the userfaultfd where it must be) as a
    /// new region of the address space.
    pub(crate) fn insert_vma(&self, map: Mapping, prot: Prot, backing: Backing, huge: bool) -> Result<Arc<Vma>> {
        let id = self.next_region.fetch_add(1, Ordering::Relaxed);
        if id >= 1 << 24 {
            return Err(Error::new(ErrorKind::NoMemory, "too many regions"));
        }
        let vma = Arc::new(Vma::new(RegionId(id), map, prot, backing, huge));
        if self.config.non_cooperative {
            vma.unregister_on_drop(&self.uffd);
        }
        self.regions.write().unwrap_or_else(|e| e.into_inner()).insert(vma.start(), vma.clone());
        Ok(vma)
    }

    /// The regions overlapping `range`, at this moment.
    pub(crate) fn regions_overlapping(&self, range: &Range<usize>) -> Vec<Arc<Vma>> {
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        let before = regions.range(..range.start).next_back().map(|(_, r)| r);
        before
            .into_iter()
            .chain(regions.range(range.start..range.end).map(|(_, r)| r))
            .filter(|r| r.start() < range.end && range.start < r.start() + r.map.len())
            .cloned()
            .collect()
    }

    /// The start of the first region above `addr`.
    pub(crate) fn next_region_start(&self, addr: usize) -> Option<usize> {
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        regions.range(addr + 1..).next().map(|(k, _)| *k)
    }

    /// Takes `region` out of the table (not another region filed at the
    /// same address since).
    pub(crate) fn remove_region(&self, region: &Arc<Vma>) {
        let mut regions = self.regions.write().unwrap_or_else(|e| e.into_inner());
        if regions.get(&region.start()).is_some_and(|r| Arc::ptr_eq(r, region)) {
            regions.remove(&region.start());
        }
    }

    /// Every region, at this moment.
    pub(crate) fn regions(&self) -> Vec<Arc<Vma>> {
        self.regions.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// Whether a system call's access to region memory not in RAM waits
    /// for a handler to bring the page (else it fails with `EFAULT`: a
    /// user-mode-only userfaultfd, or faults delivered as SIGBUS).
    pub(crate) fn kernel_faults_wait(&self) -> bool {
        self.uffd.origin() != uhmm_sys::uffd::Origin::UserModeOnly && !self.uffd.has(uhmm_sys::uffd::feature::SIGBUS)
    }

    /// The region containing `addr`.
    pub(crate) fn region_at(&self, addr: usize) -> Option<Arc<Vma>> {
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        let (_, r) = regions.range(..=addr).next_back()?;
        r.contains(addr).then(|| r.clone())
    }

    /// The region holding all of `range` (page-aligned, non-empty) and the
    /// page indices `range` covers in it.
    pub(crate) fn region_pages(&self, range: Range<usize>) -> Result<(Arc<Vma>, Range<usize>)> {
        if !range.start.is_multiple_of(PAGE_SIZE) || !range.end.is_multiple_of(PAGE_SIZE) {
            return Err(Error::invalid("range is not page-aligned"));
        }
        if range.is_empty() {
            return Err(Error::invalid("empty range"));
        }
        let region = self.region_at(range.start).ok_or_else(|| Error::invalid("address not managed by uhmm"))?;
        if range.end - region.start() > region.map.len() {
            return Err(Error::invalid("range crosses the end of its region"));
        }
        let first = (range.start - region.start()) / PAGE_SIZE;
        let pages = first..first + range.len() / PAGE_SIZE;
        if region.has_unmapped(&pages) {
            return Err(Error::invalid("the range includes unmapped pages"));
        }
        Ok((region, pages))
    }

    /// The region with id `id`.
    pub(crate) fn region_by_id(&self, id: RegionId) -> Option<Arc<Vma>> {
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        regions.values().find(|r| r.id == id).cloned()
    }

    /// Whether `page` is device-coherent memory (mapped, CPU-addressable).
    pub(crate) fn is_coherent(&self, page: &DevicePage) -> bool {
        let maps = self.pagemaps.read().unwrap_or_else(|e| e.into_inner());
        maps.get(usize::from(page.pagemap)).and_then(Option::as_ref).is_some_and(|r| r.pagemap.is_coherent())
    }

    /// The pagemap with id `id`.
    pub(crate) fn pagemap(&self, id: u16) -> Option<Arc<DevicePagemap>> {
        let maps = self.pagemaps.read().unwrap_or_else(|e| e.into_inner());
        maps.get(usize::from(id)).and_then(Option::as_ref).map(|r| r.pagemap.clone())
    }

    /// The driver of the pagemap with id `id`, unless it is gone.
    pub(crate) fn driver(&self, id: u16) -> Option<Arc<dyn DevicePagemapOps>> {
        let maps = self.pagemaps.read().unwrap_or_else(|e| e.into_inner());
        maps.get(usize::from(id)).and_then(Option::as_ref).and_then(|r| r.ops.upgrade())
    }

    /// Unmaps device pages `pfns` of pagemap `id` and hands them back to
    /// its driver (`pages_free`).
    pub(crate) fn free_device_pages(&self, id: u16, pfns: &[DevicePfn]) {
        let registered = {
            let maps = self.pagemaps.read().unwrap_or_else(|e| e.into_inner());
            maps.get(usize::from(id)).and_then(Option::as_ref).map(|r| (r.pagemap.clone(), r.ops.upgrade()))
        };
        if let Some((pagemap, ops)) = registered {
            pagemap.unmap(pfns);
            if let Some(ops) = ops {
                ops.pages_free(pfns);
            }
        }
    }

    /// [`free_device_pages`](Mm::free_device_pages) of one page (`page_free`).
    pub(crate) fn free_device_page(&self, page: DevicePage) {
        self.free_device_pages(page.pagemap, &[page.pfn]);
    }

    /// `PAGEMAP_SCAN` of `start..end`: the runs matching `q`.
    pub(crate) fn scan(&self, start: usize, end: usize, q: Query) -> Result<Vec<PageRun>> {
        let mut runs = Vec::new();
        self.pagemap_file.scan(start, end, q, &mut runs).map_err(|e| Error::sys("PAGEMAP_SCAN", e))?;
        Ok(runs)
    }

    /// Whether the page at `addr` holds data in the kernel's page table
    /// (present or swapped out).
    pub(crate) fn is_present(&self, addr: usize) -> Result<bool> {
        Ok(!self.scan(addr, addr + PAGE_SIZE, Query::any_of(category::PRESENT | category::SWAPPED))?.is_empty())
    }

    /// Unlocks page `idx` of `region` into `state`, waking any thread that
    /// faulted on it meanwhile.
    pub(crate) fn unlock_wake(&self, region: &Vma, idx: usize, state: State) {
        if region.pt.unlock(idx, state, &self.waits) {
            self.wake(region, idx..idx + 1);
        }
    }

    /// Wakes program threads blocked on a userfault at pages `pages` of `region`.
    pub(crate) fn wake(&self, region: &Vma, pages: Range<usize>) {
        if pages.is_empty() {
            return;
        }
        let (addr, len) = (region.addr_of(pages.start), pages.len() * PAGE_SIZE);
        if let Err(err) = self.uffd.wake(addr, len) {
            tracing::error!(%err, "UFFDIO_WAKE failed");
        }
    }

    /// Unmaps a region: no new migration finds it; in-flight ones finish;
    /// its device pages are freed.
    pub(crate) fn unmap_region(&self, region: &Arc<Vma>) {
        if self.is_orphaned() {
            // In a forked child: page locks may be held by parent threads
            // that do not exist here; the mapping goes with the last handle.
            return;
        }
        self.own_changes.settle();
        region.dead.store(true, Ordering::SeqCst);
        self.remove_region(region);
        let _inv = self.notifiers.invalidate(region.start()..region.start() + region.map.len(), InvalidateEvent::Unmap);
        // Lock every page that was ever touched, for good: this waits for
        // in-flight migrations, and nothing can lock them after.
        let mut freed = Vec::new();
        region.pt.for_each_allocated(|idx, _| match region.pt.lock(idx, &self.waits) {
            State::Device(page) => freed.push(page),
            State::Exclusive(slot) => self.holding.give_back(slot as usize * PAGE_SIZE),
            _ => {}
        });
        // Freed after the walk. The dead region's pages stay locked for good,
        // but nothing waits on them any more.
        for page in freed {
            self.free_device_page(page);
        }
        // Unmapped now, not when the last migration lets go of the region:
        // once the handle's drop returns, the addresses may be reused.
        region.unmap();
        // Threads still faulting on the dying region retry and find it gone.
        self.wake(region, 0..region.npages());
    }

    fn snapshot(&self, range: Range<usize>) -> Result<Vec<PageSnapshot>> {
        if !range.start.is_multiple_of(PAGE_SIZE) || !range.end.is_multiple_of(PAGE_SIZE) || range.is_empty() {
            return Err(Error::invalid("snapshot needs a non-empty, page-aligned range"));
        }
        // The range may cover any addresses (those of no region read as
        // unmapped): one that cannot be reported is refused, not an abort.
        let mut out = Vec::new();
        out.try_reserve_exact(range.len() / PAGE_SIZE)
            .map_err(|_| Error::new(ErrorKind::NoMemory, "snapshot: the range is too large to report"))?;
        let mut addr = range.start;
        while addr < range.end {
            let Some(region) = self.region_at(addr) else {
                out.push(PageSnapshot { residency: Residency::Unmapped, prot: Prot::NONE, huge: false });
                addr += PAGE_SIZE;
                continue;
            };
            let end = range.end.min(region.start() + region.map.len());
            let runs = self.scan(
                addr,
                end,
                Query::all(category::PRESENT | category::SWAPPED | category::PFNZERO | category::HUGE),
            )?;
            let first = (addr - region.start()) / PAGE_SIZE;
            let mut cursor = 0;
            for (prange, prot) in region.prot_runs(first..first + (end - addr) / PAGE_SIZE) {
                for idx in prange {
                    if region.has_unmapped(&(idx..idx + 1)) {
                        out.push(PageSnapshot { residency: Residency::Unmapped, prot: Prot::NONE, huge: false });
                        continue;
                    }
                    let a = region.addr_of(idx);
                    let mut huge = false;
                    let residency = match region.pt.load(idx).state() {
                        State::Device(page) => match self.pagemap(page.pagemap) {
                            Some(pm) if pm.is_coherent() => Residency::Coherent(page, pm.owner()),
                            pm => Residency::Device(page, pm.map_or(Owner::new(), |p| p.owner())),
                        },
                        State::Poisoned => Residency::Poisoned,
                        State::Exclusive(_) => Residency::Exclusive,
                        State::Cpu => match next_run(&runs, &mut cursor, a) {
                            Some(r) if r.categories & category::PFNZERO != 0 => Residency::Zero,
                            Some(r) if r.categories & (category::PRESENT | category::SWAPPED) != 0 => {
                                huge = r.categories & category::HUGE != 0;
                                Residency::Ram
                            }
                            _ => Residency::None,
                        },
                    };
                    out.push(PageSnapshot { residency, prot, huge });
                }
            }
            addr = end;
        }
        Ok(out)
    }
}

/// The run of `runs` (sorted, disjoint) containing `addr`, walking forward
/// from `*cursor` (addresses are asked in increasing order).
fn next_run<'a>(runs: &'a [PageRun], cursor: &mut usize, addr: usize) -> Option<&'a PageRun> {
    while *cursor < runs.len() && runs[*cursor].end <= addr {
        *cursor += 1;
    }
    runs.get(*cursor).filter(|r| r.start <= addr)
}

/// `n` pages that read as zeros, each mapped to the shared zero page.
fn zero_pages(n: usize) -> Result<Mapping> {
    let map = Mapping::anonymous(n * PAGE_SIZE, uhmm_sys::mman::Protection::Read, PAGE_SIZE)
        .map_err(|e| Error::sys("mmap", e))?;
    map.populate_read(0, map.len()).map_err(|e| Error::sys("MADV_POPULATE_READ", e))?;
    Ok(map)
}

impl Drop for Mm {
    fn drop(&mut self) {
        if self.is_orphaned() {
            // The threads live in the parent: neither signal nor join them.
            self.copier.abandon();
        }
        if let Some(engine) = self.engine.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            if self.is_orphaned() {
                std::mem::forget(engine);
            } else {
                engine.stop();
            }
        }
        if self.config.non_cooperative && !self.is_orphaned() {
            // No handler reads events any more: the arenas' munmap must send none.
            for map in [&self.stage.map, self.holding.map()] {
                let _ = self.uffd.unregister(map, 0, map.len());
            }
        }
    }
}
