//! A protected session: packet protection (keys, tokens, replay window, padding) around the
//! transport's `Transport` state machine, or, over the TCP carrier, sealed frames around a
//! reliable-carrier transport. Shared by the server endpoint and the client.

use std::time::{Duration, Instant};

use super::carrier::{FRAME_OVERHEAD, FrameError, FrameReader, FrameWriter, LENGTH_LEN};
use super::crypto::Key32;
use super::packet::{
    DATA_OVERHEAD, Direction, INITIAL_AHEAD, MAX_PACKET_NUMBER, MIN_DATA_PACKET, Opener,
    PaddingPolicy, Sealer, TOKEN_LEN, TokenSink, TokenWindow,
};
use super::replay::ReplayWindow;
use super::rng::Drbg;
use super::transport::{CloseReason, Side, Transport, TransportConfig, TransportEvent};

/// Smallest datagram size a peer may announce.
pub const MIN_DATAGRAM: usize = 576;
/// Largest datagram size either side produces or accepts: a full 1,500-byte IPv4 packet
/// (20 bytes IP + 8 UDP header), never more, whatever the local link (loopback) allows.
pub const MAX_DATAGRAM: usize = 1472;
/// Largest datagram towards an IPv6 peer (40 bytes IP + 8 UDP in 1,500).
pub const MAX_DATAGRAM_V6: usize = 1452;
/// Datagram size every session starts with, before path-MTU discovery confirms more.
pub const BASE_DATAGRAM: usize = 1350;
/// Smallest size a black hole makes a session fall back to (below [`BASE_DATAGRAM`]).
pub const FLOOR_DATAGRAM: usize = 1200;

/// The largest datagram the address family of `peer` allows.
pub fn family_max_datagram(peer: &std::net::SocketAddr) -> usize {
    if peer.is_ipv6() && peer.ip().to_canonical().is_ipv6() {
        MAX_DATAGRAM_V6
    } else {
        MAX_DATAGRAM
    }
}

/// Datagrams written back to back by a batch transmit: `len` bytes cut every `segment` bytes (the
/// last datagram may be shorter). The shape one GSO send takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// Bytes written at the start of the caller's buffer.
    pub len: usize,
    /// Length of every datagram but the last.
    pub segment: usize,
}

impl Batch {
    /// A batch of one datagram.
    pub fn single(len: usize) -> Batch {
        Batch { len, segment: len }
    }

    /// How many datagrams it holds.
    pub fn count(&self) -> usize {
        self.len.div_ceil(self.segment.max(1))
    }
}

/// Packet-protection settings shared by client and server.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Largest UDP payload this side sends or accepts: the upper bound of path-MTU discovery
    /// (sessions start at [`BASE_DATAGRAM`] and probe up to the negotiated value).
    pub max_datagram: usize,
    /// Padding of data packets.
    pub padding: PaddingPolicy,
    /// Packet numbers whose tokens are precomputed per session (power of two, ≥ 16).
    pub token_window: usize,
    /// Of those, how many lie behind the highest received packet (reordering tolerance).
    pub token_behind: usize,
    /// Transport settings (`max_payload` and the `pmtu_*` sizes are overwritten with the
    /// datagram sizes minus overhead).
    pub transport: TransportConfig,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_datagram: MAX_DATAGRAM,
            padding: PaddingPolicy::default(),
            token_window: 2048,
            token_behind: 128,
            transport: TransportConfig::default(),
        }
    }
}

/// Why an incoming data packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketError {
    /// Shorter than a minimal data packet or longer than the MTU budget.
    BadLength,
    /// Packet number already received or too old.
    Replay,
    /// AEAD authentication failed.
    Auth,
    /// The transport rejected the payload (protocol violation; the transport closes the session).
    Transport,
}

/// Counters of the packet protection layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SecureStats {
    /// Data packets sent.
    pub packets_sent: u64,
    /// Data packets received and authenticated.
    pub packets_received: u64,
    /// UDP payload bytes sent (data packets).
    pub bytes_sent: u64,
    /// UDP payload bytes received (authenticated data packets).
    pub bytes_received: u64,
    /// Packets dropped by the replay window.
    pub replays_dropped: u64,
    /// Packets whose token matched but which failed authentication.
    pub auth_failures: u64,
    /// Times sending was held back because the peer's receive window was exhausted.
    pub blocked: u64,
}

/// Bytes of the secure-layer header at the start of every plaintext: the low 32 bits of the
/// sender's receive-window end ("you may send packet numbers below this").
pub const HEADER_LEN: usize = 4;
/// Packet numbers below the peer's announced limit kept for probes when blocked.
pub const PROBE_RESERVE: u64 = 16;
/// First probe interval while blocked (doubles up to [`PROBE_MAX`]).
pub const PROBE_INITIAL: Duration = Duration::from_millis(200);
/// Longest probe interval while blocked.
pub const PROBE_MAX: Duration = Duration::from_secs(8);
/// Packets received less than this apart count as dense: only then does the receive token window
/// grow beyond its minimum look-ahead (a peer sending less often than this needs no more than
/// [`INITIAL_AHEAD`] packet numbers in flight unless its RTT exceeds several seconds), so an idle
/// session's keep-alives do not grow it.
pub const DENSE_GAP: Duration = Duration::from_millis(100);

