//! NAT through the sans-IO engine, with real frames and a fake clock: masquerade, snat to a
//! range, dnat with a port (the home router's port forward), redirect, a clash that moves a
//! source port, port exhaustion as a counted drop, ICMP echo ids, ICMP errors whose quote is
//! translated, IPv6, the TTL, and the `conntrack -L` lines of translated connections.
//!
//! Every frame that leaves is parsed again and its checksums recomputed from scratch
//! ([`leaves`]); a proptest does the same for random traffic.

mod common {
    pub mod capture;
}

use std::net::IpAddr;
use std::path::Path;

use etherparse::PacketBuilder;
use proptest::prelude::*;

use keepstate::config::Config;
use keepstate::conntrack::show::{self, ShowOpts};
use keepstate::conntrack::Timestamp;
use keepstate::engine::{DropReason, Engine, Outcome, Verdict, Worker};
use keepstate::packet::{checksum, parse_ethernet, Frame, InnerL4, Packet, L4};
use keepstate::rules;

use common::capture;

const CONFIG: &str = r#"
[[port]]
name = "lan"
addresses = ["192.168.1.1/24", "fd00:1::1/64"]

[[port]]
name = "wan"
addresses = ["198.51.100.1/24", "2001:db8:1::1/64"]

[[route]]
to = "default"
via = "198.51.100.254"

[[route]]
to = "::/0"
via = "2001:db8:1::fe"
"#;

const LAN: usize = 0;
const WAN: usize = 1;
const CLIENT: [u8; 4] = [192, 168, 1, 10];
const CLIENT2: [u8; 4] = [192, 168, 1, 11];
const SERVER: [u8; 4] = [203, 0, 113, 7];
const BOX_WAN: [u8; 4] = [198, 51, 100, 1];

fn engine_with(rules_text: &str) -> Engine {
    let cfg = Config::parse(CONFIG, Path::new("ks.toml")).unwrap();
    let rules = rules::load_str("nat.nft", rules_text).unwrap();
    Engine::from_config(&cfg, &rules).unwrap()
}

fn home_router() -> Engine {
    let cfg = Config::parse(CONFIG, Path::new("ks.toml")).unwrap();
    let rules =
        rules::load_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/home-router.nft"))
            .unwrap();
    Engine::from_config(&cfg, &rules).unwrap()
}

/// A forward chain that accepts everything and one nat chain line per hook.
fn nat_rules(prerouting: &str, postrouting: &str) -> String {
    format!(
        "table inet filter {{\n\tchain forward {{\n\t\ttype filter hook forward priority 0; policy accept;\n\t}}\n}}\n\
         table inet nat {{\n\tchain prerouting {{\n\t\ttype nat hook prerouting priority -100; policy accept;\n\t\t{prerouting}\n\t}}\n\
         \tchain postrouting {{\n\t\ttype nat hook postrouting priority 100; policy accept;\n\t\t{postrouting}\n\t}}\n}}\n"
    )
}

fn tcp4(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: &str,
    seq: u32,
    ack: u32,
) -> Vec<u8> {
    capture::tcp("lan", src, dst, sport, dport, flags, seq, ack, b"data")
}

fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    capture::udp("lan", src, dst, sport, dport, b"query")
}

fn ping4(src: [u8; 4], dst: [u8; 4], id: u16, seq: u16, reply: bool) -> Vec<u8> {
    capture::echo("lan", src, dst, id, seq, reply)
}

fn udp6(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    let a = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
    let mut f = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(a(src), a(dst), 64)
        .udp(sport, dport)
        .write(&mut f, b"q")
        .unwrap();
    f
}

fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(1_000_000 + ms)
}

/// The frame as it left, parsed, with every checksum recomputed from scratch and compared:
/// the IPv4 header's, the transport's (a zero UDP checksum stays "none"), and for an ICMP
/// error the quoted IPv4 header's.
fn leaves(o: &Outcome) -> Packet<'_> {
    assert!(
        matches!(o.verdict, Verdict::Forward { .. } | Verdict::Local),
        "{:?}",
        o.verdict
    );
    let Frame::Ip(p) = parse_ethernet(&o.frame) else {
        panic!("the frame that leaves does not parse")
    };
    checksum::verify(&p).expect("checksums verify when recomputed");
    if let L4::Icmp(i) = &p.l4 {
        if let Some(inner) = &i.inner {
            let q = &p.ip_bytes[p.l4_offset + 8..];
            let ihl = usize::from(q[0] & 0x0f) * 4;
            let sum = etherparse::checksum::Sum16BitWords::new()
                .add_slice(&q[..ihl])
                .ones_complement();
            assert_eq!(
                sum, 0,
                "the quoted IPv4 header's checksum verifies: {inner:?}"
            );
        }
    }
    p
}

