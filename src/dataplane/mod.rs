//! The live dataplane: frames in on AF_XDP sockets, decisions from the engine, frames out.
//! The only home of unsafe code, threads and syscalls in keepstate.
//!
//! ```text
//!  port interface, rx queue q ──XDP (the fast path, [`fastpath`])──> AF_XDP socket (copy mode)
//!    an offloaded flow's packets: MACs, NAT, TTL and out of the egress port in XDP itself
//!    worker w owns queue q of every port where q % workers == w, and one UMEM for them all:
//!    rx ring ─> frame ─> engine.process_with(frame, port, now) ─> verdict
//!       Forward: L2 rewrite (MACs from the neighbour cache) ─> tx ring of the egress port
//!       Local:   ICMP echo answered in place ─> tx ring of the ingress port
//!       NotIp:   ARP answered and learned (bridge: passed to the paired port)
//!       Reject:  the engine's answer frame ─> tx ring of the ingress port
//!    completion ring ─> free frames ─> fill ring
//! ```
//!
//! The division of labour: the engine owns L3/L4 (conntrack, rules, NAT edits, TTL); the
//! dataplane owns L2 and the box's own small stack (ARP, neighbour discovery, echo). A frame
//! that is forwarded leaves from the UMEM frame it arrived in: receive, decide, rewrite the
//! Ethernet header and transmit touch no allocator. Only frames that wait for a neighbour
//! and the few the box writes itself (ARP, ND, reject answers) are copied.
//!
//! Owns: sockets and UMEMs ([`worker`]), interface facts and socket options ([`iface`]), the
//! neighbour cache ([`neigh`]), the link-layer bytes ([`wire`]), the lab's namespaces
//! ([`lab`]), the control socket ([`control`]), the workers' heartbeats, the ports' XDP
//! programs and the reports of a dead or stuck worker or a bypassed port ([`health`]), the
//! lab demo ([`demo`]) and the lab soak ([`soak`]). Must not hold policy: what passes is the
//! engine's word alone.

pub mod bench;
pub mod control;
pub mod demo;
pub mod gen;

pub mod fastpath;
pub mod flows4;
pub mod health;
pub mod iface;
pub mod lab;
pub mod memprobe;
pub mod neigh;
pub mod probe;
pub mod soak;
pub mod wire;
mod worker;

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::config::{Config, Mode};
use crate::conntrack::show::{self, ShowOpts};
use crate::conntrack::{Timestamp, EV_DESTROY};
use crate::engine::Engine;

pub use wire::Mac;

/// Frames taken from an rx ring at once, and the most the workers hand the tx ring at once.
pub const BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("interface `{interface}` cannot be used ({reason}); is keepstate running in the right network namespace?")]
    NoInterface { interface: String, reason: String },
    #[error("the configuration has no [[port]]: there is nothing to forward between")]
    NoPorts,
    #[error("port `{port}` asks for {want} queues, but interface `{interface}` has {have}")]
    TooManyQueues {
        port: String,
        interface: String,
        want: u32,
        have: u32,
    },
    #[error(
        "{workers} workers need at least {workers} queues on every port (each worker sends on a \
         queue of its own), but port `{port}` has {queues}: lower `workers` under [dataplane], \
         or give the interface more queues (veth: `ip link add ... numrxqueues N numtxqueues N`)"
    )]
    TooFewQueues {
        workers: usize,
        port: String,
        queues: u32,
    },
    #[error("worker {worker}: cannot create its UMEM: {reason}")]
    Umem { worker: usize, reason: String },
    #[error(
        "cannot open an AF_XDP socket on `{interface}` queue {queue}: {reason} (this needs root, \
         or CAP_NET_ADMIN and CAP_BPF, and nothing else bound to that queue)"
    )]
    Socket {
        interface: String,
        queue: u32,
        reason: String,
    },
    #[error(
        "port `{port}`: no XDP program steers interface `{interface}`'s frames to the sockets \
         once they are bound ({reason}): no frame would reach the workers"
    )]
    NoProgram {
        port: String,
        interface: String,
        reason: String,
    },
    #[error("{0}")]
    Fault(String),
    #[error("cannot start worker {worker}: {source}")]
    Thread {
        worker: usize,
        source: std::io::Error,
    },
}

