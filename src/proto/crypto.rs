//! Cryptographic constructions of OSTP, all built from HChaCha20, ChaCha20 and (X)ChaCha20-Poly1305.
//!
//! This module owns every use of a primitive: the PRF (HChaCha20 keyed with 32 bytes, 16-byte input),
//! the cascade KDF (absorbs fixed-length inputs one PRF call per 16-byte block), the ChaCha20 keystream
//! PRF used for per-packet lookup tokens, and thin in-place AEAD wrappers. No home-made primitives:
//! every construction here is a standard PRF composition with a fixed 8-byte ASCII domain label.

use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use chacha20::{ChaCha20, R20, hchacha};
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};

/// A 256-bit symmetric key.
pub type Key32 = [u8; 32];

/// Length of a Poly1305 authentication tag.
pub const TAG_LEN: usize = 16;
/// Length of an XChaCha20-Poly1305 nonce.
pub const XNONCE_LEN: usize = 24;

/// Domain-separation labels: exactly 8 ASCII bytes each, one per derived value.
pub mod label {
    /// Access key → PSK, first half of the key (bytes 0..32).
    pub const PSK_A: &[u8; 8] = b"ostpPSKa";
    /// Access key → PSK, second half of the key (bytes 32..64).
    pub const PSK_B: &[u8; 8] = b"ostpPSKb";
    /// PSK → hello tag key.
    pub const TAG_KEY: &[u8; 8] = b"ostpTAGK";
    /// PSK → hello AEAD key.
    pub const HELLO_KEY: &[u8; 8] = b"ostpHELO";
    /// Hello tag for (epoch, slot).
    pub const HELLO_TAG: &[u8; 8] = b"ostpHTAG";
    /// PSK + client random → reply AEAD key.
    pub const REPLY_KEY: &[u8; 8] = b"ostpRPLY";
    /// PSK + both randoms → session secret.
    pub const SESSION: &[u8; 8] = b"ostpSESS";
    /// Session secret → client-to-server packet key (generation in the parameter).
    pub const C2S_KEY: &[u8; 8] = b"ostpC2SK";
    /// Session secret → server-to-client packet key (generation in the parameter).
    pub const S2C_KEY: &[u8; 8] = b"ostpS2CK";
    /// Session secret → client-to-server token key.
    pub const C2S_TOKEN: &[u8; 8] = b"ostpC2ST";
    /// Session secret → server-to-client token key.
    pub const S2C_TOKEN: &[u8; 8] = b"ostpS2CT";
    /// Hello key → key of the TCP hello record's length mask.
    pub const HELLO_LEN: &[u8; 8] = b"ostpTLEN";
    /// Reply key → key of the TCP reply record's length mask.
    pub const REPLY_LEN: &[u8; 8] = b"ostpRLEN";
    /// Session secret → client-to-server TCP frame length masks.
    pub const C2S_LEN: &[u8; 8] = b"ostpC2SL";
    /// Session secret → server-to-client TCP frame length masks.
    pub const S2C_LEN: &[u8; 8] = b"ostpS2CL";
    /// Session secret → client-to-server TCP frame key (generation in the parameter).
    pub const C2S_FRAME_KEY: &[u8; 8] = b"ostpC2SF";
    /// Session secret → server-to-client TCP frame key (generation in the parameter).
    pub const S2C_FRAME_KEY: &[u8; 8] = b"ostpS2CF";
}

/// Builds the 16-byte PRF input `label (8 bytes) || param (u64 little-endian)`.
#[inline]
pub fn prf_input(label: &[u8; 8], param: u64) -> [u8; 16] {
    let mut input = [0u8; 16];
    input[..8].copy_from_slice(label);
    input[8..].copy_from_slice(&param.to_le_bytes());
    input
}

/// The PRF: `HChaCha20(key, input)` — 32 bytes out of a 32-byte key and a 16-byte input.
#[inline]
pub fn prf(key: &Key32, input: &[u8; 16]) -> Key32 {
    let out = hchacha::<R20>(key.into(), input.into());
    out.into()
}

