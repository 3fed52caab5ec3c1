//! The Semantics conformance scenarios (CONFORMANCE.md, S01–S22) that uhmm
//! supports so far; the rest are listed in docs/conformance.md.

mod common;

use common::*;
use uhmm::{ErrorKind, PAGE_SIZE, Prot};
use uhmm_devices::sim::PageState;

#[test]
fn s01_anon_read_prot() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, NPAGES);
        fill(&region, 0..NPAGES, |i| i);
        region.protect(0..region.len(), Prot::NONE).unwrap();
        let mut buf = vec![0xA5u8; region.len()];
        let e = dev.read(region.addr(), NPAGES, &mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Fault);
        assert_eq!(e.errno(), 14);
        assert!(buf.iter().all(|b| *b == 0xA5), "device buffer untouched");
        region.protect(0..region.len(), Prot::READ).unwrap();
        assert_words(&cpu_read(&region), |i| i);
    });
}

#[test]
fn s02_anon_write_prot() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, NPAGES);
        region.protect(0..region.len(), Prot::READ).unwrap();
        let mut one = vec![0u8; PAGE_SIZE];
        let c = dev.read(region.addr(), 1, &mut one).unwrap();
        assert_eq!((c.cpages, c.faults), (1, 1));
        assert!(one.iter().all(|b| *b == 0));
        let data = pattern(NPAGES, |i| i);
        let e = dev.write(region.addr(), NPAGES, &data).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permission);
        assert_eq!(e.errno(), 1);
        assert!(cpu_read(&region).iter().all(|b| *b == 0), "nothing was written");
        region.protect(0..region.len(), Prot::READ_WRITE).unwrap();
        let c = dev.write(region.addr(), NPAGES, &data).unwrap();
        assert_eq!(c.cpages, NPAGES);
        assert_words(&cpu_read(&region), |i| i);
    });
}

#[test]
fn s09_migrate_release() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, NPAGES);
        fill(&region, 0..NPAGES, |i| i);
        assert_eq!(dev.migrate_to_device_all(region.addr(), NPAGES).unwrap().cpages, NPAGES);
        assert_eq!(dev.release().unwrap(), NPAGES);
        assert_eq!(dev.pages_in_use(), 0);
        let snap = dev.snapshot(region.addr(), NPAGES).unwrap();
        assert!(snap.iter().all(|s| *s == PageState::WRITE), "every page back in RAM");
        assert_words(&cpu_read(&region), |i| i);
    });
}

#[test]
fn s10_migrate_mixed() {
    with_timeout(60, || {
        let space = space();
        let dev0 = device(&space);
        let dev1 = device(&space);
        // A region without read access: invalid argument.
        let none = map(&space, 6);
        none.protect(0..none.len(), Prot::NONE).unwrap();
        assert_eq!(dev1.migrate_to_device(none.addr(), 6).unwrap_err().kind(), ErrorKind::InvalidArgument);
        // A range running into unmapped space: invalid argument.
        let short = map(&space, 1);
        assert_eq!(dev1.migrate_to_device(short.addr(), 3).unwrap_err().kind(), ErrorKind::InvalidArgument);
        // Page 2 a read-only zero page, 3 read-only data, 4-5 read-write.
        let r = map(&space, 6);
        let p = |n: usize| n * PAGE_SIZE;
        r.protect(p(2)..p(3), Prot::READ).unwrap();
        let mut b = [0u8; 4];
        r.read(p(2), &mut b).unwrap();
        r.write(p(3), &pattern(1, |i| i + 3 * WORDS_PER_PAGE as u32)).unwrap();
        r.protect(p(3)..p(4), Prot::READ).unwrap();
        fill(&r, 4..6, |i| i);
        let c = dev1.migrate_to_device_all(r.addr() + p(2), 4).unwrap();
        assert_eq!(c.cpages, 4);
        // Page 5 is on device 1: device 0 finds nothing to migrate.
        assert_eq!(dev0.migrate_to_device(r.addr() + p(5), 1).unwrap_err().kind(), ErrorKind::NotFound);
        let buf = cpu_read(&r);
        assert!(buf[p(2)..p(3)].iter().all(|b| *b == 0));
        assert_words(&buf[p(3)..], |i| i + 3 * WORDS_PER_PAGE as u32);
    });
}

#[test]
fn s11_snapshot_two_devices() {
    with_timeout(60, || {
        let space = space();
        let dev0 = device(&space);
        let dev1 = device(&space);
        let r = map(&space, 2);
        fill(&r, 0..2, |i| i);
        dev0.migrate_to_device_all(r.addr(), 1).unwrap();
        dev1.migrate_to_device_all(r.addr() + PAGE_SIZE, 1).unwrap();
        let snap = dev0.snapshot(r.addr(), 2).unwrap();
        assert_eq!(snap, vec![PageState::DEV_PRIVATE_LOCAL | PageState::WRITE, PageState::NONE]);
        let snap = dev1.snapshot(r.addr(), 2).unwrap();
        assert_eq!(snap, vec![PageState::NONE, PageState::DEV_PRIVATE_LOCAL | PageState::WRITE]);
    });
}

