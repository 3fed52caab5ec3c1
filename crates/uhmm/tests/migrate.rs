//! The migration steps of the core, driven by the core's test driver
//! (`common::TestDev`; no sim device): setup's selection and rejections, pages/finalize, restore,
//! owners, device-range eviction, the chunked helper, read-only regions,
//! poison, and the metadata cost of an untouched region.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestDev;
use uhmm::{
    AddressSpace, Collected, Config, ErrorKind, MigrateDst, MigrateSrc, Migration, Owner, PAGE_SIZE, PageState, Prot,
    Residency, Result, Select, migrate_chunked, migrate_device_range,
};

/// A space whose kept staging pages wait for a copy back as long as a test
/// needs, however slowly a busy machine runs it.
fn space() -> AddressSpace {
    space_keeping_for(Duration::from_secs(600))
}

/// A space whose kept staging pages wait `keep` for a copy back.
fn space_keeping_for(keep: Duration) -> AddressSpace {
    AddressSpace::new(Config { keep_staging_for: keep, ..Config::default() }).expect("userfaultfd must be available")
}

/// Long enough for the copy helper to give back kept pages unused for
/// [`SHORT_KEEP`], even on a busy machine.
const TRIM_WAIT: Duration = Duration::from_secs(3);
const SHORT_KEEP: Duration = Duration::from_millis(50);

/// How long a test goes on migrating for the copy helper to take part:
/// which thread copies a piece depends on when the helper wakes, and on a
/// busy machine sharing pauses after the helper stalls.
const HELPER_WAIT: Duration = Duration::from_secs(20);

fn fill(region: &uhmm::Region, pages: std::ops::Range<usize>) {
    for p in pages {
        region.write(p * PAGE_SIZE, &vec![(p as u8).wrapping_add(1); PAGE_SIZE]).unwrap();
    }
}

/// A fresh space and device, and a region of `n` filled pages moved to it.
fn filled_on_device(n: usize) -> (AddressSpace, Arc<TestDev>, uhmm::Region) {
    let space = space();
    let dev = TestDev::new(&space);
    let r = space.map(n * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 0..n);
    dev.to_device(&space, r.range());
    (space, dev, r)
}

fn check(region: &uhmm::Region, pages: std::ops::Range<usize>) {
    for p in pages {
        let mut b = vec![0; PAGE_SIZE];
        region.read(p * PAGE_SIZE, &mut b).unwrap();
        assert!(b.iter().all(|x| *x == (p as u8).wrapping_add(1)), "page {p}");
    }
}

#[test]
fn setup_rejects_bad_ranges_and_changes_nothing() {
    let space = space();
    let r = space.map(8 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 0..8);
    let owner = Owner::new();
    let a = r.addr();
    for bad in [a..a, a + 5..a + 100, 0..PAGE_SIZE, a..a + 9 * PAGE_SIZE, a + 7 * PAGE_SIZE..usize::MAX & !4095] {
        let e = Migration::setup(&space, bad.clone(), Select::SYSTEM, owner).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad:?}: {e}");
        assert_eq!(e.errno(), 22);
    }
    assert_eq!(space.stats().collected_pages, 0, "nothing was collected");
    check(&r, 0..8);
    let m = Migration::setup(&space, a + 1..a + 3 * PAGE_SIZE - 1, Select::SYSTEM, owner).unwrap();
    assert_eq!((m.npages(), m.cpages()), (2, 2), "ends round down to pages");
}

