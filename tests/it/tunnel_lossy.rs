//! End-to-end transfers over an impaired link: the client reaches the server through the
//! `lossy_relay` emulator (1 % loss each way, 20 ms each way = 40 ms RTT, 100 Mbit/s bottleneck),
//! with real `ostp` processes on loopback. Downloads and an upload must arrive intact. Over a
//! link with reordering, jitter and loss, proxy replies must precede a server-speaks-first
//! destination's banner.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::tunnel::*;

const LINK: &str = "--delay-ms 20 --loss 0.01 --rate-mbit 100 --queue-ms 50 --seed 7";

/// Server + lossy relay in front of it + a client connected through the relay.
fn setup() -> (Server, Client, u16) {
    let http = start_http();
    let key = new_key();
    let server = Server::start(ServerSpec::new(&key));
    let relay = start_lossy_relay(server.udp, LINK);
    let client = Client::start(relay, &key);
    (server, client, http)
}

#[test]
fn downloads_over_lossy_link_are_intact() {
    let (_server, client, http) = setup();
    let n = size(20_000_000, 4_000_000);
    let expected = expected_sum(http, n);
    // One large download with curl, then a few parallel ones with the raw SOCKS5 client.
    let t = Instant::now();
    let (digest, status, err) = curl(&[
        "--noproxy",
        "",
        "-f",
        "--socks5-hostname",
        &client.proxy.to_string(),
        &format!("http://127.0.0.1:{http}/bytes/{n}"),
    ]);
    assert!(status.success(), "curl: {err}");
    assert_eq!(digest.len, n);
    assert_eq!(digest.fnv, expected, "checksum");
    eprintln!(
        "lossy link: {n} bytes in {:.2?} = {:.1} MB/s",
        t.elapsed(),
        mbps(n, t.elapsed())
    );

    let m = n / 4;
    let expected_m = expected_sum(http, m);
    let proxy = client.proxy;
    let t = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s =
                    socks5_connect(proxy, Target::Ip(SocketAddr::from(([127, 0, 0, 1], http))))
                        .expect("SOCKS5 connect over the lossy link");
                http_get_bytes(&mut s, m)
            })
        })
        .collect();
    for w in workers {
        let (_, d, e) = w.join().unwrap();
        assert!(e.is_none(), "{e:?}");
        assert_eq!((d.len, d.fnv), (m, expected_m));
    }
    eprintln!(
        "lossy link: 4 × {m} bytes in parallel in {:.2?}",
        t.elapsed()
    );
}

#[test]
fn upload_over_lossy_link_is_intact() {
    let (_server, client, http) = setup();
    let n = size(10_000_000, 2_000_000) as usize;
    let data: Vec<u8> = (0..n as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9) >> 11) as u8)
        .collect();
    let mut digest = Digest::new();
    digest.update(&data);
    let t = Instant::now();
    let mut s = socks5_connect(
        client.proxy,
        Target::Ip(SocketAddr::from(([127, 0, 0, 1], http))),
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s.write_all(&data).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(
        reply.ends_with(&format!("bytes={n} fnv1a64={:016x}\n", digest.fnv)),
        "{reply}"
    );
    eprintln!(
        "lossy link: upload {n} bytes in {:.2?} = {:.1} MB/s",
        t.elapsed(),
        mbps(n as u64, t.elapsed())
    );
}

// ----- bug A: the proxy's success reply comes before a server-speaks-first banner -----

/// Reordering (20 % of packets held back), jitter and loss: the packet carrying OPEN_OK is often
/// overtaken by the one carrying the destination's banner.
const REORDERING_LINK: &str =
    "--delay-ms 5 --jitter-ms 4 --reorder 0.25 --loss 0.02 --down-loss 0.08 --seed 11";
const BANNER: &[u8] = b"SSH-2.0-OpenSSH_9.6 ostp-test\r\n";
const CONNECTIONS: usize = 200;
const WORKERS: usize = 4;

