//! P0rt's key list (`authorized_keys.json`, or `p0rt:keys:<fingerprint>` in Redis), written
//! by the test exactly as P0rt writes it: listed active keys connect with the real OpenSSH
//! client, unlisted keys are refused, inactive and expired ones are refused with the reason
//! in ssh's stderr, edits count without a restart, `P0RT_OPEN_ACCESS=true` lets any key in,
//! and a key's tier reaches the rate limiter.

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::json;

use crate::plugins::{bundled, install, plugins_dir, read};
use crate::redis_support::{RedisServer, require_redis};
use crate::support::{Host, HostConfig, Key, Sandbox, http_client};

/// One record of P0rt's `KeyAccess`.
pub(crate) struct Entry<'a> {
    pub(crate) key: &'a Key,
    /// Written as `public_key` (P0rt's `key add --key-file`) or left empty (`--key-fingerprint`).
    pub(crate) with_public_key: bool,
    pub(crate) comment: &'a str,
    pub(crate) tier: &'a str,
    /// RFC 3339, as Go's `time.Time` marshals.
    pub(crate) added_at: &'a str,
    pub(crate) expires_at: Option<&'a str>,
    pub(crate) active: bool,
}

impl<'a> Entry<'a> {
    pub(crate) fn active(key: &'a Key, tier: &'a str) -> Entry<'a> {
        Entry {
            key,
            with_public_key: true,
            comment: "",
            tier,
            added_at: "2025-06-21T14:03:12.345678901+02:00",
            expires_at: None,
            active: true,
        }
    }

    fn fields(&self) -> Vec<(&'static str, serde_json::Value)> {
        let mut fields = vec![
            ("fingerprint", json!(self.key.fingerprint())),
            (
                "public_key",
                json!(if self.with_public_key {
                    self.key.public.as_str()
                } else {
                    ""
                }),
            ),
            ("comment", json!(self.comment)),
            ("tier", json!(self.tier)),
            ("added_at", json!(self.added_at)),
        ];
        if let Some(expiry) = self.expires_at {
            fields.push(("expires_at", json!(expiry)));
        }
        fields.push(("active", json!(self.active)));
        fields
    }

    /// `json.Marshal` of the record (P0rt's Redis value): compact, fields in struct order.
    fn compact(&self) -> String {
        let fields: Vec<String> = self
            .fields()
            .into_iter()
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        format!("{{{}}}", fields.join(","))
    }
}

/// `authorized_keys.json` as P0rt's `saveKeys` writes it: `json.Encoder` with
/// `SetIndent("", "  ")` (fields in struct order, `expires_at` left out when nil, a newline
/// at the end).
pub(crate) fn p0rt_key_file(entries: &[Entry]) -> String {
    let records: Vec<String> = entries
        .iter()
        .map(|entry| {
            let fields: Vec<String> = entry
                .fields()
                .into_iter()
                .map(|(k, v)| format!("    \"{k}\": {v}"))
                .collect();
            format!("  {{\n{}\n  }}", fields.join(",\n"))
        })
        .collect();
    format!("[\n{}\n]\n", records.join(",\n"))
}

