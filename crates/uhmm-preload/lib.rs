//! `libuhmm_preload.so`: the library `uhmm run` preloads into a program
//! it cannot change, to put the program's large anonymous memory under
//! uhmm (an address space over the compressed store, with a RAM budget).
//!
//! It exports the C allocator's entry points (`malloc`, `free`, `calloc`,
//! `realloc`, `posix_memalign`, `aligned_alloc`, `memalign`, `valloc`,
//! `pvalloc`, `malloc_usable_size`) and the memory system calls' wrappers
//! (`mmap`, `munmap`, `mremap`, `madvise`, `mprotect`). Requests of at
//! least the minimum size (`UHMM_MIN_SIZE`, 1 MiB by default) for private
//! anonymous read-write memory become uhmm regions; smaller allocations
//! come from uhmm's small-object heap (`heap.rs`) once the runtime
//! exists; everything else goes to glibc's allocator (`__libc_malloc` and
//! kin) or, raw, to the kernel.
//! What is and is not caught: `docs/run.md`.
//!
//! Inside a hook a thread-local flag is set: whatever the hook's own work
//! allocates (uhmm's, the C library's) goes straight to glibc, and so does
//! the Rust code of this library, through its global allocator. The
//! address space is made at the first large request.

mod heap;
mod real;
mod report;
mod runtime;
mod settings;

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use report::Report;
use runtime::{Kind, Runtime, page_up};
use settings::Settings;
use uhmm::PAGE_SIZE;

/// The Rust code of this library allocates from glibc directly, never
/// through its own hooks.
struct Glibc;

// SAFETY: glibc's allocator returns memory of at least the size asked,
// aligned as asked (`memalign` for alignments above its default of 16).
unsafe impl GlobalAlloc for Glibc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= 16 { real::malloc(layout.size()) } else { real::memalign(layout.align(), layout.size()) }
            .cast()
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= 16 {
            real::calloc(1, layout.size()).cast()
        } else {
            // SAFETY: `alloc`'s contract is the caller's.
            let p = unsafe { self.alloc(layout) };
            if !p.is_null() {
                // SAFETY: `p` holds `layout.size()` bytes.
                unsafe { p.write_bytes(0, layout.size()) };
            }
            p
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from `alloc`, so from glibc.
        unsafe { real::free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= 16 {
            // SAFETY: `ptr` came from glibc.
            return unsafe { real::realloc(ptr.cast(), new_size) }.cast();
        }
        // SAFETY: the new layout is valid (the trait's contract).
        let new = unsafe { self.alloc(Layout::from_size_align_unchecked(new_size, layout.align())) };
        if !new.is_null() {
            // SAFETY: both hold at least the smaller size; distinct blocks.
            unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            // SAFETY: `ptr` came from `alloc`.
            unsafe { self.dealloc(ptr, layout) };
        }
        new
    }
}

#[global_allocator]
static GLOBAL: Glibc = Glibc;

thread_local! {
    /// Set while this thread runs a hook.
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// The settings, read when the library is loaded.
static SETTINGS: OnceLock<Settings> = OnceLock::new();
/// The managed memory: made at the first large request; `Err` says why
/// there is none (the program then runs on glibc alone).
static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// Runs `f` with the hook flag set; `None` when the thread is already in
/// a hook (the caller then hands the call on).
fn hooked<T>(f: impl FnOnce() -> T) -> Option<T> {
    let entered = IN_HOOK.try_with(|h| !h.replace(true)).unwrap_or(false);
    if !entered {
        return None;
    }
    let out = f();
    let _ = IN_HOOK.try_with(|h| h.set(false));
    Some(out)
}

/// The runtime, made on first use.
fn runtime() -> Option<&'static Runtime> {
    let settings = SETTINGS.get()?;
    RUNTIME.get_or_init(|| Runtime::new(settings.clone())).as_ref().ok()
}

/// The runtime if it exists already (calls that only look blocks up).
fn runtime_if_made() -> Option<&'static Runtime> {
    RUNTIME.get()?.as_ref().ok()
}

/// Whether a request of `len` bytes is uhmm's to take.
fn large(len: usize) -> bool {
    SETTINGS.get().is_some_and(|s| len >= s.min_size)
}

/// A managed block of `len` bytes aligned to `align`, or null.
fn alloc_managed(len: usize, align: usize) -> *mut c_void {
    if !large(len) {
        return std::ptr::null_mut();
    }
    hooked(|| runtime().map_or(std::ptr::null_mut(), |rt| rt.alloc(len, align, Kind::Malloc)))
        .unwrap_or(std::ptr::null_mut())
}

