//! The TCP tracker: the kernel's state machine and window tracking, transcribed from
//! `net/netfilter/nf_conntrack_proto_tcp.c` (Linux 6.13+, see shared/reference).
//!
//! Owns `tcp_conntracks[2][6][10]`, `tcp_error` (flag combinations), `tcp_new` (SYN or loose
//! pickup), `nf_conntrack_tcp_packet` (IGNORE and its SYN/ACK resync, TIME_WAIT/CLOSE reopen,
//! RST acceptance, RFC 5961 challenge ACK, simultaneous open), `tcp_in_window` (Rooij's
//! algorithm with the kernel's tolerances and `be_liberal`), retransmission counting and the
//! per-state timeout choice. Must not touch the table, the clock or rules: the caller passes
//! the connection's status bits and remaining lifetime and applies the [`L4Verdict`].
//!
//! A NAT helper that resized a payload shifts the sequence numbers the peer acknowledges: the
//! caller passes that shift (`nf_ct_seq_offset`, [`TcpCtx::receiver_offset`]) and the window
//! checks take it off the ACK and SACK.

use super::{Dir, L4Verdict};
use crate::conntrack::{status, CtConfig, InvalidReason, Timeouts, EV_ASSURED, EV_PROTOINFO};
use crate::packet::{tcp_flags, TcpOptions, TcpView};

/// `enum tcp_conntrack`. `Max` (sIV) and `Ignore` (sIG) appear only as table results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(u8)]
pub enum TcpState {
    #[default]
    None = 0,
    SynSent = 1,
    SynRecv = 2,
    Established = 3,
    FinWait = 4,
    CloseWait = 5,
    LastAck = 6,
    TimeWait = 7,
    Close = 8,
    SynSent2 = 9,
    /// `TCP_CONNTRACK_MAX`: the packet is invalid in this state.
    Max = 10,
    /// `TCP_CONNTRACK_IGNORE`: let the packet through without changing state.
    Ignore = 11,
}

impl TcpState {
    /// `tcp_conntrack_names[]`, as /proc and `conntrack -L` print them.
    pub fn name(self) -> &'static str {
        match self {
            TcpState::None => "NONE",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::SynSent2 => "SYN_SENT2",
            TcpState::Max => "INVALID",
            TcpState::Ignore => "IGNORE",
        }
    }
}

/// Flag index into the table (`get_conntrack_index`): rst beats syn/synack, which beats fin,
/// which beats ack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TcpIndex {
    Syn = 0,
    SynAck = 1,
    Fin = 2,
    Ack = 3,
    Rst = 4,
    None = 5,
}

pub fn conntrack_index(flags: u8) -> TcpIndex {
    if flags & tcp_flags::RST != 0 {
        TcpIndex::Rst
    } else if flags & tcp_flags::SYN != 0 {
        if flags & tcp_flags::ACK != 0 {
            TcpIndex::SynAck
        } else {
            TcpIndex::Syn
        }
    } else if flags & tcp_flags::FIN != 0 {
        TcpIndex::Fin
    } else if flags & tcp_flags::ACK != 0 {
        TcpIndex::Ack
    } else {
        TcpIndex::None
    }
}

use TcpState as S;
const SS: S = S::SynSent;
const SR: S = S::SynRecv;
const ES: S = S::Established;
const FW: S = S::FinWait;
const CW: S = S::CloseWait;
const LA: S = S::LastAck;
const TW: S = S::TimeWait;
const CL: S = S::Close;
const S2: S = S::SynSent2;
const IV: S = S::Max;
const IG: S = S::Ignore;

