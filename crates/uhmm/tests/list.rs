//! `migrate_pages`, the list form of migration: listed pages only, batches
//! over scattered lists, busy pages retried in both modes, reasons for what
//! did not move, the allocation callback's `NoMemory` stop; and the two
//! scans a RAM policy uses (`resident`, `written`) and the fault path's
//! charge hook.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use common::TestDev;
use uhmm::{
    AddressSpace, ChargeOps, Config, Error, ErrorKind, MIGRATE_PASSES, MigrateMode, MigrateReason, Migration, NotMoved,
    PAGE_SIZE, Prot, Residency, Select, migrate_pages,
};

fn space(track_writes: bool) -> AddressSpace {
    AddressSpace::new(Config { track_writes, ..Config::default() }).expect("userfaultfd must be available")
}

fn page(region: &uhmm::Region, p: usize) -> usize {
    region.addr() + p * PAGE_SIZE
}

fn fill(region: &uhmm::Region, n: usize) {
    for p in 0..n {
        region.write(p * PAGE_SIZE, &vec![(p as u8).wrapping_add(1); PAGE_SIZE]).unwrap();
    }
}

fn check(region: &uhmm::Region, n: usize) {
    for p in 0..n {
        let mut b = vec![0; PAGE_SIZE];
        region.read(p * PAGE_SIZE, &mut b).unwrap();
        assert!(b.iter().all(|x| *x == (p as u8).wrapping_add(1)), "page {p}");
    }
}

fn on_device(space: &AddressSpace, addr: usize) -> bool {
    matches!(space.snapshot(addr..addr + PAGE_SIZE).unwrap()[0].residency, Residency::Device(..))
}

#[test]
fn only_listed_pages_move_in_batches_over_a_scattered_list() {
    let space = space(false);
    let dev = TestDev::new(&space);
    let n = 1200;
    let r = space.map(n * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, n);
    // Every third page, out of order and repeated, plus an unmanaged address.
    let mut list: Vec<usize> = (0..n).step_by(3).rev().map(|p| page(&r, p) + 17).collect();
    list.push(page(&r, 3));
    list.push(8 * PAGE_SIZE);
    let before = space.stats().migrations;
    let out =
        migrate_pages(&space, &list, Select::SYSTEM, dev.owner, MigrateMode::Async, MigrateReason::Reclaim, |m| {
            dev.copy_in(m);
            Ok(())
        })
        .unwrap();
    let listed: Vec<usize> = (0..n).step_by(3).map(|p| page(&r, p)).collect();
    assert_eq!(out.moved, listed);
    assert_eq!(out.not_moved, vec![(8 * PAGE_SIZE, NotMoved::Unmanaged)]);
    assert_eq!(out.passes, 1);
    // 400 pages spread over 1200: three batches of at most 512 pages' span, not 400 migrations.
    assert!(space.stats().migrations - before <= 4, "{} migrations", space.stats().migrations - before);
    for p in 0..n {
        assert_eq!(on_device(&space, page(&r, p)), p % 3 == 0, "page {p}");
    }
    check(&r, n);
}

