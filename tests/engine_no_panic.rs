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
