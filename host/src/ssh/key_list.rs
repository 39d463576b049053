//! P0rt's key list: which keys may connect, with a tier each, as P0rt keeps it.
//!
//! - A JSON file (`authorized_keys.json`, P0rt's `P0RT_AUTHORIZED_KEYS`): an array of
//!   `{"fingerprint", "public_key", "comment", "tier", "added_at", "expires_at", "active"}`,
//!   as P0rt's `KeyStore` writes it (Go's `encoding/json`, two-space indent). `fingerprint`
//!   is OpenSSH's `SHA256:<base64, no padding>`; times are RFC 3339 (Go's `time.Time`, up
//!   to nanoseconds); `expires_at` is left out (or `null`) when the key never expires.
//! - Redis, when the domain store is Redis: one string per key, `<prefix>keys:<fingerprint>`
//!   (P0rt's `p0rt:keys:`), holding the same record as compact JSON. P0rt keeps no index
//!   set (it lists the keys with `KEYS p0rt:keys:*`) and gives a record with an expiry a
//!   Redis TTL ending then, so an expired key may also simply be gone.
//!
//! As in P0rt, a field left out reads as Go's zero value: no `active` means inactive, no
//! `tier` (or `""`) means none. A key is refused when it is inactive, or when `expires_at`
//! has passed; unknown fields are ignored.
//!
//! Edits take effect without a restart: the file is looked at (one `stat`) on every
//! authentication and parsed again when it changed; a Redis record is fetched again when
//! the copy held is older than [`KEY_LIST_REFRESH`].
//!
//! When Redis cannot be asked, the last answer it gave for the key, if at most
//! [`KEY_LIST_GRACE`] old, still holds: a key that was allowed keeps working through a
//! short outage (its expiry still checked against the clock), a key refused or unknown stays
//! out. A key Redis has not answered for within the grace is refused (fail closed: the key
//! list is a security control).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::redis_link::{RedisLink, RedisOpError};

/// P0rt's default key list: `authorized_keys.json` in the working directory.
pub const DEFAULT_KEY_LIST: &str = "authorized_keys.json";
/// Segment after the Redis prefix of P0rt's key records (`p0rt:keys:<fingerprint>`).
pub const REDIS_KEYS_SEGMENT: &str = "keys:";
/// How long an answer from Redis is used before asking again (edits take effect within it).
pub const KEY_LIST_REFRESH: Duration = Duration::from_secs(5);
/// How long the last answer from Redis still holds while Redis cannot be asked.
pub const KEY_LIST_GRACE: Duration = Duration::from_secs(10 * 60);
/// Time budget of one key lookup in Redis, during authentication.
pub const KEY_LOOKUP_TIMEOUT: Duration = Duration::from_millis(500);
/// Time budget of the startup check whether Redis holds a key list.
pub const KEY_LIST_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most Redis answers held in memory (the least recently used go first).
pub const MAX_CACHED_KEYS: u64 = 100_000;

/// One key of the list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEntry {
    /// `SHA256:…`.
    pub fingerprint: String,
    pub comment: String,
    /// `None` for P0rt's empty tier.
    pub tier: Option<Arc<str>>,
    pub expires_at: Option<OffsetDateTime>,
    pub active: bool,
}

impl KeyEntry {
    /// The key's tier if it may connect at `now`, else the sentence its holder is shown.
    pub fn judge(&self, now: OffsetDateTime) -> Result<Option<Arc<str>>, String> {
        if !self.active {
            return Err(format!(
                "p0rt: key {} is deactivated on this host; ask the host's operator to \
                 reactivate it",
                self.fingerprint
            ));
        }
        if let Some(expiry) = self.expires_at
            && now > expiry
        {
            let shown = expiry
                .to_offset(time::UtcOffset::UTC)
                .format(&Rfc3339)
                .unwrap_or_else(|_| expiry.to_string());
            return Err(format!(
                "p0rt: key {} expired at {shown}; ask the host's operator to renew it",
                self.fingerprint
            ));
        }
        Ok(self.tier.clone())
    }
}

