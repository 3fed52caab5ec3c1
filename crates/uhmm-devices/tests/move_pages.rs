//! `move_pages` (issue 3, item 12): per-page moves between RAM and sim
//! devices, and per-page queries, with a status per page.

mod common;

use std::sync::{Arc, Weak};

use common::*;
use uhmm::{
    AddressSpace, CpuFault, DevicePagemapOps, DevicePfn, ErrorKind, Migration, MoveStatus, MoveTarget, Owner,
    PAGE_SIZE, Pin, PinKind, Prot, Region, Residency, Select, move_pages,
};
use uhmm_devices::sim::SimDevice;

/// The address of page `p` of `region`.
fn at(region: &Region, p: usize) -> usize {
    region.addr() + p * PAGE_SIZE
}

fn pages(region: &Region, ps: impl IntoIterator<Item = usize>) -> Vec<usize> {
    ps.into_iter().map(|p| at(region, p)).collect()
}

fn on(dev: &SimDevice) -> MoveStatus {
    MoveStatus::Device(dev.pagemap().id())
}

fn to(dev: &SimDevice) -> MoveTarget {
    MoveTarget::device(dev.pagemap())
}

fn query(space: &AddressSpace, addrs: &[usize]) -> Vec<MoveStatus> {
    move_pages(space, addrs, None).unwrap()
}

#[test]
fn query_reports_where_pages_are() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        // First touch fills aligned windows of 16 pages: pages 0-15 are
        // RAM (0-3 data), 16-31 the zero page, 32-47 holes.
        let region = map(&space, 48);
        fill(&region, 0..4, |i| i);
        assert_eq!(dev.migrate_to_device(at(&region, 2), 2).unwrap().cpages, 2);
        let mut zero = [0u8; 8];
        region.read(20 * PAGE_SIZE, &mut zero).unwrap();
        let none = map(&space, 1);
        none.protect(0..none.len(), Prot::NONE).unwrap();
        let before = space.stats();
        let list = [
            at(&region, 0),
            at(&region, 1) + 123, // unaligned: rounded down
            at(&region, 2),
            at(&region, 3) + PAGE_SIZE - 1,
            at(&region, 40),
            at(&region, 20),
            PAGE_SIZE, // unmanaged
            none.addr(),
        ];
        let got = query(&space, &list);
        use MoveStatus::*;
        assert_eq!(got, vec![Ram, Ram, on(&dev), on(&dev), NotPresent, NotPresent, Invalid, Invalid]);
        let raw: Vec<i32> = got.iter().map(|s| s.to_raw()).collect();
        let id = i32::from(dev.pagemap().id());
        assert_eq!(raw, vec![0, 0, id + 1, id + 1, -2, -2, -14, -14]);
        // A query moves nothing.
        let after = space.stats();
        assert_eq!(after.migrations, before.migrations);
        assert_eq!(dev.pages_in_use(), 2);
        assert_eq!(space.snapshot(at(&region, 40)..at(&region, 41)).unwrap()[0].residency, Residency::None);
        assert_eq!(query(&space, &[]), vec![]);
        let buf = cpu_read(&region);
        assert_words(&buf[..4 * PAGE_SIZE], |i| i);
        assert!(buf[4 * PAGE_SIZE..].iter().all(|b| *b == 0));
    });
}

#[test]
fn mixed_list_moves_to_device_in_one_batch() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        // Pages 0-7 data, 8-15 zero-filled RAM, 16-31 the zero page, 32-47 holes.
        let region = map(&space, 48);
        fill(&region, 0..8, |i| i);
        let mut zero = [0u8; 8];
        region.read(20 * PAGE_SIZE, &mut zero).unwrap();
        let list = pages(&region, (0..8).chain([20, 21, 40, 41]));
        let before = space.stats().migrations;
        let got = move_pages(&space, &list, Some(&[to(&dev); 12])).unwrap();
        let mut want = vec![on(&dev); 8];
        want.extend([MoveStatus::NotPresent; 4]);
        assert_eq!(got, want, "RAM pages move; zero pages and holes stay, as with the kernel's -ENOENT");
        assert_eq!(space.stats().migrations - before, 1, "eight contiguous pages, one migration");
        assert_eq!(dev.pages_in_use(), 8);
        let snap = space.snapshot(at(&region, 20)..at(&region, 22)).unwrap();
        assert!(snap.iter().all(|s| s.residency == Residency::Zero), "zero pages stay: {snap:?}");
        let snap = space.snapshot(at(&region, 40)..at(&region, 42)).unwrap();
        assert!(snap.iter().all(|s| s.residency == Residency::None), "holes not populated: {snap:?}");
        assert_eq!(query(&space, &list), want);
        // Moving again changes nothing.
        let again = space.stats().migrations;
        assert_eq!(move_pages(&space, &list, Some(&[to(&dev); 12])).unwrap(), want);
        assert_eq!(space.stats().migrations, again);
        // The device reads the right data without faulting.
        let mut buf = vec![0u8; 8 * PAGE_SIZE];
        assert_eq!(dev.read(region.addr(), 8, &mut buf).unwrap().faults, 0);
        assert_words(&buf, |i| i);
        let buf = cpu_read(&region);
        assert_words(&buf[..8 * PAGE_SIZE], |i| i);
        assert!(buf[8 * PAGE_SIZE..].iter().all(|b| *b == 0));
    });
}

