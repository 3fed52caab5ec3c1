//! Remote stores: pages kept on another machine's memory. [`RedisStore`]
//! is a [`PageStore`] on a Redis server or a Redis Cluster, through the
//! `redis` crate's synchronous API (no async runtime: the device already
//! runs puts on worker threads and gets on fault-handler threads).
//!
//! Neighbouring pages (a group of [`RedisConfig::group_pages`], aligned in
//! the address space) become one value, `SET uhmm:NS:N VALUE PX TTL`, where
//! `N` is a group number never reused by the store (so a late `UNLINK` of
//! a dead group can never hit a new one, and a value read back is never
//! another group's). A `put` is one pipeline per node; a fault is one `GET`
//! per group; the last page of a group deleted queues the group's `UNLINK`
//! for a background thread, which also refreshes every value's expiry and
//! at drop removes the namespace's keys. Faults, writes and the background
//! thread each use their own connections. A forked child's copy of the
//! store reads but neither stores nor deletes (the values are the
//! parent's), and opens connections of its own. See `docs/far-memory.md`.

mod config;
mod net;

pub use config::{MAX_GROUP_PAGES, RedisConfig, RedisEndpoint};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redis::Value;
use uhmm::{Error, ErrorKind, PAGE_SIZE, Result};

use crate::store::{Got, PageStore, RunIn, RunOut, StoreUsage, check_runs_in, check_runs_out};
use net::{Net, Op, Outcome, Role};

/// Every value starts with this, then the page count (u32) and the group
/// number (u64), little-endian: a value is checked against the key it was
/// read from before its pages are used.
const MAGIC: &[u8; 4] = b"UHR1";
const HEADER: usize = 16;

/// Keys per pipeline of the background thread (deletes, expiry refreshes).
const BG_BATCH: usize = 4096;

/// The counters of a [`RedisStore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedisStats {
    /// Pipelines sent (each one round trip to one node), all roles.
    pub round_trips: u64,
    /// Of them, the pipelines of `put`s (one per node per try).
    pub put_round_trips: u64,
    /// Of them, the pipelines of `get`s (one per node per try).
    pub get_round_trips: u64,
    /// Values (groups) stored and acknowledged.
    pub values_set: u64,
    /// Values read back.
    pub values_got: u64,
    /// Values deleted (their last page deleted, or removed at drop).
    pub values_deleted: u64,
    /// Bytes of values sent (acknowledged or not).
    pub bytes_sent: u64,
    /// Bytes of values received.
    pub bytes_received: u64,
    /// Tries of a put or get again after a transient failure.
    pub retries: u64,
    /// Connections opened.
    pub connects: u64,
    /// Connections opened to a node after a connection to it failed (it
    /// was down, or a round trip broke: the connection was dropped).
    pub reconnects: u64,
    /// `MOVED` and `ASK` redirections followed.
    pub redirects: u64,
    /// Cluster slot maps read.
    pub topology_refreshes: u64,
    /// Expiry refreshes sent (one per value per refresh).
    pub expiry_refreshes: u64,
    /// Pages reported lost: the value gone, wrong, or the server not back
    /// before `fault_timeout`.
    pub lost_pages: u64,
    /// Pages a put did not store (the server down or refusing): left in
    /// RAM.
    pub failed_puts: u64,
}

#[derive(Debug, Default)]
struct Counters {
    put_round_trips: AtomicU64,
    get_round_trips: AtomicU64,
    values_set: AtomicU64,
    values_got: AtomicU64,
    values_deleted: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    retries: AtomicU64,
    expiry_refreshes: AtomicU64,
    lost_pages: AtomicU64,
    failed_puts: AtomicU64,
}

/// A [`PageStore`] on Redis (see the module docs).
#[derive(Debug)]
pub struct RedisStore {
    shared: Arc<Shared>,
    /// To the background thread.
    tx: mpsc::Sender<Msg>,
    bg: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    config: RedisConfig,
    net: Net,
    state: Mutex<State>,
    next_group: AtomicU64,
    counters: Counters,
}

