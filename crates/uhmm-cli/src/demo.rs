//! `uhmm demo`: fill a region, move it to a device (the sim device, the
//! compressed store, or a far store), touch part of it back from the CPU,
//! verify every byte. With `--ram-budget`, a [`Tier`] keeps the region's
//! resident pages under a budget all along, demoting to the store.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use uhmm::UffdOrigin as Origin;
use uhmm::{AddressSpace, Config, ErrorKind, PAGE_SIZE, Prot, Region, StatsSnapshot};
use uhmm_devices::compress::{CompressConfig, CompressStore};
use uhmm_devices::sim::{SimConfig, SimDevice};
use uhmm_devices::store::{StoreDevice, StoreDeviceConfig};
use uhmm_devices::tier::{Tier, TierConfig, TierStats};

use crate::devices::{Device, DeviceKind, parse_device, tier_line};
use crate::map::{self, Census, Layout};
use crate::units::{gbps, human, parse_fraction, parse_size};

/// Options of `uhmm demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Size of the region: bytes, or a number with suffix K, M, G (powers of
    /// 1024); rounded up to whole pages.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub size: usize,

    /// The part of the region (from its start) the CPU reads back after it
    /// has moved to the device; each access faults its pages back to RAM.
    #[arg(long, default_value_t = 0.25, value_parser = parse_fraction)]
    pub touch_fraction: f64,

    /// Pages per migration chunk: the batch the sim device's DMA engine
    /// copies at once (`SimConfig::migrate_chunk_pages`).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub chunk_pages: u32,

    /// Bytes per call of `migrate_to_device` / `migrate_to_system` (one
    /// progress step); suffixes as for --size.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub slice: usize,

    /// Pages a CPU fault on device memory may bring back at once
    /// (`Config::fault_around_pages`); default: the core's default.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub fault_around: Option<u32>,

    /// Seed of the fill pattern: each 64-bit word holds its index XOR this.
    #[arg(long, default_value_t = 0x5eed_c0de_d00d_f00d)]
    pub seed: u64,

    /// Characters per row of the residency map.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub map_width: u16,

    /// Most rows of the residency map (cells grow to fit).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub map_rows: u16,

    /// Do not draw progress bars (they are drawn only on a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,

    /// The device: `sim` (the embedded model of the kernel's test device),
    /// `compress` (the compressed store, lz4: the pages are compressed in
    /// RAM; its counters are printed as zram's `mm_stat`), or a far store,
    /// every page encrypted: `file:PATH` (a file; a directory: a private
    /// file in it) or `redis://[USER:PASSWORD@]HOST:PORT`
    /// (`rediss://` for TLS, `redis-cluster://HOST:PORT,…` for a cluster).
    #[arg(long, default_value = "sim", value_parser = parse_device)]
    pub device: DeviceKind,

    /// A store device (all but `sim`): run under a RAM budget (suffixes as
    /// for --size): a tier (`uhmm_devices::tier::Tier`) keeps the region's
    /// resident pages under it, demoting the coldest to the store, and the
    /// faults of the fill and of the reads wait for room.
    /// The part the demo would migrate back explicitly (which no budget
    /// charges) is read back by faults instead. A live line shows resident
    /// bytes against the budget, pages demoted and promoted, the promotion
    /// rate and the tracking's cost (a share of one CPU); the tier's
    /// counters follow each step and the summary.
    #[arg(long, value_parser = parse_size)]
    pub ram_budget: Option<usize>,
}

/// The name of the CPU touch-back step.
const TOUCH: &str = "CPU touch-back";

/// Bytes a CPU or device read/write call handles at once.
const IO_CHUNK: usize = 4 << 20;

/// An error of the demo: the step it happened in, and the cause.
#[derive(Debug)]
struct Failure {
    step: &'static str,
    err: uhmm::Error,
}

type Res<T> = std::result::Result<T, Failure>;

fn at(step: &'static str) -> impl FnOnce(uhmm::Error) -> Failure {
    move |err| Failure { step, err }
}

/// Runs the demo; the exit status says whether every byte was right.
pub fn run(args: &DemoArgs) -> ExitCode {
    if let DeviceKind::Cuda { fake } = args.device {
        return crate::gpu::demo(args, fake);
    }
    let result = Demo::new(args).and_then(|mut d| {
        let r = d.run();
        if r.is_err() {
            d.dump_state();
            // Report before tearing down: after a failed step, unmapping
            // the region may have to wait on pages that step left behind.
            report(&r);
            std::process::exit(2);
        }
        r
    });
    report(&result)
}

