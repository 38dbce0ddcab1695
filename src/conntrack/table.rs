//! The connection table: one table shared by every worker thread, on dashmap, with both
//! directions' tuples leading to the same [`Conn`].
//!
//! Owns insertion (`__nf_conntrack_confirm`: both tuples or neither), removal, the bound
//! `nf_conntrack_max`, eviction when full (`early_drop`), and expiry without a stop-the-world
//! sweep: entries past their timeout are reaped lazily when a lookup meets them, and by
//! [`Table::gc_step`], an incremental bounded scan the caller runs (the kernel's
//! `gc_worker`). Must not know protocols' rules of validity, packets or rules.
//!
//! Layout: `map` indexes tuples (two keys per connection, each holding an `Arc`), sharded
//! by dashmap; `buckets` are small lists of the connections grouped by the hash of their
//! ORIGINAL tuple, which is what the GC walks and what early drop scans "near the new
//! entry's bucket" (`NF_CT_EVICTION_RANGE` consecutive buckets). A bucket only ever grows on
//! insert and shrinks in the GC, so killed entries linger in a bucket (not in `map`) until
//! the GC passes. Lock order: bucket -> map shard -> connection; nothing takes them in any
//! other order.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use parking_lot::Mutex;

use super::conn::{Conn, ConnRef};
use super::proto::{tcp, Dir, ProtoState};
use super::status;
use super::tuple::Tuple;

/// Capacity reserved in each index at creation, as keys per connection the table may hold:
/// `map` holds two (ORIGINAL and REPLY), `bysource` at most one. See [`Table::new`].
const MAP_KEYS_PER_CONN: usize = 2;
const BYSOURCE_KEYS_PER_CONN: usize = 1;

/// `NF_CT_EVICTION_RANGE`: buckets scanned by early drop.
pub const EVICTION_RANGE: usize = 8;
const NS: u64 = 1_000_000_000;
/// `GC_SCAN_INTERVAL_MAX`, `GC_SCAN_INTERVAL_MIN`, `GC_SCAN_INTERVAL_CLAMP` (ns).
const GC_SCAN_INTERVAL_MAX: u64 = 60 * NS;
const GC_SCAN_INTERVAL_MIN: u64 = NS;
const GC_SCAN_INTERVAL_CLAMP: u64 = 300 * NS;
/// `GC_SCAN_INITIAL_COUNT`: the average starts as if this many entries had 60 s left, so a
/// few entries with a short timeout do not make the GC run every second.
const GC_SCAN_INITIAL_COUNT: i64 = 100;
/// `NF_CT_DAY` (ns): what `nf_ct_offload_timeout` gives an offloaded entry.
const OFFLOAD_DAY: u64 = 86_400 * NS;
/// Average entries per GC bucket when the table is full (the kernel's hash chains are ~1;
/// a few more keeps the bucket array small).
const ENTRIES_PER_BUCKET: usize = 8;

type Hasher = foldhash::fast::RandomState;

/// The key of [`Table::bysource`]: the tuple's source only (`hash_by_src`, `same_src`).
fn source_key(t: &Tuple) -> Tuple {
    Tuple {
        dst: super::tuple::Addr::default(),
        dst_id: 0,
        ..*t
    }
}

/// Why a connection could not be inserted.
#[derive(Clone, Debug)]
pub enum InsertError {
    /// The ORIGINAL tuple is already in the table (another packet of the same flow was
    /// confirmed first): the existing entry.
    Clash(ConnRef),
    /// The REPLY tuple belongs to another connection.
    ReplyTaken,
}

/// `gc_worker`'s running average of the live entries' timeouts (`next_run`, `count`, ns):
/// `next_run += (clamp(timeout) - next_run) / ++count`.
#[derive(Clone, Copy, Debug)]
struct GcAverage {
    next_run: u64,
    count: i64,
}

impl Default for GcAverage {
    fn default() -> Self {
        GcAverage {
            next_run: GC_SCAN_INTERVAL_MAX,
            count: GC_SCAN_INITIAL_COUNT,
        }
    }
}

impl GcAverage {
    fn add(&mut self, left: u64) {
        let t = left.clamp(GC_SCAN_INTERVAL_MIN, GC_SCAN_INTERVAL_CLAMP) as i64;
        self.count += 1;
        let step = (t - self.next_run as i64) / self.count;
        self.next_run = (self.next_run as i64 + step) as u64;
    }
}

