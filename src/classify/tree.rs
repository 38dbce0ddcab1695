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
    LimitSpec, Limiter, PacketKey, TreeOptions,
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

/// Tree code layout. A tree is one `Vec<u32>` (cache lines hold whole small nodes); a node is
/// named by its offset. Children are emitted before parents, so offsets only point backwards.
///
/// A cut: `[header, absent, bounds of children 1..n, child offsets 0..n]`; the header holds the
/// field (bits 0-4), [`WIDE`] when bounds take four words (fields over 32 bits; otherwise one,
/// padded to [`narrow_slots`]), and `n` (bits 8-30). A packet goes to child `i`, the number of bounds at or below its value,
/// or to `absent` when it lacks the field.
///
/// A leaf: `[LEAF | n, items...]`, the candidate entries in order. An item is the offset of its
/// entry's check blob, with [`CERTAIN`] set when the leaf's box proves every condition. A blob
/// (one per entry, at the start of the code) is `[entry, words, field mask, negation mask (its
/// top byte: the number of ranges), (lo, hi) per field of the mask, checks...]`: ranges on fields of 32 bits or less first (the
/// common case, checked without dispatch), then everything else as checks. A check is
/// `[kind, ...]`: the kind word holds the field (bits 0-4), [`CHECK_NEG`] and the kind (bits
/// 6-7): [`CHECK_RANGE32`] `lo hi`, [`CHECK_RANGE128`] `lo hi` as four words each, or
/// [`CHECK_COND`] an index into [`Program::conds`].
pub(crate) const LEAF: u32 = 1 << 31;
pub(crate) const CERTAIN: u32 = 1 << 31;
pub(crate) const WIDE: u32 = 1 << 5;
pub(crate) const CHECK_NEG: u32 = 1 << 5;
pub(crate) const CHECK_RANGE32: u32 = 0;
pub(crate) const CHECK_RANGE128: u32 = 1;
pub(crate) const CHECK_COND: u32 = 2;

/// Words the bounds of a narrow cut with `n` children take: `n - 1` rounded up to a multiple
/// of 8, padded with `u32::MAX`, so that counting runs on whole vector blocks.
#[inline]
pub(crate) fn narrow_slots(n: usize) -> usize {
    (n.saturating_sub(1) + 7) & !7
}

/// How many of `bounds` (a multiple of 8 long) are at or below `v`, by independent compares
/// that the compiler vectorises: a binary search would chain one dependent load per step.
/// Padding (`u32::MAX`) counts only when `v` is `u32::MAX`; callers clamp.
#[inline]
pub(crate) fn count_le(bounds: &[u32], v: u32) -> usize {
    // The common case, one fixed-size block, compiles to two vector compares.
    if let Ok(block) = <&[u32; 8]>::try_from(bounds) {
        return count8(block, v) as usize;
    }
    // Wider nodes: accumulate lane-wise and sum once at the end.
    let mut acc = [0u32; 8];
    for chunk in bounds.chunks_exact(8) {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += (x <= v) as u32;
        }
    }
    acc.iter().sum::<u32>() as usize
}

#[inline]
fn count8(block: &[u32; 8], v: u32) -> u32 {
    let mut acc = [0u32; 8];
    for (a, &x) in acc.iter_mut().zip(block) {
        *a = (x <= v) as u32;
    }
    acc.iter().sum()
}

/// Reads the `i`th u128 stored as four little-endian words.
#[inline]
pub(crate) fn read128(w: &[u32], i: usize) -> u128 {
    let q = &w[4 * i..4 * i + 4];
    u128::from(q[0]) | u128::from(q[1]) << 32 | u128::from(q[2]) << 64 | u128::from(q[3]) << 96
}

/// Appends `v` as four little-endian words.
pub(crate) fn push128(code: &mut Vec<u32>, v: u128) {
    for k in 0..4 {
        code.push((v >> (32 * k)) as u32);
    }
}

/// One flattened program and its decision tree.
#[derive(Debug, Default)]
pub(crate) struct Program {
    pub entries: Vec<Entry>,
    pub ops: Vec<Op>,
    pub conds: Vec<Cond>,
    pub code: Vec<u32>,
    /// One tree, or a few over disjoint groups of entries; the first match is the least
    /// entry any of them finds.
    pub roots: Vec<u32>,
}

/// Most trees per program the executor supports ([`TreeOptions::max_trees`] is clamped).
pub(crate) const MAX_TREES: usize = 4;

