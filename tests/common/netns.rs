//! Test kit for the kernel differential tests (`netns_conntrack`, `netns_nat`): a client, a
//! router and a server network namespace, tcpdump on the router's interfaces, the peers (the
//! test binary itself re-run inside a namespace), and reading the results (captures merged
//! into a pcapng for `keepstate::replay`, frame identities, `conntrack -L` and nft counters).
//!
//! Namespaces are uniquely named (tag and pid) and deleted on Drop, also when the test fails,
//! and by a watchdog if the test hangs; no traffic leaves them.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use etherparse::{Icmpv4Type, NetSlice, SlicedPacket, TransportSlice};

use super::capture::{pcapng, Cap};
use keepstate::config::Config;
use keepstate::conntrack::show::ShowOpts;
use keepstate::engine::Engine;
use keepstate::replay::{CaptureReader, CapturedFrame, Ingress, Replay, ReplayOpts};
use keepstate::rules;

/// The client namespace's address (on the router's `lan`).
pub const CLIENT: &str = "10.77.1.2";
/// The server namespace's address (on the router's `wan`).
pub const SERVER: &str = "10.77.2.2";
pub const ROUTER_LAN: &str = "10.77.1.1";
pub const ROUTER_WAN: &str = "10.77.2.1";

pub fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Whether this test can run here (root, `ip netns`, the tools); says why not otherwise.
pub fn can_run(test: &str) -> bool {
    let root = run(&["id", "-u"]).is_ok_and(|o| o.trim() == "0");
    let tools = ["nft", "conntrack", "tcpdump", "ping", "ethtool"]
        .iter()
        .all(|t| Command::new(t).arg("--version").output().is_ok());
    let netns = root && run(&["ip", "netns", "list"]).is_ok();
    if !root || !tools || !netns {
        eprintln!(
            "SKIPPED: needs root, ip netns, nft, conntrack, tcpdump, ping and ethtool \
             (scripts/setup.sh installs them); run as root: cargo test --test {test}"
        );
        return false;
    }
    true
}

/// Three namespaces (client, router, server), deleted on Drop. The router's interfaces are
/// named as the ports (`lan` towards the client, `wan` towards the server), so `iifname
/// "lan"` reads the same in the kernel and in keepstate, and the capture's interface names
/// are the ports.
pub struct Lab {
    pub c: String,
    pub r: String,
    pub s: String,
    /// Child processes started by the test (tcpdump), stopped on Drop.
    children: Vec<Child>,
}

