//! The UDP tracker (`nf_conntrack_udp_packet`): 30 s until a reply is seen, then a stream
//! (120 s and ASSURED) once a packet arrives more than 2 s after the entry was created.
//!
//! Owns the UDP timeout choice and when ASSURED is set. Header and length checks
//! (`udp_error`) are done by the packet parser and the tracker's checksum step. Must not touch
//! the table, the clock or rules.

use super::L4Verdict;
use crate::conntrack::{status, CtConfig, EV_ASSURED};

/// `stream_ts = jiffies + 2 * HZ` at creation.
pub const STREAM_DELAY_NS: u64 = 2_000_000_000;

/// The `stream_ts` of an entry created at `now`.
pub fn udp_new(now: u64) -> u64 {
    now + STREAM_DELAY_NS
}

/// `nf_conntrack_udp_packet`. `ct_status` is read before this packet (so the packet that
/// brings the first reply still refreshes with the unreplied timeout).
pub fn udp_packet(
    stream_ts: u64,
    ct_status: u32,
    now: u64,
    cfg: &CtConfig,
    events: &mut u16,
) -> L4Verdict {
    let t = &cfg.timeouts;
    if ct_status & status::SEEN_REPLY != 0 {
        let mut timeout = t.udp;
        let mut stream = false;
        // Still active after two seconds? A stream (time_after: strictly later).
        if now > stream_ts {
            timeout = t.udp_stream;
            stream = ct_status & status::ASSURED == 0;
        }
        // Never ASSURED for NAT clash entries: they time out soon.
        if stream && ct_status & status::NAT_CLASH == 0 {
            *events |= EV_ASSURED;
        }
        L4Verdict::Accept { timeout }
    } else {
        L4Verdict::Accept { timeout: t.udp }
    }
}
