//! The server's destination guard: decides whether a client may open a connection (or send a
//! datagram) to a resolved socket address.
//!
//! The check runs AFTER DNS resolution — callers pass the resolved `SocketAddr`s — so a domain
//! name cannot smuggle a private address past it.
//!
//! Default policy (`allow_private_destinations: false`) refuses:
//! - port 0;
//! - IPv4: unspecified and "this network" 0/8, loopback 127/8, private 10/8, 172.16/12,
//!   192.168/16, CGNAT 100.64/10, link-local 169.254/16, IETF protocol assignments 192.0.0/24,
//!   documentation 192.0.2/24, 198.51.100/24, 203.0.113/24, 6to4 relay anycast 192.88.99/24,
//!   benchmarking 198.18/15, multicast 224/4, reserved 240/4 and broadcast 255.255.255.255;
//! - IPv6: `::`, `::1`, ULA fc00::/7, link-local fe80::/10, site-local fec0::/10, multicast ff00::/8,
//!   documentation 2001:db8::/32 and 3fff::/20, discard 100::/64, IETF 2001::/23 (incl. Teredo),
//!   local-use NAT64 64:ff9b:1::/48, SRv6 5f00::/16, and everything outside global unicast 2000::/3;
//! - IPv6 forms embedding an IPv4 address are judged by that address: IPv4-mapped ::ffff:0:0/96,
//!   IPv4-compatible ::/96, NAT64 64:ff9b::/96 and 6to4 2002::/16;
//! - the server's own addresses (e.g. its public IP, which would reach services bound to it).
//!   "Is this mine" is answered without unsafe by asking the kernel for a route: a UDP socket
//!   `connect`ed to a locally assigned address gets that same address as its source. Answers are
//!   cached (64 entries, 60 s).
//!
//! The management API's own addresses ([`DestGuard::protect_api`]) are refused whatever
//! `allow_private_destinations` says: on the API's port, its bound address in every form
//! (IPv4-mapped and the other embedded forms), every loopback address if it is bound to a loopback
//! address, and every local address (loopback, the host's own addresses) if it is bound to
//! `0.0.0.0` or `[::]`. So a tunnel user cannot reach the API through the tunnel.
//!
//! With `allow_private_destinations: true` everything is allowed (loopback, private ranges and the
//! server's own addresses included) EXCEPT what is never a valid destination: port 0, unspecified
//! and "this network" (0/8, `::` — on Linux connecting to 0.0.0.0 silently reaches the local host),
//! multicast, and the IPv4 broadcast address, in all embedded forms.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// How long a "this is / is not my address" answer is trusted.
pub const LOCAL_CACHE_TTL: Duration = Duration::from_secs(60);
/// How many "is local" answers are cached.
pub const LOCAL_CACHE_SIZE: usize = 64;

/// Why a destination was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// Destination port 0.
    PortZero,
    /// 0.0.0.0/8 or `::`.
    Unspecified,
    /// 127/8 or `::1`.
    Loopback,
    /// RFC 1918, IPv6 ULA / site-local, local-use NAT64.
    Private,
    /// 100.64/10 carrier-grade NAT shared space.
    SharedAddressSpace,
    /// 169.254/16 or fe80::/10.
    LinkLocal,
    /// 224/4 or ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// Documentation / example ranges.
    Documentation,
    /// Reserved, benchmarking, protocol-assignment or otherwise non-global ranges.
    Reserved,
    /// One of the server's own addresses.
    OwnAddress,
    /// An address of the server's management API (always refused).
    ApiAddress,
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Self::PortZero => "port 0",
            Self::Unspecified => "unspecified address",
            Self::Loopback => "loopback address",
            Self::Private => "private address",
            Self::SharedAddressSpace => "shared (CGNAT) address",
            Self::LinkLocal => "link-local address",
            Self::Multicast => "multicast address",
            Self::Broadcast => "broadcast address",
            Self::Documentation => "documentation address",
            Self::Reserved => "reserved address",
            Self::OwnAddress => "server's own address",
            Self::ApiAddress => "the server's management API",
        };
        f.write_str(text)
    }
}

