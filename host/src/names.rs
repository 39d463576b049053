//! Names and keys, the vocabulary every other part shares: the key hash, tunnel names and
//! sub-name labels (as newtypes, so they cannot be mixed up), the DNS-label rule, the
//! reserved words and the built-in three-word namer. A leaf: it imports nothing of the crate.
//!
//! The built-in namer is P0rt's, so a key gets the name P0rt gives it: the key hash `H` (hex)
//! read as a 256-bit number `N` picks the words at `N mod L`, `(N >> 8) mod L` and
//! `(N >> 16) mod L` of P0rt's word list (`L` = 664 words, duplicates included). On a
//! collision P0rt's salted retries follow: `H'` = hex SHA-256 of `H` followed by the decimal
//! retry number (0, 1, …). It is deterministic, so a key keeps its name even if the store is
//! lost, and the bundled `words` plugin derives exactly the same.

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

/// Words in P0rt's list (duplicates included).
pub const P0RT_WORD_COUNT: usize = 664;

/// P0rt's word list in P0rt's order (see NOTICE), shared with the `words` plugin so both
/// derive the same names.
pub static WORDS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    include_str!("words.txt")
        .lines()
        .map(str::trim)
        .filter(|w| !w.is_empty() && !w.starts_with('#'))
        .collect()
});

/// The hex number attempt `attempt` reads its words from. Attempt 0 is the key hash itself;
/// attempt `n` is P0rt's retry `n - 1`: hex SHA-256 of the hash followed by `n - 1` in
/// decimal. A stored hash that is not hex (the host never makes one) is read as the hex
/// SHA-256 of its text, so it still gets a stable name.
fn candidate_hex(key: &str, attempt: u32) -> String {
    let is_hex = !key.is_empty() && key.bytes().all(|b| b.is_ascii_hexdigit());
    match attempt {
        0 if is_hex => key.to_string(),
        0 => hex::encode(Sha256::digest(key.as_bytes())),
        n => hex::encode(Sha256::digest(format!("{key}{}", n - 1).as_bytes())),
    }
}

/// `(N >> (8 * shift)) mod m` for the number `N` written in `hex`: the shift drops the last
/// `2 * shift` digits, the rest is folded digit by digit (no big integers needed).
fn hex_shifted_mod(hex: &str, shift: usize, m: u32) -> u32 {
    let keep = hex.len().saturating_sub(2 * shift);
    hex.as_bytes()[..keep].iter().fold(0, |rest, &digit| {
        let value = char::from(digit).to_digit(16).unwrap_or(0);
        (rest * 16 + value) % m
    })
}

/// The built-in namer's candidate for a key at a given attempt (0 = first choice): P0rt's
/// name for the key, then P0rt's salted alternatives.
pub fn builtin_name(key: &KeyHash, attempt: u32) -> TunnelName {
    let hex = candidate_hex(key.as_str(), attempt);
    let words = &*WORDS;
    let count = u32::try_from(words.len()).expect("word list fits in u32");
    let parts: Vec<&str> = (0..WORDS_PER_NAME)
        .map(|shift| words[hex_shifted_mod(&hex, shift, count) as usize])
        .collect();
    TunnelName(parts.join("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check key of issue #14 (its authorized_keys body) and the names P0rt gives it.
    const CHECK_KEY: &str = "ssh-ed25519 \
        AAAAC3NzaC1lZDI1NTE5AAAAIKES46z/T543b19cKV3hyJUH/BQhZEYgWYl+Zi2rOiuB check";

    #[test]
    fn word_list_is_p0rts() {
        assert_eq!(WORDS.len(), P0RT_WORD_COUNT);
        assert_eq!(WORDS[0], "aardvark");
        assert_eq!(WORDS[P0RT_WORD_COUNT - 1], "grace");
        // P0rt's list repeats some words; the duplicates stay, or indexes would shift.
        assert_eq!(WORDS.iter().filter(|w| **w == "duck").count(), 2);
        for w in WORDS.iter() {
            assert!(
                !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()),
                "{w}"
            );
        }
        let longest = WORDS.iter().map(|w| w.len()).max().unwrap();
        assert!(WORDS_PER_NAME * (longest + 1) - 1 <= MAX_LABEL_LEN);
    }

    #[test]
    fn check_key_gets_p0rts_names() {
        let key = russh::keys::PublicKey::from_openssh(CHECK_KEY).unwrap();
        let hash = KeyHash::of_key(&key);
        assert_eq!(
            hash.as_str(),
            "4814222560f0291c7775f7b66b41b2e14fb9029a92ba33215b2c339066f41f2b"
        );
        assert_eq!(builtin_name(&hash, 0).as_str(), "eager-pixel-ant");
        assert_eq!(builtin_name(&hash, 1).as_str(), "hacker-coyote-orangutan");
        assert_eq!(builtin_name(&hash, 2).as_str(), "script-lark-knight");
    }

    #[test]
    fn hex_mod_matches_integer_arithmetic() {
        for n in [
            0u128,
            1,
            663,
            664,
            665,
            0xdead_beef,
            u64::MAX as u128,
            u128::MAX,
        ] {
            let hex = format!("{n:x}");
            for shift in 0..3 {
                let expected = ((n >> (8 * shift)) % 664) as u32;
                assert_eq!(
                    hex_shifted_mod(&hex, shift, 664),
                    expected,
                    "{hex} >> {shift}"
                );
            }
        }
        assert_eq!(hex_shifted_mod("ABC", 0, 664), 0xabc % 664);
        assert_eq!(hex_shifted_mod("a", 1, 664), 0);
    }

    #[test]
    fn builtin_name_is_stable_and_salted() {
        let key = KeyHash::from_stored("abc");
        let a = builtin_name(&key, 0);
        assert_eq!(a, builtin_name(&key, 0));
        assert_ne!(a, builtin_name(&key, 1));
        assert_eq!(a.as_str().split('-').count(), WORDS_PER_NAME);
        check_dns_label(a.as_str()).unwrap();
        // Retry n is P0rt's salt n - 1.
        assert_eq!(
            candidate_hex("abc", 1),
            hex::encode(Sha256::digest(b"abc0"))
        );
        assert_eq!(
            candidate_hex("abc", 11),
            hex::encode(Sha256::digest(b"abc10"))
        );
        // A hash that is not hex still has a stable name.
        let odd = KeyHash::from_stored("not hex");
        assert_eq!(builtin_name(&odd, 0), builtin_name(&odd, 0));
        check_dns_label(builtin_name(&odd, 0).as_str()).unwrap();
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
