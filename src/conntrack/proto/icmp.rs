//! The ICMP and ICMPv6 trackers (`nf_conntrack_proto_icmp.c`, `nf_conntrack_proto_icmpv6.c`):
//! query/answer pairs tracked by id with the reply type from `invmap`, and the checks that
//! run before any lookup (`nf_conntrack_icmpv4_error`, `nf_conntrack_icmpv6_error`).
//!
//! Owns which types may create a connection (`valid_new`), which ICMPv6 types are never
//! tracked (`noct_valid_new`), which are errors to be matched against an existing connection,
//! and the 30 s timeout. The RELATED lookup of an error's inner packet is done by the tracker
//! (it needs the table). Must not touch the table, the clock or rules.

use super::L4Verdict;
use crate::conntrack::{CtConfig, InvalidReason};
use crate::packet::{icmp_is_err, icmpv6_is_err, IcmpView};

/// `NR_ICMP_TYPES`: types above it are invalid.
pub const NR_ICMP_TYPES: u8 = 18;

/// What to do with an ICMP packet before the normal lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpClass {
    /// A query or answer: tracked by its own tuple.
    Track,
    /// An error: its inner packet must belong to a known connection (RELATED) or the packet
    /// is invalid.
    Error,
    /// ICMPv6 neighbour discovery and MLD: set UNTRACKED (`noct_valid_new`).
    Untracked,
    Invalid(InvalidReason),
}

/// `nf_conntrack_icmpv4_error` before the inner lookup.
pub fn classify_v4(i: &IcmpView) -> IcmpClass {
    if i.icmp_type > NR_ICMP_TYPES {
        return IcmpClass::Invalid(InvalidReason::IcmpBadType(i.icmp_type));
    }
    if icmp_is_err(i.icmp_type) {
        IcmpClass::Error
    } else {
        IcmpClass::Track
    }
}

/// `nf_conntrack_icmpv6_error` before the inner lookup: MLD query/report/done (130-132),
/// router and neighbour solicitation/advertisement (133-136) and MLDv2 reports (143) are
/// untracked; types below 128 are errors.
pub fn classify_v6(i: &IcmpView) -> IcmpClass {
    match i.icmp_type {
        130..=136 | 143 => IcmpClass::Untracked,
        t if icmpv6_is_err(t) => IcmpClass::Error,
        _ => IcmpClass::Track,
    }
}

/// `valid_new[]`: ICMP types that may create a connection (ECHO, TIMESTAMP, INFO_REQUEST,
/// ADDRESS).
pub fn icmp_valid_new(icmp_type: u8) -> bool {
    matches!(icmp_type, 8 | 13 | 15 | 17)
}

/// ICMPv6 `valid_new[]`: ECHO_REQUEST and NI_QUERY.
pub fn icmpv6_valid_new(icmp_type: u8) -> bool {
    matches!(icmp_type, 128 | 139)
}

/// `nf_conntrack_icmp_packet` / `nf_conntrack_icmpv6_packet`: `orig_type` is the type in the
/// connection's ORIGINAL tuple.
pub fn icmp_packet(orig_type: u8, v6: bool, cfg: &CtConfig) -> L4Verdict {
    let (ok, timeout) = if v6 {
        (icmpv6_valid_new(orig_type), cfg.timeouts.icmpv6)
    } else {
        (icmp_valid_new(orig_type), cfg.timeouts.icmp)
    };
    if !ok {
        return L4Verdict::Invalid {
            reason: InvalidReason::IcmpCannotCreate(orig_type),
            cut_timeout: None,
        };
    }
    L4Verdict::Accept { timeout }
}
