//! Operator features of the management API: `expire_at` and `enabled` enforced on live tunnels
//! (real server and client processes on loopback: the transfer is cut within a second, the
//! client logs why, extending or re-enabling lets it back), and `PATCH /api/users/{key}`
//! (partial updates, validation naming the field, responses checked against openapi.yaml).
//! Periodic resets across a boundary and across a restart that missed one are unit-tested with
//! an injected clock in `src/users` (`persist.rs`, `mod.rs`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::api::{CONFIG_KEY, OpenApi, TOKEN, TestServer};
use crate::support::tunnel::*;
use ostp::control::ControlMsg;
use serde_json::{Value, json};

const MIB: u64 = 1024 * 1024;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A download of `n` bytes in a thread; reports progress every MiB and, at the end, the bytes
/// received and the wall-clock time (unix ms) it ended.
fn background_download(
    proxy: SocketAddr,
    http: u16,
    n: u64,
    progress: mpsc::Sender<u64>,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let mut s: TcpStream = socks5_connect(proxy, http_target(http)).expect("SOCKS5 connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "GET /bytes/{n} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let (mut total, mut next_report) = (0u64, MIB);
        while let Ok(k) = s.read(&mut buf) {
            if k == 0 {
                break;
            }
            total += k as u64;
            if total >= next_report {
                let _ = progress.send(total);
                next_report += MIB;
            }
        }
        (total, unix_ms())
    })
}

/// Starts a never-ending download and waits until it moved a MiB.
fn running_download(client: &Client, http: u16) -> std::thread::JoinHandle<(u64, u64)> {
    let (tx, rx) = mpsc::channel();
    let download = background_download(client.proxy, http, 1 << 40, tx);
    let got = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the download started");
    assert!(got >= MIB);
    download
}

/// New requests fail; the client's next attempt (pulled forward by a request) is refused and
/// its log says `why`.
fn refused_saying(client: &Client, http: u16, why: &str) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        assert!(
            socks5_connect(client.proxy, http_target(http)).is_err(),
            "a new request got through"
        );
        if client.proc.log_text().contains(why) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("no {why:?} in the client log:\n{}", client.proc.log_text());
}

fn patch(server: &Server, key: &str, body: Value) -> Value {
    let (status, v) = server.api("PATCH", &format!("/api/users/{key}"), Some(body));
    assert_eq!(status, 200, "{v}");
    v
}

#[test]
fn an_expiring_user_is_cut_within_a_second_and_extending_expire_at_lets_it_back() {
    let _heavy = heavy_lock();
    let http = start_http();
    let server = Server::start(ServerSpec::new(&new_key()));
    let key = server.create_user(None);
    let client = Client::start(server.udp, &key);
    let download = running_download(&client, http);

    // Expire two seconds from now: no API call happens at the instant itself.
    let expire_at = unix_ms() / 1000 + 2;
    let v = patch(&server, &key, json!({"expire_at": expire_at}));
    assert_eq!(v["expire_at"], expire_at);
    let (total, ended_ms) = download.join().unwrap();
    let late = ended_ms as i64 - (expire_at * 1000) as i64;
    eprintln!("expired user: transfer ended {late} ms after expire_at, {total} bytes");
    assert!(late >= 0, "cut {} ms before expire_at", -late);
    assert!(
        late <= 1000,
        "the transfer went on {late} ms after expire_at"
    );
    refused_saying(&client, http, "access key expired");
    // Counters and settings are kept.
    let u = server.user(&key);
    assert!(u["bytes_down"].as_u64().unwrap() >= MIB, "{u}");

    let v = patch(&server, &key, json!({"expire_at": unix_ms() / 1000 + 3600}));
    assert_eq!(v["enabled"], true);
    let back = download_eventually(client.proxy, http, MIB, Duration::from_secs(40));
    eprintln!("after extending expire_at: first complete download after {back:?}");
    assert!(
        back < Duration::from_secs(10),
        "took {back:?} to get back in"
    );
}

