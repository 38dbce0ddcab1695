//! `keepstate replay` on captures the test writes itself (etherparse frames, pcap-file
//! files): a TCP handshake, data and teardown, UDP, ICMP echo and a blocked connection
//! through examples/home-router.nft; the library loop, then the command as a user runs it.

mod common {
    pub mod capture;
}

use std::io::Cursor;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::capture::{echo, pcap, pcapng, tcp, udp, Cap};
use keepstate::config::Config;
use keepstate::engine::{DropReason, Engine, Verdict};
use keepstate::packet::{checksum, parse_ethernet, Frame};
use keepstate::replay::{CaptureReader, Ingress, Replay, ReplayOpts};
use keepstate::rules;

const CLIENT: [u8; 4] = [192, 168, 1, 10];
const SERVER: [u8; 4] = [203, 0, 113, 7];
const DNS: [u8; 4] = [203, 0, 113, 53];
const OUTSIDER: [u8; 4] = [203, 0, 113, 9];
/// The router's WAN address: the home router masquerades, so answers come back to it.
const BOX_WAN: [u8; 4] = [198, 51, 100, 1];

/// 2023-11-14 22:13:20 UTC, so capture times look real.
const T0: u64 = 1_700_000_000_000_000_000;

fn ms(n: u64) -> u64 {
    T0 + n * 1_000_000
}

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn config_text() -> String {
    format!(
        r#"
rules = "{}"

[[port]]
name = "lan"
addresses = ["192.168.1.1/24"]

[[port]]
name = "wan"
addresses = ["198.51.100.1/24"]

[[route]]
to = "default"
via = "198.51.100.254"
"#,
        manifest().join("examples/home-router.nft").display()
    )
}

/// The line number of the first line of home-router.nft containing `needle`.
fn line_of(needle: &str) -> usize {
    let text = std::fs::read_to_string(manifest().join("examples/home-router.nft")).unwrap();
    text.lines().position(|l| l.contains(needle)).expect(needle) + 1
}

/// The capture: TCP with data and a FIN teardown both ways, a UDP query and answer, a ping,
/// and a connection from outside that the forward chain drops. The answers arrive at the
/// router's WAN address (masquerade) and leave towards the client translated back.
fn session() -> Vec<Cap> {
    session_to(BOX_WAN)
}

/// The same session with the answers addressed to `to` (the client itself, for a router
/// without NAT).
fn session_to(to: [u8; 4]) -> Vec<Cap> {
    let c = |ns, iface, data| Cap { ns, iface, data };
    vec![
        c(
            ms(0),
            "lan",
            tcp("lan", CLIENT, SERVER, 40000, 443, "S", 1000, 0, b""),
        ),
        c(
            ms(10),
            "wan",
            tcp("wan", SERVER, to, 443, 40000, "SA", 5000, 1001, b""),
        ),
        c(
            ms(11),
            "lan",
            tcp("lan", CLIENT, SERVER, 40000, 443, "A", 1001, 5001, b""),
        ),
        c(
            ms(12),
            "lan",
            tcp(
                "lan",
                CLIENT,
                SERVER,
                40000,
                443,
                "PA",
                1001,
                5001,
                &[b'x'; 100],
            ),
        ),
        c(
            ms(22),
            "wan",
            tcp("wan", SERVER, to, 443, 40000, "A", 5001, 1101, b""),
        ),
        c(
            ms(30),
            "lan",
            tcp("lan", CLIENT, SERVER, 40000, 443, "FA", 1101, 5001, b""),
        ),
        c(
            ms(40),
            "wan",
            tcp("wan", SERVER, to, 443, 40000, "FA", 5001, 1102, b""),
        ),
        c(
            ms(41),
            "lan",
            tcp("lan", CLIENT, SERVER, 40000, 443, "A", 1102, 5002, b""),
        ),
        c(ms(50), "lan", udp("lan", CLIENT, DNS, 5353, 53, b"query")),
        c(ms(60), "wan", udp("wan", DNS, to, 53, 5353, b"answer")),
        c(ms(70), "lan", echo("lan", CLIENT, SERVER, 7, 1, false)),
        c(ms(80), "wan", echo("wan", SERVER, to, 7, 1, true)),
        c(
            ms(90),
            "wan",
            tcp("wan", OUTSIDER, CLIENT, 5555, 22, "S", 77, 0, b""),
        ),
    ]
}

