//! Helpers shared by the conformance tests.
#![allow(dead_code)]

use std::sync::mpsc;
use std::time::Duration;

use uhmm::{AddressSpace, Config, PAGE_SIZE, Prot, Region};
use uhmm_devices::sim::{SimConfig, SimDevice};

/// 4 MiB, as in the kernel's tests.
pub const NPAGES: usize = 1024;
pub const WORDS_PER_PAGE: usize = PAGE_SIZE / 4;

/// Runs `f` on a thread and fails the test if it does not finish in `secs`.
pub fn with_timeout<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => {
            t.join().expect("test thread");
            v
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test hung: no result after {secs} s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // the closure panicked: surface its panic
            match t.join() {
                Err(p) => std::panic::resume_unwind(p),
                Ok(()) => unreachable!("sender dropped without sending"),
            }
        }
    }
}

pub fn space() -> AddressSpace {
    AddressSpace::new(Config::default()).expect("userfaultfd must be available for these tests")
}

pub fn device(space: &AddressSpace) -> SimDevice {
    SimDevice::new(space, SimConfig { capacity_bytes: 256 << 20, ..SimConfig::default() }).expect("sim device")
}

pub fn map(space: &AddressSpace, npages: usize) -> Region {
    space.map(npages * PAGE_SIZE, Prot::READ_WRITE).expect("map")
}

/// A region of `npages` pages whose i-th u32 word is `i`, all moved to `dev`.
pub fn on_device(space: &AddressSpace, dev: &SimDevice, npages: usize) -> Region {
    let r = map(space, npages);
    fill(&r, 0..npages, |i| i);
    assert_eq!(dev.migrate_to_device_all(r.addr(), npages).expect("migrate_to_device").cpages, npages);
    r
}

/// How many of pages `pages` of `r` are in RAM.
pub fn pages_in_ram(space: &AddressSpace, r: &Region, pages: std::ops::Range<usize>) -> usize {
    let range = r.addr() + pages.start * PAGE_SIZE..r.addr() + pages.end * PAGE_SIZE;
    space.snapshot(range).unwrap().iter().filter(|p| p.residency == uhmm::Residency::Ram).count()
}

/// Buffer of `npages` pages whose i-th u32 word is `f(i)`.
pub fn pattern(npages: usize, f: impl Fn(u32) -> u32) -> Vec<u8> {
    let mut buf = vec![0u8; npages * PAGE_SIZE];
    for (i, w) in buf.chunks_exact_mut(4).enumerate() {
        w.copy_from_slice(&f(i as u32).to_ne_bytes());
    }
    buf
}

/// The i-th u32 word of `buf`.
pub fn word(buf: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes(buf[i * 4..i * 4 + 4].try_into().unwrap())
}

/// Fills the region's pages `pages` with word index i (global in the region).
pub fn fill(region: &Region, pages: std::ops::Range<usize>, f: impl Fn(u32) -> u32) {
    let all = pattern(region.npages(), f);
    let (a, b) = (pages.start * PAGE_SIZE, pages.end * PAGE_SIZE);
    region.write(a, &all[a..b]).expect("fill");
}

/// Reads the whole region through the CPU.
pub fn cpu_read(region: &Region) -> Vec<u8> {
    let mut buf = vec![0u8; region.len()];
    region.read(0, &mut buf).expect("cpu read");
    buf
}

/// The whole region read with plain loads, as a program reads it
/// (`Region::load`): unlike `Region::read`, whose kernel copy pins each page
/// for a moment, it leaves pages shared copy-on-write shared.
pub fn cpu_load(region: &Region) -> Vec<u8> {
    let mut buf = vec![0u8; region.len()];
    region.load(0, &mut buf).expect("cpu load");
    buf
}

