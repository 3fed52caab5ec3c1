//! `uhmm bench`: the benchmark suite. Every uhmm case is printed next to
//! baselines measured in the same run (memcpy, a raw userfaultfd round trip,
//! the kernel's own swap to zram where it can be set up), and the issue's
//! targets are reported as ratios of numbers from this run.
//!
//! Nothing here is run by the tests except through the smoke test of the
//! binary (`tests/bench.rs`), which never looks at timings.

mod baselines;
mod cases;
mod cgroup;
mod datasets;
mod far;
mod gpu;
mod kv;
mod programs;
mod report;
mod tier;
mod zram;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use report::StealMeter;
use serde::Serialize;
use uhmm::PAGE_SIZE;

use crate::units::{human, parse_size};

/// Options of `uhmm bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A short run: sizes up to 32 MiB (unless --max-size says otherwise)
    /// and smaller scans; still 1 warm-up and at least 5 timed runs a case.
    #[arg(long)]
    pub quick: bool,

    /// Write every measurement, the machine and the targets as JSON here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,

    /// Draw throughput against size as an SVG here.
    #[arg(long, value_name = "PATH")]
    pub plot: Option<PathBuf>,

    /// The largest size measured (bytes, or K, M, G suffixes); the targets
    /// are computed at the largest size measured. Default: 1G, or 32M with
    /// --quick.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_size: Option<usize>,

    /// Timed runs per case, after one untimed warm-up (at least 5).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(5..))]
    pub runs: u32,

    /// Do not set up the zram swap baseline (the scan target then falls
    /// back to 0.4x memcpy), e.g. in test suites that must not touch swap.
    #[arg(long)]
    pub no_zram: bool,

    /// Another suite instead of the default one.
    #[command(subcommand)]
    pub suite: Option<Suite>,
}

/// The suites besides the default one.
#[derive(Debug, clap::Subcommand)]
pub enum Suite {
    /// The compressed store against the kernel's zram (lz4) on the same
    /// pages: demotion throughput, sequential and random faults, memory
    /// used, per data set (zeros, text, a heap image, random,
    /// half-random); then a key-value workload (Zipf, and scans) over a
    /// table twice a RAM budget, in a memory cgroup with zram swap against
    /// a uhmm region under the RAM-budget tier. Needs root (it sets up and
    /// removes a zram swap device and a memory cgroup), python3 and the
    /// perl-doc package (the text corpus).
    Tier(Box<tier::TierArgs>),

    /// Unmodified programs (python3, sort) under `uhmm run` against the
    /// same programs under a memory cgroup limit with zram swap, at
    /// budgets of 100%, 50% and 25% of their peak: wall time and peak
    /// memory of each side, outputs checked. Needs root.
    Run,

    /// The CUDA device on the first NVIDIA GPU against the CUDA driver's
    /// own ways of moving the same bytes: RAM -> GPU -> RAM through uhmm,
    /// a pinned `cuMemcpy` and a pageable one, managed memory prefetched
    /// both ways, and the CPU fault on a GPU page against managed memory's.
    /// Needs a build with `--features cuda` and an NVIDIA driver.
    Gpu(gpu::GpuBenchArgs),
}

/// Sizes of the bulk-migration and memcpy sweeps.
const FULL_SIZES: [usize; 7] = [512 << 10, 2 << 20, 8 << 20, 32 << 20, 128 << 20, 512 << 20, 1 << 30];
/// The default largest size of a quick run.
const QUICK_MAX: usize = 32 << 20;
/// The largest region scanned page by page without fault-around (each page
/// is a round trip of tens of microseconds): full run / quick run.
const SLOW_SCAN_MAX: usize = 64 << 20;
const SLOW_SCAN_MAX_QUICK: usize = 8 << 20;
/// Pages timed one by one in each run of the latency cases.
const LATENCY_PAGES: usize = 4096;
const LATENCY_PAGES_QUICK: usize = 1024;
/// Timed seconds a sweep case runs at least: full run / quick run.
const SWEEP_MIN_SECONDS: f64 = 0.5;
const SWEEP_MIN_SECONDS_QUICK: f64 = 0.05;
/// Timed runs of a sweep case at most.
const SWEEP_MAX_RUNS: usize = 1000;
/// Rounds a sweep goes through its sizes in (see [`sweep`]).
const SWEEP_ROUNDS: usize = 5;

