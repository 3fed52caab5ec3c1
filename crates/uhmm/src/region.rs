//! `Region`: the program's handle on a managed mapping, and the calls that
//! make one (`AddressSpace::map` and its kin, `mmap`) or change one
//! (`protect`, `unmap`, `discard`, `remap`: `mprotect`, `munmap`,
//! `MADV_DONTNEED`, `mremap`). The mapping's state is its `Vma`
//! (`vma.rs`), held by the address space.

use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::Arc;

use uhmm_sys::mman::Mapping;
use uhmm_sys::{HUGE_SIZE, PAGE_SIZE};

use crate::mm::{AddressSpace, Mm};
use crate::notifier::InvalidateEvent;
use crate::pte::State;
use crate::vma::{Backing, Prot, Vma};
use crate::{Error, Result};

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
    pub(crate) inner: Arc<Vma>,
    pub(crate) space: Arc<Mm>,
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

    /// Whether the program unmapped or moved all of the region's memory
    /// behind uhmm's back (seen with
    /// [`Config::non_cooperative`](crate::Config::non_cooperative)): the
    /// region manages nothing any more, and its addresses may belong to
    /// another mapping now. Dropping it is all that is left to do.
    pub fn is_gone(&self) -> bool {
        self.inner.is_dead()
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
    /// region, on pages without read access or on poisoned pages (also one
    /// found lost while this call brings it back from a device), instead of
    /// the signal a direct access would raise. The kernel copies
    /// (`process_vm_readv`), so that a page lost underneath is an error;
    /// with a user-mode-only userfaultfd, pages not in RAM are copied with
    /// plain loads, which raise SIGBUS on such a page. The kernel pins each
    /// page for the copy, as for any read by a system call: a page shared
    /// copy-on-write with a forked child is unshared first (copied), which
    /// a load ([`Region::load`]) would not do.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        copy(&self.space, &self.inner, offset, Copy::Out(buf))
    }

    /// Copies bytes at `offset` into `buf` with plain loads, as the
    /// program's own code would: pages on devices come back through the
    /// fault engine, and a page lost on its way back raises SIGBUS rather
    /// than an error. For measuring or imitating a program's accesses;
    /// [`Region::read`] is the checked copy. Fails only as `read` does
    /// before copying (outside the region, no read access, poisoned).
    pub fn load(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.inner.check_access(offset, buf.len(), Prot::READ)?;
        self.inner.map.read(offset, buf).map_err(|e| Error::sys("read", e))
    }

    /// Copies `buf` to `offset` with plain stores, as the program's own
    /// code would (the store counterpart of [`Region::load`]): pages on
    /// devices come back through the fault engine, a page lost on its way
    /// back raises SIGBUS. Fails only as `write` does before copying.
    pub fn store(&self, offset: usize, buf: &[u8]) -> Result<()> {
        self.inner.check_access(offset, buf.len(), Prot::READ_WRITE)?;
        self.inner.map.write(offset, buf).map_err(|e| Error::sys("write", e))
    }

    /// Copies `buf` to `offset`, faulting pages back from devices as needed.
    /// Fails with [`ErrorKind::Permission`](crate::ErrorKind::Permission) on
    /// read-only pages, otherwise as [`Region::read`].
    pub fn write(&self, offset: usize, buf: &[u8]) -> Result<()> {
        copy(&self.space, &self.inner, offset, Copy::In(buf))
    }

    /// Changes the protection of `range` (byte offsets, page-aligned).
    pub fn protect(&self, range: Range<usize>, prot: Prot) -> Result<()> {
        let pages = self.page_range(&range)?;
        self.space.own_changes.settle();
        if self.inner.has_unmapped(&pages) {
            return Err(Error::invalid("part of the range was unmapped"));
        }
        let addrs = self.addr() + range.start..self.addr() + range.end;
        let _inv = self.space.notifiers.invalidate(addrs, InvalidateEvent::Protection);
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
        self.space.own_changes.settle();
        if self.inner.has_unmapped(&pages) {
            return Err(Error::invalid("part of the range was unmapped already"));
        }
        let space = &self.space;
        let addrs = self.addr() + range.start..self.addr() + range.end;
        let _inv = space.notifiers.invalidate(addrs.clone(), InvalidateEvent::Unmap);
        let prior: Vec<State> = pages.clone().map(|idx| self.inner.pt.lock(idx, &space.waits)).collect();
        let done = if reserve {
            // Replacing the pages sends an unmap event: uhmm's own.
            let _own = space.own_changes.announce(addrs.clone());
            self.inner.map.reserve(range.start, range.len())
        } else {
            self.inner.map.discard(range.start, range.len())
        }
        .map_err(|e| Error::sys(if reserve { "mmap" } else { "MADV_DONTNEED" }, e));
        if done.is_ok() && reserve {
            self.inner.mark_unmapped(pages.clone());
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
            space.free_device_page(p);
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
        space.own_changes.settle();
        if inner.has_unmapped(&(0..inner.npages())) {
            return Err(Error::invalid("a region with unmapped parts cannot move"));
        }
        let (old, len) = (self.addr(), self.len());
        let _inv = space.notifiers.invalidate(old..old + len, InvalidateEvent::Unmap);
        // Hold every page: no migration, fill or device access runs meanwhile.
        let prior: Vec<State> = (0..inner.npages()).map(|idx| inner.pt.lock(idx, &space.waits)).collect();
        let align = region_align(len);
        // Announced outside the table's lock, which handlers take.
        let own = space.own_changes.announce(old..old + len);
        let moved = space.rekey_region(inner, || {
            let new = inner.map.move_to_new_address(align).map_err(|e| Error::sys("mremap", e))?;
            if inner.backing == Backing::Anonymous {
                // The kernel dropped the registration with the move.
                space.register_anonymous(&inner.map)?;
            }
            Ok(new)
        });
        drop(own);
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

impl AddressSpace {
    /// Copies the bytes at `addr` (inside one region) into `buf`, as
    /// [`Region::read`](crate::Region::read) does; for devices that reach RAM pages by address.
    pub fn read_at(&self, addr: usize, buf: &mut [u8]) -> Result<()> {
        let region = self
            .inner
            .region_at(addr)
            .ok_or_else(|| Error::new(crate::ErrorKind::Fault, "address not managed by uhmm"))?;
        let off = addr - region.start();
        copy(&self.inner, &region, off, Copy::Out(buf))
    }

    /// Copies `buf` to `addr` (inside one region), as [`Region::write`](crate::Region::write) does.
    pub fn write_at(&self, addr: usize, buf: &[u8]) -> Result<()> {
        let region = self
            .inner
            .region_at(addr)
            .ok_or_else(|| Error::new(crate::ErrorKind::Fault, "address not managed by uhmm"))?;
        let off = addr - region.start();
        copy(&self.inner, &region, off, Copy::In(buf))
    }

    /// Maps a new region of `len` bytes (rounded up to pages), lazily backed:
    /// nothing is allocated until it is touched. Regions of 2 MiB or more are
    /// 2 MiB-aligned.
    pub fn map(&self, len: usize, prot: Prot) -> Result<Region> {
        self.map_anonymous(len, prot, false)
    }

    /// Maps a region backed by transparent huge pages where uhmm can: its
    /// length is rounded up to 2 MiB and it is 2 MiB-aligned; first touch
    /// fills whole 2 MiB blocks with one huge page, and a block that moves
    /// whole (to a device and back) moves as one compound unit. Where a huge
    /// page cannot be had, small pages are used.
    pub fn map_huge(&self, len: usize, prot: Prot) -> Result<Region> {
        self.map_anonymous(
            len.checked_next_multiple_of(HUGE_SIZE).ok_or_else(|| Error::invalid("length overflows"))?,
            prot,
            true,
        )
    }

    fn map_anonymous(&self, len: usize, prot: Prot, huge: bool) -> Result<Region> {
        self.inner.check_usable()?;
        let len = region_len(len)?;
        let align = region_align(len);
        let map = Mapping::anonymous(len, prot.protection()?, align).map_err(|e| Error::sys("mmap", e))?;
        if huge {
            map.advise_huge(0, len).map_err(|e| Error::sys("MADV_HUGEPAGE", e))?;
        }
        self.inner.register_anonymous(&map)?;
        self.insert_region(map, prot, Backing::Anonymous, huge)
    }

    /// Maps a region of shared anonymous memory (`MAP_SHARED | MAP_ANONYMOUS`):
    /// shared with children across `fork`; devices can read and write it,
    /// migrations skip it.
    pub fn map_shared(&self, len: usize, prot: Prot) -> Result<Region> {
        self.inner.check_usable()?;
        let len = region_len(len)?;
        let map = Mapping::shared_anonymous(len, prot.protection()?).map_err(|e| Error::sys("mmap", e))?;
        self.insert_region(map, prot, Backing::SharedAnonymous, false)
    }

    /// Maps `len` bytes of `file` from `offset` (page-aligned), shared or
    /// private: devices can read and write it, migrations skip it.
    pub fn map_file(&self, file: &impl AsFd, offset: u64, len: usize, prot: Prot, shared: bool) -> Result<Region> {
        self.inner.check_usable()?;
        let len = region_len(len)?;
        let map = Mapping::file(file.as_fd(), offset, len, prot.protection()?, shared).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidInput => Error::invalid("offset must be page-aligned"),
            _ => Error::sys("mmap", e),
        })?;
        self.insert_region(map, prot, Backing::File { shared }, false)
    }

    /// In a forked child: takes over `inherited`, a region of an address
    /// space the child inherited (orphaned), as a region of this one. The
    /// data is the child's copy of the parent's; `inherited` no longer owns
    /// the mapping (dropping it unmaps nothing).
    pub fn adopt(&self, inherited: &Region) -> Result<Region> {
        self.inner.check_usable()?;
        if !inherited.space.is_orphaned() {
            return Err(Error::invalid("only regions inherited across fork can be adopted"));
        }
        let old = &inherited.inner;
        let map = old.map.disown().ok_or_else(|| Error::invalid("the region was adopted already"))?;
        if old.backing == Backing::Anonymous {
            self.inner.register_anonymous(&map)?;
        }
        let region = self.insert_region(map, old.prot_at(0), old.backing, old.huge)?;
        for (pages, prot) in old.prot_runs(0..old.npages()) {
            region.inner.set_prot(pages, prot)?;
        }
        Ok(region)
    }

    fn insert_region(&self, map: Mapping, prot: Prot, backing: Backing, huge: bool) -> Result<Region> {
        let inner = self.inner.insert_vma(map, prot, backing, huge)?;
        Ok(Region { inner, space: self.inner.clone() })
    }
}

