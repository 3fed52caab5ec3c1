//! `migrate_pages`, the list form of migration (`mm/migrate.c`): a list of
//! pages, not a range, moved in batches with an allocation callback for
//! their destinations, retried while busy, in an async or a sync mode, for
//! a reason; it says which pages moved and why the others did not.
//!
//! This module owns [`migrate_pages`] and its types ([`MigrateMode`],
//! [`MigrateReason`], [`NotMoved`], [`MigratePagesOutcome`]). It builds on
//! the three steps of `migrate/`: each batch is one [`Migration`] over the
//! span of its listed pages, which collects only the listed ones (the pages
//! between them are neither locked nor moved), so a scattered list costs a
//! migration per [`BATCH_PAGES`] span, not one per page.

use std::collections::HashMap;
use std::time::Duration;

use crate::migrate::{Collected, MigrateSrc, Migration, Select, Skip};
use crate::mm::AddressSpace;
use crate::page::Owner;
use crate::staging::BATCH_PAGES;
use crate::stats::Stats;
use crate::{ErrorKind, Result};
use uhmm_sys::PAGE_SIZE;

/// Passes over the pages still busy before they are given up (the kernel's
/// `NR_MAX_MIGRATE_PAGES_RETRY`).
pub const MIGRATE_PASSES: usize = 10;

/// How hard [`migrate_pages`] tries (the kernel's `enum migrate_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigrateMode {
    /// `MIGRATE_ASYNC`: never waits. A busy page is tried again in the
    /// next pass at once (a lock held for microseconds, a fill, is often
    /// gone by then), up to [`MIGRATE_PASSES`] passes.
    Async,
    /// `MIGRATE_SYNC`: between passes, sleeps while busy pages stay locked
    /// (from 50 µs, doubling, 25 ms in all at most): a migration or a fault
    /// holding them finishes meanwhile.
    Sync,
}

/// Why pages migrate (the kernel's `enum migrate_reason`): counted and
/// traced, so that a policy's moves can be told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigrateReason {
    /// Reclaim: cold pages demoted to a slower tier (`MR_DEMOTION`).
    Reclaim,
    /// Promotion: hot pages brought to a faster tier (`MR_NUMA_MISPLACED`).
    Promotion,
    /// Compaction: pages moved to free a device's memory in large pieces
    /// (`MR_COMPACTION`).
    Compaction,
    /// The program asked (`MR_SYSCALL`).
    User,
}

/// Why [`migrate_pages`] did not move a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotMoved {
    /// Still locked (by a migration, a fault, a device access) after every
    /// pass.
    Busy,
    /// Pinned, or held by the kernel, after every pass.
    Pinned,
    /// Not of the kinds `select` names (a RAM page for a device-private
    /// selection, another owner's device page), no access, or a mapping
    /// that never migrates.
    NotSelected,
    /// A hole (never touched): nothing to move.
    NotPresent,
    /// The callback gave it no destination (its memory full, or its choice).
    NoDestination,
    /// The callback failed with [`ErrorKind::NoMemory`] on its batch or an
    /// earlier one: the call stopped (the kernel's `-ENOMEM`).
    NoMemory,
    /// No region of the address space maps it.
    Unmanaged,
}

/// What [`migrate_pages`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigratePagesOutcome {
    /// The pages that moved (page addresses, ascending).
    pub moved: Vec<usize>,
    /// The pages that did not, each with its reason (ascending).
    pub not_moved: Vec<(usize, NotMoved)>,
    /// Passes made (1 when nothing was busy).
    pub passes: usize,
}

