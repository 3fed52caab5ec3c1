//! The GPU's use of RAM pages in place: `hmm_range_fault` and a mirror, as
//! the kernel's test driver keeps one, for a GPU that reads and writes host
//! memory over the bus. [`CudaDevice::add_one_in_place`] runs the proof
//! kernel on a range wherever its pages are: pages on this GPU in its
//! memory, RAM pages where they are, through host memory mapped for the
//! GPU (`cuMemHostRegister(DEVICEMAP)`); no page moves.
//!
//! The mirror is the set of host ranges mapped (pinned) for the GPU. They
//! stay mapped between kernels, and an interval notifier over the address
//! space drops (unmaps and unpins) every one a change touches, before the
//! pages change: a migration (this device's too: a pinned page cannot be
//! moved), an unmap, a protection change. A kernel runs under the mirror's
//! lock, with the pages `range_fault` gave and no invalidation since
//! (`read_begin` / `read_retry`), so an invalidation waits for it.
//!
//! [`CudaDevice::add_one_in_place`]: super::CudaDevice::add_one_in_place

use std::collections::BTreeMap;
use std::ops::Range;

use uhmm::{AccessPage, Error, ErrorKind, IntervalNotifierOps, InvalidateEvent, PAGE_SIZE, Result, range_fault};

use super::GpuInner;
use super::api::{DevPtr, GpuOp};

/// What an in-place kernel ran on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InPlace {
    /// Pages in this GPU's memory.
    pub gpu_pages: usize,
    /// Pages in RAM, used through mapped host memory.
    pub ram_pages: usize,
}

/// Host ranges mapped for the GPU: by start address, length and device
/// address.
#[derive(Debug, Default)]
pub(super) struct HostMaps(BTreeMap<usize, (usize, DevPtr)>);

impl HostMaps {
    /// The map holding `addr`: the device address of `addr` and the bytes
    /// the map holds from it.
    fn at(&self, addr: usize) -> Option<(DevPtr, usize)> {
        let (&start, &(len, dev)) = self.0.range(..=addr).next_back()?;
        (addr < start + len).then(|| (dev + (addr - start) as DevPtr, start + len - addr))
    }

    /// The start of the first map after `addr`, if any.
    fn next_after(&self, addr: usize) -> Option<usize> {
        self.0.range(addr + 1..).next().map(|(&s, _)| s)
    }

    /// Takes out the maps overlapping `range`; returns their starts.
    fn take_overlapping(&mut self, range: Range<usize>) -> Vec<usize> {
        let first = self.0.range(..=range.start).next_back().filter(|(s, (l, _))| **s + *l > range.start);
        let from = first.map_or(range.start, |(s, _)| *s);
        let starts: Vec<usize> = self.0.range(from..range.end).map(|(&s, _)| s).collect();
        for s in &starts {
            self.0.remove(s);
        }
        starts
    }

    /// Takes out every map; returns their starts.
    pub(super) fn take_all(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.0).into_keys().collect()
    }

    /// Bytes mapped.
    pub(super) fn bytes(&self) -> usize {
        self.0.values().map(|(l, _)| l).sum()
    }
}

/// Adds the kernel over `len` bytes at `dev` to `ops`, merged with the
/// last one where they touch.
fn push_add_one(ops: &mut Vec<GpuOp>, dev: DevPtr, len: usize) {
    match ops.last_mut() {
        Some(GpuOp::AddOne { dst, len: l }) if *dst + *l as DevPtr == dev => *l += len,
        _ => ops.push(GpuOp::AddOne { dst: dev, len }),
    }
}

impl GpuInner {
    /// See [`CudaDevice::add_one_in_place`](super::CudaDevice::add_one_in_place).
    pub(super) fn add_one_in_place(&self, range: Range<usize>) -> Result<InPlace> {
        let notifier = self.notifier.get().expect("notifier registered at creation");
        for _attempt in 0..100 {
            let seq = notifier.read_begin();
            let pages = range_fault(&self.space, range.clone(), true, self.owner)?.release();
            let mut host = self.host();
            if notifier.read_retry(seq) {
                continue;
            }
            let mut ops = Vec::new();
            let mut done = InPlace::default();
            let mut i = 0;
            while i < pages.len() {
                let addr = range.start + i * PAGE_SIZE;
                if let AccessPage::Device(p) = pages[i] {
                    let dev = self.mem().locate(p.pfn).ok_or_else(|| Error::invalid("GPU page not allocated"))?;
                    push_add_one(&mut ops, dev, PAGE_SIZE);
                    done.gpu_pages += 1;
                    i += 1;
                    continue;
                }
                let j = (i..pages.len()).find(|&j| matches!(pages[j], AccessPage::Device(_))).unwrap_or(pages.len());
                self.map_ram(&mut host, addr..range.start + j * PAGE_SIZE, &mut ops)?;
                done.ram_pages += j - i;
                i = j;
            }
            if !ops.is_empty() {
                let ticket = self.api.submit(self.stream(), ops)?;
                self.api.wait(ticket)?;
            }
            return Ok(done);
        }
        Err(Error::new(ErrorKind::Busy, "invalidations kept racing the GPU's access"))
    }

    /// Adds the kernel over the RAM pages of `run` to `ops`, mapping for
    /// the GPU the pieces no map holds yet.
    fn map_ram(&self, host: &mut HostMaps, run: Range<usize>, ops: &mut Vec<GpuOp>) -> Result<()> {
        let mut at = run.start;
        while at < run.end {
            let (dev, len) = match host.at(at) {
                Some((dev, held)) => (dev, held.min(run.end - at)),
                None => {
                    let end = host.next_after(at).map_or(run.end, |n| n.min(run.end));
                    let mem = self.space.region_memory(at..end)?;
                    let dev = self.api.map_host(&self.space, &mem)?;
                    host.0.insert(at, (end - at, dev));
                    (dev, end - at)
                }
            };
            push_add_one(ops, dev, len);
            at += len;
        }
        Ok(())
    }

    /// Unmaps every host range mapped for the GPU.
    pub(super) fn unmap_all_host(&self) {
        let starts = self.host().take_all();
        for addr in starts {
            self.api.unmap_host(addr);
        }
    }
}

impl IntervalNotifierOps for GpuInner {
    /// Every change drops the maps it touches, this device's own
    /// migrations included: a pinned page cannot be moved.
    fn invalidate(&self, range: Range<usize>, _event: InvalidateEvent) {
        let mut host = self.host();
        for addr in host.take_overlapping(range) {
            self.api.unmap_host(addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_found_and_taken_by_overlap() {
        let mut h = HostMaps::default();
        h.0.insert(0x10000, (0x3000, 0x900000));
        h.0.insert(0x20000, (0x1000, 0xa00000));
        assert_eq!(h.at(0x11000), Some((0x901000, 0x2000)));
        assert_eq!(h.at(0x13000), None);
        assert_eq!(h.next_after(0x13000), Some(0x20000));
        assert_eq!(h.bytes(), 0x4000);
        assert_eq!(h.take_overlapping(0x12000..0x14000), vec![0x10000], "a range inside a map takes it");
        assert_eq!(h.take_overlapping(0x1f000..0x20000), Vec::<usize>::new(), "touching is not overlapping");
        assert_eq!(h.take_overlapping(0..usize::MAX), vec![0x20000]);
        assert_eq!(h.bytes(), 0);
    }
}
