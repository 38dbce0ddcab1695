//! The tree against the reference on random rulesets and packets, plus a few hand-checked
//! semantics of the reference itself (what "right" means for jump, goto, vmap, marks, NAT).
//!
//! Rulesets are generated from a small structured spec (vectors of small numbers) so proptest
//! shrinks a failure to a short ruleset; every field value comes from a small per-field pool so
//! that packets, drawn from the same pools, actually match.

use std::sync::Arc;

use keepstate::classify::{
    Action, Classifier, Decision, Evaluation, LimitSpec, Limiter, Linear, PacketKey, Tree,
    TreeOptions, FIELDS, HOOKS,
};
use keepstate::rules::ir::*;
use proptest::prelude::*;

fn pool(f: Field) -> &'static [u128] {
    const NAMES: [u128; 4] = [
        0x6574_6830_0000_0000_0000_0000_0000_0000, // "eth0"
        0x6574_6831_0000_0000_0000_0000_0000_0000, // "eth1"
        0x6c6f_0000_0000_0000_0000_0000_0000_0000, // "lo"
        0x776c_616e_3000_0000_0000_0000_0000_0000, // "wlan0"
    ];
    match f {
        Field::Nfproto => &[2, 10],
        Field::L4proto => &[6, 17, 1, 58],
        Field::Iifname | Field::Oifname | Field::CtHelper => &NAMES,
        Field::Mark | Field::CtMark => &[0, 1, 2, 0xff00],
        Field::Ip4Saddr | Field::Ip4Daddr => &[0x0a00_0001, 0x0a00_0002, 0x0a00_00ff, 0xc0a8_0001],
        Field::Ip4Ttl | Field::Ip6Hoplimit => &[1, 64, 255],
        Field::Ip4Length => &[40, 60, 1500],
        Field::Ip6Saddr | Field::Ip6Daddr => &[1, 2, 0x2001_0db8 << 96, u128::MAX],
        Field::Sport | Field::Dport => &[22, 80, 443, 1024],
        Field::TcpFlags => &[0x02, 0x12, 0x10, 0x11, 0x04],
        Field::IcmpType | Field::Icmp6Type => &[0, 3, 8, 128],
        Field::IcmpCode | Field::Icmp6Code => &[0, 1, 3],
        Field::CtState => &[1, 2, 4, 8, 64],
        Field::CtStatus => &[0, 0x8, 0xa, 0x2e, 0x20],
        Field::CtDirection => &[0, 1],
    }
}

fn val(f: Field, i: u8) -> u128 {
    let p = pool(f);
    let v = p[i as usize % p.len()];
    // Indices past the pool land next to a pool value, to hit interval edges.
    if (i as usize) >= p.len() {
        v.saturating_add(1) & f.max()
    } else {
        v
    }
}

/// Indices past the field list favour the fields whose handling is subtle (marks that rules
/// change, masks, absent-by-default connection fields).
fn field(i: u8) -> Field {
    const SUBTLE: [Field; 7] = [
        Field::Mark,
        Field::CtMark,
        Field::Dport,
        Field::L4proto,
        Field::TcpFlags,
        Field::CtState,
        Field::Mark,
    ];
    match FIELDS.get(i as usize) {
        Some(f) => *f,
        None => SUBTLE[(i as usize - FIELDS.len()) % SUBTLE.len()],
    }
}

fn interval(f: Field, a: u8, b: u8, shape: u8) -> Interval {
    let (x, y) = (val(f, a), val(f, b));
    let (lo, hi) = (x.min(y), x.max(y));
    match shape % 5 {
        0 => Interval::point(x),
        1 => Interval::new(lo, hi),
        2 => Interval::new(lo, f.max()),
        3 => Interval::new(0, hi),
        // An interface-name style prefix around the value.
        _ => Interval::new(x & !0xffff, x | 0xffff.min(f.max())),
    }
}

/// Three small numbers that pick pool values and an interval shape.
type Triple = (u8, u8, u8);

#[derive(Clone, Debug)]
struct MatchSpec {
    kind: u8,
    field: u8,
    negate: bool,
    parts: Vec<Triple>,
}

