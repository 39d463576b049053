//! A real HTTP/1.1 backend (hyper 1) that tunnels point at.
//!
//! Endpoints:
//! - `GET /whoami`: the backend's id (tests use it to see which backend a name reaches).
//! - `ANY /echo…`: method, path, version, headers and body length as JSON.
//! - `GET /bytes/N`: N deterministic pseudo-random bytes ([`pattern`]), streamed chunked.
//! - `POST /sha256`: streams the request body and returns `{"sha256": hex, "len": n}`.
//! - `POST /gated-sha256`: as `/sha256`, but reads nothing until [`Backend::open_gate`] (a
//!   backend that stops reading an upload).
//! - `GET /ws`: WebSocket echo, upgraded through hyper (the `101` goes out first, frames after).
//! - `ANY /vanish`: counted as a hit, then the connection is closed without an answer (a
//!   backend that crashed on the request).
//! - anything else: the backend's own `404`.
//!
//! [`Backend::start_with_keep_alive`] closes connections idle for a while, as nginx's
//! `keepalive_timeout` or Node's `keepAliveTimeout` do.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

type Body = BoxBody<Bytes, Infallible>;

/// Chunk size of `/bytes/N` responses.
const CHUNK: usize = 64 * 1024;

/// Byte `i` of the deterministic stream is byte `i % 8` of `splitmix64(i / 8)`.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Bytes `[offset, offset + len)` of the deterministic pseudo-random stream.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|i| splitmix64(i / 8).to_le_bytes()[(i % 8) as usize])
        .collect()
}

/// Hex SHA-256 and length of the first `n` bytes of [`pattern`], computed chunk by chunk.
pub fn pattern_sha256(n: u64) -> String {
    let mut hasher = Sha256::new();
    let mut off = 0;
    while off < n {
        let len = (n - off).min(CHUNK as u64) as usize;
        hasher.update(pattern(off, len));
        off += len as u64;
    }
    hex::encode(hasher.finalize())
}

struct State {
    id: String,
    hits: AtomicUsize,
    /// Bytes of `/bytes/N` bodies produced so far (they are produced as the tunnel reads).
    produced: AtomicU64,
    /// Requests waiting at the gate of `/gated-sha256`.
    gated: AtomicUsize,
    gate: tokio::sync::watch::Sender<bool>,
    /// Connections accepted so far.
    accepted: AtomicUsize,
    /// Connections open now.
    open: AtomicUsize,
}

/// A request the backend drops: it closes the connection without answering.
#[derive(Debug)]
struct Vanished;

impl std::fmt::Display for Vanished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("closing without an answer (/vanish)")
    }
}

impl std::error::Error for Vanished {}

/// A running backend; stops when dropped.
pub struct Backend {
    pub port: u16,
    pub id: String,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Backend {
    /// Starts a backend on 127.0.0.1:0 in the current tokio runtime.
    pub async fn start(id: &str) -> Backend {
        Backend::start_inner(id, None).await
    }

    /// The same, closing every connection that waits longer than `keep_alive` for its next
    /// request (its first one included).
    pub async fn start_with_keep_alive(id: &str, keep_alive: Duration) -> Backend {
        Backend::start_inner(id, Some(keep_alive)).await
    }

    async fn start_inner(id: &str, keep_alive: Option<Duration>) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            id: id.to_string(),
            hits: AtomicUsize::new(0),
            produced: AtomicU64::new(0),
            gated: AtomicUsize::new(0),
            gate: tokio::sync::watch::Sender::new(false),
            accepted: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                st.accepted.fetch_add(1, Ordering::SeqCst);
                st.open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = service_fn({
                        let st = st.clone();
                        move |req: Request<Incoming>| {
                            let st = st.clone();
                            async move {
                                if req.uri().path() == "/vanish" {
                                    st.hits.fetch_add(1, Ordering::SeqCst);
                                    // hyper closes the connection on a service error.
                                    return Err(Vanished);
                                }
                                Ok(handle(req, st).await)
                            }
                        }
                    });
                    let mut builder = http1::Builder::new();
                    builder.keep_alive(true);
                    if let Some(keep_alive) = keep_alive {
                        // hyper's header timeout runs while a connection waits for its
                        // next request too: an idle connection closes after it.
                        builder
                            .timer(TokioTimer::new())
                            .header_read_timeout(keep_alive);
                    }
                    let _ = builder
                        .serve_connection(TokioIo::new(socket), service)
                        .with_upgrades()
                        .await;
                    st.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Backend {
            port,
            id: id.to_string(),
            state,
            task,
        }
    }

