//! The helpers the command tests share: run the built `uhmm`, or any
//! command, with a kill timeout.
#![allow(dead_code)]

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `uhmm` with `args`, killing it after [`TIMEOUT`]. Returns the exit
/// code (`None` if killed by a signal), stdout and stderr.
pub fn run_uhmm(args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uhmm"));
    cmd.args(args);
    let (status, out, err) = run_command(cmd);
    (status.code(), out, err)
}

/// Runs `cmd` (stdin from /dev/null), killing it after [`TIMEOUT`]: its
/// exit status, stdout and stderr.
pub fn run_command(mut cmd: Command) -> (ExitStatus, String, String) {
    let label = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {label}: {e}"));
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
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            let out = out_reader.join().unwrap_or_default();
            let err = err_reader.join().unwrap_or_default();
            panic!("{label} still running after {TIMEOUT:?}: killed\n--- stdout\n{out}\n--- stderr\n{err}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    (status, out_reader.join().unwrap_or_default(), err_reader.join().unwrap_or_default())
}
