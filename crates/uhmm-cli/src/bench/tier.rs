//! `uhmm bench tier`: the compressed store against the kernel's zram on the
//! same pages, in one process.
//!
//! For each data set (`datasets`), the kernel side maps the bytes, pages
//! them out to a zram swap device (lz4) with `MADV_PAGEOUT`, touches them
//! back in order, pages them out again and touches pages at random, each
//! touch timed; the uhmm side does the same through a store device over the
//! compressed store, in the default configuration a user gets (migrating
//! the range to the device instead of `MADV_PAGEOUT`). The runs alternate
//! between the two. The targets are ratios of the two sides' medians.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use uhmm::{AddressSpace, Config, PAGE_SIZE, Prot};
use uhmm_devices::compress::{Codec, CompressConfig, CompressStore};
use uhmm_devices::far::FarAddress;
use uhmm_devices::store::{StoreDevice, StoreDeviceConfig};
use uhmm_sys::mman::{Mapping, Protection};

use super::datasets::{self, DataSet};
use super::report::{Machine, Target};
use super::{histogram, median, progress};
use crate::units::{human, parse_size};

/// Options of `uhmm bench tier`.
#[derive(Debug, clap::Args)]
pub struct TierArgs {
    /// A short run: 32 MiB a data set (unless --size says otherwise), 512
    /// random touches a run.
    #[arg(long)]
    pub quick: bool,

    /// Bytes of each data set (K, M, G suffixes). Default: 256M, or 32M
    /// with --quick.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<usize>,

    /// Timed runs of each side per data set, after one untimed warm-up.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,

    /// The store's codec (lz4, zstd, zstd:N); the targets count in the
    /// default, lz4.
    #[arg(long)]
    pub codec: Option<String>,

    /// Pages the store compresses together (1 to 16); default: the
    /// store's default.
    #[arg(long)]
    pub group_pages: Option<usize>,

    /// Fault-handling threads (`Config::handler_threads`); default: the
    /// core's (one per CPU). `1` measures a single handler.
    #[arg(long)]
    pub handler_threads: Option<usize>,

    /// Write every measurement, the machine and the targets as JSON here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,

    /// Draw each target's ratio (uhmm / zram) per data set as an SVG here.
    #[arg(long, value_name = "PATH")]
    pub plot: Option<PathBuf>,

    /// Write the table, the machine and the rerun command as Markdown here
    /// (the repository keeps it as docs/tier.md).
    #[arg(long, value_name = "PATH")]
    pub doc: Option<PathBuf>,

    /// Bytes of the key-value table of the RAM-budget rows (the budget is
    /// half of it). Default: 2G, or 64M with --quick.
    #[arg(long, value_parser = parse_size)]
    pub kv_size: Option<usize>,

    /// Timed seconds of the RAM-budget rows' Zipf phase. Default: 20, or 3
    /// with --quick.
    #[arg(long)]
    pub kv_seconds: Option<f64>,

    /// Also measure a far store (repeatable): `file:DIR` against the
    /// kernel's swap on a file in DIR, `redis://HOST:PORT` against the
    /// server's own pipelined SET and GET (the server must be running).
    #[arg(long, value_name = "ADDRESS", value_parser = parse_far)]
    pub far: Vec<FarAddress>,

    /// Measure only the far stores (`--far`): no zram rows, no RAM-budget
    /// rows.
    #[arg(long, requires = "far")]
    pub far_only: bool,

    /// Internal: run one side of the RAM-budget rows (a JSON plan).
    #[arg(long, hide = true, value_name = "PLAN")]
    pub kv_child: Option<String>,
}

fn parse_far(s: &str) -> Result<FarAddress, String> {
    FarAddress::parse(s).map_err(|e| e.to_string())
}

/// What one side measured on one data set, over its timed runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Side {
    /// Page-out (zram) or migration to the store (uhmm), GB/s, per run.
    pub out_gbs: Vec<f64>,
    /// Sequential touch back, GB/s, per run.
    pub scan_gbs: Vec<f64>,
    /// Random single-page touches: p50 and p99 over all runs, µs.
    pub random_p50_us: f64,
    /// See `random_p50_us`.
    pub random_p99_us: f64,
    /// Memory used for the data once out (zram: `mem_used_total`; uhmm: the
    /// pool's), bytes, last run.
    pub mem_used: u64,
    /// The share of the bytes that went out (zram may skip some), last run.
    pub out_fraction: f64,
}

/// One data set's results.
#[derive(Debug, Serialize)]
pub struct Row {
    /// The data set.
    pub data: &'static str,
    /// The kernel's zram.
    pub zram: Side,
    /// uhmm's compressed store.
    pub uhmm: Side,
    /// The targets on this data set.
    pub targets: Vec<Target>,
}