#[test]
fn s12_double_map() {
    with_timeout(60, || {
        let space = space();
        let dev0 = device(&space);
        let dev1 = device(&space);
        let r = map(&space, NPAGES);
        fill(&r, 0..NPAGES, |i| i);
        r.protect(0..r.len(), Prot::READ).unwrap();
        let mut buf = vec![0u8; r.len()];
        for dev in [&dev0, &dev1] {
            buf.fill(0);
            assert_eq!(dev.read(r.addr(), NPAGES, &mut buf).unwrap().cpages, NPAGES);
            assert_words(&buf, |i| i);
        }
        assert_eq!(dev1.migrate_to_device_all(r.addr(), NPAGES).unwrap().cpages, NPAGES);
        buf.fill(0);
        let c = dev0.read(r.addr(), NPAGES, &mut buf).unwrap();
        assert_eq!(c.cpages, NPAGES);
        assert_words(&buf, |i| i);
        assert_eq!(dev1.pages_in_use(), 0, "device 0's read brought every page back through device 1");
        assert!(dev0.snapshot(r.addr(), NPAGES).unwrap().iter().all(|s| *s == PageState::READ));
    });
}

#[test]
fn s16_pin_device_pages() {
    use uhmm::PinKind;
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let r = map(&space, 4);
        fill(&r, 0..4, |i| i);
        assert_eq!(dev.migrate_to_device_all(r.addr(), 4).unwrap().cpages, 4);
        let page = |n: usize| r.addr() + n * PAGE_SIZE..r.addr() + (n + 2) * PAGE_SIZE;
        let long = space.pin(page(2), PinKind::LongTerm).unwrap();
        let short = space.pin(page(0), PinKind::ShortTerm).unwrap();
        // Private device pages come back for any pin.
        assert!(dev.snapshot(r.addr(), 4).unwrap().iter().all(|s| *s == PageState::WRITE));
        assert_eq!(dev.pages_in_use(), 0);
        // Pinned pages are never migrated.
        assert_eq!(dev.migrate_to_device(r.addr(), 4).unwrap_err().kind(), ErrorKind::Busy);
        assert_eq!(dev.pages_in_use(), 0);
        assert_words(&cpu_read(&r), |i| i);
        drop(short);
        let c = dev.migrate_to_device(r.addr(), 4).unwrap();
        assert_eq!((c.cpages, c.left.pinned + c.left.busy), (2, 2), "pages 2-3 are still pinned: {c:?}");
        assert_eq!(dev.pages_in_use(), 2, "pages 0-1 moved once unpinned");
        drop(long);
        assert_eq!(dev.migrate_to_device_all(r.addr(), 4).unwrap().cpages, 4);
        assert_words(&cpu_read(&r), |i| i);
    });
}

#[test]
fn pins_need_writable_memory() {
    with_timeout(60, || {
        let space = space();
        let r = map(&space, 4);
        r.protect(0..r.len(), Prot::READ).unwrap();
        let e = space.pin(r.range(), uhmm::PinKind::LongTerm).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permission);
        let e = space.pin(r.addr()..r.addr() + 5 * PAGE_SIZE, uhmm::PinKind::LongTerm).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    });
}

// ---- Mirrors: the device page table kept between accesses (issue 3, item 1) ----

#[test]
fn mirror_is_kept_and_invalidated() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let other = device(&space);
        let r = map(&space, 64);
        fill(&r, 0..64, |i| i);
        let mut buf = vec![0u8; r.len()];
        assert_eq!(dev.read(r.addr(), 64, &mut buf).unwrap().faults, 1);
        assert_eq!(dev.read(r.addr(), 64, &mut buf).unwrap().faults, 0, "the mirror keeps RAM pages");
        // Another device migrates half: the mirror is invalidated there.
        other.migrate_to_device_all(r.addr(), 32).unwrap();
        buf.fill(0);
        assert_eq!(dev.read(r.addr(), 64, &mut buf).unwrap().faults, 1);
        assert_words(&buf, |i| i);
        assert_eq!(other.pages_in_use(), 0, "the read brought the other device's pages back");
        // A protection change invalidates too; a write then needs write access.
        r.protect(0..r.len(), Prot::READ).unwrap();
        assert_eq!(dev.write(r.addr(), 1, &buf).unwrap_err().kind(), ErrorKind::Permission);
        r.protect(0..r.len(), Prot::READ_WRITE).unwrap();
        let c = dev.write(r.addr(), 64, &pattern(64, |i| i + 1)).unwrap();
        assert_eq!(c.faults, 1);
        assert_words(&cpu_read(&r), |i| i + 1);
    });
}

