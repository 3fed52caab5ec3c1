//! `fork(2)`, its hooks (`pthread_atfork`), waiting for a child, and
//! which CPUs a thread may run on (`sched_setaffinity(2)`, `sched_getcpu(3)`).
//!
//! uhmm must act around a fork: pages on devices are not in the kernel's
//! page table, so a child would see holes where the parent sees data unless
//! they come back to RAM first (see `fork.rs` in the core).
//!
//! # References
//!
//! fork(2), pthread_atfork(3), waitpid(2), sched_setaffinity(2), sched_getcpu(3).

use std::io;

/// The CPUs the calling thread may run on, ascending.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    let set = rustix::thread::sched_getaffinity(None)?;
    Ok((0..rustix::thread::CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect())
}

/// The CPU the calling thread runs on (it may be moved at any time after).
pub fn current_cpu() -> usize {
    rustix::thread::sched_getcpu()
}

/// Lets the calling thread run on the CPUs `cpus` only.
pub fn set_thread_cpus(cpus: &[usize]) -> io::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    for &cpu in cpus {
        if cpu >= rustix::thread::CpuSet::MAX_CPU {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        set.set(cpu);
    }
    Ok(rustix::thread::sched_setaffinity(None, &set)?)
}

/// Registers `prepare`, `parent` and `child` to run around every `fork` of
/// the process (glibc's `fork` runs them; the raw system call does not).
pub fn atfork(prepare: extern "C" fn(), parent: extern "C" fn(), child: extern "C" fn()) -> io::Result<()> {
    // SAFETY: the three are plain `extern "C" fn()`s that live for the whole
    // program; pthread_atfork only records them.
    let r = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if r == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(r)) }
}

/// Which side of a fork the caller is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// The parent; `child` is the new process's pid.
    Parent {
        /// The child's process id.
        child: i32,
    },
    /// The child.
    Child,
}

/// `fork()`, through glibc so that the `atfork` hooks run.
///
/// # Safety
///
/// In a multi-threaded process the child has only the calling thread: locks
/// other threads held at the fork stay held in the child. Until it calls
/// [`exit_now`] (or `exec`), the child must not wait for anything another
/// thread of the parent could have held — glibc's `malloc` is safe, Rust's
/// `std::io::stdout` lock, for one, may not be.
pub unsafe fn fork() -> io::Result<Forked> {
    // SAFETY: forwarded to the caller (see `# Safety`).
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        child => Ok(Forked::Parent { child }),
    }
}

/// `_exit(code)`: ends the process at once, running no destructors or
/// `atexit` handlers (what a forked child should do).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and is async-signal-safe.
    unsafe { libc::_exit(code) }
}

/// Waits for child `pid` to end; returns its exit code, or `128 + signal`
/// when a signal killed it.
pub fn wait_child(pid: i32) -> io::Result<i32> {
    let pid = rustix::process::Pid::from_raw(pid).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty()) {
            Ok(Some((_, status))) => {
                if let Some(code) = status.exit_status() {
                    return Ok(code);
                }
                if let Some(sig) = status.terminating_signal() {
                    return Ok(128 + sig);
                }
            }
            Ok(None) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}
