//! [`RedisConfig`]: where the Redis store's server (or cluster) is, how to
//! log in, and the store's settings; [`RedisConfig::from_url`] reads the
//! address forms the docs list.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use uhmm::{Error, Result};

/// The most pages one group (one Redis value) may hold.
pub const MAX_GROUP_PAGES: usize = 256;

/// Where the store's values live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisEndpoint {
    /// One server: host, port and database number.
    Single {
        /// Host name or IP address.
        host: String,
        /// TCP port.
        port: u16,
        /// The database (`SELECT`) number.
        db: i64,
    },
    /// A Redis Cluster, found through any of these seed nodes (host, port):
    /// the store reads the slot map from the first that answers.
    Cluster {
        /// Seed nodes.
        seeds: Vec<(String, u16)>,
    },
}

/// Settings of a [`RedisStore`](super::RedisStore); each field's doc gives
/// its default ([`RedisConfig::from_url`] sets the address fields and
/// leaves the rest at their defaults).
#[derive(Clone)]
pub struct RedisConfig {
    /// The server or the cluster.
    pub endpoint: RedisEndpoint,
    /// Connect with TLS (`rediss://`, `rediss-cluster://`).
    pub tls: bool,
    /// The CA certificate(s), PEM, that sign the server's certificate; `None`
    /// trusts the system's roots. `?tls_ca=PATH` in the URL reads a file.
    pub tls_ca_pem: Option<Vec<u8>>,
    /// The ACL user (`AUTH user password`); `None` is `default`.
    pub username: Option<String>,
    /// The password (`AUTH`); `None` sends none.
    pub password: Option<String>,
    /// The key namespace: keys are `uhmm:NAMESPACE:N`. Letters, digits,
    /// `-`, `_` and `.` only (no `{`, so no cluster hash tag: values spread
    /// over every slot). Give each address space its own, random one.
    /// Default: one made of the process id, the time and a counter.
    pub namespace: String,
    /// Neighbouring pages (aligned in the address space) stored as one
    /// value, 1 to [`MAX_GROUP_PAGES`]; a fault brings the group back with
    /// one GET. Default: 16 (64 KiB).
    pub group_pages: usize,
    /// The expiry every value carries (`PX`), refreshed by a background
    /// thread every quarter of it, so the values of a process that died are
    /// gone a `ttl` later. At least 1 s. Default: 1 day.
    pub ttl: Duration,
    /// After each write batch, `WAIT n timeout` on the primary that took it;
    /// a page counts as stored only once `n` replicas acknowledged it.
    /// Default: `None` (the primary's acknowledgement is enough).
    pub wait_replicas: Option<(usize, Duration)>,
    /// How long a fault retries an unreachable server (restarting, failing
    /// over) before its pages are reported lost. Default: 30 s.
    pub fault_timeout: Duration,
    /// How long a `put` retries an unreachable server before the pages stay
    /// in RAM. Default: 2 s.
    pub put_timeout: Duration,
    /// Connect timeout of one connection attempt. Default: 1 s.
    pub connect_timeout: Duration,
    /// Read and write timeout of one round trip (plus the `WAIT` timeout on
    /// write connections). Default: 5 s.
    pub io_timeout: Duration,
    /// The most bytes of values the store keeps; a group past it stays in
    /// RAM. Default: `u64::MAX` (the server's `maxmemory` decides).
    pub capacity_bytes: u64,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password is never printed.
        f.debug_struct("RedisConfig")
            .field("endpoint", &self.endpoint)
            .field("tls", &self.tls)
            .field("tls_ca_pem", &self.tls_ca_pem.as_ref().map(|_| "<set>"))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("namespace", &self.namespace)
            .field("group_pages", &self.group_pages)
            .field("ttl", &self.ttl)
            .field("wait_replicas", &self.wait_replicas)
            .field("fault_timeout", &self.fault_timeout)
            .field("put_timeout", &self.put_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("io_timeout", &self.io_timeout)
            .field("capacity_bytes", &self.capacity_bytes)
            .finish()
    }
}