#[test]
fn mirror_stays_coherent_under_migrations() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    with_timeout(300, || {
        const N: usize = 32;
        let space = space();
        let writer_dev = Arc::new(device(&space));
        let mover = device(&space);
        let r = Arc::new(map(&space, N));
        fill(&r, 0..N, |_| 0);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (dev, r, stop) = (writer_dev.clone(), r.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut round = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    round += 1;
                    dev.write(r.addr(), N, &pattern(N, |_| round)).unwrap();
                }
                round
            })
        };
        for _ in 0..50 {
            let _ = mover.migrate_to_device(r.addr(), N);
            mover.migrate_to_system(r.addr(), N).unwrap();
            let _ = mover.migrate_to_device(r.addr(), N);
            let mut b = [0u8; 4];
            r.read(0, &mut b).unwrap(); // and the CPU faults a page back
        }
        stop.store(true, Ordering::SeqCst);
        let last = writer.join().unwrap();
        assert!(last > 0);
        assert_words(&cpu_read(&r), |_| last);
    });
}

// ---- File-backed and shared regions (issue 3, item 10) ----

/// A temporary file of `npages` pages filled with word i, removed on drop.
struct TempFile(std::path::PathBuf, std::fs::File);

impl TempFile {
    fn new(tag: &str, npages: usize) -> TempFile {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("uhmm-{tag}-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.write_all(&pattern(npages, |i| i)).unwrap();
        TempFile(path, f)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn s06_file_read_write() {
    use std::os::unix::fs::FileExt;
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let file = TempFile::new("s06", NPAGES);
        let r = space.map_file(&file.1, 0, NPAGES * PAGE_SIZE, Prot::READ_WRITE, true).unwrap();
        assert_eq!(r.backing(), uhmm::Backing::File { shared: true });
        let mut buf = vec![0u8; r.len()];
        let c = dev.read(r.addr(), NPAGES, &mut buf).unwrap();
        assert_eq!((c.cpages, c.faults), (NPAGES, 1));
        assert_words(&buf, |i| i);
        let c = dev.write(r.addr(), NPAGES, &pattern(NPAGES, |i| !i)).unwrap();
        assert_eq!(c.cpages, NPAGES);
        let mut disk = vec![0u8; r.len()];
        file.1.read_exact_at(&mut disk, 0).unwrap();
        assert_words(&disk, |i| !i);
        // Migration skips file pages: nothing moves.
        assert_eq!(dev.migrate_to_device(r.addr(), NPAGES).unwrap_err().kind(), ErrorKind::NotFound);
    });
}

#[test]
fn s07_migrate_shared() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let r = space.map_shared(NPAGES * PAGE_SIZE, Prot::READ_WRITE).unwrap();
        let e = dev.migrate_to_device(r.addr(), NPAGES).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(dev.pages_in_use(), 0);
        // Devices still read and write it.
        dev.write(r.addr(), NPAGES, &pattern(NPAGES, |i| i)).unwrap();
        assert_words(&cpu_read(&r), |i| i);
    });
}

#[test]
fn s08_migrate_file_private_is_skipped() {
    // The kernel migrates the anonymous copies in a private file mapping;
    // uhmm cannot: userfaultfd's MISSING mode does not cover file mappings,
    // so uhmm could not catch the CPU's access to a page it moved away. The
    // nearest behaviour: nothing migrates, and the data stays right.
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let file = TempFile::new("s08", 16);
        let r = space.map_file(&file.1, 0, 16 * PAGE_SIZE, Prot::READ_WRITE, false).unwrap();
        r.write(0, &pattern(16, |i| i + 1)).unwrap(); // every page becomes an anonymous copy
        assert_eq!(dev.migrate_to_device(r.addr(), 16).unwrap_err().kind(), ErrorKind::NotFound);
        let mut buf = vec![0u8; r.len()];
        dev.read(r.addr(), 16, &mut buf).unwrap();
        assert_words(&buf, |i| i + 1);
        use std::os::unix::fs::FileExt;
        let mut disk = vec![0u8; r.len()];
        file.1.read_exact_at(&mut disk, 0).unwrap();
        assert_words(&disk, |i| i); // private: the file is unchanged
    });
}

// ---- Program-side changes while pages are away (issue 3, item 9) ----

