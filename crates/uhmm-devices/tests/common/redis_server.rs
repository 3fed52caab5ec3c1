//! A harness of `redis-server` processes for tests, on free loopback ports,
//! each in a temp dir of its own: start, wait for `PING`, `kill -9` and
//! restart on the same port and dir, a 3-primary 3-replica cluster with
//! failover, and a slow TCP proxy. Servers are killed on drop (a test panic
//! included); servers a crashed test run left behind are killed by the next
//! run. Self-contained: another test crate includes it with
//! `#[path = "common/redis_server.rs"] mod redis_server;`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How to start a server.
#[derive(Debug, Clone, Default)]
pub struct ServerOpts {
    /// `--appendonly yes --appendfsync always` (else no persistence at all).
    pub aof: bool,
    /// `--requirepass`.
    pub password: Option<String>,
    /// A cluster node (`--cluster-enabled yes`).
    pub cluster: bool,
    /// TLS on a second port, with these files: (cert, key, ca).
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// More arguments, e.g. `["--maxmemory", "2mb"]`.
    pub extra: Vec<String>,
}

/// One `redis-server` process.
pub struct RedisServer {
    pub port: u16,
    /// The TLS port, when started with TLS.
    pub tls_port: Option<u16>,
    pub dir: PathBuf,
    opts: ServerOpts,
    child: Option<Child>,
    /// Removes `dir` on drop.
    owns_dir: bool,
}

fn root() -> PathBuf {
    std::env::temp_dir().join("uhmm-redis-tests")
}

/// Kills the servers of test runs that are gone (their dirs name the test
/// process), and removes their dirs.
fn reap_stale() {
    let Ok(entries) = std::fs::read_dir(root()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // Only a redis-server still working in that dir (its pid may have
        // been reused by another process since).
        if let Ok(s) = std::fs::read_to_string(e.path().join("server.pid"))
            && let Ok(server) = s.trim().parse::<u32>()
            && std::fs::read_link(format!("/proc/{server}/cwd")).is_ok_and(|cwd| cwd == e.path())
            && std::fs::read(format!("/proc/{server}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("redis-server"))
        {
            let _ = Command::new("kill").args(["-9", &server.to_string()]).status();
        }
        let _ = std::fs::remove_dir_all(e.path());
    }
}

fn new_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = root().join(format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir for redis-server");
    dir
}

/// A free loopback port (with `port + 10000` free too, for a cluster bus).
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = l.local_addr().unwrap().port();
        if port < 55000 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port pair");
}

/// Panics loudly when `redis-server` is not installed.
pub fn require_redis() {
    let ok = Command::new("redis-server").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "redis-server is not installed (apt-get install redis-server): these tests need it");
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers.
    pub fn start(opts: ServerOpts) -> RedisServer {
        require_redis();
        reap_stale();
        let tls_port = opts.tls.as_ref().map(|_| free_port());
        let mut s = RedisServer { port: free_port(), tls_port, dir: new_dir(), opts, child: None, owns_dir: true };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        let o = &self.opts;
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--protected-mode", "no"])
            .args(["--dir", self.dir.to_str().unwrap(), "--save", "", "--daemonize", "no"])
            .args(["--logfile", "server.log"])
            .args(["--appendonly", if o.aof { "yes" } else { "no" }, "--appendfsync", "always"]);
        if let Some(p) = &o.password {
            cmd.args(["--requirepass", p]);
        }
        if o.cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "1000"]);
        }
        if let (Some((cert, key, ca)), Some(tp)) = (&o.tls, self.tls_port) {
            cmd.args(["--tls-port", &tp.to_string()])
                .args(["--tls-cert-file", cert.to_str().unwrap(), "--tls-key-file", key.to_str().unwrap()])
                .args(["--tls-ca-cert-file", ca.to_str().unwrap(), "--tls-auth-clients", "no"]);
        }
        cmd.args(&o.extra);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().expect("spawn redis-server");
        std::fs::write(self.dir.join("server.pid"), child.id().to_string()).expect("pid file");
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(20));
    }

    /// Waits until the server answers `PING` (`+PONG`, or `-NOAUTH` for a
    /// password), with a deadline.
    pub fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("redis-server on port {} exited: {st}\n{}", self.port, self.log());
            }
            if let Some(r) = raw_command(self.port, "PING")
                && (r.starts_with("+PONG") || r.starts_with("-NOAUTH"))
            {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server on port {} not ready\n{}", self.port, self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// `redis://[:password@]127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        match &self.opts.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// `kill -9`, and waits for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts it again on the same port and dir (its AOF, if any, reloads).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// `redis-cli -p PORT ARGS…`: its stdout, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(p) = &self.opts.password {
            cmd.args(["-a", p, "--no-auth-warning"]);
        }
        let out = cmd.args(args).stdin(Stdio::null()).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `DBSIZE`.
    pub fn dbsize(&self) -> u64 {
        self.cli(&["DBSIZE"]).parse().unwrap_or_else(|_| panic!("DBSIZE on {}", self.port))
    }

    /// Keys matching `pattern` (`--scan`).
    pub fn scan(&self, pattern: &str) -> Vec<String> {
        self.cli(&["--scan", "--pattern", pattern]).lines().filter(|l| !l.is_empty()).map(String::from).collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Sends one inline command over plain TCP; the first line of the answer.
pub fn raw_command(port: u16, cmd: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or("").to_string())
}

