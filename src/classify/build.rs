//! Programs → decision trees. Owns the tree construction from the entry lists
//! [`super::flatten`] makes (and the compile driver that runs both); not the lookup.
//!
//! # The tree
//!
//! A multi-way cut tree over elementary intervals, in the HyperSplit/HiCuts family. At a node
//! holding entries `S` inside a box (a range per field, and which fields are known present):
//!
//! 1. each entry's conditions are checked against the box: an entry with a condition no packet
//!    of the box can satisfy is dropped; an entry proven to match the whole box that surely ends
//!    evaluation (accept, drop, reject, or resume, with no limit before, and no earlier entry
//!    able to skip past it) shadows every later entry, which is dropped (HiCuts' redundancy
//!    removal);
//! 2. with at most [`TreeOptions::binth`] entries left, the node is a leaf: lookups check those
//!    few entries' conditions directly (a leaf item marks an entry the box fully proves);
//! 3. otherwise, for every field some entry tests, the entries' projections on it give the
//!    elementary intervals; cut points are placed where the weighted interval count is evenly
//!    split, with as many children as the space factor ([`TreeOptions::spfac`]) allows; the
//!    field whose largest child is smallest wins. Packets lacking the field go to a separate
//!    child that keeps only the entries not testing it (every test of an absent field fails).
//!
//! Identical leaves and identical nodes are shared through hashing (hash-consing, bottom up).
//! When a single tree would exceed [`TreeOptions::partition_above`] bytes (or the item budget),
//! the entries are split into up to four groups by the wide fields they wildcard and a tree is
//! built per group (EffiCuts' separable trees); a lookup then takes the least entry any tree
//! finds.
//!
//! # Why this shape (measured on the ClassBench sets, `benches/classify.rs`)
//!
//! - Equal-size cuts (HiCuts) waste children on the empty parts of 32- and 128-bit fields;
//!   cuts at elementary-interval boundaries chosen by weight adapt to any field width.
//! - Lookups are bound by dependent memory loads, so depth matters most: multi-way nodes give
//!   depth 4-7 where binary HyperSplit gives 10-20, and narrow nodes are searched by counting
//!   (independent vector compares) rather than binary search (a chain of loads).
//! - The check list of an entry is stored once ("blob") and leaves point at it: copying checks
//!   into every leaf made fw1_1k's tree 3.2 MiB; sharing them, 0.9 MiB and faster.
//! - Separable trees cut fw1_1k to 0.1 MiB but cost a descent per tree, which was slower
//!   (5.5 against 9 M lookups/s), so they are only the fallback for sets that would not fit.
//! - binth 12, spfac 8, 64 children: of the settings tried (binth 4-32, spfac 4-16, 64-1024
//!   children), the best on fw1_1k (the wildcard-heavy set) without costing the others.
//! - Masked and negated matches are projected onto their field where that is exact (8-bit
//!   fields are enumerated; prefix masks are intervals) and otherwise checked at the leaf.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::flatten::{FlatExit, FlatOp, FlatProgram, Flattener, Label};
use super::tree::{
    narrow_slots, push128, BaseProgram, Cond, Entry, Exit, Op, Program, CERTAIN, CHECK_COND,
    CHECK_NEG, CHECK_RANGE128, CHECK_RANGE32, LEAF, WIDE,
};
use super::{field_index, validate, BuildError, Decision, NFIELDS};
use crate::rules::ir::{Interval, IntervalSet, Policy, Ruleset, Stmt};

/// How trees are built. The defaults were chosen on the ClassBench sets (`benches/classify.rs`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TreeOptions {
    /// A node with at most this many entries is a leaf.
    pub binth: usize,
    /// Children plus replicated entries of a cut may reach `spfac` × the node's entries
    /// (HiCuts' space factor).
    pub spfac: usize,
    /// Most children of one cut.
    pub max_kids: usize,
    /// Most trees per program (EffiCuts' separable trees); 1 never partitions.
    pub max_trees: usize,
    /// Partition when one tree's code would exceed this many bytes (or the item budget). A
    /// forest is far smaller on wildcard-heavy sets (fw1_1k: 0.1 MiB against 0.9 MiB) but costs
    /// a descent per tree, so a tree that fits in cache is faster.
    pub partition_above: usize,
}

impl Default for TreeOptions {
    fn default() -> Self {
        TreeOptions {
            binth: 12,
            spfac: 8,
            max_kids: 64,
            max_trees: 4,
            partition_above: 16 << 20,
        }
    }
}

/// Deeper nodes are leaves whatever their size.
const MAX_DEPTH: usize = 40;
/// Leaf items over all trees (each 8 bytes plus its checks, 8 to 40 bytes each).
const MAX_ITEMS: usize = 1 << 22;