/// A port as the dataplane sees it.
#[derive(Clone, Debug)]
pub struct PortInfo {
    pub name: String,
    pub interface: String,
    pub mac: Mac,
    /// Its own addresses, with their networks (router mode).
    pub addresses: Vec<IpNet>,
    /// How many of its receive queues the workers serve.
    pub queues: u32,
}

impl PortInfo {
    /// The port's own address of `hop`'s family, preferring one on `hop`'s network: the
    /// source of an ARP or ND question about `hop`.
    fn source_for(&self, hop: IpAddr) -> Option<IpAddr> {
        let same = |n: &&IpNet| n.addr().is_ipv4() == hop.is_ipv4();
        self.addresses
            .iter()
            .filter(same)
            .find(|n| n.contains(&hop))
            .or_else(|| self.addresses.iter().find(same))
            .map(|n| n.addr())
    }

    fn on_link(&self, ip: IpAddr) -> bool {
        self.addresses.iter().any(|n| n.contains(&ip))
    }
}

/// Counters of one port, summed over the workers.
#[derive(Debug, Default)]
pub struct PortStats {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames that came in here and were not sent anywhere: the engine's drops, frames for
    /// the box it does not answer, neighbours that never answered.
    pub dropped: AtomicU64,
    /// Frames that should have left here but found the tx ring or the frame pool full.
    pub tx_dropped: AtomicU64,
}

/// Counters and health of one worker, on cache lines of their own (a worker writes its
/// counters and heartbeat on every batch; no other worker's writes may invalidate them).
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct WorkerStats {
    pub rx: AtomicU64,
    pub tx: AtomicU64,
    pub dropped: AtomicU64,
    /// Frames the box answered itself (ARP, ND, echo).
    pub answered: AtomicU64,
    /// Frames held while their next hop was being resolved.
    pub held: AtomicU64,
    /// Times the worker slept in poll(2) with nothing to do.
    pub sleeps: AtomicU64,
    /// The clock ([`Shared::now`], ns) when the worker last began a turn of its loop.
    pub beat: AtomicU64,
    /// How its thread ended, once it has.
    pub ending: OnceLock<health::Ending>,
}

/// Lines a subscriber may have waiting before newer ones are lost.
const EVENT_BACKLOG: usize = 8192;

/// One `ct events` client: its lines, and how many it lost because it read too slowly.
pub struct Subscription {
    pub rx: Receiver<String>,
    pub lost: Arc<AtomicU64>,
}

/// Where `conntrack -E` lines go: the workers publish the events their frames cause, the
/// main thread the DESTROY events, and each `ct events` client reads its own copy. With no
/// subscriber, publishing costs one atomic load.
#[derive(Default)]
pub struct EventHub {
    subscribers: AtomicUsize,
    subs: Mutex<Vec<(SyncSender<String>, Arc<AtomicU64>)>>,
}

impl EventHub {
    /// Whether anyone listens (checked before an event line is even formatted).
    pub fn active(&self) -> bool {
        self.subscribers.load(Ordering::Relaxed) > 0
    }

    pub fn subscribe(&self) -> Subscription {
        let (tx, rx) = std::sync::mpsc::sync_channel(EVENT_BACKLOG);
        let lost = Arc::new(AtomicU64::new(0));
        let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        subs.push((tx, lost.clone()));
        self.subscribers.store(subs.len(), Ordering::Relaxed);
        Subscription { rx, lost }
    }

