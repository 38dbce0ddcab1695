//! Offline replay: runs every frame of a capture through the sans-IO [`Engine`], with the
//! capture's timestamps as the clock, and says what happened as the Linux tools would
//! (`conntrack -E` lines, the final `conntrack -L` table) plus a per-packet trace.
//!
//! Owns three things, kept apart so the per-packet loop is testable without files:
//!
//! ```text
//!   CaptureReader (pcap or pcapng bytes -> CapturedFrame: time, interface name, bytes)
//!        -> Replay::frame (ingress port, clock, GC, engine, text)  -- no I/O at all
//!        -> CaptureWriter (frames that leave -> pcap)
//! ```
//!
//! How a frame finds its ingress port, first rule that applies:
//! 1. [`Ingress::Fixed`] (`--ingress PORT`): every frame arrived on that port.
//! 2. pcapng: the interface name of the frame's Interface Description Block (`if_name`),
//!    matched against the port names, then against the ports' `interface` in the config.
//! 3. pcap with a configuration: the port the router would send the *source* address out
//!    of (its connected network, else its route): a reverse-path lookup, so hosts behind a
//!    default route arrive on the uplink.
//! 4. pcap with `--rules` alone (ports `lan` and `wan`, no addresses): the first frame's
//!    source address is on `lan`; after that an address seen as a source keeps its side,
//!    and a frame from an unseen address arrives on the side opposite its destination's
//!    (on `lan` if both are unseen). So a capture should start with a packet from the
//!    inside, as most do (the first SYN, query or ping); otherwise use `--ingress` or a
//!    pcapng with interface names.
//!
//! Must not hold policy: verdicts come from the engine, text from [`crate::conntrack::show`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::time::Duration;

use pcap_file::pcap::{PcapHeader, PcapPacket, PcapReader, PcapWriter};
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
use pcap_file::pcapng::{Block, PcapNgReader};
use pcap_file::{DataLink, TsResolution};

use crate::config::Config;
use crate::conntrack::show::{self, ShowOpts};
use crate::conntrack::{ConnRef, Timestamp, EV_DESTROY};
use crate::engine::{DropReason, Engine, Outcome, Verdict, Worker};
use crate::packet::{self, tcp_flags, Frame, L4};
use crate::rules::ir::{ct_state, Reject};

/// A capture could not be read or written. The replay stops at the first such error; the
/// frames before it have been replayed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot read the capture: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a pcap or pcapng file (magic number {0:#010x})")]
    UnknownFormat(u32),
    #[error("the capture is damaged or truncated: {0}")]
    Damaged(pcap_file::PcapError),
    #[error("cannot write the output capture: {0}")]
    Write(pcap_file::PcapError),
}

/// One frame as captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedFrame {
    /// Capture time, nanoseconds since the Unix epoch.
    pub ts: Timestamp,
    /// pcapng: the capturing interface's `if_name`; pcap: none.
    pub interface: Option<String>,
    /// The link type is Ethernet (the engine reads Ethernet frames only).
    pub ethernet: bool,
    /// The captured bytes (possibly cut short by the snap length).
    pub data: Vec<u8>,
}

/// Reads pcap (micro- or nanosecond) and pcapng, telling them apart by the magic number.
pub enum CaptureReader<R: Read> {
    Pcap(PcapReader<std::io::Chain<std::io::Cursor<[u8; 4]>, R>>),
    PcapNg(PcapNgReader<std::io::Chain<std::io::Cursor<[u8; 4]>, R>>),
}

/// The pcapng Section Header Block type, also the first four bytes of every pcapng file.
const PCAPNG_MAGIC: u32 = 0x0A0D_0D0A;

