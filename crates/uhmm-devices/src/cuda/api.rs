//! The GPU interface the CUDA device's driver is written against: device
//! memory, asynchronous copies and the add-one kernel on streams, tickets
//! (CUDA events) to wait on, page-locking of host buffers, and mapping a
//! range of the program's RAM for the GPU to use in place. Two
//! implementations: [`FakeGpu`](super::FakeGpu) (host memory and worker
//! threads, in every build) and, with the `cuda` feature, the real one over
//! the CUDA driver API.

use std::fmt::Debug;
use std::sync::Arc;

use uhmm::{AddressSpace, Mapping, RegionMemory, Result};

/// A device address (`CUdeviceptr`).
pub type DevPtr = u64;

/// One operation queued on a stream. Host buffers are shared mappings, so
/// they live until the operation is done whatever the caller does.
#[derive(Debug, Clone)]
pub enum GpuOp {
    /// `cuMemcpyHtoDAsync`: `len` bytes of `src` at `off` to `dst`.
    HtoD {
        /// Device destination.
        dst: DevPtr,
        /// Page-locked host source.
        src: Arc<Mapping>,
        /// Offset in `src`.
        off: usize,
        /// Bytes.
        len: usize,
    },
    /// `cuMemcpyDtoHAsync`: `len` bytes at `src` to `dst` at `off`.
    DtoH {
        /// Page-locked host destination.
        dst: Arc<Mapping>,
        /// Offset in `dst`.
        off: usize,
        /// Device source.
        src: DevPtr,
        /// Bytes.
        len: usize,
    },
    /// `cuMemsetD8Async(dst, 0, len)`: a hole's destination.
    Zero {
        /// Device destination.
        dst: DevPtr,
        /// Bytes.
        len: usize,
    },
    /// The proof kernel: adds 1 to every 32-bit word of `len` bytes at `dst`.
    AddOne {
        /// Device memory, or host memory mapped with
        /// [`GpuApi::map_host`], to update.
        dst: DevPtr,
        /// Bytes (a multiple of 4).
        len: usize,
    },
}

/// A batch of operations queued on a stream, as a CUDA event recorded after
/// them: [`GpuApi::wait`] consumes it.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Ticket(pub u64);

/// What the driver needs from a GPU. Any thread may call any method.
///
/// Errors are `uhmm::Error`s: [`ErrorKind::NoMemory`](uhmm::ErrorKind) for
/// device memory exhausted, `Sys` or `Unsupported` for the rest. A failed
/// [`submit`](GpuApi::submit) queued nothing that still runs.
pub trait GpuApi: Send + Sync + Debug {
    /// The device's name, for reports.
    fn name(&self) -> String;
    /// Streams the device offers (at least 1); batches go round-robin.
    fn streams(&self) -> usize;
    /// `cuMemAlloc` of `bytes` bytes.
    fn alloc(&self, bytes: usize) -> Result<DevPtr>;
    /// `cuMemFree` of an allocation of [`alloc`](GpuApi::alloc).
    fn free(&self, ptr: DevPtr, bytes: usize);
    /// `cuMemHostRegister`: page-locks `buf` for copies (once per buffer).
    fn register(&self, buf: &Mapping) -> Result<()>;
    /// `cuMemHostUnregister`.
    fn unregister(&self, buf: &Mapping);
    /// `cuMemHostRegister(DEVICEMAP)` and `cuMemHostGetDevicePointer`:
    /// page-locks the RAM pages of `mem` (a range of a region of `space`,
    /// present) and maps them for the GPU, which then reads and writes
    /// them in place over the bus; returns the device address of the
    /// range's start. Until [`unmap_host`](GpuApi::unmap_host) the pages
    /// cannot move.
    fn map_host(&self, space: &AddressSpace, mem: &RegionMemory) -> Result<DevPtr>;
    /// Undoes [`map_host`](GpuApi::map_host) of the range at `addr`, once
    /// the operations queued on it are done.
    fn unmap_host(&self, addr: usize);
    /// Queues `ops` in order on `stream` (taken modulo
    /// [`streams`](GpuApi::streams)) and records a ticket after them.
    fn submit(&self, stream: usize, ops: Vec<GpuOp>) -> Result<Ticket>;
    /// Waits for a ticket's operations; the error of the first that failed.
    fn wait(&self, ticket: Ticket) -> Result<()>;
    /// Whether a ticket's operations are done (`cuEventQuery`).
    fn is_done(&self, ticket: &Ticket) -> bool;
}