    /// Hands `lines` to every subscriber; a full subscriber loses them (and is told), a
    /// gone one is dropped.
    pub fn publish(&self, lines: impl IntoIterator<Item = String>) {
        let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        for line in lines {
            subs.retain(|(tx, lost)| match tx.try_send(line.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    lost.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            });
        }
        self.subscribers.store(subs.len(), Ordering::Relaxed);
    }
}

/// Everything the workers share.
pub struct Shared {
    pub engine: Arc<Engine>,
    pub ports: Vec<PortInfo>,
    pub mode: Mode,
    pub busy_poll: bool,
    pub neighbours: neigh::Neighbours,
    pub port_stats: Vec<PortStats>,
    pub worker_stats: Vec<WorkerStats>,
    pub stop: AtomicBool,
    /// `conntrack -E` lines for the control socket's `ct events` clients.
    pub events: EventHub,
    /// The rate limit of `log` statements' lines.
    pub log_limit: LogLimit,
    /// The XDP fast path, when it loaded (else libxdp's default program runs and the
    /// workers forward offloaded flows themselves).
    pub fastpath: Option<fastpath::FastPath>,
    /// A worker without a heartbeat this long (ns) is stuck.
    pub stall_timeout_ns: u64,
    /// What each worker serves, as `lan/1 wan/1` (for the reports of a failed worker).
    pub worker_queues: Vec<String>,
    /// Per port: the XDP program that steers its frames to the workers' sockets, as found
    /// once they were bound, and what [`Shared::watch_ports`] last found there.
    steering: Mutex<Vec<PortSteering>>,
    /// Where the monotonic clock starts (the engine's `now` is time since this).
    epoch: Instant,
}

/// Which XDP program hands a port's frames to the workers: the one [`start`] found once the
/// sockets were bound (libxdp's default program, or the fast path), and the last check's
/// finding.
struct PortSteering {
    ifindex: u32,
    id: u32,
    seen: health::Steering,
}

/// The rate limit of the lines `log` statements write, as the kernel's `net_ratelimit`:
/// at most [`LogLimit::BURST`] lines per [`LogLimit::INTERVAL_NS`], and, when a new interval
/// starts, one line saying how many were suppressed. A flood of dropped packets cannot
/// flood the log (nor slow the workers writing it).
#[derive(Default)]
pub struct LogLimit {
    /// (interval start, lines written in it, lines suppressed in it).
    state: parking_lot::Mutex<(u64, u32, u64)>,
}

impl LogLimit {
    /// `net_ratelimit_state`: 5 s.
    pub const INTERVAL_NS: u64 = 5_000_000_000;
    /// `net_ratelimit_state`: 10 messages.
    pub const BURST: u32 = 10;

    /// Whether a line may be written at `now` (ns); the suppression notice to write first,
    /// if an interval with suppressed lines just ended.
    pub fn allow(&self, now: u64) -> (bool, Option<String>) {
        let mut g = self.state.lock();
        let (start, printed, suppressed) = &mut *g;
        let mut notice = None;
        if now.saturating_sub(*start) >= Self::INTERVAL_NS {
            if *suppressed > 0 {
                notice = Some(format!("keepstate: {suppressed} log lines suppressed"));
            }
            *start = now;
            *printed = 0;
            *suppressed = 0;
        }
        if *printed < Self::BURST {
            *printed += 1;
            (true, notice)
        } else {
            *suppressed += 1;
            (false, notice)
        }
    }
}

impl Shared {
    /// The monotonic clock, as the engine and the tracker take it.
    pub fn now(&self) -> Timestamp {
        // Start at 1 s rather than 0, so no timestamp is the default value.
        Timestamp(self.epoch.elapsed().as_nanos() as u64 + 1_000_000_000)
    }

    /// Each worker's health now.
    pub fn health(&self) -> Vec<health::Health> {
        let now = self.now().0;
        self.worker_stats
            .iter()
            .map(|w| {
                health::judge(
                    w.ending.get(),
                    w.beat.load(Ordering::Relaxed),
                    now,
                    self.stall_timeout_ns,
                )
            })
            .collect()
    }

