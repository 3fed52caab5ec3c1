//! The file store's readahead: what the kernel's swap cache does for a
//! sequential scan. When gets run through neighbouring slots of the file,
//! a thread of the store's own (`uhmm-file-ra`) reads the slots ahead of
//! them, a chunk at a time, into buffers of the store; a later get whose
//! pages lie in a chunk copies them from it (waiting for its read if it is
//! still in flight) instead of reading the disk, so the disk reads the
//! next chunk while the caller decodes and installs this one.
//!
//! A page is served from a chunk only if the page was stored before the
//! chunk's read was issued (its generation is older than the store's next
//! generation at that moment): a slot deleted and written again since is
//! read from the disk, never served stale. The get's own check that each
//! key still holds what it looked up applies as for a read. Deletes never
//! touch the readahead. The buffers hold at most
//! [`FileConfig::readahead_pages`](super::FileConfig::readahead_pages)
//! pages, plus the chunks whose read was in flight when they were dropped.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use uhmm::PAGE_SIZE;
use uhmm_sys::uring::{AlignedBuf, Op, run_blocking};

/// Pages of one chunk at most (one read).
pub(crate) const CHUNK_PAGES: usize = 512;

/// Gets in a row on neighbouring slots before the readahead starts.
const STREAK: u32 = 2;

/// The readahead of one store (see the module docs).
#[derive(Debug)]
pub(crate) struct Readahead {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Chunks buffered at most.
    max_chunks: usize,
    chunk: usize,
}

#[derive(Debug)]
struct Shared {
    file: File,
    state: Mutex<RaState>,
    /// Signalled when a chunk is queued or read, and at shutdown.
    changed: Condvar,
    /// Bytes of buffers held.
    buffer_bytes: AtomicU64,
    /// Pages read ahead.
    pages_read: AtomicU64,
    /// Pages served from a chunk.
    hits: AtomicU64,
}

#[derive(Debug, Default)]
struct RaState {
    chunks: Vec<Chunk>,
    /// Buffers of chunks dropped, for the next ones.
    spare: Vec<AlignedBuf>,
    next_id: u64,
    shutdown: bool,
    /// The slots of the last get, and how many gets in a row ran on
    /// neighbouring slots.
    last: Option<(u64, u64)>,
    streak: u32,
    /// One past the highest slot the scan reached.
    frontier: u64,
}

#[derive(Debug)]
struct Chunk {
    id: u64,
    start: u64,
    pages: usize,
    /// The store's next generation when the read was queued: pages stored
    /// with an older one were on the disk before the read.
    issued_gen: u32,
    /// The pages read: `None` until the read is done (the thread takes a
    /// buffer when it starts the read).
    buf: Option<AlignedBuf>,
    read: ReadState,
    served: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Queued,
    Reading,
    Done { ok: bool },
}

impl Chunk {
    fn end(&self) -> u64 {
        self.start + self.pages as u64
    }
}

/// The counters of a readahead.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RaStats {
    pub pages_read: u64,
    pub hits: u64,
    pub buffer_bytes: u64,
}

/// A page a get wants: its slot and generation, where it goes.
pub(crate) struct Want<'a> {
    pub slot: u64,
    pub generation: u32,
    pub dst: &'a mut [u8],
}

/// Whether generation `g` was handed out before `issued`, `next` being the
/// store's next generation now (generations wrap: a chunk older than 2^30
/// generations serves nothing).
fn stored_before(g: u32, issued: u32, next: u32) -> bool {
    let age = next.wrapping_sub(issued);
    let d = issued.wrapping_sub(g);
    age < 1 << 30 && d != 0 && d < 1 << 31
}

impl Readahead {
    /// A readahead of `pages` pages at most over `file` (a duplicate of
    /// the store's descriptor). Its thread starts with the first chunk.
    pub fn new(file: File, pages: usize) -> Readahead {
        let chunk = pages.clamp(1, CHUNK_PAGES);
        Readahead {
            shared: Arc::new(Shared {
                file,
                state: Mutex::default(),
                changed: Condvar::new(),
                buffer_bytes: AtomicU64::new(0),
                pages_read: AtomicU64::new(0),
                hits: AtomicU64::new(0),
            }),
            thread: Mutex::new(None),
            max_chunks: (pages / chunk).max(1),
            chunk,
        }
    }

