//! Text to spanned AST: runs the pest grammar (`grammar/nft.pest`), turns its pairs into
//! [`ast`] nodes and expands `include`s. pest's `Rule` type never leaves this file; syntax
//! errors are reported in the user's words.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use pest::error::{ErrorVariant, InputLocation};
use pest::iterators::Pair;
use pest::Parser;

use super::ast::*;
use super::source::{Diagnostic, SourceFile, SourceMap, Span};

#[derive(pest_derive::Parser)]
#[grammar = "../grammar/nft.pest"]
struct NftParser;

/// How deep `include`s may nest before we call it a loop.
const MAX_INCLUDE_DEPTH: usize = 16;

/// Parses the file at `path` and every file it includes, in order.
pub fn parse_path(
    map: &mut SourceMap,
    name: &str,
    path: &Path,
    out: &mut Vec<Command>,
    diags: &mut Vec<Diagnostic>,
) {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_text(map, name, path, text, 0, out, diags),
        Err(e) => diags.push(Diagnostic::whole_file(
            name,
            format!("cannot read file: {e}"),
        )),
    }
}

/// Parses `text` as the contents of `path`.
pub fn parse_text(
    map: &mut SourceMap,
    name: &str,
    path: &Path,
    text: String,
    depth: usize,
    out: &mut Vec<Command>,
    diags: &mut Vec<Diagnostic>,
) {
    let file = map.add(SourceFile::new(name, path, text));
    let text = map.file(file).text.clone();
    // Track the literal tokens pest tried at the farthest position, for "expected `}`".
    pest::set_error_detail(true);
    let pairs = match NftParser::parse(Rule::file, &text) {
        Ok(mut p) => p.next().expect("file rule always yields one pair"),
        Err(e) => {
            diags.push(syntax_error(map, file, &text, e));
            return;
        }
    };
    let cx = Cx { file };
    for pair in pairs.kids() {
        if pair.as_rule() == Rule::EOI {
            continue;
        }
        if pair.as_rule() == Rule::include {
            let span = cx.span(&pair);
            let inner = pair.kids().next().expect("include has a string");
            let target = string_of(inner);
            if depth >= MAX_INCLUDE_DEPTH {
                diags.push(Diagnostic::at(
                    map,
                    span,
                    format!("include nested too deep (more than {MAX_INCLUDE_DEPTH}): is `{target}` including itself?"),
                ));
                continue;
            }
            let base = path.parent().unwrap_or(Path::new("."));
            match resolve_include(base, &target) {
                Ok(paths) => {
                    for p in paths {
                        let shown = p.display().to_string();
                        match std::fs::read_to_string(&p) {
                            Ok(t) => parse_text(map, &shown, &p, t, depth + 1, out, diags),
                            Err(e) => diags.push(Diagnostic::at(
                                map,
                                span,
                                format!("cannot read included file `{shown}`: {e}"),
                            )),
                        }
                    }
                }
                Err(msg) => diags.push(Diagnostic::at(map, span, msg)),
            }
            continue;
        }
        out.push(cx.command(pair));
    }
}

/// Finds an included file as nft does: an absolute path as is; a relative one against the
/// including file's directory and then the include path (`/etc`, nft's default). A `*` in the
/// last component is a glob, matched in sorted order (nft's behaviour; no match is not an error
/// for a glob).
fn resolve_include(base: &Path, target: &str) -> Result<Vec<PathBuf>, String> {
    let candidates: Vec<PathBuf> = if Path::new(target).is_absolute() {
        vec![PathBuf::from(target)]
    } else {
        vec![base.join(target), Path::new("/etc").join(target)]
    };
    if target.contains('*') || target.contains('?') {
        for c in &candidates {
            let dir = c.parent().unwrap_or(Path::new("."));
            let pat = c.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if let Ok(rd) = std::fs::read_dir(dir) {
                let mut found: Vec<PathBuf> = rd
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| !n.starts_with('.') && glob_match(pat, n))
                    })
                    .collect();
                found.sort();
                return Ok(found);
            }
        }
        return Ok(Vec::new());
    }
    for c in &candidates {
        if c.is_file() {
            return Ok(vec![c.clone()]);
        }
    }
    Err(format!(
        "included file `{target}` not found (looked in {})",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

fn glob_match(pat: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pat.as_bytes(), name.as_bytes())
}

/// Turns pest's error into one the user can act on: where, what was found, what was expected.
fn syntax_error(map: &SourceMap, file: u32, text: &str, e: pest::error::Error<Rule>) -> Diagnostic {
    let mut pos = match e.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    };
    let mut expected = BTreeSet::new();
    let attempts = e.parse_attempts();
    if let Some(a) = &attempts {
        if a.max_position >= pos {
            pos = a.max_position;
        }
    }
    if let ErrorVariant::ParsingError { positives, .. } = &e.variant {
        for r in positives {
            if let Some(d) = describe(*r) {
                expected.insert(d.to_string());
            }
        }
    }
    if let Some(a) = &attempts {
        for t in a.expected_tokens() {
            // Punctuation is what a user most often forgot; keywords are covered by the rule
            // descriptions above. (pest does not export the token type; its text will do.)
            let token = t.to_string();
            {
                if matches!(
                    token.as_str(),
                    "{" | "}" | "," | ";" | ":" | "=" | "/" | "-" | "(" | ")" | "\""
                ) {
                    expected.insert(format!("`{token}`"));
                }
            }
        }
    }
    let found: String = text[pos..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .take(24)
        .collect();
    let found_desc = if pos >= text.len() {
        "end of file".to_string()
    } else if found.is_empty() {
        "end of line".to_string()
    } else {
        format!("`{found}`")
    };
    let mut msg = format!("syntax error: unexpected {found_desc}");
    if !expected.is_empty() {
        let list: Vec<&str> = expected.iter().map(|s| s.as_str()).collect();
        msg.push_str(&format!(", expected {}", join_or(&list)));
    }
    let end = pos + found.len().max(1);
    Diagnostic::at(map, Span::new(file, pos, end.min(text.len().max(pos))), msg)
}

fn join_or(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [a] => a.to_string(),
        [rest @ .., last] => format!("{} or {}", rest.join(", "), last),
    }
}

