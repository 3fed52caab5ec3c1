//! The sim device: a model of the kernel's HMM test driver (`lib/test_hmm.c`,
//! "dmirror"), and uhmm's embedded default device.
//!
//! Device memory is host RAM the program cannot reach through its regions
//! (`memory`: chunks up to a capacity, a next-fit page allocator). Copies to
//! the device run on a DMA engine thread with fences (`dma`); pages coming
//! back are copied by the CPU straight into the region at finalize
//! (`Migration::set_dst_system_from`), since the CPU can read device memory.
//! A device page table (`table`) mirrors the CPU page table: it maps
//! addresses to this device's pages and to RAM pages it faulted in, kept
//! coherent by an interval notifier
//! (dmirror's `mmu_interval_notifier` and its read_begin / read_retry loop). The test
//! operations are dmirror's: `read`, `write`, `migrate_to_device`,
//! `migrate_to_system`, `snapshot`, `release`, `fail_next_alloc`, plus one
//! fault injection of uhmm's own, `poison_next_copy_back`. Its driver also
//! takes pages moved to it with `uhmm::move_pages` (`alloc_and_copy` and
//! `finalize_and_map`, shared with its own migrations to the device).

mod dma;
mod memory;
mod table;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use uhmm::Mapping;
use uhmm::{
    AccessPage, AddressSpace, Collected, CpuFault, DevicePage, DevicePagemap, DevicePagemapOps, DevicePfn, Error,
    ErrorKind, IntervalNotifierOps, InvalidateEvent, MigrateSrc, Migrated, Migration, NotifierHandle, Owner, PAGE_SIZE,
    PipelinedDriver, Prot, Residency, Result, Select, SystemPage, migrate_device_range, migrate_pipelined, range_fault,
};

use dma::{CopyOp, DevMem, Dispatch, DmaEngine};
use memory::{HUGE_PAGES, Memory};
use table::{Pte, Table};

/// Settings of a sim device.
///
/// Start from [`SimConfig::default`] (a 4 GiB device-private memory, no
/// fault injection) and change the fields that matter; each field's doc
/// gives its default.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Device memory capacity in bytes, at least `chunk_bytes`; only whole
    /// chunks are used. Default: 4 GiB (`4 << 30`).
    pub capacity_bytes: usize,
    /// Device memory is added in chunks of this many bytes (page-aligned,
    /// at most `capacity_bytes`), each taken from host RAM when it is first
    /// needed. Default: 64 MiB (`64 << 20`).
    pub chunk_bytes: usize,
    /// Pages per migration chunk (the batch handed to the DMA engine); a
    /// migration of fewer than two such chunks uses smaller ones (down to
    /// 512 pages) so that its chunks still pipeline. At least 1.
    /// Default: 2048 (8 MiB).
    pub migrate_chunk_pages: usize,
    /// Device-coherent memory (CPU-addressable, like the kernel's
    /// `MEMORY_DEVICE_COHERENT` test devices) instead of device-private.
    /// Default: false.
    pub coherent: bool,
    /// Fault injection: the chance (0.0 to 1.0) that a device page
    /// allocation fails. The page gets no destination and stays where it was.
    /// Default: 0.0.
    pub alloc_fail_rate: f64,
    /// Fault injection: the chance, per copy operation of a job to the
    /// device (a run of adjacent pages, merged as a DMA engine's
    /// scatter-gather list would be), that the job fails there; the
    /// migration chunk is then dropped and its pages are restored where
    /// they were. Copies back to RAM never fail this way.
    /// Default: 0.0.
    pub copy_error_rate: f64,
    /// Fault injection: the chance, per page coming back to RAM, that the
    /// driver gets no RAM page for it (the kernel's failed allocation in
    /// `migrate_to_ram` or eviction). The driver's choice, as the kernel
    /// allows, is to retry rather than poison: the page stays on the device
    /// (explicit migrations report it as not migrated, the CPU fault path
    /// and `release()` try again). Default: 0.0.
    pub copy_back_fail_rate: f64,
    /// DMA channels: copy threads a big job is split across (at least 1).
    /// Default: 1.
    pub dma_channels: usize,
    /// Fault injection: each part of a copy job waits a random 0 to this
    /// many microseconds before it runs (slow DMA completions; with several
    /// channels, parts and jobs also complete out of order). Default: 0.
    pub dma_delay_us: u64,
    /// Seed of the fault-injection generator (deterministic per seed).
    /// Default: 0.
    pub fault_seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            capacity_bytes: 4 << 30,
            chunk_bytes: 64 << 20,
            migrate_chunk_pages: 2048,
            coherent: false,
            alloc_fail_rate: 0.0,
            copy_error_rate: 0.0,
            copy_back_fail_rate: 0.0,
            dma_channels: 1,
            dma_delay_us: 0,
            fault_seed: 0,
        }
    }
}

impl SimConfig {
    /// Checks the fields against each other; the error names the field
    /// (or fields) at fault and their values.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::invalid(format!("SimConfig: {what}")));
        if self.chunk_bytes < PAGE_SIZE || !self.chunk_bytes.is_multiple_of(PAGE_SIZE) {
            return bad(format!("chunk_bytes ({}) must be a non-zero multiple of {PAGE_SIZE}", self.chunk_bytes));
        }
        if self.capacity_bytes < self.chunk_bytes {
            return bad(format!(
                "capacity_bytes ({}) must be at least chunk_bytes ({})",
                self.capacity_bytes, self.chunk_bytes
            ));
        }
        if self.migrate_chunk_pages == 0 {
            return bad("migrate_chunk_pages must be > 0".to_owned());
        }
        if self.dma_channels == 0 {
            return bad("dma_channels must be > 0".to_owned());
        }
        for (name, rate) in [
            ("alloc_fail_rate", self.alloc_fail_rate),
            ("copy_error_rate", self.copy_error_rate),
            ("copy_back_fail_rate", self.copy_back_fail_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return bad(format!("{name} ({rate}) must be within 0.0..=1.0"));
            }
        }
        Ok(())
    }
}

