//! TUN mode end to end, with real processes in network namespaces the test creates: the client
//! runs in namespace "inside" whose only link goes to our namespace (where the server runs); the
//! origin and a DNS responder run in namespace "outside", which only our namespace can reach. So
//! plain programs in "inside" (no proxy settings) reach "outside" through the client's TUN
//! device and the tunnel, or not at all. Root only: CI runs as root.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::bulk_http;
use crate::support::dns;
use crate::support::netns::Netns;
use crate::support::tunnel::*;

/// The origin (`bulk_http`, IPv4 and IPv6) and a DNS responder in `outside`.
struct Outside {
    ns: Netns,
    http: u16,
    http6: u16,
    dns: SocketAddr,
}

fn start_outside() -> Outside {
    let ns = Netns::create();
    let (v4, v6) = (ns.ns_addr, ns.ns_addr6);
    let (l4, l6, dns) = ns.run_inside(|| {
        (
            std::net::TcpListener::bind((v4, 0)).unwrap(),
            std::net::TcpListener::bind((v6, 0)).unwrap(),
            UdpSocket::bind((v4, 53)).unwrap(),
        )
    });
    let (http, http6) = (
        l4.local_addr().unwrap().port(),
        l6.local_addr().unwrap().port(),
    );
    std::thread::spawn(move || bulk_http::serve(l4));
    std::thread::spawn(move || bulk_http::serve(l6));
    let dns_addr = dns.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = dns.recv_from(&mut buf) {
            let mut answer = b"answer:".to_vec();
            answer.extend_from_slice(&buf[..n]);
            let _ = dns.send_to(&answer, from);
        }
    });
    Outside {
        ns,
        http,
        http6,
        dns: dns_addr,
    }
}

/// `GET /sum/n` straight from the origin (our namespace reaches `outside` directly).
fn expected_sum_at(addr: SocketAddr, n: u64) -> u64 {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /sum/{n} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    u64::from_str_radix(text.split("fnv1a64=").nth(1).unwrap().trim(), 16).unwrap()
}

/// The server in our namespace, on our end of the link to `inside`.
fn start_server(inside: &Netns) -> (Server, String) {
    let key = new_key();
    let mut spec = ServerSpec::new(&key);
    spec.host = inside.host_addr;
    (Server::start(spec), key)
}

/// The client in `inside` with TUN mode on (`tun` fields merged in).
fn start_client(
    inside: &Netns,
    dir: &Path,
    server: SocketAddr,
    key: &str,
    tun: serde_json::Value,
) -> Proc {
    start_client_with(inside, dir, server, key, tun, json!({}))
}

