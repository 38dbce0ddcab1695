//! IR → programs: flattening one base chain, with every chain it jumps or goes to inlined, its
//! vmaps expanded and its matches lowered to [`Cond`]s, into the entry lists [`super::tree`]
//! describes; plus a continuation program after each mark change that a later rule could see.
//!
//! Owns the control-flow semantics of the compiled form (jump stack, goto, return, vmap
//! branches, limits breaking a rule, continuations); must agree with [`super::linear`], which
//! property tests check. Knows nothing of trees.

use std::collections::HashMap;
use std::sync::Arc;

use super::build::Budget;
use super::tree::Cond;
use super::{field_index, BuildError, LimitSpec, NFIELDS};
use crate::rules::ir::{
    Field, Interval, IntervalSet, MarkValue, Match, Reject, Rule, RuleId, Stmt, Table, Verdict,
};

/// Flattened entries over all programs; inlining a chain jumped to from many places, or many
/// mark-setting rules, multiplies entries.
const MAX_ENTRIES: usize = 1 << 20;

/// A forward reference to an entry index, fixed once the target is emitted.
pub(crate) type Label = u32;

/// An entry before its labels are resolved and its conditions are interned.
pub(crate) struct FlatEntry {
    pub rule: RuleId,
    pub report: bool,
    pub conds: Vec<Cond>,
    pub ops: Vec<FlatOp>,
    pub exit: FlatExit,
}

#[derive(Clone, Copy)]
pub(crate) enum FlatOp {
    Record(u16),
    Limit(u16, LimitSpec, Label),
    MetaMark(u16, MarkValue, Label),
    CtMark(u16, MarkValue, Label),
}

#[derive(Clone, Copy)]
pub(crate) enum FlatExit {
    Next,
    Skip(Label),
    Accept,
    Drop,
    Reject(Reject),
    Resume(u32),
}

#[derive(Default)]
pub(crate) struct FlatProgram {
    pub entries: Vec<FlatEntry>,
    /// Entry index of each label.
    pub labels: Vec<u32>,
}

/// A return point on the jump stack: go on in `chain` at rule index `resume`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Frame {
    chain: usize,
    resume: usize,
}

/// Where a continuation starts: after statement `stmt` of rule `rule` of `chain`, with the
/// jump stack `frames` beneath.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ContKey {
    chain: usize,
    rule: usize,
    stmt: usize,
    frames: Vec<Frame>,
}

pub(crate) struct Flattener<'a> {
    table: &'a Table,
    tested: &'a [bool; NFIELDS],
    budget: &'a mut Budget,
    cur: FlatProgram,
    conts: HashMap<ContKey, u32>,
    pending: Vec<ContKey>,
}

impl<'a> Flattener<'a> {
    /// Flattens base chain `base` into its programs: `[0]` the chain itself, then one per
    /// continuation.
    pub(crate) fn run(
        table: &'a Table,
        base: usize,
        tested: &'a [bool; NFIELDS],
        budget: &'a mut Budget,
    ) -> Result<Vec<FlatProgram>, BuildError> {
        let mut fl = Flattener {
            table,
            tested,
            budget,
            cur: FlatProgram::default(),
            conts: HashMap::new(),
            pending: Vec::new(),
        };
        let end = fl.label();
        fl.emit_chain(base, 0, &[], end, &[])?;
        fl.place(end);
        let mut out = vec![std::mem::take(&mut fl.cur)];
        // Continuations are numbered in creation order, and `pending` is worked in that order.
        let mut next = 0;
        while next < fl.pending.len() {
            let k = fl.pending[next].clone();
            next += 1;
            fl.emit_continuation(&k)?;
            out.push(std::mem::take(&mut fl.cur));
        }
        Ok(out)
    }

    fn label(&mut self) -> Label {
        self.cur.labels.push(u32::MAX);
        (self.cur.labels.len() - 1) as Label
    }