/// The counters dmirror returns with each test operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Pages copied / migrated / readable from the device.
    pub cpages: usize,
    /// Fault rounds: times the device had to fault pages it did not map.
    pub faults: usize,
    /// A migration's pages that stayed where they were, by reason (all
    /// zero for other operations, and for a migration that moved every
    /// page).
    pub left: Left,
}

/// The pages of a range that a migration left where they were, and why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Left {
    /// Locked by another migration, a fault or a device access: busy for a
    /// moment ([`uhmm::Skip::Busy`]).
    pub busy: usize,
    /// Pinned, or held by the kernel ([`uhmm::Skip::Pinned`]).
    pub pinned: usize,
    /// Collected, but the device had no memory for them (or an allocation
    /// failed).
    pub no_memory: usize,
    /// The rest: not selected (another device's pages, poisoned pages).
    pub not_found: usize,
}

impl Left {
    /// Pages left, whatever the reason.
    pub fn total(&self) -> usize {
        self.busy + self.pinned + self.no_memory + self.not_found
    }
}

bitflags::bitflags! {
    /// One page of a [`SimDevice::snapshot`] (dmirror's `HMM_DMIRROR_PROT_*`).
    ///
    /// Each flag is a bit of its own, so `contains` cannot be misread:
    /// dmirror's `ERROR` is all ones and its `DEV_COHERENT_REMOTE` is
    /// `DEV_COHERENT_LOCAL | ZERO`, so that an unmapped page "contains"
    /// every flag; here neither does.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct PageState: u8 {
        /// Readable (and not writable).
        const READ = 0x01;
        /// Writable.
        const WRITE = 0x02;
        /// Mapped by a huge page (a PMD).
        const PMD = 0x04;
        /// Device-coherent memory of another device.
        const DEV_COHERENT_REMOTE = 0x08;
        /// The shared zero page.
        const ZERO = 0x10;
        /// Device-private memory of this device.
        const DEV_PRIVATE_LOCAL = 0x20;
        /// Device-coherent memory of this device.
        const DEV_COHERENT_LOCAL = 0x40;
        /// No region, no access, or poisoned: the page cannot be read.
        const ERROR = 0x80;
    }
}

impl PageState {
    /// Not mapped at all (a hole).
    pub const NONE: PageState = PageState::empty();
}

/// Further passes [`SimDevice::migrate_to_device_all`] makes while pages
/// are left behind: pages busy for a moment (a fault's late copy, a kernel
/// reference) are free again within a pass or two.
pub const ALL_TRIES: usize = 5;
/// The pause between those passes: long against the microseconds a page is
/// busy, short against a migration.
pub const ALL_WAIT: std::time::Duration = std::time::Duration::from_millis(2);

/// A simulated device attached to one address space.
///
/// Its operations are dmirror's: the program moves a range to the device
/// and back, and the device reads and writes the range (reaching RAM pages
/// by address, faulting in the ones its page table lacks). A CPU access to a
/// page in its device-private memory brings the page back by itself.
///
/// To put a range on the device, a program calls
/// [`migrate_to_device_all`](SimDevice::migrate_to_device_all): it rides out
/// pages that are busy for a moment (right after the program's own writes,
/// for one). [`migrate_to_device`](SimDevice::migrate_to_device) is
/// dmirror's single pass, which reports such a page as an error at once: for
/// a caller that handles the pages left behind itself, or tests of exact
/// behaviour. To bring a range back, there is one call,
/// [`migrate_to_system`](SimDevice::migrate_to_system). Dropping the device
/// evicts every page it holds back to RAM.
///
/// ```
/// use uhmm::{AddressSpace, Config, PAGE_SIZE, Prot};
/// use uhmm_devices::sim::{PageState, SimConfig, SimDevice};
///
/// # fn main() -> uhmm::Result<()> {
/// let space = AddressSpace::new(Config::default())?;
/// // 16 MiB of device memory (the default is 4 GiB).
/// let config = SimConfig { capacity_bytes: 16 << 20, chunk_bytes: 4 << 20, ..SimConfig::default() };
/// let dev = SimDevice::new(&space, config)?;
///
/// let region = space.map(8 * PAGE_SIZE, Prot::READ_WRITE)?;
/// region.write(0, b"hello")?;
/// let moved = dev.migrate_to_device_all(region.addr(), region.npages())?;
/// assert_eq!(moved.cpages, 8);
/// let states = dev.snapshot(region.addr(), 1)?;
/// assert!(states[0].contains(PageState::DEV_PRIVATE_LOCAL));
///
/// // The device reads its own memory ...
/// let mut page = vec![0; PAGE_SIZE];
/// dev.read(region.addr(), 1, &mut page)?;
/// assert_eq!(&page[..5], b"hello");
/// // ... and a CPU access faults the page back to RAM.
/// let mut buf = [0; 5];
/// region.read(0, &mut buf)?;
/// assert_eq!(&buf, b"hello");
///
/// // The rest comes back explicitly.
/// dev.migrate_to_system(region.addr(), region.npages())?;
/// assert_eq!(dev.pages_in_use(), 0);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SimDevice {
    inner: Arc<SimInner>,
}

