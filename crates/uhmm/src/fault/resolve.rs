//! Resolving one fault: a first touch is zero-filled over a window (a huge
//! page in a huge region), a device page is brought back by its driver's
//! `migrate_to_ram` (the kernel's `do_swap_page` on a device-private
//! entry), an exclusive page is taken back, a poisoned one gets its SIGBUS
//! marker, and a locked one is parked until its unlock wakes the thread.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rustix::io::Errno;
use uhmm_sys::PAGE_SIZE;
use uhmm_sys::pagemap::{Query, category};

use crate::exclusive::revoke::{Revoked, revoke};
use crate::fault::around::{ReadAhead, fault_window};
use crate::fault::serving::Serving;
use crate::migrate::CpuFault;
use crate::mm::{AddressSpace, Mm};
use crate::page::DevicePage;
use crate::pte::State;
use crate::stats::Stats;
use crate::vma::Vma;
use crate::{Error, ErrorKind};

/// A userfault to resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fault {
    /// The faulting page's address.
    pub(crate) addr: usize,
    /// A write access.
    pub(crate) write: bool,
    /// The space's `to_device_epoch` before the fault was read.
    pub(crate) read_at: u64,
}

#[cfg(test)]
impl Fault {
    /// A fault at `addr` (tests).
    pub(crate) fn at(addr: usize, write: bool, read_at: u64) -> Fault {
        Fault { addr, write, read_at }
    }
}

/// Resolves `fault`. A fault on a device page in a sequential scan sets
/// `ahead` to the address where the scan will fault next.
pub(crate) fn resolve(
    space: &Arc<Mm>,
    fault: Fault,
    ahead: &mut Option<ReadAhead>,
    serving: &Arc<Serving>,
) -> Result<(), Errno> {
    let Fault { addr, write, read_at } = fault;
    let Some(region) = space.region_at(addr) else {
        // Not in any region: a stale fault for a region that is being (or
        // was) unmapped — whose addresses may already belong to a new
        // region, even of another address space — or a stray access to a
        // staging arena (a uhmm bug). Poisoning is only for the latter: an
        // address that may be someone else's page now must never be
        // poisoned. The thread retries; an unmapped address gets SIGSEGV.
        let own_arena = [&space.stage.map, &space.pool.map, &space.huge_pool.map]
            .iter()
            .any(|m| addr >= m.addr() && addr - m.addr() < m.len());
        if own_arena {
            tracing::error!(addr, "fault on a staging arena: poisoning the page");
            return match space.uffd.poison(addr, PAGE_SIZE, false) {
                Ok(_) => Ok(()),
                Err(p) if p.errno == Errno::EXIST => space.uffd.wake(addr, PAGE_SIZE),
                Err(p) => Err(p.errno),
            };
        }
        if space.config.non_cooperative {
            crate::foreign::unmanaged_fault(space, addr, None);
        }
        return space.uffd.wake(addr, PAGE_SIZE);
    };
    // The region may have moved (`Region::remap`) since it was looked up.
    let Some(idx) = region.index_of(addr) else {
        return space.uffd.wake(addr, PAGE_SIZE);
    };
    if region.has_unmapped(&(idx..idx + 1)) {
        // A page the program unmapped behind uhmm's back, or grew into.
        if space.config.non_cooperative {
            crate::foreign::unmanaged_fault(space, addr, Some(&region));
        }
        return space.uffd.wake(addr, PAGE_SIZE);
    }
    let mut single = false;
    for attempt in 0..MAX_LOOKS {
        let entry = region.pt.load(idx);
        if entry.locked() {
            if region.pt.add_fault_waiter(idx) {
                Stats::add(&space.stats.deferred_faults, 1);
                return Ok(());
            }
            continue;
        }
        let looked = match entry.state() {
            State::Cpu => zero_fill(space, &region, idx, write),
            State::Poisoned => poison_install(space, &region, idx).map(|()| Look::Resolved),
            State::Exclusive(slot) => revoke(space, &region, idx, slot).map(|r| match r {
                Revoked::Home => Look::Resolved,
                Revoked::Changed => Look::Changed,
            }),
            State::Device(_) if region.to_device_at.load(Ordering::SeqCst) > read_at => {
                // Maybe stale (see the module docs): a waiting thread faults again.
                Stats::add(&space.stats.stale_faults, 1);
                return space.uffd.wake(addr, PAGE_SIZE);
            }
            State::Device(page) => {
                let fault = DeviceFault { addr, idx, page, read_at, single };
                match device_fault(space, &region, fault, ahead, serving) {
                    DeviceLook::Resolved => return Ok(()),
                    DeviceLook::OnePage => {
                        single = true;
                        continue;
                    }
                    DeviceLook::Changed => {}
                }
                if attempt > 0 {
                    std::thread::yield_now();
                }
                Ok(Look::Changed)
            }
        };
        match looked {
            Ok(Look::Changed) => continue,
            Ok(Look::Resolved) => return Ok(()),
            Err(errno) => return Err(errno),
        }
    }
    tracing::error!(addr, "fault did not settle after {MAX_LOOKS} looks; waking the thread to retry");
    space.uffd.wake(addr, PAGE_SIZE)
}

