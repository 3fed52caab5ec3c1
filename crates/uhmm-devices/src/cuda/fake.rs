//! A fake GPU behind [`GpuApi`]: device memory is host memory the program
//! cannot reach, each stream a worker thread running its queue in order,
//! the add-one kernel an honest loop over the device bytes. It checks what
//! a real GPU would refuse (copies from host memory that is not page-locked,
//! device addresses outside an allocation or a mapped host range) and
//! injects failures, so the driver's logic is tested in every build, on any
//! machine. Host memory mapped for the GPU ([`GpuApi::map_host`]) is read
//! and written in place through the address space, as a GPU does over the
//! bus.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use uhmm::{AddressSpace, Error, ErrorKind, Mapping, PAGE_SIZE, Protection, RegionMemory, Residency, Result};

use super::api::{DevPtr, GpuApi, GpuOp, Ticket};

/// Settings of a [`FakeGpu`].
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Device memory in bytes: allocations past it fail with `NoMemory`.
    /// Default: 1 GiB.
    pub capacity_bytes: usize,
    /// Streams (worker threads), at least 1. Default: 2.
    pub streams: usize,
    /// Each queued batch waits this many microseconds before it runs (a
    /// slow bus: batches then overlap with the driver's work). Default: 0.
    pub delay_us: u64,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig { capacity_bytes: 1 << 30, streams: 2, delay_us: 0 }
    }
}

/// Counts of what a [`FakeGpu`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FakeStats {
    /// Device allocations made and freed.
    pub allocs: u64,
    /// Device allocations freed.
    pub frees: u64,
    /// Host buffers registered (page-locked) now.
    pub registered: usize,
    /// Host-to-device and device-to-host copies run, and their bytes.
    pub htod: u64,
    /// Device-to-host copies run.
    pub dtoh: u64,
    /// Bytes copied either way.
    pub bytes: u64,
    /// Kernel launches run.
    pub kernels: u64,
    /// Host ranges mapped for the GPU, in all.
    pub host_maps: u64,
    /// Bytes of host memory mapped for the GPU now.
    pub host_mapped_bytes: usize,
    /// Bytes the kernel updated in mapped host memory, in place.
    pub host_kernel_bytes: u64,
}

/// A GPU made of host memory and threads (see the module doc).
#[derive(Debug)]
pub struct FakeGpu {
    shared: Arc<Shared>,
    queues: Vec<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    config: FakeConfig,
}

#[derive(Debug)]
struct Shared {
    /// Allocations by base address (`index << 40`).
    mem: Mutex<HashMap<DevPtr, Arc<Mapping>>>,
    used: AtomicUsize,
    next_alloc: AtomicU64,
    /// Page-locked host buffers, by address.
    registered: Mutex<HashSet<usize>>,
    /// Host ranges mapped for the GPU, by address: length and space.
    host: Mutex<BTreeMap<usize, (usize, AddressSpace)>>,
    done: Mutex<HashMap<u64, Option<std::result::Result<(), String>>>>,
    done_cv: Condvar,
    next_ticket: AtomicU64,
    fail_htod: AtomicUsize,
    fail_dtoh: AtomicUsize,
    fail_alloc: AtomicUsize,
    stats: Mutex<FakeStats>,
}

struct Job {
    ticket: u64,
    ops: Vec<GpuOp>,
}

const ALLOC_SHIFT: u32 = 40;

/// Device addresses of mapped host memory: the host address with this bit.
const HOST_BIT: DevPtr = 1 << 62;

