//! A lossy-link emulator: a userspace UDP relay that forwards datagrams between clients (on
//! `--listen`) and a fixed `--upstream`, shaping each direction independently with a
//! [`LinkModel`]: bottleneck rate with a bounded tail-drop queue, one-way delay, jitter, random
//! loss, reordering and duplication, all driven by a seeded PRNG (splitmix64).
//!
//! Every distinct client address gets its own upstream socket (like a NAT), up to 1024 clients.
//!
//! ```text
//! cargo run --release --example lossy_relay -- --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT \
//!     --rate-mbit 100 --delay-ms 25 --jitter-ms 0 --loss 0.01 --reorder 0.0 --dup 0.0 --seed 1
//! ```
//! Link options apply to both directions; prefix with `up-` (client → upstream) or `down-`
//! (upstream → client) to set one direction, e.g. `--down-loss 0.05`. `--queue-ms` sizes the
//! bottleneck queue in milliseconds of transmission at the configured rate (default 50).
//! `--rate-mbit 0` means unlimited. `--mtu BYTES` drops longer datagrams (a path MTU in UDP
//! payload bytes: 1472 for a 1,500-byte IPv4 path; default: no limit). `--stats SECS` prints counters to stderr periodically.
//! The first stdout line is the bound listen address (useful with port 0).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{ErrorKind, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};

const NS_PER_MS: u64 = 1_000_000;
const NS_PER_SEC: u64 = 1_000_000_000;
const MAX_CLIENTS: usize = 1024;
const MAX_IN_FLIGHT: usize = 200_000;
const LISTEN: Token = Token(0);

/// splitmix64: tiny, fast, good enough for link emulation.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.next_f64() < p
    }
}

/// Settings of one direction.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// Bottleneck rate in bits per second; 0 = unlimited.
    pub rate_bps: u64,
    /// Queue size in milliseconds of transmission at `rate_bps` (tail drop beyond it).
    pub queue_ms: u64,
    /// Fixed one-way propagation delay.
    pub delay_ns: u64,
    /// Uniform jitter: each packet gets an extra delay in [0, jitter] (order is preserved unless
    /// the packet is chosen for reordering).
    pub jitter_ns: u64,
    /// Probability of dropping a packet before the queue.
    pub loss: f64,
    /// Probability of holding a packet back so later ones overtake it.
    pub reorder: f64,
    /// Probability of delivering a second copy.
    pub dup: f64,
    /// Datagrams longer than this are dropped (a path MTU, as UDP payload bytes); 0 = no limit.
    pub mtu: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            rate_bps: 0,
            queue_ms: 50,
            delay_ns: 0,
            jitter_ns: 0,
            loss: 0.0,
            reorder: 0.0,
            dup: 0.0,
            mtu: 0,
        }
    }
}

/// What happens to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Random loss.
    Lost,
    /// Longer than the link's MTU.
    TooBig,
    /// The bottleneck queue was full.
    QueueFull,
    /// Delivered at the given time (ns); `duplicate_at` is set when a copy is delivered too.
    Deliver { at: u64, duplicate_at: Option<u64> },
}

/// Per-direction counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub packets: u64,
    pub bytes: u64,
    pub lost: u64,
    pub queue_drops: u64,
    pub reordered: u64,
    pub duplicated: u64,
    pub too_big: u64,
}

/// One direction of the emulated link: decides, for a packet arriving at time `now` (ns since an
/// arbitrary origin), whether it is dropped and when it is delivered.
#[derive(Debug, Clone)]
pub struct LinkModel {
    config: LinkConfig,
    rng: SplitMix64,
    /// When the bottleneck finishes transmitting everything accepted so far.
    busy_until: u64,
    /// Latest in-order delivery time handed out (keeps jitter from reordering).
    last_delivery: u64,
    pub stats: LinkStats,
}

impl LinkModel {
    pub fn new(config: LinkConfig, seed: u64) -> Self {
        Self {
            config,
            rng: SplitMix64::new(seed),
            busy_until: 0,
            last_delivery: 0,
            stats: LinkStats::default(),
        }
    }

