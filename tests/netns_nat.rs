//! Differential test of keepstate's NAT against the Linux kernel's. Needs root, `nft`,
//! `conntrack`, `tcpdump`, `ping` and `ethtool` (scripts/setup.sh installs them); skipped
//! with a message otherwise.
//!
//! The lab of `netns_conntrack` (tests/common/netns.rs): a router namespace whose `lan`
//! faces a client namespace and whose `wan` faces a server namespace, with a default route
//! to the server and the ruleset [`RULES`] loaded with `nft -f`. Real traffic crosses it,
//! each scenario its own connections, the answering side always std sockets:
//!
//! 1. **masquerade** (`oifname "wan" masquerade`): a TCP connection with data both ways and
//!    a FIN teardown, a UDP request/response, a UDP datagram answered by an ICMP port
//!    unreachable (RELATED; its quoted packet is translated too) and a ping, from the client
//!    to the server;
//! 2. **snat to an address range** (`snat ip to 10.77.8.1-10.77.11.254` for traffic to a
//!    second server address; the server's default route brings the answers back to the
//!    router): UDP from three client addresses, TCP and a ping. The kernel picks the address
//!    by a jhash of the source and destination addresses, which keepstate copies
//!    (src/conntrack/nat.rs), so each flow must get the same address: with 1,020 addresses
//!    in the range, three different (source, destination) pairs agreeing by chance would be
//!    a one in 10^9 event;
//! 3. **dnat with a port** (a port forward, `dnat ip to 10.77.1.2:80`): from the server's
//!    side to the router's WAN address on 8080, answered by a listener on port 80 in the
//!    client namespace;
//! 4. **redirect** (`tcp dport 80 redirect to :3128` on `lan`): the client connects to the
//!    server's port 80 and a listener in the router namespace on 3128 answers. keepstate
//!    delivers the first packet locally but never sees the router's own answers (they are
//!    not router ingress), so its entry stays `SYN_SENT [UNREPLIED]` and the client's later
//!    packets are `ct invalid` to it: of that entry only the tuples are compared (the
//!    translation), and the counter hits of those later packets are taken out of keepstate's
//!    counters (see [`REDIRECT_NOTE`]);
//! 5. **a port clash that forces reallocation**: two client addresses send UDP from the same
//!    source port 45000 to the same server port through masquerade. The first keeps 45000;
//!    the second clashes and both the kernel and keepstate move it to another port of the
//!    same class (1024-65535), chosen at random. The test checks both did, and then treats
//!    the two choices as one: the server's answers to the kernel's port are replayed to
//!    keepstate's (UDP checksum updated), and the port is normalised when comparing.
//!
//! Compared (the router's ingress on both interfaces, captured with tcpdump and merged into a
//! pcapng, replayed through keepstate with the equivalent configuration):
//!
//! * `conntrack -L` (with accounting) line by line: tuples including the translated reply
//!   tuple, states, flags, counters; normalised only in the timeout, `use=`, and the
//!   reallocated port;
//! * the nft rule counters (nat rules count first packets, filter rules the verdicts);
//! * the frames the kernel forwarded on each egress (tcpdump) against the frames keepstate
//!   forwards out of that port (`Outcome::frame`, as `keepstate replay --out` writes it):
//!   addresses, ports, TTL, IP id and length, TCP sequence numbers and flags, ICMP ids, the
//!   bytes (checksum fields aside), and that every checksum verifies when recomputed from
//!   scratch. Host veths have checksum offload off, so the wire carries final checksums.

mod common {
    pub mod capture;
    pub mod netns;
}

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::netns::{
    can_run, checksums, config, engine_counters, finish, frame_key, frames, ip_of, merge, multiset,
    multiset_diff, nft_counters, normalise, packet_id, replay, run, say, wait_for, Lab, CLIENT,
    ROUTER_LAN, ROUTER_WAN, SERVER,
};
use keepstate::engine::Verdict;
use keepstate::replay::CaptureReader;

