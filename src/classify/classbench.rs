//! ClassBench filter sets as rulesets, and packets with their expected first match.
//!
//! Owns the ClassBench file format (`shared/classbench/README.md`) and its mapping to the IR;
//! used by tests, benches and `keepstate bench`. Knows nothing of the tree.
//!
//! Mapping: one table `ip classbench` with one base chain `forward` (filter, hook forward,
//! priority 0) whose policy is **drop**, so that "no rule matched" is visible as the policy.
//! Line `n` (1-based) becomes rule id `n - 1`:
//!
//! ```text
//! ip saddr SRC/LEN ip daddr DST/LEN th sport LO-HI th dport LO-HI meta l4proto P accept
//! ```
//!
//! A `/0` address, a `0 : 65535` port range and a `0x00/0x00` protocol are wildcards and emit no
//! match. ClassBench's packets are plain 5-tuples, so ports are matched without nft's implicit
//! `meta l4proto {tcp, udp, ...}` dependency and a packet always has both ports. The flags
//! column is ignored, as most classifiers do. A protocol mask other than `0x00`/`0xFF` becomes a
//! masked match.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::PacketKey;
use crate::rules::ir::{
    BaseChain, Chain, ChainType, Family, Field, Hook, Interval, IntervalSet, Match, Policy, Rule,
    Ruleset, SourceLoc, Stmt, Table, Verdict, NFPROTO_IPV4,
};

/// One ClassBench rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CbRule {
    /// 1-based line in its file.
    pub line: u32,
    pub src: (u32, u8),
    pub dst: (u32, u8),
    pub sport: (u16, u16),
    pub dport: (u16, u16),
    /// `(value, mask)`.
    pub proto: (u8, u8),
}

/// A ClassBench packet: the 5-tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CbPacket {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum ClassBenchError {
    #[error("{file}:{line}: {what}")]
    Syntax {
        file: String,
        line: u32,
        what: String,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `shared/classbench` beside the repository (`CARGO_MANIFEST_DIR/../shared/classbench`).
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/classbench")
}

/// The standard sets shipped in [`dir`].
pub const SETS: [&str; 4] = ["acl1_1k", "fw1_1k", "ipc1_1k", "acl1_10k"];

/// Reads and parses the file at `path`.
pub fn load(path: &Path) -> Result<Vec<CbRule>, ClassBenchError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClassBenchError::Io {
        path: path.to_owned(),
        source,
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parse(&name, &text)
}

/// Parses a ClassBench file's text; blank lines are skipped (they still count for line numbers).
pub fn parse(file: &str, text: &str) -> Result<Vec<CbRule>, ClassBenchError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i as u32 + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let err = |what: String| ClassBenchError::Syntax {
            file: file.to_owned(),
            line,
            what,
        };
        let body = raw
            .trim()
            .strip_prefix('@')
            .ok_or_else(|| err("a rule starts with `@`".into()))?;
        let cols: Vec<&str> = body
            .split('\t')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        if cols.len() < 5 {
            return Err(err(format!(
                "expected at least 5 tab-separated columns, found {}",
                cols.len()
            )));
        }
        let src = prefix(cols[0]).ok_or_else(|| err(format!("bad source prefix `{}`", cols[0])))?;
        let dst =
            prefix(cols[1]).ok_or_else(|| err(format!("bad destination prefix `{}`", cols[1])))?;
        let sport =
            port_range(cols[2]).ok_or_else(|| err(format!("bad source ports `{}`", cols[2])))?;
        let dport = port_range(cols[3])
            .ok_or_else(|| err(format!("bad destination ports `{}`", cols[3])))?;
        let proto =
            value_mask(cols[4]).ok_or_else(|| err(format!("bad protocol `{}`", cols[4])))?;
        out.push(CbRule {
            line,
            src,
            dst,
            sport,
            dport,
            proto,
        });
    }
    Ok(out)
}

fn prefix(s: &str) -> Option<(u32, u8)> {
    let (addr, len) = s.split_once('/')?;
    let addr: std::net::Ipv4Addr = addr.trim().parse().ok()?;
    let len: u8 = len.trim().parse().ok()?;
    if len > 32 {
        return None;
    }
    Some((u32::from(addr) & prefix_mask(len), len))
}

fn prefix_mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - len as u32)
    }
}

fn port_range(s: &str) -> Option<(u16, u16)> {
    let (lo, hi) = s.split_once(':')?;
    let (lo, hi): (u16, u16) = (lo.trim().parse().ok()?, hi.trim().parse().ok()?);
    (lo <= hi).then_some((lo, hi))
}

