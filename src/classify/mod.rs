//! The classifier: given a hook and a packet's fields, what every base chain of that hook does.
//!
//! Owns the packet's view as rules see it ([`PacketKey`]), the one evaluation contract
//! ([`Classifier`], [`Evaluation`], [`Limiter`]) and its two implementations: [`Linear`], the
//! rule-by-rule reference interpreter that is obviously right, and [`Tree`], the compiled
//! decision tree the hot path uses. Property tests hold the two to identical results.
//!
//! Knows the IR ([`crate::rules::ir`]) and nothing of the parser, packet bytes or the tracker:
//! the engine builds a [`PacketKey`] from a parsed packet and its connection, and applies the
//! [`Evaluation`] (counters, marks, NAT, the verdict) itself.
//!
//! ```text
//!   linear      the reference: rule by rule, with a jump stack
//!   flatten     IR -> programs: chains inlined, vmaps expanded, continuations after mark sets
//!   build       programs -> decision trees (cuts over elementary intervals, shared leaves)
//!   tree        the hot path: descend, scan a short leaf, run the entry, repeat
//!   classbench  ClassBench sets as rulesets, packets with expected answers
//!   bench       `keepstate bench`: build cost and lookups/s of tree and reference
//!   trace       `keepstate trace`: matching rules and verdicts per hook
//! ```
//!
//! # Semantics (nftables, `nft_do_chain` in `net/netfilter/nf_tables_core.c`)
//!
//! - A hook runs its base chains in [`Ruleset::base_chains`] order. `accept` ends one base chain
//!   and the packet goes on to the next; `drop` and `reject` end the hook. A base chain whose
//!   rules run out (or that `return`s at its top level) applies its policy.
//! - `jump` pushes a return point (the rule after the jumping one), `goto` does not; `return` or
//!   running off the end of a chain pops it. `continue` goes on with the next statement.
//! - A vmap (`Stmt::Vmap`) applies the verdict of the first element holding the key; no element
//!   (or an absent field) skips the rest of the rule (the lookup breaks, `NFT_BREAK`).
//! - `snat`/`dnat`/`masquerade`/`redirect` end the base chain with accept: the kernel's NAT
//!   expressions write `NF_ACCEPT` into the verdict register (`nft_nat_eval`), so no statement
//!   after them runs. (`ir::Stmt::is_terminal` calls them non-terminal because the checker's
//!   rule-order checks want that; the evaluation here follows the kernel.)
//! - **Limits** are stateful, so no pure lookup can know them: both implementations call the
//!   caller's [`Limiter`] when evaluation reaches a `limit` statement, in exactly the order the
//!   kernel would, and skip the rest of the rule when it says no. A test's fake limiter
//!   therefore sees identical call sequences from [`Linear`] and [`Tree`].
//! - **`meta mark set` / `ct mark set`** change fields later rules match on; later rules see the
//!   new value, as in the kernel. [`Evaluation::meta_mark`] and [`Evaluation::ct_mark`] say what
//!   was written. `ct mark set`
//!   without a connection (no [`Field::CtMark`]) does nothing (`nft_ct_set_eval`); a value read
//!   from an absent field (`meta mark set ct mark` without a connection) breaks the rule
//!   (`nft_ct_get_eval` sets `NFT_BREAK`).
//! - `notrack` is only recorded: it does not turn later `ct state` tests into `untracked`.
//!   XXX: model notrack's effect on later `ct state` matches in the same hook if a ruleset needs it.

pub mod bench;
mod build;
pub mod classbench;
mod flatten;
mod linear;
pub mod trace;
mod tree;

use std::fmt;

use crate::rules::ir::{self, Field, Hook, MarkValue, RateUnit, Reject, RuleId, Ruleset, Stmt};

pub use build::{BuildStats, TreeOptions};
pub use linear::Linear;
pub use tree::Tree;

/// Number of [`Field`] variants; [`PacketKey`] holds one slot per field.
pub const NFIELDS: usize = 24;

