//! Hostile traffic through the sans-IO engine, with a fake clock: a SYN flood from random
//! sources against a full table while an established transfer goes on, a flood of
//! fragments that never complete, a hostile FTP server announcing port after port, and SIP
//! with absurd SDP. Each must stay bounded and counted, and nothing promised (an ASSURED
//! connection, a datagram whose fragments all arrive) may be lost.

mod common {
    pub mod capture;
    pub mod router;
}

use std::path::Path;

use keepstate::config::Config;
use keepstate::conntrack::Timestamp;
use keepstate::engine::{DropReason, Engine, Verdict, Worker};
use keepstate::rules;

use common::capture::{fragments_v4, tcp, udp};
use common::router::{self, home_router};

const LAN: usize = 0;
const WAN: usize = 1;
const CLIENT: [u8; 4] = [192, 168, 1, 10];
const SERVER: [u8; 4] = [203, 0, 113, 7];
const BOX_WAN: [u8; 4] = [198, 51, 100, 1];

fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(1_000_000 + ms)
}

/// A SYN from a random-looking source on the internet to the port forward (dnat to the
/// home server), rewritten in place from one template so the flood allocates nothing.
fn flood_frame(template: &mut [u8], i: u32) {
    let x = i.wrapping_mul(2_654_435_761);
    // Source address 10.x.y.z-ish from the whole space, and the source port.
    template[26..30].copy_from_slice(&(0x0b00_0000 | (x & 0x00ff_ffff)).to_be_bytes());
    template[34..36].copy_from_slice(&((x >> 16) as u16 | 1024).to_be_bytes());
}

#[test]
fn a_syn_flood_against_a_full_table_spares_established_connections() {
    const MAX: u32 = 65_536;
    // The flood size: a million in release builds, fewer in debug ones (the same code).
    let flood: u32 = if cfg!(debug_assertions) {
        200_000
    } else {
        1_000_000
    };
    let e = home_router(MAX);
    let mut w = Worker::new(0);
    let mut clock = 0;
    let step = |e: &Engine, w: &mut Worker, f: &[u8], port: usize, ms: u64| {
        let mut f = f.to_vec();
        e.process_with(&mut f, port, t(ms), w).0
    };
    // A long transfer, established and ASSURED before the flood.
    step(
        &e,
        &mut w,
        &tcp("lan", CLIENT, SERVER, 40000, 443, "S", 100, 0, b""),
        LAN,
        0,
    );
    step(
        &e,
        &mut w,
        &tcp("wan", SERVER, BOX_WAN, 443, 40000, "SA", 900, 101, b""),
        WAN,
        1,
    );
    step(
        &e,
        &mut w,
        &tcp("lan", CLIENT, SERVER, 40000, 443, "A", 101, 901, b""),
        LAN,
        2,
    );
    let (cseq, mut sseq) = (101u32, 901u32);
    let chunk = [b'x'; 1000];
    let mut transfer = |e: &Engine, w: &mut Worker, ms: u64| {
        let v = step(
            e,
            w,
            &tcp("wan", SERVER, BOX_WAN, 443, 40000, "PA", sseq, cseq, &chunk),
            WAN,
            ms,
        );
        sseq = sseq.wrapping_add(chunk.len() as u32);
        let a = step(
            e,
            w,
            &tcp("lan", CLIENT, SERVER, 40000, 443, "A", cseq, sseq, b""),
            LAN,
            ms,
        );
        (v, a)
    };
    assert!(matches!(transfer(&e, &mut w, 3).0, Verdict::Forward { .. }));
    let baseline = e.tracker().count();

    // The flood: SYNs to the port forward from sources all over the place, 1 ms apart in
    // bursts, the transfer going on between them.
    let mut syn = tcp("wan", [11, 0, 0, 1], BOX_WAN, 1024, 8080, "S", 1, 0, b"");
    let mut forwarded = 0u64;
    for i in 0..flood {
        flood_frame(&mut syn, i);
        let mut f = syn.clone();
        match e
            .process_with(&mut f, WAN, t(10 + u64::from(i) / 100), &mut w)
            .0
        {
            Verdict::Forward { .. } => forwarded += 1,
            // A counted drop when nothing could be evicted (none here: the flood's own
            // entries are never ASSURED).
            v => assert_eq!(v, Verdict::Drop(DropReason::TableFull)),
        }
        if i % 10_000 == 0 {
            clock = 10 + u64::from(i) / 100;
            let (data, ack) = transfer(&e, &mut w, clock);
            assert!(
                matches!(data, Verdict::Forward { .. }) && matches!(ack, Verdict::Forward { .. }),
                "the transfer stalled at SYN {i}: {data:?} {ack:?}"
            );
            e.housekeeping(t(clock), 64);
        }
    }
    assert!(
        e.tracker().count() <= MAX as usize,
        "the table stays bounded"
    );
    let st: (u64, u64) = e
        .tracker()
        .stats()
        .iter()
        .fold((0, 0), |a, s| (a.0 + s.early_drop, a.1 + s.drop));
    assert!(st.0 > 0, "early drop made room: {st:?}");
    assert!(
        forwarded > u64::from(MAX),
        "the flood was let in while there was room"
    );
    // Early drop only ever takes what is not ASSURED: the transfer's entry is still there.
    assert!(e
        .tracker()
        .conns()
        .iter()
        .any(|c| c.orig().sport() == 40000 && c.is_assured()));

    // The flood ends; its half-open entries time out (SYN_SENT, 120 s after the last
    // packet... here SYN_RECV is never reached, so 120 s) and the table returns to its
    // baseline while the transfer keeps going.
    let later = clock + 130_000;
    assert!(matches!(
        transfer(&e, &mut w, later).0,
        Verdict::Forward { .. }
    ));
    let buckets = e.tracker().table().buckets();
    e.housekeeping(t(later + 1), buckets);
    assert_eq!(e.tracker().count(), baseline, "back to the baseline");
}

