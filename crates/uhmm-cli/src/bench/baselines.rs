//! Baselines measured in the same process as the uhmm cases: memcpy (1 and 2
//! threads) and page copies with non-temporal stores at every size, and a
//! raw userfaultfd round trip built from uhmm's `sys` layer alone (no page
//! table, no fault engine, no device).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustix::event::{PollFd, PollFlags, Timespec};
use uhmm::PAGE_SIZE;
use uhmm_sys::mman::{Mapping, Protection};
use uhmm_sys::process::set_thread_cpus;
use uhmm_sys::uffd::{Event, Uffd};

use super::report::StealMeter;
use super::{Case, Latencies, Placement, Plan, progress, repeat, sweep};
use crate::units::human;

/// memcpy of each size of the sweep, 1 thread and 2 threads (each copies
/// half), between buffers that are fully faulted in beforehand. The 1-thread
/// case is a sweep case: measured in rounds through the sizes.
pub fn memcpy(plan: &Plan) -> Result<Vec<Case>, String> {
    progress(&format!("memcpy, 1 thread, {}", plan.sizes.iter().map(|&s| human(s)).collect::<Vec<_>>().join(", ")));
    let mut buffers: Vec<(Vec<u8>, Vec<u8>)> = plan.sizes.iter().map(|&s| (vec![0x5au8; s], vec![0xa5u8; s])).collect();
    let steal = StealMeter::start();
    let one_thread = sweep(
        plan,
        &mut buffers,
        |(src, dst)| -> Result<Duration, String> {
            let t = Instant::now();
            dst.copy_from_slice(src);
            let d = t.elapsed();
            std::hint::black_box(&dst);
            Ok(d)
        },
        |&d| d,
    )?;
    let stolen = steal.share();
    let mut out = Vec::new();
    for ((&size, (src, dst)), (w, runs)) in plan.sizes.iter().zip(&mut buffers).zip(one_thread) {
        progress(&format!("memcpy 2 threads, page copies, {}", human(size)));
        out.push(
            Case::throughput("memcpy_1t", "memcpy, 1 thread", "baseline", size, w, &runs)
                .with_note(format!("{} timed runs", runs.len()))
                .with_steal(stolen),
        );
        let (w, runs) = memcpy_2t(src, dst, plan.runs);
        out.push(Case::throughput("memcpy_2t", "memcpy, 2 threads", "baseline", size, w, &runs));
        out.push(streamed_pages(size, plan.runs)?);
    }
    Ok(out)
}

/// Page-by-page copies with non-temporal stores (`Mapping::stream_to`),
/// 1 thread: the copy routine of the sim device's DMA engine (which streams
/// runs of up to 2 MiB). Shown beside memcpy, which the targets use, so a
/// reader sees what part of a ratio the copy routine is.
fn streamed_pages(size: usize, runs: usize) -> Result<Case, String> {
    let len = size.next_multiple_of(PAGE_SIZE);
    let map = || Mapping::anonymous(len, Protection::ReadWrite, PAGE_SIZE).map_err(|e| format!("mapping: {e}"));
    let (src, dst) = (map()?, map()?);
    src.write(0, &vec![0x5a; len]).map_err(|e| format!("filling: {e}"))?;
    dst.write(0, &vec![0xa5; len]).map_err(|e| format!("filling: {e}"))?;
    let (w, runs) = repeat(runs, |_| -> Result<Duration, String> {
        let t = Instant::now();
        for off in (0..len).step_by(PAGE_SIZE) {
            src.stream_to(off, &dst, off, PAGE_SIZE).map_err(|e| format!("copying: {e}"))?;
        }
        Ok(t.elapsed())
    })?;
    Ok(Case::throughput("stream_pages_1t", "page copies, non-temporal stores, 1 thread", "baseline", len, w, &runs))
}

/// 2-thread memcpy: a helper thread, started once, copies the upper half
/// while this thread copies the lower. The two meet on spinning flags, not
/// a sleeping barrier, so neither thread start-up nor a cross-CPU wake-up
/// is timed (a wake-up costs tens of microseconds here, more than a small
/// copy).
fn memcpy_2t(src: &[u8], dst: &mut [u8], runs: usize) -> (Duration, Vec<Duration>) {
    let half = src.len() / 2 / PAGE_SIZE * PAGE_SIZE;
    let (src_lo, src_hi) = src.split_at(half);
    let (dst_lo, dst_hi) = dst.split_at_mut(half);
    // Run i starts when `go` reaches i + 1; the helper reports it done by
    // setting `done` to i + 1.
    let go = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let mut times = Vec::with_capacity(runs + 1);
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 1..=runs + 1 {
                while go.load(Ordering::Acquire) < i {
                    std::hint::spin_loop();
                }
                dst_hi.copy_from_slice(src_hi);
                std::hint::black_box(&dst_hi);
                done.store(i, Ordering::Release);
            }
        });
        for i in 1..=runs + 1 {
            let t = Instant::now();
            go.store(i, Ordering::Release);
            dst_lo.copy_from_slice(src_lo);
            std::hint::black_box(&dst_lo);
            while done.load(Ordering::Acquire) < i {
                std::hint::spin_loop();
            }
            times.push(t.elapsed());
        }
    });
    let warm = times.remove(0);
    (warm, times)
}

