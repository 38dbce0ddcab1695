//! The XDP fast path: the object (src/dataplane/bpf/fastpath.bpf.c, compiled by build.rs),
//! the layouts of its maps, and its life in the kernel: loaded with libbpf, attached to every
//! port's interface in place of libxdp's default program, its `flows` map kept in step with
//! the engine's flowtables.
//!
//! Who writes what: the workers install both directions of a flow when the engine offloads
//! it (they know the neighbours' MACs) and remove them when a packet tears it down; the main
//! loop reads the counters back into [`Engine::flow_account`] (a few thousand entries a tick,
//! the whole map every 20 s, or at once for a listing) and removes the flows the flowtable gc
//! or a reload tore down, and any entry no live flow owns. The program only adds to the
//! counters; nobody else writes them.
//!
//! Owns the BPF object, its maps and the XDP attachments; decides nothing about flows (that
//! is the engine's flowtable, [`crate::conntrack::flowtable`]).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::iface;
use super::neigh::Neighbours;
use super::Mac;
use crate::conntrack::flowtable::{FlowDir, FlowRef};
use crate::conntrack::tuple::{Tuple, L3};
use crate::conntrack::{status, Dir, Timestamp};
use crate::engine::Engine;
use crate::packet::rewrite::Rewrite;

/// The compiled BPF object (ELF).
pub static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fastpath.bpf.o"));

/// `struct flow_key`: the ingress ifindex and the tuple as the packet arrives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct FlowKey {
    pub ifindex: u32,
    /// 4 or 6.
    pub l3: u8,
    pub proto: u8,
    pub pad: u16,
    /// IPv4 in the first four bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order.
    pub sport: u16,
    pub dport: u16,
}

/// `flow_value.nat` bits.
pub mod nat {
    pub const SRC: u8 = 0x1;
    pub const DST: u8 = 0x2;
    pub const SPORT: u8 = 0x4;
    pub const DPORT: u8 = 0x8;
}

/// `struct flow_value`: where the direction leaves and how it is rewritten; the counters the
/// program adds to atomically.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FlowValue {
    /// The egress ifindex (the key of `tx_ports`).
    pub tx_port: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub nat: u8,
    pub pad: [u8; 3],
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub packets: u64,
    pub bytes: u64,
    /// `bpf_ktime_get_ns`: CLOCK_MONOTONIC.
    pub last_seen: u64,
}

/// Slots of `xsks` per port: a port's socket of queue q is in slot `port * MAX_QUEUES + q`
/// (`xsk_base` holds each port's first slot, by ifindex). The program passes frames of
/// higher queues to the kernel: change both together.
pub const MAX_QUEUES: u32 = 64;
/// `xsks`' size in the program: ports times [`MAX_QUEUES`].
const MAX_PORTS: usize = 16;

/// `XDP_FLAGS_SKB_MODE` (linux/if_link.h).
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// `BPF_ANY`.
const BPF_ANY: u64 = 0;

#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error("libbpf cannot open the fast path's object: {0}")]
    Open(std::io::Error),
    #[error("the kernel refused the fast path's program or maps: {0} (this needs root, or CAP_BPF and CAP_NET_ADMIN)")]
    Load(std::io::Error),
    #[error("the fast path's object has no `{0}`")]
    Missing(&'static str),
    #[error("the fast path serves at most {MAX_PORTS} ports with {MAX_QUEUES} queues each")]
    TooBig,
    #[error("interface `{interface}` cannot be used: {reason}")]
    Interface { interface: String, reason: String },
    #[error("cannot write the fast path's `{map}` map: {reason}")]
    Map {
        map: &'static str,
        reason: std::io::Error,
    },
    #[error("cannot attach the fast path to `{interface}`: {reason}")]
    Attach {
        interface: String,
        reason: std::io::Error,
    },
}

/// Opaque libbpf types.
#[repr(C)]
struct BpfObject {
    _private: [u8; 0],
}
#[repr(C)]
struct BpfProgram {
    _private: [u8; 0],
}

#[repr(C)]
struct BpfMap {
    _private: [u8; 0],
}

