//! The Redis store behind a store device, against real `redis-server`s on
//! loopback: data of every kind round trips (holes stay holes), a 512-page
//! put is one round trip, a server killed and restarted with AOF loses
//! nothing (faults wait), one restarted without persistence gives lost
//! pages (a typed `Fault`, never zeros), a server down or full at
//! migration time leaves pages in RAM, a cluster spreads values over its
//! primaries and with `WAIT` survives a failover, a slow network changes
//! nothing, TLS and passwords work, and every key carries an expiry and is
//! gone once deleted or the store dropped.

mod common;
#[path = "common/redis_server.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use redis_server::*;
use uhmm::{AddressSpace, ErrorKind, PAGE_SIZE, Region};
use uhmm_devices::remote::{RedisConfig, RedisStore};
use uhmm_devices::store::{PageStore, RunIn, StoreDevice, StoreDeviceConfig};

/// A device over a Redis store at `url`, `tweak`ed.
fn redis_device(
    space: &AddressSpace,
    url: &str,
    tweak: impl FnOnce(&mut RedisConfig),
) -> (StoreDevice, Arc<RedisStore>) {
    let mut config = RedisConfig::from_url(url).expect("url");
    tweak(&mut config);
    let store = Arc::new(RedisStore::new(config).expect("store"));
    let dev = StoreDevice::new(space, store.clone(), StoreDeviceConfig::default()).expect("device");
    (dev, store)
}

/// A store that counts the `put`s it forwards.
#[derive(Debug)]
struct CountPuts(Arc<RedisStore>, std::sync::atomic::AtomicU64);

impl PageStore for CountPuts {
    fn put(&self, runs: &[RunIn<'_>]) -> uhmm::Result<Vec<bool>> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.put(runs)
    }
    fn fault_pages(&self, key: u64) -> usize {
        self.0.fault_pages(key)
    }
    fn get(&self, runs: &mut [uhmm_devices::store::RunOut<'_>]) -> uhmm::Result<()> {
        self.0.get(runs)
    }
    fn delete(&self, keys: &[u64]) {
        self.0.delete(keys)
    }
    fn usage(&self) -> uhmm_devices::store::StoreUsage {
        self.0.usage()
    }
}

/// Page `p`'s content, by kind: words, zeros, noise, text; `None` for a
/// hole (never written) when `holes`.
fn page_content(p: usize, seed: u64, holes: bool) -> Option<Vec<u8>> {
    if holes && p % 7 == 5 {
        return None;
    }
    Some(match p % 4 {
        0 => pattern(1, |i| i ^ (p as u32) << 12 ^ seed as u32),
        1 => vec![0; PAGE_SIZE],
        2 => noise(seed * 7919 + p as u64, PAGE_SIZE),
        _ => format!("page {p} of seed {seed}; ").repeat(PAGE_SIZE / 8).into_bytes()[..PAGE_SIZE].to_vec(),
    })
}

/// Writes the pages of `r` (holes left alone); returns what `r` holds.
fn write_content(r: &Region, seed: u64, holes: bool) -> Vec<u8> {
    let mut want = vec![0u8; r.len()];
    for p in 0..r.npages() {
        if let Some(c) = page_content(p, seed, holes) {
            r.write(p * PAGE_SIZE, &c).unwrap();
            want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].copy_from_slice(&c);
        }
    }
    want
}

fn assert_same(got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len());
    for (p, (g, w)) in got.chunks(PAGE_SIZE).zip(want.chunks(PAGE_SIZE)).enumerate() {
        assert!(g == w, "page {p} differs");
    }
}

