//! Per-protocol trackers: each decides, for one packet of one connection, whether the packet
//! is valid, what the connection's protocol state becomes and which timeout it gets.
//!
//! Owns the `nf_conntrack_l4proto` callbacks' behaviour (`*_error`, `*_new`, `*_packet`) and
//! the protocol state kept in a connection. Must not touch the table, the clock or rules: a
//! tracker gets the current time and the connection's status as arguments and answers with an
//! [`L4Verdict`] and event bits; the caller applies them.

pub mod generic;
pub mod icmp;
pub mod tcp;
pub mod udp;

use super::InvalidReason;

/// Direction of a packet relative to the connection (`enum ip_conntrack_dir`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Dir {
    Original = 0,
    Reply = 1,
}

impl Dir {
    pub fn index(self) -> usize {
        self as usize
    }
    pub fn other(self) -> Dir {
        match self {
            Dir::Original => Dir::Reply,
            Dir::Reply => Dir::Original,
        }
    }
}

/// What a protocol tracker decided about one packet (the `NF_ACCEPT` / `-NF_ACCEPT` /
/// `-NF_REPEAT` / `NF_DROP` returns of `nf_conntrack_*_packet`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Verdict {
    /// Valid: refresh the timeout to `timeout` seconds from now and count the packet
    /// (`nf_ct_refresh_acct`).
    Accept { timeout: u32 },
    /// Accepted with its connection, but neither refreshed nor counted (the TCP IGNORE
    /// cases, a retransmitted SYN in SYN_SENT).
    Ignore,
    /// The packet is INVALID (`-NF_ACCEPT`): it gets no connection. When `cut_timeout` is
    /// set, the connection's timeout is lowered to that many seconds
    /// (`nf_tcp_handle_invalid`).
    Invalid {
        reason: InvalidReason,
        cut_timeout: Option<u32>,
    },
    /// Count the packet, then kill the connection (`nf_ct_kill_acct`); the packet keeps it.
    Kill,
    /// Kill the connection and look the packet up again (`-NF_REPEAT`, TCP reopen).
    Repeat,
}

/// The protocol part of a connection (`union nf_conntrack_proto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtoState {
    Tcp(tcp::TcpConn),
    /// `stream_ts`: the time (ns) after which a replied flow counts as a stream.
    Udp {
        stream_ts: u64,
    },
    Icmp,
    Generic,
}
