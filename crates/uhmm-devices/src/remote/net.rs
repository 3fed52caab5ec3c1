//! The wire of the Redis store: connections to the nodes (a pool per node
//! and per role, so a fault never waits behind a write batch), cluster
//! routing (the slot map from `CLUSTER SLOTS`, `MOVED` and `ASK`), and one
//! pipeline per node per batch, with `WAIT` on the node that took the
//! writes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::{Client, Cmd, Connection, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, Value};

use super::config::{RedisConfig, RedisEndpoint};

/// Slots of a Redis Cluster.
const SLOTS: usize = 16384;

/// Redirections (`MOVED`, `ASK`) followed for one command in one call.
const MAX_REDIRECTS: usize = 5;

/// Idle connections kept per node and role.
const MAX_IDLE: usize = 8;

/// The ops of one pipeline: (index in the call's ops, sent after `ASKING`).
type Batch = Vec<(usize, bool)>;

/// Who uses a connection: each has its own, so that one never queues
/// behind another's round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Faults' `GET`s.
    Fault = 0,
    /// Migrations' `SET`s.
    Write = 1,
    /// The background thread: deletes, expiry refreshes, cleanup.
    Background = 2,
}

/// One command on one key (routed by it).
pub(crate) struct Op {
    pub key: String,
    pub cmd: Cmd,
}

/// What became of one command.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// The server's answer.
    Value(Value),
    /// Not done, for the moment: no connection, a timeout, a server loading
    /// or failing over. Worth retrying.
    Transient(String),
    /// The server refused it (out of memory, no permission, a bad
    /// password): not worth retrying.
    Refused(String),
}

/// Counters of the wire.
#[derive(Debug, Default)]
pub(crate) struct NetCounters {
    pub round_trips: AtomicU64,
    pub connects: AtomicU64,
    pub reconnects: AtomicU64,
    pub topology_refreshes: AtomicU64,
    pub redirects: AtomicU64,
}

/// One node: its client and idle connections by role.
struct Node {
    client: Client,
    idle: [Mutex<Vec<Connection>>; 3],
    /// A connection to it failed since the last one opened.
    broken: AtomicBool,
}

/// The connections of a store: one server, or a cluster's primaries.
pub(crate) struct Net {
    config: RedisConfig,
    cluster: bool,
    nodes: Mutex<HashMap<String, Arc<Node>>>,
    /// Cluster only: the primary of each slot.
    slots: RwLock<Vec<Option<Arc<str>>>>,
    /// When the slot map was last read (refreshes are spaced).
    refreshed: Mutex<Option<Instant>>,
    pub counters: NetCounters,
    /// The process that made it: a forked child shares its pooled sockets,
    /// so it neither uses nor pools connections.
    pid: u32,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net").field("cluster", &self.cluster).finish_non_exhaustive()
    }
}

impl Net {
    pub fn new(config: RedisConfig) -> Net {
        let cluster = matches!(config.endpoint, RedisEndpoint::Cluster { .. });
        Net {
            config,
            cluster,
            nodes: Mutex::default(),
            slots: RwLock::new(vec![None; if cluster { SLOTS } else { 0 }]),
            refreshed: Mutex::new(None),
            counters: NetCounters::default(),
            pid: std::process::id(),
        }
    }

    /// Whether this is a forked child's copy of the store's wire.
    pub fn forked(&self) -> bool {
        std::process::id() != self.pid
    }

    /// The primaries known (one server: that one).
    pub fn primaries(&self) -> Vec<String> {
        match &self.config.endpoint {
            RedisEndpoint::Single { host, port, .. } => vec![addr(host, *port)],
            RedisEndpoint::Cluster { .. } => {
                let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
                let mut all: Vec<String> = slots.iter().flatten().map(|a| a.to_string()).collect();
                all.sort();
                all.dedup();
                all
            }
        }
    }

    /// Which node serves `key` (None: a cluster whose slot map is unknown).
    fn route(&self, key: &str) -> Option<String> {
        match &self.config.endpoint {
            RedisEndpoint::Single { host, port, .. } => Some(addr(host, *port)),
            RedisEndpoint::Cluster { .. } => {
                let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
                slots[slot(key.as_bytes())].as_ref().map(|a| a.to_string())
            }
        }
    }

