//! Model-based test (issue 5): random sequences of operations are applied to
//! uhmm (one address space, one region, two sim devices) and to a plain
//! byte-array model; the contents must always agree. On a failure proptest
//! shrinks the sequence to a minimal one and prints it.
//!
//! More cases: `PROPTEST_CASES=1000 cargo test --release -p uhmm-devices --test model`.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use uhmm::{ErrorKind, PAGE_SIZE, Prot, Region};
use uhmm_devices::sim::{PageState, SimDevice};

/// Pages in the region of each case.
const PAGES: usize = 64;
/// Sim devices per case.
const DEVICES: usize = 2;

#[derive(Clone, Debug)]
enum Op {
    /// CPU write of `bytes` at byte `offset` of `page` (may run into the
    /// next pages; clipped at the end of the region).
    Write {
        page: usize,
        offset: usize,
        bytes: Vec<u8>,
    },
    /// CPU read of one page, compared with the model.
    Read {
        page: usize,
    },
    /// Device write of a pattern derived from `seed`.
    DeviceWrite {
        dev: usize,
        page: usize,
        n: usize,
        seed: u32,
    },
    /// Device read, compared with the model.
    DeviceRead {
        dev: usize,
        page: usize,
        n: usize,
    },
    MigrateToDevice {
        dev: usize,
        page: usize,
        n: usize,
    },
    MigrateToSystem {
        dev: usize,
        page: usize,
        n: usize,
    },
    Release {
        dev: usize,
    },
    Protect {
        page: usize,
        n: usize,
        read_only: bool,
    },
    Discard {
        page: usize,
        n: usize,
    },
}

/// `(page, n)` with `n >= 1` and `page + n <= PAGES`.
fn range() -> impl Strategy<Value = (usize, usize)> {
    (0..PAGES).prop_flat_map(|p| (Just(p), 1..=PAGES - p))
}

fn dev() -> impl Strategy<Value = usize> {
    0..DEVICES
}

fn op() -> impl Strategy<Value = Op> {
    let offset = prop_oneof![0..PAGE_SIZE, PAGE_SIZE - 64..PAGE_SIZE];
    prop_oneof![
        3 => (0..PAGES, offset, prop::collection::vec(any::<u8>(), 1..128))
            .prop_map(|(page, offset, bytes)| Op::Write { page, offset, bytes }),
        1 => (0..PAGES).prop_map(|page| Op::Read { page }),
        2 => (dev(), range(), any::<u32>()).prop_map(|(dev, (page, n), seed)| Op::DeviceWrite { dev, page, n, seed }),
        1 => (dev(), range()).prop_map(|(dev, (page, n))| Op::DeviceRead { dev, page, n }),
        3 => (dev(), range()).prop_map(|(dev, (page, n))| Op::MigrateToDevice { dev, page, n }),
        2 => (dev(), range()).prop_map(|(dev, (page, n))| Op::MigrateToSystem { dev, page, n }),
        1 => dev().prop_map(|dev| Op::Release { dev }),
        2 => (range(), any::<bool>()).prop_map(|((page, n), read_only)| Op::Protect { page, n, read_only }),
        1 => range().prop_map(|(page, n)| Op::Discard { page, n }),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 1..40)
}

/// The reference: the region's bytes and which pages are read-only.
struct Model {
    data: Vec<u8>,
    read_only: Vec<bool>,
}

impl Model {
    fn new() -> Model {
        Model { data: vec![0; PAGES * PAGE_SIZE], read_only: vec![false; PAGES] }
    }

    fn any_read_only(&self, pages: std::ops::Range<usize>) -> bool {
        self.read_only[pages].iter().any(|ro| *ro)
    }
}

/// What one case runs on.
struct Sut {
    // Field order is drop order: the region goes before the devices, which
    // go before the space.
    region: Region,
    devs: Vec<SimDevice>,
    space: uhmm::AddressSpace,
}

impl Sut {
    fn new() -> Sut {
        let space = space();
        let devs = (0..DEVICES).map(|_| device(&space)).collect();
        let region = space.map(PAGES * PAGE_SIZE, Prot::READ_WRITE).expect("map");
        Sut { region, devs, space }
    }

    fn addr(&self, page: usize) -> usize {
        self.region.addr() + page * PAGE_SIZE
    }
}

fn seeded(npages: usize, seed: u32) -> Vec<u8> {
    pattern(npages, |i| seed ^ i.wrapping_mul(0x9E37_79B1))
}

/// Asserts that `got` equals the model's bytes from page `page` on, naming
/// the first differing byte.
fn assert_same(got: &[u8], model: &Model, page: usize, what: &str) {
    let want = &model.data[page * PAGE_SIZE..page * PAGE_SIZE + got.len()];
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        let b = page * PAGE_SIZE + i;
        panic!(
            "{what}: byte {b} (page {}, offset {}) is {:#04x}, the model says {:#04x}",
            b / PAGE_SIZE,
            b % PAGE_SIZE,
            got[i],
            want[i]
        );
    }
}

/// The whole region through the CPU against the model.
fn check_all(sut: &Sut, model: &Model, what: &str) {
    let mut buf = vec![0u8; PAGES * PAGE_SIZE];
    sut.region.read(0, &mut buf).unwrap_or_else(|e| panic!("{what}: region read: {e}"));
    assert_same(&buf, model, 0, what);
}

