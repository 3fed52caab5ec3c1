//! The uhmm cases: bulk migration to the sim device and back, single-page
//! CPU fault latency, CPU scans of device-resident data, and metadata.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use uhmm::UffdOrigin as Origin;
use uhmm::{AddressSpace, Config, PAGE_SIZE, Prot, Region};
use uhmm_devices::sim::{SimConfig, SimDevice};

use super::report::StealMeter;
use super::{Case, Latencies, Placement, Plan, progress, repeat, sweep};
use crate::units::human;

/// Bytes a CPU read or fill call handles at once.
const IO_CHUNK: usize = 4 << 20;
/// 2 MiB: the huge-page size.
const HUGE: usize = 2 << 20;

fn err(what: &str) -> impl FnOnce(uhmm::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// How an address space with the default config opens its userfaultfd.
pub fn uffd_origin() -> Result<String, String> {
    let space = AddressSpace::new(Config::default()).map_err(err("opening an address space (userfaultfd)"))?;
    Ok(match space.uffd_origin() {
        Origin::DevNode => "/dev/userfaultfd".to_string(),
        Origin::Syscall => "userfaultfd(2)".to_string(),
        Origin::UserModeOnly => "userfaultfd(2), user-mode only".to_string(),
    })
}

/// An address space, a sim device big enough for `len` bytes, and a region
/// of `len` bytes filled with non-zero data (so every page is in RAM).
struct Setup {
    space: AddressSpace,
    // Before `region`: the region is dropped first, freeing its device pages.
    dev: SimDevice,
    region: Region,
}

impl Setup {
    fn new(config: Config, len: usize, huge: bool) -> Result<Setup, String> {
        let space = AddressSpace::new(config).map_err(err("opening an address space (userfaultfd)"))?;
        let defaults = SimConfig::default();
        let capacity = len.next_multiple_of(defaults.chunk_bytes) + defaults.chunk_bytes;
        let dev =
            SimDevice::new(&space, SimConfig { capacity_bytes: capacity, ..defaults }).map_err(err("sim device"))?;
        let region = if huge { space.map_huge(len, Prot::READ_WRITE) } else { space.map(len, Prot::READ_WRITE) }
            .map_err(err("mapping a region"))?;
        let mut buf = vec![0u8; IO_CHUNK.min(len)];
        let mut off = 0;
        while off < len {
            let n = buf.len().min(len - off);
            super::fill_pattern(&mut buf[..n], off);
            region.write(off, &buf[..n]).map_err(err("filling the region"))?;
            off += n;
        }
        Ok(Setup { space, dev, region })
    }

    /// Migrates `pages` pages of the region from page `first` to the device.
    fn to_device(&self, first: usize, pages: usize) -> Result<usize, String> {
        let addr = self.region.addr() + first * PAGE_SIZE;
        Ok(self.dev.migrate_to_device_all(addr, pages).map_err(err("migrate_to_device"))?.cpages)
    }

    /// Migrates `pages` pages of the region from page `first` back to RAM.
    fn to_system(&self, first: usize, pages: usize) -> Result<usize, String> {
        let addr = self.region.addr() + first * PAGE_SIZE;
        Ok(self.dev.migrate_to_system(addr, pages).map_err(err("migrate_to_system"))?.cpages)
    }

    /// Checks the first word of the first and last page against the fill.
    fn spot_check(&self) -> Result<(), String> {
        let mut w = [0u8; 8];
        for off in [0, self.region.len() - PAGE_SIZE] {
            self.region.load(off, &mut w).map_err(err("reading back"))?;
            if u64::from_ne_bytes(w) != ((off / 8) as u64 ^ 0x5eed_c0de) {
                return Err(format!("wrong data read back at offset {off:#x}"));
            }
        }
        Ok(())
    }
}

/// Bulk migration of each size of the sweep: RAM → sim device and back,
/// one `migrate_to_device` / `migrate_to_system` call each, on small pages
/// and (from 2 MiB) on a huge-page region; and at the largest size, small
/// pages with nothing kept in staging (`keep_staging_bytes: 0`): every
/// page back to RAM a new one, as a migration back long after the one out.
///
/// The sizes of a kind share one address space, device and region (of
/// the largest size), each migrating the region's first pages: on this VM
/// two setups of the same size, measured in turns in one process, differ
/// by up to a third a page (where the host placed their memory), so
/// setups of their own made the sizes' costs compare placements as much
/// as sizes.
pub fn bulk(plan: &Plan) -> Result<Vec<Case>, String> {
    let mut out = Vec::new();
    let largest = plan.sizes.iter().copied().max().unwrap_or(0);
    // The case with nothing kept first, so that the cases the targets use
    // run in the order they always did.
    for (huge, keep) in [(false, false), (false, true), (true, true)] {
        let (kind, tag) = match (huge, keep) {
            (true, _) => ("huge pages", "huge"),
            (false, true) => ("small pages", "small"),
            (false, false) => ("small pages, nothing kept", "cold"),
        };
        let sizes: Vec<usize> = plan
            .sizes
            .iter()
            .filter(|&&s| (!huge || s >= HUGE) && (keep || s == largest))
            .map(|&s| if huge { s.next_multiple_of(HUGE) } else { s })
            .collect();
        let Some(&span) = sizes.iter().max() else { continue };
        progress(&format!(
            "bulk migration, {kind}, {}",
            sizes.iter().map(|&s| human(s)).collect::<Vec<_>>().join(", ")
        ));
        let config = if keep { Config::default() } else { Config { keep_staging_bytes: 0, ..Config::default() } };
        let setup = Setup::new(config, span, huge)?;
        let mut states: Vec<SizeState> = sizes.iter().map(|&size| SizeState { size, ..SizeState::default() }).collect();
        if tag == "small" && span >= 2 * HUGE {
            // 2 MiB of data out of the caches, as a tiering system moves it.
            states.push(SizeState { size: HUGE, moving: true, ..SizeState::default() });
        }
        let steal = StealMeter::start();
        let sweeps = sweep(
            plan,
            &mut states,
            |st| -> Result<(Duration, Duration), String> {
                let (first, npages) = (st.at / PAGE_SIZE, st.size / PAGE_SIZE);
                let (thp_in, thp_out) = setup.dev.huge_stats();
                let t = Instant::now();
                let a = setup.to_device(first, npages)?;
                let to_dev = t.elapsed();
                let t = Instant::now();
                let b = setup.to_system(first, npages)?;
                let to_ram = t.elapsed();
                if st.moving {
                    st.at = if st.at + 2 * st.size <= span { st.at + st.size } else { 0 };
                }
                let (thp_in2, thp_out2) = setup.dev.huge_stats();
                st.short += (npages - a.min(npages)) + (npages - b.min(npages));
                st.thp_in += thp_in2 - thp_in;
                st.thp_out += thp_out2 - thp_out;
                Ok((to_dev, to_ram))
            },
            |&(a, b)| a + b,
        )?;
        let stolen = steal.share();
        setup.spot_check()?;
        for (st, (warm, timed)) in states.iter().zip(sweeps) {
            let mut notes = Vec::new();
            if st.short > 0 {
                notes.push(format!("{} page moves refused (busy) over all runs", st.short));
            }
            if huge {
                notes.push(format!(
                    "all runs: {} compound 2 MiB device pages, {} 2 MiB blocks fell back to small pages",
                    st.thp_in, st.thp_out
                ));
            }
            notes.push(format!("{} timed runs", timed.len()));
            let note = notes.join("; ");
            let to_dev: Vec<Duration> = timed.iter().map(|t| t.0).collect();
            let to_ram: Vec<Duration> = timed.iter().map(|t| t.1).collect();
            let (tag, kind) = if st.moving {
                ("moving", format!("{kind}, the next 2 MiB each run"))
            } else {
                (tag, kind.to_string())
            };
            out.push(
                Case::throughput(
                    format!("to_device_{tag}"),
                    format!("RAM → sim, {kind}"),
                    "uhmm",
                    st.size,
                    warm.0,
                    &to_dev,
                )
                .with_note(note.clone())
                .with_steal(stolen),
            );
            out.push(
                Case::throughput(
                    format!("to_ram_{tag}"),
                    format!("sim → RAM, {kind}"),
                    "uhmm",
                    st.size,
                    warm.1,
                    &to_ram,
                )
                .with_note(note)
                .with_steal(stolen),
            );
        }
    }
    Ok(out)
}

/// One size of a bulk sweep: its size, where its next run starts in the
/// region, and over all its runs, the pages its migrations did not move
/// and its compound device pages. A `moving` size starts each run where
/// the last one ended (wrapping), so its data is never in the caches.
#[derive(Debug, Default)]
struct SizeState {
    size: usize,
    moving: bool,
    at: usize,
    short: usize,
    thp_in: u64,
    thp_out: u64,
}

/// Single-page CPU faults on device pages: fault-around 1; each run moves
/// the region to the device (not timed) and reads one byte of each page
/// once, each access timed.
pub struct DeviceFaults {
    s: Setup,
    before: uhmm::StatsSnapshot,
}

impl DeviceFaults {
    /// A region of `pages` pages in an address space with fault-around 1
    /// whose fault handler runs on CPU `cpu` alone.
    pub fn new(pages: usize, cpu: usize) -> Result<DeviceFaults, String> {
        let config = Config { fault_around_pages: 1, handler_cpus: vec![cpu], ..Config::default() };
        let s = Setup::new(config, pages * PAGE_SIZE, false)?;
        let before = s.space.stats();
        Ok(DeviceFaults { s, before })
    }

    /// One run, each access's nanoseconds recorded in `run`.
    pub fn run(&self, run: &mut Histogram<u64>) -> Result<(), String> {
        self.s.to_device(0, self.s.region.npages())?;
        let mut byte = [0u8; 1];
        for p in 0..self.s.region.npages() {
            let t = Instant::now();
            self.s.region.load(p * PAGE_SIZE, &mut byte).map_err(err("CPU read"))?;
            run.saturating_record((t.elapsed().as_nanos() as u64).max(1));
        }
        Ok(())
    }

    /// Checks the data and makes the case of `latencies`, measured with
    /// the handler placed as `placement` says.
    pub fn finish(self, latencies: &Latencies, placement: Placement) -> Result<Case, String> {
        self.s.spot_check()?;
        let after = self.s.space.stats();
        let len = self.s.region.len();
        let name = format!("CPU fault on a device page, {}", placement.name());
        Ok(Case::latency(format!("fault_latency_{}", placement.id()), name, "uhmm", len, latencies).with_note(format!(
            "fault-around 1: {} faults, {} migrate_to_ram calls, {} pages to RAM, {} kept pages shed",
            after.faults - self.before.faults,
            after.migrate_to_ram - self.before.migrate_to_ram,
            after.pages_to_ram - self.before.pages_to_ram,
            after.kept_shed_pages - self.before.kept_shed_pages
        )))
    }
}

/// How a scan walks the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Front to back, 4 MiB reads.
    Sequential,
    /// Every page once, one 4 KiB read each, in a random order.
    Random,
}