/// Waits (with a deadline) until `f` holds.
fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not after {secs} s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn data_of_every_kind_round_trips_with_holes() {
    with_timeout(120, || {
        let server = RedisServer::start(ServerOpts { password: Some("pa:ss w".into()), ..ServerOpts::default() });
        let space = space();
        // An ACL user that may touch only uhmm's keys (percent-encoded in the URL).
        let acl = ["ACL", "SETUSER", "al@ce", "on", ">pw:1 2", "~uhmm:*", "+@all"];
        assert_eq!(server.cli(&acl), "OK");
        let url = format!("redis://al%40ce:pw%3A1%202@127.0.0.1:{}", server.port);
        let (dev, store) = redis_device(&space, &url, |_| {});
        store.ping().unwrap();
        for (n, seed) in [(1024usize, 1u64), (3, 2), (37, 3), (1, 4)] {
            let r = map(&space, n);
            let want = write_content(&r, seed, true);
            // Holes stay holes (the pages around them may have been
            // populated by the writes: those move, as zeros).
            let moved = dev.migrate_to_device(r.addr(), n).unwrap();
            assert_eq!((moved.moved + moved.holes, moved.not_stored), (n, 0), "{n} pages: {moved:?}");
            assert_same(&cpu_read(&r), &want);
            // And once more, moved after the reads.
            assert_eq!(dev.migrate_to_device(r.addr(), n).unwrap().moved, moved.moved);
            assert_same(&cpu_read(&r), &want);
        }
        let s = store.stats();
        assert_eq!((s.lost_pages, s.failed_puts), (0, 0), "{s:?}");
        assert!(s.values_got > 0 && s.values_set > 0, "{s:?}");
        // All read back: every value's last page deleted, so all unlinked.
        assert_eq!(store.usage().pages, 0);
        wait_until("deleted values unlinked", 30, || server.scan(&store.key_pattern()).is_empty());
        drop(dev);
    });
}

#[test]
fn one_put_of_a_chunk_is_one_round_trip() {
    with_timeout(120, || {
        let server = RedisServer::start(ServerOpts::default());
        let store = RedisStore::new(RedisConfig::from_url(&server.url()).unwrap()).unwrap();
        let keys: Vec<u64> = (0..512).collect();
        let data = noise(9, 512 * PAGE_SIZE);
        let before = store.stats();
        let stored = store.put(&[RunIn { vpn: 1000, keys: &keys, data: &data }]).unwrap();
        assert!(stored.iter().all(|s| *s));
        let after = store.stats();
        assert_eq!(after.put_round_trips - before.put_round_trips, 1, "{after:?}");
        // 1000 is not a multiple of 16: a head of 8 pages, 31 groups, a tail of 8.
        assert_eq!(after.values_set - before.values_set, 33);
        assert_eq!(store.fault_pages(3), 16);
        assert_eq!(store.fault_pages(100_000), 1);
        assert_eq!(store.usage().pages, 512);

        // A capacity of 4 groups' values: the rest of a put is not stored.
        let mut small = RedisConfig::from_url(&server.url()).unwrap();
        small.capacity_bytes = 4 * (16 * PAGE_SIZE as u64 + 16);
        let small = RedisStore::new(small).unwrap();
        let stored = small.put(&[RunIn { vpn: 0, keys: &keys, data: &data }]).unwrap();
        assert_eq!(stored.iter().filter(|s| **s).count(), 64);
        assert!(stored[..64].iter().all(|s| *s));
        assert_eq!((small.usage().pages, small.usage().used_bytes), (64, small.config().capacity_bytes));
        assert_eq!(small.stats().failed_puts, 512 - 64);

        // Through a device: each chunk of a migration, one round trip.
        let space = space();
        let store = Arc::new(RedisStore::new(RedisConfig::from_url(&server.url()).unwrap()).unwrap());
        let counted = Arc::new(CountPuts(store.clone(), Default::default()));
        let dev = StoreDevice::new(&space, counted.clone(), StoreDeviceConfig::default()).unwrap();
        let r = map(&space, 2048);
        let want = write_content(&r, 5, false);
        assert_eq!(dev.migrate_to_device(r.addr(), 2048).unwrap().moved, 2048);
        let s = store.stats();
        let puts = counted.1.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(s.put_round_trips, puts, "{puts} puts (chunks) took {} round trips", s.put_round_trips);
        // A fault brings back its group with one GET.
        let mut page = vec![0u8; PAGE_SIZE];
        r.read(17 * PAGE_SIZE, &mut page).unwrap();
        assert_same(&page, &want[17 * PAGE_SIZE..18 * PAGE_SIZE]);
        let s2 = store.stats();
        assert_eq!((s2.get_round_trips - s.get_round_trips, s2.values_got - s.values_got), (1, 1), "{s2:?}");
        assert_same(&cpu_read(&r), &want);
    });
}

