//! NAT edits on a packet's bytes: addresses, ports and the ICMP echo id, with incremental
//! checksum updates (RFC 1624, as the kernel's `csum_replace2`/`inet_proto_csum_replace4`),
//! and ICMP errors whose quoted packet is translated too (`nf_nat_icmp_reply_translation`).
//!
//! Owns only byte edits on an IP packet already parsed by [`super::parse_ip`]; which
//! translation to apply is the NAT layer's business. Must not know the tracker or rules.
//!
//! Checksums after an edit verify when recomputed from scratch: the tests check every edit that
//! way. A UDP-over-IPv4 checksum of zero ("none") stays zero. A non-first fragment has no
//! transport header, so only its IP header changes; the first fragment's transport checksum
//! covers the whole datagram, and an incremental update keeps it right.

use std::net::IpAddr;

use etherparse::checksum::Sum16BitWords;

use super::{Ip, Packet, L4};

/// What to change; `None` leaves a field as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rewrite {
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    /// The ICMP/ICMPv6 echo identifier (the "port" of ICMP NAT).
    pub icmp_id: Option<u16>,
}

impl Rewrite {
    /// Adds a later edit: its fields win over this one's (the manip of a later hook works
    /// from the earlier one's result).
    pub fn merge(&mut self, later: Rewrite) {
        self.src = later.src.or(self.src);
        self.dst = later.dst.or(self.dst);
        self.sport = later.sport.or(self.sport);
        self.dport = later.dport.or(self.dport);
        self.icmp_id = later.icmp_id.or(self.icmp_id);
    }
}

#[derive(thiserror::Error, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewriteError {
    #[error("the new address is of the other IP family")]
    Family,
    #[error("the packet is too short for the edit")]
    Truncated,
}

/// Where things are in an IP packet, taken from its parsed view (which borrows the bytes we
/// are about to change).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub v6: bool,
    pub l4_offset: usize,
    pub protocol: u8,
    /// A non-first fragment: no transport header.
    pub later_fragment: bool,
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Tcp,
    Udp,
    Icmp,
    Icmp6,
    Other,
}

impl Layout {
    pub fn of(p: &Packet<'_>) -> Layout {
        let kind = match p.l4 {
            L4::Tcp(_) => Kind::Tcp,
            L4::Udp(_) => Kind::Udp,
            L4::Icmp(_) => Kind::Icmp,
            L4::Icmp6(_) => Kind::Icmp6,
            _ => Kind::Other,
        };
        Layout {
            v6: matches!(p.ip, Ip::V6(_)),
            l4_offset: p.l4_offset,
            protocol: p.ip.protocol(),
            later_fragment: matches!(p.l4, L4::Fragment { .. }),
            kind,
        }
    }
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word changes from `old` to `new`.
pub fn csum_replace2(csum: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!csum) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The checksum after the bytes `old` become `new` (same length, even, as addresses are).
fn csum_replace(mut csum: u16, old: &[u8], new: &[u8]) -> u16 {
    for (o, n) in old.chunks(2).zip(new.chunks(2)) {
        let ow = u16::from_be_bytes([o[0], *o.get(1).unwrap_or(&0)]);
        let nw = u16::from_be_bytes([n[0], *n.get(1).unwrap_or(&0)]);
        csum = csum_replace2(csum, ow, nw);
    }
    csum
}

fn get16(b: &[u8], at: usize) -> Result<u16, RewriteError> {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or(RewriteError::Truncated)
}

fn put16(b: &mut [u8], at: usize, v: u16) -> Result<(), RewriteError> {
    let s = b.get_mut(at..at + 2).ok_or(RewriteError::Truncated)?;
    s.copy_from_slice(&v.to_be_bytes());
    Ok(())
}

/// An address's bytes on the stack (the rewrite of every NATed packet allocates nothing).
#[derive(Clone, Copy, PartialEq, Eq)]
struct AddrBytes {
    b: [u8; 16],
    len: usize,
}

impl std::ops::Deref for AddrBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.b[..self.len]
    }
}

fn addr_bytes(a: IpAddr) -> AddrBytes {
    let mut b = [0u8; 16];
    let len = match a {
        IpAddr::V4(a) => {
            b[..4].copy_from_slice(&a.octets());
            4
        }
        IpAddr::V6(a) => {
            b = a.octets();
            16
        }
    };
    AddrBytes { b, len }
}

