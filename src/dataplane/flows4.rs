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
//! Owns the layout, the hash and the probing; one writer at a time (the caller's lock).

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

/// The table, over memory it does not own (the mmapped map, or a test's vector).
pub struct Flows4 {
    base: *mut Entry4,
    conf: Conf,
    /// Entries in use.
    len: usize,
}

// SAFETY: `base` points to memory that outlives the table (its owner keeps both together);
// the program only reads it, and this process writes it through `&mut self` only.
unsafe impl Send for Flows4 {}

impl Flows4 {
    /// A table over `conf.mask + 1` zeroed entries at `base`.
    ///
    /// # Safety
    /// `base` must point to that many entries, zeroed, valid for as long as the table lives,
    /// and written by nobody else.
    pub unsafe fn new(base: *mut Entry4, conf: Conf) -> Flows4 {
        Flows4 { base, conf, len: 0 }
    }

    /// Entries in use.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn entry(&self, i: u32) -> &Entry4 {
        // SAFETY: `i` is masked to the table (mask + 1 entries at `base`, by `new`'s contract).
        unsafe { &*self.base.add((i & self.conf.mask) as usize) }
    }

    fn home(&self, k: &Key4) -> u32 {
        hash(k, self.conf.seed) as u32 & self.conf.mask
    }

    /// The slot holding `k`.
    fn find(&self, k: &Key4) -> Option<u32> {
        let home = self.home(k);
        for i in 0..PROBES {
            let e = self.entry(home + i);
            if e.key.ifindex == 0 {
                return None;
            }
            if e.key == *k {
                return Some((home + i) & self.conf.mask);
            }
        }
        None
    }

    /// The value of `k`.
    pub fn get(&self, k: &Key4) -> Option<Value4> {
        self.find(k).map(|i| self.entry(i).value)
    }

    /// Writes `k` with `v`, in its slot if it has one, else in the first free one within
    /// [`PROBES`] of its home.
    pub fn insert(&mut self, k: &Key4, v: &Value4) -> Result<(), Full> {
        debug_assert!(k.ifindex != 0, "ifindex 0 marks an empty slot");
        let home = self.home(k);
        for i in 0..PROBES {
            let e = self.entry(home + i);
            if e.key.ifindex == 0 {
                self.len += 1;
            } else if e.key != *k {
                continue;
            }
            self.write(home + i, k, v);
            return Ok(());
        }
        Err(Full)
    }

    /// Removes `k`; the entries after it that may move closer to their home do.
    pub fn remove(&mut self, k: &Key4) -> bool {
        let Some(mut hole) = self.find(k) else {
            return false;
        };
        let mask = self.conf.mask;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let e = self.entry(j);
            if e.key.ifindex == 0 {
                break;
            }
            // It may move to the hole if the hole lies between its home and it.
            let home = self.home(&e.key);
            if j.wrapping_sub(home) & mask >= j.wrapping_sub(hole) & mask {
                let (key, value) = (e.key, e.value);
                self.write(hole, &key, &value);
                hole = j;
            }
        }
        self.write(hole, &Key4::default(), &Value4::default());
        self.len -= 1;
        true
    }

    /// Writes slot `i` under its seqlock.
    fn write(&mut self, i: u32, k: &Key4, v: &Value4) {
        // SAFETY: as in `entry`; this process is the only writer (`&mut self`).
        let e = unsafe { self.base.add((i & self.conf.mask) as usize) };
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
        (0..=self.conf.mask)
            .filter(|&i| self.entry(i).key.ifindex != 0)
            .map(|i| i.wrapping_sub(self.home(&self.entry(i).key)) & self.conf.mask)
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

    proptest! {
        /// Inserts and removals on a small table agree with a map: every key inserted (and
        /// not refused) is found with its latest value, every removed one is gone, and no
        /// entry lies farther than PROBES from its home.
        #[test]
        fn agrees_with_a_map(ops in proptest::collection::vec((any::<bool>(), 0u32..200), 1..600),
                             seed in any::<u64>()) {
            let mut mem: Vec<Entry4> = (0..256).map(|_| Entry4::default()).collect();
            let conf = Conf { seed, mask: 255, pad: 0 };
            // SAFETY: 256 zeroed entries that outlive `t`.
            let mut t = unsafe { Flows4::new(mem.as_mut_ptr(), conf) };
            let mut model = HashMap::new();
            for (i, (add, n)) in ops.into_iter().enumerate() {
                let k = key(n);
                if add {
                    if t.insert(&k, &value(i as u32)).is_ok() {
                        model.insert(n, i as u32);
                    } else {
                        prop_assert!(!model.contains_key(&n), "a present key is always rewritten");
                    }
                } else {
                    prop_assert_eq!(t.remove(&k), model.remove(&n).is_some());
                }
                prop_assert_eq!(t.len(), model.len());
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

    #[test]
    fn a_crowded_neighbourhood_refuses_and_recovers() {
        let mut mem: Vec<Entry4> = (0..1024).map(|_| Entry4::default()).collect();
        let conf = Conf {
            seed: 7,
            mask: 1023,
            pad: 0,
        };
        // SAFETY: as above.
        let mut t = unsafe { Flows4::new(mem.as_mut_ptr(), conf) };
        // Keys with one home, found by search: the one beyond PROBES is refused.
        let p = PROBES as usize;
        let home = t.home(&key(0));
        let same: Vec<u32> = (0..1_000_000)
            .filter(|&n| t.home(&key(n)) == home)
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
