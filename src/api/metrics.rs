//! `GET /metrics`: the server's counters in the Prometheus text exposition format 0.0.4 —
//! users and sessions (from the user table), the tunnel loop's published counters
//! ([`crate::tunnel::stats`], at most about 1 s old), state-file flushes, API requests by route
//! and code, and the standard `process_*` metrics read from `/proc/self`. Per-user labels are
//! the user's name or the masked key prefix, never a key.

use std::collections::{BTreeMap, HashSet};
use std::fmt::{Display, Write};
use std::sync::{Mutex, PoisonError};

use super::errors::ApiError;
use super::http::{Request, Response};
use super::{ApiContext, auth, routes};
use crate::keys;
use crate::tunnel::carrier_conns::NOT_OSTP_REASONS;
use crate::tunnel::stats::{REFUSAL_REASONS, SharedTunnelStats, lock_stats};
use crate::users::User;
use crate::users::persist::lock_users;

/// The path of the endpoint.
pub const PATH: &str = "/metrics";
/// The exposition format's media type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Path words in the key position that are routes, not keys (kept in the route label).
const ROUTE_WORDS: [&str; 2] = ["bulk", "bulk-delete"];
/// `/proc/self/stat` times are in `USER_HZ` ticks, 100 per second on every Linux ABI.
const USER_HZ: f64 = 100.0;

/// What the API itself counts for `/metrics`, and the tunnel loop's published counters.
#[derive(Debug, Default)]
pub struct Metrics {
    tunnel: SharedTunnelStats,
    /// (route label, method, status) → requests answered.
    requests: Mutex<BTreeMap<(String, &'static str, u16), u64>>,
}

impl Metrics {
    /// `tunnel` is where the tunnel loop publishes (a fresh one when there is no tunnel).
    pub fn new(tunnel: SharedTunnelStats) -> Metrics {
        Metrics {
            tunnel,
            requests: Mutex::default(),
        }
    }

    /// Counts one answered request (labels are bounded: keys in paths become `{key}`).
    pub fn count_request(&self, method: &str, path: &str, status: u16) {
        let key = (route_label(path), method_label(method), status);
        let mut requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        *requests.entry(key).or_insert(0) += 1;
    }

    /// The `ostp_api_requests_total` family.
    pub fn requests_text(&self) -> String {
        let requests = self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut out = Exposition::default();
        let name = "ostp_api_requests_total";
        out.family(
            name,
            "counter",
            "API requests answered, by route, method and status code.",
        );
        for ((route, method, code), n) in &requests {
            let code = code.to_string();
            out.sample(
                name,
                &[("route", route), ("method", method), ("code", &code)],
                n,
            );
        }
        out.text
    }
}

/// The route a path is counted under: the path with the key replaced by `{key}`, `/metrics`,
/// or `other` for paths that are no endpoint (their number is unbounded).
pub fn route_label(path: &str) -> String {
    if path == PATH {
        return PATH.to_string();
    }
    if routes::resolve(path).is_none() {
        return "other".to_string();
    }
    let mut label = String::with_capacity(path.len());
    let mut previous = "";
    // "/api/users/{key}/limit": the key is the third segment, after "users" or "subscribe".
    for (i, segment) in path.split('/').skip(1).enumerate() {
        label.push('/');
        let is_key =
            i == 2 && matches!(previous, "users" | "subscribe") && !ROUTE_WORDS.contains(&segment);
        label.push_str(if is_key { "{key}" } else { segment });
        previous = segment;
    }
    label
}

fn method_label(method: &str) -> &'static str {
    const KNOWN: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
    KNOWN.into_iter().find(|m| *m == method).unwrap_or("other")
}

/// Answers `GET /metrics` (the front end checked the token already; checked again here).
pub fn handle(ctx: &ApiContext, request: &Request) -> Response {
    let metrics_token = &ctx.config.api.metrics_token;
    if let Err(e) = auth::check_head_any(&request.head, &ctx.token, metrics_token) {
        return e.to_response();
    }
    if request.method() != "GET" {
        return ApiError::method_not_allowed(request.method(), "GET").to_response();
    }
    Response {
        status: 200,
        content_type: CONTENT_TYPE,
        headers: Vec::new(),
        body: render(ctx).into_bytes(),
    }
}

