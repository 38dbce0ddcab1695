//! The lowered ruleset: the one form the classifier and the engine consume.
//!
//! Owns the meaning of a checked ruleset with every name resolved: chains refer to each other
//! by index, named sets are inlined as interval sets, `define`s are substituted, and every
//! match is a test of one packet field (or a concatenation of fields) against integer
//! intervals. Implicit protocol dependencies (`tcp dport 22` needs `meta l4proto tcp`) are
//! explicit matches here, so a consumer never needs to know nft's payload dependency rules.
//!
//! Must not know pest, spans beyond [`SourceLoc`], packets or the tracker.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

/// `NFPROTO_IPV4`, the value of `meta nfproto ipv4`.
pub const NFPROTO_IPV4: u128 = 2;
/// `NFPROTO_IPV6`, the value of `meta nfproto ipv6`.
pub const NFPROTO_IPV6: u128 = 10;

/// `ct state` bits as nftables defines them (`NF_CT_STATE_*_BIT`).
pub mod ct_state {
    pub const INVALID: u128 = 1 << 0;
    pub const ESTABLISHED: u128 = 1 << 1;
    pub const RELATED: u128 = 1 << 2;
    pub const NEW: u128 = 1 << 3;
    pub const UNTRACKED: u128 = 1 << 6;
}

/// `ct status` bits (`enum ip_conntrack_status`).
pub mod ct_status {
    pub const EXPECTED: u128 = 1 << 0;
    pub const SEEN_REPLY: u128 = 1 << 1;
    pub const ASSURED: u128 = 1 << 2;
    pub const CONFIRMED: u128 = 1 << 3;
    pub const SNAT: u128 = 1 << 4;
    pub const DNAT: u128 = 1 << 5;
    pub const DYING: u128 = 1 << 9;
}

/// Where a rule came from, for traces and per-rule counters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourceLoc {
    pub file: Arc<str>,
    pub line: u32,
    pub col: u32,
}

impl fmt::Display for SourceLoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Ip,
    Ip6,
    Inet,
}

impl Family {
    /// The family as nft writes it.
    pub fn name(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
            Family::Inet => "inet",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl Hook {
    /// The hook as nft writes it.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChainType {
    Filter,
    Nat,
    Route,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    Accept,
    Drop,
}

/// The whole ruleset after `flush ruleset`, includes and commands are applied.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ruleset {
    pub tables: Vec<Table>,
}

impl Ruleset {
    /// Every base chain of every table registered at `hook`, in the order netfilter runs them
    /// (ascending priority; ties keep table order, as the kernel keeps registration order).
    pub fn base_chains(&self, hook: Hook) -> Vec<(usize, usize)> {
        let mut out: Vec<(i32, usize, usize)> = Vec::new();
        for (t, table) in self.tables.iter().enumerate() {
            for (c, chain) in table.chains.iter().enumerate() {
                if let Some(base) = &chain.base {
                    if base.hook == hook {
                        out.push((base.priority, t, c));
                    }
                }
            }
        }
        out.sort_by_key(|&(prio, t, c)| (prio, t, c));
        out.into_iter().map(|(_, t, c)| (t, c)).collect()
    }

    /// The ruleset as one packet's hooks see it: tables of another family than `nfproto`
    /// ([`NFPROTO_IPV4`] or [`NFPROTO_IPV6`]) are not registered for it, and nat base chains
    /// run only for the first packet of a connection (`first`), as netfilter's nat hooks do.
    /// Chains that do not apply lose their hook (they stay as regular chains, so chain indices
    /// and rule ids are unchanged).
    pub fn view_for(&self, nfproto: u128, first: bool) -> Ruleset {
        let mut rs = self.clone();
        for t in &mut rs.tables {
            let family_ok = match t.family {
                Family::Inet => true,
                Family::Ip => nfproto == NFPROTO_IPV4,
                Family::Ip6 => nfproto == NFPROTO_IPV6,
            };
            for c in &mut t.chains {
                let nat = c.base.is_some_and(|b| b.kind == ChainType::Nat);
                if !family_ok || (nat && !first) {
                    c.base = None;
                }
            }
        }
        rs
    }

