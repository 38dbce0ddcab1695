//! The engine: the one place where packets, the connection tracker and the compiled ruleset
//! meet. Sans-IO: [`Engine::process`] takes a frame, its ingress port and `now`, and says what
//! to do with it; it reads no clock and touches no socket, so every behaviour (timeouts
//! included) is testable with a fake clock.
//!
//! The path of a frame from the wire, in netfilter's order (`nf_hook_slow` per hook):
//!
//! ```text
//!  parse -> conntrack (nf_conntrack_in, prerouting) -> PREROUTING chains
//!        -> routing: to one of our addresses? -> INPUT chains              -> confirm -> Local
//!                    else the route's port    -> FORWARD -> POSTROUTING    -> confirm -> Forward
//! ```
//!
//! nat base chains see only the first packet of a connection; tables of the other family
//! never see the packet ([`crate::rules::ir::Ruleset::view_for`]). A malformed frame is
//! counted and dropped, never a panic.
//!
//! XXX: NAT statements are evaluated but their translation is not applied yet (the NAT issue);
//! the helpers (ct helper set is recorded on the connection) and log output come later too.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::classify::{
    action_stmt, BuildError, Classifier, Decision, Evaluation, LimitSpec, Limiter, PacketKey, Tree,
};
use crate::config::Config;
use crate::conntrack::{
    self, Classified, Confirmed, CtConfig, HelperName, PktCtx, Timestamp, Tracker,
};
use crate::packet::{self, Frame, Ip, Packet, L4};
use crate::rules::ir::{self, Field, Hook, RuleId, Ruleset, Stmt};

/// What to do with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it out of port `port` (an index into the engine's ports) towards `next_hop`.
    Forward { port: usize, next_hop: IpAddr },
    /// It is for the box itself.
    Local,
    /// Drop it.
    Drop(DropReason),
    /// Drop it and answer with an ICMP error or TCP reset (the answer is built by the dataplane).
    Reject(ir::Reject),
    /// Not IP (ARP, LLDP, ...): the dataplane's business, not the firewall's.
    NotIp,
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
}

/// The engine's view of a port.
#[derive(Clone, Debug)]
pub struct Port {
    pub name: String,
    /// The port's own addresses; packets to them are delivered to the box.
    pub addresses: Vec<IpAddr>,
}

/// How frames find their way out.
#[derive(Clone, Debug)]
pub enum Routing {
    /// Router: connected networks and routes from the configuration.
    Router(Config),
    /// Ports in pairs (0↔1, 2↔3, ...), no addresses: a frame in on one leaves by the other.
    Pairs,
}

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
}

impl Compiled {
    pub fn new(loaded: &crate::rules::Loaded) -> Result<Compiled, BuildError> {
        let rs = Arc::new(loaded.ruleset.clone());
        let view = |nf, first| Tree::new(Arc::new(rs.view_for(nf, first)));
        let trees = [
            view(ir::NFPROTO_IPV4, true)?,
            view(ir::NFPROTO_IPV4, false)?,
            view(ir::NFPROTO_IPV6, true)?,
            view(ir::NFPROTO_IPV6, false)?,
        ];
        let n = rs.rules().count();
        let counters = (0..n)
            .map(|i| {
                let (p, b) = rs
                    .rules()
                    .nth(i)
                    .and_then(|r| {
                        r.stmts.iter().find_map(|s| match s {
                            Stmt::Counter { packets, bytes } => Some((*packets, *bytes)),
                            _ => None,
                        })
                    })
                    .unwrap_or((0, 0));
                [AtomicU64::new(p), AtomicU64::new(b)]
            })
            .collect();
        Ok(Compiled {
            ruleset: rs,
            trees,
            listing: loaded.listing(),
            counters,
            limits: Mutex::new(Vec::new()),
        })
    }

    fn tree(&self, v6: bool, first: bool) -> &Tree {
        &self.trees[(v6 as usize) * 2 + (!first) as usize]
    }
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
}

pub struct Engine {
    ports: Vec<Port>,
    routing: Routing,
    tracker: Tracker,
    rules: ArcSwap<Compiled>,
    pub stats: EngineStats,
}

impl Engine {
    pub fn new(ports: Vec<Port>, routing: Routing, ct: CtConfig, rules: Compiled) -> Engine {
        Engine {
            ports,
            routing,
            tracker: Tracker::new(ct),
            rules: ArcSwap::from_pointee(rules),
            stats: EngineStats::default(),
        }
    }

