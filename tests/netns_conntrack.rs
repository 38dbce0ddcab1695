//! Differential test of `keepstate replay` against the Linux kernel. Needs root, `nft`,
//! `conntrack`, `tcpdump` and `ping` (scripts/setup.sh installs them); skipped with a message
//! otherwise.
//!
//! A router namespace joins a client namespace (its `lan`) and a server namespace (its `wan`)
//! and runs an nft ruleset with conntrack accounting on. Real traffic crosses it: TCP with
//! data and a FIN teardown started by either side, a reset of an established connection, a
//! SYN answered by RST, UDP request/response, a UDP stream held over 2 s (ASSURED), an ICMP port
//! unreachable RELATED to its UDP flow, a TCP connection whose entry is deleted mid-stream
//! (`conntrack -D`, done at the same point of the replay) and picked up again by
//! `nf_conntrack_tcp_loose`, a ping, and a connection from the server side
//! that the policy drops (its replies would only be allowed by `ct state established`). The
//! router's ingress on both interfaces is captured with tcpdump, merged into a pcapng whose
//! interface names are the port names, and replayed through keepstate with the equivalent
//! configuration. Compared:
//!
//! * `conntrack -L` lines, normalised only in the remaining timeout and `use=`: state names,
//!   tuples, `[UNREPLIED]`/`[ASSURED]`, `mark=`, packet and byte counters must agree;
//! * the nft rule counters (the verdicts per `ct state` class) against keepstate's;
//! * the frames the kernel forwarded (captured on egress) against those keepstate forwards.
//!
//! The traffic comes from this test binary itself, re-run inside a namespace with
//! `ip netns exec` as the ignored test `peer` (std sockets only). Namespaces are uniquely
//! named and deleted on Drop, also when the test fails; no traffic leaves them.

mod common {
    pub mod capture;
}

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::DataLink;

use keepstate::config::Config;
use keepstate::conntrack::show::ShowOpts;
use keepstate::engine::Engine;
use keepstate::replay::{CaptureReader, CapturedFrame, Ingress, Replay, ReplayOpts};
use keepstate::rules;
use keepstate::rules::ir::Stmt;

const CLIENT: &str = "10.77.1.2";
const SERVER: &str = "10.77.2.2";

/// The ruleset both the kernel and keepstate run. Every rule counts, so the counters tell
/// how many packets took each path.
const RULES: &str = r#"flush ruleset
table inet filter {
	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state established,related counter accept
		ct state invalid counter drop
		iifname "lan" oifname "wan" ct state new counter accept
		counter
	}
}
"#;

fn config(rules: &Path) -> String {
    format!(
        r#"rules = "{}"

[[port]]
name = "lan"
addresses = ["10.77.1.1/24"]

[[port]]
name = "wan"
addresses = ["10.77.2.1/24"]
"#,
        rules.display()
    )
}

