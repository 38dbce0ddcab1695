//! TCP tracker behaviour through the public API with a fake clock: handshakes, simultaneous
//! open, teardown both ways, RST cases, retransmissions, windows, pickup, timeouts.

#[path = "common/ctkit.rs"]
#[allow(dead_code)]
mod ctkit;

use ctkit::*;
use keepstate::conntrack::{
    ct_state, status, Classified, CtConfig, CtInfo, InvalidReason, TcpState, Timeouts,
};

#[test]
fn three_way_handshake_states_timeouts_and_assured() {
    let mut t = Tcp::new();
    let c = t.c2s(Seg::new(SYN, 1000, 0));
    assert_eq!(c.ct_state(), ct_state::NEW);
    assert_eq!(t.state(), Some(TcpState::SynSent));
    assert_eq!(t.timeout(), 120);
    assert_eq!(t.status() & status::SEEN_REPLY, 0);

    let c = t.s2c(Seg::new(SYN | ACK, 5000, 1001));
    assert_eq!(c.ct_state(), ct_state::ESTABLISHED);
    assert_eq!(c.ct_direction(), Some(keepstate::conntrack::Dir::Reply));
    assert_eq!(t.state(), Some(TcpState::SynRecv));
    assert_eq!(t.timeout(), 60);
    assert_ne!(t.status() & status::SEEN_REPLY, 0);
    assert_eq!(t.status() & status::ASSURED, 0);

    t.c2s(Seg::new(ACK, 1001, 5001));
    assert_eq!(t.state(), Some(TcpState::Established));
    assert_eq!(t.timeout(), 432_000);
    assert_ne!(t.status() & status::ASSURED, 0);

    // Data both ways; unacked data caps the timeout at UNACK (300), the ACK lifts it.
    t.c2s(Seg::new(ACK | PSH, 1001, 5001).len(100));
    assert_eq!(t.timeout(), 300);
    t.s2c(Seg::new(ACK, 5001, 1101));
    assert_eq!(t.timeout(), 432_000);
    let [o, r] = t.conn().unwrap().counters();
    assert_eq!((o.packets, r.packets), (3, 2));
    assert_eq!(o.bytes, 40 + 40 + 140);
}

#[test]
fn first_packet_dropped_by_rules_leaves_no_entry() {
    let mut t = Tcp::new();
    let b = tcp(t.c, t.cport, t.s, t.sport, &Seg::new(SYN, 1000, 0));
    let c = t.h.classify(&b);
    match &c {
        Classified::Tracked(tr) => assert!(tr.is_tentative()),
        other => panic!("{other:?}"),
    }
    assert_eq!(t.h.ct.count(), 0);
    // The next SYN is NEW again.
    assert_eq!(info(&t.c2s(Seg::new(SYN, 1000, 0))), Some(CtInfo::New));
    assert_eq!(t.h.ct.count(), 1);
}

#[test]
fn syn_retransmission_does_not_refresh_and_stays_new() {
    let mut t = Tcp::new();
    t.c2s(Seg::new(SYN, 1000, 0));
    t.h.advance(50);
    assert_eq!(t.timeout(), 70);
    let c = t.c2s(Seg::new(SYN, 1000, 0));
    assert_eq!(info(&c), Some(CtInfo::New));
    assert_eq!(t.timeout(), 70);
    t.h.advance(70);
    // Expired: the lookup reaps it, and the next SYN makes a fresh entry.
    assert_eq!(info(&t.c2s(Seg::new(SYN, 7000, 0))), Some(CtInfo::New));
    assert_eq!(t.timeout(), 120);
}

#[test]
fn invalid_flag_combinations_and_invalid_new() {
    let mut t = Tcp::new();
    for f in [0, FIN, SYN | FIN, SYN | RST, PSH] {
        let c = t.c2s(Seg::new(f, 1, 0));
        assert!(
            matches!(c, Classified::Invalid(InvalidReason::TcpFlags)),
            "{f:#x}"
        );
    }
    for f in [RST, RST | ACK, SYN | ACK, FIN | ACK] {
        let c = t.c2s(Seg::new(f, 1, 1));
        assert!(
            matches!(c, Classified::Invalid(InvalidReason::TcpInvalidNew)),
            "{f:#x}: {c:?}"
        );
    }
    assert_eq!(t.h.ct.count(), 0);
    let st = t.h.ct.stats();
    assert_eq!(st[0].invalid, 9);
}

