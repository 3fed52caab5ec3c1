//! The compressed store: a user-space zswap, the first real tier behind a
//! [`StoreDevice`](crate::store::StoreDevice).
//!
//! Like zram it keeps same-filled pages (zeros, or one word repeated) as
//! their word, pages that do not compress raw, and the rest compressed in a
//! packed pool of size classes (`pool`), and counts what zram's `mm_stat`
//! counts. Beyond zram: neighbouring pages are compressed together in
//! groups (a better ratio; a fault brings the group back at once), encoding
//! runs on worker threads (the device hands over whole chunks), and every
//! object carries a checksum, so memory corruption is reported as a lost
//! page, never returned as wrong data. How pages are encoded is `codec`.

mod codec;
mod pool;

pub use codec::Codec;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use uhmm::{Error, PAGE_SIZE, Result};

use crate::store::{Got, PageStore, RunIn, RunOut, StoreUsage, check_runs_in, check_runs_out};
use pool::{Handle, MAX_OBJECT, Pool};

/// The largest group: its pages, compressed, must fit a pool object.
pub const MAX_GROUP_PAGES: usize = MAX_OBJECT / PAGE_SIZE;

/// A batch of fewer pages is encoded on the calling thread.
const PARALLEL_PAGES: usize = 64;

/// A `get` of this many pages or more (a scan's window) is decoded on two
/// threads.
const PARALLEL_GET_PAGES: usize = 128;

/// RAM of emptied pool pieces kept (counted as used) before a worker gives
/// it back (past a thirty-second of the pool too); `compact` gives it all back.
const EMPTY_SLACK: usize = 1 << 20;

/// Settings of a [`CompressStore`]; each field's doc gives its default.
#[derive(Debug, Clone)]
pub struct CompressConfig {
    /// The compressor. Default: [`Codec::Lz4`].
    pub codec: Codec,
    /// Neighbouring pages compressed together, 1 to [`MAX_GROUP_PAGES`]
    /// (aligned in the address space). Default: 4 (16 KiB).
    pub group_pages: usize,
    /// The most RAM the pool may use; a page that does not fit stays where
    /// it was. Default: 4 GiB (`4 << 30`).
    pub capacity_bytes: usize,
    /// Fault injection: the chance (0.0 to 1.0) that storing an object
    /// fails as if the pool were full. Default: 0.0.
    pub alloc_fail_rate: f64,
    /// Fault injection: the chance that a stored object has a bit flipped
    /// in the pool afterwards (its pages come back lost). Default: 0.0.
    pub corrupt_rate: f64,
    /// Seed of the fault-injection generator. Default: 0.
    pub fault_seed: u64,
}

impl Default for CompressConfig {
    fn default() -> Self {
        CompressConfig {
            codec: Codec::Lz4,
            group_pages: 4,
            capacity_bytes: 4 << 30,
            alloc_fail_rate: 0.0,
            corrupt_rate: 0.0,
            fault_seed: 0,
        }
    }
}

impl CompressConfig {
    /// Checks the fields; the error names the field at fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::invalid(format!("CompressConfig: {what}")));
        if !(1..=MAX_GROUP_PAGES).contains(&self.group_pages) {
            return bad(format!("group_pages ({}) must be within 1..={MAX_GROUP_PAGES}", self.group_pages));
        }
        if self.capacity_bytes < PAGE_SIZE {
            return bad(format!("capacity_bytes ({}) must be at least a page", self.capacity_bytes));
        }
        if let Codec::Zstd(level) = self.codec
            && !(1..=19).contains(&level)
        {
            return bad(format!("the zstd level ({level}) must be within 1..=19"));
        }
        for (name, rate) in [("alloc_fail_rate", self.alloc_fail_rate), ("corrupt_rate", self.corrupt_rate)] {
            if !(0.0..=1.0).contains(&rate) {
                return bad(format!("{name} ({rate}) must be within 0.0..=1.0"));
            }
        }
        Ok(())
    }
}

