//! The expectation table (`nf_conntrack_expect.c`): connections a helper has seen announced
//! on a control connection (an FTP data connection, SIP media), which become RELATED to their
//! master when they arrive.
//!
//! Owns the table, its bounds and its listing: the global bound `nf_ct_expect_max`, each
//! helper class's `max_expected` per master (the oldest of the class is evicted), the timeout,
//! removal with the master, and `/proc/net/nf_conntrack_expect` lines. Helpers decide what to
//! expect; the tracker asks the table about every new connection (`nf_ct_find_expectation`)
//! only while it is not empty. Must not know rules or packets.
//!
//! One lock: expectations are created by helpers (a few per control connection) and looked
//! up by new connections only while some exist; the lookup is by the exact part of the
//! expected tuple (destination address and port, protocol), as every helper here expects a
//! known destination. A second index by master finds a master's expectations (its count per
//! class, its oldest, its removal) without a walk of the table: only the gc walks it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::conn::{Conn, ConnRef, HelperName};
use super::tuple::{Tuple, L3};

/// `NF_CT_EXPECT_PERMANENT`: stays after a connection used it.
pub const PERMANENT: u8 = 1 << 0;
/// `NF_CT_EXPECT_INACTIVE`: not matched until activated.
pub const INACTIVE: u8 = 1 << 1;

/// A helper's expectation class (`struct nf_conntrack_expect_policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The class index (`exp->class`).
    pub class: u8,
    /// Printed after the helper's name (`sip/audio`); empty for none.
    pub name: &'static str,
    pub max_expected: usize,
    pub timeout_secs: u32,
}

/// One expectation.
#[derive(Clone, Debug)]
pub struct Expectation {
    /// The expected connection's ORIGINAL tuple. The source port is a wildcard (`src_id` is
    /// 0), and the source address too when `any_src`.
    pub tuple: Tuple,
    pub any_src: bool,
    pub master: Weak<Conn>,
    /// The master's helper (`ftp`, `sip`).
    pub helper: HelperName,
    pub policy: Policy,
    /// The helper the new connection gets (`exp->helper`: SIP's signalling expectation).
    pub helper_for_new: Option<HelperName>,
    pub flags: u8,
    /// Absolute expiry in ns.
    pub expires: u64,
    /// For NAT helpers: how the expected connection is translated (`nf_nat_follow_master`).
    pub follow: Option<Follow>,
    id: u64,
}

impl Expectation {
    /// A new expectation of `master`'s `policy` class for connections of ORIGINAL tuple
    /// `tuple` (source port wildcard), expiring `policy.timeout_secs` after `now`.
    pub fn new(
        tuple: Tuple,
        master: &ConnRef,
        helper: HelperName,
        policy: Policy,
        now: u64,
    ) -> Expectation {
        Expectation {
            tuple: Tuple { src_id: 0, ..tuple },
            any_src: false,
            master: Arc::downgrade(master),
            helper,
            policy,
            helper_for_new: None,
            flags: 0,
            expires: now + u64::from(policy.timeout_secs) * 1_000_000_000,
            follow: None,
            id: 0,
        }
    }

    fn matches(&self, t: &Tuple) -> bool {
        t.l3 == self.tuple.l3
            && t.proto == self.tuple.proto
            && t.dst == self.tuple.dst
            && t.dst_id == self.tuple.dst_id
            && (self.any_src || t.src == self.tuple.src)
    }

    /// `expect_matches`: the same expectation again (same tuple, mask and master).
    fn same(&self, o: &Expectation) -> bool {
        self.tuple == o.tuple
            && self.any_src == o.any_src
            && self.master.ptr_eq(&o.master)
            && self.policy.class == o.policy.class
    }

    /// Not expired, and its master still there.
    fn live(&self, now: u64) -> bool {
        self.expires > now && self.master_alive().is_some()
    }

    fn master_alive(&self) -> Option<ConnRef> {
        self.master.upgrade().filter(|m| !m.is_dying())
    }
}

/// `nf_nat_follow_master`: an expected connection of a translated master is translated to
/// reach what the master's payload announced before the helper rewrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Follow {
    /// SNAT to this address (the master's `tuplehash[!exp->dir].tuple.dst`).
    pub snat: std::net::IpAddr,
    /// DNAT to this address and port (`tuplehash[!exp->dir].tuple.src`, `exp->saved_proto`).
    pub dnat: (std::net::IpAddr, u16),
}