/// One record as P0rt writes it; every field may be missing (Go's zero values).
#[derive(Deserialize)]
struct Record {
    fingerprint: Option<String>,
    public_key: Option<String>,
    comment: Option<String>,
    tier: Option<String>,
    added_at: Option<String>,
    expires_at: Option<String>,
    active: Option<bool>,
}

fn parse_time(value: &str, field: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(value.trim(), &Rfc3339)
        .map_err(|e| format!("{field} {value:?} is not an RFC 3339 time ({e})"))
}

impl Record {
    /// `fallback`: the fingerprint when the record names none (the Redis key's).
    fn into_entry(self, fallback: Option<&str>) -> Result<KeyEntry, String> {
        if let Some(added) = self.added_at.as_deref().filter(|t| !t.trim().is_empty()) {
            parse_time(added, "added_at")?;
        }
        let expires_at = match self.expires_at.as_deref().filter(|t| !t.trim().is_empty()) {
            Some(t) => Some(parse_time(t, "expires_at")?),
            None => None,
        };
        let named = self
            .fingerprint
            .map(|f| f.trim().to_string())
            .filter(|f| !f.is_empty());
        let fingerprint = match (named, fallback) {
            (Some(f), _) => f,
            (None, Some(f)) => f.to_string(),
            // P0rt always writes the fingerprint; a hand-written entry may give only the key.
            (None, None) => match self.public_key.as_deref().map(str::trim) {
                Some(line) if !line.is_empty() => russh::keys::PublicKey::from_openssh(line)
                    .map(|key| crate::names::fingerprint(&key))
                    .map_err(|e| format!("public_key is not an OpenSSH public key ({e})"))?,
                _ => return Err("it has neither a fingerprint nor a public_key".into()),
            },
        };
        let tier = self
            .tier
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .map(Arc::from);
        Ok(KeyEntry {
            fingerprint,
            comment: self.comment.unwrap_or_default(),
            tier,
            expires_at,
            active: self.active.unwrap_or(false),
        })
    }
}

/// A parsed key list file: entries by fingerprint (a later entry for the same fingerprint
/// replaces an earlier one, as in P0rt), and what looked wrong without making it unusable.
#[derive(Debug, Default)]
pub struct KeyList {
    pub entries: HashMap<String, KeyEntry>,
    pub warnings: Vec<String>,
}

impl KeyList {
    pub fn get(&self, fingerprint: &str) -> Option<&KeyEntry> {
        self.entries.get(fingerprint)
    }
}

/// Parses P0rt's `authorized_keys.json` (an empty file or `null` is an empty list).
pub fn parse_key_list(text: &str) -> Result<KeyList, String> {
    if text.trim().is_empty() {
        return Ok(KeyList::default());
    }
    let records: Option<Vec<Record>> = serde_json::from_str(text)
        .map_err(|e| format!("not P0rt's key list (a JSON array of key records): {e}"))?;
    let mut list = KeyList::default();
    for (i, record) in records.unwrap_or_default().into_iter().enumerate() {
        let entry = record
            .into_entry(None)
            .map_err(|e| format!("entry {} (counting from 1): {e}", i + 1))?;
        if !entry.fingerprint.starts_with("SHA256:") {
            list.warnings.push(format!(
                "entry {}: fingerprint {:?} is not SHA256:…, so no key ever matches it",
                i + 1,
                entry.fingerprint
            ));
        }
        if let Some(old) = list.entries.insert(entry.fingerprint.clone(), entry)
            && old.fingerprint.starts_with("SHA256:")
        {
            list.warnings.push(format!(
                "entry {}: {} is listed more than once; the last entry counts",
                i + 1,
                old.fingerprint
            ));
        }
    }
    Ok(list)
}

/// Parses the value of P0rt's `p0rt:keys:<fingerprint>` (the key's fingerprint, for a record
/// that names none).
pub fn parse_redis_record(text: &str, fingerprint: &str) -> Result<KeyEntry, String> {
    let record: Record =
        serde_json::from_str(text).map_err(|e| format!("not P0rt's key record: {e}"))?;
    record.into_entry(Some(fingerprint))
}

/// What a key list says about one fingerprint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Listed(KeyEntry),
    NotListed,
    /// The list cannot be read now.
    Unavailable,
}

