//! Conntrack helpers through the sans-IO engine: an FTP control connection whose helper
//! (`ct helper set`) expects the data connection, which then passes `ct state related`;
//! the same without the helper is refused; the line-start rule; partial commands dropped;
//! the expectation table's bounds and its `/proc/net/nf_conntrack_expect` lines.

mod common {
    pub mod capture;
    pub mod router;
}

use std::path::Path;

use keepstate::config::Config;
use keepstate::conntrack::expect::proc_line;
use keepstate::conntrack::Timestamp;
use keepstate::engine::{DropReason, Engine, Outcome, Verdict};
use keepstate::packet::{checksum, parse_ethernet, Frame, L4};
use keepstate::rules::{self, ir::ct_state};

use common::capture::tcp;
use common::router;

/// The common router, without checksum checks (the frames are hand-made).
fn config() -> String {
    format!("{}\n[conntrack]\nchecksum = false\n", router::CONFIG)
}

const LAN: usize = 0;
const WAN: usize = 1;
const CLIENT: [u8; 4] = [192, 168, 1, 10];
const SERVER: [u8; 4] = [203, 0, 113, 7];
const BOX_WAN: [u8; 4] = [198, 51, 100, 1];

/// A gateway that lets the LAN out (masqueraded) and lets in only what is related, with the
/// FTP helper on port 21 when `helper`.
fn gateway(helper: bool) -> Engine {
    let assign = if helper {
        "\t\ttcp dport 21 ct helper set \"ftp-standard\"\n"
    } else {
        ""
    };
    let text = format!(
        "table inet fw {{\n\
         \tct helper ftp-standard {{\n\t\ttype \"ftp\" protocol tcp;\n\t\tl3proto inet;\n\t}}\n\
         \tchain pre {{\n\t\ttype filter hook prerouting priority filter; policy accept;\n{assign}\t}}\n\
         \tchain forward {{\n\t\ttype filter hook forward priority filter; policy drop;\n\
         \t\tct state established,related accept\n\
         \t\tiifname \"lan\" oifname \"wan\" accept\n\t}}\n}}\n\
         table ip nat {{\n\tchain post {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"wan\" masquerade\n\t}}\n}}\n"
    );
    let cfg = Config::parse(&config(), Path::new("ks.toml")).unwrap();
    let rules = rules::load_str("fw.nft", &text).unwrap();
    Engine::from_config(&cfg, &rules).unwrap()
}

fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(1_000_000 + ms)
}

/// An FTP control connection, established, with the server's greeting and the client's
/// first command (the first line of each direction only teaches the helper where lines
/// start). Returns the next sequence numbers (client, server).
fn control(e: &Engine) -> (u32, u32) {
    control_from(e, CLIENT)
}

/// [`control`] from another LAN host.
fn control_from(e: &Engine, client: [u8; 4]) -> (u32, u32) {
    let c = |f: Vec<u8>, port, ms| e.process(&f, port, t(ms), 0);
    let syn = c(
        tcp("lan", client, SERVER, 40000, 21, "S", 100, 0, b""),
        LAN,
        0,
    );
    assert!(forwarded(&syn));
    c(
        tcp("wan", SERVER, BOX_WAN, 21, 40000, "SA", 500, 101, b""),
        WAN,
        1,
    );
    c(
        tcp("lan", client, SERVER, 40000, 21, "A", 101, 501, b""),
        LAN,
        2,
    );
    let hello = b"220 welcome\r\n";
    c(
        tcp("wan", SERVER, BOX_WAN, 21, 40000, "PA", 501, 101, hello),
        WAN,
        3,
    );
    let user = b"USER anonymous\r\n";
    c(
        tcp("lan", client, SERVER, 40000, 21, "PA", 101, 514, user),
        LAN,
        4,
    );
    (101 + user.len() as u32, 501 + hello.len() as u32)
}

fn forwarded(o: &Outcome) -> bool {
    matches!(o.verdict, Verdict::Forward { .. })
}

