//! `keepstate trace`: which rules a packet matches at each hook, and what each base chain and
//! the hook decided, with every rule's source location and text.
//!
//! Owns only the presentation of an [`Evaluation`]; the evaluation is the classifier's.

use std::fmt;

use super::{rule_by_id, Classifier, Decision, Evaluation, NoLimits, PacketKey, HOOKS};
use crate::rules::ir::{Hook, Reject, RuleId, SourceLoc};

/// A rule that matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracedRule {
    pub id: RuleId,
    pub loc: SourceLoc,
    pub text: String,
}

/// One base chain's part of a hook's evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainTrace {
    pub table: String,
    pub chain: String,
    pub rules: Vec<TracedRule>,
    pub decision: Decision,
    pub by_policy: bool,
}

/// What one hook did to the packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookTrace {
    pub hook: Hook,
    pub chains: Vec<ChainTrace>,
    pub verdict: Decision,
}

/// Evaluates `key` at every hook that has base chains. Limits all pass: a trace shows what
/// the rules say, not the state of their token buckets.
pub fn trace_packet(c: &dyn Classifier, key: &PacketKey) -> Vec<HookTrace> {
    let rs = c.ruleset();
    let mut out = Vec::new();
    let mut ev = Evaluation::new();
    for hook in HOOKS {
        if rs.base_chains(hook).is_empty() {
            continue;
        }
        c.eval(hook, key, &mut NoLimits, &mut ev);
        let mut chains = Vec::new();
        let mut from = 0usize;
        for ch in &ev.chains {
            let table = &rs.tables[ch.table as usize];
            let rules = ev.rules[from..ch.rules_end as usize]
                .iter()
                .filter_map(|&id| rule_by_id(rs, id))
                .map(|r| TracedRule {
                    id: r.id,
                    loc: r.loc.clone(),
                    text: r.text.clone(),
                })
                .collect();
            from = ch.rules_end as usize;
            chains.push(ChainTrace {
                table: table.name.clone(),
                chain: table.chains[ch.chain as usize].name.clone(),
                rules,
                decision: ch.decision,
                by_policy: ch.by_policy,
            });
        }
        out.push(HookTrace {
            hook,
            chains,
            verdict: ev.verdict,
        });
    }
    out
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Accept => f.write_str("accept"),
            Decision::Drop => f.write_str("drop"),
            Decision::Reject(r) => match r {
                Reject::Default => f.write_str("reject"),
                Reject::TcpReset => f.write_str("reject with tcp reset"),
                Reject::Icmp(c) => write!(f, "reject with icmp code {c}"),
                Reject::Icmp6(c) => write!(f, "reject with icmpv6 code {c}"),
                Reject::Icmpx(c) => write!(f, "reject with icmpx code {c}"),
            },
        }
    }
}

impl fmt::Display for HookTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "hook {:?}: {}", self.hook, self.verdict)?;
        for c in &self.chains {
            writeln!(f, "  chain {} {}:", c.table, c.chain)?;
            for r in &c.rules {
                writeln!(f, "    rule #{} at {}: {}", r.id, r.loc, r.text)?;
            }
            let how = if c.by_policy { "policy " } else { "" };
            writeln!(f, "    => {how}{}", c.decision)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::classify::classbench;
    use crate::classify::Tree;

    #[test]
    fn traces_the_first_matching_classbench_rule() {
        let rules = classbench::parse(
            "t",
            "@10.0.0.0/8\t0.0.0.0/0\t0 : 65535\t22 : 22\t0x06/0xFF\t0x0000/0x0000\n",
        )
        .unwrap();
        let tree = Tree::new(Arc::new(classbench::to_ruleset("t", &rules))).unwrap();
        let p = classbench::CbPacket {
            src: 0x0a00_0001,
            dst: 1,
            sport: 1000,
            dport: 22,
            proto: 6,
        };
        let t = trace_packet(&tree, &p.key());
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].verdict, Decision::Accept);
        assert_eq!(t[0].chains[0].rules[0].loc.line, 1);
        let text = t[0].to_string();
        assert!(
            text.contains(
                "rule #0 at t:1:1: ip saddr 10.0.0.0/8 th dport 22 meta l4proto 6 accept"
            ),
            "{text}"
        );
    }
}