#[test]
fn an_idle_session_is_closed_at_the_expiry_instant_without_any_api_call() {
    let _heavy = heavy_lock();
    let server = Server::start(ServerSpec::new(&new_key()));
    let key = server.create_user(None);
    let client = Client::start(server.udp, &key);
    let expire_at = unix_ms() / 1000 + 2;
    patch(&server, &key, json!({"expire_at": expire_at}));
    // No traffic, no API call: only the loop's own timer can act.
    let online = || server.api("GET", "/api/server/status", None).1["online_sessions"].clone();
    assert_eq!(online(), 1);
    while online() != 0 {
        assert!(
            unix_ms() < expire_at * 1000 + 1000,
            "the idle session outlived expire_at by a second"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let late = unix_ms() as i64 - (expire_at * 1000) as i64;
    eprintln!("idle expired session closed {late} ms after expire_at");
    assert!(late >= 0, "closed {} ms early", -late);
    let _ = client;
}

#[test]
fn a_disabled_user_is_cut_within_a_second_and_enabling_lets_it_back() {
    let _heavy = heavy_lock();
    let http = start_http();
    let server = Server::start(ServerSpec::new(&new_key()));
    let key = server.create_user(Some(1 << 40));
    let client = Client::spawn(server.udp, &key, json!({}));
    let download = running_download(&client, http);

    let disabled_at = unix_ms();
    let v = patch(&server, &key, json!({"enabled": false}));
    assert_eq!(v["enabled"], false);
    let (total, ended_ms) = download.join().unwrap();
    let cut_after = ended_ms.saturating_sub(disabled_at);
    eprintln!("disabled user: transfer ended {cut_after} ms after PATCH, {total} bytes");
    assert!(cut_after <= 1000, "the transfer went on {cut_after} ms");
    refused_saying(&client, http, "access key disabled");
    // Key, counters and limit are kept.
    let u = server.user(&key);
    assert_eq!(u["limit_bytes"], 1u64 << 40);
    assert!(u["bytes_down"].as_u64().unwrap() >= MIB, "{u}");
    let (_, v) = server.api("GET", "/api/server/status", None);
    assert_eq!(v["online_sessions"], 0, "{v}");

    patch(&server, &key, json!({"enabled": true}));
    let back = download_eventually(client.proxy, http, MIB, Duration::from_secs(40));
    eprintln!("after enabling: first complete download after {back:?}");
    assert!(
        back < Duration::from_secs(10),
        "took {back:?} to get back in"
    );
}

#[test]
fn patch_sets_only_the_fields_it_names_and_validates_each() {
    let api = OpenApi::load();
    let srv = TestServer::start(TOKEN);
    let mut c = srv.client();
    let key = "operator-key-0123456789";
    let r = c.send(
        "POST",
        "/api/users",
        Some(&format!(
            r#"{{"key":"{key}","name":"bob","limit_bytes":100,"expire_at":4102444800,"reset_strategy":"month","note":"tg:1"}}"#
        )),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    api.check("POST", "/api/users", &r);
    let v = r.json();
    assert_eq!(
        (
            &v["expire_at"],
            &v["enabled"],
            &v["reset_strategy"],
            &v["note"]
        ),
        (
            &json!(4102444800u64),
            &json!(true),
            &json!("month"),
            &json!("tg:1")
        )
    );
    let path = format!("/api/users/{key}");
    let r = c.send("GET", &path, None);
    api.check("GET", "/api/users/{key}", &r);
    let before = r.json();
    assert!(before["next_reset_at"].as_u64().is_some(), "{before}");
    assert!(before["last_reset_at"].is_null());
    srv.control.try_iter().for_each(drop);

    // A partial update: only the named fields change; the answer is the user.
    let r = c.send("PATCH", &path, Some(r#"{"note":null,"enabled":false}"#));
    assert_eq!(r.status, 200, "{}", r.text());
    api.check("PATCH", "/api/users/{key}", &r);
    let after = r.json();
    assert_eq!(
        (&after["note"], &after["enabled"]),
        (&Value::Null, &json!(false))
    );
    for same in [
        "name",
        "limit_bytes",
        "expire_at",
        "reset_strategy",
        "created_at",
    ] {
        assert_eq!(after[same], before[same], "{same}");
    }
    assert!(
        srv.control
            .try_iter()
            .any(|m| matches!(m, ControlMsg::UserChanged(_))),
        "the tunnel loop hears of it"
    );
    let r = c.send(
        "PATCH",
        &path,
        Some(r#"{"name":"carol","limit_bytes":null,"expire_at":null,"reset_strategy":"none","enabled":true,"note":"x"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    api.check("PATCH", "/api/users/{key}", &r);
    let v = r.json();
    assert_eq!(
        (
            &v["name"],
            &v["limit_bytes"],
            &v["expire_at"],
            &v["next_reset_at"]
        ),
        (&json!("carol"), &Value::Null, &Value::Null, &Value::Null)
    );
    // Durable before the answer.
    let on_disk = ostp::users::load_stored(&srv.config.state_file).unwrap();
    let stored = on_disk.iter().find(|u| u.key == key).unwrap();
    assert_eq!(stored.name.as_deref(), Some("carol"));

    // The subscription header carries the real expiry.
    c.send("PATCH", &path, Some(r#"{"expire_at":1900000000}"#));
    let r = c.send("GET", &format!("/api/subscribe/{key}"), None);
    assert_eq!(r.status, 200);
    let info = r.header("subscription-userinfo").unwrap();
    assert!(info.ends_with("; expire=1900000000"), "{info}");

    // 400s name the field.
    for (body, field) in [
        (r#"{"nope":1}"#, "nope"),
        (r#"{"expire_at":"soon"}"#, "expire_at"),
        (r#"{"expire_at":-5}"#, "expire_at"),
        (r#"{"expire_at":1.5}"#, "expire_at"),
        (r#"{"expire_at":1735689600000}"#, "milliseconds"),
        (r#"{"enabled":"false"}"#, "enabled"),
        (r#"{"enabled":null}"#, "enabled"),
        (r#"{"reset_strategy":"daily"}"#, "reset_strategy"),
        (r#"{"reset_strategy":null}"#, "reset_strategy"),
        (r#"{"limit_bytes":-1}"#, "limit_bytes"),
        (r#"{"name":5}"#, "name"),
        (r#"{"note":[1]}"#, "note"),
        (r#"{"note":"line\nbreak"}"#, "note"),
        (r#"{}"#, "no field"),
        ("", "empty"),
        ("[1]", "object"),
    ] {
        let r = c.send("PATCH", &path, Some(body));
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        api.check("PATCH", "/api/users/{key}", &r);
        let e = r.json()["error"].as_str().unwrap().to_string();
        assert!(e.contains(field), "{body}: {e}");
    }
    let long_note = format!(r#"{{"note":"{}"}}"#, "n".repeat(257));
    assert_eq!(c.send("PATCH", &path, Some(&long_note)).status, 400);
    let ok_note = format!(r#"{{"note":"{}"}}"#, "é".repeat(256));
    assert_eq!(c.send("PATCH", &path, Some(&ok_note)).status, 200);
    // POST validates the same fields.
    let r = c.send("POST", "/api/users", Some(r#"{"reset_strategy":"hourly"}"#));
    assert_eq!(r.status, 400);
    assert!(r.text().contains("reset_strategy"));
    // Nothing changed by the failures.
    let v = c.send("GET", &path, None).json();
    assert_eq!(
        (&v["name"], &v["expire_at"]),
        (&json!("carol"), &json!(1900000000u64))
    );

    // 404 unknown key; 409 the name of a config key (its other fields may be set).
    let r = c.send(
        "PATCH",
        "/api/users/unknown-key-0123456789",
        Some(r#"{"enabled":false}"#),
    );
    assert_eq!(r.status, 404);
    api.check("PATCH", "/api/users/{key}", &r);
    let cfg = format!("/api/users/{CONFIG_KEY}");
    let r = c.send("PATCH", &cfg, Some(r#"{"name":"renamed"}"#));
    assert_eq!(r.status, 409, "{}", r.text());
    api.check("PATCH", "/api/users/{key}", &r);
    let r = c.send("PATCH", &cfg, Some(r#"{"enabled":false,"note":"cfg"}"#));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["enabled"], false);
}