/// Where the paced GC is ([`Table::gc_paced`]): the pass's next bucket (0 between passes),
/// its average so far, when it started, and when the next one may start (ns).
#[derive(Debug, Default)]
struct GcPace {
    next_bucket: usize,
    average: GcAverage,
    start: u64,
    resume_at: u64,
}

pub struct Table {
    map: DashMap<Tuple, ConnRef, Hasher>,
    /// `nf_nat_bysource`: connections that went through source NAT (a binding or a null
    /// binding), by the source of their ORIGINAL tuple ([`source_key`]), for
    /// `find_appropriate_src`. Entries leave with their connection ([`Table::remove`]).
    bysource: DashMap<Tuple, Vec<Weak<Conn>>, Hasher>,
    buckets: Box<[Mutex<Vec<ConnRef>>]>,
    bucket_mask: usize,
    shards: usize,
    count: AtomicUsize,
    max: usize,
    gc_cursor: AtomicUsize,
    pace: Mutex<GcPace>,
    /// Offloaded connections removed so far (see [`Table::offloaded_removed`]).
    offloaded_removed: AtomicU64,
    /// Set when a packet was dropped because nothing could be evicted; the GC then evicts
    /// harder while the table is >= 95 % full (`gc_worker`'s `early_drop`).
    early_drop_pending: AtomicBool,
}