/// The whole exposition.
pub fn render(ctx: &ApiContext) -> String {
    let mut out = Exposition::default();
    out.family(
        "ostp_build_info",
        "gauge",
        "Always 1; the version of the running server.",
    );
    out.sample(
        "ostp_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    render_users(&mut out, ctx);
    render_tunnel(&mut out, ctx);
    render_state(&mut out, ctx);
    out.text.push_str(&ctx.metrics.requests_text());
    if let Some(p) = ProcessStats::read() {
        p.render(&mut out);
    }
    out.text
}

/// Users, online users, sessions, and (with `metrics.per_user`) each user's traffic.
fn render_users(out: &mut Exposition, ctx: &ApiContext) {
    let per_user = ctx.config.metrics.per_user;
    let now = crate::users::now_unix();
    let (users, by_state, online, sessions, traffic) = {
        let table = lock_users(&ctx.users);
        let list = table.list();
        let online = list.iter().filter(|u| u.online_sessions > 0).count();
        let mut by_state = [0usize; 3]; // active, disabled, expired
        for u in &list {
            let expired = u.settings.expire_at.is_some_and(|at| now >= at);
            by_state[if !u.settings.enabled {
                1
            } else if expired {
                2
            } else {
                0
            }] += 1;
        }
        let traffic: Vec<(String, u64, u64)> = if per_user {
            user_labels(&list)
                .into_iter()
                .zip(&list)
                .map(|(label, u)| (label, u.bytes_up, u.bytes_down))
                .collect()
        } else {
            Vec::new()
        };
        (
            list.len(),
            by_state,
            online,
            table.online_sessions(),
            traffic,
        )
    };
    out.single("ostp_users", "gauge", "Users in the user table.", users);
    out.family(
        "ostp_users_by_state",
        "gauge",
        "Users by access state (disabled wins over expired).",
    );
    for (state, n) in ["active", "disabled", "expired"].iter().zip(by_state) {
        out.sample("ostp_users_by_state", &[("state", state)], n);
    }
    out.single(
        "ostp_users_online",
        "gauge",
        "Users with at least one live session.",
        online,
    );
    out.single(
        "ostp_sessions",
        "gauge",
        "Live tunnel sessions of all users.",
        sessions,
    );
    if !per_user {
        return;
    }
    let name = "ostp_user_bytes_total";
    out.family(
        name,
        "counter",
        "Payload bytes of a user (up = client to destination) as in GET /api/users; labelled by the user's name, or its masked key prefix.",
    );
    for (label, up, down) in &traffic {
        out.sample(name, &[("user", label), ("dir", "up")], up);
        out.sample(name, &[("user", label), ("dir", "down")], down);
    }
}

/// One label per user, in table order: its name, or its masked key prefix when it has none (or
/// its name contains a key); a repeated label gets ` #2`, ` #3`, ... so that series stay unique.
pub fn user_labels(users: &[&User]) -> Vec<String> {
    let screen = KeyScreen::new(users.iter().map(|u| u.key.as_str()));
    let mut taken: HashSet<String> = HashSet::with_capacity(users.len());
    let mut labels = Vec::with_capacity(users.len());
    for u in users {
        let base = match &u.name {
            Some(n) if !n.is_empty() && !screen.contains_key(n) => n.clone(),
            _ => keys::mask(&u.key),
        };
        let mut label = base.clone();
        let mut n = 2u64;
        while taken.contains(&label) {
            label = format!("{base} #{n}");
            n += 1;
        }
        taken.insert(label.clone());
        labels.push(label);
    }
    labels
}

/// Finds any of a set of keys inside a text (keys are ASCII, so byte windows suffice): one hash
/// look-up per window per distinct key length.
struct KeyScreen<'a> {
    keys: HashSet<&'a [u8]>,
    lengths: Vec<usize>,
}

impl<'a> KeyScreen<'a> {
    fn new(keys: impl Iterator<Item = &'a str>) -> Self {
        let keys: HashSet<&[u8]> = keys.map(str::as_bytes).collect();
        let mut lengths: Vec<usize> = keys.iter().map(|k| k.len()).collect();
        lengths.sort_unstable();
        lengths.dedup();
        KeyScreen { keys, lengths }
    }

    fn contains_key(&self, text: &str) -> bool {
        let bytes = text.as_bytes();
        self.lengths
            .iter()
            .any(|&len| len > 0 && bytes.windows(len).any(|w| self.keys.contains(w)))
    }
}

