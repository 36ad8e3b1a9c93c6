//! The TUN device of TUN mode (Linux): creates the interface, gives it its addresses and MTU and
//! brings it up over rtnetlink, and installs the wg-quick style policy routing — every packet
//! without the tunnel's firewall mark looks up a table whose default route is the device, while
//! the main table's specific routes (LAN, the device's own subnet) still win — so the tunnel's
//! own marked sockets go out the normal way and roaming between networks keeps working. What it
//! installed is removed on drop; [`clean_leftovers`] removes what a killed run left behind.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::time::Duration;

use super::netlink::{self, Ack, MAIN_TABLE, Request, Route, Rule};
use crate::sys;

/// How the device is set up (the client config's `tun` block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunSettings {
    /// Interface name (`tun.name`, default `ostp0`).
    pub name: String,
    /// `tun.mtu` (default [`DEFAULT_MTU`]).
    pub mtu: u32,
    /// The device's IPv4 address and prefix (default 172.19.0.1/30).
    pub ipv4: (Ipv4Addr, u8),
    /// Its IPv6 address and prefix (default fdfe:dcba:9876::1/126); `None`: no IPv6 capture.
    pub ipv6: Option<(Ipv6Addr, u8)>,
    /// Route all traffic into the device (`tun.auto_route`, default true).
    pub auto_route: bool,
    /// The routing table whose default route is the device.
    pub table: u32,
    /// The mark on the tunnel's own sockets (they bypass the table).
    pub fwmark: u32,
    /// Priority of the main-table rule; the marked-traffic and DNS rules take the three below,
    /// the catch-all the one above (`priority - 3 ..= priority + 1`).
    pub priority: u32,
    /// Ranges that bypass the device (`exclude.ips`): `throw` routes in the table.
    pub bypass: Vec<(IpAddr, u8)>,
}

/// The device's default MTU. Captured TCP never leaves this host as device packets: it is
/// reflected to a local listener, so the MTU only sizes the segments between two kernel TCP
/// stacks on this machine (both announce an MSS from it; a LAN host routed through the device
/// announces its own). 9,000 (sing-box's and clash's default too) moves 6× fewer packets through
/// the device per byte than 1,500: client CPU in TUN mode 6.60 -> 3.60 s per GB in
/// `benches/tunnel.sh` (TUN_MTU=1500 vs 9000, same run), single stream 59 -> 106 MB/s.
/// UDP datagrams are not affected (they are limited by the tunnel's datagram size either way).
pub const DEFAULT_MTU: u32 = 9000;

impl Default for TunSettings {
    fn default() -> Self {
        TunSettings {
            name: "ostp0".into(),
            mtu: DEFAULT_MTU,
            ipv4: (Ipv4Addr::new(172, 19, 0, 1), 30),
            ipv6: Some((Ipv6Addr::new(0xfdfe, 0xdcba, 0x9876, 0, 0, 0, 0, 1), 126)),
            auto_route: true,
            table: 20_300,
            fwmark: 20_300,
            priority: 20_300,
            bypass: Vec::new(),
        }
    }
}

/// Why TUN mode could not start.
#[derive(Debug)]
pub enum TunError {
    /// Missing CAP_NET_ADMIN.
    Permission(String),
    /// No `/dev/net/tun` (the `tun` kernel module is missing).
    NoDevice(io::Error),
    /// Anything else, with the step that failed.
    Setup(String),
}

impl fmt::Display for TunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TunError::Permission(step) => write!(
                f,
                "TUN mode needs CAP_NET_ADMIN ({step}: permission denied): run the client as root, \
                 or grant it once with `setcap cap_net_admin=ep /path/to/ostp`"
            ),
            TunError::NoDevice(e) => write!(
                f,
                "cannot open /dev/net/tun ({e}): load the tun kernel module (`modprobe tun`; on \
                 OpenWrt install kmod-tun)"
            ),
            TunError::Setup(s) => write!(f, "TUN setup failed: {s}"),
        }
    }
}

