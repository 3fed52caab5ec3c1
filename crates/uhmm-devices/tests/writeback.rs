//! The compressed store in RAM written back to a file (`compress:SIZE+file:…`,
//! as zswap writes back to swap): the pool stays within its size, the pages
//! stored longest ago are the ones written back, every page comes back
//! whole from wherever it is, threads putting, getting, deleting and reusing
//! keys while write-backs run never see another version, and a device over
//! it round-trips a region, written back to a file or to a redis-server the
//! test starts. Real files in a temporary directory; every test runs under
//! a timeout.

mod common;
#[path = "common/redis_server.rs"]
mod redis_server;

use std::sync::Arc;

use common::{text, with_timeout};
use redis_server::{RedisServer, ServerOpts, require_redis};
use uhmm::{AddressSpace, Config, PAGE_SIZE, Prot};
use uhmm_devices::compress::{CompressConfig, CompressStore};
use uhmm_devices::far::{FarAddress, FarStore};
use uhmm_devices::file::{FileConfig, FileLocation, FileStore};
use uhmm_devices::store::{Got, PageStore, RunIn, RunOut, SealedStore, StoreDevice, StoreDeviceConfig, WritebackStore};

type Below = SealedStore<FileStore>;

/// A pool of `ram_bytes` over a sealed private file in a new directory.
fn store(ram_bytes: usize) -> WritebackStore<Below> {
    let ram = CompressStore::new(CompressConfig { capacity_bytes: ram_bytes, ..CompressConfig::default() }).unwrap();
    let file =
        FileStore::new(FileConfig { location: FileLocation::PrivateIn(std::env::temp_dir()), ..FileConfig::default() })
            .unwrap();
    WritebackStore::new(ram, SealedStore::new(file).unwrap())
}

/// Page `key`, version `v`: text (it compresses about 2:1) stamped with both.
fn page(key: u64, v: u64) -> Vec<u8> {
    let mut p = text(key.wrapping_mul(31).wrapping_add(v), PAGE_SIZE);
    p[..8].copy_from_slice(&key.to_le_bytes());
    p[8..16].copy_from_slice(&v.to_le_bytes());
    p
}

fn put(s: &impl PageStore, keys: &[u64], v: u64) -> Vec<bool> {
    let data: Vec<u8> = keys.iter().flat_map(|&k| page(k, v)).collect();
    s.put(&[RunIn { vpn: keys[0], keys, data: &data }]).unwrap()
}

fn get(s: &impl PageStore, keys: &[u64]) -> (Vec<Vec<u8>>, Vec<Got>) {
    let mut data = vec![0u8; keys.len() * PAGE_SIZE];
    let mut got = vec![Got::Missing; keys.len()];
    s.get(&mut [RunOut { keys, data: &mut data, got: &mut got }]).unwrap();
    (data.chunks(PAGE_SIZE).map(<[u8]>::to_vec).collect(), got)
}

#[test]
fn the_pool_stays_within_its_size_the_oldest_pages_go_far_and_all_come_back() {
    with_timeout(120, || {
        let ram = 512 << 10;
        let s = store(ram);
        let n = 1024u64; // 4 MiB of pages, about 2 MiB compressed: four pools
        for first in (0..n).step_by(64) {
            let keys: Vec<u64> = (first..first + 64).collect();
            assert_eq!(put(&s, &keys, 1), vec![true; 64], "every page is stored, in RAM or far");
            let c = s.ram().stats();
            assert!(c.mem_used_total - c.empty_bytes <= ram as u64, "the pool's objects take {c:?}");
        }
        let st = s.stats();
        assert_eq!(st.ram_pages + st.below_pages, n);
        assert!(st.written_back > 0 && st.below_pages > n / 2, "{st:?}");
        // First in, first out: the first pages put are far, the last in RAM.
        let (_, got) = get(&s, &[0, 1, 2]);
        assert_eq!(got, [Got::Filled; 3]);
        assert!(s.stats().got_below >= 3, "{:?}", s.stats());
        let before = s.stats().got_ram;
        let (_, got) = get(&s, &[n - 3, n - 2, n - 1]);
        assert_eq!(got, [Got::Filled; 3]);
        assert_eq!(s.stats().got_ram, before + 3, "the newest pages are in RAM");
        // Every page, in one get across both.
        let keys: Vec<u64> = (0..n).collect();
        let (pages, got) = get(&s, &keys);
        assert!(got.iter().all(|g| *g == Got::Filled));
        for (k, p) in pages.iter().enumerate() {
            assert!(*p == page(k as u64, 1), "page {k}");
        }
        s.delete(&keys);
        let st = s.stats();
        assert_eq!((st.ram_pages, st.below_pages, s.usage().pages), (0, 0, 0), "{st:?}");
    });
}

