//! `keepstate trace --rules FILE "<packet>"`: a packet tracer. Describes a packet in words,
//! walks it through the hooks it would pass (prerouting, then input or forward, then
//! postrouting; or output, postrouting for the box's own packets) and prints every rule that
//! matched, with file:line, each base chain's decision and the verdict.
//!
//! The packet description, words in any order:
//!
//! ```text
//!   tcp | udp | icmp | icmpv6 | PROTO      transport protocol (name or number; default tcp)
//!   from ADDR[:PORT]  to ADDR[:PORT]       addresses (IPv6 as [ADDR]:PORT) and ports
//!   iif NAME  oif NAME                     ingress / egress port: both = forwarded,
//!                                          iif only = to the box, oif only = from the box
//!   flags syn,ack                          TCP flags (default syn)
//!   type NAME|N  code NAME|N               ICMP / ICMPv6 type and code (default echo-request)
//!   ct new|established|related|invalid|untracked     connection state (default new)
//!   status dnat,assured  ctmark N  direction original|reply  helper NAME
//!   mark N  ttl N  length N                meta mark, IPv4 TTL or IPv6 hop limit, IP length
//! ```

use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};

use crate::classify::{
    action_stmt, rule_by_id, Classifier, Decision, Evaluation, Linear, NoLimits, PacketKey, Tree,
};
use crate::rules::ir::{self, ct_state, Field, Hook, Stmt};
use crate::rules::types::{self, DType};

/// A packet described on the command line.
#[derive(Clone, Debug)]
pub struct Described {
    /// The fields every hook sees (no oifname: that is added after routing).
    pub key: PacketKey,
    pub nfproto: u128,
    pub iif: Option<String>,
    pub oif: Option<String>,
    pub ct: u128,
    pub summary: String,
}

fn bad(word: &str, what: &str) -> anyhow::Error {
    anyhow!("cannot read `{word}` as {what}")
}

