//! A second CPU for finalize's work in bulk: `UFFDIO_COPY` allocates and
//! fills pages on the calling CPU, so a big migration back to RAM from
//! driver memory hands part of its copies to a helper thread and does the
//! rest itself, both at once; and emptying the staging slots of a big
//! migration (freeing the pages that moved to a device) runs there too,
//! while the migration goes on with its next chunks (a bulk migration waits
//! for it before it returns).
//!
//! The helper owns nothing of the address space but the userfaultfd; it
//! never waits on a page lock or a handler thread, so any thread — a fault
//! handler included — may wait for it.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rustix::io::Errno;

use crate::staging::Slots;
use crate::sys::PAGE_SIZE;
use crate::sys::uffd::Uffd;

/// Copies smaller than this many pages are not split: handing work to the
/// helper costs a cross-CPU wake-up each way (tens of microseconds in a VM).
pub(crate) const SPLIT_MIN_PAGES: usize = 128;

/// One contiguous copy: `len` bytes from `src` (driver memory, or staged
/// pages being put back) into the empty, locked pages at `dst` (a region).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CopyRun {
    pub(crate) dst: usize,
    pub(crate) src: usize,
    pub(crate) len: usize,
}

enum Job {
    Copy {
        runs: Vec<CopyRun>,
        done: Sender<Vec<usize>>,
    },
    /// Slots to empty and give back (dropping them does both).
    Release(Slots),
}

/// The helper thread, started at first use.
#[derive(Debug)]
pub(crate) struct Copier {
    uffd: Arc<Uffd>,
    helper: Mutex<Option<(Sender<Job>, JoinHandle<()>)>>,
}

/// Copies running on the helper.
#[derive(Debug)]
pub(crate) struct Pending {
    done: Receiver<Vec<usize>>,
    runs: usize,
}

impl Pending {
    /// Waits for the helper; the bytes copied of each run. A helper that
    /// died reports nothing copied.
    pub(crate) fn wait(self) -> Vec<usize> {
        self.done.recv().unwrap_or_else(|_| vec![0; self.runs])
    }
}

impl Copier {
    pub(crate) fn new(uffd: Arc<Uffd>) -> Copier {
        Copier { uffd, helper: Mutex::new(None) }
    }

    /// Starts `runs` on the helper; `None` when it cannot be had (the
    /// caller copies them itself).
    pub(crate) fn start(&self, runs: Vec<CopyRun>) -> Option<Pending> {
        let (done, rx) = channel();
        let n = runs.len();
        self.send(Job::Copy { runs, done }).ok()?;
        Some(Pending { done: rx, runs: n })
    }

    /// Empties and gives back `slots` on the helper when it holds many
    /// pages and its arena has few sets being emptied already; here
    /// otherwise.
    pub(crate) fn release(&self, slots: Slots) {
        if slots.len() < SPLIT_MIN_PAGES {
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
        let mut helper = self.helper.lock().unwrap_or_else(|e| e.into_inner());
        if helper.is_none() {
            let (tx, rx) = channel::<Job>();
            let uffd = self.uffd.clone();
            let thread = std::thread::Builder::new().name("uhmm-copier".into()).spawn(move || {
                while let Ok(job) = rx.recv() {
                    match job {
                        Job::Copy { runs, done } => {
                            let _ = done.send(runs.iter().map(|r| copy_in(&uffd, *r)).collect());
                        }
                        Job::Release(slots) => drop(slots),
                    }
                }
            });
            match thread {
                Ok(t) => *helper = Some((tx, t)),
                Err(err) => {
                    tracing::warn!(%err, "no helper thread: finalize works on one CPU");
                    return Err(job);
                }
            }
        }
        match helper.as_ref() {
            Some((queue, _)) => queue.send(job).map_err(|e| e.0),
            None => Err(job),
        }
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

/// Copies `run` with `UFFDIO_COPY`, without waking (the caller unlocks,
/// then wakes), retrying a few times. Returns the bytes copied from the
/// start of the run; the rest stays empty.
pub(crate) fn copy_in(uffd: &Uffd, run: CopyRun) -> usize {
    let CopyRun { dst, src, len } = run;
    let mut done = 0;
    for attempt in 0..8u32 {
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
                std::thread::sleep(std::time::Duration::from_micros(10 << attempt));
            }
        }
    }
    done.min(len)
}
