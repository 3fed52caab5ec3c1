//! fork(2) with uhmm (issue 3, item 6): S03, S04, S17. Each test runs in a
//! process of its own (`isolated`) and forks from there.

mod common;

use common::*;
use uhmm::{AddressSpace, Config, PAGE_SIZE, Prot};
use uhmm_devices::sim::SimDevice;

/// Child exit codes, one per check, so a failure says which.
fn check(code: i32, ok: bool) -> Result<(), i32> {
    if ok { Ok(()) } else { Err(code) }
}

fn words_are(buf: &[u8], f: impl Fn(u32) -> u32) -> bool {
    (0..buf.len() / 4).all(|i| word(buf, i) == f(i as u32))
}

/// S03 for one (migrate, huge) variant.
fn anon_write_child(migrate: bool, huge: bool) {
    let space = space();
    let dev = device(&space);
    let npages = if huge { 1024 } else { NPAGES }; // 4 MiB: 2 MiB-aligned, two huge pages' worth
    let region = map(&space, npages);
    assert!(!huge || region.addr().is_multiple_of(2 << 20));
    fill(&region, 0..npages, |i| i);
    if migrate {
        assert_eq!(dev.migrate_to_device_all(region.addr(), npages).unwrap().cpages, npages);
    }
    let code = fork_child(|| {
        let run = || -> Result<(), i32> {
            check(10, space.is_orphaned())?;
            check(11, dev.migrate_to_device(region.addr(), 1).is_err())?; // the parent's device is not ours
            let mine = AddressSpace::new(Config::default()).map_err(|_| 12)?;
            let r = mine.adopt(&region).map_err(|_| 13)?;
            check(14, r.addr() == region.addr())?;
            let mut buf = vec![0u8; r.len()];
            r.read(0, &mut buf).map_err(|_| 15)?;
            check(16, words_are(&buf, |i| i))?; // the parent's data, device pages included
            let d = SimDevice::new(&mine, uhmm_devices::sim::SimConfig::default()).map_err(|_| 17)?;
            d.write(r.addr(), npages, &pattern(npages, |i| i.wrapping_neg())).map_err(|_| 18)?;
            r.read(0, &mut buf).map_err(|_| 19)?;
            check(20, words_are(&buf, |i| i.wrapping_neg()))?;
            // and the child's own device can migrate its pages
            d.migrate_to_device(r.addr(), npages).map_err(|_| 21)?;
            r.read(0, &mut buf).map_err(|_| 22)?;
            check(23, words_are(&buf, |i| i.wrapping_neg()))
        };
        run().err().unwrap_or(0)
    });
    assert_eq!(code, 0, "child failed (migrate {migrate}, huge {huge})");
    // Copy-on-write: the parent still sees its data (read with loads:
    // `Region::read`'s pinned copy would unshare the pages).
    assert_words(&cpu_load(&region), |i| i);
    // Pages shared with a child (even a dead one) are busy for migration
    // until the parent writes them (the kernel refuses to move a page that
    // is not exclusively ours); after a write the parent's device takes them.
    assert_eq!(dev.migrate_to_device(region.addr(), npages).unwrap_err().kind(), uhmm::ErrorKind::Busy);
    fill(&region, 0..npages, |i| i);
    assert_eq!(dev.migrate_to_device_all(region.addr(), npages).unwrap().cpages, npages);
    assert_words(&cpu_read(&region), |i| i);
}

#[test]
fn s03_anon_write_child() {
    if !isolated("s03_anon_write_child") {
        return;
    }
    for migrate in [false, true] {
        for huge in [false, true] {
            anon_write_child(migrate, huge);
        }
    }
}

#[test]
fn s04_anon_write_child_shared() {
    if !isolated("s04_anon_write_child_shared") {
        return;
    }
    let space = space();
    let r = space.map_shared(NPAGES * PAGE_SIZE, Prot::READ_WRITE).unwrap();
    fill(&r, 0..NPAGES, |i| i);
    let code = fork_child(|| {
        let run = || -> Result<(), i32> {
            let mine = AddressSpace::new(Config::default()).map_err(|_| 10)?;
            let r2 = mine.adopt(&r).map_err(|_| 11)?;
            let d = SimDevice::new(&mine, uhmm_devices::sim::SimConfig::default()).map_err(|_| 12)?;
            d.write(r2.addr(), NPAGES, &pattern(NPAGES, |i| i.wrapping_neg())).map_err(|_| 13)?;
            Ok(())
        };
        run().err().unwrap_or(0)
    });
    assert_eq!(code, 0);
    assert_words(&cpu_read(&r), |i| i.wrapping_neg());
}

