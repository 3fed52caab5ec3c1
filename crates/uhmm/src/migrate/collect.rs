//! Step 1, `migrate_vma_setup`: collect the pages of a range, lock them
//! best-effort (`folio_trylock`: a page locked elsewhere is skipped as
//! busy, never waited for), and unmap the RAM ones into staging so every
//! CPU access waits (`migrate_vma_collect` and `migrate_vma_unmap`).

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

use rustix::io::Errno;
use smallvec::smallvec;
use uhmm_sys::PAGE_SIZE;
use uhmm_sys::pagemap::{Query, category};

use crate::fork::gate::InFlight;
use crate::migrate::{Collected, Inner, Migration, Select, Skip, Src, first_index, runs};
use crate::mm::AddressSpace;
use crate::notifier::InvalidateEvent;
use crate::page::{DevicePage, Owner};
use crate::pte::State;
use crate::staging::Slots;
use crate::stats::Stats;
use crate::vma::{Backing, Prot, Vma};
use crate::{Error, ErrorKind, Result};

impl Migration<Collected> {
    /// Step 1 (`migrate_vma_setup`): collect, lock and unmap the pages of
    /// `range` selected by `select` and `owner`.
    ///
    /// `range` is rounded down to pages at both ends. It must be non-empty
    /// and inside one region; otherwise [`ErrorKind::InvalidArgument`] and
    /// nothing changes. Each call starts from fresh state, so a loop can
    /// reuse the same code path chunk after chunk.
    pub fn setup(space: &AddressSpace, range: Range<usize>, select: Select, owner: Owner) -> Result<Self> {
        Self::collect(space, range, select, owner, None)
    }

    /// [`setup`](Migration::setup) of only the pages of `range` whose entry
    /// of `listed` (one per page) is true: the others are neither locked
    /// nor moved, and count as [`Skip::NotSelected`]. The list form of
    /// migration (`migrate_pages`) collects its batches this way.
    pub(crate) fn setup_listed(
        space: &AddressSpace,
        range: Range<usize>,
        listed: &[bool],
        select: Select,
        owner: Owner,
    ) -> Result<Self> {
        Self::collect(space, range, select, owner, Some(listed))
    }

    fn collect(
        space: &AddressSpace,
        range: Range<usize>,
        select: Select,
        owner: Owner,
        listed: Option<&[bool]>,
    ) -> Result<Self> {
        let start = range.start & !(PAGE_SIZE - 1);
        let end = range.end & !(PAGE_SIZE - 1);
        let serving = space.serving.clone();
        let space = &space.inner;
        space.check_usable()?;
        let (region, pages) = space.region_pages(start..end.max(start))?;
        let (first, n) = (pages.start, pages.len());
        let mut m = Inner::new(space.clone(), serving, smallvec![region.clone()], n, InFlight::enter());
        for (i, p) in m.pages.iter_mut().enumerate() {
            p.idx = first + i;
        }
        if region.backing != Backing::Anonymous {
            // Only private anonymous memory migrates (migrate_vma_collect
            // skips other mappings): nothing is collected.
            return Ok(Migration { inner: m, _step: PhantomData });
        }
        let owner_ok = |p: &DevicePage| space.pagemap(p.pagemap).is_some_and(|pm| pm.owner() == owner);
        let coherent = |p: &DevicePage| space.is_coherent(p);

        // Collect and lock.
        let mut cpu = Vec::new();
        let mut mapped_device = Vec::new();
        for (prange, prot) in region.prot_runs(first..first + n) {
            for idx in prange {
                let i = idx - first;
                if listed.is_some_and(|l| !l.get(i).copied().unwrap_or(false)) {
                    continue;
                }
                let Some(prior) = trylock_page(&region, idx) else {
                    Stats::add(&space.stats.busy_pages, 1);
                    m.pages[i].skip = Skip::Busy;
                    continue;
                };
                m.pages[i].prior = prior;
                m.pages[i].src = match prior {
                    // RAM page or hole: decided once it is unmapped, below.
                    State::Cpu if prot != Prot::NONE => {
                        cpu.push(i);
                        Src::Hole
                    }
                    // Coherent device pages are mapped: they are unmapped below, like RAM.
                    State::Device(p) if coherent(&p) && select.contains(Select::DEVICE_COHERENT) && owner_ok(&p) => {
                        mapped_device.push(i);
                        Src::Device(p)
                    }
                    State::Device(p) if !coherent(&p) && select.contains(Select::DEVICE_PRIVATE) && owner_ok(&p) => {
                        Src::Device(p)
                    }
                    _ => {
                        m.unlock_skip(i, Skip::NotSelected);
                        Src::Skip
                    }
                };
            }
        }
        if region.is_dead() || region.has_unmapped(&(first..first + n)) {
            return Err(Error::new(ErrorKind::NotFound, "the region is being unmapped"));
        }
        // Mirrors drop their entries before any page changes.
        let _inv = m
            .pages
            .iter()
            .any(|p| p.src != Src::Skip)
            .then(|| space.notifiers.invalidate(start..end, InvalidateEvent::Migrate { owner }));
        if !select.contains(Select::SYSTEM) {
            m.keep_holes_only(&region, first, &cpu)?;
            cpu.clear();
        }
        cpu.extend(mapped_device);
        cpu.sort_unstable();
        if !cpu.is_empty() {
            m.unmap_system(&region, first, &cpu)?;
        }
        m.cpages = m.pages.iter().filter(|p| p.src != Src::Skip).count();
        Stats::add(&space.stats.collected_pages, m.cpages as u64);
        Ok(Migration { inner: m, _step: PhantomData })
    }
}

