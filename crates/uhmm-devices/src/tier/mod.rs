//! A RAM budget: [`Tier`] keeps the resident pages of the ranges it manages
//! under a number of bytes, demoting the coldest to a [`StoreDevice`] (the
//! compressed store, say) and letting the program's touches bring pages
//! back by their faults — kswapd, the LRU and a memory cgroup's limit, for
//! one address space.
//!
//! - **Reclaim**: a thread (`uhmm-tier`) wakes every round, or when the
//!   resident estimate passes the high watermark (budget − 1/32, once a
//!   fault has had to wait at the budget; the budget itself before, so a
//!   program that fits is left alone), and demotes the coldest resident
//!   pages down to the low watermark (budget − 1/16) with [`StoreDevice::demote`] (the list form of migration,
//!   `migrate_pages`, reason `Reclaim`).
//! - **The budget holds**: the tier is the address space's charge hook
//!   ([`uhmm::ChargeOps`]): a fault that would bring pages in past the
//!   budget waits (up to [`TierConfig::charge_wait`]) while the thread
//!   reclaims, as direct reclaim makes a task wait at a memcg's limit.
//! - **Access tracking** (`ages.rs`, `hint.rs`): pages brought in by faults
//!   are used pages; written pages come from userfaultfd write protection
//!   in async mode (`AddressSpace::written`, needs `Config::track_writes`);
//!   reads from sampled hinting faults. Each page has an estimated rate of
//!   use: the uses seen over the time they could have been seen (away
//!   from RAM, and since the last one); reclaim takes the lowest rates.
//!   The tracking's cost is
//!   timed and held to [`TierConfig::tracking_cpu`] of one CPU by spacing
//!   the scans and sizing the sample.
//! - **Proactive mode** ([`TierConfig::proactive_rate`]): the tier keeps
//!   shrinking below the budget while promotions stay under a target rate.

mod ages;
mod hint;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uhmm::{AddressSpace, ChargeOps, Config, Error, MigrateMode, MigrateReason, PAGE_SIZE, Result};

use crate::store::StoreDevice;
use ages::Ages;
use hint::Hints;

/// Settings of a [`Tier`].
#[derive(Debug, Clone)]
pub struct TierConfig {
    /// The most RAM the managed pages may hold, in bytes (changeable with
    /// [`Tier::set_budget`]). Default: 1 GiB.
    pub budget_bytes: u64,
    /// The shortest time between two tracking rounds; the tracking's cost
    /// may space them further. Default: 50 ms.
    pub interval: Duration,
    /// The length of a generation: at each, the uses and time away seen
    /// decay (halving over 16), and the hinting sample takes pages not
    /// seen used in the current one. Default: 1 s.
    pub generation: Duration,
    /// The share of one CPU access tracking may take (scans and hinting
    /// faults, measured). Default: 0.01 (1%).
    pub tracking_cpu: f64,
    /// Sample reads with hinting faults. Default: true.
    pub hinting: bool,
    /// Proactive mode: keep shrinking below the budget while fewer than
    /// this share of the resident pages come back each minute (Google's
    /// far memory aims at about 0.002). Default: `None` (off).
    pub proactive_rate: Option<f64>,
    /// The longest a fault waits for room at the budget before it goes on
    /// anyway (counted in [`TierStats::overshoots`]). Default: 100 ms.
    pub charge_wait: Duration,
}

impl Default for TierConfig {
    fn default() -> Self {
        TierConfig {
            budget_bytes: 1 << 30,
            interval: Duration::from_millis(50),
            generation: Duration::from_secs(1),
            tracking_cpu: 0.01,
            hinting: true,
            proactive_rate: None,
            charge_wait: Duration::from_millis(100),
        }
    }
}

/// The core configuration an address space under a [`Tier`] wants: writes
/// tracked, and no staging pages kept after a migration (they would be RAM
/// outside the budget).
pub fn space_config() -> Config {
    Config { track_writes: true, keep_staging_bytes: 0, ..Config::default() }
}