#[derive(Clone, Debug)]
struct StmtSpec {
    kind: u8,
    arg: u8,
    arg2: u8,
    vmap: Vec<(Vec<Triple>, u8)>,
}

#[derive(Clone, Debug)]
struct RuleSpec {
    matches: Vec<MatchSpec>,
    stmts: Vec<StmtSpec>,
}

#[derive(Clone, Debug)]
struct ChainSpec {
    hook: u8,
    prio: u8,
    policy_drop: bool,
    rules: Vec<RuleSpec>,
}

#[derive(Clone, Debug)]
struct TableSpec {
    nbase: u8,
    chains: Vec<ChainSpec>,
}

fn triple() -> impl Strategy<Value = Triple> {
    (0u8..6, 0u8..6, 0u8..5)
}

fn match_spec() -> impl Strategy<Value = MatchSpec> {
    (
        0u8..3,
        0u8..40,
        prop::bool::weighted(0.25),
        prop::collection::vec(triple(), 1..4),
    )
        .prop_map(|(kind, field, negate, parts)| MatchSpec {
            kind,
            field,
            negate,
            parts,
        })
}

fn stmt_spec() -> impl Strategy<Value = StmtSpec> {
    (
        0u8..15,
        0u8..8,
        0u8..8,
        prop::collection::vec((prop::collection::vec(triple(), 1..3), 0u8..8), 0..4),
    )
        .prop_map(|(kind, arg, arg2, vmap)| StmtSpec {
            kind,
            arg,
            arg2,
            vmap,
        })
}

fn rule_spec() -> impl Strategy<Value = RuleSpec> {
    (
        prop::collection::vec(match_spec(), 0..3),
        prop::collection::vec(stmt_spec(), 0..4),
    )
        .prop_map(|(matches, stmts)| RuleSpec { matches, stmts })
}

fn chain_spec() -> impl Strategy<Value = ChainSpec> {
    (
        0u8..3,
        0u8..4,
        any::<bool>(),
        prop::collection::vec(rule_spec(), 0..8),
    )
        .prop_map(|(hook, prio, policy_drop, rules)| ChainSpec {
            hook,
            prio,
            policy_drop,
            rules,
        })
}

fn table_spec() -> impl Strategy<Value = TableSpec> {
    (1u8..4, prop::collection::vec(chain_spec(), 1..6))
        .prop_map(|(nbase, chains)| TableSpec { nbase, chains })
}

fn lower_match(m: &MatchSpec) -> Match {
    let f = field(m.field);
    match m.kind {
        0 => Match::Set {
            field: f,
            negate: m.negate,
            set: Arc::new(IntervalSet::from_intervals(
                m.parts
                    .iter()
                    .map(|&(a, b, s)| interval(f, a, b, s))
                    .collect(),
            )),
        },
        1 => {
            let (a, b, c) = m.parts[0];
            let mask = (val(f, a) | val(f, b)) & f.max();
            // Now and then a value with bits outside the mask, which can never match.
            let value = if c == 4 { val(f, c) } else { val(f, c) & mask };
            Match::Masked {
                field: f,
                negate: m.negate,
                mask,
                value,
            }
        }
        _ => {
            let fields: Vec<Field> = (0..2 + (m.parts.len() % 2) as u8)
                .map(|k| field(m.field + 7 * k))
                .collect();
            let elems = m
                .parts
                .iter()
                .map(|&(a, b, s)| {
                    fields
                        .iter()
                        .enumerate()
                        .map(|(k, f)| interval(*f, a + k as u8, b, s + k as u8))
                        .collect()
                })
                .collect();
            Match::Concat {
                fields,
                negate: m.negate,
                elems: Arc::new(elems),
            }
        }
    }
}

