//! The CUDA device's memory: `cuMemAlloc` in chunks (2 MiB blocks, as
//! UVM's), taken when first needed, each handing out its pages; a
//! next-fit page allocator, so pages allocated in a row are contiguous and
//! a run is one copy. A chunk whose pages are all free is kept for reuse
//! and freed with the device.

use uhmm::{DevicePfn, ErrorKind, PAGE_SIZE, Result};

use super::api::{DevPtr, GpuApi};

/// One `cuMemAlloc` allocation and its pages.
#[derive(Debug)]
struct Chunk {
    ptr: DevPtr,
    used: usize,
    free: Vec<bool>,
}

/// Device memory in chunks: page `pfn` is page `pfn % chunk_pages` of
/// chunk `pfn / chunk_pages`.
#[derive(Debug)]
pub(crate) struct Chunks {
    chunk_pages: usize,
    chunks: Vec<Option<Chunk>>,
    /// Where the next search starts (next-fit).
    cursor: u64,
    in_use: usize,
}

impl Chunks {
    /// Room for `max_chunks` chunks of `chunk_bytes` bytes.
    pub(crate) fn new(chunk_bytes: usize, max_chunks: usize) -> Chunks {
        Chunks {
            chunk_pages: chunk_bytes / PAGE_SIZE,
            chunks: (0..max_chunks).map(|_| None).collect(),
            cursor: 0,
            in_use: 0,
        }
    }

    /// Allocates a page, next to the last one where it can, taking a new
    /// chunk from `api` when the chunks held are full. `Ok(None)`: the
    /// device is full (no chunk left, or `cuMemAlloc` out of memory).
    pub(crate) fn alloc_page(&mut self, api: &dyn GpuApi) -> Result<Option<DevicePfn>> {
        let n = self.chunks.len() * self.chunk_pages;
        if n == 0 {
            return Ok(None);
        }
        for k in 0..n as u64 {
            let pfn = (self.cursor + k) % n as u64;
            let (c, p) = ((pfn as usize) / self.chunk_pages, (pfn as usize) % self.chunk_pages);
            match &mut self.chunks[c] {
                Some(chunk) if chunk.free[p] => {
                    chunk.free[p] = false;
                    chunk.used += 1;
                    return Ok(Some(self.took(pfn)));
                }
                Some(chunk) if chunk.used == self.chunk_pages => {
                    // Skip the rest of a full chunk.
                    continue;
                }
                _ => {}
            }
        }
        // Every chunk held is full: take a new one.
        let Some(c) = self.chunks.iter().position(Option::is_none) else { return Ok(None) };
        let ptr = match api.alloc(self.chunk_pages * PAGE_SIZE) {
            Ok(ptr) => ptr,
            Err(e) if e.kind() == ErrorKind::NoMemory => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut free = vec![true; self.chunk_pages];
        free[0] = false;
        self.chunks[c] = Some(Chunk { ptr, used: 1, free });
        Ok(Some(self.took((c * self.chunk_pages) as u64)))
    }

    fn took(&mut self, pfn: u64) -> DevicePfn {
        self.cursor = pfn + 1;
        self.in_use += 1;
        DevicePfn(pfn)
    }

    /// Frees a page; false if it was not allocated.
    pub(crate) fn free(&mut self, pfn: DevicePfn) -> bool {
        let (c, p) = ((pfn.0 as usize) / self.chunk_pages, (pfn.0 as usize) % self.chunk_pages);
        match self.chunks.get_mut(c) {
            Some(Some(chunk)) if !chunk.free[p] => {
                chunk.free[p] = true;
                chunk.used -= 1;
                self.in_use -= 1;
                true
            }
            _ => false,
        }
    }

    /// The device address of an allocated page.
    pub(crate) fn locate(&self, pfn: DevicePfn) -> Option<DevPtr> {
        let (c, p) = ((pfn.0 as usize) / self.chunk_pages, (pfn.0 as usize) % self.chunk_pages);
        match self.chunks.get(c) {
            Some(Some(chunk)) if !chunk.free[p] => Some(chunk.ptr + (p * PAGE_SIZE) as u64),
            _ => None,
        }
    }

    /// Pages allocated.
    pub(crate) fn in_use(&self) -> usize {
        self.in_use
    }

    /// Chunks taken from the GPU.
    pub(crate) fn chunks_held(&self) -> usize {
        self.chunks.iter().flatten().count()
    }

    /// Frees every chunk none of whose pages is in use.
    pub(crate) fn trim(&mut self, api: &dyn GpuApi) {
        let bytes = self.chunk_pages * PAGE_SIZE;
        for slot in &mut self.chunks {
            if slot.as_ref().is_some_and(|c| c.used == 0)
                && let Some(chunk) = slot.take()
            {
                api.free(chunk.ptr, bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::{FakeConfig, FakeGpu};

    #[test]
    fn chunks_are_taken_when_needed_and_reused() {
        let gpu = FakeGpu::new(FakeConfig { capacity_bytes: 4 << 20, ..FakeConfig::default() }).unwrap();
        let mut mem = Chunks::new(2 << 20, 4);
        let pfns: Vec<_> = (0..512).map(|_| mem.alloc_page(&gpu).unwrap().unwrap()).collect();
        assert_eq!(mem.chunks_held(), 1, "one chunk holds 512 pages");
        assert!(pfns.windows(2).all(|w| w[1].0 == w[0].0 + 1), "pages in a row are contiguous");
        let a = mem.locate(pfns[0]).unwrap();
        assert_eq!(mem.locate(pfns[511]), Some(a + 511 * PAGE_SIZE as u64));
        let extra = mem.alloc_page(&gpu).unwrap().unwrap();
        assert_eq!((mem.chunks_held(), gpu.stats().allocs), (2, 2));
        // The GPU has room for two chunks only: the device is full, not failed.
        let more: Vec<_> = (0..511).map(|_| mem.alloc_page(&gpu).unwrap().unwrap()).collect();
        assert_eq!(mem.alloc_page(&gpu).unwrap(), None);
        for &p in pfns.iter().chain(&more).chain([&extra]) {
            assert!(mem.free(p));
        }
        assert!(!mem.free(extra), "a double free is refused");
        assert_eq!(mem.in_use(), 0);
        // Freed chunks are reused, not allocated again.
        for _ in 0..1024 {
            mem.alloc_page(&gpu).unwrap().unwrap();
        }
        assert_eq!(gpu.stats().allocs, 2);
        assert_eq!(mem.locate(DevicePfn(4 * 512)), None);
    }

    #[test]
    fn trim_gives_empty_chunks_back() {
        let gpu = FakeGpu::new(FakeConfig::default()).unwrap();
        let mut mem = Chunks::new(2 << 20, 8);
        let p = mem.alloc_page(&gpu).unwrap().unwrap();
        mem.trim(&gpu);
        assert_eq!(mem.chunks_held(), 1, "a chunk in use stays");
        mem.free(p);
        mem.trim(&gpu);
        assert_eq!((mem.chunks_held(), gpu.used_bytes(), gpu.stats().frees), (0, 0, 1));
    }
}