fn number(s: &str) -> Option<u128> {
    match s.strip_prefix("0x") {
        Some(h) => u128::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `ADDR`, `ADDR:PORT` or `[ADDR6]:PORT`.
fn endpoint(s: &str) -> anyhow::Result<(IpAddr, Option<u16>)> {
    if let Ok(a) = s.parse::<IpAddr>() {
        return Ok((a, None));
    }
    let (addr, port) = s.rsplit_once(':').ok_or_else(|| bad(s, "an address"))?;
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    let a = addr.parse::<IpAddr>().map_err(|_| bad(s, "an address"))?;
    let p = port
        .parse::<u16>()
        .ok()
        .or_else(|| types::service_port(port))
        .ok_or_else(|| bad(port, "a port"))?;
    Ok((a, Some(p)))
}

/// A symbol or number of a type (`echo-request`, `8`).
fn symbol(ty: DType, s: &str) -> anyhow::Result<u128> {
    number(s)
        .or_else(|| types::symbol_value(ty.symbols(), s))
        .ok_or_else(|| bad(s, ty.name()))
}

fn flags(ty: DType, s: &str) -> anyhow::Result<u128> {
    s.split(',').try_fold(0, |acc, f| Ok(acc | symbol(ty, f)?))
}

/// Reads a packet description.
pub fn describe(text: &str) -> anyhow::Result<Described> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut proto: u128 = 6;
    let mut from = None;
    let mut to = None;
    let mut iif = None;
    let mut oif = None;
    let mut tcp_flags = None;
    let mut icmp_type = None;
    let mut icmp_code = 0;
    let mut ct = ct_state::NEW;
    let mut extra: Vec<(Field, u128)> = Vec::new();
    let mut i = 0;
    let arg = |i: usize| -> anyhow::Result<&str> {
        words
            .get(i + 1)
            .copied()
            .ok_or_else(|| anyhow!("`{}` needs a value", words[i]))
    };
    while i < words.len() {
        let w = words[i];
        let mut takes = true;
        match w {
            "from" => from = Some(endpoint(arg(i)?)?),
            "to" => to = Some(endpoint(arg(i)?)?),
            "iif" | "iifname" => iif = Some(arg(i)?.trim_matches('"').to_string()),
            "oif" | "oifname" => oif = Some(arg(i)?.trim_matches('"').to_string()),
            "flags" => tcp_flags = Some(flags(DType::TcpFlag, arg(i)?)?),
            "type" => icmp_type = Some(arg(i)?.to_string()),
            "code" => icmp_code = number(arg(i)?).ok_or_else(|| bad(words[i + 1], "a code"))?,
            "ct" => ct = symbol(DType::CtState, arg(i)?)?,
            "status" => extra.push((Field::CtStatus, flags(DType::CtStatus, arg(i)?)?)),
            "ctmark" => extra.push((
                Field::CtMark,
                number(arg(i)?).ok_or_else(|| bad(words[i + 1], "a mark"))?,
            )),
            "direction" => extra.push((Field::CtDirection, symbol(DType::CtDir, arg(i)?)?)),
            "helper" => extra.push((Field::CtHelper, ir::pack_name(arg(i)?.trim_matches('"')))),
            "mark" => extra.push((
                Field::Mark,
                number(arg(i)?).ok_or_else(|| bad(words[i + 1], "a mark"))?,
            )),
            "ttl" | "hoplimit" => extra.push((
                Field::Ip4Ttl,
                number(arg(i)?).ok_or_else(|| bad(words[i + 1], "a TTL"))?,
            )),
            "length" => extra.push((
                Field::Ip4Length,
                number(arg(i)?).ok_or_else(|| bad(words[i + 1], "a length"))?,
            )),
            "ip" | "ip6" => takes = false,
            other => {
                takes = false;
                proto = types::proto_number(other)
                    .map(u128::from)
                    .or_else(|| number(other).filter(|n| *n < 256))
                    .ok_or_else(|| {
                        anyhow!("unknown word `{other}` in the packet description (see `keepstate trace --help`)")
                    })?;
            }
        }
        i += if takes { 2 } else { 1 };
    }
    let (src, sport) =
        from.ok_or_else(|| anyhow!("say where the packet comes from: `from ADDR[:PORT]`"))?;
    let (dst, dport) = to.ok_or_else(|| anyhow!("say where the packet goes: `to ADDR[:PORT]`"))?;
    if src.is_ipv4() != dst.is_ipv4() {
        bail!("the two addresses are of different families");
    }
    if iif.is_none() && oif.is_none() {
        bail!("say `iif NAME` (a packet arriving), `oif NAME` (leaving) or both (forwarded)");
    }
    let v4 = src.is_ipv4();
    let nfproto = if v4 {
        ir::NFPROTO_IPV4
    } else {
        ir::NFPROTO_IPV6
    };
    let mut key = PacketKey::new();
    key.set(Field::Nfproto, nfproto);
    key.set(Field::L4proto, proto);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            key.set(Field::Ip4Saddr, u32::from(s) as u128);
            key.set(Field::Ip4Daddr, u32::from(d) as u128);
            key.set(Field::Ip4Ttl, 64);
            key.set(Field::Ip4Length, 60);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            key.set(Field::Ip6Saddr, u128::from(s));
            key.set(Field::Ip6Daddr, u128::from(d));
            key.set(Field::Ip6Hoplimit, 64);
        }
        _ => unreachable!("families checked above"),
    }
    let mut summary = format!("{} ", types::proto_name(proto as u8).unwrap_or("proto"));
    let has_ports = matches!(proto, 6 | 17 | 33 | 132 | 136);
    let show = |a: IpAddr, p: Option<u16>| match (a, p) {
        (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, Some(p)) => format!("{a}:{p}"),
        (a, None) => a.to_string(),
    };
    summary.push_str(&format!("{} -> {}", show(src, sport), show(dst, dport)));
    if has_ports {
        key.set(Field::Sport, sport.unwrap_or(40000) as u128);
        key.set(
            Field::Dport,
            dport.ok_or_else(|| {
                anyhow!("a {summary} packet needs a destination port: `to ADDR:PORT`")
            })? as u128,
        );
    }
    if proto == 6 {
        let f = tcp_flags.unwrap_or(0x02);
        key.set(Field::TcpFlags, f);
        summary.push_str(&format!(
            " flags {}",
            types::format_flags(DType::TcpFlag, f)
        ));
    }
    if proto == 1 || proto == 58 {
        let (tf, cf, ty) = if proto == 1 {
            (Field::IcmpType, Field::IcmpCode, DType::IcmpType)
        } else {
            (Field::Icmp6Type, Field::Icmp6Code, DType::Icmpv6Type)
        };
        let t = symbol(ty, icmp_type.as_deref().unwrap_or("echo-request"))?;
        key.set(tf, t);
        key.set(cf, icmp_code);
        summary.push_str(&format!(" type {}", types::format_value(ty, t)));
    }
    for (f, v) in extra {
        let f = if f == Field::Ip4Ttl && !v4 {
            Field::Ip6Hoplimit
        } else {
            f
        };
        if f == Field::Ip4Length && !v4 {
            continue;
        }
        key.set(f, v);
    }
    if let Some(i) = &iif {
        key.set(Field::Iifname, ir::pack_name(i));
        summary.push_str(&format!(" iif {i}"));
    }
    if let Some(o) = &oif {
        summary.push_str(&format!(" oif {o}"));
    }
    key.set(Field::CtState, ct);
    summary.push_str(&format!(
        " ct state {}",
        types::format_flags(DType::CtState, ct)
    ));
    // Without a connection (invalid, untracked) there is no status, mark or direction.
    if ct != ct_state::INVALID && ct != ct_state::UNTRACKED {
        if key.get(Field::CtStatus).is_none() {
            let st = match ct {
                ct_state::ESTABLISHED => ir::ct_status::SEEN_REPLY | ir::ct_status::CONFIRMED,
                ct_state::RELATED => ir::ct_status::EXPECTED | ir::ct_status::CONFIRMED,
                _ => 0,
            };
            key.set(Field::CtStatus, st);
        }
        if key.get(Field::CtMark).is_none() {
            key.set(Field::CtMark, 0);
        }
        if key.get(Field::CtDirection).is_none() {
            key.set(Field::CtDirection, 0);
        }
    } else {
        for f in [
            Field::CtStatus,
            Field::CtMark,
            Field::CtDirection,
            Field::CtHelper,
        ] {
            key.clear(f);
        }
    }
    if key.get(Field::Mark).is_none() {
        key.set(Field::Mark, 0);
    }
    Ok(Described {
        key,
        nfproto,
        iif,
        oif,
        ct,
        summary,
    })
}

