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
    // The client can exit before the host has dropped the session it just closed.
    eventually(WAIT, "the key to have no session left", || async {
        let (status, _) = call(&host, Method::DELETE, &format!("keys/{fp}"), None).await;
        (status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
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

/// The sum of the samples of metric `name` whose labels include every `label="value"` in
/// `labels` (in any order).
fn total(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (set, value) = match rest.strip_prefix('{') {
                Some(rest) => rest.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let parts: Vec<&str> = set.split(',').collect();
            labels
                .iter()
                .all(|l| parts.contains(l))
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
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
        (sample(&text, r#"p0rt_bans_active{kind="address"}"#) == 1.0).then_some(text)
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

/// Plugin decisions (the bundled rate limiter's denials), a trapping plugin's failures and
/// the fallback that answered instead, cache operations in memory and scan jobs by state,
/// all after real traffic through a real `ssh -R` tunnel.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_plugin_decisions_failures_cache_and_scans() {
    use crate::plugins::{bundled, client_from, fixture, install, plugins_dir, read};
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    // The bundled rate limiter, 2 requests a minute per address; the hostile fixture as the
    // naming plugin, trapping on every call.
    install(
        &dir,
        "ratelimit",
        &read(&bundled("ratelimit.wasm")),
        Some(json!({ "config": {
            "per_ip": { "limit": 2, "window_seconds": 60 },
            "per_tunnel": { "limit": 0, "window_seconds": 60 },
            "per_key": { "limit": 0, "window_seconds": 60 },
        }})),
    );
    install(
        &dir,
        "hostile",
        &read(&fixture("fixture_hostile.wasm")),
        Some(json!({ "role": "naming", "config": { "mode": "trap" } })),
    );
    let config = HostConfig::flags(&sb.data_dir())
        .arg("--plugins-dir")
        .arg(dir.to_string_lossy())
        .env("ADMIN_TOKEN", TOKEN);
    let host = Host::start_with(&sb, config).await;
    let backend = Backend::start("admin-plugin-metrics").await;
    let alice = sb.key("alice");
    eventually(WAIT, "both plugins to be active", || async {
        let (_, list) = call(&host, Method::GET, "plugins", None).await;
        let names: Vec<String> = list["plugins"]
            .as_array()?
            .iter()
            .filter(|p| p["active"] == true)
            .map(|p| p["name"].as_str().unwrap_or("").to_string())
            .collect();
        (names.iter().any(|n| n == "ratelimit") && names.iter().any(|n| n == "hostile"))
            .then_some(())
    })
    .await;
    let (_, before) = scrape(&host, Some(TOKEN)).await;
    // The naming plugin traps: the key still gets the built-in name.
    let (_client, name) = host.tunnel(&sb, &alice, &backend).await;

    let decisions = "p0rt_plugin_decisions_total";
    let deny = [
        r#"role="rate-limit""#,
        r#"plugin="ratelimit""#,
        r#"verdict="deny""#,
    ];
    let allow = [
        r#"role="rate-limit""#,
        r#"plugin="ratelimit""#,
        r#"verdict="allow""#,
    ];
    // 8 requests from one address over a limit of 2: at least one is denied even if the
    // minute rolls over in between. (A plugin call that misses its deadline on a busy
    // machine falls back to the built-in limiter, which admits: then the next address.)
    let mut after = String::new();
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let client = client_from(ip);
        let mut statuses = Vec::new();
        for _ in 0..8 {
            let res = client
                .get(host.url("/whoami"))
                .header(reqwest::header::HOST, host.host_header(&name))
                .send()
                .await
                .unwrap();
            statuses.push(res.status().as_u16());
        }
        after = scrape(&host, Some(TOKEN)).await.1;
        if statuses.contains(&429) {
            break;
        }
    }
    assert!(
        total(&after, decisions, &deny) >= 1.0,
        "no rate-limit denial counted:\n{after}"
    );
    assert!(
        total(&after, decisions, &allow) >= total(&before, decisions, &allow) + 2.0,
        "{after}"
    );
    // The trapping naming plugin: failures by role, plugin and reason; the fallback by role.
    let trap = [
        r#"role="naming""#,
        r#"plugin="hostile""#,
        r#"reason="trap""#,
    ];
    assert!(
        total(&after, "p0rt_plugin_failures_total", &trap) >= 1.0,
        "{after}"
    );
    assert!(
        total(
            &after,
            "p0rt_plugin_fallbacks_total",
            &[r#"role="naming""#, r#"reason="trap""#]
        ) >= 1.0,
        "{after}"
    );
    // GET plugins has the same counts per plugin, and when each loaded.
    let (_, plugins) = call(&host, Method::GET, "plugins", None).await;
    let entry = |name: &str| {
        plugins["plugins"]
            .as_array()
            .and_then(|l| l.iter().find(|p| p["name"] == name).cloned())
            .unwrap_or_else(|| panic!("{name} in {plugins}"))
    };
    let (ratelimit, hostile) = (entry("ratelimit"), entry("hostile"));
    assert!(ratelimit["decisions"].as_u64().unwrap() >= 3, "{ratelimit}");
    assert!(
        ratelimit["loaded_at"].as_i64().unwrap() > 1_600_000_000,
        "{ratelimit}"
    );
    assert!(hostile["failures"].as_u64().unwrap() >= 1, "{hostile}");
    // The rate limiter counts in the cache, which is memory here.
    let memory = [r#"backend="memory""#];
    let ops = "p0rt_cache_operations_total";
    assert!(
        total(&after, ops, &memory) > total(&before, ops, &memory),
        "{after}"
    );
    assert_eq!(total(&after, ops, &[r#"backend="redis""#]), 0.0, "{after}");

    // A scan of the key's tunnel: queued, running, then a final state.
    let out = host.ssh(&sb, &alice).command("scan --json").output().await;
    assert!(out.status.success(), "{}\n{}", out.stdout, host.log());
    let scans = "p0rt_scan_jobs_total";
    let text = eventually(WAIT, "the scan job to be counted as finished", || async {
        let (_, text) = scrape(&host, Some(TOKEN)).await;
        let finished: f64 = ["done", "failed"]
            .iter()
            .map(|s| total(&text, scans, &[&format!("state=\"{s}\"")]))
            .sum();
        (finished >= 1.0).then_some(text)
    })
    .await;
    assert!(total(&text, scans, &[r#"state="queued""#]) >= 1.0, "{text}");
    assert!(
        total(&text, scans, &[r#"state="running""#]) >= 1.0,
        "{text}"
    );
    assert!(
        total(
            &text,
            decisions,
            &[r#"role="scan-admission""#, r#"verdict="accept""#]
        ) >= 1.0,
        "{text}"
    );
    // Labels stay bounded: never a tunnel name, key or address.
    assert!(!text.contains(&name), "{text}");
    assert!(!text.contains("127.0.0.2"), "{text}");
}

/// On a host whose cache is Redis, cache operations are counted for the redis backend.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_cache_operations_on_redis() {
    crate::redis_support::require_redis();
    let redis = crate::redis_support::RedisServer::start().await;
    let sb = Sandbox::new();
    let config = HostConfig::flags(&sb.data_dir())
        .env("REDIS_URL", redis.url())
        .env("STORAGE_TYPE", "json")
        .env("ADMIN_TOKEN", TOKEN);
    let host = Host::start_with(&sb, config).await;
    let backend = Backend::start("admin-redis-metrics").await;
    let alice = sb.key("alice");
    // The cache goes to Redis once its health checker has seen it answer.
    eventually(WAIT, "the cache to use redis", || async {
        let (_, status) = call(&host, Method::GET, "status", None).await;
        (status["redis"]["status"] == "healthy").then_some(())
    })
    .await;
    let (_client, name) = host.tunnel(&sb, &alice, &backend).await;
    let ops = "p0rt_cache_operations_total";
    let text = eventually(WAIT, "cache operations on redis", || async {
        assert_eq!(host.whoami(&name).await.0, 200);
        let (_, text) = scrape(&host, Some(TOKEN)).await;
        (total(&text, ops, &[r#"backend="redis""#]) >= 1.0).then_some(text)
    })
    .await;
    assert_eq!(sample(&text, "p0rt_redis_enabled"), 1.0, "{text}");
    assert_eq!(sample(&text, "p0rt_redis_healthy"), 1.0, "{text}");
}

/// A fingerprint as the admin API's path takes it (percent-encoded).
fn encoded(fingerprint: &str) -> String {
    fingerprint
        .replace(':', "%3A")
        .replace('+', "%2B")
        .replace('/', "%2F")
}

/// `p0rt security bans` (offline, on the store of `data_dir` and `env`): its table, and its
/// `--json` parsed.
async fn security_bans(data_dir: &std::path::Path, env: &[(&str, &str)]) -> (String, Value) {
    let mut out = Vec::new();
    for args in [&["bans"][..], &["bans", "--json"]] {
        let (code, stdout, stderr) = p0rt_security(data_dir, env, args).await;
        assert_eq!(code, Some(0), "p0rt security {args:?}: {stdout}{stderr}");
        out.push(stdout);
    }
    let all = serde_json::from_str(&out[1])
        .unwrap_or_else(|e| panic!("p0rt security bans --json is not JSON ({e}): {}", out[1]));
    (out.swap_remove(0), all)
}

/// Name bans: a live tunnel on the name is closed, the name answers 410, `ssh -R` for it is
/// refused, and lifting the ban restores it.
#[tokio::test(flavor = "multi_thread")]
async fn a_banned_name_is_closed_refused_and_answers_410_until_unbanned() {
    let sb = Sandbox::new();
    let host = host_with_token(&sb).await;
    let backend = Backend::start("admin-name-ban").await;
    let (alice, bob) = (sb.key("alice"), sb.key("bob"));
    let (mut a_client, a_name) = host.tunnel(&sb, &alice, &backend).await;
    let (_b_client, b_name) = host.tunnel(&sb, &bob, &backend).await;

    let (status, body) = call(
        &host,
        Method::POST,
        &format!("bans/names/{a_name}"),
        Some(json!({"reason": "phishing page"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["ban"]["name"], a_name.as_str(), "{body}");
    assert_eq!(body["ban"]["until"], Value::Null, "{body}");
    // Its only tunnel closed, the connection ends, telling the owner why.
    a_client.wait_exit().await;
    assert!(
        a_client.stderr().contains("banned") || host.log().contains("the name is banned"),
        "{}",
        a_client.stderr()
    );
    let (_, list) = call(&host, Method::GET, "tunnels", None).await;
    assert!(tunnel_entry(&list, &a_name).is_none(), "{list}");
    // The host log has a line for the tunnel closing, with the reason, and one for the
    // connection it ended, with its key.
    let log = crate::plugins::wait_log(
        &host,
        &format!("tunnel {a_name} down: the name is banned (phishing page)"),
    )
    .await;
    let key_line = format!("(key {}) ", alice.fingerprint());
    let log = if log.contains(&key_line) {
        log
    } else {
        crate::plugins::wait_log(&host, &key_line).await
    };
    assert!(log.contains(&format!("tunnel {a_name} up")), "{log}");
    let res = host.get(&a_name, "/whoami").await;
    assert_eq!(res.status(), 410);
    let text = res.text().await.unwrap();
    assert!(text.contains("banned"), "{text}");
    // Other names are served.
    assert_eq!(host.whoami(&b_name).await.0, 200);

    // ssh -R for the name is refused, with the reason in the host's log.
    let out = host
        .ssh(&sb, &alice)
        .args(["-N", "-R", &format!("80:127.0.0.1:{}", backend.port)])
        .output()
        .await;
    assert!(!out.status.success(), "-R for a banned name was accepted");
    assert!(
        out.stderr.contains("remote port forwarding failed"),
        "{}",
        out.stderr
    );
    crate::plugins::wait_log(
        &host,
        &format!("refused -R 80: {a_name} is banned on this host by its operator (phishing page)"),
    )
    .await;

    let (_, bans) = call(&host, Method::GET, "bans", None).await;
    assert_eq!(bans["names"][0]["name"], a_name.as_str(), "{bans}");
    assert_eq!(bans["names"][0]["reason"], "phishing page", "{bans}");
    let (_, metrics) = scrape(&host, Some(TOKEN)).await;
    assert_eq!(
        sample(&metrics, r#"p0rt_bans_active{kind="name"}"#),
        1.0,
        "{metrics}"
    );
    assert!(!metrics.contains(&a_name), "{metrics}");
    // `p0rt security bans`, offline on the same store, lists it beside the addresses.
    let (text, all) = security_bans(host.data_dir(), &[]).await;
    assert!(
        text.contains("no addresses are banned")
            && text.contains(&a_name)
            && text.contains("phishing page")
            && text.contains("no keys are banned"),
        "{text}"
    );
    assert_eq!(all["names"][0]["name"], a_name.as_str(), "{all}");
    assert_eq!(all["names"][0]["until"], Value::Null, "{all}");
    assert_eq!(
        (&all["addresses"], &all["keys"]),
        (&json!([]), &json!([])),
        "{all}"
    );

    // Bad input.
    for (path, body) in [
        ("bans/names/Bad_Name", json!({})),
        (
            &format!("bans/names/{b_name}") as &str,
            json!({"seconds": 0}),
        ),
        ("bans/names/x", json!({"seconds": 999_999_999u64})),
    ] {
        let (status, answer) = call(&host, Method::POST, path, Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {answer}");
    }

    // Lifted: the name serves again.
    let (status, _) = call(&host, Method::DELETE, &format!("bans/names/{a_name}"), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&host, Method::DELETE, &format!("bans/names/{a_name}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_again, name) = host.tunnel(&sb, &alice, &backend).await;
    assert_eq!(name, a_name);
    assert_eq!(host.whoami(&a_name).await.0, 200);
}

/// Key bans: the key's session is closed and its next login refused with a message; other
/// keys are unaffected; a ban by key hash works too; lifting it lets the key in again.
#[tokio::test(flavor = "multi_thread")]
async fn a_banned_key_is_disconnected_and_refused_until_unbanned() {
    let sb = Sandbox::new();
    let host = host_with_token(&sb).await;
    let backend = Backend::start("admin-key-ban").await;
    let (alice, bob, carol) = (sb.key("alice"), sb.key("bob"), sb.key("carol"));
    let (mut a_client, _a_name) = host.tunnel(&sb, &alice, &backend).await;
    let (_b_client, b_name) = host.tunnel(&sb, &bob, &backend).await;
    let (mut c_client, _c_name) = host.tunnel(&sb, &carol, &backend).await;

    let fp = alice.fingerprint();
    let (status, body) = call(
        &host,
        Method::POST,
        &format!("bans/keys/{}", encoded(&fp)),
        Some(json!({"seconds": 3600, "reason": "spam"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["ban"]["key"], fp.as_str(), "{body}");
    assert!(body["ban"]["until"].as_i64().is_some(), "{body}");
    a_client.wait_exit().await;
    assert!(
        a_client.stderr().contains("is banned on this host"),
        "{}",
        a_client.stderr()
    );
    let out = host.ssh(&sb, &alice).command("info").output().await;
    assert!(
        !out.status.success(),
        "a banned key logged in: {}",
        out.stdout
    );
    assert!(
        out.stderr.contains(&format!(
            "key {fp} is banned on this host by its operator (spam)"
        )),
        "{}",
        out.stderr
    );
    // Bob is unaffected.
    assert_eq!(host.whoami(&b_name).await.0, 200);
    assert!(
        host.ssh(&sb, &bob)
            .command("info")
            .output()
            .await
            .status
            .success()
    );

    // By key hash.
    let hash = carol.key_hash();
    let (status, body) = call(&host, Method::POST, &format!("bans/keys/{hash}"), None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    c_client.wait_exit().await;
    assert!(
        !host
            .ssh(&sb, &carol)
            .command("info")
            .output()
            .await
            .status
            .success()
    );

    let (_, bans) = call(&host, Method::GET, "bans", None).await;
    assert_eq!(bans["keys"].as_array().map(Vec::len), Some(2), "{bans}");
    let (_, metrics) = scrape(&host, Some(TOKEN)).await;
    assert_eq!(
        sample(&metrics, r#"p0rt_bans_active{kind="key"}"#),
        2.0,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            r#"p0rt_ssh_auth_failures_total{reason="key_banned"}"#
        ) >= 2.0,
        "{metrics}"
    );
    for bad in ["bans/keys/nope", "bans/keys/SHA256%3Ashort"] {
        let (status, answer) = call(&host, Method::POST, bad, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {answer}");
    }

    // The CLI lists and lifts them.
    let (ok, out, err) = admin_cli(&host, Some(TOKEN), &["bans"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("key {fp}")) && out.contains("spam"),
        "{out}"
    );
    let (ok, out, err) = admin_cli(&host, Some(TOKEN), &["unban-key", &fp]).await;
    assert!(ok, "{err}");
    assert_eq!(out, format!("{fp}: ban lifted\n"));
    let (ok, _, err) = admin_cli(&host, Some(TOKEN), &["unban-key", &hash]).await;
    assert!(ok, "{err}");
    let out = host.ssh(&sb, &alice).command("info").output().await;
    assert!(out.status.success(), "{}", out.stderr);
    let (ok, out, err) = admin_cli(
        &host,
        Some(TOKEN),
        &["ban-name", "cli-banned", "--reason", "x"],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "cli-banned: banned until lifted\n");
    let (ok, _, err) = admin_cli(&host, Some(TOKEN), &["unban-name", "cli-banned"]).await;
    assert!(ok, "{err}");
}

/// `metrics.listen`: `/metrics` alone on its own address, to the same callers.
#[tokio::test]
async fn a_separate_metrics_listener_serves_only_metrics() {
    let sb = Sandbox::new();
    let port = free_port();
    let config = HostConfig::flags(&sb.data_dir())
        .env("ADMIN_TOKEN", TOKEN)
        .env("METRICS_LISTEN", format!("127.0.0.1:{port}"));
    let host = Host::start_with(&sb, config).await;
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let res = http_client().get(url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = http_client()
        .get(url("/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let text = res.text().await.unwrap();
    assert_eq!(sample(&text, "p0rt_tunnels_live"), 0.0, "{text}");
    assert_eq!(sample(&text, "p0rt_redis_enabled"), 0.0, "{text}");
    assert!(text.contains("p0rt_bans_active"), "{text}");
    let res = http_client()
        .get(url("/api/v1/status"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    // The base domain's /metrics still answers.
    assert_eq!(scrape(&host, Some(TOKEN)).await.0, StatusCode::OK);
    assert!(
        host.log()
            .contains(&format!("metrics listening on 127.0.0.1:{port}"))
    );

    let bad = HostConfig::flags(&sb.data_dir()).env("METRICS_LISTEN", "nope");
    let (code, stderr) = run_host_to_exit(&sb, &bad, WAIT).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("METRICS_LISTEN"), "{stderr}");
}

/// The Redis of the name-ban tests: one server, or a three-master Cluster.
enum BanRedis {
    One(crate::redis_support::RedisServer),
    Cluster(crate::redis_support::RedisCluster),
}

impl BanRedis {
    async fn start(cluster: bool) -> BanRedis {
        crate::redis_support::require_redis();
        if cluster {
            BanRedis::Cluster(crate::redis_support::RedisCluster::start().await)
        } else {
            BanRedis::One(crate::redis_support::RedisServer::start().await)
        }
    }

    fn url(&self) -> String {
        match self {
            BanRedis::One(redis) => redis.url(),
            BanRedis::Cluster(cluster) => cluster.url(),
        }
    }

    /// A host on this Redis with the admin token, storing its names in `storage` (`json`
    /// or `redis`); its sandbox with it.
    async fn host(&self, storage: &str) -> (Sandbox, Host) {
        let sb = Sandbox::new();
        let config = HostConfig::flags(&sb.data_dir())
            .env("REDIS_URL", self.url())
            .env("STORAGE_TYPE", storage)
            .env("ADMIN_TOKEN", TOKEN);
        let host = Host::start_with(&sb, config).await;
        (sb, host)
    }

    /// `cmd` about `key`, on the node that serves it.
    async fn query<T: redis::FromRedisValue>(&self, key: &str, cmd: &redis::Cmd) -> T {
        match self {
            BanRedis::One(redis) => cmd
                .query_async(&mut redis.client().await)
                .await
                .unwrap_or_else(|e| panic!("{key}: {e}")),
            BanRedis::Cluster(cluster) => cluster.query(key, cmd).await,
        }
    }

    /// Calls of `command` answered since the start, over every node (`INFO commandstats`).
    async fn calls(&self, command: &str) -> u64 {
        let mut clients = Vec::new();
        match self {
            BanRedis::One(redis) => clients.push(redis.client().await),
            BanRedis::Cluster(cluster) => {
                for node in cluster.nodes() {
                    clients.push(cluster.node_client(node).await);
                }
            }
        }
        let mut calls = 0;
        for mut client in clients {
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut client)
                .await
                .unwrap();
            calls += info
                .lines()
                .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
                .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
        calls
    }
}

/// On Redis, a host reads the name and key bans in full only when their change counter
/// moved: an idle host sends no HGETALL, and a change counted there reaches it. Bans that
/// ended are deleted from Redis on the operator's next ban, while an entry p0rt cannot read
/// is left alone; `p0rt security bans` lists them offline.
async fn name_bans_on(redis: BanRedis) {
    const HASH: &str = "p0rt:name-bans";
    let ended = json!({"target": "ended-name", "since": 1, "until": 2, "reason": "old"});
    for (field, value) in [
        ("ended-name", ended.to_string()),
        ("not-ours", "written by someone else".to_string()),
    ] {
        redis
            .query::<()>(HASH, redis::cmd("HSET").arg(HASH).arg(field).arg(value))
            .await;
    }
    let (sb, host) = redis.host("json").await;

    // Idle: the host polls the counter (every 2 s) but reads no hash.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let (reads, polls) = (redis.calls("hgetall").await, redis.calls("get").await);
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert_eq!(
        redis.calls("hgetall").await,
        reads,
        "an idle host re-read the bans"
    );
    assert!(
        redis.calls("get").await >= polls + 2,
        "the host stopped polling the change counter"
    );

    // A ban written by another host (the hash, then the counter) reaches this one.
    assert_eq!(host.get("typed-name", "/").await.status(), 404);
    let ban = json!({"target": "typed-name", "since": 1, "until": null, "reason": "elsewhere"});
    redis
        .query::<()>(
            HASH,
            redis::cmd("HSET")
                .arg(HASH)
                .arg("typed-name")
                .arg(ban.to_string()),
        )
        .await;
    let counter = "p0rt:identity-bans-version";
    redis
        .query::<()>(counter, redis::cmd("INCR").arg(counter))
        .await;
    eventually(WAIT, "the counted ban to hold on the host", || async {
        (host.get("typed-name", "/").await.status() == 410).then_some(())
    })
    .await;

    // The operator's next ban deletes the ended one and keeps the rest.
    let (status, body) = call(&host, Method::POST, "bans/names/fresh-name", None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let stored: std::collections::HashMap<String, String> =
        redis.query(HASH, redis::cmd("HGETALL").arg(HASH)).await;
    let mut fields: Vec<&str> = stored.keys().map(String::as_str).collect();
    fields.sort();
    assert_eq!(
        fields,
        ["fresh-name", "not-ours", "typed-name"],
        "{stored:?}"
    );
    assert_eq!(stored["not-ours"], "written by someone else");
    let (_, bans) = call(&host, Method::GET, "bans", None).await;
    let names: Vec<&str> = bans["names"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["name"].as_str())
        .collect();
    assert_eq!(names, ["fresh-name", "typed-name"], "{bans}");

    // Offline, on the same Redis.
    let url = redis.url();
    let (_, all) = security_bans(
        sb.data_dir().as_path(),
        &[("STORAGE_TYPE", "json"), ("REDIS_URL", url.as_str())],
    )
    .await;
    assert_eq!(all["names"], bans["names"], "{all}");

    // The limit counts names and keys together, as on the file store (each host holds
    // both): with the key hash filled up to it, no further name ban is taken.
    const KEYS_HASH: &str = "p0rt:key-bans";
    let room = p0rt::bans::identity::MAX_IDENTITY_BANS - stored.len();
    let mut fill = redis::cmd("HSET");
    fill.arg(KEYS_HASH);
    for i in 0..room {
        let key = format!("{i:064x}");
        let ban = json!({"target": key, "since": 1, "until": null, "reason": "fill"});
        fill.arg(key).arg(ban.to_string());
    }
    redis.query::<()>(KEYS_HASH, &fill).await;
    let (status, body) = call(&host, Method::POST, "bans/names/one-too-many", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.to_string().contains("lift some first"), "{body}");
    redis
        .query::<()>(KEYS_HASH, redis::cmd("DEL").arg(KEYS_HASH))
        .await;
    let (status, body) = call(&host, Method::POST, "bans/names/one-too-many", None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn name_bans_on_redis_are_read_when_they_change_and_ended_ones_are_deleted() {
    name_bans_on(BanRedis::start(false).await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn name_bans_on_redis_cluster_are_read_when_they_change_and_ended_ones_are_deleted() {
    name_bans_on(BanRedis::start(true).await).await;
}

/// On Redis, the metrics count address bans from their index, not by scanning every key at
/// each scrape; a ban an older version made (a record, no index entry) is counted after the
/// first scrape fills the index, once; the listing shows every ban.
async fn address_ban_metrics_on(redis: BanRedis) {
    let old = json!({"ip": "192.0.2.9", "since": 1, "until": 4_000_000_000i64, "failures": 3, "reason": "old"});
    let key = "p0rt:ban:192.0.2.9";
    redis
        .query::<()>(
            key,
            redis::cmd("SET")
                .arg(key)
                .arg(old.to_string())
                .arg("EX")
                .arg(600),
        )
        .await;
    let (_sb, host) = redis.host("redis").await;
    let count = || async {
        let (status, text) = scrape(&host, Some(TOKEN)).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        sample(&text, r#"p0rt_bans_active{kind="address"}"#)
    };
    assert_eq!(count().await, 1.0, "the older ban is counted");
    let scans = redis.calls("scan").await;
    for ip in ["192.0.2.10", "192.0.2.11"] {
        let (status, body) = call(
            &host,
            Method::POST,
            &format!("bans/addresses/{ip}"),
            Some(json!({"seconds": 600})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    assert_eq!(count().await, 3.0);
    let (status, _) = call(&host, Method::DELETE, "bans/addresses/192.0.2.10", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(count().await, 2.0);
    for _ in 0..3 {
        count().await;
    }
    assert_eq!(
        redis.calls("scan").await,
        scans,
        "a scrape scanned the keys"
    );
    let (_, bans) = call(&host, Method::GET, "bans", None).await;
    let listed: Vec<&str> = bans["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["ip"].as_str())
        .collect();
    assert_eq!(listed, ["192.0.2.11", "192.0.2.9"], "{bans}");
}

#[tokio::test(flavor = "multi_thread")]
async fn address_bans_are_counted_without_scanning_redis() {
    address_ban_metrics_on(BanRedis::start(false).await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn address_bans_are_counted_without_scanning_a_redis_cluster() {
    address_ban_metrics_on(BanRedis::start(true).await).await;
}

/// On Redis, name and key bans are shared: a ban made through one host holds on another
/// host on the same Redis within moments.
#[tokio::test(flavor = "multi_thread")]
async fn name_and_key_bans_are_shared_by_hosts_on_one_redis() {
    crate::redis_support::require_redis();
    let redis = crate::redis_support::RedisServer::start().await;
    let (sb_a, sb_b) = (Sandbox::new(), Sandbox::new());
    let on_redis = |sb: &Sandbox| {
        HostConfig::flags(&sb.data_dir())
            .env("REDIS_URL", redis.url())
            .env("STORAGE_TYPE", "json")
            .env("ADMIN_TOKEN", TOKEN)
    };
    let a = Host::start_with(&sb_a, on_redis(&sb_a)).await;
    let b = Host::start_with(&sb_b, on_redis(&sb_b)).await;
    let backend = Backend::start("admin-shared-bans").await;
    let (alice, bob) = (sb_b.key("alice"), sb_b.key("bob"));
    let (mut a_client, a_name) = b.tunnel(&sb_b, &alice, &backend).await;
    let (_b_client, b_name) = b.tunnel(&sb_b, &bob, &backend).await;

    // Banned through host A, enforced by host B.
    let (status, body) = call(
        &a,
        Method::POST,
        &format!("bans/names/{a_name}"),
        Some(json!({"reason": "shared"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    a_client.wait_exit().await;
    eventually(WAIT, "host B to answer 410 for the banned name", || async {
        (b.get(&a_name, "/whoami").await.status() == 410).then_some(())
    })
    .await;
    let fp = bob.fingerprint();
    let (status, _) = call(
        &a,
        Method::POST,
        &format!("bans/keys/{}", encoded(&fp)),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    b.wait_status(&b_name, 503).await;
    let out = b.ssh(&sb_b, &bob).command("info").output().await;
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("is banned on this host"),
        "{}",
        out.stderr
    );
    // Both hosts list them; lifted through host B, host A sees them gone.
    let (_, bans) = call(&b, Method::GET, "bans", None).await;
    assert_eq!(bans["names"][0]["name"], a_name.as_str(), "{bans}");
    assert_eq!(bans["keys"][0]["key"], fp.as_str(), "{bans}");
    let (status, _) = call(&b, Method::DELETE, &format!("bans/names/{a_name}"), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(
        &b,
        Method::DELETE,
        &format!("bans/keys/{}", encoded(&fp)),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, bans) = call(&a, Method::GET, "bans", None).await;
    assert_eq!(
        (&bans["names"], &bans["keys"]),
        (&json!([]), &json!([])),
        "{bans}"
    );
    assert!(
        b.ssh(&sb_b, &bob)
            .command("info")
            .output()
            .await
            .status
            .success()
    );
}
