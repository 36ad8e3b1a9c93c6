//! Bounded, seeded property test (the CI stand-in for `fuzz/`): arbitrary datagrams and event
//! sequences against a server endpoint and a client never panic and never grow without bound.

use ostp::proto::fuzz_support;
use ostp::proto::rng::Drbg;

fn cases() -> usize {
    if cfg!(debug_assertions) { 600 } else { 20_000 }
}

#[test]
fn random_byte_sequences_never_panic_or_grow() {
    let mut rng = Drbg::new([0xF0; 32]);
    for _ in 0..cases() {
        let len = rng.up_to(400) as usize;
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        fuzz_support::run(&data);
    }
}

#[test]
fn traffic_heavy_sequences_reach_sessions_and_stay_bounded() {
    // Biased towards delivering traffic so that sessions exist and replays/mutations hit live tokens.
    let mut rng = Drbg::new([0x0F; 32]);
    let mut connected = 0;
    let mut max_sessions = 0;
    let mut stream_bytes = 0;
    for _ in 0..cases() / 3 {
        let mut data = Vec::new();
        for _ in 0..rng.up_to(120) {
            let op = if rng.up_to(2) == 0 {
                0
            } else {
                rng.up_to(12) as u8 + 1
            };
            data.push(op);
            data.push(rng.next_u32() as u8);
            data.push(rng.next_u32() as u8);
        }
        let summary = fuzz_support::run(&data);
        connected += summary.connected;
        max_sessions = max_sessions.max(summary.max_sessions);
        stream_bytes += summary.stream_bytes;
    }
    assert!(
        connected > 0,
        "no sequence completed a handshake: the test would be vacuous"
    );
    assert!(
        stream_bytes > 0,
        "no stream data reached the server application"
    );
    assert!(
        max_sessions > 1,
        "sessions should accumulate (new clients) and hit the cap logic"
    );
}
