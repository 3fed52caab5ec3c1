//! The file store's tests: round trips, a full file, failed reads and
//! writes, threads at once, unaligned destinations, and the readahead.

use super::*;
use uhmm_sys::uring::AlignedBuf;

/// Runs `f` on a thread of its own; fails the test if it takes more than
/// `secs` (tests that wait on I/O run under it).
fn with_timeout<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(v) => {
            t.join().expect("test thread");
            v
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("test hung: no result after {secs} s"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match t.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("sender dropped without sending"),
        },
    }
}

fn page_of(b: u8) -> Vec<u8> {
    vec![b; PAGE_SIZE]
}

fn store(config: FileConfig) -> FileStore {
    FileStore::new(FileConfig { location: FileLocation::PrivateIn(std::env::temp_dir()), ..config }).unwrap()
}

/// Gets `keys` as one run: the bytes and what each got.
fn get(s: &FileStore, keys: &[u64]) -> (Vec<u8>, Vec<Got>) {
    let mut data = AlignedBuf::zeroed(keys.len());
    let mut got = vec![Got::Missing; keys.len()];
    s.get(&mut [RunOut { keys, data: &mut data, got: &mut got }]).unwrap();
    (data.to_vec(), got)
}

#[test]
fn bad_configs_are_refused_by_name() {
    for (config, field) in [
        (FileConfig { capacity_bytes: 100, ..FileConfig::default() }, "capacity_bytes"),
        (FileConfig { fault_pages: 0, ..FileConfig::default() }, "fault_pages"),
        (FileConfig { fault_pages: MAX_FAULT_PAGES + 1, ..FileConfig::default() }, "fault_pages"),
        (FileConfig { rings: 65, ..FileConfig::default() }, "rings"),
        (FileConfig { ring_entries: 0, ..FileConfig::default() }, "ring_entries"),
        (FileConfig { location: FileLocation::Named(PathBuf::new()), ..FileConfig::default() }, "path"),
    ] {
        let err = FileStore::new(config).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains(field), "{err}");
    }
    let err = FileStore::new(FileConfig {
        location: FileLocation::PrivateIn("/nonexistent/uhmm".into()),
        ..FileConfig::default()
    })
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Sys);
    assert!(err.to_string().contains("/nonexistent/uhmm"), "{err}");
}

#[test]
fn pages_round_trip_a_run_is_one_write_and_zero_pages_take_no_slot() {
    with_timeout(60, || {
        for rings in [0, 2] {
            let s = store(FileConfig { rings, ..FileConfig::default() });
            let data: Vec<u8> = [page_of(1), page_of(0), page_of(2), page_of(3)].concat();
            let stored = s.put(&[RunIn { vpn: 0, keys: &[10, 11, 12, 13], data: &data }]).unwrap();
            assert_eq!(stored, vec![true; 4]);
            let st = s.stats();
            assert_eq!((st.pages, st.zero_pages, st.used_bytes), (4, 1, 3 * PAGE_SIZE as u64));
            assert_eq!(st.writes, 2, "a zero page splits the run: two writes");
            assert_eq!(st.uring, rings > 0);
            let mut zero = [false; 4];
            s.zero_pages(&[10, 11, 12, 13], &mut zero);
            assert_eq!(zero, [false, true, false, false]);
            let (back, got) = get(&s, &[12, 13, 10, 99]);
            assert_eq!(got, [Got::Filled, Got::Filled, Got::Filled, Got::Missing]);
            assert!(back[..3 * PAGE_SIZE] == [page_of(2), page_of(3), page_of(1)].concat());
            assert_eq!(s.stats().reads, 2, "12 and 13 are neighbours in the file: one read");
            s.delete(&[10, 11, 12, 13]);
            let st = s.stats();
            assert_eq!((st.pages, st.used_bytes, st.file_bytes), (0, 0, 0));
        }
    });
}

