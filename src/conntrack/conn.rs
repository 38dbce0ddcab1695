//! One tracked connection (`struct nf_conn`): both tuples, status bits, mark, timeout,
//! per-direction counters, the protocol state, the helper name and a place for NAT.
//!
//! Owns the entry's layout and its locking: what a packet touches on the hot path is either an
//! atomic (`status`, `mark`, `expires`) or behind the entry's own mutex (protocol state and
//! counters), so a packet of an established flow takes one shard read lock in the table plus
//! this entry's uncontended mutex. Must not touch the table or rules.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use super::proto::tcp::TcpState;
use super::proto::{Dir, ProtoState};
use super::tuple::Tuple;
use super::{status, Timestamp};
use crate::packet::rewrite::CompiledRewrite;

/// A shared handle on a connection.
pub type ConnRef = Arc<Conn>;

/// `NF_CT_HELPER_NAME_LEN`.
pub const HELPER_NAME_LEN: usize = 16;

/// Packet and byte counters of one direction (`struct nf_conn_counter`). Bytes are IP
/// lengths, as the kernel counts `skb->len` at layer 3.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// The NAT binding of a connection (`nf_nat_setup_info`'s result): the REPLY tuple as
/// translation left it. Set once, before the connection is confirmed; every later packet in
/// either direction is translated from it (`nf_nat_manip_pkt` inverts the other direction's
/// tuple).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct NatBinding {
    /// Per direction (ORIGINAL, REPLY): every manip a packet of that direction gets, both
    /// hooks' together, compiled for the direction's tuple (the fast path of established
    /// packets), one cache line each.
    pub rewrite: [DirRewrite; 2],
    pub reply: Tuple,
}

/// One direction's compiled rewrite, alone on its cache line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(64))]
pub struct DirRewrite(pub CompiledRewrite);

/// A helper's name, at most [`HELPER_NAME_LEN`] - 1 bytes like the kernel's.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct HelperName {
    len: u8,
    bytes: [u8; HELPER_NAME_LEN - 1],
}

impl HelperName {
    /// `None` if the name is empty or too long.
    pub fn new(name: &str) -> Option<HelperName> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() >= HELPER_NAME_LEN {
            return None;
        }
        let mut bytes = [0u8; HELPER_NAME_LEN - 1];
        bytes[..b.len()].copy_from_slice(b);
        Some(HelperName {
            len: b.len() as u8,
            bytes,
        })
    }
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl fmt::Debug for HelperName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// The part of a connection behind its mutex; the hot fields first.
#[derive(Clone, Debug)]
#[repr(C)]
pub(crate) struct ConnInner {
    pub proto: ProtoState,
    pub counters: [Counter; 2],
    /// What few connections have (the kernel's ct extensions), in one allocation.
    pub ext: Option<Box<Ext>>,
}

/// A connection's rarer parts (`nf_ct_ext`): one pointer in every entry, one allocation in
/// those that use any.
#[derive(Clone, Debug, Default)]
pub struct Ext {
    /// The helper attached by `ct helper set` (`IPS_HELPER` says there is one).
    pub helper: Option<HelperName>,
    /// The helper's own state (FTP's line starts, ...).
    pub help: Option<super::helper::HelpState>,
    /// The control connection of an expected (RELATED) connection (`ct->master`).
    pub master: Option<std::sync::Weak<Conn>>,
    /// TCP sequence adjustment after a NAT helper changed a payload's length.
    pub seqadj: Option<super::seqadj::SeqAdj>,
}

/// One connection. Created tentative by [`super::Tracker::classify`], inserted by
/// [`super::Tracker::confirm`].
///
/// Laid out in the order a packet touches it (`repr(C)`), so a lookup's cache misses land
/// on the first three lines: `Arc` counts, status, expiry, the ORIGINAL tuple (to tell the
/// direction), the mutex, the protocol state and the counters. The REPLY tuple is stored
/// only when NAT changed it ([`NatBinding`], set once before confirmation); without NAT it
/// is the ORIGINAL inverted, so an untranslated connection pays 16 bytes for the slot.
#[repr(C)]
pub struct Conn {
    pub(crate) status: AtomicU32,
    mark: AtomicU32,
    /// Absolute expiry time in ns (`ct->timeout`).
    pub(crate) expires: AtomicU64,
    orig: Tuple,
    pub(crate) inner: Mutex<ConnInner>,
    start: u64,
    nat: OnceLock<Box<NatBinding>>,
}

impl Conn {
    /// `orig` must have an inverse (checked by the caller, `nf_ct_invert_tuple`).
    pub(crate) fn new(orig: Tuple, proto: ProtoState, now: u64) -> Conn {
        Conn {
            orig,
            start: now,
            status: AtomicU32::new(0),
            mark: AtomicU32::new(0),
            expires: AtomicU64::new(now),
            inner: Mutex::new(ConnInner {
                proto,
                counters: [Counter::default(); 2],
                ext: None,
            }),
            nat: OnceLock::new(),
        }
    }

