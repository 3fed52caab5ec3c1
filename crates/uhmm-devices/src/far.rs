//! Far memory by address: the forms a user names a store outside the
//! process's RAM by (`file:PATH`, `redis://HOST:PORT`, `rediss://…`,
//! `redis-cluster://H1:P1,H2:P2,…`, and `compress[:SIZE]+ADDRESS`, the
//! compressed store in RAM written back to one of those), and
//! [`FarStore`], such a store opened behind a [`SealedStore`], so that
//! every page leaving the process is encrypted and authenticated.

use std::path::PathBuf;
use std::sync::Arc;

use uhmm::{Error, Result};

use crate::compress::{CompressConfig, CompressStats, CompressStore};
use crate::file::{FileConfig, FileLocation, FileStats, FileStore};
use crate::remote::{RedisConfig, RedisStats, RedisStore};
use crate::store::{PageStore, SealStats, SealedStore, StoreUsage, WritebackStats, WritebackStore, random_id};

/// Where far pages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FarAddress {
    /// `file:PATH`: a file (a directory: a private file in it).
    File(PathBuf),
    /// A Redis or Valkey server or cluster, by its URL (`redis://`,
    /// `rediss://`, `redis-cluster://`, `rediss-cluster://`).
    Redis(String),
    /// `compress[:SIZE]+ADDRESS`: the compressed store in RAM, its pool at
    /// most `ram_bytes` (SIZE with a K, M or G suffix; by default a fifth of
    /// the machine's RAM, as zswap's pool), written back to the file or
    /// Redis store at ADDRESS when it fills, as zswap writes back to swap
    /// ([`WritebackStore`]).
    Writeback {
        /// The most RAM the compressed pool may use.
        ram_bytes: usize,
        /// Where its pages are written back (a file or Redis address).
        below: Box<FarAddress>,
    },
}

impl FarAddress {
    /// Reads an address; anything else is an invalid argument that lists
    /// the forms.
    pub fn parse(s: &str) -> Result<FarAddress> {
        if let Some(rest) = s.strip_prefix("compress") {
            let (size, below) = rest.split_once('+').ok_or_else(|| {
                Error::invalid(format!("{s:?}: compress[:SIZE]+ADDRESS, say compress:1G+file:/var/tmp"))
            })?;
            let ram_bytes = match size {
                "" => default_pool_bytes(),
                _ => {
                    size.strip_prefix(':').and_then(parse_size).filter(|&n| n >= uhmm::PAGE_SIZE).ok_or_else(|| {
                        Error::invalid(format!(
                            "{s:?}: the pool size is a number of bytes with K, M or G, a page at least"
                        ))
                    })?
                }
            };
            let below = match FarAddress::parse(below)? {
                FarAddress::Writeback { .. } => return Err(Error::invalid(format!("{s:?}: one compress+ at most"))),
                far => Box::new(far),
            };
            return Ok(FarAddress::Writeback { ram_bytes, below });
        }
        if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err(Error::invalid("file: needs a path (file:/var/tmp, file:/mnt/ssd/pages)"));
            }
            return Ok(FarAddress::File(PathBuf::from(path)));
        }
        if ["redis://", "rediss://", "redis-cluster://", "rediss-cluster://"].iter().any(|p| s.starts_with(p)) {
            RedisConfig::from_url(s)?;
            return Ok(FarAddress::Redis(s.to_owned()));
        }
        Err(Error::invalid(format!(
            "{s:?} is not a far store: file:PATH, redis://[USER:PASSWORD@]HOST:PORT, rediss://…, \
             redis-cluster://HOST:PORT[,HOST:PORT…], rediss-cluster://…, or compress[:SIZE]+ one of those"
        )))
    }

    /// Opens the store with its defaults, sealed under a new key; keys on
    /// a remote store are named under a new random namespace, and every
    /// node must answer `PING` now.
    pub fn open(&self) -> Result<FarStore> {
        let backend = match self {
            FarAddress::Writeback { ram_bytes, below } => {
                let mut far = below.open()?;
                let config = CompressConfig { capacity_bytes: *ram_bytes, ..CompressConfig::default() };
                let ram = CompressStore::new(config)?;
                far.writeback = Some(Arc::new(WritebackStore::new(ram, far.sealed.clone())));
                far.address = self.clone();
                return Ok(far);
            }
            FarAddress::File(path) => {
                let config = FileConfig { location: FileLocation::from_path(path.clone()), ..FileConfig::default() };
                Backend::File(Arc::new(FileStore::new(config)?))
            }
            FarAddress::Redis(url) => {
                let config = RedisConfig { namespace: random_id(8)?, ..RedisConfig::from_url(url)? };
                let store = RedisStore::new(config)?;
                // A server that does not answer now is an error now, not
                // a device that keeps every page in RAM.
                store.ping()?;
                Backend::Redis(Arc::new(store))
            }
        };
        let inner: Arc<dyn PageStore> = match &backend {
            Backend::File(s) => s.clone(),
            Backend::Redis(s) => s.clone(),
        };
        Ok(FarStore { address: self.clone(), backend, sealed: Arc::new(SealedStore::new(inner)?), writeback: None })
    }
}

