//! The report: the machine, the table, the targets (ratios of numbers from
//! this run), JSON and an SVG plot of throughput against size.

use std::fs;
use std::path::Path;
use std::time::Instant;

use plotters::prelude::*;
use serde::Serialize;
use uhmm::PAGE_SIZE;

use super::cases::Metadata;
use super::{Case, Kind, Placement, Plan, Results};
use crate::units::human;

/// Where the run happened.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs this process may use.
    pub cpus: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// MemTotal, bytes.
    pub memory_bytes: u64,
    /// The kernel release.
    pub kernel: String,
    /// THP mode (/sys/kernel/mm/transparent_hugepage/enabled).
    pub thp: String,
}

impl Machine {
    /// Reads what /proc and /sys say.
    pub fn probe() -> Machine {
        let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map_or_else(|| "unknown".to_string(), |s| s.trim().to_string());
        let memory_bytes = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<u64>().ok()))
            .map_or(0, |k| k * 1024);
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            memory_bytes,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            thp: read("/sys/kernel/mm/transparent_hugepage/enabled").trim().to_string(),
        }
    }

    /// One line.
    pub fn describe(&self) -> String {
        format!(
            "{} CPUs ({}), {} RAM, Linux {}, THP {}",
            self.cpus,
            self.cpu_model,
            human(self.memory_bytes as usize),
            self.kernel,
            self.thp
        )
    }
}

/// Measures the host's steal time over an interval: time this VM's CPUs
/// wanted to run while the hypervisor ran something else (`/proc/stat`).
/// uhmm's migrations and scans share their work between threads on both
/// CPUs, so a CPU the host takes away stalls the others, and a reading taken
/// then must say so.
#[derive(Debug, Clone, Copy)]
pub struct StealMeter {
    ticks: Option<u64>,
    at: Instant,
}

/// Clock ticks a second in `/proc/stat` (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

impl StealMeter {
    /// Starts measuring now.
    pub fn start() -> StealMeter {
        StealMeter { ticks: steal_ticks(&fs::read_to_string("/proc/stat").unwrap_or_default()), at: Instant::now() }
    }

    /// Time stolen since `start`, as a share of one CPU's time over the
    /// interval (0.25: a quarter of a CPU); `None` where `/proc/stat` has
    /// no steal column.
    pub fn share(&self) -> Option<f64> {
        let now = steal_ticks(&fs::read_to_string("/proc/stat").ok()?)?;
        let secs = self.at.elapsed().as_secs_f64();
        Some(now.saturating_sub(self.ticks?) as f64 / USER_HZ / secs.max(f64::MIN_POSITIVE))
    }
}

/// The steal column of the `cpu` line (all CPUs) of `/proc/stat`.
fn steal_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    // cpu user nice system idle iowait irq softirq steal ...
    line.split_whitespace().nth(8)?.parse().ok()
}

/// One of the targets, evaluated on this run's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is compared.
    pub name: String,
    /// The ratio (or the figure) measured; `None` when it could not be.
    pub ratio: Option<f64>,
    /// The bound, e.g. `>= 0.75`.
    pub bound: String,
    /// Whether the measured ratio meets the bound.
    pub met: Option<bool>,
    /// The numbers the ratio comes from.
    pub detail: String,
}

impl Target {
    pub(super) fn at_least(name: impl Into<String>, ratio: Option<f64>, bound: f64, detail: String) -> Target {
        Target { name: name.into(), ratio, bound: format!(">= {bound}"), met: ratio.map(|r| r >= bound), detail }
    }

    pub(super) fn at_most(name: impl Into<String>, ratio: Option<f64>, bound: f64, detail: String) -> Target {
        Target { name: name.into(), ratio, bound: format!("<= {bound}"), met: ratio.map(|r| r <= bound), detail }
    }

    /// A figure shown beside the targets, with no bound.
    pub(super) fn info(name: impl Into<String>, ratio: Option<f64>, detail: String) -> Target {
        Target { name: name.into(), ratio, bound: "–".into(), met: None, detail }
    }

