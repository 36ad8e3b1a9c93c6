//! The reliable multiplexed transport of OSTP: a sans-IO state machine that turns application
//! stream writes and unreliable datagrams into transport payloads (sequences of frames), and
//! received payloads back into ordered stream data and events.
//!
//! It owns reliability (selective-repeat ARQ with SACK ranges, RACK-style loss detection, probe
//! timeouts with exponential backoff), congestion control (BBR-style, pacing), per-stream and
//! per-session flow control, stream lifecycle (open with a destination, open result, data,
//! half-close, reset), keepalive, idle timeout and graceful close. Packet protection
//! (encryption, packet-number hiding, padding) belongs to the layer below, which hands us
//! authenticated payloads with their packet numbers and asks us for the next payload to send.
//! Over the TCP carrier ([`Transport::new_reliable`], docs/PROTOCOL.md §7.5) a packet written
//! counts as delivered: no ACKs, retransmission, loss detection, congestion control or pacing.
//!
//! Nothing here reads the clock, touches sockets or allocates per packet on the data path.
//! Every buffer is bounded by [`TransportConfig`].
//!
//! Where things live: this file holds [`Transport`] (recovery, ACKs, the session's own frames,
//! datagrams, close and the public API); `streams.rs` the stream set, its queues and session
//! flow control; `stream.rs` one stream's halves; `timer.rs` the named timers; `ack.rs` when an
//! ACK is owed and due; `recovery.rs`, `congestion.rs`, `pacing.rs` and `flow.rs` the
//! algorithms; `pmtu.rs` path-MTU discovery (the packet size); `frame.rs` the wire format.

mod ack;
mod codes;
mod congestion;
mod dest;
mod flow;
pub mod frame;
mod pacing;
mod pmtu;
mod ranges;
mod recovery;
mod ring;
mod stream;
mod streams;
mod timer;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub use codes::{CloseReason, OpenResult, ResetReason};
pub use congestion::BbrState;
pub use dest::Destination;
pub use frame::{AssocId, FrameError};
pub use pmtu::PmtuStats;
pub use stream::{BEYOND_WINDOW_SLACK, StreamId};

use ack::{AckState, AckUrgency};
use congestion::{AckEvent, Bbr, DeliveryRate};
use frame::{AckFrame, Frame, Reader, Writer};
use pacing::Pacer;
use pmtu::Pmtud;
use recovery::{
    INITIAL_PACKET_THRESHOLD, MAX_ACK_DELAY, MAX_PACKET_THRESHOLD, MAX_PTO, PacketState,
    RttEstimator, SentFrame, SentLog, SentPacket,
};
use streams::StreamsState;
use timer::{Timer, TimerTable};

/// Stream window every endpoint may assume before the peer's SETTINGS arrive.
pub const INITIAL_STREAM_WINDOW: u64 = 64 * 1024;
/// Session window every endpoint may assume before the peer's SETTINGS arrive.
pub const INITIAL_SESSION_WINDOW: u64 = 256 * 1024;
/// Concurrent streams every endpoint may open before the peer's SETTINGS arrive.
pub const INITIAL_MAX_STREAMS: u64 = 16;
/// Smallest `max_payload` the transport works with.
pub const MIN_PAYLOAD: usize = 512;
/// ACK ranges written per ACK frame.
const MAX_ACK_RANGES_SENT: usize = 32;
/// Received packet-number ranges remembered for ACKs (oldest dropped first).
const RECV_PN_RANGES: usize = 64;
/// How many times a closing endpoint repeats CLOSE in answer to incoming packets.
const MAX_CLOSE_REPEATS: u32 = 4;

/// Which end of the session this is. Client-opened stream ids are even, server-opened odd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// Limits and timers. Defaults suit a router: memory per session is bounded by the windows.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Bytes of frames per packet (the secure layer passes MTU minus its overhead): the safe
    /// start of path-MTU discovery, and the limit for unreliable datagrams.
    pub max_payload: usize,
    /// Path-MTU discovery probes up to this payload size (off when not above `max_payload`).
    pub pmtu_max_payload: usize,
    /// With discovery on, black-holed packets make the size fall back at most to this.
    pub pmtu_floor_payload: usize,
    /// Receive window per stream (bytes the peer may send beyond what we read).
    pub stream_window: u64,
    /// Receive window for the whole session (all streams together).
    pub session_window: u64,
    /// Concurrent streams the peer may have open towards us.
    pub max_streams: u64,
    /// Send buffer per stream: `stream_write` accepts at most this much unacknowledged data.
    pub send_buffer: usize,
    /// Send buffer for all streams of the session together.
    pub session_send_buffer: usize,
    /// Close the session when nothing was received for this long.
    pub idle_timeout: Duration,
    /// Send a PING when nothing was sent for this long.
    pub keepalive_interval: Duration,
    /// RTT assumed before the first sample.
    pub initial_rtt: Duration,
    /// Datagrams queued for sending, and received datagram events pending, at most.
    pub max_datagram_queue: usize,
    /// Reassembly gaps tolerated per stream before packets are dropped unacknowledged.
    pub max_recv_ranges: usize,
    /// Initial congestion window in packets.
    pub initial_cwnd_packets: u64,
    /// Sent packets tracked at most (bounds in-flight bookkeeping).
    pub max_tracked_packets: usize,
    /// Shortest pacing burst (in sending time; at least 10 full packets): the pacer lets this
    /// much go at once after idle, and wakes the loop when half of it has refilled.
    pub pacing_burst: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            max_payload: 1200,
            pmtu_max_payload: 1200,
            pmtu_floor_payload: 1200,
            stream_window: 2 * 1024 * 1024,
            session_window: 4 * 1024 * 1024,
            max_streams: 128,
            send_buffer: 2 * 1024 * 1024,
            session_send_buffer: 4 * 1024 * 1024,
            idle_timeout: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(15),
            initial_rtt: Duration::from_millis(100),
            max_datagram_queue: 64,
            max_recv_ranges: 512,
            initial_cwnd_packets: 32,
            max_tracked_packets: 16 * 1024,
            pacing_burst: Duration::from_millis(2),
        }
    }
}

impl TransportConfig {
    /// Clamps values to what the protocol needs (windows not below the initial values, etc.).
    fn sanitized(mut self) -> Self {
        self.max_payload = self.max_payload.clamp(MIN_PAYLOAD, 65_000);
        self.pmtu_max_payload = self.pmtu_max_payload.clamp(self.max_payload, 65_000);
        self.pmtu_floor_payload = self.pmtu_floor_payload.clamp(MIN_PAYLOAD, self.max_payload);
        self.stream_window = self.stream_window.clamp(INITIAL_STREAM_WINDOW, 1 << 30);
        self.session_window = self
            .session_window
            .clamp(INITIAL_SESSION_WINDOW.max(self.stream_window), 1 << 32);
        self.max_streams = self.max_streams.clamp(INITIAL_MAX_STREAMS, 1 << 16);
        self.send_buffer = self.send_buffer.clamp(4096, 1 << 30);
        // Under 4 GiB: the streams count bytes beyond the peer's windows in 32 bits.
        let session_send_max = usize::try_from(u32::MAX).unwrap_or(usize::MAX);
        self.session_send_buffer =
            (self.session_send_buffer).clamp(self.send_buffer, session_send_max);
        self.max_datagram_queue = self.max_datagram_queue.clamp(1, 4096);
        self.max_recv_ranges = self.max_recv_ranges.clamp(8, 1 << 16);
        self.initial_cwnd_packets = self.initial_cwnd_packets.clamp(4, 1024);
        self.max_tracked_packets = self.max_tracked_packets.clamp(64, 1 << 20);
        self
    }
}

/// What a transport reads of its [`TransportConfig`] after it is made (the rest went into its
/// parts when they were built): 96 bytes kept per session, not 160.
#[derive(Debug, Clone, Copy)]
struct KeptConfig {
    idle_timeout: Duration,
    keepalive_interval: Duration,
    initial_rtt: Duration,
    pacing_burst: Duration,
    session_window: u64,
    /// At most 65,000 (sanitized): the congestion controller's packet size.
    max_payload: u32,
    /// At most 1,024.
    initial_cwnd_packets: u32,
    /// At most 2^30 (sanitized).
    stream_window: u32,
    /// At most 4,096.
    max_datagram_queue: u32,
    /// At most 2^20.
    max_tracked_packets: u32,
}

impl KeptConfig {
    /// From a sanitized config (so every value fits).
    fn of(config: &TransportConfig) -> Self {
        KeptConfig {
            idle_timeout: config.idle_timeout,
            keepalive_interval: config.keepalive_interval,
            initial_rtt: config.initial_rtt,
            pacing_burst: config.pacing_burst,
            session_window: config.session_window,
            max_payload: config.max_payload as u32,
            initial_cwnd_packets: config.initial_cwnd_packets as u32,
            stream_window: config.stream_window as u32,
            max_datagram_queue: config.max_datagram_queue as u32,
            max_tracked_packets: config.max_tracked_packets as u32,
        }
    }
}