/// `tcp_conntracks[dir][index][old_state]`, Linux 6.13+ (checked in tests against
/// shared/reference/tcp_conntracks.json). Columns: NO SS SR ES FW CW LA TW CL S2.
pub static TCP_CONNTRACKS: [[[TcpState; 10]; 6]; 2] = [
    // ORIGINAL
    [
        /* syn    */ [SS, SS, IG, IG, IG, IG, IG, SS, SS, S2],
        /* synack */ [IV, IV, SR, IV, IV, IV, IV, IV, IV, SR],
        /* fin    */ [IV, IV, FW, FW, LA, LA, LA, TW, CL, IV],
        /* ack    */ [ES, IV, ES, ES, CW, CW, TW, TW, CL, IV],
        /* rst    */ [IV, CL, CL, CL, CL, CL, CL, CL, CL, CL],
        /* none   */ [IV, IV, IV, IV, IV, IV, IV, IV, IV, IV],
    ],
    // REPLY
    [
        /* syn    */ [IV, S2, IV, IV, IV, IV, IV, SS, IV, S2],
        /* synack */ [IV, SR, IG, IG, IG, IG, IG, IG, IG, SR],
        /* fin    */ [IV, IV, FW, FW, LA, LA, LA, TW, CL, IV],
        /* ack    */ [IV, IG, SR, ES, CW, CW, TW, TW, CL, IG],
        /* rst    */ [IV, CL, CL, CL, CL, CL, CL, CL, CL, CL],
        /* none   */ [IV, IV, IV, IV, IV, IV, IV, IV, IV, IV],
    ],
];

/// Per-direction flags (`IP_CT_TCP_FLAG_*`).
pub mod flag {
    pub const WINDOW_SCALE: u8 = 0x01;
    pub const SACK_PERM: u8 = 0x02;
    pub const CLOSE_INIT: u8 = 0x04;
    pub const BE_LIBERAL: u8 = 0x08;
    pub const DATA_UNACKNOWLEDGED: u8 = 0x10;
    pub const MAXACK_SET: u8 = 0x20;
    /// `IP_CT_EXP_CHALLENGE_ACK` (kept in `last_flags`).
    pub const EXP_CHALLENGE_ACK: u8 = 0x40;
    /// `IP_CT_TCP_SIMULTANEOUS_OPEN` (kept in `last_flags`).
    pub const SIMULTANEOUS_OPEN: u8 = 0x80;
}

/// `TCP_MAX_WSCALE`.
const TCP_MAX_WSCALE: u8 = 14;
/// `MAXACKWINCONST`.
const MAXACKWINCONST: u32 = 66000;

/// `struct ip_ct_tcp_state`: what one direction has sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpDir {
    /// max of seq + len
    pub td_end: u32,
    /// max of ack + max(win, 1)
    pub td_maxend: u32,
    /// max(win)
    pub td_maxwin: u32,
    /// max of ack
    pub td_maxack: u32,
    pub td_scale: u8,
    pub flags: u8,
}

/// `struct ip_ct_tcp`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpConn {
    pub seen: [TcpDir; 2],
    pub state: TcpState,
    pub last_dir: u8,
    pub last_index: u8,
    pub retrans: u8,
    pub last_wscale: u8,
    pub last_flags: u8,
    pub last_win: u16,
    pub last_seq: u32,
    pub last_ack: u32,
    pub last_end: u32,
}

fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}
fn after(a: u32, b: u32) -> bool {
    before(b, a)
}
fn maxackwindow(sender: &TcpDir) -> u32 {
    sender.td_maxwin.max(MAXACKWINCONST)
}

/// `tcp_options`: the window scale and SACK-permitted flags of a SYN. With no options at all
/// the direction keeps what it had, as the kernel's early return does.
fn tcp_options(opts: &[u8], state: &mut TcpDir) {
    if opts.is_empty() {
        return;
    }
    state.td_scale = 0;
    state.flags &= flag::BE_LIBERAL;
    let o = TcpOptions::parse(opts);
    if o.sack_permitted {
        state.flags |= flag::SACK_PERM;
    }
    if let Some(ws) = o.window_scale {
        state.td_scale = ws.min(TCP_MAX_WSCALE);
        state.flags |= flag::WINDOW_SCALE;
    }
}

/// `tcp_sack`: raises `sack` to the highest right edge of the first SACK option.
fn tcp_sack(opts: &[u8], sack: &mut u32) {
    // Fast path for the timestamp-only option: NOP NOP TS(10).
    if opts.len() == 12 && opts[..4] == [1, 1, 8, 10] {
        return;
    }
    let mut i = 0usize;
    while i < opts.len() {
        let kind = opts[i];
        match kind {
            0 => return,
            1 => {
                i += 1;
                continue;
            }
            _ => {}
        }
        let Some(&len) = opts.get(i + 1) else { return };
        let len = usize::from(len);
        if len < 2 || len > opts.len() - i {
            return;
        }
        if kind == 5 && len >= 10 && (len - 2) % 8 == 0 {
            for block in opts[i + 2..i + len].chunks_exact(8) {
                let right = u32::from_be_bytes([block[4], block[5], block[6], block[7]]);
                if after(right, *sack) {
                    *sack = right;
                }
            }
            return;
        }
        i += len;
    }
}

