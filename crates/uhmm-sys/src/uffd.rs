//! userfaultfd: creation with feature discovery, registration, the resolving
//! ioctls (COPY, ZEROPAGE, MOVE, POISON, WAKE, WRITEPROTECT) and event reads.
//!
//! # Why the resolving calls are safe functions
//!
//! `UFFDIO_COPY`, `UFFDIO_ZEROPAGE` and `UFFDIO_POISON` only fill page-table
//! entries that are empty, inside ranges registered with this userfaultfd;
//! registration takes a [`Mapping`], whose bytes no Rust reference may point
//! into. They never overwrite memory, so they cannot break a Rust invariant;
//! a bad address is answered by the kernel with an error. `UFFDIO_MOVE`
//! empties its source range, so its source must be a [`Mapping`] as well.
//!
//! # References
//!
//! userfaultfd(2), ioctl_userfaultfd(2), Documentation/admin-guide/mm/userfaultfd.rst.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use linux_raw_sys::general as uapi;
use rustix::io::Errno;
use rustix::ioctl::{Opcode, opcode};

use super::ioctl_update;
use super::mman::Mapping;

const UFFDIO: u8 = 0xAA;
const OP_API: Opcode = opcode::read_write::<uapi::uffdio_api>(UFFDIO, 0x3F);
const OP_REGISTER: Opcode = opcode::read_write::<uapi::uffdio_register>(UFFDIO, 0x00);
const OP_UNREGISTER: Opcode = opcode::read::<uapi::uffdio_range>(UFFDIO, 0x01);
const OP_WAKE: Opcode = opcode::read::<uapi::uffdio_range>(UFFDIO, 0x02);
const OP_COPY: Opcode = opcode::read_write::<uapi::uffdio_copy>(UFFDIO, 0x03);
const OP_ZEROPAGE: Opcode = opcode::read_write::<uapi::uffdio_zeropage>(UFFDIO, 0x04);
const OP_MOVE: Opcode = opcode::read_write::<uapi::uffdio_move>(UFFDIO, 0x05);
const OP_WRITEPROTECT: Opcode = opcode::read_write::<uapi::uffdio_writeprotect>(UFFDIO, 0x06);
const OP_POISON: Opcode = opcode::read_write::<uapi::uffdio_poison>(UFFDIO, 0x08);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
const OP_DEV_NEW: Opcode = opcode::none(UFFDIO, 0x00);

const MOVE_MODE_DONTWAKE: u64 = 1 << 0;
const MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;
const ZEROPAGE_MODE_DONTWAKE: u64 = uapi::UFFDIO_ZEROPAGE_MODE_DONTWAKE as u64;
const COPY_MODE_DONTWAKE: u64 = uapi::UFFDIO_COPY_MODE_DONTWAKE as u64;

/// `UFFD_FEATURE_*` bits (kept as the kernel's numbers; unknown bits are kept too).
pub mod feature {
    use linux_raw_sys::general as uapi;
    /// `UFFD_FEATURE_EVENT_FORK`.
    pub const EVENT_FORK: u64 = uapi::UFFD_FEATURE_EVENT_FORK as u64;
    /// `UFFD_FEATURE_EVENT_REMAP`.
    pub const EVENT_REMAP: u64 = uapi::UFFD_FEATURE_EVENT_REMAP as u64;
    /// `UFFD_FEATURE_EVENT_REMOVE`.
    pub const EVENT_REMOVE: u64 = uapi::UFFD_FEATURE_EVENT_REMOVE as u64;
    /// `UFFD_FEATURE_EVENT_UNMAP`.
    pub const EVENT_UNMAP: u64 = uapi::UFFD_FEATURE_EVENT_UNMAP as u64;
    /// `UFFD_FEATURE_THREAD_ID`.
    pub const THREAD_ID: u64 = uapi::UFFD_FEATURE_THREAD_ID as u64;
    /// `UFFD_FEATURE_POISON`.
    pub const POISON: u64 = uapi::UFFD_FEATURE_POISON as u64;
    /// `UFFD_FEATURE_MOVE`.
    pub const MOVE: u64 = uapi::UFFD_FEATURE_MOVE as u64;
    /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
    pub const PAGEFAULT_FLAG_WP: u64 = uapi::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64;
    /// `UFFD_FEATURE_WP_ASYNC`: a write to a write-protected page is
    /// resolved by the kernel, which clears the protection (no message);
    /// `PAGEMAP_SCAN` then reports the page written.
    pub const WP_ASYNC: u64 = uapi::UFFD_FEATURE_WP_ASYNC as u64;
    /// `UFFD_FEATURE_WP_UNPOPULATED`: write protection also marks empty
    /// entries of anonymous memory.
    pub const WP_UNPOPULATED: u64 = uapi::UFFD_FEATURE_WP_UNPOPULATED as u64;
    /// `UFFD_FEATURE_SIGBUS`: a missing-page fault raises SIGBUS
    /// (`BUS_ADRERR`) in the faulting thread instead of waiting for a
    /// handler; a fault from a system call fails it with `EFAULT`.
    pub const SIGBUS: u64 = uapi::UFFD_FEATURE_SIGBUS as u64;
}

