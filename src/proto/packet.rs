//! Data packet protection: rotating lookup tokens, hidden packet numbers, AEAD, padding.
//!
//! Wire layout of a data packet (all bytes look random):
//! ```text
//! 0..8        token  = 8 bytes of PRF(token_key[dir], pn)   (identifies session and pn)
//! 8..n-16     ChaCha20-Poly1305(key[dir][pn >> 32], nonce = pn LE || 0^4, aad = token)
//!             of: session header (4 bytes, see `session`) || transport frames || 0x00 padding
//! n-16..n     Poly1305 tag
//! ```
//! The packet number is never written: the receiver precomputes the tokens of a window of
//! expected packet numbers ([`TokenWindow`]) and finds session and pn with one hash lookup.

use super::crypto::{
    AeadError, Key32, PacketAead, TAG_LEN, generation_of, label, prf_labeled, token_block,
    token_for,
};
use super::rng::Drbg;

/// Bytes of the lookup token at the start of every data packet.
pub const TOKEN_LEN: usize = 8;
/// Bytes a data packet adds around the transport payload (token + tag).
pub const DATA_OVERHEAD: usize = TOKEN_LEN + TAG_LEN;
/// Smallest valid data packet: token, one payload byte, tag.
pub const MIN_DATA_PACKET: usize = DATA_OVERHEAD + 1;
/// A session is closed before its packet numbers reach this value.
pub const MAX_PACKET_NUMBER: u64 = 1 << 62;

/// Which way a packet travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server.
    ClientToServer,
    /// Server to client.
    ServerToClient,
}

impl Direction {
    fn key_label(self) -> KeyLabel {
        KeyLabel::Packet(self)
    }

    /// Label of the TCP carrier's frame length masks in this direction.
    pub(super) fn length_label(self) -> &'static [u8; 8] {
        match self {
            Direction::ClientToServer => label::C2S_LEN,
            Direction::ServerToClient => label::S2C_LEN,
        }
    }

    /// Label of the TCP carrier's frame keys in this direction.
    pub(super) fn frame_key_label(self) -> KeyLabel {
        KeyLabel::Frame(self)
    }

    fn token_label(self) -> &'static [u8; 8] {
        match self {
            Direction::ClientToServer => label::C2S_TOKEN,
            Direction::ServerToClient => label::S2C_TOKEN,
        }
    }
}

/// How transport payloads are padded before encryption.
///
/// Padded length = `round_up(len, bucket) + uniform(0..=random_max)`, capped at the MTU budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaddingPolicy {
    /// Round payload lengths up to a multiple of this (1 = no rounding).
    pub bucket: u16,
    /// Add up to this many random extra bytes.
    pub random_max: u16,
}

impl PaddingPolicy {
    /// No padding at all: payload sizes are visible exactly.
    pub const OFF: PaddingPolicy = PaddingPolicy {
        bucket: 1,
        random_max: 0,
    };

    /// Padded plaintext length for a payload of `len` bytes, at most `cap`.
    pub fn padded_len(&self, len: usize, cap: usize, rng: &mut Drbg) -> usize {
        let bucket = usize::from(self.bucket.max(1));
        let mut padded = len.div_ceil(bucket) * bucket;
        if self.random_max > 0 {
            padded += rng.up_to(u32::from(self.random_max)) as usize;
        }
        padded.clamp(len, cap.max(len))
    }
}

impl Default for PaddingPolicy {
    fn default() -> Self {
        PaddingPolicy {
            bucket: 32,
            random_max: 48,
        }
    }
}

/// Which keys a [`GenerationKeys`] derives: its PRF label, in one byte rather than a pointer
/// (every session holds two: 16 bytes of `Session`).
#[derive(Debug, Clone, Copy)]
pub(super) enum KeyLabel {
    /// Datagram keys of a direction.
    Packet(Direction),
    /// The TCP carrier's frame keys of a direction.
    Frame(Direction),
}