/// Everything one run measured.
#[derive(Debug, Serialize)]
struct TierResults {
    command: String,
    machine: Machine,
    size: usize,
    runs: usize,
    store: String,
    zram: String,
    rows: Vec<Row>,
    kv: Option<super::kv::KvResults>,
    far: Vec<super::far::FarRow>,
    met: usize,
    total: usize,
}

/// Runs `uhmm bench tier`.
pub fn run(args: &TierArgs) -> Result<(), String> {
    if let Some(plan) = &args.kv_child {
        return super::kv::child(plan);
    }
    let len = args.size.unwrap_or(if args.quick { 32 << 20 } else { 256 << 20 }).next_multiple_of(PAGE_SIZE);
    let touches = if args.quick { 512 } else { 2048 }.min(len / PAGE_SIZE);
    let mut config = CompressConfig::default();
    if let Some(c) = &args.codec {
        config.codec = Codec::parse(c).ok_or_else(|| format!("unknown codec {c:?} (lz4, zstd, zstd:N)"))?;
    }
    if let Some(g) = args.group_pages {
        config.group_pages = g;
    }
    CompressStore::new(config.clone()).map_err(|e| e.to_string())?;
    let machine = Machine::probe();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let store = format!("{} in groups of {} pages", config.codec, config.group_pages);
    println!("uhmm bench tier{}", if args.quick { " (quick)" } else { "" });
    println!("  machine: {}", machine.describe());
    println!("  {} a data set, {} timed runs a side after 1 warm-up; store: {store}", human(len), args.runs);
    let mut rows = Vec::new();
    let mut kv = None;
    let mut zram_what = String::from("not measured (--far-only)");
    if !args.far_only {
        progress("building the data sets");
        let sets = datasets::all(len)?;
        let zram = super::zram::Zram::setup(len * 2, Some("lz4"))
            .map_err(|e| format!("the zram baseline cannot be set up: {e}"))?;
        zram_what = format!("/dev/zram ({}), swap at the highest priority, removed afterwards", zram.algorithm());
        println!("  kernel: {zram_what}");
        for set in &sets {
            progress(&format!("{}: zram and uhmm, alternating", set.name));
            let (mut k, mut u) = (Probe::default(), Probe::default());
            for run in 0..=args.runs as usize {
                let timed = run > 0;
                kernel_run(&zram, set, touches, timed, &mut k)?;
                uhmm_run(&config, args.handler_threads, set, touches, timed, &mut u)?;
            }
            let row = Row { data: set.name, targets: Vec::new(), zram: k.side(), uhmm: u.side() };
            rows.push(Row { targets: targets(&row), ..row });
        }
        drop(zram);
        kv = Some(super::kv::run(&super::kv::KvOptions {
            table_bytes: args.kv_size.unwrap_or(if args.quick { 64 << 20 } else { 2 << 30 }),
            quick: args.quick,
            seconds: args.kv_seconds,
            runs: args.runs,
            handler_threads: args.handler_threads,
        })?);
    }
    let far = args.far.iter().map(|a| super::far::run(a, len, args.runs, touches)).collect::<Result<Vec<_>, _>>()?;
    let all = || {
        let kv_targets = kv.iter().flat_map(|kv| kv.rows.iter().flat_map(|r| &r.1));
        rows.iter().flat_map(|r| &r.targets).chain(kv_targets).chain(far.iter().flat_map(|f| &f.targets))
    };
    let (met, total) = (all().filter(|t| t.met == Some(true)).count(), all().filter(|t| t.met.is_some()).count());
    let results = TierResults {
        command,
        machine,
        size: len,
        runs: args.runs as usize,
        store,
        zram: zram_what,
        rows,
        kv,
        far,
        met,
        total,
    };
    print!("{}", markdown(&results));
    println!("{met} of {total} targets met");
    if let Some(path) = &args.json {
        let s = serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?;
        std::fs::write(path, s).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &args.doc {
        std::fs::write(path, markdown(&results)).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        plot(&results.rows, path)?;
    }
    Ok(())
}

/// Each target's ratio per data set, one line a target, on a log scale
/// (1 is parity with zram).
fn plot(rows: &[Row], path: &std::path::Path) -> Result<(), String> {
    use plotters::prelude::*;
    let e = |x: &dyn std::fmt::Display| format!("drawing {}: {x}", path.display());
    let names: Vec<&str> =
        rows.first().map(|r| r.targets.iter().map(|t| t.name.as_str()).collect()).unwrap_or_default();
    let ratios = rows.iter().flat_map(|r| r.targets.iter().filter_map(|t| t.ratio)).filter(|x| *x > 0.0);
    let (lo, hi) = ratios.fold((1.0f64, 1.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("uhmm bench tier: uhmm / zram per data set", ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..rows.len() as f64 - 0.5, (lo / 1.5..hi * 1.5).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_labels(rows.len())
        .x_label_formatter(&|x| rows.get(x.round() as usize).map_or(String::new(), |r| r.data.to_string()))
        .y_desc("ratio (log)")
        .draw()
        .map_err(|x| e(&x))?;
    for (k, name) in names.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.targets.iter().find(|t| t.name == *name)?.ratio.map(|y| (i as f64, y)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)).point_size(4))
            .map_err(|x| e(&x))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}

/// Measurements of one side, gathered over runs.
#[derive(Default)]
struct Probe {
    out: Vec<f64>,
    scan: Vec<f64>,
    random: Option<hdrhistogram::Histogram<u64>>,
    mem_used: u64,
    out_fraction: f64,
}

impl Probe {
    fn side(&self) -> Side {
        let q = |p: f64| self.random.as_ref().map_or(f64::NAN, |h| h.value_at_quantile(p) as f64 / 1e3);
        Side {
            out_gbs: self.out.clone(),
            scan_gbs: self.scan.clone(),
            random_p50_us: q(0.5),
            random_p99_us: q(0.99),
            mem_used: self.mem_used,
            out_fraction: self.out_fraction,
        }
    }

    fn record(&mut self, len: usize, out: Duration, scan: Duration, random: &hdrhistogram::Histogram<u64>) {
        self.out.push(len as f64 / out.as_secs_f64() / 1e9);
        self.scan.push(len as f64 / scan.as_secs_f64() / 1e9);
        let all = self.random.get_or_insert_with(histogram);
        let _ = all.add(random);
    }
}

/// The pages touched at random (the same for both sides): a seeded shuffle.
pub(super) fn random_pages(npages: usize, n: usize) -> Vec<usize> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % npages as u64) as usize
        })
        .collect()
}

