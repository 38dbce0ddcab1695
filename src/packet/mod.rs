//! Frames parsed into a flow view: Ethernet (+ up to two VLAN tags), IPv4 or IPv6 (extension
//! headers walked to the transport header), then TCP, UDP, ICMP, ICMPv6 or a generic protocol.
//!
//! Owns the one place where untrusted bytes are bounds-checked ("parse, then trust", as in
//! smoltcp's Packet/Repr split): [`parse_ethernet`] and [`parse_ip`] check every length once,
//! with etherparse's header slices, and return a [`Frame`]; after that every field of a
//! [`Packet`] is a plain value and no accessor can panic. A malformed frame is a value
//! ([`Frame::Invalid`]), never a panic; a packet whose IP layer is sound but whose transport
//! header is not keeps its IP fields and carries [`L4::Malformed`], because the kernel still
//! runs such a packet through the hooks (conntrack then calls it INVALID).
//!
//! Fragments are described ([`FragInfo`]) but not reassembled here; a non-first fragment has
//! no transport header ([`L4::Fragment`]). Checksums are verified on request by [`checksum`].
//!
//! [`frag`] owns reassembly, as `nf_defrag_ipv4`/`nf_defrag_ipv6` do before conntrack: it
//! holds fragment queues under a memory bound and timeouts, drops overlapping or malformed
//! fragments with their datagram, and hands back one reassembled packet to judge plus the
//! original frames to forward. It takes time as an argument, like everything here.
//!
//! Must not know rules, the tracker or time; depends on nothing else of ours.

pub mod checksum;
pub mod frag;
pub mod log;
pub mod reject;
pub mod rewrite;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    Ethernet2HeaderSlice, IpAuthHeaderSlice, Ipv4HeaderSlice, Ipv6FragmentHeaderSlice,
    Ipv6HeaderSlice, Ipv6RawExtHeaderSlice, SingleVlanHeaderSlice, TcpHeaderSlice, UdpHeaderSlice,
};

/// `ETH_P_IP`.
pub const ETH_P_IP: u16 = 0x0800;
/// `ETH_P_IPV6`.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// `ETH_P_8021Q`, a customer VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// `ETH_P_8021AD`, a service (QinQ outer) VLAN tag.
pub const ETH_P_8021AD: u16 = 0x88a8;

/// `IPPROTO_ICMP`.
pub const IPPROTO_ICMP: u8 = 1;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const IPPROTO_UDP: u8 = 17;
/// `IPPROTO_ICMPV6`.
pub const IPPROTO_ICMPV6: u8 = 58;
/// `NEXTHDR_HOP`: IPv6 hop-by-hop options.
pub const NEXTHDR_HOP: u8 = 0;
/// `NEXTHDR_ROUTING`.
pub const NEXTHDR_ROUTING: u8 = 43;
/// `NEXTHDR_FRAGMENT`.
pub const NEXTHDR_FRAGMENT: u8 = 44;
/// `NEXTHDR_AUTH` (AH, RFC 4302): its length is counted in 4-byte words.
pub const NEXTHDR_AUTH: u8 = 51;
/// `NEXTHDR_NONE`: no next header.
pub const NEXTHDR_NONE: u8 = 59;
/// `NEXTHDR_DEST`: destination options.
pub const NEXTHDR_DEST: u8 = 60;

/// TCP flag bits as in the header's 13th byte (`TCPHDR_*`).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

/// Why a frame or a transport header could not be parsed. Each variant names the layer and
/// the length or field that was wrong.
#[derive(thiserror::Error, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    #[error("frame of {0} bytes is shorter than an Ethernet header (14)")]
    ShortEthernet(usize),
    #[error("VLAN tag truncated")]
    ShortVlan,
    #[error("more than two VLAN tags")]
    TooManyVlans,
    #[error("IPv4 header truncated")]
    ShortIpv4,
    #[error("IP version {0} where {1} was expected")]
    BadIpVersion(u8, u8),
    #[error("IPv4 header length {0} is below the minimum of 5 words")]
    BadIhl(u8),
    #[error("IPv4 total length {total} is below the header length {header}")]
    TotalLenBelowHeader { total: u16, header: u16 },
    #[error("IPv4 total length {total} exceeds the {available} bytes present")]
    TruncatedIpv4 { total: u16, available: usize },
    #[error("IPv6 header truncated")]
    ShortIpv6,
    #[error("IPv6 payload length {payload} exceeds the {available} bytes present")]
    TruncatedIpv6 { payload: u16, available: usize },
    #[error("IPv6 jumbograms (payload length 0) are not supported")]
    Ipv6Jumbogram,
    #[error("IPv6 extension header {0} truncated")]
    Ipv6ExtTruncated(u8),
    #[error("IPv6 packet has no transport header (next header 59)")]
    Ipv6NoNextHeader,
    #[error("TCP header truncated ({0} bytes)")]
    TcpTruncated(usize),
    #[error("TCP data offset {0} is below 5 words or past the end of the packet")]
    TcpBadDataOffset(u8),
    #[error("UDP header truncated ({0} bytes)")]
    UdpTruncated(usize),
    #[error("UDP length {field} is below 8 or above the {available} bytes present")]
    UdpBadLength { field: u16, available: usize },
    #[error("ICMP header truncated ({0} bytes)")]
    IcmpTruncated(usize),
}

