//! The operator's bans of names and keys (the admin API's `bans/names/…` and `bans/keys/…`),
//! beside the address bans of [`super`]: a banned name is served to nobody (its live tunnel
//! is closed, `ssh -R` for it is refused, HTTP for it answers 410), a banned key may not log
//! in (its live sessions are closed). A ban may expire, or hold until lifted.
//!
//! Stored where the address bans are: Redis hashes `{prefix}name-bans` and `{prefix}key-bans`
//! (field: the name or key, value: the ban as JSON), shared by every host on that Redis; else
//! `bans.json` in the data directory. Every host keeps a copy in memory ([`Snapshot`]), which
//! the per-request and per-login checks read without a lookup; it is renewed every
//! [`REFRESH_INTERVAL`] (and at once after a change made on this host), so a ban made on one
//! host holds on the others within that interval. On Redis a renewal reads one counter,
//! `{prefix}identity-bans-version`, which every change bumps; the hashes themselves are read
//! only when it moved, and at least every [`FULL_READ_INTERVAL`]. Bans that have ended are
//! deleted from the hashes when the operator next bans or lifts one ([`PRUNE_SCRIPT`]).
//!
//! A key is named by its fingerprint as `ssh-keygen -lf` prints it (`SHA256:…`) or by the
//! key hash the domain store keeps (64 hex digits); a ban matches a key by either.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{BAN_OP_TIMEOUT, Backend, BanError, BanList, mtime, now, read_file};
use crate::redis_link::RedisLink;

/// How often a host renews its copy of the name and key bans from the store.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(2);
/// Longest reason kept with a ban.
pub const MAX_REASON_CHARS: usize = 200;
/// Most name bans plus key bans a store holds (each host keeps them all in memory).
pub const MAX_IDENTITY_BANS: usize = 100_000;
/// Longest a host on Redis goes without reading the bans in full, even when the change
/// counter did not move: picks up edits made in Redis by hand, or by hosts of a version that
/// does not bump the counter (during an upgrade).
pub const FULL_READ_INTERVAL: Duration = Duration::from_secs(60);
/// The Redis counter (under the prefix) bumped after every change of a name or key ban.
pub const VERSION_KEY: &str = "identity-bans-version";
/// Most ended bans deleted from Redis in one pipeline.
const PRUNE_BATCH: usize = 500;
/// Deletes one field of a ban hash only if the ban stored there now has ended, so a ban made
/// again in the meantime (a later end, or none) is never deleted; entries p0rt cannot read
/// (not JSON, no numeric `until`) are left alone. KEYS[1]: the hash; ARGV: field, now.
pub const PRUNE_SCRIPT: &str = r#"
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if not stored then return 0 end
local ok, ban = pcall(cjson.decode, stored)
if ok and type(ban) == 'table' and type(ban['until']) == 'number'
    and ban['until'] <= tonumber(ARGV[2]) then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"#;

/// When and at which change counter this host last read the bans in full from Redis.
#[derive(Debug)]
pub(super) struct FullRead {
    version: Option<String>,
    at: std::time::Instant,
}

/// A ban of one name or one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityBan {
    /// The name, or the key (`SHA256:…` or a hex key hash).
    pub target: String,
    /// Unix seconds.
    pub since: i64,
    /// Unix seconds; `None`: until lifted.
    pub until: Option<i64>,
    pub reason: String,
}

impl IdentityBan {
    pub fn in_force(&self, now: i64) -> bool {
        self.until.is_none_or(|until| until > now)
    }

    /// As the admin API and `p0rt security bans --json` show it: the target under the
    /// kind's name (`name` or `key`), `since`, `until` (`null`: until lifted), `reason`.
    pub fn to_json(&self, kind: Identity) -> serde_json::Value {
        serde_json::json!({
            kind.as_str(): self.target,
            "since": self.since,
            "until": self.until,
            "reason": self.reason,
        })
    }
}

/// What is banned: a name, or a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    Name,
    Key,
}

