//! The software flowtable (`nf_flow_table_core.c`, `nf_flow_table_ip.c`, kernel 6.18): the
//! connections `flow add` offloaded, found by (ingress port, tuple) so that their packets can
//! be forwarded at ingress without conntrack or any chain.
//!
//! Owns the flows, their timeouts (`flow->timeout`, 30 s after the last packet: the TCP and UDP
//! `offload_timeout`), the CLOSING and TEARDOWN flags, and what offloading and tearing down do
//! to the connection (`flow_offload_add`: `IPS_OFFLOAD`, a day of conntrack timeout, TCP window
//! tracking made liberal; `flow_offload_fixup_ct`: state and timeout back for the slow path).
//! Must not know rules, routes or frames: the engine decides what qualifies and where a
//! direction leaves; this module keeps the result. Sans-IO, every call takes `now`.
//!
//! Kernel 6.18's TCP rule (since 6.14, "netfilter: flowtable: add CLOSING state"): a FIN or RST
//! marks the flow CLOSING and is still forwarded by the flowtable; a SYN on a CLOSING flow
//! tears it down and goes to the slow path (a reopen); the flow otherwise stays until 30 s
//! after its last packet, when the gc tears it down and conntrack takes the connection back in
//! state CLOSE (10 s) if it was closing, else in its own state.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;

use super::conn::{Conn, ConnRef};
use super::proto::tcp::{flag, TcpState};
use super::proto::{Dir, ProtoState};
use super::tuple::Tuple;
use super::{status, Timeouts, Timestamp};
use crate::packet::IPPROTO_TCP;

const NS: u64 = 1_000_000_000;
/// `NF_FLOW_TIMEOUT`, the default `nf_flowtable_tcp_timeout` / `nf_flowtable_udp_timeout`
/// (`offload_timeout`, [`Timeouts::flowtable_tcp`]): a flow dies this long after its last
/// packet.
pub const FLOW_TIMEOUT_SECS: u32 = 30;
/// `NF_CT_DAY`: the conntrack timeout of an offloaded connection (`flow_offload_add`), so it
/// never expires while the flowtable forwards its packets.
pub const CT_DAY_SECS: u64 = 86_400;
/// `nf_flow_table_extend_ct_timeout`'s `min_timeout`.
const EXTEND_BELOW_SECS: u64 = 5 * 60;

/// [`Flow::slot`] before a dataplane gives one.
pub const NO_SLOT: u32 = u32::MAX;

/// One direction of a flow (`struct flow_offload_tuple`): the packets that arrive on `iif`
/// with `tuple` leave by `oif` towards `next_hop`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowDir {
    /// The connection's tuple of this direction, as its packets arrive (before NAT).
    pub tuple: Tuple,
    pub iif: usize,
    pub oif: usize,
    pub next_hop: IpAddr,
}

/// An offloaded connection (`struct flow_offload`).
///
/// `repr(C)` keeps what the gc reads of every flow every second (the connection, the timeout
/// and the flags) in the first cache line.
#[derive(Debug)]
#[repr(C)]
pub struct Flow {
    pub conn: ConnRef,
    /// `flow->timeout`, in ns.
    timeout: AtomicU64,
    /// `NF_FLOW_CLOSING`: a FIN or RST was forwarded.
    closing: AtomicBool,
    /// `NF_FLOW_TEARDOWN`: back to the slow path; the gc removes it.
    teardown: AtomicBool,
    /// The flowtable's `counter` flag: forwarded packets count on the connection.
    pub counter: bool,
    /// Where a dataplane's fast path counts the flow's packets, if it wants a note of it on
    /// the flow (the XDP fast path: its counters' slot pair); [`NO_SLOT`] until then. The
    /// flowtable never reads it, but a refresh of a flow still at [`NO_SLOT`] asks the
    /// dataplane again ([`Flow::wants_mirror`]).
    pub slot: AtomicU32,
    /// `flow_offload_get_timeout`: how long the flow lives after its last packet, in ns
    /// (`nf_flowtable_tcp_timeout` or `nf_flowtable_udp_timeout` at its offload).
    lifetime: u64,
    /// The flowtable it belongs to, as `family table name`.
    pub flowtable: Arc<str>,
    /// ORIGINAL, REPLY.
    pub dirs: [FlowDir; 2],
}

