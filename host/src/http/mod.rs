//! The HTTP edge: routes each request by its `Host` header into the owning tunnel.
//!
//! For every request to `<name>.<domain>` the handler takes an idle upstream connection
//! of that tunnel or opens a new `forwarded-tcpip` channel straight to the SSH client — no
//! loopback listener per tunnel, no extra dial. Bodies stream both ways without buffering.
//! An `Upgrade` request (WebSocket) is piped byte for byte only after the backend's `101`.
//!
//! Status codes the edge itself produces: 400 bad/missing/duplicate `Host` (or an
//! absolute-form target that disagrees with it), 404 unknown name, 503 known name whose
//! tunnel is offline, 502 backend refused or reset, 431 oversized headers, 408 slow headers
//! (connection closed).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::shutdown::Stop;
use tokio::task::JoinSet;

use crate::cache::{Cache, RedisHealth};
use crate::config::Secret;
use crate::policy::{RateDecision, RequestFacts, RequestPolicy};
use crate::store::DomainStore;
use crate::tunnels::{Resolution, Tunnel, TunnelService};

/// A client must send its complete request headers within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most header bytes accepted per request; more gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most header lines accepted per request; more gets 431.
pub const MAX_HEADERS: usize = 100;
/// Time allowed to open a channel through the SSH client to its local service.
pub const CHANNEL_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent HTTP connections accepted; beyond this new connections are closed at once.
pub const MAX_HTTP_CONNECTIONS: usize = 50_000;
/// Time in-flight requests get to finish once the host is shutting down.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What the HTTP edge needs from the rest of the host.
pub struct HttpEdge {
    pub tunnels: Arc<TunnelService>,
    pub requests: Arc<dyn RequestPolicy>,
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
}

type Body = BoxBody<Bytes, hyper::Error>;

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Accepts HTTP connections until `stop` turns true; then lets in-flight requests finish
/// (at most [`SHUTDOWN_GRACE`]) and closes idle keep-alive connections.
pub async fn serve(listener: TcpListener, edge: Arc<HttpEdge>, mut stop: Stop) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    let builder = Arc::new(builder);
    let mut connections = JoinSet::new();
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("http accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.stopped() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let _ = socket.set_nodelay(true);
        let (edge, builder, mut stop) = (edge.clone(), builder.clone(), stop.clone());
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let edge = edge.clone();
                async move { Ok::<_, Infallible>(handle(req, peer, edge).await) }
            });
            let conn = builder
                .serve_connection(TokioIo::new(socket), service)
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = stop.stopped() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!("http connection from {peer}: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    let draining = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, draining).await.is_err() {
        tracing::warn!("http requests still running after {SHUTDOWN_GRACE:?}; dropping them");
    }
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()).map_err(|e| match e {}).boxed());
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// A plain-text error page. The text is fixed per status: no request input is reflected.
fn error_page(status: StatusCode, text: &'static str) -> Response<Body> {
    full(status, "text/plain; charset=utf-8", text)
}

/// What a request's `Host` points at.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// The base domain itself: health and stats endpoints.
    Base,
    /// `<name>.<domain>`.
    Tunnel(String),
    /// Some other host, or a deeper subdomain: nobody here.
    Unknown,
}

/// Reads the single `Host` header, checks it against an absolute-form target, and
/// resolves it against the base domain. `X-Forwarded-Host` is never consulted.
fn route(headers: &HeaderMap, uri: &Uri, domain: &str) -> Result<Target, &'static str> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(h), None) => h,
        (None, _) => return Err("400 Bad Request: the Host header is missing\n"),
        (Some(_), Some(_)) => return Err("400 Bad Request: more than one Host header\n"),
    };
    let host = host
        .to_str()
        .ok()
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .filter(|a| !a.as_str().contains('@') && has_valid_port(a))
        .ok_or("400 Bad Request: the Host header is malformed\n")?;
    if let Some(target) = uri.authority()
        && !target.host().eq_ignore_ascii_case(host.host())
    {
        return Err("400 Bad Request: the request target's host differs from the Host header\n");
    }
    let hostname = host.host().trim_end_matches('.').to_ascii_lowercase();
    if hostname == domain {
        return Ok(Target::Base);
    }
    match hostname
        .strip_suffix(domain)
        .and_then(|rest| rest.strip_suffix('.'))
    {
        Some(label) if !label.is_empty() && !label.contains('.') => {
            Ok(Target::Tunnel(label.to_string()))
        }
        _ => Ok(Target::Unknown),
    }
}

