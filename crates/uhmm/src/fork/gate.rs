//! The fork gate: migrations in flight hold it open ([`InFlight`]); a fork
//! being prepared closes it and waits for them to end (see the parent
//! module).

use std::cell::{Cell, RefCell};
use std::sync::{Condvar, Mutex, MutexGuard};

pub(super) struct Gate {
    pub(super) forking: bool,
    pub(super) in_flight: usize,
}

static GATE: Mutex<Gate> = Mutex::new(Gate { forking: false, in_flight: 0 });
pub(super) static GATE_CV: Condvar = Condvar::new();

thread_local! {
    /// Set in the forking thread between prepare and parent/child: its own
    /// migrations pass the closed gate.
    pub(super) static FORKER: Cell<bool> = const { Cell::new(false) };
    /// The gate, held by the forking thread across the fork.
    pub(super) static HELD: RefCell<Option<MutexGuard<'static, Gate>>> = const { RefCell::new(None) };
}

pub(super) fn gate() -> MutexGuard<'static, Gate> {
    GATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A migration in flight: a fork waits until it is finalized or dropped.
#[derive(Debug)]
pub(crate) struct InFlight {
    counted: bool,
}

impl InFlight {
    /// Enters the gate, waiting while a fork is being prepared.
    pub(crate) fn enter() -> InFlight {
        if FORKER.get() {
            return InFlight { counted: false };
        }
        let mut g = gate();
        while g.forking {
            g = GATE_CV.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.in_flight += 1;
        InFlight { counted: true }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.counted {
            let mut g = gate();
            g.in_flight = g.in_flight.saturating_sub(1);
            // Only a fork being prepared waits for migrations to end (no
            // futex call on every migration, a fault's included).
            if g.forking {
                GATE_CV.notify_all();
            }
        }
    }
}
