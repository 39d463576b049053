//! The Redis domain store and cache, against real `redis-server` processes started by the
//! harness: the seed's key layout byte for byte, URL forms and credentials, concurrent claims
//! from two hosts, poisoned data, Redis dying under traffic, Sentinel failover, Cluster,
//! and migration both ways.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::AsyncCommands;

use crate::backend::Backend;
use crate::redis_support::{RedisCluster, RedisServer, SentinelGroup, require_redis};
use crate::support::{BIN, Host, HostConfig, Sandbox, require_tools, run_host_to_exit};

/// A host on `url` with Redis as the store.
fn redis_host(sandbox: &Sandbox, url: &str) -> HostConfig {
    HostConfig::flags(&sandbox.data_dir())
        .env("STORAGE_TYPE", "redis")
        .env("REDIS_URL", url)
}

/// A plugins directory holding the bundled rate limiter with limits tests never reach.
fn generous_plugins(sandbox: &Sandbox) -> std::path::PathBuf {
    let dir = sandbox.join("plugins");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        concat!(env!("P0RT_BUNDLED_PLUGINS"), "/ratelimit.wasm"),
        dir.join("ratelimit.wasm"),
    )
    .unwrap();
    std::fs::write(
        dir.join("ratelimit.json"),
        r#"{"config":{"per_ip":{"limit":1000000,"window_seconds":60},"per_tunnel":{"limit":1000000,"window_seconds":60},"per_key":{"limit":1000000,"window_seconds":60}}}"#,
    )
    .unwrap();
    dir
}

async fn health(host: &Host) -> (u16, serde_json::Value) {
    let res = host.get_base("/health/redis").await;
    let status = res.status().as_u16();
    let body: serde_json::Value =
        serde_json::from_str(&res.text().await.unwrap()).expect("/health/redis is JSON");
    (status, body)
}

async fn wait_health(host: &Host, want: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let (_, body) = health(host).await;
        if body["status"] == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "/health/redis not {want} within {within:?}: last {body}; p0rt stderr:\n{}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_layout_byte_for_byte() {
    require_tools();
    require_redis();
    let redis = RedisServer::start().await;
    let sandbox = Sandbox::new();
    let key = sandbox.key("alice");
    let mut host = Host::start_with(&sandbox, redis_host(&sandbox, &redis.url())).await;
    let name = host.info(&sandbox, &key).await.name;
    let hash = key.key_hash();

    let mut client = redis.client().await;
    let record: HashMap<String, String> =
        client.hgetall(format!("p0rt:domain:{hash}")).await.unwrap();
    let mut fields: Vec<&str> = record.keys().map(String::as_str).collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "domain",
            "first_seen",
            "last_seen",
            "ssh_key_hash",
            "use_count"
        ]
    );
    assert_eq!(record["domain"], name);
    assert_eq!(record["ssh_key_hash"], hash);
    let first_seen: i64 = record["first_seen"]
        .parse()
        .expect("first_seen is unix seconds");
    assert!(
        (first_seen - p0rt::unix_now()).abs() < 120,
        "first_seen {first_seen}"
    );
    assert_eq!(record["use_count"], "1");
    let owner: String = client
        .get(format!("p0rt:domain:reverse:{name}"))
        .await
        .unwrap();
    assert_eq!(owner, hash);
    let ttl: i64 = client.ttl(format!("p0rt:domain:{hash}")).await.unwrap();
    assert!(
        ttl > 364 * 86_400 && ttl <= 365 * 86_400,
        "record TTL {ttl}"
    );
    let all: Vec<String> = client.keys("*").await.unwrap();
    assert!(
        all.iter().all(|k| k.starts_with("p0rt:")),
        "every key under the prefix: {all:?}"
    );

    // Same key, same name: after a reconnect and after a host restart; the count goes up.
    assert_eq!(host.info(&sandbox, &key).await.name, name);
    host.restart().await;
    assert_eq!(host.info(&sandbox, &key).await.name, name);
    let count: String = client
        .hget(format!("p0rt:domain:{hash}"), "use_count")
        .await
        .unwrap();
    assert_eq!(count, "3");

    let stats: serde_json::Value =
        serde_json::from_str(&host.get_base("/domain-stats").await.text().await.unwrap()).unwrap();
    assert_eq!(stats["storage_type"], "redis");
    assert_eq!(stats["total_domains"], 1);
    assert_eq!(stats["active_last_24h"], 1);
    let (status, body) = health(&host).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("healthy")),
        "{body}"
    );
    assert!(body["latency_ms"].is_number() && body["message"] == "Redis connection is healthy");
}