/// The tunnel loop's counters as last published.
fn render_tunnel(out: &mut Exposition, ctx: &ApiContext) {
    let t = *lock_stats(&ctx.metrics.tunnel);
    let e = &t.endpoint;
    out.single(
        "ostp_handshakes_accepted_total",
        "counter",
        "Handshakes accepted (sessions created).",
        e.sessions_created,
    );
    let name = "ostp_handshakes_refused_total";
    out.family(
        name,
        "counter",
        "Authenticated handshake refusals, by reason.",
    );
    for (reason, n) in REFUSAL_REASONS.iter().zip(t.refused) {
        out.sample(name, &[("reason", reason)], n);
    }
    let name = "ostp_datagrams_received_total";
    out.single(
        name,
        "counter",
        "UDP datagrams received on the tunnel ports.",
        e.datagrams_in,
    );
    let name = "ostp_datagrams_dropped_total";
    out.family(
        name,
        "counter",
        "Datagrams dropped silently, by reason (probes show up as unknown_tag, replay and \
         auth_failure).",
    );
    for (reason, n) in [
        ("unknown_tag", e.dropped_unknown),
        ("replay", e.hello_replays + e.data_replays),
        ("auth_failure", e.hello_auth_failed + e.data_auth_failed),
        ("malformed", e.hello_malformed + e.data_malformed),
        ("key_limit", e.hello_key_limited),
        ("stale", e.hello_stale),
        ("rate_limited", e.hello_rate_limited),
        ("user_rate_limited", e.hello_user_rate_limited),
        ("reply_queue_full", e.replies_dropped),
    ] {
        out.sample(name, &[("reason", reason)], n);
    }
    out.single(
        "ostp_streams_opened_total",
        "counter",
        "Outbound streams started.",
        t.streams_opened,
    );
    out.single(
        "ostp_streams_active",
        "gauge",
        "Outbound streams open, connecting or resolving.",
        t.streams_active,
    );
    out.family(
        "ostp_destinations_refused_total",
        "counter",
        "Destinations refused by the destination guard (streams and UDP relay datagrams).",
    );
    out.sample(
        "ostp_destinations_refused_total",
        &[("kind", "stream")],
        t.destinations_refused,
    );
    out.sample(
        "ostp_destinations_refused_total",
        &[("kind", "datagram")],
        t.datagram_destinations_refused,
    );
    render_tcp(out, &t.tcp);
    let name = "ostp_retransmitted_bytes_total";
    out.family(
        name,
        "counter",
        "Stream bytes the tunnel sent again after a loss, by carrier (over TCP always 0: TCP \
         retransmits, the tunnel inside never does).",
    );
    for (carrier, n) in [
        ("udp", t.endpoint.retransmitted_bytes_udp),
        ("tcp", t.endpoint.retransmitted_bytes_tcp),
    ] {
        out.sample(name, &[("carrier", carrier)], n);
    }
    out.single(
        "ostp_loop_wakeups_total",
        "counter",
        "Times the tunnel loop woke up from its wait (a spinning loop shows here).",
        t.loop_wakeups,
    );
    if t.published_unix > 0 {
        out.single(
            "ostp_tunnel_stats_timestamp_seconds",
            "gauge",
            "When the tunnel loop last published these counters (about once per second).",
            t.published_unix,
        );
    }
}

/// The TCP carrier's counters (all zero without `listen_tcp`).
fn render_tcp(out: &mut Exposition, t: &crate::tunnel::stats::TcpStats) {
    out.single(
        "ostp_tcp_connections_accepted_total",
        "counter",
        "TCP connections accepted on the listen_tcp addresses.",
        t.accepted,
    );
    out.single(
        "ostp_tcp_carrier_sessions_total",
        "counter",
        "Hellos over TCP answered with an accept (sessions carried over TCP).",
        t.sessions,
    );
    let name = "ostp_tcp_not_ostp_total";
    out.family(
        name,
        "counter",
        "TCP connections found not to be OSTP (probes, replays, broken carriers), by reason.",
    );
    for (reason, n) in NOT_OSTP_REASONS.iter().zip(t.not_ostp) {
        out.sample(name, &[("reason", reason)], n);
    }
    let name = "ostp_tcp_strangers_total";
    out.family(
        name,
        "counter",
        "What not-OSTP TCP connections got: the fallback, a failed fallback connect (then \
         discarded), read-and-discard, or closed early at max_unauthenticated_tcp.",
    );
    for (fate, n) in [
        ("fallback", t.fallback_splices),
        ("fallback_failed", t.fallback_failed),
        ("discarded", t.discards),
        ("evicted", t.evicted),
    ] {
        out.sample(name, &[("fate", fate)], n);
    }
    let name = "ostp_tcp_connections";
    out.family(
        name,
        "gauge",
        "TCP connections now: undecided or discarding, carrying a session, spliced to the fallback.",
    );
    for (state, n) in [
        ("unauthenticated", t.unauthenticated),
        ("carrier", t.carriers),
        ("fallback", t.splices),
    ] {
        out.sample(name, &[("state", state)], n);
    }
}

