//! The stream set of one transport: every live stream, the send and control queues, stream-id
//! allocation and limits, and session-level flow control, with the stream half of frame
//! handling (received frames, acknowledged and lost frames, frames to write) and the
//! application's stream API. The [`Transport`](super::Transport) owns recovery, ACKs, the
//! session's own frames, datagrams and close, and delegates everything about streams here.
//!
//! Invariants owned here: `Stream::in_send_queue ⇔ id ∈ send_queue` (only
//! [`StreamsState::enqueue_send`] adds to the send queue) and `Stream::in_control_queue ⇔
//! id ∈ control_queue` (only [`StreamsState::queue_control`] adds to the control queue).

use std::collections::VecDeque;

use crate::proto::id_map::IdMap;

use super::codes::{OpenResult, ResetReason};
use super::dest::Destination;
use super::flow::{RecvWindow, SendCredit};
use super::frame::{self, Frame, Writer};
use super::recovery::{SentFrame, SentPacket};
use super::stream::{FinState, OpenState, PendingControl, RecvError, Stream, StreamId};
use super::{
    FrameOutcome, INITIAL_MAX_STREAMS, INITIAL_SESSION_WINDOW, INITIAL_STREAM_WINDOW, Side,
    StreamError, StreamStats, TransportConfig, TransportError, TransportEvent, TransportStats,
};

/// Writers blocked on a full buffer are woken once this fraction of the buffer is free…
const WAKE_FRACTION: usize = 8;
/// …or at most this many bytes (avoids waking writers for a few bytes at a time).
const WAKE_MAX_BYTES: usize = 64 * 1024;
/// A STREAM frame is only started when the packet has more room than this: the largest
/// STREAM header (type, id, offset and length varints) plus at least one data byte.
const MIN_STREAM_FRAME_ROOM: usize = 12;
/// Stream bytes one stream sends in a row before the next stream in the send queue gets its
/// turn (about 12 full packets). Turns of one packet each cut every stream's bytes into runs of
/// a datagram: with 100 downloads in one session the client got a few KB per stream per batch
/// of datagrams and wrote each to its socket, 5× the writes (and the application's wake-ups) of
/// one download per byte. A stream's first turn waits only for the turn in progress (see
/// `StreamsState::enqueue_send`), and so does a small write of a stream that had nothing to
/// send ([`SMALL_WRITE`]); otherwise a stream waits one turn per busy stream ahead.
const SEND_TURN: usize = 16 * 1024;
/// New bytes a stream may have queued, after having had nothing to send, and still go right
/// after the turn in progress: a keystroke, a game update or a small request on a long-lived
/// stream (SSH, a websocket) waits for one turn, not for 16 KiB of every busy stream of the
/// session (1.6 MB with 100 downloads). A bulk stream rarely queues this little, and if it
/// does, it sends no more than this before the others.
const SMALL_WRITE: u64 = 4 * 1024;

/// Where [`StreamsState::enqueue_send`] puts a stream in the send queue.
#[derive(Clone, Copy)]
enum Place {
    /// First: its turn goes on (or the packet had no room for it).
    Front,
    /// Last: its turn is over.
    Back,
    /// It has something to send again: last, or at the given index (after the turn in
    /// progress and the run of earlier ones) for a first turn or a small write.
    Arrival(usize),
}
/// Extra send-queue visits per packet beyond two per queued stream (each visit writes a frame
/// or drops a stream from the queue, so the loop is bounded either way).
const SEND_QUEUE_SLACK: usize = 8;

/// Per-stream limits, from the transport configuration.
#[derive(Debug, Clone, Copy)]
struct StreamLimits {
    send_buffer: usize,
    session_send_buffer: usize,
    stream_window: u64,
    max_recv_ranges: usize,
    /// Receive-buffer storage a draining stream keeps (see `stream::RECV_RETAIN`).
    recv_retain: usize,
}

/// Every stream of a session and the session-wide state they share. More than fifteen fields
/// because the stream lifecycle, its two queues and session flow control are one invariant
/// domain (a frame on one stream moves session credit and the queues).
#[derive(Debug)]
pub(super) struct StreamsState {
    side: Side,
    limits: StreamLimits,
    streams: IdMap<u64, Stream>,
    /// Streams with data (or a FIN) to send, in round-robin order.
    send_queue: VecDeque<u64>,
    /// Streams with control frames to send (OPEN, OPEN_OK, RESET_STREAM, MAX_STREAM_DATA).
    control_queue: VecDeque<u64>,
    /// Streams whose last write was partial, to be told when they can write again.
    writable_waiters: Vec<u64>,
    next_local_seq: u64,
    peer_max_streams: u64,
    next_peer_seq: u64,
    local_max_streams: u64,
    peer_stream_window: u64,
    /// `open_stream` hit the peer's limit: emit `StreamsAvailable` when it rises.
    open_blocked: bool,
    /// Bytes in all stream send buffers (bounded by `session_send_buffer`).
    send_buffered: usize,
    /// Storage allocated for all stream send buffers (what they cost in memory).
    send_memory: usize,
    /// Bytes the streams hold beyond the peer's flow-control limits, summed (kept in step at
    /// every write, limit raise and removal: the server asks on every pipe read, and a walk of
    /// the streams there cost O(streams) per read). At most the bytes buffered, which
    /// `TransportConfig::session_send_buffer` keeps under 4 GiB: 32 bits (a `Session` is sized
    /// to a malloc chunk).
    beyond_window: u32,
    /// Session-level credit the peer granted us for new stream bytes.
    send_credit: SendCredit,
    /// Session-level window we grant the peer.
    recv_window: RecvWindow,
    /// The session window moved: MAX_DATA is owed.
    pub(super) max_data_pending: bool,
    /// A peer stream was removed: MAX_STREAMS is owed.
    pub(super) max_streams_pending: bool,
    /// Stream bytes sent for the first time / sent again / delivered to the application.
    bytes_sent: u64,
    bytes_retransmitted: u64,
    bytes_received: u64,
}

impl StreamsState {
    pub(super) fn new(config: &TransportConfig, side: Side) -> Self {
        Self {
            side,
            limits: StreamLimits {
                send_buffer: config.send_buffer,
                session_send_buffer: config.session_send_buffer,
                stream_window: config.stream_window,
                max_recv_ranges: config.max_recv_ranges,
                recv_retain: match side {
                    Side::Client => super::stream::RECV_RETAIN,
                    Side::Server => super::stream::SEND_RETAIN,
                },
            },
            streams: IdMap::default(),
            send_queue: VecDeque::new(),
            control_queue: VecDeque::new(),
            writable_waiters: Vec::new(),
            next_local_seq: 0,
            peer_max_streams: INITIAL_MAX_STREAMS,
            next_peer_seq: 0,
            local_max_streams: config.max_streams,
            peer_stream_window: INITIAL_STREAM_WINDOW,
            open_blocked: false,
            send_buffered: 0,
            send_memory: 0,
            beyond_window: 0,
            send_credit: SendCredit::new(INITIAL_SESSION_WINDOW),
            recv_window: RecvWindow::new(config.session_window),
            max_data_pending: false,
            max_streams_pending: false,
            bytes_sent: 0,
            bytes_retransmitted: 0,
            bytes_received: 0,
        }
    }

    /// Concurrent peer streams we allow (what SETTINGS and MAX_STREAMS carry).
    pub(super) fn local_max_streams(&self) -> u64 {
        self.local_max_streams
    }

    /// The session window end we advertise (what SETTINGS and MAX_DATA carry).
    pub(super) fn advertised_max_data(&self) -> u64 {
        self.recv_window.advertised()
    }

    /// Bytes in all stream send buffers.
    pub(super) fn send_buffered(&self) -> usize {
        self.send_buffered
    }

    pub(super) fn send_memory(&self) -> usize {
        self.send_memory
    }

    /// Bytes the peer currently holds in our receive buffers.
    /// Session credit granted and not yet consumed.
    pub(super) fn recv_committed(&self) -> u64 {
        self.recv_window.committed()
    }

    /// See [`RecvWindow::set_window`].
    pub(super) fn set_recv_window(&mut self, window: u64, announced: bool) {
        self.recv_window.set_window(window, announced);
    }

