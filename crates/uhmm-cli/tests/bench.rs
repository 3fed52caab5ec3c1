//! Runs the built `uhmm` binary: `uhmm bench --quick --max-size 4M` must exit
//! 0, print the baselines and the targets, and write JSON that parses and an
//! SVG. Timings are never asserted; a hang fails the test.

use std::path::PathBuf;

mod common;

use common::*;

/// A fresh scratch directory for this test process.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("uhmm-bench-test-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

#[test]
fn quick_bench_writes_table_json_and_plot() {
    let dir = scratch("quick");
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
    for id in ["uffd_round_trip_same_cpu", "fault_latency_same_cpu", "to_device_moving", "to_ram_moving"] {
        assert!(cases.iter().any(|c| c["id"] == id), "no {id} case in JSON");
    }
    // The bulk sweep's sizes share one region: every size is measured.
    for id in ["to_device_small", "to_ram_small"] {
        let sizes: Vec<u64> = cases.iter().filter(|c| c["id"] == id).filter_map(|c| c["bytes"].as_u64()).collect();
        assert!(sizes.len() >= 2 && sizes.contains(&(4 << 20)), "{id} measured at {sizes:?}");
    }
    for c in cases {
        assert!(c["runs"].as_array().is_some_and(|r| r.len() >= 5), "fewer than 5 runs: {c}");
    }
    // The cases carry the host's steal time while they were measured.
    for id in [
        "memcpy_1t",
        "to_device_small",
        "to_ram_huge",
        "uffd_round_trip_same_cpu",
        "fault_latency_same_cpu",
        "scan_seq_fa16",
    ] {
        for c in cases.iter().filter(|c| c["id"] == id) {
            assert!(c["steal"].as_f64().is_some_and(|s| s >= 0.0), "no steal reading: {c}");
        }
    }
    let targets = v["targets"].as_array().expect("targets array");
    for t in targets.iter().filter(|t| t["name"].as_str().is_some_and(|n| n.contains("flat") || n.contains("scan"))) {
        assert!(
            t["detail"].as_str().is_some_and(|d| d.contains("host steal")),
            "the target names the steal time of its cases: {t}"
        );
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

/// Runs one side of `bench tier`'s RAM-budget rows the way the bench does
/// (`--kv-child PLAN`, lines on stdin), on a 1 MiB table: the child must
/// exit 0 and print a result line with every record read back right. The
/// kernel side gets a plain file for its cgroup's usage (no cgroup, no
/// swap: this needs no root).
fn kv_child(uhmm: bool, signal_faults: bool, usage: Option<&std::path::Path>) -> serde_json::Value {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let plan = serde_json::json!({
        "uhmm": uhmm,
        "table_bytes": 1 << 20,
        "budget_bytes": 1 << 19,
        "warmup_ms": 100,
        "timed_ms": 300,
        "track_ms": 300,
        "scan_passes": 1,
        "seed": 7,
        "usage_file": usage,
        "handler_threads": null,
        "signal_faults": signal_faults,
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_uhmm"))
        .args(["bench", "tier", "--kv-child", &plan.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn uhmm");
    // "start", then "go" to @filled and to @zipf-done.
    child.stdin.take().expect("stdin").write_all(b"start\ngo\ngo\n").expect("write stdin");
    let out = child.wait_with_output().expect("wait for uhmm");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the kv child failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[..2], ["@filled 0", "@zipf-done"][..], "{stdout}");
    let v: serde_json::Value = serde_json::from_str(lines.last().expect("a result line")).expect("JSON parses");
    assert_eq!(v["mismatches"], 0, "{v}");
    assert!(v["ops"].as_u64().is_some_and(|n| n > 0), "{v}");
    assert_eq!(v["scan_pass_s"].as_array().map(Vec::len), Some(1), "{v}");
    v
}

#[test]
fn kv_children_run_their_workload_and_check_every_record() {
    let dir = scratch("kv");
    let usage = dir.join("usage");
    std::fs::write(&usage, "0\n").expect("write usage file");
    let k = kv_child(false, false, Some(&usage));
    assert_eq!(k["side"], "kernel");
    // The uhmm side, with faults answered by the handler threads and in
    // the faulting thread.
    for (signal, side) in [(false, "uhmm"), (true, "uhmm, faults in the faulting thread")] {
        let u = kv_child(true, signal, None);
        assert_eq!(u["side"], side);
        for f in ["recall", "false_hot", "tracking_cpu"] {
            assert!(u[f].as_f64().is_some_and(|x| (0.0..=1.0).contains(&x)), "{f}: {u}");
        }
        assert!(u["resident"]["max"].as_u64().is_some_and(|r| r <= 1 << 20), "{u}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