/// One answer from Redis.
struct Fetched {
    at: Instant,
    entry: Option<KeyEntry>,
}

/// The key list in Redis, looked up per authentication with a short-lived copy per key.
pub struct RedisKeyList {
    link: Arc<RedisLink>,
    /// `<prefix>keys:`.
    prefix: String,
    answers: moka::sync::Cache<String, Arc<Fetched>>,
    /// A lookup failed since the last one that worked (logged once per outage).
    failing: AtomicBool,
}

impl RedisKeyList {
    /// `redis_prefix`: the host's Redis prefix (`p0rt:`).
    pub fn new(link: Arc<RedisLink>, redis_prefix: &str) -> RedisKeyList {
        RedisKeyList {
            link,
            prefix: format!("{redis_prefix}{REDIS_KEYS_SEGMENT}"),
            answers: moka::sync::Cache::builder()
                .max_capacity(MAX_CACHED_KEYS)
                .time_to_live(KEY_LIST_GRACE)
                .build(),
            failing: AtomicBool::new(false),
        }
    }

    /// `p0rt:keys:*`, for messages.
    pub fn pattern(&self) -> String {
        format!("{}<fingerprint>", self.prefix)
    }

    /// True if Redis holds at least one key record (asked once, at startup).
    pub async fn has_any(&self) -> Result<bool, RedisOpError> {
        let found = self
            .link
            .scan(&format!("{}*", self.prefix), 1, KEY_LIST_PROBE_TIMEOUT)
            .await?;
        Ok(!found.is_empty())
    }

