//! Measuring the classifier, for `keepstate bench` and `benches/classify.rs`: build cost, shape,
//! lookups per second of the tree and of the reference in the same run, and agreement with a
//! ClassBench trace's expected answers.
//!
//! Owns only measurement and reporting; it returns `anyhow::Result` because its one caller is
//! the CLI, which reports whatever went wrong (an unreadable trace, a ruleset that does not
//! compile) as it is.

use std::hint::black_box;
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::classbench::{parse_trace_line, SplitMix64};
use super::{
    field_index, Classifier, Evaluation, Linear, NoLimits, PacketKey, Tree, FIELDS, HOOKS,
};
use crate::rules::ir::{Field, Hook, Match, Ruleset};

/// What [`bench_classify`] measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub hook: Hook,
    pub rules: usize,
    pub build_time: Duration,
    pub bytes: usize,
    pub depth: usize,
    pub tree_lookups_per_sec: f64,
    pub reference_lookups_per_sec: f64,
    /// `(tree, reference)` packets whose first matching rule's line differs from the trace's.
    pub mismatches: Option<(usize, usize)>,
}

impl BenchReport {
    pub fn ratio(&self) -> f64 {
        self.tree_lookups_per_sec / self.reference_lookups_per_sec
    }
}

/// Lookups per second of `c` over `keys` at `hook`, repeating the keys for at least `min`.
pub fn lookups_per_sec(c: &dyn Classifier, hook: Hook, keys: &[PacketKey], min: Duration) -> f64 {
    if keys.is_empty() {
        return 0.0;
    }
    let mut out = Evaluation::new();
    let mut limiter = NoLimits;
    let start = Instant::now();
    let mut done = 0usize;
    loop {
        for k in keys {
            c.eval(hook, black_box(k), &mut limiter, &mut out);
            black_box(&out);
        }
        done += keys.len();
        let t = start.elapsed();
        if t >= min {
            return done as f64 / t.as_secs_f64();
        }
    }
}

/// The best of `windows` measurements of [`lookups_per_sec`], each at least `each` long: on a
/// shared machine the best window is the one least disturbed by other processes.
pub fn best_lookups_per_sec(
    c: &dyn Classifier,
    hook: Hook,
    keys: &[PacketKey],
    windows: usize,
    each: Duration,
) -> f64 {
    (0..windows.max(1))
        .map(|_| lookups_per_sec(c, hook, keys, each))
        .fold(0.0, f64::max)
}