/// The hooks a packet passes, in order: forwarded, to the box, or from the box.
pub fn hooks(d: &Described) -> &'static [Hook] {
    match (&d.iif, &d.oif) {
        (Some(_), Some(_)) => &[Hook::Prerouting, Hook::Forward, Hook::Postrouting],
        (Some(_), None) => &[Hook::Prerouting, Hook::Input],
        _ => &[Hook::Output, Hook::Postrouting],
    }
}

pub fn run(rules: &Path, packet: &str, reference: bool) -> anyhow::Result<ExitCode> {
    let loaded = match crate::rules::load_file(rules) {
        Ok(l) => l,
        Err(d) => {
            eprint!("{d}");
            return Ok(ExitCode::from(1));
        }
    };
    let d = describe(packet).context("cannot read the packet description")?;
    // The hooks of this packet see only its family's tables, and nat chains only for the
    // first packet of a connection.
    let first = d.ct == ct_state::NEW;
    let rs = Arc::new(loaded.ruleset.view_for(d.nfproto, first));
    let classifier: Box<dyn Classifier> = if reference {
        Box::new(Linear::new(rs.clone())?)
    } else {
        Box::new(Tree::new(rs.clone())?)
    };
    println!("packet: {}", d.summary);
    if !first {
        println!("(nat chains are skipped: they see only the first packet of a connection)");
    }
    let mut ev = Evaluation::new();
    let mut verdict = Decision::Accept;
    let mut key = d.key;
    for &hook in hooks(&d) {
        // The egress port is known once routing has decided: after prerouting.
        match (&d.oif, hook) {
            (Some(o), Hook::Forward | Hook::Output | Hook::Postrouting) => {
                key.set(Field::Oifname, ir::pack_name(o))
            }
            _ => key.clear(Field::Oifname),
        }
        if rs.base_chains(hook).is_empty() {
            println!("hook {}: no base chains", Hook::name(hook));
            continue;
        }
        classifier.eval(hook, &key, &mut NoLimits, &mut ev);
        println!("hook {}:", Hook::name(hook));
        let mut from = 0usize;
        for ch in &ev.chains {
            let table = &rs.tables[ch.table as usize];
            let chain = &table.chains[ch.chain as usize];
            let prio = chain.base.map_or(0, |b| b.priority);
            println!(
                "  chain {} {} {} (priority {}):",
                table.family.name(),
                table.name,
                chain.name,
                crate::rules::print::priority_str(hook, prio)
            );
            for &id in &ev.rules[from..ch.rules_end as usize] {
                if let Some(r) = rule_by_id(&rs, id) {
                    println!("    {}:{}: {}", r.loc.file, r.loc.line, r.text);
                }
            }
            from = ch.rules_end as usize;
            let how = if ch.by_policy { "policy " } else { "" };
            println!("    => {how}{}", ch.decision);
        }
        if let Some(m) = ev.meta_mark {
            key.set(Field::Mark, m as u128);
        }
        // A dnat in prerouting or output changes where the packet goes before filtering;
        // show later hooks the translated destination, as the kernel does.
        for &a in &ev.actions {
            if let Some(Stmt::Nat(n)) = action_stmt(&rs, a) {
                if n.kind == ir::NatKind::Dnat {
                    let to = apply_dnat(&mut key, n);
                    println!("    (destination translated: {to})");
                }
            }
        }
        verdict = ev.verdict;
        if verdict != Decision::Accept {
            break;
        }
    }
    println!("verdict: {}", verdict);
    Ok(ExitCode::SUCCESS)
}

