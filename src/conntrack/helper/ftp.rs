//! The FTP helper's parser: finds `PORT`, `EPRT`, `227` and `229` at the start of a control
//! connection's segment and reads the address and port they announce, byte for byte as the
//! kernel's `nf_conntrack_ftp.c` does (`find_pattern`, `try_rfc959`, `try_rfc1123`,
//! `try_eprt`, `try_epsv_response`, `get_port`), including its quirks: numbers are not range
//! checked (`PORT 10,0,0,300,4,1` wraps as C's unsigned arithmetic does), and a pattern that
//! matches but does not parse is a "partial match" that makes the kernel drop the segment.
//!
//! [`help`] is the helper itself (`help()` in nf_conntrack_ftp.c): the line-start rule
//! (`seq_aft_nl`, two remembered sequence numbers per direction), and the expectation of the
//! data connection. On a translated control connection it is `nf_nat_ftp` too: the announced
//! address and port become the ones the peer can reach, the expectation is for those, and
//! the data connection is translated back to what was announced (`nf_nat_follow_master`).
//! The caller makes the payload edit and the sequence adjustment ([`Help::Mangle`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::super::conn::ConnRef;
use super::super::expect::Follow;
use super::super::expect::{ExpectError, Expectation, Expectations, Policy};
use super::super::proto::Dir;
use super::super::{status, HelperName};
use super::{Help, HelpDrop};
use crate::packet::{Packet, L4};

/// The FTP helper's one expectation class (`ftp_exp_policy`): one data connection per
/// control connection, 5 minutes to arrive.
pub const POLICY: Policy = Policy {
    class: 0,
    name: "",
    max_expected: 1,
    timeout_secs: 5 * 60,
};

/// `NUM_SEQ_TO_REMEMBER`.
const SEQ_TO_REMEMBER: usize = 2;

/// Per control connection (`struct nf_ct_ftp_master`): the sequence numbers just after a
/// newline, per direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FtpState {
    seq_aft_nl: [[u32; SEQ_TO_REMEMBER]; 2],
    seq_aft_nl_num: [u8; 2],
}

impl FtpState {
    fn find_nl_seq(&self, seq: u32, dir: usize) -> bool {
        self.seq_aft_nl[dir][..usize::from(self.seq_aft_nl_num[dir])].contains(&seq)
    }

    /// `update_nl_seq`: remember `nl_seq`, replacing the older of two if it is newer.
    fn update_nl_seq(&mut self, nl_seq: u32, dir: usize) {
        let n = usize::from(self.seq_aft_nl_num[dir]);
        if self.seq_aft_nl[dir][..n].contains(&nl_seq) {
            return;
        }
        if n < SEQ_TO_REMEMBER {
            self.seq_aft_nl[dir][n] = nl_seq;
            self.seq_aft_nl_num[dir] += 1;
        } else {
            let s = &mut self.seq_aft_nl[dir];
            let oldest = if before(s[0], s[1]) { 0 } else { 1 };
            if after(nl_seq, s[oldest]) {
                s[oldest] = nl_seq;
            }
        }
    }
}

fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

fn after(a: u32, b: u32) -> bool {
    before(b, a)
}

