//! Changes the program made to region memory behind uhmm's back — a raw
//! `munmap` or `mremap` system call, another library's — seen through
//! userfaultfd's non-cooperative events (`Config::non_cooperative`).
//!
//! The kernel sends `UFFD_EVENT_UNMAP` after it unmapped a registered range
//! and `UFFD_EVENT_REMAP` after it moved one (the registration moves with
//! it); the calling thread waits until a handler has read the event, and
//! every resolving ioctl fails with `EAGAIN` while one is pending. So when a
//! handler reads one, the addresses have already changed and nothing of
//! uhmm's has touched them since. The handler marks what changed at once,
//! before it resolves any fault read with the event:
//! - an **unmapped** part of a region is given up: its pages count as
//!   unmapped (every uhmm call, migration and fault window leaves them
//!   alone), its addresses are never unmapped or written by uhmm again
//!   (they may be someone else's now), a wholly unmapped region leaves the
//!   address space's table; a reaper thread then frees its device pages
//!   (it waits for in-flight migrations, which a handler must not);
//! - a **moved** part becomes a new region at its new address (with the
//!   growth of a growing `mremap`), its pages locked until the reaper has
//!   handed over the old pages' states: RAM pages moved with the kernel's
//!   page tables, device pages are followed (their reverse maps renamed),
//!   so faults at the new address bring them back; the old part is given
//!   up.
//!
//! An `mremap` that grows a mapping in place sends no event: the first
//! fault on the growth (registered memory no region manages) hands that
//! range back to the kernel (`unmanaged_fault`).
//!
//! uhmm's own `mmap(MAP_FIXED)` reservations and `mremap`s of its regions
//! send the same events: they are announced (`own`) and ignored.
//! A region's own final `munmap` is unregistered first and sends none.

pub(crate) mod own;
pub(crate) mod reaper;

use std::ops::Range;
use std::sync::Arc;

use uhmm_sys::PAGE_SIZE;

use crate::mm::Mm;
use crate::notifier::InvalidateEvent;
use crate::pte::State;
use crate::stats::Stats;
use crate::vma::Vma;

/// `UFFD_EVENT_UNMAP`: the program unmapped `range`. Called by the handler
/// that read the event; never waits for a page.
pub(crate) fn unmapped(space: &Arc<Mm>, range: Range<usize>) {
    if space.own_changes.covers(&range) {
        return;
    }
    for region in space.regions_overlapping(&range) {
        let pages = page_span(&region, &range);
        if region.all_unmapped(&pages) {
            // Given up already: the old range of an mremap followed before.
            continue;
        }
        let _ = region.map.give_up(pages.start * PAGE_SIZE, pages.len() * PAGE_SIZE);
        give_up(space, &region, pages.clone());
        let (job_space, range) = (space.clone(), range.clone());
        reap(space, move || {
            let space = job_space;
            let _inv = space.notifiers.invalidate(range, InvalidateEvent::Unmap);
            free_pages(&space, &region, pages);
        });
    }
}

/// `UFFD_EVENT_REMAP`: the program moved `from..from + len` to `to` (and
/// may have grown it). Called by the handler that read the event; never
/// waits for a page.
pub(crate) fn moved(space: &Arc<Mm>, from: usize, to: usize, len: usize) {
    let range = from..from + len;
    if space.own_changes.covers(&range) {
        return;
    }
    // An mremap moves part of one kernel mapping, so of one region.
    let Some(old) = space.regions_overlapping(&range).into_iter().next() else {
        return;
    };
    let pages = page_span(&old, &range);
    let start = to + (old.addr_of(pages.start).max(from) - from);
    // The new mapping may be longer (a growing mremap): it ends where the
    // kernel's mapping ends, short of the next region.
    let vma = uhmm_sys::mman::vma_at(start).ok().flatten();
    let end = vma.map_or(start + pages.len() * PAGE_SIZE, |v| v.end);
    let end = space.next_region_start(start).map_or(end, |next| end.min(next));
    let end = end.max(start + pages.len() * PAGE_SIZE);
    if !space.has_region_ids() {
        tracing::error!(start, "no region id left to follow a moved region");
        return unmapped(space, range);
    }
    let moved = old.map.take_moved(pages.start * PAGE_SIZE, pages.len() * PAGE_SIZE, start, end - start);
    let map = match moved {
        Ok(map) => map,
        Err(err) => {
            tracing::error!(%err, start, "could not follow a moved region");
            return unmapped(space, range);
        }
    };
    let prot = old.prot_at(pages.start);
    let new = match space.insert_vma(map, prot, old.backing, false) {
        Ok(new) => new,
        Err(err) => return tracing::error!(%err, start, "could not follow a moved region"),
    };
    // Its pages wait for their states (faults on them are parked).
    for j in 0..pages.len() {
        let _ = new.pt.lock(j, &space.waits);
    }
    give_up(space, &old, pages.clone());
    Stats::add(&space.stats.regions_followed, 1);
    let job_space = space.clone();
    reap(space, move || {
        let space = job_space;
        let _inv = space.notifiers.invalidate(range, InvalidateEvent::Unmap);
        for (j, idx) in pages.clone().enumerate() {
            let state = old.pt.lock(idx, &space.waits);
            if let State::Device(page) = state
                && let Some(pm) = space.pagemap(page.pagemap)
            {
                pm.set_rmap(page.pfn, Some((new.id, j)));
            }
            let state = if let State::Exclusive(slot) = state {
                // Held away for a device: its contents are in the holding
                // area, which the move did not take along.
                space.holding.give_back(slot as usize * PAGE_SIZE);
                State::Cpu
            } else {
                state
            };
            space.unlock_wake(&new, j, state);
            let _ = old.pt.unlock(idx, State::Cpu, &space.waits);
        }
    });
}

