//! The devices `uhmm demo` and `uhmm stress` run on: the sim device, or a
//! store device over the compressed store or a far store (a file, Redis),
//! behind one enum.

use std::sync::Arc;

use uhmm::{AddressSpace, DevicePagemap, Owner};
use uhmm_devices::compress::CompressStore;
use uhmm_devices::far::{FarAddress, FarStats, FarStore};
use uhmm_devices::sim::SimDevice;
use uhmm_devices::store::{StoreDevice, StoreDeviceConfig};
use uhmm_devices::tier::TierStats;

use crate::units::human;

/// Which device to run on (`--device`): `sim`, `compress`, `file:PATH`,
/// `redis://HOST:PORT` (and the other forms of
/// [`FarAddress`](uhmm_devices::far::FarAddress)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    /// The sim device (a model of the kernel's HMM test driver).
    Sim,
    /// A store device over the compressed store (lz4): pages compressed in
    /// RAM.
    Compress,
    /// A store device over a far store: a file, or a Redis server or
    /// cluster; every page sealed.
    Far(FarAddress),
    /// The CUDA device (`cuda`: the first NVIDIA GPU, with the `cuda`
    /// feature; `cuda-fake`: the fake GPU of host memory and threads).
    /// `uhmm demo` only.
    Cuda {
        /// The fake GPU rather than a real one.
        fake: bool,
    },
}

/// `--device`'s parser.
pub fn parse_device(s: &str) -> Result<DeviceKind, String> {
    match s {
        "sim" => Ok(DeviceKind::Sim),
        "compress" => Ok(DeviceKind::Compress),
        "cuda" => Ok(DeviceKind::Cuda { fake: false }),
        "cuda-fake" => Ok(DeviceKind::Cuda { fake: true }),
        _ => FarAddress::parse(s)
            .map(DeviceKind::Far)
            .map_err(|e| format!("sim, compress, cuda, cuda-fake, or a far store: {e}")),
    }
}

impl DeviceKind {
    /// Whether its device is a store device (which a tier can demote to).
    pub fn is_store(&self) -> bool {
        !matches!(self, DeviceKind::Sim | DeviceKind::Cuda { .. })
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceKind::Sim => f.write_str("sim"),
            DeviceKind::Compress => f.write_str("compress"),
            DeviceKind::Far(a) => a.fmt(f),
            DeviceKind::Cuda { fake: false } => f.write_str("cuda"),
            DeviceKind::Cuda { fake: true } => f.write_str("cuda-fake"),
        }
    }
}

/// A device of any kind.
pub enum Device {
    /// The sim device.
    Sim(SimDevice),
    /// A store device (shared with a [`Tier`](uhmm_devices::tier::Tier)
    /// under `--ram-budget`) and its compressed store.
    Compress(Arc<StoreDevice>, Arc<CompressStore>),
    /// A store device and its far store.
    Far(Arc<StoreDevice>, FarStore),
}

impl Device {
    /// A store device over the far store at `address`, migrating
    /// `chunk_pages` pages at a time.
    pub fn far(space: &AddressSpace, address: &FarAddress, chunk_pages: usize) -> uhmm::Result<Device> {
        let far = address.open()?;
        let config = StoreDeviceConfig { migrate_chunk_pages: chunk_pages, ..StoreDeviceConfig::default() };
        Ok(Device::Far(Arc::new(StoreDevice::new(space, far.page_store(), config)?), far))
    }

    /// The sim device, when this is one (device reads and writes,
    /// exclusive access: a store has none).
    pub fn sim(&self) -> Option<&SimDevice> {
        match self {
            Device::Sim(d) => Some(d),
            _ => None,
        }
    }

    /// The store device, when this is one.
    pub fn store_device(&self) -> Option<&Arc<StoreDevice>> {
        match self {
            Device::Sim(_) => None,
            Device::Compress(d, _) | Device::Far(d, _) => Some(d),
        }
    }

