//! Names and keys, the vocabulary every other part shares: the key hash, tunnel names and
//! sub-name labels (as newtypes, so they cannot be mixed up), the DNS-label rule, the
//! reserved words and the built-in three-word namer. A leaf: it imports nothing of the crate.
//!
//! The built-in namer is deterministic: the same key hash always yields the same candidate
//! list, so a key keeps its name even if the store is lost. On a collision the next attempt
//! salts the hash (`{hash}:{attempt}`), exactly as the `words` plugin does.

use std::fmt;
use std::sync::LazyLock;

use sha2::{Digest, Sha256};

/// Longest DNS label (RFC 1035), and so the longest tunnel name.
pub const MAX_LABEL_LEN: usize = 63;
/// Longest sub-name label a client may request with `-R label:80:…`.
pub const MAX_SUBNAME_LABEL_LEN: usize = 20;
/// Words per generated name (`whale-guitar-fox`).
pub const WORDS_PER_NAME: usize = 3;
/// Candidate main names tried when looking for the owner of a host label
/// (`a-b-c-d` → `a-b-c-d`, `b-c-d`, `c-d`, `d`): bounds the store lookups one request or
/// one claim can cause, whatever the label.
pub const MAX_OWNER_CANDIDATES: usize = 8;

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

/// Checks one DNS label: 1–63 characters of `a-z`, `0-9`, `-`, not starting or ending with `-`.
pub fn check_dns_label(label: &str) -> Result<(), String> {
    if label.is_empty() || label.len() > MAX_LABEL_LEN {
        return Err(format!(
            "label {label:?} must be 1 to {MAX_LABEL_LEN} characters"
        ));
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!("label {label:?} may only contain a-z, 0-9 and '-'"));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("label {label:?} must not start or end with '-'"));
    }
    Ok(())
}

/// Checks a lowercase DNS name: dot-separated labels of `a-z`, `0-9` and inner `-`.
pub fn check_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".into());
    }
    if name.len() > 253 {
        return Err("it is longer than 253 characters".into());
    }
    name.split('.').try_for_each(check_dns_label)
}

/// P0rt's key hash: hex SHA-256 of the key's base64 body (the middle field of an
/// `authorized_keys` line), so P0rt's stored records match the same keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash(String);

impl KeyHash {
    /// The hash of an SSH public key.
    pub fn of_key(key: &russh::keys::PublicKey) -> KeyHash {
        let line = key.to_openssh().unwrap_or_default();
        let body = line.split_whitespace().nth(1).unwrap_or(&line);
        KeyHash(hex::encode(Sha256::digest(body.as_bytes())))
    }

    /// A hash as stored (records, plugin input); not checked.
    pub fn from_stored(hash: impl Into<String>) -> KeyHash {
        KeyHash(hash.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// OpenSSH-style fingerprint (`SHA256:…`), for messages to users and plugins.
pub fn fingerprint(key: &russh::keys::PublicKey) -> String {
    key.fingerprint(russh::keys::HashAlg::Sha256).to_string()
}

/// A tunnel name: one lowercase DNS label, a key's main name or a sub-name
/// (`label-<main name>`). Routing, the registry and the store all speak this type.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TunnelName(String);

impl TunnelName {
    /// A name that must be a valid DNS label (from a client, a plugin or a record).
    pub fn parse(name: &str) -> Result<TunnelName, String> {
        check_dns_label(name)?;
        Ok(TunnelName(name.to_string()))
    }

    /// The sub-name `label-<self>`.
    pub fn subname(&self, label: &Label) -> Result<TunnelName, String> {
        TunnelName::parse(&format!("{}-{}", label.0, self.0))
    }

    /// Names that could be the main name owning this one: itself, then each suffix after a
    /// `-`, at most [`MAX_OWNER_CANDIDATES`]. The one bounded walk used both to route a
    /// `Host` and to keep a new main name out of another key's sub-name space.
    pub fn owner_candidates(&self) -> impl Iterator<Item = &str> {
        std::iter::successors(Some(self.0.as_str()), |rest| {
            rest.split_once('-').map(|(_, suffix)| suffix)
        })
        .take(MAX_OWNER_CANDIDATES)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lets maps keyed by name be searched with the `Host` label text, without allocating.
impl std::borrow::Borrow<str> for TunnelName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TunnelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A sub-name label a client asked for with `-R label:80:…`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Label(String);

impl Label {
    /// Turns the bind address of a `tcpip-forward` into a sub-name label, or `None` for the
    /// key's main name (OpenSSH sends `localhost` when no bind address is given, `""` for `*`).
    /// Errors are the client's: they say what to send instead.
    pub fn from_bind_address(bind_address: &str) -> Result<Option<Label>, String> {
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
        check_dns_label(&label)
            .map_err(|e| format!("sub-name {bind_address:?} is not usable: {e}"))?;
        // Reserved words are reserved as whole names only: `api-<name>` belongs to its key.
        Ok(Some(Label(label)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The word list, shared with the `words` plugin so both derive the same names.
pub static WORDS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    include_str!("words.txt")
        .lines()
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .collect()
});

/// The built-in namer's candidate for a key at a given attempt (0 = first choice).
pub fn builtin_name(key: &KeyHash, attempt: u32) -> TunnelName {
    let digest = if attempt == 0 {
        Sha256::digest(key.as_str().as_bytes())
    } else {
        Sha256::digest(format!("{key}:{attempt}").as_bytes())
    };
    let words = &*WORDS;
    let parts: Vec<&str> = digest
        .chunks(4)
        .take(WORDS_PER_NAME)
        .map(|chunk| {
            let n = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize;
            words[n % words.len()]
        })
        .collect();
    TunnelName(parts.join("-"))
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
        let key = KeyHash::from_stored("abc");
        let a = builtin_name(&key, 0);
        assert_eq!(a, builtin_name(&key, 0));
        assert_ne!(a, builtin_name(&key, 1));
        assert_eq!(a.as_str().split('-').count(), WORDS_PER_NAME);
        check_dns_label(a.as_str()).unwrap();
    }

    #[test]
    fn labels_from_bind_addresses() {
        assert_eq!(Label::from_bind_address("localhost").unwrap(), None);
        assert_eq!(Label::from_bind_address("").unwrap(), None);
        assert_eq!(
            Label::from_bind_address("API2").unwrap().unwrap().as_str(),
            "api2"
        );
        assert_eq!(
            Label::from_bind_address("api").unwrap().unwrap().as_str(),
            "api",
            "reserved words are reserved as whole names only"
        );
        assert!(Label::from_bind_address("a.b").is_err());
        assert!(Label::from_bind_address("-x").is_err());
        assert!(Label::from_bind_address(&"x".repeat(64)).is_err());
    }

    #[test]
    fn owner_candidates_are_bounded_suffixes() {
        let name = TunnelName::parse("my-app-eager-pixel-ant").unwrap();
        let all: Vec<&str> = name.owner_candidates().collect();
        assert_eq!(
            all,
            [
                "my-app-eager-pixel-ant",
                "app-eager-pixel-ant",
                "eager-pixel-ant",
                "pixel-ant",
                "ant"
            ]
        );
        let long = TunnelName::parse("a-".repeat(30).trim_end_matches('-')).unwrap();
        assert_eq!(long.owner_candidates().count(), MAX_OWNER_CANDIDATES);
    }

    #[test]
    fn dns_labels() {
        assert!(check_dns_label("eager-pixel-ant").is_ok());
        for bad in ["", "a.b", "Evil", "ünï", "-a", "a-", &"x".repeat(64)] {
            assert!(check_dns_label(bad).is_err(), "{bad:?}");
        }
    }
}