    /// See [`RecvWindow::limit_unannounced`].
    pub(super) fn limit_first_recv_credit(&mut self, credit: u64, announced: bool) {
        self.recv_window.limit_unannounced(credit, announced);
    }

    pub(super) fn recv_outstanding(&self) -> u64 {
        self.recv_window.outstanding()
    }

    /// Stream frames (control or data) wait to be sent.
    pub(super) fn has_pending(&self) -> bool {
        !self.control_queue.is_empty() || !self.send_queue.is_empty()
    }

    /// Fills the stream fields of the transport's statistics.
    pub(super) fn fill_stats(&self, stats: &mut TransportStats) {
        stats.stream_bytes_sent = self.bytes_sent;
        stats.stream_bytes_retransmitted = self.bytes_retransmitted;
        stats.stream_bytes_received = self.bytes_received;
        stats.streams_open = self.streams.len() as u64;
        stats.recv_buffered = self
            .streams
            .values()
            .map(|s| s.recv.buffered() as u64)
            .sum();
        stats.send_buffered = self
            .streams
            .values()
            .map(|s| s.send.buffered() as u64)
            .sum();
    }

    /// Idle session: gives back buffer storage of streams with nothing buffered, and the room
    /// the stream map and queues grew to for streams that are gone (a stream is 408 bytes: a
    /// map once grown for 30 streams kept 13 KB).
    pub(super) fn release_idle_storage(&mut self) {
        for s in self.streams.values_mut() {
            self.send_memory -= s.send.memory();
            s.send.release_idle_storage();
            self.send_memory += s.send.memory();
            s.recv.release_idle_storage();
        }
        self.streams.shrink_to_fit();
        self.send_queue.shrink_to_fit();
        self.control_queue.shrink_to_fit();
        self.writable_waiters.shrink_to_fit();
    }

    /// Heap bytes of the stream map and queues, the streams' buffers aside (tests).
    #[cfg(test)]
    pub(super) fn table_bytes(&self) -> usize {
        self.streams.capacity() * std::mem::size_of::<(u64, Stream)>()
            + (self.send_queue.capacity() + self.control_queue.capacity()) * 8
            + self.writable_waiters.capacity() * 8
    }

    /// The session is closing: nothing more is sent for any stream.
    pub(super) fn clear_queues(&mut self) {
        for id in self
            .send_queue
            .drain(..)
            .chain(self.control_queue.drain(..))
        {
            if let Some(s) = self.streams.get_mut(&id) {
                s.in_send_queue = false;
                s.in_control_queue = false;
                s.turn_sent = 0;
                s.priority = false;
            }
        }
    }

    fn is_local(&self, id: StreamId) -> bool {
        id.is_client_initiated() == (self.side == Side::Client)
    }

    fn new_stream(&self, open: OpenState) -> Stream {
        Stream::new(
            open,
            self.limits.send_buffer,
            self.peer_stream_window,
            self.limits.stream_window,
            self.limits.max_recv_ranges,
            self.limits.recv_retain,
        )
    }

    // ------------------------------------------------------------------ queues

    /// The one path onto the send queue (owns `in_send_queue ⇔ id ∈ send_queue`): queues
    /// stream `id` if it has something sendable with `credit` bytes of session credit.
    fn enqueue_send(queue: &mut VecDeque<u64>, credit: u64, id: u64, s: &mut Stream, place: Place) {
        if s.in_send_queue || s.is_reset() || !s.send.has_sendable(credit) {
            return;
        }
        s.in_send_queue = true;
        let next = s.send.sent_end() < SEND_TURN as u64 || s.send.unsent() <= SMALL_WRITE;
        match place {
            Place::Front => queue.push_front(id),
            // A stream's first turn (a request or a response starting, a short exchange) and a
            // small write (interactive traffic) come next, after the turn in progress and the
            // ones that arrived before it: they do not wait for every busy stream's turn.
            Place::Arrival(after) if next => {
                queue.insert(after.min(queue.len()), id);
                s.priority = true;
            }
            Place::Arrival(_) | Place::Back => queue.push_back(id),
        }
    }

    /// Where the next first turn or small write goes: after the front and the run of those
    /// queued before it (arrival order; the run is short: what arrived during one turn).
    fn priority_end(&self) -> usize {
        let in_run = |id: &u64| self.streams.get(id).is_some_and(|t| t.priority);
        1 + self
            .send_queue
            .iter()
            .skip(1)
            .take_while(|id| in_run(id))
            .count()
    }

    /// Queues stream `id` for data if it has something sendable.
    fn queue_send(&mut self, id: u64) {
        let credit = self.send_credit.available();
        let after = self.priority_end();
        if let Some(s) = self.streams.get_mut(&id) {
            Self::enqueue_send(&mut self.send_queue, credit, id, s, Place::Arrival(after));
        }
    }

    /// Session credit or a stream window grew: queues every stream that can now send, those
    /// that sent least first. (In the map's order the same streams came first after every
    /// credit step, and with 16 KiB turns a 128 KiB step served 8 of them: under session flow
    /// control the others starved.)
    fn requeue_all_sendable(&mut self) {
        let credit = self.send_credit.available();
        let mut waiting: Vec<(u64, u64)> = (self.streams.iter())
            .filter(|(_, s)| !s.in_send_queue && !s.is_reset() && s.send.has_sendable(credit))
            .map(|(id, s)| (s.send.sent_end(), *id))
            .collect();
        waiting.sort_unstable();
        for (_, id) in waiting {
            let after = self.priority_end();
            if let Some(s) = self.streams.get_mut(&id) {
                Self::enqueue_send(&mut self.send_queue, credit, id, s, Place::Arrival(after));
            }
        }
    }

    /// The one path onto the control queue (owns `in_control_queue ⇔ id ∈ control_queue`).
    fn queue_control(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get_mut(&id.0) {
            if !s.in_control_queue && s.has_control_pending() {
                s.in_control_queue = true;
                self.control_queue.push_back(id.0);
            }
        }
    }

    fn release_session_credit(&mut self, n: u64) {
        if self.recv_window.on_consumed(n).is_some() {
            self.max_data_pending = true;
        }
    }

    /// Removes a stream whose both directions are done, granting the peer a new stream.
    fn maybe_remove(&mut self, id: StreamId) {
        let Some(s) = self.streams.get(&id.0) else {
            return;
        };
        if !s.is_done() {
            return;
        }
        self.send_memory -= s.send.memory();
        self.beyond_window -= s.send.beyond_window() as u32;
        self.streams.remove(&id.0);
        if !self.is_local(id) {
            self.local_max_streams += 1;
            self.max_streams_pending = true;
        }
    }

    // ------------------------------------------------------------------ received frames

    /// The stream a frame refers to: `None` if it existed and is gone; created (with any
    /// lower-numbered peer streams) if the peer opens it now.
    fn stream_for_frame(&mut self, id: StreamId) -> Result<Option<&mut Stream>, TransportError> {
        if self.is_local(id) {
            if id.seq() >= self.next_local_seq {
                return Err(TransportError::StreamLimit);
            }
            return Ok(self.streams.get_mut(&id.0));
        }
        let seq = id.seq();
        if seq >= self.local_max_streams {
            return Err(TransportError::StreamLimit);
        }
        while self.next_peer_seq <= seq {
            let new_id = StreamId((self.next_peer_seq << 1) | (id.0 & 1));
            let stream = self.new_stream(OpenState::Peer {
                announced: false,
                answered: false,
                ok_acked: false,
            });
            self.streams.insert(new_id.0, stream);
            self.next_peer_seq += 1;
        }
        Ok(self.streams.get_mut(&id.0))
    }

    pub(super) fn on_stream_open(
        &mut self,
        id: StreamId,
        dest: Destination,
        events: &mut VecDeque<TransportEvent>,
    ) -> Result<(), TransportError> {
        if self.is_local(id) {
            return Err(TransportError::UnexpectedFrame);
        }
        let Some(s) = self.stream_for_frame(id)? else {
            return Ok(());
        };
        let OpenState::Peer {
            announced: false,
            answered,
            ok_acked,
        } = s.open
        else {
            return Ok(());
        };
        s.open = OpenState::Peer {
            announced: true,
            answered,
            ok_acked,
        };
        if s.is_reset() {
            return Ok(());
        }
        s.dest = Some(dest.clone());
        events.push_back(TransportEvent::StreamOpened { id, dest });
        self.notify_recv(id, events);
        Ok(())
    }