    /// Every rule of the ruleset, in table, chain and rule order.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.tables
            .iter()
            .flat_map(|t| t.chains.iter().flat_map(|c| c.rules.iter()))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    pub family: Family,
    pub name: String,
    /// Regular and base chains; `Verdict::Jump(i)` indexes this vector.
    pub chains: Vec<Chain>,
    pub ct_helpers: Vec<CtHelper>,
    pub flowtables: Vec<Flowtable>,
}

/// A `flowtable NAME { hook ingress priority N; devices = { ... }; [counter] }` object: the
/// ports whose ingress it watches for offloaded connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flowtable {
    pub name: String,
    pub priority: i32,
    /// Port names; a name that is no port of the box hooks nothing (as the kernel's
    /// name-based hooks wait for the device).
    pub devices: Vec<String>,
    /// `counter` (`NF_FLOWTABLE_COUNTER`): packets forwarded by the flowtable still count on
    /// their connection.
    pub counter: bool,
}

/// A `ct helper NAME { type "ftp" protocol tcp; l3proto inet; }` object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtHelper {
    pub name: String,
    /// The kernel helper's name: `ftp`, `sip`, ...
    pub helper_type: String,
    /// IP protocol number (6 or 17).
    pub protocol: u8,
    /// `None` when the table's family decides (no `l3proto` line).
    pub l3proto: Option<Family>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Chain {
    pub name: String,
    pub base: Option<BaseChain>,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaseChain {
    pub kind: ChainType,
    pub hook: Hook,
    pub priority: i32,
    pub policy: Policy,
}

/// Globally unique rule number, dense from 0 in [`Ruleset::rules`] order; indexes counters.
pub type RuleId = u32;

/// One rule: every match must hold, then the statements run in order.
///
/// nft allows statements between matches (`counter ip saddr 1.2.3.4 drop`); the checker
/// rejects a match after a non-terminal statement, so matches always come first here.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub id: RuleId,
    pub loc: SourceLoc,
    /// The rule as `nft list ruleset` would print it, for traces.
    pub text: String,
    pub matches: Vec<Match>,
    pub stmts: Vec<Stmt>,
}

/// An inclusive interval of field values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Interval {
    pub lo: u128,
    pub hi: u128,
}

impl Interval {
    pub const fn new(lo: u128, hi: u128) -> Self {
        Interval { lo, hi }
    }
    pub const fn point(v: u128) -> Self {
        Interval { lo: v, hi: v }
    }
    pub fn contains(&self, v: u128) -> bool {
        self.lo <= v && v <= self.hi
    }
}

/// A sorted set of disjoint, non-adjacent intervals.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct IntervalSet(Vec<Interval>);

impl IntervalSet {
    /// Builds the union of `items`, sorting and merging overlapping or adjacent intervals.
    pub fn from_intervals(mut items: Vec<Interval>) -> Self {
        items.sort();
        let mut out: Vec<Interval> = Vec::with_capacity(items.len());
        for iv in items {
            match out.last_mut() {
                Some(last) if iv.lo <= last.hi.saturating_add(1) => {
                    last.hi = last.hi.max(iv.hi);
                }
                _ => out.push(iv),
            }
        }
        IntervalSet(out)
    }
    pub fn point(v: u128) -> Self {
        IntervalSet(vec![Interval::point(v)])
    }
    pub fn intervals(&self) -> &[Interval] {
        &self.0
    }
    pub fn contains(&self, v: u128) -> bool {
        // Binary search for the last interval starting at or before v.
        let idx = self.0.partition_point(|iv| iv.lo <= v);
        idx > 0 && self.0[idx - 1].hi >= v
    }
}

