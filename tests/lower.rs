//! What each construct means once lowered: the IR a rule produces, evaluated against packets
//! through `Match::eval`, so the tests read as "this rule matches this packet".

use std::collections::HashMap;

use keepstate::rules::{
    self,
    ir::{self, ct_state, Field, Match, Stmt, Verdict},
};

/// A packet as a map of present fields.
#[derive(Clone, Default)]
struct Pkt(HashMap<Field, u128>);

impl Pkt {
    fn v4_tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Pkt {
        let mut p = Pkt::default();
        p.0.insert(Field::Nfproto, ir::NFPROTO_IPV4);
        p.0.insert(Field::L4proto, 6);
        p.0.insert(Field::Ip4Saddr, u32::from_be_bytes(src) as u128);
        p.0.insert(Field::Ip4Daddr, u32::from_be_bytes(dst) as u128);
        p.0.insert(Field::Sport, sport as u128);
        p.0.insert(Field::Dport, dport as u128);
        p.0.insert(Field::TcpFlags, 0x02);
        p.0.insert(Field::CtState, ct_state::NEW);
        p.0.insert(Field::Iifname, ir::pack_name("lan"));
        p
    }
    fn with(mut self, f: Field, v: u128) -> Pkt {
        self.0.insert(f, v);
        self
    }
    fn without(mut self, f: Field) -> Pkt {
        self.0.remove(&f);
        self
    }
}

/// The single rule of `table inet t { chain c { RULE } }`.
fn rule(text: &str) -> ir::Rule {
    let src =
        format!("table inet t {{\n\tchain c {{\n\t\t{text}\n\t}}\n\tchain web {{\n\t}}\n}}\n");
    let loaded = rules::load_str("t.nft", &src).unwrap_or_else(|d| panic!("{text}:\n{d}"));
    loaded.ruleset.tables[0].chains[0].rules[0].clone()
}

fn matches(r: &ir::Rule, p: &Pkt) -> bool {
    r.matches.iter().all(|m| m.eval(|f| p.0.get(&f).copied()))
}

#[test]
fn ports_and_dependencies() {
    let r = rule("tcp dport { 22, 80-90 } accept");
    let p = Pkt::v4_tcp([10, 0, 0, 1], [10, 0, 0, 2], 1000, 85);
    assert!(matches(&r, &p));
    assert!(!matches(&r, &p.clone().with(Field::Dport, 91)));
    // A UDP packet to port 22 is not `tcp dport 22`: the protocol dependency is explicit.
    assert!(!matches(
        &r,
        &p.clone().with(Field::L4proto, 17).with(Field::Dport, 22)
    ));
    // `th dport` has no protocol dependency.
    let th = rule("th dport 53 accept");
    assert!(matches(
        &th,
        &p.clone().with(Field::L4proto, 17).with(Field::Dport, 53)
    ));
    // A negated test of an absent field fails too (nft's dependency fails first).
    let ne = rule("tcp dport != 22 accept");
    assert!(!matches(
        &ne,
        &p.clone().without(Field::Dport).with(Field::L4proto, 1)
    ));
    assert!(matches(&ne, &p));
}

#[test]
fn relational_operators() {
    let p = Pkt::v4_tcp([10, 0, 0, 1], [10, 0, 0, 2], 1000, 1024);
    assert!(matches(&rule("tcp dport >= 1024 accept"), &p));
    assert!(!matches(&rule("tcp dport < 1024 accept"), &p));
    assert!(matches(&rule("tcp dport <= 1024 accept"), &p));
    assert!(!matches(&rule("tcp dport > 1024 accept"), &p));
    assert!(matches(&rule("tcp dport != 1-1023 accept"), &p));
}

#[test]
fn addresses_prefixes_ranges_and_family() {
    let p = Pkt::v4_tcp([192, 168, 1, 7], [10, 0, 0, 2], 1000, 22);
    assert!(matches(&rule("ip saddr 192.168.1.0/24 accept"), &p));
    assert!(matches(
        &rule("ip saddr 192.168.1.5-192.168.1.9 accept"),
        &p
    ));
    assert!(!matches(&rule("ip saddr != 192.168.0.0/16 accept"), &p));
    // In an inet table `ip saddr` also requires IPv4.
    let r = rule("ip saddr 0.0.0.0/0 accept");
    assert!(r.matches.iter().any(|m| m.fields() == vec![Field::Nfproto]));
    let v6 = Pkt::default()
        .with(Field::Nfproto, ir::NFPROTO_IPV6)
        .with(Field::Ip6Saddr, 1);
    assert!(!matches(&r, &v6));
    assert!(matches(&rule("ip6 saddr ::1 accept"), &v6));
}

#[test]
fn ct_state_is_a_bit_test() {
    let r = rule("ct state established,related accept");
    let p = Pkt::v4_tcp([1, 1, 1, 1], [2, 2, 2, 2], 1, 2);
    assert!(!matches(&r, &p));
    assert!(matches(
        &r,
        &p.clone().with(Field::CtState, ct_state::ESTABLISHED)
    ));
    assert!(matches(
        &r,
        &p.clone().with(Field::CtState, ct_state::RELATED)
    ));
    assert!(matches(&rule("ct state != invalid accept"), &p));
    let st = rule("ct status dnat accept");
    assert!(matches(
        &st,
        &p.clone().with(
            Field::CtStatus,
            ir::ct_status::DNAT | ir::ct_status::ASSURED
        )
    ));
    assert!(!matches(
        &st,
        &p.clone().with(Field::CtStatus, ir::ct_status::SNAT)
    ));
}

