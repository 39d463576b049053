//! The web console (`ADMIN_PATH`, default `/admin`) in a real headless Debian chromium,
//! driven through chromedriver's WebDriver HTTP protocol, with a real `ssh -R` tunnel:
//! a wrong token is refused, the right one logs in, the tunnel's request counter rises live
//! (server-sent events), Disconnect ends it; every page is screenshotted and must not be
//! blank. Over plain HTTP: the cookie's flags, the security headers, and 403 for a
//! state-changing request without the session's CSRF token.
//!
//! Requires `chromium` and `chromium-driver` (apt-get install chromium chromium-driver).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

const TOKEN: &str = "console-token-0123456789";
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// WebDriver's key for an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Generous bound for the browser to show what the host already did.
const BROWSER_WAIT: Duration = Duration::from_secs(30);

/// A chromedriver process and one headless chromium session on it; killed on drop.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Browser {
    async fn start(sb: &Sandbox) -> Browser {
        for tool in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(tool).exists(),
                "{tool} not found: install it (apt-get install chromium chromium-driver)"
            );
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver (apt-get install chromium chromium-driver)");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
            http,
        };
        eventually(WAIT, "chromedriver to answer /status", || async {
            let res = browser
                .http
                .get(format!("{}/status", browser.base))
                .send()
                .await
                .ok()?;
            let body: Value = serde_json::from_slice(&res.bytes().await.ok()?).ok()?;
            body["value"]["ready"].as_bool().filter(|r| *r)
        })
        .await;
        let profile = sb.join("chromium-profile");
        let caps = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--window-size=1200,900",
                        format!("--user-data-dir={}", profile.display()),
                    ],
                },
            }},
        });
        let value = browser.call(reqwest::Method::POST, "", Some(caps)).await;
        browser.session = value["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {value}"))
            .to_string();
        browser
    }

    /// One WebDriver command on the session (`path` after `/session/{id}`); its `value`.
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = if self.session.is_empty() {
            format!("{}/session{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let mut req = self.http.request(method.clone(), &url);
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(body.to_string());
        } else if method == reqwest::Method::POST {
            req = req.header("content-type", "application/json").body("{}");
        }
        let res = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
        let status = res.status();
        let body: Value =
            serde_json::from_slice(&res.bytes().await.unwrap()).expect("WebDriver JSON");
        assert!(
            status.is_success(),
            "WebDriver {method} {path}: {status} {body}"
        );
        body["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn find(&self, css: &str) -> String {
        let value = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        match value[ELEMENT_KEY].as_str() {
            Some(id) => id.to_string(),
            None => panic!("no element {css}: {value}; page:\n{}", self.source().await),
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{id}/clear"), None)
            .await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{id}/click"), None)
            .await;
    }

    /// Runs `script` (a function body) in the page; its return value.
    async fn script(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    async fn source(&self) -> String {
        let v = self.call(reqwest::Method::GET, "/source", None).await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// Takes a screenshot, saves it in the sandbox, and asserts it is not one flat colour.
    async fn screenshot_not_blank(&self, sb: &Sandbox, name: &str) {
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 screenshot"))
            .expect("screenshot is base64");
        std::fs::write(sb.join(&format!("{name}.png")), &bytes).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("screenshot is a PNG");
        let mut buf = vec![0; reader.output_buffer_size().expect("PNG size")];
        let info = reader.next_frame(&mut buf).expect("PNG frame");
        let pixel = info.color_type.samples() * (info.bit_depth as usize).div_ceil(8);
        let pixels = &buf[..info.buffer_size()];
        let first = &pixels[..pixel];
        let distinct = pixels.chunks(pixel).filter(|p| *p != first).count();
        assert!(
            info.width > 100 && info.height > 100 && distinct > 100,
            "screenshot of {name} is blank ({}x{}, {distinct} pixels differ from the first)",
            info.width,
            info.height
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Killing chromedriver alone leaves chromium running: end the session first, so
        // chromedriver closes the browser (a blocking request, as drop cannot await).
        if !self.session.is_empty()
            && let Some(addr) = self.base.strip_prefix("http://")
            && let Ok(mut stream) = std::net::TcpStream::connect(addr)
        {
            use std::io::{Read, Write};
            let _ = stream.set_read_timeout(Some(WAIT));
            let request = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\
                 Connection: close\r\n\r\n",
                self.session
            );
            let _ = stream.write_all(request.as_bytes());
            let _ = stream.read_to_end(&mut Vec::new());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A client that shows redirects instead of following them.
fn plain_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn base_request(host: &Host, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    plain_client().request(method, host.url(path)).header(
        reqwest::header::HOST,
        format!("localhost:{}", host.http_port),
    )
}

/// The session's CSRF token, from a console page's `csrf-token` meta tag.
fn csrf_of(html: &str) -> String {
    html.split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("csrf meta tag")
        .to_string()
}

fn header(res: &reqwest::Response, name: &str) -> String {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn the_console_over_http_sets_safe_cookies_and_wants_the_csrf_token() {
    let sb = Sandbox::new();
    let host = Host::start_with(
        &sb,
        HostConfig::flags(&sb.data_dir()).env("ADMIN_TOKEN", TOKEN),
    )
    .await;

    let login = base_request(&host, reqwest::Method::GET, "/admin")
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::OK);
    let csp = header(&login, "content-security-policy");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(header(&login, "x-content-type-options"), "nosniff");
    assert_eq!(header(&login, "referrer-policy"), "no-referrer");
    assert_eq!(header(&login, "cache-control"), "no-store");
    assert!(login.text().await.unwrap().contains("name=\"token\""));

    let wrong = base_request(&host, reqwest::Method::POST, "/admin/login")
        .form(&[("token", "not-the-token-at-all")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong.headers().get("set-cookie").is_none());

    let right = base_request(&host, reqwest::Method::POST, "/admin/login")
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), StatusCode::SEE_OTHER);
    let cookie = header(&right, "set-cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/admin"] {
        assert!(cookie.contains(flag), "{flag} in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain-http host: {cookie}");
    let session = cookie.split(';').next().unwrap().to_string();

    let page = base_request(&host, reqwest::Method::GET, "/admin/plugins")
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    let csrf = csrf_of(&html);

    // With the session cookie but without (or with a wrong) CSRF token: 403, nothing done.
    for (what, form) in [
        ("no token", vec![]),
        ("wrong token", vec![("csrf", "0".repeat(64))]),
    ] {
        let res = base_request(&host, reqwest::Method::POST, "/admin/plugins/reload")
            .header("cookie", &session)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{what}");
    }
    let res = base_request(&host, reqwest::Method::DELETE, "/admin/tunnels/x")
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let res = base_request(&host, reqwest::Method::POST, "/admin/plugins/reload")
        .header("cookie", &session)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.text().await.unwrap().contains("plugins reloaded"));

    // Name and key bans from the bans page: refused without the CSRF token, done with it.
    let ban_name = [
        ("kind", "name"),
        ("target", "kept-out"),
        ("reason", "console test"),
    ];
    let res = base_request(&host, reqwest::Method::POST, "/admin/bans/identity")
        .header("cookie", &session)
        .form(&ban_name)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let bans = || async {
        let res = base_request(&host, reqwest::Method::GET, "/api/v1/bans")
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        serde_json::from_str::<Value>(&res.text().await.unwrap()).unwrap()
    };
    assert_eq!(bans().await["names"], serde_json::json!([]));
    let mut form = ban_name.to_vec();
    form.push(("csrf", csrf.as_str()));
    let res = base_request(&host, reqwest::Method::POST, "/admin/bans/identity")
        .header("cookie", &session)
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let html = res.text().await.unwrap();
    assert!(
        html.contains("banned name kept-out") && html.contains("id=\"name-bans\""),
        "{html}"
    );
    assert_eq!(bans().await["names"][0]["name"], "kept-out");
    let fingerprint = sb.key("console-banned").fingerprint();
    let res = base_request(&host, reqwest::Method::POST, "/admin/bans/identity")
        .header("cookie", &session)
        .form(&[
            ("kind", "key"),
            ("target", fingerprint.as_str()),
            ("seconds", "60"),
            ("csrf", csrf.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(bans().await["keys"][0]["key"], fingerprint.as_str());
    for path in [
        "/admin/bans/names/kept-out/unban".to_string(),
        format!(
            "/admin/bans/keys/{}/unban",
            fingerprint
                .replace(':', "%3A")
                .replace('+', "%2B")
                .replace('/', "%2F")
        ),
    ] {
        let res = base_request(&host, reqwest::Method::POST, &path)
            .header("cookie", &session)
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        assert!(res.text().await.unwrap().contains("unbanned"), "{path}");
    }
    let after = bans().await;
    assert_eq!(
        (&after["names"], &after["keys"]),
        (&serde_json::json!([]), &serde_json::json!([]))
    );

    // Logging out ends the session: the cookie no longer opens pages.
    let res = base_request(&host, reqwest::Method::POST, "/admin/logout")
        .header("cookie", &session)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let res = base_request(&host, reqwest::Method::GET, "/admin/tunnels")
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);

    // Failed logins are rate-limited per address.
    let mut last = StatusCode::OK;
    for _ in 0..12 {
        last = base_request(&host, reqwest::Method::POST, "/admin/login")
            .form(&[("token", "still-not-the-token")])
            .send()
            .await
            .unwrap()
            .status();
    }
    assert_eq!(last, StatusCode::TOO_MANY_REQUESTS);
    let blocked = base_request(&host, reqwest::Method::POST, "/admin/login")
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(blocked.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn in_a_real_browser_the_console_shows_a_live_tunnel_and_disconnects_it() {
    let sb = Sandbox::new();
    let host = Host::start_with(
        &sb,
        HostConfig::flags(&sb.data_dir()).env("ADMIN_TOKEN", TOKEN),
    )
    .await;
    let backend = Backend::start("console").await;
    let alice = sb.key("alice");
    let (mut client, name) = host.tunnel(&sb, &alice, &backend).await;
    let browser = Browser::start(&sb).await;
    let console = format!("http://localhost:{}/admin", host.http_port);

    // A wrong token is refused.
    browser.go(&console).await;
    browser.screenshot_not_blank(&sb, "login").await;
    browser.type_into("#token", "wrong-token-wrong-token").await;
    browser.click("#login-submit").await;
    // The click starts a navigation; the new page may not be there yet when it returns.
    eventually(BROWSER_WAIT, "the login refusal page", || async {
        browser
            .source()
            .await
            .contains("Wrong admin token")
            .then_some(())
    })
    .await;
    browser.screenshot_not_blank(&sb, "login-refused").await;

    // The right one opens the tunnels page, with the live tunnel.
    browser.type_into("#token", TOKEN).await;
    browser.click("#login-submit").await;
    let row = format!("tr[data-name=\"{name}\"] td[data-field=\"requests\"]");
    let read_counter = format!(
        "const td = document.querySelector('{}'); return td ? td.textContent : null;",
        row.replace('\'', "\\'")
    );
    let before: u64 = eventually(BROWSER_WAIT, "the tunnel on the console", || async {
        browser.script(&read_counter).await.as_str()?.parse().ok()
    })
    .await;
    browser.screenshot_not_blank(&sb, "tunnels").await;

    // Requests through the tunnel: the counter rises on the page without a reload.
    for _ in 0..3 {
        assert_eq!(host.get(&name, "/whoami").await.status(), 200);
    }
    eventually(BROWSER_WAIT, "the counter to rise on the page", || async {
        let now: u64 = browser.script(&read_counter).await.as_str()?.parse().ok()?;
        (now >= before + 3).then_some(())
    })
    .await;

    for (page, title) in [
        ("names", "Names"),
        ("bans", "Bans"),
        ("plugins", "Plugins"),
        ("scans", "Scans"),
        ("health", "Health"),
    ] {
        browser.go(&format!("{console}/{page}")).await;
        let h1 = browser
            .script("return document.querySelector('main h1').textContent;")
            .await;
        assert_eq!(h1, json!(title), "{page}");
        browser.screenshot_not_blank(&sb, page).await;
    }

    // Disconnect: the ssh client ends and the row goes.
    browser.go(&format!("{console}/tunnels")).await;
    browser
        .click(&format!("tr[data-name=\"{name}\"] button.disconnect"))
        .await;
    client.wait_exit().await;
    let gone = format!("return document.querySelector('tr[data-name=\"{name}\"]') === null;");
    eventually(BROWSER_WAIT, "the tunnel to leave the page", || async {
        browser.script(&gone).await.as_bool().filter(|g| *g)
    })
    .await;
    browser.screenshot_not_blank(&sb, "disconnected").await;

    browser.click("#logout").await;
    eventually(BROWSER_WAIT, "the login page after logging out", || async {
        browser
            .source()
            .await
            .contains("id=\"token\"")
            .then_some(())
    })
    .await;
}

/// Logs in to `host`'s console; the session cookie (`name=value`).
async fn console_login(host: &Host) -> String {
    let res = base_request(host, reqwest::Method::POST, "/admin/login")
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::SEE_OTHER,
        "login on port {}",
        host.http_port
    );
    header(&res, "set-cookie")
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

/// What a console page answers to `cookie`: 200 when the session holds, a redirect to the
/// login page when it does not.
async fn console_page_status(host: &Host, cookie: &str) -> StatusCode {
    base_request(host, reqwest::Method::GET, "/admin/names")
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .status()
}

/// Issue 17: a console session lives in the cache (`session:{id}`): with the cache in Redis
/// it is shared by the hosts on it and survives a restart; the cache holds a digest of the
/// cookie, not the cookie; a host with another admin token does not honour it.
#[tokio::test]
async fn console_sessions_in_redis_are_shared_survive_restarts_and_follow_the_token() {
    use crate::redis_support::RedisServer;
    require_tools();
    let redis = RedisServer::start().await;
    let sb = Sandbox::new();
    let on_redis = |dir: &str, token: &str| {
        HostConfig::flags(&sb.join(dir))
            .env("STORAGE_TYPE", "redis")
            .env("REDIS_URL", redis.url())
            .env("ADMIN_TOKEN", token)
    };
    let mut a = Host::start_with(&sb, on_redis("a", TOKEN)).await;
    let b = Host::start_with(&sb, on_redis("b", TOKEN)).await;
    let cookie = console_login(&a).await;
    assert_eq!(console_page_status(&a, &cookie).await, StatusCode::OK);
    assert_eq!(
        console_page_status(&b, &cookie).await,
        StatusCode::OK,
        "another host on the same Redis does not know the session"
    );

    // The cache holds session:{sha256(cookie value)}, with the TTL, and not the value.
    let value = cookie.split_once('=').unwrap().1.to_string();
    let mut conn = redis.client().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*session:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let digest = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(value.as_bytes()))
    };
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].ends_with(&format!("session:{digest}")), "{keys:?}");
    let ttl: i64 = redis::cmd("TTL")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 7 * 3600 && ttl <= 8 * 3600, "session TTL {ttl}s");
    let all: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    for key in &all {
        assert!(
            !key.contains(&value),
            "the cookie value is a Redis key: {key}"
        );
        let kind: String = redis::cmd("TYPE")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if kind == "string" {
            let stored: Vec<u8> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(
                !String::from_utf8_lossy(&stored).contains(&value),
                "the cookie value is stored under {key}"
            );
        }
    }

    // A restart of the host that issued it keeps the session.
    a.restart().await;
    assert_eq!(console_page_status(&a, &cookie).await, StatusCode::OK);

    // A host on the same Redis with another admin token refuses it (a token change ends
    // the sessions made with the old one); a forged cookie is refused everywhere.
    let c = Host::start_with(&sb, on_redis("c", "another-console-token-0123")).await;
    assert_eq!(
        console_page_status(&c, &cookie).await,
        StatusCode::SEE_OTHER
    );
    let forged = format!("p0rt_console={}", "a".repeat(64));
    assert_eq!(
        console_page_status(&a, &forged).await,
        StatusCode::SEE_OTHER
    );
    // Logging out on B ends the session on A too.
    let page = base_request(&b, reqwest::Method::GET, "/admin/plugins")
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = csrf_of(&page);
    let res = base_request(&b, reqwest::Method::POST, "/admin/logout")
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        console_page_status(&a, &cookie).await,
        StatusCode::SEE_OTHER
    );
}
