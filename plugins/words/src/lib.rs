//! `words`: P0rt's three-word names (`whale-guitar-fox`).
//!
//! For the same key it yields exactly P0rt's name, which is also the host's built-in name
//! (same word list, same derivation), so a P0rt user keeps their name and switching between
//! this plugin and the fallback renames nobody. The key hash `H` (hex) read as a 256-bit
//! number `N` picks the words at `N mod 664`, `(N >> 8) mod 664` and `(N >> 16) mod 664` of
//! P0rt's word list; attempt `n > 0` reads them from hex SHA-256 of `H` followed by `n - 1`
//! in decimal (P0rt's salted retries).
//!
//! Requested names (`ssh -R myapp:80:…`) are served as sub-names `myapp-<main name>` by
//! default. The operator may let keys own requested names outright (sidecar `words.json`):
//!
//! ```json
//! { "grant_requested": true, "max_requested_names_per_key": 3 }
//! ```
//! With `grant_requested`, a label is granted if the key already owns it (a reconnect) or if
//! the key owns fewer granted names than the cap; otherwise it is refused.

// Natively (unit tests) the component glue is left out, so its callees look unused.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use std::cell::Cell;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// P0rt's word list (see NOTICE), shared with the host through the repository.
const WORD_LIST: &str = include_str!("../../../host/src/words.txt");
/// Words in P0rt's list (duplicates included).
const P0RT_WORD_COUNT: usize = 664;
/// Words per name.
const WORDS_PER_NAME: usize = 3;
/// Requested names a key may own when the sidecar does not say.
const DEFAULT_MAX_REQUESTED_NAMES: u32 = 3;

/// The sidecar configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    /// Grant requested labels as names of their own instead of `label-<main>` sub-names.
    grant_requested: bool,
    /// Granted names per key (the main name does not count).
    max_requested_names_per_key: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            grant_requested: false,
            max_requested_names_per_key: DEFAULT_MAX_REQUESTED_NAMES,
        }
    }
}

fn parse_config(text: &str) -> Result<Config, String> {
    serde_json::from_str(text).map_err(|e| format!("words config: {e}"))
}

/// What to do with a requested label; the plain-Rust twin of the WIT decision, so the rule
/// is testable natively.
#[derive(Debug, PartialEq, Eq)]
enum LabelDecision {
    /// Serve `label-<main>` (0.1's behaviour).
    SubName,
    /// Grant the label as a name of the key's own.
    Grant,
    Refuse(String),
}

/// Judges a requested label. `owned` lists the key's names, its main name first.
fn judge_label(config: Config, label: &str, owned: &[String]) -> LabelDecision {
    if !config.grant_requested {
        // Sub-names are always `label-<own name>`, so they cannot collide with another
        // key's three-word name: approve any label the host accepted.
        return LabelDecision::SubName;
    }
    // A reconnect asks again for a name the key already holds: grant it again, whatever the
    // cap is now (lowering the cap must not take names away from a connected owner).
    if owned.iter().any(|name| name == label) {
        return LabelDecision::Grant;
    }
    let granted = owned.len().saturating_sub(1);
    let cap = config.max_requested_names_per_key as usize;
    if granted < cap {
        LabelDecision::Grant
    } else {
        LabelDecision::Refuse(format!(
            "this key already owns {granted} requested name{} (the cap is {cap}); ask the \
             operator to raise it or to release one",
            if granted == 1 { "" } else { "s" }
        ))
    }
}

/// Parsed once per instance; warm instances reuse it across calls.
fn words() -> &'static [&'static str] {
    static WORDS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    WORDS.get_or_init(|| {
        WORD_LIST
            .lines()
            .map(str::trim)
            .filter(|w| !w.is_empty() && !w.starts_with('#'))
            .collect()
    })
}