    fn node(&self, address: &str) -> Result<Arc<Node>, Outcome> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = nodes.get(address) {
            return Ok(n.clone());
        }
        let client = self.client(address).map_err(|e| Outcome::Refused(format!("{address}: {e}")))?;
        let node = Arc::new(Node { client, idle: Default::default(), broken: AtomicBool::new(false) });
        nodes.insert(address.to_string(), node.clone());
        Ok(node)
    }

    fn client(&self, address: &str) -> redis::RedisResult<Client> {
        let (host, port) = split_addr(address);
        let c = &self.config;
        let conn_addr = if c.tls {
            ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None }
        } else {
            ConnectionAddr::Tcp(host, port)
        };
        let mut settings = RedisConnectionInfo::default();
        if let RedisEndpoint::Single { db, .. } = c.endpoint {
            settings = settings.set_db(db);
        }
        if let Some(u) = &c.username {
            settings = settings.set_username(u);
        }
        if let Some(p) = &c.password {
            settings = settings.set_password(p);
        }
        let info = conn_addr.into_connection_info()?.set_redis_settings(settings);
        match &c.tls_ca_pem {
            Some(pem) if c.tls => {
                Client::build_with_tls(info, redis::TlsCertificates { client_tls: None, root_cert: Some(pem.clone()) })
            }
            _ => Client::open(info),
        }
    }

    /// A connection of `role` to `node`: an idle one, or a new one.
    fn take(&self, node: &Node, role: Role) -> Result<Connection, Outcome> {
        if !self.forked()
            && let Some(c) = node.idle[role as usize].lock().unwrap_or_else(|e| e.into_inner()).pop()
        {
            return Ok(c);
        }
        let c = &self.config;
        let con = node.client.get_connection_with_timeout(c.connect_timeout).map_err(|e| {
            node.broken.store(true, Ordering::Relaxed);
            classify(e)
        })?;
        self.counters.connects.fetch_add(1, Ordering::Relaxed);
        if node.broken.swap(false, Ordering::Relaxed) {
            self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        let read = c.io_timeout
            + if role == Role::Write { c.wait_replicas.map_or(Duration::ZERO, |w| w.1) } else { Duration::ZERO };
        con.set_read_timeout(Some(read)).map_err(classify)?;
        con.set_write_timeout(Some(c.io_timeout)).map_err(classify)?;
        Ok(con)
    }

    fn give(&self, node: &Node, role: Role, con: Connection) {
        if self.forked() {
            return;
        }
        let mut idle = node.idle[role as usize].lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(con);
        }
    }

    /// Sends `cmds` (keyless commands) to the node at `address` as one
    /// pipeline: the answers, in order, or why none came.
    pub fn on_node(&self, address: &str, role: Role, cmds: &[Cmd]) -> Result<Vec<Value>, Outcome> {
        let node = self.node(address)?;
        let mut con = self.take(&node, role)?;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for c in cmds {
            pipe.add_command(c.clone());
        }
        self.counters.round_trips.fetch_add(1, Ordering::Relaxed);
        match pipe.query::<Vec<Value>>(&mut con) {
            Ok(v) => {
                self.give(&node, role, con);
                Ok(v)
            }
            Err(e) => {
                // The connection is dropped; the next use opens another.
                node.broken.store(true, Ordering::Relaxed);
                Err(classify(e))
            }
        }
    }

    /// Runs `ops` once: one pipeline per node (`WAIT n timeout` at its end
    /// when `wait` is given, whose shortfall turns the node's answers into
    /// `Transient`), following `MOVED` and `ASK`. Every op gets an outcome;
    /// also returns the pipelines sent (round trips).
    pub fn run(&self, role: Role, ops: &[Op], wait: Option<(usize, Duration)>) -> (Vec<Outcome>, u64) {
        let mut trips = 0u64;
        let mut out: Vec<Option<Outcome>> = vec![None; ops.len()];
        // (op, node to ASK)
        let mut todo: Vec<(usize, Option<String>)> = (0..ops.len()).map(|i| (i, None)).collect();
        let mut stale = false;
        if self.cluster && self.slots.read().unwrap_or_else(|e| e.into_inner()).iter().all(Option::is_none) {
            self.refresh_slots();
        }
        for _ in 0..=MAX_REDIRECTS {
            if todo.is_empty() {
                break;
            }
            let mut by_node: HashMap<String, Vec<(usize, bool)>> = HashMap::new();
            for (i, ask) in todo.drain(..) {
                let asking = ask.is_some();
                match ask.or_else(|| self.route(&ops[i].key)) {
                    Some(a) => by_node.entry(a).or_default().push((i, asking)),
                    None => {
                        stale = true;
                        out[i] = Some(Outcome::Transient("no node known for the key's slot".into()));
                    }
                }
            }
            trips += by_node.len() as u64;
            let results: Vec<(Batch, Result<Vec<Value>, Outcome>)> = if by_node.len() == 1 {
                by_node
                    .into_iter()
                    .map(|(a, list)| {
                        let r = self.send(&a, role, ops, &list, wait);
                        (list, r)
                    })
                    .collect()
            } else {
                std::thread::scope(|s| {
                    let handles: Vec<_> = by_node
                        .into_iter()
                        .map(|(a, list)| {
                            s.spawn(move || {
                                let r = self.send(&a, role, ops, &list, wait);
                                (list, r)
                            })
                        })
                        .collect();
                    handles.into_iter().filter_map(|h| h.join().ok()).collect()
                })
            };
            for (list, r) in results {
                let values = match r {
                    Ok(v) => v,
                    Err(o) => {
                        stale = true;
                        for (i, _) in list {
                            out[i] = Some(o.clone());
                        }
                        continue;
                    }
                };
                let shortfall = wait.and_then(|(n, _)| match values.last() {
                    Some(Value::Int(k)) if *k >= n as i64 => None,
                    other => Some(format!("WAIT: {other:?} of {n} replicas acknowledged")),
                });
                for ((i, _), v) in list.into_iter().zip(values) {
                    out[i] = Some(match v {
                        Value::ServerError(e) => {
                            let code = e.code().to_string();
                            let details = e.details().unwrap_or("").to_string();
                            match code.as_str() {
                                "MOVED" | "ASK" => {
                                    self.counters.redirects.fetch_add(1, Ordering::Relaxed);
                                    let mut parts = details.split_whitespace();
                                    let slot_no = parts.next().and_then(|s| s.parse::<usize>().ok());
                                    let target = parts.next().map(str::to_string);
                                    match (slot_no, target) {
                                        (Some(sl), Some(t)) if sl < SLOTS => {
                                            if code == "MOVED" {
                                                stale = true;
                                                self.slots.write().unwrap_or_else(|e| e.into_inner())[sl] =
                                                    Some(Arc::from(t.as_str()));
                                                todo.push((i, None));
                                            } else {
                                                todo.push((i, Some(t)));
                                            }
                                            continue;
                                        }
                                        _ => Outcome::Refused(format!("{code} {details}")),
                                    }
                                }
                                "LOADING" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "READONLY" | "BUSY" => {
                                    stale |= code != "LOADING";
                                    Outcome::Transient(format!("{code} {details}"))
                                }
                                _ => Outcome::Refused(format!("{code} {details}")),
                            }
                        }
                        v => match &shortfall {
                            Some(s) => Outcome::Transient(s.clone()),
                            None => Outcome::Value(v),
                        },
                    });
                }
            }
        }
        for (i, _) in todo {
            out[i] = Some(Outcome::Transient("too many redirections".into()));
        }
        if stale && self.cluster {
            self.refresh_slots();
        }
        (out.into_iter().map(|o| o.unwrap_or_else(|| Outcome::Transient("not sent".into()))).collect(), trips)
    }

    /// One pipeline to one node: the answers of `list`'s ops in order (the
    /// `ASKING`s' left out), then `WAIT`'s.
    fn send(
        &self,
        address: &str,
        role: Role,
        ops: &[Op],
        list: &[(usize, bool)],
        wait: Option<(usize, Duration)>,
    ) -> Result<Vec<Value>, Outcome> {
        let node = self.node(address)?;
        let mut con = self.take(&node, role)?;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for &(i, asking) in list {
            if asking {
                pipe.cmd("ASKING").ignore();
            }
            pipe.add_command(ops[i].cmd.clone());
        }
        if let Some((n, t)) = wait {
            pipe.cmd("WAIT").arg(n).arg(t.as_millis() as u64);
        }
        self.counters.round_trips.fetch_add(1, Ordering::Relaxed);
        match pipe.query::<Vec<Value>>(&mut con) {
            Ok(v) if v.len() == list.len() + usize::from(wait.is_some()) => {
                self.give(&node, role, con);
                Ok(v)
            }
            Ok(v) => Err(Outcome::Transient(format!("{address}: {} answers to {} commands", v.len(), list.len()))),
            Err(e) => {
                // The connection is dropped; the next use opens another.
                node.broken.store(true, Ordering::Relaxed);
                Err(classify(e))
            }
        }
    }

    /// Reads the slot map from the first node that answers `CLUSTER SLOTS`
    /// (known primaries, then the seeds). Spaced by 100 ms at least.
    pub fn refresh_slots(&self) {
        if !self.cluster {
            return;
        }
        {
            let mut last = self.refreshed.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
                return;
            }
            *last = Some(Instant::now());
        }
        self.counters.topology_refreshes.fetch_add(1, Ordering::Relaxed);
        let mut candidates = self.primaries();
        if let RedisEndpoint::Cluster { seeds } = &self.config.endpoint {
            candidates.extend(seeds.iter().map(|(h, p)| addr(h, *p)));
        }
        candidates.extend(self.nodes.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned());
        let mut seen = std::collections::HashSet::new();
        for a in candidates.into_iter().filter(|a| seen.insert(a.clone())) {
            let Ok(values) = self.on_node(&a, Role::Background, &[redis::cmd("CLUSTER").arg("SLOTS").clone()]) else {
                continue;
            };
            let Some(Value::Array(ranges)) = values.into_iter().next() else { continue };
            let mut map: Vec<Option<Arc<str>>> = vec![None; SLOTS];
            for r in ranges {
                let Value::Array(r) = r else { continue };
                let (Some(Value::Int(lo)), Some(Value::Int(hi)), Some(Value::Array(primary))) =
                    (r.first(), r.get(1), r.get(2))
                else {
                    continue;
                };
                let host = match primary.first() {
                    Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                    Some(Value::SimpleString(h)) => h.clone(),
                    _ => continue,
                };
                let Some(Value::Int(port)) = primary.get(1) else { continue };
                let node: Arc<str> = Arc::from(addr(&host, *port as u16).as_str());
                let lo = (*lo as usize).min(SLOTS);
                let hi = (*hi as usize + 1).clamp(lo, SLOTS);
                map[lo..hi].fill(Some(node.clone()));
            }
            if map.iter().any(Option::is_some) {
                *self.slots.write().unwrap_or_else(|e| e.into_inner()) = map;
                return;
            }
        }
        tracing::warn!("redis store: no cluster node answered CLUSTER SLOTS");
    }
}

