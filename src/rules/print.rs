//! Prints a checked ruleset exactly as `nft list ruleset` prints it after `nft -f` (nft 1.0.6):
//! its layout, its element order and wrapping, its spelling of values, priorities and flags.
//! tests/fixtures/nft/ holds the listings of the real nft this file is tested against.

use std::fmt::Write;
use std::net::IpAddr;

use super::ast::RelOp;
use super::check::sel_type;
use super::ir::{ChainType, Family, Hook, LogLevel, MarkValue, NatKind, Policy, RateUnit, Reject};
use super::model::*;
use super::types::{self, DType};

/// The whole listing.
pub fn print_model(m: &Model) -> String {
    let mut out = String::new();
    for t in &m.tables {
        print_table(&mut out, t);
    }
    out
}

fn print_table(out: &mut String, t: &MTable) {
    let _ = writeln!(out, "table {} {} {{", Family::name(t.family), t.name);
    // nft lists objects (ct helpers) first, then sets and maps, then flowtables, then chains,
    // each block separated by a blank line.
    let mut blocks: Vec<String> = Vec::new();
    for h in &t.helpers {
        let l3 = h.l3proto.unwrap_or(t.family);
        let proto = if h.protocol == 6 { "tcp" } else { "udp" };
        blocks.push(format!(
            "\tct helper {} {{\n\t\ttype \"{}\" protocol {}\n\t\tl3proto {}\n\t}}\n",
            h.name,
            h.helper_type,
            proto,
            Family::name(l3)
        ));
    }
    for s in &t.sets {
        blocks.push(print_set(s));
    }
    for f in &t.flowtables {
        blocks.push(print_flowtable(f));
    }
    for c in &t.chains {
        blocks.push(print_chain(c));
    }
    out.push_str(&blocks.join("\n"));
    out.push_str("}\n");
}

/// nft 1.0.6's `flowtable_print_declaration`: no `;`, device names unquoted and in the order
/// given, the priority in the netdev family's names (only `filter`).
fn print_flowtable(f: &MFlowtable) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\tflowtable {} {{", f.name);
    let _ = writeln!(
        out,
        "\t\thook ingress priority {}",
        netdev_priority_str(f.priority)
    );
    if !f.devices.is_empty() {
        let _ = writeln!(out, "\t\tdevices = {{ {} }}", f.devices.join(", "));
    }
    if f.counter {
        out.push_str("\t\tcounter\n");
    }
    out.push_str("\t}\n");
    out
}

/// nft's `prio2str` for the netdev family: the first standard priority within 10 decides,
/// and only `filter` may be named there.
fn netdev_priority_str(prio: i32) -> String {
    for (name, base) in [
        ("raw", -300),
        ("mangle", -150),
        ("dstnat", -100),
        ("filter", 0),
    ]
    .into_iter()
    .chain([("security", 50), ("srcnat", 100)])
    {
        let off = prio - base;
        if (-10..=10).contains(&off) {
            if name != "filter" {
                break;
            }
            return match off {
                0 => name.to_string(),
                o if o > 0 => format!("{name} + {o}"),
                o => format!("{name} - {}", -o),
            };
        }
    }
    prio.to_string()
}

fn print_set(s: &MSet) -> String {
    let mut out = String::new();
    let kw = if s.data.is_some() { "map" } else { "set" };
    let _ = writeln!(out, "\t{kw} {} {{", s.name);
    let key: Vec<&str> = s.key.iter().map(|t| t.name()).collect();
    let mut ty = key.join(" . ");
    match &s.data {
        Some(MapData::Verdict) => ty.push_str(" : verdict"),
        Some(MapData::Type(t)) => {
            ty.push_str(" : ");
            ty.push_str(t.name());
        }
        None => {}
    }
    let _ = writeln!(out, "\t\ttype {ty}");
    if !s.flags.is_empty() {
        let _ = writeln!(out, "\t\tflags {}", s.flags.join(","));
    }
    if let Some(size) = s.size {
        let _ = writeln!(out, "\t\tsize {size}");
    }
    if let Some(c) = &s.comment {
        let _ = writeln!(out, "\t\tcomment \"{c}\"");
    }
    let interval = s.flags.iter().any(|f| f == "interval");
    let elems = normalise_elems(&s.key, &s.elems, interval, false);
    if !elems.is_empty() {
        let parts: Vec<String> = elems
            .iter()
            .map(|e| elem_str(&s.key, s.data.as_ref(), e))
            .collect();
        // nft's calculate_delim(): numbers 5 a line, IPv4 addresses 2 a line, anything else
        // (IPv6, strings, concatenations) one a line.
        let per_line = if s.key.len() > 1 {
            1
        } else {
            match s.key[0] {
                DType::InetService
                | DType::InetProto
                | DType::Mark
                | DType::Integer(_)
                | DType::TcpFlag
                | DType::NfProto
                | DType::CtDir => 5,
                DType::Ipv4Addr | DType::CtState | DType::CtStatus => 2,
                _ => 1,
            }
        };
        let mut text = String::from("{ ");
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                if i % per_line == 0 {
                    text.push_str(",\n\t\t\t     ");
                } else {
                    text.push_str(", ");
                }
            }
            text.push_str(p);
        }
        text.push_str(" }");
        let _ = writeln!(out, "\t\telements = {text}");
    }
    out.push_str("\t}\n");
    out
}

