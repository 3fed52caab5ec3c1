//! The compressed store behind a store device: every kind of data round
//! trips, same-filled pages come back as the zero page or their word,
//! incompressible pages are kept raw, groups come back whole, a corrupted
//! object is a lost page (a typed `Fault`, SIGBUS on a direct load) and
//! never wrong data, a full pool moves part of a range and loses nothing,
//! and compaction gives memory back.

mod common;

use std::sync::Arc;

use common::*;
use uhmm::{AddressSpace, Config, ErrorKind, PAGE_SIZE, Region, Residency};
use uhmm_devices::compress::{Codec, CompressConfig, CompressStore};
use uhmm_devices::store::{StoreDevice, StoreDeviceConfig};

/// A device over a compressed store with `config`.
fn compressed(space: &AddressSpace, config: CompressConfig) -> (StoreDevice, Arc<CompressStore>) {
    let store = Arc::new(CompressStore::new(config).expect("store"));
    let dev = StoreDevice::new(space, store.clone(), StoreDeviceConfig::default()).expect("device");
    (dev, store)
}

/// A heap image: 16-byte objects of a pointer, a small count and a tag.
fn heap(seed: u64, len: usize) -> Vec<u8> {
    let r = noise(seed, len / 16 + 1);
    let mut out = Vec::with_capacity(len);
    for (k, &b) in r.iter().enumerate().take(len / 16) {
        out.extend_from_slice(&(0x5555_0000_0000u64 + (k as u64 * 48) + u64::from(b & 0x30)).to_ne_bytes());
        out.extend_from_slice(&u32::from(b % 7).to_ne_bytes());
        out.extend_from_slice(&0xc0de_u32.to_ne_bytes());
    }
    out.resize(len, 0);
    out
}

