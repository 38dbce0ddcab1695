//! Flowtables through the sans-IO engine, with real frames and a fake clock, as kernel 6.18's
//! software flowtable behaves (nft_flow_offload.c, nf_flow_table_core.c, nf_flow_table_ip.c):
//! `flow add` offloads an established connection; its later packets on a flowtable port are
//! forwarded at ingress (NAT, TTL, counters with `counter`) without a chain; a FIN marks the
//! flow closing and is still forwarded; the flow dies 30 s after its last packet and conntrack
//! takes the connection back (CLOSE for 10 s after a FIN; a UDP stream with 90 s left).

mod common {
    pub mod capture;
    pub mod router;
}

use std::path::Path;

use keepstate::config::Config;
use keepstate::conntrack::flowtable::FlowEvent;
use keepstate::conntrack::show::{self, ShowOpts};
use keepstate::conntrack::{status, ConnRef, TcpState, Timestamp};
use keepstate::engine::{Engine, Outcome, Verdict, Worker};
use keepstate::packet::{checksum, parse_ethernet, Frame, Ip, Packet, L4};
use keepstate::rules;

use common::capture;
use common::router::CONFIG;

const LAN: usize = 0;
const WAN: usize = 1;
const CLIENT: [u8; 4] = [192, 168, 1, 10];
const SERVER: [u8; 4] = [203, 0, 113, 7];
const BOX_WAN: [u8; 4] = [198, 51, 100, 1];

fn engine() -> Engine {
    engine_with("")
}

/// The engine with `extra` appended to the router's configuration.
fn engine_with(extra: &str) -> Engine {
    let cfg = Config::parse(&format!("{CONFIG}{extra}"), Path::new("ks.toml")).unwrap();
    let rules =
        rules::load_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/lab-flowtable.nft"))
            .unwrap();
    Engine::from_config(&cfg, &rules).unwrap()
}

fn t(s: u64) -> Timestamp {
    Timestamp::from_secs(1_000 + s)
}

struct Run {
    e: Engine,
    w: Worker,
}

impl Run {
    fn new() -> Run {
        Run {
            e: engine(),
            w: Worker::new(0),
        }
    }
    fn send(&mut self, port: usize, frame: Vec<u8>, now: Timestamp) -> (Outcome, Vec<FlowEvent>) {
        let o = self.e.process_traced(&frame, port, now, &mut self.w);
        (o, std::mem::take(&mut self.w.flow_events))
    }
    /// The packets and bytes of the forward chain's `counter flow add` rule.
    fn rule_counter(&self) -> u64 {
        let c = self.e.compiled();
        c.counters[4][0].load(std::sync::atomic::Ordering::Relaxed)
    }
    fn conn(&self) -> ConnRef {
        let c = self.e.tracker().conns();
        assert_eq!(c.len(), 1);
        c[0].clone()
    }
}

fn leaves(o: &Outcome) -> Packet<'_> {
    assert!(
        matches!(o.verdict, Verdict::Forward { .. }),
        "{:?}",
        o.verdict
    );
    let Frame::Ip(p) = parse_ethernet(&o.frame) else {
        panic!("the frame that leaves does not parse")
    };
    checksum::verify(&p).expect("checksums verify when recomputed");
    p
}

fn ttl(p: &Packet<'_>) -> u8 {
    match p.ip {
        Ip::V4(v) => v.ttl,
        Ip::V6(v) => v.hop_limit,
    }
}

fn ports(p: &Packet<'_>) -> (u16, u16) {
    match &p.l4 {
        L4::Tcp(t) => (t.sport, t.dport),
        L4::Udp(u) => (u.sport, u.dport),
        _ => panic!("not tcp or udp"),
    }
}

