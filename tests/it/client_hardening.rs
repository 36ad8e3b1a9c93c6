//! The client's local proxy is safe to expose: `--subscribe` never takes the local bind from the
//! answer, a non-loopback bind needs credentials (or an explicit, warned-about open proxy),
//! SOCKS5 username/password and HTTP Basic auth work with curl and `requests[socks]`, idle local
//! connections are closed, and SOCKS5 UDP associations only see their own datagrams.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::tunnel::*;
use serde_json::json;

fn ostp() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ostp"));
    cmd.env_remove("RUST_LOG");
    cmd
}

/// A one-shot "panel" answering the first request with `body` (as a subscribe endpoint would).
fn fake_panel(body: String) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

#[test]
fn subscribe_answer_cannot_open_the_proxy_to_the_network() {
    let key = new_key();
    let evil_port = free_port();
    let body = json!({
        "ok": true,
        "data": {
            "mode": "client",
            "server": format!("127.0.0.1:{}", free_port()),
            "access_key": key,
            "socks5_bind": format!("0.0.0.0:{evil_port}"),
            "allow_open_proxy": true,
        }
    })
    .to_string();
    let panel = fake_panel(body);
    let client = Proc::spawn("client", {
        let mut c = ostp();
        c.arg("--subscribe")
            .arg(format!("http://{panel}/api/subscribe/{key}"));
        c
    });
    // The default bind (or, if another process holds 1088, the attempt to bind it).
    let line = client
        .wait_line(Duration::from_secs(20), |l| {
            l.contains("HTTP proxy on ") || l.contains("cannot listen on")
        })
        .unwrap_or_else(|| panic!("the client did not start:\n{}", client.log_text()));
    assert!(
        line.contains("127.0.0.1:1088"),
        "the subscribe answer chose the local bind: {line}"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", evil_port)).is_err(),
        "something listens on the answer's port"
    );
}

