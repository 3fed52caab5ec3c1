//! `uhmm bench tier --far ADDRESS`: the far stores against their limits,
//! measured in the same run.
//!
//! - `file:DIR` against the kernel's swap on a file in the same directory
//!   (same disk): `MADV_PAGEOUT` of the same bytes until written back, then
//!   a sequential touch of every page, against a migration to the file
//!   store and the same touch. The kernel side's pages are charged to a
//!   memory cgroup of the bench's own and reclaimed from the swap cache
//!   before the touch, so that both touches read the disk; the disk's
//!   counters check that they did.
//! - `redis://…` against the server itself through the same client crate:
//!   a pipelined `SET` of the same bytes in values of the store's group
//!   size (the demotion limit), and one `GET` of such a value plus one raw
//!   userfaultfd round trip (the fault limit).
//!
//! The data is random bytes (sealed pages do not compress, and a page of
//! zeros is never sent), the same for both sides; the sides alternate, each
//! starting on a quiet machine (see `settle`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use uhmm::{AddressSpace, Config, PAGE_SIZE, Prot};
use uhmm_devices::far::FarAddress;
use uhmm_devices::store::{StoreDevice, StoreDeviceConfig};
use uhmm_sys::mman::{Mapping, Protection};

use super::baselines::RawRoundTrip;
use super::cgroup::Cgroup;
use super::report::Target;
use super::{histogram, median, progress};
use crate::units::human;

/// One far store's results.
#[derive(Debug, Serialize)]
pub struct FarRow {
    /// The store's address (no password).
    pub store: String,
    /// What the baseline was.
    pub baseline: String,
    /// Moving the bytes out, GB/s per run: uhmm, then the baseline.
    pub out_gbs: (Vec<f64>, Vec<f64>),
    /// The sequential touch back, GB/s per run (file only).
    pub scan_gbs: (Vec<f64>, Vec<f64>),
    /// Random single-page touches, p50 µs: uhmm, then the baseline (for a
    /// remote store, one GET plus one raw userfaultfd round trip).
    pub random_p50_us: (f64, f64),
    /// The targets.
    pub targets: Vec<Target>,
}