/// The result of parsing one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// An IPv4 or IPv6 packet.
    Ip(Packet<'a>),
    /// Not IP (ARP, LLDP, ...): the ethertype after any VLAN tags.
    NonIp { ethertype: u16, vlan: Option<u16> },
    /// The link or IP layer is malformed; the kernel would drop it before netfilter.
    Invalid(Invalid),
}

/// One IP packet, every length checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The bytes of the IP packet: from the IP header to its total length (Ethernet padding
    /// cut off), so `ip_bytes.len()` is the kernel's `skb->len` at the IP layer.
    pub ip_bytes: &'a [u8],
    /// Offset of the IP header in the frame (0 for [`parse_ip`]).
    pub l3_offset: usize,
    /// The innermost VLAN id, if the frame was tagged.
    pub vlan: Option<u16>,
    pub ip: Ip,
    /// Offset of the transport header in `ip_bytes` (the kernel's `dataoff`).
    pub l4_offset: usize,
    pub l4: L4<'a>,
}

/// The network layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ip {
    V4(Ipv4Info),
    V6(Ipv6Info),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Info {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub tos: u8,
    /// The transport protocol (`iph->protocol`).
    pub protocol: u8,
    pub total_len: u16,
    /// Header length in bytes (IHL * 4), options included.
    pub header_len: u16,
    pub dont_fragment: bool,
    pub frag: FragInfo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Info {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    pub traffic_class: u8,
    pub flow_label: u32,
    pub payload_len: u16,
    /// The transport protocol after the extension headers (`meta l4proto`).
    pub protocol: u8,
    /// Present when a fragment header was walked.
    pub frag: Option<FragInfo>,
}

/// Fragmentation fields: IPv4's MF/offset/id or the IPv6 fragment header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragInfo {
    pub id: u32,
    /// Offset of this fragment's data in bytes.
    pub offset: u16,
    pub more_fragments: bool,
}

impl FragInfo {
    /// A fragment at all (first, middle or last).
    pub fn is_fragment(&self) -> bool {
        self.more_fragments || self.offset != 0
    }
}

impl Ip {
    pub fn src(&self) -> IpAddr {
        match self {
            Ip::V4(v) => IpAddr::V4(v.src),
            Ip::V6(v) => IpAddr::V6(v.src),
        }
    }
    pub fn dst(&self) -> IpAddr {
        match self {
            Ip::V4(v) => IpAddr::V4(v.dst),
            Ip::V6(v) => IpAddr::V6(v.dst),
        }
    }
    /// The transport protocol number (after IPv6 extension headers).
    pub fn protocol(&self) -> u8 {
        match self {
            Ip::V4(v) => v.protocol,
            Ip::V6(v) => v.protocol,
        }
    }
    pub fn is_v6(&self) -> bool {
        matches!(self, Ip::V6(_))
    }
    /// Fragment fields, if this packet is a fragment.
    pub fn frag(&self) -> Option<FragInfo> {
        match self {
            Ip::V4(v) if v.frag.is_fragment() => Some(v.frag),
            Ip::V4(_) => None,
            Ip::V6(v) => v.frag,
        }
    }
}

/// The transport layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4<'a> {
    Tcp(TcpView<'a>),
    Udp(UdpView),
    Icmp(IcmpView),
    Icmp6(IcmpView),
    /// Any other protocol; `protocol` is its number.
    Other {
        protocol: u8,
    },
    /// A non-first fragment: it carries no transport header.
    Fragment {
        protocol: u8,
    },
    /// The transport header is truncated or inconsistent. The ports are given when at least
    /// four bytes are present, since nft's payload matches still read them.
    Malformed {
        protocol: u8,
        reason: Invalid,
        ports: Option<(u16, u16)>,
    },
}

/// A TCP header, data offset checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpView<'a> {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    /// The eight flag bits ([`tcp_flags`]).
    pub flags: u8,
    pub window: u16,
    /// Header length in bytes (data offset * 4).
    pub header_len: u8,
    /// Payload bytes after the header, within the IP packet.
    pub payload_len: u32,
    /// The option bytes (header_len - 20 of them).
    pub options: &'a [u8],
}

impl TcpView<'_> {
    pub fn syn(&self) -> bool {
        self.flags & tcp_flags::SYN != 0
    }
    pub fn ack_flag(&self) -> bool {
        self.flags & tcp_flags::ACK != 0
    }
    pub fn fin(&self) -> bool {
        self.flags & tcp_flags::FIN != 0
    }
    pub fn rst(&self) -> bool {
        self.flags & tcp_flags::RST != 0
    }

    /// The sequence number after this segment: seq + payload + SYN + FIN
    /// (`segment_seq_plus_len`).
    pub fn end(&self) -> u32 {
        self.seq
            .wrapping_add(self.payload_len)
            .wrapping_add(u32::from(self.syn()))
            .wrapping_add(u32::from(self.fin()))
    }

    /// The options this tracker cares about, parsed as the kernel's simplified
    /// `tcp_parse_options` does (`tcp_options` + `tcp_sack` in nf_conntrack_proto_tcp.c):
    /// a malformed option ends the walk, silently.
    pub fn parse_options(&self) -> TcpOptions {
        TcpOptions::parse(self.options)
    }
}