/// Writes a client config with `extra` merged in and starts `ostp --config` on it.
fn spawn_client_config(dir: &TempDir, server: SocketAddr, extra: serde_json::Value) -> Proc {
    let mut cfg = json!({
        "mode": "client",
        "server": server.to_string(),
        "access_key": new_key(),
        "socks5_bind": "0.0.0.0:0",
    });
    if let (serde_json::Value::Object(c), serde_json::Value::Object(e)) = (&mut cfg, extra) {
        c.extend(e);
    }
    let path = dir.path().join("client.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let mut cmd = ostp();
    cmd.arg("--config").arg(&path);
    Proc::spawn("client", cmd)
}

#[test]
fn a_non_loopback_proxy_needs_credentials_or_an_explicit_open_flag() {
    let dir = TempDir::new("open-proxy");
    let server = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // No credentials: refuses to start, saying why and what to do.
    let mut refused = spawn_client_config(&dir, server, json!({}));
    let status = refused
        .wait_exit(Duration::from_secs(20))
        .expect("a client with an open non-loopback proxy must refuse to start");
    assert!(!status.success());
    // The log reader may still be draining the exited process's stderr: wait for the line.
    let line = refused.wait_line(Duration::from_secs(5), |l| l.contains("refusing to start"));
    assert!(
        line.is_some_and(|l| l.contains("socks5_auth")),
        "{}",
        refused.log_text()
    );
    // Explicit flag: starts, with a loud warning.
    let open = spawn_client_config(&dir, server, json!({"allow_open_proxy": true}));
    open.wait_line(Duration::from_secs(20), |l| l.contains("HTTP proxy on "))
        .unwrap_or_else(|| panic!("did not start:\n{}", open.log_text()));
    assert!(
        open.log_text().contains("OPEN PROXY"),
        "{}",
        open.log_text()
    );
    // Credentials: starts, no warning.
    let authed = spawn_client_config(
        &dir,
        server,
        json!({"socks5_auth": {"username": "u", "password": "p"}}),
    );
    authed
        .wait_line(Duration::from_secs(20), |l| l.contains("HTTP proxy on "))
        .unwrap_or_else(|| panic!("did not start:\n{}", authed.log_text()));
    assert!(!authed.log_text().contains("OPEN PROXY"));
}

const USER: &str = "alice";
const PASS: &str = "s3cret:pw";

/// Server + connected client whose proxy asks for `USER`/`PASS`.
fn authed_setup() -> (Server, Client) {
    let key = new_key();
    let server = Server::start(ServerSpec::new(&key));
    let client = Client::spawn(
        server.udp,
        &key,
        json!({"socks5_auth": {"username": USER, "password": PASS}}),
    );
    client.wait_connected(0);
    (server, client)
}

fn curl_ok(args: &[&str], url: &str, n: u64, http_port: u16, what: &str) {
    let mut all = vec!["-f", "--noproxy", ""];
    all.extend_from_slice(args);
    all.push(url);
    let (digest, status, err) = curl(&all);
    assert!(status.success(), "{what}: curl failed ({status}): {err}");
    assert_eq!(digest.len, n, "{what}: length");
    assert_eq!(digest.fnv, expected_sum(http_port, n), "{what}: checksum");
}

fn curl_refused(args: &[&str], url: &str, what: &str) {
    let mut all = vec!["-f", "--noproxy", ""];
    all.extend_from_slice(args);
    all.push(url);
    let (digest, status, _) = curl(&all);
    assert!(
        !status.success(),
        "{what}: curl succeeded without valid credentials"
    );
    assert_eq!(digest.len, 0, "{what}: got data");
}

#[test]
fn proxy_credentials_work_with_curl_and_wrong_ones_are_refused() {
    let (_server, client) = authed_setup();
    let http_port = start_http();
    let n = 100_000;
    let url = format!("http://127.0.0.1:{http_port}/bytes/{n}");
    let p = client.proxy;
    let good_socks = format!("{USER}:{PASS}@{p}");
    let good_http = format!("http://{USER}:{}@{p}", PASS.replace(':', "%3A"));
    curl_ok(
        &["--socks5-hostname", &good_socks],
        &url,
        n,
        http_port,
        "socks5",
    );
    curl_ok(&["-x", &good_http], &url, n, http_port, "http forward");
    curl_ok(
        &["-p", "-x", &good_http],
        &url,
        n,
        http_port,
        "http connect",
    );
    let bad_socks = format!("{USER}:wrong@{p}");
    let bad_http = format!("http://{USER}:wrong@{p}");
    let none_http = format!("http://{p}");
    curl_refused(&["--socks5-hostname", &bad_socks], &url, "socks5 wrong");
    curl_refused(&["--socks5-hostname", &p.to_string()], &url, "socks5 none");
    curl_refused(&["-x", &bad_http], &url, "http wrong");
    curl_refused(&["-x", &none_http], &url, "http none");
    curl_refused(&["-p", "-x", &bad_http], &url, "http connect wrong");
    // A raw HTTP client without credentials is told how to authenticate.
    let mut s = TcpStream::connect(p).unwrap();
    s.write_all(b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 407 "), "{reply}");
    assert!(reply.contains("Proxy-Authenticate: Basic"), "{reply}");
}

#[test]
fn proxy_credentials_work_with_python_requests_socks() {
    let ok = Command::new("python3")
        .args(["-c", "import socks, requests"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 with requests and PySocks is required (pip install PySocks)"
    );
    let (_server, client) = authed_setup();
    let http_port = start_http();
    let script = r#"
import sys, requests
url, proxy = sys.argv[1], sys.argv[2]
try:
    r = requests.get(url, proxies={"http": proxy}, timeout=60)
    print(r.status_code, len(r.content))
except Exception as e:
    print("error", type(e).__name__)
"#;
    let run = |proxy: String| {
        let out = Command::new("python3")
            .args(["-c", script])
            .arg(format!("http://127.0.0.1:{http_port}/bytes/5000"))
            .arg(proxy)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let p = client.proxy;
    let pass = PASS.replace(':', "%3A");
    assert_eq!(run(format!("socks5h://{USER}:{pass}@{p}")), "200 5000");
    let wrong = run(format!("socks5h://{USER}:nope@{p}"));
    assert!(wrong.starts_with("error"), "wrong credentials: {wrong}");
}

/// UDP ASSOCIATE with DST hint `hint`; returns the control connection and the relay address.
fn associate(proxy: SocketAddr, hint: SocketAddr) -> (TcpStream, SocketAddr) {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0]);
    let SocketAddr::V4(h) = hint else {
        panic!("IPv4 hint")
    };
    let mut req = vec![5, 3, 0, 1];
    req.extend_from_slice(&h.ip().octets());
    req.extend_from_slice(&h.port().to_be_bytes());
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..4], &[5, 0, 0, 1], "UDP ASSOCIATE refused");
    let relay = SocketAddr::from((
        [reply[4], reply[5], reply[6], reply[7]],
        u16::from_be_bytes([reply[8], reply[9]]),
    ));
    (s, relay)
}

