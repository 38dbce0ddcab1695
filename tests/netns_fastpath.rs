//! The XDP fast path in the live appliance (needs root): `keepstate run` with
//! examples/lab-flowtable.toml and .nft in a lab of its own. A multi-MiB download through
//! masquerade arrives intact, its connection is offloaded (`ct list` says [OFFLOAD]) and
//! most of its packets were forwarded by XDP, not the workers; a UDP exchange and an IPv6
//! download are offloaded too; a next hop's new MAC reaches the entries. After the download the flow stays, as kernel 6.18's flowtable
//! keeps a flow whose FIN went by (CLOSING) until it idles out; a reload without the flowtable
//! tears every flow down, the XDP map is emptied, and the closed TCP connections are back
//! with conntrack in CLOSE.
//! A run killed with SIGKILL leaves its program attached; the next start replaces it and
//! forwards through XDP again; when a host's veth stops running XDP (so redirects into it are
//! lost), the download still completes: the port leaves the fast path's egress (its XDP
//! features lose NDO_XMIT) and the workers forward its flows. SIGTERM detaches the program. In bridge mode, a download's flow is
//! forwarded by XDP with the frames' own MACs. A UDP flow that only XDP forwards, for longer
//! than the flowtable's 30 s timeout, is installed once and stays offloaded. A thousand UDP
//! flows, in two batches, grow the IPv4 table twice (to the map's end and back) while XDP
//! forwards them. A fast path with room for 512 flows refuses the flows beyond it, which the
//! workers forward, and takes them at their next refresh once the first flows idled out.
//!
//! Skipped with a message when not root or a tool is missing. The namespaces are deleted on
//! Drop and by a watchdog if the test hangs.
//!
//! Run it alone with: `cargo test --test netns_fastpath -- --nocapture` (as root).

#[path = "common/live.rs"]
mod live;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use keepstate::dataplane::lab::{FW_WAN, INTERNET, INTERNET6};
use live::*;

/// The download: thousands of full-size frames.
const BODY: usize = 8 * 1024 * 1024;
/// UDP datagrams echoed.
const DATAGRAMS: usize = 100;
/// Longer than the main loop's reading of the XDP counters (1 s), by more than this VM's
/// longest stop of a vCPU (0.7 s).
const READ: Duration = Duration::from_millis(2000);

/// How long to wait for a line keepstate's main loop writes within a second or so.
const SAY: Duration = Duration::from_secs(10);

/// The fast path's line of `keepstate stats`.
fn xdp_line(stats: &str) -> &str {
    stats
        .lines()
        .find(|l| l.starts_with("xdp fast path: "))
        .unwrap_or_else(|| panic!("no fast path line in the stats:\n{stats}"))
}

/// The fast path's line of `keepstate stats`: (entries, packets, bytes).
fn xdp(stats: &str) -> (u64, u64, u64) {
    let line = xdp_line(stats);
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(n.len() >= 3, "{line}");
    (n[0], n[1], n[2])
}

/// The `ct list` line of the `proto` connection to `dport`; `what` says which when missing.
fn conn<'a>(ct: &'a str, proto: &str, dport: u16, what: &str) -> &'a str {
    let port = format!(" dport={dport} ");
    ct.lines()
        .find(|l| l.starts_with(proto) && l.contains(&port))
        .unwrap_or_else(|| panic!("{what}:\n{ct}"))
}

