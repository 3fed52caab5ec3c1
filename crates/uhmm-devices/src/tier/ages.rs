//! What the tier knows of each managed page: whether it was resident at the
//! last scan, the uses seen (faults that brought it back, writes, hinting
//! faults), how long it was seen away from RAM, and when it was last seen
//! used — from which each page gets an estimated rate of use: uses over the
//! time the tracking could have seen them. A page demoted and faulted back
//! again and again soon after is hot (the kernel's refault distance, in
//! seconds); a page resident long with no use seen drifts cold until
//! reclaim takes it and its refault (or none) measures it again. Uses and
//! time away decay together, so the estimate follows a changing workload.
//! Times are the tier's seconds in `f32`: a millisecond's resolution for
//! the first hours, a second's after months, enough for rates counted in
//! seconds. Pure bookkeeping: no system call here.

use std::ops::Range;

use uhmm::PAGE_SIZE;

/// Seconds added to the time a use could have been seen, so that a page
/// seen used just now does not divide by zero.
const GRACE_S: f32 = 0.05;

/// Seconds reclaim leaves a page it could not move.
const HOLD_S: f32 = 2.0;

/// Uses and time away halve over this many decays (generations).
const HALF_LIFE_GENERATIONS: f32 = 16.0;

/// One managed range's pages.
#[derive(Debug)]
pub(super) struct Ages {
    /// The range (page-aligned, inside one region).
    pub(super) range: Range<usize>,
    /// Resident at the last scan (or known to be, for samples taken back).
    resident: Vec<bool>,
    /// Uses seen, decayed.
    uses: Vec<f32>,
    /// Seconds seen away from RAM (demoted until a fault brought it back),
    /// decayed with `uses`.
    away: Vec<f32>,
    /// When the page was demoted (tier seconds); NaN while resident.
    left_at: Vec<f32>,
    /// When a use was last seen (tier seconds; 0: never).
    last: Vec<f32>,
    /// Until when reclaim leaves the page (tier seconds).
    held_until: Vec<f32>,
}

impl Ages {
    pub(super) fn new(range: Range<usize>) -> Ages {
        let n = (range.end - range.start) / PAGE_SIZE;
        Ages {
            range,
            resident: vec![false; n],
            uses: vec![0.0; n],
            away: vec![0.0; n],
            left_at: vec![f32::NAN; n],
            last: vec![0.0; n],
            held_until: vec![0.0; n],
        }
    }

    pub(super) fn npages(&self) -> usize {
        self.uses.len()
    }

    pub(super) fn addr(&self, i: usize) -> usize {
        self.range.start + i * PAGE_SIZE
    }

    /// Counts a use of each page of `run` (addresses) at `now`.
    pub(super) fn touch(&mut self, run: Range<usize>, now: f32) {
        let Some(idx) = self.index(&run) else { return };
        for i in idx {
            self.used(i, now);
        }
    }

    fn used(&mut self, i: usize, now: f32) {
        self.uses[i] += 1.0;
        self.last[i] = now;
    }

    /// Takes a scan's resident runs: a page that came in since the last
    /// scan was used (a fault brought it) at `now`, after the time it was
    /// away. Returns the resident pages.
    pub(super) fn set_resident(&mut self, runs: &[Range<usize>], now: f32) -> usize {
        let n = self.npages();
        let was = std::mem::replace(&mut self.resident, vec![false; n]);
        let mut count = 0;
        for r in runs {
            let idx = (r.start - self.range.start) / PAGE_SIZE..(r.end - self.range.start) / PAGE_SIZE;
            count += idx.len();
            for i in idx {
                self.resident[i] = true;
                if !was[i] {
                    if !self.left_at[i].is_nan() {
                        self.away[i] += (now - self.left_at[i]).max(0.0);
                        self.left_at[i] = f32::NAN;
                    }
                    self.used(i, now);
                }
            }
        }
        count
    }

    /// Notes that the pages of `run` are resident without counting a use
    /// (samples the tier took back itself).
    pub(super) fn mark_resident(&mut self, run: Range<usize>) {
        if let Some(idx) = self.index(&run) {
            self.resident[idx].fill(true);
        }
    }

    /// The page indices of the part of `run` (addresses) inside the range.
    fn index(&self, run: &Range<usize>) -> Option<Range<usize>> {
        let start = run.start.max(self.range.start);
        let end = run.end.min(self.range.end);
        (start < end).then(|| (start - self.range.start) / PAGE_SIZE..(end - self.range.start).div_ceil(PAGE_SIZE))
    }