#[test]
fn bad_checksum_is_invalid_at_prerouting_only() {
    let mut t = Tcp::new();
    let mut b = tcp(t.c, t.cport, t.s, t.sport, &Seg::new(SYN, 1000, 0));
    b[20 + 16] ^= 0xff;
    assert!(matches!(
        t.h.send(&b),
        Classified::Invalid(InvalidReason::Checksum(_))
    ));
    t.h.ctx.hook = keepstate::conntrack::Hook::Output;
    assert_eq!(info(&t.h.send(&b)), Some(CtInfo::New));
}

#[test]
fn loose_pickup_and_assured_after_answer() {
    let mut t = Tcp::new();
    let c = t.c2s(Seg::new(ACK, 1000, 5000).len(10));
    assert_eq!(info(&c), Some(CtInfo::New));
    assert_eq!(t.state(), Some(TcpState::Established));
    // ESTABLISHED without a reply is capped at UNACK.
    assert_eq!(t.timeout(), 300);
    t.s2c(Seg::new(ACK, 5000, 1010));
    assert_ne!(t.status() & status::SEEN_REPLY, 0);
    assert_eq!(t.status() & status::ASSURED, 0);
    t.c2s(Seg::new(ACK, 1010, 5000));
    assert_ne!(t.status() & status::ASSURED, 0);
    assert_eq!(t.timeout(), 432_000);

    // With tcp_loose off, mid-stream packets are invalid.
    let mut t = Tcp::with(CtConfig {
        tcp_loose: false,
        ..CtConfig::default()
    });
    assert!(is_invalid(&t.c2s(Seg::new(ACK, 1000, 5000))));
}

#[test]
fn picked_up_connection_is_liberal_about_windows() {
    let mut t = Tcp::new();
    t.c2s(Seg::new(ACK, 1000, 5000));
    t.s2c(Seg::new(ACK, 5000, 1000));
    // Far outside any window: accepted because both directions are BE_LIBERAL.
    let c = t.c2s(Seg::new(ACK, 1000 + 10_000_000, 5000));
    assert_eq!(info(&c), Some(CtInfo::Established));
}

#[test]
fn simultaneous_open() {
    let mut t = Tcp::new();
    t.c2s(Seg::new(SYN, 1000, 0));
    // The "server" also sends a SYN: SYN_SENT2.
    let c = t.s2c(Seg::new(SYN, 5000, 0));
    assert_eq!(info(&c), Some(CtInfo::EstablishedReply));
    assert_eq!(t.state(), Some(TcpState::SynSent2));
    assert_eq!(t.timeout(), 120);
    // Client answers with SYN/ACK: SYN_RECV.
    t.c2s(Seg::new(SYN | ACK, 1000, 5001));
    assert_eq!(t.state(), Some(TcpState::SynRecv));
    // Reply ACK with the simultaneous-open flag: ESTABLISHED.
    t.s2c(Seg::new(SYN | ACK, 5000, 1001));
    t.s2c(Seg::new(ACK, 5001, 1001));
    assert_eq!(t.state(), Some(TcpState::Established));
}

#[test]
fn teardown_client_first() {
    let mut t = Tcp::new();
    t.handshake();
    t.c2s(Seg::new(FIN | ACK, 1001, 5001));
    assert_eq!(t.state(), Some(TcpState::FinWait));
    assert_eq!(t.timeout(), 120);
    t.s2c(Seg::new(ACK, 5001, 1002));
    assert_eq!(t.state(), Some(TcpState::CloseWait));
    assert_eq!(t.timeout(), 60);
    t.s2c(Seg::new(FIN | ACK, 5001, 1002));
    assert_eq!(t.state(), Some(TcpState::LastAck));
    assert_eq!(t.timeout(), 30);
    t.c2s(Seg::new(ACK, 1002, 5002));
    assert_eq!(t.state(), Some(TcpState::TimeWait));
    assert_eq!(t.timeout(), 120);
    t.h.advance(119);
    assert_eq!(t.h.ct.gc_step(t.h.now, usize::MAX), 0);
    t.h.advance(1);
    assert_eq!(t.h.ct.gc_step(t.h.now, usize::MAX), 1);
    assert_eq!(t.h.ct.count(), 0);
}

