//! Top-level commands: what `ostp` does for each [`Command`]. Server and client start-up live in
//! [`server`] and [`client`]; this file holds the small one-shot commands (`--init`, `--check`,
//! `--links`, `--generate-key`, `--router-rules`) and the first-run config creation; [`malloc`] holds the
//! allocator settings both apply at start.

pub mod client;
pub mod fetch;
pub mod malloc;
pub mod server;

use std::fmt;
use std::io::Write;
use std::path::Path;

use crate::cli::{self, Command, InitKind};
use crate::config::{self, Config, ConfigError};
use crate::keys;
use crate::share_link::{self, ShareLink};
use crate::tunnel::router_rules::{Flavor as RulesFlavor, RouterRules};

/// Exit code of a failed command ([`RunError::exit_code`]).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of a config-file problem (`EX_CONFIG` from sysexits.h): the file is missing,
/// unreadable, not JSON, or invalid. Restarting cannot help, so service managers are told not to
/// (`RestartPreventExitStatus=78` in `dist/systemd/`).
pub const EXIT_CONFIG: u8 = 78;

/// Why a command failed (printed by `main`, which exits with [`RunError::exit_code`]).
#[derive(Debug)]
pub enum RunError {
    /// The config file is missing, unreadable or invalid (exit code [`EXIT_CONFIG`]).
    Config(ConfigError),
    /// A problem with a file the command reads or writes.
    File(String),
    /// Anything else, already phrased for the user.
    Other(String),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Config(e) => write!(f, "{e}"),
            RunError::File(s) | RunError::Other(s) => write!(f, "{s}"),
        }
    }
}

impl std::error::Error for RunError {}

impl RunError {
    /// The process exit code for this failure: [`EXIT_CONFIG`] for config-file problems,
    /// [`EXIT_FAILURE`] otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) => EXIT_CONFIG,
            RunError::File(_) | RunError::Other(_) => EXIT_FAILURE,
        }
    }
}

impl From<ConfigError> for RunError {
    fn from(e: ConfigError) -> Self {
        RunError::Config(e)
    }
}

impl From<keys::RandomError> for RunError {
    fn from(e: keys::RandomError) -> Self {
        RunError::Other(e.to_string())
    }
}

