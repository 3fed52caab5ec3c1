//! The sim device's memory and its page allocator.
//!
//! Device memory is host RAM the program cannot reach through its regions,
//! added in chunks (populated at once, as device memory exists before it is
//! used) up to a capacity. Free pages are a bitmap searched next-fit: pages
//! allocated one after another are contiguous and ascending, so a run of
//! them goes back to RAM in one copy; and a 2 MiB block whose pages were all
//! freed, one by one or together, serves as a compound page again.

use std::sync::Arc;

use uhmm::{DevicePfn, PAGE_SIZE};
use uhmm::{Mapping, Protection};

use super::dma::DevMem;

/// Pages in a compound device page (2 MiB).
pub(crate) const HUGE_PAGES: usize = uhmm::HUGE_SIZE / PAGE_SIZE;

/// Chunks of device memory and which of their pages are free.
#[derive(Debug)]
pub(crate) struct Memory {
    chunk_pages: usize,
    max_chunks: usize,
    chunks: Vec<Arc<Mapping>>,
    /// One bit a page, set while the page is free.
    free: Vec<u64>,
    nfree: usize,
    /// Where the next small-page search starts (a word of `free`).
    cursor: usize,
    /// Where the next compound-page search starts (a block index).
    huge_cursor: usize,
}

impl Memory {
    /// No memory yet; chunks of `chunk_bytes` are added up to `capacity_bytes`
    /// (both page multiples, checked by the device).
    pub(crate) fn new(chunk_bytes: usize, capacity_bytes: usize) -> Memory {
        Memory {
            chunk_pages: chunk_bytes / PAGE_SIZE,
            max_chunks: capacity_bytes / chunk_bytes,
            chunks: Vec::new(),
            free: Vec::new(),
            nfree: 0,
            cursor: 0,
            huge_cursor: 0,
        }
    }

    /// Pages in the chunks added so far.
    pub(crate) fn pages(&self) -> usize {
        self.chunks.len() * self.chunk_pages
    }

    /// Pages allocated and not freed.
    pub(crate) fn in_use(&self) -> usize {
        self.pages() - self.nfree
    }

    /// Allocates a page: the first free one from where the last search
    /// ended, adding a chunk when none is free. `None` at capacity.
    pub(crate) fn alloc_page(&mut self) -> Option<DevicePfn> {
        if self.nfree == 0 && !self.grow() {
            return None;
        }
        let words = self.free.len();
        let w = (0..words).map(|k| (self.cursor + k) % words).find(|&w| self.free[w] != 0)?;
        let pfn = w * 64 + self.free[w].trailing_zeros() as usize;
        self.free[w] &= self.free[w] - 1;
        self.nfree -= 1;
        self.cursor = w;
        Some(DevicePfn(pfn as u64))
    }

    /// Allocates a compound page: `HUGE_PAGES` free pages, contiguous and
    /// aligned in one chunk, adding a chunk when no such block is free.
    /// Returns its first page; `None` when none can be had.
    pub(crate) fn alloc_huge(&mut self) -> Option<u64> {
        let per_chunk = self.chunk_pages / HUGE_PAGES;
        let blocks = self.chunks.len() * per_chunk;
        let chunk_pages = self.chunk_pages;
        let base = move |b: usize| (b / per_chunk) * chunk_pages + (b % per_chunk) * HUGE_PAGES;
        let found = (0..blocks).map(|k| (self.huge_cursor + k) % blocks).find(|&b| self.all_free(base(b)));
        let block = match found {
            Some(b) => b,
            None if per_chunk > 0 && self.grow() => blocks,
            None => return None,
        };
        self.huge_cursor = block;
        let first = base(block);
        self.set(first..first + HUGE_PAGES, false);
        self.nfree -= HUGE_PAGES;
        Some(first as u64)
    }

    /// Frees a page. False (and nothing changes) if it was not allocated.
    pub(crate) fn free(&mut self, pfn: DevicePfn) -> bool {
        let Some(p) = usize::try_from(pfn.0).ok().filter(|&p| p < self.pages()) else {
            return false;
        };
        let (w, bit) = (p / 64, 1u64 << (p % 64));
        if self.free[w] & bit != 0 {
            return false;
        }
        self.free[w] |= bit;
        self.nfree += 1;
        true
    }

    /// Where page `pfn` is (`None` if no chunk holds it).
    pub(crate) fn page(&self, pfn: DevicePfn) -> Option<DevMem> {
        self.locate(pfn).map(|(chunk, off)| DevMem { chunk: chunk.clone(), off })
    }

