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
    super::malloc::tune();
    let signals = signals::install().map_err(|e| RunError::Other(e.to_string()))?;
    logging::init(cfg.log_level);
    let started_at = Instant::now();
    // The soft default (often 1,024) runs out long before the stream caps; the loop keeps a
    // reserve below whatever is in force.
    match crate::sys::raise_nofile_limit() {
        Ok(n) => log::info!("open-file limit: {n}"),
        Err(e) => log::warn!("cannot raise the open-file limit: {e}"),
    }
    let (users, persister) = users::open(&cfg).map_err(|e| RunError::Other(e.to_string()))?;
    let options = LoopOptions::from_config(&cfg);
    let tunnel_stats = options.stats.clone();
    let tunnel = server_loop::start(&cfg, users.clone(), options)
        .map_err(|e| RunError::Other(e.to_string()))?;
    let control = tunnel.control.clone();
    let mut cfg = cfg;
    // Port 0 in `listen` (tests) becomes the real port in links and subscriptions.
    for (l, bound) in cfg.listen.iter_mut().zip(&tunnel.local_addrs) {
        l.set_port(bound.port());
    }
    for (l, bound) in cfg.listen_tcp.iter_mut().zip(&tunnel.tcp_addrs) {
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
                tunnel_stats,
            )
            .map_err(|e| RunError::Other(e.to_string()))?,
        )
    } else {
        None
    };
    if let Some(api) = &api {
        control.send(ControlMsg::ApiBound(api.local_addr()));
    }
    let reset_control = control.clone();
    persister.on_reset(move |id| reset_control.send(ControlMsg::UserChanged(id)));
    persister.start_flusher(FLUSH_INTERVAL);
    announce(
        &cfg,
        (&tunnel.local_addrs, &tunnel.tcp_addrs),
        api.as_ref().map(|a| a.local_addr()),
        &users,
    );

    let mut current = cfg;
    loop {
        match signals.recv() {
            Ok(SignalEvent::Reload) => reload(&mut current, &persister, &control),
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
        .map_err(|e| RunError::Other(format!("final state write failed: {e}")))?;
    log::info!("state saved to {}; bye", current.state_file.display());
    Ok(())
}

fn announce(
    cfg: &ServerConfig,
    (udp_addrs, tcp_addrs): (&[std::net::SocketAddr], &[std::net::SocketAddr]),
    api_addr: Option<std::net::SocketAddr>,
    users: &users::SharedUsers,
) {
    let mut listen: Vec<String> = udp_addrs.iter().map(|a| a.to_string()).collect();
    if !tcp_addrs.is_empty() {
        let tcp: Vec<String> = tcp_addrs.iter().map(|a| a.to_string()).collect();
        listen.push(format!("tcp {}", tcp.join(", ")));
        match cfg.fallback {
            Some(f) => log::info!("tcp: connections that are not OSTP go to {}", f.target),
            None => log::info!("tcp: connections that are not OSTP are read and discarded"),
        }
    }
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

/// SIGHUP: re-read config.json; apply keys, names, limits, the log level,
/// `allow_private_destinations` and `fallback`, and name the changed fields that need a restart.
fn reload(
    current: &mut ServerConfig,
    persister: &users::Persister,
    control: &crate::control::ControlSender,
) {
    let mut fresh = match config::load(&current.path) {
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
    let restart = restart_only_changes(current, &fresh);
    if !restart.is_empty() {
        log::warn!(
            "reload: {} changed; that takes effect after a restart",
            restart.join(", ")
        );
    }
    let mut applied = Vec::new();
    if fresh.log_level != current.log_level {
        logging::set_level(fresh.log_level);
        applied.push(format!(
            "log_level {}",
            fresh.log_level.as_str().to_lowercase()
        ));
    }
    if fresh.allow_private_destinations != current.allow_private_destinations {
        control.send(ControlMsg::AllowPrivateDestinations(
            fresh.allow_private_destinations,
        ));
        applied.push(format!(
            "allow_private_destinations {}",
            fresh.allow_private_destinations
        ));
    }
    if fresh.fallback != current.fallback {
        let target = fresh.fallback.map(|f| f.target);
        control.send(ControlMsg::Fallback(target));
        applied.push(match target {
            Some(t) => format!("fallback {t}"),
            None => "no fallback".to_string(),
        });
    }
    let changes = persister.apply_config(&fresh.access_keys, users::now_unix());
    for id in &changes.removed {
        control.send(ControlMsg::UserRemoved(*id));
    }
    for id in changes.added.iter().chain(&changes.changed) {
        control.send(ControlMsg::UserChanged(*id));
    }
    applied.insert(
        0,
        format!(
            "{} keys added, {} removed, {} changed",
            changes.added.len(),
            changes.removed.len(),
            changes.changed.len()
        ),
    );
    log::info!(
        "reloaded {}: {}",
        current.path.display(),
        applied.join("; ")
    );
    // What is running keeps the old values of the restart-only fields, so that the next reload
    // still tells that they differ.
    fresh.listen = std::mem::take(&mut current.listen);
    fresh.listen_tcp = std::mem::take(&mut current.listen_tcp);
    fresh.max_unauthenticated_tcp = current.max_unauthenticated_tcp;
    fresh.api = current.api.clone();
    fresh.metrics = current.metrics.clone();
    fresh.state_file = std::mem::take(&mut current.state_file);
    fresh.allow_symlinked_state = current.allow_symlinked_state;
    fresh.public_host = current.public_host.take();
    fresh.public_port = current.public_port;
    fresh.public_tcp_port = current.public_tcp_port;
    fresh.max_sessions = current.max_sessions;
    fresh.max_sessions_per_user = current.max_sessions_per_user;
    *current = fresh;
}

/// The fields of `fresh` that differ from the running config and only take effect after a
/// restart (sockets, the API, the state file, the share-link host and the endpoint's session
/// limits are set up once at start).
fn restart_only_changes(running: &ServerConfig, fresh: &ServerConfig) -> Vec<&'static str> {
    let fields = [
        ("listen", running.listen != fresh.listen),
        ("listen_tcp", running.listen_tcp != fresh.listen_tcp),
        (
            "max_unauthenticated_tcp",
            running.max_unauthenticated_tcp != fresh.max_unauthenticated_tcp,
        ),
        ("api", running.api != fresh.api),
        ("metrics", running.metrics != fresh.metrics),
        ("state_file", running.state_file != fresh.state_file),
        (
            "allow_symlinked_state",
            running.allow_symlinked_state != fresh.allow_symlinked_state,
        ),
        ("public_host", running.public_host != fresh.public_host),
        ("public_port", running.public_port != fresh.public_port),
        (
            "public_tcp_port",
            running.public_tcp_port != fresh.public_tcp_port,
        ),
        ("max_sessions", running.max_sessions != fresh.max_sessions),
        (
            "max_sessions_per_user",
            running.max_sessions_per_user != fresh.max_sessions_per_user,
        ),
        ("resource limits", running.limits != fresh.limits),
    ];
    fields
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| *name)
        .collect()
}

/// Every user's key and name, without starting anything (for `--links`).
pub fn list_users_offline(cfg: &ServerConfig) -> Result<Vec<(String, Option<String>)>, RunError> {
    let path = users::state_file::resolve(&cfg.state_file, cfg.allow_symlinked_state)
        .map_err(|e| RunError::Other(e.to_string()))?;
    let stored = users::load_stored(&path).map_err(|e| RunError::Other(e.to_string()))?;
    let table = users::UserTable::from_stored(stored, &cfg.access_keys, users::now_unix());
    Ok(table
        .list()
        .into_iter()
        .map(|u| (u.key.clone(), u.name.clone()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_config(json: &str) -> ServerConfig {
        match config::parse(std::path::Path::new("config.json"), json) {
            Ok(Config::Server(s)) => s,
            other => panic!("not a server config: {other:?}"),
        }
    }

    #[test]
    fn restart_only_fields_are_named_and_live_fields_are_not() {
        let base = r#"{"mode": "server", "listen": "127.0.0.1:9000", "access_keys": []}"#;
        let running = server_config(base);
        assert_eq!(restart_only_changes(&running, &running), Vec::<&str>::new());
        let live = server_config(
            r#"{"mode": "server", "listen": "127.0.0.1:9000", "access_keys": [],
                "log_level": "debug", "allow_private_destinations": true,
                "listen_tcp": "127.0.0.1:9000", "fallback": {"target": "127.0.0.1:80"}}"#,
        );
        let running_tcp = server_config(
            r#"{"mode": "server", "listen": "127.0.0.1:9000", "access_keys": [],
                "listen_tcp": "127.0.0.1:9000"}"#,
        );
        assert_eq!(
            restart_only_changes(&running_tcp, &live),
            Vec::<&str>::new(),
            "the fallback target reloads"
        );
        assert_eq!(restart_only_changes(&running, &live), ["listen_tcp"]);
        let live = server_config(
            r#"{"mode": "server", "listen": "127.0.0.1:9000", "access_keys": [],
                "log_level": "debug", "allow_private_destinations": true}"#,
        );
        assert_eq!(restart_only_changes(&running, &live), Vec::<&str>::new());
        let fresh = server_config(
            r#"{"mode": "server", "listen": "127.0.0.1:9001", "access_keys": [],
                "public_host": "vpn.example.com", "max_sessions": 7, "public_port": 53,
                "max_sessions_per_user": 3, "max_unauthenticated_tcp": 9, "public_tcp_port": 443}"#,
        );
        assert_eq!(
            restart_only_changes(&running, &fresh),
            [
                "listen",
                "max_unauthenticated_tcp",
                "public_host",
                "public_port",
                "public_tcp_port",
                "max_sessions",
                "max_sessions_per_user"
            ]
        );
    }
}