fn value_mask(s: &str) -> Option<(u8, u8)> {
    let (v, m) = s.split_once('/')?;
    let hex = |x: &str| {
        u8::from_str_radix(
            x.trim().trim_start_matches("0x").trim_start_matches("0X"),
            16,
        )
        .ok()
    };
    Some((hex(v)?, hex(m)?))
}

impl CbRule {
    fn src_range(&self) -> (u32, u32) {
        let m = prefix_mask(self.src.1);
        (self.src.0, self.src.0 | !m)
    }
    fn dst_range(&self) -> (u32, u32) {
        let m = prefix_mask(self.dst.1);
        (self.dst.0, self.dst.0 | !m)
    }

    /// Whether the rule matches `p` (ClassBench's own definition, independent of the IR).
    pub fn matches(&self, p: &CbPacket) -> bool {
        let (s0, s1) = self.src_range();
        let (d0, d1) = self.dst_range();
        (s0..=s1).contains(&p.src)
            && (d0..=d1).contains(&p.dst)
            && (self.sport.0..=self.sport.1).contains(&p.sport)
            && (self.dport.0..=self.dport.1).contains(&p.dport)
            && p.proto & self.proto.1 == self.proto.0 & self.proto.1
    }

    /// The rule in nftables syntax, as in the module comment (also what `nft -f` takes).
    pub fn text(&self) -> String {
        let mut t = Vec::new();
        let ip = |(a, l): (u32, u8)| format!("{}/{}", std::net::Ipv4Addr::from(a), l);
        if self.src.1 > 0 {
            t.push(format!("ip saddr {}", ip(self.src)));
        }
        if self.dst.1 > 0 {
            t.push(format!("ip daddr {}", ip(self.dst)));
        }
        for (name, (lo, hi)) in [("sport", self.sport), ("dport", self.dport)] {
            if (lo, hi) != (0, u16::MAX) {
                t.push(if lo == hi {
                    format!("th {name} {lo}")
                } else {
                    format!("th {name} {lo}-{hi}")
                });
            }
        }
        match self.proto.1 {
            0 => {}
            0xff => t.push(format!("meta l4proto {}", self.proto.0)),
            m => t.push(format!(
                "meta l4proto & {m:#04x} == {:#04x}",
                self.proto.0 & m
            )),
        }
        t.push("accept".into());
        t.join(" ")
    }
}

fn set_on(field: Field, lo: u128, hi: u128) -> Match {
    Match::Set {
        field,
        negate: false,
        set: Arc::new(IntervalSet::from_intervals(vec![Interval::new(lo, hi)])),
    }
}

/// The ruleset for `rules` (see the module comment); `file` names them in [`SourceLoc`]s.
pub fn to_ruleset(file: &str, rules: &[CbRule]) -> Ruleset {
    let file: Arc<str> = Arc::from(file);
    let mut out = Vec::with_capacity(rules.len());
    for (i, r) in rules.iter().enumerate() {
        let mut matches = Vec::new();
        if r.src.1 > 0 {
            let (lo, hi) = r.src_range();
            matches.push(set_on(Field::Ip4Saddr, lo as u128, hi as u128));
        }
        if r.dst.1 > 0 {
            let (lo, hi) = r.dst_range();
            matches.push(set_on(Field::Ip4Daddr, lo as u128, hi as u128));
        }
        if r.sport != (0, u16::MAX) {
            matches.push(set_on(Field::Sport, r.sport.0 as u128, r.sport.1 as u128));
        }
        if r.dport != (0, u16::MAX) {
            matches.push(set_on(Field::Dport, r.dport.0 as u128, r.dport.1 as u128));
        }
        match r.proto.1 {
            0 => {}
            0xff => matches.push(set_on(Field::L4proto, r.proto.0 as u128, r.proto.0 as u128)),
            m => matches.push(Match::Masked {
                field: Field::L4proto,
                negate: false,
                mask: m as u128,
                value: (r.proto.0 & m) as u128,
            }),
        }
        out.push(Rule {
            id: i as u32,
            loc: SourceLoc {
                file: file.clone(),
                line: r.line,
                col: 1,
            },
            text: r.text(),
            matches,
            stmts: vec![Stmt::Verdict(Verdict::Accept)],
        });
    }
    Ruleset {
        tables: vec![Table {
            family: Family::Ip,
            name: "classbench".into(),
            chains: vec![Chain {
                name: "forward".into(),
                base: Some(BaseChain {
                    kind: ChainType::Filter,
                    hook: Hook::Forward,
                    priority: 0,
                    policy: Policy::Drop,
                }),
                rules: out,
            }],
            ct_helpers: Vec::new(),
            flowtables: Vec::new(),
        }],
    }
}

