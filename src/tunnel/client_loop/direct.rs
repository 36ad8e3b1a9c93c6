//! Split routing for proxy requests (`exclude`, a child module of `client_loop`): a SOCKS5 or
//! HTTP request whose destination is excluded (an address in `exclude.ips`, a name under
//! `exclude.domains`) is connected directly by the client — a name is resolved here — without
//! the tunnel (in TUN mode the socket carries the mark that keeps it out of the device), and the
//! two sockets are spliced with bounded buffers and half-close (`tunnel::splice`). The proxy
//! reply comes first, as for a tunnel stream.

use std::io;
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::time::Instant;

use mio::Interest;
use mio::net::TcpStream;

use super::{ClientLoop, LocalState};
use crate::proto::transport::Destination;
use crate::tunnel::driver::ticket::{Ticket, TicketKind};
use crate::tunnel::driver::token::Tok;
use crate::tunnel::learned::LearnedAddrs;
use crate::tunnel::proxy_front::{ProxyRequest, Socks5Reply};
use crate::tunnel::resolver::Lookup;
use crate::tunnel::splice::Half;

/// Bytes buffered per direction of a direct connection.
const DIRECT_BUF: usize = 16 * 1024;

/// A direct connection's destination side.
pub(super) struct Direct {
    pub(super) request: ProxyRequest,
    /// `None` while the name resolves.
    sock: Option<TcpStream>,
    /// The connect completed (the proxy reply is queued).
    connected: bool,
    pub(super) readable: bool,
    pub(super) writable: bool,
    /// Local application → destination (early bytes first).
    up: Half,
    /// Destination → local application.
    down: Half,
    ticket: Option<Ticket>,
    /// The learned address this connection holds (released at close).
    held: Option<IpAddr>,
}

impl Direct {
    fn new(request: ProxyRequest) -> Direct {
        let early: Vec<u8> = match &request {
            ProxyRequest::Connect { early_data, .. } => early_data.clone(),
            ProxyRequest::HttpForward {
                head, body_prefix, ..
            } => [head.as_slice(), body_prefix].concat(),
            ProxyRequest::UdpAssociate { .. } => Vec::new(),
        };
        Direct {
            request,
            sock: None,
            connected: false,
            readable: false,
            writable: false,
            up: Half::new(DIRECT_BUF.max(early.len()), &early),
            down: Half::new(DIRECT_BUF, &[]),
            ticket: None,
            held: None,
        }
    }

    /// Deregisters and drops the destination socket, and releases the learned address it held.
    pub(super) fn close(&mut self, registry: &mio::Registry, learned: &mut LearnedAddrs) {
        if let Some(mut sock) = self.sock.take() {
            let _ = registry.deregister(&mut sock);
        }
        if let Some(ip) = self.held.take() {
            learned.release(ip, Instant::now());
        }
    }
}

impl ClientLoop {
    /// Whether `request`'s destination bypasses the tunnel (an address may be excluded by range
    /// or learned from an excluded name's DNS answer; DNS to a learned address never goes
    /// direct).
    pub(super) fn is_excluded(&mut self, request: &ProxyRequest, now: Instant) -> bool {
        match request.dest() {
            Some(Destination::Addr(a)) => {
                self.options.exclude.excludes_ip(a.ip()) || self.learned_goes_direct(*a, now)
            }
            Some(Destination::Domain { name, .. }) => self.options.exclude.excludes_domain(name),
            None => false,
        }
    }

    /// Connects local connection `idx`'s request directly (resolving a name first).
    pub(super) fn start_direct(&mut self, now: Instant, idx: usize, request: ProxyRequest) {
        let dest = request.dest().cloned();
        let Some(l) = self.locals.get_mut(idx) else {
            return;
        };
        let mut direct = Direct::new(request);
        if let Some(Destination::Addr(a)) = &dest {
            // Held while open: new connections to it keep going direct past its TTL.
            direct.held = self.learned.hold(a.ip(), now).then_some(a.ip());
        }
        l.state = LocalState::Direct(Box::new(direct));
        self.opening.push(idx, now);
        match dest {
            Some(Destination::Addr(addr)) => self.direct_connect(now, idx, addr),
            Some(Destination::Domain { name, port }) => {
                let ticket = self.tickets.issue(TicketKind::Direct, idx);
                match self.resolver.lookup(ticket, &name, port) {
                    Ok(Lookup::Ready(addr)) => self.direct_connect(now, idx, addr),
                    Ok(Lookup::Pending) => {
                        if let Some(LocalState::Direct(d)) =
                            self.locals.get_mut(idx).map(|l| &mut l.state)
                        {
                            d.ticket = Some(ticket);
                        }
                    }
                    Err(_) => self.fail_request(now, idx, Socks5Reply::GeneralFailure),
                }
            }
            None => self.fail_request(now, idx, Socks5Reply::AddressTypeNotSupported),
        }
    }