/// Every field, in declaration order: `FIELDS[f as usize] == f`.
pub const FIELDS: [Field; NFIELDS] = [
    Field::Nfproto,
    Field::L4proto,
    Field::Iifname,
    Field::Oifname,
    Field::Mark,
    Field::Ip4Saddr,
    Field::Ip4Daddr,
    Field::Ip4Ttl,
    Field::Ip4Length,
    Field::Ip6Saddr,
    Field::Ip6Daddr,
    Field::Ip6Hoplimit,
    Field::Sport,
    Field::Dport,
    Field::TcpFlags,
    Field::IcmpType,
    Field::IcmpCode,
    Field::Icmp6Type,
    Field::Icmp6Code,
    Field::CtState,
    Field::CtStatus,
    Field::CtMark,
    Field::CtDirection,
    Field::CtHelper,
];

/// The slot of `f` in a [`PacketKey`]. The exhaustive match makes a new [`Field`] variant a
/// compile error here rather than a silent out-of-range index.
#[inline]
pub const fn field_index(f: Field) -> usize {
    match f {
        Field::Nfproto
        | Field::L4proto
        | Field::Iifname
        | Field::Oifname
        | Field::Mark
        | Field::Ip4Saddr
        | Field::Ip4Daddr
        | Field::Ip4Ttl
        | Field::Ip4Length
        | Field::Ip6Saddr
        | Field::Ip6Daddr
        | Field::Ip6Hoplimit
        | Field::Sport
        | Field::Dport
        | Field::TcpFlags
        | Field::IcmpType
        | Field::IcmpCode
        | Field::Icmp6Type
        | Field::Icmp6Code
        | Field::CtState
        | Field::CtStatus
        | Field::CtMark
        | Field::CtDirection
        | Field::CtHelper => f as usize,
    }
}

/// Fields wider than 32 bits (interface and helper names, IPv6 addresses), by slot.
const WIDE_FIELDS: [Field; 5] = [
    Field::Iifname,
    Field::Oifname,
    Field::Ip6Saddr,
    Field::Ip6Daddr,
    Field::CtHelper,
];

/// For each field slot, its index in [`PacketKey::wide`], or `u8::MAX` for a narrow field.
const WIDE_SLOT: [u8; NFIELDS] = {
    let mut t = [u8::MAX; NFIELDS];
    let mut i = 0;
    while i < WIDE_FIELDS.len() {
        t[field_index(WIDE_FIELDS[i])] = i as u8;
        i += 1;
    }
    t
};

/// A packet's fields as [`Field`] encodes them, and a bit per field saying whether the packet
/// has it. Fields of 32 bits or less live in `narrow` (indexed by field slot, so the tree reads
/// them with one load); the five 128-bit fields in `wide`. `Copy`, no heap, 192 bytes: building
/// one is a few stores.
///
/// Laid out (`repr(C)`, cache-line aligned) so that the presence mask and the first 15 narrow
/// slots, which hold every field of an IPv4 5-tuple, share the first cache line: a lookup of a
/// plain IPv4 packet touches one line of its key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(C, align(64))]
pub struct PacketKey {
    present: u32,
    pub(crate) narrow: [u32; NFIELDS],
    wide: [[u64; 2]; WIDE_FIELDS.len()],
}

impl Default for PacketKey {
    fn default() -> Self {
        Self::new()
    }
}

impl PacketKey {
    /// A key with every field absent.
    pub const fn new() -> Self {
        PacketKey {
            present: 0,
            narrow: [0; NFIELDS],
            wide: [[0; 2]; WIDE_FIELDS.len()],
        }
    }

    /// Sets `f` to `v`, truncated to the field's width.
    #[inline]
    pub fn set(&mut self, f: Field, v: u128) {
        let i = field_index(f);
        let v = v & f.max();
        match WIDE_SLOT[i] {
            u8::MAX => self.narrow[i] = v as u32,
            w => self.wide[w as usize] = [(v >> 64) as u64, v as u64],
        }
        self.present |= 1 << i;
    }

    /// Builder form of [`PacketKey::set`].
    pub fn with(mut self, f: Field, v: u128) -> Self {
        self.set(f, v);
        self
    }

    /// Makes `f` absent.
    pub fn clear(&mut self, f: Field) {
        let i = field_index(f);
        match WIDE_SLOT[i] {
            u8::MAX => self.narrow[i] = 0,
            w => self.wide[w as usize] = [0; 2],
        }
        self.present &= !(1 << i);
    }

    #[inline]
    pub fn get(&self, f: Field) -> Option<u128> {
        self.get_index(field_index(f))
    }

