//! The error type of the public API: a kind a caller can match on, the errno
//! a kernel user would expect for it, and a message saying what was wrong.

use std::borrow::Cow;

/// The result type of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in the kernel's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A bad argument: empty or unaligned range, unmanaged address, a range
    /// crossing regions (`EINVAL`).
    InvalidArgument,
    /// The memory cannot be accessed at all (`EFAULT`).
    Fault,
    /// The access is not allowed, e.g. a write to read-only memory (`EPERM`).
    Permission,
    /// Nothing to act on, e.g. no page was collected (`ENOENT`).
    NotFound,
    /// A page is locked or pinned by someone else (`EBUSY`).
    Busy,
    /// Out of device or staging memory (`ENOMEM`).
    NoMemory,
    /// The kernel or the configuration lacks a needed feature (`EOPNOTSUPP`),
    /// including a missing userfaultfd permission.
    Unsupported,
    /// A system call failed unexpectedly; the errno is the kernel's.
    Sys,
}

/// The error of every fallible uhmm call.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?}: {msg}")]
pub struct Error {
    kind: ErrorKind,
    msg: Cow<'static, str>,
    errno: Option<i32>,
}

impl Error {
    /// A new error of `kind`.
    pub fn new(kind: ErrorKind, msg: impl Into<Cow<'static, str>>) -> Error {
        Error { kind, msg: msg.into(), errno: None }
    }

    /// An invalid-argument error.
    pub fn invalid(msg: impl Into<Cow<'static, str>>) -> Error {
        Error::new(ErrorKind::InvalidArgument, msg)
    }

    /// A failed system call `op`.
    pub fn sys(op: &'static str, err: impl Into<std::io::Error>) -> Error {
        let err = err.into();
        let errno = err.raw_os_error();
        let kind = match errno {
            Some(libc_enomem) if libc_enomem == rustix::io::Errno::NOMEM.raw_os_error() => ErrorKind::NoMemory,
            _ => ErrorKind::Sys,
        };
        Error { kind, msg: format!("{op}: {err}").into(), errno }
    }

    /// The kind, to match on.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The errno a kernel user would get for this error.
    pub fn errno(&self) -> i32 {
        use rustix::io::Errno;
        if let Some(e) = self.errno {
            return e;
        }
        match self.kind {
            ErrorKind::InvalidArgument => Errno::INVAL,
            ErrorKind::Fault => Errno::FAULT,
            ErrorKind::Permission => Errno::PERM,
            ErrorKind::NotFound => Errno::NOENT,
            ErrorKind::Busy => Errno::BUSY,
            ErrorKind::NoMemory => Errno::NOMEM,
            ErrorKind::Unsupported => Errno::OPNOTSUPP,
            ErrorKind::Sys => Errno::IO,
        }
        .raw_os_error()
    }
}