fn ports(p: &Packet<'_>) -> (u16, u16) {
    match p.l4 {
        L4::Tcp(t) => (t.sport, t.dport),
        L4::Udp(u) => (u.sport, u.dport),
        _ => panic!("{:?}", p.l4),
    }
}

fn ip(a: [u8; 4]) -> IpAddr {
    IpAddr::from(a)
}

fn listing(e: &Engine, now: Timestamp) -> Vec<String> {
    let mut v: Vec<String> = e
        .tracker()
        .conns()
        .iter()
        .map(|c| show::list_line(c, now, ShowOpts::default()))
        .collect();
    v.sort();
    v
}

#[test]
fn masquerade_translates_both_ways_and_lists_as_the_kernel_does() {
    let e = home_router();
    let syn = e.process(
        &tcp4(CLIENT, SERVER, 40000, 443, "S", 1000, 0),
        LAN,
        t(0),
        0,
    );
    let p = leaves(&syn);
    assert_eq!((p.ip.src(), p.ip.dst()), (ip(BOX_WAN), ip(SERVER)));
    assert_eq!(ports(&p), (40000, 443), "a free source port is kept");
    assert_eq!(p.ip_bytes[8], 63, "TTL decremented");

    let synack = e.process(
        &tcp4(SERVER, BOX_WAN, 443, 40000, "SA", 5000, 1001),
        WAN,
        t(1),
        0,
    );
    let p = leaves(&synack);
    assert_eq!(
        synack.verdict,
        Verdict::Forward {
            port: LAN,
            next_hop: ip(CLIENT)
        }
    );
    assert_eq!((p.ip.src(), p.ip.dst()), (ip(SERVER), ip(CLIENT)));
    assert_eq!(ports(&p), (443, 40000));

    let ack = e.process(
        &tcp4(CLIENT, SERVER, 40000, 443, "A", 1001, 5001),
        LAN,
        t(2),
        0,
    );
    assert_eq!(leaves(&ack).ip.src(), ip(BOX_WAN));

    assert_eq!(
        listing(&e, t(2)),
        vec!["tcp      6 432000 ESTABLISHED src=192.168.1.10 dst=203.0.113.7 sport=40000 dport=443 src=203.0.113.7 dst=198.51.100.1 sport=443 dport=40000 [ASSURED] mark=0 use=1".to_string()]
    );
    let c = &e.tracker().conns()[0];
    assert_ne!(
        c.status() & keepstate::conntrack::status::SRC_NAT,
        0,
        "ct status snat"
    );
    assert_eq!(c.status() & keepstate::conntrack::status::DST_NAT, 0);
}

#[test]
fn a_clash_moves_the_source_port_and_both_flows_work() {
    let e = home_router();
    let a = e.process(&tcp4(CLIENT, SERVER, 40000, 443, "S", 1, 0), LAN, t(0), 0);
    let b = e.process(&tcp4(CLIENT2, SERVER, 40000, 443, "S", 1, 0), LAN, t(1), 0);
    let (pa, pb) = (leaves(&a), leaves(&b));
    assert_eq!(ports(&pa).0, 40000);
    let moved = ports(&pb).0;
    assert_ne!(
        moved, 40000,
        "the second client's tuple would clash: its port moves"
    );
    assert!(moved >= 1024, "ports above 1023 stay above ({moved})");
    assert_eq!(pb.ip.src(), ip(BOX_WAN));
    // Each reply finds its own client.
    let ra = e.process(&tcp4(SERVER, BOX_WAN, 443, 40000, "SA", 9, 2), WAN, t(2), 0);
    let rb = e.process(&tcp4(SERVER, BOX_WAN, 443, moved, "SA", 9, 2), WAN, t(3), 0);
    assert_eq!(leaves(&ra).ip.dst(), ip(CLIENT));
    let pb = leaves(&rb);
    assert_eq!((pb.ip.dst(), ports(&pb).1), (ip(CLIENT2), 40000));
}

