//! The admin API: JSON under `/api/v1/` on the base domain (never on a tunnel's name).
//! Documented, with curl examples, in `docs/api.md`.
//!
//! | request | answer |
//! |---|---|
//! | `GET status` | version, uptime, live tunnels, store / cache / scan-queue backends, Redis health |
//! | `GET tunnels` | live tunnels: name, key fingerprint, client address, since, counters |
//! | `DELETE tunnels/{name}` | disconnects the SSH connection serving it |
//! | `DELETE keys/{fingerprint}` | disconnects every connection of that key |
//! | `GET domains?page=&per_page=` | stored names, by name, paged |
//! | `GET reservations`, `POST`/`DELETE reservations/{name}` | name reservations |
//! | `GET bans`, `POST`/`DELETE bans/addresses/{ip}` | address bans |
//! | `POST`/`DELETE bans/names/{name}`, `POST`/`DELETE bans/keys/{key}` | name and key bans |
//! | `GET plugins`, `POST plugins/reload` | plugin status; rescan the plugin directory |
//! | `GET scans` | every scan job |
//!
//! Errors are `{"error": "…"}` with the status saying whose fault it is
//! ([`AdminError::status`]).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AdminError, AdminState, authorize};
use crate::bans::{BanError, Identity};
use crate::cache::RedisHealth;
use crate::http::{Body, HttpEdge, full};
use crate::store::reservations::{Added, ReservationError, check_fingerprint, check_name};

/// Where the API lives on the base domain.
pub const API_PREFIX: &str = "/api/v1/";
/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 8 * 1024;
/// Time a client has to send a request body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Page size of `GET domains` when none is asked for.
pub const DEFAULT_PER_PAGE: usize = 50;
/// Largest page of `GET domains`.
pub const MAX_PER_PAGE: usize = 500;
/// Length of an operator's address ban when the request names none.
pub const DEFAULT_BAN: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest address ban the API sets (a year).
pub const MAX_BAN: Duration = Duration::from_secs(366 * 24 * 60 * 60);
/// What a disconnected client is told.
const DISCONNECT_REASON: &str = "disconnected by the p0rt operator";

pub(super) type Answer = Result<(StatusCode, Value), AdminError>;

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    full(status, "application/json", format!("{value}\n"))
}

/// The answer to an admin error: `{"error": …}`, with `Allow` or `WWW-Authenticate` when due.
pub fn error_response(e: &AdminError) -> Response<Body> {
    let mut response = json_response(e.status(), &json!({ "error": e.to_string() }));
    let headers = response.headers_mut();
    match e {
        AdminError::MethodNotAllowed(allow) => {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        AdminError::Unauthorized(_) => {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"p0rt admin\""),
            );
        }
        _ => {}
    }
    response
}

/// Serves one `/api/v1/…` request from TCP peer `peer`.
pub async fn handle(req: Request<Incoming>, peer: SocketAddr, edge: &HttpEdge) -> Response<Body> {
    let answer = match authorize(peer.ip(), req.headers(), edge.admin_token.as_ref()) {
        Err(e) => Err(e),
        Ok(()) => match &edge.admin {
            Some(state) => route(req, edge, state).await,
            None => Err(AdminError::Unavailable(
                "the admin API is not set up on this host".into(),
            )),
        },
    };
    match answer {
        Ok((status, value)) => json_response(status, &value),
        Err(e) => {
            if e.status().is_server_error() {
                tracing::warn!("admin api: {e}");
            }
            error_response(&e)
        }
    }
}

