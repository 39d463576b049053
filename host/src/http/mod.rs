//! The HTTP edge: routes each request by its `Host` header into the owning tunnel.
//!
//! A request passes through visible phases, sharing one [`RequestCtx`]:
//! [route](route) → [admit](proxy::admit) → [pick upstream](upstream) →
//! [rewrite request](proxy::rewrite_headers) → [filter response](proxy::filter_response) → log.
//! Any phase can stop it with one [`EdgeError`], which says whose fault it is and carries
//! its status and fixed page. An upstream is a `forwarded-tcpip` channel straight to the SSH
//! client (no loopback listener per tunnel), reused through [`upstream::UpstreamPool`].
//!
//! Status codes the edge itself produces: 400 bad/missing/duplicate `Host` (or an
//! absolute-form target that disagrees with it) or a malformed request body, 404 unknown
//! name, 405 `CONNECT`, 410 a name the operator banned, 503 known name whose tunnel is
//! offline, 502 backend refused or reset, 431 oversized headers, 408 slow headers
//! (connection closed).

pub mod acme;
mod api;
mod base;
mod denials;
mod error;
pub mod limits;
pub mod peer;
mod proxy;
mod route;
#[cfg(test)]
mod tests;
pub mod tls;
pub mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::cache::Cache;
use crate::config::Secret;
use crate::policy::RequestPolicy;
use crate::scan::ScanService;
use crate::shutdown::Stop;
use crate::store::DomainStore;
use crate::tokens::TokenStore;
use crate::tunnels::{Resolution, Tunnel, TunnelService};
pub use error::{EdgeError, Fault};
pub use limits::{HttpLimits, TrustedProxies};
use route::Target;
pub use tls::{CertSource, HttpsPolicy};
use upstream::UpstreamPool;

/// Most header bytes accepted per request; more gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most header lines accepted per request; more gets 431.
pub const MAX_HEADERS: usize = 100;
/// Time in-flight requests get to finish once the host is shutting down.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Most characters of a request path shown in the tunnel owner's request log.
const LOGGED_PATH_CHARS: usize = 200;

/// What the HTTP edge needs from the rest of the host.
pub struct HttpEdge {
    pub tunnels: Arc<TunnelService>,
    pub requests: Arc<dyn RequestPolicy>,
    /// Idle upstream connections of live tunnels.
    pub upstreams: UpstreamPool,
    /// For `/domain-stats`.
    pub store: Arc<dyn DomainStore>,
    /// For `/health/redis`.
    pub cache: Cache,
    pub domain: String,
    pub admin_token: Option<Secret>,
    /// Shown on the base domain's front page.
    pub ssh_port: u16,
    /// For `/status/plugins`: the plugin set's state, as JSON.
    pub plugin_status: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// For `/api/scans`.
    pub scans: Arc<ScanService>,
    /// Per-key API tokens, for `/api/scans`.
    pub tokens: Arc<TokenStore>,
    /// Proxies whose forwarded client address is believed.
    pub trusted_proxies: TrustedProxies,
    /// Caps and timeouts (`http.limits.*`).
    pub limits: HttpLimits,
    /// This host's part in the cluster, when `cluster.enabled` (see [`peer`]).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// For the admin API (`/api/v1/`); `None` answers it with 503.
    pub admin: Option<Arc<crate::admin::AdminState>>,
}

pub(crate) type Body = BoxBody<Bytes, limits::BoxError>;

/// Accepts HTTP connections until `stop` turns true; then lets in-flight requests finish
/// (at most [`SHUTDOWN_GRACE`]) and closes idle keep-alive connections.
pub async fn serve(listener: TcpListener, edge: Arc<HttpEdge>, stop: Stop) {
    serve_edge(
        Listeners {
            http: listener,
            https: None,
        },
        edge,
        stop,
    )
    .await
}

/// The edge's listening sockets: plain HTTP, and HTTPS when configured.
pub struct Listeners {
    pub http: TcpListener,
    pub https: Option<HttpsListener>,
}