/// `help()`: a segment of an ESTABLISHED FTP control connection `conn`, in direction `dir`
/// (the caller passes only packets rules saw as `ct state established`). Finds a command at
/// a line start and expects its data connection.
pub fn help(
    conn: &ConnRef,
    dir: Dir,
    state: &mut FtpState,
    pkt: &Packet<'_>,
    expect: &Expectations,
    now: u64,
) -> Help {
    let L4::Tcp(th) = pkt.l4 else {
        return Help::Accept;
    };
    let start = pkt.l4_offset + usize::from(th.header_len);
    let Some(payload) = pkt.ip_bytes.get(start..start + th.payload_len as usize) else {
        return Help::Accept;
    };
    if payload.is_empty() {
        return Help::Accept;
    }
    let d = dir.index();
    let ends_in_nl = payload.last() == Some(&b'\n');
    let nl_seq = th.seq.wrapping_add(th.payload_len);
    if !state.find_nl_seq(th.seq, d) {
        // Not just after a newline: no command can start here.
        if ends_in_nl {
            state.update_nl_seq(nl_seq, d);
        }
        return Help::Accept;
    }
    let side = match dir {
        Dir::Original => Side::Client,
        Dir::Reply => Side::Server,
    };
    let m = match parse(payload, side, pkt.ip.is_v6()) {
        FtpParse::None => {
            if ends_in_nl {
                state.update_nl_seq(nl_seq, d);
            }
            return Help::Accept;
        }
        FtpParse::Partial(kind) => return Help::Drop(HelpDrop::FtpPartial(kind)),
        FtpParse::Found(m) => m,
    };
    // The sender's address as its own tuple says, and as the peer sees it.
    let own = conn.tuple(dir);
    let seen = conn.tuple(dir.other());
    let announced = m.addr.unwrap_or(own.src_ip());
    let nat = conn.status() & (status::SRC_NAT | status::DST_NAT) != 0;
    let verdict = if announced != own.src_ip() {
        // Not loose: an address other than the sender's own is not expected.
        Help::Accept
    } else if nat {
        nat_ftp(conn, dir, &m, th.seq, start, expect, now)
    } else {
        // From the peer (the other direction's source) to the sender as the peer sees it.
        let mut t = seen;
        t.proto = 6;
        t.src_id = 0;
        t.dst_id = m.port;
        let helper = HelperName::new("ftp").unwrap_or_default();
        let e = Expectation::new(t, conn, helper, POLICY, now);
        match expect.add(e, now) {
            Ok(()) => Help::Accept,
            Err(err) => Help::Drop(HelpDrop::Expect(err)),
        }
    };
    if ends_in_nl {
        state.update_nl_seq(nl_seq, d);
    }
    verdict
}

/// Which command was found (`enum nf_ct_ftp_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FtpKind {
    /// `PORT h1,h2,h3,h4,p1,p2` from the client (active mode).
    Port,
    /// `EPRT |1|a.b.c.d|port|` or `EPRT |2|ipv6|port|` from the client.
    Eprt,
    /// `227 Entering Passive Mode (h1,h2,h3,h4,p1,p2)` from the server.
    Pasv,
    /// `229 Entering Extended Passive Mode (|||port|)` from the server: no address.
    Epsv,
}

/// What a segment announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FtpMatch {
    pub kind: FtpKind,
    /// The announced address; `None` for EPSV (the server's own address is meant).
    pub addr: Option<IpAddr>,
    pub port: u16,
    /// Where the address-and-port text starts in the payload, and its length: what NAT
    /// rewrites (`matchoff`, `matchlen`).
    pub offset: usize,
    pub len: usize,
}

/// The outcome of looking at one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FtpParse {
    /// No command of interest: accept, nothing to expect.
    None,
    /// A command was found and read.
    Found(FtpMatch),
    /// The command's name matched but its argument did not parse, or the segment ends inside
    /// the name: the kernel drops the segment (`nf_ct_helper_log: partial matching of ...`).
    Partial(FtpKind),
}

/// The direction of the segment on the control connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Client to server: PORT and EPRT.
    Client,
    /// Server to client: 227 and 229.
    Server,
}

