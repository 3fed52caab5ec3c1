//! [`StoreDevice`]: the driver of every store-backed tier. Its device pages
//! are names for pages a [`PageStore`] holds; moving pages to it hands them
//! to the store (on a worker thread, while the next chunk is set up), and a
//! CPU fault asks the store for the fault's window, filled straight into
//! the RAM pages that are mapped.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use uhmm::{
    AddressSpace, BATCH_PAGES, ChunkDriver, Collected, CpuFault, DevicePagemap, DevicePagemapOps, DevicePfn, Error,
    MigrateMode, MigratePagesOutcome, MigrateReason, MigrateSrc, Migrated, Migration, Owner, PAGE_SIZE,
    PipelinedDriver, Prot, Result, Select, SystemPage, migrate_chunked, migrate_device_range, migrate_pages,
    migrate_pipelined,
};

use super::{Got, PageStore, RunIn, RunOut, StoreUsage};

/// Settings of a [`StoreDevice`].
#[derive(Debug, Clone)]
pub struct StoreDeviceConfig {
    /// The most pages the device can hold (its device page numbers).
    /// Default: 2^28 (1 TiB of pages).
    pub max_pages: u64,
    /// Pages per migration chunk: the batch handed to the store at once.
    /// Default: 512 (2 MiB).
    pub migrate_chunk_pages: usize,
}

impl Default for StoreDeviceConfig {
    fn default() -> Self {
        StoreDeviceConfig { max_pages: 1 << 28, migrate_chunk_pages: BATCH_PAGES }
    }
}

/// A chunk smaller than this is handed to the store on the calling thread:
/// a worker's wake-up costs more than it overlaps.
const INLINE_PAGES: usize = 64;

/// What a migration to a [`StoreDevice`] did with the pages of its range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// Pages now in the store.
    pub moved: usize,
    /// Pages never touched (holes): they stay holes, which costs nothing.
    pub holes: usize,
    /// Pages locked by someone else for the moment (left in RAM).
    pub busy: usize,
    /// Pinned pages (left in RAM).
    pub pinned: usize,
    /// Pages the store did not take (full, or failed): left in RAM.
    pub not_stored: usize,
}

/// The device's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    /// CPU faults on its pages (`migrate_to_ram` calls).
    pub faults: u64,
    /// Pages moved to the store (demotions).
    pub demoted: u64,
    /// Pages brought back to RAM (promotions), by faults or explicitly.
    pub promoted: u64,
    /// Pages brought back as lost (their data failed its check): poisoned.
    pub lost: u64,
}

/// A device whose memory is a [`PageStore`].
///
/// ```
/// use std::sync::Arc;
/// use uhmm::{AddressSpace, Config, PAGE_SIZE, Prot};
/// use uhmm_devices::compress::{CompressConfig, CompressStore};
/// use uhmm_devices::store::{StoreDevice, StoreDeviceConfig};
///
/// # fn main() -> uhmm::Result<()> {
/// let space = AddressSpace::new(Config::default())?;
/// let store = Arc::new(CompressStore::new(CompressConfig::default())?);
/// let dev = StoreDevice::new(&space, store.clone(), StoreDeviceConfig::default())?;
///
/// let region = space.map(64 * PAGE_SIZE, Prot::READ_WRITE)?;
/// region.write(0, &b"compress me ".repeat(64 * PAGE_SIZE / 12))?;
/// let moved = dev.migrate_to_device(region.addr(), region.npages())?;
/// assert_eq!(moved.moved, 64);
/// assert!(store.stats().compr_data_size < 64 * PAGE_SIZE as u64 / 10);
///
/// // A CPU access decompresses the page (and its window) back.
/// let mut buf = [0; 12];
/// region.read(0, &mut buf)?;
/// assert_eq!(&buf, b"compress me ");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct StoreDevice {
    inner: Arc<DevInner>,
}

#[derive(Debug)]
struct DevInner {
    space: AddressSpace,
    owner: Owner,
    store: Arc<dyn PageStore>,
    config: StoreDeviceConfig,
    pagemap: OnceLock<Arc<DevicePagemap>>,
    pfns: Mutex<Pfns>,
    faults: AtomicU64,
    demoted: AtomicU64,
    promoted: AtomicU64,
    lost: AtomicU64,
}

/// The device page allocator: numbers handed out and given back.
#[derive(Debug, Default)]
struct Pfns {
    free: Vec<u64>,
    next: u64,
}

