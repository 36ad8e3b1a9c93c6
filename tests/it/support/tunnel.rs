//! Shared harness of the `tunnel_*` end-to-end tests: real `ostp` server and client processes on
//! loopback (configs in a temp dir, free ports, wait-until-ready on their log lines, killed on
//! drop), the `bulk_http` test server and the `lossy_relay` link emulator running in-process on
//! threads, a raw HTTP client for the management API, a minimal SOCKS5 client, and curl helpers.
#![allow(dead_code)]

use super::{bulk_http, lossy_relay};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const TOKEN: &str = "e2e-test-token-0123456789";

/// True in optimised builds (`cargo test --release`): heavy transfers use full sizes there.
pub const RELEASE: bool = !cfg!(debug_assertions);

/// `release` bytes in release builds, `debug` bytes in debug builds (debug crypto is ~20× slower).
pub fn size(release: u64, debug: u64) -> u64 {
    if RELEASE { release } else { debug }
}

/// Serialises the heavy tests of one test binary so that they do not fight for the 2 cores and
/// blow each other's timeouts.
pub fn heavy_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ----- content checksums (same formulas as examples/bulk_http.rs) -----

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

pub fn fnv1a64_update(mut hash: u64, data: &[u8]) -> u64 {
    for &b in data {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Data fed through an FNV-1a 64 hasher, with its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    pub len: u64,
    pub fnv: u64,
}

impl Digest {
    pub fn new() -> Self {
        Digest {
            len: 0,
            fnv: FNV_OFFSET,
        }
    }
    pub fn update(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        self.fnv = fnv1a64_update(self.fnv, data);
    }
}

/// Reads `r` to the end, hashing; returns the digest and the error that ended it, if any.
pub fn digest_reader(r: &mut impl Read) -> (Digest, Option<std::io::Error>) {
    let mut d = Digest::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (d, None),
            Ok(n) => d.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (d, Some(e)),
        }
    }
}

// ----- ports and directories -----

/// Ports the tests hand out: the 10,000 below the kernel's ephemeral range, which neither a
/// `bind` to port 0 nor an outgoing connection ever takes, so a port handed out stays free until
/// the process it was meant for binds it (a port picked by binding port 0 and dropping could be
/// taken meanwhile by another test's connection: a CI run failed so). Each is handed out once
/// per test process (a process asking for more than 10,000 panics). `None` where the ephemeral
/// range starts too low to leave room: then ports are picked by the kernel, racy as before.
fn quiet_port_range() -> Option<std::ops::Range<u32>> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let low: u32 = range.split_whitespace().next()?.parse().ok()?;
    (low >= 11_024).then(|| low - 10_000..low)
}

/// A port free on 127.0.0.1 for UDP and TCP (the client's DNS forwarder binds both, and so does
/// a server with its TCP carrier on its UDP port) that no other test is given: one from
/// [`quiet_port_range`] or, without one, one that the kernel picked and that was free a moment
/// ago. Should another process take it all the same, [`Client::spawn_with_dns_forward`] and
/// [`Server::start`] retry with another.
pub fn free_port() -> u16 {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    static RANGE: OnceLock<Option<std::ops::Range<u32>>> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let free = |port: u16| {
        UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port)).is_ok()
    };
    if let Some(range) = RANGE.get_or_init(quiet_port_range) {
        // Start where another test process (the musl build's, after the glibc one) is unlikely
        // to have been: at an offset taken from the process ID.
        let len = range.end - range.start;
        let start = std::process::id().wrapping_mul(101) % len;
        loop {
            let i = NEXT.fetch_add(1, Ordering::Relaxed);
            assert!(
                i < len,
                "all {len} test ports {range:?} were handed out or busy"
            );
            let port = (range.start + (start + i) % len) as u16;
            if free(port) {
                return port;
            }
        }
    }
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        drop(udp);
        if free(port) {
            return port;
        }
    }
}