#[test]
fn teardown_server_first() {
    let mut t = Tcp::new();
    t.handshake();
    t.s2c(Seg::new(FIN | ACK, 5001, 1001));
    assert_eq!(t.state(), Some(TcpState::FinWait));
    t.c2s(Seg::new(FIN | ACK, 1001, 5002));
    assert_eq!(t.state(), Some(TcpState::LastAck));
    t.s2c(Seg::new(ACK, 5002, 1002));
    assert_eq!(t.state(), Some(TcpState::TimeWait));
}

#[test]
fn rst_in_established_at_maxack_closes() {
    let mut t = Tcp::new();
    t.handshake();
    let c = t.s2c(Seg::new(RST, 5001, 0));
    assert_eq!(info(&c), Some(CtInfo::EstablishedReply));
    assert_eq!(t.state(), Some(TcpState::Close));
    assert_eq!(t.timeout(), 10);
    t.h.advance(10);
    t.h.ct.gc_step(t.h.now, usize::MAX);
    assert_eq!(t.h.ct.count(), 0);
}

#[test]
fn rst_not_at_maxack_keeps_established_for_challenge_ack() {
    let mut t = Tcp::new();
    t.handshake();
    t.c2s(Seg::new(ACK | PSH, 1001, 5001).len(100));
    t.s2c(Seg::new(ACK, 5001, 1101));
    // Client RST inside the window but not at the server's max ack (1101).
    let c = t.c2s(Seg::new(RST, 1050 + 100, 0));
    assert_eq!(info(&c), Some(CtInfo::Established));
    assert_eq!(t.state(), Some(TcpState::Established));
    // RST before the peer's max ack is INVALID.
    let c = t.c2s(Seg::new(RST, 1050, 0));
    assert!(matches!(
        c,
        Classified::Invalid(InvalidReason::TcpInvalidRst)
    ));
    // ... unless tcp_ignore_invalid_rst.
    let mut t = Tcp::with(CtConfig {
        tcp_ignore_invalid_rst: true,
        ..CtConfig::default()
    });
    t.handshake();
    t.c2s(Seg::new(ACK | PSH, 1001, 5001).len(100));
    t.s2c(Seg::new(ACK, 5001, 1101));
    assert!(!is_invalid(&t.c2s(Seg::new(RST, 1050, 0))));
}

#[test]
fn rst_answering_syn_deletes_unreplied_entry() {
    let mut t = Tcp::new();
    t.c2s(Seg::new(SYN, 1000, 0));
    // The server refuses: RST|ACK with ack = ISN+1. Without SEEN_REPLY the entry goes at once.
    let c = t.s2c(Seg::new(RST | ACK, 0, 1001));
    assert_eq!(info(&c), Some(CtInfo::EstablishedReply));
    assert_eq!(t.h.ct.count(), 0);
}

#[test]
fn rst_in_closing_state_skips_window_check() {
    let mut t = Tcp::new();
    t.handshake();
    t.c2s(Seg::new(FIN | ACK, 1001, 5001));
    // Way out of window, but FIN_WAIT may be dropped early: accepted.
    let c = t.s2c(Seg::new(RST, 99_999_999, 0));
    assert!(!is_invalid(&c));
    assert_eq!(t.state(), Some(TcpState::Close));
}

#[test]
fn reopen_from_time_wait_after_close_init() {
    let mut t = Tcp::new();
    t.handshake();
    t.c2s(Seg::new(FIN | ACK, 1001, 5001));
    t.s2c(Seg::new(FIN | ACK, 5001, 1002));
    t.c2s(Seg::new(ACK, 1002, 5002));
    assert_eq!(t.state(), Some(TcpState::TimeWait));
    let old = t.conn().unwrap();
    // A new SYN on the same tuple: the old entry is killed and the SYN makes a new one.
    let c = t.c2s(Seg::new(SYN, 90_000, 0));
    assert_eq!(info(&c), Some(CtInfo::New));
    let new = t.conn().unwrap();
    assert!(!std::sync::Arc::ptr_eq(&old, &new));
    assert_eq!(t.state(), Some(TcpState::SynSent));
    assert_eq!(t.status() & status::SEEN_REPLY, 0);
}

