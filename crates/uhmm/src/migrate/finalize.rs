//! Step 3, `migrate_vma_finalize`: each moved page mapped at its new home,
//! the others restored, every page unlocked, waiting threads woken, the
//! sources freed (`page_free`); in two halves for the pipelined helper.
//! How pages are mapped back into their regions is `install`.

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;

use smallvec::{SmallVec, smallvec};
use uhmm_sys::PAGE_SIZE;
use uhmm_sys::pagemap::{Query, category};

use crate::copier::{CopyQueue, PIECE_PAGES, copy_in};
use crate::migrate::{Few, Inner, MigrateDst, MigrateSummary, Migrated, Migration, Page, Runs, Skip, Src};
use crate::mm::Mm;
use crate::page::DevicePage;
use crate::pte::State;
use crate::staging::Slots;
use crate::stats::Stats;

impl Migration<Migrated> {
    /// Step 3 (`migrate_vma_finalize`): map moved pages at their new home,
    /// restore the others, unlock and wake.
    pub fn finalize(mut self) -> MigrateSummary {
        self.inner.finish()
    }

    /// `finalize` in two halves, for the pipelined helper: this one starts
    /// mapping pages back (the copy helper takes its share of the copies
    /// in); [`Finalizing::end`] completes it.
    pub(super) fn finalize_begin(self) -> Finalizing {
        let Migration { mut inner, .. } = self;
        let started = inner.finish_begin();
        Finalizing { inner, started: Some(started) }
    }
}

/// A `finalize` under way ([`Migration::finalize_begin`]); dropping it
/// completes it.
#[derive(Debug)]
pub(super) struct Finalizing {
    inner: Inner,
    started: Option<Installing>,
}

impl Finalizing {
    pub(super) fn end(mut self) -> MigrateSummary {
        let started = self.started.take().expect("a finalize under way");
        self.inner.finish_end(started)
    }

    /// `end`, emptying half the staging slots on this thread while the
    /// helper empties the other half: for a caller about to wait for them.
    pub(super) fn end_releasing_here(mut self) -> MigrateSummary {
        self.inner.release_here = true;
        self.end()
    }
}

impl Drop for Finalizing {
    fn drop(&mut self) {
        if let Some(started) = self.started.take() {
            self.inner.finish_end(started);
        }
    }
}

/// A finalize under way (`Inner::finish_begin`): the new states, what is
/// being mapped back, and the copies in still to do or to wait for.
#[derive(Debug)]
pub(super) struct Installing {
    new_state: Few<State>,
    installs: Few<(usize, InstallFrom)>,
    failed: Vec<usize>,
    /// The copies in from driver memory, and when they are big, their
    /// queue, shared with the helper (then each is a piece).
    pieces: Runs,
    copies: Option<Arc<CopyQueue>>,
}

/// Where the data of a page that `finalize` maps back into its region is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum InstallFrom {
    /// A pool slot the driver filled: moved in.
    Pool,
    /// The staging slot setup moved it to: moved back (a restore).
    Stage,
    /// The driver's memory ([`Migration::set_dst_system_from`]): copied in.
    Driver,
    /// No data: the zero page ([`Migration::set_dst_zero`]).
    Zero,
}

impl Inner {
    /// `finalize`, and the restore path of `Drop`.
    pub(super) fn finish(&mut self) -> MigrateSummary {
        let started = self.finish_begin();
        self.finish_end(started)
    }

    /// The first half of `finish`: decides each page's new state and starts
    /// mapping pages back (moves done, copies in started, the helper's share
    /// running). [`Inner::finish_end`] completes it.
    pub(super) fn finish_begin(&mut self) -> Installing {
        self.finished = true;
        let space = self.space.clone();
        let mut new_state: Few<State> = self.pages.iter().map(|p| p.prior).collect();
        // Pages to map back into regions, and where their data is.
        let mut installs: Few<(usize, InstallFrom)> = Few::new();
        let mut to_device: Few<bool> = smallvec![false; self.regions.len()];
        for (i, state) in new_state.iter_mut().enumerate() {
            let p = self.pages[i];
            if p.src == Src::Skip {
                continue;
            }
            let region = &self.regions[p.region as usize];
            if p.migrated {
                match p.dst {
                    MigrateDst::Device(d) => {
                        *state = State::Device(d);
                        to_device[p.region as usize] = true;
                        let region_id = region.id;
                        if let Some(pm) = self.pagemap(d.pagemap) {
                            pm.set_rmap(d.pfn, Some((region_id, p.idx)));
                            if pm.is_coherent() {
                                // CPU-addressable: the page is mapped in the region.
                                installs.push((i, InstallFrom::Pool));
                            }
                        }
                    }
                    MigrateDst::System => {
                        *state = State::Cpu;
                        installs.push((i, if p.copy_from.is_some() { InstallFrom::Driver } else { InstallFrom::Pool }));
                    }
                    MigrateDst::Zero => {
                        *state = State::Cpu;
                        installs.push((i, InstallFrom::Zero));
                    }
                    MigrateDst::Error => {
                        *state = State::Poisoned;
                        if let Err(e) = space.uffd.poison(region.addr_of(p.idx), PAGE_SIZE, true) {
                            tracing::error!(errno = %e.errno, "UFFDIO_POISON failed");
                        }
                    }
                    MigrateDst::None => unreachable!("migrated pages have a destination"),
                }
            } else {
                // Put back what setup moved to staging: RAM pages, and zero
                // pages that were collected as holes (true holes are skipped
                // by the move).
                let staged = match p.src {
                    Src::System | Src::Hole => true,
                    Src::Device(d) => space.is_coherent(&d),
                    Src::Skip => false,
                };
                if staged && self.stage.is_some() {
                    installs.push((i, InstallFrom::Stage));
                }
            }
        }
        // Before the pages unlock: a fault read earlier then looks stale.
        if to_device.contains(&true) {
            let epoch = space.to_device_epoch.fetch_add(1, SeqCst) + 1;
            for (region, _) in self.regions.iter().zip(&to_device).filter(|(_, moved)| **moved) {
                region.to_device_at.fetch_max(epoch, SeqCst);
            }
        }
        let (failed, pieces, copies) = self.install_begin(&installs);
        Installing { new_state, installs, failed, pieces, copies }
    }