impl Lab {
    /// `tag` names the namespaces (`{tag}-c-{pid}-{n}`, ..., `n` counting the labs of this
    /// process, so tests may run in parallel) and the watchdog, which deletes them and ends
    /// the test binary after `limit` if the test hangs.
    pub fn new(tag: &str, limit: Duration) -> Lab {
        static LABS: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let lab = Lab {
            c: format!("{tag}-c-{id}"),
            r: format!("{tag}-r-{id}"),
            s: format!("{tag}-s-{id}"),
            children: Vec::new(),
        };
        // A watchdog: a hung peer must not leave namespaces behind when the harness is
        // killed, so after `limit` it deletes them and ends the test binary.
        let names = [lab.c.clone(), lab.r.clone(), lab.s.clone()];
        let tag = tag.to_string();
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            eprintln!("{tag}: timed out; deleting {names:?}");
            for ns in &names {
                let _ = Command::new("ip")
                    .args(["netns", "pids", ns])
                    .output()
                    .map(|o| {
                        for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                            let _ = Command::new("kill").args(["-9", pid]).status();
                        }
                    });
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
            std::process::exit(101);
        });
        for ns in [&lab.c, &lab.r, &lab.s] {
            let _ = run(&["ip", "netns", "del", ns]);
            run(&["ip", "netns", "add", ns]).unwrap();
            // No IPv6: router solicitations and MLD reports would only add noise.
            for k in ["all", "default"] {
                lab.sh(ns, &format!("sysctl -qw net.ipv6.conf.{k}.disable_ipv6=1"));
            }
            lab.sh(ns, "ip link set lo up");
        }
        let (c, r, s) = (&lab.c, &lab.r, &lab.s);
        run(&[
            "ip", "-n", r, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", c,
        ])
        .unwrap();
        run(&[
            "ip", "-n", r, "link", "add", "wan", "type", "veth", "peer", "name", "eth0", "netns", s,
        ])
        .unwrap();
        lab.sh(r, &format!("ip addr add {ROUTER_LAN}/24 dev lan"));
        lab.sh(r, &format!("ip addr add {ROUTER_WAN}/24 dev wan"));
        lab.sh(r, "ip link set lan up");
        lab.sh(r, "ip link set wan up");
        lab.sh(r, "sysctl -qw net.ipv4.ip_forward=1");
        lab.sh(c, &format!("ip addr add {CLIENT}/24 dev eth0"));
        // veth offloads checksums: the end hosts would send TCP and UDP with only the
        // pseudo-header sum (CHECKSUM_PARTIAL), which the kernel's conntrack trusts without
        // checking but a capture shows as wrong. Real checksums on the wire, as from a NIC.
        lab.sh(c, "ethtool -K eth0 tx off");
        lab.sh(s, "ethtool -K eth0 tx off");
        lab.sh(c, "ip link set eth0 up");
        lab.sh(c, &format!("ip route add default via {ROUTER_LAN}"));
        lab.sh(s, &format!("ip addr add {SERVER}/24 dev eth0"));
        lab.sh(s, "ip link set eth0 up");
        lab.sh(s, &format!("ip route add default via {ROUTER_WAN}"));
        lab
    }

    /// Runs a command line (split on blanks) in namespace `ns`; panics on failure.
    pub fn sh(&self, ns: &str, cmd: &str) -> String {
        let mut args = vec!["ip", "netns", "exec", ns];
        args.extend(cmd.split_whitespace());
        run(&args).unwrap()
    }

    /// Resolves ARP on both links, forgets those pings' conntrack entries, then captures the
    /// router's `lan` and `wan` in both directions into `dir` (see [`Lab::capture_file`]):
    /// the captures and the table then hold exactly the test's traffic.
    pub fn start_captures(&mut self, dir: &Path) {
        let (c, s, r) = (self.c.clone(), self.s.clone(), self.r.clone());
        self.sh(&c, &format!("ping -c 1 -W 2 {ROUTER_LAN}"));
        self.sh(&s, &format!("ping -c 1 -W 2 {ROUTER_WAN}"));
        let _ = run(&["ip", "netns", "exec", &r, "conntrack", "-F"]);
        for (iface, d) in [("lan", "in"), ("wan", "in"), ("lan", "out"), ("wan", "out")] {
            self.capture(iface, d, &Lab::capture_file(dir, iface, d));
        }
    }

    /// Where [`Lab::start_captures`] writes the capture of `iface` in direction `dir`.
    pub fn capture_file(dir: &Path, iface: &str, d: &str) -> PathBuf {
        dir.join(format!("{iface}-{d}.pcap"))
    }

    /// Starts tcpdump on the router's `iface` for direction `dir` (in/out), writing `file`;
    /// returns once it is listening.
    pub fn capture(&mut self, iface: &str, dir: &str, file: &Path) {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.r,
                "tcpdump",
                "-i",
                iface,
                "-Q",
                dir,
                "-U",
                "-n",
                "-Z",
                "root",
                "--immediate-mode",
            ])
            .args(["--time-stamp-precision=nano", "-w"])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while err.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("listening on") {
            line.clear();
        }
        assert!(
            line.contains("listening on"),
            "tcpdump did not start: {line}"
        );
        // Keep draining its stderr so tcpdump never blocks on a full pipe.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut err, &mut std::io::sink());
        });
        self.children.push(child);
    }

    /// Stops the captures (SIGINT, so tcpdump closes its files) and waits for them.
    pub fn stop_captures(&mut self) {
        for c in &self.children {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
        }
        for mut c in self.children.drain(..) {
            let _ = c.wait();
        }
    }

    /// Runs this test binary's ignored `peer` test inside `ns` with `KS_PEER_ROLE=role`.
    pub fn peer(&self, ns: &str, role: &str) -> Child {
        let exe = std::env::current_exe().unwrap();
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .args([
                "--exact",
                "peer",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("KS_PEER_ROLE", role)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("peer")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.c, &self.r, &self.s] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Reads the peer's stdout until a line contains `word`; false if it ended first.
pub fn wait_for(child: &mut Child, word: &str) -> bool {
    BufReader::new(child.stdout.as_mut().unwrap())
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains(word))
}

/// Prints `word` on a line of its own for [`wait_for`].
pub fn say(word: &str) {
    use std::io::Write;
    println!("\n{word}");
    std::io::stdout().flush().unwrap();
}

/// Waits (15 s at most) for a peer to end, and requires it to succeed.
pub fn finish(mut child: Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{what} failed");
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Frames of a pcap written by tcpdump.
pub fn frames(file: &Path) -> Vec<CapturedFrame> {
    let mut r = CaptureReader::new(std::fs::File::open(file).unwrap()).unwrap();
    let mut v = Vec::new();
    while let Some(f) = r.next_frame() {
        v.push(f.unwrap());
    }
    v
}

/// The two ingress captures, merged by time, as a pcapng whose interfaces are `lan`, `wan`.
pub fn merge(lan: &[CapturedFrame], wan: &[CapturedFrame]) -> Vec<u8> {
    let mut all: Vec<Cap> = [("lan", lan), ("wan", wan)]
        .into_iter()
        .flat_map(|(iface, v)| {
            v.iter().map(move |f| Cap {
                ns: f.ts.0,
                iface,
                data: f.data.clone(),
            })
        })
        .collect();
    all.sort_by_key(|f| f.ns);
    pcapng(&all)
}

/// The router's configuration for keepstate: ports `lan` and `wan` with the router's
/// addresses, the rules file, and `extra` (routes, settings) after them.
pub fn config(rules: &Path, extra: &str) -> String {
    format!(
        r#"rules = "{}"

[[port]]
name = "lan"
addresses = ["{ROUTER_LAN}/24"]

[[port]]
name = "wan"
addresses = ["{ROUTER_WAN}/24"]
{extra}"#,
        rules.display()
    )
}

/// A replay of the router's ingress through keepstate: the configuration `cfg_text` (written
/// next to `rules_file`), with `conntrack -L` accounting as `acct` says, tracing each frame.
pub fn replay(rules_file: &Path, cfg_text: &str, acct: bool) -> Replay {
    let cfg_file = rules_file.with_extension("toml");
    std::fs::write(&cfg_file, cfg_text).unwrap();
    let cfg = Config::load(&cfg_file).unwrap();
    let loaded = rules::load_file(rules_file).unwrap();
    let engine = Engine::from_config(&cfg, &loaded).unwrap();
    let opts = ReplayOpts {
        trace: true,
        events: false,
        log: false,
        show: ShowOpts {
            acct,
            ..ShowOpts::default()
        },
    };
    Replay::new(engine, Some(cfg), Ingress::Auto, opts)
}

/// What identifies an IPv4 packet across a hop (TTL and checksums change, MACs too).
pub fn packet_id(frame: &[u8]) -> Option<String> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        return None;
    };
    let h = ip.header();
    let mut id = format!(
        "{} > {} id {} len {}",
        h.source_addr(),
        h.destination_addr(),
        h.identification(),
        h.total_len()
    );
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => id.push_str(&format!(
            " tcp {}>{} seq {} ack {} syn{} fin{} rst{}",
            t.source_port(),
            t.destination_port(),
            t.sequence_number(),
            t.acknowledgment_number(),
            t.syn() as u8,
            t.fin() as u8,
            t.rst() as u8
        )),
        Some(TransportSlice::Udp(u)) => id.push_str(&format!(
            " udp {}>{}",
            u.source_port(),
            u.destination_port()
        )),
        Some(TransportSlice::Icmpv4(i)) => match i.icmp_type() {
            Icmpv4Type::EchoRequest(e) => {
                id.push_str(&format!(" icmp echo-request id {} seq {}", e.id, e.seq))
            }
            Icmpv4Type::EchoReply(e) => {
                id.push_str(&format!(" icmp echo-reply id {} seq {}", e.id, e.seq))
            }
            t => id.push_str(&format!(" icmp {t:?}")),
        },
        _ => {}
    }
    Some(id)
}