/// A packet (or connection) field a rule can test. The comment says how its value is encoded
/// as an integer; a field a packet does not have (the ports of an ICMP packet, `ip saddr` of an
/// IPv6 packet) is absent, and every test of an absent field fails, negated or not, as nft's
/// payload dependencies make it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    /// `meta nfproto`: [`NFPROTO_IPV4`] or [`NFPROTO_IPV6`].
    Nfproto,
    /// `meta l4proto`: the transport protocol number (after IPv6 extension headers).
    L4proto,
    /// `meta iifname`: the name's bytes, NUL padded to 16 (IFNAMSIZ), read as a big-endian
    /// u128; `"eth*"` is the interval of every name starting with `eth`. `iif` lowers here too.
    Iifname,
    /// `meta oifname`: as [`Field::Iifname`]; absent before the routing decision.
    Oifname,
    /// `meta mark`: u32.
    Mark,
    /// `ip saddr`: the IPv4 address as u32.
    Ip4Saddr,
    Ip4Daddr,
    /// `ip ttl`: u8.
    Ip4Ttl,
    /// `ip length`: the IPv4 total length, u16.
    Ip4Length,
    /// `ip6 saddr`: the IPv6 address as u128.
    Ip6Saddr,
    Ip6Daddr,
    /// `ip6 hoplimit`: u8.
    Ip6Hoplimit,
    /// The source port of TCP, UDP, UDP-Lite, SCTP and DCCP (`th sport`, `tcp sport`, ...).
    Sport,
    Dport,
    /// `tcp flags`: the 8 flag bits (FIN 0x01 .. CWR 0x80).
    TcpFlags,
    /// `icmp type` / `icmp code`: present only for ICMP (protocol 1).
    IcmpType,
    IcmpCode,
    /// `icmpv6 type` / `icmpv6 code`: present only for ICMPv6 (protocol 58).
    Icmp6Type,
    Icmp6Code,
    /// `ct state`: exactly one of the [`ct_state`] bits.
    CtState,
    /// `ct status`: the [`ct_status`] bit mask; absent without a connection.
    CtStatus,
    /// `ct mark`: u32; absent without a connection.
    CtMark,
    /// `ct direction`: 0 original, 1 reply; absent without a connection.
    CtDirection,
    /// `ct helper`: the helper's name packed as [`Field::Iifname`]; absent without a helper.
    CtHelper,
}

impl Field {
    /// Width of the field in bits: the largest value is `2^bits - 1`.
    pub fn bits(self) -> u32 {
        match self {
            Field::Nfproto | Field::L4proto | Field::Ip4Ttl | Field::Ip6Hoplimit => 8,
            Field::TcpFlags | Field::IcmpType | Field::IcmpCode => 8,
            Field::Icmp6Type | Field::Icmp6Code | Field::CtState | Field::CtDirection => 8,
            Field::Sport | Field::Dport | Field::Ip4Length => 16,
            Field::Mark | Field::Ip4Saddr | Field::Ip4Daddr | Field::CtStatus | Field::CtMark => 32,
            Field::Iifname
            | Field::Oifname
            | Field::CtHelper
            | Field::Ip6Saddr
            | Field::Ip6Daddr => 128,
        }
    }

    /// The largest value the field can hold.
    pub fn max(self) -> u128 {
        match self.bits() {
            128 => u128::MAX,
            b => (1u128 << b) - 1,
        }
    }
}

/// Packs an interface (or helper) name as [`Field::Iifname`] encodes it.
pub fn pack_name(name: &str) -> u128 {
    let mut buf = [0u8; 16];
    for (i, b) in name.bytes().take(16).enumerate() {
        buf[i] = b;
    }
    u128::from_be_bytes(buf)
}

/// The interval of every name that starts with `prefix` (nft's `"eth*"`).
pub fn name_prefix(prefix: &str) -> Interval {
    let n = prefix.len().min(16);
    let lo = pack_name(&prefix[..n]);
    let hi = if n == 16 {
        lo
    } else {
        lo | (u128::MAX >> (8 * n as u32))
    };
    Interval::new(lo, hi)
}

/// One test of a rule. Every test of an absent field fails.
#[derive(Clone, Debug, PartialEq)]
pub enum Match {
    /// `field ∈ set` (or `∉` when `negate`). Covers `==`, `!=`, `<`, `>=`, ranges, prefixes,
    /// anonymous and named sets.
    Set {
        field: Field,
        negate: bool,
        set: Arc<IntervalSet>,
    },
    /// `(field & mask) == value` (or `!=`). Covers `tcp flags & (syn|ack) == syn`,
    /// `tcp flags syn / fin,syn,rst,ack`, `ct status dnat` (as `& dnat != 0`).
    Masked {
        field: Field,
        negate: bool,
        mask: u128,
        value: u128,
    },
    /// `f1 . f2 . ... { e1, e2 }`: some element has every component's interval containing the
    /// matching field (or none does, when `negate`).
    Concat {
        fields: Vec<Field>,
        negate: bool,
        elems: Arc<Vec<Vec<Interval>>>,
    },
}

