//! Scale-out (issue 15): three p0rt hosts on one Redis (standalone, and a three-master
//! Cluster) serve every tunnel whichever host the client reached. Real `redis-server`
//! processes, the real OpenSSH client, real HTTP and WebSocket clients, `curl` for a
//! second loopback source address.
//!
//! Leases are set to the shortest allowed (3 s) so that a dead host's records expire
//! quickly; every wait is a poll with a generous bound, never a timed assertion.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::redis_support::{RedisCluster, RedisServer, require_redis};
use crate::support::*;

/// The shared secret of the test cluster (≥ 32 characters).
const SECRET: &str = "cluster-test-secret-0123456789abcdef";
const TEN_MB: u64 = 10 * 1024 * 1024;
/// Bound for one 10 MB transfer through two hosts and SSH (debug builds are slow).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);
/// Generous bound for what the leases decide (expiry, renewal after a Redis restart).
const LEASE_WAIT: Duration = Duration::from_secs(30);

enum SharedRedis {
    One(RedisServer),
    Cluster(RedisCluster),
}

impl SharedRedis {
    async fn start(cluster: bool) -> SharedRedis {
        require_redis();
        if cluster {
            SharedRedis::Cluster(RedisCluster::start().await)
        } else {
            SharedRedis::One(RedisServer::start().await)
        }
    }

    fn url(&self) -> String {
        match self {
            SharedRedis::One(redis) => redis.url(),
            SharedRedis::Cluster(cluster) => cluster.url(),
        }
    }
}

/// A clustered host `id` on the Redis at `url`, its data in `<sandbox>/<id>`.
fn cluster_host(sb: &Sandbox, id: &str, url: &str) -> HostConfig {
    HostConfig::flags(&sb.join(id))
        .env("STORAGE_TYPE", "redis")
        .env("REDIS_URL", url)
        .env("CLUSTER_ENABLED", "true")
        .env("CLUSTER_LISTEN", "127.0.0.1:0")
        .env("CLUSTER_SECRET", SECRET)
        .env("CLUSTER_HOST_ID", id)
        .env("CLUSTER_LEASE_SECONDS", "3")
}

/// The internal listener's address, from the host's startup line.
fn internal_addr(host: &Host, id: &str) -> std::net::SocketAddr {
    let log = host.log();
    let marker = format!("cluster: host id {id} on ");
    let at = log
        .find(&marker)
        .unwrap_or_else(|| panic!("no cluster startup line in the log:\n{log}"));
    let rest = &log[at + marker.len()..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// The host ids `/status/cluster` lists on `host`.
async fn listed_hosts(host: &Host) -> Vec<String> {
    let status = host.get_base("/status/cluster").await.json_value().await;
    status["hosts"]
        .as_array()
        .map(|hosts| {
            hosts
                .iter()
                .filter_map(|h| h["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_hosts(host: &Host, expected: &[&str]) {
    eventually(
        LEASE_WAIT,
        &format!("hosts {expected:?} listed"),
        || async {
            let listed = listed_hosts(host).await;
            (listed == expected).then_some(())
        },
    )
    .await;
}

/// 10 MB up (chunked) and down through `host`, hashed at the far end.
async fn ten_megabytes_both_ways(host: &Host, name: &str) {
    let client = http_client();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..TEN_MB / 65536)
        .map(|i| Ok(pattern(i * 65536 + 3, 65536)))
        .collect();
    let mut hasher = Sha256::new();
    for c in &chunks {
        hasher.update(c.as_ref().unwrap());
    }
    let expected_up = hex::encode(hasher.finalize());
    let upload = client
        .post(host.url("/sha256"))
        .header("host", host.host_header(name))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send();
    let res = tokio::time::timeout(TRANSFER_TIMEOUT, upload)
        .await
        .expect("upload timed out")
        .expect("upload failed");
    assert_eq!(res.status(), 200);
    let answer = res.json_value().await;
    assert_eq!(answer["len"], TEN_MB, "{answer}");
    assert_eq!(answer["sha256"], expected_up, "{answer}");
    let download = async {
        let res = client
            .get(host.url(&format!("/bytes/{TEN_MB}")))
            .header("host", host.host_header(name))
            .send()
            .await
            .expect("download failed");
        assert_eq!(res.status(), 200);
        let mut stream = res.bytes_stream();
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.expect("download body");
            len += chunk.len() as u64;
            hasher.update(&chunk);
        }
        (len, hex::encode(hasher.finalize()))
    };
    let (len, digest) = tokio::time::timeout(TRANSFER_TIMEOUT, download)
        .await
        .expect("download timed out");
    assert_eq!(len, TEN_MB);
    assert_eq!(digest, pattern_sha256(TEN_MB));
}

async fn websocket_echo(host: &Host, name: &str) {
    let tcp = TcpStream::connect(host.http_addr()).await.unwrap();
    let url = format!("ws://{}/ws", host.host_header(name));
    let (mut ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tcp))
        .await
        .expect("websocket handshake timed out")
        .expect("websocket handshake through another host");
    assert_eq!(response.status(), 101);
    let sent = vec![
        Message::text("hello through two hosts"),
        Message::binary(pattern(11, 200 * 1024)),
        Message::text("last"),
    ];
    for msg in &sent {
        ws.send(msg.clone()).await.expect("send");
    }
    for expected in &sent {
        let got = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("echo timed out")
            .expect("stream ended")
            .expect("websocket error");
        assert_eq!(&got, expected);
    }
    ws.close(None).await.expect("close");
}

/// `X-Forwarded-For` the backend saw for a request sent from 127.0.0.2 through `host`.
fn forwarded_for_from_127_0_0_2(host: &Host, name: &str) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "15", "--interface", "127.0.0.2", "-H"])
        .arg(format!("Host: {}", host.host_header(name)))
        .arg(host.url("/echo"))
        .output()
        .expect("`curl` not found: install curl (apt-get install -y curl)");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let echo: serde_json::Value = serde_json::from_slice(&out.stdout).expect("echo JSON");
    let headers = echo["headers"].as_array().expect("headers");
    let values: Vec<&str> = headers
        .iter()
        .filter(|h| h[0] == "x-forwarded-for")
        .filter_map(|h| h[1].as_str())
        .collect();
    assert!(
        !headers.iter().any(|h| h[0]
            .as_str()
            .is_some_and(|n| n.starts_with("x-p0rt-cluster"))),
        "internal headers reached the backend: {echo}"
    );
    values.join(",")
}