/// The counters of a [`CompressStore`]: zram's `mm_stat`, and more.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompressStats {
    /// Bytes of the pages stored, before compression (`orig_data_size`).
    pub orig_data_size: u64,
    /// Bytes of their compressed objects (`compr_data_size`).
    pub compr_data_size: u64,
    /// RAM the pool uses, all rounding included (`mem_used_total`).
    pub mem_used_total: u64,
    /// Same-filled pages, kept as a word (`same_pages`).
    pub same_pages: u64,
    /// Pages kept raw because they did not compress (`huge_pages`).
    pub huge_pages: u64,
    /// Pages stored in groups (several pages compressed as one object).
    pub grouped_pages: u64,
    /// Objects in the pool.
    pub objects: u64,
    /// Pool bytes lost to rounding objects up to their size class.
    pub class_waste: u64,
    /// Pool RAM no object touches any more, not given back yet (released
    /// in the background once past a share of the pool).
    pub empty_bytes: u64,
    /// Bytes [`CompressStore::compact`] gave back, in all.
    pub compacted_bytes: u64,
    /// Pages stored, in all (demotions).
    pub pages_stored: u64,
    /// Pages filled back, in all.
    pub pages_loaded: u64,
    /// Pages reported lost: their object failed its checksum or decoding.
    pub lost_pages: u64,
    /// Objects not stored because the pool was full.
    pub pool_full: u64,
    /// Injected faults: failed allocations, corrupted objects.
    pub injected_alloc_failures: u64,
    /// See `injected_alloc_failures`.
    pub injected_corruptions: u64,
}

impl CompressStats {
    /// `orig_data_size / mem_used_total`, counting same-filled pages (which
    /// use no pool memory); 0 when nothing is stored.
    pub fn ratio(&self) -> f64 {
        if self.mem_used_total == 0 { 0.0 } else { self.orig_data_size as f64 / self.mem_used_total as f64 }
    }

    /// The share of the pool's memory that holds no object bytes: class
    /// rounding, partly used pages, emptied pages not given back yet (what
    /// [`CompressStore::compact`] can reduce); 0 for an empty pool.
    pub fn fragmentation(&self) -> f64 {
        if self.mem_used_total == 0 { 0.0 } else { 1.0 - self.compr_data_size as f64 / self.mem_used_total as f64 }
    }
}

/// A [`PageStore`] that keeps pages compressed in RAM (see the module
/// docs).
#[derive(Debug)]
pub struct CompressStore {
    config: CompressConfig,
    /// Shared with the job that gives back emptied pool memory.
    state: Arc<Mutex<State>>,
    counters: Counters,
    /// That job is queued.
    releasing: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct Counters {
    pages_stored: AtomicU64,
    pages_loaded: AtomicU64,
    lost_pages: AtomicU64,
    pool_full: AtomicU64,
    compacted_bytes: AtomicU64,
    injected_alloc_failures: AtomicU64,
    injected_corruptions: AtomicU64,
    /// The fault-injection generator (splitmix64).
    rng: AtomicU64,
}

/// The store's tables, under one lock: short sections only (table updates
/// and copies of compressed bytes); encoding runs outside it.
#[derive(Debug)]
struct State {
    /// By key.
    entries: Vec<Entry>,
    objects: Vec<Obj>,
    free_objects: Vec<u32>,
    pool: Pool,
    pages: u64,
    same_pages: u64,
    huge_pages: u64,
    grouped_pages: u64,
}

/// What a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Empty,
    /// A same-filled page: its word.
    Same(u64),
    /// Page `index` of object `obj`.
    In {
        obj: u32,
        index: u8,
    },
}

/// A stored object: one page, or a group compressed together.
#[derive(Debug, Clone, Copy)]
struct Obj {
    handle: Handle,
    len: u32,
    checksum: u32,
    pages: u8,
    /// Its pages still stored.
    live: u8,
    /// Kept uncompressed.
    raw: bool,
}

/// One encoded unit of a `put`: a page or group, starting at page `start`
/// of the batch.
struct Encoded {
    start: usize,
    pages: usize,
    body: Body,
}

enum Body {
    Same(u64),
    Bytes { bytes: Vec<u8>, raw: bool, checksum: u32 },
}

