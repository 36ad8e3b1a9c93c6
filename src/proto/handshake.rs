//! Handshake wire formats: client hello, server accept and server refusal (one round trip).
//!
//! ```text
//! Hello (client → server), 92 + pad bytes:
//!   0..8    tag     = first 8 bytes of PRF(tag_key, "ostpHTAG" || epoch << 16 | slot)
//!   8..32   nonce   random 24 bytes
//!   32..n-16 XChaCha20-Poly1305(hello_key, nonce, aad = tag) of
//!           0 version=1 | 1 type=1 | 2..4 max_datagram u16 | 4..12 unix_secs u64 |
//!           12..44 client_random | 44.. zero padding
//!   n-16..n tag
//! Reply (server → client), 84 + pad bytes (accept) / 53 + pad (refuse), never longer than the hello:
//!   0..24   nonce   random 24 bytes
//!   24..n-16 XChaCha20-Poly1305(reply_key, nonce, aad = hello[0..32]) of
//!           0 version=1 | 1 type (2 accept, 3 refuse) | 2..10 server unix_secs u64 |
//!           accept: 10..42 server_random | 42..44 max_datagram u16
//!           refuse: 10 reason u8 | 11..13 retry_after_secs u16
//!           then zero padding
//!   n-16..n tag
//! reply_key      = cascade(PSK, "ostpRPLY", client_random)
//! session secret = cascade(PSK, "ostpSESS", client_random || server_random)
//! ```
//! All integers are little-endian. Every byte on the wire is a nonce, a PRF output or ciphertext.

use super::crypto::{
    HandshakeAead, Key32, TAG_LEN, XNONCE_LEN, cascade, halves, label, prf_labeled,
};
use super::rng::Drbg;

/// Protocol version carried in handshake messages.
pub const VERSION: u8 = 1;
/// Length of an epoch in seconds (hello tags rotate per epoch).
pub const EPOCH_SECS: u64 = 120;
/// Accepted difference between the client's and the server's clocks, in seconds.
pub const CLOCK_WINDOW_SECS: u64 = 120;
/// Hello tag slots per user and epoch: `tag(epoch, slot)` for `slot < HELLO_SLOTS`.
pub const HELLO_SLOTS: u16 = 16;
/// Bytes of the hello lookup tag.
pub const HELLO_TAG_LEN: usize = 8;
/// Offset of the hello ciphertext.
pub(crate) const HELLO_CT: usize = HELLO_TAG_LEN + XNONCE_LEN;
/// Bytes of the hello header (tag and nonce) that the reply binds as AAD.
pub const HELLO_HEADER_LEN: usize = HELLO_CT;
/// Fixed hello plaintext bytes (before padding).
pub(crate) const HELLO_PLAIN: usize = 44;

/// Smallest hello on the wire.
pub const MIN_HELLO: usize = HELLO_CT + HELLO_PLAIN + TAG_LEN;
/// Largest hello accepted or produced.
pub const MAX_HELLO: usize = 1200;
/// Fixed reply plaintext bytes of an accept (before padding).
pub(crate) const ACCEPT_PLAIN: usize = 44;
/// Fixed reply plaintext bytes of a refusal (before padding).
pub(crate) const REFUSE_PLAIN: usize = 13;
/// Smallest reply on the wire.
pub const MIN_REPLY: usize = XNONCE_LEN + REFUSE_PLAIN + TAG_LEN;
/// Unpadded length of an accept.
pub const ACCEPT_LEN: usize = XNONCE_LEN + ACCEPT_PLAIN + TAG_LEN;
/// Unpadded length of a refusal.
pub const REFUSE_LEN: usize = MIN_REPLY;
/// Largest reply accepted or produced.
pub const MAX_REPLY: usize = 1200;

const TYPE_HELLO: u8 = 1;
const TYPE_ACCEPT: u8 = 2;
const TYPE_REFUSE: u8 = 3;

/// Why a handshake message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    /// Length outside the allowed range.
    BadLength,
    /// AEAD authentication failed.
    BadAuth,
    /// Unknown version or message type.
    BadFormat,
}

