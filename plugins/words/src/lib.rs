//! `words`: P0rt-style three-word names (`whale-guitar-fox`).
//!
//! For the same key it yields exactly the host's built-in name (same word list, same
//! derivation), so switching between this plugin and the fallback renames nobody.

use sha2::{Digest, Sha256};

wit_bindgen::generate!({ path: "../../wit", world: "naming-plugin" });

use exports::p0rt::policy::naming::{Guest as Naming, NamingDecision, NamingRequest};

/// The host's word list, shared through the repository.
const WORD_LIST: &str = include_str!("../../../host/src/words.txt");
/// Words per name.
const WORDS_PER_NAME: usize = 3;

struct Words;

/// Parsed once per instance; warm instances reuse it across calls.
fn words() -> &'static [&'static str] {
    static WORDS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    WORDS.get_or_init(|| {
        WORD_LIST
            .lines()
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .collect()
    })
}

/// Same derivation as the host's built-in namer: 32-bit big-endian chunks of
/// SHA-256(hash) (or SHA-256("hash:attempt") on retries), each modulo the list length.
fn derive(ssh_key_hash: &str, attempt: u32) -> String {
    let digest = if attempt == 0 {
        Sha256::digest(ssh_key_hash.as_bytes())
    } else {
        Sha256::digest(format!("{ssh_key_hash}:{attempt}").as_bytes())
    };
    let words = words();
    digest
        .chunks(4)
        .take(WORDS_PER_NAME)
        .map(|c| words[u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize % words.len()])
        .collect::<Vec<_>>()
        .join("-")
}

impl Naming for Words {
    fn choose_name(request: NamingRequest) -> NamingDecision {
        if let Some(label) = request.requested_label {
            // Sub-names are always `label-<own name>`, so they cannot collide with another
            // key's three-word name: approve any label the host accepted.
            return NamingDecision::Name(label);
        }
        NamingDecision::Name(derive(&request.ssh_key_hash, request.attempt))
    }
}

impl exports::p0rt::policy::init::Guest for Words {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }
}

export!(Words);
