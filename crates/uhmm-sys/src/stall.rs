//! Stalls: a thread stopped for milliseconds in the middle of short work,
//! as when the host takes away the vCPU it runs on (steal time), and what
//! uhmm does for a while after one, so that a host that keeps stealing costs
//! one stall a pause rather than one a piece of work.
//!
//! The guest still counts a thread on a stolen vCPU as running there, so it
//! cannot move it, and whoever waits for that thread waits until the host
//! gives the vCPU back. uhmm notices a stall by how long a piece of work
//! that takes tens to hundreds of microseconds took ([`STALL_WAIT`]), and
//! for [`STALL_PAUSE`] after one it stops depending on the stopped thread
//! (a pause: copies back are not shared with the copy helper) or moves its
//! own thread off the CPU it was stopped on ([`StepAside`]: fault
//! handlers). A driver whose copies run on threads of its own (the
//! sim device's DMA channels) can use [`StepAside`] too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Work that took this long, or a wait for another thread's piece that
/// lasted this long, was stopped: the pieces take tens to hundreds of
/// microseconds, a stolen vCPU stops a thread for milliseconds.
pub const STALL_WAIT: Duration = Duration::from_millis(2);
/// How long uhmm works around a stall: while the host keeps taking CPU
/// time, a thread that waits on a stopped one again and again, or keeps
/// returning to the CPU the host takes, loses far more than this costs.
pub const STALL_PAUSE: Duration = Duration::from_millis(100);

/// A pause shared by threads: started after a stall, over [`STALL_PAUSE`]
/// later.
#[derive(Debug)]
pub struct Pause {
    /// The end of the pause in nanoseconds since `epoch`; 0: none.
    until: AtomicU64,
    epoch: Instant,
}

impl Default for Pause {
    fn default() -> Pause {
        Pause::new()
    }
}

impl Pause {
    /// No pause on.
    pub fn new() -> Pause {
        Pause { until: AtomicU64::new(0), epoch: Instant::now() }
    }