/// What one look at the faulting page came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    /// Resolved: the page is in place, or the thread woken to fault again.
    Resolved,
    /// The page changed under the look (its lock was taken, its state
    /// moved on): look again.
    Changed,
}

/// A fault on a device page, as [`device_fault`] serves it.
#[derive(Debug, Clone, Copy)]
struct DeviceFault {
    addr: usize,
    idx: usize,
    page: DevicePage,
    /// The space's `to_device_epoch` before the fault was read.
    read_at: u64,
    /// Ask the driver for the faulting page alone (it refused a window).
    single: bool,
}

/// What [`device_fault`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceLook {
    /// The page is back (or lost and poisoned) and its thread woken.
    Resolved,
    /// The driver refused the window: ask again for the page alone.
    OnePage,
    /// The page is not back yet (a transient failure, or it changed): look again.
    Changed,
}

/// Failed looks at a faulting page before its thread is woken to fault
/// again: a page that keeps changing under the handler (locked and
/// unlocked by others in turn) must not hold the handler forever; the
/// retry from the thread's new fault starts afresh.
const MAX_LOOKS: usize = 1000;

/// How long a handler waits before asking a driver again after a transient
/// failure (staging or device memory short, a fence slow): long enough for
/// a migration elsewhere to finish, short against a fault's cost.
const TRANSIENT_RETRY_WAIT: std::time::Duration = std::time::Duration::from_micros(100);

/// Serves a fault on device page `fault.page`: its driver's
/// `migrate_to_ram` with the fault-around window (the kernel's
/// `do_swap_page` calling `pgmap->ops->migrate_to_ram`).
fn device_fault(
    space: &Arc<Mm>,
    region: &Vma,
    fault: DeviceFault,
    ahead: &mut Option<ReadAhead>,
    serving: &Arc<Serving>,
) -> DeviceLook {
    let DeviceFault { addr, idx, page, read_at, single } = fault;
    Stats::add(&space.stats.migrate_to_ram, 1);
    let (window, next) = if single {
        (addr..addr + PAGE_SIZE, None)
    } else {
        let (window, next, _) = fault_window(space, region, idx, None);
        (window, next)
    };
    space.charge(window.len() / PAGE_SIZE);
    let arriving = space.arriving(window.len() / PAGE_SIZE);
    let (result, woken) = match space.driver(page.pagemap) {
        Some(ops) => {
            serving.begin(addr);
            let handle = AddressSpace::serving(space, serving);
            let fault = if single || next.is_some() {
                CpuFault::new(handle, addr, window, page)
            } else {
                CpuFault::around(handle, addr, window, page)
            };
            (ops.migrate_to_ram(&fault), fault.woken())
        }
        None => (Err(Error::new(ErrorKind::NotFound, "the device is gone")), false),
    };
    // What came back is counted in `pages_to_ram` by now.
    drop(arriving);
    if let Err(err) = result {
        if matches!(err.kind(), ErrorKind::NoMemory | ErrorKind::Busy) {
            tracing::warn!(%err, addr, "migrate_to_ram failed transiently; retrying");
            std::thread::sleep(TRANSIENT_RETRY_WAIT);
            return DeviceLook::Changed;
        }
        if err.kind() == ErrorKind::InvalidArgument && !single {
            tracing::warn!(%err, addr, "migrate_to_ram refused the window; retrying one page");
            return DeviceLook::OnePage;
        }
        tracing::error!(%err, addr, "migrate_to_ram failed: poisoning the page");
        poison_page(space, region, idx, page);
        return DeviceLook::Changed;
    }
    if !region.pt.load(idx).is_cpu_unlocked() {
        return DeviceLook::Changed;
    }
    // A scan's fault replaces the read-ahead to do; any other leaves it
    // (glibc's memcpy touches a large read's last bytes first: a fault
    // beside the scan).
    let windows = space.config.read_ahead_windows;
    if let Some(i) = next.filter(|_| windows > 0) {
        *ahead = Some(ReadAhead { addr: region.addr_of(i), windows, read_at });
    }
    // Back in RAM. Its migration woke the thread, unless the page came
    // back some other way (say, discarded meanwhile).
    if !woken && let Err(err) = space.uffd.wake(addr, PAGE_SIZE) {
        tracing::error!(%err, addr, "UFFDIO_WAKE failed");
    }
    DeviceLook::Resolved
}