async fn route(req: Request<Incoming>, edge: &HttpEdge, state: &AdminState) -> Answer {
    let path = req.uri().path().to_string();
    let rest = path.strip_prefix(API_PREFIX).unwrap_or_default();
    let query = req.uri().query().unwrap_or_default().to_string();
    let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let method = req.method().clone();
    match (segments.as_slice(), &method) {
        (["status"], &Method::GET) => Ok((StatusCode::OK, status(edge, state))),
        (["status"], _) => Err(AdminError::MethodNotAllowed("GET")),
        (["tunnels"], &Method::GET) => Ok((StatusCode::OK, tunnels(edge))),
        (["tunnels"], _) => Err(AdminError::MethodNotAllowed("GET")),
        (["tunnels", name], &Method::DELETE) => disconnect_name(edge, &decode(name)?).await,
        (["tunnels", _], _) => Err(AdminError::MethodNotAllowed("DELETE")),
        // A fingerprint's base64 may hold `/`: everything after `keys/` is the fingerprint.
        (["keys", _, ..], &Method::DELETE) => {
            let fingerprint = decode(rest.trim_end_matches('/').trim_start_matches("keys/"))?;
            disconnect_key(edge, &fingerprint).await
        }
        (["keys", _, ..], _) => Err(AdminError::MethodNotAllowed("DELETE")),
        (["domains"], &Method::GET) => domains(edge, &query).await,
        (["domains"], _) => Err(AdminError::MethodNotAllowed("GET")),
        (["reservations"], &Method::GET) => reservations(edge).await,
        (["reservations"], _) => Err(AdminError::MethodNotAllowed("GET")),
        (["reservations", name], &Method::POST) => {
            let name = decode(name)?;
            let body: ReserveBody = read_json(req).await?;
            reserve(edge, &name, body).await
        }
        (["reservations", name], &Method::DELETE) => release(edge, &decode(name)?).await,
        (["reservations", _], _) => Err(AdminError::MethodNotAllowed("POST, DELETE")),
        (["bans"], &Method::GET) => bans(state).await,
        (["bans"], _) => Err(AdminError::MethodNotAllowed("GET")),
        (["bans", "addresses", ip], &Method::POST) => {
            let ip = parse_ip(&decode(ip)?)?;
            let body: BanBody = read_json(req).await?;
            ban(state, ip, body).await
        }
        (["bans", "addresses", ip], &Method::DELETE) => unban(state, parse_ip(&decode(ip)?)?).await,
        (["bans", "addresses", _], _) => Err(AdminError::MethodNotAllowed("POST, DELETE")),
        (["bans", "names", name], &Method::POST) => {
            let name = check_name(&decode(name)?).map_err(reservation_error)?;
            let body: BanBody = read_json(req).await?;
            ban_identity(state, Identity::Name, name.as_str(), body).await
        }
        (["bans", "names", name], &Method::DELETE) => {
            let name = check_name(&decode(name)?).map_err(reservation_error)?;
            unban_identity(state, Identity::Name, name.as_str()).await
        }
        (["bans", "names", _], _) => Err(AdminError::MethodNotAllowed("POST, DELETE")),
        // As for `keys/`: a fingerprint's base64 may hold `/`.
        (["bans", "keys", _, ..], &Method::POST) => {
            let key = parse_key(&decode(
                rest.trim_end_matches('/').trim_start_matches("bans/keys/"),
            )?)?;
            let body: BanBody = read_json(req).await?;
            ban_identity(state, Identity::Key, &key, body).await
        }
        (["bans", "keys", _, ..], &Method::DELETE) => {
            let key = parse_key(&decode(
                rest.trim_end_matches('/').trim_start_matches("bans/keys/"),
            )?)?;
            unban_identity(state, Identity::Key, &key).await
        }
        (["bans", "keys", _, ..], _) => Err(AdminError::MethodNotAllowed("POST, DELETE")),
        (["plugins"], &Method::GET) => {
            Ok((StatusCode::OK, json!({ "plugins": state.plugins.status() })))
        }
        (["plugins"], _) => Err(AdminError::MethodNotAllowed("GET")),
        (["plugins", "reload"], &Method::POST) => {
            state.plugins.reload().await;
            Ok((StatusCode::OK, json!({ "plugins": state.plugins.status() })))
        }
        (["plugins", "reload"], _) => Err(AdminError::MethodNotAllowed("POST")),
        (["scans"], &Method::GET) => match edge.scans.list(None).await {
            Ok(jobs) => Ok((StatusCode::OK, json!({ "jobs": jobs }))),
            Err(e) => Err(AdminError::Unavailable(e.to_string())),
        },
        (["scans"], _) => Err(AdminError::MethodNotAllowed("GET")),
        _ => Err(AdminError::NotFound(format!(
            "no admin resource {path}; see docs/api.md"
        ))),
    }
}

/// Percent-decodes one path part (a fingerprint's `+`, `/` and `:` arrive encoded).
pub(super) fn decode(part: &str) -> Result<String, AdminError> {
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    AdminError::BadRequest(format!("bad percent-encoding in {part:?}"))
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| AdminError::BadRequest(format!("{part:?} is not UTF-8")))
}

