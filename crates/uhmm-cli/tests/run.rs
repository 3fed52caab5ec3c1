//! `uhmm run` on real programs no one here wrote: each runs with and
//! without `uhmm run`, under a budget well below its memory, and its
//! output must be the same byte for byte; the report must show that uhmm
//! managed and compressed its memory. Needs root (or full userfaultfd)
//! and the programs `.ci/run` installs: python3, sqlite3, sort, xz,
//! redis-server, redis-cli; a missing one fails the test.

mod common;
#[path = "../../uhmm-devices/tests/common/redis_server.rs"]
mod redis_server;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::run_command;
use serde_json::Value;

/// The preloaded library, built in this test's profile (`cargo test`
/// builds the binary, not the package's library).
fn library() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "uhmm-cli", "--lib"]).current_dir(env!("CARGO_MANIFEST_DIR"));
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let (status, _, err) = run_command(cmd);
        assert!(status.success(), "building the preload library failed:\n{err}");
        let lib = Path::new(env!("CARGO_BIN_EXE_uhmm")).with_file_name("libuhmm_preload.so");
        assert!(lib.is_file(), "{} was not built", lib.display());
        lib.to_path_buf()
    })
}

/// A program's path; the test fails when it is missing.
fn program(name: &str) -> String {
    for dir in ["/usr/bin", "/bin", "/usr/sbin"] {
        let p = format!("{dir}/{name}");
        if Path::new(&p).is_file() {
            return p;
        }
    }
    panic!("{name} is not installed (apt-get install it; .ci/run does)");
}

/// A scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("uhmm-run-test-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Runs `argv` plainly: stdout.
fn plain(argv: &[&str]) -> String {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    let (status, out, err) = run_command(cmd);
    assert!(status.success(), "{argv:?} failed without uhmm: {status}\n{err}");
    out
}

/// Runs `argv` under `uhmm run` with `flags`: stdout, stderr and the
/// report.
fn under_uhmm(flags: &[&str], argv: &[&str], dir: &Path) -> (String, String, Value) {
    library();
    let report = dir.join("report.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uhmm"));
    cmd.arg("run").args(flags).arg("--report").arg(&report).arg("--").args(argv);
    let (status, out, err) = run_command(cmd);
    assert!(status.success(), "{argv:?} failed under uhmm run: {status}\n--- stderr\n{err}");
    let json = std::fs::read(&report).unwrap_or_else(|e| panic!("no report at {}: {e}\n{err}", report.display()));
    (out, err, serde_json::from_slice(&json).expect("report is JSON"))
}

/// The sum of a counter over the report's processes.
fn total(report: &Value, key: &str) -> u64 {
    report["processes"].as_array().map_or(0, |ps| ps.iter().map(|p| p[key].as_u64().unwrap_or(0)).sum())
}

/// Asserts that uhmm managed memory and compressed some of it.
fn assert_tiered(report: &Value, err: &str) {
    let errors: Vec<_> =
        report["processes"].as_array().into_iter().flatten().filter(|p| !p["error"].is_null()).collect();
    assert!(errors.is_empty(), "uhmm was not used: {errors:?}\n{err}");
    assert!(total(report, "blocks") > 0, "uhmm managed no block: {report}\n{err}");
    assert!(total(report, "demoted_pages") > 0, "nothing was compressed under the budget: {report}\n{err}");
    assert!(total(report, "faults") > 0, "no page came back on a touch: {report}\n{err}");
}

const PYTHON_DICT_AND_BYTEARRAY: &str = r#"
import hashlib
b = bytearray(160 << 20)
for i in range(0, len(b), 4096):
    b[i:i + 8] = i.to_bytes(8, "little")
d = {i: str(i) * 3 for i in range(1_000_000)}
print(hashlib.sha256(b).hexdigest())
print(sum(len(v) for v in d.values()), d[123_456], d[999_999])
b[7 << 20] = 0x5a
print(hashlib.sha256(b).hexdigest())
"#;

#[test]
fn python_dict_and_bytearray_under_a_budget() {
    let dir = scratch("python");
    let py = program("python3");
    let argv = [py.as_str(), "-c", PYTHON_DICT_AND_BYTEARRAY];
    let want = plain(&argv);
    let (got, err, report) = under_uhmm(&["--ram-budget", "32M"], &argv, &dir);
    assert_eq!(got, want, "python3's output differs under uhmm run\n{err}");
    assert_tiered(&report, &err);
}