/// Why an expectation was refused (the helper then drops the packet: "cannot add
/// expectation").
#[derive(thiserror::Error, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectError {
    #[error("nf_conntrack: expectation table full")]
    TableFull,
    #[error("the master already has its maximum of expectations of this class")]
    TooMany,
    #[error("an expectation of another connection claims the same tuple")]
    Clash,
}

/// `(l3, proto, dst, dst port)`: the exact part of every expectation here.
type Key = (L3, u8, [u8; 16], u16);

fn key_of(t: &Tuple) -> Key {
    (t.l3, t.proto, t.dst.0, t.dst_id)
}

/// The index of a master: its address, which the `Weak` references of its expectations keep
/// from being reused while any is in the table.
type MasterKey = usize;

fn master_of(e: &Expectation) -> MasterKey {
    e.master.as_ptr() as MasterKey
}

/// The table, indexed twice: by the expected tuple's exact part (a new connection's lookup)
/// and by master (`nf_conn_help.expectations`: a master's count per class, its oldest, its
/// removal), so that nothing but the gc walks the whole table.
#[derive(Default)]
struct Inner {
    by_dst: HashMap<Key, Vec<Expectation>>,
    /// Each master's expectations, oldest first: id, class and `by_dst` bucket.
    by_master: HashMap<MasterKey, Vec<(u64, u8, Key)>>,
    next_id: u64,
}

impl Inner {
    fn insert(&mut self, e: Expectation) {
        let key = key_of(&e.tuple);
        self.by_master
            .entry(master_of(&e))
            .or_default()
            .push((e.id, e.policy.class, key));
        self.by_dst.entry(key).or_default().push(e);
    }

    /// Removes the expectations of bucket `key` that `gone` picks (the others keep their
    /// order); returns how many went.
    fn remove_in(&mut self, key: &Key, gone: impl Fn(&Expectation) -> bool) -> usize {
        let Some(v) = self.by_dst.get_mut(key) else {
            return 0;
        };
        // Most calls remove nothing (a new connection's lookup, the gc's every bucket): no
        // allocation then.
        if !v.iter().any(&gone) {
            return 0;
        }
        let (out, kept): (Vec<_>, Vec<_>) = std::mem::take(v).into_iter().partition(|x| gone(x));
        if kept.is_empty() {
            self.by_dst.remove(key);
        } else {
            *v = kept;
        }
        for e in &out {
            let m = master_of(e);
            if let Some(l) = self.by_master.get_mut(&m) {
                l.retain(|x| x.0 != e.id);
                if l.is_empty() {
                    self.by_master.remove(&m);
                }
            }
        }
        out.len()
    }

    /// Removes the expectations of master `m` that `gone` picks; returns how many went.
    fn remove_of(&mut self, m: MasterKey, gone: impl Fn(&Expectation) -> bool) -> usize {
        let mut keys: Vec<Key> = Vec::new();
        for x in self.by_master.get(&m).into_iter().flatten() {
            if !keys.contains(&x.2) {
                keys.push(x.2);
            }
        }
        keys.iter()
            .map(|k| self.remove_in(k, |x| master_of(x) == m && gone(x)))
            .sum()
    }

    /// Keeps the expectations `keep` says yes to, walking the whole table; returns how many
    /// went.
    fn keep(&mut self, keep: impl Fn(&Expectation) -> bool) -> usize {
        let keys: Vec<Key> = self.by_dst.keys().copied().collect();
        keys.iter().map(|k| self.remove_in(k, |x| !keep(x))).sum()
    }
}

/// Statistics as `conntrack -S` names them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpectStats {
    /// Connections that matched an expectation (`expect_new`).
    pub new: u64,
    /// Expectations created (`expect_create`).
    pub create: u64,
    /// Expectations removed: used, expired, evicted or gone with their master
    /// (`expect_delete`).
    pub delete: u64,
}

pub struct Expectations {
    inner: Mutex<Inner>,
    count: AtomicUsize,
    max: usize,
    stats: Mutex<ExpectStats>,
}

