//! The IPv4 flow table the XDP program reads (`flows4` in src/dataplane/bpf/fastpath.bpf.c):
//! open addressing with linear probing over an array of 64-byte entries (a sequence number,
//! the key and the value: one cache line) that this process maps into its memory and writes
//! with no system call. At a million flows the kernel's hash missed the cache twice per
//! lookup (bucket, then element); this misses once.
//!
//! Each entry is a seqlock for the program's lookups: a write makes `seq` odd, writes the key
//! and value, and makes it even again; a lookup that sees it odd, or changed once it has
//! copied the value, hands the frame to the workers. An entry lies at most [`PROBES`] slots
//! from its home (an insert that would go farther is refused, and the flow stays with the
//! workers); a removal shifts the entries after it back (no tombstones), so that a lookup
//! stops at the first empty slot. An entry being moved is briefly in two slots, or, for a
//! lookup that reads the two at the wrong moments, in none: a miss, which is always safe.
//!
//! Owns the layout, the hash, the probing and the growth of the part in use; one writer at a
//! time (the caller's lock).

use std::sync::atomic::{fence, AtomicU32, Ordering};

use super::fastpath::{Key4, Value4};

/// How far from its home slot an entry may lie (`PROBES` in the program). With linear
/// probing (simulated), a table a quarter full refuses no insert in 10,000 at 8 probes
/// as at 16; half full, 0.43 % at 8 and 0.02 % at 16; two thirds full (the most, see
/// [`slots_for`]), 2.2 % and 0.5 %. A refused flow stays with the workers.
pub const PROBES: u32 = 16;

/// `struct flow_entry4`: empty while `key.ifindex` is 0.
#[derive(Debug, Default)]
#[repr(C)]
pub struct Entry4 {
    seq: AtomicU32,
    key: Key4,
    value: Value4,
    pad: u32,
}

/// `struct flow_conf`: the table's shape, for the program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Conf {
    pub seed: u64,
    pub mask: u32,
    pub pad: u32,
}

