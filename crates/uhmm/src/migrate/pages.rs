//! The driver's part and step 2: destinations for the collected pages
//! (the kernel's `dst[]`: a device page, a RAM page the driver filled, a
//! copy from its memory, or an error) and `migrate_vma_pages`, which
//! commits the pages that have one.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

use uhmm_sys::PAGE_SIZE;
use uhmm_sys::mman::Mapping;

use crate::migrate::{Collected, MigrateDst, Migrated, Migration, Src, runs};
use crate::page::DevicePage;
use crate::staging::SystemPage;
use crate::{Error, Result};

impl Migration<Collected> {
    /// A RAM page to fill with the data of page `i` when migrating it to RAM
    /// (the kernel's freshly allocated system page). Pair it with
    /// [`Migration::set_dst_system`].
    pub fn system_dst(&mut self, i: usize) -> Result<SystemPage> {
        self.inner.check_collected(i)?;
        // The page the driver fills is this one now, not a scratch page.
        self.inner.pages[i].lent = true;
        self.inner.pages[i].scratch_at = None;
        let pool = self.pool()?;
        Ok(SystemPage::new(pool.arena(), pool.offset(i)))
    }

    /// The RAM pages for runs of this migration's device-private pages
    /// coming back, borrowed to be filled in place: one slice per run, its
    /// pages in order. For a CPU fault's window (up to 512 pages, but not
    /// a whole block of a huge-page region) they are the fault handler's
    /// scratch pages, which `finalize` copies in (`UFFDIO_COPY`), sparing
    /// pool pages their populate and their move out, and the TLB flush on
    /// other CPUs that costs; otherwise pool pages moved in. A driver
    /// decompresses or copies straight into them
    /// (from several threads if it likes: the slices are disjoint), then
    /// sets each page with [`Migration::set_dst_system`].
    ///
    /// Each run is a range of page indices; the runs may not overlap, and
    /// each page must be a collected device-private page whose RAM page was
    /// not lent by [`Migration::system_dst`]. A run whose RAM pages are not
    /// contiguous (it crosses pieces of the pool; runs of up to 512 pages
    /// that start at a multiple of 512 never do) is refused: split it.
    /// Anything refused is [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument),
    /// and nothing changes.
    pub fn system_dst_bytes(&mut self, runs: &[Range<usize>]) -> Result<Vec<&mut [u8]>> {
        let mut sorted: Vec<Range<usize>> = runs.to_vec();
        sorted.sort_unstable_by_key(|r| r.start);
        if sorted.windows(2).any(|w| w[0].end > w[1].start) {
            return Err(Error::invalid("runs overlap"));
        }
        for r in &sorted {
            for i in r.clone() {
                self.inner.check_collected(i)?;
                let p = &self.inner.pages[i];
                let private = matches!(p.src, Src::Device(d) if !self.inner.space.is_coherent(&d));
                if !private || p.lent {
                    return Err(Error::invalid("only device-private pages not lent by system_dst are filled in place"));
                }
            }
        }
        let total: usize = runs.iter().map(|r| r.len()).sum();
        if total <= crate::fault::serving::SCRATCH_PAGES
            && !self.inner.scratch
            && !self.whole_huge_block()
            && let Some(map) = self.inner.serving.as_ref().and_then(|s| s.take_scratch())
        {
            // A fault's pages: the handler's scratch, copied in at finalize.
            self.inner.scratch = true;
            let mut at = 0;
            for r in runs {
                for i in r.clone() {
                    let k = u32::try_from(self.inner.copy_srcs.len()).map_err(|_| Error::invalid("too many pages"))?;
                    if !self.inner.copy_maps.last().is_some_and(|m| Arc::ptr_eq(m, &map)) {
                        self.inner.copy_maps.push(map.clone());
                    }
                    self.inner.copy_srcs.push((self.inner.copy_maps.len() - 1, at));
                    self.inner.pages[i].scratch_at = Some(k);
                    at += PAGE_SIZE;
                }
            }
            let map = self.inner.copy_maps.last().expect("just pushed");
            let mut out = Vec::with_capacity(runs.len());
            let mut at = 0;
            for r in runs {
                let len = r.len() * PAGE_SIZE;
                #[allow(unsafe_code)]
                // SAFETY: the scratch pages are this migration's alone until
                // `finish_end` gives them back (`take_scratch` hands them to
                // one migration at a time); the core reads them only in
                // `finalize` (its copies in), which needs the migration the
                // slices borrow mutably. The runs' pieces are disjoint and
                // inside the mapping (at most `SCRATCH_PAGES` pages in all),
                // private anonymous memory that no userfaultfd watches.
                let bytes = unsafe { map.slice_mut(at, len) }.map_err(|e| Error::sys("scratch pages", e))?;
                out.push(bytes);
                at += len;
            }
            return Ok(out);
        }
        let pool = self.pool()?;
        if runs.iter().any(|r| !r.is_empty() && pool.contiguous(r.start, r.len()) < r.len()) {
            return Err(Error::invalid("a run's RAM pages are not contiguous: split it"));
        }
        let map = pool.mapping();
        let mut out = Vec::with_capacity(runs.len());
        for r in runs {
            #[allow(unsafe_code)]
            // SAFETY: the slots of a migration's pool are this migration's
            // alone until `finalize` maps them (they are reachable from no
            // region, and the core touches them only in `finalize`, which
            // needs the migration the returned slices borrow mutably). Of
            // them, these pages were never lent as a `SystemPage` (checked
            // above, and `system_dst` needs `&mut self` too), so nothing
            // else reads or writes them while the slices live; the runs
            // are disjoint, so the slices are; each run is contiguous and
            // inside the pool's mapping (checked), and its pages were
            // populated by `pool()` (device-private sources), so a write
            // never faults on uhmm's own userfaultfd.
            let bytes = unsafe { map.slice_mut(pool.offset(r.start), r.len() * PAGE_SIZE) }
                .map_err(|e| Error::sys("pool pages", e))?;
            out.push(bytes);
        }
        Ok(out)
    }

