//! The client loop's TUN mode (a child module of `client_loop`, kept apart so the loop file stays
//! about the proxy port and the sessions): the device's readiness, packets through
//! [`TunFront`] (TCP reflected into the device, UDP flows to tunnel datagrams and their answers
//! back), the listeners that accept the reflected connections (they become local connections
//! with a known destination, like proxy requests without a reply), the once-a-second expiry, and
//! the routes: with the kill switch they stay for the client's lifetime, without it they exist
//! only while a session is up (so traffic is never black-holed and never leaks while up).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::TcpListener;
use mio::unix::SourceFd;

use super::{Capture, ClientLoop, SlotState};
use crate::proto::transport::AssocId;
use crate::tunnel::driver::token::Tok;
use crate::tunnel::tun::device::{TunDevice, TunSettings};
use crate::tunnel::tun::front::{TunAddrs, TunFront, TunVerdict};

/// Packets read from the device per loop turn before other sockets get their turn.
const TUN_BATCH: usize = 64;
/// Largest packet read from or written to the device (the MTU is at most 65,535).
const TUN_PACKET: usize = 65_535;
/// How often flows are expired.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

/// TUN mode settings of a client loop.
#[derive(Debug, Clone)]
pub struct TunOptions {
    pub settings: TunSettings,
    /// `tun.dns`: where captured DNS goes.
    pub dns: Option<SocketAddr>,
    /// Keep the routes while no session is up (captured traffic is dropped meanwhile).
    pub kill_switch: bool,
}

/// TUN mode's state in the client loop.
pub(super) struct TunState {
    device: TunDevice,
    front: TunFront,
    listeners: Vec<TcpListener>,
    /// The device may hold packets.
    pub(super) readable: bool,
    /// Routes were installed or withdrawn at least once.
    routes_tried: bool,
    kill_switch: bool,
    /// Each UDP flow stays on one session (the server's relay for it lives there).
    flow_slots: HashMap<AssocId, usize>,
    forgotten: Vec<AssocId>,
    next_expire: Instant,
    packet: Box<[u8]>,
}

impl TunState {
    /// Creates the device and binds the listeners on its addresses (same port in both
    /// families). Routes come later ([`ClientLoop::tun_routes`]).
    pub(super) fn open(
        options: &TunOptions,
        registry: &mio::Registry,
        now: Instant,
    ) -> Result<TunState, String> {
        let device = TunDevice::create(&options.settings).map_err(|e| e.to_string())?;
        let settings = device.settings().clone();
        let v4 = SocketAddr::new(IpAddr::V4(settings.ipv4.0), 0);
        let mut listeners =
            vec![TcpListener::bind(v4).map_err(|e| format!("TUN listener on {v4}: {e}"))?];
        let port = listeners[0].local_addr().map_err(|e| e.to_string())?.port();
        if let Some((v6, _)) = settings.ipv6 {
            let addr = SocketAddr::new(IpAddr::V6(v6), port);
            listeners
                .push(TcpListener::bind(addr).map_err(|e| format!("TUN listener on {addr}: {e}"))?);
        }
        for (i, l) in listeners.iter_mut().enumerate() {
            registry
                .register(l, Tok::TunListener(i).token(), Interest::READABLE)
                .map_err(|e| e.to_string())?;
        }
        registry
            .register(
                &mut SourceFd(&device.file().as_raw_fd()),
                Tok::Tun.token(),
                Interest::READABLE,
            )
            .map_err(|e| e.to_string())?;
        let front = TunFront::new(
            TunAddrs {
                v4: settings.ipv4.0,
                v6: settings.ipv6.map(|(a, _)| a),
                listener_port: port,
            },
            options.dns,
        );
        log::info!(
            "TUN mode: device {} ({}/{}{}), DNS to {}, kill switch {}",
            device.name(),
            settings.ipv4.0,
            settings.ipv4.1,
            settings
                .ipv6
                .map_or(String::new(), |(a, l)| format!(", {a}/{l}")),
            options
                .dns
                .map_or_else(|| "the addressed servers".to_string(), |d| d.to_string()),
            if options.kill_switch { "on" } else { "off" }
        );
        Ok(TunState {
            routes_tried: false,
            device,
            front,
            listeners,
            readable: true,
            kill_switch: options.kill_switch,
            flow_slots: HashMap::new(),
            forgotten: Vec::new(),
            next_expire: now + EXPIRE_EVERY,
            packet: vec![0u8; TUN_PACKET].into_boxed_slice(),
        })
    }

    /// Writes one packet to the device; a full device queue drops it (TCP retransmits, UDP
    /// senders retry), as a router would.
    fn write(&self, packet: &[u8]) {
        match self.device.file().write(packet) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => log::debug!("TUN write: {e}"),
        }
    }
}

