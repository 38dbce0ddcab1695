//! Lowers the checked model to the IR: selectors become fields with explicit protocol
//! dependencies, values become interval sets, named sets are inlined (shared by `Arc`), and
//! chain names become indices.

use std::collections::HashMap;
use std::sync::Arc;

use super::ast::RelOp;
use super::check::sel_type;
use super::ir::{
    self, Field, Interval, IntervalSet, Match, Stmt, Verdict, NFPROTO_IPV4, NFPROTO_IPV6,
};
use super::model::*;
use super::print::rule_str;
use super::types::DType;

pub fn lower(m: &Model) -> ir::Ruleset {
    let mut next_id: ir::RuleId = 0;
    let mut tables = Vec::new();
    for t in &m.tables {
        let chain_index: HashMap<&str, usize> = t
            .chains
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.as_str(), i))
            .collect();
        let sets: HashMap<&str, &MSet> = t.sets.iter().map(|s| (s.name.as_str(), s)).collect();
        let mut cache: HashMap<String, LoweredSet> = HashMap::new();
        let cx = Lower {
            table: tables.len(),
            family: t.family,
            chains: &chain_index,
            sets: &sets,
        };
        let mut chains = Vec::new();
        for c in &t.chains {
            let mut rules = Vec::new();
            for r in &c.rules {
                rules.push(cx.rule(r, next_id, &mut cache));
                next_id += 1;
            }
            chains.push(ir::Chain {
                name: c.name.clone(),
                base: c.base.as_ref().map(|b| ir::BaseChain {
                    kind: b.chain_type,
                    hook: b.hook,
                    priority: b.priority,
                    policy: b.policy,
                }),
                rules,
            });
        }
        tables.push(ir::Table {
            family: t.family,
            name: t.name.clone(),
            chains,
            ct_helpers: t
                .helpers
                .iter()
                .map(|h| ir::CtHelper {
                    name: h.name.clone(),
                    helper_type: h.helper_type.clone(),
                    protocol: h.protocol,
                    l3proto: h.l3proto,
                })
                .collect(),
            flowtables: t
                .flowtables
                .iter()
                .map(|f| ir::Flowtable {
                    name: f.name.clone(),
                    priority: f.priority,
                    devices: f.devices.clone(),
                    counter: f.counter,
                })
                .collect(),
        });
    }
    ir::Ruleset { tables }
}

#[derive(Clone)]
enum LoweredSet {
    Single(Arc<IntervalSet>),
    Concat(Arc<Vec<Vec<Interval>>>),
    Vmap(Arc<Vec<(Vec<Interval>, Verdict)>>),
}

struct Lower<'a> {
    /// The table's index in the ruleset.
    table: usize,
    family: ir::Family,
    chains: &'a HashMap<&'a str, usize>,
    sets: &'a HashMap<&'a str, &'a MSet>,
}

/// The IR field a selector reads.
fn field(s: Sel) -> Field {
    match s {
        Sel::IpSaddr => Field::Ip4Saddr,
        Sel::IpDaddr => Field::Ip4Daddr,
        Sel::IpProtocol | Sel::Ip6Nexthdr | Sel::MetaL4proto => Field::L4proto,
        Sel::IpTtl => Field::Ip4Ttl,
        Sel::IpLength => Field::Ip4Length,
        Sel::Ip6Saddr => Field::Ip6Saddr,
        Sel::Ip6Daddr => Field::Ip6Daddr,
        Sel::Ip6Hoplimit => Field::Ip6Hoplimit,
        Sel::TcpSport | Sel::UdpSport | Sel::ThSport => Field::Sport,
        Sel::TcpDport | Sel::UdpDport | Sel::ThDport => Field::Dport,
        Sel::TcpFlags => Field::TcpFlags,
        Sel::IcmpType => Field::IcmpType,
        Sel::IcmpCode => Field::IcmpCode,
        Sel::Icmp6Type => Field::Icmp6Type,
        Sel::Icmp6Code => Field::Icmp6Code,
        Sel::MetaNfproto => Field::Nfproto,
        Sel::MetaIifname | Sel::MetaIif => Field::Iifname,
        Sel::MetaOifname | Sel::MetaOif => Field::Oifname,
        Sel::MetaMark => Field::Mark,
        Sel::CtState => Field::CtState,
        Sel::CtStatus => Field::CtStatus,
        Sel::CtMark => Field::CtMark,
        Sel::CtDirection => Field::CtDirection,
        Sel::CtHelper => Field::CtHelper,
    }
}

