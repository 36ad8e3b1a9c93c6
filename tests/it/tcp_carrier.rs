//! The server's TCP carrier port against strangers (docs/PROTOCOL.md §7.2), with a real `ostp`
//! server process on loopback: probes (random bytes, an HTTP request, a TLS ClientHello) get no
//! byte from ostp and are not closed within the first second without a fallback, and get exactly
//! what the fallback website sends with one; idle unauthenticated connections are bounded (the
//! oldest closed with a FIN) and never stop new connections being accepted.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::tunnel::*;

/// A server with a TCP carrier listener (and `extra` config fields); its TCP address.
fn tcp_server(extra: Value) -> (Server, SocketAddr) {
    let key = new_key();
    let port = free_tcp_port();
    let mut spec = ServerSpec::new(&key);
    let mut extra = extra;
    extra["listen_tcp"] = json!(format!("127.0.0.1:{port}"));
    spec.extra = extra;
    let server = Server::start(spec);
    (server, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// 300 pseudo-random bytes (no `\r\n\r\n` in them, so the test fallback reads to the end).
fn random_probe() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..300)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match (x >> 24) as u8 {
                b'\r' => 0,
                b => b,
            }
        })
        .collect()
}

fn http_probe() -> Vec<u8> {
    b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: probe/1.0\r\nAccept: */*\r\n\r\n".to_vec()
}

/// A TLS 1.3 ClientHello record for `example.com`, built by hand.
fn tls_client_hello() -> Vec<u8> {
    fn with_len16(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }
    let mut ext = Vec::new();
    // server_name
    let name = b"example.com";
    let mut sni = vec![0u8];
    sni.extend(with_len16(name));
    ext.extend([0x00, 0x00]);
    ext.extend(with_len16(&with_len16(&sni)));
    // supported_versions: TLS 1.3, 1.2
    ext.extend([0x00, 0x2b, 0x00, 0x05, 0x04, 0x03, 0x04, 0x03, 0x03]);
    // supported_groups: x25519
    ext.extend([0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d]);
    // key_share: x25519 with 32 bytes
    let mut share = vec![0x00, 0x1d, 0x00, 0x20];
    share.extend([0x42u8; 32]);
    ext.extend([0x00, 0x33]);
    ext.extend(with_len16(&with_len16(&share)));
    let mut hello = vec![0x03, 0x03];
    hello.extend([0x17u8; 32]); // random
    hello.push(32);
    hello.extend([0x99u8; 32]); // legacy session id
    hello.extend(with_len16(&[
        0x13, 0x01, 0x13, 0x02, 0x13, 0x03, 0xc0, 0x2f,
    ]));
    hello.extend([0x01, 0x00]); // compression: null
    hello.extend(with_len16(&ext));
    let mut handshake = vec![0x01];
    handshake.extend(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend(hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend(with_len16(&handshake));
    record
}

fn probes() -> [(&'static str, Vec<u8>); 3] {
    [
        ("random bytes", random_probe()),
        ("an HTTP request", http_probe()),
        ("a TLS ClientHello", tls_client_hello()),
    ]
}

/// `Ok` if nothing arrives on `s` and it is not closed (FIN or RST) for `d`.
fn silent_for(s: &mut TcpStream, d: Duration) -> Result<(), String> {
    s.set_read_timeout(Some(d)).unwrap();
    let mut b = [0u8; 256];
    match s.read(&mut b) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(()),
        Ok(0) => Err("closed with FIN".into()),
        Ok(n) => Err(format!("{n} bytes arrived: {:?}", &b[..n])),
        Err(e) => Err(format!("error {e}")),
    }
}

/// `GET /metrics` with the test token: the exposition text.
fn metrics(server: &Server) -> String {
    let mut s = TcpStream::connect(server.api_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// Waits (the loop publishes once a second) until `/metrics` has `line`.
fn wait_metric(server: &Server, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics(server);
        if text.lines().any(|l| l == line) {
            return;
        }
        assert!(Instant::now() < deadline, "no `{line}` in:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn probes_get_no_byte_and_are_not_closed_within_a_second_without_a_fallback() {
    let (server, tcp) = tcp_server(json!({}));
    let threads: Vec<_> = probes()
        .into_iter()
        .map(|(what, probe)| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(tcp).unwrap();
                s.write_all(&probe).unwrap();
                (what, silent_for(&mut s, Duration::from_millis(1000)), s)
            })
        })
        .collect();
    let mut held = Vec::new();
    for t in threads {
        let (what, verdict, s) = t.join().unwrap();
        if let Err(e) = verdict {
            panic!("{what}: {e} within the first second");
        }
        held.push(s);
    }
    // Strangers are counted and discarded, all three still open.
    wait_metric(
        &server,
        r#"ostp_tcp_not_ostp_total{reason="unknown_tag"} 3"#,
    );
    wait_metric(&server, r#"ostp_tcp_strangers_total{fate="discarded"} 3"#);
    wait_metric(
        &server,
        r#"ostp_tcp_connections{state="unauthenticated"} 3"#,
    );
    // Still nothing for them, whatever more they send.
    for s in &mut held {
        s.write_all(b"\r\n\r\nmore bytes\r\n").unwrap();
        silent_for(s, Duration::from_millis(200)).unwrap();
    }
}

/// A tiny website: reads a request up to its blank line or the end of the stream, answers with
/// what it saw, and closes.
fn start_fallback() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = conn.write_all(&fallback_answer(&got));
            });
        }
    });
    addr
}

fn fallback_answer(request: &[u8]) -> Vec<u8> {
    let mut d = Digest::new();
    d.update(request);
    let body = format!("fallback saw {} bytes, fnv {:016x}\n", d.len, d.fnv);
    format!(
        "HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn probes_get_exactly_what_the_fallback_sends() {
    let fallback = start_fallback();
    let (server, tcp) = tcp_server(json!({"fallback": {"target": fallback.to_string()}}));
    for (what, probe) in probes() {
        let mut s = TcpStream::connect(tcp).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&probe).unwrap();
        if !probe.ends_with(b"\r\n\r\n") {
            // Not a request the website can answer before the end: the end must be passed on.
            s.shutdown(Shutdown::Write).unwrap();
        }
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&fallback_answer(&probe)),
            "{what}: the prober sees the website, every byte it sent included"
        );
    }
    wait_metric(&server, r#"ostp_tcp_strangers_total{fate="fallback"} 3"#);
    wait_metric(&server, r#"ostp_tcp_connections{state="fallback"} 0"#);
}

#[test]
fn a_thousand_idle_strangers_are_bounded_and_new_connections_still_get_in() {
    let (server, tcp) = tcp_server(json!({}));
    let conns: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(tcp).unwrap())
        .collect();
    wait_metric(&server, "ostp_tcp_connections_accepted_total 1000");
    // The default bound (256) holds: the 744 oldest were closed with a FIN, the newest are open.
    wait_metric(
        &server,
        r#"ostp_tcp_connections{state="unauthenticated"} 256"#,
    );
    wait_metric(&server, r#"ostp_tcp_strangers_total{fate="evicted"} 744"#);
    let mut closed = Vec::new();
    for (i, mut s) in conns.into_iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut b = [0u8; 16];
        match s.read(&mut b) {
            Ok(0) => closed.push(i),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            other => panic!("connection {i}: {other:?} (a reset or bytes instead of a FIN)"),
        }
    }
    assert_eq!(closed.len(), 744);
    assert!(
        closed.iter().all(|&i| i < 744),
        "the oldest are closed first"
    );
    // A new connection is accepted and judged like any other.
    let mut s = TcpStream::connect(tcp).unwrap();
    s.write_all(&http_probe()).unwrap();
    wait_metric(&server, "ostp_tcp_connections_accepted_total 1001");
    silent_for(&mut s, Duration::from_millis(200)).unwrap();
}
