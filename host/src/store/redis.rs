//! The Redis domain store, with exactly the seed's layout:
//!
//! - hash `{prefix}domain:{ssh_key_hash}`: `domain`, `ssh_key_hash`, `first_seen`,
//!   `last_seen` (unix seconds), `use_count`;
//! - string `{prefix}domain:reverse:{domain}` → key hash.
//!
//! A claim is atomic without multi-key transactions (so it works on Cluster, where the two
//! keys live in different slots): `SET NX` on the reverse key decides who owns a name, and
//! a script that writes the record only if its key does not exist yet decides which name a
//! key owns; the loser of a race on the same key releases its reverse key with a
//! compare-and-delete. A record is written whole by one command, so none is ever half-written.
//!
//! p0rt never overwrites or deletes data it did not write. A record key that is not a valid
//! record (not a hash, a field missing or not a number, a `domain` that is not a DNS label,
//! another key's hash or name) refuses its key with [`StoreError::BadRecord`], naming the
//! key; a reverse key holding anything else makes its name unavailable.
//!
//! Records read for a key are kept in a bounded local copy, so while Redis is away, keys seen
//! before still get their names; a brand-new key is refused rather than risk a duplicate name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::reservations::{RedisReservations, Reservations};
use super::{Claim, DAY_SECS, DomainRecord, DomainStats, DomainStore, Grant, Import, StoreError};
use crate::names::check_dns_label;
use crate::redis_link::{RedisLink, RedisOpError};

/// Timeout for one store operation.
pub const STORE_OP_TIMEOUT: Duration = Duration::from_millis(1000);
/// Timeout for one step of a keyspace scan (stats, export).
pub const SCAN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `/domain-stats` figures are reused before scanning again.
pub const STATS_CACHE_TTL: Duration = Duration::from_secs(10);
/// Record TTL when none is configured (P0rt used 365 days).
pub const DEFAULT_RECORD_TTL_DAYS: u64 = 365;
/// Most records (a few hundred bytes each) the local copy keeps; the least used go first.
pub const LOCAL_COPY_MAX_RECORDS: u64 = 100_000;

/// Deletes KEYS[1] only if it still holds ARGV[1] (one key: safe on Cluster).
const COMPARE_AND_DELETE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Takes the name (reverse key KEYS[1]) for key ARGV[1] if it is free, refreshes its TTL
/// (ARGV[2]) if that key holds it; returns the holder (one key: safe on Cluster).
const HOLD_NAME: &str = r"
local owner = redis.call('GET', KEYS[1])
if not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return ARGV[1]
end
if owner == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return owner
";

/// Writes the whole record hash KEYS[1] with its TTL, only if that key does not exist:
/// 1 if written, 0 if something (a record or foreign data) is there (one key: Cluster-safe).
const CREATE_RECORD: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'domain', ARGV[1], 'ssh_key_hash', ARGV[2],
  'first_seen', ARGV[3], 'last_seen', ARGV[4], 'use_count', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return 1
";

pub struct RedisStore {
    link: Arc<RedisLink>,
    prefix: String,
    ttl_secs: u64,
    local: LocalCopy,
    stats_cache: Mutex<Option<(Instant, DomainStats)>>,
    /// P0rt's reservation keys on the same link.
    reservations: RedisReservations,
}

/// The last known record of keys that connected, both ways, for when Redis is away.
struct LocalCopy {
    by_key: moka::sync::Cache<String, DomainRecord>,
    by_domain: moka::sync::Cache<String, String>,
}

impl Default for LocalCopy {
    fn default() -> Self {
        LocalCopy {
            by_key: moka::sync::Cache::new(LOCAL_COPY_MAX_RECORDS),
            by_domain: moka::sync::Cache::new(LOCAL_COPY_MAX_RECORDS),
        }
    }
}

impl LocalCopy {
    fn remember(&self, record: &DomainRecord) {
        self.by_domain
            .insert(record.domain.clone(), record.ssh_key_hash.clone());
        self.by_key
            .insert(record.ssh_key_hash.clone(), record.clone());
    }
}

