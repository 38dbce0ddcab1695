//! `keepstate lab soak`: the appliance under mixed traffic for minutes, its memory watched.
//! Brings a lab up, runs `keepstate run` (this very binary) with examples/home-router.nft (or
//! `--rules`, lab-flowtable.nft for the XDP fast path) in the firewall's namespace, and until the time is up drives, from the LAN host to the
//! internet behind the WAN host:
//!
//! ```text
//!  downloads   curl, 8 MiB each at 20 MB/s, one after the other (TCP, long-lived)
//!  churn       a new TCP connection (a 1000-byte answer) and a new UDP socket (an echo)
//!              40 times a second each, over IPv4 and over IPv6 (conntrack entries by the
//!              thousand: TIME_WAIT 120 s, UDP 30 s)
//!  ping        5 a second
//! ```
//!
//! It samples the appliance's resident memory (`VmRSS` in /proc/PID/status) and its
//! connection count (`ct count` on the control socket) at the start and at regular
//! intervals, and calls the memory flat when, over the second half of the run, it grows by no
//! more than [`FLAT_KIB`] or [`FLAT_PERCENT`]. The first half is the warm-up: the table fills
//! to its steady state within [`TABLE_FULL`], and the allocator's arenas settle a few
//! minutes after that (a 10-minute run on glibc: RSS climbs about 2 MiB more between 2:30
//! and 5:00 with the table already full, then stays within 0.3 MiB). Failed downloads, failed exchanges, lost pings and a worker that is not
//! running fail the soak too.
//!
//! All traffic stays inside the lab's namespaces, every loop is bounded by the run's time, and
//! everything it made (namespaces, processes, the temporary directory) is removed on every
//! way out: the end, an error, a panic, Ctrl-C. Owns only those.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::control::client::out_lines;
use super::control::proto::Request;
use super::lab::{Lab, INTERNET, INTERNET6};

/// Growth after the warm-up still called flat: this much...
pub const FLAT_KIB: u64 = 2048;
/// ...or this share of the memory at the end of the warm-up, whichever is more.
pub const FLAT_PERCENT: f64 = 2.0;
/// How long the table takes to fill: the churn's entries live at most 120 s (TCP's
/// TIME_WAIT; UDP's 30 s), so after this the table holds as many as it loses.
pub const TABLE_FULL: Duration = Duration::from_secs(150);
/// The shortest run whose verdict means something.
pub const CONCLUSIVE: Duration = Duration::from_secs(300);
/// The size of each download.
const DOWNLOAD: usize = 8 * 1024 * 1024;
/// New TCP connections (and UDP exchanges) per second, per address family.
const CHURN_RATE: u32 = 40;
/// The servers' port (TCP and UDP).
const PORT: u16 = 8000;

#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    #[error("the soak needs root (network namespaces, AF_XDP)")]
    NotRoot,
    #[error("the soak needs `{0}`; scripts/setup.sh installs it")]
    Missing(&'static str),
    #[error("{0} not found: run the soak from the repository's root, or give --examples DIR")]
    NoExamples(PathBuf),
    #[error("cannot {what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error(transparent)]
    Lab(#[from] super::lab::LabError),
    #[error("the servers in the WAN namespace did not start")]
    NoServer,
    #[error("interrupted")]
    Interrupted,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SoakError {
    let what = what.into();
    move |err| SoakError::Io { what, err }
}

/// One sample of the appliance.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Duration,
    pub rss_kib: u64,
    pub conns: u64,
}

/// What a traffic generator counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub ok: u64,
    pub failed: u64,
}

/// How the soak went.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub samples: Vec<Sample>,
    /// The first sample after the warm-up.
    pub steady: usize,
    pub downloads: Counts,
    pub tcp: Counts,
    pub udp: Counts,
    pub pings: Counts,
    /// `keepstate stats`' worker lines at the end.
    pub workers: Vec<String>,
    /// Its fast-path line at the end, with a flowtable in the rules.
    pub fastpath: Option<String>,
    /// The lab's interfaces' drop and error counters that are not zero at the end
    /// (`NAMESPACE/INTERFACE COUNTER VALUE`): where a lost packet went.
    pub drops: Vec<String>,
    /// Shorter than [`CONCLUSIVE`]: the table or the allocator may not have settled.
    pub short: bool,
}

