//! Interval notifiers (`mmu_interval_notifier`): how a device that mirrors
//! the CPU page table learns that pages of an interval are about to move, go
//! away or change protection, and the sequence protocol
//! (`read_begin` / `read_retry`) that keeps its mirror from racing them.
//!
//! A driver's fault path, as dmirror's:
//!
//! ```text
//! loop {
//!     let seq = notifier.read_begin();            // waits out running invalidations
//!     let pages = range_fault(...)?.release();   // fault the range in
//!     let mut table = mirror.lock();
//!     if notifier.read_retry(seq) { continue; }  // an invalidation ran meanwhile
//!     table.insert(pages);                        // under the lock the callback takes
//!     break;
//! }
//! ```
//!
//! uhmm calls [`IntervalNotifierOps::invalidate`] before it unmaps pages for
//! a migration (`setup`, `migrate_device_range`), before it changes a
//! protection, and before it unmaps a region. The callback takes the
//! driver's mirror lock and drops the entries of the range; after it
//! returns, the pages may change. A migration's event carries its owner, so
//! a driver can ignore the device pages of its own migrations (it updates
//! those in `finalize_and_map`), as dmirror does.

use std::ops::Range;
use std::sync::{Arc, RwLock, Weak};

use smallvec::SmallVec;

use crate::sync::{AtomicU32, AtomicU64, Ordering, backoff};

use crate::page::Owner;

/// Why a range is being invalidated (`enum mmu_notifier_event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidateEvent {
    /// A migration is unmapping the pages (`MMU_NOTIFY_MIGRATE`); `owner` is
    /// the migration's owner.
    Migrate {
        /// The migration's owner token.
        owner: Owner,
    },
    /// `owner`'s device is being given exclusive access to the pages
    /// (`MMU_NOTIFY_EXCLUSIVE`); other devices drop them.
    Exclusive {
        /// The device taking exclusive access.
        owner: Owner,
    },
    /// The CPU takes pages back from a device's exclusive access
    /// (`MMU_NOTIFY_CLEAR`): the device drops them.
    Clear,
    /// The protection of the range changes (`MMU_NOTIFY_PROTECTION_VMA`).
    Protection,
    /// The range is being unmapped (`MMU_NOTIFY_UNMAP`).
    Unmap,
}

/// What a mirroring driver does on invalidation.
pub trait IntervalNotifierOps: Send + Sync {
    /// Pages of `range` (clipped to the notifier's interval) are about to
    /// change: take the mirror lock, drop the entries. Must not fault on or
    /// lock uhmm pages (the caller holds page locks).
    fn invalidate(&self, range: Range<usize>, event: InvalidateEvent);
}

/// An interval of the address space that a device mirrors.
pub struct IntervalNotifier {
    interval: Range<usize>,
    ops: Weak<dyn IntervalNotifierOps>,
    /// Bumped at the start of every invalidation.
    seq: AtomicU64,
    /// Invalidations running now.
    active: AtomicU32,
}

impl std::fmt::Debug for IntervalNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntervalNotifier")
            .field("interval", &self.interval)
            .field("seq", &self.seq.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl IntervalNotifier {
    /// The interval it watches.
    pub fn interval(&self) -> Range<usize> {
        self.interval.clone()
    }

    /// `mmu_interval_read_begin`: waits until no invalidation runs, and
    /// returns the sequence to check with [`IntervalNotifier::read_retry`].
    pub fn read_begin(&self) -> u64 {
        let mut spins = 0u32;
        loop {
            let seq = self.seq.load(Ordering::SeqCst);
            if self.active.load(Ordering::SeqCst) == 0 {
                return seq;
            }
            spins += 1;
            backoff(spins);
        }
    }

    /// `mmu_interval_read_retry`: whether an invalidation started since
    /// `seq` was read (the caller must then fault again). Call it under the
    /// lock the invalidate callback takes.
    pub fn read_retry(&self, seq: u64) -> bool {
        self.seq.load(Ordering::SeqCst) != seq || self.active.load(Ordering::SeqCst) != 0
    }
}

/// A registered notifier; unregistered when dropped.
#[derive(Debug)]
pub struct NotifierHandle {
    notifier: Arc<IntervalNotifier>,
    list: Weak<NotifierList>,
}

impl std::ops::Deref for NotifierHandle {
    type Target = IntervalNotifier;
    fn deref(&self) -> &IntervalNotifier {
        &self.notifier
    }
}

impl Drop for NotifierHandle {
    fn drop(&mut self) {
        if let Some(list) = self.list.upgrade() {
            list.remove(&self.notifier);
        }
    }
}

/// The notifiers of one address space.
#[derive(Debug, Default)]
pub(crate) struct NotifierList {
    list: RwLock<Vec<Arc<IntervalNotifier>>>,
}

impl NotifierList {
    pub(crate) fn insert(
        self: &Arc<Self>,
        interval: Range<usize>,
        ops: Weak<dyn IntervalNotifierOps>,
    ) -> NotifierHandle {
        let notifier = Arc::new(IntervalNotifier { interval, ops, seq: AtomicU64::new(0), active: AtomicU32::new(0) });
        self.list.write().unwrap_or_else(|e| e.into_inner()).push(notifier.clone());
        NotifierHandle { notifier, list: Arc::downgrade(self) }
    }

    fn remove(&self, n: &Arc<IntervalNotifier>) {
        self.list.write().unwrap_or_else(|e| e.into_inner()).retain(|m| !Arc::ptr_eq(m, n));
    }

    /// Starts invalidating `range`: every overlapping notifier's sequence
    /// moves and its callback runs. The returned guard ends the
    /// invalidation when dropped, after the caller changed the pages.
    pub(crate) fn invalidate(&self, range: Range<usize>, event: InvalidateEvent) -> Invalidation {
        let hit: SmallVec<[Arc<IntervalNotifier>; 2]> = self
            .list
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|n| n.interval.start < range.end && range.start < n.interval.end)
            .cloned()
            .collect();
        for n in &hit {
            n.active.fetch_add(1, Ordering::SeqCst);
            n.seq.fetch_add(1, Ordering::SeqCst);
            if let Some(ops) = n.ops.upgrade() {
                ops.invalidate(range.start.max(n.interval.start)..range.end.min(n.interval.end), event);
            }
        }
        Invalidation { hit }
    }
}

