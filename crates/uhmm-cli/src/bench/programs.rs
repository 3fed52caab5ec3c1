//! `uhmm bench run`: unmodified programs under `uhmm run` against the same
//! programs under the kernel's memory cgroup limit with zram swap, at
//! budgets of 100%, 50% and 25% of their peak, in one run.
//!
//! Each program first runs plainly in an unlimited memory cgroup: its wall
//! time and its peak (the cgroup's high-water mark) are the baseline. Then,
//! at each budget B: the kernel side runs it in a cgroup limited to B, with
//! a zram (lz4) device the only swap; the uhmm side runs `uhmm run
//! --ram-budget B` in an unlimited cgroup. Both sides' outputs must be the
//! plain run's. Each side's peak is the most anonymous memory its cgroup
//! was charged (sampled every 10 ms): the program's own pages, uhmm's
//! compressed store and the memory uhmm does not manage included, zram's
//! memory and the page cache not.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::cgroup::Cgroup;
use super::zram::Zram;
use crate::units::human;

/// A program of the bench: a name and a shell command run in `dir`.
struct Program {
    name: &'static str,
    script: String,
}

/// The programs, with their inputs written into `dir`.
fn programs(dir: &Path) -> Result<Vec<Program>, String> {
    let scale = 4;
    let python = format!(
        "python3 -c \"\nimport hashlib\nb = bytearray({} << 20)\nfor i in range(0, len(b), 4096):\n    b[i:i + 8] = \
         i.to_bytes(8, 'little')\nd = {{i: str(i) * 3 for i in range({})}}\nfor r in range(3):\n    \
         print(hashlib.sha256(b).hexdigest(), sum(len(d[i]) for i in range(0, len(d), 7)))\n\"",
        32 * scale,
        250_000 * scale
    );
    let lines = dir.join("lines.txt");
    let generator = format!(
        "import random,sys\nr=random.Random(7)\nw=open(sys.argv[1],'w').write\nfor i in range({}): w('%016x %d\\n' % \
         (r.getrandbits(64), i))",
        250_000 * scale
    );
    let st =
        Command::new("python3").args(["-c", &generator]).arg(&lines).status().map_err(|e| format!("python3: {e}"))?;
    if !st.success() {
        return Err("python3 could not write the sort input".into());
    }
    let sort = format!(
        "sort --buffer-size={}M --parallel=2 -o sorted.txt {} && sha256sum < sorted.txt",
        16 * scale,
        lines.display()
    );
    Ok(vec![Program { name: "python3 (bytearray + dict)", script: python }, Program { name: "sort", script: sort }])
}

/// How often a run's memory is sampled.
const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// The longest a run may take (seconds): a budget that makes a program
/// thrash fails the bench rather than stall it.
const RUN_LIMIT_S: u32 = 300;

/// Runs of each side at 100% of the peak (and of the plain program).
const REPEATS: usize = 5;

/// The run of median wall time among `runs`; the first failure, if any
/// failed.
fn median(runs: Vec<Result<Outcome, String>>) -> Result<Outcome, String> {
    let mut ok = Vec::new();
    for r in runs {
        ok.push(r?);
    }
    ok.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    let mid = ok.len() / 2;
    ok.into_iter().nth(mid).ok_or_else(|| "no run".to_string())
}

/// One run's outcome.
#[derive(Debug, Clone)]
struct Outcome {
    seconds: f64,
    peak_bytes: u64,
    output: String,
}

/// The anonymous memory charged to the cgroup now (`memory.stat`: v1
/// `total_rss`, v2 `anon`), bytes: the program's own pages, without the
/// page cache of the files it reads and writes.
fn anon_bytes(stat: &Path) -> Option<u64> {
    let s = fs::read_to_string(stat).ok()?;
    s.lines().find_map(|l| l.strip_prefix("total_rss ").or_else(|| l.strip_prefix("anon "))?.trim().parse().ok())
}

/// Runs `script` with `sh` in a new cgroup (limited to `limit`), prefixed
/// by `prefix` (the `uhmm run` command line, for the uhmm side), sampling
/// the cgroup's anonymous memory.
fn run_in_cgroup(script: &str, prefix: &str, limit: Option<u64>, dir: &Path) -> Result<Outcome, String> {
    let cg = Cgroup::create("programs")?;
    if let Some(l) = limit {
        cg.limit(l)?;
    }
    let procs = cg.usage_file().with_file_name("cgroup.procs");
    let stat = cg.usage_file().with_file_name("memory.stat");
    let inner = format!("{prefix}sh -c \"$0\"");
    let wrapped = format!("echo $$ > {} && exec timeout {RUN_LIMIT_S} {inner}", procs.display());
    let t = Instant::now();
    let child = Command::new("sh")
        .args(["-c", &wrapped, script])
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("sh: {e}"))?;
    let done = std::sync::atomic::AtomicBool::new(false);
    let (out, peak_bytes) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(anon_bytes(&stat).unwrap_or(0));
                std::thread::sleep(SAMPLE_EVERY);
            }
            peak
        });
        let out = child.wait_with_output();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (out, sampler.join().unwrap_or(0))
    });
    let out = out.map_err(|e| format!("sh: {e}"))?;
    let seconds = t.elapsed().as_secs_f64();
    if !out.status.success() {
        let oom = cg.oom_kills();
        let why = if oom > 0 { "OOM-killed by its cgroup".to_string() } else { format!("{}", out.status) };
        let last = String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("").to_string();
        return Err(format!("{why}{}", if last.is_empty() { String::new() } else { format!(" ({last})") }));
    }
    Ok(Outcome { seconds, peak_bytes, output: String::from_utf8_lossy(&out.stdout).into_owned() })
}