impl StoreDevice {
    /// Creates a device in `space` over `store`.
    pub fn new(space: &AddressSpace, store: Arc<dyn PageStore>, config: StoreDeviceConfig) -> Result<StoreDevice> {
        if config.migrate_chunk_pages == 0 || config.max_pages == 0 {
            return Err(Error::invalid("StoreDeviceConfig: migrate_chunk_pages and max_pages must be > 0"));
        }
        let inner = Arc::new(DevInner {
            space: space.clone(),
            owner: Owner::new(),
            store,
            config,
            pagemap: OnceLock::new(),
            pfns: Mutex::default(),
            faults: AtomicU64::new(0),
            demoted: AtomicU64::new(0),
            promoted: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        });
        let weak: Weak<dyn DevicePagemapOps> = Arc::downgrade(&inner) as Weak<DevInner>;
        let pm = space.register_pagemap(weak, inner.owner, inner.config.max_pages)?;
        inner.pagemap.set(pm).expect("pagemap set once");
        Ok(StoreDevice { inner })
    }

    /// This device's owner token.
    pub fn owner(&self) -> Owner {
        self.inner.owner
    }

    /// This device's pagemap.
    pub fn pagemap(&self) -> &Arc<DevicePagemap> {
        self.inner.pagemap()
    }

    /// The store behind it.
    pub fn store(&self) -> &Arc<dyn PageStore> {
        &self.inner.store
    }

    /// Device pages in use: pages in the store that some address maps.
    pub fn pages_in_use(&self) -> usize {
        let pfns = self.inner.pfns.lock().unwrap_or_else(|e| e.into_inner());
        (pfns.next as usize) - pfns.free.len()
    }

    /// The device's counters.
    pub fn counters(&self) -> DeviceCounters {
        let d = &self.inner;
        DeviceCounters {
            faults: d.faults.load(Ordering::Relaxed),
            demoted: d.demoted.load(Ordering::Relaxed),
            promoted: d.promoted.load(Ordering::Relaxed),
            lost: d.lost.load(Ordering::Relaxed),
        }
    }

    /// What the store holds.
    pub fn usage(&self) -> StoreUsage {
        self.inner.store.usage()
    }

    /// Moves the RAM pages of `npages` pages at `addr` to the store, a
    /// chunk at a time (the store encodes one chunk on a worker while the
    /// next is set up). Pages left in RAM are counted by reason; holes stay
    /// holes. A range without read access is an invalid argument.
    pub fn migrate_to_device(&self, addr: usize, npages: usize) -> Result<Moved> {
        let range = crate::range::pages_at(addr, npages)?;
        if self.inner.space.protection(range.clone())?.iter().any(|(_, p)| !p.contains(Prot::READ)) {
            return Err(Error::invalid("no read access to part of the range"));
        }
        let mut driver = ToStore { dev: &self.inner, holes: 0 };
        let chunk = self.inner.config.migrate_chunk_pages;
        let s = migrate_pipelined(&self.inner.space, range, chunk, Select::SYSTEM, self.inner.owner, &mut driver)?;
        self.inner.demoted.fetch_add(s.migrated as u64, Ordering::Relaxed);
        Ok(Moved {
            moved: s.migrated,
            holes: driver.holes,
            busy: s.busy,
            pinned: s.pinned,
            not_stored: s.not_moved().saturating_sub(driver.holes),
        })
    }

    /// Brings this device's pages among `npages` pages at `addr` back to
    /// RAM. Returns the pages brought back (a page busy for the moment
    /// stays, for a later call or a CPU access).
    pub fn migrate_to_system(&self, addr: usize, npages: usize) -> Result<usize> {
        let range = crate::range::pages_at(addr, npages)?;
        let chunk = self.inner.config.migrate_chunk_pages;
        let s = migrate_chunked(
            &self.inner.space,
            range,
            chunk,
            Select::DEVICE_PRIVATE,
            self.inner.owner,
            &mut FromStore(&self.inner),
        )?;
        Ok(s.migrated)
    }

