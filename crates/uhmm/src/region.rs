//! `Region`: a managed mapping the program reads and writes directly (the
//! kernel's `vm_area_struct`), with its software page table and protections.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use smallvec::SmallVec;

use crate::fault::ScanWindow;
use crate::pte::{PageTable, State};
use crate::space::SpaceInner;
use uhmm_sys::PAGE_SIZE;
use uhmm_sys::mman::{Mapping, Protection};
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
pub(crate) struct RegionInner {
    pub(crate) id: u32,
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
    /// Page ranges unmapped with [`Region::unmap`] (reserved, inaccessible).
    unmapped: RwLock<Vec<Range<usize>>>,
    /// Adaptive fault-around: the windows of the scans faulting on device pages.
    pub(crate) fault_around: ScanWindow,
    /// The same for first-touch zero fills.
    pub(crate) zero_around: ScanWindow,
    /// The space's `to_device_epoch` when pages of the region last moved to
    /// a device.
    pub(crate) to_device_at: std::sync::atomic::AtomicU64,
}

impl RegionInner {
    pub(crate) fn new(id: u32, map: Mapping, prot: Prot, backing: Backing, huge: bool) -> RegionInner {
        let npages = map.len() / PAGE_SIZE;
        RegionInner {
            id,
            map,
            pt: PageTable::new(npages),
            backing,
            huge,
            prot: RwLock::new(BTreeMap::from([(0, prot)])),
            dead: AtomicBool::new(false),
            unmapped: RwLock::new(Vec::new()),
            fault_around: ScanWindow::default(),
            zero_around: ScanWindow::default(),
            to_device_at: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether any page of `pages` was unmapped.
    pub(crate) fn has_unmapped(&self, pages: &Range<usize>) -> bool {
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
        let mut map = self.prot.write().unwrap_or_else(|e| e.into_inner());
        self.map
            .protect(pages.start * PAGE_SIZE, pages.len() * PAGE_SIZE, protection)
            .map_err(|e| Error::sys("mprotect", e))?;
        let after = map.range(..=pages.end).next_back().map(|(_, p)| *p);
        let keys: Vec<usize> = map.range(pages.start..=pages.end).map(|(k, _)| *k).collect();
        for k in keys {
            map.remove(&k);
        }
        map.insert(pages.start, prot);
        if pages.end < self.npages()
            && let Some(a) = after
        {
            map.insert(pages.end, a);
        }
        Ok(())
    }
}

/// Protections held still; see [`RegionInner::prot_frozen`].
pub(crate) struct ProtFrozen<'a>(std::sync::RwLockReadGuard<'a, BTreeMap<usize, Prot>>);

impl ProtFrozen<'_> {
    /// The protection of page `idx`.
    pub(crate) fn prot_at(&self, idx: usize) -> Prot {
        self.0.range(..=idx).next_back().map_or(Prot::NONE, |(_, p)| *p)
    }
}

/// A managed mapping in the program's address space.
///
/// The program uses the memory directly through [`Region::as_ptr`]; uhmm
/// moves the pages behind it. Dropping the region unmaps it: pages on devices
/// are freed, after in-flight migrations of its pages end — so a thread must
/// not drop (or `unmap`, `discard`, `remap`) a region while it itself holds a
/// `Migration`, `RangeAccess` or `ExclusiveGrant` on it: it would wait for
/// itself.
///
/// Made by [`AddressSpace::map`](crate::AddressSpace::map) (and `map_huge`,
/// `map_shared`, `map_file`).
///
/// ```
/// use uhmm::{AddressSpace, Config, ErrorKind, PAGE_SIZE, PageState, Prot};
///
/// # fn main() -> uhmm::Result<()> {
/// let space = AddressSpace::new(Config::default())?;
/// let region = space.map(8 * PAGE_SIZE, Prot::READ_WRITE)?;
/// assert_eq!((region.len(), region.npages()), (8 * PAGE_SIZE, 8));
///
/// // `read` and `write` copy, faulting pages in (or back from a device);
/// // `as_ptr` gives the memory itself, for loads and stores.
/// region.write(PAGE_SIZE, b"data")?;
/// let mut buf = [0; 4];
/// region.read(PAGE_SIZE, &mut buf)?;
/// assert_eq!(&buf, b"data");
/// assert_eq!(region.state(1), Some(PageState::Cpu)); // in RAM, not on a device
///
/// // `mprotect` of part of it: writes there now fail.
/// region.protect(0..2 * PAGE_SIZE, Prot::READ)?;
/// let err = region.write(PAGE_SIZE, b"more").unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::Permission);
///
/// // `MADV_DONTNEED`: the pages read as zeros again.
/// region.protect(0..2 * PAGE_SIZE, Prot::READ_WRITE)?;
/// region.discard(0..2 * PAGE_SIZE)?;
/// region.read(PAGE_SIZE, &mut buf)?;
/// assert_eq!(buf, [0; 4]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Region {
    pub(crate) inner: Arc<RegionInner>,
    pub(crate) space: Arc<SpaceInner>,
}

