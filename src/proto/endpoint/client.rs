//! The client connector: runs the handshake (fresh hello per retry over UDP, one hello record
//! over the TCP carrier) and then one protected session.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::IdMap;
use crate::proto::carrier::records::{self, MAX_HELLO_RECORD, REPLY_HEAD, SentHelloRecord};
use crate::proto::carrier::{FrameError, MAX_FRAME_PLAINTEXT};
use crate::proto::crypto::Key32;
use crate::proto::handshake::{
    self, HELLO_SLOTS, Hello, MAX_HELLO, RefuseReason, Reply, SentHello,
};
use crate::proto::packet::{TOKEN_LEN, TokenSink};
use crate::proto::psk::{AccessKeyError, UserKeys};
use crate::proto::rng::Drbg;
use crate::proto::session::{Batch, MAX_DATAGRAM, MIN_DATAGRAM, Session, SessionConfig};
use crate::proto::transport::{CloseReason, Side, TransportEvent};

/// Client connector settings.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// Packet protection and transport settings.
    pub session: SessionConfig,
    /// Up to this many random padding bytes in hellos.
    pub hello_pad_max: u16,
    /// First hello retransmission delay (doubles up to `max_retry`).
    pub initial_retry: Duration,
    /// Longest delay between hellos.
    pub max_retry: Duration,
    /// Give up the handshake after this long.
    pub handshake_timeout: Duration,
    /// Added to the driver's unix time (e.g. an offset learned from an earlier session).
    pub clock_offset_secs: i64,
}

impl Default for ConnectorConfig {
    fn default() -> Self {
        ConnectorConfig {
            session: SessionConfig::default(),
            hello_pad_max: 320,
            initial_retry: Duration::from_secs(1),
            max_retry: Duration::from_secs(8),
            handshake_timeout: Duration::from_secs(30),
            clock_offset_secs: 0,
        }
    }
}

/// Client events.
#[derive(Debug)]
pub enum ClientEvent {
    /// Handshake done; streams can be opened.
    Connected,
    /// The server refused this user (authenticated). The connector is finished.
    Refused {
        /// Why.
        reason: RefuseReason,
        /// Suggested back-off.
        retry_after_secs: u16,
    },
    /// No valid reply within the handshake timeout (wrong key, deleted user, clock off by more than
    /// the window, server unreachable — the server deliberately does not say which).
    HandshakeTimeout,
    /// A transport event (streams, datagrams, `Closed`).
    Transport(TransportEvent),
}

/// Client counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Hellos sent.
    pub hellos_sent: u64,
    /// Datagrams dropped (not a reply to a pending hello, unknown token, failed authentication).
    pub dropped: u64,
}

enum ClientState {
    Handshaking,
    Established,
    Finished,
}

/// Client token table (one session).
#[derive(Default)]
struct LocalSink(IdMap<u64, u64>);

impl TokenSink for LocalSink {
    fn insert_token(&mut self, token: u64, pn: u64) {
        self.0.entry(token).or_insert(pn);
    }
    fn remove_token(&mut self, token: u64, pn: u64) {
        if self.0.get(&token) == Some(&pn) {
            self.0.remove(&token);
        }
    }
}

/// Hellos remembered for matching replies.
const PENDING_HELLOS: usize = 4;

/// The client side: handshake with retries, then one protected session.
pub struct ClientSession {
    config: ConnectorConfig,
    keys: UserKeys,
    rng: Drbg,
    state: ClientState,
    start: Instant,
    start_unix: u64,
    pending: VecDeque<(SentHello, Key32)>,
    outgoing_hello: Option<(usize, [u8; MAX_HELLO])>,
    next_retry: Instant,
    retry_delay: Duration,
    slot: u16,
    session: Option<Session>,
    tokens: LocalSink,
    events: VecDeque<ClientEvent>,
    clock_offset: Option<i64>,
    stats: ClientStats,
    /// Connecting over the TCP carrier ([`ClientSession::connect_carrier`]).
    carrier: Option<Box<CarrierHandshake>>,
}

/// The TCP carrier's handshake state: the one hello record, and what opens its reply.
struct CarrierHandshake {
    /// The record, until `poll_transmit_frame` hands it out.
    outgoing: Option<(usize, [u8; MAX_HELLO_RECORD])>,
    sent: SentHelloRecord,
    reply_key: Key32,
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("stats", &self.stats)
            .finish()
    }
}

