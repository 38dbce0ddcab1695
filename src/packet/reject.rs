//! The answers `reject` sends: ICMP and ICMPv6 "destination unreachable" quoting the refused
//! packet, and TCP resets, as the kernel's `nf_send_unreach`, `nf_send_unreach6` and
//! `nf_send_reset` build them (net/ipv4/netfilter/nf_reject_ipv4.c,
//! net/ipv6/netfilter/nf_reject_ipv6.c).
//!
//! Owns only the bytes of the answer, Ethernet header included (addressed back to the sender);
//! which port it leaves by is the engine's business. Must not know rules or the tracker: the
//! reject kinds arrive as plain codes.

use std::net::IpAddr;

use etherparse::{icmpv4, icmpv6, Icmpv4Type, Icmpv6Type, PacketBuilder};

use super::{Ip, Packet, L4};

/// Maps nft's family-independent `icmpx` codes (`NFT_REJECT_ICMPX_*`) to the ICMP or ICMPv6
/// code the kernel sends (`nft_reject_icmp_code`, `nft_reject_icmpv6_code`).
pub fn icmpx(code: u8, v6: bool) -> Answer {
    match (code, v6) {
        (0, false) => Answer::Icmp(0),  // no-route: net unreachable
        (0, true) => Answer::Icmp6(0),  // no route
        (2, false) => Answer::Icmp(1),  // host unreachable
        (2, true) => Answer::Icmp6(3),  // address unreachable
        (3, false) => Answer::Icmp(13), // administratively prohibited
        (3, true) => Answer::Icmp6(1),
        (_, false) => Answer::Icmp(3), // port unreachable
        (_, true) => Answer::Icmp6(4),
    }
}

/// What to send, in the kernel's own terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// ICMP destination unreachable with this code (IPv4).
    Icmp(u8),
    /// ICMPv6 destination unreachable with this code.
    Icmp6(u8),
    /// A TCP reset.
    TcpReset,
    /// ICMP time exceeded in transit (type 11 code 0) or ICMPv6 hop limit exceeded (type 3
    /// code 0): what `ip_forward` and `ip6_forward` send when the TTL runs out.
    TimeExceeded,
}

/// `ip_default_ttl` / the IPv6 default hop limit the kernel's answers carry.
const TTL: u8 = 64;
/// RFC 1812 4.3.2.3 and `icmp_send`: an ICMPv4 error is at most 576 bytes.
const ICMP4_MAX: usize = 576;
/// RFC 4443 2.4(c): an ICMPv6 error is at most the IPv6 minimum MTU.
const ICMP6_MAX: usize = 1280;

/// The answer frame to `pkt` (which arrived in `frame`), sent from `from` (the box's address
/// on the port the packet came in by, or `None` to answer from the refused packet's
/// destination). `None` when the kernel would send nothing: an answer to an ICMP error, to a
/// non-first fragment, to a broadcast or multicast destination, to a TCP reset, or a TCP reset
/// for a packet that is not TCP.
pub fn answer(
    frame: &[u8],
    pkt: &Packet<'_>,
    kind: Answer,
    from: Option<IpAddr>,
) -> Option<Vec<u8>> {
    if pkt.ip.frag().is_some_and(|f| f.offset != 0) || matches!(pkt.l4, L4::Fragment { .. }) {
        return None;
    }
    let (src_mac, dst_mac) = macs(frame)?;
    let to = pkt.ip.src();
    let refused_dst = pkt.ip.dst();
    if super::is_group(refused_dst) {
        return None;
    }
    let from = from
        .filter(|f| f.is_ipv4() == to.is_ipv4())
        .unwrap_or(refused_dst);
    let eth = PacketBuilder::ethernet2(dst_mac, src_mac);
    let mut out = Vec::new();
    match (kind, &pkt.ip, from, to) {
        (Answer::TcpReset, _, _, _) => {
            let L4::Tcp(t) = pkt.l4 else { return None };
            if t.flags & super::tcp_flags::RST != 0 {
                return None;
            }
            // The reset comes from the refused packet's destination (`nf_reject_ip_tcphdr_put`).
            let syn_fin = u32::from(t.flags & super::tcp_flags::SYN != 0)
                + u32::from(t.flags & super::tcp_flags::FIN != 0);
            let b = match (pkt.ip.dst(), pkt.ip.src()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), TTL),
                (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), TTL),
                _ => return None,
            };
            // RFC 793: answer an ACK with seq = its ack; anything else with ACK set to the
            // segment's end.
            let b = if t.flags & super::tcp_flags::ACK != 0 {
                b.tcp(t.dport, t.sport, t.ack, 0).rst()
            } else {
                let end = t.seq.wrapping_add(t.payload_len).wrapping_add(syn_fin);
                b.tcp(t.dport, t.sport, 0, 0).rst().ack(end)
            };
            b.write(&mut out, &[]).ok()?;
        }
        (Answer::Icmp(_) | Answer::TimeExceeded, Ip::V4(_), IpAddr::V4(s), IpAddr::V4(d)) => {
            if let L4::Icmp(i) = pkt.l4 {
                if super::icmp_is_err(i.icmp_type) {
                    return None;
                }
            }
            let quote_max = ICMP4_MAX - 20 - 8;
            let quote = &pkt.ip_bytes[..pkt.ip_bytes.len().min(quote_max)];
            let ty = match kind {
                Answer::Icmp(code) => Icmpv4Type::DestinationUnreachable(
                    icmpv4::DestUnreachableHeader::from_values(code, 0)?,
                ),
                _ => Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit),
            };
            eth.ipv4(s.octets(), d.octets(), TTL)
                .icmpv4(ty)
                .write(&mut out, quote)
                .ok()?;
        }
        (Answer::Icmp6(_) | Answer::TimeExceeded, Ip::V6(_), IpAddr::V6(s), IpAddr::V6(d)) => {
            if let L4::Icmp6(i) = pkt.l4 {
                if super::icmpv6_is_err(i.icmp_type) {
                    return None;
                }
            }
            let quote_max = ICMP6_MAX - 40 - 8;
            let quote = &pkt.ip_bytes[..pkt.ip_bytes.len().min(quote_max)];
            let ty = match kind {
                Answer::Icmp6(code) => {
                    Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::from_u8(code)?)
                }
                _ => Icmpv6Type::TimeExceeded(icmpv6::TimeExceededCode::HopLimitExceeded),
            };
            eth.ipv6(s.octets(), d.octets(), TTL)
                .icmpv6(ty)
                .write(&mut out, quote)
                .ok()?;
        }
        _ => return None,
    }
    Some(out)
}