/// `prf(key, label || param)`.
#[inline]
pub fn prf_labeled(key: &Key32, label: &[u8; 8], param: u64) -> Key32 {
    prf(key, &prf_input(label, param))
}

/// Cascade KDF: `k0 = prf(key, label || param)`, then `k_{i+1} = prf(k_i, block_i)` for each
/// 16-byte block of `data` (whose length must be a multiple of 16 and is fixed per label).
pub fn cascade(key: &Key32, label: &[u8; 8], param: u64, data: &[&[u8; 16]]) -> Key32 {
    let mut k = prf_labeled(key, label, param);
    for block in data {
        k = prf(&k, block);
    }
    k
}

/// Splits a 32-byte value into its two 16-byte halves (for absorbing it with [`cascade`]).
#[inline]
pub fn halves(value: &[u8; 32]) -> (&[u8; 16], &[u8; 16]) {
    let (a, b) = value.split_at(16);
    // Both halves are exactly 16 bytes by construction.
    (
        a.try_into().unwrap_or(&[0; 16]),
        b.try_into().unwrap_or(&[0; 16]),
    )
}

/// Eight 8-byte lookup tokens for packet numbers `8*block .. 8*block+8` of one generation.
///
/// This is the ChaCha20 keystream (RFC 8439) under `token_key`, nonce `generation (u32 LE) || 0^8`,
/// block counter `block` (< 2^29): ChaCha20 used as a PRF over the block counter.
pub fn token_block(token_key: &Key32, generation: u32, block: u32) -> [u64; 8] {
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&generation.to_le_bytes());
    let bytes = keystream_block(token_key, &nonce, block);
    let mut out = [0u64; 8];
    for (slot, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *slot = u64::from_le_bytes(b);
    }
    out
}

/// One ChaCha20 keystream block (RFC 8439): key `key`, nonce `nonce`, block counter `block`. Used
/// as a PRF over the counter (lookup tokens, TCP-carrier length masks).
pub fn keystream_block(key: &Key32, nonce: &[u8; 12], block: u32) -> [u8; 64] {
    let mut cipher = ChaCha20::new(key.into(), nonce.into());
    cipher.seek(u64::from(block) * 64);
    let mut bytes = [0u8; 64];
    cipher.apply_keystream(&mut bytes);
    bytes
}

/// Packet-number generation: the packet key changes every 2^32 packets.
#[inline]
pub fn generation_of(pn: u64) -> u32 {
    (pn >> 32) as u32
}

/// The lookup token (as written on the wire, little-endian) of packet number `pn`.
pub fn token_for(token_key: &Key32, pn: u64) -> u64 {
    let low = pn as u32;
    token_block(token_key, generation_of(pn), low / 8)[(low % 8) as usize]
}

/// Authentication failed (wrong key, modified bytes, or wrong length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AeadError;

/// ChaCha20-Poly1305 with a 96-bit nonce built from a packet number: `pn (u64 LE) || 0^4`.
#[derive(Clone)]
pub struct PacketAead {
    aead: ChaCha20Poly1305,
}

impl PacketAead {
    /// Creates the AEAD for one key.
    pub fn new(key: &Key32) -> Self {
        PacketAead {
            aead: ChaCha20Poly1305::new(key.into()),
        }
    }

    fn nonce(pn: u64) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&pn.to_le_bytes());
        n
    }

    /// Encrypts `msg` in place and returns the tag.
    pub fn seal(&self, pn: u64, aad: &[u8], msg: &mut [u8]) -> [u8; TAG_LEN] {
        let nonce = Self::nonce(pn);
        match self
            .aead
            .encrypt_inout_detached((&nonce).into(), aad, msg.into())
        {
            Ok(tag) => tag.into(),
            // Only fails for messages longer than 256 GiB, which a datagram never is.
            Err(_) => [0; TAG_LEN],
        }
    }

    /// Decrypts `msg` in place if `tag` authenticates it.
    pub fn open(
        &self,
        pn: u64,
        aad: &[u8],
        msg: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AeadError> {
        let nonce = Self::nonce(pn);
        self.aead
            .decrypt_inout_detached((&nonce).into(), aad, msg.into(), tag.into())
            .map_err(|_| AeadError)
    }
}

