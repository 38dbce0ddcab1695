//! The engine: the one place where packets, the connection tracker and the compiled ruleset
//! meet. Sans-IO: [`Engine::process`] takes a frame, its ingress port and `now`, and says what
//! to do with it; it reads no clock and touches no socket, so every behaviour (timeouts
//! included) is testable with a fake clock.
//!
//! The path of a frame from the wire, in netfilter's order (`nf_hook_slow` per hook):
//!
//! ```text
//!  parse -> [reassemble] -> conntrack (nf_conntrack_in, prerouting) -> PREROUTING chains
//!        -> routing: to one of our addresses? -> INPUT chains              -> confirm -> Local
//!                    else the route's port    -> FORWARD -> POSTROUTING    -> confirm -> Forward
//! ```
//!
//! nat base chains see only the first packet of a connection; tables of the other family
//! never see the packet ([`crate::rules::ir::Ruleset::view_for`]). A malformed frame is
//! counted and dropped, never a panic.
//!
//! Fragments are reassembled first (`packet::frag`, as nf_defrag): the whole datagram is
//! tracked and judged, and its original fragments leave with that verdict.
//!
//! NAT (`nf_nat_inet_fn` at each hook): when a family has nat chains, the first packet of a
//! connection gets a binding at every NAT hook (the rule's `snat`/`dnat`/`masquerade`/
//! `redirect`, or a null binding that only resolves clashes), kept on the connection as its
//! REPLY tuple; every packet in either direction is then rewritten from it: destination at
//! PREROUTING (so routing and the forward chain see the translated address), source at
//! POSTROUTING and INPUT. A forwarded packet's TTL or hop limit is decremented before FORWARD
//! (`ip_forward`), and one that would reach zero gets an ICMP time exceeded. The edits are
//! made in place in the frame once the verdict is known (`packet::rewrite`, incremental
//! checksums), in each released fragment too.
//!
//! XXX: every base chain of a hook is evaluated as one decision tree, so a prerouting filter
//! chain of priority above -100 sees the packet before DNAT, where the kernel shows it after.
//! [`kernel_differences`] finds such chains that read what a DNAT changes, for a warning.
//!
//! Helpers (`ct helper set`) read each accepted packet of their connections before it is
//! confirmed (`nf_confirm`); what they rewrite (FTP and SIP through NAT) is edited last.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::classify::{
    action_stmt, BuildError, Classifier, Decision, Evaluation, LimitSpec, Limiter, PacketKey, Tree,
};
use crate::config::{Config, RouteEntry};
use crate::conntrack::flowtable::{self, FlowDir, FlowEvent, FlowRef, Flows, StateCheck};
use crate::conntrack::nat::{self as ctnat, Manip};
use crate::conntrack::{
    self, Classified, Confirmed, CtConfig, HelperName, PktCtx, Timestamp, Tracker,
};
use crate::conntrack::{CtInfo, Tracked, Tuple};
use crate::packet::frag::{Push, Reassembler};
use crate::packet::log;
use crate::packet::reject::{self, Answer};
use crate::packet::rewrite::{self, CompiledRewrite, Layout, Rewrite};
use crate::packet::{self, Frame, Ip, Packet, L4};
use crate::rules::ir::{self, Field, Hook, RuleId, Ruleset, Stmt};
use crate::rules::types;

/// What to do with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it out of port `port` (an index into the engine's ports) towards `next_hop`.
    Forward { port: usize, next_hop: IpAddr },
    /// It is for the box itself.
    Local,
    /// Drop it.
    Drop(DropReason),
    /// Drop it and answer with an ICMP error or TCP reset: the answer, when the kernel would
    /// send one, is in [`Worker::reply`] (or [`Outcome::reply`]) and leaves by the ingress port.
    Reject(ir::Reject),
    /// Not IP (ARP, LLDP, ...): the dataplane's business, not the firewall's.
    NotIp,
    /// A fragment the engine keeps until its datagram is whole; nothing to send now. When the
    /// last one arrives, its verdict applies to every frame in [`Worker::released`].
    Held,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The frame did not parse (counted as malformed).
    Malformed,
    /// A rule or a chain policy dropped it.
    Rules,
    /// The connection table is full and nothing could be evicted.
    TableFull,
    /// Conntrack could not insert the new connection.
    InsertFailed,
    /// No route to the destination.
    NoRoute,
    /// The ingress port does not exist.
    UnknownPort,
    /// A fragment that cannot be reassembled (overlap, bad length, memory bound, timeout).
    Fragment,
    /// NAT found no free tuple in the range (ports exhausted).
    NatFailed,
    /// `masquerade` or `redirect` found no address of the packet's family on the port (the
    /// kernel drops those packets too).
    NatNoAddress,
    /// The TTL or hop limit ran out on the way through (an ICMP time exceeded is the answer).
    TtlExceeded,
    /// The connection's helper refused the packet (`nf_ct_helper_log`; the reason is in the
    /// worker's log lines).
    Helper,
}

/// The engine's view of a port.
#[derive(Clone, Debug)]
pub struct Port {
    pub name: String,
    /// The name as `iifname`/`oifname` compare it ([`ir::pack_name`]).
    pub packed_name: u128,
    /// The port's own addresses; packets to them are delivered to the box.
    pub addresses: Vec<IpAddr>,
}

impl Port {
    pub fn new(name: &str, addresses: Vec<IpAddr>) -> Port {
        Port {
            name: name.to_string(),
            packed_name: ir::pack_name(name),
            addresses,
        }
    }
}

/// How frames find their way out.
#[derive(Clone, Debug)]
pub enum Routing {
    /// Router: connected networks and routes, longest prefix first.
    Router(Vec<RouteEntry>),
    /// Ports in pairs (0↔1, 2↔3, ...), no addresses: a frame in on one leaves by the other.
    Pairs,
}

/// Every hook, in `Hook as usize` order.
const ALL_HOOKS: [Hook; 5] = [
    Hook::Prerouting,
    Hook::Input,
    Hook::Forward,
    Hook::Output,
    Hook::Postrouting,
];

/// A ruleset compiled for the hot path: one tree per (family, first packet or not), so a
/// lookup never considers a table the packet cannot see.
pub struct Compiled {
    pub ruleset: Arc<Ruleset>,
    /// `[v4 first, v4 later, v6 first, v6 later]`.
    trees: [Tree; 4],
    /// The ruleset as `nft list ruleset` prints it, for `keepstate stats`.
    pub listing: String,
    /// Per-rule packet and byte counters (index: rule id).
    pub counters: Vec<[AtomicU64; 2]>,
    limits: Mutex<Vec<Bucket>>,
    /// Which hooks have base chains at all (indexed by `Hook as usize`).
    hooked: [bool; 5],
    /// Per family (v4, v6) and hook: an established packet is accepted by every base chain
    /// with no side effect, so the tree need not be consulted (see [`accepts_established`]).
    established_fast: [[bool; 5]; 2],
    /// Per family (v4, v6): some nat base chain sees the family, so every new connection
    /// gets a binding (a rule's or a null one) at every NAT hook, as the kernel's nat core
    /// runs once any nat chain of the family is registered.
    nat: [bool; 2],
    /// The prerouting base chains that run before conntrack (priority below
    /// `NF_IP_PRI_CONNTRACK`, -200: the `raw` chains where `notrack` lives), per family;
    /// `None` when there are none.
    raw: Option<[Tree; 2]>,
    /// Every flowtable of the ruleset.
    pub flowtables: Vec<FlowtableSpec>,
}

/// A flowtable as the engine uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowtableSpec {
    /// `family table name`: what a flow remembers its flowtable by across reloads (shared
    /// with every flow of it, not copied per offload).
    pub key: Arc<str>,
    /// The table's index in the ruleset (`Stmt::FlowAdd`'s).
    pub table: usize,
    pub name: String,
    pub counter: bool,
    /// Port names.
    pub devices: Vec<String>,
}

/// `NF_IP_PRI_CONNTRACK`: base chains below it run before conntrack has seen the packet.
pub const PRI_CONNTRACK: i32 = -200;

/// The ruleset split at conntrack: the prerouting base chains of priority below
/// [`PRI_CONNTRACK`], and the rest. Each side keeps every chain (indices and rule ids stay);
/// chains of the other side lose their hook.
fn split_at_conntrack(rs: &Ruleset) -> (Ruleset, Ruleset) {
    let raw_chain = |b: &ir::BaseChain| b.hook == Hook::Prerouting && b.priority < PRI_CONNTRACK;
    let mut raw = rs.clone();
    let mut rest = rs.clone();
    for (rt, mt) in raw.tables.iter_mut().zip(rest.tables.iter_mut()) {
        for (rc, mc) in rt.chains.iter_mut().zip(mt.chains.iter_mut()) {
            match rc.base {
                Some(b) if raw_chain(&b) => mc.base = None,
                _ => rc.base = None,
            }
        }
    }
    (raw, rest)
}