/// Whether a process's log says one of its ports was taken (so a retry with another may work):
/// EADDRINUSE in glibc's words or in musl's.
pub fn port_was_taken(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("Address in use")
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let mut b = [0u8; 8];
        ostp::keys::fill_random(&mut b).unwrap();
        let d = std::env::temp_dir().join(format!("ostp-e2e-{tag}-{}", ostp::keys::to_hex(&b)));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh random access key.
pub fn new_key() -> String {
    ostp::keys::generate_key().unwrap()
}

// ----- in-process helpers: HTTP server, lossy relay, UDP echo -----

/// The `bulk_http` example server on 127.0.0.1 (runs until the test process exits).
pub fn start_http() -> u16 {
    start_http_on(Ipv4Addr::LOCALHOST)
}

/// The `bulk_http` example server on `ip` (e.g. `0.0.0.0`, for a server in a namespace).
pub fn start_http_on(ip: Ipv4Addr) -> u16 {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || bulk_http::serve(listener));
    port
}

/// Starts a `lossy_relay` towards `upstream` with the given option string (e.g.
/// `"--delay-ms 20 --loss 0.01"`); returns its listen address.
pub fn start_lossy_relay(upstream: SocketAddr, link_options: &str) -> SocketAddr {
    let text = format!("--listen 127.0.0.1:0 --upstream {upstream} {link_options}");
    let options = lossy_relay::parse_options(text.split_whitespace().map(str::to_owned)).unwrap();
    let relay = lossy_relay::Relay::bind(&options).unwrap();
    let addr = relay.local_addr().unwrap();
    std::thread::spawn(move || relay.run(None));
    addr
}

/// A UDP echo server on 127.0.0.1 answering each datagram with `echo:` + the datagram.
pub fn start_udp_echo() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65_536];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = sock.send_to(&reply, from);
        }
    });
    addr
}

/// `GET /sum/N` straight from the HTTP server (no tunnel): the expected checksum of `/bytes/N`.
pub fn expected_sum(http_port: u16, n: u64) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", http_port)).unwrap();
    write!(
        s,
        "GET /sum/{n} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let hex = text.split("fnv1a64=").nth(1).unwrap().trim();
    u64::from_str_radix(hex, 16).unwrap()
}

// ----- processes -----

/// Lines a child wrote to stderr, shared with the reader thread.
#[derive(Default)]
struct LogLines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