impl FakeGpu {
    /// Starts a fake GPU: one thread per stream.
    pub fn new(config: FakeConfig) -> Result<FakeGpu> {
        if config.streams == 0 {
            return Err(Error::invalid("FakeConfig: streams must be > 0"));
        }
        let shared = Arc::new(Shared {
            mem: Mutex::new(HashMap::new()),
            used: AtomicUsize::new(0),
            next_alloc: AtomicU64::new(1),
            registered: Mutex::new(HashSet::new()),
            host: Mutex::new(BTreeMap::new()),
            done: Mutex::new(HashMap::new()),
            done_cv: Condvar::new(),
            next_ticket: AtomicU64::new(1),
            fail_htod: AtomicUsize::new(0),
            fail_dtoh: AtomicUsize::new(0),
            fail_alloc: AtomicUsize::new(0),
            stats: Mutex::new(FakeStats::default()),
        });
        let mut queues = Vec::new();
        let mut workers = Vec::new();
        for s in 0..config.streams {
            let (tx, rx) = channel::<Job>();
            let sh = shared.clone();
            let delay = std::time::Duration::from_micros(config.delay_us);
            let worker = std::thread::Builder::new()
                .name(format!("fake-gpu-stream-{s}"))
                .spawn(move || {
                    for job in rx {
                        std::thread::sleep(delay);
                        let result = job.ops.iter().try_for_each(|op| sh.run(op));
                        let mut done = lock(&sh.done);
                        done.insert(job.ticket, Some(result));
                        sh.done_cv.notify_all();
                    }
                })
                .map_err(|e| Error::sys("spawning a fake GPU stream", e))?;
            queues.push(tx);
            workers.push(worker);
        }
        Ok(FakeGpu { shared, queues, workers, config })
    }

    /// The next `n` host-to-device copies fail (the error comes with their
    /// ticket, as an asynchronous CUDA error does).
    pub fn fail_next_htod(&self, n: usize) {
        self.shared.fail_htod.store(n, Ordering::SeqCst);
    }

    /// The next `n` device-to-host copies fail.
    pub fn fail_next_dtoh(&self, n: usize) {
        self.shared.fail_dtoh.store(n, Ordering::SeqCst);
    }

    /// The next `n` device allocations fail with `NoMemory`.
    pub fn fail_next_alloc(&self, n: usize) {
        self.shared.fail_alloc.store(n, Ordering::SeqCst);
    }

    /// What the fake did so far.
    pub fn stats(&self) -> FakeStats {
        let mut s = *lock(&self.shared.stats);
        s.registered = lock(&self.shared.registered).len();
        s
    }

    /// Device bytes allocated now.
    pub fn used_bytes(&self) -> usize {
        self.shared.used.load(Ordering::SeqCst)
    }
}

