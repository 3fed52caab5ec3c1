//! Chunked and pipelined migration of a large range: the three steps in
//! chunks sized for a DMA engine (nouveau's migration loop), with the copy
//! of one chunk overlapping the setup of the next and the finalize of the
//! one before (`migrate_pipelined`).

use std::ops::Range;

use uhmm_sys::PAGE_SIZE;

use crate::migrate::finalize::Finalizing;
use crate::migrate::{Collected, MigrateSummary, Migrated, Migration, Select};
use crate::mm::AddressSpace;
use crate::page::Owner;
use crate::{Error, Result};

/// The driver's part of a chunked migration: the two callbacks of the
/// kernel's original `migrate_vma(ops, ...)`.
pub trait ChunkDriver {
    /// Allocate destinations for the collected pages, copy (waiting for the
    /// copy's fence) and set each destination.
    fn alloc_and_copy(&mut self, m: &mut Migration<Collected>) -> Result<()>;

    /// After `pages`, before `finalize`: update the device's page table for
    /// the pages that moved, while they are still locked.
    fn finalize_and_map(&mut self, m: &Migration<Migrated>) {
        let _ = m;
    }
}

/// A driver whose copies run asynchronously (a DMA engine with fences), so
/// that [`migrate_pipelined`] can overlap them with uhmm's own work: while
/// the engine copies one chunk, uhmm sets up the next and finalizes the one
/// before.
pub trait PipelinedDriver {
    /// A copy in flight: the driver's fence and what it needs to set the
    /// destinations once the copy is done. Dropping it must wait for the
    /// copy (the pages it reads and writes are about to be reused).
    type Pending;

    /// Allocate destinations for the collected pages of `m` and start
    /// copying; do not set destinations yet. On error nothing may be left
    /// copying.
    fn alloc_and_submit(&mut self, m: &mut Migration<Collected>) -> Result<Self::Pending>;

    /// Wait for `pending`'s copy and set the destinations of the pages it
    /// copied (none if the copy failed: the pages stay where they were).
    fn wait_and_set(&mut self, m: &mut Migration<Collected>, pending: Self::Pending) -> Result<()>;

    /// After `pages`, before `finalize`: update the device's page table for
    /// the pages that moved, while they are still locked.
    fn finalize_and_map(&mut self, m: &Migration<Migrated>) {
        let _ = m;
    }

    /// Whether `pending`'s copy is done already (nothing was queued, or the
    /// fence has signalled). Then [`migrate_pipelined`] starts finalizing
    /// that chunk before it ends the chunk before and sets up the next, so
    /// the copy helper works on the chunk's copies into RAM meanwhile. The
    /// default, `false`, sets up and submits the next chunk first, so the
    /// driver's engine always has a chunk queued.
    fn ready(&self, pending: &Self::Pending) -> bool {
        let _ = pending;
        false
    }
}

/// Drives the three steps over `range` in chunks of `chunk_pages` pages
/// (like nouveau's migration loop): for each chunk `setup`, the driver's
/// `alloc_and_copy`, `pages`, the driver's `finalize_and_map`, `finalize`.
/// In a range of three chunks or more, where half a chunk is whole 2 MiB
/// blocks, the first and the last chunk are half as large. Stops at the
/// first error; chunks already done stay migrated.
pub fn migrate_chunked(
    space: &AddressSpace,
    range: Range<usize>,
    chunk_pages: usize,
    select: Select,
    owner: Owner,
    driver: &mut impl ChunkDriver,
) -> Result<MigrateSummary> {
    /// A synchronous driver is a pipelined one whose copies are done when
    /// they are submitted.
    struct Sync<'a, D>(&'a mut D);
    impl<D: ChunkDriver> PipelinedDriver for Sync<'_, D> {
        type Pending = ();
        fn alloc_and_submit(&mut self, m: &mut Migration<Collected>) -> Result<()> {
            self.0.alloc_and_copy(m)
        }
        fn wait_and_set(&mut self, _: &mut Migration<Collected>, (): ()) -> Result<()> {
            Ok(())
        }
        fn finalize_and_map(&mut self, m: &Migration<Migrated>) {
            self.0.finalize_and_map(m);
        }
        fn ready(&self, (): &()) -> bool {
            true
        }
    }
    migrate_pipelined(space, range, chunk_pages, select, owner, &mut Sync(driver))
}