/// A key as a ban names it (see [`crate::bans::identity::check_key`]).
pub(super) fn parse_key(text: &str) -> Result<String, AdminError> {
    crate::bans::identity::check_key(text).map_err(AdminError::BadRequest)
}

pub(super) fn parse_ip(text: &str) -> Result<IpAddr, AdminError> {
    text.parse()
        .map_err(|_| AdminError::BadRequest(format!("{text:?} is not an IP address")))
}

/// Reads a bounded JSON body; an empty body is `{}`.
async fn read_json<T: for<'de> Deserialize<'de>>(req: Request<Incoming>) -> Result<T, AdminError> {
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES);
    let bytes: Bytes = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) => return Err(AdminError::TooLarge(MAX_BODY_BYTES)),
        Err(_) => return Err(AdminError::BodyTimeout),
    };
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes).map_err(|e| AdminError::BadRequest(format!("bad JSON body: {e}")))
}

pub(super) fn status(edge: &HttpEdge, state: &AdminState) -> Value {
    let redis = match edge.cache.health() {
        RedisHealth::Healthy { latency_ms } => {
            json!({ "status": "healthy", "latency_ms": latency_ms })
        }
        RedisHealth::Unhealthy { error } => json!({ "status": "unhealthy", "error": error }),
        RedisHealth::Disabled => json!({ "status": "disabled" }),
    };
    let cache = if matches!(edge.cache.health(), RedisHealth::Disabled) {
        "memory"
    } else {
        "redis"
    };
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "domain": edge.domain,
        "tunnels": edge.tunnels.live_tunnels().len(),
        "store": edge.store.kind(),
        "cache": cache,
        "scan_queue": edge.scans.queue_kind(),
        "redis": redis,
        "admin_token_set": edge.admin_token.is_some(),
    })
}

pub(super) fn tunnels(edge: &HttpEdge) -> Value {
    tunnels_of(&edge.tunnels)
}

/// `GET tunnels`'s answer from the tunnel registry alone (the console's live stream).
pub(super) fn tunnels_of(service: &crate::tunnels::TunnelService) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let mut list = service.live_tunnels();
    list.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
    let tunnels: Vec<Value> = list
        .iter()
        .map(|t| {
            json!({
                "name": t.name.as_str(),
                "fingerprint": t.fingerprint,
                "client": t.link.client_addr().map(|a| a.to_string()),
                "since": t.since,
                "requests": t.stats.requests.load(Relaxed),
                "bytes_in": t.stats.bytes_in.load(Relaxed),
                "bytes_out": t.stats.bytes_out.load(Relaxed),
                "in_flight": t.in_flight.load(Relaxed),
            })
        })
        .collect();
    json!({ "tunnels": tunnels })
}

pub(super) async fn disconnect_name(edge: &HttpEdge, name: &str) -> Answer {
    let Some(tunnel) = edge
        .tunnels
        .live_tunnels()
        .into_iter()
        .find(|t| t.name.as_str() == name.to_ascii_lowercase())
    else {
        return Err(AdminError::NotFound(format!("no live tunnel {name:?}")));
    };
    tracing::info!(
        "admin: disconnecting tunnel {} ({})",
        tunnel.name,
        tunnel.fingerprint
    );
    tunnel.output.line(format!("p0rt: {DISCONNECT_REASON}"));
    tunnel.link.disconnect(DISCONNECT_REASON).await;
    Ok((
        StatusCode::OK,
        json!({ "disconnected": [tunnel.name.as_str()] }),
    ))
}

async fn disconnect_key(edge: &HttpEdge, fingerprint: &str) -> Answer {
    let tunnels: Vec<_> = edge
        .tunnels
        .live_tunnels()
        .into_iter()
        .filter(|t| !t.fingerprint.is_empty() && t.fingerprint == fingerprint)
        .collect();
    if tunnels.is_empty() {
        return Err(AdminError::NotFound(format!(
            "no live tunnel of key {fingerprint:?}"
        )));
    }
    let mut names: Vec<String> = Vec::new();
    for tunnel in &tunnels {
        names.push(tunnel.name.to_string());
        tunnel.link.disconnect(DISCONNECT_REASON).await;
    }
    names.sort();
    tracing::info!(
        "admin: disconnected key {fingerprint} ({})",
        names.join(", ")
    );
    Ok((StatusCode::OK, json!({ "disconnected": names })))
}

