//! `config.json`: the typed server and client configurations, their defaults, and validation
//! with errors that name the file, the field and what is wrong. Parsing goes through
//! `serde_json::Value` and a small field walker so that unknown fields and wrong types are
//! reported with the full field path (`api.bind`, `access_keys[2].limit_bytes`).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::keys;

/// Default UDP port of the tunnel.
pub const DEFAULT_PORT: u16 = 50000;
/// Default API bind address (loopback: an empty token is allowed only there).
pub const DEFAULT_API_BIND: &str = "127.0.0.1:9090";
/// Default local proxy address of the client (SOCKS5 and HTTP on one port).
pub const DEFAULT_SOCKS5_BIND: &str = "127.0.0.1:1088";
/// Default address of router mode's port (TCP `redirect` and UDP TPROXY).
pub const DEFAULT_REDIR_BIND: &str = "0.0.0.0:1090";
/// LAN interface router mode's rules capture when `redir.interfaces` is not set (OpenWrt's).
pub const DEFAULT_LAN_INTERFACE: &str = "br-lan";
/// Client: a local connection or UDP association idle this long is closed.
pub const DEFAULT_LOCAL_IDLE_TIMEOUT_SECS: u32 = 300;
const MAX_LOCAL_IDLE_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
/// Default total number of tunnel sessions a server accepts.
pub const DEFAULT_MAX_SESSIONS: u32 = 1024;
/// Default number of simultaneous sessions per user.
pub const DEFAULT_MAX_SESSIONS_PER_USER: u32 = 32;
/// Default bound on TCP connections undecided or being discarded (and on fallback splices).
pub const DEFAULT_MAX_UNAUTHENTICATED_TCP: u32 = 256;
/// Most sessions a client may spread its streams over.
pub const MAX_MUX_SESSIONS: u32 = 16;

/// A configuration problem: which file, which field, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Dotted field path, empty for whole-file problems.
    pub field: String,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.problem)
        } else {
            write!(
                f,
                "{}: field `{}`: {}",
                self.file.display(),
                self.field,
                self.problem
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// `udp_offload`: whether the tunnel's UDP sockets send several datagrams per system call (GSO)
/// and read several per call (GRO) where the kernel offers it (Linux).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UdpOffload {
    /// Probe each socket; fall back to single datagrams when the kernel refuses.
    #[default]
    Auto,
    /// One datagram per system call (for kernels whose UDP GSO misbehaves, e.g. over PPPoE).
    Off,
}

impl UdpOffload {
    fn is_auto(&self) -> bool {
        *self == UdpOffload::Auto
    }
}

/// Reads `udp_offload` (`"auto"` when absent).
/// The `tun` block's fields (the caller refuses unknown ones).
fn parse_tun(t: &mut Obj, tun: &mut TunConfig) -> Result<(), ConfigError> {
    if let Some(b) = t.opt_bool("enable")? {
        tun.enable = b;
    }
    if let Some(d) = t.opt_str("dns")? {
        tun.dns = d;
    }
    if tun.dns_addr().is_none() {
        return Err(t.err(
            "dns",
            &format!(
                "{:?} is not an IP address (optionally with :port), e.g. \"1.1.1.1\"",
                tun.dns
            ),
        ));
    }
    if let Some(name) = t.opt_str("name")? {
        if !is_interface_name(&name) {
            return Err(t.err(
                "name",
                &format!("{name:?} is not an interface name (1-15 letters, digits, '_', '.', '-')"),
            ));
        }
        tun.name = Some(name);
    }
    if let Some(mtu) = t.opt_u64("mtu")? {
        if !(1280..=65_535).contains(&mtu) {
            return Err(t.err("mtu", &format!("{mtu} is out of range 1280..=65535")));
        }
        tun.mtu = Some(mtu as u32);
    }
    tun.auto_route = t.opt_bool("auto_route")?;
    tun.kill_switch = t.opt_bool("kill_switch")?;
    tun.ipv6 = t.opt_bool("ipv6")?;
    Ok(())
}

/// A Linux interface name: 1-15 letters, digits, '_', '.', '-'.
fn is_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// The `redir` block (router mode); the caller refuses unknown fields.
fn parse_redir(r: &mut Obj) -> Result<RedirConfig, ConfigError> {
    let enabled = r.opt_bool("enabled")?.unwrap_or(false);
    let bind = r
        .opt_str("bind")?
        .unwrap_or_else(|| DEFAULT_REDIR_BIND.to_string());
    let addr = parse_socket_addr(r, &r.path("bind"), &bind)?;
    if addr.port() == 0 {
        return Err(r.err(
            "bind",
            "needs a port (the rules send traffic to it), e.g. 1090",
        ));
    }
    let interfaces = match r.take("interfaces") {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) => {
            let mut names = Vec::new();
            for v in &list {
                match v.as_str() {
                    Some(n) if is_interface_name(n) => names.push(n.to_string()),
                    _ => {
                        return Err(r.err(
                            "interfaces",
                            &format!(
                                "{v} is not an interface name (1-15 letters, digits, '_', '.', '-')"
                            ),
                        ));
                    }
                }
            }
            if names.is_empty() {
                return Err(r.err("interfaces", "must name at least one LAN interface"));
            }
            Some(names)
        }
        Some(v) => {
            return Err(r.err(
                "interfaces",
                &format!("must be a list of interface names, not {}", type_name(&v)),
            ));
        }
    };
    Ok(RedirConfig {
        enabled,
        bind,
        interfaces,
    })
}

fn parse_udp_offload(obj: &mut Obj) -> Result<UdpOffload, ConfigError> {
    match obj.opt_str("udp_offload")?.as_deref() {
        None | Some("auto") => Ok(UdpOffload::Auto),
        Some("off") => Ok(UdpOffload::Off),
        Some(other) => Err(obj.err(
            "udp_offload",
            &format!("{other:?} is not one of \"auto\", \"off\""),
        )),
    }
}

/// A whole configuration file.
#[derive(Debug, Clone, PartialEq)]
pub enum Config {
    Server(ServerConfig),
    Client(ClientConfig),
}

/// One access key declared in `config.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessKeyEntry {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<u64>,
}

/// The `api` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    pub enabled: bool,
    pub bind: SocketAddr,
    pub token: String,
    /// A second token that reads `GET /metrics` and nothing else (empty = none).
    pub metrics_token: String,
    /// API connections at once, and from one non-loopback address (loopback is not capped).
    pub max_connections: u32,
    pub max_connections_per_address: u32,
    /// Seconds a connection may take to send a complete request head.
    pub head_timeout_secs: u32,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: false,
            bind: DEFAULT_API_BIND.parse().expect("valid default"),
            token: String::new(),
            metrics_token: String::new(),
            max_connections: 256,
            max_connections_per_address: 32,
            head_timeout_secs: 5,
        }
    }
}

/// The `metrics` block (`GET /metrics`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Export `ostp_user_bytes_total` per user (off for very large servers).
    pub per_user: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { per_user: true }
    }
}

/// The server's per-user shares and global caps of scarce resources (top-level fields of a
/// server `config.json`; defaults in [`ServerLimits::default`], documented in the README).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Outbound TCP streams of all users (also capped by the fd budget).
    pub max_streams: u32,
    /// Outbound TCP streams of one user, over all its sessions.
    pub max_streams_per_user: u32,
    /// Resolver threads (each runs one blocking lookup at a time).
    pub dns_threads: u32,
    /// Lookups one user may have queued or running.
    pub max_dns_lookups_per_user: u32,
    /// Seconds before the loop gives up on a lookup.
    pub dns_timeout_secs: u32,
    /// Seconds a failed (or timed-out) name fails at once.
    pub dns_negative_ttl_secs: u32,
    /// Bytes the server holds in buffers for one user / for all users.
    pub max_buffered_bytes_per_user: u64,
    pub max_buffered_bytes: u64,
    /// Seconds without progress before an open / half-closed stream is reset.
    pub stream_idle_timeout_secs: u32,
    pub half_closed_timeout_secs: u32,
    /// File descriptors kept free for the API, the state file and new users.
    pub fd_reserve: u32,
    /// Hellos per second (and burst) the server processes in all, and for one user. The user's
    /// bucket is checked first, so one key's garbage can only use up that key's allowance.
    pub handshake_rate: u32,
    pub handshake_burst: u32,
    pub handshake_rate_per_user: u32,
    pub handshake_burst_per_user: u32,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_streams: 4096,
            max_streams_per_user: 256,
            dns_threads: 16,
            max_dns_lookups_per_user: 4,
            dns_timeout_secs: 5,
            dns_negative_ttl_secs: 10,
            max_buffered_bytes_per_user: 8 * 1024 * 1024,
            max_buffered_bytes: 64 * 1024 * 1024,
            stream_idle_timeout_secs: 300,
            half_closed_timeout_secs: 60,
            fd_reserve: 256,
            handshake_rate: 200,
            handshake_burst: 400,
            handshake_rate_per_user: 20,
            handshake_burst_per_user: 64,
        }
    }
}