/// A second client address and a third (the clash, the address range).
const CLIENT2: &str = "10.77.1.3";
const CLIENT3: &str = "10.77.1.4";
/// A second server address: traffic to it is source-NATed to [`RANGE`].
const SERVER2: &str = "10.77.2.3";
const RANGE: (&str, &str) = ("10.77.8.1", "10.77.11.254");
/// The clash: both clients send from this port to [`CLASH_TO`] on the server.
const CLASH_PORT: u16 = 45000;
const CLASH_TO: u16 = 5300;
/// Where the second client of the clash sends next, from the same socket, in
/// [`same_source_keeps_its_mapping`] (the masquerade's UDP server; it answers only once).
const AGAIN_TO: u16 = 5000;

/// The ruleset both the kernel and keepstate run. Every rule counts.
const RULES: &str = r#"flush ruleset
table inet nat {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		iifname "wan" tcp dport 8080 counter dnat ip to 10.77.1.2:80
		iifname "lan" tcp dport 80 counter redirect to :3128
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "wan" ip daddr 10.77.2.3 counter snat ip to 10.77.8.1-10.77.11.254
		oifname "wan" counter masquerade
	}
}
table inet filter {
	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state established,related counter accept
		ct state invalid counter drop
		iifname "lan" oifname "wan" ct state new counter accept
		iifname "wan" oifname "lan" ct status dnat ct state new counter accept
		counter
	}
}
"#;

/// keepstate's equivalent of the router's `ip route add default via SERVER`.
const ROUTE: &str = r#"
[[route]]
to = "default"
via = "10.77.2.2"
"#;

const REDIRECT_NOTE: &str = "keepstate sees the redirected connection's first packet and \
    delivers it locally, but the router's own answers are output, not ingress, so they are \
    not in the capture: its entry stays SYN_SENT [UNREPLIED] and the client's later packets \
    are ct invalid to it (an ACK in SYN_SENT), left untranslated and dropped by the forward \
    chain's invalid rule. The kernel saw the answers. So only the entry's tuples are compared, \
    and those packets' counter hits are taken out of keepstate's counters.";

// The traffic, from inside the namespaces.

/// Not a test: the traffic generator, run by `kernel_and_keepstate_nat_agree` inside a
/// namespace (`KS_PEER_ROLE=server|lanserver|proxy|client|outside`). Without that variable
/// it does nothing.
#[test]
#[ignore = "helper: run inside a namespace by kernel_and_keepstate_nat_agree"]
fn peer() {
    match std::env::var("KS_PEER_ROLE").as_deref() {
        Ok("server") => server(),
        Ok("lanserver") => lan_server(),
        Ok("proxy") => proxy(),
        Ok("client") => client(false),
        Ok("client-again") => client(true),
        Ok("outside") => outside(),
        _ => {}
    }
}

const WAIT: Option<Duration> = Some(Duration::from_secs(5));

/// Accepts one connection: reads `n` bytes, answers `m`, reads until the peer closes.
fn answer_one(l: &TcpListener, n: usize, m: usize) {
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(WAIT).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    s.write_all(&vec![b'a'; m]).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
}

/// Connects, sends `n` bytes, reads `m`, closes first (FIN) and reads until the peer closes.
fn ask_one(to: (&str, u16), n: usize, m: usize) {
    let mut s = TcpStream::connect(to).unwrap();
    s.set_read_timeout(WAIT).unwrap();
    s.write_all(&vec![b'q'; n]).unwrap();
    let mut buf = vec![0u8; m];
    s.read_exact(&mut buf).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
}

/// Answers `count` datagrams on `u`, each with its payload twice.
fn echo_udp(u: &UdpSocket, count: usize) {
    u.set_read_timeout(WAIT).unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..count {
        let (n, from) = u.recv_from(&mut buf).unwrap();
        u.send_to(&buf[..n].repeat(2), from).unwrap();
    }
}