/// `page` (from 1) and `per_page` (1..=[`MAX_PER_PAGE`]) from a query string.
fn paging(query: &str) -> Result<(usize, usize), AdminError> {
    let (mut page, mut per_page) = (1usize, DEFAULT_PER_PAGE);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number = |what: &str| {
            value
                .parse::<usize>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| AdminError::BadRequest(format!("{what} must be a whole number ≥ 1")))
        };
        match key {
            "page" => page = number("page")?,
            "per_page" => {
                per_page = number("per_page")?;
                if per_page > MAX_PER_PAGE {
                    return Err(AdminError::BadRequest(format!(
                        "per_page is at most {MAX_PER_PAGE}"
                    )));
                }
            }
            _ => {}
        }
    }
    Ok((page, per_page))
}

pub(super) async fn domains(edge: &HttpEdge, query: &str) -> Answer {
    let (page, per_page) = paging(query)?;
    let mut records = edge
        .store
        .all_records()
        .await
        .map_err(|e| AdminError::Unavailable(e.to_string()))?;
    records.sort_by(|a, b| a.domain.cmp(&b.domain));
    let total = records.len();
    let start = (page - 1).saturating_mul(per_page).min(total);
    let end = start.saturating_add(per_page).min(total);
    Ok((
        StatusCode::OK,
        json!({
            "page": page,
            "per_page": per_page,
            "total": total,
            "domains": &records[start..end],
        }),
    ))
}

fn reservation_error(e: ReservationError) -> AdminError {
    match e {
        ReservationError::Invalid(m) => AdminError::BadRequest(m),
        ReservationError::Conflict(m) => AdminError::Conflict(m),
        other => AdminError::Unavailable(other.to_string()),
    }
}

