//! `keepstate bench veth`: keepstate against the kernel's own firewall on the same box, side
//! by side, in one run.
//!
//! ```text
//!  PREFIX-lan: generator ──veth── PREFIX-fw: lan [firewall] wan ──veth── PREFIX-wan: sink
//!  (keepstate bench gen, AF_XDP       kernel (ip_forward, nft)          (counts at eth0,
//!   transmit, pinned to one core)     or keepstate run, on the other     drops udp/9)
//! ```
//!
//! Modes, alternated round by round so that the machine's drift hits them all alike:
//! - `a` kernel forwarding, no rules (no conntrack either);
//! - `b` the kernel with the rules file loaded by `nft -f` (conntrack, NAT);
//! - `c` keepstate, 1 worker, the same rules file;
//! - `d` keepstate, 2 workers;
//! - `e` keepstate, 1 worker, a ruleset that only says `notrack`: the AF_XDP ceiling;
//! - `f` keepstate, 1 worker, the flowtable rules file (by default examples/lab-flowtable.nft:
//!   the same policy with `flow add @fastpath`): offloaded flows skip every chain, and with
//!   the XDP fast path they never reach the worker.
//!
//! The same core budget: the generator runs on one core, the firewall on the other. The
//! kernel's forwarding is moved there with RPS on the firewall's veths (without it the
//! kernel would forward on the generator's core, inside its send calls); keepstate's worker
//! is pinned there, and so is the veths' NAPI thread in mode `f`, where it is the whole
//! forwarding (at the lowest priority: the worker comes first, see `Bench::window`). In
//! the workers' modes the NAPI thread (veth's receive copy into the UMEM) runs on the
//! generator's core: on the worker's own core it starves the worker. Mode `d` uses both
//! cores.
//!
//! Per window: packets delivered at the sink's veth, packets the generator's veth sent, CPU
//! time of all cores from /proc/stat less the machine's other processes, the generator's own
//! CPU time from /proc/PID/stat (shown apart), keepstate's process CPU time, the table's
//! size, and the round-trip times of echo requests sent through the firewall every 5 ms
//! during the window (latency under load). The targets are judged on all cores per
//! delivered packet: the kernel charges softirq work to whatever task it interrupts (the
//! generator's send calls, or an idle core), so the split between generator and firewall
//! varies by mode; the sum does not.
//!
//! The echo requests come from keepstate's own prober (`keepstate bench probe`, see
//! [`probe`]), which sleeps between them; iputils ping busy-waits at such intervals and took
//! 20–66 % of a core. The prober's CPU time counts as the firewall's, not as other load:
//! in the kernel's modes most of it is the kernel's forwarding (see `cpu_others`).
//!
//! Before and after the windows it prints this sitting's memory latency on the firewall's
//! core ([`memprobe`]): the fast path's cost at a million flows is one random load a packet.
//!
//! Owns the bench's namespaces (removed on drop) and the processes it starts; touches
//! nothing outside them except reading /proc/stat and, with `--ct-max`, the global
//! `nf_conntrack_max` (restored at the end).

use std::fmt::Write as _;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::gen::{Traffic, PORTS};
use super::lab::{self, Lab};
use super::memprobe;
use super::probe;
use super::wire::Mac;
use crate::classify::classbench;

/// The nice value of the firewall veths' NAPI threads in mode f, on the worker's core: the
/// lowest priority, so the worker comes first (see [`Bench::window`]).
const NAPI_NICE_FASTPATH: i32 = 19;

/// How often the latency prober sends, and how long each request waits for its reply.
const PROBE_INTERVAL: Duration = Duration::from_millis(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// One way of forwarding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    KernelBare,
    KernelNft,
    Keepstate1,
    Keepstate2,
    Ceiling,
    Flowtable,
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Mode::KernelBare,
        Mode::KernelNft,
        Mode::Keepstate1,
        Mode::Keepstate2,
        Mode::Ceiling,
        Mode::Flowtable,
    ];

    pub fn key(self) -> char {
        match self {
            Mode::KernelBare => 'a',
            Mode::KernelNft => 'b',
            Mode::Keepstate1 => 'c',
            Mode::Keepstate2 => 'd',
            Mode::Ceiling => 'e',
            Mode::Flowtable => 'f',
        }
    }

    pub fn from_key(k: char) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.key() == k)
    }

    fn title(self) -> &'static str {
        match self {
            Mode::KernelBare => "kernel, no rules",
            Mode::KernelNft => "kernel, nft rules + conntrack",
            Mode::Keepstate1 => "keepstate, 1 worker",
            Mode::Keepstate2 => "keepstate, 2 workers",
            Mode::Ceiling => "keepstate, notrack (ceiling)",
            Mode::Flowtable => "keepstate, 1 worker, flowtable",
        }
    }

    fn is_kernel(self) -> bool {
        matches!(self, Mode::KernelBare | Mode::KernelNft)
    }
}

/// What `keepstate bench veth` was asked.
#[derive(Clone, Debug)]
pub struct Options {
    pub prefix: String,
    /// The rules file of modes b, c and d.
    pub rules: PathBuf,
    /// Instead of `rules`: a ClassBench filter set, put into the forward chain of a small
    /// edge ruleset (see [`classbench_ruleset`]).
    pub classbench: Option<PathBuf>,
    /// The rules file of mode f.
    pub flowtable_rules: PathBuf,
    pub traffic: Traffic,
    /// One mix per entry: the number of distinct flows.
    pub flows: Vec<u32>,
    pub modes: Vec<Mode>,
    pub rounds: usize,
    pub window: Duration,
    /// Extra warm-up before each window (the generator runs; the table fills).
    pub warmup: Duration,
    pub busy_poll: bool,
    /// `nf_conntrack_max` for the kernel and `max` for keepstate.
    pub ct_max: Option<u32>,
    /// The core of the generator; the firewall gets the other one.
    pub gen_cpu: usize,
    pub exe: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("the veth bench needs root (network namespaces, AF_XDP, nft)")]
    NotRoot,
    #[error("the veth bench needs two cores; this machine has {0}")]
    Cores(usize),
    #[error(transparent)]
    Lab(#[from] lab::LabError),
    #[error("`{command}` failed: {reason}")]
    Command { command: String, reason: String },
    #[error("{0}")]
    Other(String),
    #[error("stopped by a signal; the bench's namespaces are removed")]
    Stopped,
}

