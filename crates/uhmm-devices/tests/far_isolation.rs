//! Two processes on one Redis server, each with its own address space and
//! sealed store: what either sends is ciphertext, and a value of the other
//! process put under its own keys (as a hostile server or a second
//! tenant would) comes back as lost pages, never as the other's data.
//! The other process's pages stay intact throughout.

mod common;
#[path = "common/redis_server.rs"]
mod redis_server;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use redis_server::*;
use uhmm::{AddressSpace, ErrorKind, PAGE_SIZE, Region};
use uhmm_devices::remote::{RedisConfig, RedisStore};
use uhmm_devices::store::{SealedStore, StoreDevice, StoreDeviceConfig};

const NPAGES: usize = 64;
const TEST: &str = "two_processes_on_one_server_cannot_read_each_other";
const ROLE: &str = "UHMM_FAR_ISOLATION_ROLE";

/// A marker that fills every page of process `who`: easy to look for in
/// the server's values.
fn marker(who: &str) -> Vec<u8> {
    format!("plaintext of process {who}: never on the server. ").into_bytes()
}

fn fill_with(region: &Region, m: &[u8]) {
    let bytes: Vec<u8> = m.iter().copied().cycle().take(region.len()).collect();
    region.write(0, &bytes).expect("write");
}

/// An address space whose region of [`NPAGES`] pages, filled with the
/// marker of `who`, lives sealed on the server at `url` under `namespace`.
fn tenant(url: &str, namespace: &str, who: &str) -> (AddressSpace, StoreDevice, Region, Arc<RedisStore>) {
    let space = space();
    let config = RedisConfig { namespace: namespace.into(), ..RedisConfig::from_url(url).expect("url") };
    let store = Arc::new(RedisStore::new(config).expect("store"));
    let sealed = Arc::new(SealedStore::new(store.clone()).expect("sealed"));
    let dev = StoreDevice::new(&space, sealed, StoreDeviceConfig::default()).expect("device");
    let region = map(&space, NPAGES);
    fill_with(&region, &marker(who));
    assert_eq!(dev.migrate_to_device(region.addr(), NPAGES).expect("migrate").moved, NPAGES);
    (space, dev, region, store)
}