pub type FlowRef = Arc<Flow>;

impl Flow {
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }
    pub fn is_torn_down(&self) -> bool {
        self.teardown.load(Ordering::Relaxed)
    }
    /// When the flow expires unless a packet refreshes it.
    pub fn expires(&self) -> Timestamp {
        Timestamp(self.timeout.load(Ordering::Relaxed))
    }

    /// `flow_offload_refresh`: a forwarded packet moves the timeout (at most once a second);
    /// true when it did, which is when the kernel retries a hardware offload.
    pub fn refresh(&self, now: Timestamp) -> bool {
        let t = now.0 + self.lifetime;
        let moved = t.saturating_sub(self.timeout.load(Ordering::Relaxed)) > NS;
        if moved {
            self.timeout.store(t, Ordering::Relaxed);
        }
        moved
    }

    /// Whether a refresh that moved the timeout should ask the dataplane to take the flow
    /// again: it mirrors flows ([`Flows::set_mirrored`]) and has not taken this one (its
    /// [`Flow::slot`] is [`NO_SLOT`]: refused, or not installed yet), which is not closing.
    /// As `flow_offload_refresh` calls `nf_flow_offload_add` again for a flowtable with
    /// `flags offload`, so that a flow the hardware refused gets in once there is room.
    pub fn wants_mirror(&self, flows: &Flows) -> bool {
        flows.mirrored.load(Ordering::Relaxed)
            && !self.is_closing()
            && self.slot.load(Ordering::Relaxed) == NO_SLOT
    }

    /// `nf_ct_acct_update` for a packet the flowtable forwarded (with the `counter` flag).
    pub fn account(&self, dir: Dir, packets: u64, bytes: u64) {
        if self.counter {
            let mut g = self.conn.inner.lock();
            let c = &mut g.counters[dir.index()];
            c.packets += packets;
            c.bytes += bytes;
        }
    }
}

/// What the flowtable says about a TCP or UDP packet of one of its flows
/// (`nf_flow_state_check`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateCheck {
    /// Forward it at ingress.
    Forward,
    /// A SYN on a closing flow: the flow was torn down, the packet takes the slow path.
    TornDown,
}

/// A change the dataplane must mirror in its own fast path.
#[derive(Clone, Debug)]
pub enum FlowEvent {
    /// The connection was just offloaded: install both directions.
    Offloaded(FlowRef),
    /// The flow went back to the slow path: remove both directions.
    TornDown(FlowRef),
}

/// The gc's slices: every flow is in one, and a gc step walks one, so that a pass over a
/// million flows is spread over [`GC_SLICES`] steps instead of stalling one.
pub const GC_SLICES: usize = 20;
/// Flows whose state the gc reads ahead of deciding about them.
const GC_TOUCH_AHEAD: usize = 16;

/// A flow in its gc slice, and when the gc must look at it next (ns): its timeout as of the
/// last look. A timeout only moves later, so until then the flow cannot have expired, and
/// the gc's pass reads only this, beside the flow, not the flow and its connection.
#[derive(Debug)]
struct Visit {
    due: u64,
    flow: FlowRef,
}

/// Every flowtable's flows, by (ingress port, tuple).
#[derive(Default)]
pub struct Flows {
    map: DashMap<(usize, Tuple), (FlowRef, Dir)>,
    /// Every flow in the map, once, in the gc slice it was given at its offload; a torn-down
    /// flow leaves the map at once and its slice at its next visit.
    slices: [Mutex<Vec<Visit>>; GC_SLICES],
    /// The slice the next offloaded flow goes to.
    next_slice: AtomicUsize,
    /// Flows torn down outside a packet (reload, gc), for [`Flows::gc`]'s caller.
    pending: Mutex<Vec<FlowRef>>,
    /// A dataplane mirrors the flows into a fast path of its own ([`Flows::set_mirrored`]).
    mirrored: AtomicBool,
}