    pub(super) fn on_open_ok(
        &mut self,
        id: StreamId,
        events: &mut VecDeque<TransportEvent>,
    ) -> Result<(), TransportError> {
        if !self.is_local(id) {
            return Err(TransportError::UnexpectedFrame);
        }
        let Some(s) = self.stream_for_frame(id)? else {
            return Ok(());
        };
        if let OpenState::Local {
            open_acked,
            answered: false,
        } = s.open
        {
            s.open = OpenState::Local {
                open_acked,
                answered: true,
            };
            if !s.is_reset() {
                events.push_back(TransportEvent::StreamOpenResult {
                    id,
                    result: OpenResult::Ok,
                });
            }
        }
        Ok(())
    }

    pub(super) fn on_stream_frame(
        &mut self,
        id: StreamId,
        offset: u64,
        data: &[u8],
        fin: bool,
        events: &mut VecDeque<TransportEvent>,
    ) -> Result<FrameOutcome, TransportError> {
        let end = offset + data.len() as u64;
        let highest = match self.stream_for_frame(id)? {
            Some(s) => s.recv.highest,
            None => return Ok(FrameOutcome::Continue),
        };
        // Check the session window before storing anything.
        if !self.recv_window.can_receive(end.saturating_sub(highest)) {
            return Err(TransportError::FlowControl);
        }
        let Some(s) = self.streams.get_mut(&id.0) else {
            return Ok(FrameOutcome::Continue);
        };
        if let Some((_, final_size)) = s.reset_remote {
            // Final size already known; only check consistency.
            if end > final_size {
                return Err(TransportError::FinalSize);
            }
            return Ok(FrameOutcome::Continue);
        }
        let grown = match s.recv.on_data(offset, data, fin) {
            Ok(g) => g,
            Err(RecvError::FlowControl) => return Err(TransportError::FlowControl),
            Err(RecvError::FinalSize) => return Err(TransportError::FinalSize),
            Err(RecvError::TooFragmented) => return Ok(FrameOutcome::DropPacket),
        };
        let released = if s.recv.discarding {
            s.recv.release_discarded()
        } else {
            0
        };
        if self.recv_window.on_received(grown).is_err() {
            return Err(TransportError::FlowControl);
        }
        if released > 0 {
            self.release_session_credit(released);
        }
        self.notify_recv(id, events);
        self.maybe_remove(id);
        Ok(FrameOutcome::Continue)
    }

    /// Emits readable / finished events for an announced, live stream.
    fn notify_recv(&mut self, id: StreamId, events: &mut VecDeque<TransportEvent>) {
        let Some(s) = self.streams.get_mut(&id.0) else {
            return;
        };
        if !s.is_announced() || s.is_reset() {
            return;
        }
        if s.recv.readable() > 0 && !s.readable_notified {
            s.readable_notified = true;
            events.push_back(TransportEvent::StreamReadable { id });
        }
        if s.recv.is_complete() && !s.finished_notified {
            s.finished_notified = true;
            events.push_back(TransportEvent::StreamFinished { id });
        }
    }

    pub(super) fn on_reset_stream(
        &mut self,
        id: StreamId,
        reason: ResetReason,
        final_size: u64,
        events: &mut VecDeque<TransportEvent>,
    ) -> Result<(), TransportError> {
        let Some(s) = self.stream_for_frame(id)? else {
            return Ok(());
        };
        if s.reset_remote.is_some() {
            return Ok(());
        }
        if final_size < s.recv.highest || s.recv.fin_offset.is_some_and(|f| f != final_size) {
            return Err(TransportError::FinalSize);
        }
        if final_size > s.recv.max_data {
            return Err(TransportError::FlowControl);
        }
        let grown = final_size - s.recv.highest;
        s.recv.highest = final_size;
        let released = s.recv.discard();
        s.reset_remote = Some((reason, final_size));
        let event = Self::reset_event(s, id, reason);
        let (mut abandoned, mut freed_memory, mut beyond) = (0, 0, 0);
        if s.reset_local.is_none() {
            // Echo the reset so the peer learns our final size too.
            s.reset_local = Some(reason);
            s.pending.insert(PendingControl::RESET);
            (abandoned, freed_memory) = (s.send.buffered(), s.send.memory());
            beyond = s.send.beyond_window() as u32;
            s.send.abandon();
        }
        s.pending.keep_reset_only();
        self.send_buffered -= abandoned;
        self.send_memory -= freed_memory;
        self.beyond_window -= beyond;
        if self.recv_window.on_received(grown).is_err() {
            return Err(TransportError::FlowControl);
        }
        self.release_session_credit(released);
        self.queue_control(id);
        if let Some(e) = event {
            events.push_back(e);
        }
        self.maybe_remove(id);
        Ok(())
    }

    /// What the application learns from the peer's reset of `s` (answering an open we are still
    /// waiting for, if any).
    fn reset_event(s: &mut Stream, id: StreamId, reason: ResetReason) -> Option<TransportEvent> {
        match s.open {
            // We reset it ourselves first: the application already knows.
            _ if s.reset_local.is_some() => None,
            OpenState::Local {
                answered: false,
                open_acked,
            } => {
                s.open = OpenState::Local {
                    open_acked,
                    answered: true,
                };
                match reason {
                    ResetReason::OpenFailed(result) => {
                        Some(TransportEvent::StreamOpenResult { id, result })
                    }
                    _ => Some(TransportEvent::StreamReset { id, reason }),
                }
            }
            _ if s.is_announced() => Some(TransportEvent::StreamReset { id, reason }),
            _ => None,
        }
    }

    /// How far beyond the peer's flow-control limit a stream may write: anything while the
    /// session's send buffer is less than half full (a stream waiting for its window keeps
    /// bytes ready, and its buffer does not shrink and grow at every window update), then
    /// [`BEYOND_WINDOW_SLACK`]. A stream whose reader stopped (a paused download) so keeps its
    /// bytes in the kernel's socket buffers instead of filling the send buffer that every
    /// other stream of the session shares (they stalled until its idle timeout).
    fn beyond_window_room(&self) -> u64 {
        let free = self.limits.session_send_buffer - self.send_buffered;
        let above_half = free.saturating_sub(self.limits.session_send_buffer / 2);
        (above_half as u64).max(super::BEYOND_WINDOW_SLACK)
    }

    /// Bytes the streams hold beyond the peer's flow-control limits (unsendable until raised).
    pub(super) fn beyond_window(&self) -> u64 {
        u64::from(self.beyond_window)
    }

    pub(super) fn on_max_data(&mut self, max: u64) {
        if self.send_credit.raise(max) {
            self.requeue_all_sendable();
        }
    }

    pub(super) fn on_max_stream_data(
        &mut self,
        id: StreamId,
        max: u64,
    ) -> Result<(), TransportError> {
        if let Some(s) = self.stream_for_frame(id)? {
            if max > s.send.max_data {
                let before = s.send.beyond_window();
                s.send.max_data = max;
                let sendable = before - s.send.beyond_window();
                self.beyond_window -= sendable as u32;
                self.queue_send(id.0);
            }
        }
        Ok(())
    }

    pub(super) fn on_settings(
        &mut self,
        stream_window: u64,
        session_window: u64,
        max_streams: u64,
        events: &mut VecDeque<TransportEvent>,
    ) {
        let stream_window = stream_window.clamp(INITIAL_STREAM_WINDOW, frame::VARINT_MAX);
        if stream_window > self.peer_stream_window {
            self.peer_stream_window = stream_window;
            for s in self.streams.values_mut() {
                let before = s.send.beyond_window();
                s.send.max_data = s.send.max_data.max(stream_window);
                self.beyond_window -= (before - s.send.beyond_window()) as u32;
            }
        }
        self.send_credit.raise(session_window);
        self.raise_peer_max_streams(max_streams, events);
        self.requeue_all_sendable();
    }