    /// Notes that page `i` left RAM (demoted) at `now`.
    pub(super) fn evict(&mut self, i: usize, now: f32) {
        self.resident[i] = false;
        self.left_at[i] = now;
    }

    /// A generation passed: uses and time away count a little less.
    pub(super) fn age(&mut self) {
        let keep = 0.5f32.powf(1.0 / HALF_LIFE_GENERATIONS);
        self.uses.iter_mut().chain(self.away.iter_mut()).for_each(|x| *x *= keep);
    }

    /// Page `i` stayed in RAM after reclaim chose it (pinned, busy, no
    /// room on the device): reclaim leaves it for [`HOLD_S`], as the
    /// kernel puts a page it could not isolate back on its LRU.
    pub(super) fn hold(&mut self, i: usize, now: f32) {
        self.held_until[i] = now + HOLD_S;
    }

    /// Whether reclaim may choose page `i` at `now`: resident, not held.
    pub(super) fn reclaimable(&self, i: usize, now: f32) -> bool {
        self.resident[i] && now >= self.held_until[i]
    }

    pub(super) fn is_resident(&self, i: usize) -> bool {
        self.resident[i]
    }

    /// Whether page `i` was seen used at or after `t`.
    pub(super) fn used_since(&self, i: usize, t: f32) -> bool {
        self.last[i] >= t && self.uses[i] > 0.0
    }

    /// Page `i`'s estimated uses a second at `now`: its uses over the time
    /// they could have been seen (time away, and time since the last).
    /// Larger is hotter.
    pub(super) fn rate(&self, i: usize, now: f32) -> f32 {
        self.uses[i] / (self.away[i] + (now - self.last[i]).max(0.0) + GRACE_S)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refaults_writes_and_ageing() {
        let base = 1 << 30;
        let mut a = Ages::new(base..base + 8 * PAGE_SIZE);
        let p = |i: usize| base + i * PAGE_SIZE;
        // Found resident at the first scan: they came in, a use each.
        assert_eq!(a.set_resident(std::slice::from_ref(&(p(0)..p(4))), 0.0), 4);
        let first = a.rate(0, 1.0);
        assert!(first > 0.0);
        // Still resident at the next scan: not a new use.
        assert_eq!(a.set_resident(std::slice::from_ref(&(p(0)..p(4))), 1.0), 4);
        assert_eq!(a.rate(0, 1.0), first);
        // Written: a use, hotter than the others.
        a.touch(p(2)..p(3), 1.0);
        assert!(a.used_since(2, 1.0) && !a.used_since(1, 0.5));
        assert!(a.rate(2, 1.0) > a.rate(1, 1.0));
        // Pages 0 and 1 demoted; 0 faults back twice within 1.1 s, 1 once
        // after 5 s: 0 is hotter.
        a.evict(0, 10.0);
        a.evict(1, 10.0);
        assert!(!a.is_resident(0));
        a.set_resident(&[p(0)..p(1), p(2)..p(4)], 10.1);
        a.evict(0, 11.0);
        a.set_resident(&[p(0)..p(1), p(2)..p(4)], 11.1);
        a.set_resident(std::slice::from_ref(&(p(0)..p(4))), 15.0);
        assert!(a.rate(0, 15.0) > a.rate(1, 15.0), "{} {}", a.rate(0, 15.0), a.rate(1, 15.0));
        // With no use seen, a page cools as time passes; ageing keeps the order.
        assert!(a.rate(0, 30.0) < a.rate(0, 15.0));
        a.age();
        assert!(a.rate(0, 15.0) > a.rate(1, 15.0));
        // A page reclaim could not move is left alone for a while.
        assert!(a.reclaimable(3, 15.0));
        a.hold(3, 15.0);
        assert!(!a.reclaimable(3, 15.0 + HOLD_S / 2.0) && a.reclaimable(3, 15.0 + HOLD_S));
        assert!(!a.reclaimable(5, 15.0), "not resident");
        a.mark_resident(p(6)..p(7));
        assert!(a.is_resident(6));
        // Runs outside the range are ignored.
        a.mark_resident(p(100)..p(101));
        a.touch(base - PAGE_SIZE..base, 4.0);
        assert_eq!(a.rate(6, 20.0), 0.0);
    }
}
