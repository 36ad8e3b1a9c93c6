//! `ostp://KEY@HOST:PORT[?type=udp|uot&tcp_port=N&tun=true&dns=IP&name=NAME]` share links:
//! formatting (IPv6 hosts in brackets) and parsing, including the carrier, the server's TCP
//! carrier port (`tcp_port`, ours; the reference implementation's links never carry it) and the
//! TUN settings the link asks for; a parameter this build cannot honour is refused, never
//! silently ignored.

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
    /// `tcp_port=N`: the server also offers the TCP carrier, on port `N` (the same as `port` or
    /// not); without `type` such a link runs `auto`.
    pub tcp_port: Option<u16>,
    /// `tun=true|false`: TUN mode (`tun.enable`).
    pub tun: Option<bool>,
    /// `dns=IP[:port]`: TUN mode's resolver (`tun.dns`).
    pub dns: Option<String>,
    /// `name=...`: the profile's display name (shown at start).
    pub name: Option<String>,
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
    /// A query parameter this build cannot honour (a TLS carrier, …), or a bad value.
    Unsupported(String),
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
            LinkError::Unsupported(what) => write!(
                f,
                "the share link asks for {what}, which this build cannot honour (it knows type, \
                 tcp_port, tun, dns and name); refusing rather than ignoring it"
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
    /// A link to `host:port` (brackets around an IPv6 host optional) for `key`; `tcp_port`: the
    /// server's TCP carrier port when it offers one. No other parameters.
    pub fn new(key: &str, host: &str, port: u16, tcp_port: Option<u16>) -> ShareLink {
        ShareLink {
            key: key.to_string(),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            carrier: None,
            tcp_port,
            tun: None,
            dns: None,
            name: None,
        }
    }

    /// The link that gives another device `cfg`'s connection: its server, key and carrier
    /// (`type=uot` for the TCP carrier alone; `auto` as `tcp_port`, which links read as auto),
    /// and TUN mode with its resolver when `cfg` runs it. `None` when `cfg.server` is not
    /// `host:port`.
    pub fn for_client(cfg: &ClientConfig) -> Option<ShareLink> {
        let (host, port) = crate::config::split_host_port(&cfg.server)?;
        let mut link = ShareLink::new(&cfg.access_key, &host, port, None);
        let tcp_port = cfg.transport.tcp_port.unwrap_or(port);
        match cfg.transport.mode {
            CarrierMode::Udp => {}
            CarrierMode::Uot => {
                link.carrier = Some(CarrierMode::Uot);
                link.tcp_port = cfg.transport.tcp_port;
            }
            CarrierMode::Auto => link.tcp_port = Some(tcp_port),
        }
        if cfg.tun.enable {
            link.tun = Some(true);
            link.dns = Some(cfg.tun.dns.clone());
        }
        Some(link)
    }

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
        let params = parse_query(query)?;
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
            carrier: params.carrier,
            tcp_port: params.tcp_port,
            tun: params.tun,
            dns: params.dns,
            name: params.name,
        })
    }

    /// The client config this link describes (the carrier of `?type=`; without one `auto` when
    /// the link names a `tcp_port`, else UDP; TUN mode and its resolver when the link asks for
    /// them).
    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::for_server(self.server(), self.key.clone());
        cfg.transport.mode = match (self.carrier, self.tcp_port) {
            (Some(mode), _) => mode,
            (None, Some(_)) => CarrierMode::Auto,
            (None, None) => CarrierMode::Udp,
        };
        cfg.transport.tcp_port = self.tcp_port.filter(|p| *p != self.port);
        if let Some(tun) = self.tun {
            cfg.tun.enable = tun;
        }
        if let Some(dns) = &self.dns {
            cfg.tun.dns = dns.clone();
        }
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
        let mut params = Vec::new();
        if let Some(mode) = self.carrier {
            params.push(format!("type={}", mode.as_str()));
        }
        if let Some(port) = self.tcp_port {
            params.push(format!("tcp_port={port}"));
        }
        if let Some(tun) = self.tun {
            params.push(format!("tun={tun}"));
        }
        if let Some(dns) = &self.dns {
            params.push(format!("dns={}", percent_encode(dns)));
        }
        if let Some(name) = &self.name {
            params.push(format!("name={}", percent_encode(name)));
        }
        if !params.is_empty() {
            write!(f, "?{}", params.join("&"))?;
        }
        Ok(())
    }
}

