//! Runs the built `uhmm` binary: a short integrity soak with fault injection
//! (`uhmm stress --seconds 5 --threads 2 --alloc-fail-rate 0.1
//! --copy-error-rate 0.01`) must exit 0 and report no lost bytes. A hang
//! fails the test (the run is killed after two minutes).

use std::io::Read;
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

#[test]
fn short_soak_with_fault_injection_loses_nothing() {
    let args = ["stress", "--seconds", "5", "--threads", "2", "--alloc-fail-rate", "0.1", "--copy-error-rate", "0.01"];
    let (code, out, err) = run_uhmm(&args);
    assert_eq!(code, Some(0), "uhmm {args:?} failed\n--- stdout\n{out}\n--- stderr\n{err}");
    assert!(out.contains("lost or corrupted bytes: 0"), "no clean verdict\n--- stdout\n{out}\n--- stderr\n{err}");
    assert!(out.contains("unexpected errors:        0"), "unexpected errors\n--- stdout\n{out}");
    assert!(!out.contains("injected faults:          0 allocation failures"), "no fault was injected\n{out}");
}

#[test]
fn two_devices_pass_and_three_are_refused() {
    // Two devices, a short run: still clean.
    let (code, out, err) =
        run_uhmm(&["stress", "--seconds", "2", "--devices", "2", "--size", "2M", "--checkpoint", "1"]);
    assert_eq!(code, Some(0), "--devices 2 failed\n--- stdout\n{out}\n--- stderr\n{err}");
    assert!(out.contains("lost or corrupted bytes: 0"), "{out}");
    // Three devices are refused by the argument parser.
    let (code, _, _) = run_uhmm(&["stress", "--devices", "3"]);
    assert_eq!(code, Some(2));
}
