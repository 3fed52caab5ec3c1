//! `uhmm bench tier`'s RAM-budget rows: a key-value workload whose table is
//! twice the RAM it may use, measured two ways in one run.
//!
//! - **kernel**: the workload runs in a child process in a memory cgroup
//!   limited to the budget (cgroup v1 or v2), with a zram swap device (lz4)
//!   as the only swap; the table is plain anonymous memory.
//! - **uhmm**: the same workload code in another child, its table in a uhmm
//!   region that a RAM-budget tier (`uhmm_devices::tier`) keeps under the
//!   budget over the compressed store.
//!
//! The child is this binary again (`uhmm bench tier --kv-child PLAN`, a
//! hidden flag). It waits for a line on stdin before it allocates anything
//! (the parent has put it in the cgroup by then), builds the table in full
//! RAM, says `@filled` (the parent then sets the cgroup's limit; the uhmm
//! child hands its table to the tier), runs a warm-up and a timed phase of
//! Zipf operations, says `@zipf-done` (the parent reads zram's `mm_stat`),
//! scans the table a few times, and prints its results as one JSON line.
//!
//! The table: open addressing with linear probing, 128-byte records (a
//! 16-byte key, a 112-byte value: a version, 48 bytes derived from key and
//! version, 56 bytes of a fixed text, so that a page compresses about as
//! YCSB records do), load factor 0.7. Operations: keys drawn from a
//! scrambled Zipfian distribution (YCSB's, theta 0.99), 90% lookups (the
//! record is read and checked), 10% updates (the value is rewritten with
//! the next version). Every record read is checked against its key and the
//! version the child last wrote (the low 8 bits, kept beside the table):
//! any mismatch is data lost, and fails the run.
//!
//! Both sides read and write the table with plain loads and stores
//! (`Mapping::read` / `write`, `Region::load` / `store`), as a program's
//! own code does.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uhmm::PAGE_SIZE;
use uhmm_sys::mman::{Mapping, Protection};
use uhmm_sys::pagemap::{Pagemap, Query, category};

use super::cgroup::{Cgroup, read_u64};
use super::median;
use super::progress;
use super::report::Target;
use super::zram::Zram;
use crate::units::human;

/// Bytes of a record: a 16-byte key and a 112-byte value.
const RECORD: usize = 128;
/// Records in a page.
const PER_PAGE: usize = PAGE_SIZE / RECORD;
/// Keys over slots.
const LOAD_FACTOR: f64 = 0.7;
/// The Zipfian skew (YCSB's).
const THETA: f64 = 0.99;
/// Updates among 100 operations.
const UPDATE_PERCENT: u64 = 10;
/// The fixed text at the end of each value: the compressible part.
const FILLER: [u8; 56] = *b"field1=uhmm-kv-bench;field2=benchmark-record-padding;f3=";
/// Where the value's parts start in a record.
const VERSION_AT: usize = 16;
const DERIVED_AT: usize = 24;
const FILLER_AT: usize = 72;
/// Words of the value derived from key and version.
const DERIVED_WORDS: usize = (FILLER_AT - DERIVED_AT) / 8;
/// How often the child samples the table's residency.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// The share of the pages the tracking-quality rows call hot.
const HOT_SHARE: usize = 10;
/// Sequential passes over the whole table in the scan rows.
const SCAN_PASSES: u32 = 3;

/// The splitmix64 finalizer: a good 64-bit mix.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The second half of key `k`'s 16 bytes.
fn key_tag(k: u64) -> u64 {
    mix(k ^ 0x6b65_795f_7461_6721)
}

/// Word `i` of the derived part of key `k`'s value at version `v`.
fn derived(k: u64, v: u64, i: usize) -> u64 {
    mix(k.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ v.rotate_left(29) ^ (i as u64 + 1))
}

fn word(rec: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(rec[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]))
}

/// Writes key `k`'s value at version `v` into `val` (the record's bytes
/// from [`VERSION_AT`] on).
fn encode_value(k: u64, v: u64, val: &mut [u8]) {
    val[..8].copy_from_slice(&v.to_le_bytes());
    for i in 0..DERIVED_WORDS {
        let at = DERIVED_AT - VERSION_AT + i * 8;
        val[at..at + 8].copy_from_slice(&derived(k, v, i).to_le_bytes());
    }
    val[FILLER_AT - VERSION_AT..].copy_from_slice(&FILLER);
}

/// The record of key `k` at version `v`.
fn encode(k: u64, v: u64) -> [u8; RECORD] {
    let mut rec = [0u8; RECORD];
    rec[..8].copy_from_slice(&(k + 1).to_le_bytes());
    rec[8..16].copy_from_slice(&key_tag(k).to_le_bytes());
    encode_value(k, v, &mut rec[VERSION_AT..]);
    rec
}

/// Checks that `rec` is key `k`'s record at a version whose low 8 bits are
/// `v8`; its checksum (the sum of its words) if so.
fn check(rec: &[u8], k: u64, v8: u8) -> Result<u64, String> {
    if word(rec, 0) != k + 1 || word(rec, 1) != key_tag(k) {
        return Err(format!("key {k}: the record holds another key ({:#x})", word(rec, 0)));
    }
    let v = word(rec, 2);
    if v as u8 != v8 {
        return Err(format!("key {k}: version {v} read, the last written ends in {v8:#04x} (a stale page)"));
    }
    let good = (0..DERIVED_WORDS).all(|i| word(rec, DERIVED_AT / 8 + i) == derived(k, v, i));
    if !good || rec[FILLER_AT..] != FILLER {
        return Err(format!("key {k}: the value's bytes are wrong (version {v})"));
    }
    Ok((0..RECORD / 8).fold(0u64, |s, i| s.wrapping_add(word(rec, i))))
}

/// The slot a key's probe starts at.
fn home(k: u64, nslots: usize) -> usize {
    (mix(k ^ 0x686f_6d65) % nslots as u64) as usize
}

