//! The HTTP edge's side of clustering ([`crate::cluster`]): forwarding a request for a name
//! another host serves to that host's internal listener, and serving that listener.
//!
//! The edge host the client reached routes only: it strips hop-by-hop headers, signs the
//! request (with the client's address and scheme as it resolved them) and streams it both
//! ways, WebSocket included. The owning host runs everything else exactly once, as for a
//! request of its own: the request policy (it knows the tunnel's owner, tier and session
//! options), the rate limits (shared in Redis anyway), the per-tunnel caps, the rewrite of
//! forwarded headers and the owner's request log. It serves its own tunnels only: a
//! forwarded request is never forwarded again, and a name not served there gets 503.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::error::EdgeError;
use super::route::{self, Target};
use super::{Body, HttpEdge, MAX_HEADER_BYTES, MAX_HEADERS, RequestCtx, SHUTDOWN_GRACE, full};
use crate::cluster::auth::{AuthError, INTERNAL_HEADERS};
use crate::shutdown::Stop;
use crate::tunnels::RemoteTunnel;

/// Connections the internal listener holds at once (other hosts pool theirs, so a few
/// per peer is the usual count).
pub const MAX_INTERNAL_CONNECTIONS: usize = 4096;
/// Time the owning host gets beyond the edge's own response timeout, so its own 504 (which
/// names the backend) arrives before the edge gives up on it.
const PEER_RESPONSE_SLACK: Duration = Duration::from_secs(2);

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && super::proxy::connection_tokens(headers).any(|t| t == "upgrade")
}

/// The proxy's hop-by-hop stripping, keeping an upgrade's own two headers.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let upgrade_value = headers.get(header::UPGRADE).cloned();
    super::proxy::strip_hop_by_hop(headers);
    headers.remove(header::UPGRADE);
    if upgrade && let Some(value) = upgrade_value {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, value);
    }
}

/// Forwards a request for `remote`'s name to its host and streams the answer back.
pub(super) async fn forward(
    mut req: Request<Incoming>,
    ctx: &RequestCtx,
    edge: &HttpEdge,
    remote: RemoteTunnel,
) -> Result<Response<Body>, EdgeError> {
    let Some(cluster) = edge.cluster.as_ref() else {
        return Err(EdgeError::Offline);
    };
    let client_upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, client_upgrade.is_some());
    for name in INTERNAL_HEADERS {
        parts.headers.remove(name);
    }
    cluster.signer().sign(
        &mut parts.headers,
        crate::unix_now(),
        cluster.host_id(),
        &parts.method,
        &ctx.path,
        ctx.client_ip,
        ctx.scheme == "https",
    );
    parts.uri = format!("http://{}{}", remote.address, ctx.path)
        .parse::<Uri>()
        .map_err(|_| EdgeError::Offline)?;
    parts.version = http::Version::HTTP_11;
    let body: Body = body
        .map_err(|e| Box::new(e) as super::limits::BoxError)
        .boxed();
    let sent = tokio::time::timeout(
        edge.limits.response_timeout + PEER_RESPONSE_SLACK,
        cluster.peers.request(Request::from_parts(parts, body)),
    )
    .await
    .map_err(|_| EdgeError::BackendTimeout)?;
    let mut response = sent.map_err(|e| {
        tracing::warn!(
            "{}: host {} at {} failed: {e:?}",
            remote.name,
            remote.host_id,
            remote.address
        );
        if e.is_connect() {
            EdgeError::PeerUnreachable
        } else {
            EdgeError::PeerFailed
        }
    })?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let client = client_upgrade.ok_or(EdgeError::UnexpectedSwitch)?;
        let peer = hyper::upgrade::on(&mut response);
        let name = remote.name.clone();
        tokio::spawn(async move {
            match tokio::try_join!(client, peer) {
                Ok((client, peer)) => {
                    let (mut client, mut peer) = (TokioIo::new(client), TokioIo::new(peer));
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut peer).await;
                }
                Err(e) => tracing::debug!("{name}: upgrade through another host failed: {e}"),
            }
        });
        let (parts, _) = response.into_parts();
        return Ok(Response::from_parts(
            parts,
            http_body_util::Empty::new().map_err(|e| match e {}).boxed(),
        ));
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    Ok(Response::from_parts(
        parts,
        body.map_err(|e| Box::new(e) as super::limits::BoxError)
            .boxed(),
    ))
}

