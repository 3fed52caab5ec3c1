//! The file store: pages in a file on local disk, a swap file of the
//! process's own behind a [`StoreDevice`](crate::store::StoreDevice).
//!
//! Each page takes one page-sized slot of the file; the slots of a run of
//! neighbouring pages are one extent where the allocator (`extent`) can
//! find one, so a run is one write and a fault's window one read. Reads
//! and writes go in batches through io_uring (a few rings, so that a fault
//! never waits behind a migration's write; `pread`/`pwrite` where io_uring
//! is disabled or every ring is busy), with `O_DIRECT` where the file
//! system takes it (no second copy in the page cache), else buffered. Zero
//! pages take no slot. The file is private to the process unless the user
//! names one (see [`FileLocation`]). A page whose read fails or comes back
//! short is reported lost, never filled with zeros or stale bytes.

mod config;
mod extent;
mod readahead;

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use uhmm::{Error, ErrorKind, PAGE_SIZE, Result};
use uhmm_sys::uring::{AlignedBufPool, Op, Ring, run_blocking};

use crate::store::{Got, PageStore, RunIn, RunOut, StoreUsage, check_runs_in, check_runs_out};
use extent::{Extent, ExtentAllocator};
use readahead::{Readahead, Want};

pub use config::{DEFAULT_DIR, DirectIo, FileConfig, FileLocation, FileStats, MAX_FAULT_PAGES, MAX_READAHEAD_PAGES};

/// Aligned buffers of at most this many pages are kept for the next batch.
const KEPT_BUF_PAGES: usize = 1024;

/// A [`PageStore`] that keeps pages in a file (see the module docs).
///
/// ```
/// use std::sync::Arc;
/// use uhmm::{AddressSpace, Config, PAGE_SIZE, Prot};
/// use uhmm_devices::file::{FileConfig, FileStore};
/// use uhmm_devices::store::{StoreDevice, StoreDeviceConfig};
///
/// # fn main() -> uhmm::Result<()> {
/// let space = AddressSpace::new(Config::default())?;
/// let store = Arc::new(FileStore::new(FileConfig::default())?);
/// let dev = StoreDevice::new(&space, store.clone(), StoreDeviceConfig::default())?;
///
/// let region = space.map(64 * PAGE_SIZE, Prot::READ_WRITE)?;
/// region.write(0, &b"to the disk ".repeat(64 * PAGE_SIZE / 12))?;
/// assert_eq!(dev.migrate_to_device(region.addr(), region.npages())?.moved, 64);
/// assert_eq!(store.stats().used_bytes, 64 * PAGE_SIZE as u64);
///
/// // A CPU access reads the page (and its neighbours) back.
/// let mut buf = [0; 12];
/// region.read(0, &mut buf)?;
/// assert_eq!(&buf, b"to the disk ");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct FileStore {
    config: FileConfig,
    file: File,
    /// The file the user named (see [`FileLocation::Named`]).
    named: Option<NamedFile>,
    direct: bool,
    rings: Vec<Mutex<Ring>>,
    next_ring: AtomicUsize,
    /// Aligned buffers kept for the next batch.
    bufs: AlignedBufPool,
    /// The tables, under one lock held for table updates only: no I/O
    /// waits under it, so `delete` never waits for a read or a write.
    state: Mutex<State>,
    counters: Counters,
    /// The readahead (none when `readahead_pages` is 0 or the file could
    /// not be opened twice).
    readahead: Option<Readahead>,
}

/// A file the user named, and whether the store created it (it removes
/// it at drop) or found it (it empties it at drop).
#[derive(Debug)]
struct NamedFile {
    path: PathBuf,
    created: bool,
}

/// What [`open`] opened.
struct Opened {
    file: File,
    direct: bool,
    named: Option<NamedFile>,
}

#[derive(Debug, Default)]
struct Counters {
    pages_written: AtomicU64,
    writes: AtomicU64,
    pages_read: AtomicU64,
    reads: AtomicU64,
    lost_pages: AtomicU64,
    full_pages: AtomicU64,
    write_error_pages: AtomicU64,
}

#[derive(Debug)]
struct State {
    /// By key.
    entries: Vec<Entry>,
    space: ExtentAllocator,
    pages: u64,
    zero_pages: u64,
    /// The generation the next stored page gets: a get checks after its
    /// read that its keys still hold what it read.
    next_gen: u32,
}

