//! The TUN's TCP address translation ("system stack"): the kernel terminates every captured TCP
//! connection at one local listener. A packet an application sends (`app → dest`) is rewritten
//! to `(virtual peer, NAT port) → listener` and written back into the device; the listener's
//! answers to the NAT port are rewritten back to `dest → app`. This table maps each flow to its
//! NAT port and back, so an accepted connection's peer port names its original destination.
//! Pure: the caller passes `now`; bounded (one entry per port of its range).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// An entry nobody uses any more (no packets, connection not open) is freed after this long:
/// long enough for the last FIN/ACK retransmissions of a closed connection.
pub const UNPINNED_IDLE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
struct Entry {
    app: SocketAddr,
    dest: SocketAddr,
    last: Instant,
    /// The listener's connection for this flow is open: never expires.
    pinned: bool,
}

/// Why a new flow got no NAT port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatRefusal {
    /// Not a SYN, and the flow is unknown (a stale packet: the caller drops it).
    UnknownFlow,
    /// Every port is held by an open connection.
    Full,
}

/// Flow ↔ NAT port map.
#[derive(Debug)]
pub struct TcpNat {
    first: u16,
    /// Ports in the range.
    count: usize,
    /// Live entries by port index (memory follows the flows, not the range: routers).
    entries: HashMap<usize, Entry>,
    by_flow: HashMap<(SocketAddr, SocketAddr), u16>,
    /// Where the search for a free port starts (ports are handed out round-robin, so a port is
    /// not reused right after it was freed).
    cursor: usize,
}

impl TcpNat {
    /// A table handing out ports `first .. first + count`.
    pub fn new(first: u16, count: u16) -> Self {
        let count = usize::from(count).min(usize::from(u16::MAX - first) + 1);
        TcpNat {
            first,
            count,
            entries: HashMap::new(),
            by_flow: HashMap::new(),
            cursor: 0,
        }
    }

    /// Flows in the table.
    pub fn len(&self) -> usize {
        self.by_flow.len()
    }

    /// No flows.
    pub fn is_empty(&self) -> bool {
        self.by_flow.is_empty()
    }

    /// A packet an application sent (`app → dest`): its flow's NAT port. A new flow gets one only
    /// on a SYN (anything else of an unknown flow is stale); when every port is taken, the
    /// longest-idle flow whose connection is not open gives its port up.
    pub fn outbound(
        &mut self,
        app: SocketAddr,
        dest: SocketAddr,
        syn: bool,
        now: Instant,
    ) -> Result<u16, NatRefusal> {
        if let Some(&port) = self.by_flow.get(&(app, dest)) {
            if let Some(e) = self.slot_mut(port) {
                e.last = now;
            }
            return Ok(port);
        }
        if !syn {
            return Err(NatRefusal::UnknownFlow);
        }
        let index = self.free_index().ok_or(NatRefusal::Full)?;
        self.entries.insert(
            index,
            Entry {
                app,
                dest,
                last: now,
                pinned: false,
            },
        );
        let port = self.first + index as u16;
        self.by_flow.insert((app, dest), port);
        Ok(port)
    }

    /// A packet the listener sent to NAT port `port`: the flow's `(app, dest)`, to rewrite it to
    /// `dest → app`.
    pub fn inbound(&mut self, port: u16, now: Instant) -> Option<(SocketAddr, SocketAddr)> {
        let e = self.slot_mut(port)?;
        e.last = now;
        Some((e.app, e.dest))
    }

    /// The listener accepted the connection from NAT port `port`: its original destination; the
    /// entry stays until [`TcpNat::closed`].
    pub fn accepted(&mut self, port: u16) -> Option<SocketAddr> {
        let e = self.slot_mut(port)?;
        e.pinned = true;
        Some(e.dest)
    }

    /// The accepted connection of `port` is closed: the entry expires after
    /// [`UNPINNED_IDLE`] without packets.
    pub fn closed(&mut self, port: u16, now: Instant) {
        if let Some(e) = self.slot_mut(port) {
            e.pinned = false;
            e.last = now;
        }
    }

    /// Frees entries unused for [`UNPINNED_IDLE`] whose connection is not open (SYNs never
    /// accepted, closed connections). One pass over the live flows; call about once a second.
    pub fn expire(&mut self, now: Instant) {
        let by_flow = &mut self.by_flow;
        self.entries.retain(|_, e| {
            let stale = !e.pinned && now.saturating_duration_since(e.last) >= UNPINNED_IDLE;
            if stale {
                by_flow.remove(&(e.app, e.dest));
            }
            !stale
        });
    }