/// Locks page `idx` of `region` for a migration, best effort (the kernel's
/// `folio_trylock` in `migrate_vma_collect_pmd`): a page another migration
/// or a device access holds is skipped as busy, never waited for. But not
/// at the first contention: the fault engine holds a first-touch window for
/// a few microseconds (also for stale, duplicate faults), which should not
/// make a page busy; such a lock is waited out, up to [`FILL_WAIT`].
/// Returns the page's state, or `None` (busy).
fn trylock_page(region: &Vma, idx: usize) -> Option<State> {
    if let Some(prior) = region.pt.try_lock(idx) {
        return Some(prior);
    }
    for _ in 0..TRYLOCK_YIELDS {
        std::thread::yield_now();
        if let Some(prior) = region.pt.try_lock(idx) {
            return Some(prior);
        }
    }
    let deadline = std::time::Instant::now() + FILL_WAIT;
    while region.pt.filling(idx) && std::time::Instant::now() <= deadline {
        std::thread::yield_now();
        if let Some(prior) = region.pt.try_lock(idx) {
            return Some(prior);
        }
    }
    region.pt.try_lock(idx)
}

/// Yields to the lock's holder before looking whether it is a fill: most
/// holders let go within a time slice.
const TRYLOCK_YIELDS: usize = 3;

/// The longest a migration waits for a first-touch fill's lock: a fill
/// takes microseconds; a holder that is stopped (its vCPU taken by the
/// host) is not worth more.
const FILL_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Times a page the kernel refuses to move (`EBUSY`) is tried again before
/// it is skipped as pinned: the kernel holds a reference for a moment
/// (compaction, an LRU batch), a pin holds it for good.
const EBUSY_TRIES: u32 = 3;

/// The first wait before trying an `EBUSY` page again; it doubles each try
/// (40, 80, 160 µs).
const EBUSY_BACKOFF: std::time::Duration = std::time::Duration::from_micros(20);