/// What building cost and produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildStats {
    pub build_time: Duration,
    /// Base chains compiled, over all hooks.
    pub base_chains: usize,
    /// Programs (base chains plus continuations after a mark change).
    pub programs: usize,
    /// Trees over all programs (a program has one, or a few when partitioned).
    pub trees: usize,
    /// Flattened entries over all programs.
    pub entries: usize,
    /// Tree nodes (cuts and leaves), after sharing.
    pub nodes: usize,
    pub leaves: usize,
    /// Candidate entries over all leaves.
    pub leaf_items: usize,
    /// The longest root-to-leaf path, in cuts.
    pub max_depth: usize,
    /// The largest leaf.
    pub max_leaf: usize,
    /// Heap bytes of the compiled structures.
    pub bytes: usize,
}

pub(crate) type Hooks = [Vec<BaseProgram>; 5];

/// Compiles every base chain of every hook.
pub(crate) fn compile(rs: &Ruleset, opts: &TreeOptions) -> Result<(Hooks, BuildStats), BuildError> {
    let started = Instant::now();
    validate(rs)?;
    let mut stats = BuildStats::default();
    // A mark change needs a continuation program only if some rule tests that mark.
    let mut tested = [false; NFIELDS];
    for rule in rs.rules() {
        for m in &rule.matches {
            for f in m.fields() {
                tested[field_index(f)] = true;
            }
        }
        for s in &rule.stmts {
            if let Stmt::Vmap { fields, .. } = s {
                for f in fields {
                    tested[field_index(*f)] = true;
                }
            }
        }
    }
    let mut budget = Budget::default();
    let mut hooks: Hooks = Default::default();
    for (hi, hook) in super::HOOKS.iter().enumerate() {
        for (t, c) in rs.base_chains(*hook) {
            let table = &rs.tables[t];
            let Some(base) = table.chains[c].base else {
                continue;
            };
            let flat = Flattener::run(table, c, &tested, &mut budget)?;
            let mut programs = Vec::with_capacity(flat.len());
            for fp in flat {
                programs.push(build_program(fp, opts, &mut budget, &mut stats)?);
            }
            stats.base_chains += 1;
            stats.programs += programs.len();
            hooks[hi].push(BaseProgram {
                table: t,
                chain: c,
                policy: match base.policy {
                    Policy::Accept => Decision::Accept,
                    Policy::Drop => Decision::Drop,
                },
                programs,
            });
        }
    }
    stats.entries = budget.entries;
    stats.bytes = hooks
        .iter()
        .flatten()
        .flat_map(|bp| bp.programs.iter())
        .map(Program::heap_bytes)
        .sum();
    stats.build_time = started.elapsed();
    Ok((hooks, stats))
}

#[derive(Default)]
pub(crate) struct Budget {
    pub entries: usize,
    pub items: usize,
}

// ---------------------------------------------------------------------------------------------
// Programs and trees
// ---------------------------------------------------------------------------------------------

/// What the tree builder knows about one entry.
struct EntryInfo {
    conds: Vec<u32>,
    /// Projection of the entry's conditions onto each field it tests (a superset of the values
    /// for which they can hold), sorted and disjoint.
    proj: Vec<(u8, Vec<Interval>)>,
    /// Matching this entry surely ends the program (accept, drop, reject, resume) unless a
    /// statement breaks the rule first.
    stops: bool,
    /// No earlier entry can skip past this one, so a match here really shadows later entries.
    safe: bool,
}

