//! Migration of pages between RAM and devices: the kernel's
//! `migrate_vma_setup` / `migrate_vma_pages` / `migrate_vma_finalize`, the
//! device-range eviction `migrate_device_range`, and a chunked helper.
//!
//! # The protocol
//!
//! Three steps, numbered as the kernel's calls, with the driver's work
//! between the first two:
//!
//! 1. [`Migration::setup`] (`migrate_vma_setup`; `collect.rs`) collects
//!    every page of a range: a hole is a candidate with no source; a RAM
//!    page is a candidate when the selection includes [`Select::SYSTEM`]; a
//!    device page when it includes [`Select::DEVICE_PRIVATE`] *and* its
//!    pagemap has the migration's owner. Candidates are locked best-effort
//!    (a locked page is skipped as [`Skip::Busy`], never waited for), and
//!    RAM candidates are unmapped: moved, without copying, into the staging
//!    area, so any CPU access to them waits. A page the kernel will not move
//!    is skipped as [`Skip::Pinned`].
//! - The driver allocates destination pages for the candidates it wants and
//!   copies (its DMA engine, with a fence it waits on), then sets each
//!   destination (`pages.rs`). Moving device → RAM it must not silently skip
//!   a page: it migrates it or marks it as an error (accessors then get
//!   SIGBUS).
//! 2. [`Migration::pages`] (`migrate_vma_pages`; `pages.rs`) commits: from
//!    now on [`Migration::migrated`] says exactly which pages move, while
//!    sources and destinations are still locked — the moment for the driver
//!    to update its own page table.
//! 3. [`Migration::finalize`] (`migrate_vma_finalize`; `finalize.rs`, with
//!    `install.rs` for mapping pages back) maps each moved page at its new
//!    home, restores the others, unlocks, wakes waiting threads and frees the
//!    sources (`page_free` for device pages). Its [`MigrateSummary`] says how
//!    many pages moved and why the others did not.
//!
//! Around them: `device_range.rs` evicts a device's pages by page number
//! (`migrate_device_range`), `chunked.rs` drives the steps over a large
//! range in chunks, pipelined with the driver's copies. This file holds the
//! migration itself: its types, its per-page lists and what every step
//! shares.
//!
//! The steps are types: `Migration<Collected>` becomes `Migration<Migrated>`
//! and is consumed by `finalize`, so no step can be skipped or reordered.
//! Dropping a migration before `finalize` restores every page — an early `?`
//! or a panic in driver code never leaks a lock or loses data.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

use smallvec::{SmallVec, smallvec};
use uhmm_sys::PAGE_SIZE;
use uhmm_sys::mman::Mapping;

use crate::fault::serving::Serving;
use crate::fork::gate::InFlight;
use crate::mm::{AddressSpace, Mm};
use crate::page::DevicePage;
use crate::pagemap::DevicePagemap;
use crate::pte::State;
use crate::staging::{Slots, SystemPage};
use crate::vma::Vma;
use crate::{Error, Result};

pub(crate) mod chunked;
pub(crate) mod collect;
pub(crate) mod device_range;
pub(crate) mod finalize;
pub(crate) mod install;
pub(crate) mod pages;

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
    /// A page of zeros, mapped without RAM (`UFFDIO_ZEROPAGE`: the shared
    /// zero page, copied on the first write): [`Migration::set_dst_zero`].
    Zero,
    /// The data is lost (`MIGRATE_PFN_ERROR`): accesses get SIGBUS.
    Error,
}

/// What a finished migration did: how many pages moved, and why the
/// others did not (the kernel's `cpages` and the flags of each `src[i]`).
///
/// Of the `npages` pages, `cpages` were collected; of those, `migrated`
/// moved and `not_moved()` had no destination (the driver's memory full, or
/// its choice). The pages not collected were `busy`, `pinned`, or not
/// selected (`not_selected()`: another device's page, a page of another
/// kind than the selection, no access, a mapping that never migrates).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrateSummary {
    /// Pages in the range (`npages`).
    pub npages: usize,
    /// Pages collected as candidates (`cpages`).
    pub cpages: usize,
    /// Pages that moved.
    pub migrated: usize,
    /// Pages skipped because another migration, a fault being resolved or
    /// a device access held them ([`Skip::Busy`]).
    pub busy: usize,
    /// Pages skipped because the kernel would not move them: pinned, or
    /// held by it ([`Skip::Pinned`]).
    pub pinned: usize,
}

impl MigrateSummary {
    /// Collected pages that did not move: the driver set no destination.
    pub fn not_moved(&self) -> usize {
        self.cpages.saturating_sub(self.migrated)
    }

    /// Pages not collected because the migration did not select them
    /// ([`Skip::NotSelected`]).
    pub fn not_selected(&self) -> usize {
        self.npages.saturating_sub(self.cpages + self.busy + self.pinned)
    }
}

impl std::ops::AddAssign for MigrateSummary {
    fn add_assign(&mut self, o: Self) {
        self.npages += o.npages;
        self.cpages += o.cpages;
        self.migrated += o.migrated;
        self.busy += o.busy;
        self.pinned += o.pinned;
    }
}