    fn place(&mut self, l: Label) {
        self.cur.labels[l as usize] = self.cur.entries.len() as u32;
    }

    fn push(&mut self, e: FlatEntry) -> Result<(), BuildError> {
        self.budget.entries += 1;
        if self.budget.entries > MAX_ENTRIES {
            return Err(BuildError::TooLarge {
                what: format!(
                    "more than {MAX_ENTRIES} rule entries after inlining jumps and vmaps in table `{}`",
                    self.table.name
                ),
            });
        }
        self.cur.entries.push(e);
        Ok(())
    }

    fn cont(&mut self, k: ContKey) -> u32 {
        if let Some(&id) = self.conts.get(&k) {
            return id;
        }
        // Program 0 is the base chain; continuations follow.
        let id = self.pending.len() as u32 + 1;
        self.conts.insert(k.clone(), id);
        self.pending.push(k);
        id
    }

    fn rule(&self, c: usize, r: usize) -> &'a Rule {
        &self.table.chains[c].rules[r]
    }

    /// Rules `start..` of chain `c`, each guarded by `prefix`; `return` goes to `ret`.
    fn emit_chain(
        &mut self,
        c: usize,
        start: usize,
        prefix: &[Cond],
        ret: Label,
        frames: &[Frame],
    ) -> Result<(), BuildError> {
        let table = self.table;
        for r in start..table.chains[c].rules.len() {
            let rule = &table.chains[c].rules[r];
            let end = self.label();
            let mut conds = prefix.to_vec();
            for m in &rule.matches {
                lower_match(m, &mut conds);
            }
            self.emit_stmts(c, r, 0, conds, true, end, ret, frames)?;
            self.place(end);
        }
        Ok(())
    }

    /// "The rest of this rule, then the rest of every chain on the stack", unguarded: the
    /// continuation runs only after its rule matched.
    fn emit_continuation(&mut self, k: &ContKey) -> Result<(), BuildError> {
        let rule_end = self.label();
        let mut ret = self.label();
        self.emit_stmts(
            k.chain,
            k.rule,
            k.stmt + 1,
            Vec::new(),
            false,
            rule_end,
            ret,
            &k.frames,
        )?;
        self.place(rule_end);
        self.emit_chain(k.chain, k.rule + 1, &[], ret, &k.frames)?;
        self.place(ret);
        for i in (0..k.frames.len()).rev() {
            ret = self.label();
            let f = &k.frames[i];
            self.emit_chain(f.chain, f.resume, &[], ret, &k.frames[..i])?;
            self.place(ret);
        }
        Ok(())
    }

    /// Statements `from..` of rule `r` of chain `c`, guarded by `conds`. A break (limit, absent
    /// mark source) goes to `rule_end`; `return` to `ret`.
    #[allow(clippy::too_many_arguments)]
    fn emit_stmts(
        &mut self,
        c: usize,
        r: usize,
        from: usize,
        conds: Vec<Cond>,
        report: bool,
        rule_end: Label,
        ret: Label,
        frames: &[Frame],
    ) -> Result<(), BuildError> {
        let rule = self.rule(c, r);
        let id = rule.id;
        let mut ops = Vec::new();
        let entry = |conds: Vec<Cond>, ops: Vec<FlatOp>, exit| FlatEntry {
            rule: id,
            report,
            conds,
            ops,
            exit,
        };
        for si in from..rule.stmts.len() {
            let s16 = si as u16;
            let verdict = match &rule.stmts[si] {
                Stmt::Counter { .. }
                | Stmt::Log { .. }
                | Stmt::CtHelperSet(_)
                | Stmt::Notrack
                | Stmt::FlowAdd { .. } => {
                    ops.push(FlatOp::Record(s16));
                    continue;
                }
                Stmt::Limit {
                    rate,
                    unit,
                    burst,
                    over,
                } => {
                    let spec = LimitSpec {
                        rate: *rate,
                        unit: *unit,
                        burst: *burst,
                        over: *over,
                    };
                    ops.push(FlatOp::Limit(s16, spec, rule_end));
                    continue;
                }
                Stmt::MetaMarkSet(v) | Stmt::CtMarkSet(v) => {
                    let meta = matches!(rule.stmts[si], Stmt::MetaMarkSet(_));
                    let field = if meta { Field::Mark } else { Field::CtMark };
                    ops.push(if meta {
                        FlatOp::MetaMark(s16, *v, rule_end)
                    } else {
                        FlatOp::CtMark(s16, *v, rule_end)
                    });
                    if self.tested[field_index(field)] {
                        let k = ContKey {
                            chain: c,
                            rule: r,
                            stmt: si,
                            frames: frames.to_vec(),
                        };
                        let p = self.cont(k);
                        return self.push(entry(conds, ops, FlatExit::Resume(p)));
                    }
                    continue;
                }
                Stmt::Nat(_) => {
                    ops.push(FlatOp::Record(s16));
                    return self.push(entry(conds, ops, FlatExit::Accept));
                }
                Stmt::Reject(how) => return self.push(entry(conds, ops, FlatExit::Reject(*how))),
                Stmt::Verdict(v) => *v,
                Stmt::Vmap { fields, entries } => {
                    // The rule's entry runs the statements so far; then one guarded entry per
                    // element. An element overlapping earlier ones excludes them, so only the
                    // first element holding the key applies. No element: fall through to the
                    // rule's end (the lookup breaks the rule).
                    self.push(entry(conds.clone(), ops, FlatExit::Next))?;
                    let overlaps = earlier_overlaps(entries);
                    for (ei, (elem, v)) in entries.iter().enumerate() {
                        let mut ec = conds.clone();
                        lower_concat(fields, false, Arc::new(vec![elem.clone()]), &mut ec);
                        if !overlaps[ei].is_empty() {
                            let prev: Vec<Vec<Interval>> =
                                overlaps[ei].iter().map(|&j| entries[j].0.clone()).collect();
                            lower_concat(fields, true, Arc::new(prev), &mut ec);
                        }
                        if *v == Verdict::Continue {
                            self.emit_stmts(
                                c,
                                r,
                                si + 1,
                                ec.clone(),
                                false,
                                rule_end,
                                ret,
                                frames,
                            )?;
                            // The rest of the rule ran off its end: skip the other elements.
                            self.push(FlatEntry {
                                rule: id,
                                report: false,
                                conds: ec,
                                ops: Vec::new(),
                                exit: FlatExit::Skip(rule_end),
                            })?;
                        } else {
                            self.emit_verdict(
                                c,
                                r,
                                *v,
                                ec,
                                false,
                                Vec::new(),
                                rule_end,
                                ret,
                                frames,
                            )?;
                        }
                    }
                    return Ok(());
                }
            };
            if verdict == Verdict::Continue {
                continue;
            }
            return self.emit_verdict(c, r, verdict, conds, report, ops, rule_end, ret, frames);
        }
        self.push(entry(conds, ops, FlatExit::Next))
    }

    /// An entry ending in `v`, with the called chain inlined after it for jump and goto.
    #[allow(clippy::too_many_arguments)]
    fn emit_verdict(
        &mut self,
        c: usize,
        r: usize,
        v: Verdict,
        conds: Vec<Cond>,
        report: bool,
        ops: Vec<FlatOp>,
        rule_end: Label,
        ret: Label,
        frames: &[Frame],
    ) -> Result<(), BuildError> {
        let rule = self.rule(c, r).id;
        let mk = |conds, ops, exit| FlatEntry {
            rule,
            report,
            conds,
            ops,
            exit,
        };
        match v {
            Verdict::Accept => self.push(mk(conds, ops, FlatExit::Accept)),
            Verdict::Drop => self.push(mk(conds, ops, FlatExit::Drop)),
            Verdict::Continue => self.push(mk(conds, ops, FlatExit::Next)),
            Verdict::Return => self.push(mk(conds, ops, FlatExit::Skip(ret))),
            Verdict::Jump(t) => {
                self.push(mk(conds.clone(), ops, FlatExit::Next))?;
                let mut inner = frames.to_vec();
                inner.push(Frame {
                    chain: c,
                    resume: r + 1,
                });
                // Running off the callee (or its return) goes on after this rule.
                self.emit_chain(t, 0, &conds, rule_end, &inner)?;
                self.push(FlatEntry {
                    rule,
                    report: false,
                    conds,
                    ops: Vec::new(),
                    exit: FlatExit::Skip(rule_end),
                })
            }
            Verdict::Goto(t) => {
                self.push(mk(conds.clone(), ops, FlatExit::Next))?;
                self.emit_chain(t, 0, &conds, ret, frames)?;
                // Running off the callee returns from the caller.
                self.push(FlatEntry {
                    rule,
                    report: false,
                    conds,
                    ops: Vec::new(),
                    exit: FlatExit::Skip(ret),
                })
            }
        }
    }
}