fn router_replay(opts: ReplayOpts) -> Replay {
    let cfg = Config::parse(&config_text(), Path::new("ks.toml")).unwrap();
    let rules = rules::load_file(cfg.rules.as_ref().unwrap()).unwrap();
    let engine = Engine::from_config(&cfg, &rules).unwrap();
    Replay::new(engine, Some(cfg), Ingress::Auto, opts)
}

fn run(replay: &mut Replay, bytes: Vec<u8>) -> Vec<String> {
    let mut r = CaptureReader::new(Cursor::new(bytes)).unwrap();
    let mut lines = Vec::new();
    while let Some(f) = r.next_frame() {
        lines.extend(replay.frame(&f.unwrap()).lines);
    }
    lines
}

const TCP_LINE: &str = "tcp      6 119 TIME_WAIT src=192.168.1.10 dst=203.0.113.7 sport=40000 dport=443 src=203.0.113.7 dst=198.51.100.1 sport=443 dport=40000 [ASSURED] mark=0 use=1";
const UDP_LINE: &str = "udp      17 29 src=192.168.1.10 dst=203.0.113.53 sport=5353 dport=53 src=203.0.113.53 dst=198.51.100.1 sport=53 dport=5353 mark=0 use=1";
const ICMP_LINE: &str = "icmp     1 29 src=192.168.1.10 dst=203.0.113.7 type=8 code=0 id=7 src=203.0.113.7 dst=198.51.100.1 type=0 code=0 id=7 mark=0 use=1";

#[test]
fn pcapng_session_through_the_home_router_lists_like_conntrack() {
    let mut replay = router_replay(ReplayOpts {
        events: true,
        ..Default::default()
    });
    let events = run(&mut replay, pcapng(&session()));
    let report = replay.finish();
    assert_eq!(report.listing, vec![TCP_LINE, UDP_LINE, ICMP_LINE]);
    assert_eq!(
        report.list_summary,
        "conntrack v1.4.8 (conntrack-tools): 3 flow entries have been shown."
    );
    let c = report.counts;
    assert_eq!((c.frames, c.forwarded, c.dropped_by_rules), (13, 12, 1));
    assert_eq!(
        c.summary(),
        "13 frames: 12 forwarded, 0 local, 1 dropped by rules, 0 rejected"
    );
    // conntrack -E, as the kernel reports a TCP lifetime.
    let tcp_events: Vec<&str> = events
        .iter()
        .filter(|l| l.contains("tcp "))
        .map(|l| l.split(" src=").next().unwrap())
        .collect();
    assert_eq!(
        tcp_events,
        vec![
            "    [NEW] tcp      6 120 SYN_SENT",
            " [UPDATE] tcp      6 60 SYN_RECV",
            " [UPDATE] tcp      6 432000 ESTABLISHED",
            " [UPDATE] tcp      6 120 FIN_WAIT",
            " [UPDATE] tcp      6 30 LAST_ACK",
            " [UPDATE] tcp      6 120 TIME_WAIT",
        ],
        "{events:#?}"
    );
    assert!(
        events[0].ends_with("[UNREPLIED] src=203.0.113.7 dst=198.51.100.1 sport=443 dport=40000"),
        "{}",
        events[0]
    );
    assert!(events
        .iter()
        .any(|l| l.starts_with("    [NEW] udp      17 30 ")));
    assert!(events
        .iter()
        .any(|l| l.starts_with(" [UPDATE] udp      17 30 ")));
    assert!(events
        .iter()
        .any(|l| l.starts_with("    [NEW] icmp     1 30 ")));
    // The dropped connection from outside leaves no entry and no event.
    assert!(
        !events.iter().any(|l| l.contains("sport=5555")),
        "{events:#?}"
    );
}

#[test]
fn pcap_ingress_follows_the_routes_back_to_the_source() {
    let mut replay = router_replay(ReplayOpts::default());
    run(&mut replay, pcap(&session()));
    let report = replay.finish();
    assert_eq!(report.listing, vec![TCP_LINE, UDP_LINE, ICMP_LINE]);
    assert_eq!(report.counts.dropped_by_rules, 1);
}

