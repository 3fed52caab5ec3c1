//! System calls on region memory, in both kinds of userfaultfd: with a full
//! one a `pread(2)` into a page on the device waits for it like a load; with
//! a user-mode-only one it fails with `EFAULT`, and `Region::pread` /
//! `Region::pwrite` and a short-term pin are the remedies.

mod common;

use std::os::fd::OwnedFd;

use common::*;
use uhmm::{AddressSpace, Config, ErrorKind, PAGE_SIZE, PinKind, Prot};
use uhmm_devices::sim::PageState;

/// A memory-backed file holding `len` bytes of `byte`.
fn file_of(len: usize, byte: u8) -> OwnedFd {
    let fd = rustix::fs::memfd_create("uhmm-test", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd_create");
    assert_eq!(rustix::io::pwrite(&fd, &vec![byte; len], 0).expect("pwrite"), len);
    fd
}

fn space_of(force_user_mode_only: bool) -> AddressSpace {
    let space = AddressSpace::new(Config { force_user_mode_only, ..Config::default() }).expect("userfaultfd");
    assert_eq!(space.user_mode_only(), force_user_mode_only || space.uffd_origin() == uhmm::UffdOrigin::UserModeOnly);
    space
}

/// The number of pages of `r` on the sim device.
fn on_device_count(dev: &uhmm_devices::sim::SimDevice, r: &uhmm::Region, npages: usize) -> usize {
    dev.snapshot(r.addr(), npages).unwrap().iter().filter(|s| s.contains(PageState::DEV_PRIVATE_LOCAL)).count()
}

#[test]
fn a_plain_read_into_a_device_page_fails_in_user_mode_only_and_region_pread_works() {
    with_timeout(60, || {
        const N: usize = 64;
        let space = space_of(true);
        assert!(space.user_mode_only());
        let dev = device(&space);
        let r = on_device(&space, &dev, N);
        let file = file_of(N * PAGE_SIZE, 0x5A);
        // The problem: the kernel's copy into a page that is on the device
        // gets EFAULT.
        // SAFETY: the slice covers the region's first page, mapped for the
        // region's life; only the kernel writes through it, and no other
        // reference to those bytes exists during the call.
        let buf = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), PAGE_SIZE) };
        assert_eq!(rustix::io::pread(&file, buf, 0).map(|_| ()), Err(rustix::io::Errno::FAULT));
        assert_eq!(on_device_count(&dev, &r, N), N, "the failed call moved nothing");
        // Region::pread brings the range home and reads: 3 pages from the
        // middle of page 1 (any alignment).
        let range = PAGE_SIZE + 100..4 * PAGE_SIZE + 100;
        assert_eq!(r.pread(&file, 0, range.clone()).unwrap(), range.len());
        let got = cpu_read(&r);
        assert!(got[range.clone()].iter().all(|&b| b == 0x5A));
        assert_words(&got[..range.start / 4 * 4], |i| i);
        assert_words(&got[5 * PAGE_SIZE..], |i| i + (5 * WORDS_PER_PAGE) as u32);
        // Region::pwrite of pages on the device (and of never-touched ones).
        dev.migrate_to_device_all(r.addr(), N).unwrap();
        let out = file_of(0, 0);
        assert_eq!(r.pwrite(&out, 0, 8 * PAGE_SIZE..16 * PAGE_SIZE).unwrap(), 8 * PAGE_SIZE);
        let mut back = vec![0u8; 8 * PAGE_SIZE];
        assert_eq!(rustix::io::pread(&out, &mut back, 0).unwrap(), back.len());
        assert_words(&back, |i| i + (8 * WORDS_PER_PAGE) as u32);
        let fresh = map(&space, 4);
        assert_eq!(fresh.pwrite(&out, 0, 0..fresh.len()).unwrap(), fresh.len(), "holes read as zeros");
        assert_eq!(rustix::io::pread(&out, &mut back[..PAGE_SIZE], 0).unwrap(), PAGE_SIZE);
        assert!(back[..PAGE_SIZE].iter().all(|&b| b == 0));
        // A pin is the one-call fix for any other system call.
        dev.migrate_to_device_all(r.addr(), N).unwrap();
        let pin = space.pin(r.addr()..r.addr() + PAGE_SIZE, PinKind::ShortTerm).unwrap();
        // SAFETY: as above.
        let buf = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), PAGE_SIZE) };
        assert_eq!(rustix::io::pread(&file, buf, 0).unwrap(), PAGE_SIZE);
        drop(pin);
        assert!(cpu_read(&r)[..PAGE_SIZE].iter().all(|&b| b == 0x5A));
    });
}

#[test]
fn region_pread_and_pwrite_behave_alike_in_both_modes_and_check_their_arguments() {
    with_timeout(60, || {
        for force in [false, true] {
            const N: usize = 32;
            let space = space_of(force);
            let dev = device(&space);
            let r = on_device(&space, &dev, N);
            let file = file_of(2 * PAGE_SIZE, 7);
            // A read past the file's end stops there.
            assert_eq!(r.pread(&file, PAGE_SIZE as u64, 0..4 * PAGE_SIZE).unwrap(), PAGE_SIZE, "force {force}");
            assert!(cpu_read(&r)[..PAGE_SIZE].iter().all(|&b| b == 7));
            // Bad input: a typed error, nothing changed.
            dev.migrate_to_device_all(r.addr(), N).unwrap();
            let err = r.pread(&file, 0, 0..(N + 1) * PAGE_SIZE).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Fault, "outside the region");
            #[allow(clippy::reversed_empty_ranges)]
            let err = r.pread(&file, 0, 2..1).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument);
            r.protect(0..r.len(), Prot::READ).unwrap();
            assert_eq!(r.pread(&file, 0, 0..PAGE_SIZE).unwrap_err().kind(), ErrorKind::Permission);
            assert_eq!(on_device_count(&dev, &r, N), N, "failed calls moved nothing");
            // pwrite of a read-only range works, to a file opened read-only it fails with the call's errno.
            let out = file_of(0, 0);
            assert_eq!(r.pwrite(&out, 0, 0..PAGE_SIZE).unwrap(), PAGE_SIZE);
            let ro = rustix::fs::open("/proc/self/exe", rustix::fs::OFlags::RDONLY, rustix::fs::Mode::empty()).unwrap();
            let err = r.pwrite(&ro, 0, 0..PAGE_SIZE).unwrap_err();
            assert_eq!(err.errno(), rustix::io::Errno::BADF.raw_os_error());
            let got = cpu_read(&r);
            assert!(got[..PAGE_SIZE].iter().all(|&b| b == 7));
            assert_words(&got[PAGE_SIZE..], |i| i + WORDS_PER_PAGE as u32);
        }
    });
}