/// One protected session.
///
/// # Call order (the driver's contract)
///
/// Sans-IO: the session never reads the clock and never sleeps. A driver (the server endpoint,
/// the client connector, a simulator) must, on every wake-up:
///
/// 1. feed every received datagram to [`Session::handle_packet`];
/// 2. call [`Session::handle_timeout`] when [`Session::poll_timeout`] is at or before `now`;
/// 3. after 1, 2 or any application call on [`Session::transport_mut`] (write, read, open,
///    finish, reset, datagram), call [`Session::poll_transmit`] until it returns `None`;
/// 4. drain [`Session::poll_event`];
/// 5. sleep until [`Session::poll_timeout`] or the next datagram.
///
/// Every timer stops when it fires (see the transport's `timer` module), so after steps 2–3
/// `poll_timeout` is in the future: while the session is blocked on the peer's token window,
/// work that needs sending (an ACK, a PING) waits in the transport and is reported through the
/// probe time, never as a deadline left in the past. A wake-up that did no work is therefore
/// never followed by a zero-timeout wait; the simulators assert exactly that.
pub struct Session {
    transport: Transport,
    sealer: Sealer,
    opener: Opener,
    rx_tokens: TokenWindow,
    /// When the last packet authenticated (for [`DENSE_GAP`]).
    last_rx: Option<Instant>,
    replay: ReplayWindow,
    padding: PaddingPolicy,
    rng: Drbg,
    /// At most [`MAX_DATAGRAM`] (a carrier session: its frame limit, at most 16 KiB).
    max_datagram: u32,
    /// Next packet number the transport will use (last sent + 1).
    next_pn: u64,
    /// The peer's announced receive-window end: we never send a packet number at or above it.
    tx_limit: u64,
    /// While blocked (within `PROBE_RESERVE` of `tx_limit`): when the next probe may go out.
    probe_at: Option<Instant>,
    probe_interval: Duration,
    stats: SecureStats,
    /// Over the TCP carrier: the frame sealer and opener (no tokens, no replay window in use).
    frames: Option<Box<CarrierFrames>>,
}

/// A carrier session's framing (docs/PROTOCOL.md §7.4).
struct CarrierFrames {
    writer: FrameWriter,
    reader: FrameReader,
    /// The negotiated frame plaintext limit.
    limit: usize,
}

/// Registers nothing: a carrier session has no lookup tokens.
struct NoTokens;

impl TokenSink for NoTokens {
    fn insert_token(&mut self, _token: u64, _pn: u64) {}
    fn remove_token(&mut self, _token: u64, _pn: u64) {}
}

/// Smallest frame plaintext limit a carrier session uses (the smallest datagram a peer may
/// announce).
pub const MIN_FRAME_LIMIT: usize = MIN_DATAGRAM;

fn directions(side: Side) -> (Direction, Direction) {
    match side {
        Side::Client => (Direction::ClientToServer, Direction::ServerToClient),
        Side::Server => (Direction::ServerToClient, Direction::ClientToServer),
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("max_datagram", &self.max_datagram)
            .field("stats", &self.stats)
            .finish()
    }
}

/// Rebuilds a 64-bit value from its low 32 bits, choosing the candidate closest to `near`.
fn expand_u32(near: u64, low: u32) -> u64 {
    let candidate = (near & !0xFFFF_FFFF) | u64::from(low);
    let options = [
        candidate.checked_sub(1 << 32),
        Some(candidate),
        candidate.checked_add(1 << 32),
    ];
    options
        .into_iter()
        .flatten()
        .min_by_key(|c| c.abs_diff(near))
        .unwrap_or(candidate)
}

/// The smallest value at or above `base` whose low 16 bits are `low`.
fn at_or_above(base: u64, low: u16) -> u64 {
    base + u64::from(low.wrapping_sub(base as u16))
}

impl Session {
    /// Creates a session from the handshake's secret. `max_datagram` is the negotiated size: the
    /// session starts at [`BASE_DATAGRAM`] (or below, if that is less) and path-MTU discovery
    /// probes up to it.
    /// The receive tokens are registered with `sink`.
    pub fn new(
        secret: &Key32,
        side: Side,
        config: &SessionConfig,
        max_datagram: usize,
        now: Instant,
        rng_seed: [u8; 32],
        sink: &mut impl TokenSink,
    ) -> Self {
        let max_datagram = max_datagram.clamp(MIN_DATAGRAM, MAX_DATAGRAM);
        let overhead = DATA_OVERHEAD + HEADER_LEN;
        let base = BASE_DATAGRAM.min(max_datagram);
        let mut transport_config = config.transport.clone();
        transport_config.max_payload = base - overhead;
        transport_config.pmtu_max_payload = max_datagram - overhead;
        transport_config.pmtu_floor_payload = FLOOR_DATAGRAM.min(base) - overhead;
        let transport = Transport::new(transport_config, side, now);
        Self::assemble(
            secret,
            side,
            config,
            max_datagram,
            transport,
            rng_seed,
            sink,
        )
    }

