//! Issue 5, fuzzing the public API's arguments (proptest, so it runs in CI
//! on stable): random sequences of calls whose offsets, addresses, lengths
//! and page counts are drawn towards the edges (zero, one, a page, the
//! region's end, past it, `usize::MAX`, unaligned). Every call must return
//! or fail with a typed error — never panic, never `ErrorKind::Sys` for bad
//! input — and the region's bytes must stay what the calls that succeeded
//! wrote.
//!
//! More cases: `PROPTEST_CASES=5000 cargo test --release -p uhmm-devices --test fuzz_api`.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use uhmm::{ErrorKind, Migration, MoveTarget, PAGE_SIZE, Prot, Select};

const PAGES: usize = 32;
const LEN: usize = PAGES * PAGE_SIZE;

/// A byte offset from the region's start, drawn towards the edges.
fn offset() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1),
        Just(PAGE_SIZE - 1),
        Just(PAGE_SIZE),
        Just(LEN - PAGE_SIZE),
        Just(LEN - 1),
        Just(LEN),
        Just(LEN + PAGE_SIZE),
        Just(usize::MAX),
        Just(usize::MAX - PAGE_SIZE + 1),
        Just(usize::MAX / 2),
        (0..PAGES).prop_map(|p| p * PAGE_SIZE),
        0..LEN,
    ]
}

/// A page count, drawn towards the edges.
fn count() -> impl Strategy<Value = usize> {
    prop_oneof![Just(0usize), Just(1), Just(PAGES), Just(PAGES + 1), Just(usize::MAX), Just(1 << 40), 1..=PAGES]
}

#[derive(Clone, Debug)]
enum Call {
    Read { off: usize, len: usize },
    Write { off: usize, len: usize, byte: u8 },
    Protect { start: usize, end: usize, read_only: bool },
    Discard { start: usize, end: usize },
    DeviceRead { off: usize, n: usize },
    DeviceWrite { off: usize, n: usize, byte: u8 },
    ToDevice { off: usize, n: usize },
    ToSystem { off: usize, n: usize },
    Setup { start: usize, end: usize, select: u8 },
    MovePages { offs: Vec<usize>, target: Option<u16> },
    Snapshot { start: usize, end: usize },
    SpaceAccess { off: usize, len: usize, write: bool },
}

fn call() -> impl Strategy<Value = Call> {
    let len =
        prop_oneof![Just(0usize), Just(1), Just(PAGE_SIZE), Just(PAGE_SIZE + 1), Just(3 * PAGE_SIZE), 0..2 * PAGE_SIZE];
    prop_oneof![
        (offset(), len.clone()).prop_map(|(off, len)| Call::Read { off, len }),
        (offset(), len.clone(), any::<u8>()).prop_map(|(off, len, byte)| Call::Write { off, len, byte }),
        (offset(), offset(), any::<bool>()).prop_map(|(start, end, read_only)| Call::Protect { start, end, read_only }),
        (offset(), offset()).prop_map(|(start, end)| Call::Discard { start, end }),
        (offset(), count()).prop_map(|(off, n)| Call::DeviceRead { off, n }),
        (offset(), count(), any::<u8>()).prop_map(|(off, n, byte)| Call::DeviceWrite { off, n, byte }),
        (offset(), count()).prop_map(|(off, n)| Call::ToDevice { off, n }),
        (offset(), count()).prop_map(|(off, n)| Call::ToSystem { off, n }),
        (offset(), offset(), 0u8..8).prop_map(|(start, end, select)| Call::Setup { start, end, select }),
        (prop::collection::vec(offset(), 0..6), prop::option::of(0u16..4))
            .prop_map(|(offs, target)| Call::MovePages { offs, target }),
        (offset(), offset()).prop_map(|(start, end)| Call::Snapshot { start, end }),
        (offset(), len, any::<bool>()).prop_map(|(off, len, write)| Call::SpaceAccess { off, len, write }),
    ]
}

