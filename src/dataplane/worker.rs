//! One worker: a thread with one UMEM and an AF_XDP socket on each port queue it serves,
//! running receive -> engine -> transmit in batches until told to stop.
//!
//! Frame ownership, the invariant every `unsafe` here leans on: a frame descriptor is in
//! exactly one place at a time: the fill ring, the rx ring, this worker's hands (a batch
//! being decided), a tx list, the tx ring, the completion ring, or the free list. It is
//! touched (read or written) only while in this worker's hands or on the free list.
//!
//! Every turn of the loop stores the clock in the worker's heartbeat ([`super::health`]).

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use xsk_rs::config::{BindFlags, FrameSize, LibxdpFlags, QueueSize, SocketConfig, UmemConfig};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

use super::fastpath::FastPath;
use super::health::Fault;
use super::neigh::Resolve;
use super::wire::{self, Mac};
use super::{iface, DataplaneError, Shared, BATCH};
use crate::config::Mode;
use crate::conntrack::flowtable::{FlowEvent, FlowRef};
use crate::conntrack::{show, Timestamp};
use crate::engine::{self, Verdict};

/// Ring sizes (powers of two). The fill ring is kept full; the tx ring takes what the
/// worker sends until the kernel completes it.
const RING: u32 = 2048;
/// A UMEM frame: one page half, enough for a 1500-byte MTU with the XDP headroom.
const FRAME_SIZE: u32 = 2048;
/// Frames waiting for a neighbour, per worker; beyond it they are dropped (the kernel's
/// `unres_qlen` is about 100 per neighbour).
const MAX_HELD: usize = 256;
/// Beyond this many private neighbour entries, the worker starts its copy afresh.
const MAX_CACHED_NEIGHBOURS: usize = 4096;
/// How long an idle worker sleeps in poll(2) before it looks at the stop flag again.
const IDLE_POLL_MS: i32 = 100;
/// Offloaded flows waiting for a neighbour before the fast path can take them; beyond it
/// they stay with the workers.
const MAX_WAITING_FLOWS: usize = 1024;

struct Sock {
    port: usize,
    queue: u32,
    tx: TxQueue,
    rx: RxQueue,
    fq: FillQueue,
    cq: CompQueue,
    /// Frames handed to the tx ring and not yet completed.
    in_flight: usize,
}

/// A frame waiting for its next hop's MAC.
struct Held {
    port: usize,
    hop: IpAddr,
    frame: Vec<u8>,
}

/// What becomes of a received frame.
enum Action {
    /// Send it (as it now is) out of this port.
    Send(usize),
    /// Its frame goes back to the free list.
    Recycle,
}

pub(super) struct Worker {
    index: usize,
    shared: Arc<Shared>,
    umem: Umem,
    socks: Vec<Sock>,
    /// Per port: the socket this worker sends on.
    tx_sock: Vec<usize>,
    free: Vec<FrameDesc>,
    /// Per port: frames to hand to its tx ring at the end of the batch.
    outbox: Vec<Vec<FrameDesc>>,
    held: VecDeque<Held>,
    /// This worker's copy of the neighbour entries it uses, valid while the shared table's
    /// generation is `neigh_gen`.
    neigh_cache: HashMap<(usize, IpAddr), Mac, foldhash::fast::RandomState>,
    neigh_gen: u64,
    engine_worker: engine::Worker,
    /// A buffer for the frames the box writes itself (ARP, ND), reused.
    scratch: Vec<u8>,
    /// Offloaded flows not in the XDP fast path yet: a next hop's MAC is still unknown.
    waiting: Vec<FlowRef>,
    now: Timestamp,
    /// The test knob's fault for this worker (normally none).
    fault: Option<Fault>,
}

