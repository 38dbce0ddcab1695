//! The shared table: bounded size, early drop, counted drops, GC, concurrency, and the
//! `conntrack -L` / `-E` / `-S` and /proc renderings.

#[path = "common/ctkit.rs"]
#[allow(dead_code)]
mod ctkit;

use std::sync::Arc;

use ctkit::*;
use keepstate::conntrack::show::{self, ShowOpts};
use keepstate::conntrack::{
    Classified, CtConfig, CtInfo, DropReason, Hook, PktCtx, Timestamp, Tracker, EV_DESTROY, EV_NEW,
};
use keepstate::packet::{parse_ip, Frame};

fn small(max: usize) -> H {
    H::with(CtConfig {
        max,
        events: true,
        ..CtConfig::default()
    })
}

fn syn(i: u32) -> Vec<u8> {
    let src = format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
    tcp(&src, 40000, "192.0.2.1", 80, &Seg::new(SYN, 1000, 0))
}

#[test]
fn full_table_early_drops_unassured_entries() {
    let mut h = small(64);
    for i in 0..64 {
        assert_eq!(info(&h.send(&syn(i))), Some(CtInfo::New));
    }
    assert_eq!(h.ct.count(), 64);
    // More SYNs: each evicts a non-assured entry near its bucket.
    let mut ok = 0;
    for i in 64..200 {
        if info(&h.send(&syn(i))) == Some(CtInfo::New) {
            ok += 1;
        }
    }
    assert!(h.ct.count() <= 64);
    let st = h.ct.stats()[0];
    assert_eq!(st.early_drop as usize + st.drop as usize, 136);
    assert!(st.early_drop > 0, "{st:?}");
    assert_eq!(ok as u64, st.early_drop);
    assert!(!h.ct.take_destroyed().is_empty());
}

#[test]
fn full_table_of_assured_entries_drops_and_counts() {
    let mut h = small(64);
    let mut n = 0;
    for i in 0..64u32 {
        let src = format!("10.0.0.{}", i + 1);
        h.send(&tcp(&src, 40000, "192.0.2.1", 80, &Seg::new(SYN, 1000, 0)));
        h.send(&tcp(
            "192.0.2.1",
            80,
            &src,
            40000,
            &Seg::new(SYN | ACK, 5000, 1001),
        ));
        h.send(&tcp(
            &src,
            40000,
            "192.0.2.1",
            80,
            &Seg::new(ACK, 1001, 5001),
        ));
        n += 1;
    }
    assert_eq!(h.ct.count(), n);
    assert!(h.ct.conns().iter().all(|c| c.is_assured()));
    let r = h.send(&syn(1_000_000));
    assert!(matches!(r, Classified::Drop(DropReason::TableFull)));
    assert_eq!(r.ct_state(), keepstate::conntrack::ct_state::INVALID);
    let st = h.ct.stats()[0];
    assert_eq!((st.drop, st.early_drop), (1, 0));
    // Packets of existing connections still pass.
    let r = h.send(&tcp(
        "10.0.0.1",
        40000,
        "192.0.2.1",
        80,
        &Seg::new(ACK, 1001, 5001),
    ));
    assert_eq!(info(&r), Some(CtInfo::Established));
}

/// A table of 64 ASSURED TCP connections, half of them in FIN_WAIT.
fn full_of_assured_half_closing() -> H {
    let mut h = small(64);
    for i in 0..64u32 {
        let src = format!("10.0.0.{}", i + 1);
        h.send(&tcp(&src, 40000, "192.0.2.1", 80, &Seg::new(SYN, 1000, 0)));
        h.send(&tcp(
            "192.0.2.1",
            80,
            &src,
            40000,
            &Seg::new(SYN | ACK, 5000, 1001),
        ));
        h.send(&tcp(
            &src,
            40000,
            "192.0.2.1",
            80,
            &Seg::new(ACK, 1001, 5001),
        ));
        if i % 2 == 0 {
            h.send(&tcp(
                &src,
                40000,
                "192.0.2.1",
                80,
                &Seg::new(FIN | ACK, 1001, 5001),
            ));
        }
    }
    h
}

