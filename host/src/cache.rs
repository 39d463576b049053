//! The cache behind the plugins' `cache` interface, with the seed's verbs: get, set with TTL
//! (default 3600 s), delete, exists, increment, expire.
//!
//! [`Cache`] is what callers use: Redis while Redis is healthy, falling back automatically to
//! [`MemoryCache`] (moka, per-entry TTL, bounded in bytes) when it is not, or when Redis is
//! disabled (`ENABLE_REDIS=false`). A health checker pings Redis and switches back only after
//! several good pings in a row, so a flapping Redis does not flip the cache on every request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::Expiry;
use moka::ops::compute::Op;

use crate::redis_link::{RedisLink, RedisOpError};

/// TTL applied by `set` when the caller gives none (the seed's default).
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Most bytes (keys, values and bookkeeping) the in-memory cache holds; the least used entries
/// are evicted beyond this. Plugins write what outside input makes them write, so this bounds it.
pub const MEMORY_CACHE_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes counted per entry on top of its key and value (moka's node, the expiry, `Bytes`).
const ENTRY_OVERHEAD_BYTES: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CacheError {
    #[error("value at {key:?} is not an integer, so it cannot be incremented")]
    NotAnInteger { key: String },
    #[error("counter at {key:?} would overflow")]
    Overflow { key: String },
}

#[derive(Clone, Debug)]
struct Entry {
    value: Bytes,
    expires_at: Option<Instant>,
}

struct EntryExpiry;

impl Expiry<String, Entry> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Entry,
        created_at: Instant,
    ) -> Option<Duration> {
        value
            .expires_at
            .map(|t| t.saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Entry,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        value
            .expires_at
            .map(|t| t.saturating_duration_since(updated_at))
    }
}

/// In-process TTL cache with Redis-like semantics.
pub struct MemoryCache {
    entries: moka::sync::Cache<String, Entry>,
}

impl Default for MemoryCache {
    fn default() -> Self {
        MemoryCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(MEMORY_CACHE_MAX_BYTES)
                .weigher(|key: &String, entry: &Entry| {
                    let bytes = ENTRY_OVERHEAD_BYTES + key.len() + entry.value.len();
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .expire_after(EntryExpiry)
                .build(),
        }
    }
}

fn live(entry: &Entry) -> bool {
    entry.expires_at.is_none_or(|t| t > Instant::now())
}

impl MemoryCache {
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.entries.get(key).filter(live).map(|e| e.value)
    }