/// Writes the list the way P0rt's `saveKeysAtomic` does: a `.tmp` file, then rename.
pub(crate) fn save_like_p0rt(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Loopback never banned: the tests refuse keys on purpose, from one address.
pub(crate) fn no_bans(config: HostConfig) -> HostConfig {
    config.env("BAN_EXEMPT", "127.0.0.0/8")
}

/// Runs `ssh … info` with `key`: (success, stdout, stderr).
async fn try_info(host: &Host, sb: &Sandbox, key: &Key) -> (bool, String, String) {
    let out = host.ssh(sb, key).command("info").output().await;
    (out.status.success(), out.stdout, out.stderr)
}

pub(crate) async fn assert_refused(host: &Host, sb: &Sandbox, key: &Key, wanted: &str) -> String {
    let (ok, stdout, stderr) = try_info(host, sb, key).await;
    assert!(
        !ok && !stdout.contains("name:"),
        "{} got in: {stdout}",
        key.fingerprint()
    );
    assert!(
        stderr.contains(wanted),
        "ssh stderr lacks {wanted:?}: {stderr}; p0rt stderr:\n{}",
        host.log()
    );
    stderr
}

/// Waits (bounded by `within`) until `check` holds for `key`'s login; returns how long.
async fn until_login(
    host: &Host,
    sb: &Sandbox,
    key: &Key,
    within: Duration,
    what: &str,
    check: impl Fn(bool, &str) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let (ok, _, stderr) = try_info(host, sb, key).await;
        if check(ok, &stderr) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{what} not seen within {within:?}; last ssh stderr: {stderr}; p0rt stderr:\n{}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn p0rts_key_file_admits_refuses_with_reasons_and_follows_edits() {
    let sb = Sandbox::new();
    let (alice, stranger, bob, carol, dave) = (
        sb.key("alice"),
        sb.key("stranger"),
        sb.key("bob"),
        sb.key("carol"),
        sb.key("dave"),
    );
    let inactive = Entry {
        with_public_key: false,
        comment: "Bob",
        active: false,
        ..Entry::active(&bob, "free")
    };
    let expired = Entry {
        comment: "Carol",
        added_at: "2024-01-01T00:00:00Z",
        expires_at: Some("2025-01-01T00:00:00Z"),
        ..Entry::active(&carol, "beta")
    };
    // P0rt's default location: `authorized_keys.json` in the working directory, picked up
    // without any setting (and then access is restricted, as in P0rt).
    let file = sb.join("authorized_keys.json");
    save_like_p0rt(
        &file,
        &p0rt_key_file(&[
            Entry {
                comment: "Alice",
                expires_at: Some("2099-01-01T00:00:00Z"),
                ..Entry::active(&alice, "premium")
            },
            inactive,
            expired,
        ]),
    );
    // Refused logins would soon ban the test's address; bans are not what is tested here.
    let host = Host::start_with(&sb, no_bans(HostConfig::flags(&sb.data_dir()))).await;
    assert!(
        host.log()
            .contains("access: only keys in the key list authorized_keys.json"),
        "{}",
        host.log()
    );

    let info = host.info(&sb, &alice).await;
    assert_eq!(info.key, alice.fingerprint());
    assert_refused(&host, &sb, &stranger, "Permission denied").await;
    let why = assert_refused(&host, &sb, &bob, "is deactivated on this host").await;
    assert!(why.contains(&bob.fingerprint()), "{why}");
    assert_refused(
        &host,
        &sb,
        &carol,
        &format!(
            "key {} expired at 2025-01-01T00:00:00Z",
            carol.fingerprint()
        ),
    )
    .await;
    // Refused keys got no name.
    let stats = host.get_base("/domain-stats").await;
    let stats: serde_json::Value = serde_json::from_str(&stats.text().await.unwrap()).unwrap();
    assert_eq!(stats["total_domains"], 1, "{stats}");

    // P0rt deactivates Alice and adds Dave (temp file + rename): both count at the next
    // login, without a restart.
    save_like_p0rt(
        &file,
        &p0rt_key_file(&[
            Entry {
                active: false,
                ..Entry::active(&alice, "premium")
            },
            Entry {
                with_public_key: false,
                ..Entry::active(&dave, "free")
            },
        ]),
    );
    let took = until_login(
        &host,
        &sb,
        &alice,
        Duration::from_secs(5),
        "alice deactivated",
        |ok, stderr| !ok && stderr.contains("is deactivated on this host"),
    )
    .await;
    assert!(took < Duration::from_secs(5), "{took:?}");
    let dave_info = host.info(&sb, &dave).await;
    assert_eq!(dave_info.key, dave.fingerprint());

    // Written in place (P0rt's fallback `saveKeysDirect`): reactivated again.
    std::fs::write(&file, p0rt_key_file(&[Entry::active(&alice, "premium")])).unwrap();
    until_login(
        &host,
        &sb,
        &alice,
        Duration::from_secs(5),
        "alice reactivated",
        |ok, _| ok,
    )
    .await;
    assert_eq!(host.info(&sb, &alice).await.name, info.name);
    assert_refused(&host, &sb, &dave, "Permission denied").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn p0rt_open_access_lets_any_key_in() {
    let sb = Sandbox::new();
    let (listed, stranger, inactive) = (sb.key("listed"), sb.key("stranger"), sb.key("inactive"));
    let file = sb.join("keys").join("allow.json");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    save_like_p0rt(
        &file,
        &p0rt_key_file(&[
            Entry::active(&listed, "premium"),
            Entry {
                active: false,
                ..Entry::active(&inactive, "free")
            },
        ]),
    );
    // P0rt's .env: a key list path and open access.
    let config = HostConfig::flags(&sb.data_dir())
        .env("P0RT_AUTHORIZED_KEYS", file.to_string_lossy())
        .env("P0RT_OPEN_ACCESS", "true");
    let host = Host::start_with(&sb, config).await;
    assert!(
        host.log().contains("access: open, any key may connect"),
        "{}",
        host.log()
    );
    for key in [&listed, &stranger, &inactive] {
        assert_eq!(host.info(&sb, key).await.key, key.fingerprint());
    }

    // The same list with P0RT_OPEN_ACCESS=false: only the listed key.
    let config = no_bans(HostConfig::flags(&sb.join("data2")))
        .env("P0RT_AUTHORIZED_KEYS", file.to_string_lossy())
        .env("P0RT_OPEN_ACCESS", "false");
    let host = Host::start_with(&sb, config).await;
    host.info(&sb, &listed).await;
    assert_refused(&host, &sb, &stranger, "Permission denied").await;
    assert_refused(&host, &sb, &inactive, "is deactivated on this host").await;
}

/// Requests admitted (2xx) out of `count` sent one after the other to `name`.
async fn admitted(host: &Host, name: &str, count: usize) -> usize {
    let client = http_client();
    let mut ok = 0;
    for _ in 0..count {
        let res = client
            .get(host.url("/whoami"))
            .header(reqwest::header::HOST, host.host_header(name))
            .send()
            .await
            .expect("request through the edge");
        if res.status().is_success() {
            ok += 1;
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread")]
async fn a_premium_keys_tunnel_gets_its_tiers_rate_limit() {
    const DEFAULT_LIMIT: usize = 5;
    const PREMIUM_LIMIT: usize = 15;
    const SENT: usize = 12;
    let sb = Sandbox::new();
    let (premium, free, unlisted_tier) = (sb.key("premium"), sb.key("free"), sb.key("plain"));
    save_like_p0rt(
        &sb.join("authorized_keys.json"),
        &p0rt_key_file(&[
            Entry::active(&premium, "premium"),
            Entry::active(&free, "free"),
            Entry::active(&unlisted_tier, ""),
        ]),
    );
    // Per tunnel: 5 requests an hour by default, 15 for the premium tier.
    let window = 3600;
    let dir = plugins_dir(&sb);
    install(
        &dir,
        "ratelimit",
        &read(&bundled("ratelimit.wasm")),
        Some(json!({ "config": {
            "per_ip": { "limit": 0, "window_seconds": window },
            "per_tunnel": { "limit": DEFAULT_LIMIT, "window_seconds": window },
            "per_key": { "limit": 0, "window_seconds": window },
            "tiers": {
                "premium": { "per_tunnel": { "limit": PREMIUM_LIMIT, "window_seconds": window } }
            }
        }})),
    );
    let config = HostConfig::flags(&sb.data_dir())
        .arg("--plugins-dir")
        .arg(dir.to_string_lossy());
    let host = Host::start_with(&sb, config).await;
    let backends = (
        crate::backend::Backend::start("premium").await,
        crate::backend::Backend::start("free").await,
        crate::backend::Backend::start("plain").await,
    );
    let (_a, premium_name) = host.tunnel(&sb, &premium, &backends.0).await;
    let (_b, free_name) = host.tunnel(&sb, &free, &backends.1).await;
    let (_c, plain_name) = host.tunnel(&sb, &unlisted_tier, &backends.2).await;

    // `tunnel` already sent one request to each while waiting for it to serve.
    for attempt in 0.. {
        let index = p0rt::unix_now().div_euclid(window);
        let counts = (
            admitted(&host, &premium_name, SENT).await,
            admitted(&host, &free_name, SENT).await,
            admitted(&host, &plain_name, SENT).await,
        );
        if p0rt::unix_now().div_euclid(window) != index && attempt == 0 {
            continue; // the hour turned during the burst: counters started over
        }
        assert!(
            counts.0 == SENT,
            "premium tunnel admitted {} of {SENT}; p0rt stderr:\n{}",
            counts.0,
            host.log()
        );
        for (name, count) in [("free", counts.1), ("tierless", counts.2)] {
            assert!(
                (1..=DEFAULT_LIMIT).contains(&count),
                "{name} tunnel admitted {count} of {SENT}, over the default limit"
            );
        }
        break;
    }
}

/// A host on Redis with P0rt's key records: the same rules, lookups per login with a short
/// cache, and a Redis outage keeps recently allowed keys in while unknown keys stay out.
#[tokio::test(flavor = "multi_thread")]
async fn p0rts_key_records_in_redis() {
    require_redis();
    let mut redis = RedisServer::start().await;
    let sb = Sandbox::new();
    let (alice, stranger, bob, carol) = (
        sb.key("alice"),
        sb.key("stranger"),
        sb.key("bob"),
        sb.key("carol"),
    );
    let mut client = redis.client().await;
    let record = |key: &Key| format!("p0rt:keys:{}", key.fingerprint());
    // As P0rt's `saveKeyToRedis`: a key with a future expiry gets a TTL ending then; one
    // whose expiry has passed is stored without a TTL.
    let _: () = redis::cmd("SET")
        .arg(record(&alice))
        .arg(
            Entry {
                expires_at: Some("2099-01-01T00:00:00Z"),
                ..Entry::active(&alice, "premium")
            }
            .compact(),
        )
        .arg("EX")
        .arg(3600)
        .query_async(&mut client)
        .await
        .unwrap();
    let inactive = Entry {
        active: false,
        with_public_key: false,
        ..Entry::active(&bob, "free")
    };
    let _: () = client.set(record(&bob), inactive.compact()).await.unwrap();
    let expired = Entry {
        expires_at: Some("2025-01-01T00:00:00Z"),
        ..Entry::active(&carol, "beta")
    };
    let _: () = client.set(record(&carol), expired.compact()).await.unwrap();

    let config = no_bans(HostConfig::flags(&sb.data_dir()))
        .env("STORAGE_TYPE", "redis")
        .env("REDIS_URL", redis.url());
    let host = Host::start_with(&sb, config).await;
    assert!(
        host.log()
            .contains("access: only keys in the key list in Redis (p0rt:keys:<fingerprint>)"),
        "{}",
        host.log()
    );
    host.info(&sb, &alice).await;
    assert_refused(&host, &sb, &stranger, "Permission denied").await;
    assert_refused(&host, &sb, &bob, "is deactivated on this host").await;
    assert_refused(&host, &sb, &carol, "expired at 2025-01-01T00:00:00Z").await;

    // Edits in Redis count within the short cache (5 s), without a restart.
    let _: () = client
        .set(
            record(&alice),
            Entry {
                active: false,
                ..Entry::active(&alice, "premium")
            }
            .compact(),
        )
        .await
        .unwrap();
    let _: () = client
        .set(
            record(&stranger),
            Entry::active(&stranger, "free").compact(),
        )
        .await
        .unwrap();
    until_login(
        &host,
        &sb,
        &alice,
        Duration::from_secs(10),
        "alice deactivated in Redis",
        |ok, stderr| !ok && stderr.contains("is deactivated"),
    )
    .await;
    until_login(
        &host,
        &sb,
        &stranger,
        Duration::from_secs(10),
        "stranger added in Redis",
        |ok, _| ok,
    )
    .await;

    // Redis goes away: the key allowed a moment ago still authenticates (whatever `info`
    // then makes of the store), a key Redis never answered for is refused.
    let dave = sb.key("dave");
    redis.kill9();
    let out = host.ssh(&sb, &stranger).command("info").output().await;
    assert!(
        !out.stderr.contains("Permission denied"),
        "a recently allowed key was refused while Redis was down: {}",
        out.stderr
    );
    assert_refused(&host, &sb, &dave, "Permission denied").await;
    assert!(
        host.log().contains("key list: cannot ask Redis"),
        "{}",
        host.log()
    );
}
