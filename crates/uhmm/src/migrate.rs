//! Migration of pages between RAM and devices: the kernel's
//! `migrate_vma_setup` / `migrate_vma_pages` / `migrate_vma_finalize`, the
//! device-range eviction `migrate_device_range`, and a chunked helper.
//!
//! # The protocol
//!
//! 1. [`Migration::setup`] collects every page of a range: a hole is a
//!    candidate with no source; a RAM page is a candidate when the selection
//!    includes [`Select::SYSTEM`]; a device page when it includes
//!    [`Select::DEVICE_PRIVATE`] *and* its pagemap has the migration's owner.
//!    Candidates are locked best-effort (a locked page is skipped, never
//!    waited for), and RAM candidates are unmapped: moved, without copying,
//!    into the staging area, so any CPU access to them waits. A page the
//!    kernel will not move (pinned, shared) is skipped as busy.
//! 2. The driver allocates destination pages for the candidates it wants and
//!    copies (its DMA engine, with a fence it waits on), then sets each
//!    destination. Moving device → RAM it must not silently skip a page: it
//!    migrates it or marks it as an error (accessors then get SIGBUS).
//! 3. [`Migration::pages`] commits: from now on [`Migration::migrated`] says
//!    exactly which pages move, while sources and destinations are still
//!    locked — the moment for the driver to update its own page table.
//! 4. [`Migration::finalize`] maps each moved page at its new home, restores
//!    the others, unlocks, wakes waiting threads and frees the sources
//!    (`page_free` for device pages).
//!
//! The steps are types: `Migration<Collected>` becomes `Migration<Migrated>`
//! and is consumed by `finalize`, so no step can be skipped or reordered.
//! Dropping a migration before `finalize` restores every page — an early `?`
//! or a panic in driver code never leaks a lock or loses data.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;

use rustix::io::Errno;
use smallvec::{SmallVec, smallvec};

use crate::copier::{
    CopyQueue, CopyRun, FAULT_PIECE_PAGES, Kept, PIECE_PAGES, SPLIT_MIN_PAGES, Via, copy_in, moved_anyway,
};
use crate::fork::InFlight;
use crate::notifier::InvalidateEvent;
use crate::pagemap::{DevicePage, DevicePagemap, DevicePfn, Owner};
use crate::pte::State;
use crate::region::{Backing, Prot, RegionInner};
use crate::space::{AddressSpace, SpaceInner};
use crate::staging::{Slots, SystemPage};
use crate::stats::Stats;
use uhmm_sys::PAGE_SIZE;
use uhmm_sys::mman::Mapping;
use uhmm_sys::pagemap::{Query, category};
use crate::{Error, ErrorKind, Result};

bitflags::bitflags! {
    /// Which pages a migration collects (`MIGRATE_VMA_SELECT_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Select: u8 {
        /// Pages in system RAM (and the zero page).
        const SYSTEM = 1;
        /// Device-private pages of the migration's owner.
        const DEVICE_PRIVATE = 2;
        /// Device-coherent pages of the migration's owner (CPU-addressable
        /// device memory, mapped in the region).
        const DEVICE_COHERENT = 4;
    }
}

/// Step marker: collected, locked and unmapped by `setup`.
#[derive(Debug)]
pub enum Collected {}
/// Step marker: committed by `pages`.
#[derive(Debug)]
pub enum Migrated {}

/// The source of page `i` of a migration (the kernel's `src[i]`).
#[derive(Debug, Clone)]
pub enum MigrateSrc {
    /// Not collected: skipped (not selected, locked, pinned, no access).
    Skip,
    /// A hole: no data; a destination must be zero-filled.
    Hole,
    /// A RAM page, stable in staging while the migration holds it.
    System(SystemPage),
    /// A device page.
    Device(DevicePage),
}

/// The destination chosen by the driver for page `i` (the kernel's `dst[i]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateDst {
    /// None: the page stays where it is.
    None,
    /// This device page, filled by the driver.
    Device(DevicePage),
    /// The RAM page from [`Migration::system_dst`], filled by the driver.
    System,
    /// The data is lost (`MIGRATE_PFN_ERROR`): accesses get SIGBUS.
    Error,
}

/// What a finished migration did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrateSummary {
    /// Pages in the range (`npages`).
    pub npages: usize,
    /// Pages collected as candidates (`cpages`).
    pub cpages: usize,
    /// Pages that moved.
    pub migrated: usize,
}

impl std::ops::AddAssign for MigrateSummary {
    fn add_assign(&mut self, o: Self) {
        self.npages += o.npages;
        self.cpages += o.cpages;
        self.migrated += o.migrated;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Skip,
    Hole,
    System,
    Device(DevicePage),
}

#[derive(Debug, Clone, Copy)]
struct Page {
    /// Index into `Inner::regions`.
    region: u32,
    /// Page index in that region.
    idx: usize,
    src: Src,
    /// The state to restore.
    prior: State,
    dst: MigrateDst,
    /// With `dst == System`: index into `Inner::copy_srcs` when the data
    /// is copied in from the driver's memory at install (else the pool).
    copy_from: Option<u32>,
    migrated: bool,
}

/// A migration in progress: `setup` → the driver copies → `pages` → `finalize`
/// (the kernel's migrate_vma protocol; dropping it before `finalize` restores
/// every page).
///
/// A device driver runs the steps: [`setup`](Migration::setup) collects and
/// locks the pages; the driver allocates its pages, copies, and sets each
/// destination ([`set_dst_device`](Migration::set_dst_device) towards the
/// device; [`system_dst`](Migration::system_dst) and
/// [`set_dst_system`](Migration::set_dst_system), or
/// [`set_dst_system_from`](Migration::set_dst_system_from), towards RAM);
/// [`pages`](Migration::pages) commits, the moment to update its device page
/// table; [`finalize`](Migration::finalize) maps the pages at their new
/// home. A program normally calls a driver's operations instead (the sim
/// device's `migrate_to_device_all`, for one), which run these steps,
/// usually in chunks through [`migrate_pipelined`] or [`migrate_chunked`];
/// a driver's [`migrate_to_ram`](crate::DevicePagemapOps::migrate_to_ram)
/// runs them for a CPU fault.
///
/// A whole driver, small enough to show: its memory is a map of page
/// buffers, and it brings pages back when the CPU touches them.
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::{Arc, Mutex, Weak};
/// use uhmm::{
///     AddressSpace, Config, CpuFault, DevicePagemapOps, DevicePfn, MigrateSrc, Migration, Owner, PAGE_SIZE,
///     Prot, Residency, Select,
/// };
///
/// struct Dev {
///     owner: Owner,
///     mem: Mutex<HashMap<u64, Vec<u8>>>,
/// }
///
/// impl DevicePagemapOps for Dev {
///     fn page_free(&self, pfn: DevicePfn) {
///         self.mem.lock().unwrap().remove(&pfn.0);
///     }
///
///     // The CPU touched a page of this device: the same steps, towards RAM.
///     fn migrate_to_ram(&self, fault: &CpuFault) -> uhmm::Result<()> {
///         let mut m = Migration::setup(fault.space(), fault.window(), Select::DEVICE_PRIVATE, self.owner)?;
///         for i in 0..m.npages() {
///             if let MigrateSrc::Device(page) = m.src(i) {
///                 let data = self.mem.lock().unwrap()[&page.pfn.0].clone();
///                 m.system_dst(i)?.write(0, &data)?;
///                 m.set_dst_system(i)?;
///             }
///         }
///         m.pages().finalize();
///         Ok(())
///     }
/// }
///
/// # fn main() -> uhmm::Result<()> {
/// let space = AddressSpace::new(Config::default())?;
/// let dev = Arc::new(Dev { owner: Owner::new(), mem: Mutex::default() });
/// let ops: Weak<dyn DevicePagemapOps> = Arc::downgrade(&dev) as Weak<Dev>;
/// let pagemap = space.register_pagemap(ops, dev.owner, 1024)?;
///
/// let region = space.map(4 * PAGE_SIZE, Prot::READ_WRITE)?;
/// region.write(0, b"hello")?;
///
/// // Step 1: collect, lock and unmap the RAM pages and holes of the range.
/// let mut m = Migration::setup(&space, region.range(), Select::SYSTEM, dev.owner)?;
/// // The driver: a device page for each candidate, filled, set as its destination.
/// for i in 0..m.npages() {
///     let mut data = vec![0; PAGE_SIZE]; // a hole becomes a zero-filled page
///     match m.src(i) {
///         MigrateSrc::System(page) => page.read(0, &mut data)?,
///         MigrateSrc::Hole => {}
///         _ => continue, // skipped (busy, or not selected): it stays
///     }
///     let pfn = DevicePfn(i as u64); // the device's allocator
///     dev.mem.lock().unwrap().insert(pfn.0, data);
///     m.set_dst_device(i, pagemap.page(pfn).unwrap())?;
/// }
/// // Step 2: commit. `migrated(i)` is final now, and the pages still locked:
/// // a driver maps the moved pages in its own page table here.
/// let m = m.pages();
/// assert_eq!(m.migrated_count(), 4);
/// // Step 3: map the pages at their new home, unlock, wake waiting threads.
/// let summary = m.finalize();
/// assert_eq!(summary.migrated, 4);
/// let page0 = space.snapshot(region.addr()..region.addr() + PAGE_SIZE)?[0];
/// assert!(matches!(page0.residency, Residency::Device(..)));
///
/// // A CPU access faults the data back through `migrate_to_ram`.
/// let mut buf = [0; 5];
/// region.read(0, &mut buf)?;
/// assert_eq!(&buf, b"hello");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Migration<S = Collected> {
    inner: Inner,
    _step: PhantomData<S>,
}

