//! Split routing's learned addresses: the A/AAAA answers for names under `exclude.domains` seen
//! in DNS traffic through the client, so that TUN and router mode — which see only addresses —
//! connect them directly until the answer's TTL (clamped) runs out — and the DNS queries whose
//! answers may teach it ([`PendingQueries`]). Pure and bounded: addresses, TTLs and `now` in,
//! decisions out.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::tunnel::dns_wire::DnsName;

/// Shortest life of a learned address. Applications keep answers in their own caches for about
/// a minute whatever the TTL (Chrome keeps a system-resolver answer for 60 s; CDNs answer with
/// TTLs of 20–60 s, some of 0), and connect some time after they resolved: a shorter life would
/// send a connection made from a cached answer through the tunnel.
pub const MIN_TTL: Duration = Duration::from_secs(60);
/// Longest life of a learned address. Addresses move (CDNs reuse them for other names), so a
/// learned address must not bypass the tunnel for a day because its answer said so; two hours
/// outlives ordinary caches (most TTLs are at most an hour) while bounding how long a reassigned
/// address keeps going around the tunnel.
pub const MAX_TTL: Duration = Duration::from_secs(2 * 60 * 60);
/// Addresses remembered at most (about 100 bytes each: well under 1 MB on a router).
pub const MAX_LEARNED: usize = 4096;

/// Tunnel server addresses remembered at most (never learned).
const MAX_SERVER_ADDRS: usize = 8;

#[derive(Debug)]
struct Entry {
    expires: Instant,
    /// Direct connections and flows to the address now open: while any is, the entry is not
    /// evicted (so their releases find it), but new connections go direct only until it
    /// expires.
    holds: u32,
    /// The question name the address was learned from (lower case), for reloads.
    name: Box<str>,
    /// A reload dropped the name while connections held the address: no new connection goes
    /// direct; the entry waits for their releases.
    revoked: bool,
}

/// Addresses that go direct because an excluded name resolved to them.
#[derive(Debug)]
pub struct LearnedAddrs {
    map: HashMap<IpAddr, Entry>,
    cap: usize,
    /// The tunnel server's addresses: never learned.
    server: Vec<IpAddr>,
}

/// An IPv4-mapped IPv6 address is its IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Addresses no answer may send direct: loopback, unspecified, link-local, multicast and
/// broadcast (not destinations of a name on the internet; going direct would only help an
/// answer reach this host's or its link's services).
fn is_special(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            a.is_loopback()
                || a.is_unspecified()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_broadcast()
        }
        IpAddr::V6(a) => {
            a.is_loopback() || a.is_unspecified() || a.is_unicast_link_local() || a.is_multicast()
        }
    }
}

impl Default for LearnedAddrs {
    fn default() -> Self {
        LearnedAddrs::new(MAX_LEARNED)
    }
}

impl LearnedAddrs {
    /// An empty set of at most `cap` (≥ 1) addresses.
    pub fn new(cap: usize) -> Self {
        LearnedAddrs {
            map: HashMap::new(),
            cap: cap.max(1),
            server: Vec::new(),
        }
    }

    /// Number of addresses remembered (expired ones not yet removed included).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// `ip` is the tunnel server's: never learned from now on (an entry for it stops sending
    /// new connections direct). The last [`MAX_SERVER_ADDRS`] such addresses are kept.
    pub fn protect(&mut self, ip: IpAddr) {
        let ip = canonical(ip);
        if self.server.contains(&ip) {
            return;
        }
        if self.server.len() >= MAX_SERVER_ADDRS {
            self.server.remove(0);
        }
        self.server.push(ip);
        self.revoke(ip);
    }

    /// Whether no answer may send `ip` direct (see [`is_special`], and the server's addresses).
    pub fn refuses(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        is_special(ip) || self.server.contains(&ip)
    }

