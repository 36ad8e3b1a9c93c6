//! Arbitrary datagrams into a client that is handshaking: no panic, no connection.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use ostp::proto::endpoint::{ConnectorConfig, ClientSession};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let key = "fuzz-user-a-key-0123456789";
    let mut client =
        ClientSession::connect(ConnectorConfig::default(), key, now, 1_800_000_000, [4; 32]).unwrap();
    for chunk in data.split(|b| *b == 0xFF) {
        let mut bytes = chunk.to_vec();
        client.handle_datagram(now, &mut bytes);
    }
    assert!(!client.is_connected(), "forged replies must not connect");
});