/// What a link's query asks for.
#[derive(Default)]
struct Params {
    carrier: Option<CarrierMode>,
    tcp_port: Option<u16>,
    tun: Option<bool>,
    dns: Option<String>,
    name: Option<String>,
}

/// The query's parameters (the last of a repeated one counts); anything this build cannot honour
/// is an error.
fn parse_query(query: &str) -> Result<Params, LinkError> {
    let mut p = Params::default();
    for param in query.split('&').filter(|s| !s.is_empty()) {
        let (key, raw) = param.split_once('=').unwrap_or((param, ""));
        let value = percent_decode(raw)
            .ok_or_else(|| LinkError::Unsupported(format!("a badly encoded {key:?}")))?;
        match key {
            "type" => {
                p.carrier = Some(match value.as_str() {
                    "udp" => CarrierMode::Udp,
                    "uot" => CarrierMode::Uot,
                    other => return Err(LinkError::UnknownType(other.to_string())),
                })
            }
            "tcp_port" => {
                let port = value.parse::<u16>().ok().filter(|p| *p != 0);
                let bad = || LinkError::Unsupported(format!("tcp_port={value:?} (not 1-65535)"));
                p.tcp_port = Some(port.ok_or_else(bad)?);
            }
            "tun" => {
                p.tun = Some(match value.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    other => return Err(LinkError::Unsupported(format!("tun={other:?}"))),
                })
            }
            "dns" => {
                let ok = value.parse::<std::net::IpAddr>().is_ok()
                    || value.parse::<std::net::SocketAddr>().is_ok();
                if !ok {
                    return Err(LinkError::Unsupported(format!("dns={value:?} (not an IP)")));
                }
                p.dns = Some(value);
            }
            "name" => p.name = Some(value),
            other => return Err(LinkError::Unsupported(format!("the parameter {other:?}"))),
        }
    }
    Ok(p)
}