/// A verdict from `arg`; jumps only go to regular chains after `chain`, so there is no loop.
fn verdict(arg: u8, arg2: u8, chain: usize, nbase: usize, nchains: usize) -> Verdict {
    let first = (chain + 1).max(nbase);
    let target = (first < nchains).then(|| first + arg2 as usize % (nchains - first));
    match (arg % 6, target) {
        (0, _) => Verdict::Accept,
        (1, _) => Verdict::Drop,
        (2, _) => Verdict::Continue,
        (3, _) => Verdict::Return,
        (4, Some(t)) => Verdict::Jump(t),
        (5, Some(t)) => Verdict::Goto(t),
        _ => Verdict::Continue,
    }
}

fn mark_value(arg: u8, arg2: u8) -> MarkValue {
    match arg % 3 {
        0 => MarkValue::Const(val(Field::Mark, arg2) as u32),
        1 => MarkValue::MetaMark,
        _ => MarkValue::CtMark,
    }
}

fn lower_stmt(s: &StmtSpec, chain: usize, nbase: usize, nchains: usize) -> Stmt {
    match s.kind {
        0 => Stmt::Counter {
            packets: 0,
            bytes: 0,
        },
        1 => Stmt::Log {
            prefix: None,
            level: None,
        },
        2 => Stmt::Limit {
            rate: 10,
            unit: RateUnit::Second,
            burst: 5,
            over: s.arg % 2 == 1,
        },
        3 => Stmt::MetaMarkSet(mark_value(s.arg, s.arg2)),
        4 => Stmt::CtMarkSet(mark_value(s.arg, s.arg2)),
        5 => Stmt::CtHelperSet("ftp".into()),
        6 => Stmt::Notrack,
        7 => Stmt::Nat(Nat {
            kind: NatKind::Masquerade,
            addr: None,
            port: None,
            flags: NatFlags::default(),
            map: None,
        }),
        8 => Stmt::Reject(if s.arg % 2 == 0 {
            Reject::Default
        } else {
            Reject::TcpReset
        }),
        9 | 11 | 12 => Stmt::Verdict(verdict(s.arg, s.arg2, chain, nbase, nchains)),
        13 => Stmt::MetaMarkSet(mark_value(s.arg, s.arg2)),
        _ => {
            let fields = vec![field(s.arg * 5), field(s.arg + 9)];
            let entries = s
                .vmap
                .iter()
                .map(|(parts, v)| {
                    let (a, b, sh) = parts[0];
                    let key = fields
                        .iter()
                        .enumerate()
                        .map(|(k, f)| interval(*f, a + k as u8, b, sh))
                        .collect();
                    (key, verdict(*v, s.arg2 + v, chain, nbase, nchains))
                })
                .collect();
            Stmt::Vmap {
                fields,
                entries: Arc::new(entries),
            }
        }
    }
}

fn lower(tables: &[TableSpec]) -> Ruleset {
    let mut id = 0;
    let mut out = Ruleset::default();
    for (ti, t) in tables.iter().enumerate() {
        let nchains = t.chains.len();
        let nbase = (t.nbase as usize).min(nchains);
        let mut chains = Vec::new();
        for (ci, c) in t.chains.iter().enumerate() {
            let base = (ci < nbase).then(|| BaseChain {
                kind: ChainType::Filter,
                hook: [Hook::Input, Hook::Forward, Hook::Forward][c.hook as usize % 3],
                priority: [-10, 0, 0, 10][c.prio as usize % 4],
                policy: if c.policy_drop {
                    Policy::Drop
                } else {
                    Policy::Accept
                },
            });
            let rules = c
                .rules
                .iter()
                .map(|r| {
                    let rule = Rule {
                        id,
                        loc: SourceLoc {
                            file: Arc::from("prop"),
                            line: id + 1,
                            col: 1,
                        },
                        text: format!("rule {id}"),
                        matches: r.matches.iter().map(lower_match).collect(),
                        stmts: r
                            .stmts
                            .iter()
                            .map(|s| lower_stmt(s, ci, nbase, nchains))
                            .collect(),
                    };
                    id += 1;
                    rule
                })
                .collect();
            chains.push(Chain {
                name: format!("c{ci}"),
                base,
                rules,
            });
        }
        out.tables.push(Table {
            family: Family::Inet,
            name: format!("t{ti}"),
            chains,
            ct_helpers: Vec::new(),
            flowtables: Vec::new(),
        });
    }
    out
}