/// Runs one command to completion.
pub fn execute(command: Command) -> Result<(), RunError> {
    match command {
        Command::Help => {
            print!("{}", cli::help_text());
            Ok(())
        }
        Command::Version => {
            println!("ostp {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::GenerateKey { count } => {
            let mut out = std::io::stdout().lock();
            for _ in 0..count {
                let _ = writeln!(out, "{}", keys::generate_key()?);
            }
            Ok(())
        }
        Command::Init {
            kind,
            config,
            force,
            link,
        } => init(kind, &config, force, link.as_deref()),
        Command::Check { config } => check(&config),
        Command::Links { config } => links(&config),
        Command::RouterRules { config, flavor } => router_rules(&config, flavor),
        Command::Run { config, explicit } => {
            if !explicit && !config.exists() {
                first_run(&config)?;
            }
            run_config(&config)
        }
        Command::RunLink { link, socks5_bind } => {
            let link = ShareLink::parse(&link).map_err(|e| RunError::Other(e.to_string()))?;
            if let Some(name) = &link.name {
                eprintln!("ostp: profile {name:?}");
            }
            let mut cfg = link.client_config();
            if let Some(bind) = socks5_bind {
                cfg.socks5_bind = bind;
            }
            client::run(cfg, None)
        }
        Command::Subscribe { url, socks5_bind } => {
            let mut cfg = fetch::client_config_from_subscription(&url)?;
            if let Some(bind) = socks5_bind {
                cfg.socks5_bind = bind;
            }
            client::run(cfg, None)
        }
        Command::BenchIdleSessions { config, sessions } => match config::load(&config)? {
            Config::Client(cfg) => client::bench_idle_sessions(cfg, sessions),
            Config::Server(_) => Err(RunError::Other(format!(
                "{}: --bench-idle-sessions needs a client config",
                config.display()
            ))),
        },
    }
}

fn run_config(path: &Path) -> Result<(), RunError> {
    if !path.exists() {
        return Err(RunError::Config(ConfigError {
            file: path.to_path_buf(),
            field: String::new(),
            problem: format!(
                "no such file. Create one with `ostp --init server --config {}` (or client)",
                path.display()
            ),
        }));
    }
    match config::load(path)? {
        Config::Server(cfg) => server::run(cfg),
        Config::Client(cfg) => client::run(cfg, Some(path)),
    }
}

/// Writes `text` to `path` atomically and owner-only (0600: a config holds keys and the API
/// token; temp file created exclusively without following links, fsync, rename, dir fsync),
/// failing if it exists and `force` is false.
fn write_new_file(path: &Path, text: &str, force: bool) -> Result<(), RunError> {
    if path.exists() && !force {
        return Err(RunError::File(format!(
            "{} already exists; not overwriting it (add --force to replace it)",
            path.display()
        )));
    }
    crate::users::state_file::write_atomic(path, text.as_bytes())
        .map_err(|e| RunError::File(format!("cannot write {}: {e}", path.display())))
}

fn init(kind: InitKind, path: &Path, force: bool, link: Option<&str>) -> Result<(), RunError> {
    match kind {
        InitKind::Server => {
            let key = keys::generate_key()?;
            let token = keys::generate_token()?;
            write_new_file(path, &config::server_template(&key, &token), force)?;
            println!("Wrote a server config to {}", path.display());
            println!("  access key: {key}");
            println!(
                "  API:        http://{} (token in the file)",
                config::DEFAULT_API_BIND
            );
            println!(
                "Set \"public_host\" to this server's public address, then run `ostp --config {}`.",
                path.display()
            );
        }
        InitKind::Client => {
            let (cfg, from_link) = match link {
                Some(l) => {
                    let l = ShareLink::parse(l).map_err(|e| RunError::Other(e.to_string()))?;
                    (l.client_config(), true)
                }
                None => (
                    config::ClientConfig::for_server(
                        format!("example.com:{}", config::DEFAULT_PORT),
                        keys::generate_key()?,
                    ),
                    false,
                ),
            };
            write_new_file(path, &config::client_config_text(&cfg), force)?;
            println!("Wrote a client config to {}", path.display());
            if !from_link {
                println!(
                    "Edit \"server\" and \"access_key\" to the values your server's operator gave you \
                     (or pass a share link: `ostp --init client ostp://KEY@HOST:PORT`)."
                );
            }
            println!(
                "Run it with `ostp --config {}`; the SOCKS5/HTTP proxy listens on {}.",
                path.display(),
                config::DEFAULT_SOCKS5_BIND
            );
        }
    }
    Ok(())
}

/// `ostp` with no config: write a fresh server config and say so.
fn first_run(path: &Path) -> Result<(), RunError> {
    let key = keys::generate_key()?;
    let token = keys::generate_token()?;
    write_new_file(path, &config::server_template(&key, &token), false)?;
    let host = guess_public_host();
    println!(
        "No {} here: wrote a fresh server config to it.",
        cli::DEFAULT_CONFIG
    );
    println!("  access key: {key}");
    println!(
        "  API:        http://{} — token: see \"api.token\" in {}",
        config::DEFAULT_API_BIND,
        path.display()
    );
    println!(
        "Share link (give it to a client; replace the host if it is not this machine's public address):"
    );
    println!(
        "  {}",
        share_link::format(
            &key,
            &host,
            config::DEFAULT_PORT,
            Some(config::DEFAULT_PORT)
        )
    );
    println!(
        "Connect with: ostp \"{}\"",
        share_link::format(
            &key,
            &host,
            config::DEFAULT_PORT,
            Some(config::DEFAULT_PORT)
        )
    );
    Ok(())
}

/// The host to print in share links when `public_host` is not set.
fn guess_public_host() -> String {
    // The source address the OS would use to reach the internet (no packet is sent).
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
        .map(|a| a.ip().to_string())
        .ok()
        .filter(|ip| ip != "0.0.0.0")
        .unwrap_or_else(|| "YOUR_SERVER_IP".to_string())
}

fn share_host(cfg: &config::ServerConfig) -> String {
    if let Some(h) = &cfg.public_host {
        return h.clone();
    }
    match cfg.listen.first() {
        Some(a) if !a.ip().is_unspecified() => a.ip().to_string(),
        _ => guess_public_host(),
    }
}

fn links(path: &Path) -> Result<(), RunError> {
    let cfg = match config::load(path)? {
        Config::Server(s) => s,
        Config::Client(c) => {
            let link = share_link::ShareLink::for_client(&c).ok_or_else(|| {
                RunError::Other(format!(
                    "{}: \"server\" {:?} is not host:port",
                    path.display(),
                    c.server
                ))
            })?;
            println!("{link}");
            return Ok(());
        }
    };
    let host = share_host(&cfg);
    let users = server::list_users_offline(&cfg)?;
    if cfg.public_host.is_none() {
        eprintln!(
            "note: \"public_host\" is not set; using {host}. Set it in {} if clients reach this server by another address.",
            path.display()
        );
    }
    for (key, name) in users {
        let tcp_port = cfg.public_tcp_carrier_port();
        let link = share_link::format(&key, &host, cfg.tunnel_port(), tcp_port);
        match name {
            Some(n) => println!("{link}  # {n}"),
            None => println!("{link}"),
        }
    }
    Ok(())
}

/// Prints router mode's rules for the client config at `path`; the server's name (if it is
/// one) is resolved now, so that its addresses can be left out of the capture.
fn router_rules(path: &Path, flavor: RulesFlavor) -> Result<(), RunError> {
    let cfg = match config::load(path)? {
        Config::Client(c) => c,
        Config::Server(_) => {
            return Err(RunError::Other(format!(
                "{}: --router-rules needs a client config (router mode runs the client)",
                path.display()
            )));
        }
    };
    let redir = cfg.redir.clone().unwrap_or(config::RedirConfig {
        enabled: false,
        bind: config::DEFAULT_REDIR_BIND.to_string(),
        interfaces: None,
    });
    if !redir.enabled {
        eprintln!(
            "note: \"redir\": {{\"enabled\": true}} is not set in {}: the client does not listen for \
             these rules until it is",
            path.display()
        );
    }
    let port = redir.bind_addr().map_or(1090, |a| a.port());
    let (host, server_port) = cfg.server_host_port().unwrap_or_default();
    let server_addrs: Vec<std::net::IpAddr> = match host.parse() {
        Ok(ip) => vec![ip],
        Err(_) => {
            let mut addrs: Vec<std::net::IpAddr> = crate::tunnel::resolver::resolve_all(
                &host,
                server_port,
            )
            .map_err(|e| {
                RunError::Other(format!(
                    "cannot resolve the server name {host:?} ({e}); the rules must leave the \
                         server's addresses alone, so they need them"
                ))
            })?
            .into_iter()
            .map(|a| a.ip())
            .collect();
            addrs.sort();
            addrs.dedup();
            addrs
        }
    };
    let rules = RouterRules {
        port,
        interfaces: redir.lan_interfaces(),
        server_host: host,
        server_addrs,
        source: path.display().to_string(),
        exclude: cfg
            .exclude
            .matcher()
            .map(|m| {
                m.ranges()
                    .iter()
                    .map(|r| {
                        let (ip, prefix) = r.network();
                        format!("{ip}/{prefix}")
                    })
                    .collect()
            })
            .unwrap_or_default(),
    };
    print!("{}", rules.render(flavor));
    Ok(())
}

fn check(path: &Path) -> Result<(), RunError> {
    let cfg = config::load(path)?;
    println!("{}: OK", path.display());
    match cfg {
        Config::Server(s) => {
            println!("  mode:        server");
            let listen: Vec<String> = s.listen.iter().map(|a| a.to_string()).collect();
            println!("  listen:      {} (UDP)", listen.join(", "));
            println!("  access keys: {} in the config", s.access_keys.len());
            for k in s.access_keys.iter().take(5) {
                let limit = k
                    .limit_bytes
                    .map(|l| format!("limit {l} bytes"))
                    .unwrap_or_else(|| "no limit".into());
                println!(
                    "               {} {} ({limit})",
                    keys::mask(&k.key),
                    k.name.as_deref().unwrap_or("")
                );
            }
            if s.access_keys.len() > 5 {
                println!("               … and {} more", s.access_keys.len() - 5);
            }
            if s.api.enabled {
                let auth = if s.api.token.is_empty() {
                    "OPEN (no token; loopback only)".to_string()
                } else {
                    format!("token {}", keys::mask(&s.api.token))
                };
                println!("  api:         http://{} — {auth}", s.api.bind);
            } else {
                println!("  api:         disabled");
            }
            println!(
                "  public_host: {}",
                s.public_host
                    .as_deref()
                    .unwrap_or("(not set: taken from each API request's Host header)")
            );
            let state = if s.state_file.exists() {
                "exists"
            } else {
                "will be created"
            };
            println!("  state file:  {} ({state})", s.state_file.display());
            println!("  log level:   {}", s.log_level);
            println!(
                "  sessions:    at most {} in all, {} per user",
                s.max_sessions, s.max_sessions_per_user
            );
            println!(
                "  private destinations: {}",
                if s.allow_private_destinations {
                    "allowed"
                } else {
                    "refused (default)"
                }
            );
        }
        Config::Client(c) => {
            println!("  mode:        client");
            println!("  server:      {}", c.server);
            println!("  access key:  {}", keys::mask(&c.access_key));
            println!("  proxy:       {} (SOCKS5 and HTTP)", c.socks5_bind);
            println!("  sessions:    {}", c.session_count());
            if let Some(r) = c.redir.as_ref().filter(|r| r.enabled) {
                println!(
                    "  router mode: {} for {} (rules: ostp --router-rules)",
                    r.bind,
                    r.lan_interfaces().join(", ")
                );
            }
            if c.tun.enable {
                println!(
                    "  TUN mode:    device {} (needs root or CAP_NET_ADMIN), DNS to {}, kill switch {}",
                    c.tun.name.as_deref().unwrap_or("ostp0"),
                    c.tun.dns,
                    if c.tun.kill_switch == Some(true) {
                        "on"
                    } else {
                        "off"
                    }
                );
            }
            if c.turn.enabled {
                println!(
                    "  WARNING:     turn is not supported by this build; the client will refuse to start"
                );
            }
        }
    }
    Ok(())
}
