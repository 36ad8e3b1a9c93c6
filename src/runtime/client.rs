//! Client start-up and lifetime: checks the config, starts the client loop, and runs until
//! SIGTERM/SIGINT.

use std::path::Path;

use super::RunError;
use crate::config::{ClientConfig, ConfigError};
use crate::logging;
use crate::signals::{self, SignalEvent};
use crate::tunnel::client_loop::{self, ClientOptions};

/// A client config the start-up refuses: a config error (exit 78) when it came from a file; from a
/// link or a subscription, a plain failure.
fn refused(source: Option<&Path>, field: &str, problem: String) -> RunError {
    match source {
        Some(p) => RunError::Config(ConfigError {
            file: p.to_path_buf(),
            field: field.to_string(),
            problem,
        }),
        None if field.is_empty() => RunError::Other(problem),
        None => RunError::Other(format!("field `{field}`: {problem}")),
    }
}

fn check_supported(cfg: &ClientConfig, source: Option<&Path>) -> Result<(), RunError> {
    if cfg.turn.enabled {
        return Err(refused(
            source,
            "turn.enabled",
            "TURN relaying is not supported by this build; set it to false".to_string(),
        ));
    }
    Ok(())
}

/// Runs a client until SIGTERM/SIGINT.
pub fn run(cfg: ClientConfig, source: Option<&Path>) -> Result<(), RunError> {
    check_supported(&cfg, source)?;
    super::malloc::tune();
    let signals = signals::install().map_err(|e| RunError::Other(e.to_string()))?;
    logging::init(if cfg.debug {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    });
    let options = ClientOptions::from_config(&cfg).map_err(|e| refused(source, "", e))?;
    if options.is_open_proxy() {
        log::warn!(
            "WARNING: OPEN PROXY. The local proxy port {} asks for no credentials and is not \
             on loopback (allow_open_proxy: true): anyone who can reach this address can use your \
             tunnel and your traffic allowance. Set socks5_auth unless this is really meant",
            options.listen
        );
    }
    let handle = client_loop::start(options).map_err(RunError::Other)?;
    loop {
        match signals.recv() {
            Ok(SignalEvent::Terminate(name)) => {
                log::info!("{name}: closing the tunnel");
                break;
            }
            Ok(SignalEvent::Reload) => reload(&handle, source),
            Err(_) => break,
        }
    }
    handle.shutdown();
    Ok(())
}

/// SIGHUP: re-reads the config file and applies what a running client can change (`exclude`).
fn reload(handle: &client_loop::ClientLoopHandle, source: Option<&Path>) {
    let Some(path) = source else {
        log::info!("SIGHUP: no config file to reload (started from a link or a subscription)");
        return;
    };
    match crate::config::load(path) {
        Ok(crate::config::Config::Client(cfg)) => match cfg.exclude.matcher() {
            Ok(exclude) => handle.reload_exclude(exclude),
            Err(e) => log::warn!("SIGHUP: exclude: {e}; keeping the old lists"),
        },
        Ok(_) => log::warn!(
            "SIGHUP: {} is no longer a client config; ignored",
            path.display()
        ),
        Err(e) => log::warn!("SIGHUP: {e}; keeping the running settings"),
    }
}

/// Opens `sessions` tunnel sessions and keeps them idle (benchmarks of server memory).
pub fn bench_idle_sessions(cfg: ClientConfig, sessions: u32) -> Result<(), RunError> {
    check_supported(&cfg, None)?;
    let signals = signals::install().map_err(|e| RunError::Other(e.to_string()))?;
    logging::init(log::LevelFilter::Warn);
    let mut options = ClientOptions::from_config(&cfg).map_err(RunError::Other)?;
    options.sessions = sessions as usize;
    options.listen.set_port(0);
    let handle = client_loop::start(options).map_err(RunError::Other)?;
    eprintln!("opening {sessions} idle sessions; Ctrl-C to stop");
    while let Ok(ev) = signals.recv() {
        if matches!(ev, SignalEvent::Terminate(_)) {
            break;
        }
    }
    handle.shutdown();
    Ok(())
}
