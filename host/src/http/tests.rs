//! In-process tests of the HTTP phases: a real edge on 127.0.0.1, a real JSON store in a
//! temp dir, the built-in policy, and tunnels whose link is a plain TCP connection to a
//! real loopback backend (no OpenSSH).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::Empty;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;

use super::*;
use crate::names::{KeyHash, TunnelName};
use crate::policy::BuiltinPolicy;
use crate::store::json::JsonStore;
use crate::tunnels::{KeyIdentity, LinkError, SessionId, SessionOutput, TunnelLink, UpstreamIo};

/// Bound for "this should happen soon" polls.
const WAIT: Duration = Duration::from_secs(5);

/// Reaches the backend at an address, as an SSH client's `-R` would.
struct TcpLink(SocketAddr);

#[async_trait]
impl TunnelLink for TcpLink {
    async fn open_stream(&self, _peer: SocketAddr) -> Result<Box<dyn UpstreamIo>, LinkError> {
        let stream = TcpStream::connect(self.0)
            .await
            .map_err(|e| LinkError(e.to_string()))?;
        Ok(Box::new(stream))
    }
}

/// A loopback HTTP backend that answers with what it saw and counts its connections.
struct Backend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl Backend {
    async fn start(id: &'static str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let counts = (accepted.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counts.0.fetch_add(1, Ordering::SeqCst);
                counts.1.fetch_add(1, Ordering::SeqCst);
                let open = counts.1.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| async move {
                        let seen = |name: &str| {
                            let values: Vec<_> = req
                                .headers()
                                .get_all(name)
                                .iter()
                                .map(|v| v.to_str().unwrap_or("?").to_string())
                                .collect();
                            values.join("|")
                        };
                        let text = format!(
                            "{id} {} {} xff={} xfh={} xfp={}",
                            req.method(),
                            req.uri(),
                            seen("x-forwarded-for"),
                            seen("x-forwarded-host"),
                            seen("x-forwarded-proto"),
                        );
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                    // The connection is over: the edge (or the test) closed it.
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Backend {
            addr,
            accepted,
            open,
        }
    }
}

/// An edge serving on 127.0.0.1 with its own store; stops when dropped.
struct Edge {
    addr: SocketAddr,
    edge: Arc<HttpEdge>,
    tunnels: Arc<TunnelService>,
    store: Arc<JsonStore>,
    _stop: crate::shutdown::StopSender,
    _dir: tempfile::TempDir,
}

impl Edge {
    async fn start(idle_timeout: Duration) -> Edge {
        Edge::start_with_pool(idle_timeout, super::upstream::MAX_IDLE_UPSTREAMS_PER_TUNNEL).await
    }

