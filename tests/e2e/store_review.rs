//! The domain store's review fixes (issue #9): records that are not p0rt's are refused by
//! name and never overwritten, store records that are not names are refused at load, the
//! start-up emptiness check stops at the first key (also on Cluster), and a stats scan does
//! not fill the local copy kept for Redis outages.

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;

use crate::redis_support::{RedisCluster, RedisServer, require_redis};
use crate::support::{Host, HostConfig, Sandbox, require_tools, run_host_to_exit};

/// A host on `url` with Redis as the store.
fn redis_host(sandbox: &Sandbox, url: &str) -> HostConfig {
    HostConfig::flags(&sandbox.data_dir())
        .env("STORAGE_TYPE", "redis")
        .env("REDIS_URL", url)
}

/// A `domains.json` in P0rt's shape binding each (key hash, domain).
fn write_domains_json(sandbox: &Sandbox, records: &[(&str, &str)]) {
    let entries: Vec<String> = records
        .iter()
        .map(|(hash, domain)| {
            format!(
                r#"{hash:?}: {{"domain": {domain:?}, "ssh_key_hash": {hash:?}, "first_seen": "2022-01-01T00:00:00Z", "last_seen": "2022-01-02T00:00:00Z", "use_count": 3}}"#
            )
        })
        .collect();
    std::fs::create_dir_all(sandbox.data_dir()).unwrap();
    std::fs::write(
        sandbox.data_dir().join("domains.json"),
        format!("{{{}}}", entries.join(",\n")),
    )
    .unwrap();
}