impl Expectations {
    /// A table of at most `max` expectations (`nf_conntrack_expect_max`).
    pub fn new(max: usize) -> Expectations {
        Expectations {
            inner: Mutex::new(Inner::default()),
            count: AtomicUsize::new(0),
            max,
            stats: Mutex::new(ExpectStats::default()),
        }
    }

    /// `nf_ct_expect_max` for a table of `conntrack_max` connections:
    /// `nf_ct_expect_hsize * 4`, where the hash is `htable_size / 256` (at least 1) and the
    /// conntrack hash is sized like the table.
    pub fn default_max(conntrack_max: usize) -> usize {
        (conntrack_max / 256).max(1) * 4
    }

    pub fn max(&self) -> usize {
        self.max
    }
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
    pub fn stats(&self) -> ExpectStats {
        *self.stats.lock()
    }

    /// `nf_ct_expect_related`: adds `e`, replacing an identical one, evicting the oldest of
    /// its class when its master has reached the class's `max_expected`.
    pub fn add(&self, mut e: Expectation, now: u64) -> Result<(), ExpectError> {
        let mut g = self.inner.lock();
        let key = key_of(&e.tuple);
        let m = master_of(&e);
        let class = e.policy.class;
        // The expired in its bucket and in its master's own go first (the rest at the gc, or
        // below if the table is full).
        let mut removed = g.remove_in(&key, |x| !x.live(now)) as u64;
        removed += g.remove_of(m, |x| !x.live(now)) as u64;
        if let Some(v) = g.by_dst.get(&key) {
            if let Some(old) = v.iter().find(|x| x.same(&e)).map(|x| x.id) {
                removed += g.remove_in(&key, |x| x.id == old) as u64;
            } else if v.iter().any(|x| {
                // `expect_clash`: the same expected tuple (the masks intersect) for another
                // master or class.
                x.tuple.dst == e.tuple.dst && (x.any_src || e.any_src || x.tuple.src == e.tuple.src)
            }) {
                self.sub(removed);
                return Err(ExpectError::Clash);
            }
        }
        // The master's expectations of this class, oldest first.
        let mine: Vec<(u64, Key)> = g.by_master.get(&m).map_or_else(Vec::new, |l| {
            l.iter()
                .filter(|x| x.1 == class)
                .map(|x| (x.0, x.2))
                .collect()
        });
        let p = e.policy;
        if p.max_expected > 0 && mine.len() >= p.max_expected {
            // evict_oldest_expect
            if let Some(&(id, k)) = mine.first() {
                removed += g.remove_in(&k, |x| x.id == id) as u64;
            }
            if mine.len() > p.max_expected {
                self.sub(removed);
                return Err(ExpectError::TooMany);
            }
        }
        let mut live = self.count().saturating_sub(removed as usize);
        if live >= self.max {
            // Full, perhaps of the expired: they go now, all of them.
            let expired = g.keep(|x| x.live(now)) as u64;
            removed += expired;
            live = live.saturating_sub(expired as usize);
            if live >= self.max {
                self.sub(removed);
                return Err(ExpectError::TableFull);
            }
        }
        g.next_id += 1;
        e.id = g.next_id;
        g.insert(e);
        self.count.store(live + 1, Ordering::Relaxed);
        let mut st = self.stats.lock();
        st.create += 1;
        st.delete += removed;
        Ok(())
    }

    fn sub(&self, n: u64) {
        if n > 0 {
            let c = self.count();
            self.count
                .store(c.saturating_sub(n as usize), Ordering::Relaxed);
            self.stats.lock().delete += n;
        }
    }

    /// `nf_ct_find_expectation`: the live, active expectation a new connection of ORIGINAL
    /// tuple `t` fulfils, removed from the table unless PERMANENT.
    pub fn take(&self, t: &Tuple, now: u64) -> Option<(Expectation, ConnRef)> {
        if self.count() == 0 {
            return None;
        }
        let key = key_of(t);
        let mut g = self.inner.lock();
        let mut removed = g.remove_in(&key, |x| !x.live(now));
        let found = g.by_dst.get(&key).and_then(|v| {
            v.iter()
                .find(|x| x.flags & INACTIVE == 0 && x.matches(t))
                .cloned()
        });
        if let Some(f) = found.as_ref().filter(|f| f.flags & PERMANENT == 0) {
            removed += g.remove_in(&key, |x| x.id == f.id);
        }
        drop(g);
        self.sub(removed as u64);
        let e = found?;
        let master = e.master_alive()?;
        self.stats.lock().new += 1;
        Some((e, master))
    }

