//! The admin API (`/api/v1/`) through the real binary, with real OpenSSH tunnels: who may
//! call it (token by `Authorization: Bearer` or `X-API-Key`; loopback only without one),
//! live tunnels with counters that move, disconnecting a tunnel and a key, paged domains,
//! reservations, address bans, plugins, scans, and the refusals (bad input, big bodies,
//! unknown resources, wrong methods, a tunnel's name never serving it).
//!
//! The loopback-only rule for a non-loopback peer cannot be produced here (tests talk to
//! loopback only); it is tested at unit level in `host/src/admin/mod.rs`.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::*;

/// An admin token long enough for the host's check.
const TOKEN: &str = "admin-token-0123456789";

/// A request to `/api/v1/{path}` on the base domain.
fn api(host: &Host, method: Method, path: &str) -> reqwest::RequestBuilder {
    http_client()
        .request(method, host.url(&format!("/api/v1/{path}")))
        .header(
            reqwest::header::HOST,
            format!("localhost:{}", host.http_port),
        )
}

/// Status and JSON body of an admin call with the token.
async fn call(host: &Host, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let mut req = api(host, method, path).bearer_auth(TOKEN);
    if let Some(body) = body {
        req = req
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
    }
    let res = req.send().await.expect("admin request");
    (res.status(), res.json_value().await)
}

async fn host_with_token(sb: &Sandbox) -> Host {
    Host::start_with(
        sb,
        HostConfig::flags(&sb.data_dir()).env("ADMIN_TOKEN", TOKEN),
    )
    .await
}

fn tunnel_entry<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["tunnels"]
        .as_array()?
        .iter()
        .find(|t| t["name"] == name)
}

