//! The kernel's own "move out and fault back": `MADV_PAGEOUT` of an
//! anonymous mapping to a zram swap device, then touching every page back.
//!
//! Only as root, and only where a zram device can be had
//! (`/sys/class/zram-control`, after `modprobe zram` if needed). The bench
//! creates the device, makes it swap with the highest priority, and a
//! [`Zram`] guard turns swap off and removes the device when dropped (also
//! on an error or a panic), so swap is never left on.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use uhmm::PAGE_SIZE;
use uhmm_sys::mman::{Mapping, Protection};

use super::{Case, Plan, progress, repeat};
use crate::units::human;

const CONTROL: &str = "/sys/class/zram-control";
/// Bytes a read call handles at once when touching pages back.
const IO_CHUNK: usize = 4 << 20;

/// A zram device made swap; undone on drop.
#[derive(Debug)]
pub struct Zram {
    id: u32,
    dev: PathBuf,
    swap_on: bool,
}

/// Runs a tool, turning a failure into its stderr.
pub(super) fn tool(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program).args(args).output().map_err(|e| format!("`{program}` could not run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The fields of zram's `mm_stat` the benches use.
#[derive(Debug, Clone, Copy, Default)]
pub struct MmStat {
    /// Bytes stored, before compression.
    pub orig_data_size: u64,
    /// Bytes the compressor produced for them.
    pub compr_data_size: u64,
    /// Memory the allocator uses for them.
    pub mem_used_total: u64,
}

impl Zram {
    fn sys(&self, file: &str) -> PathBuf {
        PathBuf::from(format!("/sys/block/zram{}/{file}", self.id))
    }

    /// Creates a zram device of `disksize` bytes compressing with
    /// `algorithm` (the kernel's default when `None`) and turns it on as
    /// swap with the highest priority.
    pub fn setup(disksize: usize, algorithm: Option<&str>) -> Result<Zram, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not running as root".into());
        }
        if !Path::new(CONTROL).exists() {
            tool("modprobe", &["zram", "num_devices=0"])
                .map_err(|e| format!("no {CONTROL} and the zram module cannot be loaded: {e}"))?;
            if !Path::new(CONTROL).exists() {
                return Err(format!("`modprobe zram` ran but {CONTROL} is missing"));
            }
        }
        let id: u32 = fs::read_to_string(format!("{CONTROL}/hot_add"))
            .map_err(|e| format!("{CONTROL}/hot_add: {e}"))?
            .trim()
            .parse()
            .map_err(|e| format!("{CONTROL}/hot_add: {e}"))?;
        // From here on the guard removes the device whatever happens.
        let mut z = Zram { id, dev: PathBuf::from(format!("/dev/zram{id}")), swap_on: false };
        if let Some(a) = algorithm {
            fs::write(z.sys("comp_algorithm"), a).map_err(|e| format!("setting the zram algorithm to {a}: {e}"))?;
        }
        fs::write(z.sys("disksize"), disksize.to_string()).map_err(|e| format!("setting the zram disksize: {e}"))?;
        let dev = z.dev.to_string_lossy().into_owned();
        tool("mkswap", &[&dev])?;
        tool("swapon", &["-p", "32767", &dev])?;
        z.swap_on = true;
        Ok(z)
    }

    /// The compression algorithm in use (the one in brackets).
    pub fn algorithm(&self) -> String {
        let s = fs::read_to_string(self.sys("comp_algorithm")).unwrap_or_default();
        s.split_whitespace()
            .find(|w| w.starts_with('['))
            .map(|w| w.trim_matches(['[', ']']).to_string())
            .unwrap_or_else(|| s.trim().to_string())
    }

    /// Bytes of data stored on the device now (`mm_stat`'s first field).
    pub fn stored_bytes(&self) -> u64 {
        self.mm_stat().orig_data_size
    }

    /// The device's `mm_stat` (zeros where it cannot be read).
    pub fn mm_stat(&self) -> MmStat {
        let s = fs::read_to_string(self.sys("mm_stat")).unwrap_or_default();
        let f: Vec<u64> = s.split_whitespace().map(|w| w.parse().unwrap_or(0)).collect();
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        MmStat { orig_data_size: at(0), compr_data_size: at(1), mem_used_total: at(2) }
    }
}

