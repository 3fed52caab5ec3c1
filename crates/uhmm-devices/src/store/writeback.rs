//! Write-back below the compressed store, as zswap writes back to swap:
//! pages go to the compressed store in RAM first; when the memory its live
//! objects take passes its high mark, the pages stored there longest ago are written back to a
//! store below (a far store: a file, Redis), down to its low mark, and
//! pages the RAM store refuses (full) go below at once. A get finds each
//! page where it is.
//!
//! A page written back is read from the RAM store, stored below, and only
//! then switched over and deleted from the RAM store, under the table's
//! lock: until that moment a get finds it in RAM, and after it the page is
//! below (a get that found it in RAM a moment too late looks below). No
//! lock is held across a store's I/O. A page deleted while it is being
//! written back is deleted below once its write is done; a page put while
//! its key is being written back (its device page freed and used again
//! meanwhile) is not sent below, where the write back could cross it: it
//! stays in RAM (not stored), as any page a store cannot take.
//!
//! Order is first in, first out: a page faulted back leaves the store, so
//! the pages stored longest ago are those the program has not touched
//! since they were demoted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use uhmm::{PAGE_SIZE, Result};

use crate::compress::CompressStore;
use crate::store::{Got, PageStore, RunIn, RunOut, StoreUsage, check_runs_in, check_runs_out};

/// Pages written back at most in one batch (one put below).
const BATCH_PAGES: usize = 512;

/// The counters of a [`WritebackStore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WritebackStats {
    /// Pages in the RAM store now.
    pub ram_pages: u64,
    /// Pages below now.
    pub below_pages: u64,
    /// Pages written back from RAM, in all.
    pub written_back: u64,
    /// Pages the RAM store refused (full) that went below at once.
    pub refused_to_below: u64,
    /// Pages got from RAM, and from below.
    pub got_ram: u64,
    /// Pages got from below.
    pub got_below: u64,
}

/// Where a key's page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// In RAM, put as the `n`th page (its place in `order`).
    Ram(u64),
    Below,
}

#[derive(Debug, Default)]
struct Table {
    place: HashMap<u64, Place>,
    /// Pages in RAM in the order they were put: (key, put number). An
    /// entry whose key is no longer `Ram` with that number is stale.
    order: VecDeque<(u64, u64)>,
    next: u64,
    /// Keys being written back.
    moving: HashSet<u64>,
}

/// A store in RAM over a store below it (see the module docs).
#[derive(Debug)]
pub struct WritebackStore<B: PageStore> {
    ram: CompressStore,
    below: B,
    /// Bytes of the RAM store's memory past which pages are written back,
    /// and down to which.
    high: u64,
    low: u64,
    table: Mutex<Table>,
    /// One write back at a time.
    writing: Mutex<()>,
    written_back: AtomicU64,
    refused_to_below: AtomicU64,
    got_ram: AtomicU64,
    got_below: AtomicU64,
}

impl<B: PageStore> WritebackStore<B> {
    /// `ram` over `below`; pages are written back once `ram`'s live
    /// objects take more than 7/8 of its capacity, down to 3/4 of it.
    pub fn new(ram: CompressStore, below: B) -> WritebackStore<B> {
        let capacity = ram.usage().capacity_bytes;
        WritebackStore {
            ram,
            below,
            high: capacity - capacity / 8,
            low: capacity - capacity / 4,
            table: Mutex::default(),
            writing: Mutex::new(()),
            written_back: AtomicU64::new(0),
            refused_to_below: AtomicU64::new(0),
            got_ram: AtomicU64::new(0),
            got_below: AtomicU64::new(0),
        }
    }

    /// The store in RAM.
    pub fn ram(&self) -> &CompressStore {
        &self.ram
    }

    /// The store below.
    pub fn below(&self) -> &B {
        &self.below
    }

