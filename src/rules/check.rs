//! The checker: applies the commands of a file in order (flush, define, tables, `add ...`),
//! resolves `$variables`, chain, set and helper names, types every value against its selector,
//! and enforces what nft (and the kernel behind it) would refuse. Every error is collected with
//! its span, in the user's words; nothing stops at the first.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use super::ast::*;
use super::ir::{self, ChainType, Family, Hook, LogLevel, MarkValue, NatFlags, NatKind, Policy};
use super::ir::{RateUnit, Reject};
use super::model::*;
use super::source::{Diagnostic, SourceMap, Span};
use super::types::{self, DType};

/// Checks parsed commands; returns the model (as complete as errors allowed) and every error.
pub fn check(map: &SourceMap, commands: Vec<Command>) -> (Model, Vec<Diagnostic>) {
    let mut cx = Checker {
        map,
        diags: Vec::new(),
        defines: HashMap::new(),
        tables: Vec::new(),
    };
    for c in commands {
        cx.command(c);
    }
    let tables = std::mem::take(&mut cx.tables);
    let mut model = Model::default();
    for t in tables {
        let mt = cx.table(t);
        model.tables.push(mt);
    }
    (model, cx.diags)
}

struct TableB {
    family: Family,
    name: String,
    sets: Vec<SetDecl>,
    helpers: Vec<HelperDecl>,
    flowtables: Vec<FlowtableDecl>,
    chains: Vec<ChainB>,
}

struct ChainB {
    name: Name,
    hook: Option<HookSpec>,
    policy: Option<Name>,
    comment: Option<String>,
    rules: Vec<RuleAst>,
}

struct Checker<'a> {
    map: &'a SourceMap,
    diags: Vec<Diagnostic>,
    defines: HashMap<String, Spanned<Expr>>,
    tables: Vec<TableB>,
}

/// What the rule's chain allows, for statement checks.
struct RuleCx<'t> {
    family: Family,
    chain_type: Option<ChainType>,
    hook: Option<Hook>,
    chains: &'t HashMap<String, bool>,
    sets: &'t HashMap<String, MSet>,
    helpers: &'t HashSet<String>,
    flowtables: &'t HashSet<String>,
}

impl<'a> Checker<'a> {
    fn err(&mut self, span: Span, msg: impl Into<String>) {
        self.diags.push(Diagnostic::at(self.map, span, msg));
    }

    // ------------------------------------------------------------------------------------
    // Pass 1: apply commands in order, substituting variables.

    fn family(&mut self, f: &Option<Spanned<FamilyKw>>) -> Option<Family> {
        match f {
            None => Some(Family::Ip),
            Some(s) => match s.node {
                FamilyKw::Ip => Some(Family::Ip),
                FamilyKw::Ip6 => Some(Family::Ip6),
                FamilyKw::Inet => Some(Family::Inet),
                other => {
                    let name = format!("{other:?}").to_lowercase();
                    self.err(
                        s.span,
                        format!("family `{name}` is not supported (use ip, ip6 or inet)"),
                    );
                    None
                }
            },
        }
    }