impl CompressStore {
    /// A store with `config`; a config that
    /// [`validate`](CompressConfig::validate) refuses is an invalid
    /// argument.
    pub fn new(config: CompressConfig) -> Result<CompressStore> {
        config.validate()?;
        let state = State {
            entries: Vec::new(),
            objects: Vec::new(),
            free_objects: Vec::new(),
            pool: Pool::new(config.capacity_bytes),
            pages: 0,
            same_pages: 0,
            huge_pages: 0,
            grouped_pages: 0,
        };
        let counters = Counters { rng: AtomicU64::new(config.fault_seed), ..Counters::default() };
        Ok(CompressStore { config, state: Arc::new(Mutex::new(state)), counters, releasing: Arc::default() })
    }

    /// Its settings.
    pub fn config(&self) -> &CompressConfig {
        &self.config
    }

    /// The counters (zram's `mm_stat`, and more).
    pub fn stats(&self) -> CompressStats {
        let st = self.lock();
        let u = st.pool.usage();
        let c = &self.counters;
        CompressStats {
            orig_data_size: st.pages * PAGE_SIZE as u64,
            compr_data_size: u.object_bytes as u64,
            mem_used_total: u.used_bytes as u64,
            same_pages: st.same_pages,
            huge_pages: st.huge_pages,
            grouped_pages: st.grouped_pages,
            objects: u.objects as u64,
            class_waste: (u.slot_bytes - u.object_bytes) as u64,
            empty_bytes: u.empty_bytes as u64,
            compacted_bytes: c.compacted_bytes.load(Ordering::Relaxed),
            pages_stored: c.pages_stored.load(Ordering::Relaxed),
            pages_loaded: c.pages_loaded.load(Ordering::Relaxed),
            lost_pages: c.lost_pages.load(Ordering::Relaxed),
            pool_full: c.pool_full.load(Ordering::Relaxed),
            injected_alloc_failures: c.injected_alloc_failures.load(Ordering::Relaxed),
            injected_corruptions: c.injected_corruptions.load(Ordering::Relaxed),
        }
    }

    /// Moves objects into the holes freed objects left in the pool, and
    /// gives back the RAM that empties (zsmalloc's compaction). Returns the
    /// bytes given back.
    pub fn compact(&self) -> usize {
        let mut st = self.lock();
        let State { pool, objects, .. } = &mut *st;
        let freed = pool.compact(|owner, new| objects[owner as usize].handle = new);
        self.counters.compacted_bytes.fetch_add(freed as u64, Ordering::Relaxed);
        freed
    }

    /// Flips a bit of the object holding `key`'s page: what a memory error
    /// would do (for tests). Returns false when `key` holds no object.
    pub fn corrupt(&self, key: u64) -> bool {
        let st = self.lock();
        match st.entries.get(key as usize) {
            Some(&Entry::In { obj, .. }) => {
                let o = st.objects[obj as usize];
                st.pool.corrupt(o.handle, o.len as usize / 2);
                true
            }
            _ => false,
        }
    }

    /// Freed objects leave pool pieces empty but resident: a fault freeing
    /// its page must not wait for the TLB flush that giving the RAM back
    /// costs. Past [`EMPTY_SLACK`] (and a thirty-second of the pool), a worker
    /// gives it back.
    fn release_empty_later(&self, st: std::sync::MutexGuard<'_, State>) {
        let over = st.pool.empty_over(EMPTY_SLACK);
        drop(st);
        if over && !self.releasing.swap(true, Ordering::AcqRel) {
            let (state, releasing) = (self.state.clone(), self.releasing.clone());
            rayon::spawn(move || {
                state.lock().unwrap_or_else(|e| e.into_inner()).pool.release_empty();
                releasing.store(false, Ordering::Release);
            });
        }
    }