/// Why the server refuses a known user (sent authenticated, so the client can trust and log it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The user already has the maximum number of sessions.
    SessionLimit,
    /// The user is disabled by the operator.
    Disabled,
    /// The server is at its global session cap.
    ServerFull,
    /// The user's traffic quota is exhausted.
    QuotaExceeded,
    /// The user's access has expired.
    Expired,
    /// The user's `max_devices` distinct client addresses already have live sessions.
    DeviceLimit,
    /// A code this version does not know.
    Other(u8),
}

impl RefuseReason {
    /// Wire code.
    pub fn code(self) -> u8 {
        match self {
            RefuseReason::SessionLimit => 1,
            RefuseReason::Disabled => 2,
            RefuseReason::ServerFull => 3,
            RefuseReason::QuotaExceeded => 4,
            RefuseReason::Expired => 5,
            RefuseReason::DeviceLimit => 6,
            RefuseReason::Other(c) => c,
        }
    }

    /// From a wire code.
    pub fn from_code(code: u8) -> Self {
        match code {
            1 => RefuseReason::SessionLimit,
            2 => RefuseReason::Disabled,
            3 => RefuseReason::ServerFull,
            4 => RefuseReason::QuotaExceeded,
            5 => RefuseReason::Expired,
            6 => RefuseReason::DeviceLimit,
            c => RefuseReason::Other(c),
        }
    }
}

impl std::fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefuseReason::SessionLimit => f.write_str("session limit reached"),
            RefuseReason::Disabled => f.write_str("user disabled"),
            RefuseReason::ServerFull => f.write_str("server full"),
            RefuseReason::QuotaExceeded => f.write_str("quota exceeded"),
            RefuseReason::Expired => f.write_str("access expired"),
            RefuseReason::DeviceLimit => f.write_str("device limit reached"),
            RefuseReason::Other(c) => write!(f, "refused (code {c})"),
        }
    }
}

/// Epoch number of a unix time.
pub fn epoch_of(unix_secs: u64) -> u64 {
    unix_secs / EPOCH_SECS
}

/// The hello lookup tag of `(epoch, slot)` for a user (as a little-endian u64).
pub fn hello_tag(tag_key: &Key32, epoch: u64, slot: u16) -> u64 {
    let out = prf_labeled(tag_key, label::HELLO_TAG, (epoch << 16) | u64::from(slot));
    let mut b = [0u8; 8];
    b.copy_from_slice(&out[..8]);
    u64::from_le_bytes(b)
}

/// The authenticated content of a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Client clock (unix seconds).
    pub unix_secs: u64,
    /// Fresh client randomness.
    pub client_random: [u8; 32],
    /// Largest datagram the client will send or accept.
    pub max_datagram: u16,
}

/// What the client must remember about a hello it sent, to open the reply.
#[derive(Clone)]
pub struct SentHello {
    /// `hello[0..32]` (tag and nonce), bound into the reply as AAD.
    pub header: [u8; HELLO_CT],
    /// The hello content.
    pub hello: Hello,
}

/// Writes a hello into `out` (which must hold `MAX_HELLO` bytes); returns its length.
#[allow(clippy::too_many_arguments)]
pub fn write_hello(
    hello_key: &Key32,
    tag_key: &Key32,
    epoch: u64,
    slot: u16,
    hello: &Hello,
    pad_max: u16,
    rng: &mut Drbg,
    out: &mut [u8],
) -> Option<(usize, SentHello)> {
    let pad = rng.up_to(u32::from(pad_max)) as usize;
    let len = (MIN_HELLO + pad).min(MAX_HELLO);
    if out.len() < len {
        return None;
    }
    let packet = &mut out[..len];
    packet[..HELLO_TAG_LEN].copy_from_slice(&hello_tag(tag_key, epoch, slot).to_le_bytes());
    let mut nonce = [0u8; XNONCE_LEN];
    rng.fill(&mut nonce);
    packet[HELLO_TAG_LEN..HELLO_CT].copy_from_slice(&nonce);
    let (head, rest) = packet.split_at_mut(HELLO_CT);
    let plain_len = rest.len() - TAG_LEN;
    let (plain, tag_out) = rest.split_at_mut(plain_len);
    encode_hello(plain, hello);
    let tag = HandshakeAead::new(hello_key).seal(&nonce, &head[..HELLO_TAG_LEN], plain);
    tag_out.copy_from_slice(&tag);
    let mut header = [0u8; HELLO_CT];
    header.copy_from_slice(head);
    Some((
        len,
        SentHello {
            header,
            hello: *hello,
        },
    ))
}

