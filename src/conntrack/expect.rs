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
//! known destination.

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

#[derive(Default)]
struct Inner {
    by_dst: HashMap<Key, Vec<Expectation>>,
    next_id: u64,
}

impl Inner {
    /// Keeps the expectations `keep` says yes to; returns how many went.
    fn keep(&mut self, keep: impl Fn(&Expectation) -> bool) -> usize {
        let mut removed = 0;
        for v in self.by_dst.values_mut() {
            let before = v.len();
            v.retain(&keep);
            removed += before - v.len();
        }
        self.by_dst.retain(|_, v| !v.is_empty());
        removed
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
        // Expired expectations and those of dead masters go first.
        let mut removed = g.keep(|x| x.live(now)) as u64;
        let key = key_of(&e.tuple);
        let mut replaced = false;
        if let Some(v) = g.by_dst.get_mut(&key) {
            if let Some(i) = v.iter().position(|x| x.same(&e)) {
                v.remove(i);
                replaced = true;
            } else if v.iter().any(|x| {
                // `expect_clash`: the same expected tuple (the masks intersect) for another
                // master or class.
                x.tuple.dst == e.tuple.dst && (x.any_src || e.any_src || x.tuple.src == e.tuple.src)
            }) {
                self.sub(removed);
                return Err(ExpectError::Clash);
            }
        }
        if replaced {
            removed += 1;
        }
        // The master's expectations of this class, oldest first.
        let mut mine: Vec<(u64, Key)> = g
            .by_dst
            .iter()
            .flat_map(|(k, v)| {
                v.iter()
                    .filter(|x| x.master.ptr_eq(&e.master) && x.policy.class == e.policy.class)
                    .map(move |x| (x.id, *k))
            })
            .collect();
        mine.sort_unstable_by_key(|m| m.0);
        let p = e.policy;
        if p.max_expected > 0 && mine.len() >= p.max_expected {
            // evict_oldest_expect
            if let Some(&(id, k)) = mine.first() {
                if let Some(v) = g.by_dst.get_mut(&k) {
                    v.retain(|x| x.id != id);
                }
                removed += 1;
            }
            if mine.len() > p.max_expected {
                self.sub(removed);
                return Err(ExpectError::TooMany);
            }
        }
        let live = self.count().saturating_sub(removed as usize);
        if live >= self.max {
            self.sub(removed);
            return Err(ExpectError::TableFull);
        }
        g.next_id += 1;
        e.id = g.next_id;
        g.by_dst.entry(key).or_default().push(e);
        g.by_dst.retain(|_, v| !v.is_empty());
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
        let mut g = self.inner.lock();
        let v = g.by_dst.get_mut(&key_of(t))?;
        let mut removed = 0;
        let before = v.len();
        v.retain(|x| x.live(now));
        removed += before - v.len();
        let found = v
            .iter()
            .position(|x| x.flags & INACTIVE == 0 && x.matches(t))
            .map(|i| {
                if v[i].flags & PERMANENT != 0 {
                    v[i].clone()
                } else {
                    removed += 1;
                    v.remove(i)
                }
            });
        if v.is_empty() {
            g.by_dst.remove(&key_of(t));
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
        let ptr = Arc::as_ptr(master);
        let removed = self.inner.lock().keep(|x| x.master.as_ptr() != ptr);
        self.sub(removed as u64);
    }

    /// Removes the expectations of `master` of one class (SIP's flush of media expectations
    /// on a new INVITE or a BYE).
    pub fn remove_class(&self, master: &ConnRef, class: u8) {
        let ptr = Arc::as_ptr(master);
        let removed = self
            .inner
            .lock()
            .keep(|x| !(x.master.as_ptr() == ptr && x.policy.class == class));
        self.sub(removed as u64);
    }

    /// Changes the expectations of `master` of one class (SIP activates its signalling
    /// expectation and sets its timer when the registration is confirmed).
    pub fn update_class(&self, master: &ConnRef, class: u8, mut f: impl FnMut(&mut Expectation)) {
        let ptr = Arc::as_ptr(master);
        let mut g = self.inner.lock();
        for x in g.by_dst.values_mut().flatten() {
            if x.master.as_ptr() == ptr && x.policy.class == class {
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
