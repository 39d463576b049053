//! Failed-authentication bans per client address, escalating and expiring: by default 3
//! failed SSH connections ban an address for 15 min, 5 for 1 h, 10 for 24 h. Failures are
//! counted per connection that ended without authenticating after a refused attempt (a
//! password, an unlisted key, a bad signature), so a client that tries several keys before
//! the right one is never counted. Bans are per address, never per key: someone who only
//! knows a victim's public key cannot get the victim blocked.
//!
//! Stored in Redis when the host uses Redis (shared by every host on it), else in
//! `bans.json` in the data directory, so they hold across restarts. `p0rt security bans`
//! lists them and `p0rt security unban ADDR` lifts one; a running host on the JSON store
//! picks up a change to the file within [`FILE_RECHECK`].
//!
//! Redis keys, under the configured prefix: `ban:{ip}` → the ban as JSON, expiring with it;
//! `ban:failures:{ip}` → the failure count, expiring [`FAILURE_MEMORY`] after the last one;
//! `bans:until` → a sorted set of the banned addresses scored by when their ban ends, which
//! counts them (the metrics) without scanning the keyspace ([`BAN_INDEX_KEY`]).
//!
//! The operator's bans of names and keys live beside them ([`identity`]).

pub mod identity;

pub use identity::{Identity, IdentityBan};

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::redis_link::RedisLink;

/// Name of the ban file in the data directory (JSON store).
pub const BANS_FILE_NAME: &str = "bans.json";
/// Default escalation: (failures, ban length).
pub const DEFAULT_TIERS: [(u32, Duration); 3] = [
    (3, Duration::from_secs(15 * 60)),
    (5, Duration::from_secs(60 * 60)),
    (10, Duration::from_secs(24 * 60 * 60)),
];
/// Failures of an address are forgotten this long after its last one.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(24 * 60 * 60);
/// How often a host on the JSON store looks whether `bans.json` changed on disk.
pub const FILE_RECHECK: Duration = Duration::from_secs(2);
/// Time budget of one ban lookup or update in Redis; a lookup that fails lets the
/// connection in (a Redis outage must not lock everyone out).
pub const BAN_OP_TIMEOUT: Duration = Duration::from_millis(300);
/// Most addresses whose failures the file store remembers (the oldest are forgotten first).
pub const MAX_TRACKED_ADDRESSES: usize = 100_000;
/// Redis sorted set (under the prefix): each banned address, scored by the end of its ban.
/// The metrics count bans from it (`ZCOUNT`) where they would otherwise scan every key in
/// Redis at each scrape; `ban:{ip}` stays the record every lookup reads.
pub const BAN_INDEX_KEY: &str = "bans:until";
/// Set (under the prefix) once a host has added to [`BAN_INDEX_KEY`] the bans made before it
/// existed, by an older version.
const BAN_INDEX_FILLED_KEY: &str = "bans:until:filled";
/// Ban records read at once when the bans are listed.
const LIST_READS_IN_FLIGHT: usize = 32;
/// Bans added to [`BAN_INDEX_KEY`] by one `ZADD` when it is first filled.
const FILL_BATCH: usize = 1000;
/// Time budget of each `SCAN` step of listing the bans in Redis.
const LIST_SCAN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum BanError {
    #[error("ban list {path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error("ban list unavailable: {0}; try again shortly")]
    Unavailable(String),
    #[error("{0} is exempt from bans (security.ban_exempt); remove it there first")]
    Exempt(IpAddr),
    #[error("the ban list holds {0} name and key bans, the most it keeps; lift some first")]
    Full(usize),
}

/// One ban.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    pub ip: IpAddr,
    /// Unix seconds.
    pub since: i64,
    /// Unix seconds.
    pub until: i64,
    /// Failures counted when it began.
    pub failures: u32,
    pub reason: String,
}