    /// The name of a direct connection resolved (or not).
    pub(super) fn direct_resolved(
        &mut self,
        now: Instant,
        ticket: Ticket,
        addr: Option<SocketAddr>,
    ) {
        let idx = ticket.index;
        let ours = matches!(
            self.locals.get(idx).map(|l| &l.state),
            Some(LocalState::Direct(d)) if d.ticket == Some(ticket)
        );
        if !ours {
            return; // the connection is gone (its slot may hold another one now)
        }
        match addr {
            Some(addr) => self.direct_connect(now, idx, addr),
            None => self.fail_request(now, idx, Socks5Reply::HostUnreachable),
        }
    }

    fn direct_connect(&mut self, now: Instant, idx: usize, addr: SocketAddr) {
        let mark = self.options.tun.as_ref().map(|t| t.settings.fwmark);
        let sock = crate::sys::tcp_connect(addr, mark).map(TcpStream::from_std);
        let registry = self.core.registry();
        let Some(l) = self.locals.get_mut(idx) else {
            return;
        };
        let LocalState::Direct(d) = &mut l.state else {
            return;
        };
        match sock {
            Ok(mut sock) => {
                let interest = Interest::READABLE | Interest::WRITABLE;
                if registry
                    .register(&mut sock, Tok::Direct(idx).token(), interest)
                    .is_err()
                {
                    self.fail_request(now, idx, Socks5Reply::GeneralFailure);
                    return;
                }
                d.ticket = None;
                d.sock = Some(sock);
            }
            Err(e) => {
                log::debug!("direct connection to {addr}: {e}");
                self.fail_request(now, idx, Socks5Reply::HostUnreachable);
            }
        }
    }

    /// Advances direct connection `idx`: completes the connect (then queues the proxy reply),
    /// then moves bytes both ways; closes it when both directions ended or on an error.
    pub(super) fn drive_direct(&mut self, now: Instant, idx: usize) {
        let local_addr = self.local_addr;
        let Some(l) = self.locals.get_mut(idx) else {
            return;
        };
        let LocalState::Direct(d) = &mut l.state else {
            return;
        };
        let Some(sock) = d.sock.as_mut() else {
            return; // still resolving
        };
        if !d.connected {
            if !d.writable {
                return;
            }
            let failed = match (sock.take_error(), sock.peer_addr()) {
                (Ok(None), Ok(_)) => false,
                (Ok(None), Err(e)) if e.kind() == io::ErrorKind::NotConnected => return,
                _ => true,
            };
            if failed {
                self.fail_request(now, idx, Socks5Reply::ConnectionRefused);
                return;
            }
            d.connected = true;
            let _ = sock.set_nodelay(true);
            l.out.extend(d.request.success_reply(local_addr));
            l.last_active = now;
            self.opening.remove(idx);
            self.idle_checks.push_new((idx, l.serial), now);
            // Write the reply first (the local connection's pending bytes), then splice.
            self.drive_local(now, idx);
            return;
        }
        let reply_sent = l.out.is_empty();
        let up = d.up.pump(
            &mut l.sock,
            &mut l.readable,
            sock,
            &mut d.writable,
            true,
            usize::MAX,
        );
        let down = d.down.pump(
            sock,
            &mut d.readable,
            &mut l.sock,
            &mut l.writable,
            reply_sent,
            usize::MAX,
        );
        let (Ok(up), Ok(down)) = (up, down) else {
            self.close_local(idx);
            return;
        };
        if up.read + up.written + down.read + down.written > 0 {
            l.last_active = now;
        }
        if up.shut_dst {
            let _ = sock.shutdown(Shutdown::Write);
        }
        if down.shut_dst {
            let _ = l.sock.shutdown(Shutdown::Write);
        }
        if d.up.finished() && d.down.finished() {
            self.close_local(idx);
        }
    }
}