/// `http::uri::Authority` accepts any text after the last `:`; a Host port must be digits.
fn has_valid_port(authority: &http::uri::Authority) -> bool {
    let text = authority.as_str();
    let after_host = match text.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or("", |(_, tail)| tail),
        None => text.split_once(':').map_or("", |(_, port)| port),
    };
    let port = after_host.strip_prefix(':').unwrap_or(after_host);
    if text.starts_with('[') && !after_host.is_empty() && !after_host.starts_with(':') {
        return false;
    }
    port.is_empty()
        || (port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok())
}

async fn handle(req: Request<Incoming>, peer: SocketAddr, edge: Arc<HttpEdge>) -> Response<Body> {
    let target = match route(req.headers(), req.uri(), &edge.domain) {
        Ok(target) => target,
        Err(text) => return error_page(StatusCode::BAD_REQUEST, text),
    };
    match target {
        Target::Base => base_endpoint(&req, peer, &edge).await,
        Target::Unknown => not_found(),
        Target::Tunnel(name) => match edge.tunnels.resolve(&name).await {
            Resolution::Live(tunnel) => match admit(&req, peer, &tunnel, &edge).await {
                Some(denied) => denied,
                None => proxy(req, peer, tunnel).await,
            },
            Resolution::Offline => error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "503 Service Unavailable: tunnel offline. Its owner is not connected right now.\n",
            ),
            Resolution::Unknown => not_found(),
        },
    }
}

/// Request headers shown to the rate-limit policy.
const RATE_LIMIT_HEADERS: [HeaderName; 4] = [
    header::USER_AGENT,
    header::REFERER,
    header::CONTENT_LENGTH,
    header::UPGRADE,
];

/// Asks the rate-limit policy about a request; `Some(response)` if it is denied.
async fn admit(
    req: &Request<Incoming>,
    peer: SocketAddr,
    tunnel: &Tunnel,
    edge: &HttpEdge,
) -> Option<Response<Body>> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.rsplit_once(':').map_or(h, |(host, _)| host).to_string())
        .unwrap_or_default();
    let facts = RequestFacts {
        client_ip: peer.ip().to_string(),
        host,
        name: tunnel.name.to_string(),
        owner_key_hash: tunnel.owner.to_string(),
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        headers: RATE_LIMIT_HEADERS
            .iter()
            .filter_map(|name| {
                let value = req.headers().get(name)?.to_str().ok()?;
                Some((name.as_str().to_string(), value.to_string()))
            })
            .collect(),
    };
    match edge.requests.check_request(facts).await {
        RateDecision::Allow => None,
        RateDecision::Deny {
            status,
            retry_after_seconds,
            message,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
            let mut response = full(
                status,
                "text/plain; charset=utf-8",
                format!("{} {message}\n", status.as_u16()),
            );
            if let Some(seconds) = retry_after_seconds {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            tunnel.output.line(format!(
                "{} {} {} (rate limited)",
                req.method(),
                req.uri().path(),
                status.as_u16()
            ));
            Some(response)
        }
    }
}

fn not_found() -> Response<Body> {
    error_page(
        StatusCode::NOT_FOUND,
        "404 Not Found: no tunnel has this name.\n",
    )
}