/// A running invalidation (between `invalidate_range_start` and `_end`).
#[derive(Debug)]
#[must_use = "the invalidation ends when this is dropped"]
pub(crate) struct Invalidation {
    /// The notifiers told (usually a device or two: inline, no allocation).
    hit: SmallVec<[Arc<IntervalNotifier>; 2]>,
}

impl Drop for Invalidation {
    fn drop(&mut self) {
        for n in &self.hit {
            n.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(Range<usize>, InvalidateEvent)>>);
    impl IntervalNotifierOps for Recorder {
        fn invalidate(&self, range: Range<usize>, event: InvalidateEvent) {
            self.0.lock().unwrap().push((range, event));
        }
    }

    #[test]
    fn sequence_protocol() {
        let list = Arc::new(NotifierList::default());
        let rec = Arc::new(Recorder::default());
        let weak: Weak<dyn IntervalNotifierOps> = Arc::downgrade(&rec) as Weak<Recorder>;
        let n = list.insert(0x1000..0x9000, weak);
        let seq = n.read_begin();
        assert!(!n.read_retry(seq), "nothing happened");
        // Outside the interval: nothing.
        drop(list.invalidate(0x9000..0xA000, InvalidateEvent::Unmap));
        assert!(!n.read_retry(seq));
        // Overlapping: clipped range, retry while running and after.
        let inv = list.invalidate(0x8000..0xA000, InvalidateEvent::Protection);
        assert!(n.read_retry(seq));
        assert_eq!(rec.0.lock().unwrap().as_slice(), &[(0x8000..0x9000, InvalidateEvent::Protection)]);
        drop(inv);
        assert!(n.read_retry(seq), "an invalidation ran since read_begin");
        let seq2 = n.read_begin();
        assert!(!n.read_retry(seq2));
        drop(n);
        drop(list.invalidate(0x1000..0x2000, InvalidateEvent::Unmap));
        assert_eq!(rec.0.lock().unwrap().len(), 1, "a dropped notifier is not called");
    }

    #[test]
    fn read_begin_waits_for_running_invalidations() {
        let list = Arc::new(NotifierList::default());
        let rec = Arc::new(Recorder::default());
        let weak: Weak<dyn IntervalNotifierOps> = Arc::downgrade(&rec) as Weak<Recorder>;
        let n = Arc::new(list.insert(0..usize::MAX, weak));
        let inv = list.invalidate(0..0x1000, InvalidateEvent::Unmap);
        let t = {
            let n = n.clone();
            std::thread::spawn(move || n.read_begin())
        };
        std::thread::sleep(Duration::from_millis(30));
        assert!(!t.is_finished(), "read_begin must wait while an invalidation runs");
        drop(inv);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !t.is_finished() {
            assert!(std::time::Instant::now() < deadline, "read_begin hung");
            std::thread::sleep(Duration::from_millis(1));
        }
        let seq = t.join().unwrap();
        assert!(!n.read_retry(seq));
    }
}

/// A loom model of the sequence protocol as a mirror uses it (dmirror's
/// `range_fault` against an invalidation): whatever the interleaving, the
/// mirror never keeps an entry older than the page. Run with
/// `RUSTFLAGS="--cfg loom" cargo test -p uhmm --lib --release loom`.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Mutex;

    /// The device: its mirror entry for the one page (the page's version).
    struct Mirror(Mutex<Option<u64>>);

    impl IntervalNotifierOps for Mirror {
        fn invalidate(&self, _: Range<usize>, _: InvalidateEvent) {
            *self.0.lock().unwrap() = None;
        }
    }

    #[test]
    fn loom_a_mirror_never_keeps_a_stale_entry() {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(3);
        b.check(|| {
            let page = Arc::new(AtomicU64::new(1));
            let mirror = Arc::new(Mirror(Mutex::new(None)));
            let list = Arc::new(NotifierList::default());
            let ops: Arc<dyn IntervalNotifierOps> = mirror.clone();
            let handle = list.insert(0..4096, Arc::downgrade(&ops));
            let (l2, p2) = (list.clone(), page.clone());
            // The CPU side: the page changes inside an invalidation.
            let cpu = loom::thread::spawn(move || {
                let inv = l2.invalidate(0..4096, InvalidateEvent::Clear);
                p2.store(2, Ordering::SeqCst);
                drop(inv);
            });
            // The device: read_begin, read the page, then install under the
            // mirror lock unless read_retry says to fault again.
            for _attempt in 0..2 {
                let seq = handle.read_begin();
                let v = page.load(Ordering::SeqCst);
                let mut entry = mirror.0.lock().unwrap();
                if !handle.read_retry(seq) {
                    *entry = Some(v);
                    break;
                }
            }
            cpu.join().unwrap();
            if let Some(v) = *mirror.0.lock().unwrap() {
                assert_eq!(v, page.load(Ordering::SeqCst), "the mirror kept a stale entry");
            }
        });
    }
}