    /// Its row of a Markdown table whose first column is `data`: data,
    /// target, ratio, bound, met, numbers.
    pub(super) fn row(&self, data: &str) -> String {
        let ratio = self.ratio.map_or_else(|| "–".into(), |x| format!("{x:.2}"));
        let met = match self.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        format!("| {data} | {} | {ratio} | {} | {met} | {} |\n", self.name, self.bound, self.detail)
    }
}

/// The case `id` at `bytes`.
fn find<'a>(cases: &'a [Case], id: &str, bytes: usize) -> Option<&'a Case> {
    cases.iter().find(|c| c.id == id && c.bytes == bytes)
}

/// Worst over best per-page time of the case `id` between 2 MiB and the
/// target size (at least two sizes), with the two sizes.
fn flatness(cases: &[Case], id: &str, plan: &Plan) -> Option<(f64, String)> {
    let pts: Vec<(usize, f64)> = cases
        .iter()
        .filter(|c| c.id == id && c.bytes >= 2 << 20 && c.bytes <= plan.target_size)
        .filter_map(|c| c.ns_per_page.map(|n| (c.bytes, n)))
        .collect();
    if pts.len() < 2 {
        return None;
    }
    let lo = pts.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1))?;
    let hi = pts.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1))?;
    let sweep = cases.iter().find(|c| c.id == id);
    let detail = format!(
        "per page: best {:.0} ns at {}, worst {:.0} ns at {}{}",
        lo.1,
        human(lo.0),
        hi.1,
        human(hi.0),
        steal_of(sweep.as_slice())
    );
    Some((hi.1 / lo.1, detail))
}

/// "; host steal a% / b% of a CPU while measured", for the cases a target
/// compares that were measured with a [`StealMeter`]; empty for none.
fn steal_of(cases: &[&Case]) -> String {
    let shares: Vec<String> = cases.iter().filter_map(|c| c.steal).map(|s| format!("{:.0}%", s * 100.0)).collect();
    if shares.is_empty() {
        String::new()
    } else {
        format!("; host steal {} of a CPU while measured", shares.join(" / "))
    }
}

/// The largest per-page cost over the smallest allowed for "flat".
pub const FLAT_BOUND: f64 = 1.5;