    /// The second half of `finish`: the copies in (shared with the helper)
    /// done; failures settled; counts; unlock, free sources, wake.
    pub(super) fn finish_end(&mut self, started: Installing) -> MigrateSummary {
        let Installing { mut new_state, installs, mut failed, pieces, copies } = started;
        let space = self.space.clone();
        let copied: Few<usize> = match copies {
            Some(queue) => {
                let (copied, by_helper, waited) = queue.finish(&space.uffd);
                Stats::add(&space.stats.helper_copied_pages, (by_helper / PAGE_SIZE) as u64);
                if space.copier.waited(waited) {
                    Stats::add(&space.stats.helper_stalls, 1);
                }
                SmallVec::from_vec(copied)
            }
            None => {
                // The kernel allocates these pages: as many kept ones go.
                let allocated = pieces.iter().map(|p| p.1).sum();
                if allocated > 0
                    && let Some((shed, pages)) = space.stage.note_allocated(allocated)
                {
                    Stats::add(&space.stats.kept_shed_pages, pages as u64);
                    space.copier.release(shed);
                }
                pieces.iter().map(|&(i, n)| copy_in(&space.uffd, self.copy_run(i, n))).collect()
            }
        };
        for (&(i, n), done) in pieces.iter().zip(copied) {
            self.settle(&mut failed, i, n, done / PAGE_SIZE);
        }
        // Every pool page moved into its region: the pool needs no discard
        // (on a fault's path, a system call and maybe a TLB flush saved).
        let moved_out = |p: &Page| p.migrated && p.dst == MigrateDst::System && p.copy_from.is_none();
        if failed.is_empty()
            && let Some(pool) = self.pool.as_mut()
            && self.pages.iter().all(|p| moved_out(p) || !(p.lent || matches!(p.src, Src::Device(_))))
        {
            pool.mark_emptied();
        }
        for i in failed {
            let p = &mut self.pages[i];
            if p.migrated && (p.copy_from.is_some() || p.dst == MigrateDst::Zero) {
                // Its data is still in the driver's memory (or none is
                // needed), and its source (a device page or a hole) was
                // never unmapped: it stays.
                p.migrated = false;
                new_state[i] = p.prior;
                continue;
            }
            new_state[i] = State::Poisoned;
            Stats::add(&space.stats.poisoned_pages, 1);
            let region = self.region_of(i);
            if let Err(e) = space.uffd.poison(region.addr_of(self.pages[i].idx), PAGE_SIZE, true) {
                tracing::error!(errno = %e.errno, "UFFDIO_POISON failed");
            }
        }
        // Count; device pages to free: the sources of pages that moved, and
        // allocated destinations that went unused.
        let mut summary = MigrateSummary { npages: self.pages.len(), cpages: self.cpages, ..Default::default() };
        let mut to_free: Few<DevicePage> = Few::new();
        // Pages to a device, to RAM, poisoned.
        let mut moved = [0u64; 3];
        for p in &self.pages {
            if p.src == Src::Skip {
                match p.skip {
                    Skip::Busy => summary.busy += 1,
                    Skip::Pinned => summary.pinned += 1,
                    Skip::NotSelected => {}
                }
                continue;
            }
            if !p.migrated {
                if let MigrateDst::Device(d) = p.dst {
                    to_free.push(d);
                }
                continue;
            }
            summary.migrated += 1;
            if let Src::Device(old) = p.src {
                to_free.push(old);
            }
            moved[match p.dst {
                MigrateDst::Device(_) => 0,
                MigrateDst::System | MigrateDst::Zero => 1,
                MigrateDst::Error | MigrateDst::None => 2,
            }] += 1;
        }
        let counters = [&space.stats.pages_to_device, &space.stats.pages_to_ram, &space.stats.poisoned_pages];
        for (counter, n) in counters.into_iter().zip(moved) {
            if n > 0 {
                Stats::add(counter, n);
            }
        }
        // Unlock, then wake the threads that faulted meanwhile and those
        // waiting on installed pages (installs do not wake: a woken thread
        // must find its page unlocked).
        let mut wake: Few<bool> = smallvec![false; self.pages.len()];
        for &(i, _) in &installs {
            wake[i] = true;
        }
        for i in 0..self.pages.len() {
            let p = self.pages[i];
            if p.src != Src::Skip && self.region_of(i).pt.unlock(p.idx, new_state[i], &space.waits) {
                wake[i] = true;
            }
        }
        // Sources go back to their drivers before the waiting threads run,
        // so a thread that saw its page come back sees the device page freed.
        // By pagemap, in one call each (usually one).
        to_free.sort_unstable_by_key(|d| d.pagemap);
        for group in to_free.chunk_by(|a, b| a.pagemap == b.pagemap) {
            self.space.free_device_pages(group[0].pagemap, &group.iter().map(|d| d.pfn).collect::<Few<_>>());
        }
        let mut i = 0;
        while i < wake.len() {
            if !wake[i] {
                i += 1;
                continue;
            }
            let (region, idx) = (self.pages[i].region, self.pages[i].idx);
            let mut n = 1;
            while i + n < wake.len()
                && wake[i + n]
                && self.pages[i + n].region == region
                && self.pages[i + n].idx == idx + n
            {
                n += 1;
            }
            let region = self.region_of(i);
            space.wake(region, idx..idx + n);
            if let Some(serving) = &self.serving {
                serving.note_wake(region.addr_of(idx)..region.addr_of(idx + n));
            }
            i += n;
        }
        if let Some(stage) = self.stage.as_mut() {
            keep_moved_to_device(&space, &self.pages, stage);
        }
        for mut slots in [self.stage.take(), self.pool.take()].into_iter().flatten() {
            if self.release_here {
                // The caller waits for them: it empties one half while the
                // helper empties the other.
                if let Some(back) = slots.split_half() {
                    space.copier.release(back);
                }
            } else {
                space.copier.release(slots);
            }
        }
        self.copy_srcs.clear();
        self.copy_maps.clear();
        if std::mem::take(&mut self.scratch)
            && let Some(serving) = &self.serving
        {
            serving.give_back_scratch();
        }
        Stats::add(&space.stats.migrations, 1);
        summary
    }
}