/// Small requests the C library served before the runtime existed,
/// bytes: past [`SMALL_START`] a small request makes the runtime.
static SMALL_SEEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Small-request bytes after which a program without large requests gets
/// the runtime (and its small objects the heap): short-lived helper
/// processes stay without one.
const SMALL_START: usize = 16 << 20;

thread_local! {
    /// Whether this thread is one of uhmm's own (0: not known yet, 1: no,
    /// 2: yes).
    static UHMM_THREAD: Cell<u8> = const { Cell::new(0) };
}

/// Whether the calling thread is one of uhmm's (named `uhmm-…`): its
/// allocations, made by C code in it (a compressor's), never come from
/// the small-object heap, whose memory uhmm's threads may be moving or
/// serving a fault on, while a program thread holding the heap's lock
/// waits for them.
fn uhmm_thread() -> bool {
    UHMM_THREAD
        .try_with(|k| {
            if k.get() == 0 {
                let mut name = [0u8; 16];
                // SAFETY: PR_GET_NAME writes at most 16 bytes into `name`.
                let ok = unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) } == 0;
                k.set(if ok && name.starts_with(b"uhmm-") { 2 } else { 1 });
            }
            k.get() == 2
        })
        .unwrap_or(true)
}

/// `size` bytes (under the minimum size) from uhmm's small-object heap,
/// or null (the caller asks the C library).
fn alloc_small(size: usize) -> *mut c_void {
    if SETTINGS.get().is_none() || uhmm_thread() {
        return std::ptr::null_mut();
    }
    hooked(|| {
        let rt = match runtime_if_made() {
            Some(rt) => rt,
            None if SMALL_SEEN.fetch_add(size, Ordering::Relaxed) >= SMALL_START => match runtime() {
                Some(rt) => rt,
                None => return std::ptr::null_mut(),
            },
            None => return std::ptr::null_mut(),
        };
        rt.small_alloc(size)
    })
    .unwrap_or(std::ptr::null_mut())
}

/// Frees `ptr` if it is the small-object heap's.
fn free_small(ptr: *mut c_void) -> bool {
    let Some(rt) = runtime_if_made() else { return false };
    hooked(|| rt.small_free(ptr as usize, true)).unwrap_or_else(|| rt.small_free(ptr as usize, false))
}

/// Frees `ptr` if it is a managed block's pointer.
fn free_managed(ptr: *mut c_void) -> bool {
    let addr = ptr as usize;
    // Every managed pointer is page-aligned: most pointers are not.
    if !addr.is_multiple_of(PAGE_SIZE) {
        return false;
    }
    let Some(rt) = runtime_if_made() else { return false };
    // A free from inside a hook (a signal handler that interrupted one)
    // must not wait for the table's lock: a managed block is left to the
    // process's end, and so is any page-aligned pointer while the lock is
    // taken (glibc's `free` of a managed block would be worse).
    hooked(|| rt.free(addr)).unwrap_or_else(|| rt.owns_now(addr).unwrap_or(true))
}

/// `malloc(3)`.
#[unsafe(no_mangle)]
pub extern "C" fn malloc(size: usize) -> *mut c_void {
    let mut p = alloc_managed(size, 16);
    if p.is_null() && !large(size) {
        p = alloc_small(size);
    }
    if p.is_null() { real::malloc(size) } else { p }
}

/// `free(3)`.
///
/// # Safety
/// As the C library's: `ptr` is null or a live allocation.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn free(ptr: *mut c_void) {
    if ptr.is_null() || free_small(ptr) || free_managed(ptr) {
        return;
    }
    // SAFETY: not a managed block, so glibc's (the caller's contract).
    unsafe { real::free(ptr) }
}

/// `calloc(3)`: managed blocks read as zeros until written.
#[unsafe(no_mangle)]
pub extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    let Some(len) = n.checked_mul(size) else {
        real::set_errno(libc::ENOMEM);
        return std::ptr::null_mut();
    };
    let p = alloc_managed(len, 16);
    if !p.is_null() {
        return p;
    }
    let p = if large(len) { std::ptr::null_mut() } else { alloc_small(len) };
    if p.is_null() {
        return real::calloc(n, size);
    }
    // SAFETY: `p` holds `len` bytes just allocated (the heap reuses
    // memory: it must be cleared).
    unsafe { p.cast::<u8>().write_bytes(0, len) };
    p
}