/// YCSB's `ZipfianGenerator` (Gray et al., "Quickly generating
/// billion-record synthetic databases", SIGMOD 1994): ranks 0..n, rank 0
/// the most popular, P(i) proportional to 1 / (i+1)^theta.
#[derive(Debug, Clone)]
struct Zipf {
    n: f64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipf {
    fn new(n: u64, theta: f64) -> Zipf {
        let zeta = |n: u64| (1..=n).rev().map(|i| (i as f64).powf(-theta)).sum::<f64>();
        let zetan = zeta(n);
        let zeta2 = zeta(2);
        let nf = n as f64;
        Zipf {
            n: nf,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta: (1.0 - (2.0 / nf).powf(1.0 - theta)) / (1.0 - zeta2 / zetan),
        }
    }

    /// The rank for a uniform `u` in [0, 1).
    fn rank(&self, u: f64) -> u64 {
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        let r = self.n * (self.eta * u - self.eta + 1.0).powf(self.alpha);
        (r as u64).min(self.n as u64 - 1)
    }
}

/// A seeded xorshift64* stream.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The table's memory: loads and stores at byte offsets.
trait Mem: Sync {
    fn load(&self, off: usize, buf: &mut [u8]) -> Result<(), String>;
    fn store(&self, off: usize, buf: &[u8]) -> Result<(), String>;
}

/// Plain anonymous memory (the kernel side).
struct Plain(Mapping);

impl Mem for Plain {
    fn load(&self, off: usize, buf: &mut [u8]) -> Result<(), String> {
        self.0.read(off, buf).map_err(|e| format!("load at {off}: {e}"))
    }

    fn store(&self, off: usize, buf: &[u8]) -> Result<(), String> {
        self.0.write(off, buf).map_err(|e| format!("store at {off}: {e}"))
    }
}

impl Mem for uhmm::Region {
    fn load(&self, off: usize, buf: &mut [u8]) -> Result<(), String> {
        uhmm::Region::load(self, off, buf).map_err(|e| format!("load at {off}: {e}"))
    }

    fn store(&self, off: usize, buf: &[u8]) -> Result<(), String> {
        uhmm::Region::store(self, off, buf).map_err(|e| format!("store at {off}: {e}"))
    }
}

/// The table's shape for `table_bytes`: slots and keys.
fn shape(table_bytes: usize) -> (usize, u64) {
    let nslots = table_bytes / RECORD;
    (nslots, (nslots as f64 * LOAD_FACTOR) as u64)
}

/// Inserts keys `0..keys` at version 0 (linear probing) into a table of
/// `nslots` slots built in a scratch mapping, then copies it into `mem` in
/// order, a MiB at a time (the table is built in RAM on both sides alike).
fn build(mem: &dyn Mem, nslots: usize, keys: u64) -> Result<(), String> {
    let len = nslots * RECORD;
    let tmp = Mapping::anonymous(len, Protection::ReadWrite, PAGE_SIZE).map_err(|e| format!("mmap: {e}"))?;
    let mut head = [0u8; 8];
    for k in 0..keys {
        let mut slot = home(k, nslots);
        loop {
            tmp.read(slot * RECORD, &mut head).map_err(|e| e.to_string())?;
            if u64::from_le_bytes(head) == 0 {
                tmp.write(slot * RECORD, &encode(k, 0)).map_err(|e| e.to_string())?;
                break;
            }
            slot = (slot + 1) % nslots;
        }
    }
    let mut buf = vec![0u8; (1 << 20).min(len)];
    let mut off = 0;
    while off < len {
        let n = buf.len().min(len - off);
        tmp.read(off, &mut buf[..n]).map_err(|e| e.to_string())?;
        mem.store(off, &buf[..n])?;
        off += n;
    }
    Ok(())
}

/// The workload on one table.
struct Kv<'a> {
    mem: &'a dyn Mem,
    nslots: usize,
    keys: u64,
    /// The low 8 bits of each key's version, as last written.
    versions: Vec<u8>,
    /// Operations on each page while `counting` (the true access counts).
    counts: Vec<u32>,
    counting: bool,
    zipf: Zipf,
    rng: Rng,
    lookups: u64,
    updates: u64,
    mismatches: u64,
    first_mismatch: Option<String>,
    checksum: u64,
}

impl<'a> Kv<'a> {
    fn new(mem: &'a dyn Mem, table_bytes: usize, seed: u64) -> Kv<'a> {
        let (nslots, keys) = shape(table_bytes);
        // Touched now, so that the memory they take is counted before the
        // table (the kernel side's cgroup limit is that plus the budget).
        let mut versions = vec![0u8; keys as usize];
        std::hint::black_box(&mut versions).fill(0);
        let mut counts = vec![0u32; nslots.div_ceil(PER_PAGE)];
        std::hint::black_box(&mut counts).fill(0);
        Kv {
            mem,
            nslots,
            keys,
            versions,
            counts,
            counting: false,
            zipf: Zipf::new(keys, THETA),
            rng: Rng(seed | 1),
            lookups: 0,
            updates: 0,
            mismatches: 0,
            first_mismatch: None,
            checksum: 0,
        }
    }

    fn mismatch(&mut self, what: String) {
        self.mismatches += 1;
        self.first_mismatch.get_or_insert(what);
    }

    /// The next key: a Zipfian rank, scrambled over the keys (YCSB's
    /// `ScrambledZipfianGenerator`), so that hot keys are spread over the
    /// table.
    fn next_key(&mut self) -> u64 {
        let rank = self.zipf.rank(self.rng.uniform());
        mix(rank ^ 0x7363_7261_6d62_6c65) % self.keys
    }

    /// Finds key `k`: its slot, with its record in `rec`.
    fn find(&self, k: u64, rec: &mut [u8; RECORD]) -> Result<Option<usize>, String> {
        let mut slot = home(k, self.nslots);
        for _ in 0..self.nslots {
            self.mem.load(slot * RECORD, rec)?;
            match word(rec, 0) {
                0 => return Ok(None),
                w if w == k + 1 => return Ok(Some(slot)),
                _ => slot = (slot + 1) % self.nslots,
            }
        }
        Ok(None)
    }

    /// One operation: a lookup or an update of a Zipfian key.
    fn op(&mut self) -> Result<(), String> {
        let k = self.next_key();
        let update = self.rng.next() % 100 < UPDATE_PERCENT;
        let mut rec = [0u8; RECORD];
        let Some(slot) = self.find(k, &mut rec)? else {
            self.mismatch(format!("key {k} is missing"));
            return Ok(());
        };
        if self.counting {
            let c = &mut self.counts[slot / PER_PAGE];
            *c = c.saturating_add(1);
        }
        match check(&rec, k, self.versions[k as usize]) {
            Ok(sum) => self.checksum = self.checksum.wrapping_add(sum),
            Err(e) => self.mismatch(e),
        }
        if update {
            let v = word(&rec, 2).wrapping_add(1);
            let mut val = [0u8; RECORD - VERSION_AT];
            encode_value(k, v, &mut val);
            self.mem.store(slot * RECORD + VERSION_AT, &val)?;
            self.versions[k as usize] = v as u8;
            self.updates += 1;
        } else {
            self.lookups += 1;
        }
        Ok(())
    }

    /// Operations for `d`; how many.
    fn run_for(&mut self, d: Duration) -> Result<u64, String> {
        let start = Instant::now();
        let mut n = 0u64;
        loop {
            for _ in 0..32 {
                self.op()?;
            }
            n += 32;
            if start.elapsed() >= d {
                return Ok(n);
            }
        }
    }

    /// One sequential pass over the whole table, a page at a time, checking
    /// every record; the time it took.
    fn scan(&mut self) -> Result<Duration, String> {
        let t = Instant::now();
        let mut page = vec![0u8; PAGE_SIZE];
        let mut seen = 0u64;
        let len = self.nslots * RECORD;
        let mut off = 0;
        while off < len {
            let n = PAGE_SIZE.min(len - off);
            self.mem.load(off, &mut page[..n])?;
            for rec in page[..n].chunks_exact(RECORD) {
                let w = word(rec, 0);
                if w == 0 {
                    continue;
                }
                let k = w - 1;
                if k >= self.keys {
                    self.mismatch(format!("slot at {off}: a key out of range ({k})"));
                    continue;
                }
                seen += 1;
                match check(rec, k, self.versions[k as usize]) {
                    Ok(sum) => self.checksum = self.checksum.wrapping_add(sum),
                    Err(e) => self.mismatch(e),
                }
            }
            off += n;
        }
        if seen != self.keys {
            self.mismatch(format!("a scan found {seen} records of {}", self.keys));
        }
        Ok(t.elapsed())
    }
}

/// What the parent tells a child to do (the JSON of `--kv-child`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildPlan {
    /// The uhmm side (else the kernel side).
    pub uhmm: bool,
    /// Bytes of the table (a page multiple).
    pub table_bytes: usize,
    /// RAM the table may use.
    pub budget_bytes: usize,
    /// Untimed Zipf operations first, ms.
    pub warmup_ms: u64,
    /// Timed Zipf operations, ms.
    pub timed_ms: u64,
    /// Of the timed phase, the first ms in which the child counts each
    /// page's accesses (for the tracking rows).
    pub track_ms: u64,
    /// Sequential passes over the table after the Zipf phase.
    pub scan_passes: u32,
    /// The random stream's seed.
    pub seed: u64,
    /// The kernel side: the cgroup's usage file, sampled.
    pub usage_file: Option<PathBuf>,
    /// The uhmm side: fault-handling threads (`Config::handler_threads`).
    pub handler_threads: Option<usize>,
    /// The uhmm side: faults answered in the faulting thread
    /// (`FaultDelivery::Signal`) instead of by the handler threads.
    pub signal_faults: bool,
}

