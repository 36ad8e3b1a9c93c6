//! The TCP carrier's hello and reply records (docs/PROTOCOL.md §7.1, §7.3): the datagram
//! handshake's plaintexts, sealed with a keystream-masked length after the nonce so that a reader
//! of the byte stream can find the record's end, and nothing on the wire is a plain length.

use super::LENGTH_LEN;
use crate::proto::crypto::{
    HandshakeAead, Key32, TAG_LEN, XNONCE_LEN, keystream_block, label, prf_labeled,
};
use crate::proto::handshake::{
    self, ACCEPT_PLAIN, HELLO_CT, HELLO_PLAIN, HELLO_TAG_LEN, HandshakeError, Hello, MAX_HELLO,
    MAX_REPLY, REFUSE_PLAIN, Reply,
};
use crate::proto::rng::Drbg;

/// Bytes of a hello record before its sealed part: tag, nonce, masked length.
pub const HELLO_HEAD: usize = HELLO_CT + LENGTH_LEN;
/// Bytes of a reply record before its sealed part: nonce, masked length.
pub const REPLY_HEAD: usize = XNONCE_LEN + LENGTH_LEN;
/// Sealed length of a hello record (plaintext + tag), smallest and largest.
const HELLO_SEALED: std::ops::RangeInclusive<usize> = HELLO_PLAIN + TAG_LEN..=MAX_HELLO - HELLO_CT;
/// Sealed length of a reply record, smallest and largest.
const REPLY_SEALED: std::ops::RangeInclusive<usize> =
    REFUSE_PLAIN + TAG_LEN..=MAX_REPLY - XNONCE_LEN;
/// Largest hello record.
pub const MAX_HELLO_RECORD: usize = HELLO_CT + LENGTH_LEN + (MAX_HELLO - HELLO_CT);
/// Largest reply record.
pub const MAX_REPLY_RECORD: usize = REPLY_HEAD + (MAX_REPLY - XNONCE_LEN);

/// What the client keeps of a hello record to open the reply.
#[derive(Clone)]
pub struct SentHelloRecord {
    /// The record's first [`HELLO_HEAD`] bytes, bound into the reply.
    pub head: [u8; HELLO_HEAD],
    /// The hello content.
    pub hello: Hello,
}

fn mask(key: &Key32, label: &[u8; 8], nonce: &[u8]) -> u16 {
    let mut n = [0u8; 12];
    n.copy_from_slice(&nonce[..12]);
    let block = keystream_block(&prf_labeled(key, label, 0), &n, 0);
    u16::from_le_bytes([block[0], block[1]])
}

/// The length mask of a hello record: the user's hello key and the record's nonce.
pub fn hello_length_mask(hello_key: &Key32, nonce: &[u8; XNONCE_LEN]) -> u16 {
    mask(hello_key, label::HELLO_LEN, nonce)
}

/// The length mask of a reply record: the hello's reply key and the reply's nonce.
pub fn reply_length_mask(reply_key: &Key32, nonce: &[u8; XNONCE_LEN]) -> u16 {
    mask(reply_key, label::REPLY_LEN, nonce)
}

fn nonce_of(bytes: &[u8]) -> [u8; XNONCE_LEN] {
    let mut n = [0u8; XNONCE_LEN];
    n.copy_from_slice(&bytes[..XNONCE_LEN]);
    n
}