#[test]
fn s18_anon_teardown() {
    use std::sync::Arc;
    with_timeout(120, || {
        let space = space();
        let dev = Arc::new(device(&space));
        for round in 0..10u32 {
            let r = Arc::new(map(&space, NPAGES));
            fill(&r, 0..NPAGES, |i| i ^ round);
            if round % 2 == 1 {
                dev.migrate_to_device_all(r.addr(), NPAGES).unwrap();
            }
            let reader = {
                let (dev, r) = (dev.clone(), r.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; r.len()];
                    match dev.read(r.addr(), NPAGES, &mut buf) {
                        Ok(c) => {
                            assert_eq!(c.cpages, NPAGES);
                            assert_words(&buf, |i| i ^ round);
                        }
                        Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}"),
                    }
                })
            };
            r.unmap(r.len() / 2..r.len()).unwrap();
            reader.join().unwrap();
            // The kept half is intact; the unmapped half is gone for good.
            let mut half = vec![0u8; r.len() / 2];
            r.read(0, &mut half).unwrap();
            assert_words(&half, |i| i ^ round);
            assert_eq!(r.read(r.len() / 2, &mut [0u8; 4]).unwrap_err().kind(), ErrorKind::Fault);
        }
        assert_eq!(dev.pages_in_use(), 0, "unmapped device pages were freed");
    });
}

#[test]
fn s20_partial_unmap() {
    with_timeout(120, || {
        let space = space();
        let dev = device(&space);
        let n = NPAGES;
        for (lo, hi) in [(0, n / 2), (n / 4, 3 * n / 4), (n / 2, n)] {
            for migrate_before in [false, true] {
                let r = map(&space, n);
                fill(&r, 0..n, |i| i);
                if migrate_before {
                    dev.migrate_to_device_all(r.addr(), n).unwrap();
                }
                r.unmap(lo * PAGE_SIZE..hi * PAGE_SIZE).unwrap();
                let kept: Vec<std::ops::Range<usize>> = [0..lo, hi..n].into_iter().filter(|k| !k.is_empty()).collect();
                if !migrate_before {
                    for k in &kept {
                        dev.migrate_to_device_all(r.addr() + k.start * PAGE_SIZE, k.len()).unwrap();
                    }
                }
                // A range with unmapped pages is an invalid argument.
                assert_eq!(dev.migrate_to_device(r.addr(), n).unwrap_err().kind(), ErrorKind::InvalidArgument);
                for k in &kept {
                    let mut buf = vec![0u8; k.len() * PAGE_SIZE];
                    r.read(k.start * PAGE_SIZE, &mut buf).unwrap();
                    let base = (k.start * WORDS_PER_PAGE) as u32;
                    assert_words(&buf, |i| i + base);
                }
                assert_eq!(dev.pages_in_use(), 0, "({lo}, {hi}, {migrate_before})");
                let snap = space.snapshot(r.range()).unwrap();
                assert!(snap[lo..hi].iter().all(|p| p.residency == uhmm::Residency::Unmapped));
            }
        }
    });
}

// ---- Huge pages (issue 3, item 11) ----

#[test]
fn s05_anon_write_huge() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let r = space.map_huge(4 << 20, Prot::READ_WRITE).unwrap();
        assert!(r.addr().is_multiple_of(uhmm::HUGE_SIZE));
        let n = r.npages();
        let c = dev.write(r.addr(), n, &pattern(n, |i| i)).unwrap();
        assert_eq!(c.cpages, n);
        assert_words(&cpu_read(&r), |i| i);
    });
}

