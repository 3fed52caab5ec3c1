//! [`Config`]: the tunables of an address space, each with its default.

/// The most fault-handling threads `handler_threads: 0` starts (one per
/// CPU): past a few, a fault wakes more threads than it needs.
pub const AUTO_HANDLERS_MAX: usize = 8;

/// Who answers the faults of an address space's regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FaultDelivery {
    /// The handler threads read each fault from the userfaultfd and wake
    /// the faulting thread when its page is in: any access waits, a system
    /// call's too.
    #[default]
    Handlers,
    /// The faulting thread answers its own fault, in a SIGBUS handler
    /// (`UFFD_FEATURE_SIGBUS`): no thread is woken, about half a fault's
    /// cost on a virtual machine. A system call given region memory that
    /// is not in RAM fails with `EFAULT` (as with user-mode-only
    /// userfaultfd: use `Region::pread`/`pwrite`, or pin around the call).
    /// The process's SIGBUS handler is uhmm's from then on; a SIGBUS that
    /// is not a region's fault goes to the handler installed before.
    Signal,
}

/// Tunables of an address space.
///
/// Start from [`Config::default`] and change the fields that matter; each
/// field's doc gives its default.
///
/// ```
/// # fn main() -> uhmm::Result<()> {
/// let config = uhmm::Config {
///     handler_threads: 2,                    // two threads poll the userfaultfd, anywhere
///     staging_bytes: 256 << 20,              // at most 256 MiB in flight at once
///     ..uhmm::Config::default()
/// };
/// let space = uhmm::AddressSpace::new(config)?;
/// assert_eq!(space.config().handler_threads, 2);
/// assert_eq!(space.config().fault_around_pages, 16);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    /// Fault-handling threads (each polls the one userfaultfd). 0: one on
    /// each CPU this process may use (at most [`AUTO_HANDLERS_MAX`]), each
    /// kept on its CPU, unless `handler_cpus` names the CPUs (then one on
    /// each of those). Every handler wakes on a fault and the first to read
    /// it serves it: the one on the faulting CPU, idle since the faulting
    /// thread sleeps, gets there first without the cross-CPU wake-up a
    /// single handler pays (tens of microseconds on virtual machines whose
    /// idle vCPUs halt; the repository's `docs/decisions.md` has the
    /// numbers). [`AddressSpace::config`](crate::AddressSpace::config)
    /// reports the number chosen. Default: 0.
    pub handler_threads: usize,
    /// CPUs the fault-handling threads run on: thread `i` on
    /// `handler_cpus[i % len]` alone. Empty: with `handler_threads: 0`, one
    /// on each CPU; otherwise wherever the scheduler puts them. A runtime
    /// may keep them beside, or away from, the threads that fault; each
    /// CPU must be one this process may use. Default: empty.
    pub handler_cpus: Vec<usize>,
    /// Pages a CPU fault on device memory may bring back at once (the
    /// fault-around window offered to `migrate_to_ram`); at least 1. 1 is
    /// the kernel's behaviour, and turns the adaptive growth
    /// ([`fault_around_max_pages`](Config::fault_around_max_pages)) and
    /// read-ahead off. Default: 16.
    pub fault_around_pages: usize,
    /// The largest fault-around window: while faults run sequentially
    /// through a region, up or down (glibc's memcpy copies large buffers
    /// backwards), each window doubles up to this, reaching on in the
    /// scan's direction; a fault elsewhere starts again from
    /// `fault_around_pages`. Default: 512 (2 MiB).
    pub fault_around_max_pages: usize,
    /// Windows an idle fault handler brings back ahead of a sequential scan
    /// of device pages, in the scan's direction, before the scan faults on
    /// them (the scan then reads one window while the next comes back; 2
    /// made 1 GiB scans 1.6-2.3x faster here). The last leaves its first
    /// page on the device, a marker: the scan's fault there brings back
    /// that page alone, and as many windows again, while the scan reads
    /// on (a further 1.4-1.6x here). Off by default because pages the
    /// program never touches come back, and a read-ahead's pages can be
    /// read before its device pages are freed, as with a migration run by
    /// another thread. `fault_around_pages: 1` turns it off too.
    /// Default: 0 (off).
    pub read_ahead_windows: usize,
    /// Pages a first-touch fault zero-fills at once (an aligned window);
    /// while first touches run sequentially the window doubles up to
    /// `fault_around_max_pages`. At least 1; 1 turns both off. Default: 16.
    pub zero_fill_pages: usize,
    /// Bytes of address space for each staging arena; bounds the pages that
    /// can be in flight at once. Reserved address space: RAM is used only by
    /// the pages in it (in flight, or kept: `keep_staging_bytes`).
    /// Default: 1 GiB (`1 << 30`).
    pub staging_bytes: usize,
    /// Fall back to `UFFD_USER_MODE_ONLY` when full userfaultfd is refused
    /// (then a system call that touches a page not in RAM — on a device,
    /// in flight, or never touched — fails with `EFAULT` instead of waiting
    /// for it; see [`AddressSpace::user_mode_only`](crate::AddressSpace::user_mode_only)). Default: true.
    pub allow_user_mode_only: bool,
    /// Use a user-mode-only userfaultfd even where a full one could be had:
    /// what a process without the privileges gets, for testing a program
    /// (or uhmm) in that mode. Default: false.
    pub force_user_mode_only: bool,
    /// Bytes of RAM pages that migrations to devices leave in staging that
    /// may be kept, up to `staging_bytes`, for `keep_staging_for`: a
    /// migration back to RAM from driver memory copies into them and moves
    /// them in, rather than having the kernel allocate new pages. 0 frees
    /// them at once. Default: 1 GiB (`1 << 30`).
    pub keep_staging_bytes: usize,
    /// How long kept staging pages wait for a copy back to RAM before their
    /// memory returns to the system (counted from the last time one was
    /// kept or used). Default: 1 s.
    pub keep_staging_for: std::time::Duration,
    /// Track writes to the pages of private anonymous regions with
    /// userfaultfd write protection in async mode (`UFFD_FEATURE_WP_ASYNC`,
    /// Linux 6.7), so that [`AddressSpace::written`](crate::AddressSpace::written)
    /// can say which pages were written since it last looked. The kernel
    /// resolves such a write itself (a minor fault, no uhmm thread), once
    /// per page after each look. Default: false.
    pub track_writes: bool,
    /// Watch for the program's own `munmap` and `mremap` of region memory,
    /// made behind uhmm's back (a raw system call, another library), with
    /// userfaultfd's non-cooperative events (`UFFD_FEATURE_EVENT_UNMAP`,
    /// `EVENT_REMAP`): an unmapped part is given up (its device pages
    /// freed, its addresses never touched again), a moved part becomes a
    /// region at its new address with its pages, device pages included.
    /// Needs a full userfaultfd. Each such call waits until a handler
    /// thread has read its event. Default: false (`uhmm run` sets it).
    pub non_cooperative: bool,
    /// Who answers a fault: the handler threads (the default), or the
    /// faulting thread itself in a SIGBUS handler ([`FaultDelivery`]).
    pub fault_delivery: FaultDelivery,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            handler_threads: 0,
            handler_cpus: Vec::new(),
            fault_around_pages: 16,
            fault_around_max_pages: 512,
            read_ahead_windows: 0,
            zero_fill_pages: 16,
            staging_bytes: 1 << 30,
            allow_user_mode_only: true,
            force_user_mode_only: false,
            keep_staging_bytes: 1 << 30,
            keep_staging_for: std::time::Duration::from_secs(1),
            track_writes: false,
            non_cooperative: false,
            fault_delivery: FaultDelivery::Handlers,
        }
    }
}