    /// Where page `pfn` is, borrowed: its chunk and its offset there.
    pub(crate) fn locate(&self, pfn: DevicePfn) -> Option<(&Arc<Mapping>, usize)> {
        let p = usize::try_from(pfn.0).ok()?;
        let chunk = self.chunks.get(p / self.chunk_pages)?;
        Some((chunk, (p % self.chunk_pages) * PAGE_SIZE))
    }

    /// Adds a chunk, all free. False at capacity or when the host has no
    /// memory for it.
    fn grow(&mut self) -> bool {
        if self.chunks.len() >= self.max_chunks {
            return false;
        }
        let bytes = self.chunk_pages * PAGE_SIZE;
        let Ok(chunk) = Mapping::anonymous(bytes, Protection::ReadWrite, uhmm::HUGE_SIZE) else {
            return false;
        };
        let _ = chunk.advise_huge(0, bytes);
        if let Err(err) = chunk.populate_write(0, bytes) {
            tracing::warn!(%err, "sim device memory could not be populated up front");
        }
        let first = self.pages();
        self.chunks.push(Arc::new(chunk));
        self.free.resize(self.pages().div_ceil(64), 0);
        self.set(first..self.pages(), true);
        self.nfree += self.chunk_pages;
        true
    }

    fn all_free(&self, first: usize) -> bool {
        (first..first + HUGE_PAGES).step_by(64).all(|p| {
            let n = (first + HUGE_PAGES - p).min(64);
            self.bits(p, n) == mask(n)
        })
    }

    /// The `n` (at most 64) bits from page `p`, low bit first.
    fn bits(&self, p: usize, n: usize) -> u64 {
        let (w, s) = (p / 64, p % 64);
        let lo = self.free[w] >> s;
        let hi = if s > 0 && s + n > 64 { self.free[w + 1] << (64 - s) } else { 0 };
        (lo | hi) & mask(n)
    }

    fn set(&mut self, pages: std::ops::Range<usize>, free: bool) {
        for p in pages {
            let (w, bit) = (p / 64, 1u64 << (p % 64));
            if free {
                self.free[w] |= bit;
            } else {
                self.free[w] &= !bit;
            }
        }
    }
}

fn mask(n: usize) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_come_in_order_and_blocks_rebuild() {
        let mut mem = Memory::new(2 * uhmm::HUGE_SIZE, 4 * uhmm::HUGE_SIZE);
        let a: Vec<u64> = (0..600).map(|_| mem.alloc_page().unwrap().0).collect();
        assert!(a.iter().enumerate().all(|(i, p)| *p == i as u64), "ascending and contiguous");
        assert_eq!(mem.pages(), 2 * HUGE_PAGES);
        // The first block is split: the compound page is the next whole one (a new chunk).
        assert_eq!(mem.alloc_huge(), Some(2 * HUGE_PAGES as u64));
        // Free the first block page by page, in any order: it is whole again.
        for p in (0..HUGE_PAGES as u64).rev() {
            assert!(mem.free(DevicePfn(p)));
        }
        assert!(!mem.free(DevicePfn(0)), "double free refused");
        assert!(!mem.free(DevicePfn(1 << 40)), "out of range refused");
        // Next-fit: the new chunk's second block, then the rebuilt first one.
        assert_eq!(mem.alloc_huge(), Some(3 * HUGE_PAGES as u64));
        assert_eq!(mem.alloc_huge(), Some(0));
        assert_eq!(mem.alloc_huge(), None, "at capacity");
        assert_eq!(mem.in_use(), 600 - HUGE_PAGES + 3 * HUGE_PAGES);
        let left = mem.pages() - mem.in_use();
        for _ in 0..left {
            assert!(mem.alloc_page().is_some());
        }
        assert_eq!(mem.alloc_page(), None);
        assert_eq!(mem.page(DevicePfn(3)).map(|m| m.off), Some(3 * PAGE_SIZE));
    }

    #[test]
    fn chunks_that_are_not_whole_words_or_blocks() {
        // 3 pages a chunk: no compound pages, bits across word boundaries.
        let mut mem = Memory::new(3 * PAGE_SIZE, 90 * PAGE_SIZE);
        assert_eq!(mem.alloc_huge(), None);
        let all: Vec<u64> = std::iter::from_fn(|| mem.alloc_page()).map(|p| p.0).collect();
        assert_eq!(all, (0..90).collect::<Vec<_>>());
        assert!(mem.free(DevicePfn(70)));
        assert_eq!(mem.alloc_page(), Some(DevicePfn(70)));
    }
}