    fn table_index(&mut self, family: Family, name: &Name, create: bool) -> Option<usize> {
        if let Some(i) = self
            .tables
            .iter()
            .position(|t| t.family == family && t.name == name.node)
        {
            return Some(i);
        }
        if create {
            self.tables.push(TableB {
                family,
                name: name.node.clone(),
                sets: Vec::new(),
                helpers: Vec::new(),
                flowtables: Vec::new(),
                chains: Vec::new(),
            });
            return Some(self.tables.len() - 1);
        }
        self.err(
            name.span,
            format!(
                "unknown table `{}` in family {} (declare it before adding to it)",
                name.node,
                Family::name(family)
            ),
        );
        None
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::FlushRuleset => self.tables.clear(),
            Command::Define { name, value } => {
                if self.defines.contains_key(&name.node) {
                    self.err(
                        name.span,
                        format!("variable `${}` is already defined", name.node),
                    );
                    return;
                }
                let value = self.subst(value);
                self.defines.insert(name.node, value);
            }
            Command::Table {
                family,
                name,
                items,
            } => {
                let Some(fam) = self.family(&family) else {
                    return;
                };
                let Some(t) = self.table_index(fam, &name, true) else {
                    return;
                };
                for item in items {
                    self.table_item(t, item);
                }
            }
            Command::AddChain {
                family,
                table,
                chain,
            } => {
                let Some(fam) = self.family(&family) else {
                    return;
                };
                if let Some(t) = self.table_index(fam, &table, false) {
                    self.table_item(t, TableItem::Chain(chain));
                }
            }
            Command::AddRule {
                family,
                table,
                chain,
                rule,
                insert,
            } => {
                let Some(fam) = self.family(&family) else {
                    return;
                };
                let Some(t) = self.table_index(fam, &table, false) else {
                    return;
                };
                let rule = self.subst_rule(rule);
                match self.tables[t]
                    .chains
                    .iter_mut()
                    .find(|c| c.name.node == chain.node)
                {
                    Some(c) if insert => c.rules.insert(0, rule),
                    Some(c) => c.rules.push(rule),
                    None => self.err(
                        chain.span,
                        format!("unknown chain `{}` in table `{}`", chain.node, table.node),
                    ),
                }
            }
            Command::AddSet { family, table, set } => {
                let Some(fam) = self.family(&family) else {
                    return;
                };
                if let Some(t) = self.table_index(fam, &table, false) {
                    self.table_item(t, TableItem::Set(set));
                }
            }
            Command::AddElement {
                family,
                table,
                set,
                elems,
            } => {
                let Some(fam) = self.family(&family) else {
                    return;
                };
                let Some(t) = self.table_index(fam, &table, false) else {
                    return;
                };
                let elems = self.subst(elems);
                match self.tables[t]
                    .sets
                    .iter_mut()
                    .find(|s| s.name.node == set.node)
                {
                    Some(s) => {
                        let merged = match s.elements.take() {
                            Some(old) => {
                                Spanned::new(Expr::Set(vec![old, elems.clone()]), elems.span)
                            }
                            None => elems,
                        };
                        s.elements = Some(merged);
                    }
                    None => self.err(
                        set.span,
                        format!("unknown set `{}` in table `{}`", set.node, table.node),
                    ),
                }
            }
            Command::AddCtHelper {
                family,
                table,
                helper,
            } => {
                let Some(fam) = self.family(&family) else {
                    return;
                };
                if let Some(t) = self.table_index(fam, &table, false) {
                    self.table_item(t, TableItem::CtHelper(helper));
                }
            }
            Command::AddFlowtable {
                family,
                table,
                flowtable,
            } => {
                let Some(fam) = self.family(&family) else {
                    return;
                };
                if let Some(t) = self.table_index(fam, &table, false) {
                    self.table_item(t, TableItem::Flowtable(flowtable));
                }
            }
        }
    }

    fn table_item(&mut self, t: usize, item: TableItem) {
        match item {
            TableItem::Chain(c) => {
                let rules: Vec<RuleAst> = c.rules.into_iter().map(|r| self.subst_rule(r)).collect();
                let table = &mut self.tables[t];
                if let Some(existing) = table.chains.iter_mut().find(|x| x.name.node == c.name.node)
                {
                    if c.hook.is_some() {
                        existing.hook = c.hook;
                    }
                    if c.policy.is_some() {
                        existing.policy = c.policy;
                    }
                    if c.comment.is_some() {
                        existing.comment = c.comment;
                    }
                    existing.rules.extend(rules);
                } else {
                    table.chains.push(ChainB {
                        name: c.name,
                        hook: c.hook,
                        policy: c.policy,
                        comment: c.comment,
                        rules,
                    });
                }
            }
            TableItem::Set(mut s) => {
                s.elements = s.elements.map(|e| self.subst(e));
                let table = &mut self.tables[t];
                let same = |a: &[Name], b: &[Name]| {
                    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.node == y.node)
                };
                if let Some(old) = table.sets.iter_mut().find(|x| x.name.node == s.name.node) {
                    // Declaring a set again adds to it, as nft's `add set` does, if the type
                    // is the same.
                    if same(&old.key_type, &s.key_type) && old.is_map == s.is_map {
                        if let Some(new) = s.elements {
                            old.elements = Some(match old.elements.take() {
                                Some(prev) => {
                                    Spanned::new(Expr::Set(vec![prev, new.clone()]), new.span)
                                }
                                None => new,
                            });
                        }
                    } else {
                        let span = s.name.span;
                        let name = s.name.node.clone();
                        self.err(
                            span,
                            format!("set `{name}` is declared again with another type"),
                        );
                    }
                } else {
                    table.sets.push(s);
                }
            }
            TableItem::CtHelper(h) => {
                let table = &mut self.tables[t];
                if table.helpers.iter().any(|x| x.name.node == h.name.node) {
                    let span = h.name.span;
                    let name = h.name.node.clone();
                    self.err(span, format!("ct helper `{name}` is declared twice"));
                } else {
                    table.helpers.push(h);
                }
            }
            TableItem::Flowtable(mut f) => {
                f.devices = f.devices.map(|d| self.subst(d));
                let table = &mut self.tables[t];
                // Declaring a flowtable again adds its devices (nft_flowtable_update).
                match table
                    .flowtables
                    .iter_mut()
                    .find(|x| x.name.node == f.name.node)
                {
                    Some(old) => {
                        if f.hook.is_some() {
                            old.hook = f.hook;
                        }
                        old.counter |= f.counter;
                        old.flags.extend(f.flags);
                        if let Some(new) = f.devices {
                            old.devices = Some(match old.devices.take() {
                                Some(prev) => {
                                    Spanned::new(Expr::Set(vec![prev, new.clone()]), new.span)
                                }
                                None => new,
                            });
                        }
                    }
                    None => table.flowtables.push(f),
                }
            }
        }
    }

    /// Replaces every `$name` in an expression by its definition.
    fn subst(&mut self, e: Spanned<Expr>) -> Spanned<Expr> {
        let span = e.span;
        let node = match e.node {
            Expr::Var(name) => match self.defines.get(&name) {
                Some(v) => return Spanned::new(v.node.clone(), span),
                None => {
                    self.err(span, format!("undefined variable `${name}`"));
                    Expr::Var(name)
                }
            },
            Expr::Prefix(b, l) => Expr::Prefix(Box::new(self.subst(*b)), l),
            Expr::Range(a, b) => Expr::Range(Box::new(self.subst(*a)), Box::new(self.subst(*b))),
            Expr::Concat(v) => Expr::Concat(v.into_iter().map(|x| self.subst(x)).collect()),
            Expr::List(v) => Expr::List(v.into_iter().map(|x| self.subst(x)).collect()),
            Expr::Set(v) => Expr::Set(v.into_iter().map(|x| self.subst(x)).collect()),
            Expr::Or(v) => Expr::Or(v.into_iter().map(|x| self.subst(x)).collect()),
            Expr::Map(v) => Expr::Map(
                v.into_iter()
                    .map(|(k, val)| {
                        let k = self.subst(k);
                        let vs = val.span;
                        let val = match val.node {
                            MapValue::Expr(e) => {
                                MapValue::Expr(self.subst(Spanned::new(e, vs)).node)
                            }
                            MapValue::Verdict(v) => MapValue::Verdict(self.subst_verdict(v)),
                        };
                        (k, Spanned::new(val, vs))
                    })
                    .collect(),
            ),
            other => other,
        };
        Spanned::new(node, span)
    }

    fn subst_name(&mut self, n: Name) -> Name {
        if let Some(var) = n.node.strip_prefix('$') {
            match self.defines.get(var) {
                Some(Spanned {
                    node: Expr::Word(w) | Expr::Str(w),
                    ..
                }) => return Spanned::new(w.clone(), n.span),
                Some(_) => self.err(
                    n.span,
                    format!("variable `${var}` does not hold a chain name"),
                ),
                None => self.err(n.span, format!("undefined variable `${var}`")),
            }
        }
        n
    }

    fn subst_verdict(&mut self, v: VerdictAst) -> VerdictAst {
        match v {
            VerdictAst::Jump(n) => VerdictAst::Jump(self.subst_name(n)),
            VerdictAst::Goto(n) => VerdictAst::Goto(self.subst_name(n)),
            other => other,
        }
    }

    fn subst_rule(&mut self, mut r: RuleAst) -> RuleAst {
        let items = std::mem::take(&mut r.items);
        r.items = items
            .into_iter()
            .map(|it| {
                let span = it.span;
                let node = match it.node {
                    RuleItem::Relation(mut rel) => {
                        rel.mask = rel.mask.map(|m| self.subst(m));
                        let rs = rel.right.span;
                        rel.right = Spanned::new(
                            match rel.right.node {
                                Rhs::Expr(e) => Rhs::Expr(self.subst(Spanned::new(e, rs)).node),
                                Rhs::Vmap(e) => Rhs::Vmap(self.subst(Spanned::new(e, rs)).node),
                                other => other,
                            },
                            rs,
                        );
                        RuleItem::Relation(rel)
                    }
                    RuleItem::Stmt(s) => RuleItem::Stmt(match s {
                        StmtAst::Verdict(v) => StmtAst::Verdict(self.subst_verdict(v)),
                        StmtAst::Log {
                            prefix,
                            level,
                            group,
                        } => StmtAst::Log {
                            prefix: prefix.map(|p| self.subst(p)),
                            level,
                            group,
                        },
                        StmtAst::Nat(mut n) => {
                            n.addr = n
                                .addr
                                .map(|(a, b)| (self.subst(a), b.map(|b| self.subst(b))));
                            n.port = n
                                .port
                                .map(|(a, b)| (self.subst(a), b.map(|b| self.subst(b))));
                            StmtAst::Nat(n)
                        }
                        StmtAst::CtHelperSet(e) => StmtAst::CtHelperSet(self.subst(e)),
                        StmtAst::CtMarkSet(m) => StmtAst::CtMarkSet(self.subst_mark(m)),
                        StmtAst::MetaMarkSet(m) => StmtAst::MetaMarkSet(self.subst_mark(m)),
                        other => other,
                    }),
                };
                Spanned::new(node, span)
            })
            .collect();
        r
    }

    fn subst_mark(&mut self, m: Spanned<MarkSrc>) -> Spanned<MarkSrc> {
        let span = m.span;
        match m.node {
            MarkSrc::Expr(e) => {
                Spanned::new(MarkSrc::Expr(self.subst(Spanned::new(e, span)).node), span)
            }
            other => Spanned::new(other, span),
        }
    }

    // ------------------------------------------------------------------------------------
    // Pass 2: type and resolve each table.

    fn table(&mut self, t: TableB) -> MTable {
        let mut sets = Vec::new();
        for s in &t.sets {
            if let Some(ms) = self.set(t.family, s) {
                sets.push(ms);
            }
        }
        let mut helpers = Vec::new();
        for h in &t.helpers {
            if let Some(mh) = self.helper(t.family, h) {
                helpers.push(mh);
            }
        }
        let set_map: HashMap<String, MSet> =
            sets.iter().map(|s| (s.name.clone(), s.clone())).collect();
        let helper_names: HashSet<String> = helpers.iter().map(|h| h.name.clone()).collect();
        let mut flowtables = Vec::new();
        for f in &t.flowtables {
            if let Some(mf) = self.flowtable(f) {
                flowtables.push(mf);
            }
        }
        // A rule naming a flowtable that failed its checks reports only the flowtable's error.
        let flowtable_names: HashSet<String> =
            t.flowtables.iter().map(|f| f.name.node.clone()).collect();
        let chain_kinds: HashMap<String, bool> = t
            .chains
            .iter()
            .map(|c| (c.name.node.clone(), c.hook.is_some()))
            .collect();
        // A verdict map's jumps must land on a regular chain of the table, whether or not a
        // rule uses the map (nft refuses the element when it is added).
        for decl in &t.sets {
            if let Some(ms) = set_map.get(&decl.name.node) {
                for e in &ms.elems {
                    if let Some(MData::Verdict(MVerdict::Jump(n) | MVerdict::Goto(n))) = &e.data {
                        match chain_kinds.get(n) {
                            None => self.err(decl.name.span, format!("unknown chain `{n}`")),
                            Some(true) => {
                                self.err(decl.name.span, format!("cannot jump to base chain `{n}`"))
                            }
                            Some(false) => {}
                        }
                    }
                }
            }
        }
        let mut chains = Vec::new();
        for c in &t.chains {
            let base = c
                .hook
                .as_ref()
                .and_then(|h| self.base_chain(t.family, h, &c.policy));
            if c.hook.is_none() {
                if let Some(p) = &c.policy {
                    self.err(
                        p.span,
                        format!(
                            "chain `{}` has a policy but no hook: only base chains have a policy",
                            c.name.node
                        ),
                    );
                }
            }
            let rcx = RuleCx {
                family: t.family,
                chain_type: base.as_ref().map(|b| b.chain_type),
                hook: base.as_ref().map(|b| b.hook),
                chains: &chain_kinds,
                sets: &set_map,
                helpers: &helper_names,
                flowtables: &flowtable_names,
            };
            let mut rules = Vec::new();
            for r in &c.rules {
                if let Some(mr) = self.rule(&rcx, r) {
                    rules.push(mr);
                }
            }
            chains.push(MChain {
                name: c.name.node.clone(),
                base,
                rules,
                comment: c.comment.clone(),
            });
        }
        self.check_loops(&t, &chains);
        MTable {
            family: t.family,
            name: t.name,
            sets,
            helpers,
            flowtables,
            chains,
        }
    }

    /// nft refuses rulesets whose jumps and gotos form a cycle.
    fn check_loops(&mut self, t: &TableB, chains: &[MChain]) {
        let index: HashMap<&str, usize> = chains
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.as_str(), i))
            .collect();
        let mut edges: Vec<Vec<usize>> = vec![Vec::new(); chains.len()];
        for (i, c) in chains.iter().enumerate() {
            for r in &c.rules {
                for v in rule_verdicts(r) {
                    if let MVerdict::Jump(n) | MVerdict::Goto(n) = v {
                        if let Some(&j) = index.get(n.as_str()) {
                            edges[i].push(j);
                        }
                    }
                }
            }
        }
        // Depth-first search with colours; report the first cycle found from each chain.
        let mut colour = vec![0u8; chains.len()];
        fn dfs(
            u: usize,
            edges: &[Vec<usize>],
            colour: &mut [u8],
            path: &mut Vec<usize>,
        ) -> Option<Vec<usize>> {
            colour[u] = 1;
            path.push(u);
            for &v in &edges[u] {
                if colour[v] == 1 {
                    let start = path.iter().position(|&x| x == v).unwrap_or(0);
                    let mut cyc = path[start..].to_vec();
                    cyc.push(v);
                    return Some(cyc);
                }
                if colour[v] == 0 {
                    if let Some(c) = dfs(v, edges, colour, path) {
                        return Some(c);
                    }
                }
            }
            path.pop();
            colour[u] = 2;
            None
        }
        for u in 0..chains.len() {
            if colour[u] == 0 {
                let mut path = Vec::new();
                if let Some(cyc) = dfs(u, &edges, &mut colour, &mut path) {
                    let names: Vec<&str> = cyc.iter().map(|&i| chains[i].name.as_str()).collect();
                    let span = t.chains[cyc[0]].name.span;
                    self.err(span, format!("jumps form a loop: {}", names.join(" -> ")));
                }
            }
        }
    }

    fn base_chain(&mut self, family: Family, h: &HookSpec, policy: &Option<Name>) -> Option<MBase> {
        let policy = &policy.clone().map(|p| self.subst_name(p));
        let chain_type = match h.chain_type.node.as_str() {
            "filter" => ChainType::Filter,
            "nat" => ChainType::Nat,
            "route" => ChainType::Route,
            other => {
                self.err(
                    h.chain_type.span,
                    format!("unknown chain type `{other}` (expected filter, nat or route)"),
                );
                return None;
            }
        };
        let hook = match h.hook.node.as_str() {
            "prerouting" => Hook::Prerouting,
            "input" => Hook::Input,
            "forward" => Hook::Forward,
            "output" => Hook::Output,
            "postrouting" => Hook::Postrouting,
            other => {
                self.err(
                    h.hook.span,
                    format!(
                        "unknown hook `{other}` (expected prerouting, input, forward, output or postrouting)"
                    ),
                );
                return None;
            }
        };
        if chain_type == ChainType::Nat && hook == Hook::Forward {
            self.err(
                h.hook.span,
                "nat chains cannot hook forward (use prerouting, input, output or postrouting)",
            );
        }
        if chain_type == ChainType::Route && hook != Hook::Output {
            self.err(h.hook.span, "route chains can only hook output");
        }
        if let Some(d) = &h.device {
            self.err(
                d.span,
                "`device` applies only to netdev and flowtable hooks",
            );
        }
        let resolved = self.resolve_priority(&h.priority)?;
        let priority = match &resolved {
            Priority::Var(_) => 0,
            Priority::Number(n) => *n,
            Priority::Named(name, off) => match std_priority(family, hook, name) {
                Some(p) => p + off,
                None => {
                    self.err(
                        h.priority.span,
                        format!(
                            "`{name}` is not a valid priority for hook {}",
                            Hook::name(hook)
                        ),
                    );
                    0
                }
            },
        };
        let policy = match policy.as_ref().map(|p| p.node.as_str()) {
            None | Some("accept") => Policy::Accept,
            Some("drop") => Policy::Drop,
            Some(other) => {
                let span = policy.as_ref().map(|p| p.span).unwrap_or(h.span);
                self.err(
                    span,
                    format!("unknown policy `{other}` (expected accept or drop)"),
                );
                Policy::Accept
            }
        };
        Some(MBase {
            chain_type,
            hook,
            priority,
            policy,
            device: None,
        })
    }

    /// A priority with its `$variable` substituted.
    fn resolve_priority(&mut self, p: &Spanned<Priority>) -> Option<Priority> {
        let Priority::Var(v) = &p.node else {
            return Some(p.node.clone());
        };
        match self.defines.get(v).map(|d| d.node.clone()) {
            Some(Expr::Number(n)) => Some(Priority::Number(n.min(i32::MAX as u128) as i32)),
            Some(Expr::Word(w)) => Some(Priority::Named(w, 0)),
            Some(_) => {
                self.err(p.span, format!("variable `${v}` does not hold a priority"));
                None
            }
            None => {
                self.err(p.span, format!("undefined variable `${v}`"));
                None
            }
        }
    }

    /// A flowtable object (`nf_tables_newflowtable`): hook ingress at a netdev priority, each
    /// device once.
    fn flowtable(&mut self, f: &FlowtableDecl) -> Option<MFlowtable> {
        let name = &f.name.node;
        let Some((hook, prio)) = &f.hook else {
            self.err(
                f.name.span,
                format!("flowtable `{name}` needs `hook ingress priority N`"),
            );
            return None;
        };
        if hook.node != "ingress" {
            self.err(
                hook.span,
                format!(
                    "unknown flowtable hook `{}` (flowtables hook ingress)",
                    hook.node
                ),
            );
            return None;
        }
        let resolved = self.resolve_priority(prio)?;
        // The netdev family knows one priority name: filter (nft's std_prio_family_hook_compat).
        let priority = match resolved {
            Priority::Number(n) => n,
            Priority::Named(n, off) if n == "filter" => off,
            Priority::Named(n, _) => {
                self.err(
                    prio.span,
                    format!("`{n}` is not a valid flowtable priority (use a number or filter)"),
                );
                return None;
            }
            Priority::Var(_) => 0,
        };
        let mut counter = f.counter;
        for fl in &f.flags {
            match fl.node.as_str() {
                "offload" => self.err(
                    fl.span,
                    "flags offload asks for hardware offload, which keepstate does not have (its fast path is XDP; drop the flag)",
                ),
                "counter" => counter = true,
                other => self.err(
                    fl.span,
                    format!("unknown flowtable flag `{other}` (expected offload)"),
                ),
            }
        }
        let mut devices: Vec<String> = Vec::new();
        if let Some(d) = &f.devices {
            let mut names = Vec::new();
            flowtable_devices(d, &mut names);
            for (dev, span) in names {
                match dev {
                    None => self.err(span, "a flowtable device is an interface name"),
                    Some(dev) if dev.is_empty() || dev.len() > 15 => self.err(
                        span,
                        format!("`{dev}` is not an interface name (1 to 15 characters)"),
                    ),
                    Some(dev) if devices.contains(&dev) => self.err(
                        span,
                        format!("device `{dev}` is listed twice in flowtable `{name}`"),
                    ),
                    Some(dev) => devices.push(dev),
                }
            }
        }
        Some(MFlowtable {
            name: name.clone(),
            priority,
            devices,
            counter,
        })
    }

    fn helper(&mut self, family: Family, h: &HelperDecl) -> Option<MHelper> {
        let Some(ty) = &h.helper_type else {
            self.err(
                h.name.span,
                format!(
                    "ct helper `{}` needs `type \"NAME\" protocol tcp|udp`",
                    h.name.node
                ),
            );
            return None;
        };
        let protocol = match h.protocol.as_ref().map(|p| p.node.as_str()) {
            Some("tcp") => 6,
            Some("udp") => 17,
            _ => {
                let span = h.protocol.as_ref().map(|p| p.span).unwrap_or(h.name.span);
                self.err(span, "a ct helper's protocol is tcp or udp");
                return None;
            }
        };
        if !matches!(ty.node.as_str(), "ftp" | "sip") {
            self.err(
                ty.span,
                format!(
                    "unknown helper type `{}` (keepstate has ftp and sip)",
                    ty.node
                ),
            );
        }
        let l3proto = match h.l3proto.as_ref().map(|p| (p.node.as_str(), p.span)) {
            None => None,
            Some(("ip", _)) => Some(Family::Ip),
            Some(("ip6", _)) => Some(Family::Ip6),
            Some(("inet", _)) => Some(Family::Inet),
            Some((other, span)) => {
                self.err(
                    span,
                    format!("unknown l3proto `{other}` (expected ip, ip6 or inet)"),
                );
                None
            }
        };
        if l3proto.is_some() && family != Family::Inet && l3proto != Some(family) {
            if let Some(p) = &h.l3proto {
                self.err(p.span, "l3proto does not match the table's family");
            }
        }
        Some(MHelper {
            name: h.name.node.clone(),
            helper_type: ty.node.clone(),
            protocol,
            l3proto,
        })
    }

    fn set(&mut self, family: Family, s: &SetDecl) -> Option<MSet> {
        let _ = family;
        if s.key_type.is_empty() {
            self.err(s.name.span, format!("set `{}` needs a `type`", s.name.node));
            return None;
        }
        let mut key = Vec::new();
        for k in &s.key_type {
            match DType::from_set_type(&k.node) {
                Some(t) => key.push(t),
                None => {
                    self.err(
                        k.span,
                        format!(
                            "unknown set type `{}` (expected ipv4_addr, ipv6_addr, inet_service, inet_proto, ifname or mark)",
                            k.node
                        ),
                    );
                    return None;
                }
            }
        }
        let data = match &s.data_type {
            None => None,
            Some(d) if d.node == "verdict" => Some(MapData::Verdict),
            Some(d) => match DType::from_set_type(&d.node) {
                Some(t) => Some(MapData::Type(t)),
                None => {
                    self.err(d.span, format!("unknown map value type `{}`", d.node));
                    return None;
                }
            },
        };
        if s.is_map && data.is_none() {
            self.err(
                s.name.span,
                format!("map `{}` needs `type KEY : VALUE`", s.name.node),
            );
            return None;
        }
        let mut flags = Vec::new();
        for f in &s.flags {
            match f.node.as_str() {
                "constant" | "interval" | "timeout" | "dynamic" => flags.push(f.node.clone()),
                other => self.err(
                    f.span,
                    format!("unknown set flag `{other}` (expected constant, interval, timeout or dynamic)"),
                ),
            }
        }
        // nft lists flags in bit order: constant, interval, timeout, dynamic.
        let order = ["constant", "interval", "timeout", "dynamic"];
        flags.sort_by_key(|f| order.iter().position(|o| o == f));
        flags.dedup();
        let interval = flags.iter().any(|f| f == "interval");
        let mut elems = Vec::new();
        if let Some(e) = &s.elements {
            let mut items = Vec::new();
            flatten_set(e, &mut items);
            if items.is_empty() {
                self.err(e.span, "empty element list: leave out `elements = { }`");
            }
            for item in &items {
                if let Some(el) = self.element(&key, data.as_ref(), item, s.is_map) {
                    if !interval
                        && key.len() == 1
                        && el
                            .key
                            .iter()
                            .any(|a| matches!(a, Atom::Range(..) | Atom::Prefix(..)))
                    {
                        self.err(
                            item.span,
                            format!(
                                "set `{}` holds a range or prefix but lacks `flags interval`",
                                s.name.node
                            ),
                        );
                        continue;
                    }
                    elems.push(el);
                }
            }
        }
        if interval && key.len() == 1 {
            let mut b: Vec<(u128, u128)> = elems.iter().map(|e| e.key[0].bounds(key[0])).collect();
            b.sort();
            if b.windows(2).any(|w| w[1].0 <= w[0].1) {
                let span = s.elements.as_ref().map_or(s.name.span, |e| e.span);
                self.err(
                    span,
                    format!("set `{}` has overlapping elements", s.name.node),
                );
            }
        }
        Some(MSet {
            name: s.name.node.clone(),
            key,
            data,
            flags,
            elems,
            size: s.size,
            comment: s.comment.clone(),
        })
    }

    /// One element of a set or map: key atoms (one per concatenated type) and, for maps, data.
    fn element(
        &mut self,
        key: &[DType],
        data: Option<&MapData>,
        item: &Spanned<Expr>,
        is_map: bool,
    ) -> Option<MElem> {
        match (&item.node, is_map) {
            (Expr::Map(entries), true) => {
                // A single `k : v` pair wrapped by the parser.
                let (k, v) = entries.first()?;
                let keyv = self.key_atoms(key, k)?;
                let d = self.map_data(data, v)?;
                Some(MElem {
                    key: keyv,
                    data: Some(d),
                })
            }
            (_, true) => {
                self.err(item.span, "a map element needs `key : value`");
                None
            }
            (_, false) => {
                let keyv = self.key_atoms(key, item)?;
                Some(MElem {
                    key: keyv,
                    data: None,
                })
            }
        }
    }

    fn map_data(&mut self, data: Option<&MapData>, v: &Spanned<MapValue>) -> Option<MData> {
        match (data, &v.node) {
            (Some(MapData::Verdict), MapValue::Verdict(vd)) => Some(MData::Verdict(verdict_of(vd))),
            (Some(MapData::Type(t)), MapValue::Expr(e)) => {
                let a = self.atom(*t, &Spanned::new(e.clone(), v.span))?;
                Some(MData::Value(a))
            }
            (Some(MapData::Verdict), _) => {
                self.err(
                    v.span,
                    "this map holds verdicts (accept, drop, jump CHAIN, ...)",
                );
                None
            }
            _ => {
                self.err(v.span, "this map's values are not verdicts");
                None
            }
        }
    }

    fn key_atoms(&mut self, key: &[DType], e: &Spanned<Expr>) -> Option<Vec<Atom>> {
        match &e.node {
            Expr::Concat(parts) => {
                if parts.len() != key.len() {
                    self.err(
                        e.span,
                        format!(
                            "element has {} components but the key has {} ({})",
                            parts.len(),
                            key.len(),
                            key.iter().map(|t| t.name()).collect::<Vec<_>>().join(" . ")
                        ),
                    );
                    return None;
                }
                let mut out = Vec::new();
                for (p, t) in parts.iter().zip(key) {
                    out.push(self.atom(*t, p)?);
                }
                Some(out)
            }
            _ if key.len() > 1 => {
                self.err(
                    e.span,
                    format!(
                        "element needs {} components joined with `.` ({})",
                        key.len(),
                        key.iter().map(|t| t.name()).collect::<Vec<_>>().join(" . ")
                    ),
                );
                None
            }
            _ => Some(vec![self.atom(key[0], e)?]),
        }
    }

    /// Types one value (a single value, a range or a prefix) as `ty`.
    fn atom(&mut self, ty: DType, e: &Spanned<Expr>) -> Option<Atom> {
        match &e.node {
            Expr::Range(lo, hi) => {
                let a = self.scalar(ty, lo)?;
                let b = self.scalar(ty, hi)?;
                if ty == DType::Ifname || ty == DType::Str {
                    self.err(e.span, "interface names cannot form a range");
                    return None;
                }
                if a > b {
                    self.err(
                        e.span,
                        "range is backwards: the first value is larger than the second",
                    );
                    return None;
                }
                Some(Atom::Range(a, b))
            }
            Expr::Prefix(base, len) => {
                if !matches!(ty, DType::Ipv4Addr | DType::Ipv6Addr) {
                    self.err(
                        e.span,
                        format!("a prefix needs an address, not {}", ty.name()),
                    );
                    return None;
                }
                let v = self.scalar(ty, base)?;
                let bits = ty.bits();
                if u32::from(*len) > bits {
                    self.err(
                        e.span,
                        format!("prefix length {len} is longer than {bits} bits"),
                    );
                    return None;
                }
                if u32::from(*len) == bits {
                    return Some(Atom::Value(v));
                }
                let host = if *len == 0 {
                    ty.max()
                } else {
                    ty.max() >> u32::from(*len)
                };
                Some(Atom::Prefix(v & !host, *len))
            }
            Expr::Str(s) if ty == DType::Ifname && s.ends_with('*') => {
                let p = &s[..s.len() - 1];
                if p.len() > 15 {
                    self.err(e.span, "interface name is longer than 15 characters");
                    return None;
                }
                Some(Atom::Wildcard(p.to_string()))
            }
            _ => self.scalar(ty, e).map(Atom::Value),
        }
    }

    fn scalar(&mut self, ty: DType, e: &Spanned<Expr>) -> Option<u128> {
        let bad = |this: &mut Self, what: &str| {
            this.err(e.span, format!("{what} is not a valid {}", ty.name()));
            None
        };
        match (&e.node, ty) {
            (Expr::Var(_), _) => None, // already reported as undefined
            (Expr::Ipv4(a), DType::Ipv4Addr) => Some(u32::from(*a) as u128),
            (Expr::Ipv6(a), DType::Ipv6Addr) => Some(u128::from(*a)),
            (Expr::Ipv4(a), _) => bad(self, &format!("address {a}")),
            (Expr::Ipv6(a), _) => bad(self, &format!("address {a}")),
            (Expr::Number(n), DType::Ipv4Addr | DType::Ipv6Addr) if *n <= ty.max() => Some(*n),
            (Expr::Number(n), DType::Ipv4Addr | DType::Ipv6Addr | DType::Ifname | DType::Str) => {
                bad(self, &format!("number {n}"))
            }
            (Expr::Number(n), _) => {
                if *n > ty.max() {
                    self.err(
                        e.span,
                        format!(
                            "{n} is out of range for {} (at most {})",
                            ty.name(),
                            ty.max()
                        ),
                    );
                    None
                } else {
                    Some(*n)
                }
            }
            (Expr::Str(s) | Expr::Word(s), DType::Ifname | DType::Str) => {
                if s.len() > 15 {
                    self.err(e.span, format!("name `{s}` is longer than 15 characters"));
                    None
                } else {
                    Some(ir::pack_name(s))
                }
            }
            (Expr::Word(w) | Expr::Str(w), DType::InetService) => match types::service_port(w) {
                Some(p) => Some(p as u128),
                None => bad(self, &format!("`{w}`")),
            },
            (Expr::Word(w) | Expr::Str(w), DType::InetProto) => match types::proto_number(w) {
                Some(p) => Some(p as u128),
                None => bad(self, &format!("`{w}`")),
            },
            (Expr::Word(w), DType::Ipv4Addr | DType::Ipv6Addr) => {
                self.err(
                    e.span,
                    format!(
                        "`{w}` is not an address (host names are not resolved: write the address)"
                    ),
                );
                None
            }
            (Expr::Word(w) | Expr::Str(w), t) if !t.symbols().is_empty() => {
                match types::symbol_value(t.symbols(), w) {
                    Some(v) => Some(v),
                    None => {
                        let names: Vec<&str> = t.symbols().iter().map(|(n, _)| *n).collect();
                        self.err(
                            e.span,
                            format!(
                                "unknown {} `{w}` (expected one of: {})",
                                t.name(),
                                names.join(", ")
                            ),
                        );
                        None
                    }
                }
            }
            (Expr::Word(w) | Expr::Str(w), _) => bad(self, &format!("`{w}`")),
            (Expr::SetRef(n), _) => {
                self.err(
                    e.span,
                    format!("set `@{n}` cannot be used inside another set"),
                );
                None
            }
            _ => {
                self.err(e.span, format!("expected a single {} here", ty.name()));
                None
            }
        }
    }

    // ------------------------------------------------------------------------------------
    // Rules

    fn rule(&mut self, rcx: &RuleCx, r: &RuleAst) -> Option<MRule> {
        let before = self.diags.len();
        let mut items = Vec::new();
        let mut seen_stmt = false;
        let mut seen_terminal = false;
        let mut has_l4 = false;
        let mut l3: Option<Family> = None;
        for it in &r.items {
            if seen_terminal {
                self.err(it.span, "statement after a terminal verdict has no effect: move it before the verdict or remove it");
                break;
            }
            match &it.node {
                RuleItem::Relation(rel) => {
                    if seen_stmt {
                        self.err(
                            it.span,
                            "a match after a statement is not supported by keepstate: put every match before the statements",
                        );
                        continue;
                    }
                    if let Some(m) = self.relation(rcx, rel, it.span) {
                        for s in &m.sels {
                            has_l4 |= implies_l4(*s);
                            l3 = l3.or(sel_family(*s));
                        }
                        if let (Sel::MetaNfproto, MRhs::Value(Atom::Value(nf))) =
                            (m.sels[0], &m.rhs)
                        {
                            l3 = l3.or(match nf {
                                2 => Some(Family::Ip),
                                10 => Some(Family::Ip6),
                                _ => None,
                            });
                        }
                        if matches!(m.rhs, MRhs::Vmap(_) | MRhs::VmapRef(_)) {
                            // A verdict map decides like a statement: nothing may follow it
                            // but statements.
                            seen_stmt = true;
                        }
                        items.push(MItem::Match(m));
                    }
                }
                RuleItem::Stmt(s) => {
                    seen_stmt = true;
                    if let Some(mut ms) = self.stmt(rcx, s, it.span, has_l4, l3) {
                        if ms == MStmt::Reject(Reject::Default) && rcx.family == Family::Inet {
                            // With the family known, nft picks that family's port unreachable.
                            match l3 {
                                Some(Family::Ip) => ms = MStmt::Reject(Reject::Icmp(3)),
                                Some(Family::Ip6) => ms = MStmt::Reject(Reject::Icmp6(4)),
                                _ => {}
                            }
                        }
                        if ms == MStmt::Reject(Reject::TcpReset)
                            && rcx.family == Family::Inet
                            && !has_l4
                        {
                            // nft adds this dependency, and lists it.
                            items.push(MItem::Match(MMatch {
                                sels: vec![Sel::MetaL4proto],
                                mask: None,
                                op: None,
                                rhs: MRhs::Value(Atom::Value(6)),
                            }));
                        }
                        seen_terminal = stmt_is_terminal(&ms);
                        items.push(MItem::Stmt(ms));
                    }
                }
            }
        }
        if r.comment.as_ref().is_some_and(|c| c.len() > 128) {
            self.err(r.span, "comment too long: at most 128 characters");
        }
        if self.diags.len() > before {
            return None;
        }
        elide_dependencies(rcx.family, &mut items);
        Some(MRule {
            loc: self.map.loc(r.span),
            items,
            comment: r.comment.clone(),
        })
    }

    fn selector(&mut self, rcx: &RuleCx, s: &Spanned<Selector>) -> Option<Sel> {
        let sel = match (s.node.proto.as_str(), s.node.field.as_str()) {
            ("ip", "saddr") => Sel::IpSaddr,
            ("ip", "daddr") => Sel::IpDaddr,
            ("ip", "protocol") => Sel::IpProtocol,
            ("ip", "ttl") => Sel::IpTtl,
            ("ip", "length") => Sel::IpLength,
            ("ip6", "saddr") => Sel::Ip6Saddr,
            ("ip6", "daddr") => Sel::Ip6Daddr,
            ("ip6", "nexthdr") => Sel::Ip6Nexthdr,
            ("ip6", "hoplimit") => Sel::Ip6Hoplimit,
            ("tcp", "sport") => Sel::TcpSport,
            ("tcp", "dport") => Sel::TcpDport,
            ("tcp", "flags") => Sel::TcpFlags,
            ("udp", "sport") => Sel::UdpSport,
            ("udp", "dport") => Sel::UdpDport,
            ("th", "sport") => Sel::ThSport,
            ("th", "dport") => Sel::ThDport,
            ("icmp", "type") => Sel::IcmpType,
            ("icmp", "code") => Sel::IcmpCode,
            ("icmpv6", "type") => Sel::Icmp6Type,
            ("icmpv6", "code") => Sel::Icmp6Code,
            ("meta" | "", "l4proto") => Sel::MetaL4proto,
            ("meta" | "", "nfproto") => Sel::MetaNfproto,
            ("meta" | "", "iifname") => Sel::MetaIifname,
            ("meta" | "", "oifname") => Sel::MetaOifname,
            ("meta" | "", "iif") => Sel::MetaIif,
            ("meta" | "", "oif") => Sel::MetaOif,
            ("meta" | "", "mark") => Sel::MetaMark,
            ("ct", "state") => Sel::CtState,
            ("ct", "status") => Sel::CtStatus,
            ("ct", "mark") => Sel::CtMark,
            ("ct", "direction") => Sel::CtDirection,
            ("ct", "helper") => Sel::CtHelper,
            (p, f) => {
                let what = if p.is_empty() {
                    f.to_string()
                } else {
                    format!("{p} {f}")
                };
                self.err(s.span, format!("unknown or unsupported selector `{what}`"));
                return None;
            }
        };
        if sel == Sel::MetaNfproto && rcx.family != Family::Inet {
            self.err(s.span, "meta nfproto is only useful in inet tables");
            return None;
        }
        let needs = match sel {
            Sel::IpSaddr | Sel::IpDaddr | Sel::IpProtocol | Sel::IpTtl | Sel::IpLength => {
                Some(Family::Ip)
            }
            Sel::Ip6Saddr | Sel::Ip6Daddr | Sel::Ip6Nexthdr | Sel::Ip6Hoplimit => Some(Family::Ip6),
            _ => None,
        };
        if let Some(f) = needs {
            if rcx.family != Family::Inet && rcx.family != f {
                let what = if s.node.proto.is_empty() {
                    s.node.field.clone()
                } else {
                    format!("{} {}", s.node.proto, s.node.field)
                };
                self.err(
                    s.span,
                    format!(
                        "`{what}` never matches in a table of family {}",
                        Family::name(rcx.family)
                    ),
                );
                return None;
            }
        }
        Some(sel)
    }

    fn relation(&mut self, rcx: &RuleCx, rel: &Relation, span: Span) -> Option<MMatch> {
        let mut sels = Vec::new();
        for s in &rel.left {
            sels.push(self.selector(rcx, s)?);
        }
        let types: Vec<DType> = sels.iter().map(|s| sel_type(*s)).collect();
        let ty = types[0];
        let op = rel.op.as_ref().map(|o| o.node);
        let mut mask = None;
        if let Some(m) = &rel.mask {
            if sels.len() > 1 {
                self.err(m.span, "a mask cannot apply to a concatenation");
                return None;
            }
            mask = Some(self.flag_value(ty, m)?);
        }
        let rs = rel.right.span;
        let rhs = match &rel.right.node {
            Rhs::Vmap(e) => {
                if op.is_some() || mask.is_some() {
                    self.err(span, "vmap takes no operator or mask");
                    return None;
                }
                match e {
                    Expr::Map(entries) => {
                        let mut elems = Vec::new();
                        for (k, v) in entries {
                            let key = self.key_atoms(&types, k)?;
                            let d = self.map_data(Some(&MapData::Verdict), v)?;
                            elems.push(MElem { key, data: Some(d) });
                        }
                        self.check_vmap_targets(rcx, &elems, rs);
                        MRhs::Vmap(elems)
                    }
                    Expr::SetRef(n) => {
                        let Some(set) = rcx.sets.get(n) else {
                            self.err(rs, format!("unknown map `@{n}`"));
                            return None;
                        };
                        if set.data != Some(MapData::Verdict) {
                            self.err(rs, format!("`@{n}` is not a verdict map"));
                            return None;
                        }
                        if set.key != types {
                            self.err(
                                rs,
                                format!(
                                    "map `@{n}` is keyed by {}, not {}",
                                    type_list(&set.key),
                                    type_list(&types)
                                ),
                            );
                            return None;
                        }
                        MRhs::VmapRef(n.clone())
                    }
                    _ => {
                        self.err(rs, "vmap needs `{ key : verdict, ... }` or `@map`");
                        return None;
                    }
                }
            }
            Rhs::FlagMask(vals, masks) => {
                if !ty.is_bitmask() || sels.len() > 1 {
                    self.err(rs, "`value / mask` applies to flag types such as tcp flags");
                    return None;
                }
                let mut v = 0;
                for w in vals {
                    v |= self.flag_value(ty, &Spanned::new(Expr::Word(w.node.clone()), w.span))?;
                }
                let mut m = 0;
                for w in masks {
                    m |= self.flag_value(ty, &Spanned::new(Expr::Word(w.node.clone()), w.span))?;
                }
                mask = Some(m);
                return Some(MMatch {
                    sels,
                    mask,
                    op: op.or(Some(RelOp::Eq)),
                    rhs: MRhs::Value(Atom::Value(v)),
                });
            }
            Rhs::Expr(e) => {
                let mut e = Spanned::new(e.clone(), rs);
                // nft turns a set literal of one element into that element when it parses it.
                if let Expr::Set(items) = &e.node {
                    let mut flat = Vec::new();
                    flatten_set(&e, &mut flat);
                    if items.len() == 1 && flat.len() == 1 && sels.len() == 1 {
                        e = flat.pop().expect("one element");
                    }
                }
                match &e.node {
                    Expr::Or(_) if ty.is_bitmask() => {
                        let v = self.flag_value(ty, &e)?;
                        if op.is_none() && mask.is_none() {
                            MRhs::Flags(vec![v])
                        } else {
                            MRhs::Value(Atom::Value(v))
                        }
                    }
                    Expr::Set(_) => {
                        if mask.is_some() {
                            self.err(rs, "a mask cannot be combined with a set");
                            return None;
                        }
                        let mut items = Vec::new();
                        flatten_set(&e, &mut items);
                        let mut elems = Vec::new();
                        for it in &items {
                            let key = self.key_atoms(&types, it)?;
                            elems.push(MElem { key, data: None });
                        }
                        if let Some(o) = op {
                            if !matches!(o, RelOp::Eq | RelOp::Ne) {
                                self.err(rs, "only == and != apply to a set");
                                return None;
                            }
                        }
                        MRhs::Set(elems)
                    }
                    Expr::SetRef(n) => {
                        let Some(set) = rcx.sets.get(n) else {
                            self.err(rs, format!("unknown set `@{n}`"));
                            return None;
                        };
                        if set.data.is_some() {
                            self.err(rs, format!("`@{n}` is a map: use it with vmap or map"));
                            return None;
                        }
                        if set.key != types {
                            self.err(
                                rs,
                                format!(
                                    "set `@{n}` holds {}, not {}",
                                    type_list(&set.key),
                                    type_list(&types)
                                ),
                            );
                            return None;
                        }
                        MRhs::SetRef(n.clone())
                    }
                    Expr::List(items) => {
                        if !ty.is_bitmask() || sels.len() > 1 {
                            self.err(rs, "a list of values needs braces: write `{ a, b }`");
                            return None;
                        }
                        let mut v = Vec::new();
                        for it in items {
                            v.push(self.flag_value(ty, it)?);
                        }
                        if matches!(op, Some(o) if !matches!(o, RelOp::Eq | RelOp::Ne)) {
                            self.err(rs, "only == and != apply to a list of flags");
                            return None;
                        }
                        MRhs::Flags(v)
                    }
                    Expr::Concat(_) => {
                        let key = self.key_atoms(&types, &e)?;
                        MRhs::Set(vec![MElem { key, data: None }])
                    }
                    _ => {
                        if sels.len() > 1 {
                            self.err(
                                rs,
                                format!("expected {} values joined with `.`", sels.len()),
                            );
                            return None;
                        }
                        let a = self.atom(ty, &e)?;
                        if let Some(o) = op {
                            if matches!(o, RelOp::Lt | RelOp::Gt | RelOp::Le | RelOp::Ge)
                                && !matches!(a, Atom::Value(_))
                            {
                                self.err(rs, "<, >, <= and >= compare with a single value");
                                return None;
                            }
                            if matches!(o, RelOp::Lt | RelOp::Gt | RelOp::Le | RelOp::Ge)
                                && matches!(ty, DType::Ifname | DType::Str)
                            {
                                self.err(rs, "names cannot be compared with <, >, <= or >=");
                                return None;
                            }
                        }
                        if ty.is_bitmask() && op.is_none() && mask.is_none() {
                            if let Atom::Value(v) = a {
                                MRhs::Flags(vec![v])
                            } else {
                                MRhs::Value(a)
                            }
                        } else {
                            MRhs::Value(a)
                        }
                    }
                }
            }
        };
        if let MRhs::Vmap(_) | MRhs::VmapRef(_) = rhs {
            // handled above
        }
        Some(MMatch {
            sels,
            mask,
            op,
            rhs,
        })
    }

    fn check_vmap_targets(&mut self, rcx: &RuleCx, elems: &[MElem], span: Span) {
        for e in elems {
            if let Some(MData::Verdict(MVerdict::Jump(n) | MVerdict::Goto(n))) = &e.data {
                match rcx.chains.get(n) {
                    None => self.err(span, format!("unknown chain `{n}`")),
                    Some(true) => self.err(span, format!("cannot jump to base chain `{n}`")),
                    Some(false) => {}
                }
            }
        }
    }

    /// A flag or number for masks and flag lists: `syn`, `0x12`, `(syn|ack)`.
    fn flag_value(&mut self, ty: DType, e: &Spanned<Expr>) -> Option<u128> {
        match &e.node {
            Expr::Or(items) | Expr::List(items) => {
                let mut v = 0;
                for it in items {
                    v |= self.flag_value(ty, it)?;
                }
                Some(v)
            }
            Expr::Number(n) => {
                if *n > ty.max() {
                    self.err(e.span, format!("{n} is out of range for {}", ty.name()));
                    None
                } else {
                    Some(*n)
                }
            }
            _ => self.scalar(ty, e),
        }
    }

    fn stmt(
        &mut self,
        rcx: &RuleCx,
        s: &StmtAst,
        span: Span,
        has_l4: bool,
        l3: Option<Family>,
    ) -> Option<MStmt> {
        Some(match s {
            StmtAst::Verdict(v) => {
                let mv = verdict_of(v);
                if let VerdictAst::Jump(n) | VerdictAst::Goto(n) = v {
                    match rcx.chains.get(&n.node) {
                        None => {
                            self.err(n.span, format!("unknown chain `{}`", n.node));
                            return None;
                        }
                        Some(true) => {
                            self.err(n.span, format!("cannot jump to base chain `{}`", n.node));
                            return None;
                        }
                        Some(false) => {}
                    }
                }
                MStmt::Verdict(mv)
            }
            StmtAst::Reject(r) => {
                let rej = match r {
                    None => Reject::Default,
                    Some(RejectAst::TcpReset) => Reject::TcpReset,
                    Some(RejectAst::Icmp(fam, code)) => {
                        let (table, which, needs) = match fam.as_str() {
                            "icmp" => (types::ICMP_CODES, 0, Some(Family::Ip)),
                            "icmpv6" => (types::ICMPV6_CODES, 1, Some(Family::Ip6)),
                            _ => (types::ICMPX_CODES, 2, None),
                        };
                        if which == 2 && rcx.family != Family::Inet {
                            self.err(span, "`reject with icmpx` applies only to inet tables: use icmp or icmpv6");
                            return None;
                        }
                        if let Some(f) = needs {
                            if rcx.family != Family::Inet && rcx.family != f {
                                self.err(
                                    span,
                                    format!(
                                        "`reject with {fam}` cannot apply in a table of family {}",
                                        Family::name(rcx.family)
                                    ),
                                );
                                return None;
                            }
                        }
                        let v = match types::symbol_value(table, &code.node)
                            .or_else(|| code.node.parse::<u8>().ok().map(u128::from))
                        {
                            Some(v) => v as u8,
                            None => {
                                let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
                                self.err(
                                    code.span,
                                    format!(
                                        "unknown {fam} reject code `{}` (expected one of: {})",
                                        code.node,
                                        names.join(", ")
                                    ),
                                );
                                return None;
                            }
                        };
                        match which {
                            0 => Reject::Icmp(v),
                            1 => Reject::Icmp6(v),
                            _ => Reject::Icmpx(v),
                        }
                    }
                };
                // nft lists each family's default as a bare `reject`.
                let rej = match (rcx.family, rej) {
                    (Family::Ip, Reject::Icmp(3)) => Reject::Default,
                    (Family::Ip6, Reject::Icmp6(4)) => Reject::Default,
                    (Family::Inet, Reject::Icmpx(1)) => Reject::Default,
                    (_, r) => r,
                };
                if rcx
                    .hook
                    .is_some_and(|h| !matches!(h, Hook::Input | Hook::Forward | Hook::Output))
                {
                    self.err(
                        span,
                        "reject is only valid in the input, forward and output hooks",
                    );
                    return None;
                }
                MStmt::Reject(rej)
            }
            StmtAst::Counter(c) => {
                let (p, b) = c.unwrap_or((0, 0));
                MStmt::Counter(p, b)
            }
            StmtAst::Log {
                prefix,
                level,
                group,
            } => {
                let prefix = match prefix {
                    None => None,
                    Some(Spanned {
                        node: Expr::Str(s) | Expr::Word(s),
                        span,
                    }) => {
                        if s.len() > 127 {
                            self.err(*span, "log prefix too long: at most 127 characters");
                            return None;
                        }
                        Some(s.clone())
                    }
                    Some(p) => {
                        self.err(p.span, "a log prefix is a quoted string");
                        return None;
                    }
                };
                let level = match level {
                    None => None,
                    Some(l) => Some(match l.node.as_str() {
                        "emerg" => LogLevel::Emerg,
                        "alert" => LogLevel::Alert,
                        "crit" => LogLevel::Crit,
                        "err" => LogLevel::Err,
                        "warn" => LogLevel::Warn,
                        "notice" => LogLevel::Notice,
                        "info" => LogLevel::Info,
                        "debug" => LogLevel::Debug,
                        "audit" => LogLevel::Audit,
                        other => {
                            self.err(
                                l.span,
                                format!("unknown log level `{other}` (expected emerg, alert, crit, err, warn, notice, info, debug or audit)"),
                            );
                            return None;
                        }
                    }),
                };
                MStmt::Log {
                    prefix,
                    level,
                    group: *group,
                }
            }
            StmtAst::Limit {
                over,
                rate,
                unit,
                burst,
            } => {
                let u = match unit.node.as_str() {
                    "second" => RateUnit::Second,
                    "minute" => RateUnit::Minute,
                    "hour" => RateUnit::Hour,
                    "day" => RateUnit::Day,
                    "week" => RateUnit::Week,
                    other => {
                        self.err(
                            unit.span,
                            format!("unknown rate unit `{other}` (expected second, minute, hour, day or week)"),
                        );
                        return None;
                    }
                };
                if *rate == 0 {
                    self.err(span, "a limit rate must be at least 1");
                    return None;
                }
                MStmt::Limit {
                    over: *over,
                    rate: *rate,
                    unit: u,
                    burst: *burst,
                }
            }
            StmtAst::Nat(n) => MStmt::Nat(self.nat(rcx, n, span, has_l4, l3)?),
            StmtAst::CtHelperSet(e) => {
                let name = match &e.node {
                    Expr::Str(s) | Expr::Word(s) => s.clone(),
                    _ => {
                        self.err(e.span, "ct helper set takes the name of a ct helper object");
                        return None;
                    }
                };
                if !rcx.helpers.contains(&name) {
                    self.err(
                        e.span,
                        format!("unknown ct helper `{name}` (declare `ct helper {name} {{ type \"ftp\" protocol tcp; }}` in this table)"),
                    );
                    return None;
                }
                MStmt::CtHelperSet(name)
            }
            StmtAst::CtMarkSet(m) => MStmt::CtMarkSet(self.mark_value(m)?),
            StmtAst::MetaMarkSet(m) => MStmt::MetaMarkSet(self.mark_value(m)?),
            StmtAst::Notrack => MStmt::Notrack,
            StmtAst::FlowAdd(name) => {
                if !rcx.flowtables.contains(&name.node) {
                    self.err(
                        name.span,
                        format!(
                            "unknown flowtable `@{0}` (declare `flowtable {0} {{ hook ingress priority 0; devices = {{ ... }} }}` in this table)",
                            name.node
                        ),
                    );
                    return None;
                }
                // nft_flow_offload_validate: the forward hook only.
                if rcx.hook.is_some_and(|h| h != Hook::Forward) {
                    self.err(span, "flow add is only valid in the forward hook");
                    return None;
                }
                MStmt::FlowAdd(name.node.clone())
            }
        })
    }

    fn mark_value(&mut self, m: &Spanned<MarkSrc>) -> Option<MarkValue> {
        match &m.node {
            MarkSrc::CtMark => Some(MarkValue::CtMark),
            MarkSrc::MetaMark => Some(MarkValue::MetaMark),
            MarkSrc::Expr(e) => {
                let v = self.scalar(DType::Mark, &Spanned::new(e.clone(), m.span))?;
                Some(MarkValue::Const(v as u32))
            }
        }
    }

    fn nat(
        &mut self,
        rcx: &RuleCx,
        n: &NatAst,
        span: Span,
        has_l4: bool,
        l3: Option<Family>,
    ) -> Option<MNat> {
        let kind = match n.kind {
            NatKindAst::Snat => NatKind::Snat,
            NatKindAst::Dnat => NatKind::Dnat,
            NatKindAst::Masquerade => NatKind::Masquerade,
            NatKindAst::Redirect => NatKind::Redirect,
        };
        let kw = match kind {
            NatKind::Snat => "snat",
            NatKind::Dnat => "dnat",
            NatKind::Masquerade => "masquerade",
            NatKind::Redirect => "redirect",
        };
        if rcx.chain_type != Some(ChainType::Nat) {
            self.err(
                span,
                format!("`{kw}` is only allowed in a nat chain (type nat hook ...)"),
            );
            return None;
        }
        let ok_hooks: &[Hook] = match kind {
            NatKind::Snat | NatKind::Masquerade => &[Hook::Postrouting, Hook::Input],
            NatKind::Dnat | NatKind::Redirect => &[Hook::Prerouting, Hook::Output],
        };
        if let Some(h) = rcx.hook {
            if !ok_hooks.contains(&h) {
                let names: Vec<&str> = ok_hooks.iter().map(|h| Hook::name(*h)).collect();
                self.err(
                    span,
                    format!("`{kw}` is only valid in the {} hooks", names.join(" and ")),
                );
                return None;
            }
        }
        let mut family = match n.family.as_deref() {
            Some("ip") => Some(Family::Ip),
            Some("ip6") => Some(Family::Ip6),
            _ => None,
        };
        if let Some(f) = family {
            if rcx.family != Family::Inet && rcx.family != f {
                self.err(
                    span,
                    format!(
                        "`{kw} {}` does not fit a table of family {}",
                        Family::name(f),
                        Family::name(rcx.family)
                    ),
                );
                return None;
            }
        }
        if let Some((sels, map)) = &n.map {
            let m = self.nat_map(rcx, kw, sels, map, family, has_l4, l3)?;
            let flags = nat_flags(&n.flags);
            let family = (rcx.family == Family::Inet).then_some(m.family);
            return Some(MNat {
                kind,
                family,
                addr: None,
                port: None,
                flags,
                map: Some(m),
            });
        }
        if n.addr_port {
            self.err(
                span,
                format!("`{kw} addr . port to` needs a map (`... map {{ KEY : ADDR . PORT }}`)"),
            );
            return None;
        }
        let mut addr = None;
        if let Some((lo, hi)) = &n.addr {
            let a = self.ip(lo)?;
            let b = match hi {
                Some(h) => Some(self.ip(h)?),
                None => None,
            };
            let v6 = a.is_ipv6();
            if b.is_some_and(|b| b.is_ipv6() != v6) {
                self.err(
                    lo.span,
                    "the two ends of an address range are of different families",
                );
                return None;
            }
            let addr_family = if v6 { Family::Ip6 } else { Family::Ip };
            match (rcx.family, family) {
                (Family::Inet, None) if l3 == Some(addr_family) => family = Some(addr_family),
                (Family::Inet, None) => {
                    self.err(
                        span,
                        format!("in an inet table write `{kw} {} to ...` to say which family to translate", Family::name(addr_family)),
                    );
                    return None;
                }
                (_, Some(f)) if f != addr_family => {
                    self.err(
                        lo.span,
                        format!("address is not an {} address", Family::name(f)),
                    );
                    return None;
                }
                (f, None) if f != addr_family => {
                    self.err(
                        lo.span,
                        format!("address does not fit a table of family {}", Family::name(f)),
                    );
                    return None;
                }
                _ => {}
            }
            if let Some(b) = b {
                if b < a {
                    self.err(lo.span, "address range is backwards");
                    return None;
                }
            }
            addr = Some((a, b));
        } else if matches!(kind, NatKind::Snat | NatKind::Dnat) {
            self.err(span, format!("`{kw} to` needs an address"));
            return None;
        }
        let mut port = None;
        if let Some((lo, hi)) = &n.port {
            let a = self.scalar(DType::InetService, lo)? as u16;
            let b = match hi {
                Some(h) => Some(self.scalar(DType::InetService, h)? as u16),
                None => None,
            };
            if b.is_some_and(|b| b < a) {
                self.err(lo.span, "port range is backwards");
                return None;
            }
            if !has_l4 {
                self.err(
                    lo.span,
                    "a port translation needs a transport protocol match earlier in the rule (for example `tcp dport 80` or `meta l4proto tcp`)",
                );
                return None;
            }
            port = Some((a, b));
        }
        if rcx.family != Family::Inet {
            // `snat ip to` in an ip table is just `snat to`.
            family = None;
        }
        let flags = nat_flags(&n.flags);
        Some(MNat {
            kind,
            family,
            addr,
            port,
            flags,
            map: None,
        })
    }

    /// `snat|dnat [ip|ip6] [addr . port] to SELECTORS map { KEY : ADDR [. PORT], ... }`: the
    /// key is typed by its selectors, as a set's; the data is an address of one family, or
    /// an address and a port (which needs a transport protocol, from an earlier match or from
    /// the key itself).
    #[allow(clippy::too_many_arguments)]
    fn nat_map(
        &mut self,
        rcx: &RuleCx,
        kw: &str,
        sels: &[Spanned<Selector>],
        map: &Spanned<Expr>,
        family: Option<Family>,
        has_l4: bool,
        l3: Option<Family>,
    ) -> Option<MNatMap> {
        let mut msels = Vec::new();
        for s in sels {
            msels.push(self.selector(rcx, s)?);
        }
        let types: Vec<DType> = msels.iter().map(|s| sel_type(*s)).collect();
        let entries = match &map.node {
            Expr::Map(entries) => entries,
            Expr::SetRef(n) => {
                self.err(
                    map.span,
                    format!("named maps (`@{n}`) in NAT statements are not supported yet: write the map in the rule"),
                );
                return None;
            }
            _ => {
                self.err(map.span, "expected a map: `{ KEY : ADDRESS, ... }`");
                return None;
            }
        };
        let l4_in_key = types.contains(&DType::InetService);
        let mut elems = Vec::new();
        let mut fam: Option<Family> = None;
        for (k, v) in entries {
            let key = self.key_atoms(&types, k)?;
            let MapValue::Expr(e) = &v.node else {
                self.err(v.span, "a NAT map's data is an address (or address . port)");
                return None;
            };
            let whole = Spanned::new(e.clone(), v.span);
            let (a, p) = match e {
                Expr::Concat(parts) if parts.len() == 2 => (&parts[0], Some(&parts[1])),
                _ => (&whole, None),
            };
            let addr = self.ip(a)?;
            let port = match p {
                Some(p) => {
                    if !has_l4 && !l4_in_key {
                        self.err(
                            v.span,
                            "a port translation needs a transport protocol match earlier in the rule (for example `tcp dport 80` or `meta l4proto tcp`)",
                        );
                        return None;
                    }
                    Some(self.scalar(DType::InetService, p)? as u16)
                }
                None => None,
            };
            let f = if addr.is_ipv6() {
                Family::Ip6
            } else {
                Family::Ip
            };
            if fam.is_some_and(|x| x != f) {
                self.err(
                    v.span,
                    "the addresses of a NAT map are of different families",
                );
                return None;
            }
            fam = Some(f);
            elems.push(MElem {
                key,
                data: Some(MData::Nat(addr, port)),
            });
        }
        let Some(f) = fam else {
            self.err(map.span, "a NAT map needs at least one element");
            return None;
        };
        match (rcx.family, family) {
            (_, Some(x)) if x != f => {
                self.err(
                    map.span,
                    format!("the map's addresses are not {} addresses", Family::name(x)),
                );
                return None;
            }
            (Family::Inet, None) if l3 != Some(f) => {
                self.err(
                    map.span,
                    format!(
                        "in an inet table write `{kw} {} to ...` to say which family to translate",
                        Family::name(f)
                    ),
                );
                return None;
            }
            (t, None) if t != Family::Inet && t != f => {
                self.err(
                    map.span,
                    format!(
                        "the map's addresses do not fit a table of family {}",
                        Family::name(t)
                    ),
                );
                return None;
            }
            _ => {}
        }
        Some(MNatMap {
            sels: msels,
            elems,
            family: f,
        })
    }

    fn ip(&mut self, e: &Spanned<Expr>) -> Option<IpAddr> {
        match &e.node {
            Expr::Ipv4(a) => Some(IpAddr::V4(*a)),
            Expr::Ipv6(a) => Some(IpAddr::V6(*a)),
            Expr::Var(_) => None,
            _ => {
                self.err(e.span, "expected an IP address");
                None
            }
        }
    }
}

