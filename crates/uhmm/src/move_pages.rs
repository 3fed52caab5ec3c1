//! `move_pages(2)` for uhmm: a per-page call that moves each listed page to
//! a target — RAM or a device — or, without targets, reports where each page
//! is, with a status per page.
//!
//! This module owns [`move_pages`], its targets ([`MoveTarget`], the
//! kernel's `nodes[]`) and its statuses ([`MoveStatus`], the kernel's
//! `status[]`, with the kernel's encoding in [`MoveStatus::to_raw`]). It
//! builds on the migration steps (`migrate.rs`): nothing here touches a
//! page table entry except through a [`Migration`] or a driver's
//! `migrate_to_ram`.
//!
//! How a move runs:
//!
//! 1. Each address is rounded down to its page and classified without
//!    faulting anything (the residency of [`AddressSpace::snapshot`] plus the
//!    page lock). Pages already at their target, holes, poisoned pages,
//!    locked pages and unmanaged addresses are decided here.
//! 2. Pages on a device that must leave it (to RAM, or to another device)
//!    come back through that device's driver, as a CPU fault would bring
//!    them: [`DevicePagemapOps::migrate_to_ram`]
//!    with a fault window covering a run of consecutive listed pages.
//! 3. Pages in RAM bound for a device move in batches: consecutive listed
//!    pages (contiguous addresses, one region, one target, at most
//!    [`BATCH_PAGES`]) share one [`Migration`] that the
//!    target driver fills with
//!    [`DevicePagemapOps::alloc_and_copy`].
//!
//! A device → device move therefore goes through RAM, as the kernel's
//! device-private memory does.

use std::collections::HashMap;
use std::sync::Arc;

use crate::driver::DevicePagemapOps;
use crate::migrate::CpuFault;
use crate::migrate::{MigrateDst, MigrateSrc, Migration, Select};
use crate::mm::{AddressSpace, Residency};
use crate::pagemap::DevicePagemap;
use crate::pte::State;
use crate::staging::BATCH_PAGES;
use crate::vma::{Backing, Prot, Vma};
use crate::{Error, ErrorKind, Result};
use uhmm_sys::PAGE_SIZE;

/// Where [`move_pages`] should put a page (the kernel's `nodes[i]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoveTarget {
    /// System memory.
    Ram,
    /// The device memory of the pagemap with this id
    /// ([`DevicePagemap::id`]).
    Device(u16),
}

impl MoveTarget {
    /// The target for the device that owns `pagemap`.
    pub fn device(pagemap: &DevicePagemap) -> MoveTarget {
        MoveTarget::Device(pagemap.id())
    }
}

/// What [`move_pages`] says of one page (the kernel's `status[i]`).
///
/// The first two say where the page is (after the move, when moving); the
/// others say why it is not at its target. [`MoveStatus::to_raw`] gives the
/// kernel's encoding: a node id for a place, a negative errno for a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoveStatus {
    /// In system memory (node 0).
    Ram,
    /// On the device of the pagemap with this id (node `id + 1`).
    Device(u16),
    /// Not present: a hole or the shared zero page; nothing to move, and a
    /// move does not populate it (`-ENOENT`; the kernel says `-EFAULT` of
    /// the zero page, which uhmm counts as a hole).
    NotPresent,
    /// Locked by a migration or a device access, pinned, or in a mapping
    /// that never migrates (shared or file-backed): not moved (`-EBUSY`).
    Busy,
    /// The target device (or RAM, coming back from a device) had no memory
    /// for it: not moved (`-ENOMEM`).
    NoMemory,
    /// Not a managed address, or no read access to it (`-EFAULT`).
    Invalid,
    /// The page's data is lost; accesses get SIGBUS (`-EHWPOISON`).
    Poisoned,
}

impl MoveStatus {
    /// Whether the status is a place (RAM or a device) rather than a failure.
    pub fn is_ok(self) -> bool {
        matches!(self, MoveStatus::Ram | MoveStatus::Device(_))
    }

