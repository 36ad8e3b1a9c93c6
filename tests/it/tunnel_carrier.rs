//! End-to-end tests of the client's TCP carrier modes with real processes on loopback (issue 12):
//! a `uot` client moves intact bytes through SOCKS5 with UDP unusable (a bulk download and
//! upload, 100 parallel downloads, UDP ASSOCIATE datagrams); an `auto` client whose UDP
//! is dropped carries traffic over TCP within 10 s (from the start, and when UDP stops in the
//! middle of a session) and comes back to UDP once UDP is answered again, make-before-break: a
//! long-lived stream stays on its TCP session while new streams go over UDP (and, when the key
//! allows one session only, break-before-make: the TCP session is replaced once its streams end,
//! with no refusal reported as a failure). UDP is dropped by a
//! small in-test gate relay in front of the server's UDP port; the client reaches the TCP
//! carrier directly (`transport.tcp_port`).

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::tunnel::*;
use serde_json::{Value, json};

/// A UDP relay in front of the server that forwards both ways or, while `blocked`, drops
/// everything (each client address gets its own upstream socket, like a NAT).
struct Gate {
    addr: SocketAddr,
    blocked: Arc<AtomicBool>,
    /// Datagrams forwarded (either way).
    passed: Arc<AtomicU64>,
}

impl Gate {
    fn start(upstream: SocketAddr, blocked: bool) -> Gate {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = front.local_addr().unwrap();
        let gate = Gate {
            addr,
            blocked: Arc::new(AtomicBool::new(blocked)),
            passed: Arc::new(AtomicU64::new(0)),
        };
        let (blocked, passed) = (gate.blocked.clone(), gate.passed.clone());
        std::thread::spawn(move || {
            let ups: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>> = Mutex::default();
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, client)) = front.recv_from(&mut buf) {
                let up = ups
                    .lock()
                    .unwrap()
                    .entry(client)
                    .or_insert_with(|| {
                        let up = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
                        up.connect(upstream).unwrap();
                        let (up2, front2) = (up.clone(), front.try_clone().unwrap());
                        let (blocked, passed) = (blocked.clone(), passed.clone());
                        std::thread::spawn(move || {
                            let mut buf = vec![0u8; 65_536];
                            while let Ok(n) = up2.recv(&mut buf) {
                                if !blocked.load(Ordering::Relaxed) {
                                    passed.fetch_add(1, Ordering::Relaxed);
                                    let _ = front2.send_to(&buf[..n], client);
                                }
                            }
                        });
                        up
                    })
                    .clone();
                if !blocked.load(Ordering::Relaxed) {
                    passed.fetch_add(1, Ordering::Relaxed);
                    let _ = up.send(&buf[..n]);
                }
            }
        });
        gate
    }

    fn block(&self, on: bool) {
        self.blocked.store(on, Ordering::Relaxed);
    }

    fn passed(&self) -> u64 {
        self.passed.load(Ordering::Relaxed)
    }
}

/// A server listening on UDP and on TCP (the carrier on its own free port), with `extra`
/// config fields.
fn server_with_tcp_and(key: &str, extra: Value) -> (Server, SocketAddr) {
    // The TCP port picked may be taken by the time the server binds: retry with another.
    let mut last = String::new();
    for _ in 0..5 {
        let tcp = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut spec = ServerSpec::new(key);
        spec.extra = json!({ "listen_tcp": tcp.to_string() });
        if let (Value::Object(c), Value::Object(e)) = (&mut spec.extra, extra.clone()) {
            c.extend(e);
        }
        match Server::try_start(spec) {
            Ok(server) => return (server, tcp),
            Err(log) if port_was_taken(&log) => last = log,
            Err(log) => panic!("the server did not start:\n{log}"),
        }
    }
    panic!("the server did not start (its ports were taken five times):\n{last}");
}

/// A server listening on UDP and on TCP (the carrier on its own free port).
fn server_with_tcp(key: &str) -> (Server, SocketAddr) {
    server_with_tcp_and(key, json!({}))
}

/// A client whose UDP goes to `udp` and whose TCP carrier is `tcp`, in `mode`.
fn client(udp: SocketAddr, tcp: SocketAddr, key: &str, mode: &str) -> Client {
    let transport = json!({ "mode": mode, "tcp_port": tcp.port() });
    Client::spawn(udp, key, json!({ "transport": transport }))
}

