//! `uhmm run`: runs an unmodified program with `libuhmm_preload.so`
//! preloaded, so that its large anonymous memory is managed by uhmm (the
//! compressed store, a RAM budget); forwards signals and the exit status,
//! samples its resident memory, and prints what uhmm did at the end.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::units::{human, parse_size};

/// The library's report (the file is the library's own).
#[path = "../../uhmm-preload/report.rs"]
#[allow(dead_code)]
mod report;
use report::Report;

/// The preloaded library's file name, next to the `uhmm` binary.
const LIBRARY: &str = "libuhmm_preload.so";

/// How often the program's resident memory is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// Arguments of `uhmm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Keep the program's managed memory within this much RAM (K, M, G
    /// suffixes); its coldest pages are compressed. Without it, the
    /// memory is managed but stays in RAM.
    #[arg(long, value_parser = parse_size)]
    pub ram_budget: Option<usize>,
    /// Where cold pages go: `compress` (the compressed store in RAM), or a
    /// far store, every page encrypted: `file:PATH` (a directory: a private
    /// file in it), `redis://[USER:PASSWORD@]HOST:PORT`, `rediss://…`,
    /// `redis-cluster://HOST:PORT[,HOST:PORT…]`.
    #[arg(long, default_value = "compress", value_parser = parse_run_device)]
    pub device: String,
    /// The smallest allocation or anonymous mapping uhmm takes (smaller
    /// ones stay with the C library).
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    pub min_size: usize,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Print no report at exit.
    #[arg(long, short)]
    pub quiet: bool,
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "PROGRAM")]
    pub command: Vec<OsString>,
}

/// `--device`'s parser: `compress` or a far store's address, checked here
/// so that a typo is an error before the program starts.
fn parse_run_device(s: &str) -> Result<String, String> {
    if s != "compress" {
        uhmm_devices::far::FarAddress::parse(s).map_err(|e| e.to_string())?;
    }
    Ok(s.to_owned())
}

/// Whether this process may use full userfaultfd (the program's own
/// system calls on its memory must be served); `Err` says what to do.
fn check_userfaultfd() -> Result<(), String> {
    if rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let dev = rustix::fs::access("/dev/userfaultfd", rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK);
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    if dev.is_ok() || sysctl.trim() == "1" {
        return Ok(());
    }
    Err("uhmm run needs full userfaultfd: run as root, or give this user read-write access to \
         /dev/userfaultfd (sudo setfacl -m u:$USER:rw /dev/userfaultfd), or set \
         vm.unprivileged_userfaultfd=1 (sudo sysctl vm.unprivileged_userfaultfd=1)"
        .into())
}

/// The library next to the running `uhmm`.
fn library() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("where is uhmm? {e}"))?;
    let lib = exe.with_file_name(LIBRARY);
    if lib.is_file() {
        Ok(lib)
    } else {
        Err(format!("{} is missing (it is built with the CLI: cargo build --release -p uhmm-cli)", lib.display()))
    }
}

/// The program's resident memory over its run, from `/proc/PID/status`.
#[derive(Debug, Default, Clone, Copy, Serialize)]
struct Resident {
    /// The most (`VmHWM` at the last sample), bytes.
    peak_bytes: u64,
    /// The mean of the samples (`VmRSS`), bytes.
    mean_bytes: u64,
    samples: u64,
}

/// Samples `pid`'s resident memory until `done`.
fn sample(pid: u32, done: &AtomicBool) -> Resident {
    let path = format!("/proc/{pid}/status");
    let kib = |s: &str, key: &str| -> Option<u64> {
        let line = s.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|k| k * 1024)
    };
    let (mut sum, mut r) = (0u64, Resident::default());
    while !done.load(Ordering::Relaxed) {
        let Ok(s) = std::fs::read_to_string(&path) else { break };
        if let (Some(rss), Some(hwm)) = (kib(&s, "VmRSS:"), kib(&s, "VmHWM:")) {
            sum += rss;
            r.samples += 1;
            r.peak_bytes = r.peak_bytes.max(hwm);
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
    r.mean_bytes = sum.checked_div(r.samples).unwrap_or(0);
    r
}

/// What `--report` writes.
#[derive(Debug, Serialize)]
struct RunReport {
    /// The program's exit code, if it exited.
    exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    signal: Option<i32>,
    /// Wall time, seconds.
    seconds: f64,
    /// The program's resident memory (the process `uhmm run` started).
    resident: Resident,
    /// The RAM budget asked for, bytes.
    ram_budget: Option<u64>,
    /// The report of each process that used uhmm (the program, and any
    /// program it ran).
    processes: Vec<Report>,
}

/// Forwards the signals a supervisor is sent to the program, so that
/// `uhmm run` ends when the program does.
fn forward_signals(pid: u32) -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2])
        .map_err(|e| format!("signal handlers: {e}"))?;
    let pid = rustix::process::Pid::from_raw(pid as i32).ok_or("no pid")?;
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if let Some(s) = rustix::process::Signal::from_named_raw(sig) {
                let _ = rustix::process::kill_process(pid, s);
            }
        }
    });
    Ok(())
}

