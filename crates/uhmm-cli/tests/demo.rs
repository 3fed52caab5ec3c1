//! Runs the built `uhmm` binary: `uhmm demo --size 8M` must exit 0 and print
//! the residency map and the counters; a hang fails the test.

mod common;

use common::*;

#[test]
fn demo_8m_verifies_every_byte() {
    let (code, out, err) = run_uhmm(&["demo", "--size", "8M"]);
    let dump = format!("--- stdout\n{out}\n--- stderr\n{err}");
    assert_eq!(code, Some(0), "uhmm demo --size 8M failed\n{dump}");
    // The residency map: a legend, rows of cells, the page census; the region
    // goes from holes to RAM to the device, and part of it comes back.
    assert!(out.contains("'D' on a device"), "no map legend\n{dump}");
    assert!(
        out.contains("|................................................................|"),
        "no map of holes\n{dump}"
    );
    assert!(
        out.contains("|RRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRR|"),
        "no map of RAM\n{dump}"
    );
    assert!(
        out.contains("|DDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDD|"),
        "no map of device pages\n{dump}"
    );
    assert!(
        out.contains("pages: hole 0  ram 0  zero 0  device 2048  poisoned 0"),
        "not all pages reached the device\n{dump}"
    );
    // The counters.
    for counter in ["faults", "zero_filled_pages", "migrate_to_ram", "pages_to_device", "pages_to_ram", "GB/s"] {
        assert!(out.contains(counter), "counter `{counter}` missing\n{dump}");
    }
    assert!(out.contains("pages migrated: to device 2048"), "pages to device not reported\n{dump}");
    assert!(out.contains("result: OK"), "no OK result\n{dump}");
}

#[test]
fn bad_size_is_a_usage_error() {
    let (code, _out, err) = run_uhmm(&["demo", "--size", "12X"]);
    assert_eq!(code, Some(2), "stderr: {err}");
    assert!(err.contains("unknown suffix"), "stderr: {err}");
}

#[test]
fn help_documents_demo() {
    let (code, out, err) = run_uhmm(&["demo", "--help"]);
    assert_eq!(code, Some(0), "stderr: {err}");
    for flag in ["--size", "--touch-fraction", "--chunk-pages", "Exit status"] {
        assert!(out.contains(flag), "`{flag}` not in help:\n{out}");
    }
}

#[test]
fn demo_on_the_compressed_store_verifies_every_byte_and_reports_the_store() {
    let (code, out, err) = run_uhmm(&["demo", "--size", "8M", "--device", "compress"]);
    let dump = format!("--- stdout\n{out}\n--- stderr\n{err}");
    assert_eq!(code, Some(0), "uhmm demo --device compress failed\n{dump}");
    assert!(out.contains("compressed store (lz4)"), "no device line\n{dump}");
    assert!(out.contains("store: orig 8 MiB"), "no store counters after the migration\n{dump}");
    assert!(out.contains("pages: hole 0  ram 0  zero 0  device 2048  poisoned 0"), "not all pages moved\n{dump}");
    assert!(out.contains("result: OK"), "no OK result\n{dump}");
}

#[test]
fn demo_under_a_ram_budget_verifies_every_byte_and_reports_the_tier() {
    let (code, out, err) = run_uhmm(&["demo", "--size", "8M", "--device", "compress", "--ram-budget", "2M"]);
    let dump = format!("--- stdout\n{out}\n--- stderr\n{err}");
    assert_eq!(code, Some(0), "uhmm demo --ram-budget failed\n{dump}");
    assert!(out.contains("ram budget   2 MiB"), "no budget line\n{dump}");
    assert!(out.contains("tier: resident"), "no tier counters\n{dump}");
    assert!(out.contains("ram budget: peak resident"), "no final tier stats\n{dump}");
    assert!(out.contains("result: OK"), "no OK result\n{dump}");
    // A budget needs a store device (the sim device is not one).
    let (code, _, err) = run_uhmm(&["demo", "--size", "8M", "--ram-budget", "2M"]);
    assert_eq!(code, Some(2), "stderr: {err}");
    assert!(err.contains("--ram-budget needs a store device"), "stderr: {err}");
}
