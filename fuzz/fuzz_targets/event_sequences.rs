//! Arbitrary event sequences (traffic, garbage, replays, mutations, clock jumps, user changes,
//! roaming) against a server endpoint and a client. Invariants are asserted inside.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ostp::proto::fuzz_support::run(data);
});
