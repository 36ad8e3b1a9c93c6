//! `ostp --subscribe URL`: a minimal, bounded HTTP/1.1 GET for subscribe endpoints (plain
//! `http://` only — the build carries no TLS library) and turning the answer into a client config.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use super::RunError;
use crate::config::{self, ClientConfig, Config};
use crate::share_link::ShareLink;

/// Largest subscribe response accepted.
const MAX_RESPONSE: usize = 256 * 1024;
const TIMEOUT: Duration = Duration::from_secs(10);

/// The parts of an `http://host[:port]/path` URL.
#[derive(Debug, PartialEq, Eq)]
struct HttpUrl {
    host: String,
    port: u16,
    path: String,
}

fn parse_url(url: &str) -> Result<HttpUrl, RunError> {
    if url.starts_with("https://") {
        return Err(RunError::Other(
            "https:// subscribe URLs are not supported by this build (it carries no TLS library). Use the \
             http:// URL over a trusted path, or save the config and run it with --config"
                .into(),
        ));
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| RunError::Other(format!("{url:?} is not an http:// URL")))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let authority = authority
        .rsplit_once('@')
        .map(|(_, a)| a)
        .unwrap_or(authority);
    let (host, port) = if authority.starts_with('[') || authority.matches(':').count() == 1 {
        config::split_host_port(authority)
            .ok_or_else(|| RunError::Other(format!("bad host:port in {url:?}")))?
    } else {
        (authority.to_string(), 80)
    };
    if host.is_empty() {
        return Err(RunError::Other(format!("no host in {url:?}")));
    }
    Ok(HttpUrl {
        host,
        port,
        path: path.to_string(),
    })
}

fn http_get(url: &HttpUrl) -> Result<(u16, Vec<u8>), String> {
    let addrs = crate::tunnel::resolver::resolve_blocking(&url.host, url.port)
        .map_err(|e| format!("cannot resolve {}: {e}", url.host))?;
    let mut last = String::from("no addresses");
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("cannot connect to {a}: {e}"),
        }
    }
    let mut s = stream.ok_or(last)?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let host_header = crate::share_link::host_port(&url.host, url.port);
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {host_header}\r\nAccept: application/json\r\nUser-Agent: ostp/{}\r\nConnection: close\r\n\r\n",
        url.path,
        env!("CARGO_PKG_VERSION")
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.take(MAX_RESPONSE as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("reading the response: {e}"))?;
    if buf.len() > MAX_RESPONSE {
        return Err(format!("the response is larger than {MAX_RESPONSE} bytes"));
    }
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the response has no complete HTTP header")?;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("the response has no HTTP status")?;
    let mut body = buf[head_end + 4..].to_vec();
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body).ok_or("malformed chunked response")?;
    }
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// Turns a subscribe response body into a client config: `{"ok":true,"data":{..}}`, a bare
/// client config object, or a share link line.
pub fn client_config_from_body(source: &str, body: &[u8]) -> Result<ClientConfig, RunError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| RunError::Other(format!("{source}: the answer is not UTF-8 text")))?
        .trim();
    if text.starts_with("ostp://") {
        let line = text.lines().next().unwrap_or_default();
        let link = ShareLink::parse(line).map_err(|e| RunError::Other(format!("{source}: {e}")))?;
        return Ok(link.client_config());
    }
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| RunError::Other(format!("{source}: the answer is not JSON: {e}")))?;
    let data = match value.get("ok") {
        Some(serde_json::Value::Bool(true)) => value.get("data").cloned().ok_or_else(|| {
            RunError::Other(format!(
                "{source}: the answer has \"ok\": true but no \"data\""
            ))
        })?,
        Some(_) => {
            let why = value
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("no reason given");
            return Err(RunError::Other(format!(
                "{source}: the server refused: {why}"
            )));
        }
        None => value,
    };
    match config::parse(Path::new(source), &data.to_string())? {
        Config::Client(c) => Ok(c),
        Config::Server(_) => Err(RunError::Other(format!(
            "{source}: the answer is a server config, not a client config"
        ))),
    }
}

