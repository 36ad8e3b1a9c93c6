//! Server endpoint and client connector: the public face of the protocol core for the data plane.
//!
//! - [`server`]: the server endpoint — user registry, session table keyed by rotating per-packet
//!   tokens (one hash lookup per datagram), roaming, session caps, handshake processing, and
//!   carrier sessions (TCP, docs/PROTOCOL.md §7) in the same session map.
//! - [`hello_tags`]: the epoch and hello-tag table (finds a hello's user in one lookup) and the
//!   record of answered hellos that makes every hello single-use (exported and imported across
//!   restarts).
//! - [`rate_limit`]: the handshake token bucket.
//! - `token_table`: the server's table of registered session tokens (8-byte buckets, sized for
//!   its load).
//! - [`client`]: the client connector (handshake with retries, then one [`Session`]).
//!
//! None of them reads a clock, a socket or a global RNG.
//!
//! [`Session`]: crate::proto::session::Session

use std::fmt;

use super::handshake::{HELLO_TAG_LEN, MAX_HELLO, MIN_HELLO};

#[cfg(test)]
mod carrier_tests;
pub mod client;
pub mod hello_tags;
pub mod rate_limit;
pub mod server;
mod token_table;

pub use super::handshake::HELLO_SLOTS;
pub use client::{ClientEvent, ClientSession, ClientStats, ConnectorConfig};
pub use hello_tags::{ImportedRecord, MAX_HANDSHAKES_PER_EPOCH, MAX_TAGS_PER_USER, RecordError};
pub use server::{
    CarrierDirectory, CarrierHello, EndpointConfig, EndpointEvent, EndpointStats, ServerEndpoint,
    Transmit, UserState,
};

pub use super::id_map::IdHasher;
pub(crate) use super::id_map::IdMap;

/// A user's number, assigned by the operator's user table (`crate::users`), never reused
/// within one process run. The endpoint only uses it as a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(pub u32);

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "user#{}", self.0)
    }
}

/// Index of the local UDP socket a datagram arrived on / must leave from (driver-defined).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketIndex(pub u32);

/// The [`SocketIndex`] a carrier session reports in `ServerEndpoint::session_peer`: it has no
/// UDP socket (it lives on its TCP connection), and no driver socket has this index.
pub const CARRIER_SOCKET: SocketIndex = SocketIndex(u32::MAX);

/// Server-side session handle (never reused within an endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// True if `data` could be a hello by length alone (used by fuzzing and tests).
pub fn plausible_hello_len(len: usize) -> bool {
    (MIN_HELLO..=MAX_HELLO).contains(&len) && len > HELLO_TAG_LEN
}
