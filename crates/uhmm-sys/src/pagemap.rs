//! Residency queries with the `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap`.
//!
//! One call reports, for a whole range, the runs of pages that share a set
//! of categories (present, swapped, zero page, huge, ...), at tens of
//! nanoseconds a page, instead of a read per page.
//!
//! # References
//!
//! Documentation/admin-guide/mm/pagemap.rst ("PAGEMAP_SCAN IOCTL").

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use linux_raw_sys::general as uapi;
use rustix::ioctl::{Opcode, opcode};

use super::ioctl_update;

const OP_PAGEMAP_SCAN: Opcode = opcode::read_write::<uapi::pm_scan_arg>(b'f', 16);

/// `PAGE_IS_*` category bits.
pub mod category {
    use linux_raw_sys::general as uapi;
    /// The page is mapped in memory.
    pub const PRESENT: u64 = uapi::PAGE_IS_PRESENT as u64;
    /// The page is in swap.
    pub const SWAPPED: u64 = uapi::PAGE_IS_SWAPPED as u64;
    /// The entry maps the shared zero page.
    pub const PFNZERO: u64 = uapi::PAGE_IS_PFNZERO as u64;
    /// The page is part of a huge page mapping.
    pub const HUGE: u64 = uapi::PAGE_IS_HUGE as u64;
    /// The page is file-backed (or shared memory).
    pub const FILE: u64 = uapi::PAGE_IS_FILE as u64;
    /// The page is not write-protected by userfaultfd: written since its
    /// protection was last set (`UFFD_FEATURE_WP_ASYNC`), or never protected.
    pub const WRITTEN: u64 = uapi::PAGE_IS_WRITTEN as u64;
}

/// A run of pages `start..end` with the same `categories` (masked by the
/// query's return mask).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// First address.
    pub start: usize,
    /// End address (exclusive).
    pub end: usize,
    /// `PAGE_IS_*` bits.
    pub categories: u64,
}

/// An open `/proc/self/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

/// What to look for: a page matches when, after inverting `inverted`, all
/// of `mask` and (if not empty) one of `anyof` are set.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query {
    /// Categories that must all be set (after inversion).
    pub mask: u64,
    /// Categories to invert before matching (to ask for "not present").
    pub inverted: u64,
    /// Categories of which at least one must be set.
    pub anyof: u64,
    /// Categories to report in each run.
    pub report: u64,
}

impl Query {
    /// Every page, reporting the `report` categories of each run.
    pub fn all(report: u64) -> Query {
        Query { report, ..Query::default() }
    }

    /// Pages with at least one of `cats`.
    pub fn any_of(cats: u64) -> Query {
        Query { anyof: cats, ..Query::default() }
    }

    /// Pages with none of `cats`.
    pub fn none_of(cats: u64) -> Query {
        Query { mask: cats, inverted: cats, ..Query::default() }
    }
}

impl Pagemap {
    /// Opens `/proc/self/pagemap`.
    pub fn open() -> io::Result<Pagemap> {
        Ok(Pagemap { file: File::open("/proc/self/pagemap")? })
    }

    /// Appends to `out` the runs of `start..end` that match `q`, in address
    /// order, and returns how many were appended.
    ///
    /// Works around a kernel quirk: when one call fills the buffer and also
    /// finishes the range, `walk_end` can be stale; a call that returns fewer
    /// runs than the buffer holds is treated as complete.
    pub fn scan(&self, start: usize, end: usize, q: Query, out: &mut Vec<PageRun>) -> io::Result<usize> {
        self.scan_flags(start, end, q, 0, out)
    }

    /// [`scan`](Pagemap::scan), and write-protects again the pages it
    /// reports (`PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`): the way to
    /// read and re-arm [`category::WRITTEN`] in one walk. The range must be
    /// registered for write protection with `UFFD_FEATURE_WP_ASYNC`
    /// (`EPERM` otherwise).
    pub fn scan_written_and_protect(
        &self,
        start: usize,
        end: usize,
        q: Query,
        out: &mut Vec<PageRun>,
    ) -> io::Result<usize> {
        let flags = u64::from(uapi::PM_SCAN_WP_MATCHING | uapi::PM_SCAN_CHECK_WPASYNC);
        self.scan_flags(start, end, q, flags, out)
    }

    fn scan_flags(&self, start: usize, end: usize, q: Query, flags: u64, out: &mut Vec<PageRun>) -> io::Result<usize> {
        const BUF: usize = 512;
        let mut buf = [uapi::page_region { start: 0, end: 0, categories: 0 }; BUF];
        let first = out.len();
        let mut at = start;
        while at < end {
            let mut arg = uapi::pm_scan_arg {
                size: size_of::<uapi::pm_scan_arg>() as u64,
                flags,
                start: at as u64,
                end: end as u64,
                walk_end: 0,
                vec: buf.as_mut_ptr() as u64,
                vec_len: BUF as u64,
                max_pages: 0,
                category_inverted: q.inverted,
                category_mask: q.mask,
                category_anyof_mask: q.anyof,
                return_mask: q.report,
            };
            // SAFETY: PAGEMAP_SCAN reads page tables and writes at most
            // `vec_len` entries into `buf`, which is live and exclusively ours.
            let n = unsafe { ioctl_update(self.file.as_fd(), OP_PAGEMAP_SCAN, &mut arg) }?;
            let n = usize::try_from(n).unwrap_or(0).min(BUF);
            out.extend(buf[..n].iter().map(|r| PageRun {
                start: r.start as usize,
                end: r.end as usize,
                categories: r.categories,
            }));
            let walk_end = arg.walk_end as usize;
            if n < BUF || walk_end >= end || walk_end <= at {
                break;
            }
            at = walk_end;
        }
        Ok(out.len() - first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;
    use crate::mman::{Mapping, Protection};

    #[test]
    fn finds_present_and_zero_pages() {
        let m = Mapping::anonymous(8 * PAGE_SIZE, Protection::ReadWrite, PAGE_SIZE).unwrap();
        m.write(2 * PAGE_SIZE, &[1]).unwrap();
        m.write(3 * PAGE_SIZE, &[1]).unwrap();
        let mut z = [0u8; 1];
        m.read(6 * PAGE_SIZE, &mut z).unwrap(); // maps the zero page
        std::hint::black_box(z);
        let pm = Pagemap::open().unwrap();
        let mut runs = Vec::new();
        let q = Query { mask: category::PRESENT, report: category::PRESENT | category::PFNZERO, ..Query::default() };
        pm.scan(m.addr(), m.addr() + m.len(), q, &mut runs).unwrap();
        let a = m.addr();
        assert_eq!(
            runs,
            vec![
                PageRun { start: a + 2 * PAGE_SIZE, end: a + 4 * PAGE_SIZE, categories: category::PRESENT },
                PageRun {
                    start: a + 6 * PAGE_SIZE,
                    end: a + 7 * PAGE_SIZE,
                    categories: category::PRESENT | category::PFNZERO
                },
            ]
        );
        // inverted: the holes
        runs.clear();
        let holes = Query::none_of(category::PRESENT);
        pm.scan(a, a + m.len(), holes, &mut runs).unwrap();
        let total: usize = runs.iter().map(|r| r.end - r.start).sum();
        assert_eq!(total, 5 * PAGE_SIZE);
    }
}