// libbpf 1.4 (linked into libxdp-sys): pointers come back NULL with errno set, ints as
// -errno.
extern "C" {
    fn bpf_object__open_mem(buf: *const c_void, size: usize, opts: *const c_void)
        -> *mut BpfObject;
    fn bpf_object__load(obj: *mut BpfObject) -> c_int;
    fn bpf_object__find_map_by_name(obj: *const BpfObject, name: *const c_char) -> *mut BpfMap;
    fn bpf_map__set_max_entries(map: *mut BpfMap, max_entries: u32) -> c_int;
    fn bpf_object__close(obj: *mut BpfObject);
    fn bpf_object__find_program_by_name(
        obj: *const BpfObject,
        name: *const c_char,
    ) -> *mut BpfProgram;
    fn bpf_program__fd(prog: *const BpfProgram) -> c_int;
    fn bpf_object__find_map_fd_by_name(obj: *const BpfObject, name: *const c_char) -> c_int;
    fn bpf_xdp_attach(ifindex: c_int, prog_fd: c_int, flags: u32, opts: *const c_void) -> c_int;
    fn bpf_xdp_detach(ifindex: c_int, flags: u32, opts: *const c_void) -> c_int;
    fn bpf_map_update_elem(
        fd: c_int,
        key: *const c_void,
        value: *const c_void,
        flags: u64,
    ) -> c_int;
    fn bpf_map_delete_elem(fd: c_int, key: *const c_void) -> c_int;
    fn bpf_map_lookup_elem(fd: c_int, key: *const c_void, value: *mut c_void) -> c_int;
    fn bpf_map_lookup_batch(
        fd: c_int,
        in_batch: *mut c_void,
        out_batch: *mut c_void,
        keys: *mut c_void,
        values: *mut c_void,
        count: *mut u32,
        opts: *const c_void,
    ) -> c_int;
}

fn errno(r: c_int) -> std::io::Error {
    std::io::Error::from_raw_os_error(r.checked_neg().unwrap_or(libc::EINVAL))
}

/// A port's ifindex ([`iface::ifindex`]), or why the fast path cannot use it.
fn ifindex(interface: &str) -> Result<u32, FastPathError> {
    iface::ifindex(interface).map_err(|e| FastPathError::Interface {
        interface: interface.to_string(),
        reason: e.to_string(),
    })
}

/// Removes whatever XDP program `ifindex` runs, in either mode (a fast path or a libxdp
/// program a crashed run left behind). Errors are ignored: nothing attached is fine.
pub fn detach_any(ifindex: u32) {
    for flags in [0, XDP_FLAGS_SKB_MODE] {
        // SAFETY: plain netlink requests, no pointers but a NULL opts.
        unsafe {
            bpf_xdp_detach(ifindex as c_int, flags, std::ptr::null());
        }
    }
}

/// `struct bpf_xdp_attach_opts` (libbpf 1.4).
#[repr(C)]
struct XdpAttachOpts {
    sz: usize,
    /// With it, libbpf sets `XDP_FLAGS_REPLACE`: the kernel changes the interface's program
    /// only if it is this one.
    old_prog_fd: c_int,
    /// The tail padding, zero as libbpf requires (see `iface::XdpQueryOpts`).
    tail: u32,
}

/// `NETDEV_XDP_ACT_NDO_XMIT` (linux/netdev.h): the device takes redirected frames.
const NETDEV_XDP_ACT_NDO_XMIT: u64 = 1 << 2;

/// Whether the device takes frames redirected by a native XDP program. A kernel that
/// reports no XDP features at all (before 6.3) is taken at its word that it does.
fn takes_redirects(ifindex: u32) -> bool {
    iface::xdp_features(ifindex).map_or(true, |f| f == 0 || f & NETDEV_XDP_ACT_NDO_XMIT != 0)
}

/// CLOCK_MONOTONIC, as `bpf_ktime_get_ns` reads it.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What the fast path has done, for `keepstate stats`.
#[derive(Debug, Default)]
pub struct FastPathStats {
    /// Entries in `flows` at the last reading (two per flow).
    pub entries: AtomicU64,
    /// Packets and bytes (IP lengths) XDP forwarded, as read back so far.
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// Flows installed, and offloaded flows not installed (yet) for want of a neighbour.
    pub installed: AtomicU64,
    pub waiting: AtomicU64,
    /// Map writes the kernel refused (a full map).
    pub failed: AtomicU64,
    /// Ports that take no redirected frames at the moment.
    pub egress_off: AtomicU64,
}

/// One installed direction of a flow, as the fast path remembers it beside the kernel's copy.
struct Entry {
    flow: FlowRef,
    dir: Dir,
    /// The program's counters at the last reading.
    packets: u64,
    bytes: u64,
}

/// What one entry forwarded since the last reading, for [`Engine::flow_account`].
struct Forwarded {
    flow: FlowRef,
    dir: Dir,
    packets: u64,
    bytes: u64,
    last_seen: u64,
}

/// Entries read per `BPF_MAP_LOOKUP_BATCH` call (more than any hash bucket holds, which the
/// kernel requires).
const BATCH: usize = 4096;

