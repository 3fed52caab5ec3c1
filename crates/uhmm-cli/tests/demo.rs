//! Runs the built `uhmm` binary: `uhmm demo --size 8M` must exit 0 and print
//! the residency map and the counters; a hang fails the test.

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
fn demo_8m_verifies_every_byte() {
    let (code, out, err) = run_uhmm(&["demo", "--size", "8M"]);
    let dump = format!("--- stdout\n{out}\n--- stderr\n{err}");
    assert_eq!(code, Some(0), "uhmm demo --size 8M failed\n{dump}");
    // The residency map: a legend, rows of cells, the page census; the region
    // goes from holes to RAM to the device, and part of it comes back.
    assert!(out.contains("'D' on a device"), "no map legend\n{dump}");
    assert!(
        out.contains("|................................................................|"),
        "no map of holes\n{dump}"
    );
    assert!(
        out.contains("|RRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRR|"),
        "no map of RAM\n{dump}"
    );
    assert!(
        out.contains("|DDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDD|"),
        "no map of device pages\n{dump}"
    );
    assert!(
        out.contains("pages: hole 0  ram 0  zero 0  device 2048  poisoned 0"),
        "not all pages reached the device\n{dump}"
    );
    // The counters.
    for counter in ["faults", "zero_filled_pages", "migrate_to_ram", "pages_to_device", "pages_to_ram", "GB/s"] {
        assert!(out.contains(counter), "counter `{counter}` missing\n{dump}");
    }
    assert!(out.contains("pages migrated: to device 2048"), "pages to device not reported\n{dump}");
    assert!(out.contains("result: OK"), "no OK result\n{dump}");
}

#[test]
fn bad_size_is_a_usage_error() {
    let (code, _out, err) = run_uhmm(&["demo", "--size", "12X"]);
    assert_eq!(code, Some(2), "stderr: {err}");
    assert!(err.contains("unknown suffix"), "stderr: {err}");
}

#[test]
fn help_documents_demo() {
    let (code, out, err) = run_uhmm(&["demo", "--help"]);
    assert_eq!(code, Some(0), "stderr: {err}");
    for flag in ["--size", "--touch-fraction", "--chunk-pages", "Exit status"] {
        assert!(out.contains(flag), "`{flag}` not in help:\n{out}");
    }
}
