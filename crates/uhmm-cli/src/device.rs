//! Driving the sim device from the commands.

use uhmm::{ErrorKind, Result};
use uhmm_devices::sim::{Counters, SimDevice};

/// `migrate_to_device`, tried again (up to three times) while pages were
/// left behind: a page the kernel or uhmm holds for a moment is skipped as
/// busy, which a command that wants everything on the device should ride out.
pub fn migrate_to_device_all(dev: &SimDevice, addr: usize, npages: usize) -> Result<Counters> {
    let mut last = dev.migrate_to_device(addr, npages);
    for _ in 0..3 {
        match &last {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                std::thread::sleep(std::time::Duration::from_millis(1));
                last = dev.migrate_to_device(addr, npages);
            }
            _ => break,
        }
    }
    last
}