/// Max and mean of a sampled figure, bytes.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Sampled {
    /// The largest sample.
    pub max: u64,
    /// The mean of the samples.
    pub mean: u64,
    /// How many samples.
    pub samples: usize,
}

impl Sampled {
    fn of(v: impl Iterator<Item = u64> + Clone) -> Sampled {
        let samples = v.clone().count();
        let sum: u128 = v.clone().map(u128::from).sum();
        Sampled { max: v.max().unwrap_or(0), mean: (sum / samples.max(1) as u128) as u64, samples }
    }
}

/// What one child measured (its JSON line).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KvSide {
    /// `uhmm` or `kernel`.
    pub side: String,
    /// Bytes of the table.
    pub table_bytes: usize,
    /// The budget, bytes.
    pub budget_bytes: usize,
    /// Keys in the table.
    pub keys: u64,
    /// Seconds to build the table (in RAM, before the budget).
    pub fill_s: f64,
    /// Seconds to impose the budget (setting the cgroup limit / handing the
    /// table to the tier).
    pub budget_s: f64,
    /// Operations in the timed phase.
    pub ops: u64,
    /// Seconds of the timed phase.
    pub timed_s: f64,
    /// Operations a second in the timed phase.
    pub ops_per_s: f64,
    /// Lookups and updates, all phases.
    pub lookups: u64,
    /// See `lookups`.
    pub updates: u64,
    /// Records that read back wrong or missing: data lost.
    pub mismatches: u64,
    /// The first of them.
    pub first_mismatch: Option<String>,
    /// The table's pages in RAM (`PAGEMAP_SCAN`: present, not the zero
    /// page), bytes: max over the timed phase and the scans, mean over the
    /// timed phase.
    pub resident: Sampled,
    /// The same during the warm-up (while the budget settles).
    pub resident_warmup: Sampled,
    /// The side's own figure over the timed phase and the scans: the
    /// cgroup's usage above what the child used before the table (kernel),
    /// the tier's `resident_bytes` (uhmm).
    pub accounted: Sampled,
    /// Memory the table's pages out of RAM take at the end of the timed
    /// phase (zram's `mem_used_total`; the store's), bytes.
    pub compressed_bytes: u64,
    /// The compressor's output for those pages (`compr_data_size`): the
    /// footprint less the allocator's rounding and slack, bytes.
    pub codec_bytes: u64,
    /// Bytes of those pages before compression.
    pub stored_bytes: u64,
    /// Seconds of each scan pass.
    pub scan_pass_s: Vec<f64>,
    /// The true accesses counted over this many seconds of the timed phase.
    pub track_s: f64,
    /// The share of those accesses that went to the hottest tenth of the
    /// pages (how skewed the workload is page by page).
    pub top10_page_share: f64,
    /// The same for the hottest half of the pages.
    pub top50_page_share: f64,
    /// uhmm: the share of the truly hottest tenth of the pages the tier
    /// names among its hottest as many.
    pub recall: Option<f64>,
    /// uhmm: the share of the tier's hottest not among the truly hottest.
    pub false_hot: Option<f64>,
    /// uhmm: the tier's access-tracking CPU time over the timed phase, as
    /// a share of one CPU.
    pub tracking_cpu: Option<f64>,
    /// uhmm: the tier's reclaim CPU time over the timed phase, as a share
    /// of one CPU.
    pub reclaim_cpu: Option<f64>,
    /// uhmm: the tier's counters at the end (demoted, promoted pages,
    /// rounds, peak resident).
    pub tier: Option<TierCounters>,
    /// A sum over every record read (keeps the checks from being optimized
    /// away).
    pub checksum: u64,
}