/// What one invocation measures.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Sizes of the sweeps, ascending, page multiples.
    pub sizes: Vec<usize>,
    /// The largest size: targets and fault-around scans use it.
    pub target_size: usize,
    /// Size of the scans without fault-around and of the random scans.
    pub slow_scan_size: usize,
    /// Pages timed one by one per latency run.
    pub latency_pages: usize,
    /// Timed runs per case (after one warm-up).
    pub runs: usize,
    /// Sweep cases (memcpy 1 thread, bulk migration) go on past `runs`
    /// until their timed runs add up to this many seconds, up to
    /// [`SWEEP_MAX_RUNS`], spread over [`SWEEP_ROUNDS`] rounds through the
    /// sizes ([`sweep`]): a small size then has hundreds of runs, and a
    /// noisy phase of a shared machine no longer decides one size's median.
    pub sweep_min_seconds: f64,
    /// Whether this is a --quick run.
    pub quick: bool,
}

impl Plan {
    fn new(args: &BenchArgs) -> Result<Plan, String> {
        let max = args.max_size.unwrap_or(if args.quick { QUICK_MAX } else { 1 << 30 });
        let max = max.checked_next_multiple_of(PAGE_SIZE).ok_or("--max-size overflows")?;
        if max < 16 * PAGE_SIZE {
            return Err(format!("--max-size must be at least {} (16 pages)", human(16 * PAGE_SIZE)));
        }
        let mut sizes: Vec<usize> = FULL_SIZES.iter().copied().filter(|&s| s <= max).collect();
        if sizes.last() != Some(&max) {
            sizes.push(max);
        }
        let slow_cap = if args.quick { SLOW_SCAN_MAX_QUICK } else { SLOW_SCAN_MAX };
        Ok(Plan {
            target_size: max,
            slow_scan_size: max.min(slow_cap),
            latency_pages: if args.quick { LATENCY_PAGES_QUICK } else { LATENCY_PAGES },
            runs: args.runs as usize,
            sweep_min_seconds: if args.quick { SWEEP_MIN_SECONDS_QUICK } else { SWEEP_MIN_SECONDS },
            quick: args.quick,
            sizes,
        })
    }
}

/// What a case measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Bytes moved per second: `bytes` over each run's time.
    Throughput,
    /// Per-access latency: each run's p50 (µs); p99 over all timed runs.
    Latency,
}

/// One measured case: a warm-up and `runs` timed runs.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    /// Stable identifier (used by the targets and the plot), e.g. `memcpy_1t`.
    pub id: String,
    /// What it is, for people.
    pub name: String,
    /// `baseline` or `uhmm`.
    pub group: &'static str,
    /// Throughput or latency.
    pub kind: Kind,
    /// Bytes handled per run (throughput), or bytes of the region (latency).
    pub bytes: usize,
    /// The warm-up run: seconds (throughput) or p50 in µs (latency).
    pub warmup: f64,
    /// The timed runs: seconds (throughput) or p50 in µs (latency).
    pub runs: Vec<f64>,
    /// Median / min / max over the runs: GB/s (throughput) or p50 µs (latency).
    pub median: f64,
    /// The smallest value (GB/s or µs).
    pub min: f64,
    /// The largest value (GB/s or µs).
    pub max: f64,
    /// Nanoseconds per 4 KiB page at the median (throughput cases).
    pub ns_per_page: Option<f64>,
    /// Latency cases: p50 and p99 over all timed accesses, µs (hdrhistogram).
    pub p50_us: Option<f64>,
    /// See `p50_us`.
    pub p99_us: Option<f64>,
    /// Timed accesses (latency cases).
    pub samples: Option<u64>,
    /// Anything worth knowing (pages not moved, THP use, ...).
    pub note: String,
    /// The host's steal time while the case was measured, as a share of
    /// one CPU ([`report::StealMeter`]): over the whole sweep for sweep
    /// cases, over both cases of an alternation.
    pub steal: Option<f64>,
}

/// The median of `v` (which must not be empty); the mean of the two middle
/// values for an even count.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

impl Case {
    /// A throughput case from the warm-up and the timed runs' durations.
    pub fn throughput(
        id: impl Into<String>,
        name: impl Into<String>,
        group: &'static str,
        bytes: usize,
        warmup: Duration,
        runs: &[Duration],
    ) -> Case {
        let secs: Vec<f64> = runs.iter().map(Duration::as_secs_f64).collect();
        let rate = |s: f64| if s > 0.0 { bytes as f64 / s / 1e9 } else { f64::INFINITY };
        let med = median(&secs);
        let lo = secs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = secs.iter().copied().fold(0.0, f64::max);
        let pages = (bytes / PAGE_SIZE).max(1) as f64;
        Case {
            id: id.into(),
            name: name.into(),
            group,
            kind: Kind::Throughput,
            bytes,
            warmup: warmup.as_secs_f64(),
            runs: secs,
            median: rate(med),
            min: rate(hi),
            max: rate(lo),
            ns_per_page: Some(med * 1e9 / pages),
            p50_us: None,
            p99_us: None,
            samples: None,
            note: String::new(),
            steal: None,
        }
    }