/// The answer to a request the internal listener refuses: the sender is at fault.
fn refused(e: &AuthError) -> Response<Body> {
    let mut response = full(
        StatusCode::FORBIDDEN,
        "text/plain; charset=utf-8",
        format!("403 Forbidden: this listener serves other p0rt hosts only; {e}\n"),
    );
    response.headers_mut().insert(
        HeaderName::from_static(super::error::EDGE_ERROR_HEADER),
        HeaderValue::from_static("client"),
    );
    response
}

/// Serves one request from another host: verifies its signature, then runs the edge's
/// phases for it with the client's address and scheme it carries, on local tunnels only.
async fn handle_internal(
    req: Request<Incoming>,
    peer: SocketAddr,
    edge: Arc<HttpEdge>,
) -> Response<Body> {
    let Some(cluster) = edge.cluster.as_ref() else {
        return EdgeError::Offline.response();
    };
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".into(), |p| p.as_str().to_string());
    let forwarded =
        match cluster
            .signer()
            .verify(req.headers(), crate::unix_now(), req.method(), &path)
        {
            Ok(forwarded) => forwarded,
            Err(e) => {
                tracing::warn!(
                    "cluster: refused a request from {peer} on the internal listener: {e}"
                );
                return refused(&e);
            }
        };
    let (mut parts, body) = req.into_parts();
    for name in INTERNAL_HEADERS {
        parts.headers.remove(name);
    }
    let req = Request::from_parts(parts, body);
    // Tunnels only: the base domain's pages and APIs are each host's own.
    match route::route(req.method(), req.headers(), req.uri(), &edge.domain) {
        Ok(Target::Tunnel(_)) => {}
        Ok(_) => return EdgeError::UnknownName.response(),
        Err(e) => return e.response(),
    }
    let mut ctx = RequestCtx {
        peer,
        scheme: if forwarded.https { "https" } else { "http" },
        client_ip: forwarded.client_ip,
        client_ip_header: super::proxy::ip_header(forwarded.client_ip),
        started: Instant::now(),
        method: req.method().clone(),
        path,
        tunnel: None,
        forwarded: true,
    };
    let result = super::phases(req, &mut ctx, &edge).await;
    super::log(&ctx, &result, ctx.started.elapsed());
    result.unwrap_or_else(|e| e.response())
}

/// Accepts other hosts' connections on the internal listener until `stop`; then lets
/// requests in flight finish (at most [`SHUTDOWN_GRACE`]).
pub async fn serve_internal(listener: TcpListener, edge: Arc<HttpEdge>, mut stop: Stop) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_INTERNAL_CONNECTIONS));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(edge.limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    let builder = Arc::new(builder);
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.stopped() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (socket, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("cluster: internal accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let _ = socket.set_nodelay(true);
        let (edge, builder, mut stop) = (edge.clone(), builder.clone(), stop.clone());
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let edge = edge.clone();
                async move { Ok::<_, Infallible>(handle_internal(req, peer, edge).await) }
            });
            let serving = builder
                .serve_connection(TokioIo::new(socket), service)
                .with_upgrades();
            tokio::pin!(serving);
            let result = tokio::select! {
                result = serving.as_mut() => result,
                _ = stop.stopped() => {
                    serving.as_mut().graceful_shutdown();
                    serving.await
                }
            };
            if let Err(e) = result {
                tracing::debug!("cluster: internal connection from {peer}: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    let draining = async { while connections.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, draining).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_an_upgrade_keeps_its_own() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("connection", "Upgrade, X-Secret"),
            ("x-secret", "hop"),
            ("upgrade", "websocket"),
            ("keep-alive", "timeout=5"),
            ("accept", "*/*"),
        ] {
            headers.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        assert!(is_upgrade(&headers));
        let mut plain = headers.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain.len(), 1, "{plain:?}");
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers.get("connection").unwrap(), "upgrade");
        assert_eq!(headers.get("upgrade").unwrap(), "websocket");
        assert!(!headers.contains_key("x-secret") && !headers.contains_key("keep-alive"));
    }
}
