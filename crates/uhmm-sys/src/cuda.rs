//! The CUDA driver calls uhmm's CUDA device needs (feature `cuda`), over
//! `cudarc` with the driver library (`libcuda.so`) and NVRTC loaded at run
//! time: a machine without CUDA builds this and gets an error, not a link
//! failure or a panic, when it opens a GPU. What takes raw pointers
//! (`cuMemAlloc`, asynchronous copies between device memory and a
//! [`Mapping`], `cuMemHostRegister`, host memory mapped for the GPU to use
//! in place, the kernel launch, managed memory for the benchmarks) is here, each `unsafe` block argued; the rest is
//! cudarc's safe API.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaStream, LaunchConfig, PushKernelArg, result, sys};

use crate::mman::{DmaRange, Mapping};

/// Why a CUDA call failed.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No driver library, no GPU, or no NVRTC: nothing CUDA can run here.
    #[error("no CUDA here: {0}")]
    Unavailable(String),
    /// `CUDA_ERROR_OUT_OF_MEMORY`.
    #[error("GPU out of memory")]
    OutOfMemory,
    /// Any other driver error, with the call that failed.
    #[error("{0}")]
    Driver(String),
}

type Result<T> = std::result::Result<T, CudaError>;

fn driver(what: &'static str) -> impl Fn(result::DriverError) -> CudaError {
    move |e| {
        if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
            CudaError::OutOfMemory
        } else {
            CudaError::Driver(format!("{what}: {e:?}"))
        }
    }
}

/// The proof kernel: one thread per 32-bit word adds 1 to it.
const ADD_ONE: &str = r#"
extern "C" __global__ void add_one(unsigned int *words, unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (; i < n; i += stride) words[i] += 1;
}
"#;

/// A GPU: its primary context, streams and the compiled proof kernel.
#[derive(Debug)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    streams: Vec<Arc<CudaStream>>,
    add_one: CudaFunction,
    /// Host ranges mapped with [`Gpu::map_host`], by address.
    host_maps: Mutex<HashSet<usize>>,
}

/// Work queued on a stream up to a point (a CUDA event).
#[derive(Debug)]
pub struct Event(CudaEvent);

impl Event {
    /// Waits for the work (`cuEventSynchronize`).
    pub fn wait(&self) -> Result<()> {
        self.0.synchronize().map_err(driver("cuEventSynchronize"))
    }

    /// Whether the work is done (`cuEventQuery`).
    pub fn is_done(&self) -> bool {
        self.0.is_complete()
    }
}