/// What a [`Tier`] did and holds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TierStats {
    /// The budget now, bytes.
    pub budget_bytes: u64,
    /// The resident bytes of the managed ranges: the last scan, plus the
    /// pages faults brought in since, less those demoted since.
    pub resident_bytes: u64,
    /// The most `resident_bytes` was seen at (at each round and each fault
    /// that asked for room).
    pub peak_resident_bytes: u64,
    /// Pages demoted by the tier.
    pub demoted_pages: u64,
    /// Pages brought back (faults, or promotions).
    pub promoted_pages: u64,
    /// Promotions a second over the last round.
    pub promotion_rate: f64,
    /// Tracking rounds.
    pub rounds: u64,
    /// Rounds that demoted pages.
    pub reclaim_rounds: u64,
    /// Time the tier's thread spent tracking (scans, hinting faults sent
    /// and taken back), by the wall clock around that work: the thread's
    /// CPU time, and any time it was preempted.
    pub tracking_cpu: Duration,
    /// Time the tier's thread spent demoting, by the wall clock around it
    /// (it includes waiting for the store's workers).
    pub reclaim_cpu: Duration,
    /// Time since the tier started.
    pub wall: Duration,
    /// Hinting faults: sampled pages the CPU took back.
    pub hint_faults: u64,
    /// Faults that waited for room at the budget.
    pub throttled: u64,
    /// Faults that waited [`TierConfig::charge_wait`] and went on without room.
    pub overshoots: u64,
}

/// A RAM budget over ranges of one address space, with a [`StoreDevice`]
/// to demote to; see the module's doc. Dropping it stops its thread and
/// lifts the budget (pages stay where they are).
///
/// ```no_run
/// # fn main() -> uhmm::Result<()> {
/// use std::sync::Arc;
/// use uhmm::{AddressSpace, Prot};
/// use uhmm_devices::compress::{CompressConfig, CompressStore};
/// use uhmm_devices::store::{StoreDevice, StoreDeviceConfig};
/// use uhmm_devices::tier::{Tier, TierConfig, space_config};
///
/// let space = AddressSpace::new(space_config())?;
/// let store = Arc::new(CompressStore::new(CompressConfig::default())?);
/// let dev = Arc::new(StoreDevice::new(&space, store, StoreDeviceConfig::default())?);
/// let tier = Tier::new(&space, dev, TierConfig { budget_bytes: 64 << 20, ..TierConfig::default() })?;
/// let region = space.map(256 << 20, Prot::READ_WRITE)?;
/// tier.manage(region.range())?;
/// // ... use the region: at most 64 MiB of it stays in RAM ...
/// tier.set_budget(32 << 20);
/// println!("{:?}", tier.stats());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Tier {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    space: AddressSpace,
    device: Arc<StoreDevice>,
    config: TierConfig,
    budget_pages: AtomicU64,
    /// Resident pages at the last scan (with the sample out).
    scanned: AtomicU64,
    /// The space's pages in and out when that scan was made.
    base_in: AtomicU64,
    base_out: AtomicU64,
    peak: AtomicU64,
    /// Faults wait on this for room.
    room: (Mutex<u64>, Condvar),
    /// The thread waits on this for work.
    work: (Mutex<bool>, Condvar),
    /// The thread is waiting for work (a fault past the high watermark
    /// wakes it, as an allocation past the low watermark wakes kswapd).
    idle: AtomicBool,
    stop: AtomicBool,
    /// The last reclaim could not get under the limit.
    stalled: AtomicBool,
    /// A fault has had to wait at the budget: from then on reclaim starts
    /// early, at the high watermark, so that faults find room. Until then
    /// a program that fits leaves the gap below the budget in use: its
    /// pages are not demoted to be faulted back.
    pressed: AtomicBool,
    /// The most pages a fault waiting for room asked for.
    asked: AtomicU64,
    state: Mutex<State>,
    counters: Mutex<Counters>,
    started: Instant,
}