#[test]
fn selection_follows_the_kernel() {
    let space = space();
    let cfg_one = AddressSpace::new(Config { zero_fill_pages: 1, ..Config::default() }).unwrap();
    for s in [&space, &cfg_one] {
        let r = s.map(3 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
        let mut b = [0u8; 1];
        r.read(PAGE_SIZE, &mut b).unwrap(); // page 1: zero page (with a 1-page window, page 0 stays a hole)
        r.write(2 * PAGE_SIZE, &[5]).unwrap(); // page 2: RAM
        let owner = Owner::new();
        let m = Migration::setup(s, r.range(), Select::SYSTEM, owner).unwrap();
        assert_eq!(m.cpages(), 3);
        assert!(matches!(m.src(0), MigrateSrc::Hole));
        assert!(matches!(m.src(1), MigrateSrc::Hole), "the zero page is a hole");
        assert!(matches!(m.src(2), MigrateSrc::System(_)));
        drop(m);
        let m = Migration::setup(s, r.range(), Select::DEVICE_PRIVATE, owner).unwrap();
        assert!(matches!(m.src(2), MigrateSrc::Skip), "RAM is not selected");
        assert!(matches!(m.src(1), MigrateSrc::Skip), "nor the zero page");
        if std::ptr::eq(s, &cfg_one) {
            assert!(matches!(m.src(0), MigrateSrc::Hole), "holes are collected whatever the selection");
            assert_eq!(m.cpages(), 1);
        }
        drop(m);
        let mut b = [0u8; 1];
        r.read(2 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b[0], 5);
    }
}

#[test]
fn owners_and_device_pages() {
    let space = space();
    let dev = TestDev::new(&space);
    let other = TestDev::new(&space);
    let r = space.map(4 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 0..4);
    assert_eq!(dev.to_device(&space, r.range()).migrated, 4);
    let m = Migration::setup(&space, r.range(), Select::DEVICE_PRIVATE, other.owner).unwrap();
    assert_eq!(m.cpages(), 0, "another owner's pages are not collected");
    drop(m);
    let m = Migration::setup(&space, r.range(), Select::SYSTEM, dev.owner).unwrap();
    assert_eq!(m.cpages(), 0, "device pages need DEVICE_PRIVATE");
    drop(m);
    let m = Migration::setup(&space, r.range(), Select::DEVICE_PRIVATE, dev.owner).unwrap();
    assert_eq!(m.cpages(), 4);
    assert!(matches!(m.src(3), MigrateSrc::Device(p) if p.pagemap == dev.pm().id()));
    drop(m);
    assert!(matches!(r.state(0), Some(PageState::Device(_))));
    check(&r, 0..4); // CPU faults bring them back through migrate_to_ram
    assert_eq!(dev.mem.lock().unwrap().len(), 0, "page_free was called for every page");
}

#[test]
fn pages_commits_only_pages_with_a_destination() {
    let space = space();
    let dev = TestDev::new(&space);
    let r = space.map(8 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 0..8);
    let mut m = Migration::setup(&space, r.range(), Select::SYSTEM, dev.owner).unwrap();
    for i in [1, 4, 6] {
        let MigrateSrc::System(sp) = m.src(i) else { panic!("page {i} must be RAM") };
        let mut b = vec![0; PAGE_SIZE];
        sp.read(0, &mut b).unwrap();
        m.set_dst_device(i, dev.alloc(b)).unwrap();
    }
    let m = m.pages();
    assert_eq!(m.migrated_count(), 3);
    assert!(m.migrated(4) && !m.migrated(5));
    let s = m.finalize();
    assert_eq!((s.npages, s.cpages, s.migrated), (8, 8, 3));
    let snap = space.snapshot(r.range()).unwrap();
    for (i, p) in snap.iter().enumerate() {
        let on_dev = matches!(p.residency, Residency::Device(_, o) if o == dev.owner);
        assert_eq!(on_dev, [1, 4, 6].contains(&i), "page {i}");
    }
    check(&r, 0..8);
}

#[test]
fn destination_errors_are_typed() {
    let space = space();
    let dev = TestDev::new(&space);
    let r = space.map(4 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 0..2);
    let locker = Migration::setup(&space, r.addr()..r.addr() + PAGE_SIZE, Select::SYSTEM, dev.owner).unwrap();
    let mut m = Migration::setup(&space, r.range(), Select::SYSTEM, dev.owner).unwrap();
    let page = dev.alloc(vec![0; PAGE_SIZE]);
    assert_eq!(m.set_dst_device(0, page).unwrap_err().kind(), ErrorKind::InvalidArgument, "page 0 is busy");
    assert_eq!(m.set_dst_device(9, page).unwrap_err().kind(), ErrorKind::InvalidArgument, "out of range");
    assert_eq!(m.set_dst_system(1).unwrap_err().kind(), ErrorKind::InvalidArgument, "no system page yet");
    drop(m);
    drop(locker);
    check(&r, 0..2);
}

#[test]
fn device_range_eviction_and_poison() {
    let space = space();
    let dev = TestDev::new(&space);
    let a = space.map(4 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    let b = space.map(4 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&a, 0..4);
    fill(&b, 0..4);
    dev.to_device(&space, a.range());
    dev.to_device(&space, b.range());
    // Evict by device page number, across both regions; page 2 is lost.
    let mut m = migrate_device_range(&space, dev.pm(), 0..8).unwrap();
    assert_eq!(m.cpages(), 8);
    dev.copy_out(&mut m).unwrap();
    let lost = (0..8).find(|&i| m.addr(i) == Some(a.addr() + 2 * PAGE_SIZE)).unwrap();
    m.set_dst_error(lost).unwrap();
    assert_eq!(m.pages().finalize().migrated, 8);
    assert_eq!(dev.mem.lock().unwrap().len(), 0, "every device page was freed");
    check(&b, 0..4);
    check(&a, 0..2);
    check(&a, 3..4);
    let e = a.read(2 * PAGE_SIZE, &mut [0u8; 4]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Fault, "a poisoned page reads as an error, not zeros");
    assert_eq!(space.snapshot(a.range()).unwrap()[2].residency, Residency::Poisoned);
    assert_eq!(space.stats().poisoned_pages, 1);
}

#[test]
fn device_range_lists_a_locked_page_as_busy() {
    let space = space();
    let dev = TestDev::new(&space);
    let a = space.map(4 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&a, 0..4);
    assert_eq!(dev.to_device(&space, a.range()).migrated, 4);
    // Another migration holds page 1's lock.
    let p1 = a.addr() + PAGE_SIZE;
    let holder = Migration::setup(&space, p1..p1 + PAGE_SIZE, Select::DEVICE_PRIVATE, dev.owner).unwrap();
    assert_eq!(holder.cpages(), 1);
    let mut m = migrate_device_range(&space, dev.pm(), 0..4).unwrap();
    assert_eq!((m.npages(), m.cpages()), (4, 3));
    let busy = (0..4).find(|&i| m.addr(i) == Some(p1)).unwrap();
    assert_eq!(m.skipped(busy), Some(uhmm::Skip::Busy));
    assert!((0..4).filter(|&i| i != busy).all(|i| m.skipped(i).is_none()));
    dev.copy_out(&mut m).unwrap();
    let s = m.pages().finalize();
    assert_eq!((s.migrated, s.busy, s.pinned), (3, 1, 0));
    drop(holder); // restores page 1 on the device
    assert!(matches!(space.snapshot(p1..p1 + PAGE_SIZE).unwrap()[0].residency, Residency::Device(..)));
    check(&a, 0..4);
}

#[test]
fn chunked_helper_covers_the_range() {
    let space = space();
    let dev = TestDev::new(&space);
    let r = space.map(100 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 0..100);
    let before = space.stats().migrations;
    let s = migrate_chunked(&space, r.range(), 16, Select::SYSTEM, dev.owner, &mut &*dev).unwrap();
    assert_eq!((s.npages, s.cpages, s.migrated), (100, 100, 100));
    assert_eq!(space.stats().migrations - before, 7, "ceil(100 / 16) chunks");
    check(&r, 0..100);
}

/// A pipelined driver whose copy of chunk `fail_at` fails: chunks before it
/// stay migrated, it and the chunk in flight beside it are restored (that
/// one's pending copy dropped, not waited through the driver), and no page
/// stays locked.
#[test]
fn pipelined_helper_overlaps_chunks_and_stops_at_an_error() {
    struct Piped<'a> {
        dev: &'a TestDev,
        submitted: usize,
        fail_at: usize,
        /// Most chunks submitted and not yet waited for at once.
        max_in_flight: usize,
        in_flight: usize,
        /// Whether each copy is done as soon as it is submitted.
        ready: bool,
    }
    impl uhmm::PipelinedDriver for Piped<'_> {
        type Pending = usize;
        fn alloc_and_submit(&mut self, _: &mut Migration<Collected>) -> Result<usize> {
            self.submitted += 1;
            self.in_flight += 1;
            self.max_in_flight = self.max_in_flight.max(self.in_flight);
            Ok(self.submitted - 1)
        }
        fn wait_and_set(&mut self, m: &mut Migration<Collected>, chunk: usize) -> Result<()> {
            self.in_flight -= 1;
            if chunk == self.fail_at {
                return Err(uhmm::Error::new(ErrorKind::Fault, "copy failed"));
            }
            self.dev.copy_in(m);
            Ok(())
        }
        fn ready(&self, _: &usize) -> bool {
            self.ready
        }
    }
    let space = space();
    let dev = TestDev::new(&space);
    let r = space.map(100 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 0..100);
    let mut all = Piped { dev: &dev, submitted: 0, fail_at: usize::MAX, max_in_flight: 0, in_flight: 0, ready: false };
    let s = uhmm::migrate_pipelined(&space, r.range(), 16, Select::SYSTEM, dev.owner, &mut all).unwrap();
    assert_eq!((s.npages, s.cpages, s.migrated), (100, 100, 100));
    assert_eq!((all.submitted, all.max_in_flight, all.in_flight), (7, 2, 0), "two chunks overlap");
    check(&r, 0..100);
    // Back to RAM (the CPU faults them in), then fail at the third chunk.
    let r2 = space.map(100 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r2, 0..100);
    let mut failing = Piped { dev: &dev, submitted: 0, fail_at: 2, max_in_flight: 0, in_flight: 0, ready: false };
    let e = uhmm::migrate_pipelined(&space, r2.range(), 16, Select::SYSTEM, dev.owner, &mut failing).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Fault);
    assert_eq!((failing.submitted, failing.in_flight), (4, 1), "the chunk beside the failed one was dropped");
    let snap = space.snapshot(r2.range()).unwrap();
    let on_device = |p: &uhmm::PageSnapshot| matches!(p.residency, Residency::Device(..));
    assert!(snap[..32].iter().all(on_device), "chunks before the error stay migrated");
    assert!(!snap[32..].iter().any(on_device), "the rest stays in RAM");
    check(&r2, 0..100);
    // Nothing stays locked: the whole range migrates now.
    let s = migrate_chunked(&space, r2.range(), 16, Select::SYSTEM, dev.owner, &mut &*dev).unwrap();
    assert_eq!(s.cpages, 100);
    // A driver whose copies are done at once: a chunk begins finalizing
    // before the next is set up, and the failed one is found then.
    let r3 = space.map(100 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r3, 0..100);
    let mut ready = Piped { dev: &dev, submitted: 0, fail_at: 2, max_in_flight: 0, in_flight: 0, ready: true };
    let e = uhmm::migrate_pipelined(&space, r3.range(), 16, Select::SYSTEM, dev.owner, &mut ready).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Fault);
    assert_eq!((ready.submitted, ready.max_in_flight, ready.in_flight), (3, 1, 0), "no chunk set up after the failure");
    let snap = space.snapshot(r3.range()).unwrap();
    assert!(snap[..32].iter().all(on_device), "chunks before the error stay migrated");
    assert!(!snap[32..].iter().any(on_device), "the rest stays in RAM");
    check(&r3, 0..100);
    let s = migrate_chunked(&space, r3.range(), 16, Select::SYSTEM, dev.owner, &mut &*dev).unwrap();
    assert_eq!(s.cpages, 100);
}

