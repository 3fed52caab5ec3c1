//! The Core conformance scenarios C01–C13 (CONFORMANCE.md): the kernel's
//! `hmm-tests.c` translated to uhmm and the sim device.

mod common;

use common::*;
use uhmm::{ErrorKind, MigrateSrc, Migration, Owner, PAGE_SIZE, PageState as Pte, Prot, Select, Skip};
use uhmm_devices::sim::PageState;
use uhmm_sys::pin::IoPin;

fn einval<T: std::fmt::Debug>(r: uhmm::Result<T>) {
    let e = r.expect_err("must fail");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert_eq!(e.errno(), 22);
}

#[test]
fn c01_open_close() {
    with_timeout(60, || {
        let space = space();
        let watch = space.handler_watch();
        assert_eq!(watch.alive(), space.config().handler_threads);
        let dev = device(&space);
        let region = map(&space, NPAGES);
        fill(&region, 0..NPAGES, |i| i);
        dev.migrate_to_device_all(region.addr(), NPAGES).unwrap();
        drop(region);
        assert_eq!(dev.pages_in_use(), 0, "unmapping the region frees its device pages");
        drop(dev);
        drop(space);
        // A handler busy with an event at that moment holds the space until
        // it is done, then stops (seen under a CPU hog: one still alive
        // right after the drop).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while watch.alive() > 0 {
            assert!(std::time::Instant::now() < deadline, "handler threads must stop when the space is dropped");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    });
}

#[test]
fn c02_anon_read() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, NPAGES);
        fill(&region, 2..NPAGES, |i| i);
        let mut b = [0u8; 4];
        region.read(PAGE_SIZE, &mut b).unwrap(); // page 1: zero page
        region.protect(0..region.len(), Prot::READ).unwrap();
        let mut buf = vec![0xAAu8; region.len()];
        let c = dev.read(region.addr(), NPAGES, &mut buf).unwrap();
        assert_eq!(c.cpages, NPAGES);
        assert_eq!(c.faults, 1);
        assert_words(&buf, |i| if (i as usize) < 2 * WORDS_PER_PAGE { 0 } else { i });
    });
}

#[test]
fn c03_anon_write() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, NPAGES);
        let buf = pattern(NPAGES, |i| i);
        let c = dev.write(region.addr(), NPAGES, &buf).unwrap();
        assert_eq!(c.cpages, NPAGES);
        assert_eq!(c.faults, 1);
        assert_words(&cpu_read(&region), |i| i);
    });
}

#[test]
fn c04_migrate() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, NPAGES);
        fill(&region, 0..NPAGES, |i| i);
        let c = dev.migrate_to_device_all(region.addr(), NPAGES).unwrap();
        assert_eq!(c.cpages, NPAGES);
        let snap = dev.snapshot(region.addr(), NPAGES).unwrap();
        assert!(snap.iter().all(|s| *s == PageState::DEV_PRIVATE_LOCAL | PageState::WRITE), "{:?}", &snap[..4]);
        let mut buf = vec![0u8; region.len()];
        let c = dev.read(region.addr(), NPAGES, &mut buf).unwrap();
        assert_eq!(c.faults, 0, "pages on the device need no fault");
        assert_words(&buf, |i| i);
        assert_words(&cpu_read(&region), |i| i);
    });
}

#[test]
fn c05_migrate_fault() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, NPAGES);
        fill(&region, 0..NPAGES, |i| i);
        assert_eq!(dev.migrate_to_device_all(region.addr(), NPAGES).unwrap().cpages, NPAGES);
        let mut half = vec![0u8; region.len() / 2];
        region.read(0, &mut half).unwrap(); // CPU faults the first half back
        assert_words(&half, |i| i);
        assert!(space.stats().migrate_to_ram > 0, "CPU reads must fault pages back");
        let snap = dev.snapshot(region.addr(), NPAGES).unwrap();
        assert!(snap[..NPAGES / 2].iter().all(|s| *s == PageState::WRITE));
        assert!(snap[NPAGES / 2..].iter().all(|s| s.contains(PageState::DEV_PRIVATE_LOCAL)));
        assert_eq!(dev.migrate_to_device_all(region.addr(), NPAGES).unwrap().cpages, NPAGES);
        let mut buf = vec![0u8; region.len()];
        dev.read(region.addr(), NPAGES, &mut buf).unwrap();
        assert_words(&buf, |i| i);
        assert_words(&cpu_read(&region), |i| i);
    });
}