#[tokio::test(flavor = "multi_thread")]
async fn password_database_and_prefix_settings() {
    require_tools();
    require_redis();
    let redis = RedisServer::start_with_password("correct-horse-battery").await;
    let sandbox = Sandbox::new();
    let key = sandbox.key("bob");

    // Wrong password: exit 2, a message naming the problem, never the password.
    let config = redis_host(&sandbox, &redis.url()).env("REDIS_PASSWORD", "wrong-password-123");
    let (code, stderr) = run_host_to_exit(&sandbox, &config, Duration::from_secs(20)).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("refused the credentials"), "{stderr}");
    assert!(
        !stderr.contains("wrong-password-123") && !stderr.contains("correct-horse"),
        "{stderr}"
    );

    // Password in the URL, database 3, custom prefix.
    let url = format!(
        "redis://:correct-horse-battery@127.0.0.1:{}/3",
        redis.port()
    );
    let config = redis_host(&sandbox, &url).env("REDIS_PREFIX", "tunnels:");
    let host = Host::start_with(&sandbox, config).await;
    assert!(
        !host.log().contains("correct-horse"),
        "password in the log:\n{}",
        host.log()
    );
    let name = host.info(&sandbox, &key).await.name;
    let mut client = redis.client().await;
    let _: () = redis::cmd("SELECT")
        .arg(3)
        .query_async(&mut client)
        .await
        .unwrap();
    let owner: Option<String> = client
        .get(format!("tunnels:domain:reverse:{name}"))
        .await
        .unwrap();
    assert_eq!(owner, Some(key.key_hash()));
    let _: () = redis::cmd("SELECT")
        .arg(0)
        .query_async(&mut client)
        .await
        .unwrap();
    let in_db0: Vec<String> = client.keys("*").await.unwrap();
    assert!(in_db0.is_empty(), "database 0 untouched: {in_db0:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_redis_urls_exit_2_naming_the_problem() {
    require_tools();
    let sandbox = Sandbox::new();
    for (url, needle) in [
        ("http://:pw-abc@127.0.0.1:6379", "unknown scheme"),
        (
            "redis-sentinel://:pw-abc@127.0.0.1:26379",
            "name the master",
        ),
        (
            "redis://:pw-abc@127.0.0.1:1,127.0.0.1:2/5",
            "only database 0",
        ),
    ] {
        let config = redis_host(&sandbox, url);
        let (code, stderr) = run_host_to_exit(&sandbox, &config, Duration::from_secs(20)).await;
        assert_eq!(code, Some(2), "{url}: {stderr}");
        assert!(
            stderr.contains("REDIS_URL") && stderr.contains(needle),
            "{url}: {stderr}"
        );
        assert!(
            !stderr.contains("pw-abc"),
            "{url}: password leaked: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hosts_claiming_one_name_never_share_it() {
    require_tools();
    require_redis();
    let redis = RedisServer::start().await;
    let sandbox_a = Sandbox::new();
    let sandbox_b = Sandbox::new();
    // Both hosts' naming plugin proposes the same name for every key.
    let mut hosts = Vec::new();
    for sandbox in [&sandbox_a, &sandbox_b] {
        let dir = sandbox.join("plugins");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            crate::plugins::fixture("fixture_hostile.wasm"),
            dir.join("contested.wasm"),
        )
        .unwrap();
        std::fs::write(
            dir.join("contested.json"),
            r#"{"role":"naming","config":{"mode":"name:contested"}}"#,
        )
        .unwrap();
        let config = redis_host(sandbox, &redis.url())
            .arg("--plugins-dir")
            .arg(dir.to_string_lossy());
        hosts.push(Host::start_with(sandbox, config).await);
    }
    for round in 0..3 {
        let key_a = sandbox_a.key(&format!("a{round}"));
        let key_b = sandbox_b.key(&format!("b{round}"));
        let (a, b) = tokio::join!(
            hosts[0].info(&sandbox_a, &key_a),
            hosts[1].info(&sandbox_b, &key_b)
        );
        assert_ne!(a.name, b.name, "round {round}: two keys got one name");
        let mut client = redis.client().await;
        for (key, info) in [(&key_a, &a), (&key_b, &b)] {
            let owner: String = client
                .get(format!("p0rt:domain:reverse:{}", info.name))
                .await
                .unwrap();
            assert_eq!(
                owner,
                key.key_hash(),
                "round {round}: {} owned by the wrong key",
                info.name
            );
        }
        // Clear the contested name so the next round races for it again.
        let _: () = client.del("p0rt:domain:reverse:contested").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn poisoned_keys_are_treated_as_missing_and_logged() {
    require_tools();
    require_redis();
    let redis = RedisServer::start().await;
    let sandbox = Sandbox::new();
    let host = Host::start_with(&sandbox, redis_host(&sandbox, &redis.url())).await;
    let mut client = redis.client().await;

    // A string where a key's record hash belongs: the key is refused, the string kept.
    let carol = sandbox.key("carol");
    let record_key = format!("p0rt:domain:{}", carol.key_hash());
    let _: () = client.set(&record_key, "not a hash").await.unwrap();
    let out = host.ssh(&sandbox, &carol).command("info").output().await;
    assert!(
        !out.status.success() && out.stdout.contains(&record_key),
        "{}",
        out.stdout
    );
    let kept: String = client.get(&record_key).await.unwrap();
    assert_eq!(kept, "not a hash");
    assert!(
        host.log().contains(&record_key),
        "poisoned key not logged:\n{}",
        host.log()
    );

    // A hash where the reverse key of dave's first-choice name belongs: that name is skipped.
    let dave = sandbox.key("dave");
    let first_choice =
        p0rt::names::builtin_name(&p0rt::names::KeyHash::from_stored(dave.key_hash()), 0)
            .to_string();
    let reverse = format!("p0rt:domain:reverse:{first_choice}");
    let _: () = client.hset(&reverse, "oops", "1").await.unwrap();
    let dave_name = host.info(&sandbox, &dave).await.name;
    assert_ne!(dave_name, first_choice);
    let still: HashMap<String, String> = client.hgetall(&reverse).await.unwrap();
    assert_eq!(
        still.get("oops").map(String::as_str),
        Some("1"),
        "foreign data left untouched"
    );

    // Malformed fields in a record: treated as missing, never a panic; the host keeps serving.
    let erin = sandbox.key("erin");
    let _: () = client
        .hset_multiple(
            format!("p0rt:domain:{}", erin.key_hash()),
            &[("domain", "erin-name"), ("first_seen", "yesterday")],
        )
        .await
        .unwrap();
    let out = host.ssh(&sandbox, &erin).command("info").output().await;
    assert!(host.log().contains("malformed"), "{}", host.log());
    assert!(out.status.code().is_some(), "ssh ended normally");
    assert_eq!(host.get_base("/health").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_killed_under_traffic_loses_no_request() {
    require_tools();
    require_redis();
    let mut redis = RedisServer::start().await;
    let sandbox = Sandbox::new();
    let plugins = generous_plugins(&sandbox);
    let config = redis_host(&sandbox, &redis.url())
        .arg("--plugins-dir")
        .arg(plugins.to_string_lossy());
    let host = Host::start_with(&sandbox, config).await;
    let backend = Backend::start("steady").await;
    let (_tunnel, name) = host.tunnel(&sandbox, &sandbox.key("frank"), &backend).await;
    wait_health(&host, "healthy", Duration::from_secs(5)).await;

    // ~100 requests/s for the whole outage; every one must succeed.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = host.url("/whoami");
    let header = host.host_header(&name);
    let traffic = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(12) {
            tick.tick().await;
            let status = client
                .get(&url)
                .header("host", &header)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .map(|r| r.status().as_u16());
            outcomes.push(status.map_err(|e| e.to_string()));
        }
        outcomes
    });

    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.kill9();
    let down_after = wait_health(&host, "unhealthy", Duration::from_secs(2)).await;
    let (status, body) = health(&host).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["message"], "Redis connection failed");
    assert!(body["error"].is_string(), "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart().await;
    let up_after = wait_health(&host, "healthy", Duration::from_secs(5)).await;

    let outcomes = traffic.await.unwrap();
    let failed: Vec<_> = outcomes.iter().filter(|o| !matches!(o, Ok(200))).collect();
    assert!(
        outcomes.len() > 500,
        "only {} requests sent",
        outcomes.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(5)]
    );
    eprintln!(
        "unhealthy after {down_after:?}, healthy {up_after:?} after restart, {} requests",
        outcomes.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn known_keys_keep_names_while_redis_is_down_new_keys_wait() {
    require_tools();
    require_redis();
    let mut redis = RedisServer::start().await;
    let sandbox = Sandbox::new();
    let host = Host::start_with(&sandbox, redis_host(&sandbox, &redis.url())).await;
    let known = sandbox.key("known");
    let name = host.info(&sandbox, &known).await.name;

    redis.kill9();
    assert_eq!(
        host.info(&sandbox, &known).await.name,
        name,
        "seen key keeps its name"
    );
    let newcomer = sandbox.key("newcomer");
    let out = host.ssh(&sandbox, &newcomer).command("info").output().await;
    assert!(
        !out.status.success(),
        "a new key must be refused while Redis is down: {}",
        out.stdout
    );
    assert!(
        out.stdout.contains("no name can be given right now"),
        "{}",
        out.stdout
    );

    redis.restart().await;
    let started = Instant::now();
    loop {
        let out = host.ssh(&sandbox, &newcomer).command("info").output().await;
        if out.status.success() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "new key still refused after Redis returned: {}",
            out.stdout
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sentinel_failover_is_followed() {
    require_tools();
    require_redis();
    let mut group = SentinelGroup::start("p0rtmaster").await;
    let sandbox = Sandbox::new();
    let host = Host::start_with(&sandbox, redis_host(&sandbox, &group.url())).await;
    let before = sandbox.key("before");
    let name = host.info(&sandbox, &before).await.name;

    let old_master = group.kill_master().await;
    let new_master = group.wait_failover(Duration::from_secs(30)).await;
    assert_ne!(old_master, new_master);

    // A brand-new key needs the (new) master; the host must find it by itself.
    let after = sandbox.key("after");
    let started = Instant::now();
    let after_name = loop {
        let out = host.ssh(&sandbox, &after).command("info").output().await;
        if out.status.success() {
            break crate::support::Info::parse(&out.stdout).name;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no name after failover: {}\n{}",
            out.stdout,
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_ne!(after_name, name);
    let mut master = group.client_to_master().await;
    let owner: Option<String> = master
        .get(format!("p0rt:domain:reverse:{after_name}"))
        .await
        .unwrap();
    assert_eq!(owner, Some(after.key_hash()), "written to the new master");
    let replicated: Option<String> = master
        .get(format!("p0rt:domain:reverse:{name}"))
        .await
        .unwrap();
    assert_eq!(
        replicated,
        Some(before.key_hash()),
        "the earlier name survived the failover"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_store_claims_and_counts_across_nodes() {
    require_tools();
    require_redis();
    let cluster = RedisCluster::start().await;
    let sandbox = Sandbox::new();
    let host = Host::start_with(&sandbox, redis_host(&sandbox, &cluster.url())).await;
    let mut names = Vec::new();
    for who in ["c1", "c2", "c3", "c4", "c5"] {
        let key = sandbox.key(who);
        let name = host.info(&sandbox, &key).await.name;
        let record = cluster
            .hgetall(&format!("p0rt:domain:{}", key.key_hash()))
            .await;
        assert_eq!(record.get("domain"), Some(&name));
        assert_eq!(
            cluster.get(&format!("p0rt:domain:reverse:{name}")).await,
            Some(key.key_hash())
        );
        names.push(name);
    }
    let stats: serde_json::Value =
        serde_json::from_str(&host.get_base("/domain-stats").await.text().await.unwrap()).unwrap();
    assert_eq!(stats["total_domains"], 5, "{stats}");
    let (status, body) = health(&host).await;
    assert_eq!(status, 200, "{body}");
}

fn p0rt_file(records: &[(&str, &str)]) -> String {
    let entries: Vec<String> = records
        .iter()
        .map(|(hash, domain)| {
            format!(
                r#""{hash}": {{"domain": "{domain}", "ssh_key_hash": "{hash}", "first_seen": "2022-01-01T00:00:00Z", "last_seen": "2022-01-02T00:00:00Z", "use_count": 42}}"#
            )
        })
        .collect();
    format!("{{{}}}", entries.join(",\n"))
}

async fn migrate(
    sandbox: &Sandbox,
    to: &str,
    data_dir: &std::path::Path,
    url: &str,
) -> (Option<i32>, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(BIN)
            .args([
                "migrate",
                "--to",
                to,
                "--data-dir",
                &data_dir.to_string_lossy(),
                "--redis-url",
                url,
            ])
            .current_dir(sandbox.path())
            .env("NO_COLOR", "1")
            .output(),
    )
    .await
    .expect("migrate finishes")
    .expect("run migrate");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn migration_both_ways_with_counts() {
    require_tools();
    require_redis();
    let redis = RedisServer::start().await;
    let sandbox = Sandbox::new();
    let source = sandbox.join("from-p0rt");
    std::fs::create_dir_all(&source).unwrap();
    let records = [
        ("aa11", "whale-guitar-fox"),
        ("bb22", "otter-piano-lake"),
        ("cc33", "maple-drum-comet"),
    ];
    std::fs::write(source.join("domains.json"), p0rt_file(&records)).unwrap();
    // P0rt's reservations file comes across too, times and comment unchanged.
    let fingerprint = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";
    std::fs::write(
        source.join("reservations.json"),
        format!(
            r#"[
  {{
    "domain": "kept-for-alice",
    "fingerprint": "{fingerprint}",
    "created_at": "2025-01-15T10:30:00.123456789+01:00",
    "updated_at": "2025-01-15T10:30:00.123456789+01:00",
    "comment": "Alice's demo"
  }}
]"#
        ),
    )
    .unwrap();

    let (code, out) = migrate(&sandbox, "redis", &source, &redis.url()).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("3 records read: 3 imported, 0 already present, 0 conflicts"),
        "{out}"
    );
    assert!(
        out.contains("1 reservations read: 1 imported, 0 already present, 0 conflicts"),
        "{out}"
    );
    let (code, out) = migrate(&sandbox, "redis", &source, &redis.url()).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("3 records read: 0 imported, 3 already present, 0 conflicts")
            && out.contains("1 reservations read: 0 imported, 1 already present, 0 conflicts"),
        "idempotent: {out}"
    );
    {
        // P0rt's own reservation keys (no prefix with the default prefix).
        let mut client = redis.client().await;
        let holder: String = client
            .get("reservation:domain:kept-for-alice")
            .await
            .unwrap();
        assert_eq!(holder, fingerprint);
        let name: String = client
            .get(format!("reservation:fingerprint:{fingerprint}"))
            .await
            .unwrap();
        assert_eq!(name, "kept-for-alice");
    }

    let mut client = redis.client().await;
    let record: HashMap<String, String> = client.hgetall("p0rt:domain:aa11").await.unwrap();
    assert_eq!(
        record["first_seen"], "1640995200",
        "RFC 3339 became unix seconds"
    );
    assert_eq!(record["use_count"], "42");

    // A conflicting record in Redis: reported, not overwritten, exit 1.
    let _: () = client
        .set("p0rt:domain:reverse:taken-name-here", "someone-else")
        .await
        .unwrap();
    let conflicted = sandbox.join("conflicted");
    std::fs::create_dir_all(&conflicted).unwrap();
    std::fs::write(
        conflicted.join("domains.json"),
        p0rt_file(&[("dd44", "taken-name-here")]),
    )
    .unwrap();
    let (code, out) = migrate(&sandbox, "redis", &conflicted, &redis.url()).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("1 conflicts") && out.contains("taken-name-here"),
        "{out}"
    );

    // Redis → JSON into a fresh directory: P0rt's shape, timestamps back to RFC 3339.
    let export = sandbox.join("export");
    let (code, out) = migrate(&sandbox, "json", &export, &redis.url()).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("3 records read: 3 imported"), "{out}");
    let text = std::fs::read_to_string(export.join("domains.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["bb22"]["domain"], "otter-piano-lake");
    assert_eq!(json["bb22"]["first_seen"], "2022-01-01T00:00:00Z");
    assert_eq!(json["bb22"]["use_count"], 42);
    assert!(
        out.contains("1 reservations read: 1 imported"),
        "reservations back to the file: {out}"
    );
    let text = std::fs::read_to_string(export.join("reservations.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json[0]["domain"], "kept-for-alice");
    assert_eq!(json[0]["fingerprint"], fingerprint);
    assert_eq!(json[0]["created_at"], "2025-01-15T10:30:00.123456789+01:00");
    assert_eq!(json[0]["comment"], "Alice's demo");
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_redis_imports_domains_json_at_start() {
    require_tools();
    require_redis();
    let redis = RedisServer::start().await;
    let sandbox = Sandbox::new();
    let key = sandbox.key("gina");
    std::fs::create_dir_all(sandbox.data_dir()).unwrap();
    std::fs::write(
        sandbox.data_dir().join("domains.json"),
        p0rt_file(&[
            (&key.key_hash(), "gina-kept-name"),
            ("ee55", "other-kept-name"),
        ]),
    )
    .unwrap();
    let host = Host::start_with(&sandbox, redis_host(&sandbox, &redis.url())).await;
    assert!(host.log().contains("imported"), "{}", host.log());
    assert_eq!(host.info(&sandbox, &key).await.name, "gina-kept-name");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_redis_is_disabled_without_redis() {
    require_tools();
    let sandbox = Sandbox::new();
    let host = Host::start(&sandbox).await;
    let (status, body) = health(&host).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        serde_json::json!({"status": "disabled", "message": "Redis is not available or not configured"})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn enable_redis_false_keeps_the_cache_in_memory() {
    require_tools();
    require_redis();
    let redis = RedisServer::start().await;
    let sandbox = Sandbox::new();
    let config = HostConfig::flags(&sandbox.data_dir())
        .env("REDIS_URL", redis.url())
        .env("ENABLE_REDIS", "false");
    let host = Host::start_with(&sandbox, config).await;
    let (_, body) = health(&host).await;
    assert_eq!(body["status"], "disabled", "{body}");
}

/// A CA and a server certificate for 127.0.0.1, as PEM (ca, server cert, server key).
fn private_ca() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let server = params.signed_by(&server_key, &ca, &ca_key).unwrap();
    (ca.pem(), server.pem(), server_key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread")]
async fn rediss_with_a_private_ca() {
    require_tools();
    require_redis();
    let sandbox = Sandbox::new();
    let (ca, cert, key) = private_ca();
    let dir = sandbox.join("tls-certs");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, pem) in [("ca.pem", &ca), ("cert.pem", &cert), ("key.pem", &key)] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
    let port = crate::support::free_port();
    let mut server = tokio::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args([
            "--tls-cert-file",
            "cert.pem",
            "--tls-key-file",
            "key.pem",
            "--tls-ca-cert-file",
            "ca.pem",
            "--tls-auth-clients",
            "no",
        ])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server");
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "TLS redis-server did not listen"
        );
        assert!(
            server.try_wait().unwrap().is_none(),
            "redis-server exited: is it built with TLS?"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("rediss://127.0.0.1:{port}");

    // Without the CA, the server's certificate is not trusted: a settings error, exit 2.
    let (code, stderr) = run_host_to_exit(
        &sandbox,
        &redis_host(&sandbox, &url),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("certificate") && stderr.contains("REDIS_CA_CERT"),
        "{stderr}"
    );

    // With it, names work over TLS.
    let config =
        redis_host(&sandbox, &url).env("REDIS_CA_CERT", dir.join("ca.pem").to_string_lossy());
    let host = Host::start_with(&sandbox, config).await;
    let key = sandbox.key("tls");
    let name = host.info(&sandbox, &key).await.name;
    assert_eq!(host.info(&sandbox, &key).await.name, name);
    wait_health(&host, "healthy", Duration::from_secs(5)).await;
}

/// The cache's `increment` on Redis keeps the WIT's promise, as the in-memory cache does: the
/// TTL applies only when the call creates the counter. A counter made without one stays
/// without one, and a counter's expiry is not renewed by later increments.
#[tokio::test(flavor = "multi_thread")]
async fn cache_increment_sets_a_ttl_only_on_the_counter_it_creates() {
    require_redis();
    let redis = RedisServer::start().await;
    let target = p0rt::redis_link::parse_target(&redis.url(), None, None).unwrap();
    let link = p0rt::redis_link::RedisLink::new(target, &redis.url(), None);
    let cache = p0rt::cache::Cache::with_redis(link, "t:");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(cache.health(), p0rt::cache::RedisHealth::Healthy { .. }) {
        assert!(
            Instant::now() < deadline,
            "the cache never used Redis: {:?}",
            cache.health()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client = redis.client().await;
    let minute = Some(Duration::from_secs(60));

    // Created without a TTL, then incremented with one: still no expiry.
    assert_eq!(cache.increment("kept", 1, None).await.unwrap(), 1);
    assert_eq!(cache.increment("kept", 2, minute).await.unwrap(), 3);
    let ttl: i64 = client.ttl("t:kept").await.unwrap();
    assert_eq!(ttl, -1, "an existing counter got an expiry");

    // Created with a TTL: it has one, and a later increment with a longer TTL keeps it.
    assert_eq!(cache.increment("windowed", 1, minute).await.unwrap(), 1);
    cache
        .increment("windowed", 1, Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    let ttl: i64 = client.ttl("t:windowed").await.unwrap();
    assert!((1..=60).contains(&ttl), "TTL {ttl}");

    // The same through `increment-many` (one pipeline on a single server).
    let ops = vec![
        ("kept".to_string(), 1, minute),
        ("fresh".to_string(), 5, minute),
    ];
    let counts: Vec<i64> = cache
        .increment_many(&ops)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(counts, [4, 5]);
    let kept: i64 = client.ttl("t:kept").await.unwrap();
    let fresh: i64 = client.ttl("t:fresh").await.unwrap();
    assert_eq!(kept, -1, "an existing counter got an expiry");
    assert!((1..=60).contains(&fresh), "TTL {fresh}");
}
