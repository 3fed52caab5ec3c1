//! The fault engine seen from a program: a fault on a locked page waits
//! for the unlock; a handler stalled in a fault steps aside and the fault
//! completes; a fault's page filled in place (the handler's scratch) is
//! the one mapped, unless the driver filled another since.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::TestDev;
use uhmm::{AddressSpace, Config, Migration, Owner, PAGE_SIZE, Prot, Select};

#[test]
fn a_handler_stalled_in_a_fault_steps_aside_and_the_fault_completes() {
    let space = AddressSpace::new(Config::default()).unwrap();
    let cpus = uhmm_sys::process::allowed_cpus().unwrap();
    assert!(cpus.len() >= 2, "this test needs two CPUs (the machines uhmm is built on have them)");
    let (region, dev) = TestDev::attach(&space, 4);
    assert_eq!(dev.to_device(&space, region.range()).migrated, 4);
    let region = Arc::new(region);
    // Each read faults on the handler (bounded: a lost wake fails it).
    let read = |page: usize| {
        let (tx, rx) = std::sync::mpsc::channel();
        let r = region.clone();
        std::thread::spawn(move || {
            let mut b = [9u8; 1];
            let _ = tx.send(r.read(page * PAGE_SIZE, &mut b).map(|()| b[0]));
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the fault never completed").unwrap()
    };
    dev.sluggish_ms.store(uhmm_sys::stall::STALL_WAIT.as_millis() as usize + 1, Ordering::SeqCst);
    assert_eq!(read(0), 1, "the device gives the data back");
    // The handler counts the stall after it woke the reader.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while space.stats().handler_stalls == 0 {
        assert!(std::time::Instant::now() < deadline, "the stall was not noticed");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    dev.sluggish_ms.store(0, Ordering::SeqCst);
    // Faults of usual length are not stalls: of many, most are not
    // counted (a busy machine may stop a handler in the middle of a few).
    let before = space.stats().handler_stalls;
    let page3 = region.addr() + 3 * PAGE_SIZE..region.addr() + 4 * PAGE_SIZE;
    for _ in 0..50 {
        dev.to_device(&space, page3.clone());
        assert_eq!(read(3), 1);
    }
    let stalls = space.stats().handler_stalls - before;
    assert!(stalls < 25, "{stalls} of 50 faults of usual length counted as stalls");
}

#[test]
fn fault_on_locked_page_is_parked_then_woken() {
    let space = AddressSpace::new(Config::default()).unwrap();
    let region = Arc::new(space.map(16 * PAGE_SIZE, Prot::READ_WRITE).unwrap());
    let owner = Owner::new();
    let m = Migration::setup(&space, region.range(), Select::SYSTEM, owner).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let t = {
        let (region, done) = (region.clone(), done.clone());
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            region.read(3 * PAGE_SIZE, &mut b).unwrap();
            std::hint::black_box(b);
            done.store(true, Ordering::SeqCst);
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while space.stats().deferred_faults == 0 {
        assert!(std::time::Instant::now() < deadline, "fault never arrived");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(!done.load(Ordering::SeqCst), "the access must wait while the page is locked");
    drop(m); // restores and unlocks: the parked thread is woken
    while !done.load(Ordering::SeqCst) {
        assert!(std::time::Instant::now() < deadline, "parked fault was never woken");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    t.join().unwrap();
}

/// A driver that fills a fault's page in place, in the handler's scratch
/// pages (`system_dst_bytes`), or, when told, writes junk there and then
/// the data into `system_dst`'s page: the page it filled last is the one
/// mapped.
struct InPlace {
    owner: Owner,
    data: std::sync::Mutex<std::collections::HashMap<u64, Vec<u8>>>,
    change_of_mind: AtomicBool,
}

impl uhmm::DevicePagemapOps for InPlace {
    fn page_free(&self, pfn: uhmm::DevicePfn) {
        self.data.lock().unwrap().remove(&pfn.0);
    }

    #[allow(clippy::single_range_in_vec_init)] // one run, in the API's list of runs
    fn migrate_to_ram(&self, fault: &uhmm::CpuFault) -> uhmm::Result<()> {
        let mut m = Migration::setup(fault.space(), fault.window(), Select::DEVICE_PRIVATE, self.owner)?;
        for i in 0..m.npages() {
            let uhmm::MigrateSrc::Device(p) = m.src(i) else { continue };
            let data = self.data.lock().unwrap()[&p.pfn.0].clone();
            m.system_dst_bytes(&[i..i + 1])?[0].copy_from_slice(if self.change_of_mind.load(Ordering::SeqCst) {
                &[0xee; PAGE_SIZE]
            } else {
                &data
            });
            if self.change_of_mind.load(Ordering::SeqCst) {
                m.system_dst(i)?.write(0, &data)?;
            }
            m.set_dst_system(i)?;
        }
        m.pages().finalize();
        Ok(())
    }
}

#[test]
fn a_fault_filled_in_place_maps_the_page_the_driver_filled_last() {
    for change_of_mind in [false, true] {
        let space = AddressSpace::new(Config { fault_around_pages: 1, ..Config::default() }).unwrap();
        let dev = Arc::new(InPlace {
            owner: Owner::new(),
            data: Default::default(),
            change_of_mind: AtomicBool::new(change_of_mind),
        });
        let ops: std::sync::Weak<dyn uhmm::DevicePagemapOps> = Arc::downgrade(&dev) as std::sync::Weak<InPlace>;
        let pm = space.register_pagemap(ops, dev.owner, 64).unwrap();
        let region = space.map(4 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
        region.write(0, &[7u8; 4 * PAGE_SIZE]).unwrap();
        let mut m = Migration::setup(&space, region.range(), Select::SYSTEM, dev.owner).unwrap();
        for i in 0..4 {
            let uhmm::MigrateSrc::System(sp) = m.src(i) else { panic!("page {i} not in RAM") };
            let mut b = vec![0u8; PAGE_SIZE];
            sp.read(0, &mut b).unwrap();
            dev.data.lock().unwrap().insert(i as u64, b);
            m.set_dst_device(i, pm.page(uhmm::DevicePfn(i as u64)).unwrap()).unwrap();
        }
        assert_eq!(m.pages().finalize().migrated, 4);
        // A load: the fault engine serves it, through the handler's scratch.
        let mut b = [0u8; 8];
        region.load(2 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, [7u8; 8], "change of mind: {change_of_mind}");
        assert_eq!(space.stats().migrate_to_ram, 1);
    }
}
