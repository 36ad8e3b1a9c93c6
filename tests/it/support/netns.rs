//! Network namespaces that a test creates and removes itself (CI runs as root): one namespace
//! joined to the test's own namespace by a veth pair (and, for topologies like LAN ↔ router ↔
//! WAN, to other namespaces by [`Netns::link`]), a command runner inside it, and nftables
//! rulesets loaded into it (to drop UDP, or a share of a port's packets, where the kernel has no
//! netem). Everything is removed when the [`Netns`] is dropped.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace joined to ours by a veth pair: `host_addr` on our side, `ns_addr` inside (a /30;
/// `ns_addr6` and our `…::1` in a /64 for IPv6).
pub struct Netns {
    pub name: String,
    pub host_addr: Ipv4Addr,
    pub ns_addr: Ipv4Addr,
    pub ns_addr6: Ipv6Addr,
    /// Our end of the veth pair.
    pub host_if: String,
    /// The namespace's end of the veth pair (its only link to the world).
    pub ns_if: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs a command and panics with its stderr when it fails.
pub fn must(args: &[&str]) {
    if let Err(e) = run(args) {
        panic!("{e}");
    }
}

impl Netns {
    /// Creates the namespace and the veth pair (names unique per process and call). Panics with
    /// the reason when the machine cannot (not root, no `ip`): these tests run in CI as root.
    pub fn create() -> Netns {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() % 10_000) * 16 + n % 16;
        let name = format!("ostp-t{id}");
        let host_if = format!("ov{id}h");
        let ns_if = format!("ov{id}n");
        // A /30 per namespace in 10.201.0.0/16 .. 10.255.0.0/16, from the id.
        let (b, c) = (201 + (id / 16_384) % 50, ((id / 64) % 256) as u8);
        let d = ((id % 64) * 4) as u8;
        let host_addr = Ipv4Addr::new(10, b as u8, c, d + 1);
        let ns_addr = Ipv4Addr::new(10, b as u8, c, d + 2);
        let net6 = 0xfd50_0000_0000_0000_0000_0000_0000_0000u128 | (u128::from(id) << 64);
        let (host_addr6, ns_addr6) = (Ipv6Addr::from(net6 | 1), Ipv6Addr::from(net6 | 2));
        // Leftovers of an earlier crashed run with the same id.
        let _ = run(&["ip", "netns", "del", &name]);
        let _ = run(&["ip", "link", "del", &host_if]);
        must(&["ip", "netns", "add", &name]);
        let ns = Netns {
            name,
            host_addr,
            ns_addr,
            ns_addr6,
            host_if,
            ns_if: ns_if.clone(),
        };
        let (h, s) = (ns.host_if.as_str(), ns.ns_if.as_str());
        must(&["ip", "link", "add", h, "type", "veth", "peer", "name", s]);
        must(&["ip", "link", "set", s, "netns", &ns.name]);
        must(&["ip", "addr", "add", &format!("{host_addr}/30"), "dev", h]);
        must(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{host_addr6}/64"),
            "dev",
            h,
            "nodad",
        ]);
        must(&["ip", "link", "set", h, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["ip", "-n", ns.name.as_str()];
            all.extend_from_slice(args);
            must(&all);
        };
        inside(&["addr", "add", &format!("{ns_addr}/30"), "dev", s]);
        inside(&[
            "-6",
            "addr",
            "add",
            &format!("{ns_addr6}/64"),
            "dev",
            s,
            "nodad",
        ]);
        inside(&["link", "set", s, "up"]);
        inside(&["link", "set", "lo", "up"]);
        ns
    }

    /// `program` run inside the namespace (`ip netns exec` execs it: the child's pid is the
    /// program's).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it creates live there, and
    /// keep working from any thread afterwards).
    pub fn run_inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(format!("/var/run/netns/{}", self.name)).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns(2) on an open namespace file moves only this thread into it.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// The output of `program args...` run inside the namespace (panics when it fails).
    pub fn output(&self, program: &str, args: &[&str]) -> String {
        let out = self.command(program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Joins this namespace to `other` by another veth pair: `self_if` here with `self_addrs`,
    /// `other_if` there with `other_addrs` (`addr/len`; IPv6 ones without duplicate address
    /// detection), both ends up. The pair goes away with either namespace.
    pub fn link(
        &self,
        self_if: &str,
        self_addrs: &[&str],
        other: &Netns,
        other_if: &str,
        other_addrs: &[&str],
    ) {
        must(&[
            "ip",
            "-n",
            &self.name,
            "link",
            "add",
            self_if,
            "type",
            "veth",
            "peer",
            "name",
            other_if,
            "netns",
            &other.name,
        ]);
        for (ns, ifname, addrs) in [(self, self_if, self_addrs), (other, other_if, other_addrs)] {
            for addr in addrs {
                let mut args = vec!["ip", "-n", &ns.name, "addr", "add", addr, "dev", ifname];
                if addr.contains(':') {
                    args.push("nodad");
                }
                must(&args);
            }
            must(&["ip", "-n", &ns.name, "link", "set", ifname, "up"]);
        }
    }

    /// Runs `ip args...` inside the namespace (panics when it fails).
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip", "-n", self.name.as_str()];
        all.extend_from_slice(args);
        must(&all);
    }

    /// Removes the nftables table `table` (family inet) inside the namespace.
    pub fn nft_delete_table(&self, table: &str) {
        self.output("nft", &["delete", "table", "inet", table]);
    }

    /// Loads an nftables ruleset inside the namespace (`nft -f -`).
    pub fn nft(&self, ruleset: &str) {
        use std::io::Write;
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft (Debian package nftables) is required by the namespace tests");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(ruleset.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft -f: {}\n{ruleset}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its end of the veth pair, and with it ours.
        let _ = run(&["ip", "netns", "del", &self.name]);
        let _ = run(&["ip", "link", "del", &self.host_if]);
    }
}