#[test]
fn snat_to_a_range_stays_in_it_and_exhaustion_is_a_counted_drop() {
    let e = engine_with(&nat_rules(
        "",
        "oifname \"wan\" meta l4proto tcp snat ip to 198.51.100.10-198.51.100.12:5000-5001",
    ));
    let mut seen = Vec::new();
    // Two ports for one client address (the address depends on the source and destination
    // addresses only): the third connection to the same server port has nowhere to go.
    for (i, sport) in [40000u16, 40001, 40002].into_iter().enumerate() {
        let o = e.process(
            &tcp4(CLIENT, SERVER, sport, 443, "S", 1, 0),
            LAN,
            t(i as u64),
            0,
        );
        if i < 2 {
            let p = leaves(&o);
            let src = p.ip.src();
            assert!(
                (ip([198, 51, 100, 10])..=ip([198, 51, 100, 12])).contains(&src),
                "{src}"
            );
            let port = ports(&p).0;
            assert!((5000..=5001).contains(&port), "{port}");
            seen.push((src, port));
        } else {
            assert_eq!(o.verdict, Verdict::Drop(DropReason::NatFailed));
        }
    }
    assert_eq!(seen[0].0, seen[1].0, "one client, one address");
    assert_ne!(seen[0].1, seen[1].1);
    assert_eq!(
        e.tracker().count(),
        2,
        "the dropped connection left no entry"
    );
    assert_eq!(
        e.stats()
            .dropped_nat
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let st = &e.tracker().stats()[0];
    assert_eq!(
        (st.insert_failed, st.drop),
        (1, 1),
        "conntrack -S counts it as the kernel does"
    );
    // When one connection goes, its port is free again.
    let c = e.tracker().conns().into_iter().next().unwrap();
    e.tracker().kill(&c);
    let o = e.process(&tcp4(CLIENT, SERVER, 40002, 443, "S", 1, 0), LAN, t(10), 0);
    leaves(&o);
}

#[test]
fn the_port_forward_reaches_the_server_and_replies_leave_as_the_public_address() {
    let e = home_router();
    let syn = e.process(&tcp4(SERVER, BOX_WAN, 33000, 8080, "S", 1, 0), WAN, t(0), 0);
    let p = leaves(&syn);
    assert_eq!(
        syn.verdict,
        Verdict::Forward {
            port: LAN,
            next_hop: ip(CLIENT)
        }
    );
    assert_eq!((p.ip.dst(), ports(&p)), (ip(CLIENT), (33000, 80)));
    // The forward chain accepted it through `ip daddr 192.168.1.10 tcp dport 80 ct status dnat`.
    let rs = e.compiled();
    let rule = syn
        .rules
        .iter()
        .map(|&r| rs.ruleset.rules().nth(r as usize).unwrap().loc.line)
        .collect::<Vec<_>>();
    assert!(rule.contains(&112), "matched rules (lines): {rule:?}");

    let synack = e.process(&tcp4(CLIENT, SERVER, 80, 33000, "SA", 7, 2), LAN, t(1), 0);
    let p = leaves(&synack);
    assert_eq!((p.ip.src(), ports(&p)), (ip(BOX_WAN), (8080, 33000)));
    assert_eq!(
        listing(&e, t(1)),
        vec!["tcp      6 60 SYN_RECV src=203.0.113.7 dst=198.51.100.1 sport=33000 dport=8080 src=192.168.1.10 dst=203.0.113.7 sport=80 dport=33000 mark=0 use=1".to_string()]
    );
    // Straight to the server's address from outside: no dnat, refused by the forward chain.
    let direct = e.process(&tcp4(SERVER, CLIENT, 33001, 80, "S", 1, 0), WAN, t(2), 0);
    assert_eq!(direct.verdict, Verdict::Drop(DropReason::Rules));
}

#[test]
fn redirect_delivers_to_the_box_on_the_ingress_address() {
    let e = engine_with(
        "table inet filter {\n\tchain input {\n\t\ttype filter hook input priority 0; policy drop;\n\t\ttcp dport 3128 accept\n\t}\n}\n\
         table ip nat {\n\tchain prerouting {\n\t\ttype nat hook prerouting priority -100; policy accept;\n\t\tiifname \"lan\" tcp dport 80 redirect to :3128\n\t}\n}\n",
    );
    let o = e.process(&tcp4(CLIENT, SERVER, 41000, 80, "S", 1, 0), LAN, t(0), 0);
    assert_eq!(o.verdict, Verdict::Local);
    let p = leaves(&o);
    assert_eq!(
        (p.ip.dst(), ports(&p)),
        (ip([192, 168, 1, 1]), (41000, 3128))
    );
    assert_eq!(p.ip_bytes[8], 64, "delivered, not forwarded: the TTL stays");
}

#[test]
fn ping_ids_are_translated_and_clashing_ids_move() {
    let e = home_router();
    let a = e.process(&ping4(CLIENT, SERVER, 7, 1, false), LAN, t(0), 0);
    let b = e.process(&ping4(CLIENT2, SERVER, 7, 1, false), LAN, t(1), 0);
    let id = |p: &Packet<'_>| match p.l4 {
        L4::Icmp(i) => i.id,
        _ => panic!(),
    };
    let (pa, pb) = (leaves(&a), leaves(&b));
    assert_eq!((pa.ip.src(), id(&pa)), (ip(BOX_WAN), 7));
    let moved = id(&pb);
    assert_ne!(moved, 7);
    let r = e.process(&ping4(SERVER, BOX_WAN, moved, 1, true), WAN, t(2), 0);
    let pr = leaves(&r);
    assert_eq!((pr.ip.dst(), id(&pr)), (ip(CLIENT2), 7));
}