/// What the tier's thread works on.
#[derive(Debug)]
struct State {
    ranges: Vec<Ages>,
    hints: Hints,
    /// When the current generation began.
    generation_at: Instant,
    /// Pages sent out per round for hinting (adapts to the cost).
    sample: usize,
    /// The proactive limit, pages (the budget when not proactive).
    proactive_pages: Option<u64>,
    rng: u64,
    last_round: Instant,
    last_promoted: u64,
    /// What the last tracking round cost.
    track_cost: Duration,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    rounds: u64,
    reclaim_rounds: u64,
    demoted: u64,
    tracking: Duration,
    reclaim: Duration,
    hint_faults: u64,
    throttled: u64,
    overshoots: u64,
    promotion_rate: f64,
}

impl Tier {
    /// A tier over `space` demoting to `device` (which must be of `space`).
    /// It is the space's charge hook from now on. Fails with an invalid
    /// argument for a zero budget or interval.
    pub fn new(space: &AddressSpace, device: Arc<StoreDevice>, config: TierConfig) -> Result<Tier> {
        if config.budget_bytes < PAGE_SIZE as u64 || config.interval.is_zero() || config.generation.is_zero() {
            return Err(Error::invalid("TierConfig: budget, interval and generation must be positive"));
        }
        if !(config.tracking_cpu > 0.0 && config.tracking_cpu <= 1.0) {
            return Err(Error::invalid("TierConfig: tracking_cpu must be in (0, 1]"));
        }
        let now = Instant::now();
        let shared = Arc::new(Shared {
            space: space.clone(),
            device,
            budget_pages: AtomicU64::new(config.budget_bytes / PAGE_SIZE as u64),
            scanned: AtomicU64::new(0),
            base_in: AtomicU64::new(0),
            base_out: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            room: (Mutex::new(0), Condvar::new()),
            work: (Mutex::new(false), Condvar::new()),
            idle: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            pressed: AtomicBool::new(false),
            asked: AtomicU64::new(0),
            state: Mutex::new(State {
                ranges: Vec::new(),
                hints: Hints::new(),
                generation_at: now,
                sample: 64,
                proactive_pages: None,
                rng: 0x9e37_79b9_7f4a_7c15,
                last_round: now,
                last_promoted: 0,
                track_cost: Duration::ZERO,
            }),
            counters: Mutex::default(),
            started: now,
            config,
        });
        shared.rebase(0);
        let weak = Arc::downgrade(&shared);
        let thread = std::thread::Builder::new()
            .name("uhmm-tier".into())
            .spawn(move || run(&weak))
            .map_err(|e| Error::sys("spawn uhmm-tier", e))?;
        let hook: Weak<dyn ChargeOps> = Arc::downgrade(&shared) as Weak<Shared>;
        space.set_charge(Some(hook));
        Ok(Tier { shared, thread: Some(thread) })
    }

    /// Puts the pages of `range` (page-aligned, inside one private
    /// anonymous region) under the budget.
    pub fn manage(&self, range: Range<usize>) -> Result<()> {
        let s = &self.shared;
        let resident = s.space.resident(range.clone())?;
        let mut state = s.lock_state();
        if state.ranges.iter().any(|a| a.range.start < range.end && range.start < a.range.end) {
            return Err(Error::invalid("the range overlaps one the tier manages"));
        }
        let mut ages = Ages::new(range.clone());
        let n = ages.set_resident(&resident, s.secs()) as u64;
        state.ranges.push(ages);
        if s.config.hinting {
            state.hints.watch(&s.space, range);
        }
        drop(state);
        s.scanned.fetch_add(n, Ordering::Relaxed);
        s.kick();
        Ok(())
    }

