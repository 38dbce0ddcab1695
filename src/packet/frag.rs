//! IPv4 and IPv6 reassembly before tracking and rule evaluation, sans-IO: what
//! `nf_defrag_ipv4` (net/ipv4/ip_fragment.c) and `nf_defrag_ipv6`
//! (net/ipv6/netfilter/nf_conntrack_reasm.c) do in front of conntrack, on the shared queue
//! machinery of net/ipv4/inet_fragment.c.
//!
//! Owns the fragment queues, their memory bound (`ipfrag_high_thresh`/`ipfrag_low_thresh`),
//! their timeouts (`ipfrag_time`, `nf_conntrack_frag6_timeout`) and the reassembly counters
//! (the `Reasm*` lines of /proc/net/snmp). A [`Reassembler`] takes each parsed fragment with
//! its original frame ([`Reassembler::push`]) and, once a datagram is whole, hands back one
//! reassembled IP packet for the tracker and the rules to judge **and** the original frames,
//! in arrival order, to forward unchanged if the verdict is accept — as the kernel forwards
//! the original skbs after judging the reassembled one (`nf_ct_frag6_output`, and IPv4's
//! refragmentation to the original sizes via `IPSKB_FRAG_PMTU`). Malformed, overlapping or
//! excess fragments make the whole datagram go away, each for a named, counted
//! [`DropReason`]. Time is an argument (`now_nanos`); nothing here reads a clock.
//!
//! Must not know the tracker, rules or the engine; depends only on the parsed view of
//! [`super`]. Wiring it into `engine` is the engine's business.
//!
//! Deviations from the kernel, each on purpose (the item docs say why):
//! - an IPv4 non-final fragment whose length is not a multiple of 8 is dropped with its
//!   datagram (the kernel trims it, `end &= ~7`; IPv6 already kills the queue);
//! - a duplicate (a fragment wholly inside data already held) is dropped and the datagram
//!   kept, as `inet_frag_queue_insert`'s `IPFRAG_DUP` does for both families — but only if
//!   its bytes match what is held; the kernel compares no bytes (first copy wins). Ours is
//!   also order-independent: the kernel calls it a duplicate only within one "run" of
//!   fragments that arrived back to back, otherwise an overlap;
//! - a first IPv6 fragment without the whole transport header (RFC 8200 section 4.5) is
//!   dropped; `nf_ct_frag6_gather` lets it through unqueued and leaves the drop to the
//!   receiving host's `ipv6_frag_rcv` (it does the same, NF_ACCEPT, for the unaligned
//!   fragment whose queue it kills), which would let a fragment pass that no rule judged;
//! - every drop but a duplicate discards the whole datagram; the kernel keeps the queue
//!   for an IPv6 fragment past `IPV6_MAXPLEN` and for an incomplete first fragment, but such
//!   a datagram can never be judged whole, and holding it only serves a flood;
//! - past `high_thresh` the least recently used queues are evicted down to `low_thresh`
//!   (the pre-4.17 `inet_frag_evictor`); kernels since 4.17 refuse new fragments instead;
//! - one memory pool for both families (the kernel has one per family and netns, each with
//!   its own thresholds), and expiry is lazy and batched ([`Reassembler::expire`]) instead of
//!   a timer per queue;
//! - at most [`MAX_FRAGS_PER_DATAGRAM`] fragments per datagram (the kernel has no cap);
//! - no `ipfrag_max_dist` (`ip_frag_too_far`) and no ECN merging (`ip_frag_ecn_table`): the
//!   reassembled header is the first fragment's.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::checksum::Sum16BitWords;
use parking_lot::Mutex;

use super::{
    Ip, Packet, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, NEXTHDR_AUTH, NEXTHDR_DEST,
    NEXTHDR_FRAGMENT, NEXTHDR_HOP, NEXTHDR_ROUTING,
};

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// `net.ipv4.ipfrag_high_thresh` (and `nf_conntrack_frag6_high_thresh`): 4 MiB.
pub const IPFRAG_HIGH_THRESH: usize = 4 * 1024 * 1024;
/// `net.ipv4.ipfrag_low_thresh` (and `nf_conntrack_frag6_low_thresh`): 3 MiB.
pub const IPFRAG_LOW_THRESH: usize = 3 * 1024 * 1024;
/// `net.ipv4.ipfrag_time`: 30 s (`IP_FRAG_TIME`).
pub const IPFRAG_TIME_NANOS: u64 = 30 * NANOS_PER_SEC;
/// `net.netfilter.nf_conntrack_frag6_timeout`: 60 s (`IPV6_FRAG_TIMEOUT`).
pub const NF_CT_FRAG6_TIMEOUT_NANOS: u64 = 60 * NANOS_PER_SEC;
/// The most fragments one datagram may have. The kernel has no such cap (its rbtree of runs,
/// since CVE-2018-5391 "FragmentSmack", keeps inserts cheap), but honest senders never come
/// near it: a 65535-byte datagram over a 1500-byte IPv4 link is 45 fragments, and over
/// IPv6's minimum MTU of 1280 it is 52. 64 covers both with room, while a flood of 8-byte
/// fragments (up to 8192 per datagram) is cut off early and each queue's sorted vector stays
/// small. FreeBSD's `net.inet.ip.maxfragsperpacket` is the same idea (default 16).
pub const MAX_FRAGS_PER_DATAGRAM: usize = 64;
/// `IPV6_MAXPLEN`, and the most an IPv4 total length can say.
const IP_MAXPLEN: u32 = 65535;
/// The queues an explicit [`Reassembler::expire`] call reaps at most.
pub const EXPIRE_BATCH: usize = 64;
/// The queues a [`Reassembler::push`] reaps at most on its way (lazy expiry).
const LAZY_EXPIRE: usize = 4;

/// Reassembly limits, named after the sysctls they copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragConfig {
    /// Past this many bytes held, queues are evicted (`ipfrag_high_thresh`).
    pub high_thresh: usize,
    /// Eviction stops at this many bytes (`ipfrag_low_thresh`).
    pub low_thresh: usize,
    /// IPv4 queue lifetime from its first fragment (`ipfrag_time`).
    pub timeout_v4_nanos: u64,
    /// IPv6 queue lifetime from its first fragment (`nf_conntrack_frag6_timeout`).
    pub timeout_v6_nanos: u64,
    /// See [`MAX_FRAGS_PER_DATAGRAM`].
    pub max_frags: usize,
    /// A non-final IPv6 fragment whose packet (header included) is shorter than this is a
    /// [`DropReason::TinyFragment`]. 0 (the default) turns the check off, as in the kernel,
    /// which has none; 1280 suits an edge that trusts RFC 8200's minimum MTU (honest
    /// senders fill every non-final fragment up to a path MTU of at least 1280).
    pub v6_min_nonfinal_len: usize,
}

impl Default for FragConfig {
    fn default() -> Self {
        FragConfig {
            high_thresh: IPFRAG_HIGH_THRESH,
            low_thresh: IPFRAG_LOW_THRESH,
            timeout_v4_nanos: IPFRAG_TIME_NANOS,
            timeout_v6_nanos: NF_CT_FRAG6_TIMEOUT_NANOS,
            max_frags: MAX_FRAGS_PER_DATAGRAM,
            v6_min_nonfinal_len: 0,
        }
    }
}

/// What identifies one datagram's queue, as `ip4_frag_match`/`ip6_frag_match` key it, plus
/// an opaque caller context (the kernel's `user`/`vif`: an ingress port or zone).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FragKey {
    V4 {
        ctx: u32,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        id: u16,
        protocol: u8,
    },
    V6 {
        ctx: u32,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        id: u32,
    },
}

