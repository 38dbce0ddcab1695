//! nftables datatypes: what a selector's values are, how names map to numbers (`ssh`,
//! `echo-request`, `established`) and how nft spells each value back when it lists a ruleset.
//!
//! Service and protocol names come from Debian's netbase `/etc/services` and `/etc/protocols`,
//! copied into `data/`, because nft resolves them with getservbyname/getprotobynumber and the
//! listing must not depend on the machine it runs on.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

/// The type of a selector's value, named as nft names it in `set { type ...; }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    Ipv4Addr,
    Ipv6Addr,
    InetService,
    InetProto,
    Ifname,
    Mark,
    IcmpType,
    IcmpCode,
    Icmpv6Type,
    Icmpv6Code,
    TcpFlag,
    CtState,
    CtStatus,
    CtDir,
    NfProto,
    /// A plain unsigned integer of this many bits (ttl, length, hoplimit).
    Integer(u32),
    /// A string (a helper's name).
    Str,
}

impl DType {
    /// The name in `type NAME` of a set declaration, for the types a set may hold.
    pub fn from_set_type(name: &str) -> Option<DType> {
        Some(match name {
            "ipv4_addr" => DType::Ipv4Addr,
            "ipv6_addr" => DType::Ipv6Addr,
            "inet_service" => DType::InetService,
            "inet_proto" => DType::InetProto,
            "ifname" => DType::Ifname,
            "mark" => DType::Mark,
            "icmp_type" => DType::IcmpType,
            "icmpv6_type" => DType::Icmpv6Type,
            "ct_state" => DType::CtState,
            "ct_status" => DType::CtStatus,
            "nf_proto" => DType::NfProto,
            "tcp_flag" => DType::TcpFlag,
            _ => return None,
        })
    }

    /// How nft names the type (in listings and in our messages).
    pub fn name(self) -> &'static str {
        match self {
            DType::Ipv4Addr => "ipv4_addr",
            DType::Ipv6Addr => "ipv6_addr",
            DType::InetService => "inet_service",
            DType::InetProto => "inet_proto",
            DType::Ifname => "ifname",
            DType::Mark => "mark",
            DType::IcmpType => "icmp_type",
            DType::IcmpCode => "icmp_code",
            DType::Icmpv6Type => "icmpv6_type",
            DType::Icmpv6Code => "icmpv6_code",
            DType::TcpFlag => "tcp_flag",
            DType::CtState => "ct_state",
            DType::CtStatus => "ct_status",
            DType::CtDir => "ct_dir",
            DType::NfProto => "nf_proto",
            DType::Integer(_) => "integer",
            DType::Str => "string",
        }
    }

    /// Width in bits of the type's values.
    pub fn bits(self) -> u32 {
        match self {
            DType::Ipv4Addr => 32,
            DType::Ipv6Addr => 128,
            DType::InetService => 16,
            DType::Ifname | DType::Str => 128,
            DType::Mark | DType::CtStatus | DType::CtState => 32,
            DType::Integer(b) => b,
            _ => 8,
        }
    }

    /// The largest value of the type.
    pub fn max(self) -> u128 {
        match self.bits() {
            128 => u128::MAX,
            b => (1u128 << b) - 1,
        }
    }

    /// True for bitmask types, where a bare value or list means "any of these bits is set".
    pub fn is_bitmask(self) -> bool {
        matches!(self, DType::TcpFlag | DType::CtState | DType::CtStatus)
    }

    /// The symbolic names of the type's values, if it has any.
    pub fn symbols(self) -> &'static [(&'static str, u128)] {
        match self {
            DType::IcmpType => ICMP_TYPES,
            DType::IcmpCode => ICMP_CODES,
            DType::Icmpv6Type => ICMPV6_TYPES,
            DType::Icmpv6Code => ICMPV6_CODES,
            DType::TcpFlag => TCP_FLAGS,
            DType::CtState => CT_STATES,
            DType::CtStatus => CT_STATUS,
            DType::CtDir => CT_DIRS,
            DType::NfProto => NF_PROTOS,
            _ => &[],
        }
    }
}

