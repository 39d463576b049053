//! Phases 2 to 5 for a request to a live tunnel: admit, pick upstream, rewrite the request,
//! filter the response. Bodies stream both ways without buffering; an `Upgrade` request
//! (WebSocket) is piped byte for byte only after the backend's `101`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::error::EdgeError;
use super::limits::{BodyStalled, HttpLimits, IdleBody, InFlightGuard};
use super::upstream::UpstreamPool;
use super::{Body, RequestCtx};
use base64::Engine as _;

use crate::policy::{
    BasicAuth, HeaderEdit, HeaderEdits, RequestFacts, RequestPolicy, RequestVerdict,
};
use crate::tunnels::Tunnel;

// The forwarded headers as names, not strings: a `&str` name is parsed again on every use.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Request headers shown to the request policies as they are.
const POLICY_HEADERS: [HeaderName; 6] = [
    header::USER_AGENT,
    header::REFERER,
    header::CONTENT_LENGTH,
    header::UPGRADE,
    header::ORIGIN,
    header::ACCEPT,
];

/// Longest `Authorization` header the edge decodes for basic auth.
const MAX_AUTHORIZATION_BYTES: usize = 1024;

/// Phase 2, admit: asks the request policies what happens to this request. `Ok` carries
/// the header edits to apply when forwarding; every other verdict is an answer of the
/// edge's own.
pub async fn admit(
    req: &Request<Incoming>,
    ctx: &RequestCtx,
    tunnel: &Tunnel,
    policy: &dyn RequestPolicy,
) -> Result<HeaderEdits, EdgeError> {
    let options = tunnel.options.current(tunnel.opened).await;
    // Most requests are decided without their facts (a rate limiter's lease): nothing is
    // copied out of the request for them.
    if let Some(verdict) = policy.check_cached(
        ctx.client_ip_text(),
        tunnel.name.as_str(),
        !options.is_empty(),
    ) {
        return settle(verdict, req.headers());
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.rsplit_once(':').map_or(h, |(host, _)| host).to_string())
        .unwrap_or_default();
    let mut headers: Vec<(String, String)> = POLICY_HEADERS
        .iter()
        .filter_map(|name| {
            let value = req.headers().get(name)?.to_str().ok()?;
            Some((name.as_str().to_string(), value.to_string()))
        })
        .collect();
    if req.headers().contains_key(header::AUTHORIZATION) {
        headers.push(("authorization".into(), "present".into()));
    }
    let facts = RequestFacts {
        client_ip: ctx.client_ip_text().to_string(),
        host,
        name: tunnel.name.to_string(),
        owner_key_hash: tunnel.owner.to_string(),
        owner_tier: tunnel.tier().map(str::to_string),
        method: ctx.method.to_string(),
        path: ctx.path.clone(),
        headers,
        options: options.to_vec(),
        scheme: ctx.scheme.into(),
    };
    settle(policy.check_request(facts).await, req.headers())
}

/// What the edge does with a verdict: forward with header edits, or answer itself.
fn settle(verdict: RequestVerdict, headers: &HeaderMap) -> Result<HeaderEdits, EdgeError> {
    match verdict {
        RequestVerdict::Admit(edits) => Ok(edits),
        RequestVerdict::Limited {
            status,
            retry_after_seconds,
            message,
        } => Err(EdgeError::Denied {
            status,
            retry_after_seconds,
            message,
        }),
        RequestVerdict::Deny {
            status,
            headers,
            body,
        } => Err(EdgeError::PolicyAnswer {
            status,
            headers,
            body,
        }),
        RequestVerdict::Redirect { status, location } => {
            Err(EdgeError::Redirect { status, location })
        }
        RequestVerdict::RequireAuth(auth) => check_basic_auth(headers, auth),
    }
}