fn wait_for(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && s.ends_with('\n')
        {
            return s.trim().to_string();
        }
        assert!(Instant::now() < deadline, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Process A: puts its pages on the server, says so, waits for B to be
/// done, then checks its own pages.
fn process_a(url: &str, dir: &Path) {
    let (_space, _dev, region, _store) = tenant(url, "tenant-a", "A");
    std::fs::write(dir.join("a-ready"), "tenant-a\n").expect("say ready");
    wait_for(&dir.join("b-done"));
    let want: Vec<u8> = marker("A").iter().copied().cycle().take(region.len()).collect();
    assert!(cpu_read(&region) == want, "process A's pages changed");
}

/// The server's values under `namespace`, by key.
fn values(con: &mut redis::Connection, namespace: &str) -> Vec<(String, Vec<u8>)> {
    let mut keys: Vec<String> = redis::cmd("KEYS").arg(format!("uhmm:{namespace}:*")).query(con).expect("KEYS");
    keys.sort_by_key(|k| k.rsplit(':').next().and_then(|n| n.parse::<u64>().ok()));
    keys.into_iter()
        .map(|k| {
            let v: Vec<u8> = redis::cmd("GET").arg(&k).query(con).expect("GET");
            (k, v)
        })
        .collect()
}

#[test]
fn two_processes_on_one_server_cannot_read_each_other() {
    if let Ok(role) = std::env::var(ROLE) {
        assert_eq!(role, "A");
        let dir = PathBuf::from(std::env::var("UHMM_FAR_ISOLATION_DIR").expect("dir"));
        process_a(&std::env::var("UHMM_FAR_ISOLATION_URL").expect("url"), &dir);
        return;
    }
    with_timeout(120, || {
        require_redis();
        let server = RedisServer::start(ServerOpts::default());
        let url = server.url();
        let dir = std::env::temp_dir().join(format!("uhmm-far-isolation-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mut a = Command::new(std::env::current_exe().expect("exe"))
            .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
            .env(ROLE, "A")
            .env("UHMM_FAR_ISOLATION_URL", &url)
            .env("UHMM_FAR_ISOLATION_DIR", &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start process A");
        wait_for(&dir.join("a-ready"));

        // Process B (this one) on the same server.
        let (_space, _dev, region, _store) = tenant(&url, "tenant-b", "B");
        let mut con = redis::Client::open(url.as_str()).expect("client").get_connection().expect("connect");
        let (a_values, b_values) = (values(&mut con, "tenant-a"), values(&mut con, "tenant-b"));
        assert!(!a_values.is_empty() && a_values.len() == b_values.len(), "{} / {}", a_values.len(), b_values.len());
        for (who, vals) in [("A", &a_values), ("B", &b_values)] {
            let m = marker(who);
            for (k, v) in vals {
                assert!(!v.windows(m.len()).any(|w| w == m.as_slice()), "{k} holds process {who}'s plaintext");
            }
        }
        // A's values under B's keys, as a second tenant or the server could
        // put them: B's pages come back lost, never A's bytes.
        for ((bk, _), (_, av)) in b_values.iter().zip(&a_values) {
            let _: () = redis::cmd("SET").arg(bk).arg(av.as_slice()).query(&mut con).expect("SET");
        }
        let mut page = vec![0u8; PAGE_SIZE];
        for p in 0..NPAGES {
            let err = region.read(p * PAGE_SIZE, &mut page).expect_err("a page of the other process was mapped");
            assert_eq!(err.kind(), ErrorKind::Fault, "page {p}: {err}");
        }
        std::fs::write(dir.join("b-done"), "done\n").expect("say done");

        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = a.try_wait().expect("wait for A") {
                break s;
            }
            assert!(Instant::now() < deadline, "process A did not finish");
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = a.wait_with_output().expect("A's output");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            status.success(),
            "process A failed: {status}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// On a real server: a value with a flipped bit, a value copied from
/// another group of the same process, and an older value of the same pages
/// put back after they were stored again all come back as lost pages
/// (a typed `Fault`); the pages of untouched values read right.
#[test]
fn tampered_copied_and_stale_values_come_back_lost() {
    with_timeout(120, || {
        require_redis();
        let server = RedisServer::start(ServerOpts::default());
        let url = server.url();
        let (_space, dev, region, _store) = tenant(&url, "tamper", "T");
        let mut con = redis::Client::open(url.as_str()).expect("client").get_connection().expect("connect");
        let vals = values(&mut con, "tamper");
        assert_eq!(vals.len(), NPAGES / 16, "one value a group of 16 pages");
        // Group 0: a flipped bit in its last page (each page is sealed on
        // its own: only that page is lost). Group 1: group 2's value.
        let mut flipped = vals[0].1.clone();
        *flipped.last_mut().expect("bytes") ^= 0x10;
        let _: () = redis::cmd("SET").arg(&vals[0].0).arg(flipped).query(&mut con).expect("SET");
        let _: () = redis::cmd("SET").arg(&vals[1].0).arg(vals[2].1.as_slice()).query(&mut con).expect("SET");
        let want: Vec<u8> = marker("T").iter().copied().cycle().take(region.len()).collect();
        let mut page = vec![0u8; PAGE_SIZE];
        for p in 0..NPAGES {
            let got = region.read(p * PAGE_SIZE, &mut page);
            if p == 15 || (16..32).contains(&p) {
                assert_eq!(got.expect_err("a forged page was mapped").kind(), ErrorKind::Fault, "page {p}");
            } else {
                got.expect("an untouched value reads");
                assert!(page == want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], "page {p} is wrong");
            }
        }
        // Groups 2 and 3 came back; stored again, they are new values. The
        // old ones put back under the new keys are stale: lost.
        assert_eq!(dev.migrate_to_device(region.addr() + 32 * PAGE_SIZE, 32).expect("migrate").moved, 32);
        let again = values(&mut con, "tamper");
        let new: Vec<_> = again.iter().filter(|(k, _)| !vals.iter().any(|(o, _)| o == k)).collect();
        assert_eq!(new.len(), 2, "two new values: {again:?}");
        for ((k, _), (_, old)) in new.iter().zip(&vals[2..]) {
            let _: () = redis::cmd("SET").arg(k).arg(old.as_slice()).query(&mut con).expect("SET");
        }
        for p in 32..NPAGES {
            let err = region.read(p * PAGE_SIZE, &mut page).expect_err("a stale page was mapped");
            assert_eq!(err.kind(), ErrorKind::Fault, "page {p}: {err}");
        }
    });
}
