//! Differential test of the TCP tracker's edge cases against the Linux kernel: segments no
//! socket would send, made by hand and injected on both sides of a kernel router. Needs
//! root, `nft`, `conntrack`, `tcpdump`, `ping` and `ethtool` (scripts/setup.sh installs
//! them); skipped with a message otherwise.
//!
//! The lab is `netns_conntrack`'s (tests/common/netns.rs): a router namespace between a client
//! (`lan`) and a server (`wan`), with IPv6 as well. The router runs [`ruleset`]: every
//! scenario has a chain of its own, reached by its server port, that counts its packets per
//! `ct state` class (established/related accepted, invalid dropped, new lan->wan accepted,
//! the rest dropped), so a verdict that differs is pinned to its scenario. Each scenario of
//! [`SCRIPT`] is one connection, its segments written much as in packetdrill (sequence
//! numbers relative to the sender's initial sequence number, acks to the peer's):
//!
//! 1. simultaneous open (SYN both ways, then SYN/ACKs): the kernel's SYN_SENT2 path;
//! 2. a retransmitted SYN, data segment and FIN (each its own connection);
//! 3. data far beyond the receiver's window and ACKs for data never sent: INVALID;
//! 4. a RST inside the window but not at the expected sequence number (kept ESTABLISHED, so the
//!    challenge ACK passes, then the exact RST closes) and RSTs outside the window (INVALID);
//! 5. the kernel's own selftests (tools/testing/selftests/net/netfilter/packetdrill/):
//!    conntrack_rst_invalid, conntrack_inexact_rst, conntrack_syn_challenge_ack,
//!    conntrack_synack_old, conntrack_synack_reuse and conntrack_ack_loss_stall, with the
//!    local end of the script played by the client or the server as the script's socket
//!    connects or listens, and the outcomes the scripts check asserted of the kernel here;
//! 6. IPv6: the same kinds of segments (data, a retransmission, out-of-window data, a FIN
//!    teardown) crafted over IPv6, then a real TCP connection with data and a UDP exchange
//!    over IPv6 from std sockets.
//! 7. more of the tracker's rules: window scaling offered by both sides or one, a sender that
//!    overshoots the window, a zero-window probe, a SYN reopening TIME_WAIT, the segments
//!    `tcp_error` refuses (SYN+FIN, no flag, FIN alone, a wrong checksum), a retransmitted
//!    SYN/ACK before the final ACK, mid-stream pickup from either side, an ACK too far behind
//!    (ignored), a SYN in LAST_ACK and its challenge ACK, and the SYN/ACK resync after a SYN
//!    in ESTABLISHED.
//!
//! **Determinism.** The crafted frames go out of a packet socket ([`RawLink`]) on each end
//! host's `eth0`, complete with real checksums, so they pass neither the host's IP stack nor
//! its netfilter; the end hosts drop, in a prerouting chain before anything else sees them,
//! every TCP segment to or from the crafted ports ([`QUIET`]), so their own TCP never answers
//! (no RST for a connection it does not know, no ACK of its own). After each frame the test
//! waits until the router's forward hook has counted it before sending the next, so the
//! kernel and the capture see exactly the scripted order, whichever side sends. Only then does
//! the real IPv6 traffic run, from threads that entered the end namespaces (checksum offload
//! is off on the hosts' veths, as in `netns_conntrack`, so the captured checksums are final).
//! IPv6 runs without duplicate address detection, router solicitations or link-local
//! addresses, and with permanent neighbours, so the router's MLD reports are the only other
//! traffic.
//!
//! The router's ingress is captured with tcpdump and replayed through keepstate. Compared:
//! `conntrack -L` (IPv4 and IPv6, with accounting; only the remaining timeout and `use=` are
//! normalised), the nft counters of every chain, the frames forwarded, and every
//! `conntrack -E` event in order (so the paths agree, not only where they end; the same
//! normalisation). Before that, the kernel must have done what each scenario is about: its
//! INVALID count and final state are asserted. The router's CLOSE timeout is a minute on both
//! sides, so no entry expires on a slow machine between the last frame and `conntrack -L`.