/// Authenticates and decodes a hello whose tag already matched a user, decrypting in place.
/// Returns the hello and its 32-byte header (for binding the reply).
pub fn open_hello(
    hello_key: &Key32,
    packet: &mut [u8],
) -> Result<(Hello, [u8; HELLO_CT]), HandshakeError> {
    if packet.len() < MIN_HELLO || packet.len() > MAX_HELLO {
        return Err(HandshakeError::BadLength);
    }
    let (head, rest) = packet.split_at_mut(HELLO_CT);
    let plain_len = rest.len() - TAG_LEN;
    let (plain, tag) = rest.split_at_mut(plain_len);
    let mut nonce = [0u8; XNONCE_LEN];
    nonce.copy_from_slice(&head[HELLO_TAG_LEN..]);
    let mut tag_bytes = [0u8; TAG_LEN];
    tag_bytes.copy_from_slice(tag);
    HandshakeAead::new(hello_key)
        .open(&nonce, &head[..HELLO_TAG_LEN], plain, &tag_bytes)
        .map_err(|_| HandshakeError::BadAuth)?;
    let hello = decode_hello(plain)?;
    let mut header = [0u8; HELLO_CT];
    header.copy_from_slice(head);
    Ok((hello, header))
}

/// Writes a hello's plaintext (fixed fields, then zero padding) into `plain`
/// (at least [`HELLO_PLAIN`] bytes).
pub(crate) fn encode_hello(plain: &mut [u8], hello: &Hello) {
    plain.fill(0);
    plain[0] = VERSION;
    plain[1] = TYPE_HELLO;
    plain[2..4].copy_from_slice(&hello.max_datagram.to_le_bytes());
    plain[4..12].copy_from_slice(&hello.unix_secs.to_le_bytes());
    plain[12..44].copy_from_slice(&hello.client_random);
}

/// Reads an authenticated hello plaintext.
pub(crate) fn decode_hello(plain: &[u8]) -> Result<Hello, HandshakeError> {
    if plain.len() < HELLO_PLAIN || plain[0] != VERSION || plain[1] != TYPE_HELLO {
        return Err(HandshakeError::BadFormat);
    }
    let mut client_random = [0u8; 32];
    client_random.copy_from_slice(&plain[12..44]);
    let mut unix = [0u8; 8];
    unix.copy_from_slice(&plain[4..12]);
    Ok(Hello {
        max_datagram: u16::from_le_bytes([plain[2], plain[3]]),
        unix_secs: u64::from_le_bytes(unix),
        client_random,
    })
}

/// The server's answer to a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Session accepted.
    Accept {
        /// Server clock (unix seconds), lets the client learn its clock offset.
        server_unix_secs: u64,
        /// Fresh server randomness.
        server_random: [u8; 32],
        /// Largest datagram the server will send or accept.
        max_datagram: u16,
    },
    /// Known user refused.
    Refuse {
        /// Server clock (unix seconds).
        server_unix_secs: u64,
        /// Why.
        reason: RefuseReason,
        /// Suggested back-off before the next attempt.
        retry_after_secs: u16,
    },
}

/// Key of the reply to a hello carrying `client_random`.
pub fn reply_key(psk: &Key32, client_random: &[u8; 32]) -> Key32 {
    let (a, b) = halves(client_random);
    cascade(psk, label::REPLY_KEY, 0, &[a, b])
}

/// The session secret both sides derive after a successful handshake.
pub fn session_secret(psk: &Key32, client_random: &[u8; 32], server_random: &[u8; 32]) -> Key32 {
    let (a, b) = halves(client_random);
    let (c, d) = halves(server_random);
    cascade(psk, label::SESSION, 0, &[a, b, c, d])
}