#[test]
fn a_full_file_stores_what_fits_and_freed_slots_are_reused() {
    with_timeout(60, || {
        let s = store(FileConfig { capacity_bytes: 4 * PAGE_SIZE as u64, ..FileConfig::default() });
        let data: Vec<u8> = (1..=6).flat_map(page_of).collect();
        let stored = s.put(&[RunIn { vpn: 0, keys: &[0, 1, 2, 3, 4, 5], data: &data }]).unwrap();
        assert_eq!(stored, [true, true, true, true, false, false]);
        assert_eq!(s.stats().full_pages, 2);
        s.delete(&[1, 2]);
        let stored = s.put(&[RunIn { vpn: 9, keys: &[7, 8], data: &data[4 * PAGE_SIZE..] }]).unwrap();
        assert_eq!(stored, [true, true]);
        assert_eq!(s.stats().file_bytes, 4 * PAGE_SIZE as u64, "the holes were reused");
        let (back, got) = get(&s, &[0, 7, 8, 3]);
        assert_eq!(got, [Got::Filled; 4]);
        assert!(back == [page_of(1), page_of(5), page_of(6), page_of(4)].concat());
    });
}

#[test]
fn a_failed_write_stores_nothing_and_a_failed_read_is_lost() {
    with_timeout(60, || {
        // The store's file opened read-only: every write fails.
        let f = uhmm_sys::file::open_private(&std::env::temp_dir(), false).unwrap();
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f));
        let ro = File::open(&path).unwrap();
        for rings in [0, 1] {
            let ring: Vec<Mutex<Ring>> = (0..rings).filter_map(|_| Ring::new(8).ok()).map(Mutex::new).collect();
            let opened = Opened { file: ro.try_clone().unwrap(), direct: false, named: None };
            let s = FileStore::with_file(FileConfig::default(), opened, ring);
            let data: Vec<u8> = [page_of(1), page_of(2), page_of(0)].concat();
            let stored = s.put(&[RunIn { vpn: 0, keys: &[0, 1, 2], data: &data }]).unwrap();
            assert_eq!(stored, [false, false, true], "the zero page needs no write");
            let st = s.stats();
            assert_eq!((st.pages, st.used_bytes, st.file_bytes, st.write_error_pages), (1, 0, 0, 2));
        }
        // A file cut short under the store: its pages come back lost.
        let opened = Opened { file: f.try_clone().unwrap(), direct: false, named: None };
        let s = FileStore::with_file(FileConfig::default(), opened, Vec::new());
        let data: Vec<u8> = [page_of(1), page_of(2)].concat();
        assert_eq!(s.put(&[RunIn { vpn: 0, keys: &[0, 1], data: &data }]).unwrap(), [true, true]);
        f.set_len(PAGE_SIZE as u64).unwrap();
        let (back, got) = get(&s, &[0, 1]);
        assert_eq!(got, [Got::Filled, Got::Lost], "the read cut short is done again page by page");
        assert!(back[..PAGE_SIZE] == page_of(1));
        assert_eq!(s.stats().lost_pages, 1);
        let (back, got) = get(&s, &[0]);
        assert_eq!(got, [Got::Filled]);
        assert!(back == page_of(1));
    });
}

