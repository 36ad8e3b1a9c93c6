//! The service files in `dist/`: the systemd units pass `systemd-analyze verify` (pointed at the
//! built binary), keep their hardening, and do not restart on the binary's config-error exit code;
//! the sysusers file creates their user; the OpenWrt init script is valid shell and asks procd for
//! the right instance; the UCI file parses; the package Makefile matches the crate.
//!
//! Nothing here can start the units under systemd or the package under procd (no init system in
//! CI): what runs is everything short of that.

use crate::support::tunnel::TempDir;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (.ci/run installs it)"))
}

/// The unit files in `dist/systemd/`, by file name.
fn units() -> Vec<(String, String)> {
    let mut units: Vec<(String, String)> = std::fs::read_dir(repo().join("dist/systemd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    units.sort();
    assert!(
        units.iter().any(|(n, _)| n == "ostp.service")
            && units.iter().any(|(n, _)| n.starts_with("ostp-client")),
        "a server and a client unit: {units:?}"
    );
    units
}

/// `[Service]` settings of a unit (the last assignment of each key wins, as in systemd).
fn service_section(unit: &str) -> BTreeMap<String, String> {
    let mut section = "";
    let mut map = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]"
            && !line.is_empty()
            && !line.starts_with('#')
            && let Some((k, v)) = line.split_once('=')
        {
            map.insert(k.to_string(), v.to_string());
        }
    }
    map
}

/// Writes `unit` into `dir` with the installed binary path replaced by the one cargo built (verify
/// checks that ExecStart exists and is executable).
fn unit_copy(dir: &Path, name: &str, unit: &str) -> PathBuf {
    assert!(
        unit.contains("\nExecStart=/usr/bin/ostp "),
        "{name}: ExecStart must be /usr/bin/ostp"
    );
    let path = dir.join(name);
    let unit = unit.replace(
        "=/usr/bin/ostp ",
        &format!("={} ", env!("CARGO_BIN_EXE_ostp")),
    );
    std::fs::write(&path, unit).unwrap();
    path
}

fn verify(unit: &Path) -> Output {
    run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(unit)
        .current_dir(unit.parent().unwrap()))
}

#[test]
fn systemd_units_verify_without_warnings() {
    let d = TempDir::new("verify");
    for (name, unit) in units() {
        let out = verify(&unit_copy(&d.0, &name, &unit));
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{name}: {}",
            text(&out.stderr)
        );
        // The documented setting for ports below 1024 is valid too.
        let low_ports = unit
            .replace(
                "\nCapabilityBoundingSet=\n",
                "\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\n",
            )
            .replace(
                "\nAmbientCapabilities=\n",
                "\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n",
            );
        assert!(
            unit.contains("#   CapabilityBoundingSet=CAP_NET_BIND_SERVICE")
                && unit.contains("#   AmbientCapabilities=CAP_NET_BIND_SERVICE")
                && low_ports != unit,
            "{name}: documents CAP_NET_BIND_SERVICE for ports < 1024"
        );
        let out = verify(&unit_copy(&d.0, &name, &low_ports));
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{name} with CAP_NET_BIND_SERVICE: {}",
            text(&out.stderr)
        );
    }
    // The check has teeth: a misspelt key is reported (systemd only warns, exit code 0).
    let (name, unit) = &units()[0];
    let out = verify(&unit_copy(
        &d.0,
        name,
        &unit.replace("ProtectHome=", "ProtectHom="),
    ));
    assert!(text(&out.stderr).contains("ProtectHom"), "{out:?}");
}

/// The exit code of the real binary for a config file that is not JSON.
fn config_error_exit_code(dir: &Path) -> i32 {
    let bad = dir.join("broken.json");
    std::fs::write(&bad, "{ not json").unwrap();
    let out = run(Command::new(env!("CARGO_BIN_EXE_ostp"))
        .arg("--config")
        .arg(&bad)
        .env_remove("RUST_LOG"));
    out.status.code().expect("exit code")
}