impl Program {
    /// The offset of the leaf of the tree at `root` whose box holds `key`.
    #[inline]
    pub(crate) fn leaf(&self, root: u32, key: &PacketKey) -> usize {
        let code = &self.code[..];
        let mut o = root as usize;
        loop {
            let h = code[o];
            if h & LEAF != 0 {
                return o;
            }
            let n = (h >> 8) as usize;
            let f = (h & 31) as usize;
            o = if key.present_mask() >> f & 1 == 0 {
                code[o + 1] as usize
            } else if h & WIDE == 0 {
                // Narrow fields are read straight from their slot, already truncated to width.
                let v = key.narrow[f];
                let b = o + 2;
                let padded = narrow_slots(n);
                // Counting, not searching: the compares are independent, while a search would
                // chain one dependent load per step (measured slower on these node sizes).
                let i = count_le(&code[b..b + padded], v).min(n - 1);
                code[b + padded + i] as usize
            } else {
                match key.get_index(f) {
                    None => code[o + 1] as usize,
                    Some(v) => {
                        let b = o + 2;
                        let bounds = &code[b..b + 4 * (n - 1)];
                        let (mut lo, mut hi) = (0, n - 1);
                        while lo < hi {
                            let mid = (lo + hi) / 2;
                            if read128(bounds, mid) <= v {
                                lo = mid + 1;
                            } else {
                                hi = mid;
                            }
                        }
                        code[b + 4 * (n - 1) + lo] as usize
                    }
                }
            };
        }
    }

    /// The first entry of the leaf at `leaf`, at index `from` or later and below `below`,
    /// whose checks hold.
    #[inline]
    pub(crate) fn scan(&self, leaf: usize, key: &PacketKey, from: u32, below: u32) -> Option<u32> {
        let code = &self.code[..];
        let n = (code[leaf] & !LEAF) as usize;
        for &item in &code[leaf + 1..leaf + 1 + n] {
            let b = (item & !CERTAIN) as usize;
            let entry = code[b];
            if entry < from {
                continue;
            }
            if entry >= below {
                return None;
            }
            if item & CERTAIN != 0
                || self.blob_holds(&code[b + 2..b + 2 + code[b + 1] as usize], key)
            {
                return Some(entry);
            }
        }
        None
    }

    /// The leaf of each tree for `key`.
    #[inline]
    pub(crate) fn find_leaves(&self, key: &PacketKey, leaves: &mut [usize; MAX_TREES]) {
        for (slot, &root) in leaves.iter_mut().zip(&self.roots) {
            *slot = self.leaf(root, key);
        }
    }

    /// The first entry at `from` or later whose checks hold, over every tree's leaf.
    #[inline]
    pub(crate) fn first(
        &self,
        leaves: &[usize; MAX_TREES],
        key: &PacketKey,
        from: u32,
    ) -> Option<u32> {
        let mut best = None;
        let mut below = u32::MAX;
        for &leaf in &leaves[..self.roots.len()] {
            if let Some(e) = self.scan(leaf, key, from, below) {
                best = Some(e);
                below = e;
            }
        }
        best
    }

    /// Checks a blob's body: `[field mask, negation mask, lo hi pairs..., other checks...]`.
    #[inline]
    fn blob_holds(&self, blob: &[u32], key: &PacketKey) -> bool {
        let [mask, neg, rest @ ..] = blob else {
            return false;
        };
        // Every test of an absent field fails, negated or not.
        if key.present_mask() & mask != *mask {
            return false;
        }
        // The negation word's top byte counts the ranges (the fields use bits 0-23).
        let nranges = (neg >> 24) as usize;
        let Some((ranges, others)) = rest.split_at_checked(2 * nranges) else {
            return false;
        };
        let mut m = *mask;
        for pair in ranges.chunks_exact(2) {
            let f = m.trailing_zeros() & 31;
            m &= m.wrapping_sub(1);
            let v = key.narrow[f as usize];
            let inside = pair[0] <= v && v <= pair[1];
            if inside == (neg >> f & 1 != 0) {
                return false;
            }
        }
        others.is_empty() || self.checks_hold(others, key)
    }

    #[inline]
    fn checks_hold(&self, mut w: &[u32], key: &PacketKey) -> bool {
        while let Some(&h) = w.first() {
            let field = key.get_index((h & 31) as usize);
            let neg = h & CHECK_NEG != 0;
            let (ok, len) = match h >> 6 {
                CHECK_RANGE32 => match field {
                    Some(v) => ((u128::from(w[1]) <= v && v <= u128::from(w[2])) != neg, 3),
                    None => (false, 3),
                },
                CHECK_RANGE128 => match field {
                    Some(v) => (
                        (read128(&w[1..], 0) <= v && v <= read128(&w[5..], 0)) != neg,
                        9,
                    ),
                    None => (false, 9),
                },
                _ => (self.conds[w[1] as usize].eval(key), 2),
            };
            if !ok {
                return false;
            }
            w = &w[len..];
        }
        true
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
            + self.code.capacity() * size_of::<u32>()
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
        Self::with_options(rs, &TreeOptions::default())
    }