    /// Moves `n` pages at `addr` to the device (riding out busy pages, for
    /// the sim); the pages on it after, holes counted.
    pub fn to_device(&self, addr: usize, n: usize) -> uhmm::Result<usize> {
        match self {
            Device::Sim(d) => d.migrate_to_device_all(addr, n).map(|c| c.cpages),
            Device::Compress(d, _) | Device::Far(d, _) => d.migrate_to_device(addr, n).map(|m| m.moved + m.holes),
        }
    }

    /// One pass of moving `n` pages at `addr` to the device; for the sim,
    /// an error when none moved.
    pub fn to_device_once(&self, addr: usize, n: usize) -> uhmm::Result<()> {
        match self {
            Device::Sim(d) => d.migrate_to_device(addr, n).map(drop),
            Device::Compress(d, _) | Device::Far(d, _) => d.migrate_to_device(addr, n).map(drop),
        }
    }

    /// Brings `n` pages at `addr` back to RAM; the pages moved.
    pub fn to_system(&self, addr: usize, n: usize) -> uhmm::Result<usize> {
        match self {
            Device::Sim(d) => d.migrate_to_system(addr, n).map(|c| c.cpages),
            Device::Compress(d, _) | Device::Far(d, _) => d.migrate_to_system(addr, n),
        }
    }

    /// Brings every page back to RAM.
    pub fn release(&self) -> uhmm::Result<usize> {
        match self {
            Device::Sim(d) => d.release(),
            Device::Compress(d, _) | Device::Far(d, _) => d.release(),
        }
    }

    /// Device pages in use.
    pub fn pages_in_use(&self) -> usize {
        match self {
            Device::Sim(d) => d.pages_in_use(),
            Device::Compress(d, _) | Device::Far(d, _) => d.pages_in_use(),
        }
    }

    /// The device's owner token.
    pub fn owner(&self) -> Owner {
        match self {
            Device::Sim(d) => d.owner(),
            Device::Compress(d, _) | Device::Far(d, _) => d.owner(),
        }
    }

    /// The device's pagemap.
    pub fn pagemap(&self) -> &Arc<DevicePagemap> {
        match self {
            Device::Sim(d) => d.pagemap(),
            Device::Compress(d, _) | Device::Far(d, _) => d.pagemap(),
        }
    }

    /// The store's counters, as a line (empty for the sim).
    pub fn store_line(&self) -> String {
        let store = match self {
            Device::Sim(_) => return String::new(),
            Device::Far(_, far) => return far_line(far),
            Device::Compress(_, store) => store,
        };
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

/// A far store's counters, as a line.
pub fn far_line(far: &FarStore) -> String {
    let (u, seal) = (far.usage(), far.seal_stats());
    let own = match far.stats() {
        FarStats::File(s) => format!(
            "file: {} writes, {} reads issued, {} lost, {} refused (full)",
            s.writes, s.reads, s.lost_pages, s.full_pages
        ),
        FarStats::Redis(s) => format!(
            "redis: {} round trips, {} retries, {} reconnects, {} lost, {} failed puts",
            s.round_trips, s.retries, s.reconnects, s.lost_pages, s.failed_puts
        ),
    };
    let writeback = far.writeback_stats().map_or(String::new(), |(w, c)| {
        format!(
            "; in RAM {} pages compressed in {} (ratio {:.2}), {} far; written back {}, sent far when full {}, got from RAM {}, from far {}",
            w.ram_pages,
            human(c.mem_used_total as usize),
            c.ratio(),
            w.below_pages,
            w.written_back,
            w.refused_to_below,
            w.got_ram,
            w.got_below
        )
    });
    format!(
        "store {}: {} pages ({}) in {}; sealed {} opened {} zero {} forged {}; {own}{writeback}",
        far.address(),
        u.pages,
        human(u.orig_bytes as usize),
        human(u.used_bytes as usize),
        seal.sealed,
        seal.opened,
        seal.zero_pages,
        seal.forged
    )
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