/// Who is banned for how long, and who never is.
#[derive(Clone, Debug)]
pub struct BanPolicy {
    /// (failures, ban length), ascending by failures.
    pub tiers: Vec<(u32, Duration)>,
    /// Addresses never banned (private and loopback ranges only when listed here).
    pub exempt: Vec<IpNet>,
}

impl Default for BanPolicy {
    fn default() -> Self {
        BanPolicy {
            tiers: DEFAULT_TIERS.to_vec(),
            exempt: Vec::new(),
        }
    }
}

impl BanPolicy {
    /// The configured policy (`security.*`).
    pub fn from_config(config: &crate::config::Config) -> BanPolicy {
        BanPolicy {
            tiers: config.ban_tiers.clone(),
            exempt: config.ban_exempt.clone(),
        }
    }

    /// The ban length for an address with `failures`, if any: the highest tier reached.
    pub fn length_for(&self, failures: u32) -> Option<Duration> {
        self.tiers
            .iter()
            .rev()
            .find(|(at, _)| failures >= *at)
            .map(|(_, length)| *length)
    }

    pub fn exempts(&self, ip: IpAddr) -> bool {
        self.exempt.iter().any(|net| net.contains(&ip))
    }

    /// One line for the startup log.
    pub fn describe(&self) -> String {
        let tiers: Vec<String> = self
            .tiers
            .iter()
            .map(|(n, d)| format!("{n} → {}", human(*d)))
            .collect();
        let exempt = if self.exempt.is_empty() {
            "none".to_string()
        } else {
            self.exempt
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "failed-auth bans: {} (failures forgotten after {}), exempt: {exempt}",
            tiers.join(", "),
            human(FAILURE_MEMORY)
        )
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// What `bans.json` holds.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BanFile {
    #[serde(default)]
    bans: BTreeMap<IpAddr, Ban>,
    /// address → (failures, unix seconds of the last one)
    #[serde(default)]
    failures: BTreeMap<IpAddr, (u32, i64)>,
    /// The operator's name bans, by name ([`identity`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    names: BTreeMap<String, IdentityBan>,
    /// The operator's key bans, by fingerprint or key hash ([`identity`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    keys: BTreeMap<String, IdentityBan>,
}

struct FileState {
    data: BanFile,
    /// The file's mtime when last read or written, and when that was checked.
    seen: Option<SystemTime>,
    checked: Instant,
}

impl FileState {
    /// Writes `next` to `path` (off the async threads) and makes it the state.
    async fn commit(&mut self, path: &Path, next: BanFile) -> Result<(), BanError> {
        let (path2, data) = (path.to_path_buf(), next.clone());
        tokio::task::spawn_blocking(move || write_file(&path2, &data))
            .await
            .map_err(|e| BanError::Unavailable(e.to_string()))??;
        self.data = next;
        self.seen = mtime(path);
        Ok(())
    }
}

enum Backend {
    File {
        path: PathBuf,
        state: tokio::sync::Mutex<FileState>,
    },
    Redis {
        link: Arc<RedisLink>,
        prefix: String,
        /// This host has seen [`BAN_INDEX_FILLED_KEY`] set (or set it).
        index_filled: std::sync::atomic::AtomicBool,
    },
}

/// The ban list of a host (or of `p0rt security`).
pub struct BanList {
    backend: Backend,
    pub policy: BanPolicy,
    /// This host's copy of the name and key bans ([`identity`]).
    identity: std::sync::RwLock<Arc<identity::Snapshot>>,
    /// Woken when this host changed a name or key ban.
    changed: tokio::sync::Notify,
    /// On Redis: the last full read of the name and key bans.
    identity_read: std::sync::Mutex<Option<identity::FullRead>>,
}

fn now() -> i64 {
    crate::unix_now()
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read_file(path: &Path) -> Result<BanFile, BanError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| BanError::File {
            path: path.to_path_buf(),
            detail: format!("{e}; the file was left untouched: repair or delete it"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BanFile::default()),
        Err(e) => Err(BanError::File {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }),
    }
}

/// Temp file + fsync + rename, so the file is whole or as before.
fn write_file(path: &Path, data: &BanFile) -> Result<(), BanError> {
    use std::io::Write;
    let fail = |e: std::io::Error| BanError::File {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let bytes = serde_json::to_vec_pretty(data).unwrap_or_default();
    let temp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&temp).map_err(fail)?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(fail)?;
    std::fs::rename(&temp, path).map_err(fail)
}

impl BanList {
    /// The file store in `data_dir`; an unreadable file is an error (never overwritten).
    pub fn open_file(data_dir: &Path, policy: BanPolicy) -> Result<BanList, BanError> {
        let path = data_dir.join(BANS_FILE_NAME);
        let data = read_file(&path)?;
        let snapshot = identity::Snapshot::of_file(&data);
        Ok(BanList {
            backend: Backend::File {
                state: tokio::sync::Mutex::new(FileState {
                    data,
                    seen: mtime(&path),
                    checked: Instant::now(),
                }),
                path,
            },
            policy,
            identity: std::sync::RwLock::new(Arc::new(snapshot)),
            changed: Default::default(),
            identity_read: Default::default(),
        })
    }

