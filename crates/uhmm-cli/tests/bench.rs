//! Runs the built `uhmm` binary: `uhmm bench --quick --max-size 4M` must exit
//! 0, print the baselines and the targets, and write JSON that parses and an
//! SVG. Timings are never asserted; a hang fails the test.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `uhmm` with `args`, killing it after [`TIMEOUT`]. Returns the exit
/// code (`None` if killed by a signal), stdout and stderr.
fn run_uhmm(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_uhmm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn uhmm");
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let out_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for uhmm") {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            let out = out_reader.join().unwrap_or_default();
            let err = err_reader.join().unwrap_or_default();
            panic!("uhmm {args:?} still running after {TIMEOUT:?}: killed\n--- stdout\n{out}\n--- stderr\n{err}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    (status.code(), out_reader.join().unwrap_or_default(), err_reader.join().unwrap_or_default())
}

/// A fresh scratch directory for this test process.
fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("uhmm-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

#[test]
fn quick_bench_writes_table_json_and_plot() {
    let dir = scratch();
    let json = dir.join("bench.json");
    let svg = dir.join("bench.svg");
    let (code, out, err) = run_uhmm(&[
        "bench",
        "--quick",
        "--no-zram", // a test suite must not touch the machine's swap
        "--max-size",
        "4M",
        "--json",
        json.to_str().expect("utf-8 path"),
        "--plot",
        svg.to_str().expect("utf-8 path"),
    ]);
    let dump = format!("--- stdout\n{out}\n--- stderr\n{err}");
    assert_eq!(code, Some(0), "uhmm bench --quick failed\n{dump}");
    for what in ["memcpy, 1 thread", "memcpy, 2 threads", "raw userfaultfd round trip", "zram", "RAM → sim", "targets"]
    {
        assert!(out.contains(what), "`{what}` missing from the report\n{dump}");
    }

    let text = std::fs::read_to_string(&json).expect("JSON written");
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON parses");
    let cases = v["cases"].as_array().expect("cases array");
    assert!(cases.iter().any(|c| c["id"] == "memcpy_1t"), "no memcpy case in JSON");
    assert!(cases.iter().any(|c| c["id"] == "uffd_round_trip"), "no raw userfaultfd case in JSON");
    for c in cases {
        assert!(c["runs"].as_array().is_some_and(|r| r.len() >= 5), "fewer than 5 runs: {c}");
    }
    assert!(v["targets"].as_array().is_some_and(|t| !t.is_empty()), "no targets in JSON");

    let plot = std::fs::read_to_string(&svg).expect("SVG written");
    let head = plot.trim_start();
    assert!(head.starts_with("<svg") || head.starts_with("<?xml"), "not an SVG: {}", &head[..head.len().min(80)]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn help_documents_bench() {
    let (code, out, err) = run_uhmm(&["bench", "--help"]);
    assert_eq!(code, Some(0), "stderr: {err}");
    for flag in ["--quick", "--json", "--plot", "--max-size", "Exit status"] {
        assert!(out.contains(flag), "`{flag}` not in help:\n{out}");
    }
}
