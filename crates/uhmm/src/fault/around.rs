//! A device fault's window and the read-ahead after it: the pages a fault
//! on device memory asks its driver to bring back (the window of
//! [`ScanWindow`](crate::fault::window::ScanWindow), clipped to one
//! protection run and mapped pages), and the windows an idle handler
//! brings back ahead of a sequential scan.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::fault::serving::Serving;
use crate::fault::window::Scan;
use crate::migrate::CpuFault;
use crate::mm::{AddressSpace, Mm};
use crate::page::DevicePage;
use crate::pte::State;
use crate::stats::Stats;
use crate::vma::Vma;

/// A read-ahead to do: the page where a sequential scan comes next, how
/// many windows may still be brought back before the scan faults again,
/// and the space's `to_device_epoch` when the scan's fault was read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadAhead {
    pub(crate) addr: usize,
    pub(crate) windows: usize,
    pub(crate) read_at: u64,
}

/// The fault-around window for page `idx`
/// ([`ScanWindow`](crate::fault::window::ScanWindow)), clipped to the
/// region, to one protection run and to mapped pages; and, in a sequential
/// scan, the page the scan reaches next (for a read-ahead). With
/// `marker` (a scan's last read-ahead window, in a region of small pages:
/// page `idx`'s device page), the window leaves page `idx` on the device
/// as the scan's marker when the page after it in the scan's direction is
/// on the same device: that page and its address are returned, for the
/// migration to be asked for in place of `idx`'s.
pub(crate) fn fault_window(
    space: &Mm,
    region: &Vma,
    idx: usize,
    marker: Option<DevicePage>,
) -> (Range<usize>, Option<usize>, Option<(usize, DevicePage)>) {
    let (base, max) = (space.config.fault_around_pages, space.config.fault_around_max_pages);
    let in_ram_below = || (1..=idx.min(max)).take_while(|&k| region.pt.load(idx - k).state() == State::Cpu).count();
    let proposal = region.fault_around.propose(
        idx,
        region.start() / uhmm_sys::PAGE_SIZE,
        base,
        max,
        region.npages(),
        in_ram_below,
    );
    // Only pages a migration may take: one protection run, nothing unmapped.
    let mut pages = region
        .prot_runs(proposal.pages.clone())
        .into_iter()
        .find(|(r, _)| r.contains(&idx))
        .map_or(idx..idx + 1, |(r, _)| r);
    while pages.len() > 1 && region.has_unmapped(&pages) {
        pages = if region.has_unmapped(&(pages.start..idx)) {
            pages.start + 1..pages.end
        } else {
            pages.start..pages.end - 1
        };
    }
    region.fault_around.record(&proposal, &pages);
    let next = match proposal.scan {
        _ if proposal.on_marker => proposal.resume,
        Some(Scan::Up) => Some(pages.end).filter(|&i| i < region.npages()),
        Some(Scan::Down) => pages.start.checked_sub(1),
        None => None,
    };
    let mut instead = None;
    if let Some(marker) = marker.filter(|_| next.is_some() && !proposal.on_marker && !region.huge && pages.len() > 1) {
        let after = match proposal.scan {
            Some(Scan::Up) if pages.start == idx => Some(idx + 1),
            Some(Scan::Down) if pages.end == idx + 1 => Some(idx - 1),
            _ => None,
        };
        if let Some(after) = after {
            let entry = region.pt.load(after);
            if let (State::Device(page), false) = (entry.state(), entry.locked())
                && page.pagemap == marker.pagemap
            {
                pages = if after > idx { after..pages.end } else { pages.start..idx };
                region.fault_around.leave_marker(&proposal, idx);
                instead = Some((region.addr_of(after), page));
            }
        }
    }
    (region.addr_of(pages.start)..region.addr_of(pages.end), next, instead)
}

/// Brings back the window a sequential scan reaches next, at `addr`, as the
/// scan's fault there would, while the handler has nothing else to do: the
/// scan then reads one window while the next comes back, and takes fewer
/// faults. Does nothing where the page is not on a device or is locked (a
/// migration has it), nor once pages of the region moved to a device after
/// the scan's fault (the program is moving them: a read-ahead would undo
/// its migration); a failure is left to the scan's own fault. Sets `ahead`
/// to the window after, while `at` allows more.
pub(crate) fn read_ahead(space: &Arc<Mm>, at: ReadAhead, ahead: &mut Option<ReadAhead>, serving: &Arc<Serving>) {
    let addr = at.addr;
    let Some((region, idx)) = space.region_at(addr).and_then(|r| r.index_of(addr).map(|i| (r, i))) else {
        return;
    };
    if region.to_device_at.load(Ordering::SeqCst) > at.read_at {
        return;
    }
    let entry = region.pt.load(idx);
    let (State::Device(page), false) = (entry.state(), entry.locked()) else {
        return;
    };
    let Some(ops) = space.driver(page.pagemap) else {
        return;
    };
    let (window, next, instead) = fault_window(space, &region, idx, (at.windows == 1).then_some(page));
    let (addr, page) = instead.unwrap_or((addr, page));
    space.charge(window.len() / uhmm_sys::PAGE_SIZE);
    let _arriving = space.arriving(window.len() / uhmm_sys::PAGE_SIZE);
    Stats::add(&space.stats.migrate_to_ram, 1);
    Stats::add(&space.stats.read_aheads, 1);
    serving.begin(addr);
    let fault = CpuFault::new(AddressSpace::serving(space, serving), addr, window, page);
    match ops.migrate_to_ram(&fault) {
        Ok(()) if at.windows > 1 => {
            *ahead = next.map(|i| ReadAhead { addr: region.addr_of(i), windows: at.windows - 1, read_at: at.read_at });
        }
        Ok(()) => {}
        Err(err) => tracing::debug!(%err, addr, "read-ahead failed; the scan's own fault will retry"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_device::TestDev;
    use uhmm_sys::PAGE_SIZE;

    #[test]
    fn a_read_ahead_never_undoes_a_later_migration_to_a_device() {
        let space = crate::AddressSpace::new(crate::Config::default()).unwrap();
        let (region, dev) = TestDev::attach(&space, 4);
        // A scan's fault, read before the program moves the pages to the device.
        let ahead = |read_at| ReadAhead { addr: region.addr() + 2 * PAGE_SIZE, windows: 2, read_at };
        let before = ahead(space.inner.to_device_epoch.load(Ordering::SeqCst));
        assert_eq!(dev.to_device(&space, region.range()).migrated, 4);
        let on_device = |i| matches!(region.inner.pt.load(i).state(), State::Device(_));
        let mut next = None;
        read_ahead(&space.inner, before, &mut next, &Arc::default());
        assert_eq!(dev.migrate_to_ram_calls.load(Ordering::SeqCst), 0, "the migration is left alone");
        assert!((0..4).all(on_device) && next.is_none());
        // One from a fault read after the move brings its window back.
        read_ahead(&space.inner, ahead(space.inner.to_device_epoch.load(Ordering::SeqCst)), &mut next, &Arc::default());
        assert_eq!((dev.migrate_to_ram_calls.load(Ordering::SeqCst), space.stats().read_aheads), (1, 1));
        assert!(!on_device(2));
    }
}