    pub fn redis(link: Arc<RedisLink>, prefix: &str, policy: BanPolicy) -> BanList {
        BanList {
            backend: Backend::Redis {
                link,
                prefix: prefix.to_string(),
                index_filled: Default::default(),
            },
            policy,
            identity: Default::default(),
            changed: Default::default(),
            identity_read: Default::default(),
        }
    }

    /// The ban in force for `ip`, if any. Fails open: a store error lets it in.
    pub async fn banned(&self, ip: IpAddr) -> Option<Ban> {
        if self.policy.exempts(ip) {
            return None;
        }
        match &self.backend {
            Backend::File { path, state } => {
                let mut state = state.lock().await;
                reload_if_changed(path, &mut state);
                let ban = state.data.bans.get(&ip)?;
                (ban.until > now()).then(|| ban.clone())
            }
            Backend::Redis { link, prefix, .. } => {
                let key = format!("{prefix}ban:{ip}");
                match link
                    .query::<Option<String>>(redis::cmd("GET").arg(&key), BAN_OP_TIMEOUT)
                    .await
                {
                    Ok(text) => text
                        .and_then(|t| serde_json::from_str::<Ban>(&t).ok())
                        .filter(|b| b.until > now()),
                    Err(e) => {
                        tracing::debug!("ban lookup for {ip} failed ({e}); letting it in");
                        None
                    }
                }
            }
        }
    }