fn connected_over_tcp(l: &str) -> bool {
    l.contains("connected") && l.contains("over the TCP carrier")
}

/// Downloads `/bytes/n` with curl through the SOCKS5 port and checks length and checksum.
fn curl_socks5(proxy: SocketAddr, http: u16, n: u64) {
    let url = format!("http://127.0.0.1:{http}/bytes/{n}");
    let proxy = proxy.to_string();
    let t = Instant::now();
    let (d, status, err) = curl(&["-f", "--socks5-hostname", &proxy, &url]);
    assert!(status.success(), "curl failed ({status}): {err}");
    assert_eq!(d.len, n, "length");
    assert_eq!(d.fnv, expected_sum(http, n), "checksum");
    eprintln!("TCP carrier: {n} bytes in {:.2?}", t.elapsed());
}

#[test]
fn uot_client_moves_intact_bytes_through_socks5_without_udp() {
    let _heavy = heavy_lock();
    let http = start_http();
    let key = new_key();
    let (server, tcp) = server_with_tcp(&key);
    let (_, sub) = server.api("GET", &format!("/api/subscribe/{key}"), None);
    assert_eq!(
        sub["data"]["transport"],
        json!({ "mode": "auto", "tcp_port": tcp.port() }),
        "a TCP port other than the UDP one is handed out"
    );
    // The client's UDP side points at a socket that never answers: only TCP can carry this.
    let (c, _blackhole) = uot_client(&key, tcp);
    let n = size(200_000_000, 20_000_000);
    curl_socks5(c.proxy, http, n);
    // The same through the HTTP proxy (absolute-URI request, then CONNECT).
    let m = size(50_000_000, 5_000_000);
    for how in [&["-x"][..], &["-p", "-x"][..]] {
        let url = format!("http://127.0.0.1:{http}/bytes/{m}");
        let proxy = format!("http://{}", c.proxy);
        let mut args: Vec<&str> = vec!["-f", "--noproxy", ""];
        args.extend_from_slice(&how[..how.len() - 1]);
        args.extend([how[how.len() - 1], proxy.as_str(), url.as_str()]);
        let (d, status, err) = curl(&args);
        assert!(status.success(), "curl {how:?} failed ({status}): {err}");
        assert_eq!((d.len, d.fnv), (m, expected_sum(http, m)), "{how:?}");
    }
    // Upload: the HTTP server answers an uploaded body with its length and checksum.
    let up = size(50_000_000, 5_000_000);
    let mut s = socks5_connect(c.proxy, http_target(http)).unwrap();
    let body: Vec<u8> = (0..up).map(|i| (i * 7 % 251) as u8).collect();
    write!(
        s,
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {up}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s.write_all(&body).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer).unwrap();
    let mut d = Digest::new();
    d.update(&body);
    assert!(
        answer.contains(&format!("{:016x}", d.fnv)),
        "upload checksum missing in {answer:?}"
    );
    // Counted like UDP sessions.
    let ((bytes_up, bytes_down), ok) =
        server.wait_counters(&key, Duration::from_secs(5), |u, d| {
            u >= up && d >= n + 2 * m
        });
    assert!(ok, "counters {bytes_up} up, {bytes_down} down");
    assert!(
        !c.proc.log_text().contains("new sessions use"),
        "uot never switches"
    );
}

/// A `uot` client (its UDP side pointed at a socket that never answers) connected over TCP.
fn uot_client(key: &str, tcp: SocketAddr) -> (Client, UdpSocket) {
    let blackhole = UdpSocket::bind("127.0.0.1:0").unwrap();
    let c = client(blackhole.local_addr().unwrap(), tcp, key, "uot");
    c.proc
        .wait_line(Duration::from_secs(20), connected_over_tcp)
        .unwrap_or_else(|| panic!("no TCP session:\n{}", c.proc.log_text()));
    (c, blackhole)
}

#[test]
fn uot_hundred_parallel_downloads_are_intact() {
    let _heavy = heavy_lock();
    let http = start_http();
    let key = new_key();
    let (_server, tcp) = server_with_tcp(&key);
    let (c, _blackhole) = uot_client(&key, tcp);
    let n = size(2_000_000, 300_000);
    let proxy = c.proxy;
    parallel_downloads(proxy, http, 100, n);
}