    #[inline]
    pub(crate) fn get_index(&self, i: usize) -> Option<u128> {
        if self.present & (1 << i) == 0 {
            return None;
        }
        Some(match WIDE_SLOT[i] {
            u8::MAX => self.narrow[i] as u128,
            w => {
                let [hi, lo] = self.wide[w as usize];
                (hi as u128) << 64 | lo as u128
            }
        })
    }

    /// Bit `field_index(f)` is set when the packet has field `f`.
    pub fn present_mask(&self) -> u32 {
        self.present
    }
}

impl fmt::Debug for PacketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for field in FIELDS {
            if let Some(v) = self.get(field) {
                m.entry(&field, &format_args!("{v:#x}"));
            }
        }
        m.finish()
    }
}

/// How a base chain (and so a hook) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    Accept,
    Drop,
    /// Drop, and answer with an ICMP error or TCP reset.
    Reject(Reject),
}

/// A non-terminal statement that ran: statement `stmt` of rule `rule` (counter, log,
/// `ct mark set`, `meta mark set`, `ct helper set`, `notrack`, NAT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Action {
    pub rule: RuleId,
    pub stmt: u16,
}

/// The evaluation of one base chain; indices into [`Evaluation::rules`] and
/// [`Evaluation::actions`] delimit what it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChainEval {
    pub table: u32,
    pub chain: u32,
    pub decision: Decision,
    /// True when the chain's policy decided (no rule gave a verdict).
    pub by_policy: bool,
    /// `rules[rules_end of the previous chain .. rules_end]` matched in this chain.
    pub rules_end: u32,
    pub actions_end: u32,
}

/// What a hook did to a packet. Reused across lookups: [`Classifier::eval`] clears it, so the
/// hot path allocates only while the vectors grow to their working size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation {
    /// Each base chain that ran, in order; the last one decided unless it accepted.
    pub chains: Vec<ChainEval>,
    /// Every rule whose matches all held, in evaluation order (for counters and traces). A rule
    /// whose `limit` then said no is still listed: its matches held.
    pub rules: Vec<RuleId>,
    /// Every non-terminal statement that ran, in order.
    pub actions: Vec<Action>,
    /// The hook's verdict: `Accept` when every base chain accepted (or there were none).
    pub verdict: Decision,
    /// The meta mark the last `meta mark set` wrote, if one ran.
    pub meta_mark: Option<u32>,
    /// The ct mark the last `ct mark set` wrote to the packet's connection, if one ran and the
    /// packet has a connection.
    pub ct_mark: Option<u32>,
    /// Room for the key once a mark changes, kept across lookups so the hot path neither
    /// copies nor allocates a key.
    pub(crate) scratch: Scratch,
}

/// A reusable key buffer; not part of an evaluation's value (always equal, prints nothing).
#[derive(Clone, Default)]
pub(crate) struct Scratch(pub(crate) Option<Box<PacketKey>>);

impl PartialEq for Scratch {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Scratch {}

impl fmt::Debug for Scratch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("_")
    }
}

impl Default for Evaluation {
    fn default() -> Self {
        Evaluation {
            chains: Vec::new(),
            rules: Vec::new(),
            actions: Vec::new(),
            verdict: Decision::Accept,
            meta_mark: None,
            ct_mark: None,
            scratch: Scratch::default(),
        }
    }
}

impl Evaluation {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn reset(&mut self) {
        self.chains.clear();
        self.rules.clear();
        self.actions.clear();
        self.verdict = Decision::Accept;
        self.meta_mark = None;
        self.ct_mark = None;
    }

    pub(crate) fn end_chain(
        &mut self,
        table: usize,
        chain: usize,
        decision: Decision,
        by_policy: bool,
    ) {
        self.chains.push(ChainEval {
            table: table as u32,
            chain: chain as u32,
            decision,
            by_policy,
            rules_end: self.rules.len() as u32,
            actions_end: self.actions.len() as u32,
        });
        self.verdict = decision;
    }

    /// The first rule that matched, if any (ClassBench's "first matching rule").
    pub fn first_rule(&self) -> Option<RuleId> {
        self.rules.first().copied()
    }
}

/// A `limit` statement's parameters, handed to the [`Limiter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LimitSpec {
    pub rate: u64,
    pub unit: RateUnit,
    pub burst: u32,
    pub over: bool,
}

