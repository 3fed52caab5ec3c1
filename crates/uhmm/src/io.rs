//! File I/O on region memory that works whatever the userfaultfd catches.
//!
//! With a full userfaultfd, a system call that touches region memory not in
//! RAM waits for the fault engine like a load does. With a user-mode-only
//! one ([`AddressSpace::user_mode_only`](crate::AddressSpace::user_mode_only))
//! it fails with `EFAULT` instead. [`Region::pread`] and [`Region::pwrite`]
//! bring the range to RAM first (pages on devices migrate back, holes are
//! filled, as `hmm_range_fault` does) and do the call, again if a migration
//! took a page away meanwhile.

use std::ops::Range;
use std::os::fd::AsFd;

use rustix::io::Errno;

use crate::mirror::range_fault;
use crate::mm::AddressSpace;
use crate::page::Owner;
use crate::region::Region;
use crate::vma::Prot;
use crate::{Error, ErrorKind, Result};

/// Rounds of "bring home, then call" before a range that keeps moving away
/// is reported (each round makes progress unless a migration races it).
const IO_ATTEMPTS: usize = 100;

impl Region {
    /// Reads from `fd` at `file_offset` into `range` of the region (byte
    /// offsets; any alignment), as `pread(2)` would, until the range is full
    /// or the file ends; returns the bytes read. The range must be writable.
    ///
    /// Works in user-mode-only userfaultfd too, where a plain `read(2)` into
    /// a page that is not in RAM fails with `EFAULT`. Fails with the system
    /// call's error (kind and errno) when the file does; bytes read before
    /// that stay in the region.
    pub fn pread(&self, fd: impl AsFd, file_offset: u64, range: Range<usize>) -> Result<usize> {
        self.io(range, Prot::READ_WRITE, |off, len, done| {
            self.inner.map.pread_from(off, len, fd.as_fd(), file_offset + done as u64)
        })
    }

    /// Writes `range` of the region (byte offsets; any alignment) to `fd` at
    /// `file_offset`, as `pwrite(2)` would, until all of it is written;
    /// returns the bytes written. Works in user-mode-only userfaultfd too
    /// (see [`Region::pread`]).
    pub fn pwrite(&self, fd: impl AsFd, file_offset: u64, range: Range<usize>) -> Result<usize> {
        self.io(range, Prot::READ, |off, len, done| {
            self.inner.map.pwrite_to(off, len, fd.as_fd(), file_offset + done as u64)
        })
    }

    /// Runs `call(offset, len, done)` over what is left of `range` until it
    /// is done or `call` returns 0, bringing the rest of the range to RAM
    /// before each call.
    fn io(
        &self,
        range: Range<usize>,
        need: Prot,
        mut call: impl FnMut(usize, usize, usize) -> std::io::Result<usize>,
    ) -> Result<usize> {
        if range.start > range.end {
            return Err(Error::invalid("the range ends before it starts"));
        }
        self.inner.check_access(range.start, range.len(), need)?;
        let write = need.contains(Prot::WRITE);
        let space = AddressSpace::from(self.space.clone());
        // An owner no device has: every device page of the range comes back.
        let nobody = Owner::new();
        let (mut done, mut faulted) = (0, 0);
        while done < range.len() {
            let at = range.start + done;
            let pages = self.addr() + at / crate::PAGE_SIZE * crate::PAGE_SIZE
                ..self.addr() + range.end.div_ceil(crate::PAGE_SIZE) * crate::PAGE_SIZE;
            drop(range_fault(&space, pages, write, nobody)?);
            match call(at, range.len() - done, done) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.raw_os_error() == Some(Errno::INTR.raw_os_error()) => {}
                // A migration took a page away between the two steps.
                Err(e) if e.raw_os_error() == Some(Errno::FAULT.raw_os_error()) => {
                    faulted += 1;
                    if faulted == IO_ATTEMPTS {
                        return Err(Error::new(ErrorKind::Busy, "the range kept moving away from RAM"));
                    }
                }
                Err(e) => return Err(Error::sys(if write { "pread" } else { "pwrite" }, e)),
            }
        }
        Ok(done)
    }
}