impl Gpu {
    /// Opens GPU `ordinal` with `streams` streams and compiles the proof
    /// kernel with NVRTC. [`CudaError::Unavailable`] without a driver
    /// library, GPU or NVRTC.
    pub fn open(ordinal: usize, streams: usize) -> Result<Gpu> {
        // SAFETY: only tries to dlopen the driver library; nothing is called.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::Unavailable("the CUDA driver library (libcuda.so) was not found".into()));
        }
        // SAFETY: as above, for NVRTC.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CudaError::Unavailable("NVRTC (libnvrtc.so), which compiles the kernel, was not found".into()));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::Unavailable(format!("no GPU {ordinal}: {e:?}")))?;
        let streams = (0..streams.max(1))
            .map(|_| ctx.new_stream().map_err(driver("cuStreamCreate")))
            .collect::<Result<Vec<_>>>()?;
        let ptx = cudarc::nvrtc::compile_ptx(ADD_ONE).map_err(|e| CudaError::Driver(format!("NVRTC: {e:?}")))?;
        let module = ctx.load_module(ptx).map_err(driver("cuModuleLoadData"))?;
        let add_one = module.load_function("add_one").map_err(driver("cuModuleGetFunction"))?;
        Ok(Gpu { ctx, streams, add_one, host_maps: Mutex::new(HashSet::new()) })
    }

    /// The GPU's name.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "an NVIDIA GPU".to_owned())
    }

    /// Streams opened.
    pub fn streams(&self) -> usize {
        self.streams.len()
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))
    }

    fn stream(&self, s: usize) -> sys::CUstream {
        self.streams[s % self.streams.len()].cu_stream()
    }

    /// `cuMemAlloc(bytes)`.
    pub fn alloc(&self, bytes: usize) -> Result<u64> {
        self.bind()?;
        // SAFETY: allocates fresh device memory in the bound context; no
        // host memory is touched.
        unsafe { result::malloc_sync(bytes) }.map_err(driver("cuMemAlloc"))
    }

    /// `cuMemFree` of an allocation of [`Gpu::alloc`], after the work
    /// queued on every stream (which may still use it).
    pub fn free(&self, ptr: u64) -> Result<()> {
        self.bind()?;
        self.ctx.synchronize().map_err(driver("cuCtxSynchronize"))?;
        // SAFETY: `ptr` came from `cuMemAlloc` in this context (the caller's
        // contract) and no queued work uses it any more (synchronized).
        unsafe { result::free_sync(ptr) }.map_err(driver("cuMemFree"))
    }

    /// `cuMemHostRegister(buf, PORTABLE)`: page-locks the whole mapping.
    pub fn register(&self, buf: &Mapping) -> Result<()> {
        self.bind()?;
        // SAFETY: the range is the mapping's own memory, mapped while `buf`
        // lives; registering only pins it and makes it visible to the GPU.
        unsafe { sys::cuMemHostRegister_v2(buf.as_ptr().cast(), buf.len(), sys::CU_MEMHOSTREGISTER_PORTABLE) }
            .result()
            .map_err(driver("cuMemHostRegister"))
    }

    /// `cuMemHostUnregister`.
    pub fn unregister(&self, buf: &Mapping) -> Result<()> {
        self.bind()?;
        // SAFETY: unpins a range registered by `register`; no memory is
        // accessed.
        unsafe { sys::cuMemHostUnregister(buf.as_ptr().cast()) }.result().map_err(driver("cuMemHostUnregister"))
    }

    /// `cuMemHostRegister(range, PORTABLE | DEVICEMAP)` and
    /// `cuMemHostGetDevicePointer`: pins the range's pages and maps them
    /// for the GPU; returns the device address of its first byte, which
    /// kernels read and write in place until [`Gpu::unmap_host`].
    pub fn map_host(&self, range: &DmaRange<'_>) -> Result<u64> {
        self.bind()?;
        let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
        let host = range.addr() as *mut std::ffi::c_void;
        // SAFETY: the range is a mapping's memory lent for device access
        // while `range` lives (a mapping's bytes may change at any time, so
        // the GPU's writes break no reference); registering pins its pages,
        // so the GPU's accesses stay on them even if the range is unmapped
        // before `unmap_host`.
        unsafe { sys::cuMemHostRegister_v2(host, range.len(), flags) }.result().map_err(driver("cuMemHostRegister"))?;
        let mut dptr: sys::CUdeviceptr = 0;
        // SAFETY: writes the device address of a registered range into a
        // local.
        let got = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, host, 0) }.result();
        if let Err(e) = got {
            // SAFETY: unpins the range registered just above; nothing used it.
            let _ = unsafe { sys::cuMemHostUnregister(host) };
            return Err(driver("cuMemHostGetDevicePointer")(e));
        }
        self.host_maps.lock().unwrap_or_else(|e| e.into_inner()).insert(range.addr());
        Ok(dptr)
    }

    /// Undoes [`Gpu::map_host`] of the range at `addr`, after the work
    /// queued on every stream (which may still use it). An address this
    /// GPU did not map is an error and changes nothing.
    pub fn unmap_host(&self, addr: usize) -> Result<()> {
        if !self.host_maps.lock().unwrap_or_else(|e| e.into_inner()).remove(&addr) {
            return Err(CudaError::Driver(format!("unmap_host of {addr:#x}, which map_host did not map")));
        }
        self.bind()?;
        self.ctx.synchronize().map_err(driver("cuCtxSynchronize"))?;
        // SAFETY: unpins a range `map_host` registered (checked above); no
        // queued work uses it any more (synchronized). No memory is accessed.
        unsafe { sys::cuMemHostUnregister(addr as *mut std::ffi::c_void) }
            .result()
            .map_err(driver("cuMemHostUnregister"))
    }

    fn check(buf: &Mapping, off: usize, len: usize) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= buf.len() => Ok(()),
            _ => Err(CudaError::Driver("a copy past the end of its host buffer".into())),
        }
    }

    /// `cuMemcpyHtoDAsync`: `len` bytes of `src` at `off` to `dst`, on
    /// stream `s`. The caller keeps `src` alive and unchanged until the
    /// stream's work is done (it holds the `Arc` with the ticket).
    pub fn htod_async(&self, s: usize, dst: u64, src: &Mapping, off: usize, len: usize) -> Result<()> {
        Self::check(src, off, len)?;
        self.bind()?;
        // SAFETY: `off..off + len` is inside the mapping (checked), whose
        // memory stays mapped while the caller holds it (until the copy is
        // done); the GPU only reads it. The slice is not kept past the call.
        let host = unsafe { std::slice::from_raw_parts(src.as_ptr().add(off), len) };
        // SAFETY: `dst` is device memory of this context (the caller's
        // contract); the host range is valid as argued above.
        unsafe { result::memcpy_htod_async(dst, host, self.stream(s)) }.map_err(driver("cuMemcpyHtoDAsync"))
    }

    /// `cuMemcpyDtoHAsync`: `len` bytes at `src` into `dst` at `off`, on
    /// stream `s`; the same contract as [`Gpu::htod_async`].
    pub fn dtoh_async(&self, s: usize, dst: &Mapping, off: usize, src: u64, len: usize) -> Result<()> {
        Self::check(dst, off, len)?;
        self.bind()?;
        // SAFETY: `off..off + len` is inside the mapping (checked) and stays
        // mapped until the copy is done; nothing else reads or writes it
        // meanwhile (the staging buffer belongs to this copy's batch).
        let host = unsafe { std::slice::from_raw_parts_mut(dst.as_ptr().add(off), len) };
        // SAFETY: `src` is device memory of this context; the host range is
        // valid as argued above.
        unsafe { result::memcpy_dtoh_async(host, src, self.stream(s)) }.map_err(driver("cuMemcpyDtoHAsync"))
    }

    /// `cuMemsetD8Async(dst, 0, len)` on stream `s`.
    pub fn zero_async(&self, s: usize, dst: u64, len: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: writes device memory of this context only.
        unsafe { result::memset_d8_async(dst, 0, len, self.stream(s)) }.map_err(driver("cuMemsetD8Async"))
    }

    /// Launches the proof kernel over `len` bytes at `dst` on stream `s`.
    pub fn add_one_async(&self, s: usize, dst: u64, len: usize) -> Result<()> {
        let n = (len / 4) as u64;
        let cfg = LaunchConfig { grid_dim: (1024, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let stream = &self.streams[s % self.streams.len()];
        let mut launch = stream.launch_builder(&self.add_one);
        launch.arg(&dst).arg(&n);
        // SAFETY: the kernel takes (unsigned int *, unsigned long long), as
        // pushed; it touches words `0..n` of `dst`, device memory of this
        // context that the caller owns for the launch.
        unsafe { launch.launch(cfg) }.map(drop).map_err(driver("cuLaunchKernel"))
    }

    /// Records an event on stream `s` after the work queued so far.
    pub fn record(&self, s: usize) -> Result<Event> {
        let event = self.ctx.new_event(None).map_err(driver("cuEventCreate"))?;
        event.record(&self.streams[s % self.streams.len()]).map_err(driver("cuEventRecord"))?;
        Ok(Event(event))
    }

    /// Waits for every stream.
    pub fn synchronize(&self) -> Result<()> {
        self.ctx.synchronize().map_err(driver("cuCtxSynchronize"))
    }

    /// `cuMemAllocManaged(len, CU_MEM_ATTACH_GLOBAL)`: what
    /// `cudaMallocManaged` gives, the benchmarks' baseline.
    pub fn alloc_managed(&self, len: usize) -> Result<Managed<'_>> {
        self.bind()?;
        // SAFETY: allocates fresh managed memory in the bound context; its
        // bytes are only read through `Managed`, which writes them first.
        let ptr = unsafe { result::malloc_managed(len, sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL) }
            .map_err(driver("cuMemAllocManaged"))?;
        let m = Managed { gpu: self, ptr, len };
        self.synchronize()?;
        // SAFETY: `ptr..ptr + len` is managed memory the CPU may access
        // while no kernel runs (none does: the context is synchronized).
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, len) };
        Ok(m)
    }
}