#[derive(Debug)]
struct Inner {
    /// Keeps a fork waiting until this migration ends.
    _in_flight: InFlight,
    space: Arc<SpaceInner>,
    regions: Few<Arc<RegionInner>>,
    pages: Few<Page>,
    stage: Option<Slots>,
    pool: Option<Slots>,
    /// Where the data of pages set with [`Migration::set_dst_system_from`]
    /// is: (index into `copy_maps`, offset).
    copy_srcs: Few<(usize, usize)>,
    /// The driver memories named, each once in a row.
    copy_maps: Few<Arc<Mapping>>,
    /// The pagemap looked up last (a migration's device pages are usually
    /// of one device): saves a lock and two atomics a page.
    last_pagemap: Option<Arc<DevicePagemap>>,
    cpages: usize,
    finished: bool,
    /// Whether `finish` empties the staging slots on this thread, half of
    /// them beside the copy helper (its caller waits for them anyway),
    /// rather than all on the helper.
    release_here: bool,
}

impl Migration<Collected> {
    /// Step 1 (`migrate_vma_setup`): collect, lock and unmap the pages of
    /// `range` selected by `select` and `owner`.
    ///
    /// `range` is rounded down to pages at both ends. It must be non-empty
    /// and inside one region; otherwise [`ErrorKind::InvalidArgument`] and
    /// nothing changes. Each call starts from fresh state, so a loop can
    /// reuse the same code path chunk after chunk.
    pub fn setup(space: &AddressSpace, range: Range<usize>, select: Select, owner: Owner) -> Result<Self> {
        let start = range.start & !(PAGE_SIZE - 1);
        let end = range.end & !(PAGE_SIZE - 1);
        let space = &space.inner;
        space.check_usable()?;
        let (region, pages) = space.region_pages(start..end.max(start))?;
        let (first, n) = (pages.start, pages.len());
        let mut m = Inner::new(space.clone(), smallvec![region.clone()], n, InFlight::enter());
        for (i, p) in m.pages.iter_mut().enumerate() {
            p.idx = first + i;
        }
        if region.backing != Backing::Anonymous {
            // Only private anonymous memory migrates (migrate_vma_collect
            // skips other mappings): nothing is collected.
            return Ok(Migration { inner: m, _step: PhantomData });
        }
        let owner_ok = |p: &DevicePage| space.pagemap(p.pagemap).is_some_and(|pm| pm.owner() == owner);
        let coherent = |p: &DevicePage| space.is_coherent(p);

        // Collect and lock.
        let mut cpu = Vec::new();
        let mut mapped_device = Vec::new();
        for (prange, prot) in region.prot_runs(first..first + n) {
            for idx in prange {
                let i = idx - first;
                // Best effort, but not at the first contention: the fault
                // engine holds fill windows for a few microseconds (also for
                // stale, duplicate faults), which should not make a page busy.
                let Some(prior) = region.pt.try_lock(idx).or_else(|| {
                    // A zero fill's lock goes within microseconds: wait it out
                    // (bounded); any other holder makes the page busy.
                    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(20);
                    (0..3)
                        .find_map(|_| {
                            std::thread::yield_now();
                            region.pt.try_lock(idx)
                        })
                        .or_else(|| {
                            loop {
                                if !region.pt.filling(idx) || std::time::Instant::now() > deadline {
                                    break region.pt.try_lock(idx);
                                }
                                std::thread::yield_now();
                                if let Some(s) = region.pt.try_lock(idx) {
                                    break Some(s);
                                }
                            }
                        })
                }) else {
                    Stats::add(&space.stats.busy_pages, 1);
                    continue;
                };
                m.pages[i].prior = prior;
                m.pages[i].src = match prior {
                    // RAM page or hole: decided once it is unmapped, below.
                    State::Cpu if prot != Prot::NONE => {
                        cpu.push(i);
                        Src::Hole
                    }
                    // Coherent device pages are mapped: they are unmapped below, like RAM.
                    State::Device(p) if coherent(&p) && select.contains(Select::DEVICE_COHERENT) && owner_ok(&p) => {
                        mapped_device.push(i);
                        Src::Device(p)
                    }
                    State::Device(p) if !coherent(&p) && select.contains(Select::DEVICE_PRIVATE) && owner_ok(&p) => {
                        Src::Device(p)
                    }
                    _ => {
                        m.unlock_skip(i);
                        Src::Skip
                    }
                };
            }
        }
        if region.is_dead() {
            return Err(Error::new(ErrorKind::NotFound, "the region is being unmapped"));
        }
        // Mirrors drop their entries before any page changes.
        let _inv = m
            .pages
            .iter()
            .any(|p| p.src != Src::Skip)
            .then(|| space.notifiers.invalidate(start..end, InvalidateEvent::Migrate { owner }));
        if !select.contains(Select::SYSTEM) {
            m.keep_holes_only(&region, first, &cpu)?;
            cpu.clear();
        }
        cpu.extend(mapped_device);
        cpu.sort_unstable();
        if !cpu.is_empty() {
            m.unmap_system(&region, first, &cpu)?;
        }
        m.cpages = m.pages.iter().filter(|p| p.src != Src::Skip).count();
        Stats::add(&space.stats.collected_pages, m.cpages as u64);
        Ok(Migration { inner: m, _step: PhantomData })
    }

    /// A RAM page to fill with the data of page `i` when migrating it to RAM
    /// (the kernel's freshly allocated system page). Pair it with
    /// [`Migration::set_dst_system`].
    pub fn system_dst(&mut self, i: usize) -> Result<SystemPage> {
        self.inner.check_collected(i)?;
        if self.inner.pool.is_none() {
            // A whole aligned 2 MiB block coming back gets a huge page.
            let inner = &self.inner;
            let whole_block = inner.pages.len() == crate::BATCH_PAGES
                && inner.regions.len() == 1
                && inner.regions[0].huge
                && inner.pages[0].idx.is_multiple_of(crate::BATCH_PAGES)
                && inner
                    .pages
                    .iter()
                    .enumerate()
                    .all(|(k, p)| p.idx == inner.pages[0].idx + k && matches!(p.src, Src::Device(_)));
            let arena = if whole_block { &inner.space.huge_pool } else { &inner.space.pool };
            let pool = arena.alloc(inner.pages.len())?;
            // Pages coming back from a device will need RAM: allocate it in bulk.
            let device: Vec<usize> =
                (0..self.inner.pages.len()).filter(|&k| matches!(self.inner.pages[k].src, Src::Device(_))).collect();
            for run in runs(&device) {
                pool.populate(run);
            }
            self.inner.pool = Some(pool);
        }
        let pool = self.inner.pool.as_ref().expect("pool just allocated");
        Ok(SystemPage::new(pool.arena(), pool.offset(i)))
    }

    /// Page `i` moves to device page `page`, which the driver has filled.
    pub fn set_dst_device(&mut self, i: usize, page: DevicePage) -> Result<()> {
        self.inner.check_collected(i)?;
        let pm = self
            .inner
            .pagemap(page.pagemap)
            .ok_or_else(|| Error::invalid("destination device page of an unknown pagemap"))?;
        if pm.page(page.pfn).is_none() {
            return Err(Error::invalid("device page out of its pagemap"));
        }
        if pm.is_coherent() && self.inner.pool.is_none() {
            return Err(Error::invalid("a device-coherent destination is the page from system_dst: fill it first"));
        }
        if self.inner.pages[i].dst == MigrateDst::Device(page) {
            return Ok(());
        }
        if !pm.reserve(page.pfn) {
            return Err(Error::invalid("device page already mapped or claimed elsewhere"));
        }
        self.inner.release_dst(i);
        self.inner.pages[i].dst = MigrateDst::Device(page);
        Ok(())
    }

    /// Page `i` moves to RAM: the page from [`Migration::system_dst`], which
    /// the driver has filled.
    pub fn set_dst_system(&mut self, i: usize) -> Result<()> {
        self.inner.check_collected(i)?;
        if self.inner.pool.is_none() {
            return Err(Error::invalid("set_dst_system before system_dst"));
        }
        self.inner.release_dst(i);
        self.inner.pages[i].dst = MigrateDst::System;
        Ok(())
    }