/// `nf_nat_ftp`: the data connection is expected at the address the peer sees the sender
/// at, on the announced port if it is free (else another: the kernel's search, 128 tries),
/// and the command is rewritten to announce that.
fn nat_ftp(
    conn: &ConnRef,
    dir: Dir,
    m: &FtpMatch,
    seq: u32,
    payload_at: usize,
    expect: &Expectations,
    now: u64,
) -> Help {
    let own = conn.tuple(dir);
    let seen = conn.tuple(dir.other());
    // newaddr: the sender as the peer sees it.
    let newaddr = seen.dst_ip();
    let mut t = seen;
    t.proto = 6;
    t.src_id = 0;
    let helper = HelperName::new("ftp").unwrap_or_default();
    let follow = Follow {
        snat: own.dst_ip(),
        dnat: (own.src_ip(), m.port),
    };
    // nf_nat_exp_find_port: the same port first, then pseudo-random ones above it (the
    // sequence number stands in for get_random_u32: no clock, no global state here).
    let mut x = seq ^ u32::from(m.port).rotate_left(16) ^ (now as u32);
    let mut port = m.port;
    let mut found = None;
    for attempt in 0..128u32 {
        if attempt > 0 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let min = u32::from(m.port).max(1024);
            let range = 65535 - min.min(65534);
            port = (min + x % range.max(1)) as u16;
        }
        t.dst_id = port;
        let mut e = Expectation::new(t, conn, helper, POLICY, now);
        e.follow = Some(follow);
        match expect.add(e, now) {
            Ok(()) => {
                found = Some(port);
                break;
            }
            Err(ExpectError::Clash) => continue,
            Err(err) => return Help::Drop(HelpDrop::Expect(err)),
        }
    }
    let Some(port) = found else {
        return Help::Drop(HelpDrop::Expect(ExpectError::Clash));
    };
    let text = match (m.kind, newaddr) {
        (FtpKind::Port | FtpKind::Pasv, IpAddr::V4(a)) => {
            let o = a.octets();
            format!(
                "{},{},{},{},{},{}",
                o[0],
                o[1],
                o[2],
                o[3],
                port >> 8,
                port & 0xff
            )
        }
        (FtpKind::Eprt, IpAddr::V4(a)) => format!("|1|{a}|{port}|"),
        (FtpKind::Eprt, IpAddr::V6(a)) => format!("|2|{a}|{port}|"),
        (FtpKind::Epsv, _) => format!("|||{port}|"),
        // PORT and 227 carry IPv4 only.
        (_, IpAddr::V6(_)) => return Help::Accept,
    };
    Help::Mangle(super::Mangle {
        offset: payload_at + m.offset,
        len: m.len,
        text: text.into_bytes(),
    })
}

/// Looks for the commands of `side` at the start of `payload` (a segment that starts a line),
/// for a control connection over IPv6 or not (`v6`: EPRT's family digit must match).
pub fn parse(payload: &[u8], side: Side, v6: bool) -> FtpParse {
    // The kernel looks only at segments with payload (`help()` returns early otherwise).
    if payload.is_empty() {
        return FtpParse::None;
    }
    let patterns: &[(&[u8], Option<u8>, u8, FtpKind)] = match side {
        Side::Client => &[
            (b"PORT", Some(b' '), b'\r', FtpKind::Port),
            (b"EPRT", Some(b' '), b'\r', FtpKind::Eprt),
        ],
        Side::Server => &[
            (b"227 ", None, 0, FtpKind::Pasv),
            (b"229 ", Some(b'('), b')', FtpKind::Epsv),
        ],
    };
    for &(pattern, skip, term, kind) in patterns {
        match find_pattern(payload, pattern, skip, term, kind, v6) {
            FtpParse::None => continue,
            found => return found,
        }
    }
    FtpParse::None
}

/// `find_pattern`: the command name (case-insensitively), an optional skip to a character,
/// then the kind's number parser.
fn find_pattern(
    data: &[u8],
    pattern: &[u8],
    skip: Option<u8>,
    term: u8,
    kind: FtpKind,
    v6: bool,
) -> FtpParse {
    let plen = pattern.len();
    if data.len() <= plen {
        // A short segment that could be the start of the command: partial.
        return if data.eq_ignore_ascii_case(&pattern[..data.len()]) {
            FtpParse::Partial(kind)
        } else {
            FtpParse::None
        };
    }
    if !data[..plen].eq_ignore_ascii_case(pattern) {
        return FtpParse::None;
    }
    let mut i = plen;
    if let Some(skip) = skip {
        loop {
            if data[i] == skip {
                break;
            }
            if i == data.len() - 1 {
                return FtpParse::Partial(kind);
            }
            i += 1;
        }
        i += 1;
    }
    let rest = &data[i..];
    let parsed = match kind {
        FtpKind::Port => try_rfc959(rest, term).map(|(a, p, n)| (Some(a), p, 0, n)),
        FtpKind::Pasv => try_rfc1123(rest).map(|(a, p, skipped, n)| (Some(a), p, skipped, n)),
        FtpKind::Eprt => try_eprt(rest, v6).map(|(a, p, n)| (Some(a), p, 0, n)),
        FtpKind::Epsv => try_epsv_response(rest).map(|(p, n)| (None, p, 0, n)),
    };
    match parsed {
        Some((addr, port, skipped, len)) => FtpParse::Found(FtpMatch {
            kind,
            addr,
            port,
            offset: i + skipped,
            len,
        }),
        None => FtpParse::Partial(kind),
    }
}

