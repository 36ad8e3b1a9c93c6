//! The command line of the real `ostp` binary: every command, the first-run config, and that every
//! misuse prints a clear message and exits non-zero.

use crate::support::tunnel::TempDir;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "c8a6fde902b4e23910cde882b7cf1612";

fn ostp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ostp"))
}

fn run_in(dir: &Path, args: &[&str]) -> Output {
    ostp()
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("run ostp")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn version_and_help() {
    let d = TempDir::new("version");
    let out = run_in(&d.0, &["--version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("ostp {}", env!("CARGO_PKG_VERSION"))
    );
    let out = run_in(&d.0, &["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for word in [
        "--config",
        "--init",
        "--check",
        "--generate-key",
        "--links",
        "--subscribe",
        "ostp://",
    ] {
        assert!(help.contains(word), "help lacks {word}");
    }
}

#[test]
fn generate_key_prints_fresh_valid_keys() {
    let d = TempDir::new("genkey");
    let out = run_in(&d.0, &["--generate-key", "-c", "5"]);
    assert!(out.status.success());
    let keys: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(keys.len(), 5);
    for k in &keys {
        assert_eq!(k.len(), 32);
        assert!(
            k.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
    }
    let mut unique = keys.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5);
    assert_eq!(
        text(&run_in(&d.0, &["--generate-key"]).stdout)
            .lines()
            .count(),
        1
    );
}

#[test]
fn misuse_is_a_clear_error_with_nonzero_exit() {
    let d = TempDir::new("misuse");
    for args in [
        &["--bogus"][..],
        &["--init"],
        &["--init", "relay"],
        &["--generate-key", "-c", "0"],
        &["--check", "--links"],
        &["stray-argument"],
        &["--config"],
        &["--force"],
    ] {
        let out = run_in(&d.0, args);
        assert!(!out.status.success(), "{args:?} must fail");
        let err = text(&out.stderr);
        assert!(err.starts_with("ostp: "), "{args:?}: {err}");
        assert!(
            err.contains("--help"),
            "{args:?} should point at --help: {err}"
        );
    }
    // A missing explicit config file is an error that says how to create one.
    let out = run_in(&d.0, &["--config", "nope.json"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--init"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !d.0.join("nope.json").exists(),
        "an explicit missing config must not be created"
    );
}

#[test]
fn init_never_overwrites_without_force_and_writes_valid_configs() {
    let d = TempDir::new("init");
    let out = run_in(&d.0, &["--init", "server", "--config", "s.json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = std::fs::read_to_string(d.0.join("s.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(v["mode"], "server");
    assert_eq!(v["api"]["bind"], "127.0.0.1:9090");
    assert_eq!(v["api"]["token"].as_str().unwrap().len(), 64);

    let out = run_in(&d.0, &["--init", "server", "--config", "s.json"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--force"));
    assert_eq!(
        std::fs::read_to_string(d.0.join("s.json")).unwrap(),
        first,
        "file must be untouched"
    );

    let out = run_in(&d.0, &["--init", "server", "--config", "s.json", "--force"]);
    assert!(out.status.success());
    assert_ne!(
        std::fs::read_to_string(d.0.join("s.json")).unwrap(),
        first,
        "--force writes a fresh config"
    );

    let link = format!("ostp://{KEY}@[2001:db8::7]:443");
    let out = run_in(&d.0, &["--init", "client", &link, "--config", "c.json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.0.join("c.json")).unwrap()).unwrap();
    assert_eq!(c["mode"], "client");
    assert_eq!(c["server"], "[2001:db8::7]:443");
    assert_eq!(c["access_key"], KEY);
    let out = run_in(&d.0, &["--check", "--config", "c.json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A link's carrier goes into the config; an unknown one is refused, nothing written.
    let link = format!("ostp://{KEY}@example.com:443?type=uot");
    let out = run_in(&d.0, &["--init", "client", &link, "--config", "u.json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.0.join("u.json")).unwrap()).unwrap();
    assert_eq!(c["transport"], serde_json::json!({"mode": "uot"}));
    let link = format!("ostp://{KEY}@example.com:443?type=grpc");
    let out = run_in(&d.0, &["--init", "client", &link, "--config", "g.json"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("\"grpc\""),
        "{}",
        text(&out.stderr)
    );
    assert!(!d.0.join("g.json").exists());
}

#[test]
fn check_summarises_and_reports_field_errors() {
    let d = TempDir::new("check");
    std::fs::write(
        d.0.join("config.json"),
        format!(
            r#"{{"mode":"server","listen":["0.0.0.0:5000","[::]:5000"],"access_keys":["{KEY}"],
               "api":{{"enabled":true,"bind":"127.0.0.1:9999","token":"secret-token-value"}}}}"#
        ),
    )
    .unwrap();
    let out = run_in(&d.0, &["--check"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(s.contains("0.0.0.0:5000") && s.contains("[::]:5000"), "{s}");
    assert!(s.contains("c8a6fde9…"), "key must be masked: {s}");
    assert!(!s.contains(KEY), "the full key must not be printed: {s}");
    assert!(
        !s.contains("secret-token-value"),
        "the token must not be printed: {s}"
    );

    std::fs::write(
        d.0.join("bad.json"),
        r#"{"mode":"server","api":{"bind":"nowhere"}}"#,
    )
    .unwrap();
    let out = run_in(&d.0, &["--check", "--config", "bad.json"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.json") && err.contains("api.bind"),
        "{err}"
    );

    std::fs::write(
        d.0.join("typo.json"),
        r#"{"mode":"server","lisen":"0.0.0.0:1"}"#,
    )
    .unwrap();
    let err = text(&run_in(&d.0, &["--check", "--config", "typo.json"]).stderr);
    assert!(
        err.contains("`lisen`") && err.contains("unknown field"),
        "{err}"
    );

    std::fs::write(
        d.0.join("open.json"),
        r#"{"mode":"server","api":{"enabled":true,"bind":"0.0.0.0:9090","token":""}}"#,
    )
    .unwrap();
    let err = text(&run_in(&d.0, &["--check", "--config", "open.json"]).stderr);
    assert!(
        err.contains("api.token") && err.contains("loopback"),
        "{err}"
    );
}

#[test]
fn links_cover_config_keys_with_public_host() {
    let d = TempDir::new("links");
    std::fs::write(
        d.0.join("config.json"),
        format!(
            r#"{{"mode":"server","listen":"0.0.0.0:50123","public_host":"vpn.example.com",
               "access_keys":[{{"key":"{KEY}","name":"alice"}},"0123456789abcdef0123"]}}"#
        ),
    )
    .unwrap();
    let out = run_in(&d.0, &["--links"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(
        s.contains(&format!("ostp://{KEY}@vpn.example.com:50123  # alice")),
        "{s}"
    );
    assert!(
        s.contains("ostp://0123456789abcdef0123@vpn.example.com:50123"),
        "{s}"
    );
}

#[test]
fn links_of_a_client_config_carry_its_carrier() {
    let d = TempDir::new("client-links");
    std::fs::write(
        d.0.join("config.json"),
        format!(
            r#"{{"mode":"client","server":"vpn.example.com:50123","access_key":"{KEY}",
               "socks5_bind":"127.0.0.1:1080","transport":{{"mode":"uot","tcp_port":443}}}}"#
        ),
    )
    .unwrap();
    let out = run_in(&d.0, &["--links"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("ostp://{KEY}@vpn.example.com:50123?type=uot&tcp_port=443")
    );
}

#[test]
fn unsupported_client_features_refuse_to_start() {
    let d = TempDir::new("turn");
    std::fs::write(
        d.0.join("c.json"),
        format!(r#"{{"mode":"client","server":"127.0.0.1:9","access_key":"{KEY}","socks5_bind":"127.0.0.1:0","turn":{{"enabled":true}}}}"#),
    )
    .unwrap();
    let out = run_in(&d.0, &["--config", "c.json"]);
    assert_eq!(out.status.code(), Some(78), "a config error");
    let err = text(&out.stderr);
    assert!(
        err.contains("not supported by this build") && err.contains("turn.enabled"),
        "{err}"
    );
}

/// `ostp` with no config.json writes one, says so, prints the share link, and runs a server whose
/// API answers with the generated token.
#[test]
fn first_run_creates_a_server_config_and_runs() {
    let d = TempDir::new("first");
    let mut child = ostp()
        .current_dir(&d.0)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    let mut link = None;
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        seen.push_str(&line);
        seen.push('\n');
        if let Some(pos) = line.find("ostp://") {
            link = Some(line[pos..].trim().trim_matches('"').to_string());
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.contains("config.json"),
        "must say it wrote config.json: {seen}"
    );
    let link = link.unwrap_or_else(|| panic!("no share link printed: {seen}"));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.0.join("config.json")).unwrap()).unwrap();
    let key = cfg["access_keys"][0].as_str().unwrap();
    assert!(link.starts_with(&format!("ostp://{key}@")), "{link}");
    assert!(link.ends_with(":50000?tcp_port=50000"), "{link}"); // TCP on the same port: auto
    assert_eq!(cfg["api"]["bind"], "127.0.0.1:9090");
    // A second start must reuse the file, not overwrite it.
    let before = std::fs::read_to_string(d.0.join("config.json")).unwrap();
    let out = run_in(&d.0, &["--check"]);
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(d.0.join("config.json")).unwrap(),
        before
    );
}

/// Exit codes a service manager relies on: 78 (EX_CONFIG) for every config-file problem, so that
/// `RestartPreventExitStatus=78` stops a restart loop; 2 for command-line mistakes; 1 otherwise.
#[test]
fn config_errors_exit_78_usage_errors_2_other_failures_1() {
    let d = TempDir::new("exitcodes");
    std::fs::write(d.0.join("broken.json"), r#"{"mode":"server","#).unwrap();
    std::fs::write(
        d.0.join("invalid.json"),
        r#"{"mode":"server","api":{"bind":"nowhere"}}"#,
    )
    .unwrap();
    std::fs::write(
        d.0.join("open-proxy.json"),
        format!(r#"{{"mode":"client","server":"127.0.0.1:9","access_key":"{KEY}","socks5_bind":"0.0.0.0:0"}}"#),
    )
    .unwrap();
    // A directory cannot be read as a file (chmod would not stop root).
    std::fs::create_dir(d.0.join("dir.json")).unwrap();
    for args in [
        &["--config", "broken.json"][..],
        &["--config", "invalid.json"],
        &["--check", "--config", "invalid.json"],
        &["--links", "--config", "broken.json"],
        &["--config", "missing.json"],
        &["--config", "dir.json"],
        &["--config", "open-proxy.json"],
    ] {
        let out = run_in(&d.0, args);
        assert_eq!(
            out.status.code(),
            Some(78),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(text(&out.stderr).starts_with("ostp: "), "{args:?}");
    }
    for args in [&["--bogus"][..], &["--config"], &["--check", "--links"]] {
        assert_eq!(run_in(&d.0, args).status.code(), Some(2), "{args:?}");
    }
    // Not a config problem: --init refusing to overwrite.
    let out = run_in(&d.0, &["--init", "server", "--config", "broken.json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
}
