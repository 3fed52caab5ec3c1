// The one test driver of the core's tests: the unit tests include it as
// `crate::test_device` (lib.rs), the tests of whole address spaces under
// `tests/` as `common::TestDev` (tests/common/mod.rs). Each includer brings
// the names it uses into scope (from `crate` or from `uhmm`), so the text
// is the same driver in both. Its memory is a map of page buffers; it
// counts its `migrate_to_ram` calls and can be made slow, or to panic once
// (a driver bug).

/// A device whose memory is a map of page buffers.
pub struct TestDev {
    pub owner: Owner,
    pagemap: OnceLock<Arc<DevicePagemap>>,
    pub mem: Mutex<HashMap<u64, Vec<u8>>>,
    next: Mutex<u64>,
    /// The pages given back (`page_free`), in order.
    pub freed: Mutex<Vec<u64>>,
    /// The next migrate_to_ram panics (a driver bug), once.
    pub panic_next: AtomicBool,
    /// `migrate_to_ram` calls so far.
    pub migrate_to_ram_calls: AtomicUsize,
    /// Milliseconds each `migrate_to_ram` sleeps first.
    pub sluggish_ms: AtomicUsize,
}

#[allow(dead_code)] // each includer uses its part
impl TestDev {
    /// A device registered in `space`, with room for 2^20 pages.
    pub fn new(space: &AddressSpace) -> Arc<TestDev> {
        let dev = Arc::new(TestDev {
            owner: Owner::new(),
            pagemap: OnceLock::new(),
            mem: Mutex::new(HashMap::new()),
            next: Mutex::new(0),
            freed: Mutex::new(Vec::new()),
            panic_next: AtomicBool::new(false),
            migrate_to_ram_calls: AtomicUsize::new(0),
            sluggish_ms: AtomicUsize::new(0),
        });
        let weak: Weak<dyn DevicePagemapOps> = Arc::downgrade(&dev) as Weak<TestDev>;
        dev.pagemap.set(space.register_pagemap(weak, dev.owner, 1 << 20).unwrap()).unwrap();
        dev
    }

    /// A region of `npages` pages filled with ones, and a device for it.
    pub fn attach(space: &AddressSpace, npages: usize) -> (Region, Arc<TestDev>) {
        let region = space.map(npages * PAGE_SIZE, Prot::READ_WRITE).unwrap();
        region.write(0, &vec![1; npages * PAGE_SIZE]).unwrap();
        (region, TestDev::new(space))
    }

    /// Its pagemap.
    pub fn pm(&self) -> &DevicePagemap {
        self.pagemap.get().unwrap()
    }

    /// A new device page holding `data`.
    pub fn alloc(&self, data: Vec<u8>) -> DevicePage {
        let mut next = self.next.lock().unwrap();
        let pfn = *next;
        *next += 1;
        self.mem.lock().unwrap().insert(pfn, data);
        self.pm().page(DevicePfn(pfn)).unwrap()
    }

    /// `alloc_and_copy` towards the device for every collected page.
    pub fn copy_in(&self, m: &mut Migration<Collected>) {
        for i in 0..m.npages() {
            let data = match m.src(i) {
                MigrateSrc::Hole => vec![0; PAGE_SIZE],
                MigrateSrc::System(sp) => {
                    let mut b = vec![0; PAGE_SIZE];
                    sp.read(0, &mut b).unwrap();
                    b
                }
                _ => continue,
            };
            let page = self.alloc(data);
            m.set_dst_device(i, page).unwrap();
        }
    }

    /// `alloc_and_copy` back to RAM for every page of this device.
    pub fn copy_out(&self, m: &mut Migration<Collected>) -> Result<()> {
        for i in 0..m.npages() {
            let MigrateSrc::Device(p) = m.src(i) else { continue };
            let data = self.mem.lock().unwrap()[&p.pfn.0].clone();
            m.system_dst(i)?.write(0, &data)?;
            m.set_dst_system(i)?;
        }
        Ok(())
    }

    /// Moves the RAM pages and holes of `range` to the device.
    pub fn to_device(&self, space: &AddressSpace, range: std::ops::Range<usize>) -> MigrateSummary {
        let mut m = Migration::setup(space, range, Select::SYSTEM, self.owner).unwrap();
        self.copy_in(&mut m);
        m.pages().finalize()
    }
}

impl DevicePagemapOps for TestDev {
    fn page_free(&self, pfn: DevicePfn) {
        self.mem.lock().unwrap().remove(&pfn.0);
        self.freed.lock().unwrap().push(pfn.0);
    }

    fn migrate_to_ram(&self, fault: &CpuFault) -> Result<()> {
        self.migrate_to_ram_calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let sluggish = self.sluggish_ms.load(std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(sluggish as u64));
        let mut m = Migration::setup(fault.space(), fault.window(), Select::DEVICE_PRIVATE, self.owner)?;
        if self.panic_next.swap(false, std::sync::atomic::Ordering::SeqCst) {
            panic!("driver bug in migrate_to_ram");
        }
        self.copy_out(&mut m)?;
        m.pages().finalize();
        Ok(())
    }
}

impl ChunkDriver for &TestDev {
    fn alloc_and_copy(&mut self, m: &mut Migration<Collected>) -> Result<()> {
        self.copy_in(m);
        Ok(())
    }

    fn finalize_and_map(&mut self, m: &Migration<Migrated>) {
        assert!((0..m.npages()).all(|i| m.migrated(i) == (m.dst(i) != MigrateDst::None)));
    }
}
