//! `uhmm demo --device cuda-fake` runs and verifies; `--device cuda` and
//! `uhmm bench gpu` fail clearly (exit 2, no panic) in a build without the
//! `cuda` feature or on a machine without an NVIDIA driver, and the demo
//! passes on one with both. Every run is killed after two minutes.

mod common;

use common::run_uhmm;

#[test]
fn the_demo_runs_on_the_fake_gpu() {
    let (rc, out, err) = run_uhmm(&["demo", "--device", "cuda-fake", "--size", "8M"]);
    assert_eq!(rc, Some(0), "{out}{err}");
    assert!(out.contains("every word is one more"), "{out}");
    assert!(out.contains("every word is two more"), "the kernel in place ran: {out}");
}

#[test]
fn the_cuda_device_runs_on_a_gpu_and_fails_clearly_without_one() {
    let demo = ["demo", "--device", "cuda", "--size", "4M"];
    if cfg!(feature = "cuda") && std::path::Path::new("/proc/driver/nvidia").exists() {
        let (rc, out, err) = run_uhmm(&demo);
        assert_eq!(rc, Some(0), "a GPU is here: the demo must pass\n{out}{err}");
        return;
    }
    for args in [&demo[..], &["bench", "gpu", "--sizes", "4M", "--runs", "1"][..]] {
        let (rc, out, err) = run_uhmm(args);
        assert_eq!(rc, Some(2), "{args:?}: {out}{err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        let why = if cfg!(feature = "cuda") { "libcuda.so" } else { "--features cuda" };
        assert!(err.contains("Unsupported") && err.contains(why), "{args:?}: {err}");
    }
}