    pub async fn lookup(&self, fingerprint: &str) -> Lookup {
        let held = self.answers.get(fingerprint);
        if let Some(held) = &held
            && held.at.elapsed() < KEY_LIST_REFRESH
        {
            return Self::answer(held);
        }
        let key = format!("{}{fingerprint}", self.prefix);
        let fetched: Result<Option<String>, RedisOpError> = self
            .link
            .query(redis::cmd("GET").arg(&key), KEY_LOOKUP_TIMEOUT)
            .await;
        match fetched {
            Ok(value) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("key list: Redis answers again");
                }
                let entry = match value.map(|text| parse_redis_record(&text, fingerprint)) {
                    None => None,
                    Some(Ok(entry)) => Some(entry),
                    Some(Err(e)) => {
                        // Not cached: fixed in Redis, it counts at the next authentication.
                        tracing::warn!("key list: {key}: {e}; refusing that key until it is fixed");
                        return Lookup::Unavailable;
                    }
                };
                let fresh = Arc::new(Fetched {
                    at: Instant::now(),
                    entry,
                });
                self.answers.insert(fingerprint.to_string(), fresh.clone());
                Self::answer(&fresh)
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "key list: cannot ask Redis ({e}); keys it answered for in the last {} \
                         min keep that answer, other keys are refused until it answers",
                        KEY_LIST_GRACE.as_secs() / 60
                    );
                }
                match held {
                    Some(held) => Self::answer(&held),
                    None => Lookup::Unavailable,
                }
            }
        }
    }

    fn answer(fetched: &Fetched) -> Lookup {
        match &fetched.entry {
            Some(entry) => Lookup::Listed(entry.clone()),
            None => Lookup::NotListed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> OffsetDateTime {
        OffsetDateTime::parse(text, &Rfc3339).unwrap()
    }

    /// Written as P0rt's `KeyStore.saveKeys` writes it: `json.Encoder` with two-space indent
    /// (so a trailing newline), `time.Time` as RFC 3339 with nanoseconds and the local
    /// offset, `expires_at` left out when nil.
    const P0RT_FILE: &str = r#"[
  {
    "fingerprint": "SHA256:kmZtjEBFE70cnyUIDbp3GEG08IpWli+0A9FdTs6VLA0",
    "public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOsCUSfHJhHR6q3vz9drM6foRlOutVYEBHbBOImrZZDv alice@laptop",
    "comment": "Alice",
    "tier": "premium",
    "added_at": "2025-06-21T14:03:12.345678901+02:00",
    "active": true
  },
  {
    "fingerprint": "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",
    "public_key": "",
    "comment": "Bob (by fingerprint)",
    "tier": "beta",
    "added_at": "2025-06-21T12:00:00Z",
    "expires_at": "2025-07-01T00:00:00Z",
    "active": true
  },
  {
    "fingerprint": "SHA256:Xr0eLcQeuVBvZ6Fz1rK9xgKJPYyKk0D0q1xnUZrH7c8",
    "public_key": "",
    "comment": "Carol",
    "tier": "free",
    "added_at": "2025-06-22T09:15:30.5Z",
    "expires_at": "2030-01-01T00:00:00+01:00",
    "active": false
  },
  {
    "fingerprint": "SHA256:9y5b9ZGBq8n1zVt3zRrTzGtq0s3oY5nq5b2cUo6Zk1A",
    "public_key": "",
    "comment": "",
    "tier": "",
    "added_at": "0001-01-01T00:00:00Z",
    "active": true
  }
]
"#;

    #[test]
    fn p0rts_file_parses_with_its_expired_and_inactive_keys() {
        let list = parse_key_list(P0RT_FILE).unwrap();
        assert!(list.warnings.is_empty(), "{:?}", list.warnings);
        assert_eq!(list.entries.len(), 4);
        let now = at("2025-08-01T00:00:00Z");

        let alice = list
            .get("SHA256:kmZtjEBFE70cnyUIDbp3GEG08IpWli+0A9FdTs6VLA0")
            .unwrap();
        assert_eq!(alice.comment, "Alice");
        assert_eq!(alice.expires_at, None);
        assert_eq!(alice.judge(now).unwrap().as_deref(), Some("premium"));

        let bob = list
            .get("SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU")
            .unwrap();
        assert_eq!(bob.expires_at, Some(at("2025-07-01T00:00:00Z")));
        let refused = bob.judge(now).unwrap_err();
        assert!(
            refused.contains("expired at 2025-07-01T00:00:00Z")
                && refused.contains("SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"),
            "{refused}"
        );
        // Before its expiry it was fine: expiry is checked at each login.
        assert_eq!(
            bob.judge(at("2025-06-30T23:59:59Z")).unwrap().as_deref(),
            Some("beta")
        );

        let carol = list
            .get("SHA256:Xr0eLcQeuVBvZ6Fz1rK9xgKJPYyKk0D0q1xnUZrH7c8")
            .unwrap();
        let refused = carol.judge(now).unwrap_err();
        assert!(refused.contains("deactivated"), "{refused}");

        // An empty tier is no tier.
        let anonymous = list
            .get("SHA256:9y5b9ZGBq8n1zVt3zRrTzGtq0s3oY5nq5b2cUo6Zk1A")
            .unwrap();
        assert_eq!(anonymous.judge(now).unwrap(), None);
        assert!(list.get("SHA256:unknown").is_none());
    }

    #[test]
    fn go_zero_values_and_hand_written_entries() {
        // No `active`: Go decodes false, so the key is refused, as in P0rt.
        let list = parse_key_list(
            r#"[{"fingerprint": "SHA256:a", "tier": "vip"},
                {"public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOsCUSfHJhHR6q3vz9drM6foRlOutVYEBHbBOImrZZDv", "active": true, "expires_at": null}]"#,
        )
        .unwrap();
        assert!(!list.get("SHA256:a").unwrap().active);
        // Only a public key: its fingerprint is computed.
        let by_key = list
            .get("SHA256:kmZtjEBFE70cnyUIDbp3GEG08IpWli+0A9FdTs6VLA0")
            .unwrap();
        assert!(by_key.active && by_key.tier.is_none());
        // Empty and `null` files are empty lists (P0rt writes `null` for an emptied store).
        assert!(parse_key_list("").unwrap().entries.is_empty());
        assert!(parse_key_list("null\n").unwrap().entries.is_empty());
        // Duplicates: the last one counts, with a warning.
        let dup = parse_key_list(
            r#"[{"fingerprint": "SHA256:a", "active": true},
                {"fingerprint": "SHA256:a", "active": false}]"#,
        )
        .unwrap();
        assert!(!dup.get("SHA256:a").unwrap().active);
        assert_eq!(dup.warnings.len(), 1, "{:?}", dup.warnings);
    }

    #[test]
    fn broken_lists_are_refused_with_the_entry_named() {
        for (text, wanted) in [
            ("{\"fingerprint\": \"SHA256:a\"}", "JSON array"),
            ("[{\"fingerprint\": \"SHA256:a\"", "JSON array"),
            (
                "[{\"fingerprint\": \"SHA256:a\", \"expires_at\": \"tomorrow\"}]",
                "entry 1 (counting from 1): expires_at \"tomorrow\"",
            ),
            (
                "[{\"fingerprint\": \"SHA256:a\"}, {\"comment\": \"x\"}]",
                "entry 2 (counting from 1): it has neither",
            ),
            (
                "[{\"fingerprint\": \"SHA256:a\", \"active\": \"yes\"}]",
                "JSON array",
            ),
        ] {
            let e = parse_key_list(text).unwrap_err();
            assert!(e.contains(wanted), "{text}: {e}");
        }
    }

    /// Redis out of reach: a key it answered for within the grace keeps that answer, any
    /// other key is refused (fail closed).
    #[tokio::test]
    async fn without_redis_only_recent_answers_hold() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("redis://127.0.0.1:{port}");
        let target = crate::redis_link::parse_target(&url, None, None).unwrap();
        let list = RedisKeyList::new(RedisLink::new(target, &url, None), "p0rt:");
        assert_eq!(list.pattern(), "p0rt:keys:<fingerprint>");
        assert_eq!(list.lookup("SHA256:unknown").await, Lookup::Unavailable);

        let entry =
            parse_redis_record(r#"{"tier":"premium","active":true}"#, "SHA256:known").unwrap();
        let stale = Instant::now()
            .checked_sub(KEY_LIST_REFRESH * 2)
            .unwrap_or_else(Instant::now);
        list.answers.insert(
            "SHA256:known".into(),
            Arc::new(Fetched {
                at: stale,
                entry: Some(entry.clone()),
            }),
        );
        list.answers.insert(
            "SHA256:gone".into(),
            Arc::new(Fetched {
                at: stale,
                entry: None,
            }),
        );
        assert_eq!(list.lookup("SHA256:known").await, Lookup::Listed(entry));
        assert_eq!(list.lookup("SHA256:gone").await, Lookup::NotListed);
        assert_eq!(list.lookup("SHA256:other").await, Lookup::Unavailable);
    }

    /// The value of `p0rt:keys:<fingerprint>` as P0rt's `saveKeyToRedis` writes it:
    /// `json.Marshal` (compact, HTML characters escaped).
    #[test]
    fn p0rts_redis_record_parses() {
        let fp = "SHA256:kmZtjEBFE70cnyUIDbp3GEG08IpWli+0A9FdTs6VLA0";
        let record = format!(
            r#"{{"fingerprint":"{fp}","public_key":"","comment":"Alice \u003cops\u003e","tier":"premium","added_at":"2025-06-21T14:03:12.345678901+02:00","expires_at":"2026-01-01T00:00:00Z","active":true}}"#
        );
        let entry = parse_redis_record(&record, fp).unwrap();
        assert_eq!(entry.fingerprint, fp);
        assert_eq!(entry.comment, "Alice <ops>");
        assert_eq!(
            entry.judge(at("2025-12-31T00:00:00Z")).unwrap().as_deref(),
            Some("premium")
        );
        assert!(entry.judge(at("2026-01-01T00:00:01Z")).is_err());
        let inactive = parse_redis_record(
            r#"{"fingerprint":"SHA256:b","public_key":"","comment":"","tier":"free","added_at":"2025-06-21T12:00:00Z","active":false}"#,
            "SHA256:b",
        )
        .unwrap();
        assert!(inactive.judge(at("2025-07-01T00:00:00Z")).is_err());
        // A record without a fingerprint stands for the key it is stored under.
        let bare = parse_redis_record(r#"{"active":true}"#, "SHA256:c").unwrap();
        assert_eq!(bare.fingerprint, "SHA256:c");
        assert!(parse_redis_record("not json", "SHA256:c").is_err());
    }
}