/// The tier's counters at the end of a uhmm run.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct TierCounters {
    /// Pages moved out of RAM.
    pub demoted_pages: u64,
    /// Pages brought back.
    pub promoted_pages: u64,
    /// Policy rounds.
    pub rounds: u64,
    /// The tier's own peak of resident bytes.
    pub peak_resident_bytes: u64,
    /// Rounds that demoted pages.
    pub reclaim_rounds: u64,
    /// Hinting faults taken.
    pub hint_faults: u64,
    /// Faults that waited for room at the budget.
    pub throttled: u64,
    /// Faults that went on without room after waiting.
    pub overshoots: u64,
}

/// Phases the sampler tags its samples with.
const PHASE_SETUP: u8 = 0;
const PHASE_WARMUP: u8 = 1;
const PHASE_TIMED: u8 = 2;
const PHASE_SCAN: u8 = 3;

/// Bytes of `range` in RAM: present pages that are not the zero page.
fn resident_bytes(pm: &Pagemap, range: std::ops::Range<usize>, runs: &mut Vec<uhmm_sys::pagemap::PageRun>) -> u64 {
    runs.clear();
    let q = Query {
        mask: category::PRESENT | category::PFNZERO,
        inverted: category::PFNZERO,
        report: category::PRESENT,
        ..Query::default()
    };
    match pm.scan(range.start, range.end, q, runs) {
        Ok(_) => runs.iter().map(|r| (r.end - r.start) as u64).sum(),
        Err(_) => 0,
    }
}

/// Samples `(resident, accounted)` every [`SAMPLE_EVERY`] until `stop`,
/// each tagged with the phase then.
fn sample(phase: &AtomicU8, stop: &AtomicBool, mut f: impl FnMut() -> (u64, u64)) -> Vec<(u8, u64, u64)> {
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let p = phase.load(Ordering::Relaxed);
        let (r, a) = f();
        out.push((p, r, a));
        std::thread::sleep(SAMPLE_EVERY);
    }
    out
}

/// Runs `work` while a thread takes `figures` (see [`sample`]) until it
/// ends; returns the samples, or `work`'s error.
fn while_sampling(
    phase: &AtomicU8,
    figures: impl FnMut() -> (u64, u64) + Send,
    work: impl FnOnce() -> Result<(), String>,
) -> Result<Vec<(u8, u64, u64)>, String> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| sample(phase, &stop, figures));
        let r = work();
        stop.store(true, Ordering::Relaxed);
        let samples = sampler.join().map_err(|_| "the sampler panicked".to_string())?;
        r.map(|()| samples)
    })
}

/// Says `event` to the parent and waits for its answer.
fn handshake(event: &str) -> Result<(), String> {
    println!("@{event}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(|e| format!("reading the parent's answer: {e}"))?;
    if line.trim() == "go" { Ok(()) } else { Err(format!("the parent answered {line:?} to @{event}")) }
}

/// Runs the child: `uhmm bench tier --kv-child PLAN`.
pub fn child(plan_json: &str) -> Result<(), String> {
    let plan: ChildPlan = serde_json::from_str(plan_json).map_err(|e| format!("--kv-child: {e}"))?;
    if plan.table_bytes < PAGE_SIZE * 4 || !plan.table_bytes.is_multiple_of(PAGE_SIZE) {
        return Err(format!("--kv-child: a table of {} bytes", plan.table_bytes));
    }
    // The parent has put this process in its cgroup when it answers.
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(|e| format!("reading stdin: {e}"))?;
    let side = if plan.uhmm { uhmm_side(&plan)? } else { kernel_side(&plan)? };
    let s = serde_json::to_string(&side).map_err(|e| e.to_string())?;
    println!("{s}");
    Ok(())
}

/// What both sides do once the table is in RAM and under the budget: the
/// warm-up, the timed phase (the tracking window first), the scans, the
/// phase for the sampler; a side's [`Hooks`] at the turns.
struct Phases<'p> {
    plan: &'p ChildPlan,
    phase: &'p AtomicU8,
}

/// What a side does at the turns of the Zipf phase.
trait Hooks {
    /// The timed phase starts.
    fn timed_start(&mut self) {}
    /// The tracking window ended, with the true counts of each page.
    fn track_end(&mut self, _counts: &[u32], _side: &mut KvSide) {}
    /// The timed phase ended.
    fn timed_end(&mut self, _side: &mut KvSide) {}
}

/// The kernel side: nothing to do at the turns.
struct NoHooks;

impl Hooks for NoHooks {}

impl Phases<'_> {
    fn run(&self, kv: &mut Kv<'_>, side: &mut KvSide, hooks: &mut dyn Hooks) -> Result<(), String> {
        let plan = self.plan;
        self.phase.store(PHASE_WARMUP, Ordering::Relaxed);
        kv.run_for(Duration::from_millis(plan.warmup_ms))?;
        self.phase.store(PHASE_TIMED, Ordering::Relaxed);
        hooks.timed_start();
        let track = Duration::from_millis(plan.track_ms.min(plan.timed_ms));
        let rest = Duration::from_millis(plan.timed_ms) - track;
        kv.counting = true;
        let t = Instant::now();
        let mut ops = kv.run_for(track)?;
        let mut timed = t.elapsed();
        kv.counting = false;
        side.track_s = timed.as_secs_f64();
        hooks.track_end(&kv.counts, side);
        if !rest.is_zero() {
            let t = Instant::now();
            ops += kv.run_for(rest)?;
            timed += t.elapsed();
        }
        hooks.timed_end(side);
        side.ops = ops;
        side.timed_s = timed.as_secs_f64();
        side.ops_per_s = ops as f64 / side.timed_s;
        let (top10, top50) = page_skew(&kv.counts);
        side.top10_page_share = top10;
        side.top50_page_share = top50;
        Ok(())
    }

    fn scans(&self, kv: &mut Kv<'_>, side: &mut KvSide) -> Result<(), String> {
        self.phase.store(PHASE_SCAN, Ordering::Relaxed);
        for _ in 0..self.plan.scan_passes {
            side.scan_pass_s.push(kv.scan()?.as_secs_f64());
        }
        Ok(())
    }
}