impl Compiled {
    pub fn new(loaded: &crate::rules::Loaded) -> Result<Compiled, BuildError> {
        let rs = Arc::new(loaded.ruleset.clone());
        let (raw_rs, main) = split_at_conntrack(&rs);
        let raw = if raw_rs.base_chains(Hook::Prerouting).is_empty() {
            None
        } else {
            let view = |nf| Tree::new(Arc::new(raw_rs.view_for(nf, true)));
            Some([view(ir::NFPROTO_IPV4)?, view(ir::NFPROTO_IPV6)?])
        };
        let view = |nf, first| Tree::new(Arc::new(main.view_for(nf, first)));
        let trees = [
            view(ir::NFPROTO_IPV4, true)?,
            view(ir::NFPROTO_IPV4, false)?,
            view(ir::NFPROTO_IPV6, true)?,
            view(ir::NFPROTO_IPV6, false)?,
        ];
        // Rule ids are dense in `rules()` order: one counter pair per rule, starting at the
        // values a `counter packets N bytes N` statement gives.
        let counters = rs
            .rules()
            .map(|r| {
                let (p, b) = r
                    .stmts
                    .iter()
                    .find_map(|s| match s {
                        Stmt::Counter { packets, bytes } => Some((*packets, *bytes)),
                        _ => None,
                    })
                    .unwrap_or((0, 0));
                [AtomicU64::new(p), AtomicU64::new(b)]
            })
            .collect();
        let hooked = ALL_HOOKS.map(|h| !main.base_chains(h).is_empty());
        let nat = [ir::NFPROTO_IPV4, ir::NFPROTO_IPV6].map(|nf| {
            let view = main.view_for(nf, true);
            view.tables.iter().any(|t| {
                t.chains
                    .iter()
                    .any(|c| c.base.is_some_and(|b| b.kind == ir::ChainType::Nat))
            })
        });
        let established_fast = [ir::NFPROTO_IPV4, ir::NFPROTO_IPV6].map(|nf| {
            let view = main.view_for(nf, false);
            ALL_HOOKS.map(|h| accepts_established(&view, h))
        });
        let flowtables = rs
            .tables
            .iter()
            .enumerate()
            .flat_map(|(ti, t)| {
                t.flowtables.iter().map(move |f| FlowtableSpec {
                    key: format!("{} {} {}", ir::Family::name(t.family), t.name, f.name).into(),
                    table: ti,
                    name: f.name.clone(),
                    counter: f.counter,
                    devices: f.devices.clone(),
                })
            })
            .collect();
        Ok(Compiled {
            flowtables,
            ruleset: rs,
            trees,
            listing: loaded.listing(),
            counters,
            limits: Mutex::new(Vec::new()),
            hooked,
            established_fast,
            nat,
            raw,
        })
    }

    fn tree(&self, v6: bool, first: bool) -> &Tree {
        &self.trees[(v6 as usize) * 2 + (!first) as usize]
    }
}

/// `NF_IP_PRI_NAT_DST`: where the kernel's DNAT runs in prerouting.
const NAT_DST_PRIORITY: i32 = -100;

/// Where `rs` would behave differently here than in the kernel, one sentence each, for a
/// warning when it is loaded (`check`, `run`, a reload). One case today, the XXX above: a
/// prerouting chain of a priority above -100 that reads a field a `dnat` or `redirect` of the
/// ruleset may change (the destination address; the port too if one names a port) sees the
/// packet before DNAT here, after it in the kernel.
pub fn kernel_differences(rs: &Ruleset) -> Vec<String> {
    use ir::{NatKind, Verdict as V};
    // The fields a DNAT of this ruleset may change.
    let mut changed = Vec::new();
    for stmt in rs
        .tables
        .iter()
        .flat_map(|t| &t.chains)
        .flat_map(|c| &c.rules)
        .flat_map(|r| &r.stmts)
    {
        if let Stmt::Nat(n) = stmt {
            if matches!(n.kind, NatKind::Dnat | NatKind::Redirect) {
                changed.extend([Field::Ip4Daddr, Field::Ip6Daddr]);
                let map_ports = n
                    .map
                    .as_ref()
                    .is_some_and(|m| m.entries.iter().any(|e| e.2.is_some()));
                if n.port.is_some() || map_ports {
                    changed.push(Field::Dport);
                }
            }
        }
    }
    if changed.is_empty() {
        return Vec::new();
    }
    // Whether chain `c` of table `t`, or a chain it jumps to, reads a changed field.
    let reads_changed = |t: &ir::Table, c: usize| {
        let (mut todo, mut seen) = (vec![c], vec![c]);
        while let Some(c) = todo.pop() {
            for r in &t.chains[c].rules {
                if r.matches
                    .iter()
                    .flat_map(|m| m.fields())
                    .any(|f| changed.contains(&f))
                {
                    return true;
                }
                for stmt in &r.stmts {
                    let mut next = Vec::new();
                    match stmt {
                        Stmt::Vmap { fields, entries } => {
                            if fields.iter().any(|f| changed.contains(f)) {
                                return true;
                            }
                            next.extend(entries.iter().map(|e| e.1));
                        }
                        Stmt::Verdict(v) => next.push(*v),
                        _ => {}
                    }
                    for v in next {
                        if let V::Jump(n) | V::Goto(n) = v {
                            if !seen.contains(&n) {
                                seen.push(n);
                                todo.push(n);
                            }
                        }
                    }
                }
            }
        }
        false
    };
    rs.base_chains(Hook::Prerouting)
        .into_iter()
        .filter_map(|(t, c)| {
            let (table, chain) = (&rs.tables[t], &rs.tables[t].chains[c]);
            let b = chain.base?;
            let after = b.kind != ir::ChainType::Nat && b.priority > NAT_DST_PRIORITY;
            (after && reads_changed(table, c)).then(|| {
                format!(
                    "chain {} {} {} (hook prerouting, priority {}) sees packets before DNAT in \
                     keepstate, where the kernel shows them after it (priority above -100): its \
                     matches on a destination the ruleset's dnat changes see it untranslated. \
                     Give it a priority below -100, or match in the forward chain",
                    table.family.name(),
                    table.name,
                    chain.name,
                    b.priority
                )
            })
        })
        .collect()
}

/// True when every base chain of `hook` accepts an established packet with its first rule and
/// nothing else happens: the rule is `ct state established[,...] accept` or
/// `ct state vmap { established : accept, ... }` with no other match and no other statement
/// (no counter, log or mark), or the chain is empty with policy accept. Then the hook's result
/// for an established packet is provably `accept` with no side effect, whatever its other
/// fields, and the lookup can be skipped: the idea of nftables' flowtable and VPP's stateful
/// ACL, applied only where it cannot change the outcome.
pub fn accepts_established(rs: &Ruleset, hook: Hook) -> bool {
    use ir::{ct_state::ESTABLISHED, Match, Verdict as V};
    let est = ESTABLISHED;
    rs.base_chains(hook).into_iter().all(|(t, c)| {
        let chain = &rs.tables[t].chains[c];
        let Some(rule) = chain.rules.first() else {
            return chain.base.is_some_and(|b| b.policy == ir::Policy::Accept);
        };
        let state_only = |m: &Match| match m {
            Match::Set {
                field: Field::CtState,
                negate: false,
                set,
            } => set.contains(est),
            Match::Masked {
                field: Field::CtState,
                negate: true,
                mask,
                value: 0,
            } => mask & est != 0,
            _ => false,
        };
        match (rule.matches.as_slice(), rule.stmts.as_slice()) {
            ([m], [Stmt::Verdict(V::Accept)]) => state_only(m),
            ([], [Stmt::Vmap { fields, entries }]) if fields.as_slice() == [Field::CtState] => {
                entries
                    .iter()
                    .any(|(k, v)| *v == V::Accept && k.len() == 1 && k[0].contains(est))
            }
            _ => false,
        }
    })
}

/// A token bucket of one `limit` statement (`nft_limit_eval`): `burst` tokens, refilled at
/// `rate` per unit, in nanoseconds of the caller's clock.
struct Bucket {
    rule: RuleId,
    stmt: usize,
    tokens: f64,
    last: u64,
}

struct Limits<'a> {
    compiled: &'a Compiled,
    now: u64,
}

impl Limiter for Limits<'_> {
    fn pass(&mut self, rule: RuleId, stmt: usize, l: &LimitSpec) -> bool {
        let mut buckets = self.compiled.limits.lock();
        let cap = f64::from(l.burst.max(1));
        let i = match buckets
            .iter()
            .position(|b| b.rule == rule && b.stmt == stmt)
        {
            Some(i) => i,
            None => {
                buckets.push(Bucket {
                    rule,
                    stmt,
                    tokens: cap,
                    last: self.now,
                });
                buckets.len() - 1
            }
        };
        let b = &mut buckets[i];
        let per_ns = l.rate as f64 / (l.unit.seconds() as f64 * 1e9);
        let elapsed = self.now.saturating_sub(b.last) as f64;
        b.tokens = (b.tokens + elapsed * per_ns).min(cap);
        b.last = self.now.max(b.last);
        let under = if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        };
        under != l.over
    }
}

/// Counters an operator reads (`keepstate stats`).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub frames: AtomicU64,
    pub malformed: AtomicU64,
    pub not_ip: AtomicU64,
    pub accepted: AtomicU64,
    pub dropped_by_rules: AtomicU64,
    pub rejected: AtomicU64,
    pub dropped_table_full: AtomicU64,
    pub dropped_insert_failed: AtomicU64,
    pub dropped_no_route: AtomicU64,
    pub dropped_fragments: AtomicU64,
    /// NAT could not translate a new connection (`NatFailed`).
    pub dropped_nat: AtomicU64,
    /// TTL or hop limit exhausted while forwarding.
    pub dropped_ttl: AtomicU64,
    /// Refused by a connection's helper (a partial FTP command, no room for an
    /// expectation).
    pub dropped_helper: AtomicU64,
    /// Forwarded by a flowtable at ingress, without conntrack or rules.
    pub flowtable_forwarded: AtomicU64,
}