/// Why page `i` of a migration was not collected
/// ([`Migration::skipped`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Skip {
    /// Not selected: not of the kinds the migration selects, or a device
    /// page of another owner, or no access, or a mapping that never
    /// migrates (shared or file-backed).
    NotSelected,
    /// Locked by another migration, a fault being resolved or a device
    /// access (the kernel's failed `folio_trylock`): try again later.
    Busy,
    /// The kernel would not move it (`-EBUSY`): pinned (`get_user_pages`,
    /// O_DIRECT, a long-term pin) or held for a moment.
    Pinned,
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
    /// Its pool page was lent out by [`Migration::system_dst`]: it may not
    /// be borrowed by [`Migration::system_dst_bytes`] too.
    lent: bool,
    /// [`Migration::system_dst_bytes`] lent it a page of the fault's
    /// scratch, at this index into `Inner::copy_srcs`: `set_dst_system`
    /// copies it in from there.
    scratch_at: Option<u32>,
    migrated: bool,
    /// With `src == Skip`: why.
    skip: Skip,
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
/// usually in chunks through
/// [`migrate_pipelined`](crate::migrate_pipelined) or
/// [`migrate_chunked`](crate::migrate_chunked); a driver's [`migrate_to_ram`](crate::DevicePagemapOps::migrate_to_ram)
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
    space: Arc<Mm>,
    /// The fault this migration serves, when it was set up through a
    /// fault's handle ([`CpuFault::space`]).
    serving: Option<Arc<Serving>>,
    regions: Few<Arc<Vma>>,
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
    /// Holds its fault's scratch pages (see `Serving::take_scratch`).
    scratch: bool,
    finished: bool,
    /// Whether `finish` empties the staging slots on this thread, half of
    /// them beside the copy helper (its caller waits for them anyway),
    /// rather than all on the helper.
    release_here: bool,
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

    /// Why page `i` was not collected; `None` when it was (or past the end).
    pub fn skipped(&self, i: usize) -> Option<Skip> {
        self.inner.pages.get(i).filter(|p| p.src == Src::Skip).map(|p| p.skip)
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

impl Inner {
    fn new(
        space: Arc<Mm>,
        serving: Option<Arc<Serving>>,
        regions: Few<Arc<Vma>>,
        n: usize,
        in_flight: InFlight,
    ) -> Inner {
        let page = Page {
            region: 0,
            idx: 0,
            src: Src::Skip,
            prior: State::Cpu,
            dst: MigrateDst::None,
            copy_from: None,
            lent: false,
            scratch_at: None,
            migrated: false,
            skip: Skip::NotSelected,
        };
        Inner {
            _in_flight: in_flight,
            space,
            serving,
            regions,
            pages: smallvec![page; n],
            stage: None,
            pool: None,
            copy_srcs: Few::new(),
            copy_maps: Few::new(),
            last_pagemap: None,
            cpages: 0,
            scratch: false,
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

    fn region_of(&self, i: usize) -> &Arc<Vma> {
        &self.regions[self.pages[i].region as usize]
    }

    /// Unlocks page `i` unchanged and drops it from the migration, for
    /// reason `why`.
    fn unlock_skip(&mut self, i: usize, why: Skip) {
        let p = self.pages[i];
        let region = &self.regions[p.region as usize];
        self.space.unlock_wake(region, p.idx, p.prior);
        self.pages[i].src = Src::Skip;
        self.pages[i].skip = why;
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

/// A CPU fault on device memory, handed to
/// [`DevicePagemapOps::migrate_to_ram`](crate::DevicePagemapOps::migrate_to_ram)
/// (the kernel's `struct vm_fault`).
#[derive(Debug)]
pub struct CpuFault {
    space: AddressSpace,
    addr: usize,
    window: Range<usize>,
    page: DevicePage,
    may_narrow: bool,
}

impl CpuFault {
    /// A fault whose whole window is wanted back.
    pub(crate) fn new(space: AddressSpace, addr: usize, window: Range<usize>, page: DevicePage) -> CpuFault {
        CpuFault { space, addr, window, page, may_narrow: false }
    }

    /// A CPU fault with the fault engine's window around it, outside a
    /// sequential scan ([`CpuFault::may_narrow`]).
    pub(crate) fn around(space: AddressSpace, addr: usize, window: Range<usize>, page: DevicePage) -> CpuFault {
        CpuFault { space, addr, window, page, may_narrow: true }
    }

    /// Whether the window is only the fault engine's proposal around a CPU
    /// fault that is not part of a sequential scan: a driver whose every
    /// page costs work (a store decoding pages) may bring back less of it,
    /// the page at [`addr`](CpuFault::addr) at least. False when the caller
    /// needs the whole window back: a scan's window, read-ahead, fork,
    /// `range_fault`, `move_pages`.
    pub fn may_narrow(&self) -> bool {
        self.may_narrow
    }

    /// Whether a migration made for the fault woke its page already.
    pub(crate) fn woken(&self) -> bool {
        self.space.serving.as_ref().is_some_and(|s| s.woken())
    }

    /// The address space of the fault.
    pub fn space(&self) -> &AddressSpace {
        &self.space
    }

    /// The faulting page's address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// The fault-around window (page-aligned, inside one region, containing
    /// `addr`): the range a driver should migrate back.
    pub fn window(&self) -> Range<usize> {
        self.window.clone()
    }

    /// The device page the faulting address maps.
    pub fn page(&self) -> DevicePage {
        self.page
    }
}

/// The index into a setup migration of the page at `addr`.
fn first_index(region: &Vma, first: usize, addr: usize) -> usize {
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
    fn runs_split_on_gaps() {
        assert_eq!(runs(&[1, 2, 3, 5, 6, 9]), vec![1..4, 5..7, 9..10]);
        assert!(runs(&[]).is_empty());
    }
}
