//! The devices `uhmm demo` and `uhmm stress` run on: the sim device, or a
//! store device over the compressed store, behind one enum.

use std::sync::Arc;

use uhmm::{DevicePagemap, Owner};
use uhmm_devices::compress::CompressStore;
use uhmm_devices::sim::SimDevice;
use uhmm_devices::store::StoreDevice;
use uhmm_devices::tier::TierStats;

use crate::units::human;

/// Which device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    /// The sim device (a model of the kernel's HMM test driver).
    Sim,
    /// A store device over the compressed store (lz4): pages compressed in
    /// RAM.
    Compress,
}

/// A device of either kind.
pub enum Device {
    /// The sim device.
    Sim(SimDevice),
    /// A store device (shared with a [`Tier`](uhmm_devices::tier::Tier)
    /// under `--ram-budget`) and its compressed store.
    Compress(Arc<StoreDevice>, Arc<CompressStore>),
}

impl Device {
    /// The sim device, when this is one (device reads and writes,
    /// exclusive access: a store has none).
    pub fn sim(&self) -> Option<&SimDevice> {
        match self {
            Device::Sim(d) => Some(d),
            Device::Compress(..) => None,
        }
    }

    /// Moves `n` pages at `addr` to the device (riding out busy pages, for
    /// the sim); the pages on it after, holes counted.
    pub fn to_device(&self, addr: usize, n: usize) -> uhmm::Result<usize> {
        match self {
            Device::Sim(d) => d.migrate_to_device_all(addr, n).map(|c| c.cpages),
            Device::Compress(d, _) => d.migrate_to_device(addr, n).map(|m| m.moved + m.holes),
        }
    }

    /// One pass of moving `n` pages at `addr` to the device; for the sim,
    /// an error when none moved.
    pub fn to_device_once(&self, addr: usize, n: usize) -> uhmm::Result<()> {
        match self {
            Device::Sim(d) => d.migrate_to_device(addr, n).map(drop),
            Device::Compress(d, _) => d.migrate_to_device(addr, n).map(drop),
        }
    }

    /// Brings `n` pages at `addr` back to RAM; the pages moved.
    pub fn to_system(&self, addr: usize, n: usize) -> uhmm::Result<usize> {
        match self {
            Device::Sim(d) => d.migrate_to_system(addr, n).map(|c| c.cpages),
            Device::Compress(d, _) => d.migrate_to_system(addr, n),
        }
    }

    /// Brings every page back to RAM.
    pub fn release(&self) -> uhmm::Result<usize> {
        match self {
            Device::Sim(d) => d.release(),
            Device::Compress(d, _) => d.release(),
        }
    }

    /// Device pages in use.
    pub fn pages_in_use(&self) -> usize {
        match self {
            Device::Sim(d) => d.pages_in_use(),
            Device::Compress(d, _) => d.pages_in_use(),
        }
    }

    /// The device's owner token.
    pub fn owner(&self) -> Owner {
        match self {
            Device::Sim(d) => d.owner(),
            Device::Compress(d, _) => d.owner(),
        }
    }

    /// The device's pagemap.
    pub fn pagemap(&self) -> &Arc<DevicePagemap> {
        match self {
            Device::Sim(d) => d.pagemap(),
            Device::Compress(d, _) => d.pagemap(),
        }
    }

    /// The compressed store's counters, as a line (empty for the sim).
    pub fn store_line(&self) -> String {
        let Device::Compress(_, store) = self else { return String::new() };
        let s = store.stats();
        format!(
            "store: orig {} compr {} mem_used {} (ratio {:.2}, fragmentation {:.0}%); same-filled pages {}, incompressible {}, in groups {}; pages lost {}",
            human(s.orig_data_size as usize),
            human(s.compr_data_size as usize),
            human(s.mem_used_total as usize),
            s.ratio(),
            s.fragmentation() * 100.0,
            s.same_pages,
            s.huge_pages,
            s.grouped_pages,
            s.lost_pages
        )
    }
}

/// A RAM budget's counters, as a line: resident bytes against the budget,
/// the peak, pages demoted and promoted, the promotion rate, faults that
/// waited for room (and went on without it), and the access tracking's
/// cost as a share of one CPU (`tracking_cpu / wall`).
pub fn tier_line(s: &TierStats) -> String {
    let cpu = s.tracking_cpu.as_secs_f64() / s.wall.as_secs_f64().max(1e-9) * 100.0;
    format!(
        "tier: resident {} / budget {} (peak {}); demoted {} promoted {} pages ({:.0}/s); throttled {} overshoots {}; tracking {:.2}% of a CPU",
        human(s.resident_bytes as usize),
        human(s.budget_bytes as usize),
        human(s.peak_resident_bytes as usize),
        s.demoted_pages,
        s.promoted_pages,
        s.promotion_rate,
        s.throttled,
        s.overshoots,
        cpu
    )
}
