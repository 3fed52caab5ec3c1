//! Batched file reads and writes: an io_uring ([`Ring`]) that runs a batch
//! of positioned reads and writes and waits for all of them, the same
//! batch run with plain `pread`/`pwrite` where io_uring is not to be had
//! ([`run_blocking`]), and the page-aligned buffers `O_DIRECT` needs
//! ([`AlignedBuf`]).
//!
//! The ring is the `io-uring` crate's; what is argued here is the one
//! unsafe step it leaves to its user: the kernel reads or writes a
//! submitted buffer until the operation's completion is reaped, so
//! [`Ring::run`] does not return before every operation it submitted has
//! completed, on its error paths too.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{IoUring, opcode, types};

use crate::PAGE_SIZE;

/// One positioned operation of a batch.
#[derive(Debug)]
pub enum Op<'a> {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read {
        /// The file offset.
        offset: u64,
        /// Where the bytes go.
        buf: &'a mut [u8],
    },
    /// Write `buf` at `offset`.
    Write {
        /// The file offset.
        offset: u64,
        /// The bytes.
        buf: &'a [u8],
    },
}

impl Op<'_> {
    /// The bytes it moves.
    pub fn len(&self) -> usize {
        match self {
            Op::Read { buf, .. } => buf.len(),
            Op::Write { buf, .. } => buf.len(),
        }
    }

    /// Whether it moves no byte.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The most bytes one submission asks for (the rest is a short transfer,
/// resubmitted).
const MAX_SUBMIT: usize = 1 << 30;

/// Times an operation is resubmitted after `EINTR` or `EAGAIN` before that
/// error is its result.
const MAX_RETRIES: u32 = 1000;

/// An io_uring for batches of reads and writes on one file at a time.
///
/// It is used by one caller at a time (`run` takes `&mut self`); a store
/// with several concurrent callers keeps a few.
pub struct Ring {
    ring: IoUring,
    /// A wait for completions failed while none was in flight: entries may
    /// be left in the submission queue, naming buffers since returned. The
    /// ring is never entered again.
    broken: bool,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("entries", &self.entries()).field("broken", &self.broken).finish()
    }
}

impl Ring {
    /// `io_uring_setup` with `entries` submission entries (rounded up to a
    /// power of two by the kernel). Fails where io_uring is disabled
    /// (`ENOSYS`, `EPERM`: a seccomp filter, `kernel.io_uring_disabled`).
    pub fn new(entries: u32) -> io::Result<Ring> {
        // SUBMIT_ALL (5.18): an entry that fails to prepare does not stop
        // the ones after it. Older kernels refuse the flag.
        let ring = match IoUring::builder().setup_submit_all().build(entries) {
            Ok(ring) => ring,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(entries)?,
            Err(e) => return Err(e),
        };
        Ok(Ring { ring, broken: false })
    }

    /// Its submission entries.
    pub fn entries(&self) -> usize {
        self.ring.params().sq_entries() as usize
    }

