//! Router mode end to end, with real processes in network namespaces the test creates: a "LAN"
//! host whose default route is a "router", which runs the client with the rules printed by
//! `ostp --router-rules` (and its policy routing) installed for its LAN interface; a "WAN"
//! namespace runs the server and the origins. The router has no route to the public-looking
//! origin, so the LAN's plain programs (curl, python, no proxy settings) reach it through the
//! tunnel or not at all; the origins tell who connected, so a bypassed private destination is
//! seen reached straight from the LAN host. Root only: CI runs as root.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::support::bulk_http;
use crate::support::dns;
use crate::support::netns::Netns;
use crate::support::tunnel::*;

/// A public-looking origin: only the WAN namespace holds these addresses, the router has no
/// route to them.
const ORIGIN4: &str = "45.45.45.45";
const ORIGIN6: &str = "2a0e:45::45";
/// The LAN host's addresses.
const LAN_HOST4: &str = "192.168.77.2";
/// The WAN namespace's address on the router link (private: bypassed by the rules).
const WAN_LINK4: &str = "172.30.0.2";
/// The router's LAN interface (not OpenWrt's `br-lan`: the config names it).
const LAN_IF: &str = "rlan0";

/// The three namespaces, wired: LAN ↔ router ↔ WAN.
struct Lab {
    lan: Netns,
    router: Netns,
    wan: Netns,
}

fn build_lab() -> Lab {
    let (wan, router, lan) = (Netns::create(), Netns::create(), Netns::create());
    router.link(
        "rwan0",
        &["172.30.0.1/30", "fd30::1/64"],
        &wan,
        "wrtr0",
        &[&format!("{WAN_LINK4}/30"), "fd30::2/64"],
    );
    router.link(
        LAN_IF,
        &["192.168.77.1/24", "fd77::1/64"],
        &lan,
        "lrtr0",
        &[&format!("{LAN_HOST4}/24"), "fd77::2/64"],
    );
    lan.ip(&["route", "add", "default", "via", "192.168.77.1"]);
    lan.ip(&["-6", "route", "add", "default", "via", "fd77::1"]);
    wan.ip(&["addr", "add", &format!("{ORIGIN4}/32"), "dev", "lo"]);
    wan.ip(&["-6", "addr", "add", &format!("{ORIGIN6}/128"), "dev", "lo"]);
    // Answers to the LAN (bypassed traffic is forwarded by the router, not translated).
    wan.ip(&["route", "add", "192.168.77.0/24", "via", "172.30.0.1"]);
    wan.ip(&["-6", "route", "add", "fd77::/64", "via", "fd30::1"]);
    // The router reaches the server (on the WAN namespace's address towards us) over its link.
    router.ip(&[
        "route",
        "add",
        &format!("{}/32", wan.ns_addr),
        "via",
        WAN_LINK4,
    ]);
    for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
        router.output("sysctl", &["-qw", key]);
    }
    Lab { lan, router, wan }
}

/// The LAN host asks `to` (a Python address tuple, of `family`) for www.direct.test over UDP;
/// the answer's last four bytes in hex.
fn resolve_lan(lan: &Netns, to: &str, family: &str) -> String {
    let q: String = dns::query("www.direct.test", 7)
        .iter()
        .map(|b| format!("\\x{b:02x}"))
        .collect();
    let script = format!(
        "import socket\n\
         s=socket.socket(socket.{family},socket.SOCK_DGRAM)\n\
         s.settimeout(2)\n\
         for i in range(5):\n\
         \x20 s.sendto(b'{q}',{to})\n\
         \x20 try:\n\
         \x20   d,a=s.recvfrom(512); print(d[-4:].hex()); break\n\
         \x20 except socket.timeout: pass\n"
    );
    lan.output("python3", &["-c", &script]).trim().to_string()
}

/// An origin that answers each HTTP request (one per connection) with the address that
/// connected, as `peer=IP`.
fn serve_whoami(listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let peer = conn.peer_addr().map(|a| a.ip().to_string());
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let body = format!("peer={}", peer.unwrap_or_default());
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
    }
}

