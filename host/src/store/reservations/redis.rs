//! Reservations in Redis, with P0rt's keys and values:
//!
//! - string `reservation:domain:<name>` → fingerprint (the authority: a name is reserved for
//!   the key this says, and for no other);
//! - string `reservation:fingerprint:<fingerprint>` → name (trusted only when the name's key
//!   points back at it);
//! - string `reservation:details:<name>` → the reservation as compact JSON
//!   (`{"domain","fingerprint","created_at","updated_at","comment"}`, as P0rt's `json.Marshal`);
//! - set `reservations:list` → the reserved names.
//!
//! P0rt writes these without a prefix (its domain keys are `p0rt:domain:…`, its reservation
//! keys bare), so with the default prefix `p0rt:` p0rt reads and writes exactly those keys;
//! with another prefix, `<prefix>reservation:…`, so hosts with their own prefix keep their own
//! reservations. No key expires.
//!
//! Every command touches one key (Cluster puts these in different slots); an add takes the
//! name's key with a one-key script (set if absent), so two adds never reserve one name for
//! two keys. Answers are remembered, and used only while Redis is unreachable, so a key that
//! connected before keeps its name and a reserved name stays refused to others.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use super::{Added, Holder, Reservation, ReservationError, Reservations};
use crate::names::TunnelName;
use crate::redis_link::{RedisLink, RedisOpError};
use crate::store::Import;

/// Timeout for one reservation command.
pub const RESERVATION_OP_TIMEOUT: Duration = Duration::from_millis(1000);
/// Timeout for one step of the scan `list` makes.
pub const LIST_SCAN_TIMEOUT: Duration = Duration::from_secs(30);
/// Most answers remembered for when Redis is away.
pub const REMEMBERED_ANSWERS: u64 = 100_000;

/// Sets KEYS[1] to ARGV[1] unless it exists; returns what it holds now (one key).
const SET_IF_ABSENT: &str = r"
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return current
";

/// Deletes KEYS[1] only if it still holds ARGV[1] (one key).
const COMPARE_AND_DELETE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Outcome of [`RedisReservations::claim`].
enum Claim {
    Claimed,
    /// The name is reserved for this other fingerprint.
    NameHeldBy(String),
    /// The key holds this other reserved name.
    KeyHolds(String),
}

pub struct RedisReservations {
    link: Arc<RedisLink>,
    prefix: String,
    /// `n:<fingerprint>` → reserved name, `h:<name>` → holder; `None` for "none".
    remembered: moka::sync::Cache<String, Option<String>>,
    handover: AtomicBool,
}

/// The prefix of the reservation keys for the configured Redis prefix: none for the default
/// (P0rt's bare keys), else the configured one.
pub fn key_prefix(configured: &str) -> &str {
    if configured == crate::config::DEFAULT_REDIS_PREFIX {
        ""
    } else {
        configured
    }
}

fn unavailable(e: RedisOpError) -> ReservationError {
    ReservationError::Unavailable(e.to_string())
}

impl RedisReservations {
    pub fn new(link: Arc<RedisLink>, configured_prefix: &str) -> RedisReservations {
        RedisReservations {
            link,
            prefix: key_prefix(configured_prefix).to_string(),
            remembered: moka::sync::Cache::new(REMEMBERED_ANSWERS),
            handover: AtomicBool::new(true),
        }
    }

    pub fn domain_key(&self, name: &str) -> String {
        format!("{}reservation:domain:{name}", self.prefix)
    }

    pub fn fingerprint_key(&self, fingerprint: &str) -> String {
        format!("{}reservation:fingerprint:{fingerprint}", self.prefix)
    }

    pub fn details_key(&self, name: &str) -> String {
        format!("{}reservation:details:{name}", self.prefix)
    }

    pub fn list_key(&self) -> String {
        format!("{}reservations:list", self.prefix)
    }

    /// `GET key`: `Err(problem)` inside `Ok` when the key is not a string.
    async fn get(&self, key: &str) -> Result<Result<Option<String>, String>, RedisOpError> {
        match self
            .link
            .query::<Option<String>>(redis::cmd("GET").arg(key), RESERVATION_OP_TIMEOUT)
            .await
        {
            Ok(value) => Ok(Ok(value)),
            Err(RedisOpError::WrongType { detail, .. }) => {
                Ok(Err(format!("is not a string ({detail})")))
            }
            Err(e) => Err(e),
        }
    }