    /// Page `i` moves to RAM with the data the CPU reads from `src` at
    /// `offset` (one page): memory of a driver whose device memory the CPU
    /// can read, or a buffer it filled. `finalize` copies it straight into a
    /// fresh page of the region (`UFFDIO_COPY`: the kernel allocates the
    /// page and copies in one step, with no zeroed pool page, no move and no
    /// TLB flush). The page at `src` must hold the data, unchanged, until
    /// `finalize` returns; the migration keeps `src` alive until then.
    ///
    /// If the copy cannot be made at `finalize` (the kernel out of memory,
    /// `src` unreadable), the page stays where it was — on the device, its
    /// source not freed — and `finalize` does not count it as migrated.
    ///
    /// For device-private pages and holes only. `offset` must be
    /// page-aligned and the page inside `src`; otherwise
    /// [`ErrorKind::InvalidArgument`] and nothing changes.
    pub fn set_dst_system_from(&mut self, i: usize, src: &Arc<Mapping>, offset: usize) -> Result<()> {
        self.inner.check_collected(i)?;
        match self.inner.pages[i].src {
            Src::Hole => {}
            Src::Device(d) if !self.inner.space.is_coherent(&d) => {}
            // Its data sits in staging (a RAM or coherent page): a failed
            // copy could not leave it where it was.
            _ => return Err(Error::invalid("copy-in is for device-private pages and holes")),
        }
        if !offset.is_multiple_of(PAGE_SIZE) || offset.checked_add(PAGE_SIZE).is_none_or(|end| end > src.len()) {
            return Err(Error::invalid("copy source is not a whole page inside its mapping"));
        }
        let at = u32::try_from(self.inner.copy_srcs.len()).map_err(|_| Error::invalid("too many copy sources"))?;
        self.inner.release_dst(i);
        let inner = &mut self.inner;
        if !inner.copy_maps.last().is_some_and(|m| Arc::ptr_eq(m, src)) {
            inner.copy_maps.push(src.clone());
        }
        inner.copy_srcs.push((inner.copy_maps.len() - 1, offset));
        self.inner.pages[i].dst = MigrateDst::System;
        self.inner.pages[i].copy_from = Some(at);
        Ok(())
    }

    /// Page `i` cannot be brought back: its data is lost and accesses will
    /// get SIGBUS. Only for unrecoverable device state.
    pub fn set_dst_error(&mut self, i: usize) -> Result<()> {
        self.inner.check_collected(i)?;
        self.inner.release_dst(i);
        self.inner.pages[i].dst = MigrateDst::Error;
        Ok(())
    }

    /// Step 2 (`migrate_vma_pages`): commit the pages that have a destination.
    pub fn pages(self) -> Migration<Migrated> {
        let Migration { mut inner, .. } = self;
        for p in &mut inner.pages {
            p.migrated = p.src != Src::Skip && p.dst != MigrateDst::None;
        }
        Migration { inner, _step: PhantomData }
    }
}

impl Migration<Migrated> {
    /// Whether page `i` moves (the kernel's `MIGRATE_PFN_MIGRATE` after
    /// `migrate_vma_pages`).
    pub fn migrated(&self, i: usize) -> bool {
        self.inner.pages.get(i).is_some_and(|p| p.migrated)
    }

    /// How many pages move.
    pub fn migrated_count(&self) -> usize {
        self.inner.pages.iter().filter(|p| p.migrated).count()
    }

    /// Step 3 (`migrate_vma_finalize`): map moved pages at their new home,
    /// restore the others, unlock and wake.
    pub fn finalize(mut self) -> MigrateSummary {
        self.inner.finish()
    }

    /// `finalize` in two halves, for the pipelined helper: this one starts
    /// mapping pages back (the copy helper takes its share of the copies
    /// in); [`Finalizing::end`] completes it.
    fn finalize_begin(self) -> Finalizing {
        let Migration { mut inner, .. } = self;
        let started = inner.finish_begin();
        Finalizing { inner, started: Some(started) }
    }
}

/// A `finalize` under way ([`Migration::finalize_begin`]); dropping it
/// completes it.
#[derive(Debug)]
struct Finalizing {
    inner: Inner,
    started: Option<Installing>,
}

impl Finalizing {
    fn end(mut self) -> MigrateSummary {
        let started = self.started.take().expect("a finalize under way");
        self.inner.finish_end(started)
    }

    /// `end`, emptying half the staging slots on this thread while the
    /// helper empties the other half: for a caller about to wait for them.
    fn end_releasing_here(mut self) -> MigrateSummary {
        self.inner.release_here = true;
        self.end()
    }
}

impl Drop for Finalizing {
    fn drop(&mut self) {
        if let Some(started) = self.started.take() {
            self.inner.finish_end(started);
        }
    }
}

impl<S> Migration<S> {
    /// Pages in the range (`npages`).
    pub fn npages(&self) -> usize {
        self.inner.pages.len()
    }

    /// Pages collected (`cpages`).
    pub fn cpages(&self) -> usize {
        self.inner.cpages
    }

    /// The address of page `i` (`None` past the end).
    pub fn addr(&self, i: usize) -> Option<usize> {
        let p = self.inner.pages.get(i)?;
        Some(self.inner.regions[p.region as usize].addr_of(p.idx))
    }

    /// The source of page `i`.
    pub fn src(&self, i: usize) -> MigrateSrc {
        match self.inner.pages.get(i).map(|p| p.src) {
            None | Some(Src::Skip) => MigrateSrc::Skip,
            Some(Src::Hole) => MigrateSrc::Hole,
            Some(Src::Device(p)) => MigrateSrc::Device(p),
            Some(Src::System) => {
                let stage = self.inner.stage.as_ref().expect("system sources live in staging");
                MigrateSrc::System(SystemPage::new(stage.arena(), stage.offset(i)))
            }
        }
    }

    /// The staged copy of page `i`'s data, when setup moved it out of the
    /// region: a RAM page, or a device-coherent page (whose data the driver
    /// copies from here, since the CPU mapped it).
    pub fn src_page(&self, i: usize) -> Option<SystemPage> {
        let p = self.inner.pages.get(i)?;
        let staged = match p.src {
            Src::System => true,
            Src::Device(d) => self.inner.space.is_coherent(&d),
            _ => false,
        };
        let stage = self.inner.stage.as_ref().filter(|_| staged)?;
        Some(SystemPage::new(stage.arena(), stage.offset(i)))
    }

    /// The destination of page `i`.
    pub fn dst(&self, i: usize) -> MigrateDst {
        self.inner.pages.get(i).map_or(MigrateDst::None, |p| p.dst)
    }
}

/// A migration's list by page (or by region, or by driver memory): a CPU
/// fault's single-page migration keeps each inline, without allocating.
type Few<T> = SmallVec<[T; 1]>;

/// Runs of pages of a migration: (first page, pages).
type Runs = Few<(usize, usize)>;

/// A finalize under way (`Inner::finish_begin`): the new states, what is
/// being mapped back, and the copies in still to do or to wait for.
#[derive(Debug)]
struct Installing {
    new_state: Few<State>,
    installs: Few<(usize, InstallFrom)>,
    failed: Vec<usize>,
    /// The copies in from driver memory, and when they are big, their
    /// queue, shared with the helper (then each is a piece).
    pieces: Runs,
    copies: Option<Arc<CopyQueue>>,
}

/// Where the data of a page that `finalize` maps back into its region is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InstallFrom {
    /// A pool slot the driver filled: moved in.
    Pool,
    /// The staging slot setup moved it to: moved back (a restore).
    Stage,
    /// The driver's memory ([`Migration::set_dst_system_from`]): copied in.
    Driver,
}

impl Inner {
    fn new(space: Arc<SpaceInner>, regions: Few<Arc<RegionInner>>, n: usize, in_flight: InFlight) -> Inner {
        let page = Page {
            region: 0,
            idx: 0,
            src: Src::Skip,
            prior: State::Cpu,
            dst: MigrateDst::None,
            copy_from: None,
            migrated: false,
        };
        Inner {
            _in_flight: in_flight,
            space,
            regions,
            pages: smallvec![page; n],
            stage: None,
            pool: None,
            copy_srcs: Few::new(),
            copy_maps: Few::new(),
            last_pagemap: None,
            cpages: 0,
            finished: false,
            release_here: false,
        }
    }

    /// Drops page `i`'s destination (and the claim on a device page).
    fn release_dst(&mut self, i: usize) {
        self.pages[i].copy_from = None;
        if let MigrateDst::Device(d) = self.pages[i].dst {
            if let Some(pm) = self.space.pagemap(d.pagemap) {
                pm.set_rmap(d.pfn, None);
            }
            self.pages[i].dst = MigrateDst::None;
        }
    }

    /// The pagemap with id `id`.
    fn pagemap(&mut self, id: u16) -> Option<Arc<DevicePagemap>> {
        if let Some(pm) = self.last_pagemap.as_ref().filter(|pm| pm.id() == id) {
            return Some(pm.clone());
        }
        self.last_pagemap = self.space.pagemap(id);
        self.last_pagemap.clone()
    }