impl ClientLoop {
    /// Reads up to [`TUN_BATCH`] packets from the device and acts on each.
    pub(super) fn tun_receive(&mut self, now: Instant) {
        self.direct_udp_receive(now);
        let Some(mut tun) = self.tun.take() else {
            return;
        };
        if tun.readable {
            for _ in 0..TUN_BATCH {
                let n = match tun.device.file().read(&mut tun.packet) {
                    Ok(n) => n,
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            log::debug!("TUN read: {e}");
                        }
                        tun.readable = false;
                        break;
                    }
                };
                let mut packet = std::mem::take(&mut tun.packet);
                match tun.front.handle(&mut packet[..n], now) {
                    TunVerdict::Reflect => tun.write(&packet[..n]),
                    TunVerdict::Datagram {
                        id, dest, payload, ..
                    } => {
                        let data = packet.get(payload).unwrap_or_default();
                        self.dns_query_out(now, id, dest, data);
                        if !self.direct_flow_send(now, id, dest, data) {
                            self.send_flow_datagram(&mut tun.flow_slots, id, dest, data);
                        }
                    }
                    TunVerdict::Drop(_) => {}
                }
                tun.packet = packet;
            }
        }
        self.tun = Some(tun);
    }

    /// An answer from `from` through the tunnel (or a direct socket) for a TUN flow: written to
    /// the device as an IP/UDP packet (see [`TunFront::reply`] for whose source it carries).
    pub(super) fn tun_datagram_in(
        &mut self,
        now: Instant,
        id: AssocId,
        from: SocketAddr,
        data: &[u8],
    ) {
        let Some(tun) = self.tun.as_mut() else {
            return;
        };
        let mut packet = std::mem::take(&mut tun.packet);
        if let Some(n) = tun.front.reply(id, from, data, &mut packet, now) {
            tun.write(&packet[..n]);
        }
        tun.packet = packet;
    }

    /// Accepts reflected connections on listener `i`: each becomes a local connection waiting
    /// for a stream to its original destination.
    pub(super) fn tun_accept(&mut self, now: Instant, i: usize) {
        loop {
            let Some(tun) = self.tun.as_mut() else {
                return;
            };
            let Some(listener) = tun.listeners.get(i) else {
                return;
            };
            let Some((sock, peer)) = super::accept_next(listener, "TUN listener") else {
                return;
            };
            let Some(dest) = tun.front.accepted(peer) else {
                continue; // not a reflected connection (someone connected to the device address)
            };
            self.admit_captured(now, sock, peer, dest, Capture::Tun);
        }
    }

    /// A captured connection from `peer` is gone: its NAT entry may expire.
    pub(super) fn tun_closed(&mut self, now: Instant, peer: SocketAddr) {
        if let Some(tun) = self.tun.as_mut() {
            tun.front.closed(peer, now);
        }
    }

    /// Flow expiry (once a second) and the routes (kill switch off: only while a session is
    /// up). A failure to install routes is logged and tried again next second.
    pub(super) fn tun_timers(&mut self, now: Instant) {
        let up = self.slots.iter().any(|s| s.state == SlotState::Connected);
        let Some(tun) = self.tun.as_mut() else {
            return;
        };
        let want = (tun.kill_switch || up) && self.shutting_down.is_none();
        // `auto_route: false` installs nothing: nothing to switch (or to log).
        let managed = tun.device.settings().auto_route;
        // The kill switch's routes go in at once (the first call, at start); changes while
        // running are looked at once a second.
        let first = !tun.routes_tried;
        if managed && want != tun.device.routes_installed() && (first || now >= tun.next_expire) {
            tun.routes_tried = true;
            match tun.device.set_routes(want) {
                Ok(()) if want => log::info!("TUN mode: all traffic now goes into the tunnel"),
                Ok(()) => log::info!("TUN mode: no session; traffic goes around the tunnel"),
                Err(e) => log::warn!("TUN mode: {e}"),
            }
        }
        if now < tun.next_expire {
            return;
        }
        tun.next_expire = now + EXPIRE_EVERY;
        let mut forgotten = std::mem::take(&mut tun.forgotten);
        tun.front.expire(now, &mut forgotten);
        for id in forgotten.drain(..) {
            tun.flow_slots.remove(&id);
            let registry = self.core.registry();
            self.direct_udp.forget(id, registry, &mut self.learned);
        }
        tun.forgotten = forgotten;
    }

    /// New `exclude` lists: kept for connections, TUN mode's bypass routes replaced, and the
    /// addresses learned for names no longer excluded forgotten (open connections stay).
    pub(super) fn set_exclude(&mut self, exclude: std::sync::Arc<crate::tunnel::exclude::Exclude>) {
        let forgotten = self.learned.retain_names(|n| exclude.excludes_domain(n));
        log::info!(
            "exclude reloaded: {} address ranges; {forgotten} learned address(es) of names no \
             longer excluded forgotten",
            exclude.ranges().len()
        );
        if let Some(tun) = self.tun.as_mut() {
            let bypass = exclude.ranges().iter().map(|r| r.network()).collect();
            if let Err(e) = tun.device.set_bypass(bypass) {
                log::warn!("TUN mode: {e}");
            }
        }
        self.options.exclude = exclude;
    }

    /// When TUN mode needs the loop again (expiry, a readable device).
    pub(super) fn tun_deadline(&self, now: Instant) -> Option<Instant> {
        let tun = self.tun.as_ref()?;
        Some(if tun.readable { now } else { tun.next_expire })
    }
}