    /// Its counters.
    pub fn stats(&self) -> WritebackStats {
        let (ram_pages, below_pages) = {
            let t = self.lock();
            let ram = t.place.values().filter(|p| matches!(p, Place::Ram(_))).count() as u64;
            (ram, t.place.len() as u64 - ram)
        };
        WritebackStats {
            ram_pages,
            below_pages,
            written_back: self.written_back.load(Ordering::Relaxed),
            refused_to_below: self.refused_to_below.load(Ordering::Relaxed),
            got_ram: self.got_ram.load(Ordering::Relaxed),
            got_below: self.got_below.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// RAM the compressed store's live objects take: what its capacity
    /// bounds (empty pieces are given back when room is needed).
    fn ram_live(&self) -> (u64, u64) {
        let s = self.ram.stats();
        (s.mem_used_total - s.empty_bytes, s.orig_data_size / PAGE_SIZE as u64)
    }

    /// Writes back the pages stored longest ago while the RAM store's live
    /// objects take more than its low mark. Returns the pages written back.
    pub fn write_back(&self) -> usize {
        let _one = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let mut total = 0;
        loop {
            let (live, pages) = self.ram_live();
            if live <= self.low {
                break;
            }
            // Bytes a page takes in RAM, on average: how many to write.
            let per_page = (live / pages.max(1)).max(1);
            let want = ((live - self.low).div_ceil(per_page) as usize).clamp(1, BATCH_PAGES);
            let keys = self.oldest(want);
            if keys.is_empty() {
                break;
            }
            let moved = self.move_below(&keys);
            total += moved;
            if moved == 0 {
                break; // below takes nothing now: the pages stay in RAM
            }
        }
        total
    }

    /// Takes up to `n` of the oldest pages in RAM, marked moving, with
    /// their put numbers.
    fn oldest(&self, n: usize) -> Vec<(u64, u64)> {
        let mut t = self.lock();
        let mut keys = Vec::with_capacity(n);
        while keys.len() < n {
            let Some((key, put)) = t.order.pop_front() else { break };
            if t.place.get(&key) == Some(&Place::Ram(put)) {
                t.moving.insert(key);
                keys.push((key, put));
            }
            // Otherwise stale: gone, or put again since.
        }
        keys
    }

    /// Reads `keys` from RAM, stores them below, then switches each one
    /// stored below over (or, if it was deleted or put again meanwhile,
    /// deletes it below). Returns how many moved.
    fn move_below(&self, taken: &[(u64, u64)]) -> usize {
        let keys: Vec<u64> = taken.iter().map(|t| t.0).collect();
        let mut data = vec![0u8; keys.len() * PAGE_SIZE];
        let mut got = vec![Got::Missing; keys.len()];
        let read = self.ram.get(&mut [RunOut { keys: &keys, data: &mut data, got: &mut got }]);
        // Pages read whole go below (a page lost in RAM stays: its get
        // reports it).
        let ok: Vec<usize> = (0..keys.len()).filter(|&i| read.is_ok() && got[i] == Got::Filled).collect();
        let mut stored = vec![false; keys.len()];
        if !ok.is_empty() {
            let ok_keys: Vec<u64> = ok.iter().map(|&i| keys[i]).collect();
            let mut ok_data = Vec::with_capacity(ok.len() * PAGE_SIZE);
            for &i in &ok {
                ok_data.extend_from_slice(&data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
            }
            // The pages are not neighbours: one run, at no address.
            match self.below.put(&[RunIn { vpn: 0, keys: &ok_keys, data: &ok_data }]) {
                Ok(s) => {
                    for (k, &i) in ok.iter().enumerate() {
                        stored[i] = s.get(k).copied().unwrap_or(false);
                    }
                }
                Err(err) => tracing::warn!(%err, "write-back: the store below took no page"),
            }
        }
        let (mut switched, mut not_wanted) = (Vec::new(), Vec::new());
        let mut t = self.lock();
        for (&(key, put), &below) in taken.iter().zip(&stored) {
            let now = t.place.get(&key).copied();
            match (now == Some(Place::Ram(put)), below) {
                (true, true) => {
                    t.place.insert(key, Place::Below);
                    switched.push(key);
                }
                (true, false) => t.order.push_front((key, put)),
                // Deleted (and maybe put again) while it was written: the
                // copy below is not wanted.
                (false, true) => not_wanted.push(key),
                (false, false) => {}
            }
        }
        // Under the lock, before the keys stop moving: a get that finds a
        // page below finds it there, and no put of a key sends it below
        // before its stale copy there is gone.
        self.ram.delete(&switched);
        self.below.delete(&not_wanted);
        for key in &keys {
            t.moving.remove(key);
        }
        drop(t);
        self.written_back.fetch_add(switched.len() as u64, Ordering::Relaxed);
        switched.len()
    }
}

impl<B: PageStore> PageStore for WritebackStore<B> {
    fn put(&self, runs: &[RunIn<'_>]) -> Result<Vec<bool>> {
        check_runs_in(runs)?;
        let mut stored = self.ram.put(runs)?;
        // Pages RAM refused go below, unless their key is being written
        // back (they stay where they were).
        let mut refused: Vec<(usize, usize)> = Vec::new(); // (run, page)
        {
            let mut t = self.lock();
            let mut k = 0;
            for (r, run) in runs.iter().enumerate() {
                for (p, &key) in run.keys.iter().enumerate() {
                    if stored[k] {
                        let put = t.next;
                        t.next += 1;
                        t.place.insert(key, Place::Ram(put));
                        t.order.push_back((key, put));
                    } else if !t.moving.contains(&key) {
                        refused.push((r, p));
                    }
                    k += 1;
                }
            }
        }
        if !refused.is_empty() {
            let keys: Vec<u64> = refused.iter().map(|&(r, p)| runs[r].keys[p]).collect();
            let mut data = Vec::with_capacity(keys.len() * PAGE_SIZE);
            for &(r, p) in &refused {
                data.extend_from_slice(&runs[r].data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]);
            }
            let vpn = runs[refused[0].0].vpn + refused[0].1 as u64;
            if let Ok(below) = self.below.put(&[RunIn { vpn, keys: &keys, data: &data }]) {
                let mut t = self.lock();
                let starts: Vec<usize> =
                    runs.iter().scan(0, |at, r| Some(std::mem::replace(at, *at + r.keys.len()))).collect();
                for (j, &(r, p)) in refused.iter().enumerate() {
                    if below.get(j).copied().unwrap_or(false) {
                        t.place.insert(keys[j], Place::Below);
                        stored[starts[r] + p] = true;
                    }
                }
                self.refused_to_below.fetch_add(below.iter().filter(|s| **s).count() as u64, Ordering::Relaxed);
            }
        }
        if self.ram_live().0 > self.high {
            self.write_back();
        }
        Ok(stored)
    }

    fn zero_pages(&self, keys: &[u64], zero: &mut [bool]) {
        let mut below = vec![false; keys.len()];
        self.ram.zero_pages(keys, zero);
        self.below.zero_pages(keys, &mut below);
        for (z, b) in zero.iter_mut().zip(below) {
            *z |= b;
        }
    }

    fn fault_pages(&self, key: u64) -> usize {
        match self.lock().place.get(&key) {
            Some(Place::Below) => self.below.fault_pages(key),
            _ => self.ram.fault_pages(key),
        }
    }

    fn get(&self, runs: &mut [RunOut<'_>]) -> Result<()> {
        check_runs_out(runs)?;
        // RAM first; then below, the pages there (some may have been
        // written back since RAM was asked: a write back switches a page
        // over before it deletes it in RAM).
        self.ram.get(runs)?;
        let from_ram = runs.iter().flat_map(|r| r.got.iter()).filter(|g| **g == Got::Filled).count() as u64;
        self.got_ram.fetch_add(from_ram, Ordering::Relaxed);
        let below: Vec<Vec<bool>> = {
            let t = self.lock();
            let is_below = |k: &u64| t.place.get(k) == Some(&Place::Below);
            runs.iter()
                .map(|r| r.keys.iter().zip(r.got.iter()).map(|(k, g)| *g == Got::Missing && is_below(k)).collect())
                .collect()
        };
        let mut from_below = 0;
        for (run, below) in runs.iter_mut().zip(&below) {
            let mut p = 0;
            while p < run.keys.len() {
                if !below[p] {
                    p += 1;
                    continue;
                }
                let end = (p..run.keys.len()).find(|&e| !below[e]).unwrap_or(run.keys.len());
                let mut out = RunOut {
                    keys: &run.keys[p..end],
                    data: &mut run.data[p * PAGE_SIZE..end * PAGE_SIZE],
                    got: &mut run.got[p..end],
                };
                self.below.get(std::slice::from_mut(&mut out))?;
                from_below += out.got.iter().filter(|g| **g == Got::Filled).count() as u64;
                p = end;
            }
        }
        self.got_below.fetch_add(from_below, Ordering::Relaxed);
        Ok(())
    }

    fn delete(&self, keys: &[u64]) {
        let (mut ram, mut below) = (Vec::new(), Vec::new());
        let mut t = self.lock();
        for &key in keys {
            match t.place.remove(&key) {
                Some(Place::Ram(_)) => ram.push(key),
                Some(Place::Below) => below.push(key),
                None => {}
            }
        }
        // In RAM: under the lock, as a write back's switch is.
        self.ram.delete(&ram);
        drop(t);
        self.below.delete(&below);
    }

    fn usage(&self) -> StoreUsage {
        let (r, b) = (self.ram.usage(), self.below.usage());
        // A store with no bound of its own says u64::MAX.
        StoreUsage {
            pages: r.pages + b.pages,
            orig_bytes: r.orig_bytes + b.orig_bytes,
            used_bytes: r.used_bytes + b.used_bytes,
            capacity_bytes: r.capacity_bytes.saturating_add(b.capacity_bytes),
        }
    }
}