#[test]
fn passive_mode_data_connection_is_related_through_masquerade() {
    let e = gateway(true);
    let (cseq, sseq) = control(&e);
    let pasv = b"227 Entering Passive Mode (203,0,113,7,117,49)\r\n";
    let o = e.process(
        &tcp("wan", SERVER, BOX_WAN, 21, 40000, "PA", sseq, cseq, pasv),
        WAN,
        t(10),
        0,
    );
    assert!(forwarded(&o));
    let exp = e.tracker().expectations().list(t(10).nanos());
    assert_eq!(exp.len(), 1);
    assert_eq!(
        proc_line(&exp[0], t(10).nanos()),
        "300 l3proto = 2 proto=6 src=192.168.1.10 dst=203.0.113.7 sport=0 dport=30001 ftp"
    );
    // The client opens the data connection to the announced port: RELATED, and gone from the
    // table of expectations.
    let data = e.process(
        &tcp("lan", CLIENT, SERVER, 41000, 30001, "S", 7, 0, b""),
        LAN,
        t(20),
        0,
    );
    assert!(forwarded(&data));
    assert_eq!(data.ct_state, Some(ct_state::RELATED as u32));
    assert!(e.tracker().expectations().list(t(20).nanos()).is_empty());
    let conn = data.events[0].1.clone();
    assert!(
        conn.master().is_some(),
        "the data connection knows its master"
    );
    assert_ne!(conn.status() & keepstate::conntrack::status::EXPECTED, 0);
}

#[test]
fn active_mode_data_connection_from_outside_is_related_only_with_the_helper() {
    for helper in [true, false] {
        let e = gateway(helper);
        // No NAT for this one: the client's own address is routable (a second, unmasqueraded
        // gateway would be the same); the rules only masquerade what leaves by wan, and the
        // expectation is for the address the server sees.
        let (cseq, sseq) = control(&e);
        let port = b"PORT 198,51,100,1,4,1\r\n";
        e.process(
            &tcp("lan", CLIENT, SERVER, 40000, 21, "PA", cseq, sseq, port),
            LAN,
            t(10),
            0,
        );
        let exp = e.tracker().expectations().list(t(10).nanos());
        // PORT names an address other than the client's own (192.168.1.10): not loose, so
        // nothing is expected; announce the client's own address instead.
        assert!(exp.is_empty());
        let port = b"PORT 192,168,1,10,4,1\r\n";
        let cseq2 = cseq + 23;
        e.process(
            &tcp("lan", CLIENT, SERVER, 40000, 21, "PA", cseq2, sseq, port),
            LAN,
            t(11),
            0,
        );
        let exp = e.tracker().expectations().list(t(11).nanos());
        assert_eq!(exp.len(), usize::from(helper));
        if helper {
            // Expected from the server to the client as the server sees it (masqueraded).
            assert_eq!(
                proc_line(&exp[0], t(11).nanos()),
                "300 l3proto = 2 proto=6 src=203.0.113.7 dst=198.51.100.1 sport=0 dport=1025 ftp"
            );
        }
        let data = e.process(
            &tcp("wan", SERVER, BOX_WAN, 20, 1025, "S", 9, 0, b""),
            WAN,
            t(12),
            0,
        );
        if helper {
            assert_eq!(data.ct_state, Some(ct_state::RELATED as u32));
        } else {
            assert_eq!(data.ct_state, Some(ct_state::NEW as u32));
            assert!(
                !forwarded(&data),
                "without the helper the data connection is refused"
            );
        }
    }
}

#[test]
fn commands_count_only_at_line_starts_and_partial_ones_are_dropped() {
    let e = gateway(true);
    let (cseq, sseq) = control(&e);
    // A reply split in the middle of a line: the second part does not start a line.
    let part1 = b"150 here it comes ";
    e.process(
        &tcp("wan", SERVER, BOX_WAN, 21, 40000, "PA", sseq, cseq, part1),
        WAN,
        t(10),
        0,
    );
    let part2 = b"227 (203,0,113,7,117,49)\r\n";
    let s2 = sseq + part1.len() as u32;
    e.process(
        &tcp("wan", SERVER, BOX_WAN, 21, 40000, "PA", s2, cseq, part2),
        WAN,
        t(11),
        0,
    );
    assert!(e.tracker().expectations().list(t(11).nanos()).is_empty());
    // Now at a line start, a 227 whose numbers do not parse: the kernel drops the segment.
    let s3 = s2 + part2.len() as u32;
    let bad = b"227 Entering Passive Mode (203,0,113\r\n";
    let o = e.process(
        &tcp("wan", SERVER, BOX_WAN, 21, 40000, "PA", s3, cseq, bad),
        WAN,
        t(12),
        0,
    );
    assert_eq!(o.verdict, Verdict::Drop(DropReason::Helper));
    assert!(o.logs[0].contains("partial matching"), "{:?}", o.logs);
}