impl<R: Read> CaptureReader<R> {
    pub fn new(mut r: R) -> Result<CaptureReader<R>, CaptureError> {
        let mut magic = [0u8; 4];
        r.read_exact(&mut magic)?;
        let m = u32::from_le_bytes(magic);
        let again = std::io::Cursor::new(magic).chain(r);
        match m {
            PCAPNG_MAGIC => Ok(CaptureReader::PcapNg(
                PcapNgReader::new(again).map_err(CaptureError::Damaged)?,
            )),
            // Microsecond and nanosecond pcap, either byte order.
            0xA1B2_C3D4 | 0xD4C3_B2A1 | 0xA1B2_3C4D | 0x4D3C_B2A1 => Ok(CaptureReader::Pcap(
                PcapReader::new(again).map_err(CaptureError::Damaged)?,
            )),
            _ => Err(CaptureError::UnknownFormat(m)),
        }
    }

    /// The next frame; `None` at the end of the capture.
    pub fn next_frame(&mut self) -> Option<Result<CapturedFrame, CaptureError>> {
        match self {
            CaptureReader::Pcap(r) => {
                let ethernet = r.header().datalink == DataLink::ETHERNET;
                let p = match r.next_packet()? {
                    Ok(p) => p,
                    Err(e) => return Some(Err(CaptureError::Damaged(e))),
                };
                Some(Ok(CapturedFrame {
                    ts: Timestamp(duration_nanos(p.timestamp)),
                    interface: None,
                    ethernet,
                    data: p.data.into_owned(),
                }))
            }
            CaptureReader::PcapNg(r) => loop {
                let block = match r.next_block()? {
                    Ok(b) => b.into_owned(),
                    Err(e) => return Some(Err(CaptureError::Damaged(e))),
                };
                let (iface, raw_ts, data) = match block {
                    Block::EnhancedPacket(p) => (p.interface_id, Some(p.timestamp), p.data),
                    // Simple Packet Blocks have no timestamp and belong to interface 0.
                    Block::SimplePacket(p) => (0, None, p.data),
                    Block::Packet(p) => (
                        u32::from(p.interface_id),
                        Some(Duration::from_nanos(p.timestamp)),
                        p.data,
                    ),
                    _ => continue,
                };
                let idb = r.interfaces().get(iface as usize);
                let name = idb.and_then(|i| {
                    i.options.iter().find_map(|o| match o {
                        InterfaceDescriptionOption::IfName(n) => Some(n.to_string()),
                        _ => None,
                    })
                });
                let tsresol = idb
                    .and_then(|i| {
                        i.options.iter().find_map(|o| match o {
                            InterfaceDescriptionOption::IfTsResol(t) => Some(*t),
                            _ => None,
                        })
                    })
                    .unwrap_or(6);
                let ts = raw_ts.map_or(0, |d| scale_ts(duration_nanos(d), tsresol));
                return Some(Ok(CapturedFrame {
                    ts: Timestamp(ts),
                    interface: name,
                    ethernet: idb.is_some_and(|i| i.linktype == DataLink::ETHERNET),
                    data: data.into_owned(),
                }));
            },
        }
    }
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// pcap-file 2.0 hands an EPB's raw 64-bit timestamp over as if it were nanoseconds; the
/// unit is really the interface's `if_tsresol` (pcapng spec: high bit clear = 10^-n s, set =
/// 2^-n s; default 6, microseconds).
fn scale_ts(raw: u64, tsresol: u8) -> u64 {
    let n = u32::from(tsresol & 0x7f);
    if tsresol & 0x80 != 0 {
        // 2^-n seconds per unit.
        ((u128::from(raw) * 1_000_000_000) >> n.min(127)) as u64
    } else if n <= 9 {
        raw.saturating_mul(10u64.pow(9 - n))
    } else {
        raw / 10u64.saturating_pow(n - 9)
    }
}

/// Writes the frames that leave as a nanosecond Ethernet pcap (`--out`).
pub struct CaptureWriter<W: Write>(PcapWriter<W>);

impl<W: Write> CaptureWriter<W> {
    pub fn new(w: W) -> Result<CaptureWriter<W>, CaptureError> {
        let header = PcapHeader {
            datalink: DataLink::ETHERNET,
            ts_resolution: TsResolution::NanoSecond,
            ..Default::default()
        };
        PcapWriter::with_header(w, header)
            .map(CaptureWriter)
            .map_err(CaptureError::Write)
    }