/// CPU scans of device-resident data: each run migrates the region to the
/// device (not timed), then reads every byte through the CPU (timed), so
/// every page comes back by CPU faults.
pub fn scans(plan: &Plan) -> Result<Vec<Case>, String> {
    let big = plan.target_size;
    let small = plan.slow_scan_size;
    let specs: [(&str, &str, usize, Order, usize, usize, usize); 6] = [
        ("scan_seq_fa16", "CPU scan, sequential, fault-around 16", big, Order::Sequential, 16, 1, 1),
        ("scan_seq_fa1", "CPU scan, sequential, fault-around 1", small, Order::Sequential, 1, 1, 1),
        ("scan_rand_fa16", "CPU scan, random pages, fault-around 16", small, Order::Random, 16, 1, 1),
        ("scan_rand_fa1", "CPU scan, random pages, fault-around 1", small, Order::Random, 1, 1, 1),
        ("scan_seq_2t", "CPU scan, sequential, 2 threads, fault-around 16", big, Order::Sequential, 16, 2, 1),
        ("scan_seq_2t_2h", "CPU scan, sequential, 2 threads, 2 handler threads", big, Order::Sequential, 16, 2, 2),
    ];
    let mut out = Vec::new();
    for (id, name, len, order, fa, threads, handlers) in specs {
        progress(&format!("{name}, {}", human(len)));
        // Scans read ahead two windows (off by default: it brings back pages the program may never read).
        let config =
            Config { fault_around_pages: fa, handler_threads: handlers, read_ahead_windows: 2, ..Config::default() };
        let s = Setup::new(config, len, false)?;
        let before = s.space.stats();
        let steal = StealMeter::start();
        let (w, runs) = repeat(plan.runs, |i| -> Result<Duration, String> {
            s.to_device(0, s.region.npages())?;
            let t = Instant::now();
            scan(&s.region, order, threads, i as u64)?;
            Ok(t.elapsed())
        })?;
        let stolen = steal.share();
        s.spot_check()?;
        let after = s.space.stats();
        let faults = (after.faults - before.faults) / (plan.runs as u64 + 1);
        out.push(
            Case::throughput(id, name, "uhmm", len, w, &runs)
                .with_note(format!("{faults} CPU faults a run ({} pages)", len / PAGE_SIZE))
                .with_steal(stolen),
        );
    }
    Ok(out)
}