impl Drop for Zram {
    fn drop(&mut self) {
        let dev = self.dev.to_string_lossy().into_owned();
        if self.swap_on {
            match tool("swapoff", &[&dev]) {
                Ok(()) => self.swap_on = false,
                Err(e) => eprintln!("uhmm bench: WARNING: could not turn swap off on {dev}: {e}"),
            }
        }
        if self.swap_on {
            eprintln!("uhmm bench: WARNING: {dev} is still swap: run `swapoff {dev}`");
            return;
        }
        if let Err(e) = fs::write(self.sys("reset"), "1") {
            eprintln!("uhmm bench: could not reset {dev}: {e}");
        }
        if let Err(e) = fs::write(format!("{CONTROL}/hot_remove"), self.id.to_string()) {
            eprintln!("uhmm bench: could not remove {dev}: {e}");
        }
    }
}

/// Measures page-out and swap-in through zram at the target size. Returns a
/// status line (what ran, or why not) and the cases.
pub fn measure(plan: &Plan) -> (String, Vec<Case>) {
    let len = plan.target_size;
    progress(&format!("zram: MADV_PAGEOUT and fault back, {}", human(len)));
    let zram = match Zram::setup(len * 2, None) {
        Ok(z) => z,
        Err(e) => {
            let msg = format!("not measured: {e}; the scan target falls back to 0.4x memcpy");
            eprintln!("  zram {msg}");
            return (msg, Vec::new());
        }
    };
    match measure_on(&zram, plan) {
        Ok((cases, paged)) => {
            let status = format!(
                "measured on /dev/zram{} ({}), {:.0}% of the pages paged out on average; swap removed afterwards",
                zram.id,
                zram.algorithm(),
                paged * 100.0
            );
            drop(zram);
            (status, cases)
        }
        Err(e) => {
            drop(zram);
            let msg = format!("not measured: {e}; the scan target falls back to 0.4x memcpy");
            eprintln!("  zram {msg}");
            (msg, Vec::new())
        }
    }
}

fn measure_on(zram: &Zram, plan: &Plan) -> Result<(Vec<Case>, f64), String> {
    let len = plan.target_size;
    let mut out_times = Vec::new();
    let mut in_times = Vec::new();
    let mut paged_fraction = Vec::new();
    repeat(plan.runs, |_| -> Result<(), String> {
        let map = Mapping::anonymous(len, Protection::ReadWrite, PAGE_SIZE).map_err(|e| format!("mmap: {e}"))?;
        // The same fill as the uhmm cases (lzo and friends compress it some).
        let mut buf = vec![0u8; IO_CHUNK.min(len)];
        let mut off = 0;
        while off < len {
            let n = buf.len().min(len - off);
            super::fill_pattern(&mut buf[..n], off);
            map.write(off, &buf[..n]).map_err(|e| format!("fill: {e}"))?;
            off += n;
        }
        let before = zram.stored_bytes();
        let t = Instant::now();
        map.pageout(0, len).map_err(|e| format!("MADV_PAGEOUT: {e}"))?;
        out_times.push(t.elapsed());
        let stored = zram.stored_bytes().saturating_sub(before);
        paged_fraction.push(stored as f64 / len as f64);
        let t = Instant::now();
        let mut off = 0;
        while off < len {
            let n = buf.len().min(len - off);
            map.read(off, &mut buf[..n]).map_err(|e| format!("touch back: {e}"))?;
            off += n;
        }
        in_times.push(t.elapsed());
        Ok(())
    })?;
    let split = |mut v: Vec<Duration>| {
        let w = v.remove(0);
        (w, v)
    };
    let (w, r) = split(out_times);
    let out = Case::throughput("zram_pageout", "zram: MADV_PAGEOUT", "baseline", len, w, &r);
    let (w, r) = split(in_times);
    let back = Case::throughput("zram_swapin", "zram: fault back (sequential read)", "baseline", len, w, &r);
    let paged = super::median(&paged_fraction[1..]);
    let note = format!("{:.0}% of the bytes reached zram (median over runs)", paged * 100.0);
    Ok((vec![out.with_note(note.clone()), back.with_note(note)], paged))
}
