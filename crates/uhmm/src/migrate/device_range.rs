//! `migrate_device_range`: evicting a device's pages back to RAM by device
//! page number, wherever they are mapped (a driver being unloaded).

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

use uhmm_sys::PAGE_SIZE;

use crate::fork::gate::InFlight;
use crate::migrate::{Collected, Few, Inner, MigrateDst, Migration, Page, Skip, Src};
use crate::mm::AddressSpace;
use crate::notifier::InvalidateEvent;
use crate::page::{DevicePage, DevicePfn};
use crate::pagemap::DevicePagemap;
use crate::pte::State;
use crate::vma::Vma;
use crate::{Error, Result};

/// Evicts device pages `pfns` of `pagemap` back to RAM, wherever they are
/// mapped (`migrate_device_range`): returns a migration whose sources are
/// the device pages that are mapped; the driver fills
/// [`Migration::system_dst`] for each and commits as usual. Pages that are
/// not mapped are not listed; a mapped page locked by someone else is
/// listed as skipped ([`Skip::Busy`], counted in the
/// summary's `busy`), for the caller to retry.
pub fn migrate_device_range(
    space: &AddressSpace,
    pagemap: &DevicePagemap,
    pfns: Range<u64>,
) -> Result<Migration<Collected>> {
    if pfns.end > pagemap.npages() || pfns.is_empty() {
        return Err(Error::invalid("device page range outside the pagemap"));
    }
    let serving = space.serving.clone();
    let space = &space.inner;
    space.check_usable()?;
    if !space.pagemap(pagemap.id()).is_some_and(|p| std::ptr::eq(&*p, pagemap)) {
        return Err(Error::invalid("the pagemap belongs to another address space"));
    }
    let in_flight = InFlight::enter();
    let mut regions: Few<Arc<Vma>> = Few::new();
    let mut pages = Few::new();
    for pfn in pfns {
        let pfn = DevicePfn(pfn);
        let Some((region_id, idx)) = pagemap.rmap(pfn) else {
            continue;
        };
        let region = match regions.iter().position(|r| r.id == region_id) {
            Some(k) => k,
            None => match space.region_by_id(region_id) {
                Some(r) => {
                    regions.push(r);
                    regions.len() - 1
                }
                None => continue,
            },
        };
        let page = DevicePage { pagemap: pagemap.id(), pfn };
        let r = &regions[region];
        let state = State::Device(page);
        let mut entry = Page {
            region: u32::try_from(region).expect("few regions"),
            idx,
            src: Src::Device(page),
            prior: state,
            dst: MigrateDst::None,
            copy_from: None,
            lent: false,
            scratch_at: None,
            migrated: false,
            skip: Skip::NotSelected,
        };
        // Best effort, as the kernel's trylock_page: waiting here while
        // holding other pages' locks could deadlock against an access that
        // locks in address order. A page still there but locked is listed
        // as busy, the caller's to retry; one that moved meanwhile is not
        // this device's any more.
        if !r.pt.try_lock_if(idx, state) {
            if r.pt.load(idx).state() == state {
                entry.src = Src::Skip;
                entry.skip = Skip::Busy;
                pages.push(entry);
            }
            continue;
        }
        let addr = r.addr_of(idx);
        drop(space.notifiers.invalidate(addr..addr + PAGE_SIZE, InvalidateEvent::Migrate { owner: pagemap.owner() }));
        pages.push(entry);
    }
    let mut inner = Inner::new(space.clone(), serving, regions, 0, in_flight);
    inner.pages = pages;
    // Coherent device pages are mapped: move them to staging, where the
    // driver reads them (`src_page`) and from where a restore puts them back.
    let mapped: Vec<usize> = (0..inner.pages.len())
        .filter(|&k| matches!(inner.pages[k].src, Src::Device(d) if space.is_coherent(&d)))
        .collect();
    if !mapped.is_empty() {
        let stage = space.stage.alloc(inner.pages.len())?;
        for k in mapped {
            let p = inner.pages[k];
            let from = &inner.regions[p.region as usize].map;
            let moved = space.uffd.move_pages(stage.addr(k), from, p.idx * PAGE_SIZE, PAGE_SIZE, false, true);
            // An error does not prove the page stayed (see unmap_system_into).
            if moved.is_err() && space.is_present(inner.regions[p.region as usize].addr_of(p.idx))? {
                inner.unlock_skip(k, Skip::Pinned);
            }
        }
        inner.stage = Some(stage);
    }
    inner.cpages = inner.pages.iter().filter(|p| p.src != Src::Skip).count();
    Ok(Migration { inner, _step: PhantomData })
}
