//! The Redis domain store, with exactly the seed's layout:
//!
//! - hash `{prefix}domain:{ssh_key_hash}`: `domain`, `ssh_key_hash`, `first_seen`,
//!   `last_seen` (unix seconds), `use_count`;
//! - string `{prefix}domain:reverse:{domain}` → key hash.
//!
//! A claim is atomic without multi-key transactions (so it works on Cluster, where the two
//! keys live in different slots): `SET NX` on the reverse key decides who owns a name, and
//! `HSETNX domain` on the record decides which name a key owns; the loser of a race on the
//! same key releases its reverse key with a compare-and-delete.
//!
//! Every record read is kept in a local copy, so while Redis is away, keys seen before still
//! get their names; a brand-new key is refused rather than risk a duplicate name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Claim, DAY_SECS, DomainRecord, DomainStats, DomainStore, Import, StoreError};
use crate::redis_link::{RedisLink, RedisOpError};

/// Timeout for one store operation.
pub const STORE_OP_TIMEOUT: Duration = Duration::from_millis(1000);
/// Timeout for a full keyspace scan (stats, export).
pub const SCAN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `/domain-stats` figures are reused before scanning again.
pub const STATS_CACHE_TTL: Duration = Duration::from_secs(10);
/// Record TTL when none is configured (P0rt used 365 days).
pub const DEFAULT_RECORD_TTL_DAYS: u64 = 365;

/// Deletes KEYS[1] only if it still holds ARGV[1] (one key: safe on Cluster).
const COMPARE_AND_DELETE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

pub struct RedisStore {
    link: Arc<RedisLink>,
    prefix: String,
    ttl_secs: u64,
    local: Mutex<LocalCopy>,
    stats_cache: Mutex<Option<(Instant, DomainStats)>>,
}

#[derive(Default)]
struct LocalCopy {
    by_key: HashMap<String, DomainRecord>,
    by_domain: HashMap<String, String>,
}

impl LocalCopy {
    fn remember(&mut self, record: &DomainRecord) {
        self.by_domain
            .insert(record.domain.clone(), record.ssh_key_hash.clone());
        self.by_key
            .insert(record.ssh_key_hash.clone(), record.clone());
    }
}

