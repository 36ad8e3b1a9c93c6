//! [`TargetAddr`]: the destination a local client asked for — an IP socket address or a domain
//! name plus port — with validated constructors, `host:port` parsing and display.
//!
//! Domains are validated on construction (1..=253 bytes of ASCII letters, digits, `-`, `_`, `.`),
//! so a `TargetAddr::Domain` built through this module can always be encoded in SOCKS5 (≤ 255 bytes)
//! and handed to the resolver. A "domain" that is really an IP literal becomes `TargetAddr::Ip`,
//! so IP literals never reach DNS.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Longest domain name accepted (RFC 1035 presentation form without the trailing dot).
pub const MAX_DOMAIN_LEN: usize = 253;

/// Where a proxied connection (or UDP datagram) should go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetAddr {
    /// A literal IP address and port.
    Ip(SocketAddr),
    /// A domain name (validated, no trailing dot, original case) and port; resolved on the server.
    Domain(String, u16),
}

/// Why a host or `host:port` string was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetParseError {
    /// The host part is empty.
    EmptyHost,
    /// The host is longer than [`MAX_DOMAIN_LEN`].
    HostTooLong,
    /// The host contains a character that is not allowed in a domain name.
    BadHost,
    /// `[` without a matching `]`, or the bracketed text is not an IPv6 address.
    BadIpv6Literal,
    /// The port is missing and no default was given.
    MissingPort,
    /// The port is not a decimal number in 1..=65535.
    BadPort,
}

impl fmt::Display for TargetParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Self::EmptyHost => "empty host",
            Self::HostTooLong => "host name too long",
            Self::BadHost => "invalid character in host name",
            Self::BadIpv6Literal => "invalid bracketed IPv6 literal",
            Self::MissingPort => "missing port",
            Self::BadPort => "invalid port",
        };
        f.write_str(text)
    }
}

impl std::error::Error for TargetParseError {}

impl TargetAddr {
    /// Builds a target from a host (domain, IPv4 literal, bare or bracketed IPv6 literal) and a port.
    ///
    /// A trailing dot on a domain is removed. Port 0 is accepted here (SOCKS5 UDP ASSOCIATE uses it);
    /// the destination guard refuses it for outbound connections.
    pub fn from_host_port(host: &str, port: u16) -> Result<Self, TargetParseError> {
        if host.is_empty() {
            return Err(TargetParseError::EmptyHost);
        }
        if let Some(inner) = host.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or(TargetParseError::BadIpv6Literal)?;
            let ip = parse_ipv6_literal(inner).ok_or(TargetParseError::BadIpv6Literal)?;
            return Ok(Self::Ip(SocketAddr::new(IpAddr::V6(ip), port)));
        }
        if let Ok(ip) = IpAddr::from_str(host) {
            return Ok(Self::Ip(SocketAddr::new(ip, port)));
        }
        let domain = host.strip_suffix('.').unwrap_or(host);
        validate_domain(domain)?;
        Ok(Self::Domain(domain.to_owned(), port))
    }

    /// Builds a target from raw bytes of a domain (as carried by SOCKS5), see [`Self::from_host_port`].
    pub fn from_domain_bytes(host: &[u8], port: u16) -> Result<Self, TargetParseError> {
        let host = std::str::from_utf8(host).map_err(|_| TargetParseError::BadHost)?;
        Self::from_host_port(host, port)
    }

    /// Parses `host:port`, `[v6]:port`, or (when `default_port` is given) a bare host / `[v6]`.
    /// A bare IPv6 literal without brackets is accepted only without a port (`::1`).
    pub fn parse_authority(
        text: &str,
        default_port: Option<u16>,
    ) -> Result<Self, TargetParseError> {
        if text.is_empty() {
            return Err(TargetParseError::EmptyHost);
        }
        let (host, port_text) = if text.starts_with('[') {
            let close = text.find(']').ok_or(TargetParseError::BadIpv6Literal)?;
            let (host, rest) = text.split_at(close + 1);
            match rest.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None if rest.is_empty() => (host, None),
                None => return Err(TargetParseError::BadIpv6Literal),
            }
        } else {
            match text.rfind(':') {
                // More than one colon and no brackets: a bare IPv6 literal, no port.
                Some(_) if text.matches(':').count() > 1 => (text, None),
                Some(i) => (&text[..i], Some(&text[i + 1..])),
                None => (text, None),
            }
        };
        let port = match port_text {
            Some(p) => parse_port(p)?,
            None => default_port.ok_or(TargetParseError::MissingPort)?,
        };
        Self::from_host_port(host, port)
    }

    /// The destination port.
    pub fn port(&self) -> u16 {
        match self {
            Self::Ip(addr) => addr.port(),
            Self::Domain(_, port) => *port,
        }
    }

    /// The socket address when the target is an IP literal (no DNS needed).
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            Self::Ip(addr) => Some(*addr),
            Self::Domain(..) => None,
        }
    }

    /// The host part formatted for an HTTP `Host` header / URI authority (IPv6 in brackets).
    pub fn host_string(&self) -> String {
        match self {
            Self::Ip(SocketAddr::V4(a)) => a.ip().to_string(),
            Self::Ip(SocketAddr::V6(a)) => format!("[{}]", a.ip()),
            Self::Domain(name, _) => name.clone(),
        }
    }
}