#[derive(Debug)]
struct SimInner {
    space: AddressSpace,
    owner: Owner,
    config: SimConfig,
    pagemap: OnceLock<Arc<DevicePagemap>>,
    mem: Mutex<Memory>,
    dma: DmaEngine,
    /// The device page table (the mirror).
    table: Mutex<Table>,
    /// Tells the mirror when CPU pages change.
    notifier: OnceLock<NotifierHandle>,
    fail_next_alloc: AtomicBool,
    poison_next_copy_back: AtomicBool,
    /// State of the fault-injection generator (splitmix64).
    fault_rng: AtomicU64,
    /// Allocations failed and copy jobs failed by injection.
    injected_alloc_failures: AtomicU64,
    injected_copy_errors: AtomicU64,
    injected_copy_back_failures: AtomicU64,
    /// Compound (2 MiB) device pages allocated.
    huge_allocs: AtomicU64,
    /// Whole 2 MiB blocks that fell back to small device pages.
    huge_fallbacks: AtomicU64,
}

impl SimDevice {
    /// Creates a device in `space`. A [`SimConfig`] that
    /// [`validate`](SimConfig::validate) refuses is an invalid argument.
    pub fn new(space: &AddressSpace, config: SimConfig) -> Result<SimDevice> {
        config.validate()?;
        let inner = Arc::new(SimInner {
            space: space.clone(),
            owner: Owner::new(),
            pagemap: OnceLock::new(),
            mem: Mutex::new(Memory::new(config.chunk_bytes, config.capacity_bytes)),
            dma: DmaEngine::start(config.dma_channels)?,
            table: Mutex::new(Table::default()),
            notifier: OnceLock::new(),
            fail_next_alloc: AtomicBool::new(false),
            poison_next_copy_back: AtomicBool::new(false),
            fault_rng: AtomicU64::new(config.fault_seed),
            injected_alloc_failures: AtomicU64::new(0),
            injected_copy_errors: AtomicU64::new(0),
            injected_copy_back_failures: AtomicU64::new(0),
            huge_allocs: AtomicU64::new(0),
            huge_fallbacks: AtomicU64::new(0),
            config,
        });
        let weak: Weak<dyn DevicePagemapOps> = Arc::downgrade(&inner) as Weak<SimInner>;
        let npages = (inner.config.capacity_bytes / PAGE_SIZE) as u64;
        let pm = if inner.config.coherent {
            space.register_coherent_pagemap(weak, inner.owner, npages)?
        } else {
            space.register_pagemap(weak, inner.owner, npages)?
        };
        inner.pagemap.set(pm).expect("pagemap set once");
        // Like dmirror, one notifier over the whole address space.
        let weak: Weak<dyn IntervalNotifierOps> = Arc::downgrade(&inner) as Weak<SimInner>;
        let notifier = space.insert_notifier(0..usize::MAX & !(PAGE_SIZE - 1), weak);
        inner.notifier.set(notifier).expect("notifier set once");
        Ok(SimDevice { inner })
    }

    /// This device's owner token.
    pub fn owner(&self) -> Owner {
        self.inner.owner
    }

    /// This device's pagemap.
    pub fn pagemap(&self) -> &Arc<DevicePagemap> {
        self.inner.pagemap()
    }

    /// Device pages in use (allocated and not freed).
    pub fn pages_in_use(&self) -> usize {
        self.inner.mem.lock().unwrap_or_else(|e| e.into_inner()).in_use()
    }

    /// Compound (2 MiB) device pages allocated, and whole 2 MiB blocks that
    /// fell back to small pages.
    pub fn huge_stats(&self) -> (u64, u64) {
        (self.inner.huge_allocs.load(Ordering::Relaxed), self.inner.huge_fallbacks.load(Ordering::Relaxed))
    }

    /// Device page allocations and copy jobs failed by the configured
    /// fault injection (`alloc_fail_rate`, `copy_error_rate`).
    pub fn injected_faults(&self) -> (u64, u64) {
        (
            self.inner.injected_alloc_failures.load(Ordering::Relaxed),
            self.inner.injected_copy_errors.load(Ordering::Relaxed),
        )
    }

    /// Pages left on the device by injected copy-back failures
    /// (`copy_back_fail_rate`).
    pub fn injected_copy_back_failures(&self) -> u64 {
        self.inner.injected_copy_back_failures.load(Ordering::Relaxed)
    }

    /// The next device or system page allocation in a migration fails, once.
    pub fn fail_next_alloc(&self) {
        self.inner.fail_next_alloc.store(true, Ordering::SeqCst);
    }

    /// The next page this device copies back to RAM is declared
    /// unrecoverable, once: its data is lost and CPU accesses to it get
    /// SIGBUS (the driver's choice the kernel allows when it cannot bring a
    /// page back).
    pub fn poison_next_copy_back(&self) {
        self.inner.poison_next_copy_back.store(true, Ordering::SeqCst);
    }

