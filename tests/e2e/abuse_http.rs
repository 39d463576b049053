//! The HTTP edge under abuse, through the real binary, OpenSSH and real HTTP clients: a
//! request body that stops arriving is cut off, a slow backend holds at most its tunnel's
//! in-flight cap (the rest get 503 with `Retry-After`), connections per client address are
//! capped, and `X-Forwarded-For` counts only from configured trusted proxies.

use std::time::{Duration, Instant};

use reqwest::header::HOST;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use crate::plugins::client_from;
use crate::policy::{Answer, get, options_tunnel, seen};
use crate::support::*;

/// The host's limits, as documented (host/src/http/limits.rs).
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_IN_FLIGHT_PER_TUNNEL: usize = 128;
const MAX_CONNECTIONS_PER_IP: usize = 256;

/// A TCP connection to the edge from `ip`.
async fn connect_from(ip: &str, host: &Host) -> tokio::net::TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{ip}:0").parse().unwrap())
        .expect("bind a loopback source address");
    socket.connect(host.http_addr()).await.expect("connect")
}

#[tokio::test]
async fn a_request_body_that_stops_arriving_is_cut_off() {
    require_tools();
    let sb = Sandbox::new();
    let host = Host::start(&sb).await;
    let backend = Backend::start("stall").await;
    let key = sb.key("stall");
    let (_tunnel, name) = host.tunnel(&sb, &key, &backend).await;

    // Content-Length 100, 3 bytes sent, then silence (issue 13's reproduction).
    let mut conn = connect_from("127.0.0.1", &host).await;
    let head = format!(
        "POST /sha256 HTTP/1.1\r\nHost: {}\r\nContent-Length: 100\r\n\r\nabc",
        host.host_header(&name)
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(BODY_IDLE_TIMEOUT * 2, conn.read_to_end(&mut got)).await;
    let waited = started.elapsed();
    assert!(
        read.is_ok(),
        "the connection was still open after {waited:?}"
    );
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 408"),
        "a stalled body should get 408, got {text:?}"
    );
    assert!(text.contains("x-p0rt-error: client"), "{text}");
    assert!(
        waited >= BODY_IDLE_TIMEOUT - Duration::from_secs(2),
        "cut off after {waited:?}, before the idle timeout"
    );
    // The tunnel still serves.
    let (status, _) = host.whoami(&name).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_slow_backend_holds_at_most_its_in_flight_cap() {
    require_tools();
    let sb = Sandbox::new();
    let host = Host::start(&sb).await;
    let backend = Backend::start("slow").await;
    let key = sb.key("slow");
    let (_tunnel, name) = host.tunnel(&sb, &key, &backend).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();

    // Fill the cap with requests the backend holds at its gate.
    let mut waiting = Vec::new();
    for _ in 0..MAX_IN_FLIGHT_PER_TUNNEL {
        let request = client
            .post(host.url("/gated-sha256"))
            .header(HOST, host.host_header(&name))
            .body("payload");
        waiting.push(tokio::spawn(async move {
            request.send().await.map(|r| r.status().as_u16())
        }));
    }
    eventually(
        Duration::from_secs(30),
        "every slot is held at the gate",
        || async { (backend.gated() >= MAX_IN_FLIGHT_PER_TUNNEL).then_some(()) },
    )
    .await;
    let over = Answer::of(get(&client, &host, &name, "/whoami")).await;
    assert_eq!(over.status, 503, "{over:?}");
    assert_eq!(over.header("retry-after"), Some("1"), "{over:?}");
    assert_eq!(over.header("x-p0rt-error"), Some("tunnel"), "{over:?}");
    assert!(over.body.contains("busy"), "{over:?}");
    let hits = backend.hits();

    backend.open_gate();
    for request in waiting {
        assert_eq!(request.await.unwrap().expect("a held request"), 200);
    }
    // Every slot came back.
    let after = Answer::of(get(&client, &host, &name, "/whoami")).await;
    assert_eq!(after.status, 200, "{after:?}");
    assert!(backend.hits() > hits);
}

#[tokio::test]
async fn connections_per_client_address_are_capped() {
    require_tools();
    let sb = Sandbox::new();
    let host = Host::start(&sb).await;
    let backend = Backend::start("conns").await;
    let key = sb.key("conns");
    let (_tunnel, name) = host.tunnel(&sb, &key, &backend).await;

    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_IP {
        held.push(connect_from("127.0.0.6", &host).await);
    }
    // The edge has accepted them all once a request on a new connection from another
    // address is served (accept is in order).
    let other = client_from("127.0.0.7");
    let answer = Answer::of(get(&other, &host, &name, "/whoami")).await;
    assert_eq!(answer.status, 200, "{answer:?}");

    // One more from the same address is closed at once, without an answer.
    let mut extra = connect_from("127.0.0.6", &host).await;
    let request = format!(
        "GET /whoami HTTP/1.1\r\nHost: {}\r\n\r\n",
        host.host_header(&name)
    );
    let _ = extra.write_all(request.as_bytes()).await;
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut got)).await;
    assert!(closed.is_ok(), "the connection over the cap stayed open");
    assert!(
        got.is_empty(),
        "answered over the cap: {:?}",
        String::from_utf8_lossy(&got)
    );

    // Freed slots are usable again.
    drop(held);
    let again = client_from("127.0.0.6");
    eventually(
        Duration::from_secs(10),
        "the address is served again",
        || async {
            let answer = Answer::of(get(&again, &host, &name, "/whoami")).await;
            (answer.status == 200).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn forwarded_for_counts_only_from_trusted_proxies() {
    require_tools();
    let sb = Sandbox::new();
    let config = HostConfig::flags(&sb.data_dir()).env("HTTP_TRUSTED_PROXIES", "127.0.0.2/32");
    let host = Host::start_with(&sb, config).await;
    let backend = Backend::start("xff").await;
    let key = sb.key("xff");
    // The owner admits one client address: the forwarded one.
    let (_session, name) = options_tunnel(&host, &sb, &key, &backend, "allow=203.0.113.9").await;
    let claim = "6.6.6.6, 203.0.113.9";

    // Through the trusted proxy: the rightmost address it vouches for is the client.
    let proxy = client_from("127.0.0.2");
    let through =
        Answer::of(get(&proxy, &host, &name, "/echo").header("x-forwarded-for", claim)).await;
    assert_eq!(seen(&through.echo(), "x-forwarded-for"), ["203.0.113.9"]);

    // From anyone else the header is the client's own claim: ignored.
    let direct = client_from("127.0.0.3");
    let spoofed =
        Answer::of(get(&direct, &host, &name, "/echo").header("x-forwarded-for", claim)).await;
    assert_eq!(
        spoofed.status, 403,
        "a spoofed X-Forwarded-For was believed: {spoofed:?}"
    );
    assert!(spoofed.body.contains("127.0.0.3"), "{spoofed:?}");
    // And the trusted proxy without the header is just itself.
    let bare = Answer::of(get(&proxy, &host, &name, "/echo")).await;
    assert_eq!(bare.status, 403, "{bare:?}");
}

#[tokio::test]
async fn trusted_proxies_must_be_addresses() {
    require_tools();
    let sb = Sandbox::new();
    let config =
        HostConfig::flags(&sb.data_dir()).env("HTTP_TRUSTED_PROXIES", "10.0.0.0/8,nonsense");
    let (status, output) = run_host_to_exit(&sb, &config, Duration::from_secs(30)).await;
    assert_eq!(status, Some(2), "{output}");
    assert!(
        output.contains("http.trusted_proxies") && output.contains("nonsense"),
        "{output}"
    );
}

#[tokio::test]
async fn idle_sockets_never_keep_requests_out_and_keep_alive_idles_are_closed() {
    require_tools();
    let sb = Sandbox::new();
    let host = Host::start(&sb).await;
    let backend = Backend::start("idle").await;
    let key = sb.key("idle");
    let (_tunnel, name) = host.tunnel(&sb, &key, &backend).await;

    // 3 000 sockets that send nothing, from 12 addresses (each under its own cap).
    let mut idle = Vec::new();
    for i in 0..3_000 {
        idle.push(connect_from(&format!("127.0.8.{}", 1 + i % 12), &host).await);
    }
    let fresh = client_from("127.0.0.9");
    let started = Instant::now();
    let answer = Answer::of(get(&fresh, &host, &name, "/whoami")).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    println!(
        "request served beside 3000 idle sockets in {:?}",
        started.elapsed()
    );

    // They are all closed by the header deadline (10 s), with nothing sent.
    let mut first = idle.swap_remove(0);
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), first.read_to_end(&mut got)).await;
    assert!(
        closed.is_ok(),
        "an idle socket outlived the header deadline"
    );
    drop(idle);

    // A keep-alive connection that goes quiet after a request is closed too.
    let mut conn = connect_from("127.0.0.9", &host).await;
    let request = format!(
        "GET /whoami HTTP/1.1\r\nHost: {}\r\n\r\n",
        host.host_header(&name)
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "an idle keep-alive connection stayed open");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "closed too early: {:?}",
        started.elapsed()
    );
}