/// Congestion control, delivery-rate sampling and pacing (552 bytes): only a session that sends
/// stream data or datagrams needs them. Made when such data is first pending, dropped when the
/// keep-alive timer finds nothing sent for `keepalive_interval` and nothing in flight, so the
/// next burst starts from the initial window again (as TCP restarts after an idle period,
/// RFC 5681 §4.1). Meanwhile control packets (ACK, PING, SETTINGS, MAX_DATA) go unpaced and
/// outside any window; they are few and small.
#[derive(Debug)]
struct Flow {
    cc: Bbr,
    rate: DeliveryRate,
    pacer: Pacer,
}

impl Flow {
    fn new(config: &KeptConfig, now: Instant) -> Self {
        let mss = config.max_payload as usize;
        let cc = Bbr::new(
            now,
            mss,
            u64::from(config.initial_cwnd_packets),
            config.initial_rtt,
        );
        let pacer = Pacer::new(now, config.pacing_burst, mss, cc.pacing_rate());
        Flow {
            cc,
            rate: DeliveryRate::new(now),
            pacer,
        }
    }
}

/// Something the application should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportEvent {
    /// The peer opened a stream towards `dest`; answer with [`Transport::answer_open`].
    StreamOpened {
        id: StreamId,
        dest: Destination,
    },
    /// The peer answered our open.
    StreamOpenResult {
        id: StreamId,
        result: OpenResult,
    },
    StreamReadable {
        id: StreamId,
    },
    StreamWritable {
        id: StreamId,
    },
    /// The peer finished its direction; all its data is available to read.
    StreamFinished {
        id: StreamId,
    },
    StreamReset {
        id: StreamId,
        reason: ResetReason,
    },
    /// More streams may be opened (after `open_stream` returned `TooManyStreams`).
    StreamsAvailable,
    /// A datagram of the peer's association `assoc` (0: none given).
    Datagram {
        assoc: AssocId,
        dest: Destination,
        data: Vec<u8>,
    },
    Closed {
        reason: CloseReason,
        by_peer: bool,
    },
}

/// A received payload was invalid; the session is closing with `ProtocolViolation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportError {
    Frame(FrameError),
    /// ACK for a packet number never sent.
    InvalidAck,
    /// Data beyond a stream or session window.
    FlowControl,
    /// Data or reset inconsistent with a stream's final size.
    FinalSize,
    /// The peer used a stream id it may not use.
    StreamLimit,
    /// A frame that is not allowed in this state or direction.
    UnexpectedFrame,
}

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("transport protocol violation: ")?;
        match self {
            TransportError::Frame(e) => write!(f, "malformed frame: {e}"),
            TransportError::InvalidAck => f.write_str("ACK for a packet number never sent"),
            TransportError::FlowControl => f.write_str("data beyond a stream or session window"),
            TransportError::FinalSize => {
                f.write_str("data or reset inconsistent with a stream's final size")
            }
            TransportError::StreamLimit => f.write_str("stream id beyond the allowed streams"),
            TransportError::UnexpectedFrame => {
                f.write_str("frame not allowed in this state or direction")
            }
        }
    }
}

impl std::error::Error for TransportError {}

impl From<FrameError> for TransportError {
    fn from(e: FrameError) -> Self {
        TransportError::Frame(e)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamError {
    /// No such stream was ever opened.
    UnknownStream,
    /// The stream finished and was cleaned up.
    Closed,
    /// The stream was reset.
    Reset(ResetReason),
    /// Nothing to read right now (not finished).
    Blocked,
    /// The write side was already finished.
    Finished,
    /// The peer's stream limit is reached; wait for `StreamsAvailable`.
    TooManyStreams,
    /// The stream is not in a state that allows this call.
    InvalidState,
    /// The session is closed or closing.
    SessionClosed,
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::UnknownStream => f.write_str("no such stream was ever opened"),
            StreamError::Closed => f.write_str("stream finished and was cleaned up"),
            StreamError::Reset(reason) => write!(f, "stream was reset: {reason}"),
            StreamError::Blocked => f.write_str("no stream data to read yet"),
            StreamError::Finished => f.write_str("stream's write side is already finished"),
            StreamError::TooManyStreams => {
                f.write_str("peer's stream limit reached; wait for StreamsAvailable")
            }
            StreamError::InvalidState => f.write_str("stream is not in a state that allows this"),
            StreamError::SessionClosed => f.write_str("session is closed or closing"),
        }
    }
}

impl std::error::Error for StreamError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramError {
    /// Larger than [`Transport::max_datagram_size`].
    TooLarge,
    /// The outgoing datagram queue is full; the datagram was dropped.
    QueueFull,
    /// The session is closed or closing.
    SessionClosed,
}

impl std::fmt::Display for DatagramError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DatagramError::TooLarge => "datagram larger than the path allows",
            DatagramError::QueueFull => "datagram queue full; datagram dropped",
            DatagramError::SessionClosed => "session is closed or closing",
        })
    }
}

impl std::error::Error for DatagramError {}

/// Counters and estimates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransportStats {
    pub smoothed_rtt: Duration,
    pub min_rtt: Duration,
    pub rtt_var: Duration,
    pub cwnd: u64,
    pub bytes_in_flight: u64,
    /// Bytes per second.
    pub pacing_rate: u64,
    /// Bytes per second.
    pub bandwidth_estimate: u64,
    pub packets_sent: u64,
    /// Packets sent that carried nothing but an ACK (and padding).
    pub ack_only_sent: u64,
    /// ACK frames sent (alone or with other frames; always 0 over a reliable carrier).
    pub ack_frames_sent: u64,
    pub packets_received: u64,
    pub packets_lost: u64,
    /// Packets declared lost that were acknowledged later (reordering).
    pub spurious_losses: u64,
    /// Received packets dropped unacknowledged for lack of reassembly state.
    pub packets_dropped: u64,
    pub pto_count: u64,
    /// Stream bytes sent for the first time / sent again.
    pub stream_bytes_sent: u64,
    /// Stream bytes queued again after a loss: the inner retransmissions (always 0 over a
    /// reliable carrier, where nothing is ever declared lost).
    pub stream_bytes_retransmitted: u64,
    /// Stream bytes delivered to the application.
    pub stream_bytes_received: u64,
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    pub datagrams_dropped: u64,
    pub streams_open: u64,
    /// Bytes held in stream receive buffers (what an unread application costs).
    pub recv_buffered: u64,
    /// Bytes held in stream send buffers.
    pub send_buffered: u64,
}

/// The counters a transport keeps ([`TransportStats`] adds the estimates and stream figures it
/// reads from elsewhere when asked, so a session does not store them twice).
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    packets_sent: u64,
    ack_only_sent: u64,
    ack_frames_sent: u64,
    packets_received: u64,
    packets_lost: u64,
    spurious_losses: u64,
    packets_dropped: u64,
    pto_count: u64,
    datagrams_sent: u64,
    datagrams_received: u64,
    datagrams_dropped: u64,
}

/// Per-stream accounting (for charging users).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub send_buffered: u64,
    pub recv_buffered: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// Repeating CLOSE until [`Timer::Close`] fires.
    Closing {
        reason: CloseReason,
    },
    Closed,
}

/// Outcome of applying one frame.
enum FrameOutcome {
    Continue,
    /// Stop processing this payload and do not acknowledge it (resource limit).
    DropPacket,
    /// A CLOSE was received; ignore the rest.
    Closed,
}

/// The transport state machine of one session.
///
/// Over fifteen fields because loss recovery and ACK generation share one packet-number space
/// and one send path; everything about streams is grouped in `StreamsState` (`streams.rs`).
#[derive(Debug)]
pub struct Transport {
    config: KeptConfig,
    side: Side,
    state: State,
    last_now: Instant,
    timers: TimerTable,

    // Sending and recovery.
    next_pn: u64,
    sent: SentLog,
    largest_acked: Option<u64>,
    bytes_in_flight: u64,
    rtt: RttEstimator,
    pto_count: u32,
    last_ack_eliciting_sent: Option<Instant>,
    /// `None` while no stream data or datagram is being sent ([`Flow`]).
    flow: Option<Box<Flow>>,
    pmtu: Pmtud,
    lost_scratch: Vec<SentFrame>,
    packet_threshold: u64,
    ack_runs: Vec<(u64, u64)>,

    // Receiving and ACK generation.
    acks: AckState,

    /// The stream set, its queues and session flow control.
    streams: StreamsState,

    // Session control frames.
    settings_pending: bool,
    /// SETTINGS or MAX_DATA was written once: the peer may know our session window.
    window_announced: bool,
    ping_pending: bool,
    close_pending: bool,
    close_repeats: u32,
    close_text: Vec<u8>,

    // Datagrams and events.
    datagrams_out: VecDeque<(AssocId, Destination, Vec<u8>)>,
    datagram_events: usize,
    events: VecDeque<TransportEvent>,

    stats: Counters,

    /// Reliable-carrier mode (docs/PROTOCOL.md §7.5): every packet written counts as delivered.
    reliable: bool,
}