/// `tcp_valid_flags`: the flag combinations that are valid once ECE, CWR and PSH are masked.
pub fn tcp_flags_valid(flags: u8) -> bool {
    use tcp_flags::*;
    let f = flags & !(ECE | CWR | PSH);
    matches!(
        f,
        x if x == SYN
            || x == SYN | URG
            || x == SYN | ACK
            || x == RST
            || x == RST | ACK
            || x == FIN | ACK
            || x == FIN | ACK | URG
            || x == ACK
            || x == ACK | URG
    )
}

/// `tcp_new`: the state of a connection created by `th`, or `None` ("invalid new", or a
/// mid-stream packet with `tcp_loose` off).
pub fn tcp_new(th: &TcpView<'_>, cfg: &CtConfig) -> Option<TcpConn> {
    let new_state = TCP_CONNTRACKS[0][conntrack_index(th.flags) as usize][0];
    if new_state >= S::Max {
        return None;
    }
    let mut ct = TcpConn::default();
    let s = &mut ct.seen[0];
    s.td_end = th.end();
    s.td_maxwin = u32::from(th.window).max(1);
    if new_state == S::SynSent {
        s.td_maxend = s.td_end;
        tcp_options(th.options, s);
    } else if !cfg.tcp_loose {
        return None;
    } else {
        // Mid-stream pickup: history lost; assume SACK and be liberal to cope with an
        // unknown window scale.
        s.td_maxend = s.td_end.wrapping_add(s.td_maxwin);
        ct.seen[0].flags = flag::SACK_PERM | flag::BE_LIBERAL;
        ct.seen[1].flags = flag::SACK_PERM | flag::BE_LIBERAL;
    }
    ct.last_index = TcpIndex::None as u8;
    Some(ct)
}

/// `tcp_can_early_drop`: closing states may be evicted even when ASSURED.
pub fn can_early_drop(ct: &TcpConn) -> bool {
    matches!(
        ct.state,
        S::FinWait | S::LastAck | S::TimeWait | S::Close | S::CloseWait
    )
}

fn split(seen: &mut [TcpDir; 2], dir: Dir) -> (&mut TcpDir, &mut TcpDir) {
    let [a, b] = seen;
    match dir {
        Dir::Original => (a, b),
        Dir::Reply => (b, a),
    }
}

/// `tcp_init_sender`.
fn tcp_init_sender(
    sender: &mut TcpDir,
    receiver: &mut TcpDir,
    th: &TcpView<'_>,
    end: u32,
    win: u32,
    dir: Dir,
) {
    sender.td_end = end;
    sender.td_maxend = end;
    sender.td_maxwin = if win == 0 { 1 } else { win };
    tcp_options(th.options, sender);
    // RFC 1323: both sides must send the option for scaling to be on in either direction.
    if dir == Dir::Reply
        && !(sender.flags & flag::WINDOW_SCALE != 0 && receiver.flags & flag::WINDOW_SCALE != 0)
    {
        sender.td_scale = 0;
        receiver.td_scale = 0;
    }
}

/// `enum nf_ct_tcp_action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WinAction {
    Accept,
    Ignore,
    Invalid(InvalidReason),
}

/// `nf_tcp_log_invalid`: with be_liberal (sysctl or the direction's flag) every complaint
/// becomes ACCEPT.
fn log_invalid(sender: &TcpDir, cfg: &CtConfig, ret: WinAction) -> WinAction {
    if sender.flags & flag::BE_LIBERAL != 0 || cfg.tcp_be_liberal {
        WinAction::Accept
    } else {
        ret
    }
}

