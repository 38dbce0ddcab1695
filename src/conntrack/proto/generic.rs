//! The generic tracker (`nf_conntrack_proto_generic.c`): every protocol without its own
//! tracker (GRE, ESP, SCTP, DCCP, UDP-Lite, ... here) is tracked by its tuple and refreshed to
//! `nf_conntrack_generic_timeout` (600 s) on every packet. Never ASSURED.
//!
//! XXX: SCTP, DCCP, GRE and UDP-Lite have their own kernel trackers (states, keys, timeouts);
//! until they are written they are generic, with ports in the tuple where the kernel has them.
//!
//! Must not touch the table, the clock or rules.

use super::L4Verdict;
use crate::conntrack::CtConfig;

/// `generic_packet`.
pub fn generic_packet(cfg: &CtConfig) -> L4Verdict {
    L4Verdict::Accept {
        timeout: cfg.timeouts.generic,
    }
}