pub(super) async fn reservations(edge: &HttpEdge) -> Answer {
    let list = edge
        .store
        .reservations()
        .list()
        .await
        .map_err(reservation_error)?;
    Ok((StatusCode::OK, json!({ "reservations": list })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveBody {
    fingerprint: Option<String>,
    comment: Option<String>,
}

async fn reserve(edge: &HttpEdge, name: &str, body: ReserveBody) -> Answer {
    let name = check_name(name).map_err(reservation_error)?;
    let fingerprint = body.fingerprint.ok_or_else(|| {
        AdminError::BadRequest(
            "send {\"fingerprint\": \"SHA256:…\"} (ssh-keygen -lf KEY.pub)".into(),
        )
    })?;
    check_fingerprint(&fingerprint).map_err(reservation_error)?;
    if let Some(comment) = &body.comment
        && comment.chars().any(char::is_control)
    {
        return Err(AdminError::BadRequest(
            "the comment may not hold control characters".into(),
        ));
    }
    let added = edge
        .store
        .reservations()
        .add(&name, &fingerprint, body.comment.as_deref())
        .await
        .map_err(reservation_error)?;
    Ok(match added {
        Added::Created(r) => (
            StatusCode::CREATED,
            json!({ "reservation": r, "created": true }),
        ),
        Added::Renewed(r) => (
            StatusCode::OK,
            json!({ "reservation": r, "created": false }),
        ),
    })
}

async fn release(edge: &HttpEdge, name: &str) -> Answer {
    let name = check_name(name).map_err(reservation_error)?;
    match edge
        .store
        .reservations()
        .remove(&name)
        .await
        .map_err(reservation_error)?
    {
        Some(r) => Ok((StatusCode::OK, json!({ "removed": r }))),
        None => Err(AdminError::NotFound(format!("{name} is not reserved"))),
    }
}

fn ban_error(e: BanError) -> AdminError {
    match e {
        e @ BanError::Exempt(_) => AdminError::Conflict(e.to_string()),
        e @ BanError::Full(_) => AdminError::Conflict(e.to_string()),
        e => AdminError::Unavailable(e.to_string()),
    }
}

/// A name or key ban as the API shows it: `name` or `key`, `since`, `until` (null: until
/// lifted), `reason`.
pub(super) async fn bans(state: &AdminState) -> Answer {
    let all = state.bans.all_json().await.map_err(ban_error)?;
    Ok((StatusCode::OK, all))
}

/// The length a ban body asks for: `None` (the default) until lifted.
fn identity_length(seconds: Option<u64>) -> Result<Option<Duration>, AdminError> {
    match seconds {
        None => Ok(None),
        Some(0) => Err(AdminError::BadRequest("seconds must be ≥ 1".into())),
        Some(s) if s > MAX_BAN.as_secs() => Err(AdminError::BadRequest(format!(
            "seconds is at most {} (leave it out for a ban until lifted)",
            MAX_BAN.as_secs()
        ))),
        Some(s) => Ok(Some(Duration::from_secs(s))),
    }
}

/// A ban's reason as given (a default when none), refused if it holds control characters
/// (it is shown in logs, ssh clients' terminals and the console).
fn ban_reason(reason: Option<String>) -> Result<String, AdminError> {
    let reason = reason.unwrap_or_else(|| "banned by the operator".into());
    if reason.chars().any(char::is_control) {
        return Err(AdminError::BadRequest(
            "the reason may not hold control characters".into(),
        ));
    }
    Ok(reason)
}

/// Bans a name or a key (already checked); its live tunnels and sessions are closed by the
/// SSH edge's enforcer within moments.
pub(super) async fn ban_identity(
    state: &AdminState,
    kind: Identity,
    target: &str,
    body: BanBody,
) -> Answer {
    let length = identity_length(body.seconds)?;
    let reason = ban_reason(body.reason)?;
    let ban = state
        .bans
        .ban_identity(kind, target, length, &reason)
        .await
        .map_err(ban_error)?;
    tracing::info!(
        "admin: banned {} {target} {} ({reason})",
        kind.as_str(),
        match length {
            Some(l) => format!("for {} s", l.as_secs()),
            None => "until lifted".into(),
        }
    );
    Ok((StatusCode::CREATED, json!({ "ban": ban.to_json(kind) })))
}

pub(super) async fn unban_identity(state: &AdminState, kind: Identity, target: &str) -> Answer {
    match state.bans.unban_identity(kind, target).await {
        Ok(true) => {
            tracing::info!("admin: lifted the ban of {} {target}", kind.as_str());
            Ok((StatusCode::OK, json!({ "unbanned": target })))
        }
        Ok(false) => Err(AdminError::NotFound(format!(
            "{} {target} is not banned",
            kind.as_str()
        ))),
        Err(e) => Err(ban_error(e)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BanBody {
    pub(super) seconds: Option<u64>,
    pub(super) reason: Option<String>,
}

pub(super) async fn ban(state: &AdminState, ip: IpAddr, body: BanBody) -> Answer {
    let length = match body.seconds {
        None => DEFAULT_BAN,
        Some(0) => return Err(AdminError::BadRequest("seconds must be ≥ 1".into())),
        Some(s) if s > MAX_BAN.as_secs() => {
            return Err(AdminError::BadRequest(format!(
                "seconds is at most {}",
                MAX_BAN.as_secs()
            )));
        }
        Some(s) => Duration::from_secs(s),
    };
    let reason = ban_reason(body.reason)?;
    match state.bans.ban(ip, length, &reason).await {
        Ok(ban) => {
            tracing::info!("admin: banned {ip} for {} s", length.as_secs());
            Ok((StatusCode::CREATED, json!({ "ban": ban })))
        }
        Err(e) => Err(ban_error(e)),
    }
}

pub(super) async fn unban(state: &AdminState, ip: IpAddr) -> Answer {
    match state.bans.unban(ip).await {
        Ok(true) => Ok((StatusCode::OK, json!({ "unbanned": ip }))),
        Ok(false) => Err(AdminError::NotFound(format!("{ip} is not banned"))),
        Err(e) => Err(AdminError::Unavailable(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_is_bounded_and_checked() {
        assert_eq!(paging("").unwrap(), (1, DEFAULT_PER_PAGE));
        assert_eq!(paging("page=3&per_page=10").unwrap(), (3, 10));
        for bad in ["page=0", "page=x", "per_page=0", "per_page=501", "page=-1"] {
            assert_eq!(
                paging(bad).unwrap_err().status(),
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
    }

    #[test]
    fn path_parts_are_percent_decoded() {
        assert_eq!(decode("SHA256%3Aab%2Bc%2Fd").unwrap(), "SHA256:ab+c/d");
        assert!(decode("%zz").is_err());
        assert!(decode("%ff").is_err());
    }
}
