//! Review findings on the HTTP edge (issue #9, defect 11): who gets blamed for a bad
//! request, `CONNECT`, a backend response framed twice, and a `Host` with an empty label.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::*;

/// Request bodies whose chunked framing is broken by the client.
const MALFORMED_CHUNKED: [(&str, &str); 2] = [
    (
        "chunk size overflowing 64 bits",
        "FFFFFFFFFFFFFFFFF5\r\nhello\r\n0\r\n\r\n",
    ),
    ("LF-only chunk lines", "5\nhello\n0\n\n"),
];

#[tokio::test(flavor = "multi_thread")]
async fn malformed_chunked_request_body_is_the_clients_fault() {
    let sb = Sandbox::new();
    let key = sb.key("chunked");
    let backend = Backend::start("chunked-backend").await;
    let host = Host::start(&sb).await;
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;
    let good = host.host_header(&name);

    for (what, body) in MALFORMED_CHUNKED {
        let request = format!(
            "POST /sha256 HTTP/1.1\r\nHost: {good}\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
        );
        let res = raw_http(host.http_addr(), request.as_bytes()).await;
        assert_eq!(res.status, Some(400), "{what}: {}", res.raw);
        assert!(!res.raw.contains("Bad Gateway"), "{what}: {}", res.raw);
    }

    // Control: the same upload framed correctly is served.
    let request = format!(
        "POST /sha256 HTTP/1.1\r\nHost: {good}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let res = raw_http(host.http_addr(), request.as_bytes()).await;
    assert_eq!(res.status, Some(200), "{}", res.raw);
    assert!(res.body.contains("\"len\":5"), "{}", res.raw);
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_gets_405_and_never_reaches_the_backend() {
    let sb = Sandbox::new();
    let key = sb.key("connect");
    let backend = Backend::start("connect-backend").await;
    let host = Host::start(&sb).await;
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;
    let hits = backend.hits();

    for authority in [format!("{name}.localhost:80"), host.host_header(&name)] {
        let request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        let res = raw_http(host.http_addr(), request.as_bytes()).await;
        assert_eq!(res.status, Some(405), "CONNECT {authority}: {}", res.raw);
    }
    assert_eq!(backend.hits(), hits, "a CONNECT reached the backend");
}

/// A backend that answers every request with `response` and closes.
async fn raw_backend(response: &'static [u8]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                // One request head (the edge's requests here have no body).
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match socket.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let _ = socket.write_all(response).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    port
}

/// 58 bytes, sent as one chunk (0x3a) under a stale `Content-Length: 2`.
const PAYLOAD: &str = "fifty-eight bytes of body that must all reach the client!!";
const DOUBLE_FRAMED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3a\r\nfifty-eight bytes of body that must all reach the client!!\r\n0\r\n\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn response_with_length_and_chunked_reaches_the_client_whole() {
    assert_eq!(PAYLOAD.len(), 0x3a);
    let sb = Sandbox::new();
    let key = sb.key("framing");
    let port = raw_backend(DOUBLE_FRAMED).await;
    let host = Host::start(&sb).await;
    let name = host.info(&sb, &key).await.name;
    let _client = host
        .ssh(&sb, &key)
        .args(["-N", "-R", &format!("80:127.0.0.1:{port}")])
        .spawn();
    host.wait_status(&name, 200).await;

    // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3): all 58 bytes arrive.
    let res = host.get(&name, "/").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), PAYLOAD);

    // On the wire the stale length is gone.
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        host.host_header(&name)
    );
    let res = raw_http(host.http_addr(), request.as_bytes()).await;
    assert_eq!(res.status, Some(200), "{}", res.raw);
    assert!(
        !res.head.to_ascii_lowercase().contains("content-length: 2"),
        "{}",
        res.head
    );
    assert!(res.body.contains(PAYLOAD), "{}", res.raw);
}

#[tokio::test(flavor = "multi_thread")]
async fn host_with_an_empty_label_gets_400() {
    let sb = Sandbox::new();
    let key = sb.key("dots");
    let backend = Backend::start("dots-backend").await;
    let host = Host::start(&sb).await;
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;
    let hits = backend.hits();

    for bad in [
        format!("{name}.localhost.."),
        format!("{name}.localhost..:{}", host.http_port),
        format!("{name}..localhost"),
        format!(".{name}.localhost"),
    ] {
        let request = format!("GET /whoami HTTP/1.1\r\nHost: {bad}\r\nConnection: close\r\n\r\n");
        let res = raw_http(host.http_addr(), request.as_bytes()).await;
        assert_eq!(res.status, Some(400), "Host: {bad}: {}", res.raw);
    }
    assert_eq!(backend.hits(), hits, "a malformed Host reached the backend");

    // Control: one trailing dot (a fully qualified name) still routes.
    let request =
        format!("GET /whoami HTTP/1.1\r\nHost: {name}.localhost.\r\nConnection: close\r\n\r\n");
    let res = raw_http(host.http_addr(), request.as_bytes()).await;
    assert_eq!(
        (res.status, res.body.as_str()),
        (Some(200), "dots-backend"),
        "{}",
        res.raw
    );
}