/// A server configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// The file this came from (for messages and SIGHUP reloads).
    pub path: PathBuf,
    /// UDP addresses the tunnel listens on.
    pub listen: Vec<SocketAddr>,
    pub access_keys: Vec<AccessKeyEntry>,
    pub api: ApiConfig,
    pub metrics: MetricsConfig,
    /// Host put into share links and client configs; `None` = the API request's `Host`.
    pub public_host: Option<String>,
    /// UDP port put into share links and client configs when clients reach the server on
    /// another port than it listens on (a port forward); `None` = the first `listen` port.
    pub public_port: Option<u16>,
    /// TCP-carrier port put into share links and client configs when clients reach it on
    /// another port (behind nginx `stream`, a port forward); `None` = the first `listen_tcp` port.
    pub public_tcp_port: Option<u16>,
    /// Runtime state (API-created users, counters); its journal is `<state_file>.journal`.
    pub state_file: PathBuf,
    /// Follow a symbolic link at `state_file` (off: such a link is refused at start).
    pub allow_symlinked_state: bool,
    pub log_level: log::LevelFilter,
    /// Let clients reach loopback/private/link-local destinations (off by default).
    pub allow_private_destinations: bool,
    pub max_sessions: u32,
    pub max_sessions_per_user: u32,
    pub limits: ServerLimits,
    /// GSO/GRO on the listen sockets.
    pub udp_offload: UdpOffload,
    /// TCP addresses of the TCP carrier (docs/PROTOCOL.md §7); empty: no TCP listener.
    pub listen_tcp: Vec<SocketAddr>,
    /// Where TCP connections that are not OSTP are spliced; `None`: read and discarded.
    pub fallback: Option<FallbackConfig>,
    /// TCP connections undecided or being discarded at once (beyond: the oldest is closed); also
    /// the most fallback splices at once.
    pub max_unauthenticated_tcp: u32,
}

/// The `fallback` block: the website that TCP connections which are not OSTP are handed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackConfig {
    /// An IP address and port (no name: nothing is resolved on the tunnel loop).
    pub target: SocketAddr,
}

impl ServerConfig {
    /// The UDP port put into share links and client configs: `public_port`, else the first
    /// listen address's port.
    pub fn tunnel_port(&self) -> u16 {
        self.public_port
            .or_else(|| self.listen.first().map(|a| a.port()))
            .unwrap_or(DEFAULT_PORT)
    }

    /// The TCP-carrier port clients are told (links, subscribe), if the server offers the
    /// TCP carrier at all.
    pub fn public_tcp_carrier_port(&self) -> Option<u16> {
        let first = self.listen_tcp.first()?;
        Some(self.public_tcp_port.unwrap_or(first.port()))
    }
}

/// `tun` block of a client config: system-wide capture through a TUN device (Linux). The
/// optional fields are written only when set (the subscribe endpoint hands out `enable`/`dns`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TunConfig {
    pub enable: bool,
    /// Where every captured DNS query goes (an IP address, port 53 unless given).
    pub dns: String,
    /// Interface name (default `ostp0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Interface MTU (default 9000, see `tun::device::DEFAULT_MTU`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Route all traffic into the device (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_route: Option<bool>,
    /// Keep the routes while the tunnel is down: captured traffic is dropped, never sent around
    /// the tunnel (default false: routes exist only while a session is up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kill_switch: Option<bool>,
    /// Capture IPv6 too (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
}

impl TunConfig {
    /// `dns` as an address (port 53 unless given).
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        let d = self.dns.trim();
        d.parse::<SocketAddr>().ok().or_else(|| {
            d.parse::<std::net::IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 53))
        })
    }
}

/// `exclude` block of a client config (checked by [`crate::tunnel::exclude::Exclude`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExcludeConfig {
    /// Address ranges (`10.0.0.0/8`, `192.168.1.7`, `fd00::/8`).
    pub ips: Vec<String>,
    /// Domain suffixes (`example.com` matches it and its subdomains).
    pub domains: Vec<String>,
}

impl ExcludeConfig {
    /// Nothing excluded.
    pub fn is_empty(&self) -> bool {
        self.ips.is_empty() && self.domains.is_empty()
    }

    /// The matcher.
    pub fn matcher(
        &self,
    ) -> Result<crate::tunnel::exclude::Exclude, crate::tunnel::exclude::ExcludeError> {
        crate::tunnel::exclude::Exclude::new(
            self.ips.iter().map(String::as_str),
            self.domains.iter().map(String::as_str),
        )
    }
}

/// `dns_forward` block of a client config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DnsForwardConfig {
    /// Where the forwarder listens, UDP and TCP (default `127.0.0.1:5353`).
    pub bind: SocketAddr,
    /// The resolver queries go to through the tunnel (default `1.1.1.1:53`).
    pub upstream: SocketAddr,
}

/// `redir` block of a client config: router transparent mode (Linux). The LAN's TCP arrives
/// through an nftables `redirect`, its UDP through TPROXY, both on `bind`'s port
/// (`ostp --router-rules` prints the rules). Written only when present in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RedirConfig {
    pub enabled: bool,
    /// Address of the port (default [`DEFAULT_REDIR_BIND`]; an unspecified address listens in
    /// both families).
    pub bind: String,
    /// LAN interfaces the rules capture (default [`DEFAULT_LAN_INTERFACE`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interfaces: Option<Vec<String>>,
}

impl RedirConfig {
    /// `bind` as an address (validated when the config was read).
    pub fn bind_addr(&self) -> Option<SocketAddr> {
        self.bind.parse().ok()
    }

    /// The LAN interfaces the rules capture.
    pub fn lan_interfaces(&self) -> Vec<String> {
        self.interfaces
            .clone()
            .unwrap_or_else(|| vec![DEFAULT_LAN_INTERFACE.to_string()])
    }
}

/// `turn` block of a client config (not supported by this build; must stay disabled).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TurnConfig {
    pub enabled: bool,
}

/// `mux` block: spread streams over several sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MuxConfig {
    pub enabled: bool,
    pub sessions: u32,
}

/// `socks5_auth`: the username and password the client's local proxy asks for (SOCKS5
/// username/password, RFC 1929, and HTTP `Proxy-Authorization: Basic`). `Debug` hides the
/// password.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct ProxyAuth {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for ProxyAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyAuth")
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

/// `transport.mode`: which carrier the client's tunnel sessions use (docs/PROTOCOL.md §7).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CarrierMode {
    /// UDP only (the default, for compatibility with servers without a TCP listener).
    #[default]
    Udp,
    /// The TCP carrier only ("UDP over TCP", the reference implementation's name).
    Uot,
    /// UDP first; TCP when UDP goes unanswered or keeps dying; back to UDP when it works again.
    Auto,
}

impl CarrierMode {
    /// The config and share-link spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CarrierMode::Udp => "udp",
            CarrierMode::Uot => "uot",
            CarrierMode::Auto => "auto",
        }
    }
}

/// The client's `transport` block: the carrier mode and where the TCP carrier listens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TransportConfig {
    pub mode: CarrierMode,
    /// Port of the server's TCP carrier; `None`: the port of `server`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_port: Option<u16>,
}

impl TransportConfig {
    fn is_default(&self) -> bool {
        *self == TransportConfig::default()
    }
}

/// A client configuration — exactly the `data` object of `GET /api/subscribe/{key}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientConfig {
    pub mode: &'static str,
    /// `host:port` of the server (name, IPv4 or bracketed IPv6).
    pub server: String,
    pub access_key: String,
    /// Local proxy address (SOCKS5 and HTTP on one port).
    pub socks5_bind: String,
    /// Credentials the local proxy asks for (SOCKS5 username/password, HTTP `Basic`); required
    /// for a non-loopback `socks5_bind` unless `allow_open_proxy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socks5_auth: Option<ProxyAuth>,
    /// Lets a non-loopback `socks5_bind` run without credentials (an open proxy; warned about).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_open_proxy: bool,
    /// Local IP address the tunnel's UDP sockets are bound to (the source address the server
    /// sees); `None`: chosen by the system. Never handed out by the subscribe endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_bind_ip: Option<std::net::IpAddr>,
    /// GSO/GRO on the tunnel's UDP sockets (written only when not the default `auto`).
    #[serde(skip_serializing_if = "UdpOffload::is_auto")]
    pub udp_offload: UdpOffload,
    /// Seconds a local connection or UDP association may move nothing before it is closed
    /// (`None`: [`DEFAULT_LOCAL_IDLE_TIMEOUT_SECS`]). Never handed out by the subscribe endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_idle_timeout_secs: Option<u32>,
    /// Carrier mode and TCP carrier port (written only when not the default: UDP, same port).
    #[serde(skip_serializing_if = "TransportConfig::is_default")]
    pub transport: TransportConfig,
    pub tun: TunConfig,
    /// A local DNS endpoint whose queries go through the tunnel. Never part of a subscription.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_forward: Option<DnsForwardConfig>,
    /// Destinations connected directly instead of through the tunnel (split routing). Never
    /// part of a subscription.
    #[serde(skip_serializing_if = "ExcludeConfig::is_empty")]
    pub exclude: ExcludeConfig,
    /// Router transparent mode (written only when set; never handed out by the subscribe
    /// endpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redir: Option<RedirConfig>,
    pub turn: TurnConfig,
    pub mux: MuxConfig,
    pub debug: bool,
}

