//! The sim device's DMA engine: a thread that runs copy jobs from a queue
//! and signals a fence for each job.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use uhmm::sys::mman::Mapping;
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
    /// RAM page → device page.
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

/// Signalled when a job's copies are done.
#[derive(Debug, Default)]
pub(crate) struct Fence {
    done: Mutex<Option<Result<(), String>>>,
    cv: Condvar,
    /// Set once the job's result was posted.
    signalled: std::sync::atomic::AtomicBool,
}

impl Fence {
    /// Waits for the job. Unbounded on purpose: the engine only copies
    /// between memories that never fault, so it always finishes, and giving
    /// up early would let a late copy land in pages already reused.
    pub(crate) fn wait(&self) -> Result<()> {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = done.take() {
                return r.map_err(|msg| Error::new(ErrorKind::Fault, msg));
            }
            done = self.cv.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn signal(&self, r: Result<(), String>) {
        self.signalled.store(true, std::sync::atomic::Ordering::SeqCst);
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.cv.notify_all();
    }
}

struct Job {
    /// Injected slowness: the engine waits this long before the copies.
    delay: Duration,
    ops: Vec<CopyOp>,
    fence: Arc<Fence>,
}

impl Drop for Job {
    /// A job dropped unrun (the engine stopped) still releases its waiter.
    fn drop(&mut self) {
        let mut done = self.fence.done.lock().unwrap_or_else(|e| e.into_inner());
        if done.is_none() && !self.fence.signalled.swap(true, std::sync::atomic::Ordering::SeqCst) {
            *done = Some(Err("DMA engine stopped".into()));
            self.fence.cv.notify_all();
        }
    }
}

/// The engine: one thread, one queue.
#[derive(Debug)]
pub(crate) struct DmaEngine {
    queue: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl DmaEngine {
    pub(crate) fn start() -> Result<DmaEngine> {
        let (tx, rx) = channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("uhmm-sim-dma".into())
            .spawn(move || run(&rx))
            .map_err(|e| Error::sys("spawn DMA thread", e))?;
        Ok(DmaEngine { queue: Mutex::new(Some(tx)), thread: Mutex::new(Some(thread)) })
    }

    /// Queues `ops`; the returned fence signals when all are done.
    fn submit(&self, ops: Vec<CopyOp>, delay: Duration) -> Result<Arc<Fence>> {
        let fence = Arc::new(Fence::default());
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let tx = queue.as_ref().ok_or_else(|| Error::new(ErrorKind::NotFound, "DMA engine stopped"))?;
        tx.send(Job { delay, ops, fence: fence.clone() })
            .map_err(|_| Error::new(ErrorKind::NotFound, "DMA engine stopped"))?;
        Ok(fence)
    }

    /// Starts `ops`: returns the fence to wait on, or `None` when they are
    /// already done — an empty job, or a small one copied on the calling
    /// thread with [`Dispatch::InlineSmall`]. Each job first waits `delay` (injected slow completions; zero in
    /// normal use).
    pub(crate) fn run(&self, ops: Vec<CopyOp>, how: Dispatch, delay: Duration) -> Result<Option<Arc<Fence>>> {
        if ops.is_empty() {
            return Ok(None);
        }
        if how == Dispatch::InlineSmall && ops.len() <= INLINE_MAX_PAGES {
            std::thread::sleep(delay);
            run_ops(&ops).map_err(|msg| Error::new(ErrorKind::Fault, msg))?;
            return Ok(None);
        }
        self.submit(ops, delay).map(Some)
    }
}

impl Drop for DmaEngine {
    fn drop(&mut self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
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
    /// On the engine thread, while the caller goes on (pipelined chunks).
    Engine,
}

/// Jobs up to this many pages are copied on the caller's thread.
const INLINE_MAX_PAGES: usize = 512;

fn run(rx: &Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        std::thread::sleep(job.delay);
        let result = run_ops(&job.ops);
        job.fence.signal(result);
    }
}

/// Performs the copies of one job, stopping at the first error.
fn run_ops(ops: &[CopyOp]) -> Result<(), String> {
    static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    for op in ops {
        let r = match op {
            CopyOp::ToDevice(src, dst) => src.copy_to(&dst.chunk, dst.off),
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
