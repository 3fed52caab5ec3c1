//! Fault-around and first-touch windows: how many pages one fault brings
//! back or fills, grown along sequential scans (up or down a region) and
//! kept inside the faulting page's 2 MiB block; the kernel's
//! `fault_around_bytes` made adaptive, with the marker of its asynchronous
//! read-ahead (`PG_readahead`). Pure policy: it sees page indices only.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use uhmm_sys::{HUGE_SIZE, PAGE_SIZE};

/// The adaptive windows of one kind of fault in one region (fault-around,
/// first-touch fills), for up to [`SCAN_STREAMS`] scans at once (threads
/// each scanning their part). A fault on the page just past a scan's last
/// window (a scan up the region) or just before it (a scan down: glibc's
/// memcpy runs large copies backwards) gets a window twice as large,
/// reaching on in the scan's direction, up to a maximum. Any other fault
/// starts a scan in place of the one used least recently: one up the
/// region, with a window as large as the run of pages in RAM just below it
/// (up to the maximum), when that run is at least twice the base window (a
/// scan that came from below without faulting there: glibc's memcpy copies
/// a large buffer's head first and the rest from its end down, and the next
/// chunk of a read starts above the one before); one down the region
/// through the pages between, when the window recorded just before ended
/// one to four blocks below the fault (glibc's memcpy copying a large
/// buffer backwards takes its head first, then the rest from its tail
/// down); else the aligned base window. Every window is clipped to the faulting page's [`BLOCK_PAGES`]
/// block. A region whose faults seldom go on as scans (random access:
/// fewer than one window in [`RANDOM_SHARE`] that started a scan was
/// followed by the scan's next fault) gets one page for a fault that starts
/// a scan, as the kernel's swap read-ahead shrinks to one page when its
/// pages go unused: pages a random access never reads would only take RAM
/// (under a budget, the place of pages that are read). A scan that starts
/// grows from there as before.
/// A scan's last read-ahead window leaves its first page (in the scan's
/// direction) on the device, a marker: the scan's fault there brings back
/// that page alone, at once, and the read-ahead goes on from the far end
/// of the scan's windows while the scan reads the rest (the kernel's
/// asynchronous read-ahead, `PG_readahead`).
/// Relaxed atomics: a lost update only costs a window's size.
#[derive(Debug)]
pub(crate) struct ScanWindow {
    streams: [Stream; SCAN_STREAMS],
    /// Counts the windows recorded: a new scan replaces the stream used
    /// least recently (not a scan going on beside faults that start none:
    /// glibc's memcpy touches a large read's last bytes first, a fault
    /// that starts a stream it never continues).
    clock: AtomicUsize,
    /// Windows that started a scan, and faults that went on with one
    /// (both halved past [`EVIDENCE_WINDOWS`]).
    started: AtomicUsize,
    continued: AtomicUsize,
}

/// Windows started before the share of those continued is taken as
/// evidence, and past which both counts halve.
const EVIDENCE_WINDOWS: usize = 32;

/// At most one started window in this many continued: random access.
const RANDOM_SHARE: usize = 8;

/// Scans a region tracks at once.
const SCAN_STREAMS: usize = 4;

/// The largest copy taken for one that read its head and goes on from its
/// tail down (8 MiB): a fault at most this far above the window before it.
const TAIL_FIRST_PAGES: usize = 4 * BLOCK_PAGES;

/// Pages of a fault-around block: no window leaves the aligned 2 MiB block
/// (counted from the region's start, 2 MiB-aligned for regions that large)
/// of the page that faulted, as UVM keeps faults inside its 2 MiB VA
/// blocks. A scan's doubling windows follow evidence of a sequential
/// access, but unclipped they could run up to `fault_around_max_pages`
/// past the last page read; clipped, what a fault brings back never leaves
/// the block the program touched. A scan that crosses a block goes on with
/// its size in the next one.
const BLOCK_PAGES: usize = HUGE_SIZE / PAGE_SIZE;