    /// `name` resolved to `ip` with `ttl_secs`: remembered until `now` + the TTL clamped to
    /// [`MIN_TTL`, `MAX_TTL`] (a later expiry already known is kept). When full, the entry that
    /// expires first among those not held makes room; with every entry held, nothing is
    /// learned (false). Addresses [`Self::refuses`] are never learned (false).
    pub fn learn(&mut self, ip: IpAddr, ttl_secs: u32, name: &str, now: Instant) -> bool {
        let ip = canonical(ip);
        if self.refuses(ip) {
            return false;
        }
        let ttl = Duration::from_secs(u64::from(ttl_secs)).clamp(MIN_TTL, MAX_TTL);
        let expires = now + ttl;
        if let Some(e) = self.map.get_mut(&ip) {
            // A revoked entry's expiry belonged to a name no longer excluded: start afresh.
            e.expires = if e.revoked {
                expires
            } else {
                e.expires.max(expires)
            };
            e.revoked = false;
            if *e.name != *name {
                e.name = name.into();
            }
            return true;
        }
        if self.map.len() >= self.cap {
            let victim = self
                .map
                .iter()
                .filter(|(_, e)| e.holds == 0)
                .min_by_key(|(_, e)| e.expires)
                .map(|(ip, _)| *ip);
            match victim {
                Some(v) => {
                    self.map.remove(&v);
                }
                None => return false,
            }
        }
        self.map.insert(
            ip,
            Entry {
                expires,
                holds: 0,
                name: name.into(),
                revoked: false,
            },
        );
        true
    }

    /// Whether new connections to `ip` go direct now: learned, not expired, not revoked. Open
    /// connections that hold it do not extend this. An entry nobody holds that no longer
    /// sends anything direct is forgotten here.
    pub fn contains(&mut self, ip: IpAddr, now: Instant) -> bool {
        let ip = canonical(ip);
        match self.map.get(&ip) {
            Some(e) if !e.revoked && now < e.expires => true,
            Some(e) if e.holds == 0 => {
                self.map.remove(&ip);
                false
            }
            _ => false,
        }
    }

    /// A direct connection or flow to `ip` opens: the entry is not evicted until
    /// [`Self::release`] (false when `ip` does not go direct now: nothing to release later).
    pub fn hold(&mut self, ip: IpAddr, now: Instant) -> bool {
        if !self.contains(ip, now) {
            return false;
        }
        match self.map.get_mut(&canonical(ip)) {
            Some(e) => {
                e.holds = e.holds.saturating_add(1);
                true
            }
            None => false,
        }
    }

    /// A direct connection or flow to `ip` (held) is gone; the entry is forgotten once nothing
    /// holds it and it expired or was revoked.
    pub fn release(&mut self, ip: IpAddr, now: Instant) {
        let ip = canonical(ip);
        if let Some(e) = self.map.get_mut(&ip) {
            e.holds = e.holds.saturating_sub(1);
            if e.holds == 0 && (e.revoked || now >= e.expires) {
                self.map.remove(&ip);
            }
        }
    }

    /// No new connection to `ip` goes direct; held, the entry stays (revoked) for the releases.
    fn revoke(&mut self, ip: IpAddr) {
        if let Some(e) = self.map.get_mut(&ip) {
            if e.holds == 0 {
                self.map.remove(&ip);
            } else {
                e.revoked = true;
            }
        }
    }

    /// Keeps only the addresses whose name `still_excluded` accepts (a reload of `exclude`);
    /// the number forgotten. Connections already open stay as they are: an address they hold
    /// is kept revoked (no new connection goes direct) until they close, so a later answer
    /// that teaches it again shares their count instead of being released by them.
    pub fn retain_names(&mut self, still_excluded: impl Fn(&str) -> bool) -> usize {
        let mut forgotten = 0;
        self.map.retain(|_, e| {
            if e.revoked || still_excluded(&e.name) {
                return true;
            }
            forgotten += 1;
            e.revoked = true;
            e.holds > 0
        });
        forgotten
    }
}

/// How long a DNS query waits for its answer (stub resolvers give up after about 5 s).
pub const QUERY_LIFE: Duration = Duration::from_secs(5);
/// Queries remembered per flow or connection at most (the oldest makes room).
pub const MAX_QUERIES_PER_FLOW: usize = 16;
/// Queries remembered at most (the oldest makes room).
pub const MAX_QUERIES: usize = 256;

/// What a DNS query travelled on: a UDP flow (its association id) or a TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryFlow {
    /// Tunnel datagrams of this association id (TUN or router flow, forwarder client, SOCKS5
    /// association).
    Datagrams(u32),
    /// A local connection (its slab index and serial).
    Conn { index: usize, serial: u32 },
}

#[derive(Debug)]
struct Query {
    flow: QueryFlow,
    to: SocketAddr,
    id: u16,
    question: DnsName,
    expires: Instant,
}

