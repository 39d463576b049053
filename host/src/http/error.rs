//! The one error of the HTTP edge. Each variant knows whose fault it is, its status and its
//! page; the page is the variant's fixed text, so nothing from the request is ever reflected.

use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use super::upstream::UpstreamError;
use super::{Body, full};
use crate::store::StoreError;

/// Whose fault a failed request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The client sent something the edge does not serve (4xx).
    Client,
    /// The tunnel's client or its local service failed (502).
    Tunnel,
    /// The name exists but its owner is not connected (503).
    Offline,
    /// The host itself failed (503).
    Host,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Client => "client",
            Fault::Tunnel => "tunnel",
            Fault::Offline => "offline",
            Fault::Host => "host",
        }
    }
}

/// Why the edge answered a request itself. The `Display` text is the page's sentence.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("the Host header is missing")]
    HostMissing,
    #[error("more than one Host header")]
    HostDuplicated,
    #[error("the Host header is malformed")]
    HostMalformed,
    #[error("the request target's host differs from the Host header")]
    TargetDisagrees,
    #[error("CONNECT is not served: p0rt is not a forward proxy")]
    Connect,
    #[error("the request body is malformed (check its chunked framing or Content-Length)")]
    RequestBody(#[source] hyper::Error),
    #[error("no tunnel has this name.")]
    UnknownName,
    /// The operator banned the name: served to nobody.
    #[error("this name is banned on this host by its operator.")]
    NameBanned,
    #[error("{0} is served to loopback clients or with the admin token.")]
    AdminOnly(&'static str),
    /// The request policy refused it; the message is the operator's policy's, not the client's.
    #[error("{message}")]
    Denied {
        status: StatusCode,
        retry_after_seconds: Option<u32>,
        message: String,
    },
    /// The request policy answered it (status, headers and body are the policy's, checked).
    #[error("{body}")]
    PolicyAnswer {
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: String,
    },
    /// The request policy redirected it.
    #[error("redirected by the tunnel's access policy")]
    Redirect {
        status: StatusCode,
        location: HeaderValue,
    },
    /// The request policy asked for basic auth and the request had no valid credentials.
    #[error("this tunnel needs a user name and password.")]
    AuthRequired { realm: String },
    #[error("the request body stopped arriving.")]
    RequestBodyStalled,
    #[error("the tunnel is busy (too many requests in flight); try again shortly.")]
    Busy,
    #[error("the tunnel's local service did not answer in time.")]
    BackendTimeout,
    #[error("tunnel offline. Its owner is not connected right now.")]
    Offline,
    #[error("the tunnel's local service did not accept the connection.")]
    Unreachable(#[source] UpstreamError),
    #[error("the tunnel's local service closed or reset the connection.")]
    Reset(#[source] hyper::Error),
    #[error("unexpected protocol switch")]
    UnexpectedSwitch,
    #[error("domain store unavailable")]
    Store(#[source] StoreError),
    /// The cluster host serving the tunnel did not take the connection (dead or cut off).
    #[error("the p0rt host serving this tunnel cannot be reached right now; try again shortly.")]
    PeerUnreachable,
    /// The cluster host serving the tunnel broke off the exchange.
    #[error("the p0rt host serving this tunnel broke off the exchange.")]
    PeerFailed,
}

/// Header on every response the edge itself produced: `client`, `tunnel`, `offline` or
/// `host`. Defined beside the scanner that reads it (the edge depends on `scan`, not back).
pub use crate::scan::checks::EDGE_ERROR_HEADER;

/// What a 405 names as served: every method but CONNECT is forwarded.
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

impl EdgeError {
    pub fn fault(&self) -> Fault {
        use EdgeError::*;
        match self {
            HostMissing
            | HostDuplicated
            | HostMalformed
            | TargetDisagrees
            | Connect
            | RequestBody(_)
            | RequestBodyStalled
            | UnknownName
            | NameBanned
            | AdminOnly(_)
            | Denied { .. }
            | PolicyAnswer { .. }
            | Redirect { .. }
            | AuthRequired { .. } => Fault::Client,
            Unreachable(_) | Reset(_) | UnexpectedSwitch | Busy | BackendTimeout => Fault::Tunnel,
            Offline => Fault::Offline,
            Store(_) | PeerUnreachable | PeerFailed => Fault::Host,
        }
    }

    pub fn status(&self) -> StatusCode {
        use EdgeError::*;
        match self {
            Connect => StatusCode::METHOD_NOT_ALLOWED,
            UnknownName => StatusCode::NOT_FOUND,
            NameBanned => StatusCode::GONE,
            AdminOnly(_) => StatusCode::FORBIDDEN,
            Denied { status, .. } | PolicyAnswer { status, .. } | Redirect { status, .. } => {
                *status
            }
            AuthRequired { .. } => StatusCode::UNAUTHORIZED,
            RequestBodyStalled => StatusCode::REQUEST_TIMEOUT,
            Busy => StatusCode::SERVICE_UNAVAILABLE,
            BackendTimeout => StatusCode::GATEWAY_TIMEOUT,
            PeerFailed => StatusCode::BAD_GATEWAY,
            _ => match self.fault() {
                Fault::Client => StatusCode::BAD_REQUEST,
                Fault::Tunnel => StatusCode::BAD_GATEWAY,
                Fault::Offline | Fault::Host => StatusCode::SERVICE_UNAVAILABLE,
            },
        }
    }

    /// The plain-text page: status, reason and this error's fixed sentence.
    pub fn response(&self) -> Response<Body> {
        let status = self.status();
        if let EdgeError::PolicyAnswer { headers, body, .. } = self {
            let mut response = full(status, "text/plain; charset=utf-8", body.clone());
            for (name, value) in headers {
                response.headers_mut().insert(name.clone(), value.clone());
            }
            response.headers_mut().insert(
                HeaderName::from_static(EDGE_ERROR_HEADER),
                HeaderValue::from_static(self.fault().as_str()),
            );
            return response;
        }
        let text = match self {
            EdgeError::Denied { message, .. } => format!("{} {message}\n", status.as_u16()),
            _ => format!(
                "{} {}: {self}\n",
                status.as_u16(),
                status.canonical_reason().unwrap_or("Error")
            ),
        };
        let mut response = full(status, "text/plain; charset=utf-8", text);
        let headers = response.headers_mut();
        // Tells a client (and p0rt's own scanner) that the edge answered, not the backend.
        headers.insert(
            HeaderName::from_static(EDGE_ERROR_HEADER),
            HeaderValue::from_static(self.fault().as_str()),
        );
        match self {
            EdgeError::Connect => {
                headers.insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
            }
            EdgeError::Denied {
                retry_after_seconds: Some(seconds),
                ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*seconds));
            }
            EdgeError::Busy => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(super::limits::BUSY_RETRY_AFTER_SECONDS),
                );
            }
            EdgeError::RequestBodyStalled => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            EdgeError::Redirect { location, .. } => {
                headers.insert(header::LOCATION, location.clone());
            }
            EdgeError::AuthRequired { realm } => {
                // The realm was checked (printable, no quotes) when the verdict was.
                if let Ok(value) =
                    HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\""))
                {
                    headers.insert(header::WWW_AUTHENTICATE, value);
                }
            }
            _ => {}
        }
        response
    }

    /// Logs the error with its causes: host faults loudly, the rest for debugging.
    pub fn log(&self, tunnel: Option<&str>) {
        let mut text = format!("{}: {self}", tunnel.unwrap_or("-"));
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        match self.fault() {
            Fault::Host => tracing::warn!("{text}"),
            _ => tracing::debug!("{text}"),
        }
    }
}