/// A fault on registered memory uhmm does not manage: the program grew a
/// mapping in place (`mremap` without a move sends no event) over the end
/// of a region or into pages it had given up. That memory is the
/// program's plain memory: its range — the kernel mapping around `addr`,
/// short of any page uhmm manages — is unregistered, and the faulting
/// thread's retry is the kernel's to fill. `region` is the region holding
/// `addr`, if one does (the page given up).
pub(crate) fn unmanaged_fault(space: &Mm, addr: usize, region: Option<&Vma>) {
    let Ok(Some(vma)) = uhmm_sys::mman::vma_at(addr) else { return };
    let mut range = vma;
    if let Some(region) = region {
        let Some(run) = region.index_of(addr).and_then(|i| region.unmapped_run(i)) else { return };
        range.start = range.start.max(region.addr_of(run.start));
        range.end = range.end.min(region.addr_of(run.end));
    } else {
        for other in space.regions_overlapping(&range) {
            let (s, e) = (other.start(), other.start() + other.map.len());
            if e <= addr {
                range.start = range.start.max(e);
            } else {
                range.end = range.end.min(s);
            }
        }
    }
    if range.contains(&addr) {
        // Counted first: the unregistration wakes the faulting thread.
        Stats::add(&space.stats.unmanaged_ranges, 1);
        if let Err(err) = space.uffd.unregister_range(range.start, range.len()) {
            tracing::error!(%err, ?range, "could not hand memory the program grew back to the kernel");
        }
    }
}

/// The page indices of `region` that `range` covers.
fn page_span(region: &Vma, range: &Range<usize>) -> Range<usize> {
    let start = range.start.max(region.start());
    let end = range.end.min(region.start() + region.map.len());
    (start - region.start()) / PAGE_SIZE..(end - region.start()).div_ceil(PAGE_SIZE)
}

/// Marks pages `pages` of `region` as no longer the region's: unmapped for
/// every uhmm call (its mapping gave them up already: the caller's); a
/// region given up whole leaves the table.
fn give_up(space: &Mm, region: &Arc<Vma>, pages: Range<usize>) {
    region.forget(pages.clone());
    if pages.len() == region.npages() {
        region.dead.store(true, std::sync::atomic::Ordering::SeqCst);
        space.remove_region(region);
    }
    Stats::add(&space.stats.foreign_unmapped_pages, pages.len() as u64);
}

/// Frees what pages `pages` of `region` held on devices or in the holding
/// area, once in-flight work on them ended.
fn free_pages(space: &Mm, region: &Vma, pages: Range<usize>) {
    let mut touched = Vec::new();
    region.pt.for_each_allocated(|idx, entry| {
        if pages.contains(&idx) && (entry.locked() || entry.state() != State::Cpu) {
            touched.push(idx);
        }
    });
    let mut freed = Vec::new();
    for idx in touched {
        match region.pt.lock(idx, &space.waits) {
            State::Device(page) => freed.push(page),
            State::Exclusive(slot) => space.holding.give_back(slot as usize * PAGE_SIZE),
            _ => {}
        }
        let _ = region.pt.unlock(idx, State::Cpu, &space.waits);
    }
    for page in freed {
        space.free_device_page(page);
    }
}

/// Runs `work` on the space's reaper thread, in order. Work on the same
/// pages keeps the events' order through the page locks anyway: a moved
/// part's new pages stay locked until their states are handed over.
fn reap(space: &Mm, work: impl FnOnce() + Send + 'static) {
    let sent = space.reaper.get().map(|r| r.send(Box::new(work)));
    if !matches!(sent, Some(Ok(()))) {
        tracing::error!("no reaper thread: device pages of an unmapped range leak");
    }
}