/// Frames the workers received, all ports together.
fn worker_rx(stats: &str) -> u64 {
    stats
        .lines()
        .filter(|l| l.starts_with("port "))
        .filter_map(|l| {
            l.split("; rx ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// examples/lab-flowtable.toml and .nft written to `dir`, with a control socket there: the
/// config's path and the socket's.
fn flowtable_config(dir: &Path) -> (PathBuf, PathBuf) {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let rules_text = std::fs::read_to_string(examples.join("lab-flowtable.nft")).unwrap();
    let rules = dir.join("lab-flowtable.nft");
    std::fs::write(&rules, &rules_text).unwrap();
    let sock = dir.join("control.sock");
    let cfg = std::fs::read_to_string(examples.join("lab-flowtable.toml"))
        .unwrap()
        .replace(
            "rules = \"lab-flowtable.nft\"",
            &format!("rules = {:?}", rules.display().to_string()),
        )
        .replace(
            "control = \"/run/keepstate-lab.sock\"",
            &format!("control = {:?}", sock.display().to_string()),
        );
    let cfg_path = dir.join("lab-flowtable.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    (cfg_path, sock)
}

/// `keepstate run` with the configuration at `cfg_path`, its fast path loaded: its pid.
fn start_fast(g: &mut Guard, cfg_path: &Path) -> u32 {
    let (pid, lines) = start(g, cfg_path);
    assert!(
        !lines.contains("fast path is off"),
        "the fast path did not load"
    );
    pid
}

const UDP_SERVER: &str = "
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print('ready', flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
";

/// A UDP echo server on the Internet host's address, port 9000, in `ns`, once it listens (a
/// fixed wait was too short for a slow VM's Python: the first datagram went unanswered).
fn udp_echo_server(g: &mut Guard, ns: &str) {
    let mut server = in_ns(ns, &["python3", "-c", UDP_SERVER, INTERNET, "9000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("udp server");
    let mut line = String::new();
    let read = std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.as_mut().unwrap()),
        &mut line,
    );
    g.children.push(server);
    assert!(
        read.is_ok() && line.trim() == "ready",
        "the UDP echo server did not start: {line:?}"
    );
}

const UDP_CLIENT: &str = "
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('0.0.0.0', 40404))
gap = float(sys.argv[4]) if len(sys.argv) > 4 else 0
got = lost = 0
start = time.monotonic()
for i in range(int(sys.argv[3])):
    # Each datagram on the clock, not after a sleep: a slow VM oversleeps.
    time.sleep(max(0, start + i * gap - time.monotonic()))
    s.sendto(b'datagram %d' % i, (sys.argv[1], int(sys.argv[2])))
    if echoed(s, b'datagram %d' % i):
        got += 1
    else:
        lost += 1
        if lost == 3:
            break
print(got)
";

/// [`UDP_CLIENT`] with the [`ECHOED`] it calls.
fn udp_client() -> String {
    format!("{ECHOED}{UDP_CLIENT}")
}

/// The Python helper both UDP clients share: whether `sock` receives `want` within 2 s,
/// skipping the answers to earlier datagrams (one that came after its own wait ended, on a
/// VM that stalls, must not count against the next).
const ECHOED: &str = "
import socket, time
def echoed(sock, want):
    end = time.monotonic() + 2
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if sock.recv(2048) == want:
                return True
        except socket.timeout:
            return False
";

#[test]
fn offloaded_flows_are_forwarded_by_xdp() {
    if !can_run("netns_fastpath", &["curl", "python3", "ethtool", "ping"]) {
        return;
    }
    let t0 = Instant::now();
    let mut g = lab("x", 2, Duration::from_secs(60));
    let (lan, fw, wan) = (g.lab.lan.clone(), g.lab.fw.clone(), g.lab.wan.clone());

    let dir = tempfile::tempdir().unwrap();
    let (cfg_path, sock) = flowtable_config(dir.path());
    let rules = dir.path().join("lab-flowtable.nft");
    let rules_text = std::fs::read_to_string(&rules).unwrap();
    let pid = start_fast(&mut g, &cfg_path);
    let before = ctl_ok(&sock, &["stats"]);
    assert_eq!(xdp(&before).0, 0, "entries before any flow");

    eprintln!("TCP: {BODY} bytes lan -> wan through masquerade");
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let want = body(BODY);
    std::fs::write(www.join("blob"), &want).unwrap();
    http_server(&mut g, &wan, INTERNET, 8000, &www);
    let url = format!("http://{INTERNET}:8000/blob");
    download(&lan, &url, &dir.path().join("got"), &want);

    std::thread::sleep(READ);
    let ct = ctl_ok(&sock, &["ct", "list"]);
    eprintln!("{ct}");
    let tcp = conn(&ct, "tcp", 8000, "no connection of the download");
    assert!(tcp.contains("[OFFLOAD]"), "not offloaded: {tcp}");
    assert!(tcp.contains("dst=198.51.100.1"), "not masqueraded: {tcp}");
    let stats = ctl_ok(&sock, &["stats"]);
    let (entries, packets, xdp_bytes) = xdp(&stats);
    let slow = worker_rx(&stats);
    eprintln!(
        "  XDP: {entries} entries, {packets} packets {xdp_bytes} bytes; workers: {slow} frames"
    );
    assert_eq!(entries, 2, "both directions of the flow:\n{stats}");
    // About 5,800 full frames one way and an ACK for every one or two the other.
    assert!(packets > 5_000, "few packets went through XDP:\n{stats}");
    assert!(
        xdp_bytes >= BODY as u64,
        "fewer bytes than the body:\n{stats}"
    );
    assert!(
        packets > 20 * slow,
        "the workers saw too much of the download:\n{stats}"
    );

    eprintln!("UDP: {DATAGRAMS} datagrams echoed");
    udp_echo_server(&mut g, &wan);
    let n = DATAGRAMS.to_string();
    let echoed = ok(
        &lan,
        &["python3", "-c", &udp_client(), INTERNET, "9000", &n],
    );
    assert_eq!(echoed.trim(), n, "datagrams echoed");
    std::thread::sleep(READ);
    let ct = ctl_ok(&sock, &["ct", "list"]);
    let udp = conn(&ct, "udp", 9000, "no UDP connection");
    assert!(udp.contains("[OFFLOAD]"), "UDP not offloaded: {udp}");
    let stats = ctl_ok(&sock, &["stats"]);
    let (entries, after, _) = xdp(&stats);
    assert_eq!(entries, 4, "two flows, two directions each:\n{stats}");
    // The first datagram and its answer make the connection; the rest go through XDP.
    assert!(
        after - packets >= 2 * DATAGRAMS as u64 - 4,
        "UDP through XDP: {}\n{stats}",
        after - packets
    );

    eprintln!("IPv6: the same download, no NAT");
    http_server(&mut g, &wan, INTERNET6, 8006, &www);
    let url6 = format!("http://[{INTERNET6}]:8006/blob");
    download(&lan, &url6, &dir.path().join("got6"), &want);
    std::thread::sleep(READ);
    let ct = ctl_ok(&sock, &["ct", "list"]);
    let tcp6 = conn(&ct, "tcp", 8006, "no connection of the IPv6 download");
    assert!(tcp6.contains("[OFFLOAD]"), "not offloaded: {tcp6}");
    let stats = ctl_ok(&sock, &["stats"]);
    let (entries, v6, _) = xdp(&stats);
    assert_eq!(entries, 6, "three flows:\n{stats}");
    assert!(v6 - after > 5_000, "few IPv6 packets through XDP:\n{stats}");

    eprintln!("the WAN host's MAC changes: the UDP flow's entry follows it");
    ok(
        &wan,
        &[
            "ip",
            "link",
            "set",
            "dev",
            "eth0",
            "address",
            "02:00:00:00:be:ef",
        ],
    );
    ok(&wan, &["ip", "neigh", "flush", "dev", "eth0"]);
    // Its ARP question for the firewall tells the firewall the new MAC.
    ok(&wan, &["ping", "-c", "1", "-W", "2", FW_WAN]);
    std::thread::sleep(READ);
    let echoed = ok(
        &lan,
        &["python3", "-c", &udp_client(), INTERNET, "9000", &n],
    );
    assert_eq!(echoed.trim(), n, "datagrams echoed after the MAC changed");
    let stats = ctl_ok(&sock, &["stats"]);
    assert_eq!(xdp(&stats).0, 6, "the same three flows:\n{stats}");

    eprintln!("after the download: the flow stays (a FIN only marks it closing)");
    let tcp = conn(&ct, "tcp", 8000, "the closed download's connection is gone");
    assert!(tcp.contains("[OFFLOAD]"), "torn down early: {tcp}");

    eprintln!("reload without the flowtable: every flow torn down, the map emptied");
    let plain: String = rules_text
        .lines()
        .filter(|l| !l.contains("flow add @fastpath"))
        .collect::<Vec<_>>()
        .join("\n");
    let from = plain
        .find("\tflowtable fastpath {")
        .expect("flowtable block");
    let to = from + plain[from..].find("\t}\n").expect("its end") + 3;
    let plain = format!("{}{}", &plain[..from], &plain[to..]);
    std::fs::write(&rules, plain).unwrap();
    ctl_ok(&sock, &["reload"]);
    std::thread::sleep(READ);
    let stats = ctl_ok(&sock, &["stats"]);
    assert_eq!(xdp(&stats).0, 0, "entries left after the reload:\n{stats}");
    let ct = ctl_ok(&sock, &["ct", "list"]);
    eprintln!("{ct}");
    assert!(!ct.contains("[OFFLOAD]"), "still offloaded:\n{ct}");
    let tcp = conn(&ct, "tcp", 8000, "the download's connection is gone");
    // flow_offload_fixup_ct: a flow that saw a FIN comes back in CLOSE, 10 s.
    assert!(tcp.contains(" CLOSE "), "not back in CLOSE: {tcp}");

    eprintln!("a crash leaves the program attached; the next start replaces it");
    signal(pid, "-KILL");
    let _ = g.children.remove(0).wait();
    let links = ok(&fw, &["ip", "link", "show"]);
    assert!(
        links.contains("prog/xdp"),
        "nothing left attached:\n{links}"
    );
    std::fs::write(&rules, &rules_text).unwrap();
    let _ = std::fs::remove_file(&sock);
    let (pid, lines) = start(&mut g, &cfg_path);
    assert!(
        !lines.contains("fast path is off"),
        "the fast path did not load after a crash"
    );
    download(&lan, &url, &dir.path().join("got2"), &want);
    std::thread::sleep(READ);
    let stats = ctl_ok(&sock, &["stats"]);
    assert!(
        xdp(&stats).1 > 5_000,
        "the download after the restart went around XDP:\n{stats}"
    );

    eprintln!("the LAN host stops running XDP: redirects into its veth are lost, so the workers take them over");
    ok(&lan, &["ip", "link", "set", "dev", "eth0", "xdpdrv", "off"]);
    lines.wait_for("ks-lan takes no redirected frames", 0, SAY);
    download(&lan, &url, &dir.path().join("got3"), &want);
    let stats = ctl_ok(&sock, &["stats"]);
    assert!(
        stats.contains("1 ports taking no redirects"),
        "ks-lan not taken out:\n{stats}"
    );

    eprintln!("stop: the program is detached");
    signal(pid, "-TERM");
    let at = g.children.iter().position(|c| c.id() == pid).unwrap();
    let status = g.children.remove(at).wait().expect("wait");
    assert!(status.success(), "keepstate run ended with {status}");
    let links = ok(&fw, &["ip", "link", "show"]);
    assert!(!links.contains("prog/xdp"), "left attached:\n{links}");
    eprintln!("done in {:?}", t0.elapsed());
}

const BRIDGE_RULES: &str = "table inet filter {
\tflowtable ft {
\t\thook ingress priority 0; devices = { lan, wan }; counter
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy drop;
\t\tmeta l4proto { tcp, udp } flow add @ft
\t\tct state vmap { established : accept, related : accept, invalid : drop }
\t\tiifname \"lan\" oifname \"wan\" accept
\t}
}
";

#[test]
fn bridged_flows_are_forwarded_by_xdp_with_their_own_macs() {
    if !can_run("netns_fastpath", &["curl", "python3", "ethtool"]) {
        return;
    }
    let mut g = lab("y", 2, Duration::from_secs(60));
    let (lan, wan) = (g.lab.lan.clone(), g.lab.wan.clone());
    // One subnet across the bridge: the WAN host becomes 192.168.1.20.
    ok(&wan, &["ip", "-4", "addr", "flush", "dev", "eth0"]);
    ok(
        &wan,
        &["ip", "addr", "add", "192.168.1.20/24", "dev", "eth0"],
    );
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("bridge.nft");
    std::fs::write(&rules, BRIDGE_RULES).unwrap();
    let sock = dir.path().join("control.sock");
    let cfg = format!(
        "rules = {:?}\n\n[[port]]\nname = \"lan\"\ninterface = \"ks-lan\"\n\n\
         [[port]]\nname = \"wan\"\ninterface = \"ks-wan\"\n\n\
         [dataplane]\nmode = \"bridge\"\nworkers = 2\ncontrol = {:?}\n",
        rules.display().to_string(),
        sock.display().to_string()
    );
    let cfg_path = dir.path().join("bridge.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let (pid, _lines) = start(&mut g, &cfg_path);

    eprintln!("bridge: {BODY} bytes across");
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let want = body(BODY);
    std::fs::write(www.join("blob"), &want).unwrap();
    http_server(&mut g, &wan, "192.168.1.20", 8000, &www);
    download(
        &lan,
        "http://192.168.1.20:8000/blob",
        &dir.path().join("got"),
        &want,
    );
    std::thread::sleep(READ);
    let ct = ctl_ok(&sock, &["ct", "list"]);
    let tcp = conn(&ct, "tcp", 8000, "no connection of the download");
    assert!(tcp.contains("[OFFLOAD]"), "not offloaded: {tcp}");
    let stats = ctl_ok(&sock, &["stats"]);
    let (entries, packets, _) = xdp(&stats);
    assert_eq!(entries, 2, "both directions of the flow:\n{stats}");
    assert!(
        packets > 5_000 && packets > 20 * worker_rx(&stats),
        "the download went around XDP:\n{stats}"
    );
    signal(pid, "-TERM");
}

/// The fast path's cumulative count of installed flows in `keepstate stats`.
fn installed(stats: &str) -> u64 {
    let line = xdp_line(stats);
    let (_, rest) = line.split_once("; ").expect(line);
    rest.split(' ').next().unwrap().parse().expect(line)
}

/// Datagrams of the paced exchange and the gap between them: longer, together, than the
/// flowtable's timeout (30 s).
const PACED: usize = 72;
const GAP: &str = "0.5";

/// A flow that only XDP forwards outlives the flowtable's timeout: the program's last-seen
/// times reach the gc, which extends the flow, as the kernel's flowtable moves
/// `flow->timeout` on every packet. A datagram and its echo every half second for 36 s:
/// the flow is installed once and stays offloaded (a flow the gc took for idle would be
/// torn down at 30 s and installed again).
#[test]
fn a_flow_only_xdp_forwards_outlives_the_flow_timeout() {
    paced_flow_stays_offloaded("z", true);
}

/// The same with a flowtable without `counter`, whose flows the program does not count:
/// the last-seen times alone keep the flow.
#[test]
fn an_uncounted_flow_only_xdp_forwards_outlives_the_flow_timeout() {
    paced_flow_stays_offloaded("u", false);
}

/// The paced exchange through a lab under `tag`, its flowtable with `counter` or without.
fn paced_flow_stays_offloaded(tag: &str, counter: bool) {
    if !can_run("netns_fastpath", &["python3", "ethtool", "ping"]) {
        return;
    }
    let mut g = lab(tag, 2, Duration::from_secs(120));
    let (lan, wan) = (g.lab.lan.clone(), g.lab.wan.clone());
    let dir = tempfile::tempdir().unwrap();
    let (cfg_path, sock) = flowtable_config(dir.path());
    if !counter {
        let rules = dir.path().join("lab-flowtable.nft");
        let text = std::fs::read_to_string(&rules).unwrap();
        let plain = text.replace("devices = { lan, wan }; counter", "devices = { lan, wan }");
        assert_ne!(plain, text, "no `counter` in the flowtable to take away");
        std::fs::write(&rules, plain).unwrap();
    }
    let pid = start_fast(&mut g, &cfg_path);
    udp_echo_server(&mut g, &wan);
    eprintln!("UDP: {PACED} datagrams echoed, one every {GAP} s");
    let n = PACED.to_string();
    let echoed = ok(
        &lan,
        &["python3", "-c", &udp_client(), INTERNET, "9000", &n, GAP],
    );
    assert_eq!(echoed.trim(), n, "datagrams echoed");
    std::thread::sleep(READ);
    let ct = ctl_ok(&sock, &["ct", "list"]);
    let udp = conn(&ct, "udp", 9000, "no UDP connection");
    eprintln!("  {udp}");
    assert!(udp.contains("[OFFLOAD]"), "not offloaded at the end: {udp}");
    let stats = ctl_ok(&sock, &["stats"]);
    let (entries, packets, _) = xdp(&stats);
    assert_eq!(entries, 2, "the flow's two directions:\n{stats}");
    assert_eq!(
        installed(&stats),
        1,
        "the flow was installed again:\n{stats}"
    );
    assert!(
        stats.contains("IPv4 table at 1024 of "),
        "a table of two entries at its first size:\n{stats}"
    );
    assert!(
        packets >= 2 * PACED as u64 - 4,
        "the exchange went around XDP ({packets} packets):\n{stats}"
    );
    signal(pid, "-TERM");
}

/// Many UDP flows at once, from a socket each (ports from `base` on): `rounds` datagrams
/// on every one, sent 50
/// at a time (within the echo server's socket buffer) before their echoes are read, with
/// `gap` seconds between rounds (optional, default none); prints the echoes that came back.
const MANY_CLIENT: &str = "
import socket, sys, time
host, port, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
base = int(sys.argv[5])
gap = float(sys.argv[6]) if len(sys.argv) > 6 else 0
socks = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(('0.0.0.0', base + i))
    socks.append(s)
got = 0
start = time.monotonic()
for r in range(rounds):
    # Each round on the clock, not after a sleep: a slow VM oversleeps.
    time.sleep(max(0, start + r * gap - time.monotonic()))
    for c in range(0, n, 50):
        for i in range(c, min(c + 50, n)):
            socks[i].sendto(b'%d %d' % (i, r), (host, port))
        for i in range(c, min(c + 50, n)):
            if echoed(socks[i], b'%d %d' % (i, r)):
                got += 1
print(got)
";

/// The IPv4 table grows while XDP forwards from it: 500 UDP flows (1,000 entries: the
/// table of 1,024 grows to 2,048, at the map's end), then 500 more (4,096, back at its
/// start); each time, every flow is installed and, once offloaded, its datagrams go
/// through XDP, the earlier flows' too.
#[test]
fn the_ipv4_table_grows_under_traffic() {
    if !can_run("netns_fastpath", &["python3", "ethtool", "ping"]) {
        return;
    }
    const FLOWS: u64 = 500;
    const ROUNDS: u64 = 6;
    let mut g = lab("g", 2, Duration::from_secs(120));
    let (lan, wan) = (g.lab.lan.clone(), g.lab.wan.clone());
    let dir = tempfile::tempdir().unwrap();
    let (cfg_path, sock) = flowtable_config(dir.path());
    let pid = start_fast(&mut g, &cfg_path);
    udp_echo_server(&mut g, &wan);
    let mut forwarded = 0;
    for (batch, sizes) in [(1, ["2048 ", "4096 "]), (2, ["4096 ", "8192 "])] {
        eprintln!("UDP: {FLOWS} more flows, {ROUNDS} datagrams each");
        let echoed = many_flows(&lan, FLOWS, ROUNDS, 20_000 + 1000 * batch as u16, "0");
        assert_eq!(echoed, FLOWS * ROUNDS, "datagrams echoed");
        std::thread::sleep(READ);
        let stats = ctl_ok(&sock, &["stats"]);
        let line = xdp_line(&stats);
        eprintln!("  {line}");
        let (entries, packets, _) = xdp(&stats);
        assert_eq!(
            entries,
            2 * FLOWS * batch,
            "every flow's two directions:\n{stats}"
        );
        assert!(line.contains(" 0 refused by the map"), "{line}");
        assert!(
            sizes
                .iter()
                .any(|s| line.contains(&format!("IPv4 table at {s}"))),
            "the table's size: {line}"
        );
        // The first datagram and its echo make the connection, the second installs it.
        let want = 2 * FLOWS * (ROUNDS - 2);
        assert!(
            packets - forwarded >= want,
            "{} packets through XDP, not {want}: {line}",
            packets - forwarded
        );
        forwarded = packets;
    }
    signal(pid, "-TERM");
}

/// `rounds` datagrams on each of `flows` UDP flows from the LAN host's ports `base` on to
/// the echo server, `gap` seconds between rounds; the echoes that came back.
fn many_flows(lan: &str, flows: u64, rounds: u64, base: u16, gap: &str) -> u64 {
    let args = [flows.to_string(), rounds.to_string(), base.to_string()];
    let script = format!("{ECHOED}{MANY_CLIENT}");
    let cmd = [
        "python3", "-c", &script, INTERNET, "9000", &args[0], &args[1], &args[2], gap,
    ];
    ok(lan, &cmd).trim().parse().unwrap()
}

/// The "refused by the map" count of the fast path's stats line.
fn refused(line: &str) -> u64 {
    let (before, _) = line.split_once(" refused by the map").expect(line);
    before.rsplit(' ').next().unwrap().parse().expect(line)
}

/// A fast path smaller than the flows (`fastpath_flows = 512`) refuses the flows beyond it,
/// which the workers forward; when room comes back (the first flows idle out, here after
/// `nf_flowtable_udp_timeout = 6` s), the refused flows get in at their next refresh, as the
/// kernel retries a hardware offload, and XDP forwards them from then on. The timeout is long
/// enough that the first flows are still there when the second batch starts, however slowly
/// its client starts (a 2 s timeout let a slow machine's first flows leave before it: 28 to
/// 53 refused, not 88), and the second batch is paced over 12 s so that they leave during
/// it.
#[test]
fn flows_the_full_fast_path_refused_get_in_once_there_is_room() {
    if !can_run("netns_fastpath", &["python3", "ethtool", "ping"]) {
        return;
    }
    const ROOM: u64 = 512;
    // Few enough to leave the table's probes room (800 entries in 2,048 slots).
    const FIRST: u64 = 400;
    const MORE: u64 = 200;
    let mut g = lab("r", 2, Duration::from_secs(120));
    let (lan, wan) = (g.lab.lan.clone(), g.lab.wan.clone());
    let dir = tempfile::tempdir().unwrap();
    let (cfg_path, sock) = flowtable_config(dir.path());
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let small = cfg
        .replace(
            "busy_poll = false\n",
            &format!("busy_poll = false\nfastpath_flows = {ROOM}\n"),
        )
        .replace(
            "max = 65536\n",
            "max = 65536\nnf_flowtable_udp_timeout = 6\n",
        );
    assert_eq!(small.matches("fastpath_flows").count(), 1, "{small}");
    assert_eq!(small.matches("nf_flowtable_udp").count(), 1, "{small}");
    std::fs::write(&cfg_path, small).unwrap();
    let pid = start_fast(&mut g, &cfg_path);
    udp_echo_server(&mut g, &wan);

    eprintln!("UDP: {FIRST} flows in a fast path with room for {ROOM}");
    assert_eq!(many_flows(&lan, FIRST, 3, 23_000, "0"), FIRST * 3);
    let stats = ctl_ok(&sock, &["stats"]);
    let line = xdp_line(&stats).to_string();
    eprintln!("  {line}");
    assert_eq!(xdp(&line).0, 2 * FIRST, "{line}");
    assert_eq!(installed(&line), FIRST, "{line}");
    assert_eq!(refused(&line), 0, "{line}");

    // The second batch paces its datagrams over 12 s: refused at first, installed once the
    // first batch's flows (idle from now on) have left.
    eprintln!("UDP: {MORE} more flows, paced over 12 s, while the first ones idle out");
    assert_eq!(many_flows(&lan, MORE, 17, 24_000, "0.75"), MORE * 17);
    std::thread::sleep(READ);
    let stats = ctl_ok(&sock, &["stats"]);
    let line = xdp_line(&stats).to_string();
    eprintln!("  {line}");
    let (entries, packets, _) = xdp(&line);
    assert!(
        refused(&line) >= FIRST + MORE - ROOM,
        "the later flows beyond the room were refused: {line}"
    );
    assert_eq!(
        installed(&line),
        FIRST + MORE,
        "every later flow got in: {line}"
    );
    assert_eq!(entries, 2 * MORE, "only the later flows are left: {line}");
    // The first batch's 2 x 2 datagrams a flow after its install, and at least the later
    // flows' last 3 s (4 rounds) since theirs.
    let want = 2 * FIRST * 2 + 2 * MORE * 4;
    assert!(
        packets >= want,
        "{packets} packets through XDP, not {want}: {line}"
    );
    signal(pid, "-TERM");
}