/// One worker's counters, alone on their cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct StatSlot(EngineStats);

impl EngineStats {
    /// Adds `o`'s values to this one's.
    fn add(&self, o: &EngineStats) {
        for (a, b) in self.fields().into_iter().zip(o.fields()) {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    fn fields(&self) -> [&AtomicU64; 14] {
        [
            &self.frames,
            &self.malformed,
            &self.not_ip,
            &self.accepted,
            &self.dropped_by_rules,
            &self.rejected,
            &self.dropped_table_full,
            &self.dropped_insert_failed,
            &self.dropped_no_route,
            &self.dropped_fragments,
            &self.dropped_nat,
            &self.dropped_ttl,
            &self.dropped_helper,
            &self.flowtable_forwarded,
        ]
    }
}

/// A worker's reusable buffers, so the hot path allocates nothing once they have grown.
#[derive(Debug, Default)]
pub struct Worker {
    /// The worker's index (per-worker statistics).
    pub cpu: usize,
    /// Record every rule that matched, even where the established fast path could skip the
    /// lookup (for traces): the verdict is the same either way.
    pub trace: bool,
    ev: Evaluation,
    /// Every rule whose matches held for the last frame, in order.
    pub matched: Vec<RuleId>,
    /// Conntrack events the last frame caused.
    pub events: Vec<(u16, conntrack::ConnRef)>,
    /// When the last frame completed a fragmented datagram: the original fragments, in
    /// arrival order (the last frame among them), to which the verdict applies. Empty
    /// otherwise: the verdict applies to the frame itself.
    pub released: Vec<Vec<u8>>,
    /// The answer to a rejected frame (ICMP error or TCP reset), to send back out of the port
    /// the frame came in by.
    pub reply: Option<Vec<u8>>,
    /// When a helper changed the length of the last frame's payload (FTP through NAT): the
    /// frame as it leaves, in place of the one given.
    pub resized: Option<Vec<u8>>,
    /// Flowtable changes the last frame caused: its connection offloaded (`flow add`), or a
    /// flow torn down (a SYN on a closing flow). The dataplane mirrors them in its fast path;
    /// [`Engine::flow_gc`] reports the others.
    pub flow_events: Vec<FlowEvent>,
    /// The flowtable a `flow add` of the forward hook named: table index and name.
    flow_add: Option<(usize, String)>,
    /// The lines `log` statements wrote for the last frame, in the kernel's format.
    /// The live dataplane rate-limits what it writes of them (`dataplane::LogLimit`).
    pub logs: Vec<String>,
    /// The NAT statement the last hook's rules chose, if any.
    nat_stmt: Option<ir::Nat>,
    /// The edits the frame gets once judged (NAT, TTL).
    edits: Edits,
    /// xorshift state: the port search's random offsets (`get_random_u16`), per worker and
    /// seeded from its index, so a replay is reproducible.
    rng: u64,
}

impl Worker {
    pub fn new(cpu: usize) -> Worker {
        Worker {
            cpu,
            rng: 0x9e37_79b9_7f4a_7c15 ^ (cpu as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9),
            ..Worker::default()
        }
    }

    fn random_u16(&mut self) -> u16 {
        if self.rng == 0 {
            self.rng = 0x9e37_79b9_7f4a_7c15;
        }
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 24) as u16
    }
}

/// What a judged frame must have changed before it leaves: the NAT edit of its headers (and,
/// for an ICMP error, of the packet it quotes) and the TTL decrement of forwarding.
#[derive(Clone, Debug, Default)]
struct Edits {
    rw: Rewrite,
    inner: Option<Rewrite>,
    /// `rw` compiled for the packet's shape (an established packet of a bound connection).
    fast: Option<CompiledRewrite>,
    ttl: bool,
    /// The sequence adjustment of a connection a helper resized, and the packet's direction.
    seqadj: Option<(conntrack::seqadj::SeqAdj, conntrack::Dir)>,
    /// A helper's payload rewrite (it may change the packet's length).
    mangle: Option<conntrack::helper::Mangle>,
    /// Where the judged packet's IP header is in the frame, its length and layout (none when
    /// the judged packet is a reassembled datagram: each fragment is parsed again).
    at: Option<(usize, usize, Layout)>,
}

impl Edits {
    fn is_empty(&self) -> bool {
        !self.ttl
            && self.inner.is_none()
            && self.rw == Rewrite::default()
            && self.seqadj.is_none()
            && self.mangle.is_none()
    }
}

/// Makes the edits on one IP packet (`ip`, laid out as `l`).
fn apply_edits(ip: &mut [u8], l: &Layout, e: &Edits) -> Result<(), rewrite::RewriteError> {
    match (&e.inner, &e.fast) {
        (Some(inner), _) => rewrite::apply_icmp_error(ip, l, &e.rw, inner)?,
        (None, Some(fast)) => rewrite::apply_compiled(ip, l, fast)?,
        (None, None) if e.rw != Rewrite::default() => rewrite::apply(ip, l, &e.rw)?,
        (None, None) => {}
    }
    if e.ttl {
        rewrite::decrement_ttl(ip, l.v6)?;
    }
    if let Some((adj, dir)) = &e.seqadj {
        let (seq, ack) = tcp_seq_ack(ip, l).ok_or(rewrite::RewriteError::Truncated)?;
        let a = adj.adjust(*dir, seq, ack);
        rewrite::tcp_seq_ack(ip, l, a.seq, a.ack, |edge| {
            edge.wrapping_sub(adj.ack_offset(*dir, edge) as u32)
        })?;
    }
    Ok(())
}

/// A TCP segment's sequence and acknowledgement numbers.
fn tcp_seq_ack(ip: &[u8], l: &Layout) -> Option<(u32, u32)> {
    let o = l.l4_offset;
    let w = |at: usize| Some(u32::from_be_bytes(ip.get(at..at + 4)?.try_into().ok()?));
    Some((w(o + 4)?, w(o + 8)?))
}

/// What happened to one frame, for `replay --trace`.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub verdict: Verdict,
    /// `ct state` as rules saw it (an [`ir::ct_state`] bit); none for frames that did not parse.
    pub ct_state: Option<u32>,
    /// Every rule whose matches held, in order.
    pub rules: Vec<RuleId>,
    /// Conntrack events this packet caused (`conntrack -E`), with the connection.
    pub events: Vec<(u16, conntrack::ConnRef)>,
    /// The original fragments the verdict applies to, when this frame completed a datagram.
    pub released: Vec<Vec<u8>>,
    /// The answer to a rejected frame, to send back out of the ingress port.
    pub reply: Option<Vec<u8>>,
    /// The lines `log` statements wrote.
    pub logs: Vec<String>,
    /// The frame as it leaves (NAT and TTL edits made); the released fragments, when there
    /// are some, are edited in place in [`Outcome::released`].
    pub frame: Vec<u8>,
}

pub struct Engine {
    ports: Vec<Port>,
    routing: Routing,
    tracker: Tracker,
    frags: Reassembler,
    rules: ArcSwap<Compiled>,
    /// Per worker (the kernel's per-CPU counters): no cache line is written by two workers.
    stats: Box<[StatSlot]>,
    /// Calls of [`Engine::process`], which seed their throwaway workers.
    calls: AtomicU64,
    /// The offloaded connections of every flowtable.
    flows: Flows,
    /// Per port: the index in [`Compiled::flowtables`] of the flowtable that lists it.
    flow_ports: ArcSwap<Vec<Option<usize>>>,
    /// Flowtable gc calls still to check every flow against the ruleset: set by a reload.
    /// Two, so that a flow a worker offloaded under the old rules during the first is caught
    /// by the second; none otherwise (the check is a walk over every flow).
    flow_checks: AtomicU64,
    /// The gc slice [`Engine::flow_gc_step`] walks next.
    flow_cursor: AtomicU64,
    /// [`crate::conntrack::Table::offloaded_removed`] when the flowtable gc last looked for
    /// flows of removed connections.
    flow_dying_seen: AtomicU64,
}

/// Per port, the first flowtable listing it (by port name).
fn flow_ports(ports: &[Port], rules: &Compiled) -> Vec<Option<usize>> {
    // XXX: a port listed by two flowtables is looked up in the first only; the kernel runs
    // both ingress hooks in priority order.
    ports
        .iter()
        .map(|p| {
            rules
                .flowtables
                .iter()
                .position(|f| f.devices.contains(&p.name))
        })
        .collect()
}

impl Engine {
    pub fn new(ports: Vec<Port>, routing: Routing, ct: CtConfig, rules: Compiled) -> Engine {
        let cpus = ct.cpus;
        let fp = flow_ports(&ports, &rules);
        Engine {
            ports,
            routing,
            tracker: Tracker::new(ct),
            frags: Reassembler::default(),
            rules: ArcSwap::from_pointee(rules),
            stats: (0..cpus.max(1)).map(|_| StatSlot::default()).collect(),
            calls: AtomicU64::new(0),
            flows: Flows::default(),
            flow_ports: ArcSwap::from_pointee(fp),
            flow_checks: AtomicU64::new(0),
            flow_cursor: AtomicU64::new(0),
            flow_dying_seen: AtomicU64::new(0),
        }
    }

    /// The box a configuration describes, with its loaded ruleset, for one worker.
    pub fn from_config(cfg: &Config, rules: &crate::rules::Loaded) -> Result<Engine, BuildError> {
        Engine::for_workers(cfg, rules, 1)
    }