    /// The (positive) errno of a failure; `None` for a place.
    pub fn errno(self) -> Option<i32> {
        use rustix::io::Errno;
        let e = match self {
            MoveStatus::Ram | MoveStatus::Device(_) => return None,
            MoveStatus::NotPresent => Errno::NOENT,
            MoveStatus::Busy => Errno::BUSY,
            MoveStatus::NoMemory => Errno::NOMEM,
            MoveStatus::Invalid => Errno::FAULT,
            MoveStatus::Poisoned => Errno::HWPOISON,
        };
        Some(e.raw_os_error())
    }

    /// The kernel's status word: the node id of a place (RAM is node 0,
    /// the device of pagemap `id` is node `id + 1`), or `-errno`.
    pub fn to_raw(self) -> i32 {
        match self {
            MoveStatus::Ram => 0,
            MoveStatus::Device(id) => i32::from(id) + 1,
            s => -s.errno().expect("failures have an errno"),
        }
    }

    /// The status a [`to_raw`](MoveStatus::to_raw) word stands for; `None`
    /// for a word no status encodes to.
    pub fn from_raw(raw: i32) -> Option<MoveStatus> {
        if raw >= 0 {
            return match raw {
                0 => Some(MoveStatus::Ram),
                n => u16::try_from(n - 1).ok().map(MoveStatus::Device),
            };
        }
        [MoveStatus::NotPresent, MoveStatus::Busy, MoveStatus::NoMemory, MoveStatus::Invalid, MoveStatus::Poisoned]
            .into_iter()
            .find(|s| s.to_raw() == raw)
    }
}

/// Moves each page of `pages` to its target in `targets`, or, with `None`,
/// only reports where each page is (`move_pages(2)` with `nodes == NULL`).
/// Returns one status per entry of `pages`, in order.
///
/// Addresses need not be aligned: each is rounded down to its page, as the
/// kernel does. `targets` must be as long as `pages`; otherwise, or when a
/// target names no registered device, [`ErrorKind::InvalidArgument`] and
/// nothing is done.
///
/// With targets, a page not at its target moves there: from RAM through the
/// target driver's
/// [`alloc_and_copy`](crate::DevicePagemapOps::alloc_and_copy), from a
/// device through its driver's
/// [`migrate_to_ram`](crate::DevicePagemapOps::migrate_to_ram) (and on to
/// the target device, if that is where it goes). Statuses after a move:
/// its new place when it moved or was already there; [`MoveStatus::NotPresent`]
/// for a hole or zero page (never populated by a move, as in the kernel);
/// [`MoveStatus::Busy`] when it was locked, pinned or in a shared or file
/// mapping (only private anonymous memory migrates); [`MoveStatus::NoMemory`]
/// when the driver left it without a destination;
/// [`MoveStatus::Invalid`] for an unmanaged address or one without read
/// access; [`MoveStatus::Poisoned`] for a lost page. A page listed twice
/// goes to its last entry's target and every entry reports the outcome.
///
/// A driver error other than `NoMemory` or `Busy` (`Unsupported` from a
/// driver without [`alloc_and_copy`](crate::DevicePagemapOps::alloc_and_copy),
/// say) stops the call and is returned; pages handled before stay where
/// they went, as with [`migrate_chunked`](crate::migrate_chunked).
pub fn move_pages(space: &AddressSpace, pages: &[usize], targets: Option<&[MoveTarget]>) -> Result<Vec<MoveStatus>> {
    if targets.is_some_and(|t| t.len() != pages.len()) {
        return Err(Error::invalid("move_pages: targets and pages differ in length"));
    }
    let mut drivers: HashMap<u16, Driver> = HashMap::new();
    for t in targets.into_iter().flatten() {
        if let MoveTarget::Device(id) = *t
            && !drivers.contains_key(&id)
        {
            let pm = space.inner.pagemap(id).ok_or_else(|| Error::invalid("move_pages: no device with that id"))?;
            let ops = space.inner.driver(id).ok_or_else(|| Error::invalid("move_pages: the target device is gone"))?;
            drivers.insert(id, Driver { pagemap: pm, ops });
        }
    }

    let mut entries: Vec<Entry> = pages.iter().map(|&a| Entry::new(space, a)).collect();
    // A page listed more than once is decided by its last entry.
    let mut last: HashMap<usize, usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        if e.region.is_some() {
            last.insert(e.addr, i);
        }
    }
    let live: Vec<usize> = (0..entries.len()).filter(|&i| last.get(&entries[i].addr) == Some(&i)).collect();
    let seen = probe(space, &entries, &live)?;

    match targets {
        None => {
            for (&i, s) in live.iter().zip(seen) {
                entries[i].status = Some(status_of(s));
            }
        }
        Some(targets) => {
            let mut to_ram = Vec::new();
            let mut to_device = Vec::new();
            for (&i, s) in live.iter().zip(seen) {
                let anonymous = entries[i].region.as_ref().is_some_and(|r| r.backing == Backing::Anonymous);
                match plan(s, targets[i], anonymous) {
                    Plan::Done(status) => entries[i].status = Some(status),
                    Plan::ToRam(from) => to_ram.push((i, from)),
                    Plan::ToDevice => to_device.push(i),
                }
            }
            bring_back(space, &mut entries, &to_ram)?;
            // Where did the pages that left their device land?
            let back: Vec<usize> = to_ram.iter().map(|&(i, _)| i).filter(|&i| entries[i].status.is_none()).collect();
            let seen = probe(space, &entries, &back)?;
            for (&i, s) in back.iter().zip(seen) {
                match (status_of(s), targets[i]) {
                    (MoveStatus::Ram, MoveTarget::Device(_)) if !s.locked => to_device.push(i),
                    (MoveStatus::Ram, MoveTarget::Device(_)) => entries[i].status = Some(MoveStatus::Busy),
                    (status, _) => entries[i].status = Some(status),
                }
            }
            to_device.sort_unstable();
            to_devices(space, &mut entries, &to_device, targets, &drivers)?;
        }
    }

    Ok((0..entries.len())
        .map(|i| match (&entries[i].region, last.get(&entries[i].addr)) {
            // Every live entry was decided above; its duplicates share it.
            (Some(_), Some(&j)) => entries[j].status.unwrap_or(MoveStatus::Busy),
            _ => MoveStatus::Invalid,
        })
        .collect())
}