    /// Asks the kernel which XDP program each port's interface runs now: any other than the
    /// one found at the start, or none, means the port's frames bypass the workers (an
    /// `ip link set dev IF xdp off`, another tool's program). Each port's finding, also kept
    /// for `keepstate stats`. With the fast path, also which ports take its redirected frames
    /// ([`fastpath::FastPath::refresh_egress`]). A netlink request or two per port: call it
    /// about once a second.
    ///
    /// XXX: with the fast path off, a libxdp-aware tool that adds its own program to libxdp's
    /// dispatcher replaces the dispatcher (a new id) while the sockets' program may still run
    /// in its chain: reported as replaced all the same; telling the two apart needs libxdp's
    /// `xdp_multiprog__get_from_ifindex`.
    pub fn watch_ports(&self) -> Vec<health::Steering> {
        if let Some(fp) = &self.fastpath {
            // And which ports take the fast path's redirected frames.
            fp.refresh_egress();
        }
        let mut steering = self.steering.lock().unwrap_or_else(|p| p.into_inner());
        for p in steering.iter_mut() {
            let now = iface::xdp_programs(p.ifindex)
                .map(|x| x.steering())
                .map_err(|e| e.to_string());
            p.seen = health::judge_port(p.id, now);
        }
        steering.iter().map(|p| p.seen.clone()).collect()
    }

    /// The counters as text: one line per port and one per worker (each's health first),
    /// the engine's verdicts, the fast path's totals. Reads no flow's counters (the totals
    /// come from the program itself): at a million flows, a walk over them under the fast
    /// path's entries lock for every query had put a bench window's p99 latency at 391 ms.
    pub fn render_stats(&self) -> String {
        let mut s = String::new();
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let steering: Vec<String> = {
            let st = self.steering.lock().unwrap_or_else(|p| p.into_inner());
            st.iter().map(|p| p.seen.to_string()).collect()
        };
        for (i, (p, st)) in self.ports.iter().zip(&self.port_stats).enumerate() {
            let _ = writeln!(
                s,
                "port {} ({}): {}; rx {} packets {} bytes, tx {} packets {} bytes, dropped {}, tx dropped {}",
                p.name,
                p.interface,
                steering.get(i).map_or("XDP program not known yet", String::as_str),
                r(&st.rx_packets),
                r(&st.rx_bytes),
                r(&st.tx_packets),
                r(&st.tx_bytes),
                r(&st.dropped),
                r(&st.tx_dropped)
            );
        }
        for (i, (w, h)) in self.worker_stats.iter().zip(self.health()).enumerate() {
            let _ = writeln!(
                s,
                "worker {i}: {h}; rx {} tx {} dropped {} answered {} held {} sleeps {}",
                r(&w.rx),
                r(&w.tx),
                r(&w.dropped),
                r(&w.answered),
                r(&w.held),
                r(&w.sleeps)
            );
        }
        let e = &self.engine.stats();
        let _ = writeln!(
            s,
            "engine: {} frames, {} accepted, {} dropped by rules, {} rejected, {} malformed, {} not IP, {} no route, {} table full; {} connections",
            r(&e.frames),
            r(&e.accepted),
            r(&e.dropped_by_rules),
            r(&e.rejected),
            r(&e.malformed),
            r(&e.not_ip),
            r(&e.dropped_no_route),
            r(&e.dropped_table_full),
            self.engine.tracker().count()
        );
        let _ = writeln!(
            s,
            "flowtable: {} offloaded connections, {} packets forwarded by the engine's flowtable path",
            self.engine.flows().len() / 2,
            r(&e.flowtable_forwarded)
        );
        match &self.fastpath {
            Some(fp) => {
                let st = &fp.stats;
                let (packets, bytes) = fp.forwarded();
                let (used, all, growing) = fp.slots4();
                let growing = if growing { ", growing" } else { "" };
                let _ = writeln!(
                    s,
                    "xdp fast path: {} entries, {} packets {} bytes forwarded by XDP; {} flows installed, {} waiting for a neighbour, {} refused by the map; {} ports taking no redirects; IPv4 table at {used} of {all} slots{growing}",
                    r(&st.entries),
                    packets,
                    bytes,
                    r(&st.installed),
                    r(&st.waiting),
                    r(&st.failed),
                    r(&st.egress_off)
                );
            }
            None => {
                let _ = writeln!(s, "xdp fast path: not loaded (libxdp's default program)");
            }
        }
        let t = self.engine.tracker();
        let ct = t.stats();
        let sum = |f: fn(&crate::conntrack::CtStats) -> u64| ct.iter().map(f).sum::<u64>();
        let (count, max) = (t.count(), t.table().max());
        let _ = writeln!(
            s,
            "conntrack: {count} of {max} entries ({:.1}% full), {} early drops, {} insert failed, {} invalid; expectations {} of {}",
            count as f64 * 100.0 / max.max(1) as f64,
            sum(|c| c.early_drop),
            sum(|c| c.insert_failed),
            sum(|c| c.invalid),
            t.expectations().count(),
            t.expectations().max()
        );
        let _ = writeln!(
            s,
            "nat: {} new connections could not be translated; helpers: {} segments dropped; {} TTL exceeded, {} fragments dropped",
            r(&e.dropped_nat),
            r(&e.dropped_helper),
            r(&e.dropped_ttl),
            r(&e.dropped_fragments)
        );
        let f = self.engine.reassembler();
        let (fs, high) = (f.stats(), f.config().high_thresh);
        let _ = writeln!(
            s,
            "reassembly: {} datagrams held in {} of {high} bytes; {} reassembled, {} given up ({} evicted for memory, {} timed out)",
            fs.queues, fs.mem, fs.reasm_oks, fs.reasm_fails, fs.evictions, fs.reasm_timeout
        );
        s
    }