fn packet() -> impl Strategy<Value = Vec<(bool, u8)>> {
    prop::collection::vec((prop::bool::weighted(0.85), 0u8..7), FIELDS.len())
}

fn key(p: &[(bool, u8)]) -> PacketKey {
    let mut k = PacketKey::new();
    for (f, &(present, i)) in FIELDS.iter().zip(p) {
        if present {
            k.set(*f, val(*f, i));
        }
    }
    k
}

/// Answers from a fixed script and records every call, so two classifiers can be held to the
/// same sequence of limiter calls.
struct ScriptedLimiter<'a> {
    script: &'a [bool],
    calls: Vec<(RuleId, usize, LimitSpec)>,
}

impl Limiter for ScriptedLimiter<'_> {
    fn pass(&mut self, rule: RuleId, stmt: usize, limit: &LimitSpec) -> bool {
        let answer = self.script[self.calls.len() % self.script.len()];
        self.calls.push((rule, stmt, *limit));
        answer
    }
}

proptest! {
    // 1000 cases by default (a few seconds in debug); PROPTEST_CASES=100000 for a long hunt.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000),
        ..ProptestConfig::default()
    })]

    #[test]
    fn tree_agrees_with_reference(
        tables in prop::collection::vec(table_spec(), 1..3),
        packets in prop::collection::vec(packet(), 1..12),
        script in prop::collection::vec(any::<bool>(), 1..6),
    ) {
        let rs = Arc::new(lower(&tables));
        let linear = Linear::new(rs.clone()).expect("generated rulesets are valid");
        // The default tree, and one forced to cut down to single entries and to split into
        // several trees, so that small rulesets exercise cuts and forests too.
        let forced = TreeOptions { binth: 1, spfac: 4, max_kids: 4, max_trees: 4, partition_above: 0 };
        let trees = [
            Tree::new(rs.clone()).expect("generated rulesets compile"),
            Tree::with_options(rs.clone(), &forced).expect("generated rulesets compile"),
        ];
        let (mut a, mut b) = (Evaluation::new(), Evaluation::new());
        for p in &packets {
            let k = key(p);
            for hook in HOOKS {
                let mut lb = ScriptedLimiter { script: &script, calls: Vec::new() };
                linear.eval(hook, &k, &mut lb, &mut b);
                for tree in &trees {
                    let mut la = ScriptedLimiter { script: &script, calls: Vec::new() };
                    tree.eval(hook, &k, &mut la, &mut a);
                    prop_assert_eq!(&a, &b, "hook {:?}, key {:?}, {:?}", hook, k, tree.stats());
                    prop_assert_eq!(&la.calls, &lb.calls);
                }
            }
        }
    }
}

// ----- Hand-checked semantics of the reference -----------------------------------------------

fn set(f: Field, v: u128) -> Match {
    Match::Set {
        field: f,
        negate: false,
        set: Arc::new(IntervalSet::point(v)),
    }
}

fn rule(matches: Vec<Match>, stmts: Vec<Stmt>) -> Rule {
    Rule {
        id: 0,
        loc: SourceLoc {
            file: Arc::from("t"),
            line: 1,
            col: 1,
        },
        text: String::new(),
        matches,
        stmts,
    }
}

fn base(hook: Hook, priority: i32, policy: Policy) -> Option<BaseChain> {
    Some(BaseChain {
        kind: ChainType::Filter,
        hook,
        priority,
        policy,
    })
}

fn ruleset(chains: Vec<Chain>) -> Arc<Ruleset> {
    let mut rs = Ruleset {
        tables: vec![Table {
            family: Family::Inet,
            name: "t".into(),
            chains,
            ct_helpers: Vec::new(),
            flowtables: Vec::new(),
        }],
    };
    let mut id = 0;
    for c in &mut rs.tables[0].chains {
        for r in &mut c.rules {
            r.id = id;
            id += 1;
        }
    }
    Arc::new(rs)
}