/// Why a fragment was dropped. All but [`DropReason::Duplicate`] discard the whole datagram
/// (the kernel's `inet_frag_kill` on `discard_qp`) and count in `ReasmFails`.
#[derive(thiserror::Error, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Overlaps data already held (RFC 5722; IPv4 since Linux 4.19: `IPFRAG_OVERLAP`).
    #[error("fragment overlaps data already held")]
    Overlap,
    /// Exactly repeats data already held: the copy is dropped, the datagram kept
    /// (`IPFRAG_DUP`, RFC 5722 errata 3089).
    #[error("duplicate fragment")]
    Duplicate,
    /// The datagram would exceed 65535 bytes (`ip_frag_reasm`'s `out_oversize`, IPv6's
    /// `IPV6_MAXPLEN` check).
    #[error("reassembled datagram would exceed 65535 bytes")]
    Oversize,
    /// A non-final fragment whose data length is not a multiple of 8.
    #[error("non-final fragment length is not a multiple of 8")]
    UnalignedLength,
    /// Two final fragments disagree on where the datagram ends.
    #[error("final fragments disagree on the datagram length")]
    LastFragmentMismatch,
    /// Data beyond the end a final fragment set, or a final fragment ending before data held.
    #[error("fragment data beyond the datagram's end")]
    BeyondEnd,
    /// A fragment with no data (`end == offset`).
    #[error("fragment carries no data")]
    Empty,
    /// An IPv6 first fragment without all headers through the transport header
    /// (RFC 8200 section 4.5, `ipv6frag_thdr_truncated`).
    #[error("first IPv6 fragment does not hold the whole transport header")]
    IncompleteFirstFragment,
    /// A non-final IPv6 fragment shorter than [`FragConfig::v6_min_nonfinal_len`].
    #[error("non-final IPv6 fragment below the configured minimum size")]
    TinyFragment,
    /// More than [`FragConfig::max_frags`] fragments.
    #[error("too many fragments for one datagram")]
    TooManyFragments,
    /// This datagram alone would hold more than `high_thresh` bytes.
    #[error("datagram exceeds the reassembly memory limit")]
    MemoryLimit,
    /// The fragment header cannot be found, or `frame` does not hold `pkt`.
    #[error("fragment is malformed")]
    Malformed,
}

impl DropReason {
    /// Every reason, in the order of [`FragStats::drops`].
    pub const ALL: [DropReason; 12] = [
        DropReason::Overlap,
        DropReason::Duplicate,
        DropReason::Oversize,
        DropReason::UnalignedLength,
        DropReason::LastFragmentMismatch,
        DropReason::BeyondEnd,
        DropReason::Empty,
        DropReason::IncompleteFirstFragment,
        DropReason::TinyFragment,
        DropReason::TooManyFragments,
        DropReason::MemoryLimit,
        DropReason::Malformed,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// Whether the datagram's queue is discarded with this fragment.
    pub fn kills_queue(self) -> bool {
        self != DropReason::Duplicate
    }
}

/// What [`Reassembler::push`] did with a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Push {
    /// Not a fragment (or an IPv6 atomic fragment): go on as usual.
    NotFragment,
    /// Kept in its queue; nothing to forward yet.
    Held,
    /// The datagram is whole.
    Complete {
        /// One IP packet: the first fragment's header with the fragmentation undone (IPv4:
        /// MF and offset cleared, total length and header checksum recomputed; IPv6: the
        /// fragment header removed, its next header chained into the header before it,
        /// payload length fixed), followed by the whole payload. Judge this one.
        reassembled: Vec<u8>,
        /// The original frame of every fragment, in arrival order, byte for byte: forward
        /// these once `reassembled` is accepted.
        frames: Vec<Vec<u8>>,
    },
    /// This fragment is dropped (and, unless [`DropReason::kills_queue`] says otherwise, every
    /// fragment held for its datagram).
    Dropped(DropReason),
}

/// Reassembly counters, named after /proc/net/snmp's `Ip:` line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragStats {
    /// Fragments received (`ReasmReqds`).
    pub reasm_reqds: u64,
    /// Datagrams reassembled (`ReasmOKs`).
    pub reasm_oks: u64,
    /// Datagrams given up: every drop but a duplicate, every timeout, every eviction
    /// (`ReasmFails`).
    pub reasm_fails: u64,
    /// Queues that timed out (`ReasmTimeout`).
    pub reasm_timeout: u64,
    /// Datagrams dropped for overlapping fragments (`ReasmOverlaps`).
    pub reasm_overlaps: u64,
    /// Queues evicted to get back under `low_thresh` (`inet_frag_evictor`).
    pub evictions: u64,
    /// Drops by reason, indexed as [`DropReason::ALL`]; read with [`FragStats::drops`].
    pub drops_by_reason: [u64; 12],
    /// Queues held now.
    pub queues: usize,
    /// Bytes held now, as counted against the thresholds (frames plus bookkeeping).
    pub mem: usize,
}

impl FragStats {
    /// How many fragments were dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops_by_reason[reason.index()]
    }
}

/// Fragment queues, shareable across workers (one lock: fragments are rare).
pub struct Reassembler {
    cfg: FragConfig,
    state: Mutex<State>,
}

/// One held fragment: its original frame and where its data lies in it.
struct Frag {
    offset: u32,
    end: u32,
    arrival: u32,
    frame: Vec<u8>,
    /// Start of the IP header in `frame`.
    ip: usize,
    /// Start of this fragment's data in `frame`.
    data: usize,
    /// IPv4: the header length; IPv6: the offset of the fragment header (the unfragmentable
    /// part's length).
    hdr_len: usize,
    /// IPv6: offset of the next-header byte that names the fragment header.
    nhoff: usize,
    /// IPv6: the fragment header's next header.
    next: u8,
}

impl Frag {
    fn payload(&self) -> &[u8] {
        let len = (self.end - self.offset) as usize;
        self.frame.get(self.data..self.data + len).unwrap_or(&[])
    }
}

/// One datagram being reassembled (`struct inet_frag_queue`).
struct Queue {
    /// Sorted by offset, never overlapping.
    frags: Vec<Frag>,
    /// The datagram length known so far (`q.len`).
    len: u32,
    /// A final fragment has arrived (`INET_FRAG_LAST_IN`).
    last_in: bool,
    /// Data bytes held (`q.meat`).
    meat: u32,
    /// Bytes counted against the thresholds.
    mem: usize,
    /// Expiry time: creation + timeout, as `inet_frag_create` arms the timer once.
    deadline: u64,
    /// Unique id, to keep `by_deadline` keys distinct.
    uid: u64,
    /// Last-use stamp for LRU eviction.
    lru: u64,
    arrivals: u32,
    /// IPv4: largest fragment seen and largest with DF (`max_size`, `max_df_size`).
    max_size: usize,
    max_df_size: usize,
}

/// Per-fragment and per-queue bookkeeping charged on top of the frame bytes, like skb
/// truesize and `qsize`.
const FRAG_OVERHEAD: usize = std::mem::size_of::<Frag>();
const QUEUE_OVERHEAD: usize = std::mem::size_of::<Queue>() + 3 * std::mem::size_of::<FragKey>();

#[derive(Default)]
struct State {
    queues: HashMap<FragKey, Queue>,
    /// (deadline, uid) -> key: the timer wheel, walked from the front.
    by_deadline: BTreeMap<(u64, u64), FragKey>,
    /// lru stamp -> key: the LRU list `inet_frag_evictor` walked.
    by_lru: BTreeMap<u64, FragKey>,
    mem: usize,
    seq: u64,
    stats: FragStats,
}

/// A fragment, read from its packet.
struct Piece<'a> {
    key: FragKey,
    offset: u32,
    end: u32,
    more: bool,
    /// The IP bytes, where they start in the frame, and where the data starts in them.
    ip_bytes: &'a [u8],
    l3: usize,
    data: usize,
    hdr_len: usize,
    nhoff: usize,
    next: u8,
    df: bool,
    v6: bool,
}

/// Where the fragment goes and what the queue learns from it.
struct Plan {
    pos: usize,
    len: u32,
    last_in: bool,
}

