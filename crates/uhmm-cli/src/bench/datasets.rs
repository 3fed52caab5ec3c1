//! The data sets of `uhmm bench tier`: zeros, text (a real corpus a Debian
//! package installs: Perl's documentation, `perl-doc`), a program heap
//! image (a Python process's objects, read from its memory), random bytes,
//! and half-random pages. Each is built at the size asked for, repeating
//! its source as needed.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::process::{Command, Stdio};

use uhmm::PAGE_SIZE;

/// Where the text corpus is: `perl-doc`'s POD files.
const CORPUS_GLOB_DIR: &str = "/usr/share/perl";

/// A Python program that builds a heap of ordinary objects, says so, and
/// waits: dicts with strings, floats, lists and tuples, an index, strings
/// and int lists.
const PYTHON_HEAP: &str = r#"
import sys
rows = []
for i in range(130000):
    rows.append({"id": i, "name": "user%d" % i, "score": i * 0.5,
                 "tags": ["t%d" % (i % 17), "g%d" % (i % 5)], "pos": (i, i * 2)})
index = {r["name"]: r for r in rows}
words = ["word-%d-%s" % (i, "x" * (i % 23)) for i in range(60000)]
ints = [list(range(i % 50)) for i in range(30000)]
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.read()
"#;

/// A data set: its name and bytes.
pub struct DataSet {
    /// `zeros`, `text`, `heap`, `random` or `half-random`.
    pub name: &'static str,
    /// The bytes, a whole number of pages.
    pub bytes: Vec<u8>,
}

/// Every data set at `len` bytes (a page multiple). Fails when the corpus
/// or `python3` is missing, naming the package to install.
pub fn all(len: usize) -> Result<Vec<DataSet>, String> {
    let text = repeat_to(&corpus()?, len);
    let heap = repeat_to(&python_heap()?, len);
    let random = noise(0x5eed, len);
    let mut half = text.clone();
    for p in 0..len / PAGE_SIZE {
        let at = p * PAGE_SIZE;
        half[at..at + PAGE_SIZE / 2].copy_from_slice(&random[at + PAGE_SIZE / 2..at + PAGE_SIZE]);
    }
    Ok(vec![
        DataSet { name: "zeros", bytes: vec![0; len] },
        DataSet { name: "text", bytes: text },
        DataSet { name: "heap", bytes: heap },
        DataSet { name: "random", bytes: random },
        DataSet { name: "half-random", bytes: half },
    ])
}

/// `src` repeated (and cut) to `len` bytes.
fn repeat_to(src: &[u8], len: usize) -> Vec<u8> {
    src.iter().copied().cycle().take(len).collect()
}

/// xorshift64 bytes.
pub(super) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_ne_bytes());
    }
    out.truncate(len);
    out
}

/// The POD files of `perl-doc`, in sorted order, concatenated.
fn corpus() -> Result<Vec<u8>, String> {
    let missing =
        || format!("the text corpus is missing: install the Debian package perl-doc ({CORPUS_GLOB_DIR}/*/pod)");
    let mut files = Vec::new();
    for version in std::fs::read_dir(CORPUS_GLOB_DIR).map_err(|_| missing())?.flatten() {
        if let Ok(dir) = std::fs::read_dir(version.path().join("pod")) {
            files.extend(dir.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "pod")));
        }
    }
    files.sort();
    let mut out = Vec::new();
    for f in files {
        std::fs::File::open(&f)
            .and_then(|mut h| h.read_to_end(&mut out))
            .map_err(|e| format!("{}: {e}", f.display()))?;
    }
    if out.len() < (1 << 20) {
        return Err(missing());
    }
    Ok(out)
}

/// The heap of a Python process that built [`PYTHON_HEAP`]'s objects: its
/// `[heap]` and anonymous writable mappings, read from `/proc/PID/mem`.
fn python_heap() -> Result<Vec<u8>, String> {
    let mut child = Command::new("python3")
        .args(["-c", PYTHON_HEAP])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("python3 could not run ({e}): install the Debian package python3"))?;
    let read = (|| -> Result<Vec<u8>, String> {
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().ok_or("no stdout")?).read_line(&mut line).map_err(|e| e.to_string())?;
        if line.trim() != "ready" {
            return Err(format!("python3 said {line:?}"));
        }
        let pid = child.id();
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| e.to_string())?;
        let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for l in maps.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            let anonymous = f.len() == 5 || f.get(5) == Some(&"[heap]");
            if f.len() < 5 || !f[1].starts_with("rw") || !anonymous {
                continue;
            }
            let Some((a, b)) = f[0].split_once('-') else { continue };
            let (a, b) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16));
            let (Ok(a), Ok(b)) = (a, b) else { continue };
            let mut buf = vec![0u8; (b - a) as usize];
            if mem.seek(SeekFrom::Start(a)).is_ok() && mem.read_exact(&mut buf).is_ok() {
                out.extend_from_slice(&buf);
            }
        }
        Ok(out)
    })();
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"done\n");
    }
    let _ = child.kill();
    let _ = child.wait();
    let out = read?;
    if out.len() < (8 << 20) {
        return Err(format!("the Python heap image is only {} bytes", out.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real sources: perl-doc's text and a python3 process's heap
    /// (`.ci/run` installs both; a missing one fails here, loudly).
    #[test]
    fn every_data_set_is_built_from_its_source() {
        let len = 1 << 20;
        let sets = all(len).expect("the data sets (python3 and perl-doc installed?)");
        let names: Vec<&str> = sets.iter().map(|s| s.name).collect();
        assert_eq!(names, ["zeros", "text", "heap", "random", "half-random"]);
        assert!(sets.iter().all(|s| s.bytes.len() == len));
        let text = &sets[1].bytes;
        let printable = text.iter().filter(|b| b.is_ascii_graphic() || b.is_ascii_whitespace()).count();
        assert!(printable > len * 95 / 100, "the corpus is text");
        assert!(text.windows(4).any(|w| w == b"perl"), "the corpus is Perl's documentation");
        let heap = &sets[2].bytes;
        assert!(heap.iter().filter(|&&b| b != 0).count() > len / 10, "the heap image holds data");
        let image = python_heap().expect("python3");
        assert!(image.windows(9).any(|w| w == b"user12345"), "the heap holds the program's strings");
        let (random, half) = (&sets[3].bytes, &sets[4].bytes);
        assert_eq!(half[..PAGE_SIZE / 2], random[PAGE_SIZE / 2..PAGE_SIZE], "half of each page is noise");
        assert_eq!(half[PAGE_SIZE / 2..PAGE_SIZE], text[PAGE_SIZE / 2..PAGE_SIZE], "the other half is text");
    }
}
