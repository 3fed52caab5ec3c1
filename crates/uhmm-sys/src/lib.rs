//! uhmm-sys: the system-call layer of uhmm, the only crate of uhmm's core
//! with `unsafe`.
//!
//! Thin, audited wrappers over `rustix` and `linux-raw-sys` for what uhmm
//! needs from the kernel: userfaultfd ([`uffd`]), mappings and `madvise`
//! ([`mman`]), the `PAGEMAP_SCAN` residency query ([`pagemap`]), page pins
//! ([`pin`]) and CPU placement, `fork` and `pthread_atfork` ([`process`]);
//! the SIGBUS handler for faults answered in the faulting thread
//! ([`signal`]); what a thread does after the host stopped its vCPU
//! ([`stall`]); and a page store's file: private files and `O_DIRECT`
//! ([`file`](mod@file)), batched reads and writes with io_uring ([`uring`]); with the `cuda` feature, the CUDA driver calls of the CUDA
//! device (`cuda`). Each
//! wrapper opens with the call it is; each `unsafe` block argues why it is
//! sound. Nothing here knows about regions, page tables or devices. It is a
//! crate of its own, as rustix is, so that drivers, benchmarks (a raw
//! userfaultfd round trip with the same calls uhmm uses) and tests can use
//! the calls without the core's public API carrying them.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod file;
pub mod mman;
pub mod pagemap;
pub mod pin;
pub mod process;
pub mod signal;
pub mod stall;
pub mod uffd;
pub mod uring;

/// The base page size uhmm works in. [`check_page_size`] verifies that the
/// running kernel agrees.
pub const PAGE_SIZE: usize = 4096;

/// The size of a huge page (a PMD) on x86-64 and arm64 with 4 KiB pages.
pub const HUGE_SIZE: usize = 2 << 20;

/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;

/// Fails unless the kernel's base page size is [`PAGE_SIZE`].
pub fn check_page_size() -> std::io::Result<()> {
    let size = rustix::param::page_size();
    if size == PAGE_SIZE {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("uhmm needs {PAGE_SIZE}-byte base pages; this kernel uses {size}")))
    }
}

/// Issues an `ioctl` whose argument is a `T` the kernel reads and updates.
///
/// Returns the ioctl's non-negative return value.
///
/// # Safety
///
/// `opcode` must be an ioctl of `fd` whose argument is a `T`, and the
/// operation it performs on memory named inside `arg` must be sound for the
/// caller (each wrapper argues this).
unsafe fn ioctl_update<T>(
    fd: std::os::fd::BorrowedFd<'_>,
    opcode: rustix::ioctl::Opcode,
    arg: &mut T,
) -> rustix::io::Result<i32> {
    struct Update<'a, T> {
        opcode: rustix::ioctl::Opcode,
        arg: &'a mut T,
    }
    // SAFETY: `as_ptr` hands the kernel a pointer to a live, exclusively
    // borrowed `T`, and the output is only the integer return value.
    unsafe impl<T> rustix::ioctl::Ioctl for Update<'_, T> {
        type Output = i32;
        const IS_MUTATING: bool = true;
        fn opcode(&self) -> rustix::ioctl::Opcode {
            self.opcode
        }
        fn as_ptr(&mut self) -> *mut core::ffi::c_void {
            (self.arg as *mut T).cast()
        }
        unsafe fn output_from_ptr(
            out: rustix::ioctl::IoctlOutput,
            _: *mut core::ffi::c_void,
        ) -> rustix::io::Result<i32> {
            Ok(out)
        }
    }
    // SAFETY: forwarded to the caller (see `# Safety`).
    unsafe { rustix::ioctl::ioctl(fd, Update { opcode, arg }) }
}

/// Runs `f` on a thread of its own; fails the test if it takes more than
/// `secs` (tests that wait on I/O run under it).
#[cfg(test)]
pub(crate) fn with_timeout<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(v) => {
            t.join().expect("test thread");
            v
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("test hung: no result after {secs} s"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match t.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("sender dropped without sending"),
        },
    }
}