/// `tcp_in_window`.
fn tcp_in_window(
    ct: &mut TcpConn,
    dir: Dir,
    index: TcpIndex,
    th: &TcpView<'_>,
    cfg: &CtConfig,
    receiver_offset: i32,
) -> WinAction {
    let state = ct.state;
    let mut seq = th.seq;
    let mut ack = th.ack;
    let mut sack = ack;
    let win_raw = th.window;
    let mut win = u32::from(win_raw);
    let mut end = th.end();
    let syn = th.syn();
    let has_ack = th.ack_flag();
    let (sender, receiver) = split(&mut ct.seen, dir);

    if receiver.flags & flag::SACK_PERM != 0 {
        tcp_sack(th.options, &mut sack);
    }
    // Take into account NAT sequence number mangling.
    ack = ack.wrapping_sub(receiver_offset as u32);
    sack = sack.wrapping_sub(receiver_offset as u32);

    if sender.td_maxwin == 0 {
        // First packet seen from this side.
        if syn {
            tcp_init_sender(sender, receiver, th, end, win, dir);
            if !has_ack {
                // Simultaneous open.
                return WinAction::Accept;
            }
        } else {
            // Mid-stream: history lost, use the packet.
            sender.td_end = end;
            let swin = win << sender.td_scale;
            sender.td_maxwin = if swin == 0 { 1 } else { swin };
            sender.td_maxend = end.wrapping_add(sender.td_maxwin);
            if receiver.td_maxwin == 0 {
                // Nothing seen the other way yet: let III and IV pass until it is.
                receiver.td_end = sack;
                receiver.td_maxend = sack;
            } else if sack == receiver.td_end.wrapping_add(1) {
                // Likely a reply to a keepalive. Needed for III.
                receiver.td_end = receiver.td_end.wrapping_add(1);
            }
        }
    } else if syn && after(end, sender.td_end) && (state == S::SynSent || state == S::SynRecv) {
        // RFC 793: a reinitialised TCP may reuse the tuple with higher sequence numbers.
        tcp_init_sender(sender, receiver, th, end, win, dir);
        if dir == Dir::Reply && !has_ack {
            return WinAction::Accept;
        }
    }

    if !has_ack {
        // No ACK: pretend it acked everything seen.
        ack = receiver.td_end;
        sack = ack;
    } else if th.flags & (tcp_flags::ACK | tcp_flags::RST) == (tcp_flags::ACK | tcp_flags::RST)
        && ack == 0
    {
        // Broken stacks that set ACK with a zero ack in RST.
        ack = receiver.td_end;
        sack = ack;
    }

    if th.rst() && seq == 0 && state == S::SynSent {
        // RST answering a SYN.
        seq = sender.td_end;
        end = seq;
    }

    // I: seq <= sender.td_maxend
    let seq_ok = before(seq, sender.td_maxend.wrapping_add(1));
    if !seq_ok {
        let overshot = end.wrapping_sub(sender.td_maxend).wrapping_add(1);
        let ack_ok = after(
            sack,
            receiver
                .td_end
                .wrapping_sub(maxackwindow(sender))
                .wrapping_sub(1),
        );
        let in_recv_win = receiver.td_maxwin != 0
            && after(
                end,
                sender
                    .td_end
                    .wrapping_sub(receiver.td_maxwin)
                    .wrapping_sub(1),
            );
        if in_recv_win
            && ack_ok
            && overshot <= receiver.td_maxwin
            && before(sack, receiver.td_end.wrapping_add(1))
        {
            // TCPs that send more than the receive window allows: remember the data so the
            // ACK for it does not fail III later.
            sender.td_end = end;
            sender.flags |= flag::DATA_UNACKNOWLEDGED;
            return log_invalid(sender, cfg, WinAction::Ignore);
        }
        return log_invalid(
            sender,
            cfg,
            WinAction::Invalid(InvalidReason::TcpSeqOverUpperBound),
        );
    }

    // III: sack <= receiver.td_end
    if !before(sack, receiver.td_end.wrapping_add(1)) {
        return log_invalid(
            sender,
            cfg,
            WinAction::Invalid(InvalidReason::TcpAckOverUpperBound),
        );
    }

    // II: seq + len >= sender.td_end - receiver.td_maxwin
    let in_recv_win = receiver.td_maxwin == 0
        || after(
            end,
            sender
                .td_end
                .wrapping_sub(receiver.td_maxwin)
                .wrapping_sub(1),
        );
    if !in_recv_win {
        return log_invalid(sender, cfg, WinAction::Ignore);
    }
    // IV: sack >= receiver.td_end - MAXACKWINDOW
    if !after(
        sack,
        receiver
            .td_end
            .wrapping_sub(maxackwindow(sender))
            .wrapping_sub(1),
    ) {
        return log_invalid(sender, cfg, WinAction::Ignore);
    }

    // Window scaling (RFC 1323) does not apply to the SYN's window.
    if !syn {
        win <<= sender.td_scale;
    }

    // Update the sender.
    let swin = win.wrapping_add(sack.wrapping_sub(ack));
    if sender.td_maxwin < swin {
        sender.td_maxwin = swin;
    }
    if after(end, sender.td_end) {
        sender.td_end = end;
        sender.flags |= flag::DATA_UNACKNOWLEDGED;
    }
    if has_ack {
        if sender.flags & flag::MAXACK_SET == 0 {
            sender.td_maxack = ack;
            sender.flags |= flag::MAXACK_SET;
        } else if after(ack, sender.td_maxack) {
            sender.td_maxack = ack;
        }
    }

    // Update the receiver.
    if receiver.td_maxwin != 0 && after(end, sender.td_maxend) {
        receiver.td_maxwin = receiver
            .td_maxwin
            .wrapping_add(end.wrapping_sub(sender.td_maxend));
    }
    if after(sack.wrapping_add(win), receiver.td_maxend.wrapping_sub(1)) {
        receiver.td_maxend = sack.wrapping_add(win);
        if win == 0 {
            receiver.td_maxend = receiver.td_maxend.wrapping_add(1);
        }
    }
    if ack == receiver.td_end {
        receiver.flags &= !flag::DATA_UNACKNOWLEDGED;
    }

    // Retransmissions.
    if index == TcpIndex::Ack {
        if ct.last_dir == dir as u8
            && ct.last_seq == seq
            && ct.last_ack == ack
            && ct.last_end == end
            && ct.last_win == win_raw
        {
            ct.retrans = ct.retrans.saturating_add(1);
        } else {
            ct.last_dir = dir as u8;
            ct.last_seq = seq;
            ct.last_ack = ack;
            ct.last_end = end;
            ct.last_win = win_raw;
            ct.retrans = 0;
        }
    }
    WinAction::Accept
}