impl KeyLabel {
    fn bytes(self) -> &'static [u8; 8] {
        match self {
            KeyLabel::Packet(Direction::ClientToServer) => label::C2S_KEY,
            KeyLabel::Packet(Direction::ServerToClient) => label::S2C_KEY,
            KeyLabel::Frame(Direction::ClientToServer) => label::C2S_FRAME_KEY,
            KeyLabel::Frame(Direction::ServerToClient) => label::S2C_FRAME_KEY,
        }
    }
}

/// The AEAD keys of one direction, one per generation of 2^32 packet (or frame) numbers:
/// `PRFL(secret, label, generation)`. The TCP carrier's frames (`carrier/frames.rs`) use their
/// own labels, so a frame and a datagram never share a key.
pub(super) struct GenerationKeys {
    key_base: Key32,
    label: KeyLabel,
    generation: u32,
    aead: PacketAead,
}

impl GenerationKeys {
    pub(super) fn new(secret: &Key32, label: KeyLabel) -> Self {
        GenerationKeys {
            key_base: *secret,
            label,
            generation: 0,
            aead: PacketAead::new(&prf_labeled(secret, label.bytes(), 0)),
        }
    }

    /// The AEAD for `pn`'s key generation (implicit re-key every 2^32 numbers).
    pub(super) fn aead_for(&mut self, pn: u64) -> &PacketAead {
        let generation = generation_of(pn);
        if generation != self.generation {
            let key = prf_labeled(&self.key_base, self.label.bytes(), u64::from(generation));
            self.aead = PacketAead::new(&key);
            self.generation = generation;
        }
        &self.aead
    }
}

/// Per-direction key material of datagrams, derived from the session secret.
struct DirectionKeys {
    keys: GenerationKeys,
    token_key: Key32,
}

impl DirectionKeys {
    fn new(secret: &Key32, direction: Direction) -> Self {
        DirectionKeys {
            keys: GenerationKeys::new(secret, direction.key_label()),
            token_key: prf_labeled(secret, direction.token_label(), 0),
        }
    }

    fn aead_for(&mut self, pn: u64) -> &PacketAead {
        self.keys.aead_for(pn)
    }
}

/// Caches one ChaCha20 block of tokens (eight consecutive packet numbers) of the token key its
/// owner passes in (the owner keeps the key once for all its caches).
struct TokenCache {
    /// `pn / 8` of the cached block, `u64::MAX` when empty.
    block_id: u64,
    tokens: [u64; 8],
}

impl TokenCache {
    fn new() -> Self {
        TokenCache {
            block_id: u64::MAX,
            tokens: [0; 8],
        }
    }

    fn token(&mut self, key: &Key32, pn: u64) -> u64 {
        let id = pn / 8;
        if id != self.block_id {
            self.tokens = token_block(key, generation_of(pn), (pn as u32) / 8);
            self.block_id = id;
        }
        self.tokens[(pn % 8) as usize]
    }
}

/// Protects outgoing packets of one direction.
pub struct Sealer {
    keys: DirectionKeys,
    tokens: TokenCache,
}

impl Sealer {
    /// Sender state for `direction` from the session secret.
    pub fn new(secret: &Key32, direction: Direction) -> Self {
        let keys = DirectionKeys::new(secret, direction);
        let tokens = TokenCache::new();
        Sealer { keys, tokens }
    }

    /// Seals in place: `packet[TOKEN_LEN..TOKEN_LEN + plaintext_len]` holds the padded plaintext;
    /// writes token and tag around it and returns the datagram length.
    /// Returns `None` if the buffer is too small.
    pub fn seal(&mut self, pn: u64, packet: &mut [u8], plaintext_len: usize) -> Option<usize> {
        let total = plaintext_len.checked_add(DATA_OVERHEAD)?;
        if packet.len() < total {
            return None;
        }
        let token = self.tokens.token(&self.keys.token_key, pn).to_le_bytes();
        let (head, rest) = packet.split_at_mut(TOKEN_LEN);
        head.copy_from_slice(&token);
        let (body, tail) = rest.split_at_mut(plaintext_len);
        let tag = self.keys.aead_for(pn).seal(pn, &token, body);
        tail[..TAG_LEN].copy_from_slice(&tag);
        Some(total)
    }
}

