//! The CUDA device: GPU memory as uhmm device memory, through the same
//! `DevicePagemapOps` contract as the sim device.
//!
//! The driver ([`CudaDevice`]) is written against [`GpuApi`] (device
//! memory, copies and a kernel on streams, tickets, page-locking): with the
//! `cuda` feature the real GPU over the CUDA driver API
//! (`CudaDevice::open`); in every build [`FakeGpu`], host memory and
//! threads, so that the driver's logic is tested on any machine. Device
//! memory comes from `cuMemAlloc` in 2 MiB chunks (`chunks`); copies pass
//! through page-locked staging (`staging`), a batch being one or a few
//! large copies on one of several streams, pipelined with the next batch's
//! collection (`migrate_pipelined`); a CPU fault on a GPU page brings its
//! fault-around window back (`migrate_to_ram`). [`CudaDevice::add_one`]
//! runs a kernel on the pages where they are, the proof that they are on
//! the GPU; [`CudaDevice::add_one_in_place`] runs it on RAM pages too,
//! where they are, through host memory mapped for the GPU and kept in a
//! mirror (`mirror`). See `docs/gpu.md`.

mod api;
mod chunks;
mod fake;
mod mirror;
#[cfg(feature = "cuda")]
mod real;
mod staging;

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use uhmm::{
    AddressSpace, Collected, CpuFault, DevicePage, DevicePagemap, DevicePagemapOps, DevicePfn, Error, ErrorKind,
    HUGE_SIZE, IntervalNotifierOps, Mapping, MigrateSrc, MigrateSummary, Migrated, Migration, NotifierHandle, Owner,
    PAGE_SIZE, PipelinedDriver, Residency, Result, Select, migrate_device_range, migrate_pipelined,
};

pub use api::{DevPtr, GpuApi, GpuOp, Ticket};
use chunks::Chunks;
pub use fake::{FakeConfig, FakeGpu, FakeStats};
use mirror::HostMaps;
pub use mirror::InPlace;
pub use staging::StagingMode;
use staging::{Stage, Staging};

/// Settings of a CUDA device. Each field's doc gives its default.
#[derive(Debug, Clone)]
pub struct CudaConfig {
    /// GPU memory the device may use, in bytes. Default: 4 GiB.
    pub capacity_bytes: usize,
    /// Bytes per `cuMemAlloc` chunk, a multiple of 2 MiB. Default: 2 MiB.
    pub chunk_bytes: usize,
    /// Pages per migration batch. Default: 2048 (8 MiB).
    pub migrate_chunk_pages: usize,
    /// How copies are staged. Default: [`StagingMode::Ring`].
    pub staging: StagingMode,
    /// Slots of the staging ring (ring mode). Default: 8.
    pub ring_slots: usize,
    /// Bytes per ring slot, a multiple of the page size. Default: 2 MiB.
    pub slot_bytes: usize,
}

impl Default for CudaConfig {
    fn default() -> Self {
        CudaConfig {
            capacity_bytes: 4 << 30,
            chunk_bytes: HUGE_SIZE,
            migrate_chunk_pages: 2048,
            staging: StagingMode::Ring,
            ring_slots: 8,
            slot_bytes: HUGE_SIZE,
        }
    }
}

impl CudaConfig {
    /// Checks the fields; the error names the field at fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::invalid(format!("CudaConfig: {what}")));
        if self.chunk_bytes == 0 || !self.chunk_bytes.is_multiple_of(HUGE_SIZE) {
            return bad("chunk_bytes must be a non-zero multiple of 2 MiB");
        }
        if self.capacity_bytes < self.chunk_bytes {
            return bad("capacity_bytes must be at least chunk_bytes");
        }
        if self.migrate_chunk_pages == 0 {
            return bad("migrate_chunk_pages must be > 0");
        }
        if self.ring_slots == 0 || self.slot_bytes == 0 || !self.slot_bytes.is_multiple_of(PAGE_SIZE) {
            return bad("ring_slots must be > 0 and slot_bytes a non-zero multiple of the page size");
        }
        Ok(())
    }
}

