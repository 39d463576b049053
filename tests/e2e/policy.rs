//! `p0rt:policy@0.2.0` through the real binary, the real OpenSSH client and real HTTP
//! clients: requested names granted to the key that asks first (and kept), the tunnel
//! owner's options (`ssh -R 80:… host -- allow=… auth=… https-only …`) applied by the
//! bundled `access` request policy, the operator's `access.json`, and a hostile request
//! policy whose bad verdicts the host refuses while it keeps serving.

use std::time::Duration;

use reqwest::header::{HOST, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE};
use serde_json::json;

use crate::plugins::{
    client_from, fixture, host_with_plugins, install, loaded_line, plugin_status, plugins_dir,
    read, wait_active, wait_log, wait_log_count, wait_plugin, write_atomic,
};
use crate::support::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The body of the host's answer when the request policy could not judge a request to a
/// tunnel with owner options.
const POLICY_UNAVAILABLE: &str =
    "the tunnel's access policy is unavailable right now; try again shortly";

/// One HTTP answer, read in full.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Answer {
    pub(crate) async fn of(request: reqwest::RequestBuilder) -> Answer {
        let res = request.send().await.expect("request through the edge");
        Answer {
            status: res.status().as_u16(),
            headers: res.headers().clone(),
            body: res.text().await.unwrap_or_default(),
        }
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header"))
    }

    /// The backend's `/echo` report.
    pub(crate) fn echo(&self) -> serde_json::Value {
        assert_eq!(self.status, 200, "not an echo: {self:?}");
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("echo is not JSON ({e}): {self:?}"))
    }
}

/// Every value of request header `name` the backend reported in an `/echo` answer.
pub(crate) fn seen(echo: &serde_json::Value, name: &str) -> Vec<String> {
    echo["headers"]
        .as_array()
        .expect("echo headers")
        .iter()
        .filter(|pair| {
            pair[0]
                .as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .map(|pair| pair[1].as_str().unwrap_or_default().to_string())
        .collect()
}

/// `GET path` through the edge to `name`, with `client`.
pub(crate) fn get(
    client: &reqwest::Client,
    host: &Host,
    name: &str,
    path: &str,
) -> reqwest::RequestBuilder {
    client
        .get(host.url(path))
        .header(HOST, host.host_header(name))
}

/// Sends the request `make` builds. On this busy 2-core machine a plugin call can miss its
/// deadline now and then, and the host then (correctly) answers without the plugin: 503 for
/// a tunnel with owner options, admitted unchanged for one without. Such an answer is
/// retried (a few times, after the plugin's bench would have passed), but only if the host
/// logged that it had to fall back for it.
async fn judged(host: &Host, make: impl Fn() -> reqwest::RequestBuilder) -> Answer {
    let fallbacks = || {
        let log = host.log();
        log.matches("request policy fails closed").count()
            + log
                .matches("request policy falls back to admitting")
                .count()
    };
    for attempt in 1..=4 {
        let before = fallbacks();
        let answer = Answer::of(make()).await;
        if fallbacks() == before {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(1500) * attempt).await;
    }
    panic!(
        "the request policy failed 4 times in a row; log:\n{}",
        host.log()
    );
}

/// `ssh -R 80:127.0.0.1:<backend> 127.0.0.1 '<options>'` (OpenSSH sends the words as the
/// session's command), for `key`; waits until the session is up, which is after the
/// options were echoed and applied. Returns the session and the key's name.
pub(crate) async fn options_tunnel(
    host: &Host,
    sb: &Sandbox,
    key: &Key,
    backend: &Backend,
    options: &str,
) -> (SshClient, String) {
    let name = host.info(sb, key).await.name;
    let mut session = host
        .ssh(sb, key)
        .args(["-R", &format!("80:127.0.0.1:{}", backend.port)])
        .command(options)
        .spawn();
    session
        .wait_line("the session's prompt", |l| {
            l == "Press Ctrl-C to close the tunnel."
        })
        .await;
    let forwarding = format!(
        "Forwarding http://{name}.localhost:{} -> your -R target",
        host.http_port
    );
    assert!(
        session.lines().contains(&forwarding),
        "no {forwarding:?} in {:?}",
        session.lines()
    );
    (session, name)
}

/// Lines of the session that start with `p0rt: option` (the echo of the options).
fn option_lines(session: &SshClient) -> Vec<String> {
    session
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("p0rt: option"))
        .collect()
}

/// A client that does not follow redirects.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("reqwest client")
}