/// The `len` bytes at `at` of `buf`, copied to the stack.
fn bytes_at(buf: &[u8], at: usize, len: usize) -> Result<AddrBytes, RewriteError> {
    let src = buf.get(at..at + len).ok_or(RewriteError::Truncated)?;
    let mut b = [0u8; 16];
    b[..len].copy_from_slice(src);
    Ok(AddrBytes { b, len })
}

/// Offset of the transport checksum, if the protocol's checksum covers the pseudo-header
/// (`true`) or not, and whether a zero means "no checksum".
fn l4_csum(kind: Kind, v6: bool) -> Option<(usize, bool, bool)> {
    match kind {
        Kind::Tcp => Some((16, true, false)),
        Kind::Udp => Some((6, true, !v6)),
        Kind::Icmp => Some((2, false, false)),
        Kind::Icmp6 => Some((2, true, false)),
        Kind::Other => None,
    }
}

/// Applies `rw` to the IP packet `ip` (from its IP header on), laid out as `l`.
pub fn apply(ip: &mut [u8], l: &Layout, rw: &Rewrite) -> Result<(), RewriteError> {
    let (src_at, dst_at, alen) = if l.v6 { (8, 24, 16) } else { (12, 16, 4) };
    let csum = if l.later_fragment {
        None
    } else {
        l4_csum(l.kind, l.v6)
    };
    for (new, at) in [(rw.src, src_at), (rw.dst, dst_at)] {
        let Some(new) = new else { continue };
        if new.is_ipv6() != l.v6 {
            return Err(RewriteError::Family);
        }
        let nb = addr_bytes(new);
        let ob = bytes_at(ip, at, alen)?;
        if ob == nb {
            continue;
        }
        ip[at..at + alen].copy_from_slice(&nb);
        if !l.v6 {
            let c = get16(ip, 10)?;
            put16(ip, 10, csum_replace(c, &ob, &nb))?;
        }
        if let Some((off, pseudo, zero_means_none)) = csum {
            if pseudo {
                let at = l.l4_offset + off;
                let c = get16(ip, at)?;
                if !(zero_means_none && c == 0) {
                    let mut n = csum_replace(c, &ob, &nb);
                    // A computed UDP checksum of zero is sent as 0xffff (RFC 768).
                    if l.kind == Kind::Udp && n == 0 {
                        n = 0xffff;
                    }
                    put16(ip, at, n)?;
                }
            }
        }
    }
    if l.later_fragment {
        return Ok(());
    }
    let ports = matches!(l.kind, Kind::Tcp | Kind::Udp);
    let edits: [(Option<u16>, usize); 3] = if ports {
        [(rw.sport, 0), (rw.dport, 2), (None, 0)]
    } else if matches!(l.kind, Kind::Icmp | Kind::Icmp6) {
        [(None, 0), (None, 0), (rw.icmp_id, 4)]
    } else {
        [(None, 0), (None, 0), (None, 0)]
    };
    for (new, off) in edits {
        let Some(new) = new else { continue };
        let at = l.l4_offset + off;
        let old = get16(ip, at)?;
        if old == new {
            continue;
        }
        put16(ip, at, new)?;
        if let Some((coff, _, zero_means_none)) = csum {
            let cat = l.l4_offset + coff;
            let c = get16(ip, cat)?;
            if !(zero_means_none && c == 0) {
                let mut n = csum_replace2(c, old, new);
                if l.kind == Kind::Udp && n == 0 {
                    n = 0xffff;
                }
                put16(ip, cat, n)?;
            }
        }
    }
    Ok(())
}

/// A [`Rewrite`] compiled for packets whose fields before the edit are known: every packet of
/// one direction of a translated connection arrives with the same addresses and ports, so
/// the checksum changes are constants (RFC 1624 eqn. 3, summed over the changed words) and an
/// edit is a few stores and two one's-complement additions. Built by [`Rewrite::compile`];
/// [`apply_compiled`] falls back to [`apply`] for a packet of another shape (a non-first
/// fragment, another protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompiledRewrite {
    rw: Rewrite,
    v6: bool,
    protocol: u8,
    /// Sum of `!old + new` over the changed IPv4 header words (the addresses).
    ip_delta: u32,
    /// The same over the words the transport checksum covers (pseudo-header addresses for
    /// TCP, UDP and ICMPv6; ports or the echo id).
    l4_delta: u32,
}

