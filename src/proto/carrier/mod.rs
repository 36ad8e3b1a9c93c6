//! The TCP carrier (docs/PROTOCOL.md §7): the same session over one TCP connection where UDP is
//! blocked. [`records`] owns the hello and reply records (masked lengths, bound to each other),
//! [`gate`] the server's decision on a connection's first bytes,
//! [`frames`] the data frames. Sans-IO: the caller owns the socket and its bounded buffers, and
//! nothing here panics on input. Carrier sessions (`Session::new_carrier`) and their handshake
//! live in `session.rs` and `endpoint/` (the loops drive them: `tunnel/server_loop/carrier.rs`, `tunnel/carrier_link.rs`).

pub mod frames;
pub mod gate;
pub mod records;

pub use frames::{
    FRAME_OVERHEAD, FrameError, FrameReader, FrameWriter, MAX_FRAME_PLAINTEXT, OpenedFrame,
};

/// Bytes of the masked length in every record and frame.
pub const LENGTH_LEN: usize = 2;

/// Largest sealed frame on the wire (a caller's frame buffer needs this many bytes).
pub const MAX_FRAME_LEN: usize = MAX_FRAME_PLAINTEXT + FRAME_OVERHEAD;
