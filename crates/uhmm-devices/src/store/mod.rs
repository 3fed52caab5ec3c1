//! Store-backed devices: one driver ([`StoreDevice`]) over a small
//! [`PageStore`] trait, so that each tier (compressed RAM, a file, a remote
//! store) is a new store, not a new driver.
//!
//! The contract is batched, as LLNL UMap's store plug-ins are not: a
//! migration hands the store whole runs of neighbouring pages, which it may
//! keep together (a compressed store compresses them as one object), and a
//! fault asks for a window of them. Pages are named by keys the device
//! gives (its device page numbers); the store never sees addresses.

mod device;
mod seal;
mod writeback;

pub use device::{DeviceCounters, Moved, StoreDevice, StoreDeviceConfig};
pub use seal::{SealStats, SealedStore, random_id};
pub use writeback::{WritebackStats, WritebackStore};

use std::sync::Arc;

use uhmm::Result;

/// A run of neighbouring virtual pages handed to [`PageStore::put`].
#[derive(Debug)]
pub struct RunIn<'a> {
    /// The virtual page number (address / page size) of the first page: a
    /// store that groups pages aligns its groups to it, so that a fault's
    /// aligned window covers whole groups.
    pub vpn: u64,
    /// One key per page.
    pub keys: &'a [u64],
    /// The pages' bytes, `keys.len()` pages.
    pub data: &'a [u8],
}

/// A run of neighbouring pages for [`PageStore::get`] to fill.
#[derive(Debug)]
pub struct RunOut<'a> {
    /// One key per page.
    pub keys: &'a [u64],
    /// Where the pages go, `keys.len()` pages: the RAM pages that will be
    /// mapped (a store fills them in place).
    pub data: &'a mut [u8],
    /// Set by the store for each page.
    pub got: &'a mut [Got],
}

/// Checks that every run of a [`PageStore::put`] holds one page of data
/// per key (an invalid argument otherwise).
pub fn check_runs_in(runs: &[RunIn<'_>]) -> Result<()> {
    if runs.iter().any(|r| r.data.len() != r.keys.len() * uhmm::PAGE_SIZE) {
        return Err(uhmm::Error::invalid("a run's data is not one page per key"));
    }
    Ok(())
}

/// Checks that every run of a [`PageStore::get`] holds one page of data
/// and one [`Got`] per key (an invalid argument otherwise).
pub fn check_runs_out(runs: &[RunOut<'_>]) -> Result<()> {
    if runs.iter().any(|r| r.data.len() != r.keys.len() * uhmm::PAGE_SIZE || r.got.len() != r.keys.len()) {
        return Err(uhmm::Error::invalid("a run's data is not one page per key"));
    }
    Ok(())
}

/// What [`PageStore::get`] did with one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Got {
    /// Not done (the store has no such key, or never got to it).
    Missing,
    /// Filled with the page's data.
    Filled,
    /// The data is lost: its object failed its checksum or could not be
    /// decoded. The page must not be mapped with these bytes.
    Lost,
}

/// What a store holds (the counters every store can give).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreUsage {
    /// Pages stored.
    pub pages: u64,
    /// Their bytes before encoding (`pages` times the page size).
    pub orig_bytes: u64,
    /// Bytes of memory (or space) the store uses for them, all overheads
    /// included.
    pub used_bytes: u64,
    /// The most `used_bytes` may reach.
    pub capacity_bytes: u64,
}

/// Where a [`StoreDevice`] keeps its pages: put, get and delete of page
/// batches.
///
/// Calls may come from several threads at once: migrations to the device
/// from their callers (or worker threads), gets from fault handlers,
/// deletes from whoever frees a device page (possibly while the core holds
/// page locks: `delete` must not wait for a migration).
pub trait PageStore: Send + Sync + std::fmt::Debug {
    /// Stores the pages of `runs`. Returns, for each page in order (runs
    /// one after the other), whether it was stored; a page not stored (the
    /// store full, say) stays where it was. An error means none was.
    fn put(&self, runs: &[RunIn<'_>]) -> Result<Vec<bool>>;

    /// Marks in `zero` which of `keys` are pages of zeros, which the device
    /// maps as the zero page without asking for their bytes. The default
    /// knows none.
    fn zero_pages(&self, keys: &[u64], zero: &mut [bool]) {
        let _ = (keys, zero);
    }

    /// Pages a fault on `key` that is not part of a sequential scan should
    /// bring back at once, aligned by address: what one read of the store
    /// yields anyway (the group a compressed store keeps `key` in). The
    /// default is 1.
    fn fault_pages(&self, key: u64) -> usize {
        let _ = key;
        1
    }

    /// Fills the pages of `runs`, setting each one's [`Got`]. An error
    /// (the store unreachable for a moment) leaves every page where it was;
    /// a kind of `Busy` or `NoMemory` has a fault retried.
    fn get(&self, runs: &mut [RunOut<'_>]) -> Result<()>;

    /// Forgets `keys` (their pages left the device, or were never mapped).
    fn delete(&self, keys: &[u64]);

    /// What the store holds.
    fn usage(&self) -> StoreUsage;
}

/// A shared store is a store (a device and a wrapper may share one).
impl<T: PageStore + ?Sized> PageStore for Arc<T> {
    fn put(&self, runs: &[RunIn<'_>]) -> Result<Vec<bool>> {
        (**self).put(runs)
    }
    fn zero_pages(&self, keys: &[u64], zero: &mut [bool]) {
        (**self).zero_pages(keys, zero)
    }
    fn fault_pages(&self, key: u64) -> usize {
        (**self).fault_pages(key)
    }
    fn get(&self, runs: &mut [RunOut<'_>]) -> Result<()> {
        (**self).get(runs)
    }
    fn delete(&self, keys: &[u64]) {
        (**self).delete(keys)
    }
    fn usage(&self) -> StoreUsage {
        (**self).usage()
    }
}