    /// Takes `range` (as given to [`manage`](Tier::manage)) out of the
    /// tier; its pages stay where they are. Call it before unmapping the
    /// region.
    pub fn unmanage(&self, range: Range<usize>) {
        let mut state = self.shared.lock_state();
        let taken = state.hints.take_back(&self.shared.space);
        for run in taken {
            for a in state.ranges.iter_mut().filter(|a| a.range.start <= run.start && run.end <= a.range.end) {
                a.mark_resident(run.clone());
            }
        }
        state.hints.unwatch(&range);
        state.ranges.retain(|a| a.range != range);
        // Its RAM leaves the estimate now, not at the next scan: a program
        // that frees and allocates would otherwise seem to grow.
        let resident: usize = self.shared.space.resident(range).map_or(0, |runs| runs.iter().map(Range::len).sum());
        let pages = (resident / PAGE_SIZE) as u64;
        let _ =
            self.shared.scanned.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| Some(s.saturating_sub(pages)));
    }

    /// Changes the budget; a lower one is reclaimed down to at once.
    pub fn set_budget(&self, bytes: u64) -> Result<()> {
        if bytes < PAGE_SIZE as u64 {
            return Err(Error::invalid("a budget must be at least a page"));
        }
        self.shared.budget_pages.store(bytes / PAGE_SIZE as u64, Ordering::Relaxed);
        self.shared.kick();
        Ok(())
    }

    /// The budget, bytes.
    pub fn budget(&self) -> u64 {
        self.shared.budget_pages.load(Ordering::Relaxed) * PAGE_SIZE as u64
    }

    /// What the tier did and holds.
    pub fn stats(&self) -> TierStats {
        let s = &self.shared;
        let c = *s.counters.lock().unwrap_or_else(|e| e.into_inner());
        let dev = s.device.counters();
        TierStats {
            budget_bytes: self.budget(),
            resident_bytes: s.estimate() * PAGE_SIZE as u64,
            peak_resident_bytes: s.peak.load(Ordering::Relaxed) * PAGE_SIZE as u64,
            demoted_pages: c.demoted,
            promoted_pages: dev.promoted,
            promotion_rate: c.promotion_rate,
            rounds: c.rounds,
            reclaim_rounds: c.reclaim_rounds,
            tracking_cpu: c.tracking,
            reclaim_cpu: c.reclaim,
            wall: s.started.elapsed(),
            hint_faults: c.hint_faults,
            throttled: c.throttled,
            overshoots: c.overshoots,
        }
    }

    /// The addresses of the `n` managed pages the tracking counts hottest
    /// (highest estimated rate of use), hottest first.
    pub fn hottest(&self, n: usize) -> Vec<usize> {
        let now = self.shared.secs();
        let state = self.shared.lock_state();
        let mut all: Vec<(f32, usize)> =
            state.ranges.iter().flat_map(|a| (0..a.npages()).map(move |i| (a.rate(i, now), a.addr(i)))).collect();
        let n = n.min(all.len());
        if n == 0 {
            return Vec::new();
        }
        let hotter = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0);
        all.select_nth_unstable_by(n - 1, hotter);
        all.truncate(n);
        all.sort_unstable_by(hotter);
        all.into_iter().map(|(_, a)| a).collect()
    }
}

impl Drop for Tier {
    fn drop(&mut self) {
        self.shared.space.set_charge(None);
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut state = self.shared.lock_state();
        let space = self.shared.space.clone();
        state.hints.take_back(&space);
        // Faults waiting for room go on.
        self.shared.room.1.notify_all();
    }
}

impl Shared {
    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Seconds since the tier started: the time of the page bookkeeping.
    fn secs(&self) -> f32 {
        self.started.elapsed().as_secs_f32()
    }

    /// A scan found `resident` pages: the estimate starts again from it.
    fn rebase(&self, resident: u64) {
        self.base_in.store(self.space.pages_in_at_scan(), Ordering::Relaxed);
        self.base_out.store(self.space.stats().pages_to_device, Ordering::Relaxed);
        self.scanned.store(resident, Ordering::Relaxed);
    }