impl Region {
    /// The first address.
    pub fn addr(&self) -> usize {
        self.inner.start()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.inner.map.len()
    }

    /// Always false: regions are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether the region is backed by huge pages where uhmm can.
    pub fn is_huge(&self) -> bool {
        self.inner.huge
    }

    /// What the region maps.
    pub fn backing(&self) -> Backing {
        self.inner.backing
    }

    /// Number of pages.
    pub fn npages(&self) -> usize {
        self.inner.npages()
    }

    /// The address range.
    pub fn range(&self) -> Range<usize> {
        self.addr()..self.addr() + self.len()
    }

    /// The start as a raw pointer. The memory is shared with the fault
    /// engine and devices: dereferencing it is `unsafe` for the caller, who
    /// must not keep Rust references across migrations of the same bytes by
    /// a device that writes them.
    pub fn as_ptr(&self) -> *mut u8 {
        self.inner.map.as_ptr()
    }

    /// Copies bytes at `offset` into `buf`, faulting pages back from devices
    /// as needed (the calling thread must not be a uhmm handler thread).
    ///
    /// Fails with [`ErrorKind::Fault`](crate::ErrorKind::Fault) outside the
    /// region, on pages without read access or on poisoned pages, instead of
    /// the signal a direct access would raise.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.inner.check_access(offset, buf.len(), Prot::READ)?;
        self.inner.map.read(offset, buf).map_err(|e| Error::sys("read", e))
    }

    /// Copies `buf` to `offset`, faulting pages back from devices as needed.
    /// Fails with [`ErrorKind::Permission`](crate::ErrorKind::Permission) on
    /// read-only pages, otherwise as [`Region::read`].
    pub fn write(&self, offset: usize, buf: &[u8]) -> Result<()> {
        self.inner.check_access(offset, buf.len(), Prot::READ_WRITE)?;
        self.inner.map.write(offset, buf).map_err(|e| Error::sys("write", e))
    }

    /// Changes the protection of `range` (byte offsets, page-aligned).
    pub fn protect(&self, range: Range<usize>, prot: Prot) -> Result<()> {
        let pages = self.page_range(&range)?;
        if self.inner.has_unmapped(&pages) {
            return Err(Error::invalid("part of the range was unmapped"));
        }
        let addrs = self.addr() + range.start..self.addr() + range.end;
        let _inv = self.space.notifiers.invalidate(addrs, crate::InvalidateEvent::Protection);
        self.inner.set_prot(pages, prot)
    }

    /// Unmaps part of the region (`munmap` of a sub-range): pages on
    /// devices are freed, mirrors are told, in-flight work on the pages
    /// ends first. The addresses stay reserved (inaccessible: an access is
    /// SIGSEGV, uhmm calls fail) until the whole region is dropped.
    pub fn unmap(&self, range: Range<usize>) -> Result<()> {
        self.drop_pages(range, true)
    }

    /// `madvise(MADV_DONTNEED)` of a range: its pages are dropped wherever
    /// they are (RAM, a device, held exclusive, poisoned); mirrors are told;
    /// in-flight work on the pages ends first. As with the kernel's
    /// `MADV_DONTNEED`, private anonymous pages read as zeros from then on,
    /// while a shared or file-backed region keeps its contents in the shared
    /// memory or the file (only this mapping's view of the pages is dropped;
    /// a private file mapping reads the file again).
    pub fn discard(&self, range: Range<usize>) -> Result<()> {
        self.drop_pages(range, false)
    }

    /// `unmap` (`reserve`: the range becomes inaccessible) or `discard`.
    fn drop_pages(&self, range: Range<usize>, reserve: bool) -> Result<()> {
        let pages = self.page_range(&range)?;
        if self.inner.has_unmapped(&pages) {
            return Err(Error::invalid("part of the range was unmapped already"));
        }
        let space = &self.space;
        let addrs = self.addr() + range.start..self.addr() + range.end;
        let _inv = space.notifiers.invalidate(addrs, crate::InvalidateEvent::Unmap);
        let prior: Vec<State> = pages.clone().map(|idx| self.inner.pt.lock(idx, &space.waits)).collect();
        let done = if reserve {
            self.inner.map.reserve(range.start, range.len())
        } else {
            self.inner.map.discard(range.start, range.len())
        }
        .map_err(|e| Error::sys(if reserve { "mmap" } else { "MADV_DONTNEED" }, e));
        if done.is_ok() && reserve {
            self.inner.unmapped.write().unwrap_or_else(|e| e.into_inner()).push(pages.clone());
            let _ = self.inner.set_prot(pages.clone(), Prot::NONE);
        }
        let mut freed = Vec::new();
        for (idx, state) in pages.clone().zip(prior) {
            let after = match (done.is_ok(), state) {
                (false, s) => s,
                (true, State::Device(p)) => {
                    freed.push(p);
                    State::Cpu
                }
                (true, State::Exclusive(slot)) => {
                    space.holding.give_back(slot as usize * PAGE_SIZE);
                    State::Cpu
                }
                (true, _) => State::Cpu,
            };
            space.unlock_wake(&self.inner, idx, after);
        }
        for p in freed {
            if let Some(pm) = space.pagemap(p.pagemap) {
                pm.free_page(p.pfn);
            }
        }
        done
    }

    /// Moves the region to a new address (`mremap` with `MREMAP_MAYMOVE`)
    /// and returns it. Every page keeps its state — in RAM, on a device,
    /// poisoned — at the same offset; mirrors are told the old range is gone.
    /// Work in flight on the region ends first. The old addresses are
    /// unmapped: a thread still using them gets SIGSEGV, as after `mremap`.
    pub fn remap(&self) -> Result<usize> {
        let space = &self.space;
        space.check_usable()?;
        let inner = &self.inner;
        if inner.has_unmapped(&(0..inner.npages())) {
            return Err(Error::invalid("a region with unmapped parts cannot move"));
        }
        let (old, len) = (self.addr(), self.len());
        let _inv = space.notifiers.invalidate(old..old + len, crate::InvalidateEvent::Unmap);
        // Hold every page: no migration, fill or device access runs meanwhile.
        let prior: Vec<State> = (0..inner.npages()).map(|idx| inner.pt.lock(idx, &space.waits)).collect();
        let align = if len >= crate::HUGE_SIZE { crate::HUGE_SIZE } else { PAGE_SIZE };
        let moved = space.rekey_region(inner, || {
            let new = inner.map.move_to_new_address(align).map_err(|e| Error::sys("mremap", e))?;
            if inner.backing == Backing::Anonymous {
                // The kernel dropped the registration with the move.
                space.uffd.register(&inner.map, 0, len, false).map_err(|e| Error::sys("UFFDIO_REGISTER", e))?;
            }
            Ok(new)
        });
        for (idx, state) in prior.into_iter().enumerate() {
            let _ = inner.pt.unlock(idx, state, &space.waits);
        }
        // Threads that faulted at the old addresses retry there (and find
        // nothing mapped: their race with the move).
        let _ = space.uffd.wake(old, len);
        moved
    }

    fn page_range(&self, range: &Range<usize>) -> Result<Range<usize>> {
        if !range.start.is_multiple_of(PAGE_SIZE)
            || !range.end.is_multiple_of(PAGE_SIZE)
            || range.is_empty()
            || range.end > self.len()
        {
            return Err(Error::invalid("the range must be non-empty, page-aligned and inside the region"));
        }
        Ok(range.start / PAGE_SIZE..range.end / PAGE_SIZE)
    }

    /// Where each page of the region is, per uhmm's page table (`Cpu` for a
    /// RAM page or a hole).
    pub fn state(&self, page: usize) -> Option<State> {
        (page < self.npages()).then(|| self.inner.pt.load(page).state())
    }

    /// Bytes of uhmm metadata this region holds now (its page table).
    pub fn metadata_bytes(&self) -> usize {
        self.inner.pt.metadata_bytes()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.space.unmap_region(&self.inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prot_runs_split_and_merge() {
        let map = Mapping::anonymous(16 * PAGE_SIZE, Protection::ReadWrite, PAGE_SIZE).unwrap();
        let r = RegionInner::new(1, map, Prot::READ_WRITE, Backing::Anonymous, false);
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