/// `nf_tcp_handle_invalid`: an ASSURED connection that saw out-of-window FIN/RST from both
/// sides gets its timeout cut to UNACK (if more than 120 s remain). Returns the new timeout.
fn handle_invalid(
    ct: &mut TcpConn,
    dir: Dir,
    index: TcpIndex,
    ct_status: u32,
    expires_in_secs: u64,
    t: &Timeouts,
) -> Option<u32> {
    if ct_status & status::ASSURED == 0 || ct_status & status::FIXED_TIMEOUT != 0 {
        return None;
    }
    if !matches!(index, TcpIndex::Rst | TcpIndex::Fin) {
        return None;
    }
    if ct.last_dir != dir as u8
        && (ct.last_index == TcpIndex::Fin as u8 || ct.last_index == TcpIndex::Rst as u8)
    {
        if expires_in_secs < 120 {
            return None;
        }
        let timeout = t.tcp_unacknowledged;
        if expires_in_secs > u64::from(timeout) {
            return Some(timeout);
        }
        None
    } else {
        ct.last_index = index as u8;
        ct.last_dir = dir as u8;
        None
    }
}

/// `nf_conntrack_tcp_established`.
fn established(ct: &TcpConn, ct_status: u32) -> bool {
    ct.state == S::Established && ct_status & status::ASSURED != 0
}

/// What the caller must know about the connection to run [`tcp_packet`].
#[derive(Clone, Copy, Debug)]
pub struct TcpCtx {
    pub dir: Dir,
    /// `ct->status` before this packet.
    pub status: u32,
    /// Whole seconds until the connection would expire (for `nf_tcp_handle_invalid`).
    pub expires_in_secs: u64,
    /// `nf_ct_seq_offset(ct, !dir, ack - 1)`: how far a NAT helper moved the sequence numbers
    /// this packet acknowledges; taken off its ack and SACK before the window checks.
    pub receiver_offset: i32,
}

