//! A malformed packet is counted and treated as INVALID, never a panic: valid frames of every
//! kind, truncated and corrupted at random, and random bytes, through the engine with the
//! example home router.

use std::path::Path;

use etherparse::PacketBuilder;
use keepstate::config::Config;
use keepstate::conntrack::Timestamp;
use keepstate::engine::{Engine, Worker};
use keepstate::rules;
use proptest::prelude::*;

/// One engine for every case: the state the cases leave behind is more input for the next.
fn engine() -> &'static Engine {
    static E: std::sync::OnceLock<Engine> = std::sync::OnceLock::new();
    E.get_or_init(new_engine)
}

fn new_engine() -> Engine {
    let cfg = Config::parse(
        "[[port]]\nname = \"lan\"\naddresses = [\"192.168.1.1/24\", \"fd00::1/64\"]\n[[port]]\nname = \"wan\"\naddresses = [\"198.51.100.1/24\", \"2001:db8::1/64\"]\n[[route]]\nto = \"default\"\nvia = \"198.51.100.254\"\n",
        Path::new("t.toml"),
    )
    .unwrap();
    let r =
        rules::load_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/home-router.nft"))
            .unwrap();
    Engine::from_config(&cfg, &r).unwrap()
}

fn seeds() -> Vec<Vec<u8>> {
    let eth = || PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let mut v = Vec::new();
    let mut push = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut o = Vec::new();
        f(&mut o);
        v.push(o);
    };
    push(&|o| {
        eth()
            .ipv4([192, 168, 1, 9], [203, 0, 113, 1], 64)
            .tcp(1, 80, 5, 100)
            .syn()
            .write(o, b"x")
            .unwrap()
    });
    push(&|o| {
        eth()
            .ipv4([203, 0, 113, 1], [198, 51, 100, 1], 64)
            .udp(53, 9)
            .write(o, b"abcdef")
            .unwrap()
    });
    push(&|o| {
        eth()
            .ipv4([203, 0, 113, 1], [198, 51, 100, 1], 64)
            .icmpv4_echo_request(1, 1)
            .write(o, b"p")
            .unwrap()
    });
    push(&|o| {
        eth()
            .ipv6([0xfd; 16], [0x20; 16], 64)
            .tcp(1, 443, 5, 100)
            .ack(9)
            .write(o, b"data")
            .unwrap()
    });
    push(&|o| {
        eth()
            .ipv6([0x20; 16], [0xfd; 16], 64)
            .icmpv6_echo_reply(1, 1)
            .write(o, b"p")
            .unwrap()
    });
    // An ICMP error quoting a TCP packet.
    push(&|o| {
        let mut q = Vec::new();
        PacketBuilder::ipv4([192, 168, 1, 9], [203, 0, 113, 1], 64)
            .tcp(1, 80, 5, 100)
            .write(&mut q, b"")
            .unwrap();
        eth()
            .ipv4([203, 0, 113, 254], [192, 168, 1, 9], 64)
            .icmpv4(etherparse::Icmpv4Type::TimeExceeded(
                etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
            ))
            .write(o, &q)
            .unwrap()
    });
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn corrupted_frames_never_panic(
        which in 0usize..6,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in prop::option::of(any::<prop::sample::Index>()),
        port in 0usize..3,
        ms in 0u64..100_000,
    ) {
        let e = engine();
        let mut w = Worker::new(0);
        let mut f = seeds()[which].clone();
        for (at, b) in edits {
            let i = at.index(f.len());
            f[i] = b;
        }
        if let Some(c) = cut {
            let n = c.index(f.len() + 1);
            f.truncate(n);
        }
        // Twice, so the second sees whatever state the first left.
        e.process_with(&mut f.clone(), port, Timestamp::from_millis(ms), &mut w);
        e.process_with(&mut f, port, Timestamp::from_millis(ms + 1), &mut w);
        e.housekeeping(Timestamp::from_millis(ms + 40_000), 64);
    }

    #[test]
    fn random_bytes_never_panic(f in prop::collection::vec(any::<u8>(), 0..200)) {
        let e = engine();
        let mut w = Worker::new(0);
        let mut f = f;
        e.process_with(&mut f, 0, Timestamp::from_secs(1), &mut w);
    }
}

