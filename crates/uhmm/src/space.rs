//! `AddressSpace`: the mm of uhmm. One userfaultfd, its fault-handling
//! threads, the staging areas, the regions and the device pagemaps.

use std::collections::BTreeMap;
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::copier::Copier;
use crate::exclusive::Holding;
use crate::fault::Engine;
use crate::notifier::{IntervalNotifierOps, InvalidateEvent, NotifierHandle, NotifierList};
use crate::pagemap::{DevicePage, DevicePagemap, DevicePagemapOps, Owner};
use crate::pte::{State, WaitTable};
use crate::region::{Backing, Prot, Region, RegionInner};
use crate::staging::Arena;
use crate::stats::{Stats, StatsSnapshot};
use uhmm_sys::mman::Mapping;
use uhmm_sys::pagemap::{PageRun, Pagemap, Query, category};
use uhmm_sys::uffd::{self, Origin, Uffd};
use uhmm_sys::{self as sys, PAGE_SIZE};
use crate::{Error, ErrorKind, HUGE_SIZE, Result};

/// Tunables of an address space.
///
/// Start from [`Config::default`] and change the fields that matter; each
/// field's doc gives its default.
///
/// ```
/// # fn main() -> uhmm::Result<()> {
/// let config = uhmm::Config {
///     handler_threads: 2,                    // two threads poll the userfaultfd
///     staging_bytes: 256 << 20,              // at most 256 MiB in flight at once
///     ..uhmm::Config::default()
/// };
/// let space = uhmm::AddressSpace::new(config)?;
/// assert_eq!(space.config().handler_threads, 2);
/// assert_eq!(space.config().fault_around_pages, 16);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    /// Fault-handling threads (each polls the one userfaultfd); at least 1.
    /// Default: 1.
    pub handler_threads: usize,
    /// CPUs the fault-handling threads run on: thread `i` on
    /// `handler_cpus[i % len]` alone. Empty: wherever the scheduler puts
    /// them. A runtime may keep them beside, or away from, the threads that
    /// fault; each CPU must be one this process may use. Default: empty.
    pub handler_cpus: Vec<usize>,
    /// Pages a CPU fault on device memory may bring back at once (the
    /// fault-around window offered to `migrate_to_ram`); at least 1. 1 is
    /// the kernel's behaviour, and turns the adaptive growth
    /// ([`fault_around_max_pages`](Config::fault_around_max_pages)) and
    /// read-ahead off. Default: 16.
    pub fault_around_pages: usize,
    /// The largest fault-around window: while faults run sequentially
    /// through a region, up or down (glibc's memcpy copies large buffers
    /// backwards), each window doubles up to this, reaching on in the
    /// scan's direction; a fault elsewhere starts again from
    /// `fault_around_pages`. Default: 512 (2 MiB).
    pub fault_around_max_pages: usize,
    /// Windows an idle fault handler brings back ahead of a sequential scan
    /// of device pages, in the scan's direction, before the scan faults on
    /// them (the scan then reads one window while the next comes back; 2
    /// made 1 GiB scans 1.6-2.3x faster here). The last leaves its first
    /// page on the device, a marker: the scan's fault there brings back
    /// that page alone, and as many windows again, while the scan reads
    /// on (a further 1.4-1.6x here). Off by default because pages the
    /// program never touches come back, and a read-ahead's pages can be
    /// read before its device pages are freed, as with a migration run by
    /// another thread. `fault_around_pages: 1` turns it off too.
    /// Default: 0 (off).
    pub read_ahead_windows: usize,
    /// Pages a first-touch fault zero-fills at once (an aligned window);
    /// while first touches run sequentially the window doubles up to
    /// `fault_around_max_pages`. At least 1; 1 turns both off. Default: 16.
    pub zero_fill_pages: usize,
    /// Bytes of address space for each staging arena; bounds the pages that
    /// can be in flight at once. Reserved address space: RAM is used only by
    /// the pages in it (in flight, or kept: `keep_staging_bytes`).
    /// Default: 1 GiB (`1 << 30`).
    pub staging_bytes: usize,
    /// Fall back to `UFFD_USER_MODE_ONLY` when full userfaultfd is refused
    /// (then a system call that touches a page not in RAM — on a device,
    /// in flight, or never touched — fails with `EFAULT` instead of waiting
    /// for it; see [`AddressSpace::user_mode_only`]). Default: true.
    pub allow_user_mode_only: bool,
    /// Use a user-mode-only userfaultfd even where a full one could be had:
    /// what a process without the privileges gets, for testing a program
    /// (or uhmm) in that mode. Default: false.
    pub force_user_mode_only: bool,
    /// Bytes of RAM pages that migrations to devices leave in staging that
    /// may be kept, up to `staging_bytes`, for `keep_staging_for`: a
    /// migration back to RAM from driver memory copies into them and moves
    /// them in, rather than having the kernel allocate new pages. 0 frees
    /// them at once. Default: 1 GiB (`1 << 30`).
    pub keep_staging_bytes: usize,
    /// How long kept staging pages wait for a copy back to RAM before their
    /// memory returns to the system (counted from the last time one was
    /// kept or used). Default: 1 s.
    pub keep_staging_for: std::time::Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            handler_threads: 1,
            handler_cpus: Vec::new(),
            fault_around_pages: 16,
            fault_around_max_pages: 512,
            read_ahead_windows: 0,
            zero_fill_pages: 16,
            staging_bytes: 1 << 30,
            allow_user_mode_only: true,
            force_user_mode_only: false,
            keep_staging_bytes: 1 << 30,
            keep_staging_for: std::time::Duration::from_secs(1),
        }
    }
}

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
/// A program makes one, maps [`Region`]s in it and uses their memory; device
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
    pub(crate) inner: Arc<SpaceInner>,
}