/// Asserts that every word i of `buf` is `f(i)`.
pub fn assert_words(buf: &[u8], f: impl Fn(u32) -> u32) {
    for i in 0..buf.len() / 4 {
        let want = f(i as u32);
        let got = word(buf, i);
        assert_eq!(got, want, "word {i} (page {})", i / WORDS_PER_PAGE);
    }
}

/// Runs the calling test in a fresh process of its own (this test binary,
/// `--exact name`), so that a test which forks does so from a process with
/// no other test threads. Returns true inside that process (run the body),
/// false in the launching one after checking the process succeeded.
pub fn isolated(name: &str) -> bool {
    const VAR: &str = "UHMM_ISOLATED_TEST";
    if std::env::var(VAR).as_deref() == Ok(name) {
        return true;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(VAR, name)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{name}: isolated run hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    assert!(
        status.success(),
        "{name} failed in its own process: {status}\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

/// Forks; the child runs `f` and exits with its code (101 if it panics);
/// the parent gets the child's pid.
pub fn spawn_child(f: impl FnOnce() -> i32) -> i32 {
    use uhmm_sys::process::{Forked, exit_now, fork};
    // SAFETY: called from a process made by `isolated`, whose other threads
    // are uhmm's own (fault handlers, DMA engines), which hold no lock the
    // child needs; the child leaves with `exit_now`, running no destructors.
    match unsafe { fork() }.expect("fork") {
        Forked::Child => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
            exit_now(code)
        }
        Forked::Parent { child } => child,
    }
}

/// [`spawn_child`], then waits for it: its exit code (128 + signal if killed).
pub fn fork_child(f: impl FnOnce() -> i32) -> i32 {
    uhmm_sys::process::wait_child(spawn_child(f)).expect("waitpid")
}

/// C11: a thread writes the first and last word of each of the `n` pages
/// of `region`, round after round, while `migrate` (a round trip to a
/// device and back, returning the pages it moved) runs 100 times; then every
/// page must hold the writer's last round. Returns the pages moved.
pub fn writer_races_migrations(region: &std::sync::Arc<Region>, n: usize, mut migrate: impl FnMut() -> usize) -> usize {
    use std::sync::atomic::{AtomicBool, Ordering};
    fill(region, 0..n, |_| 0);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = {
        let (region, stop) = (region.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut round = 0u32;
            while !stop.load(Ordering::SeqCst) {
                round += 1;
                for p in 0..n {
                    // first and last word of each page
                    region.write(p * PAGE_SIZE, &round.to_ne_bytes()).unwrap();
                    region.write(p * PAGE_SIZE + PAGE_SIZE - 4, &round.to_ne_bytes()).unwrap();
                }
            }
            round
        })
    };
    let moved = (0..100).map(|_| migrate()).sum();
    stop.store(true, Ordering::SeqCst);
    let last = writer.join().unwrap();
    assert!(last > 0);
    let buf = cpu_read(region);
    for p in 0..n {
        assert_eq!(word(&buf, p * WORDS_PER_PAGE), last, "page {p} first word");
        assert_eq!(word(&buf, p * WORDS_PER_PAGE + WORDS_PER_PAGE - 1), last, "page {p} last word");
    }
    moved
}

/// `len` bytes of xorshift64 noise from `seed` (data that does not
/// compress).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Text: sentences of words drawn from a small vocabulary.
pub fn text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "memory",
        "page",
        "the",
        "device",
        "migrates",
        "a",
        "of",
        "fault",
        "kernel",
        "and",
        "to",
        "compressed",
        "store",
        "range",
        "in",
        "user",
        "space",
        "heterogeneous",
        "with",
        "zram",
    ];
    let r = noise(seed, len);
    let mut out = Vec::with_capacity(len + 16);
    let mut k = 0;
    while out.len() < len {
        out.extend_from_slice(WORDS[r[k % len] as usize % WORDS.len()].as_bytes());
        out.push(if r[(k + 1) % len].is_multiple_of(11) { b'\n' } else { b' ' });
        k += 1;
    }
    out.truncate(len);
    out
}