/// Which group holds each key, and the live groups.
#[derive(Debug, Default)]
struct State {
    /// By key: (group, index in it); group 0 is none.
    entries: Vec<(u64, u32)>,
    groups: HashMap<u64, Group>,
    pages: u64,
    /// Bytes of the live values, and of those being put.
    used_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct Group {
    pages: u32,
    live: u32,
    bytes: u64,
}

enum Msg {
    /// Groups whose values to remove.
    Delete(Vec<u64>),
    Stop,
}

impl RedisStore {
    /// A store with `config`; a config that
    /// [`validate`](RedisConfig::validate) refuses is an invalid argument.
    /// It connects lazily: a server down now makes puts fail (the pages
    /// stay in RAM) until it is up; [`ping`](Self::ping) checks it.
    pub fn new(config: RedisConfig) -> Result<RedisStore> {
        config.validate()?;
        let shared = Arc::new(Shared {
            net: Net::new(config.clone()),
            config,
            state: Mutex::default(),
            next_group: AtomicU64::new(1),
            counters: Counters::default(),
        });
        shared.net.refresh_slots();
        let (tx, rx) = mpsc::channel();
        let bg = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("uhmm-redis-bg".into())
                .spawn(move || shared.background(rx))
                .map_err(|e| Error::new(ErrorKind::Sys, format!("redis store: background thread: {e}")))?
        };
        Ok(RedisStore { shared, tx, bg: Mutex::new(Some(bg)) })
    }

    /// Its settings.
    pub fn config(&self) -> &RedisConfig {
        &self.shared.config
    }

    /// The pattern of this store's keys (`uhmm:NAMESPACE:*`), for `SCAN`.
    pub fn key_pattern(&self) -> String {
        format!("uhmm:{}:*", self.shared.config.namespace)
    }

    /// Sends `PING` to every primary; an error names the first that did
    /// not answer.
    pub fn ping(&self) -> Result<()> {
        let net = &self.shared.net;
        net.refresh_slots();
        let nodes = net.primaries();
        if nodes.is_empty() {
            return Err(Error::new(ErrorKind::Sys, "redis store: no cluster node answered"));
        }
        for a in nodes {
            match net.on_node(&a, Role::Background, &[redis::cmd("PING")]) {
                Ok(v) if !matches!(v.first(), Some(Value::ServerError(_)) | None) => {}
                Ok(v) => return Err(Error::new(ErrorKind::Sys, format!("redis store: {a}: {v:?}"))),
                Err(Outcome::Transient(e) | Outcome::Refused(e)) => {
                    return Err(Error::new(ErrorKind::Sys, format!("redis store: {a}: {e}")));
                }
                Err(Outcome::Value(v)) => return Err(Error::new(ErrorKind::Sys, format!("redis store: {a}: {v:?}"))),
            }
        }
        Ok(())
    }

    /// Removes every value of this store's namespace now, as dropping it
    /// does: for an owner that is never dropped (a process at exit). Pages
    /// still on the device are lost after it. A forked child's copy removes
    /// nothing (the values are its parent's).
    pub fn remove_all(&self) {
        if !self.shared.net.forked() {
            self.shared.remove_all();
        }
    }

    /// The counters.
    pub fn stats(&self) -> RedisStats {
        let c = &self.shared.counters;
        let n = &self.shared.net.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RedisStats {
            round_trips: l(&n.round_trips),
            put_round_trips: l(&c.put_round_trips),
            get_round_trips: l(&c.get_round_trips),
            values_set: l(&c.values_set),
            values_got: l(&c.values_got),
            values_deleted: l(&c.values_deleted),
            bytes_sent: l(&c.bytes_sent),
            bytes_received: l(&c.bytes_received),
            retries: l(&c.retries),
            connects: l(&n.connects),
            reconnects: l(&n.reconnects),
            redirects: l(&n.redirects),
            topology_refreshes: l(&n.topology_refreshes),
            expiry_refreshes: l(&c.expiry_refreshes),
            lost_pages: l(&c.lost_pages),
            failed_puts: l(&c.failed_puts),
        }
    }