    /// Resident pages now, estimated.
    fn estimate(&self) -> u64 {
        let came = self.space.pages_in().saturating_sub(self.base_in.load(Ordering::Relaxed));
        let went = self.space.stats().pages_to_device.saturating_sub(self.base_out.load(Ordering::Relaxed));
        let now = (self.scanned.load(Ordering::Relaxed) + came).saturating_sub(went);
        self.peak.fetch_max(now, Ordering::Relaxed);
        now
    }

    /// The limit reclaim works to, pages: the budget, or the proactive
    /// limit below it.
    fn limit(&self, state: &State) -> u64 {
        let budget = self.budget_pages.load(Ordering::Relaxed);
        state.proactive_pages.map_or(budget, |p| p.min(budget))
    }

    /// Wakes the thread.
    fn kick(&self) {
        *self.work.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.work.1.notify_one();
    }
}

impl ChargeOps for Shared {
    fn charge(&self, pages: usize) {
        let budget = self.budget_pages.load(Ordering::Relaxed);
        // A window larger than an eighth of the budget is charged as that
        // much: its excess is the slack (docs/tier.md).
        let pages = (pages as u64).min(budget / 8).max(1) as usize;
        let after = self.estimate() + pages as u64;
        if after <= budget || self.stop.load(Ordering::Relaxed) {
            if after > self.high_watermark(budget, false) && self.idle.swap(false, Ordering::Relaxed) {
                self.kick();
            }
            return;
        }
        self.counters().throttled += 1;
        self.pressed.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + self.config.charge_wait;
        let (lock, cv) = &self.room;
        let mut rounds = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            self.asked.fetch_max(pages as u64, Ordering::Relaxed);
            self.kick();
            let now = Instant::now();
            if now >= deadline {
                self.counters().overshoots += 1;
                return;
            }
            let seen = *rounds;
            let (guard, _) = cv
                .wait_timeout(rounds, (deadline - now).min(Duration::from_millis(5)))
                .unwrap_or_else(|e| e.into_inner());
            rounds = guard;
            let budget = self.budget_pages.load(Ordering::Relaxed);
            if self.estimate() + pages as u64 <= budget || self.stop.load(Ordering::Relaxed) {
                return;
            }
            if *rounds != seen && self.estimate() + pages as u64 > budget && self.stalled() {
                // A round ran and found nothing it could demote.
                self.counters().overshoots += 1;
                return;
            }
        }
    }
}

impl Shared {
    /// Pages past which reclaim starts, under a limit of `limit` pages:
    /// the limit less 1/32 once a fault had to wait at the budget, or in
    /// `proactive` mode; the limit itself before (a program that fits).
    fn high_watermark(&self, limit: u64, proactive: bool) -> u64 {
        if proactive || self.pressed.load(Ordering::Relaxed) { limit - limit / 32 } else { limit }
    }

    /// Whether the last reclaim could not get under the limit.
    fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// One round: tracking when due, reclaim when over the high watermark.
    fn round(&self) {
        let mut state = self.lock_state();
        let now = Instant::now();
        let due = now.duration_since(state.last_round) >= self.config.interval.max(state.spacing(&self.config));
        if due {
            self.track(&mut state, now);
        }
        // A tracking round has just scanned: reclaim works from that scan.
        self.reclaim(&mut state, !due);
        if due && self.config.hinting {
            self.sample(&mut state);
        }
    }

