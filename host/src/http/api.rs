//! `/api/scans` on the base domain (never on a tunnel's name).
//!
//! - `POST /api/scans` `{"target"?, "checks"?, "ports"?}` → 202 `{"jobs": [...]}`
//! - `GET /api/scans` → the caller's recent jobs (the operator: everyone's)
//! - `GET /api/scans/{id}` → one job; `DELETE /api/scans/{id}` cancels it
//!
//! Authenticated by `Authorization: Bearer <token>`: a key's token from `ssh … token` sees
//! and cancels that key's jobs; the admin token (`ADMIN_TOKEN`) sees and cancels every job
//! but cannot submit (a scan always belongs to a key). Anything else gets 401.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::{Body, HttpEdge, full};
use crate::names::KeyHash;
use crate::scan::{JobId, ScanError, ScanRequest};

/// Largest request body accepted by the API.
pub const MAX_API_BODY_BYTES: usize = 8 * 1024;
/// Time a client has to send an API request body.
pub const API_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is calling.
enum Caller {
    Key(KeyHash),
    Operator,
}

impl Caller {
    /// The key whose jobs the caller may see; `None` for the operator (every job).
    fn viewer(&self) -> Option<&KeyHash> {
        match self {
            Caller::Key(key) => Some(key),
            Caller::Operator => None,
        }
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    full(status, "application/json", format!("{value}\n"))
}

fn problem(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    json(status, serde_json::json!({ "error": message.to_string() }))
}

/// Serves `/api/scans…`; `None` for any other path (the caller answers 404).
pub async fn handle(req: Request<Incoming>, edge: &HttpEdge) -> Option<Response<Body>> {
    let path = req.uri().path().to_string();
    let rest = path.strip_prefix("/api/scans")?;
    let id = match rest {
        "" | "/" => None,
        _ => Some(rest.strip_prefix('/')?.to_string()),
    };
    Some(match authenticate(&req, edge).await {
        Err(response) => response,
        Ok(caller) => match (req.method().clone(), id) {
            (Method::POST, None) => submit(req, &caller, edge).await,
            (Method::GET, None) => list(&caller, edge).await,
            (Method::GET, Some(id)) => show(&id, &caller, edge, false).await,
            (Method::DELETE, Some(id)) => show(&id, &caller, edge, true).await,
            _ => {
                let mut response = problem(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
                let allow = if rest.len() > 1 {
                    "GET, DELETE"
                } else {
                    "GET, POST"
                };
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
                response
            }
        },
    })
}

async fn authenticate(req: &Request<Incoming>, edge: &HttpEdge) -> Result<Caller, Response<Body>> {
    let unauthorized = |message: &str| {
        let mut response = problem(StatusCode::UNAUTHORIZED, message);
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"p0rt\""),
        );
        response
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            unauthorized("send Authorization: Bearer <token>; `ssh … token` prints your token")
        })?;
    if let Some(admin) = &edge.admin_token
        && super::base::constant_time_eq(presented.as_bytes(), admin.expose().as_bytes())
    {
        return Ok(Caller::Operator);
    }
    match edge.tokens.key_for(presented).await {
        Ok(Some(key)) => Ok(Caller::Key(key)),
        Ok(None) => Err(unauthorized(
            "unknown or revoked token; `ssh … token` prints a new one",
        )),
        Err(e) => Err(problem(StatusCode::SERVICE_UNAVAILABLE, e)),
    }
}

async fn submit(req: Request<Incoming>, caller: &Caller, edge: &HttpEdge) -> Response<Body> {
    let Caller::Key(key) = caller else {
        return problem(
            StatusCode::FORBIDDEN,
            "the admin token sees and cancels jobs; a scan is submitted with its key's token",
        );
    };
    let body = Limited::new(req.into_body(), MAX_API_BODY_BYTES);
    let bytes: Bytes = match tokio::time::timeout(API_BODY_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) => {
            return problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body must be JSON of at most {MAX_API_BODY_BYTES} bytes"),
            );
        }
        Err(_) => {
            return problem(
                StatusCode::REQUEST_TIMEOUT,
                "the body did not arrive in time",
            );
        }
    };
    let request: ScanRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        ScanRequest::default()
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(request) => request,
            Err(e) => return problem(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")),
        }
    };
    match edge.scans.submit(key, &request).await {
        Ok(jobs) => json(StatusCode::ACCEPTED, serde_json::json!({ "jobs": jobs })),
        Err(e) => scan_error(e),
    }
}

fn scan_error(e: ScanError) -> Response<Body> {
    let status = match &e {
        ScanError::NoTunnels => StatusCode::CONFLICT,
        ScanError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ScanError::Queue(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    problem(status, e)
}

async fn list(caller: &Caller, edge: &HttpEdge) -> Response<Body> {
    match edge.scans.list(caller.viewer()).await {
        Ok(jobs) => json(StatusCode::OK, serde_json::json!({ "jobs": jobs })),
        Err(e) => scan_error(e),
    }
}

async fn show(id: &str, caller: &Caller, edge: &HttpEdge, cancel: bool) -> Response<Body> {
    // Another key's job is as unknown as a job that never existed.
    let not_found = || problem(StatusCode::NOT_FOUND, "no such scan job");
    let Some(id) = JobId::parse(id) else {
        return not_found();
    };
    let found = if cancel {
        edge.scans.cancel(&id, caller.viewer()).await
    } else {
        edge.scans.get(&id, caller.viewer()).await
    };
    match found {
        Ok(Some(job)) => json(
            StatusCode::OK,
            serde_json::to_value(job).unwrap_or_default(),
        ),
        Ok(None) => not_found(),
        Err(e) => scan_error(e),
    }
}
