//! The IPv4 flow table's growth (src/dataplane/flows4.rs): how long a step holds the table's
//! lock, at the growth a box heading for a million flows goes through last but one (2M
//! slots to 4M, with 1.4M entries). A main-loop step copies `TIDY_SLOTS` slots; an insert
//! or a removal `STEP` with its own work; once the new table is in use, the same steps
//! empty the old one (8 slots for one of the budget). For comparison, the same growth in one step,
//! as the table grew before (the whole growth under the lock, in the worker whose insert
//! needed room).
//!
//! This file measures; it asserts nothing. Run: `cargo bench --bench flows4`.

use std::time::{Duration, Instant};

use criterion::Criterion;
use keepstate::dataplane::fastpath::{Key4, Value4, TIDY_SLOTS};
use keepstate::dataplane::flows4::{capacity_for, Entry4, Flows4, STEP};

/// The old table's size.
const FROM: u32 = 2 << 20;

fn key(n: u32) -> Key4 {
    Key4 {
        src: (0x0a00_0000 | n >> 8).to_be_bytes(),
        dst: [203, 0, 113, 7],
        sport: (n as u16).wrapping_mul(7919).to_be(),
        dport: 443u16.to_be(),
        ifindex: 2,
        proto: 6,
        pad: [0; 3],
    }
}

/// A table whose growth from `FROM` slots to twice that has just begun, over its memory,
/// and the next key to insert.
struct Growing {
    t: Flows4,
    next: u32,
    _mem: Vec<Entry4>,
}

fn growing() -> Growing {
    let capacity = capacity_for(FROM * 2);
    let mut mem: Vec<Entry4> = (0..capacity).map(|_| Entry4::default()).collect();
    // SAFETY: `capacity` zeroed entries that live as long as the table (moved together).
    let mut t = unsafe { Flows4::new(mem.as_mut_ptr(), capacity, 42, std::ptr::null_mut()) };
    let mut next = 0;
    while !(t.growing() && t.slots().0 == FROM) {
        let _ = t.insert(&key(next), &Value4::default());
        next += 1;
        if t.growing() && t.slots().0 < FROM {
            t.step(u32::MAX);
        }
    }
    Growing { t, next, _mem: mem }
}

/// A table whose growth from `FROM` slots has just ended: the old table is still to be
/// emptied.
fn grown() -> Growing {
    let mut g = growing();
    g.t.step(u32::MAX);
    g
}

/// Runs `f` `iters` times on a table in the state `ready` says, timing only `f`; a new one
/// from `make` whenever it is not.
fn timed(
    state: &mut Option<Growing>,
    iters: u64,
    ready: fn(&Flows4) -> bool,
    make: fn() -> Growing,
    mut f: impl FnMut(&mut Growing),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        if !state.as_ref().is_some_and(|g| ready(&g.t)) {
            *state = None;
            *state = Some(make());
        }
        let g = state.as_mut().unwrap();
        let t0 = Instant::now();
        f(g);
        total += t0.elapsed();
    }
    total
}

/// The old table, once given up, still to be emptied by the same steps.
fn emptying(t: &Flows4) -> bool {
    t.busy() && !t.growing()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let mut state = None;
    let mut g = c.benchmark_group("flows4 growth, 2M slots to 4M");
    g.sample_size(10);
    let step = |g: &mut Growing| g.t.step(TIDY_SLOTS);
    g.bench_function(format!("main-loop step ({TIDY_SLOTS} slots)"), |b| {
        b.iter_custom(|iters| timed(&mut state, iters, Flows4::growing, growing, step))
    });
    g.bench_function(format!("insert with its step ({STEP} slots)"), |b| {
        b.iter_custom(|iters| {
            timed(&mut state, iters, Flows4::growing, growing, |g| {
                let _ = g.t.insert(&key(g.next), &Value4::default());
                g.next += 1;
            })
        })
    });
    g.bench_function("the whole growth in one step", |b| {
        b.iter_custom(|iters| {
            timed(&mut state, iters, Flows4::growing, growing, |g| {
                g.t.step(u32::MAX)
            })
        })
    });
    g.bench_function(
        format!("main-loop step emptying the old table ({TIDY_SLOTS} slots)"),
        |b| b.iter_custom(|iters| timed(&mut state, iters, emptying, grown, step)),
    );
    g.finish();
    c.final_summary();
}
