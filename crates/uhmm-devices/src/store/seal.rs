//! [`SealedStore`]: what a store outside the process's RAM holds is
//! ciphertext. Every page is encrypted and authenticated (AES-256-GCM) on
//! its way to the store, with a key made when the store is and never
//! written anywhere, and checked on its way back; a page that fails its
//! check comes back lost, never as wrong data.
//!
//! The tag binds the page's key (its device page number, the page's address
//! in the store) and a version (a counter, one per page stored, which is
//! also the nonce): a value copied from another page, an older copy of the
//! same page, or a page of another process (another key) all fail. The tag
//! and version stay in RAM (24 bytes a page), so the store holds nothing a
//! forger could use. Pages of zeros are kept as a flag and never sent.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, Tag, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use uhmm::{Error, ErrorKind, PAGE_SIZE, Result};
use uhmm_sys::uring::AlignedBufPool;

use super::{Got, PageStore, RunIn, RunOut, StoreUsage, check_runs_in, check_runs_out};

/// A batch of at least this many pages is sealed or opened on several
/// threads.
const PARALLEL_PAGES: usize = 64;

/// Buffers of sealed pages of at most this many pages are kept for the
/// next put, this many at most.
const KEPT_BUF_PAGES: usize = 1024;
const KEPT_BUFS: usize = 4;

/// What the table knows of a key.
#[derive(Debug, Clone, Copy, Default)]
struct Seal {
    /// 0: nothing stored; [`ZERO`]: a page of zeros (not in the store);
    /// else the version the page was sealed with.
    version: u64,
    tag: [u8; 16],
}

/// The version of a page of zeros.
const ZERO: u64 = u64::MAX;

/// The counters of a [`SealedStore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SealStats {
    /// Pages sealed and handed to the store.
    pub sealed: u64,
    /// Pages brought back that passed their check.
    pub opened: u64,
    /// Pages of zeros kept as a flag (never sent).
    pub zero_pages: u64,
    /// Pages that failed their check (tampered with, swapped, stale, or of
    /// another key): reported lost.
    pub forged: u64,
}

/// A [`PageStore`] that encrypts and authenticates every page it hands to
/// the store `S` (see the module docs).
#[derive(Debug)]
pub struct SealedStore<S> {
    inner: S,
    key: Key,
    /// The next version (starts at 1).
    next_version: AtomicU64,
    /// By key.
    seals: Mutex<Vec<Seal>>,
    /// Buffers of sealed pages kept for the next put.
    bufs: AlignedBufPool,
    sealed: AtomicU64,
    opened: AtomicU64,
    zero_pages: AtomicU64,
    forged: AtomicU64,
}