fn udp_socket(ip: &str) -> UdpSocket {
    let s = UdpSocket::bind((ip, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

/// Every payload (after the SOCKS5 UDP header to `echo`) that arrives on `sock` until quiet.
fn answers(sock: &UdpSocket, echo: SocketAddr) -> Vec<String> {
    let header = socks5_udp_packet(&Target::Ip(echo), b"").len();
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[header.min(n)..n]).into_owned());
    }
    out
}

/// [`answers`], waiting up to 5 s for the first one (a new association's first datagram makes
/// a whole tunnel round trip, which a loaded machine may not finish in one quiet window).
fn awaited_answers(sock: &UdpSocket, echo: SocketAddr) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = answers(sock, echo);
        if !got.is_empty() || Instant::now() >= deadline {
            return got;
        }
    }
}

#[test]
fn udp_associations_only_see_their_own_datagrams() {
    let key = new_key();
    let server = Server::start(ServerSpec::new(&key));
    let client = Client::start(server.udp, &key);
    let echo = start_udp_echo();
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    // Two applications, each with its own association, asking the same "resolver".
    let (_ca, relay_a) = associate(client.proxy, any);
    let (_cb, relay_b) = associate(client.proxy, any);
    let (a, b) = (udp_socket("127.0.0.1"), udp_socket("127.0.0.1"));
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    for i in 0..20 {
        let pa = socks5_udp_packet(&Target::Ip(echo), format!("A{i}").as_bytes());
        let pb = socks5_udp_packet(&Target::Ip(echo), format!("B{i}").as_bytes());
        a.send_to(&pa, relay_a).unwrap();
        b.send_to(&pb, relay_b).unwrap();
        got_a.extend(answers(&a, echo));
        got_b.extend(answers(&b, echo));
    }
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "{got_a:?} {got_b:?}"
    );
    assert!(
        got_a.iter().all(|m| m.starts_with("echo:A")),
        "A got {got_a:?}"
    );
    assert!(
        got_b.iter().all(|m| m.starts_with("echo:B")),
        "B got {got_b:?}"
    );

    // A third socket on the same host cannot use A's association, nor read its answers.
    let c = udp_socket("127.0.0.1");
    let pc = socks5_udp_packet(&Target::Ip(echo), b"C");
    for _ in 0..5 {
        c.send_to(&pc, relay_a).unwrap();
    }
    assert!(answers(&c, echo).is_empty());
    // Late echoes of the A round must not be taken for the answer to A-again.
    let late = answers(&a, echo);
    assert!(late.iter().all(|m| m.starts_with("echo:A")), "{late:?}");
    a.send_to(&socks5_udp_packet(&Target::Ip(echo), b"A-again"), relay_a)
        .unwrap();
    let again = awaited_answers(&a, echo);
    assert!(!again.is_empty(), "A's association stopped answering");
    assert!(again.iter().all(|m| m == "echo:A-again"), "{again:?}");

    // An association whose request named its source port accepts only that port, even before
    // its owner sent anything.
    let d = udp_socket("127.0.0.1");
    let (_cd, relay_d) = associate(client.proxy, d.local_addr().unwrap());
    let intruder = udp_socket("127.0.0.1");
    intruder.send_to(&pc, relay_d).unwrap();
    assert!(answers(&intruder, echo).is_empty(), "the hint was ignored");
    d.send_to(&socks5_udp_packet(&Target::Ip(echo), b"D"), relay_d)
        .unwrap();
    let got_d = awaited_answers(&d, echo);
    assert_eq!(got_d, vec!["echo:D".to_string()]);
}