/// The raw userfaultfd round trip: a handler thread polls a userfaultfd and
/// answers each single-page MISSING fault with `UFFDIO_COPY` of one page;
/// each run reads one byte of each page of a registered mapping in turn and
/// times each access. Before each run the pages are dropped with
/// `MADV_DONTNEED`, so every access of every run faults.
pub struct RawRoundTrip {
    map: Mapping,
    pages: usize,
    stop: Arc<AtomicBool>,
    handler: Option<std::thread::JoinHandle<Result<u64, String>>>,
}

impl RawRoundTrip {
    /// Registers a mapping of `pages` pages and starts the handler thread,
    /// which runs on CPU `cpu` alone.
    pub fn new(pages: usize, cpu: usize) -> Result<RawRoundTrip, String> {
        let uffd = Uffd::open(0, uhmm_sys::uffd::Accept::FullOrUserModeOnly)
            .map_err(|e| format!("opening a userfaultfd: {e}"))?;
        let len = pages * PAGE_SIZE;
        let map = Mapping::anonymous(len, Protection::ReadWrite, PAGE_SIZE).map_err(|e| format!("mmap: {e}"))?;
        uffd.register(&map, 0, len, false).map_err(|e| format!("UFFDIO_REGISTER (userfaultfd): {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let handler = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("raw-uffd".into())
                .spawn(move || {
                    set_thread_cpus(&[cpu]).map_err(|e| format!("pinning the raw handler to CPU {cpu}: {e}"))?;
                    Ok(raw_handler(&uffd, &stop))
                })
                .map_err(|e| format!("spawning the handler: {e}"))?
        };
        Ok(RawRoundTrip { map, pages, stop, handler: Some(handler) })
    }

    /// One run: every page faulted once, each access's nanoseconds recorded
    /// in `run`.
    pub fn run(&self, run: &mut Histogram<u64>) -> Result<(), String> {
        self.map.discard(0, self.pages * PAGE_SIZE).map_err(|e| format!("MADV_DONTNEED: {e}"))?;
        let mut byte = [0u8; 1];
        for p in 0..self.pages {
            let t = Instant::now();
            self.map.read(p * PAGE_SIZE, &mut byte).map_err(|e| format!("read: {e}"))?;
            run.saturating_record((t.elapsed().as_nanos() as u64).max(1));
        }
        if byte[0] != 0x77 {
            return Err("the raw handler's page did not arrive".into());
        }
        Ok(())
    }

    /// Stops the handler and makes the case of `latencies`, measured with
    /// the handler placed as `placement` says.
    pub fn finish(mut self, latencies: &Latencies, placement: Placement) -> Result<Case, String> {
        let faults = self.stop_handler()?;
        Ok(Case::latency(
            format!("uffd_round_trip_{}", placement.id()),
            format!("raw userfaultfd round trip, {}", placement.name()),
            "baseline",
            self.pages * PAGE_SIZE,
            latencies,
        )
        .with_note(format!("{faults} single-page faults answered with UFFDIO_COPY by one poll()ing handler thread")))
    }

    /// Stops and joins the handler thread; returns the faults it answered.
    fn stop_handler(&mut self) -> Result<u64, String> {
        self.stop.store(true, Ordering::SeqCst);
        match self.handler.take() {
            Some(h) => h.join().map_err(|_| "the raw handler panicked".to_string())?,
            None => Ok(0),
        }
    }
}

impl Drop for RawRoundTrip {
    fn drop(&mut self) {
        // An error path: the handler must not outlive the mapping's users.
        let _ = self.stop_handler();
    }
}

/// The raw handler: poll, read the fault messages, answer each with one
/// page of `UFFDIO_COPY`. Returns the faults it answered.
fn raw_handler(uffd: &Uffd, stop: &AtomicBool) -> u64 {
    let src = vec![0x77u8; PAGE_SIZE];
    let mut events = Vec::with_capacity(64);
    let timeout = Timespec { tv_sec: 0, tv_nsec: 20_000_000 };
    let mut answered = 0;
    let fd = uffd.fd();
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        if rustix::event::poll(&mut fds, Some(&timeout)).is_err() {
            continue;
        }
        events.clear();
        if uffd.read_events(&mut events, 64).is_err() {
            continue;
        }
        for ev in &events {
            if let Event::PageFault { addr, .. } = *ev {
                // EEXIST (a duplicate fault on a page already answered) is fine.
                let _ = uffd.copy(addr & !(PAGE_SIZE - 1), src.as_ptr(), PAGE_SIZE, false);
                answered += 1;
            }
        }
    }
    answered
}
