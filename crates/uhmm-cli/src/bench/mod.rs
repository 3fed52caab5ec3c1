//! `uhmm bench`: the benchmark suite. Every uhmm case is printed next to
//! baselines measured in the same run (memcpy, a raw userfaultfd round trip,
//! the kernel's own swap to zram where it can be set up), and the issue's
//! targets are reported as ratios of numbers from this run.
//!
//! Nothing here is run by the tests except through the smoke test of the
//! binary (`tests/bench.rs`), which never looks at timings.

mod baselines;
mod cases;
mod report;
mod zram;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

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
    /// [`SWEEP_MAX_RUNS`]: a small size then has hundreds of runs, and a
    /// noisy phase of a shared machine a few milliseconds long no longer
    /// decides its median.
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
        }
    }

    /// A latency case from the per-run p50s (µs) and the histogram of all
    /// timed accesses (nanoseconds).
    pub fn latency(
        id: impl Into<String>,
        name: impl Into<String>,
        group: &'static str,
        bytes: usize,
        warmup_p50: f64,
        run_p50s: &[f64],
        all: &hdrhistogram::Histogram<u64>,
    ) -> Case {
        Case {
            id: id.into(),
            name: name.into(),
            group,
            kind: Kind::Latency,
            bytes,
            warmup: warmup_p50,
            runs: run_p50s.to_vec(),
            median: median(run_p50s),
            min: run_p50s.iter().copied().fold(f64::INFINITY, f64::min),
            max: run_p50s.iter().copied().fold(0.0, f64::max),
            ns_per_page: None,
            p50_us: Some(all.value_at_quantile(0.5) as f64 / 1e3),
            p99_us: Some(all.value_at_quantile(0.99) as f64 / 1e3),
            samples: Some(all.len()),
            note: String::new(),
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

/// Runs `f(i)` for `i` in `0..=n`, `f(0)` the untimed warm-up, where `n`
/// is at least `plan.runs` and grows (up to [`SWEEP_MAX_RUNS`]) until the
/// timed runs' durations add up to `plan.sweep_min_seconds`. Returns the
/// warm-up's value and the timed ones.
pub fn repeat_sweep<T, E>(
    plan: &Plan,
    mut f: impl FnMut(usize) -> Result<T, E>,
    timed: impl Fn(&T) -> Duration,
) -> Result<(T, Vec<T>), E> {
    let warm = f(0)?;
    let mut out = Vec::with_capacity(plan.runs);
    let mut spent = Duration::ZERO;
    while out.len() < plan.runs || (spent.as_secs_f64() < plan.sweep_min_seconds && out.len() < SWEEP_MAX_RUNS) {
        let v = f(out.len() + 1)?;
        spent += timed(&v);
        out.push(v);
    }
    Ok((warm, out))
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
         (memcpy 1 thread and bulk migration: more, up to {SWEEP_MAX_RUNS}, until {} s timed)",
        plan.sizes.iter().map(|&s| human(s)).collect::<Vec<_>>().join(", "),
        human(plan.target_size),
        plan.runs,
        plan.sweep_min_seconds
    );

    let mut all = Vec::new();
    eprintln!("baselines");
    all.extend(baselines::memcpy(&plan)?);
    all.push(baselines::uffd_round_trip(&plan)?);
    let (zram_status, zram_cases) = if args.no_zram {
        ("not measured: --no-zram; the scan target falls back to 0.4x memcpy".to_string(), Vec::new())
    } else {
        zram::measure(&plan)
    };
    println!("  zram: {zram_status}");
    all.extend(zram_cases);

    eprintln!("uhmm cases");
    let origin = cases::uffd_origin()?;
    println!("  uhmm's userfaultfd: {origin}");
    all.extend(cases::bulk(&plan)?);
    all.push(cases::fault_latency(&plan)?);
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
    fn sweep_cases_run_until_their_time_is_spent() {
        let args = BenchArgs { quick: false, json: None, plot: None, max_size: None, runs: 7, no_zram: true };
        let plan = Plan { sweep_min_seconds: 1.0, ..Plan::new(&args).unwrap() };
        let count = |each: Duration| {
            let (_, runs) = repeat_sweep(&plan, Ok::<_, ()>, |_| each).unwrap();
            assert_eq!(runs, (1..=runs.len()).collect::<Vec<_>>(), "the warm-up is not among the timed runs");
            runs.len()
        };
        assert_eq!(count(Duration::from_secs(1)), 7, "at least --runs");
        assert_eq!(count(Duration::from_millis(100)), 10, "until a second is timed");
        assert_eq!(count(Duration::from_micros(1)), SWEEP_MAX_RUNS, "at most SWEEP_MAX_RUNS");
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
