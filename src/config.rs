//! The configuration file (TOML), shared by offline replay and the live appliance: where the
//! rules are, the ports (name, interface, addresses), the routes, and the conntrack settings
//! under the kernel's sysctl names. Defaults that work; an unknown key, a bad value or an
//! inconsistent setting is an error naming `file:line:col`.
//!
//! Owns only the file's meaning; it opens no sockets and touches no interface.
//!
//! ```toml
//! rules = "home-router.nft"          # relative to this file
//!
//! [[port]]
//! name = "lan"                       # what iifname/oifname rules match
//! interface = "veth-lan"             # the kernel interface it runs on
//! addresses = ["192.168.1.1/24"]     # connected networks follow from these
//!
//! [[port]]
//! name = "wan"
//! interface = "veth-wan"
//! addresses = ["203.0.113.2/24"]
//!
//! [[route]]
//! to = "0.0.0.0/0"                   # or "default"
//! via = "203.0.113.1"
//!
//! [conntrack]
//! max = 262144
//! nf_conntrack_tcp_timeout_established = 432000
//!
//! [dataplane]                        # what only the live appliance (`keepstate run`) reads
//! mode = "router"                    # or "bridge": ports in pairs, no addresses, no routes
//! workers = 2                        # worker threads, one per core (default: auto)
//! busy_poll = false                  # SO_PREFER_BUSY_POLL on the AF_XDP sockets
//! control = "/run/keepstate.sock"    # the control socket (for `keepstate reload`, `ct`)
//! control_group = "adm"              # the group that may use it
//! worker_failure = "exit"            # a worker died or stuck, a port's XDP program gone: exit 1
//!                                    # (or "report": keep going)
//! stall_timeout = 5                  # seconds without a heartbeat before a worker is stuck
//! fastpath_flows = 65536             # the most flows the XDP fast path holds (default:
//!                                    # conntrack's max; at least 512)
//! ```
//!
//! A port may also say `queues = N` (default: every receive queue its interface has).

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

/// A configuration error, already placed at `file:line:col`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}:{col}: {message}")]
    At {
        file: String,
        line: usize,
        col: usize,
        message: String,
    },
}

/// The whole configuration, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The rules file, resolved against the configuration file's directory.
    pub rules: Option<PathBuf>,
    pub ports: Vec<Port>,
    pub routes: Vec<Route>,
    pub conntrack: Conntrack,
    pub dataplane: Dataplane,
}

/// How the live appliance forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Ports have addresses; connected networks and routes decide the egress port, and the
    /// box resolves next hops itself (ARP, IPv6 neighbour discovery).
    #[default]
    Router,
    /// A transparent bridge: ports in pairs (first with second, third with fourth, ...), no
    /// addresses; a frame in on one leaves unchanged by the other.
    Bridge,
}

/// What only the live appliance reads: `[dataplane]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dataplane {
    pub mode: Mode,
    /// Worker threads, each pinned to a core; `None`: as many as the machine has cores,
    /// but no more than the fewest queues of any port.
    pub workers: Option<usize>,
    /// Busy polling on the AF_XDP sockets (`SO_PREFER_BUSY_POLL`, `SO_BUSY_POLL`): the
    /// workers spin instead of sleeping in poll(2).
    pub busy_poll: bool,
    /// The control socket's path (for the live control commands).
    pub control: PathBuf,
    /// The group allowed to use the control socket; `None`: root only.
    pub control_group: Option<String>,
    /// What the appliance does when a worker thread dies (panics) or is stuck, or a port's
    /// XDP program is detached or replaced (its frames bypass the workers).
    pub worker_failure: WorkerFailure,
    /// Seconds a worker may go without a heartbeat (it beats on every turn of its loop, at
    /// least every 100 ms when idle) before it counts as stuck.
    pub stall_timeout: u32,
    /// The most offloaded connections the XDP fast path holds; `None`: as many as conntrack
    /// may track (`[conntrack] max`). A flowtable's flows beyond it stay with the workers
    /// until a refresh finds room, as flows beyond a NIC's offload table stay in software.
    pub fastpath_flows: Option<u32>,
}

/// What the appliance does when a worker dies or is stuck (its queues are no longer served,
/// so the flows the NIC hashes onto them are black-holed while the others pass), or when a
/// port's XDP program is detached or replaced (its frames bypass the firewall).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerFailure {
    /// Log it and exit with status 1, for a supervisor (systemd's `Restart=on-failure`) to
    /// start the appliance again: a clean restart rather than a box that silently drops a
    /// share of its flows. Connections are tracked afresh after the restart.
    #[default]
    Exit,
    /// Log it (rate limited), show it in `keepstate stats`, and keep running on the other
    /// workers; the exit status at the end is 1.
    Report,
}