/// Sends one datagram from `from` (port 0: any) to `to` and waits for the answer.
fn ask_udp(from: (&str, u16), to: (&str, u16)) -> UdpSocket {
    let u = UdpSocket::bind(from).unwrap();
    u.set_read_timeout(WAIT).unwrap();
    u.send_to(b"query", to).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = u.recv_from(&mut buf).unwrap();
    assert_eq!(n, 10);
    u
}

/// The server namespace: the masquerade, clash and address-range scenarios' servers, in the
/// order the client uses them.
fn server() {
    let masq = TcpListener::bind((SERVER, 8001)).unwrap();
    let masq_udp = UdpSocket::bind((SERVER, 5000)).unwrap();
    let clash = UdpSocket::bind((SERVER, CLASH_TO)).unwrap();
    let range_udp = UdpSocket::bind((SERVER2, 9100)).unwrap();
    let range_tcp = TcpListener::bind((SERVER2, 9101)).unwrap();
    say("peer-ready");
    answer_one(&masq, 100, 200);
    echo_udp(&masq_udp, 1);
    echo_udp(&clash, 2);
    echo_udp(&range_udp, 3);
    answer_one(&range_tcp, 10, 20);
}

/// The client namespace's side of the port forward: the LAN server on port 80.
fn lan_server() {
    let l = TcpListener::bind((CLIENT, 80)).unwrap();
    say("peer-ready");
    answer_one(&l, 30, 60);
}

/// The router namespace: what `redirect to :3128` reaches.
fn proxy() {
    let l = TcpListener::bind((ROUTER_LAN, 3128)).unwrap();
    say("peer-ready");
    answer_one(&l, 40, 80);
}