/// Migrates the pages at `pages` (addresses, each rounded down to its page;
/// order and repeats do not matter) that `select` and `owner` pick, as
/// [`Migration::setup`] does for a range, with `alloc` choosing each
/// collected page's destination: the kernel's `migrate_pages(from,
/// get_new_folio, …, mode, reason)`.
///
/// The pages are taken in ascending order, in batches of the listed pages
/// of one region within [`BATCH_PAGES`] pages of each other. `alloc` gets
/// each batch's [`Migration`] after setup; it allocates and copies as a
/// driver's `alloc_and_copy` does (the pages it lists as sources are the
/// listed ones only) and sets destinations; a page left without one
/// stays. Pages found busy or pinned are tried again in later passes, up
/// to [`MIGRATE_PASSES`], waiting between passes in [`MigrateMode::Sync`].
///
/// An error of kind [`ErrorKind::NoMemory`] from `alloc` stops the call:
/// that batch and the pages after it are [`NotMoved::NoMemory`] and the
/// outcome is returned. Any other error from `alloc` or a setup is
/// returned; pages of earlier batches stay where they went, and the
/// failed batch's pages where they were (a dropped migration restores its
/// pages).
///
/// ```
/// # fn main() -> uhmm::Result<()> {
/// use uhmm::{migrate_pages, AddressSpace, Config, MigrateMode, MigrateReason, NotMoved, Owner, Select, PAGE_SIZE, Prot};
/// let space = AddressSpace::new(Config::default())?;
/// let region = space.map(8 * PAGE_SIZE, Prot::READ_WRITE)?;
/// region.write(0, &[1; 8 * PAGE_SIZE])?;
/// let pages = [region.addr() + 5 * PAGE_SIZE, region.addr() + PAGE_SIZE];
/// // A callback that allocates nothing: every collected page stays.
/// let out = migrate_pages(&space, &pages, Select::SYSTEM, Owner::new(), MigrateMode::Async, MigrateReason::User, |_| Ok(()))?;
/// assert!(out.moved.is_empty());
/// assert_eq!(out.not_moved, vec![(pages[1], NotMoved::NoDestination), (pages[0], NotMoved::NoDestination)]);
/// # Ok(()) }
/// ```
pub fn migrate_pages<F>(
    space: &AddressSpace,
    pages: &[usize],
    select: Select,
    owner: Owner,
    mode: MigrateMode,
    reason: MigrateReason,
    mut alloc: F,
) -> Result<MigratePagesOutcome>
where
    F: FnMut(&mut Migration<Collected>) -> Result<()>,
{
    let mut pending: Vec<usize> = pages.iter().map(|a| a & !(PAGE_SIZE - 1)).collect();
    pending.sort_unstable();
    pending.dedup();
    let mut out = MigratePagesOutcome::default();
    // The reason each page was last given up for, until a pass moves it.
    let mut last: HashMap<usize, NotMoved> = HashMap::new();
    let mut wait = Duration::from_micros(50);
    let mut waited = Duration::ZERO;
    while !pending.is_empty() && out.passes < MIGRATE_PASSES {
        out.passes += 1;
        let mut retry = Vec::new();
        let mut rest = &pending[..];
        while let Some(&addr) = rest.first() {
            let (batch, tail) = next_batch(space, rest);
            rest = tail;
            let Some((span, listed)) = batch else {
                last.insert(addr, NotMoved::Unmanaged);
                continue;
            };
            let first = span.start;
            let mut m = match Migration::setup_listed(space, span, &listed, select, owner) {
                Ok(m) => m,
                Err(e) if matches!(e.kind(), ErrorKind::InvalidArgument | ErrorKind::NotFound) => {
                    // The region went away under the list.
                    for (i, _) in listed.iter().enumerate().filter(|(_, l)| **l) {
                        last.insert(first + i * PAGE_SIZE, NotMoved::Unmanaged);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            let holes: Vec<bool> = (0..m.npages()).map(|i| matches!(m.src(i), MigrateSrc::Hole)).collect();
            if let Err(e) = alloc(&mut m) {
                drop(m);
                if e.kind() != ErrorKind::NoMemory {
                    return Err(e);
                }
                // This batch and everything after it stop here.
                let stopped = listed_addrs(first, &listed).chain(rest.iter().copied()).chain(retry.drain(..));
                for a in stopped {
                    last.insert(a, NotMoved::NoMemory);
                }
                break;
            }
            let m = m.pages();
            for (i, addr) in listed.iter().enumerate().filter(|(_, l)| **l).map(|(i, _)| (i, first + i * PAGE_SIZE)) {
                if m.migrated(i) {
                    out.moved.push(addr);
                    last.remove(&addr);
                    continue;
                }
                let why = match m.skipped(i) {
                    Some(Skip::Busy) => NotMoved::Busy,
                    Some(Skip::Pinned) => NotMoved::Pinned,
                    Some(Skip::NotSelected) => NotMoved::NotSelected,
                    None if holes[i] => NotMoved::NotPresent,
                    None => NotMoved::NoDestination,
                };
                if matches!(why, NotMoved::Busy | NotMoved::Pinned) {
                    retry.push(addr);
                }
                last.insert(addr, why);
            }
            m.finalize();
        }
        pending = retry;
        if !pending.is_empty() && mode == MigrateMode::Sync && out.passes < MIGRATE_PASSES {
            let nap = wait.min(SYNC_WAIT.saturating_sub(waited));
            std::thread::sleep(nap);
            waited += nap;
            wait *= 2;
        } else {
            std::thread::yield_now();
        }
    }
    out.moved.sort_unstable();
    out.not_moved = last.into_iter().collect();
    out.not_moved.sort_unstable_by_key(|(a, _)| *a);
    Stats::add(&space.inner.stats.list_moved_pages, out.moved.len() as u64);
    Stats::add(&space.inner.stats.list_failed_pages, out.not_moved.len() as u64);
    tracing::debug!(
        ?reason,
        ?mode,
        moved = out.moved.len(),
        not_moved = out.not_moved.len(),
        passes = out.passes,
        "migrate_pages"
    );
    Ok(out)
}

/// The most a sync [`migrate_pages`] sleeps in all, waiting for locks.
const SYNC_WAIT: Duration = Duration::from_millis(25);

/// The first batch of `pending` (ascending page addresses): the span from
/// its first page to its last, and which pages of the span are listed; or
/// `None` when the first page is unmanaged (the batch is that page alone).
/// Returns the pages after it.
fn next_batch<'a>(space: &AddressSpace, pending: &'a [usize]) -> (Option<Batch>, &'a [usize]) {
    let first = pending[0];
    let Some(region) = space.inner.region_at(first) else {
        return (None, &pending[1..]);
    };
    let end = region.start() + region.npages() * PAGE_SIZE;
    let limit = end.min(first + BATCH_PAGES * PAGE_SIZE);
    let n = pending.iter().take_while(|&&a| a < limit).count();
    let last = pending[n - 1];
    let mut listed = vec![false; (last - first) / PAGE_SIZE + 1];
    for a in &pending[..n] {
        listed[(a - first) / PAGE_SIZE] = true;
    }
    (Some((first..last + PAGE_SIZE, listed)), &pending[n..])
}

/// A batch: the span of its pages, and which pages of the span are listed.
type Batch = (std::ops::Range<usize>, Vec<bool>);

/// The addresses of the listed pages of a span starting at `first`.
fn listed_addrs(first: usize, listed: &[bool]) -> impl Iterator<Item = usize> + '_ {
    listed.iter().enumerate().filter(|(_, l)| **l).map(move |(i, _)| first + i * PAGE_SIZE)
}
