//! The API front end against clients without credentials: idle-connection floods from one
//! address, cross-site and DNS-rebinding requests to an open API, token guessing, `100 Continue`
//! before authentication, and tokens that are unsafe or unusable (refused at load, never logged).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use ostp::api::Limits;

use crate::support::api::*;

const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

fn status_request(token: &str) -> String {
    format!(
        "GET /api/server/status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
}

/// Sends `request` on `s` and reads one response.
fn ask(mut s: TcpStream, request: &str) -> Option<Resp> {
    s.write_all(request.as_bytes()).ok()?;
    let (mut rs, _) = read_responses(&mut s, 1, Duration::from_secs(10));
    rs.pop()
}

/// 300 connections from 127.0.0.1 that never send a byte (more than the 256 the API holds),
/// kept topped up: every authenticated request from 127.0.0.2 is still answered 200.
/// (Before: the 257th client got 503 whenever nothing was idle, 78 of 79 times.)
#[test]
fn idle_connections_from_one_address_do_not_lock_out_another() {
    let srv = TestServer::start(TOKEN);
    let mut idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(srv.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut statuses = Vec::new();
    for _ in 0..20 {
        for _ in 0..15 {
            idle.push(TcpStream::connect(srv.addr).unwrap());
        }
        let s = connect_from(OTHER, srv.addr).expect("bind 127.0.0.2");
        statuses.push(ask(s, &status_request(TOKEN)).map(|r| r.status));
    }
    assert!(
        statuses.iter().all(|s| *s == Some(200)),
        "answers to the other address: {statuses:?}"
    );
    // The flooding address only displaced its own connections; it still gets answers too.
    let r = ask(
        TcpStream::connect(srv.addr).unwrap(),
        &status_request(TOKEN),
    );
    assert_eq!(r.map(|r| r.status), Some(200));
    drop(idle);
}

/// A connection that never completes its head is closed after `head_timeout`, long before
/// `request_timeout`, with a 408 if it sent anything.
#[test]
fn unfinished_heads_are_closed_after_the_head_timeout() {
    let limits = Limits {
        head_timeout: Duration::from_millis(800),
        ..Limits::default()
    };
    let srv = TestServer::start_with_limits(TOKEN, limits);
    let mut silent = TcpStream::connect(srv.addr).unwrap();
    let mut partial = TcpStream::connect(srv.addr).unwrap();
    partial.write_all(b"GET /api/users HTTP/1.1\r\n").unwrap();
    let t = std::time::Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(5)));
    let (rs, _) = read_responses(&mut partial, 1, Duration::from_secs(5));
    assert_eq!(rs.first().map(|r| r.status), Some(408));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
}

fn user_count(srv: &TestServer) -> usize {
    let mut c = Client::new(srv.addr, "");
    c.send("GET", "/api/users", None).json()["users"]
        .as_array()
        .unwrap()
        .len()
}