/// The TCP options conntrack and NAT need.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpOptions {
    pub mss: Option<u16>,
    /// The window scale shift as sent (not yet clamped to 14).
    pub window_scale: Option<u8>,
    pub sack_permitted: bool,
    /// SACK blocks (left, right edges), at most 4.
    pub sack: [(u32, u32); 4],
    pub sack_blocks: u8,
    pub timestamp: Option<(u32, u32)>,
}

/// `TCPOPT_*` kinds.
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
const TCPOPT_WINDOW: u8 = 3;
const TCPOPT_SACK_PERM: u8 = 4;
const TCPOPT_SACK: u8 = 5;
const TCPOPT_TIMESTAMP: u8 = 8;

impl TcpOptions {
    pub fn parse(mut opts: &[u8]) -> TcpOptions {
        let mut out = TcpOptions::default();
        while let Some((&kind, rest)) = opts.split_first() {
            match kind {
                TCPOPT_EOL => break,
                TCPOPT_NOP => {
                    opts = rest;
                    continue;
                }
                _ => {}
            }
            let Some(&len) = rest.first() else { break };
            let len = usize::from(len);
            // "silly options" and partial options end the walk, as in the kernel.
            if len < 2 || len > opts.len() {
                break;
            }
            let body = &opts[2..len];
            match (kind, body.len()) {
                (TCPOPT_MSS, 2) => out.mss = Some(u16::from_be_bytes([body[0], body[1]])),
                (TCPOPT_WINDOW, 1) => out.window_scale = Some(body[0]),
                (TCPOPT_SACK_PERM, 0) => out.sack_permitted = true,
                (TCPOPT_SACK, n) if n >= 8 && n % 8 == 0 => {
                    for block in body.chunks_exact(8).take(4) {
                        let l = u32::from_be_bytes([block[0], block[1], block[2], block[3]]);
                        let r = u32::from_be_bytes([block[4], block[5], block[6], block[7]]);
                        out.sack[usize::from(out.sack_blocks)] = (l, r);
                        out.sack_blocks += 1;
                    }
                }
                (TCPOPT_TIMESTAMP, 8) => {
                    let v = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    let e = u32::from_be_bytes([body[4], body[5], body[6], body[7]]);
                    out.timestamp = Some((v, e));
                }
                _ => {}
            }
            opts = &opts[len..];
        }
        out
    }

    /// The SACK blocks present.
    pub fn sack_blocks(&self) -> &[(u32, u32)] {
        &self.sack[..usize::from(self.sack_blocks)]
    }
}

/// A UDP header whose length field agrees with the packet (`udp_error`'s checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpView {
    pub sport: u16,
    pub dport: u16,
    /// The length field (header + payload).
    pub length: u16,
    pub checksum: u16,
}

/// An ICMP or ICMPv6 header; for error messages the embedded packet, as far as it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpView {
    pub icmp_type: u8,
    pub code: u8,
    pub checksum: u16,
    /// Bytes 4..6: the echo identifier for echo/timestamp/info/address messages.
    pub id: u16,
    /// Bytes 6..8: the echo sequence number.
    pub seq: u16,
    /// The packet quoted by an error message (`icmp_is_err`, or ICMPv6 type < 128).
    pub inner: Option<InnerPacket>,
}

/// The start of the packet an ICMP error quotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InnerPacket {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub l4: InnerL4,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InnerL4 {
    /// TCP, UDP, UDP-Lite, SCTP, DCCP: the first four bytes.
    Ports { sport: u16, dport: u16 },
    /// An inner ICMP or ICMPv6 header.
    Icmp { icmp_type: u8, code: u8, id: u16 },
    /// Another protocol: no ports.
    Other,
    /// A non-first fragment, or too few bytes for the transport fields.
    Truncated,
}

/// ICMP error types (`icmp_is_err`): DEST_UNREACH, SOURCE_QUENCH, REDIRECT, TIME_EXCEEDED,
/// PARAMETERPROB.
pub fn icmp_is_err(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 4 | 5 | 11 | 12)
}

/// A multicast or limited-broadcast address: never forwarded, never answered with an ICMP
/// error or a reset (`icmp_send`, `nf_send_reset` stay silent).
pub fn is_group(a: std::net::IpAddr) -> bool {
    match a {
        std::net::IpAddr::V4(a) => a.is_multicast() || a.is_broadcast(),
        std::net::IpAddr::V6(a) => a.is_multicast(),
    }
}

/// ICMPv6 errors are the types below 128 (RFC 4443 section 2.1).
pub fn icmpv6_is_err(icmp_type: u8) -> bool {
    icmp_type < 128
}