impl Report {
    /// Memory growth after the warm-up (KiB), and the limit still called flat.
    pub fn growth(&self) -> Option<(i64, u64)> {
        let steady = self.samples.get(self.steady)?;
        let end = self.samples.last()?;
        let limit = FLAT_KIB.max((steady.rss_kib as f64 * FLAT_PERCENT / 100.0) as u64);
        Some((end.rss_kib as i64 - steady.rss_kib as i64, limit))
    }

    pub fn flat(&self) -> bool {
        self.growth().is_some_and(|(g, limit)| g <= limit as i64)
    }

    /// Whether everything held: a conclusive run, flat memory, no failure, every worker
    /// running.
    pub fn passed(&self) -> bool {
        !self.short
            && self.flat()
            && [&self.downloads, &self.tcp, &self.udp, &self.pings]
                .iter()
                .all(|c| c.failed == 0 && c.ok > 0)
            && !self.workers.is_empty()
            && self.workers.iter().all(|w| w.contains(": running;"))
    }
}

/// The servers (mode `serve ADDR PORT`: HTTP answers of `GET /N` with N bytes, and a UDP echo
/// on the same port) and the churn (mode `churn ADDR PORT RATE SECONDS`: a new TCP
/// connection and a new UDP socket RATE times a second, until SECONDS; prints its counts, and
/// each failure as it happens on stderr, with its source port and time).
const TRAFFIC_PY: &str = r#"
import socket, socketserver, sys, threading, time
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ':' in addr else socket.AF_INET
if mode == 'serve':
    block = bytes(range(256)) * 256
    class Answer(socketserver.BaseRequestHandler):
        def handle(self):
            req = b''
            while b'\r\n\r\n' not in req:
                d = self.request.recv(4096)
                if not d:
                    return
                req += d
            n = int(req.split(b' ')[1][1:])
            self.request.sendall(b'HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n' % n)
            while n > 0:
                self.request.sendall(block[:min(n, len(block))])
                n -= min(n, len(block))
    class Server(socketserver.ThreadingTCPServer):
        address_family = fam
        allow_reuse_address = True
        daemon_threads = True
    u = socket.socket(fam, socket.SOCK_DGRAM)
    u.bind((addr, port))
    def echo():
        while True:
            d, peer = u.recvfrom(2048)
            u.sendto(d, peer)
    threading.Thread(target=echo, daemon=True).start()
    server = Server((addr, port), Answer)
    print('ready', flush=True)
    server.serve_forever()
rate, secs = float(sys.argv[4]), float(sys.argv[5])
tcp, udp = [0, 0], [0, 0]
start = time.time()
def lost(what, n, port, why):
    print('soak: %s %d to %s (from port %s, at %.1f s): %s'
          % (what, n, addr, port, time.time() - start, why), file=sys.stderr, flush=True)
n = 0
while time.time() - start < secs:
    sport = '?'
    try:
        s = socket.create_connection((addr, port), timeout=3)
        sport = s.getsockname()[1]
        s.sendall(b'GET /1000 HTTP/1.0\r\n\r\n')
        got = b''
        while True:
            d = s.recv(65536)
            if not d:
                break
            got += d
        s.close()
        good = got.endswith(b'\r\n\r\n' + bytes(range(256)) * 3 + bytes(range(232)))
        tcp[0 if good else 1] += 1
        if not good:
            lost('TCP connection', n, sport, 'a short answer (%d bytes)' % len(got))
    except OSError as e:
        tcp[1] += 1
        lost('TCP connection', n, sport, e)
    u, sport = None, '?'
    try:
        u = socket.socket(fam, socket.SOCK_DGRAM)
        u.settimeout(3)
        u.sendto(b'soak %d' % n, (addr, port))
        sport = u.getsockname()[1]
        good = u.recv(2048) == b'soak %d' % n
        udp[0 if good else 1] += 1
        if not good:
            lost('UDP exchange', n, sport, 'a wrong echo')
    except OSError as e:
        udp[1] += 1
        lost('UDP exchange', n, sport, e)
    if u:
        u.close()
    n += 1
    time.sleep(max(0.0, start + n / rate - time.time()))
print('tcp', tcp[0], tcp[1], 'udp', udp[0], udp[1], flush=True)
"#;

/// Everything the soak made: removed on drop, whatever happened.
struct Stage {
    lab: Lab,
    dir: PathBuf,
    children: Vec<Child>,
    /// The appliance, stopped with SIGTERM first so it prints its counters.
    appliance: Option<Child>,
}

