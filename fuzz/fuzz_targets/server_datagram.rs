//! One arbitrary datagram into a server endpoint with registered users: no panic, no reply.
#![no_main]

use std::net::SocketAddr;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use ostp::proto::endpoint::{EndpointConfig, ServerEndpoint, SocketIndex, UserId, UserState};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut server = ServerEndpoint::new(EndpointConfig::default(), [3; 32]);
    server
        .set_user(UserId(1), "fuzz-user-a-key-0123456789", UserState::Active)
        .unwrap();
    let mut bytes = data.to_vec();
    let from = SocketAddr::from(([192, 0, 2, 1], 4000));
    server.handle_datagram(now, 1_800_000_000, SocketIndex(0), from, &mut bytes);
    let mut out = [0u8; 2048];
    assert!(
        server.poll_transmit(now, &mut out).is_none(),
        "arbitrary bytes must get silence"
    );
});
