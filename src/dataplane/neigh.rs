//! The neighbour cache (the kernel's `neigh_table` for ARP and ND, much simplified): which MAC
//! a next hop on a port has, shared by every worker, since an answer may arrive on another
//! worker's queue than the question left from.
//!
//! Owns the table and the decision when to ask again; the worker sends the questions and
//! holds the frames that wait. Clock-free: callers pass `now` in nanoseconds.
//!
//! XXX: entries never go stale (the kernel revalidates REACHABLE entries after
//! `base_reachable_time`, 30 s, and forgets unused ones): a host that changes its MAC
//! without announcing it is unreachable until it sends ARP or ND again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use super::wire::Mac;

/// How long to wait before asking again for an unanswered next hop (`retrans_time`, 1 s).
pub const RETRANS_NS: u64 = 1_000_000_000;
/// How many questions before the frames waiting for an answer are dropped
/// (`mcast_solicit`, 3).
pub const MAX_PROBES: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Asked at `asked`, `probes` questions so far.
    Incomplete {
        asked: u64,
        probes: u32,
    },
    Reachable(Mac),
}

/// What a worker should do about a next hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolve {
    /// Send to this MAC.
    Known(Mac),
    /// Unknown and nobody asked lately: ask now (and hold the frame).
    Ask,
    /// A question is out: hold the frame.
    Wait,
    /// Asked [`MAX_PROBES`] times without answer: drop (as the kernel's FAILED state).
    Failed,
}

#[derive(Debug, Default)]
pub struct Neighbours {
    table: RwLock<HashMap<(usize, IpAddr), State>>,
    /// Bumped whenever a known MAC appears or changes: workers keep a private copy of the
    /// entries they use and drop it when this moves, so the hot path reads one atomic that
    /// rarely changes instead of taking the lock.
    generation: AtomicU64,
}

impl Neighbours {
    /// The MAC of `hop` on `port`, or what to do while it is unknown.
    pub fn resolve(&self, port: usize, hop: IpAddr, now: u64) -> Resolve {
        if let Some(State::Reachable(m)) = self.table.read().get(&(port, hop)) {
            return Resolve::Known(*m);
        }
        let mut t = self.table.write();
        let e = t.entry((port, hop)).or_insert(State::Incomplete {
            asked: now,
            probes: 0,
        });
        match e {
            State::Reachable(m) => Resolve::Known(*m),
            State::Incomplete { probes: 0, asked } => {
                *e = State::Incomplete {
                    asked: *asked,
                    probes: 1,
                };
                Resolve::Ask
            }
            State::Incomplete { asked, probes } if now.saturating_sub(*asked) >= RETRANS_NS => {
                if *probes >= MAX_PROBES {
                    // Start over on the next frame, as a FAILED entry is retried.
                    t.remove(&(port, hop));
                    Resolve::Failed
                } else {
                    *asked = now;
                    *probes += 1;
                    Resolve::Ask
                }
            }
            State::Incomplete { .. } => Resolve::Wait,
        }
    }

    /// The MAC of `hop` on `port` if known.
    pub fn get(&self, port: usize, hop: IpAddr) -> Option<Mac> {
        match self.table.read().get(&(port, hop)) {
            Some(State::Reachable(m)) => Some(*m),
            _ => None,
        }
    }

    /// Records what an ARP or ND packet told us (`neigh_update`).
    pub fn learn(&self, port: usize, ip: IpAddr, mac: Mac) {
        if mac == [0; 6] || mac[0] & 1 != 0 {
            return;
        }
        let mut t = self.table.write();
        let old = t.insert((port, ip), State::Reachable(mac));
        if old != Some(State::Reachable(mac)) {
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// Changes when any known MAC appears or changes (see the field).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Every known entry, for `keepstate stats`.
    pub fn entries(&self) -> Vec<(usize, IpAddr, Mac)> {
        let mut v: Vec<_> = self
            .table
            .read()
            .iter()
            .filter_map(|(&(p, ip), s)| match s {
                State::Reachable(m) => Some((p, ip, *m)),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ask_wait_retry_fail_learn() {
        let n = Neighbours::default();
        let hop: IpAddr = "192.168.1.10".parse().unwrap();
        assert_eq!(n.resolve(0, hop, 0), Resolve::Ask);
        assert_eq!(n.resolve(0, hop, 10), Resolve::Wait);
        assert_eq!(n.resolve(0, hop, RETRANS_NS), Resolve::Ask);
        assert_eq!(n.resolve(0, hop, 2 * RETRANS_NS), Resolve::Ask);
        assert_eq!(n.resolve(0, hop, 3 * RETRANS_NS - 1), Resolve::Wait);
        assert_eq!(n.resolve(0, hop, 3 * RETRANS_NS), Resolve::Failed);
        assert_eq!(n.resolve(0, hop, 3 * RETRANS_NS + 1), Resolve::Ask);
        let g = n.generation();
        n.learn(0, hop, [2, 0, 0, 0, 0, 9]);
        assert_eq!(n.resolve(0, hop, 0), Resolve::Known([2, 0, 0, 0, 0, 9]));
        let g2 = n.generation();
        assert_ne!(g, g2);
        // Hearing the same again changes nothing; a new MAC does.
        n.learn(0, hop, [2, 0, 0, 0, 0, 9]);
        assert_eq!(n.generation(), g2);
        n.learn(0, hop, [2, 0, 0, 0, 0, 8]);
        assert_ne!(n.generation(), g2);
        // Per port; multicast and zero MACs are never learned.
        assert_eq!(n.get(1, hop), None);
        n.learn(1, hop, [1, 0, 0, 0, 0, 9]);
        n.learn(1, hop, [0; 6]);
        assert_eq!(n.get(1, hop), None);
        assert_eq!(n.entries().len(), 1);
    }
}