    /// Migrates the system pages and holes of `npages` pages at `addr` to
    /// this device, then counts the pages of the range on it: `cpages`
    /// (from its page table, or where that lacks pages, from the address
    /// space's snapshot), and `left` counts the others by reason. Pages left behind are not an error while some are on the
    /// device; when none is, the error says why ([`ErrorKind::Busy`] when
    /// every page was busy or pinned, [`ErrorKind::NoMemory`] when the
    /// device was full, [`ErrorKind::NotFound`] when none was selected). A
    /// range without read access is an invalid argument, as in dmirror.
    ///
    /// This is dmirror's operation, one pass: a page skipped as busy for a
    /// moment (the kernel or uhmm holding it, as right after CPU accesses)
    /// is left behind, counted in `left.busy`. A program normally calls
    /// [`migrate_to_device_all`](SimDevice::migrate_to_device_all) instead;
    /// call this one to see each pass's outcome (tests of exact behaviour,
    /// or a caller that retries or gives up on the pages left behind its
    /// own way).
    pub fn migrate_to_device(&self, addr: usize, npages: usize) -> Result<Counters> {
        let range = crate::range::pages_at(addr, npages)?;
        if self.inner.space.protection(range.clone())?.iter().any(|(_, p)| !p.contains(Prot::READ)) {
            return Err(Error::invalid("no read access to part of the range"));
        }
        let chunk = chunk_pages(self.inner.config.migrate_chunk_pages, npages);
        let mut driver = Chunks { dev: &self.inner, to_device: true, how: dispatch(chunk, npages) };
        let s =
            migrate_pipelined(&self.inner.space, range.clone(), chunk, Select::SYSTEM, self.inner.owner, &mut driver)?;
        let table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut cpages =
            table.range(range.clone()).filter(|(_, pte)| matches!(pte, Pte::Device(_) | Pte::Coherent(_))).count();
        drop(table);
        if cpages < npages {
            // The table may lack pages that are on this device all the same:
            // an invalidation other than this device's own migrations drops
            // their entries (as dmirror's does). The core says where each is.
            let own = self.inner.owner;
            cpages = (self.inner.space.snapshot(range)?.iter())
                .filter(|p| matches!(p.residency, Residency::Device(_, o) | Residency::Coherent(_, o) if o == own))
                .count();
        }
        let missing = npages - cpages;
        // Pages on the device before count as there; the rest of what the
        // migration left is attributed by its reasons, in this order.
        let mut left = Left::default();
        let mut rest = missing;
        for (slot, n) in [(&mut left.busy, s.busy), (&mut left.pinned, s.pinned), (&mut left.no_memory, s.not_moved())]
        {
            *slot = n.min(rest);
            rest -= *slot;
        }
        left.not_found = rest;
        if cpages == 0 && npages > 0 {
            let (kind, why) = if left.busy + left.pinned == npages {
                (ErrorKind::Busy, "every page was busy or pinned")
            } else if left.no_memory > 0 {
                (ErrorKind::NoMemory, "the device had no memory for them")
            } else {
                (ErrorKind::NotFound, "no page could be moved")
            };
            return Err(Error::new(kind, format!("none of {npages} pages is on the device: {why} ({left:?})")));
        }
        Ok(Counters { cpages, faults: 0, left })
    }

    /// [`SimDevice::migrate_to_device`], tried again (up to
    /// [`ALL_TRIES`] more times, [`ALL_WAIT`] apart) while pages were left
    /// behind. A page the kernel or uhmm holds
    /// for a moment is skipped as busy (right after CPU accesses, a late
    /// copy of one of their faults may still hold a page while it finds the
    /// page present), which a caller that wants everything on the device
    /// should ride out.
    ///
    /// The call a program normally makes to put a range on the device.
    /// Pages that stay behind after the last try (device memory full, pages
    /// pinned) are counted in `left`, as with `migrate_to_device`.
    pub fn migrate_to_device_all(&self, addr: usize, npages: usize) -> Result<Counters> {
        let mut last = self.migrate_to_device(addr, npages);
        for _ in 0..ALL_TRIES {
            let again = match &last {
                Ok(c) => c.left.total() > 0,
                Err(e) => matches!(e.kind(), ErrorKind::Busy | ErrorKind::NoMemory | ErrorKind::NotFound),
            };
            if !again {
                break;
            }
            std::thread::sleep(ALL_WAIT);
            last = self.migrate_to_device(addr, npages);
        }
        last
    }

    /// Migrates this device's pages among `npages` pages at `addr` back to
    /// system memory. `cpages` = pages migrated.
    ///
    /// The one call to bring a range back (there is no `_all` variant): a
    /// page left on the device (busy for a moment) is not an error, only
    /// not counted; it stays there until a later call (or, device-private,
    /// a CPU access) brings it back.
    pub fn migrate_to_system(&self, addr: usize, npages: usize) -> Result<Counters> {
        let range = crate::range::pages_at(addr, npages)?;
        let chunk = chunk_pages(self.inner.config.migrate_chunk_pages, npages);
        let mut driver = Chunks { dev: &self.inner, to_device: false, how: dispatch(chunk, npages) };
        let s = migrate_pipelined(&self.inner.space, range, chunk, self.inner.select(), self.inner.owner, &mut driver)?;
        Ok(Counters { cpages: s.migrated, faults: 0, left: Left::default() })
    }

    /// The device reads `npages` pages at `addr` into `buf`, faulting them
    /// in through the CPU page table where its mirror lacks them.
    pub fn read(&self, addr: usize, npages: usize, buf: &mut [u8]) -> Result<Counters> {
        let space = &self.inner.space;
        self.access(addr, npages, buf.len(), false, |i, page| {
            let dst = &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            match page {
                Page::System(a) => space.read_at(a, dst),
                Page::Held(p) => p.read(0, dst),
                Page::Device(m) => m.chunk.read(m.off, dst).map_err(|e| Error::sys("device read", e)),
            }
        })
    }

    /// The device writes `buf` to `npages` pages at `addr`, faulting them in
    /// for writing where its mirror lacks them.
    pub fn write(&self, addr: usize, npages: usize, buf: &[u8]) -> Result<Counters> {
        let space = &self.inner.space;
        self.access(addr, npages, buf.len(), true, |i, page| {
            let src = &buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            match page {
                Page::System(a) => space.write_at(a, src),
                Page::Held(p) => p.write(0, src),
                Page::Device(m) => m.chunk.write(m.off, src).map_err(|e| Error::sys("device write", e)),
            }
        })
    }