#[test]
fn icmp_errors_about_translated_packets_are_translated_inside_and_out() {
    let e = home_router();
    let q = e.process(&udp4(CLIENT, SERVER, 5353, 53), LAN, t(0), 0);
    let sent = leaves(&q);
    assert_eq!(sent.ip.src(), ip(BOX_WAN));
    // A router on the way answers "port unreachable" quoting the translated packet.
    let quote = &q.frame[14..];
    let mut err = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(SERVER, BOX_WAN, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ))
        .write(&mut err, quote)
        .unwrap();
    let o = e.process(&err, WAN, t(1), 0);
    assert_eq!(
        o.ct_state,
        Some(keepstate::rules::ir::ct_state::RELATED as u32)
    );
    let p = leaves(&o);
    assert_eq!(p.ip.dst(), ip(CLIENT), "the error goes to the client");
    let L4::Icmp(i) = &p.l4 else { panic!() };
    let inner = i.inner.as_ref().unwrap();
    assert_eq!(
        (inner.src, inner.dst),
        (ip(CLIENT), ip(SERVER)),
        "the quote as the client sent it"
    );
    assert!(
        matches!(
            inner.l4,
            InnerL4::Ports {
                sport: 5353,
                dport: 53
            }
        ),
        "{:?}",
        inner.l4
    );
}

