//! The UDP flows of the client's capture modes (TUN and router TPROXY): each pair
//! `(application, original destination)` gets a tunnel association id of its own, from an id
//! range per mode (so both modes can run at once and a datagram's id says whose it is), until it
//! is idle for [`UDP_IDLE`] or the table is full (then the least recently used goes). Pure:
//! addresses and `now` in, ids out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::{Duration, Instant};

use crate::proto::transport::AssocId;

// Association ids stay below 2^30 (a varint of at most 4 bytes in each DATAGRAM frame): SOCKS5
// associations take `1 .. 2^29` (the client loop), the rest is split here.

/// Association ids of TUN mode's flows.
pub const TUN_FLOW_IDS: Range<AssocId> = (1 << 29)..(1 << 29) + (1 << 27);
/// Association ids of router mode's (TPROXY) flows.
pub const REDIR_FLOW_IDS: Range<AssocId> = (1 << 29) + (1 << 27)..(1 << 29) + (1 << 28);
/// Association ids of the DNS forwarder's querying addresses.
pub const DNS_FORWARD_IDS: Range<AssocId> = (1 << 29) + (1 << 28)..(1 << 30);
/// A UDP flow without a datagram either way for this long is forgotten.
pub const UDP_IDLE: Duration = Duration::from_secs(120);
/// At most this many UDP flows per table (the least recently used is forgotten beyond).
pub const MAX_UDP_FLOWS: usize = 4096;

/// One flow: who sent, to whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpFlow {
    /// The application's address (answers go there).
    pub app: SocketAddr,
    /// The destination the application addressed (answers come from it).
    pub dest: SocketAddr,
    last: Instant,
}

/// The flow table of one capture mode.
#[derive(Debug)]
pub struct UdpFlows {
    ids: Range<AssocId>,
    cap: usize,
    next: AssocId,
    flows: HashMap<AssocId, UdpFlow>,
    by_pair: HashMap<(SocketAddr, SocketAddr), AssocId>,
    /// Flows pushed out by a full table, reported by the next [`UdpFlows::expire`].
    evicted: Vec<AssocId>,
}

impl UdpFlows {
    /// A table handing out ids from `ids` (non-empty), holding at most `cap` flows.
    pub fn new(ids: Range<AssocId>, cap: usize) -> Self {
        assert!(ids.start < ids.end && cap > 0, "an empty flow table");
        UdpFlows {
            next: ids.start,
            ids,
            cap,
            flows: HashMap::new(),
            by_pair: HashMap::new(),
            evicted: Vec::new(),
        }
    }

    /// Whether `id` is from this table's range.
    pub fn owns(&self, id: AssocId) -> bool {
        self.ids.contains(&id)
    }

    /// Number of flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether there is no flow.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// A datagram from `app` to `dest`: its flow's id (created if new; `true` then).
    pub fn outbound(&mut self, app: SocketAddr, dest: SocketAddr, now: Instant) -> (AssocId, bool) {
        if let Some(&id) = self.by_pair.get(&(app, dest)) {
            if let Some(f) = self.flows.get_mut(&id) {
                f.last = now;
            }
            return (id, false);
        }
        if self.flows.len() >= self.cap {
            if let Some((&oldest, _)) = self.flows.iter().min_by_key(|(_, f)| f.last) {
                self.forget(oldest);
                self.evicted.push(oldest);
            }
        }
        let id = loop {
            let id = self.next;
            self.next = if id + 1 >= self.ids.end {
                self.ids.start
            } else {
                id + 1
            };
            if !self.flows.contains_key(&id) {
                break id;
            }
        };
        self.flows.insert(
            id,
            UdpFlow {
                app,
                dest,
                last: now,
            },
        );
        self.by_pair.insert((app, dest), id);
        (id, true)
    }

    /// An answer for flow `id`: the flow (kept alive by it), or `None` when it is gone.
    pub fn inbound(&mut self, id: AssocId, now: Instant) -> Option<UdpFlow> {
        let f = self.flows.get_mut(&id)?;
        f.last = now;
        Some(*f)
    }

