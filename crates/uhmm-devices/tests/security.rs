//! Issue 5, security: a migration never takes another owner's device pages;
//! device pages are zeroed or wholly overwritten before reuse, so no region
//! reads another's old data; no call reads or writes outside its regions.

mod common;

use common::*;
use uhmm::{ErrorKind, Migration, PAGE_SIZE, Prot, Select};
use uhmm_devices::sim::{PageState, SimConfig, SimDevice};

/// A device of one 2 MiB chunk: room for exactly 512 pages, so freed pages
/// are the only ones it can hand out again.
fn small_device(space: &uhmm::AddressSpace) -> SimDevice {
    let chunk = 2 << 20;
    let config = SimConfig { capacity_bytes: chunk, chunk_bytes: chunk, ..SimConfig::default() };
    SimDevice::new(space, config).expect("sim device")
}

#[test]
fn migrations_never_take_another_owners_pages() {
    with_timeout(60, || {
        let space = space();
        let (a, b) = (device(&space), device(&space));
        let region = map(&space, 64);
        fill(&region, 0..64, |i| i ^ 0xA11C_E000);
        assert_eq!(a.migrate_to_device_all(region.addr(), 32).unwrap().cpages, 32);
        // b's migration back to RAM sees a's pages but does not take them.
        let m = Migration::setup(&space, region.range(), Select::DEVICE_PRIVATE, b.owner()).unwrap();
        assert!((0..32).all(|i| matches!(m.src(i), uhmm::MigrateSrc::Skip)), "a's pages are not b's to move");
        drop(m);
        assert_eq!(b.migrate_to_system(region.addr(), 64).unwrap().cpages, 0);
        let snap = a.snapshot(region.addr(), 32).unwrap();
        assert!(snap.iter().all(|s| s.contains(PageState::DEV_PRIVATE_LOCAL)), "still on a");
        // b's access brings them back through a's driver, data intact.
        let mut buf = vec![0u8; 64 * PAGE_SIZE];
        b.read(region.addr(), 64, &mut buf).unwrap();
        assert_words(&buf, |i| i ^ 0xA11C_E000);
    });
}

#[test]
fn reused_device_pages_never_show_old_data() {
    with_timeout(60, || {
        const N: usize = (2 << 20) / PAGE_SIZE;
        let space = space();
        let dev = small_device(&space);
        // A secret goes to the device, and its region goes away: the device
        // pages are freed holding it.
        let secret = map(&space, N);
        fill(&secret, 0..N, |i| 0x5EC2_E700 ^ i);
        assert_eq!(dev.migrate_to_device_all(secret.addr(), N).unwrap().cpages, N);
        drop(secret);
        assert_eq!(dev.pages_in_use(), 0);
        // A new region of holes, zero pages and a little data takes the same
        // device pages (the device has no others).
        let fresh = map(&space, N);
        let mut zero = [0u8; 1];
        fresh.read(10 * PAGE_SIZE, &mut zero).unwrap(); // a zero page
        fresh.write(20 * PAGE_SIZE, &[7; 100]).unwrap(); // data in part of a page
        assert_eq!(dev.migrate_to_device_all(fresh.addr(), N).unwrap().cpages, N);
        let mut expected = vec![0u8; N * PAGE_SIZE];
        expected[20 * PAGE_SIZE..20 * PAGE_SIZE + 100].fill(7);
        let mut through_device = vec![0xA5u8; N * PAGE_SIZE];
        dev.read(fresh.addr(), N, &mut through_device).unwrap();
        assert!(through_device == expected, "a device read shows another region's old data");
        assert!(cpu_read(&fresh) == expected, "a CPU read shows another region's old data");
    });
}

#[test]
fn calls_outside_regions_are_refused() {
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, 16);
        fill(&region, 0..16, |i| i);
        let (start, end) = (region.addr(), region.addr() + region.len());
        let mut buf = vec![0u8; 2 * PAGE_SIZE];
        // Region accessors past the end: a fault (EFAULT), as documented,
        // not a signal; an offset that overflows: an invalid argument.
        assert_eq!(region.read(region.len() - 1, &mut buf[..2]).unwrap_err().kind(), ErrorKind::Fault);
        assert_eq!(region.write(usize::MAX, &buf[..1]).unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            region.protect(0..region.len() + PAGE_SIZE, Prot::READ).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        // Addresses outside any region, or across a region's end.
        for addr in [0, PAGE_SIZE, end, start.wrapping_sub(PAGE_SIZE), usize::MAX & !(PAGE_SIZE - 1)] {
            assert!(space.read_at(addr, &mut buf[..8]).is_err(), "read_at {addr:#x}");
            assert!(space.write_at(addr, &buf[..8]).is_err(), "write_at {addr:#x}");
            assert!(dev.read(addr, 1, &mut buf).is_err(), "device read at {addr:#x}");
            assert!(dev.write(addr, 1, &buf).is_err(), "device write at {addr:#x}");
            assert!(dev.migrate_to_device(addr, 1).is_err(), "migration at {addr:#x}");
            assert!(
                Migration::setup(&space, addr..addr.saturating_add(PAGE_SIZE), Select::SYSTEM, dev.owner()).is_err()
            );
        }
        assert!(dev.read(end - PAGE_SIZE, 2, &mut buf).is_err(), "a device read across the region's end");
        assert!(dev.migrate_to_device(end - PAGE_SIZE, 2).is_err(), "a migration across the region's end");
        // Nothing changed.
        assert_words(&cpu_read(&region), |i| i);
    });
}