impl Identity {
    /// The Redis hash holding this kind's bans (under the prefix).
    fn hash(self) -> &'static str {
        match self {
            Identity::Name => "name-bans",
            Identity::Key => "key-bans",
        }
    }

    /// The metric label and JSON field of this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Identity::Name => "name",
            Identity::Key => "key",
        }
    }
}

/// The name and key bans as this host last read them.
#[derive(Default, Debug)]
pub struct Snapshot {
    names: HashMap<String, IdentityBan>,
    keys: HashMap<String, IdentityBan>,
}

impl Snapshot {
    pub(super) fn of_file(data: &super::BanFile) -> Snapshot {
        Snapshot {
            names: data.names.clone().into_iter().collect(),
            keys: data.keys.clone().into_iter().collect(),
        }
    }

    fn of(&self, kind: Identity) -> &HashMap<String, IdentityBan> {
        match kind {
            Identity::Name => &self.names,
            Identity::Key => &self.keys,
        }
    }
}

/// The change counter of the name and key bans (`None` while no change was ever made).
async fn read_version(link: &Arc<RedisLink>, prefix: &str) -> Result<Option<String>, BanError> {
    link.query(
        redis::cmd("GET").arg(format!("{prefix}{VERSION_KEY}")),
        BAN_OP_TIMEOUT,
    )
    .await
    .map_err(|e| BanError::Unavailable(e.to_string()))
}

/// Tells every host the bans changed. Sent only after the change itself succeeded, so a host
/// that sees the new count reads the change with it. Best effort: the change is made, and
/// without the count the other hosts read it within [`FULL_READ_INTERVAL`].
async fn bump_version(link: &Arc<RedisLink>, prefix: &str) {
    if let Err(e) = link
        .query::<i64>(
            redis::cmd("INCR").arg(format!("{prefix}{VERSION_KEY}")),
            BAN_OP_TIMEOUT,
        )
        .await
    {
        tracing::warn!(
            "the ban change is made, but other hosts learn of it only within {} s: {e}",
            FULL_READ_INTERVAL.as_secs()
        );
    }
}

/// A key as a ban names it: a fingerprint as OpenSSH prints it, or a lowercase hex key
/// hash. `Err` says what a key looks like.
pub fn check_key(key: &str) -> Result<String, String> {
    let key = key.trim();
    if key.starts_with("SHA256:") {
        return crate::store::reservations::check_fingerprint(key)
            .map(|()| key.to_string())
            .map_err(|e| e.to_string());
    }
    if key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(key.to_ascii_lowercase());
    }
    Err(format!(
        "{key:?} is not a key: give its fingerprint as `ssh-keygen -lf KEY.pub` prints it \
         (SHA256:…) or its key hash (64 hex digits)"
    ))
}

impl BanList {
    /// The ban in force on `name`, per this host's copy (no lookup).
    pub fn name_banned(&self, name: &str) -> Option<IdentityBan> {
        let snapshot = self.snapshot();
        let ban = snapshot.names.get(name)?;
        ban.in_force(now()).then(|| ban.clone())
    }

    /// The ban in force on the key with `fingerprint` and `hash`, per this host's copy.
    pub fn key_banned(&self, fingerprint: &str, hash: &str) -> Option<IdentityBan> {
        let snapshot = self.snapshot();
        let now = now();
        [fingerprint, hash]
            .iter()
            .filter(|k| !k.is_empty())
            .find_map(|k| snapshot.keys.get(*k).filter(|b| b.in_force(now)))
            .cloned()
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Woken when this host changed a name or key ban (the enforcer then acts at once).
    pub fn changed(&self) -> &tokio::sync::Notify {
        &self.changed
    }

    /// Renews this host's copy if the bans changed: on Redis, reads the change counter and
    /// reads the bans in full only when it moved (or [`FULL_READ_INTERVAL`] has passed); on
    /// the file store, re-reads the file when it changed. On failure the copy is kept.
    pub async fn refresh_if_changed(&self) -> Result<(), BanError> {
        if let Backend::Redis { link, prefix, .. } = &self.backend {
            let version = read_version(link, prefix).await?;
            let unchanged = self
                .identity_read
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_some_and(|r| r.version == version && r.at.elapsed() < FULL_READ_INTERVAL);
            if unchanged {
                return Ok(());
            }
            return self.read_redis(link, prefix, version).await;
        }
        self.refresh().await
    }

    /// Reads the name and key bans from the store into this host's copy. On failure the
    /// copy is kept as it was (bans in force stay in force).
    pub async fn refresh(&self) -> Result<(), BanError> {
        match &self.backend {
            Backend::File { path, state } => {
                let mut state = state.lock().await;
                let current = mtime(path);
                if current != state.seen {
                    state.data = read_file(path)?;
                    state.seen = current;
                }
                let snapshot = Snapshot::of_file(&state.data);
                *self.identity.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snapshot);
                Ok(())
            }
            Backend::Redis { link, prefix, .. } => {
                let version = read_version(link, prefix).await?;
                self.read_redis(link, prefix, version).await
            }
        }
    }