/// C05 with the first half read in the orders a `memcpy` may use (forward,
/// backward, its last page first, 64 KiB pieces from either end): whatever
/// the order, faults bring back no page of the half left unread, since
/// fault-around windows stay inside the 2 MiB block that faulted.
#[test]
fn c05_migrate_fault_in_any_read_order() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let half = NPAGES / 2;
        let forward: Vec<usize> = (0..half).collect();
        let backward: Vec<usize> = (0..half).rev().collect();
        let last_first: Vec<usize> = std::iter::once(half - 1).chain(0..half - 1).collect();
        let pieces: Vec<usize> = (0..half / 16).flat_map(|k| [k * 16, half - 16 * (k + 1)]).collect();
        for (name, order) in
            [("forward", forward), ("backward", backward), ("last first", last_first), ("pieces", pieces)]
        {
            let region = on_device(&space, &dev, NPAGES);
            for &p in &order {
                let mut word = [0u8; 4];
                region.read(p * PAGE_SIZE, &mut word).unwrap();
                assert_eq!(u32::from_ne_bytes(word) as usize, p * WORDS_PER_PAGE, "{name}: page {p}");
            }
            let snap = dev.snapshot(region.addr(), NPAGES).unwrap();
            let back = snap[half..].iter().filter(|s| !s.contains(PageState::DEV_PRIVATE_LOCAL)).count();
            assert_eq!(back, 0, "{name}: pages of the unread half brought back");
        }
    });
}

#[test]
fn c06_migrate_multiple() {
    with_timeout(120, || {
        let space = space();
        let dev = device(&space);
        for round in 0..10u32 {
            let region = map(&space, NPAGES);
            fill(&region, 0..NPAGES, |i| i ^ round);
            let c = dev.migrate_to_device_all(region.addr(), NPAGES).unwrap();
            assert_eq!(c.cpages, NPAGES, "round {round}");
            assert_words(&cpu_read(&region), |i| i ^ round);
        }
    });
}

#[test]
fn c07_anon_read_multiple() {
    with_timeout(120, || {
        let space = space();
        let dev = device(&space);
        for c in 0..10u32 {
            let region = map(&space, NPAGES);
            fill(&region, 0..NPAGES, |i| i + c);
            let mut buf = vec![0u8; region.len()];
            let r = dev.read(region.addr(), NPAGES, &mut buf).unwrap();
            assert_eq!(r.cpages, NPAGES);
            assert_eq!(r.faults, 1);
            assert_words(&buf, |i| i + c);
        }
    });
}

#[test]
fn c08_migrate_holes() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, NPAGES);
        let owner = dev.owner();
        {
            let m = Migration::setup(&space, region.range(), Select::SYSTEM, owner).unwrap();
            assert_eq!(m.cpages(), NPAGES);
            assert!((0..NPAGES).all(|i| matches!(m.src(i), MigrateSrc::Hole)), "every page is a hole");
        }
        let c = dev.migrate_to_device_all(region.addr(), NPAGES).unwrap();
        assert_eq!(c.cpages, NPAGES);
        let mut buf = vec![0xFFu8; region.len()];
        dev.read(region.addr(), NPAGES, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0), "new device pages are zero-filled");
        assert!(cpu_read(&region).iter().all(|b| *b == 0));
        assert_eq!(region.state(0), Some(Pte::Cpu));
    });
}

#[test]
fn c09_bad_arguments() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let owner = dev.owner();
        let a = map(&space, 16);
        let b = map(&space, 16);
        fill(&a, 0..16, |i| i);
        let before = space.snapshot(a.range()).unwrap();
        einval(Migration::setup(&space, a.addr()..a.addr(), Select::SYSTEM, owner));
        einval(Migration::setup(&space, 0x1000..0x3000, Select::SYSTEM, owner));
        let (lo, hi) = if a.addr() < b.addr() { (&a, &b) } else { (&b, &a) };
        einval(Migration::setup(&space, lo.addr()..hi.addr() + PAGE_SIZE, Select::SYSTEM, owner));
        einval(Migration::setup(
            &space,
            lo.addr() + lo.len() - PAGE_SIZE..lo.addr() + lo.len() + PAGE_SIZE,
            Select::SYSTEM,
            owner,
        ));
        // Unaligned ends round down.
        let m =
            Migration::setup(&space, a.addr() + 100..a.addr() + 2 * PAGE_SIZE + 100, Select::SYSTEM, owner).unwrap();
        assert_eq!(m.npages(), 2);
        drop(m);
        // Sim device operations.
        let mut buf = vec![0u8; 16 * PAGE_SIZE];
        einval(dev.read(a.addr() + 8, 1, &mut buf));
        einval(dev.read(a.addr(), 0, &mut buf));
        einval(dev.migrate_to_device(a.addr() + 1, 1));
        einval(dev.migrate_to_device(a.addr(), 0));
        einval(dev.write(lo.addr() + lo.len() - PAGE_SIZE, 2, &buf));
        einval(dev.migrate_to_device(lo.addr() + lo.len() - PAGE_SIZE, 2));
        // Nothing changed.
        assert_eq!(space.snapshot(a.range()).unwrap(), before);
        assert_words(&cpu_read(&a), |i| i);
        assert_eq!(dev.pages_in_use(), 0);
    });
}