#[test]
fn uot_reaches_the_same_port_and_carries_udp_associate_datagrams() {
    let echo = start_udp_echo();
    let key = new_key();
    // The server listens on TCP on its UDP port number; the client has no `tcp_port`.
    let mut spec = ServerSpec::new(&key);
    spec.tcp_carrier = true;
    let server = Server::start(spec);
    // The subscribe answer offers both carriers and hands out auto (same port: no tcp_port).
    let (status, sub) = server.api("GET", &format!("/api/subscribe/{key}"), None);
    assert_eq!(status, 200, "{sub}");
    assert_eq!(sub["carriers"], json!(["udp", "tcp"]));
    assert_eq!(sub["data"]["transport"], json!({ "mode": "auto" }));
    let transport = json!({ "transport": { "mode": "uot" } });
    let c = Client::spawn(server.udp, &key, transport);
    c.proc
        .wait_line(Duration::from_secs(20), |l| {
            connected_over_tcp(l) && l.contains(&format!("({})", server.udp))
        })
        .unwrap_or_else(|| panic!("no TCP session on the same port:\n{}", c.proc.log_text()));
    let (_control, relay) = socks5_udp_associate(c.proxy);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let payload = b"ping over the TCP carrier";
    let packet = socks5_udp_packet(&Target::Ip(echo), payload);
    let mut answer = None;
    for _ in 0..10 {
        sock.send_to(&packet, relay).unwrap();
        let mut buf = [0u8; 2048];
        if let Ok((len, _)) = sock.recv_from(&mut buf) {
            answer = Some(buf[..len].to_vec());
            break;
        }
    }
    let answer = answer.expect("no UDP answer through the TCP carrier");
    let header = socks5_udp_packet(&Target::Ip(echo), b"");
    assert_eq!(&answer[header.len()..], [&b"echo:"[..], payload].concat());
}

/// Traffic through the proxy within `within`, or panic.
fn traffic_within(proxy: SocketAddr, http: u16, within: Duration) -> Duration {
    download_eventually(proxy, http, 100_000, within)
}

#[test]
fn auto_starts_on_tcp_within_10_s_when_udp_is_dropped() {
    let _heavy = heavy_lock();
    let http = start_http();
    let key = new_key();
    let (server, tcp) = server_with_tcp(&key);
    let gate = Gate::start(server.udp, true);
    let t = Instant::now();
    let c = client(gate.addr, tcp, &key, "auto");
    let took = traffic_within(c.proxy, http, Duration::from_secs(10));
    eprintln!(
        "auto, UDP dropped: first download after {:.2?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{took:?}");
    let log = c.proc.log_text();
    assert!(
        log.contains("no answer over UDP; new sessions use the TCP carrier"),
        "{log}"
    );
    assert!(log.lines().any(connected_over_tcp), "{log}");
}

fn udp_session_line(l: &str) -> bool {
    l.contains("connected") && !l.contains("TCP carrier")
}

#[test]
fn auto_moves_to_tcp_when_udp_stops_and_back_when_it_returns() {
    let _heavy = heavy_lock();
    let http = start_http();
    let key = new_key();
    let (server, tcp) = server_with_tcp(&key);
    let gate = Gate::start(server.udp, false);
    let c = client(gate.addr, tcp, &key, "auto");
    c.proc
        .wait_line(Duration::from_secs(20), udp_session_line)
        .unwrap_or_else(|| panic!("no UDP session:\n{}", c.proc.log_text()));
    traffic_within(c.proxy, http, Duration::from_secs(10));
    assert!(gate.passed() > 0);

    // UDP stops in the middle of the session: traffic over TCP within 10 s.
    let from = c.proc.line_count();
    gate.block(true);
    let t = Instant::now();
    traffic_within(c.proxy, http, Duration::from_secs(20));
    let took = t.elapsed();
    eprintln!("auto, UDP stopped mid-session: traffic again after {took:.2?}");
    assert!(
        took < Duration::from_secs(10),
        "{took:?}\n{}",
        c.proc.log_text()
    );
    c.proc
        .wait_line_from(from, Duration::from_secs(1), connected_over_tcp)
        .unwrap_or_else(|| panic!("not over TCP:\n{}", c.proc.log_text()));

    // UDP returns once the immediate probe of the switch has given up (5 s): a later probe,
    // on its timer, finds it and the idle TCP session is replaced by a UDP one.
    // (The switch came about 7 s after the block; its probe gave up 5 s later.)
    std::thread::sleep((t + Duration::from_secs(14)).saturating_duration_since(Instant::now()));
    let from = c.proc.line_count();
    gate.block(false);
    // The retired TCP session had no streams: a UDP session replaces it (logged at info: the
    // carrier changed) and carries the traffic.
    back_on_udp(&c, &gate, http, from);
}