    /// A router from a configuration and its loaded ruleset.
    pub fn from_config(cfg: &Config, rules: &crate::rules::Loaded) -> Result<Engine, BuildError> {
        let ports = cfg
            .ports
            .iter()
            .map(|p| Port {
                name: p.name.clone(),
                addresses: p.addresses.iter().map(|a| a.addr()).collect(),
            })
            .collect();
        let mut ct = cfg.conntrack.tracker_config();
        ct.events = true;
        Ok(Engine::new(
            ports,
            Routing::Router(cfg.clone()),
            ct,
            Compiled::new(rules)?,
        ))
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
    /// Connections are kept.
    pub fn reload(&self, rules: Compiled) {
        self.rules.store(Arc::new(rules));
    }

    /// Runs the tracker's incremental expiry: call it now and then (a few buckets at a time).
    pub fn housekeeping(&self, now: Timestamp, buckets: usize) -> usize {
        self.tracker.gc_step(now, buckets)
    }

    /// Decides a frame that arrived on port `ingress` at `now`. `cpu` is the worker's index
    /// (for per-worker statistics).
    pub fn process(&self, frame: &[u8], ingress: usize, now: Timestamp, cpu: usize) -> Outcome {
        self.stats.frames.fetch_add(1, Ordering::Relaxed);
        let done = |verdict, ct_state, rules, events| Outcome {
            verdict,
            ct_state,
            rules,
            events,
        };
        let Some(in_port) = self.ports.get(ingress) else {
            return done(Verdict::Drop(DropReason::UnknownPort), None, vec![], vec![]);
        };
        let pkt = match packet::parse_ethernet(frame) {
            Frame::Ip(p) => p,
            Frame::NonIp { .. } => {
                self.stats.not_ip.fetch_add(1, Ordering::Relaxed);
                return done(Verdict::NotIp, None, vec![], vec![]);
            }
            Frame::Invalid(_) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                return done(Verdict::Drop(DropReason::Malformed), None, vec![], vec![]);
            }
        };
        let ctx = PktCtx {
            hook: conntrack::Hook::Prerouting,
            cpu,
        };
        let ct = self.tracker.classify(&pkt, ctx, now);
        let ct_bits = ct.ct_state();
        let mut events = Vec::new();
        if let Classified::Tracked(t) = &ct {
            if t.events != 0 && !t.is_tentative() {
                events.push((t.events, t.conn.clone()));
            }
        }
        if let Classified::Drop(r) = &ct {
            let reason = match r {
                conntrack::DropReason::TableFull => {
                    self.stats
                        .dropped_table_full
                        .fetch_add(1, Ordering::Relaxed);
                    DropReason::TableFull
                }
                conntrack::DropReason::InsertFailed => {
                    self.stats
                        .dropped_insert_failed
                        .fetch_add(1, Ordering::Relaxed);
                    DropReason::InsertFailed
                }
            };
            return done(Verdict::Drop(reason), Some(ct_bits), vec![], events);
        }
        let compiled = self.rules.load();
        let first = matches!(&ct, Classified::Tracked(t) if t.is_tentative());
        let tree = compiled.tree(pkt.ip.is_v6(), first);
        let mut key = packet_key(&pkt, &ct, &in_port.name);
        let mut ev = Evaluation::new();
        let mut matched = Vec::new();
        let mut limits = Limits {
            compiled: &compiled,
            now: now.0,
        };

        // PREROUTING
        let v = self.run_hook(
            tree,
            &compiled,
            Hook::Prerouting,
            &mut key,
            &ct,
            &pkt,
            &mut limits,
            &mut ev,
            &mut matched,
        );
        if let Some(out) = self.refused(v, ct_bits, &matched, &events) {
            return out;
        }

        // Routing.
        let dst = pkt.ip.dst();
        let local = self.ports.iter().any(|p| p.addresses.contains(&dst));
        let (hooks, verdict): (&[Hook], Verdict) = if local {
            (&[Hook::Input], Verdict::Local)
        } else {
            match self.route(ingress, dst) {
                Some((port, next_hop)) => {
                    key.set(Field::Oifname, ir::pack_name(&self.ports[port].name));
                    (
                        &[Hook::Forward, Hook::Postrouting],
                        Verdict::Forward { port, next_hop },
                    )
                }
                None => {
                    self.stats.dropped_no_route.fetch_add(1, Ordering::Relaxed);
                    return done(
                        Verdict::Drop(DropReason::NoRoute),
                        Some(ct_bits),
                        matched,
                        events,
                    );
                }
            }
        };
        for &h in hooks {
            let v = self.run_hook(
                tree,
                &compiled,
                h,
                &mut key,
                &ct,
                &pkt,
                &mut limits,
                &mut ev,
                &mut matched,
            );
            if let Some(out) = self.refused(v, ct_bits, &matched, &events) {
                return out;
            }
        }

        // nf_conntrack_confirm: the packet survived every hook.
        if let Classified::Tracked(t) = &ct {
            if t.is_tentative() {
                let cctx = PktCtx {
                    hook: conntrack::Hook::Prerouting,
                    cpu,
                };
                match self.tracker.confirm(t, cctx, now) {
                    // __nf_conntrack_confirm caches IPCT_NEW (IPCT_RELATED for an expected
                    // connection; ctnetlink reports both as NEW): the tracker leaves that bit
                    // to whoever confirms, so a `conntrack -E` reader sees `[NEW]`.
                    Confirmed::Inserted => {
                        events.push((t.events | conntrack::EV_NEW, t.conn.clone()))
                    }
                    Confirmed::Already | Confirmed::Clash(_) => {}
                    Confirmed::Failed(_) => {
                        self.stats
                            .dropped_insert_failed
                            .fetch_add(1, Ordering::Relaxed);
                        return done(
                            Verdict::Drop(DropReason::InsertFailed),
                            Some(ct_bits),
                            matched,
                            events,
                        );
                    }
                }
            }
        }
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        done(verdict, Some(ct_bits), matched, events)
    }