#[test]
fn s19_huge_migrations() {
    with_timeout(120, || {
        let space = space();
        let dev = device(&space);
        let n = 1024; // two 2 MiB blocks
        let huge_ram = |r: &uhmm::Region| space.snapshot(r.range()).unwrap().iter().all(|p| p.huge);
        // Empty: holes become zero-filled compound device pages.
        let r = space.map_huge(n * PAGE_SIZE, Prot::READ_WRITE).unwrap();
        assert_eq!(dev.migrate_to_device_all(r.addr(), n).unwrap().cpages, n);
        assert_eq!(dev.huge_stats(), (2, 0));
        assert!(cpu_read(&r).iter().all(|b| *b == 0));
        // Written: first touch fills whole huge pages; they move as compound units.
        let r = space.map_huge(n * PAGE_SIZE, Prot::READ_WRITE).unwrap();
        fill(&r, 0..n, |i| i);
        assert!(space.stats().huge_fills >= 2);
        assert!(huge_ram(&r), "first touch of a huge region maps huge pages");
        assert_eq!(dev.migrate_to_device_all(r.addr(), n).unwrap().cpages, n);
        assert_eq!(dev.huge_stats(), (4, 0));
        assert_eq!(dev.migrate_to_system(r.addr(), n).unwrap().cpages, n);
        assert!(huge_ram(&r), "whole blocks come back as huge pages");
        assert_words(&cpu_read(&r), |i| i);
        // Back to the device, then the CPU faults a page: the fault-around window comes back.
        dev.migrate_to_device_all(r.addr(), n).unwrap();
        let mut b = [0u8; 4];
        r.read(5 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(u32::from_ne_bytes(b), (5 * WORDS_PER_PAGE) as u32);
        assert_words(&cpu_read(&r), |i| i);
        // An allocation failure falls back to small pages, visibly.
        let before = dev.huge_stats();
        dev.fail_next_alloc();
        assert_eq!(dev.migrate_to_device_all(r.addr(), n).unwrap().cpages, n);
        let after = dev.huge_stats();
        assert_eq!((after.0 - before.0, after.1 - before.1), (1, 1), "one block compound, one small after the failure");
        assert_words(&cpu_read(&r), |i| i);
    });
}

#[test]
fn s20_remap() {
    with_timeout(120, || {
        let space = space();
        let dev = device(&space);
        for huge in [false, true] {
            for migrate_before in [false, true] {
                let n = NPAGES;
                let r = if huge { space.map_huge(n * PAGE_SIZE, Prot::READ_WRITE).unwrap() } else { map(&space, n) };
                fill(&r, 0..n, |i| i);
                if migrate_before {
                    // half on the device, half in RAM
                    dev.migrate_to_device_all(r.addr(), n / 2).unwrap();
                }
                let old = r.addr();
                let new = r.remap().unwrap();
                assert_ne!(new, old);
                assert_eq!(r.addr(), new);
                assert_eq!(dev.read(old, 1, &mut [0u8; PAGE_SIZE]).unwrap_err().kind(), ErrorKind::InvalidArgument);
                if !migrate_before {
                    dev.migrate_to_device_all(new, n).unwrap();
                }
                let mut buf = vec![0u8; r.len()];
                let c = dev.read(new, n, &mut buf).unwrap();
                assert_eq!(c.cpages, n);
                assert_words(&buf, |i| i);
                assert_words(&cpu_read(&r), |i| i);
                assert_eq!(dev.pages_in_use(), 0, "every page came back at its new address");
                // The moved region keeps working: migrate and fault again.
                dev.migrate_to_device_all(new, n).unwrap();
                assert_words(&cpu_read(&r), |i| i);
            }
        }
    });
}

#[test]
fn fault_next_to_an_unmapped_page_brings_data_back() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let r = map(&space, 32);
        fill(&r, 0..32, |i| i);
        dev.migrate_to_device_all(r.addr(), 32).unwrap();
        r.unmap(5 * PAGE_SIZE..6 * PAGE_SIZE).unwrap();
        // Page 3's fault-around window holds the unmapped page 5: it must
        // shrink, not fail (a failure would poison a good page).
        let mut page = vec![0u8; PAGE_SIZE];
        r.read(3 * PAGE_SIZE, &mut page).unwrap();
        assert_words(&page, |i| i + 3 * WORDS_PER_PAGE as u32);
        for p in (0..32).filter(|&p| p != 5) {
            r.read(p * PAGE_SIZE, &mut page).unwrap();
            assert_words(&page, |i| i + (p * WORDS_PER_PAGE) as u32);
        }
        assert_eq!(space.stats().poisoned_pages, 0);
    });
}

#[test]
fn scans_up_or_down_a_region_fault_in_growing_windows() {
    with_timeout(60, || {
        const PAGES: usize = 1024;
        // Default fault-around: 16 pages, growing to 512 along a scan.
        let space = space();
        let dev = device(&space);
        let r = on_device(&space, &dev, PAGES);
        let mut word = [0u8; 4];
        // Reads one word of each page in `order`, all from the device; the faults it took.
        let scan = |order: &mut dyn Iterator<Item = usize>, word: &mut [u8; 4]| {
            assert_eq!(dev.migrate_to_device_all(r.addr(), PAGES).unwrap().cpages, PAGES);
            let before = space.stats().faults;
            for p in order {
                r.read(p * PAGE_SIZE, word).unwrap();
                assert_eq!(u32::from_ne_bytes(*word), (p * WORDS_PER_PAGE) as u32, "page {p}");
            }
            space.stats().faults - before
        };
        // 16 + 32 + ... + 512 pages: 7 faults; 64 at a fixed 16.
        let up = scan(&mut (0..PAGES), &mut word);
        assert!(up <= 8, "{up} faults scanning up");
        // Down, as glibc's memcpy runs a large copy: also growing windows.
        let down = scan(&mut (0..PAGES).rev(), &mut word);
        assert!(down <= 8, "{down} faults scanning down");
        // Scattered: the base window each time.
        let scattered = scan(&mut (0..PAGES).map(|k| k * 37 % PAGES), &mut word);
        assert!(scattered >= 48, "{scattered} faults for scattered reads");
        assert_eq!(space.stats().poisoned_pages, 0);
    });
}