    /// The same with an upstream pool keeping `max_per_tunnel` connections per tunnel.
    async fn start_with_pool(idle_timeout: Duration, max_per_tunnel: usize) -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let store = JsonStore::open(dir.path()).unwrap();
        let tunnels = Arc::new(TunnelService::new(store.clone(), Arc::new(BuiltinPolicy)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scans = crate::scan::ScanService::new(
            Arc::new(crate::scan::queue::MemoryJobs::new(Duration::from_secs(60))),
            Arc::new(BuiltinPolicy),
            tunnels.clone(),
            crate::scan::ScanSettings::default(),
            crate::scan::EdgeAddress {
                addr,
                domain: "localhost".into(),
            },
        );
        let edge = Arc::new(HttpEdge {
            tunnels: tunnels.clone(),
            requests: Arc::new(BuiltinPolicy),
            upstreams: UpstreamPool::with_max_per_tunnel(idle_timeout, max_per_tunnel),
            store: store.clone(),
            cache: Cache::in_memory(),
            domain: "localhost".into(),
            admin_token: None,
            ssh_port: 2222,
            plugin_status: Arc::new(|| serde_json::json!({})),
            scans,
            tokens: Arc::new(crate::tokens::TokenStore::open_file(dir.path()).unwrap()),
            trusted_proxies: crate::http::TrustedProxies::default(),
            limits: crate::http::HttpLimits::default(),
            cluster: None,
            admin: None,
        });
        let (stop_tx, stop) = crate::shutdown::channel();
        tokio::spawn(serve(listener, edge.clone(), stop));
        Edge {
            addr,
            edge,
            tunnels,
            store,
            _stop: stop_tx,
            _dir: dir,
        }
    }

    /// Serves `name` for the key `owner` with a new session reaching `backend`; returns
    /// the tunnel and its request log, line by line.
    fn open(
        &self,
        name: &str,
        owner: &str,
        backend: SocketAddr,
    ) -> (
        Arc<Tunnel>,
        tokio::io::Lines<BufReader<tokio::io::DuplexStream>>,
    ) {
        let key = KeyIdentity {
            hash: KeyHash::from_stored(owner),
            fingerprint: format!("SHA256:{owner}"),
        };
        let (output, sink) = SessionOutput::new();
        let (terminal, log) = tokio::io::duplex(64 * 1024);
        tokio::spawn(sink.run(terminal, false));
        let opened = self
            .tunnels
            .open(
                &key,
                SessionId::next(),
                TunnelName::parse(name).unwrap(),
                Arc::new(TcpLink(backend)),
                output,
                Arc::new(crate::tunnels::SessionOptions::default()),
            )
            .unwrap_or_else(|e| panic!("open {name}: {e}"));
        (opened.tunnel, BufReader::new(log).lines())
    }

    /// Sends `request` (its `Host` set by the caller) on a new connection; returns status,
    /// headers and body.
    async fn send(&self, request: Request<Empty<Bytes>>) -> (StatusCode, HeaderMap, String) {
        let io = TokioIo::new(TcpStream::connect(self.addr).await.unwrap());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let response = sender.send_request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    async fn get(&self, host: &str, path: &str) -> (StatusCode, String) {
        let request = Request::get(path)
            .header(header::HOST, host)
            .body(Empty::new())
            .unwrap();
        let (status, _, body) = self.send(request).await;
        (status, body)
    }
}

use http::HeaderMap;

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_request_goes_through_every_phase_to_the_backend() {
    let backend = Backend::start("one").await;
    let edge = Edge::start(UPSTREAM_IDLE_PERIOD).await;
    let (_tunnel, mut log) = edge.open("demo", "aa11", backend.addr);

    // The client's forwarded headers are replaced by the edge's own.
    let request = Request::get("/path?q=1")
        .header(header::HOST, "Demo.localhost:8080")
        .header("x-forwarded-for", "10.6.6.6")
        .header("x-forwarded-host", "bank.example")
        .header("x-forwarded-proto", "https")
        .body(Empty::new())
        .unwrap();
    let (status, _, body) = edge.send(request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        "one GET /path?q=1 xff=127.0.0.1 xfh=Demo.localhost:8080 xfp=http"
    );
    let line = tokio::time::timeout(WAIT, log.next_line())
        .await
        .expect("no request log line")
        .unwrap()
        .unwrap();
    let rest = line
        .strip_prefix("GET /path?q=1 200 ")
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        rest.strip_suffix("ms")
            .is_some_and(|ms| ms.parse::<u64>().is_ok()),
        "{line}"
    );
}

/// A long idle timeout for tests that do not wait for it.
const UPSTREAM_IDLE_PERIOD: Duration = Duration::from_secs(60);

#[tokio::test]
async fn edge_errors_map_to_their_status_and_page() {
    let backend = Backend::start("errors").await;
    let edge = Edge::start(UPSTREAM_IDLE_PERIOD).await;
    let (_live, _log) = edge.open("live", "bb22", backend.addr);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_broken, _log) = edge.open("broken", "cc33", closed);
    edge.store.claim("dd44", "sleepy", 0).await.unwrap();

    let cases = [
        (
            "nobody.localhost",
            StatusCode::NOT_FOUND,
            "no tunnel has this name",
        ),
        (
            "deep.live.localhost",
            StatusCode::NOT_FOUND,
            "no tunnel has this name",
        ),
        (
            "sleepy.localhost",
            StatusCode::SERVICE_UNAVAILABLE,
            "tunnel offline",
        ),
        (
            "live.localhost..",
            StatusCode::BAD_REQUEST,
            "Host header is malformed",
        ),
        (
            "broken.localhost",
            StatusCode::BAD_GATEWAY,
            "did not accept the connection",
        ),
        ("localhost", StatusCode::OK, "p0rt tunnel host"),
    ];
    for (host, status, text) in cases {
        let (got, body) = edge.get(host, "/").await;
        assert_eq!(got, status, "{host}: {body}");
        assert!(body.contains(text), "{host}: {body}");
    }
    assert_eq!(
        backend.accepted.load(Ordering::SeqCst),
        0,
        "an error reached the backend"
    );