    /// The ORIGINAL tuple (the first packet's).
    pub fn orig(&self) -> &Tuple {
        &self.orig
    }
    /// The REPLY tuple: the translated one when NAT is bound, else the ORIGINAL inverted.
    pub fn reply(&self) -> Tuple {
        match self.nat.get() {
            Some(n) => n.reply,
            None => self.orig.invert().unwrap_or(self.orig),
        }
    }
    pub fn tuple(&self, dir: Dir) -> Tuple {
        match dir {
            Dir::Original => self.orig,
            Dir::Reply => self.reply(),
        }
    }
    /// When the first packet was seen (the `delta-time` base).
    pub fn start(&self) -> Timestamp {
        Timestamp(self.start)
    }
    /// `ct->status`: [`status`] bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Relaxed)
    }
    pub(crate) fn set_status(&self, bits: u32) -> u32 {
        self.status.fetch_or(bits, Ordering::Relaxed)
    }
    pub fn is_assured(&self) -> bool {
        self.status() & status::ASSURED != 0
    }
    pub fn is_confirmed(&self) -> bool {
        self.status() & status::CONFIRMED != 0
    }
    pub fn is_dying(&self) -> bool {
        self.status() & status::DYING != 0
    }
    /// `ct mark`.
    pub fn mark(&self) -> u32 {
        self.mark.load(Ordering::Relaxed)
    }
    /// `ct mark set`.
    pub fn set_mark(&self, mark: u32) {
        self.mark.store(mark, Ordering::Relaxed);
    }
    /// When the entry expires unless refreshed.
    pub fn expires(&self) -> Timestamp {
        Timestamp(self.expires.load(Ordering::Relaxed))
    }
    pub(crate) fn is_expired(&self, now: u64) -> bool {
        // nf_ct_is_expired: timeout - now <= 0.
        self.expires.load(Ordering::Relaxed) <= now
    }
    /// Whole seconds left, as /proc and `conntrack -L` print them (rounded down, never
    /// negative).
    pub fn timeout_secs(&self, now: Timestamp) -> u64 {
        self.expires.load(Ordering::Relaxed).saturating_sub(now.0) / 1_000_000_000
    }
    /// Counters of both directions, ORIGINAL first.
    pub fn counters(&self) -> [Counter; 2] {
        self.inner.lock().counters
    }
    /// A copy of the protocol state.
    pub fn proto_state(&self) -> ProtoState {
        self.inner.lock().proto
    }
    /// The TCP state, for TCP connections.
    pub fn tcp_state(&self) -> Option<TcpState> {
        match self.inner.lock().proto {
            ProtoState::Tcp(t) => Some(t.state),
            _ => None,
        }
    }
    pub fn helper(&self) -> Option<HelperName> {
        if self.status() & status::HELPER == 0 {
            return None;
        }
        self.inner.lock().ext.as_ref()?.helper
    }
    /// The control connection this one was expected by, if it is alive.
    pub fn master(&self) -> Option<ConnRef> {
        let g = self.inner.lock();
        g.ext.as_ref()?.master.as_ref()?.upgrade()
    }
    pub(crate) fn set_master(&self, master: &ConnRef) {
        self.inner.lock().ext.get_or_insert_default().master = Some(Arc::downgrade(master));
    }
    /// The sequence adjustment, if a NAT helper changed a payload's length.
    pub fn seqadj(&self) -> Option<super::seqadj::SeqAdj> {
        self.inner.lock().ext.as_ref()?.seqadj
    }
    /// Records a payload length change (`nf_ct_seqadj_set`) and sets `IPS_SEQ_ADJUST`.
    pub(crate) fn seqadj_set(&self, dir: super::proto::Dir, seq: u32, off: i32) {
        if off == 0 {
            return;
        }
        let mut g = self.inner.lock();
        let ext = g.ext.get_or_insert_default();
        ext.seqadj.get_or_insert_default().set(dir, seq, off);
        drop(g);
        self.set_status(status::SEQ_ADJUST);
    }
    /// Runs `f` on the helper's state (created by `init` the first time).
    pub(crate) fn with_help<R>(
        &self,
        init: impl FnOnce() -> super::helper::HelpState,
        f: impl FnOnce(&mut super::helper::HelpState) -> R,
    ) -> R {
        let mut g = self.inner.lock();
        let h = g.ext.get_or_insert_default().help.get_or_insert_with(init);
        f(h)
    }
    /// `ct helper set`: attaches a helper by name, and sets `IPS_HELPER`.
    pub fn set_helper(&self, helper: Option<HelperName>) {
        self.inner.lock().ext.get_or_insert_default().helper = helper;
        if helper.is_some() {
            self.set_status(status::HELPER);
        }
    }
    /// The NAT binding, if translation changed the REPLY tuple.
    pub fn nat(&self) -> Option<&NatBinding> {
        self.nat.get().map(|b| &**b)
    }
    /// Binds NAT (`nf_conntrack_alter_reply`): only on a tentative connection, before
    /// [`super::Tracker::confirm`] puts its tuples in the table; false if it is confirmed or
    /// already bound (the binding never changes under the table's keys).
    pub fn set_nat(&self, nat: NatBinding) -> bool {
        if self.is_confirmed() {
            return false;
        }
        self.nat.set(Box::new(nat)).is_ok()
    }
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("orig", &self.orig)
            .field("reply", &self.reply())
            .field("status", &format_args!("{:#x}", self.status()))
            .field("expires", &self.expires())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direction_of_a_binding_fits_one_cache_line() {
        assert_eq!(std::mem::size_of::<DirRewrite>(), 64);
    }
}
