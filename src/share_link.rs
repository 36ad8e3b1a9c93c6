//! `ostp://KEY@HOST:PORT[?type=udp|uot]` share links: formatting (IPv6 hosts in brackets) and
//! parsing, including the carrier the link asks for.

use std::fmt;

use crate::config::{CarrierMode, ClientConfig};
use crate::keys;

/// A parsed share link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareLink {
    pub key: String,
    /// Host without brackets (`example.com`, `203.0.113.7`, `2001:db8::1`).
    pub host: String,
    pub port: u16,
    /// The carrier of `?type=`: `udp` or `uot` (the TCP carrier); `None` when the link has none.
    pub carrier: Option<CarrierMode>,
}

/// Why a string is not a share link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkError {
    NotOstp,
    MissingKey,
    BadKey(keys::KeyError),
    MissingHost,
    BadPort(String),
    /// `?type=` names a carrier this client does not know.
    UnknownType(String),
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::NotOstp => write!(f, "a share link starts with ostp://"),
            LinkError::MissingKey => {
                write!(f, "the share link has no access key (ostp://KEY@HOST:PORT)")
            }
            LinkError::BadKey(e) => write!(f, "the share link's key is invalid: {e}"),
            LinkError::MissingHost => {
                write!(f, "the share link has no host (ostp://KEY@HOST:PORT)")
            }
            LinkError::BadPort(p) => {
                write!(f, "the share link's port {p:?} is not a number in 1-65535")
            }
            LinkError::UnknownType(t) => write!(
                f,
                "the share link asks for transport type {t:?}, which this client does not \
                 support (known: \"udp\", \"uot\"); refusing rather than guessing"
            ),
        }
    }
}

impl std::error::Error for LinkError {}

/// `host:port` with IPv6 literals in brackets.
pub fn host_port(host: &str, port: u16) -> String {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.contains(':') {
        format!("[{bare}]:{port}")
    } else {
        format!("{bare}:{port}")
    }
}

impl ShareLink {
    /// Parses `ostp://KEY@HOST:PORT` (a trailing `/` or `#fragment` is ignored). In the query,
    /// `type=udp` and `type=uot` choose the carrier, any other `type` is an error, other
    /// parameters are ignored.
    pub fn parse(link: &str) -> Result<ShareLink, LinkError> {
        let rest = link
            .trim()
            .strip_prefix("ostp://")
            .ok_or(LinkError::NotOstp)?;
        let rest = rest.split('#').next().unwrap_or("");
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let carrier = parse_type(query)?;
        let rest = rest.split('/').next().unwrap_or("");
        let (key, addr) = rest.rsplit_once('@').ok_or(LinkError::MissingKey)?;
        if key.is_empty() {
            return Err(LinkError::MissingKey);
        }
        keys::validate_key(key).map_err(LinkError::BadKey)?;
        let (host, port) = if let Some(v6) = addr.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or(LinkError::MissingHost)?;
            let port = after
                .strip_prefix(':')
                .ok_or(LinkError::BadPort(String::new()))?;
            (host, port)
        } else {
            addr.rsplit_once(':')
                .ok_or(LinkError::BadPort(String::new()))?
        };
        if host.is_empty() {
            return Err(LinkError::MissingHost);
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| LinkError::BadPort(port.to_string()))?;
        Ok(ShareLink {
            key: key.to_string(),
            host: host.to_string(),
            port,
            carrier,
        })
    }

    /// The client config this link describes (the carrier of `?type=`, UDP without one).
    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::for_server(self.server(), self.key.clone());
        cfg.transport.mode = self.carrier.unwrap_or_default();
        cfg
    }

    /// The server address as `host:port` (IPv6 in brackets).
    pub fn server(&self) -> String {
        host_port(&self.host, self.port)
    }
}

impl fmt::Display for ShareLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ostp://{}@{}",
            self.key,
            host_port(&self.host, self.port)
        )?;
        match self.carrier {
            Some(mode) => write!(f, "?type={}", mode.as_str()),
            None => Ok(()),
        }
    }
}

