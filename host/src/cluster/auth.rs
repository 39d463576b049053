//! Authentication of requests between hosts: the forwarding host signs each request with
//! HMAC-SHA256 under the shared `cluster.secret`, over a timestamp and every field the
//! owning host believes (method, `Host`, path, client address, scheme, sender). The secret
//! itself never travels; a signature is good for [`MAX_CLOCK_SKEW`] either side of now, and
//! is checked in constant time (`ring::hmac::verify`).

use std::net::IpAddr;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method};
use ring::hmac;

/// The signature: `v1:<unix seconds>:<hex HMAC>`.
pub const AUTH_HEADER: &str = "x-p0rt-cluster-auth";
/// The forwarding host's id. Its presence marks a forwarded request, never forwarded again.
pub const FROM_HEADER: &str = "x-p0rt-cluster-from";
/// The client's address as the edge host resolved it.
pub const CLIENT_IP_HEADER: &str = "x-p0rt-cluster-client-ip";
/// `http` or `https`: how the client reached the edge host.
pub const SCHEME_HEADER: &str = "x-p0rt-cluster-scheme";
/// Every internal header: removed from what a client sends before forwarding, and from
/// what the owning host passes to the backend.
pub const INTERNAL_HEADERS: [&str; 4] = [AUTH_HEADER, FROM_HEADER, CLIENT_IP_HEADER, SCHEME_HEADER];
/// How far a signature's timestamp may be from the receiver's clock (hosts run NTP).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Version tag of the signed text, so a future format cannot be confused with this one.
const VERSION: &str = "v1";

/// Why the internal listener refused a request. The sender is at fault in every case.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the request is not signed with the cluster secret (no {AUTH_HEADER} header)")]
    Missing,
    #[error("the {0} header is malformed")]
    Malformed(&'static str),
    #[error("the signature is too old or from the future (check the hosts' clocks)")]
    Stale,
    #[error("the signature does not match (is CLUSTER_SECRET the same on every host?)")]
    BadSignature,
}

/// What a verified request tells the owning host.
#[derive(Debug, PartialEq, Eq)]
pub struct Forwarded {
    pub from: String,
    pub client_ip: IpAddr,
    pub https: bool,
}

/// Signs and checks internal requests with one secret.
pub struct Signer {
    key: hmac::Key,
}

fn text(
    ts: i64,
    from: &str,
    method: &Method,
    host: &str,
    path: &str,
    client_ip: IpAddr,
    https: bool,
) -> String {
    let scheme = if https { "https" } else { "http" };
    format!("{VERSION}\n{ts}\n{from}\n{method}\n{host}\n{path}\n{client_ip}\n{scheme}")
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, AuthError> {
    let mut values = headers.get_all(name).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(AuthError::Malformed(name));
    };
    value.to_str().map_err(|_| AuthError::Malformed(name))
}