#[test]
fn aof_server_killed_and_restarted_loses_nothing() {
    with_timeout(120, || {
        let mut server = RedisServer::start(ServerOpts { aof: true, ..ServerOpts::default() });
        let space = space();
        let (dev, store) = redis_device(&space, &server.url(), |_| {});
        let r = map(&space, 512);
        let want = write_content(&r, 11, true);
        assert!(dev.migrate_to_device(r.addr(), 512).unwrap().moved > 0);
        // Killed: faults wait; once one has retried, the server comes back.
        server.kill9();
        let back = {
            let store = store.clone();
            std::thread::spawn(move || {
                wait_until("a fault retried", 60, || store.stats().retries > 0);
                server.restart();
                server
            })
        };
        assert_same(&cpu_read(&r), &want);
        let server = back.join().unwrap();
        let s = store.stats();
        assert_eq!(s.lost_pages, 0, "{s:?}");
        assert!(s.retries > 0 && s.reconnects > 0, "{s:?}");
        assert_eq!(dev.counters().lost, 0);
        // New values after the restart too.
        let r2 = map(&space, 64);
        let want2 = write_content(&r2, 12, false);
        assert_eq!(dev.migrate_to_device(r2.addr(), 64).unwrap().moved, 64);
        assert_same(&cpu_read(&r2), &want2);
        drop(server);
    });
}

#[test]
fn a_server_without_persistence_restarted_gives_lost_pages_never_zeros() {
    with_timeout(120, || {
        let mut server = RedisServer::start(ServerOpts::default());
        let space = space();
        let (dev, store) = redis_device(&space, &server.url(), |c| c.fault_timeout = Duration::from_secs(20));
        let r = map(&space, 64);
        fill(&r, 0..64, |i| i + 1);
        assert_eq!(dev.migrate_to_device(r.addr(), 64).unwrap().moved, 64);
        let kept = map(&space, 4);
        fill(&kept, 0..4, |i| i * 3);
        server.restart();
        let mut page = vec![0u8; PAGE_SIZE];
        for p in 0..64 {
            let err = r.read(p * PAGE_SIZE, &mut page).expect_err("a lost page is not read");
            assert_eq!(err.kind(), ErrorKind::Fault, "page {p}");
        }
        let mut all = vec![0u8; r.len()];
        assert_eq!(r.read(0, &mut all).unwrap_err().kind(), ErrorKind::Fault);
        assert_eq!(space.stats().poisoned_pages, 64);
        assert_eq!(dev.counters().lost, 64);
        assert_eq!(store.stats().lost_pages, 64);
        assert_words(&cpu_read(&kept), |i| i * 3);
        drop(server);
    });
}

#[test]
fn a_server_down_at_migration_time_leaves_the_pages_in_ram() {
    with_timeout(120, || {
        let mut server = RedisServer::start(ServerOpts::default());
        server.kill9();
        let space = space();
        let (dev, store) = redis_device(&space, &server.url(), |c| c.put_timeout = Duration::from_millis(300));
        assert!(store.ping().is_err());
        let r = map(&space, 256);
        let want = write_content(&r, 21, false);
        let moved = dev.migrate_to_device(r.addr(), 256).unwrap();
        assert_eq!((moved.moved, moved.not_stored), (0, 256), "{moved:?}");
        assert_eq!(pages_in_ram(&space, &r, 0..256), 256);
        assert_same(&cpu_read(&r), &want);
        assert_eq!(store.stats().failed_puts, 256);
        assert_eq!(store.usage().pages, 0);
        // Back up: the next migration moves them.
        server.restart();
        assert_eq!(dev.migrate_to_device(r.addr(), 256).unwrap().moved, 256);
        assert_same(&cpu_read(&r), &want);
    });
}

