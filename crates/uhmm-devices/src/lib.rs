//! Device drivers for uhmm.
