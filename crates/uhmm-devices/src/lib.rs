//! Device drivers for uhmm. Each driver depends on the core crate `uhmm`
//! and implements its driver trait; the core knows nothing of them.
//!
//! - [`sim`]: the embedded default, a model of the kernel's HMM test driver
//!   (`lib/test_hmm.c`, "dmirror"): device memory in host RAM, a DMA engine
//!   thread, a device page table, and dmirror's test operations. A program
//!   makes a [`sim::SimDevice`] in its address space and moves ranges with
//!   it (its doc has an example).

#![forbid(unsafe_code)]

pub mod sim;