    /// A step of the flowtable gc (`Engine::flow_gc_step`: one slice of the flows), with the
    /// fast path kept in step: a flow about to expire is refreshed from what XDP forwarded
    /// of it (its counters, read from memory), and the entries of the flows the gc tore down
    /// are removed. When a neighbour's MAC changed, every entry is read and rewritten first
    /// ([`fastpath::FastPath::sync`]).
    pub fn flow_gc(&self) {
        let now = self.now();
        let Some(fp) = &self.fastpath else {
            self.engine.flow_gc_step(now, &|_| {});
            return;
        };
        fp.age_slots();
        fp.tidy(&self.engine, now);
        if fp.neighbours_changed(&self.neighbours) {
            fp.sync(&self.engine, now, &self.neighbours);
        }
        let gone = self
            .engine
            .flow_gc_step(now, &|flow| fp.refresh(&self.engine, flow, now));
        for f in &gone {
            fp.retire(&self.engine, f, now);
        }
    }

    /// Every offloaded flow's fast-path counters into it now, for a listing that shows them:
    /// flow by flow, from the counters' memory ([`fastpath::FastPath::refresh`]), without the
    /// fast path's entries lock, which the workers need to install and remove flows (a walk
    /// over the entries under it would stall them for as long as a million flows take).
    pub fn flow_sync(&self) {
        if let Some(fp) = &self.fastpath {
            let now = self.now();
            for flow in self.engine.flows().flows() {
                fp.refresh(&self.engine, &flow, now);
            }
        }
    }

    /// Publishes the DESTROY events of connections removed since the last call (expired,
    /// killed, evicted). Call it regularly: the tracker keeps them until then.
    pub fn publish_destroyed(&self) {
        let gone = self.engine.tracker().take_destroyed();
        if gone.is_empty() || !self.events.active() {
            return;
        }
        let now = self.now();
        self.events.publish(
            gone.iter()
                .map(|c| show::event_line(c, EV_DESTROY, now, ShowOpts::default())),
        );
    }
}

