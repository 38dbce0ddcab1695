//! The IPv4 flow table the XDP program reads (`flows4` in src/dataplane/bpf/fastpath.bpf.c):
//! open addressing with linear probing (Robin Hood placement) over an array of 64-byte
//! entries (a sequence number, the key and the value: one cache line) that this process
//! maps into its memory and writes with no system call. At a million flows the kernel's
//! hash missed the cache twice per lookup (bucket, then element); this misses once.
//!
//! Each entry is a seqlock for the program's lookups: a write makes `seq` odd, writes the key
//! and value, and makes it even again; a lookup that sees it odd, or changed once it has
//! copied the value, hands the frame to the workers. Placement is Robin Hood's: a run of
//! entries is sorted by home, so a new entry goes after those homed at or before its own
//! and the rest of the run moves one slot on; a removal shifts the entries after it back
//! (no tombstones), so that a lookup stops at the first empty slot. An entry lies at most
//! [`PROBES`] slots from its home (an insert that would put one farther is refused, and the
//! flow stays with the workers). An entry being moved is briefly in two slots, or, for a
//! lookup that reads the two at the wrong moments, in none: a miss, which is always safe.
//!
//! The table in use is a power-of-two region at one end of the map, which grows by steps
//! into a region twice its size at the other end ([`Flows4::step`]), while the program
//! reads the old one and the slow path goes on.
//!
//! Owns the layout, the hash, the probing and the growth; one writer at a time (the caller's
//! lock).

use std::sync::atomic::{fence, AtomicU32, Ordering};

use super::fastpath::{Key4, Value4};

/// How far from its home slot an entry may lie (`PROBES` in the program). Entries are placed
/// Robin Hood style: each run of entries is kept sorted by home, so that an entry moves
/// away from its home only as far as the entries homed before it push it. With plain linear
/// probing (first free slot), the longest run grew with the entries, and a table less than
/// half full often had no room within 32 slots of some key's home: a million flows (2M
/// entries, 48 % of 4M slots) then needed 8M slots. In Robin Hood order no entry of those
/// 2M lay farther than 12 slots from its home (3 hash seeds, a throwaway test), nor of
/// 2,000 entries in 4,096 slots farther than 9 (200 seeds). And the largest table, which
/// cannot grow, filled to two thirds: first-free placement refused 0.05-0.08 % of the
/// inserts (2^16 and 2^20 slots, 3-5 seeds), Robin Hood's none (no entry farther than 17).
/// A lookup stops at the first empty slot, so that the limit costs only the program's size.
pub const PROBES: u32 = 32;

/// `struct flow_entry4`: empty while `key.ifindex` is 0.
#[derive(Debug, Default)]
#[repr(C)]
pub struct Entry4 {
    seq: AtomicU32,
    key: Key4,
    value: Value4,
    /// The low half of the key's [`hash`], so that placing and moving entries need not hash
    /// their keys again (the program does not read it).
    hash: u32,
}

/// `struct flow_conf`: the table's shape, for the program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Conf {
    pub seed: u64,
    /// The region in use: its size less one, with [`TOP`] set if it ends where the map ends
    /// (else it starts where the map starts). One 32-bit word, so that the program reads
    /// the region whole.
    pub mask: u32,
    /// The map's slots.
    pub capacity: u32,
}

/// In [`Conf::mask`]: the region in use lies at the map's end.
pub const TOP: u32 = 1 << 31;

/// The largest table for `flows` directions: half as many again, rounded up to a power of
/// two, so that it is at most two thirds full. The map holds half as much again
/// ([`capacity_for`]).
pub fn slots_for(flows: u32) -> u32 {
    (flows as u64 + flows as u64 / 2)
        .next_power_of_two()
        .clamp(FIRST_SLOTS as u64, 1 << 30) as u32
}

/// The map's slots for a largest table of `slots`: that and the half-size table it grows
/// from, side by side.
pub fn capacity_for(slots: u32) -> u32 {
    slots + slots / 2
}

/// The program's `flow_hash4`: over the key's five 32-bit words in native order.
pub fn hash(k: &Key4, seed: u64) -> u64 {
    // SAFETY: Key4 is 20 bytes of plain integers with explicit padding (`pad`), aligned to 4.
    let w: [u32; 5] = unsafe { std::mem::transmute(*k) };
    let mut x = ((w[1] as u64) << 32 | w[0] as u64) ^ seed;
    x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= (w[3] as u64) << 32 | w[2] as u64;
    x = x.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    x ^= w[4] as u64;
    x ^= x >> 29;
    x = x.wrapping_mul(0x1656_67b1_9e37_79f9);
    x ^ (x >> 32)
}