#[derive(Debug)]
pub(crate) struct SpaceInner {
    pub(crate) uffd: Arc<Uffd>,
    /// A second CPU for big copies into regions (finalize).
    pub(crate) copier: Copier,
    pub(crate) pagemap_file: Arc<Pagemap>,
    pub(crate) config: Config,
    regions: RwLock<BTreeMap<usize, Arc<RegionInner>>>,
    next_region: AtomicU32,
    pagemaps: RwLock<Vec<Option<Arc<DevicePagemap>>>>,
    pub(crate) stage: Arc<Arena>,
    pub(crate) pool: Arc<Arena>,
    /// Like the pool, but huge-page backed: RAM for whole 2 MiB blocks.
    pub(crate) huge_pool: Arc<Arena>,
    /// Pages held away for devices' exclusive access.
    pub(crate) holding: Holding,
    pub(crate) waits: WaitTable,
    pub(crate) notifiers: Arc<NotifierList>,
    pub(crate) stats: Stats,
    /// Counts finalizes that put pages on a device. A fault read before the
    /// count moved past a region's [`RegionInner::to_device_at`] may predate
    /// the page's move to the device: see `fault::resolve`.
    pub(crate) to_device_epoch: AtomicU64,
    /// Inherited across `fork`: the threads and devices belong to the parent.
    orphaned: AtomicBool,
    /// `zero_fill_pages` pages of zeros: the source of first-touch writes.
    pub(crate) zeros: Box<[u8]>,
    engine: Mutex<Option<Engine>>,
}