/// A complete record hash for `hash` naming `domain`.
fn record_fields<'a>(hash: &'a str, domain: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![
        ("domain", domain),
        ("ssh_key_hash", hash),
        ("first_seen", "1700000000"),
        ("last_seen", "1700000000"),
        ("use_count", "1"),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn data_at_a_record_key_that_is_not_p0rts_is_refused_by_name_and_kept() {
    require_tools();
    require_redis();
    let redis = RedisServer::start().await;
    let sandbox = Sandbox::new();
    let host = Host::start_with(&sandbox, redis_host(&sandbox, &redis.url())).await;
    let mut client = redis.client().await;

    // Who, the fields that differ from a valid record (`None`: a list, not a hash), and
    // what the refusal says is wrong.
    type Case<'a> = (&'a str, Option<&'a [(&'a str, &'a str)]>, &'a str);
    let cases: [Case; 4] = [
        ("list", None, "holds a list"),
        (
            "bad-number",
            Some(&[("first_seen", "yesterday")]),
            "first_seen \"yesterday\"",
        ),
        ("not-a-label", Some(&[("domain", "a.b")]), "not a DNS label"),
        (
            "owned-by-another",
            Some(&[("domain", "owned-name")]),
            "p0rt:domain:reverse:owned-name is not this key's",
        ),
    ];
    let _: () = client
        .set("p0rt:domain:reverse:owned-name", "another-keys-hash")
        .await
        .unwrap();
    for (who, changes, problem) in cases {
        let key = sandbox.key(who);
        let hash = key.key_hash();
        let record_key = format!("p0rt:domain:{hash}");
        let fields: Vec<(&str, &str)> = changes.map_or(Vec::new(), |changes| {
            let mut fields = record_fields(&hash, "some-name");
            for &(field, value) in changes {
                fields.retain(|(f, _)| *f != field);
                fields.push((field, value));
            }
            fields
        });
        if fields.is_empty() {
            let _: () = client.rpush(&record_key, "someone else's").await.unwrap();
        } else {
            let _: () = client.hset_multiple(&record_key, &fields).await.unwrap();
        }
        let out = host.ssh(&sandbox, &key).command("info").output().await;
        assert!(!out.status.success(), "{who}: {}", out.stdout);
        for needle in [
            record_key.as_str(),
            problem,
            "an operator repairs or deletes",
        ] {
            assert!(
                out.stdout.contains(needle),
                "{who}: {needle:?} in {}",
                out.stdout
            );
        }
        assert!(!out.stdout.contains("vanished"), "{}", out.stdout);
        assert!(host.log().contains(&record_key), "{who}: {}", host.log());

        // Kept as it was, every time the key tries.
        let again = host.ssh(&sandbox, &key).command("info").output().await;
        assert!(!again.status.success(), "{who}: {}", again.stdout);
        let kind: String = redis::cmd("TYPE")
            .arg(&record_key)
            .query_async(&mut client)
            .await
            .unwrap();
        if fields.is_empty() {
            assert_eq!(kind, "list");
            let items: Vec<String> = client.lrange(&record_key, 0, -1).await.unwrap();
            assert_eq!(items, ["someone else's"]);
        } else {
            let now: HashMap<String, String> = client.hgetall(&record_key).await.unwrap();
            let before: HashMap<String, String> = fields
                .iter()
                .map(|(f, v)| (f.to_string(), v.to_string()))
                .collect();
            assert_eq!(now, before, "{who}");
        }

        // What the message says to do works: once the key is removed, the key gets a name.
        let _: () = client.del(&record_key).await.unwrap();
        let fixed = host.ssh(&sandbox, &key).command("info").output().await;
        assert!(fixed.status.success(), "{who}: {}", fixed.stdout);
    }
    let owner: Option<String> = client.get("p0rt:domain:reverse:owned-name").await.unwrap();
    assert_eq!(
        owner.as_deref(),
        Some("another-keys-hash"),
        "never taken over"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn domains_json_records_that_are_not_names_are_refused_at_start() {
    require_tools();
    for domain in ["a.b", "Evil Name/../x", "ünï-cödé", ""] {
        let sandbox = Sandbox::new();
        write_domains_json(&sandbox, &[("aa11", "fine-name"), ("bb22", domain)]);
        let before = std::fs::read_to_string(sandbox.data_dir().join("domains.json")).unwrap();
        let config = HostConfig::flags(&sandbox.data_dir());
        let (code, stderr) = run_host_to_exit(&sandbox, &config, Duration::from_secs(30)).await;
        assert!(
            code.is_some_and(|c| c != 0),
            "{domain:?}: {code:?} {stderr}"
        );
        assert!(
            stderr.contains("record bb22: domain is not a DNS label"),
            "{domain:?}: {stderr}"
        );
        let after = std::fs::read_to_string(sandbox.data_dir().join("domains.json")).unwrap();
        assert_eq!(before, after, "left untouched");
    }
}

/// `INFO commandstats` calls of `command` since the last `CONFIG RESETSTAT`.
async fn command_calls(client: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(client)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_startup_emptiness_check_stops_at_the_first_key() {
    require_tools();
    require_redis();
    let redis = RedisServer::start().await;
    let mut client = redis.client().await;
    let mut pipe = redis::pipe();
    for i in 0..5000 {
        pipe.set(format!("p0rt:domain:reverse:name-{i}"), format!("hash{i}"))
            .ignore();
    }
    let _: () = pipe.query_async(&mut client).await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut client)
        .await
        .unwrap();

    let sandbox = Sandbox::new();
    write_domains_json(&sandbox, &[("cc33", "json-only-name")]);
    // Open access said explicitly: otherwise the key-list check (is there any P0rt
    // `keys:` record?) scans too, and this test counts the store's emptiness check alone.
    let config = redis_host(&sandbox, &redis.url()).env("P0RT_OPEN_ACCESS", "true");
    let host = Host::start_with(&sandbox, config).await;
    assert!(!host.log().contains("imported"), "{}", host.log());
    assert_eq!(command_calls(&mut client, "scan").await, 1, "one SCAN step");
    let owner: Option<String> = client
        .get("p0rt:domain:reverse:json-only-name")
        .await
        .unwrap();
    assert_eq!(owner, None, "not imported into a Redis that has domains");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_startup_emptiness_check_is_right_on_cluster() {
    require_tools();
    require_redis();
    let cluster = RedisCluster::start().await;

    let first = Sandbox::new();
    write_domains_json(&first, &[("dd44", "first-json-name")]);
    let mut host = Host::start_with(&first, redis_host(&first, &cluster.url())).await;
    assert!(host.log().contains("imported"), "{}", host.log());
    host.stop().await;
    assert_eq!(
        cluster
            .get("p0rt:domain:reverse:first-json-name")
            .await
            .as_deref(),
        Some("dd44")
    );

    // One record on one node is enough for the cluster not to be empty.
    let second = Sandbox::new();
    write_domains_json(&second, &[("ee55", "second-json-name")]);
    let host = Host::start_with(&second, redis_host(&second, &cluster.url())).await;
    assert!(!host.log().contains("imported"), "{}", host.log());
    assert_eq!(
        cluster.get("p0rt:domain:reverse:second-json-name").await,
        None
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stats_scan_does_not_fill_the_outage_copy() {
    require_tools();
    require_redis();
    let mut redis = RedisServer::start().await;
    let sandbox = Sandbox::new();
    let host = Host::start_with(&sandbox, redis_host(&sandbox, &redis.url())).await;
    let mut client = redis.client().await;

    // A key that never connected to this host, known only to Redis.
    let stranger = sandbox.key("stranger");
    let hash = stranger.key_hash();
    let _: () = client
        .hset_multiple(
            format!("p0rt:domain:{hash}"),
            &record_fields(&hash, "stranger-name"),
        )
        .await
        .unwrap();
    let _: () = client
        .set("p0rt:domain:reverse:stranger-name", &hash)
        .await
        .unwrap();
    let stats: serde_json::Value =
        serde_json::from_str(&host.get_base("/domain-stats").await.text().await.unwrap()).unwrap();
    assert_eq!(stats["total_domains"], 1, "{stats}");

    // Had the scan kept what it read, the stranger would get its name from that copy now.
    redis.kill9();
    let out = host.ssh(&sandbox, &stranger).command("info").output().await;
    assert!(!out.status.success(), "{}", out.stdout);
    assert!(
        out.stdout.contains("no name can be given right now"),
        "{}",
        out.stdout
    );
}
