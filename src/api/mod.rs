//! The Management REST API: start/stop, the shared handler context, and the wiring of
//! - [`front`]: the network front end (one mio thread, bounded connections and buffers,
//!   request deadlines, keep-alive) that validates requests and relays them over a private Unix
//!   socket to
//! - [`backend`]: the tiny_http server whose fixed worker pool runs
//! - [`routes`] (path + method → handler), [`auth`], [`subscribe`], with JSON [`errors`],
//!   and [`metrics`] (`GET /metrics`).
//!
//! See `docs/api.md` for the user-facing reference.

pub mod admission;
pub mod auth;
pub mod backend;
pub mod bulk;
pub mod errors;
pub mod front;
pub mod guard;
pub mod http;
pub mod metrics;
pub mod routes;
pub mod subscribe;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::config::ServerConfig;
use crate::control::ControlSender;
use crate::keys;
use crate::tunnel::stats::SharedTunnelStats;
use crate::users::{Persister, SharedUsers};

pub use front::Limits;

/// Everything a handler needs.
pub struct ApiContext {
    pub config: Arc<ServerConfig>,
    pub users: SharedUsers,
    pub persister: Persister,
    pub control: ControlSender,
    pub started_at: Instant,
    /// The configured token (empty = open API).
    pub token: String,
    /// The address the API actually listens on.
    pub local_addr: SocketAddr,
    /// Request counts and the tunnel's published counters for `GET /metrics`.
    pub metrics: Arc<metrics::Metrics>,
}

/// Starting the API failed.
#[derive(Debug)]
pub enum ApiStartError {
    /// The bind address could not be bound (in use, no permission, ...).
    Bind { addr: SocketAddr, error: io::Error },
    /// Threads or the poller could not be created.
    Io(io::Error),
}

impl fmt::Display for ApiStartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiStartError::Bind { addr, error } => {
                write!(f, "cannot listen for the API on {addr}: {error}")
            }
            ApiStartError::Io(e) => write!(f, "cannot start the API: {e}"),
        }
    }
}

impl std::error::Error for ApiStartError {}

/// The running API; [`ApiHandle::shutdown`] (or drop) stops it.
pub struct ApiHandle {
    front: front::Front,
    backend: backend::Backend,
}

impl ApiHandle {
    /// The address the API listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.front.local_addr
    }

    /// Stops accepting, closes connections and joins the threads.
    pub fn shutdown(mut self) {
        self.front.shutdown();
        self.backend.shutdown();
    }
}

/// Starts the API on `config.api.bind` with the [`Limits`] of `config.api`; `/metrics` shows the
/// counters the tunnel loop publishes into `tunnel`.
pub fn start(
    config: Arc<ServerConfig>,
    users: SharedUsers,
    persister: Persister,
    control: ControlSender,
    started_at: Instant,
    tunnel: SharedTunnelStats,
) -> Result<ApiHandle, ApiStartError> {
    let metrics = Arc::new(metrics::Metrics::new(tunnel));
    let limits = Limits {
        max_connections: config.api.max_connections as usize,
        max_connections_per_address: config.api.max_connections_per_address as usize,
        head_timeout: std::time::Duration::from_secs(config.api.head_timeout_secs.into()),
        ..Limits::default()
    };
    start_inner(
        config, users, persister, control, started_at, limits, metrics,
    )
}

/// Starts the API with explicit limits and no tunnel (tests use small timeouts).
pub fn start_with_limits(
    config: Arc<ServerConfig>,
    users: SharedUsers,
    persister: Persister,
    control: ControlSender,
    started_at: Instant,
    limits: Limits,
) -> Result<ApiHandle, ApiStartError> {
    let metrics = Arc::new(metrics::Metrics::default());
    start_inner(
        config, users, persister, control, started_at, limits, metrics,
    )
}

fn start_inner(
    config: Arc<ServerConfig>,
    users: SharedUsers,
    persister: Persister,
    control: ControlSender,
    started_at: Instant,
    limits: Limits,
    metrics: Arc<metrics::Metrics>,
) -> Result<ApiHandle, ApiStartError> {
    let addr = config.api.bind;
    let listener =
        std::net::TcpListener::bind(addr).map_err(|error| ApiStartError::Bind { addr, error })?;
    let local_addr = listener.local_addr().map_err(ApiStartError::Io)?;
    let ctx = Arc::new(ApiContext {
        token: config.api.token.clone(),
        config,
        users,
        persister,
        control,
        started_at,
        local_addr,
        metrics: metrics.clone(),
    });
    let auth_text = if ctx.token.is_empty() {
        "no token (open API)".to_string()
    } else {
        format!("token {}", keys::mask(&ctx.token))
    };
    let ctx_token = ctx.token.clone();
    let metrics_token = ctx.config.api.metrics_token.clone();
    let backend = backend::Backend::start(ctx, limits.workers).map_err(ApiStartError::Io)?;
    let socket = backend.socket_path().to_path_buf();
    let gate = guard::Gate::new(
        ctx_token,
        guard::FailedAuthLimiter::new(limits.auth_failure_burst, limits.auth_failure_interval),
    )
    .with_metrics(metrics_token, metrics);
    let front = front::start(listener, limits.clone(), gate, move |req| {
        backend::relay(&socket, req)
    })
    .map_err(ApiStartError::Io)?;
    log::info!(
        "api: listening on http://{local_addr} ({auth_text}; at most {} connections, {} per non-loopback address; {} relays + {} tiny_http workers)",
        limits.max_connections,
        limits.max_connections_per_address,
        limits.workers,
        limits.workers
    );
    Ok(ApiHandle { front, backend })
}