/// A child process whose stderr is collected; killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    log: Arc<LogLines>,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(LogLines::default());
        let log2 = log.clone();
        let tag = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{tag}] {line}");
                log2.lines.lock().unwrap().push(line);
                log2.changed.notify_all();
            }
        });
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stderr line so far, joined.
    pub fn log_text(&self) -> String {
        self.log.lines.lock().unwrap().join("\n")
    }

    /// Waits until a stderr line satisfies `pred` (looking at lines from index `from` on);
    /// returns the line and its index.
    pub fn wait_line_from(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<(usize, String)> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            if let Some((i, l)) = lines.iter().enumerate().skip(from).find(|(_, l)| pred(l)) {
                return Some((i, l.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = self
                .log
                .changed
                .wait_timeout(lines, (deadline - now).min(Duration::from_millis(200)))
                .unwrap()
                .0;
        }
    }

    pub fn wait_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        self.wait_line_from(0, timeout, pred).map(|(_, l)| l)
    }

    pub fn line_count(&self) -> usize {
        self.log.lines.lock().unwrap().len()
    }

    /// Polls for exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig} {}", self.pid());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Diagnostics for failing tests: a process that died on its own is worth knowing about.
        if let Ok(Some(status)) = self.child.try_wait() {
            eprintln!("[{}] had already exited: {status}", self.name);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ostp_command(config: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ostp"));
    cmd.arg("--config").arg(config);
    cmd.env_remove("RUST_LOG");
    cmd
}

/// Parses the address after `marker` in a log line (`... on http://127.0.0.1:1234`).
fn addr_after(line: &str, marker: &str) -> SocketAddr {
    let rest = &line[line.find(marker).unwrap() + marker.len()..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == ',')
        .unwrap_or(rest.len());
    rest[..end].parse().unwrap()
}

// ----- server -----

/// Settings of a test server.
#[derive(Clone)]
pub struct ServerSpec {
    /// Keys in config.json (`(key, limit_bytes)`).
    pub config_keys: Vec<(String, Option<u64>)>,
    pub allow_private: bool,
    pub api: bool,
    /// Extra top-level `config.json` fields (e.g. limits).
    pub extra: Value,
    /// Extra environment variables of the server process (test-only hooks).
    pub env: Vec<(String, String)>,
    /// The address the server listens on (tunnel and API; default 127.0.0.1).
    pub host: Ipv4Addr,
    /// Run inside this network namespace (`support::netns`; `host` must be one of its addresses).
    pub netns: Option<String>,
    /// Also listen on TCP (the carrier, docs/PROTOCOL.md §7) on the tunnel's port number.
    pub tcp_carrier: bool,
}

impl ServerSpec {
    pub fn new(key: &str) -> Self {
        ServerSpec {
            config_keys: vec![(key.to_string(), None)],
            allow_private: true,
            api: true,
            extra: json!({}),
            env: Vec::new(),
            host: Ipv4Addr::LOCALHOST,
            netns: None,
            tcp_carrier: false,
        }
    }
}

/// A running `ostp` server process with its temp dir (config, state file).
pub struct Server {
    pub proc: Proc,
    pub dir: TempDir,
    pub udp: SocketAddr,
    pub api: Option<SocketAddr>,
    spec: ServerSpec,
    api_port: u16,
}

const START_TIMEOUT: Duration = Duration::from_secs(20);

impl Server {
    pub fn start(spec: ServerSpec) -> Server {
        Self::try_start(spec).unwrap_or_else(|log| panic!("the server did not start:\n{log}"))
    }

    /// [`Server::start`] that returns the last attempt's log when the server does not start.
    pub fn try_start(spec: ServerSpec) -> Result<Server, String> {
        let dir = TempDir::new("server");
        // The ports we picked may be taken by the time the server binds: retry with others.
        let mut last = String::new();
        for _ in 0..5 {
            let api_port = if spec.api { free_port() } else { 0 };
            let port = free_port();
            match Self::spawn(&dir, &spec, port, api_port) {
                Ok((proc, api)) => {
                    return Ok(Server {
                        proc,
                        dir,
                        udp: SocketAddr::from((spec.host, port)),
                        api,
                        spec,
                        api_port,
                    });
                }
                Err(log) => last = log,
            }
        }
        Err(last)
    }

    fn spawn(
        dir: &TempDir,
        spec: &ServerSpec,
        udp_port: u16,
        api_port: u16,
    ) -> Result<(Proc, Option<SocketAddr>), String> {
        let keys: Vec<Value> = spec
            .config_keys
            .iter()
            .map(|(k, l)| match l {
                Some(l) => json!({"key": k, "limit_bytes": l}),
                None => json!(k),
            })
            .collect();
        let host = spec.host;
        let mut cfg = json!({
            "mode": "server",
            "listen": format!("{host}:{udp_port}"),
            "access_keys": keys,
            "api": {"enabled": spec.api, "bind": format!("{host}:{api_port}"), "token": TOKEN},
            "state_file": "state.json",
            "log_level": "info",
            "allow_private_destinations": spec.allow_private,
        });
        if spec.tcp_carrier {
            cfg["listen_tcp"] = json!(format!("{host}:{udp_port}"));
        }
        if let (Value::Object(c), Value::Object(e)) = (&mut cfg, spec.extra.clone()) {
            c.extend(e);
        }
        let path = dir.path().join("config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        let mut cmd = match &spec.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ostp"), "--config"])
                    .arg(&path)
                    .env_remove("RUST_LOG");
                cmd
            }
            None => ostp_command(&path),
        };
        cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
        let mut proc = Proc::spawn("server", cmd);
        let ready = proc.wait_line(START_TIMEOUT, |l| {
            l.contains("tunnel on udp") || l.contains("cannot listen") || l.contains("rror")
        });
        match ready {
            Some(l) if l.contains("tunnel on udp") => {}
            _ => {
                let _ = proc.wait_exit(Duration::from_millis(200));
                return Err(proc.log_text());
            }
        }
        let api = if spec.api {
            let line = proc
                .wait_line(START_TIMEOUT, |l| l.contains("management API on http://"))
                .ok_or_else(|| proc.log_text())?;
            Some(addr_after(&line, "http://"))
        } else {
            None
        };
        Ok((proc, api))
    }

    /// Starts the server again on the same ports and directory (after `stop`/`kill`).
    pub fn restart(&mut self) {
        let port = self.udp.port();
        let mut last = String::new();
        // The old socket is closed, but give the OS a few tries.
        for _ in 0..10 {
            match Self::spawn(&self.dir, &self.spec, port, self.api_port) {
                Ok((proc, api)) => {
                    self.proc = proc;
                    self.api = api;
                    return;
                }
                Err(log) => last = log,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the server did not restart:\n{last}");
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api.expect("API enabled")
    }

    /// One API request with the bearer token; returns (status, JSON body or Null).
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        api_request(self.api_addr(), method, path, body)
    }

    /// The user object of `key` from `GET /api/users`.
    pub fn user(&self, key: &str) -> Value {
        let (status, v) = self.api("GET", "/api/users", None);
        assert_eq!(status, 200, "{v}");
        v["users"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["key"] == key)
            .cloned()
            .unwrap_or_else(|| panic!("no user {key} in {v}"))
    }

    /// (bytes_up, bytes_down) of `key`.
    pub fn counters(&self, key: &str) -> (u64, u64) {
        let u = self.user(key);
        (
            u["bytes_up"].as_u64().unwrap(),
            u["bytes_down"].as_u64().unwrap(),
        )
    }

    /// Polls the counters until `pred` holds; returns the last value seen and whether it held.
    pub fn wait_counters(
        &self,
        key: &str,
        timeout: Duration,
        pred: impl Fn(u64, u64) -> bool,
    ) -> ((u64, u64), bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.counters(key);
            if pred(c.0, c.1) {
                return (c, true);
            }
            if Instant::now() >= deadline {
                return (c, false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates an API user; returns its key.
    pub fn create_user(&self, limit: Option<u64>) -> String {
        let key = new_key();
        let (status, v) = self.api(
            "POST",
            "/api/users",
            Some(json!({"key": key, "limit_bytes": limit})),
        );
        assert_eq!(status, 200, "{v}");
        key
    }

    /// (bytes_up, bytes_down) of `key` in the state on disk (snapshot + journal), if written yet.
    pub fn state_file_counters(&self, key: &str) -> Option<(u64, u64)> {
        // The snapshot plus its journal (where counter flushes go).
        let users = ostp::users::load_stored(&self.dir.path().join("state.json")).ok()?;
        let u = users.into_iter().find(|u| u.key == key)?;
        Some((u.bytes_up, u.bytes_down))
    }
}

/// A raw HTTP/1.1 request to the API.
pub fn api_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad API answer: {text:?}"));
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

// ----- client -----

/// A running `ostp` client process; `proxy` is its SOCKS5/HTTP port.
pub struct Client {
    pub proc: Proc,
    pub proxy: SocketAddr,
    _dir: TempDir,
}

impl Client {
    /// Writes a client config (with `extra` fields merged in) and starts it; waits until the
    /// proxy listens. Does not wait for the tunnel.
    pub fn spawn(server: SocketAddr, key: &str, extra: Value) -> Client {
        Self::try_spawn(server, key, extra)
            .unwrap_or_else(|log| panic!("the client did not start:\n{log}"))
    }

    /// Starts a client whose DNS forwarder (`dns_forward` with `upstream`, plus `extra`) listens
    /// on a port free for UDP and TCP; if another process takes the port before the client binds
    /// it, tries again with another. Returns the client and the forwarder's address.
    pub fn spawn_with_dns_forward(
        server: SocketAddr,
        key: &str,
        upstream: SocketAddr,
        extra: Value,
    ) -> (Client, SocketAddr) {
        let mut last = String::new();
        for _ in 0..5 {
            let forwarder = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let mut cfg = json!({
                "dns_forward": {"bind": forwarder.to_string(), "upstream": upstream.to_string()},
            });
            if let (Value::Object(c), Value::Object(e)) = (&mut cfg, extra.clone()) {
                c.extend(e);
            }
            match Self::try_spawn(server, key, cfg) {
                Ok(client) => return (client, forwarder),
                Err(log) if port_was_taken(&log) => last = log,
                Err(log) => panic!("the client did not start:\n{log}"),
            }
        }
        panic!("the client did not start (its ports were taken five times):\n{last}");
    }

    /// [`Client::spawn`] that returns the client's log when it does not start.
    pub fn try_spawn(server: SocketAddr, key: &str, extra: Value) -> Result<Client, String> {
        let dir = TempDir::new("client");
        let mut cfg = json!({
            "mode": "client",
            "server": server.to_string(),
            "access_key": key,
            "socks5_bind": "127.0.0.1:0",
        });
        if let (Value::Object(c), Value::Object(e)) = (&mut cfg, extra) {
            c.extend(e);
        }
        let path = dir.path().join("client.json");
        std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        let mut proc = Proc::spawn("client", ostp_command(&path));
        let started = |l: &str| l.contains("HTTP proxy on ");
        let Some(line) = proc.wait_line(START_TIMEOUT, |l| started(l) || port_was_taken(l)) else {
            return Err(proc.log_text());
        };
        if !started(&line) {
            // A port was taken: the client exits; hand back its whole log.
            let _ = proc.wait_exit(Duration::from_secs(5));
            return Err(proc.log_text());
        }
        let proxy = addr_after(&line, "HTTP proxy on ");
        Ok(Client {
            proc,
            proxy,
            _dir: dir,
        })
    }

    /// Starts a client and waits until its tunnel session is connected.
    pub fn start(server: SocketAddr, key: &str) -> Client {
        let c = Client::spawn(server, key, json!({}));
        c.wait_connected(0);
        c
    }

    /// Waits for a "connected" log line at or after line `from`.
    pub fn wait_connected(&self, from: usize) {
        self.proc
            .wait_line_from(from, START_TIMEOUT, |l| l.contains("connected"))
            .unwrap_or_else(|| {
                panic!(
                    "the client's tunnel did not connect:\n{}",
                    self.proc.log_text()
                )
            });
    }
}

// ----- SOCKS5 -----

/// Where a SOCKS5 request goes.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Ip(SocketAddr),
    Name(&'a str, u16),
}

/// Connects through the SOCKS5 proxy; `Err(code)` is the server's reply code (or 0xff for a
/// broken handshake).
pub fn socks5_connect(proxy: SocketAddr, target: Target) -> Result<TcpStream, u8> {
    let mut s = TcpStream::connect(proxy).map_err(|_| 0xffu8)?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(&[5, 1, 0]).map_err(|_| 0xff)?;
    let mut m = [0u8; 2];
    s.read_exact(&mut m).map_err(|_| 0xff)?;
    if m != [5, 0] {
        return Err(0xff);
    }
    let mut req = vec![5, 1, 0];
    push_socks_addr(&mut req, &target);
    s.write_all(&req).map_err(|_| 0xff)?;
    read_socks_reply(&mut s)?;
    s.set_read_timeout(None).unwrap();
    Ok(s)
}

/// The reply code for a request the server now refuses (e.g. after a policy change). A
/// destination that opened within the last minutes is answered early (before the server's
/// result): then that connection must be reset, never ended cleanly, and the next request
/// waits for the server's answer and gets the code. Panics if a connection goes through.
pub fn socks5_refused_code(proxy: SocketAddr, target: Target) -> u8 {
    for _ in 0..2 {
        let mut s = match socks5_connect(proxy, target) {
            Err(code) => return code,
            Ok(s) => s,
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("a request to a refused destination got through: {other:?}"),
        }
    }
    panic!("a refused destination was answered early twice in a row");
}

fn push_socks_addr(out: &mut Vec<u8>, target: &Target) {
    match target {
        Target::Ip(SocketAddr::V4(a)) => {
            out.push(1);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Target::Ip(SocketAddr::V6(a)) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Target::Name(n, p) => {
            out.push(3);
            out.push(n.len() as u8);
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(&p.to_be_bytes());
        }
    }
}

/// Reads a SOCKS5 reply; returns the bound address on success.
fn read_socks_reply(s: &mut TcpStream) -> Result<SocketAddr, u8> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).map_err(|_| 0xffu8)?;
    let addr = match head[3] {
        1 => {
            let mut a = [0u8; 6];
            s.read_exact(&mut a).map_err(|_| 0xffu8)?;
            SocketAddr::from(([a[0], a[1], a[2], a[3]], u16::from_be_bytes([a[4], a[5]])))
        }
        4 => {
            let mut a = [0u8; 18];
            s.read_exact(&mut a).map_err(|_| 0xffu8)?;
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&a[..16]);
            SocketAddr::from((ip, u16::from_be_bytes([a[16], a[17]])))
        }
        _ => return Err(0xff),
    };
    if head[0] != 5 || head[1] != 0 {
        return Err(head[1]);
    }
    Ok(addr)
}

/// Opens a UDP association: returns the control connection (keep it open) and the relay address.
pub fn socks5_udp_associate(proxy: SocketAddr) -> (TcpStream, SocketAddr) {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0]);
    s.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap();
    let relay = read_socks_reply(&mut s).unwrap_or_else(|c| panic!("UDP ASSOCIATE refused: {c}"));
    (s, relay)
}

