//! uhmm: heterogeneous memory management for user space.
//!
//! uhmm moves the pages behind ranges of a process's virtual addresses
//! between RAM and device memories while the program keeps using plain
//! pointers — the kernel's HMM (`migrate_vma_setup` / `_pages` /
//! `_finalize`, device-private pages, `migrate_to_ram` on CPU fault) carried
//! into a process with userfaultfd.
//!
//! ```no_run
//! # fn main() -> uhmm::Result<()> {
//! let space = uhmm::AddressSpace::new(uhmm::Config::default())?;
//! let region = space.map(1 << 20, uhmm::Prot::READ_WRITE)?;
//! region.write(0, b"hello")?;
//! let owner = uhmm::Owner::new();
//! let m = uhmm::Migration::setup(&space, region.range(), uhmm::Select::SYSTEM, owner)?;
//! // a driver allocates device pages, copies, and sets destinations here
//! m.pages().finalize(); // nothing had a destination: every page is restored
//! # Ok(()) }
//! ```
//!
//! Layout, from the leaves up (the repository's `docs/architecture.md`
//! has the table): `page` (device page identities), `pte` (the software
//! page table and page locks), `pagemap` (device page frames), `vma` (a
//! region's state), `staging`, `copier` and `holding` (memory in flight);
//! `mm`, the hub (`AddressSpace`, its state); `driver` (the driver trait)
//! and `migrate` (the three steps, one file each); `fault` (the engine),
//! `mirror`, `exclusive`, `pin`, `move_pages`, `fork`; on top `region` (the
//! `Region` handle, `map`) and `space` (`AddressSpace::new`). The system
//! calls are the `uhmm-sys` crate, the only `unsafe`.

#![deny(unsafe_code)]

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
compile_error!("uhmm supports 64-bit Linux only");

mod charge;
mod config;
mod copier;
mod driver;
mod error;
mod exclusive;
mod fault;
mod foreign;
mod fork;
mod holding;
mod io;
mod migrate;
mod migrate_pages;
mod mirror;
mod mm;
mod move_pages;
mod notifier;
mod page;
mod pagemap;
mod pin;
mod pte;
mod region;
mod space;
mod staging;
mod stats;
mod sync;
mod tracking;
#[cfg(test)]
mod test_device {
    //! The core's one test driver (the tests under `tests/` include the
    //! same text).
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::{Arc, Mutex, OnceLock, Weak};

    use crate::{
        AddressSpace, ChunkDriver, Collected, CpuFault, DevicePage, DevicePagemap, DevicePagemapOps, DevicePfn,
        MigrateDst, MigrateSrc, MigrateSummary, Migrated, Migration, Owner, PAGE_SIZE, Prot, Region, Result, Select,
    };

    include!("test_device.rs");
}
mod vma;

pub use charge::ChargeOps;
pub use config::{AUTO_HANDLERS_MAX, Config, FaultDelivery};
pub use driver::DevicePagemapOps;
pub use error::{Error, ErrorKind, Result};
pub use exclusive::ExclusiveGrant;
pub use migrate::chunked::{ChunkDriver, PipelinedDriver, migrate_chunked, migrate_pipelined};
pub use migrate::device_range::migrate_device_range;
pub use migrate::{Collected, CpuFault, MigrateDst, MigrateSrc, MigrateSummary, Migrated, Migration, Select, Skip};
pub use migrate_pages::{MIGRATE_PASSES, MigrateMode, MigratePagesOutcome, MigrateReason, NotMoved, migrate_pages};
pub use mirror::{AccessPage, RangeAccess, RegionMemory, range_fault};
pub use mm::{AddressSpace, HandlerWatch, PageSnapshot, Residency};
pub use move_pages::{MoveStatus, MoveTarget, move_pages};
pub use notifier::{IntervalNotifier, IntervalNotifierOps, InvalidateEvent, NotifierHandle};
pub use page::{DevicePage, DevicePfn, Owner};
pub use pagemap::DevicePagemap;
pub use pin::{Pin, PinKind};
pub use pte::State as PageState;
pub use region::Region;
pub use staging::{BATCH_PAGES, SystemPage};
pub use stats::StatsSnapshot;
pub use uhmm_sys::mman::{DmaRange, Mapping, Protection};
pub use uhmm_sys::stall::StepAside;
pub use uhmm_sys::uffd::Origin as UffdOrigin;
pub use uhmm_sys::{HUGE_SIZE, PAGE_SIZE};
pub use vma::{Backing, Prot};
