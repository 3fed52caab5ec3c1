//! `AddressSpace::new`: an address space comes to life here — its
//! userfaultfd opened with the features uhmm needs, its mm built, the fault
//! engine's threads started and the fork hooks told. This sits above the
//! engine it starts; the address space's state and the calls that need no
//! engine are the mm's (`mm.rs`).

use std::sync::Arc;

use uhmm_sys as sys;
use uhmm_sys::uffd::{self, Origin, Uffd};

use crate::config::Config;
use crate::fault::engine::Engine;
use crate::mm::{AddressSpace, Mm};
use crate::{Error, ErrorKind, Result};

impl AddressSpace {
    /// Opens a userfaultfd, sets up the staging areas and starts the
    /// fault-handling threads.
    ///
    /// Fails with [`ErrorKind::Unsupported`] naming the permission or sysctl
    /// to change when no userfaultfd can be had, or when the kernel lacks
    /// `UFFDIO_MOVE` (Linux 6.8) or `UFFDIO_POISON` (6.6).
    pub fn new(mut config: Config) -> Result<AddressSpace> {
        sys::check_page_size().map_err(|e| Error::new(ErrorKind::Unsupported, e.to_string()))?;
        if config.fault_around_pages == 0 || config.zero_fill_pages == 0 {
            return Err(Error::invalid("fault_around_pages and zero_fill_pages must be > 0"));
        }
        // Where this thread may run: the handlers' CPUs must be among
        // them, and the copy helper runs on all of them.
        let allowed = sys::process::allowed_cpus().map_err(|e| Error::sys("sched_getaffinity", e))?;
        if let Some(cpu) = config.handler_cpus.iter().find(|c| !allowed.contains(c)) {
            return Err(Error::invalid(format!("handler_cpus: this process may not run on CPU {cpu}")));
        }
        if config.handler_threads == 0 {
            // One handler per CPU, each on its own (see `Config`).
            if config.handler_cpus.is_empty() {
                config.handler_cpus = allowed.iter().copied().take(crate::config::AUTO_HANDLERS_MAX).collect();
            }
            config.handler_threads = config.handler_cpus.len();
        }
        let mut wanted = uffd::feature::MOVE | uffd::feature::POISON | uffd::feature::THREAD_ID;
        if config.track_writes {
            wanted |= uffd::feature::WP_ASYNC;
        }
        if config.non_cooperative {
            wanted |= uffd::feature::EVENT_UNMAP | uffd::feature::EVENT_REMAP;
        }
        let signal = config.fault_delivery == crate::FaultDelivery::Signal;
        if signal {
            wanted |= uffd::feature::SIGBUS;
        }
        let accept = match (config.force_user_mode_only, config.allow_user_mode_only) {
            (true, _) => uffd::Accept::UserModeOnly,
            (false, true) => uffd::Accept::FullOrUserModeOnly,
            (false, false) => uffd::Accept::Full,
        };
        let uffd = Uffd::open(wanted, accept).map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => Error::new(ErrorKind::Unsupported, e.to_string()),
            _ => Error::sys("userfaultfd", e),
        })?;
        for (f, name) in
            [(uffd::feature::MOVE, "UFFDIO_MOVE (Linux 6.8)"), (uffd::feature::POISON, "UFFDIO_POISON (Linux 6.6)")]
        {
            if !uffd.has(f) {
                return Err(Error::new(ErrorKind::Unsupported, format!("the kernel lacks {name}")));
            }
        }
        if signal && !uffd.has(uffd::feature::SIGBUS) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "FaultDelivery::Signal: the kernel lacks UFFD_FEATURE_SIGBUS",
            ));
        }
        if config.track_writes && !uffd.has(uffd::feature::WP_ASYNC) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "track_writes: the kernel lacks UFFD_FEATURE_WP_ASYNC (Linux 6.7)",
            ));
        }
        if config.non_cooperative
            && (uffd.origin() == Origin::UserModeOnly
                || !uffd.has(uffd::feature::EVENT_UNMAP | uffd::feature::EVENT_REMAP))
        {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "non_cooperative: needs a full userfaultfd with EVENT_UNMAP and EVENT_REMAP ({})",
                    uffd::PERMISSION_HINT
                ),
            ));
        }
        if uffd.origin() == Origin::UserModeOnly {
            tracing::warn!(
                "userfaultfd is user-mode only: a system call on region memory not in RAM fails with EFAULT; \
                 use Region::pread/pwrite, or AddressSpace::pin(range, PinKind::ShortTerm) around the call ({})",
                uffd::PERMISSION_HINT
            );
        }
        let inner = Mm::new(config, uffd, allowed)?;
        // The handlers hold the space weakly (they stop when it goes) and
        // poll a descriptor of their own.
        let weak = Arc::downgrade(&inner);
        let fd = Arc::new(inner.uffd.fd().try_clone_to_owned().map_err(|e| Error::sys("dup", e))?);
        let config = &inner.config;
        let engine = Engine::start(config.handler_threads, &config.handler_cpus, move |stop| {
            crate::fault::serve(&weak, &fd, stop);
        })?;
        inner.set_engine(engine);
        if inner.config.non_cooperative {
            let reaper = crate::foreign::reaper::Reaper::start().map_err(|e| Error::sys("spawn", e))?;
            let _ = inner.reaper.set(reaper);
        }
        crate::fork::register(&inner);
        if signal {
            crate::fault::signal::register(&inner)?;
        }
        Ok(AddressSpace::from(inner))
    }
}