/// The running dataplane: its workers and what they share.
pub struct Running {
    pub shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// What an operator should know (an interface that is down).
    pub warnings: Vec<String>,
}

/// How long [`Running::stop`] waits for the workers to end.
const STOP_WAIT: Duration = Duration::from_secs(2);

impl Running {
    /// Asks the workers to stop and waits for them, at most [`STOP_WAIT`]; their sockets
    /// close (and libxdp detaches its XDP program) as they end, and the fast path is
    /// detached. A stuck worker is left behind (the process's exit ends it): waiting for it
    /// could take forever.
    pub fn stop(self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let end = Instant::now() + STOP_WAIT;
        let mut left = self.threads;
        while !left.is_empty() && Instant::now() < end {
            let (done, busy): (Vec<_>, Vec<_>) = left.into_iter().partition(|t| t.is_finished());
            for t in done {
                let _ = t.join();
            }
            left = busy;
            if !left.is_empty() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if !left.is_empty() {
            eprintln!(
                "keepstate: {} worker(s) did not stop within {STOP_WAIT:?}; leaving them",
                left.len()
            );
        }
        if let Some(fp) = &self.shared.fastpath {
            fp.detach();
        }
    }
}

/// Which `(port, queue)` pairs each of `workers` workers serves, given each port's queue
/// count: worker w takes queue q of every port where q % workers == w. With at least
/// `workers` queues per port, every worker has a socket on every port, so it can send
/// anywhere without handing frames to another worker.
pub fn assign(queues: &[u32], workers: usize) -> Vec<Vec<(usize, u32)>> {
    (0..workers)
        .map(|w| {
            queues
                .iter()
                .enumerate()
                .flat_map(|(i, &n)| {
                    (0..n)
                        .filter(move |q| *q as usize % workers == w)
                        .map(move |q| (i, q))
                })
                .collect()
        })
        .collect()
}

/// The dataplane planned from the configuration and the interfaces, before any socket is
/// opened: the engine is built knowing how many workers will share it.
pub struct Plan {
    ports: Vec<PortInfo>,
    workers: usize,
    cores: Vec<core_affinity::CoreId>,
    queues: Vec<Vec<(usize, u32)>>,
    warnings: Vec<String>,
    mode: Mode,
    busy_poll: bool,
    stall_timeout_ns: u64,
    /// `[dataplane] fastpath_flows`.
    fastpath_flows: Option<u32>,
    /// Each worker's test fault ([`health::FAULT_ENV`]), normally none.
    faults: Vec<Option<health::Fault>>,
}

impl Plan {
    /// How many workers will run (the engine's per-worker statistics slots).
    pub fn workers(&self) -> usize {
        self.workers
    }
}

/// Reads the ports' interfaces (MAC, queues) and decides the workers and their queues.
pub fn plan(cfg: &Config) -> Result<Plan, DataplaneError> {
    if cfg.ports.is_empty() {
        return Err(DataplaneError::NoPorts);
    }
    let mut ports = Vec::new();
    for p in &cfg.ports {
        let have = iface::rx_queues(&p.interface)?;
        let queues = p.queues.unwrap_or(have);
        if queues > have {
            return Err(DataplaneError::TooManyQueues {
                port: p.name.clone(),
                interface: p.interface.clone(),
                want: queues,
                have,
            });
        }
        ports.push(PortInfo {
            name: p.name.clone(),
            interface: p.interface.clone(),
            mac: iface::mac(&p.interface)?,
            addresses: p.addresses.clone(),
            queues,
        });
    }
    let fewest = ports.iter().map(|p| p.queues).min().unwrap_or(1).max(1);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let workers = cfg
        .dataplane
        .workers
        .unwrap_or_else(|| cores.len().clamp(1, fewest as usize));
    if let Some(p) = ports.iter().find(|p| (p.queues as usize) < workers) {
        return Err(DataplaneError::TooFewQueues {
            workers,
            port: p.name.clone(),
            queues: p.queues,
        });
    }
    let queues = assign(&ports.iter().map(|p| p.queues).collect::<Vec<_>>(), workers);
    let warnings = ports
        .iter()
        .filter(|p| iface::is_down(&p.interface))
        .map(|p| {
            format!(
                "port {}: interface {} is down; nothing moves until it is up",
                p.name, p.interface
            )
        })
        .collect();
    let faults = match std::env::var(health::FAULT_ENV) {
        Ok(spec) => health::parse_faults(&spec, workers).map_err(DataplaneError::Fault)?,
        Err(_) => vec![None; workers],
    };
    Ok(Plan {
        ports,
        workers,
        cores,
        queues,
        warnings,
        mode: cfg.dataplane.mode,
        busy_poll: cfg.dataplane.busy_poll,
        stall_timeout_ns: u64::from(cfg.dataplane.stall_timeout) * 1_000_000_000,
        fastpath_flows: cfg.dataplane.fastpath_flows,
        faults,
    })
}

/// Opens the AF_XDP sockets on every queue of every port and starts the workers, all
/// sharing `engine`.
pub fn start(plan: Plan, engine: Arc<Engine>) -> Result<Running, DataplaneError> {
    let Plan {
        ports,
        workers,
        cores,
        queues: plan,
        mut warnings,
        mode,
        busy_poll,
        stall_timeout_ns,
        fastpath_flows,
        faults,
    } = plan;
    iface::quiet_libbpf();
    // The fast path goes on before any socket opens: until a socket is in `xsks`, its
    // queue's frames go to the kernel (XDP_PASS), as before any program ran.
    let interfaces: Vec<String> = ports.iter().map(|p| p.interface.clone()).collect();
    let most = ports.iter().map(|p| p.queues).max().unwrap_or(0);
    // Room for both directions of every connection the table may hold, as the kernel's
    // flowtable (a resizing hash) never refuses one for lack of room; or of as many as the
    // configuration says (at least 512: the maps' least).
    let flows = match fastpath_flows {
        Some(n) => (n as usize).saturating_mul(2).clamp(1 << 10, 1 << 23),
        None => (engine.tracker().table().max().saturating_mul(2)).clamp(1 << 16, 1 << 23),
    };
    let loaded = fastpath::FastPath::load(&interfaces, most, flows as u32).and_then(|fp| {
        fp.attach()?;
        Ok(fp)
    });
    let fastpath = match loaded {
        Ok(fp) => {
            engine.flows().set_mirrored();
            Some(fp)
        }
        Err(e) => {
            // What a failed attach left behind, and a crashed run's program, would stop
            // libxdp from loading its own.
            for i in interfaces.iter().filter_map(|i| iface::ifindex(i).ok()) {
                fastpath::detach_any(i);
            }
            warnings.push(format!(
                "the XDP fast path is off ({e}); libxdp's default program runs, and offloaded \
                 flows are forwarded by the workers"
            ));
            None
        }
    };
    let worker_queues = plan
        .iter()
        .map(|qs| {
            qs.iter()
                .map(|&(p, q)| format!("{}/{q}", ports[p].name))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let shared = Arc::new(Shared {
        engine,
        port_stats: ports.iter().map(|_| PortStats::default()).collect(),
        worker_stats: (0..workers).map(|_| WorkerStats::default()).collect(),
        ports,
        mode,
        busy_poll,
        neighbours: neigh::Neighbours::default(),
        stop: AtomicBool::new(false),
        events: EventHub::default(),
        log_limit: LogLimit::default(),
        fastpath,
        stall_timeout_ns,
        worker_queues,
        steering: Mutex::new(Vec::new()),
        epoch: Instant::now(),
    });
    // Open every socket before any worker runs, so a bad port fails the start as a whole.
    let mut built = Vec::new();
    for (w, queues) in plan.iter().enumerate() {
        built.push(worker::Worker::open(w, queues, shared.clone(), faults[w])?);
    }
    // Now each port's interface runs the program that steers its frames to the sockets
    // (the fast path, attached above, or the one libxdp attached as the first socket
    // bound): the id the main loop watches.
    let steering = shared
        .ports
        .iter()
        .map(|p| {
            let no_program = |reason: String| DataplaneError::NoProgram {
                port: p.name.clone(),
                interface: p.interface.clone(),
                reason,
            };
            let ifindex = iface::ifindex(&p.interface).map_err(|e| no_program(e.to_string()))?;
            let id = iface::xdp_programs(ifindex)
                .map_err(|e| no_program(e.to_string()))?
                .steering();
            if id == 0 {
                return Err(no_program("none is attached".into()));
            }
            Ok(PortSteering {
                ifindex,
                id,
                seen: health::Steering::Steered { id },
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    *shared.steering.lock().unwrap_or_else(|p| p.into_inner()) = steering;
    let mut threads = Vec::new();
    for (w, worker) in built.into_iter().enumerate() {
        let core = cores.get(w % cores.len().max(1)).copied();
        let sh = shared.clone();
        // Alive from now on, even before the thread's first turn.
        sh.worker_stats[w].beat.store(sh.now().0, Ordering::Relaxed);
        let t = std::thread::Builder::new()
            .name(format!("keepstate-w{w}"))
            .spawn(move || {
                if let Some(c) = core {
                    // Pinning is a preference: a worker that cannot be pinned still works.
                    core_affinity::set_for_current(c);
                }
                // A panic ends only this worker (its sockets close as it unwinds); its
                // message stays for the main loop's report, recorded as the panic starts.
                let rec = sh.clone();
                health::record_panics_in(Arc::new(move |e| {
                    let _ = rec.worker_stats[w].ending.set(e);
                }));
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()));
                let ending = match ran {
                    Err(p) => health::Ending::Died(health::panic_message(&*p)),
                    Ok(()) if sh.stop.load(Ordering::Relaxed) => health::Ending::Stopped,
                    Ok(()) => health::Ending::Died("its loop ended".into()),
                };
                let _ = sh.worker_stats[w].ending.set(ending);
            })
            .map_err(|source| DataplaneError::Thread { worker: w, source })?;
        threads.push(t);
    }
    Ok(Running {
        shared,
        threads,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_gets_a_queue_of_every_port() {
        assert_eq!(assign(&[1, 1], 1), vec![vec![(0, 0), (1, 0)]]);
        assert_eq!(
            assign(&[2, 3], 2),
            vec![vec![(0, 0), (1, 0), (1, 2)], vec![(0, 1), (1, 1)]]
        );
        // Every queue is served exactly once.
        let plan = assign(&[4, 8, 5], 3);
        let mut all: Vec<_> = plan.concat();
        all.sort();
        let want: Vec<_> = [4u32, 8, 5]
            .iter()
            .enumerate()
            .flat_map(|(p, &n)| (0..n).map(move |q| (p, q)))
            .collect();
        assert_eq!(all, want);
        for w in &plan {
            for p in 0..3 {
                assert!(w.iter().any(|&(port, _)| port == p));
            }
        }
    }
}

#[cfg(test)]
mod log_limit_tests {
    use super::LogLimit;

    #[test]
    fn ten_lines_per_five_seconds_then_a_count_of_the_rest() {
        let l = LogLimit::default();
        let s = 1_000_000_000;
        let written = (0..25).filter(|i| l.allow(s + i * 1000).0).count();
        assert_eq!(written, 10);
        let (ok, notice) = l.allow(s + LogLimit::INTERVAL_NS + 1);
        assert!(ok);
        assert_eq!(
            notice.as_deref(),
            Some("keepstate: 15 log lines suppressed")
        );
        assert_eq!(l.allow(s + LogLimit::INTERVAL_NS + 2).1, None);
    }
}
