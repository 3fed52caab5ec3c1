//! Far memory by address: the forms a user names a store outside the
//! process's RAM by (`file:PATH`, `redis://HOST:PORT`, `rediss://…`,
//! `redis-cluster://H1:P1,H2:P2,…`), and [`FarStore`], such a store opened
//! behind a [`SealedStore`], so that every page leaving the process is
//! encrypted and authenticated.

use std::path::PathBuf;
use std::sync::Arc;

use uhmm::{Error, Result};

use crate::file::{FileConfig, FileLocation, FileStats, FileStore};
use crate::remote::{RedisConfig, RedisStats, RedisStore};
use crate::store::{PageStore, SealStats, SealedStore, StoreUsage, random_id};

/// Where far pages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FarAddress {
    /// `file:PATH`: a file (a directory: a private file in it).
    File(PathBuf),
    /// A Redis or Valkey server or cluster, by its URL (`redis://`,
    /// `rediss://`, `redis-cluster://`, `rediss-cluster://`).
    Redis(String),
}

impl FarAddress {
    /// Reads an address; anything else is an invalid argument that lists
    /// the forms.
    pub fn parse(s: &str) -> Result<FarAddress> {
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
             redis-cluster://HOST:PORT[,HOST:PORT…] or rediss-cluster://…"
        )))
    }

    /// Opens the store with its defaults, sealed under a new key; keys on
    /// a remote store are named under a new random namespace, and every
    /// node must answer `PING` now.
    pub fn open(&self) -> Result<FarStore> {
        let backend = match self {
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
        Ok(FarStore { address: self.clone(), backend, sealed: Arc::new(SealedStore::new(inner)?) })
    }
}

impl std::fmt::Display for FarAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FarAddress::File(p) => write!(f, "file:{}", p.display()),
            FarAddress::Redis(url) => f.write_str(&redact(url)),
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
    sealed: Arc<SealedStore<Arc<dyn PageStore>>>,
}

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
        self.sealed.clone()
    }

    /// Its address (a password left out when printed).
    pub fn address(&self) -> &FarAddress {
        &self.address
    }

    /// What it holds.
    pub fn usage(&self) -> StoreUsage {
        self.sealed.usage()
    }

    /// The sealing's counters.
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
    }

    #[test]
    fn passwords_are_not_printed() {
        let a = FarAddress::Redis("redis://app:s3cret@10.0.0.1:6379".into());
        assert_eq!(a.to_string(), "redis://app:…@10.0.0.1:6379");
        assert!(!a.to_string().contains("s3cret"));
    }
}