    /// Flow `id` as it is (not kept alive by the look).
    pub fn get(&self, id: AssocId) -> Option<UdpFlow> {
        self.flows.get(&id).copied()
    }

    fn forget(&mut self, id: AssocId) {
        if let Some(f) = self.flows.remove(&id) {
            self.by_pair.remove(&(f.app, f.dest));
        }
    }

    /// Forgets flows idle for [`UDP_IDLE`] (call about once a second); every flow forgotten
    /// since the last call (idle or pushed out by a full table) is added to `forgotten`.
    pub fn expire(&mut self, now: Instant, forgotten: &mut Vec<AssocId>) {
        let start = forgotten.len();
        forgotten.append(&mut self.evicted);
        for (&id, f) in &self.flows {
            if now.saturating_duration_since(f.last) >= UDP_IDLE {
                forgotten.push(id);
            }
        }
        for &id in &forgotten[start..] {
            self.forget(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_pair_keeps_its_id_until_idle_and_answers_find_the_pair() {
        let t0 = Instant::now();
        let mut f = UdpFlows::new(REDIR_FLOW_IDS, 16);
        let (app, dest) = (sa("192.168.1.10:5000"), sa("8.8.8.8:53"));
        let (id, opened) = f.outbound(app, dest, t0);
        assert!(opened && f.owns(id) && !UdpFlows::new(TUN_FLOW_IDS, 1).owns(id));
        let later = t0 + UDP_IDLE / 2;
        assert_eq!(f.outbound(app, dest, later), (id, false));
        let other = f.outbound(app, sa("8.8.4.4:53"), t0).0;
        assert_ne!(other, id, "another destination is another flow");
        let flow = f.inbound(id, later).unwrap();
        assert_eq!((flow.app, flow.dest), (app, dest));
        let mut gone = Vec::new();
        f.expire(t0 + UDP_IDLE, &mut gone);
        assert_eq!(gone, vec![other], "the flow used at `later` stays");
        assert_eq!(f.inbound(other, later), None);
        gone.clear();
        f.expire(later + UDP_IDLE, &mut gone);
        assert_eq!(gone, vec![id]);
        assert!(f.is_empty());
    }

    #[test]
    fn a_full_table_forgets_the_least_recently_used_and_reports_it() {
        let t0 = Instant::now();
        let mut f = UdpFlows::new(TUN_FLOW_IDS, 2);
        let dest = sa("1.1.1.1:443");
        let a = f.outbound(sa("10.0.0.1:1"), dest, t0).0;
        let b = f
            .outbound(sa("10.0.0.1:2"), dest, t0 + Duration::from_secs(1))
            .0;
        // `a` answered more recently than `b` was used.
        f.inbound(a, t0 + Duration::from_secs(2));
        let c = f
            .outbound(sa("10.0.0.1:3"), dest, t0 + Duration::from_secs(3))
            .0;
        assert_eq!(f.len(), 2);
        assert!(f.inbound(b, t0).is_none() && f.inbound(a, t0).is_some());
        let mut gone = Vec::new();
        f.expire(t0 + Duration::from_secs(3), &mut gone);
        assert_eq!(gone, vec![b]);
        assert!(f.inbound(c, t0).is_some());
    }

    #[test]
    fn ids_wrap_inside_their_range_and_skip_live_ones() {
        let t0 = Instant::now();
        let mut f = UdpFlows::new(100..103, 3);
        let dest = sa("1.1.1.1:1");
        let ids: Vec<AssocId> = (1..=3)
            .map(|p| {
                let at = t0 + Duration::from_secs(u64::from(p));
                f.outbound(SocketAddr::new(dest.ip(), p), dest, at).0
            })
            .collect();
        assert_eq!(ids, vec![100, 101, 102]);
        // Full: the next flow pushes out the oldest (100) and reuses its id.
        let d = f
            .outbound(sa("2.2.2.2:9"), dest, t0 + Duration::from_secs(9))
            .0;
        assert_eq!(d, 100);
        assert!(f.owns(102) && !f.owns(103));
    }
}