    /// Creates a session over the TCP carrier (docs/PROTOCOL.md §7.4, §7.5): sealed frames of
    /// at most `frame_limit` plaintext bytes (the negotiated limit, clamped to
    /// [`MIN_FRAME_LIMIT`] ..= `carrier::MAX_FRAME_PLAINTEXT`) around a reliable-carrier
    /// transport. It has no lookup tokens and no replay window: use
    /// [`Session::handle_frames`] and [`Session::poll_transmit_frame`], never the datagram calls.
    pub fn new_carrier(
        secret: &Key32,
        side: Side,
        config: &SessionConfig,
        frame_limit: usize,
        now: Instant,
        rng_seed: [u8; 32],
    ) -> Self {
        let limit = frame_limit.clamp(MIN_FRAME_LIMIT, super::carrier::MAX_FRAME_PLAINTEXT);
        let mut transport_config = config.transport.clone();
        transport_config.max_payload = limit;
        let transport = Transport::new_reliable(transport_config, side, now);
        // The smallest token window: its tokens go nowhere and are never used.
        let datagram = SessionConfig {
            token_window: 16,
            token_behind: 0,
            transport: TransportConfig::default(),
            ..config.clone()
        };
        let mut session = Self::assemble(
            secret,
            side,
            &datagram,
            MAX_DATAGRAM,
            transport,
            rng_seed,
            &mut NoTokens,
        );
        let (tx_dir, rx_dir) = directions(side);
        session.max_datagram = limit as u32;
        session.frames = Some(Box::new(CarrierFrames {
            writer: FrameWriter::new(secret, tx_dir),
            reader: FrameReader::new(secret, rx_dir, limit),
            limit,
        }));
        session
    }

    fn assemble(
        secret: &Key32,
        side: Side,
        config: &SessionConfig,
        max_datagram: usize,
        transport: Transport,
        rng_seed: [u8; 32],
        sink: &mut impl TokenSink,
    ) -> Self {
        let (tx_dir, rx_dir) = directions(side);
        let opener = Opener::new(secret, rx_dir);
        let rx_tokens = TokenWindow::new(
            Opener::token_key(secret, rx_dir),
            config.token_window,
            config.token_behind,
            sink,
        );
        Session {
            transport,
            sealer: Sealer::new(secret, tx_dir),
            opener,
            rx_tokens,
            last_rx: None,
            replay: ReplayWindow::new(),
            padding: config.padding,
            rng: Drbg::new(rng_seed),
            max_datagram: max_datagram as u32,
            next_pn: 0,
            // Every receiver starts with INITIAL_AHEAD tokens registered.
            tx_limit: INITIAL_AHEAD,
            probe_at: None,
            probe_interval: PROBE_INITIAL,
            stats: SecureStats::default(),
            frames: None,
        }
    }

    /// Whether this session runs over the TCP carrier ([`Session::new_carrier`]).
    pub fn is_carrier(&self) -> bool {
        self.frames.is_some()
    }

    /// Carrier session: opens every whole frame at the front of `input` (decrypting in place)
    /// and hands its payload to the transport; returns how many leading bytes were consumed
    /// (a partial frame stays for the caller to complete). `Err`: the framing failed (§7.4): the
    /// connection is no longer interpreted. A datagram session always fails.
    pub fn handle_frames(&mut self, now: Instant, input: &mut [u8]) -> Result<usize, FrameError> {
        let Some(frames) = self.frames.as_deref_mut() else {
            return Err(FrameError::Failed);
        };
        let mut consumed = 0;
        while let Some(rest) = input.get_mut(consumed..) {
            let n = frames.reader.frames();
            let Some(opened) = frames.reader.open(rest)? else {
                break;
            };
            let payload = rest.get(opened.plaintext.clone()).unwrap_or_default();
            self.stats.packets_received += 1;
            self.stats.bytes_received += opened.len as u64;
            consumed += opened.len;
            if self.transport.handle_payload(now, n, payload).is_err() {
                // A protocol violation: the transport is closing (its CLOSE goes out).
                break;
            }
        }
        Ok(consumed)
    }

    /// Carrier session: writes the next sealed frame into `buf` (at least
    /// `carrier::MAX_FRAME_LEN` bytes, or the frame limit + `FRAME_OVERHEAD`) and returns its
    /// length; padded as datagrams are (§4.1), with the frame limit as budget. `None`: nothing
    /// to send now (or a datagram session).
    pub fn poll_transmit_frame(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        let frames = self.frames.as_deref_mut()?;
        let budget = buf.len().checked_sub(FRAME_OVERHEAD)?.min(frames.limit);
        let body = buf.get_mut(LENGTH_LEN..LENGTH_LEN + budget)?;
        let (_, len) = self.transport.poll_transmit(now, body)?;
        let padded = self.padding.padded_len(len, budget, &mut self.rng);
        body[len..padded].fill(0);
        let total = frames.writer.seal(buf, padded)?;
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += total as u64;
        Some(total)
    }

    /// The packet number in the receive window whose low 16 bits are `low` (a token table may
    /// keep only those: the window is at most `MAX_WINDOW` = 2^16 wide, so the answer is
    /// unique).
    pub fn rx_packet_number(&self, low: u16) -> u64 {
        at_or_above(self.rx_tokens.base(), low)
    }