#[test]
fn threads_reusing_keys_while_pages_are_written_back_see_their_own_version() {
    with_timeout(120, || {
        let s = Arc::new(store(256 << 10));
        let threads: Vec<_> = (0..3u64)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    // Each thread owns 128 keys; each round puts them again
                    // (the device's pages freed and used again), reads back
                    // a part, and deletes a part.
                    let keys: Vec<u64> = (t * 1000..t * 1000 + 128).collect();
                    let mut live = vec![None; keys.len()];
                    for v in 1..=12u64 {
                        for chunk in keys.chunks(32) {
                            let stored = put(&*s, chunk, v);
                            for (k, ok) in chunk.iter().zip(stored) {
                                if ok {
                                    live[(k - t * 1000) as usize] = Some(v);
                                }
                            }
                        }
                        let (pages, got) = get(&*s, &keys);
                        for (i, (p, g)) in pages.iter().zip(&got).enumerate() {
                            if let Some(v) = live[i] {
                                assert_eq!(*g, Got::Filled, "thread {t} key {} v{v}", keys[i]);
                                assert!(*p == page(keys[i], v), "thread {t} key {} v{v}: another version", keys[i]);
                            }
                        }
                        s.delete(&keys);
                        live.iter_mut().for_each(|l| *l = None);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(s.stats().written_back > 0, "write-backs ran meanwhile: {:?}", s.stats());
        assert_eq!(s.usage().pages, 0);
    });
}

/// A device over `address` (`compress:1M+…`) round-trips an 8 MiB region:
/// the pool keeps within 1 MiB, pages went far, sealed, and all came home.
fn device_round_trips_a_region_through(address: &str) {
    let far: FarStore = FarAddress::parse(address).unwrap().open().unwrap();
    let space = AddressSpace::new(Config::default()).unwrap();
    let dev = StoreDevice::new(&space, far.page_store(), StoreDeviceConfig::default()).unwrap();
    let region = space.map(8 << 20, Prot::READ_WRITE).unwrap();
    let bytes = text(7, 8 << 20);
    region.write(0, &bytes).unwrap();
    assert_eq!(dev.migrate_to_device(region.addr(), region.npages()).unwrap().moved, region.npages());
    let (w, c) = far.writeback_stats().unwrap();
    assert!(c.mem_used_total <= 1 << 20, "{address}: {c:?}");
    assert!(w.below_pages > 0 && w.ram_pages > 0, "{address}: {w:?}");
    assert!(far.seal_stats().sealed > 0, "{address}: pages far are sealed");
    let mut back = vec![0u8; bytes.len()];
    region.read(0, &mut back).unwrap();
    assert!(back == bytes, "{address}: the region reads back as written");
    assert_eq!(far.usage().pages, 0, "{address}: every page came home");
}

#[test]
fn a_device_over_compress_plus_file_round_trips_a_region() {
    with_timeout(120, || {
        device_round_trips_a_region_through(&format!("compress:1M+file:{}", std::env::temp_dir().display()))
    });
}

#[test]
fn a_device_over_compress_plus_redis_round_trips_a_region() {
    with_timeout(120, || {
        require_redis();
        let server = RedisServer::start(ServerOpts::default());
        device_round_trips_a_region_through(&format!("compress:1M+{}", server.url()));
    });
}
