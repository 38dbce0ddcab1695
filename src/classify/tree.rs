//! The compiled classifier's data and its hot path: descend a decision tree to a leaf, scan
//! the leaf's short list of flattened rule entries, run the first that holds, repeat from
//! where its exit says.
//!
//! Owns lookup and the executor only; how programs and trees are made is [`super::build`].
//! No allocation here beyond the caller's reusable [`Evaluation`].
//!
//! A base chain compiles to one or more *programs*. A program is the base chain with every
//! chain it jumps or goes to inlined: a flat list of entries, each a conjunction of conditions
//! (the jumping rules' matches, the rule's own, a vmap element), the non-terminal statements to
//! run, and an exit (next entry, skip forward, accept, drop, reject, or resume in another
//! program). A `limit` that says no skips forward to the end of its rule. `meta mark set` on a
//! mark that some rule tests (likewise `ct mark set`) ends the program and resumes in a
//! *continuation* program, compiled for "the rest of this rule, then the rest of each chain on
//! the jump stack", whose tree is looked up with the updated key: the prefix conditions of the
//! first program were evaluated on the old mark and must not be evaluated again on the new one.

use std::sync::Arc;

use super::{
    hook_index, resolve_mark, Action, BuildError, BuildStats, Classifier, Decision, Evaluation,
    LimitSpec, Limiter, PacketKey,
};
use crate::rules::ir::{Field, Hook, Interval, IntervalSet, MarkValue, Reject, RuleId, Ruleset};

/// One test of a flattened entry; [`super::build`] lowers [`crate::rules::ir::Match`] to these.
/// Field numbers are [`super::field_index`] slots.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Cond {
    /// `lo <= v <= hi` (or not).
    Range {
        f: u8,
        neg: bool,
        lo: u128,
        hi: u128,
    },
    Set {
        f: u8,
        neg: bool,
        set: Arc<IntervalSet>,
    },
    Masked {
        f: u8,
        neg: bool,
        mask: u128,
        value: u128,
    },
    Concat {
        fs: Box<[u8]>,
        neg: bool,
        elems: Arc<Vec<Vec<Interval>>>,
    },
}

impl Cond {
    /// Evaluates the test; a test of an absent field fails, negated or not.
    #[inline]
    pub(crate) fn eval(&self, key: &PacketKey) -> bool {
        match self {
            Cond::Range { f, neg, lo, hi } => match key.get_index(*f as usize) {
                Some(v) => (*lo <= v && v <= *hi) != *neg,
                None => false,
            },
            Cond::Set { f, neg, set } => match key.get_index(*f as usize) {
                Some(v) => set.contains(v) != *neg,
                None => false,
            },
            Cond::Masked {
                f,
                neg,
                mask,
                value,
            } => match key.get_index(*f as usize) {
                Some(v) => ((v & mask) == *value) != *neg,
                None => false,
            },
            Cond::Concat { fs, neg, elems } => {
                let mut vals = [0u128; super::NFIELDS];
                for (slot, f) in vals.iter_mut().zip(fs.iter()) {
                    match key.get_index(*f as usize) {
                        Some(v) => *slot = v,
                        None => return false,
                    }
                }
                let hit = elems
                    .iter()
                    .any(|e| e.iter().zip(&vals).all(|(iv, v)| iv.contains(*v)));
                hit != *neg
            }
        }
    }
}

/// A statement an entry runs once its conditions hold. `fail` is the entry index to go on
/// from when the statement breaks the rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// Counter, log, `ct helper set`, `notrack`, NAT: recorded for the engine.
    Record(u16),
    Limit {
        stmt: u16,
        spec: LimitSpec,
        fail: u32,
    },
    MetaMark {
        stmt: u16,
        value: MarkValue,
        fail: u32,
    },
    CtMark {
        stmt: u16,
        value: MarkValue,
        fail: u32,
    },
}

/// Where evaluation goes after an entry ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    Next,
    /// Go on from this entry index (a `return`, the end of a `goto`'s chain).
    Skip(u32),
    Accept,
    Drop,
    Reject(Reject),
    /// Go on from the start of this program of the same base chain, with the updated key.
    Resume(u32),
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub rule: RuleId,
    /// True for the entry that stands for "the rule's matches held"; vmap branches, `goto`
    /// trampolines and continuations of a rule do not report it again.
    pub report: bool,
    pub ops_start: u32,
    pub ops_len: u32,
    pub exit: Exit,
}

/// A tree node. A cut sends a packet to `kids[start + i]` where `i` is the number of
/// `bounds[start + 1 .. start + len]` at or below the field's value, or to `absent` when the
/// packet lacks the field. A leaf lists `items[start .. start + len]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Node {
    pub field: u8,
    pub leaf: bool,
    pub start: u32,
    pub len: u32,
    pub absent: u32,
}

/// A candidate entry of a leaf and the conditions the leaf's box does not already prove.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct LeafItem {
    pub entry: u32,
    pub rstart: u32,
    pub rlen: u32,
}

/// One flattened program and its decision tree.
#[derive(Debug, Default)]
pub(crate) struct Program {
    pub entries: Vec<Entry>,
    pub ops: Vec<Op>,
    pub conds: Vec<Cond>,
    pub nodes: Vec<Node>,
    pub bounds: Vec<u128>,
    pub kids: Vec<u32>,
    pub items: Vec<LeafItem>,
    pub resid: Vec<u32>,
    pub root: u32,
}