/// Opens incoming packets of one direction (the pn comes from the token lookup).
pub struct Opener {
    keys: GenerationKeys,
}

impl Opener {
    /// Receiver state for `direction` from the session secret.
    pub fn new(secret: &Key32, direction: Direction) -> Self {
        Opener {
            keys: GenerationKeys::new(secret, direction.key_label()),
        }
    }

    /// The token key of `direction` (for building the receive [`TokenWindow`], which keeps it:
    /// the opener does not need it).
    pub fn token_key(secret: &Key32, direction: Direction) -> Key32 {
        prf_labeled(secret, direction.token_label(), 0)
    }

    /// Decrypts `packet` in place; on success returns the plaintext range `TOKEN_LEN..len-16`.
    pub fn open(
        &mut self,
        pn: u64,
        packet: &mut [u8],
    ) -> Result<std::ops::Range<usize>, AeadError> {
        if packet.len() < MIN_DATA_PACKET {
            return Err(AeadError);
        }
        let end = packet.len() - TAG_LEN;
        let (head, rest) = packet.split_at_mut(TOKEN_LEN);
        let (body, tag) = rest.split_at_mut(end - TOKEN_LEN);
        let mut tag_bytes = [0u8; TAG_LEN];
        tag_bytes.copy_from_slice(tag);
        self.keys.aead_for(pn).open(pn, head, body, &tag_bytes)?;
        Ok(TOKEN_LEN..end)
    }
}

/// Where a [`TokenWindow`] registers the tokens it expects (the server's global session table,
/// or the client's own small map).
pub trait TokenSink {
    /// Start accepting `token` as packet number `pn` of this session.
    fn insert_token(&mut self, token: u64, pn: u64);
    /// Stop accepting `token` (it was used, or slid out of the window).
    fn remove_token(&mut self, token: u64, pn: u64);
}

/// Look-ahead registered when a session starts (both sides assume it: the sender's first limit),
/// and the least look-ahead kept after every received packet.
pub const INITIAL_AHEAD: u64 = 64;
/// Extra packet numbers registered per received packet while the window is growing.
pub const WINDOW_GROWTH: u64 = 2;
/// Largest window: the server's token table keeps the low 16 bits of a packet number, which
/// identify it within a window at most this wide (32x the default `token_window`).
pub const MAX_WINDOW: usize = 1 << 16;
/// Smallest bitmap of a [`TokenWindow`] (slots; four `u64`, kept inline).
pub const MIN_BITMAP_SLOTS: u64 = 256;

/// The set of packet numbers a receiver currently accepts, registered by their tokens.
///
/// Covers `base .. end`, where `base = highest_received + 1 - behind` (clamped at 0), and
/// `end <= base + size`: `behind` slots for reordered packets, the rest look-ahead for losses.
/// `end` starts at [`INITIAL_AHEAD`] and is always at least `highest_received + 1 + INITIAL_AHEAD`;
/// beyond that it grows by [`WINDOW_GROWTH`] per packet only while the peer sends densely (the
/// caller says so), so a session that only exchanges keep-alives keeps [`INITIAL_AHEAD`] tokens.
///
/// Memory: one bit per packet number of `base .. end`, in a bitmap sized for that span (a power
/// of two, at least [`MIN_BITMAP_SLOTS`]): it grows with the window and shrinks when the span
/// falls below 3/8 of it, so an idle session keeps 32 bytes here, inline (no heap block of its
/// own, which cost 48 bytes with malloc's header), not `size / 8` (256 for the default 2,048). Tokens are not stored: a received packet's token is the one it carried, and
/// the token of a packet number that slides out unreceived (lost) is recomputed from the token
/// key (one ChaCha20 block; eight at a time at teardown).
pub struct TokenWindow {
    token_key: Key32,
    /// Tokens being registered, at `end`.
    ahead: TokenCache,
    /// Bit per slot (`pn % (64 * words)`, a power of two at least `end - base`): the token
    /// of that packet number is registered.
    live: Bitmap,
    base: u64,
    end: u64,
    /// At most [`MAX_WINDOW`].
    size: u32,
    /// At most `size / 2`.
    behind: u32,
}

