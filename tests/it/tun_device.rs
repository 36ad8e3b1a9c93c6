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

/// Our rules as `ip rule` shows them (priority lines 20297..=20301 of both families).
fn our_rules() -> String {
    let mut s = String::new();
    for fam in ["-4", "-6"] {
        for line in ip(&format!("{fam} rule show")).lines() {
            if ["20297:", "20298:", "20299:", "20300:", "20301:"]
                .iter()
                .any(|p| line.starts_with(p))
            {
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
        let mut dev = TunDevice::create(&settings).expect("TUN device (needs root)");
        assert_eq!(dev.name(), "ostp0");
        assert_eq!(our_rules(), "", "no routes before set_routes");
        dev.set_routes(true).unwrap();
        dev.set_routes(true).unwrap(); // twice: no duplicate, no error
        let link = ip("addr show dev ostp0");
        assert!(link.contains("mtu 1400"), "{link}");
        assert!(link.contains(",UP"), "{link}");
        assert!(link.contains("inet 172.19.0.1/30"), "{link}");
        assert!(link.contains("inet6 fdfe:dcba:9876::1/126"), "{link}");
        assert!(ip("-4 route show table 20300").contains("default dev ostp0"));
        assert!(ip("-6 route show table 20300").contains("default dev ostp0"));
        let rules = our_rules();
        for expect in [
            "-4 20297:\tfrom all fwmark 0x4f4c lookup main",
            "-4 20298:\tfrom all ipproto udp dport 53 lookup 20300",
            "-6 20299:\tfrom all ipproto tcp dport 53 lookup 20300",
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
        // Withdrawn and installed again while the device lives (kill switch off: routes only
        // while a session is up).
        let mut dev = TunDevice::create(&settings).unwrap();
        dev.set_routes(true).unwrap();
        dev.set_routes(false).unwrap();
        assert_eq!(our_rules(), "");
        assert!(!dev.routes_installed());
        dev.set_routes(true).unwrap();
        assert_eq!(our_rules().lines().count(), 10);
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
        // And creating the device cleans them too (then installs its own, once), including a
        // `throw` route of an excluded range (those outlive the process that added them).
        ip("-4 rule add priority 20301 not fwmark 20300 table 20300");
        ip("route add throw 10.99.0.0/16 table 20300");
        let settings = TunSettings {
            bypass: vec![("10.99.0.0".parse().unwrap(), 16)],
            ..TunSettings::default()
        };
        let mut dev = TunDevice::create(&settings).unwrap();
        dev.set_routes(true).unwrap();
        assert_eq!(our_rules().lines().count(), 10, "{}", our_rules());
        assert!(dev.routes_installed());
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

#[test]
fn excluded_ranges_bypass_the_device() {
    in_new_netns(|| {
        // The host's own way out: a default route through another interface.
        ip("link add d0 type veth peer name d1");
        ip("addr add 192.0.2.1/24 dev d0");
        ip("link set d1 up");
        ip("link set d0 up");
        ip("route add default via 192.0.2.254");
        let settings = TunSettings {
            bypass: vec![
                ("10.99.0.0".parse().unwrap(), 16),
                ("2001:db8:99::".parse().unwrap(), 48),
            ],
            ipv6: None,
            ..TunSettings::default()
        };
        let mut dev = TunDevice::create(&settings).unwrap();
        dev.set_routes(true).unwrap();
        let table = ip("-4 route show table 20300");
        assert!(table.contains("throw 10.99.0.0/16"), "{table}");
        assert!(
            ip("route get 10.99.1.1").contains("dev d0"),
            "excluded: direct"
        );
        assert!(
            ip("route get 8.8.8.8").contains("dev ostp0"),
            "everything else: the device"
        );
        drop(dev);
        assert_eq!(ip("-4 route show table 20300"), "");
    });
}
