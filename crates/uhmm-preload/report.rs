//! The report the library writes at exit and `uhmm run` prints (shared by
//! both: the CLI includes this file).

use serde::{Deserialize, Serialize};

/// What uhmm did for one process, written as JSON to `UHMM_REPORT` at exit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The process.
    pub pid: u32,
    /// Why uhmm managed nothing (the program ran on the C library's
    /// allocator alone), if it did not.
    pub error: Option<String>,
    /// The RAM budget, bytes (none: no budget).
    pub ram_budget: Option<u64>,
    /// The smallest allocation or mapping uhmm took, bytes.
    pub min_size: u64,
    /// Blocks (allocations and mappings) uhmm managed.
    pub blocks: u64,
    /// The most bytes of blocks managed at once.
    pub managed_peak_bytes: u64,
    /// Blocks turned back into plain memory (by `mremap`, a fixed mapping
    /// over them, or executable protection).
    pub detached_blocks: u64,
    /// Bytes of the small-object heap's chunks (allocations under the
    /// minimum size).
    #[serde(default)]
    pub heap_bytes: u64,
    /// Pages the program unmapped (or moved away) with calls the library
    /// did not see (a raw system call), given up by uhmm.
    #[serde(default)]
    pub foreign_unmapped_pages: u64,
    /// Regions uhmm made to follow memory the program moved with such a
    /// call (`mremap`).
    #[serde(default)]
    pub regions_followed: u64,
    /// Userfaults uhmm answered.
    pub faults: u64,
    /// Pages moved to the store (demotions).
    pub demoted_pages: u64,
    /// Pages brought back to RAM (promotions).
    pub promoted_pages: u64,
    /// The most resident bytes the tier saw.
    pub tier_peak_resident_bytes: u64,
    /// Where cold pages went: `compress`, or a far store's address.
    #[serde(default)]
    pub device: String,
    /// Bytes of the pages in the store at exit.
    pub stored_bytes: u64,
    /// What the store used for them at exit: RAM for the compressed
    /// store, file or server bytes for a far store.
    pub store_bytes: u64,
    /// Bytes of the stored pages over the RAM the store used for them: the
    /// compression ratio (0 when nothing is stored).
    pub compression_ratio: f64,
    /// Seconds uhmm's tier thread spent tracking and reclaiming.
    pub tier_seconds: f64,
    /// Seconds from the first managed block to exit.
    pub seconds: f64,
}