/// `try_number`: `count` decimal numbers separated by `sep`, ended by `term` (any character
/// when `term` is 0). The length read, or `None`. Arithmetic wraps, as the kernel's u32 does.
fn try_number(data: &[u8], count: usize, sep: u8, term: u8) -> Option<(Vec<u32>, usize)> {
    let mut nums = vec![0u32; count];
    let mut i = 0;
    for (len, &c) in data.iter().enumerate() {
        if i >= count {
            break;
        }
        if c.is_ascii_digit() {
            nums[i] = nums[i].wrapping_mul(10).wrapping_add(u32::from(c - b'0'));
        } else if c == sep {
            i += 1;
        } else {
            // The terminator (or, with none, any character) ends the last number.
            if (c == term || term == 0) && i == count - 1 {
                return Some((nums, len));
            }
            return None;
        }
    }
    None
}

/// `try_rfc959`: `h1,h2,h3,h4,p1,p2`.
fn try_rfc959(data: &[u8], term: u8) -> Option<(IpAddr, u16, usize)> {
    let (n, len) = try_number(data, 6, b',', term)?;
    if len == 0 {
        return None;
    }
    let ip = (n[0] << 24) | (n[1].wrapping_shl(16)) | (n[2].wrapping_shl(8)) | n[3];
    let port = ((n[4] << 8) | n[5]) as u16;
    Some((IpAddr::V4(Ipv4Addr::from(ip)), port, len))
}

/// `try_rfc1123`: the 227 reply, whose numbers may sit in parentheses or not: scan to the
/// first digit. Also returns how many bytes were skipped before it.
fn try_rfc1123(data: &[u8]) -> Option<(IpAddr, u16, usize, usize)> {
    let skipped = data.iter().position(|c| c.is_ascii_digit())?;
    let (a, p, len) = try_rfc959(&data[skipped..], 0)?;
    Some((a, p, skipped, len))
}

/// `get_port`: digits from `start` up to `delim`; the length read including the delimiter.
fn get_port(data: &[u8], start: usize, delim: u8) -> Option<(u16, usize)> {
    let mut port: u16 = 0;
    for (i, &c) in data.iter().enumerate().skip(start) {
        if c == delim {
            if port == 0 {
                return None;
            }
            return Some((port, i + 1));
        } else if c.is_ascii_digit() {
            port = port.wrapping_mul(10).wrapping_add(u16::from(c - b'0'));
        } else {
            return None;
        }
    }
    None
}

fn valid_delim(d: u8) -> bool {
    !d.is_ascii_digit() && (33..=126).contains(&d)
}

/// `try_eprt`: `<d>1<d>a.b.c.d<d>port<d>` or `<d>2<d>ipv6<d>port<d>`; the family digit must
/// match the control connection's.
fn try_eprt(data: &[u8], v6: bool) -> Option<(IpAddr, u16, usize)> {
    if data.len() <= 3 {
        return None;
    }
    let d = data[0];
    if !valid_delim(d) || data[2] != d {
        return None;
    }
    if data[1] != if v6 { b'2' } else { b'1' } {
        return None;
    }
    let (addr, len) = if data[1] == b'1' {
        let (n, len) = try_number(&data[3..], 4, b'.', d)?;
        let ip = (n[0] << 24) | n[1].wrapping_shl(16) | n[2].wrapping_shl(8) | n[3];
        (IpAddr::V4(Ipv4Addr::from(ip)), len)
    } else {
        // in6_pton up to the delimiter.
        let end = data[3..].iter().position(|&c| c == d)?;
        let text = std::str::from_utf8(&data[3..3 + end]).ok()?;
        (IpAddr::V6(text.parse::<Ipv6Addr>().ok()?), end)
    };
    if len == 0 {
        return None;
    }
    let (port, total) = get_port(data, 3 + len + 1, d)?;
    Some((addr, port, total))
}

