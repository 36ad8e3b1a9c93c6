//! `GET /metrics`: the output passes `promtool check metrics`, the metrics token reads metrics
//! and nothing else, per-user series carry names or masked key prefixes (never a key) and can be
//! turned off, and a real Prometheus server scraping a real `ostp` server with the bearer token
//! sees the same user count and user traffic as the API.
//!
//! `promtool` and `prometheus` come from the Debian package `prometheus` (`.ci/run` installs
//! it); these tests fail, never skip, without them.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::api::{self, TestServer};
use crate::support::tunnel::{
    self, Client, Server, ServerSpec, Target, TempDir, free_port, heavy_lock, http_get_bytes,
    new_key, socks5_connect, start_http,
};
use ostp::api::Limits;
use ostp::users::persist::lock_users;

const METRICS_TOKEN: &str = "scraper-token-0123456789";
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One sample: metric name, labels, value.
type Sample = (String, HashMap<String, String>, f64);

/// Parses the samples of an exposition (the subset `/metrics` writes: no timestamps).
fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), HashMap::new()),
            Some((name, rest)) => (name.to_string(), parse_labels(rest.trim_end_matches('}'))),
        };
        out.push((name, labels, value));
    }
    out
}

fn parse_labels(mut rest: &str) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    while let Some((name, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().unwrap() {
                (_, '\\') => match chars.next().unwrap().1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(name.trim_start_matches(',').to_string(), value);
        rest = &after[end + 1..];
    }
    labels
}

fn value_of(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.2)
}

/// Runs `promtool check metrics` on `text`; panics with its output if it objects.
fn promtool_accepts(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}); install the Debian package `prometheus` (.ci/run does)"
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}\n--- input ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that no label value holds one of `keys`.
fn no_label_holds_a_key(samples: &[Sample], keys: &[&str]) {
    for (name, labels, _) in samples {
        for (label, value) in labels {
            for key in keys {
                assert!(
                    !value.contains(key),
                    "{name}{{{label}={value:?}}} holds a key"
                );
            }
        }
    }
}