impl ClientConfig {
    /// The client config handed out for `key` on `server` (`host:port`).
    pub fn for_server(server: String, access_key: String) -> ClientConfig {
        ClientConfig {
            mode: "client",
            server,
            access_key,
            socks5_bind: DEFAULT_SOCKS5_BIND.to_string(),
            socks5_auth: None,
            allow_open_proxy: false,
            udp_bind_ip: None,
            udp_offload: UdpOffload::Auto,
            local_idle_timeout_secs: None,
            transport: TransportConfig::default(),
            tun: TunConfig {
                enable: false,
                dns: "1.1.1.1".to_string(),
                name: None,
                mtu: None,
                auto_route: None,
                kill_switch: None,
                ipv6: None,
            },
            dns_forward: None,
            exclude: ExcludeConfig::default(),
            redir: None,
            turn: TurnConfig { enabled: false },
            mux: MuxConfig {
                enabled: false,
                sessions: 1,
            },
            debug: false,
        }
    }

    /// How many tunnel sessions the client keeps.
    pub fn session_count(&self) -> u32 {
        if self.mux.enabled {
            self.mux.sessions.clamp(1, MAX_MUX_SESSIONS)
        } else {
            1
        }
    }

    /// Splits `server` into host (without brackets) and port.
    pub fn server_host_port(&self) -> Option<(String, u16)> {
        split_host_port(&self.server)
    }
}

/// Splits `host:port` / `[v6]:port` into host (without brackets) and a non-zero port.
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        (h, after.strip_prefix(':')?)
    } else {
        let (h, p) = s.rsplit_once(':')?;
        if h.contains(':') {
            return None; // unbracketed IPv6
        }
        (h, p)
    };
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port))
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        field: String::new(),
        problem: format!("cannot read the file: {e}"),
    })?;
    parse(path, &text)
}

/// Parses and validates configuration text; `path` is used for messages and relative paths.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let value: Value = serde_json::from_str(text).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        field: String::new(),
        problem: format!("not valid JSON: {e}"),
    })?;
    let ctx = Ctx { file: path };
    let Value::Object(map) = value else {
        return Err(ctx.err("", "the file must contain a JSON object"));
    };
    let mut obj = Obj::new(&ctx, "", map);
    let mode = obj.req_str("mode")?;
    match mode.as_str() {
        "server" => parse_server(&ctx, obj).map(Config::Server),
        "client" => parse_client(obj).map(Config::Client),
        other => Err(ctx.err(
            "mode",
            &format!("must be \"server\" or \"client\", not {other:?}"),
        )),
    }
}

struct Ctx<'a> {
    file: &'a Path,
}

impl Ctx<'_> {
    fn err(&self, field: &str, problem: &str) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            field: field.to_string(),
            problem: problem.to_string(),
        }
    }
}

/// A JSON object being consumed field by field; leftovers are "unknown field" errors.
struct Obj<'a> {
    ctx: &'a Ctx<'a>,
    prefix: String,
    map: Map<String, Value>,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl<'a> Obj<'a> {
    fn new(ctx: &'a Ctx<'a>, prefix: &str, map: Map<String, Value>) -> Self {
        Obj {
            ctx,
            prefix: prefix.to_string(),
            map,
        }
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    fn err(&self, name: &str, problem: &str) -> ConfigError {
        self.ctx.err(&self.path(name), problem)
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name)
    }

    fn opt_str(&mut self, name: &str) -> Result<Option<String>, ConfigError> {
        match self.take(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(name, &format!("must be a string, not {}", type_name(&v)))),
        }
    }

    /// A list of strings (absent or null: empty).
    fn opt_str_list(&mut self, name: &str) -> Result<Vec<String>, ConfigError> {
        match self.take(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s),
                    other => Err(self.err(
                        &format!("{name}[{i}]"),
                        &format!("must be a string, not {}", type_name(&other)),
                    )),
                })
                .collect(),
            Some(v) => Err(self.err(
                name,
                &format!("must be a list of strings, not {}", type_name(&v)),
            )),
        }
    }

    fn req_str(&mut self, name: &str) -> Result<String, ConfigError> {
        self.opt_str(name)?
            .ok_or_else(|| self.err(name, "is required (a string)"))
    }

    fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, ConfigError> {
        match self.take(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(v) => Err(self.err(
                name,
                &format!("must be true or false, not {}", type_name(&v)),
            )),
        }
    }

    fn opt_u64(&mut self, name: &str) -> Result<Option<u64>, ConfigError> {
        match self.take(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.err(name, &format!("must be a whole number ≥ 0, not {n}"))),
            Some(v) => Err(self.err(
                name,
                &format!("must be a whole number ≥ 0, not {}", type_name(&v)),
            )),
        }
    }

    fn opt_obj(&mut self, name: &str) -> Result<Option<Obj<'a>>, ConfigError> {
        match self.take(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Obj::new(self.ctx, &self.path(name), m))),
            Some(v) => Err(self.err(name, &format!("must be an object, not {}", type_name(&v)))),
        }
    }

    /// Fails on the first field nobody consumed.
    fn finish(self) -> Result<(), ConfigError> {
        if let Some(name) = self.map.keys().next() {
            return Err(self.err(
                name,
                "unknown field (check the spelling; see config.json.example)",
            ));
        }
        Ok(())
    }
}

fn parse_socket_addr(obj: &Obj, field: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        obj.ctx.err(
            field,
            &format!(
                "{s:?} is not an IP address with a port (like \"0.0.0.0:{DEFAULT_PORT}\" or \"[::]:{DEFAULT_PORT}\")"
            ),
        )
    })
}

/// A `host:port` string or a non-empty list of them without duplicates (`listen`,
/// `listen_tcp`); `None` when the field is absent. Port 0 is refused.
fn parse_addr_list(
    ctx: &Ctx,
    obj: &mut Obj,
    name: &str,
) -> Result<Option<Vec<SocketAddr>>, ConfigError> {
    let list = match obj.take(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => vec![parse_socket_addr(obj, name, &s)?],
        Some(Value::Array(items)) => {
            let mut out = Vec::new();
            for (i, item) in items.into_iter().enumerate() {
                let field = format!("{name}[{i}]");
                let Value::String(s) = item else {
                    return Err(ctx.err(
                        &field,
                        &format!("must be a string, not {}", type_name(&item)),
                    ));
                };
                let addr = parse_socket_addr(obj, &field, &s)?;
                if out.contains(&addr) {
                    return Err(ctx.err(&field, &format!("{addr} is listed twice")));
                }
                out.push(addr);
            }
            if out.is_empty() {
                return Err(ctx.err(name, "the list is empty; give at least one host:port"));
            }
            out
        }
        Some(v) => {
            return Err(ctx.err(
                name,
                &format!(
                    "must be a \"host:port\" string or a list of them, not {}",
                    type_name(&v)
                ),
            ));
        }
    };
    if let Some(a) = list.iter().find(|a| a.port() == 0) {
        return Err(ctx.err(name, &format!("{a}: the port must not be 0")));
    }
    Ok(Some(list))
}

/// `fallback`: `{"target": "IP:port"}`, where connections to `listen_tcp` that are not OSTP go.
fn parse_fallback(obj: &mut Obj) -> Result<Option<FallbackConfig>, ConfigError> {
    let Some(mut f) = obj.opt_obj("fallback")? else {
        return Ok(None);
    };
    let target = f.req_str("target")?;
    let target = target.parse().map_err(|_| {
        f.err(
            "target",
            &format!("{target:?} is not an IP address with a port (like \"127.0.0.1:8080\")"),
        )
    })?;
    f.finish()?;
    Ok(Some(FallbackConfig { target }))
}

