//! Name reservations through the real binary, the real OpenSSH client and a real
//! `redis-server`: P0rt's `reservations.json` and P0rt's Redis keys, written here exactly as
//! P0rt writes them, serve unchanged: with `DOMAIN_RESERVATIONS_ENABLED=true` the reserved
//! name goes to its key (over the key's stored name); either way another key never derives
//! it and is refused it as a requested name;
//! `p0rt reservation list|add|remove` work on a running host's store and take effect at
//! once; a reservations file p0rt cannot read is refused, named, and left as it is.

use std::time::Duration;

use redis::AsyncCommands;
use serde_json::json;

use crate::plugins::{plugins_dir, wait_log, wait_plugin, write_atomic};
use crate::redis_support::{RedisCluster, RedisServer, require_redis};
use crate::support::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The name P0rt derives for a key (attempt 0) or its salted alternatives (1, 2, …).
pub(crate) fn p0rt_name(key: &Key, attempt: u32) -> String {
    p0rt::names::builtin_name(&p0rt::names::KeyHash::from_stored(key.key_hash()), attempt)
        .to_string()
}

/// `reservations.json` as P0rt's `save` writes it: `json.MarshalIndent(list, "", "  ")` of
/// `{domain, fingerprint, created_at, updated_at, comment?}` (Go times: RFC 3339 with
/// nanoseconds and the local offset; `comment` omitted when empty).
pub(crate) fn p0rt_reservations_file(records: &[(&str, &str, Option<&str>)]) -> String {
    let mut out = String::from("[");
    for (i, (domain, fingerprint, comment)) in records.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            "\n  {{\n    \"domain\": \"{domain}\",\n    \"fingerprint\": \"{fingerprint}\",\n    \
             \"created_at\": \"2025-01-15T10:30:00.123456789+01:00\",\n    \
             \"updated_at\": \"2025-01-15T10:30:00.123456789+01:00\""
        ));
        if let Some(comment) = comment {
            out.push_str(&format!(",\n    \"comment\": \"{comment}\""));
        }
        out.push_str("\n  }");
    }
    out.push_str(if records.is_empty() { "]" } else { "\n]" });
    out
}

/// `domains.json` as P0rt writes it, binding one key to one name.
pub(crate) fn p0rt_domains_file(key: &Key, domain: &str) -> String {
    let hash = key.key_hash();
    serde_json::to_string_pretty(&json!({
        hash.clone(): {
            "domain": domain,
            "ssh_key_hash": hash,
            "first_seen": "2025-01-01T00:00:00Z",
            "last_seen": "2025-01-02T00:00:00Z",
            "use_count": 3,
        }
    }))
    .unwrap()
}

/// The switch that hands a reserved name to its key (on by default; P0rt never does).
const HAND_OVER: (&str, &str) = ("DOMAIN_RESERVATIONS_ENABLED", "true");

/// A plugins directory whose sidecar makes the bundled `words` plugin grant requested names.
fn granting_plugins(sb: &Sandbox) -> std::path::PathBuf {
    let dir = plugins_dir(sb);
    write_atomic(
        &dir.join("words.json"),
        json!({ "config": { "grant_requested": true } })
            .to_string()
            .as_bytes(),
    );
    dir
}

/// Waits until the words plugin, configured by that sidecar, serves naming.
async fn words_configured(host: &Host, dir: &std::path::Path) {
    let origin = dir.join("words.json").display().to_string();
    wait_plugin(host, &origin, "words.json to configure words", |p| {
        p["active"] == true && p["role"] == "naming"
    })
    .await;
}

/// `p0rt reservation <args…>` with the host's store settings; (exit code, stdout + stderr).
async fn reservation(store: &[(&str, String)], args: &[&str]) -> (Option<i32>, String) {
    let (code, stdout, stderr) = reservation_output(store, args).await;
    (code, format!("{stdout}{stderr}"))
}