impl Drop for FakeGpu {
    fn drop(&mut self) {
        self.queues.clear();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Checks that the pages of a mapped host range are still in RAM: a GPU
/// keeps using the pages it pinned, so a page moved or unmapped while
/// mapped would have been read and written stale (its driver had to drop
/// the map first).
fn still_in_ram(space: &AddressSpace, range: std::ops::Range<usize>) -> std::result::Result<(), String> {
    let snap = space.snapshot(range.clone()).map_err(|e| e.to_string())?;
    match snap.iter().position(|p| !matches!(p.residency, Residency::Ram | Residency::Zero)) {
        None => Ok(()),
        Some(i) => Err(format!(
            "the page at {:#x}, mapped for the GPU, changed under the map ({:?}): a GPU would have used the old one",
            range.start + i * PAGE_SIZE,
            snap[i].residency
        )),
    }
}

/// The kernel: one "thread" per 32-bit word.
fn add_one(words: &mut [u8]) {
    for w in words.chunks_exact_mut(4) {
        let v = u32::from_ne_bytes([w[0], w[1], w[2], w[3]]).wrapping_add(1);
        w.copy_from_slice(&v.to_ne_bytes());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes one from a fault-injection counter, if it is above zero.
fn take(counter: &AtomicUsize) -> bool {
    counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

impl Shared {
    /// The allocation holding `len` bytes at `ptr`, and the offset in it.
    fn locate(&self, ptr: DevPtr, len: usize) -> std::result::Result<(Arc<Mapping>, usize), String> {
        let base = ptr >> ALLOC_SHIFT << ALLOC_SHIFT;
        let off = (ptr - base) as usize;
        let mem = lock(&self.mem);
        match mem.get(&base) {
            Some(m) if off + len <= m.len() => Ok((m.clone(), off)),
            _ => Err(format!("CUDA_ERROR_ILLEGAL_ADDRESS: {len} bytes at {ptr:#x}")),
        }
    }

    /// The space of the mapped host range holding `len` bytes at `addr`.
    fn host_space(&self, addr: usize, len: usize) -> std::result::Result<AddressSpace, String> {
        match lock(&self.host).range(..=addr).next_back() {
            Some((&start, (n, space))) if addr + len <= start + n => Ok(space.clone()),
            _ => Err(format!("CUDA_ERROR_ILLEGAL_ADDRESS: {len} bytes of host memory at {addr:#x}, not mapped")),
        }
    }

    fn check_locked(&self, buf: &Mapping) -> std::result::Result<(), String> {
        if lock(&self.registered).contains(&buf.addr()) {
            Ok(())
        } else {
            Err("a copy from host memory that is not page-locked".to_owned())
        }
    }

    fn run(&self, op: &GpuOp) -> std::result::Result<(), String> {
        let io = |e: std::io::Error| e.to_string();
        match op {
            GpuOp::HtoD { dst, src, off, len } => {
                self.check_locked(src)?;
                if take(&self.fail_htod) {
                    return Err("injected host-to-device copy error".to_owned());
                }
                let (dev, doff) = self.locate(*dst, *len)?;
                src.copy_to(*off, &dev, doff, *len).map_err(io)?;
                self.count(|s| {
                    s.htod += 1;
                    s.bytes += *len as u64;
                });
            }
            GpuOp::DtoH { dst, off, src, len } => {
                self.check_locked(dst)?;
                if take(&self.fail_dtoh) {
                    return Err("injected device-to-host copy error".to_owned());
                }
                let (dev, soff) = self.locate(*src, *len)?;
                dev.copy_to(soff, dst, *off, *len).map_err(io)?;
                self.count(|s| {
                    s.dtoh += 1;
                    s.bytes += *len as u64;
                });
            }
            GpuOp::Zero { dst, len } => {
                let (dev, doff) = self.locate(*dst, *len)?;
                dev.write(doff, &vec![0; *len]).map_err(io)?;
            }
            GpuOp::AddOne { dst, len } if dst & HOST_BIT != 0 => {
                let addr = (dst & !HOST_BIT) as usize;
                let space = self.host_space(addr, *len)?;
                let mut words = vec![0u8; *len];
                still_in_ram(&space, addr..addr + len)?;
                space.read_at(addr, &mut words).map_err(|e| e.to_string())?;
                add_one(&mut words);
                space.write_at(addr, &words).map_err(|e| e.to_string())?;
                still_in_ram(&space, addr..addr + len)?;
                self.count(|s| {
                    s.kernels += 1;
                    s.host_kernel_bytes += *len as u64;
                });
            }
            GpuOp::AddOne { dst, len } => {
                let (dev, doff) = self.locate(*dst, *len)?;
                let mut words = vec![0u8; *len];
                dev.read(doff, &mut words).map_err(io)?;
                add_one(&mut words);
                dev.write(doff, &words).map_err(io)?;
                self.count(|s| s.kernels += 1);
            }
        }
        Ok(())
    }

    fn count(&self, f: impl FnOnce(&mut FakeStats)) {
        f(&mut lock(&self.stats));
    }
}

impl GpuApi for FakeGpu {
    fn name(&self) -> String {
        format!("fake GPU ({} MiB, {} streams)", self.config.capacity_bytes >> 20, self.config.streams)
    }

    fn streams(&self) -> usize {
        self.config.streams
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        let sh = &self.shared;
        if bytes == 0 || bytes >= 1 << ALLOC_SHIFT || !bytes.is_multiple_of(PAGE_SIZE) {
            return Err(Error::invalid("fake GPU: allocation size"));
        }
        if take(&sh.fail_alloc) {
            return Err(Error::new(ErrorKind::NoMemory, "fake GPU: injected allocation failure"));
        }
        let before = sh.used.fetch_add(bytes, Ordering::SeqCst);
        if before + bytes > self.config.capacity_bytes {
            sh.used.fetch_sub(bytes, Ordering::SeqCst);
            return Err(Error::new(ErrorKind::NoMemory, "fake GPU: CUDA_ERROR_OUT_OF_MEMORY"));
        }
        let mapping = match Mapping::anonymous(bytes, Protection::ReadWrite, PAGE_SIZE) {
            Ok(m) => m,
            Err(e) => {
                sh.used.fetch_sub(bytes, Ordering::SeqCst);
                return Err(Error::sys("fake GPU memory", e));
            }
        };
        let base = sh.next_alloc.fetch_add(1, Ordering::SeqCst) << ALLOC_SHIFT;
        lock(&sh.mem).insert(base, Arc::new(mapping));
        sh.count(|s| s.allocs += 1);
        Ok(base)
    }

    fn free(&self, ptr: DevPtr, bytes: usize) {
        if lock(&self.shared.mem).remove(&ptr).is_some() {
            self.shared.used.fetch_sub(bytes, Ordering::SeqCst);
            self.shared.count(|s| s.frees += 1);
        } else {
            tracing::error!(ptr, "fake GPU: free of an address it did not allocate");
        }
    }

    fn register(&self, buf: &Mapping) -> Result<()> {
        if !lock(&self.shared.registered).insert(buf.addr()) {
            return Err(Error::invalid("CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED"));
        }
        Ok(())
    }

    fn unregister(&self, buf: &Mapping) {
        lock(&self.shared.registered).remove(&buf.addr());
    }

    fn map_host(&self, space: &AddressSpace, mem: &RegionMemory) -> Result<DevPtr> {
        let (addr, len) = (mem.addr(), mem.len());
        let mut host = lock(&self.shared.host);
        let overlaps = host.range(..addr + len).next_back().is_some_and(|(&start, (n, _))| start + n > addr);
        if overlaps {
            return Err(Error::invalid("CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED"));
        }
        host.insert(addr, (len, space.clone()));
        drop(host);
        self.shared.count(|s| {
            s.host_maps += 1;
            s.host_mapped_bytes += len;
        });
        Ok(addr as DevPtr | HOST_BIT)
    }

    fn unmap_host(&self, addr: usize) {
        match lock(&self.shared.host).remove(&addr) {
            Some((len, _)) => self.shared.count(|s| s.host_mapped_bytes -= len),
            None => tracing::error!(addr, "fake GPU: unmap_host of a range it did not map"),
        }
    }

    fn submit(&self, stream: usize, ops: Vec<GpuOp>) -> Result<Ticket> {
        let ticket = self.shared.next_ticket.fetch_add(1, Ordering::SeqCst);
        lock(&self.shared.done).insert(ticket, None);
        let queue = &self.queues[stream % self.queues.len()];
        if queue.send(Job { ticket, ops }).is_err() {
            lock(&self.shared.done).remove(&ticket);
            return Err(Error::new(ErrorKind::Sys, "fake GPU: stream stopped"));
        }
        Ok(Ticket(ticket))
    }

    fn wait(&self, ticket: Ticket) -> Result<()> {
        let mut done = lock(&self.shared.done);
        loop {
            match done.get(&ticket.0) {
                Some(Some(_)) => break,
                Some(None) => done = self.shared.done_cv.wait(done).unwrap_or_else(|e| e.into_inner()),
                None => return Err(Error::invalid("fake GPU: unknown ticket")),
            }
        }
        match done.remove(&ticket.0).flatten() {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(Error::new(ErrorKind::Sys, format!("fake GPU: {e}"))),
            None => Err(Error::invalid("fake GPU: unknown ticket")),
        }
    }

    fn is_done(&self, ticket: &Ticket) -> bool {
        matches!(lock(&self.shared.done).get(&ticket.0), Some(Some(_)))
    }
}