/// Waits until the bundled words plugin, configured by the sidecar `words` alone, serves
/// naming (the sidecar is then its origin).
async fn words_configured(host: &Host, words: &std::path::Path) {
    let origin = words.display().to_string();
    let entry = wait_plugin(host, &origin, "words.json to configure words", |p| {
        p["active"] == true
    })
    .await;
    assert_eq!(entry["name"], "words", "{entry}");
    assert_eq!(entry["role"], "naming", "{entry}");
    assert!(entry["error"].is_null(), "{entry}");
}

// ---------------------------------------------------------------------------------------------
// 1. Requested names: granted to the key that asks first
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn requested_names_are_granted_to_the_first_key_and_kept() {
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    // A sidecar alone, named like the bundled words plugin, configures it.
    let words = dir.join("words.json");
    write_atomic(
        &words,
        json!({ "config": { "grant_requested": true, "max_requested_names_per_key": 2 } })
            .to_string()
            .as_bytes(),
    );
    let (alice, bob) = (sb.key("alice"), sb.key("bob"));
    let (alice_app, alice_second, bob_app) = (
        Backend::start("alice-app").await,
        Backend::start("alice-second").await,
        Backend::start("bob-app").await,
    );
    let mut host = host_with_plugins(&sb, &dir).await;
    words_configured(&host, &words).await;
    assert_eq!(
        host.whoami("myapp").await.0,
        404,
        "myapp exists before anyone asked"
    );

    // Alice asks first: she is served at myapp.<domain> itself, not myapp-<her name>.
    let alice_name = host.info(&sb, &alice).await.name;
    let mut a = host
        .ssh(&sb, &alice)
        .args(["-R", &format!("myapp:80:127.0.0.1:{}", alice_app.port)])
        .spawn();
    let expected = format!(
        "Forwarding http://myapp.localhost:{} -> your -R target",
        host.http_port
    );
    a.wait_line(&expected, |l| l == expected).await;
    host.wait_served("myapp", &alice_app).await;
    assert_ne!(
        host.whoami(&format!("myapp-{alice_name}")).await,
        (200, "alice-app".to_string()),
        "also served as a sub-name"
    );
    wait_log(&host, "myapp: granted to key").await;

    // Bob asks for the same name (and for his own main name, so his session stays up to
    // show why): refused, and Alice keeps it.
    let bob_name = host.info(&sb, &bob).await.name;
    let mut b = host
        .ssh(&sb, &bob)
        .opt("ExitOnForwardFailure=no")
        .args([
            "-R",
            &format!("myapp:80:127.0.0.1:{}", bob_app.port),
            "-R",
            &format!("80:127.0.0.1:{}", bob_app.port),
        ])
        .spawn();
    b.wait_line("the refusal", |l| {
        l == "p0rt: refused -R myapp:80: myapp belongs to another key"
    })
    .await;
    host.wait_served(&bob_name, &bob_app).await;
    assert_eq!(host.whoami("myapp").await, (200, "alice-app".to_string()));
    assert!(
        b.stderr().contains("remote port forwarding failed"),
        "{}",
        b.stderr()
    );
    drop(b);

    // Alice goes away: the name stays hers (offline, not unknown), and Bob still cannot
    // take it.
    a.kill().await;
    host.wait_status("myapp", 503).await;
    let out = host
        .ssh(&sb, &bob)
        .args(["-N", "-R", &format!("myapp:80:127.0.0.1:{}", bob_app.port)])
        .output()
        .await;
    assert!(!out.status.success(), "bob's -R myapp was accepted");
    assert!(
        out.stderr.contains("remote port forwarding failed"),
        "{}",
        out.stderr
    );
    wait_log_count(
        &host,
        "refused -R myapp:80: myapp belongs to another key",
        2,
    )
    .await;
    assert_eq!(host.whoami("myapp").await.0, 503);

    // Alice reconnects and gets it again, with a second requested name (the cap is 2).
    let mut a = host
        .ssh(&sb, &alice)
        .args([
            "-R",
            &format!("myapp:80:127.0.0.1:{}", alice_app.port),
            "-R",
            &format!("second:80:127.0.0.1:{}", alice_second.port),
        ])
        .spawn();
    a.wait_line("the prompt", |l| l == "Press Ctrl-C to close the tunnel.")
        .await;
    host.wait_served("myapp", &alice_app).await;
    host.wait_served("second", &alice_second).await;
    // A third is over the cap: refused with the words plugin's reason.
    let mut a3 = host
        .ssh(&sb, &alice)
        .opt("ExitOnForwardFailure=no")
        .args([
            "-R",
            &format!("third:80:127.0.0.1:{}", alice_app.port),
            "-R",
            &format!("80:127.0.0.1:{}", alice_app.port),
        ])
        .spawn();
    a3.wait_line("the cap refusal", |l| {
        l == "p0rt: refused -R third:80: the naming policy refused it: this key already owns \
              2 requested names (the cap is 2); ask the operator to raise it or to release one"
    })
    .await;
    assert_eq!(host.whoami("third").await.0, 404);
    host.wait_served(&alice_name, &alice_app).await;
    drop(a3);
    drop(a);

    // The grants are stored, and survive a restart.
    host.restart().await;
    let granted: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(host.data_dir().join("granted-names.json"))
            .expect("granted-names.json"),
    )
    .expect("granted-names.json is JSON");
    let names: Vec<&String> = granted.as_object().expect("an object").keys().collect();
    assert_eq!(names, ["myapp", "second"], "{granted}");
    for name in names {
        assert_eq!(granted[name]["ssh_key_hash"], alice.key_hash(), "{granted}");
    }
    words_configured(&host, &words).await;
    assert_eq!(host.whoami("myapp").await.0, 503);
    let out = host
        .ssh(&sb, &bob)
        .args(["-N", "-R", &format!("myapp:80:127.0.0.1:{}", bob_app.port)])
        .output()
        .await;
    assert!(!out.status.success(), "bob took myapp after the restart");
    assert!(
        host.log()
            .contains("refused -R myapp:80: myapp belongs to another key"),
        "{}",
        host.log()
    );
    let _a = host
        .ssh(&sb, &alice)
        .args([
            "-N",
            "-R",
            &format!("myapp:80:127.0.0.1:{}", alice_app.port),
        ])
        .spawn();
    host.wait_served("myapp", &alice_app).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Owner options: allow/deny, https-only, the echo of the options
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn owner_options_allow_deny_https_only_and_their_echo() {
    let sb = Sandbox::new();
    let (k_allow, k_deny, k_https, k_echo) = (
        sb.key("allow"),
        sb.key("deny"),
        sb.key("https"),
        sb.key("echo"),
    );
    let (b_allow, b_deny, b_https, b_echo) = (
        Backend::start("allow-backend").await,
        Backend::start("deny-backend").await,
        Backend::start("https-backend").await,
        Backend::start("echo-backend").await,
    );
    let mut host = Host::start(&sb).await;
    let status = plugin_status(&host).await;
    assert!(
        status.iter().any(|p| p["name"] == "access"
            && p["role"] == "request-policy"
            && p["origin"] == "bundled"
            && p["active"] == true),
        "bundled access not serving request-policy: {status:#?}"
    );
    let (c2, c3, c1) = (
        client_from("127.0.0.2"),
        client_from("127.0.0.3"),
        client_from("127.0.0.1"),
    );

    // allow=127.0.0.2/32: only that address gets through.
    let (s_allow, allow_name) =
        options_tunnel(&host, &sb, &k_allow, &b_allow, "allow=127.0.0.2/32").await;
    assert_eq!(
        option_lines(&s_allow),
        ["p0rt: options accepted: allow=127.0.0.2/32"]
    );
    let ok = judged(&host, || get(&c2, &host, &allow_name, "/whoami")).await;
    assert_eq!(
        (ok.status, ok.body.as_str()),
        (200, "allow-backend"),
        "{ok:?}"
    );
    let hits = b_allow.hits();
    for (client, ip) in [(&c3, "127.0.0.3"), (&c1, "127.0.0.1")] {
        let no = judged(&host, || get(client, &host, &allow_name, "/whoami")).await;
        assert_eq!(no.status, 403, "from {ip}: {no:?}");
        assert!(
            no.body
                .contains(&format!("{ip} is not allowed by the tunnel owner")),
            "from {ip}: {no:?}"
        );
    }
    assert_eq!(
        b_allow.hits(),
        hits,
        "a refused request reached the backend"
    );
    // The owner's terminal shows the refusals.
    let mut s_allow = s_allow;
    s_allow
        .wait_line("GET /whoami 403 (denied by the access policy)", |l| {
            l == "GET /whoami 403 (denied by the access policy)"
        })
        .await;

    // deny=127.0.0.3: everyone else gets through.
    let (_s_deny, deny_name) = options_tunnel(&host, &sb, &k_deny, &b_deny, "deny=127.0.0.3").await;
    let no = judged(&host, || get(&c3, &host, &deny_name, "/whoami")).await;
    assert_eq!(no.status, 403, "{no:?}");
    assert!(
        no.body.contains("not allowed by the tunnel owner"),
        "{no:?}"
    );
    for client in [&c2, &c1] {
        let ok = judged(&host, || get(client, &host, &deny_name, "/whoami")).await;
        assert_eq!(
            (ok.status, ok.body.as_str()),
            (200, "deny-backend"),
            "{ok:?}"
        );
    }

    // https-only: plain http is redirected, with the path and query, without reaching the
    // backend.
    let (_s_https, https_name) = options_tunnel(&host, &sb, &k_https, &b_https, "https-only").await;
    let client = no_redirects();
    let hits = b_https.hits();
    let moved = judged(&host, || {
        get(&client, &host, &https_name, "/echo/deep?q=1&r=two")
    })
    .await;
    assert_eq!(moved.status, 308, "{moved:?}");
    assert_eq!(
        moved.header("location"),
        Some(format!("https://{https_name}.localhost/echo/deep?q=1&r=two").as_str()),
        "{moved:?}"
    );
    assert_eq!(moved.headers.get(LOCATION).iter().count(), 1);
    let post = judged(&host, || {
        client
            .post(host.url("/sha256"))
            .header(HOST, host.host_header(&https_name))
            .body("payload")
    })
    .await;
    assert_eq!(post.status, 308, "{post:?}");
    assert_eq!(
        post.header("location"),
        Some(format!("https://{https_name}.localhost/sha256").as_str())
    );
    assert_eq!(
        b_https.hits(),
        hits,
        "a redirected request reached the backend"
    );

    // The echo: accepted options in order (the password masked), each refused word with
    // its reason; the password appears nowhere.
    let password = "Tr0ub4dor-and-3";
    let (s_echo, echo_name) = options_tunnel(
        &host,
        &sb,
        &k_echo,
        &b_echo,
        &format!(
            "allow=127.0.0.2/32 auth=alice:{password} https-only Bad=1 verbose auth=bob: deny=x:=1"
        ),
    )
    .await;
    assert_eq!(
        option_lines(&s_echo),
        [
            "p0rt: options accepted: allow=127.0.0.2/32 auth=alice:*** https-only deny=x:=1".to_string(),
            "p0rt: option refused: Bad=1: an option is key=value with a key of a-z, 0-9 and '-' (at most 32)".to_string(),
            "p0rt: option refused: verbose: not a flag; use verbose=<value>".to_string(),
            "p0rt: option refused: auth=bob:***: the password is empty".to_string(),
        ]
    );
    // The host checks the shape of options, the access plugin their meaning: the malformed
    // deny= refuses every request, naming the option (fails closed, not open).
    let bad = judged(&host, || get(&c2, &host, &echo_name, "/whoami")).await;
    assert_eq!(bad.status, 403, "{bad:?}");
    assert!(bad.body.contains("option `deny` is invalid"), "{bad:?}");
    assert_eq!(b_echo.hits(), 0);
    let everything = format!(
        "{}\n{}\n{}",
        s_echo.lines().join("\n"),
        s_echo.stderr(),
        host.log()
    );
    assert!(
        !everything.contains(password),
        "the password leaked:\n{everything}"
    );

    // Options without any tunnel are refused, with a hint.
    let out = host
        .ssh(&sb, &sb.key("lonely"))
        .command("allow=127.0.0.2/32")
        .output()
        .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{:?} {:?}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout
            .contains("p0rt: options apply to this connection's tunnels, and it has none; add -R 80:localhost:<port>"),
        "{:?}",
        out.stdout
    );
    assert!(host.is_running());
}

