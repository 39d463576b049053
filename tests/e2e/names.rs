//! Names: one stable name per key, across reconnects, takeovers and host restarts.

use std::time::Duration;

use crate::support::*;

fn assert_word_name(name: &str) {
    let parts: Vec<&str> = name.split('-').collect();
    assert_eq!(parts.len(), 3, "name {name:?} is not three words");
    assert!(
        parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase())),
        "name {name:?} has non a-z words"
    );
}

fn domains_json(host: &Host) -> serde_json::Value {
    let text =
        std::fs::read_to_string(host.data_dir().join("domains.json")).expect("read domains.json");
    serde_json::from_str(&text).expect("domains.json is JSON")
}

#[tokio::test(flavor = "multi_thread")]
async fn info_reports_name_url_and_key_fingerprint() {
    let sb = Sandbox::new();
    let key = sb.key("alice");
    let host = Host::start(&sb).await;

    let out = host.ssh(&sb, &key).command("info").output().await;
    assert!(
        out.status.success(),
        "info exit {}: {}",
        out.status,
        out.stderr
    );
    let info = Info::parse(&out.stdout);
    assert_word_name(&info.name);
    assert_eq!(
        info.url,
        format!("http://{}.localhost:{}", info.name, host.http_port)
    );
    assert_eq!(info.key, key.fingerprint());

    // Any other command is an error with a non-zero exit.
    let out = host.ssh(&sb, &key).command("rm -rf /").output().await;
    assert!(
        !out.status.success(),
        "unknown command succeeded: {}",
        out.stdout
    );
    assert!(out.stdout.contains("unknown command"), "{:?}", out.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn name_is_stable_across_reconnect_and_host_restart() {
    let sb = Sandbox::new();
    let key = sb.key("alice");
    let backend = Backend::start("b1").await;
    let mut host = Host::start(&sb).await;

    let (mut first, name) = host.tunnel(&sb, &key, &backend).await;
    assert_word_name(&name);
    // The claim is on disk as soon as the name is given out.
    let stored = domains_json(&host);
    assert_eq!(
        stored[key.key_hash()]["domain"],
        name,
        "domains.json: {stored}"
    );

    // Drop the connection: the name goes offline but stays known.
    first.kill().await;
    host.wait_status(&name, 503).await;

    // Reconnect: same name again.
    let (_second, again) = host.tunnel(&sb, &key, &backend).await;
    assert_eq!(again, name);
    drop(_second);

    // Restart the host on the same data dir: same name, served on the new port.
    host.restart().await;
    assert!(
        host.log().contains("(1 records)"),
        "store not reloaded:\n{}",
        host.log()
    );
    assert_eq!(host.info(&sb, &key).await.name, name);
    let (_third, after_restart) = host.tunnel(&sb, &key, &backend).await;
    assert_eq!(after_restart, name);
    assert_eq!(host.whoami(&name).await, (200, "b1".to_string()));

    // Even a hard kill keeps the binding (claims are durable when given out).
    host.kill().await;
    let stored = domains_json(&host);
    assert_eq!(stored.as_object().unwrap().len(), 1, "{stored}");
    assert_eq!(stored[key.key_hash()]["domain"], name);
}

/// A domains.json written by P0rt (RFC 3339 times) decides the name, not the built-in namer.
#[tokio::test(flavor = "multi_thread")]
async fn stored_name_in_domains_json_is_honoured() {
    let sb = Sandbox::new();
    let key = sb.key("legacy");
    let backend = Backend::start("legacy-backend").await;
    std::fs::create_dir_all(sb.data_dir()).unwrap();
    let hash = key.key_hash();
    let file = format!(
        r#"{{
  "{hash}": {{
    "domain": "legacy-stored-name",
    "ssh_key_hash": "{hash}",
    "first_seen": "2022-01-01T00:00:00Z",
    "last_seen": "2022-01-02T00:00:00Z",
    "use_count": 42
  }}
}}"#
    );
    std::fs::write(sb.data_dir().join("domains.json"), file).unwrap();

    let mut host = Host::start(&sb).await;
    let info = host.info(&sb, &key).await;
    assert_eq!(info.name, "legacy-stored-name");
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;
    assert_eq!(name, "legacy-stored-name");

    // A graceful stop flushes the touched record: same binding, more uses, first_seen kept.
    let status = host.stop().await;
    assert!(status.success(), "p0rt exit {status}");
    let stored = domains_json(&host);
    let record = &stored[&hash];
    assert_eq!(record["domain"], "legacy-stored-name");
    assert_eq!(record["first_seen"], "2022-01-01T00:00:00Z");
    assert!(record["use_count"].as_u64().unwrap() > 42, "{record}");
    assert_ne!(record["last_seen"], "2022-01-02T00:00:00Z", "{record}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_keys_get_two_names() {
    let sb = Sandbox::new();
    let (alice, bob) = (sb.key("alice"), sb.key("bob"));
    let (ba, bb) = (
        Backend::start("for-alice").await,
        Backend::start("for-bob").await,
    );
    let host = Host::start(&sb).await;

    let (_a, name_a) = host.tunnel(&sb, &alice, &ba).await;
    let (_b, name_b) = host.tunnel(&sb, &bob, &bb).await;
    assert_ne!(name_a, name_b);
    // Both live at once, each routed to its own backend.
    assert_eq!(host.whoami(&name_a).await, (200, "for-alice".to_string()));
    assert_eq!(host.whoami(&name_b).await, (200, "for-bob".to_string()));

    let stats: serde_json::Value = host.get_base("/domain-stats").await.json_value().await;
    assert_eq!(stats["total_domains"], 2, "{stats}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnect_takeover_keeps_the_new_tunnel() {
    let sb = Sandbox::new();
    let key = sb.key("alice");
    let (old_backend, new_backend) = (Backend::start("old").await, Backend::start("new").await);
    let host = Host::start(&sb).await;

    // A: interactive session so it can be told about the takeover.
    let mut a = host
        .ssh(&sb, &key)
        .args(["-tt", "-R", &format!("80:127.0.0.1:{}", old_backend.port)])
        .spawn();
    let banner = a
        .wait_line("Forwarding …", |l| l.starts_with("Forwarding http://"))
        .await;
    let name = banner
        .strip_prefix("Forwarding http://")
        .and_then(|r| r.split('.').next())
        .unwrap()
        .to_string();
    host.wait_served(&name, &old_backend).await;

    // A': same key, new connection, other backend. It takes the name over.
    let _a2 = host
        .ssh(&sb, &key)
        .args(["-N", "-R", &format!("80:127.0.0.1:{}", new_backend.port)])
        .spawn();
    host.wait_served(&name, &new_backend).await;
    a.wait_line("takeover notice", |l| {
        l.contains(&format!("{name} is now served by a newer connection"))
    })
    .await;

    // A goes away: its cleanup must not remove A'’s tunnel.
    a.kill().await;
    let hits_before = old_backend.hits();
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            host.whoami(&name).await,
            (200, "new".to_string()),
            "tunnel lost after the old connection closed; p0rt stderr:\n{}",
            host.log()
        );
    }
    assert_eq!(old_backend.hits(), hits_before, "old backend still reached");
    assert!(
        !host.log().contains(&format!("tunnel {name} down")),
        "{}",
        host.log()
    );

    // Control: when A' goes, the name does go offline.
    drop(_a2);
    host.wait_status(&name, 503).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dash_n_tunnel_uses_the_info_name() {
    let sb = Sandbox::new();
    let key = sb.key("carol");
    let backend = Backend::start("carol-backend").await;
    let host = Host::start(&sb).await;

    // Open -N first, ask `info` afterwards from a second connection.
    let _client = host
        .ssh(&sb, &key)
        .args(["-N", "-R", &format!("80:127.0.0.1:{}", backend.port)])
        .spawn();
    let info = eventually(WAIT, "a name answering 200", || async {
        let info = host.info(&sb, &key).await;
        (host.whoami(&info.name).await.0 == 200).then_some(info)
    })
    .await;
    assert_eq!(
        host.whoami(&info.name).await,
        (200, "carol-backend".to_string())
    );
    // The name is exactly the one info reports, and only that one.
    assert_eq!(host.whoami(&format!("x{}", info.name)).await.0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn shell_session_prints_url_and_request_log() {
    let sb = Sandbox::new();
    let key = sb.key("dave");
    let backend = Backend::start("dave-backend").await;
    let host = Host::start(&sb).await;
    let info = host.info(&sb, &key).await;

    let mut shell = host
        .ssh(&sb, &key)
        .args(["-tt", "-R", &format!("80:localhost:{}", backend.port)])
        .spawn();
    let expected = format!(
        "Forwarding http://{}.localhost:{} -> your -R target",
        info.name, host.http_port
    );
    shell.wait_line(&expected, |l| l.trim() == expected).await;
    host.wait_served(&info.name, &backend).await;

    assert_eq!(host.get(&info.name, "/echo?from=shell").await.status(), 200);
    assert_eq!(host.get(&info.name, "/nothing-here").await.status(), 404);

    let is_log = |line: &str, method: &str, path: &str, status: &str| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() == 4
            && f[0] == method
            && f[1] == path
            && f[2] == status
            && f[3]
                .strip_suffix("ms")
                .is_some_and(|ms| !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit()))
    };
    shell
        .wait_line("GET /echo?from=shell 200 Nms", |l| {
            is_log(l, "GET", "/echo?from=shell", "200")
        })
        .await;
    shell
        .wait_line("GET /nothing-here 404 Nms", |l| {
            is_log(l, "GET", "/nothing-here", "404")
        })
        .await;
    assert!(shell.try_exit().is_none(), "shell session ended early");
}

async fn assert_subname_served(label: &str) {
    let sb = Sandbox::new();
    let key = sb.key("erin");
    let sub_backend = Backend::start("sub-backend").await;
    let host = Host::start(&sb).await;
    let name = host.info(&sb, &key).await.name;

    let client = host
        .ssh(&sb, &key)
        .args([
            "-N",
            "-R",
            &format!("{label}:80:127.0.0.1:{}", sub_backend.port),
        ])
        .spawn();
    let sub = format!("{label}-{name}");
    let (mut status, mut body) = (0, String::new());
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        (status, body) = host.whoami(&sub).await;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        (status, body.as_str()),
        (200, "sub-backend"),
        "-R {label}:80 not served as {sub}; ssh stderr {:?}; p0rt stderr:\n{}",
        client.stderr(),
        host.log()
    );
    // Only the sub-name is forwarded; the main name is known but offline.
    let (status, body) = host.whoami(&name).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("tunnel offline"), "{body}");
    // A sub-name of a known key that is not forwarded is offline too, not unknown.
    assert_eq!(host.whoami(&format!("other-{name}")).await.0, 503);
}

