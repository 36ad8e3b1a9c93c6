//! The checks on a request head before the front end reads the body or sends `100 Continue`
//! (sans-IO, takes `now`): the open API's browser defences (loopback `Host` only, same-origin
//! only, JSON mutations only), the bearer token, and the per-address limit on failed
//! authentications ([`FailedAuthLimiter`]). `GET /metrics` also accepts the metrics token;
//! every other route only the API token. Refusals are counted for `/metrics`.
//!
//! Why the browser checks apply only to the open API: a web page can make a browser send
//! requests to the API (cross-site form posts; DNS rebinding, which makes the page same-origin
//! with a foreign `Host`), but it cannot make the browser add an `Authorization` header to them
//! (that needs a CORS preflight the API never grants), so with a token set those requests are
//! refused by the token check anyway.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::admission::PeerKey;
use super::errors::ApiError;
use super::http::Head;
use super::metrics::{self, Metrics};
use super::{auth, routes};

/// Addresses whose failures are remembered at once; beyond, settled entries are dropped first.
const MAX_TRACKED_PEERS: usize = 4096;

/// A per-address allowance of failed authentications: `burst` at once, then one more per
/// `interval` (a token bucket kept as its "theoretical arrival time", at full resolution).
/// While an address has none left, its requests are refused before the token is compared, so
/// it learns nothing; other addresses are unaffected.
#[derive(Debug)]
pub struct FailedAuthLimiter {
    burst: u32,
    interval: Duration,
    /// Per address: when its allowance is full again.
    full_at: HashMap<PeerKey, Instant>,
}

impl FailedAuthLimiter {
    pub fn new(burst: u32, interval: Duration) -> FailedAuthLimiter {
        FailedAuthLimiter {
            burst: burst.max(1),
            interval,
            full_at: HashMap::new(),
        }
    }

    /// How long `peer` must wait before its next attempt; `None` = it may try now.
    pub fn wait(&self, peer: PeerKey, now: Instant) -> Option<Duration> {
        let full_at = *self.full_at.get(&peer)?;
        let slack = self.interval.saturating_mul(self.burst - 1);
        let earliest = full_at.checked_sub(slack).unwrap_or(now);
        (earliest > now).then(|| earliest - now)
    }

    /// Records a failed authentication from `peer`; true when that used up its allowance.
    pub fn failed(&mut self, peer: PeerKey, now: Instant) -> bool {
        if !self.full_at.contains_key(&peer) && self.full_at.len() >= MAX_TRACKED_PEERS {
            self.forget_settled(now);
        }
        let start = self.full_at.get(&peer).map_or(now, |t| (*t).max(now));
        let full_at = start.checked_add(self.interval).unwrap_or(start);
        self.full_at.insert(peer, full_at);
        self.wait(peer, now).is_some()
    }

    /// Drops addresses whose allowance is full again; if none, the one closest to it.
    fn forget_settled(&mut self, now: Instant) {
        self.full_at.retain(|_, t| *t > now);
        if self.full_at.len() >= MAX_TRACKED_PEERS {
            if let Some(k) = self
                .full_at
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| *k)
            {
                self.full_at.remove(&k);
            }
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.full_at.len()
    }
}

/// Decides, from the head alone, whether a request may go on.
#[derive(Debug)]
pub struct Gate {
    token: String,
    limiter: FailedAuthLimiter,
    /// Also accepted on `/metrics` (empty = none).
    metrics_token: String,
    /// Where refusals are counted.
    metrics: Option<Arc<Metrics>>,
}

impl Gate {
    /// `token` empty = open API.
    pub fn new(token: String, limiter: FailedAuthLimiter) -> Gate {
        Gate {
            token,
            limiter,
            metrics_token: String::new(),
            metrics: None,
        }
    }

    /// Accepts `metrics_token` (if not empty) on `/metrics` and counts refusals in `metrics`.
    pub fn with_metrics(mut self, metrics_token: String, metrics: Arc<Metrics>) -> Gate {
        self.metrics_token = metrics_token;
        self.metrics = Some(metrics);
        self
    }