    /// Reads both ban hashes in full; `version` is the change counter read just before, so
    /// a change made meanwhile moves the counter past it and is read on the next renewal.
    async fn read_redis(
        &self,
        link: &Arc<RedisLink>,
        prefix: &str,
        version: Option<String>,
    ) -> Result<(), BanError> {
        // One command per hash, not one pipeline: on a Redis Cluster the two hashes sit in
        // different slots, and a pipeline across slots is refused (CROSSSLOT).
        let read = |kind: Identity| async move {
            let map: HashMap<String, String> = link
                .query(
                    redis::cmd("HGETALL").arg(format!("{prefix}{}", kind.hash())),
                    BAN_OP_TIMEOUT,
                )
                .await
                .map_err(|e| BanError::Unavailable(e.to_string()))?;
            Ok::<_, BanError>(
                map.into_iter()
                    .filter_map(|(k, v)| Some((k, serde_json::from_str(&v).ok()?)))
                    .collect(),
            )
        };
        let (names, keys) = tokio::try_join!(read(Identity::Name), read(Identity::Key))?;
        let snapshot = Snapshot { names, keys };
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snapshot);
        *self.identity_read.lock().unwrap_or_else(|p| p.into_inner()) = Some(FullRead {
            version,
            at: std::time::Instant::now(),
        });
        Ok(())
    }

    /// Deletes from Redis the bans this host's copy holds that have ended (each checked
    /// again in Redis by [`PRUNE_SCRIPT`]). Best effort: a failure (a Redis that refuses
    /// scripts, say) is logged, and the ended bans stay, ignored as before.
    async fn prune_ended(&self, link: &Arc<RedisLink>, prefix: &str) {
        match self.try_prune_ended(link, prefix).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!("deleted {deleted} ended name and key bans from Redis"),
            Err(e) => tracing::warn!("cannot delete ended name and key bans from Redis: {e}"),
        }
    }

    /// [`Self::prune_ended`]; how many it deleted.
    async fn try_prune_ended(
        &self,
        link: &Arc<RedisLink>,
        prefix: &str,
    ) -> Result<usize, BanError> {
        let now = now();
        let snapshot = self.snapshot();
        let mut deleted = 0;
        for kind in [Identity::Name, Identity::Key] {
            // A pipeline per hash: each holds one key, so one slot on a Cluster.
            let hash = format!("{prefix}{}", kind.hash());
            let ended: Vec<&String> = snapshot
                .of(kind)
                .iter()
                .filter(|(_, ban)| !ban.in_force(now))
                .map(|(field, _)| field)
                .collect();
            for batch in ended.chunks(PRUNE_BATCH) {
                let mut pipe = redis::pipe();
                for field in batch {
                    pipe.cmd("EVAL")
                        .arg(PRUNE_SCRIPT)
                        .arg(1)
                        .arg(&hash)
                        .arg(*field)
                        .arg(now);
                }
                let counts: Vec<usize> = link
                    .query_pipeline(&pipe, BAN_OP_TIMEOUT)
                    .await
                    .map_err(|e| BanError::Unavailable(e.to_string()))?;
                deleted += counts.iter().sum::<usize>();
            }
        }
        Ok(deleted)
    }

    /// Bans in force of `kind`, read from the store now, soonest to end first (then the
    /// ones that hold until lifted), by target.
    pub async fn list_identities(&self, kind: Identity) -> Result<Vec<IdentityBan>, BanError> {
        self.refresh().await?;
        let now = now();
        let mut list: Vec<IdentityBan> = self
            .snapshot()
            .of(kind)
            .values()
            .filter(|b| b.in_force(now))
            .cloned()
            .collect();
        list.sort_by(|a, b| {
            (a.until.unwrap_or(i64::MAX), &a.target).cmp(&(b.until.unwrap_or(i64::MAX), &b.target))
        });
        Ok(list)
    }

    /// Bans `target` (a checked name, or a key from [`check_key`]) for `length` (`None`:
    /// until lifted), replacing any ban it had.
    pub async fn ban_identity(
        &self,
        kind: Identity,
        target: &str,
        length: Option<Duration>,
        reason: &str,
    ) -> Result<IdentityBan, BanError> {
        let now = now();
        let ban = IdentityBan {
            target: target.to_string(),
            since: now,
            until: length.map(|l| now + l.as_secs().max(1) as i64),
            reason: reason.chars().take(MAX_REASON_CHARS).collect(),
        };
        match &self.backend {
            Backend::File { path, state } => {
                let mut state = state.lock().await;
                state.data = read_file(path)?;
                let mut next = state.data.clone();
                next.names.retain(|_, b| b.in_force(now));
                next.keys.retain(|_, b| b.in_force(now));
                if next.names.len() + next.keys.len() >= MAX_IDENTITY_BANS {
                    return Err(BanError::Full(MAX_IDENTITY_BANS));
                }
                match kind {
                    Identity::Name => next.names.insert(target.to_string(), ban.clone()),
                    Identity::Key => next.keys.insert(target.to_string(), ban.clone()),
                };
                state.commit(path, next).await?;
            }
            Backend::Redis { link, prefix, .. } => {
                let hash = format!("{prefix}{}", kind.hash());
                // Ended bans are deleted here, on the operator's next ban: without it
                // they would stay in Redis, count against the limit, and be read by
                // every host.
                self.prune_ended(link, prefix).await;
                // Names and keys together, as on the file store: every host holds both.
                // One HLEN per hash (two slots on a Cluster).
                let len = |kind: Identity| async move {
                    link.query::<usize>(
                        redis::cmd("HLEN").arg(format!("{prefix}{}", kind.hash())),
                        BAN_OP_TIMEOUT,
                    )
                    .await
                    .map_err(|e| BanError::Unavailable(e.to_string()))
                };
                let (names, keys) = tokio::try_join!(len(Identity::Name), len(Identity::Key))?;
                if names + keys >= MAX_IDENTITY_BANS {
                    return Err(BanError::Full(MAX_IDENTITY_BANS));
                }
                link.query::<()>(
                    redis::cmd("HSET")
                        .arg(&hash)
                        .arg(target)
                        .arg(serde_json::to_string(&ban).unwrap_or_default()),
                    BAN_OP_TIMEOUT,
                )
                .await
                .map_err(|e| BanError::Unavailable(e.to_string()))?;
                bump_version(link, prefix).await;
            }
        }
        self.after_change().await;
        Ok(ban)
    }

    /// Lifts the ban of `target`; `false` if none was in force.
    pub async fn unban_identity(&self, kind: Identity, target: &str) -> Result<bool, BanError> {
        let now = now();
        let was = match &self.backend {
            Backend::File { path, state } => {
                let mut state = state.lock().await;
                state.data = read_file(path)?;
                let mut next = state.data.clone();
                let removed = match kind {
                    Identity::Name => next.names.remove(target),
                    Identity::Key => next.keys.remove(target),
                };
                state.commit(path, next).await?;
                removed.is_some_and(|b| b.in_force(now))
            }
            Backend::Redis { link, prefix, .. } => {
                let hash = format!("{prefix}{}", kind.hash());
                let mut pipe = redis::pipe();
                pipe.cmd("HGET")
                    .arg(&hash)
                    .arg(target)
                    .cmd("HDEL")
                    .arg(&hash)
                    .arg(target)
                    .ignore();
                let (old,): (Option<String>,) = link
                    .query_pipeline(&pipe, BAN_OP_TIMEOUT)
                    .await
                    .map_err(|e| BanError::Unavailable(e.to_string()))?;
                self.prune_ended(link, prefix).await;
                bump_version(link, prefix).await;
                old.and_then(|t| serde_json::from_str::<IdentityBan>(&t).ok())
                    .is_some_and(|b| b.in_force(now))
            }
        };
        self.after_change().await;
        Ok(was)
    }

    /// Renews this host's copy and wakes the enforcer.
    async fn after_change(&self) {
        if let Err(e) = self.refresh().await {
            tracing::warn!("re-reading the name and key bans: {e}");
        }
        self.changed.notify_one();
    }

    /// How many name and key bans are in force, per this host's copy (for the metrics).
    pub fn identity_counts(&self) -> (usize, usize) {
        let snapshot = self.snapshot();
        let now = now();
        let count =
            |map: &HashMap<String, IdentityBan>| map.values().filter(|b| b.in_force(now)).count();
        (count(&snapshot.names), count(&snapshot.keys))
    }
}