/// A failed request: transient (retry) or refused.
fn classify(e: redis::RedisError) -> Outcome {
    let msg = e.to_string();
    let transient = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || ["LOADING", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN"].iter().any(|c| msg.contains(c));
    if transient { Outcome::Transient(msg) } else { Outcome::Refused(msg) }
}

fn addr(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

fn split_addr(a: &str) -> (String, u16) {
    let (h, p) = a.rsplit_once(':').unwrap_or((a, "6379"));
    let h = h.trim_start_matches('[').trim_end_matches(']');
    (h.to_string(), p.parse().unwrap_or(6379))
}

/// The cluster slot of `key` (CRC16/XMODEM of the key, or of its `{tag}`).
pub(crate) fn slot(key: &[u8]) -> usize {
    let mut k = key;
    if let Some(open) = key.iter().position(|&b| b == b'{')
        && let Some(len) = key[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        k = &key[open + 1..open + 1 + len];
    }
    let mut crc: u16 = 0;
    for &b in k {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    usize::from(crc) % SLOTS
}

#[cfg(test)]
mod tests {
    #[test]
    fn slots_as_redis_computes_them() {
        // CLUSTER KEYSLOT answers.
        assert_eq!(super::slot(b"foo"), 12182);
        assert_eq!(super::slot(b"123456789"), 12739);
        assert_eq!(super::slot(b"{user1000}.following"), super::slot(b"user1000"));
    }
}
