//! Test kit for the kernel differential tests (`netns_conntrack`, `netns_nat`,
//! `netns_tcp_edge`, `netns_helpers`): a client, a router and a server network namespace (IPv6 on request),
//! tcpdump on the router's interfaces, the peers (the test binary itself re-run inside a
//! namespace, or a thread of it that entered one: [`spawn_in_netns`]), a packet socket that
//! injects hand-made frames ([`RawLink`]), and reading the results (captures merged into a
//! pcapng for `keepstate::replay`, frame identities and byte-for-byte keys, `conntrack -L`
//! and nft counters).
//!
//! Namespaces are uniquely named (tag and pid) and deleted on Drop, also when the test fails,
//! and by a watchdog if the test hangs; no traffic leaves them.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use etherparse::checksum::Sum16BitWords;
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
/// The IPv6 addresses [`Lab::enable_ipv6`] gives the same interfaces.
pub const CLIENT6: &str = "fd77:1::2";
pub const SERVER6: &str = "fd77:2::2";
pub const ROUTER_LAN6: &str = "fd77:1::1";
pub const ROUTER_WAN6: &str = "fd77:2::1";

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
    /// Whether [`Lab::enable_ipv6`] ran.
    ipv6: bool,
    /// Dropped with the lab, which calls off its watchdog.
    _dog: std::sync::mpsc::Sender<()>,
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
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let lab = Lab {
            c: format!("{tag}-c-{id}"),
            r: format!("{tag}-r-{id}"),
            s: format!("{tag}-s-{id}"),
            children: Vec::new(),
            ipv6: false,
            _dog: tx,
        };
        // A watchdog: a hung peer must not leave namespaces behind when the harness is
        // killed, so after `limit` it deletes them and ends the test binary. Called off when
        // the lab drops, so that it cannot end a later test.
        let names = [lab.c.clone(), lab.r.clone(), lab.s.clone()];
        let tag = tag.to_string();
        std::thread::spawn(move || {
            if rx.recv_timeout(limit) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                return;
            }
            // Printed to the terminal: the test harness's capture dies with the process.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "{tag}: timed out after {limit:?}; deleting {names:?}"
            );
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

    /// Turns IPv6 on (which [`Lab::new`] leaves off) with the `CLIENT6`... addresses, the
    /// router forwarding and the hosts routed through it. Quiet: no duplicate address
    /// detection, no router solicitations, no link-local addresses and permanent neighbours,
    /// so the captures hold only the test's traffic. Call before [`Lab::start_captures`].
    pub fn enable_ipv6(&mut self) {
        let hosts = [
            (self.c.clone(), CLIENT6, ROUTER_LAN6),
            (self.s.clone(), SERVER6, ROUTER_WAN6),
        ];
        let r = self.r.clone();
        for (ns, ifaces) in [
            (&r, &["lan", "wan"][..]),
            (&hosts[0].0, &["eth0"][..]),
            (&hosts[1].0, &["eth0"][..]),
        ] {
            for i in ["all", "default"].iter().chain(ifaces) {
                for (k, v) in [
                    ("accept_dad", 0),
                    ("router_solicitations", 0),
                    ("addr_gen_mode", 1),
                ] {
                    // `all` has no addr_gen_mode on older kernels.
                    let _ = run(&[
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        "sysctl",
                        "-qw",
                        &format!("net.ipv6.conf.{i}.{k}={v}"),
                    ]);
                }
            }
            for i in ["all", "default"].iter().chain(ifaces) {
                self.sh(ns, &format!("sysctl -qw net.ipv6.conf.{i}.disable_ipv6=0"));
            }
        }
        self.sh(
            &r,
            &format!("ip -6 addr add {ROUTER_LAN6}/64 dev lan nodad"),
        );
        self.sh(
            &r,
            &format!("ip -6 addr add {ROUTER_WAN6}/64 dev wan nodad"),
        );
        self.sh(&r, "sysctl -qw net.ipv6.conf.all.forwarding=1");
        for (ns, addr, gw) in &hosts {
            self.sh(ns, &format!("ip -6 addr add {addr}/64 dev eth0 nodad"));
            self.sh(ns, &format!("ip -6 route add default via {gw}"));
        }
        // Without a link-local address the kernel sends no neighbour solicitation for a packet
        // it forwards (ndisc_send_ns needs one as the source), so a neighbour learnt from the
        // hosts' own solicitations dies a few seconds after it goes stale, and forwarding then
        // fails with "No route to host". A slow machine gets there within one test: the
        // neighbours are permanent instead, on all four ends of the two links.
        for (ns, addr, iface, peer, peer_iface, peer_addr) in [
            (&hosts[0].0, CLIENT6, "eth0", &r, "lan", ROUTER_LAN6),
            (&hosts[1].0, SERVER6, "eth0", &r, "wan", ROUTER_WAN6),
        ] {
            let (mac, peer_mac) = (self.mac_text(ns, iface), self.mac_text(peer, peer_iface));
            self.sh(
                peer,
                &format!("ip -6 neigh replace {addr} lladdr {mac} dev {peer_iface} nud permanent"),
            );
            self.sh(
                ns,
                &format!(
                    "ip -6 neigh replace {peer_addr} lladdr {peer_mac} dev {iface} nud permanent"
                ),
            );
        }
        self.ipv6 = true;
    }

    /// The MAC address of `iface` in namespace `ns`, as `ip` prints it.
    fn mac_text(&self, ns: &str, iface: &str) -> String {
        self.sh(ns, &format!("cat /sys/class/net/{iface}/address"))
            .trim()
            .to_string()
    }

    /// The MAC address of `iface` in namespace `ns`.
    pub fn mac(&self, ns: &str, iface: &str) -> [u8; 6] {
        let text = self.mac_text(ns, iface);
        let mut mac = [0u8; 6];
        for (b, hex) in mac.iter_mut().zip(text.split(':')) {
            *b = u8::from_str_radix(hex, 16).unwrap();
        }
        mac
    }

    /// The router's `conntrack -L`, IPv4 then IPv6 (`-L` alone lists only IPv4).
    pub fn kernel_table(&self) -> String {
        let list =
            |f: &str| run(&["ip", "netns", "exec", &self.r, "conntrack", "-L", "-f", f]).unwrap();
        list("ipv4") + &list("ipv6")
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
        if self.ipv6 {
            self.sh(&c, &format!("ping -6 -c 1 -W 2 {ROUTER_LAN6}"));
            self.sh(&s, &format!("ping -6 -c 1 -W 2 {ROUTER_WAN6}"));
        }
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
                // 16 MiB of kernel buffer: bulk transfers (netns_helpers' FTP data) come
                // faster than tcpdump writes, and a dropped frame would make the replay wrong.
                "-B",
                "16384",
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

    /// Starts `conntrack -E` in the router, writing the events to `file` (read them with
    /// [`read_events`]); it stops with the captures. Call after [`Lab::start_captures`], whose
    /// flush it would otherwise report. Returns once it listens: once the event of an entry
    /// made for the purpose (from [`EVENTS_MARK`], then deleted) is in the file.
    pub fn record_events(&mut self, file: &Path) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.r, "conntrack", "-E"])
            .stdout(std::fs::File::create(file).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("conntrack -E");
        self.children.push(child);
        let r = self.r.clone();
        let mark = |op: &str| {
            let mut args = vec!["ip", "netns", "exec", &r, "conntrack", op, "-p", "udp"];
            args.extend([
                "-s",
                EVENTS_MARK,
                "-d",
                EVENTS_MARK,
                "--sport",
                "9",
                "--dport",
                "9",
            ]);
            if op == "-I" {
                args.extend(["-t", "30"]);
            }
            run(&args).unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            mark("-I");
            std::thread::sleep(Duration::from_millis(50));
            mark("-D");
            if std::fs::read_to_string(file).is_ok_and(|t| t.contains(EVENTS_MARK)) {
                return;
            }
            assert!(Instant::now() < deadline, "conntrack -E never listened");
        }
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

/// Runs `f` on a new thread that has entered namespace `ns` (`setns`): the sockets it opens
/// belong to `ns` for their whole life, whichever thread uses them later.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on this thread only, with a namespace file we hold open.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// [`spawn_in_netns`], waiting for the result.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_netns(ns, f).join().unwrap()
}