/// `"64M"`, `"1G"`, `"4096"`: bytes.
fn parse_size(s: &str) -> Option<usize> {
    let (digits, shift) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 10),
        (i, 'M' | 'm') => (&s[..i], 20),
        (i, 'G' | 'g') => (&s[..i], 30),
        _ => (s, 0),
    };
    digits.parse::<usize>().ok()?.checked_mul(1 << shift)
}

/// A fifth of the machine's RAM (`MemTotal`), as zswap's default pool;
/// 1 GiB where that cannot be read.
fn default_pool_bytes() -> usize {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<usize>().ok());
    total_kib.map_or(1 << 30, |k| k * 1024 / 5)
}

/// `bytes` as a size [`parse_size`] reads back.
fn size_text(bytes: usize) -> String {
    match bytes {
        b if b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b if b % (1 << 10) == 0 => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

impl std::fmt::Display for FarAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FarAddress::File(p) => write!(f, "file:{}", p.display()),
            FarAddress::Redis(url) => f.write_str(&redact(url)),
            FarAddress::Writeback { ram_bytes, below } => write!(f, "compress:{}+{below}", size_text(*ram_bytes)),
        }
    }
}

/// `url` with its password (if any) left out.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    match rest.split_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(u, _)| u);
            format!("{scheme}://{user}:…@{host}")
        }
        None => url.to_owned(),
    }
}

/// A far store, open and sealed.
#[derive(Debug, Clone)]
pub struct FarStore {
    address: FarAddress,
    backend: Backend,
    sealed: Arc<Sealed>,
    /// The compressed store in RAM in front of it (`compress+`).
    writeback: Option<Arc<WritebackStore<Arc<Sealed>>>>,
}

/// A far store's backend, sealed.
type Sealed = SealedStore<Arc<dyn PageStore>>;

#[derive(Debug, Clone)]
enum Backend {
    File(Arc<FileStore>),
    Redis(Arc<RedisStore>),
}

/// A far store's counters, by kind.
#[derive(Debug, Clone, Copy)]
pub enum FarStats {
    /// The file store's.
    File(FileStats),
    /// The Redis store's.
    Redis(RedisStats),
}

impl FarStore {
    /// The store to build a [`StoreDevice`](crate::store::StoreDevice) on.
    pub fn page_store(&self) -> Arc<dyn PageStore> {
        match &self.writeback {
            Some(w) => w.clone(),
            None => self.sealed.clone(),
        }
    }

    /// Its address (a password left out when printed).
    pub fn address(&self) -> &FarAddress {
        &self.address
    }

    /// What it holds (in RAM and far, for `compress+`).
    pub fn usage(&self) -> StoreUsage {
        self.page_store().usage()
    }

    /// For `compress+`: the write-back's counters, and the compressed
    /// store's.
    pub fn writeback_stats(&self) -> Option<(WritebackStats, CompressStats)> {
        self.writeback.as_ref().map(|w| (w.stats(), w.ram().stats()))
    }

    /// The sealing's counters (of the pages far).
    pub fn seal_stats(&self) -> SealStats {
        self.sealed.stats()
    }

    /// Removes what the store holds outside the process now, for an owner
    /// that is never dropped (a process at exit): a remote store's values.
    /// A private file goes with the process anyway. Pages still on the
    /// device are lost after it.
    pub fn close(&self) {
        if let Backend::Redis(s) = &self.backend {
            s.remove_all();
        }
    }

    /// The store's own counters.
    pub fn stats(&self) -> FarStats {
        match &self.backend {
            Backend::File(s) => FarStats::File(s.stats()),
            Backend::Redis(s) => FarStats::Redis(s.stats()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_say_what_is_expected() {
        assert_eq!(FarAddress::parse("file:/var/tmp").unwrap(), FarAddress::File("/var/tmp".into()));
        assert!(FarAddress::parse("file:").is_err());
        assert!(matches!(FarAddress::parse("redis://127.0.0.1:6379"), Ok(FarAddress::Redis(_))));
        let err = FarAddress::parse("nfs://x").unwrap_err();
        assert_eq!(err.kind(), uhmm::ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("redis://"));
        let wb = FarAddress::parse("compress:64M+file:/var/tmp").unwrap();
        let want = FarAddress::Writeback { ram_bytes: 64 << 20, below: Box::new(FarAddress::File("/var/tmp".into())) };
        assert_eq!(wb, want);
        assert_eq!(wb.to_string(), "compress:64M+file:/var/tmp");
        assert_eq!(FarAddress::parse(&wb.to_string()).unwrap(), wb, "printed as it parses");
        assert!(
            matches!(FarAddress::parse("compress+redis://h:1"), Ok(FarAddress::Writeback { ram_bytes, .. }) if ram_bytes > 0)
        );
        for bad in [
            "compress",
            "compress:+file:/x",
            "compress:12Q+file:/x",
            "compress:1+file:/x",
            "compress+compress+file:/x",
            "compress+nfs://x",
        ] {
            assert_eq!(FarAddress::parse(bad).unwrap_err().kind(), uhmm::ErrorKind::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn passwords_are_not_printed() {
        let a = FarAddress::Redis("redis://app:s3cret@10.0.0.1:6379".into());
        assert_eq!(a.to_string(), "redis://app:…@10.0.0.1:6379");
        assert!(!a.to_string().contains("s3cret"));
    }
}