impl Reassembler {
    pub fn new(cfg: FragConfig) -> Self {
        Reassembler {
            cfg,
            state: Mutex::new(State::default()),
        }
    }

    pub fn config(&self) -> FragConfig {
        self.cfg
    }

    /// [`Reassembler::push_ctx`] with context 0.
    pub fn push(&self, pkt: &Packet<'_>, frame: &[u8], now_nanos: u64) -> Push {
        self.push_ctx(0, pkt, frame, now_nanos)
    }

    /// Offers one packet. `pkt` must be the parse of `frame` (`parse_ethernet(frame)` or
    /// `parse_ip(frame)`); `ctx` separates queues of different ingress ports or zones, as
    /// the kernel's defrag `user` does. This is `ip_defrag`/`nf_ct_frag6_gather`:
    /// the queue is found or made, the fragment checked and inserted as `ip_frag_queue`
    /// does, and the datagram rebuilt once the first and last fragments and every byte
    /// between them are in.
    pub fn push_ctx(&self, ctx: u32, pkt: &Packet<'_>, frame: &[u8], now_nanos: u64) -> Push {
        let piece = match read_piece(ctx, pkt, frame) {
            Ok(None) => return Push::NotFragment,
            Ok(Some(p)) => p,
            Err(r) => {
                let mut st = self.state.lock();
                st.stats.reasm_reqds += 1;
                st.record(r);
                return Push::Dropped(r);
            }
        };
        let mut st = self.state.lock();
        st.stats.reasm_reqds += 1;
        st.expire_some(now_nanos, LAZY_EXPIRE);
        st.push(&self.cfg, piece, frame, now_nanos)
    }

    /// Reaps up to [`EXPIRE_BATCH`] timed-out queues (`ip_expire`, `nf_ct_frag6_expire`);
    /// returns how many. Call it now and then; the rest go on later calls or lazily on push.
    pub fn expire(&self, now_nanos: u64) -> usize {
        self.state.lock().expire_some(now_nanos, EXPIRE_BATCH)
    }

    /// When the next queue times out, for a caller that schedules [`Reassembler::expire`].
    pub fn next_deadline(&self) -> Option<u64> {
        self.state.lock().by_deadline.keys().next().map(|&(d, _)| d)
    }

    pub fn stats(&self) -> FragStats {
        let st = self.state.lock();
        let mut s = st.stats;
        s.queues = st.queues.len();
        s.mem = st.mem;
        s
    }
}

impl Default for Reassembler {
    fn default() -> Self {
        Reassembler::new(FragConfig::default())
    }
}

impl State {
    fn record(&mut self, r: DropReason) {
        self.stats.drops_by_reason[r.index()] += 1;
        if r == DropReason::Overlap {
            self.stats.reasm_overlaps += 1;
        }
        if r.kills_queue() {
            self.stats.reasm_fails += 1;
        }
    }

    /// Unlinks a queue and gives its memory back (`inet_frag_kill` + `inet_frag_destroy`).
    fn remove(&mut self, key: &FragKey) -> Option<Queue> {
        let q = self.queues.remove(key)?;
        self.by_deadline.remove(&(q.deadline, q.uid));
        self.by_lru.remove(&q.lru);
        self.mem = self.mem.saturating_sub(q.mem);
        Some(q)
    }

    fn expire_some(&mut self, now: u64, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some((&(deadline, _), &key)) = self.by_deadline.iter().next() else {
                break;
            };
            if deadline > now {
                break;
            }
            self.remove(&key);
            self.stats.reasm_timeout += 1;
            self.stats.reasm_fails += 1;
            n += 1;
        }
        n
    }

    /// Evicts least recently used queues other than `keep` until `need` more bytes fit
    /// under `low` (`inet_frag_evictor`, counted as `ReasmFails`).
    fn evict(&mut self, keep: &FragKey, need: usize, low: usize) {
        let mut skip = None;
        while self.mem + need > low {
            let next = match skip {
                None => self.by_lru.iter().next(),
                Some(s) => self.by_lru.range(s + 1..).next(),
            };
            let Some((&stamp, &key)) = next else { break };
            if key == *keep {
                skip = Some(stamp);
                continue;
            }
            self.remove(&key);
            self.stats.evictions += 1;
            self.stats.reasm_fails += 1;
        }
    }

    fn drop_datagram(&mut self, key: &FragKey, r: DropReason) -> Push {
        if r.kills_queue() {
            self.remove(key);
        }
        self.record(r);
        Push::Dropped(r)
    }

    fn push(&mut self, cfg: &FragConfig, p: Piece<'_>, frame: &[u8], now: u64) -> Push {
        let key = p.key;
        // A queue past its deadline is dead even if no expire() has reaped it yet.
        if self.queues.get(&key).is_some_and(|q| q.deadline <= now) {
            self.remove(&key);
            self.stats.reasm_timeout += 1;
            self.stats.reasm_fails += 1;
        }
        if let Err(r) = check_piece(cfg, &p) {
            return self.drop_datagram(&key, r);
        }
        let plan = match plan(cfg, self.queues.get(&key), &p) {
            Ok(plan) => plan,
            Err(r) => return self.drop_datagram(&key, r),
        };

        // Bounded memory: charge the frame as the kernel charges skb->truesize.
        let is_new = !self.queues.contains_key(&key);
        let cost = frame.len() + FRAG_OVERHEAD + if is_new { QUEUE_OVERHEAD } else { 0 };
        let own = self.queues.get(&key).map_or(0, |q| q.mem);
        if own + cost > cfg.high_thresh {
            return self.drop_datagram(&key, DropReason::MemoryLimit);
        }
        if self.mem + cost > cfg.high_thresh {
            self.evict(&key, cost, cfg.low_thresh);
        }

        self.seq += 1;
        let stamp = self.seq;
        let q = match self.queues.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let q = e.into_mut();
                self.by_lru.remove(&q.lru);
                q
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                let timeout = if p.v6 {
                    cfg.timeout_v6_nanos
                } else {
                    cfg.timeout_v4_nanos
                };
                let deadline = now.saturating_add(timeout);
                self.by_deadline.insert((deadline, stamp), key);
                e.insert(Queue {
                    frags: Vec::new(),
                    len: 0,
                    last_in: false,
                    meat: 0,
                    mem: QUEUE_OVERHEAD,
                    deadline,
                    uid: stamp,
                    lru: 0,
                    arrivals: 0,
                    max_size: 0,
                    max_df_size: 0,
                })
            }
        };
        q.lru = stamp;
        self.by_lru.insert(stamp, key);
        let ip_start = p.l3;
        q.frags.insert(
            plan.pos,
            Frag {
                offset: p.offset,
                end: p.end,
                arrival: q.arrivals,
                frame: frame.to_vec(),
                ip: ip_start,
                data: ip_start + p.data,
                hdr_len: p.hdr_len,
                nhoff: p.nhoff,
                next: p.next,
            },
        );
        q.arrivals += 1;
        q.len = plan.len;
        q.last_in = plan.last_in;
        q.meat += p.end - p.offset;
        let charged = frame.len() + FRAG_OVERHEAD;
        q.mem += charged;
        self.mem += charged + if is_new { QUEUE_OVERHEAD } else { 0 };
        // ip_frag_queue: the largest fragment, and the largest with DF, decide DF on the
        // reassembled header.
        let size = p.ip_bytes.len();
        q.max_size = q.max_size.max(size);
        if p.df {
            q.max_df_size = q.max_df_size.max(size);
        }

        let first_in = q.frags.first().is_some_and(|f| f.offset == 0);
        if !(first_in && q.last_in && q.meat == q.len) {
            return Push::Held;
        }
        let Some(q) = self.remove(&key) else {
            return Push::Held;
        };
        match reassemble(&q, p.v6) {
            Ok(reassembled) => {
                self.stats.reasm_oks += 1;
                let mut frags = q.frags;
                frags.sort_by_key(|f| f.arrival);
                Push::Complete {
                    reassembled,
                    frames: frags.into_iter().map(|f| f.frame).collect(),
                }
            }
            Err(r) => {
                self.record(r);
                Push::Dropped(r)
            }
        }
    }
}