/// A walk of [`FastPath::sync_step`] over the map starts this long after the last one
/// started (or at once, if that one took longer): well inside the flows' 30 s timeout, so a
/// flow that forwards a packet every few seconds is read before the gc would think it idle.
pub const PASS_EVERY_NS: u64 = 20_000_000_000;
/// About how many [`FastPath::sync_step`] calls a walk is spread over (15 s of the main
/// loop's 50 ms ticks, more with the ticks' own work), sized by the last walk's count.
pub const STEPS_PER_PASS: usize = 300;

/// What a reading of the map found, acted on once the entries' lock is let go.
#[derive(Default)]
struct Reading {
    /// Entries a live flow owns.
    live: u64,
    forwarded: Vec<Forwarded>,
    /// With a neighbour's MAC changed: every live entry, to check.
    moved: Vec<(FlowKey, FlowRef, Dir)>,
    stale: Vec<FlowKey>,
}

/// [`FastPath::sync_step`]'s walk over the map.
struct Pass {
    at: Cursor,
    /// Live entries counted so far.
    live: u64,
    /// When the walk under way (or the last) started.
    started: Option<Timestamp>,
    /// Entries to read per step in this walk.
    per_step: usize,
    keys: Vec<FlowKey>,
    values: Vec<FlowValue>,
}

impl Default for Pass {
    fn default() -> Pass {
        Pass {
            at: Cursor::default(),
            live: 0,
            started: None,
            per_step: 0,
            keys: vec![FlowKey::default(); BATCH],
            values: vec![FlowValue::default(); BATCH],
        }
    }
}

/// The loaded program and its maps.
pub struct FastPath {
    obj: *mut BpfObject,
    prog_fd: c_int,
    flows_fd: c_int,
    xsks_fd: c_int,
    tx_ok_fd: c_int,
    /// Per port (as the engine numbers them).
    ifindexes: Vec<u32>,
    interfaces: Vec<String>,
    /// Where the program was attached: (ifindex, the mode's flags, the id it got there; 0:
    /// unknown).
    attached: Mutex<Vec<(u32, u32, u32)>>,
    /// What the workers installed, by key: whose entry it is, and its counters as last read
    /// (the program's are cumulative).
    entries: Mutex<HashMap<FlowKey, Entry, foldhash::fast::RandomState>>,
    /// The neighbour table's generation the entries' MACs were last checked against.
    neigh_gen: AtomicU64,
    /// The main loop's walk over the map, a batch a tick.
    pass: Mutex<Pass>,
    /// Per port: whether redirects to it are off (it would drop them).
    egress: Mutex<Vec<bool>>,
    /// Whether every port runs the program in generic mode.
    generic: std::sync::atomic::AtomicBool,
    pub stats: FastPathStats,
}

// SAFETY: the object pointer is only used by `Drop` (bpf_object__close); everything else is a
// file descriptor, which the kernel lets any thread use.
unsafe impl Send for FastPath {}
unsafe impl Sync for FastPath {}