    pub fn write(&mut self, ts: Timestamp, frame: &[u8]) -> Result<(), CaptureError> {
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        let p = PcapPacket::new(Duration::from_nanos(ts.0), len, frame);
        self.0
            .write_packet(&p)
            .map(|_| ())
            .map_err(CaptureError::Write)
    }

    pub fn into_inner(self) -> W {
        self.0.into_writer()
    }
}

/// How frames find their ingress port (see the module documentation).
#[derive(Clone, Debug)]
pub enum Ingress {
    /// Every frame arrived on this port (an index into the engine's ports).
    Fixed(usize),
    /// Interface names (pcapng), else the configuration's routes, else MAC learning.
    Auto,
}

/// What the replay prints besides the final table.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReplayOpts {
    /// A line per frame: number, time, summary, verdict, ct state, rules (file:line).
    pub trace: bool,
    /// `conntrack -E` lines as events happen.
    pub events: bool,
    /// The lines `log` statements write, in the kernel's format (as `dmesg` shows them).
    pub log: bool,
    /// Listing options (`nf_conntrack_acct` and friends).
    pub show: ShowOpts,
}

/// Verdict counts over the whole replay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub frames: u64,
    pub forwarded: u64,
    pub local: u64,
    pub dropped_by_rules: u64,
    pub rejected: u64,
    /// Frames that did not parse (counted, dropped; never a panic).
    pub malformed: u64,
    /// Frames whose link type is not Ethernet.
    pub unsupported_link: u64,
    pub not_ip: u64,
    pub no_route: u64,
    pub table_full: u64,
    pub insert_failed: u64,
    /// New connections NAT could not translate (no free port, no address to masquerade to).
    pub nat_failed: u64,
    /// Frames whose TTL or hop limit ran out.
    pub ttl_exceeded: u64,
    /// Frames a connection's helper refused.
    pub helper_dropped: u64,
    /// Frames whose ingress port could not be decided (unknown interface name, no route
    /// back to the source).
    pub unknown_ingress: u64,
    /// Fragments held until their datagram was whole.
    pub held: u64,
    /// Fragments dropped with their datagram (overlap, bad length, memory bound, timeout).
    pub fragments_dropped: u64,
}

/// The result of one frame.
#[derive(Clone, Debug)]
pub struct Step {
    /// 1-based frame number in the capture.
    pub number: u64,
    pub ingress: Option<usize>,
    /// None for frames the engine never saw (unknown ingress, not Ethernet).
    pub outcome: Option<Outcome>,
    /// The port the frame leaves by, if it does: write it to `--out`. When the frame completed
    /// a fragmented datagram, the original fragments in `outcome.released` leave instead.
    pub leaves: Option<usize>,
    /// Text to print, in order: DESTROY events of connections that expired before this
    /// frame, the trace line, this frame's events.
    pub lines: Vec<String>,
}

/// The replay loop's state: engine, clock, ingress learning, counts. No I/O.
pub struct Replay {
    engine: Engine,
    config: Option<Config>,
    ingress: Ingress,
    opts: ReplayOpts,
    /// Address -> port, for `--rules` mode on a pcap.
    sides: HashMap<IpAddr, usize>,
    /// Rule id -> `file:line`.
    rule_locs: Vec<String>,
    counts: Counts,
    first: Option<Timestamp>,
    now: Timestamp,
    last_gc: Option<Timestamp>,
    /// One worker for the whole capture, as one CPU would be.
    worker: Worker,
}

/// A GC pass runs when the capture clock has moved this far since the last one: the kernel's
/// gc_worker also runs every second or so when entries expire (`GC_SCAN_INTERVAL_MIN`), so
/// DESTROY events come at most about a second after the timeout, as with the kernel.
const GC_INTERVAL: u64 = 1_000_000_000;