#[test]
fn systemd_units_are_hardened_and_do_not_restart_on_config_errors() {
    let d = TempDir::new("hardening");
    let config_error = config_error_exit_code(&d.0);
    assert_ne!(config_error, 1, "config errors need their own exit code");
    for (name, unit) in units() {
        let s = service_section(&unit);
        let expect = [
            ("User", "ostp"),
            ("StateDirectory", "ostp"),
            ("ConfigurationDirectory", "ostp"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("CapabilityBoundingSet", ""),
            ("AmbientCapabilities", ""),
            ("ExecReload", "/bin/kill -HUP $MAINPID"),
            ("Restart", "on-failure"),
        ];
        for (key, value) in expect {
            assert_eq!(s.get(key).map(String::as_str), Some(value), "{name}: {key}");
        }
        assert_eq!(
            s.get("RestartPreventExitStatus"),
            Some(&config_error.to_string()),
            "{name}: the binary's config-error exit code stops restarts"
        );
        assert!(s["ExecStart"].contains("--config /etc/ostp/"), "{name}");
        // systemd's own scoring of the sandbox: exposure at most 2.5 of 10 ("OK").
        let copy = unit_copy(&d.0, &name, &unit);
        let out = run(Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=25", "--no-pager"])
            .arg(&copy)
            .current_dir(&d.0));
        assert!(out.status.success(), "{name}: {}", text(&out.stdout));
    }
}

#[test]
fn sysusers_file_creates_the_units_user() {
    let d = TempDir::new("sysusers");
    std::fs::create_dir_all(d.0.join("etc")).unwrap();
    let out = run(Command::new("systemd-sysusers")
        .arg(format!("--root={}", d.0.display()))
        .arg(repo().join("dist/systemd/ostp.sysusers")));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let passwd = std::fs::read_to_string(d.0.join("etc/passwd")).unwrap();
    let entry = passwd
        .lines()
        .find(|l| l.starts_with("ostp:"))
        .unwrap_or_else(|| panic!("no ostp user: {passwd}"));
    assert!(entry.contains(":/var/lib/ostp:"), "{entry}");
    let group = std::fs::read_to_string(d.0.join("etc/group")).unwrap();
    assert!(group.lines().any(|l| l.starts_with("ostp:")), "{group}");
}

fn openwrt(file: &str) -> PathBuf {
    repo().join("dist/openwrt/ostp").join(file)
}

#[test]
fn openwrt_init_script_is_valid_shell() {
    let init = openwrt("files/ostp.init");
    let out = run(Command::new("sh").arg("-n").arg(&init));
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The script names its dialect (busybox ash is closest to dash) for shellcheck.
    let out = run(Command::new("shellcheck").arg(&init));
    assert!(out.status.success(), "{}", text(&out.stdout));
}

/// The UCI file as `(section type, section name, options)`; panics on anything that is not a
/// `config`/`option` line, a comment or blank.
fn parse_uci(text: &str) -> Vec<(String, String, BTreeMap<String, String>)> {
    let unquote = |s: &str| s.trim().trim_matches('\'').to_string();
    let mut sections: Vec<(String, String, BTreeMap<String, String>)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        match word {
            "config" => {
                let (kind, name) = rest.trim().split_once(' ').unwrap_or((rest, ""));
                sections.push((kind.to_string(), unquote(name), BTreeMap::new()));
            }
            "option" => {
                let (key, value) = rest.trim().split_once(char::is_whitespace).unwrap();
                let value = value.trim();
                assert!(
                    value.len() >= 2 && value.starts_with('\'') && value.ends_with('\''),
                    "unquoted value: {line}"
                );
                let section = sections.last_mut().expect("option before any config");
                section.2.insert(key.to_string(), unquote(value));
            }
            _ => panic!("not UCI: {line}"),
        }
    }
    sections
}

fn uci_main() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(openwrt("files/ostp.config")).unwrap();
    let sections = parse_uci(&text);
    assert_eq!(sections.len(), 1, "{sections:?}");
    let (kind, name, options) = sections.into_iter().next().unwrap();
    assert_eq!((kind.as_str(), name.as_str()), ("ostp", "main"));
    options
}

#[test]
fn openwrt_uci_config_parses() {
    let options = uci_main();
    assert!(
        matches!(options.get("enabled").map(String::as_str), Some("0" | "1")),
        "{options:?}"
    );
    assert_eq!(options["config"], "/etc/ostp/config.json");
    assert_eq!(options.len(), 2, "{options:?}");
}