// ---------------------------------------------------------------------------------------------
// 3. Owner options: basic auth and header edits
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn owner_options_basic_auth_and_header_edits() {
    let sb = Sandbox::new();
    let (k_auth, k_edit, k_sub) = (sb.key("locked"), sb.key("shaped"), sb.key("sub"));
    let (b_auth, b_edit, b_sub) = (
        Backend::start("locked-backend").await,
        Backend::start("shaped-backend").await,
        Backend::start("sub-backend").await,
    );
    let mut host = Host::start(&sb).await;
    let client = http_client();

    // auth=alice:<password>, plus a request header for admitted requests only.
    let password = "c0rrect-h0rse-Battery";
    let (mut s_auth, auth_name) = options_tunnel(
        &host,
        &sb,
        &k_auth,
        &b_auth,
        &format!("auth=alice:{password} set-header=X-Tunnel-User:alice"),
    )
    .await;
    assert_eq!(
        option_lines(&s_auth),
        ["p0rt: options accepted: auth=alice:*** set-header=X-Tunnel-User:alice"]
    );
    let hits = b_auth.hits();
    let expected_challenge = r#"Basic realm="p0rt", charset="UTF-8""#;
    let cases: [(&str, Option<(&str, &str)>); 4] = [
        ("no credentials", None),
        ("a wrong password", Some(("alice", "c0rrect-h0rse-battery"))),
        ("a wrong user", Some(("bob", password))),
        ("an empty password", Some(("alice", ""))),
    ];
    for (what, credentials) in cases {
        let denied = judged(&host, || {
            let request = get(&client, &host, &auth_name, "/echo");
            match credentials {
                Some((user, pass)) => request.basic_auth(user, Some(pass)),
                None => request,
            }
        })
        .await;
        assert_eq!(denied.status, 401, "{what}: {denied:?}");
        assert_eq!(
            denied.header(WWW_AUTHENTICATE.as_str()),
            Some(expected_challenge),
            "{what}: {denied:?}"
        );
        assert!(
            denied
                .body
                .contains("this tunnel needs a user name and password"),
            "{what}: {denied:?}"
        );
    }
    // Not basic auth at all.
    let bearer = judged(&host, || {
        get(&client, &host, &auth_name, "/echo").bearer_auth(password)
    })
    .await;
    assert_eq!(bearer.status, 401, "{bearer:?}");
    assert_eq!(
        b_auth.hits(),
        hits,
        "a request without valid credentials reached the backend"
    );

    let admitted = judged(&host, || {
        get(&client, &host, &auth_name, "/echo/inside")
            .basic_auth("alice", Some(password))
            .header("x-client", "kept")
    })
    .await;
    let echo = admitted.echo();
    assert_eq!(echo["path"], "/echo/inside", "{echo}");
    assert_eq!(
        seen(&echo, "authorization"),
        Vec::<String>::new(),
        "the backend saw the credentials: {echo}"
    );
    assert_eq!(seen(&echo, "x-tunnel-user"), ["alice"], "{echo}");
    assert_eq!(seen(&echo, "x-client"), ["kept"], "{echo}");
    assert_eq!(b_auth.hits(), hits + 1);
    s_auth
        .wait_line("GET /echo 401 (credentials required)", |l| {
            l == "GET /echo 401 (credentials required)"
        })
        .await;
    s_auth
        .wait_line("GET /echo/inside 200 Nms", |l| {
            l.starts_with("GET /echo/inside 200 ") && l.ends_with("ms")
        })
        .await;
    // The password (and the credentials as sent) appear neither on the owner's terminal nor
    // in the host's log.
    let sent = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("alice:{password}"),
    );
    let everything = format!(
        "{}\n{}\n{}",
        s_auth.lines().join("\n"),
        s_auth.stderr(),
        host.log()
    );
    for secret in [password, sent.as_str()] {
        assert!(
            !everything.contains(secret),
            "{secret:?} leaked:\n{everything}"
        );
    }

    // Header edits: host=, set-header=, remove-header=, response-header=.
    let (_s_edit, edit_name) = options_tunnel(
        &host,
        &sb,
        &k_edit,
        &b_edit,
        "host=internal.example set-header=X-Extra:42 remove-header=X-Drop response-header=X-Resp:yes",
    )
    .await;
    let shaped = judged(&host, || {
        get(&client, &host, &edit_name, "/echo/shaped?x=1")
            .header("x-drop", "secret-ish")
            .header("x-keep", "1")
    })
    .await;
    assert_eq!(shaped.header("x-resp"), Some("yes"), "{shaped:?}");
    let echo = shaped.echo();
    assert_eq!(echo["backend"], "shaped-backend", "{echo}");
    assert_eq!(echo["path"], "/echo/shaped?x=1", "{echo}");
    assert_eq!(seen(&echo, "host"), ["internal.example"], "{echo}");
    assert_eq!(
        seen(&echo, "x-forwarded-host"),
        [host.host_header(&edit_name)],
        "{echo}"
    );
    assert_eq!(seen(&echo, "x-extra"), ["42"], "{echo}");
    assert_eq!(seen(&echo, "x-drop"), Vec::<String>::new(), "{echo}");
    assert_eq!(seen(&echo, "x-keep"), ["1"], "{echo}");
    // The response edit also applies to the backend's own errors.
    let missing = judged(&host, || get(&client, &host, &edit_name, "/nothing-here")).await;
    assert_eq!(missing.status, 404, "{missing:?}");
    assert_eq!(missing.body, "backend: no such path");
    assert_eq!(missing.header("x-resp"), Some("yes"), "{missing:?}");

    // Control: a tunnel without options is served unchanged, and a requested label is a
    // sub-name by default (no grant without the operator's configuration).
    let sub_main = host.info(&sb, &k_sub).await.name;
    let _s_sub = host
        .ssh(&sb, &k_sub)
        .args(["-N", "-R", &format!("myapp:80:127.0.0.1:{}", b_sub.port)])
        .spawn();
    let sub = format!("myapp-{sub_main}");
    host.wait_served(&sub, &b_sub).await;
    assert_eq!(host.whoami("myapp").await.0, 404);
    let plain = Answer::of(get(&client, &host, &sub, "/echo").header("x-drop", "1")).await;
    let echo = plain.echo();
    assert_eq!(seen(&echo, "host"), [host.host_header(&sub)], "{echo}");
    assert_eq!(seen(&echo, "x-drop"), ["1"], "{echo}");
    assert_eq!(plain.header("x-resp"), None);
    assert!(host.is_running());
}