/// `%XX` and `+` decoded; `None` when an escape is broken or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Everything but unreserved characters (RFC 3986) as `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Formats a share link; `tcp_port`: the server's TCP carrier port when it offers one (then
/// the link runs `auto`).
pub fn format(key: &str, host: &str, port: u16, tcp_port: Option<u16>) -> String {
    ShareLink::new(key, host, port, tcp_port).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c8a6fde902b4e23910cde882b7cf1612";

    #[test]
    fn a_client_configs_link_gives_back_its_carrier_and_tun_settings() {
        let cases: [(CarrierMode, Option<u16>, &str); 5] = [
            (CarrierMode::Udp, None, ""),
            (CarrierMode::Uot, None, "?type=uot"),
            (CarrierMode::Uot, Some(443), "?type=uot&tcp_port=443"),
            (CarrierMode::Auto, None, "?tcp_port=50000"),
            (CarrierMode::Auto, Some(443), "?tcp_port=443"),
        ];
        for (mode, tcp_port, query) in cases {
            let mut cfg = ClientConfig::for_server("vpn.example:50000".into(), KEY.into());
            cfg.transport.mode = mode;
            cfg.transport.tcp_port = tcp_port;
            let link = ShareLink::for_client(&cfg).expect("host:port");
            assert_eq!(
                link.to_string(),
                format!("ostp://{KEY}@vpn.example:50000{query}")
            );
            let back = ShareLink::parse(&link.to_string()).unwrap().client_config();
            assert_eq!(back.transport, cfg.transport, "{mode:?} {tcp_port:?}");
            assert_eq!(back.server, cfg.server);
        }
        let mut cfg = ClientConfig::for_server("[2001:db8::1]:50000".into(), KEY.into());
        cfg.tun.enable = true;
        cfg.tun.dns = "9.9.9.9".into();
        let back = ShareLink::parse(&ShareLink::for_client(&cfg).unwrap().to_string())
            .unwrap()
            .client_config();
        assert!(back.tun.enable);
        assert_eq!(back.tun.dns, "9.9.9.9");
        assert_eq!(back.server, "[2001:db8::1]:50000");
        cfg.server = "no-port".into();
        assert!(ShareLink::for_client(&cfg).is_none());
    }

    #[test]
    fn formats_ipv4_names_and_ipv6() {
        assert_eq!(
            format(KEY, "example.com", 50000, None),
            format!("ostp://{KEY}@example.com:50000")
        );
        assert_eq!(
            format(KEY, "2001:db8::1", 443, None),
            format!("ostp://{KEY}@[2001:db8::1]:443")
        );
        assert_eq!(
            format(KEY, "[2001:db8::1]", 443, None),
            format!("ostp://{KEY}@[2001:db8::1]:443")
        );
    }

    #[test]
    fn parses_what_it_formats() {
        for host in ["example.com", "203.0.113.7", "2001:db8::1"] {
            let link = format(KEY, host, 50000, None);
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
        let udp = link("/?type=udp#name").unwrap();
        assert_eq!(udp.carrier, Some(CarrierMode::Udp));
        assert_eq!(udp.client_config().transport.mode, CarrierMode::Udp);
        // No type: as before this parameter existed (UDP).
        for q in ["", "/", "#type=uot"] {
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
    fn tun_dns_and_name_are_honoured_and_anything_else_is_refused() {
        let link = |q: &str| ShareLink::parse(&format!("ostp://{KEY}@example.com:443{q}"));
        let l = link("?type=uot&tun=true&dns=9.9.9.9&name=Home%20router").unwrap();
        assert_eq!(
            (l.tun, l.dns.as_deref(), l.name.as_deref()),
            (Some(true), Some("9.9.9.9"), Some("Home router"))
        );
        let cfg = l.client_config();
        assert!(cfg.tun.enable);
        assert_eq!(cfg.tun.dns, "9.9.9.9");
        assert_eq!(cfg.transport.mode, CarrierMode::Uot);
        // It formats back to an equivalent link.
        assert_eq!(ShareLink::parse(&l.to_string()).unwrap(), l);
        assert!(!link("?tun=0").unwrap().client_config().tun.enable);
        for bad in [
            "?security=tls",
            "?sni=example.com",
            "?tun=yes",
            "?dns=resolver.example",
            "?name=%zz",
            "?flow=xtls",
        ] {
            let e = link(bad).unwrap_err();
            assert!(matches!(e, LinkError::Unsupported(_)), "{bad}: {e:?}");
            assert!(e.to_string().contains("cannot honour"), "{e}");
        }
    }

    #[test]
    fn tcp_port_carries_the_tcp_carrier_port_and_means_auto_without_a_type() {
        let link = |q: &str| ShareLink::parse(&format!("ostp://{KEY}@example.com:443{q}"));
        // Another port than the UDP one: auto, told the TCP port.
        let other = link("?tcp_port=8443").unwrap();
        assert_eq!(other.tcp_port, Some(8443));
        let cfg = other.client_config();
        assert_eq!(cfg.transport.mode, CarrierMode::Auto);
        assert_eq!(cfg.transport.tcp_port, Some(8443));
        assert_eq!(cfg.server, "example.com:443");
        assert_eq!(
            format(KEY, "example.com", 443, Some(8443)),
            format!("ostp://{KEY}@example.com:443?tcp_port=8443")
        );
        assert_eq!(ShareLink::parse(&other.to_string()).unwrap(), other);
        // The same port: auto, no tcp_port in the config (it is the port of `server`).
        let same = link("?tcp_port=443").unwrap().client_config();
        assert_eq!(same.transport.mode, CarrierMode::Auto);
        assert_eq!(same.transport.tcp_port, None);
        // With a type, the type decides the carrier; uot goes to the TCP port.
        let uot = link("?type=uot&tcp_port=8443").unwrap();
        assert_eq!(uot.client_config().transport.mode, CarrierMode::Uot);
        assert_eq!(uot.client_config().transport.tcp_port, Some(8443));
        assert_eq!(
            uot.to_string(),
            format!("ostp://{KEY}@example.com:443?type=uot&tcp_port=8443")
        );
        let udp = link("?tcp_port=8443&type=udp").unwrap().client_config();
        assert_eq!(udp.transport.mode, CarrierMode::Udp);
        for bad in ["0", "65536", "", "x", "-1"] {
            let e = link(&format!("?tcp_port={bad}")).unwrap_err();
            assert!(matches!(e, LinkError::Unsupported(_)), "{bad}: {e:?}");
        }
        // IPv6 hosts keep their brackets.
        assert_eq!(
            format(KEY, "[2001:db8::1]", 443, Some(443)),
            format!("ostp://{KEY}@[2001:db8::1]:443?tcp_port=443")
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
