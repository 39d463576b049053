//! Scan targets outside p0rt's own tunnels: resolved once, checked against special ranges
//! and the operator's allowlist, and pinned for the whole scan.
//!
//! The order of the checks matters: a target that is not on the operator's allowlist is
//! refused before anything is resolved, so an arbitrary name never makes p0rt send a DNS
//! query. An allowlisted *name* is resolved exactly once, and every address it resolves to
//! must be public unicast or explicitly allowlisted by IP/CIDR; the scan then connects only
//! to the one address returned here, so a later DNS answer (rebinding) cannot redirect it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::IpNet;

/// How long the single DNS resolution of a scan target may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest host name accepted (the DNS limit, without the trailing dot).
pub const MAX_HOST_NAME_LEN: usize = 253;

/// Longest single label of a host name (the DNS limit).
const MAX_LABEL_LEN: usize = 63;

/// Why a scan target was refused.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(
        "{target} resolves to {ip}, a {range} address; scans never contact those unless the operator allowlists them (scan.allowed_targets)"
    )]
    Forbidden {
        target: String,
        ip: IpAddr,
        range: &'static str,
    },
    #[error(
        "{target} is not in the operator's scan allowlist (scan.allowed_targets); nothing was contacted"
    )]
    NotAllowlisted { target: String },
    #[error("{target} does not resolve: {detail}")]
    Unresolvable { target: String, detail: String },
    #[error("{0:?} is not a host name or IP address")]
    Malformed(String),
}

/// Shortest IPv4 prefix an allowlist entry may have: `0.0.0.0/0` would quietly open every
/// special range (cloud metadata included) to port checks.
pub const MIN_IPV4_PREFIX: u8 = 8;
/// Shortest IPv6 prefix an allowlist entry may have.
pub const MIN_IPV6_PREFIX: u8 = 32;

/// The operator's allowlist of raw scan targets: IPs, CIDRs (ipnet::IpNet) and exact host names.
#[derive(Clone, Debug, Default)]
pub struct TargetAllowlist {
    /// Allowlisted networks; a single IP is stored as a /32 or /128.
    nets: Vec<IpNet>,
    /// Allowlisted host names, lowercased, without a trailing dot.
    names: Vec<String>,
}

impl TargetAllowlist {
    /// Parses entries such as "127.0.0.1", "192.0.2.0/24", "::1", "scanme.example.org". Err names the bad entry.
    pub fn parse(entries: &[String]) -> Result<TargetAllowlist, String> {
        let mut list = TargetAllowlist::default();
        for entry in entries {
            let trimmed = entry.trim();
            if let Some(ip) = parse_ip_literal(trimmed) {
                list.nets.push(IpNet::from(ip));
            } else if let Ok(net) = trimmed.parse::<IpNet>() {
                let shortest = match net {
                    IpNet::V4(_) => MIN_IPV4_PREFIX,
                    IpNet::V6(_) => MIN_IPV6_PREFIX,
                };
                if net.prefix_len() < shortest {
                    return Err(format!(
                        "scan.allowed_targets entry {entry:?} covers too much (shorter than \
                         /{shortest}); list the networks you mean"
                    ));
                }
                // "192.0.2.7/24" means the network; drop the host bits so it reads as meant.
                list.nets.push(net.trunc());
            } else if let Some(name) = normalize_host_name(trimmed) {
                if !list.names.contains(&name) {
                    list.names.push(name);
                }
            } else {
                return Err(format!(
                    "scan.allowed_targets entry {entry:?} is not an IP address, CIDR or host name"
                ));
            }
        }
        Ok(list)
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty() && self.names.is_empty()
    }

    /// Whether `ip` lies in an allowlisted IP or CIDR.
    fn allows_ip(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// Whether the (normalized) host name is allowlisted by exact name.
    fn allows_name(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }
}

/// A syntactically valid scan target.
enum Target {
    Ip(IpAddr),
    /// Lowercased, trailing dot removed.
    Name(String),
}

/// An IP literal, also an IPv6 one in brackets ("[::1]").
fn parse_ip_literal(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// A DNS host name (letters, digits, hyphens; labels of 1..=63; at most 253 characters),
/// lowercased and without a trailing dot; None when it is not one. A name whose last label
/// is all digits is refused: it would be a mistyped IP address ("300.1.1.1"), not a name.
fn normalize_host_name(s: &str) -> Option<String> {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() || s.len() > MAX_HOST_NAME_LEN {
        return None;
    }
    let labels_ok = s.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= MAX_LABEL_LEN
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    });
    let last_numeric = s
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    (labels_ok && !last_numeric).then(|| s.to_ascii_lowercase())
}

