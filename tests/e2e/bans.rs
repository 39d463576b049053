//! Failed-authentication bans through the real binary and OpenSSH: wrong keys from one
//! address get it banned (and only it), the ban ends on time, escalates, holds across a
//! restart, and `p0rt security bans` / `unban` show and lift it.

use std::time::{Duration, Instant};

use crate::support::*;

/// `ssh … info` with `key` from `source`; its output.
async fn info_from(host: &Host, sb: &Sandbox, key: &Key, source: &str) -> SshOutput {
    host.ssh(sb, key)
        .args(["-b", source])
        .command("info")
        .output()
        .await
}

/// Waits until `key` from `source` gets in again: the running host picked up an unban.
async fn gets_in_after_the_unban(host: &Host, sb: &Sandbox, key: &Key, source: &str) {
    eventually(
        Duration::from_secs(10),
        "the unban to take effect",
        || async {
            info_from(host, sb, key, source)
                .await
                .status
                .success()
                .then_some(())
        },
    )
    .await;
}

/// `p0rt security <args…>` on the host's JSON store; (exit code, stdout + stderr).
async fn security(host: &Host, args: &[&str]) -> (Option<i32>, String) {
    let (code, stdout, stderr) = p0rt_security(host.data_dir(), &[], args).await;
    (code, format!("{stdout}{stderr}"))
}

#[tokio::test]
async fn wrong_keys_ban_only_their_address_and_the_ban_ends_on_time() {
    require_tools();
    let sb = Sandbox::new();
    let good = sb.key("good");
    let bad = sb.key("bad");
    let allowed = sb.join("authorized_keys");
    std::fs::write(&allowed, format!("{}\n", good.public)).unwrap();
    let config = HostConfig::flags(&sb.data_dir())
        .arg("--authorized-keys")
        .arg(allowed.to_string_lossy())
        .env("BAN_TIERS", "3:5s,4:1h");
    let mut host = Host::start_with(&sb, config).await;

    // Three connections with a key the host does not accept: refused, then banned.
    for attempt in 1..=3 {
        let out = info_from(&host, &sb, &bad, "127.0.0.5").await;
        assert!(
            !out.status.success(),
            "attempt {attempt}: an unlisted key got in"
        );
    }
    let banned_at = Instant::now();
    let refused = info_from(&host, &sb, &good, "127.0.0.5").await;
    assert!(
        !refused.status.success(),
        "a banned address authenticated: {}",
        refused.stdout
    );
    assert!(
        !refused.stdout.contains("name:"),
        "a banned address was served: {}",
        refused.stdout
    );
    // Another address with the right key is unaffected.
    let other = info_from(&host, &sb, &good, "127.0.0.6").await;
    assert!(other.status.success(), "{}", other.stderr);
    assert!(host.log().contains("banned 127.0.0.5"), "{}", host.log());

    let (code, listed) = security(&host, &["bans"]).await;
    assert_eq!(code, Some(0), "{listed}");
    assert!(
        listed.contains("127.0.0.5") && !listed.contains("127.0.0.6"),
        "{listed}"
    );

    // The 5 s ban ends on time.
    let waited = eventually(Duration::from_secs(15), "the ban to end", || async {
        let out = info_from(&host, &sb, &good, "127.0.0.5").await;
        out.status.success().then(|| banned_at.elapsed())
    })
    .await;
    assert!(
        waited >= Duration::from_secs(4),
        "the ban ended after {waited:?}"
    );

    // One more failure reaches the next tier (1 h), which holds across a restart...
    assert!(
        !info_from(&host, &sb, &bad, "127.0.0.5")
            .await
            .status
            .success()
    );
    host.restart().await;
    assert!(
        !info_from(&host, &sb, &good, "127.0.0.5")
            .await
            .status
            .success()
    );
    let (_, listed) = security(&host, &["bans", "--json"]).await;
    let bans: serde_json::Value = serde_json::from_str(&listed).expect("bans as JSON");
    let ban = &bans["addresses"][0];
    assert_eq!(ban["ip"], "127.0.0.5", "{listed}");
    assert_eq!(ban["failures"], 4, "{listed}");
    let length = ban["until"].as_i64().unwrap() - ban["since"].as_i64().unwrap();
    assert_eq!(length, 3600, "{listed}");

    // ...until the operator lifts it; the running host picks that up.
    let (code, text) = security(&host, &["unban", "127.0.0.5"]).await;
    assert_eq!(code, Some(0), "{text}");
    gets_in_after_the_unban(&host, &sb, &good, "127.0.0.5").await;
    let (code, text) = security(&host, &["unban", "127.0.0.5"]).await;
    assert_eq!(code, Some(1), "unbanning twice: {text}");
}