    /// `nf_ct_remove_expectations`: a master is gone, and its expectations with it.
    pub fn remove_master(&self, master: &ConnRef) {
        if self.count() == 0 {
            return;
        }
        let m = Arc::as_ptr(master) as MasterKey;
        let removed = self.inner.lock().remove_of(m, |_| true);
        self.sub(removed as u64);
    }

    /// Removes the expectations of `master` of one class (SIP's flush of media expectations
    /// on a new INVITE or a BYE).
    pub fn remove_class(&self, master: &ConnRef, class: u8) {
        let m = Arc::as_ptr(master) as MasterKey;
        let removed = self.inner.lock().remove_of(m, |x| x.policy.class == class);
        self.sub(removed as u64);
    }

    /// Changes the expectations of `master` of one class (SIP activates its signalling
    /// expectation and sets its timer when the registration is confirmed).
    pub fn update_class(&self, master: &ConnRef, class: u8, mut f: impl FnMut(&mut Expectation)) {
        let m = Arc::as_ptr(master) as MasterKey;
        let mut g = self.inner.lock();
        let g = &mut *g;
        let Some(mine) = g.by_master.get(&m) else {
            return;
        };
        for &(id, _, key) in mine.iter().filter(|x| x.1 == class) {
            let mut bucket = g.by_dst.get_mut(&key).into_iter().flatten();
            if let Some(x) = bucket.find(|x| x.id == id) {
                f(x);
            }
        }
    }

    /// Drops expired expectations and those whose master is gone (the expectation timers).
    pub fn gc(&self, now: u64) -> usize {
        if self.count() == 0 {
            return 0;
        }
        let removed = self.inner.lock().keep(|x| x.live(now));
        self.sub(removed as u64);
        removed
    }

    /// Every live expectation, oldest first.
    pub fn list(&self, now: u64) -> Vec<Expectation> {
        let g = self.inner.lock();
        let mut v: Vec<Expectation> = g
            .by_dst
            .values()
            .flatten()
            .filter(|x| x.live(now))
            .cloned()
            .collect();
        v.sort_by_key(|x| x.id);
        v
    }
}