/// A GPU's memory as a uhmm device (see the module doc).
///
/// ```
/// use std::sync::Arc;
/// use uhmm::{AddressSpace, Config, PAGE_SIZE, Prot};
/// use uhmm_devices::cuda::{CudaConfig, CudaDevice, FakeConfig, FakeGpu};
///
/// # fn main() -> uhmm::Result<()> {
/// let space = AddressSpace::new(Config::default())?;
/// let gpu = Arc::new(FakeGpu::new(FakeConfig::default())?); // CudaDevice::open for a real GPU
/// let dev = CudaDevice::new(&space, gpu, CudaConfig::default())?;
/// let region = space.map(8 * PAGE_SIZE, Prot::READ_WRITE)?;
/// region.write(0, &41u32.to_ne_bytes())?;
/// assert_eq!(dev.migrate_to_device_all(region.addr(), 8)?, 8);
/// assert_eq!(dev.add_one(region.addr(), 8)?, 8); // a kernel on the GPU's pages
/// let mut word = [0; 4];
/// region.read(0, &mut word)?; // a CPU fault brings the page back
/// assert_eq!(u32::from_ne_bytes(word), 42);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct CudaDevice {
    inner: Arc<GpuInner>,
}

#[derive(Debug)]
struct GpuInner {
    space: AddressSpace,
    owner: Owner,
    config: CudaConfig,
    api: Arc<dyn GpuApi>,
    pagemap: OnceLock<Arc<DevicePagemap>>,
    mem: Mutex<Chunks>,
    staging: Staging,
    next_stream: AtomicUsize,
    /// RAM ranges mapped for the GPU (`mirror`), and the notifier that
    /// drops them before their pages change.
    host: Mutex<HostMaps>,
    notifier: OnceLock<NotifierHandle>,
}

impl CudaDevice {
    /// A device in `space` over `api` (a [`FakeGpu`], or the real GPU).
    pub fn new(space: &AddressSpace, api: Arc<dyn GpuApi>, config: CudaConfig) -> Result<CudaDevice> {
        config.validate()?;
        let staging = Staging::new(&*api, config.staging, config.ring_slots, config.slot_bytes)?;
        let inner = Arc::new(GpuInner {
            space: space.clone(),
            owner: Owner::new(),
            mem: Mutex::new(Chunks::new(config.chunk_bytes, config.capacity_bytes / config.chunk_bytes)),
            staging,
            next_stream: AtomicUsize::new(0),
            host: Mutex::new(HostMaps::default()),
            notifier: OnceLock::new(),
            pagemap: OnceLock::new(),
            api,
            config,
        });
        let weak: Weak<dyn DevicePagemapOps> = Arc::downgrade(&inner) as Weak<GpuInner>;
        let npages =
            (inner.config.capacity_bytes / inner.config.chunk_bytes * inner.config.chunk_bytes / PAGE_SIZE) as u64;
        let pm = space.register_pagemap(weak, inner.owner, npages)?;
        inner.pagemap.set(pm).expect("pagemap set once");
        let weak: Weak<dyn IntervalNotifierOps> = Arc::downgrade(&inner) as Weak<GpuInner>;
        let notifier = space.insert_notifier(0..usize::MAX & !(PAGE_SIZE - 1), weak);
        inner.notifier.set(notifier).expect("notifier set once");
        Ok(CudaDevice { inner })
    }

    /// A device on the first NVIDIA GPU, through the CUDA driver
    /// (`libcuda.so`, loaded at run time). Fails with
    /// [`ErrorKind::Unsupported`] when no driver or GPU is found.
    #[cfg(feature = "cuda")]
    pub fn open(space: &AddressSpace, config: CudaConfig) -> Result<CudaDevice> {
        let gpu = real::RealGpu::open(0)?;
        CudaDevice::new(space, Arc::new(gpu), config)
    }

    /// This device's owner token.
    pub fn owner(&self) -> Owner {
        self.inner.owner
    }

    /// This device's pagemap.
    pub fn pagemap(&self) -> &Arc<DevicePagemap> {
        self.inner.pagemap()
    }

    /// The GPU's name.
    pub fn name(&self) -> String {
        self.inner.api.name()
    }

    /// Device pages in use.
    pub fn pages_in_use(&self) -> usize {
        self.inner.mem().in_use()
    }

