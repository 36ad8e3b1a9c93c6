//! Command-line parsing: turns `argv` into a [`Command`]. Every misuse is a [`UsageError`] with
//! a message that says what to type instead; `main` prints it and exits with [`EXIT_USAGE`].

use std::fmt;
use std::path::PathBuf;

/// The default config file, in the working directory.
pub const DEFAULT_CONFIG: &str = "config.json";

/// What kind of config `--init` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitKind {
    Server,
    Client,
}

/// One invocation of `ostp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the config (`explicit` = `--config` was given; otherwise a missing `config.json` is
    /// created as a fresh server config).
    Run {
        config: PathBuf,
        explicit: bool,
    },
    /// Run a client straight from an `ostp://` share link.
    RunLink {
        link: String,
        socks5_bind: Option<String>,
    },
    /// Fetch a subscribe endpoint's client config and run it.
    Subscribe {
        url: String,
        socks5_bind: Option<String>,
    },
    /// Write a fresh config.
    Init {
        kind: InitKind,
        config: PathBuf,
        force: bool,
        link: Option<String>,
    },
    /// Validate the config and print a summary.
    Check {
        config: PathBuf,
    },
    /// Print fresh access keys.
    GenerateKey {
        count: u32,
    },
    /// Print a share link per user.
    Links {
        config: PathBuf,
    },
    /// Print router mode's nftables rules (or its policy routing) for the client config.
    RouterRules {
        config: PathBuf,
        flavor: crate::tunnel::router_rules::Flavor,
    },
    /// Open N idle sessions with the client config (benchmarks).
    BenchIdleSessions {
        config: PathBuf,
        sessions: u32,
    },
    Version,
    Help,
}

/// Exit code of a command-line mistake (a [`UsageError`]).
pub const EXIT_USAGE: u8 = 2;

/// A command-line mistake (exit code [`EXIT_USAGE`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\nRun `ostp --help` for usage.", self.0)
    }
}

impl std::error::Error for UsageError {}

/// The `--help` text.
pub fn help_text() -> String {
    format!(
        "ostp {version} — a small, fast OSTP tunnel (server, or a local SOCKS5/HTTP proxy client)

USAGE:
    ostp [--config PATH]              run the config (server or client). With no config.json in the
                                      working directory, writes a fresh server config there and runs it
    ostp ostp://KEY@HOST:PORT         run a client from a share link [--socks5-bind ADDR]
    ostp --subscribe URL              fetch a subscribe URL's client config and run it [--socks5-bind ADDR]
    ostp --init server|client [LINK]  write a fresh config (to --config PATH or config.json); never
                                      overwrites without --force. A client config can start from a share link
    ostp --check [--config PATH]      validate the config and print a summary
    ostp --links [--config PATH]      print a share link per user
    ostp --router-rules [nft|fw4|routing] [--config PATH]
                                      print router mode's nftables rules for the client config
                                      (nft: a standalone table, fw4: an OpenWrt /etc/nftables.d/
                                      include) or the policy routing they need (routing)
    ostp --generate-key [-c N]        print N fresh access keys (default 1)
    ostp --version | --help

OPTIONS:
    -c, --config PATH    config file (default: ./config.json); with --generate-key, -c N is a count
    --force              let --init overwrite an existing file
    --socks5-bind ADDR   local proxy address for a link/subscribe client (default 127.0.0.1:1088)

SIGNALS (server):
    SIGHUP reloads config.json (keys, names, limits, log level); SIGTERM/SIGINT flush counters and exit.

ENVIRONMENT:
    RUST_LOG=debug       overrides the config's log_level
",
        version = env!("CARGO_PKG_VERSION")
    )
}

fn usage<T>(msg: impl Into<String>) -> Result<T, UsageError> {
    Err(UsageError(msg.into()))
}