/// Admits a request whose `Authorization: Basic` credentials match one of `auth.users`;
/// the credentials are then removed, so the backend never sees the tunnel's password.
fn check_basic_auth(headers: &HeaderMap, auth: BasicAuth) -> Result<HeaderEdits, EdgeError> {
    let credentials = headers
        .get(header::AUTHORIZATION)
        .filter(|v| v.len() <= MAX_AUTHORIZATION_BYTES)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(token.trim())
        })
        .and_then(|token| base64::engine::general_purpose::STANDARD.decode(token).ok());
    let accepted = credentials.as_deref().and_then(|decoded| {
        let colon = decoded.iter().position(|b| *b == b':')?;
        let (user, password) = (&decoded[..colon], &decoded[colon + 1..]);
        // Every user's hash is checked, so timing does not tell which user names exist.
        let mut matched = false;
        for (name, hash) in &auth.users {
            matched |= name.as_bytes() == user && hash.verify(password);
        }
        matched.then_some(())
    });
    match accepted {
        Some(()) => {
            let mut edits = auth.edits;
            edits.request.push(HeaderEdit {
                name: header::AUTHORIZATION,
                value: None,
            });
            Ok(edits)
        }
        None => Err(EdgeError::AuthRequired { realm: auth.realm }),
    }
}

/// Applies a policy's header edits: a value sets (replacing every earlier one), none removes.
pub fn apply_edits(headers: &mut HeaderMap, edits: &[HeaderEdit]) {
    for edit in edits {
        match &edit.value {
            Some(value) => {
                headers.insert(edit.name.clone(), value.clone());
            }
            None => {
                headers.remove(&edit.name);
            }
        }
    }
}

/// Phases 3 to 5: sends the rewritten request on an upstream connection of `tunnel` and
/// returns the filtered response (or, for an upgrade, the `101` and a spawned pipe).
pub async fn forward(
    mut req: Request<Incoming>,
    ctx: &RequestCtx,
    tunnel: &Tunnel,
    pool: &UpstreamPool,
    edits: HeaderEdits,
    limits: &HttpLimits,
) -> Result<Response<Body>, EdgeError> {
    // Counted until the response body ends, so a slow backend holds at most this many.
    let in_flight = InFlightGuard::try_new(&tunnel.in_flight, limits.max_in_flight_per_tunnel)
        .ok_or(EdgeError::Busy)?;
    let client_upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let upgrade = client_upgrade.is_some();
    let (mut parts, body) = req.into_parts();
    rewrite_headers(
        &mut parts.headers,
        &ctx.client_ip_header,
        upgrade,
        ctx.scheme,
    );
    // After the host's own rewrite, so `x-forwarded-host` still names what the client asked
    // for when a policy rewrites `host`.
    apply_edits(&mut parts.headers, &edits.request);
    parts.uri = ctx.path.parse().unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = http::Version::HTTP_11;
    // The request body is the client's: if reading it fails (broken chunked framing, an
    // upload cut short), the failed exchange is the client's fault, not the backend's.
    let body_failed = Arc::new(AtomicBool::new(false));
    let body_stalled = Arc::new(AtomicBool::new(false));
    let body = IdleBody::new(body, limits.body_idle_timeout, None)
        .map_err({
            let (body_failed, body_stalled) = (body_failed.clone(), body_stalled.clone());
            move |e| {
                body_failed.store(true, Ordering::Relaxed);
                body_stalled.store(e.is::<BodyStalled>(), Ordering::Relaxed);
                e
            }
        })
        .boxed();

    // Upgrades get a connection of their own: it becomes the pipe and is never reused.
    let mut sender = pool
        .checkout(tunnel, ctx.peer, !upgrade)
        .await
        .map_err(EdgeError::Unreachable)?;
    let sent = tokio::time::timeout(
        limits.response_timeout,
        sender.send_request(Request::from_parts(parts, body)),
    )
    .await
    .map_err(|_| EdgeError::BackendTimeout)?;
    let response = sent.map_err(|e| {
        if body_stalled.load(Ordering::Relaxed) {
            EdgeError::RequestBodyStalled
        } else if body_failed.load(Ordering::Relaxed) {
            EdgeError::RequestBody(e)
        } else {
            EdgeError::Reset(e)
        }
    })?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let client = client_upgrade.ok_or(EdgeError::UnexpectedSwitch)?;
        return Ok(switch_protocols(response, client, tunnel));
    }
    if !upgrade {
        pool.put(tunnel, sender);
    }
    let mut response = filter_response(response, Some(in_flight), limits.response_idle_timeout);
    apply_edits(response.headers_mut(), &edits.response);
    Ok(response)
}