/// `GET /whoami` straight to an internal listener, signed with `secret` as host
/// `intruder` would sign it, for a client at 203.0.113.9.
async fn signed_get(
    internal: std::net::SocketAddr,
    host_header: &str,
    secret: &str,
) -> (u16, String) {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("host", host_header.parse().unwrap());
    p0rt::cluster::auth::Signer::new(secret).sign(
        &mut headers,
        p0rt::unix_now(),
        "intruder",
        &http::Method::GET,
        "/whoami",
        "203.0.113.9".parse().unwrap(),
        false,
    );
    let res = http_client()
        .get(format!("http://{internal}/whoami"))
        .headers(headers)
        .send()
        .await
        .expect("internal listener answers");
    (res.status().as_u16(), res.text().await.unwrap_or_default())
}

/// A request straight to an internal listener: no signature, a wrong secret, a tampered
/// client address; each refused with 403 before any tunnel sees it.
async fn forged_requests_are_refused(
    internal: std::net::SocketAddr,
    host_header: &str,
    backend: &Backend,
) {
    use p0rt::cluster::auth::{CLIENT_IP_HEADER, Signer};
    let hits = backend.hits();
    let send = |headers: reqwest::header::HeaderMap| async move {
        let res = http_client()
            .get(format!("http://{internal}/whoami"))
            .headers(headers)
            .send()
            .await
            .expect("internal listener answers");
        (res.status().as_u16(), res.text().await.unwrap_or_default())
    };
    let base = || {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("host", host_header.parse().unwrap());
        headers
    };
    let (status, body) = send(base()).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not signed"), "{body}");
    let sign = |secret: &str| {
        let mut headers = base();
        Signer::new(secret).sign(
            &mut headers,
            p0rt::unix_now(),
            "intruder",
            &http::Method::GET,
            "/whoami",
            "203.0.113.9".parse().unwrap(),
            false,
        );
        headers
    };
    let (status, body) = send(sign("wrong-secret-wrong-secret-wrong-secret")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("does not match"), "{body}");
    let mut tampered = sign(SECRET);
    tampered.insert(CLIENT_IP_HEADER, "10.0.0.1".parse().unwrap());
    let (status, body) = send(tampered).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        backend.hits(),
        hits,
        "a refused request reached the backend"
    );
    // Signed with the right secret, the same request is served: the secret is the check.
    let (status, body) = send(sign(SECRET)).await;
    assert_eq!((status, body.as_str()), (200, backend.id.as_str()));
}

