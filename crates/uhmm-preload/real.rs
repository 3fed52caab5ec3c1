//! The calls the hooks hand on: glibc's own allocator (its `__libc_*`
//! entry points, which no preloaded library can take over) and the
//! memory system calls, made raw so that they reach the kernel whatever
//! else is preloaded (`libc::syscall` returns -1 with `errno` set, as the
//! C library's wrappers do).

use std::ffi::{c_int, c_void};

unsafe extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_free(ptr: *mut c_void);
    fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    fn __libc_realloc(ptr: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
}

/// glibc's `malloc`.
pub(crate) fn malloc(size: usize) -> *mut c_void {
    // SAFETY: glibc's allocator takes any size; a null result is its answer.
    unsafe { __libc_malloc(size) }
}

/// glibc's `free`.
///
/// # Safety
/// `ptr` is null or came from glibc's allocator and is not used again.
pub(crate) unsafe fn free(ptr: *mut c_void) {
    // SAFETY: the caller's contract.
    unsafe { __libc_free(ptr) }
}

/// glibc's `calloc`.
pub(crate) fn calloc(n: usize, size: usize) -> *mut c_void {
    // SAFETY: glibc checks the product for overflow.
    unsafe { __libc_calloc(n, size) }
}

/// glibc's `realloc`.
///
/// # Safety
/// `ptr` is null or came from glibc's allocator.
pub(crate) unsafe fn realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: the caller's contract.
    unsafe { __libc_realloc(ptr, size) }
}

/// glibc's `memalign` (behind `posix_memalign`, `aligned_alloc`, `valloc`).
pub(crate) fn memalign(align: usize, size: usize) -> *mut c_void {
    // SAFETY: glibc rejects bad alignments with a null result.
    unsafe { __libc_memalign(align, size) }
}

/// glibc's `malloc_usable_size`, found once by its glibc symbol version
/// (`dlvsym`: glibc has no `__libc_` name for it, and a plain lookup could
/// find another allocator's, jemalloc's in `redis-server`). Called inside
/// a hook, so that what the lookup allocates goes to glibc.
pub(crate) fn malloc_usable_size(ptr: *mut c_void) -> usize {
    type F = unsafe extern "C" fn(*mut c_void) -> usize;
    static REAL: std::sync::OnceLock<Option<F>> = std::sync::OnceLock::new();
    let f = REAL.get_or_init(|| {
        // SAFETY: NUL-terminated name and version; x86-64 glibc has
        // defined the function at this version since its first release.
        let sym = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"malloc_usable_size".as_ptr(), c"GLIBC_2.2.5".as_ptr()) };
        // SAFETY: the symbol is glibc's `malloc_usable_size`, of this type.
        (!sym.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, F>(sym) })
    });
    // SAFETY: `ptr` is the caller's, and glibc's (the hooks route only
    // glibc's pointers here).
    f.map_or(0, |f| unsafe { f(ptr) })
}

/// `mmap(2)`, raw.
pub(crate) fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    // SAFETY: the kernel checks every argument; mapping over memory the
    // program owns is the program's request, as with glibc's mmap.
    unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) as *mut c_void }
}

/// `munmap(2)`, raw.
pub(crate) fn munmap(addr: *mut c_void, len: usize) -> c_int {
    // SAFETY: as `mmap`: the program's own request.
    unsafe { libc::syscall(libc::SYS_munmap, addr, len) as c_int }
}

/// `mremap(2)`, raw.
pub(crate) fn mremap(old: *mut c_void, old_len: usize, new_len: usize, flags: c_int, new: *mut c_void) -> *mut c_void {
    // SAFETY: as `mmap`: the program's own request.
    unsafe { libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new) as *mut c_void }
}

/// `madvise(2)`, raw.
pub(crate) fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    // SAFETY: as `mmap`: the program's own request.
    unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) as c_int }
}

/// `mprotect(2)`, raw.
pub(crate) fn mprotect(addr: *mut c_void, len: usize, prot: c_int) -> c_int {
    // SAFETY: as `mmap`: the program's own request.
    unsafe { libc::syscall(libc::SYS_mprotect, addr, len, prot) as c_int }
}

/// Sets `errno`.
pub(crate) fn set_errno(e: c_int) {
    // SAFETY: `__errno_location` is the calling thread's errno.
    unsafe { *libc::__errno_location() = e }
}
