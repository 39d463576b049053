//! The cache behind the plugins' `cache` interface, with the seed's verbs: get, set with TTL
//! (default 3600 s), delete, exists, increment, expire.
//!
//! [`Cache`] is what callers use; today it is backed by [`MemoryCache`] (moka, per-entry TTL,
//! bounded size). Its methods are async so a Redis backend can slot in behind the same calls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::Expiry;
use moka::ops::compute::Op;

/// TTL applied by `set` when the caller gives none (the seed's default).
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Most entries the in-memory cache holds; the least used are evicted beyond this.
pub const MEMORY_CACHE_MAX_ENTRIES: u64 = 1_000_000;

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
    fn expire_after_create(&self, _key: &String, value: &Entry, created_at: Instant) -> Option<Duration> {
        value.expires_at.map(|t| t.saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Entry,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        value.expires_at.map(|t| t.saturating_duration_since(updated_at))
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
                .max_capacity(MEMORY_CACHE_MAX_ENTRIES)
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
        self.entries.insert(key.to_string(), Entry { value, expires_at });
    }

    pub fn delete(&self, key: &str) -> bool {
        self.entries.remove(key).is_some_and(|e| live(&e))
    }

    pub fn exists(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Adds `amount` atomically; `ttl` applies only when this call creates the counter.
    pub fn increment(&self, key: &str, amount: i64, ttl: Option<Duration>) -> Result<i64, CacheError> {
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
                                outcome = Err(CacheError::NotAnInteger { key: key.to_string() });
                                return Op::Nop;
                            }
                        }
                    }
                    None => (0, ttl.map(|ttl| Instant::now() + ttl)),
                };
                let Some(next) = base.checked_add(amount) else {
                    outcome = Err(CacheError::Overflow { key: key.to_string() });
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
            .and_compute_with(|current| match current.map(|e| e.into_value()).filter(live) {
                Some(mut entry) => {
                    found = true;
                    entry.expires_at = Some(Instant::now() + ttl);
                    Op::Put(entry)
                }
                None => Op::Nop,
            });
        found
    }
}

/// The cache as callers see it. Cloning shares the same data.
#[derive(Clone, Default)]
pub struct Cache {
    memory: Arc<MemoryCache>,
}

impl Cache {
    pub fn in_memory() -> Cache {
        Cache::default()
    }

    pub async fn get(&self, key: &str) -> Option<Bytes> {
        self.memory.get(key)
    }

    /// `ttl` `None` applies [`DEFAULT_TTL`].
    pub async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) {
        self.memory.set(key, value, Some(ttl.unwrap_or(DEFAULT_TTL)));
    }

    pub async fn delete(&self, key: &str) -> bool {
        self.memory.delete(key)
    }

    pub async fn exists(&self, key: &str) -> bool {
        self.memory.exists(key)
    }

    pub async fn increment(&self, key: &str, amount: i64, ttl: Option<Duration>) -> Result<i64, CacheError> {
        self.memory.increment(key, amount, ttl)
    }

    pub async fn expire(&self, key: &str, ttl: Duration) -> bool {
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
        c.set("k", Bytes::from_static(b"v"), Some(Duration::from_millis(30)));
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
        assert!(matches!(c.increment("s", 1, None), Err(CacheError::NotAnInteger { .. })));
        c.set("big", Bytes::from(i64::MAX.to_string()), None);
        assert!(matches!(c.increment("big", 1, None), Err(CacheError::Overflow { .. })));
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