impl TokenWindow {
    /// Creates the window and registers its first tokens with `sink`.
    pub fn new(token_key: Key32, size: usize, behind: usize, sink: &mut impl TokenSink) -> Self {
        let size = size.clamp(16, MAX_WINDOW).next_power_of_two();
        // `size` <= MAX_WINDOW = 2^16, so both fit in 32 bits.
        let behind = behind.min(size / 2) as u32;
        let first_end = INITIAL_AHEAD.min(size as u64);
        let mut w = TokenWindow {
            token_key,
            ahead: TokenCache::new(),
            live: Bitmap::for_span(first_end),
            size: size as u32,
            base: 0,
            end: 0,
            behind,
        };
        for pn in 0..first_end {
            w.add(pn, sink);
        }
        w.end = first_end;
        w
    }

    fn slot(&self, pn: u64) -> (usize, u64) {
        let slots = self.live.slots();
        let i = (pn & (slots - 1)) as usize;
        (i / 64, 1u64 << (i % 64))
    }

    /// Moves the live bits of `base .. end` into a bitmap for a span of `span` slots.
    fn resize_bitmap(&mut self, span: u64) {
        let old = std::mem::replace(&mut self.live, Bitmap::for_span(span));
        let (old, old_slots) = (old.words(), old.slots());
        for pn in self.base..self.end {
            let i = pn & (old_slots - 1);
            if old[(i / 64) as usize] & (1 << (i % 64)) != 0 {
                let (w, m) = self.slot(pn);
                self.live.words_mut()[w] |= m;
            }
        }
    }

    /// Heap bytes of the bitmap (for memory tests).
    #[cfg(test)]
    fn bitmap_heap_bytes(&self) -> usize {
        match &self.live {
            Bitmap::Inline(_) => 0,
            Bitmap::Heap(words) => words.len() * 8,
        }
    }

    fn add(&mut self, pn: u64, sink: &mut impl TokenSink) {
        let token = self.ahead.token(&self.token_key, pn);
        let (w, m) = self.slot(pn);
        self.live.words_mut()[w] |= m;
        sink.insert_token(token, pn);
    }

    /// Unregisters `pn` if it is live; `token` gives its token (called only then).
    fn drop_slot(&mut self, pn: u64, token: impl FnOnce(&Key32) -> u64, sink: &mut impl TokenSink) {
        let (w, m) = self.slot(pn);
        let words = self.live.words_mut();
        if words[w] & m != 0 {
            words[w] &= !m;
            sink.remove_token(token(&self.token_key), pn);
        }
    }

    /// Lowest packet number still accepted.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// One past the highest packet number currently accepted.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Records that `pn`, which carried `token` (its token: the packet authenticated),
    /// authenticated: unregisters the token (so a replay misses), slides the window forward if
    /// `pn` is the new highest, keeps [`INITIAL_AHEAD`] look-ahead, and grows the look-ahead if
    /// `dense` (the peer is sending back to back, see [`TokenWindow`]).
    pub fn received(&mut self, pn: u64, token: u64, dense: bool, sink: &mut impl TokenSink) {
        if pn < self.base || pn >= self.end {
            return;
        }
        self.drop_slot(pn, |_| token, sink);
        // pn < end, so new_base <= end.
        let new_base = (pn + 1)
            .saturating_sub(u64::from(self.behind))
            .max(self.base);
        for old in self.base..new_base {
            // Never received (lost): its token is recomputed.
            self.drop_slot(old, |key| token_for(key, old), sink);
        }
        self.base = new_base;
        let growth = if dense { WINDOW_GROWTH } else { 0 };
        let target = (self.end + growth)
            .max(pn + 1 + INITIAL_AHEAD)
            .min(new_base + u64::from(self.size));
        let span = target.max(self.end) - new_base;
        let slots = self.live.slots();
        // Shrinks only below 3/8 of the slots (to at most half): a span moving back and forth
        // resizes at most once per 5/8 of the new size in packets, amortised O(1) per packet.
        if span > slots || (span * 8 <= slots * 3 && slots > MIN_BITMAP_SLOTS) {
            self.resize_bitmap(span);
        }
        for fresh in self.end..target {
            self.add(fresh, sink);
        }
        self.end = self.end.max(target);
    }