impl Default for Dataplane {
    fn default() -> Self {
        Dataplane {
            mode: Mode::Router,
            workers: None,
            busy_poll: false,
            control: PathBuf::from("/run/keepstate.sock"),
            control_group: None,
            worker_failure: WorkerFailure::Exit,
            stall_timeout: 5,
            fastpath_flows: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Port {
    pub name: String,
    pub interface: String,
    /// The port's own addresses with their prefix lengths (`192.168.1.1/24`).
    pub addresses: Vec<IpNet>,
    /// How many of the interface's receive queues the dataplane serves (the first N);
    /// `None`: all of them.
    pub queues: Option<u32>,
}

impl Port {
    /// The networks this port is directly connected to.
    pub fn connected(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.addresses.iter().map(|a| a.trunc())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub to: IpNet,
    /// The next hop; `None` for a route straight out of `port`.
    pub via: Option<IpAddr>,
    /// The port the route leaves by: given, or the one whose connected network holds `via`.
    pub port: String,
}

/// Conntrack settings. Timeouts are in seconds, named as the kernel's sysctls
/// (`/proc/sys/net/netfilter/nf_conntrack_*`), with the kernel's defaults.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Conntrack {
    /// `nf_conntrack_max`: the most connections tracked at once.
    pub max: u32,
    /// `nf_conntrack_tcp_loose`: pick up connections already established.
    pub tcp_loose: bool,
    /// `nf_conntrack_tcp_be_liberal`: accept out-of-window segments.
    pub tcp_be_liberal: bool,
    /// `nf_conntrack_checksum`: packets with bad checksums are INVALID.
    pub checksum: bool,
    /// `nf_conntrack_tcp_max_retrans`.
    pub tcp_max_retrans: u32,
    /// `nf_conntrack_expect_max`: the most expectations (FTP, SIP) at once.
    pub expect_max: u32,
    pub nf_conntrack_tcp_timeout_syn_sent: u32,
    pub nf_conntrack_tcp_timeout_syn_recv: u32,
    pub nf_conntrack_tcp_timeout_established: u32,
    pub nf_conntrack_tcp_timeout_fin_wait: u32,
    pub nf_conntrack_tcp_timeout_close_wait: u32,
    pub nf_conntrack_tcp_timeout_last_ack: u32,
    pub nf_conntrack_tcp_timeout_time_wait: u32,
    pub nf_conntrack_tcp_timeout_close: u32,
    pub nf_conntrack_tcp_timeout_max_retrans: u32,
    pub nf_conntrack_tcp_timeout_unacknowledged: u32,
    pub nf_conntrack_udp_timeout: u32,
    pub nf_conntrack_udp_timeout_stream: u32,
    pub nf_conntrack_icmp_timeout: u32,
    pub nf_conntrack_icmpv6_timeout: u32,
    pub nf_conntrack_generic_timeout: u32,
    /// How long an offloaded flow lives after its last packet (a flowtable's, `flow add`).
    pub nf_flowtable_tcp_timeout: u32,
    pub nf_flowtable_udp_timeout: u32,
}

impl Default for Conntrack {
    /// The kernel's defaults (nf_conntrack_proto_*.c, nf_conntrack_core.c).
    fn default() -> Self {
        Conntrack {
            max: 262_144,
            tcp_loose: true,
            tcp_be_liberal: false,
            checksum: true,
            tcp_max_retrans: 3,
            expect_max: 4096,
            nf_conntrack_tcp_timeout_syn_sent: 120,
            nf_conntrack_tcp_timeout_syn_recv: 60,
            nf_conntrack_tcp_timeout_established: 432_000,
            nf_conntrack_tcp_timeout_fin_wait: 120,
            nf_conntrack_tcp_timeout_close_wait: 60,
            nf_conntrack_tcp_timeout_last_ack: 30,
            nf_conntrack_tcp_timeout_time_wait: 120,
            nf_conntrack_tcp_timeout_close: 10,
            nf_conntrack_tcp_timeout_max_retrans: 300,
            nf_conntrack_tcp_timeout_unacknowledged: 300,
            nf_conntrack_udp_timeout: 30,
            nf_conntrack_udp_timeout_stream: 120,
            nf_conntrack_icmp_timeout: 30,
            nf_conntrack_icmpv6_timeout: 30,
            nf_conntrack_generic_timeout: 600,
            nf_flowtable_tcp_timeout: crate::conntrack::flowtable::FLOW_TIMEOUT_SECS,
            nf_flowtable_udp_timeout: crate::conntrack::flowtable::FLOW_TIMEOUT_SECS,
        }
    }
}

impl Conntrack {
    /// The tracker's settings.
    pub fn tracker_config(&self) -> crate::conntrack::CtConfig {
        let mut c = crate::conntrack::CtConfig {
            max: self.max as usize,
            tcp_loose: self.tcp_loose,
            tcp_be_liberal: self.tcp_be_liberal,
            checksum: self.checksum,
            tcp_max_retrans: self.tcp_max_retrans.min(255) as u8,
            expect_max: self.expect_max as usize,
            ..Default::default()
        };
        let t = &mut c.timeouts;
        t.tcp_syn_sent = self.nf_conntrack_tcp_timeout_syn_sent;
        t.tcp_syn_recv = self.nf_conntrack_tcp_timeout_syn_recv;
        t.tcp_established = self.nf_conntrack_tcp_timeout_established;
        t.tcp_fin_wait = self.nf_conntrack_tcp_timeout_fin_wait;
        t.tcp_close_wait = self.nf_conntrack_tcp_timeout_close_wait;
        t.tcp_last_ack = self.nf_conntrack_tcp_timeout_last_ack;
        t.tcp_time_wait = self.nf_conntrack_tcp_timeout_time_wait;
        t.tcp_close = self.nf_conntrack_tcp_timeout_close;
        t.tcp_max_retrans = self.nf_conntrack_tcp_timeout_max_retrans;
        t.tcp_unacknowledged = self.nf_conntrack_tcp_timeout_unacknowledged;
        t.udp = self.nf_conntrack_udp_timeout;
        t.udp_stream = self.nf_conntrack_udp_timeout_stream;
        t.icmp = self.nf_conntrack_icmp_timeout;
        t.icmpv6 = self.nf_conntrack_icmpv6_timeout;
        t.generic = self.nf_conntrack_generic_timeout;
        t.flowtable_tcp = self.nf_flowtable_tcp_timeout;
        t.flowtable_udp = self.nf_flowtable_udp_timeout;
        c
    }
}

// The file as written, with spans where a later check needs a line number.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    rules: Option<String>,
    #[serde(default)]
    port: Vec<RawPort>,
    #[serde(default)]
    route: Vec<RawRoute>,
    #[serde(default)]
    conntrack: Conntrack,
    dataplane: Option<Spanned<Dataplane>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    name: Spanned<String>,
    interface: Option<Spanned<String>>,
    #[serde(default)]
    addresses: Vec<Spanned<String>>,
    queues: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    to: Spanned<String>,
    via: Option<Spanned<String>>,
    port: Option<Spanned<String>>,
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Checks configuration text as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let at = |span: std::ops::Range<usize>, message: String| {
            let (line, col) = line_col(text, span.start);
            ConfigError::At {
                file: file.clone(),
                line,
                col,
                message,
            }
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            at(span, e.message().trim().to_string())
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let bridge = raw
            .dataplane
            .as_ref()
            .is_some_and(|d| d.get_ref().mode == Mode::Bridge);
        let mut names = HashSet::new();
        let mut ports = Vec::new();
        for p in &raw.port {
            let name = p.name.get_ref();
            if name.is_empty() || name.len() > 15 {
                return Err(at(
                    p.name.span(),
                    format!("port name `{name}` must be 1 to 15 characters (it is what iifname matches)"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(at(p.name.span(), format!("port `{name}` is defined twice")));
            }
            let interface = p
                .interface
                .as_ref()
                .map_or(name.clone(), |i| i.get_ref().clone());
            if interface.is_empty() || interface.len() > 15 {
                let span = p.interface.as_ref().map_or(p.name.span(), |i| i.span());
                return Err(at(
                    span,
                    format!("interface `{interface}` must be 1 to 15 characters"),
                ));
            }
            let mut addresses = Vec::new();
            for a in &p.addresses {
                let net: IpNet = a.get_ref().parse().map_err(|_| {
                    at(
                        a.span(),
                        format!(
                            "`{}` is not an address with a prefix length, such as 192.168.1.1/24",
                            a.get_ref()
                        ),
                    )
                })?;
                addresses.push(net);
            }
            if let Some(q) = &p.queues {
                if *q.get_ref() == 0 {
                    return Err(at(q.span(), "a port needs at least 1 queue".into()));
                }
            }
            if bridge {
                if let Some(a) = p.addresses.first() {
                    return Err(at(
                        a.span(),
                        "a port of a bridge (mode = \"bridge\") has no addresses".into(),
                    ));
                }
            }
            ports.push(Port {
                name: name.clone(),
                interface,
                addresses,
                queues: p.queues.as_ref().map(|q| *q.get_ref()),
            });
        }
        let mut routes = Vec::new();
        for r in &raw.route {
            let to_text = r.to.get_ref();
            let to: IpNet = match to_text.as_str() {
                "default" => {
                    let v6 = r.via.as_ref().is_some_and(|v| v.get_ref().contains(':'));
                    if v6 {
                        "::/0".parse().expect("literal")
                    } else {
                        "0.0.0.0/0".parse().expect("literal")
                    }
                }
                t => t.parse().map_err(|_| {
                    at(
                        r.to.span(),
                        format!("`{t}` is not a network such as 10.0.0.0/8 (or `default`)"),
                    )
                })?,
            };
            let via =
                match &r.via {
                    None => None,
                    Some(v) => Some(v.get_ref().parse::<IpAddr>().map_err(|_| {
                        at(v.span(), format!("`{}` is not an address", v.get_ref()))
                    })?),
                };
            if let Some(v) = via {
                if v.is_ipv4() != to.addr().is_ipv4() {
                    let span = r.via.as_ref().map_or(r.to.span(), |v| v.span());
                    return Err(at(
                        span,
                        "the next hop and the destination are of different families".into(),
                    ));
                }
            }
            let port = match (&r.port, via) {
                (Some(p), _) => {
                    if !names.contains(p.get_ref()) {
                        return Err(at(p.span(), format!("unknown port `{}`", p.get_ref())));
                    }
                    p.get_ref().clone()
                }
                (None, Some(v)) => {
                    match ports.iter().find(|p| p.connected().any(|n| n.contains(&v))) {
                        Some(p) => p.name.clone(),
                        None => {
                            let span = r.via.as_ref().map_or(r.to.span(), |v| v.span());
                            return Err(at(
                            span,
                            format!("next hop {v} is on no port's connected network: give `port = \"...\"`"),
                        ));
                        }
                    }
                }
                (None, None) => {
                    return Err(at(
                        r.to.span(),
                        "a route needs `via` (a next hop) or `port`".into(),
                    ));
                }
            };
            routes.push(Route { to, via, port });
        }
        if raw.conntrack.max == 0 {
            return Err(at(0..0, "[conntrack] max must be at least 1".into()));
        }
        let (dp_span, dataplane) = match raw.dataplane {
            Some(d) => (d.span(), d.into_inner()),
            None => (0..0, Dataplane::default()),
        };
        if dataplane.workers == Some(0) {
            return Err(at(dp_span, "[dataplane] workers must be at least 1".into()));
        }
        if dataplane.fastpath_flows == Some(0) {
            return Err(at(
                dp_span,
                "[dataplane] fastpath_flows must be at least 1".into(),
            ));
        }
        if dataplane.stall_timeout == 0 {
            return Err(at(
                dp_span,
                "[dataplane] stall_timeout must be at least 1 (second)".into(),
            ));
        }
        if dataplane.mode == Mode::Bridge {
            if let Some(r) = raw.route.first() {
                return Err(at(
                    r.to.span(),
                    "a bridge (mode = \"bridge\") has no routes".into(),
                ));
            }
            if ports.len() % 2 != 0 {
                return Err(at(
                    dp_span,
                    format!(
                        "a bridge pairs its ports (first with second, ...): {} ports is an odd number",
                        ports.len()
                    ),
                ));
            }
        }
        Ok(Config {
            rules: raw.rules.map(|r| base.join(r)),
            ports,
            routes,
            conntrack: raw.conntrack,
            dataplane,
        })
    }

    /// The port a packet to `dst` leaves by, and its next hop (the destination itself on a
    /// connected network): the longest matching connected network or route. Builds the table
    /// each time; the engine keeps one ([`Config::routing_table`], [`lookup`]).
    pub fn route(&self, dst: IpAddr) -> Option<(&Port, IpAddr)> {
        let (port, hop) = lookup(&self.routing_table(), dst)?;
        Some((&self.ports[port], hop))
    }
}

/// One line of the routing table: `net/len` leaves by `port` towards `via` (the destination
/// itself when `None`: a connected network).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    pub v6: bool,
    pub net: u128,
    pub len: u8,
    pub port: usize,
    pub via: Option<IpAddr>,
}

impl RouteEntry {
    /// Whether the entry's network holds `a`.
    pub fn holds(&self, a: IpAddr) -> bool {
        let (v6, bits) = addr_bits(a);
        self.contains(v6, bits)
    }

    fn contains(&self, v6: bool, a: u128) -> bool {
        if self.v6 != v6 {
            return false;
        }
        let bits: u32 = if v6 { 128 } else { 32 };
        let host = bits - u32::from(self.len).min(bits);
        let mask = if host >= 128 {
            0
        } else {
            (u128::MAX >> (128 - bits)) & !((1u128 << host) - 1)
        };
        a & mask == self.net
    }
}

fn addr_bits(a: IpAddr) -> (bool, u128) {
    match a {
        IpAddr::V4(a) => (false, u32::from(a) as u128),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

impl Config {
    /// The routing table: connected networks and routes, longest prefix first.
    pub fn routing_table(&self) -> Vec<RouteEntry> {
        let cfg = self;
        let mut t = Vec::new();
        let index = |name: &str| cfg.ports.iter().position(|p| p.name == name);
        for (i, p) in cfg.ports.iter().enumerate() {
            for n in p.connected() {
                let (v6, net) = addr_bits(n.network());
                t.push(RouteEntry {
                    v6,
                    net,
                    len: n.prefix_len(),
                    port: i,
                    via: None,
                });
            }
        }
        for r in &cfg.routes {
            if let Some(port) = index(&r.port) {
                let (v6, net) = addr_bits(r.to.trunc().network());
                t.push(RouteEntry {
                    v6,
                    net,
                    len: r.to.prefix_len(),
                    port,
                    via: r.via,
                });
            }
        }
        // Longest prefix first; among equals, connected networks (listed first) win.
        t.sort_by_key(|e| std::cmp::Reverse(e.len));
        t
    }
}

/// The port (index into [`Config::ports`]) a packet to `dst` leaves by, and its next hop: the
/// first (longest) entry of `table` holding `dst`.
pub fn lookup(table: &[RouteEntry], dst: IpAddr) -> Option<(usize, IpAddr)> {
    let (v6, a) = addr_bits(dst);
    let e = table.iter().find(|e| e.contains(v6, a))?;
    Some((e.port, e.via.unwrap_or(dst)))
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
rules = "home-router.nft"

[[port]]
name = "lan"
interface = "veth-lan"
addresses = ["192.168.1.1/24", "fd00::1/64"]

[[port]]
name = "wan"
addresses = ["203.0.113.2/24"]

[[route]]
to = "default"
via = "203.0.113.1"

[[route]]
to = "10.9.0.0/16"
via = "192.168.1.254"

[conntrack]
max = 65536
nf_conntrack_tcp_timeout_established = 7200
"#;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("/etc/keepstate/ks.toml"))
    }

    #[test]
    fn a_full_file() {
        let c = parse(GOOD).unwrap();
        assert_eq!(
            c.rules.as_deref(),
            Some(Path::new("/etc/keepstate/home-router.nft"))
        );
        assert_eq!(c.ports[1].interface, "wan");
        assert_eq!(c.routes[0].port, "wan");
        assert_eq!(c.routes[1].port, "lan");
        assert_eq!(c.conntrack.max, 65536);
        assert_eq!(c.conntrack.nf_conntrack_tcp_timeout_established, 7200);
        // Untouched settings keep the kernel's defaults.
        assert_eq!(c.conntrack.nf_conntrack_udp_timeout_stream, 120);
        assert_eq!(c.conntrack.nf_flowtable_udp_timeout, 30);
        let t = c.conntrack.tracker_config().timeouts;
        assert_eq!((t.flowtable_tcp, t.flowtable_udp), (30, 30));
        let (p, hop) = c.route("8.8.8.8".parse().unwrap()).unwrap();
        assert_eq!(
            (p.name.as_str(), hop.to_string().as_str()),
            ("wan", "203.0.113.1")
        );
        let (p, hop) = c.route("192.168.1.7".parse().unwrap()).unwrap();
        assert_eq!(
            (p.name.as_str(), hop.to_string().as_str()),
            ("lan", "192.168.1.7")
        );
        let (p, _) = c.route("10.9.3.4".parse().unwrap()).unwrap();
        assert_eq!(p.name, "lan");
        assert!(c.route("2001:db8::1".parse().unwrap()).is_none());
    }

    #[test]
    fn empty_file_has_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.conntrack, Conntrack::default());
        // Our defaults and the tracker's agree.
        assert_eq!(
            c.conntrack.tracker_config(),
            crate::conntrack::CtConfig::default()
        );
        assert!(c.ports.is_empty() && c.rules.is_none());
    }

    fn err(t: &str) -> String {
        parse(t).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_line() {
        let e = err("[conntrack]\nmax = 10\nnf_conntrack_tcp_timeout_establised = 5\n");
        assert!(
            e.starts_with(
                "/etc/keepstate/ks.toml:3:1: unknown field `nf_conntrack_tcp_timeout_establised`"
            ),
            "{e}"
        );
        let e = err("[[port]]\nname = \"lan\"\naddresses = [\"192.168.1.1\"]\n");
        assert!(
            e.starts_with(
                "/etc/keepstate/ks.toml:3:14: `192.168.1.1` is not an address with a prefix"
            ),
            "{e}"
        );
        let e = err("[[port]]\nname = \"a\"\n[[port]]\nname = \"a\"\n");
        assert!(e.contains(":4:8: port `a` is defined twice"), "{e}");
        let e = err("[[route]]\nto = \"default\"\nvia = \"10.0.0.1\"\n");
        assert!(
            e.contains(":3:7: next hop 10.0.0.1 is on no port's connected network"),
            "{e}"
        );
        let e = err("[[route]]\nto = \"10.0.0.0/8\"\nport = \"dmz\"\n");
        assert!(e.contains(":3:8: unknown port `dmz`"), "{e}");
        let e = err("rules = 5\n");
        assert!(e.contains(":1:9:"), "{e}");
    }

    #[test]
    fn the_dataplane_section() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.dataplane, Dataplane::default());
        assert_eq!(c.ports[0].queues, None);
        let c = parse(
            "[[port]]\nname = \"a\"\nqueues = 2\n[[port]]\nname = \"b\"\n\
             [dataplane]\nmode = \"bridge\"\nworkers = 2\nbusy_poll = true\n\
             control = \"/tmp/ks.sock\"\ncontrol_group = \"adm\"\n\
             worker_failure = \"report\"\nstall_timeout = 2\nfastpath_flows = 4096\n",
        )
        .unwrap();
        assert_eq!(c.dataplane.mode, Mode::Bridge);
        assert_eq!(c.dataplane.workers, Some(2));
        assert!(c.dataplane.busy_poll);
        assert_eq!(c.dataplane.control, Path::new("/tmp/ks.sock"));
        assert_eq!(c.dataplane.control_group.as_deref(), Some("adm"));
        assert_eq!(c.dataplane.worker_failure, WorkerFailure::Report);
        assert_eq!(c.dataplane.stall_timeout, 2);
        assert_eq!(c.dataplane.fastpath_flows, Some(4096));
        assert_eq!(c.ports[0].queues, Some(2));
    }

    #[test]
    fn dataplane_errors_name_the_line() {
        let e = err("[dataplane]\nmode = \"hub\"\n");
        assert!(e.contains(":2:8: unknown variant `hub`"), "{e}");
        let e = err("[dataplane]\nworkerz = 2\n");
        assert!(e.contains(":2:1: unknown field `workerz`"), "{e}");
        let e = err("[dataplane]\nworkers = 0\n");
        assert!(
            e.contains(":1:1: [dataplane] workers must be at least 1"),
            "{e}"
        );
        let e = err("[dataplane]\nfastpath_flows = 0\n");
        assert!(e.contains("fastpath_flows must be at least 1"), "{e}");
        let e = err("[dataplane]\nstall_timeout = 0\n");
        assert!(e.contains("stall_timeout must be at least 1"), "{e}");
        let e = err("[dataplane]\nworker_failure = \"ignore\"\n");
        assert!(e.contains(":2:18: unknown variant `ignore`"), "{e}");
        let e = err("[[port]]\nname = \"a\"\nqueues = 0\n");
        assert!(e.contains(":3:10: a port needs at least 1 queue"), "{e}");
        let e = err("[[port]]\nname = \"a\"\naddresses = [\"10.0.0.1/24\"]\n[dataplane]\nmode = \"bridge\"\n");
        assert!(e.contains(":3:14: a port of a bridge"), "{e}");
        let e = err("[[port]]\nname = \"a\"\n[dataplane]\nmode = \"bridge\"\n");
        assert!(e.contains("1 ports is an odd number"), "{e}");
    }
}
