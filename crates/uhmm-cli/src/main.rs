//! The `uhmm` command: heterogeneous memory management for user space.
//!
//! `uhmm demo` runs the main job on the embedded sim device: a region is
//! filled, moved to the device, touched back by the CPU and verified, with a
//! residency map, progress and counters.
#![forbid(unsafe_code)]

mod demo;
mod map;
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo::run(&args),
    }
}