    /// `cuMemAlloc` chunks held.
    pub fn chunks_held(&self) -> usize {
        self.inner.mem().chunks_held()
    }

    /// Staging buffers free now (ring slots, or registered batch buffers).
    pub fn staging_free(&self) -> usize {
        self.inner.staging.free_buffers()
    }

    /// One pass: migrates the RAM pages and holes of `npages` pages at
    /// `addr` to the GPU, in pipelined batches. Pages left behind (busy,
    /// pinned, device full) are counted in the summary, not an error; a
    /// failed copy restores its batch and is returned (batches before it
    /// stay on the GPU).
    pub fn migrate_to_device(&self, addr: usize, npages: usize) -> Result<MigrateSummary> {
        let range = crate::range::pages_at(addr, npages)?;
        let chunk = batch_pages(self.inner.config.migrate_chunk_pages, npages);
        let mut driver = Batches { dev: &self.inner, to_device: true };
        migrate_pipelined(&self.inner.space, range, chunk, Select::SYSTEM, self.inner.owner, &mut driver)
    }

    /// [`migrate_to_device`](CudaDevice::migrate_to_device), passed again
    /// (up to 5 times, 2 ms apart) while pages were busy; returns the pages
    /// of the range on this device. None at all is an error: `NoMemory`
    /// (device full) or `Busy`.
    pub fn migrate_to_device_all(&self, addr: usize, npages: usize) -> Result<usize> {
        let mut s = self.migrate_to_device(addr, npages)?;
        for _ in 0..5 {
            if s.busy == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
            s = self.migrate_to_device(addr, npages)?;
        }
        let range = crate::range::pages_at(addr, npages)?;
        let own = self.inner.owner;
        let on = (self.inner.space.snapshot(range)?.iter())
            .filter(|p| matches!(p.residency, Residency::Device(_, o) if o == own))
            .count();
        if on == 0 && npages > 0 {
            let kind = if s.not_moved() > 0 { ErrorKind::NoMemory } else { ErrorKind::Busy };
            return Err(Error::new(kind, format!("none of {npages} pages is on the GPU ({s:?})")));
        }
        Ok(on)
    }

    /// Migrates this device's pages among `npages` pages at `addr` back to
    /// RAM; returns the pages migrated. A failed copy leaves its batch on
    /// the GPU and is returned.
    pub fn migrate_to_system(&self, addr: usize, npages: usize) -> Result<usize> {
        let range = crate::range::pages_at(addr, npages)?;
        let chunk = batch_pages(self.inner.config.migrate_chunk_pages, npages);
        let mut driver = Batches { dev: &self.inner, to_device: false };
        let s =
            migrate_pipelined(&self.inner.space, range, chunk, Select::DEVICE_PRIVATE, self.inner.owner, &mut driver)?;
        Ok(s.migrated)
    }

    /// Runs the proof kernel on the GPU: adds 1 to every 32-bit word of
    /// this device's pages among `npages` pages at `addr`, where they are.
    /// The pages are locked meanwhile (collected by a migration that is
    /// then dropped, so they stay on the GPU), so a CPU access waits and
    /// then sees the kernel's writes. Returns the pages updated; pages in
    /// RAM or busy are left alone.
    pub fn add_one(&self, addr: usize, npages: usize) -> Result<usize> {
        let range = crate::range::pages_at(addr, npages)?;
        let step = self.inner.config.migrate_chunk_pages * PAGE_SIZE;
        let mut done = 0;
        let mut at = range.start;
        while at < range.end {
            let piece = at..range.end.min(at + step);
            at = piece.end;
            let m = Migration::setup(&self.inner.space, piece, Select::DEVICE_PRIVATE, self.inner.owner)?;
            let pages = self.inner.own_pages(&m)?;
            let mut ops: Vec<GpuOp> = Vec::new();
            for &(_, ptr) in &pages {
                match ops.last_mut() {
                    Some(GpuOp::AddOne { dst, len }) if *dst + *len as u64 == ptr => *len += PAGE_SIZE,
                    _ => ops.push(GpuOp::AddOne { dst: ptr, len: PAGE_SIZE }),
                }
            }
            if !ops.is_empty() {
                let ticket = self.inner.api.submit(self.inner.stream(), ops)?;
                self.inner.api.wait(ticket)?;
            }
            done += pages.len();
            drop(m); // no destination: every page stays where it is
        }
        Ok(done)
    }

