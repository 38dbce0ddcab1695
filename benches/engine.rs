//! The whole engine per packet (parse, conntrack lookup and update, the compiled ruleset at
//! prerouting/forward/postrouting, routing, verdict) on established flows through the example
//! home router, against the tracker alone in the same run (the part of the cost that is
//! conntrack's).
//!
//! Two rulesets: the home router without its nat table (`plain`), and the whole home router,
//! whose masquerade translates every packet of every flow (`nat`); the NAT issue's target is
//! `nat` at no less than 80 % of `plain`'s rate. Each frame is copied into a receive buffer
//! first, as a dataplane receives it: the engine edits frames in place (TTL, NAT).
//!
//! Target (issue 4): >= 10 M established packets/s on one core with 100k live flows. This file
//! measures; it asserts nothing. Run: `cargo bench --bench engine` (`-- --quick` for short).

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use etherparse::PacketBuilder;
use keepstate::config::Config;
use keepstate::conntrack::Timestamp;
use keepstate::engine::{Engine, Verdict, Worker};
use keepstate::rules;

const CONFIG: &str = r#"
[[port]]
name = "lan"
addresses = ["10.0.0.1/8"]

[[port]]
name = "wan"
addresses = ["198.51.100.1/24"]

[[route]]
to = "default"
via = "198.51.100.254"
"#;

fn frame(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: u8,
    seq: u32,
    ack: u32,
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, seq, 64240);
    if flags & 0x02 != 0 {
        b = b.syn();
    }
    if flags & 0x10 != 0 {
        b = b.ack(ack);
    }
    let mut out = Vec::new();
    b.write(&mut out, &[0u8; 6]).unwrap();
    out
}

fn client(i: u32) -> [u8; 4] {
    [10, (i >> 16) as u8, (i >> 8) as u8, i as u8]
}

/// An engine with `flows` established connections LAN -> internet, and one data frame per
/// flow per direction, in a scrambled order. With `nat`, the home router's masquerade
/// translates them, and the replies are addressed to the translated address and port.
fn setup(flows: u32, nat: bool) -> (Engine, Vec<(Vec<u8>, usize)>) {
    let cfg = Config::parse(CONFIG, Path::new("bench.toml")).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/home-router.nft");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = if nat {
        text
    } else {
        text[..text.find("\ntable ip nat {").unwrap()].to_string()
    };
    let rules = rules::load_str("home-router.nft", &text).unwrap();
    let e = Engine::from_config(&cfg, &rules).unwrap();
    let now = Timestamp::from_secs(1000);
    let mut data = Vec::with_capacity(flows as usize * 2);
    for i in 0..flows {
        let c = client(i + 1);
        // One server per 50 000 flows: one masquerade address has only 64 512 ports towards a
        // given server address and port.
        let server = [203, 0, 113, 7 + (i / 50_000) as u8];
        let sport = 10_000 + (i % 50_000) as u16;
        let out = e.process(&frame(c, server, sport, 443, 0x02, 100, 0), 0, now, 0);
        assert!(
            matches!(out.verdict, Verdict::Forward { .. }),
            "{:?}",
            out.verdict
        );
        // Where the replies go: the source as it left (masqueraded or not).
        let (to, to_port) = match keepstate::packet::parse_ethernet(&out.frame) {
            keepstate::packet::Frame::Ip(p) => match (p.ip.src(), &p.l4) {
                (std::net::IpAddr::V4(a), keepstate::packet::L4::Tcp(t)) => (a.octets(), t.sport),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        };
        assert_eq!(nat, to != c);
        e.process(&frame(server, to, 443, to_port, 0x12, 500, 101), 1, now, 0);
        e.process(&frame(c, server, sport, 443, 0x10, 101, 501), 0, now, 0);
        data.push((frame(c, server, sport, 443, 0x10, 101, 501), 0));
        data.push((frame(server, to, 443, to_port, 0x10, 501, 101), 1));
    }
    // Scramble (a fixed LCG) so lookups wander over the table.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..data.len()).rev() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        data.swap(i, (x >> 33) as usize % (i + 1));
    }
    (e, data)
}

fn rate(e: &Engine, data: &[(Vec<u8>, usize)], min: Duration) -> f64 {
    let now = Timestamp::from_secs(1001);
    let start = Instant::now();
    let mut n = 0u64;
    let mut w = Worker::new(0);
    let mut buf = [0u8; 2048];
    while start.elapsed() < min {
        for (f, port) in data {
            let rx = &mut buf[..f.len()];
            rx.copy_from_slice(f);
            black_box(e.process_with(rx, *port, now, &mut w));
        }
        n += data.len() as u64;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench(c: &mut Criterion) {
    for flows in [1_000u32, 100_000] {
        let engines = [setup(flows, false), setup(flows, true)];
        for ((e, data), name) in engines.iter().zip(["plain", "nat"]) {
            let mut g = c.benchmark_group(format!("engine_established_{flows}_flows"));
            g.throughput(Throughput::Elements(data.len() as u64));
            g.bench_function(name, |b| {
                let now = Timestamp::from_secs(1001);
                let mut w = Worker::new(0);
                let mut buf = [0u8; 2048];
                b.iter(|| {
                    for (f, port) in data {
                        let rx = &mut buf[..f.len()];
                        rx.copy_from_slice(f);
                        black_box(e.process_with(rx, *port, now, &mut w));
                    }
                })
            });
            g.finish();
        }
        // The two rulesets alternated in short rounds, so a noisy machine weighs on both
        // alike; medians of the rounds.
        let (mut plain, mut nat) = (Vec::new(), Vec::new());
        for _ in 0..9 {
            plain.push(rate(
                &engines[0].0,
                &engines[0].1,
                Duration::from_millis(150),
            ));
            nat.push(rate(
                &engines[1].0,
                &engines[1].1,
                Duration::from_millis(150),
            ));
        }
        let (p, n) = (median(plain), median(nat));
        eprintln!(
            "engine, {flows} established flows: plain {:.2} M/s, nat {:.2} M/s on one core; nat / plain = {:.2} (target >= 0.80)",
            p / 1e6,
            n / 1e6,
            n / p
        );
    }
}

criterion::criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion::criterion_main!(benches);