    /// Unregisters every live token (session teardown).
    pub fn clear(&mut self, sink: &mut impl TokenSink) {
        let mut tokens = TokenCache::new();
        for pn in self.base..self.end {
            self.drop_slot(pn, |key| tokens.token(key, pn), sink);
        }
    }
}

/// A [`TokenWindow`]'s bitmap: [`MIN_BITMAP_SLOTS`] inline (an idle session's span of up to
/// 192 packet numbers), more on the heap.
enum Bitmap {
    Inline([u64; (MIN_BITMAP_SLOTS / 64) as usize]),
    Heap(Box<[u64]>),
}

impl Bitmap {
    /// A zeroed bitmap for a window spanning `span` packet numbers (a power of two of slots).
    fn for_span(span: u64) -> Self {
        let slots = span.max(MIN_BITMAP_SLOTS).next_power_of_two();
        if slots == MIN_BITMAP_SLOTS {
            Bitmap::Inline([0; (MIN_BITMAP_SLOTS / 64) as usize])
        } else {
            Bitmap::Heap(vec![0; (slots / 64) as usize].into_boxed_slice())
        }
    }

    fn words(&self) -> &[u64] {
        match self {
            Bitmap::Inline(words) => words,
            Bitmap::Heap(words) => words,
        }
    }

    fn words_mut(&mut self) -> &mut [u64] {
        match self {
            Bitmap::Inline(words) => words,
            Bitmap::Heap(words) => words,
        }
    }

