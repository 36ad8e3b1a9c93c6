//! How far a session's pipes may read from their sockets ahead of what its congestion window
//! can send (sans-IO): the policy that keeps destinations' bytes (server) and applications'
//! bytes (client) in the kernel's TCP buffers instead of ours.
//!
//! A session sends at most its congestion window per round trip, so bytes read beyond it (and
//! a margin that keeps the sender busy until the next read) only sit in user space: with 100
//! bulk streams the server held its whole 2 MiB session send buffer unsent against a ~200 KB
//! window on loopback, and the ring storage behind it (5.3 MB) was most of its peak RSS. A pipe
//! reads while the session's unsent bytes are below [`ReadAhead::bound`]: a multiple of the
//! window, with a floor for the start of a session (small window) and the lossy paths whose
//! windows are large anyway. The user's buffered-bytes share (`tunnel::quotas`) stays the hard
//! cap; this only stops reading earlier.
//!
//! Waking: a pipe held here keeps its socket's readiness (mio is edge-triggered, nothing more
//! will come from the socket), so the driver re-checks held pipes on every loop iteration;
//! unsent bytes fall by sending, which puts bytes in flight whose ACKs (or loss timers) wake
//! the loop again, or by a stream reset, whose RESET frame is acknowledged in turn.

use crate::proto::transport::Transport;

/// The least read-ahead a session gets, whatever its window: room for four 64 KiB socket reads
/// (`pipe::PIPE_READ`), so a new session's small window does not turn reads small or slow.
pub const READ_AHEAD_FLOOR: u64 = 256 * 1024;

/// Unsent bytes allowed per byte of congestion window: the sender can empty one window's worth
/// between two loop iterations and still find another queued (measured on the lossy 100 Mbit/s,
/// 50 ms path: windows of 1.3-1.9 MB, so its 2 MiB stream buffer still binds there).
pub const CWND_MULTIPLE: u64 = 2;

/// The policy both loops use: the server for destinations' bytes (downloads), the client for
/// applications' bytes (uploads).
pub const READ_AHEAD: ReadAhead = ReadAhead::new(READ_AHEAD_FLOOR, CWND_MULTIPLE);

/// The read-ahead policy of one loop (the same for every session).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadAhead {
    floor: u64,
    cwnd_multiple: u64,
}

impl Default for ReadAhead {
    fn default() -> Self {
        ReadAhead::new(READ_AHEAD_FLOOR, CWND_MULTIPLE)
    }
}

impl ReadAhead {
    pub const fn new(floor: u64, cwnd_multiple: u64) -> Self {
        ReadAhead {
            floor,
            cwnd_multiple,
        }
    }

    /// The most unsent bytes a session with congestion window `cwnd` should hold before its
    /// pipes stop reading.
    pub fn bound(&self, cwnd: u64) -> u64 {
        cwnd.saturating_mul(self.cwnd_multiple).max(self.floor)
    }

    /// Whether a pipe may read more for a session with window `cwnd` and `unsent` bytes waiting
    /// (one read may overshoot the bound by its size).
    pub fn may_read(&self, cwnd: u64, unsent: u64) -> bool {
        unsent < self.bound(cwnd)
    }