/// Marks the batches of a big migration's staging whose every slot holds a
/// page that moved to a device (and so is present and no longer needed) to
/// be kept for copies back to RAM (see `staging`).
fn keep_moved_to_device(space: &Mm, pages: &[Page], stage: &mut Slots) {
    let moved = |p: &Page| p.migrated && p.src == Src::System && matches!(p.dst, MigrateDst::Device(_));
    // Less than a batch, all of it moved: its pages fill the batch's first
    // slots, kept for a small copy back.
    if pages.len() < crate::BATCH_PAGES {
        if pages.len() >= PIECE_PAGES && pages.iter().all(moved) {
            let (start, stop) = (stage.addr(0), stage.addr(0) + pages.len() * PAGE_SIZE);
            if space
                .scan(start, stop, Query::none_of(category::PRESENT | category::SWAPPED))
                .is_ok_and(|h| h.is_empty())
            {
                stage.keep_prefix(pages.len());
            }
        }
        return;
    }
    let full: Vec<usize> = (pages.chunks_exact(crate::BATCH_PAGES).enumerate())
        .filter(|(_, batch)| batch.iter().all(moved))
        .map(|(b, _)| b * crate::BATCH_PAGES)
        .collect();
    let (Some(&lo), Some(&hi)) = (full.first(), full.last()) else { return };
    // Make sure, with one scan per contiguous piece of the staging: a write
    // to an empty stage slot would fault on uhmm's own userfaultfd.
    let end = hi + crate::BATCH_PAGES;
    let mut i = lo;
    while i < end {
        let n = stage.contiguous(i, end - i);
        let (start, stop) = (stage.addr(i), stage.addr(i) + n * PAGE_SIZE);
        if let Ok(holes) = space.scan(start, stop, Query::none_of(category::PRESENT | category::SWAPPED)) {
            for &first in full.iter().filter(|&&f| f >= i && f < i + n) {
                let (a, b) = (stage.addr(first), stage.addr(first) + crate::HUGE_SIZE);
                if !holes.iter().any(|h| h.start < b && a < h.end) {
                    stage.keep_batch_of(first);
                }
            }
        }
        i += n;
    }
}