/// Measures the store at `address` with `len` bytes, `runs` timed runs a
/// side after one warm-up, `touches` random touches a run.
pub fn run(address: &FarAddress, len: usize, runs: u32, touches: usize) -> Result<FarRow, String> {
    let bytes = super::datasets::noise(0x2545_f491_4f6c_dd1d, len);
    let pages = super::tier::random_pages(len / PAGE_SIZE, touches);
    let mut u = Sides::default();
    match address {
        FarAddress::File(path) => {
            let dir = if path.is_dir() { path.clone() } else { path.parent().unwrap_or(Path::new(".")).to_path_buf() };
            let swap = SwapFile::setup(&dir, len + (16 << 20))?;
            let cg = Cgroup::create("far")?;
            let disk = DiskReads::of(&dir);
            let side = UhmmSide::new(address)?;
            let mut k = Sides::default();
            for run in 0..=runs {
                progress(&format!("{address}: kernel swap file and uhmm, run {run} of {runs}"));
                settle();
                kernel_run(&cg, disk.as_ref(), &bytes, &pages, run > 0, &mut k)?;
                settle();
                side.run(disk.as_ref(), &bytes, &pages, run > 0, &mut u)?;
            }
            drop(side);
            drop(swap);
            let (uo, ko, us, ks) = (median(&u.out), median(&k.out), median(&u.scan), median(&k.scan));
            let (up, kp) = (u.p50(), k.p50());
            Ok(FarRow {
                store: address.to_string(),
                baseline: format!("the kernel's swap on a file in {}", dir.display()),
                targets: vec![
                    Target::at_least(
                        "pageout, uhmm / kernel swap file",
                        Some(uo / ko),
                        1.0,
                        format!("{uo:.2} / {ko:.2} GB/s"),
                    ),
                    Target::at_least(
                        "sequential fault scan, uhmm / kernel swap file",
                        Some(us / ks),
                        1.0,
                        format!("{us:.2} / {ks:.2} GB/s"),
                    ),
                    Target::info(
                        "random fault p50, uhmm / kernel swap file",
                        Some(up / kp),
                        format!("{up:.1} / {kp:.1} µs"),
                    ),
                ],
                out_gbs: (u.out, k.out),
                scan_gbs: (u.scan, k.scan),
                random_p50_us: (up, kp),
            })
        }
        FarAddress::Writeback { below, .. } => Err(format!(
            "{address}: --far measures a file or Redis store alone (here {below}), against its own baseline"
        )),
        FarAddress::Redis(url) => {
            let group = uhmm_devices::remote::RedisConfig::from_url(url).map_err(|e| e.to_string())?.group_pages;
            let mut base = Sides::default();
            let raw = RawRoundTrip::new(touches.max(64), 0)?;
            let mut raw_h = histogram();
            let side = UhmmSide::new(address)?;
            for run in 0..=runs {
                progress(&format!("{address}: pipelined SET / GET and uhmm, run {run} of {runs}"));
                redis_run(url, &bytes, group * PAGE_SIZE, &pages, run > 0, &mut base)?;
                let mut h = histogram();
                raw.run(&mut h)?;
                if run > 0 {
                    let _ = raw_h.add(&h);
                }
                side.run(None, &bytes, &pages, run > 0, &mut u)?;
            }
            drop(side);
            drop(raw);
            let (uo, bo) = (median(&u.out), median(&base.out));
            let (up, get) = (u.p50(), base.p50());
            let uffd = raw_h.value_at_quantile(0.5) as f64 / 1e3;
            let limit = get + uffd;
            Ok(FarRow {
                store: address.to_string(),
                baseline: format!(
                    "the same server through the redis crate: pipelined SET of {} values, one GET of one",
                    human(group * PAGE_SIZE)
                ),
                targets: vec![
                    Target::at_least(
                        "demotion, uhmm / pipelined SET",
                        Some(uo / bo),
                        0.8,
                        format!("{uo:.2} / {bo:.2} GB/s"),
                    ),
                    Target::at_most(
                        "remote fault p50, uhmm / (GET + uffd round trip)",
                        Some(up / limit),
                        1.5,
                        format!("{up:.1} / ({get:.1} + {uffd:.1}) µs"),
                    ),
                ],
                out_gbs: (u.out, base.out),
                scan_gbs: (u.scan, Vec::new()),
                random_p50_us: (up, limit),
            })
        }
    }
}

/// Measurements of one side over its runs.
#[derive(Default)]
struct Sides {
    out: Vec<f64>,
    scan: Vec<f64>,
    random: Option<hdrhistogram::Histogram<u64>>,
}

impl Sides {
    fn record(&mut self, len: usize, out: Duration, scan: Option<Duration>, random: &hdrhistogram::Histogram<u64>) {
        self.out.push(len as f64 / out.as_secs_f64() / 1e9);
        if let Some(s) = scan {
            self.scan.push(len as f64 / s.as_secs_f64() / 1e9);
        }
        let _ = self.random.get_or_insert_with(histogram).add(random);
    }

    fn p50(&self) -> f64 {
        self.random.as_ref().map_or(f64::NAN, |h| h.value_at_quantile(0.5) as f64 / 1e3)
    }
}

/// A swap file, made swap with the highest priority; undone on drop.
struct SwapFile {
    path: PathBuf,
    on: bool,
}