fn print_chain(c: &MChain) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\tchain {} {{", c.name);
    if let Some(cm) = &c.comment {
        let _ = writeln!(out, "\t\tcomment \"{cm}\"");
    }
    if let Some(b) = &c.base {
        let ty = match b.chain_type {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
            ChainType::Route => "route",
        };
        let policy = match b.policy {
            Policy::Accept => "accept",
            Policy::Drop => "drop",
        };
        let _ = writeln!(
            out,
            "\t\ttype {ty} hook {} priority {}; policy {policy};",
            Hook::name(b.hook),
            priority_str(b.hook, b.priority)
        );
    }
    for r in &c.rules {
        let _ = writeln!(out, "\t\t{}", rule_str(r));
    }
    out.push_str("\t}\n");
    out
}

/// nft's prio2str(): the standard name when the value is one (or within ±10 of one, as
/// `filter + 5`), else the number. dstnat and srcnat only name priorities of their hooks.
pub fn priority_str(hook: Hook, prio: i32) -> String {
    let names: &[(&str, i32)] = &[
        ("raw", -300),
        ("mangle", -150),
        ("dstnat", -100),
        ("filter", 0),
        ("security", 50),
        ("srcnat", 100),
    ];
    for (name, base) in names {
        let valid = match *name {
            "dstnat" => hook == Hook::Prerouting,
            "srcnat" => hook == Hook::Postrouting,
            _ => true,
        };
        if !valid {
            continue;
        }
        let off = prio - base;
        if off == 0 {
            return name.to_string();
        }
        if (-10..=10).contains(&off) {
            return if off > 0 {
                format!("{name} + {off}")
            } else {
                format!("{name} - {}", -off)
            };
        }
    }
    prio.to_string()
}

/// A rule's text as nft lists it.
pub fn rule_str(r: &MRule) -> String {
    let mut parts: Vec<String> = Vec::new();
    for it in &r.items {
        match it {
            MItem::Match(m) => parts.push(match_str(m)),
            MItem::Stmt(s) => parts.push(stmt_str(s)),
        }
    }
    let mut s = parts.join(" ");
    if let Some(c) = &r.comment {
        if !s.is_empty() {
            s.push(' ');
        }
        let _ = write!(s, "comment \"{c}\"");
    }
    s
}

fn sel_str(s: Sel) -> &'static str {
    match s {
        Sel::IpSaddr => "ip saddr",
        Sel::IpDaddr => "ip daddr",
        Sel::IpProtocol => "ip protocol",
        Sel::IpTtl => "ip ttl",
        Sel::IpLength => "ip length",
        Sel::Ip6Saddr => "ip6 saddr",
        Sel::Ip6Daddr => "ip6 daddr",
        Sel::Ip6Nexthdr => "ip6 nexthdr",
        Sel::Ip6Hoplimit => "ip6 hoplimit",
        Sel::TcpSport => "tcp sport",
        Sel::TcpDport => "tcp dport",
        Sel::TcpFlags => "tcp flags",
        Sel::UdpSport => "udp sport",
        Sel::UdpDport => "udp dport",
        Sel::ThSport => "th sport",
        Sel::ThDport => "th dport",
        Sel::IcmpType => "icmp type",
        Sel::IcmpCode => "icmp code",
        Sel::Icmp6Type => "icmpv6 type",
        Sel::Icmp6Code => "icmpv6 code",
        Sel::MetaL4proto => "meta l4proto",
        Sel::MetaNfproto => "meta nfproto",
        Sel::MetaIifname => "iifname",
        Sel::MetaOifname => "oifname",
        Sel::MetaIif => "iif",
        Sel::MetaOif => "oif",
        Sel::MetaMark => "meta mark",
        Sel::CtState => "ct state",
        Sel::CtStatus => "ct status",
        Sel::CtMark => "ct mark",
        Sel::CtDirection => "ct direction",
        Sel::CtHelper => "ct helper",
    }
}

