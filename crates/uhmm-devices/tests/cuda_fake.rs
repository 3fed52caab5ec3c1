//! The CUDA device's driver against the fake GPU: data round trips (with
//! holes), CPU faults with fault-around, the add-one kernel, both staging
//! modes, copy errors both ways, eviction on drop, CPU access during a
//! migration, chunk reuse; the kernel on RAM pages in place, through host
//! memory mapped for the GPU and dropped before its pages change. Every
//! test runs under a timeout.

mod common;

use std::sync::Arc;

use common::{assert_words, cpu_read, fill, map, pages_in_ram, space, with_timeout, word};
use uhmm::{AddressSpace, ErrorKind, PAGE_SIZE, Region, Residency};
use uhmm_devices::cuda::{CudaConfig, CudaDevice, FakeConfig, FakeGpu, InPlace, StagingMode};

const MODES: [StagingMode; 2] = [StagingMode::Ring, StagingMode::Registered];

fn gpu(delay_us: u64) -> Arc<FakeGpu> {
    Arc::new(FakeGpu::new(FakeConfig { capacity_bytes: 64 << 20, streams: 2, delay_us }).expect("fake GPU"))
}

fn config(staging: StagingMode) -> CudaConfig {
    // Small batches, so that a few MiB make several pipelined batches.
    CudaConfig { capacity_bytes: 64 << 20, migrate_chunk_pages: 512, staging, ..CudaConfig::default() }
}

fn device(space: &AddressSpace, gpu: &Arc<FakeGpu>, staging: StagingMode) -> CudaDevice {
    CudaDevice::new(space, gpu.clone(), config(staging)).expect("CUDA device")
}

/// A space, a fake GPU with no delay, and a device on it in `staging` mode.
fn rig(staging: StagingMode) -> (AddressSpace, Arc<FakeGpu>, CudaDevice) {
    let space = space();
    let gpu = gpu(0);
    let dev = device(&space, &gpu, staging);
    (space, gpu, dev)
}

fn on_gpu(space: &AddressSpace, dev: &CudaDevice, r: &Region) -> usize {
    let own = dev.owner();
    let snap = space.snapshot(r.addr()..r.addr() + r.npages() * PAGE_SIZE).unwrap();
    snap.iter().filter(|p| matches!(p.residency, Residency::Device(_, o) if o == own)).count()
}

#[test]
fn round_trip_with_holes_in_both_staging_modes() {
    with_timeout(120, || {
        for mode in MODES {
            let (space, gpu, dev) = rig(mode);
            let n = 2048 + 100;
            let r = map(&space, n);
            // Pages 0..1000 and 1500..n written; 1000..1500 never touched.
            fill(&r, 0..1000, |i| i ^ 0x5a5a);
            fill(&r, 1500..n, |i| i ^ 0x5a5a);
            assert_eq!(dev.migrate_to_device_all(r.addr(), n).unwrap(), n, "{mode:?}: holes go too");
            assert_eq!(on_gpu(&space, &dev, &r), n);
            assert_eq!(dev.pages_in_use(), n);
            assert_eq!(dev.migrate_to_system(r.addr(), n).unwrap(), n);
            assert_eq!(pages_in_ram(&space, &r, 0..n), n);
            let all = cpu_read(&r);
            let hole = 1000 * PAGE_SIZE..1500 * PAGE_SIZE;
            assert!(all[hole.clone()].iter().all(|&b| b == 0), "{mode:?}: a hole comes back as zeros");
            for i in (0..n * PAGE_SIZE / 4).filter(|i| !hole.contains(&(i * 4))) {
                assert_eq!(word(&all, i), i as u32 ^ 0x5a5a, "{mode:?}: word {i}");
            }
            let s = gpu.stats();
            assert!(s.htod > 0 && s.dtoh > 0, "{mode:?}: copies went through the GPU: {s:?}");
            assert!(s.htod < 64, "{mode:?}: a batch is a few large copies, not one per page: {s:?}");
            assert_eq!(dev.pages_in_use(), 0);
        }
    });
}

