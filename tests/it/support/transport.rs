//! Test/bench harness: two `Transport`s connected through a `SimNetwork`, driven on a virtual
//! clock, plus a bulk-transfer application that writes a deterministic byte pattern and
//! verifies every received byte against it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ostp::proto::sim::{Endpoint, LinkConfig, SimNetwork};
use ostp::proto::transport::{
    Destination, OpenResult, Side, StreamError, StreamId, Transport, TransportConfig,
    TransportEvent,
};

/// Duplicate filter standing in for the secure layer's replay window (the transport assumes
/// every packet number arrives at most once).
pub struct ReplayFilter {
    largest: Option<u64>,
    bits: [u64; 64],
}

impl ReplayFilter {
    const WINDOW: u64 = 64 * 64;

    pub fn new() -> Self {
        Self {
            largest: None,
            bits: [0; 64],
        }
    }

    fn bit(&mut self, pn: u64) -> (&mut u64, u64) {
        let i = (pn % Self::WINDOW) as usize;
        (&mut self.bits[i / 64], 1u64 << (i % 64))
    }

    /// Returns `true` if `pn` is new (and records it).
    pub fn accept(&mut self, pn: u64) -> bool {
        match self.largest {
            Some(l) if pn + Self::WINDOW <= l => return false,
            Some(l) if pn > l => {
                if pn - l >= Self::WINDOW {
                    self.bits = [0; 64];
                } else {
                    for p in l + 1..=pn {
                        let (w, m) = self.bit(p);
                        *w &= !m;
                    }
                }
                self.largest = Some(pn);
            }
            Some(_) => {}
            None => self.largest = Some(pn),
        }
        let (w, m) = self.bit(pn);
        if *w & m != 0 {
            return false;
        }
        *w |= m;
        true
    }
}

impl Default for ReplayFilter {
    fn default() -> Self {
        Self::new()
    }
}

/// Two transports on a simulated path. Datagram = 8-byte packet number + payload.
pub struct Pair {
    pub start: Instant,
    pub now: Instant,
    pub client: Transport,
    pub server: Transport,
    pub net: SimNetwork,
    client_replay: ReplayFilter,
    server_replay: ReplayFilter,
    tx: Vec<u8>,
    rx: Vec<u8>,
    /// Payloads the transport rejected as protocol violations (must stay 0 in honest runs).
    pub violations: u64,
    /// Datagrams moved so far: an iteration of [`Pair::run`] that leaves this unchanged did no
    /// work.
    work: u64,
}

