//! The Management API over real HTTP on loopback: every endpoint, every error status, the
//! spec's curl and Python examples, durability across restarts; each response is checked
//! against docs/openapi.yaml.

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use crate::support::api::*;
use ostp::api::Limits;
use ostp::control::ControlMsg;
use ostp::users::persist::lock_users;
use serde_json::json;

const SPEC_KEY: &str = "c8a6fde902b4e23910cde882b7cf1612";

#[test]
fn every_endpoint_answers_as_documented() {
    let api = OpenApi::load();
    let srv = TestServer::start(TOKEN);
    let mut c = srv.client();

    let r = c.send("GET", "/api/server/status", None);
    assert_eq!(r.status, 200);
    api.check("GET", "/api/server/status", &r);
    let v = r.json();
    assert_eq!(v["status"], "running");
    assert_eq!(v["total_users"], 1);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["uptime_seconds"].is_u64());

    // Create: generated key, custom key with limit and name, empty body.
    let r = c.send(
        "POST",
        "/api/users",
        Some(r#"{"limit_bytes": 10737418240}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    api.check("POST", "/api/users", &r);
    let gen_key = r.json()["key"].as_str().unwrap().to_string();
    assert_eq!(gen_key.len(), 32);
    assert!(
        gen_key
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    assert_eq!(r.json()["created"], true);
    assert_eq!(r.header("content-type"), Some("application/json"));

    let r = c.send(
        "POST",
        "/api/users",
        Some(&format!(
            r#"{{"key": "{SPEC_KEY}", "limit_bytes": 5, "name": "alice"}}"#
        )),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["key"], SPEC_KEY);
    let r = c.send("POST", "/api/users", None);
    assert_eq!(r.status, 200);
    let empty_key = r.json()["key"].as_str().unwrap().to_string();
    let r = c.send("POST", "/api/users", Some(r#"{"key": ""}"#));
    assert_eq!(r.status, 200, "empty key means generate");

    // The tunnel loop hears about new users.
    let msgs: Vec<ControlMsg> = srv.control.try_iter().collect();
    assert_eq!(
        msgs.iter()
            .filter(|m| matches!(m, ControlMsg::UserAdded(_)))
            .count(),
        4
    );

    // List and get.
    let r = c.send("GET", "/api/users", None);
    assert_eq!(r.status, 200);
    api.check("GET", "/api/users", &r);
    let users = r.json()["users"].as_array().unwrap().clone();
    assert_eq!(users.len(), 5);
    assert_eq!(
        users[0]["key"], CONFIG_KEY,
        "creation order, config keys first"
    );
    assert_eq!(users[0]["source"], "config");
    assert_eq!(users[0]["name"], "from-config");
    let alice = users.iter().find(|u| u["key"] == SPEC_KEY).unwrap();
    assert_eq!(alice["limit_bytes"], 5);
    assert_eq!(alice["name"], "alice");
    assert_eq!(alice["source"], "api");

    let r = c.send("GET", &format!("/api/users/{SPEC_KEY}"), None);
    assert_eq!(r.status, 200);
    api.check("GET", "/api/users/{key}", &r);
    assert_eq!(&r.json(), alice, "GET one = the list entry");

    // Traffic from the tunnel shows up; reset clears it.
    {
        let mut t = lock_users(&srv.users);
        let id = t.user_id(SPEC_KEY).unwrap();
        t.session_opened(id, 1_700_000_000);
        t.add_traffic(id, 100, 200);
    }
    let v = c
        .send("GET", &format!("/api/users/{SPEC_KEY}"), None)
        .json();
    assert_eq!(
        (
            &v["bytes_up"],
            &v["bytes_down"],
            &v["connections"],
            &v["online_sessions"]
        ),
        (&json!(100), &json!(200), &json!(1), &json!(1))
    );
    assert_eq!(v["last_seen"], 1_700_000_000u64);

    let r = c.send("POST", &format!("/api/users/{SPEC_KEY}/reset"), None);
    assert_eq!(r.status, 200);
    api.check("POST", "/api/users/{key}/reset", &r);
    let v = r.json();
    assert_eq!(
        (&v["bytes_up"], &v["bytes_down"], &v["connections"]),
        (&json!(0), &json!(0), &json!(0))
    );
    assert_eq!(v["online_sessions"], 1, "live sessions are not reset");

    // Limits: set, remove, on a config key.
    let r = c.send(
        "PUT",
        &format!("/api/users/{SPEC_KEY}/limit"),
        Some(r#"{"limit_bytes": 5368709120}"#),
    );
    assert_eq!(r.status, 200);
    api.check("PUT", "/api/users/{key}/limit", &r);
    assert_eq!(r.json()["limit_bytes"], 5368709120u64);
    let r = c.send(
        "PUT",
        &format!("/api/users/{SPEC_KEY}/limit"),
        Some(r#"{"limit_bytes": null}"#),
    );
    assert_eq!(r.status, 200);
    assert!(r.json()["limit_bytes"].is_null());
    let r = c.send(
        "PUT",
        &format!("/api/users/{CONFIG_KEY}/limit"),
        Some(r#"{"limit_bytes": 7}"#),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["limit_bytes"], 7);

    // Delete.
    let r = c.send("DELETE", &format!("/api/users/{empty_key}"), None);
    assert_eq!(r.status, 200);
    api.check("DELETE", "/api/users/{key}", &r);
    assert_eq!(r.json(), json!({"key": empty_key, "deleted": true}));
    let r = c.send("GET", &format!("/api/users/{empty_key}"), None);
    assert_eq!(r.status, 404);
    let msgs: Vec<ControlMsg> = srv.control.try_iter().collect();
    assert!(msgs.iter().any(|m| matches!(m, ControlMsg::UserRemoved(_))));
    assert!(msgs.iter().any(|m| matches!(m, ControlMsg::UserChanged(_))));

    // Every acknowledged change is already on disk.
    let on_disk = ostp::users::load_stored(&srv.config.state_file).unwrap();
    assert!(on_disk.iter().all(|u| u.key != empty_key));
    assert_eq!(
        on_disk
            .iter()
            .find(|u| u.key == CONFIG_KEY)
            .unwrap()
            .limit_bytes,
        Some(7)
    );
}

#[test]
fn subscribe_gives_config_or_share_link() {
    let api = OpenApi::load();
    let srv = TestServer::start(TOKEN);
    {
        let mut t = lock_users(&srv.users);
        let id = t.user_id(CONFIG_KEY).unwrap();
        t.add_traffic(id, 3, 4);
    }
    // No token needed.
    let mut c = Client::new(srv.addr, "");
    let path = format!("/api/subscribe/{CONFIG_KEY}");

    let r = c.send_with("GET", &path, &[("Host", "example.com:9090")], None);
    assert_eq!(r.status, 200);
    api.check("GET", "/api/subscribe/{key}", &r);
    let v = r.json();
    assert_eq!(v["ok"], true);
    assert_eq!(
        v["data"],
        json!({
            "mode": "client", "server": "127.0.0.1:50123", "access_key": CONFIG_KEY,
            "socks5_bind": "127.0.0.1:1088", "tun": {"enable": false, "dns": "1.1.1.1"},
            "turn": {"enabled": false}, "mux": {"enabled": false, "sessions": 1}, "debug": false
        }),
        "the client sends Host: 127.0.0.1 first (our Client adds it), so that wins"
    );
    assert_eq!(v["carriers"], json!(["udp"]), "no TCP listener: UDP only");
    assert_eq!(
        r.header("subscription-userinfo"),
        Some("upload=3; download=4; total=1000; expire=0")
    );
    assert_eq!(r.header("profile-update-interval"), Some("12"));

    // Raw requests to control the Host header exactly.
    let get = |headers: &str| {
        let raw = raw_exchange(
            srv.addr,
            format!("GET {path} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        );
        parse_response(&raw).expect("a response").0
    };
    let r = get("Host: example.com:9090\r\nAccept: text/plain\r\n");
    assert_eq!(r.status, 200);
    api.check("GET", "/api/subscribe/{key}", &r);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.text(), format!("ostp://{CONFIG_KEY}@example.com:50123\n"));

    let r = get("Host: [2001:db8::7]:9090\r\nAccept: text/plain\r\n");
    assert_eq!(
        r.text(),
        format!("ostp://{CONFIG_KEY}@[2001:db8::7]:50123\n")
    );
    let r = get("Accept: text/plain\r\n");
    assert_eq!(
        r.text(),
        format!("ostp://{CONFIG_KEY}@127.0.0.1:50123\n"),
        "no Host: bind IP"
    );
    let r = get("Host: bad host/\r\nAccept: text/plain\r\n");
    assert_eq!(
        r.text(),
        format!("ostp://{CONFIG_KEY}@127.0.0.1:50123\n"),
        "invalid Host ignored"
    );

    for (accept, json) in [
        ("*/*", true),
        ("application/json", true),
        ("text/plain;q=0.9, */*", true),
        ("text/plain, */*;q=0.1", false),
        ("text/*", false),
    ] {
        let r = get(&format!("Host: h.example\r\nAccept: {accept}\r\n"));
        assert_eq!(r.status, 200);
        let is_json = r.header("content-type") == Some("application/json");
        assert_eq!(is_json, json, "Accept: {accept}");
        api.check("GET", "/api/subscribe/{key}", &r);
    }

    // Unknown and malformed keys: 404 {"ok": false, ...}; wrong method 405.
    for p in [
        "/api/subscribe/0000000000000000000000000000dead",
        "/api/subscribe/short",
    ] {
        let r = c.send("GET", p, None);
        assert_eq!(r.status, 404);
        api.check("GET", "/api/subscribe/{key}", &r);
        assert_eq!(r.json()["ok"], false);
    }
    let r = c.send("POST", &path, None);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET"));
    api.check("GET", "/api/subscribe/{key}", &r);
}

#[test]
fn public_host_wins_over_the_host_header() {
    let dir = temp_dir("api-pubhost");
    let cfg = write_config(&dir, TOKEN, 0, json!([CONFIG_KEY]));
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["public_host"] = json!("vpn.example.org");
    std::fs::write(&cfg, v.to_string()).unwrap();
    let srv = TestServer::start_in(&dir, TOKEN, Default::default());
    let mut c = Client::new(srv.addr, "");
    let r = c.send_with(
        "GET",
        &format!("/api/subscribe/{CONFIG_KEY}"),
        &[("Accept", "text/plain")],
        None,
    );
    assert_eq!(
        r.text(),
        format!("ostp://{CONFIG_KEY}@vpn.example.org:50123\n")
    );
}

#[test]
fn error_statuses_are_json_and_documented() {
    let api = OpenApi::load();
    let srv = TestServer::start(TOKEN);
    let mut c = srv.client();
    let user = format!("/api/users/{SPEC_KEY}");
    assert_eq!(
        c.send(
            "POST",
            "/api/users",
            Some(&format!(r#"{{"key":"{SPEC_KEY}"}}"#))
        )
        .status,
        200
    );

    let expect =
        |c: &mut Client, method: &str, path: &str, tmpl: &str, body: Option<&str>, status: u16| {
            let r = c.send(method, path, body);
            assert_eq!(r.status, status, "{method} {path} {body:?}: {}", r.text());
            assert_eq!(r.header("content-type"), Some("application/json"));
            assert!(r.json()["error"].as_str().is_some_and(|e| !e.is_empty()));
            api.check(method, tmpl, &r);
            r
        };

    // 400
    for body in [
        "{",
        "[]",
        "42",
        r#"{"limit_bytes": -1}"#,
        r#"{"limit_bytes": 1.5}"#,
        r#"{"limit_bytes": 1e3}"#,
        r#"{"limit_bytes": "10"}"#,
        r#"{"limit_bytes": 18446744073709551616}"#,
        r#"{"key": "short"}"#,
        r#"{"key": "has/slash/0123456789"}"#,
        r#"{"key": 12345678901234567890}"#,
        r#"{"name": 5}"#,
        r#"{"limt_bytes": 5}"#,
    ] {
        expect(&mut c, "POST", "/api/users", "/api/users", Some(body), 400);
    }
    let limit = format!("{user}/limit");
    for body in [
        "",
        "{}",
        r#"{"limit_bytes": -5}"#,
        r#"{"limit_bytes": 0.5}"#,
        r#"{"limit_bytes": 1, "x": 2}"#,
        "null",
    ] {
        expect(
            &mut c,
            "PUT",
            &limit,
            "/api/users/{key}/limit",
            Some(body),
            400,
        );
    }
    expect(
        &mut c,
        "GET",
        "/api/users/bad!key",
        "/api/users/{key}",
        None,
        400,
    );
    // Invalid UTF-8 body.
    let mut bytes = format!(
        "POST /api/users HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    bytes.extend_from_slice(&[0xff, 0xfe, 0xfd]);
    let r = parse_response(&raw_exchange(srv.addr, &bytes, Duration::from_secs(5)))
        .unwrap()
        .0;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("UTF-8"));

    // 401 with WWW-Authenticate: missing, empty, wrong scheme, wrong token.
    for auth in [
        None,
        Some("Bearer "),
        Some("Bearer"),
        Some("Basic dXNlcjpwYXNz"),
        Some("Bearer wrong-token"),
        Some(TOKEN),
    ] {
        let mut c = Client::new(srv.addr, "");
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let r = c.send_with("GET", "/api/users", &headers, None);
        assert_eq!(r.status, 401, "{auth:?}");
        assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
        api.check("GET", "/api/users", &r);
        assert!(!r.text().contains(TOKEN));
    }

    // 404: unknown user, unknown route.
    expect(
        &mut c,
        "GET",
        "/api/users/0000000000000000000000000000beef",
        "/api/users/{key}",
        None,
        404,
    );
    expect(
        &mut c,
        "DELETE",
        "/api/users/0000000000000000000000000000beef",
        "/api/users/{key}",
        None,
        404,
    );
    expect(
        &mut c,
        "PUT",
        "/api/users/0000000000000000000000000000beef/limit",
        "/api/users/{key}/limit",
        Some(r#"{"limit_bytes":1}"#),
        404,
    );
    expect(
        &mut c,
        "POST",
        "/api/users/0000000000000000000000000000beef/reset",
        "/api/users/{key}/reset",
        None,
        404,
    );
    for p in ["/", "/api", "/api/nope", "/api/users/x/y/z", "/api/users/"] {
        let r = c.send("GET", p, None);
        assert_eq!(r.status, 404, "{p}");
        assert!(r.json()["error"].is_string());
    }

    // 405 with Allow.
    for (m, p, t, allow) in [
        (
            "DELETE",
            "/api/users".to_string(),
            "/api/users",
            "GET, POST",
        ),
        (
            "POST",
            "/api/server/status".to_string(),
            "/api/server/status",
            "GET",
        ),
        (
            "PUT",
            user.clone(),
            "/api/users/{key}",
            "GET, PATCH, DELETE",
        ),
        ("GET", limit.clone(), "/api/users/{key}/limit", "PUT"),
        (
            "GET",
            format!("{user}/reset"),
            "/api/users/{key}/reset",
            "POST",
        ),
        (
            "POST",
            user.clone(),
            "/api/users/{key}",
            "GET, PATCH, DELETE",
        ),
    ] {
        let r = c.send(m, &p, None);
        assert_eq!(r.status, 405, "{m} {p}");
        assert_eq!(r.header("allow"), Some(allow));
        assert!(r.json()["error"].is_string());
        let _ = t;
    }

    // 409: duplicate key, deleting a config key.
    expect(
        &mut c,
        "POST",
        "/api/users",
        "/api/users",
        Some(&format!(r#"{{"key":"{SPEC_KEY}"}}"#)),
        409,
    );
    let r = expect(
        &mut c,
        "DELETE",
        &format!("/api/users/{CONFIG_KEY}"),
        "/api/users/{key}",
        None,
        409,
    );
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("remove it from config.json")
    );

    // 413: body over 64 KiB, answered without reading it all.
    let big = format!(r#"{{"name": "{}"}}"#, "a".repeat(70_000));
    let r = c.send("POST", "/api/users", Some(&big));
    assert_eq!(r.status, 413);
    api.check("POST", "/api/users", &r);
    // Exactly 64 KiB is accepted by the transport (then rejected by validation).
    let edge = format!(r#"{{"name": "{}"}}"#, "a".repeat(65_536 - 12));
    assert_eq!(edge.len(), 65_536);
    let r = c.send("POST", "/api/users", Some(&edge));
    assert_eq!(r.status, 400);

    // Transport-level errors.
    let status_of = |bytes: &[u8]| {
        let out = raw_exchange(srv.addr, bytes, Duration::from_secs(5));
        let r = parse_response(&out).expect("an answer").0;
        assert_eq!(r.header("content-type"), Some("application/json"));
        r.status
    };
    assert_eq!(status_of(b"GET /api/users HTTP/2.0\r\n\r\n"), 505);
    assert_eq!(
        status_of(b"POST /api/users HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        411
    );
    assert_eq!(
        status_of(b"GET /api/users HTTP/1.1\r\nExpect: 200-ok\r\n\r\n"),
        417
    );
    let mut huge = b"GET /api/users HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 20_000));
    huge.extend_from_slice(b"\r\n\r\n");
    assert_eq!(status_of(&huge), 431);
    assert_eq!(status_of(b"garbage\r\n\r\n"), 400);
}

#[test]
fn expect_100_continue_is_honoured() {
    let srv = TestServer::start(TOKEN);
    let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    use std::io::{Read, Write};
    let body = r#"{"limit_bytes": 1}"#;
    write!(
        s,
        "POST /api/users HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"));
    s.write_all(body.as_bytes()).unwrap();
    let mut out = buf[25..n].to_vec();
    while parse_response(&out).is_none() {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        out.extend_from_slice(&buf[..n]);
    }
    assert_eq!(parse_response(&out).unwrap().0.status, 200);
}

#[test]
fn open_api_needs_no_token() {
    let srv = TestServer::start("");
    for auth in [
        None,
        Some("Bearer "),
        Some("garbage"),
        Some("Bearer anything"),
    ] {
        let mut c = Client::new(srv.addr, "");
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let r = c.send_with("GET", "/api/users", &headers, None);
        assert_eq!(r.status, 200, "{auth:?}");
    }
}

#[test]
fn changes_survive_a_restart_and_config_limit_precedence_holds() {
    let dir = temp_dir("api-restart");
    let mut srv = TestServer::start_in(&dir, TOKEN, Default::default());
    let mut c = srv.client();
    let k = c
        .send(
            "POST",
            "/api/users",
            Some(r#"{"limit_bytes": 42, "name": "bob"}"#),
        )
        .json()["key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        c.send(
            "PUT",
            &format!("/api/users/{CONFIG_KEY}/limit"),
            Some(r#"{"limit_bytes": 555}"#)
        )
        .status,
        200
    );
    {
        let mut t = lock_users(&srv.users);
        let id = t.user_id(CONFIG_KEY).unwrap();
        t.add_traffic(id, 10, 20);
    }
    srv.persister.flush_now().unwrap();
    srv.stop();
    drop(srv);

    // Same config: API user, API limit on the config key and counters are back.
    let mut srv = TestServer::start_in(&dir, TOKEN, Default::default());
    let mut c = srv.client();
    let v = c.send("GET", &format!("/api/users/{k}"), None).json();
    assert_eq!((&v["limit_bytes"], &v["name"]), (&json!(42), &json!("bob")));
    let v = c
        .send("GET", &format!("/api/users/{CONFIG_KEY}"), None)
        .json();
    assert_eq!(
        (&v["limit_bytes"], &v["bytes_up"], &v["bytes_down"]),
        (&json!(555), &json!(10), &json!(20))
    );
    srv.stop();
    drop(srv);

    // config.json changes that key's limit_bytes: config wins.
    write_config(
        &dir,
        TOKEN,
        0,
        json!([{"key": CONFIG_KEY, "name": "from-config", "limit_bytes": 2000}]),
    );
    let srv = TestServer::start_in(&dir, TOKEN, Default::default());
    let mut c = srv.client();
    let v = c
        .send("GET", &format!("/api/users/{CONFIG_KEY}"), None)
        .json();
    assert_eq!(v["limit_bytes"], 2000);
    assert_eq!(v["bytes_up"], 10, "counters survive a config change");
    assert_eq!(c.send("GET", &format!("/api/users/{k}"), None).status, 200);
}

#[test]
fn corrupt_state_file_refuses_to_start() {
    let dir = temp_dir("api-corrupt");
    let cfg = write_config(&dir, TOKEN, 0, json!([CONFIG_KEY]));
    std::fs::write(
        dir.join("state.json"),
        b"{\"format\": \"ostp-state\", \"vers",
    )
    .unwrap();
    let e = ostp::users::open(&load_server_config(&cfg))
        .err()
        .expect("must refuse");
    assert!(e.to_string().contains("Refusing to start"), "{e}");
    // The file was not overwritten.
    assert_eq!(
        std::fs::read(dir.join("state.json")).unwrap(),
        b"{\"format\": \"ostp-state\", \"vers"
    );
}

fn curl_available() -> bool {
    Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The spec's curl commands, verbatim except for the address (and `| jq`, which only
/// pretty-prints).
#[test]
fn spec_curl_examples_work() {
    if !curl_available() {
        eprintln!("SKIPPED: curl is not installed (CI installs it)");
        return;
    }
    let api = OpenApi::load();
    let srv = TestServer::start("mytoken");
    let base = format!("http://{}", srv.addr);
    let run = |cmd: &str| -> String {
        let cmd = cmd
            .replace("http://127.0.0.1:9090", &base)
            .replace(" | jq", "");
        let out = Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let v: serde_json::Value =
        serde_json::from_str(&run(r#"curl -s -H "Authorization: Bearer mytoken" \
  http://127.0.0.1:9090/api/server/status | jq"#))
        .unwrap();
    assert_eq!(v["status"], "running");

    let v: serde_json::Value = serde_json::from_str(&run(r#"curl -s -X POST \
  -H "Authorization: Bearer mytoken" \
  -H "Content-Type: application/json" \
  -d '{"limit_bytes": 10737418240}' \
  http://127.0.0.1:9090/api/users | jq"#))
    .unwrap();
    assert_eq!(v["created"], true);
    // The spec's examples act on this key; create it.
    let mut c = Client::new(srv.addr, "mytoken");
    assert_eq!(
        c.send(
            "POST",
            "/api/users",
            Some(&format!(r#"{{"key":"{SPEC_KEY}"}}"#))
        )
        .status,
        200
    );
    {
        let mut t = lock_users(&srv.users);
        let id = t.user_id(SPEC_KEY).unwrap();
        t.add_traffic(id, 9, 9);
    }

    let v: serde_json::Value =
        serde_json::from_str(&run(r#"curl -s -H "Authorization: Bearer mytoken" \
  http://127.0.0.1:9090/api/users | jq"#))
        .unwrap();
    assert_eq!(v["users"].as_array().unwrap().len(), 3);

    let out = run(r#"curl -s -X PUT \
  -H "Authorization: Bearer mytoken" \
  -H "Content-Type: application/json" \
  -d '{"limit_bytes": 5368709120}' \
  http://127.0.0.1:9090/api/users/c8a6fde902b4e23910cde882b7cf1612/limit"#);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["limit_bytes"],
        5368709120u64
    );

    let out = run(r#"curl -s -X POST \
  -H "Authorization: Bearer mytoken" \
  http://127.0.0.1:9090/api/users/c8a6fde902b4e23910cde882b7cf1612/reset"#);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["bytes_up"],
        0
    );

    let out =
        run("curl -s http://127.0.0.1:9090/api/subscribe/c8a6fde902b4e23910cde882b7cf1612 | jq");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["data"]["access_key"], SPEC_KEY);
    let out = run(r#"curl -s -H "Accept: text/plain" \
  http://127.0.0.1:9090/api/subscribe/c8a6fde902b4e23910cde882b7cf1612"#);
    assert_eq!(out, format!("ostp://{SPEC_KEY}@127.0.0.1:50123\n"));

    let out = run(r#"curl -s -X DELETE \
  -H "Authorization: Bearer mytoken" \
  http://127.0.0.1:9090/api/users/c8a6fde902b4e23910cde882b7cf1612"#);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        json!({"key": SPEC_KEY, "deleted": true})
    );

    // Status codes as curl sees them (-w), incl. 401 and 413 through a real client.
    let code = |args: &str| run(&format!("curl -s -o /dev/null -w '%{{http_code}}' {args}"));
    assert_eq!(code("http://127.0.0.1:9090/api/users"), "401");
    assert_eq!(
        code(
            r#"-H "Authorization: Bearer mytoken" http://127.0.0.1:9090/api/users/c8a6fde902b4e23910cde882b7cf1612"#
        ),
        "404"
    );
    let big = srv.dir.join("big.json");
    std::fs::write(&big, format!(r#"{{"name":"{}"}}"#, "x".repeat(100_000))).unwrap();
    assert_eq!(
        code(&format!(
            r#"-X POST -H "Authorization: Bearer mytoken" --data-binary @{} http://127.0.0.1:9090/api/users"#,
            big.display()
        )),
        "413"
    );
    let _ = api;
}

/// The spec's Python snippet, verbatim except for API and TOKEN.
#[test]
fn spec_python_example_works() {
    let has_requests = Command::new("python3")
        .args(["-c", "import requests"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_requests {
        eprintln!("SKIPPED: python3 with requests is not installed (CI installs python3-requests)");
        return;
    }
    let srv = TestServer::start("your-secret-api-token");
    let script = r#"import requests

API = "http://127.0.0.1:9090"
TOKEN = "your-secret-api-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}

# List users
users = requests.get(f"{API}/api/users", headers=HEADERS).json()
for user in users["users"]:
    print(f"Key: {user['key'][:8]}... | ↑{user['bytes_up']} ↓{user['bytes_down']}")

# Create user
resp = requests.post(f"{API}/api/users", headers=HEADERS,
                     json={"limit_bytes": 10 * 1024**3})
print(f"New key: {resp.json()['key']}")
"#
    .replace("http://127.0.0.1:9090", &format!("http://{}", srv.addr));
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("Key: cfgkey01... | ↑0 ↓0"), "{text}");
    let new_key = text
        .lines()
        .last()
        .unwrap()
        .strip_prefix("New key: ")
        .unwrap();
    let u = lock_users(&srv.users).get_by_key(new_key).cloned().unwrap();
    assert_eq!(u.limit_bytes, Some(10 * 1024u64.pow(3)));
}

#[test]
fn large_user_list_arrives_complete() {
    let srv = TestServer::start(TOKEN);
    {
        let mut t = lock_users(&srv.users);
        for i in 0..3000 {
            t.create(format!("{i:032x}"), None, Some(i), 0).unwrap();
        }
    }
    let r = srv.client().send("GET", "/api/users", None);
    assert_eq!(r.status, 200);
    assert!(
        r.header("transfer-encoding").is_none(),
        "sent with Content-Length"
    );
    let users = r.json()["users"].as_array().unwrap().len();
    assert_eq!(users, 3001);
}

/// Whether `python3` with `requests` is available (CI installs python3-requests).
fn has_python_requests() -> bool {
    Command::new("python3")
        .args(["-c", "import requests"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Regression (issue 7, bug 2): a `requests.Session` (what panels and bots use) reuses its
/// connection; the server must keep it open as announced, or say `Connection: close`. Before the
/// fix, responses did not say `close` but the connection was closed, and some requests failed
/// with `RemoteDisconnected` (POSTs then not applied).
#[test]
fn python_session_keep_alive_2000_gets_300_posts_no_failure() {
    if !has_python_requests() {
        eprintln!("SKIPPED: python3 with requests is not installed (CI installs python3-requests)");
        return;
    }
    let srv = TestServer::start(TOKEN);
    let script = r#"import sys, requests

API, TOKEN = sys.argv[1], sys.argv[2]
s = requests.Session()
s.headers["Authorization"] = f"Bearer {TOKEN}"
failures = []
conn_headers = set()
for i in range(2000):
    try:
        r = s.get(f"{API}/api/server/status", timeout=10)
        conn_headers.add(r.headers.get("Connection"))
        if r.status_code != 200:
            failures.append(f"GET {i}: {r.status_code}")
    except Exception as e:
        failures.append(f"GET {i}: {e!r}")
for i in range(300):
    try:
        r = s.post(f"{API}/api/users", json={"key": f"keepalive-{i:04d}-abcdef", "limit_bytes": i}, timeout=10)
        if r.status_code != 200:
            failures.append(f"POST {i}: {r.status_code} {r.text}")
    except Exception as e:
        failures.append(f"POST {i}: {e!r}")
for i in range(300):
    try:
        r = s.get(f"{API}/api/users/keepalive-{i:04d}-abcdef", timeout=10)
        if r.status_code != 200 or r.json()["limit_bytes"] != i:
            failures.append(f"verify {i}: {r.status_code} {r.text}")
    except Exception as e:
        failures.append(f"verify {i}: {e!r}")
print("connection headers:", sorted(str(h) for h in conn_headers))
print("failures:", len(failures))
for f in failures[:20]:
    print(f)
"#;
    let out = Command::new("python3")
        .args(["-c", script, &format!("http://{}", srv.addr), TOKEN])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("failures: 0\n"), "{text}");
    assert!(
        text.contains("connection headers: ['keep-alive']"),
        "every response says keep-alive: {text}"
    );
    let table = lock_users(&srv.users);
    for i in 0..300u64 {
        let u = table
            .get_by_key(&format!("keepalive-{i:04}-abcdef"))
            .unwrap_or_else(|| panic!("user {i} was not created"));
        assert_eq!(u.limit_bytes, Some(i));
    }
}

fn get_request(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n{extra}\r\n")
}

/// Two requests in one write (pipelining): both are answered, in order, on one connection that
/// stays open; a third sent after reading those answers is answered too.
#[test]
fn pipelined_and_sequential_requests_on_one_connection_are_all_answered() {
    let srv = TestServer::start(TOKEN);
    let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
    let two = format!(
        "{}{}",
        get_request("/api/server/status", ""),
        get_request("/api/users/nonexistent-key-0000", "")
    );
    s.write_all(two.as_bytes()).unwrap();
    let (rs, closed) = read_responses(&mut s, 2, Duration::from_secs(5));
    assert_eq!(rs.len(), 2, "the pipelined second request was dropped");
    assert!(!closed);
    assert_eq!(rs[0].status, 200);
    assert_eq!(rs[1].status, 404);
    for r in &rs {
        assert_eq!(r.header("connection"), Some("keep-alive"));
    }
    // A second exchange after reading the first answers.
    s.write_all(get_request("/api/users", "").as_bytes())
        .unwrap();
    let (rs, _) = read_responses(&mut s, 1, Duration::from_secs(5));
    assert_eq!(rs.len(), 1, "the request after a response was dropped");
    assert_eq!(rs[0].status, 200);
    assert!(rs[0].json()["users"].is_array());
    // A pipelined request split across writes, with a POST body in between.
    let body = r#"{"key": "pipelined-user-0001", "limit_bytes": 5}"#;
    let post = format!(
        "POST /api/users HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let both = format!(
        "{post}{}",
        get_request("/api/users/pipelined-user-0001", "")
    );
    let (a, b) = both.as_bytes().split_at(post.len() + 7);
    s.write_all(a).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(b).unwrap();
    let (rs, _) = read_responses(&mut s, 2, Duration::from_secs(5));
    assert_eq!(rs.len(), 2);
    assert_eq!(rs[0].status, 200, "{}", rs[0].text());
    assert_eq!(rs[1].status, 200, "{}", rs[1].text());
    assert_eq!(rs[1].json()["limit_bytes"], 5);
}

/// `Connection: close` and HTTP/1.0 close after the answer and say so; HTTP/1.0 with
/// `Connection: keep-alive` stays open; a malformed request is answered, then closed (and the
/// answer says so), even with a well-formed request pipelined behind it.
#[test]
fn connection_header_is_honoured_and_truthful() {
    let srv = TestServer::start(TOKEN);
    let exchange = |req: &str| {
        let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let (rs, _) = read_responses(&mut s, 1, Duration::from_secs(5));
        assert_eq!(rs.len(), 1, "no answer to {req:?}");
        let closed = closed_within(&mut s, Duration::from_secs(1));
        (rs[0].clone(), closed)
    };
    let (r, closed) = exchange(&get_request("/api/server/status", "Connection: close\r\n"));
    assert_eq!(
        (r.status, r.header("connection"), closed),
        (200, Some("close"), true)
    );
    let (r, closed) = exchange(&format!(
        "GET /api/server/status HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    ));
    assert_eq!(
        (r.status, r.header("connection"), closed),
        (200, Some("close"), true)
    );
    let (r, closed) = exchange(&format!(
        "GET /api/server/status HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\nConnection: keep-alive\r\n\r\n"
    ));
    assert_eq!(
        (r.status, r.header("connection"), closed),
        (200, Some("keep-alive"), false)
    );
    let (r, closed) = exchange(&format!(
        "GET /api/x HTTP/1.1\r\nBad Header: y\r\n\r\n{}",
        get_request("/api/server/status", "")
    ));
    assert_eq!(
        (r.status, r.header("connection"), closed),
        (400, Some("close"), true)
    );
    // A handler's 4xx (not malformed HTTP) keeps the connection.
    let (r, closed) = exchange(&get_request("/api/users/nonexistent-key-0000", ""));
    assert_eq!(
        (r.status, r.header("connection"), closed),
        (404, Some("keep-alive"), false)
    );
}

/// An idle keep-alive connection is closed after `idle_timeout`; at the connection cap the
/// oldest idle keep-alive connection makes room for a new client (which is served) before any
/// connection in the middle of a request; with none idle, the oldest unfinished head goes.
#[test]
fn idle_keep_alive_connections_time_out_and_yield_to_new_clients() {
    let limits = Limits {
        max_connections: 3,
        idle_timeout: Duration::from_millis(1500),
        ..Limits::default()
    };
    let srv = TestServer::start_with_limits(TOKEN, limits);
    let served = |s: &mut std::net::TcpStream| {
        s.write_all(get_request("/api/server/status", "").as_bytes())
            .unwrap();
        let (rs, _) = read_responses(s, 1, Duration::from_secs(5));
        rs.len() == 1 && rs[0].status == 200
    };
    let connect = || std::net::TcpStream::connect(srv.addr).unwrap();
    // Idle timeout.
    let mut a = connect();
    assert!(served(&mut a));
    let t = std::time::Instant::now();
    assert!(closed_within(&mut a, Duration::from_secs(5)));
    assert!(
        t.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
    // Cap: `old` and `newer` idle after one request, `busy` has sent half a request.
    let mut old = connect();
    assert!(served(&mut old));
    std::thread::sleep(Duration::from_millis(50));
    let mut newer = connect();
    assert!(served(&mut newer));
    let mut busy = connect();
    busy.write_all(b"GET /api/server/status HTTP/1.1\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut fresh = connect();
    assert!(served(&mut fresh), "a new client is served at the cap");
    assert!(
        closed_within(&mut old, Duration::from_millis(500)),
        "oldest idle evicted"
    );
    assert!(served(&mut newer), "the newer idle connection still works");
    busy.write_all(format!("Authorization: Bearer {TOKEN}\r\n\r\n").as_bytes())
        .unwrap();
    let (rs, _) = read_responses(&mut busy, 1, Duration::from_secs(5));
    assert_eq!(rs.len(), 1, "a connection mid-request is never evicted");
    assert_eq!(rs[0].status, 200);
    // No idle connection: the least advanced request of the address holding the most
    // connections (all are 127.0.0.1 here) makes room, the oldest first.
    for s in [&mut newer, &mut busy, &mut fresh] {
        s.write_all(b"GET /api/server/status HTTP/1.1\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(50));
    let mut late = connect();
    assert!(
        served(&mut late),
        "a new client is served when none is idle"
    );
    assert!(
        closed_within(&mut newer, Duration::from_millis(500)),
        "the oldest partial request made room"
    );
    busy.write_all(format!("Authorization: Bearer {TOKEN}\r\n\r\n").as_bytes())
        .unwrap();
    let (rs, _) = read_responses(&mut busy, 1, Duration::from_secs(5));
    assert_eq!(rs.len(), 1, "a younger partial request is kept");
}