    /// Runs the proof kernel on `npages` pages at `addr` wherever they
    /// are, moving none: pages on this GPU in its memory, RAM pages in
    /// place through host memory mapped for the GPU (faulted in first, for
    /// writing: a hole becomes a page of its own). The maps stay for the
    /// next kernel until a change to their pages drops them (see
    /// `mirror`). Pages of another device come back to RAM first.
    pub fn add_one_in_place(&self, addr: usize, npages: usize) -> Result<InPlace> {
        self.inner.add_one_in_place(crate::range::pages_at(addr, npages)?)
    }

    /// Bytes of RAM mapped for the GPU now (pinned).
    pub fn host_mapped_bytes(&self) -> usize {
        self.inner.host().bytes()
    }

    /// Evicts every page of this device back to RAM
    /// (`migrate_device_range`); returns the pages evicted.
    pub fn release(&self) -> Result<usize> {
        self.inner.release()
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        if self.inner.space.is_orphaned() {
            // A forked child's copy: the GPU context is the parent's.
            std::mem::forget(self.inner.clone());
            return;
        }
        let inner = &self.inner;
        crate::teardown::release_and_unregister(&inner.space, inner.pagemap(), || inner.release(), "CUDA device");
        inner.unmap_all_host();
        self.inner.mem().trim(&*self.inner.api);
        self.inner.staging.clear(&*self.inner.api);
    }
}

impl GpuInner {
    fn pagemap(&self) -> &Arc<DevicePagemap> {
        self.pagemap.get().expect("pagemap registered at creation")
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, Chunks> {
        self.mem.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn host(&self) -> std::sync::MutexGuard<'_, HostMaps> {
        self.host.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn page(&self, pfn: DevicePfn) -> DevicePage {
        self.pagemap().page(pfn).expect("pfn within capacity")
    }

    /// The next stream, round-robin.
    fn stream(&self) -> usize {
        self.next_stream.fetch_add(1, Ordering::Relaxed) % self.api.streams().max(1)
    }

    /// This device's pages among the sources of `m`: index and address.
    fn own_pages<S>(&self, m: &Migration<S>) -> Result<Vec<(usize, DevPtr)>> {
        let mem = self.mem();
        let id = self.pagemap().id();
        let mut pages = Vec::new();
        for i in 0..m.npages() {
            if let MigrateSrc::Device(p) = m.src(i)
                && p.pagemap == id
            {
                pages.push((i, mem.locate(p.pfn).ok_or_else(|| Error::invalid("device page not allocated"))?));
            }
        }
        Ok(pages)
    }

    /// Allocates GPU pages for the RAM pages and holes of `m`, gathers the
    /// RAM pages into staging and queues the copies (holes: zero-filled on
    /// the GPU). Pages past the first failed allocation get no destination.
    fn submit_to_device(&self, m: &mut Migration<Collected>) -> Result<InFlight<'_>> {
        let mut f = InFlight::new(self);
        let mut mem = self.mem();
        for i in 0..m.npages() {
            if !matches!(m.src(i), MigrateSrc::System(_) | MigrateSrc::Hole) {
                continue;
            }
            match mem.alloc_page(&*self.api)? {
                Some(pfn) => f.to_device.push((i, pfn)),
                None => break,
            }
        }
        drop(mem);
        if f.to_device.is_empty() {
            return Ok(f);
        }
        let stage = self.staging.take(&*self.api, f.to_device.len() * PAGE_SIZE)?;
        let mut ops = Vec::new();
        let mem = self.mem();
        for (k, &(i, pfn)) in f.to_device.iter().enumerate() {
            let dst = mem.locate(pfn).ok_or_else(|| Error::invalid("device page not allocated"))?;
            match m.src(i) {
                MigrateSrc::System(page) => {
                    let (buf, off) = stage.at(k * PAGE_SIZE);
                    page.copy_to(buf, off)?;
                    push_copy(&mut ops, &stage, k, dst, true);
                }
                _ => match ops.last_mut() {
                    Some(GpuOp::Zero { dst: d, len }) if *d + *len as u64 == dst => *len += PAGE_SIZE,
                    _ => ops.push(GpuOp::Zero { dst, len: PAGE_SIZE }),
                },
            }
        }
        drop(mem);
        f.ticket = Some(self.api.submit(self.stream(), ops)?);
        f.stage = Some(stage);
        Ok(f)
    }

    /// Queues the copies of `pages` (this device's sources of a migration)
    /// into staging.
    fn submit_to_ram(&self, pages: Vec<(usize, DevPtr)>) -> Result<InFlight<'_>> {
        let mut f = InFlight::new(self);
        if pages.is_empty() {
            return Ok(f);
        }
        let stage = self.staging.take(&*self.api, pages.len() * PAGE_SIZE)?;
        let mut ops = Vec::new();
        for (k, &(_, src)) in pages.iter().enumerate() {
            push_copy(&mut ops, &stage, k, src, false);
        }
        f.to_ram = pages.into_iter().map(|(i, _)| i).collect();
        f.ticket = Some(self.api.submit(self.stream(), ops)?);
        f.stage = Some(stage);
        Ok(f)
    }