/// Fragments of datagrams that never complete, from sources all over the internet, seven
/// times the reassembly memory: the memory held never passes `ipfrag_high_thresh`, the
/// evicted datagrams are counted (`ReasmFails`), and datagrams whose fragments all arrive
/// pass, during the flood and after it. When the flood stops, the rest times out.
#[test]
fn a_fragment_flood_beyond_the_reassembly_memory_stays_bounded() {
    use keepstate::packet::frag::IPFRAG_HIGH_THRESH;
    const FLOOD: u32 = 20_000;
    let e = home_router(65_536);
    let mut w = Worker::new(0);
    let mut now = 0;
    // A LAN host's 3000-byte datagram to the internet, in three fragments, all at once.
    let whole = |e: &Engine, w: &mut Worker, id: u16, ms: u64| {
        let frags = fragments_v4(
            &udp("lan", CLIENT, SERVER, 40000, 5000, &[7; 3000]),
            id,
            1480,
        );
        let verdicts: Vec<_> = frags
            .iter()
            .map(|f| e.process_with(&mut f.clone(), LAN, t(ms), w).0)
            .collect();
        assert_eq!(verdicts[..2], [Verdict::Held, Verdict::Held]);
        assert!(
            matches!(verdicts[2], Verdict::Forward { port: WAN, .. }),
            "datagram {id}: {verdicts:?}"
        );
        assert_eq!(w.released.len(), 3, "its three fragments leave");
    };
    let template = udp("wan", SERVER, BOX_WAN, 53, 9999, &[1; 3000]);
    let mut peak = 0;
    for i in 0..FLOOD {
        // The first fragment only, from a source and with an id of its own.
        let mut f = fragments_v4(&template, i as u16, 1480).swap_remove(0);
        let x = i.wrapping_mul(2_654_435_761);
        f[26..30].copy_from_slice(&(0x0b00_0000 | (x & 0x00ff_ffff)).to_be_bytes());
        let mut h = etherparse::Ipv4Header::from_slice(&f[14..]).unwrap().0;
        h.header_checksum = h.calc_header_checksum();
        f[14..34].copy_from_slice(&h.to_bytes());
        now = 10 + u64::from(i) / 10;
        assert_eq!(e.process_with(&mut f, WAN, t(now), &mut w).0, Verdict::Held);
        let mem = e.reassembler().stats().mem;
        assert!(
            mem <= IPFRAG_HIGH_THRESH,
            "{mem} bytes held at fragment {i}"
        );
        peak = peak.max(mem);
        if i % 1000 == 999 {
            whole(&e, &mut w, (i / 1000) as u16, now);
        }
    }
    whole(&e, &mut w, 0xffff, now + 1);
    let s = e.reassembler().stats();
    eprintln!(
        "{FLOOD} incomplete datagrams: peak {peak} bytes held, {} evicted, {} held at the end",
        s.evictions, s.queues
    );
    assert!(
        peak > IPFRAG_HIGH_THRESH * 3 / 4,
        "the flood reached the bound"
    );
    // Every flood datagram not held any more was evicted, and counted so.
    assert_eq!(s.evictions + s.queues as u64, u64::from(FLOOD));
    assert_eq!(s.reasm_fails, s.evictions);
    assert_eq!(s.reasm_oks, u64::from(FLOOD / 1000) + 1);
    let held = s.queues;
    // The flood stops: what is held times out (ipfrag_time, 30 s), a batch of queues per
    // tick of the main loop (50 ms): the flood's leftovers are gone within two seconds.
    for tick in 0..40 {
        e.housekeeping(t(now + 31_000 + tick * 50), 1);
    }
    let s = e.reassembler().stats();
    assert_eq!((s.queues, s.mem), (0, 0));
    assert_eq!(s.reasm_timeout, held as u64);
    whole(&e, &mut w, 0x7777, now + 31_001);
}

