//! UDP, ICMP/ICMPv6 and generic tracking through the public API with a fake clock.

#[path = "common/ctkit.rs"]
#[allow(dead_code)]
mod ctkit;

use ctkit::*;
use keepstate::conntrack::{ct_state, status, Classified, CtInfo, Dir, InvalidReason, ProtoState};

const A: &str = "10.0.0.1";
const B: &str = "192.0.2.53";

fn conn_of(h: &H) -> keepstate::conntrack::ConnRef {
    h.ct.conns().into_iter().next().expect("one connection")
}

#[test]
fn udp_unreplied_then_stream_after_two_seconds() {
    let mut h = H::new();
    let q = udp(A, 5000, B, 53, 20);
    let r = udp(B, 53, A, 5000, 60);
    assert_eq!(info(&h.send(&q)), Some(CtInfo::New));
    let c = conn_of(&h);
    assert_eq!(c.timeout_secs(h.now), 30);
    assert_eq!(c.status() & status::SEEN_REPLY, 0);

    // The first reply: SEEN_REPLY, still 30 s, not ASSURED.
    h.advance_ms(500);
    assert_eq!(info(&h.send(&r)), Some(CtInfo::EstablishedReply));
    assert_eq!(c.timeout_secs(h.now), 30);
    assert_ne!(c.status() & status::SEEN_REPLY, 0);
    assert_eq!(c.status() & status::ASSURED, 0);

    // Within 2 s of creation: still 30 s.
    h.advance_ms(1000);
    assert_eq!(info(&h.send(&q)), Some(CtInfo::Established));
    assert_eq!(c.timeout_secs(h.now), 30);
    assert_eq!(c.status() & status::ASSURED, 0);

    // After 2 s: a stream, 120 s and ASSURED.
    h.advance_ms(600);
    h.send(&r);
    assert_eq!(c.timeout_secs(h.now), 120);
    assert_ne!(c.status() & status::ASSURED, 0);
    let [o, rr] = c.counters();
    assert_eq!((o.packets, rr.packets), (2, 2));
    assert_eq!(o.bytes, 2 * (20 + 8 + 20));
}

#[test]
fn udp_unreplied_expires_after_30s_and_stream_after_120s() {
    let mut h = H::new();
    h.send(&udp(A, 5000, B, 53, 1));
    h.advance(29);
    assert_eq!(h.ct.gc_step(h.now, usize::MAX), 0);
    h.advance(1);
    assert_eq!(h.ct.gc_step(h.now, usize::MAX), 1);

    h.send(&udp(A, 5000, B, 53, 1));
    h.send(&udp(B, 53, A, 5000, 1));
    h.advance(3);
    h.send(&udp(A, 5000, B, 53, 1));
    h.advance(119);
    assert_eq!(h.ct.gc_step(h.now, usize::MAX), 0);
    h.advance(1);
    // Lazy expiry: the lookup meets the dead entry and the packet is NEW again.
    assert_eq!(info(&h.send(&udp(A, 5000, B, 53, 1))), Some(CtInfo::New));
}

#[test]
fn udp_timeouts_configurable() {
    let mut cfg = keepstate::conntrack::CtConfig::default();
    cfg.set("nf_conntrack_udp_timeout", 7).unwrap();
    cfg.set("nf_conntrack_udp_timeout_stream", 77).unwrap();
    let mut h = H::with(cfg);
    h.send(&udp(A, 1, B, 2, 1));
    assert_eq!(conn_of(&h).timeout_secs(h.now), 7);
    h.send(&udp(B, 2, A, 1, 1));
    h.advance(3);
    h.send(&udp(A, 1, B, 2, 1));
    assert_eq!(conn_of(&h).timeout_secs(h.now), 77);
}

#[test]
fn udp_bad_length_and_zero_checksum() {
    let mut h = H::new();
    let mut p = udp(A, 5000, B, 53, 4);
    p[20 + 5] = 200; // length field past the packet
    assert!(matches!(
        h.send(&p),
        Classified::Invalid(InvalidReason::Malformed(_))
    ));
    let mut p = udp(A, 5000, B, 53, 4);
    p[20 + 6] = 0;
    p[20 + 7] = 0; // no checksum: allowed
    assert_eq!(info(&h.send(&p)), Some(CtInfo::New));
    let mut p = udp(A, 5001, B, 53, 4);
    p[20 + 9] ^= 1; // payload changed, checksum now wrong
    assert!(matches!(
        h.send(&p),
        Classified::Invalid(InvalidReason::Checksum(_))
    ));
}