impl ClientSession {
    /// Starts connecting: the first hello is ready in [`ClientSession::poll_transmit`].
    pub fn connect(
        config: ConnectorConfig,
        access_key: &str,
        now: Instant,
        unix_secs: u64,
        rng_seed: [u8; 32],
    ) -> Result<Self, AccessKeyError> {
        let keys = UserKeys::from_access_key(access_key)?;
        let mut rng = Drbg::new(rng_seed);
        let slot = rng.up_to(u32::from(HELLO_SLOTS - 1)) as u16;
        let start_unix = unix_secs.saturating_add_signed(config.clock_offset_secs);
        let retry_delay = config.initial_retry;
        let mut client = ClientSession {
            config,
            keys,
            rng,
            state: ClientState::Handshaking,
            start: now,
            start_unix,
            pending: VecDeque::new(),
            outgoing_hello: None,
            next_retry: now,
            retry_delay,
            slot,
            session: None,
            tokens: LocalSink::default(),
            events: VecDeque::new(),
            clock_offset: None,
            stats: ClientStats::default(),
            carrier: None,
        };
        client.send_hello(now);
        Ok(client)
    }

    fn unix_at(&self, now: Instant) -> u64 {
        self.start_unix + now.saturating_duration_since(self.start).as_secs()
    }

    fn send_hello(&mut self, now: Instant) {
        let unix_secs = self.unix_at(now);
        let epoch = handshake::epoch_of(unix_secs);
        let hello = Hello {
            unix_secs,
            client_random: self.rng.bytes32(),
            max_datagram: self
                .config
                .session
                .max_datagram
                .clamp(MIN_DATAGRAM, MAX_DATAGRAM) as u16,
        };
        let slot = self.slot % HELLO_SLOTS;
        self.slot = self.slot.wrapping_add(1);
        let mut bytes = [0u8; MAX_HELLO];
        let pad = self.config.hello_pad_max;
        let written = handshake::write_hello(
            &self.keys.hello_key,
            &self.keys.tag_key,
            epoch,
            slot,
            &hello,
            pad,
            &mut self.rng,
            &mut bytes,
        );
        if let Some((len, sent)) = written {
            let reply_key = handshake::reply_key(&self.keys.psk, &hello.client_random);
            if self.pending.len() == PENDING_HELLOS {
                self.pending.pop_front();
            }
            self.pending.push_back((sent, reply_key));
            self.outgoing_hello = Some((len, bytes));
            self.stats.hellos_sent += 1;
        }
        self.next_retry = now + self.retry_delay;
        self.retry_delay = (self.retry_delay * 2).min(self.config.max_retry);
    }

    /// Starts connecting over the TCP carrier (docs/PROTOCOL.md §7): the hello record
    /// (announcing [`MAX_FRAME_PLAINTEXT`] as the largest frame plaintext accepted) is the
    /// first output of [`ClientSession::poll_transmit_frame`]; no hello is retransmitted (the
    /// handshake timeout still applies). The datagram calls (`poll_transmit*`,
    /// `handle_datagram`) do nothing on such a connector.
    pub fn connect_carrier(
        config: ConnectorConfig,
        access_key: &str,
        now: Instant,
        unix_secs: u64,
        rng_seed: [u8; 32],
    ) -> Result<Self, AccessKeyError> {
        let mut client = Self::connect(config, access_key, now, unix_secs, rng_seed)?;
        client.pending.clear();
        client.outgoing_hello = None;
        client.stats.hellos_sent = 0;
        client.next_retry = now + client.config.handshake_timeout;
        let hello = Hello {
            unix_secs: client.unix_at(now),
            client_random: client.rng.bytes32(),
            max_datagram: MAX_FRAME_PLAINTEXT as u16,
        };
        let epoch = handshake::epoch_of(hello.unix_secs);
        let slot = client.slot % HELLO_SLOTS;
        let mut bytes = [0u8; MAX_HELLO_RECORD];
        let written = records::write_hello(
            &client.keys.hello_key,
            &client.keys.tag_key,
            epoch,
            slot,
            &hello,
            client.config.hello_pad_max,
            &mut client.rng,
            &mut bytes,
        );
        let Some((len, sent)) = written else {
            // Unreachable: the buffer holds the largest record.
            client.state = ClientState::Finished;
            return Ok(client);
        };
        client.stats.hellos_sent = 1;
        client.carrier = Some(Box::new(CarrierHandshake {
            outgoing: Some((len, bytes)),
            sent,
            reply_key: handshake::reply_key(&client.keys.psk, &hello.client_random),
        }));
        Ok(client)
    }

    /// Whether this connector runs over the TCP carrier.
    pub fn is_carrier(&self) -> bool {
        self.carrier.is_some()
    }

