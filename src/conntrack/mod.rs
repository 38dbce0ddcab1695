//! The connection tracker, with Linux netfilter semantics and no I/O: every call takes `now`.
//!
//! Owns what `nf_conntrack_in` and `nf_conntrack_confirm` do: find the connection a packet
//! belongs to, run the protocol tracker, decide the ctinfo rules will see (`ct state`,
//! `ct status`, `ct direction`, `ct mark`), and insert new connections once the packet has
//! survived the hooks. Must not know rules, the engine, NAT or the clock; knows packets
//! ([`crate::packet`]) and time (as an argument).
//!
//! The two steps, as netfilter runs them:
//!
//! ```text
//!   frame -> packet::parse_ethernet -> Tracker::classify(pkt, ctx, now)   (prerouting/output)
//!              Classified::Tracked { conn, info, .. } -> rules see ct state/status/mark/direction
//!              Classified::Invalid(reason)            -> rules see ct state invalid
//!              Classified::Untracked                  -> rules see ct state untracked
//!              Classified::Drop(reason)               -> table full: drop, no rules
//!          -> rules (the engine) -> accepted?
//!          -> Tracker::confirm(&tracked, now)    (postrouting/input: a NEW entry enters the table;
//!                                                 a dropped first packet leaves no entry)
//!   the caller also runs Tracker::gc_paced(now, n) every tick (incremental expiry, paced as
//!   the kernel's gc_worker), or Tracker::gc_step(now, n) to scan unpaced
//! ```
//!
//! For a packet of a known connection the state update (TCP window, timeouts, counters)
//! happens in `classify`, as in the kernel, whatever the rules decide afterwards.

pub mod conn;
pub mod expect;
pub mod flowtable;
pub mod helper;
pub mod nat;
pub mod proto;
pub mod seqadj;
pub mod show;
pub mod table;
pub mod tuple;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

pub use conn::{Conn, ConnRef, Counter, HelperName, NatBinding};
pub use proto::tcp::{TcpIndex, TcpState};
pub use proto::{Dir, L4Verdict, ProtoState};
pub use table::{InsertError, Table};
pub use tuple::{Addr, Tuple, TupleError, L3};

use crate::packet::checksum::{self, ChecksumError};
use crate::packet::{self as pkt, Packet, L4};
use proto::icmp::IcmpClass;
use proto::{generic, icmp, tcp, udp};

/// A point in time in nanoseconds from an arbitrary epoch (a capture's, or a monotonic
/// clock's): the tracker never reads a clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub const fn from_secs(s: u64) -> Timestamp {
        Timestamp(s * 1_000_000_000)
    }
    pub const fn from_millis(ms: u64) -> Timestamp {
        Timestamp(ms * 1_000_000)
    }
    pub const fn nanos(self) -> u64 {
        self.0
    }
    pub fn plus_secs(self, s: u64) -> Timestamp {
        Timestamp(self.0 + s * 1_000_000_000)
    }
    pub fn plus_millis(self, ms: u64) -> Timestamp {
        Timestamp(self.0 + ms * 1_000_000)
    }
}

const NS: u64 = 1_000_000_000;

/// `enum ip_conntrack_status` bits.
pub mod status {
    pub const EXPECTED: u32 = 1 << 0;
    pub const SEEN_REPLY: u32 = 1 << 1;
    pub const ASSURED: u32 = 1 << 2;
    pub const CONFIRMED: u32 = 1 << 3;
    pub const SRC_NAT: u32 = 1 << 4;
    pub const DST_NAT: u32 = 1 << 5;
    pub const SEQ_ADJUST: u32 = 1 << 6;
    pub const SRC_NAT_DONE: u32 = 1 << 7;
    pub const DST_NAT_DONE: u32 = 1 << 8;
    pub const DYING: u32 = 1 << 9;
    pub const FIXED_TIMEOUT: u32 = 1 << 10;
    pub const TEMPLATE: u32 = 1 << 11;
    /// `IPS_UNTRACKED`, reused by the kernel as `IPS_NAT_CLASH`.
    pub const NAT_CLASH: u32 = 1 << 12;
    pub const HELPER: u32 = 1 << 13;
    pub const OFFLOAD: u32 = 1 << 14;
    pub const HW_OFFLOAD: u32 = 1 << 15;
}

/// Event bits (`1 << enum ip_conntrack_events`), what `conntrack -E` reports.
pub const EV_NEW: u16 = 1 << 0;
pub const EV_RELATED: u16 = 1 << 1;
pub const EV_DESTROY: u16 = 1 << 2;
pub const EV_REPLY: u16 = 1 << 3;
pub const EV_ASSURED: u16 = 1 << 4;
pub const EV_PROTOINFO: u16 = 1 << 5;
pub const EV_HELPER: u16 = 1 << 6;
pub const EV_MARK: u16 = 1 << 7;