/// A target device: its pagemap and driver.
struct Driver {
    pagemap: Arc<DevicePagemap>,
    ops: Arc<dyn DevicePagemapOps>,
}

/// One entry of the list.
struct Entry {
    /// The page's address.
    addr: usize,
    /// Its region; `None` when unmanaged or without read access.
    region: Option<Arc<Vma>>,
    /// The final status, once decided.
    status: Option<MoveStatus>,
}

impl Entry {
    fn new(space: &AddressSpace, addr: usize) -> Entry {
        let addr = addr & !(PAGE_SIZE - 1);
        let region =
            space.inner.region_at(addr).filter(|r| r.prot_at((addr - r.start()) / PAGE_SIZE).contains(Prot::READ));
        Entry { addr, region, status: None }
    }

    fn idx(&self) -> usize {
        let r = self.region.as_ref().expect("managed page");
        (self.addr - r.start()) / PAGE_SIZE
    }

    /// Whether `next` is the page right after this one, in the same region.
    fn followed_by(&self, next: &Entry) -> bool {
        next.addr == self.addr + PAGE_SIZE
            && matches!((&self.region, &next.region), (Some(a), Some(b)) if Arc::ptr_eq(a, b))
    }
}

/// What a look at one page found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    residency: Residency,
    /// The page lock is held (a migration, a device access or a fault).
    locked: bool,
}

/// Looks at the entries `list` (managed pages) without faulting: one
/// snapshot per run of contiguous addresses.
fn probe(space: &AddressSpace, entries: &[Entry], list: &[usize]) -> Result<Vec<Seen>> {
    let mut out = Vec::with_capacity(list.len());
    for run in runs(list, |a, b| entries[b].addr == entries[a].addr + PAGE_SIZE, usize::MAX) {
        let start = entries[run[0]].addr;
        let snap = space.snapshot(start..start + run.len() * PAGE_SIZE)?;
        for (&i, s) in run.iter().zip(snap) {
            let e = &entries[i];
            let locked = e.region.as_ref().is_some_and(|r| r.pt.load(e.idx()).locked());
            out.push(Seen { residency: s.residency, locked });
        }
    }
    Ok(out)
}