fn point(field: Field, v: u128) -> Match {
    Match::Set {
        field,
        negate: false,
        set: Arc::new(IntervalSet::point(v)),
    }
}

/// The implicit matches nft adds before a selector (its payload dependencies).
fn dependencies(family: ir::Family, s: Sel) -> Vec<Match> {
    let mut out = Vec::new();
    let inet = family == ir::Family::Inet;
    match s {
        Sel::IpSaddr | Sel::IpDaddr | Sel::IpProtocol | Sel::IpTtl | Sel::IpLength if inet => {
            out.push(point(Field::Nfproto, NFPROTO_IPV4))
        }
        Sel::Ip6Saddr | Sel::Ip6Daddr | Sel::Ip6Nexthdr | Sel::Ip6Hoplimit if inet => {
            out.push(point(Field::Nfproto, NFPROTO_IPV6))
        }
        _ => {}
    }
    match s {
        Sel::TcpSport | Sel::TcpDport | Sel::TcpFlags => out.push(point(Field::L4proto, 6)),
        Sel::UdpSport | Sel::UdpDport => out.push(point(Field::L4proto, 17)),
        Sel::IcmpType | Sel::IcmpCode => out.push(point(Field::L4proto, 1)),
        Sel::Icmp6Type | Sel::Icmp6Code => out.push(point(Field::L4proto, 58)),
        _ => {}
    }
    out
}