/// pest rule names in words; `None` hides grammar-internal rules from messages.
fn describe(r: Rule) -> Option<&'static str> {
    Some(match r {
        Rule::flush_ruleset | Rule::define | Rule::include | Rule::table_block => {
            "a command (table, define, include, flush ruleset, add ...)"
        }
        Rule::add_table | Rule::add_chain | Rule::add_rule | Rule::add_set => {
            "a command (table, define, include, flush ruleset, add ...)"
        }
        Rule::add_element | Rule::add_ct_helper | Rule::add_flowtable => {
            "a command (table, define, include, flush ruleset, add ...)"
        }
        Rule::family => "a family (ip, ip6, inet)",
        Rule::ident | Rule::type_name => "a name",
        Rule::table_body | Rule::chain_body | Rule::set_body | Rule::helper_body => "`{`",
        Rule::chain_block | Rule::set_block | Rule::map_block | Rule::ct_helper_block => {
            "chain, set, map, ct helper or flowtable"
        }
        Rule::flowtable_block => "chain, set, map, ct helper or flowtable",
        Rule::flowtable_body => "`{`",
        Rule::ft_hook | Rule::ft_devices | Rule::ft_counter | Rule::ft_flags => {
            "hook, devices, counter or flags"
        }
        Rule::flow_add => "a statement",
        Rule::hook_spec | Rule::policy_spec | Rule::chain_comment => "a rule",
        Rule::rule | Rule::relation | Rule::selectors | Rule::selector => "a rule",
        Rule::verdict | Rule::reject | Rule::counter | Rule::log | Rule::limit => "a statement",
        Rule::nat | Rule::masquerade | Rule::redirect | Rule::notrack => "a statement",
        Rule::ct_helper_set | Rule::ct_mark_set | Rule::meta_mark_set => "a statement",
        Rule::rule_comment => "a statement",
        Rule::rel_op => "an operator (==, !=, <, >, <=, >=)",
        Rule::rhs | Rule::expr | Rule::concat_expr | Rule::set_literal | Rule::set_ref => "a value",
        Rule::range | Rule::prefix | Rule::variable | Rule::ipv4 | Rule::ipv6 => "a value",
        Rule::number | Rule::string | Rule::word | Rule::flag_mask => "a value",
        Rule::vmap | Rule::mask => "a value",
        Rule::map_literal => "`{`",
        Rule::set_elem | Rule::map_elem => "a set element",
        Rule::uint | Rule::signed_int => "a number",
        Rule::priority => "a priority (a number or filter, raw, mangle, dstnat, srcnat, security)",
        Rule::set_type | Rule::set_flags | Rule::set_elements | Rule::set_size => {
            "type, flags or elements"
        }
        Rule::helper_type | Rule::helper_l3proto => "type or l3proto",
        Rule::nat_target | Rule::nat_addr | Rule::nat_port => "a NAT address or :port",
        Rule::nat_map => "a map lookup (`tcp dport map { ... }`)",
        Rule::nat_addr_port => "`addr . port`",
        Rule::nat_flags | Rule::nat_flag => "random, fully-random or persistent",
        Rule::mark_source => "a mark value",
        Rule::EOI => "end of file",
        _ => return None,
    })
}

fn string_of(pair: Pair<Rule>) -> String {
    // string = "\"" ~ string_inner ~ "\""
    pair.kids()
        .next()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default()
}

/// Children of a pair without the keyword tokens (`kw_*`), which only mark word boundaries.
type KidsIter<'a> =
    std::iter::Filter<pest::iterators::Pairs<'a, Rule>, fn(&Pair<'a, Rule>) -> bool>;

trait Kids<'a> {
    fn kids(self) -> KidsIter<'a>;
}

impl<'a> Kids<'a> for Pair<'a, Rule> {
    fn kids(self) -> KidsIter<'a> {
        fn not_kw(p: &Pair<'_, Rule>) -> bool {
            !format!("{:?}", p.as_rule()).starts_with("kw_")
        }
        self.into_inner()
            .filter(not_kw as fn(&Pair<'a, Rule>) -> bool)
    }
}

