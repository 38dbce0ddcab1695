//! Choosing the translated tuple of a new NATed connection, as `nf_nat_core.c` does
//! (`get_unique_tuple`, `find_best_ips_proto`, `nf_nat_l4proto_unique_tuple`): keep the
//! original tuple when it is in range and free, pick the address from the range by the
//! kernel's own `jhash2` (so the same client lands on the same address as under the kernel),
//! then look for a free port or ICMP id from a random offset, 128 attempts at most, halving the
//! window on each further round.
//!
//! Owns only the choice; whether a tuple is taken is asked of the caller (the table), and
//! randomness comes from the caller too, so the choice is testable and reproducible.
//! [`exhaustive`] is the obviously-right twin the tests compare the allocator against.
//!
//! The address hash is lookup3's `hashword` as `<linux/jhash.h>` has it; that it picks the
//! kernel's address bit for bit is for the NAT issue's differential test (`snat to` a range).
//!
//! Beside the choice, what a translated connection does to each packet (`nf_nat_packet`,
//! `nf_nat_manip_pkt`, `nf_nat_icmp_reply_translation`): which hook rewrites which side in
//! which direction, as [`Rewrite`]s the packet layer applies.
//!
//! Source NAT reuses the mapping of an earlier connection from the same source when the
//! original tuple will not do (`find_appropriate_src`): the caller's [`Taken`] answers from
//! the table's bysource index.

use std::net::IpAddr;

use super::conn::{DirRewrite, NatBinding};
use super::proto::Dir;
use super::status;
use super::tuple::{has_ports, Addr, Tuple, L3};
use crate::packet::rewrite::{Before, Rewrite};

/// `nf_nat_setup_info` on a connection not yet confirmed, whose REPLY tuple is `reply` so far
/// (the ORIGINAL inverted, or the result of an earlier manip at another hook): the new REPLY
/// tuple, equal to `reply` when nothing needed to change. `None` when every tuple of the range
/// is taken: the packet must be dropped and counted.
pub fn setup(
    reply: &Tuple,
    r: &Range,
    manip: Manip,
    taken: &dyn Taken,
    random: &mut dyn FnMut() -> u16,
) -> Option<Tuple> {
    // curr_tuple: what the ORIGINAL tuple looks like after the manips so far.
    let curr = reply.invert().ok()?;
    let new = unique_tuple(&curr, r, manip, taken, random)?;
    if new == curr {
        return Some(*reply);
    }
    new.invert().ok()
}

/// `nf_nat_alloc_null_binding`: the range a connection gets at a NAT hook where no rule
/// translated it: its current address on that side, so only a clash changes its port.
pub fn null_range(reply: &Tuple, manip: Manip) -> Range {
    let a = match manip {
        Manip::Src => reply.dst_ip(),
        Manip::Dst => reply.src_ip(),
    };
    Range {
        addr: Some((a, a)),
        ..Range::default()
    }
}

/// The status bit a translation on `manip`'s side sets (`IPS_SRC_NAT`, `IPS_DST_NAT`).
pub fn status_bit(manip: Manip) -> u32 {
    match manip {
        Manip::Src => status::SRC_NAT,
        Manip::Dst => status::DST_NAT,
    }
}

/// The `*_NAT_DONE` bit: the hook has set its binding up (`nf_nat_initialized`).
pub fn done_bit(manip: Manip) -> u32 {
    match manip {
        Manip::Src => status::SRC_NAT_DONE,
        Manip::Dst => status::DST_NAT_DONE,
    }
}

/// Whether a packet of direction `dir` is rewritten on `manip`'s side: the status bit of that
/// side, or of the other side for replies (`statusbit ^= IPS_NAT_MASK`).
fn applies(st: u32, dir: Dir, manip: Manip) -> bool {
    let side = match (dir, manip) {
        (Dir::Original, m) => m,
        (Dir::Reply, Manip::Src) => Manip::Dst,
        (Dir::Reply, Manip::Dst) => Manip::Src,
    };
    st & status_bit(side) != 0
}