impl Lower<'_> {
    fn rule(&self, r: &MRule, id: ir::RuleId, cache: &mut HashMap<String, LoweredSet>) -> ir::Rule {
        let mut matches: Vec<Match> = Vec::new();
        let mut stmts: Vec<Stmt> = Vec::new();
        let push = |matches: &mut Vec<Match>, m: Match| {
            if !matches.contains(&m) {
                matches.push(m);
            }
        };
        for it in &r.items {
            match it {
                MItem::Match(m) => {
                    for s in &m.sels {
                        for d in dependencies(self.family, *s) {
                            push(&mut matches, d);
                        }
                    }
                    match self.relation(m, cache) {
                        Lowered::Match(x) => push(&mut matches, x),
                        Lowered::Stmt(s) => stmts.push(s),
                    }
                }
                MItem::Stmt(s) => {
                    match s {
                        // nft makes `reject with tcp reset` depend on the packet being TCP...
                        MStmt::Reject(ir::Reject::TcpReset) => {
                            push(&mut matches, point(Field::L4proto, 6))
                        }
                        // ...and, in inet tables, an ICMP or ICMPv6 reject on the family.
                        MStmt::Reject(ir::Reject::Icmp(_)) if self.family == ir::Family::Inet => {
                            push(&mut matches, point(Field::Nfproto, NFPROTO_IPV4))
                        }
                        MStmt::Reject(ir::Reject::Icmp6(_)) if self.family == ir::Family::Inet => {
                            push(&mut matches, point(Field::Nfproto, NFPROTO_IPV6))
                        }
                        // `snat ip to` in an inet table leaves IPv6 packets alone (and the
                        // rule's evaluation goes on, `nft_nat_inet_eval`); a NAT map lookup
                        // that misses ends the rule. Both are matches of the rule.
                        MStmt::Nat(n) => {
                            match n.family {
                                Some(ir::Family::Ip) if self.family == ir::Family::Inet => {
                                    push(&mut matches, point(Field::Nfproto, NFPROTO_IPV4))
                                }
                                Some(ir::Family::Ip6) if self.family == ir::Family::Inet => {
                                    push(&mut matches, point(Field::Nfproto, NFPROTO_IPV6))
                                }
                                _ => {}
                            }
                            if let Some(m) = &n.map {
                                for s in &m.sels {
                                    for d in dependencies(self.family, *s) {
                                        push(&mut matches, d);
                                    }
                                }
                                let keys = MMatch {
                                    sels: m.sels.clone(),
                                    mask: None,
                                    op: None,
                                    rhs: MRhs::Set(
                                        m.elems
                                            .iter()
                                            .map(|e| MElem {
                                                key: e.key.clone(),
                                                data: None,
                                            })
                                            .collect(),
                                    ),
                                };
                                if let Lowered::Match(x) = self.relation(&keys, cache) {
                                    push(&mut matches, x);
                                }
                            }
                        }
                        _ => {}
                    }
                    stmts.push(self.stmt(s));
                }
            }
        }
        ir::Rule {
            id,
            loc: r.loc.clone(),
            text: rule_str(r),
            matches,
            stmts,
        }
    }

    fn relation(&self, m: &MMatch, cache: &mut HashMap<String, LoweredSet>) -> Lowered {
        let types: Vec<DType> = m.sels.iter().map(|s| sel_type(*s)).collect();
        let fields: Vec<Field> = m.sels.iter().map(|s| field(*s)).collect();
        let (ty, f) = (types[0], fields[0]);
        let negate = m.op == Some(RelOp::Ne);
        if let Some(mask) = m.mask {
            let value = match &m.rhs {
                MRhs::Value(a) => a.bounds(ty).0,
                _ => 0,
            };
            return Lowered::Match(Match::Masked {
                field: f,
                negate,
                mask,
                value,
            });
        }
        let single = |set: IntervalSet| {
            Lowered::Match(Match::Set {
                field: f,
                negate,
                set: Arc::new(set),
            })
        };
        match &m.rhs {
            MRhs::Value(a) => {
                let (lo, hi) = a.bounds(ty);
                let max = ty.max();
                let iv = match m.op {
                    Some(RelOp::Lt) if lo == 0 => None,
                    Some(RelOp::Lt) => Some(Interval::new(0, lo - 1)),
                    Some(RelOp::Gt) if lo == max => None,
                    Some(RelOp::Gt) => Some(Interval::new(lo + 1, max)),
                    Some(RelOp::Le) => Some(Interval::new(0, lo)),
                    Some(RelOp::Ge) => Some(Interval::new(lo, max)),
                    _ => Some(Interval::new(lo, hi)),
                };
                let set = IntervalSet::from_intervals(iv.into_iter().collect());
                Lowered::Match(Match::Set {
                    field: f,
                    negate: negate
                        && !matches!(m.op, Some(RelOp::Lt | RelOp::Gt | RelOp::Le | RelOp::Ge)),
                    set: Arc::new(set),
                })
            }
            MRhs::Flags(bits) => {
                let mask = bits.iter().fold(0, |a, b| a | b);
                match m.op {
                    // `ct state established,related`: some of these bits are set.
                    None => Lowered::Match(Match::Masked {
                        field: f,
                        negate: true,
                        mask,
                        value: 0,
                    }),
                    // `ct state != established`: nft compares the whole value.
                    _ => single(IntervalSet::point(mask)),
                }
            }
            MRhs::Set(elems) | MRhs::Vmap(elems) => {
                set_match(f, fields, negate, self.lower_elems(&types, elems))
            }
            MRhs::SetRef(name) | MRhs::VmapRef(name) => {
                let ls = cache
                    .entry(name.clone())
                    .or_insert_with(|| {
                        let set = self.sets[name.as_str()];
                        self.lower_elems(&set.key, &set.elems)
                    })
                    .clone();
                set_match(f, fields, negate, ls)
            }
        }
    }

    fn lower_elems(&self, types: &[DType], elems: &[MElem]) -> LoweredSet {
        if elems
            .iter()
            .any(|e| matches!(e.data, Some(MData::Verdict(_))))
        {
            let entries = elems
                .iter()
                .filter_map(|e| match &e.data {
                    Some(MData::Verdict(v)) => Some((
                        e.key
                            .iter()
                            .zip(types)
                            .map(|(a, t)| {
                                let (lo, hi) = a.bounds(*t);
                                Interval::new(lo, hi)
                            })
                            .collect(),
                        self.verdict(v),
                    )),
                    _ => None,
                })
                .collect::<Vec<(Vec<Interval>, Verdict)>>();
            let mut entries = entries;
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            return LoweredSet::Vmap(Arc::new(entries));
        }
        if types.len() == 1 {
            let ivs = elems
                .iter()
                .map(|e| {
                    let (lo, hi) = e.key[0].bounds(types[0]);
                    Interval::new(lo, hi)
                })
                .collect();
            return LoweredSet::Single(Arc::new(IntervalSet::from_intervals(ivs)));
        }
        // Sorted, so the IR does not depend on the order elements were written in.
        let mut rows: Vec<Vec<Interval>> = elems
            .iter()
            .map(|e| {
                e.key
                    .iter()
                    .zip(types)
                    .map(|(a, t)| {
                        let (lo, hi) = a.bounds(*t);
                        Interval::new(lo, hi)
                    })
                    .collect()
            })
            .collect();
        rows.sort();
        rows.dedup();
        LoweredSet::Concat(Arc::new(rows))
    }

    fn verdict(&self, v: &MVerdict) -> Verdict {
        match v {
            MVerdict::Accept => Verdict::Accept,
            MVerdict::Drop => Verdict::Drop,
            MVerdict::Continue => Verdict::Continue,
            MVerdict::Return => Verdict::Return,
            // The checker guarantees the chain exists.
            MVerdict::Jump(n) => Verdict::Jump(self.chains[n.as_str()]),
            MVerdict::Goto(n) => Verdict::Goto(self.chains[n.as_str()]),
        }
    }

    fn stmt(&self, s: &MStmt) -> Stmt {
        match s {
            MStmt::Verdict(v) => Stmt::Verdict(self.verdict(v)),
            MStmt::Reject(r) => Stmt::Reject(*r),
            MStmt::Counter(p, b) => Stmt::Counter {
                packets: *p,
                bytes: *b,
            },
            MStmt::Log { prefix, level, .. } => Stmt::Log {
                prefix: prefix.clone(),
                level: *level,
            },
            MStmt::Limit {
                over,
                rate,
                unit,
                burst,
            } => Stmt::Limit {
                rate: *rate,
                unit: *unit,
                burst: burst.unwrap_or(5),
                over: *over,
            },
            MStmt::Nat(n) => Stmt::Nat(ir::Nat {
                kind: n.kind,
                addr: n.addr.map(|(a, b)| (a, b.unwrap_or(a))),
                port: n.port.map(|(a, b)| (a, b.unwrap_or(a))),
                flags: n.flags,
                map: n.map.as_ref().map(|m| {
                    let types: Vec<DType> = m.sels.iter().map(|s| sel_type(*s)).collect();
                    Arc::new(ir::NatMap {
                        fields: m.sels.iter().map(|s| field(*s)).collect(),
                        entries: m
                            .elems
                            .iter()
                            .filter_map(|e| match e.data {
                                Some(MData::Nat(a, p)) => Some((
                                    e.key
                                        .iter()
                                        .zip(&types)
                                        .map(|(k, t)| {
                                            let (lo, hi) = k.bounds(*t);
                                            Interval::new(lo, hi)
                                        })
                                        .collect(),
                                    a,
                                    p,
                                )),
                                _ => None,
                            })
                            .collect(),
                    })
                }),
            }),
            MStmt::CtHelperSet(h) => Stmt::CtHelperSet(h.clone()),
            MStmt::CtMarkSet(m) => Stmt::CtMarkSet(*m),
            MStmt::MetaMarkSet(m) => Stmt::MetaMarkSet(*m),
            MStmt::Notrack => Stmt::Notrack,
            MStmt::FlowAdd(f) => Stmt::FlowAdd {
                table: self.table,
                flowtable: f.clone(),
            },
        }
    }
}

/// A set (or a verdict map) as the test or statement it is: `field ∈ set`, a concatenation's
/// lookup, or a vmap.
fn set_match(f: Field, fields: Vec<Field>, negate: bool, ls: LoweredSet) -> Lowered {
    match ls {
        LoweredSet::Single(set) => Lowered::Match(Match::Set {
            field: f,
            negate,
            set,
        }),
        LoweredSet::Concat(elems) => Lowered::Match(Match::Concat {
            fields,
            negate,
            elems,
        }),
        LoweredSet::Vmap(entries) => Lowered::Stmt(Stmt::Vmap { fields, entries }),
    }
}

enum Lowered {
    Match(Match),
    Stmt(Stmt),
}
