//! The program's own `munmap` and `mremap` of region memory, made with raw
//! system calls behind uhmm's back, in a space that watches for them
//! (`Config::non_cooperative`): unmapped pages are given up (device pages
//! freed, the addresses never touched again), moved ones followed to their
//! new address, device pages included; uhmm's own unmaps and moves are not
//! mistaken for the program's.

mod common;

use std::time::{Duration, Instant};

use common::TestDev;
use uhmm::{AddressSpace, Config, ErrorKind, PAGE_SIZE, Prot, Region};

/// Long enough for the reaper thread on a busy machine.
const WAIT: Duration = Duration::from_secs(20);

/// The tests run one at a time: each unmaps memory and maps other memory
/// at the same addresses, which a test beside it could take meanwhile.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn space() -> AddressSpace {
    AddressSpace::new(Config { non_cooperative: true, ..Config::default() })
        .expect("a full userfaultfd with non-cooperative events must be available")
}

/// A region of `n` pages, page `p` filled with `p + 1`, all on a test device.
fn on_device(space: &AddressSpace, n: usize) -> (Region, std::sync::Arc<TestDev>) {
    let dev = TestDev::new(space);
    let r = space.map(n * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    for p in 0..n {
        r.write(p * PAGE_SIZE, &vec![p as u8 + 1; PAGE_SIZE]).unwrap();
    }
    assert_eq!(dev.to_device(space, r.range()).migrated, n);
    (r, dev)
}

/// Waits until `done` holds, failing the test after [`WAIT`].
fn wait_for(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn raw_munmap(addr: usize, len: usize) {
    // SAFETY: the range is region memory no Rust reference points into;
    // the test unmaps it behind uhmm's back on purpose.
    let rc = unsafe { libc::munmap(addr as *mut libc::c_void, len) };
    assert_eq!(rc, 0, "munmap: {}", std::io::Error::last_os_error());
}

/// `mmap(MAP_FIXED)` of fresh anonymous memory over `addr..addr + len`.
fn raw_map_at(addr: usize, len: usize) {
    // SAFETY: the range is region memory no Rust reference points into;
    // the test replaces it behind uhmm's back on purpose.
    let got = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    assert_eq!(got as usize, addr, "mmap at {addr:#x}: {}", std::io::Error::last_os_error());
}

/// Reads a byte with a plain load.
fn peek(addr: usize) -> u8 {
    // SAFETY: the test maps `addr` readable before it looks.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

fn poke(addr: usize, len: usize, v: u8) {
    // SAFETY: the test maps `addr..addr + len` writable before it writes.
    unsafe { std::ptr::write_bytes(addr as *mut u8, v, len) };
}

#[test]
fn a_raw_munmap_of_a_region_on_a_device_gives_it_up() {
    let _one = serial();
    let space = space();
    let (r, dev) = on_device(&space, 64);
    raw_munmap(r.addr(), r.len());
    wait_for("the device pages to be freed", || dev.freed.lock().unwrap().len() == 64);
    assert!(r.is_gone());
    assert_eq!(space.stats().foreign_unmapped_pages, 64);
    assert_eq!(r.read(0, &mut [0; 8]).unwrap_err().kind(), ErrorKind::Fault);
    assert_eq!(space.read_at(r.addr(), &mut [0; 8]).unwrap_err().kind(), ErrorKind::Fault);
}

#[test]
fn a_mapping_made_over_a_region_behind_uhmms_back_is_left_alone() {
    let _one = serial();
    let space = space();
    let (r, dev) = on_device(&space, 64);
    let (addr, len) = (r.addr(), r.len());
    // mmap(MAP_FIXED) replaces the region's memory in one call.
    raw_map_at(addr, len);
    poke(addr, len, 7);
    wait_for("the device pages to be freed", || dev.freed.lock().unwrap().len() == 64);
    assert!(r.is_gone());
    // uhmm goes on with other memory, and the region's drop leaves the
    // program's new mapping alone.
    let other = space.map(len, Prot::READ_WRITE).unwrap();
    other.write(0, &[9; 4096]).unwrap();
    dev.to_device(&space, other.range());
    drop(r);
    assert!((0..len).step_by(PAGE_SIZE).all(|o| peek(addr + o) == 7), "the program's new mapping changed");
    let mut b = [0; 4096];
    other.read(0, &mut b).unwrap();
    assert_eq!(b, [9; 4096]);
    raw_munmap(addr, len);
}

#[test]
fn a_raw_munmap_of_part_of_a_region_leaves_the_rest_working() {
    let _one = serial();
    let space = space();
    let (r, dev) = on_device(&space, 64);
    let hole = r.addr() + 16 * PAGE_SIZE..r.addr() + 32 * PAGE_SIZE;
    raw_munmap(hole.start, hole.len());
    wait_for("the hole's device pages to be freed", || dev.freed.lock().unwrap().len() == 16);
    assert!(!r.is_gone());
    // The rest comes back from the device.
    for p in (0..16).chain(32..40) {
        let mut b = vec![0; PAGE_SIZE];
        r.read(p * PAGE_SIZE, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == p as u8 + 1), "page {p}");
    }
    assert_eq!(r.read(20 * PAGE_SIZE, &mut [0; 8]).unwrap_err().kind(), ErrorKind::Fault);
    assert!(r.discard(16 * PAGE_SIZE..32 * PAGE_SIZE).is_err(), "uhmm calls refuse the hole");
    // A mapping the program puts over another part (MAP_FIXED, in one
    // call: a hole could be taken by any small mapping meanwhile) is its
    // own: migrations of the region skip it, its drop does not unmap it.
    let over = r.addr() + 56 * PAGE_SIZE..r.addr() + 64 * PAGE_SIZE;
    // (Some may have come back by read-ahead with the reads above.)
    let on_device = (56..64).filter(|&p| matches!(r.state(p), Some(uhmm::PageState::Device(_)))).count();
    let freed = dev.freed.lock().unwrap().len();
    raw_map_at(over.start, over.len());
    poke(over.start, over.len(), 5);
    wait_for("the replaced part to be given up", || space.stats().foreign_unmapped_pages == 16 + 8);
    wait_for("its device pages to be freed", || dev.freed.lock().unwrap().len() == freed + on_device);
    assert_eq!(dev.to_device(&space, r.addr()..r.addr() + 16 * PAGE_SIZE).migrated, 16);
    assert!(uhmm::Migration::setup(&space, r.range(), uhmm::Select::SYSTEM, dev.owner).is_err());
    drop(r);
    assert!((0..over.len()).step_by(PAGE_SIZE).all(|o| peek(over.start + o) == 5));
    raw_munmap(over.start, over.len());
}

#[test]
fn a_raw_mremap_is_followed_with_its_device_pages() {
    let _one = serial();
    let space = space();
    let (r, dev) = on_device(&space, 32);
    let old = r.addr();
    // Moved and grown to twice the size, wherever the kernel likes.
    // SAFETY: the region's memory, moved behind uhmm's back on purpose; no
    // Rust reference points into it.
    let new = unsafe { libc::mremap(old as *mut libc::c_void, r.len(), 2 * r.len(), libc::MREMAP_MAYMOVE) };
    assert_ne!(new, libc::MAP_FAILED, "mremap: {}", std::io::Error::last_os_error());
    let new = new as usize;
    if new != old {
        wait_for("the old region to be given up", || r.is_gone());
    }
    wait_for("the move to be followed", || space.stats().regions_followed == 1);
    // The device pages come back at the new address, by a copy and by a load.
    for p in 0..32 {
        let mut b = vec![0; PAGE_SIZE];
        space.read_at(new + p * PAGE_SIZE, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == p as u8 + 1), "page {p}");
    }
    assert_eq!(peek(new + 31 * PAGE_SIZE + 5), 32);
    // The growth reads zeros and takes writes.
    assert_eq!(peek(new + 40 * PAGE_SIZE), 0);
    poke(new + 40 * PAGE_SIZE, PAGE_SIZE, 3);
    assert_eq!(peek(new + 40 * PAGE_SIZE + 100), 3);
    assert!(dev.freed.lock().unwrap().len() >= 32, "the pages came back: their device pages are free");
    // The followed region moves to the device again, and an unmap gives it up.
    assert!(dev.to_device(&space, new..new + 64 * PAGE_SIZE).migrated > 0);
    let before = dev.freed.lock().unwrap().len();
    raw_munmap(new, 64 * PAGE_SIZE);
    wait_for("the followed region's device pages to be freed", || dev.freed.lock().unwrap().len() > before);
    assert_eq!(space.read_at(new, &mut [0; 8]).unwrap_err().kind(), ErrorKind::Fault);
    drop(r);
}

#[test]
fn a_raw_mremap_that_grows_in_place_leaves_the_growth_to_the_kernel() {
    let _one = serial();
    let space = space();
    // mremap grows in place without an event: a region whose upper half the
    // program unmapped grows back into it.
    let (r, _dev, grown) = (0..50)
        .find_map(|_| {
            let (r, dev) = on_device(&space, 64);
            let half = r.addr() + 32 * PAGE_SIZE;
            raw_munmap(half, 32 * PAGE_SIZE);
            wait_for("the upper half to be given up", || {
                r.state(40).is_some() && r.read(40 * PAGE_SIZE, &mut [0]).is_err()
            });
            std::thread::sleep(Duration::from_millis(20)); // the reaper thread's own mappings go
            // SAFETY: the region's memory, grown behind uhmm's back on
            // purpose; no Rust reference points into it.
            let got = unsafe { libc::mremap(r.addr() as *mut libc::c_void, 32 * PAGE_SIZE, 64 * PAGE_SIZE, 0) };
            // Something else may have taken the hole: try again.
            Some((r, dev, got)).filter(|(_, _, g)| *g != libc::MAP_FAILED)
        })
        .expect("the hole was never free to grow into");
    assert_eq!(grown as usize, r.addr());
    // The growth is the program's plain memory: zeros, writable, no hang.
    assert_eq!(peek(r.addr() + 40 * PAGE_SIZE), 0);
    poke(r.addr() + 40 * PAGE_SIZE, 2 * PAGE_SIZE, 6);
    assert_eq!(peek(r.addr() + 41 * PAGE_SIZE + 9), 6);
    assert!(space.stats().unmanaged_ranges >= 1, "{:?}", space.stats());
    // The managed half still comes back from the device.
    let mut b = vec![0; PAGE_SIZE];
    r.read(5 * PAGE_SIZE, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 6));
    // The region's drop leaves the growth alone; the program unmaps it.
    drop(r);
    assert_eq!(peek(grown as usize + 41 * PAGE_SIZE), 6);
    raw_munmap(grown as usize + 32 * PAGE_SIZE, 32 * PAGE_SIZE);
}

#[test]
fn uhmm_own_unmaps_and_moves_are_not_the_programs() {
    let _one = serial();
    let space = space();
    let (r, dev) = on_device(&space, 32);
    r.unmap(8 * PAGE_SIZE..16 * PAGE_SIZE).unwrap();
    let r2 = space.map(16 * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    r2.write(0, &[1; 64]).unwrap();
    dev.to_device(&space, r2.range());
    let moved = r2.remap().unwrap();
    let mut b = [0; 64];
    space.read_at(moved, &mut b).unwrap();
    assert_eq!(b, [1; 64]);
    let mut p = vec![0; PAGE_SIZE];
    r.read(20 * PAGE_SIZE, &mut p).unwrap();
    assert!(p.iter().all(|&x| x == 21));
    let stats = space.stats();
    assert_eq!((stats.foreign_unmapped_pages, stats.regions_followed), (0, 0));
    // Dropping the regions and the space sends no event no one reads (a
    // hang here fails the test by its timeout).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop((r, r2, dev, space));
        tx.send(()).unwrap();
    });
    rx.recv_timeout(WAIT).expect("dropping the space hung");
}