fn parse_server(ctx: &Ctx, mut obj: Obj) -> Result<ServerConfig, ConfigError> {
    let listen = parse_addr_list(ctx, &mut obj, "listen")?
        .unwrap_or_else(|| vec![SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))]);
    let listen_tcp = parse_addr_list(ctx, &mut obj, "listen_tcp")?.unwrap_or_default();
    let fallback = parse_fallback(&mut obj)?;
    if fallback.is_some() && listen_tcp.is_empty() {
        return Err(ctx.err(
            "fallback",
            "is set but listen_tcp is not: the fallback serves connections to the TCP listener",
        ));
    }
    let max_unauthenticated_tcp = bounded_u32(
        &mut obj,
        "max_unauthenticated_tcp",
        DEFAULT_MAX_UNAUTHENTICATED_TCP,
        1,
        65_536,
    )?;

    let mut access_keys: Vec<AccessKeyEntry> = Vec::new();
    match obj.take("access_keys") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                let field = format!("access_keys[{i}]");
                let entry = match item {
                    Value::String(key) => AccessKeyEntry {
                        key,
                        name: None,
                        limit_bytes: None,
                    },
                    Value::Object(m) => {
                        let mut e = Obj::new(ctx, &field, m);
                        let key = e.req_str("key")?;
                        let name = e.opt_str("name")?;
                        let limit_bytes = e.opt_u64("limit_bytes")?;
                        e.finish()?;
                        AccessKeyEntry {
                            key,
                            name,
                            limit_bytes,
                        }
                    }
                    other => {
                        return Err(ctx.err(
                            &field,
                            &format!(
                                "must be a key string or an object {{\"key\", \"name\", \"limit_bytes\"}}, not {}",
                                type_name(&other)
                            ),
                        ));
                    }
                };
                keys::validate_key(&entry.key).map_err(|e| ctx.err(&field, &e.to_string()))?;
                if access_keys.iter().any(|k| k.key == entry.key) {
                    return Err(ctx.err(
                        &field,
                        &format!("the key {} is listed twice", keys::mask(&entry.key)),
                    ));
                }
                access_keys.push(entry);
            }
        }
        Some(v) => {
            return Err(ctx.err(
                "access_keys",
                &format!("must be a list, not {}", type_name(&v)),
            ));
        }
    }

    let mut api = ApiConfig::default();
    if let Some(mut a) = obj.opt_obj("api")? {
        if let Some(b) = a.opt_bool("enabled")? {
            api.enabled = b;
        }
        if let Some(b) = a.opt_str("bind")? {
            api.bind = parse_socket_addr(&a, "api.bind", &b)?;
        }
        if let Some(t) = a.opt_str("token")? {
            api.token = t;
        }
        if let Some(t) = a.opt_str("metrics_token")? {
            api.metrics_token = t;
        }
        let d = ApiConfig::default();
        api.max_connections = bounded_u32(&mut a, "max_connections", d.max_connections, 1, 65_536)?;
        api.max_connections_per_address = bounded_u32(
            &mut a,
            "max_connections_per_address",
            d.max_connections_per_address,
            1,
            65_536,
        )?;
        api.head_timeout_secs =
            bounded_u32(&mut a, "head_timeout_secs", d.head_timeout_secs, 1, 300)?;
        a.finish()?;
    }
    let loopback_only = !api.enabled || api.bind.ip().is_loopback();
    if !api.token.is_empty() {
        keys::validate_token(&api.token, loopback_only)
            .map_err(|e| ctx.err("api.token", &e.to_string()))?;
    }
    check_metrics_token(ctx, &api, loopback_only)?;
    let mut metrics = MetricsConfig::default();
    if let Some(mut m) = obj.opt_obj("metrics")? {
        if let Some(b) = m.opt_bool("per_user")? {
            metrics.per_user = b;
        }
        m.finish()?;
    }
    if api.enabled && api.token.is_empty() && !api.bind.ip().is_loopback() {
        return Err(ctx.err(
            "api.token",
            &format!(
                "is empty while api.bind is {} (not a loopback address): an open API would let anyone on the \
                 network manage users. Set a token, or bind the API to 127.0.0.1",
                api.bind
            ),
        ));
    }
    let public_host = obj.opt_str("public_host")?.filter(|h| !h.trim().is_empty());
    if let Some(h) = &public_host {
        let bare = h.trim_start_matches('[').trim_end_matches(']');
        if bare.contains(['/', '@', ' ', '?', '#']) || bare.is_empty() {
            return Err(ctx.err(
                "public_host",
                &format!("{h:?} is not a host name or IP address"),
            ));
        }
    }

    let public_port = opt_port(&mut obj, "public_port")?;
    let public_tcp_port = opt_port(&mut obj, "public_tcp_port")?;

    let state_file = match obj.opt_str("state_file")? {
        Some(s) if s.trim().is_empty() => {
            return Err(ctx.err("state_file", "must not be empty"));
        }
        Some(s) => resolve_beside(ctx.file, Path::new(&s)),
        None => default_state_file(ctx.file),
    };

    let log_level = match obj.opt_str("log_level")? {
        None => log::LevelFilter::Info,
        Some(s) => parse_level(&s).ok_or_else(|| {
            ctx.err(
                "log_level",
                &format!("{s:?} is not one of off, error, warn, info, debug, trace"),
            )
        })?,
    };
    let allow_private_destinations = obj.opt_bool("allow_private_destinations")?.unwrap_or(false);
    let allow_symlinked_state = obj.opt_bool("allow_symlinked_state")?.unwrap_or(false);
    let max_sessions = bounded_u32(&mut obj, "max_sessions", DEFAULT_MAX_SESSIONS, 1, 1_000_000)?;
    if max_sessions > 65_535 {
        // Accepted as before (a config that worked keeps starting), but said.
        log::warn!(
            "max_sessions {max_sessions}: a server holds at most 65,535 sessions (the token \
             table's session slots are 16-bit); it acts as 65,535"
        );
    }
    let max_sessions_per_user = bounded_u32(
        &mut obj,
        "max_sessions_per_user",
        DEFAULT_MAX_SESSIONS_PER_USER,
        1,
        10_000,
    )?;
    let limits = parse_limits(&mut obj)?;
    let udp_offload = parse_udp_offload(&mut obj)?;
    obj.finish()?;
    Ok(ServerConfig {
        path: ctx.file.to_path_buf(),
        listen,
        access_keys,
        api,
        metrics,
        public_host,
        public_port,
        public_tcp_port,
        state_file,
        allow_symlinked_state,
        log_level,
        allow_private_destinations,
        max_sessions,
        max_sessions_per_user,
        limits,
        udp_offload,
        listen_tcp,
        fallback,
        max_unauthenticated_tcp,
    })
}

/// `api.metrics_token`: validated like `api.token`, only beside a token (an open API already
/// serves `/metrics`), and different from it (otherwise the scraper could manage users).
fn check_metrics_token(ctx: &Ctx, api: &ApiConfig, loopback_only: bool) -> Result<(), ConfigError> {
    let field = "api.metrics_token";
    if api.metrics_token.is_empty() {
        return Ok(());
    }
    keys::validate_token(&api.metrics_token, loopback_only)
        .map_err(|e| ctx.err(field, &e.to_string()))?;
    if api.token.is_empty() {
        return Err(ctx.err(
            field,
            "is set but api.token is empty: an API without a token serves /metrics to every local client anyway; set api.token too",
        ));
    }
    if keys::ct_eq(api.metrics_token.as_bytes(), api.token.as_bytes()) {
        return Err(ctx.err(
            field,
            "is the same as api.token; give the scraper its own token so that it cannot manage users",
        ));
    }
    Ok(())
}

fn parse_limits(obj: &mut Obj) -> Result<ServerLimits, ConfigError> {
    let d = ServerLimits::default();
    let limits = ServerLimits {
        max_streams: bounded_u32(obj, "max_streams", d.max_streams, 1, 1 << 20)?,
        max_streams_per_user: bounded_u32(
            obj,
            "max_streams_per_user",
            d.max_streams_per_user,
            1,
            1 << 20,
        )?,
        dns_threads: bounded_u32(obj, "dns_threads", d.dns_threads, 1, 64)?,
        max_dns_lookups_per_user: bounded_u32(
            obj,
            "max_dns_lookups_per_user",
            d.max_dns_lookups_per_user,
            1,
            1024,
        )?,
        dns_timeout_secs: bounded_u32(obj, "dns_timeout_secs", d.dns_timeout_secs, 1, 60)?,
        dns_negative_ttl_secs: bounded_u32(
            obj,
            "dns_negative_ttl_secs",
            d.dns_negative_ttl_secs,
            0,
            3600,
        )?,
        max_buffered_bytes_per_user: bounded_u64(
            obj,
            "max_buffered_bytes_per_user",
            d.max_buffered_bytes_per_user,
        )?,
        max_buffered_bytes: bounded_u64(obj, "max_buffered_bytes", d.max_buffered_bytes)?,
        stream_idle_timeout_secs: bounded_u32(
            obj,
            "stream_idle_timeout_secs",
            d.stream_idle_timeout_secs,
            1,
            86_400,
        )?,
        half_closed_timeout_secs: bounded_u32(
            obj,
            "half_closed_timeout_secs",
            d.half_closed_timeout_secs,
            1,
            86_400,
        )?,
        fd_reserve: bounded_u32(obj, "fd_reserve", d.fd_reserve, 16, 1 << 20)?,
        handshake_rate: bounded_u32(obj, "handshake_rate", d.handshake_rate, 1, 1_000_000)?,
        handshake_burst: bounded_u32(obj, "handshake_burst", d.handshake_burst, 1, 1_000_000)?,
        handshake_rate_per_user: bounded_u32(
            obj,
            "handshake_rate_per_user",
            d.handshake_rate_per_user,
            1,
            1_000_000,
        )?,
        handshake_burst_per_user: bounded_u32(
            obj,
            "handshake_burst_per_user",
            d.handshake_burst_per_user,
            1,
            1_000_000,
        )?,
    };
    Ok(limits)
}