/// The same program with its cold pages on far stores (a private file in
/// /var/tmp; a redis-server the test starts): the same output, pages sent
/// out and brought back, and no value left on the server after the exit.
#[test]
fn python_on_a_file_and_on_redis() {
    redis_server::require_redis();
    let server = redis_server::RedisServer::start(redis_server::ServerOpts::default());
    let py = program("python3");
    let argv = [py.as_str(), "-c", PYTHON_DICT_AND_BYTEARRAY];
    let want = plain(&argv);
    for device in ["file:/var/tmp".to_string(), server.url()] {
        let dir = scratch("python-far");
        let (got, err, report) = under_uhmm(&["--ram-budget", "32M", "--device", &device], &argv, &dir);
        assert_eq!(got, want, "python3's output differs under uhmm run --device {device}\n{err}");
        assert_tiered(&report, &err);
        assert!(report["processes"][0]["device"].as_str().is_some_and(|d| d.starts_with(&device[..5])), "{report}");
    }
    assert_eq!(server.dbsize(), 0, "values were left on the server after python3 exited");
}

#[test]
fn sort_larger_than_the_budget() {
    let dir = scratch("sort");
    let input = dir.join("lines.txt");
    let py = program("python3");
    // 1.6 M lines, 39 MB: more than the budget.
    let generator = "import random,sys\nr=random.Random(7)\nw=sys.stdout.write\nfor i in range(1_600_000): w('%016x %d\\n' % (r.getrandbits(64), i))";
    let text = plain(&[py.as_str(), "-c", generator]);
    assert!(text.len() > 32 << 20, "the input must be larger than the budget");
    std::fs::write(&input, &text).expect("write input");
    let sort = program("sort");
    let path = input.to_str().expect("utf-8 path");
    let argv = [sort.as_str(), "--buffer-size=64M", "--parallel=2", path];
    let want = plain(&argv);
    let (got, err, report) = under_uhmm(&["--ram-budget", "32M"], &argv, &dir);
    assert!(got == want, "sort's output differs under uhmm run ({} / {} bytes)\n{err}", got.len(), want.len());
    assert_tiered(&report, &err);
}

#[test]
fn xz_with_two_threads() {
    let dir = scratch("xz");
    let input = dir.join("data");
    let py = program("python3");
    let generator = "import random\nr=random.Random(3)\nwords=[('w%d' % i) * (i % 7 + 1) for i in range(5000)]\nopen(__import__('sys').argv[1],'w').write(' '.join(r.choice(words) for _ in range(1_500_000)))";
    plain(&[py.as_str(), "-c", generator, input.to_str().expect("utf-8 path")]);
    let xz = program("xz");
    let path = input.to_str().expect("utf-8 path");
    // The compressed stream, as a checksum (xz -T2 -c writes it to stdout).
    let pipeline = format!(
        "{xz} -T2 -1 --block-size=1MiB -c {path} | sha256sum; {xz} -T2 -1 --block-size=1MiB -c {path} | {xz} -T2 -d | sha256sum; sha256sum < {path}"
    );
    let argv = ["/bin/sh", "-c", pipeline.as_str()];
    let want = plain(&argv);
    let (got, err, report) = under_uhmm(&["--ram-budget", "12M"], &argv, &dir);
    assert_eq!(got, want, "xz's output differs under uhmm run\n{err}");
    let lines: Vec<&str> = want.lines().collect();
    assert_eq!(lines[1], lines[2], "xz -d did not give the input back: the check itself is wrong");
    assert_tiered(&report, &err);
}

const SQLITE_SCRIPT: &str = "
CREATE TABLE t(id INTEGER PRIMARY KEY, k TEXT, v BLOB);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000)
INSERT INTO t SELECT i, printf('key-%08d', (i * 7919) % 1000000), zeroblob(200) || randomblob(16) FROM n;
CREATE INDEX tk ON t(k);
SELECT count(*), sum(length(v)), min(k), max(k) FROM t;
SELECT id, k FROM t WHERE k BETWEEN 'key-00100000' AND 'key-00100005' ORDER BY k;
SELECT count(*) FROM t WHERE id % 97 = 3;
SELECT page_count * page_size > 200 * 1024 * 1024 FROM pragma_page_count, pragma_page_size;
";