fn apply(sut: &Sut, model: &mut Model, step: usize, op: &Op) {
    let what = format!("step {step} {op:?}");
    match *op {
        Op::Write { page, offset, ref bytes } => {
            let start = page * PAGE_SIZE + offset;
            let end = (start + bytes.len()).min(PAGES * PAGE_SIZE);
            let bytes = &bytes[..end - start];
            let pages = start / PAGE_SIZE..end.div_ceil(PAGE_SIZE);
            match sut.region.write(start, bytes) {
                Ok(()) => {
                    assert!(!model.any_read_only(pages), "{what}: a write to a read-only page succeeded");
                    model.data[start..end].copy_from_slice(bytes);
                }
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Permission, "{what}: {e}");
                    assert!(model.any_read_only(pages), "{what}: a write to writable pages failed: {e}");
                }
            }
        }
        Op::Read { page } => {
            let mut buf = vec![0u8; PAGE_SIZE];
            sut.region.read(page * PAGE_SIZE, &mut buf).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_same(&buf, model, page, &what);
        }
        Op::DeviceWrite { dev, page, n, seed } => {
            let data = seeded(n, seed);
            match sut.devs[dev].write(sut.addr(page), n, &data) {
                Ok(c) => {
                    assert!(!model.any_read_only(page..page + n), "{what}: a write to a read-only page succeeded");
                    assert_eq!(c.cpages, n, "{what}");
                    model.data[page * PAGE_SIZE..(page + n) * PAGE_SIZE].copy_from_slice(&data);
                }
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Permission, "{what}: {e}");
                    assert!(model.any_read_only(page..page + n), "{what}: a write to writable pages failed: {e}");
                }
            }
        }
        Op::DeviceRead { dev, page, n } => {
            let mut buf = vec![0xA5u8; n * PAGE_SIZE];
            let c = sut.devs[dev].read(sut.addr(page), n, &mut buf).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(c.cpages, n, "{what}");
            assert_same(&buf, model, page, &what);
        }
        Op::MigrateToDevice { dev, page, n } => {
            let result = sut.devs[dev].migrate_to_device(sut.addr(page), n);
            // The pages on this device afterwards, as its snapshot says.
            let snap = sut.devs[dev].snapshot(sut.addr(page), n).unwrap_or_else(|e| panic!("{what}: {e}"));
            let on_dev = snap.iter().filter(|s| s.contains(PageState::DEV_PRIVATE_LOCAL)).count();
            match result {
                Ok(c) => assert_eq!((c.cpages, c.cpages + c.left.total()), (on_dev, n), "{what}: {c:?} {snap:?}"),
                Err(e) => {
                    assert!(matches!(e.kind(), ErrorKind::Busy | ErrorKind::NotFound), "{what}: {e}");
                    assert_eq!(on_dev, 0, "{what}: an error only when no page is on the device: {e} {snap:?}");
                }
            }
        }
        Op::MigrateToSystem { dev, page, n } => {
            let c = sut.devs[dev].migrate_to_system(sut.addr(page), n).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(c.cpages <= n, "{what}: {} pages migrated", c.cpages);
        }
        Op::Release { dev } => {
            sut.devs[dev].release().unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        Op::Protect { page, n, read_only } => {
            let prot = if read_only { Prot::READ } else { Prot::READ_WRITE };
            sut.region
                .protect(page * PAGE_SIZE..(page + n) * PAGE_SIZE, prot)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            model.read_only[page..page + n].fill(read_only);
        }
        Op::Discard { page, n } => {
            sut.region.discard(page * PAGE_SIZE..(page + n) * PAGE_SIZE).unwrap_or_else(|e| panic!("{what}: {e}"));
            model.data[page * PAGE_SIZE..(page + n) * PAGE_SIZE].fill(0);
        }
    }
}

/// Runs one case. With `check_each` the whole region is compared after every
/// operation; that reads every page back to RAM, so without it (the shrunk
/// form) pages stay on devices across operations and the comparison is made
/// by the `Read`/`DeviceRead` operations and once at the end.
fn run_case(ops: Vec<Op>, check_each: bool) {
    let sut = Sut::new();
    let mut model = Model::new();
    for (step, op) in ops.iter().enumerate() {
        apply(&sut, &mut model, step, op);
        if check_each {
            check_all(&sut, &model, &format!("after step {step} {op:?}"));
        }
    }
    check_all(&sut, &model, "at the end");
}

/// One case of `pages_never_leak`: after the operations, releasing every
/// device and dropping the region leaves no device page in use.
fn run_leak_case(ops: Vec<Op>) {
    let sut = Sut::new();
    let mut model = Model::new();
    for (step, op) in ops.iter().enumerate() {
        apply(&sut, &mut model, step, op);
    }
    for (i, dev) in sut.devs.iter().enumerate() {
        dev.release().unwrap_or_else(|e| panic!("release of device {i}: {e}"));
    }
    check_all(&sut, &model, "after release");
    let Sut { region, devs, space } = sut;
    drop(region);
    for (i, dev) in devs.iter().enumerate() {
        assert_eq!(dev.pages_in_use(), 0, "device {i} still holds pages after release and unmap");
    }
    drop(devs);
    drop(space);
}

/// 48 cases unless `PROPTEST_CASES` says otherwise; no regression files are
/// written (a failure prints the minimal sequence instead).
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(48);
    ProptestConfig { cases, max_shrink_iters: 200, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn contents_match_model(ops in ops(), check_each in any::<bool>()) {
        with_timeout(120, move || run_case(ops, check_each));
    }

    #[test]
    fn pages_never_leak(ops in ops()) {
        with_timeout(120, move || run_leak_case(ops));
    }
}
