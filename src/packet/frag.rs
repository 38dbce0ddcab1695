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
//! - an exact-range duplicate is tolerated only if its bytes match (the kernel's
//!   `IPFRAG_DUP` does not compare bytes); a same-range fragment with other bytes is an
//!   overlap;
//! - a first IPv6 fragment without the whole transport header (RFC 8200 section 4.5) is
//!   dropped; `nf_ct_frag6_gather` lets it through unqueued and leaves the drop to the
//!   receiving host's `ipv6_frag_rcv`;
//! - past `high_thresh` the least recently used queues are evicted down to `low_thresh`
//!   (the pre-4.17 `inet_frag_evictor`); kernels since 4.17 refuse new fragments instead;
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
        self.state
            .lock()
            .by_deadline
            .keys()
            .next()
            .map(|&(d, _)| d)
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