/// Counter flushes into the state file.
fn render_state(out: &mut Exposition, ctx: &ApiContext) {
    let s = ctx.persister.stats();
    out.single(
        "ostp_state_flushes_total",
        "counter",
        "Counter flushes into the state file that succeeded.",
        s.flushes,
    );
    out.single(
        "ostp_state_flush_failures_total",
        "counter",
        "Counter flushes into the state file that failed.",
        s.flush_failures,
    );
    if s.last_flush_unix > 0 {
        out.single(
            "ostp_state_last_flush_success_timestamp_seconds",
            "gauge",
            "When the last counter flush succeeded.",
            s.last_flush_unix,
        );
    }
}

/// The `process_*` metrics of the Prometheus client libraries, from `/proc`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
}

impl ProcessStats {
    /// Reads this process's numbers; `None` without a readable `/proc`.
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let max_fds = crate::sys::nofile_limit().ok().map(|(soft, _)| soft);
        parse_proc(&stat, &status, &boot, open_fds, max_fds)
    }

    fn render(&self, out: &mut Exposition) {
        out.single(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            self.cpu_seconds,
        );
        out.single(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            self.resident_bytes,
        );
        out.single(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            self.virtual_bytes,
        );
        out.single(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            self.start_time_seconds,
        );
        out.single(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            self.open_fds,
        );
        if let Some(max) = self.max_fds {
            out.single(
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors.",
                max,
            );
        }
    }
}

/// Parses `/proc/self/stat`, `/proc/self/status` and `/proc/stat` (pure, for tests).
pub fn parse_proc(
    stat: &str,
    status: &str,
    boot: &str,
    open_fds: u64,
    max_fds: Option<u64>,
) -> Option<ProcessStats> {
    // The command name (field 2) may hold spaces and parentheses: fields 3.. follow the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n.checked_sub(3)?)?.parse().ok() };
    let ticks = field(14)?.saturating_add(field(15)?);
    let start_ticks = field(22)?;
    let virtual_bytes = field(23)?;
    let kib = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let value = line.get(name.len()..)?.trim().strip_suffix("kB")?.trim();
        value.parse::<u64>().ok()?.checked_mul(1024)
    };
    let resident_bytes = kib("VmRSS:")?;
    let btime: u64 = boot
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(ProcessStats {
        cpu_seconds: ticks as f64 / USER_HZ,
        resident_bytes,
        virtual_bytes,
        start_time_seconds: btime as f64 + start_ticks as f64 / USER_HZ,
        open_fds,
        max_fds,
    })
}

