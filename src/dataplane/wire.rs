//! The box's own link layer and stack, as bytes: Ethernet rewriting, ARP (RFC 826), IPv6
//! neighbour discovery (RFC 4861, solicitations and advertisements only) and ICMP/ICMPv6
//! echo replies. Pure functions over frames, so the worker loop stays short and every
//! answer is tested here with fixed bytes.
//!
//! Owns only bytes. Must not know sockets, the engine or the neighbour cache. Every length
//! is checked before a slice is taken: a short or odd frame gives `None`, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub type Mac = [u8; 6];

pub const ETH_HLEN: usize = 14;
/// `ETH_P_IP`, `ETH_P_ARP`, `ETH_P_IPV6`.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const BROADCAST: Mac = [0xff; 6];
/// The shortest Ethernet frame without its FCS (`ETH_ZLEN`): shorter ones are padded.
const ETH_ZLEN: usize = 60;

/// ARP opcodes (`ARPOP_REQUEST`, `ARPOP_REPLY`).
pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;
/// ICMPv6 types (RFC 4443, RFC 4861).
pub const ICMP6_ECHO_REQUEST: u8 = 128;
pub const ICMP6_ECHO_REPLY: u8 = 129;
pub const ND_NEIGHBOR_SOLICIT: u8 = 135;
pub const ND_NEIGHBOR_ADVERT: u8 = 136;
/// ND option types: source and target link-layer address.
const ND_OPT_SOURCE_LL: u8 = 1;
const ND_OPT_TARGET_LL: u8 = 2;
/// `IPPROTO_ICMP`, `IPPROTO_ICMPV6`.
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
/// The TTL / hop limit of what the box sends itself (`ip_default_ttl`).
const TTL: u8 = 64;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn mac_at(b: &[u8], at: usize) -> Option<Mac> {
    b.get(at..at + 6)?.try_into().ok()
}

fn v4_at(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let o: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(o))
}

fn v6_at(b: &[u8], at: usize) -> Option<Ipv6Addr> {
    let o: [u8; 16] = b.get(at..at + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(o))
}

/// The frame's EtherType (no VLAN tags: the engine does not take tagged frames either).
pub fn ethertype(frame: &[u8]) -> Option<u16> {
    be16(frame, 12)
}

pub fn dst_mac(frame: &[u8]) -> Option<Mac> {
    mac_at(frame, 0)
}

pub fn src_mac(frame: &[u8]) -> Option<Mac> {
    mac_at(frame, 6)
}

/// Addresses a frame from `src` to `dst`: the router's L2 rewrite of a forwarded frame.
pub fn set_macs(frame: &mut [u8], dst: Mac, src: Mac) -> bool {
    match frame.get_mut(0..12) {
        Some(h) => {
            h[..6].copy_from_slice(&dst);
            h[6..].copy_from_slice(&src);
            true
        }
        None => false,
    }
}

fn eth_header(out: &mut Vec<u8>, dst: Mac, src: Mac, ethertype: u16) {
    out.clear();
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    out.extend_from_slice(&ethertype.to_be_bytes());
}

fn pad(out: &mut Vec<u8>) {
    if out.len() < ETH_ZLEN {
        out.resize(ETH_ZLEN, 0);
    }
}

/// An ARP packet for IPv4 over Ethernet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sender_mac: Mac,
    pub sender_ip: Ipv4Addr,
    pub target_ip: Ipv4Addr,
}

/// Parses an ARP frame (Ethernet, IPv4, the lengths RFC 826 gives them).
pub fn parse_arp(frame: &[u8]) -> Option<Arp> {
    if ethertype(frame)? != ETHERTYPE_ARP {
        return None;
    }
    let a = frame.get(ETH_HLEN..ETH_HLEN + 28)?;
    if be16(a, 0)? != 1 || be16(a, 2)? != ETHERTYPE_IPV4 || a[4] != 6 || a[5] != 4 {
        return None;
    }
    Some(Arp {
        op: be16(a, 6)?,
        sender_mac: mac_at(a, 8)?,
        sender_ip: v4_at(a, 14)?,
        target_ip: v4_at(a, 24)?,
    })
}