impl Flows {
    /// Entries (two per flow).
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// A dataplane mirrors every offloaded flow into a fast path of its own (the XDP
    /// program's maps), as `flags offload` puts a flowtable's flows in hardware: from now on
    /// a refresh of a flow it has not taken asks again ([`Flow::wants_mirror`]).
    pub fn set_mirrored(&self) {
        self.mirrored.store(true, Ordering::Relaxed);
    }

    /// `flow_offload_add`: marks `conn` offloaded (`IPS_OFFLOAD`, test and set: one flowtable
    /// per connection) and puts both directions in. `None` if it was offloaded already or a
    /// direction's key is taken.
    pub fn offload(
        &self,
        conn: &ConnRef,
        flowtable: &Arc<str>,
        counter: bool,
        dirs: [FlowDir; 2],
        t: &Timeouts,
        now: Timestamp,
    ) -> Option<FlowRef> {
        if conn.set_status(status::OFFLOAD) & status::OFFLOAD != 0 {
            return None;
        }
        let secs = if dirs[0].tuple.proto == IPPROTO_TCP {
            t.flowtable_tcp
        } else {
            t.flowtable_udp
        };
        let lifetime = u64::from(secs) * NS;
        let flow = Arc::new(Flow {
            conn: conn.clone(),
            flowtable: flowtable.clone(),
            counter,
            slot: AtomicU32::new(NO_SLOT),
            dirs,
            timeout: AtomicU64::new(now.0 + lifetime),
            lifetime,
            closing: AtomicBool::new(false),
            teardown: AtomicBool::new(false),
        });
        let keys =
            [Dir::Original, Dir::Reply].map(|d| (dirs[d.index()].iif, dirs[d.index()].tuple));
        let taken = |k| self.map.get(k).is_some_and(|e| !e.value().0.is_torn_down());
        if keys.iter().any(taken) || keys[0] == keys[1] {
            conn.status.fetch_and(!status::OFFLOAD, Ordering::Relaxed);
            return None;
        }
        self.map.insert(keys[0], (flow.clone(), Dir::Original));
        self.map.insert(keys[1], (flow.clone(), Dir::Reply));
        let slice = self.next_slice.fetch_add(1, Ordering::Relaxed) % GC_SLICES;
        self.slices[slice].lock().push(Visit {
            due: flow.expires().0,
            flow: flow.clone(),
        });
        // nf_ct_refresh(ct, NF_CT_DAY); nft_flow_offload_eval: TCP window checks liberal from
        // now on, as the slow path will not see every segment.
        conn.expires
            .store(now.0 + CT_DAY_SECS * NS, Ordering::Relaxed);
        if let ProtoState::Tcp(t) = &mut conn.inner.lock().proto {
            for s in &mut t.seen {
                s.flags |= flag::BE_LIBERAL;
            }
        }
        Some(flow)
    }

    /// `flow_offload_lookup`: the live flow `tuple` arriving on `port` belongs to, and its
    /// direction.
    pub fn lookup(&self, port: usize, tuple: &Tuple) -> Option<(FlowRef, Dir)> {
        let hit = self.map.get(&(port, *tuple))?;
        let (flow, dir) = hit.value().clone();
        drop(hit);
        if flow.is_torn_down() || flow.conn.is_dying() {
            return None;
        }
        Some((flow, dir))
    }

    /// `nf_flow_state_check` for a TCP packet with these flags: a SYN on a closing flow
    /// tears it down; a FIN or RST marks it closing and is still forwarded.
    pub fn state_check(
        &self,
        flow: &Flow,
        syn: bool,
        fin_or_rst: bool,
        t: &Timeouts,
        now: Timestamp,
    ) -> StateCheck {
        if syn && flow.is_closing() {
            teardown(flow, t, now);
            self.unmap(flow);
            return StateCheck::TornDown;
        }
        if fin_or_rst {
            flow.closing.store(true, Ordering::Relaxed);
        }
        StateCheck::Forward
    }