    /// The migration's pool of RAM pages for pages coming back, allocated
    /// on first use.
    fn pool(&mut self) -> Result<&crate::staging::Slots> {
        if self.inner.pool.is_none() {
            // A whole aligned 2 MiB block coming back gets a huge page.
            let inner = &self.inner;
            let arena = if self.whole_huge_block() { &inner.space.huge_pool } else { &inner.space.pool };
            let pool = arena.alloc(inner.pages.len())?;
            // Pages coming back from a device will need RAM: allocate it in bulk.
            let device: Vec<usize> =
                (0..self.inner.pages.len()).filter(|&k| matches!(self.inner.pages[k].src, Src::Device(_))).collect();
            for run in runs(&device) {
                pool.populate(run);
            }
            self.inner.pool = Some(pool);
        }
        Ok(self.inner.pool.as_ref().expect("pool just allocated"))
    }

    /// Whether the migration's pages are a whole aligned 2 MiB block of a
    /// huge-page region, all on devices: it comes back as one huge page.
    fn whole_huge_block(&self) -> bool {
        let inner = &self.inner;
        inner.pages.len() == crate::BATCH_PAGES
            && inner.regions.len() == 1
            && inner.regions[0].huge
            && inner.pages[0].idx.is_multiple_of(crate::BATCH_PAGES)
            && inner
                .pages
                .iter()
                .enumerate()
                .all(|(k, p)| p.idx == inner.pages[0].idx + k && matches!(p.src, Src::Device(_)))
    }

    /// Page `i` moves to device page `page`, which the driver has filled.
    pub fn set_dst_device(&mut self, i: usize, page: DevicePage) -> Result<()> {
        self.inner.check_collected(i)?;
        let pm = self
            .inner
            .pagemap(page.pagemap)
            .ok_or_else(|| Error::invalid("destination device page of an unknown pagemap"))?;
        if pm.page(page.pfn).is_none() {
            return Err(Error::invalid("device page out of its pagemap"));
        }
        if pm.is_coherent() && self.inner.pool.is_none() {
            return Err(Error::invalid("a device-coherent destination is the page from system_dst: fill it first"));
        }
        if self.inner.pages[i].dst == MigrateDst::Device(page) {
            return Ok(());
        }
        if !pm.reserve(page.pfn) {
            return Err(Error::invalid("device page already mapped or claimed elsewhere"));
        }
        self.inner.release_dst(i);
        self.inner.pages[i].dst = MigrateDst::Device(page);
        Ok(())
    }

    /// Page `i` moves to RAM: the page from [`Migration::system_dst`], which
    /// the driver has filled.
    pub fn set_dst_system(&mut self, i: usize) -> Result<()> {
        self.inner.check_collected(i)?;
        let scratch = self.inner.pages[i].scratch_at;
        if self.inner.pool.is_none() && scratch.is_none() {
            return Err(Error::invalid("set_dst_system before system_dst"));
        }
        self.inner.release_dst(i);
        self.inner.pages[i].dst = MigrateDst::System;
        // Filled in a fault's scratch: copied in from there.
        self.inner.pages[i].copy_from = scratch;
        Ok(())
    }

