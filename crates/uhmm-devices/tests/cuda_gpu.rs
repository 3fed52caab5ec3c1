//! The CUDA device on a real NVIDIA GPU (feature `cuda`): ignored unless
//! asked for, so that they never pass silently on a machine without one:
//! `cargo test -p uhmm-devices --features cuda --test cuda_gpu -- --ignored`.
#![cfg(feature = "cuda")]

mod common;

use common::{assert_words, cpu_read, fill, map, space, with_timeout};
use uhmm_devices::cuda::{CudaConfig, CudaDevice, StagingMode};

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --features cuda -- --ignored"]
fn round_trip_and_kernel_on_a_real_gpu() {
    with_timeout(300, || {
        for staging in [StagingMode::Ring, StagingMode::Registered] {
            let space = space();
            let dev = CudaDevice::open(&space, CudaConfig { staging, ..CudaConfig::default() }).expect("a GPU");
            let n = 16384; // 64 MiB
            let r = map(&space, n);
            fill(&r, 0..n, |i| i);
            assert_eq!(dev.migrate_to_device_all(r.addr(), n).unwrap(), n);
            assert_eq!(dev.add_one(r.addr(), n).unwrap(), n);
            assert_words(&cpu_read(&r), |i| i + 1);
        }
    });
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --features cuda -- --ignored"]
fn kernel_in_place_on_ram_and_gpu_pages_of_a_real_gpu() {
    with_timeout(300, || {
        let space = space();
        let dev = CudaDevice::open(&space, CudaConfig::default()).expect("a GPU");
        let n = 4096; // 16 MiB, half of it on the GPU
        let r = map(&space, n);
        fill(&r, 0..n, |i| i);
        assert_eq!(dev.migrate_to_device_all(r.addr(), n / 2).unwrap(), n / 2);
        let done = dev.add_one_in_place(r.addr(), n).unwrap();
        assert_eq!((done.gpu_pages, done.ram_pages), (n / 2, n / 2));
        // A migration drops the pinned maps first, or it could not move them.
        assert_eq!(dev.migrate_to_device_all(r.addr(), n).unwrap(), n);
        assert_eq!(dev.host_mapped_bytes(), 0);
        assert_words(&cpu_read(&r), |i| i + 1);
    });
}
