//! The control protocol: one request line from the client, answer lines from the appliance.
//!
//! ```text
//!   client -> box   one line, at most MAX_REQUEST bytes, UTF-8, words separated by blanks:
//!                     reload
//!                     ct list [src=ADDR[/LEN]] [dst=ADDR[/LEN]] [proto=NAME|N] [json]
//!                     ct events | ct count | ct flush | ct expect
//!                     stats
//!   box -> client   lines, each starting with a tag word:
//!                     out TEXT       a line for the client's stdout
//!                     err TEXT       a line for the client's stderr
//!                     ok             the end: the request succeeded
//!                     fail MESSAGE   the end: it failed, and why
//! ```
//!
//! Text lines (a `conntrack -L` line, a diagnostic) never hold a newline, so one line of the
//! protocol is one line of output and `socat - UNIX-CONNECT:/run/keepstate.sock` is a usable
//! client too. Owns parsing and printing of both directions; no sockets, no engine.

use std::net::IpAddr;

use ipnet::IpNet;

/// The longest request line accepted, newline included.
pub const MAX_REQUEST: usize = 4096;

/// Why a request or an answer line could not be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("empty request: send one of `reload`, `ct list`, `ct events`, `ct count`, `ct flush`, `ct expect`, `flow count`, `stats`")]
    Empty,
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLong,
    #[error("request is not UTF-8 text")]
    NotText,
    #[error("unknown request `{0}`: send one of `reload`, `ct list`, `ct events`, `ct count`, `ct flush`, `ct expect`, `flow count`, `stats`")]
    UnknownCommand(String),
    #[error("`{command}` takes no argument `{arg}`")]
    UnexpectedArgument { command: String, arg: String },
    #[error("bad argument `{arg}`: {reason}")]
    BadArgument { arg: String, reason: String },
    #[error("argument `{0}` given twice")]
    Duplicate(String),
    #[error("the appliance answered a line this client does not understand: `{0}`")]
    BadAnswer(String),
}

/// Which connections `ct list` shows: as `conntrack -L -s ADDR -d ADDR -p PROTO`, on the
/// ORIGINAL tuple; an address may carry a prefix length (a network).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
    pub proto: Option<u8>,
}

impl ListFilter {
    pub fn matches(&self, src: IpAddr, dst: IpAddr, proto: u8) -> bool {
        self.src.is_none_or(|n| n.contains(&src))
            && self.dst.is_none_or(|n| n.contains(&dst))
            && self.proto.is_none_or(|p| p == proto)
    }
}

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Compile the rules file again and swap it in (as SIGHUP).
    Reload,
    /// The table as `conntrack -L` prints it (or as JSON objects, one a line).
    CtList { filter: ListFilter, json: bool },
    /// `conntrack -E` lines until the client goes away.
    CtEvents,
    /// `conntrack -C`.
    CtCount,
    /// How many connections are offloaded to a flowtable (one number, as `ct count`).
    FlowCount,
    /// `conntrack -F`.
    CtFlush,
    /// `/proc/net/nf_conntrack_expect`.
    CtExpect,
    /// Counters: ports, workers, the tracker, the ruleset with its rule counters.
    Stats,
}

/// A network from `ADDR` or `ADDR/LEN`.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    if s.contains('/') {
        s.parse::<IpNet>()
            .map_err(|_| format!("`{s}` is not an address or a network (192.0.2.1, 2001:db8::/32)"))
    } else {
        s.parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("`{s}` is not an address or a network (192.0.2.1, 2001:db8::/32)"))
    }
}

/// A protocol name as conntrack's `-p` takes it, or a number.
pub fn parse_proto(s: &str) -> Result<u8, String> {
    let named = match s.to_ascii_lowercase().as_str() {
        "tcp" => Some(6),
        "udp" => Some(17),
        "icmp" => Some(1),
        "icmpv6" | "ipv6-icmp" => Some(58),
        "udplite" => Some(136),
        "sctp" => Some(132),
        "dccp" => Some(33),
        "gre" => Some(47),
        _ => None,
    };
    named.or_else(|| s.parse().ok()).ok_or_else(|| {
        format!(
            "`{s}` is not a protocol (tcp, udp, icmp, icmpv6, udplite, sctp, dccp, gre or 0-255)"
        )
    })
}

