//! What the tier knows of each managed page: whether it was resident at the
//! last scan, the generation it was last seen used in, and a small count
//! of recent uses (halved at each new generation) — MGLRU's generations
//! with a frequency beside them. Pure bookkeeping: no system call here.

use std::ops::Range;

use uhmm::PAGE_SIZE;

/// One managed range's pages.
#[derive(Debug)]
pub(super) struct Ages {
    /// The range (page-aligned, inside one region).
    pub(super) range: Range<usize>,
    /// Resident at the last scan (or known to be, for samples taken back).
    resident: Vec<bool>,
    /// The generation each page was last seen used in (0: never).
    seen: Vec<u32>,
    /// Uses seen recently, saturating, halved each generation.
    hits: Vec<u8>,
}

impl Ages {
    pub(super) fn new(range: Range<usize>) -> Ages {
        let n = (range.end - range.start) / PAGE_SIZE;
        Ages { range, resident: vec![false; n], seen: vec![0; n], hits: vec![0; n] }
    }

    pub(super) fn npages(&self) -> usize {
        self.seen.len()
    }

    pub(super) fn addr(&self, i: usize) -> usize {
        self.range.start + i * PAGE_SIZE
    }

    /// Marks the pages of `run` (addresses) used in generation `gen`.
    pub(super) fn touch(&mut self, run: Range<usize>, generation: u32) {
        let Some(idx) = self.index(&run) else { return };
        self.seen[idx.clone()].fill(generation);
        for h in &mut self.hits[idx] {
            *h = h.saturating_add(1);
        }
    }

    /// Takes a scan's resident runs: a page that came in since the last
    /// scan was used (a fault brought it) in `generation`. Returns the
    /// resident pages.
    pub(super) fn set_resident(&mut self, runs: &[Range<usize>], generation: u32) -> usize {
        let mut now = vec![false; self.npages()];
        let mut count = 0;
        for r in runs {
            let idx = (r.start - self.range.start) / PAGE_SIZE..(r.end - self.range.start) / PAGE_SIZE;
            count += idx.len();
            let pages = now[idx.clone()].iter_mut().zip(&self.resident[idx.clone()]);
            for (((now, was), seen), hits) in pages.zip(&mut self.seen[idx.clone()]).zip(&mut self.hits[idx]) {
                *now = true;
                if !was {
                    *seen = generation;
                    *hits = hits.saturating_add(1);
                }
            }
        }
        self.resident = now;
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

    /// Notes that page `i` left RAM (demoted).
    pub(super) fn evict(&mut self, i: usize) {
        self.resident[i] = false;
    }

    /// A new generation began: recent uses count half.
    pub(super) fn age(&mut self) {
        for h in &mut self.hits {
            *h /= 2;
        }
    }

    pub(super) fn is_resident(&self, i: usize) -> bool {
        self.resident[i]
    }

    /// How cold page `i` is: smaller is colder (last generation seen,
    /// then recent uses).
    pub(super) fn warmth(&self, i: usize) -> (u32, u8) {
        (self.seen[i], self.hits[i])
    }

    /// How hot page `i` is, for ranking: recent uses, then recency.
    pub(super) fn heat(&self, i: usize) -> (u8, u32) {
        (self.hits[i], self.seen[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_in_writes_and_ageing() {
        let base = 1 << 30;
        let mut a = Ages::new(base..base + 8 * PAGE_SIZE);
        let p = |i: usize| base + i * PAGE_SIZE;
        assert_eq!(a.set_resident(std::slice::from_ref(&(p(0)..p(4))), 1), 4);
        assert_eq!(a.warmth(0), (1, 1));
        // Still resident at the next scan: not a new use.
        assert_eq!(a.set_resident(std::slice::from_ref(&(p(0)..p(4))), 2), 4);
        assert_eq!(a.warmth(0), (1, 1));
        a.touch(p(2)..p(3), 2);
        assert_eq!(a.warmth(2), (2, 2));
        a.age();
        assert_eq!(a.heat(2), (1, 2));
        a.evict(3);
        assert!(!a.is_resident(3));
        // Back in: a use.
        a.set_resident(std::slice::from_ref(&(p(3)..p(4))), 3);
        assert_eq!(a.warmth(3), (3, 1));
        a.mark_resident(p(6)..p(7));
        assert!(a.is_resident(6));
        // Runs outside the range are ignored.
        a.mark_resident(p(100)..p(101));
        a.touch(base - PAGE_SIZE..base, 4);
        assert_eq!(a.warmth(6), (0, 0));
    }
}
