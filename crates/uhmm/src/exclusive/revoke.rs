//! Taking a page back from a device's exclusive access: the CPU touched it
//! (a fault, `range_fault`, a fork), so the device is told and the page
//! moves home from the holding area (the kernel's
//! `remove_device_exclusive_entry`).

use rustix::io::Errno;
use uhmm_sys::PAGE_SIZE;

use crate::mm::Mm;
use crate::notifier::InvalidateEvent;
use crate::pte::State;
use crate::vma::Vma;

/// The CPU takes page `idx` back from a device's exclusive access: tell the
/// device, move the page home, wake the waiting threads.
pub(crate) fn revoke(space: &Mm, region: &Vma, idx: usize, slot: u64) -> Result<Revoked, Errno> {
    if !region.pt.try_lock_if(idx, State::Exclusive(slot)) {
        return Ok(Revoked::Changed);
    }
    let addr = region.addr_of(idx);
    drop(space.notifiers.invalidate(addr..addr + PAGE_SIZE, InvalidateEvent::Clear));
    let off = slot as usize * PAGE_SIZE;
    let moved = match space.uffd.move_pages(addr, space.holding.map(), off, PAGE_SIZE, false, true) {
        // The region became read-only meanwhile: MOVE needs writable
        // mappings, so copy the page home instead.
        Err(e) if e.errno == Errno::INVAL => {
            space.uffd.copy(addr, space.holding.addr(off) as *const u8, PAGE_SIZE, true)
        }
        other => other,
    };
    // The kernel can move a page and still answer an error (see
    // migrate.rs): a page now in place came home.
    let moved = match moved {
        Err(e) if space.is_present(addr).unwrap_or(false) => {
            tracing::debug!(errno = %e.errno, "the page came home despite the error");
            Ok(PAGE_SIZE)
        }
        other => other,
    };
    let state = match moved {
        Ok(_) => {
            space.holding.give_back(off);
            State::Cpu
        }
        Err(e) => {
            tracing::error!(errno = %e.errno, addr, "taking an exclusive page back failed");
            State::Exclusive(slot)
        }
    };
    let _ = region.pt.unlock(idx, state, &space.waits);
    space.wake(region, idx..idx + 1);
    moved.map(|_| Revoked::Home).map_err(|e| e.errno)
}

/// What [`revoke`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Revoked {
    /// The page is home, in the region.
    Home,
    /// The page was no longer exclusive (or locked) when looked at: the
    /// caller looks again.
    Changed,
}