#[test]
fn cpu_fault_brings_its_window_back() {
    with_timeout(60, || {
        let (space, _gpu, dev) = rig(StagingMode::Ring);
        let n = 1024;
        let r = map(&space, n);
        fill(&r, 0..n, |i| i.wrapping_mul(7));
        dev.migrate_to_device_all(r.addr(), n).unwrap();
        let mut buf = [0u8; 4];
        r.read(600 * PAGE_SIZE + 8, &mut buf).unwrap();
        assert_eq!(u32::from_ne_bytes(buf), ((600 * PAGE_SIZE + 8) / 4) as u32 * 7);
        let back = pages_in_ram(&space, &r, 0..n);
        assert!(back > 1 && back < n, "fault-around brings more than the page, less than all: {back}");
        assert_eq!(dev.pages_in_use(), n - back, "the pages that came back were freed on the GPU");
        assert_words(&cpu_read(&r), |i| i.wrapping_mul(7));
    });
}

#[test]
fn the_kernel_runs_on_gpu_pages_and_the_cpu_sees_its_writes() {
    with_timeout(60, || {
        for mode in MODES {
            let (space, gpu, dev) = rig(mode);
            let n = 1500;
            let r = map(&space, n);
            fill(&r, 0..n, |i| i);
            dev.migrate_to_device_all(r.addr(), n).unwrap();
            assert_eq!(dev.add_one(r.addr(), n).unwrap(), n);
            assert!(gpu.stats().kernels > 0);
            assert_eq!(on_gpu(&space, &dev, &r), n, "{mode:?}: the kernel leaves the pages on the GPU");
            assert_words(&cpu_read(&r), |i| i + 1);
            // Pages back in RAM are not the kernel's: nothing to update.
            assert_eq!(dev.add_one(r.addr(), n).unwrap(), 0);
        }
    });
}

#[test]
fn the_kernel_runs_in_place_on_ram_pages_and_on_gpu_pages_and_moves_none() {
    with_timeout(60, || {
        let (space, gpu, dev) = rig(StagingMode::Ring);
        let n = 1024;
        let r = map(&space, n);
        // Pages 0..900 written, 900..n holes; 0..512 on the GPU.
        fill(&r, 0..900, |i| i);
        assert_eq!(dev.migrate_to_device_all(r.addr(), 512).unwrap(), 512);
        for round in 1..=2u32 {
            let done = dev.add_one_in_place(r.addr(), n).unwrap();
            assert_eq!(done, InPlace { gpu_pages: 512, ram_pages: 512 }, "round {round}");
            assert_eq!(on_gpu(&space, &dev, &r), 512, "round {round}: no page moved to the GPU");
            assert_eq!(pages_in_ram(&space, &r, 512..n), 512, "round {round}: the holes became pages of their own");
            assert_eq!(dev.host_mapped_bytes(), 512 * PAGE_SIZE);
        }
        let s = gpu.stats();
        assert_eq!(s.host_maps, 1, "the second kernel reused the first's map: {s:?}");
        assert_eq!(s.host_kernel_bytes, 2 * 512 * PAGE_SIZE as u64, "{s:?}");
        assert_eq!(s.host_mapped_bytes, 512 * PAGE_SIZE);
        let words_written = (900 * PAGE_SIZE / 4) as u32;
        assert_words(&cpu_read(&r), |i| if i < words_written { i + 2 } else { 2 });
        drop(r);
        assert_eq!(dev.host_mapped_bytes(), 0, "an unmap drops the maps of its pages");
        assert_eq!(gpu.stats().host_mapped_bytes, 0);
    });
}

#[test]
fn a_change_to_pages_mapped_for_the_gpu_drops_their_map_first() {
    with_timeout(60, || {
        let (space, gpu, dev) = rig(StagingMode::Ring);
        let n = 512;
        let r = map(&space, n);
        fill(&r, 0..n, |i| i);
        assert_eq!(dev.add_one_in_place(r.addr(), n).unwrap(), InPlace { gpu_pages: 0, ram_pages: n });
        assert_eq!(dev.host_mapped_bytes(), n * PAGE_SIZE);
        // The device's own migration of part of the range: the map goes
        // (a pinned page cannot move), and the next kernel maps what is
        // left in RAM again.
        assert_eq!(dev.migrate_to_device_all(r.addr() + 100 * PAGE_SIZE, 50).unwrap(), 50);
        assert_eq!(dev.host_mapped_bytes(), 0);
        assert_eq!(dev.add_one_in_place(r.addr(), n).unwrap(), InPlace { gpu_pages: 50, ram_pages: n - 50 });
        assert_eq!(gpu.stats().host_maps, 3, "two RAM runs around the GPU's pages");
        // A protection change drops them too.
        r.protect(0..r.len(), uhmm::Prot::READ).unwrap();
        assert_eq!(dev.host_mapped_bytes(), 0);
        r.protect(0..r.len(), uhmm::Prot::READ_WRITE).unwrap();
        assert_words(&cpu_read(&r), |i| i + 2);
        assert_eq!(gpu.stats().host_mapped_bytes, 0);
    });
}