impl SwapFile {
    fn setup(dir: &Path, len: usize) -> Result<SwapFile, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("the swap-file baseline needs root".into());
        }
        let path = dir.join(format!("uhmm-bench-swap-{}", std::process::id()));
        let mut s = SwapFile { path, on: false };
        let p = s.path.to_string_lossy().into_owned();
        super::zram::tool("fallocate", &["-l", &len.to_string(), &p])?;
        std::fs::set_permissions(&s.path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| format!("{p}: {e}"))?;
        super::zram::tool("mkswap", &[&p])?;
        super::zram::tool("swapon", &["-p", "32767", &p])?;
        s.on = true;
        Ok(s)
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        let p = self.path.to_string_lossy().into_owned();
        if self.on && super::zram::tool("swapoff", &[&p]).is_err() {
            eprintln!("uhmm bench: WARNING: could not turn swap off on {p}: run `swapoff {p}`");
            return;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Waits a second, then (up to 10 s) until the CPUs have been idle for
/// 200 ms and no byte is under writeback: after a side's run the
/// kernel goes on for a few seconds in the background (freeing the swap
/// file's slots and their pages, or the file store's private file), and a
/// side measured meanwhile would share the CPUs with it.
fn settle() {
    let busy_ticks = || -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        let idle = cpu.get(3)? + cpu.get(4)?; // idle + iowait
        Some((cpu.iter().sum::<u64>() - idle, cpu.iter().sum()))
    };
    std::thread::sleep(Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let Some((b0, t0)) = busy_ticks() else { return };
        std::thread::sleep(Duration::from_millis(200));
        let Some((b1, t1)) = busy_ticks() else { return };
        // Under a tenth of a CPU busy (ticks of all CPUs together).
        if (b1 - b0) * 10 <= (t1 - t0) / num_cpus() as u64 && writeback_bytes() == 0 {
            return;
        }
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Bytes under writeback (`/proc/meminfo`).
fn writeback_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("Writeback:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |k| k * 1024)
}

/// Pages `map` out to swap and waits until they are written.
fn page_out(map: &Mapping, len: usize) -> Result<(), String> {
    map.pageout(0, len).map_err(|e| format!("MADV_PAGEOUT: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while writeback_bytes() > (1 << 20) {
        if Instant::now() > deadline {
            return Err("swap writeback did not finish in 120 s".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

/// Drops the pages `cg` holds after a [`page_out`]: written to swap, they
/// stay in the swap cache until reclaimed, and a touch would find them
/// there instead of reading the disk as uhmm's does.
fn evict(cg: &Cgroup, len: usize) -> Result<(), String> {
    let left = cg.reclaim()?;
    if left > len as u64 / 16 {
        return Err(format!("the kernel side's cgroup still holds {} after reclaim", human(left as usize)));
    }
    Ok(())
}

/// The reads of the block device a directory is on
/// (`/sys/dev/block/MAJOR:MINOR/stat`).
struct DiskReads(PathBuf);

impl DiskReads {
    /// None where the directory is on no block device (tmpfs, overlay).
    fn of(dir: &Path) -> Option<DiskReads> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(dir).ok()?.dev();
        let stat = PathBuf::from(format!("/sys/dev/block/{}:{}/stat", rustix::fs::major(dev), rustix::fs::minor(dev)));
        stat.exists().then_some(DiskReads(stat))
    }

    /// Bytes read so far (sectors read, the third field, are 512 bytes).
    fn bytes(&self) -> u64 {
        let s = std::fs::read_to_string(&self.0).unwrap_or_default();
        s.split_whitespace().nth(2).and_then(|x| x.parse::<u64>().ok()).map_or(0, |n| n * 512)
    }

    /// Runs `scan`; fails unless it read at least 3/4 of `len` bytes from
    /// the disk (pages served from RAM would not compare like with like).
    fn check<T>(
        disk: Option<&DiskReads>,
        side: &str,
        len: usize,
        scan: impl FnOnce() -> Result<T, String>,
    ) -> Result<T, String> {
        let Some(d) = disk else { return scan() };
        let before = d.bytes();
        let r = scan()?;
        let read = d.bytes().saturating_sub(before);
        if read < len as u64 / 4 * 3 {
            return Err(format!(
                "{side}'s sequential scan read {} of {} from the disk: its pages were still in RAM",
                human(read as usize),
                human(len)
            ));
        }
        Ok(r)
    }
}

fn kernel_run(
    cg: &Cgroup,
    disk: Option<&DiskReads>,
    bytes: &[u8],
    pages: &[usize],
    timed: bool,
    k: &mut Sides,
) -> Result<(), String> {
    let len = bytes.len();
    let map = {
        let _charged_to_cg = cg.enter()?;
        let map = Mapping::anonymous(len, Protection::ReadWrite, PAGE_SIZE).map_err(|e| format!("mmap: {e}"))?;
        map.write(0, bytes).map_err(|e| format!("fill: {e}"))?;
        map
    };
    let read = |off: usize, buf: &mut [u8]| map.read(off, buf).map_err(|e| format!("touch: {e}"));
    let t = Instant::now();
    page_out(&map, len)?;
    let out = t.elapsed();
    evict(cg, len)?;
    let scan = DiskReads::check(disk, "the kernel side", len, || super::tier::scan(len, read))?;
    page_out(&map, len)?;
    evict(cg, len)?;
    let random = super::tier::touch(pages, read)?;
    if timed {
        k.record(len, out, Some(scan), &random);
    }
    Ok(())
}

/// The uhmm side: one address space, far store and device over all its
/// runs, as a process that pages out and back again keeps its store (and
/// the kernel side keeps its swap file): the warm-up run gives each side's
/// file its blocks.
struct UhmmSide {
    address: FarAddress,
    // Dropped in this order: the device's pages go back first.
    dev: StoreDevice,
    _far: uhmm_devices::far::FarStore,
    space: AddressSpace,
}

impl UhmmSide {
    fn new(address: &FarAddress) -> Result<UhmmSide, String> {
        let err = |what: &'static str| move |e: uhmm::Error| format!("{what}: {e}");
        let space = AddressSpace::new(Config::default()).map_err(err("address space"))?;
        let far = address.open().map_err(err("far store"))?;
        let dev = StoreDevice::new(&space, far.page_store(), StoreDeviceConfig::default()).map_err(err("device"))?;
        Ok(UhmmSide { address: address.clone(), dev, _far: far, space })
    }

    /// One run on a region of its own, unmapped at the end; `disk`: the
    /// file store's disk, whose reads the scan must make.
    fn run(
        &self,
        disk: Option<&DiskReads>,
        bytes: &[u8],
        pages: &[usize],
        timed: bool,
        u: &mut Sides,
    ) -> Result<(), String> {
        let (address, dev, len) = (&self.address, &self.dev, bytes.len());
        let err = |what: &'static str| move |e: uhmm::Error| format!("{what}: {e}");
        let region = self.space.map(len, Prot::READ_WRITE).map_err(err("map"))?;
        region.write(0, bytes).map_err(err("fill"))?;
        let read = |off: usize, buf: &mut [u8]| region.load(off, buf).map_err(|e| format!("touch: {e}"));
        let t = Instant::now();
        let moved = dev.migrate_to_device(region.addr(), region.npages()).map_err(err("demote"))?;
        let out = t.elapsed();
        if moved.moved != region.npages() {
            return Err(format!("{address}: only {} of {} pages went out", moved.moved, region.npages()));
        }
        let scan = DiskReads::check(disk, "uhmm", len, || super::tier::scan(len, read))?;
        dev.migrate_to_device(region.addr(), region.npages()).map_err(err("demote"))?;
        let random = super::tier::touch(pages, read)?;
        let mut check = vec![0u8; len];
        region.read(0, &mut check).map_err(err("check"))?;
        if check != bytes {
            return Err(format!("{address}: the bytes read back differ from those written"));
        }
        if timed {
            let scanned = matches!(address, FarAddress::File(_)).then_some(scan);
            u.record(len, out, scanned, &random);
        }
        Ok(())
    }
}

/// The limit of a remote store: the same bytes `SET` in values of `value`
/// bytes in one pipeline, then one `GET` of a value per touch, timed.
fn redis_run(url: &str, bytes: &[u8], value: usize, pages: &[usize], timed: bool, b: &mut Sides) -> Result<(), String> {
    let e = |x: redis::RedisError| format!("{url}: {x}");
    let client = redis::Client::open(url.replace("redis-cluster://", "redis://")).map_err(e)?;
    let mut con = client.get_connection().map_err(e)?;
    let prefix = format!("uhmm-bench:{}", std::process::id());
    let mut pipe = redis::pipe();
    for (i, v) in bytes.chunks(value).enumerate() {
        pipe.cmd("SET").arg(format!("{prefix}:{i}")).arg(v).ignore();
    }
    let t = Instant::now();
    pipe.query::<()>(&mut con).map_err(e)?;
    let out = t.elapsed();
    let mut h = histogram();
    for &p in pages {
        let t = Instant::now();
        let v: Vec<u8> =
            redis::cmd("GET").arg(format!("{prefix}:{}", p * PAGE_SIZE / value)).query(&mut con).map_err(e)?;
        let _ = h.record(t.elapsed().as_nanos().max(1) as u64);
        std::hint::black_box(v);
    }
    let mut del = redis::pipe();
    for i in 0..bytes.len().div_ceil(value) {
        del.cmd("DEL").arg(format!("{prefix}:{i}")).ignore();
    }
    del.query::<()>(&mut con).map_err(e)?;
    if timed {
        b.record(bytes.len(), out, None, &h);
    }
    Ok(())
}