impl Table {
    /// A table bounded to `max` connections, with `shards` dashmap shards (a power of two).
    ///
    /// Both indexes are sized for `max` connections here, as the kernel allocates its hash
    /// buckets when the table is created: a table that grew on demand kept resizing under
    /// churn at a steady population (hashbrown resizes, rather than rehashing in place, when
    /// deleted slots use up a shard's room while it is more than half full), so the memory
    /// held stepped up at an unpredictable moment and the shard stayed write-locked for the
    /// copy while workers waited. Sized for `max`, a shard stays at most half full until the
    /// table nears its bound; at the bound, churn can still double a shard once, which is
    /// the worst case (see the README's Reliability section). The slots' pages are only
    /// touched as entries land in them.
    pub fn new(max: usize, shards: usize) -> Table {
        let nbuckets = (max / ENTRIES_PER_BUCKET)
            .clamp(64, 1 << 20)
            .next_power_of_two();
        let buckets = (0..nbuckets).map(|_| Mutex::new(Vec::new())).collect();
        let shards = shards.max(2).next_power_of_two();
        Table {
            map: DashMap::with_capacity_and_hasher_and_shard_amount(
                max * MAP_KEYS_PER_CONN,
                Hasher::default(),
                shards,
            ),
            bysource: DashMap::with_capacity_and_hasher_and_shard_amount(
                max * BYSOURCE_KEYS_PER_CONN,
                Hasher::default(),
                shards,
            ),
            buckets,
            bucket_mask: nbuckets - 1,
            shards,
            count: AtomicUsize::new(0),
            max,
            gc_cursor: AtomicUsize::new(0),
            pace: Mutex::new(GcPace::default()),
            offloaded_removed: AtomicU64::new(0),
            early_drop_pending: AtomicBool::new(false),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }
    /// Connections in the table (`nf_conntrack_count`).
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
    fn bucket_of(&self, t: &Tuple) -> usize {
        (self.map.hasher().hash_one(t) as usize) & self.bucket_mask
    }

    /// The connection `t` belongs to and the direction it matched, if present and not
    /// expired. An expired entry met here is removed and returned as the second value
    /// (for the DESTROY event).
    pub fn find(&self, t: &Tuple, now: u64) -> (Option<(ConnRef, Dir)>, Option<ConnRef>) {
        let hit = match self.map.get(t) {
            Some(r) => {
                let c = r.value().clone();
                let dir = if *c.orig() == *t {
                    Dir::Original
                } else {
                    Dir::Reply
                };
                (c, dir)
            }
            None => return (None, None),
        };
        if hit.0.is_expired(now) {
            let dead = hit.0;
            if self.remove(&dead) {
                return (None, Some(dead));
            }
            return (None, None);
        }
        (Some(hit), None)
    }

    /// `nf_conntrack_tuple_taken`: a live connection (not expired, not dying) holds `t` in
    /// either direction. NAT asks it of every candidate REPLY tuple.
    pub fn taken(&self, t: &Tuple, now: u64) -> bool {
        self.map
            .get(t)
            .is_some_and(|c| !c.is_expired(now) && !c.is_dying())
    }

    /// Inserts both tuples of `conn`, or neither (`__nf_conntrack_confirm`). An expired or
    /// dying entry holding a tuple is replaced.
    pub fn insert(&self, conn: &ConnRef, now: u64) -> Result<(), InsertError> {
        let orig = *conn.orig();
        let reply = conn.reply();
        let mut replaced: Option<ConnRef> = None;
        match self.map.entry(orig) {
            Entry::Occupied(mut e) => {
                let old = e.get();
                if old.is_expired(now) || old.is_dying() {
                    replaced = Some(e.insert(conn.clone()));
                } else {
                    return Err(InsertError::Clash(old.clone()));
                }
            }
            Entry::Vacant(v) => {
                v.insert(conn.clone());
            }
        }
        let reply_ok = match self.map.entry(reply) {
            Entry::Occupied(mut e) => {
                let old = e.get();
                if Arc::ptr_eq(old, conn) {
                    true
                } else if old.is_expired(now)
                    || old.is_dying()
                    || replaced.as_ref().is_some_and(|r| Arc::ptr_eq(r, old))
                {
                    let o = e.insert(conn.clone());
                    if replaced.is_none() {
                        replaced = Some(o);
                    }
                    true
                } else {
                    false
                }
            }
            Entry::Vacant(v) => {
                v.insert(conn.clone());
                true
            }
        };
        if !reply_ok {
            self.map.remove_if(&orig, |_, v| Arc::ptr_eq(v, conn));
            return Err(InsertError::ReplyTaken);
        }
        if let Some(old) = replaced {
            // The entry we displaced loses its other key too.
            self.remove(&old);
        }
        conn.set_status(status::CONFIRMED);
        self.count.fetch_add(1, Ordering::Relaxed);
        let b = self.bucket_of(&orig);
        self.buckets[b].lock().push(conn.clone());
        Ok(())
    }

    /// Files a confirmed connection that went through source NAT under its source
    /// (`nf_nat_setup_info` adds it to `nf_nat_bysource`).
    pub fn bysource_add(&self, conn: &ConnRef) {
        let mut v = self.bysource.entry(source_key(conn.orig())).or_default();
        v.push(Arc::downgrade(conn));
    }

    /// The REPLY tuples of live connections from the same source as `orig` (address, port,
    /// protocol), most recent first, as `find_appropriate_src` walks them.
    pub fn bysource_replies(&self, orig: &Tuple, now: u64) -> Vec<Tuple> {
        let Some(v) = self.bysource.get(&source_key(orig)) else {
            return Vec::new();
        };
        v.iter()
            .rev()
            .filter_map(Weak::upgrade)
            .filter(|c| !c.is_dying() && !c.is_expired(now))
            .map(|c| c.reply())
            .collect()
    }

    /// Unlinks `conn` (`nf_ct_delete`). Returns false if someone else already did.
    pub fn remove(&self, conn: &ConnRef) -> bool {
        let prev = conn.set_status(status::DYING);
        if prev & status::DYING != 0 {
            return false;
        }
        if prev & status::OFFLOAD != 0 {
            self.offloaded_removed.fetch_add(1, Ordering::Relaxed);
        }
        if prev & status::SRC_NAT_DONE != 0 {
            let key = source_key(conn.orig());
            let ptr = Arc::as_ptr(conn);
            if let Entry::Occupied(mut e) = self.bysource.entry(key) {
                e.get_mut()
                    .retain(|w| w.as_ptr() != ptr && w.strong_count() > 0);
                if e.get().is_empty() {
                    e.remove();
                }
            }
        }
        self.map.remove_if(conn.orig(), |_, v| Arc::ptr_eq(v, conn));
        self.map
            .remove_if(&conn.reply(), |_, v| Arc::ptr_eq(v, conn));
        if prev & status::CONFIRMED != 0 {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        true
    }

    /// Makes room for one connection whose ORIGINAL tuple is `t` (`early_drop`): scans the
    /// [`EVICTION_RANGE`] buckets from `t`'s and evicts the entry that would expire first
    /// among those that are not ASSURED (expired entries are reaped in passing). Returns the
    /// evicted or reaped entries; empty if nothing could go.
    pub fn early_drop(&self, t: &Tuple, now: u64) -> Vec<ConnRef> {
        let start = self.bucket_of(t);
        let mut out = Vec::new();
        for i in 0..EVICTION_RANGE.min(self.buckets.len()) {
            let b = (start + i) & self.bucket_mask;
            let mut list = self.buckets[b].lock();
            let mut victim: Option<usize> = None;
            let mut j = 0;
            while j < list.len() {
                let c = &list[j];
                if c.is_dying() {
                    list.swap_remove(j);
                    continue;
                }
                if c.is_expired(now) {
                    let c = list.swap_remove(j);
                    if self.remove(&c) {
                        out.push(c);
                    }
                    continue;
                }
                if !c.is_assured() && victim.is_none_or(|v| list[v].expires() > c.expires()) {
                    victim = Some(j);
                }
                j += 1;
            }
            if let Some(v) = victim {
                let c = list.swap_remove(v);
                if self.remove(&c) {
                    out.push(c);
                }
            }
            if !out.is_empty() {
                return out;
            }
        }
        self.early_drop_pending.store(true, Ordering::Relaxed);
        out
    }

    /// One bounded GC step (`gc_worker`'s scan, unpaced): scans the next `buckets` buckets,
    /// reaps expired entries into `reaped` and forgets killed ones. While a drop for lack of
    /// room is pending and the table is at least 95 % full, it also evicts entries that are
    /// not ASSURED or whose TCP state may be dropped early (`tcp_can_early_drop`). Returns
    /// the number of buckets scanned. The appliance paces its scans with [`Table::gc_paced`].
    pub fn gc_step(&self, now: u64, buckets: usize, reaped: &mut Vec<ConnRef>) -> usize {
        let n = buckets.min(self.buckets.len());
        let start = self.gc_cursor.fetch_add(n, Ordering::Relaxed);
        self.gc_scan(start, n, now, reaped, None);
        n
    }

    /// The GC as the kernel's `gc_worker` paces it (since Linux 5.17): a pass scans every
    /// bucket, at most `budget` buckets a call, and keeps a running average of the live
    /// entries' timeouts, each clamped to 1-300 s (`GC_SCAN_INTERVAL_CLAMP`), starting from
    /// 60 s as if 100 entries had it (`GC_SCAN_INITIAL_COUNT`); offloaded entries are left out
    /// of it. The next pass starts that average after this one did, clamped to 1-60 s. A
    /// table of established TCP connections is thus scanned once a minute, one of short UDP
    /// flows every few seconds. A drop for lack of room starts a pass at once (the kernel
    /// waits for its next one). Expired entries a pass has not reached yet are gone for
    /// lookups, listings and early drop already; only their DESTROY event and the count wait
    /// for it, as in the kernel. Returns the number of buckets scanned.
    pub fn gc_paced(&self, now: u64, budget: usize, reaped: &mut Vec<ConnRef>) -> usize {
        let mut pace = self.pace.lock();
        if now < pace.resume_at && !self.early_drop_pending.load(Ordering::Relaxed) {
            return 0;
        }
        if pace.next_bucket == 0 {
            pace.average = GcAverage::default();
            pace.start = now;
        }
        let n = budget.max(1).min(self.buckets.len() - pace.next_bucket);
        let mut average = pace.average;
        self.gc_scan(pace.next_bucket, n, now, reaped, Some(&mut average));
        pace.average = average;
        pace.next_bucket += n;
        if pace.next_bucket == self.buckets.len() {
            pace.next_bucket = 0;
            let next_run = average
                .next_run
                .clamp(GC_SCAN_INTERVAL_MIN, GC_SCAN_INTERVAL_MAX);
            let took = now.saturating_sub(pace.start).max(1);
            pace.resume_at = now + next_run.saturating_sub(took);
        }
        n
    }

    /// When the paced GC ([`Table::gc_paced`]) starts its next pass, if it is waiting (ns).
    pub fn gc_next_pass(&self) -> Option<u64> {
        let pace = self.pace.lock();
        (pace.next_bucket == 0).then_some(pace.resume_at)
    }

    /// Scans `n` buckets from `start` (see [`Table::gc_step`]); the paced GC also gathers the
    /// live entries' timeouts into `average`.
    fn gc_scan(
        &self,
        start: usize,
        n: usize,
        now: u64,
        reaped: &mut Vec<ConnRef>,
        mut average: Option<&mut GcAverage>,
    ) {
        let pressure =
            self.early_drop_pending.load(Ordering::Relaxed) && self.count() >= self.max / 100 * 95;
        if self.early_drop_pending.load(Ordering::Relaxed) && !pressure {
            self.early_drop_pending.store(false, Ordering::Relaxed);
        }
        for i in 0..n {
            let b = (start + i) & self.bucket_mask;
            let mut list = self.buckets[b].lock();
            list.retain(|c| {
                if c.is_dying() {
                    return false;
                }
                if c.is_expired(now) {
                    if self.remove(c) {
                        reaped.push(c.clone());
                    }
                    return false;
                }
                if c.status() & status::OFFLOAD != 0 {
                    // nf_ct_offload_timeout: the flowtable keeps it; not in the average.
                    if c.expires().0.saturating_sub(now) < OFFLOAD_DAY / 2 {
                        c.expires.store(now + OFFLOAD_DAY, Ordering::Relaxed);
                    }
                    if !pressure {
                        return true;
                    }
                } else if let Some(a) = average.as_deref_mut() {
                    a.add(c.expires().0 - now);
                }
                let evict = pressure
                    && (!c.is_assured()
                        || matches!(c.proto_state(), ProtoState::Tcp(t) if tcp::can_early_drop(&t)));
                if evict {
                    if self.remove(c) {
                        reaped.push(c.clone());
                    }
                    return false;
                }
                true
            });
        }
    }

    /// How many connections were removed while a flowtable had them (`IPS_OFFLOAD`): the
    /// flowtable's gc looks for their flows when it changes.
    pub fn offloaded_removed(&self) -> u64 {
        self.offloaded_removed.load(Ordering::Relaxed)
    }

    /// Number of GC buckets (a full GC pass is this many bucket steps).
    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    /// Every live connection (one per connection, from the ORIGINAL keys).
    pub fn conns(&self) -> Vec<ConnRef> {
        self.map
            .iter()
            .filter(|r| *r.value().orig() == *r.key() && !r.value().is_dying())
            .map(|r| r.value().clone())
            .collect()
    }

    /// Number of tuple keys in the index (twice the connections).
    pub fn keys(&self) -> usize {
        self.map.len()
    }

    /// Approximate heap bytes held by the indexes and the GC buckets (for the memory
    /// report): the indexes' slots are allocated for `max` connections at creation.
    pub fn index_bytes(&self) -> usize {
        let map = dashmap_bytes::<Tuple, ConnRef>(
            self.map.len(),
            self.max * MAP_KEYS_PER_CONN,
            self.shards,
        );
        let bysource = dashmap_bytes::<Tuple, Vec<Weak<Conn>>>(
            self.bysource.len(),
            self.max * BYSOURCE_KEYS_PER_CONN,
            self.shards,
        );
        let buckets: usize = self
            .buckets
            .iter()
            .map(|b| {
                std::mem::size_of::<Mutex<Vec<ConnRef>>>()
                    + b.lock().capacity() * std::mem::size_of::<ConnRef>()
            })
            .sum();
        map + bysource + buckets
    }
}

/// Bytes of a dashmap of `shards` shards holding `len` keys, created with room for
/// `reserved`. dashmap has no capacity accessor without the raw API: hashbrown gives a shard
/// the next power of two >= its capacity * 8 / 7 slots, each the pair and a control byte.
/// (A shard that doubled under churn at the bound is not seen here.)
fn dashmap_bytes<K, V>(len: usize, reserved: usize, shards: usize) -> usize {
    let slot = std::mem::size_of::<(K, dashmap::SharedValue<V>)>() + 1;
    let per_shard = len.max(reserved).div_ceil(shards).max(1);
    shards * (per_shard * 8).div_ceil(7).next_power_of_two() * slot
}

/// What [`Conn`] weighs, heap allocation header included (`Arc`'s two counters).
pub const CONN_BYTES: usize = std::mem::size_of::<Conn>() + 2 * std::mem::size_of::<usize>();