    /// Tears down every flow `keep` refuses (a reload that dropped their flowtable or port);
    /// the gc reports them.
    pub fn teardown_unless(&self, keep: impl Fn(&Flow) -> bool, t: &Timeouts, now: Timestamp) {
        let mut gone = Vec::new();
        for slice in &self.slices {
            let slice = slice.lock();
            gone.extend(
                slice
                    .iter()
                    .filter(|v| !v.flow.is_torn_down() && !keep(&v.flow))
                    .map(|v| v.flow.clone()),
            );
        }
        for f in &gone {
            teardown(f, t, now);
            self.unmap(f);
        }
        self.pending.lock().extend(gone);
    }

    /// A whole pass of the flowtable's gc: every slice's [`Flows::gc_step`].
    pub fn gc(&self, t: &Timeouts, now: Timestamp) -> Vec<FlowRef> {
        let mut events = Vec::new();
        for slice in 0..GC_SLICES {
            events.extend(self.gc_step(slice, t, now, &|_| {}));
        }
        events
    }

    /// The flowtable's gc (`nf_flow_offload_gc_step`, which the kernel runs over every flow
    /// once a second) over the flows of one slice (`slice` modulo [`GC_SLICES`]): expired
    /// flows and flows of dying connections are torn down, live ones keep their connection
    /// from expiring (`nf_flow_table_extend_ct_timeout`), and torn-down ones leave the table.
    /// Returns the flows that went back to the slow path since the last call without an event
    /// yet (torn down here, or by a reload).
    ///
    /// Unlike the kernel's, it looks at a flow only when its timeout, as of the last look, is
    /// due (every 30 s at most, so a connection's extension, due under five minutes left, is
    /// never missed): with a million flows, reading each flow and its connection every second
    /// took a tenth of the core. A flow whose connection is killed is not seen that way:
    /// [`Flows::teardown_unless`] is its caller's, at the next pass (see
    /// [`crate::engine::Engine::flow_gc_step`]).
    ///
    /// `refresh` is called for a live flow about to expire, before the gc decides: a fast path
    /// that forwards packets the engine does not see tells of them there
    /// ([`crate::engine::Engine::flow_account`]), so the flow lives on.
    pub fn gc_step(
        &self,
        slice: usize,
        t: &Timeouts,
        now: Timestamp,
        refresh: &dyn Fn(&FlowRef),
    ) -> Vec<FlowRef> {
        let mut events = std::mem::take(&mut *self.pending.lock());
        let mut list = self.slices[slice % GC_SLICES].lock();
        let mut kept = 0;
        for start in (0..list.len()).step_by(GC_TOUCH_AHEAD) {
            let end = (start + GC_TOUCH_AHEAD).min(list.len());
            // With many flows, each flow and its connection are a cache miss. Reading what
            // the decisions below need of the next few due flows in a loop of independent
            // loads lets the CPU wait for those misses together, not one after the other.
            for v in list[start..end].iter().filter(|v| v.due <= now.0) {
                std::hint::black_box((
                    v.flow.timeout.load(Ordering::Relaxed),
                    v.flow.conn.status(),
                ));
            }
            for i in start..end {
                if list[i].due <= now.0 {
                    let flow = &list[i].flow;
                    let was_down = flow.is_torn_down();
                    if !was_down && flow.expires().0 <= now.0 && !flow.conn.is_dying() {
                        refresh(flow);
                    }
                    if flow.expires().0 <= now.0 || flow.conn.is_dying() {
                        if !was_down {
                            teardown(flow, t, now);
                            self.unmap(flow);
                            events.push(flow.clone());
                        }
                    } else if !was_down {
                        extend_ct_timeout(&flow.conn, now);
                    }
                    if flow.is_torn_down() {
                        continue;
                    }
                    list[i].due = flow.expires().0;
                }
                // Kept: moved down over the ones that go (order kept).
                list.swap(kept, i);
                kept += 1;
            }
        }
        list.truncate(kept);
        events
    }

