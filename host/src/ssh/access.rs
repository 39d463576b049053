//! Which public keys may connect, and with which tier.
//!
//! Open access lets any key in. Otherwise a key gets in when P0rt's key list
//! ([`super::key_list`]: `authorized_keys.json`, or Redis when the domain store is Redis)
//! lists it as active and unexpired, or when an OpenSSH `authorized_keys` file lists it. An
//! entry of the key list that is inactive or expired refuses the key even if the OpenSSH
//! file lists it too, and its holder is told why. The tier of a listed key reaches the
//! policy plugins (with open access too, for keys the list allows).
//!
//! Which mode: `ssh.open_access` (P0rt's `P0RT_OPEN_ACCESS`) decides when set. When it is
//! not, access is restricted as soon as there is a list to restrict it by: a configured
//! `ssh.key_list` or `ssh.authorized_keys`, P0rt's default `./authorized_keys.json` if it
//! exists at startup, or a key record in Redis at startup; with none of them, any key may
//! connect (p0rt's default; P0rt itself then refuses every key).
//!
//! Files are looked at (one `stat`) on every authentication, off the async runtime, and
//! parsed again only when they changed (size, modification or change time, inode), so an
//! edit counts at the next login. A file that cannot be parsed refuses every key it would
//! have decided about until it is fixed (logged once, not once per login).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use russh::keys::PublicKey;
use russh::keys::ssh_key::public::KeyData;
use time::OffsetDateTime;

use super::key_list::{self, KeyList, Lookup, RedisKeyList};
use crate::config::{Config, StorageKind};
use crate::redis_link::RedisLink;

/// What the SSH edge does with a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyVerdict {
    /// In, with the key list's tier for it, if any.
    Allowed { tier: Option<Arc<str>> },
    /// Not on any list: refused like a wrong key (and counted toward a ban of the address).
    Unlisted,
    /// Listed but inactive or expired: refused, and the sentence is shown to the key's holder
    /// once it has proved it holds the key.
    Refused(String),
    /// The list cannot be read now (a broken file, Redis out of reach): refused, not counted
    /// toward a ban (the client did nothing wrong).
    Unavailable,
}

/// What identifies one version of a file.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Version {
    len: u64,
    modified: Option<SystemTime>,
    changed: (i64, i64),
    inode: u64,
}

/// A file parsed once per version; `None` when that version could not be parsed.
struct Loaded<T> {
    version: Version,
    parsed: Option<Arc<T>>,
}

/// A file re-read when it changes.
struct WatchedFile<T> {
    path: PathBuf,
    /// "authorized keys file", "key list", for messages.
    what: &'static str,
    parse: fn(&Path) -> Result<T, String>,
    /// What a missing file stands for (`None`: a missing file is a problem).
    when_missing: Option<fn() -> T>,
    loaded: Mutex<Option<Loaded<T>>>,
    last_problem: Mutex<Option<String>>,
}