/// The fields a packet carries before a rewrite: what [`Rewrite::compile`] needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Before {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    /// Ports (TCP, UDP), or the echo id in `sport` (ICMP, ICMPv6).
    pub sport: u16,
    pub dport: u16,
}

fn words(a: IpAddr) -> AddrBytes {
    addr_bytes(a)
}

fn delta_of(old: &[u8], new: &[u8]) -> u32 {
    old.chunks(2)
        .zip(new.chunks(2))
        .map(|(o, n)| {
            let ow = u16::from_be_bytes([o[0], *o.get(1).unwrap_or(&0)]);
            let nw = u16::from_be_bytes([n[0], *n.get(1).unwrap_or(&0)]);
            // An unchanged word changes nothing (as `apply` skips it).
            if ow == nw {
                0
            } else {
                u32::from(!ow) + u32::from(nw)
            }
        })
        .sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum after adding a precomputed delta.
fn csum_add(csum: u16, delta: u32) -> u16 {
    !fold(u32::from(!csum) + delta)
}

impl CompiledRewrite {
    /// The edit, uncompiled.
    pub fn rewrite(&self) -> &Rewrite {
        &self.rw
    }
}

impl Rewrite {
    /// Compiles the edit for packets that arrive as `before`.
    pub fn compile(&self, before: &Before) -> CompiledRewrite {
        let v6 = before.src.is_ipv6();
        let icmp = matches!((before.protocol, v6), (1, false) | (58, true));
        let pseudo = matches!(before.protocol, 6 | 17) || (icmp && v6);
        let mut ip_delta = 0;
        let mut l4_delta = 0;
        for (new, old) in [(self.src, before.src), (self.dst, before.dst)] {
            if let Some(new) = new {
                let d = delta_of(&words(old), &words(new));
                if !v6 {
                    ip_delta += d;
                }
                if pseudo {
                    l4_delta += d;
                }
            }
        }
        let ports = matches!(before.protocol, 6 | 17);
        let edits = if ports {
            [(self.sport, before.sport), (self.dport, before.dport)]
        } else if icmp {
            [(self.icmp_id, before.sport), (None, 0)]
        } else {
            [(None, 0), (None, 0)]
        };
        for (new, old) in edits {
            if let Some(new) = new.filter(|&n| n != old) {
                l4_delta += u32::from(!old) + u32::from(new);
            }
        }
        CompiledRewrite {
            rw: *self,
            v6,
            protocol: before.protocol,
            ip_delta,
            l4_delta,
        }
    }
}

/// Applies a compiled rewrite: the same bytes as [`apply`] with the original [`Rewrite`], for
/// a packet that arrived as the compiled [`Before`] said.
pub fn apply_compiled(ip: &mut [u8], l: &Layout, c: &CompiledRewrite) -> Result<(), RewriteError> {
    let kind_ok = matches!(
        (l.kind, c.protocol),
        (Kind::Tcp, 6) | (Kind::Udp, 17) | (Kind::Icmp, 1) | (Kind::Icmp6, 58)
    );
    if l.v6 != c.v6 || l.later_fragment || !kind_ok || l.protocol != c.protocol {
        return apply(ip, l, &c.rw);
    }
    let (src_at, dst_at, alen) = if l.v6 { (8, 24, 16) } else { (12, 16, 4) };
    for (new, at) in [(c.rw.src, src_at), (c.rw.dst, dst_at)] {
        if let Some(new) = new {
            let nb = addr_bytes(new);
            ip.get_mut(at..at + alen)
                .ok_or(RewriteError::Truncated)?
                .copy_from_slice(&nb);
        }
    }
    if !l.v6 && c.ip_delta != 0 {
        let h = get16(ip, 10)?;
        put16(ip, 10, csum_add(h, c.ip_delta))?;
    }
    let o = l.l4_offset;
    match l.kind {
        Kind::Tcp | Kind::Udp => {
            if let Some(p) = c.rw.sport {
                put16(ip, o, p)?;
            }
            if let Some(p) = c.rw.dport {
                put16(ip, o + 2, p)?;
            }
        }
        _ => {
            if let Some(id) = c.rw.icmp_id {
                put16(ip, o + 4, id)?;
            }
        }
    }
    if c.l4_delta != 0 {
        let (off, zero_means_none) = match l.kind {
            Kind::Tcp => (16, false),
            Kind::Udp => (6, !l.v6),
            _ => (2, false),
        };
        let cur = get16(ip, o + off)?;
        if !(zero_means_none && cur == 0) {
            let mut n = csum_add(cur, c.l4_delta);
            if l.kind == Kind::Udp && n == 0 {
                n = 0xffff;
            }
            put16(ip, o + off, n)?;
        }
    }
    Ok(())
}

/// `nf_nat_mangle_tcp_packet` / `nf_nat_mangle_udp_packet`: a TCP segment or UDP datagram
/// whose `len` payload bytes at `offset` (from the start of the IP packet) become `text`: the
/// new IP packet, its length fields, IPv4 header checksum and transport checksum made right
/// (a UDP-over-IPv4 checksum of zero stays zero).
pub fn mangle(
    ip: &[u8],
    l: &Layout,
    offset: usize,
    len: usize,
    text: &[u8],
) -> Result<Vec<u8>, RewriteError> {
    let hdr = match l.kind {
        Kind::Tcp => 20,
        Kind::Udp => 8,
        _ => return Err(RewriteError::Truncated),
    };
    if l.later_fragment || offset < l.l4_offset + hdr || offset + len > ip.len() {
        return Err(RewriteError::Truncated);
    }
    let (csum_at, zero_means_none) = if l.kind == Kind::Tcp {
        (l.l4_offset + 16, false)
    } else {
        (l.l4_offset + 6, !l.v6)
    };
    let had_none = zero_means_none && get16(ip, csum_at)? == 0;
    let mut out = Vec::with_capacity(ip.len() + text.len());
    out.extend_from_slice(&ip[..offset]);
    out.extend_from_slice(text);
    out.extend_from_slice(&ip[offset + len..]);
    if l.v6 {
        let plen = u16::try_from(out.len() - 40).map_err(|_| RewriteError::Truncated)?;
        put16(&mut out, 4, plen)?;
    } else {
        let tot = u16::try_from(out.len()).map_err(|_| RewriteError::Truncated)?;
        put16(&mut out, 2, tot)?;
        let ihl = usize::from(out[0] & 0x0f) * 4;
        put16(&mut out, 10, 0)?;
        let c = etherparse::checksum::Sum16BitWords::new()
            .add_slice(out.get(..ihl).ok_or(RewriteError::Truncated)?)
            .ones_complement();
        put16(&mut out, 10, u16::from_be_bytes(c.to_ne_bytes()))?;
    }
    if l.kind == Kind::Udp {
        let ulen = u16::try_from(out.len() - l.l4_offset).map_err(|_| RewriteError::Truncated)?;
        put16(&mut out, l.l4_offset + 4, ulen)?;
    }
    if had_none {
        return Ok(out);
    }
    let c = match super::parse_ip(&out) {
        super::Frame::Ip(p) => super::checksum::compute_l4(&p),
        _ => None,
    }
    .ok_or(RewriteError::Truncated)?;
    put16(&mut out, csum_at, c)?;
    Ok(out)
}

/// A TCP segment's sequence and acknowledgement numbers, and its SACK blocks' edges through
/// `sack` (`nf_ct_seq_adjust`, `nf_ct_sack_adjust`), with the checksum updated incrementally.
pub fn tcp_seq_ack(
    ip: &mut [u8],
    l: &Layout,
    seq: u32,
    ack: u32,
    sack: impl Fn(u32) -> u32,
) -> Result<(), RewriteError> {
    if l.kind != Kind::Tcp || l.later_fragment {
        return Ok(());
    }
    let o = l.l4_offset;
    let mut csum = get16(ip, o + 16)?;
    let mut put32 = |ip: &mut [u8], at: usize, v: u32| -> Result<(), RewriteError> {
        let old = [get16(ip, at)?, get16(ip, at + 2)?];
        let new = [(v >> 16) as u16, v as u16];
        for i in 0..2 {
            csum = csum_replace2(csum, old[i], new[i]);
            put16(ip, at + 2 * i, new[i])?;
        }
        Ok(())
    };
    put32(ip, o + 4, seq)?;
    put32(ip, o + 8, ack)?;
    // SACK blocks (option kind 5) in the options.
    let hlen = usize::from(ip.get(o + 12).ok_or(RewriteError::Truncated)? >> 4) * 4;
    let mut i = o + 20;
    let end = (o + hlen).min(ip.len());
    while i < end {
        match ip[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let len = usize::from(*ip.get(i + 1).ok_or(RewriteError::Truncated)?);
                if len < 2 || i + len > end {
                    break;
                }
                if kind == 5 {
                    let mut at = i + 2;
                    while at + 8 <= i + len {
                        for edge in [at, at + 4] {
                            let v =
                                u32::from(get16(ip, edge)?) << 16 | u32::from(get16(ip, edge + 2)?);
                            put32(ip, edge, sack(v))?;
                        }
                        at += 8;
                    }
                }
                i += len;
            }
        }
    }
    put16(ip, o + 16, csum)
}