    /// Handles a data packet whose token resolved to packet number `pn` (decrypts in place).
    /// Replay is checked before decryption and recorded after authentication.
    ///
    /// Returns `Ok(true)` when `pn` is the highest packet number received so far: only such a
    /// packet may move the peer address (a delayed or withheld older packet cannot).
    pub fn handle_packet(
        &mut self,
        now: Instant,
        pn: u64,
        packet: &mut [u8],
        sink: &mut impl TokenSink,
    ) -> Result<bool, PacketError> {
        if packet.len() < MIN_DATA_PACKET + HEADER_LEN || packet.len() > MAX_DATAGRAM {
            return Err(PacketError::BadLength);
        }
        if !self.replay.check(pn) {
            self.stats.replays_dropped += 1;
            return Err(PacketError::Replay);
        }
        let range = match self.opener.open(pn, packet) {
            Ok(range) => range,
            Err(_) => {
                self.stats.auth_failures += 1;
                return Err(PacketError::Auth);
            }
        };
        let newest = self.replay.highest().is_none_or(|highest| pn > highest);
        self.replay.mark(pn);
        let dense = self
            .last_rx
            .is_some_and(|at| now.saturating_duration_since(at) < DENSE_GAP);
        self.last_rx = Some(now);
        // The token it carried (authenticated with it) is the one to unregister.
        let token = u64::from_le_bytes(packet[..TOKEN_LEN].try_into().unwrap_or_default());
        self.rx_tokens.received(pn, token, dense, sink);
        self.stats.packets_received += 1;
        self.stats.bytes_received += packet.len() as u64;
        let plaintext = packet.get(range).ok_or(PacketError::BadLength)?;
        let (header, payload) = plaintext
            .split_at_checked(HEADER_LEN)
            .ok_or(PacketError::BadLength)?;
        let limit = expand_u32(
            self.next_pn,
            u32::from_le_bytes([header[0], header[1], header[2], header[3]]),
        );
        if limit > self.tx_limit {
            self.tx_limit = limit;
            if self.next_pn < self.tx_limit.saturating_sub(PROBE_RESERVE) {
                self.probe_at = None;
                self.probe_interval = PROBE_INITIAL;
            }
        }
        self.transport
            .handle_payload(now, pn, payload)
            .map_err(|_| PacketError::Transport)?;
        Ok(newest)
    }

    /// True when the peer's receive window is (nearly) exhausted: only rate-limited probes go out
    /// until the peer reports that it received more.
    pub fn is_blocked(&self) -> bool {
        self.next_pn >= self.tx_limit.saturating_sub(PROBE_RESERVE)
    }