    /// dmirror's access loop: copy page by page through the mirror, under
    /// its lock; at the first page it lacks, fault the rest of the range in
    /// (one fault round) and go on.
    fn access(
        &self,
        addr: usize,
        npages: usize,
        buf_len: usize,
        write: bool,
        mut copy: impl FnMut(usize, Page) -> Result<()>,
    ) -> Result<Counters> {
        let range = crate::range::pages_at(addr, npages)?;
        if buf_len < npages * PAGE_SIZE {
            return Err(Error::invalid("buffer shorter than the range"));
        }
        // Validate up front so that a bad range changes nothing.
        let prot = self.inner.space.protection(range.clone())?;
        if let Some((_, p)) = prot.iter().find(|(_, p)| !p.contains(Prot::READ) || (write && !p.contains(Prot::WRITE)))
        {
            let kind = if p.contains(Prot::READ) { ErrorKind::Permission } else { ErrorKind::Fault };
            return Err(Error::new(kind, "the range does not allow this access"));
        }
        let mut done = 0;
        let mut faults = 0;
        while done < npages {
            {
                let table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
                while done < npages {
                    let a = addr + done * PAGE_SIZE;
                    let page = match table.get(a) {
                        Some(Pte::System { writable }) if *writable || !write => Page::System(a),
                        Some(Pte::Device(pfn)) => Page::Device(self.inner.dev_mem(*pfn)?),
                        Some(Pte::Atomic(held)) => Page::Held(held.clone()),
                        Some(Pte::Coherent(_)) => Page::System(a),
                        _ => break,
                    };
                    copy(done, page)?;
                    done += 1;
                }
            }
            if done < npages {
                if faults >= 100 {
                    return Err(Error::new(ErrorKind::Busy, "the range kept changing under the device"));
                }
                faults += 1;
                self.inner.fault(addr + done * PAGE_SIZE..range.end, write)?;
            }
        }
        Ok(Counters { cpages: npages, faults, left: Left::default() })
    }

    /// Takes exclusive access to `npages` pages at `addr` (dmirror's
    /// `exclusive`: `make_device_exclusive`, then the pages are mapped with
    /// the atomic tag). `cpages` = pages made exclusive.
    pub fn exclusive(&self, addr: usize, npages: usize) -> Result<Counters> {
        let range = crate::range::pages_at(addr, npages)?;
        let grant = self.inner.space.make_device_exclusive(range, self.inner.owner)?;
        let mut table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..npages {
            if let Some(held) = grant.page(i) {
                table.insert(addr + i * PAGE_SIZE, Pte::Atomic(held));
            }
        }
        Ok(Counters { cpages: grant.cpages(), faults: 0, left: Left::default() })
    }

    /// dmirror's `check_exclusive`: fails with
    /// [`ErrorKind::Permission`] while any page of the range is still
    /// exclusive to this device (a CPU access revokes it).
    pub fn check_exclusive(&self, addr: usize, npages: usize) -> Result<()> {
        let range = crate::range::pages_at(addr, npages)?;
        let table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.range(range).any(|(_, pte)| matches!(pte, Pte::Atomic(_))) {
            return Err(Error::new(ErrorKind::Permission, "pages are still exclusive to the device"));
        }
        Ok(())
    }

    /// The state of each page, without faulting (dmirror's snapshot).
    pub fn snapshot(&self, addr: usize, npages: usize) -> Result<Vec<PageState>> {
        let range = crate::range::pages_at(addr, npages)?;
        let pages = self.inner.space.snapshot(range)?;
        Ok(pages
            .into_iter()
            .map(|p| {
                let rw = if p.prot.contains(Prot::WRITE) { PageState::WRITE } else { PageState::READ };
                match p.residency {
                    Residency::Unmapped | Residency::Poisoned => PageState::ERROR,
                    _ if p.prot == Prot::NONE => PageState::ERROR,
                    Residency::None => PageState::NONE,
                    Residency::Zero => PageState::ZERO | PageState::READ,
                    Residency::Ram if p.huge => rw | PageState::PMD,
                    Residency::Ram | Residency::Exclusive => rw,
                    Residency::Device(_, owner) if owner == self.inner.owner => PageState::DEV_PRIVATE_LOCAL | rw,
                    // Another device's private memory is out of reach
                    // without faulting: dmirror reports it as nothing.
                    Residency::Device(..) => PageState::NONE,
                    Residency::Coherent(_, owner) if owner == self.inner.owner => PageState::DEV_COHERENT_LOCAL | rw,
                    Residency::Coherent(..) => PageState::DEV_COHERENT_REMOTE | rw,
                }
            })
            .collect())
    }

    /// Evicts every page of this device back to RAM (`migrate_device_range`).
    /// Returns the pages evicted.
    pub fn release(&self) -> Result<usize> {
        self.inner.release()
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        if self.inner.space.is_orphaned() {
            // A forked child's copy: the DMA thread lives in the parent, so
            // joining it would wait forever; its memory goes with the child.
            std::mem::forget(self.inner.clone());
            return;
        }
        let inner = &self.inner;
        crate::teardown::release_and_unregister(&inner.space, inner.pagemap(), || inner.release(), "sim device");
    }
}

/// Where one page of a device access is.
enum Page {
    /// RAM, at this address.
    System(usize),
    /// This device's memory.
    Device(DevMem),
    /// RAM held for this device's exclusive access.
    Held(SystemPage),
}

impl SimInner {
    fn pagemap(&self) -> &Arc<DevicePagemap> {
        self.pagemap.get().expect("pagemap registered at creation")
    }

