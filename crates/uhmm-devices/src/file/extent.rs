//! The file store's space allocator: extents of page slots in the file.
//!
//! A run of pages gets one extent when it can (best fit among the freed
//! ones, else the end of the file grows), else the largest freed extents
//! one after the other. Freed extents merge with their neighbours; one
//! that reaches the end of the used space shrinks it, so the space in use
//! never reaches past the last extent handed out. Nothing here touches
//! the file.

use std::collections::{BTreeMap, BTreeSet};

/// A range of page slots of the file: `len` slots from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    /// The first slot (file offset / page size).
    pub start: u64,
    /// Slots.
    pub len: u64,
}

impl Extent {
    /// One past its last slot.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Slots `0..end` of the file, some of them free, within `capacity` slots.
#[derive(Debug)]
pub(crate) struct ExtentAllocator {
    capacity: u64,
    /// One past the last slot handed out and not freed.
    end: u64,
    /// Free extents below `end`, by start; merged (never touching).
    free: BTreeMap<u64, u64>,
    /// The same, by (length, start): best fit and largest first.
    by_len: BTreeSet<(u64, u64)>,
    free_slots: u64,
}

impl ExtentAllocator {
    /// An empty file of at most `capacity` slots.
    pub fn new(capacity: u64) -> ExtentAllocator {
        ExtentAllocator { capacity, end: 0, free: BTreeMap::new(), by_len: BTreeSet::new(), free_slots: 0 }
    }

    /// Slots handed out and not freed.
    pub fn used(&self) -> u64 {
        self.end - self.free_slots
    }

    /// One past the last slot in use: the length the file needs.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Free slots below [`end`](Self::end) (holes).
    pub fn free_slots(&self) -> u64 {
        self.free_slots
    }

    /// Allocates up to `n` slots, appending their extents to `out` (one
    /// when it can). Returns the slots allocated: fewer than `n` when the
    /// capacity is reached.
    pub fn alloc(&mut self, n: u64, out: &mut Vec<Extent>) -> u64 {
        if n == 0 {
            return 0;
        }
        // Best fit: the smallest free extent that holds the run.
        if let Some(&(len, start)) = self.by_len.range((n, 0)..).next() {
            self.take(start, len);
            if len > n {
                self.insert(start + n, len - n);
            }
            out.push(Extent { start, len: n });
            return n;
        }
        // The end of the file grows, in one piece.
        if self.capacity - self.end >= n {
            out.push(Extent { start: self.end, len: n });
            self.end += n;
            return n;
        }
        // Pieces: the largest free extents, then what growth is left.
        let mut got = 0;
        while got < n
            && let Some(&(len, start)) = self.by_len.iter().next_back()
        {
            self.take(start, len);
            let k = len.min(n - got);
            if len > k {
                self.insert(start + k, len - k);
            }
            out.push(Extent { start, len: k });
            got += k;
        }
        let grow = (n - got).min(self.capacity - self.end);
        if grow > 0 {
            out.push(Extent { start: self.end, len: grow });
            self.end += grow;
            got += grow;
        }
        got
    }

    /// Frees `e` (slots handed out by `alloc`).
    pub fn free(&mut self, e: Extent) {
        debug_assert!(e.end() <= self.end && e.len > 0);
        let (mut start, mut len) = (e.start, e.len);
        if let Some((&ps, &pl)) = self.free.range(..start).next_back()
            && ps + pl == start
        {
            self.take(ps, pl);
            start = ps;
            len += pl;
        }
        if let Some(&nl) = self.free.get(&(start + len)) {
            self.take(start + len, nl);
            len += nl;
        }
        if start + len == self.end {
            self.end = start;
        } else {
            self.insert(start, len);
        }
    }

    fn take(&mut self, start: u64, len: u64) {
        self.free.remove(&start);
        self.by_len.remove(&(len, start));
        self.free_slots -= len;
    }

