//! The single-page CPU fault path allocates nothing (issue 4: "no
//! allocation on the fault path"): a fault's migration keeps its per-page
//! lists inline, and so do the sim device's lookups. Its own binary, since
//! it counts every allocation of the process (dhat's testing mode).

mod common;

use common::*;
use uhmm::{AddressSpace, Config, PAGE_SIZE};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

#[test]
fn single_page_faults_on_device_pages_do_not_allocate() {
    let _profiler = dhat::Profiler::builder().testing().build();
    with_timeout(60, || {
        const PAGES: usize = 256;
        const WARM_UP: usize = 16;
        let space = AddressSpace::new(Config { fault_around_pages: 1, ..Config::default() }).unwrap();
        let dev = device(&space);
        let r = on_device(&space, &dev, PAGES);
        let mut word = [0u8; 4];
        let read = |p: usize, word: &mut [u8; 4]| {
            r.read(p * PAGE_SIZE, word).unwrap();
            assert_eq!(u32::from_ne_bytes(*word), (p * WORDS_PER_PAGE) as u32, "page {p}");
        };
        // The first faults may grow what lives on (a queue, a thread's state).
        for p in 0..WARM_UP {
            read(p, &mut word);
        }
        let (faults, before) = (space.stats().faults, dhat::HeapStats::get().total_blocks);
        for p in WARM_UP..PAGES {
            read(p, &mut word);
        }
        let allocations = dhat::HeapStats::get().total_blocks - before;
        let faulted = (space.stats().faults - faults) as usize;
        assert_eq!(faulted, PAGES - WARM_UP, "one fault a page (fault-around 1)");
        // A few allocations by other threads may fall in the window; one a
        // fault (there were 17 before the lists went inline) may not.
        assert!(allocations < faulted as u64 / 8, "{allocations} allocations in {faulted} single-page faults");
    });
}
