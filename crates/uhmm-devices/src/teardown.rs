//! What every driver does when it is dropped: its pages evicted to RAM,
//! then its pagemap unregistered. A drop cannot return an error, so a
//! failure is logged (the pages it left stay readable through the core).

use uhmm::{AddressSpace, DevicePagemap, Result};

/// Runs `release` (the driver's eviction, `migrate_device_range` over its
/// pages), then unregisters `pagemap` from `space` if it succeeded;
/// `driver` names the driver in the log.
pub(crate) fn release_and_unregister(
    space: &AddressSpace,
    pagemap: &DevicePagemap,
    release: impl FnOnce() -> Result<usize>,
    driver: &str,
) {
    match release() {
        Ok(_) => {
            if let Err(err) = space.unregister_pagemap(pagemap) {
                tracing::error!(%err, driver, "pagemap still in use at drop");
            }
        }
        Err(err) => tracing::error!(%err, driver, "eviction at drop failed"),
    }
}