/// One row: a program at a budget.
struct Row {
    program: &'static str,
    share: u32,
    budget: u64,
    plain: Outcome,
    kernel: Result<Outcome, String>,
    uhmm: Result<Outcome, String>,
}

/// `a / b` of a figure of both sides, when both ran.
fn ratio(r: &Row, f: impl Fn(&Outcome) -> f64) -> Option<f64> {
    Some(f(r.uhmm.as_ref().ok()?) / f(r.kernel.as_ref().ok()?))
}

/// A side's figures for the table.
fn figures(o: &Result<Outcome, String>) -> String {
    match o {
        Ok(o) => format!("{:.2} s, {}", o.seconds, human(o.peak_bytes as usize)),
        Err(e) => format!("failed: {e}"),
    }
}

/// Runs the bench; prints the table (Markdown) to stdout.
pub fn run() -> Result<(), String> {
    let dir: PathBuf = std::env::temp_dir().join(format!("uhmm-bench-run-{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = measure(&dir);
    let _ = fs::remove_dir_all(&dir);
    let rows = result?;
    let show = |x: Option<f64>| x.map_or("–".to_string(), |x| format!("{x:.2}"));
    println!(
        "| program | budget | wall, uhmm / kernel | wall, uhmm / no limit | peak, uhmm / kernel | uhmm | kernel | no limit |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {}% ({}) | {} | {} | {} | {} | {} | {} |",
            r.program,
            r.share,
            human(r.budget as usize),
            show(ratio(r, |o| o.seconds)),
            show(r.uhmm.as_ref().ok().map(|o| o.seconds / r.plain.seconds)),
            show(ratio(r, |o| o.peak_bytes as f64)),
            figures(&r.uhmm),
            figures(&r.kernel),
            figures(&Ok(r.plain.clone())),
        );
    }
    println!();
    for r in &rows {
        let (what, v, bound) = match r.share {
            50 => ("wall time, uhmm / kernel", ratio(r, |o| o.seconds), 1.0),
            100 => ("wall time, uhmm / no uhmm", r.uhmm.as_ref().ok().map(|o| o.seconds / r.plain.seconds), 1.05),
            _ => continue,
        };
        let met = match v {
            Some(v) if v <= bound => "met",
            Some(_) => "**not met**",
            None if r.uhmm.is_ok() => "met (the kernel side failed)",
            None => "**not met** (uhmm's side failed)",
        };
        println!("- {}, {what} at {}% of the peak: {} (bound {bound}): {met}", r.program, r.share, show(v));
    }
    Ok(())
}

fn measure(dir: &Path) -> Result<Vec<Row>, String> {
    let uhmm = std::env::current_exe().map_err(|e| e.to_string())?;
    let progs = programs(dir)?;
    // Swap for the kernel side, for the whole run (removed on drop).
    let _zram = Zram::setup(2 << 30, Some("lz4"))?;
    let mut rows = Vec::new();
    for p in &progs {
        eprintln!("  measuring: {} without a limit (after a warm-up run)", p.name);
        run_in_cgroup(&p.script, "", None, dir)?;
        let first = run_in_cgroup(&p.script, "", None, dir)?;
        let mut plain_runs = vec![first.clone()];
        for share in [100u32, 50, 25] {
            let budget = (first.peak_bytes * share as u64 / 100).max(4 << 20);
            eprintln!("  measuring: {} at {share}% of its peak ({}): kernel, uhmm", p.name, human(budget as usize));
            let checked = |o: Result<Outcome, String>| {
                o.and_then(|o| {
                    if o.output == first.output { Ok(o) } else { Err("output differs from the plain run's".into()) }
                })
            };
            let kernel = checked(run_in_cgroup(&p.script, "", Some(budget), dir));
            let prefix = format!("{} run -q --ram-budget {budget} -- ", uhmm.display());
            let mut under = checked(run_in_cgroup(&p.script, &prefix, None, dir));
            if share == 100 {
                // Within a few percent of the plain run: the median of
                // several runs of each, alternated, so that one slow run
                // (a busy host) decides nothing.
                let mut runs = vec![under];
                for _ in 1..REPEATS {
                    plain_runs.push(run_in_cgroup(&p.script, "", None, dir)?);
                    runs.push(checked(run_in_cgroup(&p.script, &prefix, None, dir)));
                }
                under = median(runs);
            }
            if let Err(e) = &under {
                eprintln!("  uhmm side failed: {e}");
            }
            rows.push(Row { program: p.name, share, budget, plain: first.clone(), kernel, uhmm: under });
        }
        // Every row of the program compares with the median plain run.
        let plain = median(plain_runs.into_iter().map(Ok).collect()).unwrap_or(first);
        for row in rows.iter_mut().filter(|r| r.program == p.name) {
            row.plain = plain.clone();
        }
    }
    Ok(rows)
}