/// The caller's token buckets. The classifier calls [`Limiter::pass`] each time evaluation
/// reaches a `limit` statement; the limiter consumes a token (or not) and says whether the rest
/// of the rule runs: under the rate for `limit rate N`, over it for `limit rate over N`
/// (`nft_limit_pkts_eval`). `stmt` is the statement's index in the rule, so `(rule, stmt)`
/// names one bucket.
pub trait Limiter {
    fn pass(&mut self, rule: RuleId, stmt: usize, limit: &LimitSpec) -> bool;
}

/// A limiter for traces and benchmarks: every limit lets the packet through.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoLimits;

impl Limiter for NoLimits {
    fn pass(&mut self, _: RuleId, _: usize, _: &LimitSpec) -> bool {
        true
    }
}

/// The one evaluation contract: the engine, the tests and the benches use only this.
pub trait Classifier {
    /// Evaluates every base chain of `hook` for `key`, writing into `out` (cleared first).
    fn eval(&self, hook: Hook, key: &PacketKey, limiter: &mut dyn Limiter, out: &mut Evaluation);

    /// The ruleset it was built from, to resolve [`Action`]s and [`RuleId`]s.
    fn ruleset(&self) -> &Ruleset;
}

/// Why a ruleset cannot be classified. The checker should already have refused all of these
/// but the last; they are here so a bad IR is an error, not a panic.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error(
        "table `{table}`, chain `{chain}`: a rule jumps to chain #{target}, which does not exist"
    )]
    NoSuchChain {
        table: String,
        chain: String,
        target: usize,
    },
    #[error("table `{table}`: chain `{chain}` can reach itself through jumps or gotos (a loop)")]
    JumpLoop { table: String, chain: String },
    #[error("rule {rule}: a concatenation or vmap of {fields} fields has an element of {got}")]
    ConcatArity {
        rule: RuleId,
        fields: usize,
        got: usize,
    },
    #[error("rule ids must be dense and in ruleset order; rule #{index} has id {id}")]
    RuleIds { index: usize, id: RuleId },
    #[error("ruleset too large to compile: {what}")]
    TooLarge { what: String },
}

/// Reads a mark value for `meta mark set` / `ct mark set`; `None` when its source field is
/// absent, which breaks the rule like a failed `ct` expression (`nft_ct_get_eval`).
#[inline]
pub(crate) fn resolve_mark(v: MarkValue, key: &PacketKey) -> Option<u32> {
    match v {
        MarkValue::Const(c) => Some(c),
        MarkValue::MetaMark => key.get(Field::Mark).map(|m| m as u32),
        MarkValue::CtMark => key.get(Field::CtMark).map(|m| m as u32),
    }
}

/// Finds the verdict of the first vmap element holding the key.
pub(crate) fn vmap_lookup(
    fields: &[Field],
    entries: &[(Vec<ir::Interval>, ir::Verdict)],
    key: &PacketKey,
) -> Option<ir::Verdict> {
    let mut vals = [0u128; NFIELDS];
    for (slot, f) in vals.iter_mut().zip(fields) {
        *slot = key.get(*f)?;
    }
    entries
        .iter()
        .find(|(ivs, _)| ivs.iter().zip(&vals).all(|(iv, v)| iv.contains(*v)))
        .map(|(_, v)| *v)
}

