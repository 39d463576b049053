//! P0rt drop-in names (issue #14): a key without a record gets the name P0rt would give it,
//! from the bundled `words` plugin and from the built-in namer (`--no-plugins`) alike, and a
//! taken first choice moves to P0rt's first salted alternative.
//!
//! The expected names are computed here, independently of the host: P0rt's algorithm with
//! this file's own SHA-256 call and its own arithmetic on the digest bytes (the host folds hex
//! digits). Only the word list is shared, read from the same file the host embeds.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::plugins::{bundled, path_str, plugin_status};
use crate::support::*;

/// P0rt's word list as the host embeds it.
const WORD_FILE: &str = include_str!("../../host/src/words.txt");
/// Fresh keys per host.
const FRESH_KEYS: usize = 20;

/// Issue #14's check key: its base64 body and the names P0rt gives it.
const CHECK_KEY_BODY: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIKES46z/T543b19cKV3hyJUH/BQhZEYgWYl+Zi2rOiuB";
const CHECK_KEY_NAME: &str = "eager-pixel-ant";
const CHECK_KEY_FIRST_ALTERNATIVE: &str = "hacker-coyote-orangutan";

fn word_list() -> Vec<&'static str> {
    let words: Vec<&str> = WORD_FILE
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(words.len(), 664, "P0rt's list has 664 entries");
    words
}

/// `(N >> (8 * shift)) mod m`, `N` the big-endian number in `bytes`: a shift by 8 bits drops
/// the last byte.
fn shifted_mod(bytes: &[u8], shift: usize, m: u64) -> usize {
    let kept = &bytes[..bytes.len() - shift];
    kept.iter().fold(0u64, |r, &b| (r * 256 + u64::from(b)) % m) as usize
}

/// P0rt's `generateNewDomain`: three words picked by the 256-bit number `bytes`.
fn p0rt_name_of(bytes: &[u8]) -> String {
    let words = word_list();
    let len = words.len() as u64;
    [0, 1, 2]
        .map(|shift| words[shifted_mod(bytes, shift, len)])
        .join("-")
}

/// P0rt's key hash (hex SHA-256 of the key's base64 body) of a body.
fn key_hash_of(body: &str) -> String {
    hex::encode(Sha256::digest(body.as_bytes()))
}

/// P0rt's first choice for a key hash: the hash itself is the number.
fn p0rt_name(key_hash: &str) -> String {
    p0rt_name_of(&hex::decode(key_hash).expect("key hash is hex"))
}

/// P0rt's `generateNewDomainWithSalt(hash, salt)`: SHA-256 of the hex hash followed by the
/// salt in decimal.
fn p0rt_salted_name(key_hash: &str, salt: u32) -> String {
    p0rt_name_of(&Sha256::digest(format!("{key_hash}{salt}").as_bytes()))
}

/// A `domains.json` in P0rt's shape binding `domain` to `key_hash`.
fn seed_domains_json(data_dir: &Path, key_hash: &str, domain: &str) {
    std::fs::create_dir_all(data_dir).unwrap();
    let file = json!({
        key_hash: {
            "domain": domain,
            "ssh_key_hash": key_hash,
            "first_seen": "2025-01-01T00:00:00Z",
            "last_seen": "2025-01-02T00:00:00Z",
            "use_count": 3
        }
    });
    std::fs::write(data_dir.join("domains.json"), file.to_string()).unwrap();
}

fn domains_json(data_dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(data_dir.join("domains.json")).expect("read domains.json");
    serde_json::from_str(&text).expect("domains.json is JSON")
}

/// A host with the default (bundled) plugins, or with `--no-plugins`, on `data_dir`.
async fn start_host(sb: &Sandbox, data_dir: &Path, plugins: bool) -> Host {
    let mut config = HostConfig::flags(data_dir);
    if !plugins {
        config = config.arg("--no-plugins");
    }
    let host = Host::start_with(sb, config).await;
    if plugins {
        let status = plugin_status(&host).await;
        assert!(
            status.iter().any(|p| p["name"] == "words"
                && p["role"] == "naming"
                && p["origin"] == "bundled"
                && p["active"] == true),
            "bundled words not serving naming: {status:#?}"
        );
    } else {
        assert!(host.log().contains("plugins disabled"), "{}", host.log());
    }
    host
}

/// Names must have come from the words plugin itself, not from the fallback after a failure.
fn assert_words_plugin_did_not_fail(host: &Host) {
    let log = host.log();
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("plugin words") && (l.contains("WARN") || l.contains("ERROR")))
        .collect();
    assert!(failures.is_empty(), "words plugin failed: {failures:#?}");
}