#[test]
fn gc_under_pressure_evicts_closing_assured_entries() {
    let mut h = full_of_assured_half_closing();
    assert!(matches!(h.send(&syn(999_999)), Classified::Drop(_)));
    // The drop flagged the GC: it now reaps the 32 FIN_WAIT entries.
    let reaped = h.ct.gc_step(h.now, usize::MAX);
    assert_eq!(reaped, 32);
    assert_eq!(h.ct.count(), 32);
    assert_eq!(info(&h.send(&syn(999_999))), Some(CtInfo::New));
}

#[test]
fn gc_is_incremental_and_bounded() {
    let mut h = small(4096);
    for i in 0..1000 {
        h.send(&syn(i));
    }
    h.advance(121);
    let buckets = h.ct.table().buckets();
    let mut reaped = 0;
    let mut steps = 0;
    while reaped < 1000 {
        reaped += h.ct.gc_step(h.now, 16);
        steps += 1;
        assert!(steps <= buckets / 16 + 1, "one pass reaps everything");
    }
    assert_eq!(h.ct.count(), 0);
    assert_eq!(h.ct.take_destroyed().len(), 1000);
}

fn udp_from(i: u32) -> Vec<u8> {
    let src = format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
    udp(&src, 5000, "192.0.2.1", 53, 8)
}

/// Seconds until the paced GC's next pass, after a pass that just ended.
fn next_pass_in(h: &H) -> f64 {
    let at = h.ct.table().gc_next_pass().expect("between passes");
    (at - h.now.0) as f64 / 1e9
}

#[test]
fn paced_gc_waits_the_average_timeout_at_most_a_minute() {
    // SYN_SENT entries (120 s) pull the average over 60 s: the next pass is a minute away,
    // and until then a call scans nothing.
    let mut h = small(4096);
    for i in 0..1000 {
        h.send(&syn(i));
    }
    let buckets = h.ct.table().buckets();
    assert_eq!(h.ct.gc_paced(h.now, buckets), 0);
    let wait = next_pass_in(&h);
    assert!((59.9..=60.0).contains(&wait), "{wait}");
    h.advance(59);
    let mut reaped = Vec::new();
    assert_eq!(h.ct.table().gc_paced(h.now.0, buckets, &mut reaped), 0);
    h.advance(2);
    assert_eq!(h.ct.table().gc_paced(h.now.0, 16, &mut reaped), 16);
}

#[test]
fn paced_gc_runs_as_often_as_short_timeouts_need() {
    // Unreplied UDP (30 s): 10k of them outweigh the initial 100 at 60 s.
    let mut h = small(1 << 15);
    for i in 0..10_000 {
        h.send(&udp_from(i));
    }
    let buckets = h.ct.table().buckets();
    h.ct.gc_paced(h.now, buckets);
    let wait = next_pass_in(&h);
    assert!((30.0..31.0).contains(&wait), "{wait}");
    // A few short entries among the initial bias barely move it (GC_SCAN_INITIAL_COUNT).
    let mut h = small(4096);
    for i in 0..3 {
        h.send(&udp_from(i));
    }
    h.ct.gc_paced(h.now, buckets);
    let wait = next_pass_in(&h);
    assert!(wait > 59.0, "{wait}");
}

#[test]
fn entries_the_paced_gc_has_not_reached_are_gone_for_lookups_and_listings() {
    let mut h = small(4096);
    for i in 0..100 {
        h.send(&syn(i));
    }
    let buckets = h.ct.table().buckets();
    h.ct.gc_paced(h.now, buckets);
    h.advance(1);
    for i in 1000..1010 {
        h.send(&udp_from(i));
    }
    h.advance(40);
    // The next pass is 20 s away: the expired UDP entries still count...
    assert_eq!(h.ct.gc_paced(h.now, buckets), 0);
    assert_eq!(h.ct.count(), 110);
    h.ct.take_destroyed();
    // ...but a listing leaves them out and reaps them, as ctnetlink's dump does.
    assert_eq!(h.ct.listed(h.now).len(), 100);
    assert_eq!(h.ct.count(), 100);
    assert_eq!(h.ct.take_destroyed().len(), 10);
    // A lookup meets an expired one as a new connection.
    h.advance(100);
    assert_eq!(info(&h.send(&syn(5))), Some(CtInfo::New));
}

