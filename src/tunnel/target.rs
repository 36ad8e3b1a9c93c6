//! The text front of [`Destination`]: turns what a local client typed or sent (`host:port`,
//! `[v6]:port`, a host plus a port, SOCKS5 domain bytes) into a validated `Destination`, with a
//! typed error saying what was wrong.
//!
//! Domains follow the one rule of [`Destination::domain`] (1..=253 bytes, see
//! [`Destination::MAX_DOMAIN_LEN`]) after a trailing dot is removed. A "domain" that is really an
//! IP literal becomes [`Destination::Addr`], so IP literals never reach DNS.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use crate::proto::transport::Destination;

/// Why a host or `host:port` string was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetParseError {
    /// The host part is empty.
    EmptyHost,
    /// The host is longer than [`Destination::MAX_DOMAIN_LEN`].
    HostTooLong,
    /// The host is not a valid domain name (see [`Destination::domain`]).
    BadHost,
    /// `[` without a matching `]`, or the bracketed text is not an IPv6 address.
    BadIpv6Literal,
    /// The port is missing and no default was given.
    MissingPort,
    /// The port is not a decimal number in 0..=65535.
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

/// Builds a destination from a host (domain, IPv4 literal, bare or bracketed IPv6 literal) and a
/// port.
///
/// A trailing dot on a domain is removed. Port 0 is accepted here (SOCKS5 UDP ASSOCIATE uses it);
/// the destination guard refuses it for outbound connections.
pub fn from_host_port(host: &str, port: u16) -> Result<Destination, TargetParseError> {
    if host.is_empty() {
        return Err(TargetParseError::EmptyHost);
    }
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or(TargetParseError::BadIpv6Literal)?;
        let ip = parse_ipv6_literal(inner).ok_or(TargetParseError::BadIpv6Literal)?;
        return Ok(Destination::Addr(SocketAddr::new(IpAddr::V6(ip), port)));
    }
    if let Ok(ip) = IpAddr::from_str(host) {
        return Ok(Destination::Addr(SocketAddr::new(ip, port)));
    }
    let domain = host.strip_suffix('.').unwrap_or(host);
    if domain.is_empty() {
        return Err(TargetParseError::EmptyHost);
    }
    if domain.len() > Destination::MAX_DOMAIN_LEN {
        return Err(TargetParseError::HostTooLong);
    }
    Destination::domain(domain, port).ok_or(TargetParseError::BadHost)
}

/// Builds a destination from the raw bytes of a domain (as carried by SOCKS5), see
/// [`from_host_port`].
pub fn from_domain_bytes(host: &[u8], port: u16) -> Result<Destination, TargetParseError> {
    let host = std::str::from_utf8(host).map_err(|_| TargetParseError::BadHost)?;
    from_host_port(host, port)
}

/// Parses `host:port`, `[v6]:port`, or (when `default_port` is given) a bare host / `[v6]`.
/// A bare IPv6 literal without brackets is accepted only without a port (`::1`).
pub fn parse_authority(
    text: &str,
    default_port: Option<u16>,
) -> Result<Destination, TargetParseError> {
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
    from_host_port(host, port)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `host:port` with the port required.
    fn parse(text: &str) -> Result<Destination, TargetParseError> {
        parse_authority(text, None)
    }

    fn addr(text: &str) -> Destination {
        Destination::Addr(text.parse().unwrap())
    }

    fn domain(name: &str, port: u16) -> Destination {
        Destination::domain(name, port).unwrap()
    }

    #[test]
    fn parses_ipv4_domain_and_bracketed_ipv6() {
        assert_eq!(parse("1.2.3.4:80"), Ok(addr("1.2.3.4:80")));
        assert_eq!(parse("[::1]:443"), Ok(addr("[::1]:443")));
        assert_eq!(parse("Example.COM:8080"), Ok(domain("Example.COM", 8080)));
        assert_eq!(
            parse_authority("example.com.", Some(80)),
            Ok(domain("example.com", 80))
        );
        assert_eq!(
            parse_authority("[fe80::1%eth0]", Some(80)),
            Ok(addr("[fe80::1]:80"))
        );
        assert_eq!(parse_authority("::1", Some(80)), Ok(addr("[::1]:80")));
    }

    #[test]
    fn domain_that_is_an_ip_literal_becomes_addr() {
        assert_eq!(from_domain_bytes(b"10.0.0.1", 22), Ok(addr("10.0.0.1:22")));
    }

    #[test]
    fn rejects_bad_inputs() {
        use TargetParseError::*;
        assert_eq!(parse("example.com"), Err(MissingPort));
        assert_eq!(parse("example.com:"), Err(BadPort));
        assert_eq!(parse("example.com:65536"), Err(BadPort));
        assert_eq!(parse("example.com:+80"), Err(BadPort));
        assert_eq!(parse(":80"), Err(EmptyHost));
        assert_eq!(parse(".:80"), Err(EmptyHost));
        assert_eq!(parse(""), Err(EmptyHost));
        assert_eq!(parse("[::1:80"), Err(BadIpv6Literal));
        assert_eq!(parse("[::1]x:80"), Err(BadIpv6Literal));
        assert_eq!(parse("[nothex]:80"), Err(BadIpv6Literal));
        assert_eq!(parse("exa mple.com:80"), Err(BadHost));
        assert_eq!(parse("a..b:80"), Err(BadHost));
        assert_eq!(parse("a/b:80"), Err(BadHost));
        assert_eq!(from_domain_bytes(&[0xff, 0x41], 80), Err(BadHost));
        let long = "a".repeat(Destination::MAX_DOMAIN_LEN + 1);
        assert_eq!(from_host_port(&long, 80), Err(HostTooLong));
        let max = "a".repeat(Destination::MAX_DOMAIN_LEN);
        assert_eq!(from_host_port(&max, 80), Ok(domain(&max, 80)));
        assert_eq!(from_host_port(&format!("{max}."), 80), Ok(domain(&max, 80)));
    }

    #[test]
    fn display_round_trips() {
        for text in ["1.2.3.4:80", "[2001:db8::1]:443", "example.com:1"] {
            let dest = parse(text).unwrap();
            assert_eq!(dest.to_string(), text);
            assert_eq!(parse(&dest.to_string()), Ok(dest));
        }
    }
}