    /// The answer to `what` from Redis, remembered; while Redis is unreachable, the answer
    /// remembered last time, if there is one.
    async fn remembered_or(
        &self,
        what: String,
        ask: impl Future<Output = Result<Option<String>, RedisOpError>>,
    ) -> Result<Option<String>, ReservationError> {
        match ask.await {
            Ok(answer) => {
                self.remembered.insert(what, answer.clone());
                Ok(answer)
            }
            Err(e) => match self.remembered.get(&what) {
                Some(answer) => Ok(answer),
                None => Err(unavailable(e)),
            },
        }
    }

    /// The reservation stored for `name`, from its details (checked against its domain key),
    /// or built from the domain key alone. `Err` names a key p0rt cannot read.
    async fn read(&self, name: &str) -> Result<Option<Reservation>, ReservationError> {
        let domain_key = self.domain_key(name);
        let holder = self
            .get(&domain_key)
            .await
            .map_err(unavailable)?
            .map_err(|problem| ReservationError::BadKey {
                key: domain_key.clone(),
                problem,
            })?;
        let Some(fingerprint) = holder else {
            return Ok(None);
        };
        let details_key = self.details_key(name);
        let details = self.get(&details_key).await.map_err(unavailable)?;
        let bad = |problem: String| ReservationError::BadKey {
            key: details_key.clone(),
            problem,
        };
        let mut reservation = match details.map_err(bad)? {
            Some(text) => serde_json::from_str::<Reservation>(&text)
                .map_err(|e| bad(format!("is not a P0rt reservation ({e})")))?,
            None => Reservation {
                domain: name.to_string(),
                fingerprint: fingerprint.clone(),
                created_at: None,
                updated_at: None,
                comment: None,
                other: serde_json::Map::new(),
            },
        };
        // The domain key decides whose it is.
        reservation.fingerprint = fingerprint;
        Ok(Some(reservation))
    }

    async fn set(&self, key: &str, value: &str) -> Result<(), ReservationError> {
        self.link
            .query::<()>(
                redis::cmd("SET").arg(key).arg(value),
                RESERVATION_OP_TIMEOUT,
            )
            .await
            .map_err(unavailable)
    }

