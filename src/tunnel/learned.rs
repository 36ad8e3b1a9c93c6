//! Split routing's learned addresses: the A/AAAA answers for names under `exclude.domains` seen
//! in DNS traffic through the client, so that TUN and router mode — which see only addresses —
//! connect them directly until the answer's TTL (clamped) runs out. Pure and bounded: addresses,
//! TTLs and `now` in, decisions out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

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

#[derive(Debug)]
struct Entry {
    expires: Instant,
    /// Direct connections and flows to the address now open: while any is, the entry stays
    /// (a reconnect mid-transfer must not change route because the TTL ran out).
    holds: u32,
    /// The question name the address was learned from (lower case), for reloads.
    name: Box<str>,
}

/// Addresses that go direct because an excluded name resolved to them.
#[derive(Debug)]
pub struct LearnedAddrs {
    map: HashMap<IpAddr, Entry>,
    cap: usize,
}

/// An IPv4-mapped IPv6 address is its IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
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

    /// `name` resolved to `ip` with `ttl_secs`: remembered until `now` + the TTL clamped to
    /// [`MIN_TTL`, `MAX_TTL`] (a later expiry already known is kept). When full, the entry that
    /// expires first among those not held makes room; with every entry held, nothing is
    /// learned (false).
    pub fn learn(&mut self, ip: IpAddr, ttl_secs: u32, name: &str, now: Instant) -> bool {
        let ip = canonical(ip);
        let ttl = Duration::from_secs(u64::from(ttl_secs)).clamp(MIN_TTL, MAX_TTL);
        let expires = now + ttl;
        if let Some(e) = self.map.get_mut(&ip) {
            e.expires = e.expires.max(expires);
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
            },
        );
        true
    }

    /// Whether connections to `ip` go direct now (learned, and not expired or held). An expired
    /// entry nobody holds is forgotten here.
    pub fn contains(&mut self, ip: IpAddr, now: Instant) -> bool {
        let ip = canonical(ip);
        match self.map.get(&ip) {
            Some(e) if e.holds > 0 || now < e.expires => true,
            Some(_) => {
                self.map.remove(&ip);
                false
            }
            None => false,
        }
    }

    /// A direct connection or flow to `ip` opens: the entry stays until [`Self::release`]
    /// (false when `ip` is not learned: nothing to release later).
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

    /// A direct connection or flow to `ip` (held) is gone; the entry expires as usual.
    pub fn release(&mut self, ip: IpAddr, now: Instant) {
        let ip = canonical(ip);
        if let Some(e) = self.map.get_mut(&ip) {
            e.holds = e.holds.saturating_sub(1);
            if e.holds == 0 && now >= e.expires {
                self.map.remove(&ip);
            }
        }
    }

    /// Keeps only the addresses whose name `still_excluded` accepts (a reload of `exclude`);
    /// the number forgotten. Connections already open stay as they are.
    pub fn retain_names(&mut self, still_excluded: impl Fn(&str) -> bool) -> usize {
        let before = self.map.len();
        self.map.retain(|_, e| still_excluded(&e.name));
        before - self.map.len()
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
    fn a_held_entry_outlives_its_ttl_until_released() {
        let t0 = Instant::now();
        let mut l = LearnedAddrs::new(16);
        assert!(!l.hold(ip("10.0.0.1"), t0), "nothing to hold");
        l.learn(ip("10.0.0.1"), 60, "a.example", t0);
        assert!(l.hold(ip("10.0.0.1"), t0) && l.hold(ip("10.0.0.1"), t0));
        let late = t0 + Duration::from_secs(3600);
        assert!(l.contains(ip("10.0.0.1"), late), "two connections open");
        l.release(ip("10.0.0.1"), late);
        assert!(l.contains(ip("10.0.0.1"), late), "one still open");
        l.release(ip("10.0.0.1"), late);
        assert!(
            l.is_empty(),
            "the last release of an expired entry forgets it"
        );
        l.release(ip("10.0.0.1"), late); // a release after a reload dropped it: harmless
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