/// Runs both classifiers, checks they agree, returns the evaluation.
fn both(rs: &Arc<Ruleset>, hook: Hook, key: &PacketKey) -> Evaluation {
    let (mut a, mut b) = (Evaluation::new(), Evaluation::new());
    let mut none = keepstate::classify::NoLimits;
    Linear::new(rs.clone())
        .unwrap()
        .eval(hook, key, &mut none, &mut a);
    Tree::new(rs.clone())
        .unwrap()
        .eval(hook, key, &mut none, &mut b);
    assert_eq!(a, b);
    a
}

const COUNTER: Stmt = Stmt::Counter {
    packets: 0,
    bytes: 0,
};

#[test]
fn later_rules_see_the_new_meta_mark() {
    let rs = ruleset(vec![Chain {
        name: "in".into(),
        base: base(Hook::Input, 0, Policy::Accept),
        rules: vec![
            rule(vec![], vec![Stmt::MetaMarkSet(MarkValue::Const(7))]),
            rule(
                vec![set(Field::Mark, 7)],
                vec![Stmt::Verdict(Verdict::Drop)],
            ),
        ],
    }]);
    let e = both(&rs, Hook::Input, &PacketKey::new().with(Field::Mark, 0));
    assert_eq!(e.verdict, Decision::Drop);
    assert_eq!(e.rules, vec![0, 1]);
    assert_eq!(e.meta_mark, Some(7));
}

#[test]
fn jump_returns_goto_does_not() {
    // in: jump a; counter.  a: goto b.  b: (empty).  A goto's chain running off its end
    // returns from `a`, so the counter after the jump still runs.
    let rs = ruleset(vec![
        Chain {
            name: "in".into(),
            base: base(Hook::Input, 0, Policy::Drop),
            rules: vec![
                rule(vec![], vec![Stmt::Verdict(Verdict::Jump(1))]),
                rule(vec![], vec![COUNTER]),
            ],
        },
        Chain {
            name: "a".into(),
            base: None,
            rules: vec![
                rule(vec![], vec![Stmt::Verdict(Verdict::Goto(2))]),
                rule(vec![], vec![Stmt::Verdict(Verdict::Accept)]),
            ],
        },
        Chain {
            name: "b".into(),
            base: None,
            rules: vec![],
        },
    ]);
    let e = both(&rs, Hook::Input, &PacketKey::new());
    assert_eq!(e.rules, vec![0, 2, 1]);
    assert_eq!(e.actions, vec![Action { rule: 1, stmt: 0 }]);
    assert_eq!(e.verdict, Decision::Drop);
    assert!(e.chains[0].by_policy);
}

#[test]
fn accept_goes_on_to_the_next_base_chain_and_drop_ends_the_hook() {
    let rs = ruleset(vec![
        Chain {
            name: "late".into(),
            base: base(Hook::Forward, 10, Policy::Accept),
            rules: vec![rule(vec![], vec![Stmt::Verdict(Verdict::Drop)])],
        },
        Chain {
            name: "early".into(),
            base: base(Hook::Forward, -10, Policy::Drop),
            rules: vec![rule(vec![], vec![COUNTER, Stmt::Verdict(Verdict::Accept)])],
        },
    ]);
    let e = both(&rs, Hook::Forward, &PacketKey::new());
    assert_eq!(e.chains.len(), 2);
    assert_eq!(
        (e.chains[0].chain, e.chains[0].decision),
        (1, Decision::Accept)
    );
    assert_eq!(e.verdict, Decision::Drop);
    assert_eq!(e.rules, vec![1, 0]);
}

#[test]
fn vmap_miss_skips_the_rest_of_the_rule_and_continue_runs_it() {
    let vmap = Stmt::Vmap {
        fields: vec![Field::Dport],
        entries: Arc::new(vec![
            (vec![Interval::point(22)], Verdict::Continue),
            (vec![Interval::point(80)], Verdict::Drop),
        ]),
    };
    let rs = ruleset(vec![Chain {
        name: "in".into(),
        base: base(Hook::Input, 0, Policy::Accept),
        rules: vec![rule(vec![], vec![vmap, COUNTER])],
    }]);
    let k = |p| PacketKey::new().with(Field::Dport, p);
    assert_eq!(both(&rs, Hook::Input, &k(22)).actions.len(), 1);
    assert_eq!(both(&rs, Hook::Input, &k(80)).verdict, Decision::Drop);
    let miss = both(&rs, Hook::Input, &k(443));
    assert!(miss.actions.is_empty() && miss.verdict == Decision::Accept);
    assert!(both(&rs, Hook::Input, &PacketKey::new()).actions.is_empty());
}