#[test]
fn threads_putting_getting_and_deleting_at_once_see_their_own_pages() {
    with_timeout(120, || {
        // One ring for six threads: most batches find it busy and use
        // pread/pwrite, some use it.
        let s = std::sync::Arc::new(store(FileConfig { rings: 1, ..FileConfig::default() }));
        let threads: Vec<_> = (0..6u64)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for round in 0..40u64 {
                        let keys: Vec<u64> = (0..16).map(|k| t * 1000 + k).collect();
                        let tag = |k: u64| (t * 31 + round * 7 + k) as u8 | 1;
                        let data: Vec<u8> = keys.iter().flat_map(|&k| page_of(tag(k))).collect();
                        let stored = s.put(&[RunIn { vpn: round * 16, keys: &keys, data: &data }]).unwrap();
                        assert_eq!(stored, vec![true; 16]);
                        let (back, got) = get(&s, &keys[3..9]);
                        assert_eq!(got, [Got::Filled; 6]);
                        for (i, page) in back.chunks(PAGE_SIZE).enumerate() {
                            assert!(page.iter().all(|&b| b == tag(keys[3 + i])), "thread {t} round {round}");
                        }
                        s.delete(&keys);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let st = s.stats();
        assert_eq!((st.pages, st.used_bytes, st.file_bytes), (0, 0, 0), "{st:?}");
        assert_eq!(st.pages_written, 6 * 40 * 16);
    });
}

#[test]
fn an_unaligned_destination_is_read_through_a_buffer() {
    with_timeout(60, || {
        let s = store(FileConfig::default());
        let data = page_of(9);
        s.put(&[RunIn { vpn: 0, keys: &[5], data: &data }]).unwrap();
        let mut space = vec![0u8; 2 * PAGE_SIZE + 1];
        let off = (PAGE_SIZE - space.as_ptr() as usize % PAGE_SIZE) % PAGE_SIZE + 1;
        let mut got = [Got::Missing];
        s.get(&mut [RunOut { keys: &[5], data: &mut space[off..off + PAGE_SIZE], got: &mut got }]).unwrap();
        assert_eq!(got, [Got::Filled]);
        assert!(space[off..off + PAGE_SIZE] == data[..]);
    });
}

/// A page that names its key and version in every word.
fn tagged(key: u64, version: u64) -> Vec<u8> {
    (0..PAGE_SIZE / 16).flat_map(|_| [key.to_le_bytes(), version.to_le_bytes()].concat()).collect()
}

/// Puts `keys` (one run, neighbours in the file) as `version`.
fn put_tagged(s: &FileStore, keys: std::ops::Range<u64>, version: u64) {
    let k: Vec<u64> = keys.clone().collect();
    let data: Vec<u8> = keys.flat_map(|key| tagged(key, version)).collect();
    assert!(s.put(&[RunIn { vpn: k[0], keys: &k, data: &data }]).unwrap().iter().all(|&b| b));
}

/// Gets `keys` and checks each page is `version(key)` (or, for
/// `None`, that it is not filled).
fn check_tagged(s: &FileStore, keys: std::ops::Range<u64>, version: impl Fn(u64) -> Option<u64>) {
    let k: Vec<u64> = keys.collect();
    let (back, got) = get(s, &k);
    for (i, &key) in k.iter().enumerate() {
        match version(key) {
            Some(v) => {
                assert_eq!(got[i], Got::Filled, "key {key}");
                assert!(back[i * PAGE_SIZE..][..PAGE_SIZE] == tagged(key, v)[..], "key {key}: not version {v}");
            }
            None => assert_ne!(got[i], Got::Filled, "key {key}"),
        }
    }
}

/// Waits (at most 30 s) until the readahead has read `pages` pages.
fn wait_read_ahead(s: &FileStore, pages: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while s.stats().readahead_pages_read < pages {
        assert!(std::time::Instant::now() < deadline, "no readahead: {:?}", s.stats());
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn a_sequential_scan_is_served_from_the_readahead_within_its_buffers() {
    with_timeout(60, || {
        for rings in [0, 2] {
            let s = store(FileConfig { rings, readahead_pages: 256, ..FileConfig::default() });
            put_tagged(&s, 0..2048, 1);
            for w in (0..2048).step_by(64) {
                check_tagged(&s, w..w + 64, |_| Some(1));
                assert!(s.stats().readahead_buffer_bytes <= 2 * 256 * PAGE_SIZE as u64, "{:?}", s.stats());
            }
            let st = s.stats();
            assert!(st.readahead_hits >= 1024, "a scan of 2048 pages read ahead: {st:?}");
            assert!(st.reads < 32, "most windows did not read the disk: {st:?}");
            assert_eq!(st.pages_read, 2048);
            // Gets elsewhere (not a scan) read only what they ask.
            let ahead = st.readahead_pages_read;
            for w in [1500u64, 100, 900, 1800, 300] {
                check_tagged(&s, w..w + 8, |_| Some(1));
            }
            assert!(s.stats().readahead_pages_read <= ahead + 256, "{:?}", s.stats());
        }
        let off = store(FileConfig { readahead_pages: 0, ..FileConfig::default() });
        put_tagged(&off, 0..512, 1);
        for w in (0..512).step_by(64) {
            check_tagged(&off, w..w + 64, |_| Some(1));
        }
        assert_eq!((off.stats().readahead_hits, off.stats().readahead_pages_read), (0, 0));
    });
}

#[test]
fn a_slot_written_again_after_its_readahead_is_never_served_stale() {
    with_timeout(60, || {
        let s = store(FileConfig { readahead_pages: 1024, ..FileConfig::default() });
        put_tagged(&s, 0..2048, 1);
        // A scan starts: the readahead reads the slots ahead of it.
        for w in (0..192).step_by(64) {
            check_tagged(&s, w..w + 64, |_| Some(1));
        }
        wait_read_ahead(&s, 512);
        // Keys of slots already read ahead are deleted and stored
        // again (the same slots: the hole is reused), some as another
        // version of the same key, some deleted only, some put under
        // other keys.
        let file = s.stats().file_bytes;
        s.delete(&(300..400).collect::<Vec<_>>());
        put_tagged(&s, 300..350, 2);
        put_tagged(&s, 5000..5050, 3);
        assert_eq!(s.stats().file_bytes, file, "the freed slots were reused");
        let version = |k: u64| match k {
            300..350 => Some(2),
            350..400 => None,
            _ => Some(1),
        };
        for w in (192..1024).step_by(64) {
            check_tagged(&s, w..w + 64, version);
        }
        check_tagged(&s, 5000..5050, |_| Some(3));
        assert!(s.stats().readahead_hits > 0, "the scan used the readahead: {:?}", s.stats());
    });
}

#[test]
fn deletes_and_puts_racing_scans_never_wait_and_never_serve_stale_pages() {
    with_timeout(120, || {
        let s = std::sync::Arc::new(store(FileConfig { readahead_pages: 512, ..FileConfig::default() }));
        put_tagged(&s, 0..4096, 1);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Each key only ever holds its own tag (version = key % 7), so
        // a page from a slot's earlier owner never passes.
        let scanners: Vec<_> = (0..2u64)
            .map(|t| {
                let (s, stop) = (s.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut rounds = 0;
                    while !stop.load(Ordering::SeqCst) || rounds < 2 {
                        for w in (t * 64..4096).step_by(128) {
                            let k: Vec<u64> = (w..w + 64).collect();
                            let (back, got) = get(&s, &k);
                            for (i, &key) in k.iter().enumerate() {
                                if got[i] == Got::Filled {
                                    let v = if key < 4096 { 1 } else { key % 7 };
                                    assert!(back[i * PAGE_SIZE..][..PAGE_SIZE] == tagged(key, v)[..], "key {key}");
                                }
                            }
                        }
                        rounds += 1;
                    }
                })
            })
            .collect();
        let mut x = 77u64;
        for round in 0..300u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = x % 4000;
            let t = std::time::Instant::now();
            s.delete(&(at..at + 32).collect::<Vec<_>>());
            assert!(t.elapsed() < std::time::Duration::from_secs(5), "a delete waited");
            // Other keys take the freed slots, with tags of their own.
            let base = 10_000 + round * 32;
            let keys: Vec<u64> = (base..base + 32).collect();
            let data: Vec<u8> = keys.iter().flat_map(|&k| tagged(k, k % 7)).collect();
            s.put(&[RunIn { vpn: base, keys: &keys, data: &data }]).unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        for t in scanners {
            t.join().unwrap();
        }
        let st = s.stats();
        assert_eq!(st.lost_pages, 0, "{st:?}");
        assert!(st.readahead_hits > 0, "{st:?}");
    });
}
