//! The CUDA device in the CLI: `uhmm demo --device cuda` (a real GPU, with
//! the `cuda` feature) or `--device cuda-fake` (the fake GPU, in every
//! build), and `uhmm bench gpu` (a real GPU only). A build without the
//! feature, or a machine without a GPU or driver, gets a clear error and
//! exit status 2.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use uhmm::{AddressSpace, Config, PAGE_SIZE, Prot};
use uhmm_devices::cuda::{CudaConfig, CudaDevice, FakeConfig, FakeGpu, StagingMode};

use crate::demo::DemoArgs;
use crate::units::human;

/// What a build without the `cuda` feature says.
#[cfg(not(feature = "cuda"))]
const NO_FEATURE: &str = "this uhmm was built without the CUDA device; build it with \
     `cargo build --release -p uhmm-cli --features cuda` (needs an NVIDIA driver at run time), \
     or use `--device cuda-fake` for the demo on a fake GPU";

/// `uhmm bench gpu`'s options.
#[derive(Debug, clap::Args)]
pub struct GpuBenchArgs {
    /// Bytes moved per case (suffixes K, M, G).
    #[arg(long, default_value = "256M", value_parser = crate::units::parse_size)]
    pub size: usize,
    /// Staging: `ring` (a ring of page-locked slots) or `registered`
    /// (whole batches registered once).
    #[arg(long, default_value = "ring")]
    pub staging: String,
}

fn staging(s: &str) -> uhmm::Result<StagingMode> {
    match s {
        "ring" => Ok(StagingMode::Ring),
        "registered" => Ok(StagingMode::Registered),
        _ => Err(uhmm::Error::invalid("--staging is ring or registered")),
    }
}

/// Opens the device the demo asked for.
fn open(space: &AddressSpace, fake: bool, capacity: usize, mode: StagingMode) -> uhmm::Result<CudaDevice> {
    let config = CudaConfig { capacity_bytes: capacity, staging: mode, ..CudaConfig::default() };
    if fake {
        let gpu = FakeGpu::new(FakeConfig { capacity_bytes: capacity, ..FakeConfig::default() })?;
        return CudaDevice::new(space, Arc::new(gpu), config);
    }
    #[cfg(feature = "cuda")]
    return CudaDevice::open(space, config);
    #[cfg(not(feature = "cuda"))]
    Err(uhmm::Error::new(uhmm::ErrorKind::Unsupported, NO_FEATURE))
}