    fn check_collected(&self, i: usize) -> Result<()> {
        match self.pages.get(i) {
            None => Err(Error::invalid("page index out of the migration")),
            Some(p) if p.src == Src::Skip => Err(Error::invalid("page was not collected")),
            Some(_) => Ok(()),
        }
    }

    fn region_of(&self, i: usize) -> &Arc<RegionInner> {
        &self.regions[self.pages[i].region as usize]
    }

    /// Unlocks page `i` unchanged and drops it from the migration.
    fn unlock_skip(&mut self, i: usize) {
        let p = self.pages[i];
        let region = &self.regions[p.region as usize];
        self.space.unlock_wake(region, p.idx, p.prior);
        self.pages[i].src = Src::Skip;
    }

    /// Unmaps the locked CPU pages `cpu` (indices into the migration, whose
    /// region pages are `first + i`) into staging, then classifies each as a
    /// RAM page or a hole.
    fn unmap_system(&mut self, region: &Arc<RegionInner>, first: usize, cpu: &[usize]) -> Result<()> {
        let stage = self.space.stage.alloc(self.pages.len())?;
        let r = self.unmap_system_into(&stage, region, first, cpu);
        if r.is_err() {
            // Some pages may already sit in staging: restore every candidate
            // from there (restoring moves skip staging holes).
            for &i in cpu {
                if self.pages[i].src != Src::Skip {
                    self.pages[i].src = Src::System;
                }
            }
        }
        self.stage = Some(stage);
        r
    }

    fn unmap_system_into(
        &mut self,
        stage: &Slots,
        region: &Arc<RegionInner>,
        first: usize,
        cpu: &[usize],
    ) -> Result<()> {
        let space = self.space.clone();
        // One ioctl never crosses a protection boundary (a VMA boundary).
        let prot_split = runs(cpu).into_iter().flat_map(|run| {
            region
                .prot_runs(first + run.start..first + run.end)
                .into_iter()
                .map(move |(r, p)| (r.start - first..r.end - first, p))
        });
        for (run, prot) in prot_split.collect::<Vec<_>>() {
            let writable = prot.contains(Prot::WRITE);
            if writable {
                let mut i = run.start;
                // EBUSY can be transient (the kernel holds a reference for a
                // moment: compaction, an LRU batch): try a page a few times
                // before skipping it as busy, which is what a pin gets.
                let mut busy_tries = 0;
                while i < run.end {
                    let len = stage.contiguous(i, run.end - i);
                    let dst = stage.addr(i);
                    match space.uffd.move_pages(dst, &region.map, (first + i) * PAGE_SIZE, len * PAGE_SIZE, true, true)
                    {
                        Ok(_) => i += len,
                        Err(e) => {
                            let k = i + e.done / PAGE_SIZE;
                            if e.errno == Errno::AGAIN {
                                Stats::add(&space.stats.eagain, 1);
                                i = k;
                                std::thread::yield_now();
                                continue;
                            }
                            if e.errno == Errno::BUSY && busy_tries < 3 {
                                busy_tries += 1;
                                i = k;
                                std::thread::sleep(std::time::Duration::from_micros(20 << busy_tries));
                                continue;
                            }
                            busy_tries = 0;
                            // Whatever the error said, the page table decides
                            // whether page k moved: the kernel (6.18) has
                            // been seen to answer EEXIST, nothing done, to a
                            // one-page move whose page did move (the region's
                            // entry empty, the slot full afterwards).
                            // Skipping it would leave its data in a slot about
                            // to be emptied: the soak's zeroed pages.
                            if !space.is_present(region.addr_of(first + k))? {
                                // Moved, or a hole: the scan below tells which.
                                i = k + 1;
                                continue;
                            }
                            if e.errno != Errno::BUSY {
                                tracing::warn!(errno = %e.errno, "UFFDIO_MOVE into staging failed; page skipped");
                            }
                            Stats::add(&space.stats.busy_pages, 1);
                            self.unlock_skip(k);
                            i = k + 1;
                        }
                    }
                }
            } else {
                // Read-only: MOVE needs writable mappings, so copy the present
                // pages into staging and zap them. Nothing can write them
                // meanwhile: they are read-only, and the protections are held
                // still until the zap. (A kernel pin on such a page is not
                // seen on this path: copy and zap ignore it.)
                let frozen = region.prot_frozen();
                if run.clone().any(|i| frozen.prot_at(first + i).contains(Prot::WRITE)) {
                    // Made writable since the runs were read (any page of
                    // it: a write between the copy and the zap below would
                    // be lost): skip, busy.
                    drop(frozen);
                    for i in run {
                        self.unlock_skip(i);
                    }
                    continue;
                }
                let (a, b) = (region.addr_of(first + run.start), region.addr_of(first + run.end));
                for r in space.scan(a, b, Query::any_of(category::PRESENT | category::SWAPPED))? {
                    let mut addr = r.start;
                    while addr < r.end {
                        let i = first_index(region, first, addr);
                        let len = stage.contiguous(i, (r.end - addr) / PAGE_SIZE);
                        if let Err(e) = space.uffd.copy(stage.addr(i), addr as *const u8, len * PAGE_SIZE, true) {
                            return Err(Error::sys("UFFDIO_COPY into staging", std::io::Error::from(e.errno)));
                        }
                        addr += len * PAGE_SIZE;
                    }
                }
                region
                    .map
                    .discard((first + run.start) * PAGE_SIZE, run.len() * PAGE_SIZE)
                    .map_err(|e| Error::sys("MADV_DONTNEED", e))?;
                drop(frozen);
            }
        }
        // Which staged slots hold data? Holes and the zero page are holes.
        let mut present = Vec::new();
        let q = Query::all(category::PRESENT | category::SWAPPED | category::PFNZERO);
        let mut i = 0;
        while i < self.pages.len() {
            let len = stage.contiguous(i, self.pages.len() - i);
            present.clear();
            let a = stage.addr(i);
            space
                .pagemap_file
                .scan(a, a + len * PAGE_SIZE, q, &mut present)
                .map_err(|e| Error::sys("PAGEMAP_SCAN", e))?;
            for r in &present {
                let data = r.categories & (category::PRESENT | category::SWAPPED) != 0
                    && r.categories & category::PFNZERO == 0;
                if data {
                    for j in (r.start - a) / PAGE_SIZE..(r.end - a) / PAGE_SIZE {
                        if self.pages[i + j].src != Src::Skip && self.pages[i + j].prior == State::Cpu {
                            self.pages[i + j].src = Src::System;
                        }
                    }
                }
            }
            i += len;
        }
        Ok(())
    }

    /// Without `Select::SYSTEM`: RAM and zero pages are not candidates, holes are.
    fn keep_holes_only(&mut self, region: &Arc<RegionInner>, first: usize, cpu: &[usize]) -> Result<()> {
        let (Some(&lo), Some(&hi)) = (cpu.first(), cpu.last()) else {
            return Ok(());
        };
        let (a, b) = (region.addr_of(first + lo), region.addr_of(first + hi + 1));
        for r in self.space.scan(a, b, Query::any_of(category::PRESENT | category::SWAPPED))? {
            for addr in (r.start..r.end).step_by(PAGE_SIZE) {
                let i = first_index(region, first, addr);
                if self.pages[i].src != Src::Skip {
                    self.unlock_skip(i);
                }
            }
        }
        Ok(())
    }

    /// `finalize`, and the restore path of `Drop`.
    fn finish(&mut self) -> MigrateSummary {
        let started = self.finish_begin();
        self.finish_end(started)
    }