#[test]
fn one_expectation_per_control_connection_and_they_die_with_it() {
    let e = gateway(true);
    let (cseq, mut sseq) = control(&e);
    for (i, p) in [30001u16, 30002].iter().enumerate() {
        let msg = format!(
            "227 Entering Passive Mode (203,0,113,7,{},{})\r\n",
            p >> 8,
            p & 0xff
        );
        e.process(
            &tcp(
                "wan",
                SERVER,
                BOX_WAN,
                21,
                40000,
                "PA",
                sseq,
                cseq,
                msg.as_bytes(),
            ),
            WAN,
            t(10 + i as u64),
            0,
        );
        sseq += msg.len() as u32;
    }
    // max_expected 1: the newer replaces the older.
    let exp = e.tracker().expectations().list(t(20).nanos());
    assert_eq!(exp.len(), 1);
    assert_eq!(exp[0].tuple.dport(), 30002);
    // It times out after 300 s...
    assert!(e
        .tracker()
        .expectations()
        .list(t(11 + 300_000).nanos())
        .is_empty());
    // ...or goes with its master.
    let master = e.tracker().conns()[0].clone();
    e.tracker().kill(&master);
    assert!(e.tracker().expectations().list(t(21).nanos()).is_empty());
    assert_eq!(e.tracker().expectations().count(), 0);
}

/// A gateway with the SIP helper on udp/5060, behind masquerade when `nat`.
fn sip_gateway_with(nat: bool) -> Engine {
    let masq = if nat {
        "table ip nat {\n\tchain post {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"wan\" masquerade\n\t}\n}\n"
    } else {
        ""
    };
    let text = format!(
        "table inet fw {{\n\
         \tct helper sip-5060 {{\n\t\ttype \"sip\" protocol udp;\n\t}}\n\
         \tchain pre {{\n\t\ttype filter hook prerouting priority filter; policy accept;\n\
         \t\tudp dport 5060 ct helper set \"sip-5060\"\n\t}}\n\
         \tchain forward {{\n\t\ttype filter hook forward priority filter; policy drop;\n\
         \t\tct state established,related accept\n\
         \t\tiifname \"lan\" oifname \"wan\" accept\n\t}}\n}}\n{masq}"
    );
    let cfg = Config::parse(&config(), Path::new("ks.toml")).unwrap();
    let rules = rules::load_str("sip.nft", &text).unwrap();
    Engine::from_config(&cfg, &rules).unwrap()
}

fn sip_gateway() -> Engine {
    sip_gateway_with(false)
}

const PHONE: [u8; 4] = [192, 168, 1, 20];
const PROVIDER: [u8; 4] = [203, 0, 113, 50];

fn sip(from: [u8; 4], to: [u8; 4], port: usize, body: &str) -> Vec<u8> {
    let iface = if port == LAN { "lan" } else { "wan" };
    common::capture::udp(iface, from, to, 5060, 5060, body.as_bytes())
}

fn sdp(addr: &str, port: u16) -> String {
    format!("v=0\r\no=- 1 1 IN IP4 {addr}\r\ns=-\r\nc=IN IP4 {addr}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\n")
}