impl DenyReason {
    /// Refused even with `allow_private_destinations: true`.
    pub fn always_refused(self) -> bool {
        matches!(
            self,
            Self::PortZero
                | Self::Unspecified
                | Self::Multicast
                | Self::Broadcast
                | Self::ApiAddress
        )
    }
}

/// The guard's answer for one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Allow,
    /// Refuse, with the reason (log it, count it, map it to "not allowed" for the client).
    Deny(DenyReason),
}

/// Answers "is this IP assigned to this host?".
pub type LocalProbe = fn(IpAddr) -> bool;

/// The destination guard. Owned by the event loop (not shared), hence `&mut self` for the cache.
#[derive(Debug)]
pub struct DestGuard {
    allow_private: bool,
    probe: LocalProbe,
    cache: Vec<(IpAddr, bool, Instant)>,
    /// The management API's bound addresses (never reachable through the tunnel).
    api: Vec<SocketAddr>,
}

impl DestGuard {
    /// A guard using the kernel route probe ([`is_local_address`]) for own-address checks.
    pub fn new(allow_private_destinations: bool) -> Self {
        Self::with_local_probe(allow_private_destinations, is_local_address)
    }

    /// A guard with a custom own-address probe (tests, or hosts with unusual routing).
    pub fn with_local_probe(allow_private_destinations: bool, probe: LocalProbe) -> Self {
        Self {
            allow_private: allow_private_destinations,
            probe,
            cache: Vec::with_capacity(LOCAL_CACHE_SIZE),
            api: Vec::new(),
        }
    }

    /// Refuses the management API bound at `addr` from now on, whatever
    /// `allow_private_destinations` says (see the module doc for the forms refused).
    pub fn protect_api(&mut self, addr: SocketAddr) {
        if !self.api.contains(&addr) {
            self.api.push(addr);
        }
    }

    /// Changes `allow_private_destinations` (SIGHUP); the API stays refused.
    pub fn set_allow_private(&mut self, allow_private_destinations: bool) {
        self.allow_private = allow_private_destinations;
    }

    /// Whether private destinations are allowed.
    pub fn allows_private(&self) -> bool {
        self.allow_private
    }

    /// Judges one resolved destination.
    pub fn check(&mut self, dest: SocketAddr, now: Instant) -> Verdict {
        if dest.port() == 0 {
            return Verdict::Deny(DenyReason::PortZero);
        }
        if self.reaches_api(dest, now) {
            return Verdict::Deny(DenyReason::ApiAddress);
        }
        if let Some(reason) = classify_ip(dest.ip()) {
            if self.allow_private && !reason.always_refused() {
                return Verdict::Allow;
            }
            return Verdict::Deny(reason);
        }
        if !self.allow_private && self.is_own_address(canonical_ip(dest.ip()), now) {
            return Verdict::Deny(DenyReason::OwnAddress);
        }
        Verdict::Allow
    }

    /// Keeps the allowed addresses of a resolution result (order preserved). When none is
    /// allowed, returns the reason for the first one (or `Unspecified` for an empty list).
    pub fn filter(
        &mut self,
        addrs: &[SocketAddr],
        now: Instant,
    ) -> Result<Vec<SocketAddr>, DenyReason> {
        let mut allowed = Vec::with_capacity(addrs.len());
        let mut first_reason = None;
        for &addr in addrs {
            match self.check(addr, now) {
                Verdict::Allow => allowed.push(addr),
                Verdict::Deny(reason) => {
                    first_reason.get_or_insert(reason);
                }
            }
        }
        if allowed.is_empty() {
            Err(first_reason.unwrap_or(DenyReason::Unspecified))
        } else {
            Ok(allowed)
        }
    }