/// Evaluates the targets on the cases of this run.
pub fn targets(plan: &Plan, cases: &[Case], meta: &Metadata) -> Vec<Target> {
    let at = plan.target_size;
    let sz = human(at);
    let memcpy = find(cases, "memcpy_1t", at);
    let ratio_of = |id: &str, base: Option<&Case>| -> (Option<f64>, String) {
        match (find(cases, id, at), base) {
            (Some(c), Some(b)) => (
                Some(c.median / b.median),
                format!("{:.2} GB/s vs {} {:.2} GB/s{}", c.median, b.name, b.median, steal_of(&[c, b])),
            ),
            _ => (None, "not measured".into()),
        }
    };
    let mut out = Vec::new();
    let (r, d) = ratio_of("to_device_small", memcpy);
    out.push(Target::at_least(format!("RAM → sim bulk / memcpy 1 thread ({sz})"), r, 0.75, d));
    let (r, d) = ratio_of("to_ram_small", memcpy);
    out.push(Target::at_least(format!("sim → RAM bulk / memcpy 1 thread ({sz})"), r, 0.5, d));

    for placement in [Placement::OtherCpu, Placement::SameCpu] {
        let case = |id: &str| cases.iter().find(|c| c.id == format!("{id}_{}", placement.id()));
        let (r, d) = match (case("fault_latency"), case("uffd_round_trip")) {
            (Some(f), Some(raw)) => match (f.p50_us, raw.p50_us) {
                (Some(a), Some(b)) => (
                    Some(a / b),
                    // Both were measured in one alternation: one steal reading.
                    format!("p50 {a:.1} µs vs raw userfaultfd round trip p50 {b:.1} µs{}", steal_of(&[f])),
                ),
                _ => (None, "no p50".into()),
            },
            _ => (None, "not measured (one CPU)".into()),
        };
        let name = format!("single-page CPU fault p50 / raw userfaultfd round trip p50, {}", placement.name());
        out.push(Target::at_most(name, r, 1.2, d));
    }

    let scan = cases.iter().find(|c| c.id == "scan_seq_fa16");
    let zram = cases.iter().find(|c| c.id == "zram_swapin");
    let t = match (scan, zram) {
        (Some(s), Some(z)) => Target::at_least(
            format!("sequential CPU scan (fault-around 16) / zram swap-in ({})", human(s.bytes)),
            Some(s.median / z.median),
            2.0,
            format!("{:.2} GB/s vs {:.2} GB/s{}", s.median, z.median, steal_of(&[s, z])),
        ),
        (Some(s), None) => {
            let m = find(cases, "memcpy_1t", s.bytes);
            Target::at_least(
                format!("sequential CPU scan (fault-around 16) / memcpy 1 thread ({}; no zram)", human(s.bytes)),
                m.map(|m| s.median / m.median),
                0.4,
                m.map_or_else(
                    || "no memcpy at that size".into(),
                    |m| format!("{:.2} GB/s vs {:.2} GB/s{}", s.median, m.median, steal_of(&[s, m])),
                ),
            )
        }
        _ => Target::at_least("sequential CPU scan", None, 2.0, "not measured".into()),
    };
    out.push(t);

    out.push(Target::at_most(
        format!("metadata bytes per resident page ({})", human(meta.region_bytes)),
        Some(meta.bytes_per_resident_page),
        16.0,
        format!(
            "{} B with {} pages in RAM, {} B with them on the device",
            meta.ram_resident_bytes, meta.pages, meta.device_resident_bytes
        ),
    ));
    let mib = meta.untouched_1tib_bytes as f64 / (1 << 20) as f64;
    out.push(Target {
        name: "metadata of an untouched 1 TiB region, MiB".into(),
        ratio: Some(mib),
        bound: "< 1".into(),
        met: Some(mib < 1.0),
        detail: format!("{} B", meta.untouched_1tib_bytes),
    });
    for (id, what) in [("to_device_small", "RAM → sim"), ("to_ram_small", "sim → RAM")] {
        let (r, d) =
            flatness(cases, id, plan).map_or((None, "fewer than two sizes from 2 MiB".into()), |(r, d)| (Some(r), d));
        out.push(Target::at_most(format!("{what} per-page cost, worst / best, 2 MiB … {sz} (flat)"), r, FLAT_BOUND, d));
    }
    out
}

/// Prints the table and the targets.
pub fn print(r: &Results) {
    println!();
    println!(
        "{:<60} {:>9} {:>9} {:>9} {:>9} {:<8} {:>11}  note",
        "case", "size", "median", "min", "max", "unit", "per page"
    );
    for c in &r.cases {
        let (unit, extra) = match c.kind {
            Kind::Throughput => ("GB/s", c.ns_per_page.map_or(String::new(), |n| format!("{n:.0} ns"))),
            Kind::Latency => ("µs p50", c.p99_us.map_or(String::new(), |p| format!("p99 {p:.1} µs"))),
        };
        let size = match c.kind {
            Kind::Throughput => human(c.bytes),
            Kind::Latency => format!("{} pg", c.bytes / PAGE_SIZE),
        };
        println!(
            "{:<60} {:>9} {:>9.2} {:>9.2} {:>9.2} {:<8} {:>11}  {}",
            format!("[{}] {}", if c.group == "baseline" { "base" } else { "uhmm" }, c.name),
            size,
            c.median,
            c.min,
            c.max,
            unit,
            extra,
            c.note
        );
    }
    let m = &r.metadata;
    println!();
    println!(
        "metadata: {:.2} B per resident page ({} pages: {} B in RAM, {} B on the device); untouched 1 TiB region: {} B",
        m.bytes_per_resident_page, m.pages, m.ram_resident_bytes, m.device_resident_bytes, m.untouched_1tib_bytes
    );
    println!();
    println!("targets (ratios of numbers measured in this run)");
    for t in &r.targets {
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "not measured",
        };
        let ratio = t.ratio.map_or("-".to_string(), |x| format!("{x:.3}"));
        println!("  {:<72} {:>8} {:<7} {:<12} {}", t.name, ratio, t.bound, verdict, t.detail);
    }
    let met = r.targets.iter().filter(|t| t.met == Some(true)).count();
    println!("  {met} of {} targets met; total time {:.1} s", r.targets.len(), r.total_seconds);
}