/// Checks what both implementations rely on: dense rule ids, jump targets that exist, no jump
/// loops, concatenation elements of the right arity.
pub(crate) fn validate(rs: &Ruleset) -> Result<(), BuildError> {
    for (index, rule) in rs.rules().enumerate() {
        if rule.id as usize != index {
            return Err(BuildError::RuleIds { index, id: rule.id });
        }
        // [`Action::stmt`] is a u16.
        if rule.stmts.len() > u16::MAX as usize {
            return Err(BuildError::TooLarge {
                what: format!("rule {} has {} statements", rule.id, rule.stmts.len()),
            });
        }
    }
    for table in &rs.tables {
        let n = table.chains.len();
        let mut edges: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (ci, chain) in table.chains.iter().enumerate() {
            for rule in &chain.rules {
                let mut targets = Vec::new();
                for m in &rule.matches {
                    if let ir::Match::Concat { fields, elems, .. } = m {
                        check_arity(rule.id, fields.len(), elems.iter().map(|e| e.len()))?;
                    }
                }
                for s in &rule.stmts {
                    match s {
                        Stmt::Verdict(v) => targets.push(*v),
                        Stmt::Vmap { fields, entries } => {
                            check_arity(rule.id, fields.len(), entries.iter().map(|e| e.0.len()))?;
                            targets.extend(entries.iter().map(|e| e.1));
                        }
                        _ => {}
                    }
                }
                for v in targets {
                    if let ir::Verdict::Jump(t) | ir::Verdict::Goto(t) = v {
                        if t >= n {
                            return Err(BuildError::NoSuchChain {
                                table: table.name.clone(),
                                chain: chain.name.clone(),
                                target: t,
                            });
                        }
                        edges[ci].push(t);
                    }
                }
            }
        }
        // Depth-first search for a cycle: 0 unvisited, 1 on the stack, 2 done.
        let mut state = vec![0u8; n];
        for start in 0..n {
            if state[start] != 0 {
                continue;
            }
            let mut stack = vec![(start, 0usize)];
            state[start] = 1;
            while let Some(&mut (c, ref mut i)) = stack.last_mut() {
                if let Some(&t) = edges[c].get(*i) {
                    *i += 1;
                    match state[t] {
                        0 => {
                            state[t] = 1;
                            stack.push((t, 0));
                        }
                        1 => {
                            return Err(BuildError::JumpLoop {
                                table: table.name.clone(),
                                chain: table.chains[t].name.clone(),
                            })
                        }
                        _ => {}
                    }
                } else {
                    state[c] = 2;
                    stack.pop();
                }
            }
        }
    }
    Ok(())
}

fn check_arity(
    rule: RuleId,
    fields: usize,
    lens: impl Iterator<Item = usize>,
) -> Result<(), BuildError> {
    if fields == 0 || fields > NFIELDS {
        return Err(BuildError::ConcatArity {
            rule,
            fields,
            got: fields,
        });
    }
    for got in lens {
        if got != fields {
            return Err(BuildError::ConcatArity { rule, fields, got });
        }
    }
    Ok(())
}

/// Maps a [`RuleId`] to its rule, for resolving [`Action`]s and traces.
pub fn rule_by_id(rs: &Ruleset, id: RuleId) -> Option<&ir::Rule> {
    // Ids are dense in `rules()` order ([`validate`]); walk tables and chains by counts.
    let mut left = id as usize;
    for t in &rs.tables {
        for c in &t.chains {
            if left < c.rules.len() {
                return c.rules.get(left);
            }
            left -= c.rules.len();
        }
    }
    None
}

/// The statement an [`Action`] names.
pub fn action_stmt(rs: &Ruleset, a: Action) -> Option<&Stmt> {
    rule_by_id(rs, a.rule)?.stmts.get(a.stmt as usize)
}

/// All five hooks, in [`Hook`]'s order.
pub const HOOKS: [Hook; 5] = [
    Hook::Prerouting,
    Hook::Input,
    Hook::Forward,
    Hook::Output,
    Hook::Postrouting,
];

#[inline]
pub(crate) fn hook_index(h: Hook) -> usize {
    match h {
        Hook::Prerouting => 0,
        Hook::Input => 1,
        Hook::Forward => 2,
        Hook::Output => 3,
        Hook::Postrouting => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_in_declaration_order() {
        for (i, f) in FIELDS.iter().enumerate() {
            assert_eq!(field_index(*f), i);
        }
    }

    #[test]
    fn wide_fields_are_exactly_those_over_32_bits() {
        for f in FIELDS {
            assert_eq!(WIDE_SLOT[field_index(f)] != u8::MAX, f.bits() > 32, "{f:?}");
        }
        let k = PacketKey::new()
            .with(Field::Ip6Saddr, u128::MAX - 1)
            .with(Field::Mark, 7);
        assert_eq!(k.get(Field::Ip6Saddr), Some(u128::MAX - 1));
        assert_eq!(k.get(Field::Mark), Some(7));
    }

    #[test]
    fn key_truncates_and_clears() {
        let mut k = PacketKey::new().with(Field::Sport, 0x1_0050);
        assert_eq!(k.get(Field::Sport), Some(0x50));
        assert_eq!(k.get(Field::Dport), None);
        k.clear(Field::Sport);
        assert_eq!(k.get(Field::Sport), None);
    }
}
