//! Pins taken through uhmm (`pin_user_pages`): pinned pages stay in RAM and
//! are never migrated.
//!
//! A pin first brings the range to RAM — device-private pages come back
//! through their driver's `migrate_to_ram`, holes are filled — and then asks
//! the kernel for a real pin (an io_uring fixed-buffer registration, the
//! long-term `FOLL_PIN | FOLL_WRITE` pin an I/O user takes). A migration then
//! finds the page unmovable (`UFFDIO_MOVE` answers `EBUSY`) and skips it as
//! busy, exactly as the kernel skips pinned pages.
//!
//! Short-term and long-term pins differ for device-coherent memory: a
//! long-term pin brings it back to RAM (`migrate_device_coherent_page`), a
//! short-term pin leaves it on the device (it is mapped and CPU-addressable).

use std::ops::Range;

use crate::mirror::range_fault;
use crate::mm::AddressSpace;
use crate::page::Owner;
use crate::vma::Prot;
use crate::{Error, ErrorKind, Result};
use uhmm_sys::pin::IoPin;

/// How long a pin is meant to last (`FOLL_LONGTERM` or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinKind {
    /// A pin for the duration of one I/O.
    ShortTerm,
    /// A pin that may last indefinitely (RDMA, io_uring fixed buffers).
    LongTerm,
}

/// Pages pinned in RAM until this value is dropped.
#[derive(Debug)]
pub struct Pin {
    _kernel: IoPin,
    range: Range<usize>,
    kind: PinKind,
}

impl Pin {
    /// The pinned address range.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// The kind of pin.
    pub fn kind(&self) -> PinKind {
        self.kind
    }
}

impl AddressSpace {
    /// Pins `range` (page-aligned, inside one writable part of a region) in
    /// RAM: pages on devices are migrated back first.
    pub fn pin(&self, range: Range<usize>, kind: PinKind) -> Result<Pin> {
        if self.protection(range.clone())?.iter().any(|(_, p)| *p != Prot::READ_WRITE) {
            return Err(Error::new(ErrorKind::Permission, "pins need read-write memory (FOLL_WRITE)"));
        }
        // A long-term pin may not keep device memory: coherent pages come
        // back too (`migrate_device_coherent_page`). Private ones always do.
        if kind == PinKind::LongTerm {
            crate::mirror::evict_coherent(&self.inner, range.clone())?;
        }
        // An owner no device has: every device-private page of the range comes back.
        let nobody = Owner::new();
        let mut last = None;
        for _attempt in 0..100 {
            drop(range_fault(self, range.clone(), true, nobody)?);
            // A migration may take a page away again before the kernel pins
            // it; the pin then faults it back (or fails in user-mode-only
            // userfaultfd, and we go round again).
            match IoPin::new(range.start, range.len()) {
                Ok(pin) => return Ok(Pin { _kernel: pin, range, kind }),
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::FAULT.raw_os_error()) => last = Some(e),
                Err(e) => return Err(Error::sys("pin (io_uring buffer registration)", e)),
            }
        }
        Err(Error::sys("pin", last.unwrap_or_else(|| std::io::Error::other("the range kept moving"))))
    }
}