/// Set by SIGINT or SIGTERM (a second one ends the process at once): the bench returns
/// [`BenchError::Stopped`] from its next wait, so that its namespaces, processes and
/// `nf_conntrack_max` are put back on the way out, as on any error.
static STOP: std::sync::LazyLock<Arc<AtomicBool>> =
    std::sync::LazyLock::new(|| Arc::new(AtomicBool::new(false)));

/// Sleeps `d`, or less if the bench is stopped.
fn nap(d: Duration) -> Result<(), BenchError> {
    let end = Instant::now() + d;
    loop {
        if STOP.load(Ordering::Relaxed) {
            return Err(BenchError::Stopped);
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

fn cmd_err(command: &str, reason: impl ToString) -> BenchError {
    BenchError::Command {
        command: command.to_string(),
        reason: reason.to_string(),
    }
}

/// One window of one mode.
#[derive(Clone, Debug)]
pub struct Sample {
    pub mode: Mode,
    /// Seconds of traffic before the window.
    pub warm: f64,
    pub secs: f64,
    pub sent: u64,
    pub delivered: u64,
    /// CPU seconds in the window: all cores, the generator, the keepstate process.
    pub cpu_all: f64,
    pub cpu_gen: f64,
    pub cpu_ks: f64,
    /// Connections in the firewall's table when the window closed (`conntrack -C`,
    /// `keepstate ct count`); `None` for modes that track nothing.
    pub table: Option<u64>,
    /// CPU seconds of the machine's other processes (see [`cpu_others`]).
    pub cpu_other: f64,
    /// Round-trip times in milliseconds, and probes lost.
    pub rtts: Vec<f64>,
    pub lost: u32,
}

impl Sample {
    pub fn pps(&self) -> f64 {
        self.delivered as f64 / self.secs
    }
    fn per_pkt_ns(&self, cpu: f64) -> f64 {
        if self.delivered == 0 {
            f64::NAN
        } else {
            cpu * 1e9 / self.delivered as f64
        }
    }
    /// CPU per delivered packet of all cores, less the machine's other processes: the
    /// generator, the firewall, the kernel's veth work and the sink. The figure the targets
    /// are judged on: where the kernel charges softirq work (to the generator's process when
    /// it runs in its send calls, to nobody when a core was idle) varies by mode, the sum
    /// does not.
    pub fn total_ns(&self) -> f64 {
        self.per_pkt_ns((self.cpu_all - self.cpu_other).max(0.0))
    }
    /// [`Sample::total_ns`] less the generator's process.
    pub fn firewall_ns(&self) -> f64 {
        self.per_pkt_ns((self.cpu_all - self.cpu_gen - self.cpu_other).max(0.0))
    }
}

/// The results of one mix.
#[derive(Clone, Debug)]
pub struct MixResult {
    pub flows: u32,
    pub samples: Vec<Sample>,
}

impl MixResult {
    fn of(&self, m: Mode) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.mode == m).collect()
    }
    fn median(&self, m: Mode, f: impl Fn(&Sample) -> f64) -> Option<f64> {
        let mut v: Vec<f64> = self
            .of(m)
            .into_iter()
            .map(f)
            .filter(|x| x.is_finite())
            .collect();
        median(&mut v)
    }
    pub fn median_pps(&self, m: Mode) -> Option<f64> {
        self.median(m, Sample::pps)
    }
    /// The connections in mode `m`'s table when its windows closed, the median.
    fn median_table(&self, m: Mode) -> Option<f64> {
        self.median(m, |x| x.table.map_or(f64::NAN, |t| t as f64))
    }
    pub fn median_total_ns(&self, m: Mode) -> Option<f64> {
        self.median(m, Sample::total_ns)
    }
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn percentile(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    Some(v[i])
}

/// The bench's namespaces, removed on drop; and `nf_conntrack_max` restored.
struct Topology {
    lab: Lab,
    dir: tempfile::TempDir,
    saved_ct_max: Option<String>,
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.lab.down();
        if let Some(v) = &self.saved_ct_max {
            let _ = std::fs::write("/proc/sys/net/netfilter/nf_conntrack_max", v);
        }
    }
}

fn run_ok(prog: &str, args: &[&str]) -> Result<String, BenchError> {
    let command = format!("{prog} {}", args.join(" "));
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|e| cmd_err(&command, e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(cmd_err(
            &command,
            String::from_utf8_lossy(&out.stderr).trim(),
        ))
    }
}

fn ns_ok(ns: &str, cmd: &str) -> Result<String, BenchError> {
    let mut args = vec!["netns", "exec", ns];
    args.extend(cmd.split_whitespace());
    run_ok("ip", &args)
}

/// `nft -f FILE` in `ns`.
fn nft_file(ns: &str, file: &Path) -> Result<(), BenchError> {
    run_ok(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "nft",
            "-f",
            &file.display().to_string(),
        ],
    )
    .map(|_| ())
}

fn link_json(ns: &str, dev: &str) -> Result<serde_json::Value, BenchError> {
    let out = run_ok("ip", &["-n", ns, "-s", "-j", "link", "show", dev])?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| cmd_err("ip -s -j link show", e))?;
    v.get(0)
        .cloned()
        .ok_or_else(|| cmd_err("ip -s -j link show", format!("no {dev} in {ns}")))
}

fn mac_of(ns: &str, dev: &str) -> Result<Mac, BenchError> {
    let v = link_json(ns, dev)?;
    let s = v["address"].as_str().unwrap_or_default();
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(cmd_err(
            "ip link show",
            format!("odd address `{s}` of {dev}"),
        ));
    }
    for (o, p) in mac.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16).map_err(|e| cmd_err("ip link show", e))?;
    }
    Ok(mac)
}

fn link_packets(ns: &str, dev: &str, dir: &str) -> Result<u64, BenchError> {
    let v = link_json(ns, dev)?;
    v["stats64"][dir]["packets"]
        .as_u64()
        .ok_or_else(|| cmd_err("ip -s -j link show", "no packet counter"))
}

/// Busy CPU seconds of all cores so far (/proc/stat: everything but idle and iowait).
fn cpu_busy() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return f64::NAN;
    };
    let Some(line) = s.lines().next() else {
        return f64::NAN;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let busy: u64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, x)| x)
        .sum();
    busy as f64 / clk_tck()
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a process (all its threads), in seconds; 0 when it is gone.
fn cpu_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(0.0, |s| stat_cpu(&s).1)
}

/// The command name and utime + stime (seconds) of a `/proc/.../stat` line.
fn stat_cpu(s: &str) -> (&str, f64) {
    let (comm, field) = stat_fields(s);
    (comm, (field(14) + field(15)) as f64 / clk_tck())
}