    /// The first half of `finish`: decides each page's new state and starts
    /// mapping pages back (moves done, copies in started, the helper's share
    /// running). [`Inner::finish_end`] completes it.
    fn finish_begin(&mut self) -> Installing {
        self.finished = true;
        let space = self.space.clone();
        let mut new_state: Few<State> = self.pages.iter().map(|p| p.prior).collect();
        // Pages to map back into regions, and where their data is.
        let mut installs: Few<(usize, InstallFrom)> = Few::new();
        let mut to_device: Few<bool> = smallvec![false; self.regions.len()];
        for (i, state) in new_state.iter_mut().enumerate() {
            let p = self.pages[i];
            if p.src == Src::Skip {
                continue;
            }
            let region = &self.regions[p.region as usize];
            if p.migrated {
                match p.dst {
                    MigrateDst::Device(d) => {
                        *state = State::Device(d);
                        to_device[p.region as usize] = true;
                        let region_id = region.id;
                        if let Some(pm) = self.pagemap(d.pagemap) {
                            pm.set_rmap(d.pfn, Some((region_id, p.idx)));
                            if pm.is_coherent() {
                                // CPU-addressable: the page is mapped in the region.
                                installs.push((i, InstallFrom::Pool));
                            }
                        }
                    }
                    MigrateDst::System => {
                        *state = State::Cpu;
                        installs.push((i, if p.copy_from.is_some() { InstallFrom::Driver } else { InstallFrom::Pool }));
                    }
                    MigrateDst::Error => {
                        *state = State::Poisoned;
                        if let Err(e) = space.uffd.poison(region.addr_of(p.idx), PAGE_SIZE, true) {
                            tracing::error!(errno = %e.errno, "UFFDIO_POISON failed");
                        }
                    }
                    MigrateDst::None => unreachable!("migrated pages have a destination"),
                }
            } else {
                // Put back what setup moved to staging: RAM pages, and zero
                // pages that were collected as holes (true holes are skipped
                // by the move).
                let staged = match p.src {
                    Src::System | Src::Hole => true,
                    Src::Device(d) => space.is_coherent(&d),
                    Src::Skip => false,
                };
                if staged && self.stage.is_some() {
                    installs.push((i, InstallFrom::Stage));
                }
            }
        }
        // Before the pages unlock: a fault read earlier then looks stale.
        if to_device.contains(&true) {
            let epoch = space.to_device_epoch.fetch_add(1, SeqCst) + 1;
            for (region, _) in self.regions.iter().zip(&to_device).filter(|(_, moved)| **moved) {
                region.to_device_at.fetch_max(epoch, SeqCst);
            }
        }
        let (failed, pieces, copies) = self.install_begin(&installs);
        Installing { new_state, installs, failed, pieces, copies }
    }

    /// The second half of `finish`: the copies in (shared with the helper)
    /// done; failures settled; counts; unlock, free sources, wake.
    fn finish_end(&mut self, started: Installing) -> MigrateSummary {
        let Installing { mut new_state, installs, mut failed, pieces, copies } = started;
        let space = self.space.clone();
        let copied: Few<usize> = match copies {
            Some(queue) => {
                let (copied, by_helper, waited) = queue.finish(&space.uffd);
                Stats::add(&space.stats.helper_copied_pages, (by_helper / PAGE_SIZE) as u64);
                if space.copier.waited(waited) {
                    Stats::add(&space.stats.helper_stalls, 1);
                }
                SmallVec::from_vec(copied)
            }
            None => {
                // The kernel allocates these pages: as many kept ones go.
                let allocated = pieces.iter().map(|p| p.1).sum();
                if allocated > 0
                    && let Some((shed, pages)) = space.stage.note_allocated(allocated)
                {
                    Stats::add(&space.stats.kept_shed_pages, pages as u64);
                    space.copier.release(shed);
                }
                pieces.iter().map(|&(i, n)| copy_in(&space.uffd, self.copy_run(i, n))).collect()
            }
        };
        for (&(i, n), done) in pieces.iter().zip(copied) {
            self.settle(&mut failed, i, n, done / PAGE_SIZE);
        }
        for i in failed {
            let p = &mut self.pages[i];
            if p.migrated && p.copy_from.is_some() {
                // Its data is still in the driver's memory, and its source
                // (a device page or a hole) was never unmapped: it stays.
                p.migrated = false;
                new_state[i] = p.prior;
                continue;
            }
            new_state[i] = State::Poisoned;
            Stats::add(&space.stats.poisoned_pages, 1);
            let region = self.region_of(i);
            if let Err(e) = space.uffd.poison(region.addr_of(self.pages[i].idx), PAGE_SIZE, true) {
                tracing::error!(errno = %e.errno, "UFFDIO_POISON failed");
            }
        }
        // Count; device pages to free: the sources of pages that moved, and
        // allocated destinations that went unused.
        let mut summary = MigrateSummary { npages: self.pages.len(), cpages: self.cpages, migrated: 0 };
        let mut to_free: Few<DevicePage> = Few::new();
        // Pages to a device, to RAM, poisoned.
        let mut moved = [0u64; 3];
        for p in self.pages.iter().filter(|p| p.src != Src::Skip) {
            if !p.migrated {
                if let MigrateDst::Device(d) = p.dst {
                    to_free.push(d);
                }
                continue;
            }
            summary.migrated += 1;
            if let Src::Device(old) = p.src {
                to_free.push(old);
            }
            moved[match p.dst {
                MigrateDst::Device(_) => 0,
                MigrateDst::System => 1,
                MigrateDst::Error | MigrateDst::None => 2,
            }] += 1;
        }
        let counters = [&space.stats.pages_to_device, &space.stats.pages_to_ram, &space.stats.poisoned_pages];
        for (counter, n) in counters.into_iter().zip(moved) {
            if n > 0 {
                Stats::add(counter, n);
            }
        }
        // Unlock, then wake the threads that faulted meanwhile and those
        // waiting on installed pages (installs do not wake: a woken thread
        // must find its page unlocked).
        let mut wake: Few<bool> = smallvec![false; self.pages.len()];
        for &(i, _) in &installs {
            wake[i] = true;
        }
        for i in 0..self.pages.len() {
            let p = self.pages[i];
            if p.src != Src::Skip && self.region_of(i).pt.unlock(p.idx, new_state[i], &space.waits) {
                wake[i] = true;
            }
        }
        // Sources go back to their drivers before the waiting threads run,
        // so a thread that saw its page come back sees the device page freed.
        // By pagemap, in one call each (usually one).
        to_free.sort_unstable_by_key(|d| d.pagemap);
        for group in to_free.chunk_by(|a, b| a.pagemap == b.pagemap) {
            if let Some(pm) = self.pagemap(group[0].pagemap) {
                pm.free_pages(&group.iter().map(|d| d.pfn).collect::<Few<_>>());
            }
        }
        let mut i = 0;
        while i < wake.len() {
            if !wake[i] {
                i += 1;
                continue;
            }
            let (region, idx) = (self.pages[i].region, self.pages[i].idx);
            let mut n = 1;
            while i + n < wake.len()
                && wake[i + n]
                && self.pages[i + n].region == region
                && self.pages[i + n].idx == idx + n
            {
                n += 1;
            }
            space.wake(self.region_of(i), idx..idx + n);
            i += n;
        }
        if let Some(stage) = self.stage.as_mut() {
            keep_moved_to_device(&space, &self.pages, stage);
        }
        for mut slots in [self.stage.take(), self.pool.take()].into_iter().flatten() {
            if self.release_here {
                // The caller waits for them: it empties one half while the
                // helper empties the other.
                if let Some(back) = slots.split_half() {
                    space.copier.release(back);
                }
            } else {
                space.copier.release(slots);
            }
        }
        self.copy_srcs.clear();
        self.copy_maps.clear();
        Stats::add(&space.stats.migrations, 1);
        summary
    }