async fn base_endpoint(req: &Request<Incoming>, peer: SocketAddr, edge: &HttpEdge) -> Response<Body> {
    match req.uri().path() {
        "/health" => full(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        "/health/redis" => redis_health(&edge.cache, admin_allowed(req.headers(), peer, edge)),
        "/status/plugins" => {
            if !admin_allowed(req.headers(), peer, edge) {
                return error_page(
                    StatusCode::FORBIDDEN,
                    "403 Forbidden: /status/plugins is served to loopback clients or with the admin token.\n",
                );
            }
            full(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec(&(edge.plugin_status)()).unwrap_or_default(),
            )
        }
        "/domain-stats" => {
            if !admin_allowed(req.headers(), peer, edge) {
                return error_page(
                    StatusCode::FORBIDDEN,
                    "403 Forbidden: /domain-stats is served to loopback clients or with the admin token.\n",
                );
            }
            match edge.store.stats(crate::unix_now()).await {
                Ok(stats) => full(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_vec(&stats).unwrap_or_default(),
                ),
                Err(e) => {
                    tracing::warn!("domain stats failed: {e}");
                    error_page(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "503 Service Unavailable: domain store unavailable\n",
                    )
                }
            }
        }
        "/" => full(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            format!(
                "p0rt tunnel host\n\nssh -p {} -R 80:localhost:3000 {}\n",
                edge.ssh_port, edge.domain
            ),
        ),
        _ => not_found(),
    }
}

/// The seed's `/health/redis` shapes. Error details (which may name hosts) only go to
/// loopback or admin clients.
fn redis_health(cache: &Cache, detailed: bool) -> Response<Body> {
    // Field order as in the seed's examples.
    #[derive(serde::Serialize)]
    struct Shape<'a> {
        status: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        latency_ms: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        message: &'a str,
    }
    let (status, shape) = match cache.health() {
        RedisHealth::Healthy { latency_ms } => (
            StatusCode::OK,
            Shape {
                status: "healthy",
                latency_ms: Some(latency_ms),
                error: None,
                message: "Redis connection is healthy",
            },
        ),
        RedisHealth::Unhealthy { error } => (
            StatusCode::SERVICE_UNAVAILABLE,
            Shape {
                status: "unhealthy",
                latency_ms: None,
                error: Some(if detailed {
                    error
                } else {
                    "connection failed".to_string()
                }),
                message: "Redis connection failed",
            },
        ),
        RedisHealth::Disabled => (
            StatusCode::OK,
            Shape {
                status: "disabled",
                latency_ms: None,
                error: None,
                message: "Redis is not available or not configured",
            },
        ),
    };
    full(
        status,
        "application/json",
        serde_json::to_vec(&shape).unwrap_or_default(),
    )
}

fn admin_allowed(headers: &HeaderMap, peer: SocketAddr, edge: &HttpEdge) -> bool {
    if peer.ip().is_loopback() {
        return true;
    }
    let Some(token) = &edge.admin_token else {
        return false;
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_time_eq(presented.as_bytes(), token.expose().as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Opens a fresh upstream HTTP/1.1 connection over a new `forwarded-tcpip` channel.
async fn connect_upstream(
    tunnel: &Tunnel,
    peer: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Incoming>, String> {
    let io = tokio::time::timeout(CHANNEL_OPEN_TIMEOUT, tunnel.link.open_stream(peer))
        .await
        .map_err(|_| "the tunnel client did not answer in time".to_string())?
        .map_err(|e| e.to_string())?;
    let io = TokioIo::new(io);
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let name = tunnel.name.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("upstream connection of {name} ended: {e}");
        }
    });
    Ok(sender)
}

async fn proxy(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    tunnel: Arc<Tunnel>,
) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    let host = parts.headers.get(header::HOST).cloned();
    let upgrade_header = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(value) = upgrade_header {
            parts.headers.insert(header::UPGRADE, value);
        }
    } else {
        parts.headers.remove(header::UPGRADE);
    }
    // p0rt is the edge: forwarded headers describe this hop only, never what the client claims.
    if let Ok(ip) = HeaderValue::from_str(&peer.ip().to_string()) {
        parts.headers.insert("x-forwarded-for", ip);
    }
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(host) = host {
        parts.headers.insert("x-forwarded-host", host);
    }
    parts.uri = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = http::Version::HTTP_11;
    let upstream_req = Request::from_parts(parts, body);

    let idle = if upgrade { None } else { tunnel.take_idle() };
    let mut sender = match idle {
        Some(sender) => sender,
        None => match connect_upstream(&tunnel, peer).await {
            Ok(sender) => sender,
            Err(e) => {
                tracing::debug!("{}: upstream unavailable: {e}", tunnel.name);
                log_request(&tunnel, &method, &path, StatusCode::BAD_GATEWAY, started);
                return error_page(
                    StatusCode::BAD_GATEWAY,
                    "502 Bad Gateway: the tunnel's local service did not accept the connection.\n",
                );
            }
        },
    };
    let response = sender.send_request(upstream_req).await;
    let mut response = match response {
        Ok(response) => response,
        Err(e) => {
            tracing::debug!("{}: upstream request failed: {e}", tunnel.name);
            log_request(&tunnel, &method, &path, StatusCode::BAD_GATEWAY, started);
            return error_page(
                StatusCode::BAD_GATEWAY,
                "502 Bad Gateway: the tunnel's local service closed or reset the connection.\n",
            );
        }
    };
    let status = response.status();
    log_request(&tunnel, &method, &path, status, started);

    if status == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return error_page(
                StatusCode::BAD_GATEWAY,
                "502 Bad Gateway: unexpected protocol switch\n",
            );
        };
        let backend_upgrade = hyper::upgrade::on(&mut response);
        let name = tunnel.name.clone();
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, backend_upgrade) {
                Ok((client, backend)) => {
                    let mut client = TokioIo::new(client);
                    let mut backend = TokioIo::new(backend);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                }
                Err(e) => tracing::debug!("{name}: upgrade failed: {e}"),
            }
        });
        let (parts, _) = response.into_parts();
        return Response::from_parts(
            parts,
            http_body_util::Empty::new().map_err(|e| match e {}).boxed(),
        );
    }

    if !upgrade {
        tunnel.put_idle(sender);
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.boxed())
}