/// The command name of a `/proc/.../stat` line and its numeric fields by their number in
/// stat(5) (0 when absent or not a number).
fn stat_fields(s: &str) -> (&str, impl Fn(usize) -> u64) {
    // The command name is in parentheses and may hold blanks: count from the last `)`.
    let (head, rest) = s.rsplit_once(')').unwrap_or(("", ""));
    let comm = head.split_once('(').map_or("", |(_, c)| c);
    // `rest` starts at field 3 (the state, not a number).
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    (comm, move |n: usize| f.get(n - 3).copied().unwrap_or(0))
}

/// utime + stime of keepstate's (`pid`) worker threads (`keepstate-w*`), in seconds.
fn cpu_of_workers(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .map(|s| match stat_cpu(&s) {
            (comm, cpu) if comm.starts_with("keepstate-w") => cpu,
            _ => 0.0,
        })
        .sum()
}

/// CPU seconds of every process but `ours` and the kernel's threads (whose softirq work is
/// the firewall's): utime + stime + the reaped children's, so that a compiler that ran and
/// ended inside the window is still seen through its parent. An estimate of the machine's
/// other load, subtracted from the firewall's share and shown.
///
/// `ours` are the generator, keepstate, the latency prober and the bench itself. The prober
/// is ours although it forwards nothing: tick accounting charges a task the softirq work
/// that runs in its context, and a prober on the firewall's core runs the kernel's pending
/// forwarding on every send (`do_softirq` on the way out of `sendto`). Measured with perf in
/// mode b: 86 % of the prober's samples were `net_rx_action` (conntrack, nft, ip_forward),
/// and /proc charged it about 10 % of a core in the kernel's modes against about 2 % in
/// keepstate's, where perf found only its own sends, waits and receives. Counted here, that
/// forwarding would be taken off the kernel's CPU per packet; counted as ours, the error is
/// the prober's own work, about 2 % of a core alike in every mode.
fn cpu_others(ours: &[u32]) -> f64 {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if ours.contains(&pid) {
            continue;
        }
        let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Field 9 of stat(5) is flags; utime..cstime are 14..17.
        let (_, at) = stat_fields(&s);
        if at(9) & PF_KTHREAD != 0 {
            continue;
        }
        ticks += at(14) + at(15) + at(16) + at(17);
    }
    ticks as f64 / clk_tck()
}

/// A child process, killed and reaped on drop.
struct Proc(Child);

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
    fn stop(&mut self) {
        // SAFETY: signals our own child, which has not been reaped yet.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.stop();
        }
    }
}

/// The keepstate configuration of the bench's firewall.
fn ks_config(rules: &Path, workers: usize, busy_poll: bool, control: &Path, max: u32) -> String {
    format!(
        "rules = {rules:?}\n\
         [[port]]\nname = \"lan\"\ninterface = \"lan\"\naddresses = [\"{}/24\"]\n\
         [[port]]\nname = \"wan\"\ninterface = \"wan\"\naddresses = [\"{}/24\"]\n\
         [[route]]\nto = \"default\"\nvia = \"{}\"\n\
         [dataplane]\nmode = \"router\"\nworkers = {workers}\nbusy_poll = {busy_poll}\n\
         control = {control:?}\n\
         [conntrack]\nmax = {max}\n",
        lab::FW_LAN,
        lab::FW_WAN,
        lab::WAN_HOST,
        rules = rules.display().to_string(),
        control = control.display().to_string(),
    )
}

/// The ruleset of mode e: nothing is tracked, nothing filtered, nothing translated.
const CEILING_RULES: &str = "\
table ip raw {
\tchain prerouting {
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tnotrack
\t}
}
";

/// A small edge ruleset whose forward chain holds a ClassBench filter set between the
/// conntrack fast path and the LAN-to-WAN accept; LAN traffic leaving by `wan` is
/// masqueraded. Every new flow is looked up against all of it.
pub fn classbench_ruleset(rules: &[classbench::CbRule]) -> String {
    let mut s = String::from(
        "flush ruleset\ntable inet filter {\n\tchain forward {\n\
         \t\ttype filter hook forward priority 0; policy drop;\n\
         \t\tct state vmap { established : accept, related : accept, invalid : drop }\n",
    );
    for r in rules {
        let _ = writeln!(s, "\t\t{}", r.text());
    }
    s.push_str(
        "\t\tiifname \"lan\" oifname \"wan\" accept\n\t}\n}\n\
         table ip nat {\n\tchain postrouting {\n\
         \t\ttype nat hook postrouting priority 100; policy accept;\n\
         \t\toifname \"wan\" masquerade\n\t}\n}\n",
    );
    s
}

struct Bench<'a> {
    opts: &'a Options,
    top: Topology,
    rules: PathBuf,
    ceiling: PathBuf,
    flowtable: PathBuf,
    src_mac: Mac,
    dst_mac: Mac,
    fw_cpu: usize,
}

