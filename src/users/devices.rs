//! A user's recently seen client IP addresses (live only, never persisted): a bounded list
//! kept least-recently-seen first out, fed by the tunnel loop at session events.

use std::net::IpAddr;

use serde::Serialize;

/// Most addresses remembered per user; beyond it the least recently seen one without a live
/// session is forgotten.
pub const MAX_RECENT_IPS: usize = 64;
/// Addresses without a live session are shown for this long after they were last seen.
pub const RECENT_IPS_WINDOW_SECS: u64 = 24 * 3600;

/// One client address of a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    ip: IpAddr,
    /// Unix seconds a session was last opened, moved to, or closed from this address.
    last_seen: u64,
    /// Sessions live from this address now.
    live: u32,
}

/// A user's recent client addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecentIps {
    seen: Vec<Seen>,
}

/// One address as `GET /api/users/{key}/ips` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IpView {
    pub ip: IpAddr,
    /// Unix seconds; `now` while a session is live from it.
    pub last_seen: u64,
    pub live: bool,
}

impl RecentIps {
    fn entry(&mut self, ip: IpAddr, now_unix: u64) -> &mut Seen {
        let ip = ip.to_canonical();
        if let Some(i) = self.seen.iter().position(|s| s.ip == ip) {
            return &mut self.seen[i];
        }
        if self.seen.len() >= MAX_RECENT_IPS {
            // Forget the least recently seen address, one without a live session if any.
            let victim = self
                .seen
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| (s.live > 0, s.last_seen))
                .map(|(i, _)| i);
            if let Some(i) = victim {
                self.seen.swap_remove(i);
            }
        }
        self.seen.push(Seen {
            ip,
            last_seen: now_unix,
            live: 0,
        });
        let last = self.seen.len() - 1;
        &mut self.seen[last]
    }

    /// A session became live from `ip` (established, or moved there).
    pub fn opened(&mut self, ip: IpAddr, now_unix: u64) {
        let e = self.entry(ip, now_unix);
        e.live = e.live.saturating_add(1);
        e.last_seen = e.last_seen.max(now_unix);
    }

    /// A session from `ip` ended (or moved away).
    pub fn closed(&mut self, ip: IpAddr, now_unix: u64) {
        let ip = ip.to_canonical();
        if let Some(e) = self.seen.iter_mut().find(|s| s.ip == ip) {
            e.live = e.live.saturating_sub(1);
            e.last_seen = e.last_seen.max(now_unix);
        }
    }

    /// The addresses live now or seen in the last 24 h, most recent first.
    pub fn view(&self, now_unix: u64) -> Vec<IpView> {
        let since = now_unix.saturating_sub(RECENT_IPS_WINDOW_SECS);
        let mut v: Vec<IpView> = self
            .seen
            .iter()
            .filter(|s| s.live > 0 || s.last_seen >= since)
            .map(|s| IpView {
                ip: s.ip,
                last_seen: if s.live > 0 { now_unix } else { s.last_seen },
                live: s.live > 0,
            })
            .collect();
        v.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.ip.cmp(&b.ip)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn live_flags_last_seen_and_the_24_hour_window() {
        let mut r = RecentIps::default();
        r.opened(ip("127.0.0.2"), 100);
        r.opened(ip("127.0.0.3"), 110);
        r.opened(ip("::ffff:127.0.0.3"), 120); // the same address, mapped
        r.closed(ip("127.0.0.3"), 130);
        let v = r.view(200);
        assert_eq!(
            v,
            vec![
                IpView {
                    ip: ip("127.0.0.2"),
                    last_seen: 200,
                    live: true
                },
                // Still one session of two live: seen now.
                IpView {
                    ip: ip("127.0.0.3"),
                    last_seen: 200,
                    live: true
                },
            ]
        );
        r.closed(ip("127.0.0.3"), 140);
        r.closed(ip("127.0.0.2"), 150);
        let v = r.view(150 + RECENT_IPS_WINDOW_SECS);
        assert_eq!(v.len(), 1, "127.0.0.3 left the window: {v:?}");
        assert_eq!((v[0].ip, v[0].live), (ip("127.0.0.2"), false));
        // Closing an address never seen is harmless.
        r.closed(ip("10.0.0.1"), 1);
    }

    #[test]
    fn the_list_is_bounded_and_forgets_the_least_recent_address_without_a_session() {
        let mut r = RecentIps::default();
        r.opened(ip("10.0.0.0"), 1); // live, oldest
        for i in 1..MAX_RECENT_IPS as u64 + 10 {
            let a = IpAddr::from([10, 0, (i >> 8) as u8, i as u8]);
            r.opened(a, 10 + i);
            r.closed(a, 10 + i);
        }
        let v = r.view(1000);
        assert_eq!(v.len(), MAX_RECENT_IPS);
        assert!(v.iter().any(|s| s.ip == ip("10.0.0.0") && s.live));
        assert!(
            !v.iter().any(|s| s.ip == ip("10.0.0.1")),
            "the oldest idle one went"
        );
        assert!(v.iter().any(|s| s.ip == IpAddr::from([10, 0, 0, 72])));
    }
}