fn parse_target(target: &str) -> Result<Target, TargetError> {
    if let Some(ip) = parse_ip_literal(target) {
        return Ok(Target::Ip(ip));
    }
    normalize_host_name(target)
        .map(Target::Name)
        .ok_or_else(|| TargetError::Malformed(target.to_string()))
}

/// Whether `ip` is in `net` (prefix length `len`), for IPv4.
fn v4_in(ip: Ipv4Addr, net: [u8; 4], len: u32) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

/// Whether `ip` is in `net` (prefix length `len`), for IPv6.
fn v6_in(ip: Ipv6Addr, net: Ipv6Addr, len: u32) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    (u128::from(ip) & mask) == (u128::from(net) & mask)
}

/// Special-purpose IPv4 ranges (IANA registry plus cloud metadata), most specific first.
const V4_SPECIAL: &[([u8; 4], u32, &str)] = &[
    ([169, 254, 169, 254], 32, "cloud metadata"),
    // Azure's platform endpoint (metadata/DHCP/DNS), reachable only from inside Azure.
    ([168, 63, 129, 16], 32, "cloud metadata"),
    ([0, 0, 0, 0], 32, "unspecified"),
    ([255, 255, 255, 255], 32, "broadcast"),
    ([0, 0, 0, 0], 8, "reserved"),
    ([10, 0, 0, 0], 8, "private"),
    ([100, 64, 0, 0], 10, "carrier-grade NAT"),
    ([127, 0, 0, 0], 8, "loopback"),
    ([169, 254, 0, 0], 16, "link-local"),
    ([172, 16, 0, 0], 12, "private"),
    ([192, 0, 0, 0], 24, "reserved"),
    ([192, 0, 2, 0], 24, "documentation"),
    ([192, 88, 99, 0], 24, "reserved"),
    ([192, 168, 0, 0], 16, "private"),
    ([198, 18, 0, 0], 15, "benchmarking"),
    ([198, 51, 100, 0], 24, "documentation"),
    ([203, 0, 113, 0], 24, "documentation"),
    ([224, 0, 0, 0], 4, "multicast"),
    ([240, 0, 0, 0], 4, "reserved"),
];

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    V4_SPECIAL
        .iter()
        .find(|(net, len, _)| v4_in(ip, *net, *len))
        .map(|(_, _, label)| *label)
}

/// The IPv4 address in the low 32 bits of `ip`.
fn low_v4(ip: Ipv6Addr) -> Ipv4Addr {
    Ipv4Addr::from(u128::from(ip) as u32)
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    const fn v6(segments: [u16; 8]) -> Ipv6Addr {
        Ipv6Addr::new(
            segments[0],
            segments[1],
            segments[2],
            segments[3],
            segments[4],
            segments[5],
            segments[6],
            segments[7],
        )
    }
    if ip == Ipv6Addr::UNSPECIFIED {
        return Some("unspecified");
    }
    if ip == Ipv6Addr::LOCALHOST {
        return Some("loopback");
    }
    // AWS's IPv6 instance metadata endpoint.
    if ip == v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254]) {
        return Some("cloud metadata");
    }
    // Addresses that carry an IPv4 address are as dangerous as that address: a dual-stack
    // socket (mapped) or a NAT64 / 6to4 gateway delivers them to it.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return special_v4(v4);
    }
    if v6_in(ip, v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0]), 96) {
        return special_v4(low_v4(ip));
    }
    if v6_in(ip, v6([0x2002, 0, 0, 0, 0, 0, 0, 0]), 16) {
        let embedded = (u128::from(ip) >> 80) as u32;
        return special_v4(Ipv4Addr::from(embedded));
    }
    if v6_in(ip, Ipv6Addr::UNSPECIFIED, 96) {
        // IPv4-compatible (deprecated): judged by the embedded address; never public itself.
        return Some(special_v4(low_v4(ip)).unwrap_or("reserved"));
    }
    const V6_SPECIAL: &[([u16; 8], u32, &str)] = &[
        ([0x2001, 0x2, 0, 0, 0, 0, 0, 0], 48, "benchmarking"),
        ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, "documentation"),
        ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, "documentation"),
        // IETF protocol assignments (Teredo, ORCHID, ...): not plain public unicast.
        ([0x2001, 0, 0, 0, 0, 0, 0, 0], 23, "reserved"),
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "unique local"),
        ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local"),
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast"),
    ];
    if let Some((_, _, label)) = V6_SPECIAL
        .iter()
        .find(|(net, len, _)| v6_in(ip, v6(*net), *len))
    {
        return Some(label);
    }
    // Only 2000::/3 is allocated as global unicast; everything else (discard-only 100::/64,
    // NAT64 local-use, deprecated site-local, ...) is not a public address.
    if !v6_in(ip, v6([0x2000, 0, 0, 0, 0, 0, 0, 0]), 3) {
        return Some("reserved");
    }
    None
}

