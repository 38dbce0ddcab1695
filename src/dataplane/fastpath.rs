//! The XDP fast path: the object (src/dataplane/bpf/fastpath.bpf.c, compiled by build.rs),
//! the layouts of its maps, and its life in the kernel: loaded with libbpf, attached to every
//! port's interface in place of libxdp's default program, its flow maps kept in step with
//! the engine's flowtables.
//!
//! Who writes what: the workers install both directions of a flow when the engine offloads
//! it (they know the neighbours' MACs) and remove them when a packet tears it down; the main
//! loop removes the flows the flowtable gc or a reload tore down. The program writes each
//! direction's last packet's time, and for a flowtable with `counter` counts its packets and
//! bytes (locked adds, which a flow that is not counted is spared), in a slot of the
//! `counters` array,
//! which this process maps into its memory: the flowtable gc reads a flow's slots when the
//! flow nears its expiry ([`FastPath::refresh`], into [`Engine::flow_account`]), as the
//! kernel's gc reads `flow->timeout`, with no system call and no walk over the map; a
//! listing reads them all ([`FastPath::sync`]). The program adds to the counters and this
//! process takes what they hold (an atomic exchange with zero), so every packet counts once.
//! IPv4 flows live in a table of our own, also mapped into this process and written without
//! a system call ([`flows4`]); IPv6 flows in a kernel hash, written with `bpf(2)`.
//!
//! Owns the BPF object, its maps and the XDP attachments; decides nothing about flows (that
//! is the engine's flowtable, [`crate::conntrack::flowtable`]).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::flows4::{self, Conf, Entry4, Flows4};
use super::iface;
use super::neigh::Neighbours;
use super::Mac;
use crate::conntrack::flowtable::{FlowDir, FlowRef, NO_SLOT};
use crate::conntrack::tuple::{Tuple, L3};
use crate::conntrack::{status, Dir, Timestamp};
use crate::engine::Engine;
use crate::packet::rewrite::Rewrite;

/// The compiled BPF object (ELF).
pub static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fastpath.bpf.o"));

/// A direction's key as the engine knows it: the ingress ifindex and the tuple as the
/// packet arrives. The kernel's keys are [`Key4`] and [`Key6`], made from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub ifindex: u32,
    /// 4 or 6.
    pub l3: u8,
    pub proto: u8,
    /// IPv4 in the first four bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order.
    pub sport: u16,
    pub dport: u16,
}

/// `flow_head.flags` bits.
pub mod flags {
    /// Count packets and bytes in `counters` (the flowtable's `counter`); without it the
    /// program writes only the last-seen time there.
    pub const COUNT: u8 = 0x1;
}

/// `flow_head.nat` bits.
pub mod nat {
    pub const SRC: u8 = 0x1;
    pub const DST: u8 = 0x2;
    pub const SPORT: u8 = 0x4;
    pub const DPORT: u8 = 0x8;
}

/// Where a direction leaves and how it is rewritten, as the engine knows it; the kernel's
/// values are [`Value4`] and [`Value6`], made from it and a slot in `counters`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// The egress ifindex (the key of `tx_ports`).
    pub tx_port: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub nat: u8,
    /// [`flags`] bits.
    pub flags: u8,
    /// IPv4 in the first four bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order.
    pub sport: u16,
    pub dport: u16,
}

/// `struct flow_key4`: 20 bytes, so that an IPv4 entry of `flows4` (with its value and a
/// sequence number, [`flows4::Entry4`]) is one cache line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Key4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub ifindex: u32,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// `struct flow_key6`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Key6 {
    pub ifindex: u32,
    pub proto: u8,
    pub pad: [u8; 3],
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

/// `struct flow_head`: what both families' values start with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Head {
    pub tx_port: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub nat: u8,
    pub flags: u8,
    pub sport: u16,
    pub dport: u16,
    pub pad2: u16,
    /// The direction's slot in `counters`.
    pub slot: u32,
}

/// `struct flow_value4`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Value4 {
    pub h: Head,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

/// `struct flow_value6`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Value6 {
    pub h: Head,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// `struct flow_counters`: a direction's, which the program adds to atomically; read by the
/// main loop from the mmapped `counters` map. The two directions of a flow take slots 2k and
/// 2k + 1, one cache line.
#[repr(C)]
struct Counters {
    packets: AtomicU64,
    bytes: AtomicU64,
    /// `bpf_ktime_get_coarse_ns`: CLOCK_MONOTONIC as of the last tick.
    last_seen: AtomicU64,
    pad: u64,
}

