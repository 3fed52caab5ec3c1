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
    if spins < 64 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(std::time::Duration::from_micros(20));
    }
}