/// Splits `list` into runs of neighbours (`next(a, b)`: `b` may follow `a`)
/// of at most `max` entries.
fn runs(list: &[usize], next: impl Fn(usize, usize) -> bool, max: usize) -> Vec<&[usize]> {
    let mut out = Vec::new();
    let mut start = 0;
    for k in 1..=list.len() {
        if k == list.len() || k - start >= max || !next(list[k - 1], list[k]) {
            out.push(&list[start..k]);
            start = k;
        }
    }
    out
}

/// Where a page is, as a status (the query of `move_pages`).
fn status_of(s: Seen) -> MoveStatus {
    match s.residency {
        Residency::Unmapped => MoveStatus::Invalid,
        // Locked and not present: in flight, unmapped by a migration.
        Residency::None | Residency::Zero if s.locked => MoveStatus::Busy,
        Residency::None | Residency::Zero => MoveStatus::NotPresent,
        Residency::Ram | Residency::Exclusive => MoveStatus::Ram,
        Residency::Device(p, _) | Residency::Coherent(p, _) => MoveStatus::Device(p.pagemap),
        Residency::Poisoned => MoveStatus::Poisoned,
    }
}

/// What to do with one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Nothing: this is its status.
    Done(MoveStatus),
    /// Bring it back from the device of this pagemap (then on to the target).
    ToRam(u16),
    /// Move it from RAM to its target device.
    ToDevice,
}

fn plan(s: Seen, target: MoveTarget, anonymous: bool) -> Plan {
    match (status_of(s), target) {
        (here @ MoveStatus::Ram, MoveTarget::Ram) => Plan::Done(here),
        (here @ MoveStatus::Device(d), MoveTarget::Device(t)) if d == t => Plan::Done(here),
        (MoveStatus::Ram | MoveStatus::Device(_), _) if s.locked || !anonymous => Plan::Done(MoveStatus::Busy),
        (MoveStatus::Ram, MoveTarget::Device(_)) => Plan::ToDevice,
        (MoveStatus::Device(d), _) => Plan::ToRam(d),
        (other, _) => Plan::Done(other),
    }
}

/// The status of a page a driver was asked to move and did not, after an
/// answer of `err` (`None`: it answered Ok).
fn not_moved(err: Option<ErrorKind>, locked: bool) -> MoveStatus {
    match err {
        Some(ErrorKind::Busy) => MoveStatus::Busy,
        Some(ErrorKind::NoMemory) => MoveStatus::NoMemory,
        _ if locked => MoveStatus::Busy,
        _ => MoveStatus::NoMemory,
    }
}

/// Brings the pages `list` (entry, the pagemap they are on) back to RAM
/// through their drivers' `migrate_to_ram`: one fault window per run of
/// consecutive pages on the same device. A driver may bring back only the
/// faulting page, so a page still away is asked for again as the faulting
/// address; one still away after that gets its status here.
fn bring_back(space: &AddressSpace, entries: &mut [Entry], list: &[(usize, u16)]) -> Result<()> {
    let idx: Vec<usize> = (0..list.len()).collect();
    let same_run = |a: usize, b: usize| list[a].1 == list[b].1 && entries[list[a].0].followed_by(&entries[list[b].0]);
    let groups: Vec<Vec<usize>> = runs(&idx, same_run, BATCH_PAGES).into_iter().map(<[usize]>::to_vec).collect();
    for run in groups {
        let from = list[run[0]].1;
        let ops = space.inner.driver(from);
        let end = entries[list[*run.last().expect("runs are not empty")].0].addr + PAGE_SIZE;
        for &k in &run {
            let i = list[k].0;
            let region = entries[i].region.clone().expect("managed page");
            let entry = region.pt.load(entries[i].idx());
            let State::Device(page) = entry.state() else {
                continue; // already back
            };
            if page.pagemap != from {
                continue; // moved meanwhile; the next look says where
            }
            if entry.locked() {
                entries[i].status = Some(MoveStatus::Busy);
                continue;
            }
            let Some(ops) = &ops else {
                // The device is gone with the page on it.
                entries[i].status = Some(MoveStatus::Invalid);
                continue;
            };
            let addr = entries[i].addr;
            let fault = CpuFault::new(space.clone(), addr, addr..end, page);
            let err = match ops.migrate_to_ram(&fault) {
                Ok(()) => None,
                Err(e) if matches!(e.kind(), ErrorKind::Busy | ErrorKind::NoMemory) => Some(e.kind()),
                Err(e) => return Err(e),
            };
            let after = region.pt.load(entries[i].idx());
            if after.state() == State::Device(page) {
                entries[i].status = Some(not_moved(err, after.locked()));
            }
        }
    }
    Ok(())
}

