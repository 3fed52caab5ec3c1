//! Staging areas: where pages sit while they are in flight.
//!
//! Two arenas per address space, both private anonymous read-write memory
//! handed out in batches of [`BATCH_PAGES`] pages (2 MiB, so a batch can hold
//! a huge page), adjacent batches where they are free, so that a migration's
//! slots take one `UFFDIO_MOVE` and one discard, and as few TLB flushes of
//! the other CPUs running the process as the kernel allows (IPIs, VM exits
//! on a VM):
//!
//! - the **stage**, registered with the address space's userfaultfd, receives
//!   pages moved out of a region by `UFFDIO_MOVE` (the kernel's migration
//!   entry: the region's entry is empty, the page is stable and readable);
//! - the **pool**, not registered, holds the RAM pages a driver fills when
//!   migrating back; they are then moved into the region.
//!
//! A batch is emptied (`MADV_DONTNEED`) when it is given back, so a stale
//! page never leaks into the next migration and its memory returns to the
//! system — except the stage's batches that a migration to a device left
//! full of pages, up to the arena's `keep_max`: those are **kept** for a
//! while, and a copy back to RAM fills them and moves them into the region
//! instead of having the kernel allocate pages (on this project's VM a new
//! page costs about three times its copy). A migration of less than a
//! batch keeps its one batch **partly filled**, for a copy back of as many
//! pages or fewer. Copies back that have the kernel allocate pages all the
//! same (a fault's page) **shed** kept batches holding as many: the pages
//! that came back replace the kept ones, which nothing takes. The pages are
//! the process's own; each is overwritten whole before it is mapped
//! anywhere.
//!
//! Size: over 700 lines because about 250 of them are its tests; the arena,
//! its slots and its kept batches share one lock and one free list.

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::{Error, ErrorKind, Result};
use uhmm_sys::PAGE_SIZE;
use uhmm_sys::mman::{Mapping, Protection};
use uhmm_sys::uffd::Uffd;

/// Pages in one staging batch.
pub const BATCH_PAGES: usize = 512;
/// Slot sets of one arena being emptied by another thread, at most.
const MAX_RELEASING: usize = 4;
const BATCH_BYTES: usize = BATCH_PAGES * PAGE_SIZE;

/// How long kept batches wait for a copy back to RAM before they are
/// emptied (see [`Arena::trim_kept`]), unless the arena is given another
/// time ([`Arena::keeping_for`]).
pub(crate) const KEEP_FOR: Duration = Duration::from_secs(1);

/// One staging arena.
#[derive(Debug)]
pub(crate) struct Arena {
    pub(crate) map: Mapping,
    free: Mutex<FreeBatches>,
    /// Signalled when batches come back.
    returned: Condvar,
    /// Full batches kept at most (see the module docs).
    keep_max: usize,
    /// How long kept batches wait for a copy back.
    keep_for: Duration,
}

#[derive(Debug)]
struct FreeBatches {
    /// Free batch numbers, ascending.
    batches: Vec<u32>,
    /// Free batches full of pages, kept for copies back to RAM.
    kept: Vec<u32>,
    /// Free batches whose first slots hold pages (batch, pages), kept
    /// for small copies back to RAM.
    partial: Vec<(u32, usize)>,
    /// When a batch was last kept or taken.
    kept_used: Instant,
    /// Pages allocated by copies back since a kept batch was last shed
    /// (see [`Arena::note_allocated`]).
    allocated: usize,
    /// Slot sets handed to another thread to be emptied, not back yet.
    releasing: usize,
    /// Those of them with batches to keep.
    keeping: usize,
}

impl FreeBatches {
    fn insert(&mut self, b: u32) {
        let at = self.batches.partition_point(|&x| x < b);
        self.batches.insert(at, b);
    }
}

impl Arena {
    /// An arena of `bytes` (whole batches), registered with `uffd` when
    /// given, that keeps up to `keep_bytes` of full batches.
    pub(crate) fn new(bytes: usize, uffd: Option<&Uffd>, keep_bytes: usize) -> Result<Arena> {
        let nbatches = bytes.div_ceil(BATCH_BYTES).max(1);
        let map = Mapping::anonymous(nbatches * BATCH_BYTES, Protection::ReadWrite, BATCH_BYTES)
            .map_err(|e| Error::sys("mmap staging", e))?;
        if let Some(u) = uffd {
            u.register(&map, 0, map.len(), false).map_err(|e| Error::sys("UFFDIO_REGISTER staging", e))?;
        }
        let batches = (0..u32::try_from(nbatches).expect("staging batches fit u32")).collect();
        let free = FreeBatches {
            batches,
            kept: Vec::new(),
            partial: Vec::new(),
            kept_used: Instant::now(),
            allocated: 0,
            releasing: 0,
            keeping: 0,
        };
        let keep_max = keep_bytes / BATCH_BYTES;
        Ok(Arena { map, free: Mutex::new(free), returned: Condvar::new(), keep_max, keep_for: KEEP_FOR })
    }

