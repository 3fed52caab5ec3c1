//! A memory cgroup of the bench's own: the kernel side of the RAM-budget
//! rows and of the programs runs in one limited to the budget, and the
//! far rows' kernel side charges its pages to one so that it can reclaim
//! them from the swap cache before it reads them back.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A memory cgroup made for one child, or for the bench while it fills
/// memory ([`Cgroup::enter`]); removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    dir: PathBuf,
    v2: bool,
}

/// Where the memory controller is mounted: (the hierarchy's root, v2).
fn memory_hierarchy() -> Result<(PathBuf, bool), String> {
    let mounts = fs::read_to_string("/proc/self/mounts").map_err(|e| format!("/proc/self/mounts: {e}"))?;
    let mut v2 = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [_, at, kind, opts, ..] = f[..] else { continue };
        if kind == "cgroup" && opts.split(',').any(|o| o == "memory") {
            return Ok((PathBuf::from(at), false));
        }
        if kind == "cgroup2" && v2.is_none() {
            let controllers = fs::read_to_string(Path::new(at).join("cgroup.controllers")).unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == "memory") {
                v2 = Some(PathBuf::from(at));
            }
        }
    }
    v2.map(|p| (p, true)).ok_or_else(|| "no memory cgroup controller is mounted (v1 or v2)".to_string())
}

impl Cgroup {
    /// Makes a memory cgroup under the hierarchy's root, with a name of
    /// its own (`uhmm-bench-WHAT-…`), no limit yet, and (v1) swappiness
    /// 100.
    pub fn create(what: &str) -> Result<Cgroup, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not running as root (a memory cgroup is needed)".into());
        }
        let (root, v2) = memory_hierarchy()?;
        if v2 {
            let ctl = root.join("cgroup.subtree_control");
            let on = fs::read_to_string(&ctl).map_err(|e| format!("{}: {e}", ctl.display()))?;
            if !on.split_whitespace().any(|c| c == "memory") {
                fs::write(&ctl, "+memory").map_err(|e| format!("enabling memory in {}: {e}", ctl.display()))?;
            }
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = root.join(format!("uhmm-bench-{what}-{}-{nanos}", std::process::id()));
        fs::create_dir(&dir).map_err(|e| format!("creating the cgroup {}: {e}", dir.display()))?;
        let cg = Cgroup { dir, v2 };
        if !v2 {
            cg.write("memory.swappiness", "100")?;
        }
        Ok(cg)
    }

    fn write(&self, file: &str, what: &str) -> Result<(), String> {
        let p = self.dir.join(file);
        fs::write(&p, what).map_err(|e| format!("writing {what} to {}: {e}", p.display()))
    }

    /// The file of the memory charged now.
    pub fn usage_file(&self) -> PathBuf {
        self.dir.join(if self.v2 { "memory.current" } else { "memory.usage_in_bytes" })
    }

    /// Moves process `pid` in.
    pub fn add(&self, pid: u32) -> Result<(), String> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// Limits the cgroup's RAM to `bytes` (the kernel reclaims down to it,
    /// to swap, before the write returns); a few tries while it cannot yet.
    pub fn limit(&self, bytes: u64) -> Result<(), String> {
        let file = if self.v2 { "memory.max" } else { "memory.limit_in_bytes" };
        let mut tries = 0;
        loop {
            match self.write(file, &bytes.to_string()) {
                Ok(()) => return Ok(()),
                Err(_) if tries < 10 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    let usage = read_u64(&self.usage_file()).map_or_else(|e| e, |u| u.to_string());
                    let stat = fs::read_to_string(self.dir.join("memory.stat")).unwrap_or_default();
                    let stat: Vec<&str> = stat
                        .lines()
                        .filter(|l| {
                            ["anon ", "rss ", "swap ", "cache ", "file ", "unevictable "]
                                .iter()
                                .any(|k| l.starts_with(k))
                        })
                        .collect();
                    return Err(format!(
                        "{e} (the kernel could not reclaim down to it; usage {usage}, {})",
                        stat.join(", ")
                    ));
                }
            }
        }
    }

    /// Moves this process in until the guard is dropped, then back to the
    /// cgroup it was in: the memory it touches first meanwhile is charged
    /// here (and stays charged here after).
    pub fn enter(&self) -> Result<Entered, String> {
        let back = own_cgroup(self.v2)?;
        self.add(std::process::id())?;
        Ok(Entered { back })
    }

    /// Reclaims what is charged here: swaps anonymous pages out and drops
    /// clean ones (pages written to swap and still in the swap cache).
    /// Returns the bytes still charged.
    pub fn reclaim(&self) -> Result<u64, String> {
        if self.v2 {
            let usage = read_u64(&self.usage_file())?;
            // Fails (EAGAIN) when it reclaimed less than asked: the usage
            // left says how much.
            let _ = self.write("memory.reclaim", &usage.to_string());
        } else {
            self.write("memory.force_empty", "0")?;
        }
        read_u64(&self.usage_file())
    }

    /// Processes its OOM killer killed (`oom_kill` of `memory.oom_control`,
    /// v1, or `memory.events`, v2).
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 { "memory.events" } else { "memory.oom_control" };
        let s = fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        s.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
    }

    /// What it is, for the report.
    pub fn describe(&self) -> String {
        format!(
            "a memory cgroup (v{}{}) limited to the budget",
            if self.v2 { 2 } else { 1 },
            if self.v2 { "" } else { ", swappiness 100" }
        )
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The child is gone (waited for); its charges may take a moment.
        for _ in 0..50 {
            match fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        eprintln!("uhmm bench: WARNING: could not remove the cgroup {}: run `rmdir {0}`", self.dir.display());
    }
}

/// While this process is in a [`Cgroup`] ([`Cgroup::enter`]): moves it
/// back on drop.
#[derive(Debug)]
pub struct Entered {
    back: PathBuf,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let procs = self.back.join("cgroup.procs");
        if let Err(e) = fs::write(&procs, std::process::id().to_string()) {
            eprintln!("uhmm bench: WARNING: could not move back to {}: {e}", self.back.display());
        }
    }
}

/// The directory of the memory cgroup this process is in.
fn own_cgroup(v2: bool) -> Result<PathBuf, String> {
    let (root, _) = memory_hierarchy()?;
    let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    own.lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let ours = if v2 { controllers.is_empty() } else { controllers.split(',').any(|c| c == "memory") };
            ours.then(|| root.join(path.trim_start_matches('/')))
        })
        .ok_or_else(|| "this process's memory cgroup is not in /proc/self/cgroup".to_string())
}

/// Reads a number from a cgroup file.
pub fn read_u64(path: &Path) -> Result<u64, String> {
    let s = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    s.trim().parse().map_err(|e| format!("{}: {s:?}: {e}", path.display()))
}