#[test]
fn c10_snapshot_basic() {
    with_timeout(60, || {
        // First-touch fault-around would zero-fill page 0 along with page 1;
        // the kernel's one-page behaviour keeps page 0 untouched.
        let space = uhmm::AddressSpace::new(uhmm::Config { zero_fill_pages: 1, ..uhmm::Config::default() }).unwrap();
        let dev = device(&space);
        let region = map(&space, 5);
        let mut b = [0u8; 4];
        region.read(PAGE_SIZE, &mut b).unwrap(); // 1: zero page
        region.write(2 * PAGE_SIZE, &[1]).unwrap(); // 2: data, then read-only
        region.protect(2 * PAGE_SIZE..3 * PAGE_SIZE, Prot::READ).unwrap();
        region.write(3 * PAGE_SIZE, &[1]).unwrap(); // 3: writable data
        region.write(4 * PAGE_SIZE, &[1]).unwrap(); // 4: on the device
        dev.migrate_to_device_all(region.addr() + 4 * PAGE_SIZE, 1).unwrap();
        let snap = dev.snapshot(region.addr(), 5).unwrap();
        assert_eq!(
            snap,
            vec![
                PageState::NONE,
                PageState::ZERO | PageState::READ,
                PageState::READ,
                PageState::WRITE,
                PageState::DEV_PRIVATE_LOCAL | PageState::WRITE,
            ]
        );
    });
}

#[test]
fn c11_concurrent_access() {
    with_timeout(300, || {
        const N: usize = 64;
        let space = space();
        let dev = device(&space);
        let region = std::sync::Arc::new(map(&space, N));
        let moved = writer_races_migrations(&region, N, || {
            let moved = match dev.migrate_to_device_all(region.addr(), N) {
                Ok(c) => c.cpages,
                // The writer held every page meanwhile.
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
                    0
                }
            };
            dev.migrate_to_system(region.addr(), N).unwrap();
            moved
        });
        assert!(moved > 0 || space.stats().pages_to_device > 0, "no migration ever happened");
        assert!(space.stats().pages_to_device > 0, "some migrations must have happened");
    });
}

#[test]
fn c12_busy_pages() {
    with_timeout(60, || {
        const N: usize = 8;
        let space = space();
        let dev = device(&space);
        let region = map(&space, N);
        fill(&region, 0..N, |i| i);
        let other = Owner::new();
        // Page 2 is locked by another migration; page 5 is pinned for I/O.
        let locked = Migration::setup(
            &space,
            region.addr() + 2 * PAGE_SIZE..region.addr() + 3 * PAGE_SIZE,
            Select::SYSTEM,
            other,
        )
        .unwrap();
        assert_eq!(locked.cpages(), 1);
        let pin = IoPin::new(region.addr() + 5 * PAGE_SIZE, PAGE_SIZE).expect("io_uring buffer registration");
        let busy_before = space.stats().busy_pages;
        let m = Migration::setup(&space, region.range(), Select::SYSTEM, dev.owner()).unwrap();
        assert_eq!(m.cpages(), N - 2);
        assert!(matches!(m.src(2), MigrateSrc::Skip));
        assert!(matches!(m.src(5), MigrateSrc::Skip));
        assert!(matches!(m.src(4), MigrateSrc::System(_)));
        assert_eq!((m.skipped(2), m.skipped(5), m.skipped(4)), (Some(Skip::Busy), Some(Skip::Pinned), None));
        assert_eq!(space.stats().busy_pages - busy_before, 2);
        let s = m.pages().finalize();
        assert_eq!((s.npages, s.cpages, s.migrated, s.busy, s.pinned), (N, N - 2, 0, 1, 1));
        assert_eq!((s.not_moved(), s.not_selected()), (N - 2, 0));
        // Through the device: the rest migrates, the busy pages stay,
        // counted by reason.
        let c = dev.migrate_to_device(region.addr(), N).unwrap();
        assert_eq!((c.cpages, c.left.busy, c.left.pinned, c.left.total()), (N - 2, 1, 1, 2));
        let snap = dev.snapshot(region.addr(), N).unwrap();
        for (p, s) in snap.iter().enumerate() {
            let on_dev = s.contains(PageState::DEV_PRIVATE_LOCAL);
            assert_eq!(on_dev, p != 2 && p != 5, "page {p}: {s:?}");
        }
        // The pinned page's source is intact and usable while pinned.
        let mut w = [0u8; 4];
        region.read(5 * PAGE_SIZE, &mut w).unwrap();
        assert_eq!(u32::from_ne_bytes(w), (5 * WORDS_PER_PAGE) as u32);
        drop(locked);
        drop(pin);
        assert_words(&cpu_read(&region), |i| i);
    });
}

