//! Mapping pages back into their regions at `finalize` (the kernel's
//! `remove_migration_ptes`, here with the data moved or copied in): moved
//! from staging or the pool with `UFFDIO_MOVE`, or copied in from driver
//! memory — through kept staging batches and whole huge pages where it can,
//! shared with the copy helper when big.

use std::sync::Arc;

use rustix::io::Errno;
use uhmm_sys::PAGE_SIZE;
use uhmm_sys::mman::Mapping;
use uhmm_sys::pagemap::{Query, category};

use crate::copier::{
    CopyQueue, CopyRun, FAULT_PIECE_PAGES, Kept, PIECE_PAGES, SPLIT_MIN_PAGES, Via, copy_in, moved_anyway,
};
use crate::migrate::finalize::InstallFrom;
use crate::migrate::{Few, Inner, Runs};
use crate::staging::Slots;
use crate::stats::Stats;
use crate::{Error, ErrorKind, Result};

/// Tries to map a run of pages back from staging before giving up on its
/// rest (which is then poisoned: its data is in a slot about to be emptied).
/// Each failure here is transient (`EAGAIN`, a page held for a moment); a
/// hundred, with the backoff below, is about a second.
const INSTALL_ATTEMPTS: u32 = 100;

/// The first wait between those tries; it doubles, up to about 10 ms.
const INSTALL_BACKOFF: std::time::Duration = std::time::Duration::from_micros(10);