    /// Bytes read from the carrier connection, in order (the reply record, then frames; partial
    /// ones allowed): returns how many leading bytes were consumed (the caller keeps the rest).
    /// `Err`: the connection is unusable (a reply or frame that does not open, or input after
    /// the connector finished); the session is closed (a `Transport(Closed)` event with
    /// `ProtocolViolation` if it was connected).
    pub fn handle_carrier_input(
        &mut self,
        now: Instant,
        input: &mut [u8],
    ) -> Result<usize, FrameError> {
        let mut consumed = 0;
        if matches!(self.state, ClientState::Handshaking) {
            let Some(used) = self.carrier_reply(now, input)? else {
                return Ok(0);
            };
            consumed = used;
        }
        if !matches!(self.state, ClientState::Established) {
            return if consumed > 0 {
                Ok(consumed)
            } else {
                Err(FrameError::Failed)
            };
        }
        let session = self.session.as_mut().ok_or(FrameError::Failed)?;
        let rest = input.get_mut(consumed..).unwrap_or_default();
        match session.handle_frames(now, rest) {
            Ok(n) => {
                self.drain_session();
                Ok(consumed + n)
            }
            Err(e) => {
                self.drain_session();
                self.state = ClientState::Finished;
                self.events
                    .push_back(ClientEvent::Transport(TransportEvent::Closed {
                        reason: CloseReason::ProtocolViolation,
                        by_peer: false,
                    }));
                Err(e)
            }
        }
    }

    /// The reply record at the front of `input`: `Ok(None)` while incomplete, else the bytes it
    /// took (the connector is then established or finished).
    fn carrier_reply(&mut self, now: Instant, input: &[u8]) -> Result<Option<usize>, FrameError> {
        let carrier = self.carrier.as_ref().ok_or(FrameError::Failed)?;
        let Some(head) = input
            .get(..REPLY_HEAD)
            .and_then(|h| <[u8; REPLY_HEAD]>::try_from(h).ok())
        else {
            return Ok(None);
        };
        let Some(len) = records::reply_record_len(&carrier.reply_key, &head) else {
            return Err(self.carrier_failed(FrameError::Length));
        };
        let Some(record) = input.get(..len) else {
            return Ok(None);
        };
        let reply = match records::open_reply(&carrier.reply_key, &carrier.sent, record) {
            Ok(reply) => reply,
            Err(_) => return Err(self.carrier_failed(FrameError::Auth)),
        };
        let hello = carrier.sent.hello;
        self.on_reply(now, reply, &hello);
        Ok(Some(len))
    }

    fn carrier_failed(&mut self, error: FrameError) -> FrameError {
        self.stats.dropped += 1;
        self.state = ClientState::Finished;
        error
    }

    /// The next bytes to write to the carrier connection (the hello record first, then sealed
    /// frames) into `buf` (at least `carrier::MAX_FRAME_LEN` bytes), or `None`. The caller asks
    /// only while its bounded write buffer has room.
    pub fn poll_transmit_frame(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        let carrier = self.carrier.as_mut()?;
        if matches!(self.state, ClientState::Finished) {
            // Closed or timed out before the hello left: it must never leave now (the server
            // would answer it and count a device nobody uses).
            carrier.outgoing = None;
            return None;
        }
        if let Some((len, bytes)) = carrier.outgoing.take() {
            let Some(out) = buf.get_mut(..len) else {
                carrier.outgoing = Some((len, bytes));
                return None;
            };
            out.copy_from_slice(&bytes[..len]);
            return Some(len);
        }
        if !matches!(self.state, ClientState::Established) {
            return None;
        }
        let sent = self.session.as_mut()?.poll_transmit_frame(now, buf);
        self.drain_session();
        sent
    }

