//! The sans-IO engine driven with real frames and a fake clock through the example home
//! router: forwarding, the stateful return path, input policy, rate limits, malformed frames,
//! reloads that keep connections, and timeouts.

mod common {
    pub mod router;
}

use std::net::IpAddr;
use std::path::Path;

use etherparse::PacketBuilder;
use keepstate::config::Config;
use keepstate::conntrack::Timestamp;
use keepstate::engine::{Compiled, DropReason, Engine, Verdict};
use keepstate::rules::{self, ir::ct_state};

use common::router::CONFIG;

const LAN: usize = 0;
const WAN: usize = 1;

fn engine() -> Engine {
    let cfg = Config::parse(CONFIG, Path::new("ks.toml")).unwrap();
    let rules =
        rules::load_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/home-router.nft"))
            .unwrap();
    Engine::from_config(&cfg, &rules).unwrap()
}

fn tcp(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: &str,
    seq: u32,
    ack: u32,
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, seq, 64240);
    if flags.contains('S') {
        b = b.syn();
    }
    if flags.contains('A') {
        b = b.ack(ack);
    }
    if flags.contains('F') {
        b = b.fin();
    }
    if flags.contains('R') {
        b = b.rst();
    }
    let mut out = Vec::new();
    b.write(&mut out, &[]).unwrap();
    out
}

fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .udp(sport, dport);
    let mut out = Vec::new();
    b.write(&mut out, b"query").unwrap();
    out
}

fn ping(src: [u8; 4], dst: [u8; 4], seq: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .icmpv4_echo_request(7, seq);
    let mut out = Vec::new();
    b.write(&mut out, b"ping").unwrap();
    out
}

const CLIENT: [u8; 4] = [192, 168, 1, 10];
const SERVER: [u8; 4] = [203, 0, 113, 7];
const BOX_WAN: [u8; 4] = [198, 51, 100, 1];

fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(1_000_000 + ms)
}

#[test]
fn lan_client_connects_out_and_replies_come_back() {
    let e = engine();
    let syn = e.process(&tcp(CLIENT, SERVER, 40000, 443, "S", 1000, 0), LAN, t(0), 0);
    let gw: IpAddr = "198.51.100.254".parse().unwrap();
    assert_eq!(
        syn.verdict,
        Verdict::Forward {
            port: WAN,
            next_hop: gw
        }
    );
    assert_eq!(syn.ct_state, Some(ct_state::NEW as u32));
    assert_eq!(
        e.tracker().count(),
        1,
        "the accepted first packet is confirmed"
    );

    let synack = e.process(
        // Masqueraded: the reply comes to the box's WAN address (the port was free, so kept).
        &tcp(SERVER, BOX_WAN, 443, 40000, "SA", 5000, 1001),
        WAN,
        t(10),
        0,
    );
    let client: IpAddr = "192.168.1.10".parse().unwrap();
    assert_eq!(
        synack.verdict,
        Verdict::Forward {
            port: LAN,
            next_hop: client
        }
    );
    assert_eq!(synack.ct_state, Some(ct_state::ESTABLISHED as u32));

    let ack = e.process(
        &tcp(CLIENT, SERVER, 40000, 443, "A", 1001, 5001),
        LAN,
        t(20),
        0,
    );
    assert!(matches!(ack.verdict, Verdict::Forward { port: WAN, .. }));
    assert_eq!(ack.ct_state, Some(ct_state::ESTABLISHED as u32));
}

#[test]
fn unsolicited_traffic_from_the_internet_is_dropped_and_not_tracked() {
    let e = engine();
    // To the box: the input policy drops it.
    let ssh = e.process(&tcp(SERVER, BOX_WAN, 5555, 22, "S", 1, 0), WAN, t(0), 0);
    assert_eq!(ssh.verdict, Verdict::Drop(DropReason::Rules));
    // Through the box to the LAN: the forward policy drops it.
    let fwd = e.process(&tcp(SERVER, CLIENT, 5555, 22, "S", 1, 0), WAN, t(0), 0);
    assert_eq!(fwd.verdict, Verdict::Drop(DropReason::Rules));
    // A dropped first packet leaves no connection behind.
    assert_eq!(e.tracker().count(), 0);
    // A reply-looking segment with no connection is picked up mid-stream (tcp_loose) as NEW,
    // and forward drops it (only established/related and lan->wan pass).
    let mid = e.process(&tcp(SERVER, CLIENT, 443, 40000, "A", 1, 1), WAN, t(0), 0);
    assert_eq!(mid.verdict, Verdict::Drop(DropReason::Rules));
}

