//! End-to-end transfers over an impaired link: the client reaches the server through the
//! `lossy_relay` emulator (1 % loss each way, 20 ms each way = 40 ms RTT, 100 Mbit/s bottleneck),
//! with real `ostp` processes on loopback. Downloads and an upload must arrive intact.

#[path = "support/tunnel_harness.rs"]
mod harness;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use harness::*;

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