/// A UDP origin that answers each datagram with `PAYLOAD from IP`.
fn serve_udp_whoami(sock: UdpSocket) {
    let mut buf = [0u8; 512];
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        let answer = format!("{} from {}", String::from_utf8_lossy(&buf[..n]), from.ip());
        let _ = sock.send_to(answer.as_bytes(), from);
    }
}

/// The origins in the WAN namespace: (bulk HTTP port on ORIGIN4; whoami HTTP port and UDP
/// whoami port, each on ORIGIN4, ORIGIN6 and WAN_LINK4).
fn start_origins(wan: &Netns) -> (u16, u16, u16) {
    let (bulk, who, udp) = wan.run_inside(|| {
        let bulk = TcpListener::bind((ORIGIN4, 0)).unwrap();
        let who4 = TcpListener::bind((ORIGIN4, 0)).unwrap();
        let port = who4.local_addr().unwrap().port();
        let who = [
            who4,
            TcpListener::bind((ORIGIN6, port)).unwrap(),
            TcpListener::bind((WAN_LINK4, port)).unwrap(),
        ];
        let udp4 = UdpSocket::bind((ORIGIN4, 0)).unwrap();
        let port = udp4.local_addr().unwrap().port();
        let udp = [
            udp4,
            UdpSocket::bind((ORIGIN6, port)).unwrap(),
            UdpSocket::bind((WAN_LINK4, port)).unwrap(),
        ];
        (bulk, who, udp)
    });
    let ports = (
        bulk.local_addr().unwrap().port(),
        who[0].local_addr().unwrap().port(),
        udp[0].local_addr().unwrap().port(),
    );
    std::thread::spawn(move || bulk_http::serve(bulk));
    for l in who {
        std::thread::spawn(move || serve_whoami(l));
    }
    for s in udp {
        std::thread::spawn(move || serve_udp_whoami(s));
    }
    ports
}

/// curl run in the LAN host: (body digest, success, body text when short, stderr).
fn curl_lan(lan: &Netns, url: &str, max_time: &str) -> (Digest, bool, String) {
    let mut cmd = lan.command("curl");
    cmd.args(["-sS", "--noproxy", "*", "--max-time", max_time, "-g", url]);
    let (d, status, err) = run_curl(cmd);
    (d, status.success(), err)
}