    /// The box a configuration describes, with its loaded ruleset, for `workers` workers
    /// ([`Engine::with_compiled`]).
    pub fn for_workers(
        cfg: &Config,
        rules: &crate::rules::Loaded,
        workers: usize,
    ) -> Result<Engine, BuildError> {
        Ok(Engine::with_compiled(cfg, Compiled::new(rules)?, workers))
    }

    /// The box a configuration describes, with a compiled ruleset: its ports; a router (the
    /// configured routing table) or, with `mode = "bridge"`, a bridge of port pairs; its
    /// tracker, keeping destroyed connections for their DESTROY events, with a statistics
    /// slot for each of `workers` workers (the kernel's per-CPU conntrack counters). Replay
    /// and `keepstate run` build it alike, so that a capture replayed with a configuration
    /// meets the box that configuration runs.
    pub fn with_compiled(cfg: &Config, compiled: Compiled, workers: usize) -> Engine {
        let ports = cfg
            .ports
            .iter()
            .map(|p| Port::new(&p.name, p.addresses.iter().map(|a| a.addr()).collect()))
            .collect();
        let routing = match cfg.dataplane.mode {
            crate::config::Mode::Router => Routing::Router(cfg.routing_table()),
            crate::config::Mode::Bridge => Routing::Pairs,
        };
        let mut ct = cfg.conntrack.tracker_config();
        ct.cpus = workers;
        ct.events = true;
        Engine::new(ports, routing, ct, compiled)
    }

    /// The worker `cpu`'s counters (slots wrap, as the tracker's do).
    fn stat(&self, cpu: usize) -> &EngineStats {
        &self.stats[cpu % self.stats.len()].0
    }

    /// The counters, summed over the workers.
    pub fn stats(&self) -> EngineStats {
        let sum = EngineStats::default();
        for s in self.stats.iter() {
            sum.add(&s.0);
        }
        sum
    }

    pub fn ports(&self) -> &[Port] {
        &self.ports
    }

    pub fn port_index(&self, name: &str) -> Option<usize> {
        self.ports.iter().position(|p| p.name == name)
    }

    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    /// The ruleset in force.
    pub fn compiled(&self) -> Arc<Compiled> {
        self.rules.load_full()
    }

    /// Swaps in a new ruleset atomically; packets in flight finish with the old one.
    /// Connections are kept; so are flows whose flowtable (by family, table and name) still
    /// exists and still lists their ports. The others stop being forwarded at once, and the
    /// next [`Engine::flow_gc`] tears them down (the kernel frees a deleted flowtable's
    /// flows) and reports them.
    pub fn reload(&self, rules: Compiled) {
        self.flow_ports
            .store(Arc::new(flow_ports(&self.ports, &rules)));
        self.rules.store(Arc::new(rules));
        self.flow_checks.store(2, Ordering::Relaxed);
    }

    /// Whether `flow` still belongs to the ruleset in force: its flowtable lists both its
    /// ingress ports.
    fn flow_current(&self, flow: &conntrack::flowtable::Flow) -> bool {
        let fp = self.flow_ports.load();
        let rules = self.rules.load();
        flow.dirs.iter().all(|d| {
            fp.get(d.iif)
                .copied()
                .flatten()
                .and_then(|i| rules.flowtables.get(i))
                .is_some_and(|f| f.key == flow.flowtable)
        })
    }

    /// The flowtables' offloaded connections.
    pub fn flows(&self) -> &Flows {
        &self.flows
    }

    /// The flowtable gc (`nf_flow_offload_gc_step`; the kernel runs it every second), a whole
    /// pass: tears down expired flows, keeps offloaded connections alive, and returns every
    /// flow that went back to the slow path without a packet saying so (expiry, reload), for
    /// the dataplane to remove.
    pub fn flow_gc(&self, now: Timestamp) -> Vec<FlowRef> {
        self.flow_gc_slices(0..flowtable::GC_SLICES, now, &|_| {})
    }

    /// [`Engine::flow_gc`] over the next of the flowtable's [`flowtable::GC_SLICES`] slices:
    /// called that many times a second, every flow is visited once a second, as the kernel
    /// does, and no call walks them all. `refresh` is asked about a flow before it expires
    /// (see [`Flows::gc_step`]): a fast path accounts there what it forwarded.
    pub fn flow_gc_step(&self, now: Timestamp, refresh: &dyn Fn(&FlowRef)) -> Vec<FlowRef> {
        let s = self.flow_cursor.fetch_add(1, Ordering::Relaxed) as usize;
        self.flow_gc_slices(s..s + 1, now, refresh)
    }

