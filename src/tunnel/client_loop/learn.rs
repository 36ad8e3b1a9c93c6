//! Split routing by name where the client sees only addresses (a child module of
//! `client_loop`): DNS answers passing through the client — TUN mode's captured DNS, the DNS
//! forwarder, SOCKS5 associations to port 53 — teach [`LearnedAddrs`] the addresses of names
//! under `exclude.domains`; captured TCP connections (TUN and router mode) to such an address
//! are then connected directly ([`super::direct`]), as are SOCKS5/HTTP requests by address.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use mio::net::TcpStream;

use super::{Capture, ClientLoop, LocalState};
use crate::proto::transport::Destination;
use crate::tunnel::dns_wire::DnsAnswer;
use crate::tunnel::proxy_front::{FrontProtocol, ProxyRequest};

impl ClientLoop {
    /// A DNS answer on its way to an application: when its question is under
    /// `exclude.domains`, its addresses (CNAME chains followed) are learned. Anything that is
    /// not such an answer is ignored.
    pub(super) fn learn_from_dns(&mut self, now: Instant, msg: &[u8]) {
        if !self.options.exclude.has_domains() {
            return;
        }
        let Ok(answer) = DnsAnswer::parse(msg) else {
            return;
        };
        let mut text = [0u8; 255];
        let Some(name) = answer.question().text(&mut text) else {
            return;
        };
        if !self.options.exclude.excludes_domain(name) {
            return;
        }
        let learned = &mut self.learned;
        let mut count = 0u32;
        answer.addresses(|ip, ttl| {
            if learned.learn(ip, ttl, name, now) {
                count += 1;
            }
        });
        if count > 0 {
            log::debug!("split routing: {name} resolved to {count} address(es) that go direct");
        }
    }

    /// Whether connections to `ip` go direct because an excluded name resolved to it.
    pub(super) fn is_learned(&mut self, ip: IpAddr, now: Instant) -> bool {
        self.learned.contains(ip, now)
    }

    /// A captured connection to a learned address: connected directly, no request read, no
    /// reply written (a failure resets it, as a refused tunnel stream would).
    pub(super) fn admit_direct(
        &mut self,
        now: Instant,
        sock: TcpStream,
        peer: SocketAddr,
        dest: SocketAddr,
        capture: Capture,
    ) {
        let request = ProxyRequest::Connect {
            dest: Destination::from(dest),
            protocol: FrontProtocol::Transparent,
            early_data: Vec::new(),
        };
        log::debug!("split routing: {peer} → {dest} goes direct (a learned address)");
        let waiting = LocalState::Waiting {
            request: request.clone(),
        };
        let idx = self.insert_local(now, sock, peer, waiting, Some(capture));
        self.start_direct(now, idx, request);
    }
}
