//! The spanned syntax tree of a rules file, as written: names unresolved, `$variables` and
//! service names unsubstituted. Only [`super::parse`] builds it; only [`super::check`] reads it.

use super::source::Span;

/// A value with the place in the source it came from.
#[derive(Clone, Debug)]
pub struct Spanned<T> {
    pub node: T,
    pub span: Span,
}

impl<T> Spanned<T> {
    pub fn new(node: T, span: Span) -> Self {
        Spanned { node, span }
    }
}

pub type Name = Spanned<String>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FamilyKw {
    Ip,
    Ip6,
    Inet,
    Arp,
    Bridge,
    Netdev,
}

/// One top-level command, after `include`s are expanded.
#[derive(Clone, Debug)]
pub enum Command {
    FlushRuleset,
    Define {
        name: Name,
        value: Spanned<Expr>,
    },
    /// `table F NAME { ... }` and `add table F NAME [{ ... }]`: both create the table if it is
    /// missing and add the items.
    Table {
        family: Option<Spanned<FamilyKw>>,
        name: Name,
        items: Vec<TableItem>,
    },
    AddChain {
        family: Option<Spanned<FamilyKw>>,
        table: Name,
        chain: ChainDecl,
    },
    AddRule {
        family: Option<Spanned<FamilyKw>>,
        table: Name,
        chain: Name,
        rule: RuleAst,
        insert: bool,
    },
    AddSet {
        family: Option<Spanned<FamilyKw>>,
        table: Name,
        set: SetDecl,
    },
    AddElement {
        family: Option<Spanned<FamilyKw>>,
        table: Name,
        set: Name,
        elems: Spanned<Expr>,
    },
    AddCtHelper {
        family: Option<Spanned<FamilyKw>>,
        table: Name,
        helper: HelperDecl,
    },
    AddFlowtable {
        family: Option<Spanned<FamilyKw>>,
        table: Name,
        flowtable: FlowtableDecl,
    },
}

#[derive(Clone, Debug)]
pub enum TableItem {
    Chain(ChainDecl),
    Set(SetDecl),
    CtHelper(HelperDecl),
    Flowtable(FlowtableDecl),
}

#[derive(Clone, Debug)]
pub struct ChainDecl {
    pub name: Name,
    pub hook: Option<HookSpec>,
    pub policy: Option<Name>,
    pub comment: Option<String>,
    pub rules: Vec<RuleAst>,
}

#[derive(Clone, Debug)]
pub struct HookSpec {
    pub span: Span,
    pub chain_type: Name,
    pub hook: Name,
    pub device: Option<Name>,
    pub priority: Spanned<Priority>,
}

#[derive(Clone, Debug)]
pub enum Priority {
    Number(i32),
    /// `filter`, `dstnat`, `filter - 10`, ...
    Named(String, i32),
    /// `$prio`, resolved by the checker.
    Var(String),
}

#[derive(Clone, Debug)]
pub struct SetDecl {
    pub span: Span,
    pub name: Name,
    pub is_map: bool,
    /// The key's types (`ipv4_addr . inet_service`).
    pub key_type: Vec<Name>,
    /// A map's value type (`verdict`, `ipv4_addr`, ...).
    pub data_type: Option<Name>,
    pub flags: Vec<Name>,
    pub elements: Option<Spanned<Expr>>,
    pub size: Option<u32>,
    pub comment: Option<String>,
}

#[derive(Clone, Debug)]
pub struct HelperDecl {
    pub span: Span,
    pub name: Name,
    pub helper_type: Option<Name>,
    pub protocol: Option<Name>,
    pub l3proto: Option<Name>,
}

/// `flowtable NAME { hook ingress priority N; devices = { ... }; counter }`.
#[derive(Clone, Debug)]
pub struct FlowtableDecl {
    pub name: Name,
    /// The hook's name (`ingress`) and priority.
    pub hook: Option<(Name, Spanned<Priority>)>,
    /// `devices = { ... }` or `devices = $var`, unresolved.
    pub devices: Option<Spanned<Expr>>,
    pub counter: bool,
    pub flags: Vec<Name>,
}

#[derive(Clone, Debug)]
pub struct RuleAst {
    pub span: Span,
    pub items: Vec<Spanned<RuleItem>>,
    pub comment: Option<String>,
}

