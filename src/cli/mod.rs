//! The command line: one file per subcommand, each only wiring the library together.

mod bench;
mod check;
mod ct;
mod lab;
mod reload;
pub mod replay;
mod run;
mod stats;
pub mod trace;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::dataplane::control::proto::{parse_net, parse_proto, ListFilter};

/// keepstate: a stateful edge firewall with nftables syntax and Linux conntrack semantics.
#[derive(Parser, Debug)]
#[command(name = "keepstate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check rules files; print every error as file:line:col with the line and a caret.
    Check {
        /// Print the ruleset as `nft list ruleset` would after `nft -f FILE`.
        #[arg(long)]
        print: bool,
        /// Rules files in nftables syntax.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Trace a packet through a ruleset: the hooks it passes, the rules that match, the verdict.
    #[command(after_help = TRACE_HELP)]
    Trace {
        /// The rules file.
        #[arg(long)]
        rules: PathBuf,
        /// Evaluate with the rule-by-rule reference instead of the decision tree.
        #[arg(long)]
        reference: bool,
        /// The packet, in words: "tcp from 192.168.1.10:40000 to 198.51.100.7:443 iif lan oif wan".
        packet: String,
    },
    /// Replay a capture (pcap or pcapng) through the firewall, the capture's timestamps as
    /// the clock; print the conntrack table at the end as `conntrack -L` would.
    #[command(after_help = REPLAY_HELP)]
    Replay {
        /// The configuration (rules file, ports, routes, conntrack settings).
        #[arg(long, required_unless_present = "rules")]
        config: Option<PathBuf>,
        /// The rules file; alone: two ports `lan` and `wan`, a frame in on one leaves by the
        /// other. With --config: replaces the configuration's rules file.
        #[arg(long)]
        rules: Option<PathBuf>,
        /// The capture to replay (pcap or pcapng).
        #[arg(long)]
        pcap: PathBuf,
        /// Write the frames that leave to this pcap file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print a line per frame: number, time, summary, verdict, ct state, rules (file:line).
        #[arg(long)]
        trace: bool,
        /// Print `conntrack -E` lines as events happen.
        #[arg(long)]
        events: bool,
        /// Every frame arrived on this port (overrides interface names and addresses).
        #[arg(long)]
        ingress: Option<String>,
        /// Show packet and byte counters, as with `sysctl net.netfilter.nf_conntrack_acct=1`.
        #[arg(long)]
        acct: bool,
        /// At the end, print the tracker's statistics as `conntrack -S` does, and the
        /// reassembler's.
        #[arg(long)]
        stats: bool,
        /// Print the lines `log` statements write, in the kernel's format.
        #[arg(long)]
        log: bool,
        /// At the end, print the helpers' expectations as /proc/net/nf_conntrack_expect does.
        #[arg(long)]
        expect: bool,
    },
    /// Run the firewall on the configuration's ports (AF_XDP): SIGHUP reloads the rules,
    /// SIGUSR1 prints counters, SIGTERM or SIGINT stops.
    Run {
        /// The configuration (rules file, ports, routes, conntrack, [dataplane]).
        #[arg(long)]
        config: PathBuf,
    },
    /// Ask the running appliance to reload its rules file (as SIGHUP); exit status 1 and
    /// the diagnostics when the file is refused (the old ruleset keeps running).
    Reload {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// The running appliance's connection table, as the conntrack tool shows it.
    Ct {
        #[command(subcommand)]
        action: CtCommand,
    },
    /// The running appliance's counters: ports, workers, conntrack, NAT, helpers, and the
    /// ruleset with live rule counters as `nft list ruleset` shows them.
    Stats {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Build or remove a network-namespace lab (LAN host, firewall, WAN host) for `run`.
    Lab {
        #[command(subcommand)]
        action: LabCommand,
    },
    /// Measure: the decision tree against the rule-by-rule reference, or the whole box
    /// against the kernel's own firewall on veth pairs.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

/// Which running appliance to talk to.
#[derive(Args, Debug, Clone)]
pub struct ControlArgs {
    /// The control socket (default: the --config file's [dataplane] control, else
    /// /run/keepstate.sock).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Read the control socket's path from this configuration.
    #[arg(long, value_name = "FILE.toml", conflicts_with = "control")]
    pub config: Option<PathBuf>,
}

impl ControlArgs {
    fn path(&self) -> anyhow::Result<PathBuf> {
        ct::control_path(self.control.clone(), self.config.as_deref())
    }
}

#[derive(Subcommand, Debug)]
pub enum CtCommand {
    /// The table, exactly as `conntrack -L` prints it (the summary line on stderr).
    List {
        /// Only connections from this source (ORIGINAL direction); ADDR or ADDR/LEN.
        #[arg(short = 's', long = "src", value_name = "ADDR", value_parser = parse_net)]
        src: Option<ipnet::IpNet>,
        /// Only connections to this destination (ORIGINAL direction); ADDR or ADDR/LEN.
        #[arg(short = 'd', long = "dst", value_name = "ADDR", value_parser = parse_net)]
        dst: Option<ipnet::IpNet>,
        /// Only this protocol: tcp, udp, icmp, icmpv6, ... or a number.
        #[arg(short = 'p', long = "proto", value_name = "PROTO", value_parser = parse_proto)]
        proto: Option<u8>,
        /// A JSON array, one object per connection, instead of conntrack's lines.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Events as `conntrack -E` prints them, until interrupted.
    Events {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// The number of connections (`conntrack -C`).
    Count {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Remove every connection (`conntrack -F`).
    Flush {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// The helpers' expectations, as /proc/net/nf_conntrack_expect lists them.
    Expect {
        #[command(flatten)]
        control: ControlArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Create the namespaces PREFIX-lan, PREFIX-fw, PREFIX-wan and their veth pairs, with
    /// the addresses of examples/lab.toml.
    Up {
        /// The namespaces' name prefix.
        #[arg(long, default_value = "ks")]
        prefix: String,
        /// Receive and transmit queues per veth (at least the configuration's workers).
        #[arg(long, default_value_t = 2)]
        queues: u32,
    },
    /// The product, shown: bring a lab up, run the appliance with examples/home-router.nft,
    /// drive real traffic (ping, curl, a port forward; with examples/office-ftp-sip.nft FTP
    /// out and through a port forward, and a SIP call, each also without its helper),
    /// print what was expected and observed, the box's `ct list` and `stats`, tear it down.
    /// Exit status 0: every scenario passed; 1: one failed; 77: it could not run here (not
    /// root, a tool missing, AF_XDP unavailable), with the reason.
    Demo {
        /// The namespaces' name prefix.
        #[arg(long, default_value = "ksdemo")]
        prefix: String,
        /// Where the example rulesets and lab.toml are.
        #[arg(long, default_value = "examples")]
        examples: PathBuf,
    },
    /// A soak: bring a lab up, run the appliance with examples/home-router.nft under mixed
    /// traffic (downloads, new TCP connections and UDP exchanges by the thousand over IPv4 and
    /// IPv6, pings) for MINUTES, sample its resident memory and connection count, and say
    /// whether the memory stayed flat over the second half of the run (the first is the
    /// warm-up); tear it down. Exit status 0: flat and nothing failed; 1: not (or shorter
    /// than 5 minutes); 77: it could not run here.
    Soak {
        /// How long.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Seconds between samples (default: a twentieth of the run, at least 5).
        #[arg(long)]
        every: Option<u64>,
        /// The namespaces' name prefix.
        #[arg(long, default_value = "kssoak")]
        prefix: String,
        /// Where the example rulesets and lab.toml are.
        #[arg(long, default_value = "examples")]
        examples: PathBuf,
        /// The rules file, in the examples' directory (lab-flowtable.nft: the XDP fast path).
        #[arg(long, default_value = "home-router.nft")]
        rules: PathBuf,
    },
    /// Delete the lab's namespaces (and whatever runs in them).
    Down {
        #[arg(long, default_value = "ks")]
        prefix: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Build time, memory, depth and lookups per second of the tree and of the reference.
    Classify {
        /// A rules file in nftables syntax.
        #[arg(
            long,
            conflicts_with = "classbench",
            required_unless_present = "classbench"
        )]
        rules: Option<PathBuf>,
        /// A ClassBench filter set (as in ../shared/classbench/).
        #[arg(long)]
        classbench: Option<PathBuf>,
        /// A ClassBench trace: lines `src dst sport dport proto expected`; prints mismatches.
        #[arg(long)]
        trace: Option<PathBuf>,
        /// How many packets to sample from the rules when there is no trace.
        #[arg(long, default_value_t = 100_000)]
        packets: usize,
    },
    /// keepstate against the kernel's firewall (nftables + conntrack) side by side on veth
    /// pairs in namespaces, modes alternated in one run (root; see the README).
    Veth(bench::VethArgs),
    /// The bench's AF_XDP traffic generator (started by `bench veth` in the LAN namespace).
    #[command(hide = true)]
    Gen(bench::GenArgs),
    /// The bench's latency prober: ICMP echo requests on a fixed schedule, sleeping between
    /// them (started by `bench veth` in the LAN namespace).
    #[command(hide = true)]
    Probe(bench::ProbeArgs),
}

const TRACE_HELP: &str = "\
Packet words, in any order:
  tcp | udp | icmp | icmpv6 | PROTO    transport protocol (default tcp)
  from ADDR[:PORT]  to ADDR[:PORT]     addresses and ports ([ADDR6]:PORT for IPv6)
  iif NAME  oif NAME                   both: forwarded; iif only: to the box; oif only: from it
  flags syn,ack                        TCP flags (default syn)
  type NAME|N  code N                  ICMP/ICMPv6 type (default echo-request) and code
  ct new|established|related|invalid|untracked   (default new)
  status dnat,assured  ctmark N  direction original|reply  helper NAME
  mark N  ttl N  length N

Example:
  keepstate trace --rules examples/home-router.nft \\
      \"tcp from 192.168.1.10:40000 to 198.51.100.7:443 iif lan oif wan\"";

const REPLAY_HELP: &str = "\
Ingress port of each frame, first rule that applies:
  --ingress PORT                 every frame
  pcapng                         the frame's interface name (if_name): a port name, or a
                                 port's `interface` in the configuration
  pcap with --config             the port the router would route the source address to
  pcap with --rules alone        the first frame's source address is on lan; an address
                                 keeps the side it was first seen sending from, and a frame
                                 from a new address comes from the side opposite its
                                 destination's

Example:
  keepstate replay --config router.toml --pcap capture.pcapng --trace --events";

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check { print, files } => check::run(&files, print),
        Command::Trace {
            rules,
            reference,
            packet,
        } => trace::run(&rules, &packet, reference),
        Command::Replay {
            config,
            rules,
            pcap,
            out,
            trace,
            events,
            ingress,
            acct,
            stats,
            log,
            expect,
        } => replay::run(&replay::Args {
            config,
            rules,
            pcap,
            out,
            trace,
            events,
            ingress,
            acct,
            stats,
            log,
            expect,
        }),
        Command::Run { config } => run::run(&config),
        Command::Reload { control } => reload::run(&control.path()?),
        Command::Stats { control } => stats::run(&control.path()?),
        Command::Ct { action } => match action {
            CtCommand::List {
                src,
                dst,
                proto,
                json,
                control,
            } => ct::list(&control.path()?, ListFilter { src, dst, proto }, json),
            CtCommand::Events { control } => ct::events(&control.path()?),
            CtCommand::Count { control } => ct::count(&control.path()?),
            CtCommand::Flush { control } => ct::flush(&control.path()?),
            CtCommand::Expect { control } => ct::expect(&control.path()?),
        },
        Command::Lab {
            action: LabCommand::Up { prefix, queues },
        } => lab::up(&prefix, queues),
        Command::Lab {
            action: LabCommand::Down { prefix },
        } => lab::down(&prefix),
        Command::Lab {
            action: LabCommand::Demo { prefix, examples },
        } => lab::demo(&prefix, &examples),
        Command::Lab {
            action:
                LabCommand::Soak {
                    minutes,
                    every,
                    prefix,
                    examples,
                    rules,
                },
        } => lab::soak(&prefix, &examples, &rules, minutes, every),
        Command::Bench {
            what:
                BenchCommand::Classify {
                    rules,
                    classbench,
                    trace,
                    packets,
                },
        } => bench::classify(
            rules.as_deref(),
            classbench.as_ref(),
            trace.as_deref(),
            packets,
        ),
        Command::Bench {
            what: BenchCommand::Veth(args),
        } => bench::veth(&args),
        Command::Bench {
            what: BenchCommand::Gen(args),
        } => bench::gen(&args),
        Command::Bench {
            what: BenchCommand::Probe(args),
        } => bench::probe(&args),
    }
}
