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
    let c = |f: Vec<u8>, port, ms| e.process(&f, port, t(ms), 0);
    assert!(matches!(
        c(
            tcp("lan", CLIENT, SERVER, 40000, 21, "S", 100, 0, b""),
            LAN,
            0
        )
        .verdict,
        Verdict::Forward { .. }
    ));
    c(
        tcp("wan", SERVER, BOX_WAN, 21, 40000, "SA", 500, 101, b""),
        WAN,
        1,
    );
    c(
        tcp("lan", CLIENT, SERVER, 40000, 21, "A", 101, 501, b""),
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
        tcp("lan", CLIENT, SERVER, 40000, 21, "PA", 101, 514, user),
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