/// Parses the arguments after the program name.
pub fn parse<I, S>(args: I) -> Result<Command, UsageError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let args: Vec<String> = args.into_iter().map(Into::into).collect();
    let mut config: Option<PathBuf> = None;
    let mut action: Option<&'static str> = None;
    let mut init_kind: Option<InitKind> = None;
    let mut force = false;
    let mut count: Option<u32> = None;
    let mut link: Option<String> = None;
    let mut url: Option<String> = None;
    let mut socks5_bind: Option<String> = None;
    let mut bench_sessions: Option<u32> = None;
    let mut flavor = crate::tunnel::router_rules::Flavor::Nftables;

    let set_action = |a: &'static str, action: &mut Option<&'static str>| {
        if let Some(prev) = action
            && *prev != a
        {
            return usage(format!("--{prev} and --{a} cannot be used together"));
        }
        *action = Some(a);
        Ok(())
    };

    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        let mut value = |name: &str| -> Result<String, UsageError> {
            i += 1;
            match args.get(i) {
                Some(v) if !v.starts_with("--") => Ok(v.clone()),
                _ => usage(format!("{name} needs a value")),
            }
        };
        match arg {
            "-h" | "--help" => set_action("help", &mut action)?,
            "-V" | "--version" => set_action("version", &mut action)?,
            "--check" => set_action("check", &mut action)?,
            "--links" => set_action("links", &mut action)?,
            "--generate-key" => set_action("generate-key", &mut action)?,
            "--router-rules" => {
                set_action("router-rules", &mut action)?;
                // An optional flavour follows.
                if let Some(next) = args.get(i + 1).filter(|a| !a.starts_with('-')) {
                    flavor = crate::tunnel::router_rules::Flavor::parse(next).ok_or_else(|| {
                        UsageError(format!(
                            "--router-rules takes nft, fw4 or routing, not {next:?}"
                        ))
                    })?;
                    i += 1;
                }
            }
            "--force" => force = true,
            "--init" => {
                set_action("init", &mut action)?;
                let kind = value("--init")?;
                init_kind = Some(match kind.as_str() {
                    "server" => InitKind::Server,
                    "client" => InitKind::Client,
                    other => {
                        return usage(format!("--init takes `server` or `client`, not {other:?}"));
                    }
                });
            }
            "--subscribe" => {
                set_action("subscribe", &mut action)?;
                url = Some(value("--subscribe")?);
            }
            "--socks5-bind" => socks5_bind = Some(value("--socks5-bind")?),
            "--bench-idle-sessions" => {
                set_action("bench-idle-sessions", &mut action)?;
                let v = value("--bench-idle-sessions")?;
                bench_sessions = Some(v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    UsageError(format!(
                        "--bench-idle-sessions takes a positive number, not {v:?}"
                    ))
                })?);
            }
            "--config" => {
                if config.is_some() {
                    return usage("--config is given twice");
                }
                config = Some(PathBuf::from(value("--config")?));
            }
            "-c" => {
                // `-c N` is a count after --generate-key, a config path otherwise.
                let v = value("-c")?;
                if action == Some("generate-key") {
                    count = Some(parse_count(&v)?);
                } else if config.is_none() {
                    config = Some(PathBuf::from(v));
                } else {
                    return usage("--config is given twice");
                }
            }
            "--count" | "-n" => count = Some(parse_count(&value(arg)?)?),
            s if s.starts_with("ostp://") => {
                if link.is_some() {
                    return usage("only one share link can be given");
                }
                link = Some(s.to_string());
            }
            s if s.starts_with('-') => {
                return usage(format!("unknown option {s:?}"));
            }
            s => {
                return usage(format!(
                    "unexpected argument {s:?} (a share link starts with ostp://; a config file needs --config)"
                ));
            }
        }
        i += 1;
    }

    let config_path = || {
        config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
    };
    let no_extras = |what: &str| -> Result<(), UsageError> {
        if force {
            return usage(format!("--force only applies to --init, not {what}"));
        }
        if count.is_some() {
            return usage(format!(
                "a count only applies to --generate-key, not {what}"
            ));
        }
        Ok(())
    };
    let cmd = match action {
        Some("help") => Command::Help,
        Some("version") => Command::Version,
        Some("check") => {
            no_extras("--check")?;
            Command::Check {
                config: config_path(),
            }
        }
        Some("links") => {
            no_extras("--links")?;
            Command::Links {
                config: config_path(),
            }
        }
        Some("router-rules") => {
            no_extras("--router-rules")?;
            Command::RouterRules {
                config: config_path(),
                flavor,
            }
        }
        Some("generate-key") => {
            let n = count.unwrap_or(1);
            Command::GenerateKey { count: n }
        }
        Some("init") => {
            let kind = init_kind.unwrap_or(InitKind::Server);
            if link.is_some() && kind == InitKind::Server {
                return usage("a share link only makes sense with --init client");
            }
            Command::Init {
                kind,
                config: config_path(),
                force,
                link: link.clone(),
            }
        }
        Some("subscribe") => {
            no_extras("--subscribe")?;
            Command::Subscribe {
                url: url.clone().unwrap_or_default(),
                socks5_bind: socks5_bind.clone(),
            }
        }
        Some("bench-idle-sessions") => Command::BenchIdleSessions {
            config: config_path(),
            sessions: bench_sessions.unwrap_or(1),
        },
        _ => {
            no_extras("running")?;
            match link.clone() {
                Some(link) => {
                    if config.is_some() {
                        return usage("give either a share link or --config, not both");
                    }
                    Command::RunLink {
                        link,
                        socks5_bind: socks5_bind.clone(),
                    }
                }
                None => Command::Run {
                    config: config_path(),
                    explicit: config.is_some(),
                },
            }
        }
    };
    let link_allowed = matches!(cmd, Command::RunLink { .. } | Command::Init { .. });
    if link.is_some() && !link_allowed {
        return usage("a share link cannot be combined with that option");
    }
    let bind_allowed = matches!(cmd, Command::RunLink { .. } | Command::Subscribe { .. });
    if socks5_bind.is_some() && !bind_allowed {
        return usage("--socks5-bind only applies to a share link or --subscribe");
    }
    Ok(cmd)
}