#[tokio::test]
async fn the_admin_api_wants_the_token_from_everyone() {
    let sb = Sandbox::new();
    let host = host_with_token(&sb).await;

    let none = api(&host, Method::GET, "status").send().await.unwrap();
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    assert!(none.headers().contains_key("www-authenticate"));
    let body = none.json_value().await;
    assert!(
        body["error"].as_str().unwrap().contains("ADMIN_TOKEN"),
        "{body}"
    );

    for (header, value) in [
        ("authorization", format!("Bearer {TOKEN}x")),
        ("authorization", "Bearer admin".to_string()),
        ("authorization", format!("Basic {TOKEN}")),
        ("x-api-key", "wrong".to_string()),
    ] {
        let res = api(&host, Method::GET, "tunnels")
            .header(header, value.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{header}: {value}");
        assert!(res.json_value().await["error"].is_string());
    }

    // Both ways of presenting it work.
    let (status, body) = call(&host, Method::GET, "status", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(body["store"], "json");
    assert_eq!(body["cache"], "memory");
    assert_eq!(body["redis"]["status"], "disabled");
    assert_eq!(body["admin_token_set"], true);
    let res = api(&host, Method::GET, "status")
        .header("x-api-key", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn without_a_token_the_admin_api_answers_direct_loopback_clients_only() {
    let sb = Sandbox::new();
    let host = Host::start(&sb).await;
    let res = api(&host, Method::GET, "status").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json_value().await["admin_token_set"], false);
    // Through a proxy on the same machine every visitor would look local: refused.
    for header in ["x-forwarded-for", "forwarded", "x-real-ip"] {
        let res = api(&host, Method::GET, "status")
            .header(header, "203.0.113.9")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{header}");
        let body = res.json_value().await;
        assert!(
            body["error"].as_str().unwrap().contains("set ADMIN_TOKEN"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn live_tunnels_show_moving_counters_and_can_be_disconnected() {
    let sb = Sandbox::new();
    let host = host_with_token(&sb).await;
    let backend = Backend::start("admin-a").await;
    let (alice, bob) = (sb.key("alice"), sb.key("bob"));
    let (mut a_client, a_name) = host.tunnel(&sb, &alice, &backend).await;
    let (mut b_client, b_name) = host.tunnel(&sb, &bob, &backend).await;

    let (status, list) = call(&host, Method::GET, "tunnels", None).await;
    assert_eq!(status, StatusCode::OK);
    let entry = tunnel_entry(&list, &a_name).unwrap_or_else(|| panic!("{a_name} in {list}"));
    assert_eq!(entry["fingerprint"], alice.fingerprint());
    assert!(
        entry["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{entry}"
    );
    assert!(entry["since"].as_i64().unwrap() > 1_600_000_000);
    let before = entry["requests"].as_u64().unwrap();
    let bytes_before = entry["bytes_out"].as_u64().unwrap();

    for _ in 0..3 {
        let res = host.get(&a_name, "/bytes/1000").await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.bytes().await.unwrap().len(), 1000);
    }
    let (_, list) = call(&host, Method::GET, "tunnels", None).await;
    let entry = tunnel_entry(&list, &a_name).unwrap();
    assert_eq!(entry["requests"].as_u64().unwrap(), before + 3, "{entry}");
    assert!(
        entry["bytes_out"].as_u64().unwrap() >= bytes_before + 3000,
        "{entry}"
    );

    // On a tunnel's name, /api/v1/ is the tunnel's own path, never the admin API.
    let hits = backend.hits();
    let res = http_client()
        .get(host.url("/api/v1/tunnels"))
        .header(reqwest::header::HOST, host.host_header(&a_name))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), "backend: no such path");
    assert_eq!(backend.hits(), hits + 1);

    // Disconnect one tunnel by name: its ssh ends, it is gone, its name is offline.
    let (status, body) = call(&host, Method::DELETE, &format!("tunnels/{a_name}"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["disconnected"], json!([a_name]));
    a_client.wait_exit().await;
    eventually(WAIT, "the tunnel to leave the list", || async {
        let (_, list) = call(&host, Method::GET, "tunnels", None).await;
        tunnel_entry(&list, &a_name).is_none().then_some(())
    })
    .await;
    host.wait_status(&a_name, 503).await;
    let (status, _) = call(&host, Method::DELETE, &format!("tunnels/{a_name}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Disconnect a key by fingerprint (its base64 percent-encoded, or as is).
    let fp = bob.fingerprint();
    let encoded = fp
        .replace(':', "%3A")
        .replace('+', "%2B")
        .replace('/', "%2F");
    let (status, body) = call(&host, Method::DELETE, &format!("keys/{encoded}"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["disconnected"], json!([b_name]));
    b_client.wait_exit().await;
    let (status, _) = call(&host, Method::DELETE, &format!("keys/{fp}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, status_body) = call(&host, Method::GET, "status", None).await;
    eventually(WAIT, "no tunnels in status", || async {
        let (_, s) = call(&host, Method::GET, "status", None).await;
        (s["tunnels"] == 0).then_some(())
    })
    .await;
    assert!(status_body["uptime_seconds"].is_u64());
}

#[tokio::test]
async fn domains_reservations_bans_plugins_and_scans() {
    let sb = Sandbox::new();
    let host = host_with_token(&sb).await;
    let (alice, bob) = (sb.key("alice"), sb.key("bob"));
    let a_name = host.info(&sb, &alice).await.name;
    let b_name = host.info(&sb, &bob).await.name;

    // Domains, paged and bounded.
    let (status, page) = call(&host, Method::GET, "domains?page=1&per_page=1", None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["total"], 2);
    assert_eq!(page["domains"].as_array().unwrap().len(), 1);
    let (_, page2) = call(&host, Method::GET, "domains?page=2&per_page=1", None).await;
    let mut names = vec![
        page["domains"][0]["domain"].as_str().unwrap().to_string(),
        page2["domains"][0]["domain"].as_str().unwrap().to_string(),
    ];
    names.sort();
    let mut expected = vec![a_name.clone(), b_name.clone()];
    expected.sort();
    assert_eq!(names, expected);
    let (_, past) = call(&host, Method::GET, "domains?page=9", None).await;
    assert_eq!(past["domains"], json!([]));
    for bad in [
        "domains?per_page=100000",
        "domains?page=0",
        "domains?page=x",
    ] {
        let (status, body) = call(&host, Method::GET, bad, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body["error"].is_string());
    }

    // Reservations.
    let fp = alice.fingerprint();
    let (status, body) = call(
        &host,
        Method::POST,
        "reservations/kept-name",
        Some(json!({"fingerprint": fp, "comment": "for alice"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (_, list) = call(&host, Method::GET, "reservations", None).await;
    assert_eq!(list["reservations"][0]["domain"], "kept-name");
    let (status, body) = call(
        &host,
        Method::POST,
        "reservations/kept-name",
        Some(json!({"fingerprint": bob.fingerprint()})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    for (path, body) in [
        (
            "reservations/kept-name",
            json!({"fingerprint": "SHA256:nope"}),
        ),
        ("reservations/kept-name", json!({})),
        (
            "reservations/kept-name",
            json!({"fingerprint": fp, "extra": 1}),
        ),
        ("reservations/Bad_Name", json!({"fingerprint": fp})),
    ] {
        let (status, answer) = call(&host, Method::POST, path, Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {answer}");
    }
    let big = "x".repeat(9000);
    let res = api(&host, Method::POST, "reservations/other")
        .bearer_auth(TOKEN)
        .body(format!("{{\"comment\": \"{big}\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let res = api(&host, Method::POST, "reservations/other")
        .bearer_auth(TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let (status, _) = call(&host, Method::DELETE, "reservations/kept-name", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&host, Method::DELETE, "reservations/kept-name", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Address bans: the operator's ban holds off SSH from that address; lifting it lets it in.
    let (status, body) = call(
        &host,
        Method::POST,
        "bans/addresses/127.0.0.9",
        Some(json!({"seconds": 600, "reason": "test"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (_, list) = call(&host, Method::GET, "bans", None).await;
    assert_eq!(list["addresses"][0]["ip"], "127.0.0.9", "{list}");
    let refused = host
        .ssh(&sb, &alice)
        .args(["-b", "127.0.0.9"])
        .command("info")
        .output()
        .await;
    assert!(!refused.status.success(), "a banned address got in");
    for (path, body) in [
        ("bans/addresses/not-an-ip", json!({})),
        ("bans/addresses/127.0.0.10", json!({"seconds": 0})),
        (
            "bans/addresses/127.0.0.10",
            json!({"seconds": 999_999_999u64}),
        ),
    ] {
        let (status, answer) = call(&host, Method::POST, path, Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {answer}");
    }
    let (status, _) = call(&host, Method::DELETE, "bans/addresses/127.0.0.9", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&host, Method::DELETE, "bans/addresses/127.0.0.9", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let allowed = host
        .ssh(&sb, &alice)
        .args(["-b", "127.0.0.9"])
        .command("info")
        .output()
        .await;
    assert!(allowed.status.success(), "{:?}", allowed.stderr);

    // Plugins, reload, scans.
    let (status, plugins) = call(&host, Method::GET, "plugins", None).await;
    assert_eq!(status, StatusCode::OK);
    let list = plugins["plugins"].as_array().unwrap();
    assert!(!list.is_empty(), "{plugins}");
    assert!(
        list.iter()
            .all(|p| p["sha256"].is_string() && p["role"].is_string())
    );
    let (status, _) = call(&host, Method::POST, "plugins/reload", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, scans) = call(&host, Method::GET, "scans", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(scans["jobs"], json!([]));

    // Unknown resources and wrong methods.
    let (status, body) = call(&host, Method::GET, "nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
    let res = api(&host, Method::PUT, "status")
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(res.headers()["allow"], "GET");
    let (status, _) = call(&host, Method::GET, "plugins/reload", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

/// The ```sh blocks of docs/api.md, in order.
fn documented_examples() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md"))
        .expect("docs/api.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), line) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "docs/api.md: an unclosed ```sh block");
    blocks
}

#[tokio::test]
async fn every_documented_curl_example_runs_against_a_live_host() {
    let examples = documented_examples();
    assert!(
        examples.len() >= 14,
        "only {} examples found",
        examples.len()
    );
    let sb = Sandbox::new();
    let host = host_with_token(&sb).await;
    let backend = Backend::start("admin-docs").await;
    let (alice, bob) = (sb.key("alice"), sb.key("bob"));
    let (mut a_client, a_name) = host.tunnel(&sb, &alice, &backend).await;
    let (mut b_client, _) = host.tunnel(&sb, &bob, &backend).await;
    for example in &examples {
        assert!(example.contains("curl "), "not a curl example: {example}");
        let script = example.replace("localhost:8080", &format!("localhost:{}", host.http_port));
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .env("ADMIN_TOKEN", TOKEN)
            .env("NAME", &a_name)
            .env("FINGERPRINT", bob.fingerprint())
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("all_proxy")
            .output()
            .await
            .expect("sh (install curl: apt-get install -y curl)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "documented example failed ({}):\n{example}\nstdout {stdout}\nstderr {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let answer: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{example}: answer is not JSON ({e}): {stdout}"));
        assert!(answer.get("error").is_none(), "{example}: {answer}");
    }
    // The last two examples disconnected both tunnels.
    a_client.wait_exit().await;
    b_client.wait_exit().await;
}

/// `p0rt admin <args…>` against `host`; (success, stdout, stderr).
async fn admin_cli(host: &Host, token: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("admin")
        .arg("--remote")
        .arg(format!("http://localhost:{}", host.http_port))
        .args(args)
        .env_remove("ADMIN_TOKEN")
        .env_remove("P0RT_REMOTE");
    if let Some(token) = token {
        cmd.env("ADMIN_TOKEN", token);
    }
    let out = cmd.output().await.expect("run p0rt admin");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn p0rt_admin_commands_call_the_api() {
    let sb = Sandbox::new();
    let host = host_with_token(&sb).await;
    let backend = Backend::start("admin-cli").await;
    let alice = sb.key("alice");
    let (mut client, name) = host.tunnel(&sb, &alice, &backend).await;

    let (ok, _, err) = admin_cli(&host, None, &["status"]).await;
    assert!(!ok);
    assert!(
        err.contains("401") && err.contains("export ADMIN_TOKEN"),
        "{err}"
    );
    let (ok, _, err) = admin_cli(&host, Some("wrong-token-0123456789"), &["status"]).await;
    assert!(!ok);
    assert!(err.contains("wrong admin token"), "{err}");

    let (ok, out, err) = admin_cli(&host, Some(TOKEN), &["status"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("tunnels: 1") && out.contains("store: json"),
        "{out}"
    );
    let (ok, out, _) = admin_cli(&host, Some(TOKEN), &["tunnels"]).await;
    assert!(ok);
    assert!(
        out.contains(&name) && out.contains(&alice.fingerprint()),
        "{out}"
    );
    let (ok, out, _) = admin_cli(&host, Some(TOKEN), &["tunnels", "--json"]).await;
    assert!(ok);
    let answer: Value = serde_json::from_str(&out).expect("--json answers JSON");
    assert_eq!(answer["tunnels"][0]["name"], name);

    let (ok, out, err) = admin_cli(
        &host,
        Some(TOKEN),
        &[
            "ban",
            "203.0.113.8",
            "--seconds",
            "60",
            "--reason",
            "cli test",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("203.0.113.8: banned until"), "{out}");
    let (_, out, _) = admin_cli(&host, Some(TOKEN), &["bans"]).await;
    assert!(
        out.contains("203.0.113.8") && out.contains("cli test"),
        "{out}"
    );
    let (ok, _, _) = admin_cli(&host, Some(TOKEN), &["unban", "203.0.113.8"]).await;
    assert!(ok);
    let (ok, _, err) = admin_cli(&host, Some(TOKEN), &["unban", "203.0.113.8"]).await;
    assert!(!ok && err.contains("404"), "{err}");

    let fp = alice.fingerprint();
    let (ok, out, err) = admin_cli(&host, Some(TOKEN), &["reserve", "cli-name", &fp]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "cli-name: reserved\n");
    let (_, out, _) = admin_cli(&host, Some(TOKEN), &["reservations"]).await;
    assert!(out.contains("cli-name") && out.contains(&fp), "{out}");
    let (ok, _, _) = admin_cli(&host, Some(TOKEN), &["release", "cli-name"]).await;
    assert!(ok);
    let (ok, out, _) = admin_cli(&host, Some(TOKEN), &["domains", "--per-page", "10"]).await;
    assert!(ok && out.contains(&name), "{out}");
    let (ok, out, _) = admin_cli(&host, Some(TOKEN), &["plugins"]).await;
    assert!(ok && out.contains("active"), "{out}");
    let (ok, _, _) = admin_cli(&host, Some(TOKEN), &["reload-plugins"]).await;
    assert!(ok);
    let (ok, out, _) = admin_cli(&host, Some(TOKEN), &["scans"]).await;
    assert!(ok && out.contains("0 scan jobs"), "{out}");

    let (ok, out, err) = admin_cli(&host, Some(TOKEN), &["disconnect-key", &fp]).await;
    assert!(ok, "{err}");
    assert_eq!(out, format!("disconnected {name}\n"));
    client.wait_exit().await;
    let (ok, _, err) = admin_cli(&host, Some(TOKEN), &["disconnect", &name]).await;
    assert!(!ok && err.contains("no live tunnel"), "{err}");
}

/// The value of the sample `name` (with its labels, as printed) in a Prometheus text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
        .unwrap_or(0.0)
}

async fn scrape(host: &Host, token: Option<&str>) -> (StatusCode, String) {
    let mut req = http_client().get(host.url("/metrics")).header(
        reqwest::header::HOST,
        format!("localhost:{}", host.http_port),
    );
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let res = req.send().await.expect("GET /metrics");
    (res.status(), res.text().await.unwrap())
}

#[tokio::test]
async fn metrics_move_when_requests_go_through_a_tunnel() {
    let sb = Sandbox::new();
    let host = host_with_token(&sb).await;
    let backend = Backend::start("admin-metrics").await;
    let alice = sb.key("alice");
    let (_client, name) = host.tunnel(&sb, &alice, &backend).await;

    let (status, _) = scrape(&host, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = scrape(&host, Some("wrong-token-0123456789")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, before) = scrape(&host, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sample(&before, "p0rt_tunnels_live"), 1.0, "{before}");
    assert!(
        sample(&before, "p0rt_ssh_connections_total") >= 2.0,
        "{before}"
    );
    assert_eq!(sample(&before, "p0rt_redis_enabled"), 0.0);

    for _ in 0..2 {
        assert_eq!(
            host.get(&name, "/bytes/5000")
                .await
                .bytes()
                .await
                .unwrap()
                .len(),
            5000
        );
    }
    assert_eq!(host.get(&name, "/missing").await.status(), 404);
    let (_, after) = scrape(&host, Some(TOKEN)).await;
    let two = r#"p0rt_http_requests_total{class="2xx"}"#;
    let four = r#"p0rt_http_requests_total{class="4xx"}"#;
    assert_eq!(sample(&after, two), sample(&before, two) + 2.0, "{after}");
    assert_eq!(sample(&after, four), sample(&before, four) + 1.0, "{after}");
    assert!(
        sample(&after, "p0rt_http_response_bytes_total")
            >= sample(&before, "p0rt_http_response_bytes_total") + 10_000.0,
        "{after}"
    );
    let count = "p0rt_http_request_duration_seconds_count";
    assert_eq!(
        sample(&after, count),
        sample(&before, count) + 3.0,
        "{after}"
    );
    // No per-name labels, ever.
    assert!(!after.contains(&name), "{after}");
}

#[tokio::test]
async fn metrics_count_refused_keys_and_bans() {
    let sb = Sandbox::new();
    let (good, bad) = (sb.key("good"), sb.key("bad"));
    let allowed = sb.join("authorized_keys");
    std::fs::write(&allowed, format!("{}\n", good.public)).unwrap();
    let config = HostConfig::flags(&sb.data_dir())
        .arg("--authorized-keys")
        .arg(allowed.to_string_lossy())
        .env("BAN_TIERS", "2:1h");
    let host = Host::start_with(&sb, config).await;
    for _ in 0..3 {
        let out = host
            .ssh(&sb, &bad)
            .args(["-b", "127.0.0.6"])
            .command("info")
            .output()
            .await;
        assert!(!out.status.success());
    }
    // Loopback without a token set: served.
    let text = eventually(WAIT, "the ban to show in the metrics", || async {
        let (status, text) = scrape(&host, None).await;
        assert_eq!(status, StatusCode::OK);
        (sample(&text, "p0rt_bans_active") == 1.0).then_some(text)
    })
    .await;
    assert!(
        sample(
            &text,
            r#"p0rt_ssh_auth_failures_total{reason="key_refused"}"#
        ) >= 2.0,
        "{text}"
    );
    assert!(
        sample(&text, r#"p0rt_ssh_auth_failures_total{reason="banned"}"#) >= 1.0,
        "{text}"
    );
}

#[tokio::test]
async fn ssh_stats_shows_the_keys_own_counters_and_help_what_it_may_do() {
    let sb = Sandbox::new();
    let host = Host::start(&sb).await;
    let backend = Backend::start("admin-stats").await;
    let (alice, bob) = (sb.key("alice"), sb.key("bob"));
    let (_a, a_name) = host.tunnel(&sb, &alice, &backend).await;
    let (_b, b_name) = host.tunnel(&sb, &bob, &backend).await;
    for _ in 0..2 {
        let body = host.get(&a_name, "/bytes/700").await.bytes().await.unwrap();
        assert_eq!(body.len(), 700);
    }

    let out = host.ssh(&sb, &alice).command("stats").output().await;
    assert!(out.status.success(), "{:?}", out.stderr);
    let text = strip_ansi(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(&a_name))
        .unwrap_or_else(|| panic!("{a_name} in {text:?}"));
    // wait_served's /whoami requests count too; the two downloads are at least 1400 B out.
    let requests: u64 = line
        .split("requests ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(requests >= 3, "{line}");
    let out_bytes: u64 = line
        .split("out ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(out_bytes >= 1400, "{line}");
    // Only the key's own tunnels.
    assert!(!text.contains(&b_name), "{text}");

    let out = host.ssh(&sb, &alice).command("help").output().await;
    assert!(out.status.success());
    assert!(out.stdout.contains("stats"), "{}", out.stdout);
    assert!(out.stdout.contains("this key: up to"), "{}", out.stdout);
    let out = host.ssh(&sb, &alice).command("stats extra").output().await;
    assert!(!out.status.success());
}

#[tokio::test]
async fn log_format_json_writes_one_json_object_per_line() {
    let sb = Sandbox::new();
    let config = HostConfig::flags(&sb.data_dir()).env("LOG_FORMAT", "json");
    let host = Host::start_with(&sb, config).await;
    let backend = Backend::start("admin-logs").await;
    let alice = sb.key("alice");
    let (_client, _name) = host.tunnel(&sb, &alice, &backend).await;
    let log = host.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{log}");
    for line in &lines {
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            value["level"].is_string() && value["fields"].is_object(),
            "{line}"
        );
    }
    assert!(log.contains("ssh edge listening"), "{log}");

    let bad = HostConfig::flags(&sb.data_dir()).env("LOG_FORMAT", "xml");
    let (code, stderr) = run_host_to_exit(&sb, &bad, WAIT).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("LOG_FORMAT") && stderr.contains("text or json"),
        "{stderr}"
    );
}