    /// The selection of this device's own pages.
    fn select(&self) -> Select {
        if self.config.coherent { Select::DEVICE_COHERENT } else { Select::DEVICE_PRIVATE }
    }

    fn take_fail(&self) -> bool {
        self.fail_next_alloc.swap(false, Ordering::SeqCst)
    }

    /// The next number of the fault-injection generator: splitmix64 over an
    /// atomic counter, deterministic per seed for one thread and safe (if
    /// interleaved) across threads.
    fn random(&self) -> u64 {
        let mut z =
            self.fault_rng.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// True with probability `rate`.
    fn chance(&self, rate: f64) -> bool {
        rate > 0.0 && ((self.random() >> 11) as f64 / (1u64 << 53) as f64) < rate
    }

    /// The injected wait before a copy job (`dma_delay_us`).
    fn dma_delay(&self) -> std::time::Duration {
        let max = self.config.dma_delay_us;
        std::time::Duration::from_micros(if max == 0 { 0 } else { self.random() % (max + 1) })
    }

    /// A device allocation fails: once after `fail_next_alloc`, or by
    /// injection.
    fn alloc_fails(&self) -> bool {
        if self.take_fail() {
            return true;
        }
        let fail = self.chance(self.config.alloc_fail_rate);
        if fail {
            self.injected_alloc_failures.fetch_add(1, Ordering::Relaxed);
        }
        fail
    }

    /// Allocates a device page (next to the one before when it can).
    fn alloc_page(&self, mem: &mut Memory) -> Option<DevicePfn> {
        if self.alloc_fails() {
            return None;
        }
        mem.alloc_page()
    }

    /// Allocates a compound block of `HUGE_PAGES` contiguous, aligned device
    /// pages (a device THP); `None` when none can be had, and the caller
    /// falls back to small pages.
    fn alloc_huge(&self, mem: &mut Memory) -> Option<u64> {
        if self.alloc_fails() {
            return None;
        }
        mem.alloc_huge()
    }

    fn dev_mem(&self, pfn: DevicePfn) -> Result<DevMem> {
        let mem = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        mem.page(pfn).ok_or_else(|| Error::invalid("device page not allocated"))
    }

    fn page(&self, pfn: DevicePfn) -> DevicePage {
        self.pagemap().page(pfn).expect("pfn within capacity")
    }

    /// Allocates device pages for the RAM pages and holes among the sources
    /// of `m`, copies them (zero-filling holes) and sets the destinations.
    /// Pages past the first failed allocation keep no destination.
    fn copy_to_device(&self, m: &mut Migration<Collected>) -> Result<()> {
        let copy = self.submit_to_device(m, Dispatch::InlineSmall)?;
        self.wait_and_set(m, copy)
    }

    /// The first half of [`SimInner::copy_to_device`]: allocate and start
    /// the copies; [`SimInner::wait_and_set`] is the second.
    fn submit_to_device(&self, m: &mut Migration<Collected>, how: Dispatch) -> Result<InFlight<'_>> {
        let mut ops = Vec::new();
        let mut copy = InFlight { dev: self, fence: None, dsts: Vec::new() };
        let movable = |src: &MigrateSrc| !matches!(src, MigrateSrc::Skip | MigrateSrc::Device(_));
        let srcs: Vec<MigrateSrc> = (0..m.npages()).map(|i| m.src(i)).collect();
        let addrs: Vec<Option<usize>> = (0..m.npages()).map(|i| m.addr(i)).collect();
        // Each whole, aligned 2 MiB block gets a compound device page.
        let whole_block = |i: usize| {
            addrs[i].is_some_and(|a| {
                a.is_multiple_of(uhmm::HUGE_SIZE)
                    && i + HUGE_PAGES <= srcs.len()
                    && (0..HUGE_PAGES).all(|k| movable(&srcs[i + k]) && addrs[i + k] == Some(a + k * PAGE_SIZE))
            })
        };
        let whole: Vec<bool> = (0..srcs.len()).map(whole_block).collect();
        let mut compound: Option<(usize, u64)> = None;
        // Pages allocated here go back to the free list if `copy` is dropped
        // before they are handed to the migration (after `mem` unlocks).
        let mut mem = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        for (i, src) in srcs.into_iter().enumerate() {
            if !movable(&src) {
                continue;
            }
            if whole[i] {
                let base = self.alloc_huge(&mut mem);
                let counter = if base.is_some() { &self.huge_allocs } else { &self.huge_fallbacks };
                counter.fetch_add(1, Ordering::Relaxed);
                compound = base.map(|b| (i, b));
            }
            let pfn = match compound {
                Some((first, base)) if i < first + HUGE_PAGES => DevicePfn(base + (i - first) as u64),
                _ => match self.alloc_page(&mut mem) {
                    Some(pfn) => pfn,
                    None => break,
                },
            };
            copy.dsts.push((i, Some(pfn)));
            if self.config.coherent {
                // The device page the CPU will map: a RAM page it fills.
                let dst = m.system_dst(i)?;
                ops.push(match src {
                    MigrateSrc::System(sp) => CopyOp::Between(sp, dst),
                    _ => CopyOp::ZeroSystem(dst),
                });
                continue;
            }
            let (chunk, off) = mem.locate(pfn).ok_or_else(|| Error::invalid("device page not allocated"))?;
            match src {
                MigrateSrc::System(sp) => push_to_device(&mut ops, sp, chunk, off),
                _ => ops.push(CopyOp::Zero(DevMem { chunk: chunk.clone(), off })),
            }
        }
        drop(mem);
        if let Some(at) = (0..ops.len()).find(|_| self.chance(self.config.copy_error_rate)) {
            // An injected copy error: the job fails after the copies before
            // it (no destination is set; the pages are restored).
            self.injected_copy_errors.fetch_add(1, Ordering::Relaxed);
            ops.insert(at, CopyOp::Fail);
        }
        copy.fence = self.dma.run(ops, how, || self.dma_delay())?;
        Ok(copy)
    }