/// The AEAD key, not printed.
struct Key(LessSafeKey);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// `n` random bytes from the system's generator, as hex: a name no other
/// process picks (a store's key namespace, say).
pub fn random_id(n: usize) -> Result<String> {
    let mut bytes = vec![0u8; n];
    SystemRandom::new().fill(&mut bytes).map_err(|_| Error::new(ErrorKind::Sys, "no random bytes from the system"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl<S: PageStore> SealedStore<S> {
    /// Seals what goes to `inner` with a new random key.
    pub fn new(inner: S) -> Result<SealedStore<S>> {
        let mut key = [0u8; 32];
        SystemRandom::new().fill(&mut key).map_err(|_| Error::new(ErrorKind::Sys, "no random bytes for a key"))?;
        let key = UnboundKey::new(&AES_256_GCM, &key).map_err(|_| Error::new(ErrorKind::Sys, "AES-256-GCM key"))?;
        Ok(SealedStore {
            inner,
            key: Key(LessSafeKey::new(key)),
            next_version: AtomicU64::new(1),
            seals: Mutex::default(),
            bufs: AlignedBufPool::new(KEPT_BUFS, KEPT_BUF_PAGES),
            sealed: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            forged: AtomicU64::new(0),
        })
    }

    /// The store the ciphertext goes to.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The counters.
    pub fn stats(&self) -> SealStats {
        SealStats {
            sealed: self.sealed.load(Ordering::Relaxed),
            opened: self.opened.load(Ordering::Relaxed),
            zero_pages: self.zero_pages.load(Ordering::Relaxed),
            forged: self.forged.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Seal>> {
        self.seals.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn nonce(version: u64) -> Nonce {
        let mut n = [0u8; NONCE_LEN];
        n[..8].copy_from_slice(&version.to_le_bytes());
        Nonce::assume_unique_for_key(n)
    }

    /// Encrypts `page` in place as version `version` of `key`.
    fn seal(&self, key: u64, version: u64, page: &mut [u8]) -> Result<[u8; 16]> {
        let tag = self
            .key
            .0
            .seal_in_place_separate_tag(Self::nonce(version), Aad::from(key.to_le_bytes()), page)
            .map_err(|_| Error::new(ErrorKind::Sys, "sealing a page failed"))?;
        let mut out = [0u8; 16];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypts `page` in place if it is version `seal.version` of `key`.
    fn open(&self, key: u64, seal: Seal, page: &mut [u8]) -> bool {
        self.key
            .0
            .open_in_place_separate_tag(
                Self::nonce(seal.version),
                Aad::from(key.to_le_bytes()),
                Tag::from(seal.tag),
                page,
                0..,
            )
            .is_ok()
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

impl<S: PageStore> PageStore for SealedStore<S> {
    fn put(&self, runs: &[RunIn<'_>]) -> Result<Vec<bool>> {
        check_runs_in(runs)?;
        // Each page: a page of zeros, or its sealed bytes in `buf`, split
        // into runs of neighbouring pages with data.
        struct Out {
            vpn: u64,
            keys: Vec<u64>,
            /// Index of each page in the answer.
            at: Vec<usize>,
        }
        let total: usize = runs.iter().map(|r| r.keys.len()).sum();
        let mut zero = Vec::with_capacity(total);
        for run in runs {
            zero.extend(run.data.chunks_exact(PAGE_SIZE).map(is_zero));
        }
        let mut outs: Vec<Out> = Vec::new();
        // The sealed pages go into a page-aligned buffer, which a store
        // writing with O_DIRECT can write as it is.
        let mut buf = self.bufs.take(total - zero.iter().filter(|z| **z).count());
        let mut filled = 0;
        let mut i = 0;
        for run in runs {
            let mut follows = false;
            for (p, (&key, page)) in run.keys.iter().zip(run.data.chunks_exact(PAGE_SIZE)).enumerate() {
                if zero[i] {
                    follows = false;
                } else {
                    if !follows {
                        outs.push(Out { vpn: run.vpn + p as u64, keys: Vec::new(), at: Vec::new() });
                        follows = true;
                    }
                    let out = outs.last_mut().expect("pushed");
                    out.keys.push(key);
                    out.at.push(i);
                    buf[filled..filled + PAGE_SIZE].copy_from_slice(page);
                    filled += PAGE_SIZE;
                }
                i += 1;
            }
        }
        let keys: Vec<u64> = outs.iter().flat_map(|o| o.keys.iter().copied()).collect();
        let first = self.next_version.fetch_add(keys.len() as u64, Ordering::Relaxed);
        let mut tags = vec![[0u8; 16]; keys.len()];
        let seal_one = |(k, (page, tag)): (usize, (&mut [u8], &mut [u8; 16]))| -> Result<()> {
            *tag = self.seal(keys[k], first + k as u64, page)?;
            Ok(())
        };
        let pages = buf[..filled].chunks_exact_mut(PAGE_SIZE).zip(tags.iter_mut());
        if keys.len() >= PARALLEL_PAGES {
            pages.collect::<Vec<_>>().into_par_iter().enumerate().try_for_each(seal_one)?;
        } else {
            pages.enumerate().try_for_each(seal_one)?;
        }

        let stored = if keys.is_empty() {
            Ok(Vec::new())
        } else {
            let mut rest = &buf[..filled];
            let ins: Vec<RunIn<'_>> = outs
                .iter()
                .map(|o| {
                    let (data, tail) = rest.split_at(o.keys.len() * PAGE_SIZE);
                    rest = tail;
                    RunIn { vpn: o.vpn, keys: &o.keys, data }
                })
                .collect();
            self.inner.put(&ins)
        };
        self.bufs.give(buf);
        let stored = stored?;

        let mut answer = zero.clone();
        let mut seals = self.lock();
        let mut record = |key: u64, seal: Seal| {
            let k = key as usize;
            if seals.len() <= k {
                seals.resize(k + 1, Seal::default());
            }
            seals[k] = seal;
        };
        let all_keys = runs.iter().flat_map(|r| r.keys.iter().copied());
        let mut zeros = 0;
        for (key, z) in all_keys.zip(&zero) {
            if *z {
                record(key, Seal { version: ZERO, tag: [0; 16] });
                zeros += 1;
            }
        }
        let mut sealed = 0;
        let ats = outs.iter().flat_map(|o| o.at.iter().copied());
        for (k, (at, ok)) in ats.zip(stored.iter().copied().chain(std::iter::repeat(false))).enumerate() {
            if ok {
                record(keys[k], Seal { version: first + k as u64, tag: tags[k] });
                answer[at] = true;
                sealed += 1;
            }
        }
        drop(seals);
        self.zero_pages.fetch_add(zeros, Ordering::Relaxed);
        self.sealed.fetch_add(sealed, Ordering::Relaxed);
        Ok(answer)
    }

    fn zero_pages(&self, keys: &[u64], zero: &mut [bool]) {
        let seals = self.lock();
        for (z, &key) in zero.iter_mut().zip(keys) {
            *z = seals.get(key as usize).is_some_and(|s| s.version == ZERO);
        }
    }

    fn fault_pages(&self, key: u64) -> usize {
        self.inner.fault_pages(key)
    }

    fn get(&self, runs: &mut [RunOut<'_>]) -> Result<()> {
        check_runs_out(runs)?;
        // What each page is: zeros are filled here, pages never stored are
        // lost, and the sealed ones go to the store in runs of neighbours.
        let mut seals_of: Vec<Vec<Seal>> = Vec::with_capacity(runs.len());
        {
            let seals = self.lock();
            for run in runs.iter() {
                seals_of.push(run.keys.iter().map(|&k| seals.get(k as usize).copied().unwrap_or_default()).collect());
            }
        }
        let mut segments: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        for (r, (run, seals)) in runs.iter_mut().zip(&seals_of).enumerate() {
            for (p, seal) in seals.iter().enumerate() {
                match seal.version {
                    0 => run.got[p] = Got::Lost,
                    ZERO => {
                        run.data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(0);
                        run.got[p] = Got::Filled;
                    }
                    _ => match segments.last_mut() {
                        Some((sr, s)) if *sr == r && s.end == p => s.end += 1,
                        _ => segments.push((r, p..p + 1)),
                    },
                }
            }
        }
        if segments.is_empty() {
            return Ok(());
        }
        let mut got = vec![Got::Missing; segments.iter().map(|(_, s)| s.len()).sum()];
        {
            let mut outs: Vec<RunOut<'_>> = Vec::with_capacity(segments.len());
            let mut got_rest = &mut got[..];
            let mut seg = segments.iter().peekable();
            for (r, run) in runs.iter_mut().enumerate() {
                let (keys, mut rest, mut at) = (run.keys, &mut *run.data, 0);
                while let Some((_, s)) = seg.next_if(|(sr, _)| *sr == r) {
                    let (_, tail) = std::mem::take(&mut rest).split_at_mut((s.start - at) * PAGE_SIZE);
                    let (data, tail) = tail.split_at_mut(s.len() * PAGE_SIZE);
                    rest = tail;
                    at = s.end;
                    let (g, gt) = std::mem::take(&mut got_rest).split_at_mut(s.len());
                    got_rest = gt;
                    outs.push(RunOut { keys: &keys[s.clone()], data, got: g });
                }
            }
            self.inner.get(&mut outs)?;
        }
        // Open what came back, in place.
        let mut work: Vec<(u64, Seal, &mut [u8], &mut Got)> = Vec::with_capacity(got.len());
        let mut got_iter = got.iter();
        let mut seg = segments.iter().peekable();
        for (r, run) in runs.iter_mut().enumerate() {
            let pages = run.data.chunks_exact_mut(PAGE_SIZE).zip(run.got.iter_mut()).enumerate();
            let mut pages = pages.peekable();
            while let Some((_, s)) = seg.next_if(|(sr, _)| *sr == r) {
                while let Some((p, (page, g))) = pages.next_if(|(p, _)| *p < s.end) {
                    if p < s.start {
                        continue;
                    }
                    match got_iter.next().copied().unwrap_or(Got::Missing) {
                        Got::Filled => work.push((run.keys[p], seals_of[r][p], page, g)),
                        other => *g = other,
                    }
                }
            }
        }
        let open_one = |(key, seal, page, g): &mut (u64, Seal, &mut [u8], &mut Got)| {
            **g = if self.open(*key, *seal, page) { Got::Filled } else { Got::Lost };
        };
        if work.len() >= PARALLEL_PAGES {
            work.par_iter_mut().for_each(open_one);
        } else {
            work.iter_mut().for_each(open_one);
        }
        let forged = work.iter().filter(|w| *w.3 == Got::Lost).count() as u64;
        if forged > 0 {
            tracing::error!(pages = forged, "pages from the store failed their check: reported lost");
        }
        self.forged.fetch_add(forged, Ordering::Relaxed);
        self.opened.fetch_add(work.len() as u64 - forged, Ordering::Relaxed);
        Ok(())
    }

    fn delete(&self, keys: &[u64]) {
        let mut sent = Vec::with_capacity(keys.len());
        {
            let mut seals = self.lock();
            for &key in keys {
                if let Some(s) = seals.get_mut(key as usize) {
                    if s.version != 0 && s.version != ZERO {
                        sent.push(key);
                    }
                    *s = Seal::default();
                }
            }
        }
        if !sent.is_empty() {
            self.inner.delete(&sent);
        }
    }

    fn usage(&self) -> StoreUsage {
        self.inner.usage()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A store in a map, whose values a test can read and replace.
    #[derive(Debug, Default)]
    struct MapStore {
        values: Mutex<HashMap<u64, Vec<u8>>>,
        puts: AtomicU64,
    }

    impl PageStore for MapStore {
        fn put(&self, runs: &[RunIn<'_>]) -> Result<Vec<bool>> {
            self.puts.fetch_add(1, Ordering::Relaxed);
            let mut v = self.values.lock().unwrap();
            let mut out = Vec::new();
            for run in runs {
                for (&k, page) in run.keys.iter().zip(run.data.chunks_exact(PAGE_SIZE)) {
                    v.insert(k, page.to_vec());
                    out.push(true);
                }
            }
            Ok(out)
        }

        fn get(&self, runs: &mut [RunOut<'_>]) -> Result<()> {
            let v = self.values.lock().unwrap();
            for run in runs {
                for (p, k) in run.keys.iter().enumerate() {
                    run.got[p] = match v.get(k) {
                        Some(page) => {
                            run.data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].copy_from_slice(page);
                            Got::Filled
                        }
                        None => Got::Lost,
                    };
                }
            }
            Ok(())
        }

        fn delete(&self, keys: &[u64]) {
            let mut v = self.values.lock().unwrap();
            for k in keys {
                v.remove(k);
            }
        }

        fn usage(&self) -> StoreUsage {
            StoreUsage::default()
        }
    }

    fn page(seed: u64) -> Vec<u8> {
        (0..PAGE_SIZE as u64 / 8).flat_map(|i| (i * 31 + seed).to_le_bytes()).collect()
    }

    fn put(s: &SealedStore<MapStore>, vpn: u64, keys: &[u64], data: &[u8]) -> Vec<bool> {
        s.put(&[RunIn { vpn, keys, data }]).unwrap()
    }

    fn get(s: &SealedStore<MapStore>, keys: &[u64]) -> (Vec<u8>, Vec<Got>) {
        let mut data = vec![0xee; keys.len() * PAGE_SIZE];
        let mut got = vec![Got::Missing; keys.len()];
        s.get(&mut [RunOut { keys, data: &mut data, got: &mut got }]).unwrap();
        (data, got)
    }

    #[test]
    fn pages_round_trip_and_the_store_sees_only_ciphertext() {
        let s = SealedStore::new(MapStore::default()).unwrap();
        let data: Vec<u8> = (0..100).flat_map(page).collect();
        let keys: Vec<u64> = (10..110).collect();
        assert!(put(&s, 7, &keys, &data).iter().all(|&b| b));
        for (i, k) in keys.iter().enumerate() {
            let held = s.inner().values.lock().unwrap()[k].clone();
            assert_ne!(held, page(i as u64), "page {i} was sent in the clear");
        }
        let (back, got) = get(&s, &keys);
        assert!(got.iter().all(|&g| g == Got::Filled));
        assert!(back == data);
        assert_eq!(s.stats().opened, 100);
    }

    #[test]
    fn zero_pages_are_kept_as_a_flag_and_never_sent() {
        let s = SealedStore::new(MapStore::default()).unwrap();
        let mut data = vec![0u8; 4 * PAGE_SIZE];
        data[PAGE_SIZE..2 * PAGE_SIZE].copy_from_slice(&page(1));
        assert_eq!(put(&s, 0, &[1, 2, 3, 4], &data), [true; 4]);
        assert_eq!(s.inner().values.lock().unwrap().len(), 1);
        let mut zero = [false; 4];
        s.zero_pages(&[1, 2, 3, 4], &mut zero);
        assert_eq!(zero, [true, false, true, true]);
        let (back, got) = get(&s, &[1, 2, 3, 4]);
        assert_eq!(got, [Got::Filled; 4]);
        assert!(back == data);
        s.delete(&[1, 2, 3, 4]);
        assert!(s.inner().values.lock().unwrap().is_empty());
        assert_eq!(get(&s, &[1]).1, [Got::Lost], "a deleted key is not filled");
    }

    #[test]
    fn a_tampered_swapped_or_stale_value_comes_back_lost() {
        let s = SealedStore::new(MapStore::default()).unwrap();
        let data: Vec<u8> = (0..3).flat_map(page).collect();
        put(&s, 0, &[1, 2, 3], &data);
        let old = s.inner().values.lock().unwrap()[&3].clone();
        put(&s, 0, &[3], &page(9));
        {
            let mut v = s.inner().values.lock().unwrap();
            let one = v[&1].clone();
            v.insert(2, one); // another key's value
            v.get_mut(&1).unwrap()[100] ^= 1; // a flipped bit
            v.insert(3, old); // an older copy of the same key
        }
        let (_, got) = get(&s, &[1, 2, 3]);
        assert_eq!(got, [Got::Lost; 3]);
        assert_eq!(s.stats().forged, 3);
    }

    #[test]
    fn another_stores_pages_do_not_open() {
        let a = SealedStore::new(MapStore::default()).unwrap();
        let b = SealedStore::new(MapStore::default()).unwrap();
        put(&a, 0, &[5], &page(5));
        put(&b, 0, &[5], &page(6));
        let stolen = a.inner().values.lock().unwrap()[&5].clone();
        b.inner().values.lock().unwrap().insert(5, stolen);
        assert_eq!(get(&b, &[5]).1, [Got::Lost]);
    }

    #[test]
    fn mixed_windows_fill_each_page_from_its_own_source() {
        let s = SealedStore::new(MapStore::default()).unwrap();
        let mut data = vec![0u8; 6 * PAGE_SIZE];
        for p in [0, 2, 3, 5] {
            data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].copy_from_slice(&page(p as u64));
        }
        put(&s, 0, &[0, 1, 2, 3, 4, 5], &data);
        // Two runs, with a key never stored among them.
        let (mut d1, mut d2) = (vec![1u8; 3 * PAGE_SIZE], vec![1u8; 4 * PAGE_SIZE]);
        let (mut g1, mut g2) = (vec![Got::Missing; 3], vec![Got::Missing; 4]);
        s.get(&mut [
            RunOut { keys: &[5, 4, 3], data: &mut d1, got: &mut g1 },
            RunOut { keys: &[2, 99, 1, 0], data: &mut d2, got: &mut g2 },
        ])
        .unwrap();
        assert_eq!(g1, [Got::Filled; 3]);
        assert_eq!(g2, [Got::Filled, Got::Lost, Got::Filled, Got::Filled]);
        let pg = |d: &[u8], i: usize| d[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].to_vec();
        assert_eq!(pg(&d1, 0), page(5));
        assert!(pg(&d1, 1).iter().all(|&b| b == 0));
        assert_eq!(pg(&d1, 2), page(3));
        assert_eq!(pg(&d2, 0), page(2));
        assert_eq!(pg(&d2, 3), page(0));
    }
}