    /// Counts one failed connection of `ip`; returns the ban it earned, if any.
    pub async fn record_failure(&self, ip: IpAddr, reason: &str) -> Result<Option<Ban>, BanError> {
        if self.policy.exempts(ip) {
            return Ok(None);
        }
        let now = now();
        let make_ban = |failures: u32| {
            self.policy.length_for(failures).map(|length| Ban {
                ip,
                since: now,
                until: now + length.as_secs() as i64,
                failures,
                reason: reason.chars().take(200).collect(),
            })
        };
        match &self.backend {
            Backend::File { path, state } => {
                let mut state = state.lock().await;
                reload_if_changed(path, &mut state);
                let mut next = state.data.clone();
                let memory = FAILURE_MEMORY.as_secs() as i64;
                next.failures.retain(|_, (_, last)| now - *last < memory);
                next.bans.retain(|_, ban| ban.until > now);
                if next.failures.len() >= MAX_TRACKED_ADDRESSES
                    && let Some(oldest) = next
                        .failures
                        .iter()
                        .min_by_key(|(_, (_, last))| *last)
                        .map(|(ip, _)| *ip)
                {
                    next.failures.remove(&oldest);
                }
                let entry = next.failures.entry(ip).or_insert((0, now));
                entry.0 = entry.0.saturating_add(1);
                entry.1 = now;
                let ban = make_ban(entry.0);
                if let Some(ban) = &ban {
                    next.bans.insert(ip, ban.clone());
                }
                state.commit(path, next).await?;
                Ok(ban)
            }
            Backend::Redis { link, prefix, .. } => {
                let counter = format!("{prefix}ban:failures:{ip}");
                let mut pipe = redis::pipe();
                pipe.cmd("INCR")
                    .arg(&counter)
                    .cmd("EXPIRE")
                    .arg(&counter)
                    .arg(FAILURE_MEMORY.as_secs())
                    .ignore();
                let (failures,): (u32,) = link
                    .query_pipeline(&pipe, BAN_OP_TIMEOUT)
                    .await
                    .map_err(|e| BanError::Unavailable(e.to_string()))?;
                let ban = make_ban(failures);
                if let Some(ban) = &ban {
                    let text = serde_json::to_string(ban).unwrap_or_default();
                    let seconds = (ban.until - ban.since).max(1);
                    link.query::<()>(
                        redis::cmd("SET")
                            .arg(format!("{prefix}ban:{ip}"))
                            .arg(text)
                            .arg("EX")
                            .arg(seconds),
                        BAN_OP_TIMEOUT,
                    )
                    .await
                    .map_err(|e| BanError::Unavailable(e.to_string()))?;
                    index_ban(link, prefix, ban).await;
                }
                Ok(ban)
            }
        }
    }

    /// Bans in force, soonest to end first.
    pub async fn list(&self) -> Result<Vec<Ban>, BanError> {
        let now = now();
        let mut bans: Vec<Ban> = match &self.backend {
            Backend::File { path, state } => {
                let mut state = state.lock().await;
                reload_if_changed(path, &mut state);
                state.data.bans.values().cloned().collect()
            }
            Backend::Redis { link, prefix, .. } => read_all_bans(link, prefix).await?,
        };
        bans.retain(|b| b.until > now);
        bans.sort_by_key(|b| (b.until, b.ip));
        Ok(bans)
    }

    /// How many addresses are banned now (the metrics). On Redis, one `ZCOUNT` of
    /// [`BAN_INDEX_KEY`]; the first call on a Redis no host has filled it for adds the bans
    /// made before it existed (one scan of the keyspace, once).
    pub async fn count(&self) -> Result<usize, BanError> {
        let now = now();
        match &self.backend {
            Backend::File { path, state } => {
                let mut state = state.lock().await;
                reload_if_changed(path, &mut state);
                Ok(state.data.bans.values().filter(|b| b.until > now).count())
            }
            Backend::Redis {
                link,
                prefix,
                index_filled,
            } => {
                use std::sync::atomic::Ordering;
                if !index_filled.load(Ordering::Acquire) {
                    fill_index(link, prefix).await?;
                    index_filled.store(true, Ordering::Release);
                }
                link.query(
                    redis::cmd("ZCOUNT")
                        .arg(format!("{prefix}{BAN_INDEX_KEY}"))
                        .arg(format!("({now}"))
                        .arg("+inf"),
                    BAN_OP_TIMEOUT,
                )
                .await
                .map_err(|e| BanError::Unavailable(e.to_string()))
            }
        }
    }

