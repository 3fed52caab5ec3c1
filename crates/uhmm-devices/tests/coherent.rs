//! Device-coherent memory (issue 3, item 4): S22, and the coherent variants
//! of S11 and S16.

mod common;

use common::*;
use uhmm::{PAGE_SIZE, PinKind};
use uhmm_devices::sim::{PageState, SimConfig, SimDevice};

fn coherent_device(space: &uhmm::AddressSpace) -> SimDevice {
    SimDevice::new(space, SimConfig { capacity_bytes: 256 << 20, coherent: true, ..SimConfig::default() }).unwrap()
}

#[test]
fn s22_coherent_device() {
    with_timeout(60, || {
        let space = space();
        let dev = coherent_device(&space);
        let r = map(&space, NPAGES);
        fill(&r, 0..NPAGES, |i| i);
        assert_eq!(dev.migrate_to_device_all(r.addr(), NPAGES).unwrap().cpages, NPAGES);
        assert_eq!(dev.pages_in_use(), NPAGES);
        let local = PageState::DEV_COHERENT_LOCAL | PageState::WRITE;
        assert!(dev.snapshot(r.addr(), NPAGES).unwrap().iter().all(|s| *s == local));
        // The CPU uses the pages in place: no fault, they stay on the device.
        let faults = space.stats().faults;
        assert_words(&cpu_read(&r), |i| i);
        fill(&r, 0..NPAGES, |i| i + 1);
        assert_eq!(space.stats().faults, faults, "coherent pages never fault");
        assert!(dev.snapshot(r.addr(), NPAGES).unwrap().iter().all(|s| *s == local));
        // The device sees the CPU's writes (coherent), without a fault round.
        let mut buf = vec![0u8; r.len()];
        assert_eq!(dev.read(r.addr(), NPAGES, &mut buf).unwrap().faults, 0);
        assert_words(&buf, |i| i + 1);
        // Only an explicit migration brings them back.
        assert_eq!(dev.migrate_to_system(r.addr(), NPAGES).unwrap().cpages, NPAGES);
        assert_eq!(dev.pages_in_use(), 0);
        assert!(dev.snapshot(r.addr(), NPAGES).unwrap().iter().all(|s| *s == PageState::WRITE));
        assert_words(&cpu_read(&r), |i| i + 1);
        // And release evicts whatever is left, coherent pages included.
        dev.migrate_to_device_all(r.addr(), NPAGES).unwrap();
        assert_eq!(dev.release().unwrap(), NPAGES);
        assert_words(&cpu_read(&r), |i| i + 1);
    });
}

#[test]
fn s11_snapshot_two_coherent_devices() {
    with_timeout(60, || {
        let space = space();
        let dev0 = coherent_device(&space);
        let dev1 = coherent_device(&space);
        let r = map(&space, 2);
        fill(&r, 0..2, |i| i);
        dev0.migrate_to_device_all(r.addr(), 1).unwrap();
        dev1.migrate_to_device_all(r.addr() + PAGE_SIZE, 1).unwrap();
        let snap = dev0.snapshot(r.addr(), 2).unwrap();
        assert_eq!(
            snap,
            vec![PageState::DEV_COHERENT_LOCAL | PageState::WRITE, PageState::DEV_COHERENT_REMOTE | PageState::WRITE]
        );
    });
}

#[test]
fn s16_pin_coherent_pages() {
    with_timeout(60, || {
        let space = space();
        let dev = coherent_device(&space);
        let r = map(&space, 4);
        fill(&r, 0..4, |i| i);
        assert_eq!(dev.migrate_to_device_all(r.addr(), 4).unwrap().cpages, 4);
        let pages = |n: usize| r.addr() + n * PAGE_SIZE..r.addr() + (n + 2) * PAGE_SIZE;
        let long = space.pin(pages(2), PinKind::LongTerm).unwrap();
        let short = space.pin(pages(0), PinKind::ShortTerm).unwrap();
        let snap = dev.snapshot(r.addr(), 4).unwrap();
        let local = PageState::DEV_COHERENT_LOCAL | PageState::WRITE;
        assert_eq!(
            snap,
            vec![local, local, PageState::WRITE, PageState::WRITE],
            "long-term pins bring coherent pages back"
        );
        assert_eq!(dev.pages_in_use(), 2);
        assert_words(&cpu_read(&r), |i| i);
        drop((short, long));
    });
}
