//! The fault engine: threads that read userfaults and resolve them.
//!
//! A fault on a page uhmm never populated is answered with the zero page over
//! an aligned window (one ioctl for many pages). A fault on a device page
//! calls the owning driver's `migrate_to_ram` with a fault-around window. A
//! fault on a locked page is parked: the unlocker wakes the thread, which
//! retries the access and faults again if the page is still away.
//!
//! Lessons the code below relies on (the kernel's userfaultfd rules):
//! - `EAGAIN` from a resolving ioctl means non-cooperative events are
//!   pending; the fault is queued again and retried after the next read.
//! - `EEXIST` means someone installed the page already: success, just wake.
//! - The same fault can be read twice (several threads, or a retry), and
//!   faults arrive in any order; every step tolerates a page that changed.
//! - A fault read is stale once its thread was woken (the kernel drops the
//!   faults it has not handed out yet). So a fault on a device page that was
//!   read before the page moved to the device is only woken: if its thread
//!   still waits, it faults again, and that fault is served. Otherwise a
//!   late copy of an old fault would bring back pages no one touches.
//! - Handler threads never wait for a page lock (a fault on a locked page is
//!   parked). They do wait for drivers (`migrate_to_ram`, its DMA fence),
//!   for mirror locks in notifier callbacks, and for a fork being prepared;
//!   none of those waits on a handler thread, because uhmm's own copies
//!   touch only staging memory or pages they hold present. So a handler
//!   cannot deadlock against the work it serves.

use std::cell::Cell;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::io::Errno;

use crate::pagemap::DevicePage;
use crate::pte::State;
use crate::region::RegionInner;
use crate::space::{AddressSpace, SpaceInner};
use uhmm_sys::stall::StepAside;
use crate::stats::Stats;
use uhmm_sys::PAGE_SIZE;
use uhmm_sys::uffd::Event;
use crate::{Error, ErrorKind, Result};

/// A CPU fault on device memory, handed to
/// [`DevicePagemapOps::migrate_to_ram`](crate::DevicePagemapOps::migrate_to_ram)
/// (the kernel's `struct vm_fault`).
#[derive(Debug)]
pub struct CpuFault {
    space: AddressSpace,
    addr: usize,
    window: Range<usize>,
    page: DevicePage,
}

impl CpuFault {
    pub(crate) fn new(space: AddressSpace, addr: usize, window: Range<usize>, page: DevicePage) -> CpuFault {
        CpuFault { space, addr, window, page }
    }

    /// The address space of the fault.
    pub fn space(&self) -> &AddressSpace {
        &self.space
    }

    /// The faulting page's address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// The fault-around window (page-aligned, inside one region, containing
    /// `addr`): the range a driver should migrate back.
    pub fn window(&self) -> Range<usize> {
        self.window.clone()
    }

    /// The device page the faulting address maps.
    pub fn page(&self) -> DevicePage {
        self.page
    }
}

/// The running handler threads of one address space.
#[derive(Debug)]
pub(crate) struct Engine {
    stop: OwnedFd,
    threads: Vec<JoinHandle<()>>,
    pub(crate) alive: Arc<AtomicUsize>,
}

impl Engine {
    pub(crate) fn start(space: &Arc<SpaceInner>) -> Result<Engine> {
        let stop = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| Error::sys("eventfd", e))?;
        let alive = Arc::new(AtomicUsize::new(0));
        let mut engine = Engine { stop, threads: Vec::new(), alive };
        for i in 0..space.config.handler_threads {
            let weak = Arc::downgrade(space);
            let uffd = space.uffd.fd().try_clone_to_owned().map_err(|e| Error::sys("dup", e))?;
            let stop = engine.stop.try_clone().map_err(|e| Error::sys("dup", e))?;
            let alive = engine.alive.clone();
            alive.fetch_add(1, Ordering::SeqCst);
            let cpus = &space.config.handler_cpus;
            let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
            let t = std::thread::Builder::new().name(format!("uhmm-fault-{i}")).spawn(move || {
                if let Some(cpu) = cpu
                    && let Err(err) = uhmm_sys::process::set_thread_cpus(&[cpu])
                {
                    // Checked against the allowed CPUs at creation; a CPU
                    // taken away since only costs the placement.
                    tracing::warn!(%err, cpu, "cannot pin a fault handler");
                }
                ON_HANDLER.with(|h| h.set(true));
                handler_loop(&weak, &uffd, &stop);
                alive.fetch_sub(1, Ordering::SeqCst);
            });
            match t {
                Ok(t) => engine.threads.push(t),
                Err(e) => {
                    engine.alive.fetch_sub(1, Ordering::SeqCst);
                    engine.stop();
                    return Err(Error::sys("spawn fault handler", e));
                }
            }
        }
        Ok(engine)
    }

    /// Tells the threads to stop and joins them (except the calling thread,
    /// when the last handle was dropped by a handler itself).
    pub(crate) fn stop(self) {
        if let Err(err) = rustix::io::write(&self.stop, &1u64.to_ne_bytes()) {
            tracing::error!(%err, "cannot signal fault handlers to stop");
        }
        let me = std::thread::current().id();
        for t in self.threads {
            if t.thread().id() != me && t.join().is_err() {
                tracing::error!("a fault handler thread panicked");
            }
        }
    }
}

