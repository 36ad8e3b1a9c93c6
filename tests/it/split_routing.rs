//! Split routing for proxy requests (`exclude`) with real processes on loopback: a SOCKS5
//! CONNECT to an excluded address, a SOCKS5 CONNECT by an excluded name and an HTTP request to an
//! excluded address are connected directly by the client (intact, and the server counts
//! nothing), while the same origin reached at a non-excluded address goes through the tunnel.
//! An address an excluded name resolved to through the DNS forwarder (UDP and TCP) or a SOCKS5
//! UDP association to the forwarder's upstream goes direct too (except to port 53), until a
//! reload drops the name; answers from other resolvers and forged answers teach nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use serde_json::json;

use crate::support::bulk_http;
use crate::support::dns;
use crate::support::netns::Netns;
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

/// The same origin inside `ns` (at its address, reached over the veth pair): learned addresses
/// must be real ones, never loopback. Its address.
fn origin_in(ns: &Netns) -> SocketAddr {
    let l = ns.run_inside(|| TcpListener::bind((ns.ns_addr, 0)).unwrap());
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || bulk_http::serve(l));
    addr
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
    let closed = free_port();
    let err = socks5_connect(
        client.proxy,
        Target::Ip(SocketAddr::from(([127, 0, 0, 2], closed))),
    );
    assert_eq!(err.err(), Some(0x05), "SOCKS5 connection refused");
}

/// Downloads `n` bytes from `target` through the proxy (intact) and returns how many bytes the
/// server counted meanwhile (waiting up to 4 s for a count of `n`: the loop hands its counts
/// to the user table once a second, and a loaded machine may take another second).
fn counted_for_download(
    server: &Server,
    key: &str,
    proxy: SocketAddr,
    target: SocketAddr,
    n: u64,
    expected: u64,
) -> u64 {
    let before = server.counters(key).1;
    let d = download(proxy, Target::Ip(target), n);
    assert_eq!(
        (d.len, d.fnv),
        (n, expected),
        "download from {target} intact"
    );
    let ((_, after), _) =
        server.wait_counters(key, Duration::from_secs(4), |_, down| down >= before + n);
    after - before
}

/// Asks the DNS forwarder for `name`; the answer (retried: UDP).
fn resolve(forwarder: SocketAddr, name: &str) -> Vec<u8> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let q = dns::query(name, 0x4242);
    let mut buf = [0u8; 512];
    for _ in 0..20 {
        s.send_to(&q, forwarder).unwrap();
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            return buf[..n].to_vec();
        }
    }
    panic!("no answer for {name} from the forwarder");
}