/// A region length rounded up to pages; empty is an error.
fn region_len(len: usize) -> Result<usize> {
    if len == 0 {
        return Err(Error::invalid("cannot map an empty region"));
    }
    len.checked_next_multiple_of(PAGE_SIZE).ok_or_else(|| Error::invalid("length overflows"))
}

/// Looks at a page the kernel could not copy before [`copy`] reports it
/// lost, this long apart: the migration that poisons it holds its lock for
/// microseconds.
const LOST_SETTLE_TRIES: usize = 100;
const LOST_SETTLE_WAIT: std::time::Duration = std::time::Duration::from_micros(100);

/// The direction of a [`copy`].
enum Copy<'a> {
    Out(&'a mut [u8]),
    In(&'a [u8]),
}

/// Copies between `buf` and `offset` of `region`, after checking the access
/// (see `Vma::check_access`). The kernel copies (`process_vm_readv` /
/// `_writev`): a page that turns out lost on its way back from a device (a
/// store's object failing its check), even one a migration took there
/// after the check, is then this call's `Fault` error, not a SIGBUS in the
/// copy; pages not in RAM come back through the fault engine as a load's
/// would.
fn copy(space: &Mm, region: &Vma, offset: usize, mut buf: Copy<'_>) -> Result<()> {
    let (len, need, what) = match &buf {
        Copy::Out(b) => (b.len(), Prot::READ, "read"),
        Copy::In(b) => (b.len(), Prot::READ_WRITE, "write"),
    };
    region.check_access(offset, len, need)?;
    if len == 0 {
        return Ok(());
    }
    let r = match &mut buf {
        Copy::Out(b) => region.map.read_or_efault(offset, b),
        Copy::In(b) => region.map.write_or_efault(offset, b),
    };
    let done = match r {
        Ok(()) => return Ok(()),
        Err((n, e)) if e.raw_os_error() == Some(rustix::io::Errno::FAULT.raw_os_error()) => {
            region.check_access(offset, len, need)?;
            if space.kernel_faults_wait() {
                // The kernel faults pages in for the copy: a page it could
                // not reach is lost. Its state may not say so yet (the
                // migration that found it lost is finishing): give it a
                // moment, so that the page reads as poisoned afterwards.
                for _ in 0..LOST_SETTLE_TRIES {
                    region.check_access(offset, len, need)?;
                    std::thread::sleep(LOST_SETTLE_WAIT);
                }
                return Err(Error::new(crate::ErrorKind::Fault, "a page of the range is lost"));
            }
            // A page not present, which a user-mode-only userfaultfd (or
            // one raising SIGBUS) does not fault in for the kernel: a load
            // does.
            n
        }
        Err((_, e)) => return Err(Error::sys(what, e)),
    };
    match buf {
        Copy::Out(b) => region.map.read(offset + done, &mut b[done..]),
        Copy::In(b) => region.map.write(offset + done, &b[done..]),
    }
    .map_err(|e| Error::sys(what, e))
}

/// Where a new (or moved) region of `len` bytes starts: aligned to its
/// size's power of two, up to 2 MiB, so that windows and blocks counted
/// from its start (fault-around, huge pages) are aligned in the address
/// space too, as a store's groups are. Costs address space only: the
/// slack is unmapped at once.
fn region_align(len: usize) -> usize {
    len.next_power_of_two().clamp(PAGE_SIZE, HUGE_SIZE)
}