/// Runs the whole bench; progress and the tables go to `out`.
pub fn run(opts: &Options, out: &mut dyn Write) -> Result<Vec<MixResult>, BenchError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(BenchError::NotRoot);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        return Err(BenchError::Cores(cores));
    }
    for s in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let register = signal_hook::flag::register_conditional_shutdown(s, 1, STOP.clone())
            .and_then(|_| signal_hook::flag::register(s, STOP.clone()));
        register.map_err(|e| cmd_err("handle SIGINT and SIGTERM", e))?;
    }
    let lab = Lab::named(&opts.prefix)?.with_links("lan", "wan");
    let dir = tempfile::tempdir().map_err(|e| cmd_err("mktemp -d", e))?;
    lab.up(2)?;
    let mut top = Topology {
        lab,
        dir,
        saved_ct_max: None,
    };
    if let Some(max) = opts.ct_max {
        let p = "/proc/sys/net/netfilter/nf_conntrack_max";
        top.saved_ct_max = std::fs::read_to_string(p).ok();
        std::fs::write(p, max.to_string()).map_err(|e| cmd_err("write nf_conntrack_max", e))?;
    }
    let rules = match &opts.classbench {
        Some(cb) => {
            let set = classbench::load(cb).map_err(|e| BenchError::Other(e.to_string()))?;
            let path = top.dir.path().join("classbench.nft");
            std::fs::write(&path, classbench_ruleset(&set))
                .map_err(|e| cmd_err("write classbench.nft", e))?;
            report_classbench_hits(&set, opts, out);
            path
        }
        None => std::fs::canonicalize(&opts.rules)
            .map_err(|e| cmd_err(&format!("find {}", opts.rules.display()), e))?,
    };
    let ceiling = top.dir.path().join("ceiling.nft");
    std::fs::write(&ceiling, CEILING_RULES).map_err(|e| cmd_err("write ceiling.nft", e))?;
    // The sink drops the bench's datagrams before its own stack would answer them.
    let sink = top.dir.path().join("sink.nft");
    std::fs::write(
        &sink,
        "table ip sink {\n\tchain pre {\n\t\ttype filter hook prerouting priority -300; policy accept;\n\t\tudp dport 9 drop\n\t}\n}\n",
    )
    .map_err(|e| cmd_err("write sink.nft", e))?;
    nft_file(&top.lab.wan, &sink)?;
    // The generator's destinations: the lab's internet address and those after it.
    ns_ok(&top.lab.wan, "ip route add local 203.0.113.0/24 dev lo")?;
    let src_mac = mac_of(&top.lab.lan, "eth0")?;
    let dst_mac = mac_of(&top.lab.fw, "lan")?;
    let flowtable = std::fs::canonicalize(&opts.flowtable_rules)
        .map_err(|e| cmd_err(&format!("find {}", opts.flowtable_rules.display()), e))?;
    let bench = Bench {
        opts,
        rules,
        ceiling,
        flowtable,
        src_mac,
        dst_mac,
        fw_cpu: if opts.gen_cpu == 0 { 1 } else { 0 },
        top,
    };
    report_memory(bench.fw_cpu, "before", out);
    let mut results = Vec::new();
    for &flows in &opts.flows {
        let _ = writeln!(
            out,
            "\n== {} from {} flows, {} s windows after at least {} s warm-up, {} rounds; generator on cpu {}, firewall on cpu {}",
            match opts.traffic {
                Traffic::Udp => "64-byte UDP",
                Traffic::Syn => "TCP SYNs (connection churn)",
            },
            flows,
            opts.window.as_secs_f64(),
            opts.warmup.as_secs_f64(),
            opts.rounds,
            opts.gen_cpu,
            bench.fw_cpu,
        );
        let mut samples = Vec::new();
        for round in 0..opts.rounds {
            for &mode in &opts.modes {
                let s = bench.window(mode, flows)?;
                let _ = writeln!(
                    out,
                    "round {} {} {:<32} {:>9.0} pps delivered ({:>9.0} sent)  {:>6.0} ns/pkt all cores, {:>6.0} of them the generator's; warm {:.0} s",
                    round + 1,
                    mode.key(),
                    mode.title(),
                    s.pps(),
                    s.sent as f64 / s.secs,
                    s.total_ns(),
                    s.per_pkt_ns(s.cpu_gen),
                    s.warm,
                );
                samples.push(s);
            }
        }
        let r = MixResult { flows, samples };
        let _ = out.write_all(report(&r, opts).as_bytes());
        results.push(r);
    }
    if results.len() > 1 {
        let _ = out.write_all(scale_report(&results).as_bytes());
    }
    report_memory(bench.fw_cpu, "after", out);
    Ok(results)
}

/// This sitting's memory latency on the firewall's core ([`memprobe`]), `when` ("before" or
/// "after") the windows: at a million flows the fast path waits for one such load a packet.
/// And how much of a second that core ran: a virtual machine's host may stop it.
fn report_memory(cpu: usize, when: &str, out: &mut dyn Write) {
    let _ = match memprobe::measure(cpu) {
        Ok(p) => writeln!(
            out,
            "\nmemory {when} the windows, cpu {cpu}: a random load takes {:.0} ns over {} MiB of 4 KiB pages (as the fast path's table at a million flows), {:.1} ns over {} MiB; the core ran {:.0} % of a second (longest stop {:.0} ms{})",
            p.big_ns,
            memprobe::BIG >> 20,
            p.small_ns,
            memprobe::SMALL >> 20,
            p.ran * 100.0,
            p.longest_stop.as_secs_f64() * 1e3,
            if p.ran < 0.9 { ": something else holds this core, other work or the virtual machine's host, and every figure here is the worse for it" } else { "" },
        ),
        Err(e) => writeln!(out, "\nmemory {when} the windows: not measured ({e})"),
    };
}

/// How many of the bench's flows a ClassBench rule matches (the rest run the whole set).
fn report_classbench_hits(set: &[classbench::CbRule], opts: &Options, out: &mut dyn Write) {
    let flows = opts.flows.iter().copied().max().unwrap_or(1).clamp(1, 4096);
    let src = u32::from(
        lab::LAN_HOST
            .parse::<Ipv4Addr>()
            .unwrap_or(Ipv4Addr::UNSPECIFIED),
    );
    let dst = u32::from(
        lab::INTERNET
            .parse::<Ipv4Addr>()
            .unwrap_or(Ipv4Addr::UNSPECIFIED),
    );
    let (proto, dport) = match opts.traffic {
        Traffic::Udp => (17, 9),
        Traffic::Syn => (6, 80),
    };
    let mut hit = 0;
    let mut first = u32::MAX;
    for i in 0..flows {
        let p = classbench::CbPacket {
            src,
            dst: dst + i / PORTS,
            sport: 1024 + (i % PORTS) as u16,
            dport,
            proto,
        };
        if let Some(n) = set.iter().position(|r| r.matches(&p)) {
            hit += 1;
            first = first.min(n as u32 + 1);
        }
    }
    let _ = writeln!(
        out,
        "ClassBench: {} rules in the forward chain; {hit} of the first {flows} bench flows match one{}",
        set.len(),
        if hit > 0 {
            format!(" (the earliest is rule {first}); the others pass all of them")
        } else {
            ": every packet of a new flow passes all of them".into()
        }
    );
}

/// The longest warm-up of one window (see [`Bench::warm_up`]).
const WARM_MAX: Duration = Duration::from_secs(90);

/// Reads `count` four times a second while the generator runs, until it reaches `full`, stops
/// growing (by less than one part in `flat` over the last second) or `limit` has passed since
/// `t0`. How long since `t0` then; `None` if there is nothing to count.
fn settle(
    gen: &mut Proc,
    t0: Instant,
    (full, flat): (u64, u64),
    limit: Duration,
    count: impl Fn() -> Option<u64>,
) -> Result<Option<Duration>, BenchError> {
    let mut counts = std::collections::VecDeque::new();
    loop {
        gen_alive(gen)?;
        let Some(n) = count() else {
            return Ok(None);
        };
        counts.push_back(n);
        let plateau = counts.len() > 4 && counts.pop_front().is_some_and(|a| n < a + a / flat);
        if n >= full || plateau || t0.elapsed() >= limit {
            return Ok(Some(t0.elapsed()));
        }
        nap(Duration::from_millis(250))?;
    }
}

