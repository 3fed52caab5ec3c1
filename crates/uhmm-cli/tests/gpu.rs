//! `uhmm demo --device cuda-fake` runs and verifies; `--device cuda` and
//! `uhmm bench gpu` fail clearly (exit 2, no panic) in a build without the
//! `cuda` feature or on a machine without an NVIDIA driver.

use std::process::Command;

fn uhmm(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_uhmm")).args(args).output().expect("run uhmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn the_demo_runs_on_the_fake_gpu() {
    let (rc, out, err) = uhmm(&["demo", "--device", "cuda-fake", "--size", "8M"]);
    assert_eq!(rc, 0, "{out}{err}");
    assert!(out.contains("every word is one more"), "{out}");
}

#[test]
fn without_a_gpu_the_cuda_device_fails_clearly() {
    let has_driver = std::path::Path::new("/proc/driver/nvidia").exists();
    if has_driver && cfg!(feature = "cuda") {
        return; // a GPU machine: the GPU tests cover it
    }
    for args in [&["demo", "--device", "cuda", "--size", "4M"][..], &["bench", "gpu", "--size", "4M"][..]] {
        let (rc, out, err) = uhmm(args);
        assert_eq!(rc, 2, "{args:?}: {out}{err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        let why = if cfg!(feature = "cuda") { "libcuda.so" } else { "--features cuda" };
        assert!(err.contains("Unsupported") && err.contains(why), "{args:?}: {err}");
    }
}