/// Writes a hello record for `(epoch, slot)` into `out` (at least [`MAX_HELLO_RECORD`] bytes);
/// returns its length and what opening the reply needs.
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
) -> Option<(usize, SentHelloRecord)> {
    let pad = rng.up_to(u32::from(pad_max)) as usize;
    let sealed = (HELLO_PLAIN + pad + TAG_LEN).min(*HELLO_SEALED.end());
    let record = out.get_mut(..HELLO_HEAD + sealed)?;
    record[..HELLO_TAG_LEN]
        .copy_from_slice(&handshake::hello_tag(tag_key, epoch, slot).to_le_bytes());
    let mut nonce = [0u8; XNONCE_LEN];
    rng.fill(&mut nonce);
    record[HELLO_TAG_LEN..HELLO_CT].copy_from_slice(&nonce);
    let masked = sealed as u16 ^ hello_length_mask(hello_key, &nonce);
    record[HELLO_CT..HELLO_HEAD].copy_from_slice(&masked.to_le_bytes());
    let (head, rest) = record.split_at_mut(HELLO_HEAD);
    let (plain, tag_out) = rest.split_at_mut(sealed - TAG_LEN);
    handshake::encode_hello(plain, hello);
    tag_out.copy_from_slice(&HandshakeAead::new(hello_key).seal(&nonce, head, plain));
    let mut kept = [0u8; HELLO_HEAD];
    kept.copy_from_slice(head);
    Some((
        HELLO_HEAD + sealed,
        SentHelloRecord {
            head: kept,
            hello: *hello,
        },
    ))
}

/// The whole length of a hello record from its first [`HELLO_HEAD`] bytes, once its tag has
/// found the user (`hello_key`); `None` when the length is out of range (not a hello).
pub fn hello_record_len(hello_key: &Key32, head: &[u8; HELLO_HEAD]) -> Option<usize> {
    let nonce = nonce_of(&head[HELLO_TAG_LEN..]);
    let sealed = usize::from(
        u16::from_le_bytes([head[HELLO_CT], head[HELLO_CT + 1]])
            ^ hello_length_mask(hello_key, &nonce),
    );
    HELLO_SEALED
        .contains(&sealed)
        .then_some(HELLO_HEAD + sealed)
}