#[test]
fn s17_cow_in_device() {
    use std::io::{Read, Write};
    if !isolated("s17_cow_in_device") {
        return;
    }
    let space = space();
    let dev = device(&space);
    let r = map(&space, 4);
    fill(&r, 0..4, |i| i);
    dev.migrate_to_device_all(r.addr(), 4).unwrap();
    let (mut rx, mut tx) = std::io::pipe().unwrap();
    let child = spawn_child(|| {
        let mut go = [0u8; 1];
        if rx.read_exact(&mut go).is_err() {
            return 10;
        }
        // The parent has written every page by now: the child must not see it.
        let mut buf = vec![0u8; r.len()];
        if r.read(0, &mut buf).is_err() {
            return 11;
        }
        if words_are(&buf, |i| i) { 0 } else { 12 }
    });
    fill(&r, 0..4, |i| i + 7);
    tx.write_all(&[1]).unwrap();
    assert_eq!(uhmm_sys::process::wait_child(child).unwrap(), 0, "the child saw the parent's writes");
    let snap = dev.snapshot(r.addr(), 4).unwrap();
    assert!(snap.iter().all(|s| *s == uhmm_devices::sim::PageState::WRITE), "plain RAM pages: {snap:?}");
    assert_words(&cpu_read(&r), |i| i + 7);
}

#[test]
fn child_drops_inherited_objects_cleanly() {
    use std::sync::Mutex;
    if !isolated("child_drops_inherited_objects_cleanly") {
        return;
    }
    let space = space();
    let held = Mutex::new(Some((device(&space), map(&space, 64))));
    let (dev_addr, npages) = {
        let g = held.lock().unwrap();
        let (dev, r) = g.as_ref().unwrap();
        fill(r, 0..64, |i| i);
        dev.migrate_to_device_all(r.addr(), 64).unwrap();
        (r.addr(), r.npages())
    };
    // The child drops what it inherited — region, device, space — as a
    // child that goes on running would: no hang, nothing done to the parent.
    let code = fork_child(|| {
        let taken = held.lock().unwrap().take();
        if space.map(PAGE_SIZE, Prot::READ_WRITE).is_ok() {
            return 10; // an orphaned space refuses new work
        }
        drop(taken);
        0
    });
    assert_eq!(code, 0);
    assert_eq!(space.handler_watch().alive(), space.config().handler_threads, "the parent's handlers still run");
    let g = held.lock().unwrap();
    let (dev, r) = g.as_ref().unwrap();
    assert_eq!(r.addr(), dev_addr);
    // Shared with the (dead) child until written; then the device takes them.
    assert_eq!(dev.migrate_to_device(r.addr(), npages).unwrap_err().kind(), uhmm::ErrorKind::Busy);
    fill(r, 0..64, |i| i + 1);
    assert_eq!(dev.migrate_to_device_all(r.addr(), npages).unwrap().cpages, npages);
    assert_words(&cpu_read(r), |i| i + 1);
}

#[test]
fn an_orphaned_space_is_dropped_without_its_parents_threads() {
    if !isolated("an_orphaned_space_is_dropped_without_its_parents_threads") {
        return;
    }
    // A migration big enough to hand its staging to the helper thread (here
    // restored: no destinations), then fork: the child's copy of the space
    // names threads that live in the parent only, so dropping it there must
    // neither signal nor join them. No device, so nothing else keeps the
    // child's copy alive.
    let space = space();
    let npages = 1024;
    let region = map(&space, npages);
    fill(&region, 0..npages, |i| i);
    let m = uhmm::Migration::setup(&space, region.range(), uhmm::Select::SYSTEM, uhmm::Owner::new()).unwrap();
    assert_eq!(m.cpages(), npages);
    assert_eq!(m.pages().finalize().migrated, 0);
    let threads = || -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .map(|name| name.trim().to_string())
            .collect()
    };
    // (A new thread names itself once it runs: wait for it, bounded.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !threads().iter().any(|t| t == "uhmm-copier") {
        assert!(std::time::Instant::now() < deadline, "the helper thread runs: {:?}", threads());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let code = fork_child(move || {
        let (done, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(region);
            drop(space);
            let _ = done.send(());
        });
        match wait.recv_timeout(std::time::Duration::from_secs(20)) {
            Ok(()) => 0,
            Err(_) => 30, // the drop hung
        }
    });
    assert_eq!(code, 0, "dropping the orphaned space in the child failed");
}