/// Sources the init script with procd and UCI stubs (values from the UCI file, `enabled` and
/// `config` overridable) and prints what it asked procd for.
fn procd_calls(enabled: &str, config: &Path) -> String {
    let harness = r#"
config_load() { echo "config_load $*"; }
config_get_bool() {
    eval "v=\${UCI_$3:-$4}"
    case "$v" in 1|yes|on|true|enabled) v=1 ;; *) v=0 ;; esac
    eval "$1=\$v"
}
config_get() { eval "$1=\${UCI_$3:-\$4}"; }
logger() { echo "logger $*"; }
procd_open_instance() { echo "open $*"; }
procd_set_param() { echo "param $*"; }
procd_close_instance() { echo "close"; }
procd_send_signal() { echo "signal $*"; }
procd_add_reload_trigger() { echo "trigger $*"; }
. "$INIT"
start_service; echo "start_service $?"
reload_service
service_triggers
echo "PROG $PROG"
"#;
    let out = run(Command::new("sh")
        .args(["-u", "-c", harness])
        .env("INIT", openwrt("files/ostp.init"))
        .env("UCI_enabled", enabled)
        .env("UCI_config", config));
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn openwrt_init_script_asks_procd_for_a_respawned_instance_reloaded_by_sighup() {
    let d = TempDir::new("procd");
    let config = d.0.join("config.json");
    std::fs::write(&config, "{}").unwrap();
    let c = config.display();
    let calls = procd_calls("1", &config);
    for line in [
        "config_load ostp".to_string(),
        "open main".into(),
        format!("param command /usr/bin/ostp --config {c}"),
        "param respawn 3600 5 5".into(),
        format!("param file {c}"),
        "param reload_signal HUP".into(),
        "close".into(),
        "start_service 0".into(),
        "signal ostp main HUP".into(),
        "trigger ostp".into(),
        "PROG /usr/bin/ostp".into(),
    ] {
        assert!(calls.lines().any(|l| l == line), "no {line:?} in:\n{calls}");
    }
    // The shipped UCI value is read as a boolean; disabled means no instance.
    let shipped = uci_main()["enabled"].clone();
    let calls = procd_calls(&shipped, &config);
    assert_eq!(calls.contains("open main"), shipped == "1", "{calls}");
    let calls = procd_calls("0", &config);
    assert!(!calls.contains("open") && calls.contains("start_service 0"));
    // Enabled but no config file: no instance (it would exit 78 five times), a hint in the log.
    let calls = procd_calls("1", &d.0.join("missing.json"));
    assert!(!calls.contains("open"), "{calls}");
    assert!(
        calls.contains("logger") && calls.contains("--init server"),
        "{calls}"
    );
}

/// `[profile.release]` of Cargo.toml: `key = value` with quotes removed.
fn release_profile() -> BTreeMap<String, String> {
    let toml = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let start = toml.find("[profile.release]\n").expect("release profile");
    toml[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

#[test]
fn openwrt_makefile_keeps_the_release_profile_and_finds_the_source() {
    let d = TempDir::new("makefile");
    // Stand-ins for the OpenWrt tree: just enough for make to read the Makefile.
    let top = d.0.join("top");
    std::fs::create_dir_all(top.join("include")).unwrap();
    std::fs::create_dir_all(top.join("feeds/packages/lang/rust")).unwrap();
    std::fs::write(top.join("rules.mk"), "").unwrap();
    std::fs::write(top.join("include/package.mk"), "BuildPackage=\n").unwrap();
    std::fs::write(
        top.join("feeds/packages/lang/rust/rust-package.mk"),
        "CARGO_PKG_VARS=CARGO_PROFILE_RELEASE_OPT_LEVEL=z CARGO_PROFILE_RELEASE_PANIC=unwind\n\
         CARGO_PKG_PROFILE:=dev\n",
    )
    .unwrap();
    let show = "show:\n\t@echo 'VERSION=$(PKG_VERSION)'\n\t@echo 'SOURCE=$(OSTP_SOURCE_DIR)'\n\
                \t@echo 'PROFILE=$(CARGO_PKG_PROFILE)'\n\t@echo 'VARS=$(CARGO_PKG_VARS)'\n";
    std::fs::write(d.0.join("show.mk"), show).unwrap();
    let out = run(Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(openwrt(""))
        .arg("-f")
        .arg("Makefile")
        .arg("-f")
        .arg(d.0.join("show.mk"))
        .arg(format!("TOPDIR={}", top.display()))
        .arg(format!("INCLUDE_DIR={}", top.join("include").display()))
        .arg("show"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let vars: BTreeMap<String, String> = text(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(vars["VERSION"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        Path::new(&vars["SOURCE"]).canonicalize().unwrap(),
        repo().canonicalize().unwrap(),
        "the package builds the checkout it sits in"
    );
    assert_eq!(vars["PROFILE"], "release");
    // Later assignments on cargo's command line win: ours must come after the feed's.
    let profile = release_profile();
    let last = |key: &str| {
        vars["VARS"]
            .split_whitespace()
            .filter_map(|a| a.strip_prefix(&format!("CARGO_PROFILE_RELEASE_{key}=")))
            .next_back()
            .map(str::to_string)
    };
    assert_eq!(last("OPT_LEVEL"), profile.get("opt-level").cloned());
    assert_eq!(last("PANIC"), profile.get("panic").cloned());
    assert_eq!(last("CODEGEN_UNITS"), profile.get("codegen-units").cloned());
    // What Build/Prepare copies and the package installs exists.
    for f in ["Cargo.toml", "Cargo.lock", "LICENSE", "src", "benches"] {
        assert!(repo().join(f).exists(), "{f}");
    }
    for f in ["files/ostp.init", "files/ostp.config"] {
        assert!(openwrt(f).exists(), "{f}");
    }
}