/// `again`: the clash's second client then sends from the same socket to [`AGAIN_TO`].
fn client(again: bool) {
    let pause = || std::thread::sleep(Duration::from_millis(30));
    // 1. masquerade: TCP, then UDP (the ping comes from the test itself).
    ask_one((SERVER, 8001), 100, 200);
    pause();
    ask_udp((CLIENT, 5001), (SERVER, 5000));
    pause();
    // Nothing listens on UDP 5002: the server's ICMP port unreachable, RELATED to the
    // masqueraded flow, comes back with its outer and quoted headers translated.
    let r = UdpSocket::bind((CLIENT, 5004)).unwrap();
    r.set_read_timeout(WAIT).unwrap();
    r.connect((SERVER, 5002)).unwrap();
    r.send(b"anyone?").unwrap();
    let err = r.recv(&mut [0u8; 16]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    pause();
    // 5. the clash: the first keeps its port and stays, the second must move.
    let first = ask_udp((CLIENT, CLASH_PORT), (SERVER, CLASH_TO));
    pause();
    let second = ask_udp((CLIENT2, CLASH_PORT), (SERVER, CLASH_TO));
    if again {
        second.send_to(b"again", (SERVER, AGAIN_TO)).unwrap();
    }
    drop((first, second));
    pause();
    // 2. snat to a range: three source addresses, then TCP.
    for a in [CLIENT, CLIENT2, CLIENT3] {
        ask_udp((a, 0), (SERVER2, 9100));
        pause();
    }
    ask_one((SERVER2, 9101), 10, 20);
    pause();
    // 4. redirect: port 80 of the server is the router's 3128.
    ask_one((SERVER, 80), 40, 80);
}

/// 3. From the server's side: the port forward.
fn outside() {
    ask_one((ROUTER_WAN, 8080), 30, 60);
}

// Reading the results.

/// The UDP ports of a frame, if it is UDP.
fn udp_ports(frame: &[u8]) -> Option<(u16, u16)> {
    let (ip, l4) = ip_of(frame)?;
    if ip[9] != 17 {
        return None;
    }
    let p = |i: usize| u16::from_be_bytes([ip[l4 + i], ip[l4 + i + 1]]);
    Some((p(0), p(2)))
}

/// Sets a UDP port (at `at`: 0 source, 2 destination) and updates the checksum (RFC 1624).
fn set_udp_port(frame: &mut [u8], at: usize, port: u16) {
    let l4 = 14 + usize::from(frame[14] & 0x0f) * 4;
    let old = u16::from_be_bytes([frame[l4 + at], frame[l4 + at + 1]]);
    frame[l4 + at..l4 + at + 2].copy_from_slice(&port.to_be_bytes());
    let c = u16::from_be_bytes([frame[l4 + 6], frame[l4 + 7]]);
    if c != 0 {
        let mut s = u32::from(!c) + u32::from(!old) + u32::from(port);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        let c = match !(s as u16) {
            0 => 0xffff,
            c => c,
        };
        frame[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
    }
}

/// [`frame_key`] with `realloc`, the port the clash moved to, read as 0.
fn clash_key(frame: &[u8], realloc: u16) -> Option<String> {
    let (_, l4) = ip_of(frame)?;
    frame_key(frame, |f| match udp_ports(f) {
        Some((s, CLASH_TO | AGAIN_TO)) if s == realloc => f[14 + l4..14 + l4 + 2].fill(0),
        Some((CLASH_TO | AGAIN_TO, d)) if d == realloc => f[14 + l4 + 2..14 + l4 + 4].fill(0),
        _ => {}
    })
}

/// The words of a `conntrack -L` line that make its two tuples.
fn tuples(line: &str) -> String {
    line.split_whitespace()
        .enumerate()
        .filter(|(i, w)| {
            *i < 2
                || ["src=", "dst=", "sport=", "dport="]
                    .iter()
                    .any(|p| w.starts_with(p))
        })
        .map(|(_, w)| w)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A `conntrack -L` line as compared: [`normalise`]d, the reallocated port read as
/// `REALLOC`, and the redirected connection's entry reduced to its [`tuples`].
fn comparable(line: &str, realloc: u16) -> String {
    let line = normalise(line);
    if line.contains("sport=3128") {
        return format!("{} (tuples only)", tuples(&line));
    }
    if field(&line, "src", 0) != CLIENT2 || field(&line, "sport", 0) != CLASH_PORT.to_string() {
        return line;
    }
    line.split_whitespace()
        .map(|w| {
            if w == format!("dport={realloc}") {
                "dport=REALLOC".to_string()
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The value of `key=` in the `n`th tuple (0 original, 1 reply) of a conntrack line.
fn field<'a>(line: &'a str, key: &str, n: usize) -> &'a str {
    line.split_whitespace()
        .filter_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .nth(n)
        .unwrap_or("?")
}

/// The UDP port the clash moved the second client to, read from the `conntrack -L` lines:
/// both entries of the clash must be there, the first keeping its port, the second on
/// another port of the same class (1024-65535).
fn reallocated(lines: &[String], who: &str) -> Result<u16, String> {
    let clash: Vec<&String> = lines
        .iter()
        .filter(|l| {
            l.starts_with("udp")
                && field(l, "sport", 0) == CLASH_PORT.to_string()
                && field(l, "dport", 0) == CLASH_TO.to_string()
        })
        .collect();
    let by = |src: &str| {
        clash
            .iter()
            .find(|l| field(l, "src", 0) == src)
            .ok_or(format!("{who}: no clash entry from {src}: {clash:?}"))
    };
    let (a, b) = (by(CLIENT)?, by(CLIENT2)?);
    if field(a, "dport", 1) != CLASH_PORT.to_string() || field(a, "dst", 1) != ROUTER_WAN {
        return Err(format!("{who}: the first of the clash moved: {a}"));
    }
    let p: u16 = field(b, "dport", 1)
        .parse()
        .map_err(|_| format!("{who}: {b}"))?;
    if p == CLASH_PORT || p < 1024 || field(b, "dst", 1) != ROUTER_WAN {
        return Err(format!(
            "{who}: the second of the clash was not moved within 1024-65535: {b}"
        ));
    }
    Ok(p)
}

/// All five scenarios, and then the clash's second client sends again from the same socket to
/// another server port: the kernel gives it the mapping that source already has
/// (`find_appropriate_src`, the bysource hash), and keepstate must too.
#[test]
fn kernel_and_keepstate_nat_agree() {
    if can_run("netns_nat") {
        differential("client-again");
    }
}

/// The lab, the traffic (the client namespace's part as `client_role`), the replay, and
/// every comparison.
fn differential(client_role: &str) {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let rules_file = dir.path().join("router.nft");
    std::fs::write(&rules_file, RULES).unwrap();
    let mut lab = Lab::new("ksnat", Duration::from_secs(90));
    let (c, r, s) = (lab.c.clone(), lab.r.clone(), lab.s.clone());
    lab.sh(&c, &format!("ip addr add {CLIENT2}/24 dev eth0"));
    lab.sh(&c, &format!("ip addr add {CLIENT3}/24 dev eth0"));
    // The server answers the range's addresses by its default route, via the router.
    lab.sh(&s, &format!("ip addr add {SERVER2}/24 dev eth0"));
    lab.sh(&r, &format!("ip route add default via {SERVER}"));
    lab.sh(&r, &format!("nft -f {}", rules_file.display()));
    // Accounting on for packets= bytes=; on after the ruleset so conntrack is loaded.
    lab.sh(&r, "sysctl -qw net.netfilter.nf_conntrack_acct=1");
    lab.start_captures(dir.path());
    let cap = |iface: &str, d: &str| Lab::capture_file(dir.path(), iface, d);

    eprintln!("netns_nat: lab up, captures running");
    let mut servers = Vec::new();
    for (ns, role) in [(&s, "server"), (&c, "lanserver"), (&r, "proxy")] {
        let mut p = lab.peer(ns, role);
        assert!(wait_for(&mut p, "peer-ready"), "{role} never got ready");
        servers.push((p, role));
    }
    finish(lab.peer(&c, client_role), client_role);
    lab.sh(&c, &format!("ping -c 1 -W 2 {SERVER}"));
    lab.sh(&c, &format!("ping -c 1 -W 2 {SERVER2}"));
    finish(lab.peer(&s, "outside"), "outside");
    for (p, role) in servers {
        finish(p, role);
    }
    std::thread::sleep(Duration::from_millis(100));
    eprintln!("netns_nat: traffic done");
    let kernel_ct = run(&["ip", "netns", "exec", &r, "conntrack", "-L"]).unwrap();
    let kernel_nft = lab.sh(&r, "nft list ruleset");
    lab.stop_captures();
    let kernel_lines: Vec<String> = kernel_ct.lines().map(str::to_string).collect();
    let kernel_port =
        reallocated(&kernel_lines, "kernel").unwrap_or_else(|e| panic!("{e}\n{kernel_ct}"));

    // keepstate replays the router's ingress.
    let lan_in = frames(&cap("lan", "in"));
    let wan_in = frames(&cap("wan", "in"));
    eprintln!(
        "netns_nat: captured {} frames on lan, {} on wan",
        lan_in.len(),
        wan_in.len()
    );
    let merged = merge(&lan_in, &wan_in);
    std::fs::write(dir.path().join("ingress.pcapng"), &merged).unwrap();
    let mut replay = replay(&rules_file, &config(&rules_file, ROUTE), true, false);
    let lan = replay.engine().port_index("lan").unwrap();
    let wan = replay.engine().port_index("wan").unwrap();
    let mut reader = CaptureReader::new(std::io::Cursor::new(merged)).unwrap();
    let mut trace = Vec::new();
    let mut forwarded: BTreeMap<usize, Vec<Vec<u8>>> = BTreeMap::new();
    let mut local = Vec::new();
    // keepstate's choice for the clash, from the frame that leaves.
    let mut our_port: Option<u16> = None;
    // Counter hits of the redirected connection's packets after its SYN (REDIRECT_NOTE).
    let mut redirect_hits = vec![(0u64, 0u64); nft_counters(&kernel_nft).len()];
    while let Some(f) = reader.next_frame() {
        let mut f = f.unwrap();
        // The server answers the kernel's port: replay that answer to keepstate's.
        if f.interface.as_deref() == Some("wan") {
            if let (Some((CLASH_TO | AGAIN_TO, d)), Some(p)) = (udp_ports(&f.data), our_port) {
                if d == kernel_port {
                    set_udp_port(&mut f.data, 2, p);
                }
            }
        }
        let redirected_later = f.interface.as_deref() == Some("lan")
            && packet_id(&f.data).is_some_and(|id| {
                id.starts_with(&format!("{CLIENT} > {SERVER} "))
                    && id.contains(">80 ")
                    && id.contains(" syn0 ")
            });
        let before = engine_counters(replay.engine());
        let step = replay.frame(&f);
        if redirected_later {
            let after = engine_counters(replay.engine());
            for (i, (a, b)) in after.iter().zip(&before).enumerate() {
                redirect_hits[i].0 += a.0 - b.0;
                redirect_hits[i].1 += a.1 - b.1;
            }
        }
        trace.extend(step.lines);
        let Some(out) = step.outcome else { continue };
        if let Some(port) = step.leaves {
            if let Some((sp, CLASH_TO)) = udp_ports(&out.frame) {
                if sp != CLASH_PORT && port == wan {
                    our_port = Some(sp);
                }
            }
            forwarded.entry(port).or_default().push(out.frame);
        } else if out.verdict == Verdict::Local {
            local.push(out.frame);
        }
    }
    let mut ours_counters = engine_counters(replay.engine());
    let report = replay.finish();
    let context = format!(
        "--- keepstate trace\n{}\n--- kernel conntrack -L\n{kernel_ct}--- keepstate\n{}\n--- nft\n{kernel_nft}",
        trace.join("\n"),
        report.listing.join("\n")
    );
    let our_port =
        reallocated(&report.listing, "keepstate").unwrap_or_else(|e| panic!("{e}\n{context}"));
    eprintln!("netns_nat: the clash moved the second client to port {kernel_port} in the kernel, {our_port} in keepstate");

    // 1. The connection tables.
    let mut theirs: Vec<String> = kernel_lines
        .iter()
        .map(|l| comparable(l, kernel_port))
        .collect();
    let mut ours: Vec<String> = report
        .listing
        .iter()
        .map(|l| comparable(l, our_port))
        .collect();
    theirs.sort();
    ours.sort();
    for l in &theirs {
        eprintln!("netns_nat: kernel: {l}");
    }
    // The address range: the same address for each (source, destination), by the jhash.
    let picks = |v: &[String]| -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = v
            .iter()
            .filter(|l| field(l, "dst", 0) == SERVER2)
            .map(|l| {
                (
                    format!("{} {}", &l[..4], field(l, "src", 0)),
                    field(l, "dst", 1).to_string(),
                )
            })
            .collect();
        p.sort();
        p
    };
    let (kp, op) = (picks(&theirs), picks(&ours));
    assert_eq!(
        kp.len(),
        5,
        "UDP from three addresses, TCP and ping to {SERVER2}\n{context}"
    );
    let lo: std::net::Ipv4Addr = RANGE.0.parse().unwrap();
    let hi: std::net::Ipv4Addr = RANGE.1.parse().unwrap();
    for (_, a) in &kp {
        let a: std::net::Ipv4Addr = a.parse().unwrap();
        assert!(lo <= a && a <= hi, "{a} is outside the range\n{context}");
    }
    assert_eq!(
        kp, op,
        "snat to a range: the kernel's addresses, then keepstate's\n{context}"
    );
    assert!(
        theirs
            .iter()
            .any(|l| l.contains(&format!("dst={ROUTER_WAN} sport="))
                && l.contains("dport=8080 packets=")
                && l.contains(&format!("src={CLIENT} dst={SERVER} sport=80 "))),
        "the port forward's entry\n{context}"
    );
    assert!(
        theirs
            .iter()
            .any(|l| l.contains(&format!("src={ROUTER_LAN} dst={CLIENT} sport=3128 "))),
        "the redirect's entry\n{context}"
    );
    assert!(
        theirs == ours,
        "conntrack -L differs (- the kernel only, + keepstate only):\n{}{context}",
        multiset_diff(
            &multiset(theirs.iter().cloned()),
            &multiset(ours.iter().cloned())
        )
    );

    for (who, lines) in [("kernel", &kernel_lines), ("keepstate", &report.listing)] {
        for l in lines.iter().filter(|l| l.contains("sport=3128")) {
            eprintln!("netns_nat: the redirect in {who}: {l}");
        }
    }

    // 2. The counters: nat rules count first packets, filter rules the verdicts.
    let kernel_counters = nft_counters(&kernel_nft);
    eprintln!("netns_nat: {REDIRECT_NOTE}\nnetns_nat: taken out of keepstate's counters: {redirect_hits:?}");
    let invalid = kernel_nft
        .lines()
        .filter(|l| l.contains("counter"))
        .position(|l| l.contains("ct state invalid"))
        .unwrap();
    assert!(
        redirect_hits
            .iter()
            .enumerate()
            .all(|(i, h)| (i == invalid) == (h.0 > 0)),
        "the redirected connection's later packets must all be keepstate's ct invalid drops: \
         {redirect_hits:?}\n{context}"
    );
    for (o, h) in ours_counters.iter_mut().zip(&redirect_hits) {
        o.0 -= h.0;
        o.1 -= h.1;
    }
    assert_eq!(
        kernel_counters, ours_counters,
        "rule counters (dnat, redirect, snat range, masquerade; established/related, invalid, \
         new lan->wan, new dnat wan->lan, policy) differ\n{context}"
    );

    // 3. Frame by frame, per egress port: what the kernel forwarded is what keepstate forwards.
    let mut own = 0;
    for (name, port) in [("lan", lan), ("wan", wan)] {
        let theirs = frames(&cap(name, "out"))
            .into_iter()
            .filter(|f| {
                // The router's own answers on the redirected connection are not forwarded.
                let id = packet_id(&f.data).unwrap_or_default();
                let mine =
                    id.starts_with(&format!("{SERVER} > {CLIENT} ")) && id.contains(" tcp 80>");
                own += usize::from(mine);
                !mine
            })
            .filter_map(|f| clash_key(&f.data, kernel_port));
        let ours = forwarded
            .get(&port)
            .into_iter()
            .flatten()
            .filter_map(|f| clash_key(f, our_port));
        let (theirs, ours) = (multiset(theirs), multiset(ours));
        assert!(
            theirs.keys().all(|k| k.contains("checksums-ok")),
            "the kernel's frames must verify (checksum offload off?)\n{theirs:#?}"
        );
        assert!(
            theirs == ours,
            "frames forwarded out of {name} differ (- the kernel only, + keepstate only):\n{}{context}",
            multiset_diff(&theirs, &ours)
        );
        eprintln!(
            "netns_nat: {} frames out of {name} agree",
            theirs.values().sum::<usize>()
        );
    }
    assert!(
        own > 0,
        "the redirect's answers were seen on lan\n{context}"
    );
    // What keepstate delivers locally: the redirected connection, translated to the proxy.
    assert!(!local.is_empty(), "{context}");
    for f in &local {
        let id = packet_id(f).unwrap();
        let (ip, _) = ip_of(f).unwrap();
        assert!(
            id.starts_with(&format!("{CLIENT} > {ROUTER_LAN} ")) && id.contains(">3128 "),
            "{id}\n{context}"
        );
        assert_eq!(checksums(ip), "checksums-ok", "{id}");
    }
    let took = started.elapsed();
    eprintln!("netns_nat: took {took:?}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
}