#[test]
fn a_fault_above_pages_back_in_ram_brings_back_as_large_a_window() {
    // A scan that came from below without faulting there (the head of a
    // large read, copied first by glibc's memcpy; the next chunk of a read
    // after one copied backwards): its first fault above takes a window as
    // large as the run of pages in RAM below it, up to the maximum.
    with_timeout(60, || {
        const PAGES: usize = 1024;
        let space = space();
        let dev = device(&space);
        let r = on_device(&space, &dev, PAGES);
        let on_ram = |pages: std::ops::Range<usize>| pages_in_ram(&space, &r, pages);
        assert_eq!(dev.migrate_to_system(r.addr() + 512 * PAGE_SIZE, 200).unwrap().cpages, 200);
        let mut word = [0u8; 4];
        r.read(712 * PAGE_SIZE, &mut word).unwrap();
        assert_eq!(u32::from_ne_bytes(word), (712 * WORDS_PER_PAGE) as u32);
        assert_eq!(on_ram(712..912), 200, "one window of 200 pages");
        assert_eq!(on_ram(912..PAGES), 0, "and no more");
        // A window never leaves the 2 MiB block of the fault.
        dev.migrate_to_device_all(r.addr(), PAGES).unwrap();
        assert_eq!(dev.migrate_to_system(r.addr(), 300).unwrap().cpages, 300);
        r.read(300 * PAGE_SIZE, &mut word).unwrap();
        assert_eq!(on_ram(300..512), 212, "a window up to the block's end");
        assert_eq!(on_ram(512..PAGES), 0, "and none of the next block");
        // Above a short run (under two base windows), the base window.
        dev.migrate_to_device_all(r.addr(), PAGES).unwrap();
        assert_eq!(dev.migrate_to_system(r.addr() + 500 * PAGE_SIZE, 20).unwrap().cpages, 20);
        r.read(520 * PAGE_SIZE, &mut word).unwrap();
        assert_eq!(on_ram(520..PAGES), 16 - 520 % 16, "the aligned base window from the fault up");
        assert_words(&cpu_read(&r), |i| i);
    });
}

#[test]
fn a_large_fault_window_is_shared_with_the_copy_helper() {
    // A fault with a window of a whole batch (512 pages): its copy back,
    // through the batches the migration to the device kept, goes in pieces
    // the helper thread shares with the handler.
    with_timeout(60, || {
        const PAGES: usize = 1024;
        let keep_staging_for = std::time::Duration::from_secs(600);
        let config = uhmm::Config { fault_around_pages: 512, keep_staging_for, ..uhmm::Config::default() };
        let space = uhmm::AddressSpace::new(config).unwrap();
        let dev = device(&space);
        let r = on_device(&space, &dev, PAGES);
        let mut word = [0u8; 4];
        // Which thread copies a piece depends on when the helper wakes (and
        // on a busy machine, sharing pauses after the helper stalls): as
        // many rounds as it takes, for up to 20 s.
        let started = std::time::Instant::now();
        for round in 0.. {
            let kept = space.stats().kept_copied_pages;
            r.read(0, &mut word).unwrap();
            assert_eq!(pages_in_ram(&space, &r, 0..PAGES), 512, "round {round}: one window");
            assert_eq!(space.stats().kept_copied_pages - kept, 512, "round {round}: through kept batches");
            let mut window = vec![0u8; 512 * PAGE_SIZE];
            r.read(0, &mut window).unwrap();
            assert_words(&window, |i| i);
            if space.stats().helper_copied_pages > 0 || started.elapsed() > std::time::Duration::from_secs(20) {
                break;
            }
            dev.migrate_to_device_all(r.addr(), PAGES).unwrap();
        }
        assert!(space.stats().helper_copied_pages > 0, "the helper never copied a piece");
    });
}

