//! A second CPU for finalize's work in bulk: `UFFDIO_COPY` allocates and
//! fills pages on the calling CPU, so a big migration back to RAM from
//! driver memory shares its copies with a helper thread, each claiming the
//! next piece as it goes; and emptying the staging slots of a big
//! migration (freeing the pages that moved to a device) runs there too,
//! while the migration goes on with its next chunks (a bulk migration waits
//! for it before it returns).
//!
//! The helper owns nothing of the address space but the userfaultfd; it
//! never waits on a page lock or a handler thread, so any thread — a fault
//! handler included — may wait for it.

use std::ops::Range;
use std::sync::mpsc::{RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::io::Errno;

use crate::staging::{Arena, Slots};
use uhmm_sys::PAGE_SIZE;
use uhmm_sys::mman::Mapping;
use uhmm_sys::pagemap::{Pagemap, Query, category};
use uhmm_sys::stall::Pause;
use uhmm_sys::uffd::Uffd;

/// Copies and slot sets smaller than this many pages (a staging batch)
/// stay on the caller: handing work to the helper costs a cross-CPU
/// wake-up each way (30–60 µs in this project's VM), about what the helper
/// would save on them. At 128 pages, 512 KiB migrations cost 950–1,240 ns
/// a page to the device and 1,410–1,700 back; at 512, 600–780 and
/// 790–1,070 (bulk harness, three alternations).
pub(crate) const SPLIT_MIN_PAGES: usize = 512;

/// Pages in one piece of a shared copy: small enough that the thread that
/// finishes last finishes soon after the other, big enough that each
/// `UFFDIO_COPY` call does much more than enter the kernel.
pub(crate) const PIECE_PAGES: usize = 64;

/// Pages in one piece of a fault window's copy through kept pages, shared
/// with the helper (a bulk copy's pieces are whole staging batches). A
/// sequential scan of 1 GiB (4 MiB reads, two read-ahead windows, three
/// alternations of four runs) read 3.5–5.7 GB/s with the copy on the
/// handler alone, 4.5–5.5 in pieces of 128 pages; in another alternation
/// pieces of 128 read 5.1–6.6, of 64 4.7–5.9, of 256 4.5–6.9.
pub(crate) const FAULT_PIECE_PAGES: usize = 128;

/// One contiguous copy: `len` bytes from `src` (driver memory, or staged
/// pages being put back) into the empty, locked pages at `dst` (a region).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CopyRun {
    pub(crate) dst: usize,
    pub(crate) src: usize,
    pub(crate) len: usize,
    /// Through kept staging pages instead of `UFFDIO_COPY`.
    pub(crate) via: Option<Via>,
}

/// A copy through kept pages: the data goes from source mapping `src`
/// (of the queue's `Kept`) at `src_off` into kept slot `slot`, whose pages
/// then move into the region.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Via {
    pub(crate) src: usize,
    pub(crate) src_off: usize,
    pub(crate) slot: usize,
}

/// Kept staging pages a queue copies through, and its source mappings.
#[derive(Debug)]
pub(crate) struct Kept {
    pub(crate) slots: Slots,
    pub(crate) srcs: Vec<Arc<Mapping>>,
    /// To tell whether a move that failed moved pages anyway.
    pub(crate) pagemap: Arc<Pagemap>,
}

/// Copies in shared by the caller and the helper: each claims the next
/// piece when it is free, so both finish at about the same time, whatever
/// else each had to do first (a fixed split leaves one of them waiting).
/// The caller claims from the front and the helper from the back, so the
/// two fill different page tables and do not contend on their locks.
#[derive(Debug)]
pub(crate) struct CopyQueue {
    pieces: Vec<CopyRun>,
    /// How copies into kept pages write them.
    writes: Writes,
    /// Taken (and the slots given back) by `finish`: the queue itself may
    /// sit in the helper's channel for long after, behind other jobs.
    kept: Mutex<Option<Arc<Kept>>>,
    state: Mutex<QueueState>,
    all_finished: Condvar,
}

#[derive(Debug)]
struct QueueState {
    unclaimed: Range<usize>,
    /// Bytes copied of each piece, from its start.
    copied: Vec<usize>,
    finished: usize,
    /// Bytes the helper copied, all pieces together.
    helper_bytes: usize,
    /// Whether the caller waits for the last pieces.
    waiting: bool,
}

/// A piece being copied; dropping it records the piece finished (on an
/// unwind too, so a waiter never waits for a piece nobody copies).
struct Claim<'a> {
    queue: &'a CopyQueue,
    piece: usize,
    by_helper: bool,
    bytes: usize,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let q = self.queue;
        let mut state = q.lock();
        state.copied[self.piece] = self.bytes;
        state.finished += 1;
        if self.by_helper {
            state.helper_bytes += self.bytes;
        }
        if state.finished == q.pieces.len() && state.waiting {
            q.all_finished.notify_all();
        }
    }
}