impl Inner {
    /// Starts mapping pages back into their regions, each from where its
    /// data is (`installs`, in page order): moves, and huge pages with no
    /// kept batch to come through, done here; copies in from driver memory
    /// (whole huge blocks among them) returned as runs, `(first page,
    /// pages)` — pieces of a queue shared with the helper when they are
    /// big — for `finish_end`. The pages it could not map back are collected in the
    /// first part: the caller keeps a page whose data is still in the
    /// driver's memory where it was, and poisons the others (their data is
    /// in a slot about to be emptied: they read as SIGBUS, never as silent
    /// zeros).
    pub(super) fn install_begin(
        &self,
        installs: &[(usize, InstallFrom)],
    ) -> (Vec<usize>, Runs, Option<Arc<CopyQueue>>) {
        let mut failed = Vec::new();
        let mut copies = Runs::new();
        let mut blocks: Few<usize> = Few::new();
        let readable = |i: usize| self.copy_src(i).0.always_readable();
        let mut k = 0;
        while k < installs.len() {
            let (i, from) = installs[k];
            let n = self.install_run(&installs[k..]);
            k += n;
            if from == InstallFrom::Zero {
                self.settle(&mut failed, i, n, self.install_zero(i, n));
                continue;
            }
            if from != InstallFrom::Driver {
                self.settle(&mut failed, i, n, self.install_moved(i, n, from));
                continue;
            }
            if !self.region_of(i).huge {
                copies.push((i, n));
                continue;
            }
            // A whole aligned block of a huge-page region comes back as one
            // huge page: see `blocks` below.
            let mut at = i;
            while at < i + n {
                let idx = self.pages[at].idx;
                let piece = (crate::BATCH_PAGES - idx % crate::BATCH_PAGES).min(i + n - at);
                if piece == crate::BATCH_PAGES && readable(at) {
                    blocks.push(at);
                } else {
                    copies.push((at, piece));
                }
                at += piece;
            }
        }
        // A small copy (a fault's window) is not worth the helper's wake-up:
        // this thread does it in `finish_end`, through a partly filled kept
        // batch whose pages are enough (one a small migration to a device
        // left), or else with `UFFDIO_COPY`; but from half a batch (a scan's
        // window that left its marker behind) it goes through whole kept
        // batches as a big copy does, below.
        let total = copies.iter().map(|c| c.1).sum::<usize>();
        let small = blocks.is_empty() && total < SPLIT_MIN_PAGES;
        let filled = (small && total >= PIECE_PAGES && copies.iter().all(|c| readable(c.0)))
            .then(|| self.space.stage.take_filled(total))
            .flatten();
        if small && (filled.is_some() || total < SPLIT_MIN_PAGES / 2) {
            let Some(slots) = filled else {
                return (failed, copies, None);
            };
            let mut runs = Vec::with_capacity(copies.len());
            let mut used = 0;
            for &(i, n) in &copies {
                runs.push(CopyRun { via: Some(self.via(i, slots.offset(used))), ..self.copy_run(i, n) });
                used += n;
            }
            Stats::add(&self.space.stats.kept_copied_pages, total as u64);
            return (failed, copies, Some(Arc::new(CopyQueue::new(runs, Some(self.kept(slots)), false))));
        }
        // Kept staging batches (see `staging`), filled in turn while they
        // last by the runs whose source a CPU copy cannot fault on, a piece
        // ending where a batch does (kept batches need not be adjacent);
        // then pieces for `UFFDIO_COPY`. Whole blocks of huge-page regions
        // come first, a batch each: a kept batch is a huge page when one
        // moved out of such a block, and moves in whole. The blocks left
        // over get a huge pool page each, filled and moved in here.
        let readable_pages = copies.iter().filter(|c| readable(c.0)).map(|c| c.1).sum::<usize>();
        let batches = blocks.len() + readable_pages.div_ceil(crate::BATCH_PAGES);
        let kept = self.space.stage.take_kept(batches);
        let nkept = kept.as_ref().map_or(0, |s| s.len() / crate::BATCH_PAGES);
        for &at in blocks.iter().skip(nkept) {
            let done = self.install_huge_copied(at);
            if done < crate::BATCH_PAGES {
                copies.push((at + done, crate::BATCH_PAGES - done));
            }
        }
        blocks.truncate(nkept);
        let (mut pieces, mut runs): (Runs, Vec<CopyRun>) = (Runs::new(), Vec::new());
        // A fault's window is shared with the helper in smaller pieces: the
        // handler has no other CPU working for it (a bulk migration's
        // chunks keep both busy), and the faulting thread waits.
        let fault = self.serving.is_some();
        let kept_piece = if fault { FAULT_PIECE_PAGES } else { crate::BATCH_PAGES };
        // The next kept slot to fill.
        let mut slot = 0;
        let block_slots = blocks.len() * crate::BATCH_PAGES;
        for (i, n) in blocks.into_iter().map(|at| (at, crate::BATCH_PAGES)).chain(copies) {
            let mut k = 0;
            while k < n {
                let slots = kept.as_ref().filter(|_| slot < nkept * crate::BATCH_PAGES && readable(i));
                let len = match slots {
                    Some(_) if slot < block_slots => crate::BATCH_PAGES,
                    Some(_) => (crate::BATCH_PAGES - slot % crate::BATCH_PAGES).min(kept_piece),
                    None => PIECE_PAGES,
                }
                .min(n - k);
                let mut run = self.copy_run(i + k, len);
                if let Some(slots) = slots {
                    run.via = Some(self.via(i + k, slots.offset(slot)));
                    slot += len;
                    Stats::add(&self.space.stats.kept_copied_pages, len as u64);
                }
                pieces.push((i + k, len));
                runs.push(run);
                k += len;
            }
        }
        let kept = kept.map(|slots| self.kept(slots));
        // One piece is the caller's: waking the helper for nothing costs
        // more than its share is worth (2 MiB back to RAM: 410–510 → 350–385
        // ns a page); so is a small copy, but for a fault's. A copy big
        // enough to share is still copied alone while sharing is paused
        // after the helper stalled (its CPU stopped by the host).
        let big = runs.len() > 1 && (!small || fault);
        let queue = Arc::new(CopyQueue::new(runs, kept, big));
        if big && self.space.copier.helpful() {
            self.space.copier.share(&queue);
        }
        (failed, pieces, Some(queue))
    }

    /// Records pages `i + done..i + n` as not mapped back.
    pub(super) fn settle(&self, failed: &mut Vec<usize>, i: usize, n: usize, done: usize) {
        if done < n {
            let region = self.region_of(i);
            tracing::error!(addr = region.addr_of(self.pages[i].idx + done), "could not map pages back");
            failed.extend(i + done..i + n);
        }
    }

    /// The driver memory and offset holding page `i`'s data.
    pub(super) fn copy_src(&self, i: usize) -> (&Mapping, usize) {
        let (map, off) = self.copy_srcs[self.pages[i].copy_from.expect("a copy source") as usize];
        (&self.copy_maps[map], off)
    }