/// `struct totals`: what one CPU forwarded, all flows together.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Totals {
    packets: u64,
    bytes: u64,
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
    fn libbpf_num_possible_cpus() -> c_int;
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

fn page_size() -> usize {
    // SAFETY: a plain query.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// CLOCK_MONOTONIC, which `bpf_ktime_get_coarse_ns` reads to the last tick.
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
    /// Entries in the flow maps (two per flow).
    pub entries: AtomicU64,
    /// Flows installed, and offloaded flows not installed (yet) for want of a neighbour.
    pub installed: AtomicU64,
    pub waiting: AtomicU64,
    /// Map writes the kernel refused (a full map), and IPv4 entries a growth of the table
    /// could not place (whose flows' packets then go to the workers).
    pub failed: AtomicU64,
    /// Ports that take no redirected frames at the moment.
    pub egress_off: AtomicU64,
}

/// One installed direction of a flow, as the fast path remembers it beside the kernel's copy.
struct Entry {
    flow: FlowRef,
    dir: Dir,
    /// Its slot in `counters`.
    slot: u32,
}

/// What one entry forwarded since the last reading, for [`Engine::flow_account`].
struct Forwarded {
    flow: FlowRef,
    dir: Dir,
    packets: u64,
    bytes: u64,
    last_seen: u64,
}

/// What a reading of every entry found, acted on once the entries' lock is let go.
#[derive(Default)]
struct Reading {
    forwarded: Vec<Forwarded>,
    /// With a neighbour's MAC changed: every live entry, to check.
    moved: Vec<(FlowKey, FlowRef, Dir)>,
    stale: Vec<FlowKey>,
}

/// The slots of `counters`, handed out in pairs (a flow's two directions, one cache line).
/// A pair given back waits two ticks of the main loop ([`FastPath::age_slots`]) before it
/// is handed out again: a program that found the entry just before it was removed may still
/// add to its counters.
#[derive(Default)]
struct Slots {
    /// Pairs handed out so far (from 0 up).
    next: u32,
    /// The most pairs there are.
    max: u32,
    /// Per pair handed out: how many installed directions use it.
    users: Vec<u8>,
    free: Vec<u32>,
    /// Given back since the last tick, and in the tick before.
    fresh: Vec<u32>,
    cooling: Vec<u32>,
}

impl Slots {
    fn take(&mut self) -> Option<u32> {
        if let Some(pair) = self.free.pop() {
            return Some(pair);
        }
        (self.next < self.max).then(|| {
            self.next += 1;
            self.users.push(0);
            self.next - 1
        })
    }

    /// One direction less uses `slot`'s pair; the pair goes back when none does.
    fn put(&mut self, slot: u32) {
        let pair = slot / 2;
        if let Some(u) = self.users.get_mut(pair as usize) {
            *u = u.saturating_sub(1);
            if *u == 0 {
                self.fresh.push(pair);
            }
        }
    }
}

/// A BPF_F_MMAPABLE array map in this process's memory: unmapped on drop.
struct Mapping {
    base: *mut c_void,
    /// Bytes mapped.
    size: usize,
}

impl Mapping {
    const NONE: Mapping = Mapping {
        base: std::ptr::null_mut(),
        size: 0,
    };

    /// Maps the first `bytes` of the array map `fd` (shared with the kernel); the mapping
    /// keeps the map alive.
    fn new(map: &'static str, fd: c_int, bytes: usize) -> Result<Mapping, FastPathError> {
        let size = bytes.next_multiple_of(page_size());
        // SAFETY: a fresh shared mapping of the map's memory, owned by the returned value.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(FastPathError::Map {
                map,
                reason: std::io::Error::last_os_error(),
            });
        }
        Ok(Mapping { base, size })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.size > 0 {
            // SAFETY: the mapping made in `Mapping::new`, unmapped once.
            unsafe { libc::munmap(self.base, self.size) };
        }
    }
}

/// The mmapped `counters` map.
struct CounterMap {
    mem: Mapping,
    /// Slots.
    len: usize,
}

