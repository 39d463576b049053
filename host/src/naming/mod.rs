//! Names for keys: the key hash, the built-in three-word namer, and name assignment.
//!
//! The built-in namer is deterministic: the same key hash always yields the same candidate
//! list, so a key keeps its name even if the store is lost. On a collision the next attempt
//! salts the hash (`{hash}:{attempt}`), exactly as the `words` plugin does.

use std::sync::LazyLock;

use sha2::{Digest, Sha256};

use crate::config::check_dns_label;
use crate::plugins::{NameChoice, NamingInput, PolicyPlugins};
use crate::store::{Claim, DomainStore, StoreError};

/// How many salted attempts the namer makes before giving up on a key.
pub const MAX_NAME_ATTEMPTS: u32 = 16;
/// Words per generated name (`whale-guitar-fox`).
pub const WORDS_PER_NAME: usize = 3;
/// Longest sub-name label a client may request with `-R label:80:…`.
pub const MAX_SUBNAME_LABEL_LEN: usize = 20;

/// Names never handed out to a key: they belong to the host or invite confusion.
pub const RESERVED_NAMES: &[&str] = &[
    "www",
    "api",
    "admin",
    "administrator",
    "mail",
    "smtp",
    "imap",
    "pop",
    "ftp",
    "ssh",
    "root",
    "host",
    "localhost",
    "ns",
    "ns1",
    "ns2",
    "mx",
    "dns",
    "health",
    "stats",
    "status",
    "static",
    "assets",
    "cdn",
    "app",
    "dashboard",
    "login",
    "auth",
    "oauth",
    "account",
    "billing",
    "support",
    "help",
    "docs",
    "blog",
    "p0rt",
    "tunnel",
    "tunnels",
    "proxy",
    "internal",
    "metrics",
];

/// True if `name` may never be a key's name.
pub fn is_reserved(name: &str) -> bool {
    RESERVED_NAMES.contains(&name)
}

/// The word list, shared with the `words` plugin so both derive the same names.
pub static WORDS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    include_str!("words.txt")
        .lines()
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .collect()
});

/// P0rt's key hash: hex SHA-256 of the key's base64 body (the middle field of an
/// `authorized_keys` line), so P0rt's stored records match the same keys.
pub fn key_hash(key: &russh::keys::PublicKey) -> String {
    let line = key.to_openssh().unwrap_or_default();
    let body = line.split_whitespace().nth(1).unwrap_or(&line);
    hex::encode(Sha256::digest(body.as_bytes()))
}

/// OpenSSH-style fingerprint (`SHA256:…`), for messages to users and plugins.
pub fn fingerprint(key: &russh::keys::PublicKey) -> String {
    key.fingerprint(russh::keys::HashAlg::Sha256).to_string()
}

/// The built-in namer's candidate for a key hash at a given attempt (0 = first choice).
pub fn builtin_name(ssh_key_hash: &str, attempt: u32) -> String {
    let digest = if attempt == 0 {
        Sha256::digest(ssh_key_hash.as_bytes())
    } else {
        Sha256::digest(format!("{ssh_key_hash}:{attempt}").as_bytes())
    };
    let words = &*WORDS;
    let mut parts = Vec::with_capacity(WORDS_PER_NAME);
    for chunk in digest.chunks(4).take(WORDS_PER_NAME) {
        let n = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize;
        parts.push(words[n % words.len()]);
    }
    parts.join("-")
}