    /// Kept `slots` for a copy queue of this migration's copies.
    pub(super) fn kept(&self, slots: Slots) -> Kept {
        Kept { slots, srcs: self.copy_maps.to_vec(), pagemap: self.space.pagemap_file.clone() }
    }

    /// The copy of page `i` (and those after it) through kept slot `slot`.
    pub(super) fn via(&self, i: usize, slot: usize) -> Via {
        let (src, src_off) = self.copy_srcs[self.pages[i].copy_from.expect("a copy source") as usize];
        Via { src, src_off, slot }
    }

    /// The copy that maps pages `i..i + n` from driver memory (contiguous
    /// there).
    pub(super) fn copy_run(&self, i: usize, n: usize) -> CopyRun {
        let (src, off) = self.copy_src(i);
        CopyRun {
            dst: self.region_of(i).addr_of(self.pages[i].idx),
            src: src.addr() + off,
            len: n * PAGE_SIZE,
            via: None,
        }
    }

    /// How many of `installs`, from the first, one ioctl can map: pages
    /// consecutive in one region and one protection run (one VMA), whose
    /// data is contiguous too.
    pub(super) fn install_run(&self, installs: &[(usize, InstallFrom)]) -> usize {
        let (i, from) = installs[0];
        let slots = match from {
            InstallFrom::Pool => self.pool.as_ref(),
            InstallFrom::Stage => self.stage.as_ref(),
            InstallFrom::Driver | InstallFrom::Zero => None,
        };
        let max = slots.map_or(usize::MAX, |s| s.contiguous(i, usize::MAX));
        let follows = |a: usize, b: usize| match (self.pages[a].copy_from, self.pages[b].copy_from) {
            (Some(x), Some(y)) => {
                let ((ma, oa), (mb, ob)) = (self.copy_srcs[x as usize], self.copy_srcs[y as usize]);
                ma == mb && ob == oa + PAGE_SIZE
            }
            _ => false,
        };
        let mut n = 1;
        while n < installs.len()
            && n < max
            && installs[n] == (i + n, from)
            && self.pages[i + n].region == self.pages[i].region
            && self.pages[i + n].idx == self.pages[i].idx + n
            && (from != InstallFrom::Driver || follows(i + n - 1, i + n))
        {
            n += 1;
        }
        let idx = self.pages[i].idx;
        match self.region_of(i).prot_runs(idx..idx + n).first() {
            Some((r, _)) => r.len(),
            None => n,
        }
    }

    /// Maps the zero page at pages `i..i + n` (`UFFDIO_ZEROPAGE`, waking no
    /// one: finalize wakes after unlocking). Returns how many (from `i`) it
    /// mapped; a page already present counts (nothing else fills a locked
    /// entry: an earlier try's).
    pub(super) fn install_zero(&self, i: usize, n: usize) -> usize {
        let dst = self.region_of(i).addr_of(self.pages[i].idx);
        let len = n * PAGE_SIZE;
        let mut done = 0;
        for attempt in 0..INSTALL_ATTEMPTS {
            match self.space.uffd.zeropage(dst + done, len - done, true) {
                Ok(_) => return n,
                Err(e) if e.errno == Errno::EXIST => done += e.done + PAGE_SIZE,
                Err(e) if e.errno == Errno::AGAIN => done += e.done,
                Err(e) => {
                    tracing::error!(errno = %e.errno, "UFFDIO_ZEROPAGE failed");
                    return (done + e.done) / PAGE_SIZE;
                }
            }
            if done >= len {
                return n;
            }
            if attempt > 0 {
                std::thread::sleep(INSTALL_BACKOFF * (1 << attempt.min(10)));
            }
        }
        done / PAGE_SIZE
    }

