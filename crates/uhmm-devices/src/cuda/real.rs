//! The real GPU behind [`GpuApi`] (feature `cuda`): uhmm-sys's CUDA driver
//! calls, a ticket being a CUDA event recorded after a batch's operations.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use uhmm::{AddressSpace, Error, ErrorKind, Mapping, RegionMemory, Result};
use uhmm_sys::cuda::{CudaError, Event, Gpu};

use super::api::{DevPtr, GpuApi, GpuOp, Ticket};

/// Streams the real backend opens.
const STREAMS: usize = 2;

/// A GPU through the CUDA driver.
#[derive(Debug)]
pub(crate) struct RealGpu {
    gpu: Gpu,
    /// Events of the tickets not waited for yet.
    events: Mutex<HashMap<u64, Event>>,
    next: AtomicU64,
    /// One batch at a time per stream is queued whole, so a ticket's event
    /// follows exactly its operations.
    queue: Vec<Mutex<()>>,
}

fn error(e: CudaError) -> Error {
    match e {
        CudaError::Unavailable(why) => Error::new(ErrorKind::Unsupported, why),
        CudaError::OutOfMemory => Error::new(ErrorKind::NoMemory, "GPU out of memory"),
        CudaError::Driver(why) => Error::new(ErrorKind::Sys, why),
    }
}

impl RealGpu {
    /// Opens GPU `ordinal`.
    pub(crate) fn open(ordinal: usize) -> Result<RealGpu> {
        // cudarc panics when a symbol it binds is missing from an old
        // driver: no panic leaves the public API.
        let gpu = std::panic::catch_unwind(|| Gpu::open(ordinal, STREAMS))
            .map_err(|_| Error::new(ErrorKind::Unsupported, "the CUDA driver lacks a call uhmm needs (too old?)"))?
            .map_err(error)?;
        Ok(RealGpu {
            gpu,
            events: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            queue: (0..STREAMS).map(|_| Mutex::new(())).collect(),
        })
    }

    fn events(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Event>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl GpuApi for RealGpu {
    fn name(&self) -> String {
        self.gpu.name()
    }

    fn streams(&self) -> usize {
        self.gpu.streams()
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        self.gpu.alloc(bytes).map_err(error)
    }

    fn free(&self, ptr: DevPtr, _bytes: usize) {
        if let Err(err) = self.gpu.free(ptr) {
            tracing::error!(%err, "cuMemFree");
        }
    }

    fn register(&self, buf: &Mapping) -> Result<()> {
        self.gpu.register(buf).map_err(error)
    }

    fn unregister(&self, buf: &Mapping) {
        if let Err(err) = self.gpu.unregister(buf) {
            tracing::error!(%err, "cuMemHostUnregister");
        }
    }

    fn map_host(&self, _space: &AddressSpace, mem: &RegionMemory) -> Result<DevPtr> {
        self.gpu.map_host(&mem.dma_range()?).map_err(error)
    }

    fn unmap_host(&self, addr: usize) {
        if let Err(err) = self.gpu.unmap_host(addr) {
            tracing::error!(%err, "cuMemHostUnregister of a range mapped in place");
        }
    }

    fn submit(&self, stream: usize, ops: Vec<GpuOp>) -> Result<Ticket> {
        let s = stream % self.queue.len();
        let _queue = self.queue[s].lock().unwrap_or_else(|e| e.into_inner());
        for op in &ops {
            let queued = match op {
                GpuOp::HtoD { dst, src, off, len } => self.gpu.htod_async(s, *dst, src, *off, *len),
                GpuOp::DtoH { dst, off, src, len } => self.gpu.dtoh_async(s, dst, *off, *src, *len),
                GpuOp::Zero { dst, len } => self.gpu.zero_async(s, *dst, *len),
                GpuOp::AddOne { dst, len } => self.gpu.add_one_async(s, *dst, *len),
            };
            if let Err(e) = queued {
                // What was queued before may still run: wait it out, so
                // that nothing queued outlives a failed submit.
                let _ = self.gpu.synchronize();
                return Err(error(e));
            }
        }
        let event = self.gpu.record(s).map_err(error);
        let event = match event {
            Ok(ev) => ev,
            Err(e) => {
                let _ = self.gpu.synchronize();
                return Err(e);
            }
        };
        // The host buffers outlive the copies: the driver holds their
        // staging with the ticket until it has waited for it.
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        self.events().insert(ticket, event);
        Ok(Ticket(ticket))
    }

    fn wait(&self, ticket: Ticket) -> Result<()> {
        let event = self.events().remove(&ticket.0).ok_or_else(|| Error::invalid("unknown ticket"))?;
        event.wait().map_err(error)
    }

    fn is_done(&self, ticket: &Ticket) -> bool {
        self.events().get(&ticket.0).is_none_or(Event::is_done)
    }
}
