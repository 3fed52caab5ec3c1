//! The driver's part and step 2: destinations for the collected pages
//! (the kernel's `dst[]`: a device page, a RAM page the driver filled, a
//! copy from its memory, or an error) and `migrate_vma_pages`, which
//! commits the pages that have one.

use std::marker::PhantomData;
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
        if self.inner.pool.is_none() {
            // A whole aligned 2 MiB block coming back gets a huge page.
            let inner = &self.inner;
            let whole_block = inner.pages.len() == crate::BATCH_PAGES
                && inner.regions.len() == 1
                && inner.regions[0].huge
                && inner.pages[0].idx.is_multiple_of(crate::BATCH_PAGES)
                && inner
                    .pages
                    .iter()
                    .enumerate()
                    .all(|(k, p)| p.idx == inner.pages[0].idx + k && matches!(p.src, Src::Device(_)));
            let arena = if whole_block { &inner.space.huge_pool } else { &inner.space.pool };
            let pool = arena.alloc(inner.pages.len())?;
            // Pages coming back from a device will need RAM: allocate it in bulk.
            let device: Vec<usize> =
                (0..self.inner.pages.len()).filter(|&k| matches!(self.inner.pages[k].src, Src::Device(_))).collect();
            for run in runs(&device) {
                pool.populate(run);
            }
            self.inner.pool = Some(pool);
        }
        let pool = self.inner.pool.as_ref().expect("pool just allocated");
        Ok(SystemPage::new(pool.arena(), pool.offset(i)))
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
        if self.inner.pool.is_none() {
            return Err(Error::invalid("set_dst_system before system_dst"));
        }
        self.inner.release_dst(i);
        self.inner.pages[i].dst = MigrateDst::System;
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