struct Cx {
    file: u32,
}

impl Cx {
    fn span(&self, p: &Pair<Rule>) -> Span {
        let s = p.as_span();
        Span::new(self.file, s.start(), s.end())
    }

    fn name(&self, p: Pair<Rule>) -> Name {
        let span = self.span(&p);
        let s = if p.as_rule() == Rule::string {
            string_of(p)
        } else {
            p.as_str().to_string()
        };
        Spanned::new(s, span)
    }

    fn family(&self, p: Pair<Rule>) -> Spanned<FamilyKw> {
        let span = self.span(&p);
        let f = match p.as_str() {
            "ip" => FamilyKw::Ip,
            "ip6" => FamilyKw::Ip6,
            "inet" => FamilyKw::Inet,
            "arp" => FamilyKw::Arp,
            "bridge" => FamilyKw::Bridge,
            _ => FamilyKw::Netdev,
        };
        Spanned::new(f, span)
    }

    /// Splits an optional leading family off a command's children.
    fn opt_family<'a>(
        &self,
        it: &mut std::iter::Peekable<impl Iterator<Item = Pair<'a, Rule>>>,
    ) -> Option<Spanned<FamilyKw>> {
        if it.peek().map(|p| p.as_rule()) == Some(Rule::family) {
            it.next().map(|p| self.family(p))
        } else {
            None
        }
    }

    fn command(&self, pair: Pair<Rule>) -> Command {
        let kind = pair.as_rule();
        let mut it = pair.kids().peekable();
        match kind {
            Rule::flush_ruleset => Command::FlushRuleset,
            Rule::define => {
                let name = self.name(it.next().expect("define name"));
                let value = self.expr(it.next().expect("define value"));
                Command::Define { name, value }
            }
            Rule::table_block | Rule::add_table => {
                let family = self.opt_family(&mut it);
                let name = self.name(it.next().expect("table name"));
                let items = it.next().map(|b| self.table_body(b)).unwrap_or_default();
                Command::Table {
                    family,
                    name,
                    items,
                }
            }
            Rule::add_chain => {
                let family = self.opt_family(&mut it);
                let table = self.name(it.next().expect("table name"));
                let name = self.name(it.next().expect("chain name"));
                let chain = match it.next() {
                    Some(body) => self.chain_body(name, body),
                    None => ChainDecl {
                        name,
                        hook: None,
                        policy: None,
                        comment: None,
                        rules: Vec::new(),
                    },
                };
                Command::AddChain {
                    family,
                    table,
                    chain,
                }
            }
            Rule::add_rule => {
                let mut insert = false;
                if it.peek().map(|p| p.as_rule()) == Some(Rule::insert_kw) {
                    insert = true;
                    it.next();
                }
                let family = self.opt_family(&mut it);
                let table = self.name(it.next().expect("table name"));
                let chain = self.name(it.next().expect("chain name"));
                let rule = self.rule(it.next().expect("rule"));
                Command::AddRule {
                    family,
                    table,
                    chain,
                    rule,
                    insert,
                }
            }
            Rule::add_set => {
                let is_map = it.next().is_some_and(|k| k.as_str().starts_with("map"));
                let family = self.opt_family(&mut it);
                let table = self.name(it.next().expect("table name"));
                let name = self.name(it.next().expect("set name"));
                let set = self.set_body(name, it.next().expect("set body"), is_map);
                Command::AddSet { family, table, set }
            }
            Rule::add_element => {
                let family = self.opt_family(&mut it);
                let table = self.name(it.next().expect("table name"));
                let set = self.name(it.next().expect("set name"));
                let elems = self.expr(it.next().expect("elements"));
                Command::AddElement {
                    family,
                    table,
                    set,
                    elems,
                }
            }
            Rule::add_ct_helper => {
                let family = self.opt_family(&mut it);
                let table = self.name(it.next().expect("table name"));
                let name = self.name(it.next().expect("helper name"));
                let helper = self.helper_body(name, it.next().expect("helper body"));
                Command::AddCtHelper {
                    family,
                    table,
                    helper,
                }
            }
            Rule::add_flowtable => {
                let family = self.opt_family(&mut it);
                let table = self.name(it.next().expect("table name"));
                let name = self.name(it.next().expect("flowtable name"));
                let flowtable = self.flowtable_body(name, it.next().expect("flowtable body"));
                Command::AddFlowtable {
                    family,
                    table,
                    flowtable,
                }
            }
            other => unreachable!("grammar yields no command {other:?}"),
        }
    }

    fn table_body(&self, body: Pair<Rule>) -> Vec<TableItem> {
        body.kids()
            .map(|item| {
                let kind = item.as_rule();
                let mut it = item.kids();
                match kind {
                    Rule::chain_block => {
                        let name = self.name(it.next().expect("chain name"));
                        TableItem::Chain(self.chain_body(name, it.next().expect("chain body")))
                    }
                    Rule::set_block | Rule::map_block => {
                        let name = self.name(it.next().expect("set name"));
                        TableItem::Set(self.set_body(
                            name,
                            it.next().expect("set body"),
                            kind == Rule::map_block,
                        ))
                    }
                    Rule::ct_helper_block => {
                        let name = self.name(it.next().expect("helper name"));
                        TableItem::CtHelper(self.helper_body(name, it.next().expect("body")))
                    }
                    Rule::flowtable_block => {
                        let name = self.name(it.next().expect("flowtable name"));
                        TableItem::Flowtable(self.flowtable_body(name, it.next().expect("body")))
                    }
                    other => unreachable!("grammar yields no table item {other:?}"),
                }
            })
            .collect()
    }

    fn chain_body(&self, name: Name, body: Pair<Rule>) -> ChainDecl {
        let mut chain = ChainDecl {
            name,
            hook: None,
            policy: None,
            comment: None,
            rules: Vec::new(),
        };
        for item in body.kids() {
            match item.as_rule() {
                Rule::hook_spec => {
                    let span = self.span(&item);
                    let mut it = item.kids();
                    let chain_type = self.name(it.next().expect("type"));
                    let hook = self.name(it.next().expect("hook"));
                    let mut next = it.next().expect("priority");
                    let mut device = None;
                    if next.as_rule() != Rule::priority {
                        device = Some(self.name(next));
                        next = it.next().expect("priority");
                    }
                    let priority = self.priority(next);
                    chain.hook = Some(HookSpec {
                        span,
                        chain_type,
                        hook,
                        device,
                        priority,
                    });
                }
                Rule::policy_spec => {
                    chain.policy = Some(self.name(item.kids().next().expect("policy")));
                }
                Rule::chain_comment => {
                    chain.comment = Some(string_of(item.kids().next().expect("comment")));
                }
                Rule::rule => chain.rules.push(self.rule(item)),
                other => unreachable!("grammar yields no chain item {other:?}"),
            }
        }
        chain
    }

    fn priority(&self, p: Pair<Rule>) -> Spanned<Priority> {
        let span = self.span(&p);
        let mut it = p.kids();
        let first = it.next().expect("priority value");
        let node = if first.as_rule() == Rule::variable {
            Priority::Var(first.as_str().trim_start_matches('$').to_string())
        } else if first.as_rule() == Rule::signed_int {
            Priority::Number(first.as_str().parse().unwrap_or(i32::MAX))
        } else {
            let name = first.as_str().to_string();
            let mut offset = 0i32;
            if let Some(sign) = it.next() {
                let n: i32 = it
                    .next()
                    .map(|n| n.as_str().parse().unwrap_or(i32::MAX))
                    .unwrap_or(0);
                offset = if sign.as_str() == "-" { -n } else { n };
            }
            Priority::Named(name, offset)
        };
        Spanned::new(node, span)
    }

    fn set_body(&self, name: Name, body: Pair<Rule>, is_map: bool) -> SetDecl {
        let mut set = SetDecl {
            span: name.span,
            name,
            is_map,
            key_type: Vec::new(),
            data_type: None,
            flags: Vec::new(),
            elements: None,
            size: None,
            comment: None,
        };
        for item in body.kids() {
            match item.as_rule() {
                Rule::set_type => {
                    let text = item.as_str().to_string();
                    let names: Vec<Name> = item.kids().map(|p| self.name(p)).collect();
                    // `type a . b : c`: the part after `:` is a map's data type.
                    if text.contains(':') {
                        let mut names = names;
                        set.data_type = names.pop();
                        set.key_type = names;
                        set.is_map = true;
                    } else {
                        set.key_type = names;
                    }
                }
                Rule::set_flags => set.flags = item.kids().map(|p| self.name(p)).collect(),
                Rule::set_elements => {
                    set.elements = Some(self.expr_any(item.kids().next().expect("elems")))
                }
                Rule::set_size => {
                    set.size = item.kids().next().and_then(|p| p.as_str().parse().ok())
                }
                Rule::set_comment => {
                    set.comment = Some(string_of(item.kids().next().expect("comment")))
                }
                other => unreachable!("grammar yields no set item {other:?}"),
            }
        }
        set
    }

    fn helper_body(&self, name: Name, body: Pair<Rule>) -> HelperDecl {
        let mut h = HelperDecl {
            span: name.span,
            name,
            helper_type: None,
            protocol: None,
            l3proto: None,
        };
        for item in body.kids() {
            match item.as_rule() {
                Rule::helper_type => {
                    let mut it = item.kids();
                    h.helper_type = Some(self.name(it.next().expect("type")));
                    h.protocol = Some(self.name(it.next().expect("protocol")));
                }
                Rule::helper_l3proto => {
                    h.l3proto = Some(self.name(item.kids().next().expect("l3proto")))
                }
                other => unreachable!("grammar yields no helper item {other:?}"),
            }
        }
        h
    }

    fn flowtable_body(&self, name: Name, body: Pair<Rule>) -> FlowtableDecl {
        let mut ft = FlowtableDecl {
            name,
            hook: None,
            devices: None,
            counter: false,
            flags: Vec::new(),
        };
        for item in body.kids() {
            match item.as_rule() {
                Rule::ft_hook => {
                    let mut it = item.kids();
                    let hook = self.name(it.next().expect("hook"));
                    ft.hook = Some((hook, self.priority(it.next().expect("priority"))));
                }
                Rule::ft_devices => {
                    ft.devices = Some(self.expr_any(item.kids().next().expect("devices")))
                }
                Rule::ft_counter => ft.counter = true,
                Rule::ft_flags => ft.flags = item.kids().map(|p| self.name(p)).collect(),
                other => unreachable!("grammar yields no flowtable item {other:?}"),
            }
        }
        ft
    }

    fn rule(&self, pair: Pair<Rule>) -> RuleAst {
        let span = self.span(&pair);
        let mut rule = RuleAst {
            span,
            items: Vec::new(),
            comment: None,
        };
        for item in pair.kids() {
            let ispan = self.span(&item);
            match item.as_rule() {
                Rule::rule_comment => {
                    rule.comment = Some(self.name(item.kids().next().expect("comment")).node)
                }
                Rule::relation => rule
                    .items
                    .push(Spanned::new(RuleItem::Relation(self.relation(item)), ispan)),
                _ => rule
                    .items
                    .push(Spanned::new(RuleItem::Stmt(self.stmt(item)), ispan)),
            }
        }
        rule
    }

    fn relation(&self, pair: Pair<Rule>) -> Relation {
        let mut left = Vec::new();
        let mut mask = None;
        let mut op = None;
        let mut right = None;
        for p in pair.kids() {
            let span = self.span(&p);
            match p.as_rule() {
                Rule::selectors => {
                    for s in p.kids() {
                        left.push(self.selector(s));
                    }
                }
                Rule::mask => {
                    let v = p.kids().next().expect("mask value");
                    let vs = self.span(&v);
                    let inner = v.kids().next().expect("mask inner");
                    let e = if inner.as_rule() == Rule::paren_flags {
                        Expr::Or(inner.kids().map(|x| self.expr_any(x)).collect())
                    } else {
                        self.expr_any(inner).node
                    };
                    mask = Some(Spanned::new(e, vs));
                }
                Rule::rel_op => {
                    let o = match p.as_str() {
                        "==" | "eq" => RelOp::Eq,
                        "!=" | "ne" => RelOp::Ne,
                        "<" | "lt" => RelOp::Lt,
                        ">" | "gt" => RelOp::Gt,
                        "<=" | "le" => RelOp::Le,
                        _ => RelOp::Ge,
                    };
                    op = Some(Spanned::new(o, span));
                }
                Rule::vmap => {
                    let inner = p.kids().next().expect("vmap body");
                    right = Some(Spanned::new(Rhs::Vmap(self.expr_any(inner).node), span));
                }
                Rule::rhs => {
                    let inner = p.kids().next().expect("rhs");
                    let r = if inner.as_rule() == Rule::flag_mask {
                        let mut it = inner.kids();
                        let v = it
                            .next()
                            .expect("flags")
                            .kids()
                            .map(|w| self.name(w))
                            .collect();
                        let m = it
                            .next()
                            .expect("mask")
                            .kids()
                            .map(|w| self.name(w))
                            .collect();
                        Rhs::FlagMask(v, m)
                    } else {
                        Rhs::Expr(self.expr_any(inner).node)
                    };
                    right = Some(Spanned::new(r, span));
                }
                other => unreachable!("grammar yields no relation part {other:?}"),
            }
        }
        Relation {
            left,
            mask,
            op,
            right: right.expect("relation has a right-hand side"),
        }
    }

    fn selector(&self, p: Pair<Rule>) -> Spanned<Selector> {
        let span = self.span(&p);
        let inner = p.kids().next().expect("selector kind");
        let proto = match inner.as_rule() {
            Rule::ip_sel => "ip",
            Rule::ip6_sel => "ip6",
            Rule::tcp_sel => "tcp",
            Rule::udp_sel => "udp",
            Rule::th_sel => "th",
            Rule::icmp_sel => "icmp",
            Rule::icmp6_sel => "icmpv6",
            Rule::meta_sel => "meta",
            Rule::ct_sel => "ct",
            _ => "",
        };
        let field = if proto.is_empty() {
            inner.as_str().to_string()
        } else {
            inner
                .kids()
                .next()
                .map(|f| f.as_str().to_string())
                .unwrap_or_default()
        };
        Spanned::new(
            Selector {
                proto: proto.to_string(),
                field,
            },
            span,
        )
    }

    /// Any value-producing pair, to an expression.
    fn expr_any(&self, p: Pair<Rule>) -> Spanned<Expr> {
        let span = self.span(&p);
        let e = match p.as_rule() {
            Rule::expr => {
                let mut items: Vec<Spanned<Expr>> = p.kids().map(|x| self.expr_any(x)).collect();
                if items.len() == 1 {
                    return items.pop().expect("one item");
                }
                Expr::List(items)
            }
            Rule::or_expr => {
                let mut items: Vec<Spanned<Expr>> = p.kids().map(|x| self.expr_any(x)).collect();
                if items.len() == 1 {
                    return items.pop().expect("one item");
                }
                Expr::Or(items)
            }
            Rule::concat_expr | Rule::set_elem => {
                let mut items: Vec<Spanned<Expr>> = p.kids().map(|x| self.expr_any(x)).collect();
                if items.len() == 1 {
                    return items.pop().expect("one item");
                }
                Expr::Concat(items)
            }
            Rule::set_literal => Expr::Set(p.kids().map(|x| self.expr_any(x)).collect()),
            Rule::map_literal => Expr::Map(
                p.kids()
                    .map(|e| {
                        let mut it = e.kids();
                        let k = self.expr_any(it.next().expect("key"));
                        let v = it.next().expect("value");
                        let vs = self.span(&v);
                        let val = if v.as_rule() == Rule::verdict {
                            MapValue::Verdict(self.verdict(v))
                        } else {
                            MapValue::Expr(self.expr_any(v).node)
                        };
                        (k, Spanned::new(val, vs))
                    })
                    .collect(),
            ),
            Rule::set_ref => Expr::SetRef(
                p.kids()
                    .next()
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_default(),
            ),
            Rule::variable => Expr::Var(
                p.kids()
                    .next()
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_default(),
            ),
            Rule::range => {
                let mut it = p.kids();
                let lo = self.expr_any(it.next().expect("lo"));
                let hi = self.expr_any(it.next().expect("hi"));
                Expr::Range(Box::new(lo), Box::new(hi))
            }
            Rule::prefix => {
                let mut it = p.kids();
                let base = self.expr_any(it.next().expect("address"));
                let len = it.next().expect("length").as_str().parse().unwrap_or(255);
                Expr::Prefix(Box::new(base), len)
            }
            Rule::ipv4 => match p.as_str().parse::<Ipv4Addr>() {
                Ok(a) => Expr::Ipv4(a),
                Err(_) => Expr::Word(p.as_str().to_string()),
            },
            Rule::ipv6 => {
                let s = p.as_str().trim_start_matches('[').trim_end_matches(']');
                match s.parse::<Ipv6Addr>() {
                    Ok(a) => Expr::Ipv6(a),
                    Err(_) => Expr::Word(p.as_str().to_string()),
                }
            }
            Rule::number | Rule::uint => {
                let s = p.as_str();
                let v = if let Some(h) = s.strip_prefix("0x") {
                    u128::from_str_radix(h, 16).ok()
                } else {
                    s.parse().ok()
                };
                match v {
                    Some(v) => Expr::Number(v),
                    None => Expr::Word(s.to_string()),
                }
            }
            Rule::string => Expr::Str(string_of(p)),
            _ => Expr::Word(p.as_str().to_string()),
        };
        Spanned::new(e, span)
    }

    fn expr(&self, p: Pair<Rule>) -> Spanned<Expr> {
        self.expr_any(p)
    }

    fn verdict(&self, p: Pair<Rule>) -> VerdictAst {
        let inner = p.kids().next().expect("verdict kind");
        match inner.as_rule() {
            Rule::v_accept => VerdictAst::Accept,
            Rule::v_drop => VerdictAst::Drop,
            Rule::v_continue => VerdictAst::Continue,
            Rule::v_return => VerdictAst::Return,
            Rule::v_jump => VerdictAst::Jump(self.target(inner)),
            _ => VerdictAst::Goto(self.target(inner)),
        }
    }

    fn target(&self, p: Pair<Rule>) -> Name {
        let t = p.kids().next().expect("chain name");
        let span = self.span(&t);
        // A `$variable` keeps its `$`; the checker substitutes it.
        Spanned::new(t.as_str().to_string(), span)
    }

    fn nat_range(&self, p: Pair<Rule>) -> (Spanned<Expr>, Option<Spanned<Expr>>) {
        let mut it = p.kids();
        let lo = self.expr_any(it.next().expect("low"));
        let hi = it.next().map(|h| self.expr_any(h));
        (lo, hi)
    }

    fn stmt(&self, p: Pair<Rule>) -> StmtAst {
        let kind = p.as_rule();
        match kind {
            Rule::verdict => StmtAst::Verdict(self.verdict(p)),
            Rule::reject => {
                let mut it = p.kids();
                StmtAst::Reject(it.next().map(|r| {
                    if r.as_rule() == Rule::reject_tcp {
                        RejectAst::TcpReset
                    } else {
                        let mut ri = r.kids();
                        let fam = ri.next().expect("icmp family").as_str().to_string();
                        let code = self.name(ri.next().expect("code"));
                        RejectAst::Icmp(fam, code)
                    }
                }))
            }
            Rule::counter => {
                let mut packets = None;
                let mut bytes = None;
                for part in p.kids() {
                    let kind = part.as_rule();
                    let n = part
                        .kids()
                        .next()
                        .map_or(u64::MAX, |n| n.as_str().parse().unwrap_or(u64::MAX));
                    if kind == Rule::counter_packets {
                        packets = Some(n);
                    } else {
                        bytes = Some(n);
                    }
                }
                StmtAst::Counter(if packets.is_some() || bytes.is_some() {
                    Some((packets.unwrap_or(0), bytes.unwrap_or(0)))
                } else {
                    None
                })
            }
            Rule::log => {
                let mut prefix = None;
                let mut level = None;
                let mut group = None;
                for part in p.kids() {
                    let r = part.as_rule();
                    let inner = part.kids().next().expect("log argument");
                    match r {
                        Rule::log_prefix => prefix = Some(self.expr_any(inner)),
                        Rule::log_level => level = Some(self.name(inner)),
                        _ => group = inner.as_str().parse().ok(),
                    }
                }
                StmtAst::Log {
                    prefix,
                    level,
                    group,
                }
            }
            Rule::limit => {
                let mut over = false;
                let mut it = p.kids().peekable();
                if it.peek().map(|x| x.as_rule()) == Some(Rule::limit_over) {
                    over = true;
                    it.next();
                }
                let rate = it
                    .next()
                    .expect("rate")
                    .as_str()
                    .parse()
                    .unwrap_or(u64::MAX);
                let unit = self.name(it.next().expect("unit"));
                let burst = it.next().map(|b| b.as_str().parse().unwrap_or(u32::MAX));
                StmtAst::Limit {
                    over,
                    rate,
                    unit,
                    burst,
                }
            }
            Rule::nat | Rule::masquerade | Rule::redirect => {
                let mut nat = NatAst {
                    kind: NatKindAst::Masquerade,
                    family: None,
                    addr: None,
                    port: None,
                    flags: Vec::new(),
                    map: None,
                    addr_port: false,
                };
                nat.kind = match kind {
                    Rule::masquerade => NatKindAst::Masquerade,
                    Rule::redirect => NatKindAst::Redirect,
                    _ => NatKindAst::Snat,
                };
                for part in p.kids() {
                    match part.as_rule() {
                        Rule::nat_kind => {
                            nat.kind = if part.as_str().starts_with('s') {
                                NatKindAst::Snat
                            } else {
                                NatKindAst::Dnat
                            }
                        }
                        Rule::nat_family => nat.family = Some(part.as_str().to_string()),
                        Rule::nat_target => {
                            for t in part.kids() {
                                if t.as_rule() == Rule::nat_addr {
                                    nat.addr = Some(self.nat_range(t));
                                } else {
                                    nat.port = Some(self.nat_range(t));
                                }
                            }
                        }
                        Rule::nat_port => nat.port = Some(self.nat_range(part)),
                        Rule::nat_addr_port => nat.addr_port = true,
                        Rule::nat_map => {
                            let mut sels = Vec::new();
                            let mut map = None;
                            for m in part.kids() {
                                match m.as_rule() {
                                    Rule::selectors => {
                                        sels.extend(m.kids().map(|s| self.selector(s)))
                                    }
                                    Rule::kw_map => {}
                                    _ => map = Some(self.expr_any(m)),
                                }
                            }
                            if let Some(m) = map {
                                nat.map = Some((sels, m));
                            }
                        }
                        Rule::nat_flags => nat.flags = part.kids().map(|f| self.name(f)).collect(),
                        other => unreachable!("grammar yields no nat part {other:?}"),
                    }
                }
                StmtAst::Nat(Box::new(nat))
            }
            Rule::ct_helper_set => {
                StmtAst::CtHelperSet(self.expr_any(p.kids().next().expect("helper name")))
            }
            Rule::ct_mark_set | Rule::meta_mark_set => {
                let src = p.kids().next().expect("mark source");
                let span = self.span(&src);
                let inner = src.kids().next().expect("mark source kind");
                let m = match inner.as_rule() {
                    Rule::ct_mark_src => MarkSrc::CtMark,
                    Rule::meta_mark_src => MarkSrc::MetaMark,
                    _ => MarkSrc::Expr(self.expr_any(inner).node),
                };
                let m = Spanned::new(m, span);
                if kind == Rule::ct_mark_set {
                    StmtAst::CtMarkSet(m)
                } else {
                    StmtAst::MetaMarkSet(m)
                }
            }
            Rule::notrack => StmtAst::Notrack,
            Rule::flow_add => {
                let r = p
                    .kids()
                    .find(|k| k.as_rule() == Rule::set_ref)
                    .expect("flowtable reference");
                let span = self.span(&r);
                StmtAst::FlowAdd(Spanned::new(
                    r.as_str().trim_start_matches('@').into(),
                    span,
                ))
            }
            other => unreachable!("grammar yields no statement {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Vec<Command>, Vec<Diagnostic>) {
        let mut map = SourceMap::default();
        let mut out = Vec::new();
        let mut d = Vec::new();
        parse_text(
            &mut map,
            "t.nft",
            Path::new("t.nft"),
            text.into(),
            0,
            &mut out,
            &mut d,
        );
        (out, d)
    }

    fn one_rule(rule: &str) -> RuleAst {
        let (cmds, d) = parse(&format!("table inet t {{ chain c {{\n{rule}\n}} }}"));
        assert!(d.is_empty(), "{rule}: {d:?}");
        match &cmds[0] {
            Command::Table { items, .. } => match &items[0] {
                TableItem::Chain(c) => c.rules[0].clone(),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn separators_comments_and_continuations() {
        let (cmds, d) = parse("# c\nflush ruleset; define x = 1 \\\n\n table ip t { }\n");
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(cmds.len(), 3);
    }

    #[test]
    fn keywords_need_a_word_boundary() {
        // `dropped` is not `drop`: it is a syntax error, not a verdict.
        let (_, d) = parse("table ip t { chain c {\ndropped\n} }");
        assert_eq!(d.len(), 1);
        assert!(d[0].message.starts_with("syntax error"), "{}", d[0].message);
    }

    #[test]
    fn relation_shapes() {
        let r = one_rule("tcp flags & (syn|ack) == syn ip saddr . tcp dport { 10.0.0.1 . 22 } ct state vmap { new : accept }");
        assert_eq!(r.items.len(), 3);
        let RuleItem::Relation(flags) = &r.items[0].node else {
            panic!()
        };
        assert!(matches!(flags.mask.as_ref().map(|m| &m.node), Some(Expr::Or(v)) if v.len() == 2));
        assert_eq!(flags.op.as_ref().map(|o| o.node), Some(RelOp::Eq));
        let RuleItem::Relation(cat) = &r.items[1].node else {
            panic!()
        };
        assert_eq!(cat.left.len(), 2);
        let RuleItem::Relation(vm) = &r.items[2].node else {
            panic!()
        };
        assert!(matches!(vm.right.node, Rhs::Vmap(Expr::Map(_))));
        let fm = one_rule("tcp flags syn / fin,syn,rst,ack");
        let RuleItem::Relation(fm) = &fm.items[0].node else {
            panic!()
        };
        assert!(matches!(&fm.right.node, Rhs::FlagMask(v, m) if v.len() == 1 && m.len() == 4));
    }

    #[test]
    fn values() {
        let r = one_rule(
            "ip6 saddr fe80::/10 ip daddr 10.0.0.1-10.0.0.9 meta mark 0x10 iifname \"eth*\"",
        );
        let vals: Vec<&Rhs> = r
            .items
            .iter()
            .map(|i| match &i.node {
                RuleItem::Relation(rel) => &rel.right.node,
                RuleItem::Stmt(_) => panic!(),
            })
            .collect();
        assert!(
            matches!(vals[0], Rhs::Expr(Expr::Prefix(b, 10)) if matches!(b.node, Expr::Ipv6(_)))
        );
        assert!(matches!(vals[1], Rhs::Expr(Expr::Range(..))));
        assert!(matches!(vals[2], Rhs::Expr(Expr::Number(16))));
        assert!(matches!(vals[3], Rhs::Expr(Expr::Str(s)) if s == "eth*"));
    }

    #[test]
    fn statements() {
        let r = one_rule("counter packets 1 bytes 2 log prefix \"x\" level info limit rate over 5/minute burst 9 packets meta mark set ct mark ct helper set \"ftp\" dnat ip to [2001:db8::1]:80 random,persistent");
        let kinds: Vec<String> = r
            .items
            .iter()
            .map(|i| match &i.node {
                RuleItem::Stmt(s) => format!("{s:?}")
                    .split(['(', ' '])
                    .next()
                    .unwrap()
                    .to_string(),
                RuleItem::Relation(_) => "relation".into(),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "Counter",
                "Log",
                "Limit",
                "MetaMarkSet",
                "CtHelperSet",
                "Nat"
            ]
        );
        let RuleItem::Stmt(StmtAst::Nat(n)) = &r.items[5].node else {
            panic!()
        };
        assert_eq!(n.kind, NatKindAst::Dnat);
        assert_eq!(n.family.as_deref(), Some("ip"));
        assert!(n.port.is_some() && n.flags.len() == 2);
    }

    #[test]
    fn include_cycle_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.nft");
        std::fs::write(&a, "include \"./a.nft\"\n").unwrap();
        let mut map = SourceMap::default();
        let mut out = Vec::new();
        let mut d = Vec::new();
        parse_path(&mut map, "a.nft", &a, &mut out, &mut d);
        assert_eq!(d.len(), 1);
        assert!(d[0].message.contains("nested too deep"), "{}", d[0].message);
    }

    #[test]
    fn glob_includes_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/2.nft"), "table ip b { }\n").unwrap();
        std::fs::write(dir.path().join("d/1.nft"), "table ip a { }\n").unwrap();
        let main = dir.path().join("main.nft");
        std::fs::write(&main, "include \"./d/*.nft\"\n").unwrap();
        let mut map = SourceMap::default();
        let mut out = Vec::new();
        let mut d = Vec::new();
        parse_path(&mut map, "main.nft", &main, &mut out, &mut d);
        assert!(d.is_empty(), "{d:?}");
        let names: Vec<&str> = out
            .iter()
            .map(|c| match c {
                Command::Table { name, .. } => name.node.as_str(),
                _ => "",
            })
            .collect();
        assert_eq!(names, ["a", "b"]);
    }
}
