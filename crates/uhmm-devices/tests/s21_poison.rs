//! Conformance scenario S21 (CONFORMANCE.md): the device marks a page
//! unrecoverable while migrating it back; CPU access to that page gets
//! SIGBUS, other pages are fine and no other data is lost.
//!
//! The SIGBUS itself is checked in a child process: `s21_poison` re-runs this
//! test binary with only `s21_poison_child` selected, and that child makes a
//! direct load from the poisoned page, which must kill it with SIGBUS.

mod common;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use uhmm::{AddressSpace, ErrorKind, PAGE_SIZE, Region};
use uhmm_devices::sim::{PageState, SimDevice};

/// Set in the environment of the child process.
const CHILD_ENV: &str = "UHMM_S21_CHILD";
/// Printed by the child just before its direct load.
const MARKER: &str = "s21 child: loading from the poisoned page";
const SIGBUS: i32 = 7;

/// A region of `NPAGES` pages (word i = i) migrated to `dev` and back, with
/// the first page the device copied back declared lost. Returns the region
/// and the index of the poisoned page, found with a snapshot.
fn poisoned_region(space: &AddressSpace, dev: &SimDevice) -> (Region, usize) {
    let region = map(space, NPAGES);
    fill(&region, 0..NPAGES, |i| i);
    assert_eq!(dev.migrate_to_device(region.addr(), NPAGES).unwrap().cpages, NPAGES);
    dev.poison_next_copy_back();
    let c = dev.migrate_to_system(region.addr(), NPAGES).unwrap();
    assert_eq!(c.cpages, NPAGES, "the lost page leaves the device too");
    assert_eq!(dev.pages_in_use(), 0);
    let snap = dev.snapshot(region.addr(), NPAGES).unwrap();
    let lost: Vec<usize> = (0..NPAGES).filter(|&p| snap[p] == PageState::ERROR).collect();
    assert_eq!(lost.len(), 1, "exactly one page is poisoned: {lost:?}");
    for (p, s) in snap.iter().enumerate() {
        if p != lost[0] {
            assert_eq!(*s, PageState::WRITE, "page {p} is back in RAM");
        }
    }
    (region, lost[0])
}

#[test]
fn s21_poison() {
    with_timeout(120, || {
        let space = space();
        let dev = device(&space);
        let (region, lost) = poisoned_region(&space, &dev);
        let page = |p: usize| p * PAGE_SIZE..(p + 1) * PAGE_SIZE;

        // The typed API refuses to touch the poisoned page.
        let mut buf = vec![0u8; PAGE_SIZE];
        assert_eq!(region.read(page(lost).start, &mut buf).unwrap_err().kind(), ErrorKind::Fault);
        assert_eq!(region.write(page(lost).start, &buf).unwrap_err().kind(), ErrorKind::Fault);
        let mut all = vec![0u8; region.len()];
        assert_eq!(region.read(0, &mut all).unwrap_err().kind(), ErrorKind::Fault);

        // Every other page reads back i.
        let want = pattern(NPAGES, |i| i);
        for p in (0..NPAGES).filter(|&p| p != lost) {
            region.read(page(p).start, &mut buf).unwrap();
            assert!(buf[..] == want[page(p)], "page {p} lost data");
        }
        assert_eq!(space.stats().poisoned_pages, 1);
    });

    // A direct load from the poisoned page raises SIGBUS (in a child).
    with_timeout(120, || {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "s21_poison_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = Vec::new();
                let _ = r.read_to_end(&mut s);
                String::from_utf8_lossy(&s).into_owned()
            })
        };
        let out = drain(Box::new(child.stdout.take().unwrap()));
        let err = drain(Box::new(child.stderr.take().unwrap()));
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for child") {
                break Some(status);
            }
            if start.elapsed() > Duration::from_secs(60) {
                child.kill().expect("kill child");
                child.wait().expect("reap child");
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (out, err) = (out.join().unwrap(), err.join().unwrap());
        let report = format!("child stdout:\n{out}\nchild stderr:\n{err}");
        let Some(status) = status else {
            panic!("child hung: killed after 60 s\n{report}");
        };
        assert!(err.contains(MARKER), "child did not reach the load ({status})\n{report}");
        assert_eq!(status.signal(), Some(SIGBUS), "child must die of SIGBUS, got {status}\n{report}");
    });
}

/// The child half of `s21_poison`: does nothing unless run by it.
#[test]
fn s21_poison_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let space = space();
    let dev = device(&space);
    let (region, lost) = poisoned_region(&space, &dev);
    eprintln!("{MARKER} {lost}");
    // SAFETY: the address is inside `region`, which is alive and mapped for
    // the whole read, and no Rust reference to these bytes exists. The page
    // is poisoned, so the load is expected to raise SIGBUS and kill this
    // process; that is what the parent test checks.
    let v = unsafe { std::ptr::read_volatile(region.as_ptr().add(lost * PAGE_SIZE)) };
    panic!("load from the poisoned page {lost} returned {v} instead of raising SIGBUS");
}