    async fn set_if_absent(&self, key: &str, value: &str) -> Result<String, ReservationError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SET_IF_ABSENT).arg(1).arg(key).arg(value);
        match self.link.query(&cmd, RESERVATION_OP_TIMEOUT).await {
            Ok(current) => Ok(current),
            Err(RedisOpError::WrongType { detail, .. }) => Err(ReservationError::BadKey {
                key: key.to_string(),
                problem: format!("is not a string ({detail})"),
            }),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn compare_and_delete(&self, key: &str, value: &str) -> Result<(), ReservationError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(COMPARE_AND_DELETE).arg(1).arg(key).arg(value);
        self.link
            .query::<i64>(&cmd, RESERVATION_OP_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    /// Writes the details and the list entry of a reservation whose keys are in place.
    async fn write_details(&self, reservation: &Reservation) -> Result<(), ReservationError> {
        let text = serde_json::to_string(reservation).unwrap_or_default();
        self.set(&self.details_key(&reservation.domain), &text)
            .await?;
        self.link
            .query::<i64>(
                redis::cmd("SADD")
                    .arg(self.list_key())
                    .arg(&reservation.domain),
                RESERVATION_OP_TIMEOUT,
            )
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    /// Takes `name` for `fingerprint` with two one-key claims: the name's key (set if
    /// absent), then the key's back-pointer. When the key already holds another live
    /// reservation, the name's claim is given back if `release_on_conflict` (it was new).
    async fn claim(
        &self,
        name: &TunnelName,
        fingerprint: &str,
        release_on_conflict: bool,
    ) -> Result<Claim, ReservationError> {
        let domain_key = self.domain_key(name.as_str());
        let holder = self.set_if_absent(&domain_key, fingerprint).await?;
        if holder != fingerprint {
            return Ok(Claim::NameHeldBy(holder));
        }
        let fingerprint_key = self.fingerprint_key(fingerprint);
        let held = self.set_if_absent(&fingerprint_key, name.as_str()).await?;
        if held != name.as_str() {
            // Another name, unless that one's domain key no longer points here (stale).
            let other_holder = self
                .get(&self.domain_key(&held))
                .await
                .map_err(unavailable)?;
            if other_holder.ok().flatten().as_deref() == Some(fingerprint) {
                if release_on_conflict {
                    self.compare_and_delete(&domain_key, fingerprint).await?;
                }
                return Ok(Claim::KeyHolds(held));
            }
            self.set(&fingerprint_key, name.as_str()).await?;
        }
        Ok(Claim::Claimed)
    }

    fn forget(&self, name: &str, fingerprint: &str) {
        self.remembered.invalidate(&format!("h:{name}"));
        self.remembered.invalidate(&format!("n:{fingerprint}"));
    }
}

#[async_trait]
impl Reservations for RedisReservations {
    async fn name_for(&self, fingerprint: &str) -> Result<Option<TunnelName>, ReservationError> {
        if !self.handover.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let ask = async {
            let key = self.fingerprint_key(fingerprint);
            let Ok(Some(name)) = self.get(&key).await? else {
                return Ok(None);
            };
            // Only if the name's key agrees (a removal interrupted half-way leaves this one).
            let holder = self.get(&self.domain_key(&name)).await?;
            Ok((holder.ok().flatten().as_deref() == Some(fingerprint)).then_some(name))
        };
        let name = self.remembered_or(format!("n:{fingerprint}"), ask).await?;
        Ok(name.and_then(|n| match TunnelName::parse(&n) {
            Ok(name) => Some(name),
            Err(e) => {
                tracing::warn!(
                    "{} holds {n:?}, which is not a name p0rt can serve ({e})",
                    self.fingerprint_key(fingerprint)
                );
                None
            }
        }))
    }

    async fn holder_of(&self, name: &str) -> Result<Option<Holder>, ReservationError> {
        let key = self.domain_key(name);
        let ask = async {
            Ok(match self.get(&key).await? {
                Ok(holder) => holder.map(|f| format!("f:{f}")),
                Err(problem) => Some(format!("?:redis key {key} {problem}")),
            })
        };
        let holder = self.remembered_or(format!("h:{name}"), ask).await?;
        Ok(holder.map(|h| match h.split_once(':') {
            Some(("f", fingerprint)) => Holder::Fingerprint(fingerprint.to_string()),
            _ => {
                tracing::warn!("{}; the name {name} goes to no key", &h[2..]);
                Holder::Unreadable(h[2..].to_string())
            }
        }))
    }

    async fn list(&self) -> Result<Vec<Reservation>, ReservationError> {
        let listed: Vec<String> = match self
            .link
            .query(
                redis::cmd("SMEMBERS").arg(self.list_key()),
                RESERVATION_OP_TIMEOUT,
            )
            .await
        {
            Ok(names) => names,
            Err(RedisOpError::WrongType { .. }) => Vec::new(),
            Err(e) => return Err(unavailable(e)),
        };
        // Names whose domain key exists but which the list misses are reserved all the same.
        let domain_prefix = self.domain_key("");
        let scanned = self
            .link
            .scan(&format!("{domain_prefix}*"), usize::MAX, LIST_SCAN_TIMEOUT)
            .await
            .map_err(unavailable)?;
        let mut names: Vec<String> = listed
            .into_iter()
            .chain(
                scanned
                    .iter()
                    .filter_map(|k| k.strip_prefix(&domain_prefix).map(str::to_string)),
            )
            .collect();
        names.sort();
        names.dedup();
        let mut list = Vec::new();
        for name in names {
            match self.read(&name).await {
                Ok(Some(reservation)) => list.push(reservation),
                Ok(None) => {}
                Err(ReservationError::BadKey { key, problem }) => {
                    tracing::warn!("redis key {key} {problem}; listed from its domain key");
                    if let Ok(Ok(Some(fingerprint))) = self.get(&self.domain_key(&name)).await {
                        list.push(Reservation {
                            domain: name,
                            fingerprint,
                            created_at: None,
                            updated_at: None,
                            comment: None,
                            other: serde_json::Map::new(),
                        });
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(list)
    }

    async fn add(
        &self,
        name: &TunnelName,
        fingerprint: &str,
        comment: Option<&str>,
    ) -> Result<Added, ReservationError> {
        // Whatever is there must be readable before anything is written.
        let existing = self.read(name.as_str()).await?;
        match self.claim(name, fingerprint, existing.is_none()).await? {
            Claim::Claimed => {}
            Claim::NameHeldBy(holder) => {
                return Err(ReservationError::Conflict(format!(
                    "{name} is already reserved for another key ({holder}); remove that \
                     reservation first"
                )));
            }
            Claim::KeyHolds(held) => {
                return Err(ReservationError::Conflict(format!(
                    "key {fingerprint} already holds the reservation {held}; a key holds one \
                     reserved name: remove {held} first"
                )));
            }
        }
        let added = match existing {
            Some(old) if old.fingerprint == fingerprint => Added::Renewed(old.renewed(comment)),
            _ => Added::Created(Reservation::new(name, fingerprint, comment)),
        };
        let (Added::Created(reservation) | Added::Renewed(reservation)) = &added;
        self.write_details(reservation).await?;
        self.forget(name.as_str(), fingerprint);
        Ok(added)
    }

    async fn import(&self, record: &Reservation) -> Result<Import, ReservationError> {
        let (name, copy) = match super::importable(record) {
            Ok(ready) => ready,
            Err(refused) => return Ok(refused),
        };
        let fingerprint = copy.fingerprint.as_str();
        if let Some(existing) = self.read(name.as_str()).await? {
            return Ok(if existing.fingerprint == fingerprint {
                Import::AlreadyPresent
            } else {
                Import::Conflict(format!(
                    "{name} is reserved for {} here and for {fingerprint} in the source; \
                     nothing changed",
                    existing.fingerprint
                ))
            });
        }
        // The same two one-key claims as `add`, so an import never races an add.
        match self.claim(&name, fingerprint, true).await? {
            Claim::Claimed => {}
            Claim::NameHeldBy(holder) => {
                return Ok(Import::Conflict(format!(
                    "{name} is reserved for {holder} here and for {fingerprint} in the source; \
                     nothing changed"
                )));
            }
            Claim::KeyHolds(held) => {
                return Ok(Import::Conflict(format!(
                    "key {fingerprint} holds the reservation {held} here and {name} in the \
                     source; nothing changed"
                )));
            }
        }
        self.write_details(&copy).await?;
        self.forget(name.as_str(), fingerprint);
        Ok(Import::Imported)
    }

    async fn remove(&self, name: &TunnelName) -> Result<Option<Reservation>, ReservationError> {
        let Some(reservation) = self.read(name.as_str()).await? else {
            return Ok(None);
        };
        let fingerprint = &reservation.fingerprint;
        // The domain key first: once it is gone the name is free, whatever follows.
        self.compare_and_delete(&self.domain_key(name.as_str()), fingerprint)
            .await?;
        self.compare_and_delete(&self.fingerprint_key(fingerprint), name.as_str())
            .await?;
        self.link
            .query::<i64>(
                redis::cmd("DEL").arg(self.details_key(name.as_str())),
                RESERVATION_OP_TIMEOUT,
            )
            .await
            .map_err(unavailable)?;
        self.link
            .query::<i64>(
                redis::cmd("SREM").arg(self.list_key()).arg(name.as_str()),
                RESERVATION_OP_TIMEOUT,
            )
            .await
            .map_err(unavailable)?;
        self.forget(name.as_str(), fingerprint);
        Ok(Some(reservation))
    }

    fn location(&self) -> String {
        format!(
            "redis at {} (keys {}reservation:*)",
            self.link.display, self.prefix
        )
    }

    fn set_handover(&self, on: bool) {
        self.handover.store(on, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What P0rt's `setReservation` stores under `reservation:details:<d>`
    /// (`json.Marshal` of its struct; Go times with nanoseconds and offset).
    const P0RT_DETAILS: &str = r#"{"domain":"happy-cat-jump","fingerprint":"SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s","created_at":"2025-01-15T10:30:00.123456789+01:00","updated_at":"2025-01-15T10:30:00.123456789+01:00","comment":"My project"}"#;

    #[test]
    fn p0rt_details_read_and_write_back_unchanged() {
        let r: Reservation = serde_json::from_str(P0RT_DETAILS).unwrap();
        assert_eq!(r.name().unwrap().as_str(), "happy-cat-jump");
        assert_eq!(r.comment.as_deref(), Some("My project"));
        assert_eq!(serde_json::to_string(&r).unwrap(), P0RT_DETAILS);
        // An empty comment is left out, as Go's `omitempty` does.
        let mut r = r;
        r.comment = Some(String::new());
        assert!(!serde_json::to_string(&r).unwrap().contains("comment"));
    }

    /// A link that is never opened: key names only.
    fn reservations(prefix: &str) -> RedisReservations {
        let url = "redis://127.0.0.1:1";
        let target = crate::redis_link::parse_target(url, None, None).unwrap();
        RedisReservations::new(RedisLink::new(target, url, None), prefix)
    }

    #[test]
    fn keys_are_p0rts_under_the_default_prefix() {
        let fp = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";
        let p0rt = reservations(crate::config::DEFAULT_REDIS_PREFIX);
        assert_eq!(p0rt.domain_key("a-b-c"), "reservation:domain:a-b-c");
        assert_eq!(
            p0rt.fingerprint_key(fp),
            format!("reservation:fingerprint:{fp}")
        );
        assert_eq!(p0rt.details_key("a-b-c"), "reservation:details:a-b-c");
        assert_eq!(p0rt.list_key(), "reservations:list");
        let own = reservations("team2:");
        assert_eq!(own.domain_key("a-b-c"), "team2:reservation:domain:a-b-c");
        assert_eq!(own.list_key(), "team2:reservations:list");
    }
}
