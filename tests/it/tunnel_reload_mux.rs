//! Real processes on loopback: SIGHUP reloads config.json (keys added and removed, limits changed,
//! `allow_private_destinations` switched) without dropping live sessions or counters and without
//! letting a limited user past its limit, and a client with `mux.sessions = N` spreads its streams
//! over N sessions.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::tunnel::*;
use serde_json::{Value, json};

fn download(proxy: SocketAddr, http: u16, n: u64) -> Digest {
    let mut s = socks5_connect(proxy, Target::Ip(SocketAddr::from(([127, 0, 0, 1], http))))
        .unwrap_or_else(|code| panic!("SOCKS5 reply {code:#x}"));
    let (_, d, e) = http_get_bytes(&mut s, n);
    assert!(e.is_none(), "download failed: {e:?}");
    assert_eq!(d.len, n);
    d
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

fn user_keys(server: &Server) -> Vec<String> {
    let (status, v) = server.api("GET", "/api/users", None);
    assert_eq!(status, 200, "{v}");
    v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["key"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn sighup_reloads_keys_and_limits_without_dropping_sessions_or_counters() {
    let _heavy = heavy_lock();
    let http = start_http();
    let kept = new_key();
    let removed = new_key();
    let mut spec = ServerSpec::new(&kept);
    spec.config_keys.push((removed.clone(), None));
    let server = Server::start(spec);
    let api_user = server.create_user(None);
    let client = Client::start(server.udp, &kept);

    let n = 1_000_000;
    let want = expected_sum(http, n);
    assert_eq!(download(client.proxy, http, n).fnv, want);
    let ((_, down), ok) = server.wait_counters(&kept, Duration::from_secs(5), |_, d| d >= n);
    assert!(ok, "counters never reached the download: {down}");
    let before = server.user(&kept);

    // Rewrite config.json: `kept` gets a limit and a name, `removed` goes, `added` arrives.
    let added = new_key();
    let path = server.dir.path().join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["access_keys"] = json!([
        {"key": kept, "name": "kept", "limit_bytes": 1_000_000_000u64},
        added,
    ]);
    cfg["log_level"] = json!("debug");
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let from = server.proc.line_count();
    server.proc.signal("HUP");
    server
        .proc
        .wait_line_from(from, Duration::from_secs(10), |l| l.contains("reloaded"))
        .unwrap_or_else(|| panic!("no reload line:\n{}", server.proc.log_text()));

    let keys = user_keys(&server);
    assert!(
        keys.contains(&kept) && keys.contains(&added) && keys.contains(&api_user),
        "{keys:?}"
    );
    assert!(
        !keys.contains(&removed),
        "a key removed from config.json must go: {keys:?}"
    );
    let after = server.user(&kept);
    assert_eq!(after["limit_bytes"], 1_000_000_000u64, "{after}");
    assert_eq!(after["name"], "kept", "{after}");
    assert_eq!(
        after["bytes_down"], before["bytes_down"],
        "counters must survive a reload"
    );
    assert_eq!(after["connections"], before["connections"]);
    assert_eq!(
        after["online_sessions"], 1,
        "the live session must survive: {after}"
    );

    // The same session keeps working (no reconnect: `connections` does not move).
    assert_eq!(download(client.proxy, http, n).fnv, want);
    assert_eq!(server.user(&kept)["connections"], before["connections"]);
    // The new key works at once.
    let client2 = Client::start(server.udp, &added);
    assert_eq!(download(client2.proxy, http, n).fnv, want);
}

/// Rewrites config.json with `edit` and sends SIGHUP; returns the reload's log line.
fn reload_with(server: &Server, edit: impl FnOnce(&mut Value)) -> String {
    let path = server.dir.path().join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let from = server.proc.line_count();
    server.proc.signal("HUP");
    server
        .proc
        .wait_line_from(from, Duration::from_secs(10), |l| l.contains("reloaded"))
        .unwrap_or_else(|| panic!("no reload line:\n{}", server.proc.log_text()))
        .1
}

#[test]
fn sighup_during_a_limited_transfer_never_passes_the_limit() {
    let _heavy = heavy_lock();
    let key = new_key();
    let limit: u64 = 4 << 20;
    let mut spec = ServerSpec::new(&key);
    spec.config_keys = vec![(key.clone(), Some(limit))];
    let server = Server::start(spec);
    let client = Client::start(server.udp, &key);

    // A download far beyond the limit, while config.json keeps changing this key's name and
    // SIGHUP keeps reloading it: every reload re-reads the user's budget from the table while
    // up to a second of its traffic is not in the table yet.
    // The destination sends at about 6 MB/s (64 KiB every 10 ms), so the transfer up to the limit
    // spans many reloads even in a release build (over loopback it would otherwise take
    // milliseconds); the application reads as fast as it can.
    let source = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let source_addr = source.local_addr().unwrap();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = source.accept() else {
            return;
        };
        let chunk = vec![0x5a_u8; 64 * 1024];
        for _ in 0..(16 * limit / chunk.len() as u64) {
            if s.write_all(&chunk).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let proxy = client.proxy;
    let download = std::thread::spawn(move || {
        let mut s = socks5_connect(proxy, Target::Ip(source_addr))
            .unwrap_or_else(|code| panic!("SOCKS5 reply {code:#x}"));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut received = 0u64;
        let mut buf = [0u8; 64 * 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            received += n as u64;
        }
        received
    });
    let mut reloads = 0;
    while !download.is_finished() && reloads < 200 {
        reloads += 1;
        let name = format!("name {reloads}");
        reload_with(&server, |cfg| {
            cfg["access_keys"] = json!([{"key": key, "name": name, "limit_bytes": limit}]);
        });
        std::thread::sleep(Duration::from_millis(20));
    }
    let received = download.join().unwrap();
    let ((up, down), _) = server.wait_counters(&key, Duration::from_secs(3), |u, d| {
        u + d >= limit - (64 << 10)
    });
    eprintln!(
        "{reloads} reloads during the transfer: received {received}, counted {up}+{down} of a \
         {limit}-byte limit"
    );
    assert!(reloads >= 3, "the transfer ended before the reloads began");
    assert!(
        up + down <= limit + (256 << 10),
        "counted {up}+{down} with a limit of {limit}"
    );
    assert!(
        received <= limit,
        "received {received} bytes with a limit of {limit}"
    );
    assert!(
        received >= limit - (64 << 10),
        "only {received} bytes of a {limit}-byte allowance were delivered"
    );
}

#[test]
fn sighup_applies_allow_private_destinations_and_names_restart_only_fields() {
    let _heavy = heavy_lock();
    let http = start_http();
    let key = new_key();
    let server = Server::start(ServerSpec::new(&key)); // allow_private_destinations: true
    let client = Client::start(server.udp, &key);
    let local = Target::Ip(SocketAddr::from(([127, 0, 0, 1], http)));
    download(client.proxy, http, 100_000);

    let line = reload_with(&server, |cfg| {
        cfg["allow_private_destinations"] = json!(false)
    });
    assert!(line.contains("allow_private_destinations"), "{line}");
    // Loopback opened a moment ago: the first request may be answered early and reset.
    assert_eq!(
        socks5_refused_code(client.proxy, local),
        0x02,
        "SOCKS5 reply for a refused destination"
    );

    let from = server.proc.line_count();
    let line = reload_with(&server, |cfg| {
        cfg["allow_private_destinations"] = json!(true);
        cfg["max_sessions"] = json!(7);
    });
    assert!(line.contains("allow_private_destinations"), "{line}");
    let warning = server
        .proc
        .wait_line_from(from, Duration::from_secs(5), |l| l.contains("restart"))
        .unwrap_or_else(|| panic!("no restart warning:\n{}", server.proc.log_text()))
        .1;
    assert!(warning.contains("max_sessions"), "{warning}");
    assert!(!warning.contains("listen"), "{warning}");
    // The same session carries new connections to loopback again.
    download(client.proxy, http, 100_000);
}

#[test]
fn mux_keeps_n_sessions_and_carries_parallel_streams() {
    let _heavy = heavy_lock();
    let http = start_http();
    let key = new_key();
    let server = Server::start(ServerSpec::new(&key));
    let client = Client::spawn(
        server.udp,
        &key,
        json!({"mux": {"enabled": true, "sessions": 3}}),
    );
    wait_for("3 sessions", Duration::from_secs(20), || {
        server.user(&key)["online_sessions"] == 3
    });
    let n = 2_000_000;
    let want = expected_sum(http, n);
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let proxy = client.proxy;
            std::thread::spawn(move || download(proxy, http, n).fnv)
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), want);
    }
    let u = server.user(&key);
    assert_eq!(u["connections"], 3, "{u}");
    assert_eq!(u["online_sessions"], 3, "{u}");
}