    /// A latency case from its runs' latencies.
    pub fn latency(
        id: impl Into<String>,
        name: impl Into<String>,
        group: &'static str,
        bytes: usize,
        l: &Latencies,
    ) -> Case {
        let p50s = &l.run_p50s;
        Case {
            id: id.into(),
            name: name.into(),
            group,
            kind: Kind::Latency,
            bytes,
            warmup: l.warmup_p50,
            runs: p50s.clone(),
            median: median(p50s),
            min: p50s.iter().copied().fold(f64::INFINITY, f64::min),
            max: p50s.iter().copied().fold(0.0, f64::max),
            ns_per_page: None,
            p50_us: Some(l.all.value_at_quantile(0.5) as f64 / 1e3),
            p99_us: Some(l.all.value_at_quantile(0.99) as f64 / 1e3),
            samples: Some(l.all.len()),
            note: String::new(),
            steal: None,
        }
    }

    /// Records the host's steal time while the case was measured, and
    /// notes it.
    pub fn with_steal(mut self, steal: Option<f64>) -> Case {
        self.steal = steal;
        match steal {
            Some(s) => self.with_note(format!("host steal {:.0}% of a CPU while measured", s * 100.0)),
            None => self,
        }
    }

    /// Adds a note.
    pub fn with_note(mut self, note: impl Into<String>) -> Case {
        let n = note.into();
        if !n.is_empty() {
            if !self.note.is_empty() {
                self.note.push_str("; ");
            }
            self.note.push_str(&n);
        }
        self
    }
}

/// A histogram for latencies in nanoseconds (1 ns .. 100 s, 3 digits).
pub fn histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 100_000_000_000, 3)
        .unwrap_or_else(|_| hdrhistogram::Histogram::new(3).unwrap_or_else(|_| unreachable!("3 digits are valid")))
}

/// Per-access latencies of a latency case: the warm-up run's p50 and each
/// timed run's (µs), and a histogram of every timed access (ns).
pub struct Latencies {
    /// The warm-up run's p50, µs.
    pub warmup_p50: f64,
    /// Each timed run's p50, µs.
    pub run_p50s: Vec<f64>,
    /// Every timed access, ns.
    pub all: hdrhistogram::Histogram<u64>,
}

/// A latency run: records each timed access's nanoseconds in the histogram.
pub type LatencyRun<'a> = &'a mut dyn FnMut(&mut hdrhistogram::Histogram<u64>) -> Result<(), String>;