/// Zero-fills the first-touch window around page `idx`: with the zero page
/// for a read, with fresh zeroed pages for a write (which would otherwise
/// take a second, copy-on-write fault per page). [`Look::Changed`] when
/// the page was locked meanwhile (the caller looks again).
fn zero_fill(space: &Mm, region: &Vma, idx: usize, write: bool) -> Result<Look, Errno> {
    let pt = &region.pt;
    if !pt.try_lock_for_fill(idx) {
        return Ok(Look::Changed);
    }
    if region.huge && huge_fill(space, region, idx) {
        return Ok(Look::Resolved);
    }
    // Adaptive like fault-around ([`ScanWindow`]).
    let proposal = region.zero_around.propose(
        idx,
        region.start() / PAGE_SIZE,
        space.config.zero_fill_pages,
        space.config.fault_around_max_pages,
        region.npages(),
        || 0,
    );
    // The window may not cross a protection boundary (one VMA per ioctl).
    let run = region
        .prot_runs(proposal.pages.clone())
        .into_iter()
        .find(|(r, _)| r.contains(&idx))
        .map_or(idx..idx + 1, |(r, _)| r);
    let mut lo = idx;
    while lo > run.start && pt.try_lock_for_fill(lo - 1) {
        lo -= 1;
    }
    let mut hi = idx + 1;
    while hi < run.end && pt.try_lock_for_fill(hi) {
        hi += 1;
    }
    region.zero_around.record(&proposal, &(lo..hi));
    // Charged once locked, as many pages as will come: a window asked
    // before would be the largest one, and a program that fits its budget
    // would wait at its last pages.
    space.charge(hi - lo);
    let arriving = space.arriving(hi - lo);
    let fill = |first: usize, n: usize| {
        let (addr, len) = (region.addr_of(first), n * PAGE_SIZE);
        if !write {
            return space.uffd.zeropage(addr, len, true);
        }
        // Fresh zeroed pages, from the zero buffer a piece at a time.
        let mut done = 0;
        while done < len {
            let piece = (len - done).min(space.zeros.len());
            match space.uffd.copy(addr + done, space.zeros.as_ptr(), piece, true) {
                Ok(n) => done += n,
                Err(p) => return Err(uhmm_sys::uffd::Partial { done: done + p.done, errno: p.errno }),
            }
        }
        Ok(len)
    };
    // DONTWAKE: the faulting thread must not run on before the window is
    // unlocked, or its next migration would find its own pages busy.
    let mut result = Ok(());
    let mut filled = 0;
    match fill(idx, hi - idx) {
        Ok(n) => filled += n,
        Err(p) if p.errno == Errno::EXIST => {
            Stats::add(&space.stats.eexist, 1);
            filled += p.done;
        }
        Err(p) => {
            if p.errno == Errno::AGAIN {
                Stats::add(&space.stats.eagain, 1);
            }
            result = Err(p.errno);
        }
    }
    if lo < idx && result.is_ok() {
        // Pages before the fault: best effort, nobody waits on them.
        filled += fill(lo, idx - lo).unwrap_or_else(|p| p.done);
    }
    Stats::add(&space.stats.zero_filled_pages, (filled / PAGE_SIZE) as u64);
    drop(arriving);
    let mut wake_end = idx + 1;
    for i in lo..hi {
        if pt.unlock(i, State::Cpu, &space.waits) && i >= wake_end {
            wake_end = i + 1;
        }
    }
    // The faulting page (present now, by us or by someone else; on EAGAIN
    // its thread retries and faults again), and any page of the window a
    // thread waited on while we held it.
    space.wake(region, lo..wake_end);
    result.map(|()| Look::Resolved)
}