    fn flow_gc_slices(
        &self,
        slices: std::ops::Range<usize>,
        now: Timestamp,
        refresh: &dyn Fn(&FlowRef),
    ) -> Vec<FlowRef> {
        let t = &self.tracker.config().timeouts;
        let checks = self.flow_checks.load(Ordering::Relaxed);
        // The gc looks at a flow only when it is due to expire: at the start of each pass
        // (once a second, as the kernel's gc sees them), the flows of connections removed
        // since (conntrack -D, a flush, early drop) are looked for among all.
        let removed = self.tracker.table().offloaded_removed();
        let dying = slices.start % flowtable::GC_SLICES == 0
            && self.flow_dying_seen.swap(removed, Ordering::Relaxed) != removed;
        if checks > 0 {
            // A reload racing this store sets 2 again, or is caught by the next call.
            let _ = self.flow_checks.compare_exchange(
                checks,
                checks - 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        if checks > 0 || dying {
            self.flows
                .teardown_unless(|f| self.flow_current(f) && !f.conn.is_dying(), t, now);
        }
        slices
            .flat_map(|s| self.flows.gc_step(s, t, now, refresh))
            .collect()
    }

    /// What a dataplane fast path forwarded for `flow` in direction `dir` since it last said:
    /// `packets` and `bytes` (IP lengths; zero where the fast path does not count them, for
    /// a flowtable without `counter`) count on the connection if the flowtable counts, and
    /// its last packet, at `last_seen`, refreshes the flow as one the engine forwarded would.
    pub fn flow_account(
        &self,
        flow: &FlowRef,
        dir: conntrack::Dir,
        packets: u64,
        bytes: u64,
        last_seen: Timestamp,
    ) {
        if packets > 0 {
            flow.account(dir, packets, bytes);
        }
        flow.refresh(last_seen);
    }

    /// Runs the tracker's and the reassembler's incremental expiry: call it now and then (a
    /// few buckets at a time).
    pub fn housekeeping(&self, now: Timestamp, buckets: usize) -> usize {
        self.frags.expire(now.0);
        self.tracker.gc_step(now, buckets)
    }

    /// [`Engine::housekeeping`] as the appliance runs it every tick: the reassembler's expiry,
    /// and the tracker's GC paced as the kernel's (see [`crate::conntrack::Table::gc_paced`]),
    /// at most `budget` buckets now.
    pub fn housekeeping_paced(&self, now: Timestamp, budget: usize) -> usize {
        self.frags.expire(now.0);
        self.tracker.gc_paced(now, budget)
    }

    /// The fragment reassembler (its statistics).
    pub fn reassembler(&self) -> &Reassembler {
        &self.frags
    }

    /// Decides a frame that arrived on port `ingress` at `now`. `cpu` is the worker's index
    /// (for per-worker statistics). Allocates and records every matching rule (as a trace
    /// does); the hot path uses [`Engine::process_with`].
    pub fn process(&self, frame: &[u8], ingress: usize, now: Timestamp, cpu: usize) -> Outcome {
        let mut w = Worker::new(cpu);
        // A fresh worker per call must not replay the same random port offsets every time.
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        w.rng ^= n.wrapping_mul(0x94d0_49bb_1331_11eb);
        self.process_traced(frame, ingress, now, &mut w)
    }

    /// [`Engine::process`] with a worker kept across frames (its NAT port choices continue
    /// one random sequence, as one CPU's do).
    pub fn process_traced(
        &self,
        frame: &[u8],
        ingress: usize,
        now: Timestamp,
        w: &mut Worker,
    ) -> Outcome {
        w.trace = true;
        let mut out = frame.to_vec();
        let (verdict, ct_state) = self.process_with(&mut out, ingress, now, w);
        if let Some(r) = w.resized.take() {
            out = r;
        }
        Outcome {
            verdict,
            ct_state,
            rules: std::mem::take(&mut w.matched),
            events: std::mem::take(&mut w.events),
            released: std::mem::take(&mut w.released),
            reply: w.reply.take(),
            logs: std::mem::take(&mut w.logs),
            frame: out,
        }
    }

    /// Decides a frame: the verdict and the `ct state` bit rules saw (none for frames that
    /// did not parse). The rules that matched and the conntrack events are left in `w`. A
    /// frame that leaves (forwarded or delivered) is edited in place first: NAT, TTL.
    pub fn process_with(
        &self,
        frame: &mut [u8],
        ingress: usize,
        now: Timestamp,
        w: &mut Worker,
    ) -> (Verdict, Option<u32>) {
        w.edits = Edits::default();
        w.resized = None;
        let out = self.decide(frame, ingress, now, w);
        if matches!(out.0, Verdict::Forward { .. } | Verdict::Local) && !w.edits.is_empty() {
            let e = std::mem::take(&mut w.edits);
            let mut ok = match e.at {
                Some((at, len, l)) => frame
                    .get_mut(at..at + len)
                    .map(|ip| apply_edits(ip, &l, &e)),
                None => Some(Ok(())),
            };
            // A helper's payload rewrite, last (it recomputes the TCP checksum): a frame of
            // another length, which leaves in place of this one.
            if let (Some(m), Some((at, len, l)), Some(Ok(()))) = (&e.mangle, e.at, &ok) {
                let ip = frame.get(at..at + len).unwrap_or(&[]);
                match rewrite::mangle(ip, &l, m.offset, m.len, &m.text) {
                    Ok(new_ip) => {
                        let mut f = frame[..at].to_vec();
                        f.extend_from_slice(&new_ip);
                        w.resized = Some(f);
                    }
                    Err(err) => ok = Some(Err(err)),
                }
            }
            // The fragments of a reassembled datagram: each is parsed and edited.
            let mut frags_ok = true;
            for f in &mut w.released {
                let (at, len, l) = match packet::parse_ethernet(f) {
                    Frame::Ip(p) => (p.l3_offset, p.ip_bytes.len(), Layout::of(&p)),
                    _ => continue,
                };
                if let Some(ip) = f.get_mut(at..at + len) {
                    frags_ok &= apply_edits(ip, &l, &e).is_ok();
                }
            }
            if !matches!(ok, Some(Ok(()))) || !frags_ok {
                self.stat(w.cpu).malformed.fetch_add(1, Ordering::Relaxed);
                return (Verdict::Drop(DropReason::Malformed), out.1);
            }
        }
        out
    }

    fn decide(
        &self,
        frame: &[u8],
        ingress: usize,
        now: Timestamp,
        w: &mut Worker,
    ) -> (Verdict, Option<u32>) {
        self.stat(w.cpu).frames.fetch_add(1, Ordering::Relaxed);
        w.matched.clear();
        w.events.clear();
        let Some(in_port) = self.ports.get(ingress) else {
            return (Verdict::Drop(DropReason::UnknownPort), None);
        };
        w.released.clear();
        w.reply = None;
        w.logs.clear();
        w.flow_events.clear();
        w.flow_add = None;
        let pkt = match packet::parse_ethernet(frame) {
            Frame::Ip(p) => p,
            Frame::NonIp { .. } => {
                self.stat(w.cpu).not_ip.fetch_add(1, Ordering::Relaxed);
                return (Verdict::NotIp, None);
            }
            Frame::Invalid(_) => {
                self.stat(w.cpu).malformed.fetch_add(1, Ordering::Relaxed);
                return (Verdict::Drop(DropReason::Malformed), None);
            }
        };
        if let Some(v) = self.flowtable_forward(&pkt, ingress, now, w) {
            return (v, None);
        }
        if pkt.ip.frag().is_some() {
            // nf_defrag: judge the whole datagram, then forward its original fragments.
            return match self.frags.push_ctx(ingress as u32, &pkt, frame, now.0) {
                Push::NotFragment => self.judge(&pkt, frame, ingress, in_port.packed_name, now, w),
                Push::Held => (Verdict::Held, None),
                Push::Dropped(_) => {
                    self.stat(w.cpu)
                        .dropped_fragments
                        .fetch_add(1, Ordering::Relaxed);
                    (Verdict::Drop(DropReason::Fragment), None)
                }
                Push::Complete {
                    reassembled,
                    frames,
                } => {
                    let whole = match packet::parse_ip(&reassembled) {
                        Frame::Ip(p) => p,
                        _ => {
                            self.stat(w.cpu).malformed.fetch_add(1, Ordering::Relaxed);
                            return (Verdict::Drop(DropReason::Malformed), None);
                        }
                    };
                    let out = self.judge(&whole, frame, ingress, in_port.packed_name, now, w);
                    w.edits.at = None;
                    w.released = frames;
                    out
                }
            };
        }
        self.judge(&pkt, frame, ingress, in_port.packed_name, now, w)
    }

    /// Conntrack, the hooks and routing for one (whole) IP packet.
    fn judge(
        &self,
        pkt: &Packet<'_>,
        frame: &[u8],
        ingress: usize,
        iif: u128,
        now: Timestamp,
        w: &mut Worker,
    ) -> (Verdict, Option<u32>) {
        let pkt = *pkt;
        w.edits.at = Some((pkt.l3_offset, pkt.ip_bytes.len(), Layout::of(&pkt)));
        let ctx = PktCtx {
            hook: conntrack::Hook::Prerouting,
            cpu: w.cpu,
        };
        let compiled = self.rules.load();
        let mut limits = Limits {
            compiled: &compiled,
            now: now.0,
        };
        // The raw prerouting chains run before conntrack: they see no connection (`ct state
        // invalid`), and `notrack` there leaves the packet untracked.
        let mut untracked = false;
        let mut raw_mark = None;
        if let Some(raw) = &compiled.raw {
            let mut key = packet_key(&pkt, None, iif);
            let tree = &raw[pkt.ip.is_v6() as usize];
            let d = self.run_stage(
                tree,
                &compiled,
                Hook::Prerouting,
                &mut key,
                None,
                (&pkt, frame),
                &mut limits,
                w,
            );
            if let Some(v) = self.refused(d, w.cpu) {
                self.answer(&v, frame, &pkt, ingress, w);
                return (v, Some(ir::ct_state::INVALID as u32));
            }
            untracked =
                w.ev.actions
                    .iter()
                    .any(|&a| matches!(action_stmt(&compiled.ruleset, a), Some(Stmt::Notrack)));
            raw_mark = key.get(Field::Mark);
        }
        let ct = if untracked {
            Classified::Untracked
        } else {
            self.tracker.classify(&pkt, ctx, now)
        };
        let ct_bits = ct.ct_state();
        if let Classified::Tracked(t) = &ct {
            if t.events != 0 && !t.is_tentative() {
                w.events.push((t.events, t.conn.clone()));
            }
        }
        if let Classified::Drop(r) = &ct {
            let reason = match r {
                conntrack::DropReason::TableFull => {
                    self.stat(w.cpu)
                        .dropped_table_full
                        .fetch_add(1, Ordering::Relaxed);
                    DropReason::TableFull
                }
                conntrack::DropReason::InsertFailed => {
                    self.stat(w.cpu)
                        .dropped_insert_failed
                        .fetch_add(1, Ordering::Relaxed);
                    DropReason::InsertFailed
                }
            };
            return (Verdict::Drop(reason), Some(ct_bits));
        }
        // nat chains see the first packet of a connection, unless its NAT is already set up:
        // an expected connection of a translated master is bound from its expectation when
        // it is created (`nf_nat_follow_master`), so `nf_nat_inet_fn` runs no nat chain for it.
        let first = matches!(&ct, Classified::Tracked(t) if t.is_tentative() && t.follow.is_none());
        let tree = compiled.tree(pkt.ip.is_v6(), first);
        let mut key = packet_key(&pkt, Some(&ct), iif);
        if let Some(m) = raw_mark {
            key.set(Field::Mark, m);
        }

        // PREROUTING
        let d = self.run_hook(
            tree,
            &compiled,
            Hook::Prerouting,
            &mut key,
            &ct,
            (&pkt, frame),
            &mut limits,
            w,
        );
        if let Some(v) = self.refused(d, w.cpu) {
            self.answer(&v, frame, &pkt, ingress, w);
            return (v, Some(ct_bits));
        }
        // NAT at PREROUTING: the destination, before routing.
        let mut nat = NatCtx::new(&ct, &pkt, compiled.nat[pkt.ip.is_v6() as usize]);
        if let Some(n) = nat.as_mut() {
            let at = NatHook {
                manip: Manip::Dst,
                ingress,
                egress: None,
            };
            if let Err(r) = self.nat_step(n, at, &mut key, now, w) {
                return (Verdict::Drop(r), Some(ct_bits));
            }
        }

        // Routing. Multicast and broadcast destinations are the box's own (RTN_MULTICAST,
        // RTN_BROADCAST are delivered locally, never forwarded).
        let dst = w.edits.rw.dst.unwrap_or(pkt.ip.dst());
        let local = self.ports.iter().any(|p| p.addresses.contains(&dst)) || packet::is_group(dst);
        let (hooks, verdict): (&[Hook], Verdict) = if local {
            (&[Hook::Input], Verdict::Local)
        } else {
            match self.route(ingress, dst) {
                Some((port, next_hop)) => {
                    // ip_forward: the TTL runs out here, after routing and before FORWARD,
                    // whose rules see it decremented.
                    let ttl = match pkt.ip {
                        Ip::V4(v) => v.ttl,
                        Ip::V6(v) => v.hop_limit,
                    };
                    if ttl <= 1 {
                        self.stat(w.cpu).dropped_ttl.fetch_add(1, Ordering::Relaxed);
                        w.reply = self.answer_from(ingress, frame, &pkt, Answer::TimeExceeded);
                        return (Verdict::Drop(DropReason::TtlExceeded), Some(ct_bits));
                    }
                    w.edits.ttl = true;
                    let f = if pkt.ip.is_v6() {
                        Field::Ip6Hoplimit
                    } else {
                        Field::Ip4Ttl
                    };
                    key.set(f, u128::from(ttl - 1));
                    key.set(Field::Oifname, self.ports[port].packed_name);
                    (
                        &[Hook::Forward, Hook::Postrouting],
                        Verdict::Forward { port, next_hop },
                    )
                }
                None => {
                    self.stat(w.cpu)
                        .dropped_no_route
                        .fetch_add(1, Ordering::Relaxed);
                    return (Verdict::Drop(DropReason::NoRoute), Some(ct_bits));
                }
            }
        };
        let egress = match verdict {
            Verdict::Forward { port, next_hop } => Some((port, next_hop)),
            _ => None,
        };
        for &h in hooks {
            let d = self.run_hook(
                tree,
                &compiled,
                h,
                &mut key,
                &ct,
                (&pkt, frame),
                &mut limits,
                w,
            );
            if let Some(v) = self.refused(d, w.cpu) {
                self.answer(&v, frame, &pkt, ingress, w);
                return (v, Some(ct_bits));
            }
            // nft_flow_offload_eval ran in the forward chain: the connection's flow is made
            // there, before postrouting.
            if let (Hook::Forward, Some(ft), Some((port, nh))) = (h, w.flow_add.take(), egress) {
                self.offload(&compiled, &ct, &pkt, ft, (ingress, port, nh), now, w);
            }
        }
        // NAT at POSTROUTING (or INPUT): the source.
        if let Some(n) = nat.as_mut() {
            let at = NatHook {
                manip: Manip::Src,
                ingress,
                egress,
            };
            if let Err(r) = self.nat_step(n, at, &mut key, now, w) {
                return (Verdict::Drop(r), Some(ct_bits));
            }
            if n.first && n.reply != n.tracked.conn.reply() {
                let c = &n.tracked.conn;
                c.set_nat(ctnat::binding(c.orig(), n.reply, c.status()));
            }
        }

        // The connection's helper reads the packet (nf_confirm), and may refuse it.
        if let Classified::Tracked(t) = &ct {
            match self.tracker.help(t, &pkt, now) {
                conntrack::helper::Help::Accept => {}
                conntrack::helper::Help::Mangle(m) => w.edits.mangle = Some(m),
                conntrack::helper::Help::Drop(why) => {
                    self.stat(w.cpu)
                        .dropped_helper
                        .fetch_add(1, Ordering::Relaxed);
                    w.logs.push(format!("{why}\n"));
                    return (Verdict::Drop(DropReason::Helper), Some(ct_bits));
                }
            }
            // nf_ct_seq_adjust: a connection whose stream a helper resized.
            if t.conn.status() & conntrack::status::SEQ_ADJUST != 0 {
                if let (Some(adj), L4::Tcp(_)) = (t.conn.seqadj(), &pkt.l4) {
                    w.edits.seqadj = Some((adj, t.info.dir()));
                }
            }
        }

        // nf_conntrack_confirm: the packet survived every hook.
        if let Classified::Tracked(t) = &ct {
            if t.is_tentative() {
                let cctx = PktCtx {
                    hook: conntrack::Hook::Prerouting,
                    cpu: w.cpu,
                };
                match self.tracker.confirm(t, cctx, now) {
                    // __nf_conntrack_confirm caches IPCT_NEW (IPCT_RELATED for an expected
                    // connection; ctnetlink reports both as NEW): the tracker leaves that bit
                    // to whoever confirms, so a `conntrack -E` reader sees `[NEW]`.
                    Confirmed::Inserted => {
                        if t.conn.status() & conntrack::status::SRC_NAT_DONE != 0 {
                            self.tracker.table().bysource_add(&t.conn);
                        }
                        w.events
                            .push((t.events | conntrack::EV_NEW, t.conn.clone()))
                    }
                    Confirmed::Already | Confirmed::Clash(_) => {}
                    Confirmed::Failed(_) => {
                        self.stat(w.cpu)
                            .dropped_insert_failed
                            .fetch_add(1, Ordering::Relaxed);
                        return (Verdict::Drop(DropReason::InsertFailed), Some(ct_bits));
                    }
                }
            }
        }
        self.stat(w.cpu).accepted.fetch_add(1, Ordering::Relaxed);
        (verdict, Some(ct_bits))
    }

    /// One NAT hook for a tracked packet (`nf_nat_inet_fn`): the first packet of a connection
    /// sets the hook's binding up (the rule's NAT statement, else a null binding); then the
    /// packet gets the hook's edit, and later hooks' rules see the edited fields.
    fn nat_step(
        &self,
        n: &mut NatCtx<'_>,
        at: NatHook,
        key: &mut PacketKey,
        now: Timestamp,
        w: &mut Worker,
    ) -> Result<(), DropReason> {
        let conn = &n.tracked.conn;
        if n.first && conn.status() & ctnat::done_bit(at.manip) == 0 {
            let stmt = w.nat_stmt.take();
            let range = match (n.tracked.follow, stmt) {
                // nf_nat_follow_master: an expected connection of a translated master goes
                // where the master's payload pointed before the helper rewrote it.
                (Some(f), _) => {
                    let a = match at.manip {
                        Manip::Src => f.snat,
                        Manip::Dst => f.dnat.0,
                    };
                    ctnat::Range {
                        addr: Some((a, a)),
                        port: (at.manip == Manip::Dst).then_some((f.dnat.1, f.dnat.1)),
                        ..ctnat::Range::default()
                    }
                }
                (None, Some(stmt)) => match self.nat_range(&stmt, at, n.v6, key) {
                    Some(r) => r,
                    None => {
                        self.stat(w.cpu).dropped_nat.fetch_add(1, Ordering::Relaxed);
                        return Err(DropReason::NatNoAddress);
                    }
                },
                (None, None) => ctnat::null_range(&n.reply, at.manip),
            };
            let taken = TableView {
                table: self.tracker.table(),
                now: now.0,
            };
            let mut random = || w.random_u16();
            match ctnat::setup(&n.reply, &range, at.manip, &taken, &mut random) {
                None => return Err(self.nat_failed(w.cpu)),
                Some(new) => {
                    if new != n.reply {
                        conn.set_status(ctnat::status_bit(at.manip));
                        n.reply = new;
                    }
                }
            }
            conn.set_status(ctnat::done_bit(at.manip));
            // Later hooks' `ct status snat/dnat` see the binding.
            key.set(Field::CtStatus, u128::from(conn.status()));
        }
        let st = conn.status();
        if st & (conntrack::status::SRC_NAT | conntrack::status::DST_NAT) == 0 {
            return Ok(());
        }
        let dir = n.tracked.info.dir();
        // An established packet: the binding has both hooks' edits ready, compiled for this
        // direction; they are taken at PREROUTING (routing and later rules see the new
        // destination; nothing after the source manip looks at the source).
        if !n.first && !n.icmp_error {
            if w.edits.fast.is_some() {
                // Both hooks' edits were taken at PREROUTING.
                return Ok(());
            }
            if let Some(b) = conn.nat() {
                if at.manip == Manip::Dst {
                    let fast = b.rewrite[dir.index()].0;
                    let rw = *fast.rewrite();
                    w.edits.rw.merge(rw);
                    w.edits.fast = Some(fast);
                    set_key_addrs(key, &Rewrite { src: None, ..rw });
                    if let Some(p) = rw.dport {
                        key.set(Field::Dport, u128::from(p));
                    }
                }
                return Ok(());
            }
        }
        let orig = conn.orig();
        if !n.first {
            n.reply = conn.reply();
        }
        if n.icmp_error {
            if let Some((outer, inner)) = ctnat::icmp_error(orig, &n.reply, st, dir, at.manip) {
                w.edits.rw.merge(outer);
                w.edits
                    .inner
                    .get_or_insert_with(Rewrite::default)
                    .merge(inner);
                set_key_addrs(key, &outer);
            }
        } else if let Some(rw) = ctnat::packet(orig, &n.reply, st, dir, at.manip) {
            w.edits.rw.merge(rw);
            set_key_addrs(key, &rw);
            if let Some(p) = rw.sport {
                key.set(Field::Sport, u128::from(p));
            }
            if let Some(p) = rw.dport {
                key.set(Field::Dport, u128::from(p));
            }
        }
        Ok(())
    }

    /// The range a NAT statement asks for at this hook (`nft_nat_eval`, `nft_masq_eval`,
    /// `nft_redir_eval`): `masquerade` takes the output port's address (the one on the next
    /// hop's network if several), `redirect` the input port's first address. `None` when the
    /// port has no address of the packet's family (the kernel drops those packets too).
    fn nat_range(
        &self,
        stmt: &ir::Nat,
        at: NatHook,
        v6: bool,
        key: &PacketKey,
    ) -> Option<ctnat::Range> {
        let own = |port: usize, near: Option<IpAddr>| {
            let addrs = &self.ports.get(port)?.addresses;
            let mut fam = addrs.iter().copied().filter(|a| a.is_ipv6() == v6);
            let on_link = near.and_then(|nh| {
                addrs
                    .iter()
                    .copied()
                    .find(|&a| self.connected(port).any(|r| r.holds(a) && r.holds(nh)))
            });
            on_link.or_else(|| fam.next())
        };
        let mut port = stmt.port;
        let addr = match stmt.kind {
            ir::NatKind::Snat | ir::NatKind::Dnat => match &stmt.map {
                // The rule matched only if the key is in the map, so the lookup hits.
                Some(m) => {
                    let k: Option<Vec<u128>> = m.fields.iter().map(|f| key.get(*f)).collect();
                    let (a, p) = m.lookup(&k?)?;
                    if let Some(p) = p {
                        port = Some((p, p));
                    }
                    Some((a, a))
                }
                None => stmt.addr,
            },
            ir::NatKind::Masquerade => {
                let (port, nh) = at.egress?;
                let a = own(port, Some(nh))?;
                Some((a, a))
            }
            ir::NatKind::Redirect => {
                let a = own(at.ingress, None)?;
                Some((a, a))
            }
        };
        if addr.is_some_and(|(a, _)| a.is_ipv6() != v6) {
            return None;
        }
        Some(ctnat::Range {
            addr,
            port,
            random: stmt.flags.random,
            fully_random: stmt.flags.fully_random,
            persistent: stmt.flags.persistent,
        })
    }

    /// The connected networks of a port.
    fn connected(&self, port: usize) -> impl Iterator<Item = &RouteEntry> + '_ {
        let table: &[RouteEntry] = match &self.routing {
            Routing::Router(t) => t,
            Routing::Pairs => &[],
        };
        table
            .iter()
            .filter(move |r| r.port == port && r.via.is_none())
    }

    /// Counts a NAT failure: the engine's own counter, and conntrack's `insert_failed` and
    /// `drop`, where the kernel's confirm of the clashing tuple would count it.
    fn nat_failed(&self, cpu: usize) -> DropReason {
        self.stat(cpu).dropped_nat.fetch_add(1, Ordering::Relaxed);
        self.tracker.count_insert_failed(cpu);
        DropReason::NatFailed
    }

    /// An ICMP answer from the box's address on the ingress port.
    fn answer_from(
        &self,
        ingress: usize,
        frame: &[u8],
        pkt: &Packet<'_>,
        kind: Answer,
    ) -> Option<Vec<u8>> {
        let v6 = pkt.ip.is_v6();
        let from = self.ports[ingress]
            .addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv6() == v6);
        reject::answer(frame, pkt, kind, from)
    }