    /// Reads what was used since the last round: hinting faults, pages that
    /// came in, pages written; starts a new generation when one is due.
    fn track(&self, state: &mut State, now: Instant) {
        let t0 = Instant::now();
        if now.duration_since(state.generation_at) >= self.config.generation {
            state.generation_at = now;
            state.ranges.iter_mut().for_each(Ages::age);
        }
        let secs = self.secs();
        let touched = state.hints.drain_touched();
        let hint_faults: usize = touched.iter().map(|r| r.len() / PAGE_SIZE).sum();
        for run in touched {
            state.ranges.iter_mut().for_each(|a| a.touch(run.clone(), secs));
        }
        for run in state.hints.take_back(&self.space) {
            state.ranges.iter_mut().for_each(|a| a.mark_resident(run.clone()));
        }
        let resident = self.scan(state);
        if self.space.config().track_writes {
            for a in &mut state.ranges {
                for run in self.space.written(a.range.clone()).unwrap_or_default() {
                    a.touch(run, secs);
                }
            }
        }
        // Promotions a second, and the proactive limit that follows them.
        let promoted = self.device.counters().promoted;
        let secs = now.duration_since(state.last_round).as_secs_f64().max(1e-3);
        let rate = promoted.saturating_sub(state.last_promoted) as f64 / secs;
        state.last_promoted = promoted;
        state.last_round = now;
        if let Some(target) = self.config.proactive_rate {
            let budget = self.budget_pages.load(Ordering::Relaxed);
            let limit = state.proactive_pages.unwrap_or(budget).min(budget);
            let share_a_minute = rate * 60.0 / resident.max(1) as f64;
            let next = if share_a_minute < target { limit - limit / 100 } else { limit + limit / 50 };
            state.proactive_pages = Some(next.clamp(1, budget));
        }
        state.track_cost = t0.elapsed();
        let mut c = self.counters();
        c.rounds += 1;
        c.tracking += state.track_cost;
        c.hint_faults += hint_faults as u64;
        c.promotion_rate = rate;
    }

    /// Scans the managed ranges' resident pages (a page that came in is a
    /// used page) and starts the estimate again from them. Returns them.
    fn scan(&self, state: &mut State) -> u64 {
        let secs = self.secs();
        let mut resident = 0;
        state.ranges.retain_mut(|a| match self.space.resident(a.range.clone()) {
            Ok(runs) => {
                resident += a.set_resident(&runs, secs) as u64;
                true
            }
            Err(err) => {
                tracing::debug!(%err, "tier: a managed range is gone");
                false
            }
        });
        self.rebase(resident + state.hints.pages_out() as u64);
        resident
    }

    /// Demotes the coldest resident pages when the estimate is past the
    /// high watermark, down to the low one.
    fn reclaim(&self, state: &mut State, rescan: bool) {
        let limit = self.limit(state);
        let high = self.high_watermark(limit, state.proactive_pages.is_some());
        // Room for the largest fault waiting, too.
        let asked = self.asked.swap(0, Ordering::Relaxed);
        if self.estimate() + asked <= high {
            self.stalled.store(false, Ordering::Relaxed);
            return;
        }
        let t0 = Instant::now();
        let resident = if rescan { self.scan(state) } else { self.scanned.load(Ordering::Relaxed) };
        let low = (limit - limit / 16).min(limit.saturating_sub(asked));
        let want = usize::try_from(self.estimate().saturating_sub(low)).unwrap_or(usize::MAX);
        if want == 0 {
            return;
        }
        let secs = self.secs();
        let mut cands: Vec<(f32, usize, usize)> = Vec::with_capacity(resident as usize);
        for (r, a) in state.ranges.iter().enumerate() {
            cands.extend((0..a.npages()).filter(|&i| a.reclaimable(i, secs)).map(|i| (a.rate(i, secs), r, i)));
        }
        let n = want.min(cands.len());
        if n == 0 {
            self.stalled.store(true, Ordering::Relaxed);
            return;
        }
        cands.select_nth_unstable_by(n - 1, |a, b| a.0.total_cmp(&b.0));
        cands.truncate(n);
        let addrs: Vec<usize> = cands.iter().map(|&(_, r, i)| state.ranges[r].addr(i)).collect();
        let (moved, not_moved) = match self.device.demote(&addrs, MigrateMode::Async, MigrateReason::Reclaim) {
            Ok(out) => {
                for &(_, r, i) in &cands {
                    let a = &mut state.ranges[r];
                    if out.moved.binary_search(&a.addr(i)).is_ok() {
                        a.evict(i, secs);
                    } else {
                        a.hold(i, secs);
                    }
                }
                (out.moved.len(), out.not_moved.len())
            }
            Err(err) => {
                tracing::warn!(%err, "tier: demotion failed");
                (0, addrs.len())
            }
        };
        self.stalled.store(moved == 0, Ordering::Relaxed);
        let cost = t0.elapsed();
        let mut c = self.counters();
        c.reclaim_rounds += 1;
        c.reclaim += cost;
        c.demoted += moved as u64;
        drop(c);
        tracing::debug!(
            target: "uhmm::tier",
            resident_pages = resident,
            limit_pages = limit,
            demoted = moved,
            not_moved,
            micros = cost.as_micros() as u64,
            "reclaim round"
        );
    }