pub const ICMP_TYPES: &[(&str, u128)] = &[
    ("echo-reply", 0),
    ("destination-unreachable", 3),
    ("source-quench", 4),
    ("redirect", 5),
    ("echo-request", 8),
    ("router-advertisement", 9),
    ("router-solicitation", 10),
    ("time-exceeded", 11),
    ("parameter-problem", 12),
    ("timestamp-request", 13),
    ("timestamp-reply", 14),
    ("info-request", 15),
    ("info-reply", 16),
    ("address-mask-request", 17),
    ("address-mask-reply", 18),
];

pub const ICMP_CODES: &[(&str, u128)] = &[
    ("net-unreachable", 0),
    ("host-unreachable", 1),
    ("prot-unreachable", 2),
    ("port-unreachable", 3),
    ("frag-needed", 4),
    ("net-prohibited", 9),
    ("host-prohibited", 10),
    ("admin-prohibited", 13),
];

pub const ICMPV6_TYPES: &[(&str, u128)] = &[
    ("destination-unreachable", 1),
    ("packet-too-big", 2),
    ("time-exceeded", 3),
    ("parameter-problem", 4),
    ("echo-request", 128),
    ("echo-reply", 129),
    ("mld-listener-query", 130),
    ("mld-listener-report", 131),
    ("mld-listener-done", 132),
    ("mld-listener-reduction", 132),
    ("nd-router-solicit", 133),
    ("nd-router-advert", 134),
    ("nd-neighbor-solicit", 135),
    ("nd-neighbor-advert", 136),
    ("nd-redirect", 137),
    ("router-renumbering", 138),
    ("ind-neighbor-solicit", 141),
    ("ind-neighbor-advert", 142),
    ("mld2-listener-report", 143),
];

pub const ICMPV6_CODES: &[(&str, u128)] = &[
    ("no-route", 0),
    ("admin-prohibited", 1),
    ("addr-unreachable", 3),
    ("port-unreachable", 4),
    ("policy-fail", 5),
    ("reject-route", 6),
];

/// nft's `icmpx` reject codes.
pub const ICMPX_CODES: &[(&str, u128)] = &[
    ("no-route", 0),
    ("port-unreachable", 1),
    ("host-unreachable", 2),
    ("admin-prohibited", 3),
];

pub const TCP_FLAGS: &[(&str, u128)] = &[
    ("fin", 0x01),
    ("syn", 0x02),
    ("rst", 0x04),
    ("psh", 0x08),
    ("ack", 0x10),
    ("urg", 0x20),
    ("ecn", 0x40),
    ("cwr", 0x80),
];

pub const CT_STATES: &[(&str, u128)] = &[
    ("invalid", 1),
    ("established", 2),
    ("related", 4),
    ("new", 8),
    ("untracked", 64),
];

pub const CT_STATUS: &[(&str, u128)] = &[
    ("expected", 1),
    ("seen-reply", 2),
    ("assured", 4),
    ("confirmed", 8),
    ("snat", 16),
    ("dnat", 32),
    ("dying", 512),
];

pub const CT_DIRS: &[(&str, u128)] = &[("original", 0), ("reply", 1)];

pub const NF_PROTOS: &[(&str, u128)] = &[("ipv4", 2), ("ipv6", 10)];