/// A SOCKS5 UDP datagram (`RSV RSV FRAG ATYP ADDR PORT DATA`) to `target`.
pub fn socks5_udp_packet(target: &Target, data: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 0, 0];
    push_socks_addr(&mut p, target);
    p.extend_from_slice(data);
    p
}

/// `GET /bytes/n` over an open stream; returns (response head length, body digest, error).
pub fn http_get_bytes(s: &mut TcpStream, n: u64) -> (usize, Digest, Option<std::io::Error>) {
    let req = format!("GET /bytes/{n} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut reader = BufReader::new(s);
    let mut head_len = 0;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return (head_len, Digest::new(), None),
            Ok(n) => head_len += n,
            Err(e) => return (head_len, Digest::new(), Some(e)),
        }
        if line == "\r\n" {
            break;
        }
    }
    let (d, e) = digest_reader(&mut reader);
    (head_len, d, e)
}

/// The length of the request line `http_get_bytes` sends.
pub fn http_get_request_len(n: u64) -> usize {
    format!("GET /bytes/{n} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").len()
}

// ----- curl -----

/// Runs curl with `args`, hashing stdout; returns (digest, exit status, stderr).
pub fn curl(args: &[&str]) -> (Digest, std::process::ExitStatus, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "300"]).args(args);
    run_curl(cmd)
}