    /// Sends a sample of resident pages not seen used this generation out
    /// for hinting faults, in runs of up to 8 neighbours.
    fn sample(&self, state: &mut State) {
        let t0 = Instant::now();
        let total: usize = state.ranges.iter().map(Ages::npages).sum();
        let budget = usize::try_from(self.budget_pages.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
        let want = state.sample.min(budget / 64).max(1);
        // Pages not seen used this generation.
        let since = state.generation_at.duration_since(self.started).as_secs_f32();
        let mut sent = 0;
        for _ in 0..want * 4 {
            if sent >= want || total == 0 {
                break;
            }
            state.rng ^= state.rng << 13;
            state.rng ^= state.rng >> 7;
            state.rng ^= state.rng << 17;
            let mut k = (state.rng % total as u64) as usize;
            let r = state.ranges.iter().position(|a| {
                let fits = k < a.npages();
                if !fits {
                    k -= a.npages();
                }
                fits
            });
            let Some(r) = r else { break };
            let a = &state.ranges[r];
            let cold = |i: usize| a.is_resident(i) && !a.used_since(i, since);
            if !cold(k) {
                continue;
            }
            let mut end = k + 1;
            while end < a.npages() && end - k < 8 && cold(end) {
                end += 1;
            }
            let run = a.addr(k)..a.addr(end);
            sent += state.hints.send(&self.space, run);
        }
        self.scanned.fetch_add(sent as u64, Ordering::Relaxed);
        let cost = t0.elapsed();
        state.track_cost += cost;
        // Size the next sample so that a round costs its share of the
        // interval, aiming below it so that noise stays within the share.
        let allowed = self.config.interval.mul_f64(self.config.tracking_cpu * TRACKING_AIM);
        state.sample = if state.track_cost > allowed {
            (state.sample * 3 / 4).max(8)
        } else {
            (state.sample * 5 / 4 + 1).min(4096)
        };
        self.counters().tracking += cost;
    }
}

impl State {
    /// How far apart rounds must be for the tracking to stay within its
    /// share of a CPU.
    fn spacing(&self, config: &TierConfig) -> Duration {
        self.track_cost.div_f64(config.tracking_cpu * TRACKING_AIM)
    }
}

/// The share of [`TierConfig::tracking_cpu`] that the spacing of rounds
/// and the hinting sample are sized for: a round's cost varies with the
/// load, and the controllers settle around their aim.
const TRACKING_AIM: f64 = 0.8;

/// The tier's thread: a round each interval, or when kicked.
fn run(shared: &Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        let wait = {
            let state = s.lock_state();
            s.config.interval.max(state.spacing(&s.config))
        };
        {
            let (lock, cv) = &s.work;
            let mut kicked = lock.lock().unwrap_or_else(|e| e.into_inner());
            if !*kicked {
                s.idle.store(true, Ordering::Relaxed);
                kicked = cv.wait_timeout(kicked, wait).unwrap_or_else(|e| e.into_inner()).0;
                s.idle.store(false, Ordering::Relaxed);
            }
            *kicked = false;
        }
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        s.round();
        *s.room.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        s.room.1.notify_all();
    }
}