impl RedisConfig {
    /// A config for `endpoint` with every other field at its default.
    pub fn new(endpoint: RedisEndpoint) -> RedisConfig {
        RedisConfig {
            endpoint,
            tls: false,
            tls_ca_pem: None,
            username: None,
            password: None,
            namespace: default_namespace(),
            group_pages: 16,
            ttl: Duration::from_secs(24 * 3600),
            wait_replicas: None,
            fault_timeout: Duration::from_secs(30),
            put_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            io_timeout: Duration::from_secs(5),
            capacity_bytes: u64::MAX,
        }
    }

    /// Reads an address:
    ///
    /// - `redis://[[user]:password@]HOST:PORT[/DB]`: one server;
    /// - `rediss://…`: the same over TLS;
    /// - `redis-cluster://[[user]:password@]H1:P1,H2:P2,…`: a cluster,
    ///   through these seed nodes (database 0 only);
    /// - `rediss-cluster://…`: the same over TLS.
    ///
    /// The port defaults to 6379; user and password are percent-decoded.
    /// `?tls_ca=PATH` reads the CA certificate (PEM) that signs the
    /// servers' certificates. Anything else is an invalid argument that
    /// names what is wrong.
    pub fn from_url(url: &str) -> Result<RedisConfig> {
        let bad = |what: &str| Error::invalid(format!("redis URL: {what}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("no scheme (redis://, rediss://, redis-cluster://, rediss-cluster://)"))?;
        let (tls, cluster) = match scheme {
            "redis" => (false, false),
            "rediss" => (true, false),
            "redis-cluster" => (false, true),
            "rediss-cluster" => (true, true),
            other => return Err(bad(&format!("unknown scheme {other:?}"))),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        let (hosts, db) = match rest.split_once('/') {
            Some((h, "")) => (h, 0),
            Some((h, d)) => (
                h,
                d.parse::<i64>().ok().filter(|d| *d >= 0).ok_or_else(|| bad(&format!("bad database number {d:?}")))?,
            ),
            None => (rest, 0),
        };
        let mut nodes = Vec::new();
        for h in hosts.split(',') {
            nodes.push(host_port(h).map_err(|e| bad(&e))?);
        }
        let endpoint = if cluster {
            if db != 0 {
                return Err(bad("a cluster has database 0 only"));
            }
            RedisEndpoint::Cluster { seeds: nodes }
        } else {
            if nodes.len() != 1 {
                return Err(bad("redis:// names one server (use redis-cluster:// for several)"));
            }
            let (host, port) = nodes.pop().unwrap_or_default();
            RedisEndpoint::Single { host, port, db }
        };
        let mut config = RedisConfig::new(endpoint);
        config.tls = tls;
        if let Some(auth) = auth {
            let (user, pass) = match auth.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (auth, None),
            };
            let user = percent_decode(user).map_err(|e| bad(&e))?;
            config.username = (!user.is_empty()).then_some(user);
            config.password = pass.map(percent_decode).transpose().map_err(|e| bad(&e))?;
        }
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("tls_ca", path)) => {
                    let path = percent_decode(path).map_err(|e| bad(&e))?;
                    let pem = std::fs::read(&path).map_err(|e| bad(&format!("tls_ca {path:?}: {e}")))?;
                    config.tls_ca_pem = Some(pem);
                }
                _ => return Err(bad(&format!("unknown option {pair:?} (known: tls_ca=PATH)"))),
            }
        }
        if config.tls_ca_pem.is_some() && !tls {
            return Err(bad("tls_ca given without TLS (use rediss:// or rediss-cluster://)"));
        }
        Ok(config)
    }

