//! Round trip: for random accepted rulesets, the printed form loads back to the same ruleset
//! (the same lowered IR, locations aside) and prints the same text again.

use proptest::prelude::*;

use keepstate::rules::{self, ir};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fam {
    Ip,
    Ip6,
    Inet,
}

fn ipv4() -> impl Strategy<Value = String> {
    (any::<u8>(), 0u8..4, any::<u8>()).prop_map(|(a, b, c)| format!("10.{a}.{b}.{c}"))
}

fn ipv6() -> impl Strategy<Value = String> {
    (1u16..0xffff, any::<u16>()).prop_map(|(a, b)| format!("2001:db8:{a:x}::{b:x}"))
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![Just(22u16), Just(80), Just(443), 1u16..65535]
}

fn addr4_value() -> impl Strategy<Value = String> {
    prop_oneof![
        ipv4(),
        (ipv4(), 8u8..32).prop_map(|(a, l)| format!("{a}/{l}")),
        (any::<u8>(), 1u8..100, 100u8..200)
            .prop_map(|(a, l, h)| format!("10.{a}.0.{l}-10.{a}.0.{h}")),
    ]
}

fn port_value() -> impl Strategy<Value = String> {
    prop_oneof![
        port().prop_map(|p| p.to_string()),
        (1u16..1000, 1000u16..60000).prop_map(|(a, b)| format!("{a}-{b}")),
        Just("ssh".to_string()),
        Just("https".to_string()),
    ]
}

/// A set literal of distinct elements.
fn set_of(elem: impl Strategy<Value = String>, max: usize) -> impl Strategy<Value = String> {
    prop::collection::btree_set(elem, 2..max)
        .prop_map(|s| format!("{{ {} }}", s.into_iter().collect::<Vec<_>>().join(", ")))
}

fn op() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just(""), Just("!= "), Just("== ")]
}

/// One match, valid in a table of the family.
fn relation(fam: Fam) -> BoxedStrategy<String> {
    let mut v: Vec<BoxedStrategy<String>> = vec![
        (op(), port_value())
            .prop_map(|(o, p)| format!("tcp dport {o}{p}"))
            .boxed(),
        (op(), port_value())
            .prop_map(|(o, p)| format!("udp sport {o}{p}"))
            .boxed(),
        set_of(port().prop_map(|p| p.to_string()), 6)
            .prop_map(|s| format!("tcp dport {s}"))
            .boxed(),
        (
            prop_oneof![Just("<"), Just(">"), Just("<="), Just(">=")],
            1u16..65000,
        )
            .prop_map(|(o, p)| format!("th dport {o} {p}"))
            .boxed(),
        prop_oneof![Just("tcp"), Just("udp"), Just("{ tcp, udp }"), Just("47")]
            .prop_map(|p| format!("meta l4proto {p}"))
            .boxed(),
        prop_oneof![
            Just("\"lan\""),
            Just("\"eth*\""),
            Just("{ \"lan\", \"wan\" }")
        ]
        .prop_map(|n| format!("iifname {n}"))
        .boxed(),
        (op(), Just("\"wan\""))
            .prop_map(|(o, n)| format!("oifname {o}{n}"))
            .boxed(),
        prop_oneof![
            Just("ct state established,related"),
            Just("ct state new"),
            Just("ct state != invalid"),
            Just("ct state { new, established }"),
            Just("ct status dnat"),
            Just("ct direction reply"),
            Just("ct helper \"ftp\""),
            Just("tcp flags syn / fin,syn,rst,ack"),
            Just("tcp flags & (syn|ack) == syn"),
            Just("tcp flags syn"),
        ]
        .prop_map(str::to_string)
        .boxed(),
        (op(), any::<u32>())
            .prop_map(|(o, m)| format!("meta mark {o}{m:#x}"))
            .boxed(),
        (op(), 0u32..100)
            .prop_map(|(o, m)| format!("ct mark {o}{m}"))
            .boxed(),
    ];
    if fam != Fam::Ip6 {
        v.push(
            (op(), addr4_value())
                .prop_map(|(o, a)| format!("ip saddr {o}{a}"))
                .boxed(),
        );
        v.push(
            set_of(addr4_value(), 5)
                .prop_map(|s| format!("ip daddr {s}"))
                .boxed(),
        );
        v.push(
            prop_oneof![
                Just("echo-request"),
                Just("{ echo-reply, destination-unreachable }")
            ]
            .prop_map(|t| format!("icmp type {t}"))
            .boxed(),
        );
        v.push((1u8..255).prop_map(|t| format!("ip ttl < {t}")).boxed());
        v.push(
            prop::collection::btree_set((ipv4(), port()), 2..4)
                .prop_map(|s| {
                    let e: Vec<String> = s.into_iter().map(|(a, p)| format!("{a} . {p}")).collect();
                    format!("ip saddr . tcp dport {{ {} }}", e.join(", "))
                })
                .boxed(),
        );
    }
    if fam != Fam::Ip {
        v.push(
            (op(), ipv6())
                .prop_map(|(o, a)| format!("ip6 daddr {o}{a}"))
                .boxed(),
        );
        v.push(
            prop_oneof![
                Just("echo-request"),
                Just("{ nd-neighbor-solicit, nd-router-advert }")
            ]
            .prop_map(|t| format!("icmpv6 type {t}"))
            .boxed(),
        );
    }
    if fam == Fam::Inet {
        v.push(
            prop_oneof![Just("ipv4"), Just("ipv6")]
                .prop_map(|f| format!("meta nfproto {f}"))
                .boxed(),
        );
    }
    prop::strategy::Union::new(v).boxed()
}