    pub(super) fn raise_peer_max_streams(&mut self, n: u64, events: &mut VecDeque<TransportEvent>) {
        if n > self.peer_max_streams {
            self.peer_max_streams = n.min(frame::VARINT_MAX);
            if self.open_blocked {
                self.open_blocked = false;
                events.push_back(TransportEvent::StreamsAvailable);
            }
        }
    }

    // ------------------------------------------------------------------ acknowledged and lost frames

    /// A packet carrying `frame` was acknowledged.
    pub(super) fn on_frame_acked(&mut self, frame: SentFrame) {
        match frame {
            SentFrame::Stream {
                id,
                offset,
                len,
                fin,
            } => {
                let Some(s) = self.streams.get_mut(&id) else {
                    return;
                };
                let memory = s.send.memory();
                let freed = s.send.on_acked(offset, usize::from(len), fin);
                self.send_buffered -= freed;
                self.send_memory = self.send_memory - memory + s.send.memory();
            }
            SentFrame::Open(id) => {
                let Some(s) = self.streams.get_mut(&id) else {
                    return;
                };
                if let OpenState::Local { answered, .. } = s.open {
                    s.open = OpenState::Local {
                        open_acked: true,
                        answered,
                    };
                }
            }
            SentFrame::OpenOk(id) => {
                let Some(s) = self.streams.get_mut(&id) else {
                    return;
                };
                if let OpenState::Peer {
                    announced,
                    answered,
                    ..
                } = s.open
                {
                    s.open = OpenState::Peer {
                        announced,
                        answered,
                        ok_acked: true,
                    };
                }
            }
            SentFrame::Reset(id) => {
                let Some(s) = self.streams.get_mut(&id) else {
                    return;
                };
                s.reset_local_acked = true;
            }
            SentFrame::MaxStreamData(_)
            | SentFrame::MaxData
            | SentFrame::MaxStreams
            | SentFrame::Settings => return,
        }
        if let SentFrame::Stream { id, .. }
        | SentFrame::Open(id)
        | SentFrame::OpenOk(id)
        | SentFrame::Reset(id) = frame
        {
            self.maybe_remove(StreamId(id));
        }
    }

    /// A packet carrying `frame` was declared lost: schedules what must be sent again.
    /// (SETTINGS is the transport's own frame and never reaches here.)
    pub(super) fn on_frame_lost(&mut self, frame: SentFrame) {
        let (id, again) = match frame {
            SentFrame::Stream {
                id,
                offset,
                len,
                fin,
            } => {
                let Some(s) = self.streams.get_mut(&id) else {
                    return;
                };
                if s.is_reset() {
                    return;
                }
                s.send.on_lost(offset, usize::from(len), fin);
                self.bytes_retransmitted += u64::from(len);
                self.queue_send(id);
                return;
            }
            SentFrame::MaxData => {
                self.max_data_pending = true;
                return;
            }
            SentFrame::MaxStreams => {
                self.max_streams_pending = true;
                return;
            }
            SentFrame::Settings => return,
            SentFrame::Open(id) => (id, PendingControl::OPEN),
            SentFrame::OpenOk(id) => (id, PendingControl::OPEN_OK),
            SentFrame::Reset(id) => (id, PendingControl::RESET),
            SentFrame::MaxStreamData(id) => (id, PendingControl::MAX_STREAM_DATA),
        };
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let needed = match again {
            PendingControl::OPEN => {
                matches!(
                    s.open,
                    OpenState::Local {
                        open_acked: false,
                        ..
                    }
                ) && !s.is_reset()
            }
            PendingControl::OPEN_OK => {
                matches!(
                    s.open,
                    OpenState::Peer {
                        ok_acked: false,
                        ..
                    }
                ) && !s.is_reset()
            }
            PendingControl::RESET => !s.reset_local_acked,
            _ => !s.is_reset() && s.recv.fin_offset.is_none(),
        };
        if needed {
            s.pending.insert(again);
            self.queue_control(StreamId(id));
        }
    }

    /// Tells streams blocked on a full send buffer that they can write again, once there is
    /// a useful amount of room (avoids waking writers for a few bytes at a time).
    pub(super) fn wake_writers(&mut self, events: &mut VecDeque<TransportEvent>) {
        if self.writable_waiters.is_empty() {
            return;
        }
        let session_free = self.limits.session_send_buffer - self.send_buffered;
        let threshold = (self.limits.session_send_buffer / WAKE_FRACTION).min(WAKE_MAX_BYTES);
        if session_free < threshold {
            return;
        }
        let beyond = self.beyond_window_room();
        let mut waiters = std::mem::take(&mut self.writable_waiters);
        waiters.retain(|&id| {
            let Some(s) = self.streams.get_mut(&id) else {
                return false;
            };
            if s.is_reset() {
                s.want_writable = false;
                return false;
            }
            let stream_threshold = threshold.min(s.send.limit() / WAKE_FRACTION).max(1);
            if s.send.writable_room(beyond) < stream_threshold {
                return true;
            }
            s.want_writable = false;
            events.push_back(TransportEvent::StreamWritable { id: StreamId(id) });
            false
        });
        self.writable_waiters = waiters;
    }

    // ------------------------------------------------------------------ frames to send

    /// Writes pending stream control frames (OPEN, OPEN_OK, RESET_STREAM, MAX_STREAM_DATA).
    pub(super) fn write_controls(&mut self, w: &mut Writer<'_>, packet: &mut SentPacket) {
        while let Some(&id) = self.control_queue.front() {
            let Some(s) = self.streams.get_mut(&id) else {
                self.control_queue.pop_front();
                continue;
            };
            Self::write_stream_controls(id, s, w, packet);
            if s.has_control_pending() {
                return; // out of room: continue in the next packet
            }
            s.in_control_queue = false;
            self.control_queue.pop_front();
            self.maybe_remove(StreamId(id));
        }
    }

    /// Writes what fits of stream `id`'s pending control frames.
    fn write_stream_controls(id: u64, s: &mut Stream, w: &mut Writer<'_>, packet: &mut SentPacket) {
        for control in [
            PendingControl::OPEN,
            PendingControl::OPEN_OK,
            PendingControl::RESET,
            PendingControl::MAX_STREAM_DATA,
        ] {
            if !s.pending.contains(control) || !packet.has_frame_room() {
                continue;
            }
            let (f, sent) = match control {
                PendingControl::OPEN => {
                    let unspecified = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
                    let dest = s.dest.clone().unwrap_or(Destination::Addr(unspecified));
                    (Frame::StreamOpen { id, dest }, SentFrame::Open(id))
                }
                PendingControl::OPEN_OK => (Frame::OpenOk { id }, SentFrame::OpenOk(id)),
                PendingControl::RESET => (
                    Frame::ResetStream {
                        id,
                        reason: s.reset_local.unwrap_or(ResetReason::Cancelled),
                        final_size: s.send.sent_end(),
                    },
                    SentFrame::Reset(id),
                ),
                _ => (
                    Frame::MaxStreamData {
                        id,
                        max: s.recv.max_data,
                    },
                    SentFrame::MaxStreamData(id),
                ),
            };
            if frame::encode_frame(w, &f).is_some() {
                s.pending.remove(control);
                packet.push_frame(sent);
            }
        }
    }