    /// Whether an earlier failure left it unusable (every `run` fails).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Runs `ops` on `fd` and waits for all of them: each operation's
    /// result, in order. Short transfers are resubmitted for their rest;
    /// `EINTR` and `EAGAIN` are retried; a read that meets the end of the
    /// file is `UnexpectedEof`, a write that writes nothing `WriteZero`.
    /// At most [`entries`](Ring::entries) operations are in flight at once.
    pub fn run(&mut self, fd: BorrowedFd<'_>, ops: &mut [Op<'_>]) -> Vec<io::Result<()>> {
        let n = ops.len();
        if self.broken {
            return (0..n).map(|_| Err(io::Error::other("io_uring unusable after an earlier failure"))).collect();
        }
        let mut results: Vec<Option<io::Result<()>>> = (0..n).map(|_| None).collect();
        let mut done = vec![0usize; n];
        let mut retries = vec![0u32; n];
        let mut queue: VecDeque<usize> = VecDeque::with_capacity(n);
        for (i, op) in ops.iter().enumerate() {
            if op.is_empty() {
                results[i] = Some(Ok(()));
            } else {
                queue.push_back(i);
            }
        }
        let cap = self.entries();
        // Entries handed to the kernel whose completion is not reaped yet.
        let mut in_flight = 0usize;
        let mut stalls = 0u32;
        loop {
            while in_flight + self.ring.submission().len() < cap
                && let Some(i) = queue.pop_front()
            {
                let entry = prepare(fd, &mut ops[i], done[i]).user_data(i as u64);
                // SAFETY: the entry names bytes of `ops[i]`'s buffer (from
                // `done[i]`, within its length), which `ops` borrows
                // exclusively for this whole call. The kernel uses them until
                // the entry's completion is reaped, and this function does
                // not return while an entry is in flight: the loop ends only
                // with none in flight (and none queued, or the ring broken),
                // and the wait below aborts the process rather than return
                // with one in flight. An entry left unsubmitted in the queue
                // on the broken path is never submitted: `run` refuses a
                // broken ring, and dropping it closes it.
                if unsafe { self.ring.submission().push(&entry) }.is_err() {
                    queue.push_front(i);
                    break;
                }
            }
            let queued = self.ring.submission().len();
            if in_flight + queued == 0 {
                break;
            }
            let waited = self.ring.submit_and_wait(1);
            in_flight += queued - self.ring.submission().len();
            match waited {
                Ok(_) => stalls = 0,
                Err(e) if in_flight == 0 && retryable(&e) && stalls < MAX_RETRIES => {
                    stalls += 1;
                    std::thread::yield_now();
                }
                Err(e) if in_flight == 0 && (!retryable(&e) || stalls >= MAX_RETRIES) => {
                    // Nothing in flight and nothing goes in: the entries
                    // left queued are never submitted (see the push).
                    self.broken = true;
                    for r in results.iter_mut().filter(|r| r.is_none()) {
                        *r = Some(Err(io::Error::new(e.kind(), format!("io_uring_enter: {e}"))));
                    }
                    break;
                }
                Err(e) => {
                    stalls += 1;
                    if stalls > MAX_RETRIES {
                        // The kernel still owns buffers of the caller, and
                        // returning would hand them back while it uses them.
                        tracing::error!(%e, in_flight, "io_uring: cannot wait for the operations in flight");
                        std::process::abort();
                    }
                    if retryable(&e) {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
            for cqe in self.ring.completion() {
                in_flight -= 1;
                let i = cqe.user_data() as usize;
                let res = cqe.result();
                let is_read = matches!(ops[i], Op::Read { .. });
                if res < 0 {
                    let e = io::Error::from_raw_os_error(-res);
                    if retryable(&e) && retries[i] < MAX_RETRIES {
                        retries[i] += 1;
                        queue.push_back(i);
                    } else {
                        results[i] = Some(Err(e));
                    }
                } else if res == 0 {
                    results[i] = Some(Err(if is_read {
                        io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the file")
                    } else {
                        io::Error::new(io::ErrorKind::WriteZero, "write wrote nothing")
                    }));
                } else {
                    done[i] += res as usize;
                    if done[i] >= ops[i].len() {
                        results[i] = Some(Ok(()));
                    } else {
                        queue.push_back(i);
                    }
                }
            }
        }
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(io::Error::other("operation not run")))).collect()
    }
}

/// The submission entry for the rest of `op` past its first `done` bytes.
fn prepare(fd: BorrowedFd<'_>, op: &mut Op<'_>, done: usize) -> io_uring::squeue::Entry {
    let fd = types::Fd(fd.as_raw_fd());
    match op {
        Op::Read { offset, buf } => {
            let rest = &mut buf[done..];
            let len = rest.len().min(MAX_SUBMIT) as u32;
            opcode::Read::new(fd, rest.as_mut_ptr(), len).offset(*offset + done as u64).build()
        }
        Op::Write { offset, buf } => {
            let rest = &buf[done..];
            let len = rest.len().min(MAX_SUBMIT) as u32;
            opcode::Write::new(fd, rest.as_ptr(), len).offset(*offset + done as u64).build()
        }
    }
}