mod common {
    pub mod capture;
    pub mod netns;
}

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::netns::{
    can_run, config6, in_netns, kernel_forwarded, multiset, multiset_diff, nft_counters, normalise,
    read_events, replay, replay_ingress, serve_once, spawn_in_netns, Lab, RawLink, CLIENT, CLIENT6,
    ROUTER_LAN, ROUTER_LAN6, ROUTER_WAN, ROUTER_WAN6, SERVER, SERVER6,
};
use etherparse::{PacketBuilder, TcpOptionElement};
use TcpOptionElement::{
    MaximumSegmentSize as Mss, Noop, SelectiveAcknowledgementPermitted as SackOk, Timestamp,
    WindowScale,
};

/// What the end hosts load: their own TCP never sees the crafted segments.
const QUIET: &str = r#"table inet quiet {
	chain prerouting {
		type filter hook prerouting priority -400; policy accept;
		tcp dport 9000-9099 drop
		tcp sport 9000-9099 drop
	}
}
"#;

/// keepstate's settings: the router's sysctls.
const CONNTRACK: &str = "\n[conntrack]\nnf_conntrack_tcp_timeout_close = 60\n";

/// The real IPv6 connection's server ports (TCP, UDP); the client's UDP port.
const V6_TCP: u16 = 9100;
const V6_UDP: u16 = 9101;
const V6_UDP_CLIENT: u16 = 9102;

/// The scenarios, one connection each (see the module comment), as a packetdrill-like
/// script. `= NAME PORT INVALID STATE [v6] [s_isn=N]` starts one: its chain in [`ruleset`],
/// the server's port (the client's is 31000 above), how many of its packets the kernel must
/// count INVALID, the state its entry must end in (`-`: no entry). Then its segments, `;` or a line between
/// them: `SIDE FLAGS SEQ[(LEN)] [ack N] [win N] [<OPTIONS>]`, SIDE `C` (client) or `S`
/// (server), FLAGS as packetdrill writes them (`S`, `.` for ACK, `F`, `R`, `P`; `-` for none),
/// SEQ relative
/// to the sender's initial sequence number, `ack` to the peer's, LEN bytes of data, the
/// window 29200 unless given, OPTIONS named in [`options`], `badsum` for a wrong checksum. `@handshake` is SYN, SYN/ACK,
/// ACK; `@connect` the opening of the packetdrill scripts whose socket connects (the client),
/// the server then sending 3000 bytes, acked; `@bulk SIDE N` N segments of 1460 bytes from
/// SIDE, each acked.
const SCRIPT: &str = r#"
# 1. Simultaneous open: the server's SYN crosses the client's (SYN_SENT2), each side answers
# with a SYN/ACK, each acks, then data.
= simopen 9001 0 ESTABLISHED
C S 0; S S 0; C S. 0 ack 1; S S. 0 ack 1; C . 1 ack 1; S . 1 ack 1
C P. 1(100) ack 1; S . 1 ack 101

# 2. Retransmissions: a SYN sent twice; a data segment twice (and its ACK); a FIN twice from
# each side.
= syn_retrans 9002 0 ESTABLISHED
C S 0; C S 0; S S. 0 ack 1; C . 1 ack 1; C P. 1(50) ack 1; S . 1 ack 51
= data_retrans 9003 0 ESTABLISHED
@handshake; C P. 1(100) ack 1; C P. 1(100) ack 1; S . 1 ack 101; S . 1 ack 101
S P. 1(200) ack 101; C . 101 ack 201
= fin_retrans 9004 0 TIME_WAIT
@handshake; C F. 1 ack 1; C F. 1 ack 1; S . 1 ack 2; S F. 1 ack 2; S F. 1 ack 2; C . 2 ack 2

# 3. Out of window: data a megabyte beyond the server's window, an ACK from the client for
# data the server never sent, one from the server for data the client never sent (INVALID);
# then the connection goes on.
= out_of_window 9005 3 ESTABLISHED
@handshake; C P. 1(100) ack 1; S . 1 ack 101
C P. 1000101(100) ack 1; C . 101 ack 100001; S . 1 ack 50101
C P. 101(100) ack 1; S . 1 ack 201

# 4. RSTs: one 100 bytes past the expected sequence number but inside the window keeps the
# entry ESTABLISHED, so the client's challenge ACK passes; the exact one then closes.
= rst_inexact 9006 0 CLOSE
@handshake; C P. 1(100) ack 1; S . 1 ack 101; S R. 101 ack 101; C . 101 ack 1; S R 1
# ... and RSTs far beyond the window, or before what the peer acked: INVALID, the entry stays
# ESTABLISHED.
= rst_out_of_window 9007 3 ESTABLISHED
@handshake; C P. 1(100) ack 1; S . 1 ack 101; S R 1000000; C R 2000000; S R 0