/// The workers' share of a core under which they count as quiet.
const QUIET: f64 = 0.05;

/// With a flowtable, waits until keepstate's (`pid`) workers use less than [`QUIET`] of a
/// core over a second, or [`WARM_MAX`] has passed since `t0`. At a million flows, per-thread
/// sampling found the worker busy for about 10 s after 99 in 100 flows were offloaded
/// (flows offloaded late, and what queued up meanwhile); a window opened then measured that,
/// not the settled fast path.
fn workers_quiet(gen: &mut Proc, t0: Instant, pid: u32) -> Result<(), BenchError> {
    let mut last = cpu_of_workers(pid);
    while t0.elapsed() < WARM_MAX {
        nap(Duration::from_secs(1))?;
        gen_alive(gen)?;
        let now = cpu_of_workers(pid);
        if now - last < QUIET {
            break;
        }
        last = now;
    }
    Ok(())
}

impl Bench<'_> {
    /// Traffic before the window opens: `--warmup`, and for a mode with a table, until it
    /// holds nine in ten of the flows (or stops growing: the rules drop the others), and as
    /// long again, so that every flow was seen twice and the window measures that many live
    /// connections, not a table filling up. With a flowtable, instead of the time, until 99 in
    /// 100 flows are offloaded or their number grows by less than 0.2 % a second (a UDP flow
    /// is offloaded at its second packet, and until then each costs the worker), and then
    /// until the workers are quiet ([`workers_quiet`]). At most [`WARM_MAX`]. Returns how
    /// long.
    fn warm_up(
        &self,
        mode: Mode,
        flows: u32,
        gen: &mut Proc,
        ks: Option<u32>,
    ) -> Result<Duration, BenchError> {
        let t0 = Instant::now();
        nap(self.opts.warmup)?;
        let full = u64::from(flows) * 9 / 10;
        let Some(filled) = settle(gen, t0, (full, 50), WARM_MAX / 2, || self.table_count(mode))?
        else {
            return Ok(t0.elapsed());
        };
        // All but a few, and a stricter plateau: the last flows are offloaded slowly (each
        // waits for its turn in the generator's round), and each not offloaded yet keeps the
        // worker busy in the window.
        let all = u64::from(flows) * 99 / 100;
        let offloaded = mode == Mode::Flowtable
            && settle(gen, t0, (all, 500), WARM_MAX, || self.flow_count())?.is_some();
        if offloaded {
            if let Some(pid) = ks {
                workers_quiet(gen, t0, pid)?;
            }
        } else if filled > self.opts.warmup {
            nap(filled.min(WARM_MAX - filled))?;
            gen_alive(gen)?;
        }
        Ok(t0.elapsed())
    }

    fn setup_kernel(&self, mode: Mode) -> Result<(), BenchError> {
        let fw = &self.top.lab.fw;
        ns_ok(fw, &format!("ip addr add {}/24 dev lan", lab::FW_LAN))?;
        ns_ok(fw, &format!("ip addr add {}/24 dev wan", lab::FW_WAN))?;
        ns_ok(fw, &format!("ip route add default via {}", lab::WAN_HOST))?;
        ns_ok(fw, "sysctl -qw net.ipv4.ip_forward=1")?;
        self.rps(1 << self.fw_cpu)?;
        if mode == Mode::KernelNft {
            nft_file(fw, &self.rules)?;
        }
        Ok(())
    }

    fn teardown_kernel(&self) -> Result<(), BenchError> {
        let fw = &self.top.lab.fw;
        ns_ok(fw, "nft flush ruleset")?;
        // Tables gone, conntrack may still hold entries: flush them (none is fine too).
        let _ = ns_ok(fw, "conntrack -F");
        ns_ok(fw, "sysctl -qw net.ipv4.ip_forward=0")?;
        ns_ok(fw, "ip addr flush dev lan")?;
        ns_ok(fw, "ip addr flush dev wan")?;
        ns_ok(fw, "ip neigh flush all")?;
        self.rps(0)
    }

    /// RPS on every receive queue of the firewall's veths: `mask` of cores, 0 for none.
    fn rps(&self, mask: u32) -> Result<(), BenchError> {
        let script = format!(
            "for f in /sys/class/net/lan/queues/rx-*/rps_cpus /sys/class/net/wan/queues/rx-*/rps_cpus; do echo {mask:x} > $f; done"
        );
        run_ok(
            "ip",
            &["netns", "exec", &self.top.lab.fw, "sh", "-c", &script],
        )
        .map(|_| ())
    }

    fn start_keepstate(&self, mode: Mode) -> Result<Proc, BenchError> {
        let (rules, workers) = match mode {
            Mode::Keepstate2 => (&self.rules, 2),
            Mode::Ceiling => (&self.ceiling, 1),
            Mode::Flowtable => (&self.flowtable, 1),
            _ => (&self.rules, 1),
        };
        let control = self.top.dir.path().join("ks.sock");
        let cfg = self.top.dir.path().join("ks.toml");
        let max = self.opts.ct_max.unwrap_or(262_144);
        std::fs::write(
            &cfg,
            ks_config(rules, workers, self.opts.busy_poll, &control, max),
        )
        .map_err(|e| cmd_err("write ks.toml", e))?;
        let cpus = if workers == 1 {
            self.fw_cpu.to_string()
        } else {
            "0,1".to_string()
        };
        let log = self.top.dir.path().join("ks.log");
        let child = self.top.lab.start_appliance(
            &self.opts.exe,
            &cfg,
            &log,
            &["taskset", "-c", &cpus],
            &control,
        )?;
        Ok(Proc(child))
    }

    /// Makes the firewall's veth receive work (the XDP program, and with it the copy into
    /// the UMEM or the fast path's whole forwarding) a kernel thread pinned to `cpu`, at nice
    /// value `nice`: veth runs its NAPI where the sender is, so without this it would run
    /// inside the generator's send calls and be charged to the generator's process, not to
    /// the firewall.
    fn threaded_napi(&self, cpu: usize, nice: i32) -> Result<(), BenchError> {
        let cpus = cpu.to_string();
        run_ok(
            "ip",
            &[
                "netns",
                "exec",
                &self.top.lab.fw,
                "sh",
                "-c",
                "echo 1 > /sys/class/net/lan/threaded; echo 1 > /sys/class/net/wan/threaded",
            ],
        )?;
        let script = format!(
            "for p in $(pgrep '^napi/(lan|wan)-'); do taskset -pc {cpus} $p >/dev/null; \
             renice -n {nice} -p $p >/dev/null; done"
        );
        run_ok(
            "ip",
            &["netns", "exec", &self.top.lab.fw, "sh", "-c", &script],
        )
        .map(|_| ())
    }

    /// The firewall's connection count now.
    fn table_count(&self, mode: Mode) -> Option<u64> {
        let out = match mode {
            Mode::KernelBare | Mode::Ceiling => return None,
            Mode::KernelNft => ns_ok(&self.top.lab.fw, "conntrack -C").ok()?,
            _ => {
                let control = self.top.dir.path().join("ks.sock");
                super::control::client::out_lines(
                    &control,
                    &super::control::proto::Request::CtCount,
                )
                .join("\n")
            }
        };
        out.trim().parse().ok()
    }

    /// Connections keepstate has offloaded to a flowtable.
    fn flow_count(&self) -> Option<u64> {
        let control = self.top.dir.path().join("ks.sock");
        super::control::client::out_lines(&control, &super::control::proto::Request::FlowCount)
            .join("\n")
            .trim()
            .parse()
            .ok()
    }

    /// Pings through the firewall until one comes back (ARP on every hop resolved).
    fn path_ready(&self) -> Result<(), BenchError> {
        for _ in 0..20 {
            let ok = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.top.lab.lan,
                    "ping",
                    "-c",
                    "1",
                    "-W",
                    "1",
                    "-q",
                    lab::INTERNET,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
        }
        Err(BenchError::Other(format!(
            "no ping from {} reaches {} through the firewall",
            lab::LAN_HOST,
            lab::INTERNET
        )))
    }

    /// `keepstate bench WHAT ARGS` in the LAN namespace, on core `pin` if given; stdin
    /// closed, stdout and stderr piped to the bench.
    fn start_in_lan(
        &self,
        what: &str,
        pin: Option<usize>,
        args: &[&str],
    ) -> Result<Proc, BenchError> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.top.lab.lan]);
        if let Some(cpu) = pin {
            cmd.args(["taskset", "-c"]).arg(cpu.to_string());
        }
        let child = cmd
            .arg(&self.opts.exe)
            .args(["bench", what])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| cmd_err(&format!("keepstate bench {what}"), e))?;
        Ok(Proc(child))
    }

    fn start_gen(&self, flows: u32, secs: f64) -> Result<Proc, BenchError> {
        let mac = |m: Mac| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        let (traffic, dport) = match self.opts.traffic {
            Traffic::Udp => ("udp", "9"),
            Traffic::Syn => ("syn", "80"),
        };
        let args = [
            "--interface",
            "eth0",
            "--src-mac",
            &mac(self.src_mac),
            "--dst-mac",
            &mac(self.dst_mac),
            "--src",
            lab::LAN_HOST,
            "--dst",
            lab::INTERNET,
            "--dport",
            dport,
            "--traffic",
            traffic,
            "--flows",
            &flows.to_string(),
            "--seconds",
            &format!("{secs:.3}"),
        ];
        self.start_in_lan("gen", Some(self.opts.gen_cpu), &args)
    }

    /// The latency prober in the LAN namespace: `count` echo requests through the firewall,
    /// one every [`PROBE_INTERVAL`]. Not pinned, as ping was not: it sleeps between them.
    fn start_probe(&self, count: u32) -> Result<Proc, BenchError> {
        let args = [
            lab::INTERNET,
            "--count",
            &count.to_string(),
            "--interval-ms",
            &PROBE_INTERVAL.as_millis().to_string(),
            "--timeout-ms",
            &PROBE_TIMEOUT.as_millis().to_string(),
        ];
        self.start_in_lan("probe", None, &args)
    }

    /// One mode's window: set up, warm up, measure, tear down.
    fn window(&self, mode: Mode, flows: u32) -> Result<Sample, BenchError> {
        let mut ks = None;
        if mode.is_kernel() {
            self.setup_kernel(mode)?;
        } else {
            let p = self.start_keepstate(mode)?;
            // veth's receive work (the XDP program) as a kernel thread, charged to the
            // firewall. With the fast path it is the whole forwarding: on the firewall's
            // core. In the workers' modes it is the copy into the UMEM: on the generator's
            // core, where veth would run it anyway, since on the worker's own core it starves
            // the worker under overload (measured: mode c fell from about 300k to 100k
            // packets/s), the receive livelock a NIC's separate queues and interrupt
            // moderation avoid. (The fast path's NAPI on the generator's core measured worse
            // still: the two take turns on one core, 196k packets/s and 2.8 times the CPU.)
            // There it runs at the lowest priority, below the worker: when the worker is
            // behind (new connections, which the fast path cannot take), the NAPI thread
            // waits and the ring in front of it fills and pushes back, instead of copying
            // frames the worker then has no time to read. Measured with SYN churn on 100k
            // flows: 57k connections/s and 0.5 % loss, against 27k and 97 % at the same
            // priority; 1k UDP flows (all offloaded, the worker idle) alike either way. (Mode
            // c at the lowest priority on the worker's core: 236k packets/s at 8.5 µs,
            // against 268k at 6.4 µs on the generator's.)
            let (cpus, nice) = match mode {
                Mode::Flowtable => (self.fw_cpu, NAPI_NICE_FASTPATH),
                _ => (self.opts.gen_cpu, 0),
            };
            self.threaded_napi(cpus, nice)?;
            ks = Some(p);
        }
        let r = self.measure(mode, flows, ks.as_ref().map(Proc::pid));
        if let Some(mut p) = ks {
            p.stop();
        }
        if mode.is_kernel() {
            self.teardown_kernel()?;
        }
        r
    }

    fn measure(&self, mode: Mode, flows: u32, ks: Option<u32>) -> Result<Sample, BenchError> {
        self.path_ready()?;
        let (lan, wan) = (&self.top.lab.lan, &self.top.lab.wan);
        let secs = self.opts.window.as_secs_f64();
        let mut gen = self.start_gen(flows, WARM_MAX.as_secs_f64() + secs + 5.0)?;
        let warm = self.warm_up(mode, flows, &mut gen, ks)?;
        let count = ((secs / PROBE_INTERVAL.as_secs_f64()) as u32).max(1);
        let probe = self.start_probe(count)?;
        let t0 = Instant::now();
        let (sent0, got0) = (
            link_packets(lan, "eth0", "tx")?,
            link_packets(wan, "eth0", "rx")?,
        );
        // The prober is ours: the CPU charged to it is mostly the firewall's (see
        // `cpu_others`).
        let ours = [gen.pid(), ks.unwrap_or(0), probe.pid(), std::process::id()];
        let (all0, gen0, ks0) = (cpu_busy(), cpu_of(gen.pid()), ks.map_or(0.0, cpu_of));
        let other0 = cpu_others(&ours);
        nap(self.opts.window)?;
        let (all1, gen1, ks1) = (cpu_busy(), cpu_of(gen.pid()), ks.map_or(0.0, cpu_of));
        let other1 = cpu_others(&ours);
        let (sent1, got1) = (
            link_packets(lan, "eth0", "tx")?,
            link_packets(wan, "eth0", "rx")?,
        );
        let elapsed = t0.elapsed().as_secs_f64();
        let table = self.table_count(mode);
        let (rtts, lost) = probe_results(probe, count)?;
        gen.stop();
        Ok(Sample {
            mode,
            warm: warm.as_secs_f64(),
            secs: elapsed,
            sent: sent1.saturating_sub(sent0),
            delivered: got1.saturating_sub(got0),
            cpu_all: all1 - all0,
            cpu_gen: gen1 - gen0,
            cpu_ks: ks1 - ks0,
            cpu_other: (other1 - other0).max(0.0),
            table,
            rtts,
            lost,
        })
    }
}

