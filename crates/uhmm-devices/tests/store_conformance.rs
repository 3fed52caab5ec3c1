//! The kernel's HMM scenarios that make sense for a store-backed device (no
//! device reads or writes, no exclusive access: a store holds pages, it
//! does not compute on them), run against a store device over the
//! compressed store: C04–C06 migrate and fault back, C08 holes, C09 bad
//! arguments, C11 a writer racing migrations, C12 busy and pinned pages,
//! S03 fork, S09 release, S19 huge regions, S20 unmap and remap.

mod common;

use std::sync::Arc;

use common::*;
use uhmm::{AddressSpace, ErrorKind, MigrateSrc, Migration, PAGE_SIZE, PinKind, Prot, Residency, Select};
use uhmm_devices::compress::{CompressConfig, CompressStore};
use uhmm_devices::store::{PageStore, StoreDevice, StoreDeviceConfig};

fn store_device(space: &AddressSpace) -> (StoreDevice, Arc<CompressStore>) {
    let store = Arc::new(CompressStore::new(CompressConfig::default()).expect("store"));
    (StoreDevice::new(space, store.clone(), StoreDeviceConfig::default()).expect("device"), store)
}

/// Pages of `r` on a device.
fn on_device_pages(space: &AddressSpace, r: &uhmm::Region) -> usize {
    space.snapshot(r.range()).unwrap().iter().filter(|p| matches!(p.residency, Residency::Device(..))).count()
}

#[test]
fn c04_c05_c06_migrate_fault_back_and_migrate_again() {
    with_timeout(120, || {
        let space = space();
        let (dev, _store) = store_device(&space);
        for round in 0..10u32 {
            let r = map(&space, NPAGES);
            fill(&r, 0..NPAGES, |i| i + round);
            assert_eq!(dev.migrate_to_device(r.addr(), NPAGES).unwrap().moved, NPAGES, "round {round}");
            assert_eq!(on_device_pages(&space, &r), NPAGES);
            // The CPU reads the first half back, then the whole range
            // migrates again: half from RAM, half already there.
            let mut half = vec![0u8; r.len() / 2];
            r.read(0, &mut half).unwrap();
            assert_words(&half, |i| i + round);
            let moved = dev.migrate_to_device(r.addr(), NPAGES).unwrap();
            assert_eq!(moved.moved, NPAGES / 2, "only the pages in RAM move");
            assert_eq!(on_device_pages(&space, &r), NPAGES);
            assert_words(&cpu_read(&r), |i| i + round);
        }
        assert_eq!(dev.pages_in_use(), 0);
    });
}

#[test]
fn c08_holes_stay_holes_and_read_as_zeros() {
    with_timeout(60, || {
        let space = space();
        let (dev, store) = store_device(&space);
        let r = map(&space, NPAGES);
        let moved = dev.migrate_to_device(r.addr(), NPAGES).unwrap();
        assert_eq!((moved.moved, moved.holes), (0, NPAGES));
        assert_eq!(store.stats().orig_data_size, 0);
        assert!(cpu_read(&r).iter().all(|&b| b == 0));
    });
}