/// What a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Empty,
    /// A page of zeros (no slot).
    Zero,
    /// The page in slot `slot`, stored as generation `generation`.
    At {
        slot: u64,
        generation: u32,
    },
}

/// Pages of one run in consecutive slots: one read or write.
#[derive(Debug, Clone, Copy)]
struct Piece {
    run: usize,
    /// Its first page in the run.
    page: usize,
    pages: usize,
    slot: u64,
}

impl Piece {
    fn offset(&self) -> u64 {
        self.slot * PAGE_SIZE as u64
    }
}

impl FileStore {
    /// A store with `config`: its file opened (see [`FileLocation`]). A
    /// config that [`validate`](FileConfig::validate) refuses is an invalid
    /// argument; a file that cannot be opened is a system error naming it.
    pub fn new(config: FileConfig) -> Result<FileStore> {
        config.validate()?;
        let opened = open(&config)?;
        let mut rings = Vec::with_capacity(config.rings);
        for _ in 0..config.rings {
            match Ring::new(config.ring_entries) {
                Ok(ring) => rings.push(Mutex::new(ring)),
                Err(err) => {
                    tracing::warn!(%err, "file store: no io_uring, reads and writes use pread/pwrite");
                    rings.clear();
                    break;
                }
            }
        }
        Ok(FileStore::with_file(config, opened, rings))
    }

    fn with_file(config: FileConfig, opened: Opened, rings: Vec<Mutex<Ring>>) -> FileStore {
        let Opened { file, direct, named } = opened;
        let capacity = config.capacity_bytes / PAGE_SIZE as u64;
        let readahead = match config.readahead_pages {
            0 => None,
            pages => match file.try_clone() {
                Ok(f) => Some(Readahead::new(f, pages)),
                Err(err) => {
                    tracing::warn!(%err, "file store: no readahead");
                    None
                }
            },
        };
        let kept_bufs = rings.len().max(1);
        FileStore {
            readahead,
            config,
            file,
            named,
            direct,
            rings,
            next_ring: AtomicUsize::new(0),
            bufs: AlignedBufPool::new(kept_bufs, KEPT_BUF_PAGES),
            state: Mutex::new(State {
                entries: Vec::new(),
                space: ExtentAllocator::new(capacity),
                pages: 0,
                zero_pages: 0,
                next_gen: 0,
            }),
            counters: Counters::default(),
        }
    }

    /// Its settings.
    pub fn config(&self) -> &FileConfig {
        &self.config
    }

    /// The file's path, when the user named one.
    pub fn path(&self) -> Option<&Path> {
        self.named.as_ref().map(|n| n.path.as_path())
    }