impl fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(addr) => write!(f, "{addr}"),
            Self::Domain(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

impl FromStr for TargetAddr {
    type Err = TargetParseError;

    /// Parses `host:port` (port required).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_authority(s, None)
    }
}

impl From<SocketAddr> for TargetAddr {
    fn from(addr: SocketAddr) -> Self {
        Self::Ip(addr)
    }
}

/// Parses a decimal port in 0..=65535 (no sign, no spaces, at most 5 digits).
pub fn parse_port(text: &str) -> Result<u16, TargetParseError> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TargetParseError::BadPort);
    }
    text.parse::<u16>().map_err(|_| TargetParseError::BadPort)
}

/// IPv6 literal, optionally with a zone id (`fe80::1%eth0`), whose zone is ignored.
fn parse_ipv6_literal(text: &str) -> Option<Ipv6Addr> {
    let addr = text.split_once('%').map_or(text, |(a, _zone)| a);
    Ipv6Addr::from_str(addr).ok()
}

fn validate_domain(domain: &str) -> Result<(), TargetParseError> {
    if domain.is_empty() {
        return Err(TargetParseError::EmptyHost);
    }
    if domain.len() > MAX_DOMAIN_LEN {
        return Err(TargetParseError::HostTooLong);
    }
    let ok_chars = domain
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok_chars || domain.starts_with('.') || domain.contains("..") {
        return Err(TargetParseError::BadHost);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_domain_and_bracketed_ipv6() {
        assert_eq!(
            "1.2.3.4:80".parse::<TargetAddr>(),
            Ok(TargetAddr::Ip("1.2.3.4:80".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:443".parse::<TargetAddr>(),
            Ok(TargetAddr::Ip("[::1]:443".parse().unwrap()))
        );
        assert_eq!(
            "Example.COM:8080".parse::<TargetAddr>(),
            Ok(TargetAddr::Domain("Example.COM".into(), 8080))
        );
        assert_eq!(
            TargetAddr::parse_authority("example.com.", Some(80)),
            Ok(TargetAddr::Domain("example.com".into(), 80))
        );
        assert_eq!(
            TargetAddr::parse_authority("[fe80::1%eth0]", Some(80)),
            Ok(TargetAddr::Ip("[fe80::1]:80".parse().unwrap()))
        );
        assert_eq!(
            TargetAddr::parse_authority("::1", Some(80)),
            Ok(TargetAddr::Ip("[::1]:80".parse().unwrap()))
        );
    }

    #[test]
    fn domain_that_is_an_ip_literal_becomes_ip() {
        assert_eq!(
            TargetAddr::from_domain_bytes(b"10.0.0.1", 22),
            Ok(TargetAddr::Ip("10.0.0.1:22".parse().unwrap()))
        );
    }

    #[test]
    fn rejects_bad_inputs() {
        use TargetParseError::*;
        assert_eq!("example.com".parse::<TargetAddr>(), Err(MissingPort));
        assert_eq!("example.com:".parse::<TargetAddr>(), Err(BadPort));
        assert_eq!("example.com:65536".parse::<TargetAddr>(), Err(BadPort));
        assert_eq!("example.com:+80".parse::<TargetAddr>(), Err(BadPort));
        assert_eq!(":80".parse::<TargetAddr>(), Err(EmptyHost));
        assert_eq!("".parse::<TargetAddr>(), Err(EmptyHost));
        assert_eq!("[::1:80".parse::<TargetAddr>(), Err(BadIpv6Literal));
        assert_eq!("[::1]x:80".parse::<TargetAddr>(), Err(BadIpv6Literal));
        assert_eq!("[nothex]:80".parse::<TargetAddr>(), Err(BadIpv6Literal));
        assert_eq!("exa mple.com:80".parse::<TargetAddr>(), Err(BadHost));
        assert_eq!("a..b:80".parse::<TargetAddr>(), Err(BadHost));
        assert_eq!("a/b:80".parse::<TargetAddr>(), Err(BadHost));
        assert_eq!(
            TargetAddr::from_domain_bytes(&[0xff, 0x41], 80),
            Err(BadHost)
        );
        let long = "a".repeat(MAX_DOMAIN_LEN + 1);
        assert_eq!(TargetAddr::from_host_port(&long, 80), Err(HostTooLong));
        assert!(TargetAddr::from_host_port(&"a".repeat(MAX_DOMAIN_LEN), 80).is_ok());
    }

    #[test]
    fn display_round_trips() {
        for text in ["1.2.3.4:80", "[2001:db8::1]:443", "example.com:1"] {
            let target: TargetAddr = text.parse().unwrap();
            assert_eq!(target.to_string(), text);
            assert_eq!(target.to_string().parse::<TargetAddr>(), Ok(target));
        }
        let v6: TargetAddr = "[::1]:1".parse().unwrap();
        assert_eq!(v6.host_string(), "[::1]");
        assert_eq!(v6.port(), 1);
        assert!(v6.ip().is_some());
    }
}