    /// `Ok` = read the body and answer; `Err` = send this error and close.
    pub fn check(&mut self, peer: PeerKey, head: &Head, now: Instant) -> Result<(), ApiError> {
        let path = head.target.split('?').next().unwrap_or_default();
        let result = self.check_path(peer, head, path, now);
        if let (Err(e), Some(m)) = (&result, &self.metrics) {
            m.count_request(&head.method, path, e.status);
        }
        result
    }

    /// Counts an error the front end answered before any request head could be parsed
    /// (malformed HTTP, a head or request that timed out, no room for the connection):
    /// `route="other"`, `method="other"`.
    pub fn count_unparsed(&self, status: u16) {
        if let Some(m) = &self.metrics {
            m.count_request("", "", status);
        }
    }

    fn check_path(
        &mut self,
        peer: PeerKey,
        head: &Head,
        path: &str,
        now: Instant,
    ) -> Result<(), ApiError> {
        if self.token.is_empty() {
            return check_open_api(head);
        }
        let (needs_token, also) = if path == metrics::PATH {
            (true, self.metrics_token.as_str())
        } else {
            (routes::resolve(path).is_some_and(|r| r.needs_token()), "")
        };
        if !needs_token {
            return Ok(());
        }
        if let Some(wait) = self.limiter.wait(peer, now) {
            return Err(too_many_failures(wait));
        }
        auth::check_head_any(head, &self.token, also).inspect_err(|_| {
            if self.limiter.failed(peer, now) {
                log::warn!(
                    "api: too many failed authentications from {}; refusing its requests for a while",
                    describe(peer)
                );
            }
        })
    }
}

fn too_many_failures(wait: Duration) -> ApiError {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    ApiError::too_many_requests(
        "too many failed authentications from your address; try again later",
        u32::try_from(secs.max(1)).unwrap_or(u32::MAX),
    )
}

fn describe(peer: PeerKey) -> String {
    match peer {
        PeerKey::V4(o) => Ipv4Addr::from(o).to_string(),
        PeerKey::V6(p) => {
            let mut o = [0u8; 16];
            o[..8].copy_from_slice(&p);
            format!("{}/64", Ipv6Addr::from(o))
        }
    }
}

/// The open API's defences against web pages: a loopback `Host` (DNS rebinding), a same-origin
/// `Origin` and `Sec-Fetch-Site` (cross-site requests), and no non-JSON body on a mutation
/// (form and `text/plain` posts need no CORS preflight). Requests without these headers — curl,
/// scripts, panels — pass.
pub fn check_open_api(head: &Head) -> Result<(), ApiError> {
    let values = |name: &'static str| {
        head.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let mut hosts = values("host");
    let host = hosts.next();
    if hosts.next().is_some() || host.is_some_and(|h| !is_loopback_host(h)) {
        return Err(ApiError::forbidden(
            "this API has no token, so it answers only requests addressed to a loopback host \
             (Host: 127.0.0.1, [::1] or localhost, with any port)",
        ));
    }
    for origin in values("origin") {
        let same = host.is_some_and(|h| {
            origin
                .strip_prefix("http://")
                .is_some_and(|o| o.eq_ignore_ascii_case(h))
        });
        if !same {
            return Err(ApiError::forbidden(
                "cross-site request refused: the Origin header is not this API's own origin",
            ));
        }
    }
    for site in values("sec-fetch-site") {
        if !(site.eq_ignore_ascii_case("same-origin") || site.eq_ignore_ascii_case("none")) {
            return Err(ApiError::forbidden(
                "cross-site request refused (Sec-Fetch-Site is not same-origin)",
            ));
        }
    }
    if !matches!(head.method.as_str(), "GET" | "HEAD" | "OPTIONS") {
        for ct in values("content-type") {
            let media = ct.split(';').next().unwrap_or_default().trim();
            if !media.eq_ignore_ascii_case("application/json") {
                return Err(ApiError::forbidden(
                    "a request that changes something must send its body as Content-Type: application/json",
                ));
            }
        }
    }
    Ok(())
}