    /// Waits for `f`'s copies, then sets the destinations: GPU pages, or
    /// RAM pages filled from staging. A failed copy sets none (the pages
    /// stay where they were).
    fn wait_and_set(&self, m: &mut Migration<Collected>, mut f: InFlight<'_>) -> Result<()> {
        if let Some(t) = f.ticket.take() {
            self.api.wait(t)?;
        }
        let dsts = std::mem::take(&mut f.to_device);
        for (k, &(i, pfn)) in dsts.iter().enumerate() {
            if let Err(e) = m.set_dst_device(i, self.page(pfn)) {
                f.to_device = dsts[k..].to_vec(); // freed when `f` drops
                return Err(e);
            }
        }
        if f.to_ram.is_empty() {
            return Ok(());
        }
        let stage = f.stage.as_ref().expect("a copy to RAM has staging");
        let mut runs: Vec<Range<usize>> = Vec::new();
        for &i in &f.to_ram {
            match runs.last_mut() {
                Some(r) if r.end == i => r.end += 1,
                _ => runs.push(i..i + 1),
            }
        }
        let bufs = m.system_dst_bytes(&runs)?;
        let mut k = 0;
        for bytes in bufs {
            for page in bytes.chunks_exact_mut(PAGE_SIZE) {
                let (buf, off) = stage.at(k * PAGE_SIZE);
                buf.read(off, page).map_err(|e| Error::sys("reading staging", e))?;
                k += 1;
            }
        }
        for &i in &f.to_ram {
            m.set_dst_system(i)?;
        }
        Ok(())
    }

    /// Copies this device's pages among the sources of `m` to RAM, a batch
    /// at a time, and sets their destinations.
    fn copy_to_ram(&self, m: &mut Migration<Collected>) -> Result<()> {
        let pages = self.own_pages(m)?;
        for batch in pages.chunks(self.config.migrate_chunk_pages.max(1)) {
            let f = self.submit_to_ram(batch.to_vec())?;
            self.wait_and_set(m, f)?;
        }
        Ok(())
    }

    fn release(&self) -> Result<usize> {
        let mut total = 0;
        for _round in 0..100 {
            if self.mem().in_use() == 0 {
                return Ok(total);
            }
            let npages = self.pagemap().npages();
            let mut m = migrate_device_range(&self.space, self.pagemap(), 0..npages)?;
            if m.cpages() == 0 {
                return Ok(total);
            }
            self.copy_to_ram(&mut m)?;
            total += m.pages().finalize().migrated;
        }
        Err(Error::new(ErrorKind::Busy, "device pages kept coming back during release"))
    }
}