    /// Compiles with non-default tree parameters (tests force partitioning with these).
    pub fn with_options(rs: Arc<Ruleset>, opts: &TreeOptions) -> Result<Self, BuildError> {
        let mut opts = *opts;
        opts.max_trees = opts.max_trees.clamp(1, MAX_TREES);
        opts.binth = opts.binth.max(1);
        opts.max_kids = opts.max_kids.max(2);
        let (hooks, stats) = super::build::compile(&rs, &opts)?;
        Ok(Tree { rs, hooks, stats })
    }

    /// Size, shape and build time of the compiled tree.
    pub fn stats(&self) -> &BuildStats {
        &self.stats
    }

    /// Runs one base chain from its first program; returns its decision and whether the
    /// policy made it. Once a mark changes, the current key lives in `scratch` (`modified`).
    #[inline]
    fn run_base(
        &self,
        bp: &BaseProgram,
        key: &PacketKey,
        scratch: &mut Option<Box<PacketKey>>,
        modified: &mut bool,
        limiter: &mut dyn Limiter,
        out: &mut Evaluation,
    ) -> (Decision, bool) {
        let Some(mut prog) = bp.programs.first() else {
            return (bp.policy, true);
        };
        let mut leaves = [0usize; MAX_TREES];
        prog.find_leaves(cur(key, scratch, *modified), &mut leaves);
        let mut from = 0u32;
        loop {
            let Some(i) = prog.first(&leaves, cur(key, scratch, *modified), from) else {
                return (bp.policy, true);
            };
            let e = &prog.entries[i as usize];
            if e.report {
                out.rules.push(e.rule);
            }
            let mut broke = None;
            if e.ops_len > 0 {
                let ops = &prog.ops[e.ops_start as usize..(e.ops_start + e.ops_len) as usize];
                broke = run_ops(e.rule, ops, key, scratch, modified, limiter, out);
            }
            // The leaves stay valid while the program does: a mark change that some rule tests
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
                    prog.find_leaves(cur(key, scratch, *modified), &mut leaves);
                    0
                }
            };
        }
    }
}

/// The current key: the caller's, or the scratch copy once a mark changed.
#[inline]
fn cur<'a>(
    key: &'a PacketKey,
    scratch: &'a Option<Box<PacketKey>>,
    modified: bool,
) -> &'a PacketKey {
    match scratch {
        Some(k) if modified => k,
        _ => key,
    }
}

/// Runs an entry's statements; returns where to go on when one breaks the rule.
fn run_ops(
    rule: RuleId,
    ops: &[Op],
    key: &PacketKey,
    scratch: &mut Option<Box<PacketKey>>,
    modified: &mut bool,
    limiter: &mut dyn Limiter,
    out: &mut Evaluation,
) -> Option<u32> {
    for op in ops {
        let (stmt, value, fail, meta) = match *op {
            Op::Record(stmt) => {
                out.actions.push(Action { rule, stmt });
                continue;
            }
            Op::Limit { stmt, spec, fail } => {
                if !limiter.pass(rule, stmt as usize, &spec) {
                    return Some(fail);
                }
                continue;
            }
            Op::MetaMark { stmt, value, fail } => (stmt, value, fail, true),
            Op::CtMark { stmt, value, fail } => (stmt, value, fail, false),
        };
        // First change in this lookup: copy the caller's key into the reusable buffer.
        if !*modified {
            match scratch {
                Some(k) => **k = *key,
                None => *scratch = Some(Box::new(*key)),
            }
            *modified = true;
        }
        let Some(cur) = scratch.as_deref_mut() else {
            return Some(fail);
        };
        let Some(m) = resolve_mark(value, cur) else {
            return Some(fail);
        };
        out.actions.push(Action { rule, stmt });
        if meta {
            cur.set(Field::Mark, m as u128);
            out.meta_mark = Some(m);
        } else if cur.get(Field::CtMark).is_some() {
            cur.set(Field::CtMark, m as u128);
            out.ct_mark = Some(m);
        }
    }
    None
}

impl Classifier for Tree {
    fn eval(&self, hook: Hook, key: &PacketKey, limiter: &mut dyn Limiter, out: &mut Evaluation) {
        out.reset();
        // The buffer moves out for the lookup so that `out` can be borrowed alongside it.
        let mut scratch = out.scratch.0.take();
        let mut modified = false;
        for bp in &self.hooks[hook_index(hook)] {
            let (decision, by_policy) =
                self.run_base(bp, key, &mut scratch, &mut modified, limiter, out);
            out.end_chain(bp.table, bp.chain, decision, by_policy);
            if decision != Decision::Accept {
                break;
            }
        }
        out.scratch.0 = scratch;
    }

    fn ruleset(&self) -> &Ruleset {
        &self.rs
    }
}