/// Every verdict a rule can produce (its own and those of its verdict maps).
fn rule_verdicts(r: &MRule) -> Vec<&MVerdict> {
    let mut out = Vec::new();
    for it in &r.items {
        match it {
            MItem::Stmt(MStmt::Verdict(v)) => out.push(v),
            MItem::Match(MMatch {
                rhs: MRhs::Vmap(elems),
                ..
            }) => {
                for e in elems {
                    if let Some(MData::Verdict(v)) = &e.data {
                        out.push(v);
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The elements of a set or map literal, with nested sets (from `define`s) spliced in and
/// each `k : v` entry of a map as its own one-entry map.
fn flatten_set(e: &Spanned<Expr>, out: &mut Vec<Spanned<Expr>>) {
    match &e.node {
        Expr::Set(items) => {
            for it in items {
                flatten_set(it, out);
            }
        }
        Expr::Map(entries) => {
            for entry in entries {
                out.push(Spanned::new(Expr::Map(vec![entry.clone()]), entry.0.span));
            }
        }
        _ => out.push(e.clone()),
    }
}

fn verdict_of(v: &VerdictAst) -> MVerdict {
    match v {
        VerdictAst::Accept => MVerdict::Accept,
        VerdictAst::Drop => MVerdict::Drop,
        VerdictAst::Continue => MVerdict::Continue,
        VerdictAst::Return => MVerdict::Return,
        VerdictAst::Jump(n) => MVerdict::Jump(n.node.clone()),
        VerdictAst::Goto(n) => MVerdict::Goto(n.node.clone()),
    }
}

fn stmt_is_terminal(s: &MStmt) -> bool {
    matches!(
        s,
        MStmt::Reject(_)
            | MStmt::Verdict(
                MVerdict::Accept
                    | MVerdict::Drop
                    | MVerdict::Return
                    | MVerdict::Jump(_)
                    | MVerdict::Goto(_)
            )
    )
}

/// The IP family a selector implies, if any.
fn sel_family(s: Sel) -> Option<Family> {
    match s {
        Sel::IpSaddr | Sel::IpDaddr | Sel::IpProtocol | Sel::IpTtl | Sel::IpLength => {
            Some(Family::Ip)
        }
        Sel::IcmpType | Sel::IcmpCode => Some(Family::Ip),
        Sel::Ip6Saddr | Sel::Ip6Daddr | Sel::Ip6Nexthdr | Sel::Ip6Hoplimit => Some(Family::Ip6),
        Sel::Icmp6Type | Sel::Icmp6Code => Some(Family::Ip6),
        _ => None,
    }
}

/// Removes protocol matches that a later match implies, as nft's listing does
/// (payload dependency elimination): `meta l4proto tcp tcp dport 22` lists as `tcp dport 22`,
/// `meta l4proto udp th dport 53` as `udp dport 53`, `meta nfproto ipv4 ip saddr ...` as
/// `ip saddr ...`. The meaning is unchanged: the later match carries the dependency.
fn elide_dependencies(family: Family, items: &mut Vec<MItem>) {
    #[derive(Clone, Copy, PartialEq)]
    enum Dep {
        L4(u128),
        Nf(u128),
    }
    let mut remove = vec![false; items.len()];
    for i in 0..items.len() {
        let (sel0, v) = match &items[i] {
            MItem::Match(MMatch {
                sels,
                mask: None,
                op: None | Some(RelOp::Eq),
                rhs: MRhs::Value(Atom::Value(v)),
            }) if sels.len() == 1 => (sels[0], *v),
            _ => continue,
        };
        let v = &v;
        let dep = match sel0 {
            Sel::MetaL4proto => Dep::L4(*v),
            Sel::IpProtocol if family == Family::Ip => Dep::L4(*v),
            Sel::Ip6Nexthdr if family == Family::Ip6 => Dep::L4(*v),
            Sel::MetaNfproto if family == Family::Inet => Dep::Nf(*v),
            Sel::IpProtocol | Sel::Ip6Nexthdr => {
                // In inet the dependency stays, but a later `th` port becomes tcp/udp.
                for it in items.iter_mut().skip(i + 1) {
                    if let MItem::Match(m) = it {
                        for s in m.sels.iter_mut() {
                            *s = match (*v, *s) {
                                (6, Sel::ThSport) => Sel::TcpSport,
                                (6, Sel::ThDport) => Sel::TcpDport,
                                (17, Sel::ThSport) => Sel::UdpSport,
                                (17, Sel::ThDport) => Sel::UdpDport,
                                (_, other) => other,
                            };
                        }
                    }
                }
                continue;
            }
            _ => continue,
        };
        for item in items.iter_mut().skip(i + 1) {
            let hit = match item {
                MItem::Match(m) => {
                    let mut hit = false;
                    for s in m.sels.iter_mut() {
                        let implied = match (dep, *s) {
                            (Dep::L4(6), Sel::TcpSport | Sel::TcpDport | Sel::TcpFlags) => true,
                            (Dep::L4(17), Sel::UdpSport | Sel::UdpDport) => true,
                            (Dep::L4(1), Sel::IcmpType | Sel::IcmpCode) => true,
                            (Dep::L4(58), Sel::Icmp6Type | Sel::Icmp6Code) => true,
                            (Dep::L4(6), Sel::ThSport) => {
                                *s = Sel::TcpSport;
                                true
                            }
                            (Dep::L4(6), Sel::ThDport) => {
                                *s = Sel::TcpDport;
                                true
                            }
                            (Dep::L4(17), Sel::ThSport) => {
                                *s = Sel::UdpSport;
                                true
                            }
                            (Dep::L4(17), Sel::ThDport) => {
                                *s = Sel::UdpDport;
                                true
                            }
                            (Dep::Nf(nf), sel) => {
                                sel_family(sel)
                                    == Some(if nf == 2 { Family::Ip } else { Family::Ip6 })
                            }
                            _ => false,
                        };
                        hit |= implied;
                    }
                    if let (Dep::Nf(nf), [Sel::MetaL4proto], MRhs::Value(Atom::Value(p))) =
                        (dep, m.sels.as_slice(), &m.rhs)
                    {
                        hit |= (nf == 2 && *p == 1) || (nf == 10 && *p == 58);
                    }
                    hit
                }
                MItem::Stmt(MStmt::Reject(r)) => {
                    let r = *r;
                    matches!(
                        (dep, r),
                        (Dep::Nf(2), Reject::Icmp(_)) | (Dep::Nf(10), Reject::Icmp6(_))
                    ) || (family != Family::Inet && dep == Dep::L4(6) && r == Reject::TcpReset)
                }
                MItem::Stmt(_) => false,
            };
            if hit {
                remove[i] = true;
                break;
            }
        }
    }
    let mut k = 0;
    items.retain(|_| {
        k += 1;
        !remove[k - 1]
    });
}

fn type_list(t: &[DType]) -> String {
    t.iter().map(|t| t.name()).collect::<Vec<_>>().join(" . ")
}

/// True when matching the selector implies a transport protocol (for NAT port checks).
fn implies_l4(s: Sel) -> bool {
    matches!(
        s,
        Sel::TcpSport
            | Sel::TcpDport
            | Sel::TcpFlags
            | Sel::UdpSport
            | Sel::UdpDport
            | Sel::ThSport
            | Sel::ThDport
            | Sel::MetaL4proto
            | Sel::IpProtocol
            | Sel::Ip6Nexthdr
    )
}

/// The datatype of a selector's values.
/// `random`, `fully-random`, `persistent` (the grammar admits no other word).
fn nat_flags(words: &[Name]) -> NatFlags {
    let mut flags = NatFlags::default();
    for f in words {
        match f.node.as_str() {
            "random" => flags.random = true,
            "fully-random" => flags.fully_random = true,
            _ => flags.persistent = true,
        }
    }
    flags
}

pub fn sel_type(s: Sel) -> DType {
    match s {
        Sel::IpSaddr | Sel::IpDaddr => DType::Ipv4Addr,
        Sel::Ip6Saddr | Sel::Ip6Daddr => DType::Ipv6Addr,
        Sel::IpProtocol | Sel::Ip6Nexthdr | Sel::MetaL4proto => DType::InetProto,
        Sel::IpTtl | Sel::Ip6Hoplimit => DType::Integer(8),
        Sel::IpLength => DType::Integer(16),
        Sel::TcpSport | Sel::TcpDport | Sel::UdpSport | Sel::UdpDport => DType::InetService,
        Sel::ThSport | Sel::ThDport => DType::InetService,
        Sel::TcpFlags => DType::TcpFlag,
        Sel::IcmpType => DType::IcmpType,
        Sel::IcmpCode => DType::IcmpCode,
        Sel::Icmp6Type => DType::Icmpv6Type,
        Sel::Icmp6Code => DType::Icmpv6Code,
        Sel::MetaNfproto => DType::NfProto,
        Sel::MetaIifname | Sel::MetaOifname | Sel::MetaIif | Sel::MetaOif => DType::Ifname,
        Sel::MetaMark | Sel::CtMark => DType::Mark,
        Sel::CtState => DType::CtState,
        Sel::CtStatus => DType::CtStatus,
        Sel::CtDirection => DType::CtDir,
        Sel::CtHelper => DType::Str,
    }
}

/// nft's standard priority names for ip, ip6 and inet (`std_prios` in nftables' rule.c).
/// The names in a flowtable's `devices = ...`, with their spans (`None` for a value that is
/// not a name).
fn flowtable_devices(e: &Spanned<Expr>, out: &mut Vec<(Option<String>, Span)>) {
    match &e.node {
        Expr::Set(items) | Expr::List(items) => {
            for i in items {
                flowtable_devices(i, out);
            }
        }
        Expr::Word(w) | Expr::Str(w) => out.push((Some(w.clone()), e.span)),
        _ => out.push((None, e.span)),
    }
}

pub fn std_priority(_family: Family, hook: Hook, name: &str) -> Option<i32> {
    Some(match name {
        "raw" => -300,
        "mangle" => -150,
        "dstnat" if hook == Hook::Prerouting => -100,
        "filter" => 0,
        "security" => 50,
        "srcnat" if hook == Hook::Postrouting => 100,
        _ => return None,
    })
}