fn op_str(op: RelOp) -> &'static str {
    match op {
        RelOp::Eq => "==",
        RelOp::Ne => "!=",
        RelOp::Lt => "<",
        RelOp::Gt => ">",
        RelOp::Le => "<=",
        RelOp::Ge => ">=",
    }
}

fn match_str(m: &MMatch) -> String {
    let types: Vec<DType> = m.sels.iter().map(|s| sel_type(*s)).collect();
    let left: Vec<&str> = m.sels.iter().map(|s| sel_str(*s)).collect();
    let mut s = left.join(" . ");
    let ty = types[0];
    if let Some(mask) = m.mask {
        // tcp flags: `value / mask`; other types: `& mask == value`.
        let MRhs::Value(Atom::Value(v)) = &m.rhs else {
            return s;
        };
        if ty.is_bitmask() {
            if m.op == Some(RelOp::Ne) {
                s.push_str(" !=");
            }
            if *v == 0 && m.op != Some(RelOp::Ne) {
                // `flags & (syn|rst) == 0` lists as `flags ! syn,rst`.
                let _ = write!(s, " ! {}", types::format_flags(ty, mask));
                return s;
            }
            let _ = write!(
                s,
                " {} / {}",
                types::format_flags(ty, *v),
                types::format_flags(ty, mask)
            );
            return s;
        }
        let _ = write!(
            s,
            " & {} {} {}",
            types::format_value(ty, mask),
            op_str(m.op.unwrap_or(RelOp::Eq)),
            types::format_value(ty, *v)
        );
        return s;
    }
    let op = match m.op {
        None | Some(RelOp::Eq) => {
            // `tcp flags == syn` keeps its `==` (an exact match, unlike the bare flag test).
            if m.op == Some(RelOp::Eq) && ty.is_bitmask() && matches!(m.rhs, MRhs::Value(_)) {
                " =="
            } else {
                ""
            }
        }
        Some(o) => match o {
            RelOp::Ne => " !=",
            RelOp::Lt => " <",
            RelOp::Gt => " >",
            RelOp::Le => " <=",
            RelOp::Ge => " >=",
            RelOp::Eq => "",
        },
    };
    s.push_str(op);
    s.push(' ');
    match &m.rhs {
        MRhs::Value(a) => s.push_str(&atom_str(ty, a)),
        MRhs::Flags(v) => {
            let all = v.iter().fold(0, |a, b| a | b);
            s.push_str(&types::format_flags(ty, all));
        }
        MRhs::Set(elems) => {
            let interval = elems
                .iter()
                .any(|e| e.key.iter().any(|a| !matches!(a, Atom::Value(_))));
            let el = normalise_elems(&types, elems, interval, true);
            let parts: Vec<String> = el.iter().map(|e| elem_str(&types, None, e)).collect();
            let _ = write!(s, "{{ {} }}", parts.join(", "));
        }
        MRhs::SetRef(n) => {
            let _ = write!(s, "@{n}");
        }
        MRhs::Vmap(elems) => {
            let interval = elems
                .iter()
                .any(|e| e.key.iter().any(|a| !matches!(a, Atom::Value(_))));
            let el = normalise_elems(&types, elems, interval, true);
            let parts: Vec<String> = el
                .iter()
                .map(|e| elem_str(&types, Some(&MapData::Verdict), e))
                .collect();
            let _ = write!(s, "vmap {{ {} }}", parts.join(", "));
        }
        MRhs::VmapRef(n) => {
            let _ = write!(s, "vmap @{n}");
        }
    }
    s
}