    /// Whether a pause is on; a relaxed load while none is.
    pub fn on(&self) -> bool {
        let until = self.until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        let on = self.since_epoch() < until;
        if !on {
            // Unless a new stall set a later end meanwhile.
            let _ = self.until.compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
        on
    }

    /// Notes a wait of `wait` for another thread: true when that was a
    /// stall, and a pause starts.
    pub fn waited(&self, wait: Duration) -> bool {
        let stalled = wait >= STALL_WAIT;
        if stalled {
            let until = self.since_epoch().saturating_add(STALL_PAUSE.as_nanos() as u64);
            self.until.store(until.max(1), Ordering::Relaxed);
        }
        stalled
    }

    fn since_epoch(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A worker thread's own stalls: after work that took [`STALL_WAIT`], the
/// thread keeps off the CPU it ran on for [`STALL_PAUSE`], and then may use
/// all its CPUs again; a new stall meanwhile moves it off the CPU of that
/// stall instead. A thread pinned to one CPU stays there.
///
/// For threads whose pieces of work others wait for. Time only work that
/// runs on the CPU: a piece that sleeps or waits for a device may take
/// that long without a stall (each such piece then costs a move to
/// another CPU).
///
/// ```
/// let mut aside = uhmm_sys::stall::StepAside::new();
/// let started = std::time::Instant::now();
/// // ... a piece of work others wait for ...
/// aside.after(started.elapsed());
/// ```
#[derive(Debug)]
pub struct StepAside {
    /// The CPUs the thread may use.
    cpus: Vec<usize>,
    /// When the thread may return to the CPU it left.
    back_at: Option<Instant>,
}

impl StepAside {
    /// For the calling thread, with the CPUs it may use now (the CPUs it
    /// returns to after a stall).
    pub fn new() -> StepAside {
        let cpus = crate::process::allowed_cpus().unwrap_or_default();
        StepAside { cpus, back_at: None }
    }

    /// Notes that the calling thread's last piece of work took `took`:
    /// after a stall it keeps off its CPU. Returns whether it stepped aside
    /// now.
    pub fn after(&mut self, took: Duration) -> bool {
        if self.back_at.is_some_and(|at| Instant::now() >= at) {
            self.back_at = None;
            if let Err(err) = crate::process::set_thread_cpus(&self.cpus) {
                tracing::warn!(%err, "a thread that stepped aside cannot return to its CPUs");
            }
        }
        if took < STALL_WAIT {
            return false;
        }
        // Off the CPU of the latest stall, even if the thread is aside
        // already: the host may be taking the other one now.
        let here = crate::process::current_cpu();
        let others: Vec<usize> = self.cpus.iter().copied().filter(|&c| c != here).collect();
        if others.is_empty() || others.len() == self.cpus.len() {
            return false;
        }
        if let Err(err) = crate::process::set_thread_cpus(&others) {
            tracing::warn!(%err, here, "a stalled thread cannot step aside");
            return false;
        }
        self.back_at = Some(Instant::now() + STALL_PAUSE);
        true
    }
}

impl Default for StepAside {
    fn default() -> StepAside {
        StepAside::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{allowed_cpus, current_cpu, set_thread_cpus};

    /// Waits (10 s at most) for `done`.
    fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_stall_pauses_for_a_while() {
        let pause = Pause::new();
        assert!(!pause.on());
        assert!(!pause.waited(Duration::from_micros(300)), "a piece's usual wait is no stall");
        assert!(!pause.on());
        let stalled_at = Instant::now();
        assert!(pause.waited(STALL_WAIT), "a wait of STALL_WAIT is");
        assert!(pause.on(), "paused right after a stall");
        until("the pause never ended", || !pause.on());
        assert!(stalled_at.elapsed() >= STALL_PAUSE, "the pause ended early");
    }

    #[test]
    fn a_stalled_thread_keeps_off_its_cpu_for_a_while() {
        std::thread::spawn(|| {
            let cpus = allowed_cpus().unwrap();
            assert!(cpus.len() >= 2, "this test needs two CPUs (the machines uhmm is built on have them)");
            set_thread_cpus(&cpus[..2]).unwrap();
            let mut aside = StepAside::new();
            assert!(!aside.after(Duration::from_micros(300)), "usual work is no stall");
            assert_eq!(allowed_cpus().unwrap(), &cpus[..2]);
            let here = current_cpu();
            assert!(aside.after(STALL_WAIT), "work of STALL_WAIT is a stall");
            let now = allowed_cpus().unwrap();
            assert!(!now.contains(&here) && now.len() == 1, "still allowed on CPU {here}: {now:?}");
            let there = current_cpu();
            assert_ne!(there, here);
            assert!(!aside.after(Duration::from_micros(300)), "usual work leaves it aside");
            assert_eq!(allowed_cpus().unwrap(), now);
            assert!(aside.after(STALL_WAIT), "a stall while aside moves it off the new CPU");
            let then = allowed_cpus().unwrap();
            assert!(!then.contains(&there) && then.len() == 1, "still allowed on CPU {there}: {then:?}");
            let stalled_at = Instant::now();
            until("the thread never returned to its CPUs", || {
                aside.after(Duration::ZERO);
                allowed_cpus().unwrap() == cpus[..2]
            });
            assert!(stalled_at.elapsed() >= STALL_PAUSE, "returned early");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_thread_on_one_cpu_stays_there() {
        std::thread::spawn(|| {
            let cpu = allowed_cpus().unwrap()[0];
            set_thread_cpus(&[cpu]).unwrap();
            let mut aside = StepAside::new();
            assert!(!aside.after(STALL_WAIT * 10));
            assert_eq!(allowed_cpus().unwrap(), [cpu]);
        })
        .join()
        .unwrap();
    }
}
