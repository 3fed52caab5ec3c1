//! Device drivers for uhmm. Each driver depends on the core crate `uhmm`
//! and implements its driver trait; the core knows nothing of them.
//!
//! - [`sim`]: the embedded default, a model of the kernel's HMM test driver
//!   (`lib/test_hmm.c`, "dmirror"): device memory in host RAM, a DMA engine
//!   thread, a device page table, and dmirror's test operations. A program
//!   makes a [`sim::SimDevice`] in its address space and moves ranges with
//!   it (its doc has an example).
//! - [`cuda`]: GPU memory as device memory, [`cuda::CudaDevice`], over the
//!   [`cuda::GpuApi`] trait: the real GPU through the CUDA driver (feature
//!   `cuda`), or [`cuda::FakeGpu`] (host memory and threads) in every build.
//! - [`store`]: the driver of every store-backed tier, [`store::StoreDevice`],
//!   over the [`store::PageStore`] trait (put / get / delete of page batches).
//! - [`compress`]: the compressed store, a user-space zswap: lz4 (or zstd),
//!   same-filled and incompressible pages as zram keeps them, a packed pool,
//!   groups of neighbouring pages, checksums.
//! - [`file`](mod@file): the file store, pages in a file on local disk: an extent
//!   allocator over the file, batched io_uring reads and writes,
//!   `O_DIRECT` where the file system takes it, a file private to the
//!   process.
//! - [`remote`]: remote stores: [`remote::RedisStore`], pages as grouped
//!   values on a Redis server or Redis Cluster (pipelined, with expiry).
//! - [`far`]: far stores by address (`file:PATH`, `redis://…`), opened
//!   behind [`store::SealedStore`], so every page leaving the process is
//!   encrypted and authenticated.
//! - [`tier`]: a RAM budget over a store device: reclaim of the coldest
//!   pages, access tracking, faults held at the budget.

#![forbid(unsafe_code)]

pub mod compress;
pub mod cuda;
pub mod far;
pub mod file;
mod range;
pub mod remote;
pub mod sim;
pub mod store;
mod teardown;
pub mod tier;