    /// Writes STREAM frames from the send queue while the packet has room: round-robin, each
    /// stream sending up to [`SEND_TURN`] bytes (over as many packets) per turn.
    pub(super) fn write_data(&mut self, w: &mut Writer<'_>, packet: &mut SentPacket) {
        // Each iteration either writes a frame (consuming room) or drops a stream from the
        // queue, so this terminates.
        let mut budget = self.send_queue.len() * 2 + SEND_QUEUE_SLACK;
        while budget > 0 && packet.has_frame_room() && w.room() > MIN_STREAM_FRAME_ROOM {
            budget -= 1;
            let Some(id) = self.send_queue.pop_front() else {
                break;
            };
            let credit = self.send_credit.available();
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            s.in_send_queue = false;
            // At the front now: no longer in the run behind it.
            s.priority = false;
            // Its turn ends here unless it goes on below.
            let turn_sent = std::mem::take(&mut s.turn_sent);
            if s.is_reset() {
                continue;
            }
            let header = frame::stream_header_len(id, s.send.end(), w.room());
            if header >= w.room() {
                Self::enqueue_send(&mut self.send_queue, credit, id, s, Place::Front);
                s.turn_sent = turn_sent;
                break;
            }
            let max_len = w.room() - header;
            let Some(chunk) = s.send.next_chunk(max_len, credit) else {
                continue;
            };
            if frame::encode_stream_header(w, id, chunk.offset, chunk.len, chunk.fin).is_none() {
                break; // cannot happen: sizes were checked
            }
            if let Some(dst) = w.reserve(chunk.len) {
                s.send.copy_chunk(chunk.offset, dst);
            }
            self.send_credit.consume(chunk.new_bytes);
            self.bytes_sent += chunk.new_bytes;
            packet.push_frame(SentFrame::Stream {
                id,
                offset: chunk.offset,
                len: chunk.len as u16,
                fin: chunk.fin,
            });
            let credit = self.send_credit.available();
            // Its turn goes on (at the front) while it has bytes and the turn has room.
            let turn = turn_sent as usize + chunk.len;
            let goes_on = turn < SEND_TURN;
            let place = if goes_on { Place::Front } else { Place::Back };
            Self::enqueue_send(&mut self.send_queue, credit, id, s, place);
            if goes_on && s.in_send_queue {
                s.turn_sent = turn as u32; // below SEND_TURN
            }
        }
    }

    // ------------------------------------------------------------------ application API

    /// Opens a local stream towards `dest` (see [`super::Transport::open_stream`]).
    pub(super) fn open(&mut self, dest: Destination) -> Result<StreamId, StreamError> {
        if self.next_local_seq >= self.peer_max_streams {
            self.open_blocked = true;
            return Err(StreamError::TooManyStreams);
        }
        let side_bit = match self.side {
            Side::Client => 0,
            Side::Server => 1,
        };
        let id = StreamId((self.next_local_seq << 1) | side_bit);
        self.next_local_seq += 1;
        let mut s = self.new_stream(OpenState::Local {
            open_acked: false,
            answered: false,
        });
        s.dest = Some(dest);
        s.pending.insert(PendingControl::OPEN);
        self.streams.insert(id.0, s);
        self.queue_control(id);
        Ok(id)
    }

    fn stream_mut(&mut self, id: StreamId) -> Result<&mut Stream, StreamError> {
        let missing = self.missing(id);
        self.streams.get_mut(&id.0).ok_or(missing)
    }

    fn stream_ref(&self, id: StreamId) -> Result<&Stream, StreamError> {
        self.streams.get(&id.0).ok_or_else(|| self.missing(id))
    }

    /// The error for a stream that is not in the set: closed, or never opened.
    fn missing(&self, id: StreamId) -> StreamError {
        let known = if self.is_local(id) {
            id.seq() < self.next_local_seq
        } else {
            id.seq() < self.next_peer_seq
        };
        if known {
            StreamError::Closed
        } else {
            StreamError::UnknownStream
        }
    }

    /// Answers a peer's open (see [`super::Transport::answer_open`]).
    pub(super) fn answer_open(
        &mut self,
        id: StreamId,
        result: OpenResult,
    ) -> Result<(), StreamError> {
        let s = self.stream_mut(id)?;
        let OpenState::Peer {
            announced: true,
            answered: false,
            ok_acked,
        } = s.open
        else {
            return Err(StreamError::InvalidState);
        };
        if let Some((reason, _)) = s.reset_remote {
            return Err(StreamError::Reset(reason));
        }
        s.open = OpenState::Peer {
            announced: true,
            answered: true,
            ok_acked,
        };
        if result == OpenResult::Ok {
            s.pending.insert(PendingControl::OPEN_OK);
            self.queue_control(id);
        } else {
            self.reset_inner(id, ResetReason::OpenFailed(result));
        }
        Ok(())
    }

    /// Stream `id` if the application may still write to it.
    fn writable_stream(&mut self, id: StreamId) -> Result<&mut Stream, StreamError> {
        let s = self.stream_mut(id)?;
        if let Some(reason) = s.reset_remote.map(|(r, _)| r).or(s.reset_local) {
            return Err(StreamError::Reset(reason));
        }
        if s.send.fin != FinState::Open {
            return Err(StreamError::Finished);
        }
        Ok(s)
    }

    /// Queues data (see [`super::Transport::stream_write`]).
    pub(super) fn write(&mut self, id: StreamId, data: &[u8]) -> Result<usize, StreamError> {
        let session_free = self.limits.session_send_buffer - self.send_buffered;
        let beyond = self.beyond_window_room();
        let s = self.writable_stream(id)?;
        let (memory, before) = (s.send.memory(), s.send.beyond_window());
        let room = s.send.writable_room(beyond).min(session_free);
        let n = s.send.write(&data[..data.len().min(room)]);
        let grown = s.send.memory() - memory;
        let beyond_grown = s.send.beyond_window() - before;
        s.bytes_written += n as u64;
        let start_waiting = n < data.len() && !s.want_writable;
        if start_waiting {
            s.want_writable = true;
            self.writable_waiters.push(id.0);
        }
        if n > 0 {
            self.queue_send(id.0);
        }
        self.send_buffered += n;
        self.send_memory += grown;
        self.beyond_window += beyond_grown as u32;
        Ok(n)
    }

    /// Free send-buffer space filled in place (see [`super::Transport::stream_write_space`]).
    pub(super) fn write_space(
        &mut self,
        id: StreamId,
        max: usize,
    ) -> Result<&mut [u8], StreamError> {
        let session_free = self.limits.session_send_buffer - self.send_buffered;
        let beyond = self.beyond_window_room();
        let s = self.writable_stream(id)?;
        let memory = s.send.memory();
        let room = max.min(session_free).min(s.send.writable_room(beyond));
        let room = s.send.spare(room).len();
        let grown = s.send.memory() - memory;
        if room == 0 && max > 0 && !s.want_writable {
            s.want_writable = true;
            self.writable_waiters.push(id.0);
        }
        self.send_memory += grown;
        // Same slice again (no growth this time), now that the accounting is done.
        let s = self.stream_mut(id)?;
        Ok(s.send.spare(room))
    }

    /// Queues bytes written in place (see [`super::Transport::stream_write_commit`]).
    pub(super) fn write_commit(&mut self, id: StreamId, n: usize) -> Result<usize, StreamError> {
        let s = self.stream_mut(id)?;
        if s.is_reset() || s.send.fin != FinState::Open {
            return Err(StreamError::Finished);
        }
        // Accounting follows what the ring took, never a caller's larger `n`; committing
        // nothing gives back the storage the space request grew (see `ByteRing::commit`).
        let (memory, before) = (s.send.memory(), s.send.beyond_window());
        let n = s.send.commit(n);
        let released = memory.saturating_sub(s.send.memory());
        let beyond_grown = s.send.beyond_window() - before;
        s.bytes_written += n as u64;
        if n > 0 {
            self.queue_send(id.0);
        }
        self.send_buffered += n;
        self.send_memory -= released;
        self.beyond_window += beyond_grown as u32;
        Ok(n)
    }

    /// How many bytes [`StreamsState::write`] would accept right now.
    pub(super) fn write_capacity(&self, id: StreamId) -> usize {
        match self.streams.get(&id.0) {
            Some(s) if !s.is_reset() && s.send.fin == FinState::Open => s
                .send
                .free_space()
                .min(self.limits.session_send_buffer - self.send_buffered),
            _ => 0,
        }
    }

    /// Reads in-order data (see [`super::Transport::stream_read`]).
    pub(super) fn read(&mut self, id: StreamId, buf: &mut [u8]) -> Result<usize, StreamError> {
        let (a, b) = self.peek(id)?;
        let first = a.len().min(buf.len());
        let second = b.len().min(buf.len() - first);
        buf[..first].copy_from_slice(&a[..first]);
        buf[first..first + second].copy_from_slice(&b[..second]);
        self.consume(id, first + second)
    }