/// The usable size of `ptr`: the small-object heap's, a managed
/// block's, or glibc's.
fn usable_size(ptr: *mut c_void) -> usize {
    if let Some(n) = runtime_if_made().and_then(|rt| hooked(|| rt.small_usable(ptr as usize)).flatten()) {
        return n;
    }
    let managed = if (ptr as usize).is_multiple_of(PAGE_SIZE) {
        runtime_if_made().and_then(|rt| hooked(|| rt.usable(ptr as usize)).flatten())
    } else {
        None
    };
    managed.unwrap_or_else(|| hooked(|| real::malloc_usable_size(ptr)).unwrap_or(0))
}

/// `realloc(3)`: a managed block that has room stays; otherwise the data
/// moves to a new block (managed when the new size is large).
///
/// # Safety
/// As the C library's: `ptr` is null or a live allocation.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    if ptr.is_null() {
        return malloc(size);
    }
    let rt = runtime_if_made();
    let small = rt.is_some_and(|rt| hooked(|| rt.small_owns(ptr as usize)).unwrap_or(false));
    if small && size > 0 && !large(size) {
        // Within the heap when it has room.
        if let Some(q) = rt.and_then(|rt| hooked(|| rt.small_realloc(ptr as usize, size)).flatten()) {
            return q;
        }
    }
    let managed = !small
        && (ptr as usize).is_multiple_of(PAGE_SIZE)
        && rt.is_some_and(|rt| hooked(|| rt.usable(ptr as usize)).flatten().is_some());
    if !small && !managed && !large(size) {
        // SAFETY: glibc's pointer (the caller's contract).
        return unsafe { real::realloc(ptr, size) };
    }
    let old = usable_size(ptr);
    if managed && size <= old && size > 0 {
        return ptr;
    }
    if size == 0 {
        // SAFETY: the caller's contract.
        unsafe { free(ptr) };
        return std::ptr::null_mut();
    }
    let new = malloc(size);
    if !new.is_null() {
        // SAFETY: `ptr` holds `old` bytes, `new` at least `size`; distinct
        // blocks. Faults on the old block's pages bring them back.
        unsafe { std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), new.cast::<u8>(), old.min(size)) };
        // SAFETY: the caller's contract; `ptr` is not used again.
        unsafe { free(ptr) };
    }
    new
}

/// An aligned allocation: managed when large, from the small-object heap
/// when its alignment serves, else glibc's `memalign`.
fn aligned(align: usize, size: usize) -> *mut c_void {
    let mut p = alloc_managed(size, align);
    if p.is_null() && !large(size) && align <= heap::ALIGN {
        p = alloc_small(size);
    }
    if p.is_null() { real::memalign(align, size) } else { p }
}

/// `posix_memalign(3)`.
///
/// # Safety
/// `out` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(size_of::<*mut c_void>()) {
        return libc::EINVAL;
    }
    let p = aligned(align, size);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller's contract.
    unsafe { out.write(p) };
    0
}

/// `aligned_alloc(3)`.
#[unsafe(no_mangle)]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        real::set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    aligned(align, size)
}

/// `memalign(3)`.
#[unsafe(no_mangle)]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    aligned(align.max(1).next_power_of_two(), size)
}

/// `valloc(3)`.
#[unsafe(no_mangle)]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    aligned(PAGE_SIZE, size)
}

/// `pvalloc(3)`.
#[unsafe(no_mangle)]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    match page_up(size.max(1)) {
        Some(len) => aligned(PAGE_SIZE, len),
        None => {
            real::set_errno(libc::ENOMEM);
            std::ptr::null_mut()
        }
    }
}

/// `malloc_usable_size(3)`.
#[unsafe(no_mangle)]
pub extern "C" fn malloc_usable_size(ptr: *mut c_void) -> usize {
    if ptr.is_null() { 0 } else { usable_size(ptr) }
}

/// `mmap(2)`: large private anonymous read-write mappings become managed
/// blocks; a fixed mapping over managed blocks detaches them first.
#[unsafe(no_mangle)]
pub extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    let fixed = flags & libc::MAP_FIXED != 0;
    let plain = flags & !(libc::MAP_NORESERVE | libc::MAP_POPULATE) == libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    if plain && addr.is_null() && prot == libc::PROT_READ | libc::PROT_WRITE && large(len) {
        let p = hooked(|| runtime().map_or(std::ptr::null_mut(), |rt| rt.alloc(len, PAGE_SIZE, Kind::Mmap)));
        if let Some(p) = p.filter(|p| !p.is_null()) {
            return p;
        }
    }
    if fixed && let Some(rt) = runtime_if_made() {
        let range = addr as usize..(addr as usize).saturating_add(len);
        hooked(|| rt.detach_range(range));
    }
    real::mmap(addr, len, prot, flags, fd, off)
}