/// The HTTPS socket, where its certificates come from, and the HTTPS request rules.
pub struct HttpsListener {
    pub listener: TcpListener,
    pub certs: Arc<dyn CertSource>,
    pub policy: HttpsPolicy,
}

/// How one connection arrived, as its requests see it.
struct Conn {
    peer: SocketAddr,
    /// The peer's address as text, formatted once for all of the connection's requests.
    peer_ip: HeaderValue,
    tls: bool,
    policy: Option<Arc<HttpsPolicy>>,
}

/// Accepts HTTP and HTTPS connections until `stop` turns true, like [`serve`]. Both
/// listeners share the connection caps (total and per address), the hyper settings and the
/// shutdown; a TLS connection's handshake runs in its own task, holding its slot, bounded
/// by [`tls::TLS_HANDSHAKE_TIMEOUT`].
pub async fn serve_edge(listeners: Listeners, edge: Arc<HttpEdge>, mut stop: Stop) {
    let limits = edge.limits;
    tracing::info!("{}", limits.describe());
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let per_ip = Arc::new(limits::PerIpConnections::default());
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    let builder = Arc::new(builder);
    let Listeners { http, https } = listeners;
    let (https, certs, policy) = match https {
        Some(h) => (Some(h.listener), Some(h.certs), Some(Arc::new(h.policy))),
        None => (None, None, None),
    };
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = http.accept() => accepted.map(|(s, p)| (s, p, false)),
            accepted = accept_maybe(https.as_ref()) => accepted.map(|(s, p)| (s, p, true)),
            _ = stop.stopped() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (socket, peer, tls) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("http accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        // The TCP peer: a trusted proxy's connections are many clients, but the cap is per
        // connection source, which is what holds the sockets.
        let Some(ip_slot) = per_ip.try_open(peer.ip(), limits.max_connections_per_address) else {
            tracing::debug!(
                "refusing http connection from {peer}: {} open from that address",
                limits.max_connections_per_address
            );
            continue;
        };
        let _ = socket.set_nodelay(true);
        let (edge, builder, stop) = (edge.clone(), builder.clone(), stop.clone());
        let conn = Conn {
            peer,
            peer_ip: proxy::ip_header(peer.ip()),
            tls,
            policy: policy.clone(),
        };
        let certs = certs.clone();
        connections.spawn(async move {
            match (tls, certs) {
                (true, Some(certs)) => match tls::handshake(socket, certs.as_ref()).await {
                    Ok(stream) => {
                        serve_connection(TokioIo::new(stream), conn, edge, &builder, stop).await
                    }
                    Err(e) => tracing::debug!("https connection from {peer}: {e}"),
                },
                _ => serve_connection(TokioIo::new(socket), conn, edge, &builder, stop).await,
            }
            drop(ip_slot);
            drop(slot);
        });
    }
    drop(http);
    drop(https);
    let draining = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, draining)
        .await
        .is_err()
    {
        tracing::warn!("http requests still running after {SHUTDOWN_GRACE:?}; dropping them");
    }
}