/// Reads the fragment fields of `pkt`; `Ok(None)` for a packet that is not a fragment.
fn read_piece<'a>(
    ctx: u32,
    pkt: &Packet<'a>,
    frame: &[u8],
) -> Result<Option<Piece<'a>>, DropReason> {
    let ip = pkt.ip_bytes;
    let frag = match pkt.ip.frag() {
        Some(f) => f,
        None => return Ok(None),
    };
    // The frame must hold the packet where the parser found it; the frames handed back are
    // what gets forwarded, so they must be what was judged.
    let l3 = pkt.l3_offset;
    if frame.get(l3..l3 + ip.len()) != Some(ip) {
        return Err(DropReason::Malformed);
    }
    match pkt.ip {
        Ip::V4(v4) => {
            let hdr_len = usize::from(v4.header_len);
            let data_len = ip.len().checked_sub(hdr_len).ok_or(DropReason::Malformed)?;
            let offset = u32::from(frag.offset);
            Ok(Some(Piece {
                key: FragKey::V4 {
                    ctx,
                    src: v4.src,
                    dst: v4.dst,
                    id: frag.id as u16,
                    protocol: v4.protocol,
                },
                offset,
                end: offset + data_len as u32,
                more: frag.more_fragments,
                ip_bytes: ip,
                l3,
                data: hdr_len,
                hdr_len,
                nhoff: 0,
                next: v4.protocol,
                df: v4.dont_fragment,
                v6: false,
            }))
        }
        Ip::V6(v6) => {
            // find_prev_fhdr: the first fragment header and the byte that names it.
            let (nhoff, fhoff) = find_prev_fhdr(ip).ok_or(DropReason::Malformed)?;
            let fh = ip.get(fhoff..fhoff + 8).ok_or(DropReason::Malformed)?;
            let frag_off = u16::from_be_bytes([fh[2], fh[3]]);
            let offset = u32::from(frag_off & !0x7);
            let more = frag_off & 0x1 != 0;
            if offset == 0 && !more {
                // An atomic fragment (RFC 6946): processed on its own, as `ipv6_frag_rcv`
                // does, never merged with a queue that happens to share its id.
                return Ok(None);
            }
            let data = fhoff + 8;
            let data_len = ip.len().checked_sub(data).ok_or(DropReason::Malformed)?;
            if offset == 0 {
                // ipv6frag_thdr_truncated: the first fragment must hold every header through
                // the transport header's fixed part (RFC 8200 section 4.5).
                let need = match v6.protocol {
                    IPPROTO_TCP => 20,
                    IPPROTO_UDP => 8,
                    IPPROTO_ICMPV6 => 8,
                    _ => 1,
                };
                if pkt.l4_offset + need > ip.len() {
                    return Err(DropReason::IncompleteFirstFragment);
                }
            }
            Ok(Some(Piece {
                key: FragKey::V6 {
                    ctx,
                    src: v6.src,
                    dst: v6.dst,
                    id: u32::from_be_bytes([fh[4], fh[5], fh[6], fh[7]]),
                },
                offset,
                end: offset + data_len as u32,
                more,
                ip_bytes: ip,
                l3,
                data,
                hdr_len: fhoff,
                nhoff,
                next: fh[0],
                df: false,
                v6: true,
            }))
        }
    }
}

/// The offset of the next-header byte naming the first fragment header, and the fragment
/// header's offset (`find_prev_fhdr` in nf_conntrack_reasm.c).
fn find_prev_fhdr(ip: &[u8]) -> Option<(usize, usize)> {
    let mut next = *ip.get(6)?;
    let mut nhoff = 6;
    let mut off = 40;
    loop {
        let h = ip.get(off..off + 2)?;
        let len = match next {
            NEXTHDR_FRAGMENT => return Some((nhoff, off)),
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => (usize::from(h[1]) + 1) * 8,
            NEXTHDR_AUTH => (usize::from(h[1]) + 2) * 4,
            _ => return None,
        };
        nhoff = off;
        next = h[0];
        off += len;
    }
}

/// The checks that need only the fragment itself.
fn check_piece(cfg: &FragConfig, p: &Piece<'_>) -> Result<(), DropReason> {
    // IPv6: `end > IPV6_MAXPLEN` in nf_ct_frag6_queue. IPv4: ip_frag_reasm's `out_oversize`
    // (header + data > 65535), checked here with the smallest header so nothing the kernel
    // would reassemble is refused, and again with the real first header on reassembly.
    let limit = if p.v6 { IP_MAXPLEN } else { IP_MAXPLEN - 20 };
    if p.end > limit {
        return Err(DropReason::Oversize);
    }
    if p.more && p.end % 8 != 0 {
        // nf_ct_frag6_queue kills the queue; ip_frag_queue trims (`end &= ~7`). Trimming
        // would forward bytes no rule saw, so both families drop.
        return Err(DropReason::UnalignedLength);
    }
    if p.end == p.offset {
        return Err(DropReason::Empty);
    }
    if p.v6 && p.more && p.ip_bytes.len() < cfg.v6_min_nonfinal_len {
        return Err(DropReason::TinyFragment);
    }
    Ok(())
}

/// `ip_frag_queue`/`nf_ct_frag6_queue` up to the insert, without changing the queue: the
/// end bookkeeping, then `inet_frag_queue_insert`'s overlap test.
fn plan(cfg: &FragConfig, q: Option<&Queue>, p: &Piece<'_>) -> Result<Plan, DropReason> {
    let (mut len, mut last_in) = q.map_or((0, false), |q| (q.len, q.last_in));
    if !p.more {
        // "If we already have some bits beyond end or have different end, the segment is
        // corrupted."
        if last_in && p.end != len {
            return Err(DropReason::LastFragmentMismatch);
        }
        if p.end < len {
            return Err(DropReason::BeyondEnd);
        }
        last_in = true;
        len = p.end;
    } else if p.end > len {
        if last_in {
            return Err(DropReason::BeyondEnd);
        }
        len = p.end;
    }
    let Some(q) = q else {
        return Ok(Plan {
            pos: 0,
            len,
            last_in,
        });
    };
    // The fragments that end after our start; those that also start before our end overlap.
    let pos = q.frags.partition_point(|f| f.end <= p.offset);
    let mut cursor = p.offset;
    let mut overlapped = false;
    let mut same = true;
    let data = p.ip_bytes.get(p.data..).unwrap_or(&[]);
    for f in q.frags.get(pos..).unwrap_or(&[]) {
        if f.offset >= p.end {
            break;
        }
        overlapped = true;
        if f.offset > cursor {
            same = false;
            break;
        }
        let hi = f.end.min(p.end);
        let ours = data.get((cursor - p.offset) as usize..(hi - p.offset) as usize);
        let theirs = f
            .payload()
            .get((cursor - f.offset) as usize..(hi - f.offset) as usize);
        if ours.is_none() || ours != theirs {
            same = false;
            break;
        }
        cursor = hi;
    }
    if overlapped {
        // RFC 5722 with errata 3089: an exact duplicate is ignored, any other overlap kills
        // the datagram (`IPFRAG_DUP` / `IPFRAG_OVERLAP`). Unlike the kernel we require the
        // bytes to match: a same-range fragment with other bytes is an evasion attempt.
        return Err(if same && cursor >= p.end {
            DropReason::Duplicate
        } else {
            DropReason::Overlap
        });
    }
    if q.frags.len() >= cfg.max_frags {
        return Err(DropReason::TooManyFragments);
    }
    Ok(Plan { pos, len, last_in })
}