/// Runs a prepared curl command (e.g. inside a network namespace), hashing stdout; returns
/// (digest, exit status, stderr).
pub fn run_curl(mut cmd: Command) -> (Digest, std::process::ExitStatus, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl is installed");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let (d, _) = digest_reader(&mut out);
    let status = child.wait().unwrap();
    (d, status, err_thread.join().unwrap())
}

/// The local machine's address a packet to the internet would leave from, if not loopback.
pub fn non_loopback_ip() -> Option<IpAddr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified() && !ip.is_loopback()).then_some(ip)
}

/// MB/s for `bytes` in `elapsed`.
pub fn mbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

/// The `bulk_http` origin on loopback as a SOCKS5 target.
pub fn http_target(http: u16) -> Target<'static> {
    Target::Ip(SocketAddr::from(([127, 0, 0, 1], http)))
}

/// `count` parallel downloads of `/bytes/n` from the origin on port `http` through the SOCKS5
/// proxy, each checked intact (length and checksum).
pub fn parallel_downloads(proxy: SocketAddr, http: u16, count: usize, n: u64) {
    let expected = expected_sum(http, n);
    let workers: Vec<_> = (0..count)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = socks5_connect(proxy, http_target(http))
                    .unwrap_or_else(|c| panic!("download {i}: SOCKS5 reply {c:#x}"));
                let (_, digest, err) = http_get_bytes(&mut s, n);
                (i, digest, err)
            })
        })
        .collect();
    for w in workers {
        let (i, digest, err) = w.join().unwrap();
        assert!(err.is_none(), "download {i}: {err:?}");
        assert_eq!(digest.len, n, "download {i}: length");
        assert_eq!(digest.fnv, expected, "download {i}: checksum");
    }
}