/// Types whose ranges nft lists as prefixes when they are one (DTYPE_F_PREFIX).
fn prefix_type(t: DType) -> bool {
    matches!(t, DType::Ipv4Addr | DType::Ipv6Addr | DType::Mark)
}

/// The atom nft would list for the interval [lo, hi].
fn interval_atom(t: DType, lo: u128, hi: u128) -> Atom {
    if lo == hi {
        return Atom::Value(lo);
    }
    if prefix_type(t) {
        let size = hi.wrapping_sub(lo).wrapping_add(1);
        let bits = t.bits();
        if (size == 0 && lo == 0 && hi == t.max())
            || (size.is_power_of_two() && lo & (size - 1) == 0)
        {
            let host_bits = if size == 0 {
                128
            } else {
                size.trailing_zeros()
            };
            let len = bits - host_bits.min(bits);
            return Atom::Prefix(lo, len as u8);
        }
    }
    if t == DType::Ifname {
        // A wildcard's interval: a prefix followed by all-ones.
        let lo_b = lo.to_be_bytes();
        let n = lo_b.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let iv = super::ir::name_prefix(&String::from_utf8_lossy(&lo_b[..n]));
        if iv.lo == lo && iv.hi == hi {
            return Atom::Wildcard(String::from_utf8_lossy(&lo_b[..n]).into_owned());
        }
    }
    Atom::Range(lo, hi)
}

/// The elements as nft lists them: interval sets sorted by value (big-endian) and, when
/// anonymous, merged;
/// other sets sorted as nft's mergesort orders them (numbers by value, strings as
/// little-endian integers).
fn normalise_elems(key: &[DType], elems: &[MElem], interval: bool, merge: bool) -> Vec<MElem> {
    let mut v: Vec<MElem> = elems.to_vec();
    if key.len() == 1 && interval {
        let t = key[0];
        let mut ivs: Vec<(u128, u128, Option<MData>)> = v
            .iter()
            .map(|e| {
                let (lo, hi) = e.key[0].bounds(t);
                (lo, hi, e.data.clone())
            })
            .collect();
        ivs.sort_by_key(|a| (a.0, a.1));
        let mut merged: Vec<(u128, u128, Option<MData>)> = Vec::new();
        for (lo, hi, d) in ivs {
            if let Some(last) = merged.last_mut() {
                // Sets (not maps) merge overlapping and adjacent intervals.
                if merge && d.is_none() && last.2.is_none() && lo <= last.1.saturating_add(1) {
                    last.1 = last.1.max(hi);
                    continue;
                }
            }
            merged.push((lo, hi, d));
        }
        return merged
            .into_iter()
            .map(|(lo, hi, d)| MElem {
                key: vec![interval_atom(t, lo, hi)],
                data: d,
            })
            .collect();
    }
    if key.len() > 1 && interval {
        v.sort_by_key(|e| {
            e.key
                .iter()
                .zip(key)
                .map(|(a, t)| a.bounds(*t))
                .collect::<Vec<_>>()
        });
        return v;
    }
    if key.len() > 1 {
        // A concatenation is compared as one little-endian integer of its bytes, each
        // component big-endian and padded to 4 bytes (nft's register layout).
        let bytes = |e: &MElem| -> Vec<u8> {
            let mut out = Vec::new();
            for (a, t) in e.key.iter().zip(key) {
                let (lo, _) = a.bounds(*t);
                let len = (t.bits() as usize).div_ceil(8);
                let be = lo.to_be_bytes();
                let mut comp = be[16 - len..].to_vec();
                while comp.len() % 4 != 0 {
                    comp.push(0);
                }
                out.extend(comp);
            }
            out.reverse();
            out
        };
        v.sort_by_key(|e| bytes(e));
        v.dedup_by(|a, b| a.key == b.key);
        return v;
    }
    let sort_key = |e: &MElem| -> Vec<u128> {
        e.key
            .iter()
            .zip(key)
            .map(|(a, t)| {
                let (lo, _) = a.bounds(*t);
                if matches!(t, DType::Ifname | DType::Str) && !interval {
                    u128::from_le_bytes(lo.to_be_bytes())
                } else {
                    lo
                }
            })
            .collect()
    };
    v.sort_by_key(|e| sort_key(e));
    v.dedup_by(|a, b| a.key == b.key);
    v
}

