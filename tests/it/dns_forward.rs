//! The client's DNS forwarder (`dns_forward`) with real processes on loopback: UDP queries from
//! two querying addresses and a DNS-over-TCP exchange reach the upstream resolver through the
//! tunnel (the server counts them), and each querying address gets only its own answers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use serde_json::json;

use crate::support::tunnel::*;

/// An "upstream resolver" on one port, UDP and TCP: answers `answer:` + the query.
fn start_upstream() -> SocketAddr {
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
            break (udp, tcp);
        }
    };
    let addr = udp.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let mut a = b"answer:".to_vec();
            a.extend_from_slice(&buf[..n]);
            let _ = udp.send_to(&a, from);
        }
    });
    std::thread::spawn(move || {
        for s in tcp.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 512];
            if let Ok(n) = s.read(&mut buf) {
                let mut a = b"answer:".to_vec();
                a.extend_from_slice(&buf[..n]);
                let _ = s.write_all(&a);
            }
        }
    });
    addr
}

fn query_udp(forwarder: SocketAddr, q: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 512];
    for _ in 0..20 {
        s.send_to(q, forwarder).unwrap();
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            return Some(buf[..n].to_vec());
        }
    }
    None
}

#[test]
fn queries_over_udp_and_tcp_reach_the_upstream_through_the_tunnel() {
    let upstream = start_upstream();
    let key = new_key();
    let server = Server::start(ServerSpec::new(&key));
    let (client, forwarder) = Client::spawn_with_dns_forward(server.udp, &key, upstream, json!({}));
    client.wait_connected(0);
    let before = server.counters(&key);
    for q in [&b"q-one"[..], b"q-two"] {
        let answer = query_udp(forwarder, q).expect("an answer through the forwarder");
        assert_eq!(answer, [&b"answer:"[..], q].concat());
    }
    let mut s = TcpStream::connect(forwarder).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"tcp-query").unwrap();
    let mut answer = vec![0u8; 64];
    let n = s.read(&mut answer).unwrap();
    assert_eq!(&answer[..n], b"answer:tcp-query");
    let (after, moved) = server.wait_counters(&key, Duration::from_secs(5), |up, down| {
        up >= before.0 + 10 + 9 && down >= before.1 + 24 + 16
    });
    assert!(
        moved,
        "the server did not count the queries: {before:?} -> {after:?}"
    );
}

#[test]
fn a_forwarder_port_taken_by_another_process_stops_the_client_with_the_address_named() {
    let upstream = start_upstream();
    let key = new_key();
    let server = Server::start(ServerSpec::new(&key));
    // Only the TCP side is taken: what a CI run hit when another test's connection held it.
    let port = free_port();
    let _taken = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let forwarder = SocketAddr::from(([127, 0, 0, 1], port));
    let Err(log) = Client::try_spawn(
        server.udp,
        &key,
        json!({"dns_forward": {"bind": forwarder.to_string(), "upstream": upstream.to_string()}}),
    ) else {
        panic!("the client started on a taken forwarder port");
    };
    assert!(port_was_taken(&log), "{log}");
    assert!(log.contains(&format!("tcp {forwarder}")), "{log}");
}