/// Parses an Ethernet II frame.
pub fn parse_ethernet(frame: &[u8]) -> Frame<'_> {
    let Ok(eth) = Ethernet2HeaderSlice::from_slice(frame) else {
        return Frame::Invalid(Invalid::ShortEthernet(frame.len()));
    };
    let mut ethertype = eth.ether_type().0;
    let mut off = eth.slice().len();
    let mut vlan = None;
    let mut tags = 0;
    while ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        tags += 1;
        if tags > 2 {
            return Frame::Invalid(Invalid::TooManyVlans);
        }
        let Some(rest) = frame.get(off..) else {
            return Frame::Invalid(Invalid::ShortVlan);
        };
        let Ok(tag) = SingleVlanHeaderSlice::from_slice(rest) else {
            return Frame::Invalid(Invalid::ShortVlan);
        };
        vlan = Some(tag.vlan_identifier().value());
        ethertype = tag.ether_type().0;
        off += tag.slice().len();
    }
    let rest = frame.get(off..).unwrap_or(&[]);
    let parsed = match ethertype {
        ETH_P_IP => parse_ipv4(rest),
        ETH_P_IPV6 => parse_ipv6(rest),
        _ => return Frame::NonIp { ethertype, vlan },
    };
    match parsed {
        Ok(mut p) => {
            p.l3_offset = off;
            p.vlan = vlan;
            Frame::Ip(p)
        }
        Err(e) => Frame::Invalid(e),
    }
}

/// Parses a bare IP packet (no link header); the version nibble picks IPv4 or IPv6.
pub fn parse_ip(bytes: &[u8]) -> Frame<'_> {
    let parsed = match bytes.first().map(|b| b >> 4) {
        Some(4) => parse_ipv4(bytes),
        Some(6) => parse_ipv6(bytes),
        Some(v) => Err(Invalid::BadIpVersion(v, 4)),
        None => Err(Invalid::ShortIpv4),
    };
    match parsed {
        Ok(p) => Frame::Ip(p),
        Err(e) => Frame::Invalid(e),
    }
}

/// The checks of `ip_rcv_core`: version, IHL, total length against the bytes present.
fn parse_ipv4(bytes: &[u8]) -> Result<Packet<'_>, Invalid> {
    use etherparse::err::ipv4::{HeaderError, HeaderSliceError};
    let hdr = match Ipv4HeaderSlice::from_slice(bytes) {
        Ok(h) => h,
        Err(HeaderSliceError::Len(_)) => return Err(Invalid::ShortIpv4),
        Err(HeaderSliceError::Content(HeaderError::UnexpectedVersion { version_number })) => {
            return Err(Invalid::BadIpVersion(version_number, 4))
        }
        Err(HeaderSliceError::Content(HeaderError::HeaderLengthSmallerThanHeader { ihl })) => {
            return Err(Invalid::BadIhl(ihl))
        }
    };
    let header_len = hdr.slice().len() as u16;
    let total = hdr.total_len();
    if total < header_len {
        return Err(Invalid::TotalLenBelowHeader {
            total,
            header: header_len,
        });
    }
    let Some(ip_bytes) = bytes.get(..usize::from(total)) else {
        return Err(Invalid::TruncatedIpv4 {
            total,
            available: bytes.len(),
        });
    };
    let frag = FragInfo {
        id: u32::from(hdr.identification()),
        offset: hdr.fragments_offset().value() * 8,
        more_fragments: hdr.more_fragments(),
    };
    let protocol = hdr.protocol().0;
    let info = Ipv4Info {
        src: hdr.source_addr(),
        dst: hdr.destination_addr(),
        ttl: hdr.ttl(),
        tos: bytes[1],
        protocol,
        total_len: total,
        header_len,
        dont_fragment: hdr.dont_fragment(),
        frag,
    };
    let l4_offset = usize::from(header_len);
    let l4 = if frag.offset != 0 {
        L4::Fragment { protocol }
    } else {
        parse_l4(protocol, &ip_bytes[l4_offset..], false)
    };
    Ok(Packet {
        ip_bytes,
        l3_offset: 0,
        vlan: None,
        ip: Ip::V4(info),
        l4_offset,
        l4,
    })
}

