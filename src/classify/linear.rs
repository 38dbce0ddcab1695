//! The reference interpreter: every rule of every chain, one by one, with a jump stack, as
//! `nft_do_chain` does. Short and obviously right on purpose; the tree is tested against it.
//!
//! Must stay free of cleverness: no precomputation beyond the list of base chains per hook.

use std::sync::Arc;

use super::{
    hook_index, resolve_mark, validate, vmap_lookup, Action, BuildError, Classifier, Decision,
    Evaluation, LimitSpec, Limiter, PacketKey,
};
use crate::rules::ir::{Field, Hook, Policy, Ruleset, Stmt, Table, Verdict};

/// The rule-by-rule reference classifier.
pub struct Linear {
    rs: Arc<Ruleset>,
    hooks: [Vec<(usize, usize)>; 5],
}

impl Linear {
    pub fn new(rs: Arc<Ruleset>) -> Result<Self, BuildError> {
        validate(&rs)?;
        let hooks = super::HOOKS.map(|h| rs.base_chains(h));
        Ok(Linear { rs, hooks })
    }

    /// Runs one base chain; returns its decision and whether the policy made it.
    fn run_base(
        &self,
        table: &Table,
        base: usize,
        policy: Policy,
        key: &mut PacketKey,
        limiter: &mut dyn Limiter,
        out: &mut Evaluation,
    ) -> (Decision, bool) {
        let by_policy = match policy {
            Policy::Accept => (Decision::Accept, true),
            Policy::Drop => (Decision::Drop, true),
        };
        // Return points: (chain, index of the rule after the jump).
        let mut stack: Vec<(usize, usize)> = Vec::new();
        let (mut c, mut r) = (base, 0usize);
        'rules: loop {
            let Some(rule) = table.chains[c].rules.get(r) else {
                match stack.pop() {
                    Some(back) => {
                        (c, r) = back;
                        continue;
                    }
                    None => return by_policy,
                }
            };
            r += 1;
            if !rule.matches.iter().all(|m| m.eval(|f| key.get(f))) {
                continue;
            }
            out.rules.push(rule.id);
            for (si, stmt) in rule.stmts.iter().enumerate() {
                let here = Action {
                    rule: rule.id,
                    stmt: si as u16,
                };
                let verdict = match stmt {
                    Stmt::Counter { .. }
                    | Stmt::Log { .. }
                    | Stmt::CtHelperSet(_)
                    | Stmt::Notrack
                    | Stmt::FlowAdd { .. } => {
                        out.actions.push(here);
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
                        if limiter.pass(rule.id, si, &spec) {
                            continue;
                        }
                        continue 'rules;
                    }
                    Stmt::MetaMarkSet(v) => {
                        let Some(m) = resolve_mark(*v, key) else {
                            continue 'rules;
                        };
                        out.actions.push(here);
                        key.set(Field::Mark, m as u128);
                        out.meta_mark = Some(m);
                        continue;
                    }
                    Stmt::CtMarkSet(v) => {
                        let Some(m) = resolve_mark(*v, key) else {
                            continue 'rules;
                        };
                        out.actions.push(here);
                        if key.get(Field::CtMark).is_some() {
                            key.set(Field::CtMark, m as u128);
                            out.ct_mark = Some(m);
                        }
                        continue;
                    }
                    Stmt::Nat(_) => {
                        out.actions.push(here);
                        return (Decision::Accept, false);
                    }
                    Stmt::Reject(how) => return (Decision::Reject(*how), false),
                    Stmt::Verdict(v) => *v,
                    Stmt::Vmap { fields, entries } => match vmap_lookup(fields, entries, key) {
                        Some(v) => v,
                        None => continue 'rules,
                    },
                };
                match verdict {
                    Verdict::Accept => return (Decision::Accept, false),
                    Verdict::Drop => return (Decision::Drop, false),
                    Verdict::Continue => {}
                    Verdict::Jump(t) => {
                        stack.push((c, r));
                        (c, r) = (t, 0);
                        continue 'rules;
                    }
                    Verdict::Goto(t) => {
                        (c, r) = (t, 0);
                        continue 'rules;
                    }
                    Verdict::Return => match stack.pop() {
                        Some(back) => {
                            (c, r) = back;
                            continue 'rules;
                        }
                        None => return by_policy,
                    },
                }
            }
        }
    }
}

impl Classifier for Linear {
    fn eval(&self, hook: Hook, key: &PacketKey, limiter: &mut dyn Limiter, out: &mut Evaluation) {
        out.reset();
        let mut key = *key;
        for &(t, c) in &self.hooks[hook_index(hook)] {
            let table = &self.rs.tables[t];
            let Some(base) = table.chains[c].base else {
                continue;
            };
            let (decision, by_policy) =
                self.run_base(table, c, base.policy, &mut key, limiter, out);
            out.end_chain(t, c, decision, by_policy);
            if decision != Decision::Accept {
                break;
            }
        }
    }

    fn ruleset(&self) -> &Ruleset {
        &self.rs
    }
}