#[test]
fn a_drop_for_lack_of_room_starts_a_paced_pass_at_once() {
    let mut h = full_of_assured_half_closing();
    let buckets = h.ct.table().buckets();
    h.ct.gc_paced(h.now, buckets);
    assert!(next_pass_in(&h) > 1.0);
    assert!(matches!(h.send(&syn(999_999)), Classified::Drop(_)));
    assert_eq!(h.ct.gc_paced(h.now, buckets), 32);
    assert_eq!(info(&h.send(&syn(999_999))), Some(CtInfo::New));
}

#[test]
fn tentative_entries_do_not_count_and_clash_resolves() {
    let mut h = small(64);
    let p = syn(1);
    let a = h.classify(&p);
    let b = h.classify(&p);
    let (Classified::Tracked(a), Classified::Tracked(b)) = (a, b) else {
        panic!()
    };
    assert_eq!(h.ct.count(), 0);
    assert!(matches!(
        h.ct.confirm(&a, h.ctx, h.now),
        keepstate::conntrack::Confirmed::Inserted
    ));
    assert!(matches!(
        h.ct.confirm(&b, h.ctx, h.now),
        keepstate::conntrack::Confirmed::Clash(_)
    ));
    assert!(matches!(
        h.ct.confirm(&a, h.ctx, h.now),
        keepstate::conntrack::Confirmed::Already
    ));
    assert_eq!(h.ct.count(), 1);
    let st = h.ct.stats()[0];
    assert_eq!((st.insert, st.clash_resolve), (1, 1));
}