/// First touch in a huge region: fills the whole aligned 2 MiB block around
/// page `idx` (locked by the caller) with one zeroed huge page, moved in from
/// the huge pool (`UFFDIO_MOVE` of a PMD). Returns false — page `idx` still
/// locked, nothing changed — when the block is not wholly empty and free, so
/// the caller fills small pages instead.
fn huge_fill(space: &Mm, region: &Vma, idx: usize) -> bool {
    const N: usize = crate::BATCH_PAGES;
    let block = idx - idx % N;
    if block + N > region.npages() || region.prot_runs(block..block + N).len() != 1 {
        return false;
    }
    let (a, b) = (region.addr_of(block), region.addr_of(block + N));
    // Whether the block holds no page (a PAGEMAP_SCAN with no match).
    let empty = || {
        let q = Query::any_of(category::PRESENT | category::SWAPPED);
        space.pagemap_file.scan(a, b, q, &mut Vec::new()).is_ok_and(|n| n == 0)
    };
    if !empty() {
        return false; // not wholly empty: small pages (checked before taking any lock)
    }
    let pt = &region.pt;
    let mut locked = Vec::with_capacity(N);
    let all = (block..block + N).all(|i| {
        let ok = i == idx || pt.try_lock_for_fill(i);
        if ok && i != idx {
            locked.push(i);
        }
        ok
    });
    let unlock = |pages: &[usize]| {
        for &i in pages {
            space.unlock_wake(region, i, State::Cpu);
        }
    };
    // Empty still, now that no fill can start in it.
    let slots = if all && empty() {
        space.charge(N);
        space.huge_pool.alloc(N).ok()
    } else {
        None
    };
    let Some(slots) = slots else {
        unlock(&locked);
        return false;
    };
    slots.populate(0..N);
    let arriving = space.arriving(N);
    let moved = space.uffd.move_pages(a, slots.mapping(), slots.offset(0), N * PAGE_SIZE, false, true);
    if let Err(e) = &moved {
        // Part may have moved: the rest is filled with small pages below.
        tracing::debug!(errno = %e.errno, "huge first touch fell back to small pages");
    }
    let done = moved.unwrap_or_else(|e| e.done) / PAGE_SIZE;
    Stats::add(&space.stats.zero_filled_pages, done as u64);
    drop(arriving);
    if done < N {
        unlock(&locked);
        return false;
    }
    Stats::add(&space.stats.huge_fills, 1);
    locked.push(idx);
    unlock(&locked);
    space.wake(region, block..block + N);
    true
}

/// Installs the SIGBUS marker for a page already recorded as poisoned.
fn poison_install(space: &Mm, region: &Vma, idx: usize) -> Result<(), Errno> {
    let addr = region.addr_of(idx);
    match space.uffd.poison(addr, PAGE_SIZE, false) {
        Ok(_) => Ok(()),
        Err(p) if p.errno == Errno::EXIST => space.uffd.wake(addr, PAGE_SIZE),
        Err(p) => Err(p.errno),
    }
}