/// The DNS queries for excluded names the client forwarded and whose answers it has not seen:
/// only an answer from the address a query went to, on the same flow, with the query's ID and
/// question teaches [`LearnedAddrs`] (each query once), so datagrams sprayed at the server's
/// relay ports by anyone else teach nothing. Small, bounded and expiring.
#[derive(Debug, Default)]
pub struct PendingQueries {
    list: Vec<Query>,
}

fn canonical_addr(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

impl PendingQueries {
    /// Whether no query waits (then no answer can teach anything).
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Number of queries waiting (expired ones not yet removed included).
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Query `id` for `question` left on `flow` for `to`.
    pub fn note(
        &mut self,
        flow: QueryFlow,
        to: SocketAddr,
        id: u16,
        question: &DnsName,
        now: Instant,
    ) {
        self.list.retain(|q| now < q.expires);
        let to = canonical_addr(to);
        let expires = now + QUERY_LIFE;
        let same =
            |q: &&mut Query| q.flow == flow && q.to == to && q.id == id && q.question == *question;
        if let Some(q) = self.list.iter_mut().find(same) {
            q.expires = expires; // a retry
            return;
        }
        let of_flow = self.list.iter().filter(|q| q.flow == flow).count();
        let oldest = if of_flow >= MAX_QUERIES_PER_FLOW {
            self.oldest(|q| q.flow == flow)
        } else if self.list.len() >= MAX_QUERIES {
            self.oldest(|_| true)
        } else {
            None
        };
        if let Some(i) = oldest {
            self.list.swap_remove(i);
        }
        self.list.push(Query {
            flow,
            to,
            id,
            question: *question,
            expires,
        });
    }

    fn oldest(&self, of: impl Fn(&Query) -> bool) -> Option<usize> {
        let it = self.list.iter().enumerate().filter(|(_, q)| of(q));
        it.min_by_key(|(_, q)| q.expires).map(|(i, _)| i)
    }

    /// An answer on `flow` from `from` with `id` and `question`: whether it answers a waiting
    /// query (which is then forgotten: one answer per query).
    pub fn answered(
        &mut self,
        flow: QueryFlow,
        from: SocketAddr,
        id: u16,
        question: &DnsName,
        now: Instant,
    ) -> bool {
        self.list.retain(|q| now < q.expires);
        let from = canonical_addr(from);
        let found = self
            .list
            .iter()
            .position(|q| q.flow == flow && q.to == from && q.id == id && q.question == *question);
        match found {
            Some(i) => {
                self.list.swap_remove(i);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ttls_are_clamped_and_expiry_forgets() {
        let t0 = Instant::now();
        let mut l = LearnedAddrs::new(16);
        l.learn(ip("10.0.0.1"), 0, "a.example", t0);
        l.learn(ip("10.0.0.2"), 86_400, "b.example", t0);
        l.learn(ip("2001:db8::1"), 300, "c.example", t0);
        assert!(l.contains(ip("10.0.0.1"), t0 + MIN_TTL - Duration::from_secs(1)));
        assert!(
            !l.contains(ip("10.0.0.1"), t0 + MIN_TTL),
            "a TTL of 0 lives MIN_TTL"
        );
        assert_eq!(l.len(), 2, "the expired entry is forgotten when looked at");
        assert!(l.contains(ip("10.0.0.2"), t0 + MAX_TTL - Duration::from_secs(1)));
        assert!(
            !l.contains(ip("10.0.0.2"), t0 + MAX_TTL),
            "a day is cut to MAX_TTL"
        );
        assert!(l.contains(ip("2001:db8::1"), t0 + Duration::from_secs(299)));
        assert!(!l.contains(ip("2001:db8::1"), t0 + Duration::from_secs(300)));
        assert!(!l.contains(ip("10.9.9.9"), t0));
    }

    #[test]
    fn a_later_answer_extends_never_shortens_and_mapped_addresses_are_ipv4() {
        let t0 = Instant::now();
        let mut l = LearnedAddrs::new(16);
        l.learn(ip("10.0.0.1"), 600, "a.example", t0);
        l.learn(ip("::ffff:10.0.0.1"), 60, "a.example", t0);
        assert_eq!(l.len(), 1);
        assert!(l.contains(ip("10.0.0.1"), t0 + Duration::from_secs(599)));
        l.learn(ip("10.0.0.1"), 900, "a.example", t0);
        assert!(l.contains(ip("::ffff:10.0.0.1"), t0 + Duration::from_secs(899)));
    }

    #[test]
    fn a_full_set_evicts_the_soonest_expiring_entry_not_held() {
        let t0 = Instant::now();
        let mut l = LearnedAddrs::new(3);
        l.learn(ip("10.0.0.1"), 100, "x", t0);
        l.learn(ip("10.0.0.2"), 200, "x", t0);
        l.learn(ip("10.0.0.3"), 300, "x", t0);
        assert!(l.hold(ip("10.0.0.1"), t0));
        assert!(l.learn(ip("10.0.0.4"), 400, "x", t0));
        assert_eq!(l.len(), 3);
        assert!(l.contains(ip("10.0.0.1"), t0), "held: kept");
        assert!(
            !l.contains(ip("10.0.0.2"), t0),
            "soonest expiring, not held: evicted"
        );
        assert!(l.hold(ip("10.0.0.3"), t0) && l.hold(ip("10.0.0.4"), t0));
        assert!(
            !l.learn(ip("10.0.0.5"), 60, "x", t0),
            "all held: nothing learned"
        );
        assert!(!l.contains(ip("10.0.0.5"), t0));
    }

    #[test]
    fn a_hold_keeps_an_entry_for_its_release_but_sends_nothing_new_direct_past_its_ttl() {
        let t0 = Instant::now();
        let mut l = LearnedAddrs::new(2);
        assert!(!l.hold(ip("10.0.0.1"), t0), "nothing to hold");
        l.learn(ip("10.0.0.1"), 60, "a.example", t0);
        assert!(l.hold(ip("10.0.0.1"), t0) && l.hold(ip("10.0.0.1"), t0));
        let late = t0 + Duration::from_secs(3600);
        assert!(
            !l.contains(ip("10.0.0.1"), late),
            "expired: new connections go through the tunnel although two are open"
        );
        assert!(!l.hold(ip("10.0.0.1"), late), "no new hold past the TTL");
        assert_eq!(l.len(), 1, "kept for the open connections' releases");
        // Not evicted while held: a full set learns nothing rather than drop it.
        l.learn(ip("10.0.0.2"), 60, "b.example", late);
        l.hold(ip("10.0.0.2"), late);
        assert!(!l.learn(ip("10.0.0.3"), 60, "c.example", late));
        l.release(ip("10.0.0.1"), late);
        assert_eq!(l.len(), 2, "one still open");
        l.release(ip("10.0.0.1"), late);
        assert_eq!(
            l.len(),
            1,
            "the last release of an expired entry forgets it"
        );
        l.release(ip("10.0.0.1"), late); // a release after it is gone: harmless
    }

    #[test]
    fn a_reload_keeps_held_addresses_revoked_so_old_releases_do_not_take_new_holds() {
        let t0 = Instant::now();
        let mut l = LearnedAddrs::new(2);
        let x = ip("10.0.0.1");
        l.learn(x, 60, "www.drop.example", t0);
        assert!(l.hold(x, t0), "an old connection");
        assert_eq!(l.retain_names(|n| n.ends_with("keep.example")), 1);
        assert!(!l.contains(x, t0), "no new connection goes direct");
        assert!(!l.hold(x, t0));
        // A name still excluded resolves to it again: direct again, and a new connection.
        assert!(l.learn(x, 60, "www.keep.example", t0));
        assert!(l.contains(x, t0) && l.hold(x, t0));
        l.release(x, t0); // the old connection closes
        // The new connection still holds it: a full set evicts another entry, never this one.
        l.learn(ip("10.0.0.2"), 600, "b.keep.example", t0);
        assert!(l.learn(ip("10.0.0.3"), 600, "c.keep.example", t0));
        assert!(l.contains(x, t0), "still held by the open connection");
        assert!(!l.contains(ip("10.0.0.2"), t0));
        // Dropped with nothing open: gone at once.
        assert_eq!(l.retain_names(|_| false), 2);
        assert_eq!(l.len(), 1, "only the held one waits");
        l.release(x, t0);
        assert!(l.is_empty());
    }

    #[test]
    fn special_and_server_addresses_are_never_learned() {
        let t0 = Instant::now();
        let mut l = LearnedAddrs::new(64);
        for a in [
            "127.0.0.1",
            "0.0.0.0",
            "169.254.1.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!l.learn(ip(a), 60, "x.example", t0), "{a}");
            assert!(!l.contains(ip(a), t0), "{a}");
        }
        assert!(l.learn(ip("203.0.113.7"), 60, "x.example", t0));
        assert!(l.learn(ip("203.0.113.8"), 60, "x.example", t0));
        assert!(l.hold(ip("203.0.113.8"), t0));
        l.protect(ip("203.0.113.7"));
        l.protect(ip("::ffff:203.0.113.8"));
        assert!(
            !l.contains(ip("203.0.113.7"), t0),
            "the server's: forgotten"
        );
        assert!(!l.contains(ip("203.0.113.8"), t0), "held, but nothing new");
        assert!(!l.learn(ip("203.0.113.7"), 60, "x.example", t0));
        assert!(l.learn(ip("203.0.113.9"), 60, "x.example", t0));
    }

    fn question(name: &str) -> DnsName {
        let mut b = crate::tunnel::dns_wire::tests::Builder::response(name, 0);
        b.msg[2] = 0x01;
        crate::tunnel::dns_wire::DnsQuery::parse(&b.msg)
            .unwrap()
            .question
    }

    #[test]
    fn only_an_answer_to_a_query_sent_teaches_and_only_once() {
        let t0 = Instant::now();
        let mut p = PendingQueries::default();
        let (flow, other) = (QueryFlow::Datagrams(7), QueryFlow::Datagrams(8));
        let to: SocketAddr = "10.0.0.53:53".parse().unwrap();
        let q = question("www.direct.test");
        assert!(!p.answered(flow, to, 1, &q, t0), "nothing asked");
        p.note(flow, to, 1, &q, t0);
        let mapped: SocketAddr = "[::ffff:10.0.0.53]:53".parse().unwrap();
        assert!(!p.answered(other, to, 1, &q, t0), "another flow");
        assert!(!p.answered(flow, "10.0.0.54:53".parse().unwrap(), 1, &q, t0));
        assert!(!p.answered(flow, "10.0.0.53:5353".parse().unwrap(), 1, &q, t0));
        assert!(!p.answered(flow, to, 2, &q, t0), "another ID");
        assert!(!p.answered(flow, to, 1, &question("x.direct.test"), t0));
        assert!(p.answered(flow, mapped, 1, &q, t0), "the answer");
        assert!(!p.answered(flow, to, 1, &q, t0), "consumed");
        p.note(flow, to, 1, &q, t0);
        assert!(!p.answered(flow, to, 1, &q, t0 + QUERY_LIFE), "expired");
        assert!(p.is_empty());
    }

    #[test]
    fn pending_queries_are_bounded_per_flow_and_in_all() {
        let t0 = Instant::now();
        let mut p = PendingQueries::default();
        let to: SocketAddr = "10.0.0.53:53".parse().unwrap();
        let q = question("www.direct.test");
        let flow = QueryFlow::Conn {
            index: 3,
            serial: 9,
        };
        for id in 0..(MAX_QUERIES_PER_FLOW as u16 + 4) {
            p.note(flow, to, id, &q, t0 + Duration::from_millis(u64::from(id)));
        }
        assert_eq!(p.len(), MAX_QUERIES_PER_FLOW);
        assert!(!p.answered(flow, to, 0, &q, t0), "the oldest made room");
        assert!(p.answered(flow, to, MAX_QUERIES_PER_FLOW as u16 + 3, &q, t0));
        for f in 0..(MAX_QUERIES as u32 + 10) {
            p.note(
                QueryFlow::Datagrams(f),
                to,
                1,
                &q,
                t0 + Duration::from_millis(100),
            );
        }
        assert_eq!(p.len(), MAX_QUERIES);
    }

    #[test]
    fn a_reload_forgets_addresses_of_names_no_longer_excluded() {
        let t0 = Instant::now();
        let mut l = LearnedAddrs::new(16);
        l.learn(ip("10.0.0.1"), 600, "www.keep.example", t0);
        l.learn(ip("10.0.0.2"), 600, "cdn.drop.example", t0);
        assert_eq!(l.retain_names(|n| n.ends_with("keep.example")), 1);
        assert!(l.contains(ip("10.0.0.1"), t0) && !l.contains(ip("10.0.0.2"), t0));
    }
}