    /// In-order data in place (see [`super::Transport::stream_peek`]).
    pub(super) fn peek(&self, id: StreamId) -> Result<(&[u8], &[u8]), StreamError> {
        let s = self.stream_ref(id)?;
        if let Some(reason) = s.reset_remote.map(|(r, _)| r).or(s.reset_local) {
            return Err(StreamError::Reset(reason));
        }
        Ok(s.recv.peek())
    }

    /// Marks peeked data as read (see [`super::Transport::stream_consume`]).
    pub(super) fn consume(&mut self, id: StreamId, n: usize) -> Result<usize, StreamError> {
        let s = self.stream_mut(id)?;
        if let Some(reason) = s.reset_remote.map(|(r, _)| r).or(s.reset_local) {
            return Err(StreamError::Reset(reason));
        }
        s.readable_notified = false;
        let n = s.recv.advance(n);
        if n == 0 {
            if s.recv.is_finished() {
                s.finished_notified = true;
                self.maybe_remove(id);
                return Ok(0);
            }
            return Err(StreamError::Blocked);
        }
        s.bytes_read += n as u64;
        let window_moved = s.recv.window_update().is_some();
        if window_moved {
            s.pending.insert(PendingControl::MAX_STREAM_DATA);
        }
        self.bytes_received += n as u64;
        if window_moved {
            self.queue_control(id);
        }
        self.release_session_credit(n as u64);
        Ok(n)
    }

    /// Finishes our direction (see [`super::Transport::stream_finish`]).
    pub(super) fn finish(&mut self, id: StreamId) -> Result<(), StreamError> {
        let s = self.stream_mut(id)?;
        if let Some(reason) = s.reset_remote.map(|(r, _)| r).or(s.reset_local) {
            return Err(StreamError::Reset(reason));
        }
        if s.send.fin != FinState::Open {
            return Ok(());
        }
        s.send.fin = FinState::Pending;
        self.queue_send(id.0);
        Ok(())
    }

    /// Aborts the stream in both directions (see [`super::Transport::stream_reset`]).
    pub(super) fn reset(&mut self, id: StreamId, reason: ResetReason) -> Result<(), StreamError> {
        let s = self.stream_mut(id)?;
        if s.reset_local.is_some() {
            return Ok(());
        }
        self.reset_inner(id, reason);
        Ok(())
    }

    fn reset_inner(&mut self, id: StreamId, reason: ResetReason) {
        let Some(s) = self.streams.get_mut(&id.0) else {
            return;
        };
        if s.reset_local.is_some() {
            return;
        }
        s.reset_local = Some(reason);
        s.pending = PendingControl::RESET;
        self.send_buffered -= s.send.buffered();
        self.send_memory -= s.send.memory();
        self.beyond_window -= s.send.beyond_window() as u32;
        s.send.abandon();
        let released = s.recv.discard();
        self.release_session_credit(released);
        self.queue_control(id);
    }