/// The driver could not bring `page` back: the page is lost. Record it,
/// free the device page, and make accesses fail with SIGBUS.
fn poison_page(space: &Mm, region: &Vma, idx: usize, page: DevicePage) {
    if !region.pt.try_lock_if(idx, State::Device(page)) {
        return; // it changed meanwhile: the caller looks again
    }
    let waiter = region.pt.unlock(idx, State::Poisoned, &space.waits);
    Stats::add(&space.stats.poisoned_pages, 1);
    space.free_device_page(page);
    if let Err(err) = poison_install(space, region, idx) {
        tracing::error!(%err, "UFFDIO_POISON failed");
    }
    if waiter {
        space.wake(region, idx..idx + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_device::TestDev;

    #[test]
    fn duplicate_fault_on_present_page_takes_eexist_and_wakes() {
        let space = crate::AddressSpace::new(crate::Config::default()).unwrap();
        let region = space.map(64 * PAGE_SIZE, crate::Prot::READ_WRITE).unwrap();
        region.write(5 * PAGE_SIZE, &[9]).unwrap(); // faulted in by the handler
        let before = space.stats();
        assert!(before.zero_filled_pages >= 1);
        // A stale copy of that fault, read late or twice: must succeed and wake.
        resolve(&space.inner, Fault::at(region.addr() + 5 * PAGE_SIZE, true, 0), &mut None, &Arc::default()).unwrap();
        let after = space.stats();
        assert_eq!(after.eexist, before.eexist + 1, "the already-present page answers EEXIST");
        let mut b = [0u8; 1];
        region.read(5 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b[0], 9, "the page was not replaced");
    }

    #[test]
    fn a_zero_fill_is_charged_the_pages_it_fills_and_counts_them_arriving_until_counted() {
        #[derive(Default)]
        struct Asked(std::sync::Mutex<Vec<usize>>);
        impl crate::ChargeOps for Asked {
            fn charge(&self, pages: usize) {
                self.0.lock().unwrap().push(pages);
            }
        }
        let space = crate::AddressSpace::new(crate::Config::default()).unwrap();
        let asked = Arc::new(Asked::default());
        let hook: Arc<dyn crate::ChargeOps> = asked.clone();
        space.set_charge(Some(Arc::downgrade(&hook)));
        let region = space.map(64 * PAGE_SIZE, crate::Prot::READ_WRITE).unwrap();
        let before = space.stats().zero_filled_pages;
        region.write(5 * PAGE_SIZE, &[9]).unwrap();
        let filled = space.stats().zero_filled_pages - before;
        assert!(filled >= 1);
        assert_eq!(*asked.0.lock().unwrap(), [filled as usize], "one charge, of the window filled");
        assert_eq!(space.pages_in_at_scan(), space.pages_in(), "nothing arriving once counted");
        let arriving = space.inner.arriving(3);
        assert_eq!(space.pages_in_at_scan(), space.pages_in() + 3);
        drop(arriving);
        assert_eq!(space.pages_in_at_scan(), space.pages_in());
    }

    #[test]
    fn a_fault_read_before_its_page_moved_to_a_device_only_wakes() {
        let space = crate::AddressSpace::new(crate::Config::default()).unwrap();
        let (region, dev) = TestDev::attach(&space, 4);
        // A fault read now, resolved only after the page moved to the device.
        let read_at = space.inner.to_device_epoch.load(Ordering::SeqCst);
        assert_eq!(dev.to_device(&space, region.range()).migrated, 4);
        let on_device = || matches!(region.inner.pt.load(0).state(), State::Device(_));
        resolve(&space.inner, Fault::at(region.addr(), false, read_at), &mut None, &Arc::default()).unwrap();
        assert_eq!(dev.migrate_to_ram_calls.load(Ordering::SeqCst), 0, "the stale fault brought nothing back");
        assert_eq!(space.stats().stale_faults, 1);
        assert!(on_device());
        // A fault read after the move is served.
        let read_at = space.inner.to_device_epoch.load(Ordering::SeqCst);
        let serving = Arc::default();
        resolve(&space.inner, Fault::at(region.addr(), false, read_at), &mut None, &serving).unwrap();
        assert_eq!(dev.migrate_to_ram_calls.load(Ordering::SeqCst), 1);
        assert!(!on_device());
        assert_eq!(space.stats().stale_faults, 1);
        assert!(serving.woken(), "the driver's migration woke the page: the handler need not wake it again");
    }

    #[test]
    fn a_fault_beside_a_scan_leaves_its_read_ahead_to_do() {
        let config = crate::Config { read_ahead_windows: 2, ..crate::Config::default() };
        let space = crate::AddressSpace::new(config).unwrap();
        let (region, dev) = TestDev::attach(&space, 256);
        assert_eq!(dev.to_device(&space, region.range()).migrated, 256);
        let read_at = space.inner.to_device_epoch.load(Ordering::SeqCst);
        let at = |page: usize| Fault::at(region.addr() + page * PAGE_SIZE, false, read_at);
        let mut ahead = None;
        // A scan up: its second fault leaves a read-ahead from page 48.
        resolve(&space.inner, at(0), &mut ahead, &Arc::default()).unwrap();
        resolve(&space.inner, at(16), &mut ahead, &Arc::default()).unwrap();
        let scan_ahead = ahead.map(|a| a.addr);
        assert_eq!(scan_ahead, Some(region.addr() + 48 * PAGE_SIZE));
        // A fault that continues no scan leaves it to do.
        resolve(&space.inner, at(255), &mut ahead, &Arc::default()).unwrap();
        assert_eq!(ahead.map(|a| a.addr), scan_ahead);
        assert_eq!(dev.migrate_to_ram_calls.load(Ordering::SeqCst), 3);
    }
}