/// With no token, requests a web page could make the operator's browser send are refused with
/// a JSON 403 and change nothing: cross-site form-like POSTs, and DNS rebinding (a foreign
/// `Host`). Scripts and panels (no `Origin`, JSON bodies, a loopback `Host`) still work.
#[test]
fn open_api_refuses_cross_site_requests_and_foreign_hosts() {
    let srv = TestServer::start("");
    let before = user_count(&srv);
    let spec = OpenApi::load();
    let port = srv.addr.port();
    let body = r#"{"name":"csrf"}"#;
    let post = |host: &str, extra: &str, content_type: &str| {
        format!(
            "POST /api/users HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let local = format!("127.0.0.1:{port}");
    for (what, request) in [
        (
            "cross-site text/plain POST",
            post(&local, "Origin: http://evil.example\r\n", "text/plain"),
        ),
        (
            "cross-site JSON POST",
            post(
                &local,
                "Origin: http://evil.example\r\n",
                "application/json",
            ),
        ),
        (
            "Sec-Fetch-Site: cross-site",
            post(&local, "Sec-Fetch-Site: cross-site\r\n", "application/json"),
        ),
        ("text/plain without Origin", post(&local, "", "text/plain")),
        (
            "form POST",
            post(&local, "", "application/x-www-form-urlencoded"),
        ),
        (
            "foreign Host (DNS rebinding)",
            post(&format!("evil.example:{port}"), "", "application/json"),
        ),
        (
            "foreign Host, GET",
            format!("GET /api/users HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n"),
        ),
    ] {
        let r = ask(TcpStream::connect(srv.addr).unwrap(), &request)
            .unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(r.status, 403, "{what}: {}", r.text());
        let method = request.split(' ').next().unwrap();
        spec.check(method, "/api/users", &r);
    }
    assert_eq!(user_count(&srv), before, "nothing was created");
    // What a script or a same-origin page sends is still served.
    let mut c = Client::new(srv.addr, "");
    let r = c.send_with(
        "POST",
        "/api/users",
        &[
            ("Content-Type", "application/json"),
            ("Origin", "http://127.0.0.1"),
        ],
        Some(body),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = ask(
        TcpStream::connect(srv.addr).unwrap(),
        &format!("GET /api/users HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n"),
    );
    assert_eq!(r.map(|r| r.status), Some(200));
    assert_eq!(user_count(&srv), before + 1);
}

/// With a token, a foreign `Host` is not refused (a rebinding page cannot supply the token).
#[test]
fn with_a_token_the_host_is_not_checked() {
    let srv = TestServer::start(TOKEN);
    let r = ask(
        TcpStream::connect(srv.addr).unwrap(),
        &format!(
            "GET /api/server/status HTTP/1.1\r\nHost: api.example.net\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        ),
    );
    assert_eq!(r.map(|r| r.status), Some(200));
}

/// A flood of wrong tokens from one address gets 401 for its burst, then 429 with
/// `Retry-After` (even for the right token, which is then not compared); another address with
/// the right token is served throughout. (Before: ~8,000 guesses/s, all answered 401.)
#[test]
fn failed_authentications_are_rate_limited_per_address() {
    let limits = Limits {
        auth_failure_burst: 5,
        auth_failure_interval: Duration::from_secs(30),
        ..Limits::default()
    };
    let srv = TestServer::start_with_limits(TOKEN, limits);
    let spec = OpenApi::load();
    let mut statuses = Vec::new();
    for i in 0..40 {
        let r = ask(
            TcpStream::connect(srv.addr).unwrap(),
            &status_request(&format!("guess-{i:04}-0123456789")),
        )
        .expect("an answer");
        if r.status == 429 {
            let after: u32 = r.header("retry-after").unwrap().parse().unwrap();
            assert!((1..=30).contains(&after), "Retry-After: {after}");
            spec.check("GET", "/api/server/status", &r);
        }
        statuses.push(r.status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        35,
        "{statuses:?}"
    );
    let r = ask(
        TcpStream::connect(srv.addr).unwrap(),
        &status_request(TOKEN),
    );
    assert_eq!(r.map(|r| r.status), Some(429), "the flooding address waits");
    for _ in 0..3 {
        let s = connect_from(OTHER, srv.addr).expect("bind 127.0.0.2");
        let r = ask(s, &status_request(TOKEN));
        assert_eq!(r.map(|r| r.status), Some(200), "another address is served");
    }
}

/// `Expect: 100-continue` with a wrong token is answered 401 at once: no `100 Continue`
/// invites the body first.
#[test]
fn continue_is_not_sent_before_the_token_is_checked() {
    let srv = TestServer::start(TOKEN);
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"POST /api/users HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wrong-token-0123456789\r\nExpect: 100-continue\r\nContent-Length: 20\r\n\r\n",
    )
    .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while parse_response(&out).is_none() {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed without an answer");
        out.extend_from_slice(&buf[..n]);
    }
    assert!(
        out.starts_with(b"HTTP/1.1 401 "),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    // The right token still gets its `100 Continue`.
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "POST /api/users HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    .unwrap();
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"));
}

/// Tokens too short for a non-loopback bind, with edge spaces or non-ASCII characters are
/// refused at load with an error naming `api.token` (and not showing the token); a short token
/// allowed on loopback is never printed by `--check`.
#[test]
fn unsafe_or_unusable_tokens_are_refused_at_load_and_never_shown() {
    let dir = temp_dir("api-token");
    for (bind, token) in [
        ("0.0.0.0:9090", "x"),
        ("0.0.0.0:9090", "fifteen-chars!!"),
        ("127.0.0.1:9090", " leading-space-token"),
        ("127.0.0.1:9090", "trailing-space-token "),
        ("127.0.0.1:9090", "n\u{f6}n-ascii-token-value"),
    ] {
        let path = dir.join("config.json");
        let v = serde_json::json!({"mode": "server", "api": {"enabled": true, "bind": bind, "token": token}});
        std::fs::write(&path, v.to_string()).unwrap();
        let e = ostp::config::load(&path).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("`api.token`"), "{bind} {token:?}: {text}");
        assert!(!text.contains(token.trim()), "token shown: {text}");
    }
    std::fs::write(
        dir.join("config.json"),
        r#"{"mode":"server","api":{"enabled":true,"bind":"127.0.0.1:9090","token":"tok3n-8c"}}"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ostp"))
        .current_dir(&dir)
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("token to…"), "masked to a quarter: {s}");
    assert!(!s.contains("tok3n"), "a short token must not be shown: {s}");
}
