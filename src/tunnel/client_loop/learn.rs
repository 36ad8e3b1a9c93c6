//! Split routing by name where the client sees only addresses (a child module of
//! `client_loop`): DNS answers passing through the client — TUN and router mode's captured DNS,
//! the DNS forwarder, SOCKS5 associations to port 53 — teach [`LearnedAddrs`] the addresses of names
//! under `exclude.domains`; captured TCP connections (TUN and router mode) to such an address
//! are then connected directly ([`super::direct`]), as are SOCKS5/HTTP requests by address.
//! DNS over TCP (captured port 53, the forwarder's TCP side) is read as it passes to the
//! application ([`Tapped`]).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use mio::net::TcpStream;

use super::{Capture, ClientLoop, LocalState};
use crate::proto::transport::Destination;
use crate::tunnel::dns_wire::{DnsAnswer, TcpFramer};
use crate::tunnel::exclude::Exclude;
use crate::tunnel::learned::LearnedAddrs;
use crate::tunnel::pipe::ShutdownWrite;
use crate::tunnel::proxy_front::{FrontProtocol, ProxyRequest};

/// Learns the addresses of DNS answer `msg` when its question is under `exclude.domains`
/// (anything else is ignored); how many.
pub(super) fn learn_answer(
    exclude: &Exclude,
    learned: &mut LearnedAddrs,
    now: Instant,
    msg: &[u8],
) -> u32 {
    if !exclude.has_domains() {
        return 0;
    }
    let Ok(answer) = DnsAnswer::parse(msg) else {
        return 0;
    };
    let mut text = [0u8; 255];
    let Some(name) = answer.question().text(&mut text) else {
        return 0;
    };
    if !exclude.excludes_domain(name) {
        return 0;
    }
    let mut count = 0u32;
    answer.addresses(|ip, ttl| {
        if learned.learn(ip, ttl, name, now) {
            count += 1;
        }
    });
    if count > 0 {
        log::debug!("split routing: {name} resolved to {count} address(es) that go direct");
    }
    count
}

/// A DNS-over-TCP connection's socket as its pipe sees it: what is written to the application
/// also goes through the framer, and each whole answer to `each`.
pub(super) struct Tapped<'a, F: FnMut(&[u8])> {
    pub(super) sock: &'a mut TcpStream,
    pub(super) framer: &'a mut TcpFramer,
    pub(super) each: F,
}

impl<F: FnMut(&[u8])> Read for Tapped<'_, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.read(buf)
    }
}

impl<F: FnMut(&[u8])> Write for Tapped<'_, F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.sock.write(buf)?;
        self.framer
            .feed(buf.get(..n).unwrap_or_default(), &mut self.each);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

impl<F: FnMut(&[u8])> ShutdownWrite for Tapped<'_, F> {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.sock.shutdown_write()
    }
}

impl ClientLoop {
    /// A DNS answer on its way to an application: when its question is under
    /// `exclude.domains`, its addresses (CNAME chains followed) are learned. Anything that is
    /// not such an answer is ignored.
    pub(super) fn learn_from_dns(&mut self, now: Instant, msg: &[u8]) {
        learn_answer(&self.options.exclude, &mut self.learned, now, msg);
    }

    /// Whether connections to `ip` go direct because an excluded name resolved to it.
    pub(super) fn is_learned(&mut self, ip: IpAddr, now: Instant) -> bool {
        self.learned.contains(ip, now)
    }

    /// Whether a captured connection or flow to `dest` goes direct: a learned address, unless
    /// it is DNS (port 53 or `tun.dns`), which always goes through the tunnel.
    pub(super) fn captured_goes_direct(&mut self, dest: SocketAddr, now: Instant) -> bool {
        let tun_dns = self.options.tun.as_ref().and_then(|t| t.dns);
        dest.port() != 53 && tun_dns != Some(dest) && self.is_learned(dest.ip(), now)
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
