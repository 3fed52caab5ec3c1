//! The file store behind a store device: every kind of data round trips,
//! zero pages take no space in the file, freed space is reused so the file
//! stays bounded over many migrations, faults from several threads race
//! migrations and read right, a file too small leaves pages in RAM, a named
//! file and a directory are used as they should be (and cleaned up), the
//! file works on tmpfs (buffered or direct) and on disk (`O_DIRECT`), and a
//! file cut short under the store gives lost pages (a typed `Fault`), never
//! wrong data.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use uhmm::{AddressSpace, ErrorKind, PAGE_SIZE, Region, Residency};
use uhmm_devices::file::{DirectIo, FileConfig, FileLocation, FileStore};
use uhmm_devices::store::{StoreDevice, StoreDeviceConfig};

/// A device over a file store with `config`.
fn file_device(space: &AddressSpace, config: FileConfig) -> (StoreDevice, Arc<FileStore>) {
    let store = Arc::new(FileStore::new(config).expect("file store"));
    let dev = StoreDevice::new(space, store.clone(), StoreDeviceConfig::default()).expect("device");
    (dev, store)
}

/// Drops the store once the last other holder lets it go: a migration's
/// worker drops its handle just after handing back its answer. (The
/// caller's timeout bounds the wait.)
fn drop_store(mut store: Arc<FileStore>) {
    loop {
        match Arc::try_unwrap(store) {
            Ok(s) => return drop(s),
            Err(s) => {
                store = s;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}

/// A fresh, empty directory of this test's own under the system's temp
/// directory (removed by the caller).
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("uhmm-file-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    dir
}

/// Each page one word repeated, a different word per page.
fn same_filled(len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (k, w) in out.as_chunks_mut::<8>().0.iter_mut().enumerate() {
        *w = (0x0101_0101_0101_0101u64 * ((k / 512) as u64 % 7 + 1)).to_ne_bytes();
    }
    out
}

fn region_with(space: &AddressSpace, data: &[u8]) -> Region {
    let r = map(space, data.len() / PAGE_SIZE);
    r.write(0, data).unwrap();
    r
}

fn read_all(r: &Region) -> Vec<u8> {
    let mut buf = vec![0u8; r.len()];
    r.read(0, &mut buf).unwrap();
    buf
}

/// Moves all of `data`'s region to the device, checks the store counted
/// it, reads it back through faults and checks it.
fn round_trip(space: &AddressSpace, dev: &StoreDevice, store: &FileStore, what: &str, data: &[u8]) {
    let n = data.len() / PAGE_SIZE;
    let r = region_with(space, data);
    let before = store.stats();
    let moved = dev.migrate_to_device(r.addr(), n).unwrap();
    assert_eq!(moved.moved, n, "{what}: {moved:?}");
    let s = store.stats();
    assert_eq!(s.pages, before.pages + n as u64, "{what}");
    let zero = data.chunks(PAGE_SIZE).filter(|p| p.iter().all(|&b| b == 0)).count() as u64;
    assert_eq!(s.zero_pages - before.zero_pages, zero, "{what}: zero pages counted");
    assert_eq!(s.used_bytes - before.used_bytes, (n as u64 - zero) * PAGE_SIZE as u64, "{what}: a slot per page");
    assert!(read_all(&r) == data, "{what}: data came back wrong");
    assert_eq!(store.stats().lost_pages, 0, "{what}");
    // Whatever the faults did not bring back goes back explicitly.
    dev.migrate_to_system(r.addr(), n).unwrap();
    assert!(read_all(&r) == data, "{what}: data came back wrong");
}

#[test]
fn every_kind_of_data_round_trips() {
    with_timeout(300, || {
        let n = 256;
        let len = n * PAGE_SIZE;
        let mut mixed = noise(5, len);
        for p in (0..n).step_by(3) {
            mixed[p * PAGE_SIZE..][..PAGE_SIZE].fill(0);
        }
        let kinds: Vec<(&str, Vec<u8>)> = vec![
            ("zeros", vec![0; len]),
            ("same-filled", same_filled(len)),
            ("text", text(1, len)),
            ("random", noise(3, len)),
            ("random with zero pages", mixed),
        ];
        for rings in [4, 0] {
            let space = space();
            let (dev, store) = file_device(&space, FileConfig { rings, ..FileConfig::default() });
            for (name, data) in &kinds {
                round_trip(&space, &dev, &store, &format!("{name}, {rings} rings"), data);
                assert_eq!(dev.pages_in_use(), 0);
                let s = store.stats();
                assert_eq!((s.pages, s.used_bytes, s.file_bytes), (0, 0, 0), "{name}: everything freed");
            }
            let nonzero: usize =
                kinds.iter().map(|(_, d)| d.chunks(PAGE_SIZE).filter(|p| p.iter().any(|&b| b != 0)).count()).sum();
            let s = store.stats();
            assert_eq!(s.pages_written, nonzero as u64, "{s:?}");
            assert_eq!(s.pages_read, nonzero as u64, "each page read back once: {s:?}");
            assert!(s.writes < s.pages_written / 4, "runs are written in few writes: {s:?}");
        }
    });
}

#[test]
fn zero_pages_come_back_as_the_zero_page_without_a_read() {
    with_timeout(120, || {
        let space = space();
        let (dev, store) = file_device(&space, FileConfig::default());
        let r = region_with(&space, &vec![0; 64 * PAGE_SIZE]);
        assert_eq!(dev.migrate_to_device(r.addr(), 64).unwrap().moved, 64);
        let s = store.stats();
        assert_eq!((s.zero_pages, s.used_bytes, s.writes), (64, 0, 0));
        let mut b = [1u8; 8];
        r.read(5 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, [0; 8]);
        assert_eq!(store.stats().reads, 0);
        let snap = space.snapshot(r.range()).unwrap();
        assert!(snap.iter().any(|p| p.residency == Residency::Zero), "{snap:?}");
    });
}

#[test]
fn repeated_migrations_reuse_the_file_and_it_stays_bounded() {
    with_timeout(300, || {
        let dir = scratch_dir("bounded");
        let path = dir.join("pages");
        let space = space();
        let n = 512;
        let (dev, store) =
            file_device(&space, FileConfig { location: FileLocation::Named(path.clone()), ..FileConfig::default() });
        let regions: Vec<Region> = (0..4).map(|k| region_with(&space, &noise(k + 1, n * PAGE_SIZE))).collect();
        for round in 0..8u64 {
            for (k, r) in regions.iter().enumerate() {
                // A different half each round: the freed space is reused
                // by pages of other sizes and places.
                let (at, len) = if (round + k as u64).is_multiple_of(2) { (0, n) } else { (n / 4, n / 2) };
                let moved = dev.migrate_to_device(r.addr() + at * PAGE_SIZE, len).unwrap();
                assert_eq!(moved.moved + moved.holes, len, "round {round}: {moved:?}");
            }
            for (k, r) in regions.iter().enumerate() {
                assert!(read_all(r) == noise(k as u64 + 1, n * PAGE_SIZE), "round {round}, region {k}");
            }
            let s = store.stats();
            assert!(s.file_bytes <= (4 * n * PAGE_SIZE) as u64, "round {round}: {s:?}");
            let on_disk = std::fs::metadata(&path).unwrap().len();
            assert!(on_disk <= (4 * n * PAGE_SIZE) as u64, "round {round}: the file is {on_disk} bytes");
        }
        let s = store.stats();
        assert!(s.pages_written >= 8 * 2 * n as u64, "{s:?}");
        assert_eq!(s.lost_pages, 0);
        drop(dev);
        assert_eq!(store.stats().pages, 0, "the device's drop brought everything back");
        drop_store(store);
        assert!(!path.exists(), "a file the store created is removed at drop");
        std::fs::remove_dir_all(&dir).unwrap();
    });
}

#[test]
fn faults_from_several_threads_race_migrations_and_read_right() {
    with_timeout(300, || {
        let space = space();
        let (dev, store) = file_device(&space, FileConfig { rings: 2, ..FileConfig::default() });
        let n = NPAGES;
        let r = Arc::new(map(&space, n));
        fill(&r, 0..n, |i| i ^ 0x5a5a_0000);
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..4u64)
            .map(|t| {
                let (r, stop) = (r.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut x = t * 7919 + 1;
                    let mut page = vec![0u8; PAGE_SIZE];
                    let mut reads = 0u64;
                    while !stop.load(Ordering::SeqCst) || reads < 64 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let p = (x % n as u64) as usize;
                        r.read(p * PAGE_SIZE, &mut page).unwrap();
                        for (k, w) in page.chunks_exact(4).enumerate() {
                            let i = (p * WORDS_PER_PAGE + k) as u32;
                            assert_eq!(u32::from_ne_bytes(w.try_into().unwrap()), i ^ 0x5a5a_0000, "page {p}");
                        }
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        let mut moved = 0;
        for _ in 0..30 {
            moved += dev.migrate_to_device(r.addr(), n).unwrap().moved;
        }
        stop.store(true, Ordering::SeqCst);
        for t in readers {
            assert!(t.join().unwrap() >= 64);
        }
        assert!(moved >= n, "{moved}");
        assert!(dev.counters().faults > 0);
        assert_words(&cpu_read(&r), |i| i ^ 0x5a5a_0000);
        assert_eq!(store.stats().lost_pages, 0);
    });
}

#[test]
fn a_file_too_small_leaves_the_rest_in_ram_and_loses_nothing() {
    with_timeout(120, || {
        let space = space();
        let config = FileConfig { capacity_bytes: 64 * PAGE_SIZE as u64, ..FileConfig::default() };
        let (dev, store) = file_device(&space, config);
        let data = noise(11, 256 * PAGE_SIZE);
        let r = region_with(&space, &data);
        let moved = dev.migrate_to_device(r.addr(), 256).unwrap();
        assert_eq!(moved.moved, 64, "{moved:?}");
        assert_eq!(moved.moved + moved.not_stored, 256, "{moved:?}");
        let s = store.stats();
        assert_eq!((s.full_pages, s.file_bytes), (192, 64 * PAGE_SIZE as u64), "{s:?}");
        assert_eq!(pages_in_ram(&space, &r, 0..256), 192);
        assert!(read_all(&r) == data);
        assert_eq!(dev.pages_in_use(), 0);
    });
}

#[test]
fn a_named_file_is_used_and_an_existing_one_is_emptied_and_kept() {
    with_timeout(120, || {
        let dir = scratch_dir("named");
        let path = dir.join("swap");
        std::fs::write(&path, vec![7u8; 3 * PAGE_SIZE]).unwrap();
        let space = space();
        let location = FileLocation::from_path(&path);
        assert_eq!(location, FileLocation::Named(path.clone()));
        let (dev, store) = file_device(&space, FileConfig { location, ..FileConfig::default() });
        assert_eq!(store.path(), Some(path.as_path()));
        let data = text(4, 64 * PAGE_SIZE);
        let r = region_with(&space, &data);
        assert_eq!(dev.migrate_to_device(r.addr(), 64).unwrap().moved, 64);
        // The pages are in that file (written past its old contents, which
        // were dropped at open).
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * PAGE_SIZE as u64);
        assert!(read_all(&r) == data);
        drop(dev);
        drop_store(store);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "emptied at drop, not removed");
        std::fs::remove_dir_all(&dir).unwrap();

        // A path that is not a regular file is refused.
        let err =
            FileStore::new(FileConfig { location: FileLocation::Named("/dev/null".into()), ..FileConfig::default() })
                .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    });
}

#[test]
fn a_directory_gets_a_private_file_no_one_can_open() {
    with_timeout(120, || {
        let dir = scratch_dir("dir");
        let location = FileLocation::from_path(&dir);
        assert_eq!(location, FileLocation::PrivateIn(dir.clone()));
        let space = space();
        let (dev, store) = file_device(&space, FileConfig { location, ..FileConfig::default() });
        let data = noise(8, 128 * PAGE_SIZE);
        let r = region_with(&space, &data);
        assert_eq!(dev.migrate_to_device(r.addr(), 128).unwrap().moved, 128);
        assert_eq!(store.stats().used_bytes, 128 * PAGE_SIZE as u64);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "the file has no name in the directory");
        assert_eq!(store.path(), None);
        assert!(read_all(&r) == data);
        drop(dev);
        drop_store(store);
        std::fs::remove_dir_all(&dir).unwrap();
    });
}

/// Round trips with a store in `dir` under `direct`; returns the store's
/// `direct` flag, or None when the store could not be made there.
fn in_dir(dir: &Path, direct: DirectIo) -> Option<bool> {
    let config = FileConfig { location: FileLocation::PrivateIn(dir.to_path_buf()), direct, ..FileConfig::default() };
    let store = match FileStore::new(config) {
        Ok(s) => Arc::new(s),
        Err(err) => {
            eprintln!("no file store in {} with {direct:?}: {err}", dir.display());
            return None;
        }
    };
    let space = space();
    let dev = StoreDevice::new(&space, store.clone(), StoreDeviceConfig::default()).unwrap();
    let what = format!("{} {direct:?}", dir.display());
    round_trip(&space, &dev, &store, &what, &text(2, 200 * PAGE_SIZE));
    round_trip(&space, &dev, &store, &what, &noise(6, 300 * PAGE_SIZE));
    Some(store.stats().direct)
}

#[test]
fn the_file_works_on_tmpfs_buffered_or_direct() {
    with_timeout(120, || {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            eprintln!("no /dev/shm: skipped");
            return;
        }
        assert_eq!(in_dir(shm, DirectIo::Off), Some(false), "buffered when asked");
        // tmpfs takes O_DIRECT since Linux 6.6; before, Auto falls back.
        let direct = in_dir(shm, DirectIo::Auto).expect("Auto always opens");
        eprintln!("tmpfs with DirectIo::Auto: direct = {direct}");
    });
}

#[test]
fn the_file_on_disk_is_direct() {
    with_timeout(120, || {
        let dir = Path::new(uhmm_devices::file::DEFAULT_DIR);
        if !dir.is_dir() {
            eprintln!("no {}: skipped", dir.display());
            return;
        }
        match in_dir(dir, DirectIo::On) {
            Some(direct) => assert!(direct),
            None => eprintln!("{} refuses O_DIRECT: only the fallback is checked", dir.display()),
        }
        assert!(in_dir(dir, DirectIo::Auto).is_some());
    });
}

#[test]
fn a_file_cut_short_under_the_store_gives_lost_pages_never_wrong_data() {
    with_timeout(120, || {
        let dir = scratch_dir("cut");
        let path = dir.join("pages");
        let space = space();
        let config =
            FileConfig { location: FileLocation::Named(path.clone()), fault_pages: 1, ..FileConfig::default() };
        let (dev, store) = file_device(&space, config);
        let data = text(9, 16 * PAGE_SIZE);
        let r = region_with(&space, &data);
        assert_eq!(dev.migrate_to_device(r.addr(), 16).unwrap().moved, 16);
        // The slots are the pages in order: cut the file after page 7.
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(8 * PAGE_SIZE as u64).unwrap();
        if space.user_mode_only() {
            // `Region::read` copies with loads there (a lost page found on
            // the way is a SIGBUS): the explicit migration back finds them.
            dev.migrate_to_system(r.addr() + 12 * PAGE_SIZE, 1).unwrap();
            dev.migrate_to_system(r.addr(), 16).unwrap();
        }
        let mut page = vec![0u8; PAGE_SIZE];
        assert_eq!(r.read(12 * PAGE_SIZE, &mut page).unwrap_err().kind(), ErrorKind::Fault);
        assert!(store.stats().lost_pages >= 1);
        assert!(dev.counters().lost >= 1);
        assert_eq!(space.snapshot(r.range()).unwrap()[12].residency, Residency::Poisoned);
        for p in 0..8 {
            r.read(p * PAGE_SIZE, &mut page).unwrap();
            assert!(page[..] == data[p * PAGE_SIZE..][..PAGE_SIZE], "page {p}");
        }
        for p in 8..16 {
            match r.read(p * PAGE_SIZE, &mut page) {
                Ok(()) => panic!("page {p} read back after the file lost it"),
                Err(e) => assert_eq!(e.kind(), ErrorKind::Fault, "page {p}"),
            }
        }
        assert_eq!(store.stats().lost_pages, 8);
        drop(dev);
        drop_store(store);
        std::fs::remove_dir_all(&dir).unwrap();
    });
}
