//! The checked ruleset: every name resolved and every value typed and converted to numbers,
//! but still shaped as the user wrote it (selectors, sets, verdict maps), so it can be printed
//! the way `nft list ruleset` prints it and lowered to the IR.

use std::net::IpAddr;

use super::ast::RelOp;
use super::ir::{
    ChainType, Family, Hook, LogLevel, MarkValue, NatFlags, NatKind, Policy, RateUnit,
};
use super::ir::{Reject, SourceLoc};
use super::types::DType;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Model {
    pub tables: Vec<MTable>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MTable {
    pub family: Family,
    pub name: String,
    pub sets: Vec<MSet>,
    pub helpers: Vec<MHelper>,
    pub flowtables: Vec<MFlowtable>,
    pub chains: Vec<MChain>,
}

/// A `flowtable` object: the devices whose ingress it hooks, and whether it counts packets
/// on the connections it forwards (`counter`, `NF_FLOWTABLE_COUNTER`).
#[derive(Clone, Debug, PartialEq)]
pub struct MFlowtable {
    pub name: String,
    /// The ingress hook's priority.
    pub priority: i32,
    /// In the order written (nft keeps it).
    pub devices: Vec<String>,
    pub counter: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MHelper {
    pub name: String,
    pub helper_type: String,
    /// `tcp` or `udp`.
    pub protocol: u8,
    pub l3proto: Option<Family>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum MapData {
    Verdict,
    Type(DType),
}

#[derive(Clone, Debug, PartialEq)]
pub struct MSet {
    pub name: String,
    pub key: Vec<DType>,
    /// `Some` for a map.
    pub data: Option<MapData>,
    /// `constant`, `interval`, ... in the order nft lists them.
    pub flags: Vec<String>,
    pub elems: Vec<MElem>,
    pub size: Option<u32>,
    pub comment: Option<String>,
}

/// One component value of a set element or a relation's right-hand side.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Atom {
    Value(u128),
    /// Inclusive.
    Range(u128, u128),
    /// Network prefix: the address (already masked) and the length.
    Prefix(u128, u8),
    /// `"eth*"`: every interface name starting with the string.
    Wildcard(String),
}

impl Atom {
    /// The inclusive interval of values of type `t` the atom covers.
    pub fn bounds(&self, t: DType) -> (u128, u128) {
        let max = t.max();
        match self {
            Atom::Value(v) => (*v, *v),
            Atom::Range(a, b) => (*a, *b),
            Atom::Prefix(v, len) => {
                let host = if *len == 0 {
                    max
                } else {
                    max >> u32::from(*len)
                };
                (*v, *v | host)
            }
            Atom::Wildcard(p) => {
                let iv = super::ir::name_prefix(p);
                (iv.lo, iv.hi)
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct MElem {
    /// One atom, or one per component of a concatenation.
    pub key: Vec<Atom>,
    pub data: Option<MData>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum MData {
    Verdict(MVerdict),
    Value(Atom),
    /// A NAT map's target: an address, and a port for `addr . port` data.
    Nat(IpAddr, Option<u16>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MVerdict {
    Accept,
    Drop,
    Continue,
    Return,
    Jump(String),
    Goto(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct MChain {
    pub name: String,
    pub base: Option<MBase>,
    pub rules: Vec<MRule>,
    pub comment: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MBase {
    pub chain_type: ChainType,
    pub hook: Hook,
    pub priority: i32,
    pub policy: Policy,
    pub device: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MRule {
    pub loc: SourceLoc,
    pub items: Vec<MItem>,
    pub comment: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum MItem {
    Match(MMatch),
    Stmt(MStmt),
}

/// Every selector keepstate knows, with its type and the IR field it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sel {
    IpSaddr,
    IpDaddr,
    IpProtocol,
    IpTtl,
    IpLength,
    Ip6Saddr,
    Ip6Daddr,
    Ip6Nexthdr,
    Ip6Hoplimit,
    TcpSport,
    TcpDport,
    TcpFlags,
    UdpSport,
    UdpDport,
    ThSport,
    ThDport,
    IcmpType,
    IcmpCode,
    Icmp6Type,
    Icmp6Code,
    MetaL4proto,
    MetaNfproto,
    MetaIifname,
    MetaOifname,
    MetaIif,
    MetaOif,
    MetaMark,
    CtState,
    CtStatus,
    CtMark,
    CtDirection,
    CtHelper,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MMatch {
    pub sels: Vec<Sel>,
    /// `& MASK` (for `tcp flags a / b`, the mask `b`).
    pub mask: Option<u128>,
    /// `None` when the user wrote no operator: equality, or for bitmask types with a bare
    /// value or list, "any of these bits is set".
    pub op: Option<RelOp>,
    pub rhs: MRhs,
}

#[derive(Clone, Debug, PartialEq)]
pub enum MRhs {
    Value(Atom),
    /// `established,related`: bits of a bitmask type, OR'ed.
    Flags(Vec<u128>),
    /// `{ ... }`: an anonymous set.
    Set(Vec<MElem>),
    SetRef(String),
    /// `vmap { k : v }`.
    Vmap(Vec<MElem>),
    VmapRef(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum MStmt {
    Verdict(MVerdict),
    Reject(Reject),
    Counter(u64, u64),
    Log {
        prefix: Option<String>,
        level: Option<LogLevel>,
        group: Option<u32>,
    },
    Limit {
        over: bool,
        rate: u64,
        unit: RateUnit,
        burst: Option<u32>,
    },
    Nat(MNat),
    CtHelperSet(String),
    CtMarkSet(MarkValue),
    MetaMarkSet(MarkValue),
    Notrack,
    /// `flow add @NAME`: a flowtable of the same table.
    FlowAdd(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct MNat {
    pub kind: NatKind,
    /// The `ip`/`ip6` of `snat ip to ...` (needed in inet tables).
    pub family: Option<Family>,
    pub addr: Option<(IpAddr, Option<IpAddr>)>,
    pub port: Option<(u16, Option<u16>)>,
    pub flags: NatFlags,
    /// `dnat to tcp dport map { 80 : 192.168.1.10, ... }`.
    pub map: Option<MNatMap>,
}

/// The map of a NAT statement: the key's selectors, and elements whose data is
/// [`MData::Nat`].
#[derive(Clone, Debug, PartialEq)]
pub struct MNatMap {
    pub sels: Vec<Sel>,
    pub elems: Vec<MElem>,
    /// The family of the addresses (printed as `dnat ip to` when the data has ports).
    pub family: Family,
}