fn report(result: &Res<usize>) -> ExitCode {
    match *result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(wrong) => {
            eprintln!("uhmm demo: FAILED: {wrong} byte(s) read back wrong");
            ExitCode::from(1)
        }
        Err(ref f) => {
            eprintln!("uhmm demo: error while {}: {}", f.step, f.err);
            if f.err.kind() == ErrorKind::Unsupported {
                eprintln!(
                    "hint: uhmm needs userfaultfd: read-write access to /dev/userfaultfd, \
                     or `sysctl vm.unprivileged_userfaultfd=1`, or root; and Linux >= 6.8 (UFFDIO_MOVE)"
                );
            }
            ExitCode::from(2)
        }
    }
}

/// The word at byte offset `off` of the region (the fill pattern).
fn pattern(off: usize, seed: u64) -> u64 {
    (off / 8) as u64 ^ seed
}

/// Fills `buf` with the pattern of region bytes `off..off + buf.len()`.
fn fill_pattern(buf: &mut [u8], off: usize, seed: u64) {
    for (j, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&pattern(off + j * 8, seed).to_ne_bytes());
    }
}

/// Wrong bytes in `buf`, which should hold region bytes `off..`; the first
/// wrong offset goes to `first_bad`.
fn check(buf: &[u8], off: usize, seed: u64, first_bad: &mut Option<usize>) -> usize {
    let mut wrong = 0;
    for (j, w) in buf.chunks_exact(8).enumerate() {
        let got = u64::from_ne_bytes(w.try_into().unwrap_or([0; 8]));
        let want = pattern(off + j * 8, seed);
        if got != want {
            let diff = (got ^ want).to_ne_bytes().iter().filter(|b| **b != 0).count();
            wrong += diff;
            if first_bad.is_none() {
                *first_bad = Some(off + j * 8);
            }
        }
    }
    wrong
}

/// The counters of [`StatsSnapshot`], by name.
fn counters(s: &StatsSnapshot) -> [(&'static str, u64); 14] {
    [
        ("faults", s.faults),
        ("duplicate_faults", s.duplicate_faults),
        ("deferred_faults", s.deferred_faults),
        ("eagain", s.eagain),
        ("eexist", s.eexist),
        ("zero_filled_pages", s.zero_filled_pages),
        ("migrate_to_ram", s.migrate_to_ram),
        ("read_aheads", s.read_aheads),
        ("migrations", s.migrations),
        ("collected_pages", s.collected_pages),
        ("pages_to_device", s.pages_to_device),
        ("pages_to_ram", s.pages_to_ram),
        ("poisoned_pages", s.poisoned_pages),
        ("busy_pages", s.busy_pages),
    ]
}

/// One timed step, for the summary.
struct StepRecord {
    name: &'static str,
    bytes: usize,
    time: Duration,
    /// How the counters changed during the step.
    delta: StatsSnapshot,
}

/// `a - b`, counter by counter.
fn delta(a: &StatsSnapshot, b: &StatsSnapshot) -> StatsSnapshot {
    let mut d = *a;
    let fields = [
        (&mut d.faults, b.faults),
        (&mut d.duplicate_faults, b.duplicate_faults),
        (&mut d.deferred_faults, b.deferred_faults),
        (&mut d.eagain, b.eagain),
        (&mut d.eexist, b.eexist),
        (&mut d.zero_filled_pages, b.zero_filled_pages),
        (&mut d.migrate_to_ram, b.migrate_to_ram),
        (&mut d.read_aheads, b.read_aheads),
        (&mut d.migrations, b.migrations),
        (&mut d.collected_pages, b.collected_pages),
        (&mut d.pages_to_device, b.pages_to_device),
        (&mut d.pages_to_ram, b.pages_to_ram),
        (&mut d.poisoned_pages, b.poisoned_pages),
        (&mut d.busy_pages, b.busy_pages),
    ];
    for (x, y) in fields {
        *x = x.saturating_sub(y);
    }
    d
}

/// The progress-bar template.
const BAR_TEMPLATE: &str =
    "  {msg:<20} [{wide_bar:.cyan/blue}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}";

/// The tier's live line below a progress bar: [`tier_line`], short
/// enough for a terminal.
fn live_line(s: &TierStats) -> String {
    let cpu = s.tracking_cpu.as_secs_f64() / s.wall.as_secs_f64().max(1e-9) * 100.0;
    format!(
        "tier: {}/{} resident, demoted {}, promoted {} ({:.0}/s), tracking {cpu:.2}% CPU",
        human(s.resident_bytes as usize),
        human(s.budget_bytes as usize),
        s.demoted_pages,
        s.promoted_pages,
        s.promotion_rate
    )
}

/// The progress-bar template under a RAM budget: the tier's live line below.
const TIER_BAR_TEMPLATE: &str =
    "  {msg:<20} [{wide_bar:.cyan/blue}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}\n  {tier}";

struct Demo<'a> {
    // First, so that it lets go of the region before the region goes.
    tier: Option<Arc<Tier>>,
    args: &'a DemoArgs,
    space: AddressSpace,
    // Declared before `region` so that the region is dropped first: its
    // device pages are then freed with it rather than evicted to RAM.
    dev: Device,
    region: Region,
    layout: Layout,
    steps: Vec<StepRecord>,
    stats: StatsSnapshot,
    wrong: usize,
    first_bad: Option<usize>,
    step_no: usize,
}

