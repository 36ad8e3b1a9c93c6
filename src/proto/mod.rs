//! The OSTP protocol core: a pure, sans-IO state machine (no sockets, clock reads or global RNG).
//!
//! Layers, bottom up:
//! - [`crypto`], [`psk`], [`rng`]: the HChaCha20/ChaCha20/(X)ChaCha20-Poly1305 constructions,
//!   access key → PSK, and the driver-seeded DRBG.
//! - [`handshake`]: hello / accept / refusal wire formats.
//! - [`packet`], [`replay`]: data packet protection (rotating tokens, hidden packet numbers, AEAD,
//!   padding) and the replay window.
//! - [`carrier`]: the TCP carrier's framing (masked lengths, implicit frame numbers; §7 of the
//!   protocol; the carrier itself is not wired up yet).
//! - [`transport`]: frames, reliability, congestion control, streams (carried inside packets).
//! - [`session`]: one protected session = packet protection + `Transport`.
//! - [`id_map`]: the deterministic id-keyed hash map used by the endpoint and the stream table,
//!   and the sorted map of increasing ids the server loop keeps its sessions in.
//! - [`endpoint`]: the server endpoint (users, sessions, roaming, caps, rate limits) and the client
//!   connector — the API the data plane drives.
//!
//! The wire format is specified in `docs/PROTOCOL.md`.
pub mod carrier;
pub mod crypto;
pub mod endpoint;
#[cfg(any(test, feature = "test-util"))]
#[doc(hidden)]
pub mod fuzz_support;
pub mod handshake;
pub mod id_map;
pub mod packet;
pub mod psk;
pub mod replay;
pub mod rng;
pub mod session;
#[cfg(any(test, feature = "test-util"))]
pub mod sim;
pub mod transport;

pub use endpoint::{
    ClientEvent, ClientSession, ConnectorConfig, EndpointConfig, EndpointEvent, EndpointStats,
    ServerEndpoint, SessionId, SocketIndex, Transmit, UserId, UserState,
};
pub use handshake::RefuseReason;
pub use packet::PaddingPolicy;
pub use session::{Batch, SecureStats, Session, SessionConfig};