    let connect = Request::connect("live.localhost:80")
        .header(header::HOST, "live.localhost:80")
        .body(Empty::new())
        .unwrap();
    let (status, headers, body) = edge.send(connect).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    assert!(headers.contains_key(header::ALLOW), "{headers:?}");
    assert_eq!(
        backend.accepted.load(Ordering::SeqCst),
        0,
        "CONNECT reached the backend"
    );
}

#[test]
fn every_error_says_whose_fault_it_is() {
    use EdgeError::*;
    let cases = [
        (HostMissing, Fault::Client, 400),
        (Connect, Fault::Client, 405),
        (UnknownName, Fault::Client, 404),
        (AdminOnly("/domain-stats"), Fault::Client, 403),
        (Offline, Fault::Offline, 503),
        (
            Unreachable(upstream::UpstreamError::Timeout),
            Fault::Tunnel,
            502,
        ),
        (UnexpectedSwitch, Fault::Tunnel, 502),
        (
            Store(crate::store::StoreError::Unavailable("down".into())),
            Fault::Host,
            503,
        ),
        (
            Denied {
                status: StatusCode::TOO_MANY_REQUESTS,
                retry_after_seconds: Some(7),
                message: "slow down".into(),
            },
            Fault::Client,
            429,
        ),
    ];
    for (error, fault, status) in cases {
        assert_eq!(
            (error.fault(), error.status().as_u16()),
            (fault, status),
            "{error:?}"
        );
        let response = error.response();
        assert_eq!(response.status().as_u16(), status);
    }
    let denied = Denied {
        status: StatusCode::TOO_MANY_REQUESTS,
        retry_after_seconds: Some(7),
        message: "slow down".into(),
    }
    .response();
    assert_eq!(denied.headers()[header::RETRY_AFTER], "7");
}

#[tokio::test]
async fn an_idle_upstream_is_reused_then_closed_after_the_timeout() {
    let timeout = Duration::from_millis(400);
    let backend = Backend::start("idle").await;
    let edge = Edge::start(timeout).await;
    let (tunnel, _log) = edge.open("quiet", "ee55", backend.addr);

    for _ in 0..3 {
        let (status, body) = edge.get("quiet.localhost", "/").await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // One upstream connection served all three requests and is held for the next one.
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(backend.open.load(Ordering::SeqCst), 1);
    assert_eq!(edge.edge.upstreams.idle_count(&tunnel), 1);

    // Unused for the idle timeout, it is closed: the backend sees its connection end.
    eventually("the idle upstream to close", || {
        backend.open.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(edge.edge.upstreams.idle_count(&tunnel), 0);
    // The tunnel still serves, on a new connection.
    assert_eq!(edge.get("quiet.localhost", "/").await.0, StatusCode::OK);
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_reconnect_never_reuses_the_old_sessions_connections() {
    let old = Backend::start("old").await;
    let new = Backend::start("new").await;
    let edge = Edge::start(UPSTREAM_IDLE_PERIOD).await;

    let (_first, _log) = edge.open("again", "ff66", old.addr);
    let (_, body) = edge.get("again.localhost", "/").await;
    assert!(body.starts_with("old "), "{body}");
    // The same key reconnects: a new session takes the name over.
    let (_second, _log) = edge.open("again", "ff66", new.addr);
    let (_, body) = edge.get("again.localhost", "/").await;
    assert!(
        body.starts_with("new "),
        "served by the old session's connection: {body}"
    );
}

/// A backend answering every request after `delay`, so that every request of a round is in
/// flight at once. It counts the connections it accepted and those still open.
struct SlowBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl SlowBackend {
    async fn start(delay: Duration) -> SlowBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = SlowBackend {
            addr: listener.local_addr().unwrap(),
            accepted: Arc::default(),
            open: Arc::default(),
        };
        let (accepted, open) = (backend.accepted.clone(), backend.open.clone());
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                open.fetch_add(1, Ordering::SeqCst);
                let open = open.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req: Request<Incoming>| async move {
                        tokio::time::sleep(delay).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        backend
    }
}

#[tokio::test]
async fn a_busy_tunnel_keeps_one_upstream_per_request_in_flight() {
    // More than the default pool: a pool smaller than the requests in flight closed the
    // surplus connections after every round and opened new channels for the next one.
    const IN_FLIGHT: usize = 48;
    let backend = SlowBackend::start(Duration::from_millis(300)).await;
    let (addr, accepted) = (backend.addr, backend.accepted.clone());
    let edge = Edge::start_with_pool(UPSTREAM_IDLE_PERIOD, IN_FLIGHT).await;
    let (tunnel, _log) = edge.open("busy", "aa77", addr);
    let round =
        || futures_util::future::join_all((0..IN_FLIGHT).map(|_| edge.get("busy.localhost", "/")));

    for (status, body) in round().await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), IN_FLIGHT);
    assert_eq!(edge.edge.upstreams.idle_count(&tunnel), IN_FLIGHT);
    for _ in 0..2 {
        // A connection is ready again once its task has seen the last response end.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (status, body) in round().await {
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        IN_FLIGHT,
        "later rounds reuse the first round's connections"
    );
}

#[tokio::test]
async fn a_bursts_surplus_upstreams_close_once_unused_and_the_recent_ones_stay() {
    use super::upstream::{UPSTREAM_IDLE_KEEP, UPSTREAM_SURPLUS_IDLE_TIMEOUT};
    const BURST: usize = 8;
    let backend = SlowBackend::start(Duration::from_millis(200)).await;
    let edge = Edge::start(UPSTREAM_IDLE_PERIOD).await;
    let (tunnel, _log) = edge.open("bursty", "bb88", backend.addr);
    let burst =
        || futures_util::future::join_all((0..BURST).map(|_| edge.get("bursty.localhost", "/")));
    let one = || async {
        let (status, body) = edge.get("bursty.localhost", "/").await;
        assert_eq!(status, StatusCode::OK, "{body}");
    };

    for (status, body) in burst().await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(edge.edge.upstreams.idle_count(&tunnel), BURST);
    // Right after the burst nothing is surplus yet: a request reuses one and keeps them all
    // (a connection is ready again once its task has seen the last response end).
    tokio::time::sleep(Duration::from_millis(200)).await;
    one().await;
    assert_eq!(edge.edge.upstreams.idle_count(&tunnel), BURST);
    assert_eq!(backend.accepted.load(Ordering::SeqCst), BURST);

    // Once the surplus has sat unused past its timeout, the next request closes it and
    // keeps the most recently used connections.
    tokio::time::sleep(UPSTREAM_SURPLUS_IDLE_TIMEOUT + Duration::from_millis(200)).await;
    one().await;
    assert_eq!(edge.edge.upstreams.idle_count(&tunnel), UPSTREAM_IDLE_KEEP);
    let closed = async {
        while backend.open.load(Ordering::SeqCst) > UPSTREAM_IDLE_KEEP {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("the surplus connections reach the backend as closed");
    // The kept ones serve the next requests: no new connection for a request at a time.
    one().await;
    one().await;
    assert_eq!(backend.accepted.load(Ordering::SeqCst), BURST);
}

/// A hand-written HTTP/1.1 backend, for what a well-behaved server does not do on cue. It
/// closes a connection that waits longer than `keep_alive` for its next request (nginx's
/// `keepalive_timeout`), closes one without answering a request for `/vanish` (a backend
/// that crashed on it), streams `/stream` until the reader goes away, and answers `/chunked`
/// with a chunked `ok`; anything else gets `ok` with a length. Every request it reads is
/// recorded as `METHOD PATH BODY`.
struct RawBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
}

impl RawBackend {
    async fn start(keep_alive: Duration) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = RawBackend {
            addr: listener.local_addr().unwrap(),
            accepted: Arc::default(),
            open: Arc::default(),
            seen: Arc::default(),
        };
        let (accepted, open, seen) = (
            backend.accepted.clone(),
            backend.open.clone(),
            backend.seen.clone(),
        );
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                open.fetch_add(1, Ordering::SeqCst);
                let (open, seen) = (open.clone(), seen.clone());
                tokio::spawn(async move {
                    RawBackend::serve(BufReader::new(socket), keep_alive, &seen).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        backend
    }

    /// Serves one connection until it should close.
    async fn serve(
        mut socket: BufReader<TcpStream>,
        keep_alive: Duration,
        seen: &std::sync::Mutex<Vec<String>>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let mut request_line = String::new();
            match tokio::time::timeout(keep_alive, socket.read_line(&mut request_line)).await {
                Ok(Ok(n)) if n > 0 => {}
                // Idle too long, closed, or broken.
                _ => return,
            }
            let mut length = 0;
            loop {
                let mut line = String::new();
                if socket.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            if socket.read_exact(&mut body).await.is_err() {
                return;
            }
            let mut words = request_line.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            seen.lock().unwrap().push(format!(
                "{method} {path} {}",
                String::from_utf8_lossy(&body)
            ));
            let socket = socket.get_mut();
            let written = match path {
                "/vanish" => return,
                "/stream" => {
                    let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                    let _ = socket.write_all(head.as_bytes()).await;
                    let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
                    while socket.write_all(chunk.as_bytes()).await.is_ok() {}
                    return;
                }
                "/chunked" => {
                    let answer = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                                  2\r\nok\r\n0\r\n\r\n";
                    socket.write_all(answer.as_bytes()).await
                }
                _ => {
                    let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    socket.write_all(answer.as_bytes()).await
                }
            };
            if written.is_err() {
                return;
            }
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Edge {
    /// A POST with `body` on a new connection; status and body.
    async fn post(&self, host: &str, path: &str, body: &'static str) -> (StatusCode, String) {
        let io = TokioIo::new(TcpStream::connect(self.addr).await.unwrap());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let request = Request::post(path)
            .header(header::HOST, host)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

#[tokio::test]
async fn a_pooled_connection_its_backend_closed_is_replaced_without_failing_the_request() {
    let backend = RawBackend::start(Duration::from_millis(100)).await;
    let edge = Edge::start(UPSTREAM_IDLE_PERIOD).await;
    let (_tunnel, _log) = edge.open("kept", "ab12", backend.addr);

    let backend_closed_it = || {
        eventually("the backend to close its idle connection", || {
            backend.open.load(Ordering::SeqCst) == 0
        })
    };
    for round in 0..3 {
        let (status, body) = edge.get("kept.localhost", "/page").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "ok"),
            "round {round}"
        );
        backend_closed_it().await;
        // Not idempotent: it must go out once, on a connection that is still open.
        let (status, body) = edge.post("kept.localhost", "/form", "a=1").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "ok"),
            "round {round}"
        );
        backend_closed_it().await;
    }
    let posts = backend
        .seen()
        .iter()
        .filter(|r| *r == "POST /form a=1")
        .count();
    assert_eq!(posts, 3, "{:?}", backend.seen());
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn a_request_the_connection_took_is_never_sent_again() {
    let backend = RawBackend::start(UPSTREAM_IDLE_PERIOD).await;
    let edge = Edge::start(UPSTREAM_IDLE_PERIOD).await;
    let (tunnel, _log) = edge.open("once", "cd34", backend.addr);

    // On a pooled connection, then on a new one (the failed one is not kept).
    assert_eq!(edge.get("once.localhost", "/").await.0, StatusCode::OK);
    for round in 0..2 {
        let (status, _) = edge.post("once.localhost", "/vanish", "pay=1").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "round {round}");
        assert_eq!(edge.edge.upstreams.idle_count(&tunnel), 0, "round {round}");
    }
    assert_eq!(
        backend.seen(),
        ["GET / ", "POST /vanish pay=1", "POST /vanish pay=1"]
    );
    assert_eq!(edge.get("once.localhost", "/").await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_response_read_to_its_end_hands_its_connection_back() {
    let backend = RawBackend::start(UPSTREAM_IDLE_PERIOD).await;
    let edge = Edge::start(UPSTREAM_IDLE_PERIOD).await;
    let (tunnel, _log) = edge.open("back", "ef56", backend.addr);

    // A length (the body is dropped at its length) and chunks (read to the last chunk).
    for path in ["/", "/chunked", "/", "/chunked"] {
        let (status, body) = edge.get("back.localhost", path).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"), "{path}");
        assert_eq!(edge.edge.upstreams.idle_count(&tunnel), 1, "{path}");
    }
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_visitor_leaving_mid_body_closes_its_upstream_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = RawBackend::start(UPSTREAM_IDLE_PERIOD).await;
    let edge = Edge::start(UPSTREAM_IDLE_PERIOD).await;
    let (_tunnel, _log) = edge.open("leave", "ab78", backend.addr);

    let mut visitor = TcpStream::connect(edge.addr).await.unwrap();
    visitor
        .write_all(b"GET /stream HTTP/1.1\r\nHost: leave.localhost\r\n\r\n")
        .await
        .unwrap();
    let mut received = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while received < 256 * 1024 {
        let n = tokio::time::timeout(WAIT, visitor.read(&mut buf))
            .await
            .expect("the stream stalled")
            .unwrap();
        assert!(n > 0, "the edge ended the stream");
        received += n;
    }
    assert_eq!(backend.open.load(Ordering::SeqCst), 1);
    drop(visitor);
    eventually("the stream's backend connection to close", || {
        backend.open.load(Ordering::SeqCst) == 0
    })
    .await;
    // The next request gets a new connection.
    assert_eq!(edge.get("leave.localhost", "/").await.0, StatusCode::OK);
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 2);
}