#[test]
fn some_pages_come_back_to_ram() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, 8);
        fill(&region, 0..8, |i| i);
        assert_eq!(dev.migrate_to_device(region.addr(), 8).unwrap().cpages, 8);
        // Unordered, with a page that is already in RAM after the first one.
        let list = pages(&region, [5, 1, 3, 4]);
        let got = move_pages(&space, &list, Some(&[MoveTarget::Ram; 4])).unwrap();
        assert_eq!(got, vec![MoveStatus::Ram; 4]);
        assert_eq!(dev.pages_in_use(), 4);
        let all = query(&space, &pages(&region, 0..8));
        for (p, s) in all.iter().enumerate() {
            let home = if [1, 3, 4, 5].contains(&p) { MoveStatus::Ram } else { on(&dev) };
            assert_eq!(*s, home, "page {p}");
        }
        assert_words(&cpu_read(&region), |i| i);
    });
}

#[test]
fn device_to_device_goes_through_ram() {
    with_timeout(60, || {
        let space = space();
        let dev0 = device(&space);
        let dev1 = device(&space);
        let region = map(&space, 6);
        fill(&region, 0..6, |i| i.wrapping_mul(7));
        assert_eq!(dev0.migrate_to_device(region.addr(), 4).unwrap().cpages, 4);
        let list = pages(&region, [0, 1, 2, 3, 4, 5]);
        let targets = [to(&dev1), to(&dev1), to(&dev0), MoveTarget::Ram, to(&dev1), MoveTarget::Ram];
        let got = move_pages(&space, &list, Some(&targets)).unwrap();
        assert_eq!(got, vec![on(&dev1), on(&dev1), on(&dev0), MoveStatus::Ram, on(&dev1), MoveStatus::Ram]);
        assert_eq!((dev0.pages_in_use(), dev1.pages_in_use()), (1, 3));
        assert_eq!(query(&space, &list), got);
        let mut buf = vec![0u8; 2 * PAGE_SIZE];
        assert_eq!(dev1.read(region.addr(), 2, &mut buf).unwrap().faults, 0, "dev1 maps its new pages");
        assert_words(&buf, |i| i.wrapping_mul(7));
        assert_words(&cpu_read(&region), |i| i.wrapping_mul(7));
    });
}

#[test]
fn locked_and_pinned_pages_are_busy_and_untouched() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, 8);
        fill(&region, 0..8, |i| i);
        // Page 2 is locked by another migration, page 5 pinned, page 7 on
        // the device and locked by a migration bringing it back.
        let locked = Migration::setup(&space, at(&region, 2)..at(&region, 3), Select::SYSTEM, Owner::new()).unwrap();
        assert_eq!(locked.cpages(), 1);
        let pin: Pin = space.pin(at(&region, 5)..at(&region, 6), PinKind::LongTerm).unwrap();
        assert_eq!(dev.migrate_to_device(at(&region, 7), 1).unwrap().cpages, 1);
        let locked_dev =
            Migration::setup(&space, at(&region, 7)..at(&region, 8), Select::DEVICE_PRIVATE, dev.owner()).unwrap();
        assert_eq!(locked_dev.cpages(), 1);
        assert_eq!(query(&space, &pages(&region, [2, 5, 7])), vec![MoveStatus::Busy, MoveStatus::Ram, on(&dev)]);

        let list = pages(&region, 0..7);
        let got = move_pages(&space, &list, Some(&[to(&dev); 7])).unwrap();
        for (p, s) in got.iter().enumerate() {
            let want = if p == 2 || p == 5 { MoveStatus::Busy } else { on(&dev) };
            assert_eq!(*s, want, "page {p}");
        }
        assert_eq!(move_pages(&space, &[at(&region, 7)], Some(&[MoveTarget::Ram])).unwrap(), vec![MoveStatus::Busy]);
        assert_eq!(dev.pages_in_use(), 6);
        let mut w = [0u8; 4];
        region.read(5 * PAGE_SIZE, &mut w).unwrap();
        assert_eq!(u32::from_ne_bytes(w), (5 * WORDS_PER_PAGE) as u32, "the pinned page is intact");
        drop(locked_dev);
        assert_eq!(query(&space, &[at(&region, 7)]), vec![on(&dev)], "restored to the device");
        drop(locked);
        drop(pin);
        assert_eq!(query(&space, &[at(&region, 2)]), vec![MoveStatus::Ram]);
        assert_eq!(move_pages(&space, &pages(&region, [2, 5]), Some(&[to(&dev); 2])).unwrap(), vec![on(&dev); 2]);
        assert_words(&cpu_read(&region), |i| i);
    });
}