fn statement() -> BoxedStrategy<String> {
    let v: Vec<BoxedStrategy<String>> = vec![
        Just("counter".to_string()).boxed(),
        (0u64..1000, 0u64..100000)
            .prop_map(|(p, b)| format!("counter packets {p} bytes {b}"))
            .boxed(),
        "[a-z]{1,8}"
            .prop_map(|p| format!("log prefix \"{p}: \""))
            .boxed(),
        (
            1u32..100,
            prop_oneof![Just("second"), Just("minute")],
            1u32..20,
        )
            .prop_map(|(r, u, b)| format!("limit rate {r}/{u} burst {b} packets"))
            .boxed(),
        any::<u32>()
            .prop_map(|m| format!("meta mark set {m:#x}"))
            .boxed(),
        prop_oneof![Just("ct mark set meta mark"), Just("ct mark set 0x7")]
            .prop_map(str::to_string)
            .boxed(),
    ];
    prop::strategy::Union::new(v).boxed()
}

fn verdict(targets: Vec<String>) -> BoxedStrategy<String> {
    let plain = prop_oneof![
        Just("accept"),
        Just("drop"),
        Just("continue"),
        Just("return"),
        Just("")
    ]
    .prop_map(str::to_string);
    if targets.is_empty() {
        return plain.boxed();
    }
    prop_oneof![
        plain,
        (
            prop::sample::select(targets),
            prop_oneof![Just("jump"), Just("goto")]
        )
            .prop_map(|(t, k)| format!("{k} {t}")),
    ]
    .boxed()
}

fn rule(fam: Fam, targets: Vec<String>) -> impl Strategy<Value = String> {
    (
        prop::collection::vec(relation(fam), 0..3),
        prop::collection::vec(statement(), 0..2),
        verdict(targets),
        prop::option::of("[a-z ]{0,10}"),
    )
        .prop_map(|(m, s, v, c)| {
            let mut parts: Vec<String> = m;
            parts.extend(s);
            if !v.is_empty() {
                parts.push(v);
            }
            if parts.is_empty() {
                parts.push("accept".into());
            }
            let mut r = parts.join(" ");
            if let Some(c) = c {
                r.push_str(&format!(" comment \"{c}\""));
            }
            r
        })
}