#[test]
fn icmp_echo_tracked_by_id_with_reply_type() {
    let mut h = H::new();
    assert_eq!(info(&h.send(&echo(A, B, 8, 0x42, 1))), Some(CtInfo::New));
    let c = conn_of(&h);
    assert_eq!(c.reply().icmp_type(), 0);
    assert_eq!(c.reply().icmp_id(), 0x42);
    assert_eq!(c.timeout_secs(h.now), 30);
    h.advance(10);
    assert_eq!(
        info(&h.send(&echo(B, A, 0, 0x42, 1))),
        Some(CtInfo::EstablishedReply)
    );
    assert_eq!(c.timeout_secs(h.now), 30);
    assert_ne!(c.status() & status::SEEN_REPLY, 0);
    assert_eq!(c.status() & status::ASSURED, 0);
    // Another id is another connection.
    assert_eq!(info(&h.send(&echo(A, B, 8, 0x43, 1))), Some(CtInfo::New));
    assert_eq!(h.ct.count(), 2);
    h.advance(30);
    h.ct.gc_step(h.now, usize::MAX);
    assert_eq!(h.ct.count(), 0);
}

#[test]
fn unsolicited_echo_reply_and_unknown_types_are_invalid() {
    let mut h = H::new();
    assert!(matches!(
        h.send(&echo(B, A, 0, 1, 1)),
        Classified::Invalid(InvalidReason::IcmpCannotCreate(0))
    ));
    // Router advertisement (9): no reply type.
    assert!(matches!(
        h.send(&icmp(B, A, 9, 0, &[0, 0, 0, 0])),
        Classified::Invalid(InvalidReason::Tuple(_))
    ));
    // Type > 18.
    assert!(matches!(
        h.send(&icmp(B, A, 40, 0, &[0, 0, 0, 0])),
        Classified::Invalid(InvalidReason::IcmpBadType(40))
    ));
    assert_eq!(h.ct.count(), 0);
}

#[test]
fn icmp_errors_for_tracked_connections_are_related() {
    let mut h = H::new();
    let q = udp(A, 5000, B, 53, 10);
    h.send(&q);
    let c = conn_of(&h);
    let before = c.counters();
    let expires = c.expires();
    // The server's port unreachable, quoting our query, sent to us: RELATED_REPLY.
    h.advance(5);
    let e = icmp_error(B, A, 3, 3, &q);
    let r = h.send(&e);
    assert_eq!(info(&r), Some(CtInfo::RelatedReply));
    assert_eq!(r.ct_state(), ct_state::RELATED);
    assert_eq!(r.ct_direction(), Some(Dir::Reply));
    // Not counted, not refreshed.
    assert_eq!(c.counters(), before);
    assert_eq!(c.expires(), expires);
    // A router on the way says TTL exceeded: also related (from any source).
    let e = icmp_error("198.51.100.1", A, 11, 0, &q);
    assert_eq!(info(&h.send(&e)), Some(CtInfo::RelatedReply));
    // An error about the reply direction, sent to the server: RELATED (original).
    let rep = udp(B, 53, A, 5000, 10);
    let e = icmp_error(A, B, 3, 3, &rep);
    assert_eq!(info(&h.send(&e)), Some(CtInfo::Related));
}

#[test]
fn icmp_errors_for_unknown_connections_or_wrong_daddr_are_invalid() {
    let mut h = H::new();
    let q = udp(A, 5000, B, 53, 10);
    let e = icmp_error(B, A, 3, 3, &q);
    assert!(matches!(
        h.send(&e),
        Classified::Invalid(InvalidReason::IcmpErrorNoConn)
    ));
    h.send(&q);
    // Outer destination is not the connection's: "outer daddr != inner".
    let e = icmp_error(B, "10.9.9.9", 3, 3, &q);
    assert!(matches!(
        h.send(&e),
        Classified::Invalid(InvalidReason::IcmpOuterDaddr)
    ));
    let st = h.ct.stats();
    assert_eq!(st[0].error, 2);
}