/// The hex number attempt `attempt` reads its words from: the key hash itself, then P0rt's
/// salted hashes (attempt `n` is P0rt's salt `n - 1`). A hash that is not hex (the host never
/// sends one) is read as the hex SHA-256 of its text, as the host's namer does.
fn candidate_hex(ssh_key_hash: &str, attempt: u32) -> String {
    let is_hex = !ssh_key_hash.is_empty() && ssh_key_hash.bytes().all(|b| b.is_ascii_hexdigit());
    match attempt {
        0 if is_hex => ssh_key_hash.to_string(),
        0 => hex(&Sha256::digest(ssh_key_hash.as_bytes())),
        n => hex(&Sha256::digest(
            format!("{ssh_key_hash}{}", n - 1).as_bytes(),
        )),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `(N >> (8 * shift)) mod m` for the number `N` written in `hex`: the shift drops the last
/// `2 * shift` digits, the rest is folded digit by digit.
fn hex_shifted_mod(hex: &str, shift: usize, m: u32) -> u32 {
    let keep = hex.len().saturating_sub(2 * shift);
    hex.as_bytes()[..keep].iter().fold(0, |rest, &digit| {
        (rest * 16 + char::from(digit).to_digit(16).unwrap_or(0)) % m
    })
}

/// P0rt's name for a key hash at an attempt (0 = first choice); the host's built-in namer.
fn derive(ssh_key_hash: &str, attempt: u32) -> String {
    let hex = candidate_hex(ssh_key_hash, attempt);
    let words = words();
    let count = words.len() as u32;
    (0..WORDS_PER_NAME)
        .map(|shift| words[hex_shifted_mod(&hex, shift, count) as usize])
        .collect::<Vec<_>>()
        .join("-")
}

thread_local! {
    static CONFIG: Cell<Config> = Cell::new(Config::default());
}

/// The component glue. Only built for wasm, so the rule above can be unit-tested natively.
#[cfg(target_arch = "wasm32")]
mod component {
    use super::*;

    wit_bindgen::generate!({ path: "../../wit/v0.2", world: "naming-plugin" });

    use exports::p0rt::policy::naming::{Guest as Naming, NamingDecision, NamingRequest};

    struct Words;

    impl Naming for Words {
        fn choose_name(request: NamingRequest) -> NamingDecision {
            let Some(label) = request.requested_label else {
                return NamingDecision::Name(derive(&request.ssh_key_hash, request.attempt));
            };
            match judge_label(CONFIG.get(), &label, &request.owned_names) {
                LabelDecision::SubName => NamingDecision::Name(label),
                LabelDecision::Grant => NamingDecision::GrantRequested,
                LabelDecision::Refuse(reason) => NamingDecision::Refuse(reason),
            }
        }
    }

    impl exports::p0rt::policy::init::Guest for Words {
        fn init(config: String) -> Result<(), String> {
            CONFIG.set(parse_config(&config)?);
            Ok(())
        }
    }

    export!(Words);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granting(cap: u32) -> Config {
        Config {
            grant_requested: true,
            max_requested_names_per_key: cap,
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn config_defaults_and_rejects_unknown_fields() {
        assert_eq!(parse_config("{}").unwrap(), Config::default());
        let c =
            parse_config(r#"{"grant_requested": true, "max_requested_names_per_key": 1}"#).unwrap();
        assert_eq!(c, granting(1));
        let err = parse_config(r#"{"grant": true}"#).unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn default_serves_sub_names() {
        let owned = names(&["whale-guitar-fox", "a", "b", "c", "d"]);
        assert_eq!(
            judge_label(Config::default(), "myapp", &owned),
            LabelDecision::SubName
        );
    }

    #[test]
    fn grants_below_the_cap() {
        let c = granting(2);
        assert_eq!(judge_label(c, "x", &[]), LabelDecision::Grant);
        assert_eq!(judge_label(c, "x", &names(&["main"])), LabelDecision::Grant);
        assert_eq!(
            judge_label(c, "x", &names(&["main", "a"])),
            LabelDecision::Grant
        );
        let LabelDecision::Refuse(reason) = judge_label(c, "x", &names(&["main", "a", "b"])) else {
            panic!("expected a refusal");
        };
        assert!(
            reason.contains("owns 2 requested names (the cap is 2)"),
            "{reason}"
        );
    }

    #[test]
    fn regrants_owned_names_over_the_cap() {
        let c = granting(0);
        assert_eq!(
            judge_label(c, "a", &names(&["main", "a", "b"])),
            LabelDecision::Grant
        );
        assert!(matches!(
            judge_label(c, "new", &names(&["main"])),
            LabelDecision::Refuse(_)
        ));
    }

    #[test]
    fn word_list_is_p0rts() {
        assert_eq!(words().len(), P0RT_WORD_COUNT);
        assert_eq!(words()[0], "aardvark");
        assert_eq!(words()[P0RT_WORD_COUNT - 1], "grace");
    }

    /// The check key of issue #14: hex SHA-256 of its base64 body, and P0rt's names for it.
    #[test]
    fn check_key_gets_p0rts_names() {
        let body = "AAAAC3NzaC1lZDI1NTE5AAAAIKES46z/T543b19cKV3hyJUH/BQhZEYgWYl+Zi2rOiuB";
        let hash = hex(&Sha256::digest(body.as_bytes()));
        assert_eq!(
            hash,
            "4814222560f0291c7775f7b66b41b2e14fb9029a92ba33215b2c339066f41f2b"
        );
        assert_eq!(derive(&hash, 0), "eager-pixel-ant");
        assert_eq!(derive(&hash, 1), "hacker-coyote-orangutan");
        assert_eq!(derive(&hash, 2), "script-lark-knight");
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
    }

    #[test]
    fn main_name_is_stable() {
        let a = derive("abc", 0);
        assert_eq!(a, derive("abc", 0));
        assert_ne!(a, derive("abc", 1));
        assert_eq!(a.split('-').count(), WORDS_PER_NAME);
    }
}