/// Reads the reports the library left in `dir`.
fn read_reports(dir: &Path) -> Vec<Report> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<Report> = entries
        .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    out.sort_by_key(|r| r.pid);
    out
}

/// The one-screen summary.
fn print_summary(name: &str, r: &RunReport) {
    let status = match (r.exit_code, r.signal) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    };
    eprintln!("uhmm run: {name} {status} after {:.2} s", r.seconds);
    let budget = r.ram_budget.map_or("no budget".into(), |b| format!("budget {}", human(b as usize)));
    eprintln!(
        "  resident memory: peak {}, mean {} ({budget})",
        human(r.resident.peak_bytes as usize),
        human(r.resident.mean_bytes as usize)
    );
    if r.processes.is_empty() {
        eprintln!("  uhmm managed nothing (no report: no allocation reached --min-size, or the program did not exit)");
    }
    for p in &r.processes {
        let who = if r.processes.len() > 1 { format!("  [pid {}] ", p.pid) } else { "  ".into() };
        if let Some(e) = &p.error {
            eprintln!("{who}uhmm was not used: {e}");
            continue;
        }
        eprintln!(
            "{who}managed: {} blocks, at most {} at once ({} given back to plain memory)",
            p.blocks,
            human(p.managed_peak_bytes as usize),
            p.detached_blocks
        );
        if p.foreign_unmapped_pages > 0 || p.regions_followed > 0 {
            eprintln!(
                "{who}unmapped or moved behind uhmm (raw system calls): {} given up, {} regions followed",
                human(p.foreign_unmapped_pages as usize * 4096),
                p.regions_followed
            );
        }
        if p.device.is_empty() || p.device == "compress" {
            eprintln!(
                "{who}faults {}, pages compressed {}, brought back {}; at exit {} stored in {} (ratio {:.2}, {} saved)",
                p.faults,
                p.demoted_pages,
                p.promoted_pages,
                human(p.stored_bytes as usize),
                human(p.store_bytes as usize),
                p.compression_ratio,
                human(p.stored_bytes.saturating_sub(p.store_bytes) as usize)
            );
        } else {
            eprintln!(
                "{who}faults {}, pages sent to {} {}, brought back {}; at exit {} there",
                p.faults,
                p.device,
                p.demoted_pages,
                p.promoted_pages,
                human(p.stored_bytes as usize)
            );
        }
        eprintln!("{who}time in uhmm's tier thread: {:.2} s of {:.2} s", p.tier_seconds, p.seconds);
    }
}

/// `uhmm run`. Exit status: the program's (a program killed by a signal
/// ends `uhmm run` with the same signal); 2 when it could not be started.
pub fn run(args: &RunArgs) -> ExitCode {
    match run_inner(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("uhmm run: {e}");
            ExitCode::from(2)
        }
    }
}

fn run_inner(args: &RunArgs) -> Result<ExitCode, String> {
    check_userfaultfd()?;
    let lib = library()?;
    let dir = std::env::temp_dir().join(format!("uhmm-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut preload = OsString::from(&lib);
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        preload.push(":");
        preload.push(old);
    }
    let (program, rest) = args.command.split_first().ok_or("no program given")?;
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .env("LD_PRELOAD", preload)
        .env("UHMM_MIN_SIZE", args.min_size.to_string())
        .env("UHMM_REPORT", &dir)
        .env("UHMM_DEVICE", &args.device);
    match args.ram_budget {
        Some(b) => cmd.env("UHMM_RAM_BUDGET", b.to_string()),
        None => cmd.env_remove("UHMM_RAM_BUDGET"),
    };
    let t = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("{}: {e}", program.to_string_lossy()))?;
    forward_signals(child.id())?;
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (done, pid) = (done.clone(), child.id());
        std::thread::spawn(move || sample(pid, &done))
    };
    let status = child.wait().map_err(|e| format!("waiting for the program: {e}"));
    done.store(true, Ordering::Relaxed);
    let resident = sampler.join().unwrap_or_default();
    let status = status?;
    use std::os::unix::process::ExitStatusExt;
    let report = RunReport {
        exit_code: status.code(),
        signal: status.signal(),
        seconds: t.elapsed().as_secs_f64(),
        resident,
        ram_budget: args.ram_budget.map(|b| b as u64),
        processes: read_reports(&dir),
    };
    let _ = std::fs::remove_dir_all(&dir);
    if !args.quiet {
        print_summary(&program.to_string_lossy(), &report);
    }
    if let Some(path) = &args.report {
        let json = serde_json::to_vec_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(sig) = status.signal() {
        // End as the program did: its signal, with the default action.
        let _ = signal_hook::low_level::emulate_default_handler(sig);
        return Ok(ExitCode::from(128 + sig as u8));
    }
    Ok(ExitCode::from(status.code().unwrap_or(1) as u8))
}