impl Transport {
    /// A transport for a reliable carrier (the TCP carrier, docs/PROTOCOL.md §7.5): a packet
    /// written counts as delivered at once (its frames are acknowledged on the spot, so stream
    /// data leaves the send buffer); nothing is retransmitted; no loss detection, PTO,
    /// congestion window, pacer or path-MTU discovery (every packet may take `max_payload`);
    /// no ACK frames are sent and received ones are ignored. Flow control, keepalive, idle
    /// timeout, CLOSE and datagrams work as on UDP; a CLOSE written ends the session at once.
    pub fn new_reliable(mut config: TransportConfig, side: Side, now: Instant) -> Self {
        config.pmtu_max_payload = config.max_payload;
        config.pmtu_floor_payload = config.max_payload;
        let mut transport = Self::new(config, side, now);
        transport.reliable = true;
        transport
    }

    /// Whether this transport runs in reliable-carrier mode ([`Transport::new_reliable`]).
    pub fn is_reliable(&self) -> bool {
        self.reliable
    }

    pub fn new(config: TransportConfig, side: Side, now: Instant) -> Self {
        let config = config.sanitized();
        let mut timers = TimerTable::default();
        timers.set(Timer::Idle, now + config.idle_timeout);
        timers.set(Timer::KeepAlive, now + config.keepalive_interval);
        Self {
            side,
            state: State::Open,
            last_now: now,
            timers,
            next_pn: 0,
            sent: SentLog::new(),
            largest_acked: None,
            bytes_in_flight: 0,
            rtt: RttEstimator::new(config.initial_rtt),
            pto_count: 0,
            last_ack_eliciting_sent: None,
            flow: None,
            pmtu: Pmtud::new(
                config.pmtu_floor_payload,
                config.max_payload,
                config.pmtu_max_payload,
                now,
            ),
            lost_scratch: Vec::new(),
            packet_threshold: INITIAL_PACKET_THRESHOLD,
            ack_runs: Vec::new(),
            acks: AckState::new(RECV_PN_RANGES),
            streams: StreamsState::new(&config, side),
            settings_pending: true,
            window_announced: false,
            ping_pending: false,
            close_pending: false,
            close_repeats: 0,
            close_text: Vec::new(),
            datagrams_out: VecDeque::new(),
            datagram_events: 0,
            events: VecDeque::new(),
            stats: Counters::default(),
            config: KeptConfig::of(&config),
            reliable: false,
        }
    }

    pub fn side(&self) -> Side {
        self.side
    }

    // ------------------------------------------------------------------ receiving

    /// Processes the authenticated, decrypted payload of packet `pn` (the secure layer already
    /// rejected replays). On error the session is closing with `ProtocolViolation`.
    pub fn handle_payload(
        &mut self,
        now: Instant,
        pn: u64,
        payload: &[u8],
    ) -> Result<(), TransportError> {
        self.last_now = now;
        match self.state {
            State::Closed => return Ok(()),
            State::Closing { .. } => {
                if self.close_repeats < MAX_CLOSE_REPEATS {
                    self.close_pending = true;
                }
                return Ok(());
            }
            State::Open => {}
        }
        let mut reader = Reader::new(payload);
        let mut ack_eliciting = false;
        while !reader.is_empty() {
            let frame = match frame::parse_frame(&mut reader) {
                Ok(f) => f,
                Err(e) => return Err(self.violation(now, e.into())),
            };
            if !matches!(frame, Frame::Padding | Frame::Ack(_) | Frame::Close { .. }) {
                ack_eliciting = true;
            }
            match self.apply_frame(now, frame) {
                Ok(FrameOutcome::Continue) => {}
                Ok(FrameOutcome::DropPacket) => {
                    self.stats.packets_dropped += 1;
                    return Ok(());
                }
                Ok(FrameOutcome::Closed) => return Ok(()),
                Err(e) => return Err(self.violation(now, e)),
            }
        }
        self.stats.packets_received += 1;
        self.timers.set(Timer::Idle, now + self.config.idle_timeout);
        if !self.reliable {
            self.on_packet_received(now, pn, ack_eliciting);
        }
        Ok(())
    }

    fn on_packet_received(&mut self, now: Instant, pn: u64, ack_eliciting: bool) {
        let urgency = self.acks.on_received(now, pn, ack_eliciting);
        if urgency == AckUrgency::Delayed && !self.timers.is_armed(Timer::AckDelay) {
            self.timers
                .set(Timer::AckDelay, now + ack::ack_delay(self.rtt.smoothed));
        }
    }

    fn violation(&mut self, now: Instant, error: TransportError) -> TransportError {
        log::debug!("transport: closing on protocol violation {error:?}");
        self.close_inner(now, CloseReason::ProtocolViolation, b"");
        error
    }

    fn apply_frame(
        &mut self,
        now: Instant,
        frame: Frame<'_>,
    ) -> Result<FrameOutcome, TransportError> {
        match frame {
            Frame::Padding | Frame::Ping => {}
            // Over a reliable carrier every packet was delivered when written: ACKs mean nothing.
            Frame::Ack(_) if self.reliable => {}
            Frame::Ack(ack) => self.on_ack_frame(now, &ack)?,
            Frame::StreamOpen { id, dest } => {
                self.streams
                    .on_stream_open(StreamId(id), dest, &mut self.events)?
            }
            Frame::OpenOk { id } => self.streams.on_open_ok(StreamId(id), &mut self.events)?,
            Frame::ResetStream {
                id,
                reason,
                final_size,
            } => {
                self.streams
                    .on_reset_stream(StreamId(id), reason, final_size, &mut self.events)?
            }
            Frame::MaxData(max) => self.streams.on_max_data(max),
            Frame::MaxStreamData { id, max } => {
                self.streams.on_max_stream_data(StreamId(id), max)?;
                // A writer held by the old limit may write again.
                self.streams.wake_writers(&mut self.events)
            }
            Frame::MaxStreams(n) => self.streams.raise_peer_max_streams(n, &mut self.events),
            Frame::Settings {
                stream_window,
                session_window,
                max_streams,
            } => self.streams.on_settings(
                stream_window,
                session_window,
                max_streams,
                &mut self.events,
            ),
            Frame::Datagram { assoc, dest, data } => {
                if self.datagram_events < self.config.max_datagram_queue as usize {
                    self.datagram_events += 1;
                    self.stats.datagrams_received += 1;
                    self.events.push_back(TransportEvent::Datagram {
                        assoc,
                        dest,
                        data: data.to_vec(),
                    });
                } else {
                    self.stats.datagrams_dropped += 1;
                }
            }
            Frame::Close { reason, .. } => {
                self.enter_closed(reason, true);
                return Ok(FrameOutcome::Closed);
            }
            Frame::Stream {
                id,
                offset,
                data,
                fin,
            } => {
                return self.streams.on_stream_frame(
                    StreamId(id),
                    offset,
                    data,
                    fin,
                    &mut self.events,
                );
            }
        }
        Ok(FrameOutcome::Continue)
    }