/// Makes the key look translated by a dnat and returns the target as text.
fn apply_dnat(key: &mut PacketKey, n: &ir::Nat) -> String {
    let (addr, port) = n.first_target(|f| key.get(f));
    match addr {
        Some(IpAddr::V4(a)) => key.set(Field::Ip4Daddr, u32::from(a) as u128),
        Some(IpAddr::V6(a)) => key.set(Field::Ip6Daddr, u128::from(a)),
        None => {}
    }
    if let Some(p) = port {
        if key.get(Field::Dport).is_some() {
            key.set(Field::Dport, p as u128);
        }
    }
    let st = key.get(Field::CtStatus).unwrap_or(0);
    key.set(Field::CtStatus, st | ir::ct_status::DNAT);
    let mut s = addr.map(|a| a.to_string()).unwrap_or_default();
    if let Some(p) = port {
        s.push_str(&format!(":{p}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_a_forwarded_tcp_packet() {
        let d =
            describe("tcp from 192.168.1.10:40000 to 198.51.100.7:https iif lan oif wan").unwrap();
        assert_eq!(d.key.get(Field::Dport), Some(443));
        assert_eq!(d.key.get(Field::TcpFlags), Some(0x02));
        assert_eq!(d.key.get(Field::CtState), Some(ct_state::NEW));
        assert_eq!(
            hooks(&d),
            &[Hook::Prerouting, Hook::Forward, Hook::Postrouting]
        );
        // oifname is set per hook, after routing.
        assert_eq!(d.key.get(Field::Oifname), None);
    }

    #[test]
    fn describes_icmp_and_v6() {
        let d =
            describe("icmpv6 from fe80::1 to ff02::1 iif lan type nd-neighbor-solicit").unwrap();
        assert_eq!(d.nfproto, ir::NFPROTO_IPV6);
        assert_eq!(d.key.get(Field::Icmp6Type), Some(135));
        assert_eq!(hooks(&d), &[Hook::Prerouting, Hook::Input]);
        let e = describe("udp from [2001:db8::1]:53 to [2001:db8::2]:5353 oif wan ct established")
            .unwrap();
        assert_eq!(e.key.get(Field::Sport), Some(53));
        assert_eq!(hooks(&e), &[Hook::Output, Hook::Postrouting]);
    }

    #[test]
    fn says_what_is_wrong() {
        let e = describe("tcp to 1.2.3.4:80 iif lan")
            .unwrap_err()
            .to_string();
        assert!(e.contains("from ADDR"), "{e}");
        let e = describe("tcp from 1.2.3.4 to 1.2.3.5 iif lan")
            .unwrap_err()
            .to_string();
        assert!(e.contains("destination port"), "{e}");
        let e = describe("frobnicate from 1.2.3.4 to 1.2.3.5:1 iif lan")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown word `frobnicate`"), "{e}");
    }
}