/// Managed memory ([`Gpu::alloc_managed`]), freed on drop.
#[derive(Debug)]
pub struct Managed<'a> {
    gpu: &'a Gpu,
    ptr: u64,
    len: usize,
}

impl Managed<'_> {
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: a managed allocation has a byte at least).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `cuMemPrefetchAsync` of all of it to the GPU (or, `to_gpu` false,
    /// to the CPU) on stream 0, waited for.
    pub fn prefetch(&self, to_gpu: bool) -> Result<()> {
        self.gpu.bind()?;
        let device = if to_gpu { self.gpu.ctx.cu_device() } else { -1 }; // CU_DEVICE_CPU
        // SAFETY: prefetches managed memory of this context, whole; no
        // host memory is read or written by the call.
        unsafe { sys::cuMemPrefetchAsync(self.ptr, self.len, device, self.gpu.stream(0)) }
            .result()
            .map_err(driver("cuMemPrefetchAsync"))?;
        self.gpu.synchronize()
    }

    /// Runs the proof kernel over it on the GPU (the GPU touches every
    /// page), waited for.
    pub fn add_one(&self) -> Result<()> {
        self.gpu.bind()?;
        self.gpu.add_one_async(0, self.ptr, self.len)?;
        self.gpu.synchronize()
    }

    /// The byte at `off`, read by the CPU: a managed-memory CPU fault when
    /// its page is on the GPU. `None` past the end.
    pub fn read_byte(&self, off: usize) -> Option<u8> {
        if off >= self.len {
            return None;
        }
        // SAFETY: `off` is inside the managed allocation, which the CPU may
        // read while no kernel runs (every call that launches or copies
        // waits for its work before returning); the driver migrates the
        // page on the fault.
        Some(unsafe { std::ptr::read_volatile((self.ptr as *const u8).add(off)) })
    }
}

impl Drop for Managed<'_> {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() && self.gpu.synchronize().is_ok() {
            // SAFETY: `ptr` came from `cuMemAllocManaged` in this context,
            // and no queued work uses it (synchronized).
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}