    fn on_ack_frame(&mut self, now: Instant, ack: &AckFrame<'_>) -> Result<(), TransportError> {
        if ack.largest >= self.next_pn {
            return Err(TransportError::InvalidAck);
        }
        let mut bytes_acked = 0u64;
        let mut largest_newly_acked: Option<(u64, Instant, bool)> = None;
        let loss_delay = self.rtt.loss_delay();
        // Runs of packets to resolve: the first few on the stack (an idle session's ACKs carry
        // one: no heap block kept per session), more in `ack_runs` (kept for the next ACK).
        let mut first = [(0u64, 0u64); 4];
        let mut first_len = 0;
        let mut runs = std::mem::take(&mut self.ack_runs);
        runs.clear();
        for (lo, hi) in ack.ranges() {
            self.pmtu.on_ack_range(lo, hi, now);
            self.sent
                .unresolved_in(lo, hi, |a, b| match first.get_mut(first_len) {
                    Some(slot) => {
                        *slot = (a, b);
                        first_len += 1;
                    }
                    None => runs.push((a, b)),
                });
        }
        for &(lo, hi) in first[..first_len].iter().chain(&runs) {
            for pn in lo..=hi {
                let Some(p) = self.sent.get_mut(pn) else {
                    break;
                };
                match p.state {
                    PacketState::Acked => continue,
                    PacketState::Lost => {
                        // Declared lost, yet it arrived: reordering. Tolerate more of it, and
                        // let the streams know the data was delivered after all.
                        p.state = PacketState::Acked;
                        self.pmtu.on_acked(pn, p.size as usize);
                        let count = p.frames().len();
                        let mut frames = [SentFrame::MaxData; recovery::MAX_FRAMES_PER_PACKET];
                        frames[..count].copy_from_slice(p.frames());
                        if p.ack_eliciting {
                            self.stats.spurious_losses += 1;
                            let distance = ack.largest.saturating_sub(pn) + 1;
                            self.packet_threshold = self
                                .packet_threshold
                                .max(distance.min(MAX_PACKET_THRESHOLD));
                        }
                        for f in &frames[..count] {
                            self.streams.on_frame_acked(*f);
                        }
                        continue;
                    }
                    PacketState::Outstanding => {}
                }
                p.state = PacketState::Acked;
                self.pmtu.on_acked(pn, p.size as usize);
                let (size, eliciting, time_sent) =
                    (u64::from(p.size), p.ack_eliciting, p.time_sent);
                let snapshot = p.delivery;
                let count = p.frames().len();
                let mut frames = [SentFrame::MaxData; recovery::MAX_FRAMES_PER_PACKET];
                frames[..count].copy_from_slice(p.frames());
                if largest_newly_acked.is_none_or(|(l, _, _)| pn > l) {
                    largest_newly_acked = Some((pn, time_sent, eliciting));
                }
                if eliciting {
                    self.bytes_in_flight -= size;
                    bytes_acked += size;
                    if let Some(flow) = self.flow.as_deref_mut() {
                        flow.rate.on_acked(now, &snapshot, size);
                    }
                }
                for f in &frames[..count] {
                    self.streams.on_frame_acked(*f);
                }
            }
            self.sent.mark_resolved(lo..hi + 1);
        }
        self.ack_runs = runs;
        self.pmtu.on_ack_frame(ack.largest, now, loss_delay);
        if self.largest_acked.is_none_or(|l| ack.largest > l) {
            self.largest_acked = Some(ack.largest);
        }
        let mut rtt_sample = None;
        let mut ack_delay = Duration::ZERO;
        if let Some((pn, time_sent, true)) = largest_newly_acked {
            if pn == ack.largest {
                let sample = now.saturating_duration_since(time_sent);
                let delay = Duration::from_micros(ack.delay_micros.min(1 << 32));
                self.rtt.update(sample, delay);
                rtt_sample = Some(sample);
                ack_delay = delay.min(MAX_ACK_DELAY);
            }
        }
        if largest_newly_acked.is_some() && self.pto_count > 0 {
            self.pto_count = 0;
            if let Some(flow) = self.flow.as_deref_mut() {
                flow.cc.on_recovered();
            }
        }
        self.detect_lost(now);
        if let Some(flow) = self.flow.as_deref_mut().filter(|_| bytes_acked > 0) {
            let min_rtt = flow.cc.min_rtt();
            let sample = flow.rate.take_sample(min_rtt);
            flow.cc.on_ack(&AckEvent {
                now,
                bytes_acked,
                bytes_in_flight: self.bytes_in_flight,
                rtt_sample,
                ack_delay,
                rate: sample,
                delivered: flow.rate.delivered(),
            });
        }
        self.sent.pop_resolved(self.lost_cutoff(now));
        if self.bytes_in_flight == 0 {
            self.last_ack_eliciting_sent = None;
        }
        self.arm_pto();
        self.streams.wake_writers(&mut self.events);
        Ok(())
    }

    fn on_frame_lost(&mut self, frame: SentFrame) {
        match frame {
            SentFrame::Settings => self.settings_pending = true,
            f => self.streams.on_frame_lost(f),
        }
    }

    fn detect_lost(&mut self, now: Instant) {
        self.timers.stop(Timer::LossDetection);
        let Some(largest) = self.largest_acked else {
            return;
        };
        let delay = self.rtt.loss_delay();
        let mut lost = std::mem::take(&mut self.lost_scratch);
        let mut lost_bytes = 0u64;
        let mut lost_packets = 0u64;
        let threshold = self.packet_threshold;
        let mut cursor = None;
        for (pn, p) in self.sent.iter_from_cursor() {
            if pn > largest {
                cursor = Some(pn);
                break;
            }
            if p.state != PacketState::Outstanding {
                continue;
            }
            if !p.ack_eliciting {
                p.state = PacketState::Lost;
                continue;
            }
            if pn + threshold <= largest || p.time_sent + delay <= now {
                p.state = PacketState::Lost;
                self.pmtu.on_lost(pn, p.size as usize);
                lost_bytes += u64::from(p.size);
                lost_packets += 1;
                lost.extend_from_slice(p.frames());
            } else {
                self.timers.set(Timer::LossDetection, p.time_sent + delay);
                cursor = Some(pn);
                break;
            }
        }
        if let Some(pn) = cursor {
            self.sent.advance_cursor(pn);
        }
        self.pmtu.on_losses(self.next_pn, false, now);
        self.bytes_in_flight -= lost_bytes;
        self.stats.packets_lost += lost_packets;
        for f in lost.drain(..) {
            self.on_frame_lost(f);
        }
        self.lost_scratch = lost;
        self.sent.pop_resolved(self.lost_cutoff(now));
        self.arm_pto();
    }

    /// Lost packets sent before this are forgotten (a late ACK for them is no longer expected).
    fn lost_cutoff(&self, now: Instant) -> Option<Instant> {
        now.checked_sub(self.rtt.smoothed * 2 + self.rtt.var * 4)
    }

    fn on_pto(&mut self, now: Instant) {
        self.pto_count = (self.pto_count + 1).min(16);
        self.stats.pto_count += 1;
        let mut lost = std::mem::take(&mut self.lost_scratch);
        let mut lost_bytes = 0;
        for (pn, p) in self.sent.iter_mut() {
            if p.in_flight() {
                p.state = PacketState::Lost;
                self.pmtu.on_lost(pn, p.size as usize);
                lost_bytes += u64::from(p.size);
                lost.extend_from_slice(p.frames());
            }
        }
        self.bytes_in_flight -= lost_bytes;
        self.pmtu.on_losses(self.next_pn, true, now);
        for f in lost.drain(..) {
            self.on_frame_lost(f);
        }
        self.lost_scratch = lost;
        self.sent.pop_resolved(self.lost_cutoff(now));
        self.timers.stop(Timer::LossDetection);
        if let Some(flow) = self.flow.as_deref_mut() {
            flow.cc.on_pto();
        }
        self.ping_pending = true;
        // The probe itself is armed from its own send time.
        self.last_ack_eliciting_sent = Some(now);
        self.arm_pto();
    }

    /// Re-arms [`Timer::Pto`] from its inputs (last ack-eliciting send, bytes in flight, PTO
    /// count, RTT); called wherever one of them changes.
    fn arm_pto(&mut self) {
        let deadline = self.pto_deadline();
        self.timers.set_or_stop(Timer::Pto, deadline);
    }

    fn pto_deadline(&self) -> Option<Instant> {
        let last = self.last_ack_eliciting_sent?;
        if self.bytes_in_flight == 0 && self.pto_count == 0 {
            return None;
        }
        let pto = self
            .rtt
            .pto_base()
            .saturating_mul(1u32 << self.pto_count.min(16))
            .min(MAX_PTO);
        Some(last + pto)
    }

    // ------------------------------------------------------------------ sending

    fn has_pending_eliciting(&self) -> bool {
        self.settings_pending
            || self.streams.max_data_pending
            || self.streams.max_streams_pending
            || self.ping_pending
            || !self.datagrams_out.is_empty()
            || self.streams.has_pending()
    }

    /// Stream data or datagrams wait to be sent (they need the [`Flow`] state).
    fn has_pending_data(&self) -> bool {
        !self.datagrams_out.is_empty() || self.streams.has_pending()
    }

    /// Without [`Flow`] state only control frames are pending: no congestion window.
    fn window_open(&self) -> bool {
        self.flow
            .as_ref()
            .is_none_or(|flow| self.bytes_in_flight < flow.cc.cwnd())
            && self.sent.len() < self.config.max_tracked_packets as usize
    }

    fn can_send_paced(&self, now: Instant) -> bool {
        self.flow
            .as_ref()
            .is_none_or(|flow| flow.pacer.can_send(now))
    }