#[test]
fn a_sequential_scan_reads_ahead_while_the_handler_is_idle() {
    with_timeout(60, || {
        const PAGES: usize = 1024;
        let space = uhmm::AddressSpace::new(uhmm::Config { read_ahead_windows: 2, ..uhmm::Config::default() }).unwrap();
        let dev = device(&space);
        let r = on_device(&space, &dev, PAGES);
        let on_ram = |pages: std::ops::Range<usize>| pages_in_ram(&space, &r, pages);
        let wait_for = |pages: std::ops::Range<usize>, n: usize| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while on_ram(pages.clone()) < n {
                let got = on_ram(pages.clone());
                assert!(std::time::Instant::now() < deadline, "no read-ahead: {got} of {n} pages of {pages:?} back");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        let mut page = vec![0u8; PAGE_SIZE];
        // A fault, then one where its window ended: a scan up the region,
        // with windows of 16 then 32 pages (16..48).
        r.read(0, &mut page).unwrap();
        r.read(16 * PAGE_SIZE, &mut page).unwrap();
        // The idle handler brings back the next two windows: 64, then 128
        // pages, the last but its first page, which stays on the device as
        // the scan's marker.
        wait_for(48..240, 191);
        assert_eq!(space.stats().read_aheads, 2);
        assert_eq!(on_ram(112..113), 0, "the marker stays on the device");
        assert_eq!(on_ram(240..PAGES), 0, "no further than two windows ahead");
        // The scan reads them, faulting once, on the marker: that page comes
        // back alone, and the read-ahead goes on from where the scan's
        // windows end (240), with windows of 256 and 512 pages, the last
        // clipped to the 2 MiB block (496..512) and leaving its first page
        // (496) as the next marker.
        let faults = space.stats().faults;
        for p in 48..240 {
            r.read(p * PAGE_SIZE, &mut page).unwrap();
            assert_words(&page, |i| i + (p * WORDS_PER_PAGE) as u32);
        }
        assert_eq!(space.stats().faults, faults + 1, "one fault, on the marker");
        wait_for(240..512, 256 + 15);
        assert_eq!(space.stats().read_aheads, 4);
        // The window of 256 came back through the staging batches the
        // migration to the device kept.
        assert!(space.stats().kept_copied_pages >= 256, "{:?}", space.stats());
        assert_eq!(on_ram(496..497), 0, "the next marker");
        assert_eq!(on_ram(512..PAGES), 0, "nothing past the block's end");
        // The scan reads on to the end and sees the right data.
        assert_words(&cpu_read(&r), |i| i);
        assert_eq!(space.stats().poisoned_pages, 0);

        // Off, the default: the same scan reads nothing ahead.
        let space = common::space();
        let dev = device(&space);
        let r = on_device(&space, &dev, PAGES);
        for p in 0..PAGES {
            r.read(p * PAGE_SIZE, &mut page).unwrap();
        }
        assert_eq!(space.stats().read_aheads, 0);
        assert_words(&cpu_read(&r), |i| i);
    });
}

#[test]
fn discard_drops_pages_wherever_they_are() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let r = map(&space, 64);
        fill(&r, 0..64, |i| i);
        dev.migrate_to_device_all(r.addr(), 32).unwrap(); // pages 0..32 on the device
        let mut buf = vec![0u8; r.len()];
        dev.read(r.addr(), 64, &mut buf).unwrap(); // the mirror holds every page
        r.discard(16 * PAGE_SIZE..48 * PAGE_SIZE).unwrap(); // half device, half RAM
        assert_eq!(dev.pages_in_use(), 16, "discarded device pages are freed");
        let got = cpu_read(&r);
        assert_words(&got[..16 * PAGE_SIZE], |i| i);
        assert!(got[16 * PAGE_SIZE..48 * PAGE_SIZE].iter().all(|b| *b == 0), "discarded pages read as zeros");
        assert_words(&got[48 * PAGE_SIZE..], |i| i + (48 * WORDS_PER_PAGE) as u32);
        // The device's mirror was invalidated: it sees the zeros too.
        dev.read(r.addr(), 64, &mut buf).unwrap();
        assert!(buf[16 * PAGE_SIZE..48 * PAGE_SIZE].iter().all(|b| *b == 0));
        // And the range is usable as ever.
        fill(&r, 16..48, |i| i);
        assert_eq!(dev.migrate_to_device_all(r.addr(), 64).unwrap().cpages, 64);
        assert_words(&cpu_read(&r), |i| i);
    });
}

#[test]
fn discard_of_shared_memory_keeps_its_contents() {
    // As the kernel's MADV_DONTNEED: only the mapping's view is dropped; the
    // shared memory still holds the data (found by the soak, whose model
    // expected zeros, as discard's documentation then said).
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let r = space.map_shared(8 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
        fill(&r, 0..8, |i| i);
        let mut buf = vec![0u8; r.len()];
        dev.read(r.addr(), 8, &mut buf).unwrap(); // the mirror holds every page
        r.discard(2 * PAGE_SIZE..6 * PAGE_SIZE).unwrap();
        assert_words(&cpu_read(&r), |i| i);
        dev.read(r.addr(), 8, &mut buf).unwrap();
        assert_words(&buf, |i| i);
    });
}