fn handler_loop(space: &Weak<SpaceInner>, uffd: &OwnedFd, stop: &OwnedFd) {
    let mut queue = FaultQueue::default();
    let mut events = Vec::with_capacity(64);
    let retry = Timespec { tv_sec: 0, tv_nsec: 1_000_000 };
    // Whether to read again before polling: the last read found faults and
    // none waits for a retry. Once a fault is answered the next is often
    // queued already (on one CPU, the woken program ran and faulted before
    // this thread got the CPU back), and a read alone then finds it.
    let mut read_first = false;
    // Where a sequential scan will fault next: brought back once idle.
    let mut ahead: Option<ReadAhead> = None;
    // A scan waits for this thread's work (see `timed`).
    let mut aside = StepAside::new();
    loop {
        if !read_first {
            if let Some(next) = ahead.take() {
                let Some(space) = space.upgrade() else { return };
                let _ = timed(&mut aside, &space, || {
                    guarded(next.addr, || {
                        read_ahead(&space, next, &mut ahead);
                        Ok(())
                    })
                });
                // Faults may have come meanwhile: read before polling.
                read_first = true;
                continue;
            }
            let mut fds = [PollFd::new(uffd, PollFlags::IN), PollFd::new(stop, PollFlags::IN)];
            let timeout = if queue.is_empty() { None } else { Some(&retry) };
            match rustix::event::poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(err) => {
                    tracing::error!(%err, "poll on userfaultfd failed; handler exits");
                    return;
                }
            }
            if !fds[1].revents().is_empty() {
                return;
            }
        }
        let Some(space) = space.upgrade() else { return };
        events.clear();
        let read_at = space.to_device_epoch.load(Ordering::SeqCst);
        let read = match space.uffd.read_events(&mut events, 64) {
            Ok(n) => n,
            Err(err) => {
                tracing::error!(%err, "reading userfaultfd failed");
                0
            }
        };
        for ev in &events {
            match *ev {
                Event::PageFault { addr, write, .. } => {
                    Stats::add(&space.stats.faults, 1);
                    if !queue.push(Fault { addr: addr & !(PAGE_SIZE - 1), write, read_at }) {
                        Stats::add(&space.stats.duplicate_faults, 1);
                    }
                }
                other => tracing::warn!(?other, "unexpected userfaultfd event"),
            }
        }
        let wake = |addr| {
            let _ = space.uffd.wake(addr, PAGE_SIZE);
        };
        timed(&mut aside, &space, || {
            queue.drain(|fault| guarded(fault.addr, || resolve(&space, fault, &mut ahead)), wake)
        });
        read_first = read > 0 && queue.is_empty();
    }
}

/// Runs `f`, a piece of a handler's work; after a stall in it the handler
/// keeps off its CPU for a while: the host may stop that vCPU again, and
/// the faulting threads wait for this one.
fn timed<T>(aside: &mut StepAside, space: &SpaceInner, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    if aside.after(started.elapsed()) {
        Stats::add(&space.stats.handler_stalls, 1);
    }
    out
}

/// Runs `f`, which calls driver code, for the page at `addr`: a panic in it
/// must not take the fault engine down (the migration's Drop has restored
/// the pages; a faulting thread retries).
fn guarded(addr: usize, f: impl FnOnce() -> Result<(), Errno>) -> Result<(), Errno> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        tracing::error!(addr, "resolving a fault panicked (driver bug?)");
        Err(Errno::IO)
    })
}

/// A userfault to resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fault {
    /// The faulting page's address.
    pub(crate) addr: usize,
    /// A write access.
    pub(crate) write: bool,
    /// The space's `to_device_epoch` before the fault was read.
    pub(crate) read_at: u64,
}

/// Faults waiting to be resolved, with their failed attempts, without
/// duplicates, in arrival order.
#[derive(Debug, Default)]
pub(crate) struct FaultQueue {
    pending: Vec<(Fault, u8)>,
}

/// Failed resolutions of a fault, each a poll round (1 ms) apart, before its
/// thread is woken to fault again: an error that persists is retried at a
/// walking pace, not in a hot loop of wake, fault, fail.
const FAULT_ATTEMPTS: u8 = 4;