#[test]
fn a_full_server_stores_part_and_loses_nothing() {
    with_timeout(120, || {
        let server = RedisServer::start(ServerOpts::default());
        let used: u64 = server
            .cli(&["INFO", "memory"])
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("used_memory");
        let max = (used + (1 << 20)).to_string();
        assert_eq!(server.cli(&["CONFIG", "SET", "maxmemory", &max]), "OK");
        assert_eq!(server.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]), "OK");
        let space = space();
        let (dev, store) = redis_device(&space, &server.url(), |_| {});
        let r = map(&space, 1024);
        let want = write_content(&r, 31, false);
        let moved = dev.migrate_to_device(r.addr(), 1024).unwrap();
        assert!(moved.moved > 0 && moved.not_stored > 0, "{moved:?}");
        assert_eq!(moved.moved + moved.not_stored, 1024);
        assert_eq!(store.stats().failed_puts, moved.not_stored as u64);
        assert_same(&cpu_read(&r), &want);
        assert_eq!(store.stats().lost_pages, 0);
    });
}

#[test]
fn a_cluster_spreads_values_and_survives_a_failover_with_wait() {
    with_timeout(170, || {
        let mut cluster = RedisCluster::start(3, 1);
        let space = space();
        let (dev, store) =
            redis_device(&space, &cluster.url(), |c| c.wait_replicas = Some((1, Duration::from_secs(5))));
        let r = map(&space, 1024);
        let want = write_content(&r, 41, true);
        let moved = dev.migrate_to_device(r.addr(), 1024).unwrap();
        assert_eq!(moved.not_stored, 0, "{moved:?}");
        let primaries = cluster.primaries();
        assert_eq!(primaries.len(), 3);
        for &i in &primaries {
            assert!(!cluster.nodes[i].scan(&store.key_pattern()).is_empty(), "primary {i} holds no value");
        }
        // A direct put of a chunk: one round trip per primary at most.
        let before = store.stats().put_round_trips;
        let keys: Vec<u64> = (1 << 20..(1 << 20) + 512).collect();
        let data = noise(5, 512 * PAGE_SIZE);
        assert!(store.put(&[RunIn { vpn: 0, keys: &keys, data: &data }]).unwrap().iter().all(|s| *s));
        assert!(store.stats().put_round_trips - before <= 3);
        store.delete(&keys);
        // Slots move between two primaries behind the store's back: reads
        // follow MOVED.
        cluster.reshard(primaries[1], primaries[2], 2000);
        assert_same(&cpu_read(&r), &want);
        assert!(store.stats().redirects > 0, "{:?}", store.stats());
        assert_eq!(dev.migrate_to_device(r.addr(), 1024).unwrap().not_stored, 0);
        // Half read back before the failover.
        let mut half = vec![0u8; r.len() / 2];
        r.read(0, &mut half).unwrap();
        assert_same(&half, &want[..r.len() / 2]);
        // A primary holding values dies; its replica takes over.
        let victim = primaries[0];
        cluster.kill_and_fail_over(victim);
        assert_same(&cpu_read(&r), &want);
        let s = store.stats();
        assert_eq!(s.lost_pages, 0, "{s:?}");
        // Writes go on; those to the new primary, which has no replica
        // left to confirm them, are not stored (WAIT 1 falls short): they
        // stay in RAM.
        let r2 = map(&space, 256);
        let want2 = write_content(&r2, 42, false);
        let moved = dev.migrate_to_device(r2.addr(), 256).unwrap();
        assert_eq!(moved.moved + moved.not_stored, 256, "{moved:?}");
        assert!(moved.moved > 0 && moved.not_stored > 0, "{moved:?}");
        assert_same(&cpu_read(&r2), &want2);
        drop(dev);
        drop(store);
        assert!(cluster.scan("uhmm:*").is_empty(), "keys left after drop");
    });
}

