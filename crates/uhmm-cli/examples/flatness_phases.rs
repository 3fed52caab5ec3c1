//! How much the bench's flatness reading moves with the machine's phases,
//! with nothing else changing: one process, one address space, one sim
//! device and one region (small pages), the same two migrations repeated
//! for as long as asked. Each second it prints the median cost per page of
//! a round trip of `--size` (its data beyond the caches) and of 2 MiB (its
//! data in the caches, as the bench's sweep measures it), their quotient
//! (the bench's "worst / best" for these two sizes), a plain memcpy of
//! `--size` and the steal time the host took from this VM. At the end it
//! sums the quotients up over 1 s windows and over 10 s windows (about as
//! long as one of the bench's sweeps).
//!
//! ```sh
//! cargo run --release -p uhmm-cli --example flatness_phases -- --seconds 600
//! ```

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use uhmm::{AddressSpace, Config, PAGE_SIZE, Prot};
use uhmm_devices::sim::{SimConfig, SimDevice};

/// Command line.
#[derive(Parser)]
struct Args {
    /// How long to measure, in seconds.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// The size migrated beyond the caches, in MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: usize,
}

/// The 2 MiB round trip whose data stays in the caches.
const CACHED: usize = 2 << 20;

/// Costs of a round trip in ns a page: to the device, back to RAM.
type Costs = (f64, f64);

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flatness_phases: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let big = (args.size_mib << 20).max(2 * CACHED);
    let space = AddressSpace::new(Config::default()).map_err(|e| format!("address space: {e}"))?;
    let defaults = SimConfig::default();
    let capacity = big.next_multiple_of(defaults.chunk_bytes) + defaults.chunk_bytes;
    let dev = SimDevice::new(&space, SimConfig { capacity_bytes: capacity, ..defaults })
        .map_err(|e| format!("sim device: {e}"))?;
    let region = space.map(big, Prot::READ_WRITE).map_err(|e| format!("region: {e}"))?;
    region.write(0, &vec![7u8; big]).map_err(|e| format!("filling the region: {e}"))?;
    let round_trip = |bytes: usize| -> Result<Costs, String> {
        let pages = bytes / PAGE_SIZE;
        let t = Instant::now();
        dev.migrate_to_device_all(region.addr(), pages).map_err(|e| format!("to the device: {e}"))?;
        let to_device = t.elapsed();
        let t = Instant::now();
        dev.migrate_to_system(region.addr(), pages).map_err(|e| format!("to RAM: {e}"))?;
        Ok((per_page(to_device, pages), per_page(t.elapsed(), pages)))
    };
    let (src, mut dst) = (vec![0x5au8; big], vec![0xa5u8; big]);

    println!("  s  memcpy  {:>4} MiB to / back  2 MiB to / back  worst/best to / back  steal", big >> 20);
    let start = Instant::now();
    let mut windows = Vec::new();
    while start.elapsed() < Duration::from_secs(args.seconds) {
        let steal_before = steal_ticks()?;
        let (mut big_runs, mut cached_runs, mut memcpy_runs) = (Vec::new(), Vec::new(), Vec::new());
        let end = Instant::now() + Duration::from_secs(1);
        while Instant::now() < end {
            let t = Instant::now();
            dst.copy_from_slice(&src);
            std::hint::black_box(&dst);
            memcpy_runs.push(per_page(t.elapsed(), big / PAGE_SIZE));
            big_runs.push(round_trip(big)?);
            // As the bench's sweep: a warm-up puts the data in the caches.
            round_trip(CACHED)?;
            for _ in 0..8 {
                cached_runs.push(round_trip(CACHED)?);
            }
        }
        let (big_costs, cached_costs) = (medians(&big_runs), medians(&cached_runs));
        println!(
            "{:3.0}  {:6.0}  {:8.0} / {:4.0}  {:7.0} / {:4.0}  {:11.2} / {:4.2}  {:5}",
            start.elapsed().as_secs_f64(),
            median(memcpy_runs),
            big_costs.0,
            big_costs.1,
            cached_costs.0,
            cached_costs.1,
            big_costs.0 / cached_costs.0,
            big_costs.1 / cached_costs.1,
            steal_ticks()?.saturating_sub(steal_before)
        );
        windows.push((big_costs, cached_costs));
    }
    summarize("1 s windows", &windows);
    let tens: Vec<_> = windows
        .chunks_exact(10)
        .map(|c| {
            (medians(&c.iter().map(|w| w.0).collect::<Vec<_>>()), medians(&c.iter().map(|w| w.1).collect::<Vec<_>>()))
        })
        .collect();
    summarize("10 s windows", &tens);
    Ok(())
}

/// Prints the distribution of worst / best over `windows` of (big, cached)
/// costs, both directions.
fn summarize(what: &str, windows: &[(Costs, Costs)]) {
    if windows.is_empty() {
        return;
    }
    for (dir, pick) in [("to the device", 0), ("back to RAM", 1)] {
        let q: Vec<f64> = windows.iter().map(|(b, c)| if pick == 0 { b.0 / c.0 } else { b.1 / c.1 }).collect();
        let over = q.iter().filter(|&&x| x > 1.5).count();
        let mut sorted = q.clone();
        sorted.sort_by(f64::total_cmp);
        let at = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
        println!(
            "{what}, {dir}: {} windows, worst/best median {:.2}, p90 {:.2}, max {:.2}, above 1.5 in {over}",
            q.len(),
            at(0.5),
            at(0.9),
            at(1.0)
        );
    }
}

fn per_page(d: Duration, pages: usize) -> f64 {
    d.as_nanos() as f64 / pages as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn medians(v: &[Costs]) -> Costs {
    (median(v.iter().map(|x| x.0).collect()), median(v.iter().map(|x| x.1).collect()))
}

/// The host's steal time over all CPUs, in clock ticks (`/proc/stat`).
fn steal_ticks() -> Result<u64, String> {
    let stat = std::fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    stat.lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(8))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "/proc/stat: no steal column".to_string())
}
