//! The synchronisation primitives of the page-lock protocol (`pte.rs`) and
//! the notifier sequence protocol (`notifier.rs`): std's, or loom's when the
//! protocols are model-checked
//! (`RUSTFLAGS="--cfg loom" cargo test -p uhmm --lib --release loom`), so
//! the same code runs under the checker.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex};

/// One step of a wait loop that has seen its condition false `spins` times:
/// yield at first, then sleep briefly (under loom: yield, which lets the
/// checker run the other threads).
pub(crate) fn backoff(spins: u32) {
    #[cfg(loom)]
    {
        let _ = spins;
        loom::thread::yield_now();
    }
    #[cfg(not(loom))]
    if spins < BACKOFF_YIELDS {
        std::thread::yield_now();
    } else {
        std::thread::sleep(BACKOFF_SLEEP);
    }
}

/// Yields before a wait loop sleeps: what it waits for (a notifier's
/// critical section) usually ends within a few time slices.
#[cfg(not(loom))]
const BACKOFF_YIELDS: u32 = 64;

/// A sleep of the wait loop after that: short against the section, long
/// enough not to burn the CPU its holder needs.
#[cfg(not(loom))]
const BACKOFF_SLEEP: std::time::Duration = std::time::Duration::from_micros(20);