/// Random keys biased toward `rs`'s rules: every field some rule tests gets a random value,
/// then the fields of one random rule's matches get values inside them.
pub fn sample_keys(rs: &Ruleset, n: usize, seed: u64) -> Vec<PacketKey> {
    let rules: Vec<_> = rs.rules().collect();
    let mut tested = [false; super::NFIELDS];
    for r in &rules {
        for m in &r.matches {
            for f in m.fields() {
                tested[field_index(f)] = true;
            }
        }
    }
    let mut rng = SplitMix64(seed);
    let mut rand = |max: u128| {
        let v = ((rng.next_u64() as u128) << 64) | rng.next_u64() as u128;
        v & max
    };
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut k = PacketKey::new();
        for f in FIELDS {
            if tested[field_index(f)] {
                k.set(f, rand(f.max()));
            }
        }
        if !rules.is_empty() {
            let r = rules[(rand(u64::MAX as u128) % rules.len() as u128) as usize];
            for m in &r.matches {
                match m {
                    Match::Set {
                        field,
                        negate: false,
                        set,
                    } => {
                        if let Some(iv) = set.intervals().first() {
                            let span = iv.hi - iv.lo;
                            let off = if span == u128::MAX {
                                rand(u128::MAX)
                            } else {
                                rand(u128::MAX) % (span + 1)
                            };
                            k.set(*field, iv.lo + off);
                        }
                    }
                    Match::Masked {
                        field,
                        negate: false,
                        mask,
                        value,
                    } => {
                        let v = (rand(Field::max(*field)) & !mask) | (value & mask);
                        k.set(*field, v);
                    }
                    Match::Concat {
                        fields,
                        negate: false,
                        elems,
                    } => {
                        if let Some(e) = elems.first() {
                            for (f, iv) in fields.iter().zip(e) {
                                k.set(*f, iv.lo);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        out.push(k);
    }
    out
}

/// Builds the tree for `ruleset` and prints its build time, memory and depth, the lookups per
/// second of the tree and of the reference measured in this run, and their ratio. With a
/// `trace` (lines `src dst sport dport proto expected`, `expected` the 1-based line of the first
/// matching ClassBench rule, 0 for none) the packets are the trace's and it also prints the
/// mismatches of each; otherwise `packets` keys are sampled from the rules.
///
/// The hook measured is forward if it has base chains, else the first hook that has.
pub fn bench_classify(
    ruleset: &Ruleset,
    trace: Option<&Path>,
    packets: usize,
    out: &mut impl Write,
) -> anyhow::Result<BenchReport> {
    let rs = Arc::new(ruleset.clone());
    let tree = Tree::new(rs.clone()).context("cannot compile the ruleset")?;
    let linear = Linear::new(rs.clone()).context("cannot compile the ruleset")?;
    let hook = if rs.base_chains(Hook::Forward).is_empty() {
        HOOKS
            .into_iter()
            .find(|h| !rs.base_chains(*h).is_empty())
            .unwrap_or(Hook::Forward)
    } else {
        Hook::Forward
    };
    let mut expected = Vec::new();
    let keys: Vec<PacketKey> = match trace {
        Some(path) => {
            let f = std::fs::File::open(path)
                .with_context(|| format!("cannot open trace {}", path.display()))?;
            let mut keys = Vec::new();
            for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
                let line = line.with_context(|| format!("cannot read trace {}", path.display()))?;
                if line.trim().is_empty() || line.trim_start().starts_with('#') {
                    continue;
                }
                let (p, e) = parse_trace_line(&line).with_context(|| {
                    format!(
                        "{}:{}: expected `src dst sport dport proto expected`, found `{line}`",
                        path.display(),
                        i + 1
                    )
                })?;
                keys.push(p.key());
                expected.push(e);
            }
            keys
        }
        None => sample_keys(&rs, packets.max(1), 0x6b65_6570),
    };
    let mismatches = trace.map(|_| {
        let count = |c: &dyn Classifier| {
            let mut ev = Evaluation::new();
            keys.iter()
                .zip(&expected)
                .filter(|(k, e)| {
                    c.eval(hook, k, &mut NoLimits, &mut ev);
                    let line = ev
                        .first_rule()
                        .and_then(|id| super::rule_by_id(&rs, id))
                        .map_or(0, |r| r.loc.line);
                    line != **e
                })
                .count()
        };
        (count(&tree), count(&linear))
    });
    let stats = tree.stats().clone();
    let tree_lps = best_lookups_per_sec(&tree, hook, &keys, 5, Duration::from_millis(100));
    let ref_lps = best_lookups_per_sec(&linear, hook, &keys, 5, Duration::from_millis(100));
    let report = BenchReport {
        hook,
        rules: rs.rules().count(),
        build_time: stats.build_time,
        bytes: stats.bytes,
        depth: stats.max_depth,
        tree_lookups_per_sec: tree_lps,
        reference_lookups_per_sec: ref_lps,
        mismatches,
    };
    writeln!(
        out,
        "rules: {} (hook {:?}, {} packets)",
        report.rules,
        hook,
        keys.len()
    )?;
    writeln!(
        out,
        "build time: {:.1} ms",
        stats.build_time.as_secs_f64() * 1e3
    )?;
    writeln!(
        out,
        "memory: {:.2} MiB ({} nodes, {} leaves, {} leaf entries)",
        stats.bytes as f64 / (1 << 20) as f64,
        stats.nodes,
        stats.leaves,
        stats.leaf_items
    )?;
    writeln!(
        out,
        "depth: {} (largest leaf {})",
        stats.max_depth, stats.max_leaf
    )?;
    writeln!(out, "tree: {:.0} lookups/s", tree_lps)?;
    writeln!(out, "reference: {:.0} lookups/s", ref_lps)?;
    writeln!(out, "ratio: {:.1}x", report.ratio())?;
    if let Some((t, r)) = mismatches {
        writeln!(out, "mismatches: {t} (tree)")?;
        writeln!(out, "mismatches: {r} (reference)")?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::classbench;

    #[test]
    fn trace_of_expected_lines_has_no_mismatches() {
        let text = "@10.0.0.0/8\t0.0.0.0/0\t0 : 65535\t22 : 22\t0x06/0xFF\t0x0000/0x0000\n\
                    @0.0.0.0/0\t192.168.0.0/16\t0 : 65535\t0 : 65535\t0x00/0x00\t0x0000/0x0000\n";
        let rules = classbench::parse("t", text).expect("valid rules");
        let rs = classbench::to_ruleset("t", &rules);
        let dir = std::env::temp_dir().join(format!("keepstate-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let trace = dir.join("trace");
        let mut lines = String::new();
        for (p, e) in classbench::packets(&rules, 200, 3, 9) {
            lines += &format!(
                "{} {} {} {} {} {e}\n",
                std::net::Ipv4Addr::from(p.src),
                p.dst,
                p.sport,
                p.dport,
                p.proto
            );
        }
        lines += "10.1.2.3 3232235521 1 22 6 1\n";
        std::fs::write(&trace, lines).expect("write trace");
        let mut out = Vec::new();
        let report = bench_classify(&rs, Some(&trace), 0, &mut out).expect("bench runs");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(report.mismatches, Some((0, 0)));
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains("mismatches: 0 (tree)"), "{text}");
        assert!(text.contains("ratio:"), "{text}");
    }
}
