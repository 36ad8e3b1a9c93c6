//! The client's carrier modes where the server has no TCP listener (real processes on loopback):
//! a `uot` client reports a refused TCP carrier at once (not after the handshake timeout), an
//! `auto` client whose UDP is dropped and whose TCP is refused alternates between the two
//! carriers, and a share link's `?type=uot` runs the client on the TCP carrier.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::tunnel::*;
use serde_json::json;

/// A TCP port nothing listens on.
fn closed_tcp_port() -> u16 {
    free_port()
}

#[test]
fn uot_reports_a_refused_tcp_carrier_at_once() {
    let key = new_key();
    let server = Server::start(ServerSpec::new(&key)); // UDP only
    let transport = json!({ "mode": "uot", "tcp_port": closed_tcp_port() });
    let c = Client::spawn(server.udp, &key, json!({ "transport": transport }));
    // Timed from the moment the proxy listens (the process's start-up is not what is asserted).
    let t = Instant::now();
    let line = c
        .proc
        .wait_line(Duration::from_secs(8), |l| l.contains("TCP carrier"))
        .unwrap_or_else(|| panic!("no TCP carrier failure reported:\n{}", c.proc.log_text()));
    assert!(line.contains("cannot connect"), "{line}");
    // Seen when the connect fails, not when the 10 s handshake timeout runs out.
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(!c.proc.log_text().contains("no answer from the server"));
}

#[test]
fn auto_alternates_while_neither_carrier_answers() {
    let key = new_key();
    let blackhole = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp: SocketAddr = blackhole.local_addr().unwrap();
    let transport = json!({ "mode": "auto", "tcp_port": closed_tcp_port() });
    let c = Client::spawn(udp, &key, json!({ "transport": transport }));
    let (to_tcp, _) = c
        .proc
        .wait_line_from(0, Duration::from_secs(10), |l| {
            l.contains("no answer over UDP; new sessions use the TCP carrier")
        })
        .unwrap_or_else(|| panic!("never moved to TCP:\n{}", c.proc.log_text()));
    let (to_udp, _) = c
        .proc
        .wait_line_from(to_tcp, Duration::from_secs(10), |l| {
            l.contains("the TCP carrier did not answer either; new sessions use UDP")
        })
        .unwrap_or_else(|| panic!("never went back to UDP:\n{}", c.proc.log_text()));
    c.proc
        .wait_line_from(to_udp, Duration::from_secs(15), |l| {
            l.contains("new sessions use the TCP carrier")
        })
        .unwrap_or_else(|| panic!("did not try TCP again:\n{}", c.proc.log_text()));
}

#[test]
fn a_uot_share_link_runs_the_client_on_the_tcp_carrier() {
    let key = new_key();
    let port = closed_tcp_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ostp"));
    cmd.arg(format!("ostp://{key}@127.0.0.1:{port}?type=uot"))
        .args(["--socks5-bind", "127.0.0.1:0"])
        .env_remove("RUST_LOG");
    let p = Proc::spawn("client", cmd);
    p.wait_line(Duration::from_secs(10), |l| l.contains("transport uot"))
        .unwrap_or_else(|| panic!("not in uot mode:\n{}", p.log_text()));
    // Over TCP: the refused connection is to the link's port.
    p.wait_line(Duration::from_secs(10), |l| {
        l.contains(&format!("TCP carrier 127.0.0.1:{port}"))
    })
    .unwrap_or_else(|| panic!("no TCP attempt:\n{}", p.log_text()));
}
