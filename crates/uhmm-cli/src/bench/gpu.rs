//! `uhmm bench gpu`: the CUDA device on the first NVIDIA GPU against the
//! CUDA driver's own ways of moving the same bytes, measured in the same
//! run: a pinned `cuMemcpy` (the limit), a pageable one, managed memory
//! (`cuMemAllocManaged`, what `cudaMallocManaged` gives) prefetched to the
//! GPU and back, and the CPU fault on a page the GPU had, against managed
//! memory's. Needs a build with `--features cuda` and an NVIDIA driver;
//! without them it says so (exit status 2).

use std::process::ExitCode;
#[cfg(feature = "cuda")]
use std::time::Instant;

#[cfg(feature = "cuda")]
use uhmm::{AddressSpace, Config, PAGE_SIZE, Prot};
#[cfg(feature = "cuda")]
use uhmm_devices::cuda::StagingMode;

#[cfg(feature = "cuda")]
use crate::units::human;

/// `uhmm bench gpu`'s options.
#[derive(Debug, clap::Args)]
pub struct GpuBenchArgs {
    /// Sizes moved, comma-separated (suffixes K, M, G); the targets hold
    /// from 64 MiB to 4 GiB.
    #[arg(long, default_value = "64M,256M,1G,4G", value_delimiter = ',', value_parser = crate::units::parse_size)]
    pub sizes: Vec<usize>,
    /// Timed runs of each case per size, after one untimed warm-up.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Staging: `ring` (a ring of page-locked slots) or `registered`
    /// (whole batches registered once).
    #[arg(long, default_value = "ring")]
    pub staging: String,
    /// Write the table, the GPU and the rerun command as Markdown here.
    #[arg(long)]
    pub doc: Option<std::path::PathBuf>,
}