/// Phase 4, rewrite: hop-by-hop headers go; forwarded headers describe this hop only,
/// never what the client claims (p0rt is the edge). `client_ip`: the client's address as
/// text (`X-Forwarded-For`, formatted once per connection); `scheme`: `http` or `https`,
/// how the client reached the edge (`X-Forwarded-Proto`).
pub fn rewrite_headers(
    headers: &mut HeaderMap,
    client_ip: &HeaderValue,
    upgrade: bool,
    scheme: &'static str,
) {
    let host = headers.get(header::HOST).cloned();
    // `Upgrade` is never forwarded as it came: an upgrade gets exactly its own back below.
    let upgrade_header = strip(headers, true);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(value) = upgrade_header {
            headers.insert(header::UPGRADE, value);
        }
    }
    headers.insert(X_FORWARDED_FOR, client_ip.clone());
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    match host {
        Some(host) => headers.insert(X_FORWARDED_HOST, host),
        None => headers.remove(X_FORWARDED_HOST),
    };
}

/// An address as a header value (`X-Forwarded-For`).
pub(super) fn ip_header(ip: std::net::IpAddr) -> HeaderValue {
    // An address's text is always a valid header value.
    HeaderValue::from_str(&ip.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Phase 5, filter: the backend's response without its hop-by-hop headers; its body is cut
/// off if it pauses longer than `idle_timeout` (`http.limits.response_idle_timeout_seconds`),
/// and holds the tunnel's in-flight slot until it ends.
pub fn filter_response(
    response: Response<Incoming>,
    in_flight: Option<InFlightGuard>,
    idle_timeout: Duration,
) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = IdleBody::new(body, idle_timeout, in_flight);
    Response::from_parts(parts, body.boxed())
}

/// Answers the client's upgrade with the backend's `101` and pipes the two upgraded
/// connections into each other once both are ready.
fn switch_protocols(
    mut response: Response<Incoming>,
    client: OnUpgrade,
    tunnel: &Tunnel,
) -> Response<Body> {
    let backend = hyper::upgrade::on(&mut response);
    let name = tunnel.name.clone();
    tokio::spawn(async move {
        match tokio::try_join!(client, backend) {
            Ok((client, backend)) => {
                let mut client = TokioIo::new(client);
                let mut backend = TokioIo::new(backend);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
            }
            Err(e) => tracing::debug!("{name}: upgrade failed: {e}"),
        }
    });
    let (parts, _) = response.into_parts();
    Response::from_parts(
        parts,
        http_body_util::Empty::new().map_err(|e| match e {}).boxed(),
    )
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_tokens(headers).any(|t| t == "upgrade")
}

/// The lowercase tokens of every `Connection` header.
pub(super) fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
}

pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip(headers, false);
}

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1), then `Upgrade`,
/// which a request forwards only for an upgrade (put back by [`rewrite_headers`]).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Where `name` is in [`HOP_BY_HOP`].
fn hop_by_hop_index(name: &HeaderName) -> Option<u32> {
    // Names are lowercase; the match compares lengths first.
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "te" => 4,
        "trailer" => 5,
        "transfer-encoding" => 6,
        "upgrade" => 7,
        _ => return None,
    })
}

