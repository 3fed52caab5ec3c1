//! `uhmm stress`: the integrity soak. Writer threads read and write random
//! bytes of several regions, each keeping a shadow of the pages it owns, while
//! migrator threads move random ranges between RAM and one or two devices
//! (sim devices, or store devices over the compressed store or a far store;
//! with fault injection), evict devices, and the fault path brings pages back. Every
//! byte is verified at checkpoints and at the end; a watchdog turns a hang
//! into a report and exit status 3.
//!
//! With the compressed store, `--corrupt-rate` flips a bit of stored
//! objects: their pages come back lost (poisoned), which the writers see as
//! a `Fault` and account for (they discard the page, which then reads as
//! zeros). Such a loss is not a lost byte; a poisoned page the store did not
//! report lost is.
//!
//! With `--ram-budget`, a [`Tier`] keeps the private anonymous regions'
//! resident pages under a budget that alternates between the size given
//! and half of it, demoting the coldest to device 0 while everything above
//! goes on; the run also fails when the tier's peak passes the budget by
//! more than the slack.
//!
//! The model: writer `t` of `W` owns the pages `p` with `p % W == t` of every
//! region and is the only thread that writes them, so its shadow (a `Vec<u8>`
//! per region, without locks) is always the expected content; migrations,
//! evictions and faults must never change a byte. Writers also change the
//! protection of their own pages (read-only for a moment, checking that a
//! write is refused), so protection changes race migrations but never a
//! write of the model.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uhmm::{AddressSpace, Config, ErrorKind, FaultDelivery, PAGE_SIZE, Prot, Region, Residency};
use uhmm_devices::compress::{CompressConfig, CompressStore};
use uhmm_devices::sim::{SimConfig, SimDevice};
use uhmm_devices::store::{StoreDevice, StoreDeviceConfig};
use uhmm_devices::tier::{Tier, TierConfig, TierStats};

use crate::devices::{Device, DeviceKind, parse_device, tier_line};
use crate::units::{human, parse_fraction, parse_size};

/// Options of `uhmm stress`.
#[derive(Debug, clap::Args)]
pub struct StressArgs {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub seconds: u64,

    /// Writer threads (two migrator threads run besides them).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub threads: u32,

    /// Seed of every random choice (and of the devices' fault injection).
    #[arg(long, default_value_t = 0x57e5_5eed)]
    pub seed: u64,

    /// Regions.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub regions: u32,

    /// Size of each region (suffixes K, M, G); rounded up to whole pages.
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    pub size: usize,

    /// Every other region (the odd ones) is a huge-page region
    /// (`map_huge`): first touches, migrations and device pages go in whole
    /// 2 MiB blocks where they can, and split where an operation takes part
    /// of one.
    #[arg(long)]
    pub huge: bool,

    /// The last region is shared anonymous memory (`map_shared`): it never
    /// migrates (only private anonymous memory does), but devices read and
    /// write it through their mirrors while everything else goes on.
    #[arg(long)]
    pub shared: bool,

    /// The first region is a file mapped shared (a temporary file in the
    /// system's temporary directory, removed at the end): it never migrates,
    /// and devices and the CPU write through to the file.
    #[arg(long)]
    pub file: bool,

    /// Devices (1 or 2).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
    pub devices: u32,

    /// The kind of device: `sim`, `compress` (store devices over compressed
    /// stores), or a far store's address (`file:PATH`, `redis://HOST:PORT`,
    /// …: store devices over sealed far stores, one namespace each). On a
    /// store device, device reads, writes and exclusive access, which a
    /// store has not, become CPU reads.
    #[arg(long, default_value = "sim", value_parser = parse_device)]
    pub device: DeviceKind,

    /// Chance that a device page allocation fails (`SimConfig::alloc_fail_rate`;
    /// with `--device compress`, that storing an object fails,
    /// `CompressConfig::alloc_fail_rate`).
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub alloc_fail_rate: f64,

    /// `--device compress`: the chance that a stored object has a bit
    /// flipped (`CompressConfig::corrupt_rate`): its pages come back lost.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub corrupt_rate: f64,

    /// `--device compress`: the RAM each compressed store's pool may use
    /// (suffixes K, M, G); a small one keeps it full. Default: room for
    /// everything.
    #[arg(long, value_parser = parse_size)]
    pub pool_size: Option<usize>,

    /// `--device compress`: a RAM budget (suffixes K, M, G) over the
    /// private anonymous regions. A tier (`uhmm_devices::tier::Tier`)
    /// demotes their coldest pages to device 0 to keep them under it; the
    /// budget alternates between this size and half of it every 2 seconds.
    /// The address space tracks writes and keeps no staging pages
    /// (`tier::space_config`), and the migrators' moves back to RAM, which
    /// no budget charges, take at most 64 pages and never release a whole
    /// device. The run fails when the tier's peak resident bytes pass this
    /// size plus the slack: 2 MiB per fault-handling thread and 2% of the
    /// budget. The tier is taken away before the final migration and
    /// eviction.
    #[arg(long, value_parser = parse_size)]
    pub ram_budget: Option<usize>,

    /// Faults answered in the faulting threads' SIGBUS handlers
    /// (`FaultDelivery::Signal`) instead of by the handler threads. Not
    /// with `--corrupt-rate`: a page found lost while `Region::read`
    /// copies with loads is a SIGBUS rather than an error.
    #[arg(long)]
    pub signal_faults: bool,

    /// Chance per copy operation (a run of adjacent pages) that a copy job to a device fails
    /// (`SimConfig::copy_error_rate`).
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub copy_error_rate: f64,