impl Signer {
    pub fn new(secret: &str) -> Signer {
        Signer {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()),
        }
    }

    /// Adds the internal headers (replacing any a client sent) for a request from `from`.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        &self,
        headers: &mut HeaderMap,
        now: i64,
        from: &str,
        method: &Method,
        path: &str,
        client_ip: IpAddr,
        https: bool,
    ) {
        let host = headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_string();
        let tag = hmac::sign(
            &self.key,
            text(now, from, method, &host, path, client_ip, https).as_bytes(),
        );
        let values = [
            (
                AUTH_HEADER,
                format!("{VERSION}:{now}:{}", hex::encode(tag.as_ref())),
            ),
            (FROM_HEADER, from.to_string()),
            (CLIENT_IP_HEADER, client_ip.to_string()),
            (
                SCHEME_HEADER,
                if https { "https" } else { "http" }.to_string(),
            ),
        ];
        for (name, value) in values {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
    }

    /// Checks a request's signature at `now`; `path` is its path and query as received.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        now: i64,
        method: &Method,
        path: &str,
    ) -> Result<Forwarded, AuthError> {
        if !headers.contains_key(AUTH_HEADER) {
            return Err(AuthError::Missing);
        }
        let auth = header(headers, AUTH_HEADER)?;
        let mut parts = auth.splitn(3, ':');
        let (Some(VERSION), Some(ts), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed(AUTH_HEADER));
        };
        let ts: i64 = ts.parse().map_err(|_| AuthError::Malformed(AUTH_HEADER))?;
        let tag = hex::decode(tag).map_err(|_| AuthError::Malformed(AUTH_HEADER))?;
        if ts.abs_diff(now) > MAX_CLOCK_SKEW.as_secs() {
            return Err(AuthError::Stale);
        }
        let from = header(headers, FROM_HEADER)?;
        let client_ip: IpAddr = header(headers, CLIENT_IP_HEADER)?
            .parse()
            .map_err(|_| AuthError::Malformed(CLIENT_IP_HEADER))?;
        let https = match header(headers, SCHEME_HEADER)? {
            "https" => true,
            "http" => false,
            _ => return Err(AuthError::Malformed(SCHEME_HEADER)),
        };
        let host = match headers.get(http::header::HOST) {
            Some(h) => h.to_str().map_err(|_| AuthError::Malformed("host"))?,
            None => "",
        };
        let signed = text(ts, from, method, host, path, client_ip, https);
        hmac::verify(&self.key, signed.as_bytes(), &tag).map_err(|_| AuthError::BadSignature)?;
        Ok(Forwarded {
            from: from.to_string(),
            client_ip,
            https,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(signer: &Signer, now: i64) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("a-b.localhost:8080"));
        headers.insert(CLIENT_IP_HEADER, HeaderValue::from_static("10.6.6.6"));
        signer.sign(
            &mut headers,
            now,
            "host-a",
            &Method::GET,
            "/x?y=1",
            "192.0.2.7".parse().unwrap(),
            false,
        );
        headers
    }

    #[test]
    fn a_signed_request_verifies_and_tells_the_client_address() {
        let signer = Signer::new(&"s".repeat(32));
        let headers = signed(&signer, 1000);
        assert_eq!(
            signer.verify(&headers, 1010, &Method::GET, "/x?y=1"),
            Ok(Forwarded {
                from: "host-a".into(),
                client_ip: "192.0.2.7".parse().unwrap(),
                https: false
            })
        );
    }

    #[test]
    fn anything_changed_or_missing_is_refused() {
        let signer = Signer::new(&"s".repeat(32));
        let other = Signer::new(&"t".repeat(32));
        let headers = signed(&signer, 1000);
        let verify =
            |h: &HeaderMap, now, method: &Method, path| signer.verify(h, now, method, path);
        assert_eq!(
            other.verify(&headers, 1000, &Method::GET, "/x?y=1"),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify(&headers, 1000, &Method::POST, "/x?y=1"),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify(&headers, 1000, &Method::GET, "/x?y=2"),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify(&headers, 1000 + 61, &Method::GET, "/x?y=1"),
            Err(AuthError::Stale)
        );
        for (name, value) in [
            (CLIENT_IP_HEADER, "10.0.0.1"),
            (FROM_HEADER, "host-b"),
            (SCHEME_HEADER, "https"),
            ("host", "bank.localhost:8080"),
        ] {
            let mut h = headers.clone();
            h.insert(name, HeaderValue::from_static(value));
            assert_eq!(
                verify(&h, 1000, &Method::GET, "/x?y=1"),
                Err(AuthError::BadSignature),
                "{name}"
            );
        }
        let mut h = headers.clone();
        h.remove(AUTH_HEADER);
        assert_eq!(
            verify(&h, 1000, &Method::GET, "/x?y=1"),
            Err(AuthError::Missing)
        );
        let mut h = headers.clone();
        h.append(FROM_HEADER, HeaderValue::from_static("host-b"));
        assert_eq!(
            verify(&h, 1000, &Method::GET, "/x?y=1"),
            Err(AuthError::Malformed(FROM_HEADER))
        );
        for bad in ["v1:x:00", "v2:1000:00", "v1:1000:zz", "garbage"] {
            let mut h = headers.clone();
            h.insert(AUTH_HEADER, HeaderValue::from_static(bad));
            assert_eq!(
                verify(&h, 1000, &Method::GET, "/x?y=1"),
                Err(AuthError::Malformed(AUTH_HEADER)),
                "{bad}"
            );
        }
    }
}