/// Timeouts in seconds, named after their sysctls (`net.netfilter.nf_conntrack_*`), with the
/// kernel's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn_sent: u32,
    pub tcp_syn_recv: u32,
    pub tcp_established: u32,
    pub tcp_fin_wait: u32,
    pub tcp_close_wait: u32,
    pub tcp_last_ack: u32,
    pub tcp_time_wait: u32,
    pub tcp_close: u32,
    /// SYN_SENT2 has no sysctl; the kernel's table value is 2 minutes.
    pub tcp_syn_sent2: u32,
    /// `nf_conntrack_tcp_timeout_max_retrans` (the RETRANS timeout).
    pub tcp_max_retrans: u32,
    /// `nf_conntrack_tcp_timeout_unacknowledged` (the UNACK timeout).
    pub tcp_unacknowledged: u32,
    /// `nf_conntrack_udp_timeout`.
    pub udp: u32,
    /// `nf_conntrack_udp_timeout_stream`.
    pub udp_stream: u32,
    /// `nf_conntrack_icmp_timeout`.
    pub icmp: u32,
    /// `nf_conntrack_icmpv6_timeout`.
    pub icmpv6: u32,
    /// `nf_conntrack_generic_timeout`.
    pub generic: u32,
    /// `nf_flowtable_tcp_timeout` (`offload_timeout`): an offloaded TCP flow dies this long
    /// after its last packet.
    pub flowtable_tcp: u32,
    /// `nf_flowtable_udp_timeout`: the same for UDP.
    pub flowtable_udp: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn_sent: 120,
            tcp_syn_recv: 60,
            tcp_established: 432_000,
            tcp_fin_wait: 120,
            tcp_close_wait: 60,
            tcp_last_ack: 30,
            tcp_time_wait: 120,
            tcp_close: 10,
            tcp_syn_sent2: 120,
            tcp_max_retrans: 300,
            tcp_unacknowledged: 300,
            udp: 30,
            udp_stream: 120,
            icmp: 30,
            icmpv6: 30,
            generic: 600,
            flowtable_tcp: flowtable::FLOW_TIMEOUT_SECS,
            flowtable_udp: flowtable::FLOW_TIMEOUT_SECS,
        }
    }
}

/// A sysctl name [`Timeouts::set`] or [`CtConfig::set`] does not know.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("unknown conntrack setting `{0}`")]
pub struct UnknownSetting(pub String);

impl Timeouts {
    /// The timeout of a TCP state (`timeouts[state]`; NONE uses SYN_SENT's, as
    /// `timeouts[0]` is set to it).
    pub fn tcp_state(&self, s: TcpState) -> u32 {
        match s {
            TcpState::None | TcpState::SynSent => self.tcp_syn_sent,
            TcpState::SynRecv => self.tcp_syn_recv,
            TcpState::Established => self.tcp_established,
            TcpState::FinWait => self.tcp_fin_wait,
            TcpState::CloseWait => self.tcp_close_wait,
            TcpState::LastAck => self.tcp_last_ack,
            TcpState::TimeWait => self.tcp_time_wait,
            TcpState::Close => self.tcp_close,
            TcpState::SynSent2 => self.tcp_syn_sent2,
            TcpState::Max | TcpState::Ignore => self.tcp_syn_sent,
        }
    }

    /// Sets a timeout by its sysctl name, with or without the `nf_conntrack_` prefix.
    pub fn set(&mut self, name: &str, secs: u32) -> Result<(), UnknownSetting> {
        let n = name.strip_prefix("nf_conntrack_").unwrap_or(name);
        let slot = match n {
            "tcp_timeout_syn_sent" => &mut self.tcp_syn_sent,
            "tcp_timeout_syn_recv" => &mut self.tcp_syn_recv,
            "tcp_timeout_established" => &mut self.tcp_established,
            "tcp_timeout_fin_wait" => &mut self.tcp_fin_wait,
            "tcp_timeout_close_wait" => &mut self.tcp_close_wait,
            "tcp_timeout_last_ack" => &mut self.tcp_last_ack,
            "tcp_timeout_time_wait" => &mut self.tcp_time_wait,
            "tcp_timeout_close" => &mut self.tcp_close,
            "tcp_timeout_max_retrans" => &mut self.tcp_max_retrans,
            "tcp_timeout_unacknowledged" => &mut self.tcp_unacknowledged,
            "udp_timeout" => &mut self.udp,
            "udp_timeout_stream" => &mut self.udp_stream,
            "icmp_timeout" => &mut self.icmp,
            "icmpv6_timeout" => &mut self.icmpv6,
            "generic_timeout" => &mut self.generic,
            "nf_flowtable_tcp_timeout" => &mut self.flowtable_tcp,
            "nf_flowtable_udp_timeout" => &mut self.flowtable_udp,
            _ => return Err(UnknownSetting(name.to_string())),
        };
        *slot = secs;
        Ok(())
    }
}