#[test]
fn a_zero_udp_checksum_stays_zero() {
    let e = home_router();
    let mut f = udp4(CLIENT, SERVER, 6000, 53);
    f[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    let o = e.process(&f, LAN, t(0), 0);
    let p = leaves(&o);
    assert_eq!(p.ip.src(), ip(BOX_WAN));
    assert_eq!(&o.frame[14 + 20 + 6..14 + 20 + 8], &[0, 0]);
}

#[test]
fn ipv6_masquerade() {
    let e = engine_with(&nat_rules("", "oifname \"wan\" masquerade"));
    let f = udp6("fd00:1::10", "2001:db8:9::7", 7000, 53);
    let o = e.process(&f, LAN, t(0), 0);
    let p = leaves(&o);
    assert_eq!(p.ip.src(), "2001:db8:1::1".parse::<IpAddr>().unwrap());
    assert_eq!(p.ip_bytes[7], 63, "hop limit decremented");
}

#[test]
fn the_ttl_runs_out_with_a_time_exceeded_answer() {
    let e = home_router();
    let mut f = udp4(CLIENT, SERVER, 6001, 53);
    f[14 + 8] = 1;
    // Fix the IPv4 header checksum for the new TTL.
    f[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let sum = etherparse::checksum::Sum16BitWords::new()
        .add_slice(&f[14..34])
        .ones_complement();
    f[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
    let o = e.process(&f, LAN, t(0), 0);
    assert_eq!(o.verdict, Verdict::Drop(DropReason::TtlExceeded));
    let reply = o.reply.expect("an ICMP time exceeded");
    let Frame::Ip(p) = parse_ethernet(&reply) else {
        panic!()
    };
    checksum::verify(&p).unwrap();
    assert_eq!((p.ip.src(), p.ip.dst()), (ip([192, 168, 1, 1]), ip(CLIENT)));
    let L4::Icmp(i) = p.l4 else { panic!() };
    assert_eq!((i.icmp_type, i.code), (11, 0));
    assert_eq!(
        e.tracker().count(),
        0,
        "the first packet died: no connection"
    );
}

/// Random flows (TCP, UDP with and without checksum, ping) from random LAN hosts and ports
/// through masquerade and the port forward, with their replies: every frame that leaves
/// verifies, and every reply reaches the host that opened the flow, on its own port.
#[derive(Clone, Debug)]
enum Flow {
    Tcp(u8, u16),
    Udp(u8, u16, bool),
    Ping(u8, u16),
    Forward(u16),
}

fn flow() -> impl Strategy<Value = Flow> {
    prop_oneof![
        (10u8..14, 1000u16..1100).prop_map(|(h, p)| Flow::Tcp(h, p)),
        (10u8..14, 1000u16..1100, any::<bool>()).prop_map(|(h, p, z)| Flow::Udp(h, p, z)),
        (10u8..14, 0u16..8).prop_map(|(h, i)| Flow::Ping(h, i)),
        (30000u16..30050).prop_map(Flow::Forward),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn translated_frames_always_verify_and_replies_find_their_host(
        flows in prop::collection::vec(flow(), 1..40)
    ) {
        let e = home_router();
        let mut w = Worker::new(0);
        for (n, f) in flows.iter().enumerate() {
            let now = t(n as u64);
            match *f {
                Flow::Tcp(h, sport) | Flow::Udp(h, sport, _) => {
                    let host = [192, 168, 1, h];
                    let out = match f {
                        Flow::Tcp(..) => tcp4(host, SERVER, sport, 443, "S", 1, 0),
                        Flow::Udp(_, _, zero) => {
                            let mut u = udp4(host, SERVER, sport, 53);
                            if *zero { u[40..42].copy_from_slice(&[0, 0]); }
                            u
                        }
                        _ => unreachable!(),
                    };
                    let o = e.process_traced(&out, LAN, now, &mut w);
                    if !matches!(o.verdict, Verdict::Forward { .. }) {
                        // A repeated SYN of the same flow is fine too; anything else is not.
                        prop_assert!(o.ct_state.is_some(), "{:?}", o.verdict);
                        continue;
                    }
                    let p = leaves(&o);
                    prop_assert_eq!(p.ip.src(), ip(BOX_WAN));
                    let (pub_port, _) = ports(&p);
                    let back = match f {
                        Flow::Tcp(..) => tcp4(SERVER, BOX_WAN, 443, pub_port, "SA", 9, 2),
                        _ => udp4(SERVER, BOX_WAN, 53, pub_port),
                    };
                    let r = e.process_traced(&back, WAN, now, &mut w);
                    let q = leaves(&r);
                    prop_assert_eq!(q.ip.dst(), ip(host));
                    prop_assert_eq!(ports(&q).1, sport);
                }
                Flow::Ping(h, id) => {
                    let host = [192, 168, 1, h];
                    let o = e.process_traced(&ping4(host, SERVER, id, 1, false), LAN, now, &mut w);
                    let p = leaves(&o);
                    let L4::Icmp(i) = p.l4 else { panic!() };
                    let r = e.process_traced(&ping4(SERVER, BOX_WAN, i.id, 1, true), WAN, now, &mut w);
                    let q = leaves(&r);
                    let L4::Icmp(j) = q.l4 else { panic!() };
                    prop_assert_eq!((q.ip.dst(), j.id), (ip(host), id));
                }
                Flow::Forward(sport) => {
                    let o = e.process_traced(&tcp4(SERVER, BOX_WAN, sport, 8080, "S", 1, 0), WAN, now, &mut w);
                    if !matches!(o.verdict, Verdict::Forward { .. }) {
                        continue;
                    }
                    let p = leaves(&o);
                    prop_assert_eq!((p.ip.dst(), ports(&p).1), (ip(CLIENT), 80));
                    let r = e.process_traced(&tcp4(CLIENT, SERVER, 80, sport, "SA", 9, 2), LAN, now, &mut w);
                    let q = leaves(&r);
                    prop_assert_eq!((q.ip.src(), ports(&q).0), (ip(BOX_WAN), 8080));
                }
            }
        }
    }
}

#[test]
fn nat_maps_pick_the_target_by_the_packets_key() {
    let e = engine_with(&nat_rules(
        "iifname \"wan\" dnat ip to ip daddr . tcp dport map { 198.51.100.1 . 80 : 192.168.1.10 . 8080, 198.51.100.1 . 443 : 192.168.1.12 . 443 }",
        "oifname \"wan\" snat ip to ip saddr map { 192.168.1.0/28 : 198.51.100.5, 192.168.1.16/28 : 198.51.100.6 }",
    ));
    let o = e.process(&tcp4(SERVER, BOX_WAN, 33000, 80, "S", 1, 0), WAN, t(0), 0);
    let p = leaves(&o);
    assert_eq!((p.ip.dst(), ports(&p).1), (ip(CLIENT), 8080));
    let o = e.process(&tcp4(SERVER, BOX_WAN, 33001, 443, "S", 1, 0), WAN, t(1), 0);
    assert_eq!(leaves(&o).ip.dst(), ip([192, 168, 1, 12]));
    // Not in the map: the rule does not apply, so the packet is for the box itself.
    let o = e.process(&tcp4(SERVER, BOX_WAN, 33002, 22, "S", 1, 0), WAN, t(2), 0);
    assert_eq!(o.verdict, Verdict::Local);

    let o = e.process(&udp4(CLIENT, SERVER, 5000, 53), LAN, t(3), 0);
    assert_eq!(leaves(&o).ip.src(), ip([198, 51, 100, 5]));
    let o = e.process(&udp4([192, 168, 1, 20], SERVER, 5000, 53), LAN, t(4), 0);
    assert_eq!(leaves(&o).ip.src(), ip([198, 51, 100, 6]));
    // Outside both prefixes: no translation (a null binding keeps the source).
    let o = e.process(&udp4([192, 168, 1, 40], SERVER, 5000, 53), LAN, t(5), 0);
    assert_eq!(leaves(&o).ip.src(), ip([192, 168, 1, 40]));
}

#[test]
fn an_ip_only_nat_rule_leaves_ipv6_to_the_next_rule() {
    let e = engine_with(&nat_rules(
        "",
        "oifname \"wan\" snat ip to 198.51.100.9\n\t\toifname \"wan\" masquerade",
    ));
    let f = udp6("fd00:1::10", "2001:db8:9::7", 7000, 53);
    let o = e.process(&f, LAN, t(0), 0);
    assert_eq!(
        leaves(&o).ip.src(),
        "2001:db8:1::1".parse::<IpAddr>().unwrap()
    );
    let o = e.process(&udp4(CLIENT, SERVER, 5000, 53), LAN, t(1), 0);
    assert_eq!(leaves(&o).ip.src(), ip([198, 51, 100, 9]));
}

#[test]
fn a_source_keeps_its_mapping_towards_other_destinations() {
    let e = home_router();
    leaves(&e.process(&udp4(CLIENT, SERVER, 45000, 53), LAN, t(0), 0));
    let moved = ports(&leaves(&e.process(
        &udp4(CLIENT2, SERVER, 45000, 53),
        LAN,
        t(1),
        0,
    )))
    .0;
    assert_ne!(moved, 45000);
    // The second client, same socket, another server port: 45000 would be free towards it,
    // but the kernel (find_appropriate_src) reuses the source's existing mapping.
    let again = e.process(&udp4(CLIENT2, SERVER, 45000, 5000), LAN, t(2), 0);
    assert_eq!(ports(&leaves(&again)).0, moved);
    // Once the earlier connections are gone, the original port comes back.
    for c in e.tracker().conns() {
        e.tracker().kill(&c);
    }
    let fresh = e.process(&udp4(CLIENT2, SERVER, 45000, 6000), LAN, t(3), 0);
    assert_eq!(ports(&leaves(&fresh)).0, 45000);
}
