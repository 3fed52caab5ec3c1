//! The sim device's DMA engine: channels, each a thread that runs copy jobs
//! from its queue. A big job is split into parts, taken by the channels and
//! by the thread waiting for it; its fence signals when every part is done,
//! and parts (and jobs) complete in any order.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uhmm::Mapping;
use uhmm::StepAside;
use uhmm::{Error, ErrorKind, PAGE_SIZE, Result, SystemPage};

/// A page of device memory: a chunk and the offset in it.
#[derive(Debug, Clone)]
pub(crate) struct DevMem {
    pub(crate) chunk: Arc<Mapping>,
    pub(crate) off: usize,
}

/// One page copy.
#[derive(Debug)]
pub(crate) enum CopyOp {
    /// RAM pages → device pages. The engine's channels write them past
    /// the caches (non-temporal stores, as a DMA engine writes: nothing is
    /// read before it is written); a small job copied on the calling thread
    /// goes through them, as a CPU copy does.
    ToDevice(SystemPage, DevMem),
    /// Zero a device page (a hole's destination).
    Zero(DevMem),
    /// RAM page → RAM page (device-coherent memory is CPU-addressable RAM).
    Between(SystemPage, SystemPage),
    /// Zero a RAM page.
    ZeroSystem(SystemPage),
    /// An injected copy error: the job fails here.
    Fail,
}

impl CopyOp {
    /// Pages the copy writes.
    fn pages(&self) -> usize {
        match self {
            CopyOp::ToDevice(src, _) => src.pages(),
            _ => 1,
        }
    }
}

/// A job on the engine: its parts not claimed yet, and a signal when every
/// part is done. The channels claim parts from the front; a thread waiting
/// for the job claims them from the back meanwhile: on this simulated
/// device the engine's copies are CPU work too, and a CPU that would sit
/// waiting finishes the job sooner by taking a share (a real engine copies
/// beside the CPUs, and its driver would just wait).
#[derive(Debug)]
pub(crate) struct Fence {
    state: Mutex<FenceState>,
    cv: Condvar,
}

#[derive(Debug)]
struct FenceState {
    unclaimed: VecDeque<Part>,
    /// Parts not done yet (claimed or not).
    remaining: usize,
    /// The first part's error.
    error: Option<String>,
}

/// One part of a job: injected slowness first, then the copies.
#[derive(Debug)]
struct Part {
    delay: Duration,
    ops: Vec<CopyOp>,
}

/// A claimed part being run; dropping it reports the part done (on an
/// unwind too, as an error, so a waiter never waits for a lost part).
struct Running<'a> {
    fence: &'a Fence,
    result: Option<Result<(), String>>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.fence.part_done(self.result.take().unwrap_or_else(|| Err("a DMA copy panicked".into())));
    }
}