#[test]
fn c09_bad_arguments_change_nothing() {
    let space = space();
    let (dev, _store) = store_device(&space);
    let r = map(&space, 4);
    fill(&r, 0..4, |i| i);
    for (addr, n) in [(r.addr() + 1, 1), (r.addr(), 0), (usize::MAX & !(PAGE_SIZE - 1), 2)] {
        assert_eq!(dev.migrate_to_device(addr, n).unwrap_err().kind(), ErrorKind::InvalidArgument, "{addr:#x} {n}");
        assert_eq!(dev.migrate_to_system(addr, n).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }
    r.protect(0..PAGE_SIZE, Prot::NONE).unwrap();
    assert_eq!(dev.migrate_to_device(r.addr(), 4).unwrap_err().kind(), ErrorKind::InvalidArgument);
    r.protect(0..PAGE_SIZE, Prot::READ_WRITE).unwrap();
    assert_eq!(on_device_pages(&space, &r), 0);
    assert_words(&cpu_read(&r), |i| i);
}

#[test]
fn c11_a_writer_racing_migrations_loses_no_write() {
    with_timeout(300, || {
        const N: usize = 64;
        let space = space();
        let (dev, _store) = store_device(&space);
        let region = Arc::new(map(&space, N));
        let moved = writer_races_migrations(&region, N, || {
            let moved = dev.migrate_to_device(region.addr(), N).unwrap().moved;
            dev.migrate_to_system(region.addr(), N).unwrap();
            moved
        });
        assert!(moved > 0, "no migration ever happened");
    });
}

#[test]
fn c12_busy_and_pinned_pages_stay_and_the_rest_moves() {
    with_timeout(60, || {
        const N: usize = 16;
        let space = space();
        let (dev, _store) = store_device(&space);
        let r = map(&space, N);
        fill(&r, 0..N, |i| i);
        // Page 2 locked by another migration; page 5 pinned long-term.
        let at = |p: usize| r.addr() + p * PAGE_SIZE;
        let held = Migration::setup(&space, at(2)..at(3), Select::SYSTEM, uhmm::Owner::new()).unwrap();
        assert!(matches!(held.src(0), MigrateSrc::System(_)));
        let pin = space.pin(at(5)..at(6), PinKind::LongTerm).unwrap();
        let moved = dev.migrate_to_device(r.addr(), N).unwrap();
        assert_eq!((moved.moved, moved.busy, moved.pinned), (N - 2, 1, 1), "{moved:?}");
        drop(held);
        drop(pin);
        assert_words(&cpu_read(&r), |i| i);
    });
}

#[test]
fn s03_a_child_reads_the_parents_stored_pages() {
    if !isolated("s03_a_child_reads_the_parents_stored_pages") {
        return;
    }
    let space = space();
    let (dev, _store) = store_device(&space);
    let r = map(&space, NPAGES);
    fill(&r, 0..NPAGES, |i| i);
    dev.migrate_to_device(r.addr(), NPAGES).unwrap();
    // The fork brings the pages back first (the child inherits RAM).
    let code = fork_child(|| {
        let mine = AddressSpace::new(uhmm::Config::default()).map_err(|_| 2);
        let Ok(mine) = mine else { return 2 };
        let Ok(child) = mine.adopt(&r) else { return 3 };
        let mut buf = vec![0u8; child.len()];
        if child.read(0, &mut buf).is_err() {
            return 4;
        }
        i32::from((0..NPAGES * WORDS_PER_PAGE).any(|w| word(&buf, w) != w as u32)) * 5
    });
    assert_eq!(code, 0, "the child read the parent's data");
    assert_words(&cpu_load(&r), |i| i);
}

#[test]
fn s09_release_brings_every_page_back() {
    with_timeout(60, || {
        let space = space();
        let (dev, store) = store_device(&space);
        let r = map(&space, NPAGES);
        fill(&r, 0..NPAGES, |i| i);
        dev.migrate_to_device(r.addr(), NPAGES).unwrap();
        assert_eq!(dev.release().unwrap(), NPAGES);
        assert_eq!((dev.pages_in_use(), store.stats().objects), (0, 0));
        assert_eq!(on_device_pages(&space, &r), 0);
        assert_words(&cpu_read(&r), |i| i);
    });
}

#[test]
fn s19_huge_regions_round_trip() {
    with_timeout(60, || {
        let space = space();
        let (dev, _store) = store_device(&space);
        let n = 2 * 512;
        let r = space.map_huge(n * PAGE_SIZE, Prot::READ_WRITE).unwrap();
        fill(&r, 0..n, |i| i ^ 0x5a5a);
        assert_eq!(dev.migrate_to_device(r.addr(), n).unwrap().moved, n);
        assert_words(&cpu_read(&r), |i| i ^ 0x5a5a);
        dev.migrate_to_device(r.addr(), n).unwrap();
        assert_eq!(dev.migrate_to_system(r.addr(), n).unwrap(), n);
        assert_words(&cpu_read(&r), |i| i ^ 0x5a5a);
    });
}

#[test]
fn s20_unmap_part_and_remap_while_stored() {
    with_timeout(60, || {
        let space = space();
        let (dev, store) = store_device(&space);
        let r = map(&space, NPAGES);
        fill(&r, 0..NPAGES, |i| i);
        dev.migrate_to_device(r.addr(), NPAGES).unwrap();
        // Unmapping a quarter frees its stored pages.
        r.unmap(0..NPAGES / 4 * PAGE_SIZE).unwrap();
        assert_eq!(dev.pages_in_use(), NPAGES - NPAGES / 4);
        assert_eq!(store.usage().pages, (NPAGES - NPAGES / 4) as u64);
        let mut tail = vec![0u8; r.len() - NPAGES / 4 * PAGE_SIZE];
        r.read(NPAGES / 4 * PAGE_SIZE, &mut tail).unwrap();
        assert_words(&tail, |i| i + (NPAGES / 4 * WORDS_PER_PAGE) as u32);
        // A whole region on the store moves, and its pages come back at the
        // new address.
        let r2 = map(&space, NPAGES);
        fill(&r2, 0..NPAGES, |i| !i);
        dev.migrate_to_device(r2.addr(), NPAGES).unwrap();
        let old = r2.addr();
        assert_ne!(r2.remap().unwrap(), old);
        assert_words(&cpu_read(&r2), |i| !i);
        assert_eq!(on_device_pages(&space, &r2), 0);
    });
}