/// A short body fetched by curl in the LAN host.
fn fetch_lan(lan: &Netns, url: &str) -> Result<String, String> {
    let out = lan
        .command("curl")
        .args(["-sS", "--noproxy", "*", "--max-time", "20", "-g", url])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Sends `payload` from the LAN host to `to` with python3 (a few tries); the answer and the
/// address it came from.
fn udp_exchange_lan(lan: &Netns, to: SocketAddr, payload: &str) -> Result<String, String> {
    let family = if to.is_ipv6() { "AF_INET6" } else { "AF_INET" };
    let script = format!(
        "import socket,sys\n\
         s=socket.socket(socket.{family},socket.SOCK_DGRAM)\n\
         s.settimeout(2)\n\
         for i in range(5):\n\
         \x20 s.sendto(b'{payload}',('{ip}',{port}))\n\
         \x20 try:\n\
         \x20   d,a=s.recvfrom(512); print(d.decode(),'|',a[0],a[1]); sys.exit(0)\n\
         \x20 except socket.timeout: pass\n\
         sys.exit(1)\n",
        ip = to.ip(),
        port = to.port()
    );
    let out = lan
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

/// `ostp --router-rules [flavor] --config path`, printed text.
fn router_rules(config: &Path, flavor: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ostp"))
        .arg("--router-rules")
        .args(flavor)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "--router-rules: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The server in the WAN namespace and the client on the router (config fields `extra` merged
/// in) with its rules and policy routing installed; waits for the tunnel. The directory holds
/// the client's config.
fn start_router_client(lab: &Lab, extra: serde_json::Value) -> (Server, String, Proc, TempDir) {
    let key = new_key();
    let mut spec = ServerSpec::new(&key);
    spec.host = lab.wan.ns_addr;
    spec.netns = Some(lab.wan.name.clone());
    let server = Server::start(spec);
    let dir = TempDir::new("router-client");
    let config = dir.path().join("client.json");
    let mut cfg = json!({
        "mode": "client",
        "server": server.udp.to_string(),
        "access_key": key,
        "socks5_bind": "127.0.0.1:0",
        "redir": {"enabled": true, "bind": "0.0.0.0:1090", "interfaces": [LAN_IF]},
    });
    if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    std::fs::write(&config, cfg.to_string()).unwrap();
    let rules = router_rules(&config, &[]);
    assert!(rules.contains(&format!("\"{LAN_IF}\"")), "{rules}");
    lab.router.nft(&rules);
    let routing = router_rules(&config, &["routing"]);
    let out = lab
        .router
        .command("sh")
        .args(["-ec", &routing])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "policy routing: {}\n{routing}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut cmd = lab.router.command(env!("CARGO_BIN_EXE_ostp"));
    cmd.arg("--config").arg(&config).env_remove("RUST_LOG");
    let client = Proc::spawn("client", cmd);
    client
        .wait_line(Duration::from_secs(20), |l| {
            l.contains("tunnel session 0 connected")
        })
        .unwrap_or_else(|| panic!("the tunnel did not come up:\n{}", client.log_text()));
    assert!(
        client.log_text().contains("TPROXY UDP on [::]:1090"),
        "{}",
        client.log_text()
    );
    (server, key, client, dir)
}

#[test]
fn a_lan_behind_the_router_reaches_the_internet_through_the_tunnel_and_private_ranges_directly() {
    let _lock = heavy_lock();
    let lab = build_lab();
    let (bulk, who, udp) = start_origins(&lab.wan);
    let origin4: IpAddr = ORIGIN4.parse().unwrap();
    let origin6: IpAddr = ORIGIN6.parse().unwrap();
    // Without router mode the LAN cannot reach the origin at all.
    let (_, ok, _) = curl_lan(&lab.lan, &format!("http://{ORIGIN4}:{who}/"), "2");
    assert!(!ok, "the LAN reached the origin without the tunnel");

    let (server, key, client, _dir) = start_router_client(&lab, json!({}));

    // TCP over IPv4: plain curl reaches the origin, which sees the server, not the LAN host.
    let answer = fetch_lan(&lab.lan, &format!("http://{ORIGIN4}:{who}/"))
        .unwrap_or_else(|e| panic!("curl through router mode: {e}\n{}", client.log_text()));
    assert_eq!(answer, format!("peer={ORIGIN4}"), "not through the tunnel");
    // A download arrives intact and is counted by the server.
    let n = size(20_000_000, 5_000_000);
    let sum = fetch_lan(&lab.lan, &format!("http://{ORIGIN4}:{bulk}/sum/{n}")).unwrap();
    let expected = u64::from_str_radix(sum.trim().trim_start_matches("fnv1a64="), 16).unwrap();
    let (d, ok, err) = curl_lan(
        &lab.lan,
        &format!("http://{ORIGIN4}:{bulk}/bytes/{n}"),
        "120",
    );
    assert!(ok, "download through router mode: {err}");
    assert_eq!((d.len, d.fnv), (n, expected), "download intact");
    let ((_, down), counted) = server.wait_counters(&key, Duration::from_secs(5), |_, d| d >= n);
    assert!(counted, "the server counted {down} of {n} bytes");

    // TCP over IPv6.
    let answer = fetch_lan(&lab.lan, &format!("http://[{ORIGIN6}]:{who}/"))
        .unwrap_or_else(|e| panic!("curl over IPv6: {e}\n{}", client.log_text()));
    assert_eq!(answer, format!("peer={ORIGIN6}"));

    // UDP, both families: the answer comes back from the address asked, relayed by the server.
    for ip in [origin4, origin6] {
        let to = SocketAddr::new(ip, udp);
        let (before, _) = server.counters(&key);
        let answer = udp_exchange_lan(&lab.lan, to, "ping")
            .unwrap_or_else(|e| panic!("no UDP answer from {to}: {e}\n{}", client.log_text()));
        assert_eq!(answer, format!("ping from {ip} | {ip} {udp}"));
        let (_, moved) = server.wait_counters(&key, Duration::from_secs(5), |up, _| up > before);
        assert!(moved, "the server did not count the datagram to {to}");
    }

    // A private destination is left alone: reached straight from the LAN host, not counted.
    std::thread::sleep(Duration::from_millis(1500)); // the counters settle (synced each second)
    let before = server.counters(&key);
    let answer = fetch_lan(&lab.lan, &format!("http://{WAN_LINK4}:{who}/")).unwrap();
    assert_eq!(
        answer,
        format!("peer={LAN_HOST4}"),
        "private range not bypassed"
    );
    let wan_link: IpAddr = WAN_LINK4.parse().unwrap();
    let answer = udp_exchange_lan(&lab.lan, SocketAddr::new(wan_link, udp), "direct").unwrap();
    assert_eq!(
        answer,
        format!("direct from {LAN_HOST4} | {WAN_LINK4} {udp}")
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        server.counters(&key),
        before,
        "bypassed traffic went through the tunnel"
    );

    client.signal("TERM");
    let mut client = client;
    assert!(
        client
            .wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
}

#[test]
fn the_fw4_include_loads_inside_fw4s_table_and_the_standalone_table_reloads() {
    let dir = TempDir::new("router-rules");
    let config = dir.path().join("client.json");
    let cfg = json!({
        "mode": "client",
        "server": "[2001:db8::5]:50000",
        "access_key": new_key(),
        "redir": {"enabled": true, "bind": "[::]:1099", "interfaces": ["br-lan", "wlan0"]},
    });
    std::fs::write(&config, cfg.to_string()).unwrap();
    let ns = Netns::create();
    // fw4 puts the files of /etc/nftables.d/ inside its own table.
    let fw4 = router_rules(&config, &["fw4"]);
    ns.nft(&format!("table inet fw4 {{\n{fw4}}}\n"));
    let listed = ns.output("nft", &["list", "table", "inet", "fw4"]);
    for needle in [
        "chain ostp_redirect_tcp",
        "chain ostp_tproxy_udp",
        "redirect to :1099",
        "2001:db8::5",
    ] {
        assert!(listed.contains(needle), "{needle} missing:\n{listed}");
    }
    // The standalone table loads twice (the second load replaces the first).
    let nft = router_rules(&config, &[]);
    ns.nft(&nft);
    ns.nft(&nft);
    let listed = ns.output("nft", &["list", "table", "inet", "ostp"]);
    assert_eq!(listed.matches("chain redirect_tcp").count(), 1, "{listed}");
    // A server name is resolved when the rules are printed, and the header says so.
    let named = dir.path().join("named.json");
    let mut cfg = cfg;
    cfg["server"] = json!("localhost:50000");
    std::fs::write(&named, cfg.to_string()).unwrap();
    let text = router_rules(&named, &[]);
    assert!(
        text.contains("# Server: localhost resolved when these rules were generated to 127.0.0.1"),
        "{text}"
    );
    assert!(text.contains("elements = { 127.0.0.1 }"), "{text}");
}

/// A second public-looking origin, which the router itself can reach (a route through the WAN
/// link): the client's direct connections get there, from the router's WAN address.
const ORIGIN_DIRECT4: &str = "46.46.46.46";
/// The router's address on the WAN link.
const ROUTER_WAN4: &str = "172.30.0.1";

#[test]
fn addresses_an_excluded_name_resolved_to_through_captured_dns_bypass_the_tunnel_in_router_mode() {
    let _lock = heavy_lock();
    let lab = build_lab();
    lab.wan
        .ip(&["addr", "add", &format!("{ORIGIN_DIRECT4}/32"), "dev", "lo"]);
    lab.router.ip(&[
        "route",
        "add",
        &format!("{ORIGIN_DIRECT4}/32"),
        "via",
        WAN_LINK4,
    ]);
    // Two resolvers on port 53 at captured (not bypassed) addresses: the forwarder's
    // upstream, and one a LAN host picks itself.
    let (who, udp, resolver, rogue) = lab.wan.run_inside(|| {
        let who = TcpListener::bind((ORIGIN_DIRECT4, 0)).unwrap();
        let udp = UdpSocket::bind((ORIGIN_DIRECT4, 0)).unwrap();
        let resolver = UdpSocket::bind((ORIGIN4, 53)).unwrap();
        let rogue = UdpSocket::bind((ORIGIN6, 53)).unwrap();
        (who, udp, resolver, rogue)
    });
    let (who_port, udp_port) = (
        who.local_addr().unwrap().port(),
        udp.local_addr().unwrap().port(),
    );
    let upstream = resolver.local_addr().unwrap();
    std::thread::spawn(move || serve_whoami(who));
    std::thread::spawn(move || serve_udp_whoami(udp));
    let origin: std::net::Ipv4Addr = ORIGIN_DIRECT4.parse().unwrap();
    let table: std::collections::HashMap<_, _> = [("www.direct.test".to_string(), origin)]
        .into_iter()
        .collect();
    dns::serve_udp(resolver, table.clone());
    dns::serve_udp(rogue, table);
    let forwarder = "192.168.77.1:5353";
    let (_server, _key, client, _dir) = start_router_client(
        &lab,
        json!({
            "dns_forward": {"bind": forwarder, "upstream": upstream.to_string()},
            "exclude": {"domains": ["direct.test"]},
        }),
    );
    let url = format!("http://{ORIGIN_DIRECT4}:{who_port}/");
    let udp_to = SocketAddr::new(IpAddr::V4(origin), udp_port);
    // Not learned yet: through the tunnel (the origin sees the server, on its own address).
    assert_eq!(
        fetch_lan(&lab.lan, &url).unwrap(),
        format!("peer={ORIGIN_DIRECT4}")
    );
    let answer = udp_exchange_lan(&lab.lan, udp_to, "a").unwrap();
    assert!(
        answer.starts_with(&format!("a from {ORIGIN_DIRECT4} ")),
        "{answer}"
    );

    // The LAN host asks a resolver of its own choosing (captured, through the tunnel): the
    // answer arrives but teaches nothing (else any LAN host could pick what goes direct).
    assert_eq!(
        resolve_lan(&lab.lan, &format!("('{ORIGIN6}',53)"), "AF_INET6"),
        "2e2e2e2e"
    );
    assert_eq!(
        fetch_lan(&lab.lan, &url).unwrap(),
        format!("peer={ORIGIN_DIRECT4}"),
        "learned from a resolver the LAN host picked\n{}",
        client.log_text()
    );
    // The LAN host asks the forwarder's upstream itself (captured on its way to port 53).
    assert_eq!(
        resolve_lan(&lab.lan, &format!("('{ORIGIN4}',53)"), "AF_INET"),
        "2e2e2e2e",
        "the answer carries {ORIGIN_DIRECT4}"
    );

    // From now on the router connects to it directly: the origin sees the router's WAN side.
    let seen = fetch_lan(&lab.lan, &url).unwrap();
    assert_eq!(
        seen,
        format!("peer={ROUTER_WAN4}"),
        "TCP to the learned address\n{}",
        client.log_text()
    );
    let answer = udp_exchange_lan(&lab.lan, udp_to, "b").unwrap();
    assert!(
        answer.starts_with(&format!("b from {ROUTER_WAN4} | {ORIGIN_DIRECT4} ")),
        "UDP to the learned address, answered as if from the origin: {answer}"
    );
    client.signal("TERM");
}
