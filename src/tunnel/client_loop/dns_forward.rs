//! The client's DNS forwarder (`dns_forward`, a child module of `client_loop`): a local UDP and
//! TCP DNS endpoint — for dnsmasq's `server=` on a router, or next to any proxy mode — whose
//! queries travel through the tunnel to `upstream`. UDP queries become tunnel datagrams, one
//! association per querying address (so each gets only its own answers); TCP connections become
//! streams to `upstream`, exactly like captured connections (no request read, no reply written).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::{TcpListener, UdpSocket};

use super::ClientLoop;
use super::learn::Teacher;
use crate::proto::transport::{AssocId, Destination};
use crate::tunnel::driver::token::Tok;
use crate::tunnel::driver::udp;
use crate::tunnel::learned::QueryFlow;
use crate::tunnel::udp_flows::{DNS_FORWARD_IDS, UdpFlows};

/// How often idle querying addresses are forgotten (after `udp_flows::UDP_IDLE` without a
/// query or an answer).
const EXPIRE_EVERY: Duration = Duration::from_secs(5);
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
    /// Querying address → association (flows to `upstream`).
    clients: UdpFlows,
    /// Reused by expiry (no allocation per call).
    forgotten: Vec<AssocId>,
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
            clients: UdpFlows::new(DNS_FORWARD_IDS, MAX_CLIENTS),
            forgotten: Vec::new(),
            readable: true,
            next_expire: now + EXPIRE_EVERY,
        })
    }

    /// Whether `id` is one of the forwarder's associations.
    pub(super) fn owns(id: AssocId) -> bool {
        DNS_FORWARD_IDS.contains(&id)
    }

    fn expire(&mut self, now: Instant) {
        if now < self.next_expire {
            return;
        }
        self.next_expire = now + EXPIRE_EVERY;
        self.clients.expire(now, &mut self.forgotten);
        self.forgotten.clear();
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
            let slot = self.pick_slot();
            let slots = &mut self.slots;
            let (learned, pending) = (&mut self.learned, &mut self.dns_queries);
            let mut teacher = Teacher::new(&self.options, learned, pending, now);
            let DnsForward {
                udp,
                upstream,
                clients,
                ..
            } = &mut dns;
            let readiness = udp::drain(udp, &mut self.buf, RECV_BATCH, |query, from| {
                let (id, _) = clients.outbound(from, *upstream, now);
                teacher.query(QueryFlow::Datagrams(id), *upstream, query);
                let Some(session) = slot.and_then(|s| slots[s].session_mut()) else {
                    return; // no session: dropped (resolvers retry)
                };
                let _ =
                    session
                        .transport_mut()
                        .send_datagram(id, Destination::from(*upstream), query);
            });
            dns.readable = readiness.still_readable();
        }
        dns.expire(now);
        self.dns = Some(dns);
    }

    /// An answer from the tunnel: to the address that asked.
    /// An answer from `from`: only the upstream resolver's go to the application (the server's
    /// relay takes datagrams from any host; nobody else answers its queries).
    pub(super) fn dns_datagram_in(
        &mut self,
        now: Instant,
        id: AssocId,
        from: SocketAddr,
        data: &[u8],
    ) {
        let Some(dns) = self.dns.as_mut() else {
            return;
        };
        let upstream = dns.upstream;
        if from.port() != upstream.port()
            || from.ip().to_canonical() != upstream.ip().to_canonical()
        {
            return;
        }
        if let Some(flow) = dns.clients.inbound(id, now) {
            let _ = dns.udp.send_to(data, flow.app);
        }
    }

    /// Accepts DNS-over-TCP connections: each is a stream to the upstream resolver.
    pub(super) fn dns_accept(&mut self, now: Instant) {
        loop {
            let Some(dns) = self.dns.as_ref() else {
                return;
            };
            let Some((sock, peer)) = super::accept_next(&dns.tcp, "DNS forwarder") else {
                return;
            };
            let upstream = dns.upstream;
            if self.locals.len() >= super::MAX_LOCAL || !self.admit_peer(peer.ip()) {
                log::warn!("DNS forwarder: too many local connections; refusing one");
                continue;
            }
            self.open_transparent(now, sock, peer, upstream, None);
        }
    }

    /// When the forwarder needs the loop again.
    pub(super) fn dns_deadline(&self, now: Instant) -> Option<Instant> {
        let dns = self.dns.as_ref()?;
        Some(if dns.readable { now } else { dns.next_expire })
    }
}
