//! Memory in use under connection churn through the sans-IO engine, with a fake clock: the
//! soak of `keepstate lab soak` without the allocator's and the kernel's noise. A global
//! allocator counts the bytes the process holds; the home router (masquerade) sees ten
//! simulated minutes of new TCP connections (handshake, a request, an answer, FIN both ways:
//! TIME_WAIT), UDP exchanges and unanswered SYNs, with the main loop's housekeeping every
//! 50 ms. The table is full after 120 s (its entries live at most that long). The tracker's
//! indexes are allocated for its `max` when it is created, so what an entry adds is its
//! connection and its GC slot. Over the last third of the run the bytes in use must stay
//! flat within 1 % of what the entries hold (about 5.6 MB here; 3.5 bytes a connection):
//! whatever a connection allocates is given back when it expires. Twenty runs grew by +10
//! to +21 kB (0.2 to 0.4 %), slowing, not traced further: lists that keep the largest
//! capacity they ever needed, such as the GC buckets', would do that.
//!
//! Before the indexes were sized at creation, they grew with the table and kept resizing
//! under churn at a steady population: about 1 run in 15 failed here with one step of
//! 360 kB, a dashmap shard doubling at a random moment.
//!
//! Its own test binary, because the allocator counts everything the process does.

mod common {
    pub mod capture;
    pub mod router;
}

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use keepstate::conntrack::Timestamp;
use keepstate::engine::{Engine, Verdict, Worker};

use common::capture::{tcp, udp};
use common::router::home_router;

/// The system allocator, counting the bytes in use.
struct Counting;

static IN_USE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call goes to the system allocator as it came; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        IN_USE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc(l)
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        IN_USE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc_zeroed(l)
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        IN_USE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        IN_USE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const LAN: usize = 0;
const WAN: usize = 1;
const CLIENT: [u8; 4] = [192, 168, 1, 10];
const SERVER: [u8; 4] = [203, 0, 113, 7];
const BOX_WAN: [u8; 4] = [198, 51, 100, 1];

/// New TCP connections and UDP exchanges per simulated second, and unanswered SYNs.
const RATE: u32 = 80;
const SYNS: u32 = 10;
const MINUTES: u64 = 10;

fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(1_000_000 + ms)
}

/// Sends `frame` in on `port` and requires it forwarded; the frame as it left.
fn through(e: &Engine, w: &mut Worker, mut frame: Vec<u8>, port: usize, ms: u64) -> Vec<u8> {
    let v = e.process_with(&mut frame, port, t(ms), w).0;
    assert!(matches!(v, Verdict::Forward { .. }), "{v:?} at {ms} ms");
    frame
}

/// One TCP connection from the LAN client's port `cp`, opened and closed at `ms`.
fn connection(e: &Engine, w: &mut Worker, cp: u16, ms: u64) {
    let out = through(
        e,
        w,
        tcp("lan", CLIENT, SERVER, cp, 80, "S", 100, 0, b""),
        LAN,
        ms,
    );
    // Masquerade may move the port: the answers come back to the one that left.
    let mp = u16::from_be_bytes([out[34], out[35]]);
    let s = |flags, seq, ack, p: &[u8]| tcp("wan", SERVER, BOX_WAN, 80, mp, flags, seq, ack, p);
    let c = |flags, seq, ack, p: &[u8]| tcp("lan", CLIENT, SERVER, cp, 80, flags, seq, ack, p);
    through(e, w, s("SA", 900, 101, b""), WAN, ms);
    through(e, w, c("A", 101, 901, b""), LAN, ms);
    through(e, w, c("PA", 101, 901, &[b'q'; 20]), LAN, ms);
    through(e, w, s("PA", 901, 121, &[b'a'; 100]), WAN, ms);
    through(e, w, c("FA", 121, 1001, b""), LAN, ms);
    through(e, w, s("FA", 1001, 122, b""), WAN, ms);
    through(e, w, c("A", 122, 1002, b""), LAN, ms);
}

/// One UDP exchange from the LAN client's port `cp` at `ms`.
fn exchange(e: &Engine, w: &mut Worker, cp: u16, ms: u64) {
    let out = through(e, w, udp("lan", CLIENT, SERVER, cp, 53, b"query"), LAN, ms);
    let mp = u16::from_be_bytes([out[34], out[35]]);
    through(
        e,
        w,
        udp("wan", SERVER, BOX_WAN, 53, mp, b"answer"),
        WAN,
        ms,
    );
}

#[test]
fn memory_in_use_is_flat_under_connection_churn() {
    let e = home_router(65_536);
    let mut w = Worker::new(0);
    // As `keepstate run`: the whole table every 40 ticks of 50 ms.
    let buckets = e.tracker().table().buckets().div_ceil(40).max(1);
    let mut n: u32 = 0;
    let mut samples = Vec::new();
    // The engine as created: its tracker's indexes are already sized for `max`.
    let empty = IN_USE.load(Ordering::Relaxed);
    for s in 0..MINUTES * 60 {
        for tick in 0..20u64 {
            let ms = s * 1000 + tick * 50;
            for _ in 0..RATE / 20 {
                // Ports cycle over 40,000: none is reused within 120 s.
                let cp = 20000 + (n % 40000) as u16;
                connection(&e, &mut w, cp, ms);
                exchange(&e, &mut w, cp, ms);
                n += 1;
            }
            if tick % (20 / SYNS as u64) == 0 {
                let syn = tcp(
                    "lan",
                    CLIENT,
                    SERVER,
                    1024 + (n % 1000) as u16,
                    81,
                    "S",
                    1,
                    0,
                    b"",
                );
                through(&e, &mut w, syn, LAN, ms);
            }
            e.housekeeping(t(ms), buckets);
            e.tracker().take_destroyed();
        }
        if s % 30 == 29 {
            let bytes = IN_USE.load(Ordering::Relaxed);
            eprintln!(
                "{:>3} s: {:>6} entries, {:>9} bytes in use",
                s + 1,
                e.tracker().count(),
                bytes
            );
            samples.push((s + 1, e.tracker().count(), bytes));
        }
    }
    let half = samples
        .iter()
        .position(|(s, ..)| *s >= MINUTES * 40)
        .unwrap();
    let (first, last) = (samples[half], samples[samples.len() - 1]);
    // What an entry adds to the empty engine: its connection, its GC slot, its share of the
    // lists' capacities.
    let per_entry = (first.2 - empty) as f64 / first.1 as f64;
    // Any growth beyond what a few more entries at the end hold.
    let explained = (last.1 as f64 - first.1 as f64).max(0.0) * per_entry;
    let growth = (last.2 - first.2) as f64 - explained;
    eprintln!("empty engine: {empty} bytes in use; {per_entry:.0} bytes an entry after that");
    // Connections and exchanges over the last third: RATE a second each.
    let window = (last.0 - first.0) as f64 * f64::from(RATE);
    let held = (first.2 - empty) as f64;
    eprintln!(
        "{n} connections and exchanges; over the last third: {} -> {} bytes in use, \
         {} -> {} entries: {growth:+.0} bytes ({:+.3} % of what the entries hold, \
         {:.2} bytes a connection)",
        first.2,
        last.2,
        first.1,
        last.1,
        growth * 100.0 / held,
        growth / window
    );
    assert!(
        growth <= held / 100.0,
        "{growth} bytes more in use over the last third, beyond the table's size"
    );
}
