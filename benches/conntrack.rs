//! Tracker speed: established-flow packets (parse + lookup + state update) with 100k live
//! flows, new connections per second, two threads on the shared table against one, and the
//! memory one tracked connection costs.
//!
//! Targets (issue 4): >= 10 M established packets/s on one core, >= 1 M new connections/s,
//! two threads >= 1.6x one, <= 256 bytes per connection. This file measures; it asserts
//! nothing. Run: `cargo bench --bench conntrack` (add `-- --quick` for a short run).

#[path = "../tests/common/ctkit.rs"]
#[allow(dead_code)]
mod ctkit;

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput};
use ctkit::{tcp, Seg, ACK, SYN};
use keepstate::conntrack::{
    table::CONN_BYTES, Classified, CtConfig, Hook, PktCtx, Timestamp, Tracker,
};
use keepstate::packet::parse_ethernet;

const FLOWS: u32 = 100_000;
const ETH: [u8; 14] = [2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];

fn eth(ip: Vec<u8>) -> Vec<u8> {
    let mut f = ETH.to_vec();
    f.extend_from_slice(&ip);
    f
}

fn client(i: u32) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff)
}

fn ctx(cpu: usize) -> PktCtx {
    PktCtx {
        hook: Hook::Prerouting,
        cpu,
    }
}

fn run(ct: &Tracker, frame: &[u8], cx: PktCtx, now: Timestamp) {
    if let keepstate::packet::Frame::Ip(p) = parse_ethernet(frame) {
        if let Classified::Tracked(t) = ct.classify(&p, cx, now) {
            if t.is_tentative() {
                ct.confirm(&t, cx, now);
            }
            black_box(&t);
        }
    }
}

/// A tracker holding `FLOWS` ASSURED connections, and one data frame per flow per direction,
/// in a scrambled order so lookups wander over the table as real traffic does. The table is
/// at its bound (`max` = `FLOWS`): its indexes are allocated for `max` when it is created.
fn established(cpus: usize) -> (Tracker, Vec<Vec<u8>>) {
    let ct = Tracker::new(CtConfig {
        cpus,
        max: FLOWS as usize,
        ..CtConfig::default()
    });
    let now = Timestamp::from_secs(1);
    let mut frames = Vec::with_capacity(2 * FLOWS as usize);
    for i in 0..FLOWS {
        let c = client(i);
        let s = "192.0.2.1";
        run(
            &ct,
            &eth(tcp(&c, 40000, s, 80, &Seg::new(SYN, 1000, 0))),
            ctx(0),
            now,
        );
        run(
            &ct,
            &eth(tcp(s, 80, &c, 40000, &Seg::new(SYN | ACK, 5000, 1001))),
            ctx(0),
            now,
        );
        run(
            &ct,
            &eth(tcp(&c, 40000, s, 80, &Seg::new(ACK, 1001, 5001))),
            ctx(0),
            now,
        );
        frames.push(eth(tcp(
            &c,
            40000,
            s,
            80,
            &Seg::new(ACK, 1001, 5001).len(18),
        )));
        frames.push(eth(tcp(
            s,
            80,
            &c,
            40000,
            &Seg::new(ACK, 5001, 1001).len(18),
        )));
    }
    assert_eq!(ct.count(), FLOWS as usize);
    // A fixed scramble (multiplicative step coprime to the length).
    let n = frames.len();
    let order: Vec<Vec<u8>> = (0..n).map(|k| frames[(k * 7919) % n].clone()).collect();
    (ct, order)
}

fn rss_bytes() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn report_memory() {
    let before = rss_bytes();
    let (ct, frames) = established(1);
    let after = rss_bytes();
    let frames_bytes: usize =
        frames.iter().map(|f| f.len() + 24).sum::<usize>() + 24 * frames.len();
    let est = CONN_BYTES + ct.table().index_bytes() / ct.count();
    println!("memory: Conn = {CONN_BYTES} B (with Arc header); estimated per connection incl. indexes, table at its bound = {est} B (target <= 256)");
    if let (Some(b), Some(a)) = (before, after) {
        let per = (a.saturating_sub(b).saturating_sub(frames_bytes)) / ct.count();
        println!(
            "memory: RSS growth per connection (100k flows, test frames subtracted) = {per} B"
        );
    }
}