/// A destination that speaks first (like sshd or an SMTP server): writes [`BANNER`] on accept,
/// then waits for the client to close.
fn start_banner_server() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let _ = conn.write_all(BANNER);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
                let _ = conn.read(&mut [0u8; 64]);
            });
        }
    });
    addr
}

/// One SOCKS5 CONNECT: the complete success reply, then the banner; `Err` says what came instead.
fn socks5_reply_then_banner(proxy: SocketAddr, dest: SocketAddr) -> Result<(), String> {
    let mut s = std::net::TcpStream::connect(proxy).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut method = [0u8; 2];
    s.read_exact(&mut method).map_err(|e| e.to_string())?;
    let SocketAddr::V4(v4) = dest else {
        unreachable!()
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.ip().octets());
    req.extend_from_slice(&v4.port().to_be_bytes());
    s.write_all(&req).unwrap();
    // VER REP RSV ATYP=1 + 4-byte address + port: the client's bound address is IPv4.
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).map_err(|e| e.to_string())?;
    if reply[..4] != [5, 0, 0, 1] {
        return Err(format!(
            "SOCKS5 reply {:?}",
            String::from_utf8_lossy(&reply)
        ));
    }
    read_banner(&mut s)
}

/// One HTTP CONNECT: the complete `200` head, then the banner.
fn http_connect_reply_then_banner(proxy: SocketAddr, dest: SocketAddr) -> Result<(), String> {
    let mut s = std::net::TcpStream::connect(proxy).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n").unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).map_err(|e| e.to_string())?;
        head.push(b[0]);
        if head.len() > 1024 {
            break;
        }
    }
    if !head.starts_with(b"HTTP/1.1 200") || !head.ends_with(b"\r\n\r\n") {
        return Err(format!("HTTP reply {:?}", String::from_utf8_lossy(&head)));
    }
    read_banner(&mut s)
}

fn read_banner(s: &mut std::net::TcpStream) -> Result<(), String> {
    let mut banner = vec![0u8; BANNER.len()];
    s.read_exact(&mut banner).map_err(|e| e.to_string())?;
    if banner != BANNER {
        return Err(format!("banner {:?}", String::from_utf8_lossy(&banner)));
    }
    Ok(())
}

/// Runs [`CONNECTIONS`] connections on [`WORKERS`] threads; returns the failures.
fn run_connections(
    proxy: SocketAddr,
    dest: SocketAddr,
    one: fn(SocketAddr, SocketAddr) -> Result<(), String>,
) -> Vec<String> {
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            std::thread::spawn(move || {
                (0..CONNECTIONS / WORKERS)
                    .filter_map(|_| one(proxy, dest).err())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect()
}

/// Bug A (issue 7): through a link with reordering and loss, the destination's banner often
/// overtakes OPEN_OK; every SOCKS5 and HTTP CONNECT client must still get its success reply
/// first and then the banner, intact.
#[test]
fn proxy_reply_precedes_server_first_banner_over_reordering_link() {
    let key = new_key();
    let server = Server::start(ServerSpec::new(&key));
    let relay = start_lossy_relay(server.udp, REORDERING_LINK);
    let client = Client::start(relay, &key);
    let dest = start_banner_server();
    let t = Instant::now();
    let socks = run_connections(client.proxy, dest, socks5_reply_then_banner);
    let http = run_connections(client.proxy, dest, http_connect_reply_then_banner);
    eprintln!(
        "reordering link: {} connections in {:.2?}; failures: SOCKS5 {}, HTTP CONNECT {}",
        2 * CONNECTIONS,
        t.elapsed(),
        socks.len(),
        http.len()
    );
    assert!(
        socks.is_empty() && http.is_empty(),
        "SOCKS5 failures ({}): {:?}\nHTTP CONNECT failures ({}): {:?}",
        socks.len(),
        socks.iter().take(3).collect::<Vec<_>>(),
        http.len(),
        http.iter().take(3).collect::<Vec<_>>()
    );
}