impl Worker {
    /// Creates the worker's UMEM and binds a socket on each `(port, queue)`.
    pub(super) fn open(
        index: usize,
        queues: &[(usize, u32)],
        shared: Arc<Shared>,
        fault: Option<Fault>,
    ) -> Result<Worker, DataplaneError> {
        let umem_err = |reason: String| DataplaneError::Umem {
            worker: index,
            reason,
        };
        let ring = QueueSize::new(RING).map_err(|e| umem_err(e.to_string()))?;
        let frame_size = FrameSize::new(FRAME_SIZE).map_err(|e| umem_err(e.to_string()))?;
        let umem_cfg = UmemConfig::builder()
            .frame_size(frame_size)
            .fill_queue_size(ring)
            .comp_queue_size(ring)
            .build()
            .map_err(|e| umem_err(e.to_string()))?;
        // Each socket: a full fill ring, a full tx ring, and a batch of spares.
        let frames = (queues.len() as u32 * (2 * RING + BATCH as u32)).max(1);
        let frames = NonZeroU32::new(frames).ok_or_else(|| umem_err("no frames".into()))?;
        let (umem, mut free) =
            Umem::new(umem_cfg, frames, false).map_err(|e| umem_err(e.to_string()))?;
        let mut sock_cfg = SocketConfig::builder();
        sock_cfg
            .rx_queue_size(ring)
            .tx_queue_size(ring)
            .bind_flags(BindFlags::XDP_COPY | BindFlags::XDP_USE_NEED_WAKEUP);
        if shared.fastpath.is_some() {
            // Our program runs on the interface; the socket goes into its `xsks` below.
            sock_cfg.libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD);
        }
        let sock_cfg = sock_cfg.build();
        let mut socks = Vec::new();
        for &(port, queue) in queues {
            let p = &shared.ports[port];
            let sock_err = |reason: String| DataplaneError::Socket {
                interface: p.interface.clone(),
                queue,
                reason,
            };
            let name = p
                .interface
                .parse()
                .map_err(|e: std::ffi::NulError| sock_err(e.to_string()))?;
            // SAFETY: each (interface, queue) pair is bound once, by this worker, so libxdp
            // hands back a fill and completion ring of its own (no XDP_SHARED_UMEM on an
            // already bound pair, which would need INHIBIT_PROG_LOAD).
            let (tx, rx, rings) = unsafe { Socket::new(sock_cfg, &umem, &name, queue) }
                .map_err(|e| sock_err(format!("{e:?}")))?;
            let (mut fq, cq) =
                rings.ok_or_else(|| sock_err("libxdp returned no fill ring".into()))?;
            if shared.busy_poll {
                iface::busy_poll(rx.fd().as_raw_fd(), BATCH)
                    .map_err(|e| sock_err(format!("busy polling: {e}")))?;
            }
            if let Some(fp) = &shared.fastpath {
                fp.add_socket(port, queue, rx.fd().as_raw_fd())
                    .map_err(|e| sock_err(e.to_string()))?;
            }
            let take = free.len().min(RING as usize);
            let start = free.len() - take;
            // SAFETY: these frames were never handed to the kernel; from here on they
            // belong to the fill ring.
            let filled = unsafe { fq.produce(&free[start..]) };
            free.drain(start..start + filled);
            socks.push(Sock {
                port,
                queue,
                tx,
                rx,
                fq,
                cq,
                in_flight: 0,
            });
        }
        let tx_sock = (0..shared.ports.len())
            .map(|p| socks.iter().position(|s| s.port == p).unwrap_or(usize::MAX))
            .collect();
        Ok(Worker {
            index,
            outbox: shared
                .ports
                .iter()
                .map(|_| Vec::with_capacity(2 * BATCH))
                .collect(),
            shared,
            umem,
            socks,
            tx_sock,
            free,
            held: VecDeque::new(),
            neigh_cache: HashMap::default(),
            neigh_gen: u64::MAX,
            engine_worker: engine::Worker::new(index),
            scratch: Vec::with_capacity(128),
            waiting: Vec::new(),
            now: Timestamp(0),
            fault,
        })
    }

    /// The loop: until the stop flag, receive a batch per socket, decide each frame, send,
    /// recycle completed frames, refill, and sleep in poll(2) when there was nothing.
    pub(super) fn run(mut self) {
        let umem = self.umem.clone();
        let shared_arc = self.shared.clone();
        let shared: &Shared = &shared_arc;
        let mut batch = vec![FrameDesc::default(); BATCH];
        let mut pollfds: Vec<libc::pollfd> = self
            .socks
            .iter()
            .map(|s| iface::pollfd(s.rx.fd().as_raw_fd()))
            .collect();
        let beat = &shared.worker_stats[self.index].beat;
        let fault_at = self
            .fault
            .map(|f| shared.now().0.saturating_add(f.after_ns));
        while !shared.stop.load(Ordering::Relaxed) {
            self.now = shared.now();
            beat.store(self.now.0, Ordering::Relaxed);
            if let (Some(f), Some(at)) = (self.fault, fault_at) {
                if self.now.0 >= at {
                    f.act(self.index);
                }
            }
            let mut got = 0;
            for s in 0..self.socks.len() {
                // SAFETY: `batch` only receives descriptors; the frames they name are ours
                // until we hand them on.
                let n = unsafe { self.socks[s].rx.consume(&mut batch) };
                if n == 0 {
                    continue;
                }
                got += n;
                let port = self.socks[s].port;
                let mut bytes = 0;
                for desc in batch.iter_mut().take(n) {
                    bytes += desc.lengths().data() as u64;
                    let action = {
                        // SAFETY: the frame came off the rx ring and is in our hands; no other
                        // reference to it exists until it is queued for tx or recycled.
                        let mut data = unsafe { umem.data_mut(desc) };
                        self.decide(shared, data.contents_mut(), port)
                    };
                    match action {
                        Action::Send(out) => self.outbox[out].push(*desc),
                        Action::Recycle => self.free.push(*desc),
                    }
                }
                let ps = &shared.port_stats[port];
                ps.rx_packets.fetch_add(n as u64, Ordering::Relaxed);
                ps.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
                shared.worker_stats[self.index]
                    .rx
                    .fetch_add(n as u64, Ordering::Relaxed);
                self.flush(shared);
            }
            if !self.held.is_empty() {
                self.release_held(shared);
                self.flush(shared);
            }
            if !self.waiting.is_empty() {
                self.install_waiting(shared);
            }
            self.complete();
            self.refill();
            let sending = self.socks.iter().any(|s| s.in_flight > 0);
            if got == 0 && !sending && self.held.is_empty() {
                if shared.busy_poll {
                    for s in &self.socks {
                        iface::kick_rx(s.rx.fd().as_raw_fd());
                    }
                } else {
                    shared.worker_stats[self.index]
                        .sleeps
                        .fetch_add(1, Ordering::Relaxed);
                    iface::wait_readable(&mut pollfds, IDLE_POLL_MS);
                }
            }
        }
    }

    /// Decides one received frame (the heart of the worker).
    fn decide(&mut self, shared: &Shared, frame: &mut [u8], ingress: usize) -> Action {
        let router = shared.mode == Mode::Router;
        // A router takes frames for its own MAC and for groups only (`eth_type_trans`
        // marks others PACKET_OTHERHOST and `ip_rcv` drops them); it never forwards what
        // came to a group address (no multicast routing, as a kernel without mrouted).
        let group = wire::dst_mac(frame).is_some_and(|d| d[0] & 1 != 0);
        if router && !group && wire::dst_mac(frame).is_some_and(|d| d != shared.ports[ingress].mac)
        {
            return self.dropped(shared, ingress, true);
        }
        if router && wire::ethertype(frame) == Some(wire::ETHERTYPE_IPV6) {
            if let Some(nd) = wire::parse_nd(frame) {
                // XXX: neighbour discovery is answered before the rules see it (the kernel
                // runs it through the input hook); home-router.nft accepts it anyway.
                self.neighbour_discovery(shared, frame, ingress, nd);
                return self.dropped(shared, ingress, false);
            }
        }
        // The engine edits the frame in place (TTL, NAT).
        let (verdict, _) =
            shared
                .engine
                .process_with(&mut frame[..], ingress, self.now, &mut self.engine_worker);
        for line in self.engine_worker.logs.drain(..) {
            let (write, notice) = shared.log_limit.allow(self.now.0);
            if let Some(n) = notice {
                eprintln!("{n}");
            }
            if write {
                eprintln!("{}", line.trim_end());
            }
        }
        if !self.engine_worker.flow_events.is_empty() {
            self.mirror_flow_events(shared, frame, ingress);
        }
        if !self.engine_worker.events.is_empty() && shared.events.active() {
            let now = self.now;
            shared.events.publish(
                self.engine_worker
                    .events
                    .iter()
                    .map(|(ev, c)| show::event_line(c, *ev, now, show::ShowOpts::default())),
            );
        }
        match verdict {
            // A frame to a group MAC is never forwarded by a router (the engine delivers
            // group IP destinations locally; this guards a unicast IP in a group frame).
            Verdict::Forward { .. } if router && group => self.dropped(shared, ingress, true),
            Verdict::Forward { port, next_hop } => {
                // A helper rewrote the payload to another length (FTP, SIP through NAT):
                // that frame leaves instead.
                if let Some(mut f) = self.engine_worker.resized.take() {
                    if let Action::Send(p) = self.forward(shared, &mut f, port, next_hop) {
                        self.send_copy(shared, p, &f);
                    }
                    return Action::Recycle;
                }
                if self.engine_worker.released.is_empty() {
                    return self.forward(shared, frame, port, next_hop);
                }
                // The frame completed a fragmented datagram: its original fragments leave.
                let released = std::mem::take(&mut self.engine_worker.released);
                for mut f in released {
                    if let Action::Send(p) = self.forward(shared, &mut f, port, next_hop) {
                        self.send_copy(shared, p, &f);
                    }
                }
                Action::Recycle
            }
            Verdict::Local => {
                let p = &shared.ports[ingress];
                let ours = |a: IpAddr| p.addresses.iter().any(|n| n.addr() == a);
                if wire::echo_reply_v4(frame, ours) || wire::echo_reply_v6(frame, ours) {
                    self.answered(shared);
                    Action::Send(ingress)
                } else {
                    // XXX: the box has no TCP/UDP services of its own yet (DNS, ssh).
                    self.dropped(shared, ingress, true)
                }
            }
            Verdict::NotIp if router => {
                self.arp(shared, frame, ingress);
                self.dropped(shared, ingress, false)
            }
            Verdict::NotIp => match ingress ^ 1 {
                out if out < shared.ports.len() => Action::Send(out),
                _ => self.dropped(shared, ingress, true),
            },
            Verdict::Reject(_) => {
                if let Some(reply) = self.engine_worker.reply.take() {
                    self.send_copy(shared, ingress, &reply);
                }
                self.dropped(shared, ingress, true)
            }
            Verdict::Held => Action::Recycle,
            Verdict::Drop(_) => {
                // An ICMP time exceeded for a TTL that ran out goes back to the sender.
                if let Some(reply) = self.engine_worker.reply.take() {
                    self.send_copy(shared, ingress, &reply);
                }
                self.dropped(shared, ingress, true)
            }
        }
    }

    /// Mirrors the engine's flowtable changes into the XDP fast path: an offloaded flow is
    /// installed (or waits for its neighbours), a torn-down one removed. `frame` arrived on
    /// `ingress` and caused them.
    fn mirror_flow_events(&mut self, shared: &Shared, frame: &[u8], ingress: usize) {
        let Some(fp) = &shared.fastpath else {
            self.engine_worker.flow_events.clear();
            return;
        };
        let events = std::mem::take(&mut self.engine_worker.flow_events);
        for ev in &events {
            match ev {
                FlowEvent::Offloaded(flow) if shared.mode == Mode::Bridge => {
                    install_bridged(fp, flow, frame, ingress);
                }
                // A refresh's retry of a flow that waits here already: its turn comes.
                FlowEvent::Offloaded(flow) if self.waiting.iter().any(|f| Arc::ptr_eq(f, flow)) => {
                }
                FlowEvent::Offloaded(flow) => {
                    if !self.install(shared, flow) && self.waiting.len() < MAX_WAITING_FLOWS {
                        fp.stats.waiting.fetch_add(1, Ordering::Relaxed);
                        self.waiting.push(flow.clone());
                    }
                }
                FlowEvent::TornDown(flow) => {
                    if let Some(i) = self.waiting.iter().position(|f| Arc::ptr_eq(f, flow)) {
                        self.waiting.swap_remove(i);
                        fp.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                    }
                    fp.retire(&shared.engine, flow, self.now);
                }
            }
        }
        // Give the buffer back (the engine clears it before each frame).
        self.engine_worker.flow_events = events;
    }

    /// Installs both directions of a routed `flow` in the fast path; false if a next hop's
    /// MAC is not known yet (asked for here, so a later try finds it). A flow the maps
    /// refuse is not waited for: its next refresh asks again.
    fn install(&mut self, shared: &Shared, flow: &FlowRef) -> bool {
        let Some(fp) = &shared.fastpath else {
            return true;
        };
        if flow.is_torn_down() {
            return true;
        }
        let mut macs = [([0u8; 6], [0u8; 6]); 2];
        for (m, d) in macs.iter_mut().zip(&flow.dirs) {
            match self.neighbour(shared, d.oif, d.next_hop) {
                Some(mac) => *m = (mac, shared.ports[d.oif].mac),
                None => return false,
            }
        }
        fp.install(flow, macs);
        true
    }

    /// Tries the waiting flows again.
    fn install_waiting(&mut self, shared: &Shared) {
        let waiting = std::mem::take(&mut self.waiting);
        for flow in waiting {
            if flow.is_torn_down() || self.install(shared, &flow) {
                if let Some(fp) = &shared.fastpath {
                    fp.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                }
            } else {
                self.waiting.push(flow);
            }
        }
    }

    /// `hop`'s MAC on `port` if known; if nobody asked lately, asks.
    fn neighbour(&mut self, shared: &Shared, port: usize, hop: IpAddr) -> Option<Mac> {
        match self.resolve(shared, port, hop) {
            Resolve::Known(mac) => Some(mac),
            Resolve::Ask => {
                self.solicit(shared, port, hop);
                None
            }
            Resolve::Wait | Resolve::Failed => None,
        }
    }

    fn dropped(&self, shared: &Shared, port: usize, count: bool) -> Action {
        if count {
            shared.port_stats[port]
                .dropped
                .fetch_add(1, Ordering::Relaxed);
            shared.worker_stats[self.index]
                .dropped
                .fetch_add(1, Ordering::Relaxed);
        }
        Action::Recycle
    }

    fn answered(&self, shared: &Shared) {
        shared.worker_stats[self.index]
            .answered
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The router's L2 part of forwarding: the next hop's MAC, or hold the frame and ask.
    fn forward(&mut self, shared: &Shared, frame: &mut [u8], port: usize, hop: IpAddr) -> Action {
        if shared.mode == Mode::Bridge {
            return Action::Send(port);
        }
        match self.resolve(shared, port, hop) {
            Resolve::Known(mac) => {
                wire::set_macs(frame, mac, shared.ports[port].mac);
                Action::Send(port)
            }
            r @ (Resolve::Ask | Resolve::Wait) => {
                if r == Resolve::Ask {
                    self.solicit(shared, port, hop);
                }
                if self.held.len() < MAX_HELD {
                    self.held.push_back(Held {
                        port,
                        hop,
                        frame: frame.to_vec(),
                    });
                    shared.worker_stats[self.index]
                        .held
                        .fetch_add(1, Ordering::Relaxed);
                    Action::Recycle
                } else {
                    self.dropped(shared, port, true)
                }
            }
            Resolve::Failed => self.dropped(shared, port, true),
        }
    }

    /// `hop`'s MAC on `port` from this worker's copy of the neighbour table, or the shared
    /// table's word on it.
    fn resolve(&mut self, shared: &Shared, port: usize, hop: IpAddr) -> Resolve {
        let generation = shared.neighbours.generation();
        if generation != self.neigh_gen || self.neigh_cache.len() > MAX_CACHED_NEIGHBOURS {
            self.neigh_cache.clear();
            self.neigh_gen = generation;
        }
        if let Some(&mac) = self.neigh_cache.get(&(port, hop)) {
            return Resolve::Known(mac);
        }
        let r = shared.neighbours.resolve(port, hop, self.now.0);
        if let Resolve::Known(mac) = r {
            self.neigh_cache.insert((port, hop), mac);
        }
        r
    }

    /// Sends what waited for a neighbour that is now known; asks again, or drops, for the
    /// others.
    fn release_held(&mut self, shared: &Shared) {
        for _ in 0..self.held.len() {
            let Some(mut h) = self.held.pop_front() else {
                break;
            };
            match shared.neighbours.resolve(h.port, h.hop, self.now.0) {
                Resolve::Known(mac) => {
                    wire::set_macs(&mut h.frame, mac, shared.ports[h.port].mac);
                    self.send_copy(shared, h.port, &h.frame);
                }
                Resolve::Ask => {
                    self.solicit(shared, h.port, h.hop);
                    self.held.push_back(h);
                }
                Resolve::Wait => self.held.push_back(h),
                Resolve::Failed => {
                    self.dropped(shared, h.port, true);
                }
            }
        }
    }

    /// Asks for `hop`'s MAC on `port`: an ARP request, or a neighbour solicitation.
    fn solicit(&mut self, shared: &Shared, port: usize, hop: IpAddr) {
        let p = &shared.ports[port];
        let mut out = std::mem::take(&mut self.scratch);
        match (p.source_for(hop), hop) {
            (Some(IpAddr::V4(src)), IpAddr::V4(h)) => {
                wire::arp(&mut out, wire::ARP_REQUEST, p.mac, src, None, h)
            }
            (Some(IpAddr::V6(src)), IpAddr::V6(h)) => wire::nd(
                &mut out,
                wire::ND_NEIGHBOR_SOLICIT,
                p.mac,
                src,
                None,
                h,
                false,
            ),
            _ => out.clear(),
        }
        if !out.is_empty() {
            self.send_copy(shared, port, &out);
        }
        self.scratch = out;
    }

    /// ARP on `port`: learn the sender when it is on our network (`arp_process`), answer
    /// requests for our addresses on that port.
    fn arp(&mut self, shared: &Shared, frame: &[u8], port: usize) {
        let Some(a) = wire::parse_arp(frame) else {
            return;
        };
        let p = &shared.ports[port];
        let sender = IpAddr::V4(a.sender_ip);
        if p.on_link(sender) {
            shared.neighbours.learn(port, sender, a.sender_mac);
        }
        let ours = p
            .addresses
            .iter()
            .any(|n| n.addr() == IpAddr::V4(a.target_ip));
        if a.op == wire::ARP_REQUEST && ours {
            let mut out = std::mem::take(&mut self.scratch);
            wire::arp(
                &mut out,
                wire::ARP_REPLY,
                p.mac,
                a.target_ip,
                Some(a.sender_mac),
                a.sender_ip,
            );
            self.send_copy(shared, port, &out);
            self.scratch = out;
            self.answered(shared);
        }
    }

    /// Neighbour discovery on `port`: learn from solicitations and advertisements, advertise
    /// our own addresses when solicited (RFC 4861 7.2.3-7.2.5).
    fn neighbour_discovery(&mut self, shared: &Shared, frame: &[u8], port: usize, nd: wire::Nd) {
        let p = &shared.ports[port];
        let eth_src: Option<Mac> = wire::src_mac(frame);
        if nd.icmp_type == wire::ND_NEIGHBOR_ADVERT {
            if let Some(mac) = nd.lladdr.or(eth_src) {
                shared.neighbours.learn(port, IpAddr::V6(nd.target), mac);
            }
            return;
        }
        let unspecified = nd.src.is_unspecified();
        if !unspecified {
            if let Some(mac) = nd.lladdr {
                shared.neighbours.learn(port, IpAddr::V6(nd.src), mac);
            }
        }
        if !p
            .addresses
            .iter()
            .any(|n| n.addr() == IpAddr::V6(nd.target))
        {
            return;
        }
        let to = if unspecified {
            wire::all_nodes()
        } else {
            match nd.lladdr.or(eth_src) {
                Some(mac) => (nd.src, mac),
                None => return,
            }
        };
        let mut out = std::mem::take(&mut self.scratch);
        wire::nd(
            &mut out,
            wire::ND_NEIGHBOR_ADVERT,
            p.mac,
            nd.target,
            Some(to),
            nd.target,
            true,
        );
        self.send_copy(shared, port, &out);
        self.scratch = out;
        self.answered(shared);
    }

    /// Copies `bytes` into a free UMEM frame and queues it on `port`.
    fn send_copy(&mut self, shared: &Shared, port: usize, bytes: &[u8]) {
        let Some(mut desc) = self.free.pop() else {
            shared.port_stats[port]
                .tx_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let written = {
            // SAFETY: the frame is on the free list: neither the kernel nor anyone else
            // holds it.
            let mut data = unsafe { self.umem.data_mut(&mut desc) };
            let mut c = data.cursor();
            c.set_pos(0);
            c.write_all(bytes).is_ok()
        };
        if written {
            self.outbox[port].push(desc);
        } else {
            self.free.push(desc);
            shared.port_stats[port]
                .tx_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hands every port's outbox to its tx ring and wakes the kernel to send it.
    fn flush(&mut self, shared: &Shared) {
        for port in 0..self.outbox.len() {
            if self.outbox[port].is_empty() {
                continue;
            }
            let Some(sock) = self.socks.get_mut(self.tx_sock[port]) else {
                // Cannot happen with a plan that gives every worker every port; recycle.
                let n = self.outbox[port].len() as u64;
                self.free.append(&mut self.outbox[port]);
                shared.port_stats[port]
                    .tx_dropped
                    .fetch_add(n, Ordering::Relaxed);
                continue;
            };
            let out = &mut self.outbox[port];
            // SAFETY: every frame in the outbox is in our hands; handed to the ring, it is
            // the kernel's until it comes back on the completion ring.
            let sent = unsafe { sock.tx.produce(out) };
            sock.in_flight += sent;
            let bytes: u64 = out[..sent].iter().map(|d| d.lengths().data() as u64).sum();
            let ps = &shared.port_stats[port];
            ps.tx_packets.fetch_add(sent as u64, Ordering::Relaxed);
            ps.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
            ps.tx_dropped
                .fetch_add((out.len() - sent) as u64, Ordering::Relaxed);
            shared.worker_stats[self.index]
                .tx
                .fetch_add(sent as u64, Ordering::Relaxed);
            self.free.extend_from_slice(&out[sent..]);
            out.clear();
            // Copy mode sends only on sendto(2): always needed with need_wakeup set.
            if sock.tx.needs_wakeup() {
                let _ = sock.tx.wakeup();
            }
        }
    }

    /// Takes completed transmissions back; pokes the kernel again for what is still queued
    /// (copy mode sends a bounded number of frames per sendto).
    fn complete(&mut self) {
        let mut done = [FrameDesc::default(); BATCH];
        for s in &mut self.socks {
            loop {
                // SAFETY: completed frames are back in our hands.
                let n = unsafe { s.cq.consume(&mut done) };
                if n == 0 {
                    break;
                }
                s.in_flight = s.in_flight.saturating_sub(n);
                self.free.extend_from_slice(&done[..n]);
            }
            if s.in_flight > 0 && s.tx.needs_wakeup() {
                let _ = s.tx.wakeup();
            }
        }
    }

    /// Tops up every fill ring from the free list, keeping a batch of spares for the frames
    /// the box writes itself.
    fn refill(&mut self) {
        for s in &mut self.socks {
            let room = s.fq.nb_free(RING) as usize;
            let spare = self.free.len().saturating_sub(BATCH);
            let n = room.min(spare);
            if n > 0 {
                let start = self.free.len() - n;
                // SAFETY: free frames are ours to give; the fill ring owns them from here.
                let given = unsafe { s.fq.produce(&self.free[start..]) };
                self.free.drain(start..start + given);
            }
            if s.fq.needs_wakeup() {
                iface::kick_rx(s.rx.fd().as_raw_fd());
            }
        }
    }
}

/// Installs both directions of a bridged `flow`: a bridge leaves the MACs as they are, so
/// the direction `frame` (arriving on `ingress`) took keeps its own and the other direction
/// has them swapped.
fn install_bridged(fp: &FastPath, flow: &FlowRef, frame: &[u8], ingress: usize) {
    let (Some(src), Some(dst)) = (wire::src_mac(frame), wire::dst_mac(frame)) else {
        return;
    };
    // (destination, source) per direction.
    let mut macs = [(src, dst); 2];
    let this = usize::from(flow.dirs[0].iif != ingress);
    macs[this] = (dst, src);
    fp.install(flow, macs);
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queues: Vec<_> = self.socks.iter().map(|s| (s.port, s.queue)).collect();
        f.debug_struct("Worker")
            .field("index", &self.index)
            .field("queues", &queues)
            .finish()
    }
}