fn parse_count(v: &str) -> Result<u32, UsageError> {
    v.parse::<u32>()
        .ok()
        .filter(|n| (1..=10_000).contains(n))
        .ok_or_else(|| {
            UsageError(format!(
                "the count must be a number from 1 to 10000, not {v:?}"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, UsageError> {
        parse(args.iter().copied())
    }

    #[test]
    fn default_runs_config_json() {
        assert_eq!(
            p(&[]).unwrap(),
            Command::Run {
                config: "config.json".into(),
                explicit: false
            }
        );
        assert_eq!(
            p(&["--config", "/etc/ostp.json"]).unwrap(),
            Command::Run {
                config: "/etc/ostp.json".into(),
                explicit: true
            }
        );
    }

    #[test]
    fn actions_and_options() {
        assert_eq!(
            p(&["--generate-key"]).unwrap(),
            Command::GenerateKey { count: 1 }
        );
        assert_eq!(
            p(&["--generate-key", "-c", "5"]).unwrap(),
            Command::GenerateKey { count: 5 }
        );
        assert_eq!(
            p(&["--init", "client", "--force", "--config", "c.json"]).unwrap(),
            Command::Init {
                kind: InitKind::Client,
                config: "c.json".into(),
                force: true,
                link: None
            }
        );
        assert_eq!(
            p(&["--check", "-c", "x.json"]).unwrap(),
            Command::Check {
                config: "x.json".into()
            }
        );
        assert_eq!(p(&["--version"]).unwrap(), Command::Version);
        use crate::tunnel::router_rules::Flavor;
        assert_eq!(
            p(&["--router-rules", "-c", "c.json"]).unwrap(),
            Command::RouterRules {
                config: "c.json".into(),
                flavor: Flavor::Nftables
            }
        );
        assert_eq!(
            p(&["--router-rules", "fw4"]).unwrap(),
            Command::RouterRules {
                config: "config.json".into(),
                flavor: Flavor::Fw4
            }
        );
        assert_eq!(
            p(&["--config", "c.json", "--router-rules", "routing"]).unwrap(),
            Command::RouterRules {
                config: "c.json".into(),
                flavor: Flavor::Routing
            }
        );
        assert!(matches!(
            p(&["ostp://k@h:1"]).unwrap(),
            Command::RunLink { .. }
        ));
        assert!(matches!(
            p(&["--subscribe", "http://h/api/subscribe/k"]).unwrap(),
            Command::Subscribe { .. }
        ));
    }

    #[test]
    fn misuse_is_an_error() {
        for bad in [
            &["--bogus"][..],
            &["--init"],
            &["--init", "relay"],
            &["--generate-key", "-c", "0"],
            &["--generate-key", "-c", "x"],
            &["--check", "--links"],
            &["--config"],
            &["--config", "a", "--config", "b"],
            &["stray"],
            &["--force"],
            &["--check", "--force"],
            &["--init", "server", "ostp://k@h:1"],
            &["--socks5-bind", "127.0.0.1:1"],
            &["--subscribe"],
            &["--router-rules", "iptables"],
            &["--router-rules", "fw4", "--force"],
        ] {
            assert!(p(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
