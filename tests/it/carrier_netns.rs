//! The TCP carrier (docs/PROTOCOL.md §7) where UDP is blocked or TCP is lossy, with real
//! processes: the server runs in a network namespace the test creates (joined to ours by a veth
//! pair), the client and the HTTP origin in ours, and nftables rules inside the namespace drop
//! all of the tunnel's UDP, or 1 % of the carrier's TCP segments each way (this kernel has no
//! netem). Root only: CI runs as root.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::netns::Netns;
use crate::support::tunnel::*;

/// Server in `ns` (UDP and TCP on one port), origin on every address of ours.
fn setup(ns: &Netns) -> (Server, String, u16) {
    let http = start_http_on(Ipv4Addr::UNSPECIFIED);
    let key = new_key();
    let mut spec = ServerSpec::new(&key);
    spec.netns = Some(ns.name.clone());
    spec.host = ns.ns_addr;
    spec.tcp_carrier = true;
    let server = Server::start(spec);
    (server, key, http)
}

/// The origin as the server in the namespace reaches it.
fn origin(ns: &Netns, http: u16) -> Target<'static> {
    Target::Ip(SocketAddr::from((ns.host_addr, http)))
}

/// One complete download of `n` bytes through the proxy, or why not.
fn try_download(proxy: SocketAddr, target: Target, n: u64, expected: u64) -> Result<(), String> {
    let mut s = socks5_connect(proxy, target).map_err(|c| format!("SOCKS5 reply {c:#x}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (_, d, e) = http_get_bytes(&mut s, n);
    if (d.len, d.fnv) == (n, expected) {
        Ok(())
    } else {
        Err(format!(
            "got {} of {n} bytes (intact: {}): {e:?}",
            d.len,
            d.fnv == expected
        ))
    }
}

/// Retries [`try_download`] until it succeeds; how long that took from `since`.
fn download_within(
    proxy: SocketAddr,
    ns: &Netns,
    http: u16,
    n: u64,
    since: Instant,
    within: Duration,
) -> Duration {
    let expected = expected_sum(http, n);
    let mut last = String::new();
    while since.elapsed() < within {
        match try_download(proxy, origin(ns, http), n, expected) {
            Ok(()) => return since.elapsed(),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no complete download within {within:?}; last attempt: {last}");
}

/// Drops every UDP datagram to the tunnel's port inside the namespace.
fn block_udp(ns: &Netns, port: u16) {
    ns.nft(&format!(
        "table inet ostp_block_udp {{\n chain input {{\n type filter hook input priority 0;\n \
         udp dport {port} drop;\n }}\n}}\n"
    ));
}

/// Drops every TCP segment to the tunnel's port inside the namespace.
fn block_tcp(ns: &Netns, port: u16) {
    ns.nft(&format!(
        "table inet ostp_block_tcp {{\n chain input {{\n type filter hook input priority 0;\n \
         tcp dport {port} drop;\n }}\n}}\n"
    ));
}

/// A series of the server's `GET /metrics` (summed over labels), 0 when absent.
fn metric(server: &Server, name: &str) -> u64 {
    let addr = server.api_addr();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn auto_mode_moves_to_tcp_within_10s_when_udp_is_blocked_and_back_when_it_returns() {
    let _lock = heavy_lock();
    let ns = Netns::create();
    let (server, key, http) = setup(&ns);
    block_udp(&ns, server.udp.port());
    let started = Instant::now();
    let client = Client::spawn(server.udp, &key, json!({"transport": {"mode": "auto"}}));
    let took = download_within(
        client.proxy,
        &ns,
        http,
        1_000_000,
        started,
        Duration::from_secs(10),
    );
    eprintln!("UDP blocked: first download over TCP {took:.2?} after the client started");

    // UDP returns: the client moves back (it probes UDP in the background) and its session is
    // replaced by one over UDP once idle. Proven by blocking TCP afterwards: downloads still
    // work, so they cannot be on the TCP carrier.
    ns.nft_delete_table("ostp_block_udp");
    let udp_before = metric(&server, "ostp_datagrams_received_total");
    let (at, _) = client
        .proc
        .wait_line_from(0, Duration::from_secs(120), |l| {
            l.contains("new sessions use UDP")
        })
        .unwrap_or_else(|| panic!("no move back to UDP:\n{}", client.proc.log_text()));
    client
        .proc
        .wait_line_from(at, Duration::from_secs(30), |l| {
            l.contains("connected to") && !l.contains("TCP")
        })
        .unwrap_or_else(|| panic!("no session over UDP:\n{}", client.proc.log_text()));
    block_tcp(&ns, server.udp.port());
    let back = Instant::now();
    download_within(
        client.proxy,
        &ns,
        http,
        1_000_000,
        back,
        Duration::from_secs(10),
    );
    // The server counts datagrams again (published about once a second).
    let t = Instant::now();
    while metric(&server, "ostp_datagrams_received_total") <= udp_before {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no datagrams counted after the move back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn tcp_carrier_over_a_lossy_path_is_intact_and_never_retransmits_inside() {
    let _lock = heavy_lock();
    let ns = Netns::create();
    let (server, key, http) = setup(&ns);
    let port = server.udp.port();
    // One segment per packet through netfilter (no GSO/GRO aggregates): 1 % of packets is 1 %
    // of segments.
    ns.output(
        "ip",
        &[
            "link",
            "set",
            "dev",
            &ns.ns_if,
            "gso_max_size",
            "1500",
            "gso_max_segs",
            "1",
            "gro_max_size",
            "1500",
        ],
    );
    ns.nft(&format!(
        "table inet ostp_lossy {{\n \
           chain input {{\n type filter hook input priority 0;\n \
             tcp dport {port} numgen random mod 100 < 1 drop;\n }}\n \
           chain output {{\n type filter hook output priority 0;\n \
             tcp sport {port} numgen random mod 100 < 1 drop;\n }}\n}}\n"
    ));
    let client = Client::spawn(server.udp, &key, json!({"transport": {"mode": "uot"}}));
    client.wait_connected(0);
    let n = size(40_000_000, 8_000_000);
    let t = Instant::now();
    download_within(client.proxy, &ns, http, n, t, Duration::from_secs(120));
    eprintln!(
        "1 % TCP loss: {n} bytes in {:.2?} = {:.1} MB/s",
        t.elapsed(),
        mbps(n, t.elapsed())
    );
    // And an upload over the same lossy path.
    let m = size(20_000_000, 4_000_000) as usize;
    let data: Vec<u8> = (0..m as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9) >> 11) as u8)
        .collect();
    let mut digest = Digest::new();
    digest.update(&data);
    let mut s = socks5_connect(client.proxy, origin(&ns, http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {m}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s.write_all(&data).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(
        reply.ends_with(&format!("bytes={m} fnv1a64={:016x}\n", digest.fnv)),
        "{reply}"
    );
    // The loss was real: the kernel retransmitted segments of the carrier.
    let snmp = ns.command("cat").arg("/proc/net/snmp").output().unwrap();
    let snmp = String::from_utf8_lossy(&snmp.stdout);
    let tcp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let at = tcp[0]
        .split_whitespace()
        .position(|f| f == "RetransSegs")
        .unwrap();
    let retrans: u64 = tcp[1].split_whitespace().nth(at).unwrap().parse().unwrap();
    assert!(
        retrans > 0,
        "no TCP retransmission: the loss rule did not bite"
    );
    assert_eq!(
        metric(&server, "ostp_retransmitted_bytes_total{carrier=\"tcp\"}"),
        0,
        "the transport retransmitted over a reliable carrier"
    );
    // Counted like UDP sessions (the table is synced about once a second).
    let ((up, down), ok) =
        server.wait_counters(&key, Duration::from_secs(5), |u, d| d >= n && u >= m as u64);
    assert!(ok, "counters {up}/{down} after {n} down, {m} up");
}
