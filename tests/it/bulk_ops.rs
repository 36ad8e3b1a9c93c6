//! Bulk and session operations of the management API (issue 10): `POST /api/users/bulk` and
//! `/bulk-delete` (one journal batch, all-or-nothing, 400 naming the entry),
//! `POST /api/users/{key}/kick` on a real server + client (sessions close, the client comes
//! back), the filters and paging of `GET /api/users`, and the additive status fields. Every
//! response is checked against docs/openapi.yaml.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::api::{Client as ApiClient, OpenApi, TOKEN, TestServer};
use crate::support::tunnel::{self, Client, Server, ServerSpec, Target, heavy_lock, new_key};
use ostp::control::ControlMsg;
use serde_json::{Value, json};

/// Checks `resp` against openapi.yaml and returns its JSON body.
fn checked(api: &OpenApi, method: &str, template: &str, resp: &crate::support::api::Resp) -> Value {
    api.check(method, template, resp);
    resp.json()
}

fn error_of(resp: &crate::support::api::Resp) -> String {
    resp.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn bulk_create_of_1000_users_is_one_journal_batch_and_bulk_delete_likewise() {
    let api = OpenApi::load();
    let srv = TestServer::start(TOKEN);
    let mut c = srv.client();
    let users_before = srv.users.lock().unwrap().len();
    let batches = srv.persister.stats().batches;

    let t = Instant::now();
    let r = c.send(
        "POST",
        "/api/users/bulk",
        Some(r#"{"count":1000,"limit_bytes":1000000,"reset_strategy":"month","note":"batch 7"}"#),
    );
    let took = t.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = checked(&api, "POST", "/api/users/bulk", &r);
    eprintln!("bulk create of 1000 users: {took:?} (request to answer)");
    assert!(
        took < Duration::from_secs(if cfg!(debug_assertions) { 10 } else { 1 }),
        "{took:?}"
    );
    assert_eq!(v["created"], 1000);
    let created = v["users"].as_array().unwrap();
    assert_eq!(created.len(), 1000);
    assert!(created.iter().all(|u| u["limit_bytes"] == 1000000
        && u["reset_strategy"] == "month"
        && u["note"] == "batch 7"));
    assert_eq!(
        srv.persister.stats().batches,
        batches + 1,
        "one journal batch (one fsync) for 1000 users"
    );
    assert_eq!(srv.users.lock().unwrap().len(), users_before + 1000);
    let stored = ostp::users::load_stored(&srv.config.state_file).unwrap();
    assert_eq!(
        stored.len(),
        users_before + 1000,
        "durable before the answer"
    );
    let added = srv
        .control
        .try_iter()
        .filter(|m| matches!(m, ControlMsg::UserAdded(_)))
        .count();
    assert_eq!(added, 1000, "the tunnel loop hears of each user");

    // Bulk delete: one batch as well.
    let keys: Vec<&str> = created.iter().map(|u| u["key"].as_str().unwrap()).collect();
    let batches = srv.persister.stats().batches;
    let body = json!({"keys": keys}).to_string();
    let r = c.send("POST", "/api/users/bulk-delete", Some(&body));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        checked(&api, "POST", "/api/users/bulk-delete", &r)["deleted"],
        1000
    );
    assert_eq!(srv.persister.stats().batches, batches + 1);
    assert_eq!(srv.users.lock().unwrap().len(), users_before);
    let removed = srv
        .control
        .try_iter()
        .filter(|m| matches!(m, ControlMsg::UserRemoved(_)))
        .count();
    assert_eq!(removed, 1000);
}

#[test]
fn a_bad_bulk_entry_is_named_and_changes_nothing() {
    let api = OpenApi::load();
    let srv = TestServer::start(TOKEN);
    let mut c = srv.client();
    let existing = "bulk-existing-0123456789";
    let r = c.send(
        "POST",
        "/api/users",
        Some(&json!({"key": existing}).to_string()),
    );
    assert_eq!(r.status, 200);
    let count = || srv.users.lock().unwrap().len();
    let before = (count(), srv.persister.stats().journal_appended);

    let k = |i: u32| format!("bulk-explicit-key-{i:04}");
    for (body, named) in [
        (
            json!({"users": [{"key": k(0)}, {"key": k(1), "limit_bytes": -1}]}),
            "users[1]: limit_bytes",
        ),
        (
            json!({"users": [{"key": k(0)}, {"key": k(1)}, {"nope": 1}]}),
            "users[2]: unknown field \"nope\"",
        ),
        (
            json!({"users": [{"key": k(0)}, {"key": "short"}]}),
            "users[1]: key",
        ),
        (
            json!({"users": [{"key": k(0)}, {"key": k(0)}]}),
            "users[1].key: the same key as users[0]",
        ),
        (
            json!({"users": [{"key": k(0)}, {"key": existing}]}),
            "users[1].key: a user with this key already exists",
        ),
        (json!({"users": [{}, 5]}), "users[1]: must be a JSON object"),
        (
            json!({"count": 3, "expire_at": "soon"}),
            "defaults: expire_at",
        ),
        (json!({"count": 1001}), "1 to 1000"),
        (json!({"count": 0}), "1 to 1000"),
        (json!({"count": 2, "users": [{}]}), "either count"),
    ] {
        let r = c.send("POST", "/api/users/bulk", Some(&body.to_string()));
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        api.check("POST", "/api/users/bulk", &r);
        assert!(error_of(&r).contains(named), "{body}: {}", error_of(&r));
    }
    let cfg = crate::support::api::CONFIG_KEY;
    for (body, named) in [
        (
            json!({"keys": [existing, "no-such-user-0123456789"]}),
            "keys[1]: no user with this key",
        ),
        (
            json!({"keys": [existing, existing]}),
            "keys[1]: the same key as keys[0]",
        ),
        (json!({"keys": [existing, cfg]}), "keys[1]: "),
        (json!({"keys": [existing, 7]}), "keys[1]: must be a string"),
        (
            json!({"keys": [existing, "bad key!"]}),
            "keys[1]: invalid key",
        ),
        (json!({"keys": []}), "1 to 1000"),
        (json!({}), "keys is required"),
    ] {
        let r = c.send("POST", "/api/users/bulk-delete", Some(&body.to_string()));
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        api.check("POST", "/api/users/bulk-delete", &r);
        assert!(error_of(&r).contains(named), "{body}: {}", error_of(&r));
    }
    assert_eq!(
        (count(), srv.persister.stats().journal_appended),
        before,
        "no user created or deleted, nothing written"
    );
    assert!(srv.users.lock().unwrap().get_by_key(&k(0)).is_none());

    // The explicit form works too, in request order.
    let body = json!({"users": [{"key": k(0), "name": "a"}, {"name": "b", "enabled": false}]});
    let r = c.send("POST", "/api/users/bulk", Some(&body.to_string()));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = checked(&api, "POST", "/api/users/bulk", &r);
    assert_eq!(
        (&v["users"][0]["key"], &v["users"][0]["name"]),
        (&json!(k(0)), &json!("a"))
    );
    assert_eq!(
        (&v["users"][1]["name"], &v["users"][1]["enabled"]),
        (&json!("b"), &json!(false))
    );
    assert_eq!(v["users"][1]["key"].as_str().unwrap().len(), 32);
}

#[test]
fn list_filters_and_pages_in_creation_order() {
    let api = OpenApi::load();
    let srv = TestServer::start(TOKEN);
    let mut c = srv.client();
    let users: Vec<Value> = (0..10)
        .map(|i| json!({"name": format!("Shop-{i}"), "enabled": i % 3 != 0}))
        .collect();
    let r = c.send(
        "POST",
        "/api/users/bulk",
        Some(&json!({"users": users}).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // Without parameters: exactly the spec's shape (no `total`), every user.
    let r = c.send("GET", "/api/users", None);
    let all = checked(&api, "GET", "/api/users", &r);
    assert_eq!(all.as_object().unwrap().len(), 1, "{all}");
    let all = all["users"].as_array().unwrap().clone();
    assert_eq!(all.len(), 11, "10 + the config key");

    let names = |path: &str, c: &mut ApiClient| -> (Vec<String>, Value) {
        let r = c.send("GET", path, None);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let v = checked(&api, "GET", "/api/users", &r);
        let n = v["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].as_str().unwrap_or("-").to_string())
            .collect();
        (n, v["total"].clone())
    };
    // Case-insensitive substring of the name.
    let (n, total) = names("/api/users?name=shop-1", &mut c);
    assert_eq!((n, total), (vec!["Shop-1".to_string()], json!(1)));
    let (n, total) = names("/api/users?name=SHOP", &mut c);
    assert_eq!((n.len(), total), (10, json!(10)));
    let (n, _) = names("/api/users?name=from%2Dconfig", &mut c);
    assert_eq!(n, vec!["from-config".to_string()]);
    let (n, total) = names("/api/users?enabled=false", &mut c);
    assert_eq!(n, ["Shop-0", "Shop-3", "Shop-6", "Shop-9"]);
    assert_eq!(total, 4);
    // Paging: creation order, `total` counts all matches.
    let (n, total) = names("/api/users?name=shop&enabled=true&offset=2&limit=3", &mut c);
    assert_eq!(n, ["Shop-4", "Shop-5", "Shop-7"]);
    assert_eq!(total, 6);
    let mut paged = Vec::new();
    for offset in (0..12).step_by(4) {
        let r = c.send("GET", &format!("/api/users?offset={offset}&limit=4"), None);
        let v = checked(&api, "GET", "/api/users", &r);
        assert_eq!(v["total"], 11);
        paged.extend(
            v["users"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u["key"].clone()),
        );
    }
    let keys: Vec<Value> = all.iter().map(|u| u["key"].clone()).collect();
    assert_eq!(paged, keys, "pages tile the unfiltered list");

    for bad in [
        "enabled=yes",
        "offset=-1",
        "limit=1.5",
        "sort=name",
        "name=%zz",
    ] {
        let r = c.send("GET", &format!("/api/users?{bad}"), None);
        assert_eq!(r.status, 400, "{bad}");
        api.check("GET", "/api/users", &r);
    }
}

#[test]
fn status_has_the_additive_fields_and_kick_answers_404_and_503() {
    let api = OpenApi::load();
    let srv = TestServer::start(TOKEN);
    let mut c = srv.client();
    let r = c.send("GET", "/api/server/status", None);
    let v = checked(&api, "GET", "/api/server/status", &r);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    for f in ["online_users", "sessions", "bytes_up", "bytes_down"] {
        assert_eq!(v[f], 0, "{f}: {v}");
    }

    let r = c.send("POST", "/api/users/unknown-user-0123456789/kick", None);
    assert_eq!(r.status, 404);
    api.check("POST", "/api/users/{key}/kick", &r);
    let r = c.send("POST", "/api/users/bad!/kick", None);
    assert_eq!(r.status, 400);
    api.check("POST", "/api/users/{key}/kick", &r);
    let r = c.send(
        "GET",
        &format!("/api/users/{}/kick", crate::support::api::CONFIG_KEY),
        None,
    );
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));
    // This server's control channel has no loop answering: the kick gives up after 2 s.
    let t = Instant::now();
    let r = c.send(
        "POST",
        &format!("/api/users/{}/kick", crate::support::api::CONFIG_KEY),
        None,
    );
    assert_eq!(r.status, 503, "{}", r.text());
    api.check("POST", "/api/users/{key}/kick", &r);
    assert!(t.elapsed() >= Duration::from_secs(2) && t.elapsed() < Duration::from_secs(5));
    assert!(
        srv.control
            .try_iter()
            .any(|m| matches!(m, ControlMsg::Kick(..))),
        "the kick was asked of the loop"
    );
}

fn download(proxy: SocketAddr, http: u16, n: u64) -> bool {
    let Ok(mut s) =
        tunnel::socks5_connect(proxy, Target::Ip(SocketAddr::from(([127, 0, 0, 1], http))))
    else {
        return false;
    };
    let (_, d, e) = tunnel::http_get_bytes(&mut s, n);
    d.len == n && e.is_none()
}

#[test]
fn kick_closes_the_sessions_and_the_client_reconnects() {
    let _heavy = heavy_lock();
    let api = OpenApi::load();
    let http = tunnel::start_http();
    let server = Server::start(ServerSpec::new(&new_key()));
    let key = server.create_user(None);
    let client = Client::start(server.udp, &key);
    let mut c = ApiClient::new(server.api_addr(), tunnel::TOKEN);
    assert!(download(client.proxy, http, 1 << 20));

    // The loop moves traffic into the table periodically: poll.
    let t = Instant::now();
    let v = loop {
        let r = c.send("GET", "/api/server/status", None);
        let v = checked(&api, "GET", "/api/server/status", &r);
        if v["bytes_down"].as_u64().unwrap() >= 1 << 20 || t.elapsed() > Duration::from_secs(10) {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        (&v["online_users"], &v["sessions"]),
        (&json!(1), &json!(1)),
        "{v}"
    );
    assert!(v["bytes_down"].as_u64().unwrap() >= 1 << 20, "{v}");
    assert!(v["bytes_up"].as_u64().unwrap() > 0, "{v}");

    let lines = client.proc.line_count();
    let r = c.send("POST", &format!("/api/users/{key}/kick"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = checked(&api, "POST", "/api/users/{key}/kick", &r);
    assert_eq!((&v["key"], &v["closed"]), (&json!(key), &json!(1)));
    // The client hears the close, does not blame its key, and connects again.
    client.wait_connected(lines);
    let log = client.proc.log_text();
    assert!(log.contains("the session closed; reconnecting"), "{log}");
    assert!(
        !log.contains("deleted or disabled") && !log.contains("traffic limit"),
        "{log}"
    );
    let t = Instant::now();
    while !download(client.proxy, http, 1 << 20) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no download after the kick"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "after kick: working again {:?} after the reconnect line",
        t.elapsed()
    );
    let u = server.user(&key);
    assert_eq!(u["connections"], 2, "a second session: {u}");

    // A user without sessions: nothing to close.
    let idle = server.create_user(None);
    let r = c.send("POST", &format!("/api/users/{idle}/kick"), None);
    assert_eq!(
        checked(&api, "POST", "/api/users/{key}/kick", &r)["closed"],
        0
    );
}