#[test]
fn icmp_error_about_tcp_and_about_ping() {
    let mut t = Tcp::new();
    t.handshake();
    let seg = tcp(t.c, t.cport, t.s, t.sport, &Seg::new(ACK, 1001, 5001));
    let e = icmp_error("10.0.0.254", t.c, 3, 4, &seg);
    assert_eq!(info(&t.h.send(&e)), Some(CtInfo::RelatedReply));

    let mut h = H::new();
    let p = echo(A, B, 8, 9, 1);
    h.send(&p);
    let e = icmp_error("10.0.0.254", A, 11, 0, &p);
    assert_eq!(info(&h.send(&e)), Some(CtInfo::RelatedReply));
}

#[test]
fn icmpv6_echo_errors_and_neighbour_discovery() {
    let a6 = "2001:db8::1";
    let b6 = "2001:db8::53";
    let mut h = H::new();
    assert_eq!(info(&h.send(&echo(a6, b6, 128, 7, 1))), Some(CtInfo::New));
    assert_eq!(conn_of(&h).reply().icmp_type(), 129);
    assert_eq!(
        info(&h.send(&echo(b6, a6, 129, 7, 1))),
        Some(CtInfo::EstablishedReply)
    );
    // Neighbour solicitation: untracked.
    let ns = icmp(a6, "ff02::1:ff00:53", 135, 0, &[0; 20]);
    let r = h.send(&ns);
    assert!(matches!(r, Classified::Untracked));
    assert_eq!(r.ct_state(), ct_state::UNTRACKED);
    // Packet too big about a UDP flow: RELATED.
    let q = udp(a6, 5000, b6, 53, 10);
    h.send(&q);
    let e = icmp_error(b6, a6, 2, 0, &q);
    assert_eq!(info(&h.send(&e)), Some(CtInfo::RelatedReply));
    let e = icmp_error(b6, a6, 1, 4, &udp(a6, 5001, b6, 53, 10));
    assert!(is_invalid(&h.send(&e)));
    // Unsolicited echo reply.
    assert!(is_invalid(&h.send(&echo(b6, a6, 129, 99, 1))));
}

#[test]
fn generic_protocols_600s_by_protocol_number() {
    let mut h = H::new();
    // GRE (47) with a dummy header.
    let g = ip_packet(A, B, 47, vec![0, 0, 0x08, 0x00], None);
    assert_eq!(info(&h.send(&g)), Some(CtInfo::New));
    let c = conn_of(&h);
    assert_eq!(c.timeout_secs(h.now), 600);
    assert!(matches!(c.proto_state(), ProtoState::Generic));
    let back = ip_packet(B, A, 47, vec![0, 0, 0x08, 0x00], None);
    assert_eq!(info(&h.send(&back)), Some(CtInfo::EstablishedReply));
    // ESP (50) between the same hosts is another connection.
    h.send(&ip_packet(A, B, 50, vec![0; 8], None));
    assert_eq!(h.ct.count(), 2);
    // SCTP keeps its ports in the tuple.
    h.send(&ip_packet(
        A,
        B,
        132,
        vec![0x0b, 0xb8, 0x00, 0x50, 0, 0, 0, 0],
        None,
    ));
    h.send(&ip_packet(
        A,
        B,
        132,
        vec![0x0b, 0xb9, 0x00, 0x50, 0, 0, 0, 0],
        None,
    ));
    assert_eq!(h.ct.count(), 4);
    h.advance(599);
    assert_eq!(h.ct.gc_step(h.now, usize::MAX), 0);
    h.advance(1);
    assert_eq!(h.ct.gc_step(h.now, usize::MAX), 4);
    let mut cfg = keepstate::conntrack::CtConfig::default();
    cfg.set("nf_conntrack_generic_timeout", 5).unwrap();
    cfg.set("nf_conntrack_icmp_timeout", 6).unwrap();
    let mut h = H::with(cfg);
    h.send(&g);
    assert_eq!(conn_of(&h).timeout_secs(h.now), 5);
}

#[test]
fn fragments_are_invalid_without_reassembly() {
    let mut h = H::new();
    let mut p = udp(A, 5000, B, 53, 10);
    p[6] = 0x00;
    p[7] = 0x10; // offset 128 bytes: a non-first fragment
                 // Fix the IPv4 header checksum (not checked by conntrack anyway).
    assert!(matches!(
        h.send(&p),
        Classified::Invalid(InvalidReason::Tuple(_))
    ));
}