#[test]
fn c13_dropped_migration() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, NPAGES);
        fill(&region, 0..NPAGES, |i| i);
        let owner = dev.owner();
        // Dropped after setup.
        let m = Migration::setup(&space, region.range(), Select::SYSTEM, owner).unwrap();
        assert_eq!(m.cpages(), NPAGES);
        drop(m);
        assert_words(&cpu_read(&region), |i| i);
        region.write(0, &7u32.to_ne_bytes()).unwrap();
        region.write(0, &0u32.to_ne_bytes()).unwrap();
        // A panic in driver code between steps.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut m = Migration::setup(&space, region.range(), Select::SYSTEM, owner).unwrap();
            m.set_dst_error(3).unwrap();
            panic!("driver bug");
        }));
        assert!(r.is_err());
        assert_words(&cpu_read(&region), |i| i);
        // Device pages: a dropped migration back leaves them on the device.
        dev.migrate_to_device_all(region.addr(), NPAGES).unwrap();
        let m = Migration::setup(&space, region.range(), Select::DEVICE_PRIVATE, owner).unwrap();
        assert_eq!(m.cpages(), NPAGES);
        drop(m);
        assert_eq!(dev.pages_in_use(), NPAGES);
        // No lock is held: a new migration collects every page.
        let m = Migration::setup(&space, region.range(), Select::SYSTEM | Select::DEVICE_PRIVATE, owner).unwrap();
        assert_eq!(m.cpages(), NPAGES);
        drop(m);
        assert_words(&cpu_read(&region), |i| i);
        region.write(8, &[1, 2, 3]).unwrap();
    });
}

// ---- The sim device itself (CONFORMANCE.md's operations) ----

#[test]
fn sim_fail_next_alloc_fails_once() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, 16);
        fill(&region, 0..16, |i| i);
        dev.fail_next_alloc();
        let e = dev.migrate_to_device(region.addr(), 16).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoMemory, "the failed allocation leaves every page behind");
        assert_words(&cpu_read(&region), |i| i);
        assert_eq!(dev.migrate_to_device_all(region.addr(), 16).unwrap().cpages, 16, "only once");
        // A failed system allocation leaves the page on the device.
        dev.fail_next_alloc();
        let c = dev.migrate_to_system(region.addr(), 16).unwrap();
        assert_eq!(c.cpages, 15);
        assert_eq!(dev.pages_in_use(), 1);
        assert_words(&cpu_read(&region), |i| i);
    });
}

#[test]
fn sim_device_pages_never_leak_old_data() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let secret = map(&space, 64);
        fill(&secret, 0..64, |_| 0x5EC2_E700);
        dev.migrate_to_device_all(secret.addr(), 64).unwrap();
        drop(secret); // frees its device pages
        assert_eq!(dev.pages_in_use(), 0);
        let fresh = map(&space, 64);
        dev.migrate_to_device_all(fresh.addr(), 64).unwrap(); // holes: the freed pages are reused
        let mut buf = vec![0xFFu8; 64 * PAGE_SIZE];
        dev.read(fresh.addr(), 64, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0), "a reused device page must not show old data");
        assert!(cpu_read(&fresh).iter().all(|b| *b == 0));
    });
}

#[test]
fn sim_capacity_is_enforced_and_release_evicts_everything() {
    with_timeout(60, || {
        let space = space();
        let config = uhmm_devices::sim::SimConfig {
            capacity_bytes: 4 << 20,
            chunk_bytes: 2 << 20,
            ..uhmm_devices::sim::SimConfig::default()
        };
        let dev = uhmm_devices::sim::SimDevice::new(&space, config).unwrap();
        let region = map(&space, 2048); // 8 MiB: twice the capacity
        fill(&region, 0..2048, |i| i);
        let c = dev.migrate_to_device(region.addr(), 2048).unwrap();
        assert_eq!((c.cpages, c.left.no_memory, c.left.total()), (1024, 1024, 1024), "the device is full");
        assert_eq!(dev.pages_in_use(), 1024, "grew chunk by chunk up to the capacity");
        assert_eq!(dev.release().unwrap(), 1024);
        assert_eq!(dev.pages_in_use(), 0);
        assert!(space.snapshot(region.range()).unwrap().iter().all(|p| p.residency == uhmm::Residency::Ram));
        assert_words(&cpu_read(&region), |i| i);
    });
}

#[test]
fn sim_drop_evicts_to_ram() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, NPAGES);
        fill(&region, 0..NPAGES, |i| !i);
        dev.migrate_to_device_all(region.addr(), NPAGES).unwrap();
        drop(dev);
        assert!(space.snapshot(region.range()).unwrap().iter().all(|p| p.residency == uhmm::Residency::Ram));
        assert_words(&cpu_read(&region), |i| !i);
    });
}