fn run(args: &[&str]) -> Result<String, String> {
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

/// Three namespaces (client, router, server), deleted on Drop.
struct Lab {
    c: String,
    r: String,
    s: String,
    /// Child processes started by the test (tcpdump), stopped on Drop.
    children: Vec<Child>,
}

impl Lab {
    fn new() -> Lab {
        let pid = std::process::id();
        let lab = Lab {
            c: format!("ksct-c-{pid}"),
            r: format!("ksct-r-{pid}"),
            s: format!("ksct-s-{pid}"),
            children: Vec::new(),
        };
        // A watchdog: a hung peer must not leave namespaces behind when the harness is
        // killed, so after 90 s it deletes them and ends the test binary.
        let names = [lab.c.clone(), lab.r.clone(), lab.s.clone()];
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(90));
            eprintln!("netns_conntrack: timed out; deleting {names:?}");
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
        // The router's interfaces are named as the ports, so `iifname "lan"` reads the same
        // in the kernel and in keepstate, and the capture's interface names are the ports.
        run(&[
            "ip", "-n", r, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", c,
        ])
        .unwrap();
        run(&[
            "ip", "-n", r, "link", "add", "wan", "type", "veth", "peer", "name", "eth0", "netns", s,
        ])
        .unwrap();
        lab.sh(r, "ip addr add 10.77.1.1/24 dev lan");
        lab.sh(r, "ip addr add 10.77.2.1/24 dev wan");
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
        lab.sh(c, "ip route add default via 10.77.1.1");
        lab.sh(s, &format!("ip addr add {SERVER}/24 dev eth0"));
        lab.sh(s, "ip link set eth0 up");
        lab.sh(s, "ip route add default via 10.77.2.1");
        lab
    }

    /// Runs a command line (split on blanks) in namespace `ns`; panics on failure.
    fn sh(&self, ns: &str, cmd: &str) -> String {
        let mut args = vec!["ip", "netns", "exec", ns];
        args.extend(cmd.split_whitespace());
        run(&args).unwrap()
    }

    /// Starts tcpdump on the router's `iface` for direction `dir` (in/out), writing `file`;
    /// returns once it is listening.
    fn capture(&mut self, iface: &str, dir: &str, file: &Path) {
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
    fn stop_captures(&mut self) {
        for c in &self.children {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
        }
        for mut c in self.children.drain(..) {
            let _ = c.wait();
        }
    }

    /// Runs this test binary's `peer` test inside `ns` with `role`.
    fn peer(&self, ns: &str, role: &str) -> Child {
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

fn can_run() -> bool {
    let root = run(&["id", "-u"]).is_ok_and(|o| o.trim() == "0");
    let tools = ["nft", "conntrack", "tcpdump", "ping", "ethtool"]
        .iter()
        .all(|t| Command::new(t).arg("--version").output().is_ok());
    let netns = root && run(&["ip", "netns", "list"]).is_ok();
    if !root || !tools || !netns {
        eprintln!(
            "SKIPPED: needs root, ip netns, nft, conntrack, tcpdump, ping and ethtool \
             (scripts/setup.sh installs them); run as root: cargo test --test netns_conntrack"
        );
        return false;
    }
    true
}

// The traffic, from inside the end namespaces.

/// Not a test: the traffic generator, run by `kernel_and_replay_agree` inside a namespace
/// (`KS_PEER_ROLE=server|client|probe`). Without that variable it does nothing.
#[test]
#[ignore = "helper: run inside a namespace by kernel_and_replay_agree"]
fn peer() {
    match std::env::var("KS_PEER_ROLE").as_deref() {
        Ok("server") => server(),
        Ok("client") => client(),
        Ok("probe") => probe(),
        Ok("mid") => mid(),
        _ => {}
    }
}

fn server() {
    let a = TcpListener::bind((SERVER, 8001)).unwrap();
    let b = TcpListener::bind((SERVER, 8002)).unwrap();
    let c = TcpListener::bind((SERVER, 8003)).unwrap();
    let u = UdpSocket::bind((SERVER, 5000)).unwrap();
    let stream = UdpSocket::bind((SERVER, 5003)).unwrap();
    let d = TcpListener::bind((SERVER, 8004)).unwrap();
    println!("\npeer-ready");
    std::io::stdout().flush().unwrap();
    // A: the client sends 100 bytes, gets 200, and closes first.
    let (mut s, _) = a.accept().unwrap();
    let mut buf = [0u8; 100];
    s.read_exact(&mut buf).unwrap();
    s.write_all(&[b'a'; 200]).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    drop(s);
    // B: the server sends 50 bytes and closes first; the client answers 10 bytes, closes.
    let (mut s, _) = b.accept().unwrap();
    s.write_all(&[b'b'; 50]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    drop(s);
    // C: closing with unread data makes Linux send a RST (RFC 2525).
    let (s, _) = c.accept().unwrap();
    std::thread::sleep(Duration::from_millis(150));
    drop(s);
    // UDP: one answer.
    let mut buf = [0u8; 64];
    let (n, from) = u.recv_from(&mut buf).unwrap();
    u.send_to(&buf[..n].repeat(2), from).unwrap();
    // A UDP stream: two exchanges more than 2 s apart make the entry ASSURED
    // (nf_conntrack_udp_timeout_stream).
    for _ in 0..2 {
        let (n, from) = stream.recv_from(&mut buf).unwrap();
        stream.send_to(&buf[..n], from).unwrap();
    }
    // D: an echo; its conntrack entry is deleted mid-stream (see `mid`).
    let (mut s, _) = d.accept().unwrap();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => s.write_all(&buf[..n]).unwrap(),
        }
    }
}

/// D from the client side: 10 bytes echoed, then a quiet second during which the test deletes
/// the connection's entry in the router (`conntrack -D`), then 20 bytes more and a FIN: the
/// router picks the connection up mid-stream (`nf_conntrack_tcp_loose`).
fn mid() {
    let mut s = TcpStream::connect((SERVER, 8004)).unwrap();
    let mut buf = [0u8; 20];
    s.write_all(&[b'm'; 10]).unwrap();
    s.read_exact(&mut buf[..10]).unwrap();
    println!("\nmid-open");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    s.write_all(&[b'n'; 20]).unwrap();
    s.read_exact(&mut buf).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
}

fn client() {
    let pause = || std::thread::sleep(Duration::from_millis(30));
    let mut s = TcpStream::connect((SERVER, 8001)).unwrap();
    s.write_all(&[b'x'; 100]).unwrap();
    let mut buf = [0u8; 200];
    s.read_exact(&mut buf).unwrap();
    pause();
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    drop(s);
    pause();
    let mut s = TcpStream::connect((SERVER, 8002)).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len(), 50);
    pause();
    s.write_all(&[b'y'; 10]).unwrap();
    drop(s);
    pause();
    let mut s = TcpStream::connect((SERVER, 8003)).unwrap();
    s.write_all(&[b'z'; 20]).unwrap();
    let mut buf = [0u8; 1];
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(s.read(&mut buf).is_err(), "expected a reset");
    drop(s);
    pause();
    // Nothing listens on 8009: the server's kernel answers the SYN with RST.
    assert!(TcpStream::connect((SERVER, 8009)).is_err());
    pause();
    let u = UdpSocket::bind((CLIENT, 5001)).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    u.send_to(b"query", (SERVER, 5000)).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = u.recv_from(&mut buf).unwrap();
    assert_eq!(n, 10);
    pause();
    // Nothing listens on UDP 5002: the server's kernel answers with ICMP port unreachable,
    // which is RELATED to the UDP entry and passes `ct state established,related accept`.
    let r = UdpSocket::bind((CLIENT, 5004)).unwrap();
    r.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    r.connect((SERVER, 5002)).unwrap();
    r.send(b"anyone?").unwrap();
    let err = r.recv(&mut buf).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    pause();
    let st = UdpSocket::bind((CLIENT, 5005)).unwrap();
    st.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for i in 0..2 {
        if i == 1 {
            std::thread::sleep(Duration::from_millis(2200));
        }
        st.send_to(b"tick", (SERVER, 5003)).unwrap();
        st.recv_from(&mut buf).unwrap();
    }
}

/// From the server side: a NEW connection towards the client, dropped by the policy.
fn probe() {
    let to: SocketAddr = format!("{CLIENT}:8100").parse().unwrap();
    assert!(TcpStream::connect_timeout(&to, Duration::from_millis(300)).is_err());
}

fn finish(mut child: Child, what: &str) {
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

// Reading the results.

/// Frames of a pcap written by tcpdump.
fn frames(file: &Path) -> Vec<CapturedFrame> {
    let mut r = CaptureReader::new(std::fs::File::open(file).unwrap()).unwrap();
    let mut v = Vec::new();
    while let Some(f) = r.next_frame() {
        v.push(f.unwrap());
    }
    v
}

/// The two ingress captures, merged by time, as a pcapng whose interfaces are `lan`, `wan`.
fn merge(lan: &[CapturedFrame], wan: &[CapturedFrame]) -> Vec<u8> {
    let mut all: Vec<(u32, &CapturedFrame)> = lan
        .iter()
        .map(|f| (0, f))
        .chain(wan.iter().map(|f| (1, f)))
        .collect();
    all.sort_by_key(|(_, f)| f.ts);
    let mut w = PcapNgWriter::new(Vec::new()).unwrap();
    for name in ["lan", "wan"] {
        w.write_pcapng_block(InterfaceDescriptionBlock {
            linktype: DataLink::ETHERNET,
            snaplen: 0xFFFF,
            options: vec![
                InterfaceDescriptionOption::IfName(Cow::Borrowed(name)),
                InterfaceDescriptionOption::IfTsResol(9),
            ],
        })
        .unwrap();
    }
    for (id, f) in all {
        w.write_pcapng_block(EnhancedPacketBlock {
            interface_id: id,
            timestamp: Duration::from_nanos(f.ts.0),
            original_len: f.data.len() as u32,
            data: Cow::Borrowed(&f.data),
            options: vec![],
        })
        .unwrap();
    }
    w.into_inner()
}

/// What identifies an IPv4 packet across a hop (TTL and checksums change, MACs too).
fn packet_id(frame: &[u8]) -> Option<String> {
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
        Some(TransportSlice::Icmpv4(i)) => id.push_str(&format!(" icmp {:?}", i.icmp_type())),
        _ => {}
    }
    Some(id)
}

fn multiset(ids: impl Iterator<Item = String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for i in ids {
        *m.entry(i).or_default() += 1;
    }
    m
}

/// A `conntrack -L` line without what depends on when it was read or on the kernel's
/// bookkeeping: the remaining timeout (third field) and `use=`.
fn normalise(line: &str) -> String {
    line.split_whitespace()
        .enumerate()
        .filter(|(i, w)| *i != 2 && !w.starts_with("use="))
        .map(|(_, w)| w)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `packets N bytes M` of every counter in `nft list ruleset`, in rule order.
fn nft_counters(listing: &str) -> Vec<(u64, u64)> {
    listing
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "counter")?;
            Some((w.get(i + 2)?.parse().ok()?, w.get(i + 4)?.parse().ok()?))
        })
        .collect()
}

