//! Who may hold an API connection (sans-IO): connections counted per client address, the
//! per-address cap, and which connection makes room at the global cap — always one of the
//! address holding the most connections, so one address cannot lock the others out.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// The unit a per-address limit applies to: an IPv4 address, or an IPv6 /64 (one subscriber's
/// usual allocation, so a single host cannot multiply its share by using many addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    V4([u8; 4]),
    V6([u8; 8]),
}

/// A client as the limits see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub key: PeerKey,
    /// Loopback clients (local panels, a reverse proxy on the same host) have no per-address cap.
    pub loopback: bool,
}

impl Peer {
    pub fn of(ip: IpAddr) -> Peer {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let key = match ip {
            IpAddr::V4(v4) => PeerKey::V4(v4.octets()),
            IpAddr::V6(v6) => {
                let o = v6.octets();
                PeerKey::V6([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
            }
        };
        Peer {
            key,
            loopback: ip.is_loopback(),
        }
    }
}

/// How far a connection is into its current request; earlier stages are closed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Keep-alive between requests, or draining after a closing answer.
    Idle,
    /// Connected (or started a request) but nothing received yet.
    Nothing,
    /// Part of a request head received.
    PartialHead,
    /// Head complete (and accepted), body still arriving.
    Body,
}

/// A connection that may be closed to make room (one being answered never is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub slot: usize,
    pub peer: PeerKey,
    pub stage: Stage,
    /// When the stage (idle wait or current request) began.
    pub since: Instant,
}

/// What to do with a newly accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// Close this connection first, then admit.
    Evict(usize),
    /// Answer 503 with this reason and close.
    Refuse(&'static str),
}

/// Open connections per [`PeerKey`].
#[derive(Debug, Default)]
pub struct ConnCounts {
    per_peer: HashMap<PeerKey, u32>,
    total: usize,
}

impl ConnCounts {
    pub fn new() -> ConnCounts {
        ConnCounts::default()
    }

    pub fn opened(&mut self, key: PeerKey) {
        *self.per_peer.entry(key).or_insert(0) += 1;
        self.total += 1;
    }

    pub fn closed(&mut self, key: PeerKey) {
        if let Some(n) = self.per_peer.get_mut(&key) {
            *n -= 1;
            self.total -= 1;
            if *n == 0 {
                self.per_peer.remove(&key);
            }
        }
    }

