//! `Vma`: the core's view of one region (the kernel's `vm_area_struct`):
//! its mapping, software page table, protections, unmapped holes and
//! fault-around windows. Migrations and the fault engine hold it; the
//! program's handle is [`Region`](crate::Region).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use smallvec::SmallVec;
use uhmm_sys::PAGE_SIZE;
use uhmm_sys::mman::{Mapping, Protection};
use uhmm_sys::uffd::Uffd;

use crate::fault::window::ScanWindow;
use crate::pte::{PageTable, State};
use crate::{Error, Result};

bitflags::bitflags! {
    /// Access rights of (part of) a region.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Prot: u8 {
        /// Reads allowed.
        const READ = 1;
        /// Writes allowed (only together with `READ`).
        const WRITE = 2;
    }
}

impl Prot {
    /// No access.
    pub const NONE: Prot = Prot::empty();
    /// Read and write.
    pub const READ_WRITE: Prot = Prot::READ.union(Prot::WRITE);

    pub(crate) fn protection(self) -> Result<Protection> {
        if self == Prot::NONE {
            Ok(Protection::None)
        } else if self == Prot::READ {
            Ok(Protection::Read)
        } else if self == Prot::READ_WRITE {
            Ok(Protection::ReadWrite)
        } else {
            Err(Error::invalid("write-only protection is not supported"))
        }
    }
}

/// A region's id in its address space: what a device page's reverse map
/// names (never reused; below 2^24). Not an index into any list: a
/// migration's own list of regions is indexed by a plain `u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RegionId(pub(crate) u32);

/// What a region maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory: the pages uhmm manages and migrates.
    Anonymous,
    /// Shared anonymous memory (shmem): devices can read and write it, but
    /// migrations skip it, as the kernel's skip non-anonymous mappings.
    SharedAnonymous,
    /// A file, mapped shared or private: devices can read and write it;
    /// migrations skip it.
    File {
        /// `MAP_SHARED` (writes reach the file) rather than `MAP_PRIVATE`.
        shared: bool,
    },
}

/// The shared state of a region; migrations and the fault engine hold it.
#[derive(Debug)]
pub(crate) struct Vma {
    pub(crate) id: RegionId,
    pub(crate) map: Mapping,
    pub(crate) pt: PageTable,
    pub(crate) backing: Backing,
    /// Backed by huge pages where uhmm can (2 MiB-aligned, 2 MiB multiple).
    pub(crate) huge: bool,
    /// Protection runs: start page → protection up to the next key.
    prot: RwLock<BTreeMap<usize, Prot>>,
    /// Set when the region is being unmapped; a migration that sees it after
    /// locking its pages gives up.
    pub(crate) dead: AtomicBool,
    /// Page ranges unmapped with [`Region::unmap`](crate::Region::unmap) (reserved, inaccessible).
    unmapped: RwLock<Vec<Range<usize>>>,
    /// `unmapped` is not empty (read on every fault without the lock).
    any_unmapped: AtomicBool,
    /// Adaptive fault-around: the windows of the scans faulting on device pages.
    pub(crate) fault_around: ScanWindow,
    /// The same for first-touch zero fills.
    pub(crate) zero_around: ScanWindow,
    /// The space's `to_device_epoch` when pages of the region last moved to
    /// a device.
    pub(crate) to_device_at: std::sync::atomic::AtomicU64,
    /// The userfaultfd to unregister the region's mapping from before it is
    /// unmapped (set when the space watches unmaps: its own final `munmap`
    /// must send no event).
    unregister_on_drop: std::sync::OnceLock<Arc<Uffd>>,
}

impl Vma {
    pub(crate) fn new(id: RegionId, map: Mapping, prot: Prot, backing: Backing, huge: bool) -> Vma {
        let npages = map.len() / PAGE_SIZE;
        Vma {
            id,
            map,
            pt: PageTable::new(npages),
            backing,
            huge,
            prot: RwLock::new(BTreeMap::from([(0, prot)])),
            dead: AtomicBool::new(false),
            unmapped: RwLock::new(Vec::new()),
            any_unmapped: AtomicBool::new(false),
            fault_around: ScanWindow::default(),
            zero_around: ScanWindow::default(),
            to_device_at: std::sync::atomic::AtomicU64::new(0),
            unregister_on_drop: std::sync::OnceLock::new(),
        }
    }

    /// Makes the region unregister its mapping from `uffd` before it is
    /// unmapped (in a space that watches unmaps, its own final `munmap`
    /// must send no event).
    pub(crate) fn unregister_on_drop(&self, uffd: &Arc<Uffd>) {
        let _ = self.unregister_on_drop.set(uffd.clone());
    }