impl Request {
    /// Parses one request line (the trailing newline, if any, is ignored).
    pub fn parse(line: &[u8]) -> Result<Request, ProtoError> {
        if line.len() > MAX_REQUEST {
            return Err(ProtoError::TooLong);
        }
        let text = std::str::from_utf8(line).map_err(|_| ProtoError::NotText)?;
        let words: Vec<&str> = text.split_ascii_whitespace().collect();
        let (command, args): (String, &[&str]) = match words.as_slice() {
            [] => return Err(ProtoError::Empty),
            [group @ ("ct" | "flow"), sub, rest @ ..] => (format!("{group} {sub}"), rest),
            [one, rest @ ..] => (one.to_string(), rest),
        };
        let none = |r: Request| match args.first() {
            Some(a) => Err(ProtoError::UnexpectedArgument {
                command: command.clone(),
                arg: a.to_string(),
            }),
            None => Ok(r),
        };
        match command.as_str() {
            "reload" => none(Request::Reload),
            "stats" => none(Request::Stats),
            "ct events" => none(Request::CtEvents),
            "ct count" => none(Request::CtCount),
            "flow count" => none(Request::FlowCount),
            "ct flush" => none(Request::CtFlush),
            "ct expect" => none(Request::CtExpect),
            "ct list" => {
                let mut filter = ListFilter::default();
                let mut json = false;
                for &a in args {
                    let bad = |reason: String| ProtoError::BadArgument {
                        arg: a.to_string(),
                        reason,
                    };
                    let dup =
                        || ProtoError::Duplicate(a.split('=').next().unwrap_or(a).to_string());
                    match a.split_once('=') {
                        None if a == "json" => {
                            if json {
                                return Err(dup());
                            }
                            json = true;
                        }
                        Some(("src", v)) => {
                            if filter.src.is_some() {
                                return Err(dup());
                            }
                            filter.src = Some(parse_net(v).map_err(bad)?);
                        }
                        Some(("dst", v)) => {
                            if filter.dst.is_some() {
                                return Err(dup());
                            }
                            filter.dst = Some(parse_net(v).map_err(bad)?);
                        }
                        Some(("proto", v)) => {
                            if filter.proto.is_some() {
                                return Err(dup());
                            }
                            filter.proto = Some(parse_proto(v).map_err(bad)?);
                        }
                        _ => {
                            return Err(ProtoError::UnexpectedArgument {
                                command,
                                arg: a.to_string(),
                            })
                        }
                    }
                }
                Ok(Request::CtList { filter, json })
            }
            _ => Err(ProtoError::UnknownCommand(command)),
        }
    }

    /// The request as a line, newline included: what [`Request::parse`] reads back.
    pub fn to_line(&self) -> String {
        let mut s = match self {
            Request::Reload => "reload".to_string(),
            Request::Stats => "stats".to_string(),
            Request::CtEvents => "ct events".to_string(),
            Request::CtCount => "ct count".to_string(),
            Request::FlowCount => "flow count".to_string(),
            Request::CtFlush => "ct flush".to_string(),
            Request::CtExpect => "ct expect".to_string(),
            Request::CtList { filter, json } => {
                let mut s = "ct list".to_string();
                if let Some(n) = filter.src {
                    s.push_str(&format!(" src={}", net_str(n)));
                }
                if let Some(n) = filter.dst {
                    s.push_str(&format!(" dst={}", net_str(n)));
                }
                if let Some(p) = filter.proto {
                    s.push_str(&format!(" proto={p}"));
                }
                if *json {
                    s.push_str(" json");
                }
                s
            }
        };
        s.push('\n');
        s
    }
}

/// A host as its bare address, a network with its length.
fn net_str(n: IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

/// One line of an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Out(String),
    Err(String),
    Ok,
    Fail(String),
}

impl Answer {
    /// The line to send, newline included. A text with newlines becomes several lines of
    /// the same tag (only `Out` and `Err` are split; a `Fail` message is joined with `; `).
    pub fn to_lines(&self) -> String {
        let tagged = |tag: &str, text: &str| {
            let mut s = String::new();
            for l in text.trim_end_matches('\n').split('\n') {
                s.push_str(tag);
                s.push(' ');
                s.push_str(l.trim_end_matches('\r'));
                s.push('\n');
            }
            s
        };
        match self {
            Answer::Out(t) => tagged("out", t),
            Answer::Err(t) => tagged("err", t),
            Answer::Ok => "ok\n".to_string(),
            Answer::Fail(m) => {
                let one: Vec<&str> = m.lines().filter(|l| !l.trim().is_empty()).collect();
                format!("fail {}\n", one.join("; "))
            }
        }
    }