    /// Handles a datagram from the server (decrypted in place).
    pub fn handle_datagram(&mut self, now: Instant, data: &mut [u8]) {
        if self.carrier.is_some() {
            self.stats.dropped += 1;
            return;
        }
        match self.state {
            ClientState::Handshaking => self.handle_reply(now, data),
            ClientState::Established => {
                let token = data
                    .get(..TOKEN_LEN)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_le_bytes);
                let (Some(token), Some(session)) = (token, self.session.as_mut()) else {
                    self.stats.dropped += 1;
                    return;
                };
                let Some(&pn) = self.tokens.0.get(&token) else {
                    self.stats.dropped += 1;
                    return;
                };
                if session
                    .handle_packet(now, pn, data, &mut self.tokens)
                    .is_err()
                {
                    self.stats.dropped += 1;
                }
                self.drain_session();
            }
            ClientState::Finished => self.stats.dropped += 1,
        }
    }

    fn handle_reply(&mut self, now: Instant, data: &[u8]) {
        let found = self.pending.iter().find_map(|(sent, key)| {
            handshake::open_reply(key, sent, data)
                .ok()
                .map(|r| (r, sent.hello))
        });
        let Some((reply, hello)) = found else {
            self.stats.dropped += 1;
            return;
        };
        self.on_reply(now, reply, &hello);
    }

    /// An authenticated reply to `hello` (either carrier): connects or finishes.
    fn on_reply(&mut self, now: Instant, reply: Reply, hello: &Hello) {
        let local_unix = self.unix_at(now);
        match reply {
            Reply::Accept {
                server_unix_secs,
                server_random,
                max_datagram,
            } => {
                self.clock_offset = Some(
                    server_unix_secs as i64 - local_unix as i64 + self.config.clock_offset_secs,
                );
                let secret =
                    handshake::session_secret(&self.keys.psk, &hello.client_random, &server_random);
                let seed = self.rng.bytes32();
                let session = if self.carrier.is_some() {
                    let limit = MAX_FRAME_PLAINTEXT.min(usize::from(max_datagram));
                    Session::new_carrier(
                        &secret,
                        Side::Client,
                        &self.config.session,
                        limit,
                        now,
                        seed,
                    )
                } else {
                    let max = self
                        .config
                        .session
                        .max_datagram
                        .min(usize::from(max_datagram));
                    Session::new(
                        &secret,
                        Side::Client,
                        &self.config.session,
                        max,
                        now,
                        seed,
                        &mut self.tokens,
                    )
                };
                self.session = Some(session);
                self.pending.clear();
                self.outgoing_hello = None;
                self.state = ClientState::Established;
                self.events.push_back(ClientEvent::Connected);
            }
            Reply::Refuse {
                server_unix_secs,
                reason,
                retry_after_secs,
            } => {
                self.clock_offset = Some(
                    server_unix_secs as i64 - local_unix as i64 + self.config.clock_offset_secs,
                );
                self.pending.clear();
                self.outgoing_hello = None;
                self.state = ClientState::Finished;
                self.events.push_back(ClientEvent::Refused {
                    reason,
                    retry_after_secs,
                });
            }
        }
    }

    fn drain_session(&mut self) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        while let Some(event) = session.poll_event() {
            self.events.push_back(ClientEvent::Transport(event));
        }
        if session.is_closed() {
            session.release_tokens(&mut self.tokens);
            self.state = ClientState::Finished;
        }
    }

    /// Next datagram to send to the server.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        self.poll_transmit_batch(now, buf, 1).map(|b| b.len)
    }

    /// Next datagrams to send to the server: a hello alone, or a batch of up to `max_segments`
    /// datagrams of the session ([`Session::poll_transmit_batch`]).
    pub fn poll_transmit_batch(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        max_segments: usize,
    ) -> Option<Batch> {
        if self.carrier.is_some() {
            return None;
        }
        if let Some((len, bytes)) = self.outgoing_hello.take() {
            if buf.len() < len {
                return None;
            }
            buf[..len].copy_from_slice(&bytes[..len]);
            return Some(Batch::single(len));
        }
        if !matches!(self.state, ClientState::Established) {
            return None;
        }
        let batch = self
            .session
            .as_mut()?
            .poll_transmit_batch(now, buf, max_segments);
        self.drain_session();
        batch
    }

    /// Earliest instant at which [`ClientSession::handle_timeout`] must run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            ClientState::Handshaking => Some(
                self.next_retry
                    .min(self.start + self.config.handshake_timeout),
            ),
            ClientState::Established => self.session.as_ref()?.poll_timeout(),
            ClientState::Finished => None,
        }
    }

    /// Retransmits the hello (a new one: fresh randomness, next slot) or runs session timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            ClientState::Handshaking => {
                if now >= self.start + self.config.handshake_timeout {
                    self.state = ClientState::Finished;
                    self.pending.clear();
                    self.outgoing_hello = None;
                    self.events.push_back(ClientEvent::HandshakeTimeout);
                } else if now >= self.next_retry && self.carrier.is_none() {
                    self.send_hello(now);
                }
            }
            ClientState::Established => {
                if let Some(session) = self.session.as_mut() {
                    session.handle_timeout(now);
                }
                self.drain_session();
            }
            ClientState::Finished => {}
        }
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// The session once connected (stream operations go through `transport_mut()`).
    pub fn session_mut(&mut self) -> Option<&mut Session> {
        self.session.as_mut()
    }

    /// The session once connected.
    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    /// Gracefully closes the session with `reason`.
    pub fn close(&mut self, now: Instant, reason: CloseReason) {
        match self.session.as_mut() {
            Some(session) => session.close(now, reason),
            None => {
                self.state = ClientState::Finished;
                self.outgoing_hello = None;
            }
        }
        self.drain_session();
    }

    /// True once connected.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, ClientState::Established)
    }

    /// True when nothing more will happen (refused, timed out, or closed).
    pub fn is_finished(&self) -> bool {
        matches!(self.state, ClientState::Finished)
    }

    /// `server clock − client clock` in seconds, learned from the last authenticated reply.
    /// Feed it back as `ConnectorConfig::clock_offset_secs` on the next connect.
    pub fn server_clock_offset(&self) -> Option<i64> {
        self.clock_offset
    }

    /// Counters.
    pub fn stats(&self) -> ClientStats {
        self.stats
    }
}