#[test]
fn lan_clients_can_use_udp_associations() {
    let Some(lan_ip) = non_loopback_ip() else {
        eprintln!("no non-loopback address on this machine: the LAN UDP case cannot be run here");
        return;
    };
    let key = new_key();
    let server = Server::start(ServerSpec::new(&key));
    let client = Client::spawn(
        server.udp,
        &key,
        json!({"socks5_bind": "0.0.0.0:0", "allow_open_proxy": true}),
    );
    client.wait_connected(0);
    let echo = start_udp_echo();
    let proxy = SocketAddr::new(lan_ip, client.proxy.port());
    let (_control, relay) = associate(proxy, "0.0.0.0:0".parse().unwrap());
    assert_eq!(
        relay.ip(),
        lan_ip,
        "the relay address must be reachable from the LAN"
    );
    let s = udp_socket(&lan_ip.to_string());
    let mut got = Vec::new();
    for _ in 0..5 {
        s.send_to(&socks5_udp_packet(&Target::Ip(echo), b"lan"), relay)
            .unwrap();
        got = answers(&s, echo);
        if !got.is_empty() {
            break;
        }
    }
    assert_eq!(got.first().map(String::as_str), Some("echo:lan"));
}

#[test]
fn a_local_connection_that_sends_no_complete_request_is_closed() {
    // No tunnel needed: the request never completes.
    let server = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let client = Client::spawn(server, &new_key(), json!({}));
    let proxy = client.proxy;
    let silent = TcpStream::connect(proxy).unwrap();
    let mut half = TcpStream::connect(proxy).unwrap();
    half.write_all(&[5, 1, 0]).unwrap(); // greeting, then nothing
    let t = Instant::now();
    for mut s in [silent, half] {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 16];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {} // the method selection
            }
        }
    }
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(20),
        "closed after {waited:?}, expected ~10 s"
    );
}

#[test]
fn one_lan_address_cannot_take_every_local_connection() {
    let Some(lan_ip) = non_loopback_ip() else {
        eprintln!(
            "no non-loopback address on this machine: the per-address cap cannot be run here"
        );
        return;
    };
    let server = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let client = Client::spawn(
        server,
        &new_key(),
        json!({"socks5_bind": "0.0.0.0:0", "allow_open_proxy": true}),
    );
    let port = client.proxy.port();
    let greet = |addr: SocketAddr| -> bool {
        let Ok(mut s) = TcpStream::connect(addr) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut m = [0u8; 2];
        s.write_all(&[5, 1, 0]).is_ok() && s.read_exact(&mut m).is_ok() && m == [5, 0]
    };
    // 256 idle connections from one LAN address are accepted (they last until the 10 s
    // request deadline; each sends the first byte of a greeting, since the proxy port hands a
    // connection over only with its first bytes)...
    let held: Vec<TcpStream> = (0..256)
        .map(|_| {
            let mut s = TcpStream::connect((lan_ip, port)).unwrap();
            s.write_all(&[5]).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // ...the next one from that address is closed at once, while loopback is still served.
    assert!(
        !greet(SocketAddr::new(lan_ip, port)),
        "the 257th was served"
    );
    assert!(greet(SocketAddr::from(([127, 0, 0, 1], port))));
    drop(held);
}

/// A TCP echo server on loopback (one thread per connection, for the test's lifetime).
pub(crate) fn start_tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Issue 8: idle local connections time out (4,096 idle ones used to lock everyone out). With
/// `local_idle_timeout_secs: 2` a piping connection that moves nothing is closed 2–3 s after its
/// last byte, while one that keeps talking stays open; the connection slot is given back.
#[test]
fn idle_local_connections_are_closed_and_busy_ones_are_kept() {
    let key = new_key();
    let server = Server::start(ServerSpec::new(&key));
    let client = Client::spawn(server.udp, &key, json!({"local_idle_timeout_secs": 2}));
    client.wait_connected(0);
    let echo = start_tcp_echo();
    let open = || {
        let mut s = socks5_connect(client.proxy, Target::Ip(echo)).expect("CONNECT");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 5];
        s.write_all(b"hello").unwrap();
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hello", "the connection pipes");
        s
    };
    let mut idle = open();
    let idle_since = Instant::now();
    let busy = open();
    // The busy one talks every 400 ms from another thread for 5 s (past two idle timeouts).
    let talker = std::thread::spawn(move || {
        let mut s = busy;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            let mut b = [0u8; 4];
            s.write_all(b"ping").unwrap();
            s.read_exact(&mut b)
                .expect("the busy connection was closed");
            std::thread::sleep(Duration::from_millis(400));
        }
    });
    let mut b = [0u8; 1];
    let closed = match idle.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    let after = idle_since.elapsed();
    assert!(closed, "the idle connection was not closed");
    assert!(
        after >= Duration::from_secs(2) && after < Duration::from_secs(5),
        "closed {after:?} after its last byte, expected 2–3 s"
    );
    talker.join().expect("the busy connection stayed open");
}