    /// Parses one answer line (without its newline).
    pub fn parse(line: &str) -> Result<Answer, ProtoError> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let (tag, rest) = match line.split_once(' ') {
            Some((t, r)) => (t, r),
            None => (line, ""),
        };
        match tag {
            "out" => Ok(Answer::Out(rest.to_string())),
            "err" => Ok(Answer::Err(rest.to_string())),
            "ok" if rest.is_empty() => Ok(Answer::Ok),
            "fail" => Ok(Answer::Fail(rest.to_string())),
            _ => Err(ProtoError::BadAnswer(line.chars().take(200).collect())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Request, ProtoError> {
        Request::parse(s.as_bytes())
    }

    #[test]
    fn every_request_reads_back() {
        let all = [
            Request::Reload,
            Request::Stats,
            Request::CtEvents,
            Request::CtCount,
            Request::FlowCount,
            Request::CtFlush,
            Request::CtExpect,
            Request::CtList {
                filter: ListFilter::default(),
                json: false,
            },
            Request::CtList {
                filter: ListFilter {
                    src: Some("192.168.1.10".parse::<IpAddr>().unwrap().into()),
                    dst: Some("2001:db8::/32".parse().unwrap()),
                    proto: Some(6),
                },
                json: true,
            },
        ];
        for r in all {
            assert_eq!(
                Request::parse(r.to_line().as_bytes()),
                Ok(r.clone()),
                "{r:?}"
            );
        }
    }

    #[test]
    fn list_arguments() {
        let r = p("ct list src=10.0.0.0/8 proto=udp\n").unwrap();
        let Request::CtList { filter, json } = r else {
            panic!("{r:?}")
        };
        assert!(!json);
        assert_eq!(filter.proto, Some(17));
        assert!(filter.matches("10.1.2.3".parse().unwrap(), "1.1.1.1".parse().unwrap(), 17));
        assert!(!filter.matches("11.1.2.3".parse().unwrap(), "1.1.1.1".parse().unwrap(), 17));
        assert!(!filter.matches("10.1.2.3".parse().unwrap(), "1.1.1.1".parse().unwrap(), 6));
        assert_eq!(
            p("ct list proto=icmpv6").unwrap(),
            Request::CtList {
                filter: ListFilter {
                    proto: Some(58),
                    ..ListFilter::default()
                },
                json: false
            }
        );
        assert!(matches!(p("ct list proto=200"), Ok(Request::CtList { .. })));
    }

    #[test]
    fn malformed_requests_are_errors_in_words() {
        assert_eq!(p(""), Err(ProtoError::Empty));
        assert_eq!(p("  \n"), Err(ProtoError::Empty));
        assert_eq!(p("halt"), Err(ProtoError::UnknownCommand("halt".into())));
        assert_eq!(p("ct"), Err(ProtoError::UnknownCommand("ct".into())));
        assert_eq!(
            p("ct destroy"),
            Err(ProtoError::UnknownCommand("ct destroy".into()))
        );
        assert_eq!(
            p("reload now"),
            Err(ProtoError::UnexpectedArgument {
                command: "reload".into(),
                arg: "now".into()
            })
        );
        let e = p("ct list src=300.1.1.1").unwrap_err();
        assert!(e.to_string().contains("not an address"), "{e}");
        let e = p("ct list proto=tcpp").unwrap_err();
        assert!(e.to_string().contains("not a protocol"), "{e}");
        assert!(p("ct list proto=256").is_err());
        assert_eq!(
            p("ct list src=1.1.1.1 src=2.2.2.2"),
            Err(ProtoError::Duplicate("src".into()))
        );
        assert_eq!(
            p("ct list json json"),
            Err(ProtoError::Duplicate("json".into()))
        );
        assert!(matches!(
            p("ct list sport=80"),
            Err(ProtoError::UnexpectedArgument { .. })
        ));
        assert_eq!(Request::parse(b"stats\xff"), Err(ProtoError::NotText));
        assert_eq!(
            Request::parse(&vec![b'a'; MAX_REQUEST + 1]),
            Err(ProtoError::TooLong)
        );
    }

    #[test]
    fn answers_read_back_and_split_lines() {
        assert_eq!(Answer::Out("a b".into()).to_lines(), "out a b\n");
        assert_eq!(Answer::Err("x\ny\n".into()).to_lines(), "err x\nerr y\n");
        assert_eq!(
            Answer::Fail("one\n\ntwo".into()).to_lines(),
            "fail one; two\n"
        );
        for a in [
            Answer::Out("tcp      6 431999 ESTABLISHED src=1.1.1.1".into()),
            Answer::Out(String::new()),
            Answer::Err("conntrack v1.4.8".into()),
            Answer::Ok,
            Answer::Fail("reload failed".into()),
        ] {
            let line = a.to_lines();
            assert_eq!(Answer::parse(line.trim_end_matches('\n')), Ok(a.clone()));
        }
        assert!(Answer::parse("hello").is_err());
        assert!(Answer::parse("ok but").is_err());
    }
}