/// One scan's last window.
#[derive(Debug)]
struct Stream {
    /// The window's first page and end (`usize::MAX`: none yet).
    start: AtomicUsize,
    end: AtomicUsize,
    /// Its size before clipping.
    size: AtomicUsize,
    /// The `clock` when it was last used.
    used: AtomicUsize,
    /// The page its last read-ahead left on the device (`usize::MAX`:
    /// none), and whether the scan goes down.
    marker: AtomicUsize,
    down: AtomicBool,
}

/// A window [`ScanWindow::propose`]d for a fault.
#[derive(Debug)]
pub(crate) struct Proposal {
    pub(crate) pages: Range<usize>,
    /// Its size before clipping.
    pub(crate) size: usize,
    /// The scan it continues (its direction) or starts.
    pub(crate) stream: usize,
    pub(crate) scan: Option<Scan>,
    /// A fault on the scan's marker: its windows stay as they are, and
    /// its read-ahead goes on from `resume` (their far end).
    pub(crate) on_marker: bool,
    pub(crate) resume: Option<usize>,
}

impl Proposal {
    /// A window for a fault that is not on a marker.
    fn new(pages: Range<usize>, size: usize, stream: usize, scan: Option<Scan>) -> Proposal {
        Proposal { pages, size, stream, scan, on_marker: false, resume: None }
    }
}

impl Default for ScanWindow {
    fn default() -> ScanWindow {
        let stream = || Stream {
            start: AtomicUsize::new(usize::MAX),
            end: AtomicUsize::new(usize::MAX),
            size: AtomicUsize::new(0),
            used: AtomicUsize::new(0),
            marker: AtomicUsize::new(usize::MAX),
            down: AtomicBool::new(false),
        };
        ScanWindow {
            streams: std::array::from_fn(|_| stream()),
            clock: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            continued: AtomicUsize::new(0),
        }
    }
}

impl ScanWindow {
    /// The window for a fault on page `idx` of a region of `npages` pages,
    /// inside the fault-around block of `idx` ([`BLOCK_PAGES`]);
    /// `in_ram_below` counts the pages in RAM just below it (up to `max`),
    /// asked only of a fault that starts a scan. A window of `base` pages
    /// is aligned by virtual address, as the kernel's fault-around is:
    /// `phase` is the virtual page number of page 0 (so that a store's
    /// groups, aligned the same way, come back whole).
    pub(crate) fn propose(
        &self,
        idx: usize,
        phase: usize,
        base: usize,
        max: usize,
        npages: usize,
        in_ram_below: impl FnOnce() -> usize,
    ) -> Proposal {
        use std::sync::atomic::Ordering::Relaxed;
        // The window's bounds: the block of `idx`, inside the region.
        let lo = idx - idx % BLOCK_PAGES;
        let hi = (lo + BLOCK_PAGES).min(npages);
        if base > 1 {
            for (stream, s) in self.streams.iter().enumerate() {
                let grown = || (s.size.load(Relaxed) * 2).clamp(base, max.max(base));
                if s.marker.load(Relaxed) == idx {
                    let (scan, resume) = if s.down.load(Relaxed) {
                        (Scan::Down, s.start.load(Relaxed).checked_sub(1))
                    } else {
                        (Scan::Up, Some(s.end.load(Relaxed)).filter(|&e| e < npages))
                    };
                    let size = s.size.load(Relaxed);
                    return Proposal { pages: idx..idx + 1, size, stream, scan: Some(scan), on_marker: true, resume };
                }
                if s.end.load(Relaxed) == idx {
                    self.continued.fetch_add(1, Relaxed);
                    let size = grown();
                    return Proposal::new(idx..(idx + size).min(hi), size, stream, Some(Scan::Up));
                }
                if s.start.load(Relaxed) == idx + 1 {
                    self.continued.fetch_add(1, Relaxed);
                    let size = grown();
                    let pages = (idx + 1).saturating_sub(size).max(lo)..idx + 1;
                    return Proposal::new(pages, size, stream, Some(Scan::Down));
                }
            }
        }
        let stream = (0..SCAN_STREAMS).min_by_key(|&k| self.streams[k].used.load(Relaxed)).unwrap_or(0);
        let below = if base > 1 { in_ram_below() } else { 0 };
        if below >= 2 * base {
            let size = below.min(max.max(base));
            return Proposal::new(idx..(idx + size).min(hi), size, stream, Some(Scan::Up));
        }
        if base > 1 && self.random() {
            return Proposal::new(idx..idx + 1, 1, stream, None);
        }
        if base > 1
            && let Some(head) = self.last_end_below(idx)
            && (BLOCK_PAGES..=TAIL_FIRST_PAGES).contains(&(idx + 1 - head))
        {
            // The window just before this fault took a large copy's head,
            // a block or more below: glibc's memcpy, copying backwards,
            // goes on from the tail down through the pages between.
            let size = (idx + 1 - head).min(max.max(base));
            let pages = (idx + 1).saturating_sub(size).max(lo).max(head)..idx + 1;
            return Proposal::new(pages, size, stream, Some(Scan::Down));
        }
        let (phase, at) = (phase % base, idx + phase % base);
        let vstart = at - at % base;
        let pages = vstart.saturating_sub(phase).max(lo)..(vstart + base - phase).min(hi);
        Proposal::new(pages, base, stream, None)
    }