    fn slots(&self) -> u64 {
        self.words().len() as u64 * 64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct MapSink(HashMap<u64, u64>);
    impl TokenSink for MapSink {
        fn insert_token(&mut self, token: u64, pn: u64) {
            self.0.insert(token, pn);
        }
        fn remove_token(&mut self, token: u64, pn: u64) {
            if self.0.get(&token) == Some(&pn) {
                self.0.remove(&token);
            }
        }
    }

    /// [`TokenWindow::received`] with the token the packet carried.
    fn receive(window: &mut TokenWindow, pn: u64, dense: bool, sink: &mut MapSink) {
        let token = token_for(&window.token_key, pn);
        window.received(pn, token, dense, sink);
    }

    #[test]
    fn seal_then_lookup_then_open() {
        let secret = [5u8; 32];
        let mut tx = Sealer::new(&secret, Direction::ClientToServer);
        let mut rx = Opener::new(&secret, Direction::ClientToServer);
        let mut sink = MapSink::default();
        let key = Opener::token_key(&secret, Direction::ClientToServer);
        let mut window = TokenWindow::new(key, 64, 16, &mut sink);
        for pn in [0u64, 1, 2, 7, 5, 40] {
            let mut buf = [0u8; 100];
            buf[TOKEN_LEN..TOKEN_LEN + 10].copy_from_slice(b"0123456789");
            let n = tx.seal(pn, &mut buf, 10).unwrap();
            let token = u64::from_le_bytes(buf[..8].try_into().unwrap());
            let found = *sink.0.get(&token).expect("token registered");
            assert_eq!(found, pn);
            let range = rx.open(found, &mut buf[..n]).unwrap();
            assert_eq!(&buf[range], b"0123456789");
            receive(&mut window, found, true, &mut sink);
            assert!(!sink.0.contains_key(&token), "used token must be gone");
        }
        // window slid: base = 41 - 16; the 64-slot ring is full again: 25..89 minus the received 40
        assert_eq!(window.base(), 25);
        assert_eq!(window.end(), 89);
        assert_eq!(sink.0.len(), 63, "25..89 registered except the received 40");
    }

    #[test]
    fn window_never_exceeds_its_size_and_jumps_reset() {
        let mut sink = MapSink::default();
        let mut window = TokenWindow::new([1; 32], 32, 8, &mut sink);
        assert_eq!(sink.0.len(), 32);
        assert_eq!(window.end(), 32);
        receive(&mut window, 31, true, &mut sink);
        assert!(sink.0.len() <= 32);
        receive(&mut window, 31 + 30, true, &mut sink);
        assert!(sink.0.len() <= 32);
        window.clear(&mut sink);
        assert!(sink.0.is_empty());
    }

    #[test]
    fn large_window_starts_small_and_grows_with_traffic() {
        let mut sink = MapSink::default();
        let mut window = TokenWindow::new([2; 32], 512, 128, &mut sink);
        assert_eq!(sink.0.len() as u64, INITIAL_AHEAD);
        for pn in 0..400u64 {
            receive(&mut window, pn, true, &mut sink);
            assert!(sink.0.len() <= 512);
            assert!(window.end() >= pn + 1 + INITIAL_AHEAD);
        }
        // Grown to the full size: 128 behind (all received) + 384 ahead.
        assert_eq!(window.end() - window.base(), 512);
        assert_eq!(sink.0.len(), 384);
        // A loss burst of 300 packets is still recognised.
        let jump = window.end() - 1;
        assert!(sink.0.values().any(|pn| *pn == jump));
    }

    /// Every registered token is the PRF output of its packet number, and exactly the window's
    /// live packet numbers are registered (so recomputed tokens unregister the right entries).
    fn assert_consistent(window: &TokenWindow, key: &Key32, sink: &MapSink) {
        for (token, pn) in &sink.0 {
            assert_eq!(*token, crate::proto::crypto::token_for(key, *pn), "pn {pn}");
            assert!(
                (window.base()..window.end()).contains(pn),
                "pn {pn} outside"
            );
        }
    }

    #[test]
    fn dense_traffic_grows_the_window_to_its_size_and_sparse_traffic_does_not() {
        let key = [3; 32];
        let mut sink = MapSink::default();
        let mut window = TokenWindow::new(key, 2048, 128, &mut sink);
        // Idle: a keep-alive now and then keeps the minimum look-ahead, nothing more.
        for pn in 0..500u64 {
            receive(&mut window, pn, false, &mut sink);
            assert_eq!(window.end(), pn + 1 + INITIAL_AHEAD);
        }
        assert_eq!(sink.0.len() as u64, INITIAL_AHEAD);
        assert_consistent(&window, &key, &sink);
        // Bulk: back-to-back packets grow it to the configured size, never beyond.
        for pn in 500..5000u64 {
            receive(&mut window, pn, true, &mut sink);
            assert!(window.end() - window.base() <= 2048);
        }
        assert_eq!(window.end() - window.base(), 2048);
        assert_eq!(
            sink.0.len(),
            2048 - 128,
            "all behind received, the rest ahead"
        );
        assert_consistent(&window, &key, &sink);
        // Idle again: the look-ahead already promised stays registered (the peer may use it).
        let end = window.end();
        receive(&mut window, 5000, false, &mut sink);
        assert_eq!(window.end(), end);
        assert_eq!(sink.0.len(), 2048 - 128 - 1);
        window.clear(&mut sink);
        assert!(
            sink.0.is_empty(),
            "recomputed tokens unregister every entry"
        );
    }

    #[test]
    fn the_bitmap_follows_the_span_of_the_window() {
        let key = [5; 32];
        let mut sink = MapSink::default();
        let mut window = TokenWindow::new(key, 2048, 128, &mut sink);
        // Idle: 128 behind + 64 ahead in 256 slots (the full 2,048-slot bitmap was 256 bytes).
        for pn in 0..300u64 {
            receive(&mut window, pn, false, &mut sink);
        }
        assert_eq!(window.end() - window.base(), 192);
        assert_eq!(window.bitmap_heap_bytes(), 0);
        // Bulk: grows with the window, every registered token still the window's own.
        for pn in 300..3000u64 {
            receive(&mut window, pn, true, &mut sink);
            assert!(window.live.slots() >= window.end() - window.base());
        }
        assert_eq!(window.bitmap_heap_bytes(), 256);
        assert_consistent(&window, &key, &sink);
        // The peer uses up the promised look-ahead sparsely: the span and the bitmap shrink.
        let end = window.end();
        for pn in 3000..end + 10 {
            receive(&mut window, pn, false, &mut sink);
        }
        assert_eq!(window.end() - window.base(), 192);
        assert_eq!(window.bitmap_heap_bytes(), 0);
        assert_eq!(sink.0.len() as u64, INITIAL_AHEAD);
        assert_consistent(&window, &key, &sink);
        // A loss burst, then a late packet from behind: both found through the moved bits.
        let late = window.end() - 1;
        receive(&mut window, late, false, &mut sink);
        let behind = late - 100;
        assert!(
            !sink.0.values().any(|pn| *pn == behind),
            "never registered twice"
        );
        window.clear(&mut sink);
        assert!(sink.0.is_empty(), "every live bit unregistered its token");
    }

    #[test]
    fn a_peer_racing_ahead_within_the_window_is_accepted_beyond_it_is_not() {
        let key = [4; 32];
        let mut sink = MapSink::default();
        let mut window = TokenWindow::new(key, 256, 32, &mut sink);
        for pn in 0..300u64 {
            receive(&mut window, pn, true, &mut sink);
        }
        let (base, end) = (window.base(), window.end());
        assert_eq!(end - base, 256);
        // Beyond the window: not registered, and a stray call changes nothing.
        let beyond = crate::proto::crypto::token_for(&key, end);
        assert!(!sink.0.contains_key(&beyond));
        receive(&mut window, end, true, &mut sink);
        assert_eq!((window.base(), window.end()), (base, end));
        // The last packet number inside it (a burst of losses before it) is still recognised.
        let last = crate::proto::crypto::token_for(&key, end - 1);
        assert_eq!(sink.0.get(&last), Some(&(end - 1)));
        receive(&mut window, end - 1, true, &mut sink);
        assert!(!sink.0.contains_key(&last), "used once");
        assert_eq!(window.base(), end - 32);
        assert!(window.end() >= end + INITIAL_AHEAD);
        // The lost packets that slid out behind were unregistered; the late ones still within
        // `behind` are accepted once.
        assert_consistent(&window, &key, &sink);
        let late = end - 5;
        let token = crate::proto::crypto::token_for(&key, late);
        assert_eq!(sink.0.get(&token), Some(&late));
        receive(&mut window, late, true, &mut sink);
        assert!(!sink.0.contains_key(&token));
        let slid_out = crate::proto::crypto::token_for(&key, window.base() - 1);
        assert!(!sink.0.contains_key(&slid_out));
        assert_consistent(&window, &key, &sink);
    }

    #[test]
    fn padding_policy_bounds() {
        let mut rng = Drbg::new([0; 32]);
        let p = PaddingPolicy {
            bucket: 32,
            random_max: 10,
        };
        for len in [0usize, 1, 31, 32, 33, 1000] {
            let padded = p.padded_len(len, 1100, &mut rng);
            assert!(padded >= len && padded <= 1100);
            assert!(padded >= len.div_ceil(32) * 32 || padded == 1100);
        }
        assert_eq!(PaddingPolicy::OFF.padded_len(17, 100, &mut rng), 17);
        assert_eq!(p.padded_len(1099, 1100, &mut rng), 1100);
    }
}
