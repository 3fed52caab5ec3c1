//! What the tests of whole address spaces share: the core's one test
//! driver, `TestDev` (its text is `src/test_device.rs`, which the unit
//! tests use too).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use uhmm::{
    AddressSpace, ChunkDriver, Collected, CpuFault, DevicePage, DevicePagemap, DevicePagemapOps, DevicePfn, MigrateDst,
    MigrateSrc, MigrateSummary, Migrated, Migration, Owner, PAGE_SIZE, Prot, Region, Result, Select,
};

include!("../../src/test_device.rs");