/// The tracker's settings, named after the sysctls they mirror.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtConfig {
    /// `nf_conntrack_max`.
    pub max: usize,
    pub timeouts: Timeouts,
    /// `nf_conntrack_tcp_loose`: pick up connections mid-stream.
    pub tcp_loose: bool,
    /// `nf_conntrack_tcp_be_liberal`: only out-of-window RSTs are invalid.
    pub tcp_be_liberal: bool,
    /// `nf_conntrack_tcp_ignore_invalid_rst`.
    pub tcp_ignore_invalid_rst: bool,
    /// `nf_conntrack_tcp_max_retrans`.
    pub tcp_max_retrans: u8,
    /// `nf_conntrack_checksum`: verify transport checksums at prerouting.
    pub checksum: bool,
    /// Keep destroyed connections for [`Tracker::take_destroyed`] (`conntrack -E`).
    pub events: bool,
    /// Statistics slots (one per worker, like the kernel's per-CPU counters).
    pub cpus: usize,
    /// dashmap shards (rounded up to a power of two).
    pub shards: usize,
    /// `nf_conntrack_expect_max` (the kernel's default goes with its default table).
    pub expect_max: usize,
}

impl Default for CtConfig {
    fn default() -> Self {
        CtConfig {
            max: 262_144,
            timeouts: Timeouts::default(),
            tcp_loose: true,
            tcp_be_liberal: false,
            tcp_ignore_invalid_rst: false,
            tcp_max_retrans: 3,
            checksum: true,
            events: false,
            cpus: 1,
            shards: 256,
            expect_max: expect::Expectations::default_max(262_144),
        }
    }
}

impl CtConfig {
    /// Sets a setting by sysctl name: `nf_conntrack_max`, `nf_conntrack_tcp_loose`, ..., or any
    /// timeout name [`Timeouts::set`] takes.
    pub fn set(&mut self, name: &str, value: u64) -> Result<(), UnknownSetting> {
        let n = name.strip_prefix("nf_conntrack_").unwrap_or(name);
        match n {
            "max" => self.max = value as usize,
            "tcp_loose" => self.tcp_loose = value != 0,
            "tcp_be_liberal" => self.tcp_be_liberal = value != 0,
            "tcp_ignore_invalid_rst" => self.tcp_ignore_invalid_rst = value != 0,
            "tcp_max_retrans" => self.tcp_max_retrans = value.min(255) as u8,
            "checksum" => self.checksum = value != 0,
            "expect_max" => self.expect_max = value as usize,
            _ => {
                return self
                    .timeouts
                    .set(name, value.min(u64::from(u32::MAX)) as u32)
            }
        }
        Ok(())
    }
}

/// Why a packet gets no connection, so rules see `ct state invalid`.
#[derive(thiserror::Error, Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidReason {
    #[error("no tuple: {0}")]
    Tuple(#[from] TupleError),
    #[error("malformed transport header: {0}")]
    Malformed(pkt::Invalid),
    #[error("{0}")]
    Checksum(#[from] ChecksumError),
    #[error("invalid tcp flag combination")]
    TcpFlags,
    #[error("invalid new: this TCP packet cannot start a connection")]
    TcpInvalidNew,
    #[error("TCP packet (index {index:?}) in direction {dir:?} invalid in state {}", state.name())]
    TcpInvalidState {
        state: TcpState,
        index: TcpIndex,
        dir: Dir,
    },
    #[error("TCP SEQ is over upper bound (over the window of the receiver)")]
    TcpSeqOverUpperBound,
    #[error("TCP ACK is over upper bound (ACKed data not seen yet)")]
    TcpAckOverUpperBound,
    #[error("invalid rst")]
    TcpInvalidRst,
    #[error("invalid icmp type {0}")]
    IcmpBadType(u8),
    #[error("icmp: can't create new conn with type {0}")]
    IcmpCannotCreate(u8),
    #[error("ICMP error for a connection that is not tracked")]
    IcmpErrorNoConn,
    #[error("ICMP error: outer daddr != inner")]
    IcmpOuterDaddr,
}

/// Why a packet must be dropped by the tracker itself (`NF_DROP`).
#[derive(thiserror::Error, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    #[error("nf_conntrack: table full, dropping packet")]
    TableFull,
    #[error("conntrack insert failed: the reply tuple belongs to another connection")]
    InsertFailed,
}

/// `enum ip_conntrack_info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CtInfo {
    Established = 0,
    Related = 1,
    New = 2,
    EstablishedReply = 3,
    RelatedReply = 4,
}

impl CtInfo {
    /// `NF_CT_STATE_BIT(ctinfo) = 1 << (ctinfo % IP_CT_IS_REPLY + 1)`: the `ct state` bit.
    pub fn state_bit(self) -> u32 {
        1 << ((self as u32) % 3 + 1)
    }
    /// `CTINFO2DIR`.
    pub fn dir(self) -> Dir {
        if (self as u8) >= 3 {
            Dir::Reply
        } else {
            Dir::Original
        }
    }
}