/// `uhmm bench gpu`.
pub fn bench(args: &GpuBenchArgs) -> ExitCode {
    match run_bench(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uhmm bench gpu: error: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn run_bench(args: &GpuBenchArgs) -> uhmm::Result<()> {
    crate::gpu::staging(&args.staging)?;
    Err(uhmm::Error::new(uhmm::ErrorKind::Unsupported, crate::gpu::NO_FEATURE))
}

#[cfg(feature = "cuda")]
fn run_bench(args: &GpuBenchArgs) -> uhmm::Result<()> {
    use super::report::Target;

    let mode = crate::gpu::staging(&args.staging)?;
    let gpu = uhmm_sys::cuda::Gpu::open(0, 1).map_err(cuda_error)?;
    let mut rows = Vec::new();
    for &size in &args.sizes {
        let size = size.max(PAGE_SIZE).next_multiple_of(2 << 20);
        eprintln!("  measuring: {} ({} runs a case after a warm-up)", human(size), args.runs);
        let m = measure(&gpu, size, args.runs.max(1), mode)?;
        let gbs = |s: f64| 2.0 * size as f64 / s / 1e9;
        let (u, p, g, mg) = (gbs(m.uhmm_s), gbs(m.pinned_s), gbs(m.pageable_s), gbs(m.managed_s));
        rows.push((
            human(size),
            vec![
                Target::at_least(
                    "RAM -> GPU -> RAM, uhmm / pinned cuMemcpy",
                    Some(u / p),
                    0.9,
                    format!("{u:.2} / {p:.2} GB/s"),
                ),
                Target::at_least(
                    "RAM -> GPU -> RAM, uhmm / managed memory prefetched both ways",
                    Some(u / mg),
                    1.0,
                    format!("{u:.2} / {mg:.2} GB/s"),
                ),
                Target::at_most(
                    "CPU fault on a GPU page p50, uhmm / managed memory",
                    Some(m.fault_p50_us / m.managed_fault_p50_us),
                    1.0,
                    format!("{:.1} / {:.1} µs", m.fault_p50_us, m.managed_fault_p50_us),
                ),
                Target::info("pageable cuMemcpy, uhmm / it", Some(u / g), format!("{u:.2} / {g:.2} GB/s")),
                Target::info(
                    "add-one kernel, on RAM in place / on the GPU's pages",
                    Some(m.kernel_gpu_s / m.kernel_in_place_s),
                    format!(
                        "{:.2} / {:.2} GB/s",
                        size as f64 / m.kernel_in_place_s / 1e9,
                        size as f64 / m.kernel_gpu_s / 1e9
                    ),
                ),
            ],
        ));
    }
    let mut doc = format!(
        "GPU: {}. Staging: {mode:?}. {} timed runs a case, medians.\n\n| size | target | ratio | bound | met | numbers (uhmm / baseline) |\n| --- | --- | --- | --- | --- | --- |\n",
        gpu.name(),
        args.runs
    );
    for (size, targets) in &rows {
        for t in targets {
            doc.push_str(&t.row(size));
        }
    }
    let met = rows.iter().flat_map(|r| &r.1).filter(|t| t.met == Some(true)).count();
    let all = rows.iter().flat_map(|r| &r.1).filter(|t| t.met.is_some()).count();
    doc.push_str(&format!("\n{met} of {all} targets met. Rerun: `./target/release/uhmm bench gpu`\n"));
    println!("{doc}");
    if let Some(path) = &args.doc {
        std::fs::write(path, &doc)
            .map_err(|e| uhmm::Error::new(uhmm::ErrorKind::Sys, format!("{}: {e}", path.display())))?;
    }
    Ok(())
}

/// A CUDA error as uhmm's: no CUDA here is `Unsupported`.
#[cfg(feature = "cuda")]
fn cuda_error(e: uhmm_sys::cuda::CudaError) -> uhmm::Error {
    let kind = match e {
        uhmm_sys::cuda::CudaError::Unavailable(_) => uhmm::ErrorKind::Unsupported,
        uhmm_sys::cuda::CudaError::OutOfMemory => uhmm::ErrorKind::NoMemory,
        uhmm_sys::cuda::CudaError::Driver(_) => uhmm::ErrorKind::Sys,
    };
    uhmm::Error::new(kind, e.to_string())
}

/// One size's medians.
#[cfg(feature = "cuda")]
struct Measured {
    uhmm_s: f64,
    pinned_s: f64,
    pageable_s: f64,
    managed_s: f64,
    fault_p50_us: f64,
    managed_fault_p50_us: f64,
    kernel_gpu_s: f64,
    kernel_in_place_s: f64,
}

/// Measures `size` bytes each way, `runs` times a case after a warm-up:
/// uhmm's migrations, the driver's copies of the same bytes from pinned and
/// pageable memory, managed memory prefetched to the GPU and back, and a
/// CPU read of one byte every 2 MiB after the GPU had the pages (uhmm: a
/// `migrate_to_ram` fault; managed memory: its fault, after the add-one
/// kernel touched every page); and the add-one kernel on the region's
/// pages on the GPU, then on them in RAM in place (mapped host memory).
#[cfg(feature = "cuda")]
fn measure(gpu: &uhmm_sys::cuda::Gpu, size: usize, runs: u32, mode: StagingMode) -> uhmm::Result<Measured> {
    use super::median;
    use uhmm::Mapping;

    let sys = cuda_error;
    let npages = size / PAGE_SIZE;
    let timed = |f: &mut dyn FnMut() -> uhmm::Result<()>| -> uhmm::Result<f64> {
        f()?; // warm-up
        let mut t = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            f()?;
            t.push(start.elapsed().as_secs_f64());
        }
        Ok(median(&t))
    };
    // Reads one byte every 2 MiB with `read`, each timed; the median, µs.
    let faults = |read: &mut dyn FnMut(usize) -> uhmm::Result<()>| -> uhmm::Result<f64> {
        let mut lat = Vec::new();
        for off in (0..size).step_by(2 << 20) {
            let t = Instant::now();
            read(off)?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(median(&lat))
    };

    let space = AddressSpace::new(Config::default())?;
    let dev = crate::gpu::open(&space, false, size, mode)?;
    let region = space.map(size, Prot::READ_WRITE)?;
    region.write(0, &vec![7u8; size])?;
    let uhmm_s = timed(&mut || {
        dev.migrate_to_device_all(region.addr(), npages)?;
        dev.migrate_to_system(region.addr(), npages).map(drop)
    })?;
    dev.migrate_to_device_all(region.addr(), npages)?;
    let kernel_gpu_s = timed(&mut || dev.add_one(region.addr(), npages).map(drop))?;
    let mut b = [0u8; 1];
    let fault_p50_us = faults(&mut |off| region.read(off, &mut b))?;
    dev.migrate_to_system(region.addr(), npages)?;
    let kernel_in_place_s = timed(&mut || dev.add_one_in_place(region.addr(), npages).map(drop))?;
    drop(dev);

    let dptr = gpu.alloc(size).map_err(sys)?;
    let host =
        Mapping::anonymous(size, uhmm::Protection::ReadWrite, 2 << 20).map_err(|e| uhmm::Error::sys("mmap", e))?;
    host.populate_write(0, size).map_err(|e| uhmm::Error::sys("populate", e))?;
    let mut copy = || -> uhmm::Result<()> {
        gpu.htod_async(0, dptr, &host, 0, size).map_err(sys)?;
        gpu.dtoh_async(0, &host, 0, dptr, size).map_err(sys)?;
        gpu.synchronize().map_err(sys)
    };
    let pageable_s = timed(&mut copy)?;
    gpu.register(&host).map_err(sys)?;
    let pinned_s = timed(&mut copy);
    gpu.unregister(&host).map_err(sys)?;
    gpu.free(dptr).map_err(sys)?;
    let pinned_s = pinned_s?;

    let managed = gpu.alloc_managed(size).map_err(sys)?;
    let managed_s = timed(&mut || {
        managed.prefetch(true).map_err(sys)?;
        managed.prefetch(false).map_err(sys)
    })?;
    managed.add_one().map_err(sys)?;
    let managed_fault_p50_us =
        faults(&mut |off| managed.read_byte(off).map(drop).ok_or_else(|| uhmm::Error::invalid("past the end")))?;
    Ok(Measured {
        uhmm_s,
        pinned_s,
        pageable_s,
        managed_s,
        fault_p50_us,
        managed_fault_p50_us,
        kernel_gpu_s,
        kernel_in_place_s,
    })
}
