//! The core's unit tests' device: a driver that keeps no data (its pages
//! come back as zeros), counts its `migrate_to_ram` calls and can be made
//! slow. Tests of whole address spaces under `tests/` share theirs in
//! `tests/common`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use uhmm_sys::PAGE_SIZE;

use crate::{CpuFault, Result};

/// A device that keeps no data: its pages come back as zeros.
pub(crate) struct Forgetful {
    pub(crate) owner: crate::Owner,
    pub(crate) migrate_to_ram_calls: AtomicUsize,
    /// Milliseconds each `migrate_to_ram` sleeps first.
    pub(crate) sluggish_ms: AtomicUsize,
}

impl Forgetful {
    /// A region of `npages` pages filled with ones, and a forgetful
    /// device registered for it.
    pub(crate) fn attach(
        space: &crate::AddressSpace,
        npages: usize,
    ) -> (crate::Region, Arc<Forgetful>, Arc<crate::DevicePagemap>) {
        let region = space.map(npages * PAGE_SIZE, crate::Prot::READ_WRITE).unwrap();
        region.write(0, &vec![1; npages * PAGE_SIZE]).unwrap();
        let dev = Arc::new(Forgetful {
            owner: crate::Owner::new(),
            migrate_to_ram_calls: AtomicUsize::new(0),
            sluggish_ms: AtomicUsize::new(0),
        });
        let ops: Weak<dyn crate::DevicePagemapOps> = Arc::downgrade(&dev) as Weak<Forgetful>;
        let pm = space.register_pagemap(ops, dev.owner, npages as u64).unwrap();
        (region, dev, pm)
    }

    /// Moves every page of `region` to the device (page `i` to pfn `i`);
    /// returns the pages moved.
    pub(crate) fn take_all(
        &self,
        space: &crate::AddressSpace,
        region: &crate::Region,
        pm: &crate::DevicePagemap,
    ) -> usize {
        let mut m = crate::Migration::setup(space, region.range(), crate::Select::SYSTEM, self.owner).unwrap();
        for i in 0..m.npages() {
            m.set_dst_device(i, pm.page(crate::DevicePfn(i as u64)).unwrap()).unwrap();
        }
        m.pages().finalize().migrated
    }
}

impl crate::DevicePagemapOps for Forgetful {
    fn page_free(&self, _: crate::DevicePfn) {}

    fn migrate_to_ram(&self, fault: &CpuFault) -> Result<()> {
        self.migrate_to_ram_calls.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(self.sluggish_ms.load(Ordering::SeqCst) as u64));
        let mut m = crate::Migration::setup(fault.space(), fault.window(), crate::Select::DEVICE_PRIVATE, self.owner)?;
        for i in 0..m.npages() {
            if matches!(m.src(i), crate::MigrateSrc::Device(_)) {
                m.system_dst(i)?.write(0, &[0; PAGE_SIZE])?;
                m.set_dst_system(i)?;
            }
        }
        m.pages().finalize();
        Ok(())
    }
}
