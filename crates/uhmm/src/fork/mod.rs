//! uhmm across `fork(2)`.
//!
//! Pages on a device are holes in the kernel's page table, and a child does
//! not inherit uhmm's userfaultfd registration (uhmm does not negotiate
//! `UFFD_FEATURE_EVENT_FORK`), so a child would read zeros where the parent
//! has data. uhmm therefore hooks `fork` (`pthread_atfork`):
//!
//! - **prepare** (in the forking thread, before the fork): close the gate to
//!   new migrations, wait for those in flight, then bring every device page
//!   of every address space back to RAM through its driver's
//!   `migrate_to_ram`. At the fork every page is in RAM, so the child gets
//!   the parent's data with the kernel's copy-on-write.
//! - **parent**: open the gate again. The parent's pages stay in RAM (as if
//!   the CPU had touched them); it migrates them again when it wants.
//! - **child**: open the gate, and mark every inherited address space
//!   *orphaned*: its threads, userfaultfd and devices belong to the parent.
//!   An orphaned space refuses new work (`Unsupported`) and is only dropped;
//!   the child makes its own [`AddressSpace`] and takes the inherited regions
//!   over with [`AddressSpace::adopt`].
//!
//! The kernel instead keeps device-private pages on the device across fork,
//! copy-on-write in both processes; uhmm trades that for a fork that cannot
//! lose data. Poisoned pages stay poisoned in the child (the kernel copies
//! the `UFFDIO_POISON` markers).

use std::sync::{Arc, Mutex, Once, Weak};
use std::time::{Duration, Instant};

use uhmm_sys as sys;

use crate::exclusive::revoke::revoke;
use crate::migrate::CpuFault;
use crate::mm::{AddressSpace, Mm};
use crate::pte::State;

pub(crate) mod gate;
use gate::{FORKER, GATE_CV, HELD, gate};

/// The live address spaces, for the hooks.
static SPACES: Mutex<Vec<Weak<Mm>>> = Mutex::new(Vec::new());
static HOOKS: Once = Once::new();

/// Records a new address space for the hooks (installing them once).
pub(crate) fn register(space: &Arc<Mm>) {
    HOOKS.call_once(|| {
        if let Err(err) = sys::process::atfork(prepare, parent, child) {
            tracing::error!(%err, "pthread_atfork failed: a fork will not bring device pages back first");
        }
    });
    let mut spaces = SPACES.lock().unwrap_or_else(|e| e.into_inner());
    spaces.retain(|w| w.strong_count() > 0);
    spaces.push(Arc::downgrade(space));
}

/// The longest a fork waits for migrations in flight: a migration held by
/// the forking thread itself would never end, and a fork must not hang.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(10);

extern "C" fn prepare() {
    FORKER.set(true);
    let mut g = gate();
    g.forking = true;
    // A migration the forking thread itself holds would never end: bound the wait.
    let deadline = Instant::now() + IN_FLIGHT_WAIT;
    while g.in_flight > 0 {
        let now = Instant::now();
        if now >= deadline {
            tracing::error!(
                in_flight = g.in_flight,
                "fork: migrations still in flight; their pages may be holes in the child"
            );
            break;
        }
        g = GATE_CV.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
    }
    let spaces: Vec<Arc<Mm>> =
        SPACES.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(Weak::upgrade).collect();
    for space in &spaces {
        if !space.is_orphaned() {
            evict(space);
        }
    }
    drop(spaces);
    HELD.with_borrow_mut(|h| *h = Some(g));
}

extern "C" fn parent() {
    reopen(false);
}

extern "C" fn child() {
    for space in SPACES.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(Weak::upgrade) {
        space.orphan();
    }
    reopen(true);
}

fn reopen(in_child: bool) {
    FORKER.set(false);
    HELD.with_borrow_mut(|h| {
        if let Some(mut g) = h.take() {
            g.forking = false;
            if in_child {
                // The migrations in flight belonged to threads the child lacks.
                g.in_flight = 0;
            }
        }
    });
    GATE_CV.notify_all();
}

/// Brings every device page of `space` back to RAM, one `migrate_to_ram`
/// per run of pages on the same device.
fn evict(space: &Arc<Mm>) {
    let handle = AddressSpace::from(space.clone());
    for region in space.regions() {
        let mut runs: Vec<(usize, usize, crate::DevicePage)> = Vec::new();
        let mut exclusive = Vec::new();
        region.pt.for_each_allocated(|idx, e| {
            if let State::Exclusive(slot) = e.state() {
                exclusive.push((idx, slot));
            }
            // Coherent device pages are mapped: the child gets them as they are.
            if let State::Device(p) = e.state()
                && !space.is_coherent(&p)
            {
                match runs.last_mut() {
                    Some((_, end, first)) if *end == idx && first.pagemap == p.pagemap => *end = idx + 1,
                    _ => runs.push((idx, idx + 1, p)),
                }
            }
        });
        for (idx, slot) in exclusive {
            if let Err(err) = revoke(space, &region, idx, slot) {
                tracing::error!(%err, "fork: an exclusive page could not be taken back");
            }
        }
        for (start, end, page) in runs {
            let Some(ops) = space.driver(page.pagemap) else { continue };
            let (a, b) = (region.addr_of(start), region.addr_of(end));
            if let Err(err) = ops.migrate_to_ram(&CpuFault::new(handle.clone(), a, a..b, page)) {
                tracing::error!(%err, "fork: a device could not bring its pages back");
            }
        }
        let mut left = 0;
        region.pt.for_each_allocated(|_, e| left += usize::from(matches!(e.state(), State::Device(_))));
        if left > 0 {
            tracing::error!(left, "fork: pages still on devices will read as zeros in the child");
        }
    }
}
