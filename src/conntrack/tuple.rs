//! Connection tuples: what identifies one direction of a connection, and how the other
//! direction's tuple is derived (`nf_ct_invert_tuple`).
//!
//! Owns the tuple layout (compact and `Copy`, it is the hash key of the table), its
//! extraction from a parsed packet (`nf_ct_get_tuple`) and from the packet quoted in an ICMP
//! error (`nf_ct_get_tuplepr` on the inner header), and the ICMP/ICMPv6 reply-type maps
//! (`invmap` in nf_conntrack_proto_icmp.c / nf_conntrack_proto_icmpv6.c).
//!
//! Must not know the table, timeouts or rules.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::packet::{InnerL4, InnerPacket, Ip, Packet, IPPROTO_ICMP, IPPROTO_ICMPV6, L4};

/// `IPPROTO_DCCP`.
pub const IPPROTO_DCCP: u8 = 33;
/// `IPPROTO_SCTP`.
pub const IPPROTO_SCTP: u8 = 132;
/// `IPPROTO_UDPLITE`.
pub const IPPROTO_UDPLITE: u8 = 136;

/// The layer-3 protocol, numbered as `NFPROTO_IPV4` / `NFPROTO_IPV6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum L3 {
    V4 = 2,
    V6 = 10,
}

/// An address of either family in 16 bytes; an IPv4 address fills the first four.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(C, align(8))]
pub struct Addr(pub [u8; 16]);

impl Addr {
    pub fn from_v4(a: Ipv4Addr) -> Addr {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&a.octets());
        Addr(b)
    }
    pub fn from_v6(a: Ipv6Addr) -> Addr {
        Addr(a.octets())
    }
    pub fn from_ip(a: IpAddr) -> Addr {
        match a {
            IpAddr::V4(v) => Addr::from_v4(v),
            IpAddr::V6(v) => Addr::from_v6(v),
        }
    }
    pub fn to_ip(self, l3: L3) -> IpAddr {
        match l3 {
            L3::V4 => IpAddr::V4(Ipv4Addr::new(self.0[0], self.0[1], self.0[2], self.0[3])),
            L3::V6 => IpAddr::V6(Ipv6Addr::from(self.0)),
        }
    }
    fn words(&self) -> (u64, u64) {
        let (a, b) = self.0.split_at(8);
        (
            u64::from_ne_bytes(a.try_into().unwrap_or([0; 8])),
            u64::from_ne_bytes(b.try_into().unwrap_or([0; 8])),
        )
    }
}

impl fmt::Debug for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", Ipv6Addr::from(self.0))
    }
}

/// One direction of a connection (`struct nf_conntrack_tuple`).
///
/// For port protocols (TCP, UDP, UDP-Lite, SCTP, DCCP) `src_id`/`dst_id` are the ports. For
/// ICMP and ICMPv6, `src_id` is the echo identifier and `dst_id` packs type and code
/// (`type << 8 | code`), as the kernel keeps them in `src.u.icmp.id` and `dst.u.icmp.{type,code}`.
/// For any other protocol both are zero.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Tuple {
    pub src: Addr,
    pub dst: Addr,
    pub src_id: u16,
    pub dst_id: u16,
    pub proto: u8,
    pub l3: L3,
}

impl Hash for Tuple {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // Five word writes instead of 38 byte writes: this is the hot path's hash.
        let (s0, s1) = self.src.words();
        let (d0, d1) = self.dst.words();
        h.write_u64(s0);
        h.write_u64(s1);
        h.write_u64(d0);
        h.write_u64(d1);
        h.write_u64(
            u64::from(self.src_id)
                | u64::from(self.dst_id) << 16
                | u64::from(self.proto) << 32
                | (self.l3 as u64) << 40,
        );
    }
}

/// Why no tuple could be made, so the packet gets no conntrack entry (INVALID).
#[derive(thiserror::Error, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TupleError {
    #[error("non-first fragment: conntrack needs the transport header (reassemble first)")]
    Fragment,
    #[error("transport header truncated")]
    Truncated,
    #[error("ICMP type {0} has no reply type")]
    NoInverse(u8),
}

/// Which protocols carry 16-bit ports in their first four bytes.
pub fn has_ports(proto: u8) -> bool {
    matches!(
        proto,
        6 | 17 | IPPROTO_DCCP | IPPROTO_SCTP | IPPROTO_UDPLITE
    )
}

/// `invmap` of nf_conntrack_proto_icmp.c: ECHO<->ECHOREPLY, TIMESTAMP<->TIMESTAMPREPLY,
/// INFO_REQUEST<->INFO_REPLY, ADDRESS<->ADDRESSREPLY.
pub fn icmp_inverse(t: u8) -> Option<u8> {
    Some(match t {
        8 => 0,
        0 => 8,
        13 => 14,
        14 => 13,
        15 => 16,
        16 => 15,
        17 => 18,
        18 => 17,
        _ => return None,
    })
}

/// `invmap` of nf_conntrack_proto_icmpv6.c: ECHO_REQUEST<->ECHO_REPLY, NI_QUERY<->NI_REPLY.
pub fn icmpv6_inverse(t: u8) -> Option<u8> {
    Some(match t {
        128 => 129,
        129 => 128,
        139 => 140,
        140 => 139,
        _ => return None,
    })
}

impl Tuple {
    pub fn ports(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) -> Tuple {
        Tuple {
            src: Addr::from_ip(src),
            dst: Addr::from_ip(dst),
            src_id: sport,
            dst_id: dport,
            proto,
            l3: if src.is_ipv6() { L3::V6 } else { L3::V4 },
        }
    }

