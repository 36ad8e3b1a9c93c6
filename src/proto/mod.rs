//! The OSTP protocol core: a pure, sans-IO state machine (no sockets, clock reads or global RNG).
pub mod crypto;
pub mod handshake;
pub mod packet;
pub mod psk;
pub mod replay;
pub mod rng;
pub mod sim;
pub mod transport;
