//! Scan jobs end to end: `ssh … scan` and `/api/scans` against real sites behind real
//! OpenSSH tunnels — a leaky one, a clean one, a soft-404 one — admission by the bundled
//! `scan-guard` (own tunnels only, hourly quota) and by a trapping plugin, raw targets that
//! must never be contacted, the cache, cancellation, queue caps, and (Redis) a host killed
//! mid-job whose job another host completes.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::plugins::{bundled, install, install_hostile, plugins_dir, read};
use crate::redis_support::{RedisCluster, RedisServer, require_redis};
use crate::support::{
    Host, HostConfig, JsonValue, Key, Sandbox, SshClient, eventually, http_client, require_tools,
};

/// What a site answers: status, headers, body.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn reply(status: u16, headers: &[(&'static str, &str)], body: &str) -> Reply {
    Reply {
        status,
        headers: headers.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        body: body.as_bytes().to_vec(),
    }
}

/// Answers `(method, path, Origin header)`.
type Respond = fn(&Method, &str, Option<&str>) -> Reply;

/// A small site on loopback; `/whoami` answers its id (for readiness), everything else
/// goes to `respond`, each answer after `delay`.
struct Site {
    port: u16,
    id: String,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Site {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Site {
    async fn start(id: &str, respond: Respond, delay: Duration) -> Site {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let (counter, site_id) = (hits.clone(), id.to_string());
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (counter, site_id) = (counter.clone(), site_id.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (counter, site_id) = (counter.clone(), site_id.clone());
                        async move {
                            let reply = if req.uri().path() == "/whoami" {
                                reply(200, &[], &site_id)
                            } else {
                                counter.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(delay).await;
                                let origin = req
                                    .headers()
                                    .get("origin")
                                    .and_then(|v| v.to_str().ok())
                                    .map(String::from);
                                respond(req.method(), req.uri().path(), origin.as_deref())
                            };
                            let mut res = Response::new(Full::new(Bytes::from(reply.body)));
                            *res.status_mut() = hyper::StatusCode::from_u16(reply.status).unwrap();
                            for (name, value) in reply.headers {
                                res.headers_mut().append(name, value.parse().unwrap());
                            }
                            Ok::<_, Infallible>(res)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        Site {
            port,
            id: id.to_string(),
            hits,
            task,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Everything a careless app exposes.
fn leaky(method: &Method, path: &str, origin: Option<&str>) -> Reply {
    match (method.as_str(), path) {
        ("GET", "/") => {
            let mut r = reply(
                200,
                &[
                    ("content-type", "text/html"),
                    ("server", "nginx/1.25.3"),
                    ("x-powered-by", "PHP/8.1.2"),
                    ("set-cookie", "session=abc123secret; Path=/"),
                    ("access-control-allow-credentials", "true"),
                ],
                "<html><head><title>Index of /</title></head><body><h1>Index of /</h1>\
                 <a href=\"app.php\">app.php</a></body></html>",
            );
            if let Some(origin) = origin {
                r.headers
                    .push(("access-control-allow-origin", origin.to_string()));
            }
            r
        }
        ("GET", "/.git/HEAD") => reply(
            200,
            &[("content-type", "text/plain")],
            "ref: refs/heads/main\n",
        ),
        ("GET", "/.env") => reply(
            200,
            &[("content-type", "text/plain")],
            "DB_PASSWORD=hunter2secret\nAPI_KEY=sk_live_zzz\n",
        ),
        ("POST", "/") => reply(
            500,
            &[("content-type", "text/plain")],
            "Traceback (most recent call last):\n  File \"/srv/app.py\", line 12, in handle\n\
             json.decoder.JSONDecodeError: Expecting value\n",
        ),
        _ => reply(404, &[("content-type", "text/plain")], "not found"),
    }
}

const GOOD_HEADERS: [(&str, &str); 6] = [
    ("content-type", "text/html"),
    (
        "content-security-policy",
        "default-src 'self'; frame-ancestors 'none'",
    ),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("strict-transport-security", "max-age=31536000"),
];

/// A careful app.
fn clean(method: &Method, path: &str, _origin: Option<&str>) -> Reply {
    match (method.as_str(), path) {
        ("GET", "/") => reply(200, &GOOD_HEADERS, "<html><body>welcome</body></html>"),
        ("POST", "/") => reply(400, &[("content-type", "text/plain")], "bad request"),
        _ => reply(404, &[("content-type", "text/plain")], "not found"),
    }
}

/// A single-page app: 200 and the same page for every path, `/.env` included.
fn soft_404(_method: &Method, _path: &str, _origin: Option<&str>) -> Reply {
    reply(
        200,
        &GOOD_HEADERS,
        "<html><body><div id=app></div></body></html>",
    )
}

/// `ssh -N -R 80:127.0.0.1:<site>` for `key`, once the name serves the site.
async fn tunnel(host: &Host, sb: &Sandbox, key: &Key, site: &Site) -> (SshClient, String) {
    let name = host.info(sb, key).await.name;
    let client = host
        .ssh(sb, key)
        .args(["-N", "-R", &format!("80:127.0.0.1:{}", site.port)])
        .spawn();
    let want = site.id.clone();
    eventually(
        Duration::from_secs(15),
        "the tunnel to serve its site",
        || {
            let want = want.clone();
            let name = name.clone();
            async move { (host.whoami(&name).await.1 == want).then_some(()) }
        },
    )
    .await;
    (client, name)
}

/// `ssh … <command>`: exit code and stdout.
async fn ssh_command(host: &Host, sb: &Sandbox, key: &Key, command: &str) -> (i32, String) {
    let out = host.ssh(sb, key).command(command).output().await;
    (out.status.code().unwrap_or(-1), out.stdout)
}

/// `ssh … scan --json …`: exit code and the jobs.
async fn scan_json(host: &Host, sb: &Sandbox, key: &Key, args: &str) -> (i32, Vec<Value>) {
    let (code, stdout) = ssh_command(host, sb, key, &format!("scan --json {args}")).await;
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "scan --json printed no JSON ({e}): {stdout:?}; p0rt log:\n{}",
            host.log()
        )
    });
    (code, report["jobs"].as_array().cloned().unwrap_or_default())
}

fn findings(job: &Value) -> Vec<(String, String, String)> {
    job["findings"]
        .as_array()
        .unwrap_or(&vec![])
        .iter()
        .map(|f| {
            (
                f["check"].as_str().unwrap_or("").to_string(),
                f["severity"].as_str().unwrap_or("").to_string(),
                f["title"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn has(found: &[(String, String, String)], check: &str, severity: &str, title: &str) -> bool {
    found
        .iter()
        .any(|(c, s, t)| c == check && s == severity && t.contains(title))
}

/// A request to the base domain's API.
fn api(
    host: &Host,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
) -> reqwest::RequestBuilder {
    let mut req = http_client().request(method, host.url(path)).header(
        reqwest::header::HOST,
        format!("localhost:{}", host.http_port),
    );
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    req
}

/// `ssh … token`: the token it printed.
async fn token(host: &Host, sb: &Sandbox, key: &Key) -> String {
    let (code, stdout) = ssh_command(host, sb, key, "token").await;
    assert_eq!(code, 0, "{stdout}");
    let token = stdout.lines().next().unwrap_or("").trim().to_string();
    assert!(token.starts_with("p0rt_") && token.len() > 40, "{stdout:?}");
    token
}

/// Polls `GET /api/scans/{id}` until `done(job)`.
async fn wait_job(
    host: &Host,
    token: &str,
    id: &str,
    what: &str,
    done: fn(&Value) -> bool,
) -> Value {
    eventually(Duration::from_secs(60), what, || async move {
        let res = api(
            host,
            reqwest::Method::GET,
            &format!("/api/scans/{id}"),
            Some(token),
        )
        .send()
        .await
        .ok()?;
        let job = res.json_value().await;
        done(&job).then_some(job)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leaky_site_gets_its_findings_a_clean_one_none_and_repeats_come_from_the_cache() {
    require_tools();
    let sb = Sandbox::new();
    let host = Host::start(&sb).await;
    let (leaky_site, clean_site) = (
        Site::start("leaky", leaky, Duration::ZERO).await,
        Site::start("clean", clean, Duration::ZERO).await,
    );
    let (alice, bob) = (sb.key("alice"), sb.key("bob"));
    let (_a, leaky_name) = tunnel(&host, &sb, &alice, &leaky_site).await;
    let (_b, _clean_name) = tunnel(&host, &sb, &bob, &clean_site).await;

    // Alice scans her live tunnels, on a terminal: a progress bar, then the report.
    let out = host
        .ssh(&sb, &alice)
        .args(["-tt"])
        .command("scan")
        .output()
        .await;
    let text = crate::support::strip_ansi(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", host.log());
    assert!(
        text.contains("[#") && text.contains("headers"),
        "no progress bar: {text}"
    );
    for expected in ["HIGH", "/.env", ".git", "seen:", "why:", "fix:", "job s"] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from the report:\n{text}"
        );
    }
    for secret in ["hunter2secret", "sk_live_zzz", "abc123secret"] {
        assert!(
            !text.contains(secret),
            "the report shows the secret {secret}:\n{text}"
        );
    }

    // The same as JSON: every expected finding, from the cache this time.
    let (code, jobs) = scan_json(&host, &sb, &alice, "").await;
    assert_eq!(code, 0);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let job = &jobs[0];
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(
        job["from_cache"], true,
        "a repeat within the TTL is the cached report: {job}"
    );
    assert_eq!(job["target"]["name"], leaky_name.as_str());
    let found = findings(job);
    for (check, severity, title) in [
        ("paths", "high", ".env"),
        ("paths", "high", ".git"),
        ("paths", "medium", "listing"),
        ("headers", "medium", "Content-Security-Policy"),
        ("headers", "low", "X-Content-Type-Options"),
        ("headers", "low", "version banner"),
        ("headers", "low", "X-Powered-By"),
        ("cors", "high", ""),
        ("cookies", "medium", "session"),
        ("errors", "medium", ""),
    ] {
        assert!(
            has(&found, check, severity, title),
            "no {severity} {check} finding {title:?} in {found:#?}"
        );
    }
    let hits_before = leaky_site.hits();
    let (_, again) = scan_json(&host, &sb, &alice, &leaky_name).await;
    assert_eq!(again[0]["id"], job["id"]);
    assert_eq!(
        leaky_site.hits(),
        hits_before,
        "a cached report sends no request"
    );

    // Bob's careful site: nothing to report; without a terminal, one line per check.
    let out = host.ssh(&sb, &bob).command("scan").output().await;
    assert!(out.status.success(), "{}", out.stdout);
    assert!(out.stdout.contains("no findings"), "{}", out.stdout);
    assert!(
        !out.stdout.contains('#'),
        "no progress bar without a terminal: {}",
        out.stdout
    );
    // One progress line per check, each saying how it went.
    let progress: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| {
            l.contains(" on ")
                && (l.ends_with(": ok") || l.ends_with("finding") || l.ends_with("findings"))
        })
        .collect();
    assert_eq!(
        progress.len(),
        6,
        "one line per check expected: {}",
        out.stdout
    );
    for check in [
        "reachability",
        "headers",
        "paths",
        "CORS",
        "cookie",
        "error",
    ] {
        assert!(
            progress.iter().any(|l| l.contains(check)),
            "no progress line for {check}: {}",
            out.stdout
        );
    }
    let (_, jobs) = scan_json(&host, &sb, &bob, "").await;
    assert_eq!(findings(&jobs[0]), vec![], "a clean site has no findings");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_soft_404_site_gets_no_path_findings() {
    require_tools();
    let sb = Sandbox::new();
    let host = Host::start(&sb).await;
    let site = Site::start("spa", soft_404, Duration::ZERO).await;
    let key = sb.key("spa");
    let (_t, _name) = tunnel(&host, &sb, &key, &site).await;
    let (code, jobs) = scan_json(&host, &sb, &key, "").await;
    assert_eq!(code, 0, "{jobs:?}");
    let found = findings(&jobs[0]);
    assert!(
        found.iter().all(|(check, ..)| check != "paths"),
        "{found:#?}"
    );
    assert!(
        site.hits() > 5,
        "the scan did probe the site ({} requests)",
        site.hits()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn scans_of_anything_but_your_own_tunnels_are_refused_and_the_quota_holds() {
    require_tools();
    let sb = Sandbox::new();
    let host = Host::start(&sb).await;
    let site = Site::start("mine", clean, Duration::ZERO).await;
    let (alice, mallory) = (sb.key("alice"), sb.key("mallory"));
    let (_t, name) = tunnel(&host, &sb, &alice, &site).await;

    // Another key's tunnel: rejected by scan-guard, nothing sent.
    let (code, jobs) = scan_json(&host, &sb, &mallory, &name).await;
    assert_eq!(code, 1);
    assert_eq!(jobs[0]["state"], "rejected", "{jobs:?}");
    assert!(
        jobs[0]["error"]
            .as_str()
            .unwrap()
            .contains("not one of your tunnels"),
        "{jobs:?}"
    );
    assert_eq!(site.hits(), 0);
    // A key with no live tunnel is told how to start one.
    let (code, stdout) = ssh_command(&host, &sb, &mallory, "scan").await;
    assert_eq!(code, 1);
    assert!(stdout.contains("no live tunnel"), "{stdout}");

    // Raw addresses: never contacted unless the operator allowlists them (none here).
    for target in ["169.254.169.254", "10.0.0.1", "localhost"] {
        let (code, jobs) = scan_json(&host, &sb, &alice, &format!("--ports 80 {target}")).await;
        assert_eq!(code, 1, "{target}: {jobs:?}");
        assert_eq!(jobs[0]["state"], "rejected", "{target}: {jobs:?}");
        assert!(
            jobs[0]["error"].as_str().unwrap().contains("allowlist"),
            "{jobs:?}"
        );
    }

    // scan-guard's quota: 10 admitted jobs an hour (cached answers count too).
    for n in 0..10 {
        let (code, jobs) = scan_json(&host, &sb, &alice, "").await;
        assert_eq!(
            (code, jobs[0]["state"].as_str()),
            (0, Some("done")),
            "scan {n}: {jobs:?}"
        );
    }
    let (code, jobs) = scan_json(&host, &sb, &alice, "").await;
    assert_eq!(code, 1);
    assert!(
        jobs[0]["error"].as_str().unwrap().contains("quota"),
        "{jobs:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn allowlisted_targets_are_pinned_and_private_answers_are_refused() {
    require_tools();
    let sb = Sandbox::new();
    // A listener that must never see a connection, and one that may.
    let forbidden = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forbidden_port = forbidden.local_addr().unwrap().port();
    let open = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let open_port = open.local_addr().unwrap().port();
    let contacted = Arc::new(AtomicUsize::new(0));
    let seen = contacted.clone();
    let watcher = tokio::spawn(async move {
        while forbidden.accept().await.is_ok() {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    });
    let _open_task = tokio::spawn(async move { while open.accept().await.is_ok() {} });

    // The operator allowlists the name `localhost` (which resolves to loopback) and the one
    // address 127.0.0.2; scan-guard is configured to admit targets other than own tunnels.
    let dir = plugins_dir(&sb);
    install(
        &dir,
        "scan-guard",
        &read(&bundled("scan_guard.wasm")),
        Some(json!({ "config": { "own_tunnels_only": false } })),
    );
    let config = HostConfig::flags(&sb.data_dir())
        .arg("--plugins-dir")
        .arg(dir.to_string_lossy())
        .env("SCAN_ALLOWED_TARGETS", "localhost,127.0.0.2");
    let host = Host::start_with(&sb, config).await;
    let key = sb.key("ops");

    let (code, jobs) = scan_json(
        &host,
        &sb,
        &key,
        &format!("--ports {forbidden_port} localhost"),
    )
    .await;
    assert_eq!(code, 1, "{jobs:?}");
    assert!(
        jobs[0]["error"].as_str().unwrap().contains("loopback"),
        "{jobs:?}"
    );
    for target in ["169.254.169.254", "10.0.0.1", "127.0.0.1"] {
        let (code, jobs) = scan_json(
            &host,
            &sb,
            &key,
            &format!("--ports {forbidden_port} {target}"),
        )
        .await;
        assert_eq!(code, 1, "{target}: {jobs:?}");
        assert_eq!(jobs[0]["state"], "rejected");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        contacted.load(Ordering::SeqCst),
        0,
        "a refused target was contacted"
    );
    watcher.abort();

    // The explicitly allowlisted address: one open port found, one closed port not.
    let closed = crate::support::free_port();
    let (code, jobs) = scan_json(
        &host,
        &sb,
        &key,
        &format!("--ports {open_port},{closed} 127.0.0.2"),
    )
    .await;
    assert_eq!(code, 0, "{jobs:?}\n{}", host.log());
    let found = findings(&jobs[0]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].2.contains(&open_port.to_string()), "{found:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trapping_admission_plugin_rejects() {
    require_tools();
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    install_hostile(&dir, "scan-admission", "trap");
    let config = HostConfig::flags(&sb.data_dir())
        .arg("--plugins-dir")
        .arg(dir.to_string_lossy());
    let host = Host::start_with(&sb, config).await;
    let site = Site::start("t", clean, Duration::ZERO).await;
    let key = sb.key("k");
    let (_t, _name) = tunnel(&host, &sb, &key, &site).await;
    let (code, jobs) = scan_json(&host, &sb, &key, "").await;
    assert_eq!(code, 1);
    assert_eq!(jobs[0]["state"], "rejected", "{jobs:?}");
    assert_eq!(site.hits(), 0, "nothing runs when admission fails");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_serves_owners_their_jobs_and_the_operator_every_job() {
    require_tools();
    let sb = Sandbox::new();
    let admin = "admin-token-0123456789";
    let config = HostConfig::flags(&sb.data_dir())
        .env("ADMIN_TOKEN", admin)
        .env("SCAN_WORKERS", "1");
    let host = Host::start_with(&sb, config).await;
    let slow = Site::start("slow", clean, Duration::from_millis(400)).await;
    let (alice, bob) = (sb.key("alice"), sb.key("bob"));
    let (_t, name) = tunnel(&host, &sb, &alice, &slow).await;
    let alice_token = token(&host, &sb, &alice).await;
    let bob_token = token(&host, &sb, &bob).await;

    // No token, a wrong token: 401 with a hint.
    for token in [None, Some("p0rt_0000"), Some("garbage")] {
        let res = api(&host, reqwest::Method::GET, "/api/scans", token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{token:?}");
        assert!(res.headers().contains_key("www-authenticate"));
    }
    // Never on a tunnel's name.
    let res = http_client()
        .post(host.url("/api/scans"))
        .header("host", host.host_header(&name))
        .bearer_auth(&alice_token)
        .send()
        .await
        .unwrap();
    assert_ne!(res.status(), 202, "the API answered on a tunnel's name");

    let res = api(
        &host,
        reqwest::Method::POST,
        "/api/scans",
        Some(&alice_token),
    )
    .body(json!({ "target": name }).to_string())
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), 202);
    let body = res.json_value().await;
    let id = body["jobs"][0]["id"].as_str().unwrap().to_string();
    assert!(
        matches!(
            body["jobs"][0]["state"].as_str(),
            Some("queued" | "running")
        ),
        "{body}"
    );

    // Bob cannot see it; the operator can, in the list too.
    let res = api(
        &host,
        reqwest::Method::GET,
        &format!("/api/scans/{id}"),
        Some(&bob_token),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), 404);
    let all = api(&host, reqwest::Method::GET, "/api/scans", Some(admin))
        .send()
        .await
        .unwrap()
        .json_value()
        .await;
    assert!(
        all["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == id.as_str()),
        "{all}"
    );
    let res = api(&host, reqwest::Method::POST, "/api/scans", Some(admin))
        .body(json!({}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403, "the operator does not submit scans");
    // Bad bodies: 400 / 413.
    let res = api(
        &host,
        reqwest::Method::POST,
        "/api/scans",
        Some(&alice_token),
    )
    .body("{\"target\": 5")
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), 400);
    let res = api(
        &host,
        reqwest::Method::POST,
        "/api/scans",
        Some(&alice_token),
    )
    .body(vec![b' '; 100_000])
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), 413);
    let res = api(
        &host,
        reqwest::Method::POST,
        "/api/scans",
        Some(&alice_token),
    )
    .body(json!({"target": name, "checks": ["telnet"]}).to_string())
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), 400);

    // Running (the slow site answers each request after 400 ms): the operator cancels it.
    let running = wait_job(&host, &alice_token, &id, "the job to run", |j| {
        j["state"] == "running" && j["progress"]["done"].as_u64() >= Some(1)
    })
    .await;
    assert!(
        !running["progress"]["lines"].as_array().unwrap().is_empty(),
        "{running}"
    );
    let res = api(
        &host,
        reqwest::Method::DELETE,
        &format!("/api/scans/{id}"),
        Some(admin),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let cancelled = wait_job(&host, &alice_token, &id, "the job to stop", |j| {
        j["state"] != "running"
    })
    .await;
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    let hits = slow.hits();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        slow.hits() <= hits + 1,
        "a cancelled job kept sending requests"
    );

    // A revoked token stops working.
    let (code, stdout) = ssh_command(&host, &sb, &alice, "token --revoke").await;
    assert_eq!(code, 0, "{stdout}");
    let res = api(
        &host,
        reqwest::Method::GET,
        "/api/scans",
        Some(&alice_token),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_and_a_busy_key_get_clear_rejections() {
    require_tools();
    let sb = Sandbox::new();
    // No workers: jobs stay queued.
    let config = HostConfig::flags(&sb.data_dir())
        .env("SCAN_WORKERS", "0")
        .env("SCAN_QUEUE_MAX", "2")
        .env("SCAN_MAX_ACTIVE_PER_KEY", "1");
    let host = Host::start_with(&sb, config).await;
    let site = Site::start("q", clean, Duration::ZERO).await;
    let (alice, bob, carol) = (sb.key("alice"), sb.key("bob"), sb.key("carol"));
    let mut tokens = Vec::new();
    let mut clients = Vec::new();
    for key in [&alice, &bob, &carol] {
        clients.push(tunnel(&host, &sb, key, &site).await);
        tokens.push(token(&host, &sb, key).await);
    }
    let submit = |token: String| {
        let host = &host;
        async move {
            api(host, reqwest::Method::POST, "/api/scans", Some(&token))
                .body(json!({}).to_string())
                .send()
                .await
                .unwrap()
                .json_value()
                .await["jobs"][0]
                .clone()
        }
    };
    assert_eq!(submit(tokens[0].clone()).await["state"], "queued");
    let busy = submit(tokens[0].clone()).await;
    assert_eq!(busy["state"], "rejected");
    assert!(
        busy["error"].as_str().unwrap().contains("already have 1"),
        "{busy}"
    );
    assert_eq!(submit(tokens[1].clone()).await["state"], "queued");
    let full = submit(tokens[2].clone()).await;
    assert_eq!(full["state"], "rejected");
    assert!(
        full["error"].as_str().unwrap().contains("queue is full"),
        "{full}"
    );
    assert_eq!(site.hits(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_killed_mid_job_loses_nothing_another_host_completes_it() {
    require_tools();
    require_redis();
    let redis = RedisServer::start().await;
    let slow = Site::start("slow", clean, Duration::from_millis(300)).await;
    let (sb_a, sb_b) = (Sandbox::new(), Sandbox::new());
    let start = |sb: &Sandbox| {
        HostConfig::flags(&sb.data_dir())
            .env("STORAGE_TYPE", "redis")
            .env("REDIS_URL", redis.url())
            .env("SCAN_WORKERS", "1")
            .env("SCAN_VISIBILITY_TIMEOUT_SECONDS", "3")
    };
    let mut a = Host::start_with(&sb_a, start(&sb_a)).await;
    let mut b = Host::start_with(&sb_b, start(&sb_b)).await;
    // The same key serves its name on both hosts (one Redis store: the same name).
    let key = sb_a.key("owner");
    let (_ta, name) = tunnel(&a, &sb_a, &key, &slow).await;
    let (_tb, name_b) = tunnel(&b, &sb_a, &key, &slow).await;
    assert_eq!(name, name_b);
    let token = token(&a, &sb_a, &key).await;

    let res = api(&a, reqwest::Method::POST, "/api/scans", Some(&token))
        .body(json!({ "target": name }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let id = res.json_value().await["jobs"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let running = wait_job(&a, &token, &id, "the job to run", |j| {
        j["state"] == "running" && j["progress"]["done"].as_u64() >= Some(1)
    })
    .await;
    let first_worker = running["worker"].as_str().unwrap().to_string();
    // Kill -9 whichever host runs it; the other must finish it.
    let a_runs = a.log().contains(
        first_worker
            .split('-')
            .take(2)
            .collect::<Vec<_>>()
            .join("-")
            .as_str(),
    );
    let survivor = if a_runs {
        a.kill().await;
        &b
    } else {
        b.kill().await;
        &a
    };
    let done = wait_job(
        survivor,
        &token,
        &id,
        "the other host to complete the job",
        |j| j["state"] == "done",
    )
    .await;
    assert_eq!(done["attempts"], 2, "{done}");
    assert_ne!(done["worker"].as_str().unwrap(), first_worker, "{done}");
    assert!(
        findings(&done)
            .iter()
            .all(|(check, ..)| check != "reachability"),
        "the survivor scanned through its own edge: {done}"
    );
    // The seed's key for the cached report.
    let mut conn = redis.client().await;
    let cached: Option<String> = redis::cmd("GET")
        .arg(format!("p0rt:job:scan:{name}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(cached.as_deref(), Some(id.as_str()));
}

/// On a Redis Cluster (the queue's streams, the job records and the cached report spread over
/// three masters), a scan job runs to the end and its repeat is the cached report.
#[tokio::test(flavor = "multi_thread")]
async fn a_scan_job_runs_and_its_report_is_cached_on_a_redis_cluster() {
    require_tools();
    require_redis();
    let cluster = RedisCluster::start().await;
    let site = Site::start("leaky-on-cluster", leaky, Duration::ZERO).await;
    let sb = Sandbox::new();
    let config = HostConfig::flags(&sb.data_dir())
        .env("STORAGE_TYPE", "redis")
        .env("REDIS_URL", cluster.url());
    let host = Host::start_with(&sb, config).await;
    let alice = sb.key("alice");
    let (_a, name) = tunnel(&host, &sb, &alice, &site).await;

    let (code, jobs) = scan_json(&host, &sb, &alice, &name).await;
    assert_eq!(code, 0, "{jobs:?}\n{}", host.log());
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let job = &jobs[0];
    assert_eq!(
        (&job["state"], &job["from_cache"]),
        (&json!("done"), &json!(false)),
        "{job}"
    );
    assert!(
        has(&findings(job), "paths", "high", ".env"),
        "{:#?}",
        findings(job)
    );
    let hits = site.hits();
    let (_, again) = scan_json(&host, &sb, &alice, &name).await;
    assert_eq!(again[0]["id"], job["id"], "{again:?}");
    assert_eq!(again[0]["from_cache"], true, "{again:?}");
    assert_eq!(site.hits(), hits, "the repeat contacted the site");
    assert_eq!(
        cluster
            .get(&format!("p0rt:job:scan:{name}"))
            .await
            .as_deref(),
        job["id"].as_str()
    );
}

/// `scan.cache_ttl_seconds` 0 means a report is never reused: on Redis no `job:scan:{target}`
/// key is written (Redis cannot hold one for 0 s), and a repeat scan runs again.
#[tokio::test(flavor = "multi_thread")]
async fn a_cache_ttl_of_zero_reuses_no_report_on_redis() {
    require_tools();
    require_redis();
    let redis = RedisServer::start().await;
    let site = Site::start("leaky-uncached", leaky, Duration::ZERO).await;
    let sb = Sandbox::new();
    let config = HostConfig::flags(&sb.data_dir())
        .env("STORAGE_TYPE", "redis")
        .env("REDIS_URL", redis.url())
        .env("SCAN_CACHE_TTL_SECONDS", "0");
    let host = Host::start_with(&sb, config).await;
    let alice = sb.key("alice");
    let (_a, name) = tunnel(&host, &sb, &alice, &site).await;

    let (code, first) = scan_json(&host, &sb, &alice, &name).await;
    assert_eq!(code, 0, "{first:?}\n{}", host.log());
    assert_eq!(first[0]["state"], "done", "{first:?}");
    let hits = site.hits();
    let (code, again) = scan_json(&host, &sb, &alice, &name).await;
    assert_eq!(code, 0, "{again:?}");
    assert_eq!(again[0]["state"], "done", "{again:?}");
    assert_eq!(again[0]["from_cache"], false, "{again:?}");
    assert_ne!(again[0]["id"], first[0]["id"], "{again:?}");
    assert!(site.hits() > hits, "the repeat did not scan the site");
    let cached: Option<String> = redis::cmd("GET")
        .arg(format!("p0rt:job:scan:{name}"))
        .query_async(&mut redis.client().await)
        .await
        .unwrap();
    assert_eq!(cached, None, "a report was cached with a TTL of 0");
}