/// Writes the reply to a hello into `out` (at least `MAX_REPLY` bytes); returns its length.
pub fn write_reply(
    psk: &Key32,
    hello_header: &[u8; HELLO_CT],
    hello: &Hello,
    reply: &Reply,
    pad_max: u16,
    rng: &mut Drbg,
    out: &mut [u8],
) -> Option<usize> {
    let fixed = reply_plain_len(reply);
    let pad = rng.up_to(u32::from(pad_max)) as usize;
    let len = (XNONCE_LEN + fixed + TAG_LEN + pad).min(MAX_REPLY);
    if out.len() < len {
        return None;
    }
    let packet = &mut out[..len];
    let mut nonce = [0u8; XNONCE_LEN];
    rng.fill(&mut nonce);
    packet[..XNONCE_LEN].copy_from_slice(&nonce);
    let rest = &mut packet[XNONCE_LEN..];
    let plain_len = rest.len() - TAG_LEN;
    let (plain, tag_out) = rest.split_at_mut(plain_len);
    encode_reply(plain, reply);
    let key = reply_key(psk, &hello.client_random);
    let tag = HandshakeAead::new(&key).seal(&nonce, hello_header, plain);
    tag_out.copy_from_slice(&tag);
    Some(len)
}

/// Fixed plaintext bytes of `reply` (before padding).
pub(crate) fn reply_plain_len(reply: &Reply) -> usize {
    match reply {
        Reply::Accept { .. } => ACCEPT_PLAIN,
        Reply::Refuse { .. } => REFUSE_PLAIN,
    }
}

/// Writes a reply's plaintext (fixed fields, then zero padding) into `plain` (at least
/// [`reply_plain_len`] bytes).
pub(crate) fn encode_reply(plain: &mut [u8], reply: &Reply) {
    plain.fill(0);
    plain[0] = VERSION;
    match reply {
        Reply::Accept {
            server_unix_secs,
            server_random,
            max_datagram,
        } => {
            plain[1] = TYPE_ACCEPT;
            plain[2..10].copy_from_slice(&server_unix_secs.to_le_bytes());
            plain[10..42].copy_from_slice(server_random);
            plain[42..44].copy_from_slice(&max_datagram.to_le_bytes());
        }
        Reply::Refuse {
            server_unix_secs,
            reason,
            retry_after_secs,
        } => {
            plain[1] = TYPE_REFUSE;
            plain[2..10].copy_from_slice(&server_unix_secs.to_le_bytes());
            plain[10] = reason.code();
            plain[11..13].copy_from_slice(&retry_after_secs.to_le_bytes());
        }
    }
}

/// Authenticates and decodes a reply to `sent` (`reply_key` precomputed by the caller).
/// Works on a copy so the caller's buffer is untouched when it is not a reply.
pub fn open_reply(
    reply_key: &Key32,
    sent: &SentHello,
    packet: &[u8],
) -> Result<Reply, HandshakeError> {
    if packet.len() < MIN_REPLY || packet.len() > MAX_REPLY {
        return Err(HandshakeError::BadLength);
    }
    let mut buf = [0u8; MAX_REPLY];
    let buf = &mut buf[..packet.len()];
    buf.copy_from_slice(packet);
    let (nonce_bytes, rest) = buf.split_at_mut(XNONCE_LEN);
    let plain_len = rest.len() - TAG_LEN;
    let (plain, tag) = rest.split_at_mut(plain_len);
    let mut nonce = [0u8; XNONCE_LEN];
    nonce.copy_from_slice(nonce_bytes);
    let mut tag_bytes = [0u8; TAG_LEN];
    tag_bytes.copy_from_slice(tag);
    HandshakeAead::new(reply_key)
        .open(&nonce, &sent.header, plain, &tag_bytes)
        .map_err(|_| HandshakeError::BadAuth)?;
    decode_reply(plain)
}