    /// This arena, its kept batches waiting `keep_for` for a copy back.
    pub(crate) fn keeping_for(self, keep_for: Duration) -> Arena {
        Arena { keep_for, ..self }
    }

    /// How long kept batches wait for a copy back to RAM.
    pub(crate) fn keep_for(&self) -> Duration {
        self.keep_for
    }

    /// Takes batches for `npages` slots; the slots are empty. Waits for
    /// slots being emptied elsewhere when they are needed, and empties kept
    /// batches when it must.
    pub(crate) fn alloc(self: &Arc<Self>, npages: usize) -> Result<Slots> {
        let n = npages.div_ceil(BATCH_PAGES);
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while free.batches.len() < n && free.releasing > 0 {
            free = self.returned.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        while free.batches.len() < n
            && let Some(b) = free.kept.pop().or_else(|| free.partial.pop().map(|p| p.0))
        {
            if self.empty_kept(b) {
                free.insert(b);
            }
        }
        if free.batches.len() < n {
            return Err(Error::new(
                ErrorKind::NoMemory,
                format!("staging area exhausted ({npages} pages wanted); migrate in smaller chunks"),
            ));
        }
        // The lowest run of `n` adjacent batches, so that a migration's
        // slots are one piece of memory: one move (a TLB flush of the other
        // CPUs per 2 MiB) and one discard (one flush) for all of them. Any
        // `n` batches when there is no such run.
        let at = free
            .batches
            .windows(n.max(1))
            .position(|w| w[w.len() - 1] - w[0] == (w.len() - 1) as u32)
            .unwrap_or(free.batches.len() - n);
        let batches = free.batches.drain(at..at + n).collect();
        Ok(Slots::new(self, batches, npages))
    }

    /// Takes up to `max` kept batches, each full of pages (slot `k *
    /// BATCH_PAGES` starts batch `k`); `None` when none is kept. Waits for
    /// slot sets being given back elsewhere that may keep some.
    pub(crate) fn take_kept(self: &Arc<Self>, max: usize) -> Option<Slots> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while free.kept.is_empty() && free.keeping > 0 {
            free = self.returned.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        let n = max.min(free.kept.len());
        if n == 0 {
            return None;
        }
        free.kept_used = Instant::now();
        let at = free.kept.len() - n;
        let batches: Vec<u32> = free.kept.drain(at..).collect();
        Some(Slots::taken(self, batches))
    }

    /// Takes a partly filled kept batch whose first `npages` slots (at
    /// least) hold pages, without waiting; `None` when there is none. Full
    /// batches are left for the big copies they save most on.
    pub(crate) fn take_filled(self: &Arc<Self>, npages: usize) -> Option<Slots> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let k = free.partial.iter().position(|&(_, n)| n >= npages)?;
        let b = free.partial.swap_remove(k).0;
        free.kept_used = Instant::now();
        Some(Slots::taken(self, vec![b]))
    }