    /// The counters.
    pub fn stats(&self) -> FileStats {
        let st = self.lock();
        let c = &self.counters;
        let page = PAGE_SIZE as u64;
        let ra = self.readahead.as_ref().map(|r| r.stats()).unwrap_or_default();
        FileStats {
            readahead_pages_read: ra.pages_read,
            readahead_hits: ra.hits,
            readahead_buffer_bytes: ra.buffer_bytes,
            pages: st.pages,
            zero_pages: st.zero_pages,
            used_bytes: st.space.used() * page,
            file_bytes: st.space.end() * page,
            hole_bytes: st.space.free_slots() * page,
            capacity_bytes: self.config.capacity_bytes / page * page,
            pages_written: c.pages_written.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            pages_read: c.pages_read.load(Ordering::Relaxed),
            reads: c.reads.load(Ordering::Relaxed),
            lost_pages: c.lost_pages.load(Ordering::Relaxed),
            full_pages: c.full_pages.load(Ordering::Relaxed),
            write_error_pages: c.write_error_pages.load(Ordering::Relaxed),
            direct: self.direct,
            uring: !self.rings.is_empty(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `ops` on the file: on a free ring, else (none free, or none at
    /// all) with `pread`/`pwrite` on this thread, so no caller waits for
    /// another's batch.
    fn io(&self, ops: &mut [Op<'_>]) -> Vec<io::Result<()>> {
        let n = self.rings.len();
        if n > 0 {
            let start = self.next_ring.fetch_add(1, Ordering::Relaxed);
            for k in 0..n {
                let mut ring = match self.rings[(start + k) % n].try_lock() {
                    Ok(ring) => ring,
                    Err(TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(TryLockError::WouldBlock) => continue,
                };
                if !ring.is_broken() {
                    return ring.run(self.file.as_fd(), ops);
                }
            }
        }
        run_blocking(self.file.as_fd(), ops)
    }

    /// Reads `pieces` (sorted by run, then page) into the runs' pages:
    /// straight in when they may take it, else through an aligned buffer.
    fn read_pieces(&self, runs: &mut [RunOut<'_>], pieces: &[Piece]) -> Vec<io::Result<()>> {
        let aligned = !self.direct || runs.iter().all(|r| (r.data.as_ptr() as usize).is_multiple_of(PAGE_SIZE));
        if !aligned {
            let all: Vec<usize> = (0..pieces.len()).collect();
            return self.read_bounced(runs, pieces, &all);
        }
        let mut results = {
            let mut ops = Vec::with_capacity(pieces.len());
            let mut next = 0;
            for (r, run) in runs.iter_mut().enumerate() {
                let mut rest: &mut [u8] = &mut run.data[..];
                let mut at = 0;
                while let Some(p) = pieces.get(next).filter(|p| p.run == r) {
                    let (_, tail) = std::mem::take(&mut rest).split_at_mut((p.page - at) * PAGE_SIZE);
                    let (buf, tail) = tail.split_at_mut(p.pages * PAGE_SIZE);
                    rest = tail;
                    at = p.page + p.pages;
                    ops.push(Op::Read { offset: p.offset(), buf });
                    next += 1;
                }
            }
            self.io(&mut ops)
        };
        // A direct read into pages the kernel will not take for I/O: again
        // through a buffer of ours.
        let again: Vec<usize> = (0..pieces.len())
            .filter(|&i| self.direct && results[i].as_ref().is_err_and(uhmm_sys::uring::is_buffer_refused))
            .collect();
        if !again.is_empty() {
            for (i, res) in again.iter().zip(self.read_bounced(runs, pieces, &again)) {
                results[*i] = res;
            }
        }
        results
    }

    /// Reads pieces `which` through an aligned buffer, then copies them in.
    fn read_bounced(&self, runs: &mut [RunOut<'_>], pieces: &[Piece], which: &[usize]) -> Vec<io::Result<()>> {
        let total: usize = which.iter().map(|&i| pieces[i].pages).sum();
        let mut buf = self.bufs.take(total);
        let results = {
            let mut rest: &mut [u8] = &mut buf[..total * PAGE_SIZE];
            let mut ops = Vec::with_capacity(which.len());
            for &i in which {
                let (b, tail) = std::mem::take(&mut rest).split_at_mut(pieces[i].pages * PAGE_SIZE);
                rest = tail;
                ops.push(Op::Read { offset: pieces[i].offset(), buf: b });
            }
            self.io(&mut ops)
        };
        let mut at = 0;
        for (&i, res) in which.iter().zip(&results) {
            let p = pieces[i];
            let len = p.pages * PAGE_SIZE;
            if res.is_ok() {
                runs[p.run].data[p.page * PAGE_SIZE..][..len].copy_from_slice(&buf[at..at + len]);
            }
            at += len;
        }
        self.bufs.give(buf);
        results
    }
}

/// Opens the file `config` names, with `O_DIRECT` as it asks: the file,
/// whether it is direct, and the named path with whether it was created.
fn open(config: &FileConfig) -> Result<Opened> {
    let existed = match &config.location {
        FileLocation::Named(p) => p.symlink_metadata().is_ok(),
        _ => false,
    };
    let try_open = |direct: bool| -> io::Result<File> {
        match &config.location {
            FileLocation::Default => uhmm_sys::file::open_private(Path::new(DEFAULT_DIR), direct)
                .or_else(|_| uhmm_sys::file::open_private(&std::env::temp_dir(), direct)),
            FileLocation::PrivateIn(dir) => uhmm_sys::file::open_private(dir, direct),
            FileLocation::Named(path) => uhmm_sys::file::open_named(path, direct).map(|(f, _)| f),
        }
    };
    let opened = match config.direct {
        DirectIo::Off => try_open(false).map(|f| (f, false)),
        DirectIo::On => try_open(true).map(|f| (f, true)),
        DirectIo::Auto => match try_open(true) {
            Err(e) if uhmm_sys::file::is_direct_refused(&e) => try_open(false).map(|f| (f, false)),
            other => other.map(|f| (f, true)),
        },
    };
    let (file, direct) = opened.map_err(|e| {
        let what = match &config.location {
            FileLocation::Default => format!("a private file in {DEFAULT_DIR} or {}", std::env::temp_dir().display()),
            FileLocation::PrivateIn(dir) => format!("a private file in {}", dir.display()),
            FileLocation::Named(path) => path.display().to_string(),
        };
        let kind = if e.kind() == io::ErrorKind::InvalidInput { ErrorKind::InvalidArgument } else { ErrorKind::Sys };
        Error::new(kind, format!("file store: cannot open {what}: {e}"))
    })?;
    let named = match &config.location {
        FileLocation::Named(p) => Some(NamedFile { path: p.clone(), created: !existed }),
        _ => None,
    };
    Ok(Opened { file, direct, named })
}

/// Whether `page` is all zeros.
fn is_zero(page: &[u8]) -> bool {
    let (words, rest) = page.as_chunks::<8>();
    words.iter().all(|w| u64::from_ne_bytes(*w) == 0) && rest.iter().all(|&b| b == 0)
}

impl State {
    /// Forgets what `key` holds, freeing its slot.
    fn forget(&mut self, key: u64) {
        let Some(entry) = self.entries.get_mut(key as usize) else { return };
        match std::mem::replace(entry, Entry::Empty) {
            Entry::Empty => return,
            Entry::Zero => self.zero_pages -= 1,
            Entry::At { slot, .. } => self.space.free(Extent { start: slot, len: 1 }),
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
        if entry == Entry::Zero {
            self.zero_pages += 1;
        }
    }

    fn entry(&self, key: u64) -> Entry {
        self.entries.get(key as usize).copied().unwrap_or(Entry::Empty)
    }
}

impl PageStore for FileStore {
    fn put(&self, runs: &[RunIn<'_>]) -> Result<Vec<bool>> {
        check_runs_in(runs)?;
        let total: usize = runs.iter().map(|r| r.keys.len()).sum();
        let mut first_of_run = Vec::with_capacity(runs.len());
        // Zero pages (no slot), and the rest as (run, first page, pages).
        let mut zeros: Vec<(usize, usize)> = Vec::new();
        let mut spans: Vec<(usize, usize, usize)> = Vec::new();
        let mut at = 0;
        for (r, run) in runs.iter().enumerate() {
            first_of_run.push(at);
            at += run.keys.len();
            for (p, page) in run.data.chunks_exact(PAGE_SIZE).enumerate() {
                if is_zero(page) {
                    zeros.push((r, p));
                    continue;
                }
                match spans.last_mut() {
                    Some((sr, sp, n)) if *sr == r && *sp + *n == p => *n += 1,
                    _ => spans.push((r, p, 1)),
                }
            }
        }
        // Slots, under the lock.
        let mut pieces: Vec<Piece> = Vec::new();
        let mut full = 0;
        {
            let mut st = self.lock();
            let mut extents = Vec::new();
            for &(run, page, pages) in &spans {
                extents.clear();
                let got = st.space.alloc(pages as u64, &mut extents) as usize;
                full += pages - got;
                let mut p = page;
                for e in &extents {
                    pieces.push(Piece { run, page: p, pages: e.len as usize, slot: e.start });
                    p += e.len as usize;
                }
            }
        }
        // One write per piece: straight from the run's pages where they
        // are page-aligned (or the file is buffered), else from a copy in
        // an aligned buffer.
        let src = |p: &Piece| &runs[p.run].data[p.page * PAGE_SIZE..][..p.pages * PAGE_SIZE];
        let as_is = |p: &Piece| !self.direct || (src(p).as_ptr() as usize).is_multiple_of(PAGE_SIZE);
        let npages: usize = pieces.iter().filter(|p| !as_is(p)).map(|p| p.pages).sum();
        let mut buf = (npages > 0).then(|| self.bufs.take(npages));
        if let Some(buf) = buf.as_mut() {
            let mut off = 0;
            for p in pieces.iter().filter(|p| !as_is(p)) {
                let len = p.pages * PAGE_SIZE;
                buf[off..off + len].copy_from_slice(src(p));
                off += len;
            }
        }
        let results = {
            let mut rest: &[u8] = buf.as_ref().map_or(&[][..], |b| &b[..npages * PAGE_SIZE]);
            let mut ops: Vec<Op<'_>> = pieces
                .iter()
                .map(|p| {
                    if as_is(p) {
                        return Op::Write { offset: p.offset(), buf: src(p) };
                    }
                    let (b, tail) = rest.split_at(p.pages * PAGE_SIZE);
                    rest = tail;
                    Op::Write { offset: p.offset(), buf: b }
                })
                .collect();
            self.io(&mut ops)
        };
        if let Some(buf) = buf {
            self.bufs.give(buf);
        }
        // The pages written are stored; the slots of the others go back.
        let mut stored = vec![false; total];
        let (mut written, mut failed) = (0, 0);
        {
            let mut st = self.lock();
            for (p, res) in pieces.iter().zip(&results) {
                match res {
                    Ok(()) => {
                        for k in 0..p.pages {
                            let generation = st.next_gen;
                            st.next_gen = st.next_gen.wrapping_add(1);
                            st.set(runs[p.run].keys[p.page + k], Entry::At { slot: p.slot + k as u64, generation });
                            stored[first_of_run[p.run] + p.page + k] = true;
                        }
                        written += p.pages;
                    }
                    Err(_) => {
                        st.space.free(Extent { start: p.slot, len: p.pages as u64 });
                        failed += p.pages;
                    }
                }
            }
            for &(r, p) in &zeros {
                st.set(runs[r].keys[p], Entry::Zero);
                stored[first_of_run[r] + p] = true;
            }
        }
        if let Some(Err(err)) = results.iter().find(|r| r.is_err()) {
            tracing::warn!(%err, pages = failed, "file store: writes failed, pages left where they were");
        }
        let c = &self.counters;
        c.pages_written.fetch_add(written as u64, Ordering::Relaxed);
        c.writes.fetch_add(pieces.len() as u64, Ordering::Relaxed);
        c.full_pages.fetch_add(full as u64, Ordering::Relaxed);
        c.write_error_pages.fetch_add(failed as u64, Ordering::Relaxed);
        Ok(stored)
    }

    fn zero_pages(&self, keys: &[u64], zero: &mut [bool]) {
        let st = self.lock();
        for (z, &key) in zero.iter_mut().zip(keys) {
            *z = st.entry(key) == Entry::Zero;
        }
    }

    fn fault_pages(&self, _key: u64) -> usize {
        self.config.fault_pages
    }

    fn get(&self, runs: &mut [RunOut<'_>]) -> Result<()> {
        check_runs_out(runs)?;
        // What each key holds: pieces of neighbouring pages in consecutive
        // slots, with each page's generation.
        let mut pieces: Vec<Piece> = Vec::new();
        let mut gens: Vec<u32> = Vec::new();
        let mut zeros: Vec<(usize, usize)> = Vec::new();
        let (next_gen, end) = {
            let st = self.lock();
            for (r, run) in runs.iter().enumerate() {
                for (p, &key) in run.keys.iter().enumerate() {
                    match st.entry(key) {
                        Entry::Empty => {}
                        Entry::Zero => zeros.push((r, p)),
                        Entry::At { slot, generation } => {
                            gens.push(generation);
                            match pieces.last_mut() {
                                Some(x) if x.run == r && x.page + x.pages == p && x.slot + x.pages as u64 == slot => {
                                    x.pages += 1
                                }
                                _ => pieces.push(Piece { run: r, page: p, pages: 1, slot }),
                            }
                        }
                    }
                }
            }
            (st.next_gen, st.space.end())
        };
        for &(r, p) in &zeros {
            runs[r].data[p * PAGE_SIZE..][..PAGE_SIZE].fill(0);
            runs[r].got[p] = Got::Filled;
        }
        if pieces.is_empty() {
            return Ok(());
        }
        // Pages a readahead chunk holds are copied from it (the check below
        // applies to them as to pages read); the rest are read.
        let served = match &self.readahead {
            Some(ra) => {
                let mut pages: Vec<Vec<Option<&mut [u8]>>> =
                    runs.iter_mut().map(|r| r.data.chunks_exact_mut(PAGE_SIZE).map(Some).collect()).collect();
                let mut wants = Vec::with_capacity(gens.len());
                let mut g = 0;
                for p in &pieces {
                    for k in 0..p.pages {
                        let dst = pages[p.run][p.page + k].take().expect("each page once");
                        wants.push(Want { slot: p.slot + k as u64, generation: gens[g], dst });
                        g += 1;
                    }
                }
                ra.serve(&mut wants, next_gen)
            }
            None => vec![false; gens.len()],
        };
        // The pieces to read: (piece, its first page's index among all).
        let mut to_read: Vec<(Piece, usize)> = Vec::new();
        {
            let mut g = 0;
            for p in &pieces {
                for k in 0..p.pages {
                    if !served[g] {
                        match to_read.last_mut() {
                            Some((x, _))
                                if x.run == p.run
                                    && x.page + x.pages == p.page + k
                                    && x.slot + x.pages as u64 == p.slot + k as u64 =>
                            {
                                x.pages += 1
                            }
                            _ => to_read.push((Piece { page: p.page + k, pages: 1, slot: p.slot + k as u64, ..*p }, g)),
                        }
                    }
                    g += 1;
                }
            }
        }
        let mut page_results: Vec<std::result::Result<(), String>> = vec![Ok(()); gens.len()];
        if !to_read.is_empty() {
            let read: Vec<Piece> = to_read.iter().map(|x| x.0).collect();
            let results = self.read_pieces(runs, &read);
            // A piece of several pages that failed is read again page by
            // page: only the pages that cannot be read are lost (a file cut
            // short loses the pages past its end, not their neighbours).
            for (&(p, g0), res) in to_read.iter().zip(&results) {
                match res {
                    Ok(()) => {}
                    Err(e) if p.pages == 1 => page_results[g0] = Err(e.to_string()),
                    Err(_) => {
                        let single: Vec<Piece> = (0..p.pages)
                            .map(|k| Piece { run: p.run, page: p.page + k, pages: 1, slot: p.slot + k as u64 })
                            .collect();
                        let all: Vec<usize> = (0..single.len()).collect();
                        let again = self.read_bounced(runs, &single, &all);
                        self.counters.reads.fetch_add(single.len() as u64, Ordering::Relaxed);
                        for (k, r) in again.into_iter().enumerate() {
                            page_results[g0 + k] = r.map_err(|e| e.to_string());
                        }
                    }
                }
            }
        }
        // Each page read counts if its key still holds what was read (a
        // key deleted meanwhile is not held: Missing).
        let (mut read, mut lost) = (0u64, 0u64);
        let mut first_err = None;
        {
            let st = self.lock();
            let mut g = 0;
            for p in &pieces {
                let run = &mut runs[p.run];
                for k in 0..p.pages {
                    let still =
                        st.entry(run.keys[p.page + k]) == Entry::At { slot: p.slot + k as u64, generation: gens[g] };
                    run.got[p.page + k] = match (still, &page_results[g]) {
                        (false, _) => Got::Missing,
                        (true, Ok(())) => {
                            read += 1;
                            Got::Filled
                        }
                        (true, Err(e)) => {
                            first_err.get_or_insert_with(|| e.clone());
                            lost += 1;
                            Got::Lost
                        }
                    };
                    g += 1;
                }
            }
        }
        if let Some(err) = first_err {
            tracing::error!(%err, pages = lost, "file store: reads failed, pages lost");
        }
        let c = &self.counters;
        c.pages_read.fetch_add(read, Ordering::Relaxed);
        c.reads.fetch_add(to_read.len() as u64, Ordering::Relaxed);
        c.lost_pages.fetch_add(lost, Ordering::Relaxed);
        if let Some(ra) = &self.readahead {
            let lo = pieces.iter().map(|p| p.slot).min().unwrap_or(0);
            let hi = pieces.iter().map(|p| p.slot + p.pages as u64).max().unwrap_or(0);
            ra.advance(lo, hi, end, next_gen);
        }
        Ok(())
    }

    fn delete(&self, keys: &[u64]) {
        let mut st = self.lock();
        for &key in keys {
            st.forget(key);
        }
    }

    fn usage(&self) -> StoreUsage {
        let st = self.lock();
        StoreUsage {
            pages: st.pages,
            orig_bytes: st.pages * PAGE_SIZE as u64,
            used_bytes: st.space.used() * PAGE_SIZE as u64,
            capacity_bytes: self.config.capacity_bytes / PAGE_SIZE as u64 * PAGE_SIZE as u64,
        }
    }
}

impl Drop for FileStore {
    fn drop(&mut self) {
        match &self.named {
            Some(NamedFile { path, created: true }) => {
                if let Err(err) = std::fs::remove_file(path) {
                    tracing::warn!(%err, path = %path.display(), "file store: cannot remove its file");
                }
            }
            Some(NamedFile { path, created: false }) => {
                if let Err(err) = self.file.set_len(0) {
                    tracing::warn!(%err, path = %path.display(), "file store: cannot empty its file");
                }
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests;