/// Reads the whole region through the CPU with `threads` threads, each its
/// contiguous share.
fn scan(region: &Region, order: Order, threads: usize, seed: u64) -> Result<(), String> {
    let npages = region.npages();
    let share = npages.div_ceil(threads);
    std::thread::scope(|sc| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let first = (t * share).min(npages);
                let end = ((t + 1) * share).min(npages);
                sc.spawn(move || scan_pages(region, first, end, order, seed ^ t as u64))
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().map_err(|_| "a scan thread panicked".to_string())?)
    })
}

fn scan_pages(region: &Region, first: usize, end: usize, order: Order, seed: u64) -> Result<(), String> {
    match order {
        Order::Sequential => {
            let mut buf = vec![0u8; IO_CHUNK.min((end - first) * PAGE_SIZE).max(PAGE_SIZE)];
            let (mut off, stop) = (first * PAGE_SIZE, end * PAGE_SIZE);
            while off < stop {
                let n = buf.len().min(stop - off);
                region.load(off, &mut buf[..n]).map_err(err("CPU read"))?;
                off += n;
            }
        }
        Order::Random => {
            let mut pages: Vec<usize> = (first..end).collect();
            shuffle(&mut pages, seed);
            let mut buf = vec![0u8; PAGE_SIZE];
            for p in pages {
                region.load(p * PAGE_SIZE, &mut buf).map_err(err("CPU read"))?;
            }
        }
    }
    Ok(())
}