impl Inner {
    /// Unmaps the locked CPU pages `cpu` (indices into the migration, whose
    /// region pages are `first + i`) into staging, then classifies each as a
    /// RAM page or a hole.
    pub(super) fn unmap_system(&mut self, region: &Arc<Vma>, first: usize, cpu: &[usize]) -> Result<()> {
        let stage = self.space.stage.alloc(self.pages.len())?;
        let r = self.unmap_system_into(&stage, region, first, cpu);
        if r.is_err() {
            // Some pages may already sit in staging: restore every candidate
            // from there (restoring moves skip staging holes).
            for &i in cpu {
                if self.pages[i].src != Src::Skip {
                    self.pages[i].src = Src::System;
                }
            }
        }
        self.stage = Some(stage);
        r
    }

    /// Moves the locked CPU pages `cpu` into `stage`, a run per protection
    /// run (one ioctl never crosses a VMA boundary), then tells holes from
    /// pages with data (`classify_staged`).
    pub(super) fn unmap_system_into(
        &mut self,
        stage: &Slots,
        region: &Arc<Vma>,
        first: usize,
        cpu: &[usize],
    ) -> Result<()> {
        let prot_split = runs(cpu).into_iter().flat_map(|run| {
            region
                .prot_runs(first + run.start..first + run.end)
                .into_iter()
                .map(move |(r, p)| (r.start - first..r.end - first, p))
        });
        for (run, prot) in prot_split.collect::<Vec<_>>() {
            if prot.contains(Prot::WRITE) {
                self.move_run_to_stage(stage, region, first, run)?;
            } else {
                self.copy_run_to_stage(stage, region, first, run)?;
            }
        }
        self.classify_staged(stage)
    }

    /// Moves pages `run` (migration indices) of a writable run into their
    /// stage slots with `UFFDIO_MOVE` (the kernel's `migrate_vma_unmap`,
    /// with a migration entry left behind: the region's entry is empty). A
    /// page the kernel refuses (`EBUSY`: `migrate_vma_check_page`'s extra
    /// reference) is tried [`EBUSY_TRIES`] times, then skipped as pinned.
    fn move_run_to_stage(&mut self, stage: &Slots, region: &Vma, first: usize, run: Range<usize>) -> Result<()> {
        let space = self.space.clone();
        let mut i = run.start;
        // EBUSY can be transient (the kernel holds a reference for a
        // moment: compaction, an LRU batch): try a page a few times
        // before skipping it, which is what a pin gets.
        let mut busy_tries: u32 = 0;
        while i < run.end {
            let len = stage.contiguous(i, run.end - i);
            let dst = stage.addr(i);
            let e = match space.uffd.move_pages(dst, &region.map, (first + i) * PAGE_SIZE, len * PAGE_SIZE, true, true)
            {
                Ok(_) => {
                    i += len;
                    continue;
                }
                Err(e) => e,
            };
            let k = i + e.done / PAGE_SIZE;
            if e.errno == Errno::AGAIN {
                Stats::add(&space.stats.eagain, 1);
                i = k;
                std::thread::yield_now();
                continue;
            }
            if e.errno == Errno::BUSY && busy_tries < EBUSY_TRIES {
                busy_tries += 1;
                i = k;
                std::thread::sleep(EBUSY_BACKOFF * (1 << busy_tries));
                continue;
            }
            busy_tries = 0;
            // Whatever the error said, the page table decides whether page
            // k moved: the kernel (6.18) has been seen to answer EEXIST,
            // nothing done, to a one-page move whose page did move (the
            // region's entry empty, the slot full afterwards). Skipping it
            // would leave its data in a slot about to be emptied: the soak's
            // zeroed pages.
            if !space.is_present(region.addr_of(first + k))? {
                // Moved, or a hole: `classify_staged` tells which.
                i = k + 1;
                continue;
            }
            if e.errno != Errno::BUSY {
                tracing::warn!(errno = %e.errno, "UFFDIO_MOVE into staging failed; page skipped");
            }
            Stats::add(&space.stats.busy_pages, 1);
            self.unlock_skip(k, if e.errno == Errno::BUSY { Skip::Pinned } else { Skip::Busy });
            i = k + 1;
        }
        Ok(())
    }