impl<T: Send + Sync + 'static> WatchedFile<T> {
    fn new(
        path: PathBuf,
        what: &'static str,
        parse: fn(&Path) -> Result<T, String>,
        when_missing: Option<fn() -> T>,
    ) -> WatchedFile<T> {
        WatchedFile {
            path,
            what,
            parse,
            when_missing,
            loaded: Mutex::new(None),
            last_problem: Mutex::new(None),
        }
    }

    /// The file's current content, re-parsed when it changed; `Err` when it is unusable.
    async fn current(&self) -> Result<Arc<T>, ()> {
        let version = match tokio::fs::metadata(&self.path).await {
            Ok(meta) => {
                use std::os::unix::fs::MetadataExt;
                Version {
                    len: meta.len(),
                    modified: meta.modified().ok(),
                    changed: (meta.ctime(), meta.ctime_nsec()),
                    inode: meta.ino(),
                }
            }
            Err(e) => {
                return match (e.kind(), self.when_missing) {
                    (std::io::ErrorKind::NotFound, Some(empty)) => {
                        self.report_once(
                            format!("{} {} does not exist", self.what, self.path.display()),
                            "no key is listed in it until it is created",
                        );
                        Ok(Arc::new(empty()))
                    }
                    _ => {
                        self.report_once(
                            format!("cannot read {} {}: {e}", self.what, self.path.display()),
                            "refusing the keys it decides about until it is fixed",
                        );
                        Err(())
                    }
                };
            }
        };
        if let Some(loaded) = &*self.lock()
            && loaded.version == version
        {
            return loaded.parsed.clone().ok_or(());
        }
        let (path, parse) = (self.path.clone(), self.parse);
        let parsed = tokio::task::spawn_blocking(move || parse(&path)).await;
        let parsed = match parsed {
            Ok(Ok(parsed)) => {
                *self.problem() = None;
                Some(Arc::new(parsed))
            }
            Ok(Err(e)) => {
                self.report_once(
                    format!("cannot read {} {}: {e}", self.what, self.path.display()),
                    "refusing the keys it decides about until it is fixed",
                );
                None
            }
            Err(e) => {
                tracing::error!("reading {} failed: {e}", self.what);
                None
            }
        };
        *self.lock() = Some(Loaded {
            version,
            parsed: parsed.clone(),
        });
        parsed.ok_or(())
    }

    /// Logs a problem with the file once until it changes, not once per login.
    fn report_once(&self, problem: String, consequence: &str) {
        let mut last = self.problem();
        if last.as_deref() != Some(problem.as_str()) {
            tracing::error!("{problem}; {consequence}");
            *last = Some(problem);
        }
    }

    fn problem(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.last_problem.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Loaded<T>>> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn parse_authorized_keys(path: &Path) -> Result<Vec<KeyData>, String> {
    let entries =
        russh::keys::ssh_key::AuthorizedKeys::read_file(path).map_err(|e| e.to_string())?;
    let keys: Vec<KeyData> = entries
        .iter()
        .map(|e| e.public_key().key_data().clone())
        .collect();
    tracing::info!(
        "authorized keys: {} keys from {}",
        keys.len(),
        path.display()
    );
    Ok(keys)
}

fn parse_key_list_file(path: &Path) -> Result<KeyList, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let list = key_list::parse_key_list(&text)?;
    for warning in &list.warnings {
        tracing::warn!("key list {}: {warning}", path.display());
    }
    let active = list.entries.values().filter(|e| e.active).count();
    tracing::info!(
        "key list: {} keys ({active} active) from {}",
        list.entries.len(),
        path.display()
    );
    Ok(list)
}

/// Where P0rt's key list is.
pub enum KeyListSource {
    /// `authorized_keys.json`; a missing file lists no key.
    File(PathBuf),
    Redis(RedisKeyList),
}

enum KeyListStore {
    File(WatchedFile<KeyList>),
    Redis(RedisKeyList),
}

impl KeyListStore {
    async fn lookup(&self, fingerprint: &str) -> Lookup {
        match self {
            KeyListStore::File(file) => match file.current().await {
                Ok(list) => match list.get(fingerprint) {
                    Some(entry) => Lookup::Listed(entry.clone()),
                    None => Lookup::NotListed,
                },
                Err(()) => Lookup::Unavailable,
            },
            KeyListStore::Redis(redis) => redis.lookup(fingerprint).await,
        }
    }

    fn describe(&self) -> String {
        match self {
            KeyListStore::File(file) => format!("the key list {}", file.path.display()),
            KeyListStore::Redis(redis) => format!("the key list in Redis ({})", redis.pattern()),
        }
    }
}

/// The key access rule of the SSH edge.
pub struct KeyAccess {
    open: bool,
    list: Option<KeyListStore>,
    authorized_keys: Option<WatchedFile<Vec<KeyData>>>,
}

impl KeyAccess {
    /// `open`: any key may connect (the lists then only give tiers). Otherwise only keys
    /// the key list allows, or the OpenSSH `authorized_keys` file lists.
    pub fn new(
        open: bool,
        list: Option<KeyListSource>,
        authorized_keys: Option<PathBuf>,
    ) -> KeyAccess {
        KeyAccess {
            open,
            list: list.map(|source| match source {
                KeyListSource::File(path) => KeyListStore::File(WatchedFile::new(
                    path,
                    "key list",
                    parse_key_list_file,
                    Some(KeyList::default),
                )),
                KeyListSource::Redis(redis) => KeyListStore::Redis(redis),
            }),
            authorized_keys: authorized_keys.map(|path| {
                WatchedFile::new(path, "authorized keys file", parse_authorized_keys, None)
            }),
        }
    }

    /// Any key may connect, without tiers.
    pub fn open() -> KeyAccess {
        KeyAccess::new(true, None, None)
    }