impl FaultQueue {
    /// Queues `fault`; false if its page is already queued (the queued one
    /// then takes a write access, and the later read: the thread waited then).
    pub(crate) fn push(&mut self, fault: Fault) -> bool {
        if let Some((f, _)) = self.pending.iter_mut().find(|(f, _)| f.addr == fault.addr) {
            f.write |= fault.write;
            f.read_at = f.read_at.max(fault.read_at);
            return false;
        }
        self.pending.push((fault, 0));
        true
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Resolves every queued fault with `resolve`. Those answered with
    /// `EAGAIN` stay queued for the next round; a failed one stays queued
    /// for up to [`FAULT_ATTEMPTS`] rounds, then its thread is woken; the
    /// rest leave the queue.
    pub(crate) fn drain(&mut self, mut resolve: impl FnMut(Fault) -> Result<(), Errno>, mut wake: impl FnMut(usize)) {
        self.pending.retain_mut(|(fault, failed)| match resolve(*fault) {
            Ok(()) => false,
            Err(Errno::AGAIN) => true,
            Err(err) => {
                *failed += 1;
                if *failed < FAULT_ATTEMPTS {
                    return true;
                }
                // Wake the thread anyway: it retries (and faults again)
                // rather than waiting forever.
                tracing::error!(%err, addr = fault.addr, "fault could not be resolved");
                wake(fault.addr);
                false
            }
        });
    }
}

thread_local! {
    /// The page whose device fault this thread is resolving, and whether a
    /// wake by this thread has covered it since (see [`watch_wakes`]).
    static WATCHED: Cell<(usize, bool)> = const { Cell::new((usize::MAX, false)) };
    /// Whether this thread is a fault handler (see [`on_handler_thread`]).
    static ON_HANDLER: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is one of the fault engine's handlers: a
/// migration it makes is a fault's window or a scan's read-ahead, which a
/// faulting thread waits for (or soon will).
pub(crate) fn on_handler_thread() -> bool {
    ON_HANDLER.with(Cell::get)
}

/// Runs `f` noting whether this thread wakes the threads faulting on the
/// page at `addr` meanwhile (through [`noted_wake`]): a fault's
/// `migrate_to_ram` normally ends with its migration waking the installed
/// pages, and a second wake of the same page would be a wasted system call.
fn watch_wakes<T>(addr: usize, f: impl FnOnce() -> T) -> (T, bool) {
    WATCHED.with(|w| w.set((addr, false)));
    let out = f();
    let woken = WATCHED.with(|w| w.replace((usize::MAX, false)).1);
    (out, woken)
}

/// Notes that this thread woke the threads faulting in `range` (for
/// [`watch_wakes`]).
pub(crate) fn noted_wake(range: Range<usize>) {
    WATCHED.with(|w| {
        let (watched, _) = w.get();
        if range.contains(&watched) {
            w.set((watched, true));
        }
    });
}

/// Resolves `fault`. A fault on a device page in a sequential scan sets
/// `ahead` to the address where the scan will fault next.
pub(crate) fn resolve(space: &Arc<SpaceInner>, fault: Fault, ahead: &mut Option<ReadAhead>) -> Result<(), Errno> {
    let Fault { addr, write, read_at } = fault;
    let Some(region) = space.region_at(addr) else {
        // Not in any region: a stale fault for a region that is being (or
        // was) unmapped — whose addresses may already belong to a new
        // region, even of another address space — or a stray access to a
        // staging arena (a uhmm bug). Poisoning is only for the latter: an
        // address that may be someone else's page now must never be
        // poisoned. The thread retries; an unmapped address gets SIGSEGV.
        let own_arena = [&space.stage.map, &space.pool.map, &space.huge_pool.map]
            .iter()
            .any(|m| addr >= m.addr() && addr - m.addr() < m.len());
        if own_arena {
            tracing::error!(addr, "fault on a staging arena: poisoning the page");
            return match space.uffd.poison(addr, PAGE_SIZE, false) {
                Ok(_) => Ok(()),
                Err(p) if p.errno == Errno::EXIST => space.uffd.wake(addr, PAGE_SIZE),
                Err(p) => Err(p.errno),
            };
        }
        return space.uffd.wake(addr, PAGE_SIZE);
    };
    // The region may have moved (`Region::remap`) since it was looked up.
    let Some(idx) = region.index_of(addr) else {
        return space.uffd.wake(addr, PAGE_SIZE);
    };
    let mut single = false;
    for attempt in 0..1000 {
        let entry = region.pt.load(idx);
        if entry.locked() {
            if region.pt.add_fault_waiter(idx) {
                Stats::add(&space.stats.deferred_faults, 1);
                return Ok(());
            }
            continue;
        }
        match entry.state() {
            State::Cpu => match zero_fill(space, &region, idx, write) {
                Err(Errno::INPROGRESS) => continue,
                other => return other,
            },
            State::Poisoned => return poison_install(space, &region, idx),
            State::Exclusive(slot) => match crate::exclusive::revoke(space, &region, idx, slot) {
                Err(Errno::INPROGRESS) => continue,
                other => return other,
            },
            State::Device(_) if region.to_device_at.load(Ordering::SeqCst) > read_at => {
                // Maybe stale (see the module docs): a waiting thread faults again.
                Stats::add(&space.stats.stale_faults, 1);
                return space.uffd.wake(addr, PAGE_SIZE);
            }
            State::Device(page) => {
                Stats::add(&space.stats.migrate_to_ram, 1);
                let ops = space.pagemap(page.pagemap).and_then(|pm| pm.ops());
                let (window, next) = if single {
                    (addr..addr + PAGE_SIZE, None)
                } else {
                    let (window, next, _) = fault_window(space, &region, idx, None);
                    (window, next)
                };
                let (result, woken) = match ops {
                    Some(ops) => {
                        let fault = CpuFault { space: AddressSpace { inner: space.clone() }, addr, window, page };
                        watch_wakes(addr, || ops.migrate_to_ram(&fault))
                    }
                    None => (Err(Error::new(ErrorKind::NotFound, "the device is gone")), false),
                };
                if let Err(err) = result {
                    if matches!(err.kind(), ErrorKind::NoMemory | ErrorKind::Busy) {
                        // Transient (staging or device memory short, a
                        // fence slow): retry rather than lose the page.
                        tracing::warn!(%err, addr, "migrate_to_ram failed transiently; retrying");
                        std::thread::sleep(std::time::Duration::from_micros(100));
                        continue;
                    }
                    if err.kind() == ErrorKind::InvalidArgument && !single {
                        // The driver refused the window: ask for the page alone.
                        tracing::warn!(%err, addr, "migrate_to_ram refused the window; retrying one page");
                        single = true;
                        continue;
                    }
                    tracing::error!(%err, addr, "migrate_to_ram failed: poisoning the page");
                    poison_page(space, &region, idx, page);
                } else if region.pt.load(idx).is_cpu_unlocked() {
                    // A scan's fault replaces the read-ahead to do; any
                    // other leaves it (glibc's memcpy touches a large
                    // read's last bytes first: a fault beside the scan).
                    let windows = space.config.read_ahead_windows;
                    if let Some(i) = next.filter(|_| windows > 0) {
                        *ahead = Some(ReadAhead { addr: region.addr_of(i), windows, read_at });
                    }
                    // Back in RAM. Its migration woke the thread, unless the
                    // page came back some other way (say, discarded meanwhile).
                    return if woken { Ok(()) } else { space.uffd.wake(addr, PAGE_SIZE) };
                }
                if attempt > 0 {
                    std::thread::yield_now();
                }
            }
        }
    }
    tracing::error!(addr, "fault did not settle after 1000 attempts; waking the thread to retry");
    space.uffd.wake(addr, PAGE_SIZE)
}

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
/// chunk of a read starts above the one before); else the aligned base
/// window. Every window is clipped to the faulting page's [`BLOCK_PAGES`]
/// block.
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
}

/// Scans a region tracks at once.
const SCAN_STREAMS: usize = 4;

/// Pages of a fault-around block: no window leaves the aligned 2 MiB block
/// (counted from the region's start, 2 MiB-aligned for regions that large)
/// of the page that faulted, as UVM keeps faults inside its 2 MiB VA
/// blocks. A scan's doubling windows follow evidence of a sequential
/// access, but unclipped they could run up to `fault_around_max_pages`
/// past the last page read; clipped, what a fault brings back never leaves
/// the block the program touched. A scan that crosses a block goes on with
/// its size in the next one.
const BLOCK_PAGES: usize = crate::HUGE_SIZE / PAGE_SIZE;

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
struct Proposal {
    pages: Range<usize>,
    /// Its size before clipping.
    size: usize,
    /// The scan it continues (its direction) or starts.
    stream: usize,
    scan: Option<Scan>,
    /// A fault on the scan's marker: its windows stay as they are, and
    /// its read-ahead goes on from `resume` (their far end).
    on_marker: bool,
    resume: Option<usize>,
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
        ScanWindow { streams: std::array::from_fn(|_| stream()), clock: AtomicUsize::new(0) }
    }
}