#[test]
fn reasons_for_pages_that_did_not_move() {
    let space = space(false);
    let dev = TestDev::new(&space);
    let r = space.map(64 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 4); // pages 32.. never touched: holes
    assert_eq!(dev.to_device(&space, page(&r, 0)..page(&r, 1)).migrated, 1);
    let list = [page(&r, 0), page(&r, 1), page(&r, 2), page(&r, 40)];
    // RAM pages selected, but the callback sets a destination for page 2 only.
    let out = migrate_pages(&space, &list, Select::SYSTEM, dev.owner, MigrateMode::Sync, MigrateReason::User, |m| {
        for i in 0..m.npages() {
            if m.addr(i) == Some(page(&r, 2)) {
                let page = dev.alloc(vec![3; PAGE_SIZE]);
                m.set_dst_device(i, page)?;
            }
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(out.moved, vec![page(&r, 2)]);
    assert_eq!(
        out.not_moved,
        vec![
            (page(&r, 0), NotMoved::NotSelected),
            (page(&r, 1), NotMoved::NoDestination),
            (page(&r, 40), NotMoved::NotPresent)
        ]
    );
    check(&r, 4);
}

#[test]
fn busy_pages_are_retried_async_then_given_up() {
    let space = space(false);
    let dev = TestDev::new(&space);
    let r = space.map(4 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 4);
    // Another migration holds page 1 for the whole call.
    let holder = Migration::setup(&space, page(&r, 1)..page(&r, 2), Select::SYSTEM, dev.owner).unwrap();
    let list = [page(&r, 0), page(&r, 1), page(&r, 2)];
    let calls = AtomicUsize::new(0);
    let out =
        migrate_pages(&space, &list, Select::SYSTEM, dev.owner, MigrateMode::Async, MigrateReason::Reclaim, |m| {
            calls.fetch_add(1, Ordering::Relaxed);
            dev.copy_in(m);
            Ok(())
        })
        .unwrap();
    assert_eq!(out.moved, vec![page(&r, 0), page(&r, 2)]);
    assert_eq!(out.not_moved, vec![(page(&r, 1), NotMoved::Busy)]);
    assert_eq!(out.passes, MIGRATE_PASSES);
    assert_eq!(calls.load(Ordering::Relaxed), MIGRATE_PASSES);
    drop(holder);
    check(&r, 4);
}

#[test]
fn sync_mode_waits_for_a_lock_released_meanwhile() {
    let space = space(false);
    let dev = TestDev::new(&space);
    let r = space.map(4 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 4);
    let holder = Migration::setup(&space, page(&r, 1)..page(&r, 2), Select::SYSTEM, dev.owner).unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(2));
        drop(holder);
    });
    let out = migrate_pages(
        &space,
        &[page(&r, 1)],
        Select::SYSTEM,
        dev.owner,
        MigrateMode::Sync,
        MigrateReason::Compaction,
        |m| {
            dev.copy_in(m);
            Ok(())
        },
    )
    .unwrap();
    release.join().unwrap();
    // Released 2 ms in, within the sync mode's 25 ms of waiting (a busy
    // machine may delay the release past it: then the page is busy).
    // (A busy machine may also start the call after the release: then the
    // first pass moves it.)
    match out.moved.as_slice() {
        [p] => assert_eq!(*p, page(&r, 1)),
        _ => {
            assert_eq!(out.not_moved, vec![(page(&r, 1), NotMoved::Busy)]);
            assert_eq!(out.passes, MIGRATE_PASSES);
        }
    }
    check(&r, 4);
}

#[test]
fn no_memory_stops_the_call_and_other_errors_are_returned() {
    let space = space(false);
    let dev = TestDev::new(&space);
    let n = 1100;
    let r = space.map(n * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, n);
    let list: Vec<usize> = (0..n).map(|p| page(&r, p)).collect();
    let mut batches = 0;
    let out =
        migrate_pages(&space, &list, Select::SYSTEM, dev.owner, MigrateMode::Async, MigrateReason::Reclaim, |m| {
            batches += 1;
            if batches == 2 {
                return Err(Error::new(ErrorKind::NoMemory, "device full"));
            }
            dev.copy_in(m);
            Ok(())
        })
        .unwrap();
    assert_eq!(out.moved.len(), 512);
    assert_eq!(out.not_moved.len(), n - 512);
    assert!(out.not_moved.iter().all(|(_, why)| *why == NotMoved::NoMemory));
    let err =
        migrate_pages(&space, &list, Select::SYSTEM, dev.owner, MigrateMode::Async, MigrateReason::Reclaim, |_| {
            Err(Error::invalid("driver bug"))
        })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    check(&r, n);
}