    /// Whether a connection to `dest` could reach the management API.
    fn reaches_api(&mut self, dest: SocketAddr, now: Instant) -> bool {
        let ip = match dest.ip() {
            IpAddr::V6(v6) => embedded_ipv4(v6).map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let mut any_local = false;
        for api in self.api.iter().filter(|a| a.port() == dest.port()) {
            let bound = canonical_ip(api.ip());
            if bound == ip || (ip.is_loopback() && bound.is_loopback()) {
                return true;
            }
            any_local |= bound.is_unspecified();
        }
        // Bound to 0.0.0.0 / [::]: every address of this host reaches it.
        any_local && (ip.is_loopback() || ip.is_unspecified() || self.is_own_address(ip, now))
    }

    fn is_own_address(&mut self, ip: IpAddr, now: Instant) -> bool {
        self.cache
            .retain(|(_, _, at)| now.saturating_duration_since(*at) < LOCAL_CACHE_TTL);
        if let Some((_, local, _)) = self.cache.iter().find(|(cached, _, _)| *cached == ip) {
            return *local;
        }
        let local = (self.probe)(ip);
        if self.cache.len() == LOCAL_CACHE_SIZE {
            self.cache.remove(0);
        }
        self.cache.push((ip, local, now));
        local
    }
}

/// Whether `ip` is assigned to this host: a UDP socket connected to it (no packet is sent) is
/// given `ip` itself as its source address only when the kernel routes it locally.
pub fn is_local_address(ip: IpAddr) -> bool {
    let bind: SocketAddr = match ip {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let Ok(socket) = UdpSocket::bind(bind) else {
        return false;
    };
    // Port 9 (discard); nothing is sent.
    if socket.connect(SocketAddr::new(ip, 9)).is_err() {
        return false;
    }
    socket.local_addr().is_ok_and(|local| local.ip() == ip)
}

/// IPv4 for IPv4-mapped addresses, otherwise unchanged (the form the kernel reports locally).
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// Classifies an address against the non-global ranges; `None` means globally routable.
pub fn classify_ip(ip: IpAddr) -> Option<DenyReason> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<DenyReason> {
    let o = ip.octets();
    let reason = match o {
        [0, ..] => DenyReason::Unspecified,
        [127, ..] => DenyReason::Loopback,
        [10, ..] => DenyReason::Private,
        [172, b, ..] if (16..=31).contains(&b) => DenyReason::Private,
        [192, 168, ..] => DenyReason::Private,
        [100, b, ..] if (64..=127).contains(&b) => DenyReason::SharedAddressSpace,
        [169, 254, ..] => DenyReason::LinkLocal,
        [192, 0, 0, _] => DenyReason::Reserved,
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => DenyReason::Documentation,
        [192, 88, 99, _] => DenyReason::Reserved,
        [198, 18 | 19, ..] => DenyReason::Reserved,
        [255, 255, 255, 255] => DenyReason::Broadcast,
        [a, ..] if (224..=239).contains(&a) => DenyReason::Multicast,
        [a, ..] if a >= 240 => DenyReason::Reserved,
        _ => return None,
    };
    Some(reason)
}

fn classify_v6(ip: Ipv6Addr) -> Option<DenyReason> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some(DenyReason::Unspecified);
    }
    if ip.is_loopback() {
        return Some(DenyReason::Loopback);
    }
    // Forms that embed an IPv4 address are judged by it.
    if let Some(v4) = embedded_ipv4(ip) {
        return classify_v4(v4);
    }
    let reason = match s {
        [0x64, 0xff9b, 1, ..] => DenyReason::Private,
        [0x100, 0, 0, 0, ..] => DenyReason::Reserved,
        [0x2001, 0xdb8, ..] => DenyReason::Documentation,
        [a, ..] if a & 0xfff0 == 0x3ff0 => DenyReason::Documentation,
        [0x2001, b, ..] if b < 0x200 => DenyReason::Reserved,
        [0x5f00, ..] => DenyReason::Reserved,
        [a, ..] if a & 0xfe00 == 0xfc00 => DenyReason::Private,
        [a, ..] if a & 0xffc0 == 0xfe80 => DenyReason::LinkLocal,
        [a, ..] if a & 0xffc0 == 0xfec0 => DenyReason::Private,
        [a, ..] if a & 0xff00 == 0xff00 => DenyReason::Multicast,
        [a, ..] if a & 0xe000 != 0x2000 => DenyReason::Reserved,
        _ => return None,
    };
    Some(reason)
}