/// A gateway with the FTP and SIP helpers behind masquerade, whose FTP control connection is
/// already established: mutated commands, answers and SIP messages reach the helpers and
/// their NAT rewrite (checksums are not checked, so corrupted payloads get that far).
fn helper_engine() -> &'static Engine {
    static E: std::sync::OnceLock<Engine> = std::sync::OnceLock::new();
    E.get_or_init(|| {
        let cfg = Config::parse(
            "[[port]]\nname = \"lan\"\naddresses = [\"192.168.1.1/24\"]\n[[port]]\nname = \"wan\"\naddresses = [\"198.51.100.1/24\"]\n[[route]]\nto = \"default\"\nvia = \"198.51.100.254\"\n[conntrack]\nchecksum = false\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let text = "table inet fw {\n\tct helper ftp-standard {\n\t\ttype \"ftp\" protocol tcp;\n\t}\n\tct helper sip-5060 {\n\t\ttype \"sip\" protocol udp;\n\t}\n\tchain pre {\n\t\ttype filter hook prerouting priority filter; policy accept;\n\t\ttcp dport 21 ct helper set \"ftp-standard\"\n\t\tudp dport 5060 ct helper set \"sip-5060\"\n\t}\n}\ntable ip nat {\n\tchain post {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\toifname \"wan\" masquerade\n\t}\n}\n";
        let e = Engine::from_config(&cfg, &rules::load_str("h.nft", text).unwrap()).unwrap();
        let mut w = Worker::new(0);
        for (f, port) in [
            (ftp(true, "S", 100, 0, b""), 0),
            (ftp(false, "SA", 500, 101, b""), 1),
            (ftp(true, "A", 101, 501, b""), 0),
            (ftp(false, "PA", 501, 101, b"220 hi\r\n"), 1),
            (ftp(true, "PA", 101, 509, b"USER a\r\n"), 0),
        ] {
            let mut f = f;
            e.process_with(&mut f, port, Timestamp::from_secs(1), &mut w);
        }
        e
    })
}

fn ftp(out: bool, flags: &str, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    let (src, dst, sport, dport) = if out {
        ([192, 168, 1, 5], [203, 0, 113, 7], 40000, 21)
    } else {
        ([203, 0, 113, 7], [198, 51, 100, 1], 21, 40000)
    };
    let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, seq, 64240);
    if flags.contains('S') {
        b = b.syn();
    }
    if flags.contains('A') {
        b = b.ack(ack);
    }
    let mut o = Vec::new();
    b.write(&mut o, payload).unwrap();
    o
}

fn helper_seeds() -> Vec<(Vec<u8>, usize)> {
    let sdp = "v=0\r\no=- 1 1 IN IP4 192.168.1.5\r\ns=-\r\nc=IN IP4 192.168.1.5\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n";
    let invite = format!("INVITE sip:b@203.0.113.50 SIP/2.0\r\nVia: SIP/2.0/UDP 192.168.1.5:5060\r\nFrom: <sip:a@192.168.1.5>\r\nContact: <sip:a@192.168.1.5:5060>;expires=60\r\nCSeq: 1 INVITE\r\nContent-Length: {}\r\n\r\n{sdp}", sdp.len());
    let mut sip = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([192, 168, 1, 5], [203, 0, 113, 50], 64)
        .udp(5060, 5060)
        .write(&mut sip, invite.as_bytes())
        .unwrap();
    vec![
        (ftp(true, "PA", 109, 509, b"PORT 192,168,1,5,4,1\r\n"), 0),
        (
            ftp(true, "PA", 109, 509, b"EPRT |1|192.168.1.5|1025|\r\n"),
            0,
        ),
        (
            ftp(
                false,
                "PA",
                509,
                109,
                b"227 Entering Passive Mode (203,0,113,7,117,49)\r\n",
            ),
            1,
        ),
        (
            ftp(
                false,
                "PA",
                509,
                109,
                b"229 Entering Extended Passive Mode (|||30001|)\r\n",
            ),
            1,
        ),
        (sip, 0),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_helper_traffic_never_panics(
        which in 0usize..5,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let e = helper_engine();
        let mut w = Worker::new(1);
        let (mut f, port) = helper_seeds()[which].clone();
        for (at, b) in edits {
            // Mostly the payload: past the Ethernet, IP and transport headers.
            let i = at.index(f.len());
            f[i] = b;
        }
        if let Some(c) = cut {
            let n = c.index(f.len() + 1);
            f.truncate(n);
        }
        e.process_with(&mut f, port, Timestamp::from_secs(2), &mut w);
        e.housekeeping(Timestamp::from_secs(400), 64);
    }
}