/// `ip_decrease_ttl` / the IPv6 hop limit: one less, with the IPv4 header checksum updated
/// incrementally (the TTL shares its 16-bit word with the protocol).
pub fn decrement_ttl(ip: &mut [u8], v6: bool) -> Result<(), RewriteError> {
    if v6 {
        let h = ip.get_mut(7).ok_or(RewriteError::Truncated)?;
        *h = h.saturating_sub(1);
        return Ok(());
    }
    let old = get16(ip, 8)?;
    let ttl = (old >> 8) as u8;
    let new = (u16::from(ttl.saturating_sub(1)) << 8) | (old & 0xff);
    put16(ip, 8, new)?;
    let c = get16(ip, 10)?;
    put16(ip, 10, csum_replace2(c, old, new))
}

/// Translates an ICMP or ICMPv6 error: `outer` edits the error's own IP header, `inner` the
/// packet it quotes (its addresses, ports or echo id, the quoted IPv4 header checksum and, when
/// the quote holds it, the quoted UDP checksum), then the error's checksum is recomputed over
/// the whole message (`nf_nat_icmp_reply_translation` does the same: `inet_proto_csum_replace`
/// over the edited quote, then a fresh ICMP checksum).
pub fn apply_icmp_error(
    ip: &mut [u8],
    l: &Layout,
    outer: &Rewrite,
    inner: &Rewrite,
) -> Result<(), RewriteError> {
    if !matches!(l.kind, Kind::Icmp | Kind::Icmp6) || l.later_fragment {
        return apply(ip, l, outer);
    }
    let q = l.l4_offset + 8;
    let quoted = ip.get(q..).ok_or(RewriteError::Truncated)?;
    // The quoted packet is parsed as far as it goes; its transport header may be cut short.
    let (inner_v6, inner_hlen, inner_proto) = match quoted.first().map(|b| b >> 4) {
        Some(4) if !l.v6 => {
            let ihl = usize::from(quoted[0] & 0x0f) * 4;
            (false, ihl, *quoted.get(9).ok_or(RewriteError::Truncated)?)
        }
        // Extension headers in a quoted IPv6 packet are not walked: a quote whose next header
        // is not the transport gets only its addresses translated.
        Some(6) if l.v6 => (true, 40, *quoted.get(6).ok_or(RewriteError::Truncated)?),
        _ => return Err(RewriteError::Truncated),
    };
    let ilen = quoted.len();
    let (src_at, dst_at, alen) = if inner_v6 { (8, 24, 16) } else { (12, 16, 4) };
    let inner_l4 = inner_hlen;
    let mut qbuf = ip[q..].to_vec();
    for (new, at) in [(inner.src, src_at), (inner.dst, dst_at)] {
        let Some(new) = new else { continue };
        if new.is_ipv6() != inner_v6 {
            return Err(RewriteError::Family);
        }
        let nb = addr_bytes(new);
        let ob = bytes_at(&qbuf, at, alen)?;
        qbuf[at..at + alen].copy_from_slice(&nb);
        if !inner_v6 {
            let c = get16(&qbuf, 10)?;
            put16(&mut qbuf, 10, csum_replace(c, &ob, &nb))?;
        }
        // The quoted UDP checksum (within the 8 bytes every quote holds) covers the addresses.
        if inner_proto == 17 && ilen >= inner_l4 + 8 {
            let c = get16(&qbuf, inner_l4 + 6)?;
            if c != 0 || inner_v6 {
                put16(&mut qbuf, inner_l4 + 6, csum_replace(c, &ob, &nb))?;
            }
        }
        // The quoted TCP checksum only when the quote holds the whole header (as the
        // kernel's `tcp_manip_pkt` with `hdrsize`).
        if inner_proto == 6 && ilen >= inner_l4 + 20 {
            let c = get16(&qbuf, inner_l4 + 16)?;
            put16(&mut qbuf, inner_l4 + 16, csum_replace(c, &ob, &nb))?;
        }
    }
    let port_edits: [(Option<u16>, usize); 2] = match inner_proto {
        6 | 17 | 132 | 33 | 136 => [(inner.sport, 0), (inner.dport, 2)],
        1 | 58 => [(inner.icmp_id, 4), (None, 0)],
        _ => [(None, 0), (None, 0)],
    };
    for (new, off) in port_edits {
        let Some(new) = new else { continue };
        let at = inner_l4 + off;
        let old = get16(&qbuf, at)?;
        put16(&mut qbuf, at, new)?;
        let cat = match inner_proto {
            17 if ilen >= inner_l4 + 8 => Some(inner_l4 + 6),
            6 if ilen >= inner_l4 + 20 => Some(inner_l4 + 16),
            1 | 58 if ilen >= inner_l4 + 4 => Some(inner_l4 + 2),
            _ => None,
        };
        if let Some(cat) = cat {
            let c = get16(&qbuf, cat)?;
            if !(inner_proto == 17 && c == 0 && !inner_v6) {
                put16(&mut qbuf, cat, csum_replace2(c, old, new))?;
            }
        }
    }
    ip[q..].copy_from_slice(&qbuf);
    // The outer header, without its own checksum work on the ICMP message...
    let mut no_l4 = *l;
    no_l4.kind = Kind::Other;
    apply(ip, &no_l4, outer)?;
    // ...which is recomputed whole: the quote changed under it.
    recompute_icmp(ip, l)
}

