//! Shared helpers of the `api_*` integration tests: an in-process API server on 127.0.0.1:0,
//! a raw HTTP/1.1 client over `TcpStream`, and a small validator that checks responses
//! against `docs/openapi.yaml` (written in the JSON subset of YAML, read with serde_json).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::Value;

use ostp::api::{self, ApiHandle, Limits};
use ostp::config::{self, Config, ServerConfig};
use ostp::control::{ControlMsg, ControlSender};
use ostp::users::{self, Persister, SharedUsers};

pub const TOKEN: &str = "test-token-0123456789";
pub const CONFIG_KEY: &str = "cfgkey0123456789abcdef";

/// A fresh temporary directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    let mut b = [0u8; 8];
    ostp::keys::fill_random(&mut b).unwrap();
    let d = std::env::temp_dir().join(format!("ostp-{tag}-{}", ostp::keys::to_hex(&b)));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a server config with the API on 127.0.0.1:`api_port` and returns its path.
pub fn write_config(dir: &Path, token: &str, api_port: u16, access_keys: Value) -> PathBuf {
    let v = serde_json::json!({
        "mode": "server",
        "listen": "0.0.0.0:50123",
        "access_keys": access_keys,
        "api": {"enabled": true, "bind": format!("127.0.0.1:{api_port}"), "token": token},
        "state_file": "state.json",
        "log_level": "warn",
    });
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    path
}

pub fn load_server_config(path: &Path) -> ServerConfig {
    match config::load(path).unwrap() {
        Config::Server(s) => s,
        Config::Client(_) => panic!("not a server config"),
    }
}

/// An API server running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub config: Arc<ServerConfig>,
    pub users: SharedUsers,
    pub persister: Persister,
    pub control: Receiver<ControlMsg>,
    handle: Option<ApiHandle>,
}

impl TestServer {
    pub fn start(token: &str) -> TestServer {
        Self::start_in(&temp_dir("api"), token, Limits::default())
    }

    pub fn start_with_limits(token: &str, limits: Limits) -> TestServer {
        Self::start_in(&temp_dir("api"), token, limits)
    }

    /// Starts (or restarts) a server whose config and state live in `dir`.
    pub fn start_in(dir: &Path, token: &str, limits: Limits) -> TestServer {
        let path = dir.join("config.json");
        if !path.exists() {
            write_config(
                dir,
                token,
                0,
                serde_json::json!([{"key": CONFIG_KEY, "name": "from-config", "limit_bytes": 1000}]),
            );
        }
        let config = Arc::new(load_server_config(&path));
        let (users, persister) = users::open(&config).unwrap();
        let (control, rx) = ControlSender::channel(None);
        let handle = api::start_with_limits(
            config.clone(),
            users.clone(),
            persister.clone(),
            control,
            Instant::now(),
            limits,
        )
        .unwrap();
        TestServer {
            addr: handle.local_addr(),
            dir: dir.to_path_buf(),
            config,
            users,
            persister,
            control: rx,
            handle: Some(handle),
        }
    }

    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }

    pub fn client(&self) -> Client {
        Client::new(self.addr, TOKEN)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Parses the status and headers of a response to HEAD (no body follows).
pub fn parse_head_response(buf: &[u8]) -> Option<Resp> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let mut padded = buf[..end].to_vec();
    padded.extend(std::iter::repeat_n(b' ', 1 << 20));
    parse_response(&padded).map(|(mut r, _)| {
        r.body.clear();
        r
    })
}

/// Parses one response from the start of `buf`; `None` if incomplete.
pub fn parse_response(buf: &[u8]) -> Option<(Resp, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    for l in lines {
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    if buf.len() < end + len {
        return None;
    }
    Some((
        Resp {
            status,
            headers,
            body: buf[end..end + len].to_vec(),
        },
        end + len,
    ))
}

/// Sends raw bytes on a fresh connection and reads everything until the server closes
/// (or `timeout`). Returns the raw bytes received.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    out
}