    /// Stores `value` for `ttl` (`None`: no expiry).
    pub fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) {
        let expires_at = ttl.map(|ttl| Instant::now() + ttl);
        self.entries
            .insert(key.to_string(), Entry { value, expires_at });
    }

    pub fn delete(&self, key: &str) -> bool {
        self.entries.remove(key).is_some_and(|e| live(&e))
    }

    pub fn exists(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Adds `amount` atomically; `ttl` applies only when this call creates the counter.
    pub fn increment(
        &self,
        key: &str,
        amount: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, CacheError> {
        let mut outcome = Ok(0);
        self.entries
            .entry(key.to_string())
            .and_compute_with(|current| {
                let current = current.map(|e| e.into_value()).filter(live);
                let (base, expires_at) = match &current {
                    Some(entry) => {
                        let parsed = std::str::from_utf8(&entry.value)
                            .ok()
                            .and_then(|s| s.parse::<i64>().ok());
                        match parsed {
                            Some(n) => (n, entry.expires_at),
                            None => {
                                outcome = Err(CacheError::NotAnInteger {
                                    key: key.to_string(),
                                });
                                return Op::Nop;
                            }
                        }
                    }
                    None => (0, ttl.map(|ttl| Instant::now() + ttl)),
                };
                let Some(next) = base.checked_add(amount) else {
                    outcome = Err(CacheError::Overflow {
                        key: key.to_string(),
                    });
                    return Op::Nop;
                };
                outcome = Ok(next);
                Op::Put(Entry {
                    value: Bytes::from(next.to_string()),
                    expires_at,
                })
            });
        outcome
    }

    /// Sets a new TTL on an existing key; false if there is none.
    pub fn expire(&self, key: &str, ttl: Duration) -> bool {
        let mut found = false;
        self.entries
            .entry(key.to_string())
            .and_compute_with(
                |current| match current.map(|e| e.into_value()).filter(live) {
                    Some(mut entry) => {
                        found = true;
                        entry.expires_at = Some(Instant::now() + ttl);
                        Op::Put(entry)
                    }
                    None => Op::Nop,
                },
            );
        found
    }
}

/// Time allowed for one cache operation on Redis before falling back to memory.
pub const REDIS_CACHE_OP_TIMEOUT: Duration = Duration::from_millis(150);
/// How often the health checker pings Redis.
pub const HEALTH_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Time allowed for a health ping.
pub const HEALTH_PING_TIMEOUT: Duration = Duration::from_millis(400);
/// Successful pings in a row before the cache goes back to Redis (hysteresis: no flapping).
pub const HEALTHY_AFTER_PINGS: u32 = 3;

/// Adds `amount` and, if this call created the counter, sets its TTL, as the WIT promises
/// and [`MemoryCache::increment`] does: an existing counter keeps its expiry, or its lack of
/// one (one key: Cluster-safe).
const INCREMENT_WITH_TTL: &str = r"
local created = redis.call('EXISTS', KEYS[1]) == 0
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if created and tonumber(ARGV[2]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return value
";

/// What `/health/redis` reports (the seed's three shapes).
#[derive(Clone, Debug, PartialEq)]
pub enum RedisHealth {
    Healthy { latency_ms: f64 },
    Unhealthy { error: String },
    Disabled,
}

struct RedisCache {
    link: Arc<RedisLink>,
    prefix: String,
    /// Operations go to Redis only while this is set.
    healthy: AtomicBool,
    report: std::sync::Mutex<(RedisHealth, u32)>,
}

impl RedisCache {
    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn mark_unhealthy(&self, error: &RedisOpError) {
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                "redis cache unavailable ({error}); using the in-memory cache until it recovers"
            );
        }
        let mut report = self.report.lock().unwrap_or_else(|p| p.into_inner());
        *report = (
            RedisHealth::Unhealthy {
                error: error.to_string(),
            },
            0,
        );
    }

    fn note_ping(&self, result: Result<Duration, RedisOpError>) {
        match result {
            Ok(latency) => {
                let mut report = self.report.lock().unwrap_or_else(|p| p.into_inner());
                let streak = report.1.saturating_add(1);
                let latency_ms = (latency.as_secs_f64() * 1000.0 * 100.0).round() / 100.0;
                let was_healthy = self.healthy.load(Ordering::Acquire);
                if was_healthy || streak >= HEALTHY_AFTER_PINGS {
                    *report = (RedisHealth::Healthy { latency_ms }, streak);
                    if !was_healthy {
                        self.healthy.store(true, Ordering::Release);
                        tracing::info!("redis cache is back ({latency_ms} ms); using it again");
                    }
                } else {
                    report.1 = streak;
                }
            }
            Err(e) => self.mark_unhealthy(&e),
        }
    }
}

/// Backend label of operations Redis served.
const REDIS: &str = "redis";
/// Backend label of operations the in-memory cache served (Redis off, unhealthy or failing).
const MEMORY: &str = "memory";

fn counted(backend: &'static str, op: &'static str) {
    crate::metrics::cache_op(backend, op);
}

/// The cache as callers see it: Redis while it is healthy, memory otherwise. Cloning shares
/// the same data. Values written to memory during an outage stay there (they are caches).
#[derive(Clone, Default)]
pub struct Cache {
    memory: Arc<MemoryCache>,
    redis: Option<Arc<RedisCache>>,
}

impl Cache {
    pub fn in_memory() -> Cache {
        Cache::default()
    }