impl ScanWindow {
    /// The window for a fault on page `idx` of a region of `npages` pages,
    /// inside the fault-around block of `idx` ([`BLOCK_PAGES`]);
    /// `in_ram_below` counts the pages in RAM just below it (up to `max`),
    /// asked only of a fault that starts a scan.
    fn propose(
        &self,
        idx: usize,
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
                    let size = grown();
                    return Proposal::new(idx..(idx + size).min(hi), size, stream, Some(Scan::Up));
                }
                if s.start.load(Relaxed) == idx + 1 {
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
        let start = idx - idx % base;
        Proposal::new(start.max(lo)..(start + base).min(hi), base, stream, None)
    }

    /// Notes the window taken for `proposal`: `pages` (clipped). A fault
    /// on a marker leaves the scan's windows as they are.
    fn record(&self, proposal: &Proposal, pages: &Range<usize>) {
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
    fn leave_marker(&self, proposal: &Proposal, idx: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.streams[proposal.stream];
        s.down.store(proposal.scan == Some(Scan::Down), Relaxed);
        s.marker.store(idx, Relaxed);
    }
}

/// A read-ahead to do: the page where a sequential scan comes next, how
/// many windows may still be brought back before the scan faults again,
/// and the space's `to_device_epoch` when the scan's fault was read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadAhead {
    addr: usize,
    windows: usize,
    read_at: u64,
}

/// The direction of a sequential scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    Up,
    Down,
}

/// The fault-around window for page `idx` ([`ScanWindow`]), clipped to the
/// region, to one protection run and to mapped pages; and, in a sequential
/// scan, the page the scan reaches next (for a read-ahead). With
/// `marker` (a scan's last read-ahead window, in a region of small pages:
/// page `idx`'s device page), the window leaves page `idx` on the device
/// as the scan's marker when the page after it in the scan's direction is
/// on the same device: that page and its address are returned, for the
/// migration to be asked for in place of `idx`'s.
fn fault_window(
    space: &SpaceInner,
    region: &RegionInner,
    idx: usize,
    marker: Option<DevicePage>,
) -> (Range<usize>, Option<usize>, Option<(usize, DevicePage)>) {
    let (base, max) = (space.config.fault_around_pages, space.config.fault_around_max_pages);
    let in_ram_below = || (1..=idx.min(max)).take_while(|&k| region.pt.load(idx - k).state() == State::Cpu).count();
    let proposal = region.fault_around.propose(idx, base, max, region.npages(), in_ram_below);
    // Only pages a migration may take: one protection run, nothing unmapped.
    let mut pages = region
        .prot_runs(proposal.pages.clone())
        .into_iter()
        .find(|(r, _)| r.contains(&idx))
        .map_or(idx..idx + 1, |(r, _)| r);
    while pages.len() > 1 && region.has_unmapped(&pages) {
        pages = if region.has_unmapped(&(pages.start..idx)) {
            pages.start + 1..pages.end
        } else {
            pages.start..pages.end - 1
        };
    }
    region.fault_around.record(&proposal, &pages);
    let next = match proposal.scan {
        _ if proposal.on_marker => proposal.resume,
        Some(Scan::Up) => Some(pages.end).filter(|&i| i < region.npages()),
        Some(Scan::Down) => pages.start.checked_sub(1),
        None => None,
    };
    let mut instead = None;
    if let Some(marker) = marker.filter(|_| next.is_some() && !proposal.on_marker && !region.huge && pages.len() > 1) {
        let after = match proposal.scan {
            Some(Scan::Up) if pages.start == idx => Some(idx + 1),
            Some(Scan::Down) if pages.end == idx + 1 => Some(idx - 1),
            _ => None,
        };
        if let Some(after) = after {
            let entry = region.pt.load(after);
            if let (State::Device(page), false) = (entry.state(), entry.locked())
                && page.pagemap == marker.pagemap
            {
                pages = if after > idx { after..pages.end } else { pages.start..idx };
                region.fault_around.leave_marker(&proposal, idx);
                instead = Some((region.addr_of(after), page));
            }
        }
    }
    (region.addr_of(pages.start)..region.addr_of(pages.end), next, instead)
}

