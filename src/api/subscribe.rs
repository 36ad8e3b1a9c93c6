//! `GET /api/subscribe/{key}`: the client configuration (JSON) or share link (text) for an
//! access key. No Bearer token: the 128-bit key itself authenticates the request.
//!
//! Content negotiation: `text/plain` is chosen only when the `Accept` header ranks it strictly
//! higher than `application/json`; everything else (no header, `*/*`, ties, unknown types)
//! gets JSON. The host is `public_host` if configured, else the request's `Host` (port
//! stripped), else the API bind IP; the port is the tunnel's listen port. The JSON answer also
//! says which carriers the server offers (`"carriers"`), and where it offers the TCP carrier the
//! config it hands out runs in `auto` transport mode; the share link then names the TCP port
//! (`?tcp_port=N`, which means `auto` to our clients).

use serde::Serialize;

use super::ApiContext;
use super::errors::ApiError;
use super::http::{Request, Response};
use crate::config::{CarrierMode, ClientConfig, TransportConfig};
use crate::keys;
use crate::share_link;
use crate::users::persist::lock_users;

/// Which representation to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Representation {
    Json,
    ShareLink,
}

/// Picks the representation from an `Accept` header value.
pub fn negotiate(accept: Option<&str>) -> Representation {
    let Some(accept) = accept else {
        return Representation::Json;
    };
    // (specificity, q) of the best-matching range for each candidate.
    let mut json: Option<(u8, f32)> = None;
    let mut text: Option<(u8, f32)> = None;
    for range in accept.split(',') {
        let mut params = range.split(';');
        let media = params.next().unwrap_or("").trim().to_ascii_lowercase();
        let mut q = 1.0f32;
        for p in params {
            if let Some((k, v)) = p.split_once('=') {
                if k.trim().eq_ignore_ascii_case("q") {
                    q = match v.trim().parse::<f32>() {
                        Ok(v) if (0.0..=1.0).contains(&v) => v,
                        _ => 0.0,
                    };
                }
            }
        }
        let (json_spec, text_spec) = match media.as_str() {
            "application/json" => (Some(2), None),
            "text/plain" => (None, Some(2)),
            "application/*" => (Some(1), None),
            "text/*" => (None, Some(1)),
            "*/*" => (Some(0), Some(0)),
            _ => (None, None),
        };
        let better = |cur: Option<(u8, f32)>, spec: u8| match cur {
            Some((s, _)) if s > spec => cur,
            Some((s, old_q)) if s == spec => Some((s, old_q.max(q))),
            _ => Some((spec, q)),
        };
        if let Some(s) = json_spec {
            json = better(json, s);
        }
        if let Some(s) = text_spec {
            text = better(text, s);
        }
    }
    let json_q = json.map_or(0.0, |(_, q)| q);
    let text_q = text.map_or(0.0, |(_, q)| q);
    if text_q > json_q {
        Representation::ShareLink
    } else {
        Representation::Json
    }
}

/// The host part of a `Host` header (port stripped, brackets kept off), if it looks valid.
pub fn host_from_header(host: &str) -> Option<String> {
    let host = host.trim();
    let bare = if let Some(rest) = host.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        if inside.is_empty()
            || !inside
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return None;
        }
        inside
    } else {
        let name = match host.rsplit_once(':') {
            Some((h, p)) if is_port(p) => h,
            Some(_) => return None,
            None => host,
        };
        if name.is_empty()
            || name.len() > 253
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        {
            return None;
        }
        name
    };
    Some(bare.to_string())
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// What the server offers: the carrier names for `"carriers"` and the client's `transport` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub carriers: &'static [&'static str],
    pub transport: TransportConfig,
}

/// The offer of a server whose tunnel listens on UDP `udp_port` and, if `tcp_port`, on TCP there:
/// with TCP the client runs `auto` (UDP first, TCP when UDP is blocked), told the TCP port only
/// when it differs from the UDP one.
pub fn offer(udp_port: u16, tcp_port: Option<u16>) -> Offer {
    match tcp_port {
        None => Offer {
            carriers: &["udp"],
            transport: TransportConfig::default(),
        },
        Some(tcp) => Offer {
            carriers: &["udp", "tcp"],
            transport: TransportConfig {
                mode: CarrierMode::Auto,
                tcp_port: (tcp != udp_port).then_some(tcp),
            },
        },
    }
}

