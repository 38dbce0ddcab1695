//! `keepstate bench classify`: builds the decision tree for a ruleset and measures it against
//! the rule-by-rule reference in the same run (see `classify::bench`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use crate::classify::{bench, classbench};
use crate::dataplane::{gen, probe};

pub fn classify(
    rules: Option<&Path>,
    cb: Option<&PathBuf>,
    trace: Option<&Path>,
    packets: usize,
) -> anyhow::Result<ExitCode> {
    let ruleset = match (rules, cb) {
        (Some(r), None) => match crate::rules::load_file(r) {
            Ok(l) => l.ruleset,
            Err(d) => {
                eprint!("{d}");
                return Ok(ExitCode::from(1));
            }
        },
        (None, Some(c)) => {
            let rules =
                classbench::load(c).with_context(|| format!("cannot load {}", c.display()))?;
            classbench::to_ruleset(&c.display().to_string(), &rules)
        }
        _ => anyhow::bail!("give exactly one of --rules FILE or --classbench FILE"),
    };
    let stdout = std::io::stdout();
    bench::bench_classify(&ruleset, trace, packets, &mut stdout.lock())?;
    Ok(ExitCode::SUCCESS)
}

/// `keepstate bench veth`.
#[derive(clap::Args, Debug)]
pub struct VethArgs {
    /// The rules file of the kernel's and keepstate's modes (b, c, d).
    #[arg(
        long,
        default_value = "examples/home-router.nft",
        conflicts_with = "classbench"
    )]
    rules: PathBuf,
    /// Instead of --rules: a ClassBench filter set (e.g. ../shared/classbench/acl1_10k) in
    /// the forward chain of a small edge ruleset.
    #[arg(long)]
    classbench: Option<PathBuf>,
    /// The rules file of mode f: the same policy with a flowtable.
    #[arg(long, default_value = "examples/lab-flowtable.nft")]
    flowtable_rules: PathBuf,
    /// `udp`: 64-byte datagrams; `syn`: a TCP SYN per frame, each a new connection.
    #[arg(long, default_value = "udp", value_parser = ["udp", "syn"])]
    traffic: String,
    /// Distinct flows; several (comma separated) run one after the other and are compared.
    #[arg(long, value_delimiter = ',', default_value = "16,100000")]
    flows: Vec<u32>,
    /// Modes, in the order each round runs them: a kernel without rules, b kernel with the
    /// rules and conntrack, c keepstate 1 worker, d keepstate 2 workers, e keepstate ceiling,
    /// f keepstate 1 worker with the flowtable rules.
    #[arg(long, default_value = "abcdef")]
    modes: String,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per measured window.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds of traffic before each window (more is added for many flows).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Busy polling on keepstate's AF_XDP sockets.
    #[arg(long)]
    busy_poll: bool,
    /// Conntrack table size for both (the kernel's global nf_conntrack_max is restored after).
    #[arg(long)]
    ct_max: Option<u32>,
    /// The generator's core; the firewall gets the other.
    #[arg(long, default_value_t = 1)]
    gen_cpu: usize,
    /// Names the namespaces PREFIX-lan, PREFIX-fw, PREFIX-wan.
    #[arg(long, default_value = "kb")]
    prefix: String,
}

pub fn veth(a: &VethArgs) -> anyhow::Result<ExitCode> {
    use crate::dataplane::bench::{self as vb, Mode};
    let modes = a
        .modes
        .chars()
        .map(|c| {
            Mode::from_key(c).with_context(|| format!("unknown mode `{c}` (modes are a to f)"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let opts = vb::Options {
        prefix: a.prefix.clone(),
        rules: a.rules.clone(),
        classbench: a.classbench.clone(),
        flowtable_rules: a.flowtable_rules.clone(),
        traffic: if a.traffic == "syn" {
            gen::Traffic::Syn
        } else {
            gen::Traffic::Udp
        },
        flows: a.flows.clone(),
        modes,
        rounds: a.rounds.max(1),
        window: std::time::Duration::from_secs_f64(a.seconds.max(0.5)),
        warmup: std::time::Duration::from_secs_f64(a.warmup.max(0.0)),
        busy_poll: a.busy_poll,
        ct_max: a.ct_max,
        gen_cpu: a.gen_cpu.min(1),
        exe: std::env::current_exe().context("find the keepstate binary")?,
    };
    let stdout = std::io::stdout();
    vb::run(&opts, &mut stdout.lock())?;
    Ok(ExitCode::SUCCESS)
}

/// `keepstate bench gen` (hidden).
#[derive(clap::Args, Debug)]
pub struct GenArgs {
    #[arg(long)]
    interface: String,
    #[arg(long, default_value_t = 0)]
    queue: u32,
    #[arg(long)]
    src_mac: String,
    #[arg(long)]
    dst_mac: String,
    #[arg(long)]
    src: std::net::Ipv4Addr,
    #[arg(long)]
    dst: std::net::Ipv4Addr,
    #[arg(long)]
    dport: u16,
    #[arg(long, default_value_t = 1)]
    flows: u32,
    #[arg(long, default_value = "udp", value_parser = ["udp", "syn"])]
    traffic: String,
    #[arg(long)]
    seconds: f64,
}

fn mac(s: &str) -> anyhow::Result<crate::dataplane::Mac> {
    let v = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<Vec<u8>, _>>()
        .with_context(|| format!("bad MAC address `{s}`"))?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("bad MAC address `{s}`"))
}

pub fn gen(a: &GenArgs) -> anyhow::Result<ExitCode> {
    let spec = gen::GenSpec {
        interface: a.interface.clone(),
        queue: a.queue,
        src_mac: mac(&a.src_mac)?,
        dst_mac: mac(&a.dst_mac)?,
        src: a.src,
        dst: a.dst,
        dport: a.dport,
        flows: a.flows,
        traffic: if a.traffic == "syn" {
            gen::Traffic::Syn
        } else {
            gen::Traffic::Udp
        },
        duration: std::time::Duration::from_secs_f64(a.seconds.max(0.0)),
    };
    let sent = gen::run(&spec)?;
    println!(
        "sent {} frames in {:.3} s",
        sent.frames,
        sent.elapsed.as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// `keepstate bench probe` (hidden).
#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// Where the echo requests go.
    dst: std::net::Ipv4Addr,
    #[arg(long)]
    count: u32,
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    interval_ms: u64,
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
}

pub fn probe(a: &ProbeArgs) -> anyhow::Result<ExitCode> {
    let spec = probe::ProbeSpec {
        dst: a.dst,
        count: a.count,
        interval: std::time::Duration::from_millis(a.interval_ms),
        timeout: std::time::Duration::from_millis(a.timeout_ms),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let summary = probe::run(&spec, &mut out)?;
    writeln!(out, "{}", probe::summary_line(summary))?;
    Ok(ExitCode::SUCCESS)
}