// ---------------------------------------------------------------------------------------------
// 4. A hostile request policy: its bad verdicts are refused and the host keeps serving
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn hostile_request_policy_verdicts_are_contained() {
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    let sidecar = |mode: &str| json!({ "config": { "mode": mode } });
    // A plugin file with the request-policy role replaces the bundled access plugin.
    let wasm = install(
        &dir,
        "hostile-policy",
        &read(&fixture("hostile_policy.wasm")),
        Some(sidecar("admit-host")),
    );
    let (k_open, k_owned) = (sb.key("open"), sb.key("owned"));
    let (b_open, b_owned) = (
        Backend::start("open-backend").await,
        Backend::start("owned-backend").await,
    );
    let mut host = host_with_plugins(&sb, &dir).await;
    let active = wait_active(&host, "request-policy", &wasm).await;
    assert_eq!(active["wit_version"], "0.2.0", "{active}");
    let status = plugin_status(&host).await;
    assert!(
        !status
            .iter()
            .any(|p| p["role"] == "request-policy" && p["origin"] == "bundled"),
        "the bundled access plugin still serves request-policy: {status:#?}"
    );
    let client = http_client();

    // A tunnel without owner options, and one with (a harmless one: the fixture ignores
    // options, but their presence makes the host fail closed). Set up while the fixture is
    // well-behaved; each bad mode is then loaded in turn (a hot reload of its sidecar).
    let (_s_open, open) = host.tunnel(&sb, &k_open, &b_open).await;
    let (_s_owned, owned) =
        options_tunnel(&host, &sb, &k_owned, &b_owned, "set-header=X-Owner:1").await;

    let loaded = loaded_line(&wasm, "request-policy");
    let mut loads = 1;
    for (mode, reason) in [
        (
            "bad-header",
            r#"returned an invalid decision: "bad header" is not a header name"#,
        ),
        (
            "huge-body",
            "returned an invalid decision: answer body of 1048576 bytes is over 4096",
        ),
        (
            "bad-status",
            "returned an invalid decision: deny status 200 is not a 4xx or 5xx code",
        ),
        (
            "bad-redirect",
            "returned an invalid decision: redirect location must be an http(s) URL",
        ),
        (
            "bad-edit",
            r#"returned an invalid decision: "bad name" is not a header name"#,
        ),
        ("trap", "trapped"),
    ] {
        write_atomic(
            &dir.join("hostile-policy.json"),
            sidecar(mode).to_string().as_bytes(),
        );
        loads += 1;
        wait_log_count(&host, &loaded, loads).await;
        // The owner-options tunnel first: its 503 must be the fail-closed answer to this
        // mode's bad verdict. (The reload swaps the plugin in just after logging it, so ask
        // until the new mode's failure shows.)
        let check_owned = |i: u32| {
            let (client, host, owned, b_owned) = (&client, &host, &owned, &b_owned);
            async move {
                let hits = b_owned.hits();
                let answer = Answer::of(get(client, host, owned, "/whoami")).await;
                assert_eq!(answer.status, 503, "mode {mode} #{i}: {answer:?}");
                assert!(
                    answer.body.contains(POLICY_UNAVAILABLE),
                    "mode {mode} #{i}: {answer:?}"
                );
                assert_eq!(
                    answer.header(RETRY_AFTER.as_str()),
                    Some("5"),
                    "mode {mode} #{i}"
                );
                assert!(
                    answer.body.len() < 1024,
                    "mode {mode} #{i}: {} bytes",
                    answer.body.len()
                );
                assert!(
                    answer.headers.get("injected").is_none()
                        && answer.headers.get(LOCATION).is_none(),
                    "mode {mode} #{i}: {answer:?}"
                );
                assert_eq!(
                    b_owned.hits(),
                    hits,
                    "mode {mode} #{i}: reached the backend"
                );
            }
        };
        let has_line = |log: &str, what: &str| {
            log.lines()
                .any(|l| l.contains(" WARN ") && l.contains(what) && l.contains(reason))
        };
        let closed =
            "request policy fails closed (503, the owner set options): plugin hostile-policy (";
        eventually(
            WAIT,
            &format!("mode {mode}: {reason:?} in the log"),
            || async {
                check_owned(0).await;
                has_line(&host.log(), closed).then_some(())
            },
        )
        .await;

        // Without owner options: admitted unchanged, nothing of the verdict shows.
        let check_open = |i: u32| {
            let (client, host, open) = (&client, &host, &open);
            async move {
                let answer = Answer::of(get(client, host, open, "/echo/open")).await;
                let echo = answer.echo();
                assert_eq!(echo["backend"], "open-backend", "mode {mode} #{i}");
                assert_eq!(
                    seen(&echo, "host"),
                    [host.host_header(open)],
                    "mode {mode} #{i}"
                );
                assert!(
                    !answer.body.contains("injected") && seen(&echo, "x-from-policy").is_empty(),
                    "mode {mode} #{i}: {echo}"
                );
                assert!(answer.headers.get("injected").is_none(), "mode {mode} #{i}");
            }
        };
        check_open(0).await;
        let log = host.log();
        assert!(
            has_line(
                &log,
                "request policy falls back to admitting: plugin hostile-policy ("
            ),
            "mode {mode}: no fallback line with {reason:?}:\n{log}"
        );
        // Again and again (the plugin gets benched on the way: same answers).
        for i in 1..4 {
            check_owned(i).await;
            check_open(i).await;
        }
        assert!(
            host.is_running(),
            "mode {mode}: the host died:\n{}",
            host.log()
        );
    }
    // Failing again and again, it was benched (the fallbacks answered meanwhile).
    let log = host.log();
    assert!(log.contains("plugin hostile-policy ("), "{log}");
    assert!(log.contains("benched for"), "{log}");

    // The well-behaved mode: its edits reach the backend and the client, on both tunnels.
    write_atomic(
        &dir.join("hostile-policy.json"),
        sidecar("admit-host").to_string().as_bytes(),
    );
    wait_log_count(&host, &loaded, loads + 1).await;
    let echo = eventually(WAIT, "the admit-host edits", || async {
        let answer = Answer::of(get(&client, &host, &open, "/echo/edited")).await;
        (answer.status == 200 && answer.header("x-policy") == Some("seen")).then(|| answer.echo())
    })
    .await;
    assert_eq!(seen(&echo, "host"), ["rewritten.example"], "{echo}");
    assert_eq!(seen(&echo, "x-from-policy"), ["yes"], "{echo}");
    assert_eq!(
        seen(&echo, "x-forwarded-host"),
        [host.host_header(&open)],
        "{echo}"
    );
    let answer = judged(&host, || get(&client, &host, &owned, "/echo/owned")).await;
    assert_eq!(answer.header("x-policy"), Some("seen"), "{answer:?}");
    let echo = answer.echo();
    assert_eq!(echo["backend"], "owned-backend", "{echo}");
    assert_eq!(seen(&echo, "host"), ["rewritten.example"], "{echo}");
    assert_eq!(seen(&echo, "x-from-policy"), ["yes"], "{echo}");
    assert!(host.is_running());
}