/// An error if the generator ended before its time.
fn gen_alive(gen: &mut Proc) -> Result<(), BenchError> {
    if let Ok(Some(st)) = gen.0.try_wait() {
        let mut e = String::new();
        if let Some(mut s) = gen.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut s, &mut e);
        }
        return Err(cmd_err(
            "keepstate bench gen",
            format!("{st}: {}", e.trim()),
        ));
    }
    Ok(())
}

/// The RTTs the prober measured (ms) and how many of its `count` requests never came back
/// (or were not sent).
fn probe_results(mut p: Proc, count: u32) -> Result<(Vec<f64>, u32), BenchError> {
    let (mut text, mut err) = (String::new(), String::new());
    // The prober ends by itself after `count` sends and a last wait of its timeout; its
    // stderr holds a line or two at the most, so reading it second cannot block it.
    if let Some(mut s) = p.0.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut s, &mut text);
    }
    if let Some(mut s) = p.0.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut s, &mut err);
    }
    let status =
        p.0.wait()
            .map_err(|e| cmd_err("keepstate bench probe", e))?;
    if !status.success() {
        return Err(cmd_err(
            "keepstate bench probe",
            format!("{status}: {}", err.trim()),
        ));
    }
    let rtts = probe::rtts_ms(&text);
    let lost = count.saturating_sub(rtts.len() as u32);
    Ok((rtts, lost))
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.prec$}"))
}