/// Measures latency cases in alternating runs: a warm-up of each, then
/// `runs` timed runs of each, every case once per round and the order
/// turned round each round, so that a slow phase of the machine falls on
/// all of them alike and none always follows the same other.
pub fn alternate(runs: usize, cases: &mut [LatencyRun<'_>]) -> Result<Vec<Latencies>, String> {
    let mut out: Vec<Latencies> =
        cases.iter().map(|_| Latencies { warmup_p50: 0.0, run_p50s: Vec::new(), all: histogram() }).collect();
    for round in 0..=runs {
        let order: Vec<usize> =
            if round % 2 == 0 { (0..cases.len()).collect() } else { (0..cases.len()).rev().collect() };
        for k in order {
            let mut run = histogram();
            (cases[k])(&mut run)?;
            let p50 = run.value_at_quantile(0.5) as f64 / 1e3;
            let l = &mut out[k];
            if round == 0 {
                l.warmup_p50 = p50;
            } else {
                l.run_p50s.push(p50);
                l.all.add(&run).map_err(|e| format!("merging histograms: {e}"))?;
            }
        }
    }
    Ok(out)
}

/// Runs `f(i)` for `i` in `0..=runs`; `f(0)` is the warm-up. Returns the
/// warm-up's value and the timed ones.
pub fn repeat<T, E>(runs: usize, mut f: impl FnMut(usize) -> Result<T, E>) -> Result<(T, Vec<T>), E> {
    let warm = f(0)?;
    let mut out = Vec::with_capacity(runs);
    for i in 1..=runs {
        out.push(f(i)?);
    }
    Ok((warm, out))
}

/// A sweep's measurements of one size: the first warm-up's value and the
/// timed ones.
pub type Sweep<T> = (T, Vec<T>);

/// Measures a sweep case at every size in [`SWEEP_ROUNDS`] rounds: in each
/// round every size (`states`, one per size) has an untimed warm-up run and
/// then timed runs until its share of `plan.sweep_min_seconds` is timed
/// (at least its share of `plan.runs`, at most its share of
/// [`SWEEP_MAX_RUNS`]). A slow phase of a shared machine then falls on
/// every size's runs, not on one size's, so it does not bend the
/// per-page-cost curve; the warm-up of each round puts the size's data
/// back in the caches, as runs back to back would. `timed` gives a value's
/// duration. Returns, for each state in order, the first warm-up's value
/// and the timed ones.
pub fn sweep<S, T, E>(
    plan: &Plan,
    states: &mut [S],
    mut f: impl FnMut(&mut S) -> Result<T, E>,
    timed: impl Fn(&T) -> Duration,
) -> Result<Vec<Sweep<T>>, E> {
    let min_runs = plan.runs.div_ceil(SWEEP_ROUNDS);
    let max_runs = SWEEP_MAX_RUNS / SWEEP_ROUNDS;
    let budget = plan.sweep_min_seconds / SWEEP_ROUNDS as f64;
    let mut out: Vec<Sweep<T>> = Vec::with_capacity(states.len());
    for round in 0..SWEEP_ROUNDS {
        for (i, state) in states.iter_mut().enumerate() {
            let warm = f(state)?;
            if round == 0 {
                out.push((warm, Vec::new()));
            }
            let runs = &mut out[i].1;
            let (mut n, mut spent) = (0, Duration::ZERO);
            while n < min_runs || (spent.as_secs_f64() < budget && n < max_runs) {
                let v = f(state)?;
                spent += timed(&v);
                runs.push(v);
                n += 1;
            }
        }
    }
    Ok(out)
}

/// Everything one invocation measured.
#[derive(Debug, Serialize)]
pub struct Results {
    /// What was run.
    pub command: String,
    /// The machine.
    pub machine: report::Machine,
    /// Sizes and counts.
    pub plan: Plan,
    /// How uhmm's userfaultfd was opened.
    pub uffd_origin: String,
    /// Whether the zram baseline ran, and if not why.
    pub zram: String,
    /// Every case, in the order measured.
    pub cases: Vec<Case>,
    /// uhmm's metadata measurements.
    pub metadata: cases::Metadata,
    /// The targets.
    pub targets: Vec<report::Target>,
    /// Wall-clock seconds of the whole run.
    pub total_seconds: f64,
}

/// Runs the suite.
pub fn run(args: &BenchArgs) -> ExitCode {
    if let Some(Suite::Run) = &args.suite {
        return match programs::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("uhmm bench run: error: {e}");
                ExitCode::from(2)
            }
        };
    }
    if let Some(Suite::Gpu(gpu)) = &args.suite {
        return gpu::bench(gpu);
    }
    if let Some(Suite::Tier(tier)) = &args.suite {
        return match tier::run(tier) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("uhmm bench tier: error: {e}");
                ExitCode::from(2)
            }
        };
    }
    let plan = match Plan::new(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("uhmm bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run_plan(args, plan) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uhmm bench: error: {e}");
            if e.contains("userfaultfd") {
                eprintln!(
                    "hint: uhmm needs userfaultfd: read-write access to /dev/userfaultfd, \
                     or `sysctl vm.unprivileged_userfaultfd=1`, or root; and Linux >= 6.8 (UFFDIO_MOVE)"
                );
            }
            ExitCode::from(2)
        }
    }
}

/// Prints what is being measured (stderr, so stdout holds the report).
pub fn progress(what: &str) {
    eprintln!("  measuring: {what}");
}

