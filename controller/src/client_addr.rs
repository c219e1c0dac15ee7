//! The address a request really comes from, for the per-address limits and the logs.
//! Behind a reverse proxy (the module's nginx) every connection comes from the proxy,
//! and per-address limits would become one bucket that one client can fill; so for a
//! connection from a trusted proxy (`--trusted-proxy`), the client is the rightmost
//! address of `X-Forwarded-For` that is not itself a trusted proxy. Nothing else is
//! believed: a client that sends its own `X-Forwarded-For` only adds addresses to the
//! left of the one its proxy appends.

use std::net::IpAddr;
use std::str::FromStr;

use axum::http::HeaderMap;

/// An address block, `10.0.0.0/8`, `::1` (a single address without a length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|e| format!("{s:?}: not an address ({e})"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l.trim().parse::<u8>().ok().filter(|l| *l <= max).ok_or(format!("{s:?}: bad prefix length"))?,
            None => max,
        };
        Ok(Cidr { addr, len })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> (u128, u8) {
            match ip {
                // IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are their IPv4 address.
                IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    Some(v4) => (u128::from(u32::from(v4)), 32),
                    None => (u128::from(v6), 128),
                },
                IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
            }
        };
        let ((net, width), (ip, ip_width)) = (bits(self.addr), bits(ip));
        if width != ip_width {
            return false;
        }
        let shift = u32::from(width - self.len.min(width));
        if shift >= 128 {
            return true;
        }
        (net >> shift) == (ip >> shift)
    }
}

/// The client behind `peer` (the connection's address).
pub fn client(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    // All X-Forwarded-For headers, in order, as one list; read from the right.
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) if is_trusted(ip) => continue,
            Ok(ip) => return ip,
            // Something a proxy would not write: nothing to its left can be believed.
            Err(_) => return peer,
        }
    }
    peer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().expect("header"));
        }
        h
    }

    #[test]
    fn only_a_trusted_proxy_names_the_client_and_a_forged_header_names_nobody() {
        let trusted: Vec<Cidr> = ["127.0.0.1", "10.0.0.0/8", "::1"].iter().map(|c| c.parse().expect("cidr")).collect();
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        // A direct client: its own header is ignored.
        assert_eq!(client(ip("192.0.2.7"), &headers(&["203.0.113.9"]), &trusted), ip("192.0.2.7"));
        // Through the proxy: the address the proxy appended.
        assert_eq!(client(ip("127.0.0.1"), &headers(&["192.0.2.7"]), &trusted), ip("192.0.2.7"));
        // A client that forged a header: what it wrote stays on the left.
        assert_eq!(client(ip("127.0.0.1"), &headers(&["203.0.113.9, 192.0.2.7"]), &trusted), ip("192.0.2.7"));
        // Two trusted proxies in a row, and the header split over two lines.
        assert_eq!(client(ip("::1"), &headers(&["192.0.2.7", "10.1.2.3"]), &trusted), ip("192.0.2.7"));
        // No header, or junk: the proxy itself.
        assert_eq!(client(ip("127.0.0.1"), &headers(&[]), &trusted), ip("127.0.0.1"));
        assert_eq!(client(ip("127.0.0.1"), &headers(&["192.0.2.7, unknown"]), &trusted), ip("127.0.0.1"));
        // Blocks and IPv4-mapped addresses.
        let net: Cidr = "10.0.0.0/8".parse().expect("cidr");
        assert!(net.contains(ip("10.255.0.1")) && !net.contains(ip("11.0.0.1")));
        assert!(net.contains(ip("::ffff:10.1.1.1")));
        assert!("0.0.0.0/0".parse::<Cidr>().expect("all").contains(ip("198.51.100.1")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err() && "nonsense".parse::<Cidr>().is_err());
    }
}