    pub fn stats(&self) -> RaStats {
        let s = &self.shared;
        RaStats {
            pages_read: s.pages_read.load(Ordering::Relaxed),
            hits: s.hits.load(Ordering::Relaxed),
            buffer_bytes: s.buffer_bytes.load(Ordering::Relaxed),
        }
    }

    /// Copies the pages of `wants` that a chunk holds into their places,
    /// waiting for chunks in flight; `next_gen` is the store's next
    /// generation when the get looked its pages up. Returns which were
    /// served.
    pub fn serve(&self, wants: &mut [Want<'_>], next_gen: u32) -> Vec<bool> {
        let mut served = vec![false; wants.len()];
        let mut st = self.shared.lock();
        if st.chunks.is_empty() {
            return served;
        }
        for (i, w) in wants.iter_mut().enumerate() {
            while let Some(c) = st.chunks.iter_mut().find(|c| c.start <= w.slot && w.slot < c.end()) {
                match c.read {
                    ReadState::Queued | ReadState::Reading => {
                        st = self.shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    ReadState::Done { ok } => {
                        if ok && stored_before(w.generation, c.issued_gen, next_gen) {
                            let at = (w.slot - c.start) as usize * PAGE_SIZE;
                            let buf = c.buf.as_ref().expect("a chunk read holds its buffer");
                            w.dst.copy_from_slice(&buf[at..at + PAGE_SIZE]);
                            c.served += 1;
                            served[i] = true;
                        }
                        break;
                    }
                }
            }
        }
        // Chunks served whole are done with.
        let done: Vec<usize> = (0..st.chunks.len()).filter(|&i| st.chunks[i].served >= st.chunks[i].pages).collect();
        for i in done.into_iter().rev() {
            let c = st.chunks.swap_remove(i);
            self.recycle(&mut st, c);
        }
        let hits = served.iter().filter(|s| **s).count() as u64;
        self.shared.hits.fetch_add(hits, Ordering::Relaxed);
        served
    }

    /// Notes a get of slots `lo..hi`; while gets run through neighbouring
    /// slots, queues chunks ahead of the highest one reached, within the
    /// file's `end` slots. `next_gen`: the store's next generation now.
    pub fn advance(&self, lo: u64, hi: u64, end: u64, next_gen: u32) {
        let mut st = self.shared.lock();
        // Near the last get, or between it and what the readahead reaches
        // (a scan copied backwards in pieces faults downwards in each).
        let ahead = (self.max_chunks * self.chunk) as u64;
        let slack = (hi - lo).max(16);
        let near = st.last.is_some_and(|(l, h)| lo <= h.max(st.frontier) + ahead && hi + slack >= l);
        st.last = Some((lo, hi));
        if !near {
            st.streak = 0;
            st.frontier = hi;
            // Off the scan: chunks not in flight are of no more use.
            let idle: Vec<usize> = (0..st.chunks.len()).filter(|&i| st.chunks[i].read != ReadState::Reading).collect();
            for i in idle.into_iter().rev() {
                let c = st.chunks.swap_remove(i);
                self.recycle(&mut st, c);
            }
            return;
        }
        st.streak += 1;
        st.frontier = st.frontier.max(hi);
        if st.streak < STREAK {
            return;
        }
        // Chunks the scan left behind go.
        let behind = lo.saturating_sub(ahead);
        let stale: Vec<usize> = (0..st.chunks.len())
            .filter(|&i| st.chunks[i].end() <= behind && st.chunks[i].read != ReadState::Reading)
            .collect();
        for i in stale.into_iter().rev() {
            let c = st.chunks.swap_remove(i);
            self.recycle(&mut st, c);
        }
        // The next chunks follow those queued, from the scan's frontier on.
        let chunk = self.chunk as u64;
        let mut start = st.chunks.iter().map(Chunk::end).max().map_or(st.frontier, |e| e.max(st.frontier));
        let limit = st.frontier + ahead;
        let mut queued = false;
        while start < end.min(limit) && st.chunks.len() < self.max_chunks {
            {
                let pages = (end - start).min(chunk) as usize;
                let id = st.next_id;
                st.next_id += 1;
                st.chunks.push(Chunk {
                    id,
                    start,
                    pages,
                    issued_gen: next_gen,
                    buf: None,
                    read: ReadState::Queued,
                    served: 0,
                });
                queued = true;
            }
            start += chunk;
        }
        drop(st);
        if queued {
            self.start_thread();
            self.shared.changed.notify_all();
        }
    }

    /// Keeps the buffer of `c` for the next chunk (a chunk in flight keeps
    /// it until its read is done), and wakes the gets waiting for `c`:
    /// they read its pages themselves.
    fn recycle(&self, st: &mut RaState, c: Chunk) {
        if let Some(buf) = c.buf {
            keep(&self.shared, st, buf, self.max_chunks);
        }
        self.shared.changed.notify_all();
    }

    fn start_thread(&self) {
        let mut t = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if t.is_some() {
            return;
        }
        let shared = self.shared.clone();
        let (max_chunks, chunk) = (self.max_chunks, self.chunk);
        let spawned =
            std::thread::Builder::new().name("uhmm-file-ra".into()).spawn(move || reader(&shared, max_chunks, chunk));
        match spawned {
            Ok(handle) => *t = Some(handle),
            Err(err) => {
                // No thread: drop the chunks, gets read the disk.
                tracing::warn!(%err, "file store: no readahead thread");
                let mut st = self.shared.lock();
                st.chunks.clear();
                st.shutdown = true;
                self.shared.changed.notify_all();
            }
        }
    }
}

/// Keeps `buf` as a spare, or frees it if enough are kept.
fn keep(shared: &Shared, st: &mut RaState, buf: AlignedBuf, max_chunks: usize) {
    if st.spare.len() + st.chunks.len() < max_chunks {
        st.spare.push(buf);
    } else {
        shared.buffer_bytes.fetch_sub(buf.len() as u64, Ordering::Relaxed);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, RaState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The readahead thread: reads queued chunks, lowest first, into buffers
/// it allocates itself (a thread named `uhmm-…`: the preloaded library
/// never hands it memory of the program's heap, which uhmm may move).
fn reader(shared: &Shared, max_chunks: usize, chunk: usize) {
    let mut st = shared.lock();
    loop {
        if st.shutdown {
            return;
        }
        let next = st.chunks.iter_mut().filter(|c| c.read == ReadState::Queued).min_by_key(|c| c.start).map(|c| {
            c.read = ReadState::Reading;
            (c.id, c.start, c.pages)
        });
        let Some((id, start, pages)) = next else {
            st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        let spare = st.spare.pop();
        drop(st);
        let mut buf = spare.unwrap_or_else(|| {
            shared.buffer_bytes.fetch_add((chunk * PAGE_SIZE) as u64, Ordering::Relaxed);
            AlignedBuf::zeroed(chunk)
        });
        let res = {
            let mut ops = [Op::Read { offset: start * PAGE_SIZE as u64, buf: &mut buf[..pages * PAGE_SIZE] }];
            run_blocking(shared.file.as_fd(), &mut ops).pop().expect("one op")
        };
        if res.is_ok() {
            shared.pages_read.fetch_add(pages as u64, Ordering::Relaxed);
        }
        st = shared.lock();
        match st.chunks.iter_mut().find(|c| c.id == id) {
            Some(c) => {
                c.buf = Some(buf);
                c.read = ReadState::Done { ok: res.is_ok() };
            }
            None => keep(shared, &mut st, buf, max_chunks),
        }
        shared.changed.notify_all();
    }
}

impl Drop for Readahead {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_before_the_read_only() {
        assert!(stored_before(5, 10, 12));
        assert!(!stored_before(10, 10, 12), "stored as the read was queued");
        assert!(!stored_before(11, 10, 12), "stored after");
        assert!(stored_before(u32::MAX, 2, 3), "across the wrap");
        assert!(!stored_before(1, u32::MAX, 3), "after, across the wrap");
        assert!(!stored_before(5, 10, 10 + (1 << 30)), "a chunk too old serves nothing");
    }
}