    /// Copies the present pages of a read-only run into their stage slots
    /// and zaps them (`UFFDIO_MOVE` needs writable mappings). Nothing can
    /// write them meanwhile: they are read-only, and the protections are
    /// held still until the zap. (A kernel pin on such a page is not seen
    /// on this path: copy and zap ignore it.)
    fn copy_run_to_stage(&mut self, stage: &Slots, region: &Vma, first: usize, run: Range<usize>) -> Result<()> {
        let space = self.space.clone();
        let frozen = region.prot_frozen();
        if run.clone().any(|i| frozen.prot_at(first + i).contains(Prot::WRITE)) {
            // Made writable since the runs were read (any page of it: a
            // write between the copy and the zap below would be lost):
            // skip, busy.
            drop(frozen);
            for i in run {
                self.unlock_skip(i, Skip::Busy);
            }
            return Ok(());
        }
        let (a, b) = (region.addr_of(first + run.start), region.addr_of(first + run.end));
        for r in space.scan(a, b, Query::any_of(category::PRESENT | category::SWAPPED))? {
            let mut addr = r.start;
            while addr < r.end {
                let i = first_index(region, first, addr);
                let len = stage.contiguous(i, (r.end - addr) / PAGE_SIZE);
                if let Err(e) = space.uffd.copy(stage.addr(i), addr as *const u8, len * PAGE_SIZE, true) {
                    return Err(Error::sys("UFFDIO_COPY into staging", std::io::Error::from(e.errno)));
                }
                addr += len * PAGE_SIZE;
            }
        }
        region
            .map
            .discard((first + run.start) * PAGE_SIZE, run.len() * PAGE_SIZE)
            .map_err(|e| Error::sys("MADV_DONTNEED", e))?;
        drop(frozen);
        Ok(())
    }

    /// Which staged slots hold data (`MigrateSrc::System`)? The rest were
    /// holes, or the zero page (`migrate_vma_collect_hole`): told apart
    /// after the move, with `PAGEMAP_SCAN` of the slots.
    fn classify_staged(&mut self, stage: &Slots) -> Result<()> {
        let mut present = Vec::new();
        let q = Query::all(category::PRESENT | category::SWAPPED | category::PFNZERO);
        let mut i = 0;
        while i < self.pages.len() {
            let len = stage.contiguous(i, self.pages.len() - i);
            present.clear();
            let a = stage.addr(i);
            self.space
                .pagemap_file
                .scan(a, a + len * PAGE_SIZE, q, &mut present)
                .map_err(|e| Error::sys("PAGEMAP_SCAN", e))?;
            for r in &present {
                let data = r.categories & (category::PRESENT | category::SWAPPED) != 0
                    && r.categories & category::PFNZERO == 0;
                if data {
                    for j in (r.start - a) / PAGE_SIZE..(r.end - a) / PAGE_SIZE {
                        if self.pages[i + j].src != Src::Skip && self.pages[i + j].prior == State::Cpu {
                            self.pages[i + j].src = Src::System;
                        }
                    }
                }
            }
            i += len;
        }
        Ok(())
    }

    /// Without `Select::SYSTEM`: RAM and zero pages are not candidates, holes are.
    pub(super) fn keep_holes_only(&mut self, region: &Arc<Vma>, first: usize, cpu: &[usize]) -> Result<()> {
        let (Some(&lo), Some(&hi)) = (cpu.first(), cpu.last()) else {
            return Ok(());
        };
        let (a, b) = (region.addr_of(first + lo), region.addr_of(first + hi + 1));
        for r in self.space.scan(a, b, Query::any_of(category::PRESENT | category::SWAPPED))? {
            for addr in (r.start..r.end).step_by(PAGE_SIZE) {
                let i = first_index(region, first, addr);
                if self.pages[i].src != Src::Skip {
                    self.unlock_skip(i, Skip::NotSelected);
                }
            }
        }
        Ok(())
    }
}
