//! Test kit for the tracker: hand-built IPv4/IPv6 packets with correct checksums, and a
//! harness that runs classify + confirm (every packet accepted) with a fake clock.

use std::net::IpAddr;

use keepstate::conntrack::{
    Classified, Confirmed, CtConfig, CtInfo, Dir, Hook, PktCtx, TcpState, Timestamp, Tracker,
};
use keepstate::packet::{checksum, parse_ip, Frame};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;

fn ip_header(src: IpAddr, dst: IpAddr, proto: u8, l4_len: usize) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = (20 + l4_len) as u16;
            let mut h = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
            h[2..4].copy_from_slice(&total.to_be_bytes());
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            let c = !fold(sum16(&h));
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = vec![0x60, 0, 0, 0];
            h.extend_from_slice(&(l4_len as u16).to_be_bytes());
            h.push(proto);
            h.push(64);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h
        }
        _ => panic!("mixed families"),
    }
}

fn sum16(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Builds an IP packet around `l4` and fixes the transport checksum at `csum_at`.
pub fn ip_packet(
    src: &str,
    dst: &str,
    proto: u8,
    mut l4: Vec<u8>,
    csum_at: Option<usize>,
) -> Vec<u8> {
    let src: IpAddr = src.parse().unwrap();
    let dst: IpAddr = dst.parse().unwrap();
    let mut p = ip_header(src, dst, proto, l4.len());
    let hl = p.len();
    p.append(&mut l4);
    if let Some(at) = csum_at {
        let c = {
            let Frame::Ip(v) = parse_ip(&p) else {
                panic!("test packet does not parse: {:?}", parse_ip(&p))
            };
            checksum::compute_l4(&v)
        };
        if let Some(c) = c {
            p[hl + at..hl + at + 2].copy_from_slice(&c.to_be_bytes());
        }
    }
    p
}

pub struct Seg {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub win: u16,
    pub len: usize,
    pub opts: Vec<u8>,
}

impl Seg {
    pub fn new(flags: u8, seq: u32, ack: u32) -> Seg {
        Seg {
            flags,
            seq,
            ack,
            win: 64000,
            len: 0,
            opts: Vec::new(),
        }
    }
    pub fn win(mut self, w: u16) -> Seg {
        self.win = w;
        self
    }
    pub fn len(mut self, l: usize) -> Seg {
        self.len = l;
        self
    }
    pub fn opts(mut self, o: &[u8]) -> Seg {
        self.opts = o.to_vec();
        self
    }
}

pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, s: &Seg) -> Vec<u8> {
    let mut opts = s.opts.clone();
    while opts.len() % 4 != 0 {
        opts.push(0);
    }
    let hl = 20 + opts.len();
    let mut t = Vec::with_capacity(hl + s.len);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&s.seq.to_be_bytes());
    t.extend_from_slice(&s.ack.to_be_bytes());
    t.push(((hl / 4) as u8) << 4);
    t.push(s.flags);
    t.extend_from_slice(&s.win.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(&opts);
    t.resize(hl + s.len, 0x61);
    ip_packet(src, dst, 6, t, Some(16))
}

pub fn udp(src: &str, sport: u16, dst: &str, dport: u16, payload: usize) -> Vec<u8> {
    let len = (8 + payload) as u16;
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.resize(usize::from(len), 0x62);
    ip_packet(src, dst, 17, u, Some(6))
}

/// ICMP (or ICMPv6 for IPv6 addresses) with `body` after the 4-byte header.
pub fn icmp(src: &str, dst: &str, ty: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let v6 = src.contains(':');
    let mut i = vec![ty, code, 0, 0];
    i.extend_from_slice(body);
    ip_packet(src, dst, if v6 { 58 } else { 1 }, i, Some(2))
}

pub fn echo(src: &str, dst: &str, ty: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut b = id.to_be_bytes().to_vec();
    b.extend_from_slice(&seq.to_be_bytes());
    icmp(src, dst, ty, 0, &b)
}

/// An ICMP error quoting (the first 28 or 48 bytes of) `quoted`.
pub fn icmp_error(src: &str, dst: &str, ty: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let v6 = src.contains(':');
    let n = if v6 { 48 } else { 28 }.min(quoted.len());
    let mut b = vec![0, 0, 0, 0];
    b.extend_from_slice(&quoted[..n]);
    icmp(src, dst, ty, code, &b)
}

