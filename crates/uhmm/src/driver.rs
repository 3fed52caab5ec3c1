//! What a device driver must do for uhmm: [`DevicePagemapOps`], the
//! kernel's `dev_pagemap_ops` (`page_free`, `migrate_to_ram`), with the two
//! hooks `move_pages` uses to move pages to a device.
//!
//! The trait is the one place the core reaches back up: the address space
//! (`mm.rs`) holds each pagemap's driver, and the driver is handed
//! migrations of that address space (`migrate`). The import cycle this makes
//! (mm → driver → migrate → mm) is the core's only one.

use crate::migrate::{Collected, CpuFault, Migrated, Migration};
use crate::page::DevicePfn;
use crate::{Error, ErrorKind, Result};

/// What a device driver must do for uhmm (`dev_pagemap_ops`).
pub trait DevicePagemapOps: Send + Sync {
    /// The device page `pfn` is no longer used by any address: give it back
    /// to the device's allocator. Called after the page is unmapped. It may
    /// be called while the core holds the lock of the page's old address (a
    /// region being unmapped frees its device pages under their locks), so
    /// it must not touch region memory or wait for a migration.
    fn page_free(&self, pfn: DevicePfn);

    /// [`page_free`](Self::page_free) of several pages at once (a finished
    /// migration's sources): a driver can take its locks once. The default
    /// frees them one by one.
    fn pages_free(&self, pfns: &[DevicePfn]) {
        for &pfn in pfns {
            self.page_free(pfn);
        }
    }

    /// A CPU thread faulted on `fault.addr()`, which lives on this device:
    /// migrate it (and any of `fault.window()` the driver chooses) back to
    /// RAM with a [`Migration`] selecting
    /// [`Select::DEVICE_PRIVATE`](crate::Select::DEVICE_PRIVATE) (for a
    /// coherent pagemap, [`Select::DEVICE_COHERENT`](crate::Select::DEVICE_COHERENT):
    /// a long-term pin brings its pages back through here) and this
    /// pagemap's owner. On a CPU fault, an error of kind `NoMemory` or
    /// `Busy` is taken as transient and the fault is retried;
    /// `InvalidArgument` has the fault retried with a window of the one
    /// page; any other error makes the faulting page poisoned (SIGBUS), so
    /// return one only for unrecoverable device state. Other callers
    /// (`range_fault` and pins, fork, read-ahead, `move_pages`) each handle
    /// an error their own way (the repository's `docs/drivers.md` has the
    /// table).
    fn migrate_to_ram(&self, fault: &CpuFault) -> Result<()>;

    /// [`move_pages`](crate::move_pages()) to this device: `m` was set up with
    /// [`Select::SYSTEM`](crate::Select::SYSTEM) and this pagemap's owner.
    /// Allocate device pages of this pagemap for its collected pages (RAM
    /// pages; a hole gets a zero-filled page), copy (waiting for the copy's
    /// fence) and set each destination with
    /// [`Migration::set_dst_device`]. A page left without a destination
    /// stays where it is and is reported as out of memory; an error of kind
    /// `NoMemory` or `Busy` marks the whole batch so, any other error stops
    /// `move_pages`. The default supports no moves to this device
    /// ([`ErrorKind::Unsupported`]).
    fn alloc_and_copy(&self, m: &mut Migration<Collected>) -> Result<()> {
        let _ = m;
        Err(Error::new(ErrorKind::Unsupported, "this device does not support move_pages to it"))
    }

    /// After [`alloc_and_copy`](DevicePagemapOps::alloc_and_copy) and
    /// [`Migration::pages`], before `finalize`: update the device's page
    /// table for the pages that moved, while they are still locked. The
    /// default does nothing.
    fn finalize_and_map(&self, m: &Migration<Migrated>) {
        let _ = m;
    }
}