    /// Writes the next packet payload into `buf` (at most `max_payload` bytes are used) and
    /// returns its packet number and length, or `None` if nothing should be sent now.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<(u64, usize)> {
        self.last_now = now;
        let max = buf.len().min(self.pmtu.current());
        match self.state {
            State::Closed => return None,
            State::Closing { reason } => return self.transmit_close(reason, &mut buf[..max]),
            State::Open => {}
        }
        if self.reliable {
            return self.transmit_reliable(now, &mut buf[..max]);
        }
        if self.flow.is_none() && self.has_pending_data() {
            // Once per burst after a quiet period, never per packet.
            self.flow = Some(Box::new(Flow::new(&self.config, now)));
        }
        let ack_due = self.acks.is_due()
            || (self.acks.is_needed() && self.timers.is_expired(Timer::AckDelay, now));
        let pending = self.has_pending_eliciting();
        let window_open = self.window_open();
        let send_data = pending && window_open && self.can_send_paced(now);
        if let Some(flow) = self.flow.as_deref_mut().filter(|_| !pending && window_open) {
            flow.rate.on_app_limited(self.bytes_in_flight);
        }
        if !send_data && !ack_due {
            return None;
        }
        if send_data {
            if let Some(probe) = self.transmit_probe(now, buf) {
                return Some(probe);
            }
        }
        let mut w = Writer::new(&mut buf[..max]);
        if self.acks.is_needed() {
            self.write_ack(now, &mut w);
        }
        let mut packet = SentPacket::new(now, congestion::DeliverySnapshot::new(now));
        let mut eliciting = false;
        if send_data {
            eliciting = self.write_frames(&mut w, &mut packet);
        }
        if w.is_empty() {
            return None;
        }
        let len = w.len();
        let pn = self.next_pn;
        self.next_pn += 1;
        packet.size = len as u32;
        if eliciting {
            packet.ack_eliciting = true;
            if let Some(flow) = self.flow.as_deref_mut() {
                packet.delivery = flow.rate.on_sent(now, self.bytes_in_flight);
                flow.pacer.on_sent(now, len, flow.cc.pacing_rate());
            }
            self.bytes_in_flight += len as u64;
            self.last_ack_eliciting_sent = Some(now);
            self.arm_pto();
        } else {
            self.stats.ack_only_sent += 1;
        }
        self.sent.push(pn, packet);
        self.sent.pop_resolved(self.lost_cutoff(now));
        self.timers
            .set(Timer::KeepAlive, now + self.config.keepalive_interval);
        self.stats.packets_sent += 1;
        Some((pn, len))
    }

    /// Sends a path-MTU probe when one is due and fits `buf`: a PING padded to the probe size.
    /// It is outside the congestion window and the probe timeout, carries nothing to
    /// retransmit, and its loss is no congestion signal.
    fn transmit_probe(&mut self, now: Instant, buf: &mut [u8]) -> Option<(u64, usize)> {
        let size = self.pmtu.probe_due(now)?;
        let (first, padding) = buf.get_mut(..size)?.split_first_mut()?;
        *first = frame::FRAME_PING;
        padding.fill(frame::FRAME_PADDING);
        let pn = self.next_pn;
        self.next_pn += 1;
        let mut packet = SentPacket::new(now, congestion::DeliverySnapshot::new(now));
        // Not ack-eliciting in the log: no bytes in flight, no PTO, no retransmission.
        packet.size = size as u32;
        self.sent.push(pn, packet);
        self.pmtu.on_probe_sent(pn, size, now);
        self.stats.packets_sent += 1;
        Some((pn, size))
    }

    /// Reliable-carrier mode: writes what is pending (flow control permitting) and treats the
    /// packet as acknowledged at once. No sent-packet log, no bytes in flight, no ACK.
    fn transmit_reliable(&mut self, now: Instant, buf: &mut [u8]) -> Option<(u64, usize)> {
        if !self.has_pending_eliciting() {
            return None;
        }
        let mut w = Writer::new(buf);
        let mut packet = SentPacket::new(now, congestion::DeliverySnapshot::new(now));
        if !self.write_frames(&mut w, &mut packet) {
            return None;
        }
        let pn = self.next_pn;
        self.next_pn += 1;
        for f in packet.frames() {
            self.streams.on_frame_acked(*f);
        }
        self.streams.wake_writers(&mut self.events);
        self.timers
            .set(Timer::KeepAlive, now + self.config.keepalive_interval);
        self.stats.packets_sent += 1;
        Some((pn, w.len()))
    }

    fn transmit_close(&mut self, reason: CloseReason, buf: &mut [u8]) -> Option<(u64, usize)> {
        if !self.close_pending {
            return None;
        }
        self.close_pending = false;
        self.close_repeats += 1;
        let mut w = Writer::new(buf);
        frame::encode_frame(
            &mut w,
            &Frame::Close {
                reason,
                text: &self.close_text,
            },
        )?;
        let pn = self.next_pn;
        self.next_pn += 1;
        self.stats.packets_sent += 1;
        if self.reliable {
            // Delivered once written: nothing to repeat, nothing to wait for.
            self.enter_closed(reason, false);
        }
        Some((pn, w.len()))
    }

    fn write_ack(&mut self, now: Instant, w: &mut Writer<'_>) {
        let Some((_, largest_time)) = self.acks.largest() else {
            return;
        };
        let delay = now.saturating_duration_since(largest_time).as_micros() as u64;
        let ranges = self.acks.ranges().map(|r| (r.start, r.end - 1));
        if frame::encode_ack(w, delay, ranges, MAX_ACK_RANGES_SENT).is_some() {
            self.stats.ack_frames_sent += 1;
            self.acks.on_ack_sent();
            self.timers.stop(Timer::AckDelay);
        }
    }

    /// Writes retransmittable frames; returns whether anything ack-eliciting was written.
    fn write_frames(&mut self, w: &mut Writer<'_>, packet: &mut SentPacket) -> bool {
        let start_len = w.len();
        if self.settings_pending {
            let f = Frame::Settings {
                stream_window: u64::from(self.config.stream_window),
                session_window: self.streams.advertised_max_data(),
                max_streams: self.streams.local_max_streams(),
            };
            if frame::encode_frame(w, &f).is_some() {
                self.settings_pending = false;
                self.window_announced = true;
                packet.push_frame(SentFrame::Settings);
            }
        }
        if self.streams.max_data_pending && packet.has_frame_room() {
            let f = Frame::MaxData(self.streams.advertised_max_data());
            if frame::encode_frame(w, &f).is_some() {
                self.streams.max_data_pending = false;
                self.window_announced = true;
                packet.push_frame(SentFrame::MaxData);
            }
        }
        if self.streams.max_streams_pending && packet.has_frame_room() {
            let f = Frame::MaxStreams(self.streams.local_max_streams());
            if frame::encode_frame(w, &f).is_some() {
                self.streams.max_streams_pending = false;
                packet.push_frame(SentFrame::MaxStreams);
            }
        }
        if self.ping_pending && w.put_u8(frame::FRAME_PING).is_some() {
            self.ping_pending = false;
        }
        self.streams.write_controls(w, packet);
        self.write_datagrams(w);
        self.streams.write_data(w, packet);
        w.len() > start_len
    }

    fn write_datagrams(&mut self, w: &mut Writer<'_>) {
        while let Some((assoc, dest, data)) = self.datagrams_out.front() {
            let len = frame::datagram_frame_len(*assoc, dest, data.len());
            if len > self.pmtu.current() {
                // Queued before a black hole shrank packets below it: it can never go.
                self.datagrams_out.pop_front();
                self.stats.datagrams_dropped += 1;
                continue;
            }
            if len > w.room() {
                return;
            }
            if let Some((assoc, dest, data)) = self.datagrams_out.pop_front() {
                let f = Frame::Datagram {
                    assoc,
                    dest,
                    data: &data,
                };
                let _ = frame::encode_frame(w, &f);
                self.stats.datagrams_sent += 1;
            }
        }
    }

    /// Largest payload a packet may have now (path-MTU discovery's current size; a probe is
    /// larger).
    pub fn max_payload_now(&self) -> usize {
        self.pmtu.current()
    }

    /// Path-MTU discovery counters.
    pub fn pmtu_stats(&self) -> PmtuStats {
        self.pmtu.stats()
    }

    // ------------------------------------------------------------------ timers

    /// Earliest instant at which [`Transport::handle_timeout`] (or, for pacing,
    /// [`Transport::poll_transmit`]) must be called: the earliest armed `Timer`, or, while data
    /// waits for the pacer alone, when its next burst is ready (at least half of
    /// `pacing_burst` away: a pacing-limited loop wakes once per burst). Never an instant at or
    /// before the `now` of the last `handle_timeout`, unless a timer was armed that early since.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timers = self.timers.next_timeout();
        let pacing = self
            .flow
            .as_ref()
            .filter(|flow| {
                self.state == State::Open
                    && !self.reliable
                    && self.has_pending_eliciting()
                    && self.window_open()
                    && !flow.pacer.can_send(self.last_now)
            })
            .map(|flow| flow.pacer.wake_time());
        match (timers, pacing) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs every expired timer. Each is stopped before it acts, so it is never reported again
    /// by [`Transport::poll_timeout`] until something re-arms it.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        for timer in Timer::VALUES {
            if !self.timers.take_expired(timer, now) {
                continue;
            }
            match timer {
                Timer::Close => {
                    if let State::Closing { reason } = self.state {
                        self.enter_closed(reason, false);
                    }
                    return;
                }
                Timer::Idle => {
                    self.enter_closed(CloseReason::IdleTimeout, false);
                    return;
                }
                Timer::AckDelay => self.acks.request_immediate(),
                // Loss detection re-arms the PTO, so a PTO that loss detection moved or disarmed
                // is no longer expired when its turn comes.
                Timer::LossDetection => self.detect_lost(now),
                Timer::Pto => self.on_pto(now),
                Timer::KeepAlive => {
                    self.ping_pending = true;
                    // Idle session: give back buffer storage of streams with nothing buffered,
                    // the room of collections that were fuller, and the congestion state if
                    // nothing is in flight (see [`Flow`]).
                    self.streams.release_idle_storage();
                    self.events.shrink_to_fit();
                    self.datagrams_out.shrink_to_fit();
                    self.lost_scratch = Vec::new();
                    if self.bytes_in_flight == 0 {
                        self.flow = None;
                    }
                }
            }
        }
    }

    /// The session is over: no timer stays armed.
    fn enter_closed(&mut self, reason: CloseReason, by_peer: bool) {
        self.state = State::Closed;
        self.timers.stop_all();
        self.events
            .push_back(TransportEvent::Closed { reason, by_peer });
    }

    // ------------------------------------------------------------------ application API

    pub fn poll_event(&mut self) -> Option<TransportEvent> {
        let e = self.events.pop_front()?;
        if matches!(e, TransportEvent::Datagram { .. }) {
            self.datagram_events -= 1;
        }
        Some(e)
    }

    fn check_open(&self) -> Result<(), StreamError> {
        match self.state {
            State::Open => Ok(()),
            _ => Err(StreamError::SessionClosed),
        }
    }

    /// Opens a stream towards `dest`. Data may be written immediately; the peer's answer
    /// arrives as [`TransportEvent::StreamOpenResult`].
    pub fn open_stream(&mut self, dest: Destination) -> Result<StreamId, StreamError> {
        self.check_open()?;
        self.streams.open(dest)
    }

    /// Accepts a peer-opened stream (same as `answer_open(id, OpenResult::Ok)`).
    pub fn accept_stream(&mut self, id: StreamId) -> Result<(), StreamError> {
        self.answer_open(id, OpenResult::Ok)
    }

    /// Answers a peer's open. Anything but `Ok` resets the stream with `OpenFailed(result)`.
    pub fn answer_open(&mut self, id: StreamId, result: OpenResult) -> Result<(), StreamError> {
        self.check_open()?;
        self.streams.answer_open(id, result)
    }

    /// Queues data; returns how much was accepted (less than `data.len()` when the send buffer
    /// is full — wait for `StreamWritable`).
    pub fn stream_write(&mut self, id: StreamId, data: &[u8]) -> Result<usize, StreamError> {
        self.check_open()?;
        self.streams.write(id, data)
    }

    /// [`Transport::stream_write`] without the copy, step 1: free send-buffer space for up to
    /// `max` bytes to fill in place (contiguous, so possibly shorter; empty when the buffer is
    /// full: wait for `StreamWritable`). Step 2, [`Transport::stream_write_commit`], queues what
    /// was filled; nothing else may touch the stream in between.
    pub fn stream_write_space(
        &mut self,
        id: StreamId,
        max: usize,
    ) -> Result<&mut [u8], StreamError> {
        self.check_open()?;
        self.streams.write_space(id, max)
    }

    /// Queues the first `n` bytes of the slice [`Transport::stream_write_space`] returned.
    pub fn stream_write_commit(&mut self, id: StreamId, n: usize) -> Result<usize, StreamError> {
        self.check_open()?;
        self.streams.write_commit(id, n)
    }

    /// How many bytes [`Transport::stream_write`] would accept right now.
    pub fn stream_write_capacity(&self, id: StreamId) -> usize {
        self.streams.write_capacity(id)
    }

    /// Reads in-order data. `Ok(0)` means the peer finished and everything was read;
    /// `Err(Blocked)` means no data yet.
    pub fn stream_read(&mut self, id: StreamId, buf: &mut [u8]) -> Result<usize, StreamError> {
        self.streams.read(id, buf)
    }

    /// In-order data ready to read, in place (at most two slices: the buffer may wrap; both
    /// empty when nothing is ready). Hand what was used to [`Transport::stream_consume`].
    pub fn stream_peek(&self, id: StreamId) -> Result<(&[u8], &[u8]), StreamError> {
        self.streams.peek(id)
    }

    /// [`Transport::stream_read`] without the copy: marks up to `n` peeked bytes as read, with
    /// the same results (`Ok(0)`: finished and all read; `Err(Blocked)`: no data yet).
    pub fn stream_consume(&mut self, id: StreamId, n: usize) -> Result<usize, StreamError> {
        self.streams.consume(id, n)
    }

    /// Finishes our direction (FIN after all written data).
    pub fn stream_finish(&mut self, id: StreamId) -> Result<(), StreamError> {
        self.check_open()?;
        self.streams.finish(id)
    }

    /// Aborts the stream in both directions.
    pub fn stream_reset(&mut self, id: StreamId, reason: ResetReason) -> Result<(), StreamError> {
        self.check_open()?;
        self.streams.reset(id, reason)
    }

    pub fn stream_stats(&self, id: StreamId) -> Option<StreamStats> {
        self.streams.stream_stats(id)
    }

    /// Queues an unreliable datagram of association `assoc` (0: none); dropped (error) when the
    /// queue is full. A datagram may fill a whole packet of the current path-MTU size (when an
    /// ACK or control frames took room first, it goes in the next packet): 1,300-1,312 bytes at
    /// the start size (QUIC's usual 1,200-1,300-byte packets), more once path-MTU discovery
    /// found a larger size, 1,150-1,160 at its floor.
    pub fn send_datagram(
        &mut self,
        assoc: AssocId,
        dest: Destination,
        data: &[u8],
    ) -> Result<(), DatagramError> {
        if self.state != State::Open {
            return Err(DatagramError::SessionClosed);
        }
        if frame::datagram_frame_len(assoc, &dest, data.len()) > self.pmtu.current() {
            return Err(DatagramError::TooLarge);
        }
        if self.datagrams_out.len() >= self.config.max_datagram_queue as usize {
            self.stats.datagrams_dropped += 1;
            return Err(DatagramError::QueueFull);
        }
        self.datagrams_out.push_back((assoc, dest, data.to_vec()));
        Ok(())
    }

    /// Largest datagram payload that [`Transport::send_datagram`] accepts for `assoc` and `dest`
    /// now (it grows when path-MTU discovery finds a larger size).
    pub fn max_datagram_size(&self, assoc: AssocId, dest: &Destination) -> usize {
        // The frame without data, with a two-byte length varint (any datagram below 16 KiB).
        let frame = frame::datagram_frame_len(assoc, dest, 0) + 1;
        self.pmtu.current().saturating_sub(frame)
    }

    /// Gracefully closes the session: CLOSE is sent, then after a short drain period the
    /// session reports `Closed { by_peer: false }`.
    pub fn close(&mut self, now: Instant, reason: CloseReason) {
        self.close_inner(now, reason, b"");
    }

    /// Like [`Transport::close`] with a short human-readable text (truncated to 64 bytes).
    pub fn close_with_text(&mut self, now: Instant, reason: CloseReason, text: &str) {
        self.close_inner(now, reason, text.as_bytes());
    }

    fn close_inner(&mut self, now: Instant, reason: CloseReason, text: &[u8]) {
        if self.state != State::Open {
            return;
        }
        let drain = (self.rtt.pto_base() * 3).min(Duration::from_secs(3));
        self.state = State::Closing { reason };
        self.timers.stop_all();
        self.timers.set(Timer::Close, now + drain);
        self.close_text = text[..text.len().min(frame::MAX_CLOSE_TEXT)].to_vec();
        self.close_pending = true;
        self.streams.clear_queues();
        self.datagrams_out.clear();
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Closing or closed.
    pub fn is_closing(&self) -> bool {
        self.state != State::Open
    }

    pub fn stats(&self) -> TransportStats {
        let c = self.stats;
        // Without flow state: what the next burst starts from.
        let fresh;
        let cc = match self.flow.as_deref() {
            Some(flow) => &flow.cc,
            None => {
                fresh = Flow::new(&self.config, self.last_now).cc;
                &fresh
            }
        };
        let mut s = TransportStats {
            smoothed_rtt: self.rtt.smoothed,
            min_rtt: self.rtt.min,
            rtt_var: self.rtt.var,
            cwnd: cc.cwnd(),
            bytes_in_flight: self.bytes_in_flight,
            pacing_rate: cc.pacing_rate(),
            bandwidth_estimate: cc.bandwidth(),
            packets_sent: c.packets_sent,
            ack_only_sent: c.ack_only_sent,
            ack_frames_sent: c.ack_frames_sent,
            packets_received: c.packets_received,
            packets_lost: c.packets_lost,
            spurious_losses: c.spurious_losses,
            packets_dropped: c.packets_dropped,
            pto_count: c.pto_count,
            datagrams_sent: c.datagrams_sent,
            datagrams_received: c.datagrams_received,
            datagrams_dropped: c.datagrams_dropped,
            ..TransportStats::default()
        };
        self.streams.fill_stats(&mut s);
        s
    }

    /// Congestion controller phase (for diagnostics).
    pub fn congestion_state(&self) -> BbrState {
        self.flow
            .as_ref()
            .map_or(BbrState::Startup, |flow| flow.cc.state())
    }

    /// Bytes held in all stream send buffers (bounded by the session send buffer).
    pub fn send_buffered(&self) -> usize {
        self.streams.send_buffered()
    }

    /// Sets how far the session receive window reaches ahead of what the application read,
    /// clamped to [`INITIAL_SESSION_WINDOW`] ..= the configured `session_window`: a server
    /// shares one user's receive budget among its sessions this way. Lowering it revokes no
    /// credit the peer was told (it shrinks as the application reads); set before the first
    /// packet, it is what SETTINGS announces.
    pub fn set_recv_window(&mut self, window: u64) {
        let window = window.clamp(INITIAL_SESSION_WINDOW, self.config.session_window);
        self.streams.set_recv_window(window, self.window_announced);
    }

    /// Before anything was announced to the peer: lowers the first session credit SETTINGS
    /// will announce to `credit` (at least [`INITIAL_SESSION_WINDOW`]); grants reach the window
    /// again as the application reads. No effect once announced.
    pub fn limit_first_recv_credit(&mut self, credit: u64) {
        let credit = credit.max(INITIAL_SESSION_WINDOW);
        self.streams
            .limit_first_recv_credit(credit, self.window_announced);
    }

    /// Session credit granted to the peer and not yet read by the application: the most stream
    /// data the peer can make this session hold from now on.
    pub fn recv_committed(&self) -> u64 {
        self.streams.recv_committed()
    }

    /// Memory allocated for all stream send buffers: at least [`Self::send_buffered`], at most
    /// about four times it plus a few KiB per stream (the buffers shrink as they drain).
    pub fn send_memory(&self) -> usize {
        self.streams.send_memory()
    }

    /// The congestion window in bytes (what [`Transport::stats`] reports, without its cost).
    /// Without flow state (idle), the window the next burst starts from.
    pub fn cwnd(&self) -> u64 {
        match self.flow.as_deref() {
            Some(flow) => flow.cc.cwnd(),
            None => Bbr::initial_cwnd(
                self.config.max_payload as usize,
                u64::from(self.config.initial_cwnd_packets),
            ),
        }
    }

    /// About the stream bytes waiting to be sent now (new, or lost and due again): those held
    /// in send buffers beyond the bytes in flight, less those beyond the peer's flow-control
    /// limits (a stream whose reader stopped cannot send them, so they must not hold back the
    /// session's other streams). The server reads destinations only while this is near the
    /// congestion window (`tunnel::read_ahead`), asking before every socket read: O(1), from
    /// counters kept by the stream set (never a walk over its streams).
    pub fn unsent(&self) -> u64 {
        let queued = (self.streams.send_buffered() as u64).saturating_sub(self.bytes_in_flight);
        if queued == 0 {
            return 0;
        }
        queued.saturating_sub(self.streams.beyond_window())
    }

    /// Bytes the peer currently holds in our receive buffers (bounded by the session window).
    pub fn recv_outstanding(&self) -> u64 {
        self.streams.recv_outstanding()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reliable-carrier mode: an ACK (even of a packet never sent, a violation on UDP) is
    /// ignored, nothing is acknowledged back, and written stream data leaves the send buffer at
    /// once with no timer armed for it.
    #[test]
    fn a_reliable_transport_ignores_acks_and_counts_written_as_delivered() {
        let now = Instant::now();
        let config = TransportConfig {
            max_payload: 16 * 1024,
            ..TransportConfig::default()
        };
        let mut t = Transport::new_reliable(config.clone(), Side::Client, now);
        let mut peer = Transport::new_reliable(config, Side::Server, now);
        let mut buf = vec![0u8; 16 * 1024];
        let mut w = Writer::new(&mut buf);
        frame::encode_ack(&mut w, 0, [(900, 1000)].into_iter(), 4).unwrap();
        w.put_u8(frame::FRAME_PING).unwrap();
        let len = w.len();
        t.handle_payload(now, 0, &buf[..len]).unwrap();
        assert!(!t.is_closing());
        let id = t
            .open_stream(Destination::domain("example.com", 443).unwrap())
            .unwrap();
        assert_eq!(t.stream_write(id, &[7; 40_000]).unwrap(), 40_000);
        let mut sent = 0;
        while let Some((pn, len)) = t.poll_transmit(now, &mut buf) {
            assert!(len <= 16 * 1024);
            peer.handle_payload(now, pn, &buf[..len]).unwrap();
            sent += 1;
        }
        assert!(sent >= 3, "40 KB in 16 KiB packets: {sent}");
        assert_eq!(t.send_buffered(), 0);
        let stats = t.stats();
        assert_eq!((stats.bytes_in_flight, stats.ack_frames_sent), (0, 0));
        // Only the keepalive and idle timers: no ACK delay, loss detection, PTO or pacing.
        assert!(t.poll_timeout().unwrap() >= now + Duration::from_secs(15));
        assert!(peer.poll_timeout().unwrap() >= now + Duration::from_secs(15));
        while let Some((_, len)) = peer.poll_transmit(now, &mut buf) {
            let mut r = Reader::new(&buf[..len]);
            while !r.is_empty() {
                let f = frame::parse_frame(&mut r).unwrap();
                assert!(
                    !matches!(f, Frame::Ack(_)),
                    "no ACK over a reliable carrier"
                );
            }
        }
        assert_eq!(peer.stats().ack_frames_sent, 0);
    }

    /// Delivers packets both ways at `now` (no delay, no loss) until neither side sends; the
    /// server accepts every stream.
    fn exchange(client: &mut Transport, server: &mut Transport, now: Instant) {
        let mut buf = [0u8; 1500];
        loop {
            let mut moved = false;
            while let Some((pn, len)) = client.poll_transmit(now, &mut buf) {
                server.handle_payload(now, pn, &buf[..len]).unwrap();
                moved = true;
            }
            while let Some(ev) = server.poll_event() {
                if let TransportEvent::StreamOpened { id, .. } = ev {
                    server.accept_stream(id).unwrap();
                }
            }
            while let Some((pn, len)) = server.poll_transmit(now, &mut buf) {
                client.handle_payload(now, pn, &buf[..len]).unwrap();
                moved = true;
            }
            while client.poll_event().is_some() {}
            if !moved {
                return;
            }
        }
    }

    /// Issue 9: an idle transport keeps no congestion, rate or pacing state (552 bytes of an
    /// idle session): SETTINGS, PINGs and ACKs go without it, stream data makes it, and a
    /// keep-alive period with nothing sent and nothing in flight drops it again, so the next
    /// burst starts from the initial window.
    #[test]
    fn cwnd_without_flow_state_is_the_window_the_next_burst_starts_from() {
        let t = Transport::new(TransportConfig::default(), Side::Server, Instant::now());
        assert!(t.flow.is_none());
        assert_eq!(t.cwnd(), t.stats().cwnd);
        assert!(t.cwnd() > 0);
    }

    #[test]
    fn congestion_state_exists_only_while_data_flows() {
        let t0 = Instant::now();
        let mut client = Transport::new(TransportConfig::default(), Side::Client, t0);
        let mut server = Transport::new(TransportConfig::default(), Side::Server, t0);
        let initial_cwnd = client.stats().cwnd;
        exchange(&mut client, &mut server, t0);
        assert!(
            client.flow.is_none() && server.flow.is_none(),
            "SETTINGS only"
        );
        let id = client
            .open_stream(Destination::domain("example.com", 443).unwrap())
            .unwrap();
        client.stream_write(id, &[5; 200_000]).unwrap();
        let mut now = t0;
        let mut made = false;
        let mut grown = 0;
        // 20 s in 50 ms steps: the data and its ACKs, then quiet with keep-alives.
        for _ in 0..400 {
            now += Duration::from_millis(50);
            for t in [&mut client, &mut server] {
                if t.poll_timeout().is_some_and(|at| at <= now) {
                    t.handle_timeout(now);
                }
            }
            exchange(&mut client, &mut server, now);
            made |= client.flow.is_some();
            grown = grown.max(client.stats().cwnd);
        }
        assert!(made, "stream data made the congestion state");
        assert!(grown > initial_cwnd, "the window grew with the data");
        assert!(client.stats().packets_sent > 150, "the data went out");
        assert!(
            client.flow.is_none(),
            "dropped after a quiet keep-alive period"
        );
        assert_eq!(
            client.stats().cwnd,
            initial_cwnd,
            "the next burst starts afresh"
        );
        assert_eq!(client.congestion_state(), BbrState::Startup);
        assert!(!client.is_closing() && !server.is_closing());
        client.stream_write(id, &[6; 1000]).unwrap();
        let mut buf = [0u8; 1500];
        assert!(client.poll_transmit(now, &mut buf).is_some());
        assert!(client.flow.is_some());
    }

    /// Issue 9: a session whose streams are gone gives back the room its stream map and event
    /// queue grew to once it is idle (the keep-alive timer).
    #[test]
    fn an_idle_session_gives_back_the_room_of_its_closed_streams() {
        let t0 = Instant::now();
        let mut client = Transport::new(TransportConfig::default(), Side::Client, t0);
        let mut server = Transport::new(TransportConfig::default(), Side::Server, t0);
        exchange(&mut client, &mut server, t0);
        let ids: Vec<StreamId> = (0..30)
            .map(|_| {
                let id = client
                    .open_stream(Destination::domain("example.com", 443).unwrap())
                    .unwrap();
                client.stream_write(id, &[1; 100]).unwrap();
                id
            })
            .collect();
        exchange(&mut client, &mut server, t0);
        assert_eq!(client.stats().streams_open, 30);
        let grown = client.streams.table_bytes();
        assert!(grown > 30 * 400, "{grown} bytes for 30 streams");
        for id in ids {
            client.stream_reset(id, ResetReason::Cancelled).unwrap();
        }
        let mut now = t0;
        for _ in 0..400 {
            now += Duration::from_millis(50);
            for t in [&mut client, &mut server] {
                if t.poll_timeout().is_some_and(|at| at <= now) {
                    t.handle_timeout(now);
                }
            }
            exchange(&mut client, &mut server, now);
        }
        assert_eq!(client.stats().streams_open, 0);
        assert_eq!(server.stats().streams_open, 0);
        assert!(!client.is_closing());
        assert_eq!(client.streams.table_bytes(), 0);
        assert_eq!(server.streams.table_bytes(), 0);
        assert_eq!(client.events.capacity(), 0);
    }

    /// A client sending one bulk stream to a server over a 20 ms RTT path without other
    /// impairments (packets in `lost` vanish), both running their timers, time advancing in
    /// 250 µs steps. Returns, per client packet number that arrived, whether the server
    /// answered it with an ACK-only packet right away.
    fn acks_per_packet(until_pn: u64, lost: &[u64]) -> Vec<(u64, bool)> {
        const ONE_WAY: Duration = Duration::from_millis(10);
        let t0 = Instant::now();
        let mut client = Transport::new(TransportConfig::default(), Side::Client, t0);
        let mut server = Transport::new(TransportConfig::default(), Side::Server, t0);
        let id = client
            .open_stream(Destination::domain("bulk.test", 9).unwrap())
            .unwrap();
        let data = vec![7u8; 2 * 1024 * 1024];
        // Written as the server's flow-control limit allows (the server never reads).
        let mut written = client.stream_write(id, &data).unwrap();
        assert!(written > 0);
        let mut buf = [0u8; 1500];
        // (arrival, packet number, payload) per direction.
        let mut to_server: VecDeque<(Instant, u64, Vec<u8>)> = VecDeque::new();
        let mut to_client: VecDeque<(Instant, u64, Vec<u8>)> = VecDeque::new();
        let mut answered = Vec::new();
        let mut now = t0;
        while answered.last().is_none_or(|&(pn, _)| pn < until_pn) {
            now += Duration::from_micros(250);
            assert!(now < t0 + Duration::from_secs(10), "stuck at {answered:?}");
            while to_client.front().is_some_and(|p| p.0 <= now) {
                let (_, pn, payload) = to_client.pop_front().unwrap();
                client.handle_payload(now, pn, &payload).unwrap();
            }
            while to_server.front().is_some_and(|p| p.0 <= now) {
                let (_, pn, payload) = to_server.pop_front().unwrap();
                server.handle_payload(now, pn, &payload).unwrap();
                while let Some(ev) = server.poll_event() {
                    if let TransportEvent::StreamOpened { id, .. } = ev {
                        server.accept_stream(id).unwrap();
                    }
                }
                let acks_before = server.stats().ack_only_sent;
                while let Some((spn, len)) = server.poll_transmit(now, &mut buf) {
                    to_client.push_back((now + ONE_WAY, spn, buf[..len].to_vec()));
                }
                answered.push((pn, server.stats().ack_only_sent > acks_before));
            }
            for t in [&mut client, &mut server] {
                if t.poll_timeout().is_some_and(|at| at <= now) {
                    t.handle_timeout(now);
                }
            }
            written += client.stream_write(id, &data[written..]).unwrap();
            while let Some((pn, len)) = client.poll_transmit(now, &mut buf) {
                if !lost.contains(&pn) {
                    to_server.push_back((now + ONE_WAY, pn, buf[..len].to_vec()));
                }
            }
            while let Some((spn, len)) = server.poll_transmit(now, &mut buf) {
                to_client.push_back((now + ONE_WAY, spn, buf[..len].to_vec()));
            }
        }
        answered
    }

    /// Quick ACKs (one per two packets) at the start, then one ACK-only packet per ten in
    /// steady state (at most one per six, the bound; one per two before decimation).
    #[test]
    fn acks_are_decimated_after_the_start() {
        let answered = acks_per_packet(400, &[]);
        let acks = |range: std::ops::Range<u64>| {
            let packets = answered.iter().filter(|(pn, _)| range.contains(pn));
            (packets.clone().count(), packets.filter(|(_, a)| *a).count())
        };
        let (start, start_acks) = acks(0..ack::QUICK_START_PACKETS);
        assert!(
            start_acks * 2 + 2 >= start,
            "{start_acks} ACKs for {start} packets"
        );
        let (steady, steady_acks) = acks(ack::QUICK_START_PACKETS + 10..400);
        assert!(steady > 250, "{steady} packets");
        assert!(
            steady_acks * 6 <= steady && steady_acks * 12 >= steady,
            "{steady_acks} ACKs for {steady} packets"
        );
    }

    /// A packet after a gap is acknowledged at once (the sender learns of the loss now), and
    /// the next packets are acknowledged quickly while the sender recovers.
    #[test]
    fn a_gap_is_acknowledged_at_once_then_quickly() {
        let answered = acks_per_packet(400, &[300]);
        let at = |pn| answered.iter().find(|(p, _)| *p == pn).map(|&(_, a)| a);
        assert_eq!(at(301), Some(true), "the packet after the gap");
        let quick = (302..302 + ack::QUICK_AFTER_GAP).filter(|&pn| at(pn) == Some(true));
        assert_eq!(quick.count() as u64, ack::QUICK_AFTER_GAP / 2);
        let after = (330..390).filter(|&pn| at(pn) == Some(true)).count();
        assert!(after <= 7, "decimated again after recovery: {after} ACKs");
    }

    /// A pacing-limited sender asks to be woken when its next burst is ready, at least 1 ms
    /// (half the minimum burst) away, never microseconds after the last packet.
    #[test]
    fn pacing_limited_sender_wakes_once_per_burst() {
        let t0 = Instant::now();
        // A fast start: 1,024 packets of window at a 10 ms initial RTT (~350 MB/s pacing).
        let config = TransportConfig {
            initial_cwnd_packets: 1024,
            initial_rtt: Duration::from_millis(10),
            ..TransportConfig::default()
        };
        let mut client = Transport::new(config, Side::Client, t0);
        // The server's SETTINGS open its windows beyond the initial 64 KiB.
        let mut server = Transport::new(TransportConfig::default(), Side::Server, t0);
        let mut buf = [0u8; 1500];
        let (pn, len) = server.poll_transmit(t0, &mut buf).unwrap();
        client.handle_payload(t0, pn, &buf[..len]).unwrap();
        let id = client
            .open_stream(Destination::domain("bulk.test", 9).unwrap())
            .unwrap();
        client.stream_write(id, &vec![1u8; 2 << 20]).unwrap();
        let mut now = t0;
        // Two wake-ups (the third would be cwnd-limited: no ACKs come back here).
        for _ in 0..2 {
            let mut burst = 0;
            while client.poll_transmit(now, &mut buf).is_some() {
                burst += 1;
            }
            let wake = client.poll_timeout().unwrap();
            assert!(
                wake >= now + Duration::from_millis(1),
                "wake-up {:?} away",
                wake - now
            );
            assert!(burst >= 100, "{burst} packets per wake-up");
            now = wake;
        }
        assert!(
            client.stats().bytes_in_flight < client.stats().cwnd,
            "pacing, not cwnd, limited"
        );
    }

    /// Every error variant has its own message a user can act on (not the `Debug` name).
    #[test]
    fn error_messages_are_per_variant() {
        let messages: Vec<(String, String)> = [
            TransportError::Frame(FrameError::Truncated),
            TransportError::InvalidAck,
            TransportError::FlowControl,
            TransportError::FinalSize,
            TransportError::StreamLimit,
            TransportError::UnexpectedFrame,
        ]
        .iter()
        .map(|e| (e.to_string(), format!("{e:?}")))
        .chain(
            [
                StreamError::UnknownStream,
                StreamError::Closed,
                StreamError::Reset(ResetReason::OpenFailed(OpenResult::DnsFailure)),
                StreamError::Blocked,
                StreamError::Finished,
                StreamError::TooManyStreams,
                StreamError::InvalidState,
                StreamError::SessionClosed,
            ]
            .iter()
            .map(|e| (e.to_string(), format!("{e:?}"))),
        )
        .chain(
            [
                DatagramError::TooLarge,
                DatagramError::QueueFull,
                DatagramError::SessionClosed,
            ]
            .iter()
            .map(|e| (e.to_string(), format!("{e:?}"))),
        )
        .collect();
        for (i, (text, debug)) in messages.iter().enumerate() {
            assert!(!text.contains(debug.as_str()), "{text} falls back to Debug");
            let repeats = messages[..i].iter().filter(|(t, _)| t == text).count();
            assert!(
                repeats == 0 || text.contains("session is closed"),
                "{text} is not distinct"
            );
        }
        assert_eq!(
            StreamError::Reset(ResetReason::OpenFailed(OpenResult::DnsFailure)).to_string(),
            "stream was reset: open failed: name resolution failed"
        );
        assert_eq!(
            TransportError::Frame(FrameError::UnknownFrameType(0x3f)).to_string(),
            "transport protocol violation: malformed frame: unknown frame type 0x3f"
        );
    }
}