/// `l3proto->manip_pkt` + `l4proto->manip_pkt`: the edit that makes a packet's `manip` side
/// look like `target`'s. ICMP rewrites its echo id whatever the side, as `icmp_manip_pkt` does.
fn manip_to(target: &Tuple, manip: Manip) -> Rewrite {
    let mut rw = Rewrite::default();
    match manip {
        Manip::Src => {
            rw.src = Some(target.src_ip());
            if has_ports(target.proto) {
                rw.sport = Some(target.src_id);
            }
        }
        Manip::Dst => {
            rw.dst = Some(target.dst_ip());
            if has_ports(target.proto) {
                rw.dport = Some(target.dst_id);
            }
        }
    }
    if target.is_icmp() {
        rw.icmp_id = Some(target.src_id);
    }
    rw
}

/// `nf_nat_packet`: the edit a packet of direction `dir` gets at a hook doing `manip`, given
/// the connection's tuples and status; `None` when that side is not translated.
pub fn packet(orig: &Tuple, reply: &Tuple, st: u32, dir: Dir, manip: Manip) -> Option<Rewrite> {
    if !applies(st, dir, manip) {
        return None;
    }
    let other = match dir {
        Dir::Original => reply,
        Dir::Reply => orig,
    };
    Some(manip_to(&other.invert().ok()?, manip))
}

/// The binding a connection keeps once its REPLY tuple is final (`status` holding its
/// `SRC_NAT`/`DST_NAT` bits): per direction, the edits of both hooks, and those compiled for
/// the direction's tuple, so an established packet's rewrite is a few stores.
pub fn binding(orig: &Tuple, reply: Tuple, st: u32) -> NatBinding {
    let per_dir = |dir: Dir| {
        let mut rw = Rewrite::default();
        for manip in [Manip::Dst, Manip::Src] {
            if let Some(m) = packet(orig, &reply, st, dir, manip) {
                rw.merge(m);
            }
        }
        let t = match dir {
            Dir::Original => orig,
            Dir::Reply => &reply,
        };
        let before = Before {
            src: t.src_ip(),
            dst: t.dst_ip(),
            protocol: t.proto,
            sport: t.src_id,
            dport: t.dst_id,
        };
        DirRewrite(rw.compile(&before))
    };
    NatBinding {
        reply,
        rewrite: [per_dir(Dir::Original), per_dir(Dir::Reply)],
    }
}

/// `nf_nat_icmp_reply_translation`: an ICMP error RELATED to a translated connection, quoting
/// a packet of the other direction. Returns the edits of (the error's own header, the quoted
/// packet): the quote is put back as the peer sent it (the opposite manip, to the other
/// direction's tuple), and the outer header like any packet of direction `dir`.
pub fn icmp_error(
    orig: &Tuple,
    reply: &Tuple,
    st: u32,
    dir: Dir,
    manip: Manip,
) -> Option<(Rewrite, Rewrite)> {
    if !applies(st, dir, manip) {
        return None;
    }
    let other = match dir {
        Dir::Original => reply,
        Dir::Reply => orig,
    };
    let inner_manip = match manip {
        Manip::Src => Manip::Dst,
        Manip::Dst => Manip::Src,
    };
    let inner = manip_to(other, inner_manip);
    let mut outer = manip_to(&other.invert().ok()?, manip);
    // The outer header is ICMP: no ports, and its id is not the quoted flow's.
    outer.sport = None;
    outer.dport = None;
    outer.icmp_id = None;
    Some((outer, inner))
}

/// Which side of the tuple is translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Manip {
    /// snat, masquerade: the source.
    Src,
    /// dnat, redirect: the destination.
    Dst,
}

/// `struct nf_nat_range2`, as the NAT statement gives it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    /// `NF_NAT_RANGE_MAP_IPS`: the inclusive address range.
    pub addr: Option<(IpAddr, IpAddr)>,
    /// `NF_NAT_RANGE_PROTO_SPECIFIED`: the inclusive port (or ICMP id) range.
    pub port: Option<(u16, u16)>,
    /// `NF_NAT_RANGE_PROTO_RANDOM`.
    pub random: bool,
    /// `NF_NAT_RANGE_PROTO_RANDOM_FULLY`.
    pub fully_random: bool,
    /// `NF_NAT_RANGE_PERSISTENT`: the address depends on the source only.
    pub persistent: bool,
}