/// How the userfaultfd was obtained; it decides which faults it catches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `ioctl(USERFAULTFD_IOC_NEW)` on `/dev/userfaultfd`: catches kernel-mode faults too.
    DevNode,
    /// The `userfaultfd(2)` system call with full privileges.
    Syscall,
    /// `userfaultfd(UFFD_USER_MODE_ONLY)`: only user-mode faults are caught; a
    /// system call touching a missing page gets `EFAULT` instead of waiting.
    UserModeOnly,
}

/// Which userfaultfds [`Uffd::open`] may return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// Only one that catches kernel-mode faults too.
    Full,
    /// A full one where the process may have it, else a user-mode-only one.
    FullOrUserModeOnly,
    /// A user-mode-only one, even where a full one could be had.
    UserModeOnly,
}

/// A failed resolving ioctl that may have done part of its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{errno} after {done} bytes")]
pub struct Partial {
    /// Bytes that were handled before the error.
    pub done: usize,
    /// Why it stopped: `EEXIST` (a page is already there), `EAGAIN`
    /// (non-cooperative events are pending), `EBUSY` (MOVE: the page is
    /// pinned or shared), `ENOENT` (MOVE: a source hole, or the mapping
    /// changed), `ENOMEM`, `EFAULT`, `EINVAL`.
    pub errno: Errno,
}

/// One message read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted on `addr` (not page-aligned in general).
    PageFault {
        /// The faulting address.
        addr: usize,
        /// Whether it was a write access.
        write: bool,
        /// The faulting thread (0 unless `THREAD_ID` was negotiated).
        tid: u32,
    },
    /// The process forked; `fd` is the child's userfaultfd.
    Fork {
        /// Raw descriptor of the child's userfaultfd, now owned by the reader.
        fd: i32,
    },
    /// `mremap` moved `from` to `to`.
    Remap {
        /// Old start.
        from: usize,
        /// New start.
        to: usize,
        /// Length.
        len: usize,
    },
    /// `MADV_DONTNEED`/`MADV_REMOVE` emptied `start..end`.
    Remove {
        /// Start.
        start: usize,
        /// End.
        end: usize,
    },
    /// `munmap` of `start..end`.
    Unmap {
        /// Start.
        start: usize,
        /// End.
        end: usize,
    },
    /// A message this code does not know.
    Unknown(u8),
}

/// An open, API-negotiated userfaultfd in non-blocking mode.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    origin: Origin,
    features: u64,
}

/// What to change for full userfaultfd: in the error when none can be had,
/// and in the warning when only a user-mode-only one can.
pub const PERMISSION_HINT: &str = "for full userfaultfd, do one of: run as root; give this user read-write \
     access to /dev/userfaultfd (`sudo setfacl -m u:$USER:rw /dev/userfaultfd`, or a udev rule for a group); \
     `sudo sysctl vm.unprivileged_userfaultfd=1`. uhmm needs Linux >= 6.8 built with CONFIG_USERFAULTFD";

/// The error when no userfaultfd can be had.
fn unavailable() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, format!("userfaultfd is not available: {PERMISSION_HINT}"))
}