/// One line of `/proc/net/nf_conntrack_expect` (`exp_seq_show`): seconds left, `l3proto = N
/// proto=N`, the expected tuple (a wildcard source port as `sport=0`), the flags, the helper
/// and its class's name.
pub fn proc_line(e: &Expectation, now: u64) -> String {
    let secs = e.expires.saturating_sub(now) / 1_000_000_000;
    let mut s = format!(
        "{secs} l3proto = {} proto={} src={} dst={} ",
        e.tuple.l3 as u8,
        e.tuple.proto,
        if e.any_src {
            match e.tuple.l3 {
                L3::V4 => "0.0.0.0".to_string(),
                L3::V6 => "::".to_string(),
            }
        } else {
            e.tuple.src_ip().to_string()
        },
        e.tuple.dst_ip()
    );
    if super::tuple::has_ports(e.tuple.proto) {
        let _ = write!(s, "sport={} dport={} ", e.tuple.src_id, e.tuple.dst_id);
    }
    let mut delim = "";
    if e.flags & PERMANENT != 0 {
        s.push_str("PERMANENT");
        delim = ",";
    }
    if e.flags & INACTIVE != 0 {
        let _ = write!(s, "{delim}INACTIVE");
    }
    if e.flags != 0 {
        s.push(' ');
    }
    s.push_str(e.helper.as_str());
    if !e.policy.name.is_empty() {
        let _ = write!(s, "/{}", e.policy.name);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::ProtoState;

    const S: u64 = 1_000_000_000;
    const DATA: Policy = Policy {
        class: 0,
        name: "",
        max_expected: 2,
        timeout_secs: 10,
    };
    const MEDIA: Policy = Policy {
        class: 1,
        name: "audio",
        max_expected: 0,
        timeout_secs: 10,
    };

    fn master(port: u16) -> ConnRef {
        let t = Tuple::ports(
            "192.168.1.10".parse().unwrap(),
            "203.0.113.7".parse().unwrap(),
            6,
            port,
            21,
        );
        Arc::new(Conn::new(t, ProtoState::Udp { stream_ts: 0 }, 0))
    }

    fn exp(m: &ConnRef, port: u16, p: Policy, now: u64) -> Expectation {
        let t = Tuple::ports(
            "203.0.113.7".parse().unwrap(),
            "192.168.1.10".parse().unwrap(),
            6,
            0,
            port,
        );
        Expectation::new(t, m, HelperName::new("ftp").unwrap(), p, now)
    }

    fn new_conn(port: u16) -> Tuple {
        Tuple::ports(
            "203.0.113.7".parse().unwrap(),
            "192.168.1.10".parse().unwrap(),
            6,
            20,
            port,
        )
    }

    /// The table through both indexes: what `list` walks and what each master's index
    /// holds must be the same expectations.
    fn consistent(x: &Expectations) {
        let g = x.inner.lock();
        let mut a: Vec<u64> = g.by_dst.values().flatten().map(|e| e.id).collect();
        let mut b: Vec<u64> = g.by_master.values().flatten().map(|e| e.0).collect();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
        assert_eq!(a.len(), x.count());
        assert!(g.by_dst.values().all(|v| !v.is_empty()));
        assert!(g.by_master.values().all(|v| !v.is_empty()));
    }

    #[test]
    fn a_master_over_its_class_maximum_loses_its_oldest() {
        let x = Expectations::new(100);
        let (m1, m2) = (master(1000), master(1001));
        for (i, port) in [5000, 5001, 5002].into_iter().enumerate() {
            x.add(exp(&m1, port, DATA, i as u64), i as u64).unwrap();
        }
        x.add(exp(&m2, 6000, DATA, 0), 0).unwrap();
        x.add(exp(&m1, 7000, MEDIA, 0), 0).unwrap();
        consistent(&x);
        // 5000 went (max_expected 2 of class 0); the other class and master stay.
        let ports: Vec<u16> = x.list(3).iter().map(|e| e.tuple.dst_id).collect();
        assert_eq!(ports, [5001, 5002, 6000, 7000]);
        assert_eq!(x.stats().delete, 1);
        // Taken by its connection: gone from both indexes.
        let (e, m) = x.take(&new_conn(5001), 4).unwrap();
        assert!(Arc::ptr_eq(&m, &m1));
        assert_eq!(e.tuple.dst_id, 5001);
        assert!(x.take(&new_conn(5001), 4).is_none());
        consistent(&x);
        // One class of a master, then the whole master.
        x.remove_class(&m1, 1);
        consistent(&x);
        assert_eq!(x.count(), 2);
        x.remove_master(&m1);
        consistent(&x);
        let ports: Vec<u16> = x.list(5).iter().map(|e| e.tuple.dst_id).collect();
        assert_eq!(ports, [6000]);
    }

    #[test]
    fn a_full_table_makes_room_from_the_expired_only() {
        let x = Expectations::new(3);
        let ms: Vec<ConnRef> = (0..5).map(master).collect();
        for (i, m) in ms.iter().take(3).enumerate() {
            x.add(exp(m, 5000 + i as u16, DATA, 0), 0).unwrap();
        }
        assert_eq!(
            x.add(exp(&ms[3], 5003, DATA, S), S),
            Err(ExpectError::TableFull)
        );
        consistent(&x);
        // Past their 10 s, without a gc: the add clears them.
        x.add(exp(&ms[3], 5003, DATA, 11 * S), 11 * S).unwrap();
        consistent(&x);
        assert_eq!(x.count(), 1);
        assert_eq!(x.stats().delete, 3);
        // The same expectation again replaces itself; a clash on its tuple is refused.
        x.add(exp(&ms[3], 5003, DATA, 12 * S), 12 * S).unwrap();
        assert_eq!(x.count(), 1);
        assert_eq!(
            x.add(exp(&ms[4], 5003, DATA, 12 * S), 12 * S),
            Err(ExpectError::Clash)
        );
        consistent(&x);
        // A master's death takes its expectations at the gc too.
        drop(ms);
        assert_eq!(x.gc(13 * S), 1);
        consistent(&x);
        assert_eq!(x.count(), 0);
    }
}
