//! TUN mode's device and policy routing (`ostp::tunnel::tun::device`) in a network namespace of
//! its own (a test thread `unshare`s one; the `ip` commands it runs inherit it): the interface
//! gets its addresses, MTU and state, the TUN table its default routes and the two rules per
//! family are in place; after drop nothing is left; rules left by a killed run are removed at
//! the next start. Root only: CI runs as root.

use std::process::Command;

use ostp::tunnel::tun::device::{TunDevice, TunSettings, clean_leftovers};

/// Runs `f` on a thread in a fresh network namespace.
fn in_new_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare(2) with CLONE_NEWNET moves only this thread to a new network
            // namespace; it touches no memory of ours.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .unwrap()
    })
}

fn ip(args: &str) -> String {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Our rules as `ip rule` shows them (priority lines 20300/20301 of both families).
fn our_rules() -> String {
    let mut s = String::new();
    for fam in ["-4", "-6"] {
        for line in ip(&format!("{fam} rule show")).lines() {
            if line.starts_with("20300:") || line.starts_with("20301:") {
                s.push_str(fam);
                s.push(' ');
                s.push_str(line.trim());
                s.push('\n');
            }
        }
    }
    s
}

#[test]
fn the_device_and_its_policy_routing_come_and_go_with_it() {
    in_new_netns(|| {
        let settings = TunSettings {
            mtu: 1400,
            ..TunSettings::default()
        };
        let dev = TunDevice::create(&settings).expect("TUN device (needs root)");
        assert_eq!(dev.name(), "ostp0");
        let link = ip("addr show dev ostp0");
        assert!(link.contains("mtu 1400"), "{link}");
        assert!(link.contains(",UP"), "{link}");
        assert!(link.contains("inet 172.19.0.1/30"), "{link}");
        assert!(link.contains("inet6 fdfe:dcba:9876::1/126"), "{link}");
        assert!(ip("-4 route show table 20300").contains("default dev ostp0"));
        assert!(ip("-6 route show table 20300").contains("default dev ostp0"));
        let rules = our_rules();
        for expect in [
            "-4 20300:\tfrom all lookup main suppress_prefixlength 0",
            "-4 20301:\tnot from all fwmark 0x4f4c lookup 20300",
            "-6 20300:\tfrom all lookup main suppress_prefixlength 0",
            "-6 20301:\tnot from all fwmark 0x4f4c lookup 20300",
        ] {
            assert!(rules.contains(expect), "missing {expect:?} in\n{rules}");
        }
        drop(dev);
        assert_eq!(our_rules(), "", "rules left after drop");
        assert!(
            !ip("link show").contains("ostp0"),
            "interface left after drop"
        );
        assert_eq!(ip("-4 route show table 20300"), "");
    });
}

#[test]
fn rules_left_by_a_killed_run_are_removed_at_the_next_start() {
    in_new_netns(|| {
        // What a run killed with SIGKILL leaves: its rules (the routes and the interface went
        // with its process).
        for fam in ["-4", "-6"] {
            ip(&format!(
                "{fam} rule add priority 20300 table main suppress_prefixlength 0"
            ));
            ip(&format!(
                "{fam} rule add priority 20301 not fwmark 20300 table 20300"
            ));
        }
        assert_eq!(our_rules().lines().count(), 4);
        assert_eq!(clean_leftovers(&TunSettings::default()).unwrap(), 4);
        assert_eq!(our_rules(), "");
        // And creating the device cleans them too (then installs its own, once).
        ip("-4 rule add priority 20301 not fwmark 20300 table 20300");
        let dev = TunDevice::create(&TunSettings::default()).unwrap();
        assert_eq!(our_rules().lines().count(), 4, "{}", our_rules());
        drop(dev);
        assert_eq!(our_rules(), "");
    });
}

#[test]
fn a_bad_interface_name_is_refused_clearly() {
    let long = TunSettings {
        name: "a-name-longer-than-fifteen".into(),
        ..TunSettings::default()
    };
    let err = in_new_netns(|| TunDevice::create(&long).unwrap_err().to_string());
    assert!(err.contains("not an interface name"), "{err}");
}