    pub(super) fn stream_stats(&self, id: StreamId) -> Option<StreamStats> {
        let s = self.streams.get(&id.0)?;
        Some(StreamStats {
            bytes_written: s.bytes_written,
            bytes_read: s.bytes_read,
            send_buffered: s.send.buffered() as u64,
            recv_buffered: s.recv.buffered() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::sim::SimRng;
    use crate::proto::transport::congestion::DeliverySnapshot;
    use std::time::Instant;

    impl StreamsState {
        /// Both queue invariants: a stream is flagged exactly when it is queued, at most once.
        fn assert_queues_consistent(&self) {
            for (queue, flag, name) in [
                (
                    &self.send_queue,
                    (|s: &Stream| s.in_send_queue) as fn(&Stream) -> bool,
                    "send",
                ),
                (
                    &self.control_queue,
                    |s: &Stream| s.in_control_queue,
                    "control",
                ),
            ] {
                for (i, id) in queue.iter().enumerate() {
                    assert!(
                        !queue.iter().skip(i + 1).any(|x| x == id),
                        "{name}: {id} twice"
                    );
                    if let Some(s) = self.streams.get(id) {
                        assert!(flag(s), "{name}: {id} queued but not flagged");
                    }
                }
                for (id, s) in &self.streams {
                    assert_eq!(flag(s), queue.contains(id), "{name}: flag of {id}");
                }
            }
            let memory: usize = self.streams.values().map(|s| s.send.memory()).sum();
            assert_eq!(self.send_memory, memory, "send memory accounting");
            let buffered: usize = self.streams.values().map(|s| s.send.buffered()).sum();
            assert_eq!(self.send_buffered, buffered, "send buffered accounting");
            let beyond: u64 = self.streams.values().map(|s| s.send.beyond_window()).sum();
            assert_eq!(self.beyond_window(), beyond, "beyond-window accounting");
            // What makes 32 bits enough (a reset stream's bytes leave the count at once).
            assert!(
                beyond <= self.send_buffered as u64,
                "{beyond} beyond, buffered {}",
                self.send_buffered
            );
            for (id, s) in &self.streams {
                if s.turn_sent > 0 {
                    assert_eq!(self.send_queue.front(), Some(id), "a turn is at the front");
                    assert!((s.turn_sent as usize) < SEND_TURN);
                }
            }
        }
    }

    /// The counter behind `Transport::unsent` (bytes beyond the peer's flow-control limits)
    /// equals the walk over every stream it replaced, under random writes (copied and in place),
    /// stream and session limit raises, settings, packets acknowledged and lost, resets from
    /// either side, finishes and removals; streams past their window are common here (64 KiB
    /// peer windows, 256 KiB stream buffers).
    #[test]
    fn beyond_window_counter_equals_the_walk_under_random_operations() {
        let now = Instant::now();
        let config = TransportConfig {
            send_buffer: 256 * 1024,
            session_send_buffer: 1024 * 1024,
            ..TransportConfig::default()
        }
        .sanitized();
        let mut rng = SimRng::new(11);
        let mut events = VecDeque::new();
        let mut streams = StreamsState::new(&config, Side::Client);
        let (mut ids, mut in_flight) = (Vec::<StreamId>::new(), Vec::<SentFrame>::new());
        let (mut buf, data) = (vec![0u8; 1400], vec![0x33u8; 40_000]);
        let (mut peak, mut settings_window) = (0u64, INITIAL_STREAM_WINDOW);
        let mut removed_past_window = 0;
        for _ in 0..60_000 {
            let pick = |rng: &mut SimRng, ids: &[StreamId]| {
                ids.get(rng.below(ids.len() as u64) as usize).copied()
            };
            let past: Vec<StreamId> = (streams.streams.iter())
                .filter(|(_, s)| s.send.beyond_window() > 0)
                .map(|(id, _)| StreamId(*id))
                .collect();
            let stream = pick(&mut rng, &ids);
            match (rng.below(12), stream) {
                (0, _) if ids.len() < 16 => {
                    if let Ok(id) = streams.open(Destination::domain("a.test", 1).unwrap()) {
                        ids.push(id);
                    }
                }
                (1..=2, Some(id)) => {
                    let len = rng.below(data.len() as u64) as usize;
                    let _ = streams.write(id, &data[..len]);
                }
                (3, Some(id)) => {
                    let want = rng.below(70_000) as usize;
                    let got = streams.write_space(id, want).map_or(0, |space| space.len());
                    let _ = streams.write_commit(id, rng.below(got as u64 + 1) as usize);
                }
                (4, _) => {
                    let mut w = Writer::new(&mut buf);
                    let mut packet = SentPacket::new(now, DeliverySnapshot::new(now));
                    streams.write_controls(&mut w, &mut packet);
                    streams.write_data(&mut w, &mut packet);
                    in_flight.extend_from_slice(packet.frames());
                }
                (5..=7, _) if !in_flight.is_empty() => {
                    let f = in_flight.swap_remove(rng.below(in_flight.len() as u64) as usize);
                    if rng.chance(0.8) {
                        streams.on_frame_acked(f);
                    } else {
                        streams.on_frame_lost(f);
                    }
                }
                (8, Some(id)) if rng.chance(0.3) => {
                    let max = streams.streams.get(&id.0).map_or(0, |s| s.send.max_data);
                    let _ = streams.on_max_stream_data(id, max + rng.below(32_000));
                    streams.on_max_data(streams.send_credit.available() + (1 << 20));
                }
                (9, _) if rng.chance(0.05) => {
                    settings_window = (settings_window + rng.below(16 * 1024)).min(128 * 1024);
                    streams.on_settings(settings_window, 1 << 30, 1000, &mut events);
                }
                (10, Some(id)) if rng.chance(0.3) => {
                    // Often one past its window (its bytes there leave the count on removal).
                    let id = match pick(&mut rng, &past) {
                        Some(past) if rng.chance(0.5) => past,
                        _ => id,
                    };
                    let reason = ResetReason::Cancelled;
                    match rng.below(3) {
                        0 => drop(streams.reset(id, reason)),
                        1 => drop(streams.finish(id)),
                        _ => drop(streams.on_reset_stream(id, reason, 0, &mut events)),
                    }
                }
                (11, _) if rng.chance(0.01) => streams.release_idle_storage(),
                _ => {}
            }
            events.clear();
            streams.assert_queues_consistent();
            ids.retain(|id| streams.streams.contains_key(&id.0));
            peak = peak.max(streams.beyond_window());
            // Reset (its bytes leave the count at once) or removed.
            removed_past_window += (past.iter())
                .filter(|id| streams.streams.get(&id.0).is_none_or(|s| s.is_reset()))
                .count();
        }
        assert!(peak > 64 * 1024, "streams went past their windows: {peak}");
        assert!(
            removed_past_window >= 50,
            "streams past their windows were reset or removed: {removed_past_window}"
        );
    }

    /// A client's stream set for the scheduling tests, with unlimited session credit unless
    /// `credit` is false.
    fn scheduling_streams(credit: bool) -> StreamsState {
        let config = TransportConfig::default().sanitized();
        let mut streams = StreamsState::new(&config, Side::Client);
        if credit {
            streams.on_max_data(u64::MAX / 2);
        }
        streams
    }

    /// Opens a stream with an unlimited window and writes `size` bytes to it.
    fn open_with(streams: &mut StreamsState, size: usize) -> StreamId {
        let id = (streams.open(Destination::domain("a.test", 1).unwrap())).unwrap();
        streams.on_max_stream_data(id, u64::MAX / 2).unwrap();
        assert_eq!(streams.write(id, &vec![1u8; size]), Ok(size));
        id
    }

    /// Writes one 1,200-byte packet's control and STREAM frames; returns (stream, length) of
    /// each STREAM frame.
    fn send_packet(streams: &mut StreamsState) -> Vec<(u64, usize)> {
        let now = Instant::now();
        let mut buf = [0u8; 1200];
        let mut w = Writer::new(&mut buf);
        let mut packet = SentPacket::new(now, DeliverySnapshot::new(now));
        streams.write_controls(&mut w, &mut packet);
        streams.write_data(&mut w, &mut packet);
        (packet.frames().iter())
            .filter_map(|f| match *f {
                SentFrame::Stream { id, len, .. } => Some((id, usize::from(len))),
                _ => None,
            })
            .collect()
    }

    /// Packets enough for `busy` streams to have had a turn each, and then some.
    fn turns_of(busy: usize) -> usize {
        busy * (SEND_TURN / 1100 + 1) + 3
    }

    /// Busy streams take turns of [`SEND_TURN`] bytes, over as many packets, in round-robin
    /// order (turns of one packet each cut every download into one-datagram runs: the client
    /// then wrote a few KB per stream per batch it received); a stream that runs dry ends its
    /// turn early.
    #[test]
    fn busy_streams_take_turns_of_send_turn_bytes() {
        let mut streams = scheduling_streams(true);
        let sizes = [100_000, 100_000, 20_000];
        let ids: Vec<StreamId> = sizes.iter().map(|&n| open_with(&mut streams, n)).collect();
        // Runs of consecutive bytes of one stream, in the order sent.
        let mut runs: Vec<(u64, usize)> = Vec::new();
        loop {
            let frames = send_packet(&mut streams);
            if frames.is_empty() {
                break;
            }
            for (id, len) in frames {
                match runs.last_mut() {
                    Some((last, bytes)) if *last == id => *bytes += len,
                    _ => runs.push((id, len)),
                }
            }
        }
        let order: Vec<u64> = runs.iter().map(|r| r.0).collect();
        let (a, b, c) = (ids[0].0, ids[1].0, ids[2].0);
        // New streams go next in the order they arrived, then round-robin.
        let expect = [a, b, c, a, b, c];
        assert_eq!(&order[..6], &expect, "round-robin turns: {runs:?}");
        for (i, &(id, bytes)) in runs.iter().enumerate() {
            let left = sizes[ids.iter().position(|s| s.0 == id).unwrap()]
                - (runs[..i].iter().filter(|r| r.0 == id).map(|r| r.1)).sum::<usize>();
            assert!(
                bytes == left || (SEND_TURN..SEND_TURN + 1200).contains(&bytes),
                "run {i} of stream {id}: {bytes} bytes ({left} left): {runs:?}"
            );
        }
        let sent: usize = runs.iter().map(|r| r.1).sum();
        assert_eq!(sent, sizes.iter().sum::<usize>());
    }

    /// A stream starting (a request, a response) while busy streams take their turns sends
    /// right after the turn in progress, not after a turn of every busy stream; once its first
    /// turn is over it queues behind them like any other.
    #[test]
    fn a_new_stream_goes_right_after_the_turn_in_progress() {
        let mut streams = scheduling_streams(true);
        let busy: Vec<StreamId> = (0..8).map(|_| open_with(&mut streams, 200_000)).collect();
        // Every busy stream past its first turn, one of them in the middle of a turn.
        for _ in 0..turns_of(busy.len()) {
            send_packet(&mut streams);
        }
        let fresh = open_with(&mut streams, 30_000);
        let (mut before_fresh, mut fresh_sent) = (0, 0);
        let mut after_first_turn = std::collections::HashSet::new();
        while fresh_sent < 30_000 {
            for (id, len) in send_packet(&mut streams) {
                if id == fresh.0 {
                    fresh_sent += len;
                } else if fresh_sent == 0 {
                    before_fresh += len;
                } else if fresh_sent >= SEND_TURN {
                    after_first_turn.insert(id);
                }
            }
        }
        assert!(before_fresh < SEND_TURN, "{before_fresh} bytes went first");
        assert_eq!(
            after_first_turn.len(),
            busy.len(),
            "after its first turn, the new stream waited for every busy stream"
        );
    }

    /// Streams opened while busy streams take turns send their first bytes in the order they
    /// were opened (each went ahead of the earlier ones before: newest first).
    #[test]
    fn new_streams_start_in_the_order_they_were_opened() {
        let mut streams = scheduling_streams(true);
        for _ in 0..4 {
            open_with(&mut streams, 400_000);
        }
        for _ in 0..turns_of(4) {
            send_packet(&mut streams);
        }
        let fresh: Vec<u64> = (0..4).map(|_| open_with(&mut streams, 2_000).0).collect();
        let mut first = Vec::new();
        while first.len() < fresh.len() {
            for (id, _) in send_packet(&mut streams) {
                if fresh.contains(&id) && !first.contains(&id) {
                    first.push(id);
                }
            }
        }
        assert_eq!(first, fresh);
    }

    /// Under session flow control (credit raised a step at a time), every busy stream gets a
    /// share: requeued after each step least-served first, not in the map's order (with 16 KiB
    /// turns the same 8 streams took each 128 KiB step and the others starved).
    #[test]
    fn streams_share_session_credit_given_a_step_at_a_time() {
        let mut streams = scheduling_streams(false);
        let ids: Vec<StreamId> = (0..12).map(|_| open_with(&mut streams, 250_000)).collect();
        let mut sent = std::collections::HashMap::<u64, usize>::new();
        let (mut credit, mut total) = (0u64, 0);
        while total < 1_300_000 {
            let frames = send_packet(&mut streams);
            if frames.is_empty() {
                credit += 128 * 1024;
                streams.on_max_data(credit);
            }
            for (id, len) in frames {
                *sent.entry(id).or_default() += len;
                total += len;
            }
        }
        let least = (ids.iter().map(|id| sent.get(&id.0).copied().unwrap_or(0))).min();
        assert!(
            least.unwrap_or(0) * 4 >= total / ids.len(),
            "a stream got {least:?} of {total} bytes: {sent:?}"
        );
    }

    /// A long-lived stream (past its first turn) that had nothing to send and then queues a
    /// few bytes (a keystroke on SSH while downloads run) waits only for the turn in progress;
    /// a large write of the same stream queues behind every busy stream's turn.
    #[test]
    fn a_small_write_goes_right_after_the_turn_in_progress() {
        let mut streams = scheduling_streams(true);
        let chat = open_with(&mut streams, 2 * SEND_TURN);
        let busy: Vec<StreamId> = (0..8).map(|_| open_with(&mut streams, 400_000)).collect();
        // Until the chat stream has sent everything and every busy stream had turns.
        for _ in 0..2 * turns_of(busy.len() + 1) {
            send_packet(&mut streams);
        }
        assert_eq!(streams.streams[&chat.0].send.unsent(), 0);
        let bytes_before = |streams: &mut StreamsState, write: usize| {
            assert_eq!(streams.write(chat, &vec![2u8; write]), Ok(write));
            let mut before = 0;
            loop {
                let frames = send_packet(streams);
                if let Some(i) = frames.iter().position(|&(id, _)| id == chat.0) {
                    return before + frames[..i].iter().map(|f| f.1).sum::<usize>();
                }
                before += frames.iter().map(|f| f.1).sum::<usize>();
            }
        };
        let small = bytes_before(&mut streams, 100);
        assert!(
            small < SEND_TURN,
            "{small} bytes went before a 100-byte write"
        );
        for _ in 0..3 {
            send_packet(&mut streams);
        }
        let large = bytes_before(&mut streams, 60_000);
        assert!(
            large >= (busy.len() - 1) * SEND_TURN,
            "a large write waits for the busy streams' turns: {large} bytes went first"
        );
    }

    /// Random stream API calls, packets written, acknowledged and lost, flow-control raises and
    /// a close: `in_send_queue ⇔ id ∈ send_queue` (and the control-queue twin) always hold.
    #[test]
    fn queue_invariants_hold_under_random_operations() {
        let now = Instant::now();
        let config = TransportConfig {
            send_buffer: 8 * 1024,
            session_send_buffer: 32 * 1024,
            ..TransportConfig::default()
        }
        .sanitized();
        let mut rng = SimRng::new(7);
        let mut events = VecDeque::new();
        let mut streams = StreamsState::new(&config, Side::Client);
        let mut ids: Vec<StreamId> = Vec::new();
        let mut in_flight: Vec<SentFrame> = Vec::new();
        let mut buf = vec![0u8; 1200];
        let data = [0x5Au8; 3000];
        for round in 0..20_000 {
            let pick = |rng: &mut SimRng, ids: &[StreamId]| {
                ids.get(rng.below(ids.len() as u64) as usize).copied()
            };
            match rng.below(10) {
                0 => {
                    if let Ok(id) = streams.open(Destination::domain("a.test", 1).unwrap()) {
                        ids.push(id);
                    }
                }
                1..=2 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        let len = rng.below(data.len() as u64) as usize;
                        let _ = streams.write(id, &data[..len]);
                    }
                }
                3 if rng.chance(0.01) => streams.release_idle_storage(),
                3 if rng.chance(0.02) => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        let _ = streams.finish(id);
                    }
                }
                4 if rng.chance(0.1) => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        let _ = streams.reset(id, ResetReason::Cancelled);
                    }
                }
                5..=6 => {
                    let room = 40 + rng.below(1100) as usize;
                    let mut w = Writer::new(&mut buf[..room]);
                    let mut packet = SentPacket::new(now, DeliverySnapshot::new(now));
                    streams.write_controls(&mut w, &mut packet);
                    streams.write_data(&mut w, &mut packet);
                    in_flight.extend_from_slice(packet.frames());
                }
                7..=8 if !in_flight.is_empty() => {
                    let i = rng.below(in_flight.len() as u64) as usize;
                    let f = in_flight.swap_remove(i);
                    if rng.chance(0.7) {
                        streams.on_frame_acked(f);
                    } else {
                        streams.on_frame_lost(f);
                    }
                }
                _ => {
                    let raise = (round as u64 + 1) * 4096;
                    streams.on_max_data(INITIAL_SESSION_WINDOW + raise);
                    streams.raise_peer_max_streams(
                        INITIAL_MAX_STREAMS + round as u64 / 500,
                        &mut events,
                    );
                    if let Some(id) = pick(&mut rng, &ids) {
                        let _ = streams.on_max_stream_data(id, INITIAL_STREAM_WINDOW + raise);
                    }
                    streams.wake_writers(&mut events);
                }
            }
            streams.assert_queues_consistent();
        }
        assert!(
            streams.bytes_sent > 100_000 && streams.bytes_retransmitted > 0,
            "the run exercised sending and loss"
        );
        streams.clear_queues();
        streams.assert_queues_consistent();
        assert!(!streams.has_pending());
    }

    /// A server's streams keep little receive storage once drained (its peers are strangers: a
    /// user's 256 streams each keeping 128 KiB after one burst would be 32 MiB outside every
    /// budget); a client's keep enough for a batch of datagrams (no regrowth per batch).
    #[test]
    fn drained_receive_storage_kept_depends_on_the_side() {
        let config = TransportConfig::default().sanitized();
        let retained = |side| {
            let mut streams = StreamsState::new(&config, side);
            let id = StreamId(if side == Side::Server { 0 } else { 1 });
            let mut events = VecDeque::new();
            let data = vec![5u8; 120_000];
            for (i, chunk) in data.chunks(1200).enumerate() {
                streams
                    .on_stream_frame(id, (i * 1200) as u64, chunk, false, &mut events)
                    .unwrap();
            }
            let mut buf = vec![0u8; 16 * 1024];
            while matches!(streams.read(id, &mut buf), Ok(n) if n > 0) {}
            streams.streams.get(&id.0).map(|s| s.recv.memory()).unwrap()
        };
        assert_eq!(retained(Side::Server), super::super::stream::SEND_RETAIN);
        assert_eq!(retained(Side::Client), 128 * 1024);
    }

    /// A stream that took a burst and had it acknowledged down to a trickle gives the burst's
    /// storage back, and `send_memory` (what the server charges a user) says so. Before, the
    /// storage stayed until the whole session went idle: 100 downloads of one user held at the
    /// buffered-bytes share each kept their largest burst (server peak 59–135 MB instead of 13).
    #[test]
    fn send_storage_shrinks_as_a_burst_is_acknowledged() {
        let now = Instant::now();
        let config = TransportConfig::default().sanitized();
        let mut streams = StreamsState::new(&config, Side::Client);
        streams.on_max_data(u64::MAX / 2);
        let id = streams
            .open(Destination::domain("a.test", 1).unwrap())
            .unwrap();
        let _ = streams.on_max_stream_data(id, u64::MAX / 2);
        let burst = vec![7u8; 1 << 20];
        assert_eq!(streams.write(id, &burst), Ok(1 << 20));
        assert!(streams.send_memory() >= 1 << 20);
        let mut buf = vec![0u8; 1200];
        let mut sent: Vec<SentFrame> = Vec::new();
        loop {
            let mut w = Writer::new(&mut buf);
            let mut packet = SentPacket::new(now, DeliverySnapshot::new(now));
            streams.write_controls(&mut w, &mut packet);
            streams.write_data(&mut w, &mut packet);
            if packet.frames().is_empty() {
                break;
            }
            sent.extend_from_slice(packet.frames());
        }
        let last = sent.len() - 3;
        for f in sent.drain(..last) {
            streams.on_frame_acked(f);
        }
        streams.assert_queues_consistent();
        let (held, memory) = (streams.send_buffered(), streams.send_memory());
        assert!(
            held > 0 && held < 4 * 1200,
            "a trickle is still held: {held}"
        );
        let bound = (4 * held).max(super::super::stream::SEND_RETAIN);
        assert!(memory <= bound, "{memory} bytes kept for {held}");
    }
}