    pub fn src_ip(&self) -> IpAddr {
        self.src.to_ip(self.l3)
    }
    pub fn dst_ip(&self) -> IpAddr {
        self.dst.to_ip(self.l3)
    }
    pub fn is_icmp(&self) -> bool {
        (self.proto == IPPROTO_ICMP && self.l3 == L3::V4)
            || (self.proto == IPPROTO_ICMPV6 && self.l3 == L3::V6)
    }
    pub fn sport(&self) -> u16 {
        self.src_id
    }
    pub fn dport(&self) -> u16 {
        self.dst_id
    }
    pub fn icmp_id(&self) -> u16 {
        self.src_id
    }
    pub fn icmp_type(&self) -> u8 {
        (self.dst_id >> 8) as u8
    }
    pub fn icmp_code(&self) -> u8 {
        self.dst_id as u8
    }

    /// The tuple of `pkt` as the sender sent it (`nf_ct_get_tuple`).
    pub fn from_packet(pkt: &Packet<'_>) -> Result<Tuple, TupleError> {
        let (src, dst, l3) = match &pkt.ip {
            Ip::V4(v) => (Addr::from_v4(v.src), Addr::from_v4(v.dst), L3::V4),
            Ip::V6(v) => (Addr::from_v6(v.src), Addr::from_v6(v.dst), L3::V6),
        };
        let (proto, src_id, dst_id) = match &pkt.l4 {
            L4::Tcp(t) => (6, t.sport, t.dport),
            L4::Udp(u) => (17, u.sport, u.dport),
            L4::Icmp(i) => (
                IPPROTO_ICMP,
                i.id,
                u16::from(i.icmp_type) << 8 | u16::from(i.code),
            ),
            L4::Icmp6(i) => (
                IPPROTO_ICMPV6,
                i.id,
                u16::from(i.icmp_type) << 8 | u16::from(i.code),
            ),
            L4::Other { protocol } if has_ports(*protocol) => {
                let b = pkt.ip_bytes.get(pkt.l4_offset..pkt.l4_offset + 4);
                match b {
                    Some(b) => (
                        *protocol,
                        u16::from_be_bytes([b[0], b[1]]),
                        u16::from_be_bytes([b[2], b[3]]),
                    ),
                    None => return Err(TupleError::Truncated),
                }
            }
            L4::Other { protocol } => (*protocol, 0, 0),
            L4::Fragment { .. } => return Err(TupleError::Fragment),
            L4::Malformed { .. } => return Err(TupleError::Truncated),
        };
        Ok(Tuple {
            src,
            dst,
            src_id,
            dst_id,
            proto,
            l3,
        })
    }

    /// The tuple of the packet an ICMP error quotes, as its sender sent it.
    pub fn from_inner(inner: &InnerPacket) -> Result<Tuple, TupleError> {
        let l3 = if inner.src.is_ipv6() { L3::V6 } else { L3::V4 };
        let (src_id, dst_id) = match inner.l4 {
            InnerL4::Ports { sport, dport } => (sport, dport),
            InnerL4::Icmp {
                icmp_type,
                code,
                id,
            } => (id, u16::from(icmp_type) << 8 | u16::from(code)),
            InnerL4::Other => (0, 0),
            InnerL4::Truncated => return Err(TupleError::Truncated),
        };
        Ok(Tuple {
            src: Addr::from_ip(inner.src),
            dst: Addr::from_ip(inner.dst),
            src_id,
            dst_id,
            proto: inner.protocol,
            l3,
        })
    }

    /// The tuple the answer to this one carries (`nf_ct_invert_tuple`): addresses and ports
    /// swapped; for ICMP the id kept and the type mapped to its reply type.
    pub fn invert(&self) -> Result<Tuple, TupleError> {
        let mut t = *self;
        t.src = self.dst;
        t.dst = self.src;
        if self.is_icmp() {
            let ty = self.icmp_type();
            let inv = if self.l3 == L3::V4 {
                icmp_inverse(ty)
            } else {
                icmpv6_inverse(ty)
            };
            let inv = inv.ok_or(TupleError::NoInverse(ty))?;
            t.dst_id = u16::from(inv) << 8 | u16::from(self.icmp_code());
        } else {
            t.src_id = self.dst_id;
            t.dst_id = self.src_id;
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invert_ports_and_icmp() {
        let t = Tuple::ports(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            6,
            1234,
            80,
        );
        let r = t.invert().unwrap();
        assert_eq!((r.sport(), r.dport()), (80, 1234));
        assert_eq!(r.src_ip(), "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(r.invert().unwrap(), t);

        let echo = Tuple {
            src_id: 77,
            dst_id: 8 << 8,
            proto: 1,
            ..t
        };
        let r = echo.invert().unwrap();
        assert_eq!((r.icmp_type(), r.icmp_code(), r.icmp_id()), (0, 0, 77));
        let redirect = Tuple {
            dst_id: 9 << 8,
            ..echo
        };
        assert_eq!(redirect.invert(), Err(TupleError::NoInverse(9)));

        let v6 = Tuple {
            src: Addr::from_ip("2001:db8::1".parse().unwrap()),
            dst: Addr::from_ip("2001:db8::2".parse().unwrap()),
            src_id: 5,
            dst_id: 128 << 8,
            proto: 58,
            l3: L3::V6,
        };
        assert_eq!(v6.invert().unwrap().icmp_type(), 129);
        // ICMP (1) over IPv6 is not ICMPv6: no id mapping, ports-less generic.
        assert!(!Tuple { proto: 1, ..v6 }.is_icmp());
    }

    #[test]
    fn tuple_is_compact() {
        assert!(std::mem::size_of::<Tuple>() <= 40);
    }
}