/// Accepts on `listener`, or waits forever when there is none.
async fn accept_maybe(
    listener: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Serves HTTP/1.1 on one connection (plain or TLS) until it closes or the host stops.
async fn serve_connection<I>(
    io: TokioIo<I>,
    conn: Conn,
    edge: Arc<HttpEdge>,
    builder: &http1::Builder,
    mut stop: Stop,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = conn.peer;
    let conn = Arc::new(conn);
    let service = service_fn(move |req| {
        let (edge, conn) = (edge.clone(), conn.clone());
        async move { Ok::<_, Infallible>(handle(req, &conn, edge).await) }
    });
    let serving = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(serving);
    let result = tokio::select! {
        result = serving.as_mut() => result,
        _ = stop.stopped() => {
            serving.as_mut().graceful_shutdown();
            serving.await
        }
    };
    if let Err(e) = result {
        tracing::debug!("http connection from {peer}: {e}");
    }
}

pub(crate) fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()).map_err(|e| match e {}).boxed());
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// What the phases of one request share.
struct RequestCtx {
    peer: SocketAddr,
    /// `https` for a request over TLS, else `http` (the request facts' `scheme`).
    scheme: &'static str,
    /// The client's address as the edge resolves it: the peer, or what a trusted proxy
    /// forwarded. What policies, logs and the backend's `X-Forwarded-For` see.
    client_ip: std::net::IpAddr,
    /// `client_ip` as text.
    client_ip_header: HeaderValue,
    started: Instant,
    method: Method,
    /// Path and query as sent: the backend's request target, and what the log shows.
    path: String,
    /// The live tunnel the request was routed to, once known.
    tunnel: Option<Arc<Tunnel>>,
    /// Forwarded by another host of the cluster: served from local tunnels only.
    forwarded: bool,
}