/// `count` parallel uploads of `n` bytes each to the origin's `POST /upload` through SOCKS5, one
/// thread each; every one must arrive whole (the origin's byte count and checksum).
pub fn parallel_uploads(proxy: SocketAddr, http: u16, count: usize, n: usize) {
    let data: Arc<Vec<u8>> = Arc::new(
        (0..n as u64)
            .map(|i| (i.wrapping_mul(0x9E37_79B9) >> 11) as u8)
            .collect(),
    );
    let mut digest = Digest::new();
    digest.update(&data);
    let expected = format!("bytes={n} fnv1a64={:016x}\n", digest.fnv);
    let workers: Vec<_> = (0..count)
        .map(|i| {
            let data = Arc::clone(&data);
            std::thread::spawn(move || {
                let mut s = socks5_connect(proxy, http_target(http))
                    .unwrap_or_else(|c| panic!("upload {i}: SOCKS5 reply {c:#x}"));
                // A stalled tunnel fails the test instead of hanging it.
                s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(120))).unwrap();
                let sent = write!(
                    s,
                    "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
                )
                .and_then(|()| s.write_all(&data));
                let mut reply = String::new();
                let read = sent.and_then(|()| s.read_to_string(&mut reply));
                (i, reply, read.err())
            })
        })
        .collect();
    for w in workers {
        let (i, reply, err) = w.join().unwrap();
        assert!(
            reply.ends_with(&expected),
            "upload {i}: {reply:?} ({err:?})"
        );
    }
}