impl Range {
    fn random_all(&self) -> bool {
        self.random || self.fully_random
    }
}

/// `NF_NAT_MAX_ATTEMPTS`.
pub const MAX_ATTEMPTS: u32 = 128;

const JHASH_INITVAL: u32 = 0xdead_beef;

/// The kernel's `jhash2` (Bob Jenkins' lookup3 `hashword`, `<linux/jhash.h>`).
pub fn jhash2(k: &[u32], initval: u32) -> u32 {
    let mut a = JHASH_INITVAL
        .wrapping_add((k.len() as u32) << 2)
        .wrapping_add(initval);
    let mut b = a;
    let mut c = a;
    let mut k = k;
    while k.len() > 3 {
        a = a.wrapping_add(k[0]);
        b = b.wrapping_add(k[1]);
        c = c.wrapping_add(k[2]);
        // __jhash_mix
        a = a.wrapping_sub(c);
        a ^= c.rotate_left(4);
        c = c.wrapping_add(b);
        b = b.wrapping_sub(a);
        b ^= a.rotate_left(6);
        a = a.wrapping_add(c);
        c = c.wrapping_sub(b);
        c ^= b.rotate_left(8);
        b = b.wrapping_add(a);
        a = a.wrapping_sub(c);
        a ^= c.rotate_left(16);
        c = c.wrapping_add(b);
        b = b.wrapping_sub(a);
        b ^= a.rotate_left(19);
        a = a.wrapping_add(c);
        c = c.wrapping_sub(b);
        c ^= b.rotate_left(4);
        b = b.wrapping_add(a);
        k = &k[3..];
    }
    if k.is_empty() {
        return c;
    }
    if k.len() == 3 {
        c = c.wrapping_add(k[2]);
    }
    if k.len() >= 2 {
        b = b.wrapping_add(k[1]);
    }
    a = a.wrapping_add(k[0]);
    // __jhash_final
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    c
}

/// `reciprocal_scale`: `val` scaled into `[0, ep_ro)`.
fn reciprocal_scale(val: u32, ep_ro: u32) -> u32 {
    ((u64::from(val) * u64::from(ep_ro)) >> 32) as u32
}

/// An address as the kernel's `union nf_inet_addr` words: four u32 loaded from the network
/// bytes in host (little-endian) order; an IPv4 address fills the first.
fn words(a: &Addr) -> [u32; 4] {
    let b = a.0;
    [0, 1, 2, 3].map(|i| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]))
}

fn from_words(w: [u32; 4]) -> Addr {
    let mut b = [0u8; 16];
    for (i, x) in w.iter().enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&x.to_le_bytes());
    }
    Addr(b)
}

/// `find_best_ips_proto`: the address from the range for this connection.
fn best_ip(t: &mut Tuple, r: &Range, manip: Manip) {
    let Some((min, max)) = r.addr else { return };
    let (min, max) = (Addr::from_ip(min), Addr::from_ip(max));
    if min == max {
        match manip {
            Manip::Src => t.src = min,
            Manip::Dst => t.dst = min,
        }
        return;
    }
    let last = if t.l3 == L3::V4 { 0 } else { 3 };
    let dst = words(&t.dst);
    let mut j = jhash2(&words(&t.src), if r.persistent { 0 } else { dst[last] });
    let (minw, maxw) = (words(&min), words(&max));
    let mut out = [0u32; 4];
    let mut full_range = false;
    for i in 0..=last {
        let (lo, dist) = if full_range {
            (0u32, u32::MAX)
        } else {
            let lo = u32::from_be(minw[i]);
            let hi = u32::from_be(maxw[i]);
            (lo, hi.wrapping_sub(lo).wrapping_add(1))
        };
        out[i] = lo.wrapping_add(reciprocal_scale(j, dist)).to_be();
        if out[i] != maxw[i] {
            full_range = true;
        }
        if !r.persistent {
            j ^= dst[i];
        }
    }
    match manip {
        Manip::Src => t.src = from_words(out),
        Manip::Dst => t.dst = from_words(out),
    }
}