    /// Builds the answer to a rejected packet (`nf_send_unreach`, `nf_send_reset`), sent from
    /// the box's address on the ingress port.
    fn answer(&self, v: &Verdict, frame: &[u8], pkt: &Packet<'_>, ingress: usize, w: &mut Worker) {
        let Verdict::Reject(r) = v else { return };
        let v6 = pkt.ip.is_v6();
        let kind = match *r {
            ir::Reject::Default if v6 => Answer::Icmp6(4),
            ir::Reject::Default => Answer::Icmp(3),
            ir::Reject::TcpReset => Answer::TcpReset,
            ir::Reject::Icmp(c) => Answer::Icmp(c),
            ir::Reject::Icmp6(c) => Answer::Icmp6(c),
            ir::Reject::Icmpx(c) => reject::icmpx(c, v6),
        };
        w.reply = self.answer_from(ingress, frame, pkt, kind);
    }

    /// A drop or reject from a hook, as the final verdict.
    fn refused(&self, d: Decision, cpu: usize) -> Option<Verdict> {
        match d {
            Decision::Accept => None,
            Decision::Drop => {
                self.stat(cpu)
                    .dropped_by_rules
                    .fetch_add(1, Ordering::Relaxed);
                Some(Verdict::Drop(DropReason::Rules))
            }
            Decision::Reject(r) => {
                self.stat(cpu).rejected.fetch_add(1, Ordering::Relaxed);
                Some(Verdict::Reject(r))
            }
        }
    }