impl Fence {
    fn new(parts: Vec<Part>) -> Fence {
        let state = FenceState { remaining: parts.len(), unclaimed: parts.into(), error: None };
        Fence { state: Mutex::new(state), cv: Condvar::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FenceState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs unclaimed parts, from the front or the back, until none is left;
    /// a channel tells `aside` how long each part's copies took.
    fn work(&self, front: bool, mut aside: Option<&mut StepAside>) {
        loop {
            let part = {
                let mut state = self.lock();
                if front { state.unclaimed.pop_front() } else { state.unclaimed.pop_back() }
            };
            let Some(part) = part else { return };
            let mut running = Running { fence: self, result: None };
            std::thread::sleep(part.delay);
            let started = Instant::now();
            running.result = Some(run_ops(&part.ops, Writes::Streamed));
            if let Some(aside) = aside.as_deref_mut() {
                aside.after(started.elapsed());
            }
        }
    }

    /// Waits for the job, running the parts no channel has claimed yet.
    /// Unbounded on purpose: the engine only copies between memories that
    /// never fault, so it always finishes, and giving up early would let a
    /// late copy land in pages already reused.
    pub(crate) fn wait(&self) -> Result<()> {
        self.work(false, None);
        let mut state = self.lock();
        while state.remaining > 0 {
            state = self.cv.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.error.take().map_or(Ok(()), |msg| Err(Error::new(ErrorKind::Fault, msg)))
    }

    /// Whether every part is done (without waiting).
    pub(crate) fn is_done(&self) -> bool {
        self.lock().remaining == 0
    }

    fn part_done(&self, r: Result<(), String>) {
        let mut state = self.lock();
        if let Err(msg) = r {
            state.error.get_or_insert(msg);
        }
        state.remaining -= 1;
        if state.remaining == 0 {
            self.cv.notify_all();
        }
    }
}

/// The engine: one thread and one queue of jobs per channel.
#[derive(Debug)]
pub(crate) struct DmaEngine {
    channels: Vec<Sender<Arc<Fence>>>,
    threads: Vec<JoinHandle<()>>,
    /// Round robin for jobs too small to split.
    next: std::sync::atomic::AtomicUsize,
}

/// A job is split only into parts of at least this many pages (a merged
/// copy is never split).
const MIN_PART: usize = 64;
/// A big job gets a part for each this many pages besides one a channel,
/// so that a thread waiting for it has parts to take.
const PART_PAGES: usize = 256;

impl DmaEngine {
    /// An engine with `channels` (at least 1) copy channels.
    pub(crate) fn start(channels: usize) -> Result<DmaEngine> {
        let mut engine =
            DmaEngine { channels: Vec::new(), threads: Vec::new(), next: std::sync::atomic::AtomicUsize::new(0) };
        for c in 0..channels.max(1) {
            let (tx, rx) = channel::<Arc<Fence>>();
            // On an error the engine drops, stopping the channels started.
            let thread = std::thread::Builder::new()
                .name(format!("uhmm-sim-dma{c}"))
                .spawn(move || run(&rx))
                .map_err(|e| Error::sys("spawn DMA thread", e))?;
            engine.channels.push(tx);
            engine.threads.push(thread);
        }
        Ok(engine)
    }

    /// Queues `ops` split in order into parts (see [`PART_PAGES`]), and
    /// tells as many channels as there are parts; each part waits `delay()`
    /// first. The returned fence signals when all parts are done; parts
    /// finish in any order.
    fn submit(&self, ops: Vec<CopyOp>, delay: impl Fn() -> Duration) -> Result<Arc<Fence>> {
        let channels = &self.channels;
        if channels.is_empty() {
            return Err(Error::new(ErrorKind::NotFound, "DMA engine stopped"));
        }
        let parts: Vec<Part> = split(ops, channels.len()).into_iter().map(|ops| Part { delay: delay(), ops }).collect();
        let told = parts.len().min(channels.len());
        let fence = Arc::new(Fence::new(parts));
        let first = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for k in 0..told {
            // A channel that stopped leaves its parts to the waiter.
            let _ = channels[(first + k) % channels.len()].send(fence.clone());
        }
        Ok(fence)
    }

    /// Starts `ops`: returns the fence to wait on, or `None` when they are
    /// already done — an empty job, or a small one copied on the calling
    /// thread with [`Dispatch::InlineSmall`]. Each part of a job first waits
    /// `delay()` (injected slow completions; zero in normal use).
    pub(crate) fn run(
        &self,
        ops: Vec<CopyOp>,
        how: Dispatch,
        delay: impl Fn() -> Duration,
    ) -> Result<Option<Arc<Fence>>> {
        if ops.is_empty() {
            return Ok(None);
        }
        if how == Dispatch::InlineSmall && ops.iter().map(CopyOp::pages).sum::<usize>() <= INLINE_MAX_PAGES {
            std::thread::sleep(delay());
            run_ops(&ops, Writes::Cached).map_err(|msg| Error::new(ErrorKind::Fault, msg))?;
            return Ok(None);
        }
        self.submit(ops, delay).map(Some)
    }
}

/// Splits `ops` in order into parts of about equal pages: one a channel
/// when each gets at least [`MIN_PART`] pages, and one more for each
/// [`PART_PAGES`] pages.
fn split(ops: Vec<CopyOp>, channels: usize) -> Vec<Vec<CopyOp>> {
    let pages: usize = ops.iter().map(CopyOp::pages).sum();
    let parts = (pages / MIN_PART).clamp(1, channels + pages / PART_PAGES);
    let per_part = pages.div_ceil(parts);
    let mut out = Vec::with_capacity(parts);
    let (mut part, mut n) = (Vec::new(), 0);
    for op in ops {
        n += op.pages();
        part.push(op);
        if n >= per_part {
            out.push(std::mem::take(&mut part));
            n = 0;
        }
    }
    if !part.is_empty() {
        out.push(part);
    }
    out
}

impl Drop for DmaEngine {
    fn drop(&mut self) {
        self.channels.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Where a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dispatch {
    /// A small job (a CPU fault's window) is copied on the calling thread,
    /// as a driver would use the CPU for a small transfer: handing it to the
    /// engine thread costs a cross-CPU wake-up, longer than the copy.
    InlineSmall,
    /// On the engine's channels, while the caller goes on (pipelined chunks).
    Engine,
}

/// Jobs up to this many pages are copied on the caller's thread.
const INLINE_MAX_PAGES: usize = 512;

/// A channel: runs the parts of each job it is told of. A caller waits for
/// the parts a channel took, so after a stall in one (its vCPU taken away
/// by the host) the channel keeps off that CPU for a while: the host may stop it there again.
fn run(rx: &Receiver<Arc<Fence>>) {
    let mut aside = StepAside::new();
    while let Ok(fence) = rx.recv() {
        fence.work(true, Some(&mut aside));
    }
}

/// How device memory is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writes {
    /// Through the caches, on the calling thread, as a CPU copy does: a
    /// small job's data was usually just written and is still there.
    Cached,
    /// Past the caches, on an engine channel, as a DMA engine writes.
    /// Measured in full benchmark runs against cached copies of migrations
    /// up to 32 MiB (runs of 2 MiB, one store fence each): 32 MiB 558–771
    /// ns a page against 821–963, 8 MiB 564–829 against 674–811.
    Streamed,
}

/// Performs the copies of one job, stopping at the first error.
fn run_ops(ops: &[CopyOp], writes: Writes) -> Result<(), String> {
    static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    for op in ops {
        let r = match op {
            CopyOp::ToDevice(src, dst) if writes == Writes::Cached => src.copy_to(&dst.chunk, dst.off),
            CopyOp::ToDevice(src, dst) => src.stream_to(&dst.chunk, dst.off),
            CopyOp::Zero(dst) => dst.chunk.write(dst.off, &ZERO).map_err(|e| Error::sys("zero", e)),
            CopyOp::Between(src, dst) => {
                let mut page = vec![0u8; PAGE_SIZE];
                src.read(0, &mut page).and_then(|()| dst.write(0, &page))
            }
            CopyOp::ZeroSystem(dst) => dst.write(0, &ZERO),
            CopyOp::Fail => Err(Error::new(ErrorKind::Fault, "injected copy error")),
        };
        r.map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use uhmm::Protection;

    use super::*;

    #[test]
    fn parts_complete_out_of_order_and_the_fence_waits_for_all() {
        let engine = DmaEngine::start(3).unwrap();
        let n = 3 * MIN_PART;
        let mem = Arc::new(Mapping::anonymous(n * PAGE_SIZE, Protection::ReadWrite, PAGE_SIZE).unwrap());
        for p in 0..n {
            mem.write(p * PAGE_SIZE, &[0xff; PAGE_SIZE]).unwrap();
        }
        let mut ops: Vec<CopyOp> =
            (0..n).map(|p| CopyOp::Zero(DevMem { chunk: mem.clone(), off: p * PAGE_SIZE })).collect();
        // The first part fails halfway, and only after the others are done
        // (it waits a second: time enough for them even on a loaded machine).
        ops.insert(MIN_PART / 2, CopyOp::Fail);
        let parts = AtomicUsize::new(0);
        let delay = || {
            let k = parts.fetch_add(1, Ordering::SeqCst);
            Duration::from_millis(if k == 0 { 1000 } else { 0 })
        };
        let fence = engine.run(ops, Dispatch::Engine, delay).unwrap().expect("queued");
        assert_eq!(parts.load(Ordering::SeqCst), 3, "split across the three channels");
        // The later parts finish while the first still waits.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let zeroed = |p: usize| {
            let mut b = [1u8; 8];
            mem.read(p * PAGE_SIZE, &mut b).unwrap();
            b == [0; 8]
        };
        while !zeroed(n - 1) {
            assert!(std::time::Instant::now() < deadline, "the last part never ran");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!zeroed(0), "the first part is still waiting: completions are out of order");
        assert!(fence.wait().is_err(), "one part's error fails the job");
        assert!(zeroed(0) && !zeroed(MIN_PART / 2), "the failing part stopped at its error");
        assert!((MIN_PART + 1..n).all(zeroed), "the other parts all ran");
    }

    fn zero_ops(mem: &Arc<Mapping>, pages: std::ops::Range<usize>) -> Vec<CopyOp> {
        pages.map(|p| CopyOp::Zero(DevMem { chunk: mem.clone(), off: p * PAGE_SIZE })).collect()
    }

    #[test]
    fn big_jobs_split_in_order_into_parts_a_waiter_can_take() {
        let mem = Arc::new(Mapping::anonymous(PAGE_SIZE, Protection::ReadWrite, PAGE_SIZE).unwrap());
        let sizes = |pages: usize, channels: usize| -> Vec<usize> {
            split(zero_ops(&mem, 0..pages), channels).iter().map(Vec::len).collect()
        };
        assert_eq!(sizes(MIN_PART - 1, 4), [MIN_PART - 1], "too small to split");
        assert_eq!(sizes(3 * MIN_PART, 3), [MIN_PART; 3], "one a channel");
        assert_eq!(sizes(4 * PART_PAGES, 1), [205, 205, 205, 205, 204], "one a channel and one a PART_PAGES");
        // In order: the parts put together are the job.
        let ops = split(zero_ops(&mem, 0..1000), 2);
        let offs: Vec<usize> = ops
            .iter()
            .flatten()
            .map(|op| match op {
                CopyOp::Zero(d) => d.off,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(offs, (0..1000).map(|p| p * PAGE_SIZE).collect::<Vec<_>>());
    }

    #[test]
    fn a_waiter_runs_the_parts_no_channel_has_taken() {
        // The only channel sleeps in a first job; a second job's waiter
        // copies all of it meanwhile instead of waiting behind it.
        let engine = DmaEngine::start(1).unwrap();
        let n = 2 * PART_PAGES;
        let mem = Arc::new(Mapping::anonymous(n * PAGE_SIZE, Protection::ReadWrite, PAGE_SIZE).unwrap());
        mem.write(0, &vec![0xff; n * PAGE_SIZE]).unwrap();
        let slow = engine.run(vec![CopyOp::Fail], Dispatch::Engine, || Duration::from_secs(3)).unwrap().unwrap();
        let fence = engine.run(zero_ops(&mem, 0..n), Dispatch::Engine, || Duration::ZERO).unwrap().unwrap();
        fence.wait().unwrap();
        // The channel runs its jobs in order: it is still in the first.
        assert!(!slow.is_done(), "the second job waited for the busy channel");
        let mut page = vec![1u8; PAGE_SIZE];
        for p in 0..n {
            mem.read(p * PAGE_SIZE, &mut page).unwrap();
            assert!(page.iter().all(|&b| b == 0), "page {p} not copied");
        }
        assert!(slow.wait().is_err(), "the first job fails as injected");
    }
}