#[cfg(test)]
mod tests {
    use super::super::BanPolicy;
    use super::*;

    const FP: &str = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";

    #[test]
    fn keys_are_fingerprints_or_hashes() {
        assert_eq!(check_key(FP).unwrap(), FP);
        let hash = "AB".repeat(32);
        assert_eq!(check_key(&hash).unwrap(), "ab".repeat(32));
        for bad in ["", "SHA256:short", "xyz", &"g".repeat(64), "MD5:aa:bb"] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn name_and_key_bans_persist_match_and_lift() {
        let dir = tempfile::tempdir().unwrap();
        let bans = BanList::open_file(dir.path(), BanPolicy::default()).unwrap();
        assert!(bans.name_banned("eager-pixel-ant").is_none());
        let ban = bans
            .ban_identity(Identity::Name, "eager-pixel-ant", None, "abuse")
            .await
            .unwrap();
        assert_eq!(ban.until, None);
        assert!(bans.name_banned("eager-pixel-ant").is_some());
        assert!(bans.name_banned("api-eager-pixel-ant").is_none());
        let hash = "ab".repeat(32);
        bans.ban_identity(Identity::Key, FP, Some(Duration::from_secs(60)), "spam")
            .await
            .unwrap();
        assert!(bans.key_banned(FP, "other").is_some());
        assert!(bans.key_banned("SHA256:other", &hash).is_none());
        assert_eq!(bans.identity_counts(), (1, 1));
        // Address bans and their failures are kept beside them.
        let ip = "192.0.2.1".parse().unwrap();
        bans.record_failure(ip, "x").await.unwrap();

        // Across a restart (another process reading the same file).
        let again = BanList::open_file(dir.path(), BanPolicy::default()).unwrap();
        again.refresh().await.unwrap();
        assert!(again.name_banned("eager-pixel-ant").is_some());
        let keys = again.list_identities(Identity::Key).await.unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].target, FP);
        assert!(
            again
                .unban_identity(Identity::Name, "eager-pixel-ant")
                .await
                .unwrap()
        );
        assert!(
            !again
                .unban_identity(Identity::Name, "eager-pixel-ant")
                .await
                .unwrap()
        );
        assert!(again.name_banned("eager-pixel-ant").is_none());
        assert_eq!(again.identity_counts(), (0, 1));
    }

    #[tokio::test]
    async fn expired_bans_do_not_hold() {
        let dir = tempfile::tempdir().unwrap();
        let bans = BanList::open_file(dir.path(), BanPolicy::default()).unwrap();
        let old = IdentityBan {
            target: "old-name".into(),
            since: 1,
            until: Some(2),
            reason: String::new(),
        };
        assert!(!old.in_force(now()));
        bans.ban_identity(Identity::Name, "old-name", Some(Duration::from_secs(1)), "")
            .await
            .unwrap();
        assert!(bans.name_banned("old-name").is_some());
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(bans.name_banned("old-name").is_none());
        assert!(
            bans.list_identities(Identity::Name)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
