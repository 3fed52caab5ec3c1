//! Sampled hinting faults, for reads: a sample of resident pages is taken
//! out of the program's reach (made exclusive to the tier, so the pages
//! wait in uhmm's holding area, still in RAM), and the CPU fault that
//! takes one back tells the tier it was used — what NUMA balancing's
//! `prot_none` faults and DAMON's sampling do with the accessed bit the
//! kernel keeps from user space.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use uhmm::{AddressSpace, ExclusiveGrant, IntervalNotifierOps, InvalidateEvent, NotifierHandle, Owner, range_fault};

/// What the notifiers of the managed ranges heard: the runs the CPU took
/// back from the sample.
#[derive(Debug, Default)]
pub(super) struct Touched {
    runs: Mutex<Vec<Range<usize>>>,
    /// Set while the tier takes its own samples back (not a use).
    ignoring: AtomicBool,
}

impl IntervalNotifierOps for Touched {
    fn invalidate(&self, range: Range<usize>, event: InvalidateEvent) {
        if event == InvalidateEvent::Clear && !self.ignoring.load(Ordering::Relaxed) {
            self.runs.lock().unwrap_or_else(|e| e.into_inner()).push(range);
        }
    }
}

/// The sample out now, and what the CPU took back of it.
#[derive(Debug)]
pub(super) struct Hints {
    pub(super) owner: Owner,
    pub(super) touched: Arc<Touched>,
    notifiers: Vec<NotifierHandle>,
    /// The runs made exclusive (their grants dropped: the pages wait for
    /// a CPU access or for [`Hints::take_back`]).
    out: Vec<Range<usize>>,
}

impl Hints {
    pub(super) fn new() -> Hints {
        Hints { owner: Owner::new(), touched: Arc::default(), notifiers: Vec::new(), out: Vec::new() }
    }

    /// Listens to `range` (a managed range).
    pub(super) fn watch(&mut self, space: &AddressSpace, range: Range<usize>) {
        let ops: Arc<dyn IntervalNotifierOps> = self.touched.clone();
        self.notifiers.push(space.insert_notifier(range, Arc::downgrade(&ops)));
    }

    /// Stops listening to `range`.
    pub(super) fn unwatch(&mut self, range: &Range<usize>) {
        self.notifiers.retain(|n| n.interval() != *range);
        self.out.retain(|r| !(r.start >= range.start && r.end <= range.end));
    }

    /// The runs the CPU used since the last call.
    pub(super) fn drain_touched(&self) -> Vec<Range<usize>> {
        std::mem::take(&mut *self.touched.runs.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Pages out in the sample now.
    pub(super) fn pages_out(&self) -> usize {
        self.out.iter().map(|r| r.len() / uhmm::PAGE_SIZE).sum()
    }

    /// Takes back every run still out (not a use); returns them.
    pub(super) fn take_back(&mut self, space: &AddressSpace) -> Vec<Range<usize>> {
        self.touched.ignoring.store(true, Ordering::Relaxed);
        let out = std::mem::take(&mut self.out);
        for run in &out {
            // A run whose region went away is simply forgotten.
            if let Ok(access) = range_fault(space, run.clone(), false, self.owner) {
                drop(access.release());
            }
        }
        self.touched.ignoring.store(false, Ordering::Relaxed);
        out
    }

    /// Sends `run` out as part of the sample. Returns the pages sent.
    pub(super) fn send(&mut self, space: &AddressSpace, run: Range<usize>) -> usize {
        match space.make_device_exclusive(run.clone(), self.owner) {
            Ok(grant) => {
                let n = grant.cpages();
                drop::<ExclusiveGrant>(grant);
                if n > 0 {
                    self.out.push(run);
                }
                n
            }
            Err(_) => 0,
        }
    }
}
