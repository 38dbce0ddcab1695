//! The FTP and SIP helpers on recordings of real clients and servers: curl and pyftpdlib
//! (PASV and PORT over IPv4 through masquerade, EPSV and EPRT over IPv6), and a sipp call
//! with RTP both ways through masquerade, each exchange captured on a Linux router that ran
//! tests/fixtures/helpers/rules.nft (tests/fixtures/helpers/record.sh; its README says how).
//! Sans-IO, no root: each fixture's router ingress is replayed through the engine with the
//! same rules, and compared with what the kernel did, recorded beside the capture:
//!
//! * the expectations the helper created, as `/proc/net/nf_conntrack_expect` prints them
//!   (less the remaining timeout), against the kernel's `conntrack -E expect` [NEW] events;
//! * the data and media connections: RELATED, with the control connection as master;
//! * the table at the end against the kernel's `conntrack -L` (timeouts and `use=` aside);
//! * every frame forwarded, per egress port, against the kernel's egress capture: IPv4 byte
//!   for byte but for the checksum fields (recomputed, and required to verify), so the
//!   payloads nf_nat_ftp and nf_nat_sip rewrote (PORT, the SIP headers, SDP and
//!   Content-Length) and the sequence numbers adjusted after them must be the kernel's; IPv6
//!   (routed, untranslated) by packet identity.

mod common {
    pub mod capture;
    pub mod netns;
}

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use keepstate::config::Config;
use keepstate::conntrack::expect::proc_line;
use keepstate::conntrack::{Dir, Tuple};
use keepstate::engine::Engine;
use keepstate::replay::{CaptureReader, Ingress, Replay, ReplayOpts};
use keepstate::rules::{self, ir::ct_state};

use common::netns::{
    config6, frame_key, frames, merge, multiset, multiset_diff, normalise, packet_id,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/helpers")
        .join(name)
}

/// A connection's original direction, as `conntrack -L` names it.
fn tuple_text(t: &Tuple) -> String {
    format!(
        "proto={} src={} dst={} sport={} dport={}",
        t.proto,
        t.src_ip(),
        t.dst_ip(),
        t.src_id,
        t.dst_id
    )
}

/// What the replay of one fixture showed.
struct Replayed {
    /// Every expectation the table held at some point, in order of appearance, as
    /// `/proc/net/nf_conntrack_expect` prints it less the remaining timeout.
    expectations: Vec<String>,
    /// The connections that began RELATED: their original tuple and their master's.
    related: Vec<(String, String)>,
    /// The table at the end, as `conntrack -L` prints it.
    listing: Vec<String>,
    /// Every frame forwarded, as it left, by port name.
    out: BTreeMap<&'static str, Vec<Vec<u8>>>,
}

/// Replays the router ingress of fixture `name` (`lan-in.pcap` and `wan-in.pcap`, merged
/// by time) through the router of rules.nft.
fn replay(name: &str) -> Replayed {
    let dir = fixture(name);
    let rules_file = fixture("rules.nft");
    let cfg = Config::parse(&config6(&rules_file, ""), Path::new("ks.toml")).unwrap();
    let loaded = rules::load_file(&rules_file).unwrap();
    let engine = Engine::from_config(&cfg, &loaded).unwrap();
    let ports = ["lan", "wan"].map(|p| (engine.port_index(p).unwrap(), p));
    let mut replay = Replay::new(engine, Some(cfg), Ingress::Auto, ReplayOpts::default());
    let merged = merge(
        &frames(&dir.join("lan-in.pcap")),
        &frames(&dir.join("wan-in.pcap")),
    );
    let mut reader = CaptureReader::new(std::io::Cursor::new(merged)).unwrap();
    let mut r = Replayed {
        expectations: Vec::new(),
        related: Vec::new(),
        listing: Vec::new(),
        out: BTreeMap::new(),
    };
    while let Some(f) = reader.next_frame() {
        let step = replay.frame(&f.unwrap());
        let now = replay.now().nanos();
        for e in replay.engine().tracker().expectations().list(now) {
            let line = without_timeout(&proc_line(&e, now));
            if !r.expectations.contains(&line) {
                r.expectations.push(line);
            }
        }
        let Some(o) = step.outcome else { continue };
        if o.ct_state == Some(ct_state::RELATED as u32) {
            for (_, conn) in &o.events {
                let master = conn.master().map(|m| tuple_text(&m.tuple(Dir::Original)));
                r.related.push((
                    tuple_text(&conn.tuple(Dir::Original)),
                    master.unwrap_or_else(|| "no master".into()),
                ));
            }
        }
        if let Some((_, port)) = ports.iter().find(|(i, _)| Some(*i) == step.leaves) {
            r.out.entry(port).or_default().push(o.frame);
        }
    }
    r.listing = replay.finish().listing;
    r
}