/// A byte count of at least 64 KiB (one stream's buffers) and at most 1 TiB.
fn bounded_u64(obj: &mut Obj, name: &str, default: u64) -> Result<u64, ConfigError> {
    const MIN: u64 = 64 * 1024;
    const MAX: u64 = 1 << 40;
    match obj.opt_u64(name)? {
        None => Ok(default),
        Some(v) if (MIN..=MAX).contains(&v) => Ok(v),
        Some(v) => Err(obj.err(name, &format!("{v} is out of range {MIN}..={MAX}"))),
    }
}

fn bounded_u32(
    obj: &mut Obj,
    name: &str,
    default: u32,
    min: u32,
    max: u32,
) -> Result<u32, ConfigError> {
    match obj.opt_u64(name)? {
        None => Ok(default),
        Some(v) if v >= u64::from(min) && v <= u64::from(max) => Ok(v as u32),
        Some(v) => Err(obj.err(name, &format!("{v} is out of range {min}..={max}"))),
    }
}

fn parse_client(mut obj: Obj) -> Result<ClientConfig, ConfigError> {
    let server = obj.req_str("server")?;
    if split_host_port(&server).is_none() {
        return Err(obj.err(
            "server",
            &format!("{server:?} is not host:port (like \"example.com:{DEFAULT_PORT}\" or \"[2001:db8::1]:{DEFAULT_PORT}\")"),
        ));
    }
    let access_key = obj.req_str("access_key")?;
    keys::validate_key(&access_key).map_err(|e| obj.err("access_key", &e.to_string()))?;
    let socks5_bind = obj
        .opt_str("socks5_bind")?
        .unwrap_or_else(|| DEFAULT_SOCKS5_BIND.to_string());
    parse_socket_addr(&obj, "socks5_bind", &socks5_bind)?;

    let mut cfg = ClientConfig::for_server(server, access_key);
    cfg.socks5_bind = socks5_bind;
    if let Some(a) = obj.opt_obj("socks5_auth")? {
        cfg.socks5_auth = Some(parse_proxy_auth(a)?);
    }
    if let Some(b) = obj.opt_bool("allow_open_proxy")? {
        cfg.allow_open_proxy = b;
    }
    if let Some(ip) = obj.opt_str("udp_bind_ip")? {
        let parsed = ip
            .parse()
            .map_err(|_| obj.err("udp_bind_ip", &format!("{ip:?} is not an IP address")))?;
        cfg.udp_bind_ip = Some(parsed);
    }
    cfg.udp_offload = parse_udp_offload(&mut obj)?;
    if let Some(secs) = obj.opt_u64("local_idle_timeout_secs")? {
        if !(1..=MAX_LOCAL_IDLE_TIMEOUT_SECS).contains(&secs) {
            return Err(obj.err(
                "local_idle_timeout_secs",
                &format!("{secs} is out of range 1..={MAX_LOCAL_IDLE_TIMEOUT_SECS}"),
            ));
        }
        cfg.local_idle_timeout_secs = Some(secs as u32);
    }
    if let Some(t) = obj.opt_obj("transport")? {
        cfg.transport = parse_transport(t)?;
    }
    if let Some(mut t) = obj.opt_obj("tun")? {
        parse_tun(&mut t, &mut cfg.tun)?;
        t.finish()?;
    }
    if let Some(mut e) = obj.opt_obj("exclude")? {
        cfg.exclude = ExcludeConfig {
            ips: e.opt_str_list("ips")?,
            domains: e.opt_str_list("domains")?,
        };
        if let Err(problem) = cfg.exclude.matcher() {
            let field = match problem {
                crate::tunnel::exclude::ExcludeError::BadCidr(_) => "ips",
                crate::tunnel::exclude::ExcludeError::BadDomain(_) => "domains",
            };
            return Err(e.err(field, &problem.to_string()));
        }
        e.finish()?;
    }
    if let Some(mut d) = obj.opt_obj("dns_forward")? {
        let mut addr = |name: &str, default: &str| -> Result<SocketAddr, ConfigError> {
            let text = d.opt_str(name)?.unwrap_or_else(|| default.to_string());
            text.parse().map_err(|_| {
                d.err(
                    name,
                    &format!("{text:?} is not an IP address with a port, e.g. {default:?}"),
                )
            })
        };
        let bind = addr("bind", "127.0.0.1:5353")?;
        let upstream = addr("upstream", "1.1.1.1:53")?;
        cfg.dns_forward = Some(DnsForwardConfig { bind, upstream });
        d.finish()?;
    }
    if let Some(mut r) = obj.opt_obj("redir")? {
        cfg.redir = Some(parse_redir(&mut r)?);
        r.finish()?;
    }
    if let Some(mut t) = obj.opt_obj("turn")? {
        if let Some(b) = t.opt_bool("enabled")? {
            cfg.turn.enabled = b;
        }
        t.finish()?;
    }
    if let Some(mut m) = obj.opt_obj("mux")? {
        if let Some(b) = m.opt_bool("enabled")? {
            cfg.mux.enabled = b;
        }
        cfg.mux.sessions = bounded_u32(&mut m, "sessions", 1, 1, MAX_MUX_SESSIONS)?;
        m.finish()?;
    }
    if let Some(d) = obj.opt_bool("debug")? {
        cfg.debug = d;
    }
    obj.finish()?;
    Ok(cfg)
}

/// `transport`: `mode` one of `udp` (default), `uot`, `auto`; `tcp_port` 1..=65535.
fn parse_transport(mut t: Obj) -> Result<TransportConfig, ConfigError> {
    let mode = match t.opt_str("mode")?.as_deref() {
        None | Some("udp") => CarrierMode::Udp,
        Some("uot") => CarrierMode::Uot,
        Some("auto") => CarrierMode::Auto,
        Some(other) => {
            return Err(t.err(
                "mode",
                &format!("{other:?} is not one of \"udp\", \"uot\", \"auto\""),
            ));
        }
    };
    let tcp_port = opt_port(&mut t, "tcp_port")?;
    t.finish()?;
    Ok(TransportConfig { mode, tcp_port })
}

/// An optional port number field (1..=65535).
fn opt_port(obj: &mut Obj, name: &str) -> Result<Option<u16>, ConfigError> {
    match obj.opt_u64(name)? {
        None => Ok(None),
        Some(p @ 1..=65535) => Ok(Some(p as u16)),
        Some(p) => Err(obj.err(name, &format!("{p} is not a port in 1-65535"))),
    }
}

/// `socks5_auth`: 1..=255 bytes each (RFC 1929), no `:` in the username (HTTP `Basic` splits
/// at the first one), no control characters.
fn parse_proxy_auth(mut a: Obj) -> Result<ProxyAuth, ConfigError> {
    let username = a.req_str("username")?;
    let password = a.req_str("password")?;
    for (name, value) in [("username", &username), ("password", &password)] {
        if value.is_empty() || value.len() > 255 {
            return Err(a.err(name, "must be 1 to 255 bytes long"));
        }
        if value.chars().any(char::is_control) {
            return Err(a.err(name, "must not contain control characters"));
        }
    }
    if username.contains(':') {
        return Err(a.err(
            "username",
            "must not contain ':' (HTTP Basic auth splits at it)",
        ));
    }
    a.finish()?;
    Ok(ProxyAuth { username, password })
}

/// Parses a log level name (case-insensitive).
pub fn parse_level(s: &str) -> Option<log::LevelFilter> {
    s.trim().parse().ok()
}

/// `rel` interpreted relative to the directory of `config` (absolute paths are kept).
fn resolve_beside(config: &Path, rel: &Path) -> PathBuf {
    if rel.is_absolute() {
        return rel.to_path_buf();
    }
    match config.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(rel),
        _ => rel.to_path_buf(),
    }
}

/// The default state file: `<config stem>.state.json` beside the config file.
pub fn default_state_file(config: &Path) -> PathBuf {
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config".to_string());
    resolve_beside(config, Path::new(&format!("{stem}.state.json")))
}