/// `ip_frag_reasm` / `nf_ct_frag6_reasm`: the first fragment's header, fixed up, followed by
/// every fragment's data in offset order. The queue is complete and contiguous.
fn reassemble(q: &Queue, v6: bool) -> Result<Vec<u8>, DropReason> {
    let first = q.frags.first().ok_or(DropReason::Malformed)?;
    let hdr = first
        .frame
        .get(first.ip..first.ip + first.hdr_len)
        .ok_or(DropReason::Malformed)?;
    let total = first.hdr_len + q.len as usize;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(hdr);
    if v6 {
        let payload_len = total - 40;
        if payload_len > IP_MAXPLEN as usize {
            return Err(DropReason::Oversize);
        }
        // Chain the fragment header's next header into the header before it, and drop the
        // fragment header (it is simply not copied).
        *out.get_mut(first.nhoff).ok_or(DropReason::Malformed)? = first.next;
        out.get_mut(4..6)
            .ok_or(DropReason::Malformed)?
            .copy_from_slice(&(payload_len as u16).to_be_bytes());
    } else {
        if total > IP_MAXPLEN as usize {
            return Err(DropReason::Oversize);
        }
        // DF only if the largest fragment carried it (ip_frag_reasm, `IPSKB_FRAG_PMTU`).
        let frag_off: u16 = if q.max_df_size != 0 && q.max_df_size == q.max_size {
            0x4000
        } else {
            0
        };
        let h = out.get_mut(..20).ok_or(DropReason::Malformed)?;
        h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        h[6..8].copy_from_slice(&frag_off.to_be_bytes());
        h[10] = 0;
        h[11] = 0;
        let c = Sum16BitWords::new().add_slice(&out).ones_complement();
        out[10..12].copy_from_slice(&c.to_ne_bytes());
    }
    for f in &q.frags {
        out.extend_from_slice(f.payload());
    }
    if out.len() != total {
        return Err(DropReason::Malformed);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{checksum, parse_ethernet, parse_ip, Frame, L4, NEXTHDR_DEST};
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    const S: u64 = NANOS_PER_SEC;
    const ETH4: [u8; 14] = [0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    const ETH6: [u8; 14] = [0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd];
    const SRC6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const DST6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    fn ipv4_checksum(h: &mut [u8]) {
        h[10] = 0;
        h[11] = 0;
        let c = Sum16BitWords::new().add_slice(h).ones_complement();
        h[10..12].copy_from_slice(&c.to_ne_bytes());
    }

    /// etherparse sets DF and id 0; the datagrams here carry id 0xbeef and no flags, so the
    /// reassembled header equals the original byte for byte.
    fn normalise_v4(ip: &mut [u8]) {
        ip[4..6].copy_from_slice(&0xbeefu16.to_be_bytes());
        ip[6] = 0;
        ip[7] = 0;
        let hl = usize::from(ip[0] & 0x0f) * 4;
        ipv4_checksum(&mut ip[..hl]);
    }

    fn udp_v4(payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(5000, 53)
            .write(&mut v, payload)
            .unwrap();
        normalise_v4(&mut v);
        v
    }

    fn tcp_v4(payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 80, 1000, 64240)
            .ack(7)
            .psh()
            .write(&mut v, payload)
            .unwrap();
        normalise_v4(&mut v);
        v
    }

    /// UDP 5353 -> 53 over IPv6; with `exts`, a hop-by-hop header (unfragmentable) and a
    /// destination-options header (fragmentable, so after the fragment header) come first.
    fn udp_v6(payload: &[u8], exts: bool) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv6(SRC6, DST6, 64)
            .udp(5353, 53)
            .write(&mut v, payload)
            .unwrap();
        if exts {
            insert_ext(&mut v, NEXTHDR_DEST);
            insert_ext(&mut v, NEXTHDR_HOP);
        }
        v
    }

    /// Puts an 8-byte extension header (PadN) right after the fixed IPv6 header.
    fn insert_ext(ip: &mut Vec<u8>, kind: u8) {
        let ext = [ip[6], 0, 1, 4, 0, 0, 0, 0];
        ip[6] = kind;
        ip.splice(40..40, ext);
        let pl = u16::from_be_bytes([ip[4], ip[5]]) + 8;
        ip[4..6].copy_from_slice(&pl.to_be_bytes());
    }

    /// An IPv4 fragment frame: `hdr` (a whole IPv4 header) with the offset, MF, total length
    /// and checksum set, then `data`.
    fn frag4_raw(hdr: &[u8], off: usize, data: &[u8], more: bool) -> Vec<u8> {
        let mut h = hdr.to_vec();
        let total = (h.len() + data.len()) as u16;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        let fo = (off / 8) as u16 | if more { 0x2000 } else { 0 };
        h[6..8].copy_from_slice(&fo.to_be_bytes());
        ipv4_checksum(&mut h);
        let mut f = ETH4.to_vec();
        f.extend_from_slice(&h);
        f.extend_from_slice(data);
        f
    }

    /// Fragment [off, end) of the data of the unfragmented IPv4 packet `ip`.
    fn frag4(ip: &[u8], off: usize, end: usize, more: bool) -> Vec<u8> {
        let hl = usize::from(ip[0] & 0x0f) * 4;
        frag4_raw(&ip[..hl], off, &ip[hl + off..hl + end], more)
    }

    /// The unfragmentable part's length and the offset of the next-header byte that will
    /// name the fragment header: hop-by-hop and routing headers stay in front.
    fn unfragmentable(ip: &[u8]) -> (usize, usize) {
        let (mut nhoff, mut off) = (6, 40);
        while matches!(ip[nhoff], NEXTHDR_HOP | NEXTHDR_ROUTING) {
            nhoff = off;
            off += (usize::from(ip[off + 1]) + 1) * 8;
        }
        (off, nhoff)
    }

    /// Fragment [off, end) of the fragmentable part of the unfragmented IPv6 packet `ip`.
    fn frag6(ip: &[u8], id: u32, off: usize, end: usize, more: bool) -> Vec<u8> {
        let (unfrag, nhoff) = unfragmentable(ip);
        let data = &ip[unfrag + off..unfrag + end];
        let mut h = ip[..unfrag].to_vec();
        let next = h[nhoff];
        h[nhoff] = NEXTHDR_FRAGMENT;
        let fo = off as u16 | u16::from(more);
        h.extend_from_slice(&[next, 0]);
        h.extend_from_slice(&fo.to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        let pl = (h.len() - 40 + data.len()) as u16;
        h[4..6].copy_from_slice(&pl.to_be_bytes());
        let mut f = ETH6.to_vec();
        f.extend_from_slice(&h);
        f.extend_from_slice(data);
        f
    }

    fn data_len(ip: &[u8]) -> usize {
        if ip[0] >> 4 == 4 {
            ip.len() - usize::from(ip[0] & 0x0f) * 4
        } else {
            ip.len() - unfragmentable(ip).0
        }
    }

    /// Cuts the datagram's data into `size`-byte fragments (the last takes the rest).
    fn fragments(ip: &[u8], size: usize) -> Vec<Vec<u8>> {
        let len = data_len(ip);
        let mut out = Vec::new();
        let mut off = 0;
        while off < len {
            let end = (off + size).min(len);
            out.push(if ip[0] >> 4 == 4 {
                frag4(ip, off, end, end < len)
            } else {
                frag6(ip, 0xdead_beef, off, end, end < len)
            });
            off = end;
        }
        out
    }

    fn push(r: &Reassembler, frame: &[u8], now: u64) -> Push {
        match parse_ethernet(frame) {
            Frame::Ip(p) => r.push(&p, frame, now),
            other => panic!("fixture does not parse: {other:?}"),
        }
    }

    /// Pushes every frame; all but the last must be held; the last completes.
    fn reassemble_all(r: &Reassembler, frames: &[Vec<u8>], now: u64) -> (Vec<u8>, Vec<Vec<u8>>) {
        let (last, rest) = frames.split_last().unwrap();
        for f in rest {
            assert_eq!(push(r, f, now), Push::Held);
        }
        match push(r, last, now) {
            Push::Complete {
                reassembled,
                frames,
            } => (reassembled, frames),
            other => panic!("expected Complete, got {other:?}"),
        }
    }

    #[test]
    fn v4_udp_in_order() {
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let ip = udp_v4(&payload);
        let frames = fragments(&ip, 1480);
        assert_eq!(frames.len(), 3);
        let r = Reassembler::default();
        let (re, out) = reassemble_all(&r, &frames, 0);
        assert_eq!(re, ip);
        assert_eq!(out, frames, "original frames, arrival order, byte for byte");
        let Frame::Ip(p) = parse_ip(&re) else {
            panic!()
        };
        assert_eq!(p.ip.frag(), None);
        let L4::Udp(u) = p.l4 else { panic!() };
        assert_eq!((u.sport, u.dport, usize::from(u.length)), (5000, 53, 3008));
        assert_eq!(checksum::verify(&p), Ok(()));
        let s = r.stats();
        assert_eq!((s.reasm_reqds, s.reasm_oks, s.reasm_fails), (3, 1, 0));
        assert_eq!((s.queues, s.mem), (0, 0));
    }

    #[test]
    fn v4_tcp_out_of_order_and_last_first() {
        let ip = tcp_v4(&[0x5a; 1000]);
        let frames = fragments(&ip, 256);
        assert_eq!(frames.len(), 4);
        for order in [[2, 0, 3, 1], [3, 2, 1, 0], [3, 0, 1, 2]] {
            let r = Reassembler::default();
            let shuffled: Vec<_> = order.iter().map(|&i| frames[i].clone()).collect();
            let (re, out) = reassemble_all(&r, &shuffled, 0);
            assert_eq!(re, ip);
            assert_eq!(out, shuffled);
            let Frame::Ip(p) = parse_ip(&re) else {
                panic!()
            };
            let L4::Tcp(t) = p.l4 else { panic!() };
            assert_eq!(
                (t.sport, t.dport, t.seq, t.payload_len),
                (40000, 80, 1000, 1000)
            );
            assert_eq!(checksum::verify(&p), Ok(()));
        }
    }

    #[test]
    fn exact_duplicates_tolerated_and_not_forwarded() {
        let ip = udp_v4(&[1; 592]);
        let f = fragments(&ip, 200);
        let r = Reassembler::default();
        assert_eq!(push(&r, &f[0], 0), Push::Held);
        assert_eq!(push(&r, &f[0], 0), Push::Dropped(DropReason::Duplicate));
        assert_eq!(push(&r, &f[1], 0), Push::Held);
        assert_eq!(push(&r, &f[0], 0), Push::Dropped(DropReason::Duplicate));
        // A fragment covering two held ones exactly, same bytes: also a duplicate.
        assert_eq!(
            push(&r, &frag4(&ip, 0, 400, true), 0),
            Push::Dropped(DropReason::Duplicate)
        );
        let got = push(&r, &f[2], 0);
        let Push::Complete { frames, .. } = got else {
            panic!("{got:?} {:?}", r.stats())
        };
        assert_eq!(frames, f);
        let s = r.stats();
        assert_eq!(s.drops(DropReason::Duplicate), 3);
        assert_eq!((s.reasm_oks, s.reasm_fails, s.reasm_reqds), (1, 0, 6));
    }

    #[test]
    fn overlaps_drop_the_datagram() {
        let ip = udp_v4(&[2; 600]);
        let f = fragments(&ip, 200);
        // Partial overlap: [0,200) then [104,304).
        let r = Reassembler::default();
        assert_eq!(push(&r, &f[0], 0), Push::Held);
        assert_eq!(
            push(&r, &frag4(&ip, 104, 304, true), 0),
            Push::Dropped(DropReason::Overlap)
        );
        assert_eq!(r.stats().queues, 0, "the queue is gone (ipq_kill)");
        // What is left cannot complete: a new queue starts and waits.
        assert_eq!(push(&r, &f[1], 0), Push::Held);
        assert_eq!(push(&r, &f[2], 0), Push::Held);
        let s = r.stats();
        assert_eq!((s.reasm_overlaps, s.reasm_fails, s.reasm_oks), (1, 1, 0));

        // Same range, other bytes: an overlap, not a duplicate.
        let r = Reassembler::default();
        assert_eq!(push(&r, &f[1], 0), Push::Held);
        let mut evil = f[1].clone();
        *evil.last_mut().unwrap() ^= 0xff;
        assert_eq!(push(&r, &evil, 0), Push::Dropped(DropReason::Overlap));

        // A fragment spanning a gap between held ones.
        let r = Reassembler::default();
        assert_eq!(push(&r, &f[0], 0), Push::Held);
        assert_eq!(push(&r, &f[2], 0), Push::Held);
        assert_eq!(
            push(&r, &frag4(&ip, 0, 400, true), 0),
            Push::Dropped(DropReason::Overlap)
        );
    }

    #[test]
    fn v4_times_out_after_30s() {
        let ip = udp_v4(&[3; 600]);
        let f = fragments(&ip, 200);
        let r = Reassembler::default();
        assert_eq!(push(&r, &f[0], 0), Push::Held);
        assert_eq!(r.next_deadline(), Some(30 * S));
        assert_eq!(r.expire(30 * S - 1), 0);
        assert_eq!(r.expire(30 * S), 1);
        assert_eq!(r.stats().reasm_timeout, 1);
        assert_eq!(push(&r, &f[1], 30 * S), Push::Held);
        assert_eq!(push(&r, &f[2], 30 * S), Push::Held, "f[0] is gone");

        // Lazily, without expire(): the queue is dead on the next push after its deadline.
        let r = Reassembler::default();
        assert_eq!(push(&r, &f[0], 0), Push::Held);
        assert_eq!(push(&r, &f[1], 29 * S), Push::Held);
        assert_eq!(push(&r, &f[2], 31 * S), Push::Held);
        let s = r.stats();
        assert_eq!((s.reasm_timeout, s.reasm_fails, s.queues), (1, 1, 1));
    }

    #[test]
    fn v6_times_out_after_60s() {
        let ip = udp_v6(&[4; 600], false);
        let f = fragments(&ip, 200);
        let r = Reassembler::default();
        assert_eq!(push(&r, &f[0], 0), Push::Held);
        assert_eq!(push(&r, &f[1], 45 * S), Push::Held);
        assert_eq!(r.expire(59 * S), 0);
        assert_eq!(r.expire(60 * S), 1);
        assert_eq!(push(&r, &f[2], 60 * S), Push::Held);
        assert_eq!(r.stats().reasm_timeout, 1);
    }

    #[test]
    fn expire_is_bounded_per_call() {
        let r = Reassembler::default();
        for id in 0..(EXPIRE_BATCH as u16 * 2 + 5) {
            let mut ip = udp_v4(&[0; 100]);
            ip[4..6].copy_from_slice(&id.to_be_bytes());
            assert_eq!(push(&r, &frag4(&ip, 0, 16, true), 0), Push::Held);
        }
        assert_eq!(r.expire(30 * S), EXPIRE_BATCH);
        assert_eq!(r.expire(30 * S), EXPIRE_BATCH);
        assert_eq!(r.expire(30 * S), 5);
        assert_eq!(r.stats().queues, 0);
    }

    #[test]
    fn memory_bound_evicts_least_recently_used() {
        let dgram = |id: u16| {
            let mut ip = udp_v4(&[9; 2992]);
            ip[4..6].copy_from_slice(&id.to_be_bytes());
            normalise_id(&mut ip);
            fragments(&ip, 1000)
        };
        fn normalise_id(ip: &mut [u8]) {
            ipv4_checksum(&mut ip[..20]);
        }
        let (a, b, c, d) = (dgram(1), dgram(2), dgram(3), dgram(4));
        // Measure what a new queue and a further fragment cost.
        let probe = Reassembler::default();
        push(&probe, &a[0], 0);
        let c1 = probe.stats().mem;
        push(&probe, &a[1], 0);
        let c2 = probe.stats().mem - c1;
        // A1, B1, C1, A2 fit; D1 does not. Evicting B alone is not enough to get under low.
        let cfg = FragConfig {
            high_thresh: 3 * c1 + c2 + c1 / 2,
            low_thresh: 2 * c1 + c2 + c1 / 2,
            ..FragConfig::default()
        };
        let r = Reassembler::new(cfg);
        for f in [&a[0], &b[0], &c[0], &a[1], &d[0]] {
            assert_eq!(push(&r, f, 0), Push::Held);
            assert!(r.stats().mem <= cfg.high_thresh);
        }
        let s = r.stats();
        assert_eq!((s.evictions, s.reasm_fails, s.queues), (2, 2, 2));
        // A was used most recently of the old ones: it survives and completes.
        assert!(matches!(push(&r, &a[2], 0), Push::Complete { .. }));
        // B was evicted: its second fragment starts over.
        assert_eq!(push(&r, &b[1], 0), Push::Held);
    }

    #[test]
    fn flood_of_incomplete_datagrams_stays_bounded() {
        let r = Reassembler::default();
        let cfg = r.config();
        let mut ip = udp_v4(&[0xee; 1472]);
        for i in 0..6000u32 {
            // Many sources and ids, each sending only a first fragment.
            ip[4..6].copy_from_slice(&(i as u16).to_be_bytes());
            ip[12..16].copy_from_slice(&(0x0a00_0000 | (i >> 16)).to_be_bytes());
            let f = frag4(&ip, 0, 1480, true);
            assert_eq!(push(&r, &f, u64::from(i) * 1000), Push::Held);
            assert!(r.stats().mem <= cfg.high_thresh);
        }
        let s = r.stats();
        assert!(s.evictions > 0);
        assert!(s.queues < cfg.high_thresh / 1480);
        assert_eq!(s.reasm_fails, s.evictions);
        // An honest datagram still gets through the flood.
        let honest = udp_v4(&[7; 3000]);
        let (re, _) = reassemble_all(&r, &fragments(&honest, 1480), 10 * S);
        assert_eq!(re, honest);
    }

    #[test]
    fn single_datagram_over_the_limit() {
        let cfg = FragConfig {
            high_thresh: 2500,
            low_thresh: 2000,
            ..FragConfig::default()
        };
        let r = Reassembler::new(cfg);
        let ip = udp_v4(&[5; 3000]);
        let f = fragments(&ip, 1480);
        assert_eq!(push(&r, &f[0], 0), Push::Held);
        assert_eq!(push(&r, &f[1], 0), Push::Dropped(DropReason::MemoryLimit));
        assert_eq!(r.stats().mem, 0);
    }

    #[test]
    fn too_many_fragments() {
        let ip = udp_v4(&[6; 65 * 8 - 8]);
        let f = fragments(&ip, 8);
        assert_eq!(f.len(), 65);
        let r = Reassembler::default();
        for fr in &f[..64] {
            assert_eq!(push(&r, fr, 0), Push::Held);
        }
        assert_eq!(
            push(&r, &f[64], 0),
            Push::Dropped(DropReason::TooManyFragments)
        );
        assert_eq!(r.stats().queues, 0);
    }

    #[test]
    fn length_rules() {
        let ip = udp_v4(&[8; 600]);
        let hdr = &ip[..20];
        let r = Reassembler::default();
        // Non-final, not a multiple of 8.
        assert_eq!(
            push(&r, &frag4(&ip, 0, 100, true), 0),
            Push::Dropped(DropReason::UnalignedLength)
        );
        // No data.
        assert_eq!(
            push(&r, &frag4_raw(hdr, 8, &[], true), 0),
            Push::Dropped(DropReason::Empty)
        );
        // Past 65535 with the header.
        assert_eq!(
            push(&r, &frag4_raw(hdr, 65528, &[0; 16], false), 0),
            Push::Dropped(DropReason::Oversize)
        );
        // Two final fragments that disagree.
        assert_eq!(push(&r, &frag4(&ip, 400, 608, false), 0), Push::Held);
        assert_eq!(
            push(&r, &frag4(&ip, 400, 600, false), 0),
            Push::Dropped(DropReason::LastFragmentMismatch)
        );
        // Data past the end a final fragment set.
        assert_eq!(push(&r, &frag4(&ip, 400, 608, false), 0), Push::Held);
        assert_eq!(
            push(&r, &frag4_raw(hdr, 608, &[0; 8], true), 0),
            Push::Dropped(DropReason::BeyondEnd)
        );
        // A final fragment ending before data held.
        assert_eq!(push(&r, &frag4(&ip, 200, 400, true), 0), Push::Held);
        assert_eq!(
            push(&r, &frag4(&ip, 104, 200, false), 0),
            Push::Dropped(DropReason::BeyondEnd)
        );
        let s = r.stats();
        for reason in [
            DropReason::UnalignedLength,
            DropReason::Empty,
            DropReason::Oversize,
            DropReason::LastFragmentMismatch,
        ] {
            assert_eq!(s.drops(reason), 1, "{reason:?}");
        }
        assert_eq!(s.drops(DropReason::BeyondEnd), 2);
        assert_eq!(s.reasm_fails, 6);
        assert_eq!(s.queues, 0);
    }

    #[test]
    fn v6_extension_headers_before_and_after_the_fragment_header() {
        let payload: Vec<u8> = (0..2500u32).map(|i| (i ^ (i >> 3)) as u8).collect();
        let ip = udp_v6(&payload, true);
        let frames = fragments(&ip, 1232);
        assert_eq!(frames.len(), 3);
        // The fragment header sits after hop-by-hop, before destination options.
        let Frame::Ip(p) = parse_ethernet(&frames[0]) else {
            panic!()
        };
        assert_eq!(p.ip_bytes[40], NEXTHDR_FRAGMENT);
        assert_eq!(p.ip_bytes[48], NEXTHDR_DEST);
        let r = Reassembler::default();
        let order = [frames[2].clone(), frames[0].clone(), frames[1].clone()];
        let (re, out) = reassemble_all(&r, &order, 0);
        assert_eq!(
            re, ip,
            "fragment header removed, next header chained, length fixed"
        );
        assert_eq!(out, order);
        let Frame::Ip(p) = parse_ip(&re) else {
            panic!()
        };
        let Ip::V6(v6) = p.ip else { panic!() };
        assert_eq!(v6.frag, None);
        let L4::Udp(u) = p.l4 else { panic!() };
        assert_eq!((u.sport, u.dport), (5353, 53));
        assert_eq!(checksum::verify(&p), Ok(()));
    }

    #[test]
    fn v6_plain() {
        let ip = udp_v6(&[0x42; 3000], false);
        let frames = fragments(&ip, 1448);
        let r = Reassembler::default();
        let (re, out) = reassemble_all(&r, &frames, 0);
        assert_eq!(re, ip);
        assert_eq!(out, frames);
    }

    #[test]
    fn v6_incomplete_first_fragment_and_tiny_fragments() {
        // The first fragment holds the destination options but no UDP header.
        let ip = udp_v6(&[1; 600], true);
        let r = Reassembler::default();
        assert_eq!(
            push(&r, &frag6(&ip, 1, 0, 8, true), 0),
            Push::Dropped(DropReason::IncompleteFirstFragment)
        );
        // Four bytes of UDP are not enough either; sixteen are.
        let ip = udp_v6(&[1; 600], false);
        let short = frag6(&ip, 2, 0, 8, true);
        let mut cut = short[..short.len() - 4].to_vec();
        cut[14 + 5] -= 4;
        assert_eq!(
            push(&r, &cut, 0),
            Push::Dropped(DropReason::IncompleteFirstFragment)
        );
        assert_eq!(push(&r, &frag6(&ip, 2, 0, 16, true), 0), Push::Held);
        // The kernel has no minimum for later fragments; by default neither do we.
        assert_eq!(push(&r, &frag6(&ip, 2, 16, 24, true), 0), Push::Held);
        let strict = Reassembler::new(FragConfig {
            v6_min_nonfinal_len: 1280,
            ..FragConfig::default()
        });
        assert_eq!(
            push(&strict, &frag6(&ip, 3, 16, 24, true), 0),
            Push::Dropped(DropReason::TinyFragment)
        );
        // A small final fragment is fine.
        assert_eq!(
            push(&strict, &frag6(&ip, 3, 600, 608, false), 0),
            Push::Held
        );
        assert_eq!(strict.stats().drops(DropReason::TinyFragment), 1);
    }

    #[test]
    fn v6_oversize() {
        let ip = udp_v6(&[1; 64], false);
        let mut f = frag6(&ip, 9, 0, 16, false);
        // Offset 65528 with 16 bytes: past IPV6_MAXPLEN.
        let fo = 65528u16;
        f[14 + 42..14 + 44].copy_from_slice(&fo.to_be_bytes());
        let r = Reassembler::default();
        assert_eq!(push(&r, &f, 0), Push::Dropped(DropReason::Oversize));
    }

    #[test]
    fn not_fragments() {
        let r = Reassembler::default();
        let mut frame = ETH4.to_vec();
        frame.extend_from_slice(&udp_v4(&[0; 40]));
        assert_eq!(push(&r, &frame, 0), Push::NotFragment);
        // An IPv6 atomic fragment (offset 0, M=0) is handled on its own (RFC 6946).
        let ip = udp_v6(&[0; 40], false);
        let atomic = frag6(&ip, 5, 0, 48, false);
        assert_eq!(push(&r, &atomic, 0), Push::NotFragment);
        assert_eq!(r.stats(), FragStats::default());
    }

    #[test]
    fn queues_keyed_by_id_protocol_and_context() {
        let ip = udp_v4(&[1; 592]);
        let f = fragments(&ip, 200);
        let r = Reassembler::default();
        fn parse(fr: &[u8]) -> Packet<'_> {
            match parse_ethernet(fr) {
                Frame::Ip(p) => p,
                _ => panic!(),
            }
        }
        // The same datagram arriving on two ports is two queues.
        assert_eq!(r.push_ctx(1, &parse(&f[0]), &f[0], 0), Push::Held);
        assert_eq!(r.push_ctx(2, &parse(&f[1]), &f[1], 0), Push::Held);
        assert_eq!(r.push_ctx(1, &parse(&f[2]), &f[2], 0), Push::Held);
        assert!(matches!(
            r.push_ctx(1, &parse(&f[1]), &f[1], 0),
            Push::Complete { .. }
        ));
        // Another id is another datagram.
        let mut other = f[1].clone();
        other[14 + 5] ^= 1;
        ipv4_checksum(&mut other[14..34]);
        assert_eq!(push(&r, &f[0], 0), Push::Held);
        assert_eq!(push(&r, &other, 0), Push::Held);
        assert_eq!(r.stats().queues, 3);
    }

    #[test]
    fn frame_must_hold_the_packet() {
        let ip = udp_v4(&[1; 600]);
        let f = fragments(&ip, 200);
        let r = Reassembler::default();
        let Frame::Ip(p) = parse_ethernet(&f[0]) else {
            panic!()
        };
        assert_eq!(r.push(&p, &f[1], 0), Push::Dropped(DropReason::Malformed));
        // parse_ip on the bare IP bytes with the same bytes as the frame is fine.
        let Frame::Ip(p) = parse_ip(&f[0][14..]) else {
            panic!()
        };
        assert_eq!(r.push(&p, &f[0][14..], 0), Push::Held);
    }

    #[test]
    fn garbage_never_panics() {
        let v4 = udp_v4(&[0x11; 300]);
        let v6 = udp_v6(&[0x22; 300], true);
        let mut fixtures = fragments(&v4, 104);
        fixtures.extend(fragments(&v6, 104));
        let r = Reassembler::new(FragConfig {
            high_thresh: 64 * 1024,
            low_thresh: 32 * 1024,
            ..FragConfig::default()
        });
        let mut now = 0;
        for f in &fixtures {
            for n in 0..=f.len() {
                if let Frame::Ip(p) = parse_ethernet(&f[..n]) {
                    let _ = r.push(&p, &f[..n], now);
                }
            }
            for i in 14..f.len().min(14 + 80) {
                for v in [0x00, 0x01, 0x07, 0x2c, 0x3c, 0x80, 0xff] {
                    let mut g = f.clone();
                    g[i] = v;
                    now += 1000;
                    if let Frame::Ip(p) = parse_ethernet(&g) {
                        if let Push::Complete { reassembled, .. } = r.push(&p, &g, now) {
                            let _ = parse_ip(&reassembled);
                        }
                    }
                }
            }
        }
        r.expire(u64::MAX);
        assert!(r.stats().mem <= 64 * 1024);
    }

    /// A small xorshift, so a proptest seed picks the order and the duplicates.
    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Any fragmentation (sizes multiples of 8, at most 64 pieces), in any order, with
        /// duplicates anywhere before completion, reassembles to the original datagram and
        /// releases each original frame exactly once, in arrival order.
        #[test]
        fn random_fragmentations_reassemble(
            payload in prop::collection::vec(any::<u8>(), 0..2000),
            units in prop::collection::vec(4usize..=40, 64),
            v6 in any::<bool>(),
            exts in any::<bool>(),
            seed in 1u64..,
            dup_rate in 0u64..4,
        ) {
            let ip = if v6 { udp_v6(&payload, exts) } else { udp_v4(&payload) };
            let len = data_len(&ip);
            let mut pieces = Vec::new();
            let mut off = 0;
            for u in &units {
                if off >= len {
                    break;
                }
                let end = (off + u * 8).min(len);
                pieces.push(if v6 {
                    frag6(&ip, 0x1234_5678, off, end, end < len)
                } else {
                    frag4(&ip, off, end, end < len)
                });
                off = end;
            }
            // A single piece is no fragment at all (or an IPv6 atomic fragment).
            prop_assume!(off >= len && pieces.len() > 1);
            let mut s = seed;
            let mut order: Vec<usize> = (0..pieces.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, (xorshift(&mut s) % (i as u64 + 1)) as usize);
            }
            // Duplicates: re-send an already sent piece now and then.
            let mut seq = Vec::new();
            for (k, &i) in order.iter().enumerate() {
                seq.push(i);
                if k + 1 < order.len() && xorshift(&mut s) % 4 < dup_rate {
                    seq.push(order[(xorshift(&mut s) % (k as u64 + 1)) as usize]);
                }
            }
            let r = Reassembler::default();
            let mut sent = Vec::new();
            let mut done = None;
            for (n, &i) in seq.iter().enumerate() {
                let first_time = !sent.contains(&i);
                match push(&r, &pieces[i], n as u64) {
                    Push::Held => prop_assert!(first_time),
                    Push::Dropped(DropReason::Duplicate) => prop_assert!(!first_time),
                    Push::Complete { reassembled, frames } => {
                        prop_assert_eq!(n, seq.len() - 1);
                        done = Some((reassembled, frames));
                    }
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
                if first_time {
                    sent.push(i);
                }
            }
            let (re, frames) = done.expect("completed");
            prop_assert_eq!(&re, &ip);
            let expected: Vec<Vec<u8>> = sent.iter().map(|&i| pieces[i].clone()).collect();
            prop_assert_eq!(frames, expected);
            let Frame::Ip(p) = parse_ip(&re) else { panic!() };
            prop_assert_eq!(checksum::verify(&p), Ok(()));
            let st = r.stats();
            prop_assert_eq!((st.reasm_oks, st.reasm_fails, st.queues, st.mem), (1, 0, 0, 0));
            prop_assert_eq!(st.reasm_reqds, seq.len() as u64);
        }
    }
}