/// `p0rt reservation list --json`: P0rt's answer, parsed (stdout only: logs go to stderr).
async fn listed_json(store: &[(&str, String)]) -> serde_json::Value {
    let (code, stdout, stderr) = reservation_output(store, &["list", "--json"]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// `p0rt reservation <args…>`: (exit code, stdout, stderr).
async fn reservation_output(
    store: &[(&str, String)],
    args: &[&str],
) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("reservation").args(args);
    for var in p0rt::config::ENV_VARS {
        cmd.env_remove(var);
    }
    for (flag_or_var, value) in store {
        if flag_or_var.starts_with("--") {
            cmd.arg(flag_or_var).arg(value);
        } else {
            cmd.env(flag_or_var, value);
        }
    }
    let out = cmd
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("run p0rt reservation");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ssh -N -R <name>:80:…` with `key`: asserts the host refuses it because `name` is
/// reserved for another key.
async fn refused_as_requested_name(host: &Host, sb: &Sandbox, key: &Key, name: &str) {
    let backend = Backend::start("intruder").await;
    let out = host
        .ssh(sb, key)
        .args(["-N", "-R", &format!("{name}:80:127.0.0.1:{}", backend.port)])
        .output()
        .await;
    assert!(!out.status.success(), "-R {name} was accepted");
    assert!(
        out.stderr.contains("remote port forwarding failed"),
        "{}",
        out.stderr
    );
    wait_log(
        host,
        &format!("refused -R {name}:80: {name} is reserved for another key"),
    )
    .await;
    assert_ne!(
        host.whoami(name).await,
        (200, "intruder".to_string()),
        "{name} served the other key's backend"
    );
}

// ---------------------------------------------------------------------------------------------
// reservations.json
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_p0rt_reservations_file_serves_unchanged() {
    let sb = Sandbox::new();
    let (alice, bob, carol) = (sb.key("alice"), sb.key("bob"), sb.key("carol"));
    // The name P0rt derives for Bob is reserved for Alice, who has another stored name; a
    // name short enough to be asked for with `-R` (20 characters) is Carol's.
    let reserved = p0rt_name(&bob, 0);
    let data = sb.data_dir();
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("domains.json"),
        p0rt_domains_file(&alice, "old-alice-name"),
    )
    .unwrap();
    let file = p0rt_reservations_file(&[
        (&reserved, &alice.fingerprint(), Some("Alice's demo")),
        ("team-demo", &carol.fingerprint(), None),
    ]);
    std::fs::write(data.join("reservations.json"), &file).unwrap();
    let plugins = granting_plugins(&sb);
    let config = HostConfig::flags(&data)
        .env(HAND_OVER.0, HAND_OVER.1)
        .arg("--plugins-dir")
        .arg(plugins.to_string_lossy());
    let host = Host::start_with(&sb, config).await;
    words_configured(&host, &plugins).await;

    // Alice gets her reserved name as her main name, over her stored one, and serves it.
    let backend = Backend::start("alice-app").await;
    let (_alice_session, alice_name) = host.tunnel(&sb, &alice, &backend).await;
    assert_eq!(alice_name, reserved);
    // Bob never gets it: he gets P0rt's first salted alternative instead.
    let bob_name = host.info(&sb, &bob).await.name;
    assert_eq!(bob_name, p0rt_name(&bob, 1));
    // Nor can he ask for a reserved name, though the naming policy grants requested names.
    refused_as_requested_name(&host, &sb, &bob, "team-demo").await;
    assert_eq!(host.info(&sb, &carol).await.name, "team-demo");
    assert_eq!(host.whoami(&reserved).await, (200, "alice-app".to_string()));

    // The host never rewrites P0rt's file; Alice's stored name stays hers, and the reserved
    // name is stored as hers too.
    assert_eq!(
        std::fs::read_to_string(data.join("reservations.json")).unwrap(),
        file
    );
    let domains: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("domains.json")).unwrap()).unwrap();
    assert_eq!(domains[alice.key_hash()]["domain"], "old-alice-name");
    let granted: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("granted-names.json")).unwrap())
            .unwrap();
    assert_eq!(granted[&reserved]["ssh_key_hash"], alice.key_hash());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_changes_reservations_of_a_running_host() {
    let sb = Sandbox::new();
    let (carol, dave, erin, frank) = (
        sb.key("carol"),
        sb.key("dave"),
        sb.key("erin"),
        sb.key("frank"),
    );
    let config = HostConfig::flags(&sb.data_dir()).env(HAND_OVER.0, HAND_OVER.1);
    let host = Host::start_with(&sb, config).await;
    let store = [
        ("--data-dir", host.data_dir().display().to_string()),
        (HAND_OVER.0, HAND_OVER.1.to_string()),
    ];
    let carols = p0rt_name(&carol, 0);

    // Reserve the name P0rt would give Carol for Dave, beside the running host.
    let (code, out) = reservation(
        &store,
        &["add", &carols, &dave.fingerprint(), "--comment", "Dave's"],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("reserved {carols} for key {}", dave.fingerprint())),
        "{out}"
    );
    assert!(!out.contains("not handed over"), "{out}");
    // Written in P0rt's shape.
    let written: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(host.data_dir().join("reservations.json")).unwrap(),
    )
    .unwrap();
    let record = &written[0];
    assert_eq!(record["domain"], carols.as_str(), "{written}");
    assert_eq!(record["fingerprint"], dave.fingerprint(), "{written}");
    assert_eq!(record["comment"], "Dave's", "{written}");
    assert_eq!(record["created_at"], record["updated_at"], "{written}");
    assert!(
        record["created_at"].as_str().unwrap().starts_with("20"),
        "{written}"
    );

    // In force at once: Carol gets her salted alternative, Dave the reserved name.
    assert_eq!(host.info(&sb, &carol).await.name, p0rt_name(&carol, 1));
    assert_eq!(host.info(&sb, &dave).await.name, carols);

    // Listed, as a table and as P0rt's JSON answer.
    let (code, out) = reservation(&store, &["list"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&carols) && out.contains("Dave's"), "{out}");
    let answer = listed_json(&store).await;
    assert_eq!(answer["success"], true, "{answer}");
    assert_eq!(answer["data"][0]["domain"], carols.as_str(), "{answer}");

    // P0rt's rules and p0rt's checks, with sentences that say what is wrong.
    for (args, needle) in [
        (
            vec!["add", &carols, &frank.fingerprint()],
            "already reserved for another key".to_string(),
        ),
        (
            vec!["add", "other-name", &dave.fingerprint()],
            format!("already holds the reservation {carols}"),
        ),
        (
            vec!["add", "admin", &frank.fingerprint()],
            "keeps that word for itself".to_string(),
        ),
        (
            vec!["add", "not.a.label", &frank.fingerprint()],
            "cannot be reserved".to_string(),
        ),
        (
            vec!["add", "fine-name", "SHA256:abc123..."],
            "ssh-keygen -lf".to_string(),
        ),
    ] {
        let (code, out) = reservation(&store, &args).await;
        assert_ne!(code, Some(0), "{args:?}: {out}");
        assert!(out.contains(&needle), "{args:?}: {out}");
    }

    // A reservation lifted before its key connects frees the name at once.
    let erins = p0rt_name(&erin, 0);
    let (code, out) = reservation(&store, &["add", &erins, &frank.fingerprint()]).await;
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = reservation(&store, &["remove", &erins]).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(host.info(&sb, &erin).await.name, erins);
    let (code, out) = reservation(&store, &["remove", &erins]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("{erins} is not reserved")), "{out}");
    assert_ne!(host.info(&sb, &frank).await.name, erins);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_switch_off_a_reserved_name_is_kept_from_every_key() {
    let sb = Sandbox::new();
    let (alice, bob) = (sb.key("alice"), sb.key("bob"));
    let off = ("DOMAIN_RESERVATIONS_ENABLED", "false");
    let host = Host::start_with(&sb, HostConfig::flags(&sb.data_dir()).env(off.0, off.1)).await;
    wait_log(&host, "reserved names are kept from every key").await;
    let store = [
        ("--data-dir", host.data_dir().display().to_string()),
        (off.0, off.1.to_string()),
    ];
    let bobs = p0rt_name(&bob, 0);
    let (code, out) = reservation(&store, &["add", &bobs, &alice.fingerprint()]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("not handed over"), "{out}");
    // Bob never gets it; Alice keeps her own name (P0rt's behaviour).
    assert_eq!(host.info(&sb, &bob).await.name, p0rt_name(&bob, 1));
    assert_eq!(host.info(&sb, &alice).await.name, p0rt_name(&alice, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_reservations_file_is_refused_and_left_untouched() {
    let sb = Sandbox::new();
    let (alice, bob) = (sb.key("alice"), sb.key("bob"));
    let data = sb.data_dir();
    std::fs::create_dir_all(&data).unwrap();
    let path = data.join("reservations.json");
    let truncated = "[\n  {\n    \"domain\": \"happy-cat-jump\",\n    \"fingerprint\": ";
    std::fs::write(&path, truncated).unwrap();

    // The host does not start, and says which file and why.
    let (code, stderr) =
        run_host_to_exit(&sb, &HostConfig::flags(&data), Duration::from_secs(30)).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains("left untouched"), "{stderr}");
    // Nor do the CLI's list and add.
    let store = [("--data-dir", data.display().to_string())];
    for args in [
        vec!["list"],
        vec!["add", "fine-name", &alice.fingerprint()],
        vec!["remove", "happy-cat-jump"],
    ] {
        let (code, out) = reservation(&store, &args).await;
        assert_ne!(code, Some(0), "{args:?}: {out}");
        assert!(out.contains(&path.display().to_string()), "{args:?}: {out}");
    }
    assert_eq!(std::fs::read_to_string(&path).unwrap(), truncated);

    // A running host keeps the reservations it read while an edit cannot be read.
    let reserved = p0rt_name(&bob, 0);
    let good = p0rt_reservations_file(&[(&reserved, &alice.fingerprint(), None)]);
    std::fs::write(&path, &good).unwrap();
    let config = HostConfig::flags(&data).env(HAND_OVER.0, HAND_OVER.1);
    let host = Host::start_with(&sb, config).await;
    write_atomic(&path, truncated.as_bytes());
    assert_eq!(host.info(&sb, &bob).await.name, p0rt_name(&bob, 1));
    assert_eq!(host.info(&sb, &alice).await.name, reserved);
    wait_log(&host, "stay in force").await;
    assert_eq!(std::fs::read_to_string(&path).unwrap(), truncated);
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn p0rt_redis_reservations_serve_unchanged_and_the_cli_works_on_them() {
    require_redis();
    let redis = RedisServer::start().await;
    let mut client = redis.client().await;
    let sb = Sandbox::new();
    let (alice, bob, carol, dave, eve) = (
        sb.key("alice"),
        sb.key("bob"),
        sb.key("carol"),
        sb.key("dave"),
        sb.key("eve"),
    );
    // P0rt's `setReservation`: four keys each, no prefix, no expiry. Bob's P0rt name for
    // Alice, a short one for Eve.
    let reserved = p0rt_name(&bob, 0);
    let mut details = String::new();
    for (name, key, comment) in [
        (&reserved, &alice, "Alice's demo"),
        (&"team-demo".to_string(), &eve, ""),
    ] {
        let fp = key.fingerprint();
        let comment = if comment.is_empty() {
            String::new()
        } else {
            format!(r#","comment":"{comment}""#)
        };
        let text = format!(
            r#"{{"domain":"{name}","fingerprint":"{fp}","created_at":"2025-01-15T10:30:00.123456789+01:00","updated_at":"2025-01-15T10:30:00.123456789+01:00"{comment}}}"#
        );
        let _: () = client
            .set(format!("reservation:domain:{name}"), &fp)
            .await
            .unwrap();
        let _: () = client
            .set(format!("reservation:fingerprint:{fp}"), name)
            .await
            .unwrap();
        let _: () = client
            .set(format!("reservation:details:{name}"), &text)
            .await
            .unwrap();
        let _: () = client.sadd("reservations:list", name).await.unwrap();
        if details.is_empty() {
            details = text;
        }
    }

    let plugins = granting_plugins(&sb);
    let config = HostConfig::flags(&sb.data_dir())
        .env(HAND_OVER.0, HAND_OVER.1)
        .env("STORAGE_TYPE", "redis")
        .env("REDIS_URL", redis.url())
        .arg("--plugins-dir")
        .arg(plugins.to_string_lossy());
    let host = Host::start_with(&sb, config).await;
    words_configured(&host, &plugins).await;

    assert_eq!(host.info(&sb, &alice).await.name, reserved);
    assert_eq!(host.info(&sb, &bob).await.name, p0rt_name(&bob, 1));
    refused_as_requested_name(&host, &sb, &bob, "team-demo").await;
    assert_eq!(host.info(&sb, &eve).await.name, "team-demo");
    // Stored as Alice's main name, in the seed's layout.
    let owner: Option<String> = client
        .get(format!("p0rt:domain:reverse:{reserved}"))
        .await
        .unwrap();
    assert_eq!(owner, Some(alice.key_hash()));

    // The CLI on the same Redis: P0rt's keys and values.
    let store = [
        ("STORAGE_TYPE", "redis".to_string()),
        ("REDIS_URL", redis.url()),
        ("--data-dir", sb.join("cli-data").display().to_string()),
        (HAND_OVER.0, HAND_OVER.1.to_string()),
    ];
    let carols = p0rt_name(&carol, 0);
    let (code, out) = reservation(&store, &["add", &carols, &dave.fingerprint(), "Dave's"]).await;
    assert_eq!(code, Some(0), "{out}");
    let holder: Option<String> = client
        .get(format!("reservation:domain:{carols}"))
        .await
        .unwrap();
    assert_eq!(holder, Some(dave.fingerprint()));
    let back: Option<String> = client
        .get(format!("reservation:fingerprint:{}", dave.fingerprint()))
        .await
        .unwrap();
    assert_eq!(back.as_deref(), Some(carols.as_str()));
    let written: String = client
        .get(format!("reservation:details:{carols}"))
        .await
        .unwrap();
    let record: serde_json::Value = serde_json::from_str(&written).unwrap();
    let mut fields: Vec<&String> = record.as_object().unwrap().keys().collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "comment",
            "created_at",
            "domain",
            "fingerprint",
            "updated_at"
        ],
        "{written}"
    );
    assert_eq!(record["comment"], "Dave's");
    assert!(
        written.starts_with(&format!(r#"{{"domain":"{carols}","fingerprint":"#)),
        "Go's field order: {written}"
    );
    let listed: bool = client
        .sismember("reservations:list", &carols)
        .await
        .unwrap();
    assert!(listed);
    let ttl: i64 = client
        .ttl(format!("reservation:domain:{carols}"))
        .await
        .unwrap();
    assert_eq!(ttl, -1, "reservations never expire");

    // In force at once.
    assert_eq!(host.info(&sb, &carol).await.name, p0rt_name(&carol, 1));
    assert_eq!(host.info(&sb, &dave).await.name, carols);

    let answer = listed_json(&store).await;
    let mut domains: Vec<&str> = answer["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["domain"].as_str().unwrap())
        .collect();
    domains.sort();
    let mut expected = vec![reserved.as_str(), carols.as_str(), "team-demo"];
    expected.sort();
    assert_eq!(domains, expected, "{answer}");
    let alices = answer["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["domain"] == reserved.as_str())
        .unwrap();
    assert_eq!(alices["comment"], "Alice's demo", "{answer}");

    let (code, out) = reservation(&store, &["add", &reserved, &carol.fingerprint()]).await;
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("already reserved for another key"), "{out}");

    // Removed: all four keys go; P0rt's own reservation is untouched.
    let (code, out) = reservation(&store, &["remove", &carols]).await;
    assert_eq!(code, Some(0), "{out}");
    for key in [
        format!("reservation:domain:{carols}"),
        format!("reservation:fingerprint:{}", dave.fingerprint()),
        format!("reservation:details:{carols}"),
    ] {
        let exists: bool = client.exists(&key).await.unwrap();
        assert!(!exists, "{key} is still there");
    }
    let listed: bool = client
        .sismember("reservations:list", &carols)
        .await
        .unwrap();
    assert!(!listed);
    let kept: String = client
        .get(format!("reservation:details:{reserved}"))
        .await
        .unwrap();
    assert_eq!(kept, details);
}

/// On a Redis Cluster (P0rt's four reservation keys land on different masters), the CLI
/// adds, lists and removes a reservation, and the host hands the name to its key and refuses
/// it to another.
#[tokio::test(flavor = "multi_thread")]
async fn reservations_work_on_a_redis_cluster() {
    require_redis();
    let cluster = RedisCluster::start().await;
    let sb = Sandbox::new();
    let (alice, bob) = (sb.key("alice"), sb.key("bob"));
    let store = [
        ("STORAGE_TYPE", "redis".to_string()),
        ("REDIS_URL", cluster.url()),
        ("--data-dir", sb.join("cli-data").display().to_string()),
        (HAND_OVER.0, HAND_OVER.1.to_string()),
    ];
    let (code, out) =
        reservation(&store, &["add", "team-demo", &alice.fingerprint(), "demo"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        cluster.get("reservation:domain:team-demo").await,
        Some(alice.fingerprint())
    );
    assert_eq!(
        cluster
            .get(&format!("reservation:fingerprint:{}", alice.fingerprint()))
            .await
            .as_deref(),
        Some("team-demo")
    );
    let answer = listed_json(&store).await;
    assert_eq!(answer["data"][0]["domain"], "team-demo", "{answer}");
    assert_eq!(answer["data"][0]["comment"], "demo", "{answer}");

    let plugins = granting_plugins(&sb);
    let config = HostConfig::flags(&sb.data_dir())
        .env(HAND_OVER.0, HAND_OVER.1)
        .env("STORAGE_TYPE", "redis")
        .env("REDIS_URL", cluster.url())
        .arg("--plugins-dir")
        .arg(plugins.to_string_lossy());
    let host = Host::start_with(&sb, config).await;
    words_configured(&host, &plugins).await;
    assert_eq!(host.info(&sb, &alice).await.name, "team-demo");
    refused_as_requested_name(&host, &sb, &bob, "team-demo").await;

    let (code, out) = reservation(&store, &["remove", "team-demo"]).await;
    assert_eq!(code, Some(0), "{out}");
    for key in [
        "reservation:domain:team-demo".to_string(),
        format!("reservation:fingerprint:{}", alice.fingerprint()),
        "reservation:details:team-demo".to_string(),
    ] {
        assert_eq!(cluster.get(&key).await, None, "{key} is still there");
    }
    assert_eq!(listed_json(&store).await["data"], json!([]));
}