/// For each vmap element, the earlier elements whose boxes overlap it.
fn earlier_overlaps(entries: &[(Vec<Interval>, Verdict)]) -> Vec<Vec<usize>> {
    let n = entries.len();
    let mut out = vec![Vec::new(); n];
    if n < 2 || entries.iter().any(|e| e.0.is_empty()) {
        return out;
    }
    // Sweep on the first component, then check the others.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| entries[i].0[0].lo);
    for (a_pos, &a) in order.iter().enumerate() {
        let ea = &entries[a].0;
        for &b in &order[a_pos + 1..] {
            let eb = &entries[b].0;
            if eb[0].lo > ea[0].hi {
                break;
            }
            if ea.iter().zip(eb).all(|(x, y)| x.lo <= y.hi && y.lo <= x.hi) {
                let (lo, hi) = if a < b { (a, b) } else { (b, a) };
                out[hi].push(lo);
            }
        }
    }
    for v in &mut out {
        v.sort_unstable();
    }
    out
}

fn fi(f: Field) -> u8 {
    field_index(f) as u8
}

/// Lowers an IR match to conditions (a single-element concatenation becomes one range per
/// field, which the tree can cut on and prove).
fn lower_match(m: &Match, out: &mut Vec<Cond>) {
    match m {
        Match::Set { field, negate, set } => out.push(set_cond(fi(*field), *negate, set)),
        Match::Masked {
            field,
            negate,
            mask,
            value,
        } => out.push(Cond::Masked {
            f: fi(*field),
            neg: *negate,
            mask: *mask,
            value: *value,
        }),
        Match::Concat {
            fields,
            negate,
            elems,
        } => lower_concat(fields, *negate, elems.clone(), out),
    }
}

fn set_cond(f: u8, neg: bool, set: &Arc<IntervalSet>) -> Cond {
    match set.intervals() {
        [iv] => Cond::Range {
            f,
            neg,
            lo: iv.lo,
            hi: iv.hi,
        },
        _ => Cond::Set {
            f,
            neg,
            set: set.clone(),
        },
    }
}

fn lower_concat(fields: &[Field], neg: bool, elems: Arc<Vec<Vec<Interval>>>, out: &mut Vec<Cond>) {
    if fields.len() == 1 {
        let set =
            IntervalSet::from_intervals(elems.iter().filter_map(|e| e.first().copied()).collect());
        out.push(set_cond(fi(fields[0]), neg, &Arc::new(set)));
    } else if !neg && elems.len() == 1 {
        for (f, iv) in fields.iter().zip(&elems[0]) {
            out.push(Cond::Range {
                f: fi(*f),
                neg: false,
                lo: iv.lo,
                hi: iv.hi,
            });
        }
    } else {
        out.push(Cond::Concat {
            fs: fields.iter().map(|f| fi(*f)).collect(),
            neg,
            elems,
        });
    }
}