    fn insert(&mut self, start: u64, len: u64) {
        self.free.insert(start, len);
        self.by_len.insert((len, start));
        self.free_slots += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn alloc(a: &mut ExtentAllocator, n: u64) -> Vec<Extent> {
        let mut out = Vec::new();
        assert_eq!(a.alloc(n, &mut out), n);
        out
    }

    #[test]
    fn a_run_gets_one_extent_and_freed_space_is_reused_first() {
        let mut a = ExtentAllocator::new(100);
        let x = alloc(&mut a, 10);
        let y = alloc(&mut a, 10);
        let _z = alloc(&mut a, 10);
        assert_eq!((x[0], y[0]), (Extent { start: 0, len: 10 }, Extent { start: 10, len: 10 }));
        a.free(y[0]);
        assert_eq!((a.end(), a.free_slots(), a.used()), (30, 10, 20));
        // Best fit: the hole, not the end.
        assert_eq!(alloc(&mut a, 4), vec![Extent { start: 10, len: 4 }]);
        assert_eq!(alloc(&mut a, 6), vec![Extent { start: 14, len: 6 }]);
        assert_eq!(a.end(), 30);
    }

    #[test]
    fn freeing_the_last_extent_shrinks_the_end_and_neighbours_merge() {
        let mut a = ExtentAllocator::new(100);
        let (x, y, z) = (alloc(&mut a, 5)[0], alloc(&mut a, 5)[0], alloc(&mut a, 5)[0]);
        a.free(x);
        a.free(y);
        assert_eq!(a.free_slots(), 10);
        assert_eq!(alloc(&mut a, 10), vec![Extent { start: 0, len: 10 }], "merged into one");
        a.free(Extent { start: 0, len: 10 });
        a.free(z);
        assert_eq!((a.end(), a.free_slots(), a.used()), (0, 0, 0));
    }

    #[test]
    fn a_full_file_gives_pieces_then_what_is_left() {
        let mut a = ExtentAllocator::new(20);
        let e: Vec<Extent> = (0..4).map(|_| alloc(&mut a, 4)[0]).collect();
        a.free(e[0]);
        a.free(e[2]);
        // 8 free slots in two holes, 4 of growth: 10 slots take three pieces.
        let mut out = Vec::new();
        assert_eq!(a.alloc(10, &mut out), 10);
        assert_eq!(out.iter().map(|e| e.len).sum::<u64>(), 10);
        assert_eq!(out.len(), 3);
        // 2 slots left: a request for 5 gets them.
        out.clear();
        assert_eq!(a.alloc(5, &mut out), 2);
        assert_eq!(a.used(), 20);
        out.clear();
        assert_eq!(a.alloc(1, &mut out), 0);
        assert!(out.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Step {
        Alloc(u64),
        Free(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![(1u64..40).prop_map(Step::Alloc), any::<usize>().prop_map(Step::Free)]
    }

    proptest! {
        /// Extents never overlap and stay within the capacity; the counts
        /// add up; a request a hole can hold does not grow the file; after
        /// freeing everything the file is empty.
        #[test]
        fn allocations_never_overlap_and_frees_are_reused(steps in proptest::collection::vec(step(), 1..300)) {
            let capacity = 256;
            let mut a = ExtentAllocator::new(capacity);
            let mut owner: Vec<Option<usize>> = vec![None; capacity as usize];
            let mut held: Vec<Vec<Extent>> = Vec::new();
            for (k, s) in steps.iter().enumerate() {
                match *s {
                    Step::Alloc(n) => {
                        let largest_hole = a.by_len.iter().next_back().map_or(0, |e| e.0);
                        let room = capacity - a.used();
                        let end = a.end();
                        let mut out = Vec::new();
                        let got = a.alloc(n, &mut out);
                        prop_assert_eq!(got, n.min(room));
                        prop_assert_eq!(out.iter().map(|e| e.len).sum::<u64>(), got);
                        if largest_hole >= n {
                            prop_assert_eq!(out.len(), 1);
                            prop_assert_eq!(a.end(), end, "a hole that fits is reused");
                        }
                        if capacity - end >= n {
                            prop_assert_eq!(out.len(), 1, "a run that fits gets one extent");
                        }
                        for e in &out {
                            prop_assert!(e.len > 0 && e.end() <= capacity);
                            for s in e.start..e.end() {
                                prop_assert!(owner[s as usize].is_none(), "slot {} handed out twice", s);
                                owner[s as usize] = Some(k);
                            }
                        }
                        held.push(out);
                    }
                    Step::Free(i) if !held.is_empty() => {
                        let out = held.swap_remove(i % held.len());
                        for e in out {
                            for s in e.start..e.end() {
                                owner[s as usize] = None;
                            }
                            a.free(e);
                        }
                    }
                    Step::Free(_) => {}
                }
                let in_use = owner.iter().filter(|o| o.is_some()).count() as u64;
                prop_assert_eq!(a.used(), in_use);
                prop_assert_eq!(a.end() - a.free_slots(), in_use);
                let last = owner.iter().rposition(|o| o.is_some()).map_or(0, |p| p as u64 + 1);
                prop_assert_eq!(a.end(), last, "the end is the last slot in use");
            }
            for out in held {
                for e in out {
                    a.free(e);
                }
            }
            prop_assert_eq!((a.end(), a.free_slots()), (0, 0));
        }
    }
}