/// [`start_client`] with more top-level fields (`extra`) merged into the config.
fn start_client_with(
    inside: &Netns,
    dir: &Path,
    server: SocketAddr,
    key: &str,
    tun: serde_json::Value,
    extra: serde_json::Value,
) -> Proc {
    let mut tun_block = json!({"enable": true});
    if let (Some(t), Some(extra)) = (tun_block.as_object_mut(), tun.as_object()) {
        t.extend(extra.clone());
    }
    let mut cfg = json!({
        "mode": "client",
        "server": server.to_string(),
        "access_key": key,
        "socks5_bind": "127.0.0.1:0",
        "tun": tun_block,
    });
    if let (Some(c), Some(extra)) = (cfg.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    let path = dir.join("client.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let mut cmd = inside.command(env!("CARGO_BIN_EXE_ostp"));
    cmd.arg("--config").arg(&path).env_remove("RUST_LOG");
    Proc::spawn("client", cmd)
}

/// curl run in `inside`; (digest of the body, success).
fn curl_inside(inside: &Netns, args: &[&str]) -> (Digest, bool, String) {
    let mut cmd = inside.command("curl");
    cmd.args(["-sS", "--max-time", "120", "--noproxy", "*"])
        .args(args);
    let (d, status, err) = run_curl(cmd);
    (d, status.success(), err)
}

/// Our rules, routes and interface in `inside` (all empty once the client is gone).
fn leftovers(inside: &Netns) -> String {
    let mut s = String::new();
    for fam in ["-4", "-6"] {
        for line in inside.output("ip", &[fam, "rule", "show"]).lines() {
            if (20297..=20301).any(|p| line.starts_with(&format!("{p}:"))) {
                s += &format!("rule {fam} {line}\n");
            }
        }
        s += &inside.output("ip", &[fam, "route", "show", "table", "20300"]);
    }
    if inside.output("ip", &["link", "show"]).contains("ostp0") {
        s += "interface ostp0\n";
    }
    s
}

/// Sends a UDP datagram from `inside` to `to` with python3 and returns the answer and where it
/// came from.
fn udp_exchange_inside(inside: &Netns, to: SocketAddr, payload: &str) -> Result<String, String> {
    let family = if to.is_ipv6() { "AF_INET6" } else { "AF_INET" };
    let script = format!(
        "import socket,sys\n\
         s=socket.socket(socket.{family},socket.SOCK_DGRAM)\n\
         s.settimeout(3)\n\
         for i in range(5):\n\
         \x20 s.sendto(b'{payload}',('{ip}',{port}))\n\
         \x20 try:\n\
         \x20   d,a=s.recvfrom(512); print(d.decode(),a[0],a[1]); sys.exit(0)\n\
         \x20 except socket.timeout: pass\n\
         sys.exit(1)\n",
        ip = to.ip(),
        port = to.port()
    );
    let out = inside
        .command("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn plain_programs_in_a_namespace_reach_the_internet_only_through_the_tun_device() {
    let _lock = heavy_lock();
    let outside = start_outside();
    let inside = Netns::create();
    // Without the tunnel, "inside" has no route to "outside".
    let (_, ok, _) = curl_inside(
        &inside,
        &[
            "--max-time",
            "2",
            &format!("http://{}:{}/bytes/1", outside.ns.ns_addr, outside.http),
        ],
    );
    assert!(!ok, "inside reached outside without the tunnel");

    let (server, key) = start_server(&inside);
    let dir = TempDir::new("tun-client");
    let dns = outside.dns;
    let client = start_client(
        &inside,
        dir.path(),
        server.udp,
        &key,
        json!({"dns": dns.ip().to_string()}),
    );
    client
        .wait_line(Duration::from_secs(20), |l| {
            l.contains("all traffic now goes into the tunnel")
        })
        .unwrap_or_else(|| panic!("TUN routes never came up:\n{}", client.log_text()));
    // The default MTU sizes the reflected TCP segments (9,000: 6× fewer device packets).
    let link = inside.output("ip", &["link", "show", "ostp0"]);
    assert!(link.contains("mtu 9000"), "{link}");

    // TCP over IPv4: a large download with plain curl, intact, counted by the server.
    let n = size(100_000_000, 10_000_000);
    let origin = SocketAddr::new(IpAddr::V4(outside.ns.ns_addr), outside.http);
    let expected = expected_sum_at(origin, n);
    let t = Instant::now();
    let (d, ok, err) = curl_inside(&inside, &[&format!("http://{origin}/bytes/{n}")]);
    assert!(ok, "curl through TUN: {err}\n{}", client.log_text());
    assert_eq!((d.len, d.fnv), (n, expected), "download intact");
    eprintln!(
        "TUN: {n} bytes in {:.2?} = {:.1} MB/s",
        t.elapsed(),
        mbps(n, t.elapsed())
    );
    let ((_, down), counted) = server.wait_counters(&key, Duration::from_secs(5), |_, d| d >= n);
    assert!(
        counted,
        "the server counted {down} of {n} bytes: not through the tunnel?"
    );

    // TCP over IPv6.
    let origin6 = SocketAddr::new(IpAddr::V6(outside.ns.ns_addr6), outside.http6);
    let m = 2_000_000;
    let expected6 = expected_sum_at(origin6, m);
    let (d, ok, err) = curl_inside(&inside, &[&format!("http://{origin6}/bytes/{m}")]);
    assert!(ok, "curl over IPv6 through TUN: {err}");
    assert_eq!((d.len, d.fnv), (m, expected6));

    // DNS to any address is answered by tun.dns, through the tunnel, as if from the address
    // asked (IPv4 and IPv6 both).
    // The resolver on the LAN (the usual DHCP setup; the main table's connected route would
    // reach it directly) is captured too.
    let lan_resolver = format!("{}:53", inside.host_addr);
    for asked in [
        "8.8.8.8:53",
        "[2001:4860:4860::8888]:53",
        lan_resolver.as_str(),
    ] {
        let asked: SocketAddr = asked.parse().unwrap();
        let answer = udp_exchange_inside(&inside, asked, "q1")
            .unwrap_or_else(|e| panic!("no DNS answer for {asked}: {e}\n{}", client.log_text()));
        assert_eq!(answer, format!("answer:q1 {} {}", asked.ip(), asked.port()));
    }

    // SIGHUP re-reads `exclude`: its ranges bypass the device at once.
    let path = dir.path().join("client.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["exclude"] = json!({"ips": ["10.123.0.0/16"], "domains": ["example.com"]});
    std::fs::write(&path, cfg.to_string()).unwrap();
    let from = client.line_count();
    client.signal("HUP");
    client
        .wait_line_from(from, Duration::from_secs(10), |l| {
            l.contains("exclude reloaded")
        })
        .unwrap_or_else(|| panic!("no reload:\n{}", client.log_text()));
    let table = inside.output("ip", &["-4", "route", "show", "table", "20300"]);
    assert!(table.contains("throw 10.123.0.0/16"), "{table}");

    // SIGTERM: nothing is left behind.
    client.signal("TERM");
    let mut client = client;
    assert!(
        client
            .wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    assert_eq!(leftovers(&inside), "", "left after SIGTERM");
}

#[test]
fn with_the_kill_switch_nothing_but_the_tunnels_udp_leaves_while_the_server_is_down() {
    let _lock = heavy_lock();
    let outside = start_outside();
    let inside = Netns::create();
    // A way around the tunnel, as every real host has: a default route out of the only link.
    inside.output(
        "ip",
        &[
            "route",
            "add",
            "default",
            "via",
            &inside.host_addr.to_string(),
        ],
    );
    // A server address where nothing answers: the tunnel never comes up. Counted: what leaves
    // through the namespace's only link (the device's own traffic is not on the wire).
    let server = SocketAddr::new(IpAddr::V4(inside.host_addr), free_port());
    let dir = TempDir::new("tun-kill");
    let client = start_client(
        &inside,
        dir.path(),
        server,
        &new_key(),
        json!({"kill_switch": true}),
    );
    client
        .wait_line(Duration::from_secs(20), |l| {
            l.contains("all traffic now goes into the tunnel")
        })
        .unwrap_or_else(|| panic!("kill switch routes never came up:\n{}", client.log_text()));
    let port = server.port();
    inside.nft(&format!(
        "table inet watch {{\n chain out {{\n type filter hook output priority 0;\n \
           oifname {wire} udp dport {port} counter;\n \
           oifname {wire} udp dport != {port} counter;\n \
           oifname {wire} meta l4proto tcp counter;\n }}\n}}\n",
        wire = inside.ns_if
    ));
    // The inside host keeps trying (TCP, UDP, DNS) for a few seconds.
    let target = format!("http://{}:{}/bytes/1", outside.ns.ns_addr, outside.http);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(4) {
        let (_, ok, _) = curl_inside(&inside, &["--max-time", "1", &target]);
        assert!(!ok, "reached the origin with the server down");
        let _ = udp_exchange_inside(&inside, outside.dns, "leak?");
    }
    let rules = inside.output("nft", &["list", "table", "inet", "watch"]);
    let counts: Vec<u64> = rules
        .lines()
        .filter_map(|l| l.split("packets ").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(counts.len(), 3, "{rules}");
    assert!(
        counts[0] > 0,
        "the client did not keep trying the tunnel:\n{rules}"
    );
    assert_eq!(
        counts[1], 0,
        "UDP other than the tunnel's left the host:\n{rules}"
    );
    assert_eq!(counts[2], 0, "TCP left the host:\n{rules}");
    assert!(client.log_text().contains("kill switch on"));
}

/// Sends the DNS query `q` from `inside` to `to` with python3; the answer's bytes.
fn dns_exchange_inside(inside: &Netns, to: SocketAddr, q: &[u8]) -> Result<Vec<u8>, String> {
    let hex: String = q.iter().map(|b| format!("{b:02x}")).collect();
    let script = format!(
        "import socket,sys\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         s.settimeout(2)\n\
         for i in range(5):\n\
         \x20 s.sendto(bytes.fromhex('{hex}'),('{ip}',{port}))\n\
         \x20 try:\n\
         \x20   d,a=s.recvfrom(512); print(d.hex()); sys.exit(0)\n\
         \x20 except socket.timeout: pass\n\
         sys.exit(1)\n",
        ip = to.ip(),
        port = to.port()
    );
    let out = inside
        .command("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

#[test]
fn addresses_an_excluded_name_resolved_to_are_connected_around_the_tunnel() {
    let _lock = heavy_lock();
    let inside = Netns::create();
    let (server, key) = start_server(&inside);
    // The origin: an address of ours behind inside's default route (added here; the TUN routes
    // override a default route, not the link's own /30). Its who-am-I servers say which address
    // they were reached from: their own (the tunnel server, in our namespace, connected) or
    // inside's (the client connected directly, around the device).
    let o = inside.host_addr.octets();
    let origin = std::net::Ipv4Addr::new(198, 18, o[2], o[3]);
    let origin_cidr = format!("{origin}/32");
    crate::support::netns::must(&["ip", "addr", "add", &origin_cidr, "dev", &inside.host_if]);
    inside.ip(&[
        "route",
        "add",
        "default",
        "via",
        &inside.host_addr.to_string(),
    ]);
    let host = IpAddr::V4(origin);
    let (http, udp) = dns::start_whoami(host);
    // The resolver (tun.dns) is on the origin's address too: once learned, DNS to it must
    // still go through the tunnel.
    let resolver = UdpSocket::bind((origin, 0)).unwrap();
    let resolver_addr = resolver.local_addr().unwrap();
    let table = ["www.direct.test", "other.test"]
        .into_iter()
        .map(|n| (n.to_string(), origin))
        .collect();
    dns::serve_udp(resolver, table);
    let dir = TempDir::new("tun-learned");
    let client = start_client_with(
        &inside,
        dir.path(),
        server.udp,
        &key,
        json!({"dns": resolver_addr.to_string()}),
        json!({"exclude": {"domains": ["direct.test"]}}),
    );
    client
        .wait_line(Duration::from_secs(20), |l| {
            l.contains("all traffic now goes into the tunnel")
        })
        .unwrap_or_else(|| panic!("TUN routes never came up:\n{}", client.log_text()));
    let url = format!("http://{host}:{http}/");
    let tcp_seen_from = || {
        inside.output(
            "curl",
            &["-sS", "--max-time", "10", "--noproxy", "*", url.as_str()],
        )
    };
    let udp_to = SocketAddr::new(host, udp);
    let udp_seen_from = || {
        let answer = udp_exchange_inside(&inside, udp_to, "who")
            .unwrap_or_else(|e| panic!("no UDP answer: {e}\n{}", client.log_text()));
        answer.split(' ').next().unwrap_or_default().to_string()
    };
    let (tunnel, direct) = (origin.to_string(), inside.ns_addr.to_string());
    assert_eq!(tcp_seen_from(), tunnel, "TCP through the tunnel at first");
    assert_eq!(udp_seen_from(), tunnel, "UDP through the tunnel at first");

    // A name that is not excluded resolves to the address: nothing changes.
    let asked: SocketAddr = "8.8.8.8:53".parse().unwrap();
    let a = dns_exchange_inside(&inside, asked, &dns::query("other.test", 1)).unwrap();
    assert!(a.ends_with(&origin.octets()), "{a:?}");
    assert_eq!(
        tcp_seen_from(),
        tunnel,
        "a name not excluded teaches nothing"
    );

    // The excluded name (a CNAME chain in the answer), through the captured DNS: its address
    // is connected directly from now on, TCP and UDP, while the query itself went through the
    // tunnel to tun.dns.
    let a = dns_exchange_inside(&inside, asked, &dns::query("www.direct.test", 2)).unwrap();
    assert!(a.ends_with(&origin.octets()), "{a:?}");
    assert_eq!(
        tcp_seen_from(),
        direct,
        "TCP to the learned address went through the tunnel\n{}",
        client.log_text()
    );
    assert_eq!(udp_seen_from(), direct, "UDP to the learned address");
    // tun.dns is on the learned address: DNS still goes through the tunnel (the resolver
    // answers whoami.test with the address it was asked from).
    let a = dns_exchange_inside(&inside, asked, &dns::query("whoami.test", 3)).unwrap();
    assert!(
        a.ends_with(&origin.octets()),
        "DNS to tun.dns on a learned address went around the tunnel: {a:?}"
    );
    client.signal("TERM");
    let mut client = client;
    assert!(client.wait_exit(Duration::from_secs(10)).is_some());
}