/// `try_epsv_response`: `<d><d><d>port<d>`.
fn try_epsv_response(data: &[u8]) -> Option<(u16, usize)> {
    if data.len() <= 3 {
        return None;
    }
    let d = data[0];
    if !valid_delim(d) || data[1] != d || data[2] != d {
        return None;
    }
    get_port(data, 3, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(p: FtpParse) -> FtpMatch {
        match p {
            FtpParse::Found(m) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn port_as_in_the_kernel_example() {
        // The reference's example: PORT 10,0,0,2,4,1 expects server -> client:1025.
        let m = found(parse(b"PORT 10,0,0,2,4,1\r\n", Side::Client, false));
        assert_eq!(m.addr, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(m.port, 1025);
        assert_eq!((m.offset, m.len), (5, 12));
        assert_eq!(
            &b"PORT 10,0,0,2,4,1\r\n"[m.offset..m.offset + m.len],
            b"10,0,0,2,4,1"
        );
        // Case does not matter.
        assert_eq!(
            found(parse(b"port 1,2,3,4,0,21\r\n", Side::Client, false)).port,
            21
        );
    }

    #[test]
    fn pasv_with_and_without_parentheses() {
        let text = b"227 Entering Passive Mode (10,0,1,1,117,49)\r\n";
        let m = found(parse(text, Side::Server, false));
        assert_eq!((m.addr, m.port), (Some("10.0.1.1".parse().unwrap()), 30001));
        assert_eq!(&text[m.offset..m.offset + m.len], b"10,0,1,1,117,49");
        let m = found(parse(b"227 =10,0,1,1,117,49\r\n", Side::Server, false));
        assert_eq!(m.port, 30001);
    }

    #[test]
    fn eprt_and_epsv() {
        let m = found(parse(b"EPRT |1|132.235.1.2|6275|\r\n", Side::Client, false));
        assert_eq!(
            (m.addr, m.port),
            (Some("132.235.1.2".parse().unwrap()), 6275)
        );
        assert_eq!(m.len, "|1|132.235.1.2|6275|".len());
        let m = found(parse(
            b"EPRT |2|1080::8:800:200C:417A|5282|\r\n",
            Side::Client,
            true,
        ));
        assert_eq!(
            (m.addr, m.port),
            (Some("1080::8:800:200c:417a".parse().unwrap()), 5282)
        );
        // The family digit must match the connection's.
        assert_eq!(
            parse(b"EPRT |2|::1|5282|\r\n", Side::Client, false),
            FtpParse::Partial(FtpKind::Eprt)
        );
        let m = found(parse(
            b"229 Entering Extended Passive Mode (|||6446|)\r\n",
            Side::Server,
            false,
        ));
        assert_eq!((m.addr, m.port), (None, 6446));
    }

    #[test]
    fn partial_matches_are_what_the_kernel_drops() {
        assert_eq!(
            parse(b"PORT 10,0,0,2,4\r\n", Side::Client, false),
            FtpParse::Partial(FtpKind::Port)
        );
        assert_eq!(
            parse(b"POR", Side::Client, false),
            FtpParse::Partial(FtpKind::Port)
        );
        assert_eq!(
            parse(b"PORTX", Side::Client, false),
            FtpParse::Partial(FtpKind::Port)
        );
        assert_eq!(
            parse(b"229 no parenthesis\r\n", Side::Server, false),
            FtpParse::Partial(FtpKind::Epsv)
        );
        assert_eq!(
            parse(b"EPSV (|||0|)\r\n", Side::Client, false),
            FtpParse::None
        );
        // Other commands, and the server's commands from the client, are nothing.
        assert_eq!(parse(b"RETR file\r\n", Side::Client, false), FtpParse::None);
        assert_eq!(
            parse(b"227 (1,2,3,4,5,6)\r\n", Side::Client, false),
            FtpParse::None
        );
        assert_eq!(parse(b"", Side::Client, false), FtpParse::None);
    }

    #[test]
    fn numbers_wrap_as_in_c() {
        // 300 is not range checked: 10,0,0,300 becomes 10.0.1.44 (300 << 0 = 0x12c).
        let m = found(parse(b"PORT 10,0,0,300,4,1\r\n", Side::Client, false));
        assert_eq!(m.addr, Some("10.0.1.44".parse().unwrap()));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u32 = 7;
        for len in 0..64 {
            for _ in 0..200 {
                let v: Vec<u8> = (0..len)
                    .map(|i| {
                        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                        let pick = b"PORT EPRT 227 229 (|),.0123456789\r\n:aZ";
                        if i < 4 {
                            pick[(x >> 16) as usize % 10]
                        } else {
                            pick[(x >> 16) as usize % pick.len()]
                        }
                    })
                    .collect();
                let _ = parse(&v, Side::Client, false);
                let _ = parse(&v, Side::Server, true);
            }
        }
    }
}
