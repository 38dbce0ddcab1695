//! Classifier speed on ClassBench sets: the tree and the reference in the same run.
//!
//! For each of acl1_1k, fw1_1k, ipc1_1k and acl1_10k it first prints (stderr) the build time,
//! memory, depth, lookups/s of tree and reference and their ratio, then runs criterion groups
//! `classify/<set>/tree` and `classify/<set>/reference` with element throughput (lookups/s).
//! Targets: tree >= 100x reference on 10k rules; >= 10M lookups/s on every 1k set; a 10k set
//! builds in < 1 s and takes < 64 MiB.
//!
//! Run: `cargo bench --bench classify` (add `-- tree` to skip the slow reference groups).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keepstate::classify::bench::best_lookups_per_sec;
use keepstate::classify::classbench::{self, SETS};
use keepstate::classify::{Classifier, Evaluation, Linear, NoLimits, PacketKey, Tree};
use keepstate::rules::ir::Hook;

const PACKETS: usize = 4096;

fn load(name: &str) -> (Arc<keepstate::rules::ir::Ruleset>, Vec<PacketKey>) {
    let rules = classbench::load(&classbench::dir().join(name)).expect("ClassBench set");
    let rs = Arc::new(classbench::to_ruleset(name, &rules));
    // Mostly packets inside a rule's box, every 10th uniformly random.
    let keys = classbench::packets(&rules, PACKETS, 10, 1)
        .iter()
        .map(|(p, _)| p.key())
        .collect();
    (rs, keys)
}

fn classify(c: &mut Criterion) {
    for name in SETS {
        let (rs, keys) = load(name);
        let tree = Tree::new(rs.clone()).expect("tree");
        let linear = Linear::new(rs.clone()).expect("reference");
        let s = tree.stats();
        // Best of ten windows: the machine is shared, the best window is the least disturbed.
        let each = Duration::from_millis(100);
        let t = best_lookups_per_sec(&tree, Hook::Forward, &keys, 10, each);
        let r = best_lookups_per_sec(&linear, Hook::Forward, &keys, 10, each);
        eprintln!(
            "{name}: {} rules; build {:.1} ms; memory {:.2} MiB; depth {}; largest leaf {}; \
             tree {:.2} M lookups/s; reference {:.4} M lookups/s; ratio {:.0}x",
            rs.rules().count(),
            s.build_time.as_secs_f64() * 1e3,
            s.bytes as f64 / (1 << 20) as f64,
            s.max_depth,
            s.max_leaf,
            t / 1e6,
            r / 1e6,
            t / r
        );

        let mut g = c.benchmark_group(format!("classify/{name}"));
        g.throughput(Throughput::Elements(keys.len() as u64));
        g.bench_function(BenchmarkId::from_parameter("tree"), |b| {
            let mut out = Evaluation::new();
            b.iter(|| {
                for k in &keys {
                    tree.eval(Hook::Forward, black_box(k), &mut NoLimits, &mut out);
                }
                black_box(&out);
            })
        });
        // The reference walks thousands of rules per packet: fewer, longer samples.
        g.sample_size(10).measurement_time(Duration::from_secs(3));
        g.throughput(Throughput::Elements(512));
        g.bench_function(BenchmarkId::from_parameter("reference"), |b| {
            let mut out = Evaluation::new();
            b.iter(|| {
                for k in &keys[..512] {
                    linear.eval(Hook::Forward, black_box(k), &mut NoLimits, &mut out);
                }
                black_box(&out);
            })
        });
        g.finish();
        black_box(&linear as &dyn Classifier);
    }
}

fn build(c: &mut Criterion) {
    let (rs, _) = load("acl1_10k");
    let mut g = c.benchmark_group("build");
    g.sample_size(10);
    g.bench_function("acl1_10k", |b| {
        b.iter(|| Tree::new(rs.clone()).expect("tree"))
    });
    g.finish();
}

criterion_group!(benches, classify, build);
criterion_main!(benches);