    /// Pages `pages` are no longer the region's (the program unmapped or
    /// moved them): unmapped, no access, for every uhmm call.
    pub(crate) fn forget(&self, pages: Range<usize>) {
        self.mark_unmapped(pages.clone());
        self.update_prot(pages, Prot::NONE);
    }

    /// Records pages `pages` as unmapped (reserved, inaccessible).
    pub(crate) fn mark_unmapped(&self, pages: Range<usize>) {
        self.unmapped.write().unwrap_or_else(|e| e.into_inner()).push(pages);
        self.any_unmapped.store(true, Ordering::Release);
    }

    /// Whether every page of `pages` was unmapped.
    pub(crate) fn all_unmapped(&self, pages: &Range<usize>) -> bool {
        let unmapped = self.unmapped.read().unwrap_or_else(|e| e.into_inner());
        pages.clone().all(|p| unmapped.iter().any(|u| u.contains(&p)))
    }

    /// The unmapped pages around page `idx`, if it is one.
    pub(crate) fn unmapped_run(&self, idx: usize) -> Option<Range<usize>> {
        let unmapped = self.unmapped.read().unwrap_or_else(|e| e.into_inner());
        unmapped.iter().filter(|u| u.contains(&idx)).cloned().reduce(|a, b| a.start.min(b.start)..a.end.max(b.end))
    }

    /// Whether any page of `pages` was unmapped.
    pub(crate) fn has_unmapped(&self, pages: &Range<usize>) -> bool {
        if !self.any_unmapped.load(Ordering::Acquire) {
            return false;
        }
        let unmapped = self.unmapped.read().unwrap_or_else(|e| e.into_inner());
        unmapped.iter().any(|u| u.start < pages.end && pages.start < u.end)
    }

    pub(crate) fn start(&self) -> usize {
        self.map.addr()
    }

    pub(crate) fn npages(&self) -> usize {
        self.map.len() / PAGE_SIZE
    }

    pub(crate) fn addr_of(&self, idx: usize) -> usize {
        self.start() + idx * PAGE_SIZE
    }

    /// The index of the page at `addr`, if the region holds it.
    pub(crate) fn index_of(&self, addr: usize) -> Option<usize> {
        addr.checked_sub(self.start()).map(|o| o / PAGE_SIZE).filter(|&i| i < self.npages())
    }