    fn queue_delete(&self, groups: Vec<u64>) {
        // A forked child deletes nothing: the values are its parent's too.
        if !groups.is_empty() && !self.shared.net.forked() && self.tx.send(Msg::Delete(groups)).is_err() {
            tracing::warn!("redis store: background thread gone; values left to their expiry");
        }
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        if self.shared.net.forked() {
            // A forked child's copy: the values and the background thread
            // are the parent's.
            if let Some(bg) = self.bg.lock().unwrap_or_else(|e| e.into_inner()).take() {
                std::mem::forget(bg);
            }
            return;
        }
        let _ = self.tx.send(Msg::Stop);
        if let Some(bg) = self.bg.lock().unwrap_or_else(|e| e.into_inner()).take()
            && bg.join().is_err()
        {
            tracing::error!("redis store: background thread panicked");
        }
        self.shared.remove_all();
    }
}

impl Shared {
    fn key(&self, group: u64) -> String {
        format!("uhmm:{}:{group}", self.config.namespace)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The background thread: queued deletes, expiry refreshes; on `Stop`,
    /// the deletes left.
    fn background(&self, rx: mpsc::Receiver<Msg>) {
        let every = self.config.ttl / 4;
        let mut next_refresh = Instant::now() + every;
        let mut pending: Vec<u64> = Vec::new();
        let mut tries = 0u32;
        loop {
            let wait = if pending.is_empty() {
                next_refresh.saturating_duration_since(Instant::now())
            } else {
                // Deletes that failed: again a little later.
                Duration::from_millis(200)
            };
            let mut stop = false;
            match rx.recv_timeout(wait) {
                Ok(Msg::Delete(g)) => pending.extend(g),
                Ok(Msg::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => stop = true,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            while let Ok(m) = rx.try_recv() {
                match m {
                    Msg::Delete(g) => pending.extend(g),
                    Msg::Stop => stop = true,
                }
            }
            if !pending.is_empty() {
                let before = pending.len();
                pending = self.unlink(std::mem::take(&mut pending));
                tries = if pending.len() < before { 0 } else { tries + 1 };
                if tries > 20 {
                    tracing::warn!(values = pending.len(), "redis store: deletes keep failing; left to expiry");
                    pending.clear();
                    tries = 0;
                }
            }
            if stop {
                return;
            }
            if Instant::now() >= next_refresh {
                self.refresh_expiry();
                next_refresh = Instant::now() + every;
            }
        }
    }

    /// Removes the values of `groups`; returns those not removed.
    fn unlink(&self, groups: Vec<u64>) -> Vec<u64> {
        let mut left = Vec::new();
        for chunk in groups.chunks(BG_BATCH) {
            let ops: Vec<Op> = chunk
                .iter()
                .map(|&g| Op { key: self.key(g), cmd: redis::cmd("UNLINK").arg(self.key(g)).clone() })
                .collect();
            for (&g, o) in chunk.iter().zip(self.net.run(Role::Background, &ops, None).0) {
                match o {
                    Outcome::Value(Value::Int(1)) => {
                        self.counters.values_deleted.fetch_add(1, Ordering::Relaxed);
                    }
                    Outcome::Value(_) | Outcome::Refused(_) => {}
                    Outcome::Transient(_) => left.push(g),
                }
            }
        }
        left
    }

    /// Sets every live value's expiry to `ttl` again.
    fn refresh_expiry(&self) {
        let groups: Vec<u64> = self.lock().groups.keys().copied().collect();
        let ttl = self.config.ttl.as_millis() as u64;
        for chunk in groups.chunks(BG_BATCH) {
            let ops: Vec<Op> = chunk
                .iter()
                .map(|&g| Op { key: self.key(g), cmd: redis::cmd("PEXPIRE").arg(self.key(g)).arg(ttl).clone() })
                .collect();
            let n =
                self.net.run(Role::Background, &ops, None).0.iter().filter(|o| matches!(o, Outcome::Value(_))).count();
            self.counters.expiry_refreshes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// At drop: every key of the namespace, on every primary (`SCAN`, then
    /// `UNLINK` pipelined), values of failed puts included. One try per
    /// node: what a node down keeps goes with its expiry.
    fn remove_all(&self) {
        self.net.refresh_slots();
        let pattern = format!("uhmm:{}:*", self.config.namespace);
        for node in self.net.primaries() {
            let mut cursor = 0u64;
            loop {
                let scan = redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000).clone();
                let Ok(v) = self.net.on_node(&node, Role::Background, &[scan]) else { break };
                let Some(Value::Array(reply)) = v.into_iter().next() else { break };
                let (Some(c), Some(Value::Array(keys))) = (reply.first(), reply.get(1)) else { break };
                let next = match c {
                    Value::BulkString(b) => std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()),
                    Value::Int(i) => Some(*i as u64),
                    _ => None,
                };
                if !keys.is_empty() {
                    let cmds: Vec<redis::Cmd> = keys
                        .iter()
                        .filter_map(|k| match k {
                            Value::BulkString(k) => Some(redis::cmd("UNLINK").arg(k).clone()),
                            _ => None,
                        })
                        .collect();
                    if let Ok(done) = self.net.on_node(&node, Role::Background, &cmds) {
                        let n = done.iter().filter(|v| matches!(v, Value::Int(1))).count();
                        self.counters.values_deleted.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
                match next {
                    Some(0) | None => break,
                    Some(c) => cursor = c,
                }
            }
        }
    }
}

/// What a `get` wants of one group: its page count, and the pages wanted
/// as (run, page in the run, index in the group).
type Wanted = (u32, Vec<(usize, usize, u32)>);

/// One group of a `put`: `pages` pages at page `start` of run `run`.
struct Unit {
    run: usize,
    start: usize,
    pages: usize,
    group: u64,
    bytes: u64,
}

impl PageStore for RedisStore {
    fn put(&self, runs: &[RunIn<'_>]) -> Result<Vec<bool>> {
        check_runs_in(runs)?;
        let sh = &*self.shared;
        if sh.net.forked() {
            // A forked child's group numbers are its parent's too: it
            // stores nothing (its pages stay in RAM).
            return Ok(vec![false; runs.iter().map(|r| r.keys.len()).sum()]);
        }
        let g = sh.config.group_pages as u64;
        let mut units = Vec::new();
        for (r, run) in runs.iter().enumerate() {
            let n = run.keys.len();
            let mut p = 0;
            while p < n {
                let vpn = run.vpn + p as u64;
                let len = ((g - vpn % g) as usize).min(n - p);
                let bytes = (HEADER + len * PAGE_SIZE) as u64;
                units.push(Unit { run: r, start: p, pages: len, group: 0, bytes });
                p += len;
            }
        }
        let total: usize = runs.iter().map(|r| r.keys.len()).sum();
        let mut first_of_run = Vec::with_capacity(runs.len());
        let mut at = 0;
        for run in runs {
            first_of_run.push(at);
            at += run.keys.len();
        }
        let mut stored = vec![false; total];
        // Room reserved up to the capacity; units past it are not sent.
        let mut sent = Vec::new();
        {
            let mut st = sh.lock();
            for mut u in units {
                if st.used_bytes.saturating_add(u.bytes) > sh.config.capacity_bytes {
                    continue;
                }
                st.used_bytes += u.bytes;
                u.group = sh.next_group.fetch_add(1, Ordering::Relaxed);
                sent.push(u);
            }
        }
        let ttl = sh.config.ttl.as_millis() as u64;
        let mut pending: Vec<(usize, Op)> = sent
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let data = &runs[u.run].data[u.start * PAGE_SIZE..(u.start + u.pages) * PAGE_SIZE];
                let mut value = Vec::with_capacity(HEADER + data.len());
                value.extend_from_slice(MAGIC);
                value.extend_from_slice(&(u.pages as u32).to_le_bytes());
                value.extend_from_slice(&u.group.to_le_bytes());
                value.extend_from_slice(data);
                let key = sh.key(u.group);
                let cmd = redis::cmd("SET").arg(&key).arg(value).arg("PX").arg(ttl).clone();
                (i, Op { key, cmd })
            })
            .collect();
        let mut ok = vec![false; sent.len()];
        let deadline = Instant::now() + sh.config.put_timeout;
        let mut backoff = Duration::from_millis(10);
        let mut last_err = String::new();
        while !pending.is_empty() {
            let (idx, ops): (Vec<usize>, Vec<Op>) = pending.drain(..).unzip();
            let (outcomes, trips) = sh.net.run(Role::Write, &ops, sh.config.wait_replicas);
            sh.counters.put_round_trips.fetch_add(trips, Ordering::Relaxed);
            for ((i, op), o) in idx.into_iter().zip(ops).zip(outcomes) {
                sh.counters.bytes_sent.fetch_add(sent[i].bytes, Ordering::Relaxed);
                match o {
                    Outcome::Value(Value::Okay) => ok[i] = true,
                    Outcome::Value(Value::SimpleString(s)) if s == "OK" => ok[i] = true,
                    Outcome::Value(v) => last_err = format!("SET answered {v:?}"),
                    Outcome::Refused(e) => last_err = e,
                    Outcome::Transient(e) => {
                        last_err = e;
                        pending.push((i, op));
                    }
                }
            }
            if pending.is_empty() || Instant::now() + backoff >= deadline {
                break;
            }
            sh.counters.retries.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
        let mut failed_groups = Vec::new();
        let mut failed_pages = 0u64;
        {
            let mut st = sh.lock();
            for (u, &done) in sent.iter().zip(&ok) {
                if !done {
                    st.used_bytes -= u.bytes;
                    failed_groups.push(u.group);
                    failed_pages += u.pages as u64;
                    continue;
                }
                let keys = &runs[u.run].keys[u.start..u.start + u.pages];
                for &key in keys {
                    if let Some(dead) = st.forget(key) {
                        failed_groups.push(dead);
                    }
                }
                for (k, &key) in keys.iter().enumerate() {
                    let slot = key as usize;
                    if st.entries.len() <= slot {
                        st.entries.resize(slot + 1, (0, 0));
                    }
                    st.entries[slot] = (u.group, k as u32);
                }
                st.pages += u.pages as u64;
                st.groups.insert(u.group, Group { pages: u.pages as u32, live: u.pages as u32, bytes: u.bytes });
                stored[first_of_run[u.run] + u.start..][..u.pages].fill(true);
            }
        }
        let not_stored = total as u64 - stored.iter().filter(|s| **s).count() as u64;
        let set = ok.iter().filter(|o| **o).count() as u64;
        sh.counters.values_set.fetch_add(set, Ordering::Relaxed);
        sh.counters.failed_puts.fetch_add(not_stored, Ordering::Relaxed);
        if failed_pages > 0 {
            tracing::warn!(pages = failed_pages, err = %last_err, "redis store: pages not stored (left in RAM)");
        }
        // A value not acknowledged may have landed all the same.
        self.queue_delete(failed_groups);
        Ok(stored)
    }

    fn fault_pages(&self, key: u64) -> usize {
        let st = self.shared.lock();
        match st.entries.get(key as usize) {
            Some(&(g, _)) if g != 0 => self.shared.config.group_pages,
            _ => 1,
        }
    }

    fn get(&self, runs: &mut [RunOut<'_>]) -> Result<()> {
        check_runs_out(runs)?;
        let sh = &*self.shared;
        let mut wants: HashMap<u64, Wanted> = HashMap::new();
        {
            let st = sh.lock();
            for (r, run) in runs.iter().enumerate() {
                for (p, &key) in run.keys.iter().enumerate() {
                    let Some(&(g, index)) = st.entries.get(key as usize) else { continue };
                    let Some(group) = st.groups.get(&g) else { continue };
                    wants.entry(g).or_insert_with(|| (group.pages, Vec::new())).1.push((r, p, index));
                }
            }
        }
        let mut pending: Vec<u64> = wants.keys().copied().collect();
        pending.sort_unstable();
        let deadline = Instant::now() + sh.config.fault_timeout;
        let mut backoff = Duration::from_millis(5);
        let mut lost = 0u64;
        let mut last_err = String::new();
        while !pending.is_empty() {
            let ops: Vec<Op> = pending
                .iter()
                .map(|&g| {
                    let key = sh.key(g);
                    Op { cmd: redis::cmd("GET").arg(&key).clone(), key }
                })
                .collect();
            let (outcomes, trips) = sh.net.run(Role::Fault, &ops, None);
            sh.counters.get_round_trips.fetch_add(trips, Ordering::Relaxed);
            let mut again = Vec::new();
            for (g, o) in pending.drain(..).zip(outcomes) {
                let (pages, list) = &wants[&g];
                let value = match o {
                    Outcome::Value(Value::BulkString(v)) => Some(v),
                    Outcome::Value(Value::Nil) => {
                        tracing::error!(group = g, "redis store: value gone from the server: pages lost");
                        None
                    }
                    Outcome::Value(v) => {
                        tracing::error!(group = g, "redis store: GET answered {v:?}: pages lost");
                        None
                    }
                    Outcome::Transient(e) | Outcome::Refused(e) => {
                        last_err = e;
                        again.push(g);
                        continue;
                    }
                };
                let good = value.as_deref().filter(|v| {
                    v.len() == HEADER + *pages as usize * PAGE_SIZE
                        && &v[..4] == MAGIC
                        && v[4..8] == pages.to_le_bytes()
                        && v[8..16] == g.to_le_bytes()
                });
                if let Some(v) = good {
                    sh.counters.bytes_received.fetch_add(v.len() as u64, Ordering::Relaxed);
                    sh.counters.values_got.fetch_add(1, Ordering::Relaxed);
                }
                for &(r, p, index) in list {
                    let run = &mut runs[r];
                    match good {
                        Some(v) => {
                            let src = &v[HEADER + index as usize * PAGE_SIZE..][..PAGE_SIZE];
                            run.data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].copy_from_slice(src);
                            run.got[p] = Got::Filled;
                        }
                        None => {
                            run.got[p] = Got::Lost;
                            lost += 1;
                        }
                    }
                }
            }
            pending = again;
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for g in pending.drain(..) {
                    for &(r, p, _) in &wants[&g].1 {
                        runs[r].got[p] = Got::Lost;
                        lost += 1;
                    }
                }
                tracing::error!(err = %last_err, "redis store: server not back within fault_timeout: pages lost");
                break;
            }
            sh.counters.retries.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
        sh.counters.lost_pages.fetch_add(lost, Ordering::Relaxed);
        Ok(())
    }

    fn delete(&self, keys: &[u64]) {
        let mut dead = Vec::new();
        {
            let mut st = self.shared.lock();
            for &key in keys {
                if let Some(g) = st.forget(key) {
                    dead.push(g);
                }
            }
        }
        self.queue_delete(dead);
    }

    fn usage(&self) -> StoreUsage {
        let st = self.shared.lock();
        StoreUsage {
            pages: st.pages,
            orig_bytes: st.pages * PAGE_SIZE as u64,
            used_bytes: st.groups.values().map(|g| g.bytes).sum(),
            capacity_bytes: self.shared.config.capacity_bytes,
        }
    }
}

impl State {
    /// Forgets `key`; returns its group when that was the group's last live
    /// page (its value is to be removed).
    fn forget(&mut self, key: u64) -> Option<u64> {
        let entry = self.entries.get_mut(key as usize)?;
        let (g, _) = std::mem::take(entry);
        if g == 0 {
            return None;
        }
        self.pages -= 1;
        let group = self.groups.get_mut(&g)?;
        group.live -= 1;
        if group.live > 0 {
            return None;
        }
        let bytes = group.bytes;
        self.groups.remove(&g);
        self.used_bytes -= bytes;
        Some(g)
    }
}
