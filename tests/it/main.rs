//! All integration tests in one crate: one test binary to link instead of one per file (with
//! `lto = "fat"` in the release profile, linking dominated CI time). Each module is one former
//! test file; `support` holds what they share. `tests/api_robustness.rs` stays its own binary
//! because it asserts the thread count of its process.

mod support;

mod api_concurrency;
mod api_durability;
mod api_hardening;
mod api_http;
mod bulk_http;
mod bulk_ops;
mod carrier_client;
mod carrier_netns;
mod cli;
mod client_hardening;
mod devices;
mod dist;
mod dns_forward;
mod fairness;
mod guard_api;
mod hello_restart;
mod lossy_relay;
mod metrics;
mod operator;
mod proto_fuzz_props;
mod proto_memory;
mod proto_secure;
mod proto_session_sim;
mod proto_transport;
mod proto_wire;
mod router_mode;
mod split_routing;
mod storage;
mod tcp_carrier;
mod tun_device;
mod tun_mode;
mod tunnel_carrier;
mod tunnel_e2e;
mod tunnel_limits;
mod tunnel_links;
mod tunnel_lossy;
mod tunnel_memory;
mod tunnel_reload_mux;