/// Touches `len` bytes through `read` in 4 MiB pieces; the time taken.
pub(super) fn scan(
    len: usize,
    mut read: impl FnMut(usize, &mut [u8]) -> Result<(), String>,
) -> Result<Duration, String> {
    let mut buf = vec![0u8; (4 << 20).min(len)];
    let t = Instant::now();
    let mut off = 0;
    while off < len {
        let n = buf.len().min(len - off);
        read(off, &mut buf[..n])?;
        off += n;
    }
    Ok(t.elapsed())
}

/// Touches one byte of each page of `pages` through `read`, each timed (ns).
pub(super) fn touch(
    pages: &[usize],
    mut read: impl FnMut(usize, &mut [u8]) -> Result<(), String>,
) -> Result<hdrhistogram::Histogram<u64>, String> {
    let mut h = histogram();
    let mut b = [0u8; 1];
    for &p in pages {
        let t = Instant::now();
        read(p * PAGE_SIZE, &mut b)?;
        let _ = h.record(t.elapsed().as_nanos().max(1) as u64);
    }
    Ok(h)
}

fn kernel_run(
    zram: &super::zram::Zram,
    set: &DataSet,
    touches: usize,
    timed: bool,
    p: &mut Probe,
) -> Result<(), String> {
    let len = set.bytes.len();
    let map = Mapping::anonymous(len, Protection::ReadWrite, PAGE_SIZE).map_err(|e| format!("mmap: {e}"))?;
    map.write(0, &set.bytes).map_err(|e| format!("fill: {e}"))?;
    let read = |off: usize, buf: &mut [u8]| map.read(off, buf).map_err(|e| format!("touch: {e}"));
    let before = zram.mm_stat();
    let t = Instant::now();
    map.pageout(0, len).map_err(|e| format!("MADV_PAGEOUT: {e}"))?;
    let out = t.elapsed();
    let after = zram.mm_stat();
    let scan_t = scan(len, read)?;
    map.pageout(0, len).map_err(|e| format!("MADV_PAGEOUT: {e}"))?;
    let random = touch(&random_pages(len / PAGE_SIZE, touches), read)?;
    if timed {
        p.record(len, out, scan_t, &random);
        p.mem_used = after.mem_used_total.saturating_sub(before.mem_used_total);
        p.out_fraction = after.orig_data_size.saturating_sub(before.orig_data_size) as f64 / len as f64;
    }
    Ok(())
}