#[derive(Clone, Debug)]
pub enum RuleItem {
    Relation(Relation),
    Stmt(StmtAst),
}

/// `left [& mask] [op] right`.
#[derive(Clone, Debug)]
pub struct Relation {
    /// One selector, or several joined by `.` (a concatenation).
    pub left: Vec<Spanned<Selector>>,
    pub mask: Option<Spanned<Expr>>,
    pub op: Option<Spanned<RelOp>>,
    pub right: Spanned<Rhs>,
}

/// A selector as written: `ip saddr`, `meta l4proto`, `iifname`, `ct state`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    /// `ip`, `ip6`, `tcp`, `udp`, `th`, `icmp`, `icmpv6`, `meta`, `ct`, or `""` for the short
    /// meta forms (`iifname`, `mark`, ...).
    pub proto: String,
    pub field: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RelOp {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Clone, Debug)]
pub enum Rhs {
    Expr(Expr),
    /// `syn / fin,syn,rst,ack`: value and mask as flag lists.
    FlagMask(Vec<Name>, Vec<Name>),
    /// `vmap { k : verdict, ... }` or `vmap @name`.
    Vmap(Expr),
}

/// A value expression as written.
#[derive(Clone, Debug)]
pub enum Expr {
    Number(u128),
    Ipv4(std::net::Ipv4Addr),
    Ipv6(std::net::Ipv6Addr),
    /// A quoted string.
    Str(String),
    /// A bare word: a service, type or state name, an interface, a chain.
    Word(String),
    Var(String),
    SetRef(String),
    Prefix(Box<Spanned<Expr>>, u8),
    Range(Box<Spanned<Expr>>, Box<Spanned<Expr>>),
    Concat(Vec<Spanned<Expr>>),
    /// `a,b,c` outside braces (`ct state established,related`).
    List(Vec<Spanned<Expr>>),
    /// `{ a, b }`.
    Set(Vec<Spanned<Expr>>),
    /// `{ k : v, ... }`.
    Map(Vec<(Spanned<Expr>, Spanned<MapValue>)>),
    /// `(syn|ack)` in a mask.
    Or(Vec<Spanned<Expr>>),
}

#[derive(Clone, Debug)]
pub enum MapValue {
    Verdict(VerdictAst),
    Expr(Expr),
}

#[derive(Clone, Debug)]
pub enum VerdictAst {
    Accept,
    Drop,
    Continue,
    Return,
    Jump(Name),
    Goto(Name),
}

#[derive(Clone, Debug)]
pub enum StmtAst {
    Verdict(VerdictAst),
    Reject(Option<RejectAst>),
    Counter(Option<(u64, u64)>),
    Log {
        prefix: Option<Spanned<Expr>>,
        level: Option<Name>,
        group: Option<u32>,
    },
    Limit {
        over: bool,
        rate: u64,
        unit: Name,
        burst: Option<u32>,
    },
    Nat(Box<NatAst>),
    CtHelperSet(Spanned<Expr>),
    CtMarkSet(Spanned<MarkSrc>),
    MetaMarkSet(Spanned<MarkSrc>),
    Notrack,
    /// `flow add @NAME`: the flowtable's name.
    FlowAdd(Name),
}

#[derive(Clone, Debug)]
pub enum RejectAst {
    TcpReset,
    /// (`icmp` | `icmpv6` | `icmpx`, the code's name or number)
    Icmp(String, Name),
}

#[derive(Clone, Debug)]
pub enum MarkSrc {
    Expr(Expr),
    CtMark,
    MetaMark,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatKindAst {
    Snat,
    Dnat,
    Masquerade,
    Redirect,
}

#[derive(Clone, Debug)]
pub struct NatAst {
    pub kind: NatKindAst,
    /// `snat ip to` / `snat ip6 to`.
    pub family: Option<String>,
    pub addr: Option<(Spanned<Expr>, Option<Spanned<Expr>>)>,
    pub port: Option<(Spanned<Expr>, Option<Spanned<Expr>>)>,
    pub flags: Vec<Name>,
    /// `dnat to tcp dport map { 80 : 192.168.1.10, ... }`: the key's selectors and the map.
    pub map: Option<(Vec<Spanned<Selector>>, Spanned<Expr>)>,
    /// `dnat ip addr . port to ...`.
    pub addr_port: bool,
}
