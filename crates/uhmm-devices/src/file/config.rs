//! The file store's settings ([`FileConfig`], [`FileLocation`],
//! [`DirectIo`]) and counters ([`FileStats`]).

use std::path::PathBuf;

use uhmm::{Error, PAGE_SIZE, Result};

/// The directory of a private file when none is named: on disk, unlike
/// `/tmp` on many systems (a tmpfs in RAM would defeat the purpose).
pub const DEFAULT_DIR: &str = "/var/tmp";

/// The most pages [`FileConfig::fault_pages`] may ask for.
pub const MAX_FAULT_PAGES: usize = 512;

/// The most pages [`FileConfig::readahead_pages`] may ask for (64 MiB).
pub const MAX_READAHEAD_PAGES: usize = 16384;

/// Where a [`FileStore`](super::FileStore) keeps its file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FileLocation {
    /// A private file in [`DEFAULT_DIR`], or in `std::env::temp_dir()`
    /// where that cannot be used.
    #[default]
    Default,
    /// A private file in this directory: made with `O_TMPFILE` (or created
    /// and unlinked at once), so no other process can open it, and its
    /// space goes back when the store is dropped or the process dies.
    PrivateIn(PathBuf),
    /// This file, which the user can see (and `du`). Created if missing,
    /// emptied if it exists (it must be a regular file); at drop a file the
    /// store created is removed, and one that existed is emptied and kept,
    /// so no page of the process is left on disk either way. Its pages are
    /// as readable as the file's permissions make them (a file the store
    /// creates is mode 0600).
    Named(PathBuf),
}

impl FileLocation {
    /// What `file:PATH` means: a private file in `path` when it is a
    /// directory, else the file `path`.
    pub fn from_path(path: impl Into<PathBuf>) -> FileLocation {
        let path = path.into();
        if path.is_dir() { FileLocation::PrivateIn(path) } else { FileLocation::Named(path) }
    }
}

/// Whether a [`FileStore`](super::FileStore) bypasses the page cache (`O_DIRECT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectIo {
    /// `O_DIRECT` where the file system takes it, else buffered I/O
    /// ([`FileStats::direct`] says which).
    #[default]
    Auto,
    /// `O_DIRECT`, or the store is not made.
    On,
    /// Buffered I/O through the page cache.
    Off,
}

/// Settings of a [`FileStore`](super::FileStore); each field's doc gives its default.
#[derive(Debug, Clone)]
pub struct FileConfig {
    /// Where the file is. Default: [`FileLocation::Default`].
    pub location: FileLocation,
    /// The most bytes of pages the file may hold (its length never passes
    /// it, rounded down to pages); a page that does not fit stays where it
    /// was. Default: 64 GiB.
    pub capacity_bytes: u64,
    /// `O_DIRECT` or not. Default: [`DirectIo::Auto`].
    pub direct: DirectIo,
    /// Pages a fault outside a scan brings back, aligned by address:
    /// 1 to [`MAX_FAULT_PAGES`]. Default: 8 (32 KiB, swap's readahead of
    /// `page-cluster` 3): a read of neighbouring slots costs little more
    /// than one of a page.
    pub fault_pages: usize,
    /// io_uring rings, each used by one caller at a time: more lets more
    /// callers (migration workers, fault handlers) have one; a caller that
    /// finds all busy uses `pread`/`pwrite`. 0: no io_uring. At most 64.
    /// Default: 4.
    pub rings: usize,
    /// Submission entries of each ring: 1 to 4096. Default: 64.
    pub ring_entries: u32,
    /// Pages read ahead of a sequential scan at most (the buffers' RAM),
    /// by a thread of the store's own: 0 (off) to [`MAX_READAHEAD_PAGES`].
    /// Default: 1024 (4 MiB).
    pub readahead_pages: usize,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            location: FileLocation::Default,
            capacity_bytes: 64 << 30,
            direct: DirectIo::Auto,
            fault_pages: 8,
            rings: 4,
            ring_entries: 64,
            readahead_pages: 1024,
        }
    }
}

impl FileConfig {
    /// Checks the fields; the error names the field at fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::invalid(format!("FileConfig: {what}")));
        if self.capacity_bytes < PAGE_SIZE as u64 {
            return bad(format!("capacity_bytes ({}) must be at least a page", self.capacity_bytes));
        }
        if !(1..=MAX_FAULT_PAGES).contains(&self.fault_pages) {
            return bad(format!("fault_pages ({}) must be within 1..={MAX_FAULT_PAGES}", self.fault_pages));
        }
        if self.rings > 64 {
            return bad(format!("rings ({}) must be at most 64", self.rings));
        }
        if self.rings > 0 && !(1..=4096).contains(&self.ring_entries) {
            return bad(format!("ring_entries ({}) must be within 1..=4096", self.ring_entries));
        }
        if self.readahead_pages > MAX_READAHEAD_PAGES {
            return bad(format!("readahead_pages ({}) must be at most {MAX_READAHEAD_PAGES}", self.readahead_pages));
        }
        match &self.location {
            FileLocation::PrivateIn(p) | FileLocation::Named(p) if p.as_os_str().is_empty() => {
                bad("the file's path is empty".into())
            }
            _ => Ok(()),
        }
    }
}

/// The counters of a [`FileStore`](super::FileStore).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileStats {
    /// Pages stored (zero pages included).
    pub pages: u64,
    /// Of them, pages of zeros, which take no slot.
    pub zero_pages: u64,
    /// Bytes of the file's slots holding pages.
    pub used_bytes: u64,
    /// The file's length in use: up to the last slot holding a page.
    pub file_bytes: u64,
    /// Free slots below that length (reused before the file grows).
    pub hole_bytes: u64,
    /// The most the file may hold.
    pub capacity_bytes: u64,
    /// Pages written, in all.
    pub pages_written: u64,
    /// Writes issued (one per extent).
    pub writes: u64,
    /// Pages read back, in all.
    pub pages_read: u64,
    /// Reads issued (one per extent of a get).
    pub reads: u64,
    /// Pages reported lost: their read failed or came back short.
    pub lost_pages: u64,
    /// Pages not stored because the file was full.
    pub full_pages: u64,
    /// Pages not stored because their write failed.
    pub write_error_pages: u64,
    /// The file is open with `O_DIRECT`.
    pub direct: bool,
    /// Reads and writes go through io_uring.
    pub uring: bool,
    /// Pages read ahead of sequential scans.
    pub readahead_pages_read: u64,
    /// Pages of gets served from the readahead (counted in `pages_read`
    /// too, not in `reads`).
    pub readahead_hits: u64,
    /// Bytes of RAM the readahead's buffers hold now.
    pub readahead_buffer_bytes: u64,
}