/// Reads up to `n` responses from `s` (one `read` timeout = `timeout`); stops early at EOF or
/// a timeout. Returns the responses and whether the server closed the connection (EOF seen).
pub fn read_responses(s: &mut TcpStream, n: usize, timeout: Duration) -> (Vec<Resp>, bool) {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut tmp = [0u8; 16384];
    loop {
        while let Some((r, used)) = parse_response(&buf) {
            buf.drain(..used);
            out.push(r);
        }
        if out.len() >= n {
            return (out, false);
        }
        match s.read(&mut tmp) {
            Ok(0) => return (out, true),
            Ok(k) => buf.extend_from_slice(&tmp[..k]),
            Err(_) => return (out, false),
        }
    }
}

/// Whether the server closes `s` within `timeout` (EOF or reset), reading and ignoring data.
pub fn closed_within(s: &mut TcpStream, timeout: Duration) -> bool {
    let start = Instant::now();
    let mut tmp = [0u8; 4096];
    while start.elapsed() < timeout {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        match s.read(&mut tmp) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => {}
        }
    }
    false
}

/// A keep-alive HTTP client on one connection.
pub struct Client {
    addr: SocketAddr,
    token: String,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Client {
    pub fn new(addr: SocketAddr, token: &str) -> Client {
        Client {
            addr,
            token: token.to_string(),
            stream: None,
            buf: Vec::new(),
        }
    }

    fn connect(&mut self) -> Option<&mut TcpStream> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s.set_nodelay(true).unwrap();
            self.stream = Some(s);
            self.buf.clear();
        }
        self.stream.as_mut()
    }

    /// Sends a request with the bearer token and extra headers; reconnects if needed.
    pub fn send(&mut self, method: &str, path: &str, body: Option<&str>) -> Resp {
        self.send_with(method, path, &[], body)
    }

    pub fn send_with(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Resp {
        self.try_send_with(method, path, headers, body)
            .unwrap_or_else(|| panic!("request failed: {method} {path}"))
    }

    /// Like [`Client::send`], but `None` when the server cannot be reached (no panic).
    pub fn try_send(&mut self, method: &str, path: &str, body: Option<&str>) -> Option<Resp> {
        self.try_send_with(method, path, &[], body)
    }

    pub fn try_send_with(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Option<Resp> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        if !self.token.is_empty() {
            req.push_str(&format!("Authorization: Bearer {}\r\n", self.token));
        }
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(b);
        }
        for _attempt in 0..2 {
            let reused = self.stream.is_some();
            let s = self.connect()?;
            if s.write_all(req.as_bytes()).is_ok() {
                if let Some(r) = self.read_response() {
                    if r.header("connection")
                        .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                    {
                        self.stream = None;
                    }
                    return Some(r);
                }
            }
            self.stream = None;
            if !reused {
                return None;
            }
            // The server closed an idle keep-alive connection: retry once on a new one.
        }
        None
    }

    fn read_response(&mut self) -> Option<Resp> {
        let mut tmp = [0u8; 65536];
        loop {
            if let Some((r, used)) = parse_response(&self.buf) {
                self.buf.drain(..used);
                return Some(r);
            }
            let s = self.stream.as_mut()?;
            match s.read(&mut tmp) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }
}

/// Thread count of this process (Linux: /proc/self/status).
pub fn thread_count(pid: Option<u32>) -> Option<usize> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    let s = std::fs::read_to_string(path).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

/// `docs/openapi.yaml`, for checking responses.
pub struct OpenApi {
    doc: Value,
}

impl OpenApi {
    pub fn load() -> OpenApi {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let json: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        OpenApi {
            doc: serde_json::from_str(&json).expect("openapi.yaml is JSON-compatible YAML"),
        }
    }