impl CbPacket {
    /// The packet as the classifier sees it (IPv4, both ports present).
    pub fn key(&self) -> PacketKey {
        let mut k = PacketKey::new();
        k.set(Field::Nfproto, NFPROTO_IPV4);
        k.set(Field::L4proto, self.proto as u128);
        k.set(Field::Ip4Saddr, self.src as u128);
        k.set(Field::Ip4Daddr, self.dst as u128);
        k.set(Field::Sport, self.sport as u128);
        k.set(Field::Dport, self.dport as u128);
        k
    }
}

/// The 1-based line of the first rule matching `p`, 0 for none (a linear scan; the expected
/// answer for traces and tests).
pub fn first_match(rules: &[CbRule], p: &CbPacket) -> u32 {
    rules.iter().find(|r| r.matches(p)).map_or(0, |r| r.line)
}

/// SplitMix64: a tiny, seedable generator for test and benchmark packets (no dependency).
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        let span = hi.wrapping_sub(lo).wrapping_add(1);
        if span == 0 {
            self.next_u64()
        } else {
            lo + self.next_u64() % span
        }
    }
}

/// Packets for `rules`: one inside each rule's box (cycling through the rules), with every
/// `random_every`-th packet uniformly random instead; each with its expected line (0: none).
pub fn packets(rules: &[CbRule], n: usize, random_every: usize, seed: u64) -> Vec<(CbPacket, u32)> {
    let mut rng = SplitMix64(seed);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let p = if rules.is_empty() || (random_every > 0 && i % random_every == random_every - 1) {
            CbPacket {
                src: rng.next_u64() as u32,
                dst: rng.next_u64() as u32,
                sport: rng.next_u64() as u16,
                dport: rng.next_u64() as u16,
                proto: [6u8, 17, 1, rng.next_u64() as u8][(rng.next_u64() % 4) as usize],
            }
        } else {
            let r = &rules[(rng.next_u64() % rules.len() as u64) as usize];
            let (s0, s1) = r.src_range();
            let (d0, d1) = r.dst_range();
            let free = rng.next_u64() as u8;
            CbPacket {
                src: rng.range(s0 as u64, s1 as u64) as u32,
                dst: rng.range(d0 as u64, d1 as u64) as u32,
                sport: rng.range(r.sport.0 as u64, r.sport.1 as u64) as u16,
                dport: rng.range(r.dport.0 as u64, r.dport.1 as u64) as u16,
                proto: (r.proto.0 & r.proto.1) | (free & !r.proto.1),
            }
        };
        out.push((p, first_match(rules, &p)));
    }
    out
}

/// Parses a trace line `src dst sport dport proto expected` (addresses as dotted quads or
/// 32-bit integers; extra columns ignored).
pub fn parse_trace_line(line: &str) -> Option<(CbPacket, u32)> {
    let mut it = line.split_whitespace();
    let addr = |s: &str| -> Option<u32> {
        s.parse::<std::net::Ipv4Addr>()
            .map(u32::from)
            .ok()
            .or_else(|| s.parse::<u32>().ok())
    };
    let src = addr(it.next()?)?;
    let dst = addr(it.next()?)?;
    let sport = it.next()?.parse().ok()?;
    let dport = it.next()?.parse().ok()?;
    let proto = it.next()?.parse().ok()?;
    let expected = it.next()?.parse().ok()?;
    Some((
        CbPacket {
            src,
            dst,
            sport,
            dport,
            proto,
        },
        expected,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_line() {
        let r = parse("t", "@176.19.181.33/24\t90.145.23.162/32\t0 : 65535\t1550 : 1550\t0x06/0xFF\t0x0000/0x0200\t\n")
            .unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0].src,
            (u32::from(std::net::Ipv4Addr::new(176, 19, 181, 0)), 24)
        );
        assert_eq!(r[0].dport, (1550, 1550));
        assert_eq!(r[0].proto, (6, 0xff));
        let rs = to_ruleset("t", &r);
        let rule = rs.rules().next().unwrap();
        assert_eq!(rule.matches.len(), 4);
        assert_eq!(rule.text, "ip saddr 176.19.181.0/24 ip daddr 90.145.23.162/32 th dport 1550 meta l4proto 6 accept");
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("t", "@1.2.3.4/33\t0.0.0.0/0\t0 : 1\t0 : 1\t0x00/0x00\n").is_err());
        assert!(parse("t", "1.2.3.4/3\n").is_err());
    }

    #[test]
    fn trace_lines() {
        let (p, e) = parse_trace_line("1.2.3.4 16909060 10 20 6 7").unwrap();
        assert_eq!(
            (p.src, p.dst, p.sport, p.dport, p.proto, e),
            (0x01020304, 0x01020304, 10, 20, 6, 7)
        );
        assert!(parse_trace_line("1.2.3.4 x 10 20 6 7").is_none());
    }
}