#[test]
fn tcp_connection_is_offloaded_forwarded_at_ingress_and_closed_by_the_gc() {
    let mut r = Run::new();
    let c2s = |flags: &str, seq: u32, ack: u32, data: &[u8]| {
        capture::tcp("lan", CLIENT, SERVER, 40000, 80, flags, seq, ack, data)
    };
    // The handshake goes through the rules; the SYN-ACK needs the masqueraded port.
    let (o, ev) = r.send(LAN, c2s("S", 1000, 0, b""), t(0));
    assert!(ev.is_empty());
    let out = leaves(&o);
    let masq = ports(&out).0;
    assert_eq!(out.ip.src(), std::net::IpAddr::from(BOX_WAN));
    let s2c = |flags: &str, seq: u32, ack: u32, data: &[u8]| {
        capture::tcp("wan", SERVER, BOX_WAN, 80, masq, flags, seq, ack, data)
    };
    let (o, ev) = r.send(WAN, s2c("SA", 5000, 1001, b""), t(0));
    leaves(&o);
    assert!(ev.is_empty(), "SYN_RECV is not established");
    // The third packet makes it ESTABLISHED and ASSURED: the forward chain offloads it.
    let (o, ev) = r.send(LAN, c2s("A", 1001, 5001, b"GET /"), t(1));
    leaves(&o);
    assert!(matches!(ev.as_slice(), [FlowEvent::Offloaded(_)]), "{ev:?}");
    let conn = r.conn();
    assert_ne!(conn.status() & status::OFFLOAD, 0);
    assert_eq!(
        conn.timeout_secs(t(1)),
        86_400,
        "a day, as flow_offload_add sets"
    );
    let line = show::list_line(&conn, t(1), ShowOpts::default());
    assert!(line.contains("[OFFLOAD]"), "{line}");
    let rule_packets = r.rule_counter();
    assert_eq!(rule_packets, 3);
    let counted = conn.counters();

    // Later packets of both directions: forwarded at ingress, NAT and TTL applied, no rule.
    let (o, ev) = r.send(WAN, s2c("A", 5001, 1006, b"HTTP/1.1 200"), t(2));
    assert!(ev.is_empty());
    assert_eq!(
        o.verdict,
        Verdict::Forward {
            port: LAN,
            next_hop: CLIENT.into()
        }
    );
    assert!(o.rules.is_empty(), "no chain saw it: {:?}", o.rules);
    let p = leaves(&o);
    assert_eq!(p.ip.dst(), std::net::IpAddr::from(CLIENT));
    assert_eq!(ports(&p), (80, 40000));
    assert_eq!(ttl(&p), 63);
    let (o, _) = r.send(LAN, c2s("A", 1006, 5013, b""), t(3));
    let p = leaves(&o);
    assert_eq!(p.ip.src(), std::net::IpAddr::from(BOX_WAN));
    assert_eq!(ports(&p), (masq, 80));
    assert_eq!(r.rule_counter(), rule_packets);
    let now = conn.counters();
    assert_eq!(
        now[0].packets,
        counted[0].packets + 1,
        "the flowtable counts (counter)"
    );
    assert_eq!(now[1].packets, counted[1].packets + 1);
    assert_eq!(
        r.e.stats()
            .flowtable_forwarded
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // Conntrack did not see them: still ESTABLISHED, still a day.
    assert_eq!(conn.tcp_state(), Some(TcpState::Established));

    // 6.18: a FIN marks the flow closing and is forwarded by the flowtable all the same.
    let (o, ev) = r.send(LAN, c2s("FA", 1006, 5013, b""), t(4));
    assert!(ev.is_empty());
    assert!(o.rules.is_empty());
    leaves(&o);
    let (o, _) = r.send(WAN, s2c("FA", 5013, 1007, b""), t(4));
    leaves(&o);
    assert!(o.rules.is_empty());
    let flow = r.e.flows().flows().pop().unwrap();
    assert!(flow.is_closing());

    // The gc: nothing before 30 s after the last packet; then the flow goes, the connection
    // is CLOSE with 10 s, and no longer [OFFLOAD].
    assert!(r.e.flow_gc(t(20)).is_empty());
    let gone = r.e.flow_gc(t(35));
    assert_eq!(gone.len(), 1);
    assert_eq!(conn.status() & status::OFFLOAD, 0);
    assert_eq!(conn.tcp_state(), Some(TcpState::Close));
    assert_eq!(conn.timeout_secs(t(35)), 10);
    let line = show::list_line(&conn, t(35), ShowOpts::default());
    assert!(
        line.starts_with("tcp      6 10 CLOSE ") && line.contains("[ASSURED]"),
        "{line}"
    );
    assert!(r.e.flows().is_empty());
    // A late ACK goes through conntrack and the rules again.
    let (o, _) = r.send(LAN, c2s("A", 1007, 5014, b""), t(36));
    assert!(!o.rules.is_empty());
}

#[test]
fn syn_on_a_closing_flow_tears_it_down_at_once() {
    let mut r = Run::new();
    let c2s = |flags: &str, seq: u32, ack: u32| {
        capture::tcp("lan", CLIENT, SERVER, 40001, 80, flags, seq, ack, b"")
    };
    let (o, _) = r.send(LAN, c2s("S", 1, 0), t(0));
    let masq = ports(&leaves(&o)).0;
    let s2c = |flags: &str, seq: u32, ack: u32| {
        capture::tcp("wan", SERVER, BOX_WAN, 80, masq, flags, seq, ack, b"")
    };
    r.send(WAN, s2c("SA", 100, 2), t(0));
    let (_, ev) = r.send(LAN, c2s("A", 2, 101), t(0));
    assert_eq!(ev.len(), 1);
    r.send(LAN, c2s("RA", 2, 101), t(1));
    let (o, ev) = r.send(LAN, c2s("S", 9999, 0), t(2));
    assert!(matches!(ev.as_slice(), [FlowEvent::TornDown(_)]), "{ev:?}");
    assert!(r.e.flows().is_empty(), "out of the flowtable at once");
    // The reopened connection is offloaded again as soon as it is established, long before
    // the gc's next look at the old flow (due 30 s after its last packet).
    let masq = ports(&leaves(&o)).0;
    let s2c = |flags: &str, seq: u32, ack: u32| {
        capture::tcp("wan", SERVER, BOX_WAN, 80, masq, flags, seq, ack, b"")
    };
    r.send(WAN, s2c("SA", 500, 10000), t(2));
    let (_, ev) = r.send(LAN, c2s("A", 10000, 501), t(3));
    assert!(matches!(ev.as_slice(), [FlowEvent::Offloaded(_)]), "{ev:?}");
    let conn = r.conn();
    assert_ne!(conn.status() & status::OFFLOAD, 0);
    assert!(
        r.e.flow_gc(t(33)).len() == 1,
        "the new flow expires in its turn"
    );
    assert!(r.e.flows().is_empty());
}

#[test]
fn a_killed_connection_loses_its_flow_at_the_next_gc_pass() {
    use keepstate::conntrack::flowtable::GC_SLICES;
    let mut r = Run::new();
    let up = || capture::udp("lan", CLIENT, SERVER, 5353, 53, b"q");
    r.send(LAN, up(), t(0));
    let (_, ev) = r.send(LAN, up(), t(1));
    assert!(matches!(ev.as_slice(), [FlowEvent::Offloaded(_)]), "{ev:?}");
    // The gc does not look at the flow before it is due (31 s)...
    let mut gone = Vec::new();
    for _ in 0..GC_SLICES {
        gone.extend(r.e.flow_gc_step(t(2), &|_| {}));
    }
    assert!(gone.is_empty());
    // ...but `conntrack -D` of its connection is seen by the next pass.
    let conn = r.conn();
    assert!(r.e.tracker().kill(&conn));
    for _ in 0..GC_SLICES {
        gone.extend(r.e.flow_gc_step(t(3), &|_| {}));
    }
    assert_eq!(gone.len(), 1);
    assert!(std::sync::Arc::ptr_eq(&gone[0].conn, &conn));
    assert!(r.e.flows().is_empty());
}

#[test]
fn udp_flow_expires_back_to_conntrack_with_the_stream_timeout_less_the_flows() {
    let mut r = Run::new();
    let up = || capture::udp("lan", CLIENT, SERVER, 5353, 53, b"query");
    let (o, ev) = r.send(LAN, up(), t(0));
    let masq = ports(&leaves(&o)).0;
    assert!(
        ev.is_empty(),
        "the first packet's connection is not confirmed yet"
    );
    let down = || capture::udp("wan", SERVER, BOX_WAN, 53, masq, b"answer");
    let (o, ev) = r.send(WAN, down(), t(1));
    leaves(&o);
    assert!(matches!(ev.as_slice(), [FlowEvent::Offloaded(_)]), "{ev:?}");
    for s in 2..5 {
        let (o, _) = r.send(LAN, up(), t(s));
        assert!(o.rules.is_empty());
        assert_eq!(ports(&leaves(&o)).0, masq);
    }
    let conn = r.conn();
    let line = show::list_line(&conn, t(5), ShowOpts::default());
    assert!(line.contains("[OFFLOAD]"), "{line}");
    // flow_offload_refresh moves the timeout only when it gains more than a second: the
    // packets at 2 and 4 s left it (1 s gained), the one at 3 s moved it to 33 s.
    assert!(r.e.flow_gc(t(32)).is_empty());
    assert_eq!(r.e.flow_gc(t(33)).len(), 1);
    assert_eq!(
        conn.timeout_secs(t(33)),
        90,
        "udp_timeout_stream 120 - the flow's 30"
    );
    assert_eq!(conn.status() & status::OFFLOAD, 0);
}

/// `nf_flowtable_udp_timeout` and `nf_flowtable_tcp_timeout` set how long a flow lives
/// after its last packet, and what the connection gets back when it expires.
#[test]
fn the_flowtable_timeouts_come_from_their_sysctls() {
    let mut r = Run::new();
    r.e = engine_with(
        "\n[conntrack]\nnf_flowtable_udp_timeout = 5\nnf_flowtable_tcp_timeout = 300\n",
    );
    let _handshake = offloaded_tcp(&mut r, 40099);
    let up = || capture::udp("lan", CLIENT, SERVER, 5353, 53, b"query");
    let (o, _) = r.send(LAN, up(), t(0));
    let masq = ports(&leaves(&o)).0;
    let down = || capture::udp("wan", SERVER, BOX_WAN, 53, masq, b"answer");
    let (_, ev) = r.send(WAN, down(), t(1));
    assert!(matches!(ev.as_slice(), [FlowEvent::Offloaded(_)]), "{ev:?}");
    let udp = r.e.flows().flows();
    let udp = udp.iter().find(|f| f.dirs[0].tuple.proto == 17).unwrap();
    let conn = udp.conn.clone();
    // A packet at 3 s moves its timeout to 8 s.
    let (o, _) = r.send(LAN, up(), t(3));
    assert!(o.rules.is_empty(), "forwarded by the flowtable");
    assert!(r.e.flow_gc(t(7)).is_empty());
    let gone = r.e.flow_gc(t(8));
    assert_eq!(gone.len(), 1, "the UDP flow, 5 s after its last packet");
    assert!(std::sync::Arc::ptr_eq(&gone[0].conn, &conn));
    assert_eq!(
        conn.timeout_secs(t(8)),
        115,
        "udp_timeout_stream 120 - the flow's 5"
    );
    assert!(r.e.flow_gc(t(299)).is_empty(), "the TCP flow lives 300 s");
    assert_eq!(r.e.flow_gc(t(300)).len(), 1);
}

/// The TCP handshake of a connection from the client's `sport`, offloaded by its third
/// packet at `t(0)`; `(c2s, s2c)` frame makers for its later segments.
#[allow(clippy::type_complexity)]
fn offloaded_tcp(
    r: &mut Run,
    sport: u16,
) -> (
    impl Fn(&str, u32, u32) -> Vec<u8>,
    impl Fn(&str, u32, u32) -> Vec<u8>,
) {
    let c2s = move |flags: &str, seq: u32, ack: u32| {
        capture::tcp("lan", CLIENT, SERVER, sport, 80, flags, seq, ack, b"")
    };
    let (o, _) = r.send(LAN, c2s("S", 1, 0), t(0));
    let masq = ports(&leaves(&o)).0;
    let s2c = move |flags: &str, seq: u32, ack: u32| {
        capture::tcp("wan", SERVER, BOX_WAN, 80, masq, flags, seq, ack, b"")
    };
    r.send(WAN, s2c("SA", 100, 2), t(0));
    let (_, ev) = r.send(LAN, c2s("A", 2, 101), t(0));
    assert!(matches!(ev.as_slice(), [FlowEvent::Offloaded(_)]), "{ev:?}");
    (c2s, s2c)
}

/// A dataplane that mirrors the flows (the XDP fast path) and has not taken one (the flow's
/// slot is unset: its maps were full) is asked again whenever a packet the engine forwards
/// moves the flow's timeout, at most once a second, as `flow_offload_refresh` retries a
/// hardware offload; not once the dataplane has it, not for a closing flow, and never
/// without a dataplane that mirrors.
#[test]
fn a_flow_the_fast_path_refused_is_offered_again_at_its_refresh() {
    use keepstate::conntrack::flowtable::NO_SLOT;
    use std::sync::atomic::Ordering::Relaxed;
    // Without a mirroring dataplane: no event, however long.
    let mut r = Run::new();
    let (c2s, _) = offloaded_tcp(&mut r, 40100);
    let (o, ev) = r.send(LAN, c2s("A", 2, 101), t(5));
    leaves(&o);
    assert!(ev.is_empty(), "{ev:?}");

    let mut r = Run::new();
    r.e.flows().set_mirrored();
    let (c2s, s2c) = offloaded_tcp(&mut r, 40101);
    let flow = r.e.flows().flows().pop().unwrap();
    assert_eq!(flow.slot.load(Relaxed), NO_SLOT, "the dataplane refused it");
    // Within the second the offload set the timeout: not moved, not asked.
    let (o, ev) = r.send(WAN, s2c("A", 101, 2), t(0));
    leaves(&o);
    assert!(ev.is_empty(), "{ev:?}");
    // Two seconds on: the timeout moves, the dataplane is asked for the same flow.
    let (o, ev) = r.send(LAN, c2s("A", 2, 101), t(2));
    leaves(&o);
    match ev.as_slice() {
        [FlowEvent::Offloaded(f)] => assert!(std::sync::Arc::ptr_eq(f, &flow)),
        other => panic!("{other:?}"),
    }
    // Within a second of that: not again.
    let (_, ev) = r.send(WAN, s2c("A", 101, 2), t(2));
    assert!(ev.is_empty(), "{ev:?}");
    // Taken: not asked any more.
    flow.slot.store(7, Relaxed);
    let (_, ev) = r.send(LAN, c2s("A", 2, 101), t(4));
    assert!(ev.is_empty(), "{ev:?}");
    // Refused again (as after a growth lost it), then closing: not asked.
    flow.slot.store(NO_SLOT, Relaxed);
    let (o, ev) = r.send(LAN, c2s("FA", 2, 101), t(6));
    leaves(&o);
    assert!(flow.is_closing());
    assert!(ev.is_empty(), "a FIN's refresh: {ev:?}");
    let (_, ev) = r.send(WAN, s2c("A", 101, 3), t(8));
    assert!(ev.is_empty(), "closing: {ev:?}");
}

#[test]
fn a_reload_without_the_flowtable_sends_its_flows_back() {
    let mut r = Run::new();
    let up = || capture::udp("lan", CLIENT, SERVER, 5353, 53, b"q");
    r.send(LAN, up(), t(0));
    let (_, ev) = r.send(LAN, up(), t(1));
    assert_eq!(
        ev.len(),
        1,
        "UDP needs no reply to be offloaded, only a confirmed entry"
    );
    let plain = rules::load_str(
        "plain.nft",
        "table inet filter {\n\tchain forward {\n\t\ttype filter hook forward priority 0; policy accept;\n\t}\n}\n",
    )
    .unwrap();
    r.e.reload(keepstate::engine::Compiled::new(&plain).unwrap());
    let fast = |e: &Engine| {
        e.stats()
            .flowtable_forwarded
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = fast(&r.e);
    r.send(LAN, up(), t(2));
    assert_eq!(fast(&r.e), before, "no flowtable forwards any more");
    assert_eq!(r.e.flow_gc(t(2)).len(), 1);
    assert!(r.e.flows().is_empty());
}

#[test]
fn a_fast_path_keeps_its_flows_alive_by_telling_the_gc_in_steps() {
    kept_alive_by_a_fast_path(10, 470);
}

/// A fast path that does not count (for a flowtable without `counter`) tells only of the last
/// packet's time: the flow lives on all the same.
#[test]
fn a_fast_path_that_does_not_count_keeps_its_flows_alive() {
    kept_alive_by_a_fast_path(0, 0);
}

/// A fast path forwards a flow's packets, `packets` and `bytes` as it counts them, and tells
/// the gc when it asks.
fn kept_alive_by_a_fast_path(packets: u64, bytes: u64) {
    use keepstate::conntrack::flowtable::GC_SLICES;
    use keepstate::conntrack::Dir;
    let mut r = Run::new();
    let up = || capture::udp("lan", CLIENT, SERVER, 5353, 53, b"query");
    let (o, _) = r.send(LAN, up(), t(0));
    let masq = ports(&leaves(&o)).0;
    let down = capture::udp("wan", SERVER, BOX_WAN, 53, masq, b"answer");
    let (_, ev) = r.send(WAN, down, t(1));
    assert!(matches!(ev.as_slice(), [FlowEvent::Offloaded(_)]), "{ev:?}");
    let conn = r.conn();
    // Its packets from then on never reach the engine: a fast path forwarded 10 of them, the
    // last at 40 s, and says so only when the gc asks about the flow, due at 31 s.
    let asked = std::sync::atomic::AtomicUsize::new(0);
    let xdp = |flow: &keepstate::conntrack::flowtable::FlowRef| {
        asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        r.e.flow_account(flow, Dir::Original, packets, bytes, t(40));
    };
    let mut gone = Vec::new();
    for _ in 0..GC_SLICES {
        gone.extend(r.e.flow_gc_step(t(20), &xdp));
    }
    assert!(gone.is_empty());
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "not due yet"
    );
    // One pass of the slices at 41 s: asked once, alive until 70 s, counters counted.
    for _ in 0..GC_SLICES {
        gone.extend(r.e.flow_gc_step(t(41), &xdp));
    }
    assert!(gone.is_empty());
    assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 1);
    let line = show::list_line(&conn, t(41), ShowOpts::default());
    assert!(line.contains("[OFFLOAD]"), "{line}");
    // Nothing forwarded since: the pass at 71 s lets it expire.
    for _ in 0..GC_SLICES {
        gone.extend(r.e.flow_gc_step(t(71), &|_| {}));
    }
    assert_eq!(gone.len(), 1);
    assert_eq!(conn.status() & status::OFFLOAD, 0);
}