    /// The end of the window recorded last, if it lies at or below `idx`.
    fn last_end_below(&self, idx: usize) -> Option<usize> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.clock.load(Relaxed);
        let last = self.streams.iter().find(|s| now > 0 && s.used.load(Relaxed) == now)?;
        Some(last.end.load(Relaxed)).filter(|&end| end <= idx)
    }

    /// Counts a window that starts a scan; whether the faults here are
    /// random (few started windows went on as scans).
    fn random(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let started = self.started.fetch_add(1, Relaxed) + 1;
        let continued = self.continued.load(Relaxed);
        if started >= 2 * EVIDENCE_WINDOWS {
            self.started.store(started / 2, Relaxed);
            self.continued.store(continued / 2, Relaxed);
        }
        started >= EVIDENCE_WINDOWS && continued * RANDOM_SHARE < started
    }

    /// Notes the window taken for `proposal`: `pages` (clipped). A fault
    /// on a marker leaves the scan's windows as they are.
    pub(crate) fn record(&self, proposal: &Proposal, pages: &Range<usize>) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.streams[proposal.stream];
        s.used.store(self.clock.fetch_add(1, Relaxed) + 1, Relaxed);
        s.marker.store(usize::MAX, Relaxed);
        if proposal.on_marker {
            return;
        }
        s.start.store(pages.start, Relaxed);
        s.end.store(pages.end, Relaxed);
        s.size.store(proposal.size, Relaxed);
    }

    /// Notes that the scan of `proposal` (just recorded) left page `idx`
    /// on the device.
    pub(crate) fn leave_marker(&self, proposal: &Proposal, idx: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.streams[proposal.stream];
        s.down.store(proposal.scan == Some(Scan::Down), Relaxed);
        s.marker.store(idx, Relaxed);
    }
}