/// Writes the results as pretty JSON.
pub fn write_json(r: &Results, path: &Path) -> Result<(), String> {
    let s = serde_json::to_string_pretty(r).map_err(|e| format!("serializing JSON: {e}"))?;
    fs::write(path, s + "\n").map_err(|e| format!("writing {}: {e}", path.display()))
}

/// The series of the plot: case id, legend, colour.
const SERIES: [(&str, &str, RGBColor); 7] = [
    ("memcpy_1t", "memcpy, 1 thread", RGBColor(0, 0, 0)),
    ("memcpy_2t", "memcpy, 2 threads", RGBColor(128, 128, 128)),
    ("stream_pages_1t", "page copies, non-temporal, 1 thread", RGBColor(148, 103, 189)),
    ("to_device_small", "RAM → sim, small pages", RGBColor(31, 119, 180)),
    ("to_ram_small", "sim → RAM, small pages", RGBColor(214, 39, 40)),
    ("to_device_huge", "RAM → sim, huge pages", RGBColor(44, 160, 44)),
    ("to_ram_huge", "sim → RAM, huge pages", RGBColor(255, 127, 14)),
];

/// A plotted line: legend, colour, (bytes, GB/s) points.
type Line = (&'static str, RGBColor, Vec<(f64, f64)>);

/// Draws throughput (median GB/s) against size, log-scaled size axis, as SVG.
pub fn plot(r: &Results, path: &Path) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    let lines: Vec<Line> = SERIES
        .iter()
        .map(|&(id, label, color)| {
            let pts = r.cases.iter().filter(|c| c.id == id).map(|c| (c.bytes as f64, c.median)).collect();
            (label, color, pts)
        })
        .filter(|l: &Line| !l.2.is_empty())
        .collect();
    let xs = lines.iter().flat_map(|l| l.2.iter().map(|p| p.0));
    let lo = xs.clone().fold(f64::INFINITY, f64::min);
    let hi = xs.fold(0.0, f64::max);
    let (lo, hi) = if lo < hi { (lo, hi) } else { (lo / 2.0, lo.max(1.0) * 2.0) };
    let ymax = lines.iter().flat_map(|l| l.2.iter().map(|p| p.1)).filter(|y| y.is_finite()).fold(0.0, f64::max);
    let ymax = if ymax > 0.0 { ymax * 1.1 } else { 1.0 };

    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("uhmm bench: throughput against size (median of runs)", ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..ymax)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("bytes")
        .y_desc("GB/s")
        .x_label_formatter(&|x| human(*x as usize))
        .draw()
        .map_err(|x| e(&x))?;
    for (label, color, pts) in lines {
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)).point_size(3))
            .map_err(|x| e(&x))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_the_eighth_value_of_the_all_cpus_line() {
        let stat = "cpu  2100467 0 1631840 3218790 11557 0 2084 99664 0 0\n\
                    cpu0 1019000 0 855049 1603397 2666 0 533 51222 0 0\n";
        assert_eq!(steal_ticks(stat), Some(99664));
        assert_eq!(steal_ticks("cpu0 1 2 3 4 5 6 7 8\n"), None, "only the line of all CPUs counts");
        assert_eq!(steal_ticks("cpu  1 2 3 4 5 6 7\n"), None, "a kernel without the column");
    }

    #[test]
    fn a_steal_share_is_measured_here() {
        let share = StealMeter::start().share().expect("/proc/stat has a steal column");
        assert!((0.0..=64.0).contains(&share), "{share}");
    }
}
