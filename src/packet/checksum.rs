//! Internet checksum verification: the IPv4 header, and TCP, UDP, ICMP and ICMPv6 with their
//! pseudo-headers (RFC 1071; RFC 8200 section 8.1 for IPv6).
//!
//! Owns the question "is this packet's checksum right?", answered the way
//! `nf_conntrack_checksum` needs it: a bad transport checksum makes the packet INVALID for
//! conntrack (`tcp_error`, `udp_error`, `icmp_error` at PRE_ROUTING). Rewriting checksums
//! after NAT is not here (that is `packet::rewrite`, RFC 1624).
//!
//! Must not know the tracker or rules.

use etherparse::checksum::Sum16BitWords;

use super::{Ip, Packet, IPPROTO_ICMPV6, L4};

/// Which checksum failed.
#[derive(thiserror::Error, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChecksumError {
    #[error("bad IPv4 header checksum")]
    Ipv4Header,
    #[error("bad TCP checksum")]
    Tcp,
    #[error("bad UDP checksum")]
    Udp,
    #[error("bad ICMP checksum")]
    Icmp,
    #[error("bad ICMPv6 checksum")]
    Icmpv6,
}

/// Checks the IPv4 header checksum (what `ip_rcv_core` drops on) and the transport checksum.
pub fn verify(pkt: &Packet<'_>) -> Result<(), ChecksumError> {
    if let Ip::V4(v4) = &pkt.ip {
        let hdr = pkt
            .ip_bytes
            .get(..usize::from(v4.header_len))
            .unwrap_or(&[]);
        if Sum16BitWords::new().add_slice(hdr).ones_complement() != 0 {
            return Err(ChecksumError::Ipv4Header);
        }
    }
    verify_l4(pkt)
}

/// Checks only the transport checksum, as `nf_checksum` does for conntrack. Fragments are not
/// checked (the sum covers the whole datagram), nor are protocols without a checksum we know.
/// A UDP checksum of zero means "none" and passes (`udp_error`).
pub fn verify_l4(pkt: &Packet<'_>) -> Result<(), ChecksumError> {
    if pkt.ip.frag().is_some() {
        return Ok(());
    }
    let (err, pseudo) = match &pkt.l4 {
        L4::Tcp(_) => (ChecksumError::Tcp, true),
        L4::Udp(u) if u.checksum == 0 => return Ok(()),
        L4::Udp(_) => (ChecksumError::Udp, true),
        L4::Icmp(_) => (ChecksumError::Icmp, false),
        L4::Icmp6(_) => (ChecksumError::Icmpv6, true),
        _ => return Ok(()),
    };
    let seg = pkt.ip_bytes.get(pkt.l4_offset..).unwrap_or(&[]);
    let protocol = match &pkt.l4 {
        L4::Icmp6(_) => IPPROTO_ICMPV6,
        _ => pkt.ip.protocol(),
    };
    let mut sum = if pseudo {
        pseudo_header(&pkt.ip, protocol, seg.len())
    } else {
        Sum16BitWords::new()
    };
    sum = sum.add_slice(seg);
    if sum.ones_complement() == 0 {
        Ok(())
    } else {
        Err(err)
    }
}

fn pseudo_header(ip: &Ip, protocol: u8, len: usize) -> Sum16BitWords {
    match ip {
        Ip::V4(v4) => Sum16BitWords::new()
            .add_slice(&v4.src.octets())
            .add_slice(&v4.dst.octets())
            .add_2bytes([0, protocol])
            .add_2bytes((len as u16).to_be_bytes()),
        Ip::V6(v6) => Sum16BitWords::new()
            .add_slice(&v6.src.octets())
            .add_slice(&v6.dst.octets())
            .add_slice(&(len as u32).to_be_bytes())
            .add_2bytes([0, 0])
            .add_2bytes([0, protocol]),
    }
}