fn message(start: &str, cseq: &str, extra: &str, body: &str) -> String {
    format!(
        "{start}\r\nVia: SIP/2.0/UDP 192.168.1.20:5060\r\nFrom: <sip:alice@example.org>\r\nTo: <sip:bob@example.org>\r\nCall-ID: 1@x\r\nCSeq: {cseq}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn a_sip_call_expects_rtp_and_rtcp_both_ways() {
    let e = sip_gateway();
    let invite = message(
        "INVITE sip:bob@203.0.113.50 SIP/2.0",
        "1 INVITE",
        "Content-Type: application/sdp\r\n",
        &sdp("192.168.1.20", 40000),
    );
    assert!(forwarded(&e.process(
        &sip(PHONE, PROVIDER, LAN, &invite),
        LAN,
        t(0),
        0
    )));
    let ok = message(
        "SIP/2.0 200 OK",
        "1 INVITE",
        "Content-Type: application/sdp\r\n",
        &sdp("203.0.113.50", 50000),
    );
    assert!(forwarded(&e.process(
        &sip(PROVIDER, PHONE, WAN, &ok),
        WAN,
        t(10),
        0
    )));
    let lines: Vec<String> = e
        .tracker()
        .expectations()
        .list(t(10).nanos())
        .iter()
        .map(|x| proc_line(x, t(10).nanos()))
        .collect();
    assert_eq!(
        lines,
        vec![
            "179 l3proto = 2 proto=17 src=203.0.113.50 dst=192.168.1.20 sport=0 dport=40000 sip/audio",
            "179 l3proto = 2 proto=17 src=203.0.113.50 dst=192.168.1.20 sport=0 dport=40001 sip/audio",
            "180 l3proto = 2 proto=17 src=192.168.1.20 dst=203.0.113.50 sport=0 dport=50000 sip/audio",
            "180 l3proto = 2 proto=17 src=192.168.1.20 dst=203.0.113.50 sport=0 dport=50001 sip/audio",
        ]
    );
    // Media from the provider to the phone: RELATED, let in.
    let rtp = common::capture::udp("wan", PROVIDER, PHONE, 50000, 40000, b"rtp");
    let o = e.process(&rtp, WAN, t(20), 0);
    assert_eq!(o.ct_state, Some(ct_state::RELATED as u32));
    assert!(forwarded(&o));
    // Unannounced media is not.
    let stray = common::capture::udp("wan", PROVIDER, PHONE, 50000, 40010, b"rtp");
    assert!(!forwarded(&e.process(&stray, WAN, t(21), 0)));
    // BYE flushes what is left.
    let bye = message("BYE sip:bob@203.0.113.50 SIP/2.0", "2 BYE", "", "");
    e.process(&sip(PHONE, PROVIDER, LAN, &bye), LAN, t(30), 0);
    assert!(e.tracker().expectations().list(t(30).nanos()).is_empty());
}

#[test]
fn a_registration_lets_the_registrar_call_back() {
    let e = sip_gateway();
    let reg = message(
        "REGISTER sip:example.org SIP/2.0",
        "7 REGISTER",
        "Contact: <sip:alice@192.168.1.20:5062>;expires=600\r\n",
        "",
    );
    e.process(&sip(PHONE, PROVIDER, LAN, &reg), LAN, t(0), 0);
    let exp = e.tracker().expectations().list(t(0).nanos());
    assert_eq!(
        proc_line(&exp[0], t(0).nanos()),
        "3600 l3proto = 2 proto=17 src=203.0.113.50 dst=192.168.1.20 sport=0 dport=5062 PERMANENT,INACTIVE sip/signalling"
    );
    // Inactive until the registrar says yes: a call now is not related.
    let early = common::capture::udp("wan", PROVIDER, PHONE, 5060, 5062, b"INVITE");
    assert!(!forwarded(&e.process(&early, WAN, t(1), 0)));
    let ok = message(
        "SIP/2.0 200 OK",
        "7 REGISTER",
        "Contact: <sip:alice@192.168.1.20:5062>;expires=600\r\n",
        "",
    );
    e.process(&sip(PROVIDER, PHONE, WAN, &ok), WAN, t(2), 0);
    let exp = e.tracker().expectations().list(t(2).nanos());
    assert_eq!(exp[0].flags, keepstate::conntrack::expect::PERMANENT);
    let call = common::capture::udp("wan", PROVIDER, PHONE, 5060, 5062, b"INVITE");
    let o = e.process(&call, WAN, t(3), 0);
    assert_eq!(o.ct_state, Some(ct_state::RELATED as u32));
    // PERMANENT: it stays for the next call, and the new connection has the SIP helper.
    assert_eq!(e.tracker().expectations().count(), 1);
    let conn = o.events[0].1.clone();
    assert_eq!(
        conn.helper().map(|h| h.as_str().to_string()),
        Some("sip".into())
    );
}

#[test]
fn an_sdp_without_an_address_is_dropped_and_the_control_connection_lives_an_hour() {
    let e = sip_gateway();
    let body = "v=0\r\no=- 1 1 IN IP4 192.168.1.20\r\ns=-\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n";
    let invite = message("INVITE sip:bob@203.0.113.50 SIP/2.0", "1 INVITE", "", body);
    let o = e.process(&sip(PHONE, PROVIDER, LAN, &invite), LAN, t(0), 0);
    assert_eq!(o.verdict, Verdict::Drop(DropReason::Helper));
    let options = message("OPTIONS sip:bob@203.0.113.50 SIP/2.0", "2 OPTIONS", "", "");
    let o = e.process(&sip(PHONE, PROVIDER, LAN, &options), LAN, t(1), 0);
    assert!(forwarded(&o));
    let c = e.tracker().conns()[0].clone();
    assert_eq!(c.timeout_secs(t(1)), 3600);
}

/// The frame as it left: payload, sequence and acknowledgement numbers, checksums verified.
fn left(
    o: &Outcome,
) -> (
    Vec<u8>,
    u32,
    u32,
    std::net::IpAddr,
    std::net::IpAddr,
    u16,
    u16,
) {
    let Frame::Ip(p) = parse_ethernet(&o.frame) else {
        panic!("does not parse")
    };
    checksum::verify(&p).expect("checksums verify");
    let L4::Tcp(th) = p.l4 else { panic!() };
    let at = p.l4_offset + usize::from(th.header_len);
    let payload = p.ip_bytes[at..at + th.payload_len as usize].to_vec();
    (
        payload,
        th.seq,
        th.ack,
        p.ip.src(),
        p.ip.dst(),
        th.sport,
        th.dport,
    )
}

#[test]
fn active_ftp_through_masquerade_rewrites_port_and_adjusts_sequence_numbers() {
    let e = gateway(true);
    let client = [192, 168, 1, 5];
    let (cseq, sseq) = control_from(&e, client);
    let port = b"PORT 192,168,1,5,4,1\r\n";
    let o = e.process(
        &tcp("lan", client, SERVER, 40000, 21, "PA", cseq, sseq, port),
        LAN,
        t(10),
        0,
    );
    assert!(forwarded(&o));
    // The server is told the public address; the text is one byte longer.
    let (payload, seq, _, src, ..) = left(&o);
    assert_eq!(payload, b"PORT 198,51,100,1,4,1\r\n");
    assert_eq!((seq, src), (cseq, std::net::IpAddr::from(BOX_WAN)));
    let exp = e.tracker().expectations().list(t(10).nanos());
    assert_eq!(
        proc_line(&exp[0], t(10).nanos()),
        "300 l3proto = 2 proto=6 src=203.0.113.7 dst=198.51.100.1 sport=0 dport=1025 ftp"
    );
    // The server acknowledges the longer stream: the client sees its own numbers.
    let end_seen = cseq + port.len() as u32 + 1;
    let ok = b"200 PORT command successful\r\n";
    let o = e.process(
        &tcp("wan", SERVER, BOX_WAN, 21, 40000, "PA", sseq, end_seen, ok),
        WAN,
        t(11),
        0,
    );
    assert!(forwarded(&o), "{:?}", o.verdict);
    let (_, _, ack, ..) = left(&o);
    assert_eq!(ack, cseq + port.len() as u32);
    // The client's next command leaves one byte further on.
    let list = b"LIST\r\n";
    let next = cseq + port.len() as u32;
    let o = e.process(
        &tcp(
            "lan",
            client,
            SERVER,
            40000,
            21,
            "PA",
            next,
            sseq + ok.len() as u32,
            list,
        ),
        LAN,
        t(12),
        0,
    );
    let (_, seq, ..) = left(&o);
    assert_eq!(seq, next + 1);
    // The data connection from the server's port 20 to the public address reaches the
    // client on the port it asked for: RELATED, and translated (nf_nat_follow_master).
    let data = e.process(
        &tcp("wan", SERVER, BOX_WAN, 20, 1025, "S", 9, 0, b""),
        WAN,
        t(13),
        0,
    );
    assert_eq!(data.ct_state, Some(ct_state::RELATED as u32));
    assert!(forwarded(&data), "{:?}", data.verdict);
    let (_, _, _, src, dst, sport, dport) = left(&data);
    assert_eq!(
        (src, dst, sport, dport),
        (SERVER.into(), client.into(), 20, 1025)
    );
}

/// A port forward to an FTP server inside: its passive-mode answer names its inside address,
/// which the helper rewrites to the public one.
#[test]
fn passive_ftp_to_a_server_behind_a_port_forward() {
    let text = "table inet fw {\n\
         \tct helper ftp-standard {\n\t\ttype \"ftp\" protocol tcp;\n\t}\n\
         \tchain pre {\n\t\ttype filter hook prerouting priority filter; policy accept;\n\
         \t\ttcp dport 21 ct helper set \"ftp-standard\"\n\t}\n\
         \tchain forward {\n\t\ttype filter hook forward priority filter; policy drop;\n\
         \t\tct state established,related accept\n\
         \t\tct status dnat accept\n\t}\n}\n\
         table ip nat {\n\tchain pre {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tiifname \"wan\" tcp dport 21 dnat to 192.168.1.10\n\t}\n}\n";
    let cfg = Config::parse(&config(), Path::new("ks.toml")).unwrap();
    let e = Engine::from_config(&cfg, &rules::load_str("fwd.nft", text).unwrap()).unwrap();
    let out = [203, 0, 113, 99];
    let c = |f: Vec<u8>, port, ms| e.process(&f, port, t(ms), 0);
    assert!(forwarded(&c(
        tcp("wan", out, BOX_WAN, 50000, 21, "S", 10, 0, b""),
        WAN,
        0
    )));
    c(
        tcp("lan", CLIENT, out, 21, 50000, "SA", 70, 11, b""),
        LAN,
        1,
    );
    c(
        tcp("wan", out, BOX_WAN, 50000, 21, "A", 11, 71, b""),
        WAN,
        2,
    );
    let hello = b"220 hi\r\n";
    c(
        tcp("lan", CLIENT, out, 21, 50000, "PA", 71, 11, hello),
        LAN,
        3,
    );
    let pasv = b"227 Entering Passive Mode (192,168,1,10,117,49)\r\n";
    let o = c(
        tcp(
            "lan",
            CLIENT,
            out,
            21,
            50000,
            "PA",
            71 + hello.len() as u32,
            11,
            pasv,
        ),
        LAN,
        4,
    );
    let (payload, ..) = left(&o);
    assert_eq!(
        payload,
        b"227 Entering Passive Mode (198,51,100,1,117,49)\r\n"
    );
    let data = c(
        tcp("wan", out, BOX_WAN, 50001, 30001, "S", 5, 0, b""),
        WAN,
        5,
    );
    assert_eq!(data.ct_state, Some(ct_state::RELATED as u32));
    let (_, _, _, _, dst, _, dport) = left(&data);
    assert_eq!((dst, dport), (CLIENT.into(), 30001));
}

/// A UDP datagram as it left: its payload as text, checksums verified.
fn udp_left(o: &Outcome) -> (String, std::net::IpAddr, std::net::IpAddr, u16, u16) {
    let Frame::Ip(p) = parse_ethernet(&o.frame) else {
        panic!("does not parse")
    };
    checksum::verify(&p).expect("checksums verify");
    let L4::Udp(u) = p.l4 else { panic!() };
    let payload = String::from_utf8_lossy(&p.ip_bytes[p.l4_offset + 8..]).into_owned();
    assert_eq!(usize::from(u.length), p.ip_bytes.len() - p.l4_offset);
    (payload, p.ip.src(), p.ip.dst(), u.sport, u.dport)
}

#[test]
fn a_sip_call_through_masquerade_is_rewritten_and_its_media_flows_both_ways() {
    let e = sip_gateway_with(true);
    let phone = [192, 168, 1, 5];
    let body = "v=0\r\no=- 1 1 IN IP4 192.168.1.5\r\ns=-\r\nc=IN IP4 192.168.1.5\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n";
    let invite = format!(
        "INVITE sip:bob@203.0.113.50 SIP/2.0\r\nVia: SIP/2.0/UDP 192.168.1.5:5060;branch=z9hG4bK1\r\nFrom: <sip:alice@192.168.1.5>;tag=1\r\nTo: <sip:bob@203.0.113.50>\r\nCall-ID: 1@x\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@192.168.1.5:5060>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let o = e.process(&sip(phone, PROVIDER, LAN, &invite), LAN, t(0), 0);
    assert!(forwarded(&o), "{:?}", o.verdict);
    let (text, src, ..) = udp_left(&o);
    assert_eq!(src, std::net::IpAddr::from(BOX_WAN));
    let out_body = "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n";
    assert_eq!(
        text,
        format!(
            "INVITE sip:bob@203.0.113.50 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.1:5060;branch=z9hG4bK1\r\nFrom: <sip:alice@198.51.100.1:5060>;tag=1\r\nTo: <sip:bob@203.0.113.50>\r\nCall-ID: 1@x\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@198.51.100.1:5060>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{out_body}",
            out_body.len()
        )
    );
    // The provider answers to the public address; the phone sees its own Via back.
    let answer = "v=0\r\no=- 2 2 IN IP4 203.0.113.50\r\ns=-\r\nc=IN IP4 203.0.113.50\r\nt=0 0\r\nm=audio 50000 RTP/AVP 0\r\n";
    let ok = format!(
        "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 198.51.100.1:5060;branch=z9hG4bK1\r\nFrom: <sip:alice@198.51.100.1:5060>;tag=1\r\nTo: <sip:bob@203.0.113.50>;tag=2\r\nCall-ID: 1@x\r\nCSeq: 1 INVITE\r\nContact: <sip:bob@203.0.113.50:5060>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{answer}",
        answer.len()
    );
    let o = e.process(&sip(PROVIDER, BOX_WAN, WAN, &ok), WAN, t(10), 0);
    assert!(forwarded(&o), "{:?}", o.verdict);
    let (text, _, dst, ..) = udp_left(&o);
    assert_eq!(dst, std::net::IpAddr::from(phone));
    assert!(
        text.contains("Via: SIP/2.0/UDP 192.168.1.5:5060;branch"),
        "{text}"
    );
    assert!(
        text.contains("From: <sip:alice@192.168.1.5:5060>"),
        "{text}"
    );
    // Media from the provider to the public address reaches the phone...
    let rtp = common::capture::udp("wan", PROVIDER, BOX_WAN, 50000, 40000, b"rtp");
    let o = e.process(&rtp, WAN, t(20), 0);
    assert_eq!(o.ct_state, Some(ct_state::RELATED as u32));
    let (_, _, dst, _, dport) = udp_left(&o);
    assert_eq!((dst, dport), (phone.into(), 40000));
    // ...and the phone's media to the provider leaves from the public address.
    let rtp = common::capture::udp("lan", phone, PROVIDER, 40000, 50000, b"rtp");
    let o = e.process(&rtp, LAN, t(21), 0);
    assert_eq!(o.ct_state, Some(ct_state::ESTABLISHED as u32));
    let (_, src, ..) = udp_left(&o);
    assert_eq!(src, std::net::IpAddr::from(BOX_WAN));
    // The other direction's RTCP was expected too, and lets the phone's first packet out as
    // RELATED when it goes first.
    let rtcp = common::capture::udp("lan", phone, PROVIDER, 40001, 50001, b"rtcp");
    let o = e.process(&rtcp, LAN, t(22), 0);
    assert_eq!(o.ct_state, Some(ct_state::RELATED as u32));
    let (_, src, _, sport, _) = udp_left(&o);
    assert_eq!((src, sport), (BOX_WAN.into(), 40001));
}

/// An OPTIONS from `phone` through masquerade with the top Via `via`, and the provider's
/// 200 OK back with the Via `back(translated source port)`: the Via lines as they left the
/// box each way, and the translated port.
fn via_round_trip(
    e: &Engine,
    phone: [u8; 4],
    via: &str,
    back: impl Fn(u16) -> String,
) -> (String, String, u16) {
    let msg = |start: &str, via: &str| {
        format!("{start}\r\nVia: SIP/2.0/UDP {via}\r\nFrom: <sip:alice@example.org>;tag=1\r\nTo: <sip:bob@example.org>\r\nCall-ID: 1@x\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
    };
    let via_of = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("Via: "))
            .unwrap_or("")
            .to_string()
    };
    let out = msg("OPTIONS sip:bob@203.0.113.50 SIP/2.0", via);
    let o = e.process(&sip(phone, PROVIDER, LAN, &out), LAN, t(0), 0);
    assert!(forwarded(&o), "{:?}", o.verdict);
    let (sent, src, _, sport, _) = udp_left(&o);
    assert_eq!(src, std::net::IpAddr::from(BOX_WAN));
    let answer = msg("SIP/2.0 200 OK", &back(sport));
    let back = common::capture::udp("wan", PROVIDER, BOX_WAN, 5060, sport, answer.as_bytes());
    let o = e.process(&back, WAN, t(1), 0);
    assert!(forwarded(&o), "{:?}", o.verdict);
    let (got, _, dst, _, dport) = udp_left(&o);
    assert_eq!((dst, dport), (std::net::IpAddr::from(phone), 5060));
    (via_of(&sent), via_of(&got), sport)
}

/// nf_nat_sip's top Via parameters: `received=` and `rport=` in an answer name the
/// translated address and port, and become the phone's own; `maddr=` naming the phone in
/// its request becomes the public address; anything naming neither, or in a Via that is not
/// the connection's, is left alone.
#[test]
fn sip_via_received_rport_and_maddr() {
    let e = sip_gateway_with(true);
    // The first phone keeps its port through masquerade: received= becomes the phone's
    // address, rport= already says 5060. A second phone on the same port gets another one:
    // rport= is rewritten too (and the parameter's name is read in any case).
    for (host, received, kept) in [(5, "received", true), (6, "RECEIVED", false)] {
        let phone = [192, 168, 1, host];
        let ip = std::net::IpAddr::from(phone);
        let (sent, got, port) =
            via_round_trip(&e, phone, &format!("{ip}:5060;rport;branch=b"), |p| {
                format!("198.51.100.1:{p};{received}=198.51.100.1;rport={p};branch=b")
            });
        assert_eq!(port == 5060, kept);
        assert_eq!(
            sent,
            format!("Via: SIP/2.0/UDP 198.51.100.1:{port};rport;branch=b")
        );
        assert_eq!(
            got,
            format!("Via: SIP/2.0/UDP {ip}:5060;{received}={ip};rport=5060;branch=b")
        );
    }
    // maddr= naming the phone becomes the public address; a received= in the request names
    // the phone, not the receiver the kernel asks for, so it stays. The answer's top Via is a
    // proxy's: nothing in it is touched, its received= naming the public address included.
    let proxy = "203.0.113.9:5060;received=198.51.100.1;rport=5060;branch=b9";
    let (sent, got, _) = via_round_trip(
        &e,
        [192, 168, 1, 5],
        "192.168.1.5:5060;maddr=192.168.1.5;received=192.168.1.5;branch=b3",
        |p| format!("{proxy}, SIP/2.0/UDP 198.51.100.1:{p};branch=b3"),
    );
    assert_eq!(
        sent,
        "Via: SIP/2.0/UDP 198.51.100.1:5060;maddr=198.51.100.1;received=192.168.1.5;branch=b3"
    );
    assert!(
        got.starts_with(&format!("Via: SIP/2.0/UDP {proxy}, ")),
        "{got}"
    );
}
