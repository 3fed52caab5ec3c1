//! The sim device's API read from outside: a `SimConfig` it refuses names
//! the field at fault and changes nothing; snapshot flags cannot be
//! misread (each is a bit of its own).

mod common;

use common::*;
use uhmm::{ErrorKind, PAGE_SIZE};
use uhmm_devices::sim::{PageState, SimConfig, SimDevice};

#[test]
fn a_refused_config_names_the_field_at_fault() {
    with_timeout(60, || {
        let space = space();
        let cases: [(SimConfig, &str); 6] = [
            (SimConfig { chunk_bytes: 100, ..SimConfig::default() }, "chunk_bytes (100)"),
            (
                SimConfig { capacity_bytes: 1 << 20, chunk_bytes: 2 << 20, ..SimConfig::default() },
                "capacity_bytes (1048576)",
            ),
            (SimConfig { migrate_chunk_pages: 0, ..SimConfig::default() }, "migrate_chunk_pages"),
            (SimConfig { dma_channels: 0, ..SimConfig::default() }, "dma_channels"),
            (SimConfig { alloc_fail_rate: 1.5, ..SimConfig::default() }, "alloc_fail_rate (1.5)"),
            (SimConfig { copy_back_fail_rate: -0.1, ..SimConfig::default() }, "copy_back_fail_rate"),
        ];
        for (config, field) in cases {
            let err = config.validate().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument);
            assert!(err.to_string().contains(field), "{err} should name {field}");
            let err = SimDevice::new(&space, config).unwrap_err();
            assert!(err.to_string().contains(field), "SimDevice::new refuses it the same way: {err}");
        }
        assert!(SimConfig::default().validate().is_ok());
    });
}

#[test]
fn snapshot_flags_are_bits_of_their_own() {
    let flags = [
        PageState::READ,
        PageState::WRITE,
        PageState::PMD,
        PageState::DEV_COHERENT_REMOTE,
        PageState::ZERO,
        PageState::DEV_PRIVATE_LOCAL,
        PageState::DEV_COHERENT_LOCAL,
        PageState::ERROR,
    ];
    for (i, a) in flags.iter().enumerate() {
        assert_eq!(a.bits().count_ones(), 1, "{a:?} is one bit");
        for b in &flags[i + 1..] {
            assert!(!a.contains(*b) && !b.contains(*a), "{a:?} and {b:?} overlap");
        }
    }
    with_timeout(60, || {
        let space = space();
        let dev = device(&space);
        let region = map(&space, 4);
        fill(&region, 0..4, |i| i);
        region.unmap(2 * PAGE_SIZE..4 * PAGE_SIZE).unwrap();
        dev.migrate_to_device(region.addr(), 2).unwrap();
        let snap = dev.snapshot(region.addr(), 4).unwrap();
        assert!(snap[0].contains(PageState::DEV_PRIVATE_LOCAL));
        assert_eq!(snap[2], PageState::ERROR, "an unmapped page is an error");
        assert!(!snap[2].contains(PageState::DEV_PRIVATE_LOCAL), "and on no device");
    });
}
