//! How long this machine takes to load a cache line from memory at random: what the XDP
//! fast path pays once a packet at a million flows, its IPv4 table being hundreds of MiB of
//! 4 KiB pages (a BPF map's memory is vmalloc'ed) of which each packet reads one line. And
//! how much of the time a core of this virtual machine runs at all ([`cpu_share`]): session
//! 16 found the host stopping a vCPU for up to 0.7 s at a time, a busy loop seeing 15 to
//! 40 % of the wall clock. `keepstate bench veth` prints both before and after its windows,
//! so that a slow sitting can be told from a slow firewall.
//!
//! A pointer chase: every line of a mapping holds the index of the next one in a random
//! cycle through all of them, so that each load waits for the one before it and the
//! hardware cannot prefetch. It is timed in short slices and the median slice counts: a
//! stop of the vCPU lands in few of them. (Session 15 timed the chase whole and read the
//! stops as memory latency, 0.2 to 10 µs a load; sliced, the same machine gives 0.2 to
//! 0.4 µs.) Owns nothing but its own mapping, unmapped on return.

use std::time::{Duration, Instant};

/// A cache line.
const LINE: usize = 64;

/// Loads timed in each chase (after as many again untimed, to warm the caches and TLB
/// with what they can hold), in slices of [`SLICE`].
const LOADS: usize = 100_000;

/// Loads a slice: a quarter of a millisecond at 250 ns a load.
const SLICE: usize = 1000;

/// The big region: the fast path's table at a million flows (4M slots of 64 bytes).
pub const BIG: usize = 256 << 20;

/// The small region: a thousand flows' entries fit in the caches.
pub const SMALL: usize = 1 << 20;

/// Anonymous memory in 4 KiB pages (no transparent huge pages, as vmalloc gives a map).
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> std::io::Result<Mapping> {
        // SAFETY: a fresh private anonymous mapping; no address hint.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let m = Mapping {
            ptr: ptr.cast(),
            len,
        };
        // SAFETY: the mapping just made. Advice only: a kernel without THP refuses it, and
        // then there are no huge pages anyway.
        unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
        Ok(m)
    }

    /// The first word of line `i`.
    fn line(&self, i: usize) -> *mut u32 {
        debug_assert!((i + 1) * LINE <= self.len);
        // SAFETY: within the mapping (checked above in debug builds; callers index lines
        // below `len / LINE`).
        unsafe { self.ptr.add(i * LINE).cast() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// xorshift64*: enough to scramble a cycle, with no dependency.
fn next(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Links the first `lines` lines of `m` into one random cycle through all of them
/// (Sattolo's shuffle): each holds the index of the next.
fn link(m: &Mapping, lines: usize, mut seed: u64) {
    assert!(lines * LINE <= m.len && lines <= u32::MAX as usize);
    let mut order: Vec<u32> = (0..lines as u32).collect();
    for i in (1..lines).rev() {
        let j = (next(&mut seed) % i as u64) as usize;
        order.swap(i, j);
    }
    for (i, &n) in order.iter().enumerate() {
        // SAFETY: `i` < lines, within the mapping (asserted above).
        unsafe { m.line(i).write(n) };
    }
}

/// Nanoseconds a load of a random line of `bytes` (at least two lines) takes, each load
/// waiting for the one before it: the median of [`SLICE`]-load slices.
pub fn load_ns(bytes: usize) -> std::io::Result<f64> {
    let lines = (bytes / LINE).max(2);
    let m = Mapping::new(lines * LINE)?;
    link(&m, lines, 0x9e37_79b9_7f4a_7c15);
    let mut at = 0u32;
    let mut chase = |n: usize| {
        for _ in 0..n {
            // SAFETY: every line holds the index of a line (`link`).
            at = unsafe { m.line(at as usize).read_volatile() };
        }
    };
    chase(LOADS);
    let mut slices: Vec<f64> = (0..LOADS / SLICE)
        .map(|_| {
            let t = Instant::now();
            chase(SLICE);
            t.elapsed().as_nanos() as f64 / SLICE as f64
        })
        .collect();
    slices.sort_by(f64::total_cmp);
    Ok(slices[slices.len() / 2])
}

/// A gap between two readings of the clock in a busy loop longer than this is a stop: the
/// core was taken away (by the host, or by another thread of ours).
const STOP: Duration = Duration::from_micros(100);

/// How the calling thread's core ran over `span` of a busy loop: the share of the time it
/// ran (gaps of [`STOP`] or less count as running) and its longest stop.
pub fn cpu_share(span: Duration) -> (f64, Duration) {
    let t0 = Instant::now();
    let (mut last, mut stopped, mut longest) = (t0, Duration::ZERO, Duration::ZERO);
    while last - t0 < span {
        let now = Instant::now();
        let gap = now - last;
        if gap > STOP {
            stopped += gap;
            longest = longest.max(gap);
        }
        last = now;
    }
    let all = last - t0;
    (1.0 - stopped.as_secs_f64() / all.as_secs_f64(), longest)
}

/// What [`measure`] finds on a core.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    /// ns a random load over [`BIG`] takes.
    pub big_ns: f64,
    /// ns a random load over [`SMALL`] takes.
    pub small_ns: f64,
    /// The share of a second the core ran ([`cpu_share`]).
    pub ran: f64,
    /// Its longest stop in that second.
    pub longest_stop: Duration,
}

/// [`load_ns`] over [`BIG`] and [`SMALL`], and a second of [`cpu_share`], on cpu `cpu` (a
/// thread of its own, so that the caller's affinity is left alone).
pub fn measure(cpu: usize) -> std::io::Result<Probe> {
    std::thread::spawn(move || {
        core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
        let (big_ns, small_ns) = (load_ns(BIG)?, load_ns(SMALL)?);
        let (ran, longest_stop) = cpu_share(Duration::from_secs(1));
        Ok(Probe {
            big_ns,
            small_ns,
            ran,
            longest_stop,
        })
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("the memory probe's thread panicked")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chase_visits_every_line() {
        // A cycle through all lines: from line 0, the chase comes back after `lines` loads
        // and not before.
        let lines = 1000;
        let m = Mapping::new(lines * LINE).unwrap();
        link(&m, lines, 7);
        let mut at = 0;
        for step in 1..=lines {
            // SAFETY: as above.
            at = unsafe { m.line(at as usize).read() };
            assert_eq!(at == 0, step == lines, "back at line 0 after {step} loads");
        }
    }

    #[test]
    fn a_small_region_is_timed() {
        let ns = load_ns(SMALL).unwrap();
        assert!(ns > 0.0 && ns.is_finite(), "{ns}");
    }

    #[test]
    fn a_core_taken_away_is_seen_stopped() {
        // Two busy loops on one core: each sees the other's turns as stops.
        let spin = || {
            core_affinity::set_for_current(core_affinity::CoreId { id: 0 });
            cpu_share(Duration::from_millis(600))
        };
        let other = std::thread::spawn(spin);
        let (ran, longest) = spin();
        let (other_ran, _) = other.join().unwrap();
        assert!(
            ran > 0.0 && ran <= 1.0 && other_ran <= 1.0,
            "{ran} {other_ran}"
        );
        assert!(
            ran + other_ran < 1.5,
            "both ran most of the time: {ran} {other_ran}"
        );
        assert!(longest > STOP, "{longest:?}");
    }
}