async fn handle(req: Request<Incoming>, conn: &Conn, edge: Arc<HttpEdge>) -> Response<Body> {
    let peer = conn.peer;
    if !conn.tls
        && let Some(redirect) = conn
            .policy
            .as_ref()
            .and_then(|p| p.redirect(&req, &edge.domain))
    {
        return redirect;
    }
    let client_ip = edge.trusted_proxies.client_ip(peer.ip(), req.headers());
    let mut ctx = RequestCtx {
        peer,
        scheme: if conn.tls { "https" } else { "http" },
        client_ip,
        client_ip_header: match client_ip == peer.ip() {
            true => conn.peer_ip.clone(),
            false => proxy::ip_header(client_ip),
        },
        started: Instant::now(),
        method: req.method().clone(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".into(), |p| p.as_str().to_string()),
        tunnel: None,
        forwarded: false,
    };
    let declared_in = crate::metrics::declared_length(req.headers());
    let result = phases(req, &mut ctx, &edge).await;
    // One clock reading for the log line and the latency metric.
    let elapsed = ctx.started.elapsed();
    log(&ctx, &result, elapsed);
    let response = result.unwrap_or_else(|e| e.response());
    let mut response =
        crate::metrics::count_response(ctx.tunnel.as_ref(), declared_in, elapsed, response);
    if conn.tls
        && let Some(policy) = &conn.policy
    {
        policy.add_hsts(&mut response);
    }
    response
}

/// Route, then (for a live tunnel) admit and forward.
async fn phases(
    req: Request<Incoming>,
    ctx: &mut RequestCtx,
    edge: &HttpEdge,
) -> Result<Response<Body>, EdgeError> {
    let label = match route::route(req.method(), req.headers(), req.uri(), &edge.domain)? {
        Target::Base if req.uri().path() == "/metrics" => {
            return Ok(crate::metrics::serve(req.headers(), ctx.peer, edge).await);
        }
        Target::Base if req.uri().path().starts_with(crate::admin::api::API_PREFIX) => {
            return Ok(crate::admin::api::handle(req, ctx.peer, edge).await);
        }
        Target::Base
            if edge
                .admin
                .as_ref()
                .is_some_and(|a| a.console.owns(req.uri().path())) =>
        {
            return Ok(crate::admin::console::handle(req, ctx.peer, edge).await);
        }
        Target::Base if req.uri().path().starts_with("/api/") => {
            return api::handle(req, edge).await.ok_or(EdgeError::UnknownName);
        }
        Target::Base => {
            return base::endpoint(req.uri().path(), req.headers(), ctx.peer, edge).await;
        }
        Target::Unknown => return Err(EdgeError::UnknownName),
        Target::Tunnel(label) => label,
    };
    if edge
        .admin
        .as_ref()
        .is_some_and(|a| a.bans.name_banned(&label).is_some())
    {
        return Err(EdgeError::NameBanned);
    }
    let resolution = match ctx.forwarded {
        false => edge.tunnels.resolve(&label).await,
        true => edge.tunnels.resolve_here(&label).await,
    };
    let tunnel = match resolution {
        Resolution::Live(tunnel) => tunnel,
        Resolution::Remote(remote) => return peer::forward(req, ctx, edge, remote).await,
        // The forwarding host believed it served here: it is offline, whatever the store says.
        Resolution::Unknown if ctx.forwarded => return Err(EdgeError::Offline),
        Resolution::Offline => return Err(EdgeError::Offline),
        Resolution::Unknown => return Err(EdgeError::UnknownName),
    };
    ctx.tunnel = Some(tunnel.clone());
    let edits = proxy::admit(&req, ctx, &tunnel, edge.requests.as_ref()).await?;
    proxy::forward(req, ctx, &tunnel, &edge.upstreams, edits, &edge.limits).await
}

/// Phase 6, log: a line on the tunnel owner's terminal for every request that reached a
/// live tunnel; errors also go to the host's log (see [`EdgeError::log`]).
fn log(ctx: &RequestCtx, result: &Result<Response<Body>, EdgeError>, elapsed: Duration) {
    let tunnel = ctx.tunnel.as_deref();
    if let Err(e) = result {
        e.log(tunnel.map(|t| t.name.as_str()));
    }
    let Some(tunnel) = tunnel else {
        return;
    };
    let status = match result {
        Ok(response) => response.status(),
        Err(e) => e.status(),
    };
    if let Err(e) = result {
        note_denial(tunnel, ctx, e);
    }
    // One string, written in place: this runs for every request.
    let mut line = String::with_capacity(ctx.path.len().min(LOGGED_PATH_CHARS) + 32);
    line.push_str(ctx.method.as_str());
    line.push(' ');
    line.extend(
        ctx.path
            .chars()
            .take(LOGGED_PATH_CHARS)
            .filter(|c| !c.is_control()),
    );
    // Not `write!`: it goes through `fmt::write` and its padding machinery per request.
    line.push(' ');
    line.push_str(status.as_str());
    line.push(' ');
    match result {
        Err(EdgeError::Denied { .. }) => line.push_str("(rate limited)"),
        Err(EdgeError::PolicyAnswer { .. }) => line.push_str("(denied by the access policy)"),
        Err(EdgeError::Redirect { .. }) => line.push_str("(redirected by the access policy)"),
        Err(EdgeError::AuthRequired { .. }) => line.push_str("(credentials required)"),
        Err(EdgeError::Busy) => line.push_str("(tunnel busy)"),
        _ => {
            line.push_str(itoa::Buffer::new().format(elapsed.as_millis()));
            line.push_str("ms");
        }
    }
    tunnel.output.line(line);
}

impl RequestCtx {
    /// The client's address as text.
    fn client_ip_text(&self) -> &str {
        // Built from an address's text, so always ASCII.
        self.client_ip_header.to_str().unwrap_or_default()
    }
}

/// A refusal by a policy or a limit, in the host log (throttled, see [`denials`]).
fn note_denial(tunnel: &Tunnel, ctx: &RequestCtx, e: &EdgeError) {
    use denials::DenialKind;
    let (kind, reason) = match e {
        EdgeError::Denied { message, .. } => (DenialKind::RateLimited, message.clone()),
        EdgeError::PolicyAnswer { body, .. } => (DenialKind::Policy, body.clone()),
        EdgeError::Redirect { location, .. } => (
            DenialKind::Redirected,
            format!("to {}", String::from_utf8_lossy(location.as_bytes())),
        ),
        EdgeError::AuthRequired { .. } => (
            DenialKind::CredentialsRequired,
            "no valid basic-auth credentials".into(),
        ),
        EdgeError::Busy => (DenialKind::Busy, e.to_string()),
        _ => return,
    };
    denials::note(
        tunnel.name.as_str(),
        kind,
        e.status().as_u16(),
        ctx.client_ip,
        &reason,
    );
}