impl Replay {
    /// `config` is the router's configuration (`--config`), none in `--rules` pairs mode.
    pub fn new(
        engine: Engine,
        config: Option<Config>,
        ingress: Ingress,
        opts: ReplayOpts,
    ) -> Replay {
        let rule_locs = engine
            .compiled()
            .ruleset
            .rules()
            .map(|r| format!("{}:{}", r.loc.file, r.loc.line))
            .collect();
        Replay {
            engine,
            config,
            ingress,
            opts,
            sides: HashMap::new(),
            rule_locs,
            counts: Counts::default(),
            first: None,
            now: Timestamp(0),
            last_gc: None,
            worker: Worker::new(0),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// The replay clock: the latest capture time seen.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// Replays one captured frame.
    pub fn frame(&mut self, f: &CapturedFrame) -> Step {
        self.counts.frames += 1;
        let number = self.counts.frames;
        // Merged captures can be slightly out of order; the tracker's clock must not go
        // backwards (timeouts are deadlines), so the clock is the latest time seen.
        self.now = self.now.max(f.ts);
        let first = *self.first.get_or_insert(f.ts);
        let mut lines = Vec::new();
        self.expire(&mut lines);

        let mut step = Step {
            number,
            ingress: None,
            outcome: None,
            leaves: None,
            lines: Vec::new(),
        };
        let rel = f.ts.0.saturating_sub(first.0);
        let when = format!("{}.{:06}", rel / 1_000_000_000, rel % 1_000_000_000 / 1000);
        if !f.ethernet {
            self.counts.unsupported_link += 1;
            if self.opts.trace {
                lines.push(format!(
                    "{number} {when} ? not an Ethernet frame -> skipped"
                ));
            }
            step.lines = lines;
            return step;
        }
        let Some(port) = self.ingress_of(f) else {
            self.counts.unknown_ingress += 1;
            if self.opts.trace {
                let name = f.interface.as_deref().unwrap_or("?");
                lines.push(format!(
                    "{number} {when} {name} {} -> skipped (no port for this frame's ingress)",
                    summary(&f.data)
                ));
            }
            step.lines = lines;
            return step;
        };
        step.ingress = Some(port);

        let out = self
            .engine
            .process_traced(&f.data, port, self.now, &mut self.worker);
        self.count(&out.verdict);
        if let Verdict::Forward { port, .. } = out.verdict {
            step.leaves = Some(port);
        }
        // Connections removed while this frame was processed: an expired entry met by the
        // lookup goes before the frame's own events, one the frame killed (RST) after.
        let destroyed = self.engine.tracker().take_destroyed();
        let (own, earlier): (Vec<ConnRef>, Vec<ConnRef>) = destroyed
            .into_iter()
            .partition(|c| out.events.iter().any(|(_, e)| ConnRef::ptr_eq(c, e)));
        if self.opts.events {
            for c in &earlier {
                lines.push(show::event_line(c, EV_DESTROY, self.now, self.opts.show));
            }
        }
        if self.opts.trace {
            lines.push(self.trace_line(number, &when, port, &f.data, &out));
        }
        if self.opts.log {
            lines.extend(out.logs.iter().map(|l| l.trim_end().to_string()));
        }
        if self.opts.events {
            for (ev, c) in &out.events {
                lines.push(show::event_line(c, *ev, self.now, self.opts.show));
            }
            for c in &own {
                lines.push(show::event_line(c, EV_DESTROY, self.now, self.opts.show));
            }
        }
        step.outcome = Some(out);
        step.lines = lines;
        step
    }

    /// Runs a full GC pass if the clock moved [`GC_INTERVAL`] since the last one, and turns
    /// what it reaped into DESTROY lines.
    fn expire(&mut self, lines: &mut Vec<String>) {
        let due = self
            .last_gc
            .is_none_or(|t| self.now.0.saturating_sub(t.0) >= GC_INTERVAL);
        if due {
            self.gc(lines);
        }
    }

    fn gc(&mut self, lines: &mut Vec<String>) {
        self.last_gc = Some(self.now);
        let buckets = self.engine.tracker().table().buckets();
        self.engine.housekeeping(self.now, buckets);
        let mut gone = self.engine.tracker().take_destroyed();
        // The GC meets entries in hash order; report them in the order they expired, so
        // the output does not depend on the hash.
        gone.sort_by_key(|c| (c.expires(), c.start()));
        if self.opts.events {
            for c in gone {
                lines.push(show::event_line(&c, EV_DESTROY, self.now, self.opts.show));
            }
        }
    }

    /// Ends the replay at the last frame's time: reaps what has expired by then (its
    /// DESTROY lines are returned) and produces the report.
    pub fn finish(&mut self) -> Report {
        let mut events = Vec::new();
        self.gc(&mut events);
        let mut conns = self.engine.tracker().conns();
        // The kernel lists in hash order; a replay lists in the order connections started,
        // so the output is stable.
        conns.sort_by_key(|c| (c.start(), show::list_line(c, self.now, self.opts.show)));
        let listing = conns
            .iter()
            .map(|c| show::list_line(c, self.now, self.opts.show))
            .collect();
        Report {
            events,
            listing,
            list_summary: show::list_summary(conns.len()).trim_end().to_string(),
            counts: self.counts,
        }
    }

    fn count(&mut self, v: &Verdict) {
        let c = &mut self.counts;
        match v {
            Verdict::Forward { .. } => c.forwarded += 1,
            Verdict::Local => c.local += 1,
            Verdict::Reject(_) => c.rejected += 1,
            Verdict::NotIp => c.not_ip += 1,
            Verdict::Held => c.held += 1,
            Verdict::Drop(r) => match r {
                DropReason::Fragment => c.fragments_dropped += 1,
                DropReason::Malformed => c.malformed += 1,
                DropReason::Rules => c.dropped_by_rules += 1,
                DropReason::TableFull => c.table_full += 1,
                DropReason::InsertFailed => c.insert_failed += 1,
                DropReason::NatFailed | DropReason::NatNoAddress => c.nat_failed += 1,
                DropReason::TtlExceeded => c.ttl_exceeded += 1,
                DropReason::Helper => c.helper_dropped += 1,
                DropReason::NoRoute => c.no_route += 1,
                DropReason::UnknownPort => c.unknown_ingress += 1,
            },
        }
    }

    /// The ingress port of a frame (see the module documentation for the order).
    fn ingress_of(&mut self, f: &CapturedFrame) -> Option<usize> {
        if let Ingress::Fixed(p) = self.ingress {
            return Some(p);
        }
        if let Some(name) = &f.interface {
            return self.engine.port_index(name).or_else(|| {
                let cfg = self.config.as_ref()?;
                let p = cfg.ports.iter().find(|p| &p.interface == name)?;
                self.engine.port_index(&p.name)
            });
        }
        if let Some(cfg) = &self.config {
            let src = match packet::parse_ethernet(&f.data) {
                Frame::Ip(p) => p.ip.src(),
                // Not IP or malformed: any port will do, the engine only counts it.
                _ => return Some(0),
            };
            let (port, _) = cfg.route(src)?;
            return self.engine.port_index(&port.name);
        }
        self.learn_side(&f.data)
    }

    /// `--rules` mode on a pcap: which side of the box a frame's addresses are on. The
    /// first frame's source is on `lan`; an address seen as a source keeps its side; a frame
    /// from an unseen address arrives opposite its destination's side (`lan` if that is
    /// unknown too). MAC addresses would not do: in a capture merged from both sides of a
    /// router, every frame is to or from one of the router's own MACs.
    fn learn_side(&mut self, frame: &[u8]) -> Option<usize> {
        let (src, dst) = match packet::parse_ethernet(frame) {
            Frame::Ip(p) => (p.ip.src(), p.ip.dst()),
            _ => return Some(0),
        };
        let side = match (self.sides.get(&src), self.sides.get(&dst)) {
            (Some(&s), _) => s,
            (None, Some(&d)) => d ^ 1,
            (None, None) => 0,
        };
        self.sides.entry(src).or_insert(side);
        Some(side)
    }

    fn trace_line(
        &self,
        number: u64,
        when: &str,
        port: usize,
        frame: &[u8],
        out: &Outcome,
    ) -> String {
        let ports = self.engine.ports();
        let name = |i: usize| ports.get(i).map_or("?", |p| p.name.as_str());
        let verdict = match &out.verdict {
            Verdict::Forward { port, .. } => format!("forward {}", name(*port)),
            Verdict::Local => "local".to_string(),
            Verdict::NotIp => "not ip".to_string(),
            Verdict::Held => "held (fragment)".to_string(),
            Verdict::Reject(r) => format!("reject{}", reject_words(r)),
            Verdict::Drop(r) => match r {
                DropReason::Fragment => "drop (fragment)".to_string(),
                DropReason::Malformed => {
                    let why = match packet::parse_ethernet(frame) {
                        Frame::Invalid(e) => format!(" ({e})"),
                        _ => String::new(),
                    };
                    format!("drop malformed{why}")
                }
                DropReason::Rules => "drop".to_string(),
                DropReason::TableFull => "drop (table full)".to_string(),
                DropReason::InsertFailed => "drop (insert failed)".to_string(),
                DropReason::NatFailed => "drop (nat: no free tuple)".to_string(),
                DropReason::NatNoAddress => "drop (nat: no address on the port)".to_string(),
                DropReason::TtlExceeded => "drop (ttl exceeded)".to_string(),
                DropReason::Helper => "drop (helper)".to_string(),
                DropReason::NoRoute => "drop (no route)".to_string(),
                DropReason::UnknownPort => "drop (unknown port)".to_string(),
            },
        };
        let mut s = format!(
            "{number} {when} {} {} -> {verdict}",
            name(port),
            summary(frame)
        );
        if let Some(ct) = out.ct_state {
            let _ = write!(s, " ct {}", ct_state_name(ct));
        }
        if !out.rules.is_empty() {
            s.push_str(" rules");
            for r in &out.rules {
                let loc = self.rule_locs.get(*r as usize).map_or("?", String::as_str);
                let _ = write!(s, " {loc}");
            }
        }
        s
    }
}

/// What [`Replay::finish`] hands back.
#[derive(Clone, Debug)]
pub struct Report {
    /// DESTROY lines of connections that expired by the last frame (when events are on).
    pub events: Vec<String>,
    /// `conntrack -L` lines, one per connection.
    pub listing: Vec<String>,
    /// `conntrack -L`'s summary line (the tool prints it to stderr).
    pub list_summary: String,
    pub counts: Counts,
}

impl Counts {
    /// One line: every verdict class that occurred.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} frames: {} forwarded, {} local, {} dropped by rules, {} rejected",
            self.frames, self.forwarded, self.local, self.dropped_by_rules, self.rejected
        );
        for (n, what) in [
            (self.malformed, "malformed"),
            (self.not_ip, "not IP"),
            (self.no_route, "no route"),
            (self.table_full, "dropped (table full)"),
            (self.insert_failed, "dropped (insert failed)"),
            (self.nat_failed, "dropped (nat failed)"),
            (self.ttl_exceeded, "dropped (ttl exceeded)"),
            (self.helper_dropped, "dropped by a helper"),
            (self.unknown_ingress, "with no ingress port"),
            (self.unsupported_link, "not Ethernet"),
        ] {
            if n > 0 {
                let _ = write!(s, ", {n} {what}");
            }
        }
        s
    }
}