    /// Maps pages `i..i + n` from staging or the pool slots that hold them:
    /// moves when it can, copies where the region is read-only. Returns how
    /// many (from `i`) it mapped.
    pub(super) fn install_moved(&self, i: usize, n: usize, from: InstallFrom) -> usize {
        let Some(slots) = (if from == InstallFrom::Pool { self.pool.as_ref() } else { self.stage.as_ref() }) else {
            tracing::error!("install without staging slots");
            return 0;
        };
        let dst = self.region_of(i).addr_of(self.pages[i].idx);
        let len = n * PAGE_SIZE;
        let mut done = 0;
        for attempt in 0..INSTALL_ATTEMPTS {
            let (at, off, rest) = (dst + done, slots.offset(i) + done, len - done);
            let e = match self.space.uffd.move_pages(at, slots.mapping(), off, rest, true, true) {
                Ok(_) => return n,
                Err(e) => e,
            };
            done += e.done;
            if e.errno == Errno::INVAL || e.errno == Errno::BUSY {
                // Read-only region (or an unmovable page): copy instead.
                match self.copy_present(slots.addr(i) + done, dst + done, len - done) {
                    Ok(()) => return n,
                    Err(err) => tracing::error!(%err, "copying pages back failed; retrying"),
                }
            } else if e.errno == Errno::EXIST {
                // The page is there: the kernel can move pages and still
                // answer EEXIST (see unmap_system_into); nothing else fills
                // a locked entry. The page tables tell how many moved.
                tracing::debug!(addr = dst + done, "EEXIST mapping a page back; the page is in place");
                let anyway = moved_anyway(&self.space.pagemap_file, slots.addr(i) + done, dst + done, len - done);
                done += anyway.max(PAGE_SIZE);
            }
            if done >= len {
                return n;
            }
            std::thread::sleep(INSTALL_BACKOFF * (1 << attempt.min(10)));
        }
        done / PAGE_SIZE
    }

    /// Maps the whole aligned block of a huge-page region starting at page
    /// `i` from driver memory at once: a kept staging batch (a huge page
    /// when a huge page was migrated out of it), or else a huge pool page,
    /// filled and moved in. Returns the pages mapped (all, or none when the
    /// driver memory could fault or no page can be had: the caller copies
    /// them).
    pub(super) fn install_huge_copied(&self, i: usize) -> usize {
        let (mapping, off) = self.copy_src(i);
        if !mapping.always_readable() {
            return 0;
        }
        let slots = match self.space.stage.take_kept(1) {
            Some(kept) => {
                Stats::add(&self.space.stats.kept_copied_pages, crate::BATCH_PAGES as u64);
                kept
            }
            None => {
                // A fresh huge page from the pool, when the kernel has one.
                let Ok(slots) = self.space.huge_pool.alloc(crate::BATCH_PAGES) else {
                    return 0;
                };
                slots.populate(0..crate::BATCH_PAGES);
                slots
            }
        };
        let dst = self.region_of(i).addr_of(self.pages[i].idx);
        if let Err(err) = mapping.copy_to(off, slots.mapping(), slots.offset(0), crate::HUGE_SIZE) {
            tracing::warn!(%err, "filling a huge pool page failed; copying small pages");
            return 0;
        }
        match self.space.uffd.move_pages(dst, slots.mapping(), slots.offset(0), crate::HUGE_SIZE, false, true) {
            Ok(_) => crate::BATCH_PAGES,
            Err(e) => {
                let slot = slots.addr(0) + e.done;
                let anyway = moved_anyway(&self.space.pagemap_file, slot, dst + e.done, crate::HUGE_SIZE - e.done);
                (e.done + anyway) / PAGE_SIZE
            }
        }
    }
}

impl Inner {
    /// `UFFDIO_COPY` of the present pages of `src..src + len` (staging) to
    /// `dst`; staging holes are left as holes (copying from one would fault
    /// on uhmm's own userfaultfd). Each present run goes through
    /// [`copy_in`], which keeps going past a page already there (`EEXIST`:
    /// an earlier attempt's) and after a copy cut short.
    pub(super) fn copy_present(&self, src: usize, dst: usize, len: usize) -> Result<()> {
        for r in self.space.scan(src, src + len, Query::any_of(category::PRESENT | category::SWAPPED))? {
            let run = CopyRun { dst: dst + (r.start - src), src: r.start, len: r.end - r.start, via: None };
            if copy_in(&self.space.uffd, run) < run.len {
                return Err(Error::new(ErrorKind::Busy, "UFFDIO_COPY of staged pages cut short"));
            }
        }
        Ok(())
    }
}
