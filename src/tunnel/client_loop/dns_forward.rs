//! The client's DNS forwarder (`dns_forward`, a child module of `client_loop`): a local UDP and
//! TCP DNS endpoint — for dnsmasq's `server=` on a router, or next to any proxy mode — whose
//! queries travel through the tunnel to `upstream`. UDP queries become tunnel datagrams, one
//! association per querying address (so each gets only its own answers); TCP connections become
//! streams to `upstream`, exactly like captured connections (no request read, no reply written).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::{TcpListener, UdpSocket};

use super::{ClientLoop, Local, LocalState};
use crate::proto::transport::{AssocId, Destination};
use crate::tunnel::driver::token::Tok;
use crate::tunnel::driver::udp;
use crate::tunnel::proxy_front::{FrontProtocol, ProxyRequest};
use crate::tunnel::udp_flows::DNS_FORWARD_IDS;

/// The forwarder's association ids.
const FIRST_ID: AssocId = DNS_FORWARD_IDS.start;
const ID_SPACE: AssocId = DNS_FORWARD_IDS.end - DNS_FORWARD_IDS.start;
/// A querying address without a query for this long is forgotten.
const CLIENT_IDLE: Duration = Duration::from_secs(30);
/// Querying addresses remembered at most (the oldest is forgotten beyond).
const MAX_CLIENTS: usize = 1024;
/// Queries read per loop turn.
const RECV_BATCH: usize = 64;

/// `dns_forward` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsForwardOptions {
    /// Where the forwarder listens (UDP and TCP).
    pub bind: SocketAddr,
    /// The resolver the queries go to, through the tunnel.
    pub upstream: SocketAddr,
}

/// The forwarder's sockets and querying addresses.
pub(super) struct DnsForward {
    udp: UdpSocket,
    tcp: TcpListener,
    upstream: SocketAddr,
    ids: HashMap<SocketAddr, AssocId>,
    clients: HashMap<AssocId, (SocketAddr, Instant)>,
    next_id: AssocId,
    /// The UDP socket may hold queries.
    pub(super) readable: bool,
    next_expire: Instant,
}

impl DnsForward {
    pub(super) fn open(
        options: &DnsForwardOptions,
        registry: &mio::Registry,
        now: Instant,
    ) -> Result<DnsForward, String> {
        let bind = options.bind;
        let mut udp =
            UdpSocket::bind(bind).map_err(|e| format!("DNS forwarder on udp {bind}: {e}"))?;
        let mut tcp =
            TcpListener::bind(bind).map_err(|e| format!("DNS forwarder on tcp {bind}: {e}"))?;
        registry
            .register(&mut udp, Tok::DnsUdp.token(), Interest::READABLE)
            .map_err(|e| e.to_string())?;
        registry
            .register(&mut tcp, Tok::DnsTcp.token(), Interest::READABLE)
            .map_err(|e| e.to_string())?;
        log::info!(
            "DNS forwarder on {} (UDP and TCP), through the tunnel to {}",
            udp.local_addr().unwrap_or(bind),
            options.upstream
        );
        Ok(DnsForward {
            udp,
            tcp,
            upstream: options.upstream,
            ids: HashMap::new(),
            clients: HashMap::new(),
            next_id: 0,
            readable: true,
            next_expire: now + CLIENT_IDLE,
        })
    }

    /// Whether `id` is one of the forwarder's associations.
    pub(super) fn owns(id: AssocId) -> bool {
        DNS_FORWARD_IDS.contains(&id)
    }

    /// The association of querying address `client` (a new one when needed).
    fn id_of(&mut self, client: SocketAddr, now: Instant) -> AssocId {
        if let Some(&id) = self.ids.get(&client) {
            if let Some(c) = self.clients.get_mut(&id) {
                c.1 = now;
            }
            return id;
        }
        if self.clients.len() >= MAX_CLIENTS {
            if let Some((&oldest, _)) = self.clients.iter().min_by_key(|(_, c)| c.1) {
                self.forget(oldest);
            }
        }
        let id = loop {
            self.next_id = (self.next_id + 1) % ID_SPACE;
            let id = FIRST_ID + self.next_id;
            if !self.clients.contains_key(&id) {
                break id;
            }
        };
        self.ids.insert(client, id);
        self.clients.insert(id, (client, now));
        id
    }