/// Issue 3 item 9, found by the model test: protecting a page read-only and
/// back, with pages touched on both sides meanwhile, leaves the region in
/// two VMAs for good (their `anon_vma`s differ, so the kernel never merges
/// them). Fault windows, migrations and restores that span the boundary must
/// still move every page: before the fix, the kernel refused those ranges,
/// restores poisoned pages and first-touch faults spun.
#[test]
fn protect_cycle_leaves_split_vmas() {
    with_timeout(60, || {
        const N: usize = 64;
        let space = space();
        let dev = device(&space);
        let region = map(&space, N);
        let p = |i: usize| i * PAGE_SIZE;
        region.protect(p(20)..p(21), Prot::READ).unwrap();
        region.write(p(0), &[1]).unwrap();
        region.write(p(40), &[1]).unwrap();
        region.protect(p(20)..p(21), Prot::READ_WRITE).unwrap();
        // One protection over the whole region again, still two VMAs.
        region.protect(0..region.len(), Prot::READ_WRITE).unwrap();
        // First touches whose zero-fill windows span the boundary.
        assert!(cpu_read(&region).iter().enumerate().all(|(i, b)| *b == u8::from(i == p(0) || i == p(40))));
        fill(&region, 0..N, |i| i ^ 0x5A5A);
        for round in 0..3 {
            assert_eq!(dev.migrate_to_device_all(region.addr(), N).unwrap().cpages, N, "round {round}");
            // CPU faults bring windows back across the boundary.
            assert_words(&cpu_read(&region), |i| i ^ 0x5A5A);
        }
        // Restores into a read-only region that spans the boundary.
        assert_eq!(dev.migrate_to_device_all(region.addr(), N).unwrap().cpages, N);
        region.protect(0..region.len(), Prot::READ).unwrap();
        assert_eq!(dev.release().unwrap(), N);
        assert_eq!(dev.pages_in_use(), 0);
        assert_words(&cpu_read(&region), |i| i ^ 0x5A5A);
        assert_eq!(space.stats().poisoned_pages, 0);
    });
}

#[test]
fn device_copies_merged_over_runs_stop_at_holes_and_keep_the_data() {
    // Staged pages next to each other become one copy into the device (a
    // scatter-gather run, up to 2 MiB); holes, and pages already on the
    // device, end a run.
    with_timeout(120, || {
        let space = space();
        let dev = device(&space);
        let npages = 9000;
        let region = map(&space, npages);
        let f = |i: u32| i.wrapping_mul(2_654_435_761) | 1;
        let hole = |p: usize| p % 701 == 3 || (1500..1530).contains(&p);
        let mut p = 0;
        while p < npages {
            let end = (p..npages).find(|&q| hole(q)).unwrap_or(npages);
            if end > p {
                fill(&region, p..end, f);
            }
            p = end + 1;
        }
        // Some pages go first, alone.
        for first in [40, 2100, 8999] {
            assert_eq!(dev.migrate_to_device(region.addr() + first * PAGE_SIZE, 1).unwrap().cpages, 1);
        }
        assert_eq!(dev.migrate_to_device_all(region.addr(), npages).unwrap().cpages, npages);
        let mut buf = vec![0u8; region.len()];
        assert_eq!(dev.read(region.addr(), npages, &mut buf).unwrap().faults, 0, "all on the device");
        let check = |buf: &[u8], what: &str| {
            for (pg, page) in buf.chunks_exact(PAGE_SIZE).enumerate() {
                for (k, w) in page.chunks_exact(4).enumerate() {
                    let got = u32::from_ne_bytes(w.try_into().unwrap());
                    let want = if hole(pg) { 0 } else { f((pg * PAGE_SIZE / 4 + k) as u32) };
                    assert_eq!(got, want, "{what}: page {pg} word {k}");
                }
            }
        };
        check(&buf, "device read");
        assert_eq!(dev.migrate_to_system(region.addr(), npages).unwrap().cpages, npages);
        check(&cpu_read(&region), "back in RAM");
    });
}

/// Migrations of each size the sim device treats differently — one chunk
/// (copied on the calling thread, through the caches), two smaller chunks
/// and configured chunks (streamed past the caches on the DMA engine) —
/// keep every byte through the device and back.
#[test]
fn migrations_of_every_size_class_keep_the_data() {
    with_timeout(120, || {
        let space = space();
        let dev = device(&space);
        for npages in [100, 512, 2048, 4096, 9000] {
            let region = map(&space, npages);
            let f = move |i: u32| i ^ (npages as u32) << 20;
            fill(&region, 0..npages, f);
            assert_eq!(dev.migrate_to_device_all(region.addr(), npages).unwrap().cpages, npages);
            let mut buf = vec![0u8; region.len()];
            assert_eq!(dev.read(region.addr(), npages, &mut buf).unwrap().faults, 0, "{npages} pages on the device");
            assert_words(&buf, f);
            assert_eq!(dev.migrate_to_system(region.addr(), npages).unwrap().cpages, npages);
            assert_words(&cpu_read(&region), f);
        }
    });
}