/// Fisher–Yates with a xorshift generator (deterministic per seed).
fn shuffle(v: &mut [usize], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

/// uhmm's metadata (`Region::metadata_bytes`: its software page table).
#[derive(Debug, Clone, Serialize)]
pub struct Metadata {
    /// Region size for the per-page figures.
    pub region_bytes: usize,
    /// Pages of that region.
    pub pages: usize,
    /// Bytes with every page resident in RAM (after the fill).
    pub ram_resident_bytes: usize,
    /// Bytes with every page on the sim device.
    pub device_resident_bytes: usize,
    /// The larger of the two, per page.
    pub bytes_per_resident_page: f64,
    /// A 1 TiB region never touched.
    pub untouched_1tib_bytes: usize,
}

/// Measures the metadata of a region of the target size, filled and then
/// on the device, and of an untouched 1 TiB region.
pub fn metadata(plan: &Plan) -> Result<Metadata, String> {
    progress("metadata");
    let len = plan.target_size;
    let s = Setup::new(Config::default(), len, false)?;
    let ram = s.region.metadata_bytes();
    s.to_device(0, s.region.npages())?;
    let dev = s.region.metadata_bytes();
    let pages = s.region.npages();
    let huge = s.space.map(1 << 40, Prot::READ_WRITE).map_err(err("mapping 1 TiB"))?;
    let untouched = huge.metadata_bytes();
    Ok(Metadata {
        region_bytes: len,
        pages,
        ram_resident_bytes: ram,
        device_resident_bytes: dev,
        bytes_per_resident_page: ram.max(dev) as f64 / pages as f64,
        untouched_1tib_bytes: untouched,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<usize> = (0..1000).collect();
        shuffle(&mut v, 7);
        assert_ne!(v, (0..1000).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..1000).collect::<Vec<_>>());
    }
}