fn unavailable(e: RedisOpError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A field of a record hash as a number; `default` if it is missing.
fn number<T: std::str::FromStr>(
    fields: &HashMap<String, String>,
    name: &str,
    default: Option<T>,
) -> Result<T, String> {
    match (fields.get(name), default) {
        (Some(text), _) => text
            .parse()
            .map_err(|_| format!("has {name} {text:?}, which is not a whole number")),
        (None, Some(default)) => Ok(default),
        (None, None) => Err(format!("has no {name} field")),
    }
}

/// Parses the record hash of key `hash`, or says what is wrong with it.
fn parse_record(hash: &str, fields: &HashMap<String, String>) -> Result<DomainRecord, String> {
    let domain = fields.get("domain").ok_or("has no domain field")?;
    check_dns_label(domain).map_err(|e| format!("has a domain that is not a DNS label ({e})"))?;
    if let Some(owner) = fields.get("ssh_key_hash")
        && owner != hash
    {
        return Err(format!("has ssh_key_hash {owner}, another key's"));
    }
    Ok(DomainRecord {
        domain: domain.clone(),
        ssh_key_hash: hash.to_string(),
        first_seen: number(fields, "first_seen", None)?,
        last_seen: number(fields, "last_seen", None)?,
        use_count: number(fields, "use_count", Some(0))?,
    })
}

impl RedisStore {
    pub fn new(link: Arc<RedisLink>, prefix: &str, ttl_days: u64) -> Arc<RedisStore> {
        Arc::new(RedisStore {
            reservations: RedisReservations::new(link.clone(), prefix),
            link,
            prefix: prefix.to_string(),
            ttl_secs: ttl_days.max(1).saturating_mul(DAY_SECS as u64),
            local: LocalCopy::default(),
            stats_cache: Mutex::new(None),
        })
    }

    pub fn record_key(&self, ssh_key_hash: &str) -> String {
        format!("{}domain:{ssh_key_hash}", self.prefix)
    }

    pub fn reverse_key(&self, domain: &str) -> String {
        format!("{}domain:reverse:{domain}", self.prefix)
    }

    /// The set of requested names granted to a key (p0rt's own; outside `domain:*`, so
    /// P0rt's scans never mistake it for a record). The reverse keys stay the authority.
    pub fn granted_key(&self, ssh_key_hash: &str) -> String {
        format!("{}names:{ssh_key_hash}", self.prefix)
    }

    /// The refusal of a key whose record is not p0rt's, logged for the operator.
    fn bad_record(&self, key: &str, problem: String) -> StoreError {
        let error = StoreError::BadRecord {
            key: key.to_string(),
            problem,
        };
        tracing::warn!("malformed domain record: {error}");
        error
    }

    /// Reads a key's record from Redis without keeping it (a scan must not fill the copy).
    async fn read(&self, ssh_key_hash: &str) -> Result<Option<DomainRecord>, StoreError> {
        let key = self.record_key(ssh_key_hash);
        let fields: HashMap<String, String> = match self
            .link
            .query(redis::cmd("HGETALL").arg(&key), STORE_OP_TIMEOUT)
            .await
        {
            Ok(fields) => fields,
            Err(RedisOpError::WrongType { .. }) => {
                let kind: String = (self.link)
                    .query(redis::cmd("TYPE").arg(&key), STORE_OP_TIMEOUT)
                    .await
                    .unwrap_or_else(|_| "value of another type".into());
                return Err(self.bad_record(&key, format!("holds a {kind}, not a record hash")));
            }
            Err(e) => return Err(unavailable(e)),
        };
        if fields.is_empty() {
            return Ok(None);
        }
        parse_record(ssh_key_hash, &fields)
            .map(Some)
            .map_err(|problem| self.bad_record(&key, problem))
    }

    /// Reads a key's record and keeps it in the local copy.
    async fn fetch(&self, ssh_key_hash: &str) -> Result<Option<DomainRecord>, StoreError> {
        let record = self.read(ssh_key_hash).await?;
        if let Some(record) = &record {
            self.local.remember(record);
        }
        Ok(record)
    }

    /// Writes a whole new record with the store's TTL, unless its key exists (false then).
    async fn create_record(&self, record: &DomainRecord) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(CREATE_RECORD)
            .arg(1)
            .arg(self.record_key(&record.ssh_key_hash))
            .arg(&record.domain)
            .arg(&record.ssh_key_hash)
            .arg(record.first_seen)
            .arg(record.last_seen)
            .arg(record.use_count)
            .arg(self.ttl_secs);
        let written: i64 = self
            .link
            .query(&cmd, STORE_OP_TIMEOUT)
            .await
            .map_err(unavailable)?;
        Ok(written == 1)
    }

    /// Holds `domain`'s reverse key for the key: takes it if free, refreshes its TTL if the
    /// key holds it already (also after an interrupted claim). True if the key holds it now.
    async fn reserve_name(&self, domain: &str, ssh_key_hash: &str) -> Result<bool, StoreError> {
        let reverse = self.reverse_key(domain);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(HOLD_NAME)
            .arg(1)
            .arg(&reverse)
            .arg(ssh_key_hash)
            .arg(self.ttl_secs);
        match self.link.query::<String>(&cmd, STORE_OP_TIMEOUT).await {
            Ok(owner) => Ok(owner == ssh_key_hash),
            Err(RedisOpError::WrongType { .. }) => {
                tracing::warn!(
                    "redis key {reverse} is not a string; the name {domain} stays unavailable"
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

    /// The key hashes that have a record key.
    async fn record_hashes(&self) -> Result<Vec<String>, StoreError> {
        let record_prefix = format!("{}domain:", self.prefix);
        let reverse_prefix = format!("{}domain:reverse:", self.prefix);
        let keys = self
            .link
            .scan(&format!("{record_prefix}*"), usize::MAX, SCAN_TIMEOUT)
            .await
            .map_err(unavailable)?;
        Ok(keys
            .into_iter()
            .filter(|key| !key.starts_with(&reverse_prefix))
            .filter_map(|key| key.strip_prefix(&record_prefix).map(str::to_string))
            .collect())
    }

    /// True if no domain keys exist under the prefix: stops at the first one found.
    pub async fn is_empty(&self) -> Result<bool, StoreError> {
        let pattern = format!("{}domain:*", self.prefix);
        let found = self
            .link
            .scan(&pattern, 1, SCAN_TIMEOUT)
            .await
            .map_err(unavailable)?;
        Ok(found.is_empty())
    }
}

#[async_trait]
impl DomainStore for RedisStore {
    async fn record_for_key(&self, ssh_key_hash: &str) -> Result<Option<DomainRecord>, StoreError> {
        match self.fetch(ssh_key_hash).await {
            Err(StoreError::Unavailable(e)) => match self.local.by_key.get(ssh_key_hash) {
                Some(record) => Ok(Some(record)),
                None => Err(StoreError::Unavailable(e)),
            },
            other => other,
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
                tracing::warn!("redis key {key} is not a string ({detail}); nobody owns {domain}");
                Ok(None)
            }
            Err(e) => match self.local.by_domain.get(domain) {
                Some(owner) => Ok(Some(owner)),
                None => Err(unavailable(e)),
            },
        }
    }

    async fn grant(&self, ssh_key_hash: &str, name: &str, _now: i64) -> Result<Grant, StoreError> {
        // The reverse key decides (SET NX semantics, TTL refreshed for the owner); the set
        // only lists a key's grants. Separate keys, so this works on Cluster too.
        if !self.reserve_name(name, ssh_key_hash).await? {
            return Ok(Grant::Taken);
        }
        let set = self.granted_key(ssh_key_hash);
        let mut pipe = redis::pipe();
        pipe.cmd("SADD")
            .arg(&set)
            .arg(name)
            .cmd("EXPIRE")
            .arg(&set)
            .arg(self.ttl_secs)
            .ignore();
        let (added,): (i64,) = self
            .link
            .query_pipeline(&pipe, STORE_OP_TIMEOUT)
            .await
            .map_err(unavailable)?;
        Ok(if added == 1 {
            Grant::Granted
        } else {
            Grant::AlreadyOwned
        })
    }

    async fn names_of(&self, ssh_key_hash: &str) -> Result<Vec<String>, StoreError> {
        let main = self.record_for_key(ssh_key_hash).await?.map(|r| r.domain);
        let mut granted: Vec<String> = match self
            .link
            .query(
                redis::cmd("SMEMBERS").arg(self.granted_key(ssh_key_hash)),
                STORE_OP_TIMEOUT,
            )
            .await
        {
            Ok(names) => names,
            Err(RedisOpError::WrongType { .. }) => Vec::new(),
            Err(e) => return Err(unavailable(e)),
        };
        granted.sort();
        granted.retain(|n| Some(n) != main.as_ref());
        Ok(main.into_iter().chain(granted).collect())
    }

    async fn claim(&self, ssh_key_hash: &str, domain: &str, now: i64) -> Result<Claim, StoreError> {
        if let Some(existing) = self.fetch(ssh_key_hash).await? {
            return Ok(Claim::AlreadyOwned(existing));
        }
        if !self.reserve_name(domain, ssh_key_hash).await? {
            return Ok(Claim::Taken);
        }
        // On an error the name stays reserved for this key: the record may have been written.
        let record = DomainRecord::claimed(ssh_key_hash, domain, now);
        if self.create_record(&record).await? {
            self.local.remember(&record);
            return Ok(Claim::Claimed(record));
        }
        // Another host named this key at the same moment: keep its choice.
        self.release_reverse(domain, ssh_key_hash).await;
        match self.fetch(ssh_key_hash).await? {
            Some(existing) => Ok(Claim::AlreadyOwned(existing)),
            None => Err(StoreError::Unavailable(format!(
                "record {} was deleted during a claim",
                self.record_key(ssh_key_hash)
            ))),
        }
    }

    async fn touch(
        &self,
        ssh_key_hash: &str,
        now: i64,
    ) -> Result<Option<DomainRecord>, StoreError> {
        let record = match self.fetch(ssh_key_hash).await {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(None),
            Err(StoreError::Unavailable(e)) => {
                // Redis away: a key seen before keeps its name; the counters catch up later.
                let Some(mut record) = self.local.by_key.get(ssh_key_hash) else {
                    return Err(StoreError::Unavailable(e));
                };
                record.last_seen = record.last_seen.max(now);
                record.use_count = record.use_count.saturating_add(1);
                self.local.remember(&record);
                return Ok(Some(record));
            }
            Err(e) => return Err(e),
        };
        let key = self.record_key(ssh_key_hash);
        // The name must be this key's (re-taken if its reverse key expired or was lost).
        match self.reserve_name(&record.domain, ssh_key_hash).await {
            Ok(true) => {}
            Ok(false) => {
                let reverse = self.reverse_key(&record.domain);
                return Err(self.bad_record(
                    &key,
                    format!(
                        "has domain {}, but {reverse} is not this key's",
                        record.domain
                    ),
                ));
            }
            Err(e) => tracing::warn!("could not refresh the TTL of {key}'s name: {e}"),
        }
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
        let updated = match self
            .link
            .query_pipeline::<(u64,)>(&pipe, STORE_OP_TIMEOUT)
            .await
        {
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
        self.local.remember(&updated);
        Ok(Some(updated))
    }

    async fn stats(&self, now: i64) -> Result<DomainStats, StoreError> {
        if let Some((at, stats)) = &*self.stats_cache.lock().unwrap_or_else(|p| p.into_inner())
            && at.elapsed() < STATS_CACHE_TTL
        {
            return Ok(stats.clone());
        }
        let mut last_seen = Vec::new();
        for hash in self.record_hashes().await? {
            match self.read(&hash).await {
                Ok(Some(record)) => last_seen.push(record.last_seen),
                // Logged by `read`; the figures cover the records that are p0rt's.
                Ok(None) | Err(StoreError::BadRecord { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let since = |secs: i64| last_seen.iter().filter(|&&t| t >= now - secs).count() as u64;
        let stats = DomainStats {
            total_domains: last_seen.len() as u64,
            active_last_24h: since(DAY_SECS),
            active_last_7d: since(7 * DAY_SECS),
            storage_type: "redis",
        };
        *self.stats_cache.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), stats.clone()));
        Ok(stats)
    }

    async fn all_records(&self) -> Result<Vec<DomainRecord>, StoreError> {
        let mut records = Vec::new();
        for hash in self.record_hashes().await? {
            records.extend(self.read(&hash).await?);
        }
        Ok(records)
    }

    async fn import(&self, record: &DomainRecord) -> Result<Import, StoreError> {
        if let Some(existing) = self.fetch(&record.ssh_key_hash).await? {
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
        if !self.create_record(record).await? {
            self.release_reverse(&record.domain, &record.ssh_key_hash)
                .await;
            return Ok(Import::Conflict(format!(
                "key {} got a record here during the import",
                record.ssh_key_hash
            )));
        }
        self.local.remember(record);
        Ok(Import::Imported)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn reservations(&self) -> &dyn Reservations {
        &self.reservations
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn records_that_are_not_p0rt_records_say_what_is_wrong() {
        let good = [
            ("domain", "a-b-c"),
            ("ssh_key_hash", "k"),
            ("first_seen", "1"),
            ("last_seen", "2"),
        ];
        assert_eq!(parse_record("k", &fields(&good)).unwrap().use_count, 0);
        for (field, value, needle) in [
            ("domain", "a.b", "not a DNS label"),
            ("domain", "Evil Name/../x", "not a DNS label"),
            ("domain", "ünï-cödé", "not a DNS label"),
            ("domain", "", "not a DNS label"),
            ("first_seen", "yesterday", "first_seen \"yesterday\""),
            ("use_count", "-1", "use_count"),
            ("ssh_key_hash", "other", "another key's"),
        ] {
            let mut record = fields(&good);
            record.insert(field.into(), value.into());
            let problem = parse_record("k", &record).unwrap_err();
            assert!(problem.contains(needle), "{field}={value}: {problem}");
        }
        let mut half_written = fields(&good);
        half_written.remove("last_seen");
        assert_eq!(
            parse_record("k", &half_written).unwrap_err(),
            "has no last_seen field"
        );
    }

    #[test]
    fn the_local_copy_is_bounded() {
        let local = LocalCopy::default();
        for i in 0..LOCAL_COPY_MAX_RECORDS + 5_000 {
            local.remember(&DomainRecord::claimed(
                &format!("k{i}"),
                &format!("n{i}"),
                0,
            ));
        }
        local.by_key.run_pending_tasks();
        local.by_domain.run_pending_tasks();
        assert!(local.by_key.entry_count() <= LOCAL_COPY_MAX_RECORDS);
        assert!(local.by_domain.entry_count() <= LOCAL_COPY_MAX_RECORDS);
    }
}