/// `ct state` bits as nft names them.
pub fn ct_state_name(bits: u32) -> &'static str {
    match u128::from(bits) {
        ct_state::NEW => "new",
        ct_state::ESTABLISHED => "established",
        ct_state::RELATED => "related",
        ct_state::UNTRACKED => "untracked",
        _ => "invalid",
    }
}

fn reject_words(r: &Reject) -> String {
    match r {
        Reject::TcpReset => " with tcp reset".to_string(),
        Reject::Icmp(c) => format!(" with icmp {c}"),
        Reject::Icmp6(c) => format!(" with icmpv6 {c}"),
        _ => String::new(),
    }
}

/// A tcpdump-like one-line description of a frame.
pub fn summary(frame: &[u8]) -> String {
    let p = match packet::parse_ethernet(frame) {
        Frame::Ip(p) => p,
        Frame::NonIp { ethertype, .. } => return format!("ethertype {ethertype:#06x}"),
        Frame::Invalid(_) => return format!("malformed frame of {} bytes", frame.len()),
    };
    let (src, dst) = (p.ip.src(), p.ip.dst());
    let ep = |a: IpAddr, port: u16| match a {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    };
    match &p.l4 {
        L4::Tcp(t) => format!(
            "tcp {} > {} [{}] seq {} ack {} len {}",
            ep(src, t.sport),
            ep(dst, t.dport),
            flag_letters(t.flags),
            t.seq,
            t.ack,
            t.payload_len
        ),
        L4::Udp(u) => format!(
            "udp {} > {} len {}",
            ep(src, u.sport),
            ep(dst, u.dport),
            u.length.saturating_sub(8)
        ),
        L4::Icmp(i) | L4::Icmp6(i) => {
            let v = if matches!(p.l4, L4::Icmp6(_)) {
                "icmpv6"
            } else {
                "icmp"
            };
            format!(
                "{v} {src} > {dst} type {} code {} id {} seq {}",
                i.icmp_type, i.code, i.id, i.seq
            )
        }
        L4::Other { protocol } => format!("proto {protocol} {src} > {dst}"),
        L4::Fragment { protocol } => format!("proto {protocol} {src} > {dst} (fragment)"),
        L4::Malformed {
            protocol, reason, ..
        } => format!("proto {protocol} {src} > {dst} (malformed: {reason})"),
    }
}