/// XChaCha20-Poly1305 with a random 192-bit nonce, used for handshake messages.
pub struct HandshakeAead {
    aead: XChaCha20Poly1305,
}

impl HandshakeAead {
    /// Creates the AEAD for one key.
    pub fn new(key: &Key32) -> Self {
        HandshakeAead {
            aead: XChaCha20Poly1305::new(key.into()),
        }
    }

    /// Encrypts `msg` in place and returns the tag.
    pub fn seal(&self, nonce: &[u8; XNONCE_LEN], aad: &[u8], msg: &mut [u8]) -> [u8; TAG_LEN] {
        match self
            .aead
            .encrypt_inout_detached(nonce.into(), aad, msg.into())
        {
            Ok(tag) => tag.into(),
            Err(_) => [0; TAG_LEN],
        }
    }

    /// Decrypts `msg` in place if `tag` authenticates it.
    pub fn open(
        &self,
        nonce: &[u8; XNONCE_LEN],
        aad: &[u8],
        msg: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AeadError> {
        self.aead
            .decrypt_inout_detached(nonce.into(), aad, msg.into(), tag.into())
            .map_err(|_| AeadError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hchacha_matches_draft_test_vector() {
        // draft-irtf-cfrg-xchacha-03 §2.2.1
        let key: Key32 = core::array::from_fn(|i| i as u8);
        let input: [u8; 16] = [
            0x00, 0x00, 0x00, 0x09, 0x00, 0x00, 0x00, 0x4a, 0x00, 0x00, 0x00, 0x00, 0x31, 0x41,
            0x59, 0x27,
        ];
        let out = prf(&key, &input);
        let expected: [u8; 32] = [
            0x82, 0x41, 0x3b, 0x42, 0x27, 0xb2, 0x7b, 0xfe, 0xd3, 0x0e, 0x42, 0x50, 0x8a, 0x87,
            0x7d, 0x73, 0xa0, 0xf9, 0xe4, 0xd5, 0x8a, 0x74, 0xa8, 0x53, 0xc1, 0x2e, 0xc4, 0x13,
            0x26, 0xd3, 0xec, 0xdc,
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn labels_separate_domains() {
        let key = [7u8; 32];
        assert_ne!(
            prf_labeled(&key, label::C2S_KEY, 0),
            prf_labeled(&key, label::S2C_KEY, 0)
        );
        assert_ne!(
            prf_labeled(&key, label::C2S_KEY, 0),
            prf_labeled(&key, label::C2S_KEY, 1)
        );
        let a = [1u8; 16];
        let b = [2u8; 16];
        assert_ne!(
            cascade(&key, label::SESSION, 0, &[&a, &b]),
            cascade(&key, label::SESSION, 0, &[&b, &a])
        );
    }

    #[test]
    fn token_for_agrees_with_token_block() {
        let key = [9u8; 32];
        let block = token_block(&key, 0, 5);
        for (i, t) in block.iter().enumerate() {
            assert_eq!(token_for(&key, 40 + i as u64), *t);
        }
        assert_ne!(token_for(&key, 3), token_for(&key, (1u64 << 32) + 3));
    }

    #[test]
    fn packet_aead_round_trip_and_rejects_tamper() {
        let aead = PacketAead::new(&[3u8; 32]);
        let mut msg = *b"hello world, this is a payload";
        let tag = aead.seal(42, b"aad", &mut msg);
        assert_ne!(&msg, b"hello world, this is a payload");
        let mut copy = msg;
        aead.open(42, b"aad", &mut copy, &tag).unwrap();
        assert_eq!(&copy, b"hello world, this is a payload");
        let mut copy = msg;
        assert!(aead.open(43, b"aad", &mut copy, &tag).is_err());
        let mut copy = msg;
        copy[0] ^= 1;
        assert!(aead.open(42, b"aad", &mut copy, &tag).is_err());
    }
}
