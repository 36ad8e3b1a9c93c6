//! Server start-up and lifetime: user table + state file, the tunnel loop, the API, the counter
//! flusher, and the signals (SIGHUP reload, SIGTERM/SIGINT graceful shutdown).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::RunError;
use crate::config::{self, Config, ServerConfig};
use crate::control::ControlMsg;
use crate::signals::{self, SignalEvent};
use crate::tunnel::server_loop::{self, LoopOptions};
use crate::users::{self, persist::lock_users};
use crate::{api, keys, logging};

/// How often counters are written to the state file.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(10);

/// Runs a server until SIGTERM/SIGINT.
pub fn run(cfg: ServerConfig) -> Result<(), RunError> {
    let signals = signals::install().map_err(|e| RunError::Other(e.to_string()))?;
    logging::init(cfg.log_level);
    let started_at = Instant::now();
    let (users, persister) = users::open(&cfg).map_err(|e| RunError::Other(e.to_string()))?;
    let tunnel = server_loop::start(&cfg, users.clone(), LoopOptions::from_config(&cfg))
        .map_err(|e| RunError::Other(e.to_string()))?;
    let control = tunnel.control.clone();
    let mut cfg = cfg;
    // Port 0 in `listen` (tests) becomes the real port in links and subscriptions.
    for (l, bound) in cfg.listen.iter_mut().zip(&tunnel.local_addrs) {
        l.set_port(bound.port());
    }
    let shared_cfg = Arc::new(cfg.clone());
    let api = if cfg.api.enabled {
        Some(
            api::start(
                shared_cfg.clone(),
                users.clone(),
                persister.clone(),
                control.clone(),
                started_at,
            )
            .map_err(|e| RunError::Other(e.to_string()))?,
        )
    } else {
        None
    };
    persister.start_flusher(FLUSH_INTERVAL);
    announce(
        &cfg,
        &tunnel.local_addrs,
        api.as_ref().map(|a| a.local_addr()),
        &users,
    );

    let mut current = cfg;
    loop {
        match signals.recv() {
            Ok(SignalEvent::Reload) => reload(&mut current, &users, &control),
            Ok(SignalEvent::Terminate(name)) => {
                log::info!("{name}: shutting down");
                break;
            }
            Err(_) => break,
        }
    }
    tunnel.shutdown();
    if let Some(api) = api {
        api.shutdown();
    }
    persister
        .stop_flusher()
        .and_then(|_| persister.flush_now())
        .map_err(|e| RunError::Other(format!("final state write failed: {e}")))?;
    log::info!("state saved to {}; bye", current.state_file.display());
    Ok(())
}

fn announce(
    cfg: &ServerConfig,
    tunnel_addrs: &[std::net::SocketAddr],
    api_addr: Option<std::net::SocketAddr>,
    users: &users::SharedUsers,
) {
    let listen: Vec<String> = tunnel_addrs.iter().map(|a| a.to_string()).collect();
    let (count, first_key) = {
        let table = lock_users(users);
        let first = table.all_keys().into_iter().next().map(|(_, k)| k);
        (table.len(), first)
    };
    log::info!(
        "ostp {} server: tunnel on udp {} — {count} users",
        env!("CARGO_PKG_VERSION"),
        listen.join(", ")
    );
    match api_addr {
        Some(a) => log::info!("management API on http://{a}"),
        None => log::info!(
            "management API disabled (set api.enabled in {})",
            cfg.path.display()
        ),
    }
    if let Some(key) = first_key {
        log::info!(
            "first key {}: print every user's share link with `ostp --links --config {}`",
            keys::mask(&key),
            cfg.path.display()
        );
    }
}

/// SIGHUP: re-read config.json and apply keys, names, limits and the log level.
fn reload(
    current: &mut ServerConfig,
    users: &users::SharedUsers,
    control: &crate::control::ControlSender,
) {
    let fresh = match config::load(&current.path) {
        Ok(Config::Server(s)) => s,
        Ok(Config::Client(_)) => {
            log::error!(
                "reload: {} is now a client config; keeping the running server config",
                current.path.display()
            );
            return;
        }
        Err(e) => {
            log::error!("reload failed, keeping the running config: {e}");
            return;
        }
    };
    logging::set_level(fresh.log_level);
    if fresh.listen != current.listen
        || fresh.api != current.api
        || fresh.state_file != current.state_file
    {
        log::warn!("reload: listen, api and state_file changes take effect after a restart");
    }
    let changes = lock_users(users).apply_config(&fresh.access_keys, users::now_unix());
    for id in &changes.removed {
        control.send(ControlMsg::UserRemoved(*id));
    }
    for id in changes.added.iter().chain(&changes.changed) {
        control.send(ControlMsg::UserChanged(*id));
    }
    log::info!(
        "reloaded {}: {} keys added, {} removed, {} changed",
        current.path.display(),
        changes.added.len(),
        changes.removed.len(),
        changes.changed.len()
    );
    let (listen, api, state_file) = (
        current.listen.clone(),
        current.api.clone(),
        current.state_file.clone(),
    );
    *current = fresh;
    current.listen = listen;
    current.api = api;
    current.state_file = state_file;
}

/// Every user's key and name, without starting anything (for `--links`).
pub fn list_users_offline(cfg: &ServerConfig) -> Result<Vec<(String, Option<String>)>, RunError> {
    let stored =
        users::state_file::load(&cfg.state_file).map_err(|e| RunError::Other(e.to_string()))?;
    let table = users::UserTable::from_stored(stored, &cfg.access_keys, users::now_unix());
    Ok(table
        .list()
        .into_iter()
        .map(|u| (u.key.clone(), u.name.clone()))
        .collect())
}