/// The carrier named by the query's `type` parameters (the last one counts).
fn parse_type(query: &str) -> Result<Option<CarrierMode>, LinkError> {
    let mut carrier = None;
    for param in query.split('&') {
        let Some(value) = param.strip_prefix("type=") else {
            continue;
        };
        carrier = Some(match value {
            "udp" => CarrierMode::Udp,
            "uot" => CarrierMode::Uot,
            other => return Err(LinkError::UnknownType(other.to_string())),
        });
    }
    Ok(carrier)
}

/// Formats a share link.
pub fn format(key: &str, host: &str, port: u16) -> String {
    format!("ostp://{key}@{}", host_port(host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c8a6fde902b4e23910cde882b7cf1612";

    #[test]
    fn formats_ipv4_names_and_ipv6() {
        assert_eq!(
            format(KEY, "example.com", 50000),
            format!("ostp://{KEY}@example.com:50000")
        );
        assert_eq!(
            format(KEY, "2001:db8::1", 443),
            format!("ostp://{KEY}@[2001:db8::1]:443")
        );
        assert_eq!(
            format(KEY, "[2001:db8::1]", 443),
            format!("ostp://{KEY}@[2001:db8::1]:443")
        );
    }

    #[test]
    fn parses_what_it_formats() {
        for host in ["example.com", "203.0.113.7", "2001:db8::1"] {
            let link = format(KEY, host, 50000);
            let parsed = ShareLink::parse(&link).unwrap();
            assert_eq!(parsed.key, KEY);
            assert_eq!(parsed.host, host);
            assert_eq!(parsed.port, 50000);
            assert_eq!(parsed.to_string(), link);
        }
    }

    #[test]
    fn type_chooses_the_carrier_and_unknown_types_are_refused() {
        let link = |q: &str| ShareLink::parse(&format!("ostp://{KEY}@example.com:443{q}"));
        let uot = link("?type=uot").unwrap();
        assert_eq!(uot.carrier, Some(CarrierMode::Uot));
        assert_eq!(uot.client_config().transport.mode, CarrierMode::Uot);
        assert_eq!(uot.client_config().server, "example.com:443");
        assert_eq!(
            uot.to_string(),
            format!("ostp://{KEY}@example.com:443?type=uot")
        );
        let udp = link("/?foo=1&type=udp#name").unwrap();
        assert_eq!(udp.carrier, Some(CarrierMode::Udp));
        assert_eq!(udp.client_config().transport.mode, CarrierMode::Udp);
        // No type: as before this parameter existed (UDP), and other parameters are ignored.
        for q in ["", "/", "?sni=x", "#type=uot"] {
            let plain = link(q).unwrap();
            assert_eq!(plain.carrier, None, "{q}");
            assert_eq!(plain.client_config().transport.mode, CarrierMode::Udp);
            assert_eq!(plain.to_string(), format!("ostp://{KEY}@example.com:443"));
        }
        for bad in ["tcp", "auto", "UOT", "", "quic"] {
            let e = link(&format!("?type={bad}")).unwrap_err();
            assert_eq!(e, LinkError::UnknownType(bad.to_string()));
            assert!(e.to_string().contains("does not support"), "{e}");
        }
        assert_eq!(
            link("?type=uot&type=ws"),
            Err(LinkError::UnknownType("ws".into()))
        );
    }

    #[test]
    fn rejects_malformed_links() {
        assert_eq!(ShareLink::parse("http://x@y:1"), Err(LinkError::NotOstp));
        assert_eq!(
            ShareLink::parse("ostp://example.com:1"),
            Err(LinkError::MissingKey)
        );
        assert!(matches!(
            ShareLink::parse("ostp://short@h:1"),
            Err(LinkError::BadKey(_))
        ));
        assert!(matches!(
            ShareLink::parse(&format!("ostp://{KEY}@h:0")),
            Err(LinkError::BadPort(_))
        ));
        assert!(matches!(
            ShareLink::parse(&format!("ostp://{KEY}@h")),
            Err(LinkError::BadPort(_))
        ));
        assert!(matches!(
            ShareLink::parse(&format!("ostp://{KEY}@:5")),
            Err(LinkError::MissingHost)
        ));
        assert!(matches!(
            ShareLink::parse(&format!("ostp://{KEY}@[::1")),
            Err(LinkError::MissingHost)
        ));
    }
}