#[test]
fn syn_in_established_is_ignored_then_resynced_by_synack() {
    let mut t = Tcp::new();
    t.handshake();
    // The client restarted: a new SYN in ESTABLISHED is IGNOREd (accepted, state kept).
    let c = t.c2s(Seg::new(SYN, 777_000, 0).opts(&[3, 3, 7, 1]));
    assert_eq!(info(&c), Some(CtInfo::Established));
    assert_eq!(t.state(), Some(TcpState::Established));
    // The server answers it with a SYN/ACK acking the ignored SYN: resync to SYN_RECV.
    let c = t.s2c(Seg::new(SYN | ACK, 888_000, 777_001));
    assert!(!is_invalid(&c));
    assert_eq!(t.state(), Some(TcpState::SynRecv));
    t.c2s(Seg::new(ACK, 777_001, 888_001));
    assert_eq!(t.state(), Some(TcpState::Established));
}

#[test]
fn ignored_packets_are_not_counted() {
    let mut t = Tcp::new();
    t.handshake();
    let before = t.conn().unwrap().counters();
    t.c2s(Seg::new(SYN, 777_000, 0));
    assert_eq!(t.conn().unwrap().counters(), before);
}

#[test]
fn invalid_transitions() {
    let mut t = Tcp::new();
    t.c2s(Seg::new(SYN, 1000, 0));
    // ORIGINAL SYN/ACK in SYN_SENT: sIV.
    let c = t.c2s(Seg::new(SYN | ACK, 1000, 1));
    assert!(matches!(
        c,
        Classified::Invalid(InvalidReason::TcpInvalidState {
            state: TcpState::SynSent,
            ..
        })
    ));
    // ORIGINAL ACK in SYN_SENT: sIV.
    assert!(is_invalid(&t.c2s(Seg::new(ACK, 1001, 1))));
    // REPLY FIN in SYN_SENT: sIV.
    assert!(is_invalid(&t.s2c(Seg::new(FIN | ACK, 1, 1001))));
    assert_eq!(t.state(), Some(TcpState::SynSent));
}

#[test]
fn reply_ack_in_syn_sent_is_ignored_challenge_then_rst() {
    let mut t = Tcp::new();
    t.c2s(Seg::new(SYN, 1000, 0));
    // Server has a stale connection: sends a challenge ACK (REPLY ack in SYN_SENT: sIG).
    let c = t.s2c(Seg::new(ACK, 4242, 77));
    assert!(!is_invalid(&c));
    assert_eq!(t.state(), Some(TcpState::SynSent));
    // Client answers with RST seq = the challenge's ack: accepted without window check.
    let c = t.c2s(Seg::new(RST, 77, 0));
    assert!(!is_invalid(&c));
}