    /// Notes that copies back to RAM had the kernel allocate `npages` pages
    /// while batches were kept, and returns kept batches holding as many
    /// pages to empty (partly filled ones first, then full ones, each the
    /// one kept longest), with the pages they hold, if that many have been
    /// allocated since the last were shed: the pages that came back
    /// replace theirs, which no copy took. Without this, a program that
    /// moves data to a device in bulk and faults it back page by page would
    /// hold both copies, up to `keep_max` batches, and every fault would
    /// take memory the process had not touched for long (on this project's
    /// VM that can cost its page many times its copy).
    pub(crate) fn note_allocated(self: &Arc<Self>, npages: usize) -> Option<(Slots, usize)> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.allocated += npages;
        let (mut shed, mut shed_pages) = (Vec::new(), 0);
        loop {
            let pages = match (free.partial.first(), free.kept.is_empty()) {
                (Some(&(_, n)), _) => n,
                (None, false) => BATCH_PAGES,
                (None, true) => {
                    // Nothing kept: pages allocated now replace nothing.
                    free.allocated = 0;
                    break;
                }
            };
            if free.allocated < pages {
                break;
            }
            free.allocated -= pages;
            shed_pages += pages;
            let b = if free.partial.is_empty() { free.kept.remove(0) } else { free.partial.remove(0).0 };
            shed.push(b);
        }
        (!shed.is_empty()).then(|| (Slots::taken(self, shed), shed_pages))
    }

    /// Empties the kept batches when none was kept or taken for the
    /// arena's keep time (their memory returns to the system); returns how
    /// many.
    pub(crate) fn trim_kept(&self) -> usize {
        let kept = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if (free.kept.is_empty() && free.partial.is_empty()) || free.kept_used.elapsed() < self.keep_for {
                return 0;
            }
            // Being emptied elsewhere, as far as `alloc` is concerned: it
            // waits for them rather than find the arena exhausted.
            free.releasing += 1;
            let partial = std::mem::take(&mut free.partial).into_iter().map(|p| p.0);
            let mut kept = std::mem::take(&mut free.kept);
            kept.extend(partial);
            kept
        };
        // Emptied without the lock: a gigabyte takes tens of milliseconds.
        let emptied: Vec<u32> = kept.iter().copied().filter(|&b| self.empty_kept(b)).collect();
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        for &b in &emptied {
            free.insert(b);
        }
        free.releasing -= 1;
        drop(free);
        self.returned.notify_all();
        kept.len()
    }

    /// Empties kept batch `b`; false (logged: the batch leaks) when the
    /// kernel refuses.
    fn empty_kept(&self, b: u32) -> bool {
        let emptied = self.map.discard(b as usize * BATCH_BYTES, BATCH_BYTES);
        if let Err(err) = &emptied {
            tracing::error!(%err, "discarding a kept staging batch failed; leaking it");
        }
        emptied.is_ok()
    }

    /// Batches that may still be kept, full or partly filled.
    fn keep_room(&self, free: &FreeBatches) -> usize {
        self.keep_max.saturating_sub(free.kept.len() + free.partial.len())
    }

    /// Slot sets of this arena being given back by another thread.
    #[cfg(test)]
    pub(crate) fn releasing(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).releasing
    }

    /// Waits until no slot set of this arena is being emptied elsewhere.
    pub(crate) fn wait_released(&self) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while free.releasing > 0 {
            free = self.returned.wait(free).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Gives back `batches`, whose first `npages` slots were used: those
    /// listed in `keep` (and `partial`, with its filled slots) are kept
    /// while there is room, the others emptied.
    fn release(&self, slots: &Slots) {
        let Slots { batches, npages, keep, keep_partial: partial, deferred, emptied: clean, .. } = slots;
        let (npages, partial, deferred) = (*npages, *partial, *deferred);
        let mut to_empty = batches.to_vec();
        if let Some((b, n)) = partial {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if self.keep_room(&free) > 0 {
                free.partial.push((b, n));
                free.kept_used = Instant::now();
                to_empty.retain(|&x| x != b);
            }
        }
        if !keep.is_empty() {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let room = self.keep_room(&free);
            let kept: Vec<u32> = keep.iter().copied().take(room).collect();
            to_empty.retain(|b| !kept.contains(b));
            if !kept.is_empty() {
                free.kept.extend(kept);
                free.kept_used = Instant::now();
            }
            if deferred {
                free.keeping -= 1;
            }
            drop(free);
            self.returned.notify_all();
        }
        // Only the last batch can be partly used (and it is kept only as a
        // set's one batch).
        let unused = batches.len() * BATCH_PAGES - npages;
        let mut emptied = true;
        let mut i = if *clean { to_empty.len() } else { 0 };
        while i < to_empty.len() {
            // One discard per run of adjacent batches, of the slots used.
            let n = 1 + adjacent_after(&to_empty, i);
            let tail = if to_empty[i + n - 1] == batches[batches.len() - 1] { unused } else { 0 };
            let len = (n * BATCH_PAGES - tail) * PAGE_SIZE;
            if let Err(err) = self.map.discard(to_empty[i] as usize * BATCH_BYTES, len) {
                tracing::error!(%err, "discarding staging batches failed; leaking them");
                emptied = false;
                break;
            }
            i += n;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if emptied {
            for &b in &to_empty {
                free.insert(b);
            }
        }
        if deferred {
            free.releasing -= 1;
            drop(free);
            // Only a deferred set is waited for (see `alloc`, `take_kept`).
            self.returned.notify_all();
        }
    }
}

/// Slots `0..npages` in an arena, owned by one migration until dropped.
#[derive(Debug)]
pub(crate) struct Slots {
    arena: Arc<Arena>,
    batches: Vec<u32>,
    npages: usize,
    /// Counted in the arena's `releasing` until dropped.
    deferred: bool,
    /// Batches to keep when the slots are given back (see the module docs).
    keep: Vec<u32>,
    /// A batch to keep with its first slots filled (batch, pages).
    keep_partial: Option<(u32, usize)>,
    /// No slot holds a page (all were moved out): giving the slots back
    /// needs no discard.
    emptied: bool,
}

impl Slots {
    /// Slots `0..npages` in `batches` of `arena`.
    fn new(arena: &Arc<Arena>, batches: Vec<u32>, npages: usize) -> Slots {
        Slots {
            arena: arena.clone(),
            batches,
            npages,
            deferred: false,
            keep: Vec::new(),
            keep_partial: None,
            emptied: false,
        }
    }

    /// Kept `batches`, taken whole: given back, they are emptied.
    fn taken(arena: &Arc<Arena>, batches: Vec<u32>) -> Slots {
        let npages = batches.len() * BATCH_PAGES;
        Slots::new(arena, batches, npages)
    }

    /// Offset of slot `i` in the arena's mapping.
    pub(crate) fn offset(&self, i: usize) -> usize {
        self.batches[i / BATCH_PAGES] as usize * BATCH_BYTES + (i % BATCH_PAGES) * PAGE_SIZE
    }

    /// Address of slot `i`.
    pub(crate) fn addr(&self, i: usize) -> usize {
        self.arena.map.addr() + self.offset(i)
    }

    /// How many slots from `i` on are contiguous in memory (up to `max`).
    pub(crate) fn contiguous(&self, i: usize, max: usize) -> usize {
        let adjacent = adjacent_after(&self.batches, i / BATCH_PAGES);
        ((adjacent + 1) * BATCH_PAGES - i % BATCH_PAGES).min(max)
    }

    /// Allocates the pages of slots `slots` now, in one call per contiguous
    /// piece, rather than one kernel fault per page when a driver first
    /// writes them. Only for the pool: populating the registered stage would
    /// fault on uhmm's own userfaultfd.
    pub(crate) fn populate(&self, slots: Range<usize>) {
        let mut i = slots.start;
        while i < slots.end {
            let n = self.contiguous(i, slots.end - i);
            if let Err(err) = self.arena.map.populate_write(self.offset(i), n * PAGE_SIZE) {
                tracing::warn!(%err, "populating pool pages failed; they fault in on first write");
                return;
            }
            i += n;
        }
    }

    /// Slots held.
    pub(crate) fn len(&self) -> usize {
        self.npages
    }

    /// Splits off the back half of the slots (at a batch boundary) as a set
    /// of their own, so that two threads can empty them; `None` for a set
    /// of one batch, or one already handed to another thread.
    pub(crate) fn split_half(&mut self) -> Option<Slots> {
        if self.batches.len() < 2 || self.deferred {
            return None;
        }
        let keep = self.batches.len() / 2;
        let back = self.batches.split_off(keep);
        let npages = self.npages - keep * BATCH_PAGES;
        self.npages = keep * BATCH_PAGES;
        let keep_back = self.keep.iter().copied().filter(|b| back.contains(b)).collect();
        self.keep.retain(|b| !back.contains(b));
        Some(Slots {
            arena: self.arena.clone(),
            batches: back,
            npages,
            deferred: false,
            keep: keep_back,
            keep_partial: None,
            emptied: self.emptied,
        })
    }

    /// Marks the slots as being emptied by another thread: until they are
    /// dropped there, an allocation that needs them waits for them. Refused
    /// (the slots come back) when the arena has [`MAX_RELEASING`] sets
    /// being emptied already: the caller empties these itself.
    pub(crate) fn defer(mut self) -> std::result::Result<Slots, Slots> {
        let mut free = self.arena.free.lock().unwrap_or_else(|e| e.into_inner());
        if self.deferred || free.releasing >= MAX_RELEASING {
            drop(free);
            return Err(self);
        }
        free.releasing += 1;
        if !self.keep.is_empty() {
            free.keeping += 1;
        }
        drop(free);
        self.deferred = true;
        Ok(self)
    }

    pub(crate) fn mapping(&self) -> &Mapping {
        &self.arena.map
    }

    /// Marks the whole batch holding slot `i` to be kept when the slots are
    /// given back. The caller vouches that each of its pages is present,
    /// and no longer needed.
    pub(crate) fn keep_batch_of(&mut self, i: usize) {
        let b = self.batches[i / BATCH_PAGES];
        if !self.keep.contains(&b) {
            self.keep.push(b);
        }
    }

    /// Whether giving the slots back keeps a batch.
    pub(crate) fn keeps(&self) -> bool {
        !self.keep.is_empty() || self.keep_partial.is_some()
    }

    /// Whether giving the slots back would empty nothing: every batch is
    /// marked to be kept, and the arena has room to keep them all.
    pub(crate) fn keeps_all(&self) -> bool {
        self.keep.len() == self.batches.len() && {
            let free = self.arena.free.lock().unwrap_or_else(|e| e.into_inner());
            self.keep.len() <= self.arena.keep_room(&free)
        }
    }

    /// Notes that no slot holds a page any more (the caller moved each
    /// one's page out): giving them back skips the discard.
    pub(crate) fn mark_emptied(&mut self) {
        self.emptied = true;
    }

    /// Marks the one batch of a set of fewer slots than a batch to be kept
    /// with its `npages` first slots, when the slots are given back. The
    /// caller vouches that those pages are present, and no longer needed.
    pub(crate) fn keep_prefix(&mut self, npages: usize) {
        if let [b] = self.batches[..] {
            self.keep_partial = Some((b, npages.min(self.npages)));
        }
    }

    pub(crate) fn arena(&self) -> &Arc<Arena> {
        &self.arena
    }
}

/// How many of the batches after `batches[b]` follow it in memory, each
/// right after the one before.
fn adjacent_after(batches: &[u32], b: usize) -> usize {
    batches[b + 1..].iter().zip(&batches[b..]).take_while(|(next, prev)| **next == **prev + 1).count()
}

impl Drop for Slots {
    fn drop(&mut self) {
        self.arena.release(self);
    }
}

/// A RAM page in a staging arena, lent to a driver during a migration: the
/// source of a copy to the device, or the destination of a copy back. A
/// driver may grow a handle over the pages that follow it in memory
/// ([`SystemPage::extend`]), as a DMA driver merges a scatter-gather list,
/// and copy them all at once.
///
/// It stays valid memory for as long as the handle lives (the arena outlives
/// it); its contents belong to the migration that lent it, and a driver must
/// finish its copies (wait for its fence) before the migration's next step.
#[derive(Debug, Clone)]
pub struct SystemPage {
    arena: Arc<Arena>,
    off: usize,
    /// Bytes covered: one page, or a run after `extend`.
    len: usize,
}

impl SystemPage {
    pub(crate) fn new(arena: &Arc<Arena>, off: usize) -> SystemPage {
        SystemPage { arena: arena.clone(), off, len: PAGE_SIZE }
    }

    /// Pages this handle covers.
    pub fn pages(&self) -> usize {
        self.len / PAGE_SIZE
    }

    /// Grows this handle over `next` (a page of the same migration) when
    /// `next` starts right where it ends, in the same memory; returns
    /// whether it did (false: nothing changes).
    pub fn extend(&mut self, next: &SystemPage) -> bool {
        let adjoins = Arc::ptr_eq(&self.arena, &next.arena) && next.off == self.off + self.len;
        if adjoins {
            self.len += next.len;
        }
        adjoins
    }

    /// Copies from the pages at `offset` into `buf`.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        self.arena.map.read(self.off + offset, buf).map_err(|e| Error::sys("staging read", e))
    }

    /// Copies `buf` into the pages at `offset`.
    pub fn write(&self, offset: usize, buf: &[u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        self.arena.map.write(self.off + offset, buf).map_err(|e| Error::sys("staging write", e))
    }

    /// Copies all the pages into `dst` at `dst_off` (a device's memory).
    pub fn copy_to(&self, dst: &Mapping, dst_off: usize) -> Result<()> {
        self.arena.map.copy_to(self.off, dst, dst_off, self.len).map_err(|e| Error::sys("staging copy", e))
    }

    /// [`SystemPage::copy_to`] with non-temporal stores where the CPU has
    /// them ([`Mapping::stream_to`]: past the caches, as a DMA engine
    /// writes): faster when the destination is not in the caches anyway.
    pub fn stream_to(&self, dst: &Mapping, dst_off: usize) -> Result<()> {
        self.arena.map.stream_to(self.off, dst, dst_off, self.len).map_err(|e| Error::sys("staging copy", e))
    }

    /// Fills all the pages from `src` at `src_off` (a device's memory).
    pub fn copy_from(&self, src: &Mapping, src_off: usize) -> Result<()> {
        src.copy_to(src_off, &self.arena.map, self.off, self.len).map_err(|e| Error::sys("staging copy", e))
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::invalid("access beyond the page")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena(nbatches: usize) -> Arc<Arena> {
        Arc::new(Arena::new(nbatches * BATCH_BYTES, None, 2 * BATCH_BYTES).unwrap())
    }

    #[test]
    fn slots_are_one_piece_of_memory_when_adjacent_batches_are_free() {
        let a = arena(8);
        let s1 = a.alloc(2 * BATCH_PAGES).unwrap();
        assert_eq!(s1.contiguous(0, usize::MAX), 2 * BATCH_PAGES);
        assert_eq!(s1.contiguous(100, usize::MAX), 2 * BATCH_PAGES - 100);
        assert_eq!(s1.contiguous(600, 10), 10);
        assert_eq!(s1.addr(BATCH_PAGES), s1.addr(0) + BATCH_BYTES);
        let s2 = a.alloc(BATCH_PAGES).unwrap();
        let _s3 = a.alloc(BATCH_PAGES).unwrap();
        drop(s2);
        // Free: the batch s2 held, and four adjacent ones after s3's.
        let s4 = a.alloc(3 * BATCH_PAGES).unwrap();
        assert_eq!(s4.contiguous(0, usize::MAX), 3 * BATCH_PAGES);
        // Left: two batches that are not adjacent; a set still gets them.
        let s5 = a.alloc(2 * BATCH_PAGES).unwrap();
        assert_eq!(s5.contiguous(0, usize::MAX), BATCH_PAGES);
        assert_eq!(s5.contiguous(BATCH_PAGES, usize::MAX), BATCH_PAGES);
        assert!(a.alloc(1).is_err(), "all eight batches are held");
    }

    #[test]
    fn released_slots_come_back_empty_and_in_order() {
        let a = arena(4);
        let s = a.alloc(3 * BATCH_PAGES).unwrap();
        // A page in each of the first two batches, across their boundary.
        for i in [BATCH_PAGES - 1, BATCH_PAGES] {
            s.mapping().write(s.offset(i), &[7u8; 8]).unwrap();
        }
        let first = s.addr(0);
        drop(s);
        let again = a.alloc(4 * BATCH_PAGES).unwrap();
        assert_eq!(again.addr(0), first, "the lowest run again");
        assert_eq!(again.contiguous(0, usize::MAX), 4 * BATCH_PAGES);
        for i in [BATCH_PAGES - 1, BATCH_PAGES] {
            let mut buf = [1u8; 8];
            again.mapping().read(again.offset(i), &mut buf).unwrap();
            assert_eq!(buf, [0u8; 8], "slot {i} was emptied");
        }
    }

    #[test]
    fn a_partly_filled_batch_is_kept_for_small_copies_only() {
        let a = arena(4); // keeps two batches at most
        let mut s = a.alloc(100).unwrap();
        for i in 0..100 {
            s.mapping().write(s.offset(i), &[i as u8 + 1; 8]).unwrap();
        }
        let at = s.addr(0);
        s.keep_prefix(100);
        assert!(s.keeps());
        drop(s);
        assert!(a.take_kept(1).is_none(), "not a full batch");
        assert!(a.take_filled(101).is_none(), "too few pages");
        let kept = a.take_filled(64).expect("kept, with its 100 pages");
        assert_eq!(kept.addr(0), at);
        let mut b = [0u8; 8];
        kept.mapping().read(kept.offset(99), &mut b).unwrap();
        assert_eq!(b, [100; 8], "the pages are still there");
        assert!(a.take_filled(1).is_none(), "taken once");
        drop(kept); // given back unmarked: emptied
        let again = a.alloc(4 * BATCH_PAGES).unwrap();
        again.mapping().read(again.offset(0), &mut b).unwrap();
        assert_eq!(b, [0; 8]);
        drop(again);
        // Unused for a while, it is emptied.
        let mut s = a.alloc(100).unwrap();
        s.keep_prefix(100);
        drop(s);
        std::thread::sleep(KEEP_FOR + Duration::from_millis(50));
        assert_eq!(a.trim_kept(), 1);
        assert!(a.take_filled(1).is_none());
        // A set of more than one batch keeps no prefix.
        let mut s = a.alloc(BATCH_PAGES + 1).unwrap();
        s.keep_prefix(BATCH_PAGES + 1);
        assert!(!s.keeps());
    }

    #[test]
    fn split_halves_are_emptied_and_given_back_each_on_its_own() {
        let a = arena(4);
        assert!(a.alloc(BATCH_PAGES).unwrap().split_half().is_none(), "one batch does not split");
        let mut front = a.alloc(3 * BATCH_PAGES - 7).unwrap();
        for i in [0, BATCH_PAGES, 2 * BATCH_PAGES] {
            front.mapping().write(front.offset(i), &[5u8; 8]).unwrap();
        }
        let back = front.split_half().expect("three batches split");
        assert_eq!((front.len(), back.len()), (BATCH_PAGES, 2 * BATCH_PAGES - 7));
        assert_eq!(back.addr(0), front.addr(0) + BATCH_BYTES, "the back half starts where the front ends");
        let (front_at, back_at) = (front.addr(0), back.addr(BATCH_PAGES));
        drop(back);
        // The back half's two batches, emptied, are free again; the front
        // batch is still held.
        let again = a.alloc(3 * BATCH_PAGES).unwrap();
        assert_eq!(again.addr(0), front_at + BATCH_BYTES);
        assert_eq!(again.addr(BATCH_PAGES), back_at);
        let mut buf = [1u8; 8];
        again.mapping().read(again.offset(BATCH_PAGES), &mut buf).unwrap();
        assert_eq!(buf, [0u8; 8], "emptied");
        drop((front, again));
        let mut deferred = a.alloc(2 * BATCH_PAGES).unwrap().defer().unwrap();
        assert!(deferred.split_half().is_none(), "a set handed to another thread is not split");
    }

    #[test]
    fn a_system_page_grows_over_the_pages_after_it_only() {
        let a = arena(2);
        let s = a.alloc(BATCH_PAGES).unwrap();
        let page = |i: usize| SystemPage::new(s.arena(), s.offset(i));
        let mut run = page(3);
        assert!(!run.extend(&page(5)), "a gap");
        assert!(!run.extend(&page(2)), "before it");
        assert!(run.extend(&page(4)) && run.extend(&page(5)));
        assert_eq!(run.pages(), 3);
        let other = Arc::new(Arena::new(BATCH_BYTES, None, 0).unwrap());
        assert!(!run.extend(&SystemPage::new(&other, s.offset(6))), "another arena");
        run.write(2 * PAGE_SIZE + 10, &[9u8; 4]).unwrap();
        let mut buf = [0u8; 4];
        page(5).read(10, &mut buf).unwrap();
        assert_eq!(buf, [9u8; 4], "the run's third page is page 5");
        assert!(run.write(3 * PAGE_SIZE - 2, &[1u8; 4]).is_err(), "past the run");
        let dev = Mapping::anonymous(4 * PAGE_SIZE, uhmm_sys::mman::Protection::ReadWrite, PAGE_SIZE).unwrap();
        run.stream_to(&dev, PAGE_SIZE).unwrap();
        dev.read(3 * PAGE_SIZE + 10, &mut buf).unwrap();
        assert_eq!(buf, [9u8; 4], "the whole run was copied");
    }

    #[test]
    fn full_batches_are_kept_then_taken_or_emptied_when_needed() {
        let a = arena(4); // keeps two batches at most
        let mut s = a.alloc(3 * BATCH_PAGES).unwrap();
        s.populate(0..3 * BATCH_PAGES);
        for b in 0..3 {
            a.map.write(s.offset(b * BATCH_PAGES), &[b as u8 + 1]).unwrap();
            s.keep_batch_of(b * BATCH_PAGES);
        }
        drop(s); // two kept, the third emptied
        let first = |s: &Slots, k: usize| {
            let mut b = [0u8];
            a.map.read(s.offset(k * BATCH_PAGES), &mut b).unwrap();
            b[0]
        };
        let kept = a.take_kept(8).unwrap();
        assert_eq!(kept.len(), 2 * BATCH_PAGES, "no more than keep_max");
        let mut seen: Vec<u8> = (0..2).map(|k| first(&kept, k)).collect();
        seen.sort_unstable();
        assert_eq!(seen, [1, 2], "kept batches keep their pages");
        assert!(a.take_kept(8).is_none());
        drop(kept); // given back unmarked: emptied
        let all = a.alloc(4 * BATCH_PAGES).unwrap();
        assert!((0..4).all(|k| first(&all, k) == 0), "every free batch is empty");
        // Kept batches are emptied for an allocation that needs them.
        let mut s = all;
        s.populate(0..4 * BATCH_PAGES);
        for b in 0..4 {
            a.map.write(s.offset(b * BATCH_PAGES), &[9]).unwrap();
            s.keep_batch_of(b * BATCH_PAGES);
        }
        drop(s);
        assert_eq!(a.trim_kept(), 0, "kept for a while");
        let all = a.alloc(4 * BATCH_PAGES).unwrap();
        assert!((0..4).all(|k| first(&all, k) == 0), "the kept batches were emptied for it");
        assert!(a.take_kept(8).is_none());
        drop(all);
    }

    #[test]
    fn copies_that_allocate_shed_as_many_kept_pages_partly_filled_batches_first() {
        let a = Arc::new(Arena::new(4 * BATCH_BYTES, None, 3 * BATCH_BYTES).unwrap());
        assert!(a.note_allocated(2 * BATCH_PAGES).is_none(), "nothing kept");
        // A full batch kept, then two partly filled, of 100 and 50 pages.
        let mut s = a.alloc(BATCH_PAGES).unwrap();
        s.populate(0..BATCH_PAGES);
        s.keep_batch_of(0);
        drop(s);
        let mut partial = Vec::new();
        for n in [100, 50] {
            let mut s = a.alloc(n).unwrap();
            s.populate(0..n);
            a.map.write(s.offset(0), &[7]).unwrap();
            partial.push(s.offset(0));
            s.keep_prefix(n);
            drop(s);
        }
        // Pages allocated while nothing was kept did not count.
        assert!(a.note_allocated(99).is_none(), "fewer pages than the first batch holds");
        let (shed, pages) = a.note_allocated(1).expect("as many: the first partly filled batch goes");
        assert_eq!((shed.len(), shed.offset(0), pages), (BATCH_PAGES, partial[0], 100));
        drop(shed); // given back unmarked: emptied
        let (shed, pages) = a.note_allocated(50 + BATCH_PAGES + 7).expect("the other two");
        assert_eq!(
            (shed.len(), shed.offset(0), pages),
            (2 * BATCH_PAGES, partial[1], 50 + BATCH_PAGES),
            "the other partly filled one first"
        );
        drop(shed);
        assert!(a.take_kept(8).is_none(), "none kept any more");
        assert!(a.note_allocated(BATCH_PAGES).is_none(), "nothing left to shed");
        let all = a.alloc(4 * BATCH_PAGES).unwrap();
        let mut b = [9u8];
        for k in 0..4 {
            a.map.read(all.offset(k * BATCH_PAGES), &mut b).unwrap();
            assert_eq!(b, [0], "batch {k} was emptied");
        }
    }

    #[test]
    fn kept_batches_are_emptied_once_unused() {
        let a = arena(2);
        let mut s = a.alloc(BATCH_PAGES).unwrap();
        s.populate(0..BATCH_PAGES);
        s.keep_batch_of(0);
        drop(s);
        assert_eq!(a.trim_kept(), 0);
        std::thread::sleep(KEEP_FOR + Duration::from_millis(50));
        assert_eq!(a.trim_kept(), 1);
        assert!(a.take_kept(1).is_none());
    }

    #[test]
    fn an_allocation_waits_for_kept_batches_being_emptied() {
        // Found by the bench: kept batches being emptied by the helper were
        // neither kept nor free, and an allocation found the arena exhausted.
        let n = 64;
        let a = Arc::new(Arena::new(n * BATCH_BYTES, None, n * BATCH_BYTES).unwrap());
        let mut s = a.alloc(n * BATCH_PAGES).unwrap();
        s.populate(0..n * BATCH_PAGES); // 128 MiB: emptying takes milliseconds
        for b in 0..n {
            s.keep_batch_of(b * BATCH_PAGES);
        }
        drop(s);
        std::thread::sleep(KEEP_FOR + Duration::from_millis(50));
        let trim = {
            let a = a.clone();
            std::thread::spawn(move || a.trim_kept())
        };
        std::thread::sleep(Duration::from_millis(1));
        let all = a.alloc(n * BATCH_PAGES).expect("waits for the batches being emptied");
        assert_eq!(all.len(), n * BATCH_PAGES);
        drop(all);
        trim.join().unwrap();
    }
}