    /// Connections open from `key`.
    pub fn of(&self, key: PeerKey) -> u32 {
        self.per_peer.get(&key).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Decides about a new connection from `peer`. `candidates` are the open connections that
    /// may be closed. At `max_per_peer` (non-loopback only) the newcomer can only displace one of
    /// its own address's connections; at `max_total` it displaces one of the address holding the
    /// most connections (counting the newcomer), cheapest [`Stage`] first, then the oldest.
    pub fn admit(
        &self,
        peer: Peer,
        max_total: usize,
        max_per_peer: usize,
        candidates: impl IntoIterator<Item = Candidate>,
    ) -> Admission {
        let own = self.of(peer.key) as usize;
        if !peer.loopback && own >= max_per_peer.max(1) {
            return candidates
                .into_iter()
                .filter(|c| c.peer == peer.key)
                .max_by_key(|c| (Reverse(c.stage), Reverse(c.since)))
                .map_or(
                    Admission::Refuse("too many connections from your address; try again later"),
                    |c| Admission::Evict(c.slot),
                );
        }
        if self.total < max_total.max(1) {
            return Admission::Admit;
        }
        let weight = |key: PeerKey| self.of(key) + u32::from(key == peer.key);
        candidates
            .into_iter()
            .max_by_key(|c| (weight(c.peer), Reverse(c.stage), Reverse(c.since)))
            .map_or(
                Admission::Refuse("too many connections; try again later"),
                |c| Admission::Evict(c.slot),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    fn peer(s: &str) -> Peer {
        Peer::of(s.parse().unwrap())
    }

    #[test]
    fn keys_group_ipv6_by_64_and_unmap_ipv4() {
        assert_eq!(
            peer("2001:db8:1:2::1").key,
            peer("2001:db8:1:2:ffff::9").key
        );
        assert_ne!(peer("2001:db8:1:2::1").key, peer("2001:db8:1:3::1").key);
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        assert_eq!(Peer::of(mapped), peer("192.0.2.7"));
        assert!(peer("127.0.0.2").loopback);
        assert!(Peer::of(IpAddr::V6(Ipv6Addr::LOCALHOST)).loopback);
        assert!(Peer::of(IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped())).loopback);
        assert!(!peer("192.0.2.7").loopback);
    }

    /// `n` head-less connections from `p`, slots from `first`, started one ms apart.
    fn fill(counts: &mut ConnCounts, cands: &mut Vec<Candidate>, p: Peer, first: usize, n: usize) {
        let t0 = Instant::now();
        for i in 0..n {
            counts.opened(p.key);
            cands.push(Candidate {
                slot: first + i,
                peer: p.key,
                stage: Stage::Nothing,
                since: t0 + Duration::from_millis(i as u64),
            });
        }
    }

    #[test]
    fn per_address_cap_displaces_only_its_own_connections() {
        let (a, b) = (peer("198.51.100.1"), peer("198.51.100.2"));
        let mut counts = ConnCounts::new();
        let mut cands = Vec::new();
        fill(&mut counts, &mut cands, a, 0, 4);
        fill(&mut counts, &mut cands, b, 10, 1);
        assert_eq!(counts.admit(b, 256, 4, cands.clone()), Admission::Admit);
        // `a` is at its cap: its own oldest goes, never `b`'s.
        assert_eq!(counts.admit(a, 256, 4, cands.clone()), Admission::Evict(0));
        // Nothing of `a`'s may be closed (all being answered): refused.
        let others: Vec<_> = cands.iter().copied().filter(|c| c.peer == b.key).collect();
        assert!(matches!(
            counts.admit(a, 256, 4, others),
            Admission::Refuse(_)
        ));
        // Loopback has no per-address cap.
        let lo = peer("127.0.0.1");
        let mut counts = ConnCounts::new();
        let mut cands = Vec::new();
        fill(&mut counts, &mut cands, lo, 0, 40);
        assert_eq!(counts.admit(lo, 256, 4, cands), Admission::Admit);
    }

    #[test]
    fn global_cap_takes_from_the_heaviest_address() {
        let (attacker, honest) = (peer("127.0.0.1"), peer("127.0.0.2"));
        let mut counts = ConnCounts::new();
        let mut cands = Vec::new();
        fill(&mut counts, &mut cands, honest, 0, 1);
        cands[0].stage = Stage::Idle; // the honest client's keep-alive connection, oldest of all
        cands[0].since -= Duration::from_secs(10);
        fill(&mut counts, &mut cands, attacker, 1, 255);
        assert_eq!(counts.total(), 256);
        // Whoever arrives, the attacker's oldest connection goes, not the honest idle one.
        assert_eq!(
            counts.admit(honest, 256, 32, cands.clone()),
            Admission::Evict(1)
        );
        assert_eq!(
            counts.admit(attacker, 256, 32, cands.clone()),
            Admission::Evict(1)
        );
        // Within one address, idle goes before head-less, head-less before partial, before body.
        cands[5].stage = Stage::Body;
        cands[3].stage = Stage::PartialHead;
        cands[200].stage = Stage::Idle;
        assert_eq!(
            counts.admit(honest, 256, 32, cands.clone()),
            Admission::Evict(200)
        );
        // Nothing closable at all: refused.
        assert!(matches!(
            counts.admit(honest, 256, 32, Vec::new()),
            Admission::Refuse(_)
        ));
        // Counts follow opens and closes.
        for _ in 0..255 {
            counts.closed(attacker.key);
        }
        counts.closed(attacker.key); // more closes than opens: ignored
        assert_eq!((counts.of(attacker.key), counts.total()), (0, 1));
    }

    #[test]
    fn a_tie_counts_the_newcomer_against_its_own_address() {
        let (a, b) = (peer("203.0.113.1"), peer("203.0.113.2"));
        let mut counts = ConnCounts::new();
        let mut cands = Vec::new();
        fill(&mut counts, &mut cands, a, 0, 2);
        fill(&mut counts, &mut cands, b, 2, 2);
        assert_eq!(counts.admit(b, 4, 32, cands.clone()), Admission::Evict(2));
        assert_eq!(counts.admit(a, 4, 32, cands), Admission::Evict(0));
    }
}
