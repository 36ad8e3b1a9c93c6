//! The TCP carrier's data frames (docs/PROTOCOL.md §7.4): keystream-masked lengths and implicit
//! frame numbers ([`FrameWriter`] seals, [`FrameReader`] finds frame boundaries in a byte stream
//! and opens them).

use super::LENGTH_LEN;
use crate::proto::crypto::{Key32, TAG_LEN, keystream_block, prf_labeled};
use crate::proto::packet::{Direction, GenerationKeys};

/// Largest frame plaintext either side may ever announce (the negotiated limit is at most this).
pub const MAX_FRAME_PLAINTEXT: usize = 16 * 1024;
/// Bytes a frame adds around its plaintext (masked length + AEAD tag).
pub const FRAME_OVERHEAD: usize = LENGTH_LEN + TAG_LEN;
/// Frame masks in one ChaCha20 block.
const MASKS_PER_BLOCK: u64 = 32;

/// Why a frame could not be read. Either way the connection is no longer interpreted (§7.4:
/// read and discard until a random deadline, then close); the reader stays failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The unmasked length is outside `17 ..= limit + 16`.
    Length,
    /// The frame did not authenticate (modified, dropped or reordered bytes, wrong keys).
    Auth,
    /// An earlier frame failed.
    Failed,
}

/// The length masks of one direction's frames, one ChaCha20 block per 32 frames (cached).
struct LengthMasks {
    key: Key32,
    /// `n / 32` of the cached block, `u64::MAX` when empty.
    block_id: u64,
    block: [u8; 64],
}

impl LengthMasks {
    fn new(secret: &Key32, direction: Direction) -> Self {
        LengthMasks {
            key: prf_labeled(secret, direction.length_label(), 0),
            block_id: u64::MAX,
            block: [0; 64],
        }
    }

    fn mask(&mut self, n: u64) -> u16 {
        let id = n / MASKS_PER_BLOCK;
        if id != self.block_id {
            let mut nonce = [0u8; 12];
            nonce[..4].copy_from_slice(&((n >> 32) as u32).to_le_bytes());
            self.block = keystream_block(&self.key, &nonce, (n as u32) / MASKS_PER_BLOCK as u32);
            self.block_id = id;
        }
        let at = 2 * (n % MASKS_PER_BLOCK) as usize;
        u16::from_le_bytes([self.block[at], self.block[at + 1]])
    }
}

/// Seals the frames of one direction, numbering them 0, 1, 2, … .
pub struct FrameWriter {
    keys: GenerationKeys,
    masks: LengthMasks,
    next: u64,
}

impl FrameWriter {
    /// Writer of `direction`'s frames from the session secret.
    pub fn new(secret: &Key32, direction: Direction) -> Self {
        FrameWriter {
            keys: GenerationKeys::new(secret, direction.frame_key_label()),
            masks: LengthMasks::new(secret, direction),
            next: 0,
        }
    }

    /// Seals in place: `out[LENGTH_LEN .. LENGTH_LEN + plaintext_len]` holds the (padded)
    /// plaintext; writes the masked length before it and the tag after it and returns the frame's
    /// length. `None` (nothing written, no number used) if the plaintext is empty, longer than
    /// [`MAX_FRAME_PLAINTEXT`], or `out` too small.
    pub fn seal(&mut self, out: &mut [u8], plaintext_len: usize) -> Option<usize> {
        if plaintext_len == 0 || plaintext_len > MAX_FRAME_PLAINTEXT {
            return None;
        }
        let total = plaintext_len + FRAME_OVERHEAD;
        let frame = out.get_mut(..total)?;
        let n = self.next;
        let sealed_len = (plaintext_len + TAG_LEN) as u16;
        let (head, rest) = frame.split_at_mut(LENGTH_LEN);
        head.copy_from_slice(&(sealed_len ^ self.masks.mask(n)).to_le_bytes());
        let (body, tail) = rest.split_at_mut(plaintext_len);
        let tag = self.keys.aead_for(n).seal(n, head, body);
        tail.copy_from_slice(&tag);
        self.next += 1;
        Some(total)
    }

    /// Frames sealed so far (the next frame's number).
    pub fn frames(&self) -> u64 {
        self.next
    }
}

/// A frame [`FrameReader::open`] found and opened at the front of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedFrame {
    /// Bytes of the buffer the frame took (consume them).
    pub len: usize,
    /// Where its plaintext is in the buffer (decrypted in place).
    pub plaintext: std::ops::Range<usize>,
}

