//! Faults answered in the faulting thread (`FaultDelivery::Signal`): first
//! touches and device pages come back through the SIGBUS handler with the
//! same data as through the handler threads; threads racing migrations
//! lose nothing; a system call on a page not in RAM fails with `EFAULT`
//! (as with a user-mode-only userfaultfd) and `Region::read` still works.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::TestDev;
use uhmm::{AddressSpace, Config, FaultDelivery, PAGE_SIZE, Prot};

fn space() -> AddressSpace {
    AddressSpace::new(Config { fault_delivery: FaultDelivery::Signal, ..Config::default() }).unwrap()
}

#[test]
fn first_touches_and_device_pages_come_back_in_the_faulting_thread() {
    let space = space();
    let region = space.map(64 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    let mut b = [0u8; 8];
    region.load(5 * PAGE_SIZE, &mut b).unwrap();
    assert_eq!(b, [0; 8], "a first touch reads zeros");
    region.store(5 * PAGE_SIZE, &[7; 8]).unwrap();
    region.load(5 * PAGE_SIZE, &mut b).unwrap();
    assert_eq!(b, [7; 8]);
    assert_eq!(space.stats().faults, 0, "no handler thread read a fault");

    let (region, dev) = TestDev::attach(&space, 16);
    for p in 0..16 {
        region.store(p * PAGE_SIZE, &[p as u8 + 1; 64]).unwrap();
    }
    assert_eq!(dev.to_device(&space, region.range()).migrated, 16);
    for p in (0..16).rev() {
        region.load(p * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, [p as u8 + 1; 8], "page {p} came back from the device");
    }
    assert!(space.stats().migrate_to_ram > 0);
}

#[test]
fn a_system_call_gets_efault_and_region_read_still_works() {
    let space = space();
    let (region, dev) = TestDev::attach(&space, 4);
    region.store(0, &[3; PAGE_SIZE]).unwrap();
    assert_eq!(dev.to_device(&space, region.range()).migrated, 4);
    // write(2) from the region to a pipe: the kernel's copy is not faulted in.
    let (r, w) = std::io::pipe().unwrap();
    // SAFETY: the slice covers part of the region's first page, mapped for
    // the region's life; only the kernel reads through it, during the call.
    let page = unsafe { std::slice::from_raw_parts(region.as_ptr(), 64) };
    assert_eq!(rustix::io::write(&w, page), Err(rustix::io::Errno::FAULT));
    // Under a pin the page is in RAM, and the call works.
    let pin = space.pin(region.addr()..region.addr() + PAGE_SIZE, uhmm::PinKind::ShortTerm).unwrap();
    assert_eq!(rustix::io::write(&w, page), Ok(64));
    drop((pin, r, w));
    assert_eq!(dev.to_device(&space, region.range()).migrated, 1, "the page the pin brought back");
    let mut b = vec![0u8; PAGE_SIZE];
    region.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 3), "Region::read brings the page back with a load");
}

#[test]
fn threads_racing_migrations_lose_no_write() {
    let space = space();
    let (region, dev) = TestDev::attach(&space, 64);
    let region = Arc::new(region);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|t| {
            let (region, stop) = (region.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for p in (t..64).step_by(2) {
                        let off = p * PAGE_SIZE;
                        region.store(off, &n.to_ne_bytes()).unwrap();
                        let mut b = [0u8; 8];
                        region.load(off, &mut b).unwrap();
                        assert_eq!(u64::from_ne_bytes(b), n, "page {p} lost a write");
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut moved = 0;
    while Instant::now() < deadline {
        moved += dev.to_device(&space, region.range()).migrated;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        assert!(w.join().expect("a writer failed") > 0);
    }
    assert!(moved > 0, "the migrations moved pages under the writers");
}