#[test]
fn in_place_kernels_racing_migrations_and_cpu_reads_lose_no_update() {
    with_timeout(120, || {
        let space = space();
        let gpu = gpu(0);
        let dev = Arc::new(device(&space, &gpu, StagingMode::Ring));
        let n = 256;
        let r = Arc::new(map(&space, n));
        fill(&r, 0..n, |i| i);
        let kernels = 40u32;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mover = {
            let (dev, r, stop) = (dev.clone(), r.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut moves = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let half = if moves % 2 == 0 { 0 } else { n / 2 };
                    dev.migrate_to_device(r.addr() + half * PAGE_SIZE, n / 2).unwrap();
                    dev.migrate_to_system(r.addr(), n).unwrap();
                    moves += 1;
                }
                moves
            })
        };
        let reader = {
            let (r, stop) = (r.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    r.read(7 * PAGE_SIZE, &mut buf).unwrap(); // faults GPU pages home
                }
            })
        };
        let mut split = InPlace::default();
        for _ in 0..kernels {
            let done = dev.add_one_in_place(r.addr(), n).unwrap();
            assert_eq!(done.gpu_pages + done.ram_pages, n);
            split.gpu_pages += done.gpu_pages;
            split.ram_pages += done.ram_pages;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let moves = mover.join().unwrap();
        reader.join().unwrap();
        assert!(moves > 0, "the migrations ran");
        assert!(split.ram_pages > 0, "kernels ran on RAM pages in place: {split:?}");
        assert_words(&cpu_read(&r), |i| i + kernels);
    });
}

#[test]
fn a_failed_copy_to_the_gpu_leaves_the_pages_in_ram() {
    with_timeout(60, || {
        for mode in MODES {
            let (space, gpu, dev) = rig(mode);
            let n = 300;
            let r = map(&space, n);
            fill(&r, 0..n, |i| !i);
            gpu.fail_next_htod(1);
            let err = dev.migrate_to_device(r.addr(), n).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Sys, "{mode:?}: {err}");
            assert_eq!(pages_in_ram(&space, &r, 0..n), n, "{mode:?}: restored");
            assert_eq!(dev.pages_in_use(), 0, "{mode:?}: the GPU pages went back");
            assert_words(&cpu_read(&r), |i| !i);
            r.write(0, &[1, 2, 3, 4]).unwrap();
            // The next try goes through.
            assert_eq!(dev.migrate_to_device_all(r.addr(), n).unwrap(), n);
        }
    });
}

#[test]
fn a_failed_copy_back_keeps_the_pages_on_the_gpu_or_poisons_only_the_faulting_page() {
    with_timeout(60, || {
        let (space, gpu, dev) = rig(StagingMode::Ring);
        let n = 512;
        let r = map(&space, n);
        fill(&r, 0..n, |i| i);
        dev.migrate_to_device_all(r.addr(), n).unwrap();
        // An explicit migration back: an error, and every page stays on the GPU.
        gpu.fail_next_dtoh(1);
        assert!(dev.migrate_to_system(r.addr(), n).is_err());
        assert_eq!(on_gpu(&space, &dev, &r), n);
        // A CPU fault: the faulting page is poisoned, its window's other
        // pages stay on the GPU with their data.
        gpu.fail_next_dtoh(1);
        let mut buf = vec![0u8; PAGE_SIZE];
        assert_eq!(r.read(10 * PAGE_SIZE, &mut buf).unwrap_err().kind(), ErrorKind::Fault);
        let snap = space.snapshot(r.addr()..r.addr() + n * PAGE_SIZE).unwrap();
        assert_eq!(snap.iter().filter(|p| p.residency == Residency::Poisoned).count(), 1);
        r.read(11 * PAGE_SIZE, &mut buf).unwrap();
        assert_eq!(word(&buf, 0), (11 * PAGE_SIZE / 4) as u32);
    });
}

