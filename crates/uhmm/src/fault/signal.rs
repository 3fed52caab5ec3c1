//! Faults answered in the faulting thread (`FaultDelivery::Signal`): the
//! kernel raises SIGBUS where it would have queued the fault, and the
//! thread resolves it in the signal handler with the handler threads' own
//! `resolve`, then runs the access again. No thread is woken, no context
//! switched. This file owns the spaces that asked for it and the callback
//! `uhmm_sys::signal` calls.
//!
//! What changes against the handler threads: a fault on a locked page
//! waits here (a short sleep, then the access runs again and faults again
//! while the page is still away) instead of being parked; a fault is
//! always served as a write (the signal does not say which it was), so a
//! first read fills a page of zeros rather than mapping the zero page.

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use uhmm_sys::PAGE_SIZE;

use crate::fault::resolve::{Fault, resolve};
use crate::fault::serving::Serving;
use crate::mm::Mm;
use crate::{Error, Result};

/// The spaces whose faults come as SIGBUS.
static SPACES: RwLock<Vec<Weak<Mm>>> = RwLock::new(Vec::new());

/// How long a fault on a locked page waits before the access runs again.
const LOCKED_WAIT: Duration = Duration::from_micros(20);

thread_local! {
    /// This thread's `Serving`, as a handler thread has its own.
    static SERVING: Arc<Serving> = Arc::new(Serving::default());
}

/// Registers `space` (opened with `UFFD_FEATURE_SIGBUS`) and installs the
/// process's SIGBUS handler if it is not yet.
pub(crate) fn register(space: &Arc<Mm>) -> Result<()> {
    uhmm_sys::signal::install_sigbus(on_fault).map_err(|e| Error::sys("sigaction(SIGBUS)", e))?;
    let mut spaces = SPACES.write().unwrap_or_else(|e| e.into_inner());
    spaces.retain(|w| w.strong_count() > 0);
    spaces.push(Arc::downgrade(space));
    Ok(())
}

/// The SIGBUS callback: resolves a fault at `addr` in a registered space's
/// region; false for an address no such space holds.
fn on_fault(addr: usize) -> bool {
    let page = addr & !(PAGE_SIZE - 1);
    let found = {
        let spaces = SPACES.read().unwrap_or_else(|e| e.into_inner());
        spaces.iter().filter_map(Weak::upgrade).find_map(|s| s.region_at(page).map(|r| (s, r)))
    };
    let Some((space, region)) = found else { return false };
    if let Some(idx) = region.index_of(page)
        && region.pt.load(idx).locked()
    {
        std::thread::sleep(LOCKED_WAIT);
        return true;
    }
    let read_at = space.to_device_epoch.load(std::sync::atomic::Ordering::SeqCst);
    let fault = Fault { addr: page, write: true, read_at };
    SERVING.with(|serving| {
        if let Err(err) = resolve(&space, fault, &mut None, serving) {
            tracing::debug!(addr = page, %err, "a fault in the faulting thread failed: the access runs again");
        }
    });
    true
}