/// Brings back the window a sequential scan reaches next, at `addr`, as the
/// scan's fault there would, while the handler has nothing else to do: the
/// scan then reads one window while the next comes back, and takes fewer
/// faults. Does nothing where the page is not on a device or is locked (a
/// migration has it), nor once pages of the region moved to a device after
/// the scan's fault (the program is moving them: a read-ahead would undo
/// its migration); a failure is left to the scan's own fault. Sets `ahead`
/// to the window after, while `at` allows more.
fn read_ahead(space: &Arc<SpaceInner>, at: ReadAhead, ahead: &mut Option<ReadAhead>) {
    let addr = at.addr;
    let Some((region, idx)) = space.region_at(addr).and_then(|r| r.index_of(addr).map(|i| (r, i))) else {
        return;
    };
    if region.to_device_at.load(Ordering::SeqCst) > at.read_at {
        return;
    }
    let entry = region.pt.load(idx);
    let (State::Device(page), false) = (entry.state(), entry.locked()) else {
        return;
    };
    let Some(ops) = space.pagemap(page.pagemap).and_then(|pm| pm.ops()) else {
        return;
    };
    let (window, next, instead) = fault_window(space, &region, idx, (at.windows == 1).then_some(page));
    let (addr, page) = instead.unwrap_or((addr, page));
    Stats::add(&space.stats.migrate_to_ram, 1);
    Stats::add(&space.stats.read_aheads, 1);
    let fault = CpuFault { space: AddressSpace { inner: space.clone() }, addr, window, page };
    match ops.migrate_to_ram(&fault) {
        Ok(()) if at.windows > 1 => {
            *ahead = next.map(|i| ReadAhead { addr: region.addr_of(i), windows: at.windows - 1, read_at: at.read_at });
        }
        Ok(()) => {}
        Err(err) => tracing::debug!(%err, addr, "read-ahead failed; the scan's own fault will retry"),
    }
}

/// Zero-fills the first-touch window around page `idx`: with the zero page
/// for a read, with fresh zeroed pages for a write (which would otherwise
/// take a second, copy-on-write fault per page). Returns `EINPROGRESS` when
/// the page changed under us (the caller looks again).
fn zero_fill(space: &SpaceInner, region: &RegionInner, idx: usize, write: bool) -> Result<(), Errno> {
    let pt = &region.pt;
    if !pt.try_lock_for_fill(idx) {
        return Err(Errno::INPROGRESS);
    }
    if region.huge && huge_fill(space, region, idx) {
        return Ok(());
    }
    // Adaptive like fault-around ([`ScanWindow`]).
    let proposal = region.zero_around.propose(
        idx,
        space.config.zero_fill_pages,
        space.config.fault_around_max_pages,
        region.npages(),
        || 0,
    );
    // The window may not cross a protection boundary (one VMA per ioctl).
    let run = region
        .prot_runs(proposal.pages.clone())
        .into_iter()
        .find(|(r, _)| r.contains(&idx))
        .map_or(idx..idx + 1, |(r, _)| r);
    let mut lo = idx;
    while lo > run.start && pt.try_lock_for_fill(lo - 1) {
        lo -= 1;
    }
    let mut hi = idx + 1;
    while hi < run.end && pt.try_lock_for_fill(hi) {
        hi += 1;
    }
    region.zero_around.record(&proposal, &(lo..hi));
    let fill = |first: usize, n: usize| {
        let (addr, len) = (region.addr_of(first), n * PAGE_SIZE);
        if !write {
            return space.uffd.zeropage(addr, len, true);
        }
        // Fresh zeroed pages, from the zero buffer a piece at a time.
        let mut done = 0;
        while done < len {
            let piece = (len - done).min(space.zeros.len());
            match space.uffd.copy(addr + done, space.zeros.as_ptr(), piece, true) {
                Ok(n) => done += n,
                Err(p) => return Err(uhmm_sys::uffd::Partial { done: done + p.done, errno: p.errno }),
            }
        }
        Ok(len)
    };
    // DONTWAKE: the faulting thread must not run on before the window is
    // unlocked, or its next migration would find its own pages busy.
    let mut result = Ok(());
    let mut filled = 0;
    match fill(idx, hi - idx) {
        Ok(n) => filled += n,
        Err(p) if p.errno == Errno::EXIST => {
            Stats::add(&space.stats.eexist, 1);
            filled += p.done;
        }
        Err(p) => {
            if p.errno == Errno::AGAIN {
                Stats::add(&space.stats.eagain, 1);
            }
            result = Err(p.errno);
        }
    }
    if lo < idx && result.is_ok() {
        // Pages before the fault: best effort, nobody waits on them.
        filled += fill(lo, idx - lo).unwrap_or_else(|p| p.done);
    }
    Stats::add(&space.stats.zero_filled_pages, (filled / PAGE_SIZE) as u64);
    let mut wake_end = idx + 1;
    for i in lo..hi {
        if pt.unlock(i, State::Cpu, &space.waits) && i >= wake_end {
            wake_end = i + 1;
        }
    }
    // The faulting page (present now, by us or by someone else; on EAGAIN
    // its thread retries and faults again), and any page of the window a
    // thread waited on while we held it.
    space.wake(region, lo..wake_end);
    result
}

/// First touch in a huge region: fills the whole aligned 2 MiB block around
/// page `idx` (locked by the caller) with one zeroed huge page, moved in from
/// the huge pool (`UFFDIO_MOVE` of a PMD). Returns false — page `idx` still
/// locked, nothing changed — when the block is not wholly empty and free, so
/// the caller fills small pages instead.
fn huge_fill(space: &SpaceInner, region: &RegionInner, idx: usize) -> bool {
    const N: usize = crate::BATCH_PAGES;
    let block = idx - idx % N;
    if block + N > region.npages() || region.prot_runs(block..block + N).len() != 1 {
        return false;
    }
    let (a, b) = (region.addr_of(block), region.addr_of(block + N));
    let q = uhmm_sys::pagemap::Query::any_of(
        uhmm_sys::pagemap::category::PRESENT | uhmm_sys::pagemap::category::SWAPPED,
    );
    let mut present = Vec::new();
    if space.pagemap_file.scan(a, b, q, &mut present).map_or(true, |n| n > 0) {
        return false; // not wholly empty: small pages (checked before taking any lock)
    }
    let pt = &region.pt;
    let mut locked = Vec::with_capacity(N);
    let all = (block..block + N).all(|i| {
        let ok = i == idx || pt.try_lock_for_fill(i);
        if ok && i != idx {
            locked.push(i);
        }
        ok
    });
    let unlock = |pages: &[usize]| {
        for &i in pages {
            space.unlock_wake(region, i, State::Cpu);
        }
    };
    let (a, b) = (region.addr_of(block), region.addr_of(block + N));
    let mut present = Vec::new();
    let q = uhmm_sys::pagemap::Query::any_of(
        uhmm_sys::pagemap::category::PRESENT | uhmm_sys::pagemap::category::SWAPPED,
    );
    let empty = all && space.pagemap_file.scan(a, b, q, &mut present).is_ok_and(|n| n == 0);
    let slots = if empty { space.huge_pool.alloc(N).ok() } else { None };
    let Some(slots) = slots else {
        unlock(&locked);
        return false;
    };
    slots.populate(0..N);
    let moved = space.uffd.move_pages(a, slots.mapping(), slots.offset(0), N * PAGE_SIZE, false, true);
    if let Err(e) = &moved {
        // Part may have moved: the rest is filled with small pages below.
        tracing::debug!(errno = %e.errno, "huge first touch fell back to small pages");
    }
    let done = moved.unwrap_or_else(|e| e.done) / PAGE_SIZE;
    Stats::add(&space.stats.zero_filled_pages, done as u64);
    if done < N {
        unlock(&locked);
        return false;
    }
    Stats::add(&space.stats.huge_fills, 1);
    locked.push(idx);
    unlock(&locked);
    space.wake(region, block..block + N);
    true
}