impl CopyQueue {
    /// A queue of `pieces`. A `big` copy (one worth sharing with the
    /// helper, whether it is shared or not) writes kept pages past the
    /// caches ([`Writes`]).
    pub(crate) fn new(pieces: Vec<CopyRun>, kept: Option<Kept>, big: bool) -> CopyQueue {
        let state = QueueState {
            unclaimed: 0..pieces.len(),
            copied: vec![0; pieces.len()],
            finished: 0,
            helper_bytes: 0,
            waiting: false,
        };
        let kept = Mutex::new(kept.map(Arc::new));
        let writes = if big { Writes::Streamed } else { Writes::Cached };
        CopyQueue { pieces, writes, kept, state: Mutex::new(state), all_finished: Condvar::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Copies pieces until none is left to claim: the helper from the
    /// back, the caller from the front.
    fn work(&self, uffd: &Uffd, by_helper: bool) {
        loop {
            let claimed = {
                let mut state = self.lock();
                if by_helper { state.unclaimed.next_back() } else { state.unclaimed.next() }
            };
            let Some(piece) = claimed else { return };
            let mut claim = Claim { queue: self, piece, by_helper, bytes: 0 };
            let run = self.pieces[piece];
            let kept = run.via.and_then(|_| self.kept.lock().unwrap_or_else(|e| e.into_inner()).clone());
            claim.bytes = match (run.via, kept) {
                (Some(via), Some(kept)) => copy_via(uffd, run, via, &kept, self.writes),
                _ => copy_in(uffd, run),
            };
        }
    }

    /// The caller's share: copies pieces until none is left, waits for the
    /// helper's, and returns the bytes copied of each piece, the bytes the
    /// helper copied and how long the caller waited for it.
    pub(crate) fn finish(&self, uffd: &Uffd) -> (Vec<usize>, usize, Duration) {
        self.work(uffd, false);
        let mut state = self.lock();
        let mut waited = Duration::ZERO;
        if state.finished < self.pieces.len() {
            let since = Instant::now();
            while state.finished < self.pieces.len() {
                state.waiting = true;
                state = self.all_finished.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            waited = since.elapsed();
        }
        // No piece is being copied: the kept slots go back now.
        drop(self.kept.lock().unwrap_or_else(|e| e.into_inner()).take());
        (std::mem::take(&mut state.copied), state.helper_bytes, waited)
    }
}

enum Job {
    /// Pieces of a copy in to help with.
    Copy(Arc<CopyQueue>),
    /// Slots to empty and give back (dropping them does both).
    Release(Slots),
}

/// The helper thread, started at first use.
#[derive(Debug)]
pub(crate) struct Copier {
    uffd: Arc<Uffd>,
    /// The stage, whose kept batches the helper empties once unused.
    stage: Arc<Arena>,
    /// The CPUs the helper runs on: those of the thread that made the
    /// address space. The thread that starts the helper may be pinned
    /// elsewhere (a fault handler on `Config::handler_cpus`), and a helper
    /// that inherited its CPU would share that CPU instead of helping.
    cpus: Vec<usize>,
    helper: Mutex<Option<(Sender<Job>, JoinHandle<()>)>>,
    /// On after a caller waited a stall's length for the helper's last
    /// piece: the host took the helper's vCPU away mid-piece (steal time).
    /// A caller copying alone is then faster than one that waits on a
    /// stopped helper again and again.
    paused: Pause,
}

impl Copier {
    pub(crate) fn new(uffd: Arc<Uffd>, stage: Arc<Arena>, cpus: Vec<usize>) -> Copier {
        Copier { uffd, stage, cpus, helper: Mutex::new(None), paused: Pause::new() }
    }

    /// Whether copies are worth sharing with the helper now: not while
    /// sharing is paused after a stall.
    pub(crate) fn helpful(&self) -> bool {
        !self.paused.on()
    }

    /// Records that a caller waited `wait` for the helper's last piece;
    /// true when that was a stall, and sharing pauses.
    pub(crate) fn waited(&self, wait: Duration) -> bool {
        self.paused.waited(wait)
    }

    /// Has the helper work on `queue` beside the caller (who copies
    /// everything itself when there is no helper).
    pub(crate) fn share(&self, queue: &Arc<CopyQueue>) {
        let _ = self.send(Job::Copy(queue.clone()));
    }

    /// Empties and gives back `slots` on the helper when it holds many
    /// pages to empty and its arena has few sets being emptied already;
    /// here otherwise. Slots all of whose batches are kept (a migration to
    /// a device) have nothing to empty: handing them over would only cost
    /// the wake-up the caller then waits for (8 MiB to the device, paired
    /// runs: 6–7% less a page; 32–128 MiB 2–4%).
    pub(crate) fn release(&self, slots: Slots) {
        if slots.len() < SPLIT_MIN_PAGES || slots.keeps_all() {
            if slots.keeps() {
                // The helper empties kept batches once unused.
                drop(self.started());
            }
            return drop(slots);
        }
        // A job that cannot be sent is dropped, and its slots with it.
        if let Ok(deferred) = slots.defer() {
            let _ = self.send(Job::Release(deferred));
        }
    }

    /// Queues `job`, starting the helper at first use; gives the job back
    /// when there is no helper.
    fn send(&self, job: Job) -> Result<(), Job> {
        match self.started().as_ref() {
            Some((queue, _)) => queue.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }

    /// The helper, started at first use (`None` when it cannot be).
    fn started(&self) -> std::sync::MutexGuard<'_, Option<(Sender<Job>, JoinHandle<()>)>> {
        let mut helper = self.helper.lock().unwrap_or_else(|e| e.into_inner());
        if helper.is_none() {
            let (tx, rx) = channel::<Job>();
            let (uffd, stage, cpus) = (self.uffd.clone(), self.stage.clone(), self.cpus.clone());
            let thread = std::thread::Builder::new().name("uhmm-copier".into()).spawn(move || {
                if let Err(err) = uhmm_sys::process::set_thread_cpus(&cpus) {
                    tracing::warn!(%err, ?cpus, "the copy helper keeps the CPUs of the thread that started it");
                }
                loop {
                    match rx.recv_timeout(stage.keep_for()) {
                        Ok(Job::Copy(queue)) => queue.work(&uffd, true),
                        Ok(Job::Release(slots)) => drop(slots),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    stage.trim_kept();
                }
            });
            match thread {
                Ok(t) => *helper = Some((tx, t)),
                Err(err) => tracing::warn!(%err, "no helper thread: finalize works on one CPU"),
            }
        }
        helper
    }
}

impl Copier {
    /// Forgets the helper without signalling or joining it: in a forked
    /// child the thread lives in the parent only.
    pub(crate) fn abandon(&self) {
        std::mem::forget(self.helper.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        if let Some((queue, thread)) = self.helper.lock().unwrap_or_else(|e| e.into_inner()).take() {
            drop(queue);
            if thread.join().is_err() {
                tracing::error!("the copy helper thread panicked");
            }
        }
    }
}

/// How a copy into kept pages writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writes {
    /// Through the caches: a copy the caller does alone is at most one
    /// piece, whose data a small migration has usually just read or written
    /// and which the program reads next. A 2 MiB round trip measured about
    /// 300 against 450 ns a page to the device, 280 against 350 back.
    Cached,
    /// Past the caches (non-temporal stores): a copy big enough to share
    /// has a destination not in the caches anyway.
    Streamed,
}

/// Copies `run` into kept slot pages and moves them into the region,
/// without waking; what that cannot map goes by [`copy_in`]. Returns the
/// bytes mapped from the start of the run.
fn copy_via(uffd: &Uffd, run: CopyRun, via: Via, kept: &Kept, writes: Writes) -> usize {
    let stage = kept.slots.mapping();
    let src = &kept.srcs[via.src];
    let copied = match writes {
        Writes::Cached => src.copy_to(via.src_off, stage, via.slot, run.len),
        Writes::Streamed => src.stream_to(via.src_off, stage, via.slot, run.len),
    };
    let moved = match copied {
        Ok(()) => match uffd.move_pages(run.dst, stage, via.slot, run.len, false, true) {
            Ok(_) => return run.len,
            Err(e) => {
                let slot = stage.addr() + via.slot + e.done;
                e.done + moved_anyway(&kept.pagemap, slot, run.dst + e.done, run.len - e.done)
            }
        },
        Err(err) => {
            tracing::warn!(%err, "copying into kept pages failed");
            0
        }
    };
    let rest = CopyRun { dst: run.dst + moved, src: run.src + moved, len: run.len - moved, via: None };
    moved + copy_in(uffd, rest)
}

/// Bytes of a failed move of `len` bytes from the slots at `slot` to `dst`
/// (locked pages of a region) that moved anyway, from the start: the
/// kernel (6.18) has answered `EEXIST`, nothing done, to a move of part of
/// a kept huge page whose pages had all moved. The page tables decide: a
/// page moved when its slot is empty and its destination present (nothing
/// else fills a locked destination).
pub(crate) fn moved_anyway(pagemap: &Pagemap, slot: usize, dst: usize, len: usize) -> usize {
    let present = Query::any_of(category::PRESENT | category::SWAPPED);
    let mut runs = Vec::new();
    if pagemap.scan(slot, slot + len, present, &mut runs).is_err() {
        return 0;
    }
    let slots_empty = runs.first().map_or(len, |r| r.start - slot);
    runs.clear();
    if pagemap.scan(dst, dst + slots_empty, present, &mut runs).is_err() {
        return 0;
    }
    // The destination's leading present pages (a run may be reported in
    // pieces).
    let mut moved = 0;
    for r in &runs {
        if r.start != dst + moved {
            break;
        }
        moved = r.end - dst;
    }
    if moved > 0 {
        tracing::debug!(moved, "a failed move into a region moved pages anyway");
    }
    moved
}

/// Tries of a `UFFDIO_COPY` from driver memory before the rest of the run
/// is left to the caller (which keeps those pages on the device): the
/// kernel short of memory for a moment, with the backoff below about 2.5 ms.
const COPY_ATTEMPTS: u32 = 8;

/// The first wait between those tries; it doubles each time.
const COPY_BACKOFF: std::time::Duration = std::time::Duration::from_micros(10);

/// Copies `run` with `UFFDIO_COPY`, without waking (the caller unlocks,
/// then wakes), retrying a few times. Returns the bytes copied from the
/// start of the run; the rest stays empty.
pub(crate) fn copy_in(uffd: &Uffd, run: CopyRun) -> usize {
    let CopyRun { dst, src, len, .. } = run;
    let mut done = 0;
    for attempt in 0..COPY_ATTEMPTS {
        if done >= len {
            return len;
        }
        let e = match uffd.copy(dst + done, (src + done) as *const u8, len - done, true) {
            Ok(_) => return len,
            Err(e) => e,
        };
        done += e.done;
        match e.errno {
            // A page is there already: an earlier attempt's (nothing else
            // fills a locked entry).
            Errno::EXIST => done += PAGE_SIZE,
            Errno::AGAIN if e.done > 0 => {}
            errno => {
                tracing::warn!(%errno, addr = dst + done, "UFFDIO_COPY from driver memory failed; retrying");
                std::thread::sleep(COPY_BACKOFF * (1 << attempt));
            }
        }
    }
    done.min(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BATCH_PAGES;

    /// Waits (10 s at most) until the helper has given back every set.
    fn settled(stage: &Arena) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stage.releasing() > 0 {
            assert!(std::time::Instant::now() < deadline, "the helper never gave the set back");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn slot_sets_all_kept_are_given_back_on_the_caller() {
        let uffd = Arc::new(
            Uffd::open(0, uhmm_sys::uffd::Accept::FullOrUserModeOnly)
                .expect("userfaultfd (needed by uhmm; see README)"),
        );
        let bytes = 4 * BATCH_PAGES * PAGE_SIZE;
        let stage = Arc::new(Arena::new(bytes, None, bytes / 2).unwrap()); // keeps two batches
        let copier = Copier::new(uffd, stage.clone(), uhmm_sys::process::allowed_cpus().unwrap());
        let mut slots = stage.alloc(2 * BATCH_PAGES).unwrap();
        slots.populate(0..2 * BATCH_PAGES);
        slots.keep_batch_of(0);
        slots.keep_batch_of(BATCH_PAGES);
        copier.release(slots);
        // Nothing to empty: given back by the time `release` returns, not
        // handed to the helper.
        assert_eq!(stage.releasing(), 0, "a kept set was handed to the helper");
        let mut kept = stage.take_kept(8).expect("kept on the caller");
        assert_eq!(kept.len(), 2 * BATCH_PAGES);
        // One batch of two kept: the other must be emptied, on the helper.
        kept.keep_batch_of(0);
        copier.release(kept);
        settled(&stage);
        let back = stage.take_kept(8).expect("the marked batch kept");
        assert_eq!(back.len(), BATCH_PAGES, "the unmarked batch was emptied, not kept");
        drop(back);
        // All marked, but room to keep only two of three batches: one must
        // be emptied, so the set goes to the helper.
        let mut three = stage.alloc(3 * BATCH_PAGES).unwrap();
        three.populate(0..3 * BATCH_PAGES);
        (0..3).for_each(|b| three.keep_batch_of(b * BATCH_PAGES));
        assert!(!three.keeps_all(), "no room for a third kept batch");
        copier.release(three);
        settled(&stage);
        assert_eq!(stage.take_kept(8).map(|k| k.len()), Some(2 * BATCH_PAGES), "as many kept as there is room for");
    }
}