#[test]
fn addresses_excluded_names_resolve_to_through_the_dns_forwarder_go_direct_until_a_reload() {
    let http = start_origin();
    let (ns3, ns4) = (Netns::create(), Netns::create());
    let (origin, origin4) = (origin_in(&ns3), origin_in(&ns4));
    let (ip3, ip4) = (ns3.ns_addr, ns4.ns_addr);
    let (resolver, resolver_tcp) = loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
            break (udp, tcp);
        }
    };
    let upstream = resolver.local_addr().unwrap();
    let table: std::collections::HashMap<_, _> = [
        ("www.direct.test", ip3),
        ("other.test", ip3),
        ("tcp.direct.test", ip4),
    ]
    .into_iter()
    .map(|(n, a)| (n.to_string(), a))
    .collect();
    dns::serve_udp(resolver, table.clone());
    dns::serve_tcp(resolver_tcp, table);
    let key = new_key();
    let server = Server::start(ServerSpec::new(&key));
    let dir = TempDir::new("learned");
    let path = dir.path().join("client.json");
    let config = |proxy: SocketAddr, forwarder: SocketAddr, domains: &[&str]| {
        json!({
            "mode": "client",
            "server": server.udp.to_string(),
            "access_key": key,
            "socks5_bind": proxy.to_string(),
            "dns_forward": {"bind": forwarder.to_string(), "upstream": upstream.to_string()},
            "exclude": {"domains": domains},
        })
        .to_string()
    };
    // The ports picked may be taken by the time the client binds them: retry with others.
    let (client, proxy, forwarder) = (0..5)
        .find_map(|_| {
            let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let forwarder = SocketAddr::from(([127, 0, 0, 1], free_port()));
            std::fs::write(&path, config(proxy, forwarder, &["direct.test"])).unwrap();
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ostp"));
            cmd.arg("--config").arg(&path).env_remove("RUST_LOG");
            let client = Proc::spawn("client", cmd);
            let line = client
                .wait_line(Duration::from_secs(20), |l| {
                    l.contains("connected") || port_was_taken(l)
                })
                .unwrap_or_else(|| panic!("no session:\n{}", client.log_text()));
            (!port_was_taken(&line)).then_some((client, proxy, forwarder))
        })
        .expect("the client's ports were taken five times");
    let n = 1_000_000;
    let expected = expected_sum(http, n);

    // Not learned yet, and after a name that is not excluded resolved to it: the tunnel.
    let counted = counted_for_download(&server, &key, proxy, origin, n, expected);
    assert!(counted >= n, "through the tunnel: {counted}");
    let answer = resolve(forwarder, "other.test");
    assert!(answer.ends_with(&ip3.octets()), "{answer:?}");
    let counted = counted_for_download(&server, &key, proxy, origin, n, expected);
    assert!(
        counted >= n,
        "a name not excluded teaches nothing: {counted}"
    );

    // An excluded name resolved to it (through a CNAME): direct from now on.
    let answer = resolve(forwarder, "WWW.direct.test");
    assert!(answer.ends_with(&ip3.octets()), "{answer:?}");
    let counted = counted_for_download(&server, &key, proxy, origin, n, expected);
    assert!(
        counted < n / 2,
        "the learned address went through the tunnel ({counted} bytes counted)\n{}",
        client.log_text()
    );

    // The same over TCP (two answers on one connection, each split across reads).
    let counted = counted_for_download(&server, &key, proxy, origin4, n, expected);
    assert!(counted >= n, "not learned yet: {counted}");
    let mut s = std::net::TcpStream::connect(forwarder).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for id in [1, 2] {
        let q = dns::query("tcp.direct.test", id);
        s.write_all(&(q.len() as u16).to_be_bytes()).unwrap();
        s.write_all(&q).unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut a = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut a).unwrap();
        assert!(a.ends_with(&ip4.octets()), "{a:?}");
    }
    let counted = counted_for_download(&server, &key, proxy, origin4, n, expected);
    assert!(counted < n / 2, "learned over TCP: {counted}");

    // SIGHUP with the name no longer excluded: its address goes through the tunnel again.
    std::fs::write(&path, config(proxy, forwarder, &["else.test"])).unwrap();
    let from = client.line_count();
    client.signal("HUP");
    client
        .wait_line_from(from, Duration::from_secs(10), |l| {
            l.contains("exclude reloaded")
        })
        .unwrap_or_else(|| panic!("no reload:\n{}", client.log_text()));
    let counted = counted_for_download(&server, &key, proxy, origin, n, expected);
    assert!(counted >= n, "forgotten at the reload: {counted}");
}

/// A resolver on port 53 of `ns` answering "udp.direct.test" with `real`; with `forge`, each
/// genuine answer is followed by one nobody asked for (another ID, another name: what an
/// off-path attacker sprays at the server's relay ports) giving "forged.direct.test" `ns`'s own
/// address.
fn resolver_on_53(ns: &Netns, real: std::net::Ipv4Addr, forge: bool) -> SocketAddr {
    let sock = ns.run_inside(|| std::net::UdpSocket::bind((ns.ns_addr, 53)).unwrap());
    let addr = sock.local_addr().unwrap();
    let table: std::collections::HashMap<String, std::net::Ipv4Addr> = [
        ("udp.direct.test", real),
        ("forged.direct.test", ns.ns_addr),
    ]
    .into_iter()
    .map(|(n, a)| (n.to_string(), a))
    .collect();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if let Some(a) = dns::answer(&buf[..n], &table) {
                let _ = sock.send_to(&a, from);
            }
            if forge {
                let forged = dns::answer(&dns::query("forged.direct.test", 0x7777), &table);
                let _ = sock.send_to(&forged.unwrap(), from);
            }
        }
    });
    addr
}