/// Each page: half noise, half text.
fn half_random(seed: u64, len: usize) -> Vec<u8> {
    let (n, t) = (noise(seed, len), text(seed + 1, len));
    let mut out = t;
    for p in 0..len / PAGE_SIZE {
        let at = p * PAGE_SIZE;
        out[at..at + PAGE_SIZE / 2].copy_from_slice(&n[at..at + PAGE_SIZE / 2]);
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

#[test]
fn every_kind_of_data_round_trips_with_every_codec_and_group_size() {
    with_timeout(300, || {
        let n = 256;
        let len = n * PAGE_SIZE;
        let mut same = vec![0u8; len];
        for (k, w) in same.as_chunks_mut::<8>().0.iter_mut().enumerate() {
            *w = (0x0101_0101_0101_0101u64 * ((k / 512) as u64 % 3)).to_ne_bytes();
        }
        let kinds: Vec<(&str, Vec<u8>)> = vec![
            ("zeros", vec![0; len]),
            ("same-filled", same),
            ("text", text(1, len)),
            ("heap", heap(2, len)),
            ("random", noise(3, len)),
            ("half-random", half_random(4, len)),
        ];
        for codec in [Codec::Lz4, Codec::Zstd(1)] {
            for group_pages in [1, 4, 16] {
                let space = space();
                let (dev, store) =
                    compressed(&space, CompressConfig { codec, group_pages, ..CompressConfig::default() });
                for (name, data) in &kinds {
                    let what = format!("{name}, {codec}, groups of {group_pages}");
                    let r = region_with(&space, data);
                    let moved = dev.migrate_to_device(r.addr(), n).unwrap();
                    assert_eq!(moved.moved, n, "{what}: {moved:?}");
                    let s = store.stats();
                    assert_eq!(s.orig_data_size, (n * PAGE_SIZE) as u64, "{what}");
                    match *name {
                        "zeros" | "same-filled" => {
                            assert_eq!(s.same_pages, n as u64, "{what}");
                            assert_eq!(s.mem_used_total, 0, "{what}: same-filled pages use no pool");
                        }
                        "random" => assert_eq!(s.huge_pages, n as u64, "{what}: noise is kept raw"),
                        "half-random" => assert!(s.compr_data_size < s.orig_data_size * 9 / 10, "{what}: {s:?}"),
                        _ => {
                            assert_eq!(s.huge_pages, 0, "{what}");
                            assert!(s.compr_data_size < s.orig_data_size * 7 / 10, "{what}: {s:?}");
                            // Groups are aligned in the address space: the
                            // region's ends may leave a few pages single.
                            if group_pages > 1 {
                                assert!(s.grouped_pages + 2 * group_pages as u64 >= n as u64, "{what}: {s:?}");
                            }
                        }
                    }
                    assert!(read_all(&r) == *data, "{what}: data came back wrong");
                    dev.migrate_to_system(r.addr(), n).unwrap();
                    assert_eq!(dev.pages_in_use(), 0, "{what}");
                    assert_eq!(store.stats().objects, 0, "{what}: every object freed");
                    store.compact();
                    assert_eq!(store.stats().mem_used_total, 0, "{what}: the pool gave its memory back");
                }
            }
        }
    });
}

#[test]
fn zero_pages_come_back_as_the_zero_page() {
    with_timeout(120, || {
        let space = space();
        let (dev, store) = compressed(&space, CompressConfig::default());
        let r = region_with(&space, &vec![0; 64 * PAGE_SIZE]);
        assert_eq!(dev.migrate_to_device(r.addr(), 64).unwrap().moved, 64);
        assert_eq!(store.stats().same_pages, 64);
        let mut b = [1u8; 8];
        r.read(5 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, [0; 8]);
        let snap = space.snapshot(r.range()).unwrap();
        let zero = snap.iter().filter(|p| p.residency == Residency::Zero).count();
        assert!(zero >= 1, "the faulted window is the zero page, no RAM: {snap:?}");
        assert!(snap.iter().all(|p| matches!(p.residency, Residency::Zero | Residency::Device(..))));
        r.write(5 * PAGE_SIZE, b"written").unwrap();
        r.read(5 * PAGE_SIZE, &mut b[..7]).unwrap();
        assert_eq!(&b[..7], b"written");
    });
}

#[test]
fn holes_stay_holes_and_cost_nothing() {
    with_timeout(60, || {
        let space = space();
        let (dev, store) = compressed(&space, CompressConfig::default());
        let r = map(&space, 64);
        // A first touch fills a window of zeroed pages around it.
        r.write(3 * PAGE_SIZE, b"x").unwrap();
        let moved = dev.migrate_to_device(r.addr(), 64).unwrap();
        assert_eq!(moved.moved + moved.holes, 64, "{moved:?}");
        assert!(moved.holes >= 32 && moved.not_stored == 0, "{moved:?}");
        assert_eq!(store.stats().orig_data_size, (moved.moved * PAGE_SIZE) as u64);
        assert_eq!(store.stats().same_pages, moved.moved as u64 - 1, "the zeroed pages are same-filled");
        let mut b = [9u8; 2];
        r.read(3 * PAGE_SIZE - 1, &mut b).unwrap();
        assert_eq!(b, [0, b'x']);
    });
}

#[test]
fn a_fault_brings_a_group_back_whole_and_a_single_page_window_leaves_the_rest() {
    with_timeout(120, || {
        let data = text(7, 64 * PAGE_SIZE);
        // The default window: the group comes back at once.
        let space = space();
        let (dev, store) = compressed(&space, CompressConfig { group_pages: 16, ..CompressConfig::default() });
        let r = region_with(&space, &data);
        dev.migrate_to_device(r.addr(), 64).unwrap();
        let groups = store.stats().grouped_pages;
        assert!(groups >= 32, "{groups}");
        // A page whose 16-page window is a whole group: the first aligned one.
        let first = (16 - (r.addr() / PAGE_SIZE) % 16) % 16;
        let load = |p: usize| {
            // SAFETY: the address is inside `r`, alive and mapped; no Rust
            // reference to these bytes exists. The load is a CPU fault.
            unsafe { std::ptr::read_volatile(r.as_ptr().add(p * PAGE_SIZE)) }
        };
        assert_eq!(load(first + 1), data[(first + 1) * PAGE_SIZE]);
        assert_eq!(pages_in_ram(&space, &r, first..first + 16), 16, "the whole group is back");
        assert_eq!(dev.counters().faults, 1);
        assert_eq!(store.stats().grouped_pages, groups - 16);

        // A window of one page: the rest of the group stays, and each page
        // still comes back right, decoded from the same object.
        let space = AddressSpace::new(Config { fault_around_pages: 1, ..Config::default() }).unwrap();
        let (dev, store) = compressed(&space, CompressConfig { group_pages: 16, ..CompressConfig::default() });
        let r = region_with(&space, &data);
        dev.migrate_to_device(r.addr(), 64).unwrap();
        let first = (16 - (r.addr() / PAGE_SIZE) % 16) % 16;
        let objects = store.stats().objects;
        let mut b = [0u8; 4];
        r.read((first + 1) * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, data[(first + 1) * PAGE_SIZE..][..4]);
        assert_eq!(pages_in_ram(&space, &r, first..first + 16), 1);
        assert_eq!(store.stats().objects, objects, "the group's object lives while pages of it are stored");
        assert!(read_all(&r) == data);
        assert_eq!(store.stats().objects, 0);
    });
}

#[test]
fn a_corrupted_object_is_a_lost_page_never_wrong_data() {
    with_timeout(120, || {
        let space = space();
        let (dev, store) = compressed(&space, CompressConfig { group_pages: 1, ..CompressConfig::default() });
        let data = text(9, 16 * PAGE_SIZE);
        let r = region_with(&space, &data);
        dev.migrate_to_device(r.addr(), 16).unwrap();
        let key = match space.snapshot(r.range()).unwrap()[5].residency {
            Residency::Device(p, _) => p.pfn.0,
            other => panic!("page 5 is {other:?}"),
        };
        assert!(store.corrupt(key));
        if space.user_mode_only() {
            // `Region::read` copies with loads there (a lost page found on
            // the way is a SIGBUS): the explicit migration back finds it.
            dev.migrate_to_system(r.addr() + 5 * PAGE_SIZE, 1).unwrap();
        }
        let mut page = vec![0u8; PAGE_SIZE];
        assert_eq!(r.read(5 * PAGE_SIZE, &mut page).unwrap_err().kind(), ErrorKind::Fault);
        assert_eq!(store.stats().lost_pages, 1);
        assert_eq!(dev.counters().lost, 1);
        assert_eq!(space.snapshot(r.range()).unwrap()[5].residency, Residency::Poisoned);
        for p in (0..16).filter(|&p| p != 5) {
            r.read(p * PAGE_SIZE, &mut page).unwrap();
            assert!(page[..] == data[p * PAGE_SIZE..][..PAGE_SIZE], "page {p}");
        }
    });
}

/// A direct load from a page whose object was corrupted dies of SIGBUS.
#[test]
fn a_direct_load_from_a_lost_page_gets_sigbus() {
    if !isolated("a_direct_load_from_a_lost_page_gets_sigbus") {
        return;
    }
    let space = space();
    let (dev, store) = compressed(&space, CompressConfig::default());
    let r = region_with(&space, &text(3, 16 * PAGE_SIZE));
    dev.migrate_to_device(r.addr(), 16).unwrap();
    let Residency::Device(p, _) = space.snapshot(r.range()).unwrap()[9].residency else { panic!("not moved") };
    assert!(store.corrupt(p.pfn.0));
    let addr = r.addr() + 9 * PAGE_SIZE;
    let code = fork_child(|| {
        // SAFETY: the address is inside `r`, mapped for the child's whole
        // life; no Rust reference to these bytes exists. The load must
        // raise SIGBUS, which ends the child.
        let v = unsafe { std::ptr::read_volatile(addr as *const u8) };
        i32::from(v) + 1
    });
    assert_eq!(code, 128 + 7, "the child must die of SIGBUS");
}

#[test]
fn a_full_pool_moves_part_of_a_range_and_loses_nothing() {
    with_timeout(120, || {
        let space = space();
        // Room for 64 raw pages in the pool (noise does not compress).
        let config = CompressConfig { capacity_bytes: 256 << 10, ..CompressConfig::default() };
        let (dev, store) = compressed(&space, config);
        let data = noise(11, 256 * PAGE_SIZE);
        let r = region_with(&space, &data);
        let moved = dev.migrate_to_device(r.addr(), 256).unwrap();
        assert!(moved.moved > 0 && moved.moved <= 64, "{moved:?}");
        assert_eq!(moved.moved + moved.not_stored, 256, "{moved:?}");
        assert!(store.stats().pool_full > 0);
        assert!(store.stats().mem_used_total <= 256 << 10);
        assert!(read_all(&r) == data);
        assert_eq!(dev.pages_in_use(), 0);
    });
}

#[test]
fn injected_allocation_failures_leave_pages_in_ram() {
    with_timeout(120, || {
        let space = space();
        let config = CompressConfig { alloc_fail_rate: 0.3, fault_seed: 5, ..CompressConfig::default() };
        let (dev, store) = compressed(&space, config);
        let data = half_random(12, 512 * PAGE_SIZE);
        let r = region_with(&space, &data);
        let moved = dev.migrate_to_device(r.addr(), 512).unwrap();
        assert!(moved.not_stored > 0 && moved.moved > 0, "{moved:?}");
        assert!(store.stats().injected_alloc_failures > 0);
        assert_eq!(pages_in_ram(&space, &r, 0..512), moved.not_stored);
        assert!(read_all(&r) == data);
    });
}

#[test]
fn compaction_gives_memory_back_and_keeps_the_data() {
    with_timeout(120, || {
        let space = space();
        let (dev, store) = compressed(&space, CompressConfig { group_pages: 1, ..CompressConfig::default() });
        let n = 2048;
        let data = text(13, n * PAGE_SIZE);
        let r = region_with(&space, &data);
        assert_eq!(dev.migrate_to_device(r.addr(), n).unwrap().moved, n);
        // Every other page back: the pool is left full of holes.
        for p in (0..n).step_by(2) {
            dev.migrate_to_system(r.addr() + p * PAGE_SIZE, 1).unwrap();
        }
        let before = store.stats();
        let freed = store.compact();
        let after = store.stats();
        assert!(freed > 0, "{before:?}");
        assert_eq!(after.mem_used_total, before.mem_used_total - freed as u64);
        assert_eq!(after.compacted_bytes, freed as u64);
        assert!(after.mem_used_total < before.mem_used_total * 3 / 4, "{before:?} -> {after:?}");
        assert!(after.fragmentation() < before.fragmentation(), "{before:?} -> {after:?}");
        assert!(read_all(&r) == data);
    });
}

#[test]
fn bad_settings_and_ranges_are_refused() {
    let bad = [
        CompressConfig { group_pages: 0, ..CompressConfig::default() },
        CompressConfig { group_pages: 17, ..CompressConfig::default() },
        CompressConfig { codec: Codec::Zstd(40), ..CompressConfig::default() },
        CompressConfig { corrupt_rate: 2.0, ..CompressConfig::default() },
    ];
    for config in bad {
        assert_eq!(CompressStore::new(config).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }
    let space = space();
    let (dev, _store) = compressed(&space, CompressConfig::default());
    let r = map(&space, 4);
    assert_eq!(dev.migrate_to_device(r.addr() + 1, 1).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(dev.migrate_to_device(r.addr(), 0).unwrap_err().kind(), ErrorKind::InvalidArgument);
}