    /// Takes a torn-down flow's two directions out of the map (a reopened connection may
    /// take them at once).
    fn unmap(&self, f: &Flow) {
        for (d, dir) in f.dirs.iter().zip([Dir::Original, Dir::Reply]) {
            self.map.remove_if(&(d.iif, d.tuple), |_, v| {
                std::ptr::eq(Arc::as_ptr(&v.0), f) && v.1 == dir
            });
        }
    }

    /// Every live flow (one per connection).
    pub fn flows(&self) -> Vec<FlowRef> {
        self.map
            .iter()
            .filter(|e| e.value().1 == Dir::Original && !e.value().0.is_torn_down())
            .map(|e| e.value().0.clone())
            .collect()
    }
}

/// `flow_offload_teardown` + `flow_offload_fixup_ct` (6.18): `IPS_OFFLOAD` off, and the
/// connection's state and timeout put back for conntrack.
fn teardown(flow: &Flow, t: &Timeouts, now: Timestamp) {
    if flow.teardown.swap(true, Ordering::Relaxed) {
        return;
    }
    let conn = &flow.conn;
    conn.status.fetch_and(!status::OFFLOAD, Ordering::Relaxed);
    let expired = flow.expires().0 <= now.0;
    let closing = flow.is_closing();
    let mut g = conn.inner.lock();
    let timeout = match &mut g.proto {
        ProtoState::Tcp(tc) => {
            // flow_offload_fixup_tcp: CLOSE if a FIN or RST went by (a SYN may reopen it),
            // and the window tracking starts over.
            if closing {
                tc.state = TcpState::Close;
            }
            if tc.state == TcpState::Close {
                tc.seen[0].flags |= flag::CLOSE_INIT;
            }
            for s in &mut tc.seen {
                s.td_maxwin = 0;
                s.flags &= !flag::MAXACK_SET;
            }
            let secs = u64::from(t.tcp_state(tc.state));
            if expired && !closing {
                secs.saturating_sub(flow.lifetime / NS)
            } else {
                secs
            }
        }
        ProtoState::Udp { .. } => {
            let secs = if conn.status() & status::SEEN_REPLY != 0 {
                u64::from(t.udp_stream)
            } else {
                u64::from(t.udp)
            };
            if expired {
                secs.saturating_sub(flow.lifetime / NS)
            } else {
                secs
            }
        }
        _ => return,
    };
    drop(g);
    // nf_ct_refresh only when closing or when the connection has more left than that.
    let left = conn.expires().0.saturating_sub(now.0);
    if closing || left > timeout * NS {
        conn.expires.store(now.0 + timeout * NS, Ordering::Relaxed);
    }
}

/// `nf_flow_table_extend_ct_timeout`: an offloaded connection with less than five minutes
/// left gets a day (UDP, TCP ESTABLISHED) or five minutes (TCP closing states).
fn extend_ct_timeout(conn: &Conn, now: Timestamp) {
    let left = conn.expires().0.saturating_sub(now.0);
    if left >= EXTEND_BELOW_SECS * NS || conn.status() & status::OFFLOAD == 0 {
        return;
    }
    let secs = match conn.proto_state() {
        ProtoState::Udp { .. } => CT_DAY_SECS,
        ProtoState::Tcp(tc) => match tc.state {
            TcpState::Established => CT_DAY_SECS,
            TcpState::FinWait | TcpState::CloseWait | TcpState::LastAck | TcpState::TimeWait => {
                EXTEND_BELOW_SECS
            }
            _ => 0,
        },
        _ => 0,
    };
    if secs > 0 {
        conn.expires.store(now.0 + secs * NS, Ordering::Relaxed);
    }
}