/// Moves the RAM pages `list` (in list order) to their target devices: one
/// migration per run of consecutive pages with the same target.
fn to_devices(
    space: &AddressSpace,
    entries: &mut [Entry],
    list: &[usize],
    targets: &[MoveTarget],
    drivers: &HashMap<u16, Driver>,
) -> Result<()> {
    let same_run = |a: usize, b: usize| targets[a] == targets[b] && entries[a].followed_by(&entries[b]);
    let groups: Vec<Vec<usize>> = runs(list, same_run, BATCH_PAGES).into_iter().map(<[usize]>::to_vec).collect();
    for run in groups {
        let MoveTarget::Device(t) = targets[run[0]] else {
            unreachable!("only device targets move from RAM");
        };
        let driver = &drivers[&t];
        let start = entries[run[0]].addr;
        let mut set = |status: &dyn Fn(usize) -> MoveStatus| {
            for (k, &i) in run.iter().enumerate() {
                entries[i].status = Some(status(k));
            }
        };
        let mut m =
            match Migration::setup(space, start..start + run.len() * PAGE_SIZE, Select::SYSTEM, driver.pagemap.owner())
            {
                Ok(m) => m,
                Err(e) => match e.kind() {
                    // The region is being unmapped.
                    ErrorKind::NotFound | ErrorKind::InvalidArgument => {
                        set(&|_| MoveStatus::Invalid);
                        continue;
                    }
                    ErrorKind::NoMemory | ErrorKind::Busy => {
                        let s = not_moved(Some(e.kind()), false);
                        set(&|_| s);
                        continue;
                    }
                    _ => return Err(e),
                },
            };
        let skipped: Vec<bool> = (0..run.len()).map(|k| matches!(m.src(k), MigrateSrc::Skip)).collect();
        if let Err(e) = driver.ops.alloc_and_copy(&mut m) {
            drop(m); // restores every page
            if !matches!(e.kind(), ErrorKind::NoMemory | ErrorKind::Busy) {
                return Err(e);
            }
            let s = not_moved(Some(e.kind()), false);
            set(&|k| if skipped[k] { MoveStatus::Busy } else { s });
            continue;
        }
        let m = m.pages();
        driver.ops.finalize_and_map(&m);
        set(&|k| match (skipped[k], m.migrated(k), m.dst(k)) {
            (true, _, _) => MoveStatus::Busy,
            (false, true, MigrateDst::Device(p)) => MoveStatus::Device(p.pagemap),
            (false, true, MigrateDst::System | MigrateDst::Zero) => MoveStatus::Ram,
            (false, true, MigrateDst::Error) => MoveStatus::Poisoned,
            (false, _, _) => MoveStatus::NoMemory,
        });
        m.finalize();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::{DevicePage, DevicePfn, Owner};

    fn seen(residency: Residency, locked: bool) -> Seen {
        Seen { residency, locked }
    }

    fn on(pagemap: u16) -> Residency {
        Residency::Device(DevicePage { pagemap, pfn: DevicePfn(7) }, Owner::new())
    }

    #[test]
    fn raw_status_is_the_kernels() {
        assert_eq!(MoveStatus::Ram.to_raw(), 0);
        assert_eq!(MoveStatus::Device(0).to_raw(), 1);
        assert_eq!(MoveStatus::Device(4).to_raw(), 5);
        assert_eq!(MoveStatus::NotPresent.to_raw(), -2);
        assert_eq!(MoveStatus::Busy.to_raw(), -16);
        assert_eq!(MoveStatus::NoMemory.to_raw(), -12);
        assert_eq!(MoveStatus::Invalid.to_raw(), -14);
        assert_eq!(MoveStatus::Poisoned.to_raw(), -133);
        assert_eq!(MoveStatus::Busy.errno(), Some(16));
        assert_eq!(MoveStatus::Device(3).errno(), None);
        assert!(MoveStatus::Device(3).is_ok() && MoveStatus::Ram.is_ok() && !MoveStatus::Busy.is_ok());
        for s in [
            MoveStatus::Ram,
            MoveStatus::Device(0),
            MoveStatus::Device(u16::MAX),
            MoveStatus::NotPresent,
            MoveStatus::Busy,
            MoveStatus::NoMemory,
            MoveStatus::Invalid,
            MoveStatus::Poisoned,
        ] {
            assert_eq!(MoveStatus::from_raw(s.to_raw()), Some(s), "{s:?}");
        }
        assert_eq!(MoveStatus::from_raw(-22), None);
        assert_eq!(MoveStatus::from_raw(i32::from(u16::MAX) + 2), None);
    }

    #[test]
    fn query_reports_place_or_why_not() {
        assert_eq!(status_of(seen(Residency::Ram, false)), MoveStatus::Ram);
        assert_eq!(status_of(seen(Residency::Ram, true)), MoveStatus::Ram);
        assert_eq!(status_of(seen(on(2), true)), MoveStatus::Device(2));
        assert_eq!(status_of(seen(Residency::None, false)), MoveStatus::NotPresent);
        assert_eq!(status_of(seen(Residency::Zero, false)), MoveStatus::NotPresent);
        assert_eq!(status_of(seen(Residency::None, true)), MoveStatus::Busy, "in flight");
        assert_eq!(status_of(seen(Residency::Unmapped, false)), MoveStatus::Invalid);
        assert_eq!(status_of(seen(Residency::Poisoned, false)), MoveStatus::Poisoned);
    }

    #[test]
    fn plans() {
        use MoveTarget::{Device, Ram};
        let p = |r, locked, t, anon| plan(seen(r, locked), t, anon);
        assert_eq!(p(Residency::Ram, false, Ram, true), Plan::Done(MoveStatus::Ram));
        assert_eq!(p(Residency::Ram, false, Device(1), true), Plan::ToDevice);
        assert_eq!(p(Residency::Ram, true, Device(1), true), Plan::Done(MoveStatus::Busy));
        assert_eq!(p(Residency::Ram, false, Device(1), false), Plan::Done(MoveStatus::Busy), "shared/file");
        assert_eq!(p(Residency::Ram, true, Ram, false), Plan::Done(MoveStatus::Ram), "already there");
        assert_eq!(p(on(1), false, Device(1), true), Plan::Done(MoveStatus::Device(1)));
        assert_eq!(p(on(1), false, Device(2), true), Plan::ToRam(1));
        assert_eq!(p(on(1), false, Ram, true), Plan::ToRam(1));
        assert_eq!(p(on(1), true, Ram, true), Plan::Done(MoveStatus::Busy));
        assert_eq!(p(Residency::None, false, Device(1), true), Plan::Done(MoveStatus::NotPresent));
        assert_eq!(p(Residency::Zero, false, Device(1), true), Plan::Done(MoveStatus::NotPresent));
        assert_eq!(p(Residency::None, true, Ram, true), Plan::Done(MoveStatus::Busy));
        assert_eq!(p(Residency::Poisoned, false, Ram, true), Plan::Done(MoveStatus::Poisoned));
    }

    #[test]
    fn runs_split_on_gaps_and_size() {
        let next = |a: usize, b: usize| b == a + 1;
        let list = [1, 2, 3, 5, 6, 7, 8];
        assert_eq!(runs(&list, next, usize::MAX), vec![&[1, 2, 3][..], &[5, 6, 7, 8][..]]);
        assert_eq!(runs(&list, next, 2), vec![&[1, 2][..], &[3][..], &[5, 6][..], &[7, 8][..]]);
        assert!(runs(&[], next, 4).is_empty());
        assert_eq!(not_moved(None, true), MoveStatus::Busy);
        assert_eq!(not_moved(None, false), MoveStatus::NoMemory);
        assert_eq!(not_moved(Some(ErrorKind::Busy), false), MoveStatus::Busy);
    }
}