/// `127.0.0.0/8`, `[::1]` or `localhost`, optionally with `:port`.
fn is_loopback_host(host: &str) -> bool {
    let (loopback, rest) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((inside, after)) => (
                inside.parse::<Ipv6Addr>().is_ok_and(|a| a.is_loopback()),
                after,
            ),
            None => return false,
        },
        None => {
            let (name, after) = host.find(':').map_or((host, ""), |i| host.split_at(i));
            (
                name.eq_ignore_ascii_case("localhost")
                    || name.parse::<Ipv4Addr>().is_ok_and(|a| a.is_loopback()),
                after,
            )
        }
    };
    let port_ok = rest.is_empty()
        || rest.strip_prefix(':').is_some_and(|d| {
            !d.is_empty() && d.len() <= 5 && d.bytes().all(|b| b.is_ascii_digit())
        });
    loopback && port_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::admission::Peer;
    use crate::api::http::parse_head;

    fn head(text: &str) -> Head {
        parse_head(text.as_bytes()).unwrap().unwrap().0
    }

    fn key(s: &str) -> PeerKey {
        Peer::of(s.parse().unwrap()).key
    }

    #[test]
    fn limiter_allows_a_burst_then_one_per_interval() {
        let t0 = Instant::now();
        let mut l = FailedAuthLimiter::new(3, Duration::from_secs(1));
        let a = key("192.0.2.1");
        for i in 0..3 {
            assert_eq!(l.wait(a, t0), None, "failure {i} is within the burst");
            assert_eq!(
                l.failed(a, t0),
                i == 2,
                "the third failure uses up the burst"
            );
        }
        assert_eq!(l.wait(a, t0), Some(Duration::from_secs(1)));
        // Sub-millisecond time counts: 400 ms later, 600 ms are left.
        assert_eq!(
            l.wait(a, t0 + Duration::from_millis(400)),
            Some(Duration::from_millis(600))
        );
        // Another address is not affected.
        assert_eq!(l.wait(key("192.0.2.2"), t0), None);
        // One more attempt per interval: after 1 s one, then blocked again.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.wait(a, t1), None);
        assert!(l.failed(a, t1));
        assert_eq!(l.wait(a, t1), Some(Duration::from_secs(1)));
        // After the whole burst's worth of time it is full again.
        let t2 = t1 + Duration::from_secs(4);
        for _ in 0..2 {
            assert!(!l.failed(a, t2));
        }
    }

    #[test]
    fn limiter_table_stays_bounded_and_keeps_the_indebted() {
        let t0 = Instant::now();
        let mut l = FailedAuthLimiter::new(2, Duration::from_secs(60));
        let attacker = key("198.51.100.1");
        l.failed(attacker, t0);
        l.failed(attacker, t0);
        assert!(l.wait(attacker, t0).is_some());
        for i in 0..(MAX_TRACKED_PEERS as u32 + 100) {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            l.failed(Peer::of(ip.into()).key, t0 + Duration::from_millis(1));
        }
        assert!(l.tracked() <= MAX_TRACKED_PEERS);
        assert!(
            l.wait(attacker, t0 + Duration::from_millis(2)).is_some(),
            "the most indebted address is kept"
        );
    }

    #[test]
    fn gate_rate_limits_failures_per_address_and_keeps_subscribe_open() {
        let t0 = Instant::now();
        let token = "0123456789abcdef".to_string();
        let mut g = Gate::new(token, FailedAuthLimiter::new(2, Duration::from_secs(1)));
        let (a, b) = (key("192.0.2.1"), key("192.0.2.2"));
        let bad = head("GET /api/users HTTP/1.1\r\nAuthorization: Bearer nope\r\n\r\n");
        let good =
            head("GET /api/users HTTP/1.1\r\nAuthorization: Bearer 0123456789abcdef\r\n\r\n");
        assert_eq!(g.check(a, &bad, t0).unwrap_err().status, 401);
        assert_eq!(g.check(a, &bad, t0).unwrap_err().status, 401);
        let e = g.check(a, &bad, t0).unwrap_err();
        assert_eq!((e.status, e.retry_after), (429, Some(1)));
        let e = g.check(a, &good, t0).unwrap_err();
        assert_eq!(
            e.status, 429,
            "the token is not even compared while blocked"
        );
        assert!(
            g.check(b, &good, t0).is_ok(),
            "another address still gets in"
        );
        assert!(g.check(a, &good, t0 + Duration::from_secs(1)).is_ok());
        // Routes without a token and unknown paths are left to the handlers.
        let sub = head("GET /api/subscribe/somekey HTTP/1.1\r\n\r\n");
        assert!(g.check(a, &sub, t0).is_ok());
        assert!(g.check(a, &head("GET /nope HTTP/1.1\r\n\r\n"), t0).is_ok());
    }

    #[test]
    fn metrics_token_opens_only_metrics_and_refusals_are_counted() {
        let t0 = Instant::now();
        let m = Arc::new(Metrics::default());
        let mut g = Gate::new(
            "api-token-0123456789".into(),
            FailedAuthLimiter::new(100, Duration::from_secs(1)),
        )
        .with_metrics("scrape-token-0123456789".into(), m.clone());
        let p = key("192.0.2.1");
        let with = |path: &str, token: &str| {
            head(&format!(
                "GET {path} HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\r\n"
            ))
        };
        assert!(
            g.check(p, &with("/metrics", "scrape-token-0123456789"), t0)
                .is_ok()
        );
        assert!(
            g.check(p, &with("/metrics", "api-token-0123456789"), t0)
                .is_ok()
        );
        for path in [
            "/api/users",
            "/api/server/status",
            "/api/users/abcdefabcdefabcdef",
        ] {
            let e = g
                .check(p, &with(path, "scrape-token-0123456789"), t0)
                .unwrap_err();
            assert_eq!(e.status, 401, "{path}");
            assert!(g.check(p, &with(path, "api-token-0123456789"), t0).is_ok());
        }
        let e = g
            .check(p, &head("GET /metrics HTTP/1.1\r\n\r\n"), t0)
            .unwrap_err();
        assert_eq!(e.status, 401);
        let e = g.check(p, &with("/metrics?x=1", "wrong"), t0).unwrap_err();
        assert_eq!(e.status, 401);
        // Without a metrics token, /metrics takes only the API token.
        let mut plain = Gate::new(
            "api-token-0123456789".into(),
            FailedAuthLimiter::new(100, Duration::from_secs(1)),
        );
        let e = plain.check(p, &with("/metrics", ""), t0).unwrap_err();
        assert_eq!(e.status, 401);
        assert!(
            plain
                .check(p, &with("/metrics", "api-token-0123456789"), t0)
                .is_ok()
        );
        let text = m.requests_text();
        assert!(
            text.contains("route=\"/metrics\",method=\"GET\",code=\"401\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("route=\"/api/users/{key}\",method=\"GET\",code=\"401\"} 1"),
            "{text}"
        );
        assert!(!text.contains("abcdefabcdefabcdef"), "{text}");
    }

    #[test]
    fn open_api_accepts_only_loopback_same_origin_json() {
        let ok = |t: &str| check_open_api(&head(t)).is_ok();
        for good in [
            "GET /api/users HTTP/1.1\r\nHost: 127.0.0.1:9090\r\n\r\n",
            "GET /api/users HTTP/1.1\r\nHost: localhost\r\n\r\n",
            "GET /api/users HTTP/1.1\r\nHost: LOCALHOST:1\r\n\r\n",
            "GET /api/users HTTP/1.1\r\nHost: [::1]:9090\r\n\r\n",
            "GET /api/users HTTP/1.1\r\nHost: 127.0.0.2\r\n\r\n",
            "GET /api/users HTTP/1.0\r\n\r\n",
            "POST /api/users HTTP/1.1\r\nHost: 127.0.0.1:9\r\nContent-Type: application/json; charset=utf-8\r\n\r\n",
            "POST /api/users/k/reset HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n",
            "POST /api/users HTTP/1.1\r\nHost: 127.0.0.1:9\r\nOrigin: http://127.0.0.1:9\r\nSec-Fetch-Site: same-origin\r\n\r\n",
            "GET /api/users HTTP/1.1\r\nHost: 127.0.0.1\r\nSec-Fetch-Site: none\r\n\r\n",
            "GET /api/users HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n\r\n",
        ] {
            assert!(ok(good), "{good:?}");
        }
        for bad in [
            "GET /api/users HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            "GET /api/users HTTP/1.1\r\nHost: evil.example:9090\r\n\r\n",
            "GET /api/users HTTP/1.1\r\nHost: localhost.evil.example\r\n\r\n",
            "GET /api/users HTTP/1.1\r\nHost: 127.0.0.1.nip.io\r\n\r\n",
            "GET /api/users HTTP/1.1\r\nHost: 192.168.1.1\r\n\r\n",
            "GET /api/users HTTP/1.1\r\nHost: [::2]\r\n\r\n",
            "GET /api/users HTTP/1.1\r\nHost: [::1\r\n\r\n",
            "GET /api/users HTTP/1.1\r\nHost: 127.0.0.1:\r\n\r\n",
            "GET /api/users HTTP/1.1\r\nHost: 127.0.0.1:x\r\n\r\n",
            "GET /api/users HTTP/1.1\r\nHost: \r\n\r\n",
            "GET /api/users HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n",
            "POST /api/users HTTP/1.1\r\nHost: 127.0.0.1:9\r\nOrigin: http://evil.example\r\n\r\n",
            "POST /api/users HTTP/1.1\r\nHost: 127.0.0.1:9\r\nOrigin: null\r\n\r\n",
            "POST /api/users HTTP/1.1\r\nHost: 127.0.0.1:9\r\nOrigin: http://localhost:3000\r\n\r\n",
            "GET /api/users HTTP/1.1\r\nOrigin: http://127.0.0.1\r\n\r\n",
            "POST /api/users HTTP/1.1\r\nHost: 127.0.0.1:9\r\nSec-Fetch-Site: cross-site\r\n\r\n",
            "POST /api/users HTTP/1.1\r\nHost: 127.0.0.1:9\r\nSec-Fetch-Site: same-site\r\n\r\n",
            "POST /api/users HTTP/1.1\r\nHost: 127.0.0.1:9\r\nContent-Type: text/plain\r\n\r\n",
            "PUT /api/users/k/limit HTTP/1.1\r\nHost: 127.0.0.1:9\r\nContent-Type: application/x-www-form-urlencoded\r\n\r\n",
            "POST /api/users HTTP/1.1\r\nHost: 127.0.0.1:9\r\nContent-Type: multipart/form-data; boundary=x\r\n\r\n",
        ] {
            let e = check_open_api(&head(bad)).unwrap_err();
            assert_eq!(e.status, 403, "{bad:?}");
        }
    }

    #[test]
    fn errors_before_a_parsed_head_are_counted_without_a_route() {
        let metrics = Arc::new(crate::api::metrics::Metrics::default());
        let limiter = FailedAuthLimiter::new(2, Duration::from_secs(1));
        let g = Gate::new(String::new(), limiter).with_metrics(String::new(), metrics.clone());
        g.count_unparsed(400);
        g.count_unparsed(408);
        let text = metrics.requests_text();
        assert!(
            text.contains(
                "ostp_api_requests_total{route=\"other\",method=\"other\",code=\"400\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("code=\"408\"} 1"), "{text}");
    }
}