fn uhmm_run(
    config: &CompressConfig,
    handlers: Option<usize>,
    set: &DataSet,
    touches: usize,
    timed: bool,
    p: &mut Probe,
) -> Result<(), String> {
    let len = set.bytes.len();
    let err = |what: &'static str| move |e: uhmm::Error| format!("{what}: {e}");
    let defaults = Config::default();
    let space = AddressSpace::new(Config { handler_threads: handlers.unwrap_or(defaults.handler_threads), ..defaults })
        .map_err(err("address space"))?;
    let store = Arc::new(CompressStore::new(config.clone()).map_err(err("store"))?);
    let dev = StoreDevice::new(&space, store.clone(), StoreDeviceConfig::default()).map_err(err("device"))?;
    let region = space.map(len, Prot::READ_WRITE).map_err(err("map"))?;
    region.write(0, &set.bytes).map_err(err("fill"))?;
    let read = |off: usize, buf: &mut [u8]| region.load(off, buf).map_err(|e| format!("touch: {e}"));
    let t = Instant::now();
    let moved = dev.migrate_to_device(region.addr(), region.npages()).map_err(err("demote"))?;
    let out = t.elapsed();
    let stats = store.stats();
    let scan_t = scan(len, read)?;
    dev.migrate_to_device(region.addr(), region.npages()).map_err(err("demote"))?;
    let random = touch(&random_pages(len / PAGE_SIZE, touches), read)?;
    if timed {
        p.record(len, out, scan_t, &random);
        p.mem_used = stats.mem_used_total;
        p.out_fraction = moved.moved as f64 / region.npages() as f64;
    }
    Ok(())
}

/// The targets on one data set.
fn targets(row: &Row) -> Vec<Target> {
    let (k, u) = (&row.zram, &row.uhmm);
    let (ko, uo, ks, us) = (median(&k.out_gbs), median(&u.out_gbs), median(&k.scan_gbs), median(&u.scan_gbs));
    let mut t = vec![
        Target::at_least("demotion, uhmm / zram page-out", Some(uo / ko), 1.5, format!("{uo:.2} / {ko:.2} GB/s")),
        Target::at_least(
            "sequential fault scan, uhmm / zram swap-in",
            Some(us / ks),
            1.5,
            format!("{us:.2} / {ks:.2} GB/s"),
        ),
        Target::at_most(
            "random fault p50, uhmm / zram",
            Some(u.random_p50_us / k.random_p50_us),
            1.5,
            format!("{:.2} / {:.2} µs", u.random_p50_us, k.random_p50_us),
        ),
        Target::at_most(
            "random fault p99, uhmm / zram",
            Some(u.random_p99_us / k.random_p99_us),
            2.0,
            format!("{:.2} / {:.2} µs", u.random_p99_us, k.random_p99_us),
        ),
    ];
    if matches!(row.data, "text" | "heap") {
        let ratio = u.mem_used as f64 / k.mem_used.max(1) as f64;
        t.push(Target::at_most(
            "memory used, uhmm / zram mem_used_total",
            Some(ratio),
            0.8,
            format!("{} / {}", human(u.mem_used as usize), human(k.mem_used as usize)),
        ));
    }
    t
}

/// The results as Markdown: the machine, one table, the rerun command.
fn markdown(r: &TierResults) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "Machine: {}. Data set size {}, {} timed runs a side. Store: {}. Kernel: {}.\n\n",
        r.machine.describe(),
        human(r.size),
        r.runs,
        r.store,
        r.zram
    ));
    s.push_str("| data | target | uhmm / baseline | bound | met | numbers (uhmm / baseline) |\n| --- | --- | --- | --- | --- | --- |\n");
    for row in &r.rows {
        for t in &row.targets {
            s.push_str(&t.row(row.data));
        }
        let mem = |x: &Side| format!("{:.2}", x.mem_used as f64 / (r.size as f64 * x.out_fraction.max(1e-9)));
        s.push_str(&format!(
            "| {} | (share out: zram {:.0}%, uhmm {:.0}%; memory per byte out: zram {}, uhmm {}) | | | | |\n",
            row.data,
            row.zram.out_fraction * 100.0,
            row.uhmm.out_fraction * 100.0,
            mem(&row.zram),
            mem(&row.uhmm)
        ));
    }
    if let Some(kv) = &r.kv {
        for (data, targets) in &kv.rows {
            for t in targets {
                s.push_str(&t.row(data));
            }
        }
    }
    for f in &r.far {
        for t in &f.targets {
            s.push_str(&t.row(&f.store));
        }
    }
    if let Some(kv) = &r.kv {
        s.push_str(&format!(
            "\nRAM-budget rows (kv): a {} hash table of 128-byte records (load 0.7), budget {}; scrambled Zipf keys \
             (theta 0.99), 90% lookups / 10% updates, every record checked. Kernel: {}. uhmm: a region under the \
             RAM-budget tier over the compressed store.\n",
            human(kv.table_bytes),
            human(kv.budget_bytes),
            kv.kernel_setup
        ));
    }
    for f in &r.far {
        s.push_str(&format!("\nFar store {}: random bytes, sealed; baseline: {}.\n", f.store, f.baseline));
    }
    s.push_str(&format!("\n{} of {} targets met. Rerun: `{}`\n", r.met, r.total, r.command));
    s
}