/// Appends the copy of page `k` of `stage` to or from device address `dev`
/// to `ops`, merged into the last copy where both sides continue it.
fn push_copy(ops: &mut Vec<GpuOp>, stage: &Stage<'_>, k: usize, dev: DevPtr, to_device: bool) {
    let (buf, off) = stage.at(k * PAGE_SIZE);
    let continues = |b: &Arc<Mapping>, o: usize, d: DevPtr, len: usize| {
        Arc::ptr_eq(b, buf) && o + len == off && d + len as u64 == dev
    };
    match ops.last_mut() {
        Some(GpuOp::HtoD { dst, src, off: o, len }) if to_device && continues(src, *o, *dst, *len) => *len += PAGE_SIZE,
        Some(GpuOp::DtoH { dst, off: o, src, len }) if !to_device && continues(dst, *o, *src, *len) => {
            *len += PAGE_SIZE
        }
        _ if to_device => ops.push(GpuOp::HtoD { dst: dev, src: buf.clone(), off, len: PAGE_SIZE }),
        _ => ops.push(GpuOp::DtoH { dst: buf.clone(), off, src: dev, len: PAGE_SIZE }),
    }
}

impl DevicePagemapOps for GpuInner {
    fn page_free(&self, pfn: DevicePfn) {
        self.pages_free(&[pfn]);
    }

    fn pages_free(&self, pfns: &[DevicePfn]) {
        let mut mem = self.mem();
        for &pfn in pfns {
            if !mem.free(pfn) {
                tracing::error!(pfn = pfn.0, "page_free of a GPU page this device does not have allocated");
            }
        }
    }

    fn migrate_to_ram(&self, fault: &CpuFault) -> Result<()> {
        let mut m = Migration::setup(fault.space(), fault.window(), Select::DEVICE_PRIVATE, self.owner)?;
        self.copy_to_ram(&mut m)?;
        m.pages().finalize();
        Ok(())
    }

    fn alloc_and_copy(&self, m: &mut Migration<Collected>) -> Result<()> {
        let f = self.submit_to_device(m)?;
        self.wait_and_set(m, f)
    }
}

/// One batch's copies in flight: the ticket to wait on, the staging they
/// use, and the destinations to set. Dropping it waits for the copies,
/// then gives back the staging and the GPU pages not handed to the
/// migration.
struct InFlight<'a> {
    dev: &'a GpuInner,
    ticket: Option<Ticket>,
    stage: Option<Stage<'a>>,
    to_device: Vec<(usize, DevicePfn)>,
    to_ram: Vec<usize>,
}

impl<'a> InFlight<'a> {
    fn new(dev: &'a GpuInner) -> InFlight<'a> {
        InFlight { dev, ticket: None, stage: None, to_device: Vec::new(), to_ram: Vec::new() }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            let _ = self.dev.api.wait(t);
        }
        let pfns: Vec<DevicePfn> = self.to_device.drain(..).map(|(_, p)| p).collect();
        if !pfns.is_empty() {
            self.dev.pages_free(&pfns);
        }
    }
}

/// The explicit migrations' driver: the GPU copies one batch while the
/// caller collects the next and finalizes the one before.
struct Batches<'a> {
    dev: &'a GpuInner,
    to_device: bool,
}

impl<'a> PipelinedDriver for Batches<'a> {
    type Pending = InFlight<'a>;

    fn alloc_and_submit(&mut self, m: &mut Migration<Collected>) -> Result<InFlight<'a>> {
        if self.to_device { self.dev.submit_to_device(m) } else { self.dev.submit_to_ram(self.dev.own_pages(m)?) }
    }

    fn wait_and_set(&mut self, m: &mut Migration<Collected>, f: InFlight<'a>) -> Result<()> {
        self.dev.wait_and_set(m, f)
    }

    fn finalize_and_map(&mut self, _m: &Migration<Migrated>) {}

    fn ready(&self, f: &InFlight<'a>) -> bool {
        f.ticket.as_ref().is_none_or(|t| self.dev.api.is_done(t))
    }
}

/// Pages per batch for a migration of `npages` pages: `max`, or less for a
/// migration of fewer than two batches (so that it still pipelines), in
/// whole 2 MiB blocks.
fn batch_pages(max: usize, npages: usize) -> usize {
    const BLOCK: usize = HUGE_SIZE / PAGE_SIZE;
    (npages / 2 / BLOCK * BLOCK).clamp(BLOCK.min(max), max)
}