    /// Bans `ip` for `length` by the operator's hand (the admin API), replacing any ban it
    /// had. Exempt addresses are never banned: [`BanError::Exempt`].
    pub async fn ban(&self, ip: IpAddr, length: Duration, reason: &str) -> Result<Ban, BanError> {
        if self.policy.exempts(ip) {
            return Err(BanError::Exempt(ip));
        }
        let now = now();
        let ban = Ban {
            ip,
            since: now,
            until: now + length.as_secs().max(1) as i64,
            failures: 0,
            reason: reason.chars().take(200).collect(),
        };
        match &self.backend {
            Backend::File { path, state } => {
                let mut state = state.lock().await;
                state.data = read_file(path)?;
                let mut next = state.data.clone();
                next.bans.retain(|_, b| b.until > now);
                next.bans.insert(ip, ban.clone());
                state.commit(path, next).await?;
            }
            Backend::Redis { link, prefix, .. } => {
                link.query::<()>(
                    redis::cmd("SET")
                        .arg(format!("{prefix}ban:{ip}"))
                        .arg(serde_json::to_string(&ban).unwrap_or_default())
                        .arg("EX")
                        .arg((ban.until - ban.since).max(1)),
                    BAN_OP_TIMEOUT,
                )
                .await
                .map_err(|e| BanError::Unavailable(e.to_string()))?;
                index_ban(link, prefix, &ban).await;
            }
        }
        Ok(ban)
    }

