//! Phase 1, route: which part of the host a request is for, from its single `Host` header.

use http::header::{self, HeaderMap};
use http::{Method, Uri};

use super::error::EdgeError;

/// What a request's `Host` points at.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    /// The base domain itself: health and stats endpoints.
    Base,
    /// `<label>.<domain>`: a tunnel name, if one is stored or live.
    Tunnel(String),
    /// Some other host, or a deeper subdomain: nobody here.
    Unknown,
}

/// Reads the single `Host` header, checks it against an absolute-form target, and resolves
/// it against the base domain. `X-Forwarded-Host` is never consulted. `CONNECT` is refused:
/// the edge serves origin requests, it does not open tunnels to other hosts.
pub fn route(
    method: &Method,
    headers: &HeaderMap,
    uri: &Uri,
    domain: &str,
) -> Result<Target, EdgeError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(h), None) => h,
        (None, _) => return Err(EdgeError::HostMissing),
        (Some(_), Some(_)) => return Err(EdgeError::HostDuplicated),
    };
    let host = host
        .to_str()
        .ok()
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .filter(|a| !a.as_str().contains('@') && has_valid_port(a))
        .ok_or(EdgeError::HostMalformed)?;
    if let Some(target) = uri.authority()
        && !target.host().eq_ignore_ascii_case(host.host())
    {
        return Err(EdgeError::TargetDisagrees);
    }
    // One trailing dot is the fully qualified form of the same name; an empty label
    // anywhere else (`a..b`, `.a`, `a..`) is no name at all.
    let hostname = host.host().to_ascii_lowercase();
    let hostname = hostname.strip_suffix('.').unwrap_or(&hostname);
    if hostname.split('.').any(str::is_empty) {
        return Err(EdgeError::HostMalformed);
    }
    if method == Method::CONNECT {
        return Err(EdgeError::Connect);
    }
    if hostname == domain {
        return Ok(Target::Base);
    }
    match hostname
        .strip_suffix(domain)
        .and_then(|rest| rest.strip_suffix('.'))
    {
        Some(label) if !label.contains('.') => Ok(Target::Tunnel(label.to_string())),
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn get(hosts: &[&str]) -> Result<Target, EdgeError> {
        with(&Method::GET, hosts, "/x")
    }

    fn with(method: &Method, hosts: &[&str], uri: &str) -> Result<Target, EdgeError> {
        let mut map = HeaderMap::new();
        for h in hosts {
            map.append(header::HOST, HeaderValue::from_str(h).unwrap());
        }
        route(method, &map, &uri.parse().unwrap(), "localhost")
    }

    #[test]
    fn routes_by_host() {
        let tunnel = |name: &str| Target::Tunnel(name.into());
        assert_eq!(get(&["a-b-c.localhost:8080"]).unwrap(), tunnel("a-b-c"));
        assert_eq!(get(&["A-B-C.LOCALHOST."]).unwrap(), tunnel("a-b-c"));
        assert_eq!(get(&["localhost"]).unwrap(), Target::Base);
        assert_eq!(get(&["localhost.:80"]).unwrap(), Target::Base);
        assert_eq!(get(&["x.y.localhost"]).unwrap(), Target::Unknown);
        assert_eq!(get(&["evil.com"]).unwrap(), Target::Unknown);
        assert_eq!(get(&["xlocalhost"]).unwrap(), Target::Unknown);
        assert_eq!(get(&["127.0.0.1:8080"]).unwrap(), Target::Unknown);
        assert_eq!(get(&["[::1]:8080"]).unwrap(), Target::Unknown);
        assert!(get(&["a.localhost:"]).is_ok());
    }

    #[test]
    fn refuses_bad_hosts_with_the_matching_error() {
        use EdgeError::*;
        let cases: [(&[&str], EdgeError); 12] = [
            (&[], HostMissing),
            (&["a.localhost", "b.localhost"], HostDuplicated),
            (&["a b"], HostMalformed),
            (&["user@a.localhost"], HostMalformed),
            (&["a.localhost:http"], HostMalformed),
            (&["a.localhost:-1"], HostMalformed),
            (&["a.localhost:99999"], HostMalformed),
            // Empty labels (issue #9, defect 11: `name.localhost..` used to route).
            (&["a.localhost.."], HostMalformed),
            (&["a.localhost..:8080"], HostMalformed),
            (&["a..localhost"], HostMalformed),
            (&[".a.localhost"], HostMalformed),
            (&["."], HostMalformed),
        ];
        for (hosts, want) in cases {
            let got = get(hosts).expect_err(&format!("{hosts:?} routed"));
            assert_eq!(got.to_string(), want.to_string(), "{hosts:?}");
        }
        let other = with(&Method::GET, &["a.localhost"], "http://other.localhost/x");
        assert!(matches!(other, Err(TargetDisagrees)), "{other:?}");
    }

    #[test]
    fn refuses_connect() {
        let connect = with(&Method::CONNECT, &["a.localhost:80"], "a.localhost:80");
        assert!(matches!(connect, Err(EdgeError::Connect)), "{connect:?}");
        // A malformed Host is still reported as such.
        let bad = with(&Method::CONNECT, &["a.localhost.."], "a.localhost..:80");
        assert!(matches!(bad, Err(EdgeError::HostMalformed)), "{bad:?}");
    }
}