/// Answers a subscribe request.
pub fn handle(ctx: &ApiContext, request: &Request, key: &str) -> Result<Response, ApiError> {
    let unknown = || ApiError::not_found("unknown access key").for_subscribe();
    if keys::validate_key(key).is_err() {
        return Err(unknown());
    }
    let counters = lock_users(&ctx.users).get_by_key(key).map(|u| {
        (
            u.bytes_up,
            u.bytes_down,
            u.limit_bytes,
            u.settings.expire_at,
        )
    });
    let Some((up, down, limit, expire)) = counters else {
        return Err(unknown());
    };
    let host = ctx
        .config
        .public_host
        .clone()
        .or_else(|| request.header("host").and_then(host_from_header))
        .unwrap_or_else(|| ctx.local_addr.ip().to_string());
    let port = ctx.config.tunnel_port();
    let tcp_port = ctx.config.public_tcp_carrier_port();
    let offer = offer(port, tcp_port);
    log::debug!("api: subscribe for user {}", keys::mask(key));

    let mut response = match negotiate(request.header("accept")) {
        Representation::ShareLink => {
            let link = share_link::format(key, &host, port, tcp_port);
            Response::text(200, format!("{link}\n"))
        }
        Representation::Json => {
            #[derive(Serialize)]
            struct Sub {
                ok: bool,
                data: ClientConfig,
                carriers: &'static [&'static str],
            }
            let server = share_link::host_port(&host, port);
            let mut data = ClientConfig::for_server(server, key.to_string());
            data.transport = offer.transport;
            Response::json(
                200,
                &Sub {
                    ok: true,
                    data,
                    carriers: offer.carriers,
                },
            )
        }
    };
    response.headers.push((
        "subscription-userinfo",
        format!(
            "upload={up}; download={down}; total={}; expire={}",
            limit.unwrap_or(0),
            expire.unwrap_or(0)
        ),
    ));
    response
        .headers
        .push(("profile-update-interval", "12".to_string()));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        use Representation::*;
        for (accept, want) in [
            (None, Json),
            (Some("application/json"), Json),
            (Some("text/plain"), ShareLink),
            (Some("TEXT/PLAIN; charset=utf-8"), ShareLink),
            (Some("text/*"), ShareLink),
            (Some("*/*"), Json),
            (Some("text/plain;q=0.9, */*"), Json),
            (Some("text/plain, */*;q=0.5"), ShareLink),
            (Some("text/plain, application/json"), Json),
            (Some("application/json;q=0.1, text/plain;q=0.2"), ShareLink),
            (Some("text/plain;q=0"), Json),
            (Some("text/plain;q=abc"), Json),
            (Some("image/png"), Json),
            (Some(""), Json),
            (
                Some("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
                Json,
            ),
        ] {
            assert_eq!(negotiate(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn offer_names_the_carriers_and_hands_out_auto_with_tcp() {
        let udp_only = offer(50000, None);
        assert_eq!(udp_only.carriers, ["udp"]);
        // Nothing changes for clients of a UDP-only server: no transport block is written.
        assert_eq!(udp_only.transport, TransportConfig::default());
        let same_port = offer(50000, Some(50000));
        assert_eq!(same_port.carriers, ["udp", "tcp"]);
        assert_eq!(
            same_port.transport,
            TransportConfig {
                mode: CarrierMode::Auto,
                tcp_port: None
            }
        );
        assert_eq!(offer(50000, Some(443)).transport.tcp_port, Some(443));
        let mut cfg = ClientConfig::for_server("h:50000".into(), "k".into());
        cfg.transport = offer(50000, Some(443)).transport;
        let v = serde_json::to_value(&cfg).unwrap();
        assert_eq!(
            v["transport"],
            serde_json::json!({"mode": "auto", "tcp_port": 443})
        );
    }

    #[test]
    fn host_header_parsing() {
        assert_eq!(
            host_from_header("example.com:9090").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            host_from_header("example.com").as_deref(),
            Some("example.com")
        );
        assert_eq!(host_from_header("1.2.3.4:80").as_deref(), Some("1.2.3.4"));
        assert_eq!(
            host_from_header("[2001:db8::1]:9090").as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(host_from_header("[::1]").as_deref(), Some("::1"));
        for bad in [
            "",
            ":80",
            "a b",
            "evil.com/x",
            "[::1",
            "[::1]x",
            "h:port",
            "x@y",
            "[zz]",
        ] {
            assert_eq!(host_from_header(bad), None, "{bad:?}");
        }
    }
}