#[test]
fn trace_cites_the_matching_rules_by_file_and_line() {
    let mut replay = router_replay(ReplayOpts {
        trace: true,
        ..Default::default()
    });
    let lines = run(&mut replay, pcapng(&session()));
    assert_eq!(lines.len(), 13);
    // The forward chain's vmap: the second `ct state vmap` of the file.
    let text = std::fs::read_to_string(manifest().join("examples/home-router.nft")).unwrap();
    let fwd_vmap = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("ct state vmap"))
        .nth(1)
        .unwrap()
        .0
        + 1;
    let lan_wan = line_of("iifname \"lan\" oifname \"wan\" accept");
    let drop = line_of("counter log prefix \"forward drop: \" drop");
    let first = &lines[0];
    assert!(
        first.starts_with("1 0.000000 lan tcp 192.168.1.10:40000 > 203.0.113.7:443 [S] seq 1000 ack 0 len 0 -> forward wan ct new rules "),
        "{first}"
    );
    assert!(
        first.contains(&format!("home-router.nft:{lan_wan}")),
        "{first}"
    );
    assert!(
        lines[1].contains("-> forward lan ct established rules ")
            && lines[1].ends_with(&format!("home-router.nft:{fwd_vmap}")),
        "{}",
        lines[1]
    );
    let last = &lines[12];
    assert!(
        last.starts_with("13 0.090000 wan tcp 203.0.113.9:5555 > 192.168.1.10:22 [S]"),
        "{last}"
    );
    assert!(last.contains("-> drop ct new"), "{last}");
    assert!(last.ends_with(&format!("home-router.nft:{drop}")), "{last}");
}

#[test]
fn malformed_frames_are_counted_not_fatal() {
    let mut frames = session();
    let mut cut = frames[0].data.clone();
    cut.truncate(30);
    frames.insert(
        1,
        Cap {
            ns: ms(1),
            iface: "lan",
            data: cut,
        },
    );
    frames.insert(
        2,
        Cap {
            ns: ms(2),
            iface: "lan",
            data: vec![0xff; 5],
        },
    );
    frames.insert(
        3,
        Cap {
            ns: ms(3),
            iface: "dmz",
            data: frames[0].data.clone(),
        },
    );
    let mut replay = router_replay(ReplayOpts {
        trace: true,
        ..Default::default()
    });
    let lines = run(&mut replay, pcapng(&frames));
    let c = replay.finish().counts;
    assert_eq!((c.malformed, c.unknown_ingress), (2, 1), "{lines:#?}");
    assert!(lines[1].contains("-> drop malformed"), "{}", lines[1]);
    assert!(lines[3].contains("skipped (no port"), "{}", lines[3]);
}

#[test]
fn entries_expire_with_the_capture_clock() {
    let mut frames = session();
    // A lone packet 31 s later: the UDP and ICMP entries (30 s) have expired by then.
    frames.push(Cap {
        ns: ms(31_000),
        iface: "lan",
        data: udp("lan", CLIENT, DNS, 5354, 53, b"late"),
    });
    let mut replay = router_replay(ReplayOpts {
        events: true,
        ..Default::default()
    });
    let events = run(&mut replay, pcapng(&frames));
    let destroys: Vec<&String> = events
        .iter()
        .filter(|l| l.starts_with("[DESTROY]"))
        .collect();
    assert_eq!(destroys.len(), 2, "{events:#?}");
    assert!(
        destroys[0]
            .starts_with("[DESTROY] udp      17 src=192.168.1.10 dst=203.0.113.53 sport=5353"),
        "{}",
        destroys[0]
    );
    let report = replay.finish();
    assert_eq!(report.listing.len(), 2, "{:#?}", report.listing);
    assert!(
        report.listing[0].starts_with("tcp      6 89 TIME_WAIT"),
        "{}",
        report.listing[0]
    );
}

// The command, as a user runs it.