    /// The rule the configuration asks for (see the module documentation), logged once.
    /// `link`: the host's Redis, when it has one.
    pub async fn from_config(
        config: &Config,
        link: Option<&Arc<RedisLink>>,
    ) -> Result<KeyAccess, String> {
        let redis = match link {
            Some(link) if config.storage == StorageKind::Redis => {
                Some(RedisKeyList::new(link.clone(), &config.redis_prefix))
            }
            _ => None,
        };
        let default_file = PathBuf::from(key_list::DEFAULT_KEY_LIST);
        let (source, listed) = match (redis, &config.key_list) {
            (Some(redis), configured) => {
                if let Some(path) = configured {
                    tracing::warn!(
                        "key list: the domain store is Redis, so the key list is read from \
                         Redis ({}), as P0rt does; ssh.key_list / P0RT_AUTHORIZED_KEYS ({}) \
                         is not read",
                        redis.pattern(),
                        path.display()
                    );
                }
                let listed = match config.open_access {
                    Some(_) => false,
                    None if configured.is_some() => true,
                    None => redis.has_any().await.map_err(|e| {
                        format!(
                            "cannot check whether Redis holds a key list ({}): {e}; set \
                             ssh.open_access (P0RT_OPEN_ACCESS) to true or false to decide \
                             without asking",
                            redis.pattern()
                        )
                    })?,
                };
                (Some(KeyListSource::Redis(redis)), listed)
            }
            (None, Some(path)) => (Some(KeyListSource::File(path.clone())), true),
            (None, None) if default_file.exists() => {
                (Some(KeyListSource::File(default_file)), true)
            }
            (None, None) => (None, false),
        };
        let open = config
            .open_access
            .unwrap_or(!listed && config.authorized_keys.is_none());
        let access = KeyAccess::new(open, source, config.authorized_keys.clone());
        access.log_mode(config.open_access.is_some());
        Ok(access)
    }

    fn log_mode(&self, explicit: bool) {
        let list = self.list.as_ref().map(KeyListStore::describe);
        if self.open {
            let why = if explicit {
                "ssh.open_access / P0RT_OPEN_ACCESS is true"
            } else {
                "no key list or authorized_keys file; set ssh.open_access: false \
                 (P0RT_OPEN_ACCESS=false) to refuse unlisted keys"
            };
            match list {
                Some(list) => {
                    tracing::info!("access: open, any key may connect ({why}); tiers from {list}")
                }
                None => tracing::info!("access: open, any key may connect ({why})"),
            }
            return;
        }
        let mut sources: Vec<String> = list.into_iter().collect();
        if let Some(file) = &self.authorized_keys {
            sources.push(format!("the authorized_keys file {}", file.path.display()));
        }
        if sources.is_empty() {
            tracing::warn!(
                "access: restricted (ssh.open_access / P0RT_OPEN_ACCESS is false) and no key \
                 list is configured: every key is refused; set ssh.key_list \
                 (P0RT_AUTHORIZED_KEYS) or ssh.authorized_keys"
            );
        } else {
            tracing::info!("access: only keys in {}", sources.join(" or "));
        }
        if let Some(KeyListStore::File(file)) = &self.list
            && !file.path.exists()
        {
            tracing::warn!(
                "key list {} does not exist yet: no key in it may connect until it is created",
                file.path.display()
            );
        }
    }

    /// What to do with `key` now.
    pub async fn check(&self, key: &PublicKey) -> KeyVerdict {
        let listed = match &self.list {
            Some(list) => list.lookup(&crate::names::fingerprint(key)).await,
            None => Lookup::NotListed,
        };
        let now = OffsetDateTime::now_utc();
        if self.open {
            let tier = match listed {
                Lookup::Listed(entry) => entry.judge(now).ok().flatten(),
                _ => None,
            };
            return KeyVerdict::Allowed { tier };
        }
        match listed {
            Lookup::Listed(entry) => match entry.judge(now) {
                Ok(tier) => KeyVerdict::Allowed { tier },
                Err(message) => KeyVerdict::Refused(message),
            },
            Lookup::Unavailable => KeyVerdict::Unavailable,
            Lookup::NotListed => match &self.authorized_keys {
                None => KeyVerdict::Unlisted,
                Some(file) => match file.current().await {
                    Ok(keys) if keys.iter().any(|k| k == key.key_data()) => {
                        KeyVerdict::Allowed { tier: None }
                    }
                    Ok(_) => KeyVerdict::Unlisted,
                    Err(()) => KeyVerdict::Unavailable,
                },
            },
        }
    }