    /// Chance per page coming back to RAM that the device gets no RAM page
    /// for it and keeps it, to retry (`SimConfig::copy_back_fail_rate`).
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub copy_back_fail_rate: f64,

    /// Each DMA job waits a random 0 to this many microseconds: slow
    /// completions (`SimConfig::dma_delay_us`).
    #[arg(long, default_value_t = 0)]
    pub dma_delay_us: u64,

    /// DMA channels per device (`SimConfig::dma_channels`): with more than
    /// one, jobs (and parts of big jobs) complete out of order.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8))]
    pub dma_channels: u64,

    /// Seconds between checkpoints (all threads stop, every byte is verified).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint: u64,

    /// A thread that makes no progress for this many seconds is a hang: the
    /// run is reported and ends with exit status 3.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub watchdog: u64,

    /// Test of the watchdog: a second into the run, a migrator sets up a
    /// migration of region 0 and never finishes it, so CPU accesses to those
    /// pages wait forever. The run must end in a hang report.
    #[arg(long, hide = true)]
    pub inject_hang: bool,
}

/// `--file`'s temporary file, removed when dropped.
struct TempFile {
    path: std::path::PathBuf,
    file: std::fs::File,
}

impl TempFile {
    fn new(len: usize) -> uhmm::Result<TempFile> {
        let path = std::env::temp_dir().join(format!("uhmm-stress-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|f| f.set_len(len as u64).map(|()| f))
            .map_err(|e| uhmm::Error::sys("creating the --file temporary file", e))?;
        Ok(TempFile { path, file })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// What a worker is doing, for the watchdog's report.
#[derive(Debug)]
struct Slot {
    name: String,
    progress: AtomicU64,
    active: AtomicBool,
    state: Mutex<String>,
}

impl Slot {
    fn new(name: String) -> Slot {
        Slot { name, progress: AtomicU64::new(0), active: AtomicBool::new(false), state: Mutex::new("idle".into()) }
    }

    fn set(&self, state: String) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    fn tick(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counters of the run.
#[derive(Debug, Default)]
struct Totals {
    reads: AtomicU64,
    writes: AtomicU64,
    device_reads: AtomicU64,
    device_writes: AtomicU64,
    discards: AtomicU64,
    page_moves: AtomicU64,
    exclusives: AtomicU64,
    protects: AtomicU64,
    migrations: AtomicU64,
    migration_errors_expected: AtomicU64,
    releases: AtomicU64,
    bytes_verified: AtomicU64,
    /// Bytes found wrong or unreadable.
    lost: AtomicU64,
    /// Pages found poisoned because the store reported them lost (an
    /// injected corruption): accounted, not lost bytes.
    lost_by_injection: Mutex<std::collections::HashSet<(usize, usize)>>,
    /// Errors that should not happen (the first few are printed).
    unexpected: AtomicU64,
}

impl Totals {
    fn unexpected(&self, what: &str, err: &uhmm::Error) {
        if self.unexpected.fetch_add(1, Ordering::Relaxed) < 10 {
            eprintln!("uhmm stress: unexpected error in {what}: {err} ({:?})", err.kind());
        }
    }
}

/// Everything the threads share.
struct World {
    space: AddressSpace,
    regions: Vec<Region>,
    devices: Vec<Device>,
    writers: usize,
    totals: Totals,
    /// When `--inject-hang` holds a migration forever.
    hang_at: Option<Instant>,
    /// Under `--ram-budget`: moves back to RAM stay small.
    budgeted: bool,
}

/// The shadows of writer `t`: per region, the bytes of the pages it owns
/// (page `p` of the region is local page `p / writers`).
type Shadow = Vec<Vec<u8>>;

impl World {
    fn npages(&self, r: usize) -> usize {
        self.regions[r].npages()
    }

    /// The shadow bytes of page `p` of region `r`.
    fn page<'a>(&self, shadows: &'a [Shadow], r: usize, p: usize) -> &'a [u8] {
        let local = p / self.writers;
        &shadows[p % self.writers][r][local * PAGE_SIZE..(local + 1) * PAGE_SIZE]
    }

    /// Compares `got` (pages `first..` of region `r`) with the shadows;
    /// counts wrong bytes and reports the first.
    fn compare(&self, shadows: &[Shadow], r: usize, first: usize, got: &[u8], how: &str) -> u64 {
        let mut wrong = 0;
        for (i, page) in got.chunks_exact(PAGE_SIZE).enumerate() {
            let want = self.page(shadows, r, first + i);
            if page != want {
                let n = page.iter().zip(want).filter(|(a, b)| a != b).count() as u64;
                if wrong == 0 {
                    eprintln!("uhmm stress: {how}: region {r} page {} has {n} wrong byte(s)", first + i);
                }
                wrong += n;
            }
        }
        self.totals.bytes_verified.fetch_add(got.len() as u64, Ordering::Relaxed);
        wrong
    }

    /// Whether page `p` of region `r` is poisoned because its store reported
    /// it lost (an injected corruption); records it.
    fn lost_by_injection(&self, r: usize, p: usize) -> bool {
        let injected =
            self.devices.iter().any(|d| matches!(d, Device::Compress(_, s) if s.config().corrupt_rate > 0.0));
        let addr = self.regions[r].addr() + p * PAGE_SIZE;
        let poisoned = self.space.snapshot(addr..addr + PAGE_SIZE).is_ok_and(|s| s[0].residency == Residency::Poisoned);
        if injected && poisoned {
            self.totals.lost_by_injection.lock().unwrap_or_else(|e| e.into_inner()).insert((r, p));
        }
        injected && poisoned
    }

    /// Verifies every byte of every region, through the CPU or through
    /// device `dev`'s reads (the CPU's for a store device). Returns the
    /// bytes wrong or unreadable.
    fn verify_all(&self, shadows: &[Shadow], dev: Option<usize>, slot: &Slot) -> u64 {
        const CHUNK: usize = 256;
        let mut wrong = 0;
        let mut buf = vec![0u8; CHUNK * PAGE_SIZE];
        for r in 0..self.regions.len() {
            let n = self.npages(r);
            let mut p = 0;
            while p < n {
                let k = CHUNK.min(n - p);
                let buf = &mut buf[..k * PAGE_SIZE];
                slot.set(format!("verifying region {r} pages {p}..{} ({dev:?})", p + k));
                let how = match dev {
                    None => "CPU verify",
                    Some(_) => "device verify",
                };
                let res = match dev.and_then(|d| self.devices[d].sim()) {
                    None => self.regions[r].read(p * PAGE_SIZE, buf),
                    Some(d) => d.read(self.regions[r].addr() + p * PAGE_SIZE, k, buf).map(|_| ()),
                };
                match res {
                    Ok(()) => wrong += self.compare(shadows, r, p, buf, how),
                    Err(e) if e.kind() == ErrorKind::Fault => {
                        // Page by page: a page lost by injection is accounted.
                        for (i, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
                            match self.regions[r].read((p + i) * PAGE_SIZE, page) {
                                Ok(()) => wrong += self.compare(shadows, r, p + i, page, how),
                                Err(e) if self.lost_by_injection(r, p + i) => drop(e),
                                Err(e) => {
                                    self.totals.unexpected(how, &e);
                                    wrong += PAGE_SIZE as u64;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        self.totals.unexpected(how, &e);
                        wrong += buf.len() as u64;
                    }
                }
                slot.tick();
                p += k;
            }
        }
        wrong
    }
}

/// One writer's loop for one phase.
fn writer(w: &World, t: usize, shadow: &mut Shadow, rng: &mut Rng, slot: &Slot, stop: &AtomicBool) {
    let owned = |r: usize| w.npages(r).saturating_sub(t).div_ceil(w.writers);
    let mut buf = vec![0u8; PAGE_SIZE];
    while !stop.load(Ordering::Relaxed) {
        let r = rng.below(w.regions.len());
        if owned(r) == 0 {
            slot.tick();
            continue;
        }
        let local = rng.below(owned(r));
        let p = t + local * w.writers;
        let region = &w.regions[r];
        let page_off = p * PAGE_SIZE;
        let shadow_page = &mut shadow[r][local * PAGE_SIZE..(local + 1) * PAGE_SIZE];
        let op = rng.below(100);
        if op < 40 {
            // Write a random span of the page, and record it.
            let off = rng.below(PAGE_SIZE);
            let len = 1 + rng.below(PAGE_SIZE - off);
            let byte = rng.next() as u8;
            for (j, b) in buf[..len].iter_mut().enumerate() {
                *b = byte.wrapping_add(j as u8);
            }
            slot.set(format!("writing region {r} page {p} +{off} len {len}"));
            match region.write(page_off + off, &buf[..len]) {
                Ok(()) => shadow_page[off..off + len].copy_from_slice(&buf[..len]),
                Err(e) if e.kind() == ErrorKind::Fault && w.lost_by_injection(r, p) => {
                    w.drop_lost(region, page_off, shadow_page);
                }
                Err(e) => w.write_failed("write", &e, len, region, page_off, shadow_page),
            }
            w.totals.writes.fetch_add(1, Ordering::Relaxed);
        } else if op < 72 || (w.devices[0].sim().is_none() && (op < 86 || (93..95).contains(&op))) {
            // Read the whole page through the CPU and check it.
            slot.set(format!("reading region {r} page {p}"));
            match region.read(page_off, &mut buf) {
                Err(e) if e.kind() == ErrorKind::Fault && w.lost_by_injection(r, p) => {
                    w.drop_lost(region, page_off, shadow_page);
                }
                read => w.check_read(read, shadow_page, &buf, r, p, "CPU read"),
            }
            w.totals.reads.fetch_add(1, Ordering::Relaxed);
        } else if let Some(dev) = (op < 80).then(|| w.devices[rng.below(w.devices.len())].sim()).flatten() {
            // Read the page through a device (its mirror, or its own memory).
            slot.set(format!("device reading region {r} page {p}"));
            match dev.read(region.addr() + page_off, 1, &mut buf) {
                Err(e) if e.kind() == ErrorKind::Busy => {}
                read => w.check_read(read.map(|_| ()), shadow_page, &buf, r, p, "device read"),
            }
            w.totals.device_reads.fetch_add(1, Ordering::Relaxed);
        } else if let Some(dev) = (op < 86).then(|| w.devices[rng.below(w.devices.len())].sim()).flatten() {
            // The device writes the whole page (faulting it in for writing
            // where its mirror lacks it).
            let byte = rng.next() as u8;
            for (j, b) in buf.iter_mut().enumerate() {
                *b = byte ^ (j as u8);
            }
            slot.set(format!("device writing region {r} page {p}"));
            match dev.write(region.addr() + page_off, 1, &buf) {
                Ok(_) => shadow_page.copy_from_slice(&buf),
                // Invalidations kept racing its fault: nothing was written.
                Err(e) if e.kind() == ErrorKind::Busy => {}
                Err(e) => w.write_failed("device write", &e, PAGE_SIZE, region, page_off, shadow_page),
            }
            w.totals.device_writes.fetch_add(1, Ordering::Relaxed);
        } else if op < 89 {
            // Drop the page wherever it is: private memory reads as zeros
            // from now on.
            slot.set(format!("discarding region {r} page {p}"));
            match region.discard(page_off..page_off + PAGE_SIZE) {
                // Shared memory keeps its contents (MADV_DONTNEED).
                Ok(()) if region.backing() != uhmm::Backing::Anonymous => {}
                Ok(()) => shadow_page.fill(0),
                Err(e) => {
                    w.totals.unexpected("discard", &e);
                    let _ = region.read(page_off, shadow_page);
                }
            }
            w.totals.discards.fetch_add(1, Ordering::Relaxed);
        } else if op < 93 {
            // move_pages of the page to a device or to RAM: data unchanged.
            let target = match rng.below(w.devices.len() + 1) {
                0 => uhmm::MoveTarget::Ram,
                d => uhmm::MoveTarget::Device(w.devices[d - 1].pagemap().id()),
            };
            slot.set(format!("move_pages region {r} page {p} to {target:?}"));
            match uhmm::move_pages(&w.space, &[region.addr() + page_off], Some(&[target])) {
                // Per-page statuses (busy, no memory) are the kernel's; an
                // injected copy error stops the call, leaving the page.
                Ok(_) => {}
                Err(e) if expected(&e) => {}
                Err(e) => w.totals.unexpected("move_pages", &e),
            }
            w.totals.page_moves.fetch_add(1, Ordering::Relaxed);
        } else if let Some(dev) = (op < 95).then(|| w.devices[rng.below(w.devices.len())].sim()).flatten() {
            // A device takes exclusive access; the next CPU access revokes it.
            slot.set(format!("device taking region {r} page {p} exclusive"));
            match dev.exclusive(region.addr() + page_off, 1) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::Busy | ErrorKind::NotFound) => {}
                // Only private anonymous memory can be held exclusive.
                Err(e) if e.kind() == ErrorKind::InvalidArgument && region.backing() != uhmm::Backing::Anonymous => {}
                Err(e) => w.totals.unexpected("exclusive", &e),
            }
            w.totals.exclusives.fetch_add(1, Ordering::Relaxed);
        } else {
            // Make the page read-only for a moment: reads work, writes are
            // refused, nothing changes; then make it writable again.
            slot.set(format!("protecting region {r} page {p}"));
            let range = page_off..page_off + PAGE_SIZE;
            match region.protect(range.clone(), Prot::READ) {
                Ok(()) => {
                    match region.write(page_off, &buf[..1]) {
                        Err(e) if e.kind() == ErrorKind::Permission => {}
                        // Lost by injection: checked on the read below.
                        Err(e) if e.kind() == ErrorKind::Fault && w.lost_by_injection(r, p) => {}
                        Err(e) => w.totals.unexpected("write to a read-only page", &e),
                        Ok(()) => {
                            eprintln!("uhmm stress: a write to read-only region {r} page {p} succeeded");
                            w.totals.lost.fetch_add(1, Ordering::Relaxed);
                            shadow_page[0] = buf[0];
                        }
                    }
                    let read = region.read(page_off, &mut buf);
                    if let Err(e) = region.protect(range, Prot::READ_WRITE) {
                        w.totals.unexpected("protect READ_WRITE", &e);
                    }
                    match read {
                        Err(e) if e.kind() == ErrorKind::Fault && w.lost_by_injection(r, p) => {
                            w.drop_lost(region, page_off, shadow_page);
                        }
                        read => w.check_read(read, shadow_page, &buf, r, p, "read-only read"),
                    }
                }
                Err(e) => w.totals.unexpected("protect READ", &e),
            }
            w.totals.protects.fetch_add(1, Ordering::Relaxed);
        }
        slot.tick();
    }
}

impl World {
    /// A page its store lost (injected): its writer discards it, and it
    /// reads as zeros from then on, as a program would start it over.
    fn drop_lost(&self, region: &Region, off: usize, shadow: &mut [u8]) {
        match region.discard(off..off + PAGE_SIZE) {
            Ok(()) => shadow.fill(0),
            Err(e) => self.totals.unexpected("discarding a lost page", &e),
        }
    }

    /// Checks a page a writer read (through the CPU or a device) against
    /// its shadow; a failed read counts the whole page as lost.
    fn check_read(&self, read: uhmm::Result<()>, shadow: &[u8], got: &[u8], r: usize, p: usize, how: &str) {
        let bad = match read {
            Ok(()) => self.compare_one(shadow, got, r, p, how),
            Err(e) => {
                self.totals.unexpected(how, &e);
                PAGE_SIZE as u64
            }
        };
        self.totals.lost.fetch_add(bad, Ordering::Relaxed);
    }

    /// A write of `len` bytes failed: a failure, and its bytes may or may
    /// not have landed, so the shadow is re-read from the page.
    fn write_failed(&self, what: &str, e: &uhmm::Error, len: usize, region: &Region, off: usize, shadow: &mut [u8]) {
        self.totals.unexpected(what, e);
        self.totals.lost.fetch_add(len as u64, Ordering::Relaxed);
        let _ = region.read(off, shadow);
    }

    /// Wrong bytes of one page read by its writer.
    fn compare_one(&self, want: &[u8], got: &[u8], r: usize, p: usize, how: &str) -> u64 {
        self.totals.bytes_verified.fetch_add(got.len() as u64, Ordering::Relaxed);
        if want == got {
            return 0;
        }
        let n = want.iter().zip(got).filter(|(a, b)| a != b).count() as u64;
        eprintln!("uhmm stress: {how}: region {r} page {p} has {n} wrong byte(s)");
        n
    }
}

/// Whether a migration error is one the soak provokes on purpose: pages
/// busy or left behind (`NotFound`, `Busy`, `NoMemory`), or an injected copy
/// error.
fn expected(err: &uhmm::Error) -> bool {
    match err.kind() {
        ErrorKind::NotFound | ErrorKind::Busy | ErrorKind::NoMemory => true,
        ErrorKind::Fault => err.to_string().contains("injected copy error"),
        _ => false,
    }
}

/// One migrator's loop for one phase.
fn migrator(w: &World, rng: &mut Rng, slot: &Slot, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        if w.hang_at.is_some_and(|at| Instant::now() >= at) && slot.name == "migrator-0" {
            hold_forever(w, slot);
        }
        let r = rng.below(w.regions.len());
        let n = w.npages(r);
        // Ranges from one page to a quarter of the region, skewed small.
        let max = (n / 4).max(1);
        let cap = if rng.below(4) == 0 { max } else { max.min(64) };
        let len = 1 + rng.below(cap);
        let first = rng.below(n - len.min(n) + 1);
        let len = len.min(n - first);
        let addr = w.regions[r].addr() + first * PAGE_SIZE;
        let d = rng.below(w.devices.len());
        let op = rng.below(100);
        // Under a budget, moves back to RAM (which it does not charge) stay
        // small, and no release brings a whole device back.
        let (op, len) = if w.budgeted && op >= 50 { (op.min(96), len.min(64)) } else { (op, len) };
        let (what, res) = if op < 50 {
            slot.set(format!("migrate_to_device dev {d} region {r} pages {first}..{}", first + len));
            ("migrate_to_device", w.devices[d].to_device_once(addr, len))
        } else if op < 97 {
            slot.set(format!("migrate_to_system dev {d} region {r} pages {first}..{}", first + len));
            ("migrate_to_system", w.devices[d].to_system(addr, len).map(drop))
        } else {
            slot.set(format!("release dev {d}"));
            w.totals.releases.fetch_add(1, Ordering::Relaxed);
            ("release", w.devices[d].release().map(|_| ()))
        };
        w.totals.migrations.fetch_add(1, Ordering::Relaxed);
        match res {
            Ok(()) => {}
            Err(e) if expected(&e) => {
                w.totals.migration_errors_expected.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => w.totals.unexpected(what, &e),
        }
        slot.tick();
    }
}

/// `--inject-hang`: sets up a migration of region 0 and never finishes it.
/// Its pages stay locked and unmapped, so every CPU access to them waits in
/// a fault: a real hang, for the watchdog to report. The holder itself
/// stays alive (it ticks), so the threads reported stuck are its victims,
/// and the report shows what it holds.
fn hold_forever(w: &World, slot: &Slot) -> ! {
    slot.set("holding a migration of region 0 forever (--inject-hang)".into());
    let held = uhmm::Migration::setup(&w.space, w.regions[0].range(), uhmm::Select::SYSTEM, w.devices[0].owner());
    if let Err(e) = &held {
        eprintln!("uhmm stress: --inject-hang could not set up its migration: {e}");
    }
    loop {
        std::thread::sleep(Duration::from_millis(100));
        slot.tick();
    }
}

/// Watches the slots; a thread active and without progress for `limit` is
/// reported and the process exits with status 3.
fn watchdog(slots: &[Arc<Slot>], limit: Duration, done: &AtomicBool) {
    let mut last: Vec<(u64, Instant)> =
        slots.iter().map(|s| (s.progress.load(Ordering::Relaxed), Instant::now())).collect();
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        let now = Instant::now();
        let mut stuck = Vec::new();
        for (s, (seen, since)) in slots.iter().zip(last.iter_mut()) {
            let p = s.progress.load(Ordering::Relaxed);
            if p != *seen || !s.active.load(Ordering::Relaxed) {
                *seen = p;
                *since = now;
            } else if now - *since > limit {
                stuck.push(s);
            }
        }
        if !stuck.is_empty() {
            println!("HANG: {} thread(s) made no progress for {} s:", stuck.len(), limit.as_secs());
            for s in slots {
                let state = s.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let mark = if stuck.iter().any(|x| Arc::ptr_eq(x, s)) { "STUCK" } else { "ok" };
                println!("  {:<12} {mark:<5} progress {:>10}  {state}", s.name, s.progress.load(Ordering::Relaxed));
            }
            println!("uhmm stress: FAILED: hang detected");
            std::process::exit(3);
        }
    }
}

/// Runs the soak; exit 0 only when no byte was lost and nothing hung.
pub fn run(args: &StressArgs) -> ExitCode {
    match soak(args) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => {
            println!(
                "uhmm stress: FAILED: bytes were lost or corrupted, errors happened, or the RAM budget was passed"
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("uhmm stress: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// How often `--ram-budget`'s budget changes between its size and half of it.
const BUDGET_PERIOD: Duration = Duration::from_secs(2);

/// The budget `elapsed` into the run: `full`, then half of it, in turns.
fn budget_at(full: usize, elapsed: Duration) -> u64 {
    let half = (elapsed.as_millis() / BUDGET_PERIOD.as_millis()) % 2 == 1;
    (if half { full / 2 } else { full }).max(PAGE_SIZE) as u64
}

/// The soak; returns lost bytes plus unexpected errors (plus one when the
/// RAM budget was passed).
fn soak(args: &StressArgs) -> uhmm::Result<u64> {
    let start = Instant::now();
    if args.ram_budget.is_some() && !args.device.is_store() {
        return Err(uhmm::Error::invalid(
            "--ram-budget needs a store device (compress, file:…, redis://…): the tier demotes to a store",
        ));
    }
    if args.ram_budget.is_some_and(|b| b < 2 * PAGE_SIZE) {
        return Err(uhmm::Error::invalid("--ram-budget must be at least two pages"));
    }
    // Read-ahead on, so its migrations race with everything else too; under
    // a budget, what a tier needs too.
    let base = if args.ram_budget.is_some() { uhmm_devices::tier::space_config() } else { Config::default() };
    let fault_delivery = if args.signal_faults { FaultDelivery::Signal } else { FaultDelivery::Handlers };
    let space = AddressSpace::new(Config { read_ahead_windows: 2, fault_delivery, ..base })?;
    if args.corrupt_rate > 0.0 && args.signal_faults {
        return Err(uhmm::Error::invalid(
            "--corrupt-rate does not go with --signal-faults: a page found lost while Region::read copies with \
             loads is a SIGBUS rather than an error",
        ));
    }
    if args.corrupt_rate > 0.0 && space.user_mode_only() {
        return Err(uhmm::Error::new(
            ErrorKind::Unsupported,
            "--corrupt-rate needs a full userfaultfd: with a user-mode-only one, Region::read copies with loads, \
             and a page found lost on the way is a SIGBUS rather than an error",
        ));
    }
    let size = args.size.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
    let mut regions = Vec::new();
    let file = args.file.then(|| TempFile::new(size)).transpose()?;
    for r in 0..args.regions {
        let region = if let Some(f) = file.as_ref().filter(|_| r == 0) {
            space.map_file(&f.file, 0, size, Prot::READ_WRITE, true)?
        } else if args.shared && r + 1 == args.regions {
            space.map_shared(size, Prot::READ_WRITE)?
        } else if args.huge && r % 2 == 1 {
            space.map_huge(size, Prot::READ_WRITE)?
        } else {
            space.map(size, Prot::READ_WRITE)?
        };
        regions.push(region);
    }
    let total: usize = regions.iter().map(Region::len).sum();
    // Room for everything on each device, in small chunks.
    let capacity = total.div_ceil(2 << 20).max(1) * (2 << 20);
    let mut devices = Vec::new();
    for d in 0..args.devices {
        let seed = args.seed ^ (0xd0 + u64::from(d));
        devices.push(match &args.device {
            DeviceKind::Sim => {
                let config = SimConfig {
                    capacity_bytes: capacity,
                    chunk_bytes: 2 << 20,
                    // Small chunks interleave more; with huge regions, chunks
                    // big enough to hold whole 2 MiB blocks.
                    migrate_chunk_pages: if args.huge { 2048 } else { 64 },
                    alloc_fail_rate: args.alloc_fail_rate,
                    copy_error_rate: args.copy_error_rate,
                    copy_back_fail_rate: args.copy_back_fail_rate,
                    dma_delay_us: args.dma_delay_us,
                    dma_channels: args.dma_channels as usize,
                    fault_seed: seed,
                    ..SimConfig::default()
                };
                Device::Sim(SimDevice::new(&space, config)?)
            }
            DeviceKind::Compress => {
                let config = CompressConfig {
                    capacity_bytes: args.pool_size.unwrap_or(capacity),
                    alloc_fail_rate: args.alloc_fail_rate,
                    corrupt_rate: args.corrupt_rate,
                    fault_seed: seed,
                    ..CompressConfig::default()
                };
                let store = Arc::new(CompressStore::new(config)?);
                let chunk = StoreDeviceConfig { migrate_chunk_pages: 64, ..StoreDeviceConfig::default() };
                Device::Compress(Arc::new(StoreDevice::new(&space, store.clone(), chunk)?), store)
            }
            DeviceKind::Far(address) => Device::far(&space, address, 64)?,
            DeviceKind::Cuda { .. } => {
                return Err(uhmm::Error::new(
                    uhmm::ErrorKind::Unsupported,
                    "uhmm stress does not run on the CUDA device",
                ));
            }
        });
    }
    let writers = args.threads as usize;
    let hang_at = args.inject_hang.then(|| start + Duration::from_secs(1));
    let w = World {
        space: space.clone(),
        regions,
        devices,
        writers,
        totals: Totals::default(),
        hang_at,
        budgeted: args.ram_budget.is_some(),
    };
    // The RAM budget over the private anonymous regions, demoting to device 0.
    let mut tier = None;
    let mut managed = Vec::new();
    if let (Some(budget), Some(dev)) = (args.ram_budget, w.devices[0].store_device()) {
        let config = TierConfig { budget_bytes: budget as u64, ..TierConfig::default() };
        let t = Tier::new(&space, dev.clone(), config)?;
        for r in w.regions.iter().filter(|r| r.backing() == uhmm::Backing::Anonymous) {
            t.manage(r.range())?;
            managed.push(r.range());
        }
        tier = Some(t);
    }
    // Every page starts as zeros (never touched), and so do the shadows.
    let mut shadows: Vec<Shadow> = (0..writers)
        .map(|t| {
            (0..w.regions.len())
                .map(|r| vec![0u8; w.npages(r).saturating_sub(t).div_ceil(writers) * PAGE_SIZE])
                .collect()
        })
        .collect();
    let migrators = 2;
    let mut slots: Vec<Arc<Slot>> = (0..writers).map(|t| Arc::new(Slot::new(format!("writer-{t}")))).collect();
    slots.extend((0..migrators).map(|m| Arc::new(Slot::new(format!("migrator-{m}")))));
    let main_slot = Arc::new(Slot::new("verifier".into()));
    slots.push(main_slot.clone());
    let done = Arc::new(AtomicBool::new(false));
    let wd = {
        let slots = slots.clone();
        let done = done.clone();
        let limit = Duration::from_secs(args.watchdog);
        std::thread::Builder::new()
            .name("stress-watchdog".into())
            .spawn(move || watchdog(&slots, limit, &done))
            .map_err(|e| uhmm::Error::sys("spawn watchdog", e))?
    };
    let mut rngs: Vec<Rng> =
        (0..writers + migrators).map(|i| Rng(args.seed ^ (i as u64).wrapping_mul(0x1234_5678_9abc_def1))).collect();
    println!(
        "uhmm stress: {} s, {writers} writer(s), {migrators} migrator(s), {} region(s) of {};{} {} device(s), alloc-fail-rate {}, copy-error-rate {}, copy-back-fail-rate {}, dma-delay-us {}, dma-channels {}, seed {:#x}",
        args.seconds,
        w.regions.len(),
        human(size),
        [(args.file, " the first a shared file;"), (args.huge, " odd ones huge;"), (args.shared, " the last shared;")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, what)| *what)
            .collect::<String>(),
        w.devices.len(),
        args.alloc_fail_rate,
        args.copy_error_rate,
        args.copy_back_fail_rate,
        args.dma_delay_us,
        args.dma_channels,
        args.seed
    );
    if let Some(full) = args.ram_budget {
        println!(
            "  ram budget {} and {} in turns every {} s over {} region(s), demoting to device 0",
            human(full),
            human(full / 2),
            BUDGET_PERIOD.as_secs(),
            managed.len()
        );
    }
    let deadline = start + Duration::from_secs(args.seconds);
    let checkpoints = AtomicUsize::new(0);
    let mut lost_at_checkpoints = 0;
    main_slot.active.store(true, Ordering::Relaxed);
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let phase = Duration::from_secs(args.checkpoint).min(deadline - now);
        let stop = AtomicBool::new(false);
        main_slot.set(format!("running phase {}", checkpoints.load(Ordering::Relaxed)));
        std::thread::scope(|s| {
            let (wr, mr) = rngs.split_at_mut(writers);
            for (t, (shadow, rng)) in shadows.iter_mut().zip(wr.iter_mut()).enumerate() {
                let slot = slots[t].clone();
                let (w, stop) = (&w, &stop);
                s.spawn(move || {
                    slot.active.store(true, Ordering::Relaxed);
                    writer(w, t, shadow, rng, &slot, stop);
                    slot.set("idle".into());
                    slot.active.store(false, Ordering::Relaxed);
                });
            }
            for (m, rng) in mr.iter_mut().enumerate() {
                let slot = slots[writers + m].clone();
                let (w, stop) = (&w, &stop);
                s.spawn(move || {
                    slot.active.store(true, Ordering::Relaxed);
                    migrator(w, rng, &slot, stop);
                    slot.set("idle".into());
                    slot.active.store(false, Ordering::Relaxed);
                });
            }
            let end = Instant::now() + phase;
            while Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
                main_slot.tick();
                if let (Some(t), Some(full)) = (&tier, args.ram_budget) {
                    let budget = budget_at(full, start.elapsed());
                    if t.budget() != budget
                        && let Err(e) = t.set_budget(budget)
                    {
                        w.totals.unexpected("set_budget", &e);
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            main_slot.set("waiting for the workers to stop".into());
        });
        // A checkpoint: everything stopped; verify every byte, through the
        // CPU and through each device.
        let n = checkpoints.fetch_add(1, Ordering::Relaxed);
        let mut lost = w.verify_all(&shadows, None, &main_slot);
        let d = n % w.devices.len();
        lost += w.verify_all(&shadows, Some(d), &main_slot);
        lost_at_checkpoints += lost;
        let ops = w.totals.reads.load(Ordering::Relaxed) + w.totals.writes.load(Ordering::Relaxed);
        println!(
            "  checkpoint {n} at {:>5.1} s: {ops} reads+writes, {} migrations, verified (CPU, device {d}): {lost} byte(s) wrong",
            start.elapsed().as_secs_f64(),
            w.totals.migrations.load(Ordering::Relaxed),
        );
    }
    // The budget ends here: the final moves would pass it on purpose.
    let tier_stats: Option<TierStats> = tier.take().map(|t| {
        let stats = t.stats();
        for range in managed.drain(..) {
            t.unmanage(range);
        }
        stats
    });
    // The end: move everything to device 0 (what can go), verify through
    // device reads, evict every device, verify through the CPU.
    main_slot.set("final migration to device 0".into());
    for r in &w.regions {
        if let Err(e) = w.devices[0].to_device_once(r.addr(), r.npages())
            && !expected(&e)
        {
            w.totals.unexpected("final migrate_to_device", &e);
        }
    }
    let mut lost_final = w.verify_all(&shadows, Some(0), &main_slot);
    for (d, dev) in w.devices.iter().enumerate() {
        main_slot.set(format!("final release of device {d}"));
        match dev.release() {
            Ok(_) => {}
            Err(e) => w.totals.unexpected("final release", &e),
        }
        if dev.pages_in_use() != 0 {
            eprintln!("uhmm stress: device {d} still holds {} page(s) after release", dev.pages_in_use());
            w.totals.unexpected.fetch_add(1, Ordering::Relaxed);
        }
    }
    lost_final += w.verify_all(&shadows, None, &main_slot);
    main_slot.active.store(false, Ordering::Relaxed);
    done.store(true, Ordering::Relaxed);
    let _ = wd.join();

    let t = &w.totals;
    let stats = space.stats();
    let lost = t.lost.load(Ordering::Relaxed) + lost_at_checkpoints + lost_final;
    let unexpected = t.unexpected.load(Ordering::Relaxed);
    let (mut inj_alloc, mut inj_copy, mut inj_back, mut inj_corrupt, mut store_lost) = (0, 0, 0, 0, 0);
    for dev in &w.devices {
        match dev {
            Device::Sim(d) => {
                let (a, c) = d.injected_faults();
                inj_alloc += a;
                inj_copy += c;
                inj_back += d.injected_copy_back_failures();
            }
            Device::Compress(_, store) => {
                let st = store.stats();
                inj_alloc += st.injected_alloc_failures;
                inj_corrupt += st.injected_corruptions;
                store_lost += st.lost_pages;
            }
            Device::Far(..) => {}
        }
    }
    let ops = t.reads.load(Ordering::Relaxed)
        + t.writes.load(Ordering::Relaxed)
        + t.device_reads.load(Ordering::Relaxed)
        + t.device_writes.load(Ordering::Relaxed)
        + t.discards.load(Ordering::Relaxed)
        + t.page_moves.load(Ordering::Relaxed)
        + t.exclusives.load(Ordering::Relaxed)
        + t.protects.load(Ordering::Relaxed)
        + t.migrations.load(Ordering::Relaxed);
    println!("uhmm stress: done in {:.1} s", start.elapsed().as_secs_f64());
    println!("  operations done:          {ops}");
    println!("    CPU writes:             {}", t.writes.load(Ordering::Relaxed));
    println!("    CPU reads:              {}", t.reads.load(Ordering::Relaxed));
    println!("    device reads:           {}", t.device_reads.load(Ordering::Relaxed));
    println!("    device writes:          {}", t.device_writes.load(Ordering::Relaxed));
    println!("    discards:               {}", t.discards.load(Ordering::Relaxed));
    println!("    move_pages:             {}", t.page_moves.load(Ordering::Relaxed));
    println!("    exclusive grants:       {}", t.exclusives.load(Ordering::Relaxed));
    println!("    protection changes:     {}", t.protects.load(Ordering::Relaxed));
    println!(
        "    migrations:             {} ({} releases; {} ended with an expected error)",
        t.migrations.load(Ordering::Relaxed),
        t.releases.load(Ordering::Relaxed),
        t.migration_errors_expected.load(Ordering::Relaxed)
    );
    println!("  checkpoints:              {}", checkpoints.load(Ordering::Relaxed));
    println!(
        "  bytes verified:           {} ({})",
        t.bytes_verified.load(Ordering::Relaxed),
        human(t.bytes_verified.load(Ordering::Relaxed) as usize)
    );
    println!("  pages migrated:           {} to devices, {} to RAM", stats.pages_to_device, stats.pages_to_ram);
    println!(
        "  faults:                   {} (migrate_to_ram {}, {} of them read-aheads; zero-filled pages {})",
        stats.faults, stats.migrate_to_ram, stats.read_aheads, stats.zero_filled_pages
    );
    println!("  busy pages skipped:       {}", stats.busy_pages);
    println!("  stale faults only woken:  {}", stats.stale_faults);
    println!("  copied back through kept: {} pages", stats.kept_copied_pages);
    println!("  kept pages shed:          {} pages", stats.kept_shed_pages);
    println!("  helper stalls:            {}", stats.helper_stalls);
    println!("  handler stalls:           {}", stats.handler_stalls);
    let (compound, fallbacks) =
        w.devices.iter().filter_map(Device::sim).map(SimDevice::huge_stats).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    println!(
        "  huge pages:               {} first-touch fills, {compound} compound device pages, {fallbacks} blocks fell back",
        stats.huge_fills
    );
    println!("  poisoned pages:           {}", stats.poisoned_pages);
    println!(
        "  injected faults:          {inj_alloc} allocation failures, {inj_copy} copy errors, {inj_back} copy-back failures, {inj_corrupt} corrupted objects"
    );
    for (d, dev) in w.devices.iter().enumerate() {
        match dev {
            Device::Compress(_, store) => {
                let st = store.stats();
                println!(
                    "  device {d}: {} pages stored, {} loaded, {} objects refused by a full pool, {} pages reported lost",
                    st.pages_stored, st.pages_loaded, st.pool_full, st.lost_pages
                );
            }
            Device::Far(..) => println!("  device {d}: {}", dev.store_line()),
            Device::Sim(_) => {}
        }
    }
    if args.device == DeviceKind::Compress {
        let seen = t.lost_by_injection.lock().unwrap_or_else(|e| e.into_inner()).len();
        println!(
            "  pages lost by injection:  {store_lost} reported by the stores, {seen} of them seen poisoned by the soak"
        );
    }
    let mut over_budget = 0;
    if let (Some(ts), Some(full)) = (tier_stats, args.ram_budget) {
        let slack = space.config().handler_threads * (2 << 20) + full / 50;
        println!("  {}", tier_line(&ts));
        println!(
            "  ram budget:               peak resident {} against {} + slack {} ({} tracking rounds, {} reclaim rounds)",
            human(ts.peak_resident_bytes as usize),
            human(full),
            human(slack),
            ts.rounds,
            ts.reclaim_rounds
        );
        if ts.peak_resident_bytes > (full + slack) as u64 {
            println!("uhmm stress: the peak resident bytes passed the largest budget plus the slack");
            over_budget = 1;
        }
    }
    println!("  unexpected errors:        {unexpected}");
    println!("  lost or corrupted bytes: {lost}");
    // Every poisoned page must be one a store reported lost (a corrupted
    // object); any other is data lost.
    if stats.poisoned_pages != store_lost {
        println!("uhmm stress: {} page(s) poisoned, {store_lost} reported lost by the stores", stats.poisoned_pages);
        return Ok(lost + unexpected + over_budget + stats.poisoned_pages.abs_diff(store_lost).max(1));
    }
    Ok(lost + unexpected + over_budget)
}