/// Fills in the side's sampled figures and the workload's counters.
fn finish(side: &mut KvSide, kv: &Kv<'_>, samples: &[(u8, u64, u64)]) {
    let after = |s: &&(u8, u64, u64)| s.0 >= PHASE_TIMED;
    let max_r = samples.iter().filter(after).map(|s| s.1).max().unwrap_or(0);
    let max_a = samples.iter().filter(after).map(|s| s.2).max().unwrap_or(0);
    let timed = samples.iter().filter(|s| s.0 == PHASE_TIMED);
    side.resident = Sampled { max: max_r, ..Sampled::of(timed.clone().map(|s| s.1)) };
    side.accounted = Sampled { max: max_a, ..Sampled::of(timed.map(|s| s.2)) };
    side.resident_warmup = Sampled::of(samples.iter().filter(|s| s.0 == PHASE_WARMUP).map(|s| s.1));
    side.keys = kv.keys;
    side.lookups = kv.lookups;
    side.updates = kv.updates;
    side.mismatches = kv.mismatches;
    side.first_mismatch = kv.first_mismatch.clone();
    side.checksum = kv.checksum;
}

fn kernel_side(plan: &ChildPlan) -> Result<KvSide, String> {
    let usage_file = plan.usage_file.as_deref().ok_or("the kernel side needs the cgroup's usage file")?;
    let map =
        Mapping::anonymous(plan.table_bytes, Protection::ReadWrite, PAGE_SIZE).map_err(|e| format!("mmap: {e}"))?;
    // The uhmm side's region has small pages; so does this table.
    map.advise_no_huge(0, plan.table_bytes).map_err(|e| format!("MADV_NOHUGEPAGE: {e}"))?;
    let mem = Plain(map);
    let range = mem.0.addr()..mem.0.addr() + plan.table_bytes;
    let mut kv = Kv::new(&mem, plan.table_bytes, plan.seed);
    let base = read_u64(usage_file)?;
    let mut side = KvSide {
        side: "kernel".into(),
        table_bytes: plan.table_bytes,
        budget_bytes: plan.budget_bytes,
        ..KvSide::default()
    };
    let t = Instant::now();
    build(&mem, kv.nslots, kv.keys)?;
    side.fill_s = t.elapsed().as_secs_f64();
    let pm = Pagemap::open().map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    let phase = AtomicU8::new(PHASE_SETUP);
    let phases = Phases { plan, phase: &phase };
    let mut runs = Vec::new();
    let figures =
        || (resident_bytes(&pm, range.clone(), &mut runs), read_u64(usage_file).unwrap_or(0).saturating_sub(base));
    let samples = while_sampling(&phase, figures, || {
        // The parent sets the limit: base + budget.
        let t = Instant::now();
        handshake(&format!("filled {base}"))?;
        side.budget_s = t.elapsed().as_secs_f64();
        phases.run(&mut kv, &mut side, &mut NoHooks)?;
        // The parent reads zram's mm_stat.
        handshake("zipf-done")?;
        phases.scans(&mut kv, &mut side)
    })?;
    finish(&mut side, &kv, &samples);
    Ok(side)
}

/// The uhmm side's turns: the tier's CPU over the timed phase, its hottest
/// pages against the true counts, the store's footprint.
struct TierHooks<'t> {
    tier: &'t uhmm_devices::tier::Tier,
    store: &'t uhmm_devices::compress::CompressStore,
    base: usize,
    at_start: Option<uhmm_devices::tier::TierStats>,
}

impl Hooks for TierHooks<'_> {
    fn timed_start(&mut self) {
        self.at_start = Some(self.tier.stats());
    }

    fn track_end(&mut self, counts: &[u32], side: &mut KvSide) {
        let n = (counts.len() / HOT_SHARE).max(1);
        let pages: Vec<usize> =
            self.tier.hottest(n).into_iter().filter_map(|a| a.checked_sub(self.base)).map(|o| o / PAGE_SIZE).collect();
        let (recall, false_hot) = tracking_quality(counts, &pages);
        side.recall = Some(recall);
        side.false_hot = Some(false_hot);
    }

    fn timed_end(&mut self, side: &mut KvSide) {
        let end = self.tier.stats();
        if let Some(start) = self.at_start {
            let wall = end.wall.saturating_sub(start.wall).as_secs_f64().max(1e-9);
            side.tracking_cpu = Some(end.tracking_cpu.saturating_sub(start.tracking_cpu).as_secs_f64() / wall);
            side.reclaim_cpu = Some(end.reclaim_cpu.saturating_sub(start.reclaim_cpu).as_secs_f64() / wall);
        }
        let st = self.store.stats();
        side.compressed_bytes = st.mem_used_total;
        side.codec_bytes = st.compr_data_size;
        side.stored_bytes = st.orig_data_size;
    }
}

fn uhmm_side(plan: &ChildPlan) -> Result<KvSide, String> {
    use std::sync::Arc;
    use uhmm_devices::compress::{CompressConfig, CompressStore};
    use uhmm_devices::store::{StoreDevice, StoreDeviceConfig};
    use uhmm_devices::tier::{Tier, TierConfig, space_config};

    let err = |what: &'static str| move |e: uhmm::Error| format!("{what}: {e}");
    let mut config = space_config();
    if let Some(h) = plan.handler_threads {
        config.handler_threads = h;
    }
    if plan.signal_faults {
        config.fault_delivery = uhmm::FaultDelivery::Signal;
    }
    let space = uhmm::AddressSpace::new(config).map_err(err("address space"))?;
    let store = Arc::new(CompressStore::new(CompressConfig::default()).map_err(err("store"))?);
    let device =
        Arc::new(StoreDevice::new(&space, store.clone(), StoreDeviceConfig::default()).map_err(err("device"))?);
    let region = space.map(plan.table_bytes, uhmm::Prot::READ_WRITE).map_err(err("map"))?;
    let range = region.range();
    let mut kv = Kv::new(&region, plan.table_bytes, plan.seed);
    let mut side = KvSide {
        side: if plan.signal_faults { "uhmm, faults in the faulting thread" } else { "uhmm" }.into(),
        table_bytes: plan.table_bytes,
        budget_bytes: plan.budget_bytes,
        ..KvSide::default()
    };
    let t = Instant::now();
    build(&region, kv.nslots, kv.keys)?;
    side.fill_s = t.elapsed().as_secs_f64();
    handshake("filled 0")?;
    // As the cgroup's limit, which returns once the kernel reclaimed down
    // to it: the budget set, and its first reclaim waited for (up to 10 s).
    let t = Instant::now();
    let budget = plan.budget_bytes as u64;
    let tier = Tier::new(&space, device.clone(), TierConfig { budget_bytes: budget, ..TierConfig::default() })
        .map_err(err("tier"))?;
    tier.manage(range.clone()).map_err(err("tier: manage"))?;
    while tier.stats().resident_bytes > budget && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    side.budget_s = t.elapsed().as_secs_f64();
    let pm = Pagemap::open().map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    let phase = AtomicU8::new(PHASE_SETUP);
    let phases = Phases { plan, phase: &phase };
    let mut hooks = TierHooks { tier: &tier, store: &store, base: range.start, at_start: None };
    let mut runs = Vec::new();
    let figures = || (resident_bytes(&pm, range.clone(), &mut runs), tier.stats().resident_bytes);
    let samples = while_sampling(&phase, figures, || {
        phases.run(&mut kv, &mut side, &mut hooks)?;
        handshake("zipf-done")?;
        phases.scans(&mut kv, &mut side)
    })?;
    finish(&mut side, &kv, &samples);
    let st = tier.stats();
    side.tier = Some(TierCounters {
        demoted_pages: st.demoted_pages,
        promoted_pages: st.promoted_pages,
        rounds: st.rounds,
        peak_resident_bytes: st.peak_resident_bytes,
        reclaim_rounds: st.reclaim_rounds,
        hint_faults: st.hint_faults,
        throttled: st.throttled,
        overshoots: st.overshoots,
    });
    Ok(side)
}