    fn forget(&mut self, id: AssocId) {
        if let Some((client, _)) = self.clients.remove(&id) {
            self.ids.remove(&client);
        }
    }

    fn expire(&mut self, now: Instant) {
        if now < self.next_expire {
            return;
        }
        self.next_expire = now + CLIENT_IDLE / 4;
        let idle: Vec<AssocId> = self
            .clients
            .iter()
            .filter(|(_, c)| now.saturating_duration_since(c.1) >= CLIENT_IDLE)
            .map(|(&id, _)| id)
            .collect();
        for id in idle {
            self.forget(id);
        }
    }
}

impl ClientLoop {
    /// Reads a batch of queries and sends each into the tunnel (dropped while no session is up:
    /// resolvers retry).
    pub(super) fn dns_receive(&mut self, now: Instant) {
        let Some(mut dns) = self.dns.take() else {
            return;
        };
        if dns.readable {
            let mut queries: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
            let readiness = udp::drain(&dns.udp, &mut self.buf, RECV_BATCH, |q, from| {
                queries.push((from, q.to_vec()));
            });
            dns.readable = readiness.still_readable();
            let slot = self.pick_slot();
            for (from, query) in queries {
                let id = dns.id_of(from, now);
                let Some(session) = slot.and_then(|s| self.slots[s].session_mut()) else {
                    continue;
                };
                let _ = session.transport_mut().send_datagram(
                    id,
                    Destination::from(dns.upstream),
                    &query,
                );
            }
        }
        dns.expire(now);
        self.dns = Some(dns);
    }

    /// An answer from the tunnel: to the address that asked.
    pub(super) fn dns_datagram_in(&mut self, id: AssocId, data: &[u8]) {
        let Some(dns) = self.dns.as_ref() else {
            return;
        };
        if let Some(&(client, _)) = dns.clients.get(&id) {
            let _ = dns.udp.send_to(data, client);
        }
    }

    /// Accepts DNS-over-TCP connections: each is a stream to the upstream resolver.
    pub(super) fn dns_accept(&mut self, now: Instant) {
        loop {
            let Some(dns) = self.dns.as_ref() else {
                return;
            };
            let (mut sock, peer) = match dns.tcp.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::warn!("DNS forwarder: {e}");
                    }
                    return;
                }
            };
            let upstream = dns.upstream;
            if self.locals.len() >= super::MAX_LOCAL || !self.admit_peer(peer.ip()) {
                log::warn!("DNS forwarder: too many local connections; refusing one");
                continue;
            }
            let _ = sock.set_nodelay(true);
            self.next_serial = self.next_serial.wrapping_add(1);
            let serial = self.next_serial;
            let request = ProxyRequest::Connect {
                dest: Destination::from(upstream),
                protocol: FrontProtocol::Transparent,
                early_data: Vec::new(),
            };
            let idx = self.locals.insert_with(|idx| {
                let _ = self.core.registry().register(
                    &mut sock,
                    Tok::Conn(idx).token(),
                    Interest::READABLE | Interest::WRITABLE,
                );
                Local {
                    sock,
                    serial,
                    peer,
                    last_active: now,
                    state: LocalState::Waiting { request },
                    pipe: None,
                    out: Vec::new(),
                    out_pos: 0,
                    readable: true,
                    writable: true,
                    captured: None,
                }
            });
            self.try_open(now, idx);
        }
    }

    /// When the forwarder needs the loop again.
    pub(super) fn dns_deadline(&self, now: Instant) -> Option<Instant> {
        let dns = self.dns.as_ref()?;
        Some(if dns.readable { now } else { dns.next_expire })
    }
}