pub fn multiset(ids: impl Iterator<Item = String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for i in ids {
        *m.entry(i).or_default() += 1;
    }
    m
}

/// What two multisets do not share, one line each, `-` for `theirs` only and `+` for
/// `ours` only: the readable part of a failed comparison.
pub fn multiset_diff(theirs: &BTreeMap<String, usize>, ours: &BTreeMap<String, usize>) -> String {
    let mut out = String::new();
    for k in theirs
        .keys()
        .chain(ours.keys().filter(|k| !theirs.contains_key(*k)))
    {
        let (a, b) = (
            theirs.get(k).copied().unwrap_or(0),
            ours.get(k).copied().unwrap_or(0),
        );
        if a > b {
            out.push_str(&format!("- {k} (x{})\n", a - b));
        } else if b > a {
            out.push_str(&format!("+ {k} (x{})\n", b - a));
        }
    }
    out
}

/// A `conntrack -L` line without what depends on when it was read or on the kernel's
/// bookkeeping: the remaining timeout (third field) and `use=`.
pub fn normalise(line: &str) -> String {
    line.split_whitespace()
        .enumerate()
        .filter(|(i, w)| *i != 2 && !w.starts_with("use="))
        .map(|(_, w)| w)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `packets N bytes M` of every counter in `nft list ruleset`, in rule order.
pub fn nft_counters(listing: &str) -> Vec<(u64, u64)> {
    listing
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "counter")?;
            Some((w.get(i + 2)?.parse().ok()?, w.get(i + 4)?.parse().ok()?))
        })
        .collect()
}

/// keepstate's counters, as [`nft_counters`] reads nft's: every rule with a `counter`, in
/// rule order.
pub fn engine_counters(engine: &Engine) -> Vec<(u64, u64)> {
    use keepstate::rules::ir::Stmt;
    use std::sync::atomic::Ordering::Relaxed;
    let compiled = engine.compiled();
    compiled
        .ruleset
        .rules()
        .filter(|r| r.stmts.iter().any(|s| matches!(s, Stmt::Counter { .. })))
        .map(|r| {
            let c = &compiled.counters[r.id as usize];
            (c[0].load(Relaxed), c[1].load(Relaxed))
        })
        .collect()
}
