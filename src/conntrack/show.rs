//! Text renderings of connections and statistics, byte for byte as the Linux tools print them
//! (shared/reference/conntrack-output-formats.md): `conntrack -L` lines
//! (libnetfilter_conntrack `__snprintf_conntrack_default`), `conntrack -E` event lines,
//! `/proc/net/nf_conntrack` lines (kernel `ct_seq_show`) and `conntrack -S` lines.
//!
//! Owns formatting only: given a connection and `now`, a string. Must not change a
//! connection or read a clock.

use std::fmt::Write;

use super::conn::{Conn, Counter};
use super::proto::{Dir, ProtoState};
use super::tuple::{Tuple, IPPROTO_DCCP, IPPROTO_SCTP, IPPROTO_UDPLITE, L3};
use super::{status, CtStats, Timestamp, EV_DESTROY, EV_MARK, EV_NEW, EV_PROTOINFO};

/// What the listing includes, as the kernel sysctls and `conntrack -o` decide.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShowOpts {
    /// `nf_conntrack_acct`: print `packets= bytes=` after each tuple.
    pub acct: bool,
    /// `nf_conntrack_timestamp`: print `delta-time=`.
    pub timestamp: bool,
    /// `conntrack -o extended`: start with the layer-3 name and number.
    pub extended: bool,
}

/// The layer-4 protocol name libnetfilter_conntrack and the kernel print (`unknown` for the
/// generic tracker).
pub fn l4_name(proto: u8, l3: L3) -> &'static str {
    match proto {
        6 => "tcp",
        17 => "udp",
        1 if l3 == L3::V4 => "icmp",
        58 if l3 == L3::V6 => "icmpv6",
        IPPROTO_UDPLITE => "udplite",
        IPPROTO_SCTP => "sctp",
        IPPROTO_DCCP => "dccp",
        47 => "gre",
        _ => "unknown",
    }
}

fn l3_name(l3: L3) -> &'static str {
    match l3 {
        L3::V4 => "ipv4",
        L3::V6 => "ipv6",
    }
}

fn tuple(out: &mut String, t: &Tuple) {
    let _ = write!(out, "src={} dst={} ", t.src_ip(), t.dst_ip());
    if t.is_icmp() {
        let _ = write!(
            out,
            "type={} code={} id={} ",
            t.icmp_type(),
            t.icmp_code(),
            t.icmp_id()
        );
    } else if super::tuple::has_ports(t.proto) {
        let _ = write!(out, "sport={} dport={} ", t.sport(), t.dport());
    }
}

fn counter(out: &mut String, c: &Counter) {
    let _ = write!(out, "packets={} bytes={} ", c.packets, c.bytes);
}

fn state_name(conn: &Conn) -> Option<&'static str> {
    match conn.proto_state() {
        ProtoState::Tcp(t) => Some(t.state.name()),
        _ => None,
    }
}

fn flags_after_reply(out: &mut String, st: u32) {
    if st & status::HW_OFFLOAD != 0 {
        out.push_str("[HW_OFFLOAD] ");
    } else if st & status::OFFLOAD != 0 {
        out.push_str("[OFFLOAD] ");
    } else if st & status::ASSURED != 0 {
        out.push_str("[ASSURED] ");
    }
}

fn delta_secs(conn: &Conn, now: Timestamp) -> u64 {
    now.0.saturating_sub(conn.start().0) / 1_000_000_000
}

/// One `conntrack -L` line (no newline).
pub fn list_line(conn: &Conn, now: Timestamp, opts: ShowOpts) -> String {
    body(conn, now, opts, None)
}

/// One `conntrack -E` line for the event bits `events` (no newline): `[NEW]` if EV_NEW is
/// set, `[DESTROY]` if EV_DESTROY is, `[UPDATE]` otherwise.
pub fn event_line(conn: &Conn, events: u16, now: Timestamp, opts: ShowOpts) -> String {
    body(conn, now, opts, Some(events))
}