    /// Fills the pages of `runs` on this thread (see [`PageStore::get`]).
    fn load(&self, runs: &mut [RunOut<'_>]) -> Result<()> {
        check_runs_out(runs)?;
        // Under the lock: what each page is, and a copy of each object's
        // compressed bytes (once per object, for its neighbouring pages).
        let mut fetches: Vec<Fetch> = Vec::new();
        let mut words: Vec<(usize, usize, u64)> = Vec::new(); // (run, page, word)
        let mut comp: Vec<u8> = Vec::new();
        {
            let st = self.lock();
            for (r, run) in runs.iter().enumerate() {
                for (p, &key) in run.keys.iter().enumerate() {
                    match st.entries.get(key as usize).copied().unwrap_or(Entry::Empty) {
                        Entry::Empty => {}
                        Entry::Same(word) => words.push((r, p, word)),
                        Entry::In { obj, index } => {
                            if let Some(f) = fetches.last_mut()
                                && f.obj == obj
                                && f.run == r
                            {
                                f.pages.push((p, index));
                                continue;
                            }
                            let o = st.objects[obj as usize];
                            let at = comp.len();
                            comp.resize(at + o.len as usize, 0);
                            let read = st.pool.read(o.handle, &mut comp[at..]);
                            fetches.push(Fetch {
                                obj,
                                run: r,
                                o,
                                bytes: at..comp.len(),
                                read,
                                pages: vec![(p, index)],
                            });
                        }
                    }
                }
            }
        }
        for (r, p, word) in words {
            codec::fill_word(&mut runs[r].data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], word);
            runs[r].got[p] = Got::Filled;
        }
        let mut scratch = Vec::new();
        let (mut loaded, mut lost) = (0u64, 0u64);
        for f in &fetches {
            let run = &mut runs[f.run];
            let src = &comp[f.bytes.clone()];
            let good = f.read && codec::checksum(src) == f.o.checksum;
            let n = f.o.pages as usize;
            // The whole object, in order, at consecutive pages: straight in.
            let (p0, i0) = f.pages[0];
            let whole = f.pages.len() == n
                && i0 == 0
                && f.pages.iter().enumerate().all(|(k, &(p, i))| p == p0 + k && i as usize == k);
            let ok = good
                && if whole {
                    decode(self.config.codec, f.o.raw, src, &mut run.data[p0 * PAGE_SIZE..(p0 + n) * PAGE_SIZE])
                } else {
                    scratch.resize(n * PAGE_SIZE, 0);
                    decode(self.config.codec, f.o.raw, src, &mut scratch) && {
                        for &(p, i) in &f.pages {
                            let i = i as usize;
                            run.data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
                                .copy_from_slice(&scratch[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
                        }
                        true
                    }
                };
            let got = if ok { Got::Filled } else { Got::Lost };
            for &(p, _) in &f.pages {
                run.got[p] = got;
            }
            if ok {
                loaded += f.pages.len() as u64;
            } else {
                tracing::error!(obj = f.obj, pages = f.pages.len(), "compressed object failed its check: pages lost");
                lost += f.pages.len() as u64;
            }
        }
        self.counters.pages_loaded.fetch_add(loaded, Ordering::Relaxed);
        self.counters.lost_pages.fetch_add(lost, Ordering::Relaxed);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True with probability `rate` (splitmix64 over an atomic counter).
    fn chance(&self, rate: f64) -> bool {
        if rate <= 0.0 {
            return false;
        }
        let mut z = self.counters.rng.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 11) as f64 / (1u64 << 53) as f64) < rate
    }

    /// Encodes the unit of `pages` pages at `start` of `data`: a group
    /// compressed together when it is worth it, else page by page.
    fn encode(&self, data: &[u8], start: usize, pages: usize, out: &mut Vec<Encoded>) {
        let bytes = &data[start * PAGE_SIZE..(start + pages) * PAGE_SIZE];
        // A group that does not compress is kept raw page by page: its pages
        // alone would compress worse still (not tried again).
        let mut group_failed = false;
        if pages > 1 && bytes.chunks(PAGE_SIZE).all(|p| codec::same_filled(p).is_none()) {
            let mut buf = Vec::new();
            if codec::compress(self.config.codec, bytes, &mut buf).is_some() {
                let checksum = codec::checksum(&buf);
                out.push(Encoded { start, pages, body: Body::Bytes { bytes: buf, raw: false, checksum } });
                return;
            }
            group_failed = true;
        }
        for (k, page) in bytes.chunks(PAGE_SIZE).enumerate() {
            let body = match codec::same_filled(page) {
                Some(word) => Body::Same(word),
                None => {
                    let mut buf = Vec::new();
                    let raw = group_failed || codec::compress(self.config.codec, page, &mut buf).is_none();
                    if raw {
                        buf.clear();
                        buf.extend_from_slice(page);
                    }
                    Body::Bytes { checksum: codec::checksum(&buf), bytes: buf, raw }
                }
            };
            out.push(Encoded { start: start + k, pages: 1, body });
        }
    }
}

impl State {
    /// Forgets what `key` holds.
    fn forget(&mut self, key: u64) {
        let Some(entry) = self.entries.get_mut(key as usize) else { return };
        match std::mem::replace(entry, Entry::Empty) {
            Entry::Empty => return,
            Entry::Same(_) => self.same_pages -= 1,
            Entry::In { obj, .. } => {
                let o = &mut self.objects[obj as usize];
                o.live -= 1;
                if o.raw {
                    self.huge_pages -= 1;
                }
                if o.pages > 1 {
                    self.grouped_pages -= 1;
                }
                if o.live == 0 {
                    let (handle, len) = (o.handle, o.len as usize);
                    self.pool.free(handle, len);
                    self.free_objects.push(obj);
                }
            }
        }
        self.pages -= 1;
    }