/// Text in the exposition format: `# HELP` / `# TYPE` lines, then samples.
#[derive(Debug, Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (label, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                self.text.push_str(label);
                self.text.push_str("=\"");
                push_escaped(&mut self.text, v);
                self.text.push('"');
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// A family with one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// A label value: backslash, double quote and line feed escaped.
fn push_escaped(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// How often each label value occurs.
    fn counts(labels: &[String]) -> HashMap<&str, usize> {
        let mut m = HashMap::new();
        for l in labels {
            *m.entry(l.as_str()).or_insert(0) += 1;
        }
        m
    }
    use crate::users::UserTable;

    #[test]
    fn labels_are_names_or_masked_keys_never_keys() {
        let a = "0123456789abcdef0123456789abcdef";
        let b = "fedcba9876543210fedcba9876543210";
        let c = "0123456789abcdefXXXXXXXXXXXXXXXX";
        let short = "shortkey-16chars";
        let mut table = UserTable::new();
        for (key, name) in [
            (a, Some("alice")),
            (b, None),
            (c, Some("alice")),
            (short, Some("")),
            ("keyasname-0123456789", Some("keyasname-0123456789")),
            ("embedded-key-0123456", Some("bob (embedded-key-0123456)")),
            (
                "victim-key-abcdefgh1",
                Some("mallory victim-key-abcdefgh1!"),
            ),
            ("alice-2-key-0123456789", Some("alice #2")),
            ("maskclash0123456789a", None),
            ("maskclash0123456789b", None),
        ] {
            table
                .create(key.to_string(), name.map(str::to_string), None, 1)
                .unwrap();
        }
        let users = table.list();
        let labels = user_labels(&users);
        assert_eq!(labels[0], "alice");
        assert_eq!(labels[1], "fedcba98…");
        assert_eq!(labels[2], "alice #2");
        assert_eq!(labels[3], "shor…", "a 16-character key shows 4 characters");
        assert_eq!(labels[4], "keyas…", "a name equal to its key is not used");
        assert_eq!(labels[5], "embed…", "nor one containing its key");
        assert_eq!(labels[6], "victi…", "nor one containing another user's key");
        assert_eq!(
            labels[7], "alice #2 #2",
            "a name equal to a generated label"
        );
        assert_eq!(
            (labels[8].as_str(), labels[9].as_str()),
            ("maskc…", "maskc… #2")
        );
        assert!(counts(&labels).values().all(|n| *n == 1), "{labels:?}");
        for l in &labels {
            for u in &users {
                assert!(!l.contains(u.key.as_str()), "label {l:?} holds a key");
            }
        }
    }

    #[test]
    fn routes_are_labelled_without_keys() {
        let key = "0123456789abcdef0123456789abcdef";
        for (path, label) in [
            ("/metrics", "/metrics"),
            ("/api/server/status", "/api/server/status"),
            ("/api/users", "/api/users"),
            (&format!("/api/users/{key}") as &str, "/api/users/{key}"),
            (&format!("/api/users/{key}/limit"), "/api/users/{key}/limit"),
            (&format!("/api/users/{key}/reset"), "/api/users/{key}/reset"),
            (&format!("/api/subscribe/{key}"), "/api/subscribe/{key}"),
            ("/api/users/x", "/api/users/{key}"),
            ("/api/users/bulk", "/api/users/bulk"),
            ("/api/users/bulk-delete", "/api/users/bulk-delete"),
            ("/", "other"),
            (&format!("/{key}"), "other"),
            ("/api/nope", "other"),
        ] {
            assert_eq!(route_label(path), label, "{path}");
        }
        assert_eq!(method_label("GET"), "GET");
        assert_eq!(method_label("BREW"), "other");
    }

    #[test]
    fn request_counts_are_grouped_by_label() {
        let m = Metrics::default();
        m.count_request("GET", "/api/users/aaaaaaaaaaaaaaaaaaaa", 404);
        m.count_request("GET", "/api/users/bbbbbbbbbbbbbbbbbbbb", 404);
        m.count_request("WHAT", "/x", 404);
        let r = m.requests.lock().unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[&("/api/users/{key}".to_string(), "GET", 404)], 2);
        assert_eq!(r[&("other".to_string(), "other", 404)], 1);
    }

    #[test]
    fn exposition_escapes_label_values() {
        let mut e = Exposition::default();
        e.family("x_total", "counter", "Help.");
        e.sample("x_total", &[("user", "a\"b\\c\nd"), ("dir", "up")], 5);
        e.single("y", "gauge", "Y.", 1.5);
        assert_eq!(
            e.text,
            "# HELP x_total Help.\n# TYPE x_total counter\nx_total{user=\"a\\\"b\\\\c\\nd\",dir=\"up\"} 5\n\
             # HELP y Y.\n# TYPE y gauge\ny 1.5\n"
        );
    }

    #[test]
    fn proc_files_parse() {
        let stat = "4242 (ostp (a) b) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 125 0 0 20 0 \
                    9 0 12345 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let status = "Name:\tostp\nVmSize:\t  102400 kB\nVmRSS:\t   10240 kB\nThreads:\t9\n";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 5\n";
        let p = parse_proc(stat, status, boot, 12, Some(1024)).unwrap();
        assert_eq!(p.cpu_seconds, 3.75);
        assert_eq!(p.virtual_bytes, 104_857_600);
        assert_eq!(p.resident_bytes, 10_240 * 1024);
        assert_eq!(p.start_time_seconds, 1_700_000_123.45);
        assert_eq!((p.open_fds, p.max_fds), (12, Some(1024)));
        assert_eq!(parse_proc("garbage", status, boot, 0, None), None);
        assert_eq!(parse_proc(stat, "Name: x\n", boot, 0, None), None);
        assert_eq!(parse_proc(stat, status, "cpu 1\n", 0, None), None);
        let live = ProcessStats::read().unwrap();
        assert!(live.resident_bytes > 0 && live.open_fds > 0 && live.start_time_seconds > 1e9);
    }
}