    /// Starts mapping pages back into their regions, each from where its
    /// data is (`installs`, in page order): moves, and huge pages with no
    /// kept batch to come through, done here; copies in from driver memory
    /// (whole huge blocks among them) returned as runs, `(first page,
    /// pages)` — pieces of a queue shared with the helper when they are
    /// big — for `finish_end`. The pages it could not map back are collected in the
    /// first part: the caller keeps a page whose data is still in the
    /// driver's memory where it was, and poisons the others (their data is
    /// in a slot about to be emptied: they read as SIGBUS, never as silent
    /// zeros).
    fn install_begin(&self, installs: &[(usize, InstallFrom)]) -> (Vec<usize>, Runs, Option<Arc<CopyQueue>>) {
        let mut failed = Vec::new();
        let mut copies = Runs::new();
        let mut blocks: Few<usize> = Few::new();
        let readable = |i: usize| self.copy_src(i).0.always_readable();
        let mut k = 0;
        while k < installs.len() {
            let (i, from) = installs[k];
            let n = self.install_run(&installs[k..]);
            k += n;
            if from != InstallFrom::Driver {
                self.settle(&mut failed, i, n, self.install_moved(i, n, from));
                continue;
            }
            if !self.region_of(i).huge {
                copies.push((i, n));
                continue;
            }
            // A whole aligned block of a huge-page region comes back as one
            // huge page: see `blocks` below.
            let mut at = i;
            while at < i + n {
                let idx = self.pages[at].idx;
                let piece = (crate::BATCH_PAGES - idx % crate::BATCH_PAGES).min(i + n - at);
                if piece == crate::BATCH_PAGES && readable(at) {
                    blocks.push(at);
                } else {
                    copies.push((at, piece));
                }
                at += piece;
            }
        }
        // A small copy (a fault's window) is not worth the helper's wake-up:
        // this thread does it in `finish_end`, through a partly filled kept
        // batch whose pages are enough (one a small migration to a device
        // left), or else with `UFFDIO_COPY`; but from half a batch (a scan's
        // window that left its marker behind) it goes through whole kept
        // batches as a big copy does, below.
        let total = copies.iter().map(|c| c.1).sum::<usize>();
        let small = blocks.is_empty() && total < SPLIT_MIN_PAGES;
        let filled = (small && total >= PIECE_PAGES && copies.iter().all(|c| readable(c.0)))
            .then(|| self.space.stage.take_filled(total))
            .flatten();
        if small && (filled.is_some() || total < SPLIT_MIN_PAGES / 2) {
            let Some(slots) = filled else {
                return (failed, copies, None);
            };
            let mut runs = Vec::with_capacity(copies.len());
            let mut used = 0;
            for &(i, n) in &copies {
                runs.push(CopyRun { via: Some(self.via(i, slots.offset(used))), ..self.copy_run(i, n) });
                used += n;
            }
            Stats::add(&self.space.stats.kept_copied_pages, total as u64);
            return (failed, copies, Some(Arc::new(CopyQueue::new(runs, Some(self.kept(slots)), false))));
        }
        // Kept staging batches (see `staging`), filled in turn while they
        // last by the runs whose source a CPU copy cannot fault on, a piece
        // ending where a batch does (kept batches need not be adjacent);
        // then pieces for `UFFDIO_COPY`. Whole blocks of huge-page regions
        // come first, a batch each: a kept batch is a huge page when one
        // moved out of such a block, and moves in whole. The blocks left
        // over get a huge pool page each, filled and moved in here.
        let readable_pages = copies.iter().filter(|c| readable(c.0)).map(|c| c.1).sum::<usize>();
        let batches = blocks.len() + readable_pages.div_ceil(crate::BATCH_PAGES);
        let kept = self.space.stage.take_kept(batches);
        let nkept = kept.as_ref().map_or(0, |s| s.len() / crate::BATCH_PAGES);
        for &at in blocks.iter().skip(nkept) {
            let done = self.install_huge_copied(at);
            if done < crate::BATCH_PAGES {
                copies.push((at + done, crate::BATCH_PAGES - done));
            }
        }
        blocks.truncate(nkept);
        let (mut pieces, mut runs): (Runs, Vec<CopyRun>) = (Runs::new(), Vec::new());
        // A fault's window is shared with the helper in smaller pieces: the
        // handler has no other CPU working for it (a bulk migration's
        // chunks keep both busy), and the faulting thread waits.
        let fault = crate::fault::on_handler_thread();
        let kept_piece = if fault { FAULT_PIECE_PAGES } else { crate::BATCH_PAGES };
        // The next kept slot to fill.
        let mut slot = 0;
        let block_slots = blocks.len() * crate::BATCH_PAGES;
        for (i, n) in blocks.into_iter().map(|at| (at, crate::BATCH_PAGES)).chain(copies) {
            let mut k = 0;
            while k < n {
                let slots = kept.as_ref().filter(|_| slot < nkept * crate::BATCH_PAGES && readable(i));
                let len = match slots {
                    Some(_) if slot < block_slots => crate::BATCH_PAGES,
                    Some(_) => (crate::BATCH_PAGES - slot % crate::BATCH_PAGES).min(kept_piece),
                    None => PIECE_PAGES,
                }
                .min(n - k);
                let mut run = self.copy_run(i + k, len);
                if let Some(slots) = slots {
                    run.via = Some(self.via(i + k, slots.offset(slot)));
                    slot += len;
                    Stats::add(&self.space.stats.kept_copied_pages, len as u64);
                }
                pieces.push((i + k, len));
                runs.push(run);
                k += len;
            }
        }
        let kept = kept.map(|slots| self.kept(slots));
        // One piece is the caller's: waking the helper for nothing costs
        // more than its share is worth (2 MiB back to RAM: 410–510 → 350–385
        // ns a page); so is a small copy, but for a fault's. A copy big
        // enough to share is still copied alone while sharing is paused
        // after the helper stalled (its CPU stopped by the host).
        let big = runs.len() > 1 && (!small || fault);
        let queue = Arc::new(CopyQueue::new(runs, kept, big));
        if big && self.space.copier.helpful() {
            self.space.copier.share(&queue);
        }
        (failed, pieces, Some(queue))
    }

    /// Records pages `i + done..i + n` as not mapped back.
    fn settle(&self, failed: &mut Vec<usize>, i: usize, n: usize, done: usize) {
        if done < n {
            let region = self.region_of(i);
            tracing::error!(addr = region.addr_of(self.pages[i].idx + done), "could not map pages back");
            failed.extend(i + done..i + n);
        }
    }

    /// The driver memory and offset holding page `i`'s data.
    fn copy_src(&self, i: usize) -> (&Mapping, usize) {
        let (map, off) = self.copy_srcs[self.pages[i].copy_from.expect("a copy source") as usize];
        (&self.copy_maps[map], off)
    }

    /// Kept `slots` for a copy queue of this migration's copies.
    fn kept(&self, slots: Slots) -> Kept {
        Kept { slots, srcs: self.copy_maps.to_vec(), pagemap: self.space.pagemap_file.clone() }
    }

    /// The copy of page `i` (and those after it) through kept slot `slot`.
    fn via(&self, i: usize, slot: usize) -> Via {
        let (src, src_off) = self.copy_srcs[self.pages[i].copy_from.expect("a copy source") as usize];
        Via { src, src_off, slot }
    }

    /// The copy that maps pages `i..i + n` from driver memory (contiguous
    /// there).
    fn copy_run(&self, i: usize, n: usize) -> CopyRun {
        let (src, off) = self.copy_src(i);
        CopyRun {
            dst: self.region_of(i).addr_of(self.pages[i].idx),
            src: src.addr() + off,
            len: n * PAGE_SIZE,
            via: None,
        }
    }

    /// How many of `installs`, from the first, one ioctl can map: pages
    /// consecutive in one region and one protection run (one VMA), whose
    /// data is contiguous too.
    fn install_run(&self, installs: &[(usize, InstallFrom)]) -> usize {
        let (i, from) = installs[0];
        let slots = match from {
            InstallFrom::Pool => self.pool.as_ref(),
            InstallFrom::Stage => self.stage.as_ref(),
            InstallFrom::Driver => None,
        };
        let max = slots.map_or(usize::MAX, |s| s.contiguous(i, usize::MAX));
        let follows = |a: usize, b: usize| match (self.pages[a].copy_from, self.pages[b].copy_from) {
            (Some(x), Some(y)) => {
                let ((ma, oa), (mb, ob)) = (self.copy_srcs[x as usize], self.copy_srcs[y as usize]);
                ma == mb && ob == oa + PAGE_SIZE
            }
            _ => false,
        };
        let mut n = 1;
        while n < installs.len()
            && n < max
            && installs[n] == (i + n, from)
            && self.pages[i + n].region == self.pages[i].region
            && self.pages[i + n].idx == self.pages[i].idx + n
            && (from != InstallFrom::Driver || follows(i + n - 1, i + n))
        {
            n += 1;
        }
        let idx = self.pages[i].idx;
        match self.region_of(i).prot_runs(idx..idx + n).first() {
            Some((r, _)) => r.len(),
            None => n,
        }
    }

    /// Maps pages `i..i + n` from staging or the pool slots that hold them:
    /// moves when it can, copies where the region is read-only. Returns how
    /// many (from `i`) it mapped.
    fn install_moved(&self, i: usize, n: usize, from: InstallFrom) -> usize {
        let Some(slots) = (if from == InstallFrom::Pool { self.pool.as_ref() } else { self.stage.as_ref() }) else {
            tracing::error!("install without staging slots");
            return 0;
        };
        let dst = self.region_of(i).addr_of(self.pages[i].idx);
        let len = n * PAGE_SIZE;
        let mut done = 0;
        for attempt in 0..100u32 {
            let (at, off, rest) = (dst + done, slots.offset(i) + done, len - done);
            let e = match self.space.uffd.move_pages(at, slots.mapping(), off, rest, true, true) {
                Ok(_) => return n,
                Err(e) => e,
            };
            done += e.done;
            if e.errno == Errno::INVAL || e.errno == Errno::BUSY {
                // Read-only region (or an unmovable page): copy instead.
                match self.copy_present(slots.addr(i) + done, dst + done, len - done) {
                    Ok(()) => return n,
                    Err(err) => tracing::error!(%err, "copying pages back failed; retrying"),
                }
            } else if e.errno == Errno::EXIST {
                // The page is there: the kernel can move pages and still
                // answer EEXIST (see unmap_system_into); nothing else fills
                // a locked entry. The page tables tell how many moved.
                tracing::debug!(addr = dst + done, "EEXIST mapping a page back; the page is in place");
                let anyway = moved_anyway(&self.space.pagemap_file, slots.addr(i) + done, dst + done, len - done);
                done += anyway.max(PAGE_SIZE);
            }
            if done >= len {
                return n;
            }
            std::thread::sleep(std::time::Duration::from_micros(10 << attempt.min(10)));
        }
        done / PAGE_SIZE
    }

