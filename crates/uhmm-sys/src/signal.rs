//! SIGBUS for userfaults answered in the faulting thread: with
//! `UFFD_FEATURE_SIGBUS` the kernel raises SIGBUS (`BUS_ADRERR`) where it
//! would have queued a fault for a handler thread. One process-wide
//! handler hands the address to a callback; a SIGBUS the callback does not
//! take (another cause, another code: a poisoned page's `BUS_MCEERR_AR`)
//! goes to the handler installed before, or ends the process as SIGBUS's
//! default does.
//!
//! sigaction(2), signal-safety(7).

use std::io;
use std::sync::{Mutex, OnceLock};

/// What the handler calls for a `BUS_ADRERR` SIGBUS at an address: true
/// when it made the access possible (the faulting instruction runs again),
/// false to pass the signal on. It runs in a signal handler, on the thread
/// that faulted, at any point of that thread's own code.
pub type SigbusCallback = fn(addr: usize) -> bool;

struct Installed {
    callback: SigbusCallback,
    previous: libc::sigaction,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Installs the process-wide SIGBUS handler that calls `callback` (once:
/// later calls return `Ok` and keep the first callback). Fails when
/// `sigaction` does.
pub fn install_sigbus(callback: SigbusCallback) -> io::Result<()> {
    // Whether the handler is in; held while it goes in.
    static ACTIVE: Mutex<bool> = Mutex::new(false);
    let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
    if *active {
        return Ok(());
    }
    // SAFETY: an all-zero sigaction is a valid value (no handler, empty
    // mask, no flags) for sigaction to fill in.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads the current one into `previous`.
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Known before the handler can run: it passes signals on to `previous`.
    let _ = INSTALLED.set(Installed { callback, previous });
    // SAFETY: as above; the fields set below make it a SA_SIGINFO handler.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigbus as *const () as usize;
    // Not SA_ONSTACK: the resolution needs more stack than an alternate
    // signal stack (Rust's, for its overflow checks) has.
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is a valid sigset_t owned by `action`.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: a valid sigaction whose handler is an extern "C" function
    // with the SA_SIGINFO signature; the old action is not asked for.
    if unsafe { libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    *active = true;
    Ok(())
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let Some(installed) = INSTALLED.get() else { return };
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler;
    // si_addr is the faulting address for SIGBUS.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == libc::BUS_ADRERR && (installed.callback)(addr) {
        return;
    }
    let previous = installed.previous;
    let handler = previous.sa_sigaction;
    if handler == libc::SIG_IGN || handler == libc::SIG_DFL {
        // The default: restore it; returning runs the access again, which
        // raises SIGBUS again, now fatal.
        // SAFETY: an all-zero sigaction with SIG_DFL is valid.
        let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
        dfl.sa_sigaction = libc::SIG_DFL;
        // SAFETY: valid pointer to a sigaction; the old action is not asked for.
        unsafe { libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut()) };
        return;
    }
    if previous.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed as an SA_SIGINFO
        // handler with this signature; it gets the arguments we got.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: the previous handler was installed as a plain handler.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(sig);
    }
}
