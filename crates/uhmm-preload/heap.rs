//! The small-object heap: allocations under the minimum size, carved
//! (TLSF, the `rlsf` crate) out of chunks of memory uhmm manages, so that
//! a program made of many small objects — redis's values, sqlite's pages —
//! is tiered as a whole and not only its large blocks. Each allocation
//! carries a 16-byte header with its size (`malloc_usable_size`); the
//! allocator's own headers sit in the chunks too, so they are tiered with
//! the data. The runtime holds the heap under its lock.

use std::alloc::Layout;
use std::ptr::NonNull;

use rlsf::Tlsf;
use uhmm::Region;

/// The bytes of one chunk (a uhmm region, managed by the tier when there
/// is one); a larger request gets a chunk of its own size.
pub(crate) const CHUNK: usize = 64 << 20;

/// Bytes before each allocation: its size. Keeps the allocation 16-byte
/// aligned, as glibc's are.
const HEADER: usize = 16;

/// Alignment of every allocation (and of its header).
pub(crate) const ALIGN: usize = 16;

/// The heap: the allocator over its chunks.
pub(crate) struct Heap {
    /// Blocks up to 512 MiB (32-byte granularity, 24 first-level lists).
    tlsf: Tlsf<'static, u32, u32, 24, 16>,
    chunks: Vec<Region>,
}

// SAFETY: the allocator holds pointers into the chunks, which the heap
// owns (they live as long as it); the runtime uses it under a lock, from
// one thread at a time.
unsafe impl Send for Heap {}

impl Heap {
    pub(crate) fn new() -> Heap {
        Heap { tlsf: Tlsf::new(), chunks: Vec::new() }
    }

    /// Whether `addr` lies in one of the chunks.
    pub(crate) fn owns(&self, addr: usize) -> bool {
        self.chunks.iter().any(|c| c.range().contains(&addr))
    }

    /// The bytes of chunk a request of `size` bytes needs.
    pub(crate) fn chunk_for(size: usize) -> usize {
        CHUNK.max((size + HEADER + uhmm::PAGE_SIZE).next_multiple_of(uhmm::PAGE_SIZE))
    }

    /// Gives the heap a chunk of memory.
    pub(crate) fn add_chunk(&mut self, region: Region) {
        let Some(start) = NonNull::new(region.as_ptr()) else { return };
        let block = NonNull::slice_from_raw_parts(start, region.len());
        // SAFETY: the region's memory is the heap's from now on (the chunk
        // is kept in `chunks` for the heap's life and nothing else uses it).
        unsafe { self.tlsf.insert_free_block_ptr(block) };
        self.chunks.push(region);
    }

    /// `size` bytes, 16-byte aligned; `None` when no chunk has room.
    pub(crate) fn alloc(&mut self, size: usize) -> Option<NonNull<u8>> {
        let layout = Layout::from_size_align(size.checked_add(HEADER)?, ALIGN).ok()?;
        let base = self.tlsf.allocate(layout)?;
        // SAFETY: `base` starts `size + HEADER` bytes this call owns,
        // aligned to 16: the header fits, and the caller's bytes follow.
        unsafe {
            base.cast::<u64>().write(size as u64);
            Some(base.add(HEADER))
        }
    }

    /// The size `ptr` was allocated (or reallocated) with.
    ///
    /// # Safety
    /// `ptr` is a live allocation of this heap.
    pub(crate) unsafe fn usable(ptr: NonNull<u8>) -> usize {
        // SAFETY: the header precedes every allocation (the caller's
        // contract that `ptr` is one).
        unsafe { ptr.sub(HEADER).cast::<u64>().read() as usize }
    }

    /// Frees `ptr`.
    ///
    /// # Safety
    /// `ptr` is a live allocation of this heap, not used again.
    pub(crate) unsafe fn free(&mut self, ptr: NonNull<u8>) {
        // SAFETY: the caller's contract; allocated with `ALIGN`.
        unsafe { self.tlsf.deallocate(ptr.sub(HEADER), ALIGN) }
    }

    /// Resizes `ptr` to `size` bytes, in place or moved within the heap;
    /// `None` (nothing changed) when no chunk has room.
    ///
    /// # Safety
    /// `ptr` is a live allocation of this heap; on success it is not used
    /// again (the result replaces it).
    pub(crate) unsafe fn realloc(&mut self, ptr: NonNull<u8>, size: usize) -> Option<NonNull<u8>> {
        let layout = Layout::from_size_align(size.checked_add(HEADER)?, ALIGN).ok()?;
        // SAFETY: the caller's contract; allocated with `ALIGN`.
        let base = unsafe { self.tlsf.reallocate(ptr.sub(HEADER), layout) }?;
        // SAFETY: as in `alloc`.
        unsafe {
            base.cast::<u64>().write(size as u64);
            Some(base.add(HEADER))
        }
    }

    /// Bytes of memory the heap's chunks take.
    pub(crate) fn bytes(&self) -> usize {
        self.chunks.iter().map(Region::len).sum()
    }
}