/// `mmap64`: the same as `mmap` on 64-bit Linux.
#[unsafe(no_mangle)]
pub extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    mmap(addr, len, prot, flags, fd, off)
}

/// The page range of an `addr`, `len` call that touches managed blocks,
/// with the runtime; `None` for calls that go straight to the kernel.
fn managed_call(addr: *mut c_void, len: usize) -> Option<(&'static Runtime, std::ops::Range<usize>)> {
    let start = addr as usize;
    if !start.is_multiple_of(PAGE_SIZE) {
        return None;
    }
    let range = start..start.checked_add(page_up(len)?)?;
    let rt = runtime_if_made()?;
    hooked(|| rt.touches(&range)).unwrap_or(false).then_some((rt, range))
}

/// `munmap(2)`: managed blocks are freed (or their pages unmapped).
#[unsafe(no_mangle)]
pub extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
    match managed_call(addr, len) {
        Some((rt, range)) => hooked(|| rt.munmap(range)).unwrap_or(0),
        None => real::munmap(addr, len),
    }
}

/// `madvise(2)`: advice that drops pages of managed blocks goes through
/// uhmm.
#[unsafe(no_mangle)]
pub extern "C" fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    match managed_call(addr, len) {
        Some((rt, range)) => hooked(|| rt.madvise(range, advice)).unwrap_or(0),
        None => real::madvise(addr, len, advice),
    }
}

/// `mprotect(2)` through uhmm for managed blocks.
#[unsafe(no_mangle)]
pub extern "C" fn mprotect(addr: *mut c_void, len: usize, prot: c_int) -> c_int {
    match managed_call(addr, len) {
        Some((rt, range)) => hooked(|| rt.mprotect(range, prot)).unwrap_or(0),
        None => real::mprotect(addr, len, prot),
    }
}

/// `mremap(2)`: a managed block is detached into plain memory first (uhmm
/// does not follow a block that moves).
///
/// # Safety
/// As the C library's: a fifth argument is read only with `MREMAP_FIXED`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new: *mut c_void,
) -> *mut c_void {
    if let Some((rt, range)) = managed_call(old, old_len) {
        hooked(|| rt.detach_range(range));
    }
    if flags & libc::MREMAP_FIXED != 0
        && let Some((rt, range)) = managed_call(new, new_len)
    {
        hooked(|| rt.detach_range(range));
    }
    real::mremap(old, old_len, new_len, flags, new)
}

/// At exit: a far store's values are removed, and the report written where
/// `uhmm run` asked for it (`UHMM_REPORT/PID.json`), from every process
/// that made a runtime or failed to (a forked child's memory is its
/// parent's to report).
extern "C" fn at_exit() {
    let _ = hooked(|| {
        let report = match RUNTIME.get() {
            None => return,
            Some(Ok(rt)) if rt.forked.load(Ordering::Relaxed) => return,
            Some(Ok(rt)) => {
                let report = rt.report();
                rt.close_store();
                report
            }
            Some(Err(e)) => Report { error: Some(e.clone()), ..Report::default() },
        };
        let Some(dir) = SETTINGS.get().and_then(|s| s.report.clone()) else { return };
        let report = Report { pid: std::process::id(), ..report };
        if let Ok(json) = serde_json::to_vec(&report) {
            let _ = std::fs::write(dir.join(format!("{}.json", report.pid)), json);
        }
    });
}

extern "C" fn before_fork() {
    if let Some(rt) = runtime_if_made() {
        rt.lock_for_fork();
    }
}

extern "C" fn after_fork_parent() {
    if let Some(rt) = runtime_if_made() {
        rt.unlock_after_fork(false);
    }
}

extern "C" fn after_fork_child() {
    if let Some(rt) = runtime_if_made() {
        rt.unlock_after_fork(true);
    }
}

/// Runs when the library is loaded: reads the settings, arranges the
/// report at exit and the block table's handling across `fork`.
extern "C" fn on_load() {
    hooked(|| match Settings::from_env() {
        Ok(s) => {
            let _ = SETTINGS.set(s);
            // SAFETY: plain `extern "C"` functions of this library, which
            // stays loaded to the end.
            unsafe {
                libc::atexit(at_exit);
                libc::pthread_atfork(Some(before_fork), Some(after_fork_parent), Some(after_fork_child));
            }
        }
        Err(e) => eprintln!("uhmm: {e}; running without uhmm"),
    });
}

#[used]
#[unsafe(link_section = ".init_array")]
static ON_LOAD: extern "C" fn() = on_load;