#[test]
fn ssh_from_the_lan_reaches_the_box() {
    let e = engine();
    let o = e.process(
        &tcp(CLIENT, [192, 168, 1, 1], 40000, 22, "S", 1, 0),
        LAN,
        t(0),
        0,
    );
    assert_eq!(o.verdict, Verdict::Local);
    assert_eq!(e.tracker().count(), 1);
}

#[test]
fn ping_is_rate_limited() {
    let e = engine();
    // `limit rate 5/second` with nft's default burst of 5: five at once pass, then one per 200 ms.
    let verdicts: Vec<bool> = (0..8)
        .map(|i| e.process(&ping(SERVER, BOX_WAN, i), WAN, t(0), 0).verdict == Verdict::Local)
        .collect();
    assert_eq!(
        verdicts,
        [true, true, true, true, true, false, false, false]
    );
    assert_eq!(
        e.process(&ping(SERVER, BOX_WAN, 9), WAN, t(250), 0).verdict,
        Verdict::Local
    );
    assert_eq!(
        e.process(&ping(SERVER, BOX_WAN, 10), WAN, t(260), 0)
            .verdict,
        Verdict::Drop(DropReason::Rules)
    );
}

#[test]
fn malformed_frames_are_counted_and_dropped() {
    let e = engine();
    let mut f = tcp(CLIENT, SERVER, 40000, 443, "S", 1, 0);
    f.truncate(20);
    assert_eq!(
        e.process(&f, LAN, t(0), 0).verdict,
        Verdict::Drop(DropReason::Malformed)
    );
    let mut g = tcp(CLIENT, SERVER, 40000, 443, "S", 1, 0);
    g[14] = 0x41; // IHL 1: impossible
    assert_eq!(
        e.process(&g, LAN, t(0), 0).verdict,
        Verdict::Drop(DropReason::Malformed)
    );
    assert_eq!(
        e.stats()
            .malformed
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    assert_eq!(
        e.process(&[], LAN, t(0), 0).verdict,
        Verdict::Drop(DropReason::Malformed)
    );
}

#[test]
fn reload_keeps_established_connections() {
    let e = engine();
    assert!(matches!(
        e.process(&tcp(CLIENT, SERVER, 40000, 443, "S", 1000, 0), LAN, t(0), 0)
            .verdict,
        Verdict::Forward { .. }
    ));
    e.process(
        &tcp(SERVER, BOX_WAN, 443, 40000, "SA", 5000, 1001),
        WAN,
        t(1),
        0,
    );
    // The new ruleset lets nothing new out of the LAN...
    let strict = rules::load_str(
        "strict.nft",
        "table inet filter {\n\tchain forward {\n\t\ttype filter hook forward priority 0; policy drop;\n\t\tct state established,related accept\n\t}\n}\n",
    )
    .unwrap();
    e.reload(Compiled::new(&strict).unwrap());
    // ...but the open connection keeps flowing.
    let ack = e.process(
        &tcp(CLIENT, SERVER, 40000, 443, "A", 1001, 5001),
        LAN,
        t(2),
        0,
    );
    assert!(matches!(ack.verdict, Verdict::Forward { port: WAN, .. }));
    let other = e.process(&tcp(CLIENT, SERVER, 40001, 443, "S", 1, 0), LAN, t(3), 0);
    assert_eq!(other.verdict, Verdict::Drop(DropReason::Rules));
}

#[test]
fn udp_flows_time_out() {
    let e = engine();
    let q = udp(CLIENT, SERVER, 5353, 53);
    assert_eq!(
        e.process(&q, LAN, t(0), 0).ct_state,
        Some(ct_state::NEW as u32)
    );
    let r = udp(SERVER, BOX_WAN, 53, 5353);
    assert_eq!(
        e.process(&r, WAN, t(100), 0).ct_state,
        Some(ct_state::ESTABLISHED as u32)
    );
    // Not yet a stream: it lives 30 s (nf_conntrack_udp_timeout) after its last packet.
    assert_eq!(
        e.process(&q, LAN, t(100 + 30_001), 0).ct_state,
        Some(ct_state::NEW as u32)
    );
    // A reply, then a packet more than 2 s after the start: a stream, ASSURED, 120 s
    // (nf_conntrack_udp_timeout_stream).
    let start = 200_000;
    e.process(&q, LAN, t(start), 0);
    e.process(&r, WAN, t(start + 100), 0);
    assert_eq!(
        e.process(&q, LAN, t(start + 3_000), 0).ct_state,
        Some(ct_state::ESTABLISHED as u32)
    );
    assert_eq!(
        e.process(&q, LAN, t(start + 3_000 + 119_000), 0).ct_state,
        Some(ct_state::ESTABLISHED as u32)
    );
    assert_eq!(
        e.process(&q, LAN, t(start + 3_000 + 119_000 + 120_001), 0)
            .ct_state,
        Some(ct_state::NEW as u32)
    );
}

#[test]
fn counters_count() {
    let e = engine();
    // The last input rule counts what the policy is about to drop.
    e.process(&tcp(SERVER, BOX_WAN, 5555, 23, "S", 1, 0), WAN, t(0), 0);
    let c = e.compiled();
    let total: u64 = c
        .counters
        .iter()
        .map(|c| c[0].load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert_eq!(total, 1);
}

#[test]
fn established_fast_path_only_where_provably_the_same() {
    use keepstate::engine::accepts_established;
    use keepstate::rules::ir::{Hook, NFPROTO_IPV4};
    let home =
        rules::load_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/home-router.nft"))
            .unwrap();
    let later = home.ruleset.view_for(NFPROTO_IPV4, false);
    assert!(accepts_established(&later, Hook::Forward));
    assert!(accepts_established(&later, Hook::Input));
    let not = |text: &str| {
        let l = rules::load_str("t.nft", &format!("table inet t {{\n\tchain f {{\n\t\ttype filter hook forward priority 0; policy drop;\n\t\t{text}\n\t}}\n}}\n")).unwrap();
        !accepts_established(&l.ruleset.view_for(NFPROTO_IPV4, false), Hook::Forward)
    };
    // A counter, a second match or a narrower state must go through the tree.
    assert!(not("ct state established,related counter accept"));
    assert!(not("iifname \"lan\" ct state established accept"));
    assert!(not("ct state related accept"));
    assert!(not("ct state vmap { established : drop }"));
    assert!(not("tcp dport 22 accept"));
    assert!(!not("ct state established accept"));
    assert!(!not(
        "ct state vmap { established : accept, invalid : drop }"
    ));
}

#[test]
fn a_prerouting_chain_after_dnat_is_warned_about() {
    use keepstate::engine::kernel_differences;
    // A port forward (`dnat`), and a prerouting filter chain with `rule` at `prio`.
    let warn = |prio: &str, dnat: &str, rule: &str| {
        let text = format!(
            "table ip t {{\n\tchain dnat {{\n\t\ttype nat hook prerouting priority dstnat;\n\t\t{dnat}\n\t}}\n\tchain pre {{\n\t\ttype filter hook prerouting priority {prio};\n\t\tjump more\n\t}}\n\tchain more {{\n\t\t{rule}\n\t}}\n}}\n"
        );
        kernel_differences(&rules::load_str("t.nft", &text).unwrap().ruleset)
    };
    let to_host = "tcp dport 8080 dnat ip to 192.168.1.5";
    let w = warn("0", to_host, "ip daddr 192.168.1.5 accept");
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("chain ip t pre (hook prerouting, priority 0) sees packets before DNAT")
    );
    // The port, only when a dnat names one.
    assert!(warn("0", to_host, "tcp dport 80 accept").is_empty());
    assert_eq!(
        warn(
            "0",
            "tcp dport 8080 dnat ip to 192.168.1.5:80",
            "tcp dport 80 accept"
        )
        .len(),
        1
    );
    // Before DNAT in the kernel too, or no field DNAT changes: nothing to say.
    assert!(warn("-150", to_host, "ip daddr 192.168.1.5 accept").is_empty());
    assert!(warn("0", to_host, "ip saddr 192.168.1.5 accept").is_empty());
    assert!(warn("0", "tcp dport 8080 counter", "ip daddr 192.168.1.5 accept").is_empty());
    // The shipped examples say nothing (office-ftp-sip's helper chain at priority 0 reads
    // only ports its port-less dnat keeps).
    for f in [
        "home-router.nft",
        "office-ftp-sip.nft",
        "lab-flowtable.nft",
        "web-server.nft",
    ] {
        let l = rules::load_file(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples")
                .join(f),
        )
        .unwrap();
        assert!(kernel_differences(&l.ruleset).is_empty(), "{f}");
    }
}

fn ipv4_checksum(h: &mut [u8]) {
    h[10] = 0;
    h[11] = 0;
    let c = etherparse::checksum::Sum16BitWords::new()
        .add_slice(h)
        .ones_complement();
    h[10..12].copy_from_slice(&c.to_ne_bytes());
}

/// A UDP datagram from `src` to `dst`, cut into Ethernet-framed fragments of `size` bytes.
fn udp_fragments(src: [u8; 4], dst: [u8; 4], dport: u16, len: usize, size: usize) -> Vec<Vec<u8>> {
    let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
    let mut ip = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .udp(40000, dport)
        .write(&mut ip, &payload)
        .unwrap();
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    let data = &ip[20..];
    let mut out = Vec::new();
    for (i, chunk) in data.chunks(size).enumerate() {
        let off = i * size;
        let more = off + chunk.len() < data.len();
        let mut h = ip[..20].to_vec();
        h[2..4].copy_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
        let fo = (off / 8) as u16 | if more { 0x2000 } else { 0 };
        h[6..8].copy_from_slice(&fo.to_be_bytes());
        ipv4_checksum(&mut h);
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        f.extend_from_slice(&h);
        f.extend_from_slice(chunk);
        out.push(f);
    }
    out
}

#[test]
fn fragments_are_judged_whole_and_leave_as_they_came() {
    let e = engine();
    // A 3000-byte DNS answer to a LAN client's query: the query first, from the LAN.
    e.process(&udp(CLIENT, SERVER, 40000, 53), LAN, t(0), 0);
    // The reply comes from port 53 to the query's source port.
    // Masqueraded: the answer comes to the box's WAN address.
    let frags = udp_fragments_from(SERVER, BOX_WAN, 53, 40000, 3000, 1480);
    assert_eq!(frags.len(), 3);
    // Out of order: the last first.
    let a = e.process(&frags[2], WAN, t(10), 0);
    assert_eq!(a.verdict, Verdict::Held);
    let b = e.process(&frags[0], WAN, t(11), 0);
    assert_eq!(b.verdict, Verdict::Held);
    let c = e.process(&frags[1], WAN, t(12), 0);
    assert!(
        matches!(c.verdict, Verdict::Forward { port: LAN, .. }),
        "{:?}",
        c.verdict
    );
    assert_eq!(c.ct_state, Some(ct_state::ESTABLISHED as u32));
    // The verdict applies to the original fragments, in arrival order, each translated back
    // to the client (the first one's UDP checksum covers the whole datagram) with its TTL
    // decremented; nothing else changes.
    let order = [&frags[2], &frags[0], &frags[1]];
    assert_eq!(c.released.len(), 3);
    for (out, orig) in c.released.iter().zip(order) {
        assert_eq!(out.len(), orig.len());
        assert_eq!(&out[14 + 16..14 + 20], &CLIENT, "destination translated");
        assert_eq!(out[14 + 8], orig[14 + 8] - 1, "TTL decremented");
        let mut h = out[14..34].to_vec();
        ipv4_checksum(&mut h);
        assert_eq!(h, out[14..34], "IPv4 header checksum verifies");
        assert_eq!(out[34..], orig[34..], "payload untouched");
    }

    // Unsolicited fragments towards the LAN are judged whole and dropped together.
    let bad = udp_fragments(SERVER, CLIENT, 9999, 2000, 1480);
    assert_eq!(e.process(&bad[0], WAN, t(20), 0).verdict, Verdict::Held);
    assert_eq!(
        e.process(&bad[1], WAN, t(21), 0).verdict,
        Verdict::Drop(DropReason::Rules)
    );

    // An overlapping fragment kills its datagram.
    let o = udp_fragments(SERVER, CLIENT, 40000, 2000, 1480);
    assert_eq!(e.process(&o[0], WAN, t(30), 0).verdict, Verdict::Held);
    let mut overlap = o[1].clone();
    // Move the second fragment's offset back by 8 bytes: it now overlaps the first.
    let fo = u16::from_be_bytes([overlap[20], overlap[21]]) - 1;
    overlap[20..22].copy_from_slice(&fo.to_be_bytes());
    ipv4_checksum(&mut overlap[14..34]);
    assert_eq!(
        e.process(&overlap, WAN, t(31), 0).verdict,
        Verdict::Drop(DropReason::Fragment)
    );
}

/// Fragments of a UDP datagram with both ports chosen.
fn udp_fragments_from(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    len: usize,
    size: usize,
) -> Vec<Vec<u8>> {
    let mut f = udp_fragments(src, dst, dport, len, size);
    // Patch the source port in the first fragment (its UDP header), fixing the checksum.
    let first = &mut f[0];
    let at = 14 + 20;
    let old = u16::from_be_bytes([first[at], first[at + 1]]);
    first[at..at + 2].copy_from_slice(&sport.to_be_bytes());
    let c = u16::from_be_bytes([first[at + 6], first[at + 7]]);
    let n = keepstate::packet::rewrite::csum_replace2(c, old, sport);
    first[at + 6..at + 8].copy_from_slice(&n.to_be_bytes());
    f
}

#[test]
fn fast_path_and_full_evaluation_agree() {
    use keepstate::engine::Worker;
    // The same traffic through two engines: one skipping the tree for established packets,
    // one evaluating every hook (as traces do). Verdicts and ct states must be identical.
    let fast = engine();
    let full = engine();
    let mut wf = Worker::new(0);
    let mut wt = Worker::new(0);
    wt.trace = true;
    let mut frames = Vec::new();
    for i in 0..20u16 {
        let c = [192, 168, 1, 10 + (i % 3) as u8];
        let sport = 40000 + i;
        frames.push((tcp(c, SERVER, sport, 443, "S", 1000, 0), LAN));
        frames.push((tcp(SERVER, BOX_WAN, 443, sport, "SA", 5000, 1001), WAN));
        frames.push((tcp(c, SERVER, sport, 443, "A", 1001, 5001), LAN));
        frames.push((tcp(SERVER, BOX_WAN, 443, sport, "A", 5001, 1001), WAN));
        frames.push((tcp(SERVER, BOX_WAN, 443, sport, "A", 1, 1), WAN));
        frames.push((udp(c, SERVER, sport, 53), LAN));
        frames.push((udp(SERVER, BOX_WAN, 53, sport), WAN));
        frames.push((ping(SERVER, BOX_WAN, i), WAN));
    }
    for (n, (f, port)) in frames.iter().enumerate() {
        let (mut fa, mut fb) = (f.clone(), f.clone());
        let a = fast.process_with(&mut fa, *port, t(n as u64), &mut wf);
        let b = full.process_with(&mut fb, *port, t(n as u64), &mut wt);
        assert_eq!(a, b, "frame {n}");
        assert_eq!(fa, fb, "frame {n} as it leaves");
    }
}

#[test]
fn rejects_answer_as_the_kernel_does() {
    use keepstate::packet::{checksum, parse_ethernet, Frame, L4};
    let cfg = Config::parse(CONFIG, Path::new("ks.toml")).unwrap();
    let rules = rules::load_str(
        "r.nft",
        "table inet f {\n\tchain input {\n\t\ttype filter hook input priority 0; policy accept;\n\t\ttcp dport 23 reject with tcp reset\n\t\tudp dport 9 reject\n\t\ttcp dport 25 reject with icmpx type admin-prohibited\n\t}\n}\n",
    )
    .unwrap();
    let e = Engine::from_config(&cfg, &rules).unwrap();
    fn parse(f: &[u8]) -> (IpAddr, IpAddr, L4<'_>, Result<(), checksum::ChecksumError>) {
        match parse_ethernet(f) {
            Frame::Ip(p) => (p.ip.src(), p.ip.dst(), p.l4, checksum::verify(&p)),
            other => panic!("{other:?}"),
        }
    }

    let o = e.process(&tcp(SERVER, BOX_WAN, 5555, 23, "S", 1000, 0), WAN, t(0), 0);
    assert_eq!(
        o.verdict,
        Verdict::Reject(keepstate::rules::ir::Reject::TcpReset)
    );
    let reply = o.reply.expect("a reset");
    let (src, dst, l4, ok) = parse(&reply);
    assert!(ok.is_ok());
    assert_eq!((src, dst), (IpAddr::from(BOX_WAN), IpAddr::from(SERVER)));
    assert!(matches!(l4, L4::Tcp(t) if t.flags == 0x14 && t.ack == 1001 && t.sport == 23));

    let o = e.process(&udp(SERVER, BOX_WAN, 5555, 9), WAN, t(0), 0);
    let r2 = o.reply.expect("port unreachable");
    let (src, _, l4, ok) = parse(&r2);
    assert!(ok.is_ok());
    assert_eq!(
        src,
        IpAddr::from(BOX_WAN),
        "from the box's address on the ingress port"
    );
    assert!(matches!(l4, L4::Icmp(i) if i.icmp_type == 3 && i.code == 3));

    let o = e.process(&tcp(SERVER, BOX_WAN, 5555, 25, "S", 1, 0), WAN, t(0), 0);
    let r3 = o.reply.expect("admin prohibited");
    let (_, _, l4, _) = parse(&r3);
    assert!(matches!(l4, L4::Icmp(i) if i.icmp_type == 3 && i.code == 13));
}

#[test]
fn notrack_in_a_raw_chain_leaves_packets_untracked() {
    let cfg = Config::parse(CONFIG, Path::new("ks.toml")).unwrap();
    let rules = rules::load_str(
        "r.nft",
        "table inet raw {\n\tchain pre {\n\t\ttype filter hook prerouting priority raw; policy accept;\n\t\tudp dport 53 notrack\n\t\tct state invalid meta mark set 0x7\n\t}\n}\n\
         table inet f {\n\tchain fwd {\n\t\ttype filter hook forward priority 0; policy drop;\n\t\tct state untracked accept\n\t\tct state new meta mark 0x7 accept\n\t}\n}\n",
    )
    .unwrap();
    let e = Engine::from_config(&cfg, &rules).unwrap();
    // DNS skips conntrack: rules see it untracked, and no entry is made.
    let o = e.process(&udp(CLIENT, SERVER, 5353, 53), LAN, t(0), 0);
    assert_eq!(o.ct_state, Some(ct_state::UNTRACKED as u32));
    assert!(matches!(o.verdict, Verdict::Forward { .. }));
    assert_eq!(e.tracker().count(), 0);
    // Before conntrack, every packet is `ct state invalid` (no conntrack attached yet), so the
    // raw chain's second rule marks it, and the forward chain sees the mark on a NEW packet.
    let o = e.process(&tcp(CLIENT, SERVER, 40000, 443, "S", 1, 0), LAN, t(0), 0);
    assert_eq!(o.ct_state, Some(ct_state::NEW as u32));
    assert!(
        matches!(o.verdict, Verdict::Forward { .. }),
        "{:?}",
        o.verdict
    );
    assert_eq!(e.tracker().count(), 1);
}

/// A configuration in bridge mode builds a bridge wherever it is used: replay and the tests
/// meet the box `keepstate run` runs with it (before, they built a router from it, which
/// has no route between two hosts of one subnet and dropped their packets).
#[test]
fn a_bridge_configuration_pairs_its_ports() {
    let cfg = Config::parse(
        "[[port]]\nname = \"lan\"\n[[port]]\nname = \"wan\"\n[dataplane]\nmode = \"bridge\"\n",
        Path::new("bridge.toml"),
    )
    .unwrap();
    let rules = rules::load_str(
        "bridge.nft",
        "table inet fw {\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy drop;\n\
         \t\tct state established,related accept\n\t\tiifname \"lan\" udp dport 53 accept\n\t}\n}\n",
    )
    .unwrap();
    let e = Engine::from_config(&cfg, &rules).unwrap();
    let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    let now = Timestamp::from_millis(1_000_000);
    let out = e.process(&udp(a, b, 40000, 53), LAN, now, 0);
    assert!(
        matches!(out.verdict, Verdict::Forward { port: WAN, next_hop } if next_hop == IpAddr::from(b)),
        "{:?}",
        out.verdict
    );
    let back = e.process(&udp(b, a, 53, 40000), WAN, now, 0);
    assert!(
        matches!(back.verdict, Verdict::Forward { port: LAN, .. }),
        "{:?}",
        back.verdict
    );
    let other = e.process(&udp(a, b, 40001, 80), LAN, now, 0);
    assert!(
        matches!(other.verdict, Verdict::Drop(_)),
        "{:?}",
        other.verdict
    );
}