/// Finds and opens the frames of one direction in the received byte stream.
pub struct FrameReader {
    keys: GenerationKeys,
    masks: LengthMasks,
    next: u64,
    /// Largest sealed length (plaintext limit + tag) accepted.
    max_sealed: usize,
    /// Sealed length of the frame at the front, once its length bytes were read.
    pending: Option<usize>,
    failed: bool,
}

impl FrameReader {
    /// Reader of `direction`'s frames; `plaintext_limit` is the negotiated frame plaintext limit
    /// (clamped to 1 ..= [`MAX_FRAME_PLAINTEXT`]).
    pub fn new(secret: &Key32, direction: Direction, plaintext_limit: usize) -> Self {
        FrameReader {
            keys: GenerationKeys::new(secret, direction.frame_key_label()),
            masks: LengthMasks::new(secret, direction),
            next: 0,
            max_sealed: plaintext_limit.clamp(1, MAX_FRAME_PLAINTEXT) + TAG_LEN,
            pending: None,
            failed: false,
        }
    }

    /// The most bytes one frame can take: a receive buffer this large always makes progress.
    pub fn max_frame_len(&self) -> usize {
        LENGTH_LEN + self.max_sealed
    }

    /// Opens the frame at the front of `buf` in place. `Ok(None)`: more bytes are needed (at
    /// most [`FrameReader::max_frame_len`] in all). A length out of range fails as soon as its two
    /// bytes are there; after any failure every call fails.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<Option<OpenedFrame>, FrameError> {
        if self.failed {
            return Err(FrameError::Failed);
        }
        let sealed = match self.pending {
            Some(sealed) => sealed,
            None => {
                let Some(head) = buf.get(..LENGTH_LEN) else {
                    return Ok(None);
                };
                let masked = u16::from_le_bytes([head[0], head[1]]);
                let sealed = usize::from(masked ^ self.masks.mask(self.next));
                if sealed <= TAG_LEN || sealed > self.max_sealed {
                    return Err(self.fail(FrameError::Length));
                }
                self.pending = Some(sealed);
                sealed
            }
        };
        let total = LENGTH_LEN + sealed;
        let Some(frame) = buf.get_mut(..total) else {
            return Ok(None);
        };
        let (head, rest) = frame.split_at_mut(LENGTH_LEN);
        let (body, tag) = rest.split_at_mut(sealed - TAG_LEN);
        let mut tag_bytes = [0u8; TAG_LEN];
        tag_bytes.copy_from_slice(tag);
        let n = self.next;
        if self
            .keys
            .aead_for(n)
            .open(n, head, body, &tag_bytes)
            .is_err()
        {
            return Err(self.fail(FrameError::Auth));
        }
        self.next += 1;
        self.pending = None;
        Ok(Some(OpenedFrame {
            len: total,
            plaintext: LENGTH_LEN..total - TAG_LEN,
        }))
    }

    fn fail(&mut self, error: FrameError) -> FrameError {
        self.failed = true;
        error
    }

    /// Frames opened so far.
    pub fn frames(&self) -> u64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::rng::Drbg;

    const SECRET: Key32 = [42; 32];
    const DIR: Direction = Direction::ClientToServer;

    /// Seals `plaintexts` into one byte stream.
    fn stream_of(writer: &mut FrameWriter, plaintexts: &[Vec<u8>]) -> Vec<u8> {
        let mut stream = Vec::new();
        for p in plaintexts {
            let mut frame = vec![0u8; p.len() + FRAME_OVERHEAD];
            frame[LENGTH_LEN..LENGTH_LEN + p.len()].copy_from_slice(p);
            let n = writer.seal(&mut frame, p.len()).unwrap();
            stream.extend_from_slice(&frame[..n]);
        }
        stream
    }

    /// Feeds `stream` to a reader in chunks of `chunk` bytes, as a socket would deliver it; every
    /// byte must end up in an opened frame.
    fn read_all(
        reader: &mut FrameReader,
        stream: &[u8],
        chunk: usize,
    ) -> Result<Vec<Vec<u8>>, FrameError> {
        let (frames, left) = read_some(reader, stream, chunk)?;
        assert_eq!(left, 0, "bytes left over");
        Ok(frames)
    }

    /// The frames opened from `stream`, and how many bytes wait for more.
    fn read_some(
        reader: &mut FrameReader,
        stream: &[u8],
        chunk: usize,
    ) -> Result<(Vec<Vec<u8>>, usize), FrameError> {
        let mut buf: Vec<u8> = Vec::new();
        let mut out = Vec::new();
        for piece in stream.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(f) = reader.open(&mut buf)? {
                out.push(buf[f.plaintext.clone()].to_vec());
                buf.drain(..f.len);
            }
        }
        Ok((out, buf.len()))
    }

    fn plaintexts() -> Vec<Vec<u8>> {
        [1usize, 2, 100, 1350, 4000, MAX_FRAME_PLAINTEXT, 7, 16_000]
            .iter()
            .enumerate()
            .map(|(i, &len)| (0..len).map(|b| (b * 7 + i) as u8).collect())
            .collect()
    }

    #[test]
    fn frames_round_trip_through_any_chunking() {
        let pts = plaintexts();
        for chunk in [1, 2, 3, 17, 1000, 1 << 20] {
            let stream = stream_of(&mut FrameWriter::new(&SECRET, DIR), &pts);
            let mut reader = FrameReader::new(&SECRET, DIR, MAX_FRAME_PLAINTEXT);
            assert_eq!(
                read_all(&mut reader, &stream, chunk),
                Ok(pts.clone()),
                "{chunk}"
            );
            assert_eq!(reader.frames(), pts.len() as u64);
        }
    }

    #[test]
    fn no_length_or_size_is_visible_in_clear() {
        // Equal plaintext lengths give unrelated length bytes (the mask changes per frame), and
        // no frame starts with its own length in clear.
        let mut writer = FrameWriter::new(&SECRET, DIR);
        let pts: Vec<Vec<u8>> = (0..64).map(|_| vec![0u8; 1000]).collect();
        let stream = stream_of(&mut writer, &pts);
        let frame_len = 1000 + FRAME_OVERHEAD;
        let heads: std::collections::HashSet<[u8; 2]> =
            stream.chunks(frame_len).map(|f| [f[0], f[1]]).collect();
        assert!(heads.len() > 60, "{} distinct length fields", heads.len());
        let clear = ((1000 + TAG_LEN) as u16).to_le_bytes();
        assert!(stream.chunks(frame_len).filter(|f| f[..2] == clear).count() <= 1);
        // The two directions (and another session) mask differently.
        let mut other = FrameWriter::new(&SECRET, Direction::ServerToClient);
        assert_ne!(stream_of(&mut other, &pts[..1])[..2], stream[..2]);
    }

    #[test]
    fn a_length_out_of_range_fails_at_once_and_the_reader_stays_failed() {
        let pts = plaintexts();
        let stream = stream_of(&mut FrameWriter::new(&SECRET, DIR), &pts[2..3]);
        // A 100-byte frame against a 50-byte limit: refused from its two length bytes alone.
        let mut small = FrameReader::new(&SECRET, DIR, 50);
        let mut head = stream[..2].to_vec();
        assert_eq!(small.open(&mut head), Err(FrameError::Length));
        let mut rest = stream.clone();
        assert_eq!(small.open(&mut rest), Err(FrameError::Failed));
        // Lengths outside 17..=limit+16 are refused with two bytes, those inside wait for more.
        let mask = LengthMasks::new(&SECRET, DIR).mask(0);
        for (unmasked, refused) in [
            (0u16, true),
            (16, true),
            (17, false),
            (1366, false),
            (1367, true),
            (u16::MAX, true),
        ] {
            let mut r = FrameReader::new(&SECRET, DIR, 1350);
            let mut b = (unmasked ^ mask).to_le_bytes().to_vec();
            let want = if refused {
                Err(FrameError::Length)
            } else {
                Ok(None)
            };
            assert_eq!(r.open(&mut b), want, "length {unmasked}");
        }
    }

    #[test]
    fn modified_dropped_or_reordered_bytes_fail_authentication() {
        let pts = plaintexts();
        let stream = stream_of(&mut FrameWriter::new(&SECRET, DIR), &pts[..3]);
        let first = pts[0].len() + FRAME_OVERHEAD;
        let second = pts[1].len() + FRAME_OVERHEAD;
        // A flipped ciphertext bit.
        let mut bad = stream.clone();
        bad[first + LENGTH_LEN] ^= 1;
        let mut r = FrameReader::new(&SECRET, DIR, MAX_FRAME_PLAINTEXT);
        assert_eq!(read_all(&mut r, &bad, 1 << 20), Err(FrameError::Auth));
        // A dropped frame: the next one is opened under the wrong number.
        let mut dropped = stream[..first].to_vec();
        dropped.extend_from_slice(&stream[first + second..]);
        let mut r = FrameReader::new(&SECRET, DIR, MAX_FRAME_PLAINTEXT);
        match read_some(&mut r, &dropped, 1 << 20) {
            Ok((frames, _)) => assert_eq!(frames, pts[..1], "only the frame before the gap"),
            Err(e) => assert_ne!(e, FrameError::Failed),
        }
        // A flipped length bit: a wrong boundary never authenticates.
        let mut bad = stream.clone();
        bad[0] ^= 4;
        let mut r = FrameReader::new(&SECRET, DIR, MAX_FRAME_PLAINTEXT);
        let mut buf = bad.clone();
        assert!(matches!(r.open(&mut buf), Err(_) | Ok(None)));
        // The wrong direction's keys.
        let mut r = FrameReader::new(&SECRET, Direction::ServerToClient, MAX_FRAME_PLAINTEXT);
        if let Ok((frames, _)) = read_some(&mut r, &stream, 1 << 20) {
            assert!(frames.is_empty(), "opened with the wrong keys");
        }
    }

    /// Frames have their own keys: frame n and datagram n of a session (same secret, same
    /// number) never share a key and nonce.
    #[test]
    fn frame_keys_are_not_the_datagram_keys() {
        use crate::proto::crypto::{PacketAead, label, prf_labeled};
        let mut writer = FrameWriter::new(&SECRET, DIR);
        let mut frame = vec![0u8; 64 + FRAME_OVERHEAD];
        writer.seal(&mut frame, 64).unwrap();
        let datagram_key = prf_labeled(&SECRET, label::C2S_KEY, 0);
        let mut body = vec![0u8; 64];
        let tag = PacketAead::new(&datagram_key).seal(0, &frame[..LENGTH_LEN], &mut body);
        assert_ne!(body, frame[LENGTH_LEN..LENGTH_LEN + 64]);
        assert_ne!(tag[..], frame[LENGTH_LEN + 64..]);
    }

    #[test]
    fn numbering_crosses_a_key_generation_and_a_mask_block() {
        let mut writer = FrameWriter::new(&SECRET, DIR);
        let mut reader = FrameReader::new(&SECRET, DIR, MAX_FRAME_PLAINTEXT);
        writer.next = (1 << 32) - 40;
        reader.next = writer.next;
        let pts: Vec<Vec<u8>> = (0..80).map(|i| vec![i as u8; 33]).collect();
        let stream = stream_of(&mut writer, &pts);
        assert_eq!(read_all(&mut reader, &stream, 500), Ok(pts));
        assert_eq!(reader.frames(), (1 << 32) + 40);
    }

    #[test]
    fn random_bytes_never_panic_and_almost_never_open() {
        let mut rng = Drbg::new([9; 32]);
        let mut opened = 0;
        for _ in 0..2000 {
            let len = rng.up_to(3000) as usize;
            let mut bytes = vec![0u8; len];
            rng.fill(&mut bytes);
            let mut r = FrameReader::new(&SECRET, DIR, MAX_FRAME_PLAINTEXT);
            if let Ok(Some(_)) = r.open(&mut bytes) {
                opened += 1;
            }
        }
        assert_eq!(opened, 0);
    }

    #[test]
    fn sealing_refuses_empty_oversized_or_unfitting_plaintexts_without_using_a_number() {
        let mut writer = FrameWriter::new(&SECRET, DIR);
        let mut buf = vec![0u8; MAX_FRAME_PLAINTEXT + FRAME_OVERHEAD + 1];
        assert_eq!(writer.seal(&mut buf, 0), None);
        assert_eq!(writer.seal(&mut buf, MAX_FRAME_PLAINTEXT + 1), None);
        assert_eq!(writer.seal(&mut buf[..10], 9), None);
        assert_eq!(writer.frames(), 0);
        assert_eq!(writer.seal(&mut buf, 1), Some(1 + FRAME_OVERHEAD));
        assert_eq!(writer.frames(), 1);
    }
}