/// The IPv4 address embedded in an IPv4-mapped (::ffff:0:0/96), IPv4-compatible (::/96, except
/// `::` and `::1`), NAT64 (64:ff9b::/96) or 6to4 (2002::/16) address.
fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0; 6] && !ip.is_unspecified() && !ip.is_loopback() {
        // IPv4-compatible ::a.b.c.d (deprecated).
        return Some(embedded_v4(s[6], s[7]));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(embedded_v4(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return Some(embedded_v4(s[1], s[2]));
    }
    None
}

fn embedded_v4(high: u16, low: u16) -> Ipv4Addr {
    let [a, b] = high.to_be_bytes();
    let [c, d] = low.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never_local(_: IpAddr) -> bool {
        false
    }

    fn reason(text: &str) -> Option<DenyReason> {
        classify_ip(text.parse().unwrap())
    }

    #[test]
    fn ipv4_ranges() {
        use DenyReason::*;
        let cases = [
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("127.0.0.1", Some(Loopback)),
            ("127.255.255.254", Some(Loopback)),
            ("10.0.0.1", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("172.15.255.255", None),
            ("172.32.0.0", None),
            ("192.168.1.1", Some(Private)),
            ("100.64.0.1", Some(SharedAddressSpace)),
            ("100.127.255.255", Some(SharedAddressSpace)),
            ("100.63.255.255", None),
            ("100.128.0.0", None),
            ("169.254.169.254", Some(LinkLocal)),
            ("192.0.0.170", Some(Reserved)),
            ("192.0.2.1", Some(Documentation)),
            ("198.51.100.7", Some(Documentation)),
            ("203.0.113.9", Some(Documentation)),
            ("192.88.99.1", Some(Reserved)),
            ("198.18.0.1", Some(Reserved)),
            ("198.19.255.255", Some(Reserved)),
            ("198.20.0.0", None),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("240.0.0.1", Some(Reserved)),
            ("255.255.255.254", Some(Reserved)),
            ("255.255.255.255", Some(Broadcast)),
            ("1.1.1.1", None),
            ("8.8.8.8", None),
            ("93.184.216.34", None),
            ("223.255.255.255", None),
        ];
        for (ip, want) in cases {
            assert_eq!(reason(ip), want, "{ip}");
        }
    }

    #[test]
    fn ipv6_ranges() {
        use DenyReason::*;
        let cases = [
            ("::", Some(Unspecified)),
            ("::1", Some(Loopback)),
            ("fc00::1", Some(Private)),
            ("fdff:ffff::1", Some(Private)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("fec0::1", Some(Private)),
            ("ff02::1", Some(Multicast)),
            ("ff0e::1", Some(Multicast)),
            ("2001:db8::1", Some(Documentation)),
            ("3fff::1", Some(Documentation)),
            ("100::1", Some(Reserved)),
            ("2001::1", Some(Reserved)),
            ("2001:1ff::1", Some(Reserved)),
            ("64:ff9b:1::1", Some(Private)),
            ("5f00::1", Some(Reserved)),
            ("4000::1", Some(Reserved)),
            ("1234::1", Some(Reserved)),
            ("2001:200::1", None),
            ("2001:4860:4860::8888", None),
            ("2606:4700:4700::1111", None),
            ("2a00:1450::1", None),
        ];
        for (ip, want) in cases {
            assert_eq!(reason(ip), want, "{ip}");
        }
    }

    #[test]
    fn embedded_ipv4_forms_are_judged_by_the_ipv4_address() {
        use DenyReason::*;
        let cases = [
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:10.1.2.3", Some(Private)),
            ("::ffff:169.254.169.254", Some(LinkLocal)),
            ("::ffff:0.0.0.0", Some(Unspecified)),
            ("::ffff:224.0.0.1", Some(Multicast)),
            ("::ffff:255.255.255.255", Some(Broadcast)),
            ("::ffff:8.8.8.8", None),
            ("::127.0.0.1", Some(Loopback)),
            ("::192.168.0.1", Some(Private)),
            ("::8.8.8.8", None),
            ("64:ff9b::127.0.0.1", Some(Loopback)),
            ("64:ff9b::10.0.0.1", Some(Private)),
            ("64:ff9b::100.64.0.1", Some(SharedAddressSpace)),
            ("64:ff9b::8.8.8.8", None),
            ("2002:7f00:1::", Some(Loopback)),
            ("2002:c0a8:101::1", Some(Private)),
            ("2002:0808:0808::1", None),
        ];
        for (ip, want) in cases {
            assert_eq!(reason(ip), want, "{ip}");
        }
    }

    #[test]
    fn default_policy_denies_and_allow_private_opts_in() {
        let now = Instant::now();
        let mut strict = DestGuard::with_local_probe(false, never_local);
        let mut open = DestGuard::with_local_probe(true, never_local);
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(strict.check(sa("8.8.8.8:53"), now), Verdict::Allow);
        assert_eq!(
            strict.check(sa("8.8.8.8:0"), now),
            Verdict::Deny(DenyReason::PortZero)
        );
        assert_eq!(
            strict.check(sa("[::ffff:192.168.1.1]:80"), now),
            Verdict::Deny(DenyReason::Private)
        );
        for allowed in [
            "127.0.0.1:80",
            "10.0.0.1:80",
            "[fd00::1]:80",
            "[fe80::1]:80",
            "192.0.2.1:1",
        ] {
            assert_eq!(open.check(sa(allowed), now), Verdict::Allow, "{allowed}");
            assert!(matches!(strict.check(sa(allowed), now), Verdict::Deny(_)));
        }
        for (refused, why) in [
            ("0.0.0.0:80", DenyReason::Unspecified),
            ("[::]:80", DenyReason::Unspecified),
            ("[::ffff:0.0.0.0]:80", DenyReason::Unspecified),
            ("224.0.0.1:80", DenyReason::Multicast),
            ("[ff02::1]:80", DenyReason::Multicast),
            ("255.255.255.255:80", DenyReason::Broadcast),
            ("1.1.1.1:0", DenyReason::PortZero),
        ] {
            assert_eq!(
                open.check(sa(refused), now),
                Verdict::Deny(why),
                "{refused}"
            );
        }
    }

    #[test]
    fn own_addresses_are_refused_and_cached() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static PROBES: AtomicUsize = AtomicUsize::new(0);
        fn probe(ip: IpAddr) -> bool {
            PROBES.fetch_add(1, Ordering::Relaxed);
            ip == IpAddr::V4(Ipv4Addr::new(203, 0, 114, 5))
        }
        let now = Instant::now();
        let mut guard = DestGuard::with_local_probe(false, probe);
        let own: SocketAddr = "203.0.114.5:443".parse().unwrap();
        let own_mapped: SocketAddr = "[::ffff:203.0.114.5]:443".parse().unwrap();
        assert_eq!(guard.check(own, now), Verdict::Deny(DenyReason::OwnAddress));
        assert_eq!(
            guard.check(own_mapped, now),
            Verdict::Deny(DenyReason::OwnAddress)
        );
        assert_eq!(
            PROBES.load(Ordering::Relaxed),
            1,
            "second check served from cache"
        );
        assert_eq!(
            guard.check("1.1.1.1:80".parse().unwrap(), now),
            Verdict::Allow
        );
        assert_eq!(PROBES.load(Ordering::Relaxed), 2);
        // Expired entries are probed again.
        let later = now + LOCAL_CACHE_TTL + Duration::from_secs(1);
        assert_eq!(
            guard.check(own, later),
            Verdict::Deny(DenyReason::OwnAddress)
        );
        assert_eq!(PROBES.load(Ordering::Relaxed), 3);
        // Bounded cache.
        for i in 0..(LOCAL_CACHE_SIZE as u8 + 10) {
            guard.check(SocketAddr::from(([1, 0, 0, i], 80)), later);
        }
        assert!(guard.cache.len() <= LOCAL_CACHE_SIZE);
        // Opt-in allows own addresses.
        let mut open = DestGuard::with_local_probe(true, probe);
        assert_eq!(open.check(own, now), Verdict::Allow);
    }

    /// The host's addresses in these tests: loopback and 198.51.200.7 / 2a01:4f8::7.
    fn host_probe(ip: IpAddr) -> bool {
        ip.is_loopback()
            || ip == IpAddr::V4(Ipv4Addr::new(198, 51, 200, 7))
            || ip == "2a01:4f8::7".parse::<IpAddr>().unwrap()
    }

    fn sa(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_api_on_loopback_is_refused_in_every_form_whatever_allow_private_says() {
        let now = Instant::now();
        for allow_private in [true, false] {
            let mut guard = DestGuard::with_local_probe(allow_private, host_probe);
            guard.protect_api(sa("127.0.0.1:9090"));
            for dest in [
                "127.0.0.1:9090",
                "127.0.0.2:9090",
                "[::1]:9090",
                "[::ffff:127.0.0.1]:9090",
                "[::127.0.0.1]:9090",
                "[64:ff9b::127.0.0.1]:9090",
                "[2002:7f00:1::]:9090",
            ] {
                assert_eq!(
                    guard.check(sa(dest), now),
                    Verdict::Deny(DenyReason::ApiAddress),
                    "{dest} allow_private={allow_private}"
                );
            }
            // Another port, and the API port on a non-local address, are judged as usual.
            let other = guard.check(sa("127.0.0.1:9091"), now);
            assert_eq!(other == Verdict::Allow, allow_private);
            assert_eq!(guard.check(sa("8.8.8.8:9090"), now), Verdict::Allow);
        }
        // A SIGHUP that changes allow_private keeps the API refused.
        let mut guard = DestGuard::with_local_probe(false, host_probe);
        guard.protect_api(sa("127.0.0.1:9090"));
        guard.set_allow_private(true);
        assert!(guard.allows_private());
        assert_eq!(
            guard.check(sa("127.0.0.1:9090"), now),
            Verdict::Deny(DenyReason::ApiAddress)
        );
        assert_eq!(guard.check(sa("127.0.0.1:80"), now), Verdict::Allow);
    }

    #[test]
    fn an_api_on_every_address_is_refused_on_every_local_address() {
        let now = Instant::now();
        for bind in ["0.0.0.0:9090", "[::]:9090"] {
            let mut guard = DestGuard::with_local_probe(true, host_probe);
            guard.protect_api(sa(bind));
            for dest in [
                "127.0.0.1:9090",
                "127.1.2.3:9090",
                "[::1]:9090",
                "198.51.200.7:9090",
                "[::ffff:198.51.200.7]:9090",
                "[2a01:4f8::7]:9090",
            ] {
                assert_eq!(
                    guard.check(sa(dest), now),
                    Verdict::Deny(DenyReason::ApiAddress),
                    "{dest} with the API on {bind}"
                );
            }
            for allowed in ["198.51.200.8:9090", "10.0.0.1:9090", "198.51.200.7:9091"] {
                assert_eq!(guard.check(sa(allowed), now), Verdict::Allow, "{allowed}");
            }
        }
        // An API on one LAN address: that address (any form) on its port.
        let mut guard = DestGuard::with_local_probe(true, host_probe);
        guard.protect_api(sa("192.168.1.1:8080"));
        guard.protect_api(sa("192.168.1.1:8080"));
        assert_eq!(guard.api.len(), 1);
        for dest in ["192.168.1.1:8080", "[::ffff:192.168.1.1]:8080"] {
            assert_eq!(
                guard.check(sa(dest), now),
                Verdict::Deny(DenyReason::ApiAddress)
            );
        }
        assert_eq!(guard.check(sa("127.0.0.1:8080"), now), Verdict::Allow);
        assert_eq!(guard.check(sa("192.168.1.1:80"), now), Verdict::Allow);
    }

    #[test]
    fn filter_keeps_allowed_addresses() {
        let now = Instant::now();
        let mut guard = DestGuard::with_local_probe(false, never_local);
        let addrs: Vec<SocketAddr> = ["10.0.0.1:80", "1.1.1.1:80", "[::1]:80", "[2606:4700::1]:80"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(guard.filter(&addrs, now), Ok(vec![addrs[1], addrs[3]]));
        assert_eq!(guard.filter(&addrs[..1], now), Err(DenyReason::Private));
        assert_eq!(guard.filter(&[], now), Err(DenyReason::Unspecified));
    }

    #[test]
    fn kernel_probe_recognises_local_addresses() {
        assert!(is_local_address(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert!(!is_local_address("192.0.2.77".parse().unwrap()));
        assert!(!is_local_address("1.1.1.1".parse().unwrap()));
        // The host's primary outbound address (if it has a route at all) is local.
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        if socket.connect("8.8.8.8:53").is_ok() {
            let local = socket.local_addr().unwrap();
            assert!(is_local_address(local.ip()), "{local}");
        }
    }
}