    /// Evaluates one hook and applies its side effects: counters, marks, helpers.
    #[allow(clippy::too_many_arguments)]
    fn run_hook(
        &self,
        tree: &Tree,
        compiled: &Compiled,
        hook: Hook,
        key: &mut PacketKey,
        ct: &Classified,
        (pkt, frame): (&Packet<'_>, &[u8]),
        limits: &mut Limits<'_>,
        w: &mut Worker,
    ) -> Decision {
        if !compiled.hooked[hook as usize] {
            return Decision::Accept;
        }
        if !w.trace
            && key.get(Field::CtState) == Some(ir::ct_state::ESTABLISHED)
            && compiled.established_fast[pkt.ip.is_v6() as usize][hook as usize]
        {
            return Decision::Accept;
        }
        self.run_stage(tree, compiled, hook, key, Some(ct), (pkt, frame), limits, w)
    }

    /// Evaluates `tree` at `hook` and applies the side effects: counters, log lines, marks,
    /// helpers. `ct` is `None` before conntrack (the raw chains).
    #[allow(clippy::too_many_arguments)]
    fn run_stage(
        &self,
        tree: &Tree,
        compiled: &Compiled,
        hook: Hook,
        key: &mut PacketKey,
        ct: Option<&Classified>,
        (pkt, frame): (&Packet<'_>, &[u8]),
        limits: &mut Limits<'_>,
        w: &mut Worker,
    ) -> Decision {
        let ev = &mut w.ev;
        tree.eval(hook, key, limits, ev);
        w.matched.extend_from_slice(&ev.rules);
        let len = pkt.ip_bytes.len() as u64;
        for &a in &ev.actions {
            match action_stmt(&compiled.ruleset, a) {
                Some(Stmt::Counter { .. }) => {
                    if let Some(c) = compiled.counters.get(a.rule as usize) {
                        c[0].fetch_add(1, Ordering::Relaxed);
                        c[1].fetch_add(len, Ordering::Relaxed);
                    }
                }
                Some(Stmt::Log { prefix, .. }) => {
                    let name = |f| key.get(f).map(types::unpack_name).unwrap_or_default();
                    w.logs.push(log::line(
                        prefix.as_deref().unwrap_or(""),
                        &name(Field::Iifname),
                        &name(Field::Oifname),
                        frame,
                        pkt,
                    ));
                }
                Some(Stmt::Nat(n)) => w.nat_stmt = Some(n.clone()),
                Some(Stmt::FlowAdd { table, flowtable }) if hook == Hook::Forward => {
                    w.flow_add = Some((*table, flowtable.clone()))
                }
                Some(Stmt::CtHelperSet(name)) => {
                    // nft_ct_helper_obj_eval: only a connection not confirmed yet, of the
                    // object's protocol, without a helper, gets one.
                    let conn = ct.and_then(|c| c.conn()).filter(|c| {
                        !c.is_confirmed() && c.status() & conntrack::status::HELPER == 0
                    });
                    let obj = compiled
                        .ruleset
                        .tables
                        .iter()
                        .flat_map(|t| t.ct_helpers.iter())
                        .find(|h| &h.name == name);
                    if let (Some(conn), Some(obj)) = (conn, obj) {
                        if obj.protocol == pkt.ip.protocol() {
                            conn.set_helper(HelperName::new(&obj.helper_type));
                        }
                    }
                }
                // Marks come back in `ev.meta_mark` / `ev.ct_mark`, applied below.
                _ => {}
            }
        }
        if let Some(m) = ev.meta_mark {
            key.set(Field::Mark, m as u128);
        }
        if let Some(m) = ev.ct_mark {
            if let Some(conn) = ct.and_then(|c| c.conn()) {
                conn.set_mark(m);
                key.set(Field::CtMark, m as u128);
            }
        }
        ev.verdict
    }

    /// The flowtable's ingress hook (`nf_flow_offload_ip_hook`, `nf_flow_offload_ipv6_hook`):
    /// a TCP or UDP packet of an offloaded connection, on a port of its flowtable, is
    /// forwarded here with its NAT, TTL and counters, and never meets conntrack or a chain.
    /// `None`: the slow path.
    fn flowtable_forward(
        &self,
        pkt: &Packet<'_>,
        ingress: usize,
        now: Timestamp,
        w: &mut Worker,
    ) -> Option<Verdict> {
        if self.flows.is_empty() || self.flow_ports.load().get(ingress)?.is_none() {
            return None;
        }
        // nf_flow_tuple_ip: no fragment, no IPv4 options, TTL left to decrement.
        // XXX: VLAN-tagged frames take the slow path (the kernel's tuple holds the tag).
        let ttl = match pkt.ip {
            Ip::V4(v) if v.header_len != 20 || pkt.ip.frag().is_some() => return None,
            Ip::V4(v) => v.ttl,
            Ip::V6(v) => v.hop_limit,
        };
        if ttl <= 1 || pkt.vlan.is_some() || !matches!(pkt.l4, L4::Tcp(_) | L4::Udp(_)) {
            return None;
        }
        let tuple = Tuple::from_packet(pkt).ok()?;
        let (flow, dir) = self.flows.lookup(ingress, &tuple)?;
        if !self.flow_current(&flow) {
            return None;
        }
        if let L4::Tcp(t) = &pkt.l4 {
            use packet::tcp_flags::{FIN, RST, SYN};
            let check = self.flows.state_check(
                &flow,
                t.flags & SYN != 0,
                t.flags & (FIN | RST) != 0,
                &self.tracker.config().timeouts,
                now,
            );
            if check == StateCheck::TornDown {
                w.flow_events.push(FlowEvent::TornDown(flow));
                return None;
            }
        }
        // flow_offload_refresh: a dataplane that refused the flow is asked again.
        if flow.refresh(now) && flow.wants_mirror(&self.flows) {
            w.flow_events.push(FlowEvent::Offloaded(flow.clone()));
        }
        let conn = &flow.conn;
        if conn.status() & (conntrack::status::SRC_NAT | conntrack::status::DST_NAT) != 0 {
            if let Some(b) = conn.nat() {
                let fast = b.rewrite[dir.index()].0;
                w.edits.rw = *fast.rewrite();
                w.edits.fast = Some(fast);
            }
        }
        w.edits.ttl = true;
        w.edits.at = Some((pkt.l3_offset, pkt.ip_bytes.len(), Layout::of(pkt)));
        flow.account(dir, 1, pkt.ip_bytes.len() as u64);
        let out = flow.dirs[dir.index()];
        self.stat(w.cpu)
            .flowtable_forwarded
            .fetch_add(1, Ordering::Relaxed);
        Some(Verdict::Forward {
            port: out.oif,
            next_hop: out.next_hop,
        })
    }

    /// `nft_flow_offload_eval`: offloads the packet's connection to the flowtable `ft`
    /// (table index, name) if it qualifies: confirmed; TCP ESTABLISHED and ASSURED with no
    /// FIN or RST on this packet, or UDP; no helper, no sequence adjustment, no NAT clash; not
    /// offloaded already; no IPv4 options; a route back for the other direction.
    /// `(ingress, egress, next hop)` are this packet's.
    #[allow(clippy::too_many_arguments)]
    fn offload(
        &self,
        compiled: &Compiled,
        ct: &Classified,
        pkt: &Packet<'_>,
        ft: (usize, String),
        (ingress, egress, next_hop): (usize, usize, IpAddr),
        now: Timestamp,
        w: &mut Worker,
    ) {
        use conntrack::status::{HELPER, NAT_CLASH, SEQ_ADJUST};
        let Classified::Tracked(t) = ct else { return };
        let conn = &t.conn;
        if !conn.is_confirmed() || conn.status() & (HELPER | SEQ_ADJUST | NAT_CLASH) != 0 {
            return;
        }
        match (&pkt.l4, pkt.ip) {
            (_, Ip::V4(v)) if v.header_len != 20 => return,
            (L4::Tcp(th), _) => {
                use packet::tcp_flags::{FIN, RST};
                // nf_conntrack_tcp_established: ESTABLISHED and ASSURED.
                if th.flags & (FIN | RST) != 0
                    || conn.tcp_state() != Some(conntrack::TcpState::Established)
                    || !conn.is_assured()
                {
                    return;
                }
            }
            (L4::Udp(_), _) => {}
            _ => return,
        }
        let Some(spec) = compiled
            .flowtables
            .iter()
            .find(|f| f.table == ft.0 && f.name == ft.1)
        else {
            return;
        };
        // nft_flow_route: this direction leaves by the packet's route; the other goes back
        // towards this direction's source.
        let dir = t.info.dir();
        let back_to = conn.tuple(dir).src_ip();
        let Some((back_port, back_hop)) = self.route(egress, back_to) else {
            return;
        };
        let this = FlowDir {
            tuple: conn.tuple(dir),
            iif: ingress,
            oif: egress,
            next_hop,
        };
        let other = FlowDir {
            tuple: conn.tuple(dir.other()),
            iif: egress,
            oif: back_port,
            next_hop: back_hop,
        };
        let dirs = match dir {
            conntrack::Dir::Original => [this, other],
            conntrack::Dir::Reply => [other, this],
        };
        let timeouts = &self.tracker.config().timeouts;
        if let Some(flow) = self
            .flows
            .offload(conn, &spec.key, spec.counter, dirs, timeouts, now)
        {
            w.flow_events.push(FlowEvent::Offloaded(flow));
        }
    }

    /// The port a packet leaves by and its next hop.
    fn route(&self, ingress: usize, dst: IpAddr) -> Option<(usize, IpAddr)> {
        match &self.routing {
            Routing::Pairs => {
                let out = ingress ^ 1;
                (out < self.ports.len()).then_some((out, dst))
            }
            Routing::Router(table) => crate::config::lookup(table, dst),
        }
    }
}

/// A tracked packet's NAT state through the hooks.
struct NatCtx<'a> {
    tracked: &'a Tracked,
    /// A NEW (or RELATED) connection still to be confirmed: the hooks set its binding up.
    first: bool,
    /// The REPLY tuple so far (bound on the connection before confirmation).
    reply: Tuple,
    /// An ICMP error RELATED to the connection: its quote is translated too.
    icmp_error: bool,
    v6: bool,
}

impl<'a> NatCtx<'a> {
    /// `None` when NAT cannot concern the packet: untracked, or a connection that is neither
    /// new in a family with nat chains nor translated.
    fn new(ct: &'a Classified, pkt: &Packet<'_>, nat_chains: bool) -> Option<NatCtx<'a>> {
        let Classified::Tracked(t) = ct else {
            return None;
        };
        let first = t.is_tentative() && (nat_chains || t.follow.is_some());
        let st = t.conn.status();
        if !first && st & (conntrack::status::SRC_NAT | conntrack::status::DST_NAT) == 0 {
            return None;
        }
        let icmp_error = matches!(t.info, CtInfo::Related | CtInfo::RelatedReply)
            && match &pkt.l4 {
                L4::Icmp(i) => packet::icmp_is_err(i.icmp_type),
                L4::Icmp6(i) => packet::icmpv6_is_err(i.icmp_type),
                _ => false,
            };
        Some(NatCtx {
            tracked: t,
            first,
            // Only a new connection works on its REPLY tuple here; an established one reads
            // its binding (one cache line), or the tuple when it needs it.
            reply: if first {
                t.conn.reply()
            } else {
                *t.conn.orig()
            },
            icmp_error,
            v6: pkt.ip.is_v6(),
        })
    }
}