    /// True if `key` may connect now.
    pub async fn allows(&self, key: &PublicKey) -> bool {
        matches!(self.check(key).await, KeyVerdict::Allowed { .. })
    }
}

#[cfg(test)]
mod tests {
    use russh::keys::PrivateKey;
    use russh::keys::ssh_key::private::Ed25519Keypair;

    use super::*;

    fn key(seed: u8) -> PrivateKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
    }

    fn line(key: &PrivateKey) -> String {
        format!("{}\n", key.public_key().to_openssh().unwrap())
    }

    fn fp(key: &PrivateKey) -> String {
        crate::names::fingerprint(key.public_key())
    }

    /// A P0rt-shaped entry.
    fn entry(key: &PrivateKey, tier: &str, active: bool, expires_at: Option<&str>) -> String {
        let expiry = expires_at
            .map(|t| format!(",\n    \"expires_at\": \"{t}\""))
            .unwrap_or_default();
        format!(
            "  {{\n    \"fingerprint\": \"{}\",\n    \"public_key\": \"\",\n    \"comment\": \"\",\n    \
             \"tier\": \"{tier}\",\n    \"added_at\": \"2025-06-21T12:00:00Z\"{expiry},\n    \
             \"active\": {active}\n  }}",
            fp(key)
        )
    }

    fn list(entries: &[String]) -> String {
        format!("[\n{}\n]\n", entries.join(",\n"))
    }

    #[test]
    fn settings_p0rts_variables_and_yaml_keys() {
        use crate::config::ServeArgs;
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("p0rt.yaml");
        let yaml_text = yaml.to_string_lossy().into_owned();
        let load = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .chain([("CONFIG_FILE".to_string(), yaml_text.clone())])
                .collect();
            Config::load(&ServeArgs::default(), &move |var: &str| {
                vars.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone())
            })
        };
        std::fs::write(&yaml, "").unwrap();
        let c = load(&[]).unwrap();
        assert_eq!((c.open_access, c.key_list), (None, None));
        let c = load(&[
            ("P0RT_OPEN_ACCESS", "true"),
            ("P0RT_AUTHORIZED_KEYS", "/etc/p0rt/keys.json"),
        ])
        .unwrap();
        assert_eq!(c.open_access, Some(true));
        assert_eq!(c.key_list, Some(PathBuf::from("/etc/p0rt/keys.json")));
        assert_eq!(
            load(&[("P0RT_OPEN_ACCESS", "false")]).unwrap().open_access,
            Some(false)
        );
        // P0rt reads anything but "true" as restricted; p0rt refuses to guess.
        for odd in ["1", "TRUE", "yes"] {
            let e = load(&[("P0RT_OPEN_ACCESS", odd)]).unwrap_err().to_string();
            assert!(
                e.contains("P0RT_OPEN_ACCESS") && e.contains("true or false"),
                "{e}"
            );
        }
        std::fs::write(&yaml, "ssh:\n  open_access: false\n  key_list: keys.json\n").unwrap();
        let c = load(&[]).unwrap();
        assert_eq!(c.open_access, Some(false));
        assert_eq!(c.key_list, Some(PathBuf::from("keys.json")));
        // The environment wins over YAML.
        assert_eq!(
            load(&[("P0RT_OPEN_ACCESS", "true")]).unwrap().open_access,
            Some(true)
        );
    }

    #[tokio::test]
    async fn open_access_allows_any_key() {
        assert!(KeyAccess::open().allows(key(1).public_key()).await);
    }

    #[tokio::test]
    async fn the_file_is_reread_when_it_changes_and_a_broken_file_refuses_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_keys");
        let (alice, bob) = (key(1), key(2));
        std::fs::write(&path, line(&alice)).unwrap();
        let access = KeyAccess::new(false, None, Some(path.clone()));
        assert!(access.allows(alice.public_key()).await);
        assert_eq!(access.check(bob.public_key()).await, KeyVerdict::Unlisted);

        // An edit (here: a longer file) is seen at the next login, without a restart.
        std::fs::write(&path, line(&alice) + &line(&bob)).unwrap();
        assert!(access.allows(bob.public_key()).await);

        // A file that does not parse refuses everyone, including keys allowed before.
        std::fs::write(&path, "this is not a key line at all\n").unwrap();
        assert_eq!(
            access.check(alice.public_key()).await,
            KeyVerdict::Unavailable
        );
        // A missing file too.
        std::fs::remove_file(&path).unwrap();
        assert!(!access.allows(alice.public_key()).await);
        std::fs::write(&path, line(&alice)).unwrap();
        assert!(access.allows(alice.public_key()).await);
    }

    #[tokio::test]
    async fn the_key_list_gives_tiers_refuses_with_reasons_and_follows_edits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_keys.json");
        let (premium, inactive, expired, stranger) = (key(1), key(2), key(3), key(4));
        std::fs::write(
            &path,
            list(&[
                entry(&premium, "premium", true, None),
                entry(&inactive, "free", false, None),
                entry(&expired, "beta", true, Some("2020-01-01T00:00:00Z")),
            ]),
        )
        .unwrap();
        let access = KeyAccess::new(false, Some(KeyListSource::File(path.clone())), None);
        assert_eq!(
            access.check(premium.public_key()).await,
            KeyVerdict::Allowed {
                tier: Some("premium".into())
            }
        );
        let KeyVerdict::Refused(why) = access.check(inactive.public_key()).await else {
            panic!("an inactive key was not refused with a reason");
        };
        assert!(
            why.contains("deactivated") && why.contains(&fp(&inactive)),
            "{why}"
        );
        let KeyVerdict::Refused(why) = access.check(expired.public_key()).await else {
            panic!("an expired key was not refused with a reason");
        };
        assert!(why.contains("expired at 2020-01-01T00:00:00Z"), "{why}");
        assert_eq!(
            access.check(stranger.public_key()).await,
            KeyVerdict::Unlisted
        );

        // Deactivating one key and adding another counts at the next login.
        std::fs::write(
            &path,
            list(&[
                entry(&premium, "premium", false, None),
                entry(&stranger, "", true, None),
            ]),
        )
        .unwrap();
        assert!(matches!(
            access.check(premium.public_key()).await,
            KeyVerdict::Refused(_)
        ));
        assert_eq!(
            access.check(stranger.public_key()).await,
            KeyVerdict::Allowed { tier: None }
        );

        // A broken list refuses everyone (fail closed), without counting it against them.
        std::fs::write(&path, "[{").unwrap();
        assert_eq!(
            access.check(stranger.public_key()).await,
            KeyVerdict::Unavailable
        );
        // A missing one lists nobody, as in P0rt.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            access.check(stranger.public_key()).await,
            KeyVerdict::Unlisted
        );
    }

    #[tokio::test]
    async fn the_key_list_and_an_openssh_file_together() {
        let dir = tempfile::tempdir().unwrap();
        let (json, openssh) = (
            dir.path().join("authorized_keys.json"),
            dir.path().join("authorized_keys"),
        );
        let (listed, in_file, deactivated) = (key(1), key(2), key(3));
        std::fs::write(
            &json,
            list(&[
                entry(&listed, "vip", true, None),
                entry(&deactivated, "vip", false, None),
            ]),
        )
        .unwrap();
        std::fs::write(&openssh, line(&in_file) + &line(&deactivated)).unwrap();
        let access = KeyAccess::new(
            false,
            Some(KeyListSource::File(json.clone())),
            Some(openssh.clone()),
        );
        assert!(access.allows(listed.public_key()).await);
        assert_eq!(
            access.check(in_file.public_key()).await,
            KeyVerdict::Allowed { tier: None }
        );
        // Deactivated in the key list wins over the OpenSSH file.
        assert!(matches!(
            access.check(deactivated.public_key()).await,
            KeyVerdict::Refused(_)
        ));

        // Open access lets everyone in, with the tiers of keys the list allows.
        let open = KeyAccess::new(true, Some(KeyListSource::File(json)), Some(openssh));
        assert_eq!(
            open.check(listed.public_key()).await,
            KeyVerdict::Allowed {
                tier: Some("vip".into())
            }
        );
        assert_eq!(
            open.check(deactivated.public_key()).await,
            KeyVerdict::Allowed { tier: None }
        );
        assert_eq!(
            open.check(key(9).public_key()).await,
            KeyVerdict::Allowed { tier: None }
        );
    }
}