/// A typed error for bad input or a refused access: never a system call
/// failure.
fn typed(what: &Call, r: uhmm::Result<impl Sized>) -> bool {
    match r {
        Ok(_) => true,
        Err(e) => {
            assert_ne!(e.kind(), ErrorKind::Sys, "{what:?}: {e}");
            false
        }
    }
}

fn run(calls: Vec<Call>) {
    let space = space();
    let dev = device(&space);
    let region = map(&space, PAGES);
    let base = region.addr();
    let mut model = vec![0u8; LEN];
    // `addr + off`, or an address no region has when that overflows.
    let at = |off: usize| base.checked_add(off).unwrap_or(off);
    for c in &calls {
        match *c {
            Call::Read { off, len } => {
                let mut buf = vec![0u8; len];
                if typed(c, region.read(off, &mut buf)) {
                    assert_eq!(buf, model[off..off + len], "{c:?}");
                }
            }
            Call::Write { off, len, byte } => {
                if typed(c, region.write(off, &vec![byte; len])) {
                    model[off..off + len].fill(byte);
                }
            }
            Call::Protect { start, end, read_only } => {
                let prot = if read_only { Prot::READ } else { Prot::READ_WRITE };
                typed(c, region.protect(start..end, prot));
            }
            Call::Discard { start, end } => {
                if typed(c, region.discard(start..end)) {
                    model[start..end].fill(0);
                }
            }
            Call::DeviceRead { off, n } => {
                let mut buf = vec![0u8; n.min(PAGES + 1) * PAGE_SIZE];
                if typed(c, dev.read(at(off), n, &mut buf)) {
                    assert!(buf == model[off..off + n * PAGE_SIZE], "{c:?}");
                }
            }
            Call::DeviceWrite { off, n, byte } => {
                let buf = vec![byte; n.min(PAGES + 1) * PAGE_SIZE];
                if typed(c, dev.write(at(off), n, &buf)) {
                    model[off..off + n * PAGE_SIZE].fill(byte);
                }
            }
            Call::ToDevice { off, n } => {
                // Pages may be left behind: counted, or an error when none moved.
                typed(c, dev.migrate_to_device(at(off), n));
            }
            Call::ToSystem { off, n } => {
                typed(c, dev.migrate_to_system(at(off), n));
            }
            Call::Setup { start, end, select } => {
                let select = Select::from_bits_truncate(select);
                // Dropped unfinished: every page is restored.
                typed(c, Migration::setup(&space, at(start)..at(end), select, dev.owner()));
            }
            Call::MovePages { ref offs, target } => {
                let pages: Vec<usize> = offs.iter().map(|&o| at(o)).collect();
                let targets = target.map(|t| {
                    let t = if t == 0 { MoveTarget::Ram } else { MoveTarget::Device(dev.pagemap().id() + t - 1) };
                    vec![t; pages.len()]
                });
                typed(c, uhmm::move_pages(&space, &pages, targets.as_deref()));
            }
            Call::Snapshot { start, end } => {
                typed(c, space.snapshot(at(start)..at(end)));
                typed(c, space.protection(at(start)..at(end)));
            }
            Call::SpaceAccess { off, len, write } => {
                if write {
                    if typed(c, space.write_at(at(off), &vec![0x5A; len])) {
                        model[off..off + len].fill(0x5A);
                    }
                } else {
                    let mut buf = vec![0u8; len];
                    if typed(c, space.read_at(at(off), &mut buf)) {
                        assert_eq!(buf, model[off..off + len], "{c:?}");
                    }
                }
            }
        }
    }
    let mut all = vec![0u8; LEN];
    region.read(0, &mut all).expect("the region reads whole at the end");
    assert!(all == model, "the region's bytes differ from what the successful calls wrote");
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256);
    ProptestConfig { cases, max_shrink_iters: 500, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn api_calls_never_panic_and_lose_nothing(calls in prop::collection::vec(call(), 1..30)) {
        with_timeout(120, move || run(calls));
    }
}