fn keepstate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keepstate"))
        .args(args)
        .current_dir(manifest())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn cli_replays_with_a_config_and_writes_what_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "router.toml", config_text().as_bytes());
    let cap = write(dir.path(), "in.pcapng", &pcapng(&session()));
    let out = dir.path().join("out.pcap");
    let (ok, stdout, stderr) = keepstate(&[
        "replay",
        "--config",
        cfg.to_str().unwrap(),
        "--pcap",
        cap.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--trace",
        "--events",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!("{TCP_LINE}\n{UDP_LINE}\n{ICMP_LINE}\n")),
        "{stdout}"
    );
    assert!(
        stdout.contains("    [NEW] tcp      6 120 SYN_SENT"),
        "{stdout}"
    );
    assert!(
        stdout.contains("13 0.090000 wan tcp 203.0.113.9:5555"),
        "{stdout}"
    );
    assert!(
        stderr.contains("conntrack v1.4.8 (conntrack-tools): 3 flow entries have been shown."),
        "{stderr}"
    );
    assert!(
        stderr.contains("replay: 13 frames: 12 forwarded, 0 local, 1 dropped by rules, 0 rejected"),
        "{stderr}"
    );
    // The 12 forwarded frames in order, as they leave: masqueraded towards the server,
    // translated back towards the client, one TTL less, checksums right.
    let mut r = CaptureReader::new(std::fs::File::open(&out).unwrap()).unwrap();
    let mut n = 0;
    let all = session();
    while let Some(f) = r.next_frame() {
        let f = f.unwrap();
        assert_eq!(f.ts.0, all[n].ns);
        let (Frame::Ip(got), Frame::Ip(sent)) =
            (parse_ethernet(&f.data), parse_ethernet(&all[n].data))
        else {
            panic!("frame {n} does not parse")
        };
        checksum::verify(&got).unwrap();
        let (want_src, want_dst) = if all[n].iface == "lan" {
            (IpAddr::from(BOX_WAN), sent.ip.dst())
        } else {
            (sent.ip.src(), IpAddr::from(CLIENT))
        };
        assert_eq!(
            (got.ip.src(), got.ip.dst()),
            (want_src, want_dst),
            "frame {n}"
        );
        assert_eq!(got.ip_bytes[8] + 1, sent.ip_bytes[8], "frame {n}: TTL");
        assert_eq!(got.ip_bytes.len(), sent.ip_bytes.len());
        n += 1;
    }
    assert_eq!(n, 12);
}