#[tokio::test]
async fn a_client_that_tries_several_keys_before_the_right_one_is_never_counted() {
    require_tools();
    let sb = Sandbox::new();
    let good = sb.key("good2");
    let extra = [sb.key("extra1"), sb.key("extra2"), sb.key("extra3")];
    let allowed = sb.join("authorized_keys");
    std::fs::write(&allowed, format!("{}\n", good.public)).unwrap();
    let config = HostConfig::flags(&sb.data_dir())
        .arg("--authorized-keys")
        .arg(allowed.to_string_lossy());
    let host = Host::start_with(&sb, config).await;
    // OpenSSH offers the -i keys in order: three unlisted ones, then the listed one.
    for round in 0..4 {
        let mut ssh = host.ssh(&sb, &extra[0]).args(["-b", "127.0.0.8"]);
        for key in extra.iter().skip(1).chain([&good]) {
            ssh = ssh.args(["-i", &key.path.to_string_lossy()]);
        }
        let out = ssh.command("info").output().await;
        assert!(out.status.success(), "round {round}: {}", out.stderr);
    }
    let (_, listed) = security(&host, &["bans"]).await;
    assert!(!listed.contains("127.0.0.8"), "{listed}");
}

/// With the JSON store, a Redis URL and `ENABLE_REDIS=false`, the host keeps its bans in
/// `bans.json`; `p0rt security` with the same settings must list and lift those, not look in
/// the Redis the host never uses.
#[tokio::test]
async fn security_commands_use_the_bans_the_host_uses_when_redis_is_disabled() {
    require_tools();
    crate::redis_support::require_redis();
    let redis = crate::redis_support::RedisServer::start().await;
    let sb = Sandbox::new();
    let good = sb.key("good3");
    let bad = sb.key("bad3");
    let allowed = sb.join("authorized_keys");
    std::fs::write(&allowed, format!("{}\n", good.public)).unwrap();
    let env = [
        ("STORAGE_TYPE", "json".to_string()),
        ("REDIS_URL", redis.url()),
        ("ENABLE_REDIS", "false".to_string()),
    ];
    let mut config = HostConfig::flags(&sb.data_dir())
        .arg("--authorized-keys")
        .arg(allowed.to_string_lossy())
        .env("BAN_TIERS", "2:1h");
    for (var, value) in &env {
        config = config.env(var, value.clone());
    }
    let host = Host::start_with(&sb, config).await;
    for _ in 0..2 {
        assert!(
            !info_from(&host, &sb, &bad, "127.0.0.9")
                .await
                .status
                .success()
        );
    }
    // The failure is counted when the refused connection ends.
    eventually(
        Duration::from_secs(10),
        "the address to be banned",
        || async { host.log().contains("banned 127.0.0.9").then_some(()) },
    )
    .await;
    assert!(
        sb.data_dir().join("bans.json").exists(),
        "the host did not keep its bans in the data directory"
    );

    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, stdout, stderr) = p0rt_security(host.data_dir(), &env, &["bans"]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("127.0.0.9"),
        "the host's ban is not listed: {stdout}{stderr}"
    );
    let (code, stdout, stderr) =
        p0rt_security(host.data_dir(), &env, &["unban", "127.0.0.9"]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    gets_in_after_the_unban(&host, &sb, &good, "127.0.0.9").await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut redis.client().await)
        .await
        .unwrap();
    assert!(
        keys.is_empty(),
        "something wrote to the disabled Redis: {keys:?}"
    );
}