    /// Maps the whole aligned block of a huge-page region starting at page
    /// `i` from driver memory at once: a kept staging batch (a huge page
    /// when a huge page was migrated out of it), or else a huge pool page,
    /// filled and moved in. Returns the pages mapped (all, or none when the
    /// driver memory could fault or no page can be had: the caller copies
    /// them).
    fn install_huge_copied(&self, i: usize) -> usize {
        let (mapping, off) = self.copy_src(i);
        if !mapping.always_readable() {
            return 0;
        }
        let slots = match self.space.stage.take_kept(1) {
            Some(kept) => {
                Stats::add(&self.space.stats.kept_copied_pages, crate::BATCH_PAGES as u64);
                kept
            }
            None => {
                // A fresh huge page from the pool, when the kernel has one.
                let Ok(slots) = self.space.huge_pool.alloc(crate::BATCH_PAGES) else {
                    return 0;
                };
                slots.populate(0..crate::BATCH_PAGES);
                slots
            }
        };
        let dst = self.region_of(i).addr_of(self.pages[i].idx);
        if let Err(err) = mapping.copy_to(off, slots.mapping(), slots.offset(0), crate::HUGE_SIZE) {
            tracing::warn!(%err, "filling a huge pool page failed; copying small pages");
            return 0;
        }
        match self.space.uffd.move_pages(dst, slots.mapping(), slots.offset(0), crate::HUGE_SIZE, false, true) {
            Ok(_) => crate::BATCH_PAGES,
            Err(e) => {
                let slot = slots.addr(0) + e.done;
                let anyway = moved_anyway(&self.space.pagemap_file, slot, dst + e.done, crate::HUGE_SIZE - e.done);
                (e.done + anyway) / PAGE_SIZE
            }
        }
    }
}

/// Marks the batches of a big migration's staging whose every slot holds a
/// page that moved to a device (and so is present and no longer needed) to
/// be kept for copies back to RAM (see `staging`).
fn keep_moved_to_device(space: &SpaceInner, pages: &[Page], stage: &mut Slots) {
    let moved = |p: &Page| p.migrated && p.src == Src::System && matches!(p.dst, MigrateDst::Device(_));
    // Less than a batch, all of it moved: its pages fill the batch's first
    // slots, kept for a small copy back.
    if pages.len() < crate::BATCH_PAGES {
        if pages.len() >= PIECE_PAGES && pages.iter().all(moved) {
            let (start, stop) = (stage.addr(0), stage.addr(0) + pages.len() * PAGE_SIZE);
            if space
                .scan(start, stop, Query::none_of(category::PRESENT | category::SWAPPED))
                .is_ok_and(|h| h.is_empty())
            {
                stage.keep_prefix(pages.len());
            }
        }
        return;
    }
    let full: Vec<usize> = (pages.chunks_exact(crate::BATCH_PAGES).enumerate())
        .filter(|(_, batch)| batch.iter().all(moved))
        .map(|(b, _)| b * crate::BATCH_PAGES)
        .collect();
    let (Some(&lo), Some(&hi)) = (full.first(), full.last()) else { return };
    // Make sure, with one scan per contiguous piece of the staging: a write
    // to an empty stage slot would fault on uhmm's own userfaultfd.
    let end = hi + crate::BATCH_PAGES;
    let mut i = lo;
    while i < end {
        let n = stage.contiguous(i, end - i);
        let (start, stop) = (stage.addr(i), stage.addr(i) + n * PAGE_SIZE);
        if let Ok(holes) = space.scan(start, stop, Query::none_of(category::PRESENT | category::SWAPPED)) {
            for &first in full.iter().filter(|&&f| f >= i && f < i + n) {
                let (a, b) = (stage.addr(first), stage.addr(first) + crate::HUGE_SIZE);
                if !holes.iter().any(|h| h.start < b && a < h.end) {
                    stage.keep_batch_of(first);
                }
            }
        }
        i += n;
    }
}

impl Inner {
    /// `UFFDIO_COPY` of the present pages of `src..src + len` (staging) to
    /// `dst`; staging holes are left as holes (copying from one would fault
    /// on uhmm's own userfaultfd). Each present run goes through
    /// [`copy_in`], which keeps going past a page already there (`EEXIST`:
    /// an earlier attempt's) and after a copy cut short.
    fn copy_present(&self, src: usize, dst: usize, len: usize) -> Result<()> {
        for r in self.space.scan(src, src + len, Query::any_of(category::PRESENT | category::SWAPPED))? {
            let run = CopyRun { dst: dst + (r.start - src), src: r.start, len: r.end - r.start, via: None };
            if copy_in(&self.space.uffd, run) < run.len {
                return Err(Error::new(ErrorKind::Busy, "UFFDIO_COPY of staged pages cut short"));
            }
        }
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.finished {
            for p in &mut self.pages {
                p.migrated = false;
            }
            self.finish();
        }
    }
}

/// Evicts device pages `pfns` of `pagemap` back to RAM, wherever they are
/// mapped (`migrate_device_range`): returns a migration whose sources are
/// the device pages that are mapped; the driver fills
/// [`Migration::system_dst`] for each and commits as usual. Pages that are
/// not mapped are skipped.
pub fn migrate_device_range(
    space: &AddressSpace,
    pagemap: &DevicePagemap,
    pfns: Range<u64>,
) -> Result<Migration<Collected>> {
    if pfns.end > pagemap.npages() || pfns.is_empty() {
        return Err(Error::invalid("device page range outside the pagemap"));
    }
    let space = &space.inner;
    space.check_usable()?;
    if !space.pagemap(pagemap.id()).is_some_and(|p| std::ptr::eq(&*p, pagemap)) {
        return Err(Error::invalid("the pagemap belongs to another address space"));
    }
    let in_flight = InFlight::enter();
    let mut regions: Few<Arc<RegionInner>> = Few::new();
    let mut pages = Few::new();
    for pfn in pfns {
        let pfn = DevicePfn(pfn);
        let Some((region_id, idx)) = pagemap.rmap(pfn) else {
            continue;
        };
        let region = match regions.iter().position(|r| r.id == region_id) {
            Some(k) => k,
            None => match space.region_by_id(region_id) {
                Some(r) => {
                    regions.push(r);
                    regions.len() - 1
                }
                None => continue,
            },
        };
        let page = DevicePage { pagemap: pagemap.id(), pfn };
        let r = &regions[region];
        // Best effort, as the kernel's trylock_page: waiting here while
        // holding other pages' locks could deadlock against an access that
        // locks in address order. A skipped page is the caller's to retry.
        if !r.pt.try_lock_if(idx, State::Device(page)) {
            continue;
        }
        let state = State::Device(page);
        let addr = r.addr_of(idx);
        drop(space.notifiers.invalidate(addr..addr + PAGE_SIZE, InvalidateEvent::Migrate { owner: pagemap.owner() }));
        pages.push(Page {
            region: u32::try_from(region).expect("few regions"),
            idx,
            src: Src::Device(page),
            prior: state,
            dst: MigrateDst::None,
            copy_from: None,
            migrated: false,
        });
    }
    let mut inner = Inner::new(space.clone(), regions, 0, in_flight);
    inner.pages = pages;
    // Coherent device pages are mapped: move them to staging, where the
    // driver reads them (`src_page`) and from where a restore puts them back.
    let mapped: Vec<usize> = (0..inner.pages.len())
        .filter(|&k| matches!(inner.pages[k].src, Src::Device(d) if space.is_coherent(&d)))
        .collect();
    if !mapped.is_empty() {
        let stage = space.stage.alloc(inner.pages.len())?;
        for k in mapped {
            let p = inner.pages[k];
            let from = &inner.regions[p.region as usize].map;
            let moved = space.uffd.move_pages(stage.addr(k), from, p.idx * PAGE_SIZE, PAGE_SIZE, false, true);
            // An error does not prove the page stayed (see unmap_system_into).
            if moved.is_err() && space.is_present(inner.regions[p.region as usize].addr_of(p.idx))? {
                inner.unlock_skip(k);
            }
        }
        inner.stage = Some(stage);
    }
    inner.cpages = inner.pages.iter().filter(|p| p.src != Src::Skip).count();
    Ok(Migration { inner, _step: PhantomData })
}

/// The driver's part of a chunked migration: the two callbacks of the
/// kernel's original `migrate_vma(ops, ...)`.
pub trait ChunkDriver {
    /// Allocate destinations for the collected pages, copy (waiting for the
    /// copy's fence) and set each destination.
    fn alloc_and_copy(&mut self, m: &mut Migration<Collected>) -> Result<()>;

    /// After `pages`, before `finalize`: update the device's page table for
    /// the pages that moved, while they are still locked.
    fn finalize_and_map(&mut self, m: &Migration<Migrated>) {
        let _ = m;
    }
}

/// A driver whose copies run asynchronously (a DMA engine with fences), so
/// that [`migrate_pipelined`] can overlap them with uhmm's own work: while
/// the engine copies one chunk, uhmm sets up the next and finalizes the one
/// before.
pub trait PipelinedDriver {
    /// A copy in flight: the driver's fence and what it needs to set the
    /// destinations once the copy is done. Dropping it must wait for the
    /// copy (the pages it reads and writes are about to be reused).
    type Pending;