/// A `/proc/net/nf_conntrack_expect` line less its first word, the remaining timeout.
fn without_timeout(l: &str) -> String {
    l.split_once(' ').map_or(l, |(_, rest)| rest).to_string()
}

/// The expectations the kernel created (the [NEW] events of `conntrack -E expect`), as
/// `/proc/net/nf_conntrack_expect` prints them less the timeout: `l3proto = 2|10`, the
/// tuple, and the helper's name with, for a helper of several policies (sip), the class's.
fn kernel_expectations(name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(fixture(name).join("kernel-expect.txt")).unwrap();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("[NEW] "))
        .map(|l| {
            let field = |key: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .unwrap_or("?")
                    .to_string()
            };
            let src = field("src=");
            let l3 = if src.contains(':') { 10 } else { 2 };
            let helper = field("helper=");
            let name = if helper == "sip" {
                let classes = ["signalling", "audio", "video", "image"];
                let class: usize = field("class=").parse().unwrap();
                format!("sip/{}", classes[class])
            } else {
                helper
            };
            format!(
                "l3proto = {l3} proto={} src={src} dst={} sport={} dport={} {name}",
                field("proto="),
                field("dst="),
                field("sport="),
                field("dport=")
            )
        })
        .collect()
}

/// The kernel's egress of fixture `name` on `port` against keepstate's: IPv4 by
/// [`frame_key`] (whole packet, checksums recomputed), IPv6 by [`packet_id`]; the router's
/// own packets (neighbour discovery, ARP) are not forwarded ones and are left out.
fn egress_differences(name: &str, r: &Replayed, port: &str) -> Option<String> {
    let kernel = frames(&fixture(name).join(format!("{port}-out.pcap")));
    let ours = r.out.get(port).cloned().unwrap_or_default();
    let key = |f: &[u8]| {
        frame_key(f, |_| {}).or_else(|| {
            packet_id(f).filter(|id| {
                !["fd77:1::1 ", "fd77:2::1 "]
                    .iter()
                    .any(|own| id.starts_with(own))
            })
        })
    };
    let theirs = multiset(kernel.iter().filter_map(|f| key(&f.data)));
    let mine = multiset(ours.iter().filter_map(|f| key(f)));
    eprintln!(
        "{name}: {} frames out of {port} compared ({} captured)",
        theirs.values().sum::<usize>(),
        kernel.len()
    );
    assert!(
        theirs.keys().all(|k| !k.contains("-BAD")),
        "{name}: the kernel's frames out of {port} must verify: {theirs:#?}"
    );
    (theirs != mine).then(|| multiset_diff(&theirs, &mine))
}

/// Everything compared for fixture `name`; returns the replay for the fixture's own checks.
fn agrees_with_the_kernel(name: &str) -> Replayed {
    let r = replay(name);
    let mut failures = Vec::new();
    let kernel = kernel_expectations(name);
    assert!(!kernel.is_empty(), "{name}: the kernel expected nothing");
    if r.expectations != kernel {
        failures.push(format!(
            "expectations:\n  kernel    {kernel:#?}\n  keepstate {:#?}",
            r.expectations
        ));
    }
    let table = std::fs::read_to_string(fixture(name).join("kernel-conntrack.txt")).unwrap();
    let theirs = multiset(table.lines().map(normalise));
    let mine = multiset(r.listing.iter().map(|l| normalise(l)));
    if theirs != mine {
        failures.push(format!(
            "conntrack -L (- the kernel only, + keepstate only):\n{}",
            multiset_diff(&theirs, &mine)
        ));
    }
    for port in ["lan", "wan"] {
        if let Some(d) = egress_differences(name, &r, port) {
            failures.push(format!(
                "frames out of {port} (- the kernel only, + keepstate only):\n{d}"
            ));
        }
    }
    eprintln!(
        "{name}: {} expectations, {} connections at the end, agree",
        kernel.len(),
        r.listing.len()
    );
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
    r
}