fn elem_str(key: &[DType], data: Option<&MapData>, e: &MElem) -> String {
    let k: Vec<String> = e
        .key
        .iter()
        .zip(key)
        .map(|(a, t)| atom_str(*t, a))
        .collect();
    let mut s = k.join(" . ");
    match (&e.data, data) {
        (Some(MData::Verdict(v)), _) => {
            let _ = write!(s, " : {}", verdict_str(v));
        }
        (Some(MData::Value(a)), Some(MapData::Type(t))) => {
            let _ = write!(s, " : {}", atom_str(*t, a));
        }
        (Some(MData::Nat(a, p)), _) => {
            let _ = write!(s, " : {a}");
            if let Some(p) = p {
                let _ = write!(s, " . {p}");
            }
        }
        _ => {}
    }
    s
}

fn atom_str(t: DType, a: &Atom) -> String {
    match a {
        Atom::Value(v) => types::format_value(t, *v),
        Atom::Range(lo, hi) => format!(
            "{}-{}",
            types::format_value(t, *lo),
            types::format_value(t, *hi)
        ),
        Atom::Prefix(v, len) => format!("{}/{}", types::format_value(t, *v), len),
        Atom::Wildcard(p) => format!("\"{p}*\""),
    }
}

fn verdict_str(v: &MVerdict) -> String {
    match v {
        MVerdict::Accept => "accept".into(),
        MVerdict::Drop => "drop".into(),
        MVerdict::Continue => "continue".into(),
        MVerdict::Return => "return".into(),
        MVerdict::Jump(c) => format!("jump {c}"),
        MVerdict::Goto(c) => format!("goto {c}"),
    }
}

fn mark_str(m: &MarkValue) -> String {
    match m {
        MarkValue::Const(v) => format!("0x{v:08x}"),
        MarkValue::CtMark => "ct mark".into(),
        MarkValue::MetaMark => "meta mark".into(),
    }
}