/// The tracker with every packet accepted by the rules (so NEW entries are confirmed), and
/// a fake clock.
pub struct H {
    pub ct: Tracker,
    pub now: Timestamp,
    pub ctx: PktCtx,
}

impl H {
    pub fn new() -> H {
        H::with(CtConfig::default())
    }
    pub fn with(cfg: CtConfig) -> H {
        H {
            ct: Tracker::new(cfg),
            now: Timestamp::from_secs(1_000),
            ctx: PktCtx {
                hook: Hook::Prerouting,
                cpu: 0,
            },
        }
    }
    pub fn advance(&mut self, secs: u64) {
        self.now = self.now.plus_secs(secs);
    }
    pub fn advance_ms(&mut self, ms: u64) {
        self.now = self.now.plus_millis(ms);
    }
    /// classify, then confirm as if every rule accepted.
    pub fn send(&mut self, bytes: &[u8]) -> Classified {
        let c = self.classify(bytes);
        if let Classified::Tracked(t) = &c {
            if let Confirmed::Failed(r) = self.ct.confirm(t, self.ctx, self.now) {
                panic!("confirm failed: {r}");
            }
        }
        c
    }
    /// classify only: the rules dropped the packet.
    pub fn classify(&mut self, bytes: &[u8]) -> Classified {
        let Frame::Ip(p) = parse_ip(bytes) else {
            panic!("test packet does not parse: {:?}", parse_ip(bytes))
        };
        self.ct.classify(&p, self.ctx, self.now)
    }
}

pub fn info(c: &Classified) -> Option<CtInfo> {
    match c {
        Classified::Tracked(t) => Some(t.info),
        _ => None,
    }
}

pub fn is_invalid(c: &Classified) -> bool {
    matches!(c, Classified::Invalid(_))
}

/// A client 10.0.0.1:40000 talking to a server 10.0.0.2:80.
pub struct Tcp {
    pub h: H,
    pub c: &'static str,
    pub s: &'static str,
    pub cport: u16,
    pub sport: u16,
}

impl Tcp {
    pub fn new() -> Tcp {
        Tcp::with(CtConfig::default())
    }
    pub fn with(cfg: CtConfig) -> Tcp {
        Tcp {
            h: H::with(cfg),
            c: "10.0.0.1",
            s: "10.0.0.2",
            cport: 40000,
            sport: 80,
        }
    }
    pub fn v6() -> Tcp {
        Tcp {
            h: H::new(),
            c: "2001:db8::1",
            s: "2001:db8::2",
            cport: 40000,
            sport: 80,
        }
    }
    /// Client to server.
    pub fn c2s(&mut self, s: Seg) -> Classified {
        let b = tcp(self.c, self.cport, self.s, self.sport, &s);
        self.h.send(&b)
    }
    /// Server to client.
    pub fn s2c(&mut self, s: Seg) -> Classified {
        let b = tcp(self.s, self.sport, self.c, self.cport, &s);
        self.h.send(&b)
    }
    pub fn state(&self) -> Option<TcpState> {
        self.conn().and_then(|c| c.tcp_state())
    }
    pub fn conn(&self) -> Option<keepstate::conntrack::ConnRef> {
        let conns = self.h.ct.conns();
        conns.into_iter().next()
    }
    pub fn timeout(&self) -> u64 {
        self.conn().map(|c| c.timeout_secs(self.h.now)).unwrap_or(0)
    }
    pub fn status(&self) -> u32 {
        self.conn().map(|c| c.status()).unwrap_or(0)
    }
    /// The three-way handshake: client ISN 1000, server ISN 5000.
    pub fn handshake(&mut self) {
        assert_eq!(info(&self.c2s(Seg::new(SYN, 1000, 0))), Some(CtInfo::New));
        assert_eq!(
            info(&self.s2c(Seg::new(SYN | ACK, 5000, 1001))),
            Some(CtInfo::EstablishedReply)
        );
        assert_eq!(
            info(&self.c2s(Seg::new(ACK, 1001, 5001))),
            Some(CtInfo::Established)
        );
    }
}

pub fn dir_of(c: &Classified) -> Option<Dir> {
    c.ct_direction()
}
