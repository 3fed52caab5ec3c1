//! The fault engine seen from a program: a fault on a locked page waits
//! for the unlock; a handler stalled in a fault steps aside and the fault
//! completes.

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
    assert_eq!(read(3), 1);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(space.stats().handler_stalls, 1, "a fault of usual length is no stall");
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