impl Program {
    /// The leaf whose box holds `key`.
    #[inline]
    pub(crate) fn leaf(&self, key: &PacketKey) -> Node {
        let mut n = self.nodes[self.root as usize];
        while !n.leaf {
            let next = match key.get_index(n.field as usize) {
                None => n.absent,
                Some(v) => {
                    let s = n.start as usize;
                    let e = s + n.len as usize;
                    let i = self.bounds[s + 1..e].partition_point(|&b| b <= v);
                    self.kids[s + i]
                }
            };
            n = self.nodes[next as usize];
        }
        n
    }

    /// The first entry of `leaf` at index `from` or later whose conditions hold.
    #[inline]
    pub(crate) fn scan(&self, leaf: Node, key: &PacketKey, from: u32) -> Option<u32> {
        let s = leaf.start as usize;
        let items = &self.items[s..s + leaf.len as usize];
        for it in items {
            if it.entry < from {
                continue;
            }
            let rs = it.rstart as usize;
            let resid = &self.resid[rs..rs + it.rlen as usize];
            if resid.iter().all(|&c| self.conds[c as usize].eval(key)) {
                return Some(it.entry);
            }
        }
        None
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        let conds: usize = self
            .conds
            .iter()
            .map(|c| match c {
                Cond::Concat { fs, .. } => fs.len(),
                _ => 0,
            })
            .sum();
        self.entries.capacity() * size_of::<Entry>()
            + self.ops.capacity() * size_of::<Op>()
            + self.conds.capacity() * size_of::<Cond>()
            + conds
            + self.nodes.capacity() * size_of::<Node>()
            + self.bounds.capacity() * size_of::<u128>()
            + self.kids.capacity() * size_of::<u32>()
            + self.items.capacity() * size_of::<LeafItem>()
            + self.resid.capacity() * size_of::<u32>()
    }
}

/// A base chain: its position, its policy, and its programs (`programs[0]` is where it starts).
#[derive(Debug)]
pub(crate) struct BaseProgram {
    pub table: usize,
    pub chain: usize,
    pub policy: Decision,
    pub programs: Vec<Program>,
}

/// The compiled classifier: a decision tree per base chain program.
pub struct Tree {
    rs: Arc<Ruleset>,
    hooks: [Vec<BaseProgram>; 5],
    stats: BuildStats,
}

impl Tree {
    /// Compiles every base chain of `rs`.
    pub fn new(rs: Arc<Ruleset>) -> Result<Self, BuildError> {
        let (hooks, stats) = super::build::compile(&rs)?;
        Ok(Tree { rs, hooks, stats })
    }

    /// Size, shape and build time of the compiled tree.
    pub fn stats(&self) -> &BuildStats {
        &self.stats
    }

    /// Runs one base chain from its first program; returns its decision and whether the
    /// policy made it.
    #[inline]
    fn run_base(
        &self,
        bp: &BaseProgram,
        limiter: &mut dyn Limiter,
        out: &mut Evaluation,
    ) -> (Decision, bool) {
        let Some(mut prog) = bp.programs.first() else {
            return (bp.policy, true);
        };
        let mut leaf = prog.leaf(&out.key);
        let mut from = 0u32;
        loop {
            let Some(i) = prog.scan(leaf, &out.key, from) else {
                return (bp.policy, true);
            };
            let e = prog.entries[i as usize];
            if e.report {
                out.rules.push(e.rule);
            }
            let ops = &prog.ops[e.ops_start as usize..(e.ops_start + e.ops_len) as usize];
            let mut broke = None;
            for op in ops {
                match *op {
                    Op::Record(stmt) => out.actions.push(Action { rule: e.rule, stmt }),
                    Op::Limit { stmt, spec, fail } => {
                        if !limiter.pass(e.rule, stmt as usize, &spec) {
                            broke = Some(fail);
                            break;
                        }
                    }
                    Op::MetaMark { stmt, value, fail } => match resolve_mark(value, &out.key) {
                        Some(m) => {
                            out.actions.push(Action { rule: e.rule, stmt });
                            out.key.set(Field::Mark, m as u128);
                        }
                        None => {
                            broke = Some(fail);
                            break;
                        }
                    },
                    Op::CtMark { stmt, value, fail } => match resolve_mark(value, &out.key) {
                        Some(m) => {
                            out.actions.push(Action { rule: e.rule, stmt });
                            if out.key.get(Field::CtMark).is_some() {
                                out.key.set(Field::CtMark, m as u128);
                            }
                        }
                        None => {
                            broke = Some(fail);
                            break;
                        }
                    },
                }
            }
            // The leaf stays valid while the program does: a mark change that some rule tests
            // always ends the program (Exit::Resume), and one that no rule tests cannot change
            // which leaf the key falls in.
            from = match (broke, e.exit) {
                (Some(fail), _) => fail,
                (None, Exit::Next) => i + 1,
                (None, Exit::Skip(t)) => t,
                (None, Exit::Accept) => return (Decision::Accept, false),
                (None, Exit::Drop) => return (Decision::Drop, false),
                (None, Exit::Reject(r)) => return (Decision::Reject(r), false),
                (None, Exit::Resume(p)) => {
                    let Some(next) = bp.programs.get(p as usize) else {
                        return (bp.policy, true);
                    };
                    prog = next;
                    leaf = prog.leaf(&out.key);
                    0
                }
            };
        }
    }
}

impl Classifier for Tree {
    fn eval(&self, hook: Hook, key: &PacketKey, limiter: &mut dyn Limiter, out: &mut Evaluation) {
        out.reset(key);
        for bp in &self.hooks[hook_index(hook)] {
            let (decision, by_policy) = self.run_base(bp, limiter, out);
            out.end_chain(bp.table, bp.chain, decision, by_policy);
            if decision != Decision::Accept {
                break;
            }
        }
    }

    fn ruleset(&self) -> &Ruleset {
        &self.rs
    }
}