fn one_thread_rate(ct: &Tracker, frames: &[Vec<u8>], rounds: usize) -> f64 {
    let now = Timestamp::from_secs(2);
    let t0 = Instant::now();
    for _ in 0..rounds {
        for f in frames {
            run(ct, f, ctx(0), now);
        }
    }
    (rounds * frames.len()) as f64 / t0.elapsed().as_secs_f64()
}

fn two_thread_rate(ct: &Tracker, frames: &[Vec<u8>], rounds: usize) -> f64 {
    let now = Timestamp::from_secs(2);
    let half = frames.len() / 2;
    let barrier = Barrier::new(2);
    let (a, b) = frames.split_at(half);
    let elapsed = std::thread::scope(|s| {
        let hs: Vec<_> = [(a, 0usize), (b, 1usize)]
            .into_iter()
            .map(|(part, cpu)| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let t0 = Instant::now();
                    for _ in 0..rounds {
                        for f in part {
                            run(ct, f, ctx(cpu), now);
                        }
                    }
                    t0.elapsed()
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or(Duration::MAX))
            .max()
            .unwrap_or(Duration::MAX)
    });
    (rounds * frames.len()) as f64 / elapsed.as_secs_f64()
}

fn report_scaling() {
    let (ct, frames) = established(2);
    let mut one: f64 = 0.0;
    let mut two: f64 = 0.0;
    for _ in 0..3 {
        one = one.max(one_thread_rate(&ct, &frames, 5));
        two = two.max(two_thread_rate(&ct, &frames, 5));
    }
    println!(
        "scaling: 1 thread {:.2} M pkt/s, 2 threads {:.2} M pkt/s, ratio {:.2}x (target >= 1.6x; {} cores here)",
        one / 1e6,
        two / 1e6,
        two / one,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}

fn bench_established(c: &mut Criterion) {
    let (ct, frames) = established(1);
    let mut g = c.benchmark_group("established");
    g.throughput(Throughput::Elements(frames.len() as u64));
    g.sample_size(10);
    let now = Timestamp::from_secs(2);
    g.bench_function("parse+classify 100k flows", |b| {
        b.iter(|| {
            for f in &frames {
                run(&ct, f, ctx(0), now);
            }
        })
    });
    // The same packets in bursts of 8 per flow (a train of segments), as links carry them.
    let burst: Vec<&Vec<u8>> = frames
        .iter()
        .take(frames.len() / 8)
        .flat_map(|f| std::iter::repeat_n(f, 8))
        .collect();
    g.bench_function("parse+classify 100k flows, bursts of 8", |b| {
        b.iter(|| {
            for f in &burst {
                run(&ct, f, ctx(0), now);
            }
        })
    });
    // A working set that fits in cache: the CPU cost without memory stalls.
    let hot: Vec<&Vec<u8>> = frames
        .iter()
        .take(2000)
        .cycle()
        .take(frames.len())
        .collect();
    g.bench_function("parse+classify 1k hot flows", |b| {
        b.iter(|| {
            for f in &hot {
                run(&ct, f, ctx(0), now);
            }
        })
    });
    g.bench_function("parse only", |b| {
        b.iter(|| {
            for f in &frames {
                black_box(parse_ethernet(f));
            }
        })
    });
    g.finish();
}

fn bench_new(c: &mut Criterion) {
    const N: u32 = 200_000;
    let frames: Vec<Vec<u8>> = (0..N)
        .map(|i| {
            eth(tcp(
                &client(i),
                (i % 50_000) as u16 + 1024,
                "192.0.2.1",
                443,
                &Seg::new(SYN, 1000, 0),
            ))
        })
        .collect();
    let mut g = c.benchmark_group("new");
    g.throughput(Throughput::Elements(u64::from(N)));
    g.sample_size(10);
    let now = Timestamp::from_secs(2);
    g.bench_function("SYN classify+confirm", |b| {
        b.iter_batched(
            || Tracker::new(CtConfig::default()),
            |ct| {
                for f in &frames {
                    run(&ct, f, ctx(0), now);
                }
                ct
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn main() {
    report_memory();
    report_scaling();
    let mut c = Criterion::default().configure_from_args();
    bench_established(&mut c);
    bench_new(&mut c);
    c.final_summary();
}
