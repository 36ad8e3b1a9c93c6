//! 8 threads × 500 mixed create / limit / reset / delete requests over HTTP: the final table
//! (over HTTP, in memory and on disk after a restart) equals the sequential model — no lost
//! update, no stale snapshot written over a newer one.

use std::collections::BTreeMap;

use crate::support::api::*;
use ostp::users::persist::lock_users;
use serde_json::json;

const THREADS: usize = 8;
const OPS: usize = 500;

/// What a thread expects for each of its keys: `Some(limit)` = exists.
type Model = BTreeMap<String, Option<u64>>;

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn run_thread(addr: std::net::SocketAddr, t: usize) -> Model {
    let mut c = Client::new(addr, TOKEN);
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1).wrapping_mul(0x1234_5678_9ABC_DEF1);
    let mut model: Model = BTreeMap::new();
    let keys: Vec<String> = (0..12)
        .map(|i| format!("thread{t}-key{i:02}-abcdef"))
        .collect();
    for op in 0..OPS {
        let key = &keys[(xorshift(&mut rng) % keys.len() as u64) as usize];
        let exists = model.contains_key(key);
        match xorshift(&mut rng) % 4 {
            0 => {
                let limit = xorshift(&mut rng) % 1_000_000;
                let r = c.send(
                    "POST",
                    "/api/users",
                    Some(&json!({"key": key, "limit_bytes": limit}).to_string()),
                );
                if exists {
                    assert_eq!(r.status, 409, "op {op}");
                } else {
                    assert_eq!(r.status, 200, "op {op}: {}", r.text());
                    model.insert(key.clone(), Some(limit));
                }
            }
            1 => {
                let limit = match xorshift(&mut rng) % 3 {
                    0 => None,
                    _ => Some(xorshift(&mut rng) % 1_000_000),
                };
                let r = c.send(
                    "PUT",
                    &format!("/api/users/{key}/limit"),
                    Some(&json!({ "limit_bytes": limit }).to_string()),
                );
                if exists {
                    assert_eq!(r.status, 200, "op {op}");
                    assert_eq!(r.json()["limit_bytes"], json!(limit));
                    model.insert(key.clone(), limit);
                } else {
                    assert_eq!(r.status, 404, "op {op}");
                }
            }
            2 => {
                let r = c.send("POST", &format!("/api/users/{key}/reset"), None);
                assert_eq!(r.status, if exists { 200 } else { 404 }, "op {op}");
            }
            _ => {
                let r = c.send("DELETE", &format!("/api/users/{key}"), None);
                assert_eq!(r.status, if exists { 200 } else { 404 }, "op {op}");
                model.remove(key);
            }
        }
    }
    model
}

#[test]
fn concurrent_mixed_writes_equal_the_sequential_model() {
    let dir = temp_dir("api-concurrency");
    let mut srv = TestServer::start_in(&dir, TOKEN, Default::default());
    let addr = srv.addr;
    let threads: Vec<_> = (0..THREADS)
        .map(|t| std::thread::spawn(move || run_thread(addr, t)))
        .collect();
    let mut model: Model = BTreeMap::new();
    for t in threads {
        model.extend(t.join().unwrap());
    }

    let check = |users: Vec<(String, Option<u64>)>, what: &str| {
        let got: Model = users.into_iter().filter(|(k, _)| k != CONFIG_KEY).collect();
        assert_eq!(got, model, "{what} differs from the model");
    };

    // Over HTTP.
    let list = srv.client().send("GET", "/api/users", None).json();
    check(
        list["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| {
                (
                    u["key"].as_str().unwrap().to_string(),
                    u["limit_bytes"].as_u64(),
                )
            })
            .collect(),
        "GET /api/users",
    );
    // In memory.
    check(
        lock_users(&srv.users)
            .list()
            .iter()
            .map(|u| (u.key.clone(), u.limit_bytes))
            .collect(),
        "the table",
    );
    // On disk, with no extra flush: every acknowledged change was already durable.
    check(
        ostp::users::load_stored(&srv.config.state_file)
            .unwrap()
            .into_iter()
            .map(|u| (u.key, u.limit_bytes))
            .collect(),
        "the state file",
    );
    srv.stop();
    drop(srv);
    // After a restart.
    let srv = TestServer::start_in(&dir, TOKEN, Default::default());
    check(
        lock_users(&srv.users)
            .list()
            .iter()
            .map(|u| (u.key.clone(), u.limit_bytes))
            .collect(),
        "the table after a restart",
    );
}