/// Walks the extension headers the way `ipv6_skip_exthdr` does: hop-by-hop, routing,
/// fragment, AH and destination options; anything else is the transport protocol.
fn parse_ipv6(bytes: &[u8]) -> Result<Packet<'_>, Invalid> {
    use etherparse::err::ipv6::{HeaderError, HeaderSliceError};
    let hdr = match Ipv6HeaderSlice::from_slice(bytes) {
        Ok(h) => h,
        Err(HeaderSliceError::Len(_)) => return Err(Invalid::ShortIpv6),
        Err(HeaderSliceError::Content(HeaderError::UnexpectedVersion { version_number })) => {
            return Err(Invalid::BadIpVersion(version_number, 6))
        }
    };
    let payload_len = hdr.payload_length();
    if payload_len == 0 && hdr.next_header().0 == NEXTHDR_HOP {
        // XXX: jumbograms (RFC 2675) need the hop-by-hop jumbo option; no edge link carries them.
        return Err(Invalid::Ipv6Jumbogram);
    }
    let end = 40 + usize::from(payload_len);
    let Some(ip_bytes) = bytes.get(..end) else {
        return Err(Invalid::TruncatedIpv6 {
            payload: payload_len,
            available: bytes.len().saturating_sub(40),
        });
    };
    let mut next = hdr.next_header().0;
    let mut off = 40usize;
    let mut frag = None;
    let mut non_first_fragment = false;
    loop {
        let rest = &ip_bytes[off..];
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let ext = Ipv6RawExtHeaderSlice::from_slice(rest)
                    .map_err(|_| Invalid::Ipv6ExtTruncated(next))?;
                next = ext.next_header().0;
                off += ext.slice().len();
            }
            NEXTHDR_AUTH => {
                let ext = IpAuthHeaderSlice::from_slice(rest)
                    .map_err(|_| Invalid::Ipv6ExtTruncated(next))?;
                next = ext.next_header().0;
                off += ext.slice().len();
            }
            NEXTHDR_FRAGMENT => {
                let ext = Ipv6FragmentHeaderSlice::from_slice(rest)
                    .map_err(|_| Invalid::Ipv6ExtTruncated(next))?;
                let f = FragInfo {
                    id: ext.identification(),
                    offset: ext.fragment_offset().value() * 8,
                    more_fragments: ext.more_fragments(),
                };
                frag = Some(f);
                next = ext.next_header().0;
                off += ext.slice().len();
                if f.offset != 0 {
                    // ipv6_skip_exthdr stops at a non-first fragment.
                    non_first_fragment = true;
                    break;
                }
            }
            NEXTHDR_NONE => return Err(Invalid::Ipv6NoNextHeader),
            _ => break,
        }
    }
    let info = Ipv6Info {
        src: hdr.source_addr(),
        dst: hdr.destination_addr(),
        hop_limit: hdr.hop_limit(),
        traffic_class: hdr.traffic_class(),
        flow_label: hdr.flow_label().value(),
        payload_len,
        protocol: next,
        frag,
    };
    let l4 = if non_first_fragment {
        L4::Fragment { protocol: next }
    } else {
        parse_l4(next, &ip_bytes[off..], true)
    };
    Ok(Packet {
        ip_bytes,
        l3_offset: 0,
        vlan: None,
        ip: Ip::V6(info),
        l4_offset: off,
        l4,
    })
}

fn ports(bytes: &[u8]) -> Option<(u16, u16)> {
    match bytes {
        [a, b, c, d, ..] => Some((u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d]))),
        _ => None,
    }
}

fn parse_l4(protocol: u8, bytes: &[u8], v6: bool) -> L4<'_> {
    let malformed = |reason| L4::Malformed {
        protocol,
        reason,
        ports: ports(bytes),
    };
    match protocol {
        IPPROTO_TCP => {
            use etherparse::err::tcp::HeaderSliceError;
            match TcpHeaderSlice::from_slice(bytes) {
                Ok(t) => {
                    let header_len = t.slice().len();
                    L4::Tcp(TcpView {
                        sport: t.source_port(),
                        dport: t.destination_port(),
                        seq: t.sequence_number(),
                        ack: t.acknowledgment_number(),
                        flags: t.slice()[13],
                        window: t.window_size(),
                        header_len: header_len as u8,
                        payload_len: (bytes.len() - header_len) as u32,
                        options: &bytes[20..header_len],
                    })
                }
                Err(HeaderSliceError::Len(_)) if bytes.len() < 20 => {
                    malformed(Invalid::TcpTruncated(bytes.len()))
                }
                Err(_) => malformed(Invalid::TcpBadDataOffset(
                    bytes.get(12).map_or(0, |b| b >> 4),
                )),
            }
        }
        IPPROTO_UDP => match UdpHeaderSlice::from_slice(bytes) {
            Ok(u) => {
                let length = u.length();
                if usize::from(length) > bytes.len() || length < 8 {
                    malformed(Invalid::UdpBadLength {
                        field: length,
                        available: bytes.len(),
                    })
                } else {
                    L4::Udp(UdpView {
                        sport: u.source_port(),
                        dport: u.destination_port(),
                        length,
                        checksum: u.checksum(),
                    })
                }
            }
            Err(_) => malformed(Invalid::UdpTruncated(bytes.len())),
        },
        IPPROTO_ICMP if !v6 => match parse_icmp(bytes, false) {
            Some(i) => L4::Icmp(i),
            None => malformed(Invalid::IcmpTruncated(bytes.len())),
        },
        IPPROTO_ICMPV6 if v6 => match parse_icmp(bytes, true) {
            Some(i) => L4::Icmp6(i),
            None => malformed(Invalid::IcmpTruncated(bytes.len())),
        },
        _ => L4::Other { protocol },
    }
}

fn parse_icmp(bytes: &[u8], v6: bool) -> Option<IcmpView> {
    let h: &[u8; 8] = bytes.get(..8)?.try_into().ok()?;
    let icmp_type = h[0];
    let is_err = if v6 {
        icmpv6_is_err(icmp_type)
    } else {
        icmp_is_err(icmp_type)
    };
    let inner = if is_err {
        parse_inner(&bytes[8..], v6)
    } else {
        None
    };
    Some(IcmpView {
        icmp_type,
        code: h[1],
        checksum: u16::from_be_bytes([h[2], h[3]]),
        id: u16::from_be_bytes([h[4], h[5]]),
        seq: u16::from_be_bytes([h[6], h[7]]),
        inner,
    })
}