/// Asks `resolver` for "udp.direct.test" through a SOCKS5 UDP association of `proxy`.
fn resolve_through_association(
    proxy: SocketAddr,
    resolver: SocketAddr,
    real: std::net::Ipv4Addr,
    client: &Client,
) {
    let (_control, relay) = socks5_udp_associate(proxy);
    let app = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    app.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let packet = socks5_udp_packet(&Target::Ip(resolver), &dns::query("udp.direct.test", 9));
    let mut buf = [0u8; 1024];
    let answer = (0..20)
        .find_map(|_| {
            app.send_to(&packet, relay).unwrap();
            app.recv_from(&mut buf)
                .ok()
                .map(|(len, _)| buf[..len].to_vec())
        })
        .unwrap_or_else(|| {
            panic!(
                "no answer through the association\n{}",
                client.proc.log_text()
            )
        });
    assert!(answer.ends_with(&real.octets()), "{answer:?}");
    // Let a forged datagram that follows the answer arrive too.
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn a_dns_answer_through_a_socks5_udp_association_teaches_only_from_the_configured_resolver() {
    // Resolvers on port 53, each in a namespace of its own which the server reaches over the
    // veth pair: the forwarder's upstream (which also sprays forged answers) and another one.
    // The learned address is other_ns's (an origin on it, and on its TCP port 53); the forged
    // one is ns's.
    let (ns, other_ns) = (Netns::create(), Netns::create());
    let real = other_ns.ns_addr;
    let upstream = resolver_on_53(&ns, real, true);
    let other = resolver_on_53(&other_ns, real, false);
    let http = start_origin();
    let origin = origin_in(&other_ns);
    let forged_origin = origin_in(&ns);
    let dns_port = other_ns.run_inside(|| TcpListener::bind((real, 53)).unwrap());
    std::thread::spawn(move || bulk_http::serve(dns_port));
    let key = new_key();
    let server = Server::start(ServerSpec::new(&key));
    let (client, _forwarder) = Client::spawn_with_dns_forward(
        server.udp,
        &key,
        upstream,
        json!({"exclude": {"domains": ["direct.test"]}}),
    );
    client.wait_connected(0);
    let n = 1_000_000;
    let expected = expected_sum(http, n);
    let counted = counted_for_download(&server, &key, client.proxy, origin, n, expected);
    assert!(counted >= n, "not learned yet: {counted}");

    // A resolver the application chose (not tun.dns, not the forwarder's upstream): its
    // answer reaches the application but teaches nothing.
    resolve_through_association(client.proxy, other, real, &client);
    let counted = counted_for_download(&server, &key, client.proxy, origin, n, expected);
    assert!(
        counted >= n,
        "learned from an unconfigured resolver: {counted}"
    );

    // The forwarder's upstream: its answer teaches; the forged one that followed does not.
    resolve_through_association(client.proxy, upstream, real, &client);
    let counted = counted_for_download(&server, &key, client.proxy, origin, n, expected);
    assert!(
        counted < n / 2,
        "learned through the association: {counted}"
    );
    let counted = counted_for_download(&server, &key, client.proxy, forged_origin, n, expected);
    assert!(counted >= n, "a forged answer was learned: {counted}");
    // Port 53 of the learned address (a SOCKS5 request by address): through the tunnel.
    let dns_origin = SocketAddr::new(real.into(), 53);
    let counted = counted_for_download(&server, &key, client.proxy, dns_origin, n, expected);
    assert!(
        counted >= n,
        "DNS to a learned address went direct: {counted}"
    );
}