impl Uffd {
    /// Opens a userfaultfd and negotiates `wanted` features (only those the
    /// kernel supports are enabled; see [`Uffd::features`]).
    ///
    /// Tries `/dev/userfaultfd`, then `userfaultfd(2)`, then, if `accept`
    /// allows it, `userfaultfd(UFFD_USER_MODE_ONLY)` (only that one for
    /// [`Accept::UserModeOnly`]). Feature
    /// discovery is done on a throwaway descriptor, because `UFFDIO_API` can
    /// be called only once per descriptor.
    pub fn open(wanted: u64, accept: Accept) -> io::Result<Uffd> {
        let (probe, origin) = Self::create(accept)?;
        let supported = api(probe.as_fd(), 0)?;
        drop(probe);
        let (fd, origin2) = Self::create(accept)?;
        debug_assert_eq!(origin, origin2);
        // UFFDIO_API reports every feature the kernel has, asked for or
        // not: the descriptor's are the ones asked for that it has.
        let features = wanted & supported;
        api(fd.as_fd(), features)?;
        Ok(Uffd { fd, origin, features })
    }

    /// The features the kernel supports, discovered on a throwaway descriptor.
    pub fn supported_features(accept: Accept) -> io::Result<u64> {
        let (probe, _) = Self::create(accept)?;
        api(probe.as_fd(), 0)
    }

    fn create(accept: Accept) -> io::Result<(OwnedFd, Origin)> {
        let flags = (uapi::O_CLOEXEC | uapi::O_NONBLOCK) as usize;
        let cloexec_nonblock = rustix::mm::UserfaultfdFlags::CLOEXEC | rustix::mm::UserfaultfdFlags::NONBLOCK;
        let user_mode = rustix::mm::UserfaultfdFlags::from_bits_retain(uapi::UFFD_USER_MODE_ONLY);
        if accept == Accept::UserModeOnly {
            // SAFETY: creating a userfaultfd affects nothing until ranges are
            // registered with it, which only `register` (taking a Mapping) does.
            return match unsafe { rustix::mm::userfaultfd(cloexec_nonblock | user_mode) } {
                Ok(fd) => Ok((fd, Origin::UserModeOnly)),
                Err(_) => Err(unavailable()),
            };
        }
        if let Ok(dev) = OpenOptions::new().read(true).write(true).open("/dev/userfaultfd") {
            struct DevNew(usize);
            // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value (the
            // "pointer" is the integer) and returns a new descriptor.
            unsafe impl rustix::ioctl::Ioctl for DevNew {
                type Output = i32;
                const IS_MUTATING: bool = false;
                fn opcode(&self) -> Opcode {
                    OP_DEV_NEW
                }
                fn as_ptr(&mut self) -> *mut core::ffi::c_void {
                    self.0 as *mut core::ffi::c_void
                }
                unsafe fn output_from_ptr(out: i32, _: *mut core::ffi::c_void) -> rustix::io::Result<i32> {
                    Ok(out)
                }
            }
            // SAFETY: `dev` is /dev/userfaultfd, whose only ioctl is this one.
            if let Ok(raw) = unsafe { rustix::ioctl::ioctl(&dev, DevNew(flags)) } {
                // SAFETY: the ioctl returned a fresh descriptor that we now own.
                return Ok((unsafe { OwnedFd::from_raw_fd(raw) }, Origin::DevNode));
            }
        }
        // SAFETY: as above.
        match unsafe { rustix::mm::userfaultfd(cloexec_nonblock) } {
            Ok(fd) => return Ok((fd, Origin::Syscall)),
            Err(Errno::PERM | Errno::ACCESS) if accept == Accept::FullOrUserModeOnly => {}
            Err(Errno::PERM | Errno::ACCESS | Errno::NOSYS) => {
                return Err(unavailable());
            }
            Err(e) => return Err(e.into()),
        }
        // SAFETY: as above.
        match unsafe { rustix::mm::userfaultfd(cloexec_nonblock | user_mode) } {
            Ok(fd) => Ok((fd, Origin::UserModeOnly)),
            Err(_) => Err(unavailable()),
        }
    }

    /// How this descriptor was created.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The `UFFD_FEATURE_*` bits enabled on this descriptor: those asked
    /// for that the kernel has.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether every bit of `f` was negotiated.
    pub fn has(&self, f: u64) -> bool {
        self.features & f == f
    }

    /// The descriptor, for `poll`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `UFFDIO_REGISTER` a sub-range of `mapping` for MISSING faults (and WP
    /// ones when `wp`). Returns the kernel's bitmask of ioctls allowed on it.
    pub fn register(&self, mapping: &Mapping, off: usize, len: usize, wp: bool) -> io::Result<u64> {
        self.register_mode(mapping, off, len, true, wp)
    }

