//! The CUDA device in the CLI: `uhmm demo --device cuda` (a real GPU, with
//! the `cuda` feature) or `--device cuda-fake` (the fake GPU, in every
//! build); `uhmm bench gpu` is `bench/gpu.rs`. A build without the feature,
//! or a machine without a GPU or driver, gets a clear error and exit
//! status 2.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use uhmm::{AddressSpace, Config, PAGE_SIZE, Prot};
use uhmm_devices::cuda::{CudaConfig, CudaDevice, FakeConfig, FakeGpu, StagingMode};

use crate::demo::DemoArgs;
use crate::units::human;

/// What a build without the `cuda` feature says.
#[cfg(not(feature = "cuda"))]
pub(crate) const NO_FEATURE: &str = "this uhmm was built without the CUDA device; build it with \
     `cargo build --release -p uhmm-cli --features cuda` (needs an NVIDIA driver at run time), \
     or use `--device cuda-fake` for the demo on a fake GPU";

pub(crate) fn staging(s: &str) -> uhmm::Result<StagingMode> {
    match s {
        "ring" => Ok(StagingMode::Ring),
        "registered" => Ok(StagingMode::Registered),
        _ => Err(uhmm::Error::invalid("--staging is ring or registered")),
    }
}

/// Opens the device the demo asked for.
pub(crate) fn open(space: &AddressSpace, fake: bool, capacity: usize, mode: StagingMode) -> uhmm::Result<CudaDevice> {
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
    let wrong = |back: &[u8], plus: u32| {
        (back.chunks_exact(4).enumerate())
            .filter(|(i, w)| u32::from_ne_bytes([w[0], w[1], w[2], w[3]]) != *i as u32 + plus)
            .count()
    };
    let bad = |n: usize| uhmm::Error::new(uhmm::ErrorKind::Fault, format!("{n} words were not incremented"));
    if wrong(&back, 1) > 0 || done != on {
        return Err(bad(wrong(&back, 1)));
    }
    println!("  verified: every word is one more than written (the kernel ran on the GPU's copy)");
    let t = Instant::now();
    let in_place = dev.add_one_in_place(region.addr(), npages)?;
    println!(
        "  kernel in place on RAM  {} pages in {:.1?} (host memory mapped for the GPU; none moved)",
        in_place.ram_pages,
        t.elapsed()
    );
    region.read(0, &mut back)?;
    if wrong(&back, 2) > 0 || in_place.ram_pages != npages {
        return Err(bad(wrong(&back, 2)));
    }
    println!("  verified: every word is two more (the second kernel used the RAM pages where they are)");
    Ok(())
}
