//! The management API is never reachable through the tunnel, whatever
//! `allow_private_destinations` says: by 127.0.0.1, `localhost`, IPv6 forms and the host's other
//! addresses, while other local ports stay reachable.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use crate::support::tunnel::*;
use serde_json::json;

/// Starts a server with `allow_private_destinations: true` and the API on `api_bind` (port
/// picked here) with `token`; returns it with its UDP and API addresses.
fn server_with_api(
    dir: &TempDir,
    key: &str,
    api_ip: IpAddr,
    token: &str,
) -> (Proc, SocketAddr, SocketAddr) {
    // The ports picked may be taken by the time the server binds: retry with others.
    for _ in 0..5 {
        let (udp_port, api_port) = (free_port(), free_port());
        let proc = spawn_server(dir, key, api_ip, token, udp_port, api_port);
        let line = proc
            .wait_line(Duration::from_secs(20), |l| {
                l.contains("management API") || port_was_taken(l)
            })
            .unwrap_or_else(|| panic!("the server did not start:\n{}", proc.log_text()));
        if !port_was_taken(&line) {
            let udp = SocketAddr::from((Ipv4Addr::LOCALHOST, udp_port));
            return (proc, udp, SocketAddr::from((Ipv4Addr::LOCALHOST, api_port)));
        }
    }
    panic!("the server's ports were taken five times");
}

fn spawn_server(
    dir: &TempDir,
    key: &str,
    api_ip: IpAddr,
    token: &str,
    udp_port: u16,
    api_port: u16,
) -> Proc {
    let cfg = json!({
        "mode": "server",
        "listen": format!("127.0.0.1:{udp_port}"),
        "access_keys": [key],
        "api": {"enabled": true, "bind": SocketAddr::new(api_ip, api_port).to_string(), "token": token},
        "state_file": "state.json",
        "log_level": "info",
        "allow_private_destinations": true,
    });
    let path = dir.path().join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ostp"));
    cmd.arg("--config").arg(&path).env_remove("RUST_LOG");
    Proc::spawn("server", cmd)
}

/// The host's address on its default route, if it has one that is not loopback.
fn non_loopback_address() -> Option<IpAddr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

fn assert_refused(proxy: SocketAddr, what: &str, target: Target) {
    match socks5_connect(proxy, target) {
        Ok(_) => panic!("{what}: the tunnel reached the management API"),
        Err(code) => assert_eq!(code, 0x02, "{what}: SOCKS5 reply should be 'not allowed'"),
    }
}

#[test]
fn an_open_api_on_loopback_is_unreachable_through_the_tunnel() {
    let http = start_http();
    let key = new_key();
    let dir = TempDir::new("guard-api");
    let (_server, udp, api) = server_with_api(&dir, &key, Ipv4Addr::LOCALHOST.into(), "");
    // The API is open and answers directly.
    assert_eq!(api_request(api, "GET", "/api/users", None).0, 200);
    let client = Client::start(udp, &key);
    let port = api.port();
    let cases = [
        ("127.0.0.1", Target::Ip(api)),
        ("localhost", Target::Name("localhost", port)),
        (
            "[::1]",
            Target::Ip(SocketAddr::new("::1".parse().unwrap(), port)),
        ),
        (
            "[::ffff:127.0.0.1]",
            Target::Ip(SocketAddr::new("::ffff:127.0.0.1".parse().unwrap(), port)),
        ),
        (
            "127.0.0.2",
            Target::Ip(SocketAddr::from(([127, 0, 0, 2], port))),
        ),
    ];
    for (what, target) in cases {
        assert_refused(client.proxy, what, target);
    }
    // Another loopback port is still reachable (allow_private_destinations: true).
    let mut s = socks5_connect(
        client.proxy,
        Target::Ip(SocketAddr::from(([127, 0, 0, 1], http))),
    )
    .expect("another loopback port is reachable");
    let (_, digest, _) = http_get_bytes(&mut s, 1000);
    assert_eq!(digest.len, 1000);
}

#[test]
fn an_api_on_every_address_is_unreachable_through_the_tunnel_by_any_local_address() {
    let key = new_key();
    let dir = TempDir::new("guard-api-any");
    let (_server, udp, api) = server_with_api(
        &dir,
        &key,
        Ipv4Addr::UNSPECIFIED.into(),
        "guard-test-token-0123456789",
    );
    let client = Client::start(udp, &key);
    let port = api.port();
    assert_refused(client.proxy, "127.0.0.1", Target::Ip(api));
    assert_refused(client.proxy, "localhost", Target::Name("localhost", port));
    match non_loopback_address() {
        Some(ip) => assert_refused(
            client.proxy,
            &ip.to_string(),
            Target::Ip(SocketAddr::new(ip, port)),
        ),
        None => eprintln!("no non-loopback address on this host: that case is not checked"),
    }
}