#[test]
fn a_slow_network_changes_nothing() {
    with_timeout(120, || {
        let server = RedisServer::start(ServerOpts::default());
        let proxy = DelayProxy::start(server.port, Duration::from_millis(3));
        let space = space();
        let (dev, store) = redis_device(&space, &format!("redis://127.0.0.1:{}", proxy.port), |_| {});
        let r = map(&space, 1024);
        let want = write_content(&r, 51, true);
        let moved = dev.migrate_to_device(r.addr(), 1024).unwrap();
        assert_eq!((moved.moved + moved.holes, moved.not_stored), (1024, 0), "{moved:?}");
        assert_same(&cpu_read(&r), &want);
        assert_eq!(store.stats().lost_pages, 0);
        drop(dev);
        drop(store);
        drop(proxy);
    });
}

#[test]
fn keys_expire_are_refreshed_and_are_gone_after_drop() {
    with_timeout(120, || {
        let server = RedisServer::start(ServerOpts::default());
        let space = space();
        let (dev, store) = redis_device(&space, &server.url(), |c| c.ttl = Duration::from_secs(4));
        let r = map(&space, 256);
        let want = write_content(&r, 61, false);
        assert_eq!(dev.migrate_to_device(r.addr(), 256).unwrap().moved, 256);
        let keys = server.scan(&store.key_pattern());
        assert_eq!(keys.len(), 16);
        for k in &keys {
            let pttl: i64 = server.cli(&["PTTL", k]).parse().unwrap();
            assert!(pttl > 0 && pttl <= 4000, "{k}: PTTL {pttl}");
        }
        // The background thread refreshes them.
        wait_until("expiry refreshed", 60, || store.stats().expiry_refreshes >= 16);
        assert_same(&cpu_read(&r), &want);
        // A value set behind the store's back in its namespace goes at drop too.
        let stray = format!("uhmm:{}:999999", store.config().namespace);
        assert_eq!(server.cli(&["SET", &stray, "x"]), "OK");
        assert_eq!(dev.migrate_to_device(r.addr(), 256).unwrap().moved, 256);
        drop(dev);
        drop(store);
        assert_eq!(server.dbsize(), 0);
    });
}

#[test]
fn tls_round_trip_and_bad_credentials() {
    with_timeout(120, || {
        let tmp = TempDir::new();
        let (cert, key, ca) = make_tls_files(&tmp.0);
        let server = RedisServer::start(ServerOpts {
            tls: Some((cert, key, ca.clone())),
            password: Some("s3cret".into()),
            ..ServerOpts::default()
        });
        let tls_port = server.tls_port.unwrap();
        let space = space();
        let url = format!("rediss://:s3cret@127.0.0.1:{tls_port}?tls_ca={}", ca.display());
        let (dev, store) = redis_device(&space, &url, |_| {});
        store.ping().unwrap();
        let r = map(&space, 128);
        let want = write_content(&r, 71, true);
        assert_eq!(dev.migrate_to_device(r.addr(), 128).unwrap().not_stored, 0);
        assert_same(&cpu_read(&r), &want);
        drop(dev);
        drop(store);

        // A wrong password: nothing stored, the pages stay.
        let url = format!("redis://:wrong@127.0.0.1:{}", server.port);
        let (dev, store) = redis_device(&space, &url, |_| {});
        assert!(store.ping().is_err());
        let r = map(&space, 32);
        let want = write_content(&r, 72, false);
        assert_eq!(dev.migrate_to_device(r.addr(), 32).unwrap().moved, 0);
        assert_same(&cpu_read(&r), &want);
        // TLS to the plain port fails too, and so does plain text to the TLS port.
        for url in [
            format!("rediss://:s3cret@127.0.0.1:{}?tls_ca={}", server.port, ca.display()),
            format!("redis://:s3cret@127.0.0.1:{tls_port}"),
        ] {
            let store = RedisStore::new(RedisConfig {
                connect_timeout: Duration::from_millis(500),
                io_timeout: Duration::from_millis(500),
                ..RedisConfig::from_url(&url).unwrap()
            })
            .unwrap();
            assert!(store.ping().is_err(), "{url}");
        }
    });
}

