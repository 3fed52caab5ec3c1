//! A first measurement (not a test, not the benchmark suite): bulk migration
//! of 1 GiB to the sim device and back, and single-page CPU fault latency on
//! device pages, each next to memcpy measured in the same run.
//!
//! `cargo run --release -p uhmm-devices --example first_numbers [MiB]`

use std::time::Instant;

use uhmm::{AddressSpace, Config, PAGE_SIZE, Prot};
use uhmm_devices::sim::{SimConfig, SimDevice};

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn main() -> uhmm::Result<()> {
    let mib: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let len = mib << 20;
    let npages = len / PAGE_SIZE;

    // memcpy baseline, same size, pre-faulted buffers.
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    dst.copy_from_slice(&src);
    let t = Instant::now();
    dst.copy_from_slice(&src);
    std::hint::black_box(&dst);
    let memcpy = gbps(len, t.elapsed().as_secs_f64());
    drop((src, dst));

    let space = AddressSpace::new(Config::default())?;
    let dev = SimDevice::new(&space, SimConfig { capacity_bytes: len + (64 << 20), ..SimConfig::default() })?;
    let region = space.map(len, Prot::READ_WRITE)?;
    let chunk = vec![0x5Au8; 1 << 20];
    for off in (0..len).step_by(chunk.len()) {
        region.write(off, &chunk)?;
    }
    // One warm-up round (the device grows its memory), then the timed one.
    dev.migrate_to_device(region.addr(), npages)?;
    dev.migrate_to_system(region.addr(), npages)?;
    let t = Instant::now();
    dev.migrate_to_device(region.addr(), npages)?;
    let to_dev = gbps(len, t.elapsed().as_secs_f64());
    let t = Instant::now();
    dev.migrate_to_system(region.addr(), npages)?;
    let to_ram = gbps(len, t.elapsed().as_secs_f64());

    // Single-page CPU faults: fault-around 1, pages far apart.
    let space1 = AddressSpace::new(Config { fault_around_pages: 1, ..Config::default() })?;
    let dev1 = SimDevice::new(&space1, SimConfig { capacity_bytes: 256 << 20, ..SimConfig::default() })?;
    let n = 4096;
    let r1 = space1.map(n * PAGE_SIZE, Prot::READ_WRITE)?;
    for p in 0..n {
        r1.write(p * PAGE_SIZE, &[1])?;
    }
    dev1.migrate_to_device(r1.addr(), n)?;
    let mut lat = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for p in 0..n {
        let t = Instant::now();
        r1.read(p * PAGE_SIZE, &mut b)?;
        lat.push(t.elapsed().as_nanos() as f64 / 1e3);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize];
    let memcpy_page_us = PAGE_SIZE as f64 / (memcpy * 1e9) * 1e6;

    println!("size: {mib} MiB");
    println!("memcpy (1 thread)        {memcpy:6.2} GB/s");
    println!("RAM -> sim device        {to_dev:6.2} GB/s  ({:.2}x memcpy)", to_dev / memcpy);
    println!("sim device -> RAM        {to_ram:6.2} GB/s  ({:.2}x memcpy)", to_ram / memcpy);
    println!(
        "CPU fault on device page p50 {:.1} us, p99 {:.1} us (memcpy of a page: {memcpy_page_us:.2} us)",
        pct(0.5),
        pct(0.99)
    );
    println!("stats: {:?}", space.stats());
    Ok(())
}