/// Runs `p0rt <args>` to completion (bounded); returns stdout, asserting success.
async fn p0rt_cli(cwd: &Path, args: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args).current_dir(cwd);
    for var in p0rt::config::ENV_VARS {
        cmd.env_remove(var);
    }
    cmd.env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let limit = Duration::from_secs(90);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("p0rt {args:?} did not finish within {limit:?}"))
        .expect("run p0rt");
    assert!(
        out.status.success(),
        "p0rt {args:?} exited {}; stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// This file's own derivation gives the check values; the bundled `words` plugin
/// (run through `p0rt plugin run`) and the built-in namer give the same.
#[tokio::test(flavor = "multi_thread")]
async fn check_key_gets_p0rts_name_and_first_alternative() {
    let hash = key_hash_of(CHECK_KEY_BODY);
    assert_eq!(p0rt_name(&hash), CHECK_KEY_NAME);
    assert_eq!(p0rt_salted_name(&hash, 0), CHECK_KEY_FIRST_ALTERNATIVE);

    let sb = Sandbox::new();
    let words = bundled("words.wasm");
    for (attempt, expected) in [(0, CHECK_KEY_NAME), (1, CHECK_KEY_FIRST_ALTERNATIVE)] {
        let input = json!({ "ssh_key_hash": hash, "attempt": attempt }).to_string();
        let stdout = p0rt_cli(
            sb.path(),
            &["plugin", "run", path_str(&words), "--input", &input],
        )
        .await;
        let decision: serde_json::Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("plugin run printed no JSON ({e}): {stdout:?}"));
        assert_eq!(
            decision,
            json!({ "decision": "name", "value": expected }),
            "words plugin, attempt {attempt}"
        );
        let builtin = p0rt::names::builtin_name(&p0rt::names::KeyHash::from_stored(&hash), attempt);
        assert_eq!(
            builtin.as_str(),
            expected,
            "built-in namer, attempt {attempt}"
        );
    }
}

/// Twenty fresh keys, each connected with the real `ssh` client: the name the host prints is
/// P0rt's, with the bundled plugins and with the built-in namer.
#[tokio::test(flavor = "multi_thread")]
async fn fresh_keys_get_p0rts_names() {
    let sb = Sandbox::new();
    let keys: Vec<Key> = (0..FRESH_KEYS).map(|i| sb.key(&format!("k{i}"))).collect();
    let with_plugins = start_host(&sb, &sb.join("words-data"), true).await;
    let builtin = start_host(&sb, &sb.join("builtin-data"), false).await;

    for (i, key) in keys.iter().enumerate() {
        let expected = p0rt_name(&key.key_hash());
        for (host, what) in [
            (&with_plugins, "words plugin"),
            (&builtin, "built-in namer"),
        ] {
            let info = host.info(&sb, key).await;
            assert_eq!(info.name, expected, "key {i} ({}), {what}", key.public);
        }
    }
    assert_words_plugin_did_not_fail(&with_plugins);

    // One of them as a real tunnel: the session announces the same name.
    let backend = Backend::start("p0rt-named").await;
    let mut session = with_plugins
        .ssh(&sb, &keys[0])
        .args(["-tt", "-R", &format!("80:127.0.0.1:{}", backend.port)])
        .spawn();
    let expected = format!(
        "Forwarding http://{}.localhost:{} -> your -R target",
        p0rt_name(&keys[0].key_hash()),
        with_plugins.http_port
    );
    session.wait_line(&expected, |l| l.trim() == expected).await;
}

/// A first choice already held by another key (a P0rt `domains.json` says so) gives P0rt's
/// first salted alternative, and the other key's record is left alone.
#[tokio::test(flavor = "multi_thread")]
async fn taken_first_choice_gets_p0rts_first_salted_alternative() {
    let sb = Sandbox::new();
    let key = sb.key("newcomer");
    let hash = key.key_hash();
    let first_choice = p0rt_name(&hash);
    let alternative = p0rt_salted_name(&hash, 0);
    assert_ne!(first_choice, alternative);
    let other = key_hash_of("someone else's key");

    for (plugins, dir) in [(true, "words-data"), (false, "builtin-data")] {
        let data_dir = sb.join(dir);
        seed_domains_json(&data_dir, &other, &first_choice);
        let mut host = start_host(&sb, &data_dir, plugins).await;
        let what = if plugins {
            "words plugin"
        } else {
            "built-in namer"
        };

        let name = host.info(&sb, &key).await.name;
        assert_eq!(name, alternative, "{what}: {first_choice} is taken");
        if plugins {
            assert_words_plugin_did_not_fail(&host);
        }
        let status = host.stop().await;
        assert!(status.success(), "p0rt exit {status}");
        let stored = domains_json(&data_dir);
        assert_eq!(stored[&hash]["domain"], alternative, "{what}: {stored}");
        assert_eq!(stored[&other]["domain"], first_choice, "{what}: {stored}");
    }
}