#[test]
fn out_of_window_segments() {
    let mut t = Tcp::new();
    t.c2s(Seg::new(SYN, 1000, 0).win(1000));
    t.s2c(Seg::new(SYN | ACK, 5000, 1001).win(1000));
    t.c2s(Seg::new(ACK, 1001, 5001).win(1000));
    // I: seq far above the receiver's window: INVALID.
    let c = t.c2s(Seg::new(ACK, 1001 + 100_000, 5001).win(1000));
    assert!(matches!(
        c,
        Classified::Invalid(InvalidReason::TcpSeqOverUpperBound)
    ));
    // III: acking data never sent: INVALID.
    let c = t.c2s(Seg::new(ACK, 1001, 5001 + 100_000).win(1000));
    assert!(matches!(
        c,
        Classified::Invalid(InvalidReason::TcpAckOverUpperBound)
    ));
    // II: old data retransmitted far below the window: IGNORE (accepted, not counted).
    let before = t.conn().unwrap().counters();
    let c = t.c2s(Seg::new(ACK, 1001u32.wrapping_sub(50_000), 5001).win(1000));
    assert_eq!(info(&c), Some(CtInfo::Established));
    assert_eq!(t.conn().unwrap().counters(), before);
    // Check I looks at the segment's start only: 1200 bytes at the window's start pass.
    let c = t.c2s(Seg::new(ACK | PSH, 1001, 5001).win(1000).len(1200));
    assert_eq!(info(&c), Some(CtInfo::Established));
    assert_eq!(
        t.conn().unwrap().counters()[0].packets,
        before[0].packets + 1
    );
    // Starting past the receiver's window by less than its size: IGNORE ("bytes more
    // than expected"), accepted but not counted.
    let before = t.conn().unwrap().counters();
    let c = t.c2s(Seg::new(ACK | PSH, 2300, 5001).win(1000).len(10));
    assert_eq!(info(&c), Some(CtInfo::Established));
    assert_eq!(t.conn().unwrap().counters(), before);
    // With be_liberal every window complaint is accepted.
    let mut t = Tcp::with(CtConfig {
        tcp_be_liberal: true,
        ..CtConfig::default()
    });
    t.c2s(Seg::new(SYN, 1000, 0).win(1000));
    t.s2c(Seg::new(SYN | ACK, 5000, 1001).win(1000));
    t.c2s(Seg::new(ACK, 1001, 5001).win(1000));
    assert!(!is_invalid(&t.c2s(Seg::new(ACK, 1001 + 100_000, 5001))));
}

#[test]
fn window_scaling_negotiated_by_both() {
    let mut t = Tcp::new();
    // Both sides offer wscale 7; the third ACK's window is scaled.
    t.c2s(Seg::new(SYN, 1000, 0).win(100).opts(&[3, 3, 7, 1]));
    t.s2c(Seg::new(SYN | ACK, 5000, 1001).win(100).opts(&[3, 3, 7, 1]));
    t.c2s(Seg::new(ACK, 1001, 5001).win(100));
    // The server may now send up to 100 << 7 = 12800 bytes beyond 5001.
    let c = t.s2c(Seg::new(ACK | PSH, 17_000, 1001).win(100).len(1));
    assert_eq!(info(&c), Some(CtInfo::EstablishedReply));
    let [_, r] = t.conn().unwrap().counters();
    assert_eq!(r.packets, 2);

    // Only one side offers it: no scaling, the same segment overshoots.
    let mut t = Tcp::new();
    t.c2s(Seg::new(SYN, 1000, 0).win(100).opts(&[3, 3, 7, 1]));
    t.s2c(Seg::new(SYN | ACK, 5000, 1001).win(100));
    t.c2s(Seg::new(ACK, 1001, 5001).win(100));
    let c = t.s2c(Seg::new(ACK | PSH, 17_000, 1001).win(100).len(1));
    assert!(matches!(
        c,
        Classified::Invalid(InvalidReason::TcpSeqOverUpperBound)
    ));
}

#[test]
fn retransmissions_lower_timeout_to_max_retrans() {
    let mut t = Tcp::new();
    t.handshake();
    // The same data segment four times with no answer: retrans reaches 3.
    for _ in 0..4 {
        t.c2s(Seg::new(ACK | PSH, 1001, 5001).len(10));
    }
    assert_eq!(t.timeout(), 300);
    // With a longer UNACK timeout, RETRANS wins over it and ESTABLISHED.
    let to = Timeouts {
        tcp_unacknowledged: 1000,
        tcp_max_retrans: 200,
        ..Timeouts::default()
    };
    let mut t = Tcp::with(CtConfig {
        timeouts: to,
        ..CtConfig::default()
    });
    t.handshake();
    t.c2s(Seg::new(ACK | PSH, 1001, 5001).len(10));
    assert_eq!(t.timeout(), 1000);
    for _ in 0..3 {
        t.c2s(Seg::new(ACK | PSH, 1001, 5001).len(10));
    }
    assert_eq!(t.timeout(), 200);
    // The ACK resets the counter.
    t.s2c(Seg::new(ACK, 5001, 1011));
    assert_eq!(t.timeout(), 432_000);
}