    /// Lifts the ban of `ip` and forgets its failures; `false` if it was not banned.
    pub async fn unban(&self, ip: IpAddr) -> Result<bool, BanError> {
        match &self.backend {
            Backend::File { path, state } => {
                let mut state = state.lock().await;
                // Always from disk: `p0rt security unban` runs beside a live host.
                state.data = read_file(path)?;
                let mut next = state.data.clone();
                let was = next.bans.remove(&ip).is_some_and(|b| b.until > now());
                next.failures.remove(&ip);
                state.commit(path, next).await?;
                Ok(was)
            }
            Backend::Redis { link, prefix, .. } => {
                let removed: i64 = link
                    .query(
                        redis::cmd("DEL").arg(format!("{prefix}ban:{ip}")),
                        BAN_OP_TIMEOUT,
                    )
                    .await
                    .map_err(|e| BanError::Unavailable(e.to_string()))?;
                link.query::<i64>(
                    redis::cmd("DEL").arg(format!("{prefix}ban:failures:{ip}")),
                    BAN_OP_TIMEOUT,
                )
                .await
                .map_err(|e| BanError::Unavailable(e.to_string()))?;
                if let Err(e) = link
                    .query::<i64>(
                        redis::cmd("ZREM")
                            .arg(format!("{prefix}{BAN_INDEX_KEY}"))
                            .arg(ip.to_string()),
                        BAN_OP_TIMEOUT,
                    )
                    .await
                {
                    // The record is gone, which is what lookups read; only the count is off.
                    tracing::warn!("the ban of {ip} is lifted, but its count stays: {e}");
                }
                Ok(removed > 0)
            }
        }
    }
}

/// Every ban record in Redis, read from `ban:{ip}` keys found by `SCAN` (the records, not
/// the index: a listing must also show bans made by an older version), a few at a time.
async fn read_all_bans(link: &Arc<RedisLink>, prefix: &str) -> Result<Vec<Ban>, BanError> {
    use futures_util::{StreamExt, TryStreamExt};
    let keys = link
        .scan(&format!("{prefix}ban:*"), usize::MAX, LIST_SCAN_TIMEOUT)
        .await
        .map_err(|e| BanError::Unavailable(e.to_string()))?;
    let failures_prefix = format!("{prefix}ban:failures:");
    let texts: Vec<Option<String>> = futures_util::stream::iter(
        keys.into_iter()
            .filter(|k| !k.starts_with(&failures_prefix)),
    )
    .map(|key| async move {
        link.query::<Option<String>>(redis::cmd("GET").arg(&key), BAN_OP_TIMEOUT)
            .await
            .map_err(|e| BanError::Unavailable(e.to_string()))
    })
    .buffer_unordered(LIST_READS_IN_FLIGHT)
    .try_collect()
    .await?;
    Ok(texts
        .into_iter()
        .flatten()
        .filter_map(|t| serde_json::from_str::<Ban>(&t).ok())
        .collect())
}

/// Adds `ban` to [`BAN_INDEX_KEY`] and drops the bans there that have ended. Best effort:
/// the record is written already, and lookups read only the record.
async fn index_ban(link: &Arc<RedisLink>, prefix: &str, ban: &Ban) {
    let index = format!("{prefix}{BAN_INDEX_KEY}");
    let mut pipe = redis::pipe();
    pipe.cmd("ZADD")
        .arg(&index)
        .arg(ban.until)
        .arg(ban.ip.to_string())
        .ignore()
        .cmd("ZREMRANGEBYSCORE")
        .arg(&index)
        .arg("-inf")
        .arg(now())
        .ignore();
    if let Err(e) = link.query_pipeline::<()>(&pipe, BAN_OP_TIMEOUT).await {
        tracing::warn!("the ban of {} holds, but is not counted: {e}", ban.ip);
    }
}

/// Adds to [`BAN_INDEX_KEY`] the bans in Redis made before it existed, once per Redis: skipped
/// when [`BAN_INDEX_FILLED_KEY`] is set, which this sets afterwards.
async fn fill_index(link: &Arc<RedisLink>, prefix: &str) -> Result<(), BanError> {
    let filled_key = format!("{prefix}{BAN_INDEX_FILLED_KEY}");
    let filled: bool = link
        .query(redis::cmd("EXISTS").arg(&filled_key), BAN_OP_TIMEOUT)
        .await
        .map_err(|e| BanError::Unavailable(e.to_string()))?;
    if filled {
        return Ok(());
    }
    let now = now();
    let live: Vec<Ban> = read_all_bans(link, prefix)
        .await?
        .into_iter()
        .filter(|ban| ban.until > now)
        .collect();
    // One ZADD per batch, not a round trip per ban: after an attack there can be many.
    let index = format!("{prefix}{BAN_INDEX_KEY}");
    for batch in live.chunks(FILL_BATCH) {
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(&index);
        for ban in batch {
            zadd.arg(ban.until).arg(ban.ip.to_string());
        }
        link.query::<()>(&zadd, BAN_OP_TIMEOUT)
            .await
            .map_err(|e| BanError::Unavailable(e.to_string()))?;
    }
    link.query::<()>(redis::cmd("SET").arg(&filled_key).arg(1), BAN_OP_TIMEOUT)
        .await
        .map_err(|e| BanError::Unavailable(e.to_string()))
}

/// The ban list the configuration points at: Redis when the host uses Redis, else the
/// data directory's `bans.json`.
pub async fn open_for(config: &crate::config::Config) -> anyhow::Result<BanList> {
    let policy = BanPolicy::from_config(config);
    Ok(match config.redis_url_in_use() {
        Some(url) => {
            let link = crate::store::open::connect_redis(config, &url).await?;
            BanList::redis(link, &config.redis_prefix, policy)
        }
        None => BanList::open_file(&config.data_dir, policy)?,
    })
}

impl BanList {
    /// Every ban in force, as the admin API's `GET bans` answers: `addresses`, `names` and
    /// `keys`, each soonest to end first.
    pub async fn all_json(&self) -> Result<serde_json::Value, BanError> {
        let mut out = serde_json::json!({ "addresses": self.list().await? });
        for (kind, field) in [(Identity::Name, "names"), (Identity::Key, "keys")] {
            let bans = self.list_identities(kind).await?;
            out[field] = bans.iter().map(|b| b.to_json(kind)).collect();
        }
        Ok(out)
    }
}

/// `p0rt security bans`: tables (or JSON) of the bans in force: addresses, names, keys.
pub async fn list_text(bans: &BanList, json: bool) -> anyhow::Result<String> {
    if json {
        return Ok(serde_json::to_string_pretty(&bans.all_json().await?)? + "\n");
    }
    let stamp = |secs: i64| {
        time::OffsetDateTime::from_unix_timestamp(secs)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| secs.to_string())
    };
    let list = bans.list().await?;
    let mut out = if list.is_empty() {
        "no addresses are banned\n".to_string()
    } else {
        format!(
            "{:<40} {:<22} {:>8}  reason\n",
            "address", "banned until (UTC)", "failures"
        )
    };
    for ban in list {
        out.push_str(&format!(
            "{:<40} {:<22} {:>8}  {}\n",
            ban.ip,
            stamp(ban.until),
            ban.failures,
            ban.reason
        ));
    }
    for kind in [Identity::Name, Identity::Key] {
        let list = bans.list_identities(kind).await?;
        out.push('\n');
        if list.is_empty() {
            out.push_str(&format!("no {}s are banned\n", kind.as_str()));
            continue;
        }
        out.push_str(&format!(
            "{:<64} {:<22} reason\n",
            kind.as_str(),
            "banned until (UTC)"
        ));
        for ban in list {
            let until = ban.until.map_or_else(|| "lifted".to_string(), stamp);
            out.push_str(&format!(
                "{:<64} {:<22} {}\n",
                ban.target, until, ban.reason
            ));
        }
    }
    Ok(out)
}

