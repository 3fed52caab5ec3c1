//! The fault engine: threads that read userfaults and resolve them. This
//! file is a handler thread's loop and its queue of faults; `engine` owns
//! the threads, `resolve` answers one fault, `around` chooses a device
//! fault's window and reads ahead, `window` is the adaptive window policy.
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

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use uhmm_sys::PAGE_SIZE;
use uhmm_sys::stall::StepAside;
use uhmm_sys::uffd::Event;

use crate::fault::around::{ReadAhead, read_ahead};
use crate::fault::resolve::{Fault, resolve};
use crate::fault::serving::Serving;
use crate::mm::Mm;
use crate::stats::Stats;

pub(crate) mod around;
pub(crate) mod engine;
pub(crate) mod resolve;
pub(crate) mod serving;
pub(crate) mod signal;
pub(crate) mod window;

/// A handler thread's loop: poll the userfaultfd (and `stop`), read the
/// faults, resolve them, and read ahead when idle; returns when stopped or
/// when the address space is gone.
pub(crate) fn serve(space: &Weak<Mm>, uffd: &OwnedFd, stop: &OwnedFd) {
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
    // The fault this thread serves, handed to drivers (see `Serving`).
    let serving = Arc::new(Serving::default());
    loop {
        if !read_first {
            if let Some(next) = ahead.take() {
                let Some(space) = space.upgrade() else { return };
                let _ = timed(&mut aside, &space, || {
                    guarded(next.addr, || {
                        read_ahead(&space, next, &mut ahead, &serving);
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
        // Events are read and looked at in order (see `foreign`).
        let in_order = space.config.non_cooperative.then(|| space.own_changes.order());
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
                // Marked before any fault of this batch is resolved.
                Event::Unmap { start, end } => crate::foreign::unmapped(&space, start..end),
                Event::Remap { from, to, len } => crate::foreign::moved(&space, from, to, len),
                other => tracing::warn!(?other, "unexpected userfaultfd event"),
            }
        }
        drop(in_order);
        let wake = |addr| {
            let _ = space.uffd.wake(addr, PAGE_SIZE);
        };
        timed(&mut aside, &space, || {
            queue.drain(|fault| guarded(fault.addr, || resolve(&space, fault, &mut ahead, &serving)), wake)
        });
        read_first = read > 0 && queue.is_empty();
    }
}

/// Runs `f`, a piece of a handler's work, and counts a stall in it; after
/// one, a handler free to move keeps off its CPU for a while: the host may
/// stop that vCPU again, and the faulting threads wait for this one.
fn timed<T>(aside: &mut StepAside, space: &Mm, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    let took = started.elapsed();
    // A handler kept on one CPU (one per CPU) stays there: the others
    // read the faults that come meanwhile.
    aside.after(took);
    if took >= uhmm_sys::stall::STALL_WAIT {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_drops_duplicates_and_keeps_order() {
        let mut q = FaultQueue::default();
        assert!(q.push(Fault::at(0x1000, false, 1)));
        assert!(q.push(Fault::at(0x3000, false, 1)));
        assert!(!q.push(Fault::at(0x1000, true, 2)), "duplicate fault must be coalesced");
        assert!(q.push(Fault::at(0x2000, false, 2)));
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
            vec![Fault::at(0x1000, true, 2), Fault::at(0x3000, false, 1), Fault::at(0x2000, false, 2)],
            "arrival order kept; write and read time upgraded"
        );
        assert!(q.is_empty());
    }

    #[test]
    fn queue_retries_eagain_and_paces_failures() {
        let mut q = FaultQueue::default();
        for addr in [0x1000, 0x2000, 0x3000] {
            q.push(Fault::at(addr, false, 0));
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
}
