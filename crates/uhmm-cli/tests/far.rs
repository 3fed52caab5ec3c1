//! The built `uhmm` on far stores: the integrity soak on a file store, on
//! the compressed store written back to a file (`compress:1M+file:…`), and
//! on a Redis server killed with `kill -9` and restarted in the middle (AOF
//! with `appendfsync always`: nothing may be lost), the demo on both, and
//! `uhmm run --device redis://…` of python3 under a RAM budget. Servers are
//! started by the tests on loopback (`redis-server` from Debian's
//! `redis-server` package; a missing one fails the test). Every run is
//! killed after two minutes.

mod common;
#[path = "../../uhmm-devices/tests/common/redis_server.rs"]
mod redis_server;

use std::time::Duration;

use common::*;
use redis_server::{RedisServer, ServerOpts, require_redis};

fn assert_clean(args: &[&str], (code, out, err): &(Option<i32>, String, String)) {
    assert_eq!(*code, Some(0), "uhmm {args:?} failed\n--- stdout\n{out}\n--- stderr\n{err}");
    assert!(out.contains("lost or corrupted bytes: 0"), "no clean verdict\n--- stdout\n{out}\n--- stderr\n{err}");
    assert!(out.contains("unexpected errors:        0"), "unexpected errors\n--- stdout\n{out}");
}

#[test]
fn soak_on_a_file_store_under_a_ram_budget_loses_nothing() {
    let args = [
        "stress",
        "--device",
        "file:/var/tmp",
        "--seconds",
        "8",
        "--threads",
        "2",
        "--regions",
        "3",
        "--huge",
        "--ram-budget",
        "8M",
    ];
    let r = run_uhmm(&args);
    assert_clean(&args, &r);
    assert!(r.1.contains("store file:/var/tmp"), "the far store's counters are printed\n{}", r.1);
    assert!(!r.1.contains("sealed 0 "), "pages went to the file\n{}", r.1);
}

#[test]
fn soak_on_the_compressed_store_written_back_to_a_file_loses_nothing() {
    let args = [
        "stress",
        "--device",
        "compress:1M+file:/var/tmp",
        "--seconds",
        "8",
        "--threads",
        "2",
        "--regions",
        "3",
        "--size",
        "8M",
    ];
    let r = run_uhmm(&args);
    assert_clean(&args, &r);
    assert!(r.1.contains("store compress:1M+file:/var/tmp"), "the store's counters are printed\n{}", r.1);
    let written_back = r.1.split("written back ").nth(1).and_then(|t| t.split(',').next()?.parse::<u64>().ok());
    assert!(written_back.is_some_and(|n| n > 0), "pages were written back to the file\n{}", r.1);
}

#[test]
fn soak_on_redis_survives_a_kill_and_restart_of_the_server() {
    require_redis();
    let mut server = RedisServer::start(ServerOpts { aof: true, ..ServerOpts::default() });
    let url = server.url();
    let args: Vec<String> =
        ["stress", "--device", &url, "--seconds", "16", "--threads", "2", "--regions", "3", "--size", "8M"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let soak = {
        let args = args.clone();
        std::thread::spawn(move || run_uhmm(&args.iter().map(String::as_str).collect::<Vec<_>>()))
    };
    std::thread::sleep(Duration::from_secs(6));
    server.kill9();
    std::thread::sleep(Duration::from_secs(1));
    server.restart();
    let r = soak.join().expect("the soak's thread");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_clean(&args, &r);
    assert!(r.1.contains("poisoned pages:           0"), "{}", r.1);
    assert_eq!(server.dbsize(), 0, "the soak's keys are removed when it ends");
}

#[test]
fn the_demo_runs_on_a_file_and_on_redis() {
    require_redis();
    let server = RedisServer::start(ServerOpts::default());
    for device in ["file:/var/tmp".to_string(), server.url()] {
        let args = ["demo", "--size", "32M", "--no-progress", "--device", &device];
        let (code, out, err) = run_uhmm(&args);
        assert_eq!(code, Some(0), "uhmm {args:?}\n--- stdout\n{out}\n--- stderr\n{err}");
        assert!(out.contains("sealed"), "{out}");
    }
    assert_eq!(server.dbsize(), 0, "the demo's keys are removed when it ends");
}

#[test]
fn a_bad_far_address_is_refused_before_anything_starts() {
    for device in ["nfs://x", "file:", "redis://"] {
        let (code, _, err) = run_uhmm(&["demo", "--device", device]);
        assert_eq!(code, Some(2), "--device {device}: {err}");
        assert!(err.contains("--device"), "{err}");
    }
}

#[test]
fn a_server_that_does_not_answer_is_an_error_at_once() {
    // Port 1 on loopback: nothing listens there.
    let (code, out, err) = run_uhmm(&["demo", "--size", "8M", "--device", "redis://127.0.0.1:1"]);
    assert_ne!(code, Some(0), "{out}");
    assert!(err.contains("opening the far store") && err.contains("127.0.0.1:1"), "{err}");
}