#[test]
fn two_threads_share_one_table() {
    let ct = Arc::new(Tracker::new(CtConfig {
        cpus: 2,
        ..CtConfig::default()
    }));
    let now = Timestamp::from_secs(10);
    let threads: Vec<_> = (0..2)
        .map(|cpu| {
            let ct = ct.clone();
            std::thread::spawn(move || {
                let ctx = PktCtx {
                    hook: Hook::Prerouting,
                    cpu,
                };
                for i in 0..2000u32 {
                    // Both threads handle the same flows: one of each pair inserts.
                    let b = syn(i);
                    let Frame::Ip(p) = parse_ip(&b) else { panic!() };
                    if let Classified::Tracked(t) = ct.classify(&p, ctx, now) {
                        ct.confirm(&t, ctx, now);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(ct.count(), 2000);
    assert_eq!(ct.conns().len(), 2000);
    let st = ct.stats();
    assert_eq!(st.len(), 2);
    assert_eq!(st.iter().map(|s| s.insert).sum::<u64>(), 2000);
}

#[test]
fn conntrack_list_and_event_lines() {
    let mut t = Tcp::with(CtConfig {
        events: true,
        ..CtConfig::default()
    });
    let b = tcp(t.c, t.cport, t.s, t.sport, &Seg::new(SYN, 1000, 0));
    let Classified::Tracked(first) = t.h.send(&b) else {
        panic!()
    };
    let c = first.conn.clone();
    let opts = ShowOpts::default();
    assert_eq!(
        show::event_line(&c, first.events | EV_NEW, t.h.now, opts),
        "    [NEW] tcp      6 120 SYN_SENT src=10.0.0.1 dst=10.0.0.2 sport=40000 dport=80 [UNREPLIED] src=10.0.0.2 dst=10.0.0.1 sport=80 dport=40000"
    );
    let Classified::Tracked(r) = t.s2c(Seg::new(SYN | ACK, 5000, 1001)) else {
        panic!()
    };
    assert_eq!(
        show::event_line(&c, r.events, t.h.now, opts),
        " [UPDATE] tcp      6 60 SYN_RECV src=10.0.0.1 dst=10.0.0.2 sport=40000 dport=80 src=10.0.0.2 dst=10.0.0.1 sport=80 dport=40000"
    );
    let Classified::Tracked(r) = t.c2s(Seg::new(ACK, 1001, 5001)) else {
        panic!()
    };
    assert_ne!(r.events & keepstate::conntrack::EV_ASSURED, 0);
    assert_eq!(
        show::event_line(&c, r.events, t.h.now, opts),
        " [UPDATE] tcp      6 432000 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=40000 dport=80 src=10.0.0.2 dst=10.0.0.1 sport=80 dport=40000 [ASSURED]"
    );
    t.h.advance(18);
    assert_eq!(
        show::list_line(&c, t.h.now, opts),
        "tcp      6 431982 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=40000 dport=80 src=10.0.0.2 dst=10.0.0.1 sport=80 dport=40000 [ASSURED] mark=0 use=1"
    );
    // An event that did not change the state does not carry it (ctnetlink_conntrack_event
    // dumps the protocol info only with IPCT_PROTOINFO).
    assert_eq!(
        show::event_line(&c, keepstate::conntrack::EV_REPLY, t.h.now, opts),
        " [UPDATE] tcp      6 431982 src=10.0.0.1 dst=10.0.0.2 sport=40000 dport=80 src=10.0.0.2 dst=10.0.0.1 sport=80 dport=40000 [ASSURED]"
    );
    c.set_mark(7);
    let acct = ShowOpts {
        acct: true,
        timestamp: true,
        extended: false,
    };
    assert_eq!(
        show::list_line(&c, t.h.now, acct),
        "tcp      6 431982 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=40000 dport=80 packets=2 bytes=80 src=10.0.0.2 dst=10.0.0.1 sport=80 dport=40000 packets=1 bytes=40 [ASSURED] mark=7 delta-time=18 use=1"
    );
    assert_eq!(
        show::proc_line(&c, t.h.now, ShowOpts::default()),
        "ipv4     2 tcp      6 431982 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=40000 dport=80 src=10.0.0.2 dst=10.0.0.1 sport=80 dport=40000 [ASSURED] mark=7 use=2\n"
    );
    assert_eq!(
        show::event_line(&c, EV_DESTROY, t.h.now, acct),
        "[DESTROY] tcp      6 431982 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=40000 dport=80 packets=2 bytes=80 src=10.0.0.2 dst=10.0.0.1 sport=80 dport=40000 packets=1 bytes=40 [ASSURED] mark=7 delta-time=18"
    );
}

#[test]
fn udp_icmp_and_generic_lines() {
    let mut h = H::new();
    h.send(&udp("192.168.2.100", 57767, "192.168.2.1", 53, 10));
    let c = h.ct.conns().pop().unwrap();
    assert_eq!(
        show::event_line(&c, EV_NEW, h.now, ShowOpts::default()),
        "    [NEW] udp      17 30 src=192.168.2.100 dst=192.168.2.1 sport=57767 dport=53 [UNREPLIED] src=192.168.2.1 dst=192.168.2.100 sport=53 dport=57767"
    );
    let mut h = H::new();
    h.send(&echo("1.1.1.2", "1.1.1.1", 8, 32354, 1));
    let c = h.ct.conns().pop().unwrap();
    h.advance(27);
    assert_eq!(
        show::proc_line(&c, h.now, ShowOpts::default()),
        "ipv4     2 icmp     1 3 src=1.1.1.2 dst=1.1.1.1 type=8 code=0 id=32354 [UNREPLIED] src=1.1.1.1 dst=1.1.1.2 type=0 code=0 id=32354 mark=0 use=2\n"
    );
    let mut h = H::new();
    h.send(&ip_packet(
        "2001:db8::1",
        "2001:db8::2",
        50,
        vec![0; 8],
        None,
    ));
    let c = h.ct.conns().pop().unwrap();
    assert_eq!(
        show::list_line(&c, h.now, ShowOpts { extended: true, ..ShowOpts::default() }),
        "ipv6     10 unknown  50 600 src=2001:db8::1 dst=2001:db8::2 [UNREPLIED] src=2001:db8::2 dst=2001:db8::1 mark=0 use=1"
    );
}

#[test]
fn stats_lines_like_conntrack_s() {
    let mut h = H::new();
    h.send(&echo("10.0.0.1", "10.0.0.2", 0, 1, 1));
    h.send(&echo("10.0.0.1", "10.0.0.2", 8, 1, 1));
    h.send(&echo("10.0.0.2", "10.0.0.1", 0, 1, 1));
    assert_eq!(
        show::stats_lines(&h.ct.stats()),
        "cpu=0   \tfound=1 invalid=1 insert=1 insert_failed=0 drop=0 early_drop=0 error=0 search_restart=0 clash_resolve=0 chaintoolong=0 \n"
    );
}
