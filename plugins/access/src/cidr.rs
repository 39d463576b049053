//! IP networks (`203.0.113.0/24`, `2001:db8::/32`, or a bare address for one host).

use std::net::IpAddr;

/// Prefix length of the IPv4-mapped block `::ffff:0:0/96`.
const MAPPED_PREFIX: u8 = 96;

/// A network: its address with the host bits cleared, and the prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cidr {
    V4(u32, u8),
    V6(u128, u8),
}

/// The address, with IPv4-mapped IPv6 (`::ffff:192.0.2.1`, what a dual-stack listener
/// reports for IPv4 peers) turned into plain IPv4 so IPv4 rules apply to it.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn mask_v4(bits: u32, prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        bits & (u32::MAX << (32 - prefix))
    }
}

fn mask_v6(bits: u128, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        bits & (u128::MAX << (128 - prefix))
    }
}

impl Cidr {
    /// Parses `ADDRESS/PREFIX` or a bare `ADDRESS` (/32 or /128). Host bits under the prefix
    /// are ignored (`192.0.2.7/24` is `192.0.2.0/24`). The error does not repeat the text
    /// (callers quote it, shortened).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let ip: IpAddr = address
            .parse()
            .map_err(|_| "not an IP address".to_string())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            // Digits only: `str::parse` would also take `+8`.
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                match p.parse::<u8>() {
                    Ok(n) if n <= max => n,
                    _ => return Err(format!("the prefix is not between /0 and /{max}")),
                }
            }
            Some(_) => return Err(format!("the prefix is not between /0 and /{max}")),
        };
        Ok(match ip {
            IpAddr::V4(v4) => Cidr::V4(mask_v4(v4.to_bits(), prefix), prefix),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                // A rule written as `::ffff:192.0.2.0/120` means the IPv4 network.
                Some(v4) if prefix >= MAPPED_PREFIX => {
                    let prefix = prefix - MAPPED_PREFIX;
                    Cidr::V4(mask_v4(v4.to_bits(), prefix), prefix)
                }
                _ => Cidr::V6(mask_v6(v6.to_bits(), prefix), prefix),
            },
        })
    }

    pub fn contains(self, ip: IpAddr) -> bool {
        match (self, canonical(ip)) {
            (Cidr::V4(net, prefix), IpAddr::V4(v4)) => mask_v4(v4.to_bits(), prefix) == net,
            (Cidr::V6(net, prefix), IpAddr::V6(v6)) => mask_v6(v6.to_bits(), prefix) == net,
            _ => false,
        }
    }
}

/// Parses a comma-separated list (`10.0.0.0/8, 192.0.2.1`); the error names the bad entry.
pub fn parse_list(text: &str, into: &mut Vec<Cidr>) -> Result<(), String> {
    for entry in text.split(',') {
        let entry = entry.trim();
        let cidr = Cidr::parse(entry).map_err(|why| format!("{}: {why}", quote(entry)))?;
        into.push(cidr);
    }
    Ok(())
}

/// Longest entry echoed back in an error (errors end up in 4 KiB response bodies).
const MAX_QUOTED: usize = 64;

/// `text` in quotes, cut short if long.
pub fn quote(text: &str) -> String {
    if text.len() <= MAX_QUOTED {
        return format!("{text:?}");
    }
    let mut end = MAX_QUOTED;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}…", &text[..end])
}

/// True if `ip` lies in one of `list`.
pub fn any_contains(list: &[Cidr], ip: IpAddr) -> bool {
    list.iter().any(|cidr| cidr.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn parses_networks_and_bare_addresses() {
        assert_eq!(Cidr::parse("192.0.2.0/24"), Ok(Cidr::V4(0xc000_0200, 24)));
        assert_eq!(Cidr::parse("192.0.2.77/24"), Ok(Cidr::V4(0xc000_0200, 24)));
        assert_eq!(Cidr::parse("192.0.2.7"), Ok(Cidr::V4(0xc000_0207, 32)));
        assert_eq!(Cidr::parse("0.0.0.0/0"), Ok(Cidr::V4(0, 0)));
        assert_eq!(Cidr::parse("::/0"), Ok(Cidr::V6(0, 0)));
        assert_eq!(
            Cidr::parse("2001:db8::1"),
            Ok(Cidr::V6(ip6("2001:db8::1"), 128))
        );
        assert_eq!(
            Cidr::parse("::ffff:192.0.2.0/120"),
            Ok(Cidr::V4(0xc000_0200, 24))
        );
    }

    fn ip6(text: &str) -> u128 {
        text.parse::<Ipv6Addr>().unwrap().to_bits()
    }

    #[test]
    fn rejects_malformed_entries() {
        for bad in [
            "",
            "/24",
            "192.0.2.0/",
            "192.0.2.0/33",
            "2001:db8::/129",
            "192.0.2.0/+8",
            "192.0.2.0/-1",
            "192.0.2.0/0024",
            "192.0.2",
            "example.com",
            "192.0.2.0/24/8",
            "fe80::1%eth0",
            " 192.0.2.1",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn matches_by_prefix_and_family() {
        let net = Cidr::parse("203.0.113.0/24").unwrap();
        assert!(net.contains(ip("203.0.113.255")));
        assert!(!net.contains(ip("203.0.114.0")));
        assert!(
            net.contains(ip("::ffff:203.0.113.9")),
            "mapped IPv4 is IPv4"
        );
        assert!(!net.contains(ip("2001:db8::1")));
        let all4 = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all4.contains(ip("1.2.3.4")));
        assert!(!all4.contains(ip("::1")));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(Cidr::parse("::1").unwrap().contains(ip("::1")));
    }

    #[test]
    fn lists_name_the_bad_entry() {
        let mut list = Vec::new();
        parse_list("10.0.0.0/8, 192.0.2.1", &mut list).unwrap();
        assert_eq!(list.len(), 2);
        assert!(any_contains(&list, ip("10.9.9.9")));
        let err = parse_list("10.0.0.0/8,10.0.0.0/99", &mut list).unwrap_err();
        assert!(err.starts_with("\"10.0.0.0/99\""), "{err}");
        let err = parse_list("10.0.0.0/8,", &mut list).unwrap_err();
        assert!(err.starts_with("\"\""), "{err}");
        let long = "x".repeat(500);
        assert!(parse_list(&long, &mut list).unwrap_err().len() < 200);
    }
}