    /// Page `i` moves to RAM with the data the CPU reads from `src` at
    /// `offset` (one page): memory of a driver whose device memory the CPU
    /// can read, or a buffer it filled. `finalize` copies it straight into a
    /// fresh page of the region (`UFFDIO_COPY`: the kernel allocates the
    /// page and copies in one step, with no zeroed pool page, no move and no
    /// TLB flush). The page at `src` must hold the data, unchanged, until
    /// `finalize` returns; the migration keeps `src` alive until then.
    ///
    /// If the copy cannot be made at `finalize` (the kernel out of memory,
    /// `src` unreadable), the page stays where it was — on the device, its
    /// source not freed — and `finalize` does not count it as migrated.
    ///
    /// For device-private pages and holes only. `offset` must be
    /// page-aligned and the page inside `src`; otherwise
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) and nothing changes.
    pub fn set_dst_system_from(&mut self, i: usize, src: &Arc<Mapping>, offset: usize) -> Result<()> {
        self.inner.check_collected(i)?;
        match self.inner.pages[i].src {
            Src::Hole => {}
            Src::Device(d) if !self.inner.space.is_coherent(&d) => {}
            // Its data sits in staging (a RAM or coherent page): a failed
            // copy could not leave it where it was.
            _ => return Err(Error::invalid("copy-in is for device-private pages and holes")),
        }
        if !offset.is_multiple_of(PAGE_SIZE) || offset.checked_add(PAGE_SIZE).is_none_or(|end| end > src.len()) {
            return Err(Error::invalid("copy source is not a whole page inside its mapping"));
        }
        let at = u32::try_from(self.inner.copy_srcs.len()).map_err(|_| Error::invalid("too many copy sources"))?;
        self.inner.release_dst(i);
        let inner = &mut self.inner;
        if !inner.copy_maps.last().is_some_and(|m| Arc::ptr_eq(m, src)) {
            inner.copy_maps.push(src.clone());
        }
        inner.copy_srcs.push((inner.copy_maps.len() - 1, offset));
        self.inner.pages[i].dst = MigrateDst::System;
        self.inner.pages[i].copy_from = Some(at);
        Ok(())
    }

    /// Page `i` moves to RAM as a page of zeros, mapped without allocating
    /// RAM (`UFFDIO_ZEROPAGE`: the shared zero page, copied on the first
    /// write): for a driver that knows the page holds only zeros (a
    /// compressed store's same-filled page). For device-private pages and
    /// holes only, otherwise
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument)
    /// and nothing changes. If the zero page cannot be mapped at
    /// `finalize`, the page stays where it was, as with
    /// [`Migration::set_dst_system_from`].
    pub fn set_dst_zero(&mut self, i: usize) -> Result<()> {
        self.inner.check_collected(i)?;
        match self.inner.pages[i].src {
            Src::Hole => {}
            Src::Device(d) if !self.inner.space.is_coherent(&d) => {}
            _ => return Err(Error::invalid("a zero destination is for device-private pages and holes")),
        }
        self.inner.release_dst(i);
        self.inner.pages[i].dst = MigrateDst::Zero;
        Ok(())
    }

    /// Page `i` cannot be brought back: its data is lost and accesses will
    /// get SIGBUS. Only for unrecoverable device state.
    pub fn set_dst_error(&mut self, i: usize) -> Result<()> {
        self.inner.check_collected(i)?;
        self.inner.release_dst(i);
        self.inner.pages[i].dst = MigrateDst::Error;
        Ok(())
    }

    /// Step 2 (`migrate_vma_pages`): commit the pages that have a destination.
    pub fn pages(self) -> Migration<Migrated> {
        let Migration { mut inner, .. } = self;
        for p in &mut inner.pages {
            p.migrated = p.src != Src::Skip && p.dst != MigrateDst::None;
        }
        Migration { inner, _step: PhantomData }
    }
}

impl Migration<Migrated> {
    /// Whether page `i` moves (the kernel's `MIGRATE_PFN_MIGRATE` after
    /// `migrate_vma_pages`).
    pub fn migrated(&self, i: usize) -> bool {
        self.inner.pages.get(i).is_some_and(|p| p.migrated)
    }

    /// How many pages move.
    pub fn migrated_count(&self) -> usize {
        self.inner.pages.iter().filter(|p| p.migrated).count()
    }
}