/// Reads an authenticated reply plaintext.
pub(crate) fn decode_reply(plain: &[u8]) -> Result<Reply, HandshakeError> {
    if plain.len() < REFUSE_PLAIN || plain[0] != VERSION {
        return Err(HandshakeError::BadFormat);
    }
    let mut unix = [0u8; 8];
    unix.copy_from_slice(&plain[2..10]);
    let server_unix_secs = u64::from_le_bytes(unix);
    match plain[1] {
        TYPE_ACCEPT if plain.len() >= ACCEPT_PLAIN => {
            let mut server_random = [0u8; 32];
            server_random.copy_from_slice(&plain[10..42]);
            Ok(Reply::Accept {
                server_unix_secs,
                server_random,
                max_datagram: u16::from_le_bytes([plain[42], plain[43]]),
            })
        }
        TYPE_REFUSE => Ok(Reply::Refuse {
            server_unix_secs,
            reason: RefuseReason::from_code(plain[10]),
            retry_after_secs: u16::from_le_bytes([plain[11], plain[12]]),
        }),
        _ => Err(HandshakeError::BadFormat),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::psk::UserKeys;

    fn keys() -> UserKeys {
        UserKeys::from_access_key("abcdefghijklmnop_0123").unwrap()
    }

    #[test]
    fn hello_round_trip_and_reply_binding() {
        let k = keys();
        let mut rng = Drbg::new([1; 32]);
        let hello = Hello {
            unix_secs: 1_700_000_000,
            client_random: [9; 32],
            max_datagram: 1350,
        };
        let mut buf = [0u8; MAX_HELLO];
        let (len, sent) = write_hello(
            &k.hello_key,
            &k.tag_key,
            5,
            3,
            &hello,
            200,
            &mut rng,
            &mut buf,
        )
        .unwrap();
        assert_eq!(
            u64::from_le_bytes(buf[..8].try_into().unwrap()),
            hello_tag(&k.tag_key, 5, 3)
        );
        let mut copy = buf;
        let (got, header) = open_hello(&k.hello_key, &mut copy[..len]).unwrap();
        assert_eq!(got, hello);
        assert_eq!(header, sent.header);
        // Another user's key fails.
        let other = UserKeys::from_access_key("ZZZZZZZZZZZZZZZZZZZZ").unwrap();
        let mut copy = buf;
        assert_eq!(
            open_hello(&other.hello_key, &mut copy[..len]),
            Err(HandshakeError::BadAuth)
        );

        let reply = Reply::Accept {
            server_unix_secs: 1,
            server_random: [4; 32],
            max_datagram: 1300,
        };
        let mut out = [0u8; MAX_REPLY];
        let n = write_reply(&k.psk, &header, &got, &reply, 100, &mut rng, &mut out).unwrap();
        let rk = reply_key(&k.psk, &hello.client_random);
        assert_eq!(open_reply(&rk, &sent, &out[..n]), Ok(reply));
        // A reply to a different hello does not open.
        let mut other_sent = sent.clone();
        other_sent.header[9] ^= 1;
        assert_eq!(
            open_reply(&rk, &other_sent, &out[..n]),
            Err(HandshakeError::BadAuth)
        );
    }

    #[test]
    fn refusal_round_trip() {
        let k = keys();
        let mut rng = Drbg::new([2; 32]);
        let hello = Hello {
            unix_secs: 7,
            client_random: [1; 32],
            max_datagram: 1200,
        };
        let mut buf = [0u8; MAX_HELLO];
        let (_, sent) = write_hello(
            &k.hello_key,
            &k.tag_key,
            0,
            0,
            &hello,
            0,
            &mut rng,
            &mut buf,
        )
        .unwrap();
        let reply = Reply::Refuse {
            server_unix_secs: 9,
            reason: RefuseReason::Disabled,
            retry_after_secs: 60,
        };
        let mut out = [0u8; MAX_REPLY];
        let n = write_reply(&k.psk, &sent.header, &hello, &reply, 0, &mut rng, &mut out).unwrap();
        assert_eq!(n, MIN_REPLY);
        assert_eq!(
            open_reply(&reply_key(&k.psk, &hello.client_random), &sent, &out[..n]),
            Ok(reply)
        );
    }

    #[test]
    fn truncated_and_oversized_are_rejected_without_panic() {
        let k = keys();
        for len in [0usize, 1, MIN_HELLO - 1, MAX_HELLO + 1] {
            let mut buf = vec![0u8; len];
            assert_eq!(
                open_hello(&k.hello_key, &mut buf),
                Err(HandshakeError::BadLength)
            );
        }
    }
}
