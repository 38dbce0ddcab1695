//! The text of a `log` statement's line, in the kernel's format (`nf_log_syslog.c`:
//! `nf_log_dump_packet_common`, `dump_ipv4_packet`, `dump_ipv6_packet`), so the lines read like
//! the `dmesg` lines of the same ruleset under nftables:
//!
//! ```text
//! drop: IN=wan OUT= MAC=02:00:00:00:00:02:02:00:00:00:00:01:08:00 SRC=203.0.113.5 DST=198.51.100.1 LEN=40 TOS=0x00 PREC=0x00 TTL=64 ID=0 PROTO=TCP SPT=5555 DPT=23 WINDOW=64240 RES=0x00 SYN URGP=0
//! ```
//!
//! Owns only the formatting; when to log (and its rate limit) is the engine's. The kernel's
//! optional parts that nft's default `log` leaves out (TCP sequence numbers, IP and TCP
//! options, the socket's uid) are left out too.

use std::fmt::Write;

use super::{tcp_flags as f, Ip, Packet, L4};

/// One log line for `pkt`, received in `frame`, seen with ingress and egress port names
/// (`""` where there is none, as before routing). The MAC header is shown when the packet came
/// in on a port, as the kernel shows it for packets with an input device.
pub fn line(prefix: &str, iif: &str, oif: &str, frame: &[u8], pkt: &Packet<'_>) -> String {
    let mut s = String::with_capacity(200);
    let _ = write!(s, "{prefix}IN={iif} OUT={oif} ");
    if !iif.is_empty() {
        if let Some(mac) = frame.get(..pkt.l3_offset.min(frame.len())) {
            if !mac.is_empty() {
                s.push_str("MAC=");
                let hex: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
                s.push_str(&hex.join(":"));
                s.push(' ');
            }
        }
    }
    let b = pkt.ip_bytes;
    match &pkt.ip {
        Ip::V4(v) => {
            let id = u16::from_be_bytes([b[4], b[5]]);
            let _ = write!(
                s,
                "SRC={} DST={} LEN={} TOS=0x{:02X} PREC=0x{:02X} TTL={} ID={} ",
                v.src,
                v.dst,
                v.total_len,
                v.tos & 0x1e,
                v.tos & 0xe0,
                v.ttl,
                id
            );
            if v.tos & 0x03 == 0x03 {
                s.push_str("CE ");
            }
            if v.dont_fragment {
                s.push_str("DF ");
            }
            if v.frag.more_fragments {
                s.push_str("MF ");
            }
            if v.frag.offset != 0 {
                let _ = write!(s, "FRAG:{} ", v.frag.offset / 8);
            }
        }
        Ip::V6(v) => {
            let _ = write!(
                s,
                "SRC={} DST={} LEN={} TC={} HOPLIMIT={} FLOWLBL={} ",
                v.src,
                v.dst,
                u32::from(v.payload_len) + 40,
                v.traffic_class,
                v.hop_limit,
                v.flow_label
            );
        }
    }
    match &pkt.l4 {
        L4::Tcp(t) => {
            let res = b.get(pkt.l4_offset + 12).map_or(0, |x| x & 0x0f);
            let _ = write!(
                s,
                "PROTO=TCP SPT={} DPT={} WINDOW={} RES=0x{:02x} ",
                t.sport, t.dport, t.window, res
            );
            for (bit, name) in [
                (f::CWR, "CWR"),
                (f::ECE, "ECE"),
                (f::URG, "URG"),
                (f::ACK, "ACK"),
                (f::PSH, "PSH"),
                (f::RST, "RST"),
                (f::SYN, "SYN"),
                (f::FIN, "FIN"),
            ] {
                if t.flags & bit != 0 {
                    let _ = write!(s, "{name} ");
                }
            }
            let urgp = b
                .get(pkt.l4_offset + 18..pkt.l4_offset + 20)
                .map_or(0, |u| u16::from_be_bytes([u[0], u[1]]));
            let _ = write!(s, "URGP={urgp} ");
        }
        L4::Udp(u) => {
            let _ = write!(
                s,
                "PROTO=UDP SPT={} DPT={} LEN={} ",
                u.sport, u.dport, u.length
            );
        }
        L4::Icmp(i) | L4::Icmp6(i) => {
            let name = if matches!(pkt.l4, L4::Icmp(_)) {
                "ICMP"
            } else {
                "ICMPv6"
            };
            let _ = write!(s, "PROTO={name} TYPE={} CODE={} ", i.icmp_type, i.code);
            let echo = matches!((name, i.icmp_type), ("ICMP", 0 | 8) | ("ICMPv6", 128 | 129));
            if echo {
                let _ = write!(s, "ID={} SEQ={} ", i.id, i.seq);
            }
        }
        L4::Fragment { protocol } | L4::Other { protocol } | L4::Malformed { protocol, .. } => {
            let _ = write!(s, "PROTO={protocol} ");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use etherparse::PacketBuilder;

    use super::*;
    use crate::packet::{parse_ethernet, Frame};

    #[test]
    fn a_dropped_syn_reads_like_dmesg() {
        let mut fr = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([203, 0, 113, 5], [198, 51, 100, 1], 64)
            .tcp(5555, 23, 1, 64240)
            .syn()
            .write(&mut fr, &[])
            .unwrap();
        let Frame::Ip(p) = parse_ethernet(&fr) else {
            panic!()
        };
        assert_eq!(
            line("drop: ", "wan", "", &fr, &p),
            "drop: IN=wan OUT= MAC=02:00:00:00:00:02:02:00:00:00:00:01:08:00 SRC=203.0.113.5 \
             DST=198.51.100.1 LEN=40 TOS=0x00 PREC=0x00 TTL=64 ID=0 DF PROTO=TCP SPT=5555 DPT=23 \
             WINDOW=64240 RES=0x00 SYN URGP=0 "
        );
    }

    #[test]
    fn udp_icmp_and_v6() {
        let mut fr = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv6([0x20; 16], [0x30; 16], 7)
            .icmpv6_echo_request(9, 3)
            .write(&mut fr, b"ab")
            .unwrap();
        let Frame::Ip(p) = parse_ethernet(&fr) else {
            panic!()
        };
        let l = line("", "lan", "wan", &fr, &p);
        assert!(
            l.contains(
                " LEN=50 TC=0 HOPLIMIT=7 FLOWLBL=0 PROTO=ICMPv6 TYPE=128 CODE=0 ID=9 SEQ=3 "
            ),
            "{l}"
        );
        let mut u = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([1, 1, 1, 1], [2, 2, 2, 2], 64)
            .udp(53, 5353)
            .write(&mut u, b"xyz")
            .unwrap();
        let Frame::Ip(p) = parse_ethernet(&u) else {
            panic!()
        };
        assert!(line("", "", "wan", &u, &p).ends_with("PROTO=UDP SPT=53 DPT=5353 LEN=11 "));
        // No input port: no MAC.
        assert!(line("", "", "wan", &u, &p).starts_with("IN= OUT=wan SRC=1.1.1.1 "));
    }
}