/// Figures behind the default group size (`--ignored --nocapture`; no
/// assertion on time): per group size, the time to move 4096 pages out,
/// to read them back in order (faults bring windows), and of 256 faults on
/// pages far apart (each one GET of a group).
#[test]
#[ignore]
fn group_size_figures() {
    with_timeout(300, || {
        let server = RedisServer::start(ServerOpts::default());
        let space = space();
        const N: usize = 4096;
        for group in [1usize, 4, 16, 64] {
            let (dev, store) = redis_device(&space, &server.url(), |c| c.group_pages = group);
            let r = map(&space, N);
            let want = write_content(&r, 81, false);
            let t = Instant::now();
            assert_eq!(dev.migrate_to_device(r.addr(), N).unwrap().moved, N);
            let out = t.elapsed();
            let t = Instant::now();
            assert_same(&cpu_read(&r), &want);
            let seq = t.elapsed();
            assert_eq!(dev.migrate_to_device(r.addr(), N).unwrap().moved, N);
            let t = Instant::now();
            let mut page = vec![0u8; PAGE_SIZE];
            for k in 0..256 {
                let p = (k * 997) % N;
                r.read(p * PAGE_SIZE, &mut page).unwrap();
            }
            let random = t.elapsed();
            let s = store.stats();
            println!(
                "group {group:3}: out {:7.1} ms ({:.0} MiB/s), sequential back {:7.1} ms, 256 random faults {:7.1} ms ({:.0} us each), {} values set, {} got",
                out.as_secs_f64() * 1e3,
                (N * PAGE_SIZE) as f64 / (1 << 20) as f64 / out.as_secs_f64(),
                seq.as_secs_f64() * 1e3,
                random.as_secs_f64() * 1e3,
                random.as_secs_f64() * 1e6 / 256.0,
                s.values_set,
                s.values_got,
            );
        }
    });
}

#[test]
fn a_forked_child_reads_the_parents_stored_pages() {
    if !isolated("a_forked_child_reads_the_parents_stored_pages") {
        return;
    }
    let server = RedisServer::start(ServerOpts::default());
    let space = space();
    let (dev, store) = redis_device(&space, &server.url(), |_| {});
    let r = map(&space, 256);
    fill(&r, 0..256, |i| i ^ 0x5a5a);
    assert_eq!(dev.migrate_to_device(r.addr(), 256).unwrap().moved, 256);
    let code = fork_child(|| {
        let Ok(mine) = AddressSpace::new(uhmm::Config::default()) else { return 2 };
        let Ok(child) = mine.adopt(&r) else { return 3 };
        let mut buf = vec![0u8; child.len()];
        if child.read(0, &mut buf).is_err() {
            return 4;
        }
        i32::from((0..256 * WORDS_PER_PAGE).any(|w| word(&buf, w) != w as u32 ^ 0x5a5a)) * 5
    });
    assert_eq!(code, 0, "the child read the parent's data");
    assert_words(&cpu_load(&r), |i| i ^ 0x5a5a);
    assert_eq!(store.stats().lost_pages, 0);
    drop(dev);
    drop(store);
    assert_eq!(server.dbsize(), 0);
}
