//! Device drivers for uhmm. Each driver depends on the core crate `uhmm`
//! and implements its driver trait; the core knows nothing of them.
//!
//! - [`sim`]: the embedded default, a model of the kernel's HMM test driver
//!   (`lib/test_hmm.c`, "dmirror"): device memory in host RAM, a DMA engine
//!   thread, a device page table, and dmirror's test operations.

#![forbid(unsafe_code)]

pub mod sim;
