//! The client's early-reply policy (sans-IO): which CONNECT requests get their proxy success
//! reply at once, before the server's answer to the stream open.
//!
//! Waiting for the server's answer costs one tunnel round trip (plus the server's connect)
//! before the application may send its first byte. A destination that opened within
//! [`PROVEN_FOR`] is answered at once instead, and the application's first bytes travel right
//! behind the stream open (the way TCP Fast Open only sends data in the SYN to a server it has
//! reached before). First contacts still wait, so a refused, unreachable or not-allowed
//! destination gets its exact SOCKS5 / HTTP error. If an early-answered open fails after all,
//! the loop resets the application's connection (it sees "connection reset", never a clean
//! end) and [`EarlyReply::failed`] forgets the destination: the next request waits for the
//! server and gets the exact error code.
//!
//! The memory is kept per local client address: a destination counts as proven only for the
//! address whose connections reached it. On a shared proxy (a router's, used by a LAN) one host
//! therefore cannot learn from the speed of its replies which destinations another host
//! reached in the last minutes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::proto::transport::Destination;

/// How long after its last successful open a destination is answered early.
pub const PROVEN_FOR: Duration = Duration::from_secs(600);
/// (Client address, destination) pairs remembered at most, over all clients (a full memory
/// forgets the one proven longest ago).
pub const MAX_PROVEN: usize = 256;

/// Destinations whose last open from a client address succeeded, and when.
#[derive(Debug, Default)]
pub struct EarlyReply {
    proven: HashMap<(IpAddr, Destination), Instant>,
}

/// The memory's key: `client` in its canonical form (an IPv4-mapped IPv6 address is the IPv4
/// address it maps).
fn key(client: IpAddr, dest: &Destination) -> (IpAddr, Destination) {
    (client.to_canonical(), dest.clone())
}

impl EarlyReply {
    /// Whether a CONNECT from `client` to `dest` may be answered before the server's open
    /// result: `client`'s own connections reached `dest` within [`PROVEN_FOR`].
    pub fn allows(&self, client: IpAddr, dest: &Destination, now: Instant) -> bool {
        self.proven
            .get(&key(client, dest))
            .is_some_and(|&at| now.saturating_duration_since(at) < PROVEN_FOR)
    }

    /// The server opened a stream from `client` to `dest`.
    pub fn opened(&mut self, client: IpAddr, dest: &Destination, now: Instant) {
        let key = key(client, dest);
        if let Some(at) = self.proven.get_mut(&key) {
            *at = now;
            return;
        }
        if self.proven.len() >= MAX_PROVEN {
            self.proven
                .retain(|_, at| now.saturating_duration_since(*at) < PROVEN_FOR);
        }
        if self.proven.len() >= MAX_PROVEN {
            let oldest = self.proven.iter().min_by_key(|(_, at)| **at);
            if let Some(k) = oldest.map(|(k, _)| k.clone()) {
                self.proven.remove(&k);
            }
        }
        self.proven.insert(key, now);
    }

    /// An open from `client` to `dest` failed: its next request waits for the server's answer.
    pub fn failed(&mut self, client: IpAddr, dest: &Destination) {
        self.proven.remove(&key(client, dest));
    }

    /// (Client address, destination) pairs remembered.
    pub fn len(&self) -> usize {
        self.proven.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.proven.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The local client in most tests.
    const HOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 1, 10));

    fn addr(port: u16) -> Destination {
        Destination::Addr(([192, 0, 2, 1], port).into())
    }

    fn name(n: &str, port: u16) -> Destination {
        Destination::Domain {
            name: n.to_string(),
            port,
        }
    }

    #[test]
    fn only_destinations_that_opened_recently_are_answered_early() {
        let t0 = Instant::now();
        let mut e = EarlyReply::default();
        assert!(!e.allows(HOST, &addr(80), t0), "a first contact waits");
        e.opened(HOST, &addr(80), t0);
        assert!(e.allows(HOST, &addr(80), t0));
        assert!(
            !e.allows(HOST, &addr(81), t0),
            "another port is another destination"
        );
        assert!(!e.allows(HOST, &name("example.com", 80), t0));
        assert!(e.allows(HOST, &addr(80), t0 + PROVEN_FOR - Duration::from_secs(1)));
        assert!(
            !e.allows(HOST, &addr(80), t0 + PROVEN_FOR),
            "proven too long ago"
        );
        // Each success proves it again.
        e.opened(HOST, &addr(80), t0 + PROVEN_FOR);
        assert!(e.allows(HOST, &addr(80), t0 + PROVEN_FOR + Duration::from_secs(1)));
    }

    #[test]
    fn a_failure_forgets_the_destination() {
        let t0 = Instant::now();
        let mut e = EarlyReply::default();
        e.opened(HOST, &name("example.com", 443), t0);
        e.opened(HOST, &addr(80), t0);
        e.failed(HOST, &name("example.com", 443));
        assert!(!e.allows(HOST, &name("example.com", 443), t0));
        assert!(e.allows(HOST, &addr(80), t0), "other destinations stay");
        e.failed(HOST, &name("never.example", 1)); // unknown: nothing happens
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn memory_is_bounded_and_forgets_the_oldest_first() {
        let t0 = Instant::now();
        let mut e = EarlyReply::default();
        for i in 0..MAX_PROVEN as u16 {
            e.opened(HOST, &addr(i), t0 + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(e.len(), MAX_PROVEN);
        let later = t0 + Duration::from_secs(1);
        e.opened(HOST, &addr(60_000), later);
        assert_eq!(e.len(), MAX_PROVEN);
        assert!(!e.allows(HOST, &addr(0), later), "the oldest went");
        assert!(e.allows(HOST, &addr(1), later));
        assert!(e.allows(HOST, &addr(60_000), later));
        // Expired entries go before any live one.
        let much_later = t0 + PROVEN_FOR + Duration::from_millis(100);
        e.opened(HOST, &addr(60_001), much_later);
        assert!(e.len() < MAX_PROVEN, "expired entries were dropped");
        assert!(e.allows(HOST, &addr(60_000), much_later));
        assert!(e.allows(HOST, &addr(60_001), much_later));
    }

    #[test]
    fn a_destination_is_proven_only_for_the_client_address_that_reached_it() {
        let t0 = Instant::now();
        let other: IpAddr = [192, 168, 1, 20].into();
        let mut e = EarlyReply::default();
        e.opened(HOST, &name("example.com", 443), t0);
        assert!(e.allows(HOST, &name("example.com", 443), t0));
        assert!(
            !e.allows(other, &name("example.com", 443), t0),
            "another LAN host cannot tell from its reply that this one reached the destination"
        );
        // The same host seen over an IPv4-mapped IPv6 socket is the same client.
        let mapped = IpAddr::V6(std::net::Ipv4Addr::new(192, 168, 1, 10).to_ipv6_mapped());
        assert!(e.allows(mapped, &name("example.com", 443), t0));
        // The other host proves it for itself; a failure seen by one host forgets it for that
        // host only.
        e.opened(other, &name("example.com", 443), t0);
        assert!(e.allows(other, &name("example.com", 443), t0));
        e.failed(HOST, &name("example.com", 443));
        assert!(!e.allows(HOST, &name("example.com", 443), t0));
        assert!(e.allows(other, &name("example.com", 443), t0));
        assert_eq!(e.len(), 1);
    }
}