/// A packet socket (`AF_PACKET`, `SOCK_RAW`, protocol 0 so it receives nothing) on an
/// interface of a namespace: sends whole Ethernet frames exactly as given. They leave the
/// interface without passing the host's own IP stack or netfilter, so the host neither
/// tracks nor answers them.
pub struct RawLink {
    fd: OwnedFd,
    ifindex: i32,
}

impl RawLink {
    pub fn open(ns: &str, iface: &str) -> RawLink {
        let name = std::ffi::CString::new(iface).unwrap();
        in_netns(ns, move || {
            // SAFETY: plain socket calls; the fd is owned at once.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
            assert!(ifindex > 0, "no interface {name:?}");
            RawLink { fd, ifindex }
        })
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: sockaddr_ll is plain data; zero is a valid value for every field.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = self.ifindex;
        to.sll_protocol = u16::from_ne_bytes([frame[12], frame[13]]);
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the buffer and the address outlive the call, their lengths are theirs.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// One TCP exchange on the server side: accepts a connection on `l`, reads `expect` bytes,
/// writes `answer`, reads until the client closes, and closes.
pub fn serve_once(l: &std::net::TcpListener, expect: usize, answer: &[u8]) {
    use std::io::{Read, Write};
    let (mut s, _) = l.accept().unwrap();
    s.read_exact(&mut vec![0u8; expect]).unwrap();
    s.write_all(answer).unwrap();
    s.read_to_end(&mut Vec::new()).unwrap();
}

/// The address of the entry [`Lab::record_events`] makes to know `conntrack -E` listens.
pub const EVENTS_MARK: &str = "192.0.2.1";

/// The events [`Lab::record_events`] wrote, but for its own entry's.
pub fn read_events(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter(|l| !l.contains(&format!("src={EVENTS_MARK} ")))
        .map(str::to_string)
        .collect()
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

/// A temporary directory for a test's files (captures, configuration) with the router's
/// ruleset `rules` written in it as `router.nft`, whose path comes second.
pub fn rules_in_tempdir(rules: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("router.nft");
    std::fs::write(&file, rules).unwrap();
    (dir, file)
}

/// The router's configuration for keepstate: ports `lan` and `wan` with the router's
/// addresses, the rules file, and `extra` (routes, settings) after them.
pub fn config(rules: &Path, extra: &str) -> String {
    ports_config(rules, &[ROUTER_LAN], &[ROUTER_WAN], extra)
}

/// [`config`] for a lab with [`Lab::enable_ipv6`]: the ports have their IPv6 addresses too.
pub fn config6(rules: &Path, extra: &str) -> String {
    ports_config(
        rules,
        &[ROUTER_LAN, ROUTER_LAN6],
        &[ROUTER_WAN, ROUTER_WAN6],
        extra,
    )
}

fn ports_config(rules: &Path, lan: &[&str], wan: &[&str], extra: &str) -> String {
    let addrs = |v: &[&str]| {
        v.iter()
            .map(|a| format!("\"{a}/{}\"", if a.contains(':') { 64 } else { 24 }))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"rules = "{}"

[[port]]
name = "lan"
addresses = [{}]

[[port]]
name = "wan"
addresses = [{}]
{extra}"#,
        rules.display(),
        addrs(lan),
        addrs(wan)
    )
}

/// A replay of the router's ingress through keepstate: the configuration `cfg_text` (written
/// next to `rules_file`), with `conntrack -L` accounting as `acct` says, tracing each frame
/// and, if `events`, following each trace line with the frame's `conntrack -E` lines.
pub fn replay(rules_file: &Path, cfg_text: &str, acct: bool, events: bool) -> Replay {
    let cfg_file = rules_file.with_extension("toml");
    std::fs::write(&cfg_file, cfg_text).unwrap();
    let cfg = Config::load(&cfg_file).unwrap();
    let loaded = rules::load_file(rules_file).unwrap();
    let engine = Engine::from_config(&cfg, &loaded).unwrap();
    let opts = ReplayOpts {
        trace: true,
        events,
        log: false,
        show: ShowOpts {
            acct,
            ..ShowOpts::default()
        },
    };
    Replay::new(engine, Some(cfg), Ingress::Auto, opts)
}

/// What keepstate did with the router's ingress (see [`replay_ingress`]).
pub struct Replayed {
    /// The replay's trace, a line per frame.
    pub trace: Vec<String>,
    /// [`packet_id`] of every frame keepstate forwarded.
    pub forwarded: Vec<String>,
    /// Every frame keepstate forwarded, as it leaves, by the port it leaves by.
    pub out: BTreeMap<usize, Vec<Vec<u8>>>,
    /// keepstate's rule counters, as [`engine_counters`] reads them.
    pub counters: Vec<(u64, u64)>,
    /// The final table, as `conntrack -L` prints it.
    pub listing: Vec<String>,
    /// The expectations left, as `/proc/net/nf_conntrack_expect` prints them.
    pub expect: Vec<String>,
}

/// Replays through `replay` the router's ingress that [`Lab::start_captures`] captured in
/// `dir` (`lan` and `wan` merged by time, also kept as `ingress.pcapng`). `before` runs
/// before each frame, to do to keepstate what the test did to the kernel at that moment.
pub fn replay_ingress(
    dir: &Path,
    mut replay: Replay,
    mut before: impl FnMut(&Replay, &CapturedFrame),
) -> Replayed {
    let lan_in = frames(&Lab::capture_file(dir, "lan", "in"));
    let wan_in = frames(&Lab::capture_file(dir, "wan", "in"));
    eprintln!(
        "captured {} frames in on lan, {} on wan",
        lan_in.len(),
        wan_in.len()
    );
    let merged = merge(&lan_in, &wan_in);
    std::fs::write(dir.join("ingress.pcapng"), &merged).unwrap();
    let mut reader = CaptureReader::new(std::io::Cursor::new(merged)).unwrap();
    let (mut trace, mut forwarded, mut out) = (Vec::new(), Vec::new(), BTreeMap::new());
    while let Some(f) = reader.next_frame() {
        let f = f.unwrap();
        before(&replay, &f);
        let step = replay.frame(&f);
        trace.extend(step.lines);
        if let Some(port) = step.leaves {
            forwarded.extend(packet_id(&f.data));
            if let Some(o) = step.outcome {
                out.entry(port).or_insert_with(Vec::new).push(o.frame);
            }
        }
    }
    let counters = engine_counters(replay.engine());
    let listing = replay.finish().listing;
    let now = replay.now().nanos();
    let expect = replay
        .engine()
        .tracker()
        .expectations()
        .list(now)
        .iter()
        .map(|e| keepstate::conntrack::expect::proc_line(e, now))
        .collect();
    Replayed {
        trace,
        forwarded,
        out,
        counters,
        listing,
        expect,
    }
}

/// What the kernel forwarded: [`packet_id`] of every frame captured leaving `lan` and `wan`
/// in `dir`, but for the packets the router sent itself (from one of `own`; ARP is no packet).
pub fn kernel_forwarded(dir: &Path, own: &[&str]) -> BTreeMap<String, usize> {
    let egress = ["lan", "wan"]
        .into_iter()
        .flat_map(|iface| frames(&Lab::capture_file(dir, iface, "out")))
        .filter_map(|f| packet_id(&f.data))
        .filter(|id| !own.iter().any(|a| id.starts_with(&format!("{a} "))));
    multiset(egress)
}

/// What identifies an IP packet across a hop (TTL, hop limit and checksums change, MACs too).
pub fn packet_id(frame: &[u8]) -> Option<String> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let (src, dst, size): (std::net::IpAddr, std::net::IpAddr, String) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            let size = format!("id {} len {}", h.identification(), h.total_len());
            (h.source_addr().into(), h.destination_addr().into(), size)
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            let size = format!("plen {}", h.payload_length());
            (h.source_addr().into(), h.destination_addr().into(), size)
        }
        _ => return None,
    };
    let mut id = format!("{src} > {dst} {size}");
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
        Some(TransportSlice::Icmpv6(i)) => id.push_str(&format!(" icmpv6 {:?}", i.icmp_type())),
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

/// A `conntrack -L` or `conntrack -E` line without what depends on when it was read or on
/// the kernel's bookkeeping: the remaining timeout (the third field; in an event, the number
/// after the tag, which a `[DESTROY]` has only when time remained) and `use=`.
pub fn normalise(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let timeout = if words.first().is_some_and(|w| w.starts_with('[')) {
        3
    } else {
        2
    };
    words
        .iter()
        .enumerate()
        .filter(|(i, w)| {
            let is_timeout = *i == timeout && w.parse::<u64>().is_ok();
            !is_timeout && !w.starts_with("use=")
        })
        .map(|(_, w)| *w)
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

// Comparing forwarded frames byte for byte.

/// Whether the IPv4 header's and the transport's checksums verify, recomputed from scratch
/// (a zero UDP checksum is "none").
pub fn checksums(ip: &[u8]) -> &'static str {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    if Sum16BitWords::new().add_slice(&ip[..ihl]).ones_complement() != 0 {
        return "ip-checksum-BAD";
    }
    let seg = &ip[ihl..total];
    let proto = ip[9];
    let sum = match proto {
        6 | 17 => {
            if proto == 17 && seg.get(6..8) == Some(&[0, 0]) {
                return "checksums-ok";
            }
            Sum16BitWords::new()
                .add_slice(&ip[12..20])
                .add_2bytes([0, proto])
                .add_2bytes((seg.len() as u16).to_be_bytes())
                .add_slice(seg)
        }
        1 => Sum16BitWords::new().add_slice(seg),
        _ => return "checksums-ok",
    };
    if sum.ones_complement() == 0 {
        "checksums-ok"
    } else {
        "l4-checksum-BAD"
    }
}