/// A hostile FTP server announces port after port on one control connection, and many
/// control connections do it at once: expectations stay bounded (one per master, then the
/// table's `expect_max`), and what does not fit is refused and counted.
#[test]
fn a_hostile_ftp_server_cannot_fill_memory_with_expectations() {
    let text = "table inet fw {\n\tct helper ftp {\n\t\ttype \"ftp\" protocol tcp;\n\t}\n\tchain pre {\n\t\ttype filter hook prerouting priority filter; policy accept;\n\t\ttcp dport 21 ct helper set \"ftp\"\n\t}\n}\n";
    let cfg = Config::parse(
        &format!(
            "{}\n[conntrack]\nexpect_max = 64\nchecksum = false\n",
            router::CONFIG
        ),
        Path::new("ks.toml"),
    )
    .unwrap();
    let e = Engine::from_config(&cfg, &rules::load_str("fw.nft", text).unwrap()).unwrap();
    let mut refused = 0;
    for c in 0..100u16 {
        let cp = 30000 + c;
        let go = |f: Vec<u8>, port, ms| e.process(&f, port, t(ms), 0);
        go(tcp("lan", CLIENT, SERVER, cp, 21, "S", 100, 0, b""), LAN, 0);
        go(
            tcp("wan", SERVER, CLIENT, 21, cp, "SA", 500, 101, b""),
            WAN,
            1,
        );
        go(
            tcp("lan", CLIENT, SERVER, cp, 21, "A", 101, 501, b""),
            LAN,
            2,
        );
        let mut sseq = 501;
        let hello = b"220 hi\r\n";
        go(
            tcp("wan", SERVER, CLIENT, 21, cp, "PA", sseq, 101, hello),
            WAN,
            3,
        );
        sseq += hello.len() as u32;
        for p in 0..20u16 {
            let port = 20000 + c * 20 + p;
            let msg = format!(
                "227 Entering Passive Mode (203,0,113,7,{},{})\r\n",
                port >> 8,
                port & 0xff
            );
            let o = go(
                tcp(
                    "wan",
                    SERVER,
                    CLIENT,
                    21,
                    cp,
                    "PA",
                    sseq,
                    101,
                    msg.as_bytes(),
                ),
                WAN,
                4 + u64::from(p),
            );
            if o.verdict == Verdict::Drop(DropReason::Helper) {
                refused += 1;
                assert!(o.logs[0].contains("expectation table full"), "{:?}", o.logs);
            } else {
                sseq += msg.len() as u32;
            }
        }
    }
    let x = e.tracker().expectations();
    assert_eq!(x.count(), 64, "bounded by expect_max");
    assert!(refused > 0);
    // One per master: the 20 announcements of each replaced each other.
    assert_eq!(x.list(t(100).nanos()).len(), 64);
    let s = x.stats();
    assert_eq!(s.create, s.delete + 64);
}

