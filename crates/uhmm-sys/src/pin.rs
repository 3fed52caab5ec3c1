//! Kernel pins on user pages, as an I/O user takes them: buffers registered
//! with io_uring (`IORING_REGISTER_BUFFERS`, a long-term `pin_user_pages`).
//!
//! uhmm never pins pages itself for migration; this exists so that tests and
//! tools can create the "pinned for I/O" pages that a migration must skip
//! (`UFFDIO_MOVE` answers `EBUSY` for them).
//!
//! # References
//!
//! io_uring_setup(2), io_uring_register(2).

use std::io;
use std::os::fd::OwnedFd;

use rustix::io_uring::{IoringRegisterOp, io_uring_params, io_uring_register, io_uring_setup};

use super::mman::Mapping;

/// Pages of a [`Mapping`] pinned by the kernel until this value is dropped.
#[derive(Debug)]
pub struct IoPin {
    ring: OwnedFd,
}

impl IoPin {
    /// Pins `len` bytes at offset `off` of `mapping` (page-aligned; the pages
    /// are faulted in first, so they must be readable and present or
    /// fault-able by someone other than the caller).
    pub fn new(mapping_addr: usize, len: usize) -> io::Result<IoPin> {
        let mut params = io_uring_params::default();
        // SAFETY: creates a ring we own; nothing is submitted to it.
        let ring = unsafe { io_uring_setup(1, &mut params) }?;
        let iov = rustix::io_uring::iovec { iov_base: mapping_addr as *mut core::ffi::c_void, iov_len: len };
        // SAFETY: IORING_REGISTER_BUFFERS reads one iovec from `iov`, which is
        // live for the call; the kernel pins the pages it names and never
        // writes them (no I/O is ever submitted to this ring).
        unsafe { io_uring_register(&ring, IoringRegisterOp::RegisterBuffers, (&raw const iov).cast(), 1) }?;
        Ok(IoPin { ring })
    }

    /// Pins a sub-range of `mapping`.
    pub fn of(mapping: &Mapping, off: usize, len: usize) -> io::Result<IoPin> {
        IoPin::new(mapping.page_range(off, len)?, len)
    }
}

impl Drop for IoPin {
    fn drop(&mut self) {
        // Unregister explicitly: closing the ring alone unpins later, from a
        // kernel worker, and a migration right after the drop would still
        // find the pages pinned.
        // SAFETY: IORING_UNREGISTER_BUFFERS takes no argument and only drops
        // the ring's own references to the pages it pinned.
        let r = unsafe { io_uring_register(&self.ring, IoringRegisterOp::UnregisterBuffers, std::ptr::null(), 0) };
        if let Err(err) = r {
            tracing::warn!(%err, "io_uring buffer unregistration failed; the pages unpin when the ring closes");
        }
    }
}