/// The table's size for `flows` directions: half as many again, rounded up to a power of
/// two, so that it is at most two thirds full.
pub fn slots_for(flows: u32) -> u32 {
    (flows as u64 + flows as u64 / 2)
        .next_power_of_two()
        .clamp(1024, 1 << 31) as u32
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

/// The table's first size in use: 64 KiB, 16 pages.
pub const FIRST_SLOTS: u32 = 1024;

/// The table, over memory it does not own (the mmapped map, or a test's vector).
///
/// It uses the first `mask + 1` slots of its memory and doubles that when an insert would
/// fill it beyond two thirds or finds no free slot near its home ([`Flows4::grow`]), up to
/// all of it: a box with a thousand flows looks them up in 64 or 128 pages, not spread over
/// the whole map (512 MiB at two million connections), where every lookup was also a TLB
/// miss.
pub struct Flows4 {
    base: *mut Entry4,
    /// The shape in use, as the program has it.
    conf: Conf,
    /// The program's copy of the shape (the mmapped `flows4_conf`); null in tests.
    shared: *mut Conf,
    /// Slots at `base`: a power of two.
    capacity: u32,
    /// Entries in use.
    len: usize,
    /// Entries a growth could not place (none expected: see [`Flows4::grow`]).
    lost: u64,
}

// SAFETY: `base` and `shared` point to memory that outlives the table (its owner keeps them
// together); the program only reads it, and this process writes it through `&mut self` only.
unsafe impl Send for Flows4 {}

impl Flows4 {
    /// A table over `capacity` zeroed entries at `base` (a power of two), its hash seeded
    /// with `seed`, that tells the program its shape through `shared` (if not null).
    ///
    /// # Safety
    /// `base` must point to `capacity` entries, zeroed, and `shared` (unless null) to a
    /// `Conf`, both valid for as long as the table lives and written by nobody else.
    pub unsafe fn new(base: *mut Entry4, capacity: u32, seed: u64, shared: *mut Conf) -> Flows4 {
        debug_assert!(capacity.is_power_of_two());
        let conf = Conf {
            seed,
            mask: FIRST_SLOTS.min(capacity) - 1,
            pad: 0,
        };
        if !shared.is_null() {
            // SAFETY: by the contract; the program does not run yet.
            unsafe { std::ptr::write_volatile(shared, conf) };
        }
        Flows4 {
            base,
            conf,
            shared,
            capacity,
            len: 0,
            lost: 0,
        }
    }

    /// An empty table over nothing, until [`Flows4::new`] replaces it.
    pub const NONE: Flows4 = Flows4 {
        base: std::ptr::null_mut(),
        conf: Conf {
            seed: 0,
            mask: 0,
            pad: 0,
        },
        shared: std::ptr::null_mut(),
        capacity: 0,
        len: 0,
        lost: 0,
    };

    /// Entries in use.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots in use (the table's size now) and in all.
    pub fn slots(&self) -> (u32, u32) {
        (self.conf.mask + 1, self.capacity)
    }

    /// Entries that growths could not place since the last call: their flows are no longer
    /// in the table, and their packets go to the workers.
    pub fn take_lost(&mut self) -> u64 {
        std::mem::take(&mut self.lost)
    }

    /// Slot `i` (below `capacity`).
    fn entry(&self, i: u32) -> &Entry4 {
        debug_assert!(i < self.capacity);
        // SAFETY: `i` is within the `capacity` entries at `base` (`new`'s contract).
        unsafe { &*self.base.add(i as usize) }
    }

    fn home(&self, k: &Key4, mask: u32) -> u32 {
        hash(k, self.conf.seed) as u32 & mask
    }

    /// The slot holding `k` in a table of `mask + 1` slots, as the program looks for it.
    fn find_in(&self, k: &Key4, mask: u32) -> Option<u32> {
        if self.capacity == 0 {
            return None; // `NONE`
        }
        let home = self.home(k, mask);
        for i in 0..PROBES {
            let at = (home + i) & mask;
            let e = self.entry(at);
            if e.key.ifindex == 0 {
                return None;
            }
            if e.key == *k {
                return Some(at);
            }
        }
        None
    }

    fn find(&self, k: &Key4) -> Option<u32> {
        self.find_in(k, self.conf.mask)
    }

    /// The value of `k`.
    pub fn get(&self, k: &Key4) -> Option<Value4> {
        self.find(k).map(|i| self.entry(i).value)
    }

    /// Writes `k` with `v`, in its slot if it has one, else in the first free one within
    /// [`PROBES`] of its home; grows the table first if a new entry would fill it beyond
    /// two thirds, and if no slot is free. Refused only when the whole map is in use.
    pub fn insert(&mut self, k: &Key4, v: &Value4) -> Result<(), Full> {
        debug_assert!(k.ifindex != 0, "ifindex 0 marks an empty slot");
        if self.capacity == 0 {
            return Err(Full); // `NONE`
        }
        if self.one_more_needs_room() {
            self.grow();
        }
        let mask = self.conf.mask;
        let home = self.home(k, mask);
        for i in 0..PROBES {
            let at = (home + i) & mask;
            let e = self.entry(at);
            if e.key.ifindex == 0 {
                self.len += 1;
            } else if e.key != *k {
                continue;
            }
            self.write(at, k, v);
            return Ok(());
        }
        // No room near its home: a bigger table, if there is one, rather than a flow left to
        // the workers (at two thirds full, linear probing refuses about 1 insert in 200).
        if mask + 1 < self.capacity {
            self.grow();
            return self.insert(k, v);
        }
        Err(Full)
    }

    /// Whether one more entry would fill the table in use beyond two thirds, and it can grow.
    fn one_more_needs_room(&self) -> bool {
        let size = self.conf.mask as usize + 1;
        (self.len + 1) * 3 > size * 2 && size < self.capacity as usize
    }

    /// Removes `k`; the entries after it that may move closer to their home do.
    pub fn remove(&mut self, k: &Key4) -> bool {
        let Some(at) = self.find(k) else {
            return false;
        };
        self.remove_at(at);
        true
    }

    /// Empties slot `hole` and moves back the entries after it that may come closer to their
    /// home (backward-shift deletion: no tombstones), keeping their order.
    fn remove_at(&mut self, mut hole: u32) {
        let mask = self.conf.mask;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let e = self.entry(j);
            if e.key.ifindex == 0 {
                break;
            }
            // It may move to the hole if the hole lies between its home and it.
            let home = self.home(&e.key, mask);
            if j.wrapping_sub(home) & mask >= j.wrapping_sub(hole) & mask {
                let (key, value) = (e.key, e.value);
                self.write(hole, &key, &value);
                hole = j;
            }
        }
        self.write(hole, &Key4::default(), &Value4::default());
        self.len -= 1;
    }

    /// Doubles the table in use, while the program reads it: no lookup misses a key that
    /// is in the table before and after, none finds a wrong value.
    ///
    /// 1. Under the old size (the program's), every entry that a lookup at the new size
    ///    would not find where it is gets a copy where it would: the slots beyond the old
    ///    size are empty, and a copy that lands among the old ones only lengthens a run,
    ///    with the same value as its original.
    /// 2. The program is told the new size: every key has a slot it finds.
    /// 3. Each slot whose key a lookup finds elsewhere (the originals that were copied)
    ///    is emptied by backward shift, which keeps every other entry where lookups find
    ///    it (a copy stays ahead of its original: shifts keep order).
    ///
    /// A copy with no free slot within [`PROBES`] would lose its entry at step 3: at a
    /// third full, linear probing refuses none in simulation ([`PROBES`]); counted in
    /// [`Flows4::take_lost`].
    fn grow(&mut self) {
        let new = self.conf.mask * 2 + 1;
        self.copy_for(new);
        self.publish(new);
        self.drop_originals();
    }

    /// Step 1 of [`Flows4::grow`] to `new + 1` slots.
    ///
    /// The entries are visited run by run, from an empty slot on: a run that wraps past the
    /// end (its last entries in the first slots) is copied in its order, so the copies of
    /// its head, which go to the end of the new size, take the slots there before the
    /// entries of its tail that wrap with them there look for theirs (and find themselves).
    fn copy_for(&mut self, new: u32) {
        let old = self.conf.mask;
        let Some(start) = (0..=old).find(|&i| self.entry(i).key.ifindex == 0) else {
            return; // never: at most two thirds full
        };
        for d in 0..=old {
            let i = (start + d) & old;
            let e = self.entry(i);
            if e.key.ifindex == 0 || self.find_in(&e.key, new).is_some() {
                continue;
            }
            let (key, value) = (e.key, e.value);
            let home = self.home(&key, new);
            let free = (0..PROBES)
                .map(|d| (home + d) & new)
                .find(|&at| self.entry(at).key.ifindex == 0);
            match free {
                Some(at) => {
                    self.write(at, &key, &value);
                    self.len += 1;
                }
                None => self.lost += 1,
            }
        }
    }

    /// Step 2: the size in use is `mask + 1`, for the program too.
    fn publish(&mut self, mask: u32) {
        self.conf.mask = mask;
        if !self.shared.is_null() {
            // SAFETY: `shared` is a valid Conf (`new`'s contract); the program reads `mask`
            // once per lookup, as a 32-bit load.
            let m = unsafe { &*std::ptr::addr_of!((*self.shared).mask).cast::<AtomicU32>() };
            m.store(mask, Ordering::Release);
        }
    }

    /// Step 3.
    fn drop_originals(&mut self) {
        let mut i = 0;
        while i <= self.conf.mask {
            let e = self.entry(i);
            if e.key.ifindex != 0 && self.find(&e.key) != Some(i) {
                // What moves into `i` is looked at again.
                self.remove_at(i);
            } else {
                i += 1;
            }
        }
    }

    /// Writes slot `i` under its seqlock.
    fn write(&mut self, i: u32, k: &Key4, v: &Value4) {
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
            seq.store(s.wrapping_add(2), Ordering::Release);
        }
    }

    /// Every entry's distance from its home: all below [`PROBES`].
    #[cfg(test)]
    fn displacements(&self) -> Vec<u32> {
        let mask = self.conf.mask;
        (0..=mask)
            .filter(|&i| self.entry(i).key.ifindex != 0)
            .map(|i| i.wrapping_sub(self.home(&self.entry(i).key, mask)) & mask)
            .collect()
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
            for e in &mem {
                prop_assert_eq!(e.seq.load(Ordering::Relaxed) % 2, 0);
            }
        }
    }

    proptest! {
        /// A table that grows while keys come and go agrees with a map, and at every step
        /// of a growth the program's lookup (at the size it was told) finds every key with
        /// its value: before the copies, after them at the old size and the new, and after
        /// the originals went.
        #[test]
        fn grows_without_losing_a_key(ops in proptest::collection::vec((0u8..4, 0u32..3000), 1..4000),
                                      seed in any::<u64>()) {
            let mut mem: Vec<Entry4> = (0..8192).map(|_| Entry4::default()).collect();
            let mut shared = Box::new(Conf::default());
            // SAFETY: 8192 zeroed entries and a Conf that outlive `t`.
            let mut t = unsafe { Flows4::new(mem.as_mut_ptr(), 8192, seed, &mut *shared) };
            prop_assert_eq!(t.slots(), (FIRST_SLOTS, 8192));
            let mut model = HashMap::new();
            let sees_all = |t: &Flows4, mask: u32, model: &HashMap<u32, u32>| {
                model.iter().all(|(&n, &v)| {
                    t.find_in(&key(n), mask).map(|i| t.entry(i).value.h.slot) == Some(v)
                })
            };
            for (i, (op, n)) in ops.into_iter().enumerate() {
                if op > 0 && t.one_more_needs_room() {
                    // The growth, step by step, as `insert` runs it.
                    let old = t.conf.mask;
                    let new = old * 2 + 1;
                    t.copy_for(new);
                    prop_assert!(sees_all(&t, old, &model), "after the copies, old size");
                    prop_assert!(sees_all(&t, new, &model), "after the copies, new size");
                    t.publish(new);
                    prop_assert_eq!(shared.mask, new);
                    t.drop_originals();
                    prop_assert!(sees_all(&t, new, &model), "after the originals went");
                    prop_assert_eq!(t.take_lost(), 0);
                }
                apply(&mut t, &mut model, op > 0, n, i as u32)?;
            }
            prop_assert!(sees_all(&t, shared.mask, &model));
            prop_assert!(t.displacements().iter().all(|&d| d < PROBES));
            // Nothing beyond the size in use.
            prop_assert!(mem[t.slots().0 as usize..].iter().all(|e| e.key.ifindex == 0));
            // Two thirds full at most (the last insert may be the one that fills it so).
            prop_assert!(t.len() * 3 <= t.slots().0 as usize * 2 || t.slots().0 == 8192);
        }
    }

    #[test]
    fn a_small_table_stays_small() {
        let mut mem: Vec<Entry4> = (0..(1 << 16)).map(|_| Entry4::default()).collect();
        // SAFETY: as above.
        let mut t = unsafe { Flows4::new(mem.as_mut_ptr(), 1 << 16, 3, std::ptr::null_mut()) };
        assert_eq!(t.slots(), (1024, 1 << 16));
        // Two thousand entries (a thousand flows): 4,096 slots, or 8,192 if an insert found
        // no room near its home; nothing refused.
        for n in 0..2000 {
            t.insert(&key(n), &value(n)).unwrap();
        }
        assert!(matches!(t.slots().0, 4096 | 8192), "{:?}", t.slots());
        // Up to two thirds of the whole: refused only once all of it is in use.
        let mut refused = Vec::new();
        for n in 2000..43_690 {
            if t.insert(&key(n), &value(n)).is_err() {
                assert_eq!(t.slots().0, 1 << 16, "refused before the table was whole");
                refused.push(n);
            }
        }
        assert!(refused.len() < 43_690 / 100, "{} refused", refused.len());
        for n in 0..43_690 {
            let want = (!refused.contains(&n)).then_some(n);
            assert_eq!(t.get(&key(n)).map(|v| v.h.slot), want);
        }
        assert_eq!(t.len(), 43_690 - refused.len());
        assert_eq!(t.take_lost(), 0);
    }

    #[test]
    fn a_crowded_neighbourhood_refuses_and_recovers() {
        let mut mem: Vec<Entry4> = (0..1024).map(|_| Entry4::default()).collect();
        // SAFETY: as above.
        let mut t = unsafe { Flows4::new(mem.as_mut_ptr(), 1024, 7, std::ptr::null_mut()) };
        // Keys with one home, found by search: the one beyond PROBES is refused.
        let p = PROBES as usize;
        let home = t.home(&key(0), 1023);
        let same: Vec<u32> = (0..1_000_000)
            .filter(|&n| t.home(&key(n), 1023) == home)
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