#[test]
fn nat_ends_the_base_chain_with_accept() {
    let rs = ruleset(vec![Chain {
        name: "pre".into(),
        base: base(Hook::Prerouting, -100, Policy::Drop),
        rules: vec![
            rule(
                vec![],
                vec![
                    Stmt::Nat(Nat {
                        kind: NatKind::Redirect,
                        addr: None,
                        port: Some((8080, 8080)),
                        flags: NatFlags::default(),
                        map: None,
                    }),
                    COUNTER,
                ],
            ),
            rule(vec![], vec![Stmt::Verdict(Verdict::Drop)]),
        ],
    }]);
    let e = both(&rs, Hook::Prerouting, &PacketKey::new());
    assert_eq!(e.verdict, Decision::Accept);
    assert_eq!(e.actions, vec![Action { rule: 0, stmt: 0 }]);
}

#[test]
fn a_failed_limit_skips_the_rest_of_its_rule_only() {
    struct Never;
    impl Limiter for Never {
        fn pass(&mut self, _: RuleId, _: usize, _: &LimitSpec) -> bool {
            false
        }
    }
    let limit = Stmt::Limit {
        rate: 1,
        unit: RateUnit::Second,
        burst: 1,
        over: false,
    };
    let rs = ruleset(vec![Chain {
        name: "in".into(),
        base: base(Hook::Input, 0, Policy::Accept),
        rules: vec![
            rule(vec![], vec![COUNTER, limit, Stmt::Verdict(Verdict::Drop)]),
            rule(vec![], vec![COUNTER]),
        ],
    }]);
    for c in [
        &Linear::new(rs.clone()).unwrap() as &dyn Classifier,
        &Tree::new(rs.clone()).unwrap(),
    ] {
        let mut e = Evaluation::new();
        c.eval(Hook::Input, &PacketKey::new(), &mut Never, &mut e);
        assert_eq!(e.verdict, Decision::Accept);
        assert_eq!(e.rules, vec![0, 1]);
        assert_eq!(e.actions.len(), 2);
    }
}

#[test]
fn jump_loops_are_errors() {
    let rs = ruleset(vec![
        Chain {
            name: "in".into(),
            base: base(Hook::Input, 0, Policy::Accept),
            rules: vec![rule(vec![], vec![Stmt::Verdict(Verdict::Jump(1))])],
        },
        Chain {
            name: "a".into(),
            base: None,
            rules: vec![rule(vec![], vec![Stmt::Verdict(Verdict::Goto(1))])],
        },
    ]);
    assert!(Linear::new(rs.clone()).is_err());
    assert!(Tree::new(rs).is_err());
}

#[test]
fn a_return_skips_over_an_accept_in_the_called_chain() {
    // in: jump a; drop.  a: return; accept.  The accept never runs, so the drop does: a
    // tree that let the accept shadow the drop would answer accept.
    let rs = ruleset(vec![
        Chain {
            name: "in".into(),
            base: base(Hook::Input, 0, Policy::Accept),
            rules: vec![
                rule(vec![], vec![Stmt::Verdict(Verdict::Jump(1))]),
                rule(vec![], vec![Stmt::Verdict(Verdict::Drop)]),
            ],
        },
        Chain {
            name: "a".into(),
            base: None,
            rules: vec![
                rule(vec![], vec![Stmt::Verdict(Verdict::Return)]),
                rule(vec![], vec![Stmt::Verdict(Verdict::Accept)]),
            ],
        },
    ]);
    assert_eq!(
        both(&rs, Hook::Input, &PacketKey::new()).verdict,
        Decision::Drop
    );
}