fn name(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

impl FastPath {
    /// Loads the program and its maps for these port interfaces (in the engine's port order),
    /// whose sockets will serve up to `queues` queues each, and fills `tx_ports` and
    /// `xsk_base`; the flow map holds up to `flows` entries (one per direction of an
    /// offloaded connection). Attaches nothing yet.
    pub fn load(interfaces: &[String], queues: u32, flows: u32) -> Result<FastPath, FastPathError> {
        if interfaces.len() > MAX_PORTS || queues > MAX_QUEUES {
            return Err(FastPathError::TooBig);
        }
        let ifindexes = interfaces
            .iter()
            .map(|i| ifindex(i))
            .collect::<Result<Vec<_>, _>>()?;
        // SAFETY: OBJECT is a static ELF image; libbpf copies what it keeps.
        let obj =
            unsafe { bpf_object__open_mem(OBJECT.as_ptr().cast(), OBJECT.len(), std::ptr::null()) };
        if obj.is_null() {
            return Err(FastPathError::Open(std::io::Error::last_os_error()));
        }
        let mut fp = FastPath {
            obj,
            prog_fd: -1,
            flows_fd: -1,
            xsks_fd: -1,
            tx_ok_fd: -1,
            ifindexes,
            interfaces: interfaces.to_vec(),
            attached: Mutex::new(Vec::new()),
            entries: Mutex::new(HashMap::default()),
            neigh_gen: AtomicU64::new(0),
            pass: Mutex::new(Pass::default()),
            egress: Mutex::new(Vec::new()),
            generic: std::sync::atomic::AtomicBool::new(false),
            stats: FastPathStats::default(),
        };
        let flows_name = name("flows");
        // SAFETY: `obj` is open and not loaded yet, when a map's size may still change; the
        // name is NUL-terminated and outlives the call.
        let r = unsafe {
            let map = bpf_object__find_map_by_name(obj, flows_name.as_ptr());
            if map.is_null() {
                -libc::ENOENT
            } else {
                bpf_map__set_max_entries(map, flows.max(1024))
            }
        };
        if r < 0 {
            return Err(FastPathError::Load(errno(r)));
        }
        // SAFETY: `obj` is a live object from open_mem (closed by Drop from here on).
        let r = unsafe { bpf_object__load(obj) };
        if r < 0 {
            return Err(FastPathError::Load(errno(r)));
        }
        // SAFETY: `obj` is loaded; the names are NUL-terminated and outlive the calls.
        let prog =
            unsafe { bpf_object__find_program_by_name(obj, name("keepstate_fastpath").as_ptr()) };
        if prog.is_null() {
            return Err(FastPathError::Missing("keepstate_fastpath"));
        }
        // SAFETY: as above.
        fp.prog_fd = unsafe { bpf_program__fd(prog) };
        let map = |n: &'static str| {
            // SAFETY: as above.
            let fd = unsafe { bpf_object__find_map_fd_by_name(obj, name(n).as_ptr()) };
            if fd < 0 {
                Err(FastPathError::Missing(n))
            } else {
                Ok(fd)
            }
        };
        fp.flows_fd = map("flows")?;
        fp.xsks_fd = map("xsks")?;
        fp.tx_ok_fd = map("tx_ok")?;
        let tx_ports = map("tx_ports")?;
        let xsk_base = map("xsk_base")?;
        for (port, &i) in fp.ifindexes.iter().enumerate() {
            update(tx_ports, &i, &i).map_err(|reason| FastPathError::Map {
                map: "tx_ports",
                reason,
            })?;
            update(fp.tx_ok_fd, &i, &1u32).map_err(|reason| FastPathError::Map {
                map: "tx_ok",
                reason,
            })?;
            let base = port as u32 * MAX_QUEUES;
            update(xsk_base, &i, &base).map_err(|reason| FastPathError::Map {
                map: "xsk_base",
                reason,
            })?;
        }
        *fp.egress.lock() = vec![false; fp.interfaces.len()];
        fp.refresh_egress();
        Ok(fp)
    }

    /// Attaches the program to every port, replacing what runs there (a program a crashed
    /// run left behind included): in the driver if it takes it, else generic.
    pub fn attach(&self) -> Result<(), FastPathError> {
        let mut generic = 0;
        for (&i, interface) in self.ifindexes.iter().zip(&self.interfaces) {
            // A generic-mode program blocks a native one: remove it first.
            // SAFETY: a netlink request with a NULL opts.
            unsafe { bpf_xdp_detach(i as c_int, XDP_FLAGS_SKB_MODE, std::ptr::null()) };
            // Flags 0: no XDP_FLAGS_UPDATE_IF_NOEXIST, so a program already there is replaced.
            // SAFETY: as above; `prog_fd` is our loaded program.
            let mut r = unsafe { bpf_xdp_attach(i as c_int, self.prog_fd, 0, std::ptr::null()) };
            let mut mode = 0;
            if r < 0 {
                // The driver refused (veth: a peer MTU above a page): generic XDP takes it,
                // slower but the same program.
                // SAFETY: as above.
                r = unsafe {
                    bpf_xdp_attach(
                        i as c_int,
                        self.prog_fd,
                        XDP_FLAGS_SKB_MODE,
                        std::ptr::null(),
                    )
                };
                generic += usize::from(r == 0);
                mode = XDP_FLAGS_SKB_MODE;
            }
            if r < 0 {
                return Err(FastPathError::Attach {
                    interface: interface.clone(),
                    reason: errno(r),
                });
            }
            let id = iface::xdp_programs(i).map_or(0, |p| p.steering());
            self.attached.lock().push((i, mode, id));
        }
        self.generic
            .store(generic == self.ifindexes.len(), Ordering::Relaxed);
        self.refresh_egress();
        Ok(())
    }

    /// Removes the program from the interfaces it was attached to, where it still runs: a
    /// program another tool attached in its place stays (keepstate reported that one as
    /// bypassing the workers, [`super::Shared::watch_ports`]; it is not keepstate's to remove).
    pub fn detach(&self) {
        let ours = XdpAttachOpts {
            sz: std::mem::size_of::<XdpAttachOpts>(),
            old_prog_fd: self.prog_fd,
            tail: 0,
        };
        for (i, mode, id) in self.attached.lock().drain(..) {
            // Asked first, so that a program that is not ours is passed over in silence
            // (libbpf would print the kernel's refusal); the detach itself is conditional.
            let still_ours = id == 0 || iface::xdp_programs(i).map_or(true, |p| p.steering() == id);
            if still_ours {
                // SAFETY: a netlink request; `ours` is a libbpf opts struct of the size it
                // says, borrowed across the call.
                unsafe { bpf_xdp_detach(i as c_int, mode, (&ours as *const XdpAttachOpts).cast()) };
            }
        }
    }

    /// Puts the AF_XDP socket `fd` of `port`'s queue `queue` into `xsks`.
    pub fn add_socket(&self, port: usize, queue: u32, fd: RawFd) -> Result<(), FastPathError> {
        if queue >= MAX_QUEUES {
            return Err(FastPathError::TooBig);
        }
        let slot = port as u32 * MAX_QUEUES + queue;
        let fd = fd as u32;
        update(self.xsks_fd, &slot, &fd).map_err(|reason| FastPathError::Map {
            map: "xsks",
            reason,
        })
    }

    /// The entry key of a flow direction.
    pub fn key(&self, d: &FlowDir) -> Option<FlowKey> {
        Some(key_of(*self.ifindexes.get(d.iif)?, &d.tuple))
    }

    /// Installs both directions of `flow`; `macs` are each direction's next hop's MAC and
    /// its egress port's own. False if the map refused one (it is full).
    pub fn install(&self, flow: &FlowRef, macs: [(Mac, Mac); 2]) -> bool {
        let mut ok = true;
        for (i, dir) in [Dir::Original, Dir::Reply].into_iter().enumerate() {
            let d = &flow.dirs[i];
            let (Some(key), Some(&tx)) = (self.key(d), self.ifindexes.get(d.oif)) else {
                return false;
            };
            let value = value_of(tx, macs[i], nat_of(flow, dir).as_ref());
            // One lock over the map and the kernel's copy, so that a retire of a flow that
            // had the same key cannot remove this one's.
            let mut entries = self.entries.lock();
            if update(self.flows_fd, &key, &value).is_ok() {
                let entry = Entry {
                    flow: flow.clone(),
                    dir,
                    packets: 0,
                    bytes: 0,
                };
                entries.insert(key, entry);
            } else {
                ok = false;
            }
        }
        let counter = if ok {
            &self.stats.installed
        } else {
            &self.stats.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        ok
    }

    /// Removes both directions of `flow` (those still its own: a flow installed since with
    /// the same key keeps its entry), accounting what they forwarded since the last reading
    /// first.
    pub fn retire(&self, engine: &Engine, flow: &FlowRef, now: Timestamp) {
        self.read_flow(engine, flow, now, true);
    }

    /// What both directions of `flow` forwarded since the last reading, into the flow (the
    /// gc asks before it lets a flow expire).
    pub fn refresh(&self, engine: &Engine, flow: &FlowRef, now: Timestamp) {
        self.read_flow(engine, flow, now, false);
    }

    /// Reads both of `flow`'s own entries into it, and with `remove` removes them.
    fn read_flow(&self, engine: &Engine, flow: &FlowRef, now: Timestamp, remove: bool) {
        let mono = monotonic_ns();
        for d in &flow.dirs {
            let Some(key) = self.key(d) else {
                continue;
            };
            let forwarded = {
                let mut entries = self.entries.lock();
                let Some(e) = entries.get_mut(&key).filter(|e| Arc::ptr_eq(&e.flow, flow)) else {
                    continue;
                };
                let forwarded = lookup(self.flows_fd, &key).and_then(|v| e.read(&v));
                if remove {
                    delete(self.flows_fd, &key);
                    entries.remove(&key);
                }
                forwarded
            };
            if let Some(f) = forwarded {
                self.account(engine, f, now, mono);
            }
        }
    }

    /// Whether a neighbour's MAC changed since the entries were last checked (a [`sync`]
    /// rewrites them).
    ///
    /// [`sync`]: FastPath::sync
    pub fn neighbours_changed(&self, neighbours: &Neighbours) -> bool {
        self.neigh_gen.load(Ordering::Relaxed) != neighbours.generation()
    }

    /// Every entry's counters into its flow, entries no live flow owns (torn down, a reload
    /// removed its flowtable) removed, and, when a neighbour's MAC changed, the entries
    /// towards it rewritten (the kernel's flowtable follows the neighbour cache the same way,
    /// through `neigh_xmit`). The map is read a batch at a time, a few system calls for a
    /// million entries, but still a walk over all of them at once: for a listing, or when a
    /// neighbour moved. The main loop's regular reading is [`FastPath::sync_step`].
    pub fn sync(&self, engine: &Engine, now: Timestamp, neighbours: &Neighbours) {
        let mono = monotonic_ns();
        let generation = neighbours.generation();
        let recheck = self.neigh_gen.swap(generation, Ordering::Relaxed) != generation;
        let mut r = Reading::default();
        read_all(self.flows_fd, |keys, values| {
            self.read_into(keys, values, recheck, &mut r)
        });
        self.stats.entries.store(r.live, Ordering::Relaxed);
        self.act_on(engine, now, mono, Some(neighbours), r);
    }

    /// The next steps of a walk over the map, as [`FastPath::sync`] without the neighbours:
    /// counters into the flows, entries no live flow owns removed. A walk starts
    /// [`PASS_EVERY_NS`] after the last one started and takes about [`STEPS_PER_PASS`]
    /// calls (a batch at least each). Meant for every tick of the main loop: a million flows
    /// are read in many steps of a few milliseconds instead of one of a second or more,
    /// which on a shared core would hold up the forwarding (measured with a million UDP
    /// flows: the whole walk took about 1.3 s), and often enough that flows rarely come
    /// near their expiry unread (each such flow costs the gc two lookups).
    pub fn sync_step(&self, engine: &Engine, now: Timestamp) {
        let mut pass = self.pass.lock();
        if pass.at.0.is_none() {
            if pass
                .started
                .is_some_and(|s| now.0 < s.0.saturating_add(PASS_EVERY_NS))
            {
                return;
            }
            let last = self.stats.entries.load(Ordering::Relaxed);
            pass.started = Some(now);
            pass.live = 0;
            pass.per_step = (last as usize).div_ceil(STEPS_PER_PASS);
        }
        let mono = monotonic_ns();
        let mut r = Reading::default();
        let mut read = 0;
        let Pass {
            at,
            keys,
            values,
            per_step,
            ..
        } = &mut *pass;
        let more = loop {
            let more = read_batch(self.flows_fd, at, keys, values, &mut |k, v| {
                read += k.len();
                self.read_into(k, v, false, &mut r)
            });
            if !more || read >= *per_step {
                break more;
            }
        };
        pass.live += r.live;
        if !more {
            self.stats.entries.store(pass.live, Ordering::Relaxed);
        }
        drop(pass);
        self.act_on(engine, now, mono, None, r);
    }

    /// Matches a batch of the map's entries with what the workers installed.
    fn read_into(&self, keys: &[FlowKey], values: &[FlowValue], recheck: bool, r: &mut Reading) {
        let mut entries = self.entries.lock();
        for (key, v) in keys.iter().zip(values) {
            match entries.get_mut(key) {
                Some(e) if !e.flow.is_torn_down() => {
                    r.live += 1;
                    r.forwarded.extend(e.read(v));
                    if recheck {
                        r.moved.push((*key, e.flow.clone(), e.dir));
                    }
                }
                _ => r.stale.push(*key),
            }
        }
    }

    /// What a reading found, done with the entries' lock let go: counters into the flows,
    /// the entries that moved rewritten towards their neighbours, stale entries removed.
    fn act_on(
        &self,
        engine: &Engine,
        now: Timestamp,
        mono: u64,
        neighbours: Option<&Neighbours>,
        r: Reading,
    ) {
        for f in r.forwarded {
            self.account(engine, f, now, mono);
        }
        if let Some(neighbours) = neighbours {
            for (key, flow, dir) in r.moved {
                self.follow_neighbour(&key, &flow.dirs[dir.index()], neighbours);
            }
        }
        if r.stale.is_empty() {
            return;
        }
        let mut entries = self.entries.lock();
        for key in r.stale {
            // Unless a worker installed a live flow there since the reading.
            if entries.get(&key).is_some_and(|e| !e.flow.is_torn_down()) {
                continue;
            }
            delete(self.flows_fd, &key);
            entries.remove(&key);
        }
    }

    /// Keeps `tx_ok` to the ports that take redirected frames: a driver without
    /// `ndo_xdp_xmit` (a veth whose peer runs no XDP program, which veth reports by leaving
    /// NETDEV_XDP_ACT_NDO_XMIT out of its XDP features) would drop them, so flows leaving by
    /// such a port go to the workers until it takes them. Generic XDP on every port
    /// redirects through the stack and needs nothing of the egress port. Says what changed.
    pub fn refresh_egress(&self) {
        let generic = self.generic.load(Ordering::Relaxed);
        let mut off = self.egress.lock();
        for (port, was_off) in off.iter_mut().enumerate() {
            let (Some(&i), Some(interface)) = (self.ifindexes.get(port), self.interfaces.get(port))
            else {
                continue;
            };
            let now_off = !generic && !takes_redirects(i);
            if now_off == *was_off {
                continue;
            }
            *was_off = now_off;
            if now_off {
                delete_u32(self.tx_ok_fd, i);
                eprintln!(
                    "keepstate: warning: {interface} takes no redirected frames (a veth whose \
                     peer runs no XDP program?); offloaded flows leaving by it are forwarded by \
                     the workers until it does"
                );
            } else {
                let _ = update(self.tx_ok_fd, &i, &1u32);
                eprintln!(
                    "keepstate: {interface} takes redirected frames again: the fast path \
                     forwards to it"
                );
            }
        }
        let n = off.iter().filter(|o| **o).count() as u64;
        self.stats.egress_off.store(n, Ordering::Relaxed);
    }

    /// Rewrites the next hop's MAC of one entry if the neighbour table has another now. The
    /// counters are written back as read: packets forwarded in between are not counted.
    fn follow_neighbour(&self, key: &FlowKey, d: &FlowDir, neighbours: &Neighbours) {
        let Some(mac) = neighbours.get(d.oif, d.next_hop) else {
            return;
        };
        if let Some(mut v) = lookup(self.flows_fd, key) {
            if v.dmac != mac {
                v.dmac = mac;
                let _ = update(self.flows_fd, key, &v);
            }
        }
    }

    /// Gives a flow what its entry forwarded.
    fn account(&self, engine: &Engine, f: Forwarded, now: Timestamp, mono: u64) {
        self.stats.packets.fetch_add(f.packets, Ordering::Relaxed);
        self.stats.bytes.fetch_add(f.bytes, Ordering::Relaxed);
        // The program's clock is CLOCK_MONOTONIC; the engine's starts at its own epoch.
        let seen = Timestamp(now.0.saturating_sub(mono.saturating_sub(f.last_seen)));
        engine.flow_account(&f.flow, f.dir, f.packets, f.bytes, seen);
    }
}

impl Entry {
    /// What the entry forwarded since the last reading, given the kernel's value `v` now.
    fn read(&mut self, v: &FlowValue) -> Option<Forwarded> {
        // Counters below the last reading: the entry was installed afresh.
        let before = if v.packets < self.packets {
            (0, 0)
        } else {
            (self.packets, self.bytes)
        };
        (self.packets, self.bytes) = (v.packets, v.bytes);
        let packets = v.packets - before.0;
        (packets > 0).then(|| Forwarded {
            flow: self.flow.clone(),
            dir: self.dir,
            packets,
            bytes: v.bytes.saturating_sub(before.1),
            last_seen: v.last_seen,
        })
    }
}

impl Drop for FastPath {
    fn drop(&mut self) {
        self.detach();
        // SAFETY: the object from open_mem, closed once; its fds close with it.
        unsafe { bpf_object__close(self.obj) };
    }
}

fn update<K, V>(fd: c_int, key: &K, value: &V) -> std::io::Result<()> {
    // SAFETY: key and value are plain data of the map's sizes (checked by the layout test
    // and the kernel), borrowed across the call.
    let r = unsafe {
        bpf_map_update_elem(
            fd,
            (key as *const K).cast(),
            (value as *const V).cast(),
            BPF_ANY,
        )
    };
    if r < 0 {
        Err(errno(r))
    } else {
        Ok(())
    }
}

fn delete_u32(fd: c_int, key: u32) {
    // SAFETY: as in `update`.
    unsafe { bpf_map_delete_elem(fd, (&key as *const u32).cast()) };
}

fn delete(fd: c_int, key: &FlowKey) {
    // SAFETY: as in `update`.
    unsafe { bpf_map_delete_elem(fd, (key as *const FlowKey).cast()) };
}

fn lookup(fd: c_int, key: &FlowKey) -> Option<FlowValue> {
    let mut v = FlowValue::default();
    // SAFETY: as in `update`; the kernel writes one value of the map's size into `v`.
    let r = unsafe {
        bpf_map_lookup_elem(
            fd,
            (key as *const FlowKey).cast(),
            (&mut v as *mut FlowValue).cast(),
        )
    };
    (r == 0).then_some(v)
}

/// Where a reading of the flow map stands: a bucket number the kernel hands back, or the
/// start.
#[derive(Clone, Copy, Debug, Default)]
struct Cursor(Option<u64>);

/// Reads the next batch of entries of the flow map `fd` from `at` into `each`, and moves
/// `at` on. True if the map has more after them; at its end, or on an error, `at` is back at
/// the start.
fn read_batch(
    fd: c_int,
    at: &mut Cursor,
    keys: &mut [FlowKey],
    values: &mut [FlowValue],
    each: &mut impl FnMut(&[FlowKey], &[FlowValue]),
) -> bool {
    let max = keys.len().min(values.len());
    let mut count = max as u32;
    let mut from = at.0.unwrap_or(0);
    let mut next = 0u64;
    let in_batch: *mut c_void = match at.0 {
        None => std::ptr::null_mut(),
        Some(_) => (&mut from as *mut u64).cast(),
    };
    // SAFETY: `keys` and `values` hold at least `count` elements of the map's key and value
    // sizes (checked by the layout test); the tokens are 8 bytes, more than the 4 the kernel
    // writes; opts NULL means the defaults.
    let r = unsafe {
        bpf_map_lookup_batch(
            fd,
            in_batch,
            (&mut next as *mut u64).cast(),
            keys.as_mut_ptr().cast(),
            values.as_mut_ptr().cast(),
            &mut count,
            std::ptr::null(),
        )
    };
    let n = (count as usize).min(max);
    if r == 0 || r == -libc::ENOENT {
        each(&keys[..n], &values[..n]);
    }
    if r == 0 {
        *at = Cursor(Some(next));
        true
    } else {
        *at = Cursor(None);
        false
    }
}

/// Reads every entry of the flow map `fd`, a batch at a time, into `each`. An error (other
/// than the end) ends the reading early; the next one starts over.
fn read_all(fd: c_int, mut each: impl FnMut(&[FlowKey], &[FlowValue])) {
    let mut keys = vec![FlowKey::default(); BATCH];
    let mut values = vec![FlowValue::default(); BATCH];
    let mut at = Cursor::default();
    while read_batch(fd, &mut at, &mut keys, &mut values, &mut each) {}
}

/// The key of a tuple arriving on `ifindex`.
pub fn key_of(ifindex: u32, t: &Tuple) -> FlowKey {
    FlowKey {
        ifindex,
        l3: if t.l3 == L3::V4 { 4 } else { 6 },
        proto: t.proto,
        pad: 0,
        src: t.src.0,
        dst: t.dst.0,
        sport: t.src_id.to_be(),
        dport: t.dst_id.to_be(),
    }
}

/// The value of a direction leaving by `tx_port` with `(next hop MAC, our MAC)` and NAT `rw`.
pub fn value_of(tx_port: u32, (dmac, smac): (Mac, Mac), rw: Option<&Rewrite>) -> FlowValue {
    let mut v = FlowValue {
        tx_port,
        dmac,
        smac,
        ..FlowValue::default()
    };
    let Some(rw) = rw else { return v };
    let addr = |a: std::net::IpAddr| crate::conntrack::tuple::Addr::from_ip(a).0;
    if let Some(a) = rw.src {
        v.nat |= nat::SRC;
        v.src = addr(a);
    }
    if let Some(a) = rw.dst {
        v.nat |= nat::DST;
        v.dst = addr(a);
    }
    if let Some(p) = rw.sport {
        v.nat |= nat::SPORT;
        v.sport = p.to_be();
    }
    if let Some(p) = rw.dport {
        v.nat |= nat::DPORT;
        v.dport = p.to_be();
    }
    v
}

/// The NAT rewrite of `dir`, as the engine's flowtable path takes it.
fn nat_of(flow: &FlowRef, dir: Dir) -> Option<Rewrite> {
    let conn = &flow.conn;
    if conn.status() & (status::SRC_NAT | status::DST_NAT) == 0 {
        return None;
    }
    conn.nat().map(|b| *b.rewrite[dir.index()].0.rewrite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_programs() {
        // The verifier's `ks=44 vs=80` for the `flows` map.
        assert_eq!(std::mem::size_of::<FlowKey>(), 44);
        assert_eq!(std::mem::size_of::<FlowValue>(), 80);
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        // libbpf 1.4's `struct bpf_xdp_attach_opts`, with its `size_t :0` tail.
        assert_eq!(std::mem::size_of::<XdpAttachOpts>(), 16);
    }

    #[test]
    fn keys_and_values_carry_network_order() {
        use std::net::{IpAddr, Ipv4Addr};
        let t = Tuple {
            src: crate::conntrack::tuple::Addr::from_v4(Ipv4Addr::new(192, 168, 1, 10)),
            dst: crate::conntrack::tuple::Addr::from_v4(Ipv4Addr::new(203, 0, 113, 7)),
            src_id: 40000,
            dst_id: 80,
            proto: 6,
            l3: L3::V4,
        };
        let k = key_of(7, &t);
        assert_eq!((k.ifindex, k.l3, k.proto), (7, 4, 6));
        assert_eq!(&k.src[..4], &[192, 168, 1, 10]);
        assert_eq!(k.dport.to_ne_bytes(), [0, 80]);
        let rw = Rewrite {
            src: Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1))),
            sport: Some(0x1234),
            ..Rewrite::default()
        };
        let v = value_of(3, ([1; 6], [2; 6]), Some(&rw));
        assert_eq!(v.nat, nat::SRC | nat::SPORT);
        assert_eq!(&v.src[..4], &[198, 51, 100, 1]);
        assert_eq!(v.sport.to_ne_bytes(), [0x12, 0x34]);
        assert_eq!((v.tx_port, v.dmac, v.smac), (3, [1; 6], [2; 6]));
    }
}