/// The table of one mix and its ratios against the targets of issue 8.
pub fn report(r: &MixResult, opts: &Options) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{:<33} {:>9} {:>9} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8} {:>7} {:>8}",
        "mode (medians; CPU: all cores)",
        "pps",
        "min",
        "max",
        "loss",
        "ns/pkt",
        "gen ns",
        "fw ns",
        "ks ns",
        "rtt p50",
        "p99 ms",
        "others",
        "table"
    );
    for &m in &opts.modes {
        let v = r.of(m);
        if v.is_empty() {
            continue;
        }
        let pps: Vec<f64> = v.iter().map(|x| x.pps()).collect();
        let min = pps.iter().copied().fold(f64::INFINITY, f64::min);
        let max = pps.iter().copied().fold(0.0, f64::max);
        let loss = r.median(m, |x| {
            if x.sent == 0 {
                f64::NAN
            } else {
                1.0 - x.delivered as f64 / x.sent as f64
            }
        });
        let mut rtts: Vec<f64> = v.iter().flat_map(|x| x.rtts.iter().copied()).collect();
        let lost: u32 = v.iter().map(|x| x.lost).sum();
        let _ = writeln!(
            s,
            "{} {:<31} {:>9.0} {:>9.0} {:>9.0} {:>7.1}% {:>7} {:>7} {:>7} {:>7} {:>8} {:>8} {:>6.0}% {:>8}{}",
            m.key(),
            m.title(),
            r.median_pps(m).unwrap_or(f64::NAN),
            min,
            max,
            loss.unwrap_or(f64::NAN) * 100.0,
            fmt_opt(r.median_total_ns(m), 0),
            fmt_opt(r.median(m, |x| x.per_pkt_ns(x.cpu_gen)), 0),
            fmt_opt(r.median(m, Sample::firewall_ns), 0),
            if m.is_kernel() {
                "-".into()
            } else {
                fmt_opt(r.median(m, |x| x.per_pkt_ns(x.cpu_ks)), 0)
            },
            fmt_opt(percentile(&mut rtts.clone(), 0.5), 3),
            fmt_opt(percentile(&mut rtts, 0.99), 3),
            r.median(m, |x| x.cpu_other / x.secs / 2.0 * 100.0)
                .unwrap_or(f64::NAN),
            fmt_opt(r.median_table(m), 0),
            if lost > 0 {
                format!("  ({lost} probes lost)")
            } else {
                String::new()
            }
        );
    }
    if opts.traffic == Traffic::Udp {
        s.push_str(&table_notes(r, opts));
    }
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let (b, c, d, e, f) = (
        Mode::KernelNft,
        Mode::Keepstate1,
        Mode::Keepstate2,
        Mode::Ceiling,
        Mode::Flowtable,
    );
    let lines = [
        (
            "CPU per packet, keepstate 1 worker / kernel with rules (c/b, target <= 0.67)",
            ratio(r.median_total_ns(c), r.median_total_ns(b)),
        ),
        (
            "packets per second, keepstate 1 worker / kernel with rules (c/b, target >= 1)",
            ratio(r.median_pps(c), r.median_pps(b)),
        ),
        (
            "CPU per packet, rules + tracking / ceiling (c/e, target <= 1.10)",
            ratio(r.median_total_ns(c), r.median_total_ns(e)),
        ),
        (
            "CPU per packet, rules + tracking with a flowtable / ceiling (f/e, target <= 1.10)",
            ratio(r.median_total_ns(f), r.median_total_ns(e)),
        ),
        (
            "packets per second, 2 workers / 1 worker (d/c, target >= 1.6 where the generator allows)",
            ratio(r.median_pps(d), r.median_pps(c)),
        ),
        (
            "CPU per packet, keepstate with a flowtable / kernel with rules (f/b, target <= 0.67)",
            ratio(r.median_total_ns(f), r.median_total_ns(b)),
        ),
        (
            "packets per second, keepstate with a flowtable / kernel with rules (f/b, target >= 1)",
            ratio(r.median_pps(f), r.median_pps(b)),
        ),
    ];
    for (what, v) in lines {
        if let Some(v) = v {
            let _ = writeln!(s, "  {what}: {v:.2}");
        }
    }
    s
}