/// An in-process API server whose config sets the metrics token and `metrics`.
fn api_server(per_user: bool) -> TestServer {
    let dir = api::temp_dir("metrics");
    let cfg = json!({
        "mode": "server",
        "listen": "0.0.0.0:50123",
        "access_keys": [{"key": api::CONFIG_KEY, "name": "from-config"}],
        "api": {"enabled": true, "bind": "127.0.0.1:0", "token": api::TOKEN, "metrics_token": METRICS_TOKEN},
        "metrics": {"per_user": per_user},
        "state_file": "state.json",
        "log_level": "warn",
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    TestServer::start_in(&dir, api::TOKEN, Limits::default())
}

#[test]
fn metrics_pass_promtool_label_users_without_keys_and_the_metrics_token_reads_only_metrics() {
    let srv = api_server(true);
    let keys = [
        "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6".to_string(),
        "ffffffffeeeeeeee0000000011111111".to_string(),
        "quote-and-key-0123456789".to_string(),
    ];
    {
        let mut t = lock_users(&srv.users);
        let names = [
            Some("alice \"the\" \\ admin".to_string()),
            None,
            Some("named after quote-and-key-0123456789".to_string()),
        ];
        for (i, (key, name)) in keys.iter().zip(names).enumerate() {
            let id = t.create(key.clone(), name, None, 1_700_000_000).unwrap();
            t.add_traffic(id, 1000 * (i as u64 + 1), 7_000_000_000 + i as u64);
        }
    }
    let mut c = api::Client::new(srv.addr, api::TOKEN);
    // A refused request, to be counted.
    assert_eq!(
        api::Client::new(srv.addr, "wrong-token-0123456789")
            .send("GET", "/api/users", None)
            .status,
        401
    );
    let r = c.send("GET", "/metrics", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some(CONTENT_TYPE));
    let text = r.text();
    promtool_accepts(&text);
    let s = samples(&text);
    let mut all_keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    all_keys.push(api::CONFIG_KEY);
    no_label_holds_a_key(&s, &all_keys);
    for token in [api::TOKEN, METRICS_TOKEN] {
        assert!(!text.contains(token), "a token in the output");
    }

    assert_eq!(value_of(&s, "ostp_users", &[]), Some(4.0));
    assert_eq!(
        value_of(
            &s,
            "ostp_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    let traffic = |user: &str, dir: &str| {
        value_of(&s, "ostp_user_bytes_total", &[("user", user), ("dir", dir)])
    };
    assert_eq!(traffic("from-config", "up"), Some(0.0));
    assert_eq!(traffic("alice \"the\" \\ admin", "up"), Some(1000.0));
    assert_eq!(traffic("alice \"the\" \\ admin", "down"), Some(7e9));
    assert_eq!(
        traffic("ffffffff…", "down"),
        Some(7_000_000_001.0),
        "an unnamed user: its masked prefix"
    );
    assert_eq!(
        traffic("quote-…", "up"),
        Some(3000.0),
        "a name holding a key is replaced by the masked prefix"
    );
    assert_eq!(
        s.iter().filter(|x| x.0 == "ostp_user_bytes_total").count(),
        8
    );
    assert_eq!(
        value_of(
            &s,
            "ostp_api_requests_total",
            &[("route", "/api/users"), ("method", "GET"), ("code", "401")]
        ),
        Some(1.0)
    );
    assert!(value_of(&s, "process_cpu_seconds_total", &[]).is_some_and(|v| v >= 0.0));
    assert!(value_of(&s, "ostp_loop_wakeups_total", &[]).is_some_and(|v| v >= 0.0));
    for name in [
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(value_of(&s, name, &[]).is_some_and(|v| v > 0.0), "{name}");
    }

    // The metrics token reads /metrics and nothing else; no token reads nothing.
    let mut scraper = api::Client::new(srv.addr, METRICS_TOKEN);
    assert_eq!(scraper.send("GET", "/metrics", None).status, 200);
    for (method, path) in [
        ("GET", "/api/users"),
        ("GET", "/api/server/status"),
        ("POST", "/api/users"),
        ("DELETE", &format!("/api/users/{}", keys[0]) as &str),
    ] {
        assert_eq!(
            scraper.send(method, path, None).status,
            401,
            "{method} {path}"
        );
    }
    assert_eq!(
        lock_users(&srv.users).len(),
        4,
        "the scraper changed nothing"
    );
    let openapi = api::OpenApi::load();
    let refused = api::Client::new(srv.addr, "").send("GET", "/metrics", None);
    assert_eq!(refused.status, 401);
    openapi.check("GET", "/metrics", &refused);
    let post = c.send("POST", "/metrics", Some("{}"));
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET"));
    openapi.check("GET", "/metrics", &post);
    assert!(
        documented_text_200(),
        "GET /metrics 200 text/plain is not in openapi.yaml"
    );
    let s = samples(&c.send("GET", "/metrics", None).text());
    let delete_label = [
        ("route", "/api/users/{key}"),
        ("method", "DELETE"),
        ("code", "401"),
    ];
    assert_eq!(
        value_of(&s, "ostp_api_requests_total", &delete_label),
        Some(1.0)
    );
    assert_eq!(
        value_of(
            &s,
            "ostp_api_requests_total",
            &[("route", "/metrics"), ("method", "GET"), ("code", "200")]
        ),
        Some(2.0)
    );
}

/// Whether openapi.yaml documents `GET /metrics` answering 200 with `text/plain` (the shared
/// checker validates JSON bodies and share links only).
fn documented_text_200() -> bool {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let json: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let doc: Value = serde_json::from_str(&json).unwrap();
    doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]["text/plain"].is_object()
}

#[test]
fn per_user_series_can_be_turned_off() {
    let srv = api_server(false);
    let text = srv.client().send("GET", "/metrics", None).text();
    promtool_accepts(&text);
    let s = samples(&text);
    assert_eq!(value_of(&s, "ostp_users", &[]), Some(1.0));
    assert!(!text.contains("ostp_user_bytes_total"), "{text}");
}

/// A Prometheus server on loopback (killed on drop) with its config and TSDB in a temp dir.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    /// Scrapes `target`'s `/metrics` every second with `token`.
    fn start(target: SocketAddr, token: &str) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: ostp\n    \
             metrics_path: /metrics\n    authorization:\n      credentials: \"{token}\"\n    \
             static_configs:\n      - targets: [\"{target}\"]\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run prometheus ({e}); install the Debian package `prometheus` (.ci/run does)")
            });
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("log")).unwrap_or_default()
    }

    /// GET on Prometheus's HTTP API (through curl, which URL-encodes the query).
    fn get(&self, path: &str, query: Option<&str>) -> Option<Value> {
        let url = format!("http://{}{path}", self.addr);
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "5", "-G", &url]);
        if let Some(q) = query {
            cmd.arg("--data-urlencode").arg(format!("query={q}"));
        }
        let out = cmd.output().ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The value of an instant query with exactly one result.
    fn query_one(&self, q: &str) -> Option<f64> {
        let v = self.get("/api/v1/query", Some(q))?;
        let result = v["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }

    /// Polls `q` until it equals `want` (returns the last value seen).
    fn wait_for(&self, q: &str, want: f64, deadline: Instant) -> Option<f64> {
        loop {
            let got = self.query_one(q);
            if got == Some(want) || Instant::now() >= deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_real_prometheus_scrapes_the_same_numbers_as_the_api() {
    let _heavy = heavy_lock();
    let http = start_http();
    let config_key = new_key();
    let server = Server::start(ServerSpec::new(&config_key));
    let (status, created) = server.api("POST", "/api/users", Some(json!({"name": "metrics-user"})));
    assert_eq!(status, 200, "{created}");
    let key = created["key"].as_str().unwrap().to_string();
    let client = Client::start(server.udp, &key);
    let n = 300_000;
    let mut s = socks5_connect(
        client.proxy,
        Target::Ip(SocketAddr::from(([127, 0, 0, 1], http))),
    )
    .unwrap();
    let (_, digest, err) = http_get_bytes(&mut s, n);
    assert!(err.is_none() && digest.len == n, "{err:?}");
    drop(s);
    let (_, moved) = server.wait_counters(&key, Duration::from_secs(5), |_, d| d >= n);
    assert!(moved, "the download never reached the counters");
    // The stream is closed: wait until the counters stop moving.
    let mut counters = server.counters(&key);
    loop {
        std::thread::sleep(Duration::from_millis(1200));
        let again = server.counters(&key);
        if again == counters {
            break;
        }
        counters = again;
    }

    // The real server's output passes promtool too (tunnel and process series included).
    let text = api::Client::new(server.api_addr(), tunnel::TOKEN)
        .send("GET", "/metrics", None)
        .text();
    promtool_accepts(&text);
    no_label_holds_a_key(&samples(&text), &[&key, &config_key]);

    let prom = Prometheus::start(server.api_addr(), tunnel::TOKEN);
    let deadline = Instant::now() + Duration::from_secs(20);
    let up = prom.wait_for("up{job=\"ostp\"}", 1.0, deadline);
    assert_eq!(
        up,
        Some(1.0),
        "prometheus never scraped ostp:\n{}",
        prom.log()
    );
    let (status, st) = server.api("GET", "/api/server/status", None);
    assert_eq!(status, 200);
    let users = st["total_users"].as_f64().unwrap();
    assert_eq!(users, 2.0);
    assert_eq!(prom.wait_for("ostp_users", users, deadline), Some(users));
    for (dir, want) in [("up", counters.0), ("down", counters.1)] {
        let q = format!("ostp_user_bytes_total{{user=\"metrics-user\",dir=\"{dir}\"}}");
        assert_eq!(
            prom.wait_for(&q, want as f64, deadline),
            Some(want as f64),
            "{q}"
        );
    }
    assert_eq!(prom.wait_for("ostp_sessions", 1.0, deadline), Some(1.0));
    assert!(
        prom.query_one("ostp_handshakes_accepted_total")
            .is_some_and(|v| v >= 1.0)
    );
    assert!(
        prom.query_one("ostp_streams_opened_total")
            .is_some_and(|v| v >= 1.0)
    );

    // No label value Prometheus stored holds a key.
    let names = prom.get("/api/v1/labels", None).unwrap();
    let mut seen_user_labels = Vec::new();
    for name in names["data"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        let values = prom
            .get(&format!("/api/v1/label/{name}/values"), None)
            .unwrap();
        for v in values["data"].as_array().unwrap() {
            let v = v.as_str().unwrap();
            assert!(
                !v.contains(&key) && !v.contains(&config_key),
                "label {name}={v:?} holds a key"
            );
            if name == "user" {
                seen_user_labels.push(v.to_string());
            }
        }
    }
    seen_user_labels.sort();
    let mut want = vec!["metrics-user".to_string(), ostp::keys::mask(&config_key)];
    want.sort();
    assert_eq!(seen_user_labels, want);
    drop(client);
}