    fn set(&mut self, key: u64, entry: Entry) {
        self.forget(key);
        let k = key as usize;
        if self.entries.len() <= k {
            self.entries.resize(k + 1, Entry::Empty);
        }
        self.entries[k] = entry;
        self.pages += 1;
    }

    fn new_obj(&mut self) -> u32 {
        self.free_objects.pop().unwrap_or_else(|| {
            self.objects.push(Obj { handle: Handle::NONE, len: 0, checksum: 0, pages: 0, live: 0, raw: false });
            (self.objects.len() - 1) as u32
        })
    }
}

impl PageStore for CompressStore {
    fn put(&self, runs: &[RunIn<'_>]) -> Result<Vec<bool>> {
        check_runs_in(runs)?;
        // Units: aligned groups wholly inside a run, else single pages.
        let group = self.config.group_pages as u64;
        let mut units: Vec<(usize, usize, usize)> = Vec::new(); // (run, first page, pages)
        for (r, run) in runs.iter().enumerate() {
            let n = run.keys.len();
            let mut p = 0;
            while p < n {
                let vpn = run.vpn + p as u64;
                let len = if vpn.is_multiple_of(group) && p + group as usize <= n { group as usize } else { 1 };
                units.push((r, p, len));
                p += len;
            }
        }
        let encode = |&(r, p, len): &(usize, usize, usize)| {
            let mut out = Vec::with_capacity(1);
            self.encode(runs[r].data, p, len, &mut out);
            (r, out)
        };
        let total: usize = runs.iter().map(|r| r.keys.len()).sum();
        let encoded: Vec<(usize, Vec<Encoded>)> = if total < PARALLEL_PAGES {
            units.iter().map(encode).collect()
        } else {
            units.par_iter().map(encode).collect()
        };
        let mut first_of_run = Vec::with_capacity(runs.len());
        let mut at = 0;
        for run in runs {
            first_of_run.push(at);
            at += run.keys.len();
        }
        let mut stored = vec![false; total];
        let mut st = self.lock();
        let mut corrupt = Vec::new();
        for (r, list) in encoded {
            let keys = runs[r].keys;
            for e in list {
                let keys = &keys[e.start..e.start + e.pages];
                match e.body {
                    Body::Same(word) => {
                        st.set(keys[0], Entry::Same(word));
                        st.same_pages += 1;
                    }
                    Body::Bytes { bytes, raw, checksum } => {
                        if self.chance(self.config.alloc_fail_rate) {
                            self.counters.injected_alloc_failures.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let obj = st.new_obj();
                        let Some(handle) = st.pool.store(&bytes, obj) else {
                            st.free_objects.push(obj);
                            self.counters.pool_full.fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        let pages = e.pages as u8;
                        st.objects[obj as usize] =
                            Obj { handle, len: bytes.len() as u32, checksum, pages, live: pages, raw };
                        for (k, &key) in keys.iter().enumerate() {
                            st.set(key, Entry::In { obj, index: k as u8 });
                        }
                        if raw {
                            st.huge_pages += 1;
                        }
                        if pages > 1 {
                            st.grouped_pages += u64::from(pages);
                        }
                        if self.chance(self.config.corrupt_rate) {
                            corrupt.push(obj);
                        }
                    }
                }
                stored[first_of_run[r] + e.start..][..e.pages].fill(true);
            }
        }
        for obj in corrupt {
            let o = st.objects[obj as usize];
            st.pool.corrupt(o.handle, o.len as usize / 2);
            self.counters.injected_corruptions.fetch_add(1, Ordering::Relaxed);
        }
        self.release_empty_later(st);
        let n = stored.iter().filter(|s| **s).count();
        self.counters.pages_stored.fetch_add(n as u64, Ordering::Relaxed);
        Ok(stored)
    }

    fn fault_pages(&self, key: u64) -> usize {
        let st = self.lock();
        match st.entries.get(key as usize) {
            Some(&Entry::In { obj, .. }) => usize::from(st.objects[obj as usize].pages),
            _ => 1,
        }
    }

    fn zero_pages(&self, keys: &[u64], zero: &mut [bool]) {
        let st = self.lock();
        for (z, &key) in zero.iter_mut().zip(keys) {
            *z = st.entries.get(key as usize) == Some(&Entry::Same(0));
        }
    }

    fn get(&self, runs: &mut [RunOut<'_>]) -> Result<()> {
        let total: usize = runs.iter().map(|r| r.keys.len()).sum();
        if total < PARALLEL_GET_PAGES {
            return self.load(runs);
        }
        // A scan's window: two halves decoded at once, split at a group
        // boundary (a group across it would be decoded twice).
        let half = (total / 2).next_multiple_of(self.config.group_pages);
        let (mut front, mut back) = (Vec::new(), Vec::new());
        let mut seen = 0;
        for run in runs.iter_mut() {
            let n = run.keys.len();
            let RunOut { keys, data, got } = run;
            if seen + n <= half {
                front.push(RunOut { keys, data: &mut data[..], got: &mut got[..] });
            } else if seen >= half {
                back.push(RunOut { keys, data: &mut data[..], got: &mut got[..] });
            } else {
                let k = half - seen;
                let (d0, d1) = data.split_at_mut(k * PAGE_SIZE);
                let (g0, g1) = got.split_at_mut(k);
                front.push(RunOut { keys: &keys[..k], data: d0, got: g0 });
                back.push(RunOut { keys: &keys[k..], data: d1, got: g1 });
            }
            seen += n;
        }
        let (a, b) = rayon::join(|| self.load(&mut front), || self.load(&mut back));
        a.and(b)
    }

    fn delete(&self, keys: &[u64]) {
        let mut st = self.lock();
        for &key in keys {
            st.forget(key);
        }
        self.release_empty_later(st);
    }

    fn usage(&self) -> StoreUsage {
        let st = self.lock();
        StoreUsage {
            pages: st.pages,
            orig_bytes: st.pages * PAGE_SIZE as u64,
            used_bytes: st.pool.usage().used_bytes as u64,
            capacity_bytes: self.config.capacity_bytes as u64,
        }
    }
}

/// One object a `get` decodes: the pages of run `run` it fills, as (page
/// in the run, index in the object).
struct Fetch {
    obj: u32,
    run: usize,
    o: Obj,
    /// Its compressed bytes in the get's copy.
    bytes: std::ops::Range<usize>,
    /// Whether the copy out of the pool worked.
    read: bool,
    pages: Vec<(usize, u8)>,
}

/// Decodes an object into `dst` (its pages).
fn decode(codec: Codec, raw: bool, src: &[u8], dst: &mut [u8]) -> bool {
    if raw {
        if src.len() != dst.len() {
            return false;
        }
        dst.copy_from_slice(src);
        return true;
    }
    codec::decompress(codec, src, dst)
}
