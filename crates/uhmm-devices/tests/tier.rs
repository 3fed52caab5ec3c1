//! The RAM budget (`tier`): resident pages stay under the budget (plus the
//! documented slack) under a sequential scan and under random access, a
//! touched page comes back by its fault, a program that fits is left
//! alone until a fault waits at the budget, a budget lowered at run time is
//! reclaimed down to, the tracking ranks written pages hot, and a model of
//! random operations with a budget agrees with a byte array.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use uhmm::{AddressSpace, PAGE_SIZE, Prot, Region};
use uhmm_devices::compress::{CompressConfig, CompressStore};
use uhmm_devices::store::{StoreDevice, StoreDeviceConfig};
use uhmm_devices::tier::{Tier, TierConfig, space_config};

const MIB: usize = 1 << 20;

/// What resident memory may exceed the budget by: a fault-around or
/// zero-fill window (2 MiB at most) per fault handler thread, brought in
/// while the estimate lagged (docs/tier.md).
fn slack(space: &AddressSpace) -> usize {
    space.config().handler_threads * 2 * MIB
}

/// A space under a tier of `budget` bytes over a compressed store; faults
/// wait for room as long as a busy machine needs.
fn tiered(budget: usize) -> (AddressSpace, Arc<StoreDevice>, Tier) {
    let space = AddressSpace::new(space_config()).expect("userfaultfd must be available");
    let store = Arc::new(CompressStore::new(CompressConfig::default()).unwrap());
    let dev = Arc::new(StoreDevice::new(&space, store, StoreDeviceConfig::default()).unwrap());
    let config = TierConfig {
        budget_bytes: budget as u64,
        interval: Duration::from_millis(10),
        charge_wait: Duration::from_secs(30),
        ..TierConfig::default()
    };
    let tier = Tier::new(&space, dev.clone(), config).unwrap();
    (space, dev, tier)
}

fn resident(space: &AddressSpace, region: &Region) -> usize {
    space.resident(region.range()).unwrap().iter().map(|r| r.len()).sum()
}

/// Samples the region's true resident bytes (PAGEMAP_SCAN) every
/// millisecond until stopped; returns the most seen.
fn watch(space: &AddressSpace, region: &Region) -> (Arc<AtomicBool>, std::thread::JoinHandle<usize>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (s, r, flag) = (space.clone(), region.range(), stop.clone());
    let t = std::thread::spawn(move || {
        let mut most = 0;
        while !flag.load(Ordering::Relaxed) {
            most = most.max(s.resident(r.clone()).unwrap().iter().map(|x| x.len()).sum());
            std::thread::sleep(Duration::from_millis(1));
        }
        most
    });
    (stop, t)
}

fn page_bytes(p: usize, version: u8) -> Vec<u8> {
    let mut b = vec![version; PAGE_SIZE];
    b[..8].copy_from_slice(&(p as u64).to_le_bytes());
    b
}

#[test]
fn budget_holds_under_a_scan_and_touched_pages_come_back() {
    let budget = 8 * MIB;
    let (space, dev, tier) = tiered(budget);
    let region = space.map(32 * MIB, Prot::READ_WRITE).unwrap();
    tier.manage(region.range()).unwrap();
    let (stop, most) = watch(&space, &region);
    let n = region.npages();
    for p in 0..n {
        region.write(p * PAGE_SIZE, &page_bytes(p, 1)).unwrap();
    }
    // A second pass reads every page back: each cold one by its fault.
    let mut b = vec![0; PAGE_SIZE];
    for p in 0..n {
        region.read(p * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, page_bytes(p, 1), "page {p}");
    }
    stop.store(true, Ordering::Relaxed);
    let most = most.join().unwrap();
    let s = tier.stats();
    assert!(most <= budget + slack(&space), "resident reached {most} bytes over a budget of {budget}");
    assert!(resident(&space, &region) <= budget + slack(&space));
    assert!(s.demoted_pages as usize >= n - budget / PAGE_SIZE, "{s:?}");
    assert!(dev.counters().promoted > 0 && s.promoted_pages > 0, "{s:?}");
    assert!(s.throttled > 0 && s.overshoots == 0, "{s:?}");
    assert!(s.peak_resident_bytes as usize <= budget + slack(&space), "{s:?}");
}