impl Drop for Stage {
    fn drop(&mut self) {
        if let Some(mut a) = self.appliance.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
            let _ = a.wait();
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.lab.down();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null());
    c
}

/// The resident memory of process `pid` (KiB).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `0:00`.
fn clock(d: Duration) -> String {
    format!("{}:{:02}", d.as_secs() / 60, d.as_secs() % 60)
}

/// Runs the soak for `minutes` in a lab named by `prefix`, a sample every `every`; prints the
/// samples as they come and the verdict to `out`.
pub fn run(
    prefix: &str,
    examples: &Path,
    rules: &Path,
    minutes: f64,
    every: Duration,
    out: &mut dyn Write,
) -> Result<Report, SoakError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(SoakError::NotRoot);
    }
    for tool in ["ip", "curl", "ping", "python3", "ethtool"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Err(SoakError::Missing(tool));
        }
    }
    let lab_toml = examples.join("lab.toml");
    if !lab_toml.exists() {
        return Err(SoakError::NoExamples(lab_toml));
    }
    let stop = Arc::new(AtomicBool::new(false));
    for s in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(s, stop.clone()).map_err(io("catch Ctrl-C"))?;
    }
    let lab = Lab::named(prefix)?;
    let dir = std::env::temp_dir().join(format!("keepstate-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io("create a temporary directory"))?;
    lab.up(2)?;
    let mut st = Stage {
        lab,
        dir,
        children: Vec::new(),
        appliance: None,
    };
    let control = st.dir.join("control.sock");
    let cfg = st.dir.join("lab.toml");
    if !examples.join(rules).exists() {
        return Err(SoakError::NoExamples(examples.join(rules)));
    }
    let text = super::lab::config(examples, rules, &control)
        .map_err(io(format!("read {}", lab_toml.display())))?;
    std::fs::write(&cfg, text).map_err(io("write the configuration"))?;
    let pid = start_appliance(&mut st, &cfg, &control)?;
    start_servers(&mut st)?;

    let total = Duration::from_secs_f64(minutes * 60.0);
    let secs = format!("{}", total.as_secs_f64());
    writeln!(
        out,
        "soak: {} through {} ({}): {} MiB downloads at 20 MB/s, \
         {CHURN_RATE} new TCP connections and UDP exchanges a second over IPv4 and IPv6 each, \
         5 pings a second; a sample every {}",
        clock(total),
        st.lab.fw,
        examples.join(rules).display(),
        DOWNLOAD >> 20,
        clock(every)
    )
    .map_err(io("write"))?;
    let churn: Vec<Child> = [INTERNET, INTERNET6]
        .iter()
        .map(|addr| {
            in_ns(
                &st.lab.lan,
                &[
                    "python3",
                    "-c",
                    TRAFFIC_PY,
                    "churn",
                    addr,
                    &PORT.to_string(),
                    &CHURN_RATE.to_string(),
                    &secs,
                ],
            )
            .stdout(Stdio::piped())
            .spawn()
            .map_err(io("start the churn"))
        })
        .collect::<Result<_, _>>()?;
    // Five a second, ending a second before the rest (so the last answer is waited for).
    let pings = (total.as_secs() * 5).saturating_sub(5).max(1).to_string();
    let ping = in_ns(
        &st.lab.lan,
        &["ping", "-q", "-i", "0.2", "-c", &pings, INTERNET],
    )
    .stdout(Stdio::piped())
    .spawn()
    .map_err(io("start ping"))?;
    let downloads = {
        let (lan, stop, start) = (st.lab.lan.clone(), stop.clone(), Instant::now());
        std::thread::spawn(move || download_loop(&lan, start + total, &stop))
    };

    let mut report = Report::default();
    writeln!(out, "  time    RSS (MiB)  conntrack entries").map_err(io("write"))?;
    let start = Instant::now();
    loop {
        let at = start.elapsed();
        let s = Sample {
            at,
            rss_kib: rss_kib(pid).unwrap_or(0),
            conns: out_lines(&control, &Request::CtCount)
                .first()
                .and_then(|l| l.trim().parse().ok())
                .unwrap_or(0),
        };
        writeln!(
            out,
            "  {:>5}  {:>9.1}  {:>17}",
            clock(s.at),
            s.rss_kib as f64 / 1024.0,
            s.conns
        )
        .map_err(io("write"))?;
        report.samples.push(s);
        if at >= total {
            break;
        }
        let next = (at + every).min(total);
        while start.elapsed() < next {
            if stop.load(Ordering::Relaxed) {
                return Err(SoakError::Interrupted);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    report.short = total < CONCLUSIVE;
    report.steady = report
        .samples
        .iter()
        .position(|s| s.at >= total / 2)
        .unwrap_or(0);
    let stats = out_lines(&control, &Request::Stats);
    report.workers = stats
        .iter()
        .filter(|l| l.starts_with("worker "))
        .cloned()
        .collect();
    report.fastpath = stats
        .into_iter()
        .find(|l| l.starts_with("xdp fast path: ") && !l.contains("not loaded"));
    report.downloads = downloads.join().unwrap_or_default();
    report.drops = lab_drops(&st.lab);
    for c in churn {
        let o = c.wait_with_output().map_err(io("wait for the churn"))?;
        let words: Vec<u64> = String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        if let [t_ok, t_bad, u_ok, u_bad] = words[..] {
            report.tcp.ok += t_ok;
            report.tcp.failed += t_bad;
            report.udp.ok += u_ok;
            report.udp.failed += u_bad;
        } else {
            report.tcp.failed += 1;
        }
    }
    let o = ping.wait_with_output().map_err(io("wait for ping"))?;
    report.pings = ping_counts(&String::from_utf8_lossy(&o.stdout));
    print_verdict(&report, out).map_err(io("write"))?;
    Ok(report)
}

/// Starts `keepstate run --config cfg` in the firewall's namespace, its stderr in the soak's
/// directory; its pid once it runs.
fn start_appliance(st: &mut Stage, cfg: &Path, control: &Path) -> Result<u32, SoakError> {
    let exe = std::env::current_exe().map_err(io("find the keepstate binary"))?;
    let log = st.dir.join("keepstate.log");
    let child = st.lab.start_appliance(&exe, cfg, &log, &[], control)?;
    let pid = child.id();
    st.appliance = Some(child);
    Ok(pid)
}

/// The HTTP and UDP echo servers on the internet's addresses; returns once both answer.
fn start_servers(st: &mut Stage) -> Result<(), SoakError> {
    for addr in [INTERNET, INTERNET6] {
        let mut child = in_ns(
            &st.lab.wan,
            &[
                "python3",
                "-c",
                TRAFFIC_PY,
                "serve",
                addr,
                &PORT.to_string(),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("start the servers"))?;
        let ready = child.stdout.take().map(|o| {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(o), &mut line);
            line.trim() == "ready"
        });
        st.children.push(child);
        if ready != Some(true) {
            return Err(SoakError::NoServer);
        }
    }
    Ok(())
}

/// Downloads from the LAN host one after the other until `end`; each must arrive whole.
fn download_loop(lan: &str, end: Instant, stop: &AtomicBool) -> Counts {
    let url = format!("http://{INTERNET}:{PORT}/{DOWNLOAD}");
    let mut c = Counts::default();
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        let left = end.saturating_duration_since(Instant::now()).as_secs() + 1;
        let o = in_ns(
            lan,
            &[
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "--limit-rate",
                "20M",
                "--max-time",
                &left.min(30).to_string(),
                "-w",
                "%{size_download}",
                &url,
            ],
        )
        .output();
        match o {
            Ok(o) if o.status.success() && o.stdout == DOWNLOAD.to_string().as_bytes() => c.ok += 1,
            // Cut short by the end of the run: neither.
            Ok(_) if Instant::now() >= end => {}
            _ => c.failed += 1,
        }
    }
    c
}

/// Every drop and error counter of the lab's interfaces that is not zero: the kernel's
/// (`rx_dropped`, `tx_dropped`) and veth's own per queue (`ethtool -S`: a full ring, an XDP
/// redirect the peer refused).
fn lab_drops(lab: &Lab) -> Vec<String> {
    const COUNT: &str = r#"for i in $(ls /sys/class/net); do
  [ "$i" = lo ] && continue
  for f in rx_dropped tx_dropped; do
    v=$(cat /sys/class/net/$i/statistics/$f); [ "$v" != 0 ] && echo "$i $f $v"
  done
  ethtool -S "$i" 2>/dev/null | awk -v i="$i" '/drop|err/ && $2 != 0 { sub(":", "", $1); print i, $1, $2 }'
done"#;
    [&lab.lan, &lab.fw, &lab.wan]
        .iter()
        .flat_map(|ns| {
            let o = in_ns(ns, &["sh", "-c", COUNT]).output();
            let text = o.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            text.unwrap_or_default()
                .lines()
                .map(|l| format!("{ns}/{l}"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Sent and received from ping's summary (`N packets transmitted, M received, ...`).
fn ping_counts(out: &str) -> Counts {
    let line = out.lines().find(|l| l.contains("packets transmitted"));
    let nums: Vec<u64> = line
        .unwrap_or("")
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    match nums[..] {
        [sent, received, ..] => Counts {
            ok: received,
            failed: sent.saturating_sub(received),
        },
        _ => Counts { ok: 0, failed: 1 },
    }
}

fn print_verdict(r: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    let mib = |k: u64| k as f64 / 1024.0;
    if let (Some(first), Some(steady), Some(last)) =
        (r.samples.first(), r.samples.get(r.steady), r.samples.last())
    {
        let max = r.samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
        let (growth, limit) = r.growth().unwrap_or((0, 0));
        writeln!(
            out,
            "memory: {:.1} MiB at the start, {:.1} MiB at half time ({}, {} entries), \
             {:.1} MiB at the end ({} entries), {:.1} MiB at the most: {:+.2} MiB over the \
             second half, {} (limit {:.1} MiB)",
            mib(first.rss_kib),
            mib(steady.rss_kib),
            clock(steady.at),
            steady.conns,
            mib(last.rss_kib),
            last.conns,
            mib(max),
            growth as f64 / 1024.0,
            match (r.short, r.flat()) {
                (true, _) => "not judged",
                (false, true) => "flat",
                (false, false) => "GROWING",
            },
            mib(limit)
        )?;
    }
    writeln!(
        out,
        "traffic: {} downloads of {} MiB intact ({} failed); {} TCP connections ({} failed) and \
         {} UDP exchanges ({} failed); {} pings answered ({} lost)",
        r.downloads.ok,
        DOWNLOAD >> 20,
        r.downloads.failed,
        r.tcp.ok,
        r.tcp.failed,
        r.udp.ok,
        r.udp.failed,
        r.pings.ok,
        r.pings.failed
    )?;
    for w in r.workers.iter().chain(&r.fastpath) {
        writeln!(out, "{w}")?;
    }
    if r.drops.is_empty() {
        writeln!(out, "drops: none counted on the lab's interfaces")?;
    } else {
        writeln!(out, "drops on the lab's interfaces: {}", r.drops.join(", "))?;
    }
    if r.short {
        writeln!(
            out,
            "(too short to judge the memory: the table fills in {} s and the allocator settles \
             minutes later; run {} minutes or more)",
            TABLE_FULL.as_secs(),
            CONCLUSIVE.as_secs() / 60
        )?;
    }
    writeln!(out, "soak: {}", if r.passed() { "PASS" } else { "FAIL" })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(s: u64, rss_kib: u64) -> Sample {
        Sample {
            at: Duration::from_secs(s),
            rss_kib,
            conns: 0,
        }
    }

    #[test]
    fn flat_is_judged_after_the_warm_up() {
        let mut r = Report {
            samples: vec![sample(0, 10_000), sample(60, 200_000), sample(180, 201_000)],
            steady: 1,
            ..Report::default()
        };
        // 1000 KiB on 200,000: under 2 %.
        assert_eq!(r.growth(), Some((1000, 4000)));
        assert!(r.flat());
        r.samples.push(sample(240, 205_000));
        assert!(!r.flat());
        // Small: the 2 MiB floor.
        r.samples = vec![sample(0, 5_000), sample(60, 9_000), sample(180, 11_000)];
        assert_eq!(r.growth(), Some((2000, 2048)));
        assert!(r.flat());
    }

    #[test]
    fn ping_summary() {
        let out = "--- 203.0.113.7 ping statistics ---\n\
                   3000 packets transmitted, 2998 received, 0.0667% packet loss, time 599800ms\n";
        assert_eq!(
            ping_counts(out),
            Counts {
                ok: 2998,
                failed: 2
            }
        );
        assert_eq!(ping_counts("").failed, 1);
    }
}
