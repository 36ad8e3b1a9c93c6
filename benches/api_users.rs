//! `cargo bench --bench api_users`: `GET /api/users` with 10,000 users over loopback HTTP —
//! latency p50/p99 and requests/s, reported as ratios against `GET /api/server/status`
//! (same server, same run) as the baseline, and `GET /metrics` (per-user series on) against the
//! same baseline; then the write path at 50,000 users: `POST
//! /api/users` latency, bytes written per change (journal) and per counter flush.

#[path = "../tests/it/support/api.rs"]
mod support;

use std::time::{Duration, Instant};

use ostp::users::persist::lock_users;
use support::*;

const USERS: usize = 10_000;

struct Stats {
    p50: Duration,
    p99: Duration,
    per_sec: f64,
    bytes: usize,
}

fn measure(srv: &TestServer, path: &str, n: usize) -> Stats {
    let mut c = srv.client();
    let mut lat = Vec::with_capacity(n);
    let mut bytes = 0;
    // Warm-up.
    for _ in 0..5 {
        c.send("GET", path, None);
    }
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let r = c.send("GET", path, None);
        lat.push(t.elapsed());
        assert_eq!(r.status, 200);
        assert!(r.header("transfer-encoding").is_none());
        bytes = r.body.len();
    }
    let total = start.elapsed();
    lat.sort();
    Stats {
        p50: lat[n / 2],
        p99: lat[(n * 99 / 100).min(n - 1)],
        per_sec: n as f64 / total.as_secs_f64(),
        bytes,
    }
}

fn concurrent(srv: &TestServer, path: &'static str, clients: usize, dur: Duration) -> f64 {
    let addr = srv.addr;
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = Client::new(addr, TOKEN);
                let mut n = 0u64;
                while start.elapsed() < dur {
                    assert_eq!(c.send("GET", path, None).status, 200);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let n: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let srv = TestServer::start(TOKEN);
    {
        let mut t = lock_users(&srv.users);
        for i in 0..USERS {
            let id = t
                .create(
                    format!("{i:032x}"),
                    Some(format!("user {i}")),
                    Some(1 << 34),
                    1_700_000_000,
                )
                .unwrap();
            t.add_traffic(id, i as u64 * 1000, i as u64 * 5000);
        }
    }
    srv.persister.compact().unwrap();

    let base = measure(&srv, "/api/server/status", 2000);
    let list = measure(&srv, "/api/users", 200);
    let metrics = measure(&srv, "/metrics", 200);
    println!("api_users: {USERS} users, sequential, one keep-alive connection per client");
    println!(
        "  baseline GET /api/server/status: p50 {:>9.3?}  p99 {:>9.3?}  {:>8.0} req/s  ({} B)",
        base.p50, base.p99, base.per_sec, base.bytes
    );
    println!(
        "  GET /api/users ({USERS} users):   p50 {:>9.3?}  p99 {:>9.3?}  {:>8.0} req/s  ({} B)",
        list.p50, list.p99, list.per_sec, list.bytes
    );
    println!(
        "  ratio list/status: p50 x{:.1}, p99 x{:.1}, throughput x{:.3}",
        list.p50.as_secs_f64() / base.p50.as_secs_f64(),
        list.p99.as_secs_f64() / base.p99.as_secs_f64(),
        list.per_sec / base.per_sec
    );
    println!(
        "  GET /metrics ({USERS} users):     p50 {:>9.3?}  p99 {:>9.3?}  {:>8.0} req/s  ({} B)",
        metrics.p50, metrics.p99, metrics.per_sec, metrics.bytes
    );
    println!(
        "  ratio metrics/status: p50 x{:.1}, p99 x{:.1}",
        metrics.p50.as_secs_f64() / base.p50.as_secs_f64(),
        metrics.p99.as_secs_f64() / base.p99.as_secs_f64()
    );
    let cb = concurrent(&srv, "/api/server/status", 4, Duration::from_secs(2));
    let cl = concurrent(&srv, "/api/users", 4, Duration::from_secs(3));
    println!(
        "  4 concurrent clients: status {cb:.0} req/s, users list {cl:.0} req/s (ratio x{:.3})",
        cl / cb
    );
    writes();
}

/// POST latency and bytes written per change and per counter flush at 50,000 users.
fn writes() {
    const BIG: usize = 50_000;
    const POSTS: usize = 500;
    let srv = TestServer::start(TOKEN);
    {
        let mut t = lock_users(&srv.users);
        for i in 0..BIG {
            let id = t
                .create(format!("{i:032x}"), None, Some(1 << 34), 1_700_000_000)
                .unwrap();
            t.add_traffic(id, i as u64 * 1000, i as u64 * 5000);
        }
        t.take_counters();
    }
    srv.persister.compact().unwrap();
    let snapshot = srv.persister.stats().snapshot_len;
    let mut c = srv.client();
    let before = srv.persister.stats();
    let mut lat = Vec::with_capacity(POSTS);
    for i in 0..POSTS {
        let body = format!(r#"{{"key": "bench-new-user-{i:06}-abcdef", "limit_bytes": 1000}}"#);
        let t = Instant::now();
        let r = c.send("POST", "/api/users", Some(&body));
        lat.push(t.elapsed());
        assert_eq!(r.status, 200);
    }
    let after = srv.persister.stats();
    lat.sort();
    let moved = 1000;
    {
        let mut t = lock_users(&srv.users);
        for i in 0..moved {
            let id = t.user_id(&format!("{:032x}", i * 31)).unwrap();
            t.add_traffic(id, 1, 1);
        }
    }
    let flush_before = srv.persister.stats().journal_appended;
    srv.persister.flush_counters().unwrap();
    let flush = srv.persister.stats().journal_appended - flush_before;
    println!("api_users writes: {BIG} users, snapshot {snapshot} B");
    println!(
        "  POST /api/users: p50 {:>9.3?}  p99 {:>9.3?}; {} B written per change; {} compactions",
        lat[POSTS / 2],
        lat[POSTS * 99 / 100],
        (after.journal_appended - before.journal_appended) / POSTS as u64,
        after.compactions - before.compactions
    );
    println!(
        "  counter flush with {moved} users moved: {flush} B ({} B per user)",
        flush / moved as u64
    );
}