/// Resets the local proxy settings of a fetched config: the answer (plain HTTP, possibly from a
/// man in the middle or a hostile panel) decides the tunnel, never how this machine's proxy is
/// exposed. The bind comes from the command line or the default (`127.0.0.1:1088`).
fn keep_local_proxy_settings(cfg: &mut ClientConfig) {
    if cfg.socks5_bind != config::DEFAULT_SOCKS5_BIND || cfg.allow_open_proxy {
        eprintln!(
            "ostp: ignoring the subscribe answer's socks5_bind {:?}{}: the local proxy address \
             comes from --socks5-bind or the default {}",
            cfg.socks5_bind,
            if cfg.allow_open_proxy {
                " and allow_open_proxy"
            } else {
                ""
            },
            config::DEFAULT_SOCKS5_BIND
        );
    }
    cfg.socks5_bind = config::DEFAULT_SOCKS5_BIND.to_string();
    cfg.socks5_auth = None;
    cfg.allow_open_proxy = false;
}

/// Fetches `url` and returns the client config it describes, with the local proxy settings
/// reset to the defaults (see [`keep_local_proxy_settings`]).
pub fn client_config_from_subscription(url: &str) -> Result<ClientConfig, RunError> {
    let parsed = parse_url(url)?;
    let (status, body) =
        http_get(&parsed).map_err(|e| RunError::Other(format!("fetching {url}: {e}")))?;
    if status == 404 {
        return Err(RunError::Other(format!(
            "{url}: the server does not know this key (404). Check the subscribe URL"
        )));
    }
    if status != 200 {
        return Err(RunError::Other(format!(
            "{url}: the server answered HTTP {status}"
        )));
    }
    let mut cfg = client_config_from_body(url, &body)?;
    keep_local_proxy_settings(&mut cfg);
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c8a6fde902b4e23910cde882b7cf1612";

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://h.example:9090/api/subscribe/k").unwrap(),
            HttpUrl {
                host: "h.example".into(),
                port: 9090,
                path: "/api/subscribe/k".into()
            }
        );
        assert_eq!(parse_url("http://h").unwrap().port, 80);
        assert_eq!(parse_url("http://[::1]:8/x").unwrap().host, "::1");
        assert!(parse_url("https://h/x").is_err());
        assert!(parse_url("ftp://h/x").is_err());
    }

    #[test]
    fn bodies() {
        let wrapped = format!(
            r#"{{"ok":true,"data":{{"mode":"client","server":"e.com:5","access_key":"{KEY}","socks5_bind":"127.0.0.1:1088","tun":{{"enable":false,"dns":"1.1.1.1"}},"turn":{{"enabled":false}},"mux":{{"enabled":false,"sessions":1}},"debug":false}}}}"#
        );
        let c = client_config_from_body("u", wrapped.as_bytes()).unwrap();
        assert_eq!(c.server, "e.com:5");
        let link = format!("ostp://{KEY}@[::1]:7\n");
        assert_eq!(
            client_config_from_body("u", link.as_bytes())
                .unwrap()
                .server,
            "[::1]:7"
        );
        // The carrier of a share link and of a subscribe answer offering TCP is kept.
        let uot = format!("ostp://{KEY}@e.com:5?type=uot\n");
        let c = client_config_from_body("u", uot.as_bytes()).unwrap();
        assert_eq!(c.transport.mode, config::CarrierMode::Uot);
        let bad = format!("ostp://{KEY}@e.com:5?type=ws\n");
        let e = client_config_from_body("u", bad.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("\"ws\""), "{e}");
        let offered = format!(
            r#"{{"ok":true,"carriers":["udp","tcp"],"data":{{"mode":"client","server":"e.com:5","access_key":"{KEY}","transport":{{"mode":"auto","tcp_port":443}}}}}}"#
        );
        let c = client_config_from_body("u", offered.as_bytes()).unwrap();
        assert_eq!(c.transport.mode, config::CarrierMode::Auto);
        assert_eq!(c.transport.tcp_port, Some(443));
        assert!(client_config_from_body("u", br#"{"ok":false,"error":"unknown key"}"#).is_err());
        assert!(client_config_from_body("u", b"\xff").is_err());
    }

    #[test]
    fn the_answer_never_sets_the_local_proxy() {
        let body = format!(
            r#"{{"mode":"client","server":"e.com:5","access_key":"{KEY}","socks5_bind":"0.0.0.0:1088","allow_open_proxy":true,"socks5_auth":{{"username":"u","password":"p"}}}}"#
        );
        let mut c = client_config_from_body("u", body.as_bytes()).unwrap();
        keep_local_proxy_settings(&mut c);
        assert_eq!(c.socks5_bind, config::DEFAULT_SOCKS5_BIND);
        assert!(!c.allow_open_proxy);
        assert_eq!(c.socks5_auth, None);
    }

    #[test]
    fn chunked() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        assert!(dechunk(b"zz\r\n").is_none());
    }
}