/// Whether a direct read or write failed for its buffer (`EFAULT`: memory
/// the kernel will not take for I/O; `EINVAL`: not aligned as the file
/// system asks): worth doing again through an [`AlignedBuf`].
pub fn is_buffer_refused(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EFAULT | libc::EINVAL))
}

fn retryable(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY))
}

/// Runs `ops` one after the other with `pread`/`pwrite`, with
/// [`Ring::run`]'s results: the fallback where io_uring is disabled, and
/// for a caller that must not wait for a ring.
pub fn run_blocking(fd: BorrowedFd<'_>, ops: &mut [Op<'_>]) -> Vec<io::Result<()>> {
    ops.iter_mut()
        .map(|op| {
            let len = op.len();
            let mut done = 0;
            let mut retries = 0;
            while done < len {
                let step = match op {
                    Op::Read { offset, buf } => rustix::io::pread(fd, &mut buf[done..], *offset + done as u64),
                    Op::Write { offset, buf } => rustix::io::pwrite(fd, &buf[done..], *offset + done as u64),
                };
                match step {
                    Ok(0) => {
                        return Err(match op {
                            Op::Read { .. } => {
                                io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the file")
                            }
                            Op::Write { .. } => io::Error::new(io::ErrorKind::WriteZero, "write wrote nothing"),
                        });
                    }
                    Ok(k) => done += k,
                    Err(e)
                        if matches!(e, rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) && retries < MAX_RETRIES =>
                    {
                        retries += 1
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })
        .collect()
}

/// One page of an [`AlignedBuf`]: the alignment `O_DIRECT` asks of buffers.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct AlignedPage([u8; PAGE_SIZE]);

/// A zeroed buffer of whole pages, aligned to a page: what `O_DIRECT`
/// reads and writes need.
#[derive(Clone)]
pub struct AlignedBuf {
    pages: Vec<AlignedPage>,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len()).finish()
    }
}

impl AlignedBuf {
    /// `npages` zeroed pages.
    pub fn zeroed(npages: usize) -> AlignedBuf {
        AlignedBuf { pages: vec![AlignedPage([0; PAGE_SIZE]); npages] }
    }

    /// Makes it at least `npages` pages long (new pages zeroed).
    pub fn ensure(&mut self, npages: usize) {
        if self.pages.len() < npages {
            self.pages.resize(npages, AlignedPage([0; PAGE_SIZE]));
        }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.pages.len() * PAGE_SIZE
    }

    /// Whether it has no page.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

/// [`AlignedBuf`]s kept for reuse, so that a batch does not allocate (and
/// fault in) its buffer again: at most `max_bufs` of them, each of at most
/// `max_pages` pages (a larger one is freed when given back).
#[derive(Debug)]
pub struct AlignedBufPool {
    bufs: std::sync::Mutex<Vec<AlignedBuf>>,
    max_bufs: usize,
    max_pages: usize,
}

impl AlignedBufPool {
    /// An empty pool.
    pub fn new(max_bufs: usize, max_pages: usize) -> AlignedBufPool {
        AlignedBufPool { bufs: std::sync::Mutex::default(), max_bufs, max_pages }
    }

    /// A buffer of at least `npages` pages: a kept one where there is one.
    pub fn take(&self, npages: usize) -> AlignedBuf {
        let kept = self.bufs.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut buf = kept.unwrap_or_else(|| AlignedBuf::zeroed(0));
        buf.ensure(npages);
        buf
    }

    /// Keeps `buf` for a later [`take`](Self::take), if there is room.
    pub fn give(&self, buf: AlignedBuf) {
        if buf.len() <= self.max_pages * PAGE_SIZE {
            let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
            if bufs.len() < self.max_bufs {
                bufs.push(buf);
            }
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `AlignedPage` is `repr(C)` around `[u8; PAGE_SIZE]` with
        // no padding (its size is its alignment), so the vector's pages are
        // `len()` initialized, contiguous bytes, borrowed with `self`.
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), self.len()) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        // SAFETY: as in `deref`, borrowed exclusively with `self`.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast::<u8>(), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    fn temp_file() -> std::fs::File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("uhmm-uring-test-{}-{:?}", std::process::id(), std::thread::current().id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    /// A way to run a batch: a ring's or `run_blocking`.
    type Runner = Box<dyn FnMut(BorrowedFd<'_>, &mut [Op<'_>]) -> Vec<io::Result<()>>>;

    /// `run_blocking`, and a ring of 8 entries where io_uring is enabled.
    fn runners() -> Vec<Runner> {
        let mut runs: Vec<Runner> = vec![Box::new(run_blocking)];
        match Ring::new(8) {
            Ok(mut ring) => runs.push(Box::new(move |fd, ops| ring.run(fd, ops))),
            Err(e) => eprintln!("io_uring not available here ({e}): ring tests skipped"),
        }
        runs
    }

    #[test]
    fn aligned_buffers_are_page_aligned_and_zeroed() {
        let mut b = AlignedBuf::zeroed(3);
        assert_eq!(b.len(), 3 * PAGE_SIZE);
        assert_eq!(b.as_ptr() as usize % PAGE_SIZE, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[PAGE_SIZE] = 7;
        b.ensure(5);
        assert_eq!(b.len(), 5 * PAGE_SIZE);
        assert_eq!(b.as_ptr() as usize % PAGE_SIZE, 0);
        assert_eq!(b[PAGE_SIZE], 7);
    }

    /// More operations than the ring has entries, writes then reads back.
    fn round_trip(run: &mut Runner) {
        let f = temp_file();
        let data: Vec<u8> = (0..40 * PAGE_SIZE).map(|i| (i * 7 + i / PAGE_SIZE) as u8).collect();
        let mut ops: Vec<Op<'_>> = data
            .chunks(PAGE_SIZE)
            .enumerate()
            .map(|(k, c)| Op::Write { offset: (39 - k) as u64 * PAGE_SIZE as u64, buf: c })
            .collect();
        assert!(run(f.as_fd(), &mut ops).iter().all(|r| r.is_ok()));
        let mut back = vec![0u8; data.len()];
        let mut ops: Vec<Op<'_>> = back
            .chunks_mut(PAGE_SIZE)
            .enumerate()
            .map(|(k, c)| Op::Read { offset: (39 - k) as u64 * PAGE_SIZE as u64, buf: c })
            .collect();
        assert!(run(f.as_fd(), &mut ops).iter().all(|r| r.is_ok()));
        assert!(back == data);
    }

    #[test]
    fn a_batch_larger_than_the_ring_round_trips() {
        crate::with_timeout(60, || {
            for mut run in runners() {
                round_trip(&mut run);
            }
        });
    }

    #[test]
    fn a_read_past_the_end_is_unexpected_eof_and_the_others_succeed() {
        crate::with_timeout(60, || {
            let mut f = temp_file();
            f.write_all(&[5u8; 2 * PAGE_SIZE]).unwrap();
            for run in &mut runners() {
                let (mut a, mut b, mut c) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
                let mut ops = vec![
                    Op::Read { offset: 0, buf: &mut a },
                    Op::Read { offset: 5 * PAGE_SIZE as u64, buf: &mut b },
                    // Half of it is there: a short read, then the end.
                    Op::Read { offset: (PAGE_SIZE + PAGE_SIZE / 2) as u64, buf: &mut c },
                ];
                let res = run(f.as_fd(), &mut ops);
                assert!(res[0].is_ok());
                assert_eq!(res[1].as_ref().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
                assert_eq!(res[2].as_ref().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
                assert!(a.iter().all(|&x| x == 5));
            }
        });
    }

    #[test]
    fn a_write_to_a_read_only_file_fails_each_operation() {
        crate::with_timeout(60, || {
            let f = temp_file();
            let path = format!("/proc/self/fd/{}", f.as_raw_fd());
            let ro = std::fs::File::open(path).unwrap();
            let page = vec![1u8; PAGE_SIZE];
            for run in &mut runners() {
                let mut ops = vec![Op::Write { offset: 0, buf: &page }, Op::Write { offset: 4096, buf: &page }];
                let res = run(ro.as_fd(), &mut ops);
                assert!(res.iter().all(|r| r.as_ref().unwrap_err().raw_os_error() == Some(libc::EBADF)), "{res:?}");
            }
        });
    }
}