    /// Writes the next protected datagram into `buf` (which should hold `max_datagram()` bytes).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        let probing = self.is_blocked();
        if probing {
            // Probes use the reserved packet numbers below the limit, at a backed-off rate, so
            // that after a blackout the peer hears from us and re-opens its window.
            if self.next_pn >= self.tx_limit {
                self.stats.blocked += 1;
                return None;
            }
            match self.probe_at {
                None => {
                    self.probe_at = Some(now + self.probe_interval);
                    self.stats.blocked += 1;
                    return None;
                }
                Some(at) if now < at => {
                    self.stats.blocked += 1;
                    return None;
                }
                Some(_) => {}
            }
        }
        let budget = buf
            .len()
            .min(self.max_datagram as usize)
            .checked_sub(DATA_OVERHEAD + HEADER_LEN)?;
        // At most `max_datagram` less the overhead: the transport's payload limit.
        let payload_cap = budget;
        let body = TOKEN_LEN + HEADER_LEN;
        let Some((pn, len)) = self
            .transport
            .poll_transmit(now, &mut buf[body..body + payload_cap])
        else {
            if probing {
                // Nothing to probe with now: re-armed by the next call.
                self.probe_at = None;
            }
            return None;
        };
        self.next_pn = pn.saturating_add(1);
        if pn >= MAX_PACKET_NUMBER {
            self.transport.close(now, CloseReason::Internal);
            return None;
        }
        if pn >= self.tx_limit {
            // The transport skipped packet numbers: the peer could not identify this packet.
            self.stats.blocked += 1;
            return None;
        }
        if self.is_blocked() {
            self.probe_at = Some(now + self.probe_interval);
            self.probe_interval = (self.probe_interval * 2).min(PROBE_MAX);
        }
        let window_end = self.rx_tokens.end() as u32;
        buf[TOKEN_LEN..body].copy_from_slice(&window_end.to_le_bytes());
        // Padding stays within the current path size (a probe, larger, is not padded further).
        let pad_cap = payload_cap.min(self.transport.max_payload_now());
        let padded = self.padding.padded_len(len, pad_cap, &mut self.rng);
        buf[body + len..body + padded].fill(0);
        let total = self.sealer.seal(pn, buf, HEADER_LEN + padded)?;
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += total as u64;
        Some(total)
    }

    /// Writes up to `max_segments` datagrams back to back into `buf`, each as
    /// [`Session::poll_transmit`] would write it (so congestion window, pacer and the peer's token
    /// window decide exactly as they do for single datagrams). The first datagram's length is the
    /// segment size; a shorter datagram ends the batch, and so does a first datagram shorter than
    /// the current full size (the next one could be larger: a batch never makes packets
    /// smaller). A path-MTU probe, larger than the full size, is followed by one datagram.
    pub fn poll_transmit_batch(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        max_segments: usize,
    ) -> Option<Batch> {
        let segment = self.poll_transmit(now, buf)?;
        let mut len = segment;
        // Only full-size datagrams lead a batch: a shorter one goes alone, and so does a path-MTU
        // probe (larger than the current size): it must never share a segmented send whose
        // segment size the path may refuse.
        if segment != self.current_max_datagram().min(buf.len()) {
            return Some(Batch::single(len));
        }
        for _ in 1..max_segments {
            let Some(room) = buf.get_mut(len..len + segment) else {
                break;
            };
            let Some(n) = self.poll_transmit(now, room) else {
                break;
            };
            len += n;
            if n < segment {
                break;
            }
        }
        Some(Batch { len, segment })
    }

    /// Earliest instant at which [`Session::handle_timeout`] (or, for a blocked session's next
    /// probe, [`Session::poll_transmit`]) must run. After `handle_timeout(now)` and
    /// `poll_transmit` until `None`, this is later than `now` (or `None`).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let transport = self.transport.poll_timeout();
        let probe = self
            .probe_at
            .filter(|_| self.is_blocked() && self.next_pn < self.tx_limit);
        match (transport, probe) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs the transport's timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.transport.handle_timeout(now);
    }

    /// Next transport event (stream opened/readable/writable/finished/reset, datagram, closed).
    pub fn poll_event(&mut self) -> Option<TransportEvent> {
        self.transport.poll_event()
    }

    /// Starts a graceful close with `reason` (sent to the peer).
    pub fn close(&mut self, now: Instant, reason: CloseReason) {
        self.transport.close(now, reason);
    }

    /// True once the transport finished closing.
    pub fn is_closed(&self) -> bool {
        self.transport.is_closed()
    }

    /// The transport (read access: stats, per-stream accounting).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The transport (stream operations: open/accept/answer/write/read/finish/reset/datagrams).
    pub fn transport_mut(&mut self) -> &mut Transport {
        &mut self.transport
    }

    /// Packet protection counters.
    pub fn secure_stats(&self) -> SecureStats {
        self.stats
    }

    /// Negotiated maximum datagram size (the upper bound of path-MTU discovery).
    pub fn max_datagram(&self) -> usize {
        self.max_datagram as usize
    }

    /// Largest datagram sent now: the size path-MTU discovery confirmed (probes are larger).
    pub fn current_max_datagram(&self) -> usize {
        self.transport.max_payload_now() + DATA_OVERHEAD + HEADER_LEN
    }

    /// Unregisters all receive tokens (called when the session is dropped).
    pub fn release_tokens(&mut self, sink: &mut impl TokenSink) {
        self.rx_tokens.clear(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::packet::MAX_WINDOW;
    use crate::proto::transport::Destination;
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

    /// A server holds one `Session` per client (boxed, about 1.9 KB with its endpoint fields), so
    /// its size is most of an idle session's memory: the transport (1,176 bytes: recovery, ACK,
    /// stream, path-MTU and timer state, the config values it still reads and its counters;
    /// congestion, delivery rate and pacing are boxed and made only for data), packet
    /// protection and the token window (416, with the window's bitmap inline), the padding
    /// DRBG (104). Was 2,856 bytes before the DRBG lost its ChaCha20 instance (104 bytes) and
    /// the token caches their key copies (64); 2,728 with BBR's ACK-aggregation estimate; then
    /// the transport kept all of its config (160 bytes, now 96) and its derived stats (216, now
    /// 88 of counters), the congestion state while idle (552), the opener a token key copy and
    /// the token window a second token cache (72); 1,888 with key labels as pointers (16), a
    /// stored payload limit (8) and 64-bit window sizes (8), and without the bitmap inline
    /// (+16 here, but its own 48-byte heap block gone).
    #[test]
    fn a_session_stays_under_1872_bytes() {
        let size = std::mem::size_of::<Session>();
        assert!(size <= 1872, "Session is {size} bytes");
    }

    /// Bug E: a session blocked on the peer's token window with a delayed ACK due must not report
    /// that passed deadline forever (the event loop would spin at zero timeout until the probe).
    #[test]
    fn blocked_session_with_an_ack_due_never_reports_a_past_deadline() {
        let t0 = Instant::now();
        let mut config = SessionConfig::default();
        config.transport.initial_cwnd_packets = 256;
        let (mut client, mut client_sink, mut server, _) = pair(&config, t0);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        // Upstream blackout: the client fills the server's initial window; all of it is lost.
        let dest = Destination::domain("example.com", 443).unwrap();
        for _ in 0..2 {
            let t = client.transport_mut();
            let up = t.open_stream(dest.clone()).unwrap();
            t.stream_write(up, &[0xAB; 64 * 1024]).unwrap();
        }
        let mut now = t0;
        for _ in 0..1000 {
            if client.is_blocked() {
                break;
            }
            if client.poll_transmit(now, &mut buf).is_none() {
                now += Duration::from_millis(1);
            }
        }
        assert!(
            client.is_blocked(),
            "the client reached the server's window end"
        );
        // Downstream still works: one ack-eliciting server packet arms the client's delayed ACK.
        let down = server.transport_mut().open_stream(dest).unwrap();
        server.transport_mut().stream_write(down, b"hello").unwrap();
        let n = server.poll_transmit(now, &mut buf).expect("server packet");
        let token = u64::from_le_bytes(buf[..TOKEN_LEN].try_into().unwrap());
        let pn = client_sink.0[&token];
        client
            .handle_packet(now, pn, &mut buf[..n], &mut client_sink)
            .unwrap();
        // Drive the client as an event loop would, for two seconds of virtual time.
        let end = now + Duration::from_secs(2);
        let mut wakeups = 0;
        while now < end {
            if client.poll_timeout().is_some_and(|t| t <= now) {
                client.handle_timeout(now);
            }
            while client.poll_transmit(now, &mut buf).is_some() {}
            let next = client.poll_timeout().expect("idle timer armed");
            assert!(
                next > now,
                "blocked session reports a passed deadline: {:?} <= {:?}",
                next - t0,
                now - t0
            );
            now = next;
            wakeups += 1;
        }
        assert!(wakeups < 100, "{wakeups} wake-ups in 2 s while blocked");
    }

    /// A client and a server session on one secret, with their token maps.
    fn pair(config: &SessionConfig, t0: Instant) -> (Session, MapSink, Session, MapSink) {
        pair_sized(config, 1350, t0)
    }

    /// Like [`pair`] with `max_datagram` negotiated.
    fn pair_sized(
        config: &SessionConfig,
        max_datagram: usize,
        t0: Instant,
    ) -> (Session, MapSink, Session, MapSink) {
        let secret = [9u8; 32];
        let (mut cs, mut ss) = (MapSink::default(), MapSink::default());
        let c = Session::new(
            &secret,
            Side::Client,
            config,
            max_datagram,
            t0,
            [3; 32],
            &mut cs,
        );
        let s = Session::new(
            &secret,
            Side::Server,
            config,
            max_datagram,
            t0,
            [4; 32],
            &mut ss,
        );
        (c, cs, s, ss)
    }

    /// Hands one datagram to `to`, looking its packet number up by token.
    fn deliver(to: &mut Session, sink: &mut MapSink, now: Instant, datagram: &mut [u8]) {
        let token = u64::from_le_bytes(datagram[..TOKEN_LEN].try_into().unwrap());
        let pn = sink.0[&token];
        to.handle_packet(now, pn, datagram, sink).unwrap();
    }

    /// Reads every stream byte the session holds; returns how many.
    fn read_all(s: &mut Session) -> usize {
        let mut got = 0;
        let mut scratch = vec![0u8; 64 * 1024];
        while let Some(ev) = s.poll_event() {
            if let TransportEvent::StreamOpened { id, .. } = ev {
                s.transport_mut().accept_stream(id).unwrap();
            }
            if let TransportEvent::StreamOpened { id, .. } | TransportEvent::StreamReadable { id } =
                ev
            {
                while let Ok(n) = s.transport_mut().stream_read(id, &mut scratch) {
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
            }
        }
        got
    }

    fn bulk_config() -> SessionConfig {
        let mut config = SessionConfig::default();
        config.transport.initial_cwnd_packets = 256;
        config
    }

    #[test]
    fn a_batch_holds_full_size_datagrams_that_each_open_at_the_peer_in_order() {
        let t0 = Instant::now();
        let (mut c, _, mut s, mut ss) = pair(&bulk_config(), t0);
        let dest = Destination::domain("example.com", 443).unwrap();
        let t = c.transport_mut();
        let id = t.open_stream(dest).unwrap();
        let written = t.stream_write(id, &[0x5A; 64 * 1024]).unwrap();
        let now = t0 + Duration::from_millis(50);
        let mut buf = vec![0u8; 65_507];
        let batch = c.poll_transmit_batch(now, &mut buf, 8).expect("a batch");
        assert_eq!(batch.segment, 1350, "full-size datagrams");
        assert!(batch.count() >= 2, "{batch:?}");
        assert!(batch.count() <= 8);
        assert_eq!(
            batch.len,
            batch.count() * batch.segment,
            "all full: {batch:?}"
        );
        for datagram in buf[..batch.len].chunks_mut(batch.segment) {
            deliver(&mut s, &mut ss, now, datagram);
        }
        assert_eq!(s.secure_stats().packets_received, batch.count() as u64);
        let got = read_all(&mut s);
        assert!(
            got > 0 && got < written,
            "the stream bytes arrived in order: {got}"
        );
    }

    /// With 1,472 negotiated, the first transmit is a path-MTU probe (a padded PING) sent alone
    /// (a segmented send whose segment size the path may refuse must not carry data with it);
    /// once the peer's ACK confirms it, batches carry 1,472-byte segments.
    #[test]
    fn a_probe_goes_alone_and_once_confirmed_batches_are_full_size() {
        let t0 = Instant::now();
        let (mut c, mut cs, mut s, mut ss) = pair_sized(&bulk_config(), MAX_DATAGRAM, t0);
        assert_eq!(c.current_max_datagram(), BASE_DATAGRAM);
        let dest = Destination::domain("example.com", 443).unwrap();
        let id = c.transport_mut().open_stream(dest).unwrap();
        c.transport_mut().stream_write(id, &[7; 64 * 1024]).unwrap();
        let now = t0 + Duration::from_millis(50);
        let mut buf = vec![0u8; 65_507];
        let batch = c.poll_transmit_batch(now, &mut buf, 8).expect("a batch");
        assert_eq!(batch, Batch::single(MAX_DATAGRAM), "the probe alone");
        deliver(&mut s, &mut ss, now, &mut buf[..batch.len]);
        let batch = c.poll_transmit_batch(now, &mut buf, 8).expect("a batch");
        assert_eq!(
            batch.segment, BASE_DATAGRAM,
            "then data at the current size"
        );
        for datagram in buf[..batch.len].chunks_mut(batch.segment) {
            deliver(&mut s, &mut ss, now, datagram);
        }
        let mut reply = vec![0u8; MAX_DATAGRAM];
        let later = now + Duration::from_millis(30);
        s.handle_timeout(later);
        while let Some(n) = s.poll_transmit(later, &mut reply) {
            deliver(&mut c, &mut cs, later, &mut reply[..n]);
        }
        assert_eq!(c.current_max_datagram(), MAX_DATAGRAM, "probe confirmed");
        let batch = c.poll_transmit_batch(later, &mut buf, 8).expect("a batch");
        assert_eq!(batch.segment, MAX_DATAGRAM);
        assert!(batch.count() >= 2, "{batch:?}");
        assert_eq!(
            batch.len,
            batch.count() * MAX_DATAGRAM,
            "all full: {batch:?}"
        );
        for datagram in buf[..batch.len].chunks_mut(batch.segment) {
            deliver(&mut s, &mut ss, later, datagram);
        }
        assert!(read_all(&mut s) > 0);
    }

    #[test]
    fn a_shorter_datagram_ends_the_batch_and_a_short_first_one_goes_alone() {
        let t0 = Instant::now();
        let (mut c, _, mut s, mut ss) = pair(&bulk_config(), t0);
        let dest = Destination::domain("example.com", 443).unwrap();
        let id = c.transport_mut().open_stream(dest).unwrap();
        // Two and a bit datagrams of data.
        c.transport_mut().stream_write(id, &[1; 3000]).unwrap();
        let now = t0 + Duration::from_millis(50);
        let mut buf = vec![0u8; 65_507];
        let batch = c.poll_transmit_batch(now, &mut buf, 8).expect("a batch");
        assert_eq!(batch.segment, 1350);
        assert_eq!(batch.count(), 3, "{batch:?}");
        assert!(batch.len < 3 * batch.segment, "the last one is shorter");
        for datagram in buf[..batch.len].chunks_mut(batch.segment) {
            deliver(&mut s, &mut ss, now, datagram);
        }
        assert_eq!(read_all(&mut s), 3000);
        // A small write: its datagram is short, so it goes alone (the next could be larger).
        c.transport_mut().stream_write(id, &[2; 10]).unwrap();
        let batch = c.poll_transmit_batch(now, &mut buf, 8).expect("a batch");
        assert_eq!(batch.count(), 1);
        assert_eq!(batch.segment, batch.len);
        assert!(batch.len < 1350);
    }

    /// A bulk upload in lock-step 1 ms ticks (each datagram delivered at the next tick), the client
    /// sending in batches of up to `max_segments` (0: single `poll_transmit` calls). Returns the
    /// client's datagrams per tick and the sizes of its batches.
    fn upload(
        config: &SessionConfig,
        max_segments: usize,
        ticks: u32,
    ) -> (Vec<Vec<Vec<u8>>>, Vec<usize>) {
        let t0 = Instant::now();
        let (mut c, mut cs, mut s, mut ss) = pair(config, t0);
        let dest = Destination::domain("example.com", 443).unwrap();
        let id = c.transport_mut().open_stream(dest).unwrap();
        let mut buf = vec![0u8; 65_507];
        let (mut to_server, mut to_client): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (Vec::new(), Vec::new());
        let (mut per_tick, mut batches) = (Vec::new(), Vec::new());
        for tick in 0..ticks {
            // Idle first: the pacer's burst allowance is full at the first tick.
            let now = t0 + Duration::from_millis(50 + u64::from(tick));
            for mut d in to_server.drain(..) {
                deliver(&mut s, &mut ss, now, &mut d);
            }
            read_all(&mut s);
            if s.poll_timeout().is_some_and(|t| t <= now) {
                s.handle_timeout(now);
            }
            while let Some(n) = s.poll_transmit(now, &mut buf) {
                to_client.push(buf[..n].to_vec());
            }
            for mut d in to_client.drain(..) {
                deliver(&mut c, &mut cs, now, &mut d);
            }
            while c.poll_event().is_some() {}
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
            let _ = c.transport_mut().stream_write(id, &[7; 64 * 1024]);
            let mut sent = Vec::new();
            if max_segments == 0 {
                while let Some(n) = c.poll_transmit(now, &mut buf) {
                    sent.push(buf[..n].to_vec());
                }
            } else {
                while let Some(b) = c.poll_transmit_batch(now, &mut buf, max_segments) {
                    batches.push(b.count());
                    sent.extend(buf[..b.len].chunks(b.segment).map(<[u8]>::to_vec));
                }
            }
            to_server.extend(sent.iter().cloned());
            per_tick.push(sent);
        }
        (per_tick, batches)
    }

    /// Batches are exactly the datagrams single sends would produce at the same instants: the
    /// congestion window and the pacer decide as before, a batch only groups them.
    #[test]
    fn batches_respect_the_congestion_window_and_the_pacer_like_single_sends() {
        // Congestion-window limited: a pacer burst far larger than the window.
        let mut cwnd_bound = SessionConfig::default();
        cwnd_bound.transport.initial_cwnd_packets = 8;
        cwnd_bound.transport.pacing_burst = Duration::from_secs(1);
        // Pacer limited: a large window, the default 2 ms burst.
        let pacer_bound = bulk_config();
        // (what, config, most datagrams in the first flight: the limit, not the 48 datagrams of
        // data written)
        for (what, config, limit) in [("cwnd", cwnd_bound, 9), ("pacer", pacer_bound, 20)] {
            let (singles, _) = upload(&config, 0, 40);
            let (batched, sizes) = upload(&config, 16, 40);
            assert_eq!(
                batched, singles,
                "{what}: the same datagrams at the same ticks"
            );
            assert!(
                sizes.iter().any(|n| *n > 1),
                "{what}: some batch held several"
            );
            assert!(
                sizes.iter().all(|n| (1..=16).contains(n)),
                "{what}: {sizes:?}"
            );
            let first = singles[0].len();
            assert!(
                (2..=limit).contains(&first),
                "{what}: the first flight was limited ({first} datagrams)"
            );
        }
    }

    /// Delivers every packet either side has to send to the other, until both are quiet.
    /// Returns the client's packets as delivered (for replays).
    fn exchange(
        now: Instant,
        (client, client_sink): (&mut Session, &mut MapSink),
        (server, server_sink): (&mut Session, &mut MapSink),
    ) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut sent = Vec::new();
        loop {
            let mut moved = false;
            while let Some(n) = client.poll_transmit(now, &mut buf) {
                sent.push(buf[..n].to_vec());
                let token = u64::from_le_bytes(buf[..TOKEN_LEN].try_into().unwrap());
                let pn = server_sink.0[&token];
                server
                    .handle_packet(now, pn, &mut buf[..n], server_sink)
                    .unwrap();
                moved = true;
            }
            while let Some(n) = server.poll_transmit(now, &mut buf) {
                let token = u64::from_le_bytes(buf[..TOKEN_LEN].try_into().unwrap());
                let pn = client_sink.0[&token];
                client
                    .handle_packet(now, pn, &mut buf[..n], client_sink)
                    .unwrap();
                moved = true;
            }
            if !moved {
                return sent;
            }
        }
    }

    /// Issue 9: keep-alives of an idle session do not grow its token window (it used to gain a
    /// registered token per received packet, up to the full window); a bulk transfer grows it to
    /// the configured size; replays stay dropped after growth.
    #[test]
    fn the_receive_window_grows_with_a_bulk_transfer_not_with_keep_alives() {
        let t0 = Instant::now();
        let (mut client, mut client_sink, mut server, mut server_sink) =
            pair(&SessionConfig::default(), t0);
        let mut now = t0;
        exchange(
            now,
            (&mut client, &mut client_sink),
            (&mut server, &mut server_sink),
        );
        // Ten minutes of idleness: keep-alives both ways.
        for _ in 0..120 {
            now += Duration::from_secs(5);
            client.handle_timeout(now);
            server.handle_timeout(now);
            exchange(
                now,
                (&mut client, &mut client_sink),
                (&mut server, &mut server_sink),
            );
        }
        assert!(
            client.secure_stats().packets_sent >= 40,
            "keep-alives flowed"
        );
        assert!(!server.is_closed());
        assert_eq!(
            server_sink.0.len() as u64,
            INITIAL_AHEAD,
            "idle: minimum look-ahead"
        );
        // A bulk upload: the window grows to its configured size.
        let dest = Destination::domain("example.com", 443).unwrap();
        let id = client.transport_mut().open_stream(dest).unwrap();
        let mut delivered = Vec::new();
        for _ in 0..400 {
            now += Duration::from_millis(1);
            let t = client.transport_mut();
            t.stream_write(id, &[0x5A; 16 * 1024]).unwrap();
            client.handle_timeout(now);
            server.handle_timeout(now);
            delivered.extend(exchange(
                now,
                (&mut client, &mut client_sink),
                (&mut server, &mut server_sink),
            ));
            while let Some(ev) = server.poll_event() {
                if let TransportEvent::StreamOpened { id, .. } = ev {
                    server.transport_mut().accept_stream(id).unwrap();
                }
            }
            let mut sink = [0u8; 64 * 1024];
            while server
                .transport_mut()
                .stream_read(id, &mut sink)
                .is_ok_and(|n| n > 0)
            {}
        }
        let window = server.rx_tokens.end() - server.rx_tokens.base();
        assert_eq!(window, 2048, "grown to the configured window");
        assert!(
            server_sink.0.len() > 1500,
            "{} registered",
            server_sink.0.len()
        );
        // Replays of old and recent packets: their tokens are gone, and the replay window
        // rejects them even when handed the packet number directly.
        let replays_before = server.secure_stats().replays_dropped;
        for packet in [
            &delivered[0],
            &delivered[delivered.len() / 2],
            delivered.last().unwrap(),
        ] {
            let token = u64::from_le_bytes(packet[..TOKEN_LEN].try_into().unwrap());
            assert!(
                !server_sink.0.contains_key(&token),
                "a used token is unregistered"
            );
        }
        let last = server.replay.highest().unwrap();
        let mut replay = delivered.last().unwrap().clone();
        assert_eq!(
            server.handle_packet(now, last, &mut replay, &mut server_sink),
            Err(PacketError::Replay)
        );
        assert_eq!(server.secure_stats().replays_dropped, replays_before + 1);
    }

    #[test]
    fn packet_numbers_are_restored_from_their_low_bits_above_the_window_base() {
        assert_eq!(at_or_above(0, 63), 63);
        assert_eq!(at_or_above(100, 100), 100);
        assert_eq!(at_or_above(100, 99), (1 << 16) + 99, "a whole window above");
        let base = (1 << 32) - 10;
        assert_eq!(at_or_above(base, u16::MAX - 3), (1 << 32) - 4);
        assert_eq!(
            at_or_above(base, 5),
            (1 << 32) + 5,
            "across the 2^32 boundary"
        );
        assert_eq!(at_or_above(7 << 32, 2047), (7 << 32) + 2047);
        assert_eq!(at_or_above((7 << 32) + 70_000, 4_465), (7 << 32) + 70_001);
        // Every packet number of a widest window comes back from its low 16 bits.
        let base = (3 << 32) + 12_345;
        for pn in (base..base + MAX_WINDOW as u64).step_by(97) {
            assert_eq!(at_or_above(base, pn as u16), pn);
        }
    }

    #[test]
    fn expand_u32_picks_the_closest_candidate() {
        assert_eq!(expand_u32(0, 64), 64);
        assert_eq!(expand_u32(5_000_000_000, 705_032_704 + 100), 5_000_000_100);
        assert_eq!(expand_u32((1 << 32) + 10, u32::MAX - 5), (1 << 32) - 6);
        assert_eq!(expand_u32((1 << 32) - 10, 20), (1 << 32) + 20);
    }
}