/// The direction of a sequential scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scan {
    Up,
    Down,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes the window proposed for a fault on `idx` (base 16, at most
    /// 512 pages, nothing in RAM below) in a region of `npages`.
    fn take(w: &ScanWindow, idx: usize, npages: usize) -> Proposal {
        let p = w.propose(idx, 0, 16, 512, npages, || 0);
        w.record(&p, &p.pages);
        p
    }

    #[test]
    fn scan_windows_grow_up_and_down_the_region_and_reset_elsewhere() {
        let w = ScanWindow::default();
        // Takes the proposed window for a fault on `idx` and returns it.
        let take = |idx: usize| {
            let p = w.propose(idx, 0, 16, 128, 1000, || 0);
            w.record(&p, &p.pages);
            p.pages
        };
        assert_eq!(take(40), 32..48, "a first fault: the aligned base window");
        assert_eq!(take(48), 48..80, "up: doubled, from the fault");
        assert_eq!(take(80), 80..144);
        assert_eq!(take(144), 144..272);
        assert_eq!(take(272), 272..400, "no larger than the maximum");
        assert_eq!(take(700), 688..704, "a fault elsewhere starts a scan");
        assert_eq!(take(687), 656..688, "down: doubled, ending at the fault");
        assert_eq!(take(655), 592..656);
        assert_eq!(take(400), 400..512, "the first scan goes on beside the second, up to its block's end");
        assert_eq!(take(512), 512..640, "and on in the next block, as large as before");
        assert_eq!(take(591), 512..592, "down to its block's start");
        assert_eq!(take(511), 384..512, "and on below it");
        assert_eq!(take(995), 992..1000, "clipped to the region");
        assert_eq!(take(991), 960..992);
        assert_eq!(take(39), 32..48, "a fault inside a window starts a scan");
        assert_eq!(take(31), 0..32, "clipped at the region's start");
        let p = w.propose(15, 0, 1, 128, 1000, || 0);
        assert_eq!((p.pages, p.scan), (15..16, None), "a base of one page never grows");
    }

    #[test]
    fn random_faults_get_one_page_until_a_scan_goes_on() {
        let w = ScanWindow::default();
        let take = |idx: usize| take(&w, idx, 1 << 20);
        // Faults all over the region: none goes on as a scan.
        let mut x = 12345usize;
        let mut random = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) % (1 << 20)
        };
        let sizes: Vec<usize> = (0..2 * EVIDENCE_WINDOWS).map(|_| take(random()).pages.len()).collect();
        assert!(sizes[..EVIDENCE_WINDOWS - 1].iter().all(|&n| n > 1), "the base window until there is evidence");
        assert!(sizes[EVIDENCE_WINDOWS..].iter().all(|&n| n == 1), "then one page: {sizes:?}");
        // A scan starts from its one page and grows as before.
        let at = random() & !511;
        assert_eq!(take(at).pages, at..at + 1);
        assert_eq!(take(at + 1).pages, at + 1..at + 17);
        assert_eq!(take(at + 17).pages, at + 17..at + 49);
        // Scans that go on: windows start at the base again.
        for _ in 0..2 * EVIDENCE_WINDOWS {
            let mut next = take(random() & !511).pages.end;
            for _ in 0..RANDOM_SHARE {
                next = take(next).pages.end;
            }
        }
        assert!(take(random() | 7).pages.len() > 1, "sequential faults: the base window again");
    }

    #[test]
    fn a_window_is_aligned_by_virtual_address() {
        let w = ScanWindow::default();
        // Page 0 of the region is virtual page 16k + 5: page 11 starts a window.
        assert_eq!(w.propose(20, 16 * 1000 + 5, 16, 512, 1000, || 0).pages, 11..27);
        assert_eq!(w.propose(3, 5, 16, 512, 1000, || 0).pages, 0..11, "clipped at the region's start");
    }

    #[test]
    fn a_fault_above_pages_in_ram_starts_a_scan_up_as_large_as_their_run() {
        let w = ScanWindow::default();
        let p = w.propose(600, 0, 16, 512, 1000, || 300);
        assert_eq!((p.pages, p.scan), (600..900, Some(Scan::Up)), "as many pages as are in RAM below");
        let p = w.propose(600, 0, 16, 128, 1000, || 300);
        assert_eq!(p.pages, 600..728, "no larger than the maximum");
        let p = w.propose(300, 0, 16, 512, 1000, || 300);
        assert_eq!(p.pages, 300..512, "clipped to the block");
        let p = w.propose(990, 0, 16, 512, 1000, || 600);
        assert_eq!(p.pages, 990..1000, "clipped to the region");
        let p = w.propose(300, 0, 16, 512, 1000, || 31);
        assert_eq!((p.pages, p.scan), (288..304, None), "fewer than two base windows: the base window");
        let p = w.propose(300, 0, 1, 512, 1000, || panic!("not asked when the base is one page"));
        assert_eq!(p.pages, 300..301);
        // A fault that continues a scan does not look below.
        let p = w.propose(300, 0, 16, 512, 1000, || 0);
        w.record(&p, &p.pages);
        let p = w.propose(304, 0, 16, 512, 1000, || panic!("not asked for a scan's next window"));
        assert_eq!(p.pages, 304..336);
    }

    #[test]
    fn a_copy_that_takes_its_head_then_goes_down_from_its_tail_gets_the_pages_between() {
        let w = ScanWindow::default();
        let take = |idx: usize| take(&w, idx, 1 << 20);
        // A 4 MiB copy at page 4096, backwards: its head, then its tail down.
        assert_eq!(take(4096).pages, 4096..4112);
        let p = take(5119);
        assert_eq!((p.pages, p.scan), (4608..5120, Some(Scan::Down)), "the pages between, clipped to the block");
        assert_eq!(take(4607).pages, 4096..4608, "the scan down goes on to the block's start");
        // A fault far above the last window, or less than a block above it,
        // starts no such scan.
        take(8192);
        assert_eq!(take(8192 + 4 * 512 + 100).scan, None, "more than four blocks above");
        take(12288);
        assert_eq!(take(12288 + 300).scan, None, "less than a block above: the base window");
    }

    #[test]
    fn a_marker_fault_takes_its_page_alone_and_resumes_where_the_scan_ends() {
        let w = ScanWindow::default();
        let take = |idx: usize| take(&w, idx, 1000);
        take(0);
        let last = take(16); // a scan up: 16..48
        w.leave_marker(&last, 16);
        let p = take(16);
        assert_eq!((p.pages, p.on_marker, p.resume, p.scan), (16..17, true, Some(48), Some(Scan::Up)));
        assert_eq!(take(48).pages, 48..112, "the scan's windows stay as they were");
        assert!(!take(16).on_marker, "a marker serves once");
        // Down: the marker is the window's top page; the scan resumes below it.
        take(303);
        let last = take(287); // a scan down: 256..288
        w.leave_marker(&last, 287);
        let p = take(287);
        assert_eq!((p.pages, p.resume, p.scan), (287..288, Some(255), Some(Scan::Down)));
        assert_eq!(take(255).pages, 192..256);
        // At the region's end there is nothing to resume.
        take(700);
        take(960);
        let last = take(976); // 976..1000, clipped
        w.leave_marker(&last, 976);
        assert_eq!(take(976).resume, None);
    }

    #[test]
    fn a_scan_outlives_faults_beside_it_that_start_scans() {
        let w = ScanWindow::default();
        let take = |idx: usize| take(&w, idx, 1 << 20);
        take(0);
        let mut next = take(16).pages.end;
        // Each read's last page faults first (glibc's memcpy): more faults
        // that start scans than there are streams, between the scan's own.
        for k in 1..=2 * SCAN_STREAMS {
            assert_eq!(take(k << 12).scan, None);
            let p = take(next);
            assert_eq!(p.scan, Some(Scan::Up), "the scan goes on after {k} faults beside it");
            next = p.pages.end;
        }
    }

    #[test]
    fn scan_windows_follow_as_many_scans_as_they_have_streams() {
        let w = ScanWindow::default();
        let take = |idx: usize| take(&w, idx, 1 << 20);
        // SCAN_STREAMS threads, each scanning its own part up, in turn.
        let mut next: Vec<usize> = (0..SCAN_STREAMS).map(|k| k << 16).collect();
        for round in 0..6 {
            for n in next.iter_mut() {
                let p = take(*n);
                assert_eq!(p.scan.is_some(), round > 0, "round {round} at {n}");
                *n = p.pages.end;
            }
        }
        assert_eq!(next[0], 512, "each scan's windows grew, up to its block's end");
        // One more scan starts in place of the one used least recently.
        assert_eq!(take(9 << 16).scan, None);
        assert_eq!(take(next[1]).scan, Some(Scan::Up), "the others go on");
        assert_eq!(take(next[0]).scan, None, "the first scan was forgotten");
    }
}
