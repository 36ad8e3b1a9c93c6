//! Device limits and client addresses with real server and client processes: `max_devices: 1`
//! with clients whose UDP sockets are bound to 127.0.0.2 and 127.0.0.3 (client config
//! `udp_bind_ip`): the second is refused while the first lives and admitted after it leaves;
//! `GET /api/users/{key}/ips` shows both addresses with the right live flags; every response
//! is checked against openapi.yaml. The admission rule itself is unit-tested in
//! `src/proto/endpoint/server.rs`, the address list in `src/users/devices.rs`.

use std::time::Duration;

use crate::support::api::{Client as ApiClient, OpenApi, Resp};
use crate::support::tunnel::*;
use serde_json::{Value, json};

fn from_ip(server: &Server, key: &str, ip: &str) -> Client {
    Client::spawn(server.udp, key, json!({ "udp_bind_ip": ip }))
}

/// `GET /api/users/{key}/ips`, checked against openapi.yaml: `(ip, live, last_seen)` sorted.
fn ips(api: &OpenApi, c: &mut ApiClient, key: &str) -> Vec<(String, bool, u64)> {
    let r = c.send("GET", &format!("/api/users/{key}/ips"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    api.check("GET", "/api/users/{key}/ips", &r);
    let mut v: Vec<(String, bool, u64)> = r.json()["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["ip"].as_str().unwrap().to_string(),
                e["live"].as_bool().unwrap(),
                e["last_seen"].as_u64().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn unix_now() -> u64 {
    ostp::users::now_unix()
}

fn checked(api: &OpenApi, method: &str, template: &str, r: Resp) -> Value {
    api.check(method, template, &r);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[test]
fn max_devices_one_refuses_a_second_address_until_the_first_leaves() {
    let _heavy = heavy_lock();
    let api = OpenApi::load();
    let http = start_http();
    let server = Server::start(ServerSpec::new(&new_key()));
    let mut c = ApiClient::new(server.api_addr(), TOKEN);
    let created = checked(
        &api,
        "POST",
        "/api/users",
        c.send("POST", "/api/users", Some(r#"{"max_devices":1}"#)),
    );
    assert_eq!(created["max_devices"], 1);
    let key = created["key"].as_str().unwrap().to_string();
    let user = checked(
        &api,
        "GET",
        "/api/users/{key}",
        c.send("GET", &format!("/api/users/{key}"), None),
    );
    assert_eq!(user["max_devices"], 1);
    assert_eq!(ips(&api, &mut c, &key), []);

    let first = from_ip(&server, &key, "127.0.0.2");
    first.wait_connected(0);
    download_eventually(first.proxy, http, 1 << 20, Duration::from_secs(20));
    let second = from_ip(&server, &key, "127.0.0.3");
    let refused = second.proc.wait_line(Duration::from_secs(20), |l| {
        l.contains("device limit reached: another device is using this key")
    });
    assert!(refused.is_some(), "{}", second.proc.log_text());
    assert!(
        socks5_connect(second.proxy, http_target(http)).is_err(),
        "a request of the second device got through"
    );
    let seen = ips(&api, &mut c, &key);
    assert_eq!(seen.len(), 1, "a refused address had no session: {seen:?}");
    assert_eq!((seen[0].0.as_str(), seen[0].1), ("127.0.0.2", true));

    // The first device leaves (its client closes the session on SIGTERM): the second gets in.
    first.proc.signal("TERM");
    let mut first = first;
    assert!(first.proc.wait_exit(Duration::from_secs(10)).is_some());
    let left_at = unix_now();
    let took = download_eventually(second.proxy, http, 1 << 20, Duration::from_secs(40));
    eprintln!("second device admitted {took:?} after the first left");
    // A live address is "seen" at the moment of the answer: between the two clock reads (a
    // second may tick over between the server's and the test's).
    let asked_at = unix_now();
    let seen = ips(&api, &mut c, &key);
    let now = unix_now();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let (a, b) = (&seen[0], &seen[1]);
    assert_eq!((a.0.as_str(), a.1), ("127.0.0.2", false), "{seen:?}");
    assert!(a.2 >= left_at.saturating_sub(1) && a.2 <= now, "{seen:?}");
    assert_eq!((b.0.as_str(), b.1), ("127.0.0.3", true), "{seen:?}");
    assert!(asked_at <= b.2 && b.2 <= now, "{seen:?}");

    // Unknown users are 404; the path only answers GET.
    let r = c.send("GET", "/api/users/unknown-key-0123456789/ips", None);
    assert_eq!(r.status, 404);
    api.check("GET", "/api/users/{key}/ips", &r);
    assert_eq!(
        c.send("POST", &format!("/api/users/{key}/ips"), None)
            .status,
        405
    );
}

#[test]
fn max_devices_is_validated_patched_cleared_and_durable() {
    let api = OpenApi::load();
    let server = Server::start(ServerSpec::new(&new_key()));
    let mut c = ApiClient::new(server.api_addr(), TOKEN);
    let key = server.create_user(None);
    let path = format!("/api/users/{key}");
    let v = checked(&api, "GET", "/api/users/{key}", c.send("GET", &path, None));
    assert_eq!(v["max_devices"], Value::Null);
    let v = checked(
        &api,
        "PATCH",
        "/api/users/{key}",
        c.send("PATCH", &path, Some(r#"{"max_devices":3}"#)),
    );
    assert_eq!(v["max_devices"], 3);
    let r = c.send("GET", "/api/users", None);
    api.check("GET", "/api/users", &r);
    let listed = r.json()["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["key"] == key.as_str())
        .cloned()
        .unwrap();
    assert_eq!(listed["max_devices"], 3);
    for body in [
        r#"{"max_devices":0}"#,
        r#"{"max_devices":-1}"#,
        r#"{"max_devices":1.5}"#,
        r#"{"max_devices":"2"}"#,
        r#"{"max_devices":65536}"#,
    ] {
        let r = c.send("PATCH", &path, Some(body));
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        api.check("PATCH", "/api/users/{key}", &r);
        assert!(r.text().contains("max_devices"), "{body}: {}", r.text());
        let r = c.send("POST", "/api/users", Some(body));
        assert_eq!(r.status, 400, "POST {body}: {}", r.text());
    }
    assert_eq!(
        server.user(&key)["max_devices"],
        3,
        "failures changed nothing"
    );
    let v = checked(
        &api,
        "PATCH",
        "/api/users/{key}",
        c.send("PATCH", &path, Some(r#"{"max_devices":null}"#)),
    );
    assert_eq!(v["max_devices"], Value::Null);
    c.send("PATCH", &path, Some(r#"{"max_devices":2}"#));
    // Durable: on disk before the answer.
    let stored = ostp::users::load_stored(&server.dir.path().join("state.json")).unwrap();
    let u = stored.iter().find(|u| u.key == key).unwrap();
    assert_eq!(u.max_devices, Some(2));
}