#[test]
fn zero_window_uses_retrans_timeout() {
    let mut t = Tcp::new();
    t.handshake();
    t.s2c(Seg::new(ACK, 5001, 1001).win(0));
    assert_eq!(t.timeout(), 300);
}

#[test]
fn every_tcp_state_timeout_is_configurable() {
    let mut to = Timeouts::default();
    for (name, v) in [
        ("nf_conntrack_tcp_timeout_syn_sent", 11),
        ("nf_conntrack_tcp_timeout_syn_recv", 12),
        ("nf_conntrack_tcp_timeout_established", 13),
        ("nf_conntrack_tcp_timeout_fin_wait", 14),
        ("nf_conntrack_tcp_timeout_close_wait", 15),
        ("nf_conntrack_tcp_timeout_last_ack", 16),
        ("nf_conntrack_tcp_timeout_time_wait", 17),
        ("nf_conntrack_tcp_timeout_close", 18),
    ] {
        to.set(name, v).unwrap();
    }
    assert!(to.set("nf_conntrack_tcp_timeout_bogus", 1).is_err());
    let mut t = Tcp::with(CtConfig {
        timeouts: to,
        ..CtConfig::default()
    });
    t.c2s(Seg::new(SYN, 1000, 0));
    assert_eq!(t.timeout(), 11);
    t.s2c(Seg::new(SYN | ACK, 5000, 1001));
    assert_eq!(t.timeout(), 12);
    t.c2s(Seg::new(ACK, 1001, 5001));
    assert_eq!(t.timeout(), 13);
    t.c2s(Seg::new(FIN | ACK, 1001, 5001));
    assert_eq!(t.timeout(), 14);
    t.s2c(Seg::new(ACK, 5001, 1002));
    assert_eq!(t.timeout(), 15);
    t.s2c(Seg::new(FIN | ACK, 5001, 1002));
    assert_eq!(t.timeout(), 16);
    t.c2s(Seg::new(ACK, 1002, 5002));
    assert_eq!(t.timeout(), 17);
    t.c2s(Seg::new(RST, 1002, 0));
    assert_eq!(t.timeout(), 18);
}

#[test]
fn assured_established_out_of_window_fin_both_ways_cuts_timeout() {
    let mut t = Tcp::new();
    t.handshake();
    assert_eq!(t.timeout(), 432_000);
    // Out-of-window FIN from the client (INVALID), then from the server.
    assert!(is_invalid(&t.c2s(Seg::new(
        FIN | ACK,
        1001 + 1_000_000,
        5001
    ))));
    assert_eq!(t.timeout(), 432_000);
    assert!(is_invalid(&t.s2c(Seg::new(
        FIN | ACK,
        5001 + 1_000_000,
        1001
    ))));
    assert_eq!(t.timeout(), 300);
}

#[test]
fn ipv6_handshake() {
    let mut t = Tcp::v6();
    t.handshake();
    assert_eq!(t.state(), Some(TcpState::Established));
    assert_ne!(t.status() & status::ASSURED, 0);
}

#[test]
fn sack_blocks_extend_the_ack_check() {
    let mut t = Tcp::new();
    t.c2s(Seg::new(SYN, 1000, 0).opts(&[4, 2]));
    t.s2c(Seg::new(SYN | ACK, 5000, 1001).opts(&[4, 2]));
    t.c2s(Seg::new(ACK, 1001, 5001));
    t.s2c(Seg::new(ACK | PSH, 5001, 1001).len(100));
    t.s2c(Seg::new(ACK | PSH, 5101, 1001).len(100));
    // A SACK block acking data past what the server sent is III-invalid.
    let sack = |right: u32| {
        let mut o = vec![1, 1, 5, 10];
        o.extend_from_slice(&5101u32.to_be_bytes());
        o.extend_from_slice(&right.to_be_bytes());
        o
    };
    assert!(!is_invalid(
        &t.c2s(Seg::new(ACK, 1001, 5001).opts(&sack(5201)))
    ));
    assert!(is_invalid(
        &t.c2s(Seg::new(ACK, 1001, 5001).opts(&sack(9999)))
    ));
}