/// A fresh ICMP or ICMPv6 checksum over the whole message (errors are small).
fn recompute_icmp(ip: &mut [u8], l: &Layout) -> Result<(), RewriteError> {
    let at = l.l4_offset + 2;
    put16(ip, at, 0)?;
    let msg = ip.get(l.l4_offset..).ok_or(RewriteError::Truncated)?;
    let mut sum = Sum16BitWords::new();
    if l.v6 {
        sum = sum
            .add_slice(ip.get(8..40).ok_or(RewriteError::Truncated)?)
            .add_4bytes((msg.len() as u32).to_be_bytes())
            .add_4bytes([0, 0, 0, 58]);
    }
    let c = sum.add_slice(msg).ones_complement().to_be();
    put16(ip, at, c)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    /// A TCP, UDP (with or without checksum) or ICMP echo packet over IPv4 or IPv6.
    fn packet(kind: u8, v6: bool, zero: bool, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let b = if v6 {
            etherparse::PacketBuilder::ipv6([0xfd; 16], [0x20; 16], 64)
        } else {
            etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [203, 0, 113, 7], 64)
        };
        let mut out = Vec::new();
        match kind % 3 {
            0 => b
                .tcp(sport, dport, 1, 100)
                .write(&mut out, payload)
                .unwrap(),
            1 => b.udp(sport, dport).write(&mut out, payload).unwrap(),
            _ if v6 => b
                .icmpv6_echo_request(sport, dport)
                .write(&mut out, payload)
                .unwrap(),
            _ => b
                .icmpv4_echo_request(sport, dport)
                .write(&mut out, payload)
                .unwrap(),
        }
        if zero && kind % 3 == 1 && !v6 {
            out[26..28].copy_from_slice(&[0, 0]);
        }
        out
    }

    proptest! {
        /// The compiled rewrite gives the bytes the plain one gives, for every edit.
        #[test]
        fn compiled_equals_plain(
            kind in 0u8..3, v6 in any::<bool>(), zero in any::<bool>(),
            sport in any::<u16>(), dport in any::<u16>(),
            payload in prop::collection::vec(any::<u8>(), 0..40),
            new_src in prop::option::of(any::<[u8; 16]>()),
            new_dst in prop::option::of(any::<[u8; 16]>()),
            new_sport in prop::option::of(any::<u16>()),
            new_dport in prop::option::of(any::<u16>()),
        ) {
            let f = packet(kind, v6, zero, sport, dport, &payload);
            let addr = |b: [u8; 16]| if v6 {
                IpAddr::from(b)
            } else {
                IpAddr::from([b[0], b[1], b[2], b[3]])
            };
            let rw = Rewrite {
                src: new_src.map(addr),
                dst: new_dst.map(addr),
                sport: new_sport,
                dport: new_dport,
                icmp_id: new_sport,
            };
            let (before, layout) = match crate::packet::parse_ip(&f) {
                crate::packet::Frame::Ip(p) => (
                    Before {
                        src: p.ip.src(),
                        dst: p.ip.dst(),
                        protocol: p.ip.protocol(),
                        sport,
                        dport,
                    },
                    Layout::of(&p),
                ),
                other => panic!("{other:?}"),
            };
            let mut a = f.clone();
            let mut b = f.clone();
            apply(&mut a, &layout, &rw).unwrap();
            apply_compiled(&mut b, &layout, &rw.compile(&before)).unwrap();
            prop_assert_eq!(a, b);
        }
    }

    use std::net::{Ipv4Addr, Ipv6Addr};

    use etherparse::PacketBuilder;

    use super::*;
    use crate::packet::{checksum, parse_ip, Frame};

    fn parse(bytes: &[u8]) -> Packet<'_> {
        match parse_ip(bytes) {
            Frame::Ip(p) => p,
            other => panic!("{other:?}"),
        }
    }

    fn v4_tcp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 2], [203, 0, 113, 9], 64)
            .tcp(sport, dport, 1, 1000)
            .write(&mut out, payload)
            .unwrap();
        out
    }

    fn rewrite_and_check(mut bytes: Vec<u8>, rw: Rewrite) -> Vec<u8> {
        let l = Layout::of(&parse(&bytes));
        apply(&mut bytes, &l, &rw).unwrap();
        let p = parse(&bytes);
        checksum::verify(&p).unwrap_or_else(|e| panic!("{e} after {rw:?}"));
        if let Some(a) = rw.src {
            assert_eq!(p.ip.src(), a);
        }
        if let Some(a) = rw.dst {
            assert_eq!(p.ip.dst(), a);
        }
        bytes
    }

    #[test]
    fn rfc1624_example() {
        // RFC 1624 section 4: HC 0xdd2f, m 0x5555 -> m' 0x3285 gives 0x0000 (eqn 3).
        assert_eq!(csum_replace2(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    #[test]
    fn snat_tcp_v4() {
        let b = rewrite_and_check(
            v4_tcp(40000, 443, b"hello"),
            Rewrite {
                src: Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1))),
                sport: Some(61000),
                ..Rewrite::default()
            },
        );
        let p = parse(&b);
        assert!(matches!(p.l4, L4::Tcp(t) if t.sport == 61000 && t.dport == 443));
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 2], [203, 0, 113, 9], 64)
            .udp(5000, 53)
            .write(&mut out, b"q")
            .unwrap();
        let l = Layout::of(&parse(&out));
        out[l.l4_offset + 6] = 0;
        out[l.l4_offset + 7] = 0;
        let b = rewrite_and_check(
            out,
            Rewrite {
                dst: Some("192.168.1.10".parse().unwrap()),
                dport: Some(5353),
                ..Rewrite::default()
            },
        );
        let l = Layout::of(&parse(&b));
        assert_eq!(&b[l.l4_offset + 6..l.l4_offset + 8], &[0, 0]);
    }

    #[test]
    fn icmp_echo_id_v4_and_v6() {
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 2], [203, 0, 113, 9], 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut out, b"ping")
            .unwrap();
        rewrite_and_check(
            out,
            Rewrite {
                src: Some("198.51.100.1".parse().unwrap()),
                icmp_id: Some(4242),
                ..Rewrite::default()
            },
        );
        let mut out6 = Vec::new();
        PacketBuilder::ipv6([0x20; 16], [0x30; 16], 64)
            .icmpv6_echo_request(7, 1)
            .write(&mut out6, b"ping")
            .unwrap();
        rewrite_and_check(
            out6,
            Rewrite {
                src: Some(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))),
                icmp_id: Some(99),
                ..Rewrite::default()
            },
        );
    }

    #[test]
    fn icmp_error_quoting_a_translated_packet() {
        // A router answers the translated packet (from 198.51.100.1:61000) with
        // "fragmentation needed"; the reply translation puts back 10.0.0.2:40000 inside and
        // sends it to 10.0.0.2.
        let quoted = {
            let mut q = Vec::new();
            PacketBuilder::ipv4([198, 51, 100, 1], [203, 0, 113, 9], 64)
                .udp(61000, 53)
                .write(&mut q, b"0123456789")
                .unwrap();
            q
        };
        let mut err = Vec::new();
        PacketBuilder::ipv4([203, 0, 113, 254], [198, 51, 100, 1], 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1400,
                },
            ))
            .write(&mut err, &quoted)
            .unwrap();
        let l = Layout::of(&parse(&err));
        apply_icmp_error(
            &mut err,
            &l,
            &Rewrite {
                dst: Some("10.0.0.2".parse().unwrap()),
                ..Rewrite::default()
            },
            &Rewrite {
                src: Some("10.0.0.2".parse().unwrap()),
                sport: Some(40000),
                ..Rewrite::default()
            },
        )
        .unwrap();
        let p = parse(&err);
        checksum::verify(&p).unwrap();
        let L4::Icmp(i) = p.l4 else { panic!() };
        let inner = i.inner.unwrap();
        assert_eq!(inner.src, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert!(matches!(
            inner.l4,
            crate::packet::InnerL4::Ports {
                sport: 40000,
                dport: 53
            }
        ));
        // The quoted packet is itself consistent: its IPv4 header and UDP checksums verify.
        let q = &err[l.l4_offset + 8..];
        let qp = parse(q);
        checksum::verify(&qp).unwrap();
    }

    proptest! {
        #[test]
        fn every_edit_keeps_checksums_right(
            v6 in any::<bool>(),
            proto in 0u8..3,
            zero_udp in any::<bool>(),
            payload in prop::collection::vec(any::<u8>(), 0..64),
            src in any::<u128>(),
            dst in any::<u128>(),
            sport in any::<u16>(),
            dport in any::<u16>(),
            which in 0u8..32,
        ) {
            let mut out = Vec::new();
            let (s6, d6) = ([0x20u8; 16], [0x30u8; 16]);
            let b = if v6 {
                PacketBuilder::ipv6(s6, d6, 64)
            } else {
                PacketBuilder::ipv4([10, 0, 0, 2], [203, 0, 113, 9], 64)
            };
            match proto {
                0 => b.tcp(1234, 80, 7, 100).write(&mut out, &payload).unwrap(),
                1 => b.udp(1234, 53).write(&mut out, &payload).unwrap(),
                _ => if v6 {
                    b.icmpv6_echo_request(1, 2).write(&mut out, &payload).unwrap()
                } else {
                    b.icmpv4_echo_request(1, 2).write(&mut out, &payload).unwrap()
                },
            }
            let l = Layout::of(&parse(&out));
            if proto == 1 && zero_udp && !v6 {
                out[l.l4_offset + 6] = 0;
                out[l.l4_offset + 7] = 0;
            }
            let addr = |x: u128| if v6 {
                IpAddr::V6(Ipv6Addr::from(x))
            } else {
                IpAddr::V4(Ipv4Addr::from(x as u32))
            };
            let rw = Rewrite {
                src: (which & 1 != 0).then(|| addr(src)),
                dst: (which & 2 != 0).then(|| addr(dst)),
                sport: (which & 4 != 0).then_some(sport),
                dport: (which & 8 != 0).then_some(dport),
                icmp_id: (which & 16 != 0).then_some(sport),
            };
            apply(&mut out, &l, &rw).unwrap();
            let p = parse(&out);
            prop_assert!(checksum::verify(&p).is_ok(), "{:?} {:?}", checksum::verify(&p), rw);
        }
    }
}