#[test]
fn promotion_brings_listed_device_pages_back() {
    let space = space(false);
    let dev = TestDev::new(&space);
    let r = space.map(16 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 16);
    assert_eq!(dev.to_device(&space, r.range()).migrated, 16);
    let list = [page(&r, 3), page(&r, 9)];
    let out = migrate_pages(
        &space,
        &list,
        Select::DEVICE_PRIVATE,
        dev.owner,
        MigrateMode::Sync,
        MigrateReason::Promotion,
        |m| dev.copy_out(m),
    )
    .unwrap();
    assert_eq!(out.moved, list.to_vec());
    for p in 0..16 {
        assert_eq!(on_device(&space, page(&r, p)), p != 3 && p != 9, "page {p}");
    }
    check(&r, 16);
}

#[test]
fn resident_and_written_runs() {
    let space = space(true);
    let dev = TestDev::new(&space);
    let r = space.map(64 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    let runs = |v: Vec<std::ops::Range<usize>>| -> Vec<(usize, usize)> {
        v.into_iter().map(|x| ((x.start - r.addr()) / PAGE_SIZE, (x.end - r.addr()) / PAGE_SIZE)).collect()
    };
    assert!(space.resident(r.range()).unwrap().is_empty());
    let mut b = [0; 1];
    r.load(32 * PAGE_SIZE, &mut b).unwrap(); // the zero page: not resident
    r.write(0, &[1; 16 * PAGE_SIZE]).unwrap();
    assert_eq!(runs(space.resident(r.range()).unwrap()), vec![(0, 16)]);
    // The first look finds every page written since it came in, and re-arms.
    assert_eq!(runs(space.written(r.range()).unwrap()), vec![(0, 16)]);
    assert!(space.written(r.range()).unwrap().is_empty());
    r.write(5 * PAGE_SIZE + 9, &[7]).unwrap();
    r.load(6 * PAGE_SIZE, &mut b).unwrap(); // a read is not a write
    assert_eq!(runs(space.written(r.range()).unwrap()), vec![(5, 6)]);
    // Pages that went to a device and came back count as written.
    dev.to_device(&space, page(&r, 8)..page(&r, 10));
    assert_eq!(runs(space.resident(r.range()).unwrap()), vec![(0, 8), (10, 16)]);
    r.load(8 * PAGE_SIZE, &mut b).unwrap();
    assert_eq!(b[0], 1);
    assert!(runs(space.written(r.range()).unwrap()).iter().any(|&(s, e)| s <= 8 && 8 < e));
    // Without track_writes: a typed refusal.
    let plain = self::space(false);
    let q = plain.map(PAGE_SIZE, Prot::READ_WRITE).unwrap();
    assert_eq!(plain.written(q.range()).unwrap_err().kind(), ErrorKind::Unsupported);
}

/// A charge hook that counts what it is asked.
struct Counting(AtomicUsize);

impl ChargeOps for Counting {
    fn charge(&self, pages: usize) {
        self.0.fetch_add(pages, Ordering::Relaxed);
    }
}

#[test]
fn faults_ask_the_charge_hook_before_bringing_pages_in() {
    let space = space(false);
    let dev = TestDev::new(&space);
    let hook = Arc::new(Counting(AtomicUsize::new(0)));
    space.set_charge(Some(Arc::downgrade(&hook) as Weak<dyn ChargeOps>));
    let r = space.map(64 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    r.write(0, &[1]).unwrap(); // a first touch
    let after_fill = hook.0.load(Ordering::Relaxed);
    assert!(after_fill >= 1);
    dev.to_device(&space, r.range());
    let mut b = [0; 1];
    r.load(0, &mut b).unwrap(); // a device fault
    assert_eq!(b[0], 1);
    assert!(hook.0.load(Ordering::Relaxed) > after_fill);
    // Cleared: asked no more.
    space.set_charge(None);
    let asked = hook.0.load(Ordering::Relaxed);
    r.write(40 * PAGE_SIZE, &[1]).unwrap();
    assert_eq!(hook.0.load(Ordering::Relaxed), asked);
}