/// Authenticates and decodes a whole hello record (as long as [`hello_record_len`] said),
/// decrypting in place; returns the hello and the record's head (for the reply).
pub fn open_hello(
    hello_key: &Key32,
    record: &mut [u8],
) -> Result<(Hello, [u8; HELLO_HEAD]), HandshakeError> {
    let head: [u8; HELLO_HEAD] = record
        .get(..HELLO_HEAD)
        .and_then(|h| h.try_into().ok())
        .ok_or(HandshakeError::BadLength)?;
    if hello_record_len(hello_key, &head) != Some(record.len()) {
        return Err(HandshakeError::BadLength);
    }
    let (aad, rest) = record.split_at_mut(HELLO_HEAD);
    let (plain, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
    let mut tag_bytes = [0u8; TAG_LEN];
    tag_bytes.copy_from_slice(tag);
    let nonce = nonce_of(&aad[HELLO_TAG_LEN..]);
    HandshakeAead::new(hello_key)
        .open(&nonce, aad, plain, &tag_bytes)
        .map_err(|_| HandshakeError::BadAuth)?;
    Ok((handshake::decode_hello(plain)?, head))
}

/// The reply's AAD: the hello record's head, then the reply's own head.
fn reply_aad(hello_head: &[u8; HELLO_HEAD], reply_head: &[u8]) -> [u8; HELLO_HEAD + REPLY_HEAD] {
    let mut aad = [0u8; HELLO_HEAD + REPLY_HEAD];
    aad[..HELLO_HEAD].copy_from_slice(hello_head);
    aad[HELLO_HEAD..].copy_from_slice(&reply_head[..REPLY_HEAD]);
    aad
}

/// Writes the reply record to the hello record whose head is `hello_head` into `out` (at least
/// [`MAX_REPLY_RECORD`] bytes); returns its length.
pub fn write_reply(
    psk: &Key32,
    hello_head: &[u8; HELLO_HEAD],
    hello: &Hello,
    reply: &Reply,
    pad_max: u16,
    rng: &mut Drbg,
    out: &mut [u8],
) -> Option<usize> {
    let pad = rng.up_to(u32::from(pad_max)) as usize;
    let sealed = (handshake::reply_plain_len(reply) + pad + TAG_LEN).min(*REPLY_SEALED.end());
    let record = out.get_mut(..REPLY_HEAD + sealed)?;
    let mut nonce = [0u8; XNONCE_LEN];
    rng.fill(&mut nonce);
    let key = handshake::reply_key(psk, &hello.client_random);
    record[..XNONCE_LEN].copy_from_slice(&nonce);
    let masked = sealed as u16 ^ reply_length_mask(&key, &nonce);
    record[XNONCE_LEN..REPLY_HEAD].copy_from_slice(&masked.to_le_bytes());
    let (head, rest) = record.split_at_mut(REPLY_HEAD);
    let (plain, tag_out) = rest.split_at_mut(sealed - TAG_LEN);
    handshake::encode_reply(plain, reply);
    let aad = reply_aad(hello_head, head);
    tag_out.copy_from_slice(&HandshakeAead::new(&key).seal(&nonce, &aad, plain));
    Some(REPLY_HEAD + sealed)
}

/// The whole length of a reply record from its first [`REPLY_HEAD`] bytes; `None` when out of
/// range (not a reply).
pub fn reply_record_len(reply_key: &Key32, head: &[u8; REPLY_HEAD]) -> Option<usize> {
    let nonce = nonce_of(head);
    let sealed = usize::from(
        u16::from_le_bytes([head[XNONCE_LEN], head[XNONCE_LEN + 1]])
            ^ reply_length_mask(reply_key, &nonce),
    );
    REPLY_SEALED
        .contains(&sealed)
        .then_some(REPLY_HEAD + sealed)
}

/// Authenticates and decodes a whole reply record to `sent` (`reply_key` precomputed).
pub fn open_reply(
    reply_key: &Key32,
    sent: &SentHelloRecord,
    record: &[u8],
) -> Result<Reply, HandshakeError> {
    let head: [u8; REPLY_HEAD] = record
        .get(..REPLY_HEAD)
        .and_then(|h| h.try_into().ok())
        .ok_or(HandshakeError::BadLength)?;
    if reply_record_len(reply_key, &head) != Some(record.len()) {
        return Err(HandshakeError::BadLength);
    }
    let mut buf = [0u8; MAX_REPLY_RECORD];
    let buf = &mut buf[..record.len()];
    buf.copy_from_slice(record);
    let (head_bytes, rest) = buf.split_at_mut(REPLY_HEAD);
    let (plain, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
    let mut tag_bytes = [0u8; TAG_LEN];
    tag_bytes.copy_from_slice(tag);
    let aad = reply_aad(&sent.head, head_bytes);
    HandshakeAead::new(reply_key)
        .open(&nonce_of(head_bytes), &aad, plain, &tag_bytes)
        .map_err(|_| HandshakeError::BadAuth)?;
    let reply = handshake::decode_reply(plain)?;
    if matches!(reply, Reply::Accept { .. }) && plain.len() < ACCEPT_PLAIN {
        return Err(HandshakeError::BadFormat);
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::psk::UserKeys;

    fn keys() -> UserKeys {
        UserKeys::from_access_key("abcdefghijklmnop_0123").unwrap()
    }

    fn hello() -> Hello {
        Hello {
            unix_secs: 1_700_000_000,
            client_random: [9; 32],
            max_datagram: 16_384,
        }
    }

    fn hello_record(k: &UserKeys, pad_max: u16, seed: u8) -> (Vec<u8>, SentHelloRecord) {
        let mut rng = Drbg::new([seed; 32]);
        let mut out = [0u8; MAX_HELLO_RECORD];
        let (n, sent) = write_hello(
            &k.hello_key,
            &k.tag_key,
            5,
            3,
            &hello(),
            pad_max,
            &mut rng,
            &mut out,
        )
        .unwrap();
        (out[..n].to_vec(), sent)
    }

    #[test]
    fn hello_and_reply_records_round_trip_and_bind_to_each_other() {
        let k = keys();
        let (record, sent) = hello_record(&k, 320, 1);
        assert_eq!(
            u64::from_le_bytes(record[..8].try_into().unwrap()),
            handshake::hello_tag(&k.tag_key, 5, 3)
        );
        let head: [u8; HELLO_HEAD] = record[..HELLO_HEAD].try_into().unwrap();
        assert_eq!(
            hello_record_len(&k.hello_key, &head),
            Some(record.len()),
            "the length is found from the head"
        );
        let mut copy = record.clone();
        let (got, got_head) = open_hello(&k.hello_key, &mut copy).unwrap();
        assert_eq!((got, got_head), (hello(), sent.head));
        for reply in [
            Reply::Accept {
                server_unix_secs: 1,
                server_random: [4; 32],
                max_datagram: 8192,
            },
            Reply::Refuse {
                server_unix_secs: 2,
                reason: handshake::RefuseReason::Disabled,
                retry_after_secs: 60,
            },
        ] {
            let mut rng = Drbg::new([2; 32]);
            let mut out = [0u8; MAX_REPLY_RECORD];
            let n = write_reply(&k.psk, &got_head, &got, &reply, 200, &mut rng, &mut out).unwrap();
            let rk = handshake::reply_key(&k.psk, &hello().client_random);
            let rhead: [u8; REPLY_HEAD] = out[..REPLY_HEAD].try_into().unwrap();
            assert_eq!(reply_record_len(&rk, &rhead), Some(n));
            assert_eq!(open_reply(&rk, &sent, &out[..n]), Ok(reply));
            // Bound to its hello: another hello's head does not open it.
            let mut other = sent.clone();
            other.head[20] ^= 1;
            assert_eq!(
                open_reply(&rk, &other, &out[..n]),
                Err(HandshakeError::BadAuth)
            );
        }
    }

    #[test]
    fn lengths_are_masked_and_sizes_vary() {
        let k = keys();
        let mut lens = std::collections::HashSet::new();
        let mut length_fields = std::collections::HashSet::new();
        for seed in 0..40 {
            let (record, _) = hello_record(&k, 320, seed);
            lens.insert(record.len());
            length_fields.insert([record[HELLO_CT], record[HELLO_CT + 1]]);
            let sealed = ((record.len() - HELLO_HEAD) as u16).to_le_bytes();
            assert_ne!(
                [record[HELLO_CT], record[HELLO_CT + 1]],
                sealed,
                "length in clear"
            );
        }
        assert!(lens.len() > 20 && length_fields.len() > 30);
    }

    #[test]
    fn wrong_keys_modified_bytes_and_bad_lengths_are_refused_without_panic() {
        let k = keys();
        let (record, _) = hello_record(&k, 100, 3);
        let other = UserKeys::from_access_key("ZZZZZZZZZZZZZZZZZZZZ").unwrap();
        let head: [u8; HELLO_HEAD] = record[..HELLO_HEAD].try_into().unwrap();
        // Another user's key finds another (almost always invalid) length and never opens it.
        let mut copy = record.clone();
        assert!(open_hello(&other.hello_key, &mut copy).is_err());
        let _ = hello_record_len(&other.hello_key, &head);
        // A modified length or body.
        for at in [HELLO_CT, HELLO_CT + 1, HELLO_HEAD + 3, record.len() - 1] {
            let mut bad = record.clone();
            bad[at] ^= 0x10;
            assert!(open_hello(&k.hello_key, &mut bad).is_err(), "byte {at}");
        }
        // Truncated or extended records, and garbage of every short length.
        for len in [0, 1, HELLO_HEAD - 1, HELLO_HEAD, record.len() - 1] {
            let mut short = record[..len].to_vec();
            assert!(open_hello(&k.hello_key, &mut short).is_err(), "{len}");
        }
        let mut long = record.clone();
        long.push(0);
        assert_eq!(
            open_hello(&k.hello_key, &mut long),
            Err(HandshakeError::BadLength)
        );
        let rk = handshake::reply_key(&k.psk, &hello().client_random);
        let sent = hello_record(&k, 0, 4).1;
        for len in [0, 5, REPLY_HEAD, 200] {
            assert!(open_reply(&rk, &sent, &vec![0xAB; len]).is_err());
        }
    }
}