fn log_request(
    tunnel: &Tunnel,
    method: &http::Method,
    path: &str,
    status: StatusCode,
    started: Instant,
) {
    let elapsed = started.elapsed();
    let shown: String = path.chars().take(200).filter(|c| !c.is_control()).collect();
    tunnel.output.line(format!(
        "{method} {shown} {} {}ms",
        status.as_u16(),
        elapsed.as_millis()
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(hosts: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for h in hosts {
            map.append(header::HOST, HeaderValue::from_str(h).unwrap());
        }
        map
    }

    #[test]
    fn routes_by_host() {
        let uri = Uri::from_static("/x");
        assert_eq!(
            route(&headers(&["a-b-c.localhost:8080"]), &uri, "localhost"),
            Ok(Target::Tunnel("a-b-c".into()))
        );
        assert_eq!(
            route(&headers(&["A-B-C.LOCALHOST."]), &uri, "localhost"),
            Ok(Target::Tunnel("a-b-c".into()))
        );
        assert_eq!(
            route(&headers(&["localhost"]), &uri, "localhost"),
            Ok(Target::Base)
        );
        assert_eq!(
            route(&headers(&["x.y.localhost"]), &uri, "localhost"),
            Ok(Target::Unknown)
        );
        assert_eq!(
            route(&headers(&["evil.com"]), &uri, "localhost"),
            Ok(Target::Unknown)
        );
        assert_eq!(
            route(&headers(&["xlocalhost"]), &uri, "localhost"),
            Ok(Target::Unknown)
        );
    }

    #[test]
    fn rejects_bad_hosts() {
        let uri = Uri::from_static("/x");
        assert!(route(&headers(&[]), &uri, "localhost").is_err());
        assert!(route(&headers(&["a.localhost", "b.localhost"]), &uri, "localhost").is_err());
        assert!(route(&headers(&["a b"]), &uri, "localhost").is_err());
        assert!(route(&headers(&["user@a.localhost"]), &uri, "localhost").is_err());
        assert!(route(&headers(&["a.localhost:http"]), &uri, "localhost").is_err());
        assert!(route(&headers(&["a.localhost:-1"]), &uri, "localhost").is_err());
        assert!(route(&headers(&["a.localhost:99999"]), &uri, "localhost").is_err());
        assert!(route(&headers(&["a.localhost:"]), &uri, "localhost").is_ok());
        let absolute = Uri::from_static("http://other.localhost/x");
        assert!(route(&headers(&["a.localhost"]), &absolute, "localhost").is_err());
    }
}