/// No slot within [`PROBES`] of the key's home is free.
#[derive(Debug, thiserror::Error)]
#[error("no free slot within {PROBES} of the flow's home in the IPv4 flow table")]
pub struct Full;

/// The table's first size: 64 KiB, 16 pages.
pub const FIRST_SLOTS: u32 = 1024;

/// Slots of the old table that an insert or a removal copies into the new one while the
/// table grows: a few microseconds each, so that a growth is done within a few thousand
/// inserts (the main loop copies more, [`Flows4::step`]).
pub const STEP: u32 = 64;

/// A table: the map's slots `at..=at + mask`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Region {
    at: u32,
    mask: u32,
}

impl Region {
    fn size(self) -> u32 {
        self.mask + 1
    }

    /// The map's slot for position `i` (taken modulo the size).
    fn slot(self, i: u32) -> u32 {
        self.at + (i & self.mask)
    }
}

/// A growth under way: the new table, filled as the old one is read.
#[derive(Clone, Copy, Debug)]
struct Growth {
    to: Region,
    /// Its entries.
    len: usize,
    /// Of those, the ones the old table does not have (inserted when it had no room).
    only_new: usize,
    /// The old table's slots below this one are in it (or were lost: [`Flows4::take_lost`]).
    copied: u32,
}

/// The part of a table given up that is still to be emptied: slots `from..to`, `left`
/// entries among them.
#[derive(Clone, Copy, Debug)]
struct Stale {
    from: u32,
    to: u32,
    left: usize,
}

/// Slots that a step emptying a table given up visits for each slot of its budget: a walk
/// in order, which the hardware prefetches, writing only the slots in use.
const EMPTIED_PER_SLOT: u32 = 8;

/// The table, over memory it does not own (the mmapped map, or a test's vector).
///
/// It starts with [`FIRST_SLOTS`] slots at the map's start and doubles when an insert would
/// fill it beyond two thirds or finds no free slot near its home, up to the largest that
/// fits beside its half ([`capacity_for`]): a box with a thousand flows looks them up in 64
/// or 128 pages, not spread over the whole map (half a gigabyte at two million
/// connections), where every lookup was also a TLB miss.
///
/// A growth fills the new table at the other end of the map, in steps ([`STEP`] slots
/// with each insert and removal, more with each tick of the main loop), while the program
/// reads the old one: every insert and removal meanwhile goes to both (an insert to the old
/// one if it has room: else the program misses that flow until the new table is in use).
/// When every old entry is copied, the program is told the new table's place (one 32-bit
/// store), and the old one is emptied, by steps too, before the next growth may fill the
/// slots it shares with it.
pub struct Flows4 {
    base: *mut Entry4,
    seed: u64,
    /// The table the program reads.
    cur: Region,
    /// The program's copy of its shape (the mmapped `flows4_conf`); null in tests.
    shared: *mut Conf,
    /// Slots at `base`.
    capacity: u32,
    /// The largest table's size.
    max: u32,
    /// Entries in `cur`.
    len: usize,
    growth: Option<Growth>,
    /// A table given up, still to be emptied.
    stale: Option<Stale>,
    /// Keys a growth could not place (none expected: the new table is a third full).
    lost: Vec<Key4>,
}

// SAFETY: `base` and `shared` point to memory that outlives the table (its owner keeps them
// together); the program only reads it, and this process writes it through `&mut self` only.
unsafe impl Send for Flows4 {}

impl Flows4 {
    /// A table over `capacity` zeroed entries at `base`, its hash seeded with `seed`, that
    /// tells the program its shape through `shared` (if not null).
    ///
    /// # Safety
    /// `base` must point to `capacity` entries, zeroed, and `shared` (unless null) to a
    /// `Conf`, both valid for as long as the table lives and written by nobody else.
    pub unsafe fn new(base: *mut Entry4, capacity: u32, seed: u64, shared: *mut Conf) -> Flows4 {
        let first = FIRST_SLOTS.min(1 << capacity.max(1).ilog2());
        let mut max = first;
        while max * 2 <= capacity && capacity - max * 2 >= max {
            max *= 2;
        }
        let cur = Region {
            at: 0,
            mask: first - 1,
        };
        if !shared.is_null() {
            // SAFETY: by the contract; the program does not run yet.
            unsafe {
                std::ptr::write_volatile(
                    shared,
                    Conf {
                        seed,
                        mask: cur.mask,
                        capacity,
                    },
                )
            };
        }
        Flows4 {
            base,
            seed,
            cur,
            shared,
            capacity,
            max,
            len: 0,
            growth: None,
            stale: None,
            lost: Vec::new(),
        }
    }

