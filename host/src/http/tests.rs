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

#[tokio::test]
async fn a_busy_tunnel_keeps_one_upstream_per_request_in_flight() {
    // More than the default pool: a pool smaller than the requests in flight closed the
    // surplus connections after every round and opened new channels for the next one.
    const IN_FLIGHT: usize = 48;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    tokio::spawn({
        let accepted = accepted.clone();
        async move {
            while let Ok((socket, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = service_fn(|_req: Request<Incoming>| async {
                        // Slow enough that every request of a round is in flight at once.
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        }
    });
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