#[test]
fn cli_rules_alone_pairs_lan_and_wan() {
    let dir = tempfile::tempdir().unwrap();
    // A pcap has no interface names: the first frame's source address is on lan. The ports
    // have no addresses, so there is nothing to masquerade to: the home router without its
    // nat table, and answers straight to the client.
    let cap = write(dir.path(), "in.pcap", &pcap(&session_to(CLIENT)));
    let text = std::fs::read_to_string(manifest().join("examples/home-router.nft")).unwrap();
    let rules = write(
        dir.path(),
        "no-nat.nft",
        &text.as_bytes()[..text.find("\ntable ip nat {").unwrap()],
    );
    let (ok, stdout, stderr) = keepstate(&[
        "replay",
        "--rules",
        rules.to_str().unwrap(),
        "--pcap",
        cap.to_str().unwrap(),
        "--trace",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("1 0.000000 lan tcp 192.168.1.10:40000 > 203.0.113.7:443 [S]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 0.010000 wan tcp 203.0.113.7:443 > 192.168.1.10:40000 [S.]"),
        "{stdout}"
    );
    let untranslated = format!("{TCP_LINE}\n{UDP_LINE}\n{ICMP_LINE}\n")
        .replace("dst=198.51.100.1", "dst=192.168.1.10");
    assert!(stdout.contains(&untranslated), "{stdout}");
    assert!(
        stderr.contains("replay: 13 frames: 12 forwarded, 0 local, 1 dropped by rules, 0 rejected"),
        "{stderr}"
    );

    // --ingress puts every frame on one port: replies from the server now come "from lan"
    // too, so everything is forwarded to wan and the outsider's SYN is accepted as new.
    let (ok, stdout, stderr) = keepstate(&[
        "replay",
        "--rules",
        rules.to_str().unwrap(),
        "--pcap",
        cap.to_str().unwrap(),
        "--ingress",
        "lan",
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("13 forwarded"), "{stderr}");
    assert!(stdout.contains("sport=5555"), "{stdout}");

    let (ok, _, stderr) = keepstate(&[
        "replay",
        "--rules",
        "examples/home-router.nft",
        "--pcap",
        cap.to_str().unwrap(),
        "--ingress",
        "dmz",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("--ingress dmz: no such port (ports: lan, wan)"),
        "{stderr}"
    );
}

#[test]
fn cli_refuses_a_file_that_is_no_capture() {
    let dir = tempfile::tempdir().unwrap();
    let cap = write(dir.path(), "x.pcap", b"this is not a capture");
    let (ok, _, stderr) = keepstate(&[
        "replay",
        "--rules",
        "examples/home-router.nft",
        "--pcap",
        cap.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(stderr.contains("not a pcap or pcapng file"), "{stderr}");
}

#[test]
fn verdicts_match_the_engine_run_directly() {
    // The replay loop adds nothing to the engine's decisions.
    let mut replay = router_replay(ReplayOpts::default());
    let mut r = CaptureReader::new(Cursor::new(pcapng(&session()))).unwrap();
    let mut verdicts = Vec::new();
    while let Some(f) = r.next_frame() {
        verdicts.push(replay.frame(&f.unwrap()).outcome.unwrap().verdict);
    }
    assert!(matches!(verdicts[0], Verdict::Forward { port: 1, .. }));
    assert!(matches!(verdicts[1], Verdict::Forward { port: 0, .. }));
    assert_eq!(verdicts[12], Verdict::Drop(DropReason::Rules));
}

/// tests/fixtures/pcap/home-session.pcapng is [`session`] as written by [`pcapng`]; the
/// README's example replays it. `KS_REGEN=1` rewrites it.
#[test]
fn committed_capture_is_the_generated_session() {
    let path = manifest().join("tests/fixtures/pcap/home-session.pcapng");
    let bytes = pcapng(&session());
    if std::env::var_os("KS_REGEN").is_some() || !path.exists() {
        std::fs::write(&path, &bytes).unwrap();
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "KS_REGEN=1 remakes it"
    );
    let (ok, stdout, stderr) = keepstate(&[
        "replay",
        "--config",
        "tests/fixtures/pcap/home-router.toml",
        "--rules",
        "examples/home-router.nft",
        "--pcap",
        "tests/fixtures/pcap/home-session.pcapng",
        "--trace",
    ]);
    assert!(ok, "{stderr}");
    let fwd = line_of("iifname \"lan\" oifname \"wan\" accept");
    assert!(
        stdout.contains("ct new rules examples/home-router.nft:"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("examples/home-router.nft:{fwd}")),
        "{stdout}"
    );
    assert!(
        stdout.ends_with(&format!("{TCP_LINE}\n{UDP_LINE}\n{ICMP_LINE}\n")),
        "{stdout}"
    );
}

#[test]
fn a_truncated_capture_ends_with_an_error_after_the_good_frames() {
    for bytes in [pcapng(&session()), pcap(&session())] {
        for cut in [bytes.len() - 7, bytes.len() / 2, 40] {
            let mut r = CaptureReader::new(Cursor::new(bytes[..cut].to_vec())).unwrap();
            let mut replay = router_replay(ReplayOpts::default());
            let mut good = 0;
            let mut damaged = false;
            while let Some(f) = r.next_frame() {
                match f {
                    Ok(f) => {
                        replay.frame(&f);
                        good += 1;
                    }
                    Err(_) => {
                        damaged = true;
                        break;
                    }
                }
            }
            assert!(
                damaged && good < 13,
                "cut at {cut}: {good} frames, no error"
            );
        }
    }
}

#[test]
fn cli_prints_conntrack_statistics() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keepstate"))
        .args([
            "replay",
            "--config",
            "tests/fixtures/pcap/home-router.toml",
            "--rules",
            "examples/home-router.nft",
        ])
        .args([
            "--pcap",
            "tests/fixtures/pcap/home-session.pcapng",
            "--stats",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // Three connections were confirmed (TCP, UDP, ICMP); the blocked SYN was not.
    assert!(text.contains("cpu=0   \tfound="), "{text}");
    assert!(text.contains(" insert=3 "), "{text}");
    assert!(text.contains("fragments: ReasmReqds=0"), "{text}");
}

#[test]
fn cli_prints_log_lines_like_the_kernel() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keepstate"))
        .args([
            "replay",
            "--config",
            "tests/fixtures/pcap/home-router.toml",
            "--rules",
            "examples/home-router.nft",
        ])
        .args(["--pcap", "tests/fixtures/pcap/home-session.pcapng", "--log"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // The home router logs what its forward chain drops, with `log prefix "forward drop: "`.
    let line = text
        .lines()
        .find(|l| l.contains("IN="))
        .expect("a log line");
    assert!(
        line.starts_with("forward drop: IN=wan OUT=lan MAC="),
        "{line}"
    );
    assert!(
        line.contains(" SRC=203.0.113.9 DST=192.168.1.10 LEN=40 "),
        "{line}"
    );
    assert!(
        line.ends_with("PROTO=TCP SPT=5555 DPT=22 WINDOW=64240 RES=0x00 SYN URGP=0"),
        "{line}"
    );
}
