//! The domain store: which SSH key owns which name.
//!
//! A record is P0rt's: `domain`, `ssh_key_hash`, `first_seen`, `last_seen` (unix seconds),
//! `use_count`. [`DomainStore`] is the seam the Redis backend plugs into; [`json::JsonStore`]
//! is the embedded default. Each backend also holds the name reservations kept beside it
//! ([`reservations`]: P0rt's `reservations.json`, or its Redis keys).

pub mod json;
pub mod migrate;
pub mod open;
pub mod redis;
pub mod reservations;

use std::path::PathBuf;

use async_trait::async_trait;
use serde::Serialize;

/// One key's name binding, with P0rt's field names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DomainRecord {
    pub domain: String,
    pub ssh_key_hash: String,
    pub first_seen: i64,
    pub last_seen: i64,
    pub use_count: u64,
}

impl DomainRecord {
    /// The record of a name just claimed by a key at `now`.
    pub fn claimed(ssh_key_hash: &str, domain: &str, now: i64) -> DomainRecord {
        DomainRecord {
            domain: domain.to_string(),
            ssh_key_hash: ssh_key_hash.to_string(),
            first_seen: now,
            last_seen: now,
            use_count: 1,
        }
    }
}

/// Outcome of [`DomainStore::claim`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The key had no record; the name is now bound to it.
    Claimed(DomainRecord),
    /// The key already owns a name (possibly another one); nothing was changed.
    AlreadyOwned(DomainRecord),
    /// The name belongs to another key; nothing was changed.
    Taken,
}

/// Outcome of [`DomainStore::grant`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    /// The name is now the key's (durable when this returns).
    Granted,
    /// The key already had it; nothing was changed.
    AlreadyOwned,
    /// Another key owns it; nothing was changed.
    Taken,
}

/// Outcome of [`DomainStore::import`] (migration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Import {
    /// Written as it was in the source.
    Imported,
    /// The same binding was already there.
    AlreadyPresent,
    /// The key or the name is bound differently here, or the record cannot be stored here
    /// as it is; nothing was changed.
    Conflict(String),
}

impl Import {
    /// What importing `record` means when the destination already has `existing` for its key.
    pub fn against_existing(existing: &DomainRecord, record: &DomainRecord) -> Import {
        if existing.domain == record.domain {
            Import::AlreadyPresent
        } else {
            Import::Conflict(format!(
                "key {} is {} here but {} in the source",
                record.ssh_key_hash, existing.domain, record.domain
            ))
        }
    }
}

/// Figures for `/domain-stats` (the seed's shape).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DomainStats {
    pub total_domains: u64,
    pub active_last_24h: u64,
    pub active_last_7d: u64,
    pub storage_type: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "domain store {path} is unreadable: {detail}. The file was left untouched; \
         repair it or restore a backup, then start again"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("domain store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "data directory {dir} is in use by another p0rt process (lock {lock} is held); \
         stop that process or choose another --data-dir"
    )]
    Locked { dir: PathBuf, lock: PathBuf },
    #[error("domain store unavailable: {0}; try again shortly")]
    Unavailable(String),
    #[error(
        "redis key {key} {problem}. p0rt never overwrites or deletes data it did not write, so \
         this key gets no name until an operator repairs or deletes that redis key"
    )]
    BadRecord { key: String, problem: String },
    #[error(transparent)]
    Reservations(#[from] reservations::ReservationError),
}

/// A backend for domain records. Implementations keep both lookups O(1) and make
/// [`claim`](DomainStore::claim) atomic: one name is never bound to two keys.
#[async_trait]
pub trait DomainStore: Send + Sync {
    /// The record of a key, if it has one.
    async fn record_for_key(&self, ssh_key_hash: &str) -> Result<Option<DomainRecord>, StoreError>;
    /// The key hash owning a name (a main name or a granted requested name), if any.
    async fn owner_of(&self, domain: &str) -> Result<Option<String>, StoreError>;
    /// Gives the key `name` as an extra name of its own (a requested name granted by the
    /// naming policy), first come, first served. The caller has checked the name.
    async fn grant(&self, ssh_key_hash: &str, name: &str, now: i64) -> Result<Grant, StoreError>;
    /// The names a key owns: its main name first (if it has one), then its granted names in
    /// name order.
    async fn names_of(&self, ssh_key_hash: &str) -> Result<Vec<String>, StoreError>;
    /// Binds `domain` to the key if the key has no record and the name is free.
    /// A new binding is durable when this returns.
    async fn claim(&self, ssh_key_hash: &str, domain: &str, now: i64) -> Result<Claim, StoreError>;
    /// Notes a connection: bumps `last_seen` and `use_count`. May be persisted lazily.
    async fn touch(&self, ssh_key_hash: &str, now: i64)
    -> Result<Option<DomainRecord>, StoreError>;
    /// Counts for `/domain-stats`.
    async fn stats(&self, now: i64) -> Result<DomainStats, StoreError>;
    /// Every record (migration, export).
    async fn all_records(&self) -> Result<Vec<DomainRecord>, StoreError>;
    /// Adds a record as it is (timestamps and counts kept), unless it conflicts.
    async fn import(&self, record: &DomainRecord) -> Result<Import, StoreError>;
    /// Writes anything still pending (called on shutdown).
    async fn flush(&self) -> Result<(), StoreError>;
    /// `"json"` or `"redis"`.
    fn kind(&self) -> &'static str;
    /// The name reservations kept beside these records.
    fn reservations(&self) -> &dyn reservations::Reservations;
}

/// Seconds in a day, for the activity windows of `/domain-stats`.
pub const DAY_SECS: i64 = 24 * 60 * 60;