impl<'a> Demo<'a> {
    fn new(args: &'a DemoArgs) -> Res<Demo<'a>> {
        if args.size == 0 {
            return Err(at("checking --size")(uhmm::Error::invalid("the size must be at least one byte")));
        }
        let size = args
            .size
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or_else(|| at("checking --size")(uhmm::Error::invalid("size overflows")))?;
        if args.ram_budget.is_some() && !args.device.is_store() {
            return Err(at("checking --ram-budget")(uhmm::Error::invalid(
                "--ram-budget needs a store device (compress, file:…, redis://…): the tier demotes to a store",
            )));
        }
        let mut config = if args.ram_budget.is_some() { uhmm_devices::tier::space_config() } else { Config::default() };
        if let Some(n) = args.fault_around {
            config.fault_around_pages = n as usize;
        }
        let space = AddressSpace::new(config).map_err(at("opening the address space (userfaultfd)"))?;
        let defaults = SimConfig::default();
        let capacity = size
            .checked_next_multiple_of(defaults.chunk_bytes)
            .ok_or_else(|| at("sizing the device")(uhmm::Error::invalid("size overflows")))?;
        let dev = match &args.device {
            DeviceKind::Sim => {
                let sim =
                    SimConfig { capacity_bytes: capacity, migrate_chunk_pages: args.chunk_pages as usize, ..defaults };
                Device::Sim(SimDevice::new(&space, sim).map_err(at("creating the sim device"))?)
            }
            DeviceKind::Compress => {
                let store = std::sync::Arc::new(
                    CompressStore::new(CompressConfig { capacity_bytes: capacity, ..CompressConfig::default() })
                        .map_err(at("creating the compressed store"))?,
                );
                let config = StoreDeviceConfig { migrate_chunk_pages: args.chunk_pages as usize, ..Default::default() };
                let dev = StoreDevice::new(&space, store.clone(), config).map_err(at("creating the store device"))?;
                Device::Compress(Arc::new(dev), store)
            }
            DeviceKind::Far(address) => {
                Device::far(&space, address, args.chunk_pages as usize).map_err(at("opening the far store"))?
            }
            DeviceKind::Cuda { .. } => {
                return Err(at("choosing the device")(uhmm::Error::invalid("the CUDA device runs its own demo")));
            }
        };
        let region = space.map(size, Prot::READ_WRITE).map_err(at("mapping the region"))?;
        let tier = match (args.ram_budget, dev.store_device()) {
            (Some(budget), Some(store_dev)) => {
                let config = TierConfig { budget_bytes: budget as u64, ..TierConfig::default() };
                let tier = Tier::new(&space, store_dev.clone(), config).map_err(at("starting the RAM budget"))?;
                tier.manage(region.range()).map_err(at("putting the region under the budget"))?;
                Some(Arc::new(tier))
            }
            _ => None,
        };
        let layout = Layout::new(region.npages(), usize::from(args.map_width), usize::from(args.map_rows));
        let stats = space.stats();
        Ok(Demo {
            tier,
            args,
            space,
            dev,
            region,
            layout,
            steps: Vec::new(),
            stats,
            wrong: 0,
            first_bad: None,
            step_no: 0,
        })
    }

    /// The tier's counters, when under a budget.
    fn print_tier(&self) {
        if let Some(tier) = &self.tier {
            println!("  {}", tier_line(&tier.stats()));
        }
    }

    fn bar(&self, len: usize, msg: &'static str) -> ProgressBar {
        if self.args.no_progress {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new(len as u64);
        let style = match &self.tier {
            None => ProgressStyle::with_template(BAR_TEMPLATE),
            Some(tier) => ProgressStyle::with_template(TIER_BAR_TEMPLATE).map(|s| {
                let tier = tier.clone();
                s.with_key("tier", move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(&live_line(&tier.stats()));
                })
            }),
        };
        let style = style.map(|s| s.progress_chars("=> ")).unwrap_or_else(|_| ProgressStyle::default_bar());
        pb.set_style(style);
        pb.set_message(msg);
        if self.tier.is_some() {
            // Redrawn while faults wait for room, too.
            pb.enable_steady_tick(Duration::from_millis(200));
        }
        pb
    }

    /// Prints the residency map of the whole region and the page census.
    fn print_map(&self) -> Res<()> {
        let pages = self.space.snapshot(self.region.range()).map_err(at("taking a residency snapshot"))?;
        print!("{}", map::render(&pages, self.layout, "  "));
        println!("  {}", Census::of(&pages));
        Ok(())
    }

    /// Starts a step: its title.
    fn begin(&mut self, title: &str) {
        self.step_no += 1;
        println!();
        println!("[{}] {title}", self.step_no);
    }

    /// Ends a timed step: time, rate, the counters that changed, the map.
    fn end(&mut self, name: &'static str, bytes: usize, time: Duration, extra: &str) -> Res<()> {
        let now = self.space.stats();
        let d = delta(&now, &self.stats);
        let changed: Vec<String> =
            counters(&d).iter().filter(|(_, v)| *v != 0).map(|(n, v)| format!("{n} +{v}")).collect();
        self.stats = now;
        println!("  {} in {:.1} ms = {:.2} GB/s{extra}", human(bytes), time.as_secs_f64() * 1e3, gbps(bytes, time));
        println!("  counters: {}", if changed.is_empty() { "(none changed)".to_string() } else { changed.join("  ") });
        self.steps.push(StepRecord { name, bytes, time, delta: d });
        self.print_tier();
        self.print_map()
    }

    fn run(&mut self) -> Res<usize> {
        let size = self.region.len();
        let npages = self.region.npages();
        let touch_pages = ((npages as f64 * self.args.touch_fraction).floor() as usize).min(npages);
        let rest = npages - touch_pages;
        // A store cannot be read as a device reads its memory: its pages
        // are checked through the CPU.
        let dev_read_pages = if matches!(self.dev, Device::Sim(_)) { rest / 2 } else { 0 };
        let back_pages = rest - dev_read_pages;
        let slice_pages = (self.args.slice / PAGE_SIZE).max(1);
        let origin = match self.space.uffd_origin() {
            Origin::DevNode => "/dev/userfaultfd (catches kernel-mode faults too)",
            Origin::Syscall => "userfaultfd(2), full",
            Origin::UserModeOnly => "userfaultfd(2), user-mode only (system calls on device pages get EFAULT)",
        };

        println!("uhmm demo");
        println!("  region       {} at {:#x}: {npages} pages of {} B", human(size), self.region.addr(), PAGE_SIZE);
        let what = match &self.dev {
            Device::Sim(_) => "sim".to_owned(),
            Device::Compress(..) => "compressed store (lz4)".to_owned(),
            Device::Far(_, far) => format!("far store {} (sealed)", far.address()),
        };
        println!(
            "  device       {what}: capacity {}, {} pages per migration chunk, {} per migrate call",
            human(size.next_multiple_of(SimConfig::default().chunk_bytes)),
            self.args.chunk_pages,
            human(slice_pages * PAGE_SIZE)
        );
        println!("  userfaultfd  {origin}; fault-around {} pages", self.space.config().fault_around_pages);
        println!(
            "  plan         fill; migrate all to the device; CPU reads the first {} ({:.0}%); verify: CPU {}, device read {}, {} {}",
            human(touch_pages * PAGE_SIZE),
            self.args.touch_fraction * 100.0,
            human(touch_pages * PAGE_SIZE),
            human(dev_read_pages * PAGE_SIZE),
            if self.tier.is_some() { "CPU faults" } else { "migrate back + CPU" },
            human(back_pages * PAGE_SIZE)
        );
        if let Some(tier) = &self.tier {
            println!(
                "  ram budget   {}: a tier over the region demotes its coldest pages to the compressed store",
                human(tier.budget() as usize)
            );
        }
        println!("  map          {}; {}", self.layout.describe(), map::LEGEND);

        let total = Instant::now();
        self.begin("mapped (lazily backed: nothing allocated yet)");
        self.print_map()?;

        // 1. Fill through the CPU: first touch is zero-filled by the fault engine.
        self.begin("fill: the CPU writes the pattern (first touch: zero-fill faults)");
        let t = self.fill()?;
        self.end("fill (CPU write)", size, t, "")?;

        // 2. Migrate everything to the device, in slices.
        self.begin("migrate the whole region to the device (migrate_to_device)");
        let (t, cpages) = self.migrate(0, npages, slice_pages, true)?;
        self.end("migrate to device", size, t, &format!("  ({cpages} pages on the device)"))?;
        self.print_store();

        // 3. The CPU reads the first part back: faults through the fault engine.
        let touch_bytes = touch_pages * PAGE_SIZE;
        self.begin("CPU reads back the first part (faults migrate pages back to RAM)");
        let t = self.touch(touch_bytes)?;
        self.end(TOUCH, touch_bytes, t, "")?;
        self.print_store();

        // 4. Verify every byte.
        self.begin("verify the touched part through the CPU");
        let t = self.verify_cpu(0, touch_bytes, "verify (CPU)")?;
        self.end("verify touched (CPU)", touch_bytes, t, &self.wrong_note())?;

        let dev_off = touch_bytes;
        let dev_bytes = dev_read_pages * PAGE_SIZE;
        if dev_read_pages > 0 {
            self.begin("verify the next part with device reads (pages stay on the device)");
            let (t, faults) = self.verify_device(dev_off, dev_read_pages)?;
            self.end(
                "verify (device read)",
                dev_bytes,
                t,
                &format!("  (device fault rounds {faults}){}", self.wrong_note()),
            )?;
        }

        let back_off = dev_off + dev_bytes;
        let back_bytes = back_pages * PAGE_SIZE;
        if self.tier.is_none() {
            self.begin("migrate the last part back to RAM (migrate_to_system)");
            let (t, moved) = self.migrate(back_off / PAGE_SIZE, back_pages, slice_pages, false)?;
            self.end("migrate to system", back_bytes, t, &format!("  ({moved} pages migrated)"))?;

            self.begin("verify the migrated-back part through the CPU");
            let t = self.verify_cpu(back_off, back_bytes, "verify (CPU)")?;
            self.end("verify migrated (CPU)", back_bytes, t, &self.wrong_note())?;
        } else {
            // A migration back is not charged to the budget: faults are.
            self.begin("verify the last part through the CPU (faults bring it back under the budget)");
            let t = self.verify_cpu(back_off, back_bytes, "verify (CPU)")?;
            self.end("verify rest (CPU)", back_bytes, t, &self.wrong_note())?;
        }

        self.summary(total.elapsed(), size);
        Ok(self.wrong)
    }

    /// After a failed step: the counters and the map, for diagnosis.
    fn dump_state(&self) {
        let all: Vec<String> = counters(&self.space.stats()).iter().map(|(n, v)| format!("{n} {v}")).collect();
        println!("  counters (space.stats): {}", all.join("  "));
        if let Err(f) = self.print_map() {
            println!("  (no map: {})", f.err);
        }
    }

    /// The compressed store's counters, when the device is one.
    fn print_store(&self) {
        let line = self.dev.store_line();
        if !line.is_empty() {
            println!("  {line}");
        }
    }

    fn wrong_note(&self) -> String {
        if self.wrong == 0 {
            "  (all bytes right so far)".to_string()
        } else {
            format!("  ({} bytes wrong so far)", self.wrong)
        }
    }

    fn fill(&mut self) -> Res<Duration> {
        let size = self.region.len();
        let pb = self.bar(size, "fill (CPU write)");
        let mut buf = vec![0u8; IO_CHUNK.min(size)];
        let start = Instant::now();
        let mut off = 0;
        while off < size {
            let n = buf.len().min(size - off);
            fill_pattern(&mut buf[..n], off, self.args.seed);
            self.region.write(off, &buf[..n]).map_err(at("filling the region"))?;
            off += n;
            pb.set_position(off as u64);
        }
        let t = start.elapsed();
        pb.finish_and_clear();
        Ok(t)
    }

    /// Migrates `npages` pages from page `first` to the device (or back to
    /// system memory), `slice` pages a call. Returns the time and the pages
    /// the calls reported.
    fn migrate(&mut self, first: usize, npages: usize, slice: usize, to_device: bool) -> Res<(Duration, usize)> {
        let (msg, step) = if to_device {
            ("migrate to device", "migrating to the device")
        } else {
            ("migrate to system", "migrating back to system memory")
        };
        let pb = self.bar(npages * PAGE_SIZE, msg);
        let start = Instant::now();
        let mut done = 0;
        let mut cpages = 0;
        while done < npages {
            let n = slice.min(npages - done);
            let addr = self.region.addr() + (first + done) * PAGE_SIZE;
            cpages +=
                if to_device { self.dev.to_device(addr, n) } else { self.dev.to_system(addr, n) }.map_err(at(step))?;
            done += n;
            pb.set_position((done * PAGE_SIZE) as u64);
        }
        let t = start.elapsed();
        pb.finish_and_clear();
        Ok((t, cpages))
    }

    /// The CPU reads the first `bytes` of the region.
    fn touch(&mut self, bytes: usize) -> Res<Duration> {
        let pb = self.bar(bytes, "CPU touch-back");
        let mut buf = vec![0u8; IO_CHUNK.min(bytes.max(1))];
        let start = Instant::now();
        let mut off = 0;
        while off < bytes {
            let n = buf.len().min(bytes - off);
            self.region.read(off, &mut buf[..n]).map_err(at("reading the region back"))?;
            std::hint::black_box(&buf);
            off += n;
            pb.set_position(off as u64);
        }
        let t = start.elapsed();
        pb.finish_and_clear();
        Ok(t)
    }

    /// Reads `bytes` at `off` through the CPU and checks them.
    fn verify_cpu(&mut self, off: usize, bytes: usize, msg: &'static str) -> Res<Duration> {
        let pb = self.bar(bytes, msg);
        let mut buf = vec![0u8; IO_CHUNK.min(bytes.max(1))];
        let start = Instant::now();
        let mut done = 0;
        while done < bytes {
            let n = buf.len().min(bytes - done);
            self.region.read(off + done, &mut buf[..n]).map_err(at("verifying through the CPU"))?;
            self.wrong += check(&buf[..n], off + done, self.args.seed, &mut self.first_bad);
            done += n;
            pb.set_position(done as u64);
        }
        let t = start.elapsed();
        pb.finish_and_clear();
        Ok(t)
    }

    /// The device reads `npages` pages from byte `off` and they are checked.
    /// Returns the time and the device's fault rounds.
    fn verify_device(&mut self, off: usize, npages: usize) -> Res<(Duration, usize)> {
        let Device::Sim(dev) = &self.dev else { return Ok((Duration::ZERO, 0)) };
        let (mut wrong, mut first_bad) = (0, None);
        let pb = self.bar(npages * PAGE_SIZE, "verify (device read)");
        let chunk_pages = IO_CHUNK / PAGE_SIZE;
        let mut buf = vec![0u8; chunk_pages.min(npages.max(1)) * PAGE_SIZE];
        let start = Instant::now();
        let mut done = 0;
        let mut faults = 0;
        while done < npages {
            let n = chunk_pages.min(npages - done);
            let at_off = off + done * PAGE_SIZE;
            let c = dev.read(self.region.addr() + at_off, n, &mut buf).map_err(at("reading through the device"))?;
            faults += c.faults;
            wrong += check(&buf[..n * PAGE_SIZE], at_off, self.args.seed, &mut first_bad);
            done += n;
            pb.set_position((done * PAGE_SIZE) as u64);
        }
        let t = start.elapsed();
        pb.finish_and_clear();
        self.wrong += wrong;
        self.first_bad = self.first_bad.or(first_bad);
        Ok((t, faults))
    }

    fn summary(&self, total: Duration, size: usize) {
        println!();
        println!("summary");
        println!(
            "  {:<24} {:>10} {:>11} {:>7} {:>8} {:>8} {:>8}",
            "step", "bytes", "time", "GB/s", "faults", "to dev", "to RAM"
        );
        for s in &self.steps {
            println!(
                "  {:<24} {:>10} {:>8.1} ms {:>7.2} {:>8} {:>8} {:>8}",
                s.name,
                human(s.bytes),
                s.time.as_secs_f64() * 1e3,
                gbps(s.bytes, s.time),
                s.delta.faults,
                s.delta.pages_to_device,
                s.delta.pages_to_ram
            );
        }
        let st = self.space.stats();
        // Every step but the explicit migration back brings pages in by faults.
        let by_fault: u64 =
            self.steps.iter().filter(|s| s.name != "migrate to system").map(|s| s.delta.pages_to_ram).sum();
        println!(
            "  pages migrated: to device {}, to RAM {} ({by_fault} by CPU faults through {} migrate_to_ram calls, {} by migrate_to_system)",
            st.pages_to_device,
            st.pages_to_ram,
            st.migrate_to_ram,
            st.pages_to_ram.saturating_sub(by_fault)
        );
        println!(
            "  CPU faults {} (zero-filled pages {}); device pages in use {}",
            st.faults,
            st.zero_filled_pages,
            self.dev.pages_in_use()
        );
        println!(
            "  bytes moved: to device {}, to RAM {}",
            human(st.pages_to_device as usize * PAGE_SIZE),
            human(st.pages_to_ram as usize * PAGE_SIZE)
        );
        let all: Vec<String> = counters(&st).iter().map(|(n, v)| format!("{n} {v}")).collect();
        println!("  counters (space.stats): {}", all.join("  "));
        if let Some(tier) = &self.tier {
            let ts = tier.stats();
            println!(
                "  ram budget: peak resident {} against {}; {} tracking rounds ({:.1} ms), {} reclaim rounds ({:.1} ms), {} hinting faults",
                human(ts.peak_resident_bytes as usize),
                human(ts.budget_bytes as usize),
                ts.rounds,
                ts.tracking_cpu.as_secs_f64() * 1e3,
                ts.reclaim_rounds,
                ts.reclaim_cpu.as_secs_f64() * 1e3,
                ts.hint_faults
            );
            println!("  {}", tier_line(&ts));
        }
        println!("  total time {:.1} ms", total.as_secs_f64() * 1e3);
        println!();
        match self.first_bad {
            None => println!("result: OK: all {} ({size} bytes) read back right", human(size)),
            Some(off) => println!(
                "result: FAILED: {} byte(s) wrong of {size}; first wrong word at offset {off:#x} (page {})",
                self.wrong,
                off / PAGE_SIZE
            ),
        }
    }
}

impl Drop for Demo<'_> {
    fn drop(&mut self) {
        // Out of the budget before the region goes.
        if let Some(tier) = self.tier.take() {
            tier.unmanage(self.region.range());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_template_parses() {
        assert!(ProgressStyle::with_template(BAR_TEMPLATE).is_ok());
        assert!(ProgressStyle::with_template(TIER_BAR_TEMPLATE).is_ok());
    }

    #[test]
    fn deltas() {
        let a = StatsSnapshot { faults: 10, pages_to_ram: 7, ..StatsSnapshot::default() };
        let b = StatsSnapshot { faults: 4, pages_to_ram: 7, ..StatsSnapshot::default() };
        let d = delta(&a, &b);
        assert_eq!((d.faults, d.pages_to_ram, d.busy_pages), (6, 0, 0));
    }

    #[test]
    fn pattern_roundtrip() {
        let mut buf = vec![0u8; 3 * PAGE_SIZE];
        fill_pattern(&mut buf, PAGE_SIZE, 42);
        let mut first = None;
        assert_eq!(check(&buf, PAGE_SIZE, 42, &mut first), 0);
        assert_eq!(first, None);
        buf[PAGE_SIZE + 3] ^= 0xff;
        buf[PAGE_SIZE + 4] ^= 0x01;
        assert_eq!(check(&buf, PAGE_SIZE, 42, &mut first), 2);
        assert_eq!(first, Some(2 * PAGE_SIZE));
        // A page in the wrong place is caught: the pattern differs per word.
        let mut first = None;
        assert!(check(&buf[..PAGE_SIZE], 0, 42, &mut first) > 0);
    }
}