/// Names a special-purpose range `ip` falls in ("loopback", "private", "link-local", "cloud metadata",
/// "multicast", "unspecified", "broadcast", "carrier-grade NAT", "documentation", "benchmarking",
/// "reserved", "unique local"), or None for a public unicast address. IPv4-mapped and
/// IPv4-compatible IPv6, NAT64 (64:ff9b::/96) and 6to4 (2002::/16) addresses get the label of
/// their embedded IPv4 address.
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

/// Resolves `target` once (an IP literal is used as is; a name through tokio::net::lookup_host with a
/// RESOLVE_TIMEOUT), and returns the single address the whole scan will use (pinned).
///
/// The target must be allowlisted: an IP literal by an allowlisted IP/CIDR, a name by exact
/// (case-insensitive) name — and then every address the name resolves to must be public
/// unicast or inside an allowlisted IP/CIDR, else Forbidden (an allowlisted name pointing at
/// an internal address is the DNS-rebinding case). Nothing is resolved for a target that is
/// not allowlisted. The first resolved address is the pinned one.
pub async fn resolve_pinned(
    target: &str,
    allowlist: &TargetAllowlist,
) -> Result<IpAddr, TargetError> {
    let parsed = parse_target(target)?;
    let not_allowlisted = || TargetError::NotAllowlisted {
        target: target.to_string(),
    };
    let name = match parsed {
        Target::Ip(ip) if allowlist.allows_ip(ip) => return Ok(ip),
        Target::Ip(_) => return Err(not_allowlisted()),
        Target::Name(name) if allowlist.allows_name(&name) => name,
        Target::Name(_) => return Err(not_allowlisted()),
    };
    let unresolvable = |detail: String| TargetError::Unresolvable {
        target: target.to_string(),
        detail,
    };
    let addrs: Vec<IpAddr> =
        match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name.as_str(), 0)))
            .await
        {
            Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
            Ok(Err(e)) => return Err(unresolvable(e.to_string())),
            Err(_) => {
                return Err(unresolvable(format!(
                    "no answer within {} s",
                    RESOLVE_TIMEOUT.as_secs()
                )));
            }
        };
    // Every address is judged, not only the pinned one: a name that also points inside is
    // refused as a whole.
    for &ip in &addrs {
        if let Some(range) = special_range(ip)
            && !allowlist.allows_ip(ip)
        {
            return Err(TargetError::Forbidden {
                target: target.to_string(),
                ip,
                range,
            });
        }
    }
    addrs
        .first()
        .copied()
        .ok_or_else(|| unresolvable("no addresses".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn allowlist(entries: &[&str]) -> TargetAllowlist {
        let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
        TargetAllowlist::parse(&entries).unwrap()
    }

    #[test]
    fn special_ranges_are_labelled() {
        let cases = [
            ("169.254.169.254", "cloud metadata"),
            ("fd00:ec2::254", "cloud metadata"),
            ("169.254.1.1", "link-local"),
            ("10.0.0.1", "private"),
            ("172.16.5.4", "private"),
            ("192.168.1.1", "private"),
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("64:ff9b::7f00:1", "loopback"),
            ("2002:a00:1::", "private"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("192.0.2.1", "documentation"),
            ("2001:db8::1", "documentation"),
            ("198.18.0.1", "benchmarking"),
            ("240.0.0.1", "reserved"),
            ("fe80::1", "link-local"),
            ("fd12:3456::1", "unique local"),
            ("100::1", "reserved"),
        ];
        for (addr, label) in cases {
            assert_eq!(special_range(ip(addr)), Some(label), "{addr}");
        }
    }

    #[test]
    fn public_addresses_are_not_special() {
        for addr in ["1.1.1.1", "8.8.8.8", "2606:4700::1111", "::ffff:1.1.1.1"] {
            assert_eq!(special_range(ip(addr)), None, "{addr}");
        }
    }

    #[tokio::test]
    async fn ip_literals_need_an_allowlisted_cidr() {
        let list = allowlist(&["127.0.0.0/8"]);
        assert_eq!(
            resolve_pinned("127.0.0.1", &list).await.unwrap(),
            ip("127.0.0.1")
        );
        assert!(matches!(
            resolve_pinned("10.0.0.1", &list).await,
            Err(TargetError::NotAllowlisted { .. })
        ));
        // A public address is still only scanned when allowlisted.
        assert!(matches!(
            resolve_pinned("1.1.1.1", &list).await,
            Err(TargetError::NotAllowlisted { .. })
        ));
        let v6 = allowlist(&["[::1]"]);
        assert_eq!(resolve_pinned("[::1]", &v6).await.unwrap(), ip("::1"));
    }

    #[tokio::test]
    async fn allowlisted_name_resolving_inside_is_forbidden() {
        let list = allowlist(&["LocalHost"]);
        match resolve_pinned("localhost", &list).await {
            Err(TargetError::Forbidden { range, .. }) => assert_eq!(range, "loopback"),
            other => panic!("expected Forbidden, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn allowlisted_name_and_cidr_resolve_and_pin() {
        let list = allowlist(&["localhost", "127.0.0.0/8", "::1"]);
        let pinned = resolve_pinned("localhost.", &list).await.unwrap();
        assert!(pinned.is_loopback(), "{pinned}");
    }

    #[tokio::test]
    async fn names_not_allowlisted_are_refused_without_resolving() {
        // .invalid never resolves: NotAllowlisted (not Unresolvable) shows no lookup happened.
        let list = allowlist(&["127.0.0.1"]);
        assert!(matches!(
            resolve_pinned("nothing.invalid", &list).await,
            Err(TargetError::NotAllowlisted { .. })
        ));
    }

    #[tokio::test]
    async fn empty_allowlist_refuses_everything() {
        let list = TargetAllowlist::default();
        assert!(list.is_empty());
        for target in ["127.0.0.1", "1.1.1.1", "localhost", "example.org"] {
            assert!(
                matches!(
                    resolve_pinned(target, &list).await,
                    Err(TargetError::NotAllowlisted { .. })
                ),
                "{target}"
            );
        }
    }

    #[test]
    fn malformed_allowlist_entries_are_rejected() {
        for bad in [
            "",
            "10.0.0.0/33",
            "0.0.0.0/0",
            "::/0",
            "10.0.0.0/7",
            "a b",
            "http://x",
            "300.1.1.1",
            "-x.org",
            "x_y.org",
        ] {
            let err = TargetAllowlist::parse(&[bad.to_string()]).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
        let ok = allowlist(&["127.0.0.1", "192.0.2.0/24", "::1", "scanme.example.org"]);
        assert!(!ok.is_empty());
    }

    #[tokio::test]
    async fn malformed_targets_are_rejected() {
        let list = allowlist(&["127.0.0.0/8", "localhost"]);
        let long = format!("{}.org", "a.".repeat(130));
        for bad in [
            "",
            "a b",
            "http://x",
            "x:80",
            long.as_str(),
            "a..b",
            "300.1.1.1",
        ] {
            assert!(
                matches!(
                    resolve_pinned(bad, &list).await,
                    Err(TargetError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
    }
}