impl std::error::Error for TunError {}

fn errno_error(step: &str, errno: i32) -> TunError {
    if errno == libc::EPERM || errno == libc::EACCES {
        TunError::Permission(step.to_string())
    } else {
        TunError::Setup(format!("{step}: {}", io::Error::from_raw_os_error(errno)))
    }
}

/// A connection to the kernel's routing configuration.
struct Rtnl {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    fn open() -> Result<Rtnl, TunError> {
        let fd = sys::netlink_route_socket(Duration::from_secs(2))
            .map_err(|e| TunError::Setup(format!("netlink socket: {e}")))?;
        Ok(Rtnl {
            fd,
            seq: 1,
            buf: vec![0; 8192],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `req` and waits for its acknowledgement: `Err(errno)` when refused.
    fn run(&mut self, req: Request) -> Result<(), i32> {
        let io_errno = |e: io::Error| e.raw_os_error().unwrap_or(libc::EIO);
        sys::netlink_send(&self.fd, req.bytes()).map_err(io_errno)?;
        loop {
            let n = sys::netlink_recv(&self.fd, &mut self.buf).map_err(io_errno)?;
            match netlink::parse_ack(&self.buf[..n], req.seq()) {
                Ack::Ok => return Ok(()),
                Ack::Errno(e) => return Err(e),
                Ack::Missing => continue, // another message (a late answer to an earlier one)
            }
        }
    }
}

/// What this device installed, removed in reverse order.
#[derive(Debug, Clone, Copy)]
enum Installed {
    Route(Route),
    Rule(Rule),
}

/// The open device and what it installed.
pub struct TunDevice {
    file: File,
    name: String,
    index: u32,
    settings: TunSettings,
    installed: Vec<Installed>,
}

impl fmt::Debug for TunDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunDevice")
            .field("name", &self.name)
            .field("index", &self.index)
            .finish()
    }
}

impl TunDevice {
    /// Opens the device (non-blocking), sets addresses and MTU and brings it up; leftovers of a
    /// killed run are removed first. Routes come with [`TunDevice::set_routes`].
    pub fn create(settings: &TunSettings) -> Result<TunDevice, TunError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    TunError::Permission("open /dev/net/tun".into())
                }
                _ => TunError::NoDevice(e),
            })?;
        let name = sys::tun_attach(&file, &settings.name).map_err(|e| match e.raw_os_error() {
            Some(errno) => errno_error("create the TUN interface", errno),
            None => TunError::Setup(e.to_string()),
        })?;
        let index = sys::interface_index(&name);
        if index == 0 {
            return Err(TunError::Setup(format!("interface {name} vanished")));
        }
        let mut device = TunDevice {
            file,
            name,
            index,
            settings: settings.clone(),
            installed: Vec::new(),
        };
        let mut rtnl = Rtnl::open()?;
        clean_with(&mut rtnl, settings);
        device.configure(&mut rtnl)?;
        Ok(device)
    }

    /// Installs (`true`) or removes the routes and rules that send all traffic into the device
    /// (nothing when `auto_route` is off; installing twice is a no-op). A failed install removes
    /// what it had added.
    pub fn set_routes(&mut self, on: bool) -> Result<(), TunError> {
        if !on {
            self.remove_routes();
            return Ok(());
        }
        if !self.settings.auto_route || !self.installed.is_empty() {
            return Ok(());
        }
        let mut rtnl = Rtnl::open()?;
        let result = self.install_routes(&mut rtnl);
        if result.is_err() {
            self.remove_routes();
        }
        result
    }

    /// Replaces the ranges that bypass the device. With the routes installed, only the `throw`
    /// routes that differ are added and removed (new ones first): the rules and the default
    /// route stay, so nothing leaks around the tunnel while the lists change.
    pub fn set_bypass(&mut self, bypass: Vec<(IpAddr, u8)>) -> Result<(), TunError> {
        if bypass == self.settings.bypass {
            return Ok(());
        }
        let old = std::mem::replace(&mut self.settings.bypass, bypass);
        if !self.routes_installed() {
            return Ok(());
        }
        let mut rtnl = Rtnl::open()?;
        let throw = |(dst, dst_len): (IpAddr, u8), table| Route {
            dst,
            dst_len,
            oif: 0,
            table,
        };
        let table = self.settings.table;
        let wanted: Vec<(IpAddr, u8)> = self.settings.bypass.clone();
        for &range in wanted.iter().filter(|r| !old.contains(r)) {
            if range.0.is_ipv6() && self.settings.ipv6.is_none() {
                continue;
            }
            let route = throw(range, table);
            let seq = rtnl.next_seq();
            rtnl.run(netlink::route(seq, true, &route))
                .map_err(|e| errno_error("add an excluded range to the TUN table", e))?;
            self.installed.push(Installed::Route(route));
        }
        for &range in old.iter().filter(|r| !wanted.contains(r)) {
            let route = throw(range, table);
            let seq = rtnl.next_seq();
            let _ = rtnl.run(netlink::route(seq, false, &route));
            self.installed
                .retain(|i| !matches!(i, Installed::Route(r) if *r == route));
        }
        Ok(())
    }

    /// Whether the routes are installed.
    pub fn routes_installed(&self) -> bool {
        !self.installed.is_empty()
    }

    fn configure(&mut self, rtnl: &mut Rtnl) -> Result<(), TunError> {
        let (v4, v4_len) = self.settings.ipv4;
        let seq = rtnl.next_seq();
        rtnl.run(netlink::add_address(
            seq,
            self.index,
            IpAddr::V4(v4),
            v4_len,
        ))
        .map_err(|e| errno_error("add the IPv4 address", e))?;
        if let Some((v6, v6_len)) = self.settings.ipv6 {
            let seq = rtnl.next_seq();
            match rtnl.run(netlink::add_address(
                seq,
                self.index,
                IpAddr::V6(v6),
                v6_len,
            )) {
                Ok(()) => {}
                // IPv6 is off on this host: there is no IPv6 traffic to capture either.
                Err(e) if e == libc::EAFNOSUPPORT || e == libc::EACCES => {
                    log::warn!("tun: IPv6 is disabled on this host; capturing IPv4 only");
                    self.settings.ipv6 = None;
                }
                Err(e) => return Err(errno_error("add the IPv6 address", e)),
            }
        }
        let seq = rtnl.next_seq();
        rtnl.run(netlink::link_up(seq, self.index, self.settings.mtu))
            .map_err(|e| errno_error("bring the interface up", e))
    }

    fn families(&self) -> Vec<bool> {
        let mut f = vec![false];
        if self.settings.ipv6.is_some() {
            f.push(true);
        }
        f
    }

    fn install_routes(&mut self, rtnl: &mut Rtnl) -> Result<(), TunError> {
        let s = self.settings.clone();
        for v6 in self.families() {
            let route = Route {
                dst: unspecified(v6),
                dst_len: 0,
                oif: self.index,
                table: s.table,
            };
            let seq = rtnl.next_seq();
            rtnl.run(netlink::route(seq, true, &route))
                .map_err(|e| errno_error("add the default route of the TUN table", e))?;
            self.installed.push(Installed::Route(route));
            for &(dst, dst_len) in s.bypass.iter().filter(|(ip, _)| ip.is_ipv6() == v6) {
                let throw = Route {
                    dst,
                    dst_len,
                    oif: 0,
                    table: s.table,
                };
                let seq = rtnl.next_seq();
                rtnl.run(netlink::route(seq, true, &throw))
                    .map_err(|e| errno_error("add an excluded range to the TUN table", e))?;
                self.installed.push(Installed::Route(throw));
            }
            for rule in our_rules(&s, v6) {
                let seq = rtnl.next_seq();
                rtnl.run(netlink::rule(seq, true, &rule))
                    .map_err(|e| errno_error("add a routing rule", e))?;
                self.installed.push(Installed::Rule(rule));
            }
        }
        Ok(())
    }

    fn remove_routes(&mut self) {
        let Ok(mut rtnl) = Rtnl::open() else {
            log::warn!("tun: cannot open netlink to remove the routing rules");
            return;
        };
        while let Some(item) = self.installed.pop() {
            let seq = rtnl.next_seq();
            let req = match item {
                Installed::Route(r) => netlink::route(seq, false, &r),
                Installed::Rule(r) => netlink::rule(seq, false, &r),
            };
            match rtnl.run(req) {
                Ok(()) => {}
                // The route went with the interface, or someone removed it already.
                Err(e) if e == libc::ENOENT || e == libc::ESRCH || e == libc::ENODEV => {}
                Err(e) => log::warn!(
                    "tun: could not remove {item:?}: {}",
                    io::Error::from_raw_os_error(e)
                ),
            }
        }
    }

    /// The device (register it with the loop; read and write whole packets).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The settings in force (IPv6 cleared when the host has none).
    pub fn settings(&self) -> &TunSettings {
        &self.settings
    }
}