/// Where a transport checksum sits in its header.
pub fn l4_checksum_at(proto: u8) -> Option<usize> {
    match proto {
        6 => Some(16),
        17 => Some(6),
        1 => Some(2),
        _ => None,
    }
}

/// The IPv4 packet of an Ethernet frame, and its transport header's offset in it.
pub fn ip_of(frame: &[u8]) -> Option<(&[u8], usize)> {
    if frame.get(12..14) != Some(&[0x08, 0x00]) {
        return None;
    }
    let ip = frame.get(14..)?;
    Some((ip, usize::from(ip[0] & 0x0f) * 4))
}

/// What must be equal between a frame the kernel forwarded and the one keepstate forwards:
/// [`packet_id`], the TTL, whether the checksums verify (recomputed from scratch), and a hash
/// of the whole IP packet, payload included, with its checksum fields zeroed. `normalise`
/// may first blank what the two may choose differently (a randomly picked port); the
/// checksums are judged on the frame as it was.
pub fn frame_key(frame: &[u8], normalise: impl FnOnce(&mut [u8])) -> Option<String> {
    let (ip, l4) = ip_of(frame)?;
    let sums = checksums(ip);
    let mut f = frame.to_vec();
    normalise(&mut f);
    let id = packet_id(&f)?;
    let ip = &mut f[14..];
    ip[10..12].fill(0);
    if let Some(at) = l4_checksum_at(ip[9]) {
        ip[l4 + at..l4 + at + 2].fill(0);
    }
    // FNV-1a over the packet.
    let h = ip.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    Some(format!("{id} ttl {} {sums} bytes {h:016x}", ip[8]))
}
