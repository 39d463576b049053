//! Real traffic through a tunnel: WebSocket, large bodies both ways, concurrency, headers.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

const TEN_MB: u64 = 10 * 1024 * 1024;
/// Bound for one 10 MB transfer through SSH (debug builds are slow).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread")]
async fn websocket_echo_through_tunnel() {
    let sb = Sandbox::new();
    let key = sb.key("ws");
    let backend = Backend::start("ws-backend").await;
    let host = Host::start(&sb).await;
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;

    let tcp = TcpStream::connect(host.http_addr()).await.unwrap();
    // The URL only sets the Host header and path; the socket is already connected to the edge.
    let url = format!("ws://{}/ws", host.host_header(&name));
    let (mut ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tcp))
        .await
        .expect("websocket handshake timed out")
        .expect("websocket handshake through the edge");
    assert_eq!(response.status(), 101);

    let big = pattern(7, 300 * 1024);
    let mut sent = vec![
        Message::text("hello through p0rt ✓"),
        Message::binary(big.clone()),
    ];
    for i in 0..50 {
        sent.push(Message::text(format!("message {i}")));
    }
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
    // The close handshake completes and the stream ends.
    let rest = tokio::time::timeout(WAIT, async {
        while let Some(Ok(msg)) = ws.next().await {
            assert!(msg.is_close(), "unexpected frame after close: {msg:?}");
        }
    })
    .await;
    assert!(rest.is_ok(), "websocket did not close");

    // Plain requests still work on the tunnel afterwards.
    assert_eq!(host.whoami(&name).await, (200, "ws-backend".to_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_megabytes_up_and_down_intact() {
    let sb = Sandbox::new();
    let key = sb.key("bulk");
    let backend = Backend::start("bulk-backend").await;
    let host = Host::start(&sb).await;
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;
    let client = http_client();

    // Upload: streamed (chunked) request body, hashed by the backend.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..TEN_MB / 65536)
        .map(|i| Ok(pattern(i * 65536 + 3, 65536)))
        .collect();
    let mut hasher = Sha256::new();
    for c in chunks.iter() {
        hasher.update(c.as_ref().unwrap());
    }
    let expected_up = hex::encode(hasher.finalize());
    let upload = client
        .post(host.url("/sha256"))
        .header("host", host.host_header(&name))
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

    // Download: streamed (chunked) from the backend, hashed here.
    let download = async {
        let res = client
            .get(host.url(&format!("/bytes/{TEN_MB}")))
            .header("host", host.host_header(&name))
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

#[tokio::test(flavor = "multi_thread")]
async fn hundred_concurrent_requests_all_correct() {
    let sb = Sandbox::new();
    let key = sb.key("many");
    let backend = Backend::start("many-backend").await;
    let host = Host::start(&sb).await;
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;
    let client = http_client();
    let hits_before = backend.hits();

    // Three rounds on one keep-alive client: later rounds reuse pooled connections.
    for round in 0..3 {
        let mut tasks = Vec::new();
        for i in 0..100 {
            let (client, url, host_header) = (
                client.clone(),
                host.url(&format!("/echo/{round}/{i}?n={i}")),
                host.host_header(&name),
            );
            tasks.push(tokio::spawn(async move {
                let res = client
                    .get(url)
                    .header("host", host_header)
                    .header("x-request", i.to_string())
                    .send()
                    .await?;
                let status = res.status().as_u16();
                let text = res.text().await?;
                Ok::<_, reqwest::Error>((i, status, text))
            }));
        }
        let results = tokio::time::timeout(
            Duration::from_secs(60),
            futures_util::future::join_all(tasks),
        )
        .await
        .expect("100 requests did not finish in 60 s");
        for result in results {
            let (i, status, text) = result
                .unwrap()
                .unwrap_or_else(|e| panic!("request failed: {e}"));
            assert_eq!(status, 200, "request {i}: {text}");
            let echo: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(echo["path"], format!("/echo/{round}/{i}?n={i}"), "{echo}");
            let x_request = echo["headers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|h| h[0] == "x-request")
                .map(|h| h[1].clone());
            assert_eq!(x_request, Some(serde_json::json!(i.to_string())), "{echo}");
        }
    }
    assert_eq!(backend.hits() - hits_before, 300);
}

fn header<'a>(echo: &'a serde_json::Value, name: &str) -> Vec<&'a str> {
    echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == name)
        .map(|h| h[1].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_headers_are_set_by_the_edge() {
    let sb = Sandbox::new();
    let key = sb.key("fwd");
    let backend = Backend::start("fwd-backend").await;
    let host = Host::start(&sb).await;
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;

    let res = http_client()
        .post(host.url("/echo/headers?q=1"))
        .header("host", host.host_header(&name))
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .header("x-custom", "kept")
        .body("twelve bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let echo = res.json_value().await;
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo/headers?q=1");
    assert_eq!(echo["body_len"], 12);
    assert_eq!(header(&echo, "x-forwarded-for"), ["127.0.0.1"], "{echo}");
    assert_eq!(header(&echo, "x-forwarded-proto"), ["http"], "{echo}");
    assert_eq!(
        header(&echo, "x-forwarded-host"),
        [host.host_header(&name).as_str()],
        "{echo}"
    );
    assert_eq!(
        header(&echo, "host"),
        [host.host_header(&name).as_str()],
        "{echo}"
    );
    assert_eq!(header(&echo, "x-custom"), ["kept"], "{echo}");

    // X-Forwarded-Host never routes: an unknown Host stays unknown even if it names the tunnel.
    let hits = backend.hits();
    let res = http_client()
        .get(host.url("/whoami"))
        .header("host", host.host_header("nobody-here-at-all"))
        .header("x-forwarded-host", host.host_header(&name))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(
        backend.hits(),
        hits,
        "backend reached through X-Forwarded-Host"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_domain_stats_on_base_domain() {
    let sb = Sandbox::new();
    let (k1, k2, k3) = (sb.key("k1"), sb.key("k2"), sb.key("k3"));
    let host = Host::start(&sb).await;

    let res = host.get_base("/health").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap().trim(), "ok");

    let stats = host.get_base("/domain-stats").await.json_value().await;
    assert_eq!(stats["total_domains"], 0, "{stats}");
    assert_eq!(stats["storage_type"], "json", "{stats}");

    for k in [&k1, &k2, &k3] {
        host.info(&sb, k).await;
    }
    let res = host.get_base("/domain-stats").await;
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{:?}",
        res.headers()
    );
    let stats = res.json_value().await;
    assert_eq!(stats["total_domains"], 3, "{stats}");
    assert_eq!(stats["active_last_24h"], 3, "{stats}");
    assert_eq!(stats["active_last_7d"], 3, "{stats}");
    assert_eq!(stats["storage_type"], "json", "{stats}");

    // Unknown paths on the base domain are 404, not a tunnel lookup.
    assert_eq!(host.get_base("/nope").await.status(), 404);
}