fn stmt_str(s: &MStmt) -> String {
    match s {
        MStmt::Verdict(v) => verdict_str(v),
        MStmt::Reject(r) => match r {
            Reject::Default => "reject".into(),
            Reject::TcpReset => "reject with tcp reset".into(),
            Reject::Icmp(c) => format!(
                "reject with icmp {}",
                types::symbol_name(types::ICMP_CODES, u128::from(*c))
                    .map_or_else(|| c.to_string(), str::to_string)
            ),
            Reject::Icmp6(c) => format!(
                "reject with icmpv6 {}",
                types::symbol_name(types::ICMPV6_CODES, u128::from(*c))
                    .map_or_else(|| c.to_string(), str::to_string)
            ),
            Reject::Icmpx(c) => format!(
                "reject with icmpx {}",
                types::symbol_name(types::ICMPX_CODES, u128::from(*c))
                    .map_or_else(|| c.to_string(), str::to_string)
            ),
        },
        MStmt::Counter(p, b) => format!("counter packets {p} bytes {b}"),
        MStmt::Log {
            prefix,
            level,
            group,
        } => {
            let mut s = String::from("log");
            if let Some(p) = prefix {
                let _ = write!(s, " prefix \"{p}\"");
            }
            if let Some(g) = group {
                let _ = write!(s, " group {g}");
            }
            if let Some(l) = level {
                if *l != LogLevel::Warn {
                    let _ = write!(s, " level {}", level_str(*l));
                }
            }
            s
        }
        MStmt::Limit {
            over,
            rate,
            unit,
            burst,
        } => {
            let mut s = String::from("limit rate ");
            if *over {
                s.push_str("over ");
            }
            let u = match unit {
                RateUnit::Second => "second",
                RateUnit::Minute => "minute",
                RateUnit::Hour => "hour",
                RateUnit::Day => "day",
                RateUnit::Week => "week",
            };
            let _ = write!(s, "{rate}/{u}");
            if let Some(b) = burst {
                if *b != 5 {
                    let _ = write!(s, " burst {b} packets");
                }
            }
            s
        }
        MStmt::Nat(n) => nat_str(n),
        MStmt::CtHelperSet(h) => format!("ct helper set \"{h}\""),
        MStmt::CtMarkSet(m) => format!("ct mark set {}", mark_str(m)),
        MStmt::MetaMarkSet(m) => format!("meta mark set {}", mark_str(m)),
        MStmt::Notrack => "notrack".into(),
        MStmt::FlowAdd(f) => format!("flow add @{f}"),
    }
}

fn level_str(l: LogLevel) -> &'static str {
    match l {
        LogLevel::Emerg => "emerg",
        LogLevel::Alert => "alert",
        LogLevel::Crit => "crit",
        LogLevel::Err => "err",
        LogLevel::Warn => "warn",
        LogLevel::Notice => "notice",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Audit => "audit",
    }
}

fn nat_str(n: &MNat) -> String {
    let mut s = String::from(match n.kind {
        NatKind::Snat => "snat",
        NatKind::Dnat => "dnat",
        NatKind::Masquerade => "masquerade",
        NatKind::Redirect => "redirect",
    });
    // nft names the family of a map whose data has ports even in an ip table.
    let family = n.family.or_else(|| {
        n.map.as_ref().and_then(|m| {
            m.elems
                .iter()
                .any(|e| matches!(e.data, Some(MData::Nat(_, Some(_)))))
                .then_some(m.family)
        })
    });
    if let Some(f) = family {
        let _ = write!(s, " {}", Family::name(f));
    }
    if let Some(m) = &n.map {
        let types: Vec<DType> = m.sels.iter().map(|x| sel_type(*x)).collect();
        let interval = m
            .elems
            .iter()
            .any(|e| e.key.iter().any(|a| !matches!(a, Atom::Value(_))));
        let el = normalise_elems(&types, &m.elems, interval, false);
        let keys: Vec<&str> = m.sels.iter().map(|x| sel_str(*x)).collect();
        let parts: Vec<String> = el.iter().map(|e| elem_str(&types, None, e)).collect();
        let _ = write!(s, " to {} map {{ {} }}", keys.join(" . "), parts.join(", "));
    }
    let bracket = n.port.is_some() && matches!(n.addr, Some((IpAddr::V6(_), _)));
    let ip = |a: &IpAddr| {
        if bracket {
            format!("[{a}]")
        } else {
            a.to_string()
        }
    };
    if n.addr.is_some() || n.port.is_some() {
        s.push_str(" to ");
    }
    if let Some((a, b)) = &n.addr {
        s.push_str(&ip(a));
        if let Some(b) = b {
            let _ = write!(s, "-{}", ip(b));
        }
    }
    if let Some((a, b)) = &n.port {
        let _ = write!(s, ":{a}");
        if let Some(b) = b {
            let _ = write!(s, "-{b}");
        }
    }
    let mut flags = Vec::new();
    if n.flags.random {
        flags.push("random");
    }
    if n.flags.fully_random {
        flags.push("fully-random");
    }
    if n.flags.persistent {
        flags.push("persistent");
    }
    if !flags.is_empty() {
        let _ = write!(s, " {}", flags.join(","));
    }
    s
}