/// For each mode whose table held fewer than nine in ten of the flows at the end of its
/// windows, a line saying so, with how often each flow was sent: a flow sent less often
/// than an unreplied UDP connection lives (the sink never answers) expires between its
/// packets, so such windows measure connections coming and going, not that many live ones
/// (on a slow sitting the generator could not keep a million flows alive). Otherwise the
/// rules dropped the others, or the warm-up ended before they came in.
fn table_notes(r: &MixResult, opts: &Options) -> String {
    let lives = crate::conntrack::Timeouts::default().udp as f64;
    let mut s = String::new();
    for &m in &opts.modes {
        let Some(table) = r.median_table(m) else {
            continue;
        };
        let flows = f64::from(r.flows);
        if table >= flows * 0.9 {
            continue;
        }
        let every = r
            .median(m, |x| x.sent as f64 / x.secs)
            .filter(|&p| p > 0.0)
            .map(|p| flows / p);
        let _ = write!(
            s,
            "  {}: the table held {table:.0} of the {} flows",
            m.key(),
            r.flows
        );
        let _ = match every {
            Some(every) if every > lives => writeln!(
                s,
                " (one packet a flow every {every:.0} s in the windows, longer than the {lives:.0} s an unreplied UDP connection lives: these windows measured connections coming and going, not {} live ones)",
                r.flows
            ),
            Some(every) => writeln!(s, " (one packet a flow every {every:.0} s in the windows)"),
            None => writeln!(s),
        };
    }
    s
}

/// Many flows against few: what a big table costs (target: at most 30 % of the rate).
fn scale_report(results: &[MixResult]) -> String {
    let mut s = String::new();
    let (Some(few), Some(many)) = (
        results.iter().min_by_key(|r| r.flows),
        results.iter().max_by_key(|r| r.flows),
    ) else {
        return s;
    };
    let _ = writeln!(
        s,
        "\n{} flows against {} flows (packets per second, target >= 0.70 for keepstate):",
        many.flows, few.flows
    );
    for m in Mode::ALL {
        if let (Some(a), Some(b)) = (many.median_pps(m), few.median_pps(m)) {
            let short = many
                .median_table(m)
                .filter(|&t| t < f64::from(many.flows) * 0.9)
                .map_or(String::new(), |t| {
                    format!(" (not {} live flows: its table held {t:.0})", many.flows)
                });
            let _ = writeln!(s, "  {} {:<31} {:.2}{short}", m.key(), m.title(), a / b);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(mode: Mode, sent: u64, table: u64) -> Sample {
        Sample {
            mode,
            warm: 90.0,
            secs: 4.0,
            sent,
            delivered: sent,
            cpu_all: 8.0,
            cpu_gen: 4.0,
            cpu_ks: 2.0,
            table: Some(table),
            cpu_other: 0.0,
            rtts: Vec::new(),
            lost: 0,
        }
    }

    fn options(modes: Vec<Mode>) -> Options {
        Options {
            prefix: "t".into(),
            rules: "r.nft".into(),
            classbench: None,
            flowtable_rules: "f.nft".into(),
            traffic: Traffic::Udp,
            flows: vec![1_000_000],
            modes,
            rounds: 1,
            window: Duration::from_secs(4),
            warmup: Duration::from_secs(1),
            busy_poll: false,
            ct_max: None,
            gen_cpu: 1,
            exe: "keepstate".into(),
        }
    }

    #[test]
    fn a_table_short_of_the_flows_is_reported_with_its_reason() {
        use Mode::{Flowtable, KernelNft};
        // Session 15's slow sitting: f sent 21k packets/s to a million flows (one packet a
        // flow every 46 s) and its table held 382k; b sent 43k/s (every 23 s) and held 675k.
        let r = MixResult {
            flows: 1_000_000,
            samples: vec![
                sample(KernelNft, 43_184 * 4, 675_004),
                sample(Flowtable, 21_613 * 4, 382_318),
            ],
        };
        let notes = table_notes(&r, &options(vec![KernelNft, Flowtable]));
        let lines: Vec<&str> = notes.lines().collect();
        assert_eq!(lines.len(), 2, "{notes}");
        assert_eq!(
            lines[0],
            "  b: the table held 675004 of the 1000000 flows (one packet a flow every 23 s in the windows)"
        );
        assert!(
            lines[1].starts_with("  f: the table held 382318 of the 1000000 flows (one packet a flow every 46 s in the windows, longer than the 30 s"),
            "{}",
            lines[1]
        );
        assert!(report(&r, &options(vec![KernelNft, Flowtable])).contains(&notes));
        let few = MixResult {
            flows: 1000,
            samples: vec![
                sample(KernelNft, 40_000 * 4, 1002),
                sample(Flowtable, 163_039 * 4, 1002),
            ],
        };
        let scale = scale_report(&[few, r]);
        assert!(
            scale.contains("1.08 (not 1000000 live flows: its table held 675004)"),
            "{scale}"
        );
        assert!(
            scale.contains("0.13 (not 1000000 live flows: its table held 382318)"),
            "{scale}"
        );
        // Tables that hold their flows get no note.
        let full = MixResult {
            flows: 1_000_000,
            samples: vec![sample(Flowtable, 2_000_000, 999_000)],
        };
        assert_eq!(table_notes(&full, &options(vec![Flowtable])), "");
    }

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        let line = "4242 (keepstate-w0 (x)) S 1 4242 4242 0 -1 2097216 10 0 0 0 250 125 7 3 20 0";
        let (comm, f) = stat_fields(line);
        assert_eq!(comm, "keepstate-w0 (x)");
        assert_eq!(f(4), 1);
        assert_eq!(f(9), 2_097_216);
        assert_eq!((f(14), f(15), f(16), f(17)), (250, 125, 7, 3));
        assert_eq!(f(60), 0);
    }
}