fn unavailable(e: RedisOpError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Parses a record hash; `None` (logged) if any field is missing or malformed.
fn parse_record(key: &str, hash: &str, fields: &HashMap<String, String>) -> Option<DomainRecord> {
    let get = |name: &str| fields.get(name).map(String::as_str);
    let parsed = (|| {
        Some(DomainRecord {
            domain: get("domain").filter(|d| !d.is_empty())?.to_string(),
            ssh_key_hash: get("ssh_key_hash").unwrap_or(hash).to_string(),
            first_seen: get("first_seen")?.parse().ok()?,
            last_seen: get("last_seen")?.parse().ok()?,
            use_count: get("use_count").unwrap_or("0").parse().ok()?,
        })
    })();
    if parsed.is_none() {
        tracing::warn!("redis key {key} holds a malformed domain record; treating it as missing");
    }
    parsed
}

impl RedisStore {
    pub fn new(link: Arc<RedisLink>, prefix: &str, ttl_days: u64) -> Arc<RedisStore> {
        Arc::new(RedisStore {
            link,
            prefix: prefix.to_string(),
            ttl_secs: ttl_days.max(1).saturating_mul(DAY_SECS as u64),
            local: Mutex::new(LocalCopy::default()),
            stats_cache: Mutex::new(None),
        })
    }

    pub fn record_key(&self, ssh_key_hash: &str) -> String {
        format!("{}domain:{ssh_key_hash}", self.prefix)
    }

    pub fn reverse_key(&self, domain: &str) -> String {
        format!("{}domain:reverse:{domain}", self.prefix)
    }

    fn local(&self) -> std::sync::MutexGuard<'_, LocalCopy> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads a record from Redis: `Ok(None)` if missing or poisoned.
    async fn fetch(&self, ssh_key_hash: &str) -> Result<Option<DomainRecord>, RedisOpError> {
        let key = self.record_key(ssh_key_hash);
        let fields: HashMap<String, String> = match self
            .link
            .query(redis::cmd("HGETALL").arg(&key), STORE_OP_TIMEOUT)
            .await
        {
            Ok(fields) => fields,
            Err(RedisOpError::WrongType { detail, .. }) => {
                tracing::warn!(
                    "redis key {key} has the wrong type ({detail}); treating it as missing"
                );
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if fields.is_empty() {
            return Ok(None);
        }
        let record = parse_record(&key, ssh_key_hash, &fields);
        if let Some(record) = &record {
            self.local().remember(record);
        }
        Ok(record)
    }

    /// Writes a full record and its reverse key with the store's TTL.
    async fn write_record(&self, record: &DomainRecord) -> Result<(), RedisOpError> {
        let key = self.record_key(&record.ssh_key_hash);
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(&key)
            .arg("domain")
            .arg(&record.domain)
            .arg("ssh_key_hash")
            .arg(&record.ssh_key_hash)
            .arg("first_seen")
            .arg(record.first_seen)
            .arg("last_seen")
            .arg(record.last_seen)
            .arg("use_count")
            .arg(record.use_count)
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(self.ttl_secs)
            .ignore();
        // One key per pipeline: on Cluster the record and its reverse key live in different slots.
        self.link
            .query_pipeline::<()>(&pipe, STORE_OP_TIMEOUT)
            .await?;
        self.refresh_reverse_ttl(&record.domain).await
    }

    async fn refresh_reverse_ttl(&self, domain: &str) -> Result<(), RedisOpError> {
        let mut cmd = redis::cmd("EXPIRE");
        cmd.arg(self.reverse_key(domain)).arg(self.ttl_secs);
        self.link
            .query::<i64>(&cmd, STORE_OP_TIMEOUT)
            .await
            .map(|_| ())
    }

    /// Takes `domain`'s reverse key for the key (`SET NX`). True if the key holds it now,
    /// also when an earlier, interrupted claim of the same key left it behind.
    async fn reserve_name(&self, domain: &str, ssh_key_hash: &str) -> Result<bool, StoreError> {
        let reverse = self.reverse_key(domain);
        let won: Option<String> = self
            .link
            .query(
                redis::cmd("SET")
                    .arg(&reverse)
                    .arg(ssh_key_hash)
                    .arg("NX")
                    .arg("EX")
                    .arg(self.ttl_secs),
                STORE_OP_TIMEOUT,
            )
            .await
            .map_err(unavailable)?;
        if won.is_some() {
            return Ok(true);
        }
        match self
            .link
            .query::<Option<String>>(redis::cmd("GET").arg(&reverse), STORE_OP_TIMEOUT)
            .await
        {
            Ok(owner) => Ok(owner.as_deref() == Some(ssh_key_hash)),
            Err(RedisOpError::WrongType { .. }) => {
                tracing::warn!(
                    "redis key {reverse} has the wrong type; the name stays unavailable"
                );
                Ok(false)
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn release_reverse(&self, domain: &str, ssh_key_hash: &str) {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(COMPARE_AND_DELETE)
            .arg(1)
            .arg(self.reverse_key(domain))
            .arg(ssh_key_hash);
        if let Err(e) = self.link.query::<i64>(&cmd, STORE_OP_TIMEOUT).await {
            tracing::warn!(
                "could not release {} after a lost race: {e}",
                self.reverse_key(domain)
            );
        }
    }

    /// Every record (for stats and export).
    pub async fn scan_records(&self) -> Result<Vec<DomainRecord>, StoreError> {
        let pattern = format!("{}domain:*", self.prefix);
        let reverse_prefix = format!("{}domain:reverse:", self.prefix);
        let record_prefix = format!("{}domain:", self.prefix);
        let keys = self
            .link
            .scan(&pattern, SCAN_TIMEOUT)
            .await
            .map_err(unavailable)?;
        let mut records = Vec::new();
        for key in keys {
            if key.starts_with(&reverse_prefix) {
                continue;
            }
            let hash = key.strip_prefix(&record_prefix).unwrap_or(&key).to_string();
            if let Some(record) = self.fetch(&hash).await.map_err(unavailable)? {
                records.push(record);
            }
        }
        Ok(records)
    }

    /// True if no domain keys exist under the prefix.
    pub async fn is_empty(&self) -> Result<bool, StoreError> {
        let pattern = format!("{}domain:*", self.prefix);
        let keys = self
            .link
            .scan(&pattern, SCAN_TIMEOUT)
            .await
            .map_err(unavailable)?;
        Ok(keys.is_empty())
    }
}

#[async_trait]
impl DomainStore for RedisStore {
    async fn record_for_key(&self, ssh_key_hash: &str) -> Result<Option<DomainRecord>, StoreError> {
        match self.fetch(ssh_key_hash).await {
            Ok(record) => Ok(record),
            Err(e) => match self.local().by_key.get(ssh_key_hash) {
                Some(record) => Ok(Some(record.clone())),
                None => Err(unavailable(e)),
            },
        }
    }

    async fn owner_of(&self, domain: &str) -> Result<Option<String>, StoreError> {
        let key = self.reverse_key(domain);
        match self
            .link
            .query::<Option<String>>(redis::cmd("GET").arg(&key), STORE_OP_TIMEOUT)
            .await
        {
            Ok(owner) => Ok(owner),
            Err(RedisOpError::WrongType { detail, .. }) => {
                tracing::warn!(
                    "redis key {key} has the wrong type ({detail}); treating it as missing"
                );
                Ok(None)
            }
            Err(e) => match self.local().by_domain.get(domain) {
                Some(owner) => Ok(Some(owner.clone())),
                None => Err(unavailable(e)),
            },
        }
    }

    async fn claim(&self, ssh_key_hash: &str, domain: &str, now: i64) -> Result<Claim, StoreError> {
        if let Some(existing) = self.fetch(ssh_key_hash).await.map_err(unavailable)? {
            return Ok(Claim::AlreadyOwned(existing));
        }
        if !self.reserve_name(domain, ssh_key_hash).await? {
            return Ok(Claim::Taken);
        }
        let record_key = self.record_key(ssh_key_hash);
        let mut first: Result<i64, RedisOpError> = self
            .link
            .query(
                redis::cmd("HSETNX")
                    .arg(&record_key)
                    .arg("domain")
                    .arg(domain),
                STORE_OP_TIMEOUT,
            )
            .await;
        if let Err(RedisOpError::WrongType { detail, .. }) = &first {
            // The record key is p0rt's by layout and unreadable as a record: treat it as
            // missing. Replace it (logged), since this key's name must live exactly there.
            tracing::warn!(
                "redis key {record_key} has the wrong type ({detail}); replacing it with this key's record"
            );
            let _: Result<i64, _> = self
                .link
                .query(redis::cmd("DEL").arg(&record_key), STORE_OP_TIMEOUT)
                .await;
            first = self
                .link
                .query(
                    redis::cmd("HSETNX")
                        .arg(&record_key)
                        .arg("domain")
                        .arg(domain),
                    STORE_OP_TIMEOUT,
                )
                .await;
        }
        match first {
            Ok(1) => {}
            Ok(_) => {
                // Another host named this key at the same moment: keep its choice.
                self.release_reverse(domain, ssh_key_hash).await;
                return match self.fetch(ssh_key_hash).await.map_err(unavailable)? {
                    Some(existing) => Ok(Claim::AlreadyOwned(existing)),
                    None => Err(StoreError::Unavailable(format!(
                        "record {record_key} vanished during a claim"
                    ))),
                };
            }
            Err(RedisOpError::WrongType { detail, .. }) => {
                self.release_reverse(domain, ssh_key_hash).await;
                tracing::error!(
                    "redis key {record_key} has the wrong type ({detail}); not overwriting it"
                );
                return Err(StoreError::Unavailable(format!(
                    "redis key {record_key} holds unexpected data; an operator must remove it"
                )));
            }
            Err(e) => return Err(unavailable(e)),
        }
        let record = DomainRecord::claimed(ssh_key_hash, domain, now);
        self.write_record(&record).await.map_err(unavailable)?;
        self.local().remember(&record);
        Ok(Claim::Claimed(record))
    }

    async fn touch(
        &self,
        ssh_key_hash: &str,
        now: i64,
    ) -> Result<Option<DomainRecord>, StoreError> {
        let record = match self.fetch(ssh_key_hash).await {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(None),
            Err(e) => {
                // Redis away: a key seen before keeps its name; the counters catch up later.
                let mut local = self.local();
                return match local.by_key.get_mut(ssh_key_hash) {
                    Some(record) => {
                        record.last_seen = record.last_seen.max(now);
                        record.use_count = record.use_count.saturating_add(1);
                        Ok(Some(record.clone()))
                    }
                    None => Err(unavailable(e)),
                };
            }
        };
        let key = self.record_key(ssh_key_hash);
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(&key)
            .arg("last_seen")
            .arg(now.max(record.last_seen))
            .ignore()
            .cmd("HINCRBY")
            .arg(&key)
            .arg("use_count")
            .arg(1)
            .cmd("EXPIRE")
            .arg(&key)
            .arg(self.ttl_secs)
            .ignore();
        let counted = self
            .link
            .query_pipeline::<(u64,)>(&pipe, STORE_OP_TIMEOUT)
            .await;
        if counted.is_ok()
            && let Err(e) = self.refresh_reverse_ttl(&record.domain).await
        {
            tracing::warn!(
                "could not refresh the TTL of {}: {e}",
                self.reverse_key(&record.domain)
            );
        }
        let updated = match counted {
            Ok((use_count,)) => DomainRecord {
                last_seen: now.max(record.last_seen),
                use_count,
                ..record
            },
            Err(e) => {
                tracing::warn!("could not note a connection for {key}: {e}");
                record
            }
        };
        self.local().remember(&updated);
        Ok(Some(updated))
    }

    async fn stats(&self, now: i64) -> Result<DomainStats, StoreError> {
        if let Some((at, stats)) = &*self.stats_cache.lock().unwrap_or_else(|p| p.into_inner())
            && at.elapsed() < STATS_CACHE_TTL
        {
            return Ok(stats.clone());
        }
        let records = self.scan_records().await?;
        let since = |secs: i64| records.iter().filter(|r| r.last_seen >= now - secs).count() as u64;
        let stats = DomainStats {
            total_domains: records.len() as u64,
            active_last_24h: since(DAY_SECS),
            active_last_7d: since(7 * DAY_SECS),
            storage_type: "redis",
        };
        *self.stats_cache.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), stats.clone()));
        Ok(stats)
    }

    async fn all_records(&self) -> Result<Vec<DomainRecord>, StoreError> {
        self.scan_records().await
    }

    async fn import(&self, record: &DomainRecord) -> Result<Import, StoreError> {
        if let Some(existing) = self
            .fetch(&record.ssh_key_hash)
            .await
            .map_err(unavailable)?
        {
            return Ok(Import::against_existing(&existing, record));
        }
        if !self
            .reserve_name(&record.domain, &record.ssh_key_hash)
            .await?
        {
            let owner = self.owner_of(&record.domain).await?.unwrap_or_default();
            return Ok(Import::Conflict(format!(
                "{} belongs to key {owner} here",
                record.domain
            )));
        }
        self.write_record(record).await.map_err(unavailable)?;
        self.local().remember(record);
        Ok(Import::Imported)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}