fn run_plan(args: &BenchArgs, plan: Plan) -> Result<(), String> {
    let start = Instant::now();
    let machine = report::Machine::probe();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    println!("uhmm bench{}", if plan.quick { " (quick)" } else { "" });
    println!("  machine: {}", machine.describe());
    println!(
        "  sizes: {}; targets at {}; {} timed runs after 1 warm-up per case \
         (memcpy 1 thread and bulk migration: more, up to {SWEEP_MAX_RUNS}, until {} s timed, \
         in {SWEEP_ROUNDS} rounds through the sizes)",
        plan.sizes.iter().map(|&s| human(s)).collect::<Vec<_>>().join(", "),
        human(plan.target_size),
        plan.runs,
        plan.sweep_min_seconds
    );

    let mut all = Vec::new();
    eprintln!("baselines");
    all.extend(baselines::memcpy(&plan)?);
    let (raw_round_trips, device_faults) = fault_latencies(&plan)?;
    all.extend(raw_round_trips);
    let (zram_status, zram_cases) = if args.no_zram {
        ("not measured: --no-zram; the scan target falls back to 0.4x memcpy".to_string(), Vec::new())
    } else {
        let steal = StealMeter::start();
        let (status, cases) = zram::measure(&plan);
        let stolen = steal.share();
        (status, cases.into_iter().map(|c| c.with_steal(stolen)).collect())
    };
    println!("  zram: {zram_status}");
    all.extend(zram_cases);

    eprintln!("uhmm cases");
    let origin = cases::uffd_origin()?;
    println!("  uhmm's userfaultfd: {origin}");
    all.extend(cases::bulk(&plan)?);
    all.extend(device_faults);
    all.extend(cases::scans(&plan)?);
    let metadata = cases::metadata(&plan)?;

    let targets = report::targets(&plan, &all, &metadata);
    let results = Results {
        command,
        machine,
        plan,
        uffd_origin: origin,
        zram: zram_status,
        cases: all,
        metadata,
        targets,
        total_seconds: start.elapsed().as_secs_f64(),
    };
    report::print(&results);
    if let Some(path) = &args.json {
        report::write_json(&results, path)?;
        println!("JSON written to {}", path.display());
    }
    if let Some(path) = &args.plot {
        report::plot(&results, path)?;
        println!("plot written to {}", path.display());
    }
    Ok(())
}

/// Where a fault handler runs relative to the thread that faults. On a
/// virtual machine the two differ by several times: a wake-up of another
/// CPU costs tens of microseconds there, one on the same CPU a switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The handler on a CPU of its own (the usual deployment).
    OtherCpu,
    /// The handler on the faulting thread's CPU: every fault is two
    /// switches on one CPU, and the handler's own work counts in full.
    SameCpu,
}

impl Placement {
    /// For case ids.
    pub fn id(self) -> &'static str {
        match self {
            Placement::OtherCpu => "other_cpu",
            Placement::SameCpu => "same_cpu",
        }
    }

    /// For people.
    pub fn name(self) -> &'static str {
        match self {
            Placement::OtherCpu => "handler on another CPU",
            Placement::SameCpu => "handler on the same CPU",
        }
    }
}

/// The fault cases run this many times `--runs` timed runs. A run takes
/// 40 ms (handler on the same CPU) to 250 ms (on another), and slow phases
/// of the host, which slow either side for a run or a few, would otherwise
/// set a median of five.
const LATENCY_RUNS_FACTOR: usize = 3;

/// The raw userfaultfd round trip (a baseline) and uhmm's single-page CPU
/// fault on a device page, in each [`Placement`] the machine allows (the
/// faulting thread and the handlers pinned), each pair measured in
/// alternating runs (see [`alternate`]). The fault target is their ratio,
/// so both sides must run where the other ran: left to the scheduler, one
/// would get a handler on the faulting CPU and the other not, now and then,
/// and the ratio would say where threads ran, not what uhmm costs. Returns
/// the baseline cases and the uhmm ones.
fn fault_latencies(plan: &Plan) -> Result<(Vec<Case>, Vec<Case>), String> {
    let runs = plan.runs * LATENCY_RUNS_FACTOR;
    let allowed = uhmm_sys::process::allowed_cpus().map_err(|e| format!("sched_getaffinity: {e}"))?;
    let (&main_cpu, others) = allowed.split_first().ok_or("no CPU to run on")?;
    // Each placement with the handlers' CPU.
    let mut placements: Vec<(Placement, usize)> =
        others.first().map(|&c| (Placement::OtherCpu, c)).into_iter().collect();
    placements.push((Placement::SameCpu, main_cpu));
    let set = |cpus: &[usize]| {
        uhmm_sys::process::set_thread_cpus(cpus).map_err(|e| format!("sched_setaffinity {cpus:?}: {e}"))
    };
    let (mut base, mut uhmm) = (Vec::new(), Vec::new());
    for (placement, handler_cpu) in placements {
        progress(&format!(
            "raw userfaultfd round trip and CPU faults on device pages, alternating, {}, {} single-page faults a run",
            placement.name(),
            plan.latency_pages
        ));
        let raw = baselines::RawRoundTrip::new(plan.latency_pages, handler_cpu)?;
        let dev = cases::DeviceFaults::new(plan.latency_pages, handler_cpu)?;
        set(&[main_cpu])?;
        let steal = StealMeter::start();
        let l = alternate(runs, &mut [&mut |h| raw.run(h), &mut |h| dev.run(h)]);
        let stolen = steal.share();
        // Threads started later (the scans') inherit this thread's CPUs.
        set(&allowed)?;
        let l = l?;
        base.push(raw.finish(&l[0], placement)?.with_steal(stolen));
        uhmm.push(dev.finish(&l[1], placement)?.with_steal(stolen));
    }
    Ok((base, uhmm))
}