/// The Ethernet source and destination of a frame.
fn macs(frame: &[u8]) -> Option<([u8; 6], [u8; 6])> {
    let dst: [u8; 6] = frame.get(0..6)?.try_into().ok()?;
    let src: [u8; 6] = frame.get(6..12)?.try_into().ok()?;
    Some((src, dst))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{checksum, parse_ethernet, tcp_flags, Frame, InnerL4};

    fn parse(f: &[u8]) -> Packet<'_> {
        match parse_ethernet(f) {
            Frame::Ip(p) => p,
            other => panic!("{other:?}"),
        }
    }

    fn syn() -> Vec<u8> {
        let mut f = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([203, 0, 113, 5], [198, 51, 100, 1], 64)
            .tcp(5555, 22, 1000, 64240)
            .syn()
            .write(&mut f, &[])
            .unwrap();
        f
    }

    #[test]
    fn port_unreachable_quotes_the_packet() {
        let f = syn();
        let p = parse(&f);
        let a = answer(
            &f,
            &p,
            Answer::Icmp(3),
            Some("198.51.100.1".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(&a[0..6], &[2, 0, 0, 0, 0, 1], "back to the sender's MAC");
        let r = parse(&a);
        checksum::verify(&r).unwrap();
        assert_eq!(r.ip.dst(), "203.0.113.5".parse::<IpAddr>().unwrap());
        let L4::Icmp(i) = r.l4 else { panic!() };
        assert_eq!((i.icmp_type, i.code), (3, 3));
        let inner = i.inner.unwrap();
        assert!(matches!(
            inner.l4,
            InnerL4::Ports {
                sport: 5555,
                dport: 22
            }
        ));
    }

    #[test]
    fn resets_follow_rfc_793() {
        let f = syn();
        let p = parse(&f);
        let a = answer(&f, &p, Answer::TcpReset, None).unwrap();
        let r = parse(&a);
        checksum::verify(&r).unwrap();
        let L4::Tcp(t) = r.l4 else { panic!() };
        assert_eq!(t.flags, tcp_flags::RST | tcp_flags::ACK);
        assert_eq!((t.seq, t.ack), (0, 1001), "a SYN is acknowledged: seq + 1");
        assert_eq!((t.sport, t.dport), (22, 5555));
        assert_eq!(r.ip.src(), "198.51.100.1".parse::<IpAddr>().unwrap());
        // An ACK is answered with seq = its ack and no ACK.
        let mut g = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv6([0x20; 16], [0x30; 16], 64)
            .tcp(1, 2, 50, 100)
            .ack(777)
            .write(&mut g, b"data")
            .unwrap();
        let q = parse(&g);
        let b = answer(&g, &q, Answer::TcpReset, None).unwrap();
        let r = parse(&b);
        checksum::verify(&r).unwrap();
        let L4::Tcp(t) = r.l4 else { panic!() };
        assert_eq!((t.flags, t.seq), (tcp_flags::RST, 777));
    }

    #[test]
    fn icmpv6_quotes_at_most_1280_bytes() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv6([0x20; 16], [0x30; 16], 64)
            .udp(1, 2)
            .write(&mut f, &[7u8; 1400])
            .unwrap();
        let p = parse(&f);
        let a = answer(&f, &p, Answer::Icmp6(4), None).unwrap();
        let r = parse(&a);
        checksum::verify(&r).unwrap();
        assert_eq!(r.ip_bytes.len(), 1280);
    }

    #[test]
    fn silence_where_the_kernel_is_silent() {
        // No answer to an ICMP error.
        let mut f = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([1, 1, 1, 1], [2, 2, 2, 2], 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                icmpv4::DestUnreachableHeader::Port,
            ))
            .write(
                &mut f,
                &[
                    0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 2, 2, 2, 2, 1, 1, 1, 1,
                ],
            )
            .unwrap();
        let p = parse(&f);
        assert_eq!(answer(&f, &p, Answer::Icmp(3), None), None);
        // No reset for UDP, none to a multicast destination.
        let mut u = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [1, 0, 0x5e, 0, 0, 1])
            .ipv4([1, 1, 1, 1], [224, 0, 0, 1], 1)
            .udp(1, 2)
            .write(&mut u, b"x")
            .unwrap();
        let p = parse(&u);
        assert_eq!(answer(&u, &p, Answer::TcpReset, None), None);
        assert_eq!(answer(&u, &p, Answer::Icmp(3), None), None);
        // Nothing to a truncated frame.
        assert_eq!(answer(&u[..4], &p, Answer::Icmp(3), None), None);
    }
}
