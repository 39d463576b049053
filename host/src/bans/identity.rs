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
//! host holds on the others within that interval.
//!
//! A key is named by its fingerprint as `ssh-keygen -lf` prints it (`SHA256:…`) or by the
//! key hash the domain store keeps (64 hex digits); a ban matches a key by either.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{BAN_OP_TIMEOUT, Backend, BanError, BanList, mtime, now, read_file};

/// How often a host renews its copy of the name and key bans from the store.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(2);
/// Longest reason kept with a ban.
pub const MAX_REASON_CHARS: usize = 200;
/// Most name bans plus key bans a store holds (each host keeps them all in memory).
pub const MAX_IDENTITY_BANS: usize = 100_000;

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

    /// Reads the name and key bans from the store into this host's copy. On failure the
    /// copy is kept as it was (bans in force stay in force).
    pub async fn refresh(&self) -> Result<(), BanError> {
        let snapshot = match &self.backend {
            Backend::File { path, state } => {
                let mut state = state.lock().await;
                let current = mtime(path);
                if current != state.seen {
                    state.data = read_file(path)?;
                    state.seen = current;
                }
                Snapshot::of_file(&state.data)
            }
            Backend::Redis { link, prefix } => {
                let mut pipe = redis::pipe();
                pipe.cmd("HGETALL")
                    .arg(format!("{prefix}{}", Identity::Name.hash()))
                    .cmd("HGETALL")
                    .arg(format!("{prefix}{}", Identity::Key.hash()));
                let (names, keys): (HashMap<String, String>, HashMap<String, String>) = link
                    .query_pipeline(&pipe, BAN_OP_TIMEOUT)
                    .await
                    .map_err(|e| BanError::Unavailable(e.to_string()))?;
                let parse = |map: HashMap<String, String>| {
                    map.into_iter()
                        .filter_map(|(k, v)| Some((k, serde_json::from_str(&v).ok()?)))
                        .collect()
                };
                Snapshot {
                    names: parse(names),
                    keys: parse(keys),
                }
            }
        };
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snapshot);
        Ok(())
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
            Backend::Redis { link, prefix } => {
                let hash = format!("{prefix}{}", kind.hash());
                let count: usize = link
                    .query(redis::cmd("HLEN").arg(&hash), BAN_OP_TIMEOUT)
                    .await
                    .map_err(|e| BanError::Unavailable(e.to_string()))?;
                if count >= MAX_IDENTITY_BANS {
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
            Backend::Redis { link, prefix } => {
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