    /// Requests this backend has received so far.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// Bytes of `/bytes/N` bodies handed to hyper so far.
    pub fn produced(&self) -> u64 {
        self.state.produced.load(Ordering::SeqCst)
    }

    /// Requests that reached `/gated-sha256` (reading or waiting).
    pub fn gated(&self) -> usize {
        self.state.gated.load(Ordering::SeqCst)
    }

    /// Lets `/gated-sha256` requests read their bodies.
    pub fn open_gate(&self) {
        self.state.gate.send_replace(true);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()).boxed())
        .unwrap()
}

async fn handle(req: Request<Incoming>, st: Arc<State>) -> Response<Body> {
    st.hits.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    if path == "/whoami" {
        return full(StatusCode::OK, "text/plain", st.id.clone());
    }
    if path == "/echo" || path.starts_with("/echo/") {
        return echo(req, &st).await;
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let Ok(n) = n.parse::<u64>() else {
            return full(StatusCode::BAD_REQUEST, "text/plain", "bad length");
        };
        return bytes_response(n, st);
    }
    if path == "/sha256" && req.method() == hyper::Method::POST {
        return sha256(req).await;
    }
    if path == "/gated-sha256" && req.method() == hyper::Method::POST {
        st.gated.fetch_add(1, Ordering::SeqCst);
        let _ = st.gate.subscribe().wait_for(|open| *open).await;
        return sha256(req).await;
    }
    if path == "/ws" {
        return websocket(req);
    }
    full(StatusCode::NOT_FOUND, "text/plain", "backend: no such path")
}

async fn echo(req: Request<Incoming>, st: &State) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let json = serde_json::json!({
        "backend": st.id,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": body.len(),
    });
    full(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec(&json).unwrap(),
    )
}

fn bytes_response(n: u64, st: Arc<State>) -> Response<Body> {
    let stream = futures_util::stream::unfold(0u64, move |off| {
        let st = st.clone();
        async move {
            if off >= n {
                return None;
            }
            let len = (n - off).min(CHUNK as u64) as usize;
            st.produced.fetch_add(len as u64, Ordering::SeqCst);
            let frame = Frame::data(Bytes::from(pattern(off, len)));
            Some((Ok::<_, Infallible>(frame), off + len as u64))
        }
    });
    // No content-length: hyper sends the body chunked.
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/octet-stream")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

async fn sha256(req: Request<Incoming>) -> Response<Body> {
    let mut body = req.into_body();
    let mut hasher = Sha256::new();
    let mut len: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    hasher.update(data);
                    len += data.len() as u64;
                }
            }
            Err(e) => {
                return full(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    format!("body error: {e}"),
                );
            }
        }
    }
    let json = serde_json::json!({ "sha256": hex::encode(hasher.finalize()), "len": len });
    full(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec(&json).unwrap(),
    )
}

fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let headers = req.headers();
    let upgrade_ok = headers
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let connection_ok = headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let Some(key) = headers.get("sec-websocket-key").cloned() else {
        return full(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "missing sec-websocket-key",
        );
    };
    if !upgrade_ok || !connection_ok {
        return full(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "not a websocket upgrade",
        );
    }
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        // Resolves only after hyper has written the 101 below: frames never precede it.
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(msg) = ws.next().await {
            let Ok(msg) = msg else { break };
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
            // Ping/pong/close replies are queued by tungstenite and flushed on the next poll.
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-accept", accept)
        .body(Full::new(Bytes::new()).boxed())
        .unwrap()
}