/// TCP flags as tcpdump writes them (`S`, `S.`, `F.`, `R`, `P.` ...).
fn flag_letters(f: u8) -> String {
    let mut s = String::new();
    for (bit, c) in [
        (tcp_flags::SYN, 'S'),
        (tcp_flags::FIN, 'F'),
        (tcp_flags::RST, 'R'),
        (tcp_flags::PSH, 'P'),
        (tcp_flags::URG, 'U'),
        (tcp_flags::ECE, 'E'),
        (tcp_flags::CWR, 'W'),
        (tcp_flags::ACK, '.'),
    ] {
        if f & bit != 0 {
            s.push(c);
        }
    }
    if s.is_empty() {
        s.push_str("none");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcapng_timestamp_units_follow_if_tsresol() {
        assert_eq!(scale_ts(1_500_000, 6), 1_500_000_000);
        assert_eq!(scale_ts(7, 9), 7);
        assert_eq!(scale_ts(1, 0), 1_000_000_000);
        assert_eq!(scale_ts(1 << 10, 0x80 | 10), 1_000_000_000);
        assert_eq!(scale_ts(5_000, 12), 5);
    }

    #[test]
    fn tcp_flags_read_like_tcpdump() {
        assert_eq!(flag_letters(tcp_flags::SYN | tcp_flags::ACK), "S.");
        assert_eq!(flag_letters(tcp_flags::FIN | tcp_flags::ACK), "F.");
        assert_eq!(flag_letters(0), "none");
    }

    #[test]
    fn garbage_is_not_a_capture() {
        let r = CaptureReader::new(&b"hello world"[..]);
        assert!(matches!(r, Err(CaptureError::UnknownFormat(_))));
        let r = CaptureReader::new(&b"he"[..]);
        assert!(matches!(r, Err(CaptureError::Io(_))));
    }
}