    /// Asserts that `resp` is a documented answer of `method path_template`.
    pub fn check(&self, method: &str, path_template: &str, resp: &Resp) {
        let op = &self.doc["paths"][path_template][method.to_ascii_lowercase()];
        assert!(
            op.is_object(),
            "operation {method} {path_template} not in openapi.yaml"
        );
        let documented = &op["responses"][resp.status.to_string()];
        assert!(
            documented.is_object(),
            "status {} of {method} {path_template} is not documented; body {:?}",
            resp.status,
            resp.text()
        );
        if let Some(hs) = documented["headers"].as_object() {
            for name in hs.keys() {
                assert!(
                    resp.header(name).is_some(),
                    "{method} {path_template} {}: documented header {name} missing",
                    resp.status
                );
            }
        }
        let ct = resp.header("content-type").expect("content-type");
        let media = ct.split(';').next().unwrap().trim();
        let schema = &documented["content"][media]["schema"];
        assert!(
            schema.is_object(),
            "{method} {path_template} {}: content type {media} not documented",
            resp.status
        );
        if media == "application/json" {
            self.validate(schema, &resp.json(), "$");
        } else {
            let text = resp.text();
            assert!(
                text.starts_with("ostp://") && text.ends_with('\n'),
                "text body {text:?}"
            );
        }
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name = r.strip_prefix("#/components/schemas/").expect("local ref");
                &self.doc["components"]["schemas"][name]
            }
            None => schema,
        }
    }

    /// Validates `value` against `schema` (the subset of JSON Schema openapi.yaml uses).
    pub fn validate(&self, schema: &Value, value: &Value, at: &str) {
        let schema = self.resolve(schema);
        if value.is_null() {
            assert!(
                schema["nullable"] == Value::Bool(true),
                "{at}: null but not nullable"
            );
            return;
        }
        let ty = schema["type"].as_str().unwrap_or("any");
        let ok = match ty {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_u64() || value.is_i64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            _ => true,
        };
        assert!(ok, "{at}: expected {ty}, got {value}");
        if let Some(e) = schema["enum"].as_array() {
            assert!(e.contains(value), "{at}: {value} not in {e:?}");
        }
        if let Some(min) = schema["minimum"].as_i64() {
            assert!(
                value.as_i64().is_none_or(|v| v >= min),
                "{at}: {value} < {min}"
            );
        }
        if let Some(max) = schema["maxLength"].as_u64() {
            let n = value.as_str().map_or(0, |s| s.chars().count()) as u64;
            assert!(n <= max, "{at}: longer than {max}");
        }
        if let Value::Object(map) = value {
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap();
                assert!(map.contains_key(r), "{at}: required field {r} missing");
            }
            let props = schema["properties"].as_object();
            for (k, v) in map {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => self.validate(s, v, &format!("{at}.{k}")),
                    None => assert!(
                        schema["additionalProperties"] != Value::Bool(false),
                        "{at}: undocumented field {k}"
                    ),
                }
            }
        }
        if let Value::Array(items) = value {
            for (i, item) in items.iter().enumerate() {
                self.validate(&schema["items"], item, &format!("{at}[{i}]"));
            }
        }
    }
}

/// A TCP connection to `dst` from the local address `src` (e.g. 127.0.0.2: all of 127.0.0.0/8
/// is local on Linux), so a test can be a second client address. std cannot bind a socket
/// before connecting, hence these few libc calls.
#[allow(unsafe_code)]
pub fn connect_from(src: std::net::Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let SocketAddr::V4(dst) = dst else {
        return Err(std::io::Error::other("connect_from: IPv4 only"));
    };
    let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns (closed by `OwnedFd` on
    // every path), with pointers to live, correctly sized `sockaddr_in` values.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let owned = OwnedFd::from_raw_fd(fd);
        let local = sockaddr(src, 0);
        if libc::bind(fd, (&raw const local).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sockaddr(*dst.ip(), dst.port());
        if libc::connect(fd, (&raw const remote).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(TcpStream::from(owned))
    }
}