impl AddressSpace {
    /// Opens a userfaultfd, sets up the staging areas and starts the
    /// fault-handling threads.
    ///
    /// Fails with [`ErrorKind::Unsupported`] naming the permission or sysctl
    /// to change when no userfaultfd can be had, or when the kernel lacks
    /// `UFFDIO_MOVE` (Linux 6.8) or `UFFDIO_POISON` (6.6).
    pub fn new(config: Config) -> Result<AddressSpace> {
        sys::check_page_size().map_err(|e| Error::new(ErrorKind::Unsupported, e.to_string()))?;
        if config.handler_threads == 0 || config.fault_around_pages == 0 || config.zero_fill_pages == 0 {
            return Err(Error::invalid("handler_threads, fault_around_pages and zero_fill_pages must be > 0"));
        }
        // Where this thread may run: the handlers' CPUs must be among
        // them, and the copy helper runs on all of them.
        let allowed = sys::process::allowed_cpus().map_err(|e| Error::sys("sched_getaffinity", e))?;
        if let Some(cpu) = config.handler_cpus.iter().find(|c| !allowed.contains(c)) {
            return Err(Error::invalid(format!("handler_cpus: this process may not run on CPU {cpu}")));
        }
        let wanted = uffd::feature::MOVE | uffd::feature::POISON | uffd::feature::THREAD_ID;
        let accept = match (config.force_user_mode_only, config.allow_user_mode_only) {
            (true, _) => uffd::Accept::UserModeOnly,
            (false, true) => uffd::Accept::FullOrUserModeOnly,
            (false, false) => uffd::Accept::Full,
        };
        let uffd = Uffd::open(wanted, accept).map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => Error::new(ErrorKind::Unsupported, e.to_string()),
            _ => Error::sys("userfaultfd", e),
        })?;
        for (f, name) in
            [(uffd::feature::MOVE, "UFFDIO_MOVE (Linux 6.8)"), (uffd::feature::POISON, "UFFDIO_POISON (Linux 6.6)")]
        {
            if !uffd.has(f) {
                return Err(Error::new(ErrorKind::Unsupported, format!("the kernel lacks {name}")));
            }
        }
        if uffd.origin() == Origin::UserModeOnly {
            tracing::warn!(
                "userfaultfd is user-mode only: a system call on region memory not in RAM fails with EFAULT; \
                 use Region::pread/pwrite, or AddressSpace::pin(range, PinKind::ShortTerm) around the call ({})",
                uffd::PERMISSION_HINT
            );
        }
        let stage = Arena::new(config.staging_bytes, Some(&uffd), config.keep_staging_bytes)?;
        let stage = Arc::new(stage.keeping_for(config.keep_staging_for));
        let pool = Arc::new(Arena::new(config.staging_bytes, None, 0)?);
        let huge_pool = Arc::new(Arena::new(config.staging_bytes, None, 0)?);
        if let Err(err) = huge_pool.map.advise_huge(0, huge_pool.map.len()) {
            tracing::warn!(%err, "no transparent huge pages: huge regions use small pages");
        }
        let holding = Holding::new(Arc::new(Arena::new(config.staging_bytes, Some(&uffd), 0)?));
        let uffd = Arc::new(uffd);
        let inner = Arc::new(SpaceInner {
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
            to_device_epoch: AtomicU64::new(0),
            orphaned: AtomicBool::new(false),
            zeros: vec![0; config.zero_fill_pages * PAGE_SIZE].into_boxed_slice(),
            engine: Mutex::new(None),
            config,
        });
        let engine = Engine::start(&inner)?;
        *inner.engine.lock().unwrap_or_else(|e| e.into_inner()) = Some(engine);
        crate::fork::register(&inner);
        Ok(AddressSpace { inner })
    }

    /// Maps a new region of `len` bytes (rounded up to pages), lazily backed:
    /// nothing is allocated until it is touched. Regions of 2 MiB or more are
    /// 2 MiB-aligned.
    pub fn map(&self, len: usize, prot: Prot) -> Result<Region> {
        self.map_anonymous(len, prot, false)
    }

    /// Maps a region backed by transparent huge pages where uhmm can: its
    /// length is rounded up to 2 MiB and it is 2 MiB-aligned; first touch
    /// fills whole 2 MiB blocks with one huge page, and a block that moves
    /// whole (to a device and back) moves as one compound unit. Where a huge
    /// page cannot be had, small pages are used.
    pub fn map_huge(&self, len: usize, prot: Prot) -> Result<Region> {
        self.map_anonymous(
            len.checked_next_multiple_of(HUGE_SIZE).ok_or_else(|| Error::invalid("length overflows"))?,
            prot,
            true,
        )
    }

    fn map_anonymous(&self, len: usize, prot: Prot, huge: bool) -> Result<Region> {
        self.inner.check_usable()?;
        let len = region_len(len)?;
        let align = if len >= HUGE_SIZE { HUGE_SIZE } else { PAGE_SIZE };
        let map = Mapping::anonymous(len, prot.protection()?, align).map_err(|e| Error::sys("mmap", e))?;
        if huge {
            map.advise_huge(0, len).map_err(|e| Error::sys("MADV_HUGEPAGE", e))?;
        }
        self.inner.uffd.register(&map, 0, len, false).map_err(|e| Error::sys("UFFDIO_REGISTER", e))?;
        self.insert_region(map, prot, Backing::Anonymous, huge)
    }

    /// Maps a region of shared anonymous memory (`MAP_SHARED | MAP_ANONYMOUS`):
    /// shared with children across `fork`; devices can read and write it,
    /// migrations skip it.
    pub fn map_shared(&self, len: usize, prot: Prot) -> Result<Region> {
        self.inner.check_usable()?;
        let len = region_len(len)?;
        let map = Mapping::shared_anonymous(len, prot.protection()?).map_err(|e| Error::sys("mmap", e))?;
        self.insert_region(map, prot, Backing::SharedAnonymous, false)
    }

    /// Maps `len` bytes of `file` from `offset` (page-aligned), shared or
    /// private: devices can read and write it, migrations skip it.
    pub fn map_file(&self, file: &impl AsFd, offset: u64, len: usize, prot: Prot, shared: bool) -> Result<Region> {
        self.inner.check_usable()?;
        let len = region_len(len)?;
        let map = Mapping::file(file.as_fd(), offset, len, prot.protection()?, shared).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidInput => Error::invalid("offset must be page-aligned"),
            _ => Error::sys("mmap", e),
        })?;
        self.insert_region(map, prot, Backing::File { shared }, false)
    }

    /// In a forked child: takes over `inherited`, a region of an address
    /// space the child inherited (orphaned), as a region of this one. The
    /// data is the child's copy of the parent's; `inherited` no longer owns
    /// the mapping (dropping it unmaps nothing).
    pub fn adopt(&self, inherited: &Region) -> Result<Region> {
        self.inner.check_usable()?;
        if !inherited.space.is_orphaned() {
            return Err(Error::invalid("only regions inherited across fork can be adopted"));
        }
        let old = &inherited.inner;
        let map = old.map.disown().ok_or_else(|| Error::invalid("the region was adopted already"))?;
        if old.backing == Backing::Anonymous {
            self.inner.uffd.register(&map, 0, map.len(), false).map_err(|e| Error::sys("UFFDIO_REGISTER", e))?;
        }
        let region = self.insert_region(map, old.prot_at(0), old.backing, old.huge)?;
        for (pages, prot) in old.prot_runs(0..old.npages()) {
            region.inner.set_prot(pages, prot)?;
        }
        Ok(region)
    }

    /// Whether this handle was inherited across `fork`: its threads,
    /// userfaultfd and devices belong to the parent, and it refuses new
    /// work. Drop it (or [`adopt`](AddressSpace::adopt) its regions).
    pub fn is_orphaned(&self) -> bool {
        self.inner.is_orphaned()
    }

    fn insert_region(&self, map: Mapping, prot: Prot, backing: Backing, huge: bool) -> Result<Region> {
        let id = self.inner.next_region.fetch_add(1, Ordering::Relaxed);
        if id >= 1 << 24 {
            return Err(Error::new(ErrorKind::NoMemory, "too many regions"));
        }
        let inner = Arc::new(RegionInner::new(id, map, prot, backing, huge));
        self.inner.regions.write().unwrap_or_else(|e| e.into_inner()).insert(inner.start(), inner.clone());
        Ok(Region { inner, space: self.inner.clone() })
    }

    /// Registers device-private memory of `npages` pages owned by `owner`,
    /// served by `ops` (held weakly: the driver owns itself and its pagemap).
    pub fn register_pagemap(
        &self,
        ops: std::sync::Weak<dyn DevicePagemapOps>,
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
        ops: std::sync::Weak<dyn DevicePagemapOps>,
        owner: Owner,
        npages: u64,
    ) -> Result<Arc<DevicePagemap>> {
        self.register(ops, owner, npages, true)
    }

    fn register(
        &self,
        ops: std::sync::Weak<dyn DevicePagemapOps>,
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
        let pm = Arc::new(DevicePagemap::new(id16, owner, coherent, npages, ops));
        maps.push(Some(pm.clone()));
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

    /// Copies the bytes at `addr` (inside one region) into `buf`, as
    /// [`Region::read`] does; for devices that reach RAM pages by address.
    pub fn read_at(&self, addr: usize, buf: &mut [u8]) -> Result<()> {
        let region =
            self.inner.region_at(addr).ok_or_else(|| Error::new(ErrorKind::Fault, "address not managed by uhmm"))?;
        let off = addr - region.start();
        region.check_access(off, buf.len(), Prot::READ)?;
        region.map.read(off, buf).map_err(|e| Error::sys("read", e))
    }

    /// Copies `buf` to `addr` (inside one region), as [`Region::write`] does.
    pub fn write_at(&self, addr: usize, buf: &[u8]) -> Result<()> {
        let region =
            self.inner.region_at(addr).ok_or_else(|| Error::new(ErrorKind::Fault, "address not managed by uhmm"))?;
        let off = addr - region.start();
        region.check_access(off, buf.len(), Prot::READ_WRITE)?;
        region.map.write(off, buf).map_err(|e| Error::sys("write", e))
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

/// A region length rounded up to pages; empty is an error.
fn region_len(len: usize) -> Result<usize> {
    if len == 0 {
        return Err(Error::invalid("cannot map an empty region"));
    }
    len.checked_next_multiple_of(PAGE_SIZE).ok_or_else(|| Error::invalid("length overflows"))
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

impl SpaceInner {
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
    /// index locked, and files the region under its new start.
    pub(crate) fn rekey_region(&self, region: &Arc<RegionInner>, mv: impl FnOnce() -> Result<usize>) -> Result<usize> {
        let mut regions = self.regions.write().unwrap_or_else(|e| e.into_inner());
        regions.remove(&region.start());
        let r = mv();
        regions.insert(region.start(), region.clone());
        r
    }

    /// Every region, at this moment.
    pub(crate) fn regions(&self) -> Vec<Arc<RegionInner>> {
        self.regions.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// The region containing `addr`.
    pub(crate) fn region_at(&self, addr: usize) -> Option<Arc<RegionInner>> {
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        let (_, r) = regions.range(..=addr).next_back()?;
        r.contains(addr).then(|| r.clone())
    }

    /// The region holding all of `range` (page-aligned, non-empty) and the
    /// page indices `range` covers in it.
    pub(crate) fn region_pages(&self, range: Range<usize>) -> Result<(Arc<RegionInner>, Range<usize>)> {
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
    pub(crate) fn region_by_id(&self, id: u32) -> Option<Arc<RegionInner>> {
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        regions.values().find(|r| r.id == id).cloned()
    }

    /// Whether `page` is device-coherent memory (mapped, CPU-addressable).
    pub(crate) fn is_coherent(&self, page: &DevicePage) -> bool {
        let maps = self.pagemaps.read().unwrap_or_else(|e| e.into_inner());
        maps.get(usize::from(page.pagemap)).and_then(Option::as_ref).is_some_and(|pm| pm.is_coherent())
    }

    /// The pagemap with id `id`.
    pub(crate) fn pagemap(&self, id: u16) -> Option<Arc<DevicePagemap>> {
        let maps = self.pagemaps.read().unwrap_or_else(|e| e.into_inner());
        maps.get(usize::from(id)).and_then(Clone::clone)
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
    pub(crate) fn unlock_wake(&self, region: &RegionInner, idx: usize, state: State) {
        if region.pt.unlock(idx, state, &self.waits) {
            self.wake(region, idx..idx + 1);
        }
    }

    /// Wakes program threads blocked on a userfault at pages `pages` of `region`.
    pub(crate) fn wake(&self, region: &RegionInner, pages: Range<usize>) {
        if pages.is_empty() {
            return;
        }
        let (addr, len) = (region.addr_of(pages.start), pages.len() * PAGE_SIZE);
        match self.uffd.wake(addr, len) {
            Ok(()) => crate::fault::noted_wake(addr..addr + len),
            Err(err) => tracing::error!(%err, "UFFDIO_WAKE failed"),
        }
    }

    /// Unmaps a region: no new migration finds it; in-flight ones finish;
    /// its device pages are freed.
    pub(crate) fn unmap_region(&self, region: &Arc<RegionInner>) {
        if self.is_orphaned() {
            // In a forked child: page locks may be held by parent threads
            // that do not exist here; the mapping goes with the last handle.
            return;
        }
        region.dead.store(true, Ordering::SeqCst);
        self.regions.write().unwrap_or_else(|e| e.into_inner()).remove(&region.start());
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
            if let Some(pm) = self.pagemap(page.pagemap) {
                pm.free_page(page.pfn);
            }
        }
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

impl Drop for SpaceInner {
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
    }
}