    /// Allocate destinations for the collected pages of `m` and start
    /// copying; do not set destinations yet. On error nothing may be left
    /// copying.
    fn alloc_and_submit(&mut self, m: &mut Migration<Collected>) -> Result<Self::Pending>;

    /// Wait for `pending`'s copy and set the destinations of the pages it
    /// copied (none if the copy failed: the pages stay where they were).
    fn wait_and_set(&mut self, m: &mut Migration<Collected>, pending: Self::Pending) -> Result<()>;

    /// After `pages`, before `finalize`: update the device's page table for
    /// the pages that moved, while they are still locked.
    fn finalize_and_map(&mut self, m: &Migration<Migrated>) {
        let _ = m;
    }

    /// Whether `pending`'s copy is done already (nothing was queued, or the
    /// fence has signalled). Then [`migrate_pipelined`] starts finalizing
    /// that chunk before it ends the chunk before and sets up the next, so
    /// the copy helper works on the chunk's copies into RAM meanwhile. The
    /// default, `false`, sets up and submits the next chunk first, so the
    /// driver's engine always has a chunk queued.
    fn ready(&self, pending: &Self::Pending) -> bool {
        let _ = pending;
        false
    }
}

/// Drives the three steps over `range` in chunks of `chunk_pages` pages
/// (like nouveau's migration loop): for each chunk `setup`, the driver's
/// `alloc_and_copy`, `pages`, the driver's `finalize_and_map`, `finalize`.
/// In a range of three chunks or more, where half a chunk is whole 2 MiB
/// blocks, the first and the last chunk are half as large. Stops at the
/// first error; chunks already done stay migrated.
pub fn migrate_chunked(
    space: &AddressSpace,
    range: Range<usize>,
    chunk_pages: usize,
    select: Select,
    owner: Owner,
    driver: &mut impl ChunkDriver,
) -> Result<MigrateSummary> {
    /// A synchronous driver is a pipelined one whose copies are done when
    /// they are submitted.
    struct Sync<'a, D>(&'a mut D);
    impl<D: ChunkDriver> PipelinedDriver for Sync<'_, D> {
        type Pending = ();
        fn alloc_and_submit(&mut self, m: &mut Migration<Collected>) -> Result<()> {
            self.0.alloc_and_copy(m)
        }
        fn wait_and_set(&mut self, _: &mut Migration<Collected>, (): ()) -> Result<()> {
            Ok(())
        }
        fn finalize_and_map(&mut self, m: &Migration<Migrated>) {
            self.0.finalize_and_map(m);
        }
        fn ready(&self, (): &()) -> bool {
            true
        }
    }
    migrate_pipelined(space, range, chunk_pages, select, owner, &mut Sync(driver))
}

/// [`migrate_chunked`] with the copies of one chunk overlapping the setup of
/// the next and the finalize of the one before: two chunks are in flight at
/// a time, each holding its own pages. Its chunks are those of
/// [`migrate_chunked`] (the half-size first and last let the pipeline fill
/// and drain sooner). Stops at the first error: chunks before it stay
/// migrated, the chunk in flight beside it is restored once its copy has
/// finished.
pub fn migrate_pipelined<D: PipelinedDriver>(
    space: &AddressSpace,
    range: Range<usize>,
    chunk_pages: usize,
    select: Select,
    owner: Owner,
    driver: &mut D,
) -> Result<MigrateSummary> {
    if chunk_pages == 0 {
        return Err(Error::invalid("chunk_pages must be > 0"));
    }
    let start = range.start & !(PAGE_SIZE - 1);
    let end = range.end & !(PAGE_SIZE - 1);
    if end <= start {
        return Err(Error::invalid("empty range"));
    }
    /// Commits a chunk whose copy was submitted and starts its finalize.
    fn begin<D: PipelinedDriver>(
        driver: &mut D,
        (mut m, pending): (Migration<Collected>, D::Pending),
    ) -> Result<Finalizing> {
        driver.wait_and_set(&mut m, pending)?;
        let m = m.pages();
        driver.finalize_and_map(&m);
        Ok(m.finalize_begin())
    }
    let mut total = MigrateSummary::default();
    // A chunk submitted, and the chunk before it, finalizing.
    let mut in_flight: Option<(Migration<Collected>, D::Pending)> = None;
    let mut finishing: Option<Finalizing> = None;
    let end_of = |f: Option<Finalizing>| f.map_or_else(MigrateSummary::default, Finalizing::end);
    let mut at = start;
    while at < end {
        let next = end.min(at.saturating_add(
            chunk_len(chunk_pages, at == start, (end - at) / PAGE_SIZE, (end - start) / PAGE_SIZE) * PAGE_SIZE,
        ));
        // The chunk in flight, when its copy is done, starts finalizing
        // before the one before it ends, so the copy helper always has
        // copies into RAM to work on; they overlap this chunk's setup too.
        match in_flight.take() {
            Some(chunk) if driver.ready(&chunk.1) => {
                let begun = begin(driver, chunk)?;
                total += end_of(finishing.replace(begun));
            }
            other => {
                in_flight = other;
                total += end_of(finishing.take());
            }
        }
        let submitted = Migration::setup(space, at..next, select, owner).and_then(|mut m| {
            let pending = driver.alloc_and_submit(&mut m)?;
            Ok((m, pending))
        });
        // A chunk whose copy was not done before finalizes now.
        if let Some(chunk) = in_flight.take() {
            match begin(driver, chunk) {
                Ok(begun) => finishing = Some(begun),
                Err(e) => {
                    // Abandon this chunk: its copy finishes (dropping the
                    // pending copy waits for it), then its pages are restored.
                    if let Ok((m, pending)) = submitted {
                        drop(pending);
                        drop(m);
                    }
                    return Err(e);
                }
            }
        }
        in_flight = Some(submitted?);
        at = next;
    }
    // The last chunk begins before the one before it ends; the caller
    // empties half its staging itself, since it waits for that anyway.
    let last = in_flight.map(|chunk| begin(driver, chunk)).transpose()?;
    total += end_of(finishing);
    total += last.map_or_else(MigrateSummary::default, Finalizing::end_releasing_here);
    // Return with the RAM that moved away freed, not still being freed.
    space.inner.stage.wait_released();
    space.inner.pool.wait_released();
    Ok(total)
}

/// Pages in the next chunk of a pipelined migration of `total` pages in
/// chunks of `chunk`, `remaining` of them still to set up (`first`: none
/// set up yet). In a migration of three chunks or more, the first chunk is
/// half as large, so the copies start sooner, and so is the last, so less
/// is left to finalize after the last copy: the pipeline fills and drains
/// in half the time (32 MiB in chunks of 8 MiB: 3–20% less a page here).
/// Only where a half chunk is whole 2 MiB blocks, which then stay whole.
fn chunk_len(chunk: usize, first: bool, remaining: usize, total: usize) -> usize {
    let half = chunk / 2;
    if total < 3 * chunk || half == 0 || !half.is_multiple_of(crate::BATCH_PAGES) {
        chunk
    } else if first {
        half
    } else if remaining > half && remaining <= chunk + half {
        // Leave half a chunk (and any partial block) for the last.
        match (remaining - half) / crate::BATCH_PAGES * crate::BATCH_PAGES {
            0 => chunk,
            n => n,
        }
    } else {
        chunk
    }
}

/// The index into a setup migration of the page at `addr`.
fn first_index(region: &RegionInner, first: usize, addr: usize) -> usize {
    (addr - region.start()) / PAGE_SIZE - first
}

/// Splits sorted indices into runs of consecutive values.
fn runs(sorted: &[usize]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for &i in sorted {
        match out.last_mut() {
            Some(r) if r.end == i => r.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelined_chunks_ramp_up_and_down_by_half_a_chunk() {
        // The chunks of a migration of `total` pages in chunks of `chunk`.
        let chunks = |chunk: usize, total: usize| {
            let (mut out, mut done) = (Vec::new(), 0);
            while done < total {
                let n = chunk_len(chunk, done == 0, total - done, total).min(total - done);
                out.push(n);
                done += n;
            }
            out
        };
        assert_eq!(chunks(2048, 8192), [1024, 2048, 2048, 2048, 1024]);
        assert_eq!(chunks(2048, 6144), [1024, 2048, 2048, 1024]);
        assert_eq!(chunks(2048, 7000), [1024, 2048, 2048, 512, 1368], "chunks end on 2 MiB blocks");
        assert_eq!(chunks(2048, 4096), [2048, 2048], "two chunks: no ramp");
        assert_eq!(chunks(512, 4096), [512; 8], "a half chunk would split a 2 MiB block");
        assert_eq!(chunks(16, 100), [16, 16, 16, 16, 16, 16, 4]);
    }

    #[test]
    fn runs_split_on_gaps() {
        assert_eq!(runs(&[1, 2, 3, 5, 6, 9]), vec![1..4, 5..7, 9..10]);
        assert!(runs(&[]).is_empty());
    }
}