/// The share of the accesses in `counts` that went to the hottest tenth
/// and the hottest half of the pages.
fn page_skew(counts: &[u32]) -> (f64, f64) {
    let mut c: Vec<u64> = counts.iter().map(|&x| u64::from(x)).collect();
    c.sort_unstable_by(|a, b| b.cmp(a));
    let total = c.iter().sum::<u64>().max(1) as f64;
    let top = |n: usize| c[..n.min(c.len())].iter().sum::<u64>() as f64 / total;
    (top(c.len().div_ceil(HOT_SHARE)), top(c.len().div_ceil(2)))
}

/// The true hottest tenth of the pages against the tracker's as many:
/// (recall, false-hot share). Pages tied at the tenth's lowest count are
/// all equally in it: a named page among them counts, up to the places
/// they share (the tenth is any one of several equal sets).
fn tracking_quality(counts: &[u32], hot: &[usize]) -> (f64, f64) {
    let n = (counts.len() / HOT_SHARE).max(1);
    let mut sorted = counts.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let Some(&threshold) = sorted.get(n - 1) else { return (0.0, 1.0) };
    let room = n - sorted.iter().take_while(|&&c| c > threshold).count();
    let mut named = vec![false; counts.len()];
    let (mut above, mut at, mut distinct) = (0usize, 0usize, 0usize);
    for &p in hot {
        if p < named.len() && !named[p] {
            named[p] = true;
            distinct += 1;
            above += usize::from(counts[p] > threshold);
            at += usize::from(counts[p] == threshold);
        }
    }
    let hits = above + at.min(room);
    let recall = hits as f64 / n as f64;
    let false_hot = if distinct == 0 { 1.0 } else { (distinct - hits) as f64 / distinct as f64 };
    (recall, false_hot)
}

/// A child that is killed and waited for if dropped before it exited.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Runs one child with `plan`; the kernel side in `cgroup`, with `zram`'s
/// footprint read at `@zipf-done`.
fn run_child(plan: &ChildPlan, kernel: Option<(&Cgroup, &Zram)>) -> Result<KvSide, String> {
    let exe = std::env::current_exe().map_err(|e| format!("the uhmm binary: {e}"))?;
    let json = serde_json::to_string(plan).map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .args(["bench", "tier", "--kv-child", &json])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting the child: {e}"))?;
    let mut child = Running(child);
    if let Some((cg, _)) = kernel {
        cg.add(child.0.id())?;
    }
    let mut stdin = child.0.stdin.take().ok_or("no stdin")?;
    let stdout = child.0.stdout.take().ok_or("no stdout")?;
    let say = |stdin: &mut std::process::ChildStdin, s: &str| {
        writeln!(stdin, "{s}").and_then(|()| stdin.flush()).map_err(|e| format!("writing to the child: {e}"))
    };
    say(&mut stdin, "start")?;
    let side = if plan.uhmm { "uhmm" } else { "kernel" };
    let t = Instant::now();
    let note = |what: &str| eprintln!("    kv {side}: {what} at {:.1} s", t.elapsed().as_secs_f64());
    let zram_before = kernel.map(|(_, z)| z.mm_stat()).unwrap_or_default();
    let mut footprint = None;
    let mut result = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading the child: {e}"))?;
        if let Some(base) = line.strip_prefix("@filled ") {
            note("table built");
            if let Some((cg, _)) = kernel {
                let base: u64 = base.trim().parse().map_err(|e| format!("the child's @filled: {e}"))?;
                cg.limit(base + plan.budget_bytes as u64)?;
            }
            say(&mut stdin, "go")?;
        } else if line == "@zipf-done" {
            note("Zipf phase done, scans");
            if let Some((_, z)) = kernel {
                footprint = Some(z.mm_stat());
            }
            say(&mut stdin, "go")?;
        } else if line.starts_with('{') {
            result = Some(serde_json::from_str::<KvSide>(&line).map_err(|e| format!("the child's result: {e}"))?);
        } else if !line.is_empty() {
            eprintln!("  kv child: {line}");
        }
    }
    let status = child.0.wait().map_err(|e| e.to_string())?;
    note("done");
    if !status.success() {
        return Err(format!("the {side} side's child failed ({status})"));
    }
    let mut r = result.ok_or_else(|| format!("the {side} side's child printed no result"))?;
    if let Some(f) = footprint {
        r.compressed_bytes = f.mem_used_total.saturating_sub(zram_before.mem_used_total);
        r.codec_bytes = f.compr_data_size.saturating_sub(zram_before.compr_data_size);
        r.stored_bytes = f.orig_data_size.saturating_sub(zram_before.orig_data_size);
    }
    if r.mismatches > 0 {
        return Err(format!(
            "the {side} side lost data: {} records read back wrong, the first: {}",
            r.mismatches,
            r.first_mismatch.as_deref().unwrap_or("?")
        ));
    }
    Ok(r)
}