/// The checksum the transport header of `pkt` should carry (its checksum field counted as
/// zero). Used by tests and by anything that builds packets.
pub fn compute_l4(pkt: &Packet<'_>) -> Option<u16> {
    let field = match &pkt.l4 {
        L4::Tcp(_) => 16,
        L4::Udp(_) => 6,
        L4::Icmp(_) | L4::Icmp6(_) => 2,
        _ => return None,
    };
    let seg = pkt.ip_bytes.get(pkt.l4_offset..)?;
    let before = seg.get(..field)?;
    let after = seg.get(field + 2..)?;
    let mut sum = match &pkt.l4 {
        L4::Icmp(_) => Sum16BitWords::new(),
        L4::Icmp6(_) => pseudo_header(&pkt.ip, IPPROTO_ICMPV6, seg.len()),
        _ => pseudo_header(&pkt.ip, pkt.ip.protocol(), seg.len()),
    };
    // Sum the two halves without copying: an odd-length `before` cannot happen (field is even).
    sum = sum.add_slice(before).add_2bytes([0, 0]).add_slice(after);
    // etherparse sums in native byte order; turn the result into the header's value.
    let c = u16::from_be_bytes(sum.ones_complement().to_ne_bytes());
    // UDP sends an all-ones checksum for a computed zero (RFC 768).
    Some(if matches!(pkt.l4, L4::Udp(_)) && c == 0 {
        0xffff
    } else {
        c
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::packet::{parse_ethernet, Frame};

    /// Fills in the IPv4 header checksum and the transport checksum of an untagged Ethernet
    /// frame, for fixtures written by hand.
    pub(crate) fn fix_checksums(frame: &mut [u8]) {
        if frame.get(12..14) == Some(&[0x08, 0x00]) {
            let ihl = usize::from(frame[14] & 0x0f) * 4;
            frame[24] = 0;
            frame[25] = 0;
            let c = Sum16BitWords::new()
                .add_slice(&frame[14..14 + ihl])
                .ones_complement();
            frame[24..26].copy_from_slice(&c.to_ne_bytes());
        }
        let (field, l4_off, c) = {
            let Frame::Ip(p) = parse_ethernet(frame) else {
                return;
            };
            let field = match p.l4 {
                L4::Tcp(_) => 16,
                L4::Udp(_) => 6,
                L4::Icmp(_) | L4::Icmp6(_) => 2,
                _ => return,
            };
            (field, 14 + p.l4_offset, compute_l4(&p))
        };
        if let Some(c) = c {
            frame[l4_off + field..l4_off + field + 2].copy_from_slice(&c.to_be_bytes());
        }
    }

    #[test]
    fn bad_checksums_are_named() {
        let mut f = crate::packet::tests::syn_v4();
        f[14 + 10] ^= 0xff;
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!()
        };
        assert_eq!(verify(&p), Err(ChecksumError::Ipv4Header));
        assert_eq!(verify_l4(&p), Ok(()));

        let mut f = crate::packet::tests::syn_v4();
        f[14 + 20 + 16] ^= 0x01;
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!()
        };
        assert_eq!(verify(&p), Err(ChecksumError::Tcp));

        let mut f = crate::packet::tests::icmp_unreach_v4();
        f[14 + 20 + 2] ^= 0x01;
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!()
        };
        assert_eq!(verify(&p), Err(ChecksumError::Icmp));
    }

    #[test]
    fn pseudo_header_covers_addresses() {
        // Changing a source address without fixing the TCP checksum must fail the TCP sum
        // even though the (fixed) IPv4 header sum passes.
        let mut f = crate::packet::tests::syn_v4();
        f[14 + 12] = 11;
        f[24] = 0;
        f[25] = 0;
        let c = Sum16BitWords::new().add_slice(&f[14..34]).ones_complement();
        f[24..26].copy_from_slice(&c.to_ne_bytes());
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!()
        };
        assert_eq!(verify(&p), Err(ChecksumError::Tcp));
    }

    #[test]
    fn icmpv6_and_udp_zero() {
        // 2001:db8::1 -> 2001:db8::2 echo request id 7, with a computed checksum.
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 58, 64]);
        f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        f.extend_from_slice(&[128, 0, 0, 0, 0, 7, 0, 1]);
        fix_checksums(&mut f);
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!()
        };
        assert_eq!(verify(&p), Ok(()));
        f[14 + 40 + 7] = 2;
        let Frame::Ip(p) = parse_ethernet(&f) else {
            panic!()
        };
        assert_eq!(verify(&p), Err(ChecksumError::Icmpv6));
    }
}