/// `nf_nat_used_tuple` and friends, asked of the caller: is the connection whose original
/// direction would be `t` clashing with one in the table (its reply tuple taken)?
pub trait Taken {
    fn taken(&self, t: &Tuple) -> bool;
    /// `find_appropriate_src`: the source an existing connection from the same source
    /// (address, port, protocol of `orig`) was translated to, as a candidate ORIGINAL tuple
    /// towards `orig`'s destination, if its address is in `r`. None by default.
    fn appropriate_src(&self, orig: &Tuple, r: &Range) -> Option<Tuple> {
        let _ = (orig, r);
        None
    }
}

/// `find_appropriate_src`'s candidate from one earlier connection of the same source: the
/// earlier translated source (its REPLY tuple inverted) towards `orig`'s destination, if it
/// is in the range (`in_range`: the address, and the port when the range gives ports).
pub fn src_candidate(orig: &Tuple, earlier_reply: &Tuple, r: &Range) -> Option<Tuple> {
    let mut t = earlier_reply.invert().ok()?;
    t.dst = orig.dst;
    t.dst_id = orig.dst_id;
    in_range(&t, r, Manip::Src).then_some(t)
}

impl<F: Fn(&Tuple) -> bool> Taken for F {
    fn taken(&self, t: &Tuple) -> bool {
        self(t)
    }
}

fn in_range(t: &Tuple, r: &Range, manip: Manip) -> bool {
    let (a, port) = match manip {
        Manip::Src => (t.src_ip(), t.src_id),
        Manip::Dst => (t.dst_ip(), t.dst_id),
    };
    let addr_ok = r.addr.is_none_or(|(lo, hi)| ip_le(lo, a) && ip_le(a, hi));
    let port_ok = r.port.is_none_or(|(lo, hi)| lo <= port && port <= hi);
    addr_ok && port_ok
}

fn ip_le(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => a <= b,
        (IpAddr::V6(a), IpAddr::V6(b)) => a <= b,
        _ => false,
    }
}

/// Where the "port" of a tuple is for this manip: TCP, UDP, UDP-Lite, SCTP and DCCP ports on
/// the manip side; the ICMP id whatever the side; nothing for other protocols.
fn key(t: &mut Tuple, manip: Manip) -> Option<&mut u16> {
    if t.is_icmp() {
        return Some(&mut t.src_id);
    }
    if !super::tuple::has_ports(t.proto) {
        return None;
    }
    Some(match manip {
        Manip::Src => &mut t.src_id,
        Manip::Dst => &mut t.dst_id,
    })
}

/// `get_unique_tuple`: the translated original-direction tuple for `orig`, or `None` when no
/// free one was found (the kernel's confirm would then fail: drop the packet and count it).
/// As in the kernel, a single-port range is not searched: its tuple comes back even if taken,
/// and the caller's confirm fails on the clash. `random` stands for `get_random_u16`.
pub fn unique_tuple(
    orig: &Tuple,
    r: &Range,
    manip: Manip,
    taken: &dyn Taken,
    random: &mut dyn FnMut() -> u16,
) -> Option<Tuple> {
    // Try the original tuple first (source NAT only, without random), then the mapping an
    // earlier connection of the same source got.
    if manip == Manip::Src && !r.random_all() {
        if in_range(orig, r, manip) && !taken.taken(orig) {
            return Some(*orig);
        }
        if let Some(t) = taken.appropriate_src(orig, r) {
            if !taken.taken(&t) {
                return Some(t);
            }
        }
    }
    let mut t = *orig;
    best_ip(&mut t, r, manip);
    // "Only bother mapping if it's not already in range and unique."
    if !r.random_all() {
        match r.port {
            Some((lo, hi)) => {
                let p = key(&mut t, manip).map(|k| *k);
                if p.is_none_or(|p| lo <= p && p <= hi) && (lo == hi || !taken.taken(&t)) {
                    return Some(t);
                }
            }
            None => {
                if !taken.taken(&t) {
                    return Some(t);
                }
            }
        }
    }
    // nf_nat_l4proto_unique_tuple
    let icmp = t.is_icmp();
    let current = match key(&mut t, manip) {
        Some(k) => *k,
        None => return (!taken.taken(&t)).then_some(t),
    };
    let (min, size): (u32, u32) = match r.port {
        Some((lo, hi)) => {
            let (lo, hi) = (lo.min(hi), lo.max(hi));
            (u32::from(lo), u32::from(hi) - u32::from(lo) + 1)
        }
        None if icmp => (0, 65536),
        // A destination's port is not changed without a range.
        None if manip == Manip::Dst => return (!taken.taken(&t)).then_some(t),
        None if current < 512 => (1, 511),
        None if current < 1024 => (600, 1023 - 600 + 1),
        None => (1024, 65535 - 1024 + 1),
    };
    let mut off: u16 = if r.random_all() || manip != Manip::Dst {
        random()
    } else {
        0
    };
    let mut attempts = size.min(MAX_ATTEMPTS);
    loop {
        for _ in 0..attempts {
            let port = (min + u32::from(off) % size) as u16;
            if let Some(k) = key(&mut t, manip) {
                *k = port;
            }
            if !taken.taken(&t) {
                return Some(t);
            }
            off = off.wrapping_add(1);
        }
        if attempts >= size || attempts < 16 {
            return None;
        }
        attempts /= 2;
        off = random();
    }
}