    /// Checks the fields; the error names the field at fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::invalid(format!("RedisConfig: {what}")));
        match &self.endpoint {
            RedisEndpoint::Single { host, port, db } => {
                if host.is_empty() || *port == 0 || *db < 0 {
                    return bad(format!("bad server {host:?}:{port}/{db}"));
                }
            }
            RedisEndpoint::Cluster { seeds } => {
                if seeds.is_empty() || seeds.iter().any(|(h, p)| h.is_empty() || *p == 0) {
                    return bad(format!("bad cluster seeds {seeds:?}"));
                }
            }
        }
        if self.namespace.is_empty()
            || self.namespace.len() > 64
            || !self.namespace.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return bad(format!("namespace {:?} must be 1 to 64 of [A-Za-z0-9._-]", self.namespace));
        }
        if !(1..=MAX_GROUP_PAGES).contains(&self.group_pages) {
            return bad(format!("group_pages ({}) must be within 1..={MAX_GROUP_PAGES}", self.group_pages));
        }
        if self.ttl < Duration::from_secs(1) {
            return bad(format!("ttl ({:?}) must be at least 1 s", self.ttl));
        }
        for (name, d) in [
            ("fault_timeout", self.fault_timeout),
            ("put_timeout", self.put_timeout),
            ("connect_timeout", self.connect_timeout),
            ("io_timeout", self.io_timeout),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must be > 0"));
            }
        }
        if let Some((n, t)) = self.wait_replicas
            && (n == 0 || t.is_zero())
        {
            return bad(format!("wait_replicas ({n}, {t:?}) needs n > 0 and a timeout > 0"));
        }
        if self.tls_ca_pem.is_some() && !self.tls {
            return bad("tls_ca_pem given without tls".into());
        }
        Ok(())
    }
}

/// `HOST[:PORT]`, `[V6ADDR][:PORT]`.
fn host_port(s: &str) -> std::result::Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, tail) = rest.split_once(']').ok_or_else(|| format!("unclosed '[' in {s:?}"))?;
        (h, tail.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err(format!("no host in {s:?}"));
    }
    let port = match port {
        None => 6379,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("bad port {p:?}"))?,
    };
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or_else(|| format!("bad percent escape in {s:?}"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// A namespace unlikely to be any other address space's: process id, time,
/// and a counter.
fn default_namespace() -> String {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:x}-{:x}-{}", std::process::id(), nanos as u64, COUNT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms() {
        let c = RedisConfig::from_url("redis://127.0.0.1:7000/2").unwrap();
        assert_eq!(c.endpoint, RedisEndpoint::Single { host: "127.0.0.1".into(), port: 7000, db: 2 });
        assert!(!c.tls && c.username.is_none() && c.password.is_none());
        let c = RedisConfig::from_url("rediss://al%40ice:p%3Ass@h").unwrap();
        assert_eq!(c.endpoint, RedisEndpoint::Single { host: "h".into(), port: 6379, db: 0 });
        assert!(c.tls);
        assert_eq!((c.username.as_deref(), c.password.as_deref()), (Some("al@ice"), Some("p:ss")));
        let c = RedisConfig::from_url("redis://:secret@h:1").unwrap();
        assert_eq!((c.username.as_deref(), c.password.as_deref()), (None, Some("secret")));
        let c = RedisConfig::from_url("redis-cluster://u:p@a:1,b:2,[::1]:3").unwrap();
        assert_eq!(
            c.endpoint,
            RedisEndpoint::Cluster { seeds: vec![("a".into(), 1), ("b".into(), 2), ("::1".into(), 3)] }
        );
        assert!(RedisConfig::from_url("rediss-cluster://a:1").unwrap().tls);
        c.validate().unwrap();
        assert!(!format!("{c:?}").contains("\"p\""), "the password is not printed");
    }

    #[test]
    fn bad_urls_are_typed_errors() {
        for url in [
            "",
            "127.0.0.1:6379",
            "http://h:1",
            "redis://h:0",
            "redis://h:99999",
            "redis://h:x",
            "redis://:1",
            "redis://a:1,b:2",
            "redis://h/-1",
            "redis://h/x",
            "redis-cluster://a:1/3",
            "redis://h?what=1",
            "redis://h?tls_ca=/nonexistent",
            "redis://u:%zz@h",
        ] {
            let err = RedisConfig::from_url(url).expect_err(url);
            assert_eq!(err.kind(), uhmm::ErrorKind::InvalidArgument, "{url}");
        }
        let mut c = RedisConfig::from_url("redis://h").unwrap();
        c.namespace = "a{b}".into();
        assert!(c.validate().is_err());
        c.namespace = "ok".into();
        c.group_pages = 0;
        assert!(c.validate().is_err());
    }
}