    /// A Redis-backed cache with in-memory fallback; keys are stored under `prefix`.
    /// Starts the health checker, which also decides when to go back to Redis.
    pub fn with_redis(link: Arc<RedisLink>, prefix: &str) -> Cache {
        let redis = Arc::new(RedisCache {
            link,
            prefix: prefix.to_string(),
            healthy: AtomicBool::new(false),
            report: std::sync::Mutex::new((
                RedisHealth::Unhealthy {
                    error: "not checked yet".into(),
                },
                HEALTHY_AFTER_PINGS - 1,
            )),
        });
        let weak = Arc::downgrade(&redis);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEALTH_CHECK_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(redis) = weak.upgrade() else { return };
                let result = redis.link.ping(HEALTH_PING_TIMEOUT).await;
                redis.note_ping(result);
            }
        });
        Cache {
            memory: Arc::new(MemoryCache::default()),
            redis: Some(redis),
        }
    }

    pub fn health(&self) -> RedisHealth {
        match &self.redis {
            None => RedisHealth::Disabled,
            Some(redis) => redis
                .report
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .0
                .clone(),
        }
    }

    /// Redis, if it is configured and currently healthy.
    fn live_redis(&self) -> Option<&RedisCache> {
        self.redis
            .as_deref()
            .filter(|r| r.healthy.load(Ordering::Acquire))
    }

    async fn on_redis<T: redis::FromRedisValue>(
        &self,
        redis: &RedisCache,
        cmd: &redis::Cmd,
    ) -> Option<T> {
        match redis.link.query(cmd, REDIS_CACHE_OP_TIMEOUT).await {
            Ok(value) => Some(value),
            Err(e) => {
                redis.mark_unhealthy(&e);
                None
            }
        }
    }

    pub async fn get(&self, key: &str) -> Option<Bytes> {
        if let Some(redis) = self.live_redis()
            && let Some(value) = self
                .on_redis::<Option<Vec<u8>>>(redis, redis::cmd("GET").arg(redis.key(key)))
                .await
        {
            counted(REDIS, "get");
            return value.map(Bytes::from);
        }
        counted(MEMORY, "get");
        self.memory.get(key)
    }

    /// `ttl` `None` applies [`DEFAULT_TTL`].
    pub async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) {
        let ttl = ttl.unwrap_or(DEFAULT_TTL);
        if let Some(redis) = self.live_redis() {
            let mut cmd = redis::cmd("SET");
            cmd.arg(redis.key(key))
                .arg(value.as_ref())
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64);
            if self.on_redis::<()>(redis, &cmd).await.is_some() {
                counted(REDIS, "set");
                return;
            }
        }
        counted(MEMORY, "set");
        self.memory.set(key, value, Some(ttl));
    }

    pub async fn delete(&self, key: &str) -> bool {
        if let Some(redis) = self.live_redis()
            && let Some(n) = self
                .on_redis::<i64>(redis, redis::cmd("DEL").arg(redis.key(key)))
                .await
        {
            counted(REDIS, "delete");
            return n > 0;
        }
        counted(MEMORY, "delete");
        self.memory.delete(key)
    }

    pub async fn exists(&self, key: &str) -> bool {
        if let Some(redis) = self.live_redis()
            && let Some(n) = self
                .on_redis::<i64>(redis, redis::cmd("EXISTS").arg(redis.key(key)))
                .await
        {
            counted(REDIS, "exists");
            return n > 0;
        }
        counted(MEMORY, "exists");
        self.memory.exists(key)
    }

    pub async fn increment(
        &self,
        key: &str,
        amount: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, CacheError> {
        if let Some(redis) = self.live_redis() {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(INCREMENT_WITH_TTL)
                .arg(1)
                .arg(redis.key(key))
                .arg(amount)
                .arg(ttl.map_or(0, |t| t.as_secs().max(1)));
            match redis.link.query::<i64>(&cmd, REDIS_CACHE_OP_TIMEOUT).await {
                Ok(value) => {
                    counted(REDIS, "increment");
                    return Ok(value);
                }
                Err(RedisOpError::Other(text))
                    if text.contains("not an integer") || text.contains("overflow") =>
                {
                    counted(REDIS, "increment");
                    return Err(if text.contains("overflow") {
                        CacheError::Overflow {
                            key: key.to_string(),
                        }
                    } else {
                        CacheError::NotAnInteger {
                            key: key.to_string(),
                        }
                    });
                }
                Err(e) => redis.mark_unhealthy(&e),
            }
        }
        counted(MEMORY, "increment");
        self.memory.increment(key, amount, ttl)
    }

    /// Several increments in one call: one pipelined round trip on a single Redis server;
    /// on Cluster (keys in different slots) the increments run concurrently. Each result is
    /// what [`increment`](Self::increment) would have returned.
    pub async fn increment_many(
        &self,
        ops: &[(String, i64, Option<Duration>)],
    ) -> Vec<Result<i64, CacheError>> {
        if let Some(redis) = self.live_redis()
            && !redis.link.is_cluster()
            && ops.len() > 1
        {
            let mut pipe = redis::pipe();
            for (key, amount, ttl) in ops {
                pipe.cmd("EVAL")
                    .arg(INCREMENT_WITH_TTL)
                    .arg(1)
                    .arg(redis.key(key))
                    .arg(*amount)
                    .arg(ttl.map_or(0, |t| t.as_secs().max(1)));
            }
            match redis
                .link
                .query_pipeline::<Vec<i64>>(&pipe, REDIS_CACHE_OP_TIMEOUT)
                .await
            {
                Ok(values) if values.len() == ops.len() => {
                    for _ in &values {
                        counted(REDIS, "increment");
                    }
                    return values.into_iter().map(Ok).collect();
                }
                // A counter holding a non-integer fails the whole pipeline; the one-by-one
                // path below says which key it was.
                Err(RedisOpError::Other(text))
                    if text.contains("not an integer") || text.contains("overflow") => {}
                Ok(_) => {}
                Err(e) => redis.mark_unhealthy(&e),
            }
        }
        futures_util::future::join_all(
            ops.iter()
                .map(|(key, amount, ttl)| self.increment(key, *amount, *ttl)),
        )
        .await
    }

    pub async fn expire(&self, key: &str, ttl: Duration) -> bool {
        if let Some(redis) = self.live_redis()
            && let Some(n) = self
                .on_redis::<i64>(
                    redis,
                    redis::cmd("PEXPIRE")
                        .arg(redis.key(key))
                        .arg(ttl.as_millis().max(1) as u64),
                )
                .await
        {
            counted(REDIS, "expire");
            return n > 0;
        }
        counted(MEMORY, "expire");
        self.memory.expire(key, ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_delete_exists() {
        let c = MemoryCache::default();
        assert_eq!(c.get("k"), None);
        c.set("k", Bytes::from_static(b"v"), None);
        assert_eq!(c.get("k").as_deref(), Some(&b"v"[..]));
        assert!(c.exists("k"));
        assert!(c.delete("k"));
        assert!(!c.exists("k"));
        assert!(!c.delete("k"));
    }

    #[test]
    fn ttl_expires() {
        let c = MemoryCache::default();
        c.set(
            "k",
            Bytes::from_static(b"v"),
            Some(Duration::from_millis(30)),
        );
        assert!(c.exists("k"));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!c.exists("k"));
        assert!(!c.expire("k", Duration::from_secs(5)));
    }

    #[test]
    fn increment_counts_and_keeps_first_ttl() {
        let c = MemoryCache::default();
        assert_eq!(c.increment("n", 1, Some(Duration::from_millis(40))), Ok(1));
        assert_eq!(c.increment("n", 5, Some(Duration::from_secs(100))), Ok(6));
        std::thread::sleep(Duration::from_millis(70));
        assert_eq!(c.increment("n", 1, None), Ok(1), "expired counter restarts");
        c.set("s", Bytes::from_static(b"text"), None);
        assert!(matches!(
            c.increment("s", 1, None),
            Err(CacheError::NotAnInteger { .. })
        ));
        c.set("big", Bytes::from(i64::MAX.to_string()), None);
        assert!(matches!(
            c.increment("big", 1, None),
            Err(CacheError::Overflow { .. })
        ));
    }

    #[test]
    fn memory_is_bounded_by_bytes_not_entries() {
        let c = MemoryCache::default();
        // 100 MiB of values (one shared buffer, so the test itself stays small).
        let mib = Bytes::from(vec![7u8; 1024 * 1024]);
        for i in 0..100 {
            c.set(&format!("big{i}"), mib.clone(), None);
        }
        c.entries.run_pending_tasks();
        assert!(c.entries.weighted_size() <= MEMORY_CACHE_MAX_BYTES);
        assert!(c.entries.entry_count() < 100, "{}", c.entries.entry_count());
    }

    #[test]
    fn increments_are_atomic_across_threads() {
        let c = Arc::new(MemoryCache::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.increment("n", 1, None).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.get("n").as_deref(), Some(&b"4000"[..]));
    }
}