#[test]
fn bad_arguments_do_nothing() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, 4);
        fill(&region, 0..4, |i| i);
        let list = pages(&region, 0..4);
        let e = move_pages(&space, &list, Some(&[to(&dev); 3])).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let e = move_pages(&space, &list, Some(&[MoveTarget::Ram, to(&dev), MoveTarget::Device(999), to(&dev)]))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(dev.pages_in_use(), 0);
        assert_eq!(query(&space, &list), vec![MoveStatus::Ram; 4]);
        assert_eq!(move_pages(&space, &[], Some(&[])).unwrap(), vec![]);
    });
}

#[test]
fn out_of_device_memory_is_no_memory() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, 4);
        fill(&region, 0..4, |i| i);
        dev.fail_next_alloc();
        let list = pages(&region, 0..4);
        let got = move_pages(&space, &list, Some(&[to(&dev); 4])).unwrap();
        assert_eq!(got, vec![MoveStatus::NoMemory; 4]);
        assert_eq!(got[0].errno(), Some(12));
        assert_eq!(dev.pages_in_use(), 0);
        assert_eq!(query(&space, &list), vec![MoveStatus::Ram; 4]);
        // Coming back: the device finds no RAM page for the first one.
        assert_eq!(move_pages(&space, &list, Some(&[to(&dev); 4])).unwrap(), vec![on(&dev); 4]);
        dev.fail_next_alloc();
        let got = move_pages(&space, &list[..1], Some(&[MoveTarget::Ram])).unwrap();
        assert_eq!(got, vec![MoveStatus::NoMemory]);
        assert_eq!(move_pages(&space, &list, Some(&[MoveTarget::Ram; 4])).unwrap(), vec![MoveStatus::Ram; 4]);
        assert_words(&cpu_read(&region), |i| i);
    });
}

#[test]
fn duplicates_follow_the_last_entry() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, 2);
        fill(&region, 0..2, |i| i);
        let list = [at(&region, 0), at(&region, 1), at(&region, 0) + 8];
        let got = move_pages(&space, &list, Some(&[to(&dev), to(&dev), MoveTarget::Ram])).unwrap();
        assert_eq!(got, vec![MoveStatus::Ram, on(&dev), MoveStatus::Ram]);
        assert_words(&cpu_read(&region), |i| i);
    });
}

#[test]
fn shared_memory_never_moves() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let shared = space.map_shared(2 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
        shared.write(0, &[7u8; 16]).unwrap();
        let list = pages(&shared, 0..2);
        assert_eq!(query(&space, &list), vec![MoveStatus::Ram, MoveStatus::NotPresent]);
        let got = move_pages(&space, &list, Some(&[to(&dev); 2])).unwrap();
        assert_eq!(got, vec![MoveStatus::Busy, MoveStatus::NotPresent]);
        assert_eq!(move_pages(&space, &list[..1], Some(&[MoveTarget::Ram])).unwrap(), vec![MoveStatus::Ram]);
        assert_eq!(dev.pages_in_use(), 0);
    });
}

#[test]
fn lost_page_reports_poisoned() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, 2);
        fill(&region, 0..2, |i| i);
        assert_eq!(dev.migrate_to_device(region.addr(), 2).unwrap().cpages, 2);
        dev.poison_next_copy_back();
        let got = move_pages(&space, &pages(&region, 0..2), Some(&[MoveTarget::Ram; 2])).unwrap();
        assert_eq!(got, vec![MoveStatus::Poisoned, MoveStatus::Ram]);
        assert_eq!(got[0].to_raw(), -133);
        let mut buf = vec![0u8; PAGE_SIZE];
        region.read(PAGE_SIZE, &mut buf).unwrap();
        assert_words(&buf, |i| i + WORDS_PER_PAGE as u32);
    });
}

/// A driver with only the two duties every driver has.
struct NoMoves;

impl DevicePagemapOps for NoMoves {
    fn page_free(&self, _pfn: DevicePfn) {}

    fn migrate_to_ram(&self, _fault: &CpuFault) -> uhmm::Result<()> {
        Ok(())
    }
}

#[test]
fn driver_without_alloc_and_copy_is_unsupported() {
    with_timeout(60, || {
        let space = space();
        let ops = Arc::new(NoMoves);
        let weak: Weak<dyn DevicePagemapOps> = Arc::downgrade(&ops) as Weak<NoMoves>;
        let pm = space.register_pagemap(weak, Owner::new(), 16).unwrap();
        let region = map(&space, 2);
        fill(&region, 0..2, |i| i);
        let e = move_pages(&space, &pages(&region, 0..2), Some(&[MoveTarget::device(&pm); 2])).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert_eq!(query(&space, &pages(&region, 0..2)), vec![MoveStatus::Ram; 2], "restored");
        assert_words(&cpu_read(&region), |i| i);
        space.unregister_pagemap(&pm).unwrap();
    });
}