    /// [`ReadAhead::may_read`] for `transport`. Over a reliable carrier bytes leave the send
    /// buffers as fast as the carrier's TCP connection takes them and its window is not the
    /// limit, so reads are never held there.
    pub fn allows(&self, transport: &Transport) -> bool {
        transport.is_reliable() || self.may_read(transport.cwnd(), transport.unsent())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::sim::{Endpoint, LinkConfig, SimNetwork, earliest};
    use crate::proto::transport::{
        Destination, OpenResult, Side, StreamId, TransportConfig, TransportEvent,
    };
    use crate::tunnel::pipe::{PIPE_READ, Pipe, ReadHold, ShutdownWrite};
    use std::time::{Duration, Instant};

    #[test]
    fn the_bound_follows_the_window_above_the_floor() {
        let p = ReadAhead::new(1000, 2);
        assert_eq!(p.bound(0), 1000);
        assert_eq!(p.bound(499), 1000);
        assert_eq!(p.bound(501), 1002);
        assert_eq!(p.bound(10_000), 20_000);
        assert_eq!(p.bound(u64::MAX), u64::MAX, "saturates, never wraps");
    }

    #[test]
    fn reads_stop_at_the_bound_and_resume_below_it() {
        let p = ReadAhead::new(1000, 2);
        assert!(p.may_read(0, 0));
        assert!(p.may_read(100, 999), "the floor holds with a small window");
        assert!(!p.may_read(100, 1000));
        assert!(
            p.may_read(5000, 9_999),
            "a large window reads further ahead"
        );
        assert!(!p.may_read(5000, 10_000));
        assert!(p.may_read(5000, 0), "once the sender drained, reads resume");
    }

    /// The default policy on a real transport: a fresh session (small window) may read up to
    /// the floor and no further; its window and unsent bytes come from the transport.
    #[test]
    fn a_transport_holding_a_floor_of_unsent_bytes_reads_no_more() {
        let now = Instant::now();
        let mut t = Transport::new(TransportConfig::default(), Side::Client, now);
        let mut peer = Transport::new(TransportConfig::default(), Side::Server, now);
        settle(&mut t, &mut peer, now);
        let id = t
            .open_stream(Destination::Addr("192.0.2.1:80".parse().unwrap()))
            .unwrap();
        let p = ReadAhead::default();
        assert!(
            t.cwnd() < READ_AHEAD_FLOOR / 2,
            "a fresh window is below the floor"
        );
        assert!(p.allows(&t));
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        while written < READ_AHEAD_FLOOR {
            written += t.stream_write(id, &chunk).unwrap() as u64;
        }
        assert_eq!(t.unsent(), written, "nothing sent yet: all of it is unsent");
        assert!(!p.allows(&t));
    }

    /// Both sides have each other's settings (stream windows beyond the initial 64 KiB).
    fn settle(a: &mut Transport, b: &mut Transport, now: Instant) {
        let mut buf = [0u8; 2048];
        for _ in 0..2 {
            while let Some((pn, len)) = a.poll_transmit(now, &mut buf) {
                b.handle_payload(now, pn, &buf[..len]).unwrap();
            }
            while let Some((pn, len)) = b.poll_transmit(now, &mut buf) {
                a.handle_payload(now, pn, &buf[..len]).unwrap();
            }
        }
    }

    /// A stream whose reader stopped (a paused download) holds at most a slack beyond the
    /// reader's flow-control limit, and those bytes do not count as unsent: the session's
    /// other streams keep reading (they stalled behind it until its idle timeout).
    #[test]
    fn bytes_beyond_the_peers_window_neither_pile_up_nor_hold_the_session() {
        let now = Instant::now();
        let session = 1 << 20;
        let config = TransportConfig {
            send_buffer: session,
            session_send_buffer: session,
            ..TransportConfig::default()
        };
        let mut t = Transport::new(config, Side::Client, now);
        let dest = || Destination::Addr("192.0.2.1:80".parse().unwrap());
        let paused = t.open_stream(dest()).unwrap();
        // No settings from the peer yet: its initial 64 KiB stream window applies.
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        for _ in 0..32 {
            written += t.stream_write(paused, &chunk).unwrap() as u64;
        }
        let limit = crate::proto::transport::INITIAL_STREAM_WINDOW;
        let slack = crate::proto::transport::BEYOND_WINDOW_SLACK;
        assert!(
            written > limit + slack,
            "room ahead while the buffer is empty"
        );
        assert!(
            written <= limit + session as u64 / 2,
            "a stream past its window fills at most half the session buffer: {written}"
        );
        assert_eq!(
            t.unsent(),
            limit,
            "only what the peer's window lets go is unsent"
        );
        assert!(ReadAhead::default().allows(&t));
        // Another stream still gets its whole window and a slack beyond it.
        let other = t.open_stream(dest()).unwrap();
        let mut written = 0u64;
        for _ in 0..32 {
            written += t.stream_write(other, &chunk).unwrap() as u64;
        }
        assert!(written >= limit + slack, "{written}");
    }

    /// Over the TCP carrier the policy never holds reads.
    #[test]
    fn a_reliable_transport_is_never_held() {
        let now = Instant::now();
        let mut t = Transport::new_reliable(TransportConfig::default(), Side::Client, now);
        let mut peer = Transport::new_reliable(TransportConfig::default(), Side::Server, now);
        settle(&mut t, &mut peer, now);
        let id = t
            .open_stream(Destination::Addr("192.0.2.1:80".parse().unwrap()))
            .unwrap();
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..8 {
            t.stream_write(id, &chunk).unwrap();
        }
        assert!(t.unsent() >= READ_AHEAD_FLOOR);
        assert!(ReadAhead::default().allows(&t));
    }

    /// A destination socket with `len` bytes of a stream-specific pattern, never blocking.
    struct Source {
        seed: u8,
        offset: usize,
        len: usize,
    }

    fn pattern(seed: u8, offset: usize) -> u8 {
        ((offset * 7 + seed as usize * 13) % 251) as u8
    }

    impl std::io::Read for Source {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.len - self.offset);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(self.seed, self.offset + i);
            }
            self.offset += n;
            Ok(n)
        }
    }

    impl std::io::Write for Source {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl ShutdownWrite for Source {
        fn shutdown_write(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// One download: the server's pipe and source, what the client received of it.
    struct Download {
        id: StreamId,
        pipe: Pipe,
        source: Source,
        received: usize,
        finished: bool,
    }

    /// What a many-stream download did on the server: its peaks and how long it took.
    struct Run {
        max_unsent: u64,
        max_bound: u64,
        max_send_memory: usize,
        elapsed: Duration,
    }

    /// Sends what `from` has for the link, each packet prefixed with its number.
    fn transmit(net: &mut SimNetwork, from: Endpoint, t: &mut Transport, now: Instant) {
        let mut buf = [0u8; 2048];
        while let Some((pn, len)) = t.poll_transmit(now, &mut buf[8..]) {
            buf[..8].copy_from_slice(&pn.to_be_bytes());
            net.send(now, from, &buf[..8 + len]);
        }
    }

    fn receive(net: &mut SimNetwork, to: Endpoint, t: &mut Transport, now: Instant) {
        while let Some(d) = net.recv(now, to) {
            let pn = u64::from_be_bytes(d[..8].try_into().unwrap());
            t.handle_payload(now, pn, &d[8..]).expect("valid payload");
        }
    }

    /// A 100 Mbit/s path with `delay` each way and random `loss`.
    fn path(delay_ms: u64, loss: f64) -> LinkConfig {
        LinkConfig {
            delay: Duration::from_millis(delay_ms),
            loss,
            rate_bps: Some(100_000_000),
            mtu: 1500,
            ..LinkConfig::default()
        }
    }

    /// The server's side of one loop iteration: datagrams in, stream opens answered, pipes
    /// pumped the way the server loop pumps them (once when opened, on `StreamWritable`, and,
    /// held by `policy`, whenever the loop runs and the policy allows again: the socket's
    /// readiness is an edge already consumed), peaks recorded, datagrams out.
    /// The server's events as its loop takes them: opened streams accepted; returns the streams
    /// whose pipes are pumped now (opened or writable again).
    fn accept_and_wake(server: &mut Transport) -> Vec<StreamId> {
        let mut wake = Vec::new();
        while let Some(e) = server.poll_event() {
            match e {
                TransportEvent::StreamOpened { id, .. } => {
                    server.answer_open(id, OpenResult::Ok).unwrap();
                    wake.push(id);
                }
                TransportEvent::StreamWritable { id } => wake.push(id),
                _ => {}
            }
        }
        wake
    }

    /// Whether a pipe held by the read-ahead `policy` may read again (the loop's held-pipe pass).
    fn released(pipe: &Pipe, policy: Option<ReadAhead>, server: &Transport) -> bool {
        pipe.read_hold() == Some(ReadHold::SendAhead) && policy.is_some_and(|p| p.allows(server))
    }

    fn serve(
        net: &mut SimNetwork,
        server: &mut Transport,
        flows: &mut [Download],
        policy: Option<ReadAhead>,
        run: &mut Run,
        now: Instant,
    ) {
        receive(net, Endpoint::B, server, now);
        server.handle_timeout(now);
        let wake = accept_and_wake(server);
        let mut budget = u64::MAX;
        for f in flows.iter_mut() {
            if released(&f.pipe, policy, server) || wake.contains(&f.id) {
                let _ = f.pipe.pump(&mut f.source, server, &mut budget);
            }
        }
        run.max_unsent = run.max_unsent.max(server.unsent());
        run.max_bound = run.max_bound.max(ReadAhead::default().bound(server.cwnd()));
        run.max_send_memory = run.max_send_memory.max(server.send_memory());
        transmit(net, Endpoint::B, server, now);
    }

    /// The client's side: datagrams in, every stream read and each byte checked, ACKs out.
    fn fetch(net: &mut SimNetwork, client: &mut Transport, flows: &mut [Download], now: Instant) {
        receive(net, Endpoint::A, client, now);
        client.handle_timeout(now);
        while client.poll_event().is_some() {}
        let mut buf = vec![0u8; 64 * 1024];
        for f in flows.iter_mut() {
            while let Ok(n) = client.stream_read(f.id, &mut buf) {
                if n == 0 {
                    f.finished = true;
                    break;
                }
                for (k, b) in buf[..n].iter().enumerate() {
                    let want = pattern(f.source.seed, f.received + k);
                    assert_eq!(*b, want, "stream {:?} corrupted", f.id);
                }
                f.received += n;
            }
        }
        transmit(net, Endpoint::A, client, now);
    }

    /// `streams` downloads of `each` bytes over `link` (both ways) through one session, to the
    /// end of the last one (a stall panics); every byte is checked at the client.
    fn download(link: LinkConfig, policy: Option<ReadAhead>, streams: usize, each: usize) -> Run {
        let mut now = Instant::now();
        let mut net = SimNetwork::new(link, 7, now);
        let server_config = TransportConfig {
            send_buffer: 2 * 1024 * 1024,
            session_send_buffer: 2 * 1024 * 1024,
            ..TransportConfig::default()
        };
        let mut client = Transport::new(TransportConfig::default(), Side::Client, now);
        let mut server = Transport::new(server_config, Side::Server, now);
        // SETTINGS both ways first: they raise the stream limit above the initial one.
        for _ in 0..2 {
            transmit(&mut net, Endpoint::A, &mut client, now);
            transmit(&mut net, Endpoint::B, &mut server, now);
            now += Duration::from_millis(20);
            receive(&mut net, Endpoint::B, &mut server, now);
            receive(&mut net, Endpoint::A, &mut client, now);
        }
        let start = now;
        let mut flows: Vec<Download> = (0..streams)
            .map(|i| {
                let dest = Destination::Addr("192.0.2.1:80".parse().unwrap());
                let id = client.open_stream(dest).unwrap();
                let mut pipe = Pipe::new(id, &[]);
                if let Some(p) = policy {
                    pipe = pipe.with_read_ahead(p);
                }
                Download {
                    id,
                    pipe,
                    source: Source {
                        seed: i as u8,
                        offset: 0,
                        len: each,
                    },
                    received: 0,
                    finished: false,
                }
            })
            .collect();
        transmit(&mut net, Endpoint::A, &mut client, now);
        let mut run = Run {
            max_unsent: 0,
            max_bound: 0,
            max_send_memory: 0,
            elapsed: Duration::ZERO,
        };
        while !flows.iter().all(|f| f.finished) {
            serve(&mut net, &mut server, &mut flows, policy, &mut run, now);
            fetch(&mut net, &mut client, &mut flows, now);
            let next = earliest([
                net.next_event_time(),
                server.poll_timeout(),
                client.poll_timeout(),
            ]);
            now = next
                .expect("stalled: nothing in flight and nothing due")
                .max(now);
            assert!(now - start < Duration::from_secs(60), "no progress");
        }
        for f in &flows {
            assert_eq!(f.received, each, "stream {:?} incomplete", f.id);
        }
        run.elapsed = now - start;
        run
    }

    /// 24 bulk downloads through one session on a 2 ms RTT path (a small window, as on
    /// loopback): with the policy the server's unsent bytes stay within the bound plus one read
    /// (and a little that was lost and waits to be sent again), its send-buffer storage within
    /// a fraction of the session send buffer (without the policy: 2 MiB unsent, 6 MB of
    /// storage), no stream stalls (the run ends only when every byte arrived, each checked) and
    /// the path stays full.
    #[test]
    fn many_downloads_keep_unsent_bytes_near_the_window_and_all_complete() {
        let (streams, each) = (24, 256 * 1024);
        let run = download(path(1, 0.0), Some(ReadAhead::default()), streams, each);
        let ideal = (streams * each) as f64 / 12_500_000.0;
        eprintln!(
            "unsent max {} (bound max {}), send memory max {}, {:?} (ideal {ideal:.2} s)",
            run.max_unsent, run.max_bound, run.max_send_memory, run.elapsed
        );
        let slack = 64 * 1024;
        assert!(
            run.max_unsent <= run.max_bound + (PIPE_READ + slack) as u64,
            "{} unsent bytes",
            run.max_unsent
        );
        assert!(
            run.max_send_memory <= 1536 * 1024,
            "{} bytes of send buffers",
            run.max_send_memory
        );
        assert!(run.elapsed.as_secs_f64() < ideal * 1.2, "{:?}", run.elapsed);
    }

    /// One download on the lossy long path of the benchmark (100 Mbit/s, 50 ms RTT, 1 % loss):
    /// the window, not the floor, sets the bound there, and the download is as fast as without
    /// the policy (the same seeded network both times).
    #[test]
    fn a_download_on_a_lossy_long_path_is_as_fast_as_without_the_policy() {
        let each = 4 * 1024 * 1024;
        let with = download(path(25, 0.01), Some(ReadAhead::default()), 1, each);
        let without = download(path(25, 0.01), None, 1, each);
        eprintln!(
            "with {:?} (bound max {}), without {:?}",
            with.elapsed, with.max_bound, without.elapsed
        );
        assert!(
            with.max_bound > READ_AHEAD_FLOOR,
            "the window sets the bound"
        );
        assert!(
            with.elapsed.as_secs_f64() <= without.elapsed.as_secs_f64() * 1.05,
            "{:?} with the policy, {:?} without",
            with.elapsed,
            without.elapsed
        );
    }

    // ---- a paused download beside an active one

    fn tx_all(net: &mut SimNetwork, from: Endpoint, t: &mut Transport, now: Instant) {
        let mut buf = [0u8; 2048];
        while let Some((pn, len)) = t.poll_transmit(now, &mut buf[8..]) {
            buf[..8].copy_from_slice(&pn.to_be_bytes());
            net.send(now, from, &buf[..8 + len]);
        }
    }
    fn rx_all(net: &mut SimNetwork, to: Endpoint, t: &mut Transport, now: Instant) {
        while let Some(d) = net.recv(now, to) {
            let pn = u64::from_be_bytes(d[..8].try_into().unwrap());
            t.handle_payload(now, pn, &d[8..]).unwrap();
        }
    }

    /// Two downloads in one session; the client application never reads stream 0 (a paused
    /// download). Returns the bytes of stream 1 received, the server's unsent, in flight.
    fn run(
        policy: Option<ReadAhead>,
        session_send_buffer: usize,
    ) -> (usize, u64, u64, Option<ReadHold>) {
        let mut now = Instant::now();
        let link = LinkConfig {
            delay: Duration::from_millis(1),
            rate_bps: Some(100_000_000),
            mtu: 1500,
            ..LinkConfig::default()
        };
        let mut net = SimNetwork::new(link, 7, now);
        let sc = TransportConfig {
            send_buffer: 2 << 20,
            session_send_buffer,
            ..TransportConfig::default()
        };
        let mut client = Transport::new(TransportConfig::default(), Side::Client, now);
        let mut server = Transport::new(sc, Side::Server, now);
        for _ in 0..2 {
            tx_all(&mut net, Endpoint::A, &mut client, now);
            tx_all(&mut net, Endpoint::B, &mut server, now);
            now += Duration::from_millis(20);
            rx_all(&mut net, Endpoint::B, &mut server, now);
            rx_all(&mut net, Endpoint::A, &mut client, now);
        }
        let dest = || Destination::Addr("192.0.2.1:80".parse().unwrap());
        let ids = [
            client.open_stream(dest()).unwrap(),
            client.open_stream(dest()).unwrap(),
        ];
        let mut pipes: Vec<Pipe> = ids
            .iter()
            .map(|&id| {
                let p = Pipe::new(id, &[]);
                match policy {
                    Some(r) => p.with_read_ahead(r),
                    None => p,
                }
            })
            .collect();
        // Stream 0 is endless, stream 1 is 8 MiB.
        let source = |seed, len| Source {
            seed,
            offset: 0,
            len,
        };
        let mut srcs = [source(0, usize::MAX), source(1, 8 << 20)];
        tx_all(&mut net, Endpoint::A, &mut client, now);
        let start = now;
        let mut got1 = 0usize;
        let mut buf = vec![0u8; 65536];
        while now - start < Duration::from_secs(20) {
            rx_all(&mut net, Endpoint::B, &mut server, now);
            server.handle_timeout(now);
            let wake = accept_and_wake(&mut server);
            let mut budget = u64::MAX;
            for (i, p) in pipes.iter_mut().enumerate() {
                if released(p, policy, &server) || wake.contains(&ids[i]) {
                    let _ = p.pump(&mut srcs[i], &mut server, &mut budget);
                }
            }
            tx_all(&mut net, Endpoint::B, &mut server, now);
            rx_all(&mut net, Endpoint::A, &mut client, now);
            client.handle_timeout(now);
            while client.poll_event().is_some() {}
            while let Ok(n) = client.stream_read(ids[1], &mut buf) {
                if n == 0 {
                    break;
                }
                got1 += n;
            }
            tx_all(&mut net, Endpoint::A, &mut client, now);
            if got1 == 8 << 20 {
                break;
            }
            let next = earliest([
                net.next_event_time(),
                server.poll_timeout(),
                client.poll_timeout(),
            ]);
            now = next.unwrap_or(now + Duration::from_millis(100)).max(now);
        }
        (
            got1,
            server.unsent(),
            server.stats().bytes_in_flight,
            pipes[1].read_hold(),
        )
    }

    /// Two downloads on one session with the server's real buffers; the client application
    /// never reads the first (a paused download). The second still completes: the paused
    /// stream's bytes beyond the client's window neither fill the session's send buffer nor
    /// count as unsent (both stalled it until the paused stream's idle timeout).
    #[test]
    fn a_paused_download_does_not_stall_its_sessions_other_streams() {
        let (got, _, _, hold) = run(Some(ReadAhead::default()), 2 << 20);
        assert_eq!(got, 8 << 20, "stream 1 stalled (hold {hold:?})");
        let (got, unsent, ..) = run(Some(ReadAhead::default()), 16 << 20);
        assert_eq!(got, 8 << 20);
        assert!(unsent <= 64 * 1024, "{unsent} unsent at the end");
    }
}