/// Removes the hop-by-hop headers and those named in `Connection`; with `upgrade`, also
/// `Upgrade`, whose first value it returns. The names present are found in one pass over
/// the map's names, and only those are removed: removing an absent name still hashes it,
/// which for a typical message was every one of them.
fn strip(headers: &mut HeaderMap, upgrade: bool) -> Option<HeaderValue> {
    let count = if upgrade { 8 } else { 7 };
    let mut present = 0u32;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name)
            && i < count
        {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return None;
    }
    let upgrade_value = (present & (1 << 7) != 0)
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    // A message framed by Transfer-Encoding has no length of its own: Transfer-Encoding
    // overrides Content-Length, and a proxy must drop the stale length before forwarding
    // (RFC 9112 §6.3). Kept, it would cut the re-framed body short.
    if present & (1 << 6) != 0 {
        headers.remove(header::CONTENT_LENGTH);
    }
    // Headers named in Connection are hop-by-hop too. Most messages name only `keep-alive`,
    // removed below anyway: nothing is collected (or allocated) for it, and no token is
    // lowercased into a new string (`HeaderName::from_bytes` lowercases).
    if present & 1 != 0 {
        let mut named: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split(',').map(str::trim) {
                if !token.eq_ignore_ascii_case("keep-alive")
                    && let Ok(name) = HeaderName::from_bytes(token.as_bytes())
                {
                    named.push(name);
                }
            }
        }
        for name in &named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP[..count as usize].iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    upgrade_value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn get<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn forwarded_headers_describe_this_hop_only() {
        let mut headers = map(&[
            ("host", "a.localhost:8080"),
            ("x-forwarded-for", "10.6.6.6"),
            ("x-forwarded-for", "10.7.7.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "bank.example"),
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "hop"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("accept", "*/*"),
        ]);
        rewrite_headers(
            &mut headers,
            &ip_header("192.0.2.7".parse().unwrap()),
            false,
            "http",
        );
        assert_eq!(get(&headers, "x-forwarded-for"), ["192.0.2.7"]);
        assert_eq!(get(&headers, "x-forwarded-proto"), ["http"]);
        assert_eq!(get(&headers, "x-forwarded-host"), ["a.localhost:8080"]);
        assert_eq!(get(&headers, "host"), ["a.localhost:8080"]);
        assert_eq!(get(&headers, "accept"), ["*/*"]);
        for gone in ["connection", "x-secret", "keep-alive", "te", "upgrade"] {
            assert!(!headers.contains_key(gone), "{gone} forwarded: {headers:?}");
        }
    }

    #[test]
    fn an_upgrade_keeps_exactly_its_upgrade_headers() {
        let mut headers = map(&[
            ("host", "a.localhost"),
            ("connection", "Upgrade, X-Secret"),
            ("x-secret", "hop"),
            ("upgrade", "websocket"),
        ]);
        assert!(is_upgrade(&headers));
        rewrite_headers(
            &mut headers,
            &ip_header("::1".parse().unwrap()),
            true,
            "https",
        );
        assert_eq!(get(&headers, "connection"), ["upgrade"]);
        assert_eq!(get(&headers, "upgrade"), ["websocket"]);
        assert_eq!(get(&headers, "x-forwarded-for"), ["::1"]);
        assert_eq!(
            get(&headers, "x-forwarded-proto"),
            ["https"],
            "a TLS request says so"
        );
        assert!(!headers.contains_key("x-secret"));
    }

    #[test]
    fn every_hop_by_hop_header_goes_and_nothing_else() {
        let mut headers = map(&[
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authenticate", "Basic"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("upgrade", "h2c"),
            ("content-type", "text/plain"),
            ("x-other", "1"),
        ]);
        strip_hop_by_hop(&mut headers);
        // A response's `Upgrade` is the backend's to send (a 101 is piped as it came).
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "upgrade", "x-other"], "{headers:?}");
        // A message without any is left as it was.
        let before = map(&[("content-type", "text/plain"), ("content-length", "3")]);
        let mut after = before.clone();
        strip_hop_by_hop(&mut after);
        assert_eq!(after, before);
        // `Connection: close` names no header; `Connection: upgrade` on a plain request
        // takes `Upgrade` with it.
        let mut headers = map(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        rewrite_headers(
            &mut headers,
            &ip_header("::1".parse().unwrap()),
            false,
            "http",
        );
        assert!(!headers.contains_key("upgrade"), "{headers:?}");
    }

    #[test]
    fn a_stale_length_beside_chunked_is_dropped() {
        let mut headers = map(&[
            ("content-length", "2"),
            ("transfer-encoding", "chunked"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut headers);
        assert!(!headers.contains_key("content-length"), "{headers:?}");
        assert!(!headers.contains_key("transfer-encoding"), "{headers:?}");
        // A length on its own is the message's framing and stays.
        let mut headers = map(&[("content-length", "58")]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(get(&headers, "content-length"), ["58"]);
    }
}