/// Fills `buf` with the bench's data pattern for the bytes at `off`: each
/// u64 word is its index XOR a seed (compressible some, like real data).
pub fn fill_pattern(buf: &mut [u8], off: usize) {
    for (j, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(((off / 8 + j) as u64) ^ 0x5eed_c0de).to_ne_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn plans() {
        let args = |quick, max: Option<usize>| BenchArgs {
            quick,
            json: None,
            plot: None,
            max_size: max,
            runs: 5,
            no_zram: true,
            suite: None,
        };
        let p = Plan::new(&args(false, None)).unwrap();
        assert_eq!(p.sizes, FULL_SIZES.to_vec());
        assert_eq!(p.target_size, 1 << 30);
        let q = Plan::new(&args(true, Some(4 << 20))).unwrap();
        assert_eq!(q.sizes, vec![512 << 10, 2 << 20, 4 << 20]);
        assert_eq!(q.slow_scan_size, 4 << 20);
        assert!(Plan::new(&args(true, Some(4096))).is_err());
    }

    #[test]
    fn sweep_cases_run_until_their_time_is_spent_in_rounds_through_the_sizes() {
        let args =
            BenchArgs { quick: false, json: None, plot: None, max_size: None, runs: 7, no_zram: true, suite: None };
        let plan = Plan { sweep_min_seconds: 1.0, ..Plan::new(&args).unwrap() };
        // Each state is a size: (its index, its calls so far); each call
        // returns (size, call number, duration) and logs the size.
        let each = [Duration::from_secs(1), Duration::from_millis(100), Duration::from_micros(1)];
        let mut states: Vec<(usize, usize)> = (0..each.len()).map(|i| (i, 0)).collect();
        let mut log = Vec::new();
        let out = sweep(
            &plan,
            &mut states,
            |st| {
                log.push(st.0);
                st.1 += 1;
                Ok::<_, ()>((st.0, st.1, each[st.0]))
            },
            |v| v.2,
        )
        .unwrap();
        let per_round = |runs: usize| runs / SWEEP_ROUNDS + 1;
        let counts: Vec<usize> = out.iter().map(|(_, runs)| runs.len()).collect();
        assert_eq!(counts[0], SWEEP_ROUNDS * 7usize.div_ceil(SWEEP_ROUNDS), "at least --runs");
        assert_eq!(counts[1], SWEEP_ROUNDS * 2, "until the round's share of a second is timed");
        assert_eq!(counts[2], SWEEP_MAX_RUNS, "at most SWEEP_MAX_RUNS");
        for (i, (warm, runs)) in out.iter().enumerate() {
            assert_eq!(*warm, (i, 1, each[i]), "the first call is the warm-up");
            assert!(runs.iter().all(|r| r.0 == i), "runs stay with their size");
            assert!(runs.iter().all(|r| (r.1 - 1) % per_round(counts[i]) != 0), "no round's warm-up is timed");
        }
        // The log goes through the sizes SWEEP_ROUNDS times, in order.
        let mut sizes_in_order = log.clone();
        sizes_in_order.dedup();
        assert_eq!(sizes_in_order, [0, 1, 2].repeat(SWEEP_ROUNDS));
    }

    #[test]
    fn throughput_case() {
        let c = Case::throughput(
            "x",
            "x",
            "uhmm",
            1 << 30,
            Duration::from_secs(1),
            &[Duration::from_millis(500), Duration::from_millis(1000), Duration::from_millis(250)],
        );
        assert!((c.median - 1.073_741_824 * 2.0).abs() < 1e-9);
        assert!(c.min < c.median && c.median < c.max);
    }
}
