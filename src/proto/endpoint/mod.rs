//! Server endpoint and client connector: the public face of the protocol core for the data plane.
//!
//! - [`server`]: the server endpoint — user registry, session table keyed by rotating per-packet
//!   tokens (one hash lookup per datagram), roaming, session caps, handshake processing.
//! - [`hello_tags`]: the epoch and hello-tag table (finds a hello's user in one lookup) and the
//!   record of answered hellos that makes every hello single-use.
//! - [`rate_limit`]: the handshake token bucket.
//! - [`client`]: the client connector (handshake with retries, then one [`Session`]).
//!
//! None of them reads a clock, a socket or a global RNG.
//!
//! [`Session`]: crate::proto::session::Session

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::handshake::{HELLO_TAG_LEN, MAX_HELLO, MIN_HELLO};

pub mod client;
pub mod hello_tags;
pub mod rate_limit;
pub mod server;

pub use super::handshake::HELLO_SLOTS;
pub use client::{ClientConfig, ClientEvent, ClientSession, ClientStats};
pub use hello_tags::{MAX_HANDSHAKES_PER_EPOCH, MAX_TAGS_PER_USER};
pub use server::{EndpointEvent, EndpointStats, ServerConfig, ServerEndpoint, Transmit, UserState};

/// Hasher for keys that are already uniformly random (PRF tokens) or small counters:
/// one multiply-xorshift, no per-process key needed because attackers cannot choose the keys.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        let h = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^ (h >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
    fn write_u32(&mut self, v: u32) {
        self.0 ^= u64::from(v);
    }
}

pub(crate) type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// Operator-assigned user number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(pub u32);

/// Index of the local UDP socket a datagram arrived on / must leave from (driver-defined).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketIndex(pub u32);

/// Server-side session handle (never reused within an endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// True if `data` could be a hello by length alone (used by fuzzing and tests).
pub fn plausible_hello_len(len: usize) -> bool {
    (MIN_HELLO..=MAX_HELLO).contains(&len) && len > HELLO_TAG_LEN
}