# 5. The kernel's selftests, tools/testing/selftests/net/netfilter/packetdrill/*.pkt, with the
# script's local end played by the client where its socket connects, by the server where it
# listens, and the counts and states the scripts check. conntrack_rst_invalid: four RSTs are
# INVALID (before the acked data, far beyond, in the window but before the ack, one short of
# the ack), the exact one closes.
= pd_rst_invalid 9008 4 CLOSE
@connect; S R 0 win 0; S R 1000000 win 0; S R 42 win 0
C P. 1(1000) ack 3001 win 65535; S . 3001 ack 1001 win 65535
S R. 3000 ack 1001 win 0; S R. 3001 ack 1001 win 0
# conntrack_inexact_rst: the server's FIN, the client's RST, then a spurious RST from the
# server at no exact sequence number: not INVALID, the entry is closing already.
= pd_inexact_rst 9009 0 CLOSE
@connect; C P. 1(1000) ack 3001 win 65535; S F. 3001 ack 1001 win 65535
C . 1001 ack 3002 win 65535; C R. 1001 ack 3002 win 65535; S R 2001 win 0
# conntrack_syn_challenge_ack: the SYN meets a challenge ACK of an old incarnation, the client
# resets and sends its SYN again; the handshake completes.
= pd_syn_challenge_ack 9010 0 ESTABLISHED
C S 0 win 65535 <syn>; S . 145824453 ack 643160523 win 240 <peer>; C R 643160523 win 0
C S 0 win 65535 <syn>; S S. 0 ack 1 win 250 <peer>; C . 1 ack 1 win 256 <ts>
# conntrack_synack_old: a SYN/ACK of an older incarnation (its ack far off) is INVALID, the
# SYN goes again, and the right SYN/ACK, its sequence number 65535 below the old one's, is
# accepted.
= pd_synack_old 9011 1 ESTABLISHED s_isn=145758918
C S 0 win 65535 <syn>; S S. 65535 ack 643160523 win 240 <peer>; C S 0 win 65535 <syn>
S S. 0 ack 1 win 250 <peer>; C . 1 ack 1 win 256 <ts>; C P. 1(1) ack 1 win 256 <ts>
# conntrack_synack_reuse: a new SYN in an established connection draws a challenge ACK, the
# client resets, sends its SYN again, and the server answers: SYN_RECV, nothing INVALID.
= pd_synack_reuse 9012 0 SYN_RECV
C S 0 win 32792 <syn_ws7>; S S. 0 ack 1 win 65535 <synack_ws8>; C . 1 ack 1 win 257 <ts>
C P. 1(100) ack 1 win 257 <ts>; S . 1 ack 101 win 256 <ts>; C S 2000 win 32792 <syn_ws7>
S . 1 ack 101 win 256 <ts>; C R. 101 ack 1 win 257; C S 2000 win 32792 <syn_ws0>
S S. 700000 ack 2001 win 65535 <mss1460>
# conntrack_ack_loss_stall: after 46 segments, the first one again: already acked and more
# than a window back, it must pass (ignored), not be INVALID.
= pd_ack_loss_stall 9013 0 ESTABLISHED
C S 0 win 32792 <mss1000>; S S. 0 ack 1 win 65535 <mss1460>; C . 1 ack 1 win 65535
@bulk C 46; C P. 1(1460) ack 1 win 257; S . 1 ack 67161 win 65535

# 6. IPv6, crafted: data, its retransmission, data beyond the window (INVALID), a FIN
# teardown.
= v6_edges 9014 1 TIME_WAIT v6
@handshake; C P. 1(100) ack 1; C P. 1(100) ack 1; S . 1 ack 101; C P. 500101(100) ack 1
C F. 101 ack 1; S F. 1 ack 102; C . 102 ack 2