#[test]
fn read_only_pages_migrate_and_come_back() {
    let space = space();
    let dev = TestDev::new(&space);
    let r = space.map(8 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 0..8);
    r.protect(2 * PAGE_SIZE..6 * PAGE_SIZE, Prot::READ).unwrap();
    assert_eq!(dev.to_device(&space, r.range()).migrated, 8);
    check(&r, 0..8);
    assert_eq!(r.write(3 * PAGE_SIZE, &[1]).unwrap_err().kind(), ErrorKind::Permission);
    // A dropped migration of read-only RAM pages restores them too.
    let m = Migration::setup(&space, r.range(), Select::SYSTEM, dev.owner).unwrap();
    assert_eq!(m.cpages(), 8);
    drop(m);
    check(&r, 0..8);
}

#[test]
fn no_access_pages_are_never_collected() {
    let space = space();
    let r = space.map(4 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 0..4);
    r.protect(0..2 * PAGE_SIZE, Prot::NONE).unwrap();
    let m = Migration::setup(&space, r.range(), Select::SYSTEM, Owner::new()).unwrap();
    assert_eq!(m.cpages(), 2);
    drop(m);
    assert_eq!(r.read(0, &mut [0u8; 1]).unwrap_err().kind(), ErrorKind::Fault);
    r.protect(0..2 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    check(&r, 0..4);
}

#[test]
fn untouched_terabyte_region_costs_under_a_mebibyte() {
    let space = space();
    let r = space.map(1 << 40, Prot::READ_WRITE).unwrap();
    assert!(r.metadata_bytes() < 1 << 20, "{} bytes", r.metadata_bytes());
    r.write((1 << 39) + 123, &[7]).unwrap();
    let mut b = [0u8; 1];
    r.read((1 << 39) + 123, &mut b).unwrap();
    assert_eq!(b[0], 7);
    assert!(r.metadata_bytes() < 1 << 20, "one touched page: {} bytes", r.metadata_bytes());
}

#[test]
fn cpu_waits_for_a_migration_then_sees_the_data() {
    let space = space();
    let dev = TestDev::new(&space);
    let r = Arc::new(space.map(16 * PAGE_SIZE, Prot::READ_WRITE).unwrap());
    fill(&r, 0..16);
    let mut m = Migration::setup(&space, r.range(), Select::SYSTEM, dev.owner).unwrap();
    let reader = {
        let r = r.clone();
        std::thread::spawn(move || check(&r, 5..6))
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!reader.is_finished(), "the CPU access waits while the page is under migration");
    dev.copy_in(&mut m);
    m.pages().finalize();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() {
        assert!(std::time::Instant::now() < deadline, "reader hung");
        std::thread::sleep(Duration::from_millis(2));
    }
    reader.join().unwrap();
}

#[test]
fn a_panicking_driver_does_not_stop_the_fault_engine() {
    let space = space();
    let dev = TestDev::new(&space);
    let r = Arc::new(space.map(16 * PAGE_SIZE, Prot::READ_WRITE).unwrap());
    fill(&r, 0..16);
    dev.to_device(&space, r.range());
    dev.panic_next.store(true, std::sync::atomic::Ordering::SeqCst);
    let reader = {
        let r = r.clone();
        std::thread::spawn(move || check(&r, 0..16))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() {
        assert!(std::time::Instant::now() < deadline, "the fault engine died with the driver's panic");
        std::thread::sleep(Duration::from_millis(2));
    }
    reader.join().unwrap();
    assert_eq!(space.handler_watch().alive(), space.config().handler_threads, "every handler still runs");
}

#[test]
fn a_device_page_backs_one_address_only() {
    let space = space();
    let dev = TestDev::new(&space);
    let r = space.map(4 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 0..4);
    let mut m = Migration::setup(&space, r.range(), Select::SYSTEM, dev.owner).unwrap();
    let page = dev.alloc(vec![0; PAGE_SIZE]);
    m.set_dst_device(0, page).unwrap();
    assert_eq!(m.set_dst_device(1, page).unwrap_err().kind(), ErrorKind::InvalidArgument);
    m.set_dst_error(0).unwrap(); // releases the claim
    m.set_dst_device(1, page).unwrap();
    drop(m);
    check(&r, 0..4);
}

#[test]
fn pages_copied_in_from_driver_memory() {
    use uhmm::{Mapping, Protection};
    let (space, dev, r) = filled_on_device(8);
    // Device memory the CPU can read: pages 0..8 laid out in order (one
    // copy for the run), except page 5, whose data sits elsewhere.
    let mem = Arc::new(Mapping::anonymous(16 * PAGE_SIZE, Protection::ReadWrite, PAGE_SIZE).unwrap());
    let slot = |p: usize| if p == 5 { 12 } else { p };
    for p in 0..8 {
        mem.write(slot(p) * PAGE_SIZE, &vec![(p as u8).wrapping_add(1); PAGE_SIZE]).unwrap();
    }
    let mut m = Migration::setup(&space, r.range(), Select::DEVICE_PRIVATE, dev.owner).unwrap();
    assert_eq!(m.cpages(), 8);
    // Bad input is typed and changes nothing.
    let invalid = |e: uhmm::Error| assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    invalid(m.set_dst_system_from(0, &mem, 1).unwrap_err());
    invalid(m.set_dst_system_from(0, &mem, 16 * PAGE_SIZE).unwrap_err());
    invalid(m.set_dst_system_from(0, &mem, usize::MAX & !(PAGE_SIZE - 1)).unwrap_err());
    invalid(m.set_dst_system_from(8, &mem, 0).unwrap_err());
    assert_eq!(m.dst(0), MigrateDst::None);
    for i in 0..8 {
        m.set_dst_system_from(i, &mem, slot(i) * PAGE_SIZE).unwrap();
    }
    let m = m.pages();
    assert_eq!(m.migrated_count(), 8);
    assert_eq!(m.finalize().migrated, 8);
    // In RAM, with the data, and the device pages freed.
    let snap = space.snapshot(r.range()).unwrap();
    assert!(snap.iter().all(|p| p.residency == Residency::Ram), "{snap:?}");
    assert_eq!(dev.freed.lock().unwrap().len(), 8);
    check(&r, 0..8);
    // RAM pages are refused: their data is in staging, not in the driver's memory.
    let mut m = Migration::setup(&space, r.range(), Select::SYSTEM, dev.owner).unwrap();
    invalid(m.set_dst_system_from(0, &mem, 0).unwrap_err());
    drop(m);
    check(&r, 0..8);
}

#[test]
fn a_copy_in_that_fails_leaves_the_page_on_the_device() {
    use uhmm::{Mapping, Protection};
    let (space, dev, r) = filled_on_device(4);
    // Memory the kernel cannot read: every copy from it fails (EFAULT).
    let unreadable = Arc::new(Mapping::anonymous(4 * PAGE_SIZE, Protection::None, PAGE_SIZE).unwrap());
    let mut m = Migration::setup(&space, r.range(), Select::DEVICE_PRIVATE, dev.owner).unwrap();
    for i in 0..4 {
        m.set_dst_system_from(i, &unreadable, i * PAGE_SIZE).unwrap();
    }
    let s = m.pages().finalize();
    assert_eq!((s.cpages, s.migrated), (4, 0), "no page moved");
    let snap = space.snapshot(r.range()).unwrap();
    assert!(snap.iter().all(|p| matches!(p.residency, Residency::Device(_, o) if o == dev.owner)), "{snap:?}");
    assert!(dev.freed.lock().unwrap().is_empty(), "no device page freed");
    assert_eq!(space.stats().poisoned_pages, 0);
    // Still readable and writable: the fault path brings the pages back.
    check(&r, 0..4);
    r.write(0, &[9]).unwrap();
}

#[test]
fn a_big_copy_in_is_shared_with_the_helper_and_its_failures_stay_on_the_device() {
    use uhmm::{Mapping, Protection};
    let n = 2048;
    let good_pages = 1536;
    let (space, dev, r) = filled_on_device(n);
    // Pages 0..1536 come from readable memory; 1536..2048 from memory the
    // kernel cannot read. The helper claims pieces from the back and the
    // caller from the front, so the helper meets the failures first.
    let good = Arc::new(Mapping::anonymous(good_pages * PAGE_SIZE, Protection::ReadWrite, PAGE_SIZE).unwrap());
    for p in 0..good_pages {
        good.write(p * PAGE_SIZE, &vec![(p as u8).wrapping_add(1); PAGE_SIZE]).unwrap();
    }
    let bad = Arc::new(Mapping::anonymous((n - good_pages) * PAGE_SIZE, Protection::None, PAGE_SIZE).unwrap());
    let mut m = Migration::setup(&space, r.range(), Select::DEVICE_PRIVATE, dev.owner).unwrap();
    for i in 0..n {
        let (src, off) = if i < good_pages { (&good, i) } else { (&bad, i - good_pages) };
        m.set_dst_system_from(i, src, off * PAGE_SIZE).unwrap();
    }
    let s = m.pages().finalize();
    assert_eq!(s.migrated, good_pages);
    let snap = space.snapshot(r.range()).unwrap();
    for (i, p) in snap.iter().enumerate() {
        let on_dev = matches!(p.residency, Residency::Device(_, o) if o == dev.owner);
        assert_eq!(on_dev, i >= good_pages, "page {i}: {p:?}");
    }
    assert_eq!(space.stats().poisoned_pages, 0);
    check(&r, 0..n);
    // Which thread copies what depends on when the helper wakes; over a
    // few migrations of the good pages it takes part.
    let good_range = r.addr()..r.addr() + good_pages * PAGE_SIZE;
    let started = std::time::Instant::now();
    while started.elapsed() < HELPER_WAIT {
        if space.stats().helper_copied_pages > 0 {
            break;
        }
        dev.to_device(&space, good_range.clone());
        let mut m = Migration::setup(&space, good_range.clone(), Select::DEVICE_PRIVATE, dev.owner).unwrap();
        for i in 0..good_pages {
            m.set_dst_system_from(i, &good, i * PAGE_SIZE).unwrap();
        }
        assert_eq!(m.pages().finalize().migrated, good_pages);
        check(&r, 0..good_pages);
    }
    assert!(space.stats().helper_copied_pages > 0, "the helper never copied");
}

#[test]
fn staging_emptied_off_the_callers_path_never_runs_dry() {
    // Two staging batches, and migrations that need both, back to back:
    // each must wait for the one before to be emptied (on the helper
    // thread), never fail.
    let n = 1024;
    let (space, dev, regions) = two_regions_two_batches(n);
    for round in 0..20 {
        for r in &regions {
            assert_eq!(dev.to_device(&space, r.range()).migrated, n, "round {round}");
        }
        for r in &regions {
            let mut m = Migration::setup(&space, r.range(), Select::DEVICE_PRIVATE, dev.owner).unwrap();
            dev.copy_out(&mut m).unwrap();
            assert_eq!(m.pages().finalize().migrated, n, "round {round}");
        }
    }
    for r in &regions {
        check(r, 0..n);
    }
}

/// A space with two staging batches, a device, and two filled regions of
/// `n` pages.
fn two_regions_two_batches(n: usize) -> (AddressSpace, Arc<TestDev>, Vec<uhmm::Region>) {
    let space = AddressSpace::new(Config { staging_bytes: 4 << 20, ..Config::default() }).unwrap();
    let dev = TestDev::new(&space);
    let regions: Vec<_> = (0..2).map(|_| space.map(n * PAGE_SIZE, Prot::READ_WRITE).unwrap()).collect();
    for r in &regions {
        fill(r, 0..n);
    }
    (space, dev, regions)
}

/// Driver memory of `n` pages, page `p` holding `p + 1` in every byte (what
/// [`fill`] writes), readable by the CPU.
fn filled_source(n: usize) -> Arc<uhmm::Mapping> {
    use uhmm::{Mapping, Protection};
    let src = Arc::new(Mapping::anonymous(n * PAGE_SIZE, Protection::ReadWrite, PAGE_SIZE).unwrap());
    for p in 0..n {
        src.write(p * PAGE_SIZE, &vec![(p as u8).wrapping_add(1); PAGE_SIZE]).unwrap();
    }
    src
}

/// Moves pages `0..n` of `r` (on `dev`) back to RAM from `src`, whose page
/// `p` holds `p + 1` in every byte; returns the pages migrated.
fn back_from(space: &AddressSpace, dev: &TestDev, r: &uhmm::Region, src: &Arc<uhmm::Mapping>) -> usize {
    let mut m = Migration::setup(space, r.range(), Select::DEVICE_PRIVATE, dev.owner).unwrap();
    for i in 0..m.npages() {
        m.set_dst_system_from(i, src, i * PAGE_SIZE).unwrap();
    }
    m.pages().finalize().migrated
}

/// In a space that keeps staging pages for [`SHORT_KEEP`]: `n` pages moved
/// to the device, then left for [`TRIM_WAIT`], come back without going
/// through kept pages (the helper gave them back meanwhile).
fn kept_pages_unused_for_a_while_are_freed(n: usize) {
    let space = space_keeping_for(SHORT_KEEP);
    let dev = TestDev::new(&space);
    let r = space.map(n * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 0..n);
    assert_eq!(dev.to_device(&space, r.range()).migrated, n);
    std::thread::sleep(TRIM_WAIT);
    let src = filled_source(n);
    assert_eq!(back_from(&space, &dev, &r, &src), n);
    check(&r, 0..n);
    assert_eq!(space.stats().kept_copied_pages, 0, "the kept pages were freed");
}

#[test]
fn copies_back_go_through_the_pages_a_migration_to_the_device_left() {
    use uhmm::Protection;
    let n = 2048;
    let src = filled_source(n);
    let (space, dev, r) = filled_on_device(n);
    for round in 0..3 {
        let before = space.stats().kept_copied_pages;
        assert_eq!(back_from(&space, &dev, &r, &src), n);
        check(&r, 0..n);
        assert_eq!(space.stats().kept_copied_pages - before, n as u64, "round {round}: all through kept pages");
        assert_eq!(dev.to_device(&space, r.range()).migrated, n);
    }
    // A source the CPU could fail to read is copied by the kernel.
    let before = space.stats().kept_copied_pages;
    src.protect(0, PAGE_SIZE, Protection::None).unwrap();
    src.protect(0, PAGE_SIZE, Protection::ReadWrite).unwrap();
    assert_eq!(back_from(&space, &dev, &r, &src), n);
    check(&r, 0..n);
    assert_eq!(space.stats().kept_copied_pages, before, "no CPU copy from memory once protected");
    // Unused for a while, they are given back: copies allocate again.
    kept_pages_unused_for_a_while_are_freed(n);
    // With nothing kept, the same round trips allocate every page.
    let space = AddressSpace::new(Config { keep_staging_bytes: 0, ..Config::default() }).unwrap();
    let dev = TestDev::new(&space);
    let r = space.map(n * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 0..n);
    dev.to_device(&space, r.range());
    assert_eq!(back_from(&space, &dev, &r, &src), n);
    check(&r, 0..n);
    assert_eq!(space.stats().kept_copied_pages, 0);
}

#[test]
fn a_copy_back_of_one_piece_goes_through_kept_pages_on_the_caller() {
    // One staging batch: the copy back is one piece, which the caller
    // copies alone (through the caches) into the pages the migration out
    // left, still holding the region's old data; the region must then hold
    // the driver's data, every round.
    let space = space();
    let dev = TestDev::new(&space);
    let r = space.map(uhmm::BATCH_PAGES * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    let helper = space.stats().helper_copied_pages;
    round_trips_through_kept_pages(&space, &dev, &r);
    assert_eq!(space.stats().helper_copied_pages, helper, "one piece stays on the caller");
}

/// Five rounds of: `r` written with the round's byte, moved to `dev`, then
/// moved back from driver memory holding other bytes. Each copy back must
/// go through kept pages, and leave the region with the driver's data.
fn round_trips_through_kept_pages(space: &AddressSpace, dev: &TestDev, r: &uhmm::Region) {
    use uhmm::{Mapping, Protection};
    let n = r.npages();
    let src = Arc::new(Mapping::anonymous(n * PAGE_SIZE, Protection::ReadWrite, PAGE_SIZE).unwrap());
    let driver_byte = |round: u8, p: usize| 0x80 | (p as u8 ^ round);
    for round in 0..5u8 {
        r.write(0, &vec![round; n * PAGE_SIZE]).unwrap();
        assert_eq!(dev.to_device(space, r.range()).migrated, n, "round {round}");
        for p in 0..n {
            src.write(p * PAGE_SIZE, &[driver_byte(round, p); PAGE_SIZE]).unwrap();
        }
        let before = space.stats().kept_copied_pages;
        assert_eq!(back_from(space, dev, r, &src), n, "round {round}");
        assert_eq!(space.stats().kept_copied_pages - before, n as u64, "round {round}: through kept pages");
        let mut b = vec![0; PAGE_SIZE];
        for p in 0..n {
            r.read(p * PAGE_SIZE, &mut b).unwrap();
            assert!(b.iter().all(|&x| x == driver_byte(round, p)), "round {round}, page {p}");
        }
    }
}

#[test]
fn a_small_copy_back_goes_through_the_batch_a_small_migration_left() {
    // 200 pages: less than a staging batch. The migration to the device
    // keeps its batch partly filled; the copy back goes through it, every
    // round, with the driver's data, never the region's old data.
    let n = 200;
    let space = space();
    let dev = TestDev::new(&space);
    let r = space.map(n * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    round_trips_through_kept_pages(&space, &dev, &r);
    // Unused for a while, the kept batch is emptied (by the helper, which
    // a small migration starts for that): the copy back allocates.
    kept_pages_unused_for_a_while_are_freed(n);
    let src = filled_source(2 * n);
    // A copy back of more pages than the batch holds does not use it.
    let r2 = space.map(2 * n * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r2, 0..2 * n);
    assert_eq!(dev.to_device(&space, r.range()).migrated, n);
    assert_eq!(dev.to_device(&space, r2.range()).migrated, 2 * n);
    let before = space.stats().kept_copied_pages;
    assert_eq!(back_from(&space, &dev, &r2, &src), 2 * n);
    check(&r2, 0..2 * n);
    assert_eq!(space.stats().kept_copied_pages - before, 2 * n as u64, "through the 400-page batch, not the 200");
    let before = space.stats().kept_copied_pages;
    assert_eq!(back_from(&space, &dev, &r, &src), n);
    check(&r, 0..n);
    assert_eq!(space.stats().kept_copied_pages - before, n as u64);
}

#[test]
fn copies_back_that_allocate_shed_the_pages_kept_for_them() {
    // Room to keep two batches: the first region's migration to the device
    // fills it. The second region's migrations find no room. Brought back
    // 16 pages at a time (as faults would be: copies too small to go
    // through kept pages), the second region takes 1024 new pages from the
    // kernel, so the two kept batches are shed: the first region's copy
    // back then finds none to go through. Were they still kept, it would.
    let n = 2 * uhmm::BATCH_PAGES;
    let space = AddressSpace::new(Config {
        keep_staging_bytes: 4 << 20,
        keep_staging_for: Duration::from_secs(600),
        ..Config::default()
    })
    .unwrap();
    let dev = TestDev::new(&space);
    let src = filled_source(n);
    let (r1, r2) =
        (space.map(n * PAGE_SIZE, Prot::READ_WRITE).unwrap(), space.map(n * PAGE_SIZE, Prot::READ_WRITE).unwrap());
    fill(&r1, 0..n);
    fill(&r2, 0..n);
    assert_eq!(dev.to_device(&space, r1.range()).migrated, n);
    // In migrations of less than a batch: their slots are given back on
    // this thread (a bigger one's would be emptied on the helper, and were
    // that late, the batches shed below would make room to keep them).
    for first in (0..n).step_by(256) {
        let range = r2.addr() + first * PAGE_SIZE..r2.addr() + (first + 256) * PAGE_SIZE;
        assert_eq!(dev.to_device(&space, range).migrated, 256);
    }
    let before = space.stats().kept_copied_pages;
    for first in (0..n).step_by(16) {
        let range = r2.addr() + first * PAGE_SIZE..r2.addr() + (first + 16) * PAGE_SIZE;
        let mut m = Migration::setup(&space, range, Select::DEVICE_PRIVATE, dev.owner).unwrap();
        for i in 0..m.npages() {
            m.set_dst_system_from(i, &src, (first + i) * PAGE_SIZE).unwrap();
        }
        assert_eq!(m.pages().finalize().migrated, 16);
    }
    check(&r2, 0..n);
    assert_eq!(space.stats().kept_copied_pages, before, "small copies allocate");
    assert_eq!(space.stats().kept_shed_pages, n as u64, "as many kept pages shed");
    assert_eq!(back_from(&space, &dev, &r1, &src), n);
    check(&r1, 0..n);
    assert_eq!(space.stats().kept_copied_pages, before, "the kept batches were shed");
}

#[test]
fn runs_coming_back_fill_kept_batches_in_turn() {
    // Two batches of pages on the device but for page 100, back in RAM:
    // the copy back is two runs, 100 and 923 pages, and the two batches
    // the migration to the device kept take both (a batch a run would
    // take three).
    let n = 2 * uhmm::BATCH_PAGES;
    let space = space();
    let dev = TestDev::new(&space);
    let r = space.map(n * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 0..n);
    let src = filled_source(n);
    assert_eq!(dev.to_device(&space, r.range()).migrated, n);
    let mut m = Migration::setup(
        &space,
        r.addr() + 100 * PAGE_SIZE..r.addr() + 101 * PAGE_SIZE,
        Select::DEVICE_PRIVATE,
        dev.owner,
    )
    .unwrap();
    m.set_dst_system_from(0, &src, 100 * PAGE_SIZE).unwrap();
    assert_eq!(m.pages().finalize().migrated, 1);
    let before = space.stats().kept_copied_pages;
    let mut m = Migration::setup(&space, r.range(), Select::DEVICE_PRIVATE, dev.owner).unwrap();
    for i in (0..n).filter(|&i| i != 100) {
        m.set_dst_system_from(i, &src, i * PAGE_SIZE).unwrap();
    }
    assert_eq!(m.pages().finalize().migrated, n - 1);
    check(&r, 0..n);
    assert_eq!(space.stats().kept_copied_pages - before, n as u64 - 1, "both runs through the kept batches");
}

#[test]
fn whole_huge_blocks_come_back_as_huge_pages_shared_with_the_helper() {
    // Four 2 MiB blocks of a huge-page region: each comes back through a
    // kept batch (the huge page that moved out of it), as one piece of the
    // copy the helper shares; with nothing kept, through huge pool pages.
    let n = 4 * uhmm::BATCH_PAGES;
    let src = filled_source(n);
    let huge_ram = |space: &AddressSpace, r: &uhmm::Region| space.snapshot(r.range()).unwrap().iter().all(|p| p.huge);
    for keep in [true, false] {
        let keep_staging_bytes = if keep { Config::default().keep_staging_bytes } else { 0 };
        let space = AddressSpace::new(Config {
            keep_staging_bytes,
            keep_staging_for: Duration::from_secs(600),
            ..Config::default()
        })
        .unwrap();
        let dev = TestDev::new(&space);
        let r = space.map_huge(n * PAGE_SIZE, Prot::READ_WRITE).unwrap();
        fill(&r, 0..n);
        assert!(huge_ram(&space, &r), "first touch maps huge pages");
        let started = std::time::Instant::now();
        for round in 0.. {
            assert_eq!(dev.to_device(&space, r.range()).migrated, n, "keep {keep}, round {round}");
            let kept = space.stats().kept_copied_pages;
            assert_eq!(back_from(&space, &dev, &r, &src), n, "keep {keep}, round {round}");
            check(&r, 0..n);
            assert!(huge_ram(&space, &r), "keep {keep}, round {round}: whole blocks come back as huge pages");
            let through_kept = space.stats().kept_copied_pages - kept;
            assert_eq!(through_kept, if keep { n as u64 } else { 0 }, "keep {keep}, round {round}");
            // Which thread copies a block depends on when the helper wakes.
            if !keep || space.stats().helper_copied_pages > 0 || started.elapsed() > HELPER_WAIT {
                break;
            }
        }
        if keep {
            assert!(space.stats().helper_copied_pages > 0, "the helper never copied a block");
        }
    }
}

#[test]
fn kept_pages_go_back_to_staging_when_the_copy_is_done() {
    // Two staging batches, both kept after each migration to the device
    // and taken by the copy back: the next migration needs them at once,
    // whether or not the helper thread has looked at that copy yet.
    let n = 1024;
    let (space, dev, regions) = two_regions_two_batches(n);
    let src = filled_source(n);
    for round in 0..200 {
        for r in &regions {
            assert_eq!(dev.to_device(&space, r.range()).migrated, n, "round {round}");
            assert_eq!(back_from(&space, &dev, r, &src), n, "round {round}");
        }
    }
    for r in &regions {
        check(r, 0..n);
    }
    assert!(space.stats().kept_copied_pages > 0);
}

/// The CPU list (`Cpus_allowed_list` of /proc/self/task/TID/status) of each
/// thread of this process named `name`.
fn cpus_of_threads_named(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        out.extend(cpu_list(&status));
    }
    out
}

/// The `Cpus_allowed_list` of a /proc status file.
fn cpu_list(status: &str) -> Option<String> {
    status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).map(|l| l.trim().to_string())
}

#[test]
fn handler_threads_run_on_the_cpus_asked_for_and_serve_faults() {
    let allowed = uhmm_sys::process::allowed_cpus().unwrap();
    let cpu = *allowed.last().unwrap();
    let config = Config { handler_threads: 2, handler_cpus: vec![cpu], ..Config::default() };
    let space = AddressSpace::new(config).unwrap();
    // Both handlers pinned (other tests' unpinned handlers may run beside).
    let want = cpu.to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !["uhmm-fault-0", "uhmm-fault-1"].iter().all(|n| cpus_of_threads_named(n).contains(&want)) {
        assert!(std::time::Instant::now() < deadline, "no handler thread pinned to CPU {cpu}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let dev = TestDev::new(&space);
    let r = space.map(8 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 0..8);
    dev.to_device(&space, r.range());
    check(&r, 0..8); // every page back through the pinned handlers
    assert!(space.stats().migrate_to_ram > 0, "the pages came back by faults");

    // A CPU the process may not use is refused, and nothing is started.
    let bad = (0..rustix::thread::CpuSet::MAX_CPU + 1).find(|c| !allowed.contains(c)).unwrap();
    let e = AddressSpace::new(Config { handler_cpus: vec![cpu, bad], ..Config::default() }).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
}

#[test]
fn the_copy_helper_runs_where_the_space_was_made_not_where_it_was_started() {
    // The helper starts when first needed, on whichever thread needs it:
    // here this thread, pinned to one CPU after making the space (as a
    // fault handler on `handler_cpus` may be). The helper must not keep
    // that pin: it would share the CPU it is there to take work off. (On
    // a machine of one CPU this cannot tell.)
    let allowed = uhmm_sys::process::allowed_cpus().unwrap();
    let want = cpu_list(&std::fs::read_to_string("/proc/thread-self/status").unwrap()).unwrap();
    // Nothing kept: a migration's slots are emptied on the helper.
    let space = AddressSpace::new(Config { keep_staging_bytes: 0, ..Config::default() }).unwrap();
    let dev = TestDev::new(&space);
    let n = uhmm::BATCH_PAGES;
    let r = space.map(n * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 0..n);
    uhmm_sys::process::set_thread_cpus(&allowed[..1]).unwrap();
    dev.to_device(&space, r.range());
    uhmm_sys::process::set_thread_cpus(&allowed).unwrap();
    // A helper sets its CPUs as it starts; other tests' helpers run
    // beside, and none may stay pinned either.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let helpers = cpus_of_threads_named("uhmm-copier");
        if !helpers.is_empty() && helpers.iter().all(|h| *h == want) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "copy helpers on {helpers:?}, not {want}");
        std::thread::sleep(Duration::from_millis(10));
    }
    check(&r, 0..n);
}

/// A driver fills RAM pages in place (`system_dst_bytes`) and brings zero
/// pages back as the zero page (`set_dst_zero`): the data comes back, the
/// zero pages take no RAM, and bad runs are refused without changing
/// anything.
#[test]
#[allow(clippy::single_range_in_vec_init)] // one run, in the API's list of runs
fn pages_come_back_filled_in_place_or_as_the_zero_page() {
    let space = space();
    let (region, dev) = TestDev::attach(&space, 8);
    fill(&region, 0..4);
    region.write(4 * PAGE_SIZE, &vec![0; 4 * PAGE_SIZE]).unwrap();
    assert_eq!(dev.to_device(&space, region.range()).migrated, 8);

    let mut m = Migration::setup(&space, region.range(), Select::DEVICE_PRIVATE, dev.owner).unwrap();
    assert_eq!(m.system_dst_bytes(&[0..2, 1..3]).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(m.system_dst_bytes(&[0..9]).unwrap_err().kind(), ErrorKind::InvalidArgument);
    let _lent = m.system_dst(3).unwrap();
    assert_eq!(m.system_dst_bytes(&[2..4]).unwrap_err().kind(), ErrorKind::InvalidArgument);
    let mem = dev.mem.lock().unwrap().clone();
    let pfn = |m: &Migration, i: usize| match m.src(i) {
        MigrateSrc::Device(p) => p.pfn.0,
        other => panic!("page {i} is {other:?}"),
    };
    let pfns: Vec<u64> = (0..8).map(|i| pfn(&m, i)).collect();
    {
        let mut runs = m.system_dst_bytes(&[0..3]).unwrap();
        for (k, page) in runs[0].chunks_mut(PAGE_SIZE).enumerate() {
            page.copy_from_slice(&mem[&pfns[k]]);
        }
    }
    for i in 0..3 {
        m.set_dst_system(i).unwrap();
    }
    m.system_dst(3).unwrap().write(0, &mem[&pfns[3]]).unwrap();
    m.set_dst_system(3).unwrap();
    for i in 4..8 {
        m.set_dst_zero(i).unwrap();
    }
    let summary = m.pages().finalize();
    assert_eq!(summary.migrated, 8);
    check(&region, 0..4);
    let states = space.snapshot(region.range()).unwrap();
    assert!(states[..4].iter().all(|p| p.residency == Residency::Ram), "{states:?}");
    assert!(states[4..].iter().all(|p| p.residency == Residency::Zero), "zero pages take no RAM: {states:?}");
    let mut buf = vec![1; 4 * PAGE_SIZE];
    region.read(4 * PAGE_SIZE, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    region.write(5 * PAGE_SIZE, b"written").unwrap();
    region.read(5 * PAGE_SIZE, &mut buf[..7]).unwrap();
    assert_eq!(&buf[..7], b"written");
    assert!(dev.mem.lock().unwrap().is_empty(), "every device page was freed");
}

/// A RAM page cannot come back as the zero page: only a driver's page or a
/// hole can.
#[test]
fn a_ram_page_cannot_become_the_zero_page() {
    let space = space();
    let (region, dev) = TestDev::attach(&space, 1);
    let mut m = Migration::setup(&space, region.range(), Select::SYSTEM, dev.owner).unwrap();
    assert_eq!(m.set_dst_zero(0).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(m.dst(0), MigrateDst::None);
    drop(m);
    let mut b = [0; 1];
    region.read(0, &mut b).unwrap();
    assert_eq!(b, [1]);
}