/// Installs the SIGBUS marker for a page already recorded as poisoned.
fn poison_install(space: &SpaceInner, region: &RegionInner, idx: usize) -> Result<(), Errno> {
    let addr = region.addr_of(idx);
    match space.uffd.poison(addr, PAGE_SIZE, false) {
        Ok(_) => Ok(()),
        Err(p) if p.errno == Errno::EXIST => space.uffd.wake(addr, PAGE_SIZE),
        Err(p) => Err(p.errno),
    }
}

/// The driver could not bring `page` back: the page is lost. Record it,
/// free the device page, and make accesses fail with SIGBUS.
fn poison_page(space: &SpaceInner, region: &RegionInner, idx: usize, page: DevicePage) {
    if !region.pt.try_lock_if(idx, State::Device(page)) {
        return; // it changed meanwhile: the caller looks again
    }
    let waiter = region.pt.unlock(idx, State::Poisoned, &space.waits);
    Stats::add(&space.stats.poisoned_pages, 1);
    if let Some(pm) = space.pagemap(page.pagemap) {
        pm.free_page(page.pfn);
    }
    if let Err(err) = poison_install(space, region, idx) {
        tracing::error!(%err, "UFFDIO_POISON failed");
    }
    if waiter {
        space.wake(region, idx..idx + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(addr: usize, write: bool, read_at: u64) -> Fault {
        Fault { addr, write, read_at }
    }

    /// Takes the window proposed for a fault on `idx` (base 16, at most
    /// 512 pages, nothing in RAM below) in a region of `npages`.
    fn take(w: &ScanWindow, idx: usize, npages: usize) -> Proposal {
        let p = w.propose(idx, 16, 512, npages, || 0);
        w.record(&p, &p.pages);
        p
    }

    #[test]
    fn scan_windows_grow_up_and_down_the_region_and_reset_elsewhere() {
        let w = ScanWindow::default();
        // Takes the proposed window for a fault on `idx` and returns it.
        let take = |idx: usize| {
            let p = w.propose(idx, 16, 128, 1000, || 0);
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
        let p = w.propose(15, 1, 128, 1000, || 0);
        assert_eq!((p.pages, p.scan), (15..16, None), "a base of one page never grows");
    }

    #[test]
    fn a_fault_above_pages_in_ram_starts_a_scan_up_as_large_as_their_run() {
        let w = ScanWindow::default();
        let p = w.propose(600, 16, 512, 1000, || 300);
        assert_eq!((p.pages, p.scan), (600..900, Some(Scan::Up)), "as many pages as are in RAM below");
        let p = w.propose(600, 16, 128, 1000, || 300);
        assert_eq!(p.pages, 600..728, "no larger than the maximum");
        let p = w.propose(300, 16, 512, 1000, || 300);
        assert_eq!(p.pages, 300..512, "clipped to the block");
        let p = w.propose(990, 16, 512, 1000, || 600);
        assert_eq!(p.pages, 990..1000, "clipped to the region");
        let p = w.propose(300, 16, 512, 1000, || 31);
        assert_eq!((p.pages, p.scan), (288..304, None), "fewer than two base windows: the base window");
        let p = w.propose(300, 1, 512, 1000, || panic!("not asked when the base is one page"));
        assert_eq!(p.pages, 300..301);
        // A fault that continues a scan does not look below.
        let p = w.propose(300, 16, 512, 1000, || 0);
        w.record(&p, &p.pages);
        let p = w.propose(304, 16, 512, 1000, || panic!("not asked for a scan's next window"));
        assert_eq!(p.pages, 304..336);
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
        take(703);
        let last = take(687); // a scan down: 656..688
        w.leave_marker(&last, 687);
        let p = take(687);
        assert_eq!((p.pages, p.resume, p.scan), (687..688, Some(655), Some(Scan::Down)));
        assert_eq!(take(655).pages, 592..656);
        // At the region's end there is nothing to resume.
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

    #[test]
    fn only_a_wake_covering_the_watched_page_counts() {
        let p = 0x10_0000;
        let ((), woken) = watch_wakes(p, || noted_wake(p + PAGE_SIZE..p + 4 * PAGE_SIZE));
        assert!(!woken, "a wake of other pages does not wake the fault's thread");
        let ((), woken) = watch_wakes(p, || {
            noted_wake(p - PAGE_SIZE..p);
            noted_wake(p - PAGE_SIZE..p + PAGE_SIZE);
        });
        assert!(woken, "a wake of a range holding the page does");
        noted_wake(p..p + PAGE_SIZE);
        let ((), woken) = watch_wakes(p, || ());
        assert!(!woken, "wakes before or after the watch do not count");
    }

    #[test]
    fn queue_drops_duplicates_and_keeps_order() {
        let mut q = FaultQueue::default();
        assert!(q.push(fault(0x1000, false, 1)));
        assert!(q.push(fault(0x3000, false, 1)));
        assert!(!q.push(fault(0x1000, true, 2)), "duplicate fault must be coalesced");
        assert!(q.push(fault(0x2000, false, 2)));
        let mut seen = Vec::new();
        q.drain(
            |f| {
                seen.push(f);
                Ok(())
            },
            |_| {},
        );
        assert_eq!(
            seen,
            vec![fault(0x1000, true, 2), fault(0x3000, false, 1), fault(0x2000, false, 2)],
            "arrival order kept; write and read time upgraded"
        );
        assert!(q.is_empty());
    }

    #[test]
    fn duplicate_fault_on_present_page_takes_eexist_and_wakes() {
        let space = crate::AddressSpace::new(crate::Config::default()).unwrap();
        let region = space.map(64 * PAGE_SIZE, crate::Prot::READ_WRITE).unwrap();
        region.write(5 * PAGE_SIZE, &[9]).unwrap(); // faulted in by the handler
        let before = space.stats();
        assert!(before.zero_filled_pages >= 1);
        // A stale copy of that fault, read late or twice: must succeed and wake.
        resolve(&space.inner, fault(region.addr() + 5 * PAGE_SIZE, true, 0), &mut None).unwrap();
        let after = space.stats();
        assert_eq!(after.eexist, before.eexist + 1, "the already-present page answers EEXIST");
        let mut b = [0u8; 1];
        region.read(5 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b[0], 9, "the page was not replaced");
    }

    #[test]
    fn fault_on_locked_page_is_parked_then_woken() {
        use AtomicBool;
        let space = crate::AddressSpace::new(crate::Config::default()).unwrap();
        let region = Arc::new(space.map(16 * PAGE_SIZE, crate::Prot::READ_WRITE).unwrap());
        let owner = crate::Owner::new();
        let m = crate::Migration::setup(&space, region.range(), crate::Select::SYSTEM, owner).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (region, done) = (region.clone(), done.clone());
            std::thread::spawn(move || {
                let mut b = [0u8; 1];
                region.read(3 * PAGE_SIZE, &mut b).unwrap();
                std::hint::black_box(b);
                done.store(true, Ordering::SeqCst);
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while space.stats().deferred_faults == 0 {
            assert!(std::time::Instant::now() < deadline, "fault never arrived");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(!done.load(Ordering::SeqCst), "the access must wait while the page is locked");
        drop(m); // restores and unlocks: the parked thread is woken
        while !done.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "parked fault was never woken");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        t.join().unwrap();
    }

    #[test]
    fn queue_retries_eagain_and_paces_failures() {
        let mut q = FaultQueue::default();
        for addr in [0x1000, 0x2000, 0x3000] {
            q.push(fault(addr, false, 0));
        }
        let mut woken = Vec::new();
        q.drain(
            |f| match f.addr {
                0x1000 => Err(Errno::AGAIN),
                0x2000 => Err(Errno::FAULT),
                _ => Ok(()),
            },
            |a| woken.push(a),
        );
        assert!(woken.is_empty(), "a failed fault is retried a few rounds before its thread is woken");
        for _ in 1..FAULT_ATTEMPTS {
            q.drain(|f| if f.addr == 0x2000 { Err(Errno::FAULT) } else { Err(Errno::AGAIN) }, |a| woken.push(a));
        }
        assert_eq!(woken, vec![0x2000], "then its thread is woken to fault again");
        let mut seen = Vec::new();
        q.drain(
            |f| {
                seen.push(f.addr);
                Ok(())
            },
            |_| {},
        );
        assert_eq!(seen, vec![0x1000], "only the EAGAIN fault is left");
    }

    /// A device that keeps no data: its pages come back as zeros.
    struct Forgetful {
        owner: crate::Owner,
        migrate_to_ram_calls: AtomicUsize,
        /// Milliseconds each `migrate_to_ram` sleeps first.
        sluggish_ms: AtomicUsize,
    }

    impl Forgetful {
        /// A region of `npages` pages filled with ones, and a forgetful
        /// device registered for it.
        fn attach(
            space: &crate::AddressSpace,
            npages: usize,
        ) -> (crate::Region, Arc<Forgetful>, Arc<crate::DevicePagemap>) {
            let region = space.map(npages * PAGE_SIZE, crate::Prot::READ_WRITE).unwrap();
            region.write(0, &vec![1; npages * PAGE_SIZE]).unwrap();
            let dev = Arc::new(Forgetful {
                owner: crate::Owner::new(),
                migrate_to_ram_calls: AtomicUsize::new(0),
                sluggish_ms: AtomicUsize::new(0),
            });
            let ops: Weak<dyn crate::DevicePagemapOps> = Arc::downgrade(&dev) as Weak<Forgetful>;
            let pm = space.register_pagemap(ops, dev.owner, npages as u64).unwrap();
            (region, dev, pm)
        }

        /// Moves every page of `region` to the device (page `i` to pfn `i`);
        /// returns the pages moved.
        fn take_all(&self, space: &crate::AddressSpace, region: &crate::Region, pm: &crate::DevicePagemap) -> usize {
            let mut m = crate::Migration::setup(space, region.range(), crate::Select::SYSTEM, self.owner).unwrap();
            for i in 0..m.npages() {
                m.set_dst_device(i, pm.page(crate::DevicePfn(i as u64)).unwrap()).unwrap();
            }
            m.pages().finalize().migrated
        }
    }

    impl crate::DevicePagemapOps for Forgetful {
        fn page_free(&self, _: crate::DevicePfn) {}

        fn migrate_to_ram(&self, fault: &CpuFault) -> Result<()> {
            self.migrate_to_ram_calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(self.sluggish_ms.load(Ordering::SeqCst) as u64));
            let mut m =
                crate::Migration::setup(fault.space(), fault.window(), crate::Select::DEVICE_PRIVATE, self.owner)?;
            for i in 0..m.npages() {
                if matches!(m.src(i), crate::MigrateSrc::Device(_)) {
                    m.system_dst(i)?.write(0, &[0; PAGE_SIZE])?;
                    m.set_dst_system(i)?;
                }
            }
            m.pages().finalize();
            Ok(())
        }
    }

    #[test]
    fn a_handler_stalled_in_a_fault_steps_aside_and_the_fault_completes() {
        let space = crate::AddressSpace::new(crate::Config::default()).unwrap();
        let cpus = uhmm_sys::process::allowed_cpus().unwrap();
        assert!(cpus.len() >= 2, "this test needs two CPUs (the machines uhmm is built on have them)");
        let (region, dev, pm) = Forgetful::attach(&space, 4);
        assert_eq!(dev.take_all(&space, &region, &pm), 4);
        let region = Arc::new(region);
        // Each read faults on the handler (bounded: a lost wake fails it).
        let read = |page: usize| {
            let (tx, rx) = std::sync::mpsc::channel();
            let r = region.clone();
            std::thread::spawn(move || {
                let mut b = [9u8; 1];
                let _ = tx.send(r.read(page * PAGE_SIZE, &mut b).map(|()| b[0]));
            });
            rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the fault never completed").unwrap()
        };
        dev.sluggish_ms.store(uhmm_sys::stall::STALL_WAIT.as_millis() as usize + 1, Ordering::SeqCst);
        assert_eq!(read(0), 0, "the forgetful device gives zeros back");
        // The handler counts the stall after it woke the reader.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while space.stats().handler_stalls == 0 {
            assert!(std::time::Instant::now() < deadline, "the stall was not noticed");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        dev.sluggish_ms.store(0, Ordering::SeqCst);
        assert_eq!(read(3), 0);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(space.stats().handler_stalls, 1, "a fault of usual length is no stall");
    }

    #[test]
    fn a_fault_read_before_its_page_moved_to_a_device_only_wakes() {
        let space = crate::AddressSpace::new(crate::Config::default()).unwrap();
        let (region, dev, pm) = Forgetful::attach(&space, 4);
        // A fault read now, resolved only after the page moved to the device.
        let read_at = space.inner.to_device_epoch.load(Ordering::SeqCst);
        assert_eq!(dev.take_all(&space, &region, &pm), 4);
        let on_device = || matches!(region.inner.pt.load(0).state(), State::Device(_));
        resolve(&space.inner, fault(region.addr(), false, read_at), &mut None).unwrap();
        assert_eq!(dev.migrate_to_ram_calls.load(Ordering::SeqCst), 0, "the stale fault brought nothing back");
        assert_eq!(space.stats().stale_faults, 1);
        assert!(on_device());
        // A fault read after the move is served.
        let read_at = space.inner.to_device_epoch.load(Ordering::SeqCst);
        resolve(&space.inner, fault(region.addr(), false, read_at), &mut None).unwrap();
        assert_eq!(dev.migrate_to_ram_calls.load(Ordering::SeqCst), 1);
        assert!(!on_device());
        assert_eq!(space.stats().stale_faults, 1);
    }

    #[test]
    fn a_fault_beside_a_scan_leaves_its_read_ahead_to_do() {
        let config = crate::Config { read_ahead_windows: 2, ..crate::Config::default() };
        let space = crate::AddressSpace::new(config).unwrap();
        let (region, dev, pm) = Forgetful::attach(&space, 256);
        assert_eq!(dev.take_all(&space, &region, &pm), 256);
        let read_at = space.inner.to_device_epoch.load(Ordering::SeqCst);
        let at = |page: usize| fault(region.addr() + page * PAGE_SIZE, false, read_at);
        let mut ahead = None;
        // A scan up: its second fault leaves a read-ahead from page 48.
        resolve(&space.inner, at(0), &mut ahead).unwrap();
        resolve(&space.inner, at(16), &mut ahead).unwrap();
        let scan_ahead = ahead.map(|a| a.addr);
        assert_eq!(scan_ahead, Some(region.addr() + 48 * PAGE_SIZE));
        // A fault that continues no scan leaves it to do.
        resolve(&space.inner, at(255), &mut ahead).unwrap();
        assert_eq!(ahead.map(|a| a.addr), scan_ahead);
        assert_eq!(dev.migrate_to_ram_calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_read_ahead_never_undoes_a_later_migration_to_a_device() {
        let space = crate::AddressSpace::new(crate::Config::default()).unwrap();
        let (region, dev, pm) = Forgetful::attach(&space, 4);
        // A scan's fault, read before the program moves the pages to the device.
        let ahead = |read_at| ReadAhead { addr: region.addr() + 2 * PAGE_SIZE, windows: 2, read_at };
        let before = ahead(space.inner.to_device_epoch.load(Ordering::SeqCst));
        assert_eq!(dev.take_all(&space, &region, &pm), 4);
        let on_device = |i| matches!(region.inner.pt.load(i).state(), State::Device(_));
        let mut next = None;
        read_ahead(&space.inner, before, &mut next);
        assert_eq!(dev.migrate_to_ram_calls.load(Ordering::SeqCst), 0, "the migration is left alone");
        assert!((0..4).all(on_device) && next.is_none());
        // One from a fault read after the move brings its window back.
        read_ahead(&space.inner, ahead(space.inner.to_device_epoch.load(Ordering::SeqCst)), &mut next);
        assert_eq!((dev.migrate_to_ram_calls.load(Ordering::SeqCst), space.stats().read_aheads), (1, 1));
        assert!(!on_device(2));
    }
}
