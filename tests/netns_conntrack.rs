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
    pub mod netns;
}

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::netns::{
    can_run, config, engine_counters, finish, frames, merge, multiset, nft_counters, normalise,
    packet_id, replay, run, say, wait_for, Lab, CLIENT, SERVER,
};
use keepstate::replay::CaptureReader;

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
    say("peer-ready");
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
    say("mid-open");
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

#[test]
fn kernel_and_replay_agree() {
    if !can_run("netns_conntrack") {
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let rules_file = dir.path().join("router.nft");
    std::fs::write(&rules_file, RULES).unwrap();
    let mut lab = Lab::new("ksct", Duration::from_secs(90));
    let r = lab.r.clone();
    lab.sh(&r, &format!("nft -f {}", rules_file.display()));
    // Accounting on for packets= bytes=; on after the ruleset so conntrack is loaded.
    lab.sh(&r, "sysctl -qw net.netfilter.nf_conntrack_acct=1");

    let (c, s) = (lab.c.clone(), lab.s.clone());
    lab.start_captures(dir.path());
    let cap = |iface: &str, d: &str| Lab::capture_file(dir.path(), iface, d);

    eprintln!("netns_conntrack: lab up, captures running");
    let mut server = lab.peer(&s, "server");
    assert!(
        wait_for(&mut server, "peer-ready"),
        "the server never got ready"
    );
    eprintln!("netns_conntrack: server ready");
    finish(lab.peer(&c, "client"), "client");
    eprintln!("netns_conntrack: client done");
    // D: delete its entry in a quiet moment, and remember when, to do the same in the replay.
    let mut mid = lab.peer(&c, "mid");
    assert!(
        wait_for(&mut mid, "mid-open"),
        "the mid-stream client never opened"
    );
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
    let lan_in = frames(&cap("lan", "in"));
    let wan_in = frames(&cap("wan", "in"));
    eprintln!(
        "netns_conntrack: captured {} frames on lan, {} on wan ({} bytes)",
        lan_in.len(),
        wan_in.len(),
        std::fs::metadata(cap("lan", "in")).map_or(0, |m| m.len())
    );
    let merged = merge(&lan_in, &wan_in);
    std::fs::write(dir.path().join("ingress.pcapng"), &merged).unwrap();
    let mut replay = replay(&rules_file, &config(&rules_file, ""), true);
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
    let ours_counters = engine_counters(replay.engine());
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
    let egress = frames(&cap("lan", "out"))
        .into_iter()
        .chain(frames(&cap("wan", "out")))
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