    /// An empty table over nothing, until [`Flows4::new`] replaces it.
    pub const NONE: Flows4 = Flows4 {
        base: std::ptr::null_mut(),
        seed: 0,
        cur: Region { at: 0, mask: 0 },
        shared: std::ptr::null_mut(),
        capacity: 0,
        max: 0,
        len: 0,
        growth: None,
        stale: None,
        lost: Vec::new(),
    };

    /// Entries.
    pub fn len(&self) -> usize {
        self.len + self.growth.map_or(0, |g| g.only_new)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The size of the table the program reads, and of the largest.
    pub fn slots(&self) -> (u32, u32) {
        (self.cur.size(), self.max)
    }

    /// Whether a growth is under way.
    pub fn growing(&self) -> bool {
        self.growth.is_some()
    }

    /// Whether steps have work left: a growth, or the emptying of the table it left.
    pub fn busy(&self) -> bool {
        self.growth.is_some() || self.stale.is_some()
    }

    /// Keys that growths could not place since the last call: their flows are no longer in
    /// the table (or will not be after the switch), and their packets go to the workers.
    pub fn take_lost(&mut self) -> Vec<Key4> {
        std::mem::take(&mut self.lost)
    }

    /// Slot `i` of the map.
    fn entry(&self, i: u32) -> &Entry4 {
        debug_assert!(i < self.capacity);
        // SAFETY: `i` is within the `capacity` entries at `base` (`new`'s contract).
        unsafe { &*self.base.add(i as usize) }
    }

    /// The low half of `k`'s hash: its home in a table is the bits of the table's mask.
    fn hash(&self, k: &Key4) -> u32 {
        hash(k, self.seed) as u32
    }

    #[cfg(test)]
    fn home(&self, k: &Key4, r: Region) -> u32 {
        self.hash(k) & r.mask
    }

    /// How far slot `at` of table `r` lies from the home of the entry it holds.
    fn distance(&self, r: Region, at: u32) -> u32 {
        (at - r.at).wrapping_sub(self.entry(at).hash) & r.mask
    }

    /// The slot holding `k` in table `r`, as the program looks for it, but for a miss
    /// decided early: past the entries of its home there is no `k` (the program reads on to
    /// the first empty slot, rather than hash every key it passes).
    fn find_in(&self, r: Region, k: &Key4) -> Option<u32> {
        if self.capacity == 0 {
            return None; // `NONE`
        }
        let home = self.hash(k) & r.mask;
        for i in 0..PROBES {
            let at = r.slot(home + i);
            let e = self.entry(at);
            if e.key.ifindex == 0 {
                return None;
            }
            if e.key == *k {
                return Some(at);
            }
            if self.distance(r, at) < i {
                return None;
            }
        }
        None
    }

    /// The value of `k`: from the new table while one fills (it has the latest of every key
    /// it has), else from the one in use.
    pub fn get(&self, k: &Key4) -> Option<Value4> {
        let found = self.growth.and_then(|g| self.find_in(g.to, k));
        found
            .or_else(|| self.find_in(self.cur, k))
            .map(|i| self.entry(i).value)
    }

    /// Writes `k` with `v` in table `r`: in its slot if it has one (false), else after the
    /// entries whose home is at or before its own, within [`PROBES`] of its home (true),
    /// the entries from there to the next empty slot moving one slot on ([`Flows4::shift`]).
    fn place(&mut self, r: Region, k: &Key4, v: &Value4, h: u32) -> Result<bool, Full> {
        let home = h & r.mask;
        for i in 0..PROBES {
            let at = r.slot(home + i);
            let e = self.entry(at);
            if e.key.ifindex == 0 || self.distance(r, at) < i {
                self.shift(r, at)?;
                self.write(at, k, v, h);
                return Ok(true);
            }
            if e.key == *k {
                self.write(at, k, v, h);
                return Ok(false);
            }
        }
        Err(Full)
    }

    /// Moves the entries of table `r` from slot `from` to the next empty one a slot on,
    /// the last first, so that a lookup running ahead of the moves finds each entry in its
    /// old slot or its new one, and never meets an empty slot that was not there. Refused,
    /// moving nothing, if an entry would lie [`PROBES`] from its home. While a growth
    /// copies the table in use, an entry moved is copied now (it may wrap around below
    /// the copy's progress).
    fn shift(&mut self, r: Region, from: u32) -> Result<(), Full> {
        let start = from - r.at;
        let mut n = 0;
        loop {
            let at = r.slot(start + n);
            let e = self.entry(at);
            if e.key.ifindex == 0 {
                break;
            }
            if self.distance(r, at) + 1 >= PROBES || n + 1 >= r.size() {
                return Err(Full);
            }
            n += 1;
        }
        for m in (0..n).rev() {
            self.relocate(r, r.slot(start + m), r.slot(start + m + 1));
        }
        Ok(())
    }

    /// Writes `k` with `v`, in its slot if it has one, else in its place in Robin Hood order
    /// within [`PROBES`] of its home; grows the table if a new entry would fill it beyond two
    /// thirds, or if no slot is free. Refused only when the largest table has no room for
    /// it (or, while a table fills, that one).
    pub fn insert(&mut self, k: &Key4, v: &Value4) -> Result<(), Full> {
        debug_assert!(k.ifindex != 0, "ifindex 0 marks an empty slot");
        if self.capacity == 0 {
            return Err(Full); // `NONE`
        }
        self.step(STEP);
        let h = self.hash(k);
        if self.growth.is_none() && self.one_more_needs_room() {
            self.start_growth();
        }
        if let Some(g) = self.growth {
            // The new table gets every key; the old one too if it has room, for the program.
            let before = self.only_in_new(g.to, k);
            match self.place(g.to, k, v, h) {
                Ok(new) => self.grown(new as usize, 0),
                // Not yet copied and no room for it there: lost at the switch (counted by the
                // copy).
                Err(Full) if self.find_in(self.cur, k).is_some() => {}
                Err(Full) => return Err(Full),
            }
            if let Ok(new) = self.place(self.cur, k, v, h) {
                self.len += new as usize;
            }
            match (before, self.only_in_new(g.to, k)) {
                (false, true) => self.grown(0, 1),
                (true, false) => {
                    if let Some(g) = &mut self.growth {
                        g.only_new -= 1;
                    }
                }
                _ => {}
            }
            return Ok(());
        }
        match self.place(self.cur, k, v, h) {
            Ok(new) => {
                self.len += new as usize;
                Ok(())
            }
            // No room near its home: a bigger table, if there is one, rather than a flow left
            // to the workers for good.
            Err(Full) if self.cur.size() < self.max => {
                self.start_growth();
                self.insert(k, v)
            }
            Err(Full) => Err(Full),
        }
    }

    /// Whether one more entry would fill the table in use beyond two thirds, and it can grow.
    fn one_more_needs_room(&self) -> bool {
        let size = self.cur.size() as usize;
        (self.len + 1) * 3 > size * 2 && size < self.max as usize
    }

    /// Counts entries added to the new table (`new`), `only` of them not in the old one.
    fn grown(&mut self, new: usize, only: usize) {
        if let Some(g) = &mut self.growth {
            g.len += new;
            g.only_new += only;
        }
    }

    /// Whether `k` is in the new table `to` and not in the one in use.
    fn only_in_new(&self, to: Region, k: &Key4) -> bool {
        self.find_in(to, k).is_some() && self.find_in(self.cur, k).is_none()
    }

    /// Removes `k` (from both tables while one fills); the entries after it that may move
    /// closer to their home do.
    pub fn remove(&mut self, k: &Key4) -> bool {
        self.step(STEP);
        let mut found = false;
        if let Some(at) = self.find_in(self.cur, k) {
            self.remove_at(self.cur, at);
            self.len -= 1;
            found = true;
        }
        let Some(to) = self.growth.map(|g| g.to) else {
            return found;
        };
        if let Some(at) = self.find_in(to, k) {
            self.remove_at(to, at);
            if let Some(g) = &mut self.growth {
                g.len -= 1;
                g.only_new -= usize::from(!found);
            }
            found = true;
        }
        found
    }

    /// Empties slot `hole` of table `r` and moves back the entries after it that may come
    /// closer to their home (backward-shift deletion: no tombstones), keeping their order.
    /// While a growth copies the table in use, an entry it moves is copied now (it may
    /// move below the copy's progress).
    fn remove_at(&mut self, r: Region, mut hole: u32) {
        let mut j = hole;
        loop {
            j = r.slot(j - r.at + 1);
            let e = self.entry(j);
            if e.key.ifindex == 0 {
                break;
            }
            // It may move to the hole if the hole lies between its home and it.
            let (pj, ph) = (j - r.at, hole - r.at);
            if self.distance(r, j) >= pj.wrapping_sub(ph) & r.mask {
                self.relocate(r, j, hole);
                hole = j;
            }
        }
        self.clear(hole);
    }

    /// Copies the entry in slot `from` of table `r` to slot `to` (leaving it in both). While a
    /// growth copies the table in use, an entry moved there is copied now (it may move below
    /// the copy's progress).
    fn relocate(&mut self, r: Region, from: u32, to: u32) {
        let (key, value, h) = {
            let e = self.entry(from);
            (e.key, e.value, e.hash)
        };
        self.write(to, &key, &value, h);
        if r == self.cur {
            self.copy(&key, &value, h);
        }
    }

    /// Into the new table, if a growth is under way and it does not have `k` yet.
    fn copy(&mut self, k: &Key4, v: &Value4, h: u32) {
        let Some(g) = self.growth else {
            return;
        };
        if self.find_in(g.to, k).is_some() {
            return;
        }
        match self.place(g.to, k, v, h) {
            Ok(new) => self.grown(new as usize, 0),
            Err(Full) => self.lost.push(*k),
        }
    }

    /// A new table twice the size of the one in use, at the other end of the map: the
    /// table before it, which shared those slots, is emptied first if it is not yet.
    fn start_growth(&mut self) {
        debug_assert!(self.growth.is_none() && self.cur.size() < self.max);
        while self.stale.is_some() {
            self.step(u32::MAX);
        }
        let size = self.cur.size() * 2;
        let at = if self.cur.at == 0 {
            self.capacity - size
        } else {
            0
        };
        debug_assert!(
            (at..at + size).all(|i| self.entry(i).key.ifindex == 0),
            "the new table's slots are empty"
        );
        self.growth = Some(Growth {
            to: Region { at, mask: size - 1 },
            len: 0,
            only_new: 0,
            copied: 0,
        });
    }

    /// Up to `budget` slots of the work a growth leaves: copying the old table's entries
    /// into the new one, and once all are in, telling the program to read the new one; then
    /// emptying the old one ([`EMPTIED_PER_SLOT`] times as many slots, until its last entry
    /// is gone). The main loop calls it once a tick; inserts and removals call it with
    /// [`STEP`].
    pub fn step(&mut self, budget: u32) {
        if let Some(mut st) = self.stale {
            // No growth meanwhile (`start_growth` waits for this).
            let end = st.to.min(
                st.from
                    .saturating_add(budget.saturating_mul(EMPTIED_PER_SLOT)),
            );
            while st.from < end && st.left > 0 {
                if self.entry(st.from).key.ifindex != 0 {
                    self.clear(st.from);
                    st.left -= 1;
                }
                st.from += 1;
            }
            self.stale = (st.from < st.to && st.left > 0).then_some(st);
            return;
        }
        let Some(mut g) = self.growth else {
            return;
        };
        let end = self.cur.size().min(g.copied.saturating_add(budget));
        while g.copied < end {
            let e = self.entry(self.cur.slot(g.copied));
            g.copied += 1;
            if e.key.ifindex == 0 || self.find_in(g.to, &e.key).is_some() {
                continue;
            }
            let (key, value, h) = (e.key, e.value, e.hash);
            match self.place(g.to, &key, &value, h) {
                Ok(_) => g.len += 1,
                Err(Full) => self.lost.push(key),
            }
        }
        if g.copied < self.cur.size() {
            self.growth = Some(g);
            return;
        }
        let old = self.cur;
        self.stale = Some(Stale {
            from: old.at,
            to: old.at + old.size(),
            left: self.len,
        });
        self.growth = None;
        self.len = g.len;
        self.publish(g.to);
    }

    /// Tells the program to read table `r`.
    fn publish(&mut self, r: Region) {
        self.cur = r;
        if !self.shared.is_null() {
            let word = r.mask | if r.at == 0 { 0 } else { TOP };
            // SAFETY: `shared` is a valid Conf (`new`'s contract); the program reads `mask`
            // once per lookup, as a 32-bit load.
            let m = unsafe { &*std::ptr::addr_of!((*self.shared).mask).cast::<AtomicU32>() };
            m.store(word, Ordering::Release);
        }
    }

    /// Empties slot `i`.
    fn clear(&mut self, i: u32) {
        self.write(i, &Key4::default(), &Value4::default(), 0);
    }

    /// Writes slot `i` under its seqlock: `k` (whose hash is `h`) with `v`.
    fn write(&mut self, i: u32, k: &Key4, v: &Value4, h: u32) {
        debug_assert!(i < self.capacity);
        // SAFETY: as in `entry`; this process is the only writer (`&mut self`).
        let e = unsafe { self.base.add(i as usize) };
        // SAFETY: `e` is a valid entry; its fields are written in place, volatile because the
        // program reads them concurrently (and copes with a torn read through `seq`).
        unsafe {
            let seq = &(*e).seq;
            let s = seq.load(Ordering::Relaxed);
            seq.store(s.wrapping_add(1), Ordering::Relaxed);
            fence(Ordering::Release);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*e).key), *k);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*e).value), *v);
            (*e).hash = h;
            seq.store(s.wrapping_add(2), Ordering::Release);
        }
    }

    /// Every entry's distance from its home in the table in use: all below [`PROBES`].
    #[cfg(test)]
    fn displacements(&self) -> Vec<u32> {
        let r = self.cur;
        (0..r.size())
            .map(|i| r.slot(i))
            .filter(|&i| self.entry(i).key.ifindex != 0)
            .map(|i| self.distance(r, i))
            .collect()
    }

    /// Whether the table in use is in Robin Hood order: every run of entries sorted by home
    /// (each entry at most one slot farther from its home than the one before it).
    #[cfg(test)]
    fn in_order(&self) -> bool {
        let r = self.cur;
        (0..r.size()).all(|i| {
            let (a, b) = (self.entry(r.slot(i)), self.entry(r.slot(i + 1)));
            a.key.ifindex == 0
                || b.key.ifindex == 0
                || self.distance(r, r.slot(i + 1)) <= self.distance(r, r.slot(i)) + 1
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn key(n: u32) -> Key4 {
        Key4 {
            src: n.to_be_bytes(),
            dst: [10, 0, 0, 1],
            sport: (n % 7) as u16,
            dport: 80,
            ifindex: 1 + n % 3,
            proto: 17,
            pad: [0; 3],
        }
    }

    fn value(n: u32) -> Value4 {
        let mut v = Value4::default();
        v.h.slot = n;
        v.h.tx_port = 2;
        v
    }

    #[test]
    fn an_entry_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Entry4>(), 64);
        assert_eq!(std::mem::size_of::<Conf>(), 16);
        assert_eq!(slots_for(4 << 20), 8 << 20);
        assert_eq!(slots_for(1 << 16), 1 << 17);
        assert_eq!(capacity_for(8 << 20), 12 << 20);
    }

    /// Inserts (`add`) or removes key `n` in `t` and in `model`, the value of an insert
    /// being `i`: they agree.
    fn apply(
        t: &mut Flows4,
        model: &mut HashMap<u32, u32>,
        add: bool,
        n: u32,
        i: u32,
    ) -> Result<(), TestCaseError> {
        if add {
            if t.insert(&key(n), &value(i)).is_ok() {
                model.insert(n, i);
            } else {
                prop_assert!(!model.contains_key(&n), "a present key is always rewritten");
            }
        } else {
            prop_assert_eq!(t.remove(&key(n)), model.remove(&n).is_some());
        }
        prop_assert_eq!(t.len(), model.len());
        Ok(())
    }

    proptest! {
        /// Inserts and removals on a small table agree with a map: every key inserted (and
        /// not refused) is found with its latest value, every removed one is gone, and no
        /// entry lies farther than PROBES from its home.
        #[test]
        fn agrees_with_a_map(ops in proptest::collection::vec((any::<bool>(), 0u32..200), 1..600),
                             seed in any::<u64>()) {
            let mut mem: Vec<Entry4> = (0..256).map(|_| Entry4::default()).collect();
            // SAFETY: 256 zeroed entries that outlive `t`.
            let mut t = unsafe { Flows4::new(mem.as_mut_ptr(), 256, seed, std::ptr::null_mut()) };
            let mut model = HashMap::new();
            for (i, (add, n)) in ops.into_iter().enumerate() {
                apply(&mut t, &mut model, add, n, i as u32)?;
            }
            for n in 0..200 {
                prop_assert_eq!(t.get(&key(n)).map(|v| v.h.slot), model.get(&n).copied());
            }
            prop_assert!(t.displacements().iter().all(|&d| d < PROBES));
            prop_assert!(t.in_order());
            for e in &mem {
                prop_assert_eq!(e.seq.load(Ordering::Relaxed) % 2, 0);
            }
        }
    }

    /// What the program finds for `k`: it reads the table `shared` says, in `t`'s memory.
    fn program_finds(t: &Flows4, shared: &Conf, k: &Key4) -> Option<u32> {
        let mask = shared.mask & !TOP;
        let at = if shared.mask & TOP != 0 {
            shared.capacity - mask - 1
        } else {
            0
        };
        let i = t.find_in(Region { at, mask }, k)?;
        Some(t.entry(i).value.h.slot)
    }

    /// Runs the growth under way, and the emptying of the table it leaves, to their end.
    fn finish(t: &mut Flows4) {
        while t.busy() {
            t.step(1000);
        }
    }

    proptest! {
        /// A table that grows by steps while keys come and go agrees with a map, and the
        /// program, reading the table it was told, never finds a removed key or an old value;
        /// it finds every key but those inserted while a growth was under way (into the new
        /// table only, when the old one had no room), and those too once it ends.
        #[test]
        fn grows_without_losing_a_key(ops in proptest::collection::vec((0u8..7, 0u32..3000, 1u32..64), 2000..6000),
                                      seed in any::<u64>()) {
            let capacity = capacity_for(4096);
            let mut mem: Vec<Entry4> = (0..capacity).map(|_| Entry4::default()).collect();
            let mut shared = Box::new(Conf::default());
            // SAFETY: `capacity` zeroed entries and a Conf that outlive `t`.
            let mut t = unsafe { Flows4::new(mem.as_mut_ptr(), capacity, seed, &mut *shared) };
            prop_assert_eq!(t.slots(), (FIRST_SLOTS, 4096));
            prop_assert_eq!(shared.capacity, capacity);
            let mut model = HashMap::new();
            let mut unseen = std::collections::HashSet::new();
            for (i, (op, n, budget)) in ops.into_iter().enumerate() {
                let growing = t.growing();
                match op {
                    // A tick of the main loop.
                    0 => t.step(budget),
                    1 | 2 => apply(&mut t, &mut model, false, n, i as u32)?,
                    _ => {
                        apply(&mut t, &mut model, true, n, i as u32)?;
                        if growing || t.growing() {
                            unseen.insert(n);
                        }
                    }
                }
                if !t.growing() {
                    unseen.clear();
                }
                let seen = program_finds(&t, &shared, &key(n));
                prop_assert!(seen.is_none() || seen == model.get(&n).copied(), "key {n}: {seen:?}");
                if t.growing() || growing {
                    for (&m, &v) in &model {
                        let seen = program_finds(&t, &shared, &key(m));
                        prop_assert!(seen == Some(v) || seen.is_none() && unseen.contains(&m),
                                     "key {m}: {seen:?}, not {v}");
                    }
                }
            }
            finish(&mut t);
            prop_assert_eq!(t.take_lost().len(), 0);
            for (&m, &v) in &model {
                prop_assert_eq!(program_finds(&t, &shared, &key(m)), Some(v));
            }
            prop_assert_eq!(t.len(), model.len());
            prop_assert!(t.displacements().iter().all(|&d| d < PROBES));
            prop_assert!(t.in_order());
            // Nothing outside the table in use.
            let (at, size) = (t.cur.at as usize, t.cur.size() as usize);
            let outside = mem[..at].iter().chain(&mem[at + size..]);
            prop_assert!(outside.clone().all(|e| e.key.ifindex == 0));
            // Two thirds full at most (the last insert may be the one that fills it so).
            prop_assert!(t.len() * 3 <= size * 2 || size == 4096);
        }
    }

    #[test]
    fn a_small_table_stays_small() {
        let capacity = capacity_for(1 << 16);
        let mut mem: Vec<Entry4> = (0..capacity).map(|_| Entry4::default()).collect();
        // SAFETY: as above.
        let mut t = unsafe { Flows4::new(mem.as_mut_ptr(), capacity, 3, std::ptr::null_mut()) };
        assert_eq!(t.slots(), (1024, 1 << 16));
        // Two thousand entries (a thousand flows): 4,096 slots.
        for n in 0..2000 {
            t.insert(&key(n), &value(n)).unwrap();
        }
        finish(&mut t);
        assert_eq!(t.slots().0, 4096);
        // Up to two thirds of the whole: nothing refused, where plain linear probing refused
        // 0.05-0.08 % (5 seeds; 0.06 % of 699,050 entries in 2^20 slots, 3 seeds).
        let refused = (2000..43_690)
            .filter(|&n| t.insert(&key(n), &value(n)).is_err())
            .count();
        finish(&mut t);
        assert_eq!(refused, 0);
        for n in 0..43_690 {
            assert_eq!(t.get(&key(n)).map(|v| v.h.slot), Some(n));
        }
        assert_eq!(t.len(), 43_690);
        assert_eq!(t.take_lost().len(), 0);
    }

    /// Robin Hood placement keeps every entry near its home: a table grows when two thirds
    /// full, not because an insert found no room within PROBES. Plain linear probing, before
    /// it, grew these 2,000 entries into 8,192 slots with 1 seed in 200, and 65,536 entries
    /// into 262,144 with 2 in 10.
    #[test]
    fn tables_half_full_have_room_near_every_home() {
        for (entries, slots, seeds) in [(2000, 4096, 0..50), (65_536, 131_072, 0..10)] {
            let capacity = capacity_for(slots * 2);
            let mut mem: Vec<Entry4> = (0..capacity).map(|_| Entry4::default()).collect();
            for seed in seeds {
                mem.iter_mut().for_each(|e| *e = Entry4::default());
                // SAFETY: as above.
                let mut t =
                    unsafe { Flows4::new(mem.as_mut_ptr(), capacity, seed, std::ptr::null_mut()) };
                for n in 0..entries {
                    t.insert(&key(n), &value(n)).unwrap();
                }
                finish(&mut t);
                assert_eq!(t.slots().0, slots, "{entries} entries, seed {seed}");
                assert!(t.in_order());
            }
        }
    }

    /// A growth that finds no room in the new table for an old entry (its neighbourhood
    /// there filled by inserts before the copy reached it) names it in `take_lost`: the
    /// program finds it in the old table until the switch and not after, nothing else
    /// changes, and it can come back once its neighbourhood has room. With the new table a
    /// third full, only keys that share a home (found by search) can do this.
    #[test]
    fn a_growth_names_the_entry_it_could_not_place() {
        let capacity = capacity_for(1 << 17);
        let mut mem: Vec<Entry4> = (0..capacity).map(|_| Entry4::default()).collect();
        let mut shared = Box::new(Conf::default());
        // SAFETY: `capacity` zeroed entries and a Conf that outlive `t`.
        let mut t = unsafe { Flows4::new(mem.as_mut_ptr(), capacity, 11, &mut *shared) };
        // 65,536 slots two thirds full: the next insert starts a growth.
        let full = (1u32 << 17) / 3;
        for n in 0..full {
            t.insert(&key(n), &value(n)).unwrap();
        }
        finish(&mut t);
        assert_eq!(t.slots(), (1 << 16, 1 << 17));
        // An entry in the old table's last slots, which the copy reaches late, and keys with
        // its home in the new table: inserted first, they fill its neighbourhood there.
        let old = t.cur;
        let victim = (0..full)
            .find(|&n| {
                t.find_in(old, &key(n))
                    .is_some_and(|at| at - old.at > 60_000)
            })
            .unwrap();
        let to = Region {
            at: 0,
            mask: (1 << 17) - 1,
        };
        let home = t.home(&key(victim), to);
        let crowd: Vec<u32> = (full..)
            .filter(|&n| t.home(&key(n), to) == home)
            .take(PROBES as usize)
            .collect();
        for &n in &crowd {
            t.insert(&key(n), &value(n)).unwrap();
        }
        assert!(t.growing());
        assert!(t.take_lost().is_empty(), "the copy has not reached it yet");
        assert_eq!(program_finds(&t, &shared, &key(victim)), Some(victim));
        finish(&mut t);
        let lost = t.take_lost();
        assert!(lost.contains(&key(victim)));
        assert_eq!(t.slots(), (1 << 17, 1 << 17));
        // Every other key as it was; the lost ones nowhere.
        for n in (0..full).chain(crowd.iter().copied()) {
            let seen = program_finds(&t, &shared, &key(n));
            if lost.contains(&key(n)) {
                assert_eq!(seen, None, "key {n}");
            } else {
                assert_eq!(seen, Some(n), "key {n}");
            }
        }
        assert_eq!(t.len(), (full as usize + crowd.len()) - lost.len());
        assert!(t.in_order());
        assert!(mem.iter().all(|e| e.seq.load(Ordering::Relaxed) % 2 == 0));
        // The largest table cannot grow: the victim is refused until a neighbour leaves.
        assert!(t.insert(&key(victim), &value(victim)).is_err());
        assert!(t.remove(&key(crowd[0])));
        t.insert(&key(victim), &value(victim)).unwrap();
        assert_eq!(program_finds(&t, &shared, &key(victim)), Some(victim));
    }

    #[test]
    fn a_crowded_neighbourhood_refuses_and_recovers() {
        let mut mem: Vec<Entry4> = (0..1024).map(|_| Entry4::default()).collect();
        // SAFETY: as above.
        let mut t = unsafe { Flows4::new(mem.as_mut_ptr(), 1024, 7, std::ptr::null_mut()) };
        // Keys with one home, found by search: the one beyond PROBES is refused.
        let p = PROBES as usize;
        let r = Region { at: 0, mask: 1023 };
        let home = t.home(&key(0), r);
        let same: Vec<u32> = (0..1_000_000)
            .filter(|&n| t.home(&key(n), r) == home)
            .take(p + 1)
            .collect();
        assert_eq!(same.len(), p + 1);
        for &n in &same[..p] {
            t.insert(&key(n), &value(n)).unwrap();
        }
        assert!(t.insert(&key(same[p]), &value(0)).is_err());
        assert!(t.remove(&key(same[0])));
        t.insert(&key(same[p]), &value(same[p])).unwrap();
        for &n in &same[1..] {
            assert_eq!(t.get(&key(n)).map(|v| v.h.slot), Some(n));
        }
        assert_eq!(t.get(&key(same[0])), None);
    }
}