/// A Redis Cluster of `primaries` primaries with `replicas` replicas each.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the nodes (AOF always), creates the cluster with `redis-cli
    /// --cluster create`, and waits for `cluster_state:ok` everywhere.
    pub fn start(primaries: usize, replicas: usize) -> RedisCluster {
        let n = primaries * (1 + replicas);
        let opts = ServerOpts { aof: true, cluster: true, ..ServerOpts::default() };
        let nodes: Vec<RedisServer> = (0..n).map(|_| RedisServer::start(opts.clone())).collect();
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for s in &nodes {
            cmd.arg(format!("127.0.0.1:{}", s.port));
        }
        cmd.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let out = cmd.stdin(Stdio::null()).output().expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let c = RedisCluster { nodes };
        c.wait_ok(Duration::from_secs(30), None);
        // Every replica in sync with its primary.
        let deadline = Instant::now() + Duration::from_secs(30);
        for s in &c.nodes {
            loop {
                let info = s.cli(&["INFO", "replication"]);
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    break;
                }
                assert!(Instant::now() < deadline, "replica {} never synced:\n{info}", s.port);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        c
    }

    /// `redis-cluster://127.0.0.1:P1,…` over the running nodes.
    pub fn url(&self) -> String {
        let seeds: Vec<String> =
            self.nodes.iter().filter(|s| s.running()).map(|s| format!("127.0.0.1:{}", s.port)).collect();
        format!("redis-cluster://{}", seeds.join(","))
    }

    /// Waits until every running node says `cluster_state:ok` and (when
    /// given) none sees `port` as a primary any more.
    pub fn wait_ok(&self, limit: Duration, gone: Option<u16>) {
        let deadline = Instant::now() + limit;
        loop {
            let ok = self.nodes.iter().filter(|s| s.running()).all(|s| {
                let state = s.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok");
                let moved = gone.is_none_or(|p| {
                    !s.cli(&["CLUSTER", "NODES"])
                        .lines()
                        .any(|l| l.contains(&format!(":{p}@")) && l.contains("master") && !l.contains("fail"))
                });
                state && moved
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "cluster not ok after {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The nodes that are primaries now (indexes in `nodes`).
    pub fn primaries(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].running() && self.nodes[i].cli(&["ROLE"]).starts_with("master"))
            .collect()
    }

    /// `kill -9` of node `i`, then waits for its replica to take over.
    pub fn kill_and_fail_over(&mut self, i: usize) {
        let port = self.nodes[i].port;
        self.nodes[i].kill9();
        self.wait_ok(Duration::from_secs(60), Some(port));
    }

    /// Moves `slots` slots (and their keys) from primary `from` to primary
    /// `to` (`redis-cli --cluster reshard`), then waits for the cluster to
    /// be ok.
    pub fn reshard(&self, from: usize, to: usize, slots: usize) {
        let id = |i: usize| self.nodes[i].cli(&["CLUSTER", "MYID"]);
        let out = Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{}", self.nodes[from].port)])
            .args(["--cluster-from", &id(from), "--cluster-to", &id(to)])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli --cluster reshard");
        assert!(
            out.status.success(),
            "reshard failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_ok(Duration::from_secs(30), None);
    }

    /// Keys of `pattern` over all running primaries.
    pub fn scan(&self, pattern: &str) -> Vec<String> {
        self.primaries().into_iter().flat_map(|i| self.nodes[i].scan(pattern)).collect()
    }
}

/// A TCP proxy on loopback that holds each chunk it forwards `delay`
/// before sending it on: a slow network.
pub struct DelayProxy {
    pub port: u16,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl DelayProxy {
    /// Forwards `127.0.0.1:PORT` to `127.0.0.1:upstream`.
    pub fn start(upstream: u16, delay: Duration) -> DelayProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            client.set_nonblocking(false).unwrap();
                            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                            let (st1, st2) = (stop.clone(), stop.clone());
                            std::thread::spawn(move || pump(client, server, delay, st1));
                            std::thread::spawn(move || pump(s2, c2, delay, st2));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        DelayProxy { port, stop, accept: Some(accept) }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration, stop: Arc<AtomicBool>) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                std::thread::sleep(delay);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
    }
}

/// A CA and a server certificate for 127.0.0.1 (`openssl`), in `dir`:
/// (cert, key, ca).
pub fn make_tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=uhmm test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
    (dir.join("server.crt"), dir.join("server.key"), dir.join("ca.crt"))
}

/// A temp dir of its own (removed on drop).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        TempDir(new_dir())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