    /// Transmission time of `len` bytes at the bottleneck rate.
    fn serialization_ns(&self, len: usize) -> u64 {
        if self.config.rate_bps == 0 {
            return 0;
        }
        (len as u64 * 8).saturating_mul(NS_PER_SEC) / self.config.rate_bps
    }

    pub fn on_packet(&mut self, now: u64, len: usize) -> Fate {
        self.stats.packets += 1;
        self.stats.bytes += len as u64;
        if self.config.mtu > 0 && len > self.config.mtu {
            self.stats.too_big += 1;
            return Fate::TooBig;
        }
        if self.rng.chance(self.config.loss) {
            self.stats.lost += 1;
            return Fate::Lost;
        }
        let start = self.busy_until.max(now);
        if self.config.rate_bps > 0 {
            let backlog_ns = start - now;
            if backlog_ns > self.config.queue_ms * NS_PER_MS {
                self.stats.queue_drops += 1;
                return Fate::QueueFull;
            }
        }
        let sent = start + self.serialization_ns(len);
        self.busy_until = sent;
        let jitter = if self.config.jitter_ns > 0 {
            self.rng.next_u64() % (self.config.jitter_ns + 1)
        } else {
            0
        };
        let mut at = sent + self.config.delay_ns + jitter;
        if self.rng.chance(self.config.reorder) {
            // Hold back by half the delay (at least 1 ms) so later packets overtake this one.
            self.stats.reordered += 1;
            at += (self.config.delay_ns / 2).max(NS_PER_MS);
        } else {
            at = at.max(self.last_delivery);
            self.last_delivery = at;
        }
        let duplicate_at = if self.rng.chance(self.config.dup) {
            self.stats.duplicated += 1;
            Some(at + self.serialization_ns(len))
        } else {
            None
        };
        Fate::Deliver { at, duplicate_at }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Direction {
    /// Client → upstream.
    Up,
    /// Upstream → client.
    Down,
}

struct Pending {
    at: u64,
    seq: u64,
    direction: Direction,
    client: usize,
    data: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Command-line options.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub up: LinkConfig,
    pub down: LinkConfig,
    pub seed: u64,
    pub stats_every: Option<Duration>,
}

pub fn parse_options(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut listen = None;
    let mut upstream = None;
    let mut up = LinkConfig::default();
    let mut down = LinkConfig::default();
    let mut seed = 1u64;
    let mut stats_every = None;
    while let Some(arg) = args.next() {
        if arg == "--help" || arg == "-h" {
            return Err("usage: lossy_relay --listen ADDR --upstream ADDR [--rate-mbit M] [--queue-ms Q] \
                 [--delay-ms D] [--jitter-ms J] [--loss P] [--reorder P] [--dup P] [--mtu BYTES] [--seed S] [--stats SECS]\n\
                 link options may be prefixed with up- or down- (e.g. --down-loss 0.05)"
                .into());
        }
        let name = arg
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {arg:?}"))?;
        let value = args
            .next()
            .ok_or_else(|| format!("--{name} needs a value"))?;
        let bad = |what: &str| format!("bad value for --{name}: {value:?} ({what})");
        match name {
            "listen" => listen = Some(value.parse().map_err(|_| bad("address"))?),
            "upstream" => upstream = Some(value.parse().map_err(|_| bad("address"))?),
            "seed" => seed = value.parse().map_err(|_| bad("integer"))?,
            "stats" => {
                let secs: f64 = value.parse().map_err(|_| bad("seconds"))?;
                stats_every = Some(Duration::from_secs_f64(secs.max(0.1)));
            }
            _ => {
                let (targets, key): (Vec<&mut LinkConfig>, &str) =
                    if let Some(key) = name.strip_prefix("up-") {
                        (vec![&mut up], key)
                    } else if let Some(key) = name.strip_prefix("down-") {
                        (vec![&mut down], key)
                    } else {
                        (vec![&mut up, &mut down], name)
                    };
                let number: f64 = value.parse().map_err(|_| bad("number"))?;
                if !(number >= 0.0 && number.is_finite()) {
                    return Err(bad("must be ≥ 0"));
                }
                let probability = || {
                    if number <= 1.0 {
                        Ok(number)
                    } else {
                        Err(bad("probability in 0..=1"))
                    }
                };
                for config in targets {
                    match key {
                        "rate-mbit" => config.rate_bps = (number * 1e6) as u64,
                        "queue-ms" => config.queue_ms = number as u64,
                        "delay-ms" => config.delay_ns = (number * 1e6) as u64,
                        "jitter-ms" => config.jitter_ns = (number * 1e6) as u64,
                        "loss" => config.loss = probability()?,
                        "reorder" => config.reorder = probability()?,
                        "dup" => config.dup = probability()?,
                        "mtu" => config.mtu = number as usize,
                        _ => return Err(format!("unknown option --{name}")),
                    }
                }
            }
        }
    }
    Ok(Options {
        listen: listen.ok_or("--listen is required")?,
        upstream: upstream.ok_or("--upstream is required")?,
        up,
        down,
        seed,
        stats_every,
    })
}

/// The relay: sockets, both link models and the delivery schedule.
pub struct Relay {
    poll: Poll,
    listen: UdpSocket,
    upstream_addr: SocketAddr,
    /// Upstream socket per client; index + 1 is its token.
    clients: Vec<(SocketAddr, UdpSocket)>,
    by_addr: HashMap<SocketAddr, usize>,
    up: LinkModel,
    down: LinkModel,
    queue: BinaryHeap<Reverse<Pending>>,
    seq: u64,
    origin: Instant,
    send_errors: u64,
    overflow_drops: u64,
}

impl Relay {
    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    fn client_for(&mut self, addr: SocketAddr) -> std::io::Result<Option<usize>> {
        if let Some(&i) = self.by_addr.get(&addr) {
            return Ok(Some(i));
        }
        if self.clients.len() == MAX_CLIENTS {
            return Ok(None);
        }
        let bind: SocketAddr = if self.upstream_addr.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let mut socket = UdpSocket::bind(bind)?;
        socket.connect(self.upstream_addr)?;
        let index = self.clients.len();
        self.poll
            .registry()
            .register(&mut socket, Token(index + 1), Interest::READABLE)?;
        self.clients.push((addr, socket));
        self.by_addr.insert(addr, index);
        Ok(Some(index))
    }

    fn admit(&mut self, direction: Direction, client: usize, data: &[u8]) {
        let now = self.now_ns();
        let model = match direction {
            Direction::Up => &mut self.up,
            Direction::Down => &mut self.down,
        };
        if let Fate::Deliver { at, duplicate_at } = model.on_packet(now, data.len()) {
            for at in std::iter::once(at).chain(duplicate_at) {
                if self.queue.len() >= MAX_IN_FLIGHT {
                    self.overflow_drops += 1;
                    continue;
                }
                self.seq += 1;
                self.queue.push(Reverse(Pending {
                    at,
                    seq: self.seq,
                    direction,
                    client,
                    data: data.to_vec(),
                }));
            }
        }
    }

    fn read_all(&mut self, token: Token, buf: &mut [u8]) -> std::io::Result<()> {
        loop {
            if token == LISTEN {
                match self.listen.recv_from(buf) {
                    Ok((n, from)) => {
                        if let Some(client) = self.client_for(from)? {
                            let data = buf[..n].to_vec();
                            self.admit(Direction::Up, client, &data);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
                    Err(e) => return Err(e),
                }
            } else {
                let client = token.0 - 1;
                let Some((_, socket)) = self.clients.get(client) else {
                    return Ok(());
                };
                match socket.recv(buf) {
                    Ok(n) => {
                        let data = buf[..n].to_vec();
                        self.admit(Direction::Down, client, &data);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    // ICMP port unreachable from a not-yet-started upstream.
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }

    fn deliver_due(&mut self) {
        let now = self.now_ns();
        while let Some(Reverse(head)) = self.queue.peek() {
            if head.at > now {
                break;
            }
            let Some(Reverse(packet)) = self.queue.pop() else {
                break;
            };
            let Some((client_addr, socket)) = self.clients.get(packet.client) else {
                continue;
            };
            let sent = match packet.direction {
                Direction::Up => socket.send(&packet.data),
                Direction::Down => self.listen.send_to(&packet.data, *client_addr),
            };
            if sent.is_err() {
                self.send_errors += 1;
            }
        }
    }

    fn print_stats(&self) {
        let line = |name: &str, s: &LinkStats| {
            format!(
                "{name}: packets={} bytes={} lost={} queue_drops={} too_big={} reordered={} duplicated={}",
                s.packets, s.bytes, s.lost, s.queue_drops, s.too_big, s.reordered, s.duplicated
            )
        };
        eprintln!(
            "lossy_relay: {} | {} | in_flight={} send_errors={} overflow_drops={} clients={}",
            line("up", &self.up.stats),
            line("down", &self.down.stats),
            self.queue.len(),
            self.send_errors,
            self.overflow_drops,
            self.clients.len()
        );
    }
}

impl Relay {
    /// Binds the listen socket; `run` starts relaying.
    pub fn bind(options: &Options) -> std::io::Result<Self> {
        let poll = Poll::new()?;
        let mut listen = UdpSocket::bind(options.listen)?;
        poll.registry()
            .register(&mut listen, LISTEN, Interest::READABLE)?;
        Ok(Self {
            poll,
            listen,
            upstream_addr: options.upstream,
            clients: Vec::new(),
            by_addr: HashMap::new(),
            up: LinkModel::new(options.up.clone(), options.seed),
            down: LinkModel::new(options.down.clone(), options.seed ^ 0xD0D0_D0D0_D0D0_D0D0),
            queue: BinaryHeap::new(),
            seq: 0,
            origin: Instant::now(),
            send_errors: 0,
            overflow_drops: 0,
        })
    }

    /// The bound listen address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listen.local_addr()
    }

    /// Relays forever (returns only on a socket error).
    pub fn run(mut self, stats_every: Option<Duration>) -> std::io::Result<()> {
        let relay = &mut self;
        let mut events = Events::with_capacity(256);
        let mut buf = vec![0u8; 65_536];
        let mut next_stats = stats_every.map(|every| Instant::now() + every);
        loop {
            let now = relay.now_ns();
            let mut timeout = relay
                .queue
                .peek()
                .map(|Reverse(p)| Duration::from_nanos(p.at.saturating_sub(now)));
            if let Some(at) = next_stats {
                let until = at.saturating_duration_since(Instant::now());
                timeout = Some(timeout.map_or(until, |t| t.min(until)));
            }
            match relay.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let tokens: Vec<Token> = events.iter().map(|e| e.token()).collect();
            for token in tokens {
                relay.read_all(token, &mut buf)?;
            }
            relay.deliver_due();
            if let (Some(at), Some(every)) = (next_stats, stats_every) {
                if Instant::now() >= at {
                    relay.print_stats();
                    next_stats = Some(at + every);
                }
            }
        }
    }
}

fn main() {
    let options = match parse_options(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let started = Relay::bind(&options).and_then(|relay| {
        println!("{}", relay.local_addr()?);
        std::io::stdout().flush()?;
        relay.run(options.stats_every)
    });
    if let Err(e) = started {
        eprintln!("lossy_relay: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(config: LinkConfig) -> LinkModel {
        LinkModel::new(config, 7)
    }

    #[test]
    fn loss_rate_matches_configuration() {
        let mut link = model(LinkConfig {
            loss: 0.05,
            ..LinkConfig::default()
        });
        let n = 100_000;
        let lost = (0..n)
            .filter(|i| link.on_packet(*i as u64 * 1000, 1200) == Fate::Lost)
            .count();
        let rate = lost as f64 / n as f64;
        assert!((0.045..0.055).contains(&rate), "loss rate {rate}");
        assert_eq!(link.stats.lost as usize, lost);
    }

    #[test]
    fn delay_and_rate_shape_delivery_times() {
        // 8 Mbit/s: a 1000-byte packet takes 1 ms on the wire; 25 ms propagation.
        let mut link = model(LinkConfig {
            rate_bps: 8_000_000,
            delay_ns: 25 * NS_PER_MS,
            queue_ms: 1000,
            ..LinkConfig::default()
        });
        let times: Vec<u64> = (0..10)
            .map(|_| match link.on_packet(0, 1000) {
                Fate::Deliver {
                    at,
                    duplicate_at: None,
                } => at,
                other => panic!("{other:?}"),
            })
            .collect();
        for (i, at) in times.iter().enumerate() {
            assert_eq!(*at, (i as u64 + 1) * NS_PER_MS + 25 * NS_PER_MS);
        }
    }

    #[test]
    fn bounded_queue_tail_drops() {
        // 8 Mbit/s, 10 ms queue: a burst of 100 × 1000 B at t=0 keeps only ~11 packets.
        let mut link = model(LinkConfig {
            rate_bps: 8_000_000,
            queue_ms: 10,
            ..LinkConfig::default()
        });
        let delivered = (0..100)
            .filter(|_| matches!(link.on_packet(0, 1000), Fate::Deliver { .. }))
            .count();
        assert_eq!(delivered, 11);
        assert_eq!(link.stats.queue_drops, 89);
        // After the queue drains, packets pass again.
        assert!(matches!(
            link.on_packet(20 * NS_PER_MS, 1000),
            Fate::Deliver { .. }
        ));
    }

    #[test]
    fn jitter_keeps_order_and_reorder_breaks_it() {
        let mut link = model(LinkConfig {
            delay_ns: 10 * NS_PER_MS,
            jitter_ns: 5 * NS_PER_MS,
            ..LinkConfig::default()
        });
        let mut last = 0;
        for i in 0..1000u64 {
            let Fate::Deliver { at, .. } = link.on_packet(i * 100_000, 100) else {
                panic!()
            };
            assert!(at >= last && at >= i * 100_000 + 10 * NS_PER_MS);
            assert!(at <= i * 100_000 + 15 * NS_PER_MS || at == last);
            last = at;
        }
        let mut link = model(LinkConfig {
            delay_ns: 10 * NS_PER_MS,
            reorder: 0.2,
            ..LinkConfig::default()
        });
        let times: Vec<u64> = (0..1000u64)
            .map(|i| match link.on_packet(i * 100_000, 100) {
                Fate::Deliver { at, .. } => at,
                other => panic!("{other:?}"),
            })
            .collect();
        let inversions = times.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(inversions > 100, "inversions {inversions}");
        assert!((150..250).contains(&(link.stats.reordered as usize)));
    }

    #[test]
    fn datagrams_above_the_mtu_are_dropped() {
        let mut link = model(LinkConfig {
            mtu: 1400,
            ..LinkConfig::default()
        });
        assert!(matches!(link.on_packet(0, 1400), Fate::Deliver { .. }));
        assert_eq!(link.on_packet(1, 1401), Fate::TooBig);
        assert_eq!(link.stats.too_big, 1);
        let options = parse_options(
            [
                "--listen",
                "127.0.0.1:1",
                "--upstream",
                "127.0.0.1:2",
                "--down-mtu",
                "1300",
            ]
            .into_iter()
            .map(String::from),
        )
        .unwrap();
        assert_eq!((options.up.mtu, options.down.mtu), (0, 1300));
    }

    #[test]
    fn duplication_and_determinism() {
        let config = LinkConfig {
            dup: 0.1,
            loss: 0.1,
            ..LinkConfig::default()
        };
        let run = || {
            let mut link = LinkModel::new(config.clone(), 99);
            (0..10_000u64)
                .map(|i| link.on_packet(i, 500))
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run(), "same seed, same fates");
        let dups = a
            .iter()
            .filter(|f| {
                matches!(
                    f,
                    Fate::Deliver {
                        duplicate_at: Some(_),
                        ..
                    }
                )
            })
            .count();
        assert!((800..1000).contains(&dups), "dups {dups}");
    }
}