/// The obviously-right twin: the first free tuple of the whole range, in order, with the
/// address [`unique_tuple`] would pick. `None` only when every port is taken.
pub fn exhaustive(orig: &Tuple, r: &Range, manip: Manip, taken: &dyn Taken) -> Option<Tuple> {
    let mut t = *orig;
    best_ip(&mut t, r, manip);
    let (lo, hi) = r.port.unwrap_or((0, u16::MAX));
    if key(&mut t, manip).is_none() {
        return (!taken.taken(&t)).then_some(t);
    }
    (lo..=hi).find_map(|p| {
        if let Some(k) = key(&mut t, manip) {
            *k = p;
        }
        (!taken.taken(&t)).then_some(t)
    })
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashSet;

    use super::*;

    fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
        Tuple::ports(src.parse().unwrap(), dst.parse().unwrap(), 6, sport, dport)
    }

    fn lcg() -> impl FnMut() -> u16 {
        let mut x: u32 = 12345;
        move || {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u16
        }
    }

    #[test]
    fn jhash2_is_lookup3() {
        // lookup3's hashword: the empty key returns the initial state.
        assert_eq!(jhash2(&[], 0), JHASH_INITVAL);
        // Deterministic and sensitive to every word and the seed.
        let h = jhash2(&[1, 2, 3, 4], 0);
        assert_eq!(h, jhash2(&[1, 2, 3, 4], 0));
        assert_ne!(h, jhash2(&[1, 2, 3, 5], 0));
        assert_ne!(h, jhash2(&[1, 2, 3, 4], 1));
    }

    #[test]
    fn masquerade_keeps_the_port_when_free() {
        let orig = tcp("10.0.0.2", 40000, "203.0.113.9", 443);
        let r = Range {
            addr: Some((
                "198.51.100.1".parse().unwrap(),
                "198.51.100.1".parse().unwrap(),
            )),
            ..Range::default()
        };
        let none = |_: &Tuple| false;
        let t = unique_tuple(&orig, &r, Manip::Src, &none, &mut lcg()).unwrap();
        assert_eq!(t.src_ip(), "198.51.100.1".parse::<IpAddr>().unwrap());
        assert_eq!(t.src_id, 40000, "port preserved");
        assert_eq!((t.dst_ip(), t.dst_id), (orig.dst_ip(), 443));
    }

    #[test]
    fn a_clash_moves_the_source_port_within_its_class() {
        let orig = tcp("10.0.0.2", 40000, "203.0.113.9", 443);
        let wan: IpAddr = "198.51.100.1".parse().unwrap();
        let r = Range {
            addr: Some((wan, wan)),
            ..Range::default()
        };
        let busy = |t: &Tuple| t.src_id == 40000;
        let t = unique_tuple(&orig, &r, Manip::Src, &busy, &mut lcg()).unwrap();
        assert_ne!(t.src_id, 40000);
        assert!(t.src_id >= 1024, "an unprivileged port stays unprivileged");
        // A privileged source port stays in 600..1023 (or 1..511).
        let low = tcp("10.0.0.2", 700, "203.0.113.9", 443);
        let busy = |t: &Tuple| t.src_id == 700;
        let t = unique_tuple(&low, &r, Manip::Src, &busy, &mut lcg()).unwrap();
        assert!((600..=1023).contains(&t.src_id), "{}", t.src_id);
    }

    #[test]
    fn dnat_with_a_port_and_redirect() {
        let orig = tcp("203.0.113.5", 5555, "198.51.100.1", 8080);
        let srv: IpAddr = "192.168.1.10".parse().unwrap();
        let r = Range {
            addr: Some((srv, srv)),
            port: Some((80, 80)),
            ..Range::default()
        };
        let none = |_: &Tuple| false;
        let t = unique_tuple(&orig, &r, Manip::Dst, &none, &mut lcg()).unwrap();
        assert_eq!((t.dst_ip(), t.dst_id), (srv, 80));
        assert_eq!((t.src_ip(), t.src_id), (orig.src_ip(), 5555));
    }

    #[test]
    fn an_exhausted_range_is_none() {
        let orig = tcp("10.0.0.2", 40000, "203.0.113.9", 443);
        let wan: IpAddr = "198.51.100.1".parse().unwrap();
        let r = Range {
            addr: Some((wan, wan)),
            port: Some((1024, 1031)),
            ..Range::default()
        };
        let all = |_: &Tuple| true;
        assert_eq!(unique_tuple(&orig, &r, Manip::Src, &all, &mut lcg()), None);
        assert_eq!(exhaustive(&orig, &r, Manip::Src, &all), None);
    }

    #[test]
    fn the_same_client_gets_the_same_address_from_a_range() {
        let lo: IpAddr = "198.51.100.10".parse().unwrap();
        let hi: IpAddr = "198.51.100.20".parse().unwrap();
        let r = Range {
            addr: Some((lo, hi)),
            persistent: true,
            ..Range::default()
        };
        let none = |_: &Tuple| false;
        let a = unique_tuple(
            &tcp("10.0.0.2", 1, "1.1.1.1", 80),
            &r,
            Manip::Src,
            &none,
            &mut lcg(),
        )
        .unwrap();
        let b = unique_tuple(
            &tcp("10.0.0.2", 2, "9.9.9.9", 443),
            &r,
            Manip::Src,
            &none,
            &mut lcg(),
        )
        .unwrap();
        assert_eq!(a.src_ip(), b.src_ip(), "persistent: by source only");
        assert!(ip_le(lo, a.src_ip()) && ip_le(a.src_ip(), hi));
    }

    #[test]
    fn allocator_against_its_twin() {
        // Small ranges (at most MAX_ATTEMPTS ports): the allocator finds a free port exactly
        // when one exists; whatever it returns is in range and free.
        let mut rng = lcg();
        for round in 0..300u32 {
            let size = 1 + round % 100;
            let lo = 2000 + (round * 7) as u16;
            let hi = lo + size as u16 - 1;
            let wan: IpAddr = "198.51.100.1".parse().unwrap();
            let r = Range {
                addr: Some((wan, wan)),
                port: Some((lo, hi)),
                random: round % 3 == 0,
                fully_random: round % 5 == 0,
                persistent: false,
            };
            let busy: RefCell<HashSet<u16>> = RefCell::new(HashSet::new());
            for p in lo..=hi {
                if rng() % 4 != 0 {
                    busy.borrow_mut().insert(p);
                }
            }
            let taken = |t: &Tuple| busy.borrow().contains(&t.src_id);
            let orig = tcp("10.0.0.2", 40000 + round as u16, "203.0.113.9", 443);
            let got = unique_tuple(&orig, &r, Manip::Src, &taken, &mut rng);
            let twin = exhaustive(&orig, &r, Manip::Src, &taken);
            assert_eq!(got.is_some(), twin.is_some(), "round {round}");
            if let Some(t) = got {
                assert!((lo..=hi).contains(&t.src_id) && !taken(&t), "round {round}");
                assert_eq!(t.src_ip(), wan);
            }
        }
    }
}