/// Everything the RAM-budget rows measured.
#[derive(Debug, Serialize)]
pub struct KvResults {
    /// Bytes of the table.
    pub table_bytes: usize,
    /// The budget, bytes (half the table).
    pub budget_bytes: usize,
    /// How the kernel side is limited.
    pub kernel_setup: String,
    /// Each kernel run.
    pub kernel: Vec<KvSide>,
    /// Each uhmm run.
    pub uhmm: Vec<KvSide>,
    /// Each uhmm run with faults answered in the faulting thread.
    pub uhmm_signal: Vec<KvSide>,
    /// Kernel-side tries its cgroup's OOM killer ended (each is tried again,
    /// up to [`KERNEL_TRIES`] a run; a run whose tries all end so has no
    /// kernel figures, and the rows say so).
    pub kernel_oom_kills: u32,
    /// The rows: a label and its targets.
    pub rows: Vec<(&'static str, Vec<Target>)>,
}

/// The options of the RAM-budget rows.
#[derive(Debug, Clone)]
pub struct KvOptions {
    /// Bytes of the table.
    pub table_bytes: usize,
    /// A short run.
    pub quick: bool,
    /// Timed seconds of the Zipf phase (None: 20, or 3 with --quick).
    pub seconds: Option<f64>,
    /// Runs a side.
    pub runs: u32,
    /// Fault-handling threads of the uhmm side.
    pub handler_threads: Option<usize>,
}

/// Tries of the kernel side a run, when its cgroup's OOM killer ends it.
const KERNEL_TRIES: u32 = 3;

/// Runs the RAM-budget rows: `runs` runs a side, alternating.
pub fn run(o: &KvOptions) -> Result<KvResults, String> {
    let table_bytes = o.table_bytes.next_multiple_of(2 * PAGE_SIZE).max(64 * PAGE_SIZE);
    let budget_bytes = table_bytes / 2;
    let timed_ms = (o.seconds.unwrap_or(if o.quick { 3.0 } else { 20.0 }) * 1e3) as u64;
    let plan = ChildPlan {
        uhmm: false,
        table_bytes,
        budget_bytes,
        warmup_ms: if o.quick { 1500 } else { 10_000 },
        timed_ms,
        track_ms: if o.quick { timed_ms } else { timed_ms.min(10_000) },
        scan_passes: SCAN_PASSES,
        seed: 0x6b76_5365_6564,
        usage_file: None,
        handler_threads: o.handler_threads,
        signal_faults: false,
    };
    let zram = Zram::setup(table_bytes * 2, Some("lz4"))
        .map_err(|e| format!("the RAM-budget rows' kernel side cannot be set up: {e}"))?;
    let (mut kernel, mut uhmm, mut uhmm_signal) = (Vec::new(), Vec::new(), Vec::new());
    let mut kernel_setup = String::new();
    let mut kernel_oom_kills = 0;
    for run in 0..o.runs {
        progress(&format!(
            "kv (run {}/{}): Zipf and scans over a {} table, budget {}, kernel side (cgroup + zram)",
            run + 1,
            o.runs,
            human(table_bytes),
            human(budget_bytes)
        ));
        for tries in 1..=KERNEL_TRIES {
            let cg =
                Cgroup::create("kv").map_err(|e| format!("the RAM-budget rows' kernel side cannot be set up: {e}"))?;
            kernel_setup = format!("{}, /dev/zram ({}) the only swap", cg.describe(), zram.algorithm());
            let p = ChildPlan { usage_file: Some(cg.usage_file()), ..plan.clone() };
            let k = run_child(&p, Some((&cg, &zram)));
            let oom = cg.oom_kills();
            drop(cg);
            match k {
                Ok(k) => {
                    kernel.push(k);
                    break;
                }
                // The kernel's memcg reclaim can fail to keep up with this
                // workload at the limit, and its OOM killer ends the child:
                // a result, not a setup failure. Counted, reported in the
                // rows, and tried again after a pause.
                Err(e) if oom > 0 => {
                    kernel_oom_kills += 1;
                    eprintln!("  kv: the kernel side was OOM-killed by its cgroup (try {tries}/{KERNEL_TRIES}: {e})");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
        progress("kv: the same, uhmm side (a region under the RAM-budget tier)");
        uhmm.push(run_child(&ChildPlan { uhmm: true, ..plan.clone() }, None)?);
        progress("kv: the same, uhmm side with faults answered in the faulting thread (FaultDelivery::Signal)");
        uhmm_signal.push(run_child(&ChildPlan { uhmm: true, signal_faults: true, ..plan.clone() }, None)?);
    }
    drop(zram);
    let rows = targets(&kernel, &uhmm, &uhmm_signal, budget_bytes, kernel_oom_kills);
    Ok(KvResults { table_bytes, budget_bytes, kernel_setup, kernel, uhmm, uhmm_signal, kernel_oom_kills, rows })
}

/// The rows' targets from the medians over runs (maxima for the resident
/// peaks); last, the Zipf row of the uhmm side whose faults are answered in
/// the faulting thread (`sig`): not the default configuration (system calls
/// on pages not in RAM fail with `EFAULT` there), so beside the rows.
fn targets(
    k: &[KvSide],
    u: &[KvSide],
    sig: &[KvSide],
    budget: usize,
    oom_kills: u32,
) -> Vec<(&'static str, Vec<Target>)> {
    let med = |v: &[KvSide], f: &dyn Fn(&KvSide) -> f64| -> Option<f64> {
        let x: Vec<f64> = v.iter().map(f).filter(|x| x.is_finite()).collect();
        (!x.is_empty()).then(|| median(&x))
    };
    let maxed = |v: &[KvSide], f: &dyn Fn(&KvSide) -> u64| v.iter().map(f).max();
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let fmt = |x: Option<f64>, scale: f64| x.map_or("–".into(), |x| format!("{:.3}", x / scale));
    let size = |x: Option<f64>| x.map_or("–".into(), |x| human(x as usize));
    let scan_s = |s: &KvSide| if s.scan_pass_s.is_empty() { f64::NAN } else { median(&s.scan_pass_s) };
    let table = k.first().or(u.first()).map_or(0, |s| s.table_bytes) as f64;

    let (uo, ko) = (med(u, &|s| s.ops_per_s), med(k, &|s| s.ops_per_s));
    let (ur, kr) = (maxed(u, &|s| s.resident.max), maxed(k, &|s| s.resident.max));
    let (um, km) = (med(u, &|s| s.resident.mean as f64), med(k, &|s| s.resident.mean as f64));
    let (uc, kc) = (med(u, &|s| s.compressed_bytes as f64), med(k, &|s| s.compressed_bytes as f64));
    let (uso, kso) = (med(u, &|s| s.stored_bytes as f64), med(k, &|s| s.stored_bytes as f64));
    let (ucd, kcd) = (med(u, &|s| s.codec_bytes as f64), med(k, &|s| s.codec_bytes as f64));
    let (us, ks) = (med(u, &|s| scan_s(s)), med(k, &|s| scan_s(s)));
    let skew = med(k, &|s| s.top10_page_share).or(med(u, &|s| s.top10_page_share));
    let oom = match oom_kills {
        0 => String::new(),
        n if k.is_empty() => format!("; kernel: OOM-killed by its cgroup in each of {n} tries, no figures"),
        n => format!("; kernel OOM-killed by its cgroup in {n} tries, run again"),
    };
    let zipf = vec![
        Target::at_least(
            "Zipf ops/s, uhmm / kernel",
            ratio(uo, ko),
            1.0,
            format!(
                "{} / {} Mops/s; top 10% of pages take {:.0}% of the accesses{oom}",
                fmt(uo, 1e6),
                fmt(ko, 1e6),
                skew.unwrap_or(f64::NAN) * 100.0
            ),
        ),
        Target::at_most(
            "max resident (table pages in RAM) / budget, uhmm",
            ur.map(|r| r as f64 / budget as f64),
            1.02,
            format!(
                "max {} / {}, mean {} / {} (uhmm / kernel); budget {}",
                size(ur.map(|x| x as f64)),
                size(kr.map(|x| x as f64)),
                size(um),
                size(km),
                human(budget)
            ),
        ),
        Target::at_most(
            "compressed footprint, uhmm store / zram mem_used_total",
            ratio(uc, kc),
            1.0,
            format!(
                "{} / {} for {} / {} out; compressor output {} / {}{oom}",
                size(uc),
                size(kc),
                size(uso),
                size(kso),
                size(ucd),
                size(kcd)
            ),
        ),
    ];
    let gbs = |s: Option<f64>| s.map_or("–".into(), |s| format!("{:.2}", table / s / 1e9));
    let scan = vec![Target::at_most(
        format!("scan pass time ({SCAN_PASSES} passes over the table), uhmm / kernel"),
        ratio(us, ks),
        1.0,
        format!("{} / {} s a pass ({} / {} GB/s){oom}", fmt(us, 1.0), fmt(ks, 1.0), gbs(us), gbs(ks)),
    )];
    let nan = |x: Option<f64>| x.unwrap_or(f64::NAN);
    let (rc, fh) = (med(u, &|s| nan(s.recall)), med(u, &|s| nan(s.false_hot)));
    let (cpu, reclaim) = (med(u, &|s| nan(s.tracking_cpu)), med(u, &|s| nan(s.reclaim_cpu)));
    let window = med(u, &|s| s.track_s).map_or_else(
        || "not measured".to_string(),
        |t| format!("the true top {}% of pages over the first {t:.1} s of the timed phase", 100 / HOT_SHARE),
    );
    let tracking = vec![
        Target::at_least("tracking recall of the hottest pages", rc, 0.9, window.clone()),
        Target::at_most("tracking false-hot share", fh, 0.1, window),
        Target::at_most(
            "tracking CPU, % of one CPU",
            cpu.map(|c| c * 100.0),
            1.0,
            format!("over the timed phase; reclaim {:.1}% of one CPU", nan(reclaim) * 100.0),
        ),
    ];
    let so = med(sig, &|s| s.ops_per_s);
    let signal = vec![Target::at_least(
        "Zipf ops/s, uhmm with faults answered in the faulting thread (FaultDelivery::Signal) / kernel",
        ratio(so, ko),
        1.0,
        format!("{} / {} Mops/s{oom}", fmt(so, 1e6), fmt(ko, 1e6)),
    )];
    vec![("kv zipf", zipf), ("kv scan", scan), ("kv tracking", tracking), ("kv zipf", signal)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_check_and_detect_damage() {
        let rec = encode(42, 7);
        assert!(check(&rec, 42, 7).is_ok());
        assert!(check(&rec, 43, 7).is_err(), "another key");
        assert!(check(&rec, 42, 6).is_err(), "a stale version");
        let mut bad = rec;
        bad[100] ^= 1;
        assert!(check(&bad, 42, 7).is_err(), "a flipped bit");
        assert!(check(&[0u8; RECORD], 42, 0).is_err(), "a zero page");
    }

    #[test]
    fn zipf_is_skewed_and_in_range() {
        let z = Zipf::new(1000, THETA);
        let mut rng = Rng(1);
        let mut hist = vec![0u32; 1000];
        for _ in 0..100_000 {
            hist[z.rank(rng.uniform()) as usize] += 1;
        }
        // P(rank 0) = 1 / zeta(1000) ~ 0.13 at theta 0.99.
        assert!((10_000..16_000).contains(&hist[0]), "{}", hist[0]);
        assert!(hist[0] > hist[1] && hist[1] > hist[9] && hist[9] > hist[999]);
    }

    #[test]
    fn a_plain_table_runs_clean() {
        let len = 64 * PAGE_SIZE;
        let mem = Plain(Mapping::anonymous(len, Protection::ReadWrite, PAGE_SIZE).unwrap());
        let mut kv = Kv::new(&mem, len, 3);
        build(&mem, kv.nslots, kv.keys).unwrap();
        kv.counting = true;
        for _ in 0..20_000 {
            kv.op().unwrap();
        }
        kv.scan().unwrap();
        assert_eq!(kv.mismatches, 0, "{:?}", kv.first_mismatch);
        assert!(kv.updates > 1000 && kv.lookups > 7 * kv.updates && kv.lookups < 11 * kv.updates);
        // Damage a record: the next scan says so.
        mem.store(0, &[0xffu8; RECORD]).unwrap();
        kv.scan().unwrap();
        assert!(kv.mismatches > 0);
    }

    #[test]
    fn tracking_quality_counts_overlap() {
        let counts: Vec<u32> = (0..100).rev().collect(); // page 0 hottest
        let (r, f) = tracking_quality(&counts, &(0..10).collect::<Vec<_>>());
        assert_eq!((r, f), (1.0, 0.0));
        let (r, f) = tracking_quality(&counts, &(5..15).collect::<Vec<_>>());
        assert_eq!((r, f), (0.5, 0.5));
        // Ties at the tenth's lowest count: any of them is in it, up to
        // the places they share.
        let mut counts = vec![1u32; 40];
        counts[..3].fill(9);
        counts[3..10].fill(5);
        let (r, f) = tracking_quality(&counts, &[0, 9]);
        assert_eq!((r, f), (0.5, 0.0));
        let (r, f) = tracking_quality(&counts, &[0, 1, 2, 9]);
        assert_eq!((r, f), (1.0, 0.0), "any tied page fills the last place");
        let (r, f) = tracking_quality(&counts, &[0, 8, 9, 39]);
        assert_eq!((r, f), (0.5, 0.5), "two tied pages for one place: one is false-hot");
    }
}