# 7. More of the tracker's rules. Window scaling, offered by both: the server's window of 1000
# is 128000 bytes, so data 100000 bytes ahead is in it, 200000 ahead overshoots it by less
# than a window (let through, see `overshoot`), 300000 ahead by more (INVALID).
= wscale 9015 1 ESTABLISHED
C S 0 win 1000 <ws7>; S S. 0 ack 1 win 1000 <ws7>; C . 1 ack 1 win 1000; S . 1 ack 1 win 1000
C P. 100001(100) ack 1 win 1000; C P. 200001(100) ack 1 win 1000; C P. 300001(100) ack 1 win 1000
# ... offered by the client only: no scaling either way, all three are beyond.
= wscale_one_side 9016 3 ESTABLISHED
C S 0 win 1000 <ws7>; S S. 0 ack 1 win 1000; C . 1 ack 1 win 1000; S . 1 ack 1 win 1000
C P. 100001(100) ack 1 win 1000; C P. 200001(100) ack 1 win 1000; C P. 300001(100) ack 1 win 1000
# A sender that overshoots the window by less than the receiver's largest window: let through
# (not INVALID), and remembered, so the ACK of it is not INVALID either.
= overshoot 9017 0 ESTABLISHED
C S 0; S S. 0 ack 1 win 1000; C . 1 ack 1; C P. 1(1000) ack 1; C P. 1101(100) ack 1
S . 1 ack 1201 win 1000
# A zero window, then the client's one-byte probe.
= zero_window 9018 0 ESTABLISHED
@handshake; C P. 1(100) ack 1; S . 1 ack 101 win 0; C P. 101(1) ack 1; S . 1 ack 102
# A SYN in TIME_WAIT after the client closed first reopens the tuple: the old entry is
# destroyed, a new one made.
= syn_in_time_wait 9019 0 ESTABLISHED
@handshake; C F. 1 ack 1; S F. 1 ack 2; C . 2 ack 2; C S 100000; S S. 70000 ack 100001
C . 100001 ack 70001
# tcp_error: SYN+FIN, no flag at all, FIN without ACK, a wrong checksum: INVALID.
= bad_segments 9020 4 ESTABLISHED
@handshake; C SF 1; C - 1; C F 1; C P. 1(10) ack 1 badsum; C P. 1(10) ack 1; S . 1 ack 11
# A retransmitted SYN/ACK, the final ACK lost, data first.
= synack_retrans 9021 0 ESTABLISHED
C S 0; S S. 0 ack 1; S S. 0 ack 1; C P. 1(100) ack 1; S . 1 ack 101
# Picked up mid-stream (nf_conntrack_tcp_loose) from the client: NEW, then ASSURED once both
# ways are seen; from the server: NEW from outside, dropped, and no entry.
= midstream 9022 0 ESTABLISHED
C P. 1(100) ack 1; S . 1 ack 101; C P. 101(100) ack 1; S . 1 ack 201
= midstream_outside 9023 0 -
S P. 1(100) ack 1
# An ACK more than 66000 bytes (MAXACKWINCONST) behind what the server sent: ignored, let
# through, not INVALID.
= ack_below_window 9024 0 ESTABLISHED
@handshake; @bulk S 46; C . 1 ack 1; S . 67161 ack 1 win 65535
# A SYN in LAST_ACK draws a challenge ACK that must not count as the ACK of the FIN (no
# TIME_WAIT); the client's RST then closes, and its SYN again opens a new connection.
= syn_in_last_ack 9025 0 SYN_RECV
@handshake; S F. 1 ack 1; C . 1 ack 2; C F. 1 ack 2; C S 50000; S . 2 ack 2; C R 2
C S 50000; S S. 80000 ack 50001
# A SYN in ESTABLISHED is ignored but remembered; the server's SYN/ACK for it shows both ends
# started over, and the entry follows them (SYN_RECV, then ESTABLISHED).
= resync 9026 0 ESTABLISHED
@handshake; C P. 1(100) ack 1; S . 1 ack 101; C S 90000; S S. 70000 ack 90001
C . 90001 ack 70001
"#;