    pub(crate) fn contains(&self, addr: usize) -> bool {
        addr >= self.start() && addr - self.start() < self.map.len()
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// The protection runs covering pages `pages`, clipped to it (inline,
    /// without allocating, for up to two runs: a fault window is one).
    pub(crate) fn prot_runs(&self, pages: Range<usize>) -> SmallVec<[(Range<usize>, Prot); 2]> {
        let map = self.prot.read().unwrap_or_else(|e| e.into_inner());
        let mut out = SmallVec::new();
        let first = map.range(..=pages.start).next_back().map(|(k, p)| (*k, *p));
        let iter = first.into_iter().chain(map.range(pages.start + 1..pages.end).map(|(k, p)| (*k, *p)));
        let mut prev: Option<(usize, Prot)> = None;
        for (k, p) in iter {
            if let Some((s, pp)) = prev {
                out.push((s.max(pages.start)..k, pp));
            }
            prev = Some((k, p));
        }
        if let Some((s, pp)) = prev {
            out.push((s.max(pages.start)..pages.end, pp));
        }
        out
    }

    /// The protection of page `idx`.
    pub(crate) fn prot_at(&self, idx: usize) -> Prot {
        let map = self.prot.read().unwrap_or_else(|e| e.into_inner());
        map.range(..=idx).next_back().map_or(Prot::NONE, |(_, p)| *p)
    }

    /// Holds the protections still (`protect` waits) until the guard drops.
    pub(crate) fn prot_frozen(&self) -> ProtFrozen<'_> {
        ProtFrozen(self.prot.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Checks an access of `len` bytes at `offset`: inside the region, with
    /// `need` rights, no page poisoned.
    pub(crate) fn check_access(&self, offset: usize, len: usize, need: Prot) -> Result<()> {
        use crate::ErrorKind::{Fault, Permission};
        let end = offset.checked_add(len).ok_or_else(|| Error::invalid("offset overflows"))?;
        if end > self.map.len() {
            return Err(Error::new(Fault, "access outside the region"));
        }
        if len == 0 {
            return Ok(());
        }
        let pages = offset / PAGE_SIZE..end.div_ceil(PAGE_SIZE);
        if self.has_unmapped(&pages) {
            return Err(Error::new(Fault, "part of the range was unmapped"));
        }
        for (_, prot) in self.prot_runs(pages.clone()) {
            if !prot.contains(Prot::READ) {
                return Err(Error::new(Fault, "no access to part of the range"));
            }
            if !prot.contains(need) {
                return Err(Error::new(Permission, "write to a read-only part of the region"));
            }
        }
        if pages.into_iter().any(|p| self.pt.load(p).state() == State::Poisoned) {
            return Err(Error::new(Fault, "a page of the range is poisoned"));
        }
        Ok(())
    }

    /// Changes the protection of pages `pages` (mprotect).
    pub(crate) fn set_prot(&self, pages: Range<usize>, prot: Prot) -> Result<()> {
        let protection = prot.protection()?;
        let map = self.prot.write().unwrap_or_else(|e| e.into_inner());
        self.map
            .protect(pages.start * PAGE_SIZE, pages.len() * PAGE_SIZE, protection)
            .map_err(|e| Error::sys("mprotect", e))?;
        Self::set_runs(map, pages, prot, self.npages());
        Ok(())
    }

    /// Records protection `prot` for pages `pages` without changing the
    /// mapping.
    fn update_prot(&self, pages: Range<usize>, prot: Prot) {
        let map = self.prot.write().unwrap_or_else(|e| e.into_inner());
        Self::set_runs(map, pages, prot, self.npages());
    }

    fn set_runs(
        mut map: std::sync::RwLockWriteGuard<'_, BTreeMap<usize, Prot>>,
        pages: Range<usize>,
        prot: Prot,
        npages: usize,
    ) {
        let after = map.range(..=pages.end).next_back().map(|(_, p)| *p);
        let keys: Vec<usize> = map.range(pages.start..=pages.end).map(|(k, _)| *k).collect();
        for k in keys {
            map.remove(&k);
        }
        map.insert(pages.start, prot);
        if pages.end < npages
            && let Some(a) = after
        {
            map.insert(pages.end, a);
        }
    }
}

impl Vma {
    /// Unmaps what is still the region's now (unregistered first where the
    /// space watches unmaps). Once its pages are locked for good: nothing
    /// of uhmm's touches them after.
    pub(crate) fn unmap(&self) {
        if let Some(uffd) = self.unregister_on_drop.get() {
            for (off, len) in self.map.owned_parts() {
                // Fails harmlessly where the range is not registered (a
                // forked child's copy, a reservation).
                let _ = uffd.unregister(&self.map, off, len);
            }
        }
        self.map.unmap_now();
    }
}

impl Drop for Vma {
    fn drop(&mut self) {
        self.unmap();
    }
}

/// Protections held still; see [`Vma::prot_frozen`].
pub(crate) struct ProtFrozen<'a>(std::sync::RwLockReadGuard<'a, BTreeMap<usize, Prot>>);

impl ProtFrozen<'_> {
    /// The protection of page `idx`.
    pub(crate) fn prot_at(&self, idx: usize) -> Prot {
        self.0.range(..=idx).next_back().map_or(Prot::NONE, |(_, p)| *p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prot_runs_split_and_merge() {
        let map = Mapping::anonymous(16 * PAGE_SIZE, Protection::ReadWrite, PAGE_SIZE).unwrap();
        let r = Vma::new(RegionId(1), map, Prot::READ_WRITE, Backing::Anonymous, false);
        assert_eq!(r.prot_runs(0..16).as_slice(), [(0..16, Prot::READ_WRITE)]);
        r.set_prot(4..8, Prot::READ).unwrap();
        assert_eq!(
            r.prot_runs(0..16).as_slice(),
            [(0..4, Prot::READ_WRITE), (4..8, Prot::READ), (8..16, Prot::READ_WRITE)]
        );
        assert_eq!(r.prot_runs(5..6).as_slice(), [(5..6, Prot::READ)]);
        assert_eq!(r.prot_at(7), Prot::READ);
        assert_eq!(r.prot_at(8), Prot::READ_WRITE);
        r.set_prot(0..16, Prot::NONE).unwrap();
        assert_eq!(r.prot_runs(0..16).as_slice(), [(0..16, Prot::NONE)]);
        r.set_prot(12..16, Prot::READ).unwrap();
        assert_eq!(r.prot_runs(10..16).as_slice(), [(10..12, Prot::NONE), (12..16, Prot::READ)]);
    }
}
