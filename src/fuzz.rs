//! The fuzz targets' bodies, here so that `fuzz/` (cargo fuzz, nightly) and the regression
//! test that replays every saved input (`tests/fuzz_regressions.rs`, stable) run the same
//! code. Each takes arbitrary bytes and must return without panicking.

use std::path::Path;
use std::sync::OnceLock;

use crate::config::Config;
use crate::conntrack::helper::{ftp, sip};
use crate::conntrack::Timestamp;
use crate::engine::{Engine, Worker};
use crate::rules;

/// The rules a fuzzed engine runs: the home router's filter and NAT (masquerade and a port
/// forward), with the FTP and SIP helpers attached, and a flowtable that TCP and UDP
/// connections are offloaded to once established.
const RULES: &str = r#"
table inet filter {
	ct helper ftp-standard {
		type "ftp" protocol tcp;
	}
	ct helper sip-5060 {
		type "sip" protocol udp;
	}
	flowtable fastpath {
		hook ingress priority 0; devices = { lan, wan }; counter
	}
	chain pre {
		type filter hook prerouting priority filter; policy accept;
		tcp dport 21 ct helper set "ftp-standard"
		udp dport 5060 ct helper set "sip-5060"
	}
	chain forward {
		type filter hook forward priority filter; policy drop;
		meta l4proto { tcp, udp } flow add @fastpath
		ct state vmap { established : accept, related : accept, invalid : drop }
		iifname "lan" accept
		ct status dnat accept
		log prefix "fwd drop: " counter reject
	}
}
table ip nat {
	chain pre {
		type nat hook prerouting priority dstnat; policy accept;
		iifname "wan" tcp dport { 21, 8080 } dnat to 192.168.1.10
		iifname "wan" udp dport 5060 dnat to 192.168.1.20
	}
	chain post {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "wan" masquerade
	}
}
"#;

const CONFIG: &str = r#"
[[port]]
name = "lan"
addresses = ["192.168.1.1/24", "fd00::1/64"]

[[port]]
name = "wan"
addresses = ["198.51.100.1/24", "2001:db8::1/64"]

[[route]]
to = "default"
via = "198.51.100.254"

[conntrack]
max = 4096
checksum = false
"#;

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let cfg = Config::parse(CONFIG, Path::new("fuzz.toml")).expect("fuzz config");
        let rules = rules::load_str("fuzz.nft", RULES).expect("fuzz rules");
        Engine::from_config(&cfg, &rules).expect("fuzz engine")
    })
}

/// Frames through the engine: the input is a sequence of records `[port, time step, len_hi,
/// len_lo, frame...]`, so one input can open a connection and then hit it. The engine is
/// shared by every input (its state is more input).
pub fn engine_frames(data: &[u8]) {
    let e = engine();
    let mut w = Worker::new(0);
    let mut now = 1_000_000_000u64;
    let mut rest = data;
    while rest.len() >= 4 {
        let port = usize::from(rest[0] % 3);
        now += u64::from(rest[1]) * 50_000_000;
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]])).min(rest.len() - 4);
        let mut frame = rest[4..4 + len].to_vec();
        rest = &rest[4 + len..];
        e.process_with(&mut frame, port, Timestamp(now), &mut w);
    }
    e.housekeeping(Timestamp(now), 16);
    let _ = e.flow_gc(Timestamp(now));
}

/// A rules file through the whole front end (parse, check, lower, print).
pub fn rules_text(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(loaded) = rules::load_str("fuzz.nft", text) {
            let _ = loaded.listing();
            let _ = crate::engine::Compiled::new(&loaded);
        }
    }
}

/// A configuration file.
pub fn config_text(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = Config::parse(text, Path::new("fuzz.toml")) {
            let _ = c.routing_table();
            let _ = c.conntrack.tracker_config();
        }
    }
}

/// The FTP parser on both sides, for IPv4 and IPv6 control connections.
pub fn ftp_payload(data: &[u8]) {
    for side in [ftp::Side::Client, ftp::Side::Server] {
        for v6 in [false, true] {
            if let ftp::FtpParse::Found(m) = ftp::parse(data, side, v6) {
                assert!(m.offset + m.len <= data.len(), "match beyond the payload");
            }
        }
    }
}

/// The SIP message and SDP parsers, and the URI parser.
pub fn sip_message(data: &[u8]) {
    let mut rest = data;
    while let Ok(m) = sip::parse_message(rest) {
        assert!(m.body.end <= rest.len() && m.len <= rest.len());
        if let Ok(media) = sip::parse_sdp(&rest[m.body.clone()]) {
            for x in media {
                assert!(x.port_at.end <= m.body.len() && x.addr_at.end <= m.body.len());
            }
        }
        for (_, r) in &m.headers {
            let _ = sip::uri_host_port(&rest[r.clone()]);
        }
        if m.len == 0 || m.len >= rest.len() {
            break;
        }
        rest = &rest[m.len..];
    }
    let _ = sip::parse_sdp(data);
}