#[test]
fn kernel_and_replay_agree() {
    if !can_run() {
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let rules_file = dir.path().join("router.nft");
    std::fs::write(&rules_file, RULES).unwrap();
    let mut lab = Lab::new();
    let r = lab.r.clone();
    lab.sh(&r, &format!("nft -f {}", rules_file.display()));
    // Accounting on for packets= bytes=; on after the ruleset so conntrack is loaded.
    lab.sh(&r, "sysctl -qw net.netfilter.nf_conntrack_acct=1");

    // Resolve ARP before capturing, then forget those pings' entries: the capture and the
    // table then hold exactly the test's traffic.
    let (c, s) = (lab.c.clone(), lab.s.clone());
    lab.sh(&c, "ping -c 1 -W 2 10.77.1.1");
    lab.sh(&s, "ping -c 1 -W 2 10.77.2.1");
    let _ = run(&["ip", "netns", "exec", &r, "conntrack", "-F"]);
    let cap = |n: &str| -> PathBuf { dir.path().join(n) };
    for (iface, d) in [("lan", "in"), ("wan", "in"), ("lan", "out"), ("wan", "out")] {
        lab.capture(iface, d, &cap(&format!("{iface}-{d}.pcap")));
    }

    eprintln!("netns_conntrack: lab up, captures running");
    let mut server = lab.peer(&s, "server");
    let ready = BufReader::new(server.stdout.as_mut().unwrap())
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("peer-ready"));
    assert!(ready, "the server never got ready");
    eprintln!("netns_conntrack: server ready");
    finish(lab.peer(&c, "client"), "client");
    eprintln!("netns_conntrack: client done");
    // D: delete its entry in a quiet moment, and remember when, to do the same in the replay.
    let mut mid = lab.peer(&c, "mid");
    let open = BufReader::new(mid.stdout.as_mut().unwrap())
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("mid-open"));
    assert!(open, "the mid-stream client never opened");
    std::thread::sleep(Duration::from_millis(300));
    run(&[
        "ip",
        "netns",
        "exec",
        &r,
        "conntrack",
        "-D",
        "-p",
        "tcp",
        "--orig-port-dst",
        "8004",
    ])
    .expect("conntrack -D");
    let deleted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    finish(mid, "mid");
    finish(server, "server");
    lab.sh(&c, &format!("ping -c 1 -W 2 {SERVER}"));
    finish(lab.peer(&s, "probe"), "probe");
    std::thread::sleep(Duration::from_millis(100));

    eprintln!("netns_conntrack: traffic done");
    let kernel_ct = run(&["ip", "netns", "exec", &r, "conntrack", "-L"]).unwrap();
    let kernel_nft = lab.sh(&r, "nft list ruleset");
    lab.stop_captures();

    // Keepstate replays the router's ingress.
    let lan_in = frames(&cap("lan-in.pcap"));
    let wan_in = frames(&cap("wan-in.pcap"));
    eprintln!(
        "netns_conntrack: captured {} frames on lan, {} on wan ({} bytes)",
        lan_in.len(),
        wan_in.len(),
        std::fs::metadata(cap("lan-in.pcap")).map_or(0, |m| m.len())
    );
    let merged = merge(&lan_in, &wan_in);
    std::fs::write(cap("ingress.pcapng"), &merged).unwrap();
    let cfg_file = dir.path().join("router.toml");
    std::fs::write(&cfg_file, config(&rules_file)).unwrap();
    let cfg = Config::load(&cfg_file).unwrap();
    let loaded = rules::load_file(&rules_file).unwrap();
    let engine = Engine::from_config(&cfg, &loaded).unwrap();
    let opts = ReplayOpts {
        trace: true,
        events: false,
        log: false,
        show: ShowOpts {
            acct: true,
            ..ShowOpts::default()
        },
    };
    let mut replay = Replay::new(engine, Some(cfg), Ingress::Auto, opts);
    let mut reader = CaptureReader::new(std::io::Cursor::new(merged)).unwrap();
    let mut trace = Vec::new();
    let mut forwarded = Vec::new();
    let mut deleted = false;
    while let Some(f) = reader.next_frame() {
        let f = f.unwrap();
        if !deleted && f.ts.0 >= deleted_at {
            // The same deletion, at the same point of the traffic.
            deleted = true;
            let t = replay.engine().tracker();
            for c in t.conns() {
                if c.orig().proto == 6 && c.orig().dport() == 8004 {
                    t.kill(&c);
                }
            }
        }
        let step = replay.frame(&f);
        trace.extend(step.lines);
        if step.leaves.is_some() {
            forwarded.extend(packet_id(&f.data));
        }
    }
    let compiled = replay.engine().compiled();
    let ours_counters: Vec<(u64, u64)> = compiled
        .ruleset
        .rules()
        .filter(|r| r.stmts.iter().any(|s| matches!(s, Stmt::Counter { .. })))
        .map(|r| {
            let c = &compiled.counters[r.id as usize];
            (
                c[0].load(std::sync::atomic::Ordering::Relaxed),
                c[1].load(std::sync::atomic::Ordering::Relaxed),
            )
        })
        .collect();
    let report = replay.finish();
    let context = format!(
        "--- keepstate trace\n{}\n--- kernel conntrack -L\n{kernel_ct}--- keepstate\n{}\n--- nft\n{kernel_nft}",
        trace.join("\n"),
        report.listing.join("\n")
    );

    // 1. The connection tables.
    let mut theirs: Vec<String> = kernel_ct.lines().map(normalise).collect();
    let mut ours: Vec<String> = report.listing.iter().map(|l| normalise(l)).collect();
    theirs.sort();
    ours.sort();
    let kinds = |v: &[String], p: &str| v.iter().filter(|l| l.starts_with(p)).count();
    assert_eq!(
        kinds(&theirs, "tcp"),
        4,
        "A, B, C, D picked up mid-stream; the connection refused by RST left nothing\n{context}"
    );
    // D was picked up after the deletion: its counters start there (the 20 bytes, the FIN
    // exchange), not at the SYN.
    let d = theirs
        .iter()
        .find(|l| l.contains("dport=8004"))
        .expect("D's entry");
    eprintln!("netns_conntrack: mid-stream pickup: {d}");
    let first_packets: u64 = d
        .split_whitespace()
        .find_map(|w| w.strip_prefix("packets="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(
        first_packets <= 4,
        "D was not picked up mid-stream: {d}\n{context}"
    );
    // The request/response, the one refused by ICMP port unreachable (still UNREPLIED), and
    // the stream (ASSURED).
    assert_eq!(kinds(&theirs, "udp"), 3, "{context}");
    assert!(
        theirs
            .iter()
            .any(|l| l.starts_with("udp") && l.contains("[ASSURED]")),
        "{context}"
    );
    assert_eq!(kinds(&theirs, "icmp"), 1, "{context}");
    assert_eq!(theirs, ours, "conntrack -L differs\n{context}");

    // 2. The verdicts per ct state class: nft's rule counters.
    assert_eq!(
        nft_counters(&kernel_nft),
        ours_counters,
        "rule counters (established/related, invalid, new lan->wan, policy) differ\n{context}"
    );

    // 3. Frame by frame: what the kernel forwarded is what keepstate forwards.
    let egress = frames(&cap("lan-out.pcap"))
        .into_iter()
        .chain(frames(&cap("wan-out.pcap")))
        .filter_map(|f| packet_id(&f.data))
        // Nothing the router sends itself (there should be nothing but ARP) is forwarded.
        .filter(|id| !id.starts_with("10.77.1.1 ") && !id.starts_with("10.77.2.1 "));
    assert_eq!(
        multiset(egress),
        multiset(forwarded.into_iter()),
        "forwarded frames differ\n{context}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
