//! The data plane: everything between local sockets and the protocol core.
//!
//! Files and what they own:
//! - [`target`]      — parses a client's `host:port` / SOCKS5 domain bytes into the protocol's one
//!   destination type, [`Destination`](crate::proto::transport::Destination), with typed errors.
//! - [`proxy_front`] — sans-IO parser for the client's local proxy port (SOCKS5 and HTTP proxy on one
//!   port), reply builders, and the SOCKS5 UDP request header codec.
//! - [`dest_guard`]  — the server's destination guard: refuses loopback/private/link-local/… and the
//!   server's own addresses (checked after DNS resolution).
//! - [`resolver`]    — a small DNS thread pool that reports results to the event loop via a `mio::Waker`.
//!
//! - [`pipe`]        — the socket ↔ stream byte pump (bounded buffers, backpressure both ways).
//! - [`read_ahead`]  — the policy (sans-IO) of how far pipes read their sockets (destinations on
//!   the server, applications on the client) ahead of what the session's congestion window can
//!   send.
//! - [`slab`]        — stable indices for connections (mio tokens).
//! - [`ledger`]      — the server's per-user traffic policy (sans-IO): budgets, unsynced traffic,
//!   the limit cut and drain, the sync with the user table.
//! - [`hello_record`] — the server's record of answered hellos on disk (survives restarts).
//! - [`server_loop`] — the server's mio event loop: UDP listen sockets, TCP carrier connections
//!   (`server_loop/carrier.rs`), outbound TCP, API control messages; carries out the ledger's
//!   verdicts.
//! - [`carrier_conns`] — the pure types behind TCP carrier connections: bounded buffers, the
//!   deadline heap, the oldest-first bound on strangers, the fallback splice's byte mover.
//! - [`stats`]       — the server loop's counters, published once per second for `GET /metrics`.
//! - [`udp_relay`]   — the server side of SOCKS5 UDP ASSOCIATE.
//! - [`client_loop`] — the client's mio event loop: the local proxy port, tunnel sessions with
//!   reconnects, streams spread over sessions, UDP ASSOCIATE.
//! - [`carrier_choice`] — the client's carrier policy (sans-IO): UDP or the TCP carrier, the
//!   `auto` fall-back to TCP and the UDP probes that move back.
//! - [`carrier_link`] — a client session's TCP carrier connection: socket and bounded buffers.
//! - [`exclude`]     — split routing on the client: destinations (CIDR ranges, domain suffixes)
//!   that bypass the tunnel.
//! - [`dns_wire`]    — a total, read-only view of DNS responses: the question and its A/AAAA
//!   answers (CNAME chains followed), for split routing by name in the capture modes.
//! - [`learned`]     — split routing's learned addresses (sans-IO): excluded names' answers,
//!   TTL-clamped, bounded, held while a direct connection is open.
//! - [`tun`]         — TUN capture: packet views and rewriting, the TCP NAT of the system stack.
//! - [`udp_flows`]   — the capture modes' UDP flows (TUN, router TPROXY) and their association ids.
//! - [`router_rules`] — the nftables ruleset and policy routing of router mode (`--router-rules`).
//! - [`supervisor`]  — the client's session-slot policy (sans-IO): backoff, refusal retries,
//!   liveness replacement, demand retries, request and open timeouts.
//! - [`early_reply`] — the client's early-reply policy (sans-IO): CONNECTs to destinations that
//!   opened recently get their success reply before the server's open result.

pub mod carrier_choice;
pub mod carrier_conns;
pub mod carrier_link;
pub mod client_loop;
pub mod dest_guard;
pub mod dns_wire;
pub mod driver;
pub mod early_reply;
pub mod exclude;
pub mod hello_record;
pub mod learned;
pub mod ledger;
pub mod pipe;
pub mod proxy_front;
pub mod quotas;
pub mod read_ahead;
pub mod resolver;
pub mod router_rules;
pub mod server_loop;
pub mod slab;
pub mod splice;
pub mod stats;
pub mod supervisor;
pub mod target;
pub mod tun;
pub mod udp_flows;
pub mod udp_relay;

use std::io;
use std::net::SocketAddr;

/// Binds a non-blocking mio UDP socket (IPv6 sockets v6-only) with enlarged kernel buffers.
pub fn bind_udp(addr: SocketAddr) -> io::Result<mio::net::UdpSocket> {
    let sock = crate::sys::bind_udp(addr)?;
    sock.set_nonblocking(true)?;
    crate::sys::grow_udp_buffers(&sock, UDP_SOCKET_BUFFER);
    Ok(mio::net::UdpSocket::from_std(sock))
}

/// Kernel buffer requested for tunnel UDP sockets.
pub const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Wall-clock unix seconds (0 before 1970); the one clock read shared with the user table.
pub use crate::users::now_unix as unix_now;

pub use driver::core::poll_wait;