#[test]
fn budget_holds_under_random_access() {
    let budget = 8 * MIB;
    let (space, _dev, tier) = tiered(budget);
    let region = space.map(24 * MIB, Prot::READ_WRITE).unwrap();
    tier.manage(region.range()).unwrap();
    let n = region.npages();
    let mut version = vec![0u8; n];
    let (stop, most) = watch(&space, &region);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut b = vec![0; PAGE_SIZE];
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = (x % n as u64) as usize;
        if x & 0x100 == 0 {
            version[p] = version[p].wrapping_add(1).max(1);
            region.write(p * PAGE_SIZE, &page_bytes(p, version[p])).unwrap();
        } else {
            region.read(p * PAGE_SIZE, &mut b).unwrap();
            let want = if version[p] == 0 { vec![0; PAGE_SIZE] } else { page_bytes(p, version[p]) };
            assert!(b == want, "page {p}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let most = most.join().unwrap();
    assert!(most <= budget + slack(&space), "resident reached {most} bytes over a budget of {budget}");
    assert!(tier.stats().demoted_pages > 0);
}

#[test]
fn a_program_that_fits_keeps_its_pages_until_a_fault_waits() {
    // Between the high watermark (budget - 1/32) and the budget: nothing
    // is demoted while no fault has had to wait.
    let budget = 16 * MIB;
    let (space, _dev, tier) = tiered(budget);
    // The region is the size written: first-touch windows (up to 2 MiB)
    // past the written part would bring resident memory to the budget.
    let region = space.map(budget - budget / 64, Prot::READ_WRITE).unwrap();
    tier.manage(region.range()).unwrap();
    region.write(0, &vec![7; budget - budget / 64]).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // 30 rounds
    let s = tier.stats();
    assert_eq!((s.demoted_pages, s.throttled), (0, 0), "{s:?}");
    // Past the budget a fault waits; from then on reclaim starts early.
    let more = space.map(4 * MIB, Prot::READ_WRITE).unwrap();
    tier.manage(more.range()).unwrap();
    more.write(0, &vec![8; 4 * MIB]).unwrap();
    let s = tier.stats();
    assert!(s.throttled > 0 && s.demoted_pages > 0, "{s:?}");
    let both = resident(&space, &region) + resident(&space, &more);
    assert!(both <= budget + slack(&space), "{both} bytes resident");
}

#[test]
fn a_budget_lowered_at_run_time_is_reclaimed_down_to() {
    let (space, _dev, tier) = tiered(32 * MIB);
    let region = space.map(16 * MIB, Prot::READ_WRITE).unwrap();
    tier.manage(region.range()).unwrap();
    region.write(0, &vec![7; 16 * MIB]).unwrap();
    assert!(resident(&space, &region) >= 15 * MIB, "all in RAM under a larger budget");
    assert_eq!(tier.stats().demoted_pages, 0);
    tier.set_budget(4 * MIB as u64).unwrap();
    assert_eq!(tier.budget(), 4 * MIB as u64);
    let deadline = Instant::now() + Duration::from_secs(30);
    while resident(&space, &region) > 4 * MIB && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(resident(&space, &region) <= 4 * MIB, "{} bytes resident", resident(&space, &region));
    // Read back a page at a time: one read(2)-like copy of the whole
    // region would pin 16 MiB at once, past the budget.
    let mut b = vec![0; PAGE_SIZE];
    for p in 0..region.npages() {
        region.read(p * PAGE_SIZE, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 7), "page {p}");
    }
    assert_eq!(tier.set_budget(0).unwrap_err().kind(), uhmm::ErrorKind::InvalidArgument);
}

#[test]
fn written_pages_rank_hot_and_cold_ones_are_demoted_first() {
    let budget = 4 * MIB;
    let (space, _dev, tier) = tiered(budget);
    let region = space.map(6 * MIB, Prot::READ_WRITE).unwrap();
    tier.manage(region.range()).unwrap();
    let hot: Vec<usize> = (0..region.npages()).step_by(16).collect();
    // Everything once (the cold pages), then the hot ones again and again
    // for a few tracking rounds (however far apart a busy machine spaces
    // them).
    region.write(0, &vec![1; 3 * MIB]).unwrap();
    let first = tier.stats().rounds;
    let started = Instant::now();
    while (tier.stats().rounds < first + 4 || started.elapsed() < Duration::from_millis(400))
        && started.elapsed() < Duration::from_secs(20)
    {
        for &p in &hot {
            region.write(p * PAGE_SIZE, &[2]).unwrap();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(tier.stats().rounds >= first + 4, "the tier ran 4 tracking rounds in 20 s");
    let ranked = tier.hottest(hot.len());
    let hits = ranked.iter().filter(|a| hot.contains(&((**a - region.addr()) / PAGE_SIZE))).count();
    assert!(hits * 10 >= hot.len() * 9, "{hits} of {} hot pages ranked hottest", hot.len());
    // Filling the rest pushes past the budget: the cold pages go first.
    region.write(3 * MIB, &vec![3; 3 * MIB]).unwrap();
    let gone = hot
        .iter()
        .filter(|&&p| {
            p * PAGE_SIZE < 3 * MIB
                && !space
                    .resident(region.addr() + p * PAGE_SIZE..region.addr() + (p + 1) * PAGE_SIZE)
                    .unwrap()
                    .is_empty()
        })
        .count();
    let hot_low = hot.iter().filter(|&&p| p * PAGE_SIZE < 3 * MIB).count();
    assert!(gone * 10 >= hot_low * 8, "only {gone} of {hot_low} hot pages stayed in RAM");
}

/// One step of the model.
#[derive(Debug, Clone)]
enum Op {
    Write { page: usize, byte: u8 },
    Read { page: usize },
    Budget { mib: usize },
}

fn op(npages: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..npages, 1u8..255).prop_map(|(page, byte)| Op::Write { page, byte }),
        4 => (0..npages).prop_map(|page| Op::Read { page }),
        1 => (1usize..6).prop_map(|mib| Op::Budget { mib }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_with_a_budget_match_a_byte_array(ops in proptest::collection::vec(op(2048), 1..300)) {
        let (space, _dev, tier) = tiered(2 * MIB);
        let region = space.map(8 * MIB, Prot::READ_WRITE).unwrap();
        tier.manage(region.range()).unwrap();
        let mut model = vec![0u8; region.npages()];
        let mut b = vec![0; PAGE_SIZE];
        for op in ops {
            match op {
                Op::Write { page, byte } => {
                    region.write(page * PAGE_SIZE, &vec![byte; PAGE_SIZE]).unwrap();
                    model[page] = byte;
                }
                Op::Read { page } => {
                    region.read(page * PAGE_SIZE, &mut b).unwrap();
                    prop_assert!(b.iter().all(|&x| x == model[page]), "page {}", page);
                }
                Op::Budget { mib } => tier.set_budget((mib * MIB) as u64).unwrap(),
            }
        }
        for (page, &byte) in model.iter().enumerate() {
            region.read(page * PAGE_SIZE, &mut b).unwrap();
            prop_assert!(b.iter().all(|&x| x == byte), "page {}", page);
        }
    }
}