/// The payloads of the frames that left by `port`, as text.
fn payloads(r: &Replayed, port: &str) -> String {
    r.out
        .get(port)
        .into_iter()
        .flatten()
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect()
}

/// An FTP fixture: it agrees with the kernel, `said` went out of `port` (the command or the
/// answer that announced the data connection, as it left), and exactly one connection began
/// RELATED, the data connection from `data` (`src=A dst=B`), whose master is the control
/// connection from `control` to port 21.
fn ftp(name: &str, port: &str, said: &str, data: &str, control: &str) -> Replayed {
    let r = agrees_with_the_kernel(name);
    assert!(payloads(&r, port).contains(said), "{name}: no {said:?}");
    assert_eq!(r.related.len(), 1, "{name}: {:?}", r.related);
    let (conn, master) = &r.related[0];
    assert!(conn.starts_with(&format!("proto=6 {data} ")), "{conn}");
    assert!(
        master.starts_with(&format!("proto=6 {control} ")) && master.ends_with(" dport=21"),
        "{master}"
    );
    r
}

const CLIENT_TO_SERVER: &str = "src=10.77.1.100 dst=10.77.2.2";

#[test]
fn ftp_pasv_through_masquerade() {
    // The client's data connection goes to the port of the server's 227.
    let said = "227 Entering passive mode (10,77,2,2,";
    ftp("ftp-pasv", "lan", said, CLIENT_TO_SERVER, CLIENT_TO_SERVER);
}

#[test]
fn ftp_port_through_masquerade_is_rewritten() {
    // PORT names the router's address on the way out (two bytes shorter, so the sequence
    // numbers after it move), and the server's connection back is expected to it.
    let data = "src=10.77.2.2 dst=10.77.2.1";
    let r = ftp("ftp-port", "wan", "PORT 10,77,2,1,", data, CLIENT_TO_SERVER);
    assert!(!payloads(&r, "wan").contains("10,77,1,100"));
    assert!(r.expectations[0].starts_with(&format!("l3proto = 2 proto=6 {data} sport=0 ")));
}

#[test]
fn ftp_epsv_over_ipv6() {
    let said = "229 Entering extended passive mode (|||";
    let c = "src=fd77:1::2 dst=fd77:2::2";
    ftp("ftp-epsv6", "lan", said, c, c);
}

#[test]
fn ftp_eprt_over_ipv6() {
    let said = "EPRT |2|fd77:1::2|";
    let data = "src=fd77:2::2 dst=fd77:1::2";
    ftp(
        "ftp-eprt6",
        "wan",
        said,
        data,
        "src=fd77:1::2 dst=fd77:2::2",
    );
}

#[test]
fn a_sip_call_through_masquerade() {
    let r = agrees_with_the_kernel("sip-call");
    // RTP and RTCP each way; the phone's own RTP opened the media connection, RELATED to
    // the call.
    assert_eq!(r.expectations.len(), 4, "{:?}", r.expectations);
    assert_eq!(r.related.len(), 1, "{:?}", r.related);
    let (media, master) = &r.related[0];
    assert_eq!(
        media,
        "proto=17 src=10.77.1.100 dst=10.77.2.2 sport=7078 dport=6000"
    );
    assert_eq!(
        master,
        "proto=17 src=10.77.1.100 dst=10.77.2.2 sport=5060 dport=5060"
    );
    // The phone's INVITE leaves with the router's address in its headers and SDP, and the
    // answers come back to the phone with its own.
    let wan = payloads(&r, "wan");
    for needle in [
        "Via: SIP/2.0/UDP 10.77.2.1:5060;",
        "Contact: sip:phone@10.77.2.1:5060",
        "c=IN IP4 10.77.2.1\r\n",
    ] {
        assert!(wan.contains(needle), "no {needle:?} out of wan");
    }
    assert!(payloads(&r, "lan").contains("Via: SIP/2.0/UDP 10.77.1.100:5060;"));
}
