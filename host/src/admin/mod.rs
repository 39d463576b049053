//! The operator's surface: the admin API (`/api/v1/…` on the base domain, [`api`]) and the
//! `p0rt admin …` commands that call it ([`cli`]), and the web console ([`console`]).
//!
//! Who may call: with `ADMIN_TOKEN` set, whoever presents it (`Authorization: Bearer …` or
//! P0rt's `X-API-Key: …`, compared in constant time); with no token, loopback clients only,
//! judged by the real TCP peer, and only for requests that carry no forwarding headers (a
//! reverse proxy on the same machine makes every visitor look local). See [`authorize`].

pub mod api;
pub mod cli;
pub mod console;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::HeaderMap;
use http::StatusCode;
use http::header;
use subtle::ConstantTimeEq;

use crate::bans::BanList;
use crate::config::Secret;
use crate::plugins::PolicyPlugins;

/// Header P0rt's admin API takes the key in.
pub const API_KEY_HEADER: &str = "x-api-key";
/// Headers that mean the request came through a proxy: with no admin token set, such a
/// request is refused even from loopback.
const FORWARDING_HEADERS: [&str; 3] = ["forwarded", "x-forwarded-for", "x-real-ip"];

/// What the admin API needs beyond the HTTP edge's own handles.
pub struct AdminState {
    /// The failed-auth ban list (the SSH edge's).
    pub bans: Arc<BanList>,
    /// For `GET plugins` and `POST plugins/reload`.
    pub plugins: Arc<PolicyPlugins>,
    /// When the host started, for the uptime.
    pub started: Instant,
    /// The web console's settings and live streams ([`console`]).
    pub console: console::ConsoleState,
}

/// Why an admin request was refused or failed; each says whose fault it is via its status.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The caller sent no credentials, or wrong ones.
    #[error("{0}")]
    Unauthorized(String),
    /// The caller may not use the API at all from where it is.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The caller's request is malformed.
    #[error("{0}")]
    BadRequest(String),
    #[error("method not allowed; allowed: {0}")]
    MethodNotAllowed(&'static str),
    #[error("the body must be JSON of at most {0} bytes")]
    TooLarge(usize),
    #[error("the body did not arrive in time")]
    BodyTimeout,
    /// The request conflicts with the current state (a name reserved for another key).
    #[error("{0}")]
    Conflict(String),
    /// A backend of the host (store, Redis) failed; try again.
    #[error("{0}")]
    Unavailable(String),
}

impl AdminError {
    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AdminError::Forbidden(_) => StatusCode::FORBIDDEN,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The admin token a request presents, if any: `Authorization: Bearer …` or `X-API-Key`.
pub fn presented_token(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    bearer.or_else(|| {
        headers
            .get(API_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    })
}

/// Constant time in the token's content (the length may show, as it does on the wire).
pub fn token_matches(presented: &str, token: &Secret) -> bool {
    bool::from(presented.as_bytes().ct_eq(token.expose().as_bytes()))
}

/// Whether a request from TCP peer `peer` with `headers` may use the operator's endpoints.
pub fn authorize(
    peer: IpAddr,
    headers: &HeaderMap,
    token: Option<&Secret>,
) -> Result<(), AdminError> {
    match (token, presented_token(headers)) {
        (Some(token), Some(presented)) if token_matches(presented, token) => Ok(()),
        (Some(_), Some(_)) => Err(AdminError::Unauthorized(
            "wrong admin token (the host's ADMIN_TOKEN)".into(),
        )),
        (Some(_), None) => Err(AdminError::Unauthorized(
            "send the admin token: Authorization: Bearer <ADMIN_TOKEN> or X-API-Key: <ADMIN_TOKEN>"
                .into(),
        )),
        (None, _) => {
            let proxied = FORWARDING_HEADERS.iter().any(|h| headers.contains_key(*h));
            if peer.is_loopback() && !proxied {
                Ok(())
            } else {
                Err(AdminError::Forbidden(
                    "no admin token is set, so the admin API answers only direct loopback \
                     clients; set ADMIN_TOKEN on the host to use it from elsewhere"
                        .into(),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const REMOTE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 7));

    #[test]
    fn without_a_token_only_direct_loopback_clients_are_let_in() {
        assert!(authorize(LOCAL, &headers(&[]), None).is_ok());
        assert!(authorize("::1".parse().unwrap(), &headers(&[]), None).is_ok());
        let remote = authorize(REMOTE, &headers(&[]), None).unwrap_err();
        assert_eq!(remote.status(), StatusCode::FORBIDDEN);
        assert!(remote.to_string().contains("ADMIN_TOKEN"), "{remote}");
        // A guessed token does not help when none is set.
        let guessed = authorize(REMOTE, &headers(&[("x-api-key", "x")]), None).unwrap_err();
        assert_eq!(guessed.status(), StatusCode::FORBIDDEN);
        // A local reverse proxy forwards everybody from loopback.
        for h in FORWARDING_HEADERS {
            let proxied = authorize(LOCAL, &headers(&[(h, "203.0.113.7")]), None).unwrap_err();
            assert_eq!(proxied.status(), StatusCode::FORBIDDEN, "{h}");
        }
    }

    #[test]
    fn with_a_token_everyone_must_present_it() {
        let token = Secret::new("s3cret-token");
        let t = Some(&token);
        assert!(
            authorize(
                REMOTE,
                &headers(&[("authorization", "Bearer s3cret-token")]),
                t
            )
            .is_ok()
        );
        assert!(authorize(REMOTE, &headers(&[("x-api-key", "s3cret-token")]), t).is_ok());
        for (h, v) in [
            ("authorization", "Bearer s3cret-tokeN"),
            ("authorization", "Bearer s3cret"),
            ("authorization", "Basic s3cret-token"),
            ("x-api-key", ""),
        ] {
            let e = authorize(REMOTE, &headers(&[(h, v)]), t).unwrap_err();
            assert_eq!(e.status(), StatusCode::UNAUTHORIZED, "{h}: {v}");
        }
        // Loopback too: with a token set, nobody is let in without it.
        let e = authorize(LOCAL, &headers(&[]), t).unwrap_err();
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
    }
}
