//! Logging set-up: `log` + `simple_logger` to stderr. The level comes from `RUST_LOG` when it
//! names a level, else from the config; it can be changed at run time (SIGHUP reload).

use log::LevelFilter;

/// The level `RUST_LOG` asks for, if it names one (`info`, `debug`, ...).
pub fn env_level() -> Option<LevelFilter> {
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| crate::config::parse_level(&v))
}

/// Installs the logger once. Later calls only change the level.
pub fn init(level: LevelFilter) {
    let effective = env_level().unwrap_or(level);
    // The logger itself lets everything through; `log::set_max_level` is the one filter, so a
    // reload can lower or raise it.
    let _ = simple_logger::SimpleLogger::new()
        .with_level(LevelFilter::Trace)
        .with_module_level("tiny_http", LevelFilter::Warn)
        .with_module_level("mio", LevelFilter::Warn)
        .init();
    log::set_max_level(effective);
}

/// Applies a reloaded config's level (unless `RUST_LOG` pins it).
pub fn set_level(level: LevelFilter) {
    log::set_max_level(env_level().unwrap_or(level));
}
