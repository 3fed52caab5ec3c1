//! The README's "API in ten lines", run as written, so it stays true.

#[test]
fn readme_api_lines() -> uhmm::Result<()> {
    let space = uhmm::AddressSpace::new(uhmm::Config::default())?;
    let region = space.map(64 << 20, uhmm::Prot::READ_WRITE)?;
    region.write(0, b"hello")?;
    let dev = uhmm_devices::sim::SimDevice::new(&space, uhmm_devices::sim::SimConfig::default())?;
    dev.migrate_to_device_all(region.addr(), region.npages())?;
    let mut buf = [0u8; 5];
    region.read(0, &mut buf)?;
    assert_eq!(&buf, b"hello");
    dev.migrate_to_system(region.addr(), region.npages())?;
    let pages = space.snapshot(region.range())?;
    assert!(pages.iter().all(|p| !matches!(p.residency, uhmm::Residency::Device(..))));
    let m = uhmm::Migration::setup(&space, region.range(), uhmm::Select::SYSTEM, dev.owner())?;
    m.pages().finalize();
    region.read(0, &mut buf)?;
    assert_eq!(&buf, b"hello");
    Ok(())
}
