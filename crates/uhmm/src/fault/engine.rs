//! The fault engine's threads: started with the address space, each placed
//! on its CPU and serving until told to stop; counted while they run. What
//! a thread does is the caller's (`fault::serve`); this file owns only their
//! lifetime, so the address space can hold and stop them without knowing
//! how faults are resolved.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use rustix::event::EventfdFlags;

use crate::{Error, Result};

/// The running handler threads of one address space.
#[derive(Debug)]
pub(crate) struct Engine {
    /// An eventfd the threads poll beside the userfaultfd: written to stop them.
    stop: Arc<OwnedFd>,
    threads: Vec<JoinHandle<()>>,
    /// Threads still running.
    pub(crate) alive: Arc<AtomicUsize>,
}

impl Engine {
    /// Starts `threads` threads named `uhmm-fault-N`, thread `i` alone on
    /// `cpus[i % len]` when `cpus` is not empty, each running `serve` with
    /// the stop eventfd to poll.
    pub(crate) fn start<F>(threads: usize, cpus: &[usize], serve: F) -> Result<Engine>
    where
        F: Fn(&OwnedFd) + Clone + Send + 'static,
    {
        let stop = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| Error::sys("eventfd", e))?;
        let mut engine = Engine { stop: Arc::new(stop), threads: Vec::new(), alive: Arc::new(AtomicUsize::new(0)) };
        for i in 0..threads {
            let (stop, alive, serve) = (engine.stop.clone(), engine.alive.clone(), serve.clone());
            alive.fetch_add(1, Ordering::SeqCst);
            let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
            let t = std::thread::Builder::new().name(format!("uhmm-fault-{i}")).spawn(move || {
                if let Some(cpu) = cpu
                    && let Err(err) = uhmm_sys::process::set_thread_cpus(&[cpu])
                {
                    // Checked against the allowed CPUs at creation; a CPU
                    // taken away since only costs the placement.
                    tracing::warn!(%err, cpu, "cannot pin a fault handler");
                }
                serve(&stop);
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
        if let Err(err) = rustix::io::write(&*self.stop, &1u64.to_ne_bytes()) {
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
