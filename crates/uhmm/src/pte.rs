//! uhmm's software page table: one atomic word per touched page, and the
//! page lock with its waiters (the kernel's migration entries and
//! `migration_entry_wait`).
//!
//! The kernel's own page table stays the truth for pages in RAM: an entry in
//! state [`State::Cpu`] says "whatever the kernel has here", a page or a hole.
//! The software entry records what the kernel cannot: that a page lives on a
//! device, is poisoned, or is locked while a migration or a device access
//! holds it. The table is sparse (three levels, leaves allocated on first
//! write), so a 1 TiB region that is never touched costs a few KiB.

use std::sync::OnceLock;
use std::time::Duration;

use crate::sync::{AtomicU64, Condvar, Mutex, Ordering};

use crate::page::{DevicePage, DevicePfn};

const KIND_MASK: u64 = 0b11;
const KIND_CPU: u64 = 0;
const KIND_DEVICE: u64 = 1;
const KIND_POISONED: u64 = 2;
const KIND_EXCLUSIVE: u64 = 3;
/// The page is locked (a migration or a device access holds it).
const LOCKED: u64 = 1 << 2;
/// Threads wait on the condition variable for the lock to go.
const WAITERS: u64 = 1 << 3;
/// Program threads wait inside the kernel on a userfault for this page; the
/// unlocker must `UFFDIO_WAKE` it.
const FAULT_WAITERS: u64 = 1 << 4;
/// Held by the fault engine's zero fill: a lock of microseconds, worth
/// waiting for rather than counting the page busy.
const FILLING: u64 = 1 << 5;
const FLAGS: u64 = LOCKED | WAITERS | FAULT_WAITERS | FILLING;
const PAGEMAP_SHIFT: u32 = 8;
const PFN_SHIFT: u32 = 24;
const PFN_BITS: u32 = 40;

/// Where a page is, as the software page table records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The kernel's page table decides: a RAM page or a hole.
    Cpu,
    /// On a device, at this device page.
    Device(DevicePage),
    /// Lost: every access gets SIGBUS.
    Poisoned,
    /// Held away from the CPU for a device's exclusive access, in this page
    /// of the exclusive holding area; a CPU access takes it back.
    Exclusive(u64),
}

impl State {
    /// The word for this state, without lock bits.
    pub(crate) fn encode(self) -> u64 {
        match self {
            State::Cpu => KIND_CPU,
            State::Poisoned => KIND_POISONED,
            State::Exclusive(slot) => KIND_EXCLUSIVE | ((slot & ((1 << PFN_BITS) - 1)) << PFN_SHIFT),
            State::Device(p) => {
                KIND_DEVICE | (u64::from(p.pagemap) << PAGEMAP_SHIFT) | ((p.pfn.0 & ((1 << PFN_BITS) - 1)) << PFN_SHIFT)
            }
        }
    }

    fn decode(word: u64) -> State {
        match word & KIND_MASK {
            KIND_DEVICE => State::Device(DevicePage {
                pagemap: ((word >> PAGEMAP_SHIFT) & 0xffff) as u16,
                pfn: DevicePfn(word >> PFN_SHIFT),
            }),
            KIND_POISONED => State::Poisoned,
            KIND_EXCLUSIVE => State::Exclusive(word >> PFN_SHIFT),
            _ => State::Cpu,
        }
    }
}

/// A snapshot of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry(u64);

impl Entry {
    /// The page's state.
    pub fn state(self) -> State {
        State::decode(self.0)
    }

    /// Whether the page is locked.
    pub fn locked(self) -> bool {
        self.0 & LOCKED != 0
    }

    /// Whether the page is unlocked and left to the kernel's page table.
    pub fn is_cpu_unlocked(self) -> bool {
        self.0 & (LOCKED | KIND_MASK) == KIND_CPU
    }
}

/// The largest device page number an entry can hold.
pub const MAX_DEVICE_PFN: u64 = (1 << PFN_BITS) - 1;

const FANOUT: usize = 512;
type Leaf = [AtomicU64; FANOUT];
type Mid = [OnceLock<Box<Leaf>>; FANOUT];

/// The software page table of one region.
///
/// # Invariants
///
/// `top.len() * FANOUT * FANOUT >= npages`.
pub(crate) struct PageTable {
    npages: usize,
    top: Box<[OnceLock<Box<Mid>>]>,
}

impl std::fmt::Debug for PageTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageTable").field("npages", &self.npages).finish_non_exhaustive()
    }
}

impl PageTable {
    pub(crate) fn new(npages: usize) -> PageTable {
        let n = npages.div_ceil(FANOUT * FANOUT).max(1);
        PageTable { npages, top: (0..n).map(|_| OnceLock::new()).collect() }
    }