/// SIP with absurd SDP: a thousand media lines, ports out of range, no address. Bounded by
/// each media class's `max_expected`, and the malformed ones dropped.
#[test]
fn absurd_sdp_is_bounded_or_dropped() {
    let text = "table inet fw {\n\tct helper sip {\n\t\ttype \"sip\" protocol udp;\n\t}\n\tchain pre {\n\t\ttype filter hook prerouting priority filter; policy accept;\n\t\tudp dport 5060 ct helper set \"sip\"\n\t}\n}\n";
    let cfg = Config::parse(
        &format!("{}\n[conntrack]\nchecksum = false\n", router::CONFIG),
        Path::new("ks.toml"),
    )
    .unwrap();
    let e = Engine::from_config(&cfg, &rules::load_str("sip.nft", text).unwrap()).unwrap();
    let invite = |sdp: &str| {
        format!(
            "INVITE sip:b@203.0.113.7 SIP/2.0\r\nVia: SIP/2.0/UDP 192.168.1.10:5060\r\nCSeq: 1 INVITE\r\nContent-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        )
    };
    let mut many = String::from("v=0\r\nc=IN IP4 192.168.1.10\r\n");
    for i in 0..1000 {
        many.push_str(&format!(
            "m=audio {} RTP/AVP 0\r\nm=video {} RTP/AVP 0\r\n",
            10000 + 2 * i,
            30000 + 2 * i
        ));
    }
    let o = e.process(
        &udp("lan", CLIENT, SERVER, 5060, 5060, invite(&many).as_bytes()),
        LAN,
        t(0),
        0,
    );
    assert!(matches!(o.verdict, Verdict::Forward { .. }));
    // audio 4 + video 4: the oldest of each class went as newer ones came.
    assert_eq!(e.tracker().expectations().count(), 8);
    for bad in [
        "v=0\r\nc=IN IP4 192.168.1.10\r\nm=audio 70000 RTP/AVP 0\r\n",
        "v=0\r\nc=IN IP4 192.168.1.10\r\nm=audio 80 RTP/AVP 0\r\n",
        "v=0\r\nm=audio 40000 RTP/AVP 0\r\n",
    ] {
        let o = e.process(
            &udp("lan", CLIENT, SERVER, 5060, 5060, invite(bad).as_bytes()),
            LAN,
            t(1),
            0,
        );
        assert_eq!(o.verdict, Verdict::Drop(DropReason::Helper), "{bad:?}");
    }
}

/// A hundred reloads while traffic flows on another thread: valid and invalid rules files
/// alternating. Every invalid file is refused with its diagnostics (the old ruleset stays),
/// every valid one swaps in atomically, and not one packet of the established connections is
/// refused meanwhile.
#[test]
fn a_hundred_reloads_under_traffic_break_no_established_connection() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/home-router.nft");
    let good = std::fs::read_to_string(&path).unwrap();
    // The same ruleset with a counter more (so each valid reload really is a new ruleset).
    let also_good = good.replace(
        "iifname \"lan\" oifname \"wan\" accept",
        "iifname \"lan\" oifname \"wan\" counter accept",
    );
    let bad = good.replace("policy drop;", "policy dorp;");
    let e = Arc::new(home_router(65_536));
    // Fifty established connections.
    let flows: Vec<u16> = (0..50).map(|i| 41_000 + i).collect();
    for &p in &flows {
        e.process(
            &tcp("lan", CLIENT, SERVER, p, 443, "S", 100, 0, b""),
            LAN,
            t(0),
            0,
        );
        e.process(
            &tcp("wan", SERVER, BOX_WAN, 443, p, "SA", 900, 101, b""),
            WAN,
            t(1),
            0,
        );
        e.process(
            &tcp("lan", CLIENT, SERVER, p, 443, "A", 101, 901, b""),
            LAN,
            t(2),
            0,
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (e, stop, sent, flows) = (e.clone(), stop.clone(), sent.clone(), flows.clone());
        std::thread::spawn(move || {
            let mut w = Worker::new(1);
            let mut refused = Vec::new();
            let mut seq = 101u32;
            while !stop.load(Ordering::Relaxed) {
                for &p in &flows {
                    let mut f = tcp("lan", CLIENT, SERVER, p, 443, "PA", seq, 901, b"data");
                    let v = e.process_with(&mut f, LAN, t(3), &mut w).0;
                    if !matches!(v, Verdict::Forward { .. }) {
                        refused.push((p, v));
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                seq = seq.wrapping_add(4);
            }
            refused
        })
    };
    let (mut swapped, mut refused_files) = (0, 0);
    for i in 0..100 {
        let text = match i % 4 {
            0 | 2 => &bad,
            1 => &also_good,
            _ => &good,
        };
        match rules::load_str("reload.nft", text) {
            Ok(loaded) => {
                e.reload(keepstate::engine::Compiled::new(&loaded).unwrap());
                swapped += 1;
            }
            Err(d) => {
                assert!(
                    d.to_string().contains("reload.nft:"),
                    "diagnostics name the file: {d}"
                );
                refused_files += 1;
            }
        }
        // Let some traffic through between reloads.
        let before = sent.load(Ordering::Relaxed);
        while sent.load(Ordering::Relaxed) < before + 50 {
            std::thread::yield_now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let refused = traffic.join().unwrap();
    assert_eq!((swapped, refused_files), (50, 50));
    assert!(
        refused.is_empty(),
        "packets refused during reloads: {:?}",
        &refused[..refused.len().min(5)]
    );
    assert!(sent.load(Ordering::Relaxed) >= 100 * 50);
    assert_eq!(e.tracker().count(), 50, "every connection is still there");
}