/// The TCP options a [`SCRIPT`] names (the timestamps' values do not matter to conntrack).
fn options(name: &str) -> Vec<TcpOptionElement> {
    match name {
        // connect()'s SYN: <mss 1460,sackOK,TS val 1 ecr 0,nop,wscale 8>
        "syn" => vec![Mss(1460), SackOk, Timestamp(1, 0), Noop, WindowScale(8)],
        // The peers' answers: <mss 1460,nop,nop,TS val 1 ecr 1,nop,wscale 0>
        "peer" => vec![Mss(1460), Noop, Noop, Timestamp(1, 1), Noop, WindowScale(0)],
        // listen()'s SYN/ACK: <mss 1460,nop,nop,TS val 100 ecr 1,nop,wscale 8>
        "synack_ws8" => vec![
            Mss(1460),
            Noop,
            Noop,
            Timestamp(100, 1),
            Noop,
            WindowScale(8),
        ],
        // The SYNs of conntrack_synack_reuse: <mss 1000,nop,wscale W,TS val 1 ecr 0,nop,nop>
        "syn_ws7" => vec![Mss(1000), Noop, WindowScale(7), Timestamp(1, 0), Noop, Noop],
        "syn_ws0" => vec![Mss(1000), Noop, WindowScale(0), Timestamp(1, 0), Noop, Noop],
        "ts" => vec![Noop, Noop, Timestamp(1, 1)],
        "ws7" => vec![WindowScale(7)],
        "mss1460" => vec![Mss(1460)],
        "mss1000" => vec![Mss(1000)],
        _ => panic!("no options named {name}"),
    }
}