impl Pair {
    pub fn new(
        client_cfg: TransportConfig,
        server_cfg: TransportConfig,
        link: LinkConfig,
        seed: u64,
    ) -> Self {
        let start = Instant::now();
        Self {
            start,
            now: start,
            client: Transport::new(client_cfg, Side::Client, start),
            server: Transport::new(server_cfg, Side::Server, start),
            net: SimNetwork::new(link, seed, start),
            client_replay: ReplayFilter::new(),
            server_replay: ReplayFilter::new(),
            tx: vec![0; 65536],
            rx: vec![0; 65536],
            violations: 0,
            work: 0,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Delivers due datagrams, fires due timers and transmits until quiescent at `now`.
    pub fn pump(&mut self) {
        for _ in 0..100_000 {
            let mut progress = false;
            for to in [Endpoint::A, Endpoint::B] {
                while let Some(n) = self.net.recv_into(self.now, to, &mut self.rx) {
                    progress = true;
                    self.work += 1;
                    if n < 8 {
                        continue;
                    }
                    let pn = u64::from_le_bytes(self.rx[..8].try_into().unwrap());
                    let (t, replay) = match to {
                        Endpoint::A => (&mut self.client, &mut self.client_replay),
                        Endpoint::B => (&mut self.server, &mut self.server_replay),
                    };
                    if !replay.accept(pn) {
                        continue;
                    }
                    if t.handle_payload(self.now, pn, &self.rx[8..n]).is_err() {
                        self.violations += 1;
                    }
                }
            }
            for t in [&mut self.client, &mut self.server] {
                if t.poll_timeout().is_some_and(|d| d <= self.now) {
                    t.handle_timeout(self.now);
                }
            }
            progress |= self.transmit();
            if !progress {
                return;
            }
        }
        panic!("pump did not quiesce at {:?}", self.elapsed());
    }

    /// Sends everything both transports want to send now. Returns whether anything was sent.
    pub fn transmit(&mut self) -> bool {
        let mut any = false;
        for (from, t) in [
            (Endpoint::A, &mut self.client),
            (Endpoint::B, &mut self.server),
        ] {
            while let Some((pn, len)) = t.poll_transmit(self.now, &mut self.tx[8..]) {
                self.tx[..8].copy_from_slice(&pn.to_le_bytes());
                self.net.send(self.now, from, &self.tx[..8 + len]);
                self.work += 1;
                any = true;
            }
        }
        any
    }

    /// Advances the virtual clock to the next event. Returns `false` if nothing is scheduled.
    pub fn advance(&mut self) -> bool {
        let next = [
            self.net.next_event_time(),
            self.client.poll_timeout(),
            self.server.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        match next {
            Some(t) => {
                if t > self.now {
                    self.now = t;
                }
                true
            }
            None => false,
        }
    }

    /// Runs until `done` returns true (called after every pump with both transports) or the
    /// virtual time limit passes. Returns whether `done` was reached.
    pub fn run(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&mut Transport, &mut Transport, Instant) -> bool,
    ) -> bool {
        loop {
            let work_before = self.work;
            self.pump();
            if done(&mut self.client, &mut self.server, self.now) {
                self.transmit();
                return true;
            }
            let before = self.now;
            if !self.advance() || self.elapsed() > limit {
                return false;
            }
            // The busy-loop rule of every driver: an iteration that did no work (no datagram
            // moved) is never followed by a zero-timeout wait.
            assert!(
                self.now > before || self.work != work_before,
                "busy loop: nothing happened at {:?}, yet the next deadline is not in the future",
                self.elapsed()
            );
        }
    }
}

/// Deterministic content of stream `key` at byte `offset`.
pub fn fill_pattern(key: u64, offset: u64, out: &mut [u8]) {
    let mut pos = 0usize;
    let mut off = offset;
    while pos < out.len() {
        let word = off / 8;
        let mut z =
            (key ^ word.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_add(0x632B_E59B_D9B4_E019);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let bytes = z.to_le_bytes();
        let start = (off % 8) as usize;
        let n = (8 - start).min(out.len() - pos);
        out[pos..pos + n].copy_from_slice(&bytes[start..start + n]);
        pos += n;
        off += n as u64;
    }
}

/// One direction of one stream in a bulk transfer.
#[derive(Debug, Default, Clone)]
pub struct Flow {
    pub total: u64,
    pub written: u64,
    pub fin_sent: bool,
    pub received: u64,
    pub fin_received: bool,
    /// FNV-1a over everything received (checksum, also compared with the sender's view).
    pub checksum: u64,
}

/// Bulk transfer application for both ends: the client opens `streams` streams, uploads
/// `upload` bytes on each, the server downloads `download` bytes on each; every received byte
/// is compared with the pattern.
pub struct BulkApp {
    pub upload: u64,
    pub download: u64,
    pub client_streams: HashMap<StreamId, (Flow, Flow)>, // (sent up, received down)
    pub server_streams: HashMap<StreamId, (Flow, Flow)>, // (received up, sent down)
    pub opened: usize,
    pub target_streams: usize,
    /// Server stops reading these streams (stall tests).
    pub server_stalled: Vec<StreamId>,
    /// If set, the server only reads when this is true.
    pub server_reads: bool,
    /// Generate and check the byte pattern (off only for pure-transport throughput runs,
    /// where lengths and FIN are still checked).
    pub verify: bool,
    scratch: Vec<u8>,
    check: Vec<u8>,
}

fn key(id: StreamId, down: bool) -> u64 {
    id.0.wrapping_mul(0x1000_0000_01B3) ^ if down { 0xDEAD_BEEF } else { 0x1234_5678 }
}

fn fnv(mut h: u64, data: &[u8]) -> u64 {
    if h == 0 {
        h = 0xcbf2_9ce4_8422_2325;
    }
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

impl BulkApp {
    pub fn new(streams: usize, upload: u64, download: u64) -> Self {
        Self {
            upload,
            download,
            client_streams: HashMap::new(),
            server_streams: HashMap::new(),
            opened: 0,
            target_streams: streams,
            server_stalled: Vec::new(),
            server_reads: true,
            verify: true,
            scratch: vec![0; 64 * 1024],
            check: vec![0; 64 * 1024],
        }
    }

    fn write_flow(
        t: &mut Transport,
        id: StreamId,
        flow: &mut Flow,
        down: bool,
        scratch: &mut [u8],
        verify: bool,
    ) {
        while flow.written < flow.total {
            let room = t.stream_write_capacity(id);
            if room == 0 {
                return;
            }
            let n = (flow.total - flow.written)
                .min(scratch.len() as u64)
                .min(room as u64) as usize;
            if verify {
                fill_pattern(key(id, down), flow.written, &mut scratch[..n]);
            }
            match t.stream_write(id, &scratch[..n]) {
                Ok(0) | Err(_) => return,
                Ok(w) => flow.written += w as u64,
            }
        }
        if !flow.fin_sent && t.stream_finish(id).is_ok() {
            flow.fin_sent = true;
        }
    }

    fn read_flow(
        t: &mut Transport,
        id: StreamId,
        flow: &mut Flow,
        down: bool,
        scratch: &mut [u8],
        check: &mut [u8],
        verify: bool,
    ) {
        loop {
            match t.stream_read(id, scratch) {
                Ok(0) => {
                    flow.fin_received = true;
                    assert_eq!(flow.received, flow.total, "{id}: FIN before all data");
                    return;
                }
                Ok(n) if !verify => {
                    flow.received += n as u64;
                    assert!(flow.received <= flow.total, "{id}: too much data");
                }
                Ok(n) => {
                    fill_pattern(key(id, down), flow.received, &mut check[..n]);
                    assert!(
                        scratch[..n] == check[..n],
                        "{id}: corrupted data at offset {}",
                        flow.received
                    );
                    flow.checksum = fnv(flow.checksum, &scratch[..n]);
                    flow.received += n as u64;
                    assert!(flow.received <= flow.total, "{id}: too much data");
                }
                Err(StreamError::Blocked) => return,
                Err(e) => panic!("{id}: read error {e:?}"),
            }
        }
    }

    /// One application step on both ends.
    pub fn step(&mut self, client: &mut Transport, server: &mut Transport) {
        while self.opened < self.target_streams {
            match client.open_stream(Destination::domain("bulk.test", 9).unwrap()) {
                Ok(id) => {
                    self.opened += 1;
                    let up = Flow {
                        total: self.upload,
                        ..Flow::default()
                    };
                    let down = Flow {
                        total: self.download,
                        ..Flow::default()
                    };
                    self.client_streams.insert(id, (up, down));
                }
                Err(StreamError::TooManyStreams) => break,
                Err(e) => panic!("open: {e:?}"),
            }
        }
        while let Some(ev) = client.poll_event() {
            match ev {
                TransportEvent::StreamOpenResult { result, id } => {
                    assert_eq!(result, OpenResult::Ok, "{id}")
                }
                TransportEvent::StreamReadable { .. }
                | TransportEvent::StreamWritable { .. }
                | TransportEvent::StreamFinished { .. }
                | TransportEvent::StreamsAvailable => {}
                e => panic!("client: unexpected {e:?}"),
            }
        }
        while let Some(ev) = server.poll_event() {
            match ev {
                TransportEvent::StreamOpened { id, .. } => {
                    server.accept_stream(id).unwrap();
                    let up = Flow {
                        total: self.upload,
                        ..Flow::default()
                    };
                    let down = Flow {
                        total: self.download,
                        ..Flow::default()
                    };
                    self.server_streams.insert(id, (up, down));
                }
                TransportEvent::StreamReadable { .. }
                | TransportEvent::StreamWritable { .. }
                | TransportEvent::StreamFinished { .. } => {}
                e => panic!("server: unexpected {e:?}"),
            }
        }
        let (scratch, check, verify) = (&mut self.scratch, &mut self.check, self.verify);
        for (&id, (up, down)) in self.client_streams.iter_mut() {
            if !up.fin_sent {
                Self::write_flow(client, id, up, false, scratch, verify);
            }
            if !down.fin_received {
                Self::read_flow(client, id, down, true, scratch, check, verify);
            }
        }
        for (&id, (up, down)) in self.server_streams.iter_mut() {
            if !down.fin_sent {
                Self::write_flow(server, id, down, true, scratch, verify);
            }
            if !up.fin_received && self.server_reads && !self.server_stalled.contains(&id) {
                Self::read_flow(server, id, up, false, scratch, check, verify);
            }
        }
    }

    pub fn done(&self) -> bool {
        self.opened == self.target_streams
            && self.server_streams.len() == self.target_streams
            && self.client_streams.values().all(|(_, d)| d.fin_received)
            && self.server_streams.values().all(|(u, _)| u.fin_received)
    }

    /// Total bytes verified at the receivers.
    pub fn verified_bytes(&self) -> u64 {
        self.client_streams
            .values()
            .map(|(_, d)| d.received)
            .sum::<u64>()
            + self
                .server_streams
                .values()
                .map(|(u, _)| u.received)
                .sum::<u64>()
    }
}

/// Outcome of [`run_bulk`].
#[derive(Debug)]
pub struct BulkResult {
    pub completed: bool,
    pub virtual_time: Duration,
    pub verified_bytes: u64,
    pub client: ostp::proto::transport::TransportStats,
    pub server: ostp::proto::transport::TransportStats,
    pub violations: u64,
}

/// Runs a bulk transfer to completion (or `limit` of virtual time).
pub fn run_bulk(
    link: LinkConfig,
    seed: u64,
    streams: usize,
    upload: u64,
    download: u64,
    config: TransportConfig,
    limit: Duration,
) -> BulkResult {
    run_bulk_with(link, seed, streams, upload, download, config, limit, true)
}

/// [`run_bulk`] with pattern verification optional.
#[allow(clippy::too_many_arguments)]
pub fn run_bulk_with(
    link: LinkConfig,
    seed: u64,
    streams: usize,
    upload: u64,
    download: u64,
    config: TransportConfig,
    limit: Duration,
    verify: bool,
) -> BulkResult {
    let mut pair = Pair::new(config.clone(), config, link, seed);
    let mut app = BulkApp::new(streams, upload, download);
    app.verify = verify;
    let completed = pair.run(limit, |c, s, _| {
        app.step(c, s);
        app.done()
    });
    BulkResult {
        completed,
        virtual_time: pair.elapsed(),
        verified_bytes: app.verified_bytes(),
        client: pair.client.stats(),
        server: pair.server.stats(),
        violations: pair.violations,
    }
}