impl Drop for TunDevice {
    fn drop(&mut self) {
        self.remove_routes();
        // Closing the file removes the (non-persistent) interface and its addresses.
    }
}

fn unspecified(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
}

/// The rules per family: the tunnel's own (marked) packets to the main table first; then DNS
/// (UDP and TCP port 53) into the TUN table — also to a resolver on the LAN, which the main
/// table's connected route would otherwise reach directly; then the main table without its
/// default route; then everything unmarked into the TUN table. (A rule's "not" inverts its whole
/// selector, so the DNS rules cannot say "not marked": the first rule does that.)
fn our_rules(s: &TunSettings, v6: bool) -> [Rule; 5] {
    let dns = |priority, proto| Rule {
        v6,
        priority,
        table: s.table,
        not_fwmark: None,
        suppress_prefixlen: None,
        proto_dport: Some((proto, 53)),
        fwmark: None,
    };
    [
        Rule {
            v6,
            priority: s.priority - 3,
            table: MAIN_TABLE,
            not_fwmark: None,
            suppress_prefixlen: None,
            proto_dport: None,
            fwmark: Some(s.fwmark),
        },
        dns(s.priority - 2, 17),
        dns(s.priority - 1, 6),
        Rule {
            v6,
            priority: s.priority,
            table: MAIN_TABLE,
            not_fwmark: None,
            suppress_prefixlen: Some(0),
            proto_dport: None,
            fwmark: None,
        },
        Rule {
            v6,
            priority: s.priority + 1,
            table: s.table,
            not_fwmark: Some(s.fwmark),
            suppress_prefixlen: None,
            proto_dport: None,
            fwmark: None,
        },
    ]
}

fn clean_with(rtnl: &mut Rtnl, s: &TunSettings) -> usize {
    let mut removed = 0;
    // `throw` routes are not tied to the interface: they outlive a killed run.
    for &(dst, dst_len) in &s.bypass {
        let throw = Route {
            dst,
            dst_len,
            oif: 0,
            table: s.table,
        };
        let seq = rtnl.next_seq();
        if rtnl.run(netlink::route(seq, false, &throw)).is_ok() {
            removed += 1;
        }
    }
    for v6 in [false, true] {
        for rule in our_rules(s, v6) {
            // The same rule may be there more than once (several killed runs).
            for _ in 0..16 {
                let seq = rtnl.next_seq();
                if rtnl.run(netlink::rule(seq, false, &rule)).is_err() {
                    break;
                }
                removed += 1;
            }
        }
    }
    if removed > 0 {
        log::info!("tun: removed {removed} routing rules and routes left by an earlier run");
    }
    removed
}

/// Removes the routing rules an earlier run that was killed left behind (its routes and
/// interface went with its process). Returns how many were removed.
pub fn clean_leftovers(s: &TunSettings) -> Result<usize, TunError> {
    let mut rtnl = Rtnl::open()?;
    Ok(clean_with(&mut rtnl, s))
}