/// [`migrate_chunked`] with the copies of one chunk overlapping the setup of
/// the next and the finalize of the one before: two chunks are in flight at
/// a time, each holding its own pages. Its chunks are those of
/// [`migrate_chunked`] (the half-size first and last let the pipeline fill
/// and drain sooner). Stops at the first error: chunks before it stay
/// migrated, the chunk in flight beside it is restored once its copy has
/// finished.
pub fn migrate_pipelined<D: PipelinedDriver>(
    space: &AddressSpace,
    range: Range<usize>,
    chunk_pages: usize,
    select: Select,
    owner: Owner,
    driver: &mut D,
) -> Result<MigrateSummary> {
    if chunk_pages == 0 {
        return Err(Error::invalid("chunk_pages must be > 0"));
    }
    let start = range.start & !(PAGE_SIZE - 1);
    let end = range.end & !(PAGE_SIZE - 1);
    if end <= start {
        return Err(Error::invalid("empty range"));
    }
    /// Commits a chunk whose copy was submitted and starts its finalize.
    fn begin<D: PipelinedDriver>(
        driver: &mut D,
        (mut m, pending): (Migration<Collected>, D::Pending),
    ) -> Result<Finalizing> {
        driver.wait_and_set(&mut m, pending)?;
        let m = m.pages();
        driver.finalize_and_map(&m);
        Ok(m.finalize_begin())
    }
    let mut total = MigrateSummary::default();
    // A chunk submitted, and the chunk before it, finalizing.
    let mut in_flight: Option<(Migration<Collected>, D::Pending)> = None;
    let mut finishing: Option<Finalizing> = None;
    let end_of = |f: Option<Finalizing>| f.map_or_else(MigrateSummary::default, Finalizing::end);
    let mut at = start;
    while at < end {
        let next = end.min(at.saturating_add(
            chunk_len(chunk_pages, at == start, (end - at) / PAGE_SIZE, (end - start) / PAGE_SIZE) * PAGE_SIZE,
        ));
        // The chunk in flight, when its copy is done, starts finalizing
        // before the one before it ends, so the copy helper always has
        // copies into RAM to work on; they overlap this chunk's setup too.
        match in_flight.take() {
            Some(chunk) if driver.ready(&chunk.1) => {
                let begun = begin(driver, chunk)?;
                total += end_of(finishing.replace(begun));
            }
            other => {
                in_flight = other;
                total += end_of(finishing.take());
            }
        }
        let submitted = Migration::setup(space, at..next, select, owner).and_then(|mut m| {
            let pending = driver.alloc_and_submit(&mut m)?;
            Ok((m, pending))
        });
        // A chunk whose copy was not done before finalizes now.
        if let Some(chunk) = in_flight.take() {
            match begin(driver, chunk) {
                Ok(begun) => finishing = Some(begun),
                Err(e) => {
                    // Abandon this chunk: its copy finishes (dropping the
                    // pending copy waits for it), then its pages are restored.
                    if let Ok((m, pending)) = submitted {
                        drop(pending);
                        drop(m);
                    }
                    return Err(e);
                }
            }
        }
        in_flight = Some(submitted?);
        at = next;
    }
    // The last chunk begins before the one before it ends; the caller
    // empties half its staging itself, since it waits for that anyway.
    let last = in_flight.map(|chunk| begin(driver, chunk)).transpose()?;
    total += end_of(finishing);
    total += last.map_or_else(MigrateSummary::default, Finalizing::end_releasing_here);
    // Return with the RAM that moved away freed, not still being freed.
    space.inner.stage.wait_released();
    space.inner.pool.wait_released();
    Ok(total)
}

/// Pages in the next chunk of a pipelined migration of `total` pages in
/// chunks of `chunk`, `remaining` of them still to set up (`first`: none
/// set up yet). In a migration of three chunks or more, the first chunk is
/// half as large, so the copies start sooner, and so is the last, so less
/// is left to finalize after the last copy: the pipeline fills and drains
/// in half the time (32 MiB in chunks of 8 MiB: 3–20% less a page here).
/// Only where a half chunk is whole 2 MiB blocks, which then stay whole.
fn chunk_len(chunk: usize, first: bool, remaining: usize, total: usize) -> usize {
    let half = chunk / 2;
    if total < 3 * chunk || half == 0 || !half.is_multiple_of(crate::BATCH_PAGES) {
        chunk
    } else if first {
        half
    } else if remaining > half && remaining <= chunk + half {
        // Leave half a chunk (and any partial block) for the last.
        match (remaining - half) / crate::BATCH_PAGES * crate::BATCH_PAGES {
            0 => chunk,
            n => n,
        }
    } else {
        chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelined_chunks_ramp_up_and_down_by_half_a_chunk() {
        // The chunks of a migration of `total` pages in chunks of `chunk`.
        let chunks = |chunk: usize, total: usize| {
            let (mut out, mut done) = (Vec::new(), 0);
            while done < total {
                let n = chunk_len(chunk, done == 0, total - done, total).min(total - done);
                out.push(n);
                done += n;
            }
            out
        };
        assert_eq!(chunks(2048, 8192), [1024, 2048, 2048, 2048, 1024]);
        assert_eq!(chunks(2048, 6144), [1024, 2048, 2048, 1024]);
        assert_eq!(chunks(2048, 7000), [1024, 2048, 2048, 512, 1368], "chunks end on 2 MiB blocks");
        assert_eq!(chunks(2048, 4096), [2048, 2048], "two chunks: no ramp");
        assert_eq!(chunks(512, 4096), [512; 8], "a half chunk would split a 2 MiB block");
        assert_eq!(chunks(16, 100), [16, 16, 16, 16, 16, 16, 4]);
    }
}