fn table(idx: usize) -> impl Strategy<Value = String> {
    (
        prop_oneof![Just(Fam::Ip), Just(Fam::Ip6), Just(Fam::Inet)],
        1usize..4,
    )
        .prop_flat_map(move |(fam, nchains)| {
            // Chain i may jump only to regular chains after it, so there is never a loop.
            let chains: Vec<BoxedStrategy<String>> = (0..nchains)
                .map(|i| {
                    let targets: Vec<String> = (i + 1..nchains).map(|j| format!("c{j}")).collect();
                    let base = i == 0;
                    (
                        prop::collection::vec(rule(fam, targets), 0..5),
                        prop_oneof![Just("accept"), Just("drop")],
                        prop_oneof![Just("input"), Just("forward"), Just("output")],
                        -20i32..20,
                    )
                        .prop_map(move |(rules, pol, hook, prio)| {
                            let mut s = format!("\tchain c{i} {{\n");
                            if base {
                                s.push_str(&format!(
                                    "\t\ttype filter hook {hook} priority {prio}; policy {pol};\n"
                                ));
                            }
                            for r in rules {
                                s.push_str(&format!("\t\t{r}\n"));
                            }
                            s.push_str("\t}\n");
                            s
                        })
                        .boxed()
                })
                .collect();
            let fam_kw = match fam {
                Fam::Ip => "ip",
                Fam::Ip6 => "ip6",
                Fam::Inet => "inet",
            };
            let set = if fam == Fam::Ip6 {
                Just(String::new()).boxed()
            } else {
                set_of(ipv4(), 8)
                    .prop_map(|e| {
                        format!("\tset s {{\n\t\ttype ipv4_addr\n\t\telements = {e}\n\t}}\n")
                    })
                    .boxed()
            };
            (chains, set).prop_map(move |(cs, set)| {
                format!("table {fam_kw} t{idx} {{\n{set}{}}}\n", cs.join(""))
            })
        })
}

fn ruleset() -> impl Strategy<Value = String> {
    prop::collection::vec(0usize..1, 1..3).prop_flat_map(|v| {
        let tables: Vec<_> = (0..v.len()).map(table).collect();
        tables.prop_map(|ts| ts.join(""))
    })
}

/// The IR without source locations and rule texts, which differ between a file and its
/// listing.
fn without_locs(mut r: ir::Ruleset) -> ir::Ruleset {
    for t in &mut r.tables {
        for c in &mut t.chains {
            for rule in &mut c.rules {
                rule.text.clear();
                rule.loc = ir::SourceLoc {
                    file: "".into(),
                    line: 0,
                    col: 0,
                };
            }
        }
    }
    r
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn printed_form_loads_back_the_same(text in ruleset()) {
        let first = rules::load_str("gen.nft", &text)
            .map_err(|d| TestCaseError::fail(format!("generated file rejected:\n{text}\n{d}")))?;
        let printed = first.listing();
        let second = rules::load_str("printed.nft", &printed)
            .map_err(|d| TestCaseError::fail(format!("listing rejected:\n{printed}\n{d}")))?;
        // The listing loads back to the same ruleset...
        let relisted = second.listing();
        prop_assert_eq!(without_locs(second.ruleset), without_locs(first.ruleset.clone()));
        // ...and is a fixed point after one more round. (Not always after the first: like nft,
        // `{ a, a/8 }` merges to `{ a/8 }`, which nft reads back as the bare `a/8`.)
        let third = rules::load_str("relisted.nft", &relisted)
            .map_err(|d| TestCaseError::fail(format!("relisting rejected:\n{relisted}\n{d}")))?;
        prop_assert_eq!(&third.listing(), &relisted);
        prop_assert_eq!(without_locs(third.ruleset), without_locs(first.ruleset));
    }
}
