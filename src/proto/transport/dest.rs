//! Destinations named by stream opens and datagrams: a domain name or an IP address, plus a port.
//!
//! Wire form (SOCKS5-like): `atyp u8` (1 = IPv4, 3 = domain, 4 = IPv6), the address
//! (4 bytes / `len u8` + 1..=253 name bytes / 16 bytes), then the port as `u16` big-endian.
//! The length byte could say 255, but a host name is at most 253 bytes (RFC 1035 presentation
//! form without the trailing dot), so 254 and 255 are invalid like any other bad name.
//!
//! This is the one destination type of the crate: the proxy front end (`tunnel::proxy_front`,
//! with `tunnel::target` parsing `host:port` text) produces it, the client sends it, the server
//! resolves it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::frame::{FrameError, Reader, Writer};

const ATYP_IPV4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_IPV6: u8 = 4;

/// Where the server should connect (stream) or send (datagram).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    /// A literal socket address.
    Addr(SocketAddr),
    /// A domain name to be resolved by the server, and a port.
    Domain { name: String, port: u16 },
}

impl Destination {
    /// Longest domain name accepted anywhere (RFC 1035: 253 bytes without the trailing dot).
    pub const MAX_DOMAIN_LEN: usize = 253;

    /// A domain destination; `None` unless the name is 1..=[`Self::MAX_DOMAIN_LEN`] bytes of ASCII
    /// letters, digits, `-`, `_` and `.` that neither starts with `.` nor contains `..`.
    /// The name is kept as given (case, a trailing dot); IP literals are not turned into
    /// [`Destination::Addr`] here (`tunnel::target` does that for text from local clients).
    pub fn domain(name: &str, port: u16) -> Option<Self> {
        if !valid_domain(name.as_bytes()) {
            return None;
        }
        Some(Destination::Domain {
            name: name.to_owned(),
            port,
        })
    }

    /// The destination port.
    pub fn port(&self) -> u16 {
        match self {
            Destination::Addr(addr) => addr.port(),
            Destination::Domain { port, .. } => *port,
        }
    }

    /// Number of bytes the wire form takes (what `Destination::encode` writes).
    pub fn encoded_len(&self) -> usize {
        match self {
            Destination::Addr(SocketAddr::V4(_)) => 1 + 4 + 2,
            Destination::Addr(SocketAddr::V6(_)) => 1 + 16 + 2,
            Destination::Domain { name, .. } => 1 + 1 + name.len() + 2,
        }
    }

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Option<()> {
        match self {
            Destination::Addr(SocketAddr::V4(a)) => {
                w.put_u8(ATYP_IPV4)?;
                w.put_bytes(&a.ip().octets())?;
            }
            Destination::Addr(SocketAddr::V6(a)) => {
                w.put_u8(ATYP_IPV6)?;
                w.put_bytes(&a.ip().octets())?;
            }
            Destination::Domain { name, .. } => {
                let len = u8::try_from(name.len()).ok()?;
                w.put_u8(ATYP_DOMAIN)?;
                w.put_u8(len)?;
                w.put_bytes(name.as_bytes())?;
            }
        }
        w.put_bytes(&self.port().to_be_bytes())
    }

    pub(crate) fn parse(r: &mut Reader<'_>) -> Result<Self, FrameError> {
        let atyp = r.u8()?;
        let dest = match atyp {
            ATYP_IPV4 => {
                let b = r.bytes(4)?;
                let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
                Destination::Addr(SocketAddr::new(IpAddr::V4(ip), r.u16()?))
            }
            ATYP_IPV6 => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(r.bytes(16)?);
                let ip = Ipv6Addr::from(octets);
                Destination::Addr(SocketAddr::new(IpAddr::V6(ip), r.u16()?))
            }
            ATYP_DOMAIN => {
                let len = usize::from(r.u8()?);
                let name = r.bytes(len)?;
                if !valid_domain(name) {
                    return Err(FrameError::InvalidDestination);
                }
                // valid_domain only admits ASCII, so this cannot fail.
                let name = std::str::from_utf8(name)
                    .map_err(|_| FrameError::InvalidDestination)?
                    .to_owned();
                Destination::Domain {
                    name,
                    port: r.u16()?,
                }
            }
            _ => return Err(FrameError::InvalidDestination),
        };
        Ok(dest)
    }
}

/// The one host-name rule (wire, SOCKS5, HTTP): see [`Destination::domain`].
fn valid_domain(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= Destination::MAX_DOMAIN_LEN
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.first() != Some(&b'.')
        && !name.windows(2).any(|w| w == b"..")
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Addr(addr) => write!(f, "{addr}"),
            Destination::Domain { name, port } => write!(f, "{name}:{port}"),
        }
    }
}

impl From<SocketAddr> for Destination {
    fn from(addr: SocketAddr) -> Self {
        Destination::Addr(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(d: &Destination) -> Destination {
        let mut buf = [0u8; 300];
        let mut w = Writer::new(&mut buf);
        d.encode(&mut w).unwrap();
        let n = w.len();
        assert_eq!(n, d.encoded_len());
        let mut r = Reader::new(&buf[..n]);
        let back = Destination::parse(&mut r).unwrap();
        assert!(r.is_empty());
        back
    }

    #[test]
    fn all_kinds_roundtrip() {
        let v4: Destination = "1.2.3.4:80".parse::<SocketAddr>().unwrap().into();
        let v6: Destination = "[2001:db8::1]:443".parse::<SocketAddr>().unwrap().into();
        let dn = Destination::domain("example.com", 8080).unwrap();
        for d in [v4, v6, dn] {
            assert_eq!(roundtrip(&d), d);
        }
    }

    #[test]
    fn bad_domains_rejected() {
        assert!(Destination::domain("", 1).is_none());
        assert!(Destination::domain("a b", 1).is_none());
        assert!(Destination::domain(&"a".repeat(256), 1).is_none());
        for bad in [".a", "a..b", "a/b", "a@b", "a:b", "a*b", "é"] {
            assert!(Destination::domain(bad, 1).is_none(), "{bad}");
        }
        assert!(Destination::domain("Under_score-1.example.", 1).is_some());
        let mut r = Reader::new(&[3, 2, b'a', 0, 0, 80]);
        assert_eq!(
            Destination::parse(&mut r),
            Err(FrameError::InvalidDestination)
        );
        let mut r = Reader::new(&[1, 1, 2]);
        assert_eq!(Destination::parse(&mut r), Err(FrameError::Truncated));
    }

    #[test]
    fn domain_length_limit_is_253_on_the_wire_too() {
        let max = "a".repeat(Destination::MAX_DOMAIN_LEN);
        let ok = Destination::domain(&max, 1).unwrap();
        assert_eq!(roundtrip(&ok), ok);
        let long = "a".repeat(Destination::MAX_DOMAIN_LEN + 1);
        assert!(Destination::domain(&long, 1).is_none());
        // A peer's 254-byte name fits the length byte but is refused like any bad name.
        let mut wire = vec![3, 254];
        wire.extend_from_slice(long.as_bytes());
        wire.extend_from_slice(&[0, 80]);
        assert_eq!(
            Destination::parse(&mut Reader::new(&wire)),
            Err(FrameError::InvalidDestination)
        );
    }
}