/// Looks a name up in a symbol table.
pub fn symbol_value(table: &[(&str, u128)], name: &str) -> Option<u128> {
    table.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// The first name of a value in a symbol table.
pub fn symbol_name(table: &[(&'static str, u128)], v: u128) -> Option<&'static str> {
    table.iter().find(|(_, x)| *x == v).map(|(n, _)| *n)
}

struct NetDb {
    services: HashMap<String, u16>,
    proto_by_name: HashMap<String, u8>,
    proto_by_number: HashMap<u8, String>,
}

fn netdb() -> &'static NetDb {
    static DB: OnceLock<NetDb> = OnceLock::new();
    DB.get_or_init(|| {
        let mut services = HashMap::new();
        for line in include_str!("data/services").lines() {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            let (Some(name), Some(port)) = (words.next(), words.next()) else {
                continue;
            };
            let Some((num, _proto)) = port.split_once('/') else {
                continue;
            };
            let Ok(num) = num.parse::<u16>() else {
                continue;
            };
            services.entry(name.to_string()).or_insert(num);
            for alias in words {
                services.entry(alias.to_string()).or_insert(num);
            }
        }
        let mut proto_by_name = HashMap::new();
        let mut proto_by_number = HashMap::new();
        for line in include_str!("data/protocols").lines() {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            let (Some(name), Some(num)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(num) = num.parse::<u16>() else {
                continue;
            };
            let Ok(num) = u8::try_from(num) else {
                continue;
            };
            proto_by_name.entry(name.to_string()).or_insert(num);
            proto_by_number.entry(num).or_insert(name.to_string());
            for alias in words {
                proto_by_name.entry(alias.to_string()).or_insert(num);
            }
        }
        // nft's own spelling for ICMPv6 (netbase calls it ipv6-icmp).
        proto_by_name.insert("icmpv6".to_string(), 58);
        NetDb {
            services,
            proto_by_name,
            proto_by_number,
        }
    })
}

/// `ssh` -> 22, as getservbyname does.
pub fn service_port(name: &str) -> Option<u16> {
    netdb().services.get(name).copied()
}

/// `tcp` -> 6.
pub fn proto_number(name: &str) -> Option<u8> {
    netdb().proto_by_name.get(name).copied()
}

/// 6 -> `tcp`, as nft lists `meta l4proto` (getprotobynumber).
pub fn proto_name(n: u8) -> Option<&'static str> {
    netdb().proto_by_number.get(&n).map(|s| s.as_str())
}

/// Renders an interface name value (packed big-endian bytes) as its string.
pub fn unpack_name(v: u128) -> String {
    let bytes = v.to_be_bytes();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(16);
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// An IPv6 address as glibc's inet_ntop writes it: like Rust's, except that an
/// IPv4-compatible address (`::/96`, not `::` or `::1`) ends in a dotted quad.
pub fn format_ipv6(a: Ipv6Addr) -> String {
    let s = a.segments();
    if s[..6].iter().all(|&w| w == 0) && s[6] != 0 {
        let o = a.octets();
        return format!("::{}.{}.{}.{}", o[12], o[13], o[14], o[15]);
    }
    a.to_string()
}

/// Formats a single value of a type the way nft lists it.
pub fn format_value(ty: DType, v: u128) -> String {
    match ty {
        DType::Ipv4Addr => Ipv4Addr::from(v as u32).to_string(),
        DType::Ipv6Addr => format_ipv6(Ipv6Addr::from(v)),
        DType::InetService | DType::Integer(_) | DType::IcmpCode | DType::Icmpv6Code => {
            match symbol_name(ty.symbols(), v) {
                Some(n) => n.to_string(),
                None => v.to_string(),
            }
        }
        DType::InetProto => match proto_name(v as u8) {
            Some(n) => n.to_string(),
            None => v.to_string(),
        },
        DType::Ifname | DType::Str => format!("\"{}\"", unpack_name(v)),
        DType::Mark => format!("0x{:08x}", v),
        DType::CtStatus | DType::CtState | DType::TcpFlag => format_flags(ty, v),
        _ => match symbol_name(ty.symbols(), v) {
            Some(n) => n.to_string(),
            None => v.to_string(),
        },
    }
}

/// A bitmask value as nft lists it: its flag names joined with `,` in bit order, a bit
/// without a name as hex.
pub fn format_flags(ty: DType, v: u128) -> String {
    if let Some(n) = symbol_name(ty.symbols(), v) {
        return n.to_string();
    }
    if v == 0 {
        return "0x0".to_string();
    }
    let mut names = Vec::new();
    for bit in 0..ty.bits() {
        let b = 1u128 << bit;
        if v & b != 0 {
            match symbol_name(ty.symbols(), b) {
                Some(n) => names.push(n.to_string()),
                None => names.push(format!("0x{b:x}")),
            }
        }
    }
    names.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netdb_names() {
        assert_eq!(service_port("ssh"), Some(22));
        assert_eq!(service_port("https"), Some(443));
        assert_eq!(service_port("domain"), Some(53));
        assert_eq!(proto_number("tcp"), Some(6));
        assert_eq!(proto_number("icmpv6"), Some(58));
        assert_eq!(proto_name(17), Some("udp"));
        assert_eq!(proto_name(58), Some("ipv6-icmp"));
    }

    #[test]
    fn flags_format_in_bit_order() {
        assert_eq!(format_flags(DType::CtState, 2 | 4), "established,related");
        assert_eq!(format_flags(DType::TcpFlag, 0x17), "fin,syn,rst,ack");
    }
}