/// Waits (from log line `from`) for `auto`'s move back to UDP and a UDP session after it, then
/// checks that a new download goes over UDP (through `gate`).
fn back_on_udp(c: &Client, gate: &Gate, http: u16, from: usize) {
    let (back, _) = c
        .proc
        .wait_line_from(from, Duration::from_secs(45), |l| {
            l.contains("UDP is answered again; new sessions use UDP")
        })
        .unwrap_or_else(|| panic!("never back on UDP:\n{}", c.proc.log_text()));
    c.proc
        .wait_line_from(back, Duration::from_secs(10), udp_session_line)
        .unwrap_or_else(|| panic!("no UDP session after the probe:\n{}", c.proc.log_text()));
    let before = gate.passed();
    traffic_within(c.proxy, http, Duration::from_secs(10));
    assert!(
        gate.passed() > before + 50,
        "new streams did not go over UDP"
    );
}

/// Writes `msg` on `s` and reads the same bytes back.
fn echo_round(s: &mut std::net::TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    std::io::Read::read_exact(s, &mut back).unwrap();
    assert_eq!(back, msg);
}

#[test]
fn auto_moves_new_streams_back_to_udp_while_a_long_stream_stays_on_tcp() {
    let _heavy = heavy_lock();
    let http = start_http();
    let echo = crate::client_hardening::start_tcp_echo();
    let key = new_key();
    let (server, tcp) = server_with_tcp(&key);
    let gate = Gate::start(server.udp, true);
    let c = client(gate.addr, tcp, &key, "auto");
    c.proc
        .wait_line(Duration::from_secs(20), connected_over_tcp)
        .unwrap_or_else(|| panic!("not over TCP:\n{}", c.proc.log_text()));
    // A long-lived stream (a websocket, a download) opened over TCP.
    let mut long = socks5_connect(c.proxy, Target::Ip(echo)).unwrap();
    echo_round(&mut long, b"before the move");
    crate::tcp_carrier::wait_metric(&server, r#"ostp_tcp_connections{state="carrier"} 1"#);

    // UDP returns: the probe 30 s after the TCP session came up finds it.
    let from = c.proc.line_count();
    gate.block(false);
    // A UDP session comes up beside the TCP one, which keeps the long stream, and takes the
    // new streams.
    back_on_udp(&c, &gate, http, from);
    echo_round(&mut long, b"after the move, still on the TCP session");
    crate::tcp_carrier::wait_metric(&server, r#"ostp_tcp_connections{state="carrier"} 1"#);
    // Its last stream gone, the TCP session closes; traffic stays on UDP.
    drop(long);
    crate::tcp_carrier::wait_metric(&server, r#"ostp_tcp_connections{state="carrier"} 0"#);
    let before = gate.passed();
    traffic_within(c.proxy, http, Duration::from_secs(10));
    assert!(gate.passed() > before + 50, "traffic left UDP");
    assert!(
        c.proc
            .log_text()
            .lines()
            .filter(|l| l.contains("no answer over UDP"))
            .count()
            == 1,
        "the client moved to TCP again:\n{}",
        c.proc.log_text()
    );
}

/// The subscribe endpoint's `text/plain` answer (the share link), asked with `Host: 127.0.0.1`.
fn subscribe_link(server: &Server, key: &str) -> String {
    let mut s = std::net::TcpStream::connect(server.api_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /api/subscribe/{key} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text).unwrap();
    let (_, body) = text.split_once("\r\n\r\n").expect("a response");
    body.trim().to_string()
}

#[test]
fn a_subscribed_share_link_carries_another_tcp_port_and_runs_auto_over_it() {
    let _heavy = heavy_lock();
    let http = start_http();
    let key = new_key();
    let (server, tcp) = server_with_tcp(&key);
    let link = subscribe_link(&server, &key);
    let udp = server.udp.port();
    assert_eq!(
        link,
        format!("ostp://{key}@127.0.0.1:{udp}?tcp_port={}", tcp.port())
    );
    // The link's UDP address behind a gate that drops everything: only the link's TCP port works.
    let gate = Gate::start(server.udp, true);
    let link = link.replace(&format!("127.0.0.1:{udp}"), &gate.addr.to_string());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ostp"));
    cmd.arg(&link)
        .args(["--socks5-bind", "127.0.0.1:0"])
        .env_remove("RUST_LOG");
    let p = Proc::spawn("client", cmd);
    let line = p
        .wait_line(Duration::from_secs(10), |l| l.contains("transport auto"))
        .unwrap_or_else(|| panic!("not in auto mode:\n{}", p.log_text()));
    let proxy: SocketAddr = line
        .split("HTTP proxy on ")
        .nth(1)
        .and_then(|r| r.split([',', ' ']).next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no proxy address in {line:?}"));
    traffic_within(proxy, http, Duration::from_secs(10));
    p.wait_line(Duration::from_secs(1), |l| {
        connected_over_tcp(l) && l.contains(&format!("({tcp})"))
    })
    .unwrap_or_else(|| panic!("not over the link's TCP port:\n{}", p.log_text()));
}

#[test]
fn auto_moves_back_to_udp_break_before_make_when_the_key_allows_one_session() {
    let _heavy = heavy_lock();
    let http = start_http();
    let echo = crate::client_hardening::start_tcp_echo();
    let key = new_key();
    let (server, tcp) = server_with_tcp_and(&key, json!({ "max_sessions_per_user": 1 }));
    let gate = Gate::start(server.udp, true);
    let c = client(gate.addr, tcp, &key, "auto");
    c.proc
        .wait_line(Duration::from_secs(20), connected_over_tcp)
        .unwrap_or_else(|| panic!("not over TCP:\n{}", c.proc.log_text()));
    let mut long = socks5_connect(c.proxy, Target::Ip(echo)).unwrap();
    echo_round(&mut long, b"before the move");

    // UDP returns: the session beside the TCP one is refused (one session per key), so the
    // move waits for the long stream; meanwhile new streams still work over TCP.
    let from = c.proc.line_count();
    gate.block(false);
    let (back, _) = c
        .proc
        .wait_line_from(from, Duration::from_secs(45), |l| {
            l.contains("UDP is answered again; new sessions use UDP")
        })
        .unwrap_or_else(|| panic!("never back on UDP:\n{}", c.proc.log_text()));
    traffic_within(c.proxy, http, Duration::from_secs(5));
    c.proc
        .wait_line_from(back, Duration::from_secs(20), |l| {
            l.contains("the server allows no second session now")
        })
        .unwrap_or_else(|| panic!("the refusal was not reported:\n{}", c.proc.log_text()));
    let log = c.proc.log_text();
    let after: Vec<&str> = log.lines().skip(back).collect();
    assert!(
        !after
            .iter()
            .any(|l| l.contains("the server refused this key")),
        "the refused second session was reported as a failure:\n{log}"
    );
    echo_round(&mut long, b"after the refusal, still on the TCP session");
    // Its last stream gone, the TCP session is replaced by a UDP one that carries new traffic.
    let from = c.proc.line_count();
    drop(long);
    c.proc
        .wait_line_from(from, Duration::from_secs(10), udp_session_line)
        .unwrap_or_else(|| panic!("no UDP session:\n{}", c.proc.log_text()));
    let before = gate.passed();
    traffic_within(c.proxy, http, Duration::from_secs(10));
    assert!(
        gate.passed() > before + 50,
        "new streams did not go over UDP"
    );
    crate::tcp_carrier::wait_metric(&server, r#"ostp_tcp_connections{state="carrier"} 0"#);
    // Not a failure: no refusal reported as an error, no backoff, no move back to TCP.
    let log = c.proc.log_text();
    assert!(!log.contains("the server refused this key"), "{log}");
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("no answer over UDP"))
            .count(),
        1,
        "{log}"
    );
}