#[derive(Debug, thiserror::Error)]
pub enum NamingError {
    #[error("no free name found for this key after {MAX_NAME_ATTEMPTS} attempts; ask the operator")]
    Exhausted,
    #[error("the naming policy refused this key: {0}")]
    Refused(String),
    #[error("no name can be given right now ({0}); try again shortly")]
    Store(#[from] StoreError),
}

/// True if `candidate` lies in another key's sub-name space: `label-<their name>` for some
/// stored name of a different key. Such a name would shadow that key's sub-names.
async fn in_foreign_subname_space(
    store: &dyn DomainStore,
    candidate: &str,
    ssh_key_hash: &str,
) -> Result<bool, StoreError> {
    let mut rest = candidate;
    while let Some((_, suffix)) = rest.split_once('-') {
        if let Some(owner) = store.owner_of(suffix).await?
            && owner != ssh_key_hash
        {
            return Ok(true);
        }
        rest = suffix;
    }
    Ok(false)
}

/// Claims `candidate` for the key unless it is taken or in another key's sub-name space.
async fn try_claim(
    store: &dyn DomainStore,
    ssh_key_hash: &str,
    candidate: &str,
    now: i64,
) -> Result<Option<String>, NamingError> {
    if is_reserved(candidate) || in_foreign_subname_space(store, candidate, ssh_key_hash).await? {
        return Ok(None);
    }
    match store.claim(ssh_key_hash, candidate, now).await? {
        Claim::Claimed(record) | Claim::AlreadyOwned(record) => Ok(Some(record.domain)),
        Claim::Taken => Ok(None),
    }
}

/// The key's name: its stored record if it has one (noting the connection), otherwise the
/// first candidate the store lets it claim. Candidates come from the naming plugin; if it
/// fails, or all its candidates are taken, from the built-in namer.
pub async fn assign_name(
    store: &dyn DomainStore,
    plugins: Option<&PolicyPlugins>,
    ssh_key_hash: &str,
    fingerprint: &str,
    now: i64,
) -> Result<String, NamingError> {
    if let Some(record) = store.touch(ssh_key_hash, now).await? {
        return Ok(record.domain);
    }
    if let Some(plugins) = plugins.filter(|p| p.enabled()) {
        for attempt in 0..MAX_NAME_ATTEMPTS {
            let input = NamingInput {
                ssh_key_hash: ssh_key_hash.to_string(),
                fingerprint: fingerprint.to_string(),
                requested_label: None,
                attempt,
            };
            let candidate = match plugins.choose_name(&input).await {
                NameChoice::Name(name) => name,
                NameChoice::Refused(reason) => return Err(NamingError::Refused(reason)),
                NameChoice::Fallback(_) => break,
            };
            if let Some(name) = try_claim(store, ssh_key_hash, &candidate, now).await? {
                return Ok(name);
            }
        }
    }
    for attempt in 0..MAX_NAME_ATTEMPTS {
        let candidate = builtin_name(ssh_key_hash, attempt);
        if let Some(name) = try_claim(store, ssh_key_hash, &candidate, now).await? {
            return Ok(name);
        }
    }
    Err(NamingError::Exhausted)
}

/// Asks the naming policy whether a key may use a sub-name label. A failed plugin allows it
/// (the built-in rule: any valid label under the key's own name).
pub async fn approve_label(
    plugins: &PolicyPlugins,
    ssh_key_hash: &str,
    fingerprint: &str,
    label: &str,
) -> Result<(), String> {
    if !plugins.enabled() {
        return Ok(());
    }
    let input = NamingInput {
        ssh_key_hash: ssh_key_hash.to_string(),
        fingerprint: fingerprint.to_string(),
        requested_label: Some(label.to_string()),
        attempt: 0,
    };
    match plugins.choose_name(&input).await {
        NameChoice::Refused(reason) => Err(format!("the naming policy refused it: {reason}")),
        NameChoice::Name(_) | NameChoice::Fallback(_) => Ok(()),
    }
}

/// Turns the bind address of `-R label:80:…` into a sub-name label, or `None` for the
/// key's main name (OpenSSH sends `localhost` when no bind address is given, `""` for `*`).
pub fn subname_label(bind_address: &str) -> Result<Option<String>, String> {
    const MAIN_NAME_ADDRESSES: &[&str] =
        &["", "*", "localhost", "0.0.0.0", "127.0.0.1", "::", "::1"];
    if MAIN_NAME_ADDRESSES.contains(&bind_address) {
        return Ok(None);
    }
    let label = bind_address.to_ascii_lowercase();
    if label.len() > MAX_SUBNAME_LABEL_LEN {
        return Err(format!(
            "sub-name {bind_address:?} is longer than {MAX_SUBNAME_LABEL_LEN} characters"
        ));
    }
    check_dns_label(&label).map_err(|e| format!("sub-name {bind_address:?} is not usable: {e}"))?;
    Ok(Some(label))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_list_is_clean() {
        assert!(WORDS.len() >= 512, "word list too short: {}", WORDS.len());
        for w in WORDS.iter() {
            assert!(w.bytes().all(|b| b.is_ascii_lowercase()), "{w}");
        }
    }

    #[test]
    fn builtin_name_is_stable_and_salted() {
        let a = builtin_name("abc", 0);
        assert_eq!(a, builtin_name("abc", 0));
        assert_ne!(a, builtin_name("abc", 1));
        assert_eq!(a.split('-').count(), WORDS_PER_NAME);
        check_crate_name(&a);
    }

    fn check_crate_name(name: &str) {
        crate::config::check_dns_label(name).unwrap();
    }

    #[test]
    fn subname_labels() {
        assert_eq!(subname_label("localhost").unwrap(), None);
        assert_eq!(subname_label("").unwrap(), None);
        assert_eq!(subname_label("API").unwrap().as_deref(), Some("api"));
        assert!(subname_label("a.b").is_err());
        assert!(subname_label("-x").is_err());
        assert!(subname_label(&"x".repeat(64)).is_err());
    }
}