    /// Moves the listed RAM pages (page addresses, in any order) to the
    /// store with [`migrate_pages`], for `reason`: what a policy's reclaim
    /// uses on the pages it found cold. Pages the store does not take stay
    /// in RAM ([`NotMoved::NoDestination`](uhmm::NotMoved::NoDestination)).
    pub fn demote(&self, pages: &[usize], mode: MigrateMode, reason: MigrateReason) -> Result<MigratePagesOutcome> {
        let d = &self.inner;
        let out = migrate_pages(&d.space, pages, Select::SYSTEM, d.owner, mode, reason, |m| {
            let pending = d.submit(m);
            d.set(m, pending)
        })?;
        d.demoted.fetch_add(out.moved.len() as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// Brings the listed pages of this device back to RAM with
    /// [`migrate_pages`] (a promotion ahead of the faults that would bring
    /// them back one window at a time).
    pub fn promote(&self, pages: &[usize], mode: MigrateMode) -> Result<MigratePagesOutcome> {
        let d = &self.inner;
        let out =
            migrate_pages(&d.space, pages, Select::DEVICE_PRIVATE, d.owner, mode, MigrateReason::Promotion, |m| {
                d.fill(m)
            })?;
        d.promoted.fetch_add(out.moved.len() as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// Brings every page of this device back to RAM
    /// (`migrate_device_range`). Returns the pages brought back.
    pub fn release(&self) -> Result<usize> {
        self.inner.release()
    }
}

impl Drop for StoreDevice {
    fn drop(&mut self) {
        if self.inner.space.is_orphaned() {
            // A forked child's copy: its pages go with the child.
            return;
        }
        let inner = &self.inner;
        crate::teardown::release_and_unregister(&inner.space, inner.pagemap(), || inner.release(), "store device");
    }
}

impl DevInner {
    fn pagemap(&self) -> &Arc<DevicePagemap> {
        self.pagemap.get().expect("pagemap registered at creation")
    }

    fn alloc_pfn(&self, pfns: &mut Pfns) -> Option<u64> {
        if let Some(pfn) = pfns.free.pop() {
            return Some(pfn);
        }
        (pfns.next < self.config.max_pages).then(|| {
            pfns.next += 1;
            pfns.next - 1
        })
    }

    fn free_pfns(&self, pfns: impl IntoIterator<Item = u64>) {
        self.pfns.lock().unwrap_or_else(|e| e.into_inner()).free.extend(pfns);
    }

    /// Gives device pages to the RAM pages among the sources of `m` and
    /// starts storing them: on the calling thread for a small chunk, else
    /// on a worker.
    fn submit(&self, m: &mut Migration<Collected>) -> Pending<'_> {
        let mut pending = Pending { dev: self, dsts: Vec::new(), result: None, holes: 0 };
        let mut runs: Vec<(u64, Vec<u64>, Vec<SystemPage>)> = Vec::new();
        {
            let mut pfns = self.pfns.lock().unwrap_or_else(|e| e.into_inner());
            for i in 0..m.npages() {
                let sp = match m.src(i) {
                    MigrateSrc::System(sp) => sp,
                    MigrateSrc::Hole => {
                        pending.holes += 1;
                        continue;
                    }
                    _ => continue,
                };
                let (Some(addr), Some(pfn)) = (m.addr(i), self.alloc_pfn(&mut pfns)) else { break };
                pending.dsts.push((i, pfn));
                let vpn = (addr / PAGE_SIZE) as u64;
                match runs.last_mut() {
                    Some((first, keys, pages)) if *first + keys.len() as u64 == vpn => {
                        keys.push(pfn);
                        pages.push(sp);
                    }
                    _ => runs.push((vpn, vec![pfn], vec![sp])),
                }
            }
        }
        if pending.dsts.is_empty() {
            return pending;
        }
        let store = self.store.clone();
        let job = move || -> Result<Vec<bool>> {
            let total: usize = runs.iter().map(|r| r.1.len()).sum();
            let mut buf = vec![0u8; total * PAGE_SIZE];
            let mut at = 0;
            for (_, _, pages) in &runs {
                for sp in pages {
                    sp.read(0, &mut buf[at..at + PAGE_SIZE])?;
                    at += PAGE_SIZE;
                }
            }
            let mut rest = &buf[..];
            let ins: Vec<RunIn<'_>> = runs
                .iter()
                .map(|(vpn, keys, _)| {
                    let (data, tail) = rest.split_at(keys.len() * PAGE_SIZE);
                    rest = tail;
                    RunIn { vpn: *vpn, keys, data }
                })
                .collect();
            store.put(&ins)
        };
        let (tx, rx) = mpsc::sync_channel(1);
        pending.result = Some(rx);
        if pending.dsts.len() < INLINE_PAGES {
            let _ = tx.send(job());
        } else {
            rayon::spawn(move || {
                let _ = tx.send(job());
            });
        }
        pending
    }

    /// Waits for `pending` and sets the destinations of the pages the store
    /// took; the others stay where they were.
    fn set(&self, m: &mut Migration<Collected>, mut pending: Pending<'_>) -> Result<()> {
        let stored = pending.wait();
        let dsts = std::mem::take(&mut pending.dsts);
        let pm = self.pagemap();
        let mut unused = Vec::new();
        for (k, &(i, pfn)) in dsts.iter().enumerate() {
            if !stored.get(k).copied().unwrap_or(false) {
                unused.push(pfn);
                continue;
            }
            let page = pm.page(DevicePfn(pfn)).ok_or_else(|| Error::invalid("device page out of its pagemap"));
            if let Err(e) = page.and_then(|page| m.set_dst_device(i, page)) {
                // The rest are stored but will not be mapped: give them back.
                let rest: Vec<u64> =
                    dsts[k..].iter().zip(&stored[k..]).filter(|(_, s)| **s).map(|(d, _)| d.1).collect();
                self.store.delete(&rest);
                self.free_pfns(dsts[k..].iter().map(|d| d.1));
                self.free_pfns(unused);
                return Err(e);
            }
        }
        self.free_pfns(unused);
        Ok(())
    }

    /// Fills RAM pages for this device's pages among the sources of `m` from
    /// the store, in place: zero pages as the zero page, lost pages as
    /// poisoned ones. A page the store did not fill stays on the device.
    fn fill(&self, m: &mut Migration<Collected>) -> Result<()> {
        let id = self.pagemap().id();
        let mut idx = Vec::new();
        let mut keys = Vec::new();
        for i in 0..m.npages() {
            if let MigrateSrc::Device(p) = m.src(i)
                && p.pagemap == id
            {
                idx.push(i);
                keys.push(p.pfn.0);
            }
        }
        if idx.is_empty() {
            return Ok(());
        }
        let mut zero = vec![false; keys.len()];
        self.store.zero_pages(&keys, &mut zero);
        // Runs of the pages with data: consecutive in the migration, and
        // within one 512-page piece of its RAM pages.
        let mut runs: Vec<Range<usize>> = Vec::new();
        let mut run_keys: Vec<u64> = Vec::new();
        let mut run_idx: Vec<usize> = Vec::new();
        for (k, &i) in idx.iter().enumerate() {
            if zero[k] {
                m.set_dst_zero(i)?;
                continue;
            }
            match runs.last_mut() {
                Some(r) if r.end == i && !i.is_multiple_of(BATCH_PAGES) => r.end += 1,
                _ => runs.push(i..i + 1),
            }
            run_keys.push(keys[k]);
            run_idx.push(i);
        }
        let mut got = vec![Got::Missing; run_keys.len()];
        if !runs.is_empty() {
            let bufs = m.system_dst_bytes(&runs)?;
            let (mut keys_left, mut got_left) = (&run_keys[..], &mut got[..]);
            let mut outs = Vec::with_capacity(runs.len());
            for (r, data) in runs.iter().zip(bufs) {
                let (k, kt) = keys_left.split_at(r.len());
                let (g, gt) = got_left.split_at_mut(r.len());
                (keys_left, got_left) = (kt, gt);
                outs.push(RunOut { keys: k, data, got: g });
            }
            self.store.get(&mut outs)?;
        }
        let mut lost = 0;
        for (&i, g) in run_idx.iter().zip(&got) {
            match g {
                Got::Filled => m.set_dst_system(i)?,
                Got::Lost => {
                    lost += 1;
                    m.set_dst_error(i)?;
                }
                Got::Missing => {}
            }
        }
        self.lost.fetch_add(lost, Ordering::Relaxed);
        Ok(())
    }

    /// What a fault brings back: the core's window, unless it may be
    /// narrowed (a fault outside a scan): then only the store's unit around
    /// the faulting page (its group, or the page alone), since every page
    /// costs a decode.
    fn window(&self, fault: &CpuFault) -> Range<usize> {
        let window = fault.window();
        if !fault.may_narrow() {
            return window;
        }
        let unit = self.store.fault_pages(fault.page().pfn.0).max(1) * PAGE_SIZE;
        let start = fault.addr() / unit * unit;
        start.max(window.start)..(start + unit).min(window.end)
    }

    /// `fill`, then commit; counts the pages brought back.
    fn bring_back(&self, mut m: Migration<Collected>) -> Result<usize> {
        self.fill(&mut m)?;
        let moved = m.pages().finalize().migrated;
        self.promoted.fetch_add(moved as u64, Ordering::Relaxed);
        Ok(moved)
    }

    fn release(&self) -> Result<usize> {
        let mut total = 0;
        for _round in 0..100 {
            let next = self.pfns.lock().unwrap_or_else(|e| e.into_inner()).next;
            if next == 0 {
                return Ok(total);
            }
            let m = migrate_device_range(&self.space, self.pagemap(), 0..next)?;
            if m.cpages() == 0 {
                return Ok(total);
            }
            total += self.bring_back(m)?;
        }
        Err(Error::new(uhmm::ErrorKind::Busy, "device pages kept coming back during release"))
    }
}

impl DevicePagemapOps for DevInner {
    fn page_free(&self, pfn: DevicePfn) {
        self.pages_free(&[pfn]);
    }

    fn pages_free(&self, pfns: &[DevicePfn]) {
        let keys: Vec<u64> = pfns.iter().map(|p| p.0).collect();
        self.store.delete(&keys);
        self.free_pfns(keys);
    }

    fn migrate_to_ram(&self, fault: &CpuFault) -> Result<()> {
        self.faults.fetch_add(1, Ordering::Relaxed);
        let m = Migration::setup(fault.space(), self.window(fault), Select::DEVICE_PRIVATE, self.owner)?;
        self.bring_back(m).map(drop)
    }

    fn alloc_and_copy(&self, m: &mut Migration<Collected>) -> Result<()> {
        let pending = self.submit(m);
        self.set(m, pending)
    }
}

/// A chunk being stored: its destinations, and the store's answer to come.
/// Dropping it waits for the answer and gives back what was not used.
struct Pending<'a> {
    dev: &'a DevInner,
    /// (migration index, device page) of each page handed to the store.
    dsts: Vec<(usize, u64)>,
    result: Option<mpsc::Receiver<Result<Vec<bool>>>>,
    holes: usize,
}

impl Pending<'_> {
    /// Which pages the store took (none on its error).
    fn wait(&mut self) -> Vec<bool> {
        match self.result.take().map(|rx| rx.recv()) {
            Some(Ok(Ok(stored))) => stored,
            Some(Ok(Err(err))) => {
                tracing::warn!(%err, "the store took no page of a chunk");
                Vec::new()
            }
            Some(Err(_)) => {
                tracing::error!("the store's worker went away");
                Vec::new()
            }
            None => Vec::new(),
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let stored = self.wait();
        if self.dsts.is_empty() {
            return;
        }
        let keys: Vec<u64> = self.dsts.iter().map(|d| d.1).collect();
        let kept: Vec<u64> = keys.iter().zip(&stored).filter(|(_, s)| **s).map(|(k, _)| *k).collect();
        self.dev.store.delete(&kept);
        self.dev.free_pfns(keys);
    }
}

/// Migrations to the store: pipelined, so a worker encodes one chunk while
/// the caller sets up the next and finalizes the one before.
struct ToStore<'a> {
    dev: &'a DevInner,
    holes: usize,
}

impl<'a> PipelinedDriver for ToStore<'a> {
    type Pending = Pending<'a>;

    fn alloc_and_submit(&mut self, m: &mut Migration<Collected>) -> Result<Pending<'a>> {
        let pending = self.dev.submit(m);
        self.holes += pending.holes;
        Ok(pending)
    }

    fn wait_and_set(&mut self, m: &mut Migration<Collected>, pending: Pending<'a>) -> Result<()> {
        self.dev.set(m, pending)
    }

    fn ready(&self, pending: &Pending<'a>) -> bool {
        pending.result.is_none()
    }
}

/// Explicit migrations back to RAM.
struct FromStore<'a>(&'a DevInner);

impl ChunkDriver for FromStore<'_> {
    fn alloc_and_copy(&mut self, m: &mut Migration<Collected>) -> Result<()> {
        self.0.fill(m)
    }

    fn finalize_and_map(&mut self, m: &Migration<Migrated>) {
        let moved = (0..m.npages()).filter(|&i| m.migrated(i)).count();
        self.0.promoted.fetch_add(moved as u64, Ordering::Relaxed);
    }
}