/// Where a NAT hook is: which side it translates, the ports (egress with the next hop, for
/// masquerade).
#[derive(Clone, Copy)]
struct NatHook {
    manip: Manip,
    ingress: usize,
    egress: Option<(usize, IpAddr)>,
}

/// What NAT's tuple choice asks of the table.
struct TableView<'a> {
    table: &'a conntrack::Table,
    now: u64,
}

impl ctnat::Taken for TableView<'_> {
    /// `nf_nat_used_tuple`: the candidate's REPLY tuple belongs to a live connection.
    fn taken(&self, t: &Tuple) -> bool {
        t.invert().is_ok_and(|r| self.table.taken(&r, self.now))
    }
    fn appropriate_src(&self, orig: &Tuple, r: &ctnat::Range) -> Option<Tuple> {
        self.table
            .bysource_replies(orig, self.now)
            .iter()
            .find_map(|reply| ctnat::src_candidate(orig, reply, r))
    }
}

/// Later rules see translated addresses.
fn set_key_addrs(key: &mut PacketKey, rw: &Rewrite) {
    for (a, v4, v6) in [
        (rw.src, Field::Ip4Saddr, Field::Ip6Saddr),
        (rw.dst, Field::Ip4Daddr, Field::Ip6Daddr),
    ] {
        match a {
            Some(IpAddr::V4(a)) => key.set(v4, u128::from(u32::from(a))),
            Some(IpAddr::V6(a)) => key.set(v6, u128::from(a)),
            None => {}
        }
    }
}

/// The fields rules match on, from a parsed packet and what conntrack said.
/// Without `ct` (before conntrack), rules see `ct state invalid` and no connection fields, as
/// `nft_ct_get_eval` reports a packet with no conntrack attached.
pub fn packet_key(pkt: &Packet<'_>, ct: Option<&Classified>, iif: u128) -> PacketKey {
    let mut k = PacketKey::new();
    match &pkt.ip {
        Ip::V4(v) => {
            k.set(Field::Nfproto, ir::NFPROTO_IPV4);
            k.set(Field::Ip4Saddr, u32::from(v.src) as u128);
            k.set(Field::Ip4Daddr, u32::from(v.dst) as u128);
            k.set(Field::Ip4Ttl, v.ttl as u128);
            k.set(Field::Ip4Length, v.total_len as u128);
        }
        Ip::V6(v) => {
            k.set(Field::Nfproto, ir::NFPROTO_IPV6);
            k.set(Field::Ip6Saddr, u128::from(v.src));
            k.set(Field::Ip6Daddr, u128::from(v.dst));
            k.set(Field::Ip6Hoplimit, v.hop_limit as u128);
        }
    }
    k.set(Field::L4proto, pkt.ip.protocol() as u128);
    match &pkt.l4 {
        L4::Tcp(t) => {
            k.set(Field::Sport, t.sport as u128);
            k.set(Field::Dport, t.dport as u128);
            k.set(Field::TcpFlags, t.flags as u128);
        }
        L4::Udp(u) => {
            k.set(Field::Sport, u.sport as u128);
            k.set(Field::Dport, u.dport as u128);
        }
        L4::Icmp(i) => {
            k.set(Field::IcmpType, i.icmp_type as u128);
            k.set(Field::IcmpCode, i.code as u128);
        }
        L4::Icmp6(i) => {
            k.set(Field::Icmp6Type, i.icmp_type as u128);
            k.set(Field::Icmp6Code, i.code as u128);
        }
        L4::Malformed {
            ports: Some((s, d)),
            ..
        } => {
            k.set(Field::Sport, *s as u128);
            k.set(Field::Dport, *d as u128);
        }
        _ => {}
    }
    k.set(Field::Iifname, iif);
    k.set(Field::Mark, 0);
    let Some(ct) = ct else {
        k.set(Field::CtState, ir::ct_state::INVALID);
        return k;
    };
    k.set(Field::CtState, ct.ct_state() as u128);
    if let Some(s) = ct.ct_status() {
        k.set(Field::CtStatus, s as u128);
    }
    if let Some(m) = ct.ct_mark() {
        k.set(Field::CtMark, m as u128);
    }
    if let Some(d) = ct.ct_direction() {
        k.set(Field::CtDirection, d as u8 as u128);
    }
    if let Some(h) = ct.conn().and_then(|c| c.helper()) {
        k.set(Field::CtHelper, ir::pack_name(h.as_str()));
    }
    k
}