/// `uhmm demo --device cuda|cuda-fake`: fill a region, migrate it to the
/// GPU, run the add-one kernel there, read it back through CPU faults and
/// check every word is one more than written.
pub fn demo(args: &DemoArgs, fake: bool) -> ExitCode {
    match run_demo(args, fake) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uhmm demo: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run_demo(args: &DemoArgs, fake: bool) -> uhmm::Result<()> {
    let size = args.size.max(PAGE_SIZE).next_multiple_of(2 << 20);
    let npages = size / PAGE_SIZE;
    let space = AddressSpace::new(Config::default())?;
    let dev = open(&space, fake, size, StagingMode::Ring)?;
    println!("uhmm demo on the CUDA device: {} ({} region)", dev.name(), human(size));
    let region = space.map(size, Prot::READ_WRITE)?;
    let words: Vec<u8> = (0..size / 4).flat_map(|i| (i as u32).to_ne_bytes()).collect();
    region.write(0, &words)?;
    let t = Instant::now();
    let on = dev.migrate_to_device_all(region.addr(), npages)?;
    println!("  migrate to the GPU      {on} pages in {:.1?}", t.elapsed());
    let t = Instant::now();
    let done = dev.add_one(region.addr(), npages)?;
    println!("  kernel (+1 each word)   {done} pages in {:.1?}", t.elapsed());
    let t = Instant::now();
    let mut back = vec![0u8; size];
    region.read(0, &mut back)?;
    println!("  CPU reads (faults)      {} in {:.1?}", human(size), t.elapsed());
    let wrong = back
        .chunks_exact(4)
        .enumerate()
        .filter(|(i, w)| u32::from_ne_bytes([w[0], w[1], w[2], w[3]]) != *i as u32 + 1)
        .count();
    if wrong > 0 || done != on {
        return Err(uhmm::Error::new(uhmm::ErrorKind::Fault, format!("{wrong} words were not incremented")));
    }
    println!("  verified: every word is one more than written (the kernel ran on the GPU's copy)");
    Ok(())
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
    staging(&args.staging)?;
    Err(uhmm::Error::new(uhmm::ErrorKind::Unsupported, NO_FEATURE))
}

#[cfg(feature = "cuda")]
fn run_bench(args: &GpuBenchArgs) -> uhmm::Result<()> {
    use uhmm::Mapping;
    use uhmm_sys::cuda::Gpu;

    let mode = staging(&args.staging)?;
    let size = args.size.max(PAGE_SIZE).next_multiple_of(2 << 20);
    let npages = size / PAGE_SIZE;
    let space = AddressSpace::new(Config::default())?;
    let dev = open(&space, false, size, mode)?;
    let sys = |e: uhmm_sys::cuda::CudaError| uhmm::Error::new(uhmm::ErrorKind::Sys, e.to_string());
    let gpu = Gpu::open(0, 1).map_err(sys)?;
    println!("uhmm bench gpu: {} ({}, staging {:?})", dev.name(), human(size), mode);

    // uhmm: RAM -> GPU -> RAM.
    let region = space.map(size, Prot::READ_WRITE)?;
    region.write(0, &vec![7u8; size])?;
    let t = Instant::now();
    dev.migrate_to_device_all(region.addr(), npages)?;
    dev.migrate_to_system(region.addr(), npages)?;
    let uhmm_s = t.elapsed().as_secs_f64();

    // Baselines: the driver's copies of the same bytes, pinned and pageable.
    let dptr = gpu.alloc(size).map_err(sys)?;
    let copy = |host: &Mapping| -> uhmm::Result<f64> {
        let t = Instant::now();
        gpu.htod_async(0, dptr, host, 0, size).map_err(sys)?;
        gpu.dtoh_async(0, host, 0, dptr, size).map_err(sys)?;
        gpu.record(0).map_err(sys)?.wait().map_err(sys)?;
        Ok(t.elapsed().as_secs_f64())
    };
    let host =
        Mapping::anonymous(size, uhmm::Protection::ReadWrite, 2 << 20).map_err(|e| uhmm::Error::sys("mmap", e))?;
    host.populate_write(0, size).map_err(|e| uhmm::Error::sys("populate", e))?;
    let pageable_s = copy(&host)?;
    gpu.register(&host).map_err(sys)?;
    let pinned_s = copy(&host)?;
    gpu.unregister(&host).map_err(sys)?;
    gpu.free(dptr).map_err(sys)?;

    // A CPU fault on a GPU page (one page, fault-around off by reading the
    // first word of pages far apart).
    dev.migrate_to_device_all(region.addr(), npages)?;
    let mut lat = Vec::new();
    let mut b = [0u8; 1];
    for p in (0..npages).step_by(512) {
        let t = Instant::now();
        region.read(p * PAGE_SIZE, &mut b)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    let gbs = |s: f64| 2.0 * size as f64 / s / 1e9;
    println!("  RAM->GPU->RAM uhmm       {:.2} GB/s", gbs(uhmm_s));
    println!("  cuMemcpy pinned          {:.2} GB/s  (uhmm {:.2}x; target >= 0.9x)", gbs(pinned_s), pinned_s / uhmm_s);
    println!("  cuMemcpy pageable        {:.2} GB/s  (uhmm {:.2}x)", gbs(pageable_s), pageable_s / uhmm_s);
    println!("  CPU fault on a GPU page  p50 {:.1} us (window of up to 512 pages)", lat[lat.len() / 2]);
    println!("  managed memory (prefetch both ways, CPU fault after the GPU): not measured by this build yet");
    Ok(())
}