fn body(conn: &Conn, now: Timestamp, opts: ShowOpts, events: Option<u16>) -> String {
    let mut out = String::with_capacity(256);
    let o = conn.orig();
    let destroy = events.is_some_and(|e| e & EV_DESTROY != 0);
    if let Some(e) = events {
        let tag = if e & EV_NEW != 0 {
            "[NEW]"
        } else if destroy {
            "[DESTROY]"
        } else {
            "[UPDATE]"
        };
        let _ = write!(out, "{tag:>9} ");
    }
    if opts.extended {
        let _ = write!(out, "{:<8} {} ", l3_name(o.l3), o.l3 as u8);
    }
    let _ = write!(out, "{:<8} {} ", l4_name(o.proto, o.l3), o.proto);
    // ctnetlink_conntrack_event: a DESTROY carries the timeout only when some remains
    // (`ctnetlink_dump_timeout(skb, ct, true)`: an entry killed, not expired), and the
    // protocol state always; any other event carries the state only when it changed
    // (IPCT_PROTOINFO).
    let timeout = conn.timeout_secs(now);
    if !destroy || timeout > 0 {
        let _ = write!(out, "{timeout} ");
    }
    if events.is_none_or(|e| destroy || e & EV_PROTOINFO != 0) {
        if let Some(s) = state_name(conn) {
            let _ = write!(out, "{s} ");
        }
    }
    let st = conn.status();
    // Events carry counters only on DESTROY (ctnetlink_conntrack_event).
    let acct = opts.acct && (events.is_none() || destroy);
    let counters = conn.counters();
    tuple(&mut out, o);
    if acct {
        counter(&mut out, &counters[0]);
    }
    if st & status::SEEN_REPLY == 0 {
        out.push_str("[UNREPLIED] ");
    }
    tuple(&mut out, &conn.reply());
    if acct {
        counter(&mut out, &counters[1]);
    }
    flags_after_reply(&mut out, st);
    // ctnetlink_dump_mark: a full dump always has the mark; an event only when non-zero or
    // when the mark changed.
    let mark = conn.mark();
    if events.is_none() || mark != 0 || events.is_some_and(|e| e & EV_MARK != 0) {
        let _ = write!(out, "mark={mark} ");
    }
    if opts.timestamp && (events.is_none() || destroy) {
        let _ = write!(out, "delta-time={} ", delta_secs(conn, now));
    }
    if let Some(h) = conn.helper() {
        let _ = write!(out, "helper={} ", h.as_str());
    }
    if events.is_none() {
        out.push_str("use=1 ");
    }
    out.pop();
    out
}

/// One `/proc/net/nf_conntrack` line, newline included (`ct_seq_show`).
pub fn proc_line(conn: &Conn, now: Timestamp, opts: ShowOpts) -> String {
    let mut out = String::with_capacity(256);
    let o = conn.orig();
    let l4 = l4_name(o.proto, o.l3);
    let _ = write!(
        out,
        "{:<8} {} {:<8} {} ",
        l3_name(o.l3),
        o.l3 as u8,
        l4,
        o.proto
    );
    let st = conn.status();
    if st & status::OFFLOAD == 0 {
        let _ = write!(out, "{} ", conn.timeout_secs(now));
    }
    if let Some(s) = state_name(conn) {
        let _ = write!(out, "{s} ");
    }
    let counters = conn.counters();
    tuple(&mut out, o);
    if opts.acct {
        counter(&mut out, &counters[Dir::Original.index()]);
    }
    if st & status::SEEN_REPLY == 0 {
        out.push_str("[UNREPLIED] ");
    }
    tuple(&mut out, &conn.reply());
    if opts.acct {
        counter(&mut out, &counters[Dir::Reply.index()]);
    }
    flags_after_reply(&mut out, st);
    let _ = write!(out, "mark={} ", conn.mark());
    if opts.timestamp {
        let _ = write!(out, "delta-time={} ", delta_secs(conn, now));
    }
    // The reader holds a reference while printing, so an idle entry shows 2.
    out.push_str("use=2\n");
    out
}

/// `conntrack -S`: one line per worker, `cpu=%-4u\t` then `name=value ` for each counter
/// the kernel sends (CTA_STATS_FOUND .. CTA_STATS_CHAIN_TOOLONG), newline included.
pub fn stats_lines(stats: &[CtStats]) -> String {
    let mut out = String::new();
    for (cpu, s) in stats.iter().enumerate() {
        let _ = writeln!(
            out,
            "cpu={cpu:<4}\tfound={} invalid={} insert={} insert_failed={} drop={} early_drop={} error={} search_restart={} clash_resolve={} chaintoolong={} ",
            s.found,
            s.invalid,
            s.insert,
            s.insert_failed,
            s.drop,
            s.early_drop,
            s.error,
            s.search_restart,
            s.clash_resolve,
            s.chaintoolong
        );
    }
    out
}

/// `conntrack -C`: the number of entries.
pub fn count_line(count: usize) -> String {
    format!("{count}\n")
}

/// The summary `conntrack -L` prints to stderr.
pub fn list_summary(n: usize) -> String {
    format!("conntrack v1.4.8 (conntrack-tools): {n} flow entries have been shown.\n")
}