/// A fresh server config as JSON text (for `--init server` and the first run).
pub fn server_template(access_key: &str, api_token: &str) -> String {
    let v = serde_json::json!({
        "mode": "server",
        "listen": format!("0.0.0.0:{DEFAULT_PORT}"),
        "listen_tcp": format!("0.0.0.0:{DEFAULT_PORT}"),
        "access_keys": [access_key],
        "api": { "enabled": true, "bind": DEFAULT_API_BIND, "token": api_token },
        "public_host": "",
        "log_level": "info",
        "allow_private_destinations": false,
        "max_sessions": DEFAULT_MAX_SESSIONS,
        "max_sessions_per_user": DEFAULT_MAX_SESSIONS_PER_USER
    });
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    s
}

/// A client config as JSON text (for `--init client`).
pub fn client_template(server: &str, access_key: &str) -> String {
    client_config_text(&ClientConfig::for_server(
        server.to_string(),
        access_key.to_string(),
    ))
}

/// A client config as pretty JSON text with a final newline.
pub fn client_config_text(cfg: &ClientConfig) -> String {
    let mut s = serde_json::to_string_pretty(cfg).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c8a6fde902b4e23910cde882b7cf1612";

    fn p(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("/etc/ostp/config.json"), text)
    }

    fn server(text: &str) -> ServerConfig {
        match p(text).unwrap() {
            Config::Server(s) => s,
            Config::Client(_) => panic!("expected server"),
        }
    }

    #[test]
    fn api_connection_limits_parse_and_name_the_field() {
        let base = r#"{"mode": "server", "api": {"enabled": true, "bind": "127.0.0.1:9090"}}"#;
        let d = server(base).api;
        assert_eq!(
            (
                d.max_connections,
                d.max_connections_per_address,
                d.head_timeout_secs
            ),
            (256, 32, 5)
        );
        let s = server(
            r#"{"mode": "server", "api": {"enabled": true, "bind": "127.0.0.1:9090",
                "max_connections": 64, "max_connections_per_address": 8, "head_timeout_secs": 2}}"#,
        );
        assert_eq!(
            (
                s.api.max_connections,
                s.api.max_connections_per_address,
                s.api.head_timeout_secs
            ),
            (64, 8, 2)
        );
        let e = p(r#"{"mode": "server", "api": {"max_connections_per_address": 0}}"#).unwrap_err();
        assert!(
            e.to_string().contains("api.max_connections_per_address"),
            "{e}"
        );
    }

    #[test]
    fn server_limits_default_and_parse() {
        let base = r#"{"mode": "server", "listen": "127.0.0.1:9000", "access_keys": []}"#;
        assert_eq!(server(base).limits, ServerLimits::default());
        let s = server(
            r#"{"mode": "server", "listen": "127.0.0.1:9000", "access_keys": [],
                "max_streams": 100, "max_streams_per_user": 10, "dns_threads": 2,
                "max_dns_lookups_per_user": 1, "dns_timeout_secs": 2,
                "dns_negative_ttl_secs": 0, "max_buffered_bytes_per_user": 1048576,
                "max_buffered_bytes": 4194304, "stream_idle_timeout_secs": 30,
                "half_closed_timeout_secs": 5, "fd_reserve": 64,
                "handshake_rate": 50, "handshake_burst": 60,
                "handshake_rate_per_user": 5, "handshake_burst_per_user": 8}"#,
        );
        let l = s.limits;
        assert_eq!(
            (l.max_streams, l.max_streams_per_user, l.dns_threads),
            (100, 10, 2)
        );
        assert_eq!((l.max_dns_lookups_per_user, l.dns_timeout_secs), (1, 2));
        assert_eq!(l.dns_negative_ttl_secs, 0);
        assert_eq!(
            (l.max_buffered_bytes_per_user, l.max_buffered_bytes),
            (1 << 20, 4 << 20)
        );
        assert_eq!(
            (l.stream_idle_timeout_secs, l.half_closed_timeout_secs),
            (30, 5)
        );
        assert_eq!(l.fd_reserve, 64);
        assert_eq!(
            (
                l.handshake_rate,
                l.handshake_burst,
                l.handshake_rate_per_user,
                l.handshake_burst_per_user
            ),
            (50, 60, 5, 8)
        );
        for bad in [
            r#""handshake_rate_per_user": 0"#,
            r#""handshake_burst": 0"#,
            r#""dns_threads": 0"#,
            r#""max_buffered_bytes": 1000"#,
            r#""fd_reserve": 1"#,
            r#""stream_idle_timeout_secs": 0"#,
        ] {
            let text = format!(
                r#"{{"mode": "server", "listen": "127.0.0.1:9000", "access_keys": [], {bad}}}"#
            );
            let err = p(&text).unwrap_err().to_string();
            assert!(err.contains("out of range"), "{bad}: {err}");
        }
    }

    #[test]
    fn spec_example_parses_with_defaults() {
        let s = server(&format!(
            r#"{{ "mode": "server", "listen": "0.0.0.0:50000", "access_keys": ["{KEY}"], "api": {{ "enabled": true, "bind": "127.0.0.1:9090", "token": "your-secret-api-token" }} }}"#
        ));
        assert_eq!(s.listen, vec!["0.0.0.0:50000".parse().unwrap()]);
        assert_eq!(s.access_keys[0].key, KEY);
        assert!(s.api.enabled);
        assert_eq!(s.api.token, "your-secret-api-token");
        assert_eq!(s.state_file, PathBuf::from("/etc/ostp/config.state.json"));
        assert_eq!(s.log_level, log::LevelFilter::Info);
        assert!(!s.allow_private_destinations);
        assert_eq!(s.tunnel_port(), 50000);
        assert_eq!(s.public_tcp_carrier_port(), None);
    }

    /// Behind nginx `stream` or a port forward, links and client configs name the ports clients
    /// reach, not the ones ostp listens on.
    #[test]
    fn public_ports_name_what_clients_reach() {
        let base = format!(
            r#""mode": "server", "listen": "0.0.0.0:50000", "listen_tcp": "127.0.0.1:50001", "access_keys": ["{KEY}"]"#
        );
        let s = server(&format!("{{{base}}}"));
        assert_eq!(
            (s.tunnel_port(), s.public_tcp_carrier_port()),
            (50000, Some(50001))
        );
        let s = server(&format!(
            r#"{{{base}, "public_port": 5353, "public_tcp_port": 443}}"#
        ));
        assert_eq!(
            (s.tunnel_port(), s.public_tcp_carrier_port()),
            (5353, Some(443))
        );
        // No TCP listener: no TCP port is offered, whatever public_tcp_port says.
        let s = server(
            r#"{"mode": "server", "listen": "0.0.0.0:50000", "access_keys": [], "public_tcp_port": 443}"#,
        );
        assert_eq!(s.public_tcp_carrier_port(), None);
        for bad in ["0", "65536", "\"443\""] {
            let text = format!(r#"{{{base}, "public_tcp_port": {bad}}}"#);
            assert!(p(&text).is_err(), "{bad}");
            let text = format!(r#"{{{base}, "public_port": {bad}}}"#);
            assert!(p(&text).is_err(), "{bad}");
        }
    }

    #[test]
    fn listen_list_and_key_objects() {
        let s = server(&format!(
            r#"{{ "mode": "server", "listen": ["0.0.0.0:5000", "[::]:5000"],
                 "access_keys": [{{"key": "{KEY}", "name": "alice", "limit_bytes": 1000}}],
                 "state_file": "state/s.json", "public_host": "vpn.example.com", "log_level": "DEBUG" }}"#
        ));
        assert_eq!(s.listen.len(), 2);
        assert_eq!(s.access_keys[0].name.as_deref(), Some("alice"));
        assert_eq!(s.access_keys[0].limit_bytes, Some(1000));
        assert_eq!(s.state_file, PathBuf::from("/etc/ostp/state/s.json"));
        assert_eq!(s.public_host.as_deref(), Some("vpn.example.com"));
        assert_eq!(s.log_level, log::LevelFilter::Debug);
    }

    #[test]
    fn the_example_config_parses() {
        let s = server(include_str!("../config.json.example"));
        assert_eq!(s.listen_tcp, s.listen);
        assert!(s.fallback.is_some());
    }

    #[test]
    fn tcp_carrier_fields_parse_like_listen_and_name_the_field() {
        let s = server(r#"{"mode": "server"}"#);
        assert!(s.listen_tcp.is_empty(), "no TCP listener unless asked");
        assert_eq!(s.fallback, None);
        assert_eq!(s.max_unauthenticated_tcp, 256);
        let s = server(
            r#"{"mode": "server", "listen_tcp": "0.0.0.0:443",
                "fallback": {"target": "127.0.0.1:8080"}, "max_unauthenticated_tcp": 10}"#,
        );
        assert_eq!(s.listen_tcp, ["0.0.0.0:443".parse().unwrap()]);
        let target = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(s.fallback, Some(FallbackConfig { target }));
        assert_eq!(s.max_unauthenticated_tcp, 10);
        let s = server(r#"{"mode": "server", "listen_tcp": ["0.0.0.0:443", "[::]:443"]}"#);
        assert_eq!(s.listen_tcp.len(), 2);
        for (text, field, problem) in [
            (r#""listen_tcp": []"#, "listen_tcp", "empty"),
            (r#""listen_tcp": 443"#, "listen_tcp", "a list of them"),
            (
                r#""listen_tcp": "0.0.0.0:0""#,
                "listen_tcp",
                "must not be 0",
            ),
            (
                r#""listen_tcp": ["1.2.3.4:5", 6]"#,
                "listen_tcp[1]",
                "a string",
            ),
            (
                r#""listen_tcp": ["1.2.3.4:5", "1.2.3.4:5"]"#,
                "listen_tcp[1]",
                "twice",
            ),
            (
                r#""listen_tcp": "example.com:443""#,
                "listen_tcp",
                "IP address",
            ),
            (
                r#""listen_tcp": "0.0.0.0:1", "fallback": {"target": "localhost:80"}"#,
                "fallback.target",
                "IP address with a port",
            ),
            (
                r#""listen_tcp": "0.0.0.0:1", "fallback": {}"#,
                "fallback.target",
                "required",
            ),
            (
                r#""listen_tcp": "0.0.0.0:1", "fallback": {"target": "127.0.0.1:80", "x": 1}"#,
                "fallback.x",
                "unknown field",
            ),
            (
                r#""fallback": {"target": "127.0.0.1:80"}"#,
                "fallback",
                "listen_tcp is not",
            ),
            (
                r#""max_unauthenticated_tcp": 0"#,
                "max_unauthenticated_tcp",
                "range",
            ),
        ] {
            let e = p(&format!(r#"{{"mode": "server", {text}}}"#)).unwrap_err();
            assert_eq!(e.field, field, "{text}: {e}");
            assert!(e.problem.contains(problem), "{text}: {e}");
        }
    }

    #[test]
    fn errors_name_file_field_and_problem() {
        let e = p(r#"{"mode": "server", "lisen": "0.0.0.0:1"}"#).unwrap_err();
        assert_eq!(e.field, "lisen");
        assert!(
            e.to_string()
                .starts_with("/etc/ostp/config.json: field `lisen`: unknown field")
        );

        let e = p(r#"{"mode": "server", "api": {"bind": "nowhere"}}"#).unwrap_err();
        assert_eq!(e.field, "api.bind");

        let e = p(r#"{"mode": "server", "api": {"enabled": "yes"}}"#).unwrap_err();
        assert_eq!(e.field, "api.enabled");
        assert!(e.problem.contains("true or false"));

        let e = p(r#"{"mode": "server", "access_keys": ["short"]}"#).unwrap_err();
        assert_eq!(e.field, "access_keys[0]");

        let e = p(&format!(
            r#"{{"mode": "server", "access_keys": [{{"key": "{KEY}", "limit_bytes": -1}}]}}"#
        ))
        .unwrap_err();
        assert_eq!(e.field, "access_keys[0].limit_bytes");

        let e = p(&format!(
            r#"{{"mode": "server", "access_keys": ["{KEY}", "{KEY}"]}}"#
        ))
        .unwrap_err();
        assert_eq!(e.field, "access_keys[1]");
        assert!(
            !e.to_string().contains(KEY),
            "full key must not appear in messages"
        );

        let e = p(r#"{"mode": "relay"}"#).unwrap_err();
        assert_eq!(e.field, "mode");
        let e = p(r#"[1]"#).unwrap_err();
        assert_eq!(e.field, "");
        let e = p(r#"{"mode": "server""#).unwrap_err();
        assert!(e.problem.contains("not valid JSON"));
    }

    #[test]
    fn open_api_only_on_loopback() {
        assert!(
            p(r#"{"mode": "server", "api": {"enabled": true, "bind": "127.0.0.1:9090"}}"#).is_ok()
        );
        assert!(p(r#"{"mode": "server", "api": {"enabled": true, "bind": "[::1]:9090"}}"#).is_ok());
        let e = p(r#"{"mode": "server", "api": {"enabled": true, "bind": "0.0.0.0:9090"}}"#)
            .unwrap_err();
        assert_eq!(e.field, "api.token");
        assert!(p(r#"{"mode": "server", "api": {"enabled": true, "bind": "0.0.0.0:9090", "token": "0123456789abcdef"}}"#).is_ok());
    }

    #[test]
    fn api_tokens_are_checked_at_load() {
        let with = |bind: &str, token: &str| {
            let v = serde_json::json!({"mode": "server", "api": {"enabled": true, "bind": bind, "token": token}});
            p(&v.to_string())
        };
        for (bind, token) in [
            ("0.0.0.0:9090", "x"),
            ("[::]:9090", "0123456789abcde"),
            ("192.168.1.1:9090", "short-token"),
            ("127.0.0.1:9090", " 0123456789abcdef"),
            ("127.0.0.1:9090", "0123456789abcdef "),
            ("127.0.0.1:9090", "0123456789abcdéf"),
            ("0.0.0.0:9090", "0123456789abcdef\n"),
        ] {
            let e = with(bind, token).unwrap_err();
            assert_eq!(e.field, "api.token", "{bind} {token:?}");
            if token.len() > 4 {
                assert!(!e.to_string().contains(token.trim()), "token echoed: {e}");
            }
        }
        assert!(
            with("127.0.0.1:9090", "x").is_ok(),
            "a short token on loopback is allowed"
        );
        assert!(with("0.0.0.0:9090", "0123456789abcdef").is_ok());
        assert!(with("0.0.0.0:9090", "pass phrase with spaces!").is_ok());
    }

    #[test]
    fn metrics_token_and_per_user() {
        let with = |api: Value, extra: Value| {
            let mut v = serde_json::json!({"mode": "server", "api": api});
            if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
                m.extend(e);
            }
            p(&v.to_string())
        };
        let none = serde_json::json!({});
        let s = server(r#"{"mode": "server"}"#);
        assert_eq!(
            (s.api.metrics_token.as_str(), s.metrics.per_user),
            ("", true)
        );
        let ok = with(
            serde_json::json!({"enabled": true, "bind": "0.0.0.0:9090", "token": "0123456789abcdef", "metrics_token": "scraper-0123456789"}),
            serde_json::json!({"metrics": {"per_user": false}}),
        );
        let Ok(Config::Server(s)) = ok else {
            panic!("{ok:?}")
        };
        assert_eq!(s.api.metrics_token, "scraper-0123456789");
        assert!(!s.metrics.per_user);
        for (api, why) in [
            (
                serde_json::json!({"enabled": true, "bind": "0.0.0.0:9090", "token": "0123456789abcdef", "metrics_token": "short"}),
                "at least 16",
            ),
            (
                serde_json::json!({"enabled": true, "bind": "127.0.0.1:9090", "token": "x", "metrics_token": " y"}),
                "space",
            ),
            (
                serde_json::json!({"enabled": true, "bind": "127.0.0.1:9090", "metrics_token": "scraper"}),
                "api.token is empty",
            ),
            (
                serde_json::json!({"enabled": true, "bind": "127.0.0.1:9090", "token": "same-token", "metrics_token": "same-token"}),
                "same as api.token",
            ),
        ] {
            let e = with(api.clone(), none.clone()).unwrap_err();
            assert_eq!(e.field, "api.metrics_token", "{api}");
            assert!(e.problem.contains(why), "{api}: {e}");
            assert!(!e.to_string().contains("same-token"), "token echoed: {e}");
        }
        let e = with(
            none.clone(),
            serde_json::json!({"metrics": {"per_user": "no"}}),
        )
        .unwrap_err();
        assert_eq!(e.field, "metrics.per_user");
        let e = with(none, serde_json::json!({"metrics": {"perUser": false}})).unwrap_err();
        assert_eq!(e.field, "metrics.perUser");
    }

    #[test]
    fn client_config_round_trips_through_the_subscribe_shape() {
        let cfg = ClientConfig::for_server("example.com:50000".into(), KEY.into());
        let text = serde_json::to_string(&cfg).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let expected = serde_json::json!({
            "mode": "client",
            "server": "example.com:50000",
            "access_key": KEY,
            "socks5_bind": "127.0.0.1:1088",
            "tun": {"enable": false, "dns": "1.1.1.1"},
            "turn": {"enabled": false},
            "mux": {"enabled": false, "sessions": 1},
            "debug": false
        });
        assert_eq!(v, expected);
        match p(&text).unwrap() {
            Config::Client(c) => assert_eq!(c, cfg),
            Config::Server(_) => panic!("expected client"),
        }
        let e = p(&format!(
            r#"{{"mode":"client","server":"h:1","access_key":"{KEY}","extra":1}}"#
        ))
        .unwrap_err();
        assert_eq!(e.field, "extra");
        let e = p(&format!(
            r#"{{"mode":"client","server":"h","access_key":"{KEY}"}}"#
        ))
        .unwrap_err();
        assert_eq!(e.field, "server");
        let e = p(&format!(
            r#"{{"mode":"client","server":"h:1","access_key":"{KEY}","mux":{{"sessions":99}}}}"#
        ))
        .unwrap_err();
        assert_eq!(e.field, "mux.sessions");
    }

    #[test]
    fn redir_block_is_validated_defaulted_and_written_only_when_set() {
        let client = |extra: &str| {
            p(&format!(
                r#"{{"mode":"client","server":"h:1","access_key":"{KEY}"{extra}}}"#
            ))
        };
        let Ok(Config::Client(plain)) = client("") else {
            panic!("expected a client")
        };
        assert_eq!(plain.redir, None);
        assert!(serde_json::to_value(&plain).unwrap().get("redir").is_none());
        let Ok(Config::Client(c)) = client(r#","redir":{"enabled":true}"#) else {
            panic!("expected a client")
        };
        let r = c.redir.clone().unwrap();
        assert!(r.enabled);
        assert_eq!(r.bind_addr(), Some("0.0.0.0:1090".parse().unwrap()));
        assert_eq!(r.lan_interfaces(), vec!["br-lan".to_string()]);
        assert_eq!(
            serde_json::to_value(&c).unwrap()["redir"],
            serde_json::json!({"enabled": true, "bind": "0.0.0.0:1090"})
        );
        let Ok(Config::Client(c)) = client(
            r#","redir":{"enabled":true,"bind":"[::]:1091","interfaces":["lan0","wlan-guest"]}"#,
        ) else {
            panic!("expected a client")
        };
        let r = c.redir.unwrap();
        assert_eq!(r.bind_addr(), Some("[::]:1091".parse().unwrap()));
        assert_eq!(r.lan_interfaces(), vec!["lan0", "wlan-guest"]);
        for (bad, field) in [
            (r#","redir":{"bind":"1090"}"#, "redir.bind"),
            (r#","redir":{"bind":"0.0.0.0:0"}"#, "redir.bind"),
            (r#","redir":{"enabled":"yes"}"#, "redir.enabled"),
            (r#","redir":{"interfaces":[]}"#, "redir.interfaces"),
            (r#","redir":{"interfaces":["a b"]}"#, "redir.interfaces"),
            (r#","redir":{"interfaces":"br-lan"}"#, "redir.interfaces"),
            (r#","redir":{"port":1}"#, "redir.port"),
        ] {
            assert_eq!(client(bad).unwrap_err().field, field, "{bad}");
        }
    }

    #[test]
    fn udp_offload_defaults_to_auto_on_both_sides_and_takes_off() {
        let base = format!(
            r#""mode": "server", "listen": "0.0.0.0:50000", "access_keys": ["{KEY}"], "api": {{ "enabled": false }}"#
        );
        assert_eq!(server(&format!("{{{base}}}")).udp_offload, UdpOffload::Auto);
        let off = server(&format!(r#"{{{base}, "udp_offload": "off"}}"#));
        assert_eq!(off.udp_offload, UdpOffload::Off);
        let e = p(&format!(r#"{{{base}, "udp_offload": "on"}}"#)).unwrap_err();
        assert_eq!(e.field, "udp_offload");
        let client = |extra: &str| {
            p(&format!(
                r#"{{"mode":"client","server":"h:1","access_key":"{KEY}"{extra}}}"#
            ))
        };
        let Ok(Config::Client(c)) = client("") else {
            panic!("expected a client")
        };
        assert_eq!(c.udp_offload, UdpOffload::Auto);
        let Ok(Config::Client(c)) = client(r#","udp_offload":"off""#) else {
            panic!("expected a client")
        };
        assert_eq!(c.udp_offload, UdpOffload::Off);
        // Written out only when it differs from the default (the subscribe shape is unchanged).
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["udp_offload"], "off");
        assert_eq!(
            client(r#","udp_offload":1"#).unwrap_err().field,
            "udp_offload"
        );
    }

    #[test]
    fn client_transport_modes_ports_and_errors() {
        let client = |extra: &str| {
            p(&format!(
                r#"{{"mode":"client","server":"h:1","access_key":"{KEY}"{extra}}}"#
            ))
        };
        let Ok(Config::Client(c)) = client("") else {
            panic!("expected a client")
        };
        assert_eq!(c.transport, TransportConfig::default());
        assert_eq!(c.transport.mode, CarrierMode::Udp);
        for (mode, want) in [
            ("udp", CarrierMode::Udp),
            ("uot", CarrierMode::Uot),
            ("auto", CarrierMode::Auto),
        ] {
            let extra = format!(r#","transport":{{"mode":"{mode}","tcp_port":443}}"#);
            let Ok(Config::Client(c)) = client(&extra) else {
                panic!("expected a client for {mode}")
            };
            assert_eq!(c.transport.mode, want);
            assert_eq!(c.transport.tcp_port, Some(443));
            // What it writes parses back to the same config.
            let text = serde_json::to_string(&c).unwrap();
            assert!(text.contains(&format!(
                r#""transport":{{"mode":"{mode}","tcp_port":443}}"#
            )));
            assert_eq!(p(&text).unwrap(), Config::Client(c));
        }
        let Ok(Config::Client(c)) = client(r#","transport":{}"#) else {
            panic!("expected a client")
        };
        assert_eq!(c.transport, TransportConfig::default());
        for (extra, field) in [
            (r#","transport":{"mode":"tcp"}"#, "transport.mode"),
            (r#","transport":{"mode":"UOT"}"#, "transport.mode"),
            (r#","transport":{"mode":1}"#, "transport.mode"),
            (r#","transport":{"tcp_port":0}"#, "transport.tcp_port"),
            (r#","transport":{"tcp_port":65536}"#, "transport.tcp_port"),
            (r#","transport":{"tcp_port":"443"}"#, "transport.tcp_port"),
            (r#","transport":{"port":443}"#, "transport.port"),
            (r#","transport":"auto""#, "transport"),
        ] {
            assert_eq!(client(extra).unwrap_err().field, field, "{extra}");
        }
    }

    #[test]
    fn client_proxy_auth_and_open_proxy_fields() {
        let client = |extra: &str| {
            p(&format!(
                r#"{{"mode":"client","server":"h:1","access_key":"{KEY}"{extra}}}"#
            ))
        };
        let Config::Client(c) = client(
            r#","socks5_bind":"0.0.0.0:1","socks5_auth":{"username":"u","password":"p:w"},"allow_open_proxy":true"#,
        )
        .unwrap() else {
            panic!("expected client")
        };
        let auth = c.socks5_auth.clone().unwrap();
        assert_eq!(
            (auth.username.as_str(), auth.password.as_str()),
            ("u", "p:w")
        );
        assert!(c.allow_open_proxy);
        assert_eq!(c.local_idle_timeout_secs, None, "default: 300 s");
        let Config::Client(c) = client(r#","local_idle_timeout_secs":2"#).unwrap() else {
            panic!("expected client")
        };
        assert_eq!(c.local_idle_timeout_secs, Some(2));
        assert!(
            !format!("{c:?}").contains("p:w"),
            "Debug shows the password"
        );
        for (extra, field) in [
            (
                r#","socks5_auth":{"username":"a:b","password":"p"}"#,
                "socks5_auth.username",
            ),
            (
                r#","socks5_auth":{"username":"","password":"p"}"#,
                "socks5_auth.username",
            ),
            (r#","socks5_auth":{"username":"u"}"#, "socks5_auth.password"),
            (
                r#","socks5_auth":{"username":"u","password":"p","x":1}"#,
                "socks5_auth.x",
            ),
            (r#","allow_open_proxy":"yes""#, "allow_open_proxy"),
            (r#","local_idle_timeout_secs":0"#, "local_idle_timeout_secs"),
            (
                r#","local_idle_timeout_secs":604801"#,
                "local_idle_timeout_secs",
            ),
        ] {
            assert_eq!(client(extra).unwrap_err().field, field, "{extra}");
        }
    }

    #[test]
    fn templates_parse() {
        let s = server(&server_template(KEY, "tok"));
        assert!(s.api.enabled);
        // One share link serves both carriers: TCP on the same port number as UDP.
        assert_eq!(s.listen_tcp, s.listen);
        assert_eq!(s.public_host, None);
        assert!(matches!(
            p(&client_template("[::1]:5", KEY)).unwrap(),
            Config::Client(_)
        ));
    }

    #[test]
    fn host_port_splitting() {
        assert_eq!(split_host_port("a.b:1"), Some(("a.b".into(), 1)));
        assert_eq!(split_host_port("[::1]:443"), Some(("::1".into(), 443)));
        assert_eq!(split_host_port("::1:443"), None);
        assert_eq!(split_host_port("a:0"), None);
        assert_eq!(split_host_port(":5"), None);
    }
}