// ---------------------------------------------------------------------------------------------
// 5. The operator's access configuration (a sidecar alone configures the bundled plugin)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn operator_access_config_applies_to_every_tunnel() {
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    let access = dir.join("access.json");
    let config = |owner_options: bool| {
        json!({ "config": {
            "deny": ["127.0.0.9/32"],
            "realm": "staging area",
            "response_headers": { "x-served-by": "p0rt-e2e" },
            "owner_options": owner_options,
        }})
        .to_string()
    };
    write_atomic(&access, config(true).as_bytes());
    let (k_plain, k_locked) = (sb.key("plain"), sb.key("locked"));
    let (b_plain, b_locked) = (
        Backend::start("plain-backend").await,
        Backend::start("locked-backend").await,
    );
    let host = host_with_plugins(&sb, &dir).await;
    let origin = access.display().to_string();
    let entry = wait_plugin(&host, &origin, "access.json to configure access", |p| {
        p["active"] == true
    })
    .await;
    assert_eq!(entry["name"], "access", "{entry}");
    assert_eq!(entry["role"], "request-policy", "{entry}");
    let (c1, c9) = (client_from("127.0.0.1"), client_from("127.0.0.9"));

    // A tunnel without options: the operator's deny list and response headers apply.
    let (_s_plain, plain) = host.tunnel(&sb, &k_plain, &b_plain).await;
    let ok = judged(&host, || get(&c1, &host, &plain, "/whoami")).await;
    assert_eq!(
        (ok.status, ok.body.as_str()),
        (200, "plain-backend"),
        "{ok:?}"
    );
    assert_eq!(ok.header("x-served-by"), Some("p0rt-e2e"), "{ok:?}");
    let hits = b_plain.hits();
    let no = judged(&host, || get(&c9, &host, &plain, "/whoami")).await;
    assert_eq!(no.status, 403, "{no:?}");
    assert!(no.body.contains("127.0.0.9 is not allowed here"), "{no:?}");
    assert_eq!(b_plain.hits(), hits, "a denied request reached the backend");

    // A tunnel with auth: the operator's realm; the operator's response header wins over
    // the owner's of the same name; the operator's deny list comes before the login.
    let (_s_locked, locked) = options_tunnel(
        &host,
        &sb,
        &k_locked,
        &b_locked,
        "auth=carol:pw-for-carol response-header=X-Served-By:owner response-header=X-Owner:yes",
    )
    .await;
    let challenge = judged(&host, || get(&c1, &host, &locked, "/whoami")).await;
    assert_eq!(challenge.status, 401, "{challenge:?}");
    assert_eq!(
        challenge.header(WWW_AUTHENTICATE.as_str()),
        Some(r#"Basic realm="staging area", charset="UTF-8""#),
        "{challenge:?}"
    );
    let with = |client: &reqwest::Client| {
        get(client, &host, &locked, "/whoami").basic_auth("carol", Some("pw-for-carol"))
    };
    let ok = judged(&host, || with(&c1)).await;
    assert_eq!(
        (ok.status, ok.body.as_str()),
        (200, "locked-backend"),
        "{ok:?}"
    );
    assert_eq!(ok.header("x-owner"), Some("yes"), "{ok:?}");
    let served_by: Vec<_> = ok.headers.get_all("x-served-by").iter().collect();
    assert_eq!(served_by, ["p0rt-e2e"], "{ok:?}");
    let no = judged(&host, || with(&c9)).await;
    assert_eq!(no.status, 403, "{no:?}");

    // owner_options: false (a hot reload of the sidecar): the owners' options are ignored.
    write_atomic(&access, config(false).as_bytes());
    let open = eventually(WAIT, "the owner's auth= to be ignored", || async {
        let answer = judged(&host, || get(&c1, &host, &locked, "/whoami")).await;
        (answer.status == 200).then_some(answer)
    })
    .await;
    assert_eq!(open.body, "locked-backend");
    assert_eq!(open.header("x-owner"), None, "{open:?}");
    assert_eq!(open.header("x-served-by"), Some("p0rt-e2e"), "{open:?}");
    let no = judged(&host, || get(&c9, &host, &locked, "/whoami")).await;
    assert_eq!(no.status, 403, "{no:?}");
}
