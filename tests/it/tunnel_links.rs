//! A client started the two ways a user gets one without writing a config: from an `ostp://` share
//! link on the command line, and from the server's subscribe URL (`ostp --subscribe URL`). Both
//! must carry traffic through the real server.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::support::tunnel::*;

fn proxy_of(proc: &Proc) -> SocketAddr {
    let line = proc
        .wait_line(Duration::from_secs(20), |l| l.contains("HTTP proxy on "))
        .unwrap_or_else(|| panic!("the client did not start:\n{}", proc.log_text()));
    let rest = &line[line.find("HTTP proxy on ").unwrap() + "HTTP proxy on ".len()..];
    rest.split([',', ' ']).next().unwrap().parse().unwrap()
}

fn download_through(proc: &Proc, proxy: SocketAddr, http: u16) {
    proc.wait_line(Duration::from_secs(20), |l| l.contains("connected"))
        .unwrap_or_else(|| panic!("no tunnel:\n{}", proc.log_text()));
    let n = 1_000_000;
    let mut s = socks5_connect(proxy, Target::Ip(SocketAddr::from(([127, 0, 0, 1], http))))
        .unwrap_or_else(|code| panic!("SOCKS5 reply {code:#x}"));
    let (_, d, e) = http_get_bytes(&mut s, n);
    assert!(e.is_none(), "{e:?}");
    assert_eq!(d.len, n);
    assert_eq!(d.fnv, expected_sum(http, n));
}

#[test]
fn client_from_a_share_link_carries_traffic() {
    let _heavy = heavy_lock();
    let http = start_http();
    let key = new_key();
    let server = Server::start(ServerSpec::new(&key));
    let link = format!("ostp://{key}@127.0.0.1:{}", server.udp.port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ostp"));
    cmd.arg(&link)
        .args(["--socks5-bind", "127.0.0.1:0"])
        .env_remove("RUST_LOG");
    let client = Proc::spawn("link-client", cmd);
    let proxy = proxy_of(&client);
    download_through(&client, proxy, http);
}

#[test]
fn client_from_the_subscribe_url_carries_traffic() {
    let _heavy = heavy_lock();
    let http = start_http();
    let key = new_key();
    let server = Server::start(ServerSpec::new(&key));
    let url = format!("http://{}/api/subscribe/{key}", server.api_addr());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ostp"));
    cmd.args(["--subscribe", &url, "--socks5-bind", "127.0.0.1:0"])
        .env_remove("RUST_LOG");
    let client = Proc::spawn("subscribe-client", cmd);
    let proxy = proxy_of(&client);
    download_through(&client, proxy, http);

    // An unknown key's subscribe URL is a clear error, not a client that never connects.
    let bad = format!("http://{}/api/subscribe/{}", server.api_addr(), new_key());
    let out = Command::new(env!("CARGO_BIN_EXE_ostp"))
        .args(["--subscribe", &bad])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("404") || err.contains("does not know"),
        "{err}"
    );
}

/// The server listens on IPv4 and IPv6 loopback at once (the IPv6 socket is v6-only), and a
/// client reaching it over IPv6 (with its proxy on `[::1]`) carries traffic.
#[test]
fn ipv6_server_address_and_dual_listen() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: this host has no IPv6 loopback");
        return;
    }
    let _heavy = heavy_lock();
    let http = start_http();
    let key = new_key();
    let dir = TempDir::new("v6");
    let port = free_port();
    let cfg = serde_json::json!({
        "mode": "server",
        "listen": [format!("127.0.0.1:{port}"), format!("[::1]:{port}")],
        "access_keys": [key],
        "allow_private_destinations": true,
        "state_file": "state.json",
    });
    let path = dir.path().join("config.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ostp"));
    cmd.arg("--config").arg(&path).env_remove("RUST_LOG");
    let server = Proc::spawn("v6-server", cmd);
    server
        .wait_line(Duration::from_secs(20), |l| l.contains("tunnel on udp"))
        .unwrap_or_else(|| panic!("server did not start:\n{}", server.log_text()));
    for (server_addr, bind) in [
        (format!("[::1]:{port}"), "[::1]:0"),
        (format!("127.0.0.1:{port}"), "127.0.0.1:0"),
    ] {
        let link = format!("ostp://{key}@{server_addr}");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ostp"));
        cmd.arg(&link)
            .args(["--socks5-bind", bind])
            .env_remove("RUST_LOG");
        let client = Proc::spawn("v6-client", cmd);
        let proxy = proxy_of(&client);
        download_through(&client, proxy, http);
    }
}