#[test]
fn tcp_flags_forms() {
    let syn = Pkt::v4_tcp([1, 1, 1, 1], [2, 2, 2, 2], 1, 2).with(Field::TcpFlags, 0x02);
    let synack = syn.clone().with(Field::TcpFlags, 0x12);
    let a = rule("tcp flags & (syn|ack) == syn accept");
    assert!(matches(&a, &syn) && !matches(&a, &synack));
    let b = rule("tcp flags syn / fin,syn,rst,ack accept");
    assert!(matches(&b, &syn) && !matches(&b, &synack));
    // A bare flag: the bit is set.
    let c = rule("tcp flags syn accept");
    assert!(matches(&c, &syn) && matches(&c, &synack));
    // `==`: exactly.
    let d = rule("tcp flags == syn accept");
    assert!(matches(&d, &syn) && !matches(&d, &synack));
}

#[test]
fn interfaces_and_wildcards() {
    let p =
        Pkt::v4_tcp([1, 1, 1, 1], [2, 2, 2, 2], 1, 2).with(Field::Iifname, ir::pack_name("eth3"));
    assert!(matches(&rule("iifname \"eth*\" accept"), &p));
    assert!(!matches(&rule("iifname \"eth\" accept"), &p));
    assert!(matches(&rule("iifname { \"lan\", \"eth3\" } accept"), &p));
    assert!(matches(&rule("iif \"eth3\" accept"), &p));
    // oifname is absent before routing: the test fails.
    assert!(!matches(&rule("oifname != \"wan\" accept"), &p));
}

#[test]
fn concatenations() {
    let r = rule("ip saddr . tcp dport { 10.0.0.1 . 22, 10.0.0.2 . 443 } accept");
    let p = Pkt::v4_tcp([10, 0, 0, 1], [9, 9, 9, 9], 5000, 22);
    assert!(matches(&r, &p));
    assert!(!matches(&r, &p.clone().with(Field::Dport, 443)));
    assert!(matches(
        &r,
        &p.clone()
            .with(Field::Dport, 443)
            .with(Field::Ip4Saddr, 0x0a000002)
    ));
}

#[test]
fn statements_and_verdicts() {
    let r = rule(
        "tcp dport 22 counter log prefix \"ssh \" limit rate 5/minute meta mark set 0x10 accept",
    );
    assert!(matches!(
        r.stmts[0],
        Stmt::Counter {
            packets: 0,
            bytes: 0
        }
    ));
    assert!(matches!(&r.stmts[1], Stmt::Log { prefix: Some(p), .. } if p == "ssh "));
    assert!(matches!(
        r.stmts[2],
        Stmt::Limit {
            rate: 5,
            burst: 5,
            over: false,
            ..
        }
    ));
    assert!(matches!(
        r.stmts[3],
        Stmt::MetaMarkSet(ir::MarkValue::Const(0x10))
    ));
    assert_eq!(r.stmts[4], Stmt::Verdict(Verdict::Accept));
    let j = rule("tcp dport 80 jump web");
    assert_eq!(j.stmts, vec![Stmt::Verdict(Verdict::Jump(1))]);
    let v = rule("tcp dport vmap { 22 : accept, 80 : jump web }");
    match &v.stmts[0] {
        Stmt::Vmap { fields, entries } => {
            assert_eq!(fields, &vec![Field::Dport]);
            assert_eq!(entries.len(), 2);
            assert_eq!(entries[1].1, Verdict::Jump(1));
        }
        other => panic!("{other:?}"),
    }
    // `reject with tcp reset` applies to TCP only.
    let rst = rule("reject with tcp reset");
    assert!(rst.matches.iter().any(|m| matches!(
        m,
        Match::Set {
            field: Field::L4proto,
            ..
        }
    )));
}

#[test]
fn named_sets_are_inlined_and_shared() {
    let src = "table inet t {\n\tset ok { type inet_service; elements = { 22, 443 } }\n\tchain c {\n\t\ttcp dport @ok accept\n\t\tudp dport @ok accept\n\t}\n}\n";
    let l = rules::load_str("t.nft", src).unwrap();
    let rs = &l.ruleset.tables[0].chains[0].rules;
    let set = |r: &ir::Rule| match r.matches.last() {
        Some(Match::Set { set, .. }) => set.clone(),
        other => panic!("{other:?}"),
    };
    assert!(std::sync::Arc::ptr_eq(&set(&rs[0]), &set(&rs[1])));
    assert!(set(&rs[0]).contains(443) && !set(&rs[0]).contains(80));
}

#[test]
fn rule_ids_and_locations() {
    let l = rules::load_file(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/home-router.nft"),
    )
    .unwrap();
    let ids: Vec<u32> = l.ruleset.rules().map(|r| r.id).collect();
    assert_eq!(ids, (0..ids.len() as u32).collect::<Vec<_>>());
    for r in l.ruleset.rules() {
        assert!(r.loc.file.ends_with("home-router.nft"));
        assert!(r.loc.line > 0);
        assert!(!r.text.is_empty());
    }
    // Base chains of a hook in priority order.
    let pre = l.ruleset.base_chains(ir::Hook::Prerouting);
    let prios: Vec<i32> = pre
        .iter()
        .map(|&(t, c)| l.ruleset.tables[t].chains[c].base.unwrap().priority)
        .collect();
    assert!(prios.windows(2).all(|w| w[0] <= w[1]));
}