    fn slot_mut(&mut self, port: u16) -> Option<&mut Entry> {
        let index = usize::from(port.checked_sub(self.first)?);
        self.entries.get_mut(&index)
    }

    fn free(&mut self, index: usize) {
        if let Some(e) = self.entries.remove(&index) {
            self.by_flow.remove(&(e.app, e.dest));
        }
    }

    fn free_index(&mut self) -> Option<usize> {
        let n = self.count;
        if self.entries.len() < n {
            for step in 0..n {
                let index = (self.cursor + step) % n;
                if !self.entries.contains_key(&index) {
                    self.cursor = (index + 1) % n;
                    return Some(index);
                }
            }
        }
        // Full: the longest-idle unpinned flow (earliest last packet) gives its port up.
        let victim = self
            .entries
            .iter()
            .filter(|(_, e)| !e.pinned)
            .map(|(&i, e)| (e.last, i))
            .min()
            .map(|(_, i)| i)?;
        self.free(victim);
        Some(victim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_flow_maps_to_one_port_and_back() {
        let now = Instant::now();
        let mut nat = TcpNat::new(10_000, 100);
        let (app, dest) = (sa("172.19.0.1:40000"), sa("93.184.216.34:443"));
        assert_eq!(
            nat.outbound(app, dest, false, now),
            Err(NatRefusal::UnknownFlow),
            "a stale non-SYN gets no port"
        );
        let port = nat.outbound(app, dest, true, now).unwrap();
        assert_eq!(nat.outbound(app, dest, false, now), Ok(port));
        let other = nat
            .outbound(sa("172.19.0.1:40001"), dest, true, now)
            .unwrap();
        assert_ne!(port, other);
        assert_eq!(nat.inbound(port, now), Some((app, dest)));
        assert_eq!(nat.accepted(port), Some(dest));
        assert_eq!(nat.inbound(9_999, now), None);
        assert_eq!(nat.inbound(10_100, now), None);
        assert_eq!(nat.len(), 2);
    }

    #[test]
    fn open_connections_never_expire_and_closed_ones_do_after_a_minute() {
        let t0 = Instant::now();
        let mut nat = TcpNat::new(20_000, 10);
        let dest = sa("[2001:db8::1]:22");
        let open = nat.outbound(sa("[fd00::1]:1"), dest, true, t0).unwrap();
        let never = nat.outbound(sa("[fd00::1]:2"), dest, true, t0).unwrap();
        nat.accepted(open);
        nat.expire(t0 + Duration::from_secs(3600));
        assert!(nat.inbound(open, t0).is_some(), "an open connection stays");
        assert!(
            nat.inbound(never, t0).is_none(),
            "a SYN never accepted is freed"
        );
        let t1 = t0 + Duration::from_secs(4000);
        nat.closed(open, t1);
        nat.expire(t1 + UNPINNED_IDLE - Duration::from_secs(1));
        assert!(
            nat.inbound(open, t1).is_some(),
            "closing FINs still pass for a while"
        );
        nat.expire(t1 + UNPINNED_IDLE);
        assert!(nat.is_empty());
    }

    #[test]
    fn a_full_table_recycles_the_longest_idle_unpinned_flow_and_refuses_when_all_are_open() {
        let t0 = Instant::now();
        let mut nat = TcpNat::new(30_000, 3);
        let dest = sa("10.0.0.9:80");
        let flows: Vec<u16> = (0..3)
            .map(|i| {
                let at = t0 + Duration::from_secs(i);
                nat.outbound(sa(&format!("172.19.0.1:{}", 1000 + i)), dest, true, at)
                    .unwrap()
            })
            .collect();
        nat.accepted(flows[0]);
        let later = t0 + Duration::from_secs(10);
        let new = nat
            .outbound(sa("172.19.0.1:2000"), dest, true, later)
            .unwrap();
        assert_eq!(new, flows[1], "the oldest unpinned flow gave its port up");
        assert_eq!(
            nat.outbound(sa("172.19.0.1:1001"), dest, false, later),
            Err(NatRefusal::UnknownFlow)
        );
        for &p in &[flows[0], flows[2], new] {
            nat.accepted(p);
        }
        assert_eq!(
            nat.outbound(sa("172.19.0.1:3000"), dest, true, later),
            Err(NatRefusal::Full)
        );
    }
}
