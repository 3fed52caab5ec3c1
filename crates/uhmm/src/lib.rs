//! uhmm: heterogeneous memory management for user space.
#![deny(unsafe_code)]
pub mod sys;