/// `ct state` bits as nftables defines them (`NF_CT_STATE_*_BIT`); equal to `rules::ir::ct_state`.
pub mod ct_state {
    pub const INVALID: u32 = 1 << 0;
    pub const ESTABLISHED: u32 = 1 << 1;
    pub const RELATED: u32 = 1 << 2;
    pub const NEW: u32 = 1 << 3;
    pub const UNTRACKED: u32 = 1 << 6;
}

/// Where in the stack the tracker runs, and which statistics slot the caller owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PktCtx {
    pub hook: Hook,
    /// The worker's index (stats are per worker, as the kernel's are per CPU).
    pub cpu: usize,
}

/// `nf_conntrack_in` runs at PRE_ROUTING for packets from the wire and at LOCAL_OUT for the
/// box's own; checksums are verified only at PRE_ROUTING.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Output,
}

/// A packet attached to a connection.
#[derive(Clone, Debug)]
pub struct Tracked {
    pub conn: ConnRef,
    pub info: CtInfo,
    /// Event bits this packet caused (before confirmation for a NEW connection).
    pub events: u16,
    /// An expected connection of a translated master: how NAT must translate it
    /// (`nf_nat_follow_master`), instead of the nat chains.
    pub follow: Option<expect::Follow>,
}

impl Tracked {
    /// A NEW connection not in the table yet: [`Tracker::confirm`] inserts it.
    pub fn is_tentative(&self) -> bool {
        !self.conn.is_confirmed()
    }
}

/// What `classify` decided: what rules will see.
#[derive(Clone, Debug)]
pub enum Classified {
    Tracked(Tracked),
    /// No tracking (`notrack`-like: ICMPv6 neighbour discovery, MLD).
    Untracked,
    /// No connection: `ct state invalid`.
    Invalid(InvalidReason),
    /// The tracker drops the packet itself (table full).
    Drop(DropReason),
}

impl Classified {
    /// `ct state`: exactly one of the [`ct_state`] bits.
    pub fn ct_state(&self) -> u32 {
        match self {
            Classified::Tracked(t) => t.info.state_bit(),
            Classified::Untracked => ct_state::UNTRACKED,
            Classified::Invalid(_) | Classified::Drop(_) => ct_state::INVALID,
        }
    }
    /// `ct status`, absent without a connection.
    pub fn ct_status(&self) -> Option<u32> {
        self.conn().map(|c| c.status())
    }
    /// `ct direction`: 0 original, 1 reply; absent without a connection.
    pub fn ct_direction(&self) -> Option<Dir> {
        match self {
            Classified::Tracked(t) => Some(t.info.dir()),
            _ => None,
        }
    }
    /// `ct mark`, absent without a connection.
    pub fn ct_mark(&self) -> Option<u32> {
        self.conn().map(|c| c.mark())
    }
    pub fn conn(&self) -> Option<&ConnRef> {
        match self {
            Classified::Tracked(t) => Some(&t.conn),
            _ => None,
        }
    }
}

/// What `confirm` did.
#[derive(Clone, Debug)]
pub enum Confirmed {
    /// The connection entered the table (event NEW).
    Inserted,
    /// It was already in the table (not a NEW packet): nothing to do.
    Already,
    /// Another packet of the same flow was confirmed first; the packet belongs to that
    /// entry (`nf_ct_resolve_clash`, stat `clash_resolve`).
    Clash(ConnRef),
    /// Could not insert (stat `insert_failed`): drop the packet.
    Failed(DropReason),
}

/// Per-worker counters (`struct ip_conntrack_stat`), as `conntrack -S` prints them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtStats {
    pub found: u64,
    pub invalid: u64,
    pub insert: u64,
    pub insert_failed: u64,
    pub drop: u64,
    pub early_drop: u64,
    pub error: u64,
    pub search_restart: u64,
    pub clash_resolve: u64,
    pub chaintoolong: u64,
    /// /proc/net/stat only.
    pub new: u64,
    pub ignore: u64,
    pub delete: u64,
}

#[derive(Default)]
#[repr(align(128))]
struct StatSlot {
    found: AtomicU64,
    invalid: AtomicU64,
    insert: AtomicU64,
    insert_failed: AtomicU64,
    drop: AtomicU64,
    early_drop: AtomicU64,
    error: AtomicU64,
    search_restart: AtomicU64,
    clash_resolve: AtomicU64,
    new: AtomicU64,
    ignore: AtomicU64,
    delete: AtomicU64,
}