#[test]
fn dropping_the_device_brings_every_page_home() {
    with_timeout(60, || {
        for mode in MODES {
            let (space, gpu, dev) = rig(mode);
            let n = 1100;
            let r = map(&space, n);
            fill(&r, 0..n, |i| i ^ 0xdead);
            dev.migrate_to_device_all(r.addr(), n).unwrap();
            assert!(dev.chunks_held() >= 3);
            drop(dev);
            assert_eq!(pages_in_ram(&space, &r, 0..n), n, "{mode:?}");
            assert_words(&cpu_read(&r), |i| i ^ 0xdead);
            let s = gpu.stats();
            assert_eq!((s.allocs, s.frees, s.registered), (s.frees, s.allocs, 0), "{mode:?}: all given back: {s:?}");
            assert_eq!(gpu.used_bytes(), 0);
        }
    });
}

#[test]
fn release_evicts_and_chunks_are_reused() {
    with_timeout(60, || {
        let (space, gpu, dev) = rig(StagingMode::Registered);
        let n = 1024;
        let r = map(&space, n);
        fill(&r, 0..n, |i| i);
        dev.migrate_to_device_all(r.addr(), n).unwrap();
        assert_eq!(dev.chunks_held(), 2, "2 MiB chunks");
        assert_eq!(dev.release().unwrap(), n);
        assert_eq!(dev.pages_in_use(), 0);
        dev.migrate_to_device_all(r.addr(), n).unwrap();
        assert_eq!(gpu.stats().allocs, 2, "the chunks were reused, not allocated again");
        assert!(dev.staging_free() > 0, "registered staging is kept for the next batches");
        assert_words(&cpu_read(&r), |i| i);
    });
}

#[test]
fn a_full_gpu_leaves_the_rest_in_ram() {
    with_timeout(60, || {
        let space = space();
        let gpu = Arc::new(FakeGpu::new(FakeConfig { capacity_bytes: 2 << 20, ..FakeConfig::default() }).unwrap());
        let dev = device(&space, &gpu, StagingMode::Ring);
        let n = 700;
        let r = map(&space, n);
        fill(&r, 0..n, |i| i);
        assert_eq!(dev.migrate_to_device_all(r.addr(), n).unwrap(), 512, "one chunk's worth");
        assert_eq!(pages_in_ram(&space, &r, 0..n), n - 512);
        assert_words(&cpu_read(&r), |i| i);
    });
}

#[test]
fn cpu_access_during_a_migration_waits_and_sees_the_right_data() {
    with_timeout(120, || {
        let space = space();
        let gpu = gpu(2000); // each batch 2 ms on the "bus"
        let dev = Arc::new(device(&space, &gpu, StagingMode::Ring));
        let n = 4096;
        let r = Arc::new(map(&space, n));
        fill(&r, 0..n, |i| i.rotate_left(5));
        let (reader_r, stop) = (r.clone(), Arc::new(std::sync::atomic::AtomicBool::new(false)));
        let stop2 = stop.clone();
        let reader = std::thread::spawn(move || {
            let mut checked = 0;
            let mut buf = [0u8; 4];
            let mut p = 0;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let off = (p * 37 % n) * PAGE_SIZE + 12;
                reader_r.read(off, &mut buf).unwrap();
                assert_eq!(u32::from_ne_bytes(buf), ((off / 4) as u32).rotate_left(5));
                checked += 1;
                p += 1;
            }
            checked
        });
        for _ in 0..4 {
            dev.migrate_to_device(r.addr(), n).unwrap();
            dev.migrate_to_system(r.addr(), n).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        dev.release().unwrap();
        assert_words(&cpu_read(&r), |i| i.rotate_left(5));
    });
}

#[test]
fn bad_configs_are_refused() {
    let space = space();
    let gpu = gpu(0);
    for bad in [
        CudaConfig { chunk_bytes: 4096, ..CudaConfig::default() },
        CudaConfig { capacity_bytes: 1 << 20, ..CudaConfig::default() },
        CudaConfig { ring_slots: 0, ..CudaConfig::default() },
        CudaConfig { migrate_chunk_pages: 0, ..CudaConfig::default() },
    ] {
        assert_eq!(CudaDevice::new(&space, gpu.clone(), bad).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }
}