#[tokio::test(flavor = "multi_thread")]
async fn subname_forward_serves_label_name() {
    assert_subname_served("web").await;
}

/// The README's own example: `-R api:80:…` serves `api-<name>`.
#[tokio::test(flavor = "multi_thread")]
async fn api_subname_from_readme_is_served() {
    assert_subname_served("api").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn domain_and_ports_from_environment() {
    let sb = Sandbox::new();
    let key = sb.key("frank");
    let backend = Backend::start("frank-backend").await;
    let config = HostConfig::env_only(&sb.join("env-data"))
        .env("SSH_SERVER_PORT", "0")
        .env("HTTP_PORT", "0")
        .env("SSH_BIND", "127.0.0.1")
        .env("HTTP_BIND", "127.0.0.1")
        .env("DOMAIN_BASE", "Tunnels.Example.")
        .env("STORAGE_TYPE", "json");
    let host = Host::start_with(&sb, config).await;
    assert!(sb.join("env-data").join("ssh_host_ed25519_key").exists());

    let info = host.info(&sb, &key).await;
    assert_eq!(
        info.url,
        format!("http://{}.tunnels.example:{}", info.name, host.http_port)
    );
    let _client = host
        .ssh(&sb, &key)
        .args(["-N", "-R", &format!("80:127.0.0.1:{}", backend.port)])
        .spawn();
    let client = http_client();
    let body = eventually(WAIT, "tunnel on the configured domain", || async {
        let res = client
            .get(host.url("/whoami"))
            .header(
                "host",
                format!("{}.tunnels.example:{}", info.name, host.http_port),
            )
            .send()
            .await
            .ok()?;
        if res.status() != 200 {
            return None;
        }
        res.text().await.ok()
    })
    .await;
    assert_eq!(body, "frank-backend");
    // The default domain is not served by this host.
    assert_eq!(host.whoami(&info.name).await.0, 404);
}