async fn three_hosts(cluster: bool) {
    let sb = Sandbox::new();
    let mut redis = SharedRedis::start(cluster).await;
    let url = redis.url();
    let key = sb.key("owner");
    let mut a = Host::start_with(&sb, cluster_host(&sb, "host-a", &url)).await;
    let b = Host::start_with(&sb, cluster_host(&sb, "host-b", &url)).await;
    let c = Host::start_with(&sb, cluster_host(&sb, "host-c", &url)).await;
    wait_hosts(&b, &["host-a", "host-b", "host-c"]).await;

    // A tunnel on A answers through B and C.
    let on_a = Backend::start("on-a").await;
    let (_client_a, name) = a.tunnel(&sb, &key, &on_a).await;
    b.wait_served(&name, &on_a).await;
    c.wait_served(&name, &on_a).await;
    ten_megabytes_both_ways(&b, &name).await;
    ten_megabytes_both_ways(&c, &name).await;
    websocket_echo(&b, &name).await;
    // The backend sees the client's own address, not the forwarding host's.
    assert_eq!(forwarded_for_from_127_0_0_2(&b, &name), "127.0.0.2");
    forged_requests_are_refused(internal_addr(&a, "host-a"), &a.host_header(&name), &on_a).await;
    // A signed request to a host that does not serve the name: 503 there, never
    // forwarded again (to A, which does).
    let hits = on_a.hits();
    let (status, body) =
        signed_get(internal_addr(&c, "host-c"), &c.host_header(&name), SECRET).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(on_a.hits(), hits, "a forwarded request was forwarded again");

    // A dies without a word: B says 503 (the owning host is unreachable, then the record
    // expires), and once the key reconnects to C, B routes there.
    a.kill().await;
    b.wait_status(&name, 503).await;
    let on_c = Backend::start("on-c").await;
    let _client_c = c
        .ssh(&sb, &key)
        .args(["-N", "-R", &format!("80:127.0.0.1:{}", on_c.port)])
        .spawn();
    c.wait_served(&name, &on_c).await;
    b.wait_served(&name, &on_c).await;
    wait_hosts(&b, &["host-b", "host-c"]).await;

    // The same key connecting to B while its tunnel is on C: B serves it at once, C lets
    // its old tunnel go (and routes to B); no request reaches the old session.
    // A download in flight on C's session when the takeover comes finishes intact.
    let in_flight = http_client()
        .get(c.url(&format!("/bytes/{TEN_MB}")))
        .header("host", c.host_header(&name))
        .send()
        .await
        .expect("download starts");
    assert_eq!(in_flight.status(), 200);
    let mut in_flight = in_flight.bytes_stream();
    let first = tokio::time::timeout(WAIT, in_flight.next())
        .await
        .expect("first bytes")
        .expect("a chunk")
        .expect("body");
    let on_b = Backend::start("on-b").await;
    let _client_b = b
        .ssh(&sb, &key)
        .args(["-N", "-R", &format!("80:127.0.0.1:{}", on_b.port)])
        .spawn();
    b.wait_served(&name, &on_b).await;
    c.wait_served(&name, &on_b).await;
    eventually(WAIT, "C logs the takeover", || async {
        c.log()
            .contains(&format!("{name}: taken over by a newer connection"))
            .then_some(())
    })
    .await;
    let rest = async {
        let mut hasher = Sha256::new();
        hasher.update(&first);
        let mut len = first.len() as u64;
        while let Some(chunk) = in_flight.next().await {
            let chunk = chunk.expect("the in-flight download was cut");
            len += chunk.len() as u64;
            hasher.update(&chunk);
        }
        (len, hex::encode(hasher.finalize()))
    };
    let (len, digest) = tokio::time::timeout(TRANSFER_TIMEOUT, rest)
        .await
        .expect("in-flight download timed out");
    assert_eq!((len, digest), (TEN_MB, pattern_sha256(TEN_MB)));
    let hits_c = on_c.hits();
    for _ in 0..20 {
        assert_eq!(c.whoami(&name).await, (200, "on-b".to_string()));
    }
    assert_eq!(
        on_c.hits(),
        hits_c,
        "a request went to the replaced session"
    );

    // Redis restarts empty: the hosts write their records again and routing recovers
    // without restarting any host.
    if let SharedRedis::One(server) = &mut redis {
        server.restart().await;
        c.wait_served(&name, &on_b).await;
        wait_hosts(&c, &["host-b", "host-c"]).await;
        // Takeovers still reach C after it subscribed again.
        let on_c2 = Backend::start("on-c2").await;
        let _client_c2 = c
            .ssh(&sb, &key)
            .args(["-N", "-R", &format!("80:127.0.0.1:{}", on_c2.port)])
            .spawn();
        c.wait_served(&name, &on_c2).await;
        b.wait_served(&name, &on_c2).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_hosts_on_one_redis_serve_every_tunnel() {
    three_hosts(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_hosts_on_a_redis_cluster_serve_every_tunnel() {
    three_hosts(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn clustering_without_redis_or_secret_is_refused_naming_the_setting() {
    let sb = Sandbox::new();
    for (env, needle) in [
        (
            vec![("CLUSTER_ENABLED", "true"), ("CLUSTER_SECRET", SECRET)],
            "cluster.enabled",
        ),
        (
            vec![
                ("CLUSTER_ENABLED", "true"),
                ("STORAGE_TYPE", "redis"),
                ("CLUSTER_LISTEN", "127.0.0.1:0"),
            ],
            "cluster.secret",
        ),
        (
            vec![
                ("CLUSTER_ENABLED", "true"),
                ("STORAGE_TYPE", "redis"),
                ("CLUSTER_SECRET", SECRET),
            ],
            "CLUSTER_ADVERTISE",
        ),
    ] {
        let mut config = HostConfig::flags(&sb.data_dir());
        for (k, v) in &env {
            config = config.env(k, *v);
        }
        let (code, stderr) = run_host_to_exit(&sb, &config, WAIT).await;
        assert_eq!(code, Some(2), "{env:?}: {stderr}");
        assert!(stderr.contains(needle), "{env:?}: {stderr}");
        assert!(!stderr.contains(SECRET), "the secret was printed: {stderr}");
    }
}

/// The request policy runs once, on the owning host, with the owner's session options: a
/// tunnel on A locked with `auth=…` asks a visitor of B for credentials (B itself knows
/// nothing of them), admits the right ones, and the owner's terminal on A logs the requests
/// that came through B.
#[tokio::test(flavor = "multi_thread")]
async fn the_owners_options_and_request_log_apply_through_another_host() {
    let sb = Sandbox::new();
    let redis = SharedRedis::start(false).await;
    let url = redis.url();
    let key = sb.key("locked");
    let a = Host::start_with(&sb, cluster_host(&sb, "host-a", &url)).await;
    let b = Host::start_with(&sb, cluster_host(&sb, "host-b", &url)).await;
    let backend = Backend::start("locked").await;
    let password = "c0rrect-h0rse-Battery";
    let (session, name) =
        crate::policy::options_tunnel(&a, &sb, &key, &backend, &format!("auth=alice:{password}"))
            .await;
    let client = http_client();
    let via_b = |credentials: Option<&str>| {
        let request = client
            .get(b.url("/whoami"))
            .header("host", b.host_header(&name));
        match credentials {
            Some(pass) => request.basic_auth("alice", Some(pass)),
            None => request,
        }
    };
    // Until B sees the location record, it answers 503 (offline) rather than 401.
    eventually(WAIT, "B forwards to A", || async {
        let res = via_b(None).send().await.ok()?;
        (res.status() == 401).then_some(())
    })
    .await;
    let hits = backend.hits();
    let res = via_b(Some("wrong")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert!(
        res.headers()
            .get("www-authenticate")
            .is_some_and(|v| v.to_str().unwrap().starts_with("Basic realm=")),
        "{res:?}"
    );
    assert_eq!(
        backend.hits(),
        hits,
        "a refused request reached the backend"
    );
    let res = via_b(Some(password)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "locked");
    let mut session = session;
    session
        .wait_line("the owner's log of the request through B", |l| {
            l.starts_with("GET /whoami 200")
        })
        .await;
    assert!(
        session
            .lines()
            .iter()
            .any(|l| l.starts_with("GET /whoami 401")),
        "{:?}",
        session.lines()
    );
}