    /// Waits for `copy` and sets the destinations of the pages it copied
    /// (none if the copy failed: the pages stay where they were).
    fn wait_and_set(&self, m: &mut Migration<Collected>, mut copy: InFlight<'_>) -> Result<()> {
        copy.wait()?;
        let dsts = std::mem::take(&mut copy.dsts);
        for (k, &(i, pfn)) in dsts.iter().enumerate() {
            let set = match pfn {
                Some(pfn) => m.set_dst_device(i, self.page(pfn)),
                None => m.set_dst_system(i),
            };
            if let Err(e) = set {
                // The rest go back when `copy` drops.
                copy.dsts = dsts[k..].to_vec();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Maps the pages that moved to this device in the device page table.
    fn map_moved_in(&self, m: &Migration<Migrated>) {
        let entries = (0..m.npages()).filter_map(|i| match (m.migrated(i), m.dst(i), m.addr(i)) {
            (true, uhmm::MigrateDst::Device(p), Some(a)) => {
                Some((a, if self.config.coherent { Pte::Coherent(p.pfn) } else { Pte::Device(p.pfn) }))
            }
            _ => None,
        });
        self.table.lock().unwrap_or_else(|e| e.into_inner()).insert_many(entries);
    }

    /// Copies this device's pages among the sources of `m` to RAM. A page
    /// that cannot get a RAM page is left where it is; one declared lost by
    /// `poison_next_copy_back` is not copied.
    fn copy_to_ram(&self, m: &mut Migration<Collected>) -> Result<()> {
        let copy = self.submit_to_ram(m, Dispatch::InlineSmall)?;
        self.wait_and_set(m, copy)
    }

    /// The first half of [`SimInner::copy_to_ram`]: start the copies;
    /// [`SimInner::wait_and_set`] is the second.
    fn submit_to_ram(&self, m: &mut Migration<Collected>, how: Dispatch) -> Result<InFlight<'_>> {
        let mut ops = Vec::new();
        let mut copy = InFlight { dev: self, fence: None, dsts: Vec::new() };
        // The device's own pages leave its page table before the copy, under
        // its lock (device accesses copy under it): a device write either
        // landed before (and is copied) or finds no entry and faults (and
        // waits for the page).
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mem = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..m.npages() {
            let MigrateSrc::Device(p) = m.src(i) else {
                continue;
            };
            if p.pagemap != self.pagemap().id() || self.take_fail() {
                continue;
            }
            if self.chance(self.config.copy_back_fail_rate) {
                // No RAM page for it: it stays on the device, to be retried.
                self.injected_copy_back_failures.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if self.poison_next_copy_back.swap(false, Ordering::SeqCst) {
                m.set_dst_error(i)?;
            } else {
                match if self.config.coherent { m.src_page(i) } else { None } {
                    // Coherent: the page was mapped; setup staged its data.
                    Some(staged) => {
                        ops.push(CopyOp::Between(staged, m.system_dst(i)?));
                        copy.dsts.push((i, None));
                    }
                    // Private: the CPU can read device memory, so the page is
                    // copied straight into the region at finalize.
                    None => {
                        let (chunk, off) =
                            mem.locate(p.pfn).ok_or_else(|| Error::invalid("device page not allocated"))?;
                        m.set_dst_system_from(i, chunk, off)?;
                    }
                }
            }
            // Leaving the device (or lost): no device access may reach it.
            if let Some(a) = m.addr(i) {
                table.remove_addr(a);
            }
        }
        drop(mem);
        drop(table);
        copy.fence = self.dma.run(ops, how, || self.dma_delay())?;
        Ok(copy)
    }

    /// dmirror_range_fault: fault `range` in and map it in the mirror,
    /// unless an invalidation ran meanwhile (then fault again).
    fn fault(&self, range: Range<usize>, write: bool) -> Result<()> {
        let notifier = self.notifier.get().expect("notifier registered at creation");
        for _attempt in 0..100 {
            let seq = notifier.read_begin();
            let pages = range_fault(&self.space, range.clone(), write, self.owner)?.release();
            let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            if notifier.read_retry(seq) {
                continue;
            }
            table.insert_many(pages.into_iter().enumerate().map(|(i, p)| {
                let pte = match p {
                    AccessPage::System { writable } => Pte::System { writable },
                    AccessPage::Device(d) => Pte::Device(d.pfn),
                };
                (range.start + i * PAGE_SIZE, pte)
            }));
            return Ok(());
        }
        Err(Error::new(ErrorKind::Busy, "invalidations kept racing the device's fault"))
    }

    fn release(&self) -> Result<usize> {
        let mut total = 0;
        for _round in 0..100 {
            let used = self.mem.lock().unwrap_or_else(|e| e.into_inner()).pages();
            if used == 0 {
                return Ok(total);
            }
            let mut m = migrate_device_range(&self.space, self.pagemap(), 0..used as u64)?;
            if m.cpages() == 0 {
                return Ok(total);
            }
            self.copy_to_ram(&mut m)?;
            total += m.pages().finalize().migrated;
        }
        Err(Error::new(ErrorKind::Busy, "device pages kept coming back during release"))
    }
}

impl IntervalNotifierOps for SimInner {
    fn invalidate(&self, range: Range<usize>, event: InvalidateEvent) {
        // This device's own migrations update its device pages themselves
        // (finalize_and_map); RAM entries go in every case, since the device
        // reaches them by address.
        let own = matches!(event, InvalidateEvent::Migrate { owner } | InvalidateEvent::Exclusive { owner } if owner == self.owner);
        self.table.lock().unwrap_or_else(|e| e.into_inner()).remove_range(range, own);
    }
}

impl DevicePagemapOps for SimInner {
    fn page_free(&self, pfn: DevicePfn) {
        self.pages_free(&[pfn]);
    }

    fn pages_free(&self, pfns: &[DevicePfn]) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        for &pfn in pfns {
            table.remove_pfn(pfn);
        }
        drop(table);
        let mut mem = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        for &pfn in pfns {
            if !mem.free(pfn) {
                tracing::error!(pfn = pfn.0, "page_free of a device page this device does not have allocated");
            }
        }
    }

    fn migrate_to_ram(&self, fault: &CpuFault) -> Result<()> {
        let mut m = Migration::setup(fault.space(), fault.window(), self.select(), self.owner)?;
        self.copy_to_ram(&mut m)?;
        m.pages().finalize();
        Ok(())
    }

    fn alloc_and_copy(&self, m: &mut Migration<Collected>) -> Result<()> {
        self.copy_to_device(m)
    }

    fn finalize_and_map(&self, m: &Migration<Migrated>) {
        self.map_moved_in(m);
    }
}

/// Copies of one migration chunk handed to the DMA engine, and the pages
/// to set once they are done: an index of the migration and, towards the
/// device, the device page. Dropping it waits for the copies and gives back
/// the device pages not handed to the migration.
struct InFlight<'a> {
    dev: &'a SimInner,
    fence: Option<Arc<dma::Fence>>,
    dsts: Vec<(usize, Option<DevicePfn>)>,
}

impl InFlight<'_> {
    fn wait(&mut self) -> Result<()> {
        self.fence.take().map_or(Ok(()), |f| f.wait())
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let _ = self.wait();
        for (_, pfn) in self.dsts.drain(..) {
            if let Some(pfn) = pfn {
                self.dev.page_free(pfn);
            }
        }
    }
}

