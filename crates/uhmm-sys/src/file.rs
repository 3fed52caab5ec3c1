//! The files a page store keeps pages in: a private file (`O_TMPFILE`, or
//! created and unlinked at once) or a named one, opened with `O_DIRECT` on
//! request. No unsafe here: the flags are what `std::fs::OpenOptions`
//! does not name.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Options shared by every open: read and write, mode 0600, `O_DIRECT`
/// when asked, close-on-exec (std's default).
fn options(direct: bool) -> OpenOptions {
    let mut o = OpenOptions::new();
    o.read(true).write(true).mode(0o600);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o
}

/// A file no other process can open, in `dir`: `O_TMPFILE` where the file
/// system has it, else a new file of a unique name unlinked at once. Its
/// space goes back when it is closed. An `O_DIRECT` open the file system
/// refuses fails with `EINVAL`.
pub fn open_private(dir: &Path, direct: bool) -> io::Result<File> {
    match options(direct).custom_flags(libc::O_TMPFILE | if direct { libc::O_DIRECT } else { 0 }).open(dir) {
        Ok(f) => return Ok(f),
        // The file system has no O_TMPFILE (EOPNOTSUPP; EISDIR from kernels
        // that do not know the flag).
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {}
        Err(e) => return Err(e),
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    for _ in 0..100 {
        let name = format!(".uhmm-store-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = dir.join(name);
        match options(direct).create_new(true).open(&path) {
            Ok(f) => {
                std::fs::remove_file(&path)?;
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, "no free name for a private file"))
}

/// Whether an open failed because the file system does not take
/// `O_DIRECT` (`EINVAL`): open it buffered instead.
pub fn is_direct_refused(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// The file at `path`, emptied: created (then `created` is true) or, if
/// it is a regular file, truncated to nothing. Anything else there (a
/// directory, a device) is refused with `InvalidInput`.
pub fn open_named(path: &Path, direct: bool) -> io::Result<(File, bool)> {
    match options(direct).create_new(true).open(path) {
        Ok(f) => return Ok((f, true)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    if !std::fs::metadata(path)?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    let f = options(direct).open(path)?;
    // Checked again on what was opened: the name may have changed hands.
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    f.set_len(0)?;
    Ok((f, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_private_file_has_no_name_and_a_named_one_is_emptied() {
        crate::with_timeout(60, || {
            let dir = std::env::temp_dir();
            let f = open_private(&dir, false).unwrap();
            assert_eq!(f.metadata().unwrap().nlink(), 0, "nobody can open it by name");
            assert_eq!(f.metadata().unwrap().mode() & 0o777, 0o600);

            let path = dir.join(format!("uhmm-file-test-{}", std::process::id()));
            std::fs::write(&path, b"old contents").unwrap();
            let (f, created) = open_named(&path, false).unwrap();
            assert!(!created);
            assert_eq!(f.metadata().unwrap().len(), 0);
            std::fs::remove_file(&path).unwrap();
            let (_f, created) = open_named(&path, false).unwrap();
            assert!(created);
            std::fs::remove_file(&path).unwrap();
            assert_eq!(open_named(&dir, false).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        });
    }
}