fn build_program(
    fp: FlatProgram,
    opts: &TreeOptions,
    budget: &mut Budget,
    stats: &mut BuildStats,
) -> Result<Program, BuildError> {
    let FlatProgram { entries, labels } = fp;
    let res = |l: Label| labels.get(l as usize).copied().unwrap_or(u32::MAX);
    let mut prog = Program::default();
    let mut interned: HashMap<Cond, u32> = HashMap::new();
    let mut infos = Vec::with_capacity(entries.len());
    let mut max_skip = 0u32;
    for (i, fe) in entries.into_iter().enumerate() {
        let i = i as u32;
        let ops_start = prog.ops.len() as u32;
        let mut can_break = false;
        let mut skip_to = i + 1;
        for op in &fe.ops {
            prog.ops.push(match *op {
                FlatOp::Record(s) => Op::Record(s),
                FlatOp::Limit(stmt, spec, l) => {
                    can_break = true;
                    skip_to = skip_to.max(res(l));
                    Op::Limit {
                        stmt,
                        spec,
                        fail: res(l),
                    }
                }
                FlatOp::MetaMark(stmt, value, l) => {
                    can_break |= !matches!(value, crate::rules::ir::MarkValue::Const(_));
                    skip_to = skip_to.max(res(l));
                    Op::MetaMark {
                        stmt,
                        value,
                        fail: res(l),
                    }
                }
                FlatOp::CtMark(stmt, value, l) => {
                    can_break |= !matches!(value, crate::rules::ir::MarkValue::Const(_));
                    skip_to = skip_to.max(res(l));
                    Op::CtMark {
                        stmt,
                        value,
                        fail: res(l),
                    }
                }
            });
        }
        let exit = match fe.exit {
            FlatExit::Next => Exit::Next,
            FlatExit::Skip(l) => {
                skip_to = skip_to.max(res(l));
                Exit::Skip(res(l))
            }
            FlatExit::Accept => Exit::Accept,
            FlatExit::Drop => Exit::Drop,
            FlatExit::Reject(r) => Exit::Reject(r),
            FlatExit::Resume(p) => Exit::Resume(p),
        };
        let stops = !can_break && !matches!(exit, Exit::Next | Exit::Skip(_));
        prog.entries.push(Entry {
            rule: fe.rule,
            report: fe.report,
            ops_start,
            ops_len: prog.ops.len() as u32 - ops_start,
            exit,
        });
        let mut conds = Vec::with_capacity(fe.conds.len());
        for c in fe.conds {
            let next = prog.conds.len() as u32;
            let id = *interned.entry(c.clone()).or_insert(next);
            if id == next {
                prog.conds.push(c);
            }
            if !conds.contains(&id) {
                conds.push(id);
            }
        }
        let proj = entry_projection(&prog.conds, &conds);
        infos.push(EntryInfo {
            conds,
            proj,
            stops,
            safe: max_skip <= i,
        });
        max_skip = max_skip.max(skip_to);
    }
    let all: Vec<u32> = (0..infos.len() as u32).collect();
    let single = if opts.partition_above == 0 && opts.max_trees > 1 {
        None
    } else {
        match build_forest(&prog.conds, &infos, &[all], opts, budget) {
            Ok(f) => Some(f),
            Err(BuildError::TooLarge { .. }) if opts.max_trees > 1 => None,
            Err(e) => return Err(e),
        }
    };
    let (mut code, roots, shape) = match single {
        Some(f) if f.0.len() * 4 <= opts.partition_above || opts.max_trees <= 1 => f,
        single => {
            // Wildcards replicate into every child of a cut on their field; trees of entries
            // that are wide in the same fields replicate far less (EffiCuts).
            let groups = partition(&infos, opts);
            match (
                build_forest(&prog.conds, &infos, &groups, opts, budget),
                single,
            ) {
                (Ok(f), Some(s)) if s.0.len() <= f.0.len() => s,
                (Ok(f), _) => f,
                (Err(_), Some(s)) => s,
                (Err(e), None) => return Err(e),
            }
        }
    };
    stats.nodes += shape.nodes;
    stats.leaves += shape.leaves;
    stats.leaf_items += shape.items;
    stats.max_depth = stats.max_depth.max(shape.max_depth);
    stats.max_leaf = stats.max_leaf.max(shape.max_leaf);
    stats.trees += roots.len();
    code.shrink_to_fit();
    prog.code = code;
    prog.roots = roots;
    Ok(prog)
}

/// Shape of a forest, for [`BuildStats`].
#[derive(Default)]
struct Shape {
    nodes: usize,
    leaves: usize,
    items: usize,
    max_depth: usize,
    max_leaf: usize,
}

/// One tree per group of entries, sharing one code array (and its check blobs).
fn build_forest(
    conds: &[Cond],
    infos: &[EntryInfo],
    groups: &[Vec<u32>],
    opts: &TreeOptions,
    budget: &mut Budget,
) -> Result<(Vec<u32>, Vec<u32>, Shape), BuildError> {
    let mut b = TreeBuilder {
        conds,
        infos,
        opts,
        code: Vec::new(),
        leaf_memo: HashMap::new(),
        node_memo: HashMap::new(),
        budget,
        max_depth: 0,
        max_leaf: 0,
        leaves: 0,
        items: 0,
        blobs: Vec::new(),
    };
    b.emit_blobs();
    let mut roots = Vec::with_capacity(groups.len());
    for g in groups {
        roots.push(b.build(g, &mut Bx::full(), 0)?);
    }
    let shape = Shape {
        nodes: b.leaf_memo.len() + b.node_memo.len(),
        leaves: b.leaves,
        items: b.items,
        max_depth: b.max_depth,
        max_leaf: b.max_leaf,
    };
    Ok((b.code, roots, shape))
}