/// Downloads `/bytes/n` through SOCKS5, retrying until `deadline` while the tunnel is not back
/// (connect refused or cut). Returns the digest of the first complete download and how long it
/// took to get one.
pub fn download_eventually(proxy: SocketAddr, http: u16, n: u64, within: Duration) -> Duration {
    let t = Instant::now();
    let mut last = String::new();
    while t.elapsed() < within {
        match socks5_connect(proxy, http_target(http)) {
            Ok(mut s) => {
                let (_, d, e) = http_get_bytes(&mut s, n);
                if d.len == n && e.is_none() {
                    return t.elapsed();
                }
                last = format!("short download {} of {n}: {e:?}", d.len);
            }
            Err(code) => last = format!("SOCKS5 reply {code:#x}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no complete download within {within:?}; last attempt: {last}");
}

#[test]
fn ports_handed_out_are_distinct_and_below_the_ephemeral_range() {
    let Some(range) = quiet_port_range() else {
        eprintln!("the ephemeral port range starts too low here: ports are picked by the kernel");
        return;
    };
    let ports: Vec<u16> = (0..64).map(|_| free_port()).collect();
    let mut distinct = ports.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), ports.len(), "{ports:?}");
    assert!(
        ports.iter().all(|p| range.contains(&u32::from(*p))),
        "{ports:?} not in {range:?}"
    );
}
