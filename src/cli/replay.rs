//! `keepstate replay`: runs a capture through the engine ([`crate::replay`]) and prints what
//! happened. Wiring only: builds the engine from `--config` or `--rules`, opens the files,
//! prints the lines the library produces.
//!
//! Output: trace and event lines on stdout as they happen, then the table exactly as
//! `conntrack -L` prints it (lines on stdout, its summary line on stderr, as conntrack does),
//! then one line of verdict counts on stderr.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};

use crate::config::Config;
use crate::conntrack::show::ShowOpts;
use crate::conntrack::CtConfig;
use crate::engine::{Compiled, Engine, Port, Routing};
use crate::replay::{CaptureReader, CaptureWriter, Ingress, Replay, ReplayOpts};
use crate::rules;

/// Everything `keepstate replay` takes.
#[derive(Debug, Clone)]
pub struct Args {
    pub config: Option<PathBuf>,
    pub rules: Option<PathBuf>,
    pub pcap: PathBuf,
    pub out: Option<PathBuf>,
    pub trace: bool,
    pub events: bool,
    pub ingress: Option<String>,
    pub acct: bool,
    pub stats: bool,
    pub log: bool,
    pub expect: bool,
}

fn load_rules(path: &Path) -> anyhow::Result<rules::Loaded> {
    rules::load_file(path).map_err(|d| anyhow::anyhow!("{}:\n{d}", path.display()))
}

/// The engine and the configuration it was built from (none in pairs mode).
fn build(args: &Args) -> anyhow::Result<(Engine, Option<Config>)> {
    if let Some(cfg_path) = &args.config {
        let cfg = Config::load(cfg_path)?;
        let rules_path = args
            .rules
            .clone()
            .or_else(|| cfg.rules.clone())
            .with_context(|| {
                format!(
                    "{} names no rules file (add `rules = \"FILE.nft\"` or pass --rules)",
                    cfg_path.display()
                )
            })?;
        let loaded = load_rules(&rules_path)?;
        let engine = Engine::from_config(&cfg, &loaded)?;
        return Ok((engine, Some(cfg)));
    }
    let Some(rules_path) = &args.rules else {
        bail!("give --config FILE.toml or --rules FILE.nft");
    };
    let loaded = load_rules(rules_path)?;
    // Pairs mode: `lan` and `wan`, no addresses, a frame in on one leaves by the other.
    let ports = ["lan", "wan"]
        .into_iter()
        .map(|n| Port::new(n, vec![]))
        .collect();
    let ct = CtConfig {
        events: true,
        ..CtConfig::default()
    };
    let engine = Engine::new(ports, Routing::Pairs, ct, Compiled::new(&loaded)?);
    Ok((engine, None))
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let (engine, cfg) = build(args)?;
    let ingress = match &args.ingress {
        Some(name) => match engine.port_index(name) {
            Some(i) => Ingress::Fixed(i),
            None => {
                let names: Vec<&str> = engine.ports().iter().map(|p| p.name.as_str()).collect();
                bail!(
                    "--ingress {name}: no such port (ports: {})",
                    names.join(", ")
                );
            }
        },
        None => Ingress::Auto,
    };
    let file = File::open(&args.pcap).with_context(|| format!("{}", args.pcap.display()))?;
    let mut reader = CaptureReader::new(BufReader::new(file))
        .with_context(|| format!("{}", args.pcap.display()))?;
    let mut writer = match &args.out {
        Some(p) => {
            let f = File::create(p).with_context(|| format!("{}", p.display()))?;
            Some(CaptureWriter::new(BufWriter::new(f))?)
        }
        None => None,
    };
    let opts = ReplayOpts {
        trace: args.trace,
        events: args.events,
        log: args.log,
        show: ShowOpts {
            acct: args.acct,
            ..ShowOpts::default()
        },
    };
    let mut replay = Replay::new(engine, cfg, ingress, opts);
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut damaged = None;
    while let Some(next) = reader.next_frame() {
        let frame = match next {
            Ok(f) => f,
            Err(e) => {
                damaged = Some(e);
                break;
            }
        };
        let step = replay.frame(&frame);
        for l in &step.lines {
            writeln!(out, "{l}")?;
        }
        // The answer to a rejected frame leaves too (back towards its sender).
        if let (Some(w), Some(reply)) = (
            writer.as_mut(),
            step.outcome.as_ref().and_then(|o| o.reply.as_ref()),
        ) {
            w.write(frame.ts, reply)?;
        }
        if let (Some(w), Some(_)) = (writer.as_mut(), step.leaves) {
            match step.outcome.as_ref().map(|o| &o.released) {
                // The last fragment of a datagram: every original fragment leaves now.
                Some(frags) if !frags.is_empty() => {
                    for f in frags {
                        w.write(frame.ts, f)?;
                    }
                }
                _ => match step.outcome.as_ref() {
                    Some(o) => w.write(frame.ts, &o.frame)?,
                    None => w.write(frame.ts, &frame.data)?,
                },
            }
        }
    }
    let report = replay.finish();
    for l in report.events.iter().chain(&report.listing) {
        writeln!(out, "{l}")?;
    }
    if args.expect {
        let now = replay.now().nanos();
        for e in replay.engine().tracker().expectations().list(now) {
            writeln!(out, "{}", crate::conntrack::expect::proc_line(&e, now))?;
        }
    }
    out.flush()?;
    drop(out);
    if let Some(w) = writer {
        w.into_inner().flush()?;
    }
    eprintln!("{}", report.list_summary);
    eprintln!("replay: {}", report.counts.summary());
    if args.stats {
        // As `conntrack -S`, then the reassembler's counters as /proc/net/snmp names them.
        print!(
            "{}",
            crate::conntrack::show::stats_lines(&replay.engine().tracker().stats())
        );
        let f = replay.engine().reassembler().stats();
        println!(
            "fragments: ReasmReqds={} ReasmOKs={} ReasmFails={} ReasmTimeout={} ReasmOverlaps={}",
            f.reasm_reqds, f.reasm_oks, f.reasm_fails, f.reasm_timeout, f.reasm_overlaps
        );
    }
    if let Some(e) = damaged {
        eprintln!(
            "replay: {}: stopped after frame {}: {e}",
            args.pcap.display(),
            report.counts.frames
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