/// The scenario script's macros (see [`SCRIPT`]), expanded.
fn expand(seg: &str) -> String {
    let connect = "C S 0 win 65535 <syn>; S S. 0 ack 1 win 65535 <mss1460>; \
                   C . 1 ack 1 win 65535; S . 1(1000) ack 1 win 65535; \
                   S . 1001(1000) ack 1 win 65535; S . 2001(1000) ack 1 win 65535; \
                   C . 1 ack 1001 win 65535; C . 1 ack 2001 win 65535; C . 1 ack 3001 win 65535";
    match seg.split_whitespace().collect::<Vec<_>>()[..] {
        ["@handshake"] => "C S 0; S S. 0 ack 1; C . 1 ack 1".to_string(),
        ["@connect"] => connect.to_string(),
        ["@bulk", from, n] => (0..n.parse::<u32>().unwrap())
            .map(|i| {
                let seq = 1 + i * 1460;
                let to = if from == "C" { "S" } else { "C" };
                format!(
                    "{from} P. {seq}(1460) ack 1 win 257; {to} . 1 ack {} win 65535",
                    seq + 1460
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => seg.to_string(),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Client,
    Server,
}

/// One segment of a [`SCRIPT`].
struct Seg {
    from: Side,
    flags: String,
    seq: u32,
    ack: u32,
    len: usize,
    win: u16,
    opts: Vec<TcpOptionElement>,
    /// A wrong TCP checksum.
    bad_checksum: bool,
}

impl Seg {
    fn parse(text: &str) -> Seg {
        let mut w = text.split_whitespace();
        let from = match w.next() {
            Some("C") => Side::Client,
            Some("S") => Side::Server,
            _ => panic!("{text}: no side"),
        };
        let flags = w.next().expect(text).to_string();
        let seq = w.next().expect(text);
        let (seq, len) = match seq.split_once('(') {
            Some((seq, len)) => (seq, len.trim_end_matches(')').parse().expect(text)),
            None => (seq, 0),
        };
        let mut g = Seg {
            from,
            flags,
            seq: seq.parse().expect(text),
            ack: 0,
            len,
            win: 29200,
            opts: Vec::new(),
            bad_checksum: false,
        };
        while let Some(k) = w.next() {
            match k {
                "ack" => g.ack = w.next().and_then(|n| n.parse().ok()).expect(text),
                "win" => g.win = w.next().and_then(|n| n.parse().ok()).expect(text),
                "badsum" => g.bad_checksum = true,
                o if o.starts_with('<') => g.opts = options(o.trim_matches(['<', '>'])),
                _ => panic!("{text}: what is {k}?"),
            }
        }
        g
    }
}

/// One connection: the client's port is `port + 31000`, the server's `port`.
struct Scenario {
    /// Its chain in [`ruleset`].
    name: String,
    port: u16,
    v6: bool,
    c_isn: u32,
    s_isn: u32,
    segs: Vec<Seg>,
    /// Packets the kernel must count as INVALID.
    invalid: u64,
    /// The state the kernel's entry must end in.
    state: String,
}

/// The scenarios of [`SCRIPT`].
fn scenarios() -> Vec<Scenario> {
    let mut v: Vec<Scenario> = Vec::new();
    for line in SCRIPT.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(head) = line.strip_prefix("= ") {
            let w: Vec<&str> = head.split_whitespace().collect();
            let mut sc = Scenario {
                name: w[0].to_string(),
                port: w[1].parse().unwrap(),
                v6: false,
                c_isn: 1_000_000,
                s_isn: 5_000_000,
                segs: Vec::new(),
                invalid: w[2].parse().unwrap(),
                state: w[3].to_string(),
            };
            for extra in &w[4..] {
                match extra.split_once('=') {
                    None if *extra == "v6" => sc.v6 = true,
                    Some(("s_isn", n)) => sc.s_isn = n.parse().unwrap(),
                    _ => panic!("{line}: what is {extra}?"),
                }
            }
            v.push(sc);
            continue;
        }
        let sc = v.last_mut().expect("segments before the first scenario");
        for seg in line.split(';').map(expand) {
            sc.segs.extend(seg.split(';').map(Seg::parse));
        }
    }
    v
}

impl Scenario {
    fn addrs(&self) -> (IpAddr, IpAddr) {
        let (c, s) = if self.v6 {
            (CLIENT6, SERVER6)
        } else {
            (CLIENT, SERVER)
        };
        (c.parse().unwrap(), s.parse().unwrap())
    }

    /// The frame of `g` from its sender's interface to the router's.
    fn frame(&self, g: &Seg, macs: &Macs) -> Vec<u8> {
        let (c, s) = self.addrs();
        let cport = self.port + 31000;
        let (src, dst, sport, dport, isn, peer_isn, mac, router) = match g.from {
            Side::Client => (
                c, s, cport, self.port, self.c_isn, self.s_isn, macs.c, macs.lan,
            ),
            Side::Server => (
                s, c, self.port, cport, self.s_isn, self.c_isn, macs.s, macs.wan,
            ),
        };
        let b = PacketBuilder::ethernet2(mac, router);
        let b = match (src, dst) {
            (IpAddr::V4(a), IpAddr::V4(z)) => b.ipv4(a.octets(), z.octets(), 64),
            (IpAddr::V6(a), IpAddr::V6(z)) => b.ipv6(a.octets(), z.octets(), 64),
            _ => unreachable!(),
        };
        let mut b = b.tcp(sport, dport, isn.wrapping_add(g.seq), g.win);
        for f in g.flags.chars() {
            b = match f {
                'S' => b.syn(),
                '.' => b.ack(peer_isn.wrapping_add(g.ack)),
                'F' => b.fin(),
                'R' => b.rst(),
                'P' => b.psh(),
                '-' => b,
                _ => panic!("flag {f}"),
            };
        }
        if !g.opts.is_empty() {
            b = b.options(&g.opts).unwrap();
        }
        let mut out = Vec::new();
        b.write(&mut out, &vec![b'x'; g.len]).unwrap();
        if g.bad_checksum {
            // Ethernet, the IP header (no options), then the checksum 16 bytes into TCP.
            out[14 + if self.v6 { 40 } else { 20 } + 16] ^= 0xff;
        }
        out
    }
}

/// The hosts' and the router's MAC addresses.
struct Macs {
    c: [u8; 6],
    s: [u8; 6],
    lan: [u8; 6],
    wan: [u8; 6],
}

/// The ruleset both the kernel and keepstate run: a chain per scenario, reached by its server
/// port in either direction, that counts per `ct state` class; the real IPv6 traffic has its
/// own chain too.
fn ruleset(names: &[(&str, u16)]) -> String {
    let mut chains = String::new();
    let mut jumps = Vec::new();
    for (name, port) in names {
        chains.push_str(&format!(
            "\tchain {name} {{\n\
             \t\tct state established,related counter accept\n\
             \t\tct state invalid counter drop\n\
             \t\tiifname \"lan\" oifname \"wan\" ct state new counter accept\n\
             \t\tcounter drop\n\
             \t}}\n"
        ));
        jumps.push(format!("{port} : jump {name}"));
    }
    let jumps = jumps.join(", ");
    format!(
        "flush ruleset\n\
         table inet filter {{\n\
         {chains}\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy drop;\n\
         \t\tmeta l4proto {{ tcp, udp }} th dport vmap {{ {jumps} }}\n\
         \t\tmeta l4proto {{ tcp, udp }} th sport vmap {{ {jumps} }}\n\
         \t\tcounter\n\
         \t}}\n\
         }}\n"
    )
}

/// The labels of [`nft_counters`] for [`ruleset`], in listing order.
fn counter_labels(names: &[(&str, u16)]) -> Vec<String> {
    let mut v = Vec::new();
    for (name, _) in names {
        for class in ["established", "invalid", "new", "other"] {
            v.push(format!("{name} {class}"));
        }
    }
    v.push("forward unmatched".to_string());
    v
}

/// Packets the router's forward hook has counted so far.
fn forwarded_so_far(lab: &Lab) -> u64 {
    nft_counters(&lab.sh(&lab.r, "nft list table inet filter"))
        .iter()
        .map(|c| c.0)
        .sum()
}

/// The real IPv6 traffic: a TCP connection (300 bytes up, 500 down, the client closes
/// first) and a UDP request and answer.
fn real_ipv6(lab: &Lab) {
    let (tx, rx) = std::sync::mpsc::channel();
    let server = spawn_in_netns(&lab.s, move || {
        let l = TcpListener::bind((SERVER6, V6_TCP)).unwrap();
        let u = UdpSocket::bind((SERVER6, V6_UDP)).unwrap();
        tx.send(()).unwrap();
        serve_once(&l, 300, &[b'v'; 500]);
        let mut buf = [0u8; 64];
        let (n, from) = u.recv_from(&mut buf).unwrap();
        u.send_to(&buf[..n].repeat(3), from).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    in_netns(&lab.c, || {
        let mut t = TcpStream::connect((SERVER6, V6_TCP)).unwrap();
        t.write_all(&[b'u'; 300]).unwrap();
        let mut buf = [0u8; 500];
        t.read_exact(&mut buf).unwrap();
        t.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        t.read_to_end(&mut rest).unwrap();
        drop(t);
        let u = UdpSocket::bind((CLIENT6, V6_UDP_CLIENT)).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        u.send_to(b"six", (SERVER6, V6_UDP)).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(u.recv_from(&mut buf).unwrap().0, 9);
    });
    server.join().unwrap();
}

#[test]
fn kernel_and_replay_agree_on_tcp_edges() {
    if !can_run("netns_tcp_edge") {
        return;
    }
    let started = Instant::now();
    let scenarios = scenarios();
    let mut names: Vec<(&str, u16)> = scenarios
        .iter()
        .map(|s| (s.name.as_str(), s.port))
        .collect();
    names.extend([("v6_real_tcp", V6_TCP), ("v6_real_udp", V6_UDP)]);
    let dir = tempfile::tempdir().unwrap();
    let rules_file = dir.path().join("router.nft");
    std::fs::write(&rules_file, ruleset(&names)).unwrap();
    let quiet_file = dir.path().join("quiet.nft");
    std::fs::write(&quiet_file, QUIET).unwrap();

    let mut lab = Lab::new("kstcp", Duration::from_secs(120));
    lab.enable_ipv6();
    let (c, r, s) = (lab.c.clone(), lab.r.clone(), lab.s.clone());
    lab.sh(&r, &format!("nft -f {}", rules_file.display()));
    lab.sh(&r, "sysctl -qw net.netfilter.nf_conntrack_acct=1");
    // CLOSE lasts 10 s by default: long enough here, but not on a slow machine. Both sides get
    // a minute ([`CONNTRACK`] for keepstate).
    lab.sh(
        &r,
        "sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_close=60",
    );
    for ns in [&c, &s] {
        lab.sh(ns, &format!("nft -f {}", quiet_file.display()));
    }
    let macs = Macs {
        c: lab.mac(&c, "eth0"),
        s: lab.mac(&s, "eth0"),
        lan: lab.mac(&r, "lan"),
        wan: lab.mac(&r, "wan"),
    };
    let links = [RawLink::open(&c, "eth0"), RawLink::open(&s, "eth0")];
    lab.start_captures(dir.path());
    let events_file = dir.path().join("events.txt");
    lab.record_events(&events_file);
    eprintln!("netns_tcp_edge: lab up, captures and events running");

    // The crafted segments, one at a time through the router.
    let mut sent = 0u64;
    for sc in &scenarios {
        for g in &sc.segs {
            links[(g.from == Side::Server) as usize].send(&sc.frame(g, &macs));
            sent += 1;
            let deadline = Instant::now() + Duration::from_secs(5);
            while forwarded_so_far(&lab) < sent {
                assert!(
                    Instant::now() < deadline,
                    "{}: segment {} never reached the router's forward hook",
                    sc.name,
                    sent
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    eprintln!("netns_tcp_edge: {sent} crafted segments sent");
    real_ipv6(&lab);
    std::thread::sleep(Duration::from_millis(200));
    let kernel_ct = lab.kernel_table();
    let kernel_nft = lab.sh(&r, "nft list ruleset");
    lab.stop_captures();

    let ours = replay_ingress(
        dir.path(),
        replay(&rules_file, &config6(&rules_file, CONNTRACK), true, true),
        |_, _| {},
    );
    let context = format!(
        "--- keepstate trace\n{}\n--- kernel conntrack -L\n{kernel_ct}--- keepstate\n{}\n--- nft\n{kernel_nft}",
        ours.trace.join("\n"),
        ours.listing.join("\n")
    );

    // The kernel did what each scenario is about (else the scenario tests nothing).
    let theirs_counters = nft_counters(&kernel_nft);
    let labels = counter_labels(&names);
    assert_eq!(theirs_counters.len(), labels.len(), "{context}");
    let kernel_invalid = |name: &str| {
        let i = labels
            .iter()
            .position(|l| *l == format!("{name} invalid"))
            .unwrap();
        theirs_counters[i].0
    };
    let entry = |port: u16| {
        kernel_ct
            .lines()
            .find(|l| l.contains(&format!(" dport={port} ")))
            .map(normalise)
    };
    for sc in &scenarios {
        eprintln!(
            "netns_tcp_edge: {:<22} {} segments, kernel: {} INVALID, {}",
            sc.name,
            sc.segs.len(),
            kernel_invalid(&sc.name),
            entry(sc.port).unwrap_or_default()
        );
        assert_eq!(
            kernel_invalid(&sc.name),
            sc.invalid,
            "{}: the kernel's INVALID count\n{context}",
            sc.name
        );
        let line = entry(sc.port).unwrap_or_else(|| "-".to_string());
        assert!(
            line == sc.state || line.contains(&format!(" {} ", sc.state)),
            "{}: the kernel's entry is not {}: {line}\n{context}",
            sc.name,
            sc.state
        );
    }

    // 1. The tables.
    assert_eq!(
        multiset_diff(
            &multiset(kernel_ct.lines().map(normalise)),
            &multiset(ours.listing.iter().map(|l| normalise(l)))
        ),
        "",
        "conntrack -L differs (- kernel only, + keepstate only)\n{context}"
    );

    // 2. The counters, per scenario and ct state class.
    let diff: Vec<String> = labels
        .iter()
        .zip(theirs_counters.iter().zip(&ours.counters))
        .filter(|(_, (a, b))| a != b)
        .map(|(l, (a, b))| format!("{l}: kernel {a:?}, keepstate {b:?}"))
        .collect();
    assert_eq!(
        theirs_counters.len(),
        ours.counters.len(),
        "counter count\n{context}"
    );
    assert!(
        diff.is_empty(),
        "counters differ:\n{}\n{context}",
        diff.join("\n")
    );

    // 3. The frames forwarded.
    let forwarded = multiset(ours.forwarded.into_iter());
    // The router's own MLD reports come from `::` (it has no link-local address).
    let kernel = kernel_forwarded(
        dir.path(),
        &[ROUTER_LAN, ROUTER_WAN, ROUTER_LAN6, ROUTER_WAN6, "::"],
    );
    assert_eq!(
        multiset_diff(&kernel, &forwarded),
        "",
        "forwarded frames differ (- kernel only, + keepstate only)\n{context}"
    );

    // 4. Every state change on the way, as `conntrack -E` reports it: the paths, not only
    // where they end (simultaneous open through SYN_SENT2, the entries a RST or a reopening
    // SYN destroys).
    let kernel_events: Vec<String> = read_events(&events_file)
        .iter()
        .map(|l| normalise(l))
        .collect();
    let ours_events: Vec<String> = ours
        .trace
        .iter()
        .filter(|l| l.trim_start().starts_with('['))
        .map(|l| normalise(l))
        .collect();
    assert!(
        kernel_events.iter().any(|e| e.contains(" SYN_SENT2 ")),
        "simultaneous open did not pass SYN_SENT2\n{}",
        kernel_events.join("\n")
    );
    assert_eq!(
        kernel_events, ours_events,
        "conntrack -E differs\n{context}"
    );
    eprintln!("netns_tcp_edge: took {:?}", started.elapsed());
}