impl Match {
    /// The fields the test reads.
    pub fn fields(&self) -> Vec<Field> {
        match self {
            Match::Set { field, .. } | Match::Masked { field, .. } => vec![*field],
            Match::Concat { fields, .. } => fields.clone(),
        }
    }

    /// Evaluates the test given a way to read fields; `None` is an absent field.
    pub fn eval(&self, get: impl Fn(Field) -> Option<u128>) -> bool {
        match self {
            Match::Set { field, negate, set } => match get(*field) {
                Some(v) => set.contains(v) != *negate,
                None => false,
            },
            Match::Masked {
                field,
                negate,
                mask,
                value,
            } => match get(*field) {
                Some(v) => ((v & mask) == *value) != *negate,
                None => false,
            },
            Match::Concat {
                fields,
                negate,
                elems,
            } => {
                let mut vals = Vec::with_capacity(fields.len());
                for f in fields {
                    match get(*f) {
                        Some(v) => vals.push(v),
                        None => return false,
                    }
                }
                let hit = elems
                    .iter()
                    .any(|e| e.iter().zip(&vals).all(|(iv, v)| iv.contains(*v)));
                hit != *negate
            }
        }
    }
}

/// Where evaluation goes after a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Accept,
    Drop,
    /// Run the chain (index into [`Table::chains`]), then come back.
    Jump(usize),
    /// Run the chain and do not come back.
    Goto(usize),
    Return,
    Continue,
}