/// The quoted packet of an ICMP error, as `nf_ct_get_tuplepr` reads it: the IP header must be
/// whole, its length fields are not trusted (the quote is cut), and only the first bytes of
/// the transport header are needed.
fn parse_inner(bytes: &[u8], v6: bool) -> Option<InnerPacket> {
    let (src, dst, protocol, l4_bytes, non_first_frag) = if v6 {
        let hdr = Ipv6HeaderSlice::from_slice(bytes).ok()?;
        let mut next = hdr.next_header().0;
        let mut off = 40usize;
        let mut non_first = false;
        loop {
            let rest = bytes.get(off..)?;
            match next {
                NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                    let ext = Ipv6RawExtHeaderSlice::from_slice(rest).ok()?;
                    next = ext.next_header().0;
                    off += ext.slice().len();
                }
                NEXTHDR_AUTH => {
                    let ext = IpAuthHeaderSlice::from_slice(rest).ok()?;
                    next = ext.next_header().0;
                    off += ext.slice().len();
                }
                NEXTHDR_FRAGMENT => {
                    let ext = Ipv6FragmentHeaderSlice::from_slice(rest).ok()?;
                    next = ext.next_header().0;
                    off += ext.slice().len();
                    if ext.fragment_offset().value() != 0 {
                        non_first = true;
                        break;
                    }
                }
                NEXTHDR_NONE => return None,
                _ => break,
            }
        }
        (
            IpAddr::V6(hdr.source_addr()),
            IpAddr::V6(hdr.destination_addr()),
            next,
            bytes.get(off..)?,
            non_first,
        )
    } else {
        let hdr = Ipv4HeaderSlice::from_slice(bytes).ok()?;
        (
            IpAddr::V4(hdr.source_addr()),
            IpAddr::V4(hdr.destination_addr()),
            hdr.protocol().0,
            &bytes[hdr.slice().len()..],
            hdr.fragments_offset().value() != 0,
        )
    };
    let l4 = if non_first_frag {
        InnerL4::Truncated
    } else {
        match protocol {
            IPPROTO_TCP | IPPROTO_UDP | 33 | 132 | 136 => match ports(l4_bytes) {
                Some((sport, dport)) => InnerL4::Ports { sport, dport },
                None => InnerL4::Truncated,
            },
            IPPROTO_ICMP | IPPROTO_ICMPV6 => match l4_bytes.get(..8) {
                Some(h) => InnerL4::Icmp {
                    icmp_type: h[0],
                    code: h[1],
                    id: u16::from_be_bytes([h[4], h[5]]),
                },
                None => InnerL4::Truncated,
            },
            _ => InnerL4::Other,
        }
    };
    Some(InnerPacket {
        src,
        dst,
        protocol,
        l4,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet header (dst, src, type 0x0800) for the fixtures below.
    const ETH4: [u8; 14] = [0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];

    /// 10.0.0.1:40000 -> 10.0.0.2:80 SYN, seq 1000, win 64240, MSS 1460, SACK-perm, wscale 7;
    /// checksums valid.
    pub(crate) fn syn_v4() -> Vec<u8> {
        let mut f = ETH4.to_vec();
        f.extend_from_slice(&[
            0x45, 0x00, 0x00, 0x34, 0x12, 0x34, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, // IPv4
            10, 0, 0, 1, 10, 0, 0, 2, //
            0x9c, 0x40, 0x00, 0x50, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00, 0x00, // TCP
            0x80, 0x02, 0xfa, 0xf0, 0x00, 0x00, 0x00, 0x00, //
            0x02, 0x04, 0x05, 0xb4, 0x01, 0x03, 0x03, 0x07, 0x04, 0x02, 0x00, 0x00,
        ]);
        checksum::tests::fix_checksums(&mut f);
        f
    }

    #[test]
    fn tcp_syn_with_options() {
        let f = syn_v4();
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!("not ip")
        };
        assert_eq!(p.l3_offset, 14);
        assert_eq!(p.ip.src(), IpAddr::from([10, 0, 0, 1]));
        let L4::Tcp(t) = p.l4 else { panic!() };
        assert_eq!(
            (t.sport, t.dport, t.seq, t.window),
            (40000, 80, 1000, 64240)
        );
        assert!(t.syn() && !t.ack_flag());
        assert_eq!(t.header_len, 32);
        assert_eq!(t.end(), 1001);
        let o = t.parse_options();
        assert_eq!(o.mss, Some(1460));
        assert_eq!(o.window_scale, Some(7));
        assert!(o.sack_permitted);
        assert_eq!(checksum::verify(&p), Ok(()));
    }

    #[test]
    fn ethernet_padding_is_cut_by_total_length() {
        let mut f = syn_v4();
        f.extend_from_slice(&[0u8; 6]);
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!()
        };
        assert_eq!(p.ip_bytes.len(), 52);
        let L4::Tcp(t) = p.l4 else { panic!() };
        assert_eq!(t.payload_len, 0);
    }

    #[test]
    fn short_and_bad_ipv4() {
        assert_eq!(
            parse_ethernet(&ETH4[..10]),
            Frame::Invalid(Invalid::ShortEthernet(10))
        );
        let mut f = syn_v4();
        f[14] = 0x44; // IHL 4
        assert_eq!(parse_ethernet(&f), Frame::Invalid(Invalid::BadIhl(4)));
        let mut f = syn_v4();
        f[16] = 0x01; // total length 0x0134 > present
        assert!(matches!(
            parse_ethernet(&f),
            Frame::Invalid(Invalid::TruncatedIpv4 { total: 0x134, .. })
        ));
        let mut f = syn_v4();
        f[17] = 0x10; // total length 16 < 20
        assert!(matches!(
            parse_ethernet(&f),
            Frame::Invalid(Invalid::TotalLenBelowHeader { total: 16, .. })
        ));
        let f = syn_v4();
        assert_eq!(parse_ethernet(&f[..30]), Frame::Invalid(Invalid::ShortIpv4));
    }

    #[test]
    fn tcp_bad_data_offset_keeps_ports() {
        let mut f = syn_v4();
        f[14 + 20 + 12] = 0x30; // doff 3
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!()
        };
        assert_eq!(
            p.l4,
            L4::Malformed {
                protocol: 6,
                reason: Invalid::TcpBadDataOffset(3),
                ports: Some((40000, 80))
            }
        );
        let mut f = syn_v4();
        f[14 + 20 + 12] = 0xf0; // doff 15 = 60 bytes > 32 present
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!()
        };
        assert!(matches!(
            p.l4,
            L4::Malformed {
                reason: Invalid::TcpBadDataOffset(15),
                ..
            }
        ));
    }

    #[test]
    fn vlan_tag() {
        let syn = syn_v4();
        let mut f = syn[..12].to_vec();
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x2a]);
        f.extend_from_slice(&syn[12..]);
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!()
        };
        assert_eq!(p.vlan, Some(42));
        assert_eq!(p.l3_offset, 18);
        assert!(matches!(p.l4, L4::Tcp(_)));
        assert_eq!(parse_ethernet(&f[..16]), Frame::Invalid(Invalid::ShortVlan));
    }

    #[test]
    fn arp_is_not_ip() {
        let mut f = ETH4.to_vec();
        f[12] = 0x08;
        f[13] = 0x06;
        f.extend_from_slice(&[0u8; 28]);
        assert_eq!(
            parse_ethernet(&f),
            Frame::NonIp {
                ethertype: 0x0806,
                vlan: None
            }
        );
    }

    #[test]
    fn ipv4_fragments() {
        let mut f = syn_v4();
        f[14 + 6] = 0x20; // MF, offset 0: first fragment, transport parsed
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!()
        };
        assert_eq!(
            p.ip.frag(),
            Some(FragInfo {
                id: 0x1234,
                offset: 0,
                more_fragments: true
            })
        );
        assert!(matches!(p.l4, L4::Tcp(_)));
        f[14 + 6] = 0x00;
        f[14 + 7] = 0x03; // offset 3*8
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!()
        };
        assert_eq!(p.ip.frag().map(|f| f.offset), Some(24));
        assert_eq!(p.l4, L4::Fragment { protocol: 6 });
    }

    /// 2001:db8::1 -> 2001:db8::2, hop-by-hop (8 bytes, PadN), fragment header (offset 0,
    /// M=1, id 0xdeadbeef), UDP 5353 -> 53 with 4 bytes of payload.
    fn udp_v6_with_exts() -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0, 0x00, 0x1c, 0x00, 0x40]);
        f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        f.extend_from_slice(&[44, 0, 1, 4, 0, 0, 0, 0]); // hop-by-hop -> fragment
        f.extend_from_slice(&[17, 0, 0x00, 0x01, 0xde, 0xad, 0xbe, 0xef]); // fragment -> UDP
        f.extend_from_slice(&[0x14, 0xe9, 0x00, 0x35, 0x00, 0x0c, 0x00, 0x00, 1, 2, 3, 4]);
        checksum::tests::fix_checksums(&mut f);
        f
    }

    #[test]
    fn ipv6_extension_headers_walked() {
        let f = udp_v6_with_exts();
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!()
        };
        let Ip::V6(v6) = p.ip else { panic!() };
        assert_eq!(v6.protocol, 17);
        assert_eq!(
            v6.frag,
            Some(FragInfo {
                id: 0xdeadbeef,
                offset: 0,
                more_fragments: true
            })
        );
        assert_eq!(p.l4_offset, 56);
        let L4::Udp(u) = p.l4 else { panic!() };
        assert_eq!((u.sport, u.dport, u.length), (5353, 53, 12));
        assert_eq!(checksum::verify(&p), Ok(()));
    }

    #[test]
    fn ipv6_non_first_fragment_and_truncations() {
        let mut f = udp_v6_with_exts();
        f[14 + 48 + 3] = 0x11; // offset 2 (16 bytes), M=1
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!()
        };
        assert_eq!(p.l4, L4::Fragment { protocol: 17 });
        let f = udp_v6_with_exts();
        assert!(matches!(
            parse_ethernet(&f[..f.len() - 1]),
            Frame::Invalid(Invalid::TruncatedIpv6 { payload: 28, .. })
        ));
        let mut f = udp_v6_with_exts();
        f[14 + 40 + 1] = 9; // hop-by-hop claims 80 bytes
        assert_eq!(
            parse_ethernet(&f),
            Frame::Invalid(Invalid::Ipv6ExtTruncated(0))
        );
    }

    #[test]
    fn udp_length_checked() {
        let mut f = udp_v6_with_exts();
        f[14 + 56 + 5] = 0x20; // length 32 > 12 present
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!()
        };
        assert!(matches!(
            p.l4,
            L4::Malformed {
                reason: Invalid::UdpBadLength { field: 32, .. },
                ports: Some((5353, 53)),
                ..
            }
        ));
    }

    /// 192.0.2.1 -> 10.0.0.1 ICMP port unreachable quoting UDP 10.0.0.1:5000 -> 192.0.2.1:53.
    pub(crate) fn icmp_unreach_v4() -> Vec<u8> {
        let mut f = ETH4.to_vec();
        f.extend_from_slice(&[
            0x45, 0, 0, 56, 0, 1, 0, 0, 64, 1, 0, 0, 192, 0, 2, 1, 10, 0, 0, 1, // outer
            3, 3, 0, 0, 0, 0, 0, 0, // ICMP dest unreach / port unreach
            0x45, 0, 0, 40, 0, 2, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 192, 0, 2, 1, // inner IP
            0x13, 0x88, 0x00, 0x35, 0x00, 0x14, 0x00, 0x00, // inner UDP
        ]);
        checksum::tests::fix_checksums(&mut f);
        f
    }

    #[test]
    fn icmp_error_inner_packet() {
        let f = icmp_unreach_v4();
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!()
        };
        let L4::Icmp(i) = p.l4 else { panic!() };
        assert_eq!((i.icmp_type, i.code), (3, 3));
        let inner = i.inner.expect("inner");
        assert_eq!(inner.src, IpAddr::from([10, 0, 0, 1]));
        assert_eq!(inner.dst, IpAddr::from([192, 0, 2, 1]));
        assert_eq!(inner.protocol, 17);
        assert_eq!(
            inner.l4,
            InnerL4::Ports {
                sport: 5000,
                dport: 53
            }
        );
        assert_eq!(checksum::verify(&p), Ok(()));
        // Cut the quote after two bytes of UDP: the inner transport is truncated.
        let mut short = f[..f.len() - 6].to_vec();
        short[14 + 3] = 50;
        let Frame::Ip(p) = parse_ethernet(&short) else {
            panic!()
        };
        let L4::Icmp(i) = p.l4 else { panic!() };
        assert_eq!(i.inner.map(|x| x.l4), Some(InnerL4::Truncated));
    }

    #[test]
    fn icmp_echo_and_truncated_icmp() {
        let mut f = ETH4.to_vec();
        f.extend_from_slice(&[
            0x45, 0, 0, 28, 0, 1, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2, //
            8, 0, 0, 0, 0x12, 0x34, 0, 1,
        ]);
        checksum::tests::fix_checksums(&mut f);
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!()
        };
        let L4::Icmp(i) = p.l4 else { panic!() };
        assert_eq!((i.icmp_type, i.id, i.seq, i.inner), (8, 0x1234, 1, None));
        let mut t = f[..f.len() - 2].to_vec();
        t[14 + 3] = 26;
        let Frame::Ip(p) = parse_ethernet(&t) else {
            panic!()
        };
        assert!(matches!(
            p.l4,
            L4::Malformed {
                reason: Invalid::IcmpTruncated(6),
                ..
            }
        ));
    }

    #[test]
    fn sack_blocks_and_silly_options() {
        let o = TcpOptions::parse(&[
            1, 1, 5, 18, 0, 0, 0, 10, 0, 0, 0, 20, 0, 0, 0, 30, 0, 0, 0, 40,
        ]);
        assert_eq!(o.sack_blocks(), &[(10, 20), (30, 40)]);
        // A length of 1 ends the walk; nothing after it is read.
        let o = TcpOptions::parse(&[3, 1, 4, 2]);
        assert_eq!(o, TcpOptions::default());
        // A partial option is not parsed.
        let o = TcpOptions::parse(&[2, 4, 5]);
        assert_eq!(o.mss, None);
    }

    #[test]
    fn garbage_never_panics() {
        // Every prefix of every fixture, and every single-byte corruption of them.
        for f in [syn_v4(), udp_v6_with_exts(), icmp_unreach_v4()] {
            for n in 0..=f.len() {
                let _ = parse_ethernet(&f[..n]);
                let _ = parse_ip(f.get(14..n).unwrap_or(&[]));
            }
            for i in 0..f.len() {
                for v in [0x00, 0x01, 0x0f, 0x45, 0x60, 0x7f, 0xff] {
                    let mut g = f.clone();
                    g[i] = v;
                    if let Frame::Ip(p) = parse_ethernet(&g) {
                        let _ = checksum::verify(&p);
                        if let L4::Tcp(t) = p.l4 {
                            let _ = t.parse_options();
                        }
                    }
                }
            }
        }
    }
}