impl CounterMap {
    fn get(&self, slot: u32) -> Option<&Counters> {
        let base: *const Counters = self.mem.base.cast();
        // SAFETY: `mem` maps `len` slots for as long as `self` lives; the program and this
        // process only ever access them atomically (or `pad`, never).
        ((slot as usize) < self.len).then(|| unsafe { &*base.add(slot as usize) })
    }
}

/// Slots of a growing IPv4 table that a step of the main loop copies ([`FastPath::tidy`]):
/// about a millisecond under the table's lock (README, "Performance").
pub const TIDY_SLOTS: u32 = 16_384;
/// Steps a tick of the main loop takes, the lock released between them: 4 ms of the main
/// thread 20 times a second while a table grows, so that a table of 4M slots moves to 8M
/// within 64 ticks (3.2 s), sooner while flows arrive (each insert copies too), and a
/// worker installing a flow meanwhile waits for one step at most.
pub const TIDY_STEPS: usize = 4;

/// The loaded program and its maps.
pub struct FastPath {
    obj: *mut BpfObject,
    prog_fd: c_int,
    /// The IPv4 flows: our own table in the mmapped `flows4`, written without system calls.
    flows4: Mutex<Flows4>,
    flows4_mem: Mapping,
    /// The table's shape for the program (`flows4_conf`), which [`Flows4`] updates as it
    /// grows.
    flows4_conf: Mapping,
    flows6_fd: c_int,
    xsks_fd: c_int,
    tx_ok_fd: c_int,
    /// The program's per-CPU totals ([`FastPath::forwarded`]).
    totals_fd: c_int,
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
    /// The directions' counters, shared with the program.
    counters: CounterMap,
    slots: Mutex<Slots>,
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
            // Replaced below by the table over the mapped `flows4` before `fp` is handed out.
            flows4: Mutex::new(Flows4::NONE),
            flows4_mem: Mapping::NONE,
            flows4_conf: Mapping::NONE,
            flows6_fd: -1,
            xsks_fd: -1,
            tx_ok_fd: -1,
            totals_fd: -1,
            ifindexes,
            interfaces: interfaces.to_vec(),
            attached: Mutex::new(Vec::new()),
            entries: Mutex::new(HashMap::default()),
            neigh_gen: AtomicU64::new(0),
            counters: CounterMap {
                mem: Mapping::NONE,
                len: 0,
            },
            slots: Mutex::new(Slots::default()),
            egress: Mutex::new(Vec::new()),
            generic: std::sync::atomic::AtomicBool::new(false),
            stats: FastPathStats::default(),
        };
        // An even number of slots: they go in pairs.
        let flows = flows.max(1024) & !1;
        let slots4 = flows4::capacity_for(flows4::slots_for(flows));
        for (map, size) in [("flows4", slots4), ("flows6", flows), ("counters", flows)] {
            let map_name = name(map);
            // SAFETY: `obj` is open and not loaded yet, when a map's size may still change;
            // the name is NUL-terminated and outlives the call.
            let r = unsafe {
                let map = bpf_object__find_map_by_name(obj, map_name.as_ptr());
                if map.is_null() {
                    -libc::ENOENT
                } else {
                    bpf_map__set_max_entries(map, size)
                }
            };
            if r < 0 {
                return Err(FastPathError::Load(errno(r)));
            }
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
        fp.flows4_mem = Mapping::new(
            "flows4",
            map("flows4")?,
            slots4 as usize * std::mem::size_of::<Entry4>(),
        )?;
        fp.flows4_conf = Mapping::new(
            "flows4_conf",
            map("flows4_conf")?,
            std::mem::size_of::<Conf>(),
        )?;
        // SAFETY: the mappings hold `slots4` entries, zeroed by the kernel, and the Conf the
        // program reads, for as long as `fp` lives; only `fp.flows4` writes them.
        *fp.flows4.lock() = unsafe {
            Flows4::new(
                fp.flows4_mem.base.cast(),
                slots4,
                random_seed(),
                fp.flows4_conf.base.cast(),
            )
        };
        fp.flows6_fd = map("flows6")?;
        fp.counters = CounterMap {
            mem: Mapping::new(
                "counters",
                map("counters")?,
                flows as usize * std::mem::size_of::<Counters>(),
            )?,
            len: flows as usize,
        };
        fp.slots.lock().max = flows / 2;
        fp.xsks_fd = map("xsks")?;
        fp.tx_ok_fd = map("tx_ok")?;
        fp.totals_fd = map("totals")?;
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

    /// Installs both directions of `flow`, or neither; `macs` are each direction's next
    /// hop's MAC and its egress port's own. False if the maps refused one (they are full):
    /// the flow stays with the workers, and its next refresh asks again
    /// ([`Flow::wants_mirror`](crate::conntrack::flowtable::Flow::wants_mirror)). A flow
    /// installed already is left as it is.
    pub fn install(&self, flow: &FlowRef, macs: [(Mac, Mac); 2]) -> bool {
        let mut ok = true;
        let mut installed = Vec::with_capacity(2);
        {
            // One lock over the maps and the kernel's copy, so that a retire of a flow that
            // had the same key cannot remove this one's.
            let mut entries = self.entries.lock();
            // Another worker's retry may have come first.
            if flow.slot.load(Ordering::Relaxed) != NO_SLOT {
                return true;
            }
            let Some(pair) = self.slots.lock().take() else {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                return false;
            };
            for (i, dir) in [Dir::Original, Dir::Reply].into_iter().enumerate() {
                let d = &flow.dirs[i];
                let (Some(key), Some(&tx)) = (self.key(d), self.ifindexes.get(d.oif)) else {
                    ok = false;
                    continue;
                };
                let slot = pair * 2 + i as u32;
                if let Some(c) = self.counters.get(slot) {
                    c.packets.store(0, Ordering::Relaxed);
                    c.bytes.store(0, Ordering::Relaxed);
                    c.last_seen.store(0, Ordering::Relaxed);
                }
                let mut value = value_of(tx, macs[i], nat_of(flow, dir).as_ref());
                if flow.counter {
                    value.flags |= flags::COUNT;
                }
                if self.update_flow(&key, &value, slot).is_err() {
                    ok = false;
                    continue;
                }
                let entry = Entry {
                    flow: flow.clone(),
                    dir,
                    slot,
                };
                let mut slots = self.slots.lock();
                slots.users[pair as usize] += 1;
                if let Some(old) = entries.insert(key, entry) {
                    slots.put(old.slot);
                }
                installed.push(key);
            }
            if installed.is_empty() {
                self.slots.lock().fresh.push(pair);
            } else if ok {
                flow.slot.store(pair, Ordering::Relaxed);
            }
            // Torn down meanwhile (its retire may have come before this install): out again,
            // or its entries would stay until a listing's reading. Half installed: out too,
            // so that a retry installs both (the pair goes back with its last user).
            if flow.is_torn_down() || !ok {
                for key in installed.drain(..) {
                    self.remove(&mut entries, &key);
                }
            }
            self.stats
                .entries
                .store(entries.len() as u64, Ordering::Relaxed);
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
        let mono = monotonic_ns();
        let mut forwarded = Vec::new();
        {
            let mut entries = self.entries.lock();
            for d in &flow.dirs {
                let Some(key) = self.key(d) else {
                    continue;
                };
                let Some(e) = entries.get(&key).filter(|e| Arc::ptr_eq(&e.flow, flow)) else {
                    continue;
                };
                forwarded.extend(self.counters.get(e.slot).and_then(|c| read(c, flow, e.dir)));
                self.remove(&mut entries, &key);
            }
            self.stats
                .entries
                .store(entries.len() as u64, Ordering::Relaxed);
        }
        for f in forwarded {
            self.account(engine, f, now, mono);
        }
    }

    /// What both directions of a live `flow` forwarded since the last reading, into the
    /// flow (the gc asks before it lets a flow expire): its slots, found from the flow
    /// itself ([`Flow::slot`](crate::conntrack::flowtable::Flow::slot)), read from memory,
    /// with no lock, lookup or system call. A flow torn down meanwhile, whose slots may have
    /// gone back, reads slots that wait two ticks before anyone else gets them.
    pub fn refresh(&self, engine: &Engine, flow: &FlowRef, now: Timestamp) {
        let pair = flow.slot.load(Ordering::Relaxed);
        if pair == NO_SLOT {
            return;
        }
        let mono = monotonic_ns();
        for dir in [Dir::Original, Dir::Reply] {
            let slot = pair * 2 + dir.index() as u32;
            if let Some(f) = self.counters.get(slot).and_then(|c| read(c, flow, dir)) {
                self.account(engine, f, now, mono);
            }
        }
    }

    /// Removes the entry `key` from the kernel's map and ours; its slot goes back.
    fn remove(
        &self,
        entries: &mut HashMap<FlowKey, Entry, foldhash::fast::RandomState>,
        key: &FlowKey,
    ) {
        self.delete_flow(key);
        if let Some(e) = entries.remove(key) {
            self.slots.lock().put(e.slot);
        }
    }

    /// A tick of the main loop: the slots given back two ticks ago may be handed out again.
    pub fn age_slots(&self) {
        let mut slots = self.slots.lock();
        let Slots {
            free,
            fresh,
            cooling,
            ..
        } = &mut *slots;
        free.append(cooling);
        std::mem::swap(cooling, fresh);
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
    /// through `neigh_xmit`). A walk over every entry under the entries lock (counters from
    /// memory, no system call but for a rewrite), when a neighbour moved. The main loop's
    /// regular reading is the flowtable gc's, one flow at a time as it nears its expiry, and
    /// a listing's is flow by flow too ([`FastPath::refresh`]).
    pub fn sync(&self, engine: &Engine, now: Timestamp, neighbours: &Neighbours) {
        let mono = monotonic_ns();
        let generation = neighbours.generation();
        let recheck = self.neigh_gen.swap(generation, Ordering::Relaxed) != generation;
        let mut r = Reading::default();
        {
            let entries = self.entries.lock();
            for (key, e) in entries.iter() {
                if e.flow.is_torn_down() {
                    r.stale.push(*key);
                    continue;
                }
                r.forwarded.extend(
                    self.counters
                        .get(e.slot)
                        .and_then(|c| read(c, &e.flow, e.dir)),
                );
                if recheck {
                    r.moved.push((*key, e.flow.clone(), e.dir));
                }
            }
        }
        for f in r.forwarded {
            self.account(engine, f, now, mono);
        }
        for (key, flow, dir) in r.moved {
            self.follow_neighbour(&key, &flow, dir, neighbours);
        }
        let mut entries = self.entries.lock();
        for key in r.stale {
            // Unless a worker installed a live flow there since the reading.
            if entries.get(&key).is_some_and(|e| !e.flow.is_torn_down()) {
                continue;
            }
            self.remove(&mut entries, &key);
        }
        self.stats
            .entries
            .store(entries.len() as u64, Ordering::Relaxed);
    }

    /// The IPv4 table's size, its largest size, and whether it is growing.
    pub fn slots4(&self) -> (u32, u32, bool) {
        let t = self.flows4.lock();
        let (size, max) = t.slots();
        (size, max, t.growing())
    }

    /// A tick of the main loop: up to [`TIDY_STEPS`] steps of the IPv4 table's growth, if
    /// one is under way ([`Flows4::step`]), each of at most [`TIDY_SLOTS`] slots under the
    /// table's lock, so that a worker installing a flow meanwhile waits for no more than
    /// one. Then the flows with an entry that a growth could not place (counted as refused)
    /// leave the fast path whole, their counters read, so that their next refresh offers
    /// them again ([`FastPath::install`]) rather than leaving them with the workers for
    /// good.
    pub fn tidy(&self, engine: &Engine, now: Timestamp) {
        let mut lost = Vec::new();
        for _ in 0..TIDY_STEPS {
            let mut t = self.flows4.lock();
            t.step(TIDY_SLOTS);
            lost.append(&mut t.take_lost());
            if !t.busy() {
                break;
            }
        }
        if lost.is_empty() {
            return;
        }
        self.stats
            .failed
            .fetch_add(lost.len() as u64, Ordering::Relaxed);
        let flows: Vec<FlowRef> = {
            let entries = self.entries.lock();
            lost.iter()
                .filter_map(|k| entries.get(&flow_key4(k)).map(|e| e.flow.clone()))
                .collect()
        };
        for flow in flows {
            self.retire(engine, &flow, now);
            flow.slot.store(NO_SLOT, Ordering::Relaxed);
        }
    }

    /// The packets and bytes (IP lengths) XDP forwarded so far, all flows together: the sum
    /// of the program's per-CPU totals, read with one system call and current to the
    /// packet (the flows' own counters reach the connections later, as the flowtable gc
    /// or a listing reads them: [`FastPath::refresh`]).
    pub fn forwarded(&self) -> (u64, u64) {
        // SAFETY: libbpf reads the number from sysfs; no arguments.
        let cpus = unsafe { libbpf_num_possible_cpus() }.max(1) as usize;
        // A per-CPU map's lookup writes one value per possible CPU, each rounded up to 8
        // bytes: `Totals` is 16.
        let mut per_cpu = vec![Totals::default(); cpus];
        // SAFETY: the buffer holds `cpus` values of the map's value size, as the kernel
        // writes for a per-CPU array; the key is a u32 of the map's key size.
        let r = unsafe {
            bpf_map_lookup_elem(
                self.totals_fd,
                (&0u32 as *const u32).cast(),
                per_cpu.as_mut_ptr().cast(),
            )
        };
        if r != 0 {
            return (0, 0);
        }
        per_cpu
            .iter()
            .fold((0, 0), |(p, b), t| (p + t.packets, b + t.bytes))
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

    /// Rewrites the next hop's MAC of `flow`'s entry `key` if the neighbour table has another
    /// now, unless the entry went or another flow's took its place since the reading (a
    /// rewrite would bring it back).
    fn follow_neighbour(&self, key: &FlowKey, flow: &FlowRef, dir: Dir, neighbours: &Neighbours) {
        let d = &flow.dirs[dir.index()];
        let Some(mac) = neighbours.get(d.oif, d.next_hop) else {
            return;
        };
        let entries = self.entries.lock();
        if !entries.get(key).is_some_and(|e| Arc::ptr_eq(&e.flow, flow)) {
            return;
        }
        if let Some((mut v, slot)) = self.lookup_flow(key) {
            if v.dmac != mac {
                v.dmac = mac;
                let _ = self.update_flow(key, &v, slot);
            }
        }
    }

    /// Writes the kernel's entry of `key` (in the map of its family): `v`, counting on
    /// `slot`.
    fn update_flow(&self, key: &FlowKey, v: &FlowValue, slot: u32) -> std::io::Result<()> {
        let h = Head {
            tx_port: v.tx_port,
            dmac: v.dmac,
            smac: v.smac,
            nat: v.nat,
            flags: v.flags,
            sport: v.sport,
            dport: v.dport,
            slot,
            ..Head::default()
        };
        if key.l3 == 4 {
            let v4 = Value4 {
                h,
                src: v.src[..4].try_into().unwrap_or_default(),
                dst: v.dst[..4].try_into().unwrap_or_default(),
            };
            // Keys a growth's step lost here wait in the table for the next tidy, which
            // needs the entries' lock that the caller holds.
            self.flows4
                .lock()
                .insert(&key4(key), &v4)
                .map_err(std::io::Error::other)
        } else {
            let v6 = Value6 {
                h,
                src: v.src,
                dst: v.dst,
            };
            update(self.flows6_fd, &key6(key), &v6)
        }
    }

    fn delete_flow(&self, key: &FlowKey) {
        if key.l3 == 4 {
            self.flows4.lock().remove(&key4(key));
        } else {
            delete(self.flows6_fd, &key6(key));
        }
    }

    /// The kernel's entry of `key`, and its slot.
    fn lookup_flow(&self, key: &FlowKey) -> Option<(FlowValue, u32)> {
        let (h, src, dst) = if key.l3 == 4 {
            let v = self.flows4.lock().get(&key4(key))?;
            let mut src = [0; 16];
            let mut dst = [0; 16];
            src[..4].copy_from_slice(&v.src);
            dst[..4].copy_from_slice(&v.dst);
            (v.h, src, dst)
        } else {
            let v: Value6 = lookup(self.flows6_fd, &key6(key))?;
            (v.h, v.src, v.dst)
        };
        let v = FlowValue {
            tx_port: h.tx_port,
            dmac: h.dmac,
            smac: h.smac,
            nat: h.nat,
            flags: h.flags,
            src,
            dst,
            sport: h.sport,
            dport: h.dport,
        };
        Some((v, h.slot))
    }

    /// Gives a flow what its entry forwarded.
    fn account(&self, engine: &Engine, f: Forwarded, now: Timestamp, mono: u64) {
        // The program's clock is CLOCK_MONOTONIC; the engine's starts at its own epoch.
        let seen = Timestamp(now.0.saturating_sub(mono.saturating_sub(f.last_seen)));
        engine.flow_account(&f.flow, f.dir, f.packets, f.bytes, seen);
    }
}

/// What a direction forwarded since its counters `c` were last read, taken from them: the
/// last-seen time (zero once taken: nothing forwarded since) and, for a flow that counts,
/// the packets and bytes (the program adds atomically, this takes atomically, so every packet
/// counts once). The program writes the time after its counts, so counts taken before their
/// time are taken with the next time.
fn read(c: &Counters, flow: &FlowRef, dir: Dir) -> Option<Forwarded> {
    if c.last_seen.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let last_seen = c.last_seen.swap(0, Ordering::Relaxed);
    let packets = c.packets.swap(0, Ordering::Relaxed);
    let bytes = c.bytes.swap(0, Ordering::Relaxed);
    Some(Forwarded {
        flow: flow.clone(),
        dir,
        packets,
        bytes,
        last_seen,
    })
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

fn delete<K>(fd: c_int, key: &K) {
    // SAFETY: as in `update`.
    unsafe { bpf_map_delete_elem(fd, (key as *const K).cast()) };
}

fn lookup<K, V: Default>(fd: c_int, key: &K) -> Option<V> {
    let mut v = V::default();
    // SAFETY: as in `update`; the kernel writes one value of the map's size into `v`.
    let r = unsafe { bpf_map_lookup_elem(fd, (key as *const K).cast(), (&mut v as *mut V).cast()) };
    (r == 0).then_some(v)
}

/// A seed for `flows4`'s hash: std's per-process random hash keys (from the OS's random
/// source) hashing nothing in particular.
fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0u64)
}

/// The kernel's IPv4 key of `k`.
fn key4(k: &FlowKey) -> Key4 {
    Key4 {
        src: k.src[..4].try_into().unwrap_or_default(),
        dst: k.dst[..4].try_into().unwrap_or_default(),
        sport: k.sport,
        dport: k.dport,
        ifindex: k.ifindex,
        proto: k.proto,
        pad: [0; 3],
    }
}

/// The entry key of the IPv4 key `k` (what [`key4`] undoes).
fn flow_key4(k: &Key4) -> FlowKey {
    let (mut src, mut dst) = ([0; 16], [0; 16]);
    src[..4].copy_from_slice(&k.src);
    dst[..4].copy_from_slice(&k.dst);
    FlowKey {
        ifindex: k.ifindex,
        l3: 4,
        proto: k.proto,
        src,
        dst,
        sport: k.sport,
        dport: k.dport,
    }
}

/// The kernel's IPv6 key of `k`.
fn key6(k: &FlowKey) -> Key6 {
    Key6 {
        ifindex: k.ifindex,
        proto: k.proto,
        pad: [0; 3],
        src: k.src,
        dst: k.dst,
        sport: k.sport,
        dport: k.dport,
    }
}

/// The key of a tuple arriving on `ifindex`.
pub fn key_of(ifindex: u32, t: &Tuple) -> FlowKey {
    FlowKey {
        ifindex,
        l3: if t.l3 == L3::V4 { 4 } else { 6 },
        proto: t.proto,
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
        use std::mem::size_of;
        // The verifier's key and value sizes of `flows4`, `flows6` and `counters`.
        assert_eq!((size_of::<Key4>(), size_of::<Value4>()), (20, 36));
        assert_eq!((size_of::<Key6>(), size_of::<Value6>()), (44, 60));
        assert_eq!(size_of::<Counters>(), 32);
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        // libbpf 1.4's `struct bpf_xdp_attach_opts`, with its `size_t :0` tail.
        assert_eq!(std::mem::size_of::<XdpAttachOpts>(), 16);
    }

    #[test]
    fn slots_go_in_pairs_and_wait_two_ticks_before_reuse() {
        let mut s = Slots {
            max: 2,
            ..Slots::default()
        };
        let (a, b) = (s.take(), s.take());
        assert_eq!((a, b, s.take()), (Some(0), Some(1), None));
        s.users[0] = 2;
        s.put(0);
        assert!(s.fresh.is_empty(), "one direction still uses the pair");
        s.put(1);
        assert_eq!(s.fresh, vec![0]);
        let age = |s: &mut Slots| {
            s.free.append(&mut s.cooling);
            std::mem::swap(&mut s.cooling, &mut s.fresh);
        };
        age(&mut s);
        assert_eq!(s.take(), None, "a tick is not enough");
        age(&mut s);
        assert_eq!(s.take(), Some(0));
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
        // A lost IPv4 key finds its entry again.
        assert_eq!(flow_key4(&key4(&k)), k);
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