/// Picks up an edit of `bans.json` by `p0rt security unban` (at most every [`FILE_RECHECK`]).
fn reload_if_changed(path: &Path, state: &mut FileState) {
    if state.checked.elapsed() < FILE_RECHECK {
        return;
    }
    state.checked = Instant::now();
    let current = mtime(path);
    if current != state.seen {
        match read_file(path) {
            Ok(data) => {
                state.data = data;
                state.seen = current;
            }
            Err(e) => tracing::warn!("keeping the bans in memory: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_escalate() {
        let policy = BanPolicy::default();
        assert_eq!(policy.length_for(2), None);
        assert_eq!(policy.length_for(3), Some(Duration::from_secs(900)));
        assert_eq!(policy.length_for(4), Some(Duration::from_secs(900)));
        assert_eq!(policy.length_for(5), Some(Duration::from_secs(3600)));
        assert_eq!(policy.length_for(10), Some(Duration::from_secs(86_400)));
        assert_eq!(policy.length_for(50), Some(Duration::from_secs(86_400)));
        assert!(policy.describe().contains("3 → 15 min, 5 → 1 h, 10 → 24 h"));
    }

    #[tokio::test]
    async fn failures_ban_persist_and_lift() {
        let dir = tempfile::tempdir().unwrap();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let bans = BanList::open_file(dir.path(), BanPolicy::default()).unwrap();
        assert_eq!(bans.record_failure(ip, "password").await.unwrap(), None);
        assert_eq!(bans.record_failure(ip, "password").await.unwrap(), None);
        let ban = bans.record_failure(ip, "password").await.unwrap().unwrap();
        assert_eq!(ban.until - ban.since, 900);
        assert!(bans.banned(ip).await.is_some());
        assert!(bans.banned(other).await.is_none());
        // Across a restart.
        let again = BanList::open_file(dir.path(), BanPolicy::default()).unwrap();
        assert_eq!(again.list().await.unwrap(), vec![ban]);
        assert!(again.unban(ip).await.unwrap());
        assert!(!again.unban(ip).await.unwrap());
        assert!(again.banned(ip).await.is_none());
    }

    #[tokio::test]
    async fn exempt_addresses_are_never_counted() {
        let dir = tempfile::tempdir().unwrap();
        let policy = BanPolicy {
            exempt: vec!["127.0.0.0/8".parse().unwrap()],
            ..BanPolicy::default()
        };
        let bans = BanList::open_file(dir.path(), policy).unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..10 {
            assert_eq!(bans.record_failure(ip, "x").await.unwrap(), None);
        }
        assert!(bans.banned(ip).await.is_none());
    }

    #[tokio::test]
    async fn a_corrupt_file_is_refused_and_untouched() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(BANS_FILE_NAME), "not json").unwrap();
        assert!(BanList::open_file(dir.path(), BanPolicy::default()).is_err());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(BANS_FILE_NAME)).unwrap(),
            "not json"
        );
    }
}