    /// The entry word of page `idx`, allocating its leaf.
    fn slot(&self, idx: usize) -> &AtomicU64 {
        assert!(idx < self.npages, "page index {idx} out of {}", self.npages);
        let mid = self.top[idx / (FANOUT * FANOUT)].get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())));
        let leaf = mid[(idx / FANOUT) % FANOUT].get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
        &leaf[idx % FANOUT]
    }

    /// The entry word of page `idx` if its leaf exists.
    fn peek_slot(&self, idx: usize) -> Option<&AtomicU64> {
        let mid = self.top.get(idx / (FANOUT * FANOUT))?.get()?;
        let leaf = mid[(idx / FANOUT) % FANOUT].get()?;
        Some(&leaf[idx % FANOUT])
    }

    /// Reads page `idx` without allocating.
    pub(crate) fn load(&self, idx: usize) -> Entry {
        Entry(self.peek_slot(idx).map_or(KIND_CPU, |s| s.load(Ordering::Acquire)))
    }

    /// Tries to lock page `idx`; returns its state on success, `None` if it
    /// is already locked. Never waits (the kernel's best-effort
    /// `trylock_page` in `migrate_vma_collect`).
    pub(crate) fn try_lock(&self, idx: usize) -> Option<State> {
        let slot = self.slot(idx);
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            if cur & LOCKED != 0 {
                return None;
            }
            match slot.compare_exchange_weak(cur, cur | LOCKED, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return Some(State::decode(cur)),
                Err(now) => cur = now,
            }
        }
    }

    /// Like [`PageTable::try_lock`], but only when the page is in `expect`.
    pub(crate) fn try_lock_if(&self, idx: usize, expect: State) -> bool {
        let slot = self.slot(idx);
        let want = expect.encode();
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            if cur & LOCKED != 0 || cur & !FLAGS != want {
                return false;
            }
            match slot.compare_exchange_weak(cur, cur | LOCKED, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Like [`PageTable::try_lock_if`] `State::Cpu`, marking the lock as a
    /// short zero fill (see [`PageTable::filling`]).
    pub(crate) fn try_lock_for_fill(&self, idx: usize) -> bool {
        let slot = self.slot(idx);
        let want = State::Cpu.encode();
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            if cur & LOCKED != 0 || cur & !FLAGS != want {
                return false;
            }
            match slot.compare_exchange_weak(cur, cur | LOCKED | FILLING, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Whether page `idx` is locked by a zero fill (released within
    /// microseconds, unless its thread is preempted).
    pub(crate) fn filling(&self, idx: usize) -> bool {
        self.peek_slot(idx).is_some_and(|s| s.load(Ordering::Acquire) & FILLING != 0)
    }

    /// Locks page `idx`, waiting while someone else holds it; returns its state.
    pub(crate) fn lock(&self, idx: usize, waits: &WaitTable) -> State {
        loop {
            if let Some(s) = self.try_lock(idx) {
                return s;
            }
            waits.wait_unlocked(self.slot(idx));
        }
    }

    /// Unlocks page `idx`, setting its state. Wakes lock waiters; returns
    /// whether program threads wait in the kernel on this page (the caller
    /// then wakes them with `UFFDIO_WAKE`, after the unlock).
    #[must_use = "threads waiting on a userfault must be woken"]
    pub(crate) fn unlock(&self, idx: usize, state: State, waits: &WaitTable) -> bool {
        let slot = self.slot(idx);
        let old = slot.swap(state.encode(), Ordering::Release);
        debug_assert!(old & LOCKED != 0, "unlock of an unlocked page {idx}");
        if old & WAITERS != 0 {
            waits.wake_all(slot);
        }
        old & FAULT_WAITERS != 0
    }

    /// Records that a program thread is blocked in a userfault on locked page
    /// `idx`. Returns false if the page is no longer locked (the caller must
    /// then resolve the fault itself).
    pub(crate) fn add_fault_waiter(&self, idx: usize) -> bool {
        let slot = self.slot(idx);
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            if cur & LOCKED == 0 {
                return false;
            }
            if cur & FAULT_WAITERS != 0 {
                return true;
            }
            match slot.compare_exchange_weak(cur, cur | FAULT_WAITERS, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Calls `f(idx, entry)` for every page whose leaf exists, in order.
    pub(crate) fn for_each_allocated(&self, mut f: impl FnMut(usize, Entry)) {
        for (t, mid) in self.top.iter().enumerate() {
            let Some(mid) = mid.get() else { continue };
            for (m, leaf) in mid.iter().enumerate() {
                let Some(leaf) = leaf.get() else { continue };
                let base = (t * FANOUT + m) * FANOUT;
                for (i, slot) in leaf.iter().enumerate() {
                    if base + i < self.npages {
                        f(base + i, Entry(slot.load(Ordering::Acquire)));
                    }
                }
            }
        }
    }

    /// Bytes of metadata this table holds now.
    pub(crate) fn metadata_bytes(&self) -> usize {
        let mut bytes = size_of::<Self>() + self.top.len() * size_of::<OnceLock<Box<Mid>>>();
        for mid in self.top.iter().filter_map(|m| m.get()) {
            bytes += size_of::<Mid>();
            bytes += mid.iter().filter(|l| l.get().is_some()).count() * size_of::<Leaf>();
        }
        bytes
    }
}

/// The longest a thread sleeps on a page lock before it looks at the page
/// again: a safety net for a missed wake-up, not the normal path (an
/// unlock wakes its waiters).
const WAIT_RECHECK: Duration = Duration::from_millis(50);

/// Hashed wait queues for page locks (the kernel's page wait table).
///
/// A waiter sets `WAITERS` on the entry while holding its stripe's mutex and
/// re-checks the lock under it; an unlocker that sees `WAITERS` takes the same
/// mutex before notifying. So a wake-up cannot fall between the check and the
/// wait. The timed wait is only a safety net.
pub(crate) struct WaitTable {
    stripes: Box<[(Mutex<()>, Condvar)]>,
}

impl std::fmt::Debug for WaitTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitTable").field("stripes", &self.stripes.len()).finish()
    }
}

impl WaitTable {
    pub(crate) fn new() -> WaitTable {
        WaitTable { stripes: (0..64).map(|_| (Mutex::new(()), Condvar::new())).collect() }
    }

    fn stripe(&self, slot: &AtomicU64) -> &(Mutex<()>, Condvar) {
        let h = (slot as *const AtomicU64 as usize >> 3).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.stripes[h >> 58]
    }

    /// Blocks until `slot` is unlocked (or a spurious wake-up).
    fn wait_unlocked(&self, slot: &AtomicU64) {
        let (mutex, cv) = self.stripe(slot);
        let guard = mutex.lock().unwrap_or_else(|e| e.into_inner());
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            if cur & LOCKED == 0 {
                return;
            }
            if cur & WAITERS != 0 {
                break;
            }
            match slot.compare_exchange_weak(cur, cur | WAITERS, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        let _unused = cv.wait_timeout(guard, WAIT_RECHECK).unwrap_or_else(|e| e.into_inner());
    }

    fn wake_all(&self, slot: &AtomicU64) {
        let (mutex, cv) = self.stripe(slot);
        let _guard = mutex.lock().unwrap_or_else(|e| e.into_inner());
        cv.notify_all();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    fn dev(pagemap: u16, pfn: u64) -> State {
        State::Device(DevicePage { pagemap, pfn: DevicePfn(pfn) })
    }

    #[test]
    fn encode_roundtrip() {
        for s in
            [State::Cpu, State::Poisoned, State::Exclusive(77), dev(0, 0), dev(7, 12345), dev(u16::MAX, MAX_DEVICE_PFN)]
        {
            assert_eq!(State::decode(s.encode()), s);
        }
    }

    #[test]
    fn untouched_pages_are_cpu_and_cost_nothing() {
        let pt = PageTable::new(1 << 28); // 1 TiB of 4 KiB pages
        assert_eq!(pt.load(123_456_789).state(), State::Cpu);
        assert!(pt.metadata_bytes() < 64 << 10, "{} bytes", pt.metadata_bytes());
        let mut n = 0;
        pt.for_each_allocated(|_, _| n += 1);
        assert_eq!(n, 0);
    }

    #[test]
    fn lock_unlock_and_state() {
        let waits = WaitTable::new();
        let pt = PageTable::new(1024);
        assert_eq!(pt.try_lock(5), Some(State::Cpu));
        assert_eq!(pt.try_lock(5), None, "second try_lock must fail");
        assert!(pt.load(5).locked());
        assert!(!pt.add_fault_waiter(6), "unlocked page takes no fault waiter");
        assert!(pt.add_fault_waiter(5));
        assert!(pt.unlock(5, dev(1, 42), &waits), "fault waiter reported");
        assert_eq!(pt.load(5).state(), dev(1, 42));
        assert!(!pt.load(5).locked());
        assert!(!pt.try_lock_if(5, State::Cpu));
        assert!(pt.try_lock_if(5, dev(1, 42)));
        assert!(!pt.unlock(5, State::Cpu, &waits), "no fault waiter this time");
    }

    #[test]
    fn waiter_sees_unlock() {
        let waits = Arc::new(WaitTable::new());
        let pt = Arc::new(PageTable::new(16));
        assert!(pt.try_lock(3).is_some());
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (pt, waits, done) = (pt.clone(), waits.clone(), done.clone());
            std::thread::spawn(move || {
                let s = pt.lock(3, &waits);
                done.store(true, Ordering::SeqCst);
                let _ = pt.unlock(3, s, &waits);
                s
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(!done.load(Ordering::SeqCst), "waiter must block while locked");
        let _ = pt.unlock(3, State::Poisoned, &waits);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "waiter hung");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(t.join().unwrap(), State::Poisoned);
    }

    #[test]
    fn contended_lock_is_exclusive() {
        let waits = Arc::new(WaitTable::new());
        let pt = Arc::new(PageTable::new(4));
        let inside = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (pt, waits, inside) = (pt.clone(), waits.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        let s = pt.lock(1, &waits);
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        inside.fetch_sub(1, Ordering::SeqCst);
                        let _ = pt.unlock(1, s, &waits);
                    }
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !threads.iter().all(|t| t.is_finished()) {
            assert!(Instant::now() < deadline, "lock holders hung");
            std::thread::sleep(Duration::from_millis(5));
        }
        for t in threads {
            t.join().unwrap();
        }
        assert!(!pt.load(1).locked());
    }
}

/// Model checks of the page-lock protocol with loom: every interleaving of
/// a few threads (and every weak-memory outcome loom models) is explored.
/// A lost wake-up shows as a deadlock, since loom's timed waits never time
/// out. Run with `RUSTFLAGS="--cfg loom" cargo test -p uhmm --lib --release loom`.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicUsize;

    /// Every interleaving with up to three preemptions (loom's bound: the
    /// protocol's races need one or two; unbounded, the spinning CAS loops
    /// make the search run for minutes).
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(3);
        b.check(f);
    }

    /// A table of one page whose leaf exists (std's `OnceLock` allocates
    /// leaves; it is not what is being checked).
    fn table() -> Arc<(PageTable, WaitTable)> {
        let pt = PageTable::new(1);
        assert!(pt.try_lock(0).is_some());
        let _ = pt.unlock(0, State::Cpu, &WaitTable::new());
        Arc::new((pt, WaitTable::new()))
    }

    #[test]
    fn loom_lock_is_exclusive_and_no_wakeup_is_lost() {
        /// Lock, check no one else is inside, unlock into `state`.
        fn hold(t: &(PageTable, WaitTable), inside: &AtomicUsize, state: State) {
            let (pt, waits) = t;
            let _ = pt.lock(0, waits);
            assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
            inside.fetch_sub(1, Ordering::SeqCst);
            let _ = pt.unlock(0, state, waits);
        }
        model(|| {
            let t = table();
            let inside = Arc::new(AtomicUsize::new(0));
            let (t2, inside2) = (t.clone(), inside.clone());
            let other = loom::thread::spawn(move || hold(&t2, &inside2, State::Poisoned));
            hold(&t, &inside, State::Cpu);
            other.join().unwrap();
            assert!(!t.0.load(0).locked());
        });
    }

    #[test]
    fn loom_a_fault_waiter_is_never_forgotten() {
        // The unlocker must learn of every thread that registered as waiting
        // in the kernel while the page was locked, or that thread sleeps
        // forever; a registration after the unlock must fail (the fault
        // handler then resolves the fault itself).
        model(|| {
            let t = table();
            let (pt, _) = &*t;
            assert!(pt.try_lock(0).is_some());
            let t2 = t.clone();
            let fault = loom::thread::spawn(move || t2.0.add_fault_waiter(0));
            let must_wake = pt.unlock(0, State::Cpu, &t.1);
            let registered = fault.join().unwrap();
            assert!(!registered || must_wake, "a registered fault waiter was not reported to the unlocker");
        });
    }

    #[test]
    fn loom_fill_and_migration_locks_exclude_each_other() {
        model(|| {
            let t = table();
            let t2 = t.clone();
            let fill = loom::thread::spawn(move || {
                let ok = t2.0.try_lock_for_fill(0);
                if ok {
                    let _ = t2.0.unlock(0, State::Cpu, &t2.1);
                }
                ok
            });
            let (pt, waits) = &*t;
            let migrated = pt.try_lock(0).is_some();
            let filling_seen = pt.filling(0);
            if migrated {
                assert!(!filling_seen, "a fill lock seen while holding the page");
                let _ = pt.unlock(0, State::Cpu, waits);
            }
            let filled = fill.join().unwrap();
            assert!(filled || migrated, "both lockers failed with the page free at the end");
            assert!(!pt.load(0).locked());
        });
    }
}
