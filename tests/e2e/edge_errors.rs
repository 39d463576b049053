//! Status codes the HTTP edge produces itself: 404, 503, 502, 400, 431, slow-header cutoff.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn unknown_names_get_404_without_reflection() {
    let sb = Sandbox::new();
    let host = Host::start(&sb).await;
    // The path carries an (encoded) markup probe; the body must echo neither it nor the host.
    let probe = "zz-probe-%3Cscript%3Ealert(1)%3C/script%3E";
    for host_header in [
        format!("zzprobe7f3a.localhost:{}", host.http_port),
        format!("deeper.zzprobe7f3a.localhost:{}", host.http_port),
        "zzprobe7f3a.example.com".to_string(),
    ] {
        let res = raw_http(
            host.http_addr(),
            format!("GET /{probe} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(res.status, Some(404), "{host_header}: {}", res.raw);
        assert!(
            !res.raw.contains("zzprobe7f3a"),
            "404 reflects the host: {}",
            res.raw
        );
        assert!(
            !res.raw.contains("zz-probe") && !res.raw.contains("script"),
            "404 reflects the path: {}",
            res.raw
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn known_name_without_tunnel_gets_503() {
    let sb = Sandbox::new();
    let key = sb.key("offline");
    let backend = Backend::start("offline-backend").await;
    let host = Host::start(&sb).await;
    let name = host.info(&sb, &key).await.name;

    let res = host.get(&name, "/").await;
    assert_eq!(res.status(), 503);
    assert!(res.text().await.unwrap().contains("tunnel offline"));

    // Up, then down again.
    let (mut client, _) = host.tunnel(&sb, &key, &backend).await;
    client.kill().await;
    host.wait_status(&name, 503).await;
    let res = host.get(&name, "/").await;
    assert!(res.text().await.unwrap().contains("tunnel offline"));
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_refusing_connections_gets_502() {
    let sb = Sandbox::new();
    let key = sb.key("closed");
    let host = Host::start(&sb).await;
    let name = host.info(&sb, &key).await.name;
    let closed_port = free_port();

    let client = host
        .ssh(&sb, &key)
        .args(["-N", "-R", &format!("80:127.0.0.1:{closed_port}")])
        .spawn();
    // 503 until the forward is registered, then 502 because nothing listens behind it.
    let mut last = (0, String::new());
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        last = host.whoami(&name).await;
        if last.0 != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        last.0,
        502,
        "body {:?}; ssh stderr {:?}",
        last.1,
        client.stderr()
    );
    assert!(last.1.contains("Bad Gateway"), "{}", last.1);
    // Repeatable, and the SSH connection survives it.
    assert_eq!(host.whoami(&name).await.0, 502);
    drop(client);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_host_headers_get_400() {
    let sb = Sandbox::new();
    let key = sb.key("hosts");
    let backend = Backend::start("hosts-backend").await;
    let host = Host::start(&sb).await;
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;
    let good = host.host_header(&name);
    let other = host.host_header("someone-else");
    let port = host.http_port;

    let cases: Vec<(&str, String)> = vec![
        (
            "missing Host (HTTP/1.0)",
            "GET /whoami HTTP/1.0\r\n\r\n".to_string(),
        ),
        (
            "missing Host (HTTP/1.1)",
            "GET /whoami HTTP/1.1\r\nConnection: close\r\n\r\n".to_string(),
        ),
        (
            "duplicate Host",
            format!("GET /whoami HTTP/1.1\r\nHost: {good}\r\nHost: {good}\r\n\r\n"),
        ),
        (
            "two different Hosts",
            format!("GET /whoami HTTP/1.1\r\nHost: {good}\r\nHost: {other}\r\n\r\n"),
        ),
        (
            "userinfo in Host",
            format!("GET /whoami HTTP/1.1\r\nHost: user@{good}\r\n\r\n"),
        ),
        (
            "non-numeric port",
            format!("GET /whoami HTTP/1.1\r\nHost: {name}.localhost:http\r\n\r\n"),
        ),
        (
            "negative port",
            format!("GET /whoami HTTP/1.1\r\nHost: {name}.localhost:-1\r\n\r\n"),
        ),
        (
            "space in Host",
            format!("GET /whoami HTTP/1.1\r\nHost: {name} .localhost:{port}\r\n\r\n"),
        ),
        (
            "empty Host",
            "GET /whoami HTTP/1.1\r\nHost: \r\n\r\n".to_string(),
        ),
        (
            "absolute-form target disagrees with Host",
            format!("GET http://{other}/whoami HTTP/1.1\r\nHost: {good}\r\n\r\n"),
        ),
    ];
    let hits = backend.hits();
    let mut wrong = Vec::new();
    for (what, request) in &cases {
        let res = raw_http(host.http_addr(), request.as_bytes()).await;
        if res.status != Some(400) {
            wrong.push(format!(
                "{what}: got {:?}, want 400; response {:?}",
                res.status, res.raw
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "bad Host headers not refused:\n{}",
        wrong.join("\n")
    );
    assert_eq!(backend.hits(), hits, "a bad request reached the backend");

    // Controls: the same requests done right are served.
    let res = raw_http(
        host.http_addr(),
        format!("GET /whoami HTTP/1.1\r\nHost: {good}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(
        (res.status, res.body.as_str()),
        (Some(200), "hosts-backend"),
        "{}",
        res.raw
    );
    let res = raw_http(
        host.http_addr(),
        format!("GET http://{good}/whoami HTTP/1.1\r\nHost: {good}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(
        (res.status, res.body.as_str()),
        (Some(200), "hosts-backend"),
        "{}",
        res.raw
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_headers_get_431() {
    let sb = Sandbox::new();
    let key = sb.key("big");
    let backend = Backend::start("big-backend").await;
    let host = Host::start(&sb).await;
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;
    let good = host.host_header(&name);
    let hits = backend.hits();

    // More than 64 KiB of headers, in one header and spread over many; more than 100 lines.
    // Each request goes out in one write, so the edge sees it all at once.
    let huge = "a".repeat(70 * 1024);
    let spread: String = (0..40)
        .map(|i| format!("X-Part-{i}: {}\r\n", "b".repeat(2000)))
        .collect();
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases = [
        (
            "one 70 KiB header",
            format!("GET /whoami HTTP/1.1\r\nHost: {good}\r\nX-Big: {huge}\r\n\r\n"),
        ),
        (
            "80 KB over 40 headers",
            format!("GET /whoami HTTP/1.1\r\nHost: {good}\r\n{spread}\r\n"),
        ),
        (
            "150 header lines",
            format!("GET /whoami HTTP/1.1\r\nHost: {good}\r\n{many}\r\n"),
        ),
    ];
    let mut wrong = Vec::new();
    for (what, request) in &cases {
        let res = raw_http(host.http_addr(), request.as_bytes()).await;
        if res.status != Some(431) {
            wrong.push(format!(
                "{what}: got {:?}, want 431; head {:?}",
                res.status, res.head
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "oversized headers not refused:\n{}",
        wrong.join("\n")
    );
    assert_eq!(
        backend.hits(),
        hits,
        "an oversized request reached the backend"
    );

    // Controls within the limits are served.
    let some: String = (0..50).map(|i| format!("X-H{i}: v\r\n")).collect();
    let medium = "c".repeat(16 * 1024);
    let res = raw_http(
        host.http_addr(),
        format!("GET /whoami HTTP/1.1\r\nHost: {good}\r\n{some}X-Medium: {medium}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(
        (res.status, res.body.as_str()),
        (Some(200), "big-backend"),
        "{}",
        res.head
    );
}

/// Outcome of a slow client: how long until the edge closed, and what it sent.
async fn slow_client(host: &Host, trickle: bool) -> (Duration, String) {
    let start = Instant::now();
    let mut stream = TcpStream::connect(host.http_addr()).await.unwrap();
    stream
        .write_all(
            format!(
                "GET / HTTP/1.1\r\nHost: localhost:{}\r\nX-Slow: ",
                host.http_port
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let limit = Duration::from_secs(16);
    let mut received = Vec::new();
    loop {
        let step = if trickle {
            Duration::from_millis(300)
        } else {
            limit
        };
        let (bytes, closed) = read_until_closed(&mut stream, step).await;
        received.extend(bytes);
        if closed || start.elapsed() >= limit {
            break;
        }
        // Trickle: one more header byte now and then, never finishing the head.
        if stream.write_all(b"x").await.is_err() {
            break;
        }
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed < limit,
        "slow client (trickle={trickle}) not cut off within {limit:?}"
    );
    (elapsed, String::from_utf8_lossy(&received).to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_headers_are_cut_off() {
    let sb = Sandbox::new();
    let host = Host::start(&sb).await;
    let (stalled, trickled) = tokio::join!(slow_client(&host, false), slow_client(&host, true));
    for (what, (elapsed, text)) in [("stalled", stalled), ("trickling", trickled)] {
        // Cut off by the header timeout, not refused at once.
        assert!(
            elapsed >= Duration::from_secs(5),
            "{what} client closed after only {elapsed:?}"
        );
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{what} client got {text:?}"
        );
    }
    // The edge still serves normal requests.
    assert_eq!(host.get_base("/health").await.status(), 200);
}