/// The explicit migrations' driver: pipelined, so the DMA thread copies one
/// chunk while the caller sets up the next and finalizes the one before.
struct Chunks<'a> {
    dev: &'a SimInner,
    to_device: bool,
    how: Dispatch,
}

impl<'a> PipelinedDriver for Chunks<'a> {
    type Pending = InFlight<'a>;

    fn alloc_and_submit(&mut self, m: &mut Migration<Collected>) -> Result<InFlight<'a>> {
        if self.to_device { self.dev.submit_to_device(m, self.how) } else { self.dev.submit_to_ram(m, self.how) }
    }

    fn wait_and_set(&mut self, m: &mut Migration<Collected>, copy: InFlight<'a>) -> Result<()> {
        self.dev.wait_and_set(m, copy)
    }

    /// Pages moving to RAM left the device page table in `submit_to_ram`.
    fn finalize_and_map(&mut self, m: &Migration<Migrated>) {
        if self.to_device {
            self.dev.map_moved_in(m);
        }
    }

    fn ready(&self, copy: &InFlight<'a>) -> bool {
        copy.fence.as_ref().is_none_or(|f| f.is_done())
    }
}

/// Queues the copy of `sp` into device memory `chunk` at `off`, merged into
/// the last copy where both sides continue it (one copy and one fence for
/// the run, as a DMA driver merges a scatter-gather list), up to a 2 MiB
/// block a copy.
fn push_to_device(ops: &mut Vec<CopyOp>, sp: SystemPage, chunk: &Arc<Mapping>, off: usize) {
    if let Some(CopyOp::ToDevice(run, at)) = ops.last_mut()
        && Arc::ptr_eq(&at.chunk, chunk)
        && at.off + run.pages() * PAGE_SIZE == off
        && run.pages() < HUGE_PAGES
        && run.extend(&sp)
    {
        return;
    }
    ops.push(CopyOp::ToDevice(sp, DevMem { chunk: chunk.clone(), off }));
}

/// Pages per migration chunk for a migration of `npages` pages: `max` (the
/// configured size), or less for a migration of fewer than two such chunks,
/// so that it still has two chunks to pipeline, each at least a 2 MiB block
/// (which then stays whole within its chunk). Four smaller chunks were
/// measured slower (more per-chunk work, and a copy back to RAM shared by
/// two threads within one page table contends on its lock).
fn chunk_pages(max: usize, npages: usize) -> usize {
    (npages / 2 / HUGE_PAGES * HUGE_PAGES).clamp(HUGE_PAGES.min(max), max)
}

/// Where the copies of a migration of `npages` pages in chunks of `chunk`
/// pages run: a migration of one chunk has nothing to overlap its copy
/// with, so a small one is copied on the calling thread, sparing the
/// engine's wake-up (as for a CPU fault's window).
fn dispatch(chunk: usize, npages: usize) -> Dispatch {
    if npages <= chunk { Dispatch::InlineSmall } else { Dispatch::Engine }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_migrations_get_smaller_chunks_of_whole_blocks() {
        assert_eq!(chunk_pages(2048, 1 << 18), 2048, "a big migration: the configured size");
        assert_eq!(chunk_pages(2048, 4096), 2048);
        assert_eq!(chunk_pages(2048, 2048), 1024, "two chunks");
        assert_eq!(chunk_pages(2048, 2000), 512, "rounded down to whole blocks");
        assert_eq!(chunk_pages(2048, 100), 512, "never below a block");
        assert_eq!(chunk_pages(16, 4096), 16, "a configured size below a block stays");
    }
}