fn inc(a: &AtomicU64) {
    // One writer per slot: a load and a store, no locked instruction.
    a.store(a.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// The tracker: one per box, shared by every worker (`&Tracker` is `Sync`).
pub struct Tracker {
    cfg: CtConfig,
    table: Table,
    expect: expect::Expectations,
    stats: Box<[StatSlot]>,
    destroyed: Mutex<Vec<ConnRef>>,
}

/// What a protocol tracker's verdict did to an existing connection.
enum Outcome {
    Accepted { events: u16, kill: bool },
    Invalid(InvalidReason),
    Repeat,
}

impl Tracker {
    pub fn new(cfg: CtConfig) -> Tracker {
        let table = Table::new(cfg.max, cfg.shards);
        let stats = (0..cfg.cpus.max(1)).map(|_| StatSlot::default()).collect();
        Tracker {
            expect: expect::Expectations::new(cfg.expect_max),
            cfg,
            table,
            stats,
            destroyed: Mutex::new(Vec::new()),
        }
    }

    pub fn config(&self) -> &CtConfig {
        &self.cfg
    }
    pub fn table(&self) -> &Table {
        &self.table
    }
    /// The expectation table.
    pub fn expectations(&self) -> &expect::Expectations {
        &self.expect
    }
    /// `nf_conntrack_count`.
    pub fn count(&self) -> usize {
        self.table.count()
    }

    fn slot(&self, cpu: usize) -> &StatSlot {
        &self.stats[cpu % self.stats.len()]
    }

    fn destroyed(&self, conns: impl IntoIterator<Item = ConnRef>, cpu: usize) {
        let mut n = 0;
        let mut keep = if self.cfg.events {
            Some(self.destroyed.lock())
        } else {
            None
        };
        for c in conns {
            // nf_ct_remove_expectations: a master's expectations die with it.
            if c.status() & status::HELPER != 0 {
                self.expect.remove_master(&c);
            }
            if let Some(d) = keep.as_mut() {
                d.push(c);
            }
            n += 1;
        }
        add(&self.slot(cpu).delete, n);
    }

    /// Connections removed since the last call (expired, killed, evicted), for DESTROY
    /// events; empty unless [`CtConfig::events`] is set.
    pub fn take_destroyed(&self) -> Vec<ConnRef> {
        std::mem::take(&mut *self.destroyed.lock())
    }

    /// `nf_conntrack_in`: attaches the packet to its connection (updating it) or creates a
    /// tentative one, and says what rules will see.
    pub fn classify(&self, p: &Packet<'_>, ctx: PktCtx, now: Timestamp) -> Classified {
        let now = now.0;
        let st = self.slot(ctx.cpu);
        let invalid = |r: InvalidReason| {
            inc(&st.invalid);
            Classified::Invalid(r)
        };
        // get_l4proto / the l4 error callbacks that need no lookup.
        match &p.l4 {
            L4::Malformed { reason, .. } => return invalid(InvalidReason::Malformed(*reason)),
            L4::Fragment { .. } => return invalid(TupleError::Fragment.into()),
            L4::Tcp(t) if !tcp::tcp_flags_valid(t.flags) => {
                return invalid(InvalidReason::TcpFlags)
            }
            _ => {}
        }
        if self.cfg.checksum && ctx.hook == Hook::Prerouting {
            if let Err(e) = checksum::verify_l4(p) {
                if matches!(p.l4, L4::Icmp(_) | L4::Icmp6(_)) {
                    inc(&st.error);
                }
                return invalid(e.into());
            }
        }
        // nf_conntrack_handle_icmp: errors are RELATED to a known connection or invalid.
        let icmp_class = match &p.l4 {
            L4::Icmp(i) => Some((icmp::classify_v4(i), i)),
            L4::Icmp6(i) => Some((icmp::classify_v6(i), i)),
            _ => None,
        };
        if let Some((class, i)) = icmp_class {
            match class {
                IcmpClass::Track => {}
                IcmpClass::Untracked => return Classified::Untracked,
                IcmpClass::Invalid(r) => {
                    inc(&st.error);
                    return invalid(r);
                }
                IcmpClass::Error => {
                    let r = self.icmp_error(p, i, now, ctx.cpu);
                    if let Classified::Invalid(_) = r {
                        inc(&st.error);
                        inc(&st.invalid);
                    }
                    return r;
                }
            }
        }
        let tuple = match Tuple::from_packet(p) {
            Ok(t) => t,
            Err(e) => return invalid(e.into()),
        };
        // resolve_normal_ct, repeated once after a TCP reopen (-NF_REPEAT).
        for _ in 0..3 {
            let (hit, dead) = self.table.find(&tuple, now);
            if let Some(d) = dead {
                self.destroyed([d], ctx.cpu);
            }
            let Some((conn, dir)) = hit else {
                return self.new_conn(tuple, p, ctx, now);
            };
            inc(&st.found);
            let s = conn.status();
            let info = match dir {
                Dir::Reply => CtInfo::EstablishedReply,
                Dir::Original if s & status::SEEN_REPLY != 0 => CtInfo::Established,
                Dir::Original if s & status::EXPECTED != 0 => CtInfo::Related,
                Dir::Original => CtInfo::New,
            };
            match self.packet(&conn, dir, p, now) {
                Outcome::Accepted { mut events, kill } => {
                    if dir == Dir::Reply
                        && conn.set_status(status::SEEN_REPLY) & status::SEEN_REPLY == 0
                    {
                        events |= EV_REPLY;
                    }
                    if kill && self.table.remove(&conn) {
                        self.destroyed([conn.clone()], ctx.cpu);
                    }
                    return Classified::Tracked(Tracked {
                        conn,
                        info,
                        events,
                        follow: None,
                    });
                }
                Outcome::Invalid(r) => return invalid(r),
                Outcome::Repeat => {
                    if self.table.remove(&conn) {
                        self.destroyed([conn], ctx.cpu);
                    }
                    continue;
                }
            }
        }
        inc(&st.drop);
        Classified::Drop(DropReason::TableFull)
    }

    /// Runs the protocol tracker for one packet of `conn` and applies its verdict:
    /// timeout, counters, ASSURED.
    fn packet(&self, conn: &ConnRef, dir: Dir, p: &Packet<'_>, now: u64) -> Outcome {
        let cfg = &self.cfg;
        let s = conn.status();
        let mut events = 0u16;
        let mut g = conn.inner.lock();
        let seqadj = g.ext.as_ref().and_then(|e| e.seqadj);
        let verdict = match (&mut g.proto, &p.l4) {
            (ProtoState::Tcp(tc), L4::Tcp(th)) => {
                let expires = conn.expires.load(Ordering::Relaxed);
                // The peer acknowledges a stream a NAT helper may have resized.
                let receiver_offset =
                    seqadj.map_or(0, |a| a.offset(dir.other(), th.ack.wrapping_sub(1)));
                let cx = tcp::TcpCtx {
                    dir,
                    status: s,
                    expires_in_secs: expires.saturating_sub(now) / NS,
                    receiver_offset,
                };
                tcp::tcp_packet(tc, th, cx, cfg, &mut events)
            }
            (ProtoState::Udp { stream_ts }, _) => {
                udp::udp_packet(*stream_ts, s, now, cfg, &mut events)
            }
            (ProtoState::Icmp, _) => {
                icmp::icmp_packet(conn.orig().icmp_type(), conn.orig().l3 == L3::V6, cfg)
            }
            _ => generic::generic_packet(cfg),
        };
        let bytes = p.ip_bytes.len() as u64;
        match verdict {
            L4Verdict::Accept { timeout } => {
                let c = &mut g.counters[dir.index()];
                c.packets += 1;
                c.bytes += bytes;
                drop(g);
                if s & status::FIXED_TIMEOUT == 0 {
                    conn.expires
                        .store(now + u64::from(timeout) * NS, Ordering::Relaxed);
                }
                if events & EV_ASSURED != 0
                    && conn.set_status(status::ASSURED) & status::ASSURED != 0
                {
                    events &= !EV_ASSURED;
                }
                Outcome::Accepted {
                    events,
                    kill: false,
                }
            }
            L4Verdict::Ignore => Outcome::Accepted {
                events,
                kill: false,
            },
            L4Verdict::Kill => {
                let c = &mut g.counters[dir.index()];
                c.packets += 1;
                c.bytes += bytes;
                Outcome::Accepted { events, kill: true }
            }
            L4Verdict::Invalid {
                reason,
                cut_timeout,
            } => {
                if let Some(t) = cut_timeout {
                    conn.expires
                        .store(now + u64::from(t) * NS, Ordering::Relaxed);
                }
                Outcome::Invalid(reason)
            }
            L4Verdict::Repeat => Outcome::Repeat,
        }
    }

    /// `init_conntrack` + the first run of the protocol tracker on the tentative entry.
    fn new_conn(&self, tuple: Tuple, p: &Packet<'_>, ctx: PktCtx, now: u64) -> Classified {
        let st = self.slot(ctx.cpu);
        if let Err(e) = tuple.invert() {
            inc(&st.invalid);
            return Classified::Invalid(e.into());
        }
        // __nf_conntrack_alloc: over nf_conntrack_max, evict or drop.
        if self.table.count() >= self.cfg.max {
            let evicted = self.table.early_drop(&tuple, now);
            if evicted.is_empty() {
                inc(&st.drop);
                return Classified::Drop(DropReason::TableFull);
            }
            add(&st.early_drop, evicted.len() as u64);
            self.destroyed(evicted, ctx.cpu);
        }
        let proto = match &p.l4 {
            L4::Tcp(th) => match tcp::tcp_new(th, &self.cfg) {
                Some(t) => ProtoState::Tcp(t),
                None => {
                    inc(&st.invalid);
                    return Classified::Invalid(InvalidReason::TcpInvalidNew);
                }
            },
            L4::Udp(_) => ProtoState::Udp {
                stream_ts: udp::udp_new(now),
            },
            L4::Icmp(_) | L4::Icmp6(_) => ProtoState::Icmp,
            _ => ProtoState::Generic,
        };
        let conn = Arc::new(Conn::new(tuple, proto, now));
        // nf_ct_find_expectation: a connection a helper announced is RELATED to its master,
        // whose mark it inherits.
        let mut info = CtInfo::New;
        let mut follow = None;
        if let Some((e, master)) = self.expect.take(&tuple, now) {
            follow = e.follow;
            conn.set_status(status::EXPECTED);
            conn.set_mark(master.mark());
            conn.set_master(&master);
            if let Some(h) = e.helper_for_new {
                conn.set_helper(Some(h));
            }
            info = CtInfo::Related;
        }
        match self.packet(&conn, Dir::Original, p, now) {
            Outcome::Accepted { events, .. } => {
                inc(&st.new);
                Classified::Tracked(Tracked {
                    conn,
                    info,
                    events,
                    follow,
                })
            }
            Outcome::Invalid(r) => {
                inc(&st.invalid);
                Classified::Invalid(r)
            }
            Outcome::Repeat => {
                inc(&st.invalid);
                Classified::Invalid(InvalidReason::TcpInvalidNew)
            }
        }
    }

    /// `nf_conntrack_icmpv4_error` / `nf_conntrack_icmpv6_error` -> `nf_conntrack_inet_error`:
    /// the quoted packet's tuple, inverted, must name a known connection whose tuple in that
    /// direction ends at the error's destination.
    fn icmp_error(&self, p: &Packet<'_>, i: &pkt::IcmpView, now: u64, cpu: usize) -> Classified {
        let Some(inner) = &i.inner else {
            return Classified::Invalid(TupleError::Truncated.into());
        };
        let orig = match Tuple::from_inner(inner) {
            Ok(t) => t,
            Err(e) => return Classified::Invalid(e.into()),
        };
        let inverted = match orig.invert() {
            Ok(t) => t,
            Err(e) => return Classified::Invalid(e.into()),
        };
        let (hit, dead) = self.table.find(&inverted, now);
        if let Some(d) = dead {
            self.destroyed([d], cpu);
        }
        let Some((conn, dir)) = hit else {
            return Classified::Invalid(InvalidReason::IcmpErrorNoConn);
        };
        inc(&self.slot(cpu).found);
        if Addr::from_ip(p.ip.dst()) != conn.tuple(dir).dst {
            return Classified::Invalid(InvalidReason::IcmpOuterDaddr);
        }
        let info = match dir {
            Dir::Original => CtInfo::Related,
            Dir::Reply => CtInfo::RelatedReply,
        };
        Classified::Tracked(Tracked {
            conn,
            info,
            events: 0,
            follow: None,
        })
    }

    /// `nf_conntrack_confirm`: a packet that survived the hooks puts its NEW connection in the
    /// table. Call it for every accepted packet; it does nothing for confirmed entries.
    pub fn confirm(&self, t: &Tracked, ctx: PktCtx, now: Timestamp) -> Confirmed {
        if !t.is_tentative() {
            return Confirmed::Already;
        }
        let st = self.slot(ctx.cpu);
        match self.table.insert(&t.conn, now.0) {
            Ok(()) => {
                inc(&st.insert);
                Confirmed::Inserted
            }
            Err(InsertError::Clash(existing)) => {
                inc(&st.clash_resolve);
                Confirmed::Clash(existing)
            }
            Err(InsertError::ReplyTaken) => {
                inc(&st.insert_failed);
                inc(&st.drop);
                Confirmed::Failed(DropReason::InsertFailed)
            }
        }
    }

    /// One incremental expiry step over `buckets` GC buckets (see [`Table::gc_step`]);
    /// returns how many connections were reaped. A full pass is [`Table::buckets`] buckets.
    pub fn gc_step(&self, now: Timestamp, buckets: usize) -> usize {
        self.gc_with(now, |r| self.table.gc_step(now.0, buckets, r))
    }

    /// The appliance's GC: [`Table::gc_paced`] (the kernel's pacing of `gc_worker`) with at
    /// most `budget` buckets scanned now, and the expectations' expiry. Returns how many
    /// connections were reaped.
    pub fn gc_paced(&self, now: Timestamp, budget: usize) -> usize {
        self.gc_with(now, |r| self.table.gc_paced(now.0, budget, r))
    }

    /// The expectations' expiry, then `scan` of the table; the connections it reaped are
    /// destroyed. Returns how many.
    fn gc_with(&self, now: Timestamp, scan: impl FnOnce(&mut Vec<ConnRef>) -> usize) -> usize {
        self.expect.gc(now.0);
        let mut reaped = Vec::new();
        scan(&mut reaped);
        let n = reaped.len();
        self.destroyed(reaped, 0);
        n
    }

    /// Counts a new connection that could not be inserted for want of a free tuple (NAT's
    /// port exhaustion): `insert_failed` and `drop`, as the kernel's failed confirm does.
    pub fn count_insert_failed(&self, cpu: usize) {
        let st = self.slot(cpu);
        inc(&st.insert_failed);
        inc(&st.drop);
    }

    /// Runs the connection's helper on a packet that survived the hooks (`nf_confirm` calls
    /// `helper->help` there): FTP reads ESTABLISHED segments of its control connection, SIP
    /// every message over UDP and established TCP. A packet the helper refuses must be
    /// dropped.
    pub fn help(&self, t: &Tracked, p: &Packet<'_>, now: Timestamp) -> helper::Help {
        use helper::{ftp, sip, Help, HelpState};
        // Most connections have no helper: one atomic load, no lock.
        if t.conn.status() & status::HELPER == 0 {
            return Help::Accept;
        }
        let Some(h) = t.conn.helper() else {
            return Help::Accept;
        };
        let udp = matches!(p.l4, L4::Udp(_));
        if !udp && !matches!(t.info, CtInfo::Established | CtInfo::EstablishedReply) {
            return Help::Accept;
        }
        let dir = t.info.dir();
        let verdict = match h.as_str() {
            "ftp" if matches!(p.l4, L4::Tcp(_)) => t.conn.with_help(
                || HelpState::Ftp(ftp::FtpState::default()),
                |s| match s {
                    HelpState::Ftp(f) => ftp::help(&t.conn, dir, f, p, &self.expect, now.0),
                    HelpState::Sip(_) => Help::Accept,
                },
            ),
            "sip" if udp || matches!(p.l4, L4::Tcp(_)) => {
                let (verdict, refresh) = t.conn.with_help(
                    || HelpState::Sip(sip::SipState::default()),
                    |s| match s {
                        HelpState::Sip(st) => sip::help(&t.conn, dir, st, p, &self.expect, now.0),
                        HelpState::Ftp(_) => (Help::Accept, false),
                    },
                );
                // sip_help_udp: every SIP message keeps the signalling connection alive.
                if refresh && udp {
                    let until = now.0 + u64::from(sip::SIP_TIMEOUT) * NS;
                    t.conn.expires.store(until, Ordering::Relaxed);
                }
                verdict
            }
            _ => Help::Accept,
        };
        // A TCP payload rewritten to another length moves every later sequence number of this
        // direction (nf_nat_mangle_tcp_packet / the seq_adjust hook -> nf_ct_seqadj_set).
        if let (Help::Mangle(m), L4::Tcp(th)) = (&verdict, &p.l4) {
            let delta = m.text.len() as i64 - m.len as i64;
            t.conn.seqadj_set(dir, th.seq, delta as i32);
        }
        verdict
    }

    /// Removes a connection (`conntrack -D`, or a reset sent by the box).
    pub fn kill(&self, conn: &ConnRef) -> bool {
        let gone = self.table.remove(conn);
        if gone {
            self.destroyed([conn.clone()], 0);
        }
        gone
    }

    /// Every connection in the table, expired or not, ORIGINAL tuple order undefined.
    pub fn conns(&self) -> Vec<ConnRef> {
        self.table.conns()
    }

    /// The connections alive at `now`, as `conntrack -L` dumps them: entries that expired
    /// before the paced GC reached them are removed on the way, with their DESTROY events
    /// (`ctnetlink_dump_table` evicts them the same way).
    pub fn listed(&self, now: Timestamp) -> Vec<ConnRef> {
        let (live, expired): (Vec<ConnRef>, Vec<ConnRef>) = self
            .table
            .conns()
            .into_iter()
            .partition(|c| !c.is_expired(now.0));
        let gone: Vec<ConnRef> = expired
            .into_iter()
            .filter(|c| self.table.remove(c))
            .collect();
        self.destroyed(gone, 0);
        live
    }

    /// Per-worker statistics, as `conntrack -S` reports them.
    pub fn stats(&self) -> Vec<CtStats> {
        self.stats
            .iter()
            .map(|s| {
                let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
                CtStats {
                    found: l(&s.found),
                    invalid: l(&s.invalid),
                    insert: l(&s.insert),
                    insert_failed: l(&s.insert_failed),
                    drop: l(&s.drop),
                    early_drop: l(&s.early_drop),
                    error: l(&s.error),
                    search_restart: l(&s.search_restart),
                    clash_resolve: l(&s.clash_resolve),
                    chaintoolong: 0,
                    new: l(&s.new),
                    ignore: l(&s.ignore),
                    delete: l(&s.delete),
                }
            })
            .collect()
    }
}