/// Splits entries into at most `max_trees` groups by the fields in which they are wide (cover
/// half the field's values or more, or do not test it), over fields of 16 bits or more, where
/// replication hurts. Small groups merge into the group that is wide in the most of the same
/// fields (EffiCuts' category merging). Each group keeps entry order.
fn partition(infos: &[EntryInfo], opts: &TreeOptions) -> Vec<Vec<u32>> {
    let dims: Vec<u8> = (0..NFIELDS as u8)
        .filter(|&f| super::FIELDS[f as usize].bits() >= 16)
        .collect();
    let wide_mask = |info: &EntryInfo| -> u32 {
        let mut m = 0u32;
        for (bit, &f) in dims.iter().enumerate() {
            let wide = match info.proj.iter().find(|(g, _)| *g == f) {
                None => true,
                Some((_, ivs)) => {
                    let size = ivs.iter().fold(0u128, |acc, iv| {
                        acc.saturating_add(iv.hi - iv.lo).saturating_add(1)
                    });
                    size >= field_max(f) / 2
                }
            };
            if wide {
                m |= 1 << bit;
            }
        }
        m
    };
    let mut groups: Vec<(u32, Vec<u32>)> = Vec::new();
    for (e, info) in infos.iter().enumerate() {
        let m = wide_mask(info);
        match groups.iter_mut().find(|(g, _)| *g == m) {
            Some((_, v)) => v.push(e as u32),
            None => groups.push((m, vec![e as u32])),
        }
    }
    let min_size = (opts.binth * 4).max(infos.len() / 20);
    loop {
        if groups.len() <= 1 {
            break;
        }
        let Some((si, _)) = groups.iter().enumerate().min_by_key(|(_, (_, v))| v.len()) else {
            break;
        };
        if groups.len() <= opts.max_trees && groups[si].1.len() >= min_size {
            break;
        }
        let (sm, small) = groups.swap_remove(si);
        // Prefer a group wide in every field this one is (a superset), with the fewest extra;
        // otherwise the nearest mask.
        let score = |m: u32| {
            let superset = m & sm == sm;
            (!superset, (m ^ sm).count_ones())
        };
        let Some(target) = (0..groups.len()).min_by_key(|&i| score(groups[i].0)) else {
            groups.push((sm, small));
            break;
        };
        let (tm, tv) = &mut groups[target];
        *tm |= sm;
        tv.extend(small);
        tv.sort_unstable();
    }
    groups.into_iter().map(|(_, v)| v).collect()
}

fn field_max(f: u8) -> u128 {
    super::FIELDS[f as usize].max()
}

/// The complement of sorted disjoint `ivs` within `[0, max]`.
fn complement(ivs: &[Interval], max: u128) -> Vec<Interval> {
    let mut out = Vec::new();
    let mut next = 0u128;
    let mut open = true;
    for iv in ivs {
        if iv.lo > next {
            out.push(Interval::new(next, iv.lo - 1));
        }
        if iv.hi >= max {
            open = false;
            break;
        }
        next = iv.hi + 1;
    }
    if open && next <= max {
        out.push(Interval::new(next, max));
    }
    out
}

