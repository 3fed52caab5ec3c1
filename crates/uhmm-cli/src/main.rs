//! The `uhmm` command: heterogeneous memory management for user space.
//!
//! `uhmm demo` runs the main job on the embedded sim device: a region is
//! filled, moved to the device, touched back by the CPU and verified, with a
//! residency map, progress and counters. `uhmm bench` measures uhmm against
//! baselines taken in the same run and reports the targets as ratios.
//! `uhmm stress` is the integrity soak: random reads, writes and migrations
//! with every byte verified. `uhmm run` puts an unmodified program's large
//! memory under uhmm.
#![forbid(unsafe_code)]

mod bench;
mod demo;
mod devices;
mod gpu;
mod map;
mod run;
mod stress;
mod units;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// uhmm: heterogeneous memory management for user space.
///
/// uhmm moves the pages behind ranges of a process's address space between
/// RAM and device memory while the program keeps using plain pointers; CPU
/// accesses to pages that live on a device are caught with userfaultfd and
/// served by migrating the pages back (Linux HMM, carried into a process).
#[derive(Debug, Parser)]
#[command(name = "uhmm", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fill a region, move it to the sim device, touch part of it back from
    /// the CPU, and verify every byte.
    ///
    /// Steps: map a region; fill it with a known pattern (first-touch faults
    /// are zero-filled by the fault engine); migrate it all to the sim device;
    /// read the first --touch-fraction of it through the CPU (each access
    /// faults its pages back from the device); then verify every byte: the
    /// touched part through the CPU, the first half of the rest with device
    /// reads (the device reads its own memory), the second half after
    /// migrating it back to RAM explicitly. A residency map and the counters
    /// are printed after each step.
    ///
    /// Exit status: 0 when every byte read back is right, 1 when some are
    /// wrong, 2 on an error (for example no usable userfaultfd).
    Demo(demo::DemoArgs),

    /// Measure uhmm against baselines taken in the same run, and report
    /// each target as a ratio.
    ///
    /// Baselines: memcpy (1 and 2 threads) of the same bytes; a raw
    /// userfaultfd round trip (a handler thread answering single-page
    /// MISSING faults with UFFDIO_COPY, built from uhmm's sys layer only);
    /// and, as root where a zram device can be created, the kernel's own
    /// MADV_PAGEOUT to zram swap and fault back (the device is created and
    /// removed by the bench; swap is never left on).
    ///
    /// Cases: bulk migration RAM -> sim device -> RAM at each size (small
    /// and huge pages); single-page CPU fault latency on device pages (p50,
    /// p99); sequential and random CPU scans of device-resident data with
    /// fault-around 16 and 1; 2 threads faulting at once; metadata per
    /// resident page and for an untouched 1 TiB region.
    ///
    /// Every case runs 1 untimed warm-up and --runs timed runs (median, min,
    /// max). The report goes to stdout (progress to stderr); --json and
    /// --plot write the numbers and an SVG of throughput against size.
    ///
    /// Exit status: 0 when everything was measured (whether or not targets
    /// are met), 2 on an error.
    Bench(bench::BenchArgs),

    /// The integrity soak: random reads and writes over several regions
    /// while other threads migrate random ranges to and from sim devices
    /// (with optional fault injection), evict them, and change protections.
    ///
    /// Writer thread t owns the pages p with p % threads == t of every
    /// region and keeps a shadow of them, so every byte's expected value is
    /// known; each of its reads (through the CPU or a device) is checked at
    /// once. Every --checkpoint seconds all threads stop and every byte is
    /// verified through the CPU and a device; at the end everything is moved
    /// to a device, verified, evicted, and verified again.
    ///
    /// Exit status: 0 when no byte was lost or corrupted and no unexpected
    /// error happened, 1 otherwise, 2 on a setup error, 3 when the watchdog
    /// saw a thread make no progress for --watchdog seconds (a hang; the
    /// threads' states are printed).
    Stress(stress::StressArgs),

    /// Run an unmodified program with its large anonymous memory under
    /// uhmm: allocations and mappings of at least --min-size become uhmm
    /// regions, kept within --ram-budget by compressing the coldest pages.
    ///
    /// `libuhmm_preload.so` (built with this binary, next to it) is
    /// preloaded into the program (LD_PRELOAD); it takes over the C
    /// allocator's entry points and the memory system calls' wrappers, and
    /// hands everything small to the C library. At exit each process that
    /// used uhmm leaves a report; `uhmm run` prints them with the program's
    /// peak and mean resident memory. Needs full userfaultfd (root,
    /// read-write access to /dev/userfaultfd, or
    /// vm.unprivileged_userfaultfd=1).
    ///
    /// Exit status: the program's (killed by a signal: the same signal);
    /// 2 when it could not be started.
    Run(run::RunArgs),
}

fn main() -> ExitCode {
    // Logs only when asked: `RUST_LOG=uhmm::tier=debug` shows each reclaim round.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Stress(args) => stress::run(&args),
        Command::Run(args) => run::run(&args),
    }
}