    /// `UFFDIO_REGISTER` a sub-range of `mapping` for MISSING faults when
    /// `missing`, WP ones when `wp` (at least one of the two).
    pub fn register_mode(&self, mapping: &Mapping, off: usize, len: usize, missing: bool, wp: bool) -> io::Result<u64> {
        let start = mapping.page_range(off, len)?;
        let mut mode = 0;
        if missing {
            mode |= u64::from(uapi::UFFDIO_REGISTER_MODE_MISSING);
        }
        if wp {
            mode |= u64::from(uapi::UFFDIO_REGISTER_MODE_WP);
        }
        let mut arg = uapi::uffdio_register { range: range(start, len), mode, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads/updates a `uffdio_register`; the range
        // belongs to a Mapping, which no Rust reference points into.
        unsafe { ioctl_update(self.fd(), OP_REGISTER, &mut arg) }?;
        Ok(arg.ioctls)
    }

    /// `UFFDIO_UNREGISTER` a sub-range of `mapping`.
    pub fn unregister(&self, mapping: &Mapping, off: usize, len: usize) -> io::Result<()> {
        let start = mapping.page_range(off, len)?;
        let mut arg = range(start, len);
        // SAFETY: UFFDIO_UNREGISTER reads a `uffdio_range`.
        unsafe { ioctl_update(self.fd(), OP_UNREGISTER, &mut arg) }?;
        Ok(())
    }

    /// `UFFDIO_UNREGISTER` of `start..start + len` by address, for memory
    /// no [`Mapping`] of the caller's describes (the program grew a mapping
    /// behind its back): faults there go to the kernel from then on.
    pub fn unregister_range(&self, start: usize, len: usize) -> io::Result<()> {
        if !start.is_multiple_of(crate::PAGE_SIZE) || !len.is_multiple_of(crate::PAGE_SIZE) || len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut arg = range(start, len);
        // SAFETY: UFFDIO_UNREGISTER reads a `uffdio_range` and changes how
        // faults in the range are handled, not the memory.
        unsafe { ioctl_update(self.fd(), OP_UNREGISTER, &mut arg) }?;
        Ok(())
    }

    /// `UFFDIO_ZEROPAGE`: map the zero page at every empty entry of
    /// `dst..dst + len`, stopping at the first error (`EEXIST` where a page is
    /// already present). Wakes threads faulting in the range unless `dontwake`.
    pub fn zeropage(&self, dst: usize, len: usize, dontwake: bool) -> Result<usize, Partial> {
        let mode = if dontwake { ZEROPAGE_MODE_DONTWAKE } else { 0 };
        within_vmas(len, Errno::NOENT, |off, len| {
            let mut arg = uapi::uffdio_zeropage { range: range(dst + off, len), mode, zeropage: 0 };
            // SAFETY: UFFDIO_ZEROPAGE fills only empty entries of ranges
            // registered with this descriptor (see the module docs).
            let r = unsafe { ioctl_update(self.fd(), OP_ZEROPAGE, &mut arg) };
            outcome(r, arg.zeropage, len)
        })
    }

    /// `UFFDIO_COPY`: allocate pages at the empty entries of `dst..dst + len`
    /// and fill them from `src` (any readable memory: the kernel copies it and
    /// answers `EFAULT` if it cannot). Stops at the first error.
    pub fn copy(&self, dst: usize, src: *const u8, len: usize, dontwake: bool) -> Result<usize, Partial> {
        let mode = if dontwake { COPY_MODE_DONTWAKE } else { 0 };
        within_vmas(len, Errno::NOENT, |off, len| {
            let (dst, src) = (dst + off, src.wrapping_add(off));
            let mut arg = uapi::uffdio_copy { dst: dst as u64, src: src as u64, len: len as u64, mode, copy: 0 };
            // SAFETY: UFFDIO_COPY fills only empty entries of registered
            // ranges and only reads `src` (see the module docs).
            let r = unsafe { ioctl_update(self.fd(), OP_COPY, &mut arg) };
            outcome(r, arg.copy, len)
        })
    }

    /// `UFFDIO_MOVE`: move the pages of `src` (a sub-range of a [`Mapping`])
    /// to the empty entries at `dst..dst + len` (registered with this
    /// descriptor) without copying. Source holes are skipped when
    /// `allow_src_holes`. Both sides must be private, anonymous and writable.
    /// Stops at the first error (`EBUSY`: a pinned or shared page).
    pub fn move_pages(
        &self,
        dst: usize,
        src: &Mapping,
        src_off: usize,
        len: usize,
        allow_src_holes: bool,
        dontwake: bool,
    ) -> Result<usize, Partial> {
        let src_addr = src.page_range(src_off, len).map_err(|_| Partial { done: 0, errno: Errno::INVAL })?;
        let mut mode = if dontwake { MOVE_MODE_DONTWAKE } else { 0 };
        if allow_src_holes {
            mode |= MOVE_MODE_ALLOW_SRC_HOLES;
        }
        within_vmas(len, Errno::INVAL, |off, len| {
            let (dst, src) = (dst + off, src_addr + off);
            let mut arg = uapi::uffdio_move { dst: dst as u64, src: src as u64, len: len as u64, mode, move_: 0 };
            // SAFETY: the source is a Mapping, so no Rust reference sees its
            // pages vanish; the destination only gets empty entries filled.
            let r = unsafe { ioctl_update(self.fd(), OP_MOVE, &mut arg) };
            outcome(r, arg.move_, len)
        })
    }

    /// `UFFDIO_POISON`: mark the empty entries of `dst..dst + len` so that any
    /// access raises SIGBUS.
    pub fn poison(&self, dst: usize, len: usize, dontwake: bool) -> Result<usize, Partial> {
        let mode = if dontwake { 1 } else { 0 };
        within_vmas(len, Errno::NOENT, |off, len| {
            let mut arg = uapi::uffdio_poison { range: range(dst + off, len), mode, updated: 0 };
            // SAFETY: UFFDIO_POISON only marks empty entries of registered ranges.
            let r = unsafe { ioctl_update(self.fd(), OP_POISON, &mut arg) };
            outcome(r, arg.updated, len)
        })
    }

    /// `UFFDIO_WAKE`: wake threads waiting on faults in `start..start + len`
    /// (they retry the access).
    pub fn wake(&self, start: usize, len: usize) -> rustix::io::Result<()> {
        let mut arg = range(start, len);
        // SAFETY: UFFDIO_WAKE reads a `uffdio_range` and changes no memory.
        unsafe { ioctl_update(self.fd(), OP_WAKE, &mut arg) }?;
        Ok(())
    }

    /// `UFFDIO_WRITEPROTECT`: set (or clear) write protection of a range
    /// registered in WP mode.
    pub fn writeprotect(&self, start: usize, len: usize, protect: bool, dontwake: bool) -> io::Result<()> {
        let mut mode = 0;
        if protect {
            mode |= 1 << 0;
        }
        if dontwake {
            mode |= 1 << 1;
        }
        let mut arg = uapi::uffdio_writeprotect { range: range(start, len), mode };
        // SAFETY: write protection changes permissions, never contents.
        unsafe { ioctl_update(self.fd(), OP_WRITEPROTECT, &mut arg) }?;
        Ok(())
    }

    /// Reads pending messages without blocking, appending them to `out`.
    /// Returns how many were read (0 when none is pending).
    pub fn read_events(&self, out: &mut Vec<Event>, max: usize) -> io::Result<usize> {
        const MSG: usize = size_of::<uapi::uffd_msg>();
        let mut buf = [0u8; 64 * MSG];
        let want = max.clamp(1, 64) * MSG;
        let n = match rustix::io::read(&self.fd, &mut buf[..want]) {
            Ok(n) => n,
            Err(Errno::AGAIN) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        for msg in buf[..n].chunks_exact(MSG) {
            out.push(parse_msg(msg));
        }
        Ok(n / MSG)
    }
}

/// Parses one `struct uffd_msg` (32 bytes: event byte, padding, then a union).
fn parse_msg(m: &[u8]) -> Event {
    let u64_at = |o: usize| u64::from_ne_bytes(m[o..o + 8].try_into().expect("8 bytes"));
    let u32_at = |o: usize| u32::from_ne_bytes(m[o..o + 4].try_into().expect("4 bytes"));
    const ARG: usize = 8;
    match u32::from(m[0]) {
        uapi::UFFD_EVENT_PAGEFAULT => Event::PageFault {
            write: u64_at(ARG) & u64::from(uapi::UFFD_PAGEFAULT_FLAG_WRITE) != 0,
            addr: u64_at(ARG + 8) as usize,
            tid: u32_at(ARG + 16),
        },
        uapi::UFFD_EVENT_FORK => Event::Fork { fd: u32_at(ARG).cast_signed() },
        uapi::UFFD_EVENT_REMAP => {
            Event::Remap { from: u64_at(ARG) as usize, to: u64_at(ARG + 8) as usize, len: u64_at(ARG + 16) as usize }
        }
        uapi::UFFD_EVENT_REMOVE => Event::Remove { start: u64_at(ARG) as usize, end: u64_at(ARG + 8) as usize },
        uapi::UFFD_EVENT_UNMAP => Event::Unmap { start: u64_at(ARG) as usize, end: u64_at(ARG + 8) as usize },
        _ => Event::Unknown(m[0]),
    }
}

fn api(fd: BorrowedFd<'_>, features: u64) -> io::Result<u64> {
    let mut arg = uapi::uffdio_api { api: u64::from(uapi::UFFD_API), features, ioctls: 0 };
    // SAFETY: UFFDIO_API reads/updates a `uffdio_api` and changes no memory.
    unsafe { ioctl_update(fd, OP_API, &mut arg) }?;
    Ok(arg.features)
}

fn range(start: usize, len: usize) -> uapi::uffdio_range {
    uapi::uffdio_range { start: start as u64, len: len as u64 }
}

/// Runs a resolving ioctl `op(offset, len)` over `0..len`, split where the
/// range crosses a VMA boundary.
///
/// The kernel refuses, before doing anything, a range that is not inside one
/// VMA (`crossing`: `ENOENT` for COPY, ZEROPAGE and POISON, `EINVAL` for
/// MOVE). One protection does not mean one VMA: two VMAs that got different
/// `anon_vma`s while their protections differed never merge again. So a
/// refused multi-page attempt is halved until a piece goes through, and the
/// piece after it is tried up to the end of the refused attempt (a binary
/// search for the boundary, a few ioctls per boundary). A single page that
/// is refused is a real error.
fn within_vmas(
    len: usize,
    crossing: Errno,
    mut op: impl FnMut(usize, usize) -> Result<usize, Partial>,
) -> Result<usize, Partial> {
    use crate::PAGE_SIZE;
    let mut done = 0;
    // The end of the last refused attempt: it crosses a boundary.
    let mut refused_end = len;
    while done < len {
        let want = refused_end.min(len) - done;
        match op(done, want) {
            Ok(_) => {
                done += want;
                if done >= refused_end {
                    refused_end = len;
                }
            }
            Err(p) if p.errno == crossing && p.done == 0 && want > PAGE_SIZE => {
                refused_end = done + (want / 2).next_multiple_of(PAGE_SIZE);
            }
            Err(p) => return Err(Partial { done: done + p.done, errno: p.errno }),
        }
    }
    Ok(len)
}

/// Turns an ioctl result plus its progress field into bytes done or a
/// [`Partial`] error. On error the kernel stores either the bytes done or a
/// negative errno in the progress field.
fn outcome(r: rustix::io::Result<i32>, progress: i64, len: usize) -> Result<usize, Partial> {
    match r {
        Ok(_) => Ok(len),
        Err(errno) => Err(Partial { done: usize::try_from(progress).unwrap_or(0), errno }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;
    use crate::mman::Protection;

    #[test]
    fn open_and_discover_features() {
        let u = Uffd::open(feature::MOVE | feature::POISON | feature::THREAD_ID, Accept::FullOrUserModeOnly)
            .expect("userfaultfd");
        assert!(u.has(feature::MOVE), "this kernel must support UFFDIO_MOVE");
        assert!(u.has(feature::POISON));
        assert!(!u.has(feature::SIGBUS), "a feature not asked for is not enabled");
    }

    #[test]
    fn zeropage_copy_move_and_eexist() {
        let u = Uffd::open(feature::MOVE, Accept::FullOrUserModeOnly).unwrap();
        let region = Mapping::anonymous(4 * PAGE_SIZE, Protection::ReadWrite, PAGE_SIZE).unwrap();
        let stage = Mapping::anonymous(4 * PAGE_SIZE, Protection::ReadWrite, PAGE_SIZE).unwrap();
        u.register(&region, 0, region.len(), false).unwrap();
        u.register(&stage, 0, stage.len(), false).unwrap();
        // zero page over the first two pages, then EEXIST on overlap
        assert_eq!(u.zeropage(region.addr(), 2 * PAGE_SIZE, true), Ok(2 * PAGE_SIZE));
        let err = u.zeropage(region.addr() + PAGE_SIZE, 2 * PAGE_SIZE, true).unwrap_err();
        assert_eq!(err.errno, Errno::EXIST);
        // copy data into page 2, move it to the stage, read it there
        let data = vec![7u8; PAGE_SIZE];
        assert_eq!(u.copy(region.addr() + 2 * PAGE_SIZE, data.as_ptr(), PAGE_SIZE, true), Ok(PAGE_SIZE));
        assert_eq!(u.move_pages(stage.addr(), &region, 2 * PAGE_SIZE, PAGE_SIZE, false, true), Ok(PAGE_SIZE));
        let mut b = [0u8; 4];
        stage.read(0, &mut b).unwrap();
        assert_eq!(b, [7; 4]);
        // a source hole fails without ALLOW_SRC_HOLES and is skipped with it
        let hole = u.move_pages(stage.addr() + PAGE_SIZE, &region, 3 * PAGE_SIZE, PAGE_SIZE, false, true);
        assert_eq!(hole.unwrap_err().errno, Errno::NOENT);
        assert!(u.move_pages(stage.addr() + PAGE_SIZE, &region, 3 * PAGE_SIZE, PAGE_SIZE, true, true).is_ok());
    }

    /// Two VMAs with different `anon_vma`s never merge back, even once
    /// their protections agree again: a range with one protection can still
    /// span two VMAs. Each resolving ioctl must still fill all of it.
    #[test]
    fn ranges_across_unmerged_vmas() {
        let u = Uffd::open(feature::MOVE | feature::POISON, Accept::FullOrUserModeOnly).unwrap();
        let n = 8 * PAGE_SIZE;
        let region = Mapping::anonymous(n, Protection::ReadWrite, PAGE_SIZE).unwrap();
        let stage = Mapping::anonymous(n, Protection::ReadWrite, PAGE_SIZE).unwrap();
        u.register(&region, 0, n, false).unwrap();
        u.register(&stage, 0, n, false).unwrap();
        // Split in three, give the outer two their own anon_vma, rejoin.
        region.protect(3 * PAGE_SIZE, PAGE_SIZE, Protection::Read).unwrap();
        let data = vec![1u8; PAGE_SIZE];
        assert!(u.copy(region.addr(), data.as_ptr(), PAGE_SIZE, false).is_ok());
        assert!(u.copy(region.addr() + 5 * PAGE_SIZE, data.as_ptr(), PAGE_SIZE, false).is_ok());
        region.protect(3 * PAGE_SIZE, PAGE_SIZE, Protection::ReadWrite).unwrap();
        let src: Vec<u8> = (0..n).map(|i| (i / PAGE_SIZE) as u8 + 1).collect();
        let contents = |m: &Mapping| {
            let mut b = vec![0u8; n];
            m.read(0, &mut b).unwrap();
            b
        };
        region.discard(0, n).unwrap();
        assert_eq!(u.copy(region.addr(), src.as_ptr(), n, true), Ok(n), "COPY across VMAs");
        assert_eq!(contents(&region), src);
        assert_eq!(u.move_pages(stage.addr(), &region, 0, n, false, true), Ok(n), "MOVE from across VMAs");
        assert_eq!(contents(&stage), src);
        assert_eq!(u.move_pages(region.addr(), &stage, 0, n, false, true), Ok(n), "MOVE to across VMAs");
        assert_eq!(contents(&region), src);
        region.discard(0, n).unwrap();
        assert_eq!(u.zeropage(region.addr(), n, true), Ok(n), "ZEROPAGE across VMAs");
        // Progress is counted across pieces: a page present at 6 stops the
        // copy there (EAGAIN, as the kernel reports a partial copy).
        region.discard(0, n).unwrap();
        assert!(u.copy(region.addr() + 6 * PAGE_SIZE, data.as_ptr(), PAGE_SIZE, true).is_ok());
        let e = u.copy(region.addr(), src.as_ptr(), n, true).unwrap_err();
        assert_eq!((e.errno, e.done), (Errno::AGAIN, 6 * PAGE_SIZE));
        region.discard(0, n).unwrap();
        assert_eq!(u.poison(region.addr(), n, true), Ok(n), "POISON across VMAs");
    }
}
