//! Helpers shared by the integration tests: the API test server and HTTP client (`api`), the
//! real-process tunnel harness (`tunnel`), the simulated-network transport pair (`transport`),
//! network namespaces a test creates (`netns`), a tiny DNS responder (`dns`), and the two examples compiled in from their
//! sources (the `bulk_http` test server and the `lossy_relay` link emulator).

pub mod api;
pub mod dns;
pub mod netns;
pub mod transport;
pub mod tunnel;

#[allow(dead_code)] // the example's `main` is not used here
#[path = "../../../examples/bulk_http.rs"]
pub mod bulk_http;
#[allow(dead_code)]
#[path = "../../../examples/lossy_relay.rs"]
pub mod lossy_relay;
