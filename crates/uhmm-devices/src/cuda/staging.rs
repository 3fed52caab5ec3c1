//! Host staging for the CUDA device's copies. Pages pass through
//! page-locked host buffers (a DMA engine reads and writes only
//! page-locked memory, and page-locked memory cannot be moved into a
//! region with `UFFDIO_MOVE`): the CPU gathers a batch's pages into a
//! buffer, the GPU copies it in one or a few large copies; back, the
//! reverse. Two modes ([`StagingMode`]): a fixed ring of slots, or
//! whole-batch buffers registered once and reused.

use std::sync::{Arc, Condvar, Mutex};

use uhmm::{Error, Mapping, PAGE_SIZE, Protection, Result};

use super::api::GpuApi;

/// How the CUDA device stages its copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StagingMode {
    /// A fixed ring of page-locked slots (`ring_slots` of `slot_bytes`,
    /// registered at creation): a batch takes the slots it needs and gives
    /// them back when its copies are done; a batch waits for free slots.
    /// Pinned memory is bounded; a batch is one copy per slot.
    Ring,
    /// Buffers of a whole batch, registered with `cuMemHostRegister` the
    /// first time they are needed and kept for the next batches: a batch
    /// is one copy per contiguous run of device pages, and never waits for
    /// staging (pinned memory grows with the batches in flight).
    Registered,
}

/// The staging buffers of a device.
#[derive(Debug)]
pub(crate) struct Staging {
    mode: StagingMode,
    slot_bytes: usize,
    /// Free buffers: the ring's slots, or registered batch buffers.
    free: Mutex<Vec<Arc<Mapping>>>,
    cv: Condvar,
    /// Registered batch buffers kept at most (Registered mode).
    keep: usize,
}

/// Buffers held by one batch: byte `k` of the batch is at `k % seg` of
/// buffer `k / seg`.
#[derive(Debug)]
pub(crate) struct Stage<'a> {
    staging: &'a Staging,
    api: &'a dyn GpuApi,
    bufs: Vec<Arc<Mapping>>,
    seg: usize,
    /// Buffers of its own, beyond the ring's: unregistered when dropped.
    overflow: bool,
}

/// How long a batch waits for ring slots before it stages beside the ring.
const RING_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Registered batch buffers are sized in steps of this.
const STEP: usize = 2 << 20;

impl Staging {
    /// Sets up staging; the ring's slots are allocated and registered now.
    pub(crate) fn new(api: &dyn GpuApi, mode: StagingMode, slots: usize, slot_bytes: usize) -> Result<Staging> {
        let staging = Staging { mode, slot_bytes, free: Mutex::new(Vec::new()), cv: Condvar::new(), keep: 4 };
        if mode == StagingMode::Ring {
            let mut free = staging.lock();
            for _ in 0..slots {
                free.push(Arc::new(registered(api, slot_bytes)?));
            }
        }
        Ok(staging)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Mapping>>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Buffers for `bytes` bytes (a multiple of the page size). In ring
    /// mode it waits until enough slots are free, for at most
    /// [`RING_WAIT`], then stages in buffers of its own.
    pub(crate) fn take<'a>(&'a self, api: &'a dyn GpuApi, bytes: usize) -> Result<Stage<'a>> {
        match self.mode {
            StagingMode::Ring => {
                let n = bytes.div_ceil(self.slot_bytes).max(1);
                let mut free = self.lock();
                let deadline = std::time::Instant::now() + RING_WAIT;
                while free.len() < n {
                    let now = std::time::Instant::now();
                    if now >= deadline {
                        // The ring is held by batches that may wait on this
                        // one's caller (two pipelined migrations, each
                        // holding a batch): stage in buffers of its own,
                        // unregistered when it is done.
                        drop(free);
                        let bufs =
                            (0..n).map(|_| registered(api, self.slot_bytes).map(Arc::new)).collect::<Result<_>>()?;
                        return Ok(Stage { staging: self, api, bufs, seg: self.slot_bytes, overflow: true });
                    }
                    free = self.cv.wait_timeout(free, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
                }
                let at = free.len() - n;
                let bufs = free.split_off(at);
                Ok(Stage { staging: self, api, bufs, seg: self.slot_bytes, overflow: false })
            }
            StagingMode::Registered => {
                let len = bytes.div_ceil(STEP).max(1) * STEP;
                let mut free = self.lock();
                let buf = match free.iter().position(|b| b.len() >= len) {
                    Some(k) => free.swap_remove(k),
                    None => {
                        drop(free);
                        Arc::new(registered(api, len)?)
                    }
                };
                let seg = buf.len();
                Ok(Stage { staging: self, api, bufs: vec![buf], seg, overflow: false })
            }
        }
    }

    /// Unregisters every free buffer (the device is going away).
    pub(crate) fn clear(&self, api: &dyn GpuApi) {
        for buf in self.lock().drain(..) {
            api.unregister(&buf);
        }
    }

    /// Free buffers held now (for tests and reports).
    pub(crate) fn free_buffers(&self) -> usize {
        self.lock().len()
    }
}

/// A page-locked anonymous mapping of `len` bytes, populated.
fn registered(api: &dyn GpuApi, len: usize) -> Result<Mapping> {
    let buf = Mapping::anonymous(len, Protection::ReadWrite, PAGE_SIZE).map_err(|e| Error::sys("staging buffer", e))?;
    buf.populate_write(0, len).map_err(|e| Error::sys("populating a staging buffer", e))?;
    api.register(&buf)?;
    Ok(buf)
}

impl Stage<'_> {
    /// The buffer and offset of byte `k` of the batch.
    pub(crate) fn at(&self, k: usize) -> (&Arc<Mapping>, usize) {
        (&self.bufs[k / self.seg], k % self.seg)
    }
}

impl Drop for Stage<'_> {
    fn drop(&mut self) {
        let mut free = self.staging.lock();
        for buf in self.bufs.drain(..) {
            if self.overflow || (self.staging.mode == StagingMode::Registered && free.len() >= self.staging.keep) {
                self.api.unregister(&buf);
            } else {
                free.push(buf);
            }
        }
        self.staging.cv.notify_all();
    }
}