fn intersect(a: &[Interval], b: &[Interval]) -> Vec<Interval> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let lo = a[i].lo.max(b[j].lo);
        let hi = a[i].hi.min(b[j].hi);
        if lo <= hi {
            out.push(Interval::new(lo, hi));
        }
        if a[i].hi < b[j].hi {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// Values of field `f` (present) for which `c` can hold, as sorted disjoint intervals.
fn cond_projection(c: &Cond, f: u8) -> Vec<Interval> {
    let max = field_max(f);
    let full = vec![Interval::new(0, max)];
    match c {
        Cond::Range { neg, lo, hi, .. } => {
            let iv = [Interval::new(*lo, (*hi).min(max))];
            if *lo > max || lo > hi {
                return if *neg { full } else { Vec::new() };
            }
            if *neg {
                complement(&iv, max)
            } else {
                iv.to_vec()
            }
        }
        Cond::Set { neg, set, .. } => {
            let ivs: Vec<Interval> = set
                .intervals()
                .iter()
                .filter(|iv| iv.lo <= max)
                .map(|iv| Interval::new(iv.lo, iv.hi.min(max)))
                .collect();
            if *neg {
                complement(&ivs, max)
            } else {
                ivs
            }
        }
        Cond::Masked {
            neg, mask, value, ..
        } => {
            if max <= 0xff {
                let vals: Vec<Interval> = (0..=max)
                    .filter(|v| ((v & mask) == *value) != *neg)
                    .map(Interval::point)
                    .collect();
                return IntervalSet::from_intervals(vals).intervals().to_vec();
            }
            let m = mask & max;
            let low = max & !m;
            // A prefix mask (the set bits above every clear one) selects one interval.
            let prefix = low & low.wrapping_add(1) == 0;
            if value & !m != 0 {
                return if *neg { full } else { Vec::new() };
            }
            if prefix {
                let iv = [Interval::new(*value, value | low)];
                if *neg {
                    complement(&iv, max)
                } else {
                    iv.to_vec()
                }
            } else {
                full
            }
        }
        Cond::Concat { fs, neg, elems } => {
            if *neg {
                return full;
            }
            let Some(pos) = fs.iter().position(|x| *x == f) else {
                return full;
            };
            let ivs = elems.iter().filter_map(|e| e.get(pos).copied()).collect();
            IntervalSet::from_intervals(ivs).intervals().to_vec()
        }
    }
}

fn cond_fields(c: &Cond) -> &[u8] {
    match c {
        Cond::Range { f, .. } | Cond::Set { f, .. } | Cond::Masked { f, .. } => {
            std::slice::from_ref(f)
        }
        Cond::Concat { fs, .. } => fs,
    }
}

fn entry_projection(all: &[Cond], conds: &[u32]) -> Vec<(u8, Vec<Interval>)> {
    let mut out: Vec<(u8, Vec<Interval>)> = Vec::new();
    for &ci in conds {
        let c = &all[ci as usize];
        for &f in cond_fields(c) {
            let p = cond_projection(c, f);
            match out.iter_mut().find(|(g, _)| *g == f) {
                Some((_, cur)) => *cur = intersect(cur, &p),
                None => out.push((f, p)),
            }
        }
    }
    out.sort_by_key(|(f, _)| *f);
    out
}

/// The box of packets reaching a node: a range per field, and which fields are known present.
#[derive(Clone)]
struct Bx {
    lo: [u128; NFIELDS],
    hi: [u128; NFIELDS],
    present: u32,
}

impl Bx {
    fn full() -> Self {
        Bx {
            lo: [0; NFIELDS],
            hi: super::FIELDS.map(|f| f.max()),
            present: 0,
        }
    }
    fn known(&self, f: u8) -> bool {
        self.present & (1 << f) != 0
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    /// No packet of the box satisfies it.
    Never,
    /// Every packet of the box satisfies it.
    Always,
    Maybe,
}

/// Where `[lo, hi]` stands against sorted disjoint `ivs`: inside one, outside all, or across.
fn range_vs(ivs: &[Interval], lo: u128, hi: u128) -> Status {
    let idx = ivs.partition_point(|iv| iv.hi < lo);
    match ivs.get(idx) {
        None => Status::Never,
        Some(iv) if iv.lo > hi => Status::Never,
        Some(iv) if iv.lo <= lo && hi <= iv.hi => Status::Always,
        Some(_) => Status::Maybe,
    }
}

fn cond_status(c: &Cond, bx: &Bx) -> Status {
    let fields = cond_fields(c);
    let all_known = fields.iter().all(|&f| bx.known(f));
    let st = match c {
        Cond::Range { f, neg, lo, hi } => {
            let (a, b) = (bx.lo[*f as usize], bx.hi[*f as usize]);
            let inside = if b < *lo || a > *hi {
                Status::Never
            } else if *lo <= a && b <= *hi {
                Status::Always
            } else {
                Status::Maybe
            };
            negate(inside, *neg)
        }
        Cond::Set { f, neg, set } => negate(
            range_vs(set.intervals(), bx.lo[*f as usize], bx.hi[*f as usize]),
            *neg,
        ),
        Cond::Masked {
            f,
            neg,
            mask,
            value,
        } => {
            let (a, b) = (bx.lo[*f as usize], bx.hi[*f as usize]);
            if b - a <= 0xff {
                let mut seen = (false, false);
                for v in a..=b {
                    if ((v & mask) == *value) != *neg {
                        seen.0 = true;
                    } else {
                        seen.1 = true;
                    }
                }
                match seen {
                    (true, false) => Status::Always,
                    (false, _) => Status::Never,
                    _ => Status::Maybe,
                }
            } else {
                Status::Maybe
            }
        }
        Cond::Concat { fs, neg, elems } => {
            let mut any = false;
            let mut cover = false;
            for e in elems.iter() {
                let mut meets = true;
                let mut covers = true;
                for (iv, &f) in e.iter().zip(fs.iter()) {
                    let (a, b) = (bx.lo[f as usize], bx.hi[f as usize]);
                    if b < iv.lo || a > iv.hi {
                        meets = false;
                        break;
                    }
                    covers &= iv.lo <= a && b <= iv.hi;
                }
                any |= meets;
                cover |= meets && covers;
                if cover {
                    break;
                }
            }
            let inside = if !any {
                Status::Never
            } else if cover {
                Status::Always
            } else {
                Status::Maybe
            };
            negate(inside, *neg)
        }
    };
    // "Always" needs the fields to be there: a test of an absent field fails.
    if st == Status::Always && !all_known {
        Status::Maybe
    } else {
        st
    }
}

fn negate(s: Status, neg: bool) -> Status {
    match (s, neg) {
        (s, false) => s,
        (Status::Never, true) => Status::Always,
        (Status::Always, true) => Status::Never,
        (Status::Maybe, true) => Status::Maybe,
    }
}

struct TreeBuilder<'a> {
    conds: &'a [Cond],
    infos: &'a [EntryInfo],
    opts: &'a TreeOptions,
    code: Vec<u32>,
    leaf_memo: HashMap<Vec<u32>, u32>,
    /// Offset of each entry's check blob.
    blobs: Vec<u32>,
    node_memo: HashMap<(u8, Vec<u128>, Vec<u32>, u32), u32>,
    budget: &'a mut Budget,
    max_depth: usize,
    max_leaf: usize,
    leaves: usize,
    items: usize,
}

/// A candidate cut: field, child lower bounds (first is the box's low end), children's entries.
struct Cut {
    field: u8,
    bounds: Vec<u128>,
    kids: Vec<Vec<u32>>,
    absent: Vec<u32>,
    worst: usize,
    total: usize,
}

impl TreeBuilder<'_> {
    fn build(&mut self, cand: &[u32], bx: &mut Bx, depth: usize) -> Result<u32, BuildError> {
        // 1. Keep the entries the box can match, with their unproven conditions.
        let mut live: Vec<(u32, Vec<u32>)> = Vec::with_capacity(cand.len());
        'entries: for &e in cand {
            let info = &self.infos[e as usize];
            let mut resid = Vec::new();
            for &c in &info.conds {
                match cond_status(&self.conds[c as usize], bx) {
                    Status::Never => continue 'entries,
                    Status::Maybe => resid.push(c),
                    Status::Always => {}
                }
            }
            let shadows = resid.is_empty() && info.stops && info.safe;
            live.push((e, resid));
            if shadows {
                break;
            }
        }
        self.max_depth = self.max_depth.max(depth);
        // 2. Few entries, or too deep: a leaf.
        if live.len() <= self.opts.binth || depth >= MAX_DEPTH {
            return self.leaf(live);
        }
        // 3. The best cut, if any makes progress.
        let entries: Vec<u32> = live.iter().map(|(e, _)| *e).collect();
        let mut best: Option<Cut> = None;
        for f in 0..NFIELDS as u8 {
            if let Some(cut) = self.try_cut(&entries, &live, f, bx) {
                let better = match &best {
                    None => true,
                    Some(b) => (cut.worst, cut.total) < (b.worst, b.total),
                };
                if better {
                    best = Some(cut);
                }
            }
        }
        let Some(cut) = best else {
            return self.leaf(live);
        };
        let f = cut.field as usize;
        let saved = (bx.lo[f], bx.hi[f], bx.present);
        let mut kid_ids = Vec::with_capacity(cut.kids.len());
        for (k, kid) in cut.kids.iter().enumerate() {
            bx.lo[f] = cut.bounds[k];
            bx.hi[f] = match cut.bounds.get(k + 1) {
                Some(&next) => next - 1,
                None => saved.1,
            };
            bx.present |= 1 << f;
            kid_ids.push(self.build(kid, bx, depth + 1)?);
        }
        (bx.lo[f], bx.hi[f], bx.present) = saved;
        let absent = self.build(&cut.absent, bx, depth + 1)?;
        Ok(self.cut_node(cut.field, cut.bounds, kid_ids, absent))
    }

    /// Cuts `entries` on field `f`, or `None` when no child would be smaller than the node.
    fn try_cut(&self, entries: &[u32], live: &[(u32, Vec<u32>)], f: u8, bx: &Bx) -> Option<Cut> {
        let (blo, bhi) = (bx.lo[f as usize], bx.hi[f as usize]);
        // Each entry's values of f inside the box; `None` for an entry not testing f.
        let mut ranges: Vec<Option<Vec<Interval>>> = Vec::with_capacity(entries.len());
        let mut tests = false;
        let mut useful = false;
        for (e, resid) in live {
            let info = &self.infos[*e as usize];
            match info.proj.iter().find(|(g, _)| *g == f) {
                None => ranges.push(None),
                Some((_, p)) => {
                    tests = true;
                    let clipped = intersect(p, &[Interval::new(blo, bhi)]);
                    // A test left unproven on f is worth cutting on; so is one not yet known
                    // present (the absent child sheds it).
                    useful |= !bx.known(f)
                        || resid
                            .iter()
                            .any(|c| cond_fields(&self.conds[*c as usize]).contains(&f));
                    ranges.push(Some(clipped));
                }
            }
        }
        if !tests || !useful {
            return None;
        }
        // Elementary interval starts inside the box.
        let mut starts: Vec<u128> = vec![blo];
        for r in ranges.iter().flatten() {
            for iv in r {
                if iv.lo > blo {
                    starts.push(iv.lo);
                }
                if iv.hi < bhi {
                    starts.push(iv.hi + 1);
                }
            }
        }
        starts.sort_unstable();
        starts.dedup();
        let nseg = starts.len();
        let seg_of = |v: u128| starts.partition_point(|&s| s <= v) - 1;
        // Weight of each segment: the entries overlapping it.
        let mut diff = vec![0i64; nseg + 1];
        for r in &ranges {
            match r {
                None => {
                    diff[0] += 1;
                    diff[nseg] -= 1;
                }
                Some(ivs) => {
                    for iv in ivs {
                        diff[seg_of(iv.lo)] += 1;
                        diff[seg_of(iv.hi) + 1] -= 1;
                    }
                }
            }
        }
        let mut w = Vec::with_capacity(nseg);
        let mut run = 0i64;
        for d in &diff[..nseg] {
            run += d;
            w.push(run.max(0) as u64);
        }
        let total_w: u64 = w.iter().sum();
        let absent: Vec<u32> = entries
            .iter()
            .zip(&ranges)
            .filter(|(_, r)| r.is_none())
            .map(|(e, _)| *e)
            .collect();
        let n = entries.len();
        let mut best: Option<Cut> = None;
        let mut k = 2usize;
        loop {
            let kk = k.min(nseg);
            // Child j covers segments [cut[j], cut[j+1]); cuts split the weight evenly.
            let mut cuts = vec![0usize];
            let mut acc = 0u64;
            for (s, ws) in w.iter().enumerate() {
                let target = total_w * cuts.len() as u64 / kk as u64;
                if s > 0 && acc >= target && cuts.len() < kk && *cuts.last().unwrap_or(&0) < s {
                    cuts.push(s);
                }
                acc += ws;
            }
            let nk = cuts.len();
            if nk >= 2 {
                let child_of_seg = |s: usize| cuts.partition_point(|&c| c <= s) - 1;
                let mut kids: Vec<Vec<u32>> = vec![Vec::new(); nk];
                for (e, r) in entries.iter().zip(&ranges) {
                    match r {
                        None => kids.iter_mut().for_each(|k| k.push(*e)),
                        Some(ivs) => {
                            let mut last = usize::MAX;
                            for iv in ivs {
                                let (a, b) =
                                    (child_of_seg(seg_of(iv.lo)), child_of_seg(seg_of(iv.hi)));
                                for (j, kid) in kids.iter_mut().enumerate().take(b + 1).skip(a) {
                                    if j != last {
                                        kid.push(*e);
                                        last = j;
                                    }
                                }
                            }
                        }
                    }
                }
                let worst = kids
                    .iter()
                    .map(Vec::len)
                    .max()
                    .unwrap_or(0)
                    .max(absent.len());
                let total: usize = kids.iter().map(Vec::len).sum::<usize>() + absent.len();
                let fits = total + nk <= self.opts.spfac * n;
                if worst < n && (best.is_none() || fits) {
                    best = Some(Cut {
                        field: f,
                        bounds: cuts.iter().map(|&s| starts[s]).collect(),
                        kids,
                        absent: absent.clone(),
                        worst,
                        total,
                    });
                }
                if !fits {
                    break;
                }
            }
            if kk >= nseg || k >= self.opts.max_kids {
                break;
            }
            k *= 2;
        }
        best
    }

    fn leaf(&mut self, live: Vec<(u32, Vec<u32>)>) -> Result<u32, BuildError> {
        // Items name the entry's check blob; an entry the box proves needs no checks.
        let words: Vec<u32> = live
            .iter()
            .map(|(e, resid)| self.blobs[*e as usize] | if resid.is_empty() { CERTAIN } else { 0 })
            .collect();
        if let Some(&id) = self.leaf_memo.get(&words) {
            return Ok(id);
        }
        self.budget.items += live.len();
        if self.budget.items > MAX_ITEMS || self.code.len() >= CERTAIN as usize / 2 {
            return Err(BuildError::TooLarge {
                what: format!("more than {MAX_ITEMS} leaf entries in the decision trees"),
            });
        }
        let id = self.code.len() as u32;
        self.code.push(LEAF | live.len() as u32);
        self.code.extend_from_slice(&words);
        self.leaves += 1;
        self.items += live.len();
        self.max_leaf = self.max_leaf.max(live.len());
        self.leaf_memo.insert(words, id);
        Ok(id)
    }

    /// Emits each entry's check blob `[entry, words, checks...]` once, at the start of the code;
    /// leaves point at them. A blob checks every condition of its entry: re-checking the few a
    /// leaf's box proves costs less than the cache misses of a copy per leaf.
    fn emit_blobs(&mut self) {
        for (e, info) in self.infos.iter().enumerate() {
            self.blobs.push(self.code.len() as u32);
            self.code.push(e as u32);
            let len_at = self.code.len();
            self.code.push(0);
            // Narrow ranges, at most one per field, go first as a field mask, a negation mask
            // and `lo hi` pairs in field order: the common case checks without dispatch.
            let mut narrow: Vec<(u8, bool, u32, u32)> = Vec::new();
            let mut rest = Vec::new();
            for &c in &info.conds {
                match &self.conds[c as usize] {
                    Cond::Range { f, neg, lo, hi }
                        if field_max(*f) <= u32::MAX as u128
                            && *lo <= field_max(*f)
                            && !narrow.iter().any(|n| n.0 == *f) =>
                    {
                        narrow.push((*f, *neg, *lo as u32, (*hi).min(field_max(*f)) as u32));
                    }
                    _ => rest.push(c),
                }
            }
            narrow.sort_unstable_by_key(|n| n.0);
            let mask = narrow.iter().fold(0u32, |m, n| m | 1 << n.0);
            let neg = narrow.iter().fold(0u32, |m, n| m | (n.1 as u32) << n.0)
                | (narrow.len() as u32) << 24;
            self.code.push(mask);
            self.code.push(neg);
            for (_, _, lo, hi) in &narrow {
                self.code.push(*lo);
                self.code.push(*hi);
            }
            for c in rest {
                self.push_check(c);
            }
            self.code[len_at] = (self.code.len() - len_at - 1) as u32;
        }
    }

    /// Appends the leaf check of condition `c`: ranges inline (no pointer chase), anything else
    /// by index.
    fn push_check(&mut self, c: u32) {
        match &self.conds[c as usize] {
            Cond::Range { f, neg, lo, hi } => {
                let head = *f as u32 | if *neg { CHECK_NEG } else { 0 };
                let max = super::FIELDS[*f as usize].max();
                if max <= u32::MAX as u128 && *lo <= max {
                    // Values of a narrow field never exceed its max: clamping `hi` is exact.
                    self.code.push(head | CHECK_RANGE32 << 6);
                    self.code.push(*lo as u32);
                    self.code.push((*hi).min(max) as u32);
                } else {
                    self.code.push(head | CHECK_RANGE128 << 6);
                    push128(&mut self.code, *lo);
                    push128(&mut self.code, *hi);
                }
            }
            _ => {
                self.code.push(CHECK_COND << 6);
                self.code.push(c);
            }
        }
    }

    fn cut_node(&mut self, field: u8, bounds: Vec<u128>, kids: Vec<u32>, absent: u32) -> u32 {
        // Neighbouring children that got the same subtree merge into one.
        let mut b2 = Vec::with_capacity(bounds.len());
        let mut k2: Vec<u32> = Vec::with_capacity(kids.len());
        for (b, k) in bounds.into_iter().zip(kids) {
            if k2.last() != Some(&k) {
                b2.push(b);
                k2.push(k);
            }
        }
        if k2.len() == 1 && k2[0] == absent {
            return absent;
        }
        let key = (field, b2, k2, absent);
        if let Some(&id) = self.node_memo.get(&key) {
            return id;
        }
        let id = self.code.len() as u32;
        let wide = super::FIELDS[field as usize].bits() > 32;
        let n = key.2.len() as u32;
        self.code
            .push(field as u32 | if wide { WIDE } else { 0 } | n << 8);
        self.code.push(absent);
        if wide {
            for &b in &key.1[1..] {
                push128(&mut self.code, b);
            }
        } else {
            // Bounds padded with u32::MAX to whole blocks of 8 (see `narrow_slots`).
            let mut blocks: Vec<u32> = key.1[1..].iter().map(|&b| b as u32).collect();
            blocks.resize(blocks.len().div_ceil(8) * 8, u32::MAX);
            self.code.extend_from_slice(&blocks);
            debug_assert_eq!(self.code.len() - id as usize - 2, narrow_slots(key.1.len()));
        }
        self.code.extend_from_slice(&key.2);
        self.node_memo.insert(key, id);
        id
    }
}