    /// A drop or reject from a hook, as the final outcome.
    fn refused(
        &self,
        d: Decision,
        ct: u32,
        matched: &[RuleId],
        events: &[(u16, conntrack::ConnRef)],
    ) -> Option<Outcome> {
        let verdict = match d {
            Decision::Accept => return None,
            Decision::Drop => {
                self.stats.dropped_by_rules.fetch_add(1, Ordering::Relaxed);
                Verdict::Drop(DropReason::Rules)
            }
            Decision::Reject(r) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                Verdict::Reject(r)
            }
        };
        Some(Outcome {
            verdict,
            ct_state: Some(ct),
            rules: matched.to_vec(),
            events: events.to_vec(),
        })
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
        pkt: &Packet<'_>,
        limits: &mut Limits<'_>,
        ev: &mut Evaluation,
        matched: &mut Vec<RuleId>,
    ) -> Decision {
        if compiled.ruleset.base_chains(hook).is_empty() {
            return Decision::Accept;
        }
        tree.eval(hook, key, limits, ev);
        matched.extend_from_slice(&ev.rules);
        let len = pkt.ip_bytes.len() as u64;
        for &a in &ev.actions {
            match action_stmt(&compiled.ruleset, a) {
                Some(Stmt::Counter { .. }) => {
                    if let Some(c) = compiled.counters.get(a.rule as usize) {
                        c[0].fetch_add(1, Ordering::Relaxed);
                        c[1].fetch_add(len, Ordering::Relaxed);
                    }
                }
                Some(Stmt::CtHelperSet(name)) => {
                    if let Some(conn) = ct.conn() {
                        // The helper's type, from the table's ct helper object.
                        let ty = compiled
                            .ruleset
                            .tables
                            .iter()
                            .flat_map(|t| t.ct_helpers.iter())
                            .find(|h| &h.name == name)
                            .map_or(name.as_str(), |h| h.helper_type.as_str());
                        conn.set_helper(HelperName::new(ty));
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
            if let Some(conn) = ct.conn() {
                conn.set_mark(m);
                key.set(Field::CtMark, m as u128);
            }
        }
        ev.verdict
    }

    /// The port a packet leaves by and its next hop.
    fn route(&self, ingress: usize, dst: IpAddr) -> Option<(usize, IpAddr)> {
        match &self.routing {
            Routing::Pairs => {
                let out = ingress ^ 1;
                (out < self.ports.len()).then_some((out, dst))
            }
            Routing::Router(cfg) => {
                let (port, hop) = cfg.route(dst)?;
                let i = self.port_index(&port.name)?;
                Some((i, hop))
            }
        }
    }
}

/// The fields rules match on, from a parsed packet and what conntrack said.
pub fn packet_key(pkt: &Packet<'_>, ct: &Classified, iif: &str) -> PacketKey {
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
    k.set(Field::Iifname, ir::pack_name(iif));
    k.set(Field::Mark, 0);
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
