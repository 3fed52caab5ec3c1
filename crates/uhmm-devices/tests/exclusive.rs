//! Device-exclusive access (issue 3, item 5): S13, S14, S15.

mod common;

use common::*;
use uhmm::{ErrorKind, PAGE_SIZE, Prot};

/// The CPU increments every 32-bit word of the region.
fn cpu_increment(r: &uhmm::Region) {
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..r.npages() {
        r.read(p * PAGE_SIZE, &mut page).unwrap();
        for w in page.chunks_exact_mut(4) {
            let v = u32::from_ne_bytes(w.try_into().unwrap()).wrapping_add(1);
            w.copy_from_slice(&v.to_ne_bytes());
        }
        r.write(p * PAGE_SIZE, &page).unwrap();
    }
}

#[test]
fn s13_exclusive() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let r = map(&space, NPAGES);
        fill(&r, 0..NPAGES, |i| i);
        let c = dev.exclusive(r.addr(), NPAGES).unwrap();
        assert_eq!(c.cpages, NPAGES);
        assert_eq!(dev.check_exclusive(r.addr(), NPAGES).unwrap_err().kind(), ErrorKind::Permission);
        // What the device reads, through its exclusive mapping (no fault).
        let mut buf = vec![0u8; r.len()];
        assert_eq!(dev.read(r.addr(), NPAGES, &mut buf).unwrap().faults, 0);
        assert_words(&buf, |i| i);
        assert!(space.snapshot(r.range()).unwrap().iter().all(|p| p.residency == uhmm::Residency::Exclusive));
        // The CPU takes every page back by touching it.
        cpu_increment(&r);
        assert_words(&cpu_read(&r), |i| i + 1);
        dev.check_exclusive(r.addr(), NPAGES).expect("every CPU access revoked the device's exclusive access");
        assert!(space.snapshot(r.range()).unwrap().iter().all(|p| p.residency == uhmm::Residency::Ram));
        // The device sees the CPU's writes after it faults them in again.
        dev.read(r.addr(), NPAGES, &mut buf).unwrap();
        assert_words(&buf, |i| i + 1);
    });
}

#[test]
fn s14_exclusive_mprotect() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let r = map(&space, NPAGES);
        fill(&r, 0..NPAGES, |i| i);
        assert_eq!(dev.exclusive(r.addr(), NPAGES).unwrap().cpages, NPAGES);
        r.protect(0..r.len(), Prot::READ).unwrap();
        let e = dev.write(r.addr(), NPAGES, &pattern(NPAGES, |i| i + 1)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permission);
        assert_words(&cpu_read(&r), |i| i);
    });
}

#[test]
fn s15_exclusive_cow() {
    if !isolated("s15_exclusive_cow") {
        return;
    }
    let space = space();
    let dev = device(&space);
    let r = map(&space, NPAGES);
    fill(&r, 0..NPAGES, |i| i);
    assert_eq!(dev.exclusive(r.addr(), NPAGES).unwrap().cpages, NPAGES);
    let code = fork_child(|| {
        // The inherited region is the child's own copy: increment it.
        let mut page = vec![0u8; PAGE_SIZE];
        for p in 0..r.npages() {
            if r.read(p * PAGE_SIZE, &mut page).is_err() {
                return 10;
            }
            for w in page.chunks_exact_mut(4) {
                let v = u32::from_ne_bytes(w.try_into().unwrap()).wrapping_add(1);
                w.copy_from_slice(&v.to_ne_bytes());
            }
            if r.write(p * PAGE_SIZE, &page).is_err() {
                return 11;
            }
        }
        let mut buf = vec![0u8; r.len()];
        if r.read(0, &mut buf).is_err() {
            return 12;
        }
        let ok = (0..buf.len() / 4).all(|i| word(&buf, i) == i as u32 + 1);
        if ok { 0 } else { 13 }
    });
    assert_eq!(code, 0, "child");
    cpu_increment(&r);
    assert_words(&cpu_read(&r), |i| i + 1);
}