/// Writes an ARP frame into `out`: a request (`target_mac` unknown: broadcast) or a reply.
pub fn arp(
    out: &mut Vec<u8>,
    op: u16,
    mac: Mac,
    ip: Ipv4Addr,
    target_mac: Option<Mac>,
    target_ip: Ipv4Addr,
) {
    eth_header(out, target_mac.unwrap_or(BROADCAST), mac, ETHERTYPE_ARP);
    out.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    out.extend_from_slice(&op.to_be_bytes());
    out.extend_from_slice(&mac);
    out.extend_from_slice(&ip.octets());
    out.extend_from_slice(&target_mac.unwrap_or([0; 6]));
    out.extend_from_slice(&target_ip.octets());
    pad(out);
}

/// The Internet checksum (RFC 1071) of `data`, folded, starting from `sum`.
pub(super) fn checksum(mut sum: u32, data: &[u8]) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn icmp6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, body: &[u8]) -> u16 {
    let mut sum = 0u32;
    for a in [src, dst] {
        for w in a.segments() {
            sum += u32::from(w);
        }
    }
    sum += body.len() as u32 + u32::from(PROTO_ICMPV6);
    checksum(sum, body)
}

/// Turns an ICMP echo request to `ours` in place into the box's echo reply (as
/// `icmp_echo`): addresses and MACs swapped, a fresh TTL, both checksums recomputed.
/// `false` (frame untouched) for anything else: the box has no other local service.
pub fn echo_reply_v4(frame: &mut [u8], ours: impl Fn(IpAddr) -> bool) -> bool {
    let Some(ip) = frame.get(ETH_HLEN..) else {
        return false;
    };
    if ethertype(frame) != Some(ETHERTYPE_IPV4) || ip.len() < 20 || ip[0] >> 4 != 4 {
        return false;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
    if ihl < 20 || total < ihl + 8 || total > ip.len() || frag != 0 || ip[9] != PROTO_ICMP {
        return false;
    }
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    if ip[ihl] != 8 || !ours(IpAddr::V4(dst)) {
        return false;
    }
    swap_macs(frame);
    let ip = &mut frame[ETH_HLEN..ETH_HLEN + total];
    let (s, d) = ip[12..20].split_at_mut(4);
    s.swap_with_slice(d);
    ip[8] = TTL;
    ip[10..12].fill(0);
    let c = checksum(0, &ip[..ihl]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let icmp = &mut ip[ihl..];
    icmp[0] = 0;
    icmp[2..4].fill(0);
    let c = checksum(0, icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    true
}

fn swap_macs(frame: &mut [u8]) {
    let (d, s) = frame[..12].split_at_mut(6);
    d.swap_with_slice(s);
}

/// An IPv6 packet whose next header is ICMPv6 (no extension headers): the offsets of its
/// ICMPv6 part in the frame, and its addresses.
struct Icmp6 {
    start: usize,
    end: usize,
    hop_limit: u8,
    src: Ipv6Addr,
    dst: Ipv6Addr,
}

fn icmp6(frame: &[u8]) -> Option<Icmp6> {
    if ethertype(frame)? != ETHERTYPE_IPV6 {
        return None;
    }
    let ip = frame.get(ETH_HLEN..ETH_HLEN + 40)?;
    if ip[0] >> 4 != 6 || ip[6] != PROTO_ICMPV6 {
        return None;
    }
    let start = ETH_HLEN + 40;
    let end = start + usize::from(be16(ip, 4)?);
    if end > frame.len() || end < start + 8 {
        return None;
    }
    Some(Icmp6 {
        start,
        end,
        hop_limit: ip[7],
        src: v6_at(ip, 8)?,
        dst: v6_at(ip, 24)?,
    })
}

/// The ICMPv6 type of an IPv6 frame carrying ICMPv6 right after its header.
pub fn icmp6_type(frame: &[u8]) -> Option<u8> {
    icmp6(frame).map(|i| frame[i.start])
}

/// The ICMPv6 echo reply, in place, to an echo request to one of `ours`.
pub fn echo_reply_v6(frame: &mut [u8], ours: impl Fn(IpAddr) -> bool) -> bool {
    let Some(i) = icmp6(frame) else { return false };
    if frame[i.start] != ICMP6_ECHO_REQUEST || !ours(IpAddr::V6(i.dst)) {
        return false;
    }
    swap_macs(frame);
    let ip = &mut frame[ETH_HLEN..];
    let (s, d) = ip[8..40].split_at_mut(16);
    s.swap_with_slice(d);
    ip[7] = TTL;
    let body = &mut frame[i.start..i.end];
    body[0] = ICMP6_ECHO_REPLY;
    body[2..4].fill(0);
    let c = icmp6_checksum(&i.dst, &i.src, body);
    body[2..4].copy_from_slice(&c.to_be_bytes());
    true
}

/// A neighbour solicitation or advertisement, checked as RFC 4861 7.1.1/7.1.2 asks (hop
/// limit 255, code 0, at least 24 bytes), with the link-layer address its option carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nd {
    pub icmp_type: u8,
    pub src: Ipv6Addr,
    pub target: Ipv6Addr,
    /// Source link-layer option of a solicitation, target link-layer option of an
    /// advertisement.
    pub lladdr: Option<Mac>,
}

pub fn parse_nd(frame: &[u8]) -> Option<Nd> {
    let i = icmp6(frame)?;
    let body = &frame[i.start..i.end];
    let ty = body[0];
    if !(ty == ND_NEIGHBOR_SOLICIT || ty == ND_NEIGHBOR_ADVERT)
        || body[1] != 0
        || i.hop_limit != 255
        || body.len() < 24
    {
        return None;
    }
    let want = if ty == ND_NEIGHBOR_SOLICIT {
        ND_OPT_SOURCE_LL
    } else {
        ND_OPT_TARGET_LL
    };
    let mut lladdr = None;
    let mut opts = &body[24..];
    while opts.len() >= 8 {
        let len = usize::from(opts[1]) * 8;
        if len == 0 || len > opts.len() {
            break;
        }
        if opts[0] == want && len >= 8 {
            lladdr = mac_at(opts, 2);
        }
        opts = &opts[len..];
    }
    Some(Nd {
        icmp_type: ty,
        src: i.src,
        target: v6_at(body, 8)?,
        lladdr,
    })
}

/// The solicited-node multicast address of `a` (RFC 4291 2.7.1) and its MAC (RFC 2464 7).
pub fn solicited_node(a: &Ipv6Addr) -> (Ipv6Addr, Mac) {
    let o = a.octets();
    let ip = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    );
    (ip, [0x33, 0x33, 0xff, o[13], o[14], o[15]])
}

/// Writes a neighbour solicitation for `target` (to its solicited-node group) or an
/// advertisement of `target` as ours (to `to`, with the solicited and override flags, and
/// the router flag when `router`).
#[allow(clippy::too_many_arguments)]
pub fn nd(
    out: &mut Vec<u8>,
    icmp_type: u8,
    mac: Mac,
    src: Ipv6Addr,
    to: Option<(Ipv6Addr, Mac)>,
    target: Ipv6Addr,
    router: bool,
) {
    let (dst, dst_mac) = to.unwrap_or_else(|| solicited_node(&target));
    eth_header(out, dst_mac, mac, ETHERTYPE_IPV6);
    // IPv6 header: version 6, payload 32 (24 + one 8-byte option), ICMPv6, hop limit 255.
    out.extend_from_slice(&[0x60, 0, 0, 0, 0, 32, PROTO_ICMPV6, 255]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    let start = out.len();
    let (flags, opt) = if icmp_type == ND_NEIGHBOR_ADVERT {
        // Solicited when answering a unicast sender; Override: it is our own address.
        let s = if to.is_some_and(|(d, _)| !d.is_multicast()) {
            0x40
        } else {
            0
        };
        ((if router { 0x80 } else { 0 }) | s | 0x20, ND_OPT_TARGET_LL)
    } else {
        (0, ND_OPT_SOURCE_LL)
    };
    out.extend_from_slice(&[icmp_type, 0, 0, 0, flags, 0, 0, 0]);
    out.extend_from_slice(&target.octets());
    out.extend_from_slice(&[opt, 1]);
    out.extend_from_slice(&mac);
    let c = icmp6_checksum(&src, &dst, &out[start..]);
    out[start + 2..start + 4].copy_from_slice(&c.to_be_bytes());
}

/// The all-nodes group an advertisement answering the unspecified address goes to
/// (RFC 4861 7.2.4).
pub fn all_nodes() -> (Ipv6Addr, Mac) {
    (
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
        [0x33, 0x33, 0, 0, 0, 1],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUR_MAC: Mac = [2, 0, 0, 0, 0, 1];
    const HOST_MAC: Mac = [2, 0, 0, 0, 0, 2];

    #[test]
    fn checksum_of_rfc_1071() {
        // RFC 1071, 3: the words sum to 0x2ddf0, folded 0xddf2; the checksum is its complement.
        let b = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(0, &b), !0xddf2);
        // An odd last byte is the high half of a word padded with zero.
        assert_eq!(
            checksum(0, &b[..7]),
            checksum(0, &[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0x00])
        );
        // A starting sum is carried in, and a message holding its own checksum sums to zero.
        assert_eq!(checksum(0x0001, &b[2..]), checksum(0, &b));
        let mut with = b.to_vec();
        with.extend_from_slice(&checksum(0, &b).to_be_bytes());
        assert_eq!(checksum(0, &with), 0);
    }

    #[test]
    fn arp_request_and_reply_round_trip() {
        let mut f = Vec::new();
        let (us, host) = (
            Ipv4Addr::new(192, 168, 1, 1),
            Ipv4Addr::new(192, 168, 1, 10),
        );
        arp(&mut f, ARP_REQUEST, HOST_MAC, host, None, us);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[..6], &BROADCAST);
        let a = parse_arp(&f).unwrap();
        assert_eq!(
            a,
            Arp {
                op: ARP_REQUEST,
                sender_mac: HOST_MAC,
                sender_ip: host,
                target_ip: us
            }
        );
        arp(
            &mut f,
            ARP_REPLY,
            OUR_MAC,
            us,
            Some(a.sender_mac),
            a.sender_ip,
        );
        assert_eq!(&f[..6], &HOST_MAC);
        let r = parse_arp(&f).unwrap();
        assert_eq!((r.op, r.sender_mac, r.sender_ip), (ARP_REPLY, OUR_MAC, us));
        // Truncated or of another hardware type: not ARP for us.
        assert_eq!(parse_arp(&f[..30]), None);
        f[15] = 6;
        assert_eq!(parse_arp(&f), None);
    }

    fn ping_v4() -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2(HOST_MAC, OUR_MAC)
            .ipv4([192, 168, 1, 10], [192, 168, 1, 1], 63)
            .icmpv4_echo_request(7, 1);
        let mut f = Vec::new();
        b.write(&mut f, b"abcdefgh").unwrap();
        f
    }

    #[test]
    fn echo_reply_v4_is_valid() {
        let ours = |a: IpAddr| a == IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1));
        let mut f = ping_v4();
        assert!(echo_reply_v4(&mut f, ours));
        let p = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            panic!()
        };
        assert_eq!(ip.header().source(), [192, 168, 1, 1]);
        assert_eq!(ip.header().destination(), [192, 168, 1, 10]);
        assert_eq!(ip.header().ttl(), 64);
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        let Some(etherparse::TransportSlice::Icmpv4(icmp)) = p.transport else {
            panic!()
        };
        assert_eq!(
            icmp.icmp_type(),
            etherparse::Icmpv4Type::EchoReply(etherparse::IcmpEchoHeader { id: 7, seq: 1 })
        );
        assert_eq!(
            icmp.checksum(),
            icmp.icmp_type().calc_checksum(icmp.payload())
        );
        assert_eq!(&f[..6], &HOST_MAC);
        // Not to us, or cut short: left alone.
        let mut f = ping_v4();
        assert!(!echo_reply_v4(&mut f, |a| a == IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
        assert_eq!(f, ping_v4());
        let mut short = ping_v4();
        short.truncate(40);
        assert!(!echo_reply_v4(&mut short, ours));
    }

    #[test]
    fn echo_reply_v6_is_valid() {
        let us: Ipv6Addr = "fd00:1::1".parse().unwrap();
        let host: Ipv6Addr = "fd00:1::10".parse().unwrap();
        let b = etherparse::PacketBuilder::ethernet2(HOST_MAC, OUR_MAC)
            .ipv6(host.octets(), us.octets(), 64)
            .icmpv6_echo_request(9, 2);
        let mut f = Vec::new();
        b.write(&mut f, b"xyz").unwrap();
        assert_eq!(icmp6_type(&f), Some(ICMP6_ECHO_REQUEST));
        assert!(echo_reply_v6(&mut f, |a| a == IpAddr::V6(us)));
        let p = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::NetSlice::Ipv6(ip)) = p.net else {
            panic!()
        };
        assert_eq!(ip.header().source_addr(), us);
        let Some(etherparse::TransportSlice::Icmpv6(icmp)) = p.transport else {
            panic!()
        };
        let want = icmp
            .icmp_type()
            .calc_checksum(us.octets(), host.octets(), icmp.payload())
            .unwrap();
        assert_eq!(icmp.checksum(), want);
    }

    #[test]
    fn neighbour_solicitation_and_advertisement() {
        let us: Ipv6Addr = "fd00:1::1".parse().unwrap();
        let host: Ipv6Addr = "fd00:1::10".parse().unwrap();
        let mut f = Vec::new();
        nd(&mut f, ND_NEIGHBOR_SOLICIT, HOST_MAC, host, None, us, false);
        assert_eq!(&f[..6], &[0x33, 0x33, 0xff, 0, 0, 1]);
        let n = parse_nd(&f).unwrap();
        assert_eq!(
            n,
            Nd {
                icmp_type: ND_NEIGHBOR_SOLICIT,
                src: host,
                target: us,
                lladdr: Some(HOST_MAC)
            }
        );
        // etherparse agrees on the checksum.
        {
            let p = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
            let Some(etherparse::TransportSlice::Icmpv6(icmp)) = p.transport else {
                panic!()
            };
            let (sn, _) = solicited_node(&us);
            let want = icmp
                .icmp_type()
                .calc_checksum(host.octets(), sn.octets(), icmp.payload())
                .unwrap();
            assert_eq!(icmp.checksum(), want);
        }
        nd(
            &mut f,
            ND_NEIGHBOR_ADVERT,
            OUR_MAC,
            us,
            Some((host, HOST_MAC)),
            us,
            true,
        );
        let a = parse_nd(&f).unwrap();
        assert_eq!(
            (a.icmp_type, a.target, a.lladdr),
            (ND_NEIGHBOR_ADVERT, us, Some(OUR_MAC))
        );
        assert_eq!(f[ETH_HLEN + 40 + 4], 0x80 | 0x40 | 0x20);
        // A hop limit below 255 came from off-link: ignored (RFC 4861 7.1.1).
        f[ETH_HLEN + 7] = 254;
        assert_eq!(parse_nd(&f), None);
    }

    #[test]
    fn nothing_panics_on_short_frames() {
        let ours = |a: IpAddr| a == IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1));
        let f = ping_v4();
        for n in 0..f.len() {
            let mut g = f[..n].to_vec();
            let _ = echo_reply_v4(&mut g, ours);
            let _ = echo_reply_v6(&mut g, ours);
            let _ = parse_arp(&g);
            let _ = parse_nd(&g);
            let _ = set_macs(&mut g, OUR_MAC, HOST_MAC);
        }
    }
}
