//! Split routing for proxy requests (`exclude`) with real processes on loopback: a SOCKS5
//! CONNECT to an excluded address, a SOCKS5 CONNECT by an excluded name and an HTTP request to an
//! excluded address are connected directly by the client (intact, and the server counts
//! nothing), while the same origin reached at a non-excluded address goes through the tunnel.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use serde_json::json;

use crate::support::bulk_http;
use crate::support::tunnel::*;

/// The origin on every IPv4 and IPv6 loopback address, one port.
fn start_origin() -> u16 {
    loop {
        let v4 = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        if let Ok(v6) = TcpListener::bind(("::1", port)) {
            std::thread::spawn(move || bulk_http::serve(v4));
            std::thread::spawn(move || bulk_http::serve(v6));
            return port;
        }
    }
}

fn download(proxy: SocketAddr, target: Target, n: u64) -> Digest {
    let mut s = socks5_connect(proxy, target).expect("SOCKS5 connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (_, d, e) = http_get_bytes(&mut s, n);
    assert!(e.is_none(), "{e:?}");
    d
}

#[test]
fn excluded_destinations_are_connected_directly_and_the_rest_goes_through_the_tunnel() {
    let http = start_origin();
    let key = new_key();
    let server = Server::start(ServerSpec::new(&key));
    let client = Client::spawn(
        server.udp,
        &key,
        json!({"exclude": {"ips": ["127.0.0.2/32"], "domains": ["localhost"]}}),
    );
    client.wait_connected(0);
    let n = 3_000_000;
    let expected = expected_sum(http, n);

    // Not excluded: through the tunnel (the server counts it).
    let d = download(
        client.proxy,
        Target::Ip(SocketAddr::from(([127, 0, 0, 1], http))),
        n,
    );
    assert_eq!((d.len, d.fnv), (n, expected));
    let (tunneled, counted) = server.wait_counters(&key, Duration::from_secs(5), |_, d| d >= n);
    assert!(
        counted,
        "the tunneled download was not counted: {tunneled:?}"
    );

    // Excluded by address, by name (SOCKS5), and an HTTP request by address: direct.
    let d = download(
        client.proxy,
        Target::Ip(SocketAddr::from(([127, 0, 0, 2], http))),
        n,
    );
    assert_eq!((d.len, d.fnv), (n, expected), "direct by address");
    let d = download(client.proxy, Target::Name("LocalHost.", http), n);
    assert_eq!((d.len, d.fnv), (n, expected), "direct by name");
    let mut s = std::net::TcpStream::connect(client.proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET http://127.0.0.2:{http}/bytes/1000 HTTP/1.1\r\nHost: 127.0.0.2\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text:.200}");
    // Give the server a sync period: nothing more was counted.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        server.counters(&key),
        tunneled,
        "direct traffic went through the tunnel"
    );

    // A refused direct connection is reported like a refused tunnel stream.
    let closed = free_tcp_port();
    let err = socks5_connect(
        client.proxy,
        Target::Ip(SocketAddr::from(([127, 0, 0, 2], closed))),
    );
    assert_eq!(err.err(), Some(0x05), "SOCKS5 connection refused");
}