#[test]
fn sqlite3_in_memory_database() {
    let dir = scratch("sqlite");
    let sqlite = program("sqlite3");
    // sqlite's default page cache: each page its own small allocation,
    // which uhmm's small-object heap serves.
    let argv = [sqlite.as_str(), ":memory:", SQLITE_SCRIPT];
    let want = plain(&argv);
    assert!(want.contains("1000000|"), "sqlite3's own output is not what the script expects: {want}");
    assert!(want.trim_end().ends_with('1'), "the database is not over 200 MiB: {want}");
    let (got, err, report) = under_uhmm(&["--ram-budget", "32M"], &argv, &dir);
    assert_eq!(got, want, "sqlite3's output differs under uhmm run\n{err}");
    assert_tiered(&report, &err);
    assert!(total(&report, "heap_bytes") > 200 << 20, "the pages were not in uhmm's heap: {report}");
}

/// A child killed when the test ends, whatever happens.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `redis-server` under `uhmm run` on a loopback port, filled with
/// `redis-cli --pipe` and read back: the dataset's digest and sampled
/// values must be what a plain server gives.
#[test]
fn redis_server_filled_and_read_back() {
    let dir = scratch("redis");
    let server = program("redis-server");
    let cli = program("redis-cli");
    library();
    // Keys k0..k149999 with 2 KiB values derived from the key: 300 MiB.
    let mut load = String::new();
    for i in 0..150_000 {
        let v = format!("{i:08}-").repeat(2048 / 9);
        load.push_str(&format!("*3\r\n$3\r\nSET\r\n${}\r\nk{i}\r\n${}\r\n{v}\r\n", format!("k{i}").len(), v.len()));
    }
    let load_file = dir.join("load.resp");
    std::fs::write(&load_file, load).expect("write the load");
    let serve = |port: u16, uhmm: bool| -> (String, Option<Value>) {
        let report = dir.join(format!("report-{port}.json"));
        let mut cmd = if uhmm {
            let mut c = Command::new(env!("CARGO_BIN_EXE_uhmm"));
            c.args(["run", "--ram-budget", "24M", "--min-size", "256K", "--report"])
                .arg(&report)
                .arg("--")
                .arg(&server);
            c
        } else {
            Command::new(&server)
        };
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--enable-debug-command", "yes", "--daemonize", "no"])
            .stdout(std::process::Stdio::null());
        let mut child = KillOnDrop(cmd.spawn().expect("start redis-server"));
        let try_redis = |args: &[&str]| {
            let mut c = Command::new(&cli);
            c.args(["-p", &port.to_string()]).args(args);
            run_command(c)
        };
        let redis = |args: &[&str]| -> String {
            let (status, out, err) = try_redis(args);
            assert!(status.success(), "redis-cli {args:?}: {err}");
            out
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while try_redis(&["ping"]).1.trim() != "PONG" {
            assert!(std::time::Instant::now() < deadline, "redis-server did not answer on port {port}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let pipe = format!("{cli} -p {port} --pipe < {}", load_file.display());
        let (status, _, err) = run_command({
            let mut c = Command::new("/bin/sh");
            c.args(["-c", &pipe]);
            c
        });
        assert!(status.success(), "redis-cli --pipe: {err}");
        let mut out = redis(&["dbsize"]);
        out += &redis(&["debug", "digest"]);
        for k in ["k0", "k777", "k31337", "k149999"] {
            out += &redis(&["get", k]);
        }
        redis(&["shutdown", "nosave"]);
        let status = child.0.wait().expect("wait for redis-server");
        assert!(status.success(), "redis-server ended with {status}");
        let report = uhmm.then(|| serde_json::from_slice(&std::fs::read(&report).expect("report")).expect("JSON"));
        (out, report)
    };
    let base = 17_000 + (std::process::id() % 1000) as u16 * 2;
    let (want, _) = serve(base, false);
    assert!(want.starts_with("150000"), "the plain server did not take the load: {want}");
    let (got, report) = serve(base + 1, true);
    assert_eq!(got, want, "redis-server gave other data under uhmm run");
    let report = report.expect("report");
    assert!(total(&report, "blocks") > 0, "uhmm managed none of redis-server's memory: {report}");
    // The values are small allocations: in uhmm's small-object heap, and
    // most of them were compressed under the budget.
    assert!(total(&report, "heap_bytes") > 200 << 20, "the values were not uhmm's: {report}");
    assert!(total(&report, "demoted_pages") > (100 << 20) / 4096, "the values were not compressed: {report}");
}

#[test]
fn exit_status_and_signals_are_the_programs() {
    library();
    let sh = program("sh");
    let (status, _, _) = run_command({
        let mut c = Command::new(env!("CARGO_BIN_EXE_uhmm"));
        c.args(["run", "-q", "--", &sh, "-c", "exit 7"]);
        c
    });
    assert_eq!(status.code(), Some(7));
    // Killed with SIGKILL while pages of its memory are compressed.
    let py = program("python3");
    let script =
        "import os\nb = bytearray(96 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nos.kill(os.getpid(), 9)";
    let (status, _, err) = run_command({
        let mut c = Command::new(env!("CARGO_BIN_EXE_uhmm"));
        c.args(["run", "--ram-budget", "16M", "--", &py, "-c", script]);
        c
    });
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "uhmm run should end as the program did\n{err}");
    assert!(err.contains("killed by signal 9"), "{err}");
}

const PYTHON_FORK_AND_EXEC: &str = r#"
import hashlib, os, sys
b = bytearray(96 << 20)
for i in range(0, len(b), 4096):
    b[i:i + 8] = i.to_bytes(8, "little")
pid = os.fork()
if pid == 0:
    b[5] = 9
    print("child", hashlib.sha256(b).hexdigest(), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print("parent", hashlib.sha256(b).hexdigest(), flush=True)
sys.stdout.flush()
os.execv(sys.executable, [sys.executable, "-c", "c = bytearray(64 << 20); c[-1] = 3; print('exec', sum(c))"])
"#;

#[test]
fn fork_and_exec() {
    let dir = scratch("fork");
    let py = program("python3");
    let argv = [py.as_str(), "-c", PYTHON_FORK_AND_EXEC];
    let want = plain(&argv);
    let (got, err, report) = under_uhmm(&["--ram-budget", "16M"], &argv, &dir);
    assert_eq!(got, want, "python3's output differs under uhmm run\n{err}");
    // The first image and the exec'd one each report.
    let pids = report["processes"].as_array().map_or(0, Vec::len);
    assert!(pids >= 1, "no process reported: {report}");
    assert_tiered(&report, &err);
}

/// `madvise`, `mprotect`, `mremap` and `munmap` called by the program on
/// a block uhmm manages (through ctypes, as C code would).
const PYTHON_MEMORY_CALLS: &str = r#"
import ctypes, ctypes.util, hashlib
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
for f in (libc.madvise, libc.mprotect, libc.munmap):
    f.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + ([ctypes.c_int] if f is not libc.munmap else [])
MB = 1 << 20
n = 8 * MB
p = libc.mmap(None, n, 3, 0x22, -1, 0)
buf = (ctypes.c_char * n).from_address(p)
for i in range(0, n, 4096):
    buf[i:i + 8] = i.to_bytes(8, "little")
print("madvise", libc.madvise(p + MB, MB, 4))           # MADV_DONTNEED: zeros
print("mprotect", libc.mprotect(p, 2 * MB, 1), libc.mprotect(p, 2 * MB, 3))
print(hashlib.sha256(bytes(buf)).hexdigest())
q = libc.mremap(p, n, 2 * n, 1)                          # MREMAP_MAYMOVE: uhmm detaches first
big = (ctypes.c_char * (2 * n)).from_address(q)
print("mremap", hashlib.sha256(bytes(big[:n])).hexdigest(), bytes(big[n:n + 8]))
print("munmap", libc.munmap(q + n, n), libc.munmap(q, n))
"#;

#[test]
fn memory_calls_on_a_managed_block() {
    let dir = scratch("calls");
    let py = program("python3");
    let argv = [py.as_str(), "-c", PYTHON_MEMORY_CALLS];
    let want = plain(&argv);
    let (got, err, report) = under_uhmm(&["--ram-budget", "4M"], &argv, &dir);
    assert_eq!(got, want, "python3's output differs under uhmm run\n{err}");
    assert_tiered(&report, &err);
    assert!(total(&report, "detached_blocks") >= 1, "mremap did not detach the block: {report}");
}

/// `munmap` and `mremap` made with raw system calls, which the library
/// does not see, on blocks whose pages sit compressed: uhmm sees them
/// through userfaultfd's events, gives the unmapped pages up and follows
/// the moved ones; new memory that takes the old addresses is the
/// program's.
const PYTHON_RAW_SYSCALLS: &str = r#"
import ctypes, hashlib
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.syscall.restype = ctypes.c_long
SYS_munmap, SYS_mremap = 11, 25
MB = 1 << 20
n = 16 * MB
def new(seed):
    p = libc.mmap(None, n, 3, 0x22, -1, 0)
    buf = (ctypes.c_char * n).from_address(p)
    for i in range(0, n, 4096):
        buf[i:i + 8] = (i ^ seed).to_bytes(8, "little")
    return p
def digest(p, length):
    return hashlib.sha256(bytes((ctypes.c_char * length).from_address(p))).hexdigest()
a = new(1)
b = new(2)
c = new(3)                      # a's pages are compressed by now
want_b = digest(b, n)
print("a", digest(a, n))
print("munmap a", libc.syscall(ctypes.c_long(SYS_munmap), ctypes.c_void_p(a), ctypes.c_size_t(n)))
d = new(4)                      # may take a's addresses
print("d", digest(d, n), "c", digest(c, n))
t = libc.mmap(None, 2 * n, 0, 0x22, -1, 0)  # a PROT_NONE place to move to (the kernel's, not uhmm's)
b2 = libc.syscall(ctypes.c_long(SYS_mremap), ctypes.c_void_p(b), ctypes.c_size_t(n), ctypes.c_size_t(2 * n), ctypes.c_long(3), ctypes.c_void_p(t))
print("mremap b", digest(b2, n) == want_b, digest(b2 + n, n))
print("munmap b", libc.syscall(ctypes.c_long(SYS_munmap), ctypes.c_void_p(b2), ctypes.c_size_t(2 * n)))
print("munmap part of c", libc.syscall(ctypes.c_long(SYS_munmap), ctypes.c_void_p(c + 4 * MB), ctypes.c_size_t(4 * MB)))
print("c", digest(c, 4 * MB), digest(c + 8 * MB, 8 * MB))
e = new(5)
print("e", digest(e, n), "d", digest(d, n))
"#;

#[test]
fn raw_munmap_and_mremap_behind_the_library() {
    let dir = scratch("raw");
    let py = program("python3");
    let argv = [py.as_str(), "-c", PYTHON_RAW_SYSCALLS];
    let want = plain(&argv);
    let (got, err, report) = under_uhmm(&["--ram-budget", "8M"], &argv, &dir);
    assert_eq!(got, want, "python3's output differs under uhmm run\n{err}");
    assert_tiered(&report, &err);
    assert!(total(&report, "foreign_unmapped_pages") >= (16 << 20) / 4096, "raw munmaps not seen: {report}");
    assert!(total(&report, "regions_followed") >= 1, "the raw mremap was not followed: {report}");
}

#[test]
fn refuses_without_full_userfaultfd() {
    // As an unprivileged user, on a machine that does not give one full
    // userfaultfd, `uhmm run` refuses before the program starts.
    assert!(rustix::process::geteuid().is_root(), "this test needs root (to become another user)");
    let setpriv = program("setpriv");
    // Copies of the binary and the library the other user may run.
    let dir = scratch("refuse");
    let uhmm = dir.join("uhmm");
    std::fs::copy(env!("CARGO_BIN_EXE_uhmm"), &uhmm).expect("copy uhmm");
    std::fs::copy(library(), dir.join("libuhmm_preload.so")).expect("copy the library");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let as_nobody = |argv: &[&str]| {
        let mut c = Command::new(&setpriv);
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).args(argv);
        run_command(c)
    };
    let (status, _, err) = as_nobody(&[uhmm.to_str().expect("utf-8 path"), "run", "--", "/bin/true"]);
    let unpriv = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    let dev_open = as_nobody(&["/usr/bin/test", "-r", "/dev/userfaultfd", "-a", "-w", "/dev/userfaultfd"]).0.success();
    if unpriv.trim() == "1" || dev_open {
        assert!(status.success(), "full userfaultfd is available to the user, yet: {err}");
    } else {
        assert_eq!(status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains("/dev/userfaultfd") && err.contains("vm.unprivileged_userfaultfd"), "{err}");
    }
}