/// `nf_conntrack_tcp_packet` after `tcp_error` and `tcp_new`. Sets event bits in `events`.
pub fn tcp_packet(
    ct: &mut TcpConn,
    th: &TcpView<'_>,
    cx: TcpCtx,
    cfg: &CtConfig,
    events: &mut u16,
) -> L4Verdict {
    let t = &cfg.timeouts;
    let dir = cx.dir;
    let d = dir as u8;
    let mut old_state = ct.state;
    let index = conntrack_index(th.flags);
    let mut new_state = TCP_CONNTRACKS[dir.index()][index as usize][old_state as usize];

    // The switch on new_state before the window check; `skip_window` is the kernel's
    // `goto in_window`.
    let mut skip_window = false;
    let mut ignore = false;
    match new_state {
        S::SynSent if old_state >= S::TimeWait => {
            // Reopen from TIME_WAIT/CLOSE: if a side closed first, or the last packet this
            // way was a RST, kill the old entry and look the SYN up again.
            if (ct.seen[0].flags | ct.seen[1].flags) & flag::CLOSE_INIT != 0
                || (ct.last_dir == d && ct.last_index == TcpIndex::Rst as u8)
            {
                return L4Verdict::Repeat;
            }
            ignore = true;
        }
        S::Ignore => ignore = true,
        S::Max => {
            return L4Verdict::Invalid {
                reason: InvalidReason::TcpInvalidState {
                    state: old_state,
                    index,
                    dir,
                },
                cut_timeout: None,
            };
        }
        // RFC 5961 challenge ACK after a SYN in LAST_ACK: not an ACK of the last FIN.
        S::TimeWait
            if old_state == S::LastAck
                && index == TcpIndex::Ack
                && ct.last_dir != d
                && ct.last_index == TcpIndex::Syn as u8
                && ct.last_flags & flag::EXP_CHALLENGE_ACK != 0 =>
        {
            ct.last_flags &= !flag::EXP_CHALLENGE_ACK;
            return L4Verdict::Ignore;
        }
        S::SynSent2 => ct.last_flags |= flag::SIMULTANEOUS_OPEN,
        // Simultaneous open: the REPLY ACK in SYN_RECV completes it.
        S::SynRecv
            if dir == Dir::Reply
                && index == TcpIndex::Ack
                && ct.last_flags & flag::SIMULTANEOUS_OPEN != 0 =>
        {
            new_state = S::Established;
        }
        S::Close if index == TcpIndex::Rst => {
            let peer = ct.seen[dir.other().index()];
            if can_early_drop(ct) {
                // Closing already: the tuple may be reused, skip the checks.
                skip_window = true;
            } else {
                let seq = th.seq;
                let mut decided = false;
                if peer.flags & flag::MAXACK_SET != 0 && ct.last_index != TcpIndex::Syn as u8 {
                    if seq == 0 && !established(ct, cx.status) {
                        // Most likely the answer to a SYN we let through.
                        decided = true;
                    } else if before(seq, peer.td_maxack) && !cfg.tcp_ignore_invalid_rst {
                        return L4Verdict::Invalid {
                            reason: InvalidReason::TcpInvalidRst,
                            cut_timeout: None,
                        };
                    } else if !established(ct, cx.status) || seq == peer.td_maxack {
                        decided = true;
                    } else if ct.last_index == TcpIndex::Ack as u8
                        && ct.last_dir == d
                        && seq == ct.last_end
                    {
                        // RST as part of a train after our last data segment.
                        decided = true;
                    } else {
                        // Not exactly at the ack: keep ESTABLISHED so a challenge ACK can
                        // follow.
                        new_state = old_state;
                    }
                }
                let ack = th.ack;
                if decided {
                    // The kernel's `break`: on to the window check.
                } else if ((cx.status & status::SEEN_REPLY != 0
                    && ct.last_index == TcpIndex::Syn as u8)
                    || (cx.status & status::ASSURED == 0 && ct.last_index == TcpIndex::Ack as u8))
                    && ack == ct.last_end
                {
                    // RST to a SYN or ACK we let through while out of sync: skip the window
                    // check, it may ack segments we ignored.
                    skip_window = true;
                } else if old_state == S::SynSent
                    && ct.last_index == TcpIndex::Ack as u8
                    && ct.last_dir == Dir::Reply as u8
                    && seq == ct.last_ack
                {
                    // RST answering a challenge ACK we let through.
                    skip_window = true;
                }
            }
        }
        _ => {}
    }

    if ignore {
        // b) A SYN/ACK acknowledging a SYN we ignored: client and server are in sync and we
        // are not; resync from the values saved when the SYN went by.
        if index == TcpIndex::SynAck
            && ct.last_index == TcpIndex::Syn as u8
            && ct.last_dir != d
            && th.ack == ct.last_end
        {
            old_state = S::SynSent;
            new_state = S::SynRecv;
            let ld = usize::from(ct.last_dir & 1);
            let s = &mut ct.seen[ld];
            s.td_end = ct.last_end;
            s.td_maxend = ct.last_end;
            s.td_maxwin = if ct.last_win == 0 {
                1
            } else {
                u32::from(ct.last_win)
            };
            s.td_scale = ct.last_wscale;
            ct.last_flags &= !flag::EXP_CHALLENGE_ACK;
            s.flags = ct.last_flags;
            let o = &mut ct.seen[dir.index()];
            o.td_end = 0;
            o.td_maxend = 0;
            o.td_maxwin = 0;
            o.td_maxack = 0;
            o.td_scale = 0;
            o.flags &= flag::BE_LIBERAL;
            // Fall through to the window check with the resynced state.
        } else {
            ct.last_index = index as u8;
            ct.last_dir = d;
            ct.last_seq = th.seq;
            ct.last_end = th.end();
            ct.last_win = th.window;
            // a) A SYN in ORIGINAL: note its options so a SYN/ACK can resync us.
            if index == TcpIndex::Syn && dir == Dir::Original {
                let mut seen = TcpDir::default();
                ct.last_flags = 0;
                ct.last_wscale = 0;
                tcp_options(th.options, &mut seen);
                if seen.flags & flag::WINDOW_SCALE != 0 {
                    ct.last_flags |= flag::WINDOW_SCALE;
                    ct.last_wscale = seen.td_scale;
                }
                if seen.flags & flag::SACK_PERM != 0 {
                    ct.last_flags |= flag::SACK_PERM;
                }
                // A challenge ACK may follow; in LAST_ACK it would look like the ACK of FIN.
                if old_state == S::LastAck {
                    ct.last_flags |= flag::EXP_CHALLENGE_ACK;
                }
            }
            // c) Possible challenge ACK answering the SYN.
            if old_state == S::SynSent && index == TcpIndex::Ack && dir == Dir::Reply {
                ct.last_ack = th.ack;
            }
            return L4Verdict::Ignore;
        }
    }

    if !skip_window {
        match tcp_in_window(ct, dir, index, th, cfg, cx.receiver_offset) {
            WinAction::Accept => {}
            WinAction::Ignore => return L4Verdict::Ignore,
            WinAction::Invalid(reason) => {
                let cut = handle_invalid(ct, dir, index, cx.status, cx.expires_in_secs, t);
                return L4Verdict::Invalid {
                    reason,
                    cut_timeout: cut,
                };
            }
        }
    }

    // In window from here on.
    ct.last_index = index as u8;
    ct.last_dir = d;
    ct.state = new_state;
    if old_state != new_state && new_state == S::FinWait {
        ct.seen[dir.index()].flags |= flag::CLOSE_INIT;
    }

    let state_timeout = t.tcp_state(new_state);
    let mut timeout = if u32::from(ct.retrans) >= u32::from(cfg.tcp_max_retrans)
        && state_timeout > t.tcp_max_retrans
    {
        t.tcp_max_retrans
    } else if index == TcpIndex::Rst {
        t.tcp_close
    } else if (ct.seen[0].flags | ct.seen[1].flags) & flag::DATA_UNACKNOWLEDGED != 0
        && state_timeout > t.tcp_unacknowledged
    {
        t.tcp_unacknowledged
    } else if ct.last_win == 0 && state_timeout > t.tcp_max_retrans {
        t.tcp_max_retrans
    } else {
        state_timeout
    };

    if new_state != old_state {
        *events |= EV_PROTOINFO;
    }

    if cx.status & status::SEEN_REPLY == 0 {
        // Only a RST came back: no connection, delete at once.
        if th.rst() {
            return L4Verdict::Kill;
        }
        // A retransmitted SYN does not renew the timeout (port reuse could keep it alive).
        if index == TcpIndex::Syn && old_state == S::SynSent {
            return L4Verdict::Ignore;
        }
        // Loose pickup without a reply: avoid the long ESTABLISHED timeout.
        if new_state == S::Established && timeout > t.tcp_unacknowledged {
            timeout = t.tcp_unacknowledged;
        }
    } else if cx.status & status::ASSURED == 0
        && (old_state == S::SynRecv || old_state == S::Established)
        && new_state == S::Established
    {
        *events |= EV_ASSURED;
    }
    L4Verdict::Accept { timeout }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_reference_json() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/reference/tcp_conntracks.json"
        );
        let Ok(text) = std::fs::read_to_string(path) else {
            eprintln!("skipped: {path} not present (it sits beside the repository)");
            return;
        };
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let abbrev = |s: &str| match s {
            "sNO" => S::None,
            "sSS" => S::SynSent,
            "sSR" => S::SynRecv,
            "sES" => S::Established,
            "sFW" => S::FinWait,
            "sCW" => S::CloseWait,
            "sLA" => S::LastAck,
            "sTW" => S::TimeWait,
            "sCL" => S::Close,
            "sS2" => S::SynSent2,
            "sIV" => S::Max,
            "sIG" => S::Ignore,
            other => panic!("unknown {other}"),
        };
        for (d, dname) in ["ORIGINAL", "REPLY"].iter().enumerate() {
            for (i, iname) in ["syn", "synack", "fin", "ack", "rst", "none"]
                .iter()
                .enumerate()
            {
                let row = v[dname][iname].as_array().expect("row");
                for (s, cell) in row.iter().enumerate() {
                    assert_eq!(
                        TCP_CONNTRACKS[d][i][s],
                        abbrev(cell.as_str().expect("str")),
                        "{dname} {iname} column {s}"
                    );
                }
            }
        }
        let to = &v["timeouts_seconds"];
        let t = Timeouts::default();
        assert_eq!(to["ESTABLISHED"], t.tcp_established);
        assert_eq!(to["SYN_SENT2"], t.tcp_syn_sent2);
        assert_eq!(to["UNACK"], t.tcp_unacknowledged);
        assert_eq!(to["RETRANS"], t.tcp_max_retrans);
    }

    #[test]
    fn flag_combinations() {
        use tcp_flags::*;
        for ok in [
            SYN,
            SYN | URG,
            SYN | ACK,
            RST,
            RST | ACK,
            FIN | ACK,
            ACK,
            ACK | URG,
        ] {
            assert!(tcp_flags_valid(ok), "{ok:#x}");
            assert!(tcp_flags_valid(ok | PSH | ECE | CWR), "{ok:#x}");
        }
        for bad in [
            0,
            FIN,
            SYN | FIN,
            SYN | RST,
            FIN | RST | ACK,
            URG,
            PSH,
            SYN | FIN | ACK,
        ] {
            assert!(!tcp_flags_valid(bad), "{bad:#x}");
        }
    }

    #[test]
    fn index_precedence() {
        use tcp_flags::*;
        assert_eq!(conntrack_index(RST | SYN | ACK), TcpIndex::Rst);
        assert_eq!(conntrack_index(SYN | ACK | FIN), TcpIndex::SynAck);
        assert_eq!(conntrack_index(FIN | ACK), TcpIndex::Fin);
        assert_eq!(conntrack_index(PSH), TcpIndex::None);
    }

    #[test]
    fn sack_takes_highest_right_edge_of_first_option() {
        let mut sack = 100;
        tcp_sack(
            &[
                1, 1, 5, 18, 0, 0, 0, 1, 0, 0, 0, 150, 0, 0, 0, 1, 0, 0, 0, 120,
            ],
            &mut sack,
        );
        assert_eq!(sack, 150);
        let mut sack = 100;
        tcp_sack(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2], &mut sack);
        assert_eq!(sack, 100);
    }

    #[test]
    fn options_reset_only_when_present() {
        let mut d = TcpDir {
            td_scale: 7,
            flags: flag::WINDOW_SCALE | flag::BE_LIBERAL | flag::MAXACK_SET,
            ..Default::default()
        };
        tcp_options(&[], &mut d);
        assert_eq!(d.td_scale, 7);
        tcp_options(&[1, 3, 3, 20], &mut d);
        assert_eq!(d.td_scale, 14);
        assert_eq!(d.flags, flag::BE_LIBERAL | flag::WINDOW_SCALE);
    }
}