/// `reject` variants. `Default` is nft's `reject` with no `with`: ICMP port unreachable for
/// IPv4, ICMPv6 port unreachable for IPv6, and for inet whichever fits the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reject {
    Default,
    TcpReset,
    /// `with icmp type CODE`: the ICMP destination-unreachable code.
    Icmp(u8),
    /// `with icmpv6 type CODE`.
    Icmp6(u8),
    /// `with icmpx type CODE`: nft's family-independent codes (0 no-route, 1 port-unreachable,
    /// 2 host-unreachable, 3 admin-prohibited).
    Icmpx(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NatKind {
    Snat,
    Dnat,
    Masquerade,
    Redirect,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatFlags {
    pub random: bool,
    pub fully_random: bool,
    pub persistent: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Nat {
    pub kind: NatKind,
    /// Inclusive address range to translate to (`snat to 1.2.3.4-1.2.3.9`); none for
    /// masquerade and redirect.
    pub addr: Option<(IpAddr, IpAddr)>,
    /// Inclusive port range (`:8080`, `:1024-2047`); `None` keeps the port where possible.
    pub port: Option<(u16, u16)>,
    pub flags: NatFlags,
    /// `dnat to tcp dport map { ... }`: the address (and port) come from the element the
    /// packet's key falls in. The rule also carries the key's membership as a match, as a
    /// lookup miss ends the rule (`NFT_BREAK`).
    pub map: Option<Arc<NatMap>>,
}

/// A NAT statement's map: the key's fields and, per element, the key's intervals (one per
/// field) with the target address and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NatMap {
    pub fields: Vec<Field>,
    pub entries: Vec<(Vec<Interval>, IpAddr, Option<u16>)>,
}

impl Nat {
    /// The start of what the statement translates to for a packet whose fields `get` gives:
    /// the first address and port of its range, or its map's element for the packet's key
    /// (`None`s when the key is not in the map).
    pub fn first_target(
        &self,
        get: impl Fn(Field) -> Option<u128>,
    ) -> (Option<IpAddr>, Option<u16>) {
        match &self.map {
            Some(m) => {
                let key: Option<Vec<u128>> = m.fields.iter().map(|f| get(*f)).collect();
                match key.and_then(|k| m.lookup(&k)) {
                    Some((a, p)) => (Some(a), p.or(self.port.map(|p| p.0))),
                    None => (None, None),
                }
            }
            None => (self.addr.map(|a| a.0), self.port.map(|p| p.0)),
        }
    }
}

impl NatMap {
    /// The target of the first element holding `key` (one value per field).
    pub fn lookup(&self, key: &[u128]) -> Option<(IpAddr, Option<u16>)> {
        self.entries
            .iter()
            .find(|(ivs, _, _)| ivs.iter().zip(key).all(|(iv, v)| iv.contains(*v)))
            .map(|(_, a, p)| (*a, *p))
    }
}

/// What `ct mark set` / `meta mark set` write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MarkValue {
    Const(u32),
    /// `ct mark set meta mark`.
    MetaMark,
    /// `meta mark set ct mark`.
    CtMark,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogLevel {
    Emerg,
    Alert,
    Crit,
    Err,
    Warn,
    Notice,
    Info,
    Debug,
    Audit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateUnit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
}

impl RateUnit {
    pub fn seconds(self) -> u64 {
        match self {
            RateUnit::Second => 1,
            RateUnit::Minute => 60,
            RateUnit::Hour => 3600,
            RateUnit::Day => 86400,
            RateUnit::Week => 604800,
        }
    }
}

/// A statement, run in order once every match of its rule held.
#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    /// Per-rule packet and byte counter; `packets`/`bytes` are the initial values.
    Counter {
        packets: u64,
        bytes: u64,
    },
    Log {
        prefix: Option<String>,
        level: Option<LogLevel>,
    },
    /// A token bucket (`limit rate [over] N/unit [burst B packets]`). Stateful and conditional:
    /// when the packet is over the rate (or under it, with `over`) the rest of the rule is
    /// skipped and evaluation continues with the next rule.
    Limit {
        rate: u64,
        unit: RateUnit,
        burst: u32,
        over: bool,
    },
    CtMarkSet(MarkValue),
    /// Changes a field later rules match on: evaluation after it must see the new mark.
    MetaMarkSet(MarkValue),
    /// `ct helper set "NAME"`: the name of a [`CtHelper`] of the same table.
    CtHelperSet(String),
    Notrack,
    /// `flow add @NAME`: offload the packet's connection to a [`Flowtable`] of the rule's table
    /// (forward hook only): the table's index in the ruleset and the flowtable's name.
    FlowAdd {
        table: usize,
        flowtable: String,
    },
    Nat(Nat),
    /// Terminal: sends an ICMP error or TCP reset and drops the packet.
    Reject(Reject),
    Verdict(Verdict),
    /// `KEY vmap { k : verdict, ... }`: the verdict of the element containing the key; no
    /// element (or an absent field) means no verdict, and evaluation continues.
    Vmap {
        fields: Vec<Field>,
        entries: Arc<Vec<(Vec<Interval>, Verdict)>>,
    },
}

impl Stmt {
    /// True for a statement after which the rule's packet never reaches the next rule
    /// (`accept`, `drop`, `reject`, `jump`, `goto`, `return`); `continue`, a vmap and every
    /// non-terminal statement are not.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Stmt::Reject(_)
                | Stmt::Verdict(
                    Verdict::Accept
                        | Verdict::Drop
                        | Verdict::Jump(_)
                        | Verdict::Goto(_)
                        | Verdict::Return
                )
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_set_merges_and_searches() {
        let s = IntervalSet::from_intervals(vec![
            Interval::new(10, 20),
            Interval::point(21),
            Interval::new(5, 7),
            Interval::new(30, 40),
        ]);
        assert_eq!(
            s.intervals(),
            &[
                Interval::new(5, 7),
                Interval::new(10, 21),
                Interval::new(30, 40)
            ]
        );
        assert!(s.contains(5) && s.contains(21) && s.contains(40));
        assert!(!s.contains(8) && !s.contains(22) && !s.contains(41) && !s.contains(0));
    }

    #[test]
    fn name_prefix_covers_names() {
        let iv = name_prefix("eth");
        assert!(iv.contains(pack_name("eth0")));
        assert!(iv.contains(pack_name("eth")));
        assert!(!iv.contains(pack_name("et")));
        assert!(!iv.contains(pack_name("wlan0")));
    }
}
