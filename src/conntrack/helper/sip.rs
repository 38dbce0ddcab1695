//! The SIP helper's parser: a SIP message's start line, headers (compact forms and
//! continuation lines included), CSeq, and the SDP media its body announces, following the
//! kernel's `nf_conntrack_sip.c` (`sip_help_udp`/`process_sip_msg`, `ct_sip_get_header`,
//! `process_sdp`). Byte offsets are kept for everything NAT will rewrite.
//!
//! [`help`] is the helper (`sip_help_udp`, `sip_help_tcp`, `process_sip_msg` and the method
//! handlers): RTP and RTCP expectations from SDP offers and answers (direct media), their
//! flush on a new INVITE, a failed INVITE or a BYE, and the signalling expectation of a
//! REGISTER, activated by its 2xx answer. Every message refreshes the control connection to
//! `sip_timeout`.
//!
//! On a translated control connection it is `nf_nat_sip` too: the addresses and ports of
//! the Request-URI, the top Via, Contact, From and To are mapped between the two sides
//! (`map_addr`), the top Via's `maddr=`, `received=` and `rport=` follow, the SDP's `o=` and `c=` addresses and `m=` ports become the ones the peer can
//! reach (a free RTP/RTCP pair is searched, `nf_nat_sdp_media`), `Content-Length` follows, and
//! the media connections are translated back to what was announced (`nf_nat_sip_expected`).
//! The caller makes the payload edit ([`Help::Mangle`]).

use std::net::IpAddr;
use std::ops::Range;

use super::super::conn::ConnRef;
use super::super::expect::{
    ExpectError, Expectation, Expectations, Follow, Policy, INACTIVE, PERMANENT,
};
use super::super::proto::Dir;
use super::super::tuple::Addr;
use super::super::{status, HelperName};
use super::{Help, HelpDrop, Mangle};

/// Payload edits of a translated message: byte ranges of the packet's payload and their
/// new text.
type Edits = Vec<(Range<usize>, Vec<u8>)>;
use crate::packet::{Packet, L4};

/// `SIP_TIMEOUT`: the control connection lives this long after each message.
pub const SIP_TIMEOUT: u32 = 3600;

/// `sip_exp_policy`: the expectation classes, in `SIP_EXPECT_*` order.
pub const SIGNALLING: Policy = Policy {
    class: 0,
    name: "signalling",
    max_expected: 1,
    timeout_secs: 3 * 60,
};
pub const AUDIO: Policy = Policy {
    class: 1,
    name: "audio",
    max_expected: 4,
    timeout_secs: 3 * 60,
};
pub const VIDEO: Policy = Policy {
    class: 2,
    name: "video",
    max_expected: 4,
    timeout_secs: 3 * 60,
};
pub const IMAGE: Policy = Policy {
    class: 3,
    name: "image",
    max_expected: 2,
    timeout_secs: 3 * 60,
};

/// Per control connection (`struct nf_ct_sip_master`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SipState {
    invite_cseq: u32,
    register_cseq: u32,
}

/// `sip_help_udp` / `sip_help_tcp`: the SIP messages of one packet of the control connection
/// `conn` (direction `dir`). Returns whether to refresh the connection to [`SIP_TIMEOUT`]
/// (every parsed message does) with the verdict.
pub fn help(
    conn: &ConnRef,
    dir: Dir,
    state: &mut SipState,
    pkt: &Packet<'_>,
    expect: &Expectations,
    now: u64,
) -> (Help, bool) {
    let (payload, tcp) = match pkt.l4 {
        L4::Udp(_) => (pkt.ip_bytes.get(pkt.l4_offset + 8..), false),
        L4::Tcp(th) => {
            let start = pkt.l4_offset + usize::from(th.header_len);
            (
                pkt.ip_bytes.get(start..start + th.payload_len as usize),
                true,
            )
        }
        _ => return (Help::Accept, false),
    };
    let Some(whole) = payload else {
        return (Help::Accept, false);
    };
    let payload_at = pkt.ip_bytes.len() - whole.len();
    let nat = conn.status() & (status::SRC_NAT | status::DST_NAT) != 0;
    let mut edits: Edits = Vec::new();
    let mut refresh = false;
    let mut base = 0;
    loop {
        let data = &whole[base..];
        let msg = match parse_message(data) {
            Ok(m) => m,
            // Too short, not SIP, or (on TCP) not all there yet: accepted unparsed.
            Err(_) => break,
        };
        refresh = true;
        let mut cx = Nat {
            on: nat,
            base,
            edits: Vec::new(),
        };
        if let Err(why) = process(conn, dir, state, data, &msg, expect, now, &mut cx) {
            return (Help::Drop(why), refresh);
        }
        if nat {
            headers(conn, dir, data, &msg, &mut cx);
            content_length(&msg, &mut cx);
            edits.append(&mut cx.edits);
        }
        // One message per datagram; a TCP segment may hold several.
        if !tcp || msg.len >= data.len() {
            break;
        }
        base += msg.len;
    }
    if edits.is_empty() {
        return (Help::Accept, refresh);
    }
    edits.sort_by_key(|(r, _)| r.start);
    let mut text = Vec::with_capacity(whole.len() + 32);
    let mut at = 0;
    for (r, new) in edits {
        if r.start < at || r.end > whole.len() {
            continue;
        }
        text.extend_from_slice(&whole[at..r.start]);
        text.extend_from_slice(&new);
        at = r.end;
    }
    text.extend_from_slice(&whole[at..]);
    let m = Mangle {
        offset: payload_at,
        len: whole.len(),
        text,
    };
    (Help::Mangle(m), refresh)
}

/// The NAT side of one message: whether the control connection is translated, where the
/// message starts in the payload, and its edits (in payload coordinates).
struct Nat {
    on: bool,
    base: usize,
    edits: Edits,
}

impl Nat {
    /// Replaces `r` (message coordinates) with `text`, unless an edit already covers it.
    fn edit(&mut self, r: Range<usize>, text: Vec<u8>) {
        let r = self.base + r.start..self.base + r.end;
        if !self
            .edits
            .iter()
            .any(|(x, _)| x.start < r.end && r.start < x.end)
        {
            self.edits.push((r, text));
        }
    }
}

fn host_port_text(a: IpAddr, port: u16) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => format!("{a}:{port}").into_bytes(),
        IpAddr::V6(a) => format!("[{a}]:{port}").into_bytes(),
    }
}

/// `map_addr`: an address and port of the sender become the ones the receiver sees it at,
/// and the receiver's the ones the sender addressed.
fn map_addr(conn: &ConnRef, dir: Dir, a: IpAddr, port: u16) -> Option<(IpAddr, u16)> {
    let own = conn.tuple(dir);
    let seen = conn.tuple(dir.other());
    let new = if a == own.src_ip() && port == own.src_id {
        (seen.dst_ip(), seen.dst_id)
    } else if a == own.dst_ip() && port == own.dst_id {
        (seen.src_ip(), seen.src_id)
    } else {
        return None;
    };
    (new != (a, port)).then_some(new)
}

/// `host[:port]` of a URI within a header value (after `sip:` and any `user@`): its byte
/// range in the value, the address and the port (`ct_sip_parse_header_uri`).
fn host_port_in(value: &[u8]) -> Option<(Range<usize>, IpAddr, u16)> {
    let text = std::str::from_utf8(value).ok()?;
    let i = text.find("sip:")? + 4;
    let end = text[i..].find(URI_STOPS).map_or(text.len(), |e| i + e);
    let start = text[i..end].rfind('@').map_or(i, |at| i + at + 1);
    host_port_at(text, start)
}

/// Where a URI's or a Via's `host[:port]` ends.
const URI_STOPS: [char; 6] = [';', '>', ',', ' ', '\r', '?'];

/// `host[:port]` from `start` in `text` (an IPv6 host in brackets): its range, the address
/// and the port, 5060 when absent. A port outside 1024..65535 makes it unusable, as in the
/// kernel's `ct_sip_parse_header_uri` and `ct_sip_parse_request`.
fn host_port_at(text: &str, start: usize) -> Option<(Range<usize>, IpAddr, u16)> {
    let rest = text.get(start..)?;
    let len = rest.find(URI_STOPS).unwrap_or(rest.len());
    let hp = &rest[..len];
    let (host, port) = if let Some(v6) = hp.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        (h, after.strip_prefix(':'))
    } else {
        match hp.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hp, None),
        }
    };
    let addr: IpAddr = host.parse().ok()?;
    let port = match port {
        Some(p) => {
            let p: u32 = p.parse().ok()?;
            u16::try_from(p).ok().filter(|p| *p >= 1024)?
        }
        None => 5060,
    };
    Some((start..start + len, addr, port))
}

/// `nf_nat_sip`'s header part: the Request-URI, the top Via and its parameters, every
/// Contact, From and To.
fn headers(conn: &ConnRef, dir: Dir, data: &[u8], msg: &Message, cx: &mut Nat) {
    let mut fields: Vec<Range<usize>> = Vec::new();
    if let Start::Request { uri, .. } = &msg.start {
        fields.push(uri.clone());
    }
    for (name, r) in &msg.headers {
        if matches!(name.as_str(), "contact" | "from" | "to") {
            fields.push(r.clone());
        }
    }
    for r in fields {
        let Some(value) = data.get(r.clone()) else {
            continue;
        };
        if let Some((hp, a, port)) = host_port_in(value) {
            if let Some((na, np)) = map_addr(conn, dir, a, port) {
                cx.edit(r.start + hp.start..r.start + hp.end, host_port_text(na, np));
            }
        }
    }
    via(conn, dir, data, msg, cx);
}

/// `nf_nat_sip`'s top Via. The kernel takes the first Via header in which the connection's
/// transport (`UDP ` or `TCP `, any case) is followed by an address, and only when that
/// `host:port` is this connection's: a request's sender, or the receiver of a response
/// (which carries the Via its request had, as the peer saw it). Then `host:port` is mapped
/// as any other (`map_addr`), and among its parameters, up to the first comma:
///
/// * `maddr=` (where to send the reply) naming the sender becomes the sender's address as
///   the receiver sees it;
/// * `received=` (RFC 3261 18.2.1: where the server got the request from) naming the
///   receiver, i.e. the translated address in a response on its way back, becomes the
///   address the receiver really has (the client's own), and `rport=` (RFC 3581) its port
///   likewise.
///
/// Each is left alone when it already says what it would become.
fn via(conn: &ConnRef, dir: Dir, data: &[u8], msg: &Message, cx: &mut Nat) {
    let own = conn.tuple(dir);
    let seen = conn.tuple(dir.other());
    let transport = if own.proto == 6 { "tcp " } else { "udp " };
    let Some((r, text, hp, addr, port)) = msg
        .headers
        .iter()
        .filter(|(name, _)| name == "via")
        .find_map(|(_, r)| {
            let text = std::str::from_utf8(data.get(r.clone())?).ok()?;
            let at = text.to_ascii_lowercase().find(transport)? + transport.len();
            let (hp, addr, port) = host_port_at(text, at)?;
            Some((r.clone(), text, hp, addr, port))
        })
    else {
        return;
    };
    let request = matches!(msg.start, Start::Request { .. });
    let this = if request {
        (own.src_ip(), own.src_id)
    } else {
        (own.dst_ip(), own.dst_id)
    };
    if (addr, port) != this {
        return;
    }
    if let Some((na, np)) = map_addr(conn, dir, addr, port) {
        cx.edit(r.start + hp.start..r.start + hp.end, host_port_text(na, np));
    }
    // ct_sip_parse_address_param / ct_sip_parse_numerical_param: from the end of host:port
    // to the first comma (the next Via value).
    let end = text[hp.end..].find(',').map_or(text.len(), |c| hp.end + c);
    let params = &text[hp.end..end];
    let at = |p: Range<usize>| r.start + hp.end + p.start..r.start + hp.end + p.end;
    if let Some((p, a)) = address_param(params, "maddr=", true) {
        if a == own.src_ip() && a != seen.dst_ip() {
            cx.edit(at(p), addr_text(seen.dst_ip(), true).into_bytes());
        }
    }
    if let Some((p, a)) = address_param(params, "received=", false) {
        if a == own.dst_ip() && a != seen.src_ip() {
            cx.edit(at(p), addr_text(seen.src_ip(), false).into_bytes());
        }
    }
    if let Some((p, n)) = numerical_param(params, "rport=") {
        // The kernel compares htons(n): the number's low 16 bits.
        let n = n as u16;
        if n == own.dst_id && n != seen.src_id {
            cx.edit(at(p), seen.src_id.to_string().into_bytes());
        }
    }
}

/// Where `name` (case-insensitive, as `ct_sip_header_search`) starts its value in `params`.
fn param_value(params: &str, name: &str) -> Option<usize> {
    Some(params.to_ascii_lowercase().find(name)? + name.len())
}

/// `ct_sip_parse_address_param`: the address after `name`, its range in `params` (brackets
/// included). An IPv6 address must be in brackets when `delim` (maddr), may be otherwise.
fn address_param(params: &str, name: &str, delim: bool) -> Option<(Range<usize>, IpAddr)> {
    let start = param_value(params, name)?;
    let rest = &params[start..];
    let v4_len = rest
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(rest.len());
    if let Ok(a) = rest[..v4_len].parse::<std::net::Ipv4Addr>() {
        return Some((start..start + v4_len, IpAddr::V4(a)));
    }
    let bracket = rest.starts_with('[');
    if delim && !bracket {
        return None;
    }
    let inner = &rest[usize::from(bracket)..];
    let len = inner
        .find(|c: char| !c.is_ascii_hexdigit() && c != ':' && c != '.')
        .unwrap_or(inner.len());
    let a: std::net::Ipv6Addr = inner[..len].parse().ok()?;
    let closed = inner[len..].starts_with(']');
    if delim && !closed {
        return None;
    }
    let total = usize::from(bracket) + len + usize::from(closed);
    Some((start..start + total, IpAddr::V6(a)))
}

/// `ct_sip_parse_numerical_param`: the decimal number after `name` and its range.
fn numerical_param(params: &str, name: &str) -> Option<(Range<usize>, u32)> {
    let start = param_value(params, name)?;
    let rest = &params[start..];
    let len = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let n = rest[..len].parse().ok()?;
    Some((start..start + len, n))
}

/// `sip_sprintf_addr`: an address as SIP writes it, an IPv6 one in brackets when `delim`.
fn addr_text(a: IpAddr, delim: bool) -> String {
    match a {
        IpAddr::V6(a) if delim => format!("[{a}]"),
        a => a.to_string(),
    }
}

/// `mangle_content_len`: the body's new length, when the SDP was rewritten.
fn content_length(msg: &Message, cx: &mut Nat) {
    let (base, body) = (cx.base, msg.body.clone());
    let delta: isize = cx
        .edits
        .iter()
        .filter(|(r, _)| r.start >= base + body.start && r.end <= base + body.end)
        .map(|(r, t)| t.len() as isize - r.len() as isize)
        .sum();
    if delta == 0 {
        return;
    }
    if let Some((_, r)) = msg.headers.iter().find(|(n, _)| n == "content-length") {
        let new = (body.len() as isize + delta).max(0);
        cx.edit(r.clone(), new.to_string().into_bytes());
    }
}

/// `process_sip_request` / `process_sip_response` and the handlers of `sip_handlers[]`.
#[allow(clippy::too_many_arguments)]
fn process(
    conn: &ConnRef,
    dir: Dir,
    state: &mut SipState,
    data: &[u8],
    msg: &Message,
    expect: &Expectations,
    now: u64,
    cx: &mut Nat,
) -> Result<(), HelpDrop> {
    let cseq = msg.cseq.as_ref().map_or(0, |c| c.0);
    let body = &data[msg.body.clone()];
    let body_at = msg.body.start;
    let media_classes = [AUDIO.class, VIDEO.class, IMAGE.class];
    let flush_media = || {
        for c in media_classes {
            expect.remove_class(conn, c);
        }
    };
    let Some(method) = msg.method() else {
        return Ok(());
    };
    match (&msg.start, method) {
        (Start::Request { .. }, "INVITE") => {
            flush_media();
            process_sdp(conn, dir, body, body_at, expect, now, cx)?;
            state.invite_cseq = cseq;
        }
        (Start::Request { .. }, "UPDATE" | "PRACK" | "ACK") => {
            process_sdp(conn, dir, body, body_at, expect, now, cx)?;
        }
        (Start::Request { .. }, "BYE") => flush_media(),
        (Start::Request { .. }, "REGISTER") => {
            state.register_cseq = cseq;
            register(conn, dir, data, msg, expect, now, cx.on)?;
        }
        (Start::Response { code }, "INVITE" | "UPDATE" | "PRACK") => {
            if (100..300).contains(code) {
                process_sdp(conn, dir, body, body_at, expect, now, cx)?;
            } else if method == "INVITE" && cseq == state.invite_cseq {
                flush_media();
            }
        }
        (Start::Response { code }, "REGISTER") if cseq == state.register_cseq => {
            if (200..300).contains(code) {
                // The registration holds: its signalling expectation becomes active.
                let secs = expires_of(data, msg).unwrap_or(SIP_TIMEOUT);
                if secs == 0 {
                    expect.remove_class(conn, SIGNALLING.class);
                } else {
                    expect.update_class(conn, SIGNALLING.class, |e| {
                        e.flags &= !INACTIVE;
                        e.expires = now + u64::from(secs) * 1_000_000_000;
                    });
                }
            } else if *code >= 200 {
                expect.remove_class(conn, SIGNALLING.class);
            }
        }
        _ => {}
    }
    Ok(())
}

/// `process_sdp` + `set_expected_rtp_rtcp` with `sip_direct_media`: RTP and RTCP from the
/// signalling peer to each active stream's address, which must be the sender's own.
#[allow(clippy::too_many_arguments)]
fn process_sdp(
    conn: &ConnRef,
    dir: Dir,
    body: &[u8],
    body_at: usize,
    expect: &Expectations,
    now: u64,
    cx: &mut Nat,
) -> Result<(), HelpDrop> {
    let media = match parse_sdp(body) {
        Ok(m) => m,
        Err(SipError::WrongPort(_)) => return Err(HelpDrop::Sip("wrong port")),
        Err(SipError::NoAddress) => return Err(HelpDrop::Sip("cannot parse SDP message")),
        Err(_) => return Ok(()),
    };
    let sender = conn.tuple(dir);
    let peer = conn.tuple(dir.other());
    for m in media {
        if m.addr != sender.src_ip() {
            continue;
        }
        let policy = match m.kind {
            MediaKind::Audio => AUDIO,
            MediaKind::Video => VIDEO,
            MediaKind::Image => IMAGE,
        };
        let helper = HelperName::new("sip").unwrap_or_default();
        if cx.on {
            nat_media(conn, dir, &m, policy, body_at, expect, now, cx)?;
            continue;
        }
        for port in [m.rtp_port(), m.rtcp_port()] {
            let mut t = peer;
            t.proto = 17;
            t.dst = Addr::from_ip(m.addr);
            t.dst_id = port;
            t.src_id = 0;
            let e = Expectation::new(t, conn, helper, policy, now);
            expect.add(e, now).map_err(HelpDrop::Expect)?;
        }
    }
    if cx.on {
        // `o=` names the sender too (nf_nat_sdp_session).
        let sender_ip = sender.src_ip().to_string();
        let mut at = 0;
        for raw in body.split(|&b| b == b'\n') {
            // Offsets into the body itself: a line that is not UTF-8 is left alone.
            let line = std::str::from_utf8(raw).unwrap_or("");
            let len = raw.len();
            if line.starts_with("o=") {
                if let Some(i) = line.rfind(&sender_ip) {
                    let new = conn.tuple(dir.other()).dst_ip().to_string();
                    cx.edit(
                        body_at + at + i..body_at + at + i + sender_ip.len(),
                        new.into_bytes(),
                    );
                }
            }
            at += len + 1;
        }
    }
    Ok(())
}

/// `nf_nat_sdp_media` + `nf_nat_sdp_addr`: a stream the peer reaches at the sender's
/// translated address, on the first free RTP/RTCP port pair from the announced one; the
/// `m=` port and the `c=` address rewritten to match.
#[allow(clippy::too_many_arguments)]
fn nat_media(
    conn: &ConnRef,
    dir: Dir,
    m: &Media,
    policy: Policy,
    body_at: usize,
    expect: &Expectations,
    now: u64,
    cx: &mut Nat,
) -> Result<(), HelpDrop> {
    let sender = conn.tuple(dir);
    let seen = conn.tuple(dir.other());
    let newaddr = seen.dst_ip();
    let helper = HelperName::new("sip").unwrap_or_default();
    let mut chosen = None;
    let mut base = m.rtp_port();
    for _ in 0..128 {
        let mut ok = true;
        for (i, port) in [base, base.wrapping_add(1)].into_iter().enumerate() {
            let mut t = seen;
            t.proto = 17;
            t.src_id = 0;
            t.dst = Addr::from_ip(newaddr);
            t.dst_id = port;
            let mut e = Expectation::new(t, conn, helper, policy, now);
            e.follow = Some(Follow {
                snat: sender.dst_ip(),
                dnat: (m.addr, m.rtp_port() + i as u16),
            });
            match expect.add(e, now) {
                Ok(()) => {}
                Err(ExpectError::Clash) => {
                    ok = false;
                    break;
                }
                Err(err) => return Err(HelpDrop::Expect(err)),
            }
        }
        if ok {
            chosen = Some(base);
            break;
        }
        base = match base.checked_add(2) {
            Some(b) if b < 65535 => b,
            _ => break,
        };
    }
    let Some(port) = chosen else {
        return Err(HelpDrop::Sip("cannot allocate an RTP port pair"));
    };
    if port != m.rtp_port() {
        let announced = port + (m.port & 1);
        cx.edit(
            body_at + m.port_at.start..body_at + m.port_at.end,
            announced.to_string().into_bytes(),
        );
    }
    if m.addr != newaddr {
        cx.edit(
            body_at + m.addr_at.start..body_at + m.addr_at.end,
            newaddr.to_string().into_bytes(),
        );
    }
    Ok(())
}

/// `process_register_request`: a REGISTER whose Contact is the sender itself expects the
/// registrar's calls to that address and port (inactive until the 2xx answer).
#[allow(clippy::too_many_arguments)]
fn register(
    conn: &ConnRef,
    dir: Dir,
    data: &[u8],
    msg: &Message,
    expect: &Expectations,
    now: u64,
    nat: bool,
) -> Result<(), HelpDrop> {
    let Some(contact) = msg.header(data, "contact") else {
        return Ok(());
    };
    let Some((addr, port)) = uri_host_port(contact) else {
        return Ok(());
    };
    let sender = conn.tuple(dir);
    if addr != sender.src_ip() {
        return Ok(());
    }
    if expires_of(data, msg) == Some(0) {
        expect.remove_class(conn, SIGNALLING.class);
        return Ok(());
    }
    let peer = conn.tuple(dir.other());
    let mut t = peer;
    // Through NAT the registrar calls the Contact as it was rewritten (nf_nat_sip_expect).
    let (to, to_port) = match nat.then(|| map_addr(conn, dir, addr, port)).flatten() {
        Some(mapped) => mapped,
        None => (addr, port),
    };
    t.dst = Addr::from_ip(to);
    t.dst_id = to_port;
    t.src_id = 0;
    let helper = HelperName::new("sip").unwrap_or_default();
    let mut e = Expectation::new(t, conn, helper, SIGNALLING, now);
    if (to, to_port) != (addr, port) {
        e.follow = Some(Follow {
            snat: sender.dst_ip(),
            dnat: (addr, port),
        });
    }
    e.flags = PERMANENT | INACTIVE;
    e.helper_for_new = Some(helper);
    e.expires = now + u64::from(SIP_TIMEOUT) * 1_000_000_000;
    expect.add(e, now).map_err(HelpDrop::Expect)
}

/// The registration's lifetime: the Contact's `;expires=`, else the `Expires:` header.
fn expires_of(data: &[u8], msg: &Message) -> Option<u32> {
    let contact = msg.header(data, "contact").unwrap_or(b"");
    let text = String::from_utf8_lossy(contact).to_ascii_lowercase();
    if let Some(i) = text.find(";expires=") {
        let digits: String = text[i + 9..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        return digits.parse().ok();
    }
    let h = msg.header(data, "expires")?;
    String::from_utf8_lossy(h).trim().parse().ok()
}

/// `sip:user@host:port` in a header value: the host's address and the port (5060 when
/// absent; a port outside 1024..65535 makes the URI unusable, as `ct_sip_parse_header_uri`).
pub fn uri_host_port(value: &[u8]) -> Option<(IpAddr, u16)> {
    let text = std::str::from_utf8(value).ok()?;
    let i = text.find("sip:")?;
    let rest = &text[i + 4..];
    let end = rest
        .find([';', '>', ',', ' ', '\r', '?'])
        .unwrap_or(rest.len());
    let hostport = &rest[..end];
    let hostport = hostport.rsplit_once('@').map_or(hostport, |(_, h)| h);
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        (h, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    let addr: IpAddr = host.parse().ok()?;
    let port = match port {
        Some(p) => {
            let p: u32 = p.parse().ok()?;
            if !(1024..=65535).contains(&p) {
                return None;
            }
            p as u16
        }
        None => 5060,
    };
    Some((addr, port))
}

/// Why a message gives no expectation; the kernel's reaction is in the comment.
#[derive(thiserror::Error, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SipError {
    /// Shorter than `SIP/2.0 200`: ignored (accepted, not parsed).
    #[error("message too short")]
    TooShort,
    /// The start line is neither `SIP/2.0 NNN` nor `METHOD<space><letter>`: ignored.
    #[error("not a SIP message")]
    NotSip,
    /// No blank line ends the headers within the data: on TCP the kernel waits for more.
    #[error("headers not terminated")]
    Unterminated,
    /// An `m=` line's port outside 1024..65535: the kernel drops (`wrong port %u`).
    #[error("SDP media port {0} out of range")]
    WrongPort(u32),
    /// Media with no `c=` address at session or media level: the kernel drops (`cannot parse
    /// SDP message`).
    #[error("SDP without a connection address")]
    NoAddress,
}

/// The start line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    Request { method: String, uri: Range<usize> },
    Response { code: u32 },
}

/// One SIP message within the data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub start: Start,
    /// Each header's full lower-case name (compact forms expanded) and its value's bytes.
    pub headers: Vec<(String, Range<usize>)>,
    /// `CSeq: <number> <method>`.
    pub cseq: Option<(u32, String)>,
    /// The body: from the blank line on, `Content-Length` bytes (or what is there).
    pub body: Range<usize>,
    /// Bytes of the data this message takes (for several messages in one TCP segment).
    pub len: usize,
}

impl Message {
    /// The value of the first header called `name` (full lower-case name).
    pub fn header<'d>(&self, data: &'d [u8], name: &str) -> Option<&'d [u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, r)| data.get(r.clone()))
    }

    /// The method the message is about: its own, or for a response the CSeq's.
    pub fn method(&self) -> Option<&str> {
        match &self.start {
            Start::Request { method, .. } => Some(method),
            Start::Response { .. } => self.cseq.as_ref().map(|(_, m)| m.as_str()),
        }
    }
}

/// The compact header forms the kernel accepts (RFC 3261 7.3.3).
fn expand(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    match lower.as_str() {
        "f" => "from".into(),
        "t" => "to".into(),
        "m" => "contact".into(),
        "v" => "via".into(),
        "l" => "content-length".into(),
        "i" => "call-id".into(),
        "c" => "content-type".into(),
        _ => lower,
    }
}

fn trim(data: &[u8], mut r: Range<usize>) -> Range<usize> {
    while r.start < r.end && matches!(data[r.start], b' ' | b'\t') {
        r.start += 1;
    }
    while r.end > r.start && matches!(data[r.end - 1], b' ' | b'\t' | b'\r') {
        r.end -= 1;
    }
    r
}

/// Parses the first message in `data`.
pub fn parse_message(data: &[u8]) -> Result<Message, SipError> {
    if data.len() < "SIP/2.0 200".len() {
        return Err(SipError::TooShort);
    }
    let line_end = data
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(SipError::Unterminated)?;
    let first = &data[..line_end];
    let start = if let Some(rest) = first.strip_prefix(b"SIP/2.0 ") {
        // simple_strtoul: the leading digits.
        let digits: Vec<u8> = rest
            .iter()
            .copied()
            .take_while(u8::is_ascii_digit)
            .collect();
        let code = std::str::from_utf8(&digits)
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or(SipError::NotSip)?;
        Start::Response { code }
    } else {
        let sp = first
            .iter()
            .position(|&b| b == b' ')
            .ok_or(SipError::NotSip)?;
        if sp == 0 || !first.get(sp + 1).is_some_and(u8::is_ascii_alphabetic) {
            return Err(SipError::NotSip);
        }
        let method = String::from_utf8_lossy(&first[..sp]).into_owned();
        let uri_end = first[sp + 1..]
            .iter()
            .position(|&b| b == b' ')
            .map_or(first.len(), |e| sp + 1 + e);
        Start::Request {
            method,
            uri: sp + 1..uri_end,
        }
    };
    // Headers: `Name: value`, a line starting with space or tab continues the previous one.
    let mut headers: Vec<(String, Range<usize>)> = Vec::new();
    let mut pos = line_end + 1;
    let body_start = loop {
        let end = data[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|e| pos + e)
            .ok_or(SipError::Unterminated)?;
        let line = &data[pos..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break end + 1;
        }
        if matches!(line[0], b' ' | b'\t') {
            if let Some((_, r)) = headers.last_mut() {
                r.end = end;
            }
        } else if let Some(colon) = line.iter().position(|&b| b == b':') {
            let name = String::from_utf8_lossy(&line[..colon]).trim().to_string();
            headers.push((expand(&name), pos + colon + 1..end));
        }
        pos = end + 1;
        if pos >= data.len() {
            return Err(SipError::Unterminated);
        }
    };
    let headers: Vec<(String, Range<usize>)> = headers
        .into_iter()
        .map(|(n, r)| (n, trim(data, r)))
        .collect();
    let value = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, r)| std::str::from_utf8(&data[r.clone()]).ok())
    };
    let cseq = value("cseq").and_then(|v| {
        let mut w = v.split_whitespace();
        let n = w.next()?.parse().ok()?;
        Some((n, w.next()?.to_string()))
    });
    let clen = value("content-length")
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(data.len() - body_start);
    let body_end = (body_start + clen).min(data.len());
    Ok(Message {
        start,
        headers,
        cseq,
        body: body_start..body_end,
        len: body_end,
    })
}

/// The kind of an `m=` line the kernel expects media for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaKind {
    Audio,
    Video,
    Image,
}

/// One active media stream of an SDP body: where RTP (even port) and RTCP (the next) go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Media {
    pub kind: MediaKind,
    pub addr: IpAddr,
    /// The announced port; RTP is expected on `port & !1`, RTCP on that + 1.
    pub port: u16,
    /// Where the port's digits are, in the body (for the NAT rewrite of `m=`).
    pub port_at: Range<usize>,
    /// Where the `c=` address that applies is, in the body (session or media level).
    pub addr_at: Range<usize>,
}

impl Media {
    pub fn rtp_port(&self) -> u16 {
        self.port & !1
    }
    pub fn rtcp_port(&self) -> u16 {
        self.rtp_port() + 1
    }
}

/// `c=IN IP4 addr` / `c=IN IP6 addr`: the address and its byte range.
fn connection(line: &str, at: usize) -> Option<(IpAddr, Range<usize>)> {
    let rest = line.strip_prefix("c=")?;
    let mut parts = rest.splitn(3, ' ');
    if parts.next()? != "IN" {
        return None;
    }
    let fam = parts.next()?;
    let addr_text = parts.next()?.split(['/', ' ']).next()?.trim_end();
    let addr: IpAddr = addr_text.parse().ok()?;
    if (fam == "IP4") != addr.is_ipv4() {
        return None;
    }
    let off = at + line.find(addr_text)?;
    Some((addr, off..off + addr_text.len()))
}

/// `process_sdp`: the active audio, video and image streams of an SDP body.
pub fn parse_sdp(body: &[u8]) -> Result<Vec<Media>, SipError> {
    // Byte offset of each line in `body` (offsets are what NAT rewrites, so they must be the
    // body's own: a line that is not UTF-8 is kept as an empty line, never re-encoded).
    let mut lines: Vec<(usize, &str)> = Vec::new();
    let mut at = 0;
    for l in body.split(|&b| b == b'\n') {
        let text = std::str::from_utf8(l).unwrap_or("");
        lines.push((at, text.trim_end_matches('\r')));
        at += l.len() + 1;
    }
    let Some(v) = lines.iter().position(|(_, l)| l.starts_with("v=")) else {
        return Ok(Vec::new());
    };
    let first_m = lines
        .iter()
        .skip(v)
        .position(|(_, l)| l.starts_with("m="))
        .map_or(lines.len(), |i| v + i);
    let session = lines[v..first_m]
        .iter()
        .find_map(|(at, l)| connection(l, *at));
    let mut out = Vec::new();
    let mut i = first_m;
    while i < lines.len() {
        let (m_at, m) = lines[i];
        // This media's section runs to the next m= line.
        let next = lines
            .iter()
            .skip(i + 1)
            .position(|(_, l)| l.starts_with("m="))
            .map_or(lines.len(), |j| i + 1 + j);
        let kind = if m.starts_with("m=audio ") {
            Some(MediaKind::Audio)
        } else if m.starts_with("m=video ") {
            Some(MediaKind::Video)
        } else if m.starts_with("m=image ") {
            Some(MediaKind::Image)
        } else {
            None
        };
        if let Some(kind) = kind {
            let after = m.find(' ').map_or(m.len(), |s| s + 1);
            let digits: String = m[after..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let port: u32 = digits.parse().unwrap_or(0);
            if port != 0 {
                if !(1024..=65535).contains(&port) {
                    return Err(SipError::WrongPort(port));
                }
                let media_c = lines[i + 1..next]
                    .iter()
                    .find_map(|(at, l)| connection(l, *at));
                let (addr, addr_at) = media_c
                    .or_else(|| session.clone())
                    .ok_or(SipError::NoAddress)?;
                out.push(Media {
                    kind,
                    addr,
                    port: port as u16,
                    port_at: m_at + after..m_at + after + digits.len(),
                    addr_at,
                });
            }
        }
        i = next;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &str = "INVITE sip:bob@198.51.100.7 SIP/2.0\r\n\
        Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK776asdhds\r\n\
        Max-Forwards: 70\r\n\
        t: <sip:bob@198.51.100.7>\r\n\
        f: Alice <sip:alice@10.0.0.2>;tag=1928301774\r\n\
        i: a84b4c76e66710\r\n\
        CSeq: 314159 INVITE\r\n\
        m: <sip:alice@10.0.0.2:5060>\r\n\
        Content-Type: application/sdp\r\n\
        Content-Length: 133\r\n\
        \r\n\
        v=0\r\n\
        o=alice 2890844526 2890844526 IN IP4 10.0.0.2\r\n\
        s=-\r\n\
        c=IN IP4 10.0.0.2\r\n\
        t=0 0\r\n\
        m=audio 49170 RTP/AVP 0\r\n\
        m=video 0 RTP/AVP 31\r\n";

    #[test]
    fn an_invite_with_sdp() {
        let data = INVITE.as_bytes();
        let m = parse_message(data).unwrap();
        let Start::Request { method, uri } = &m.start else {
            panic!()
        };
        assert_eq!(method, "INVITE");
        assert_eq!(&data[uri.clone()], b"sip:bob@198.51.100.7");
        assert_eq!(m.cseq, Some((314159, "INVITE".to_string())));
        assert_eq!(
            m.header(data, "contact"),
            Some(&b"<sip:alice@10.0.0.2:5060>"[..])
        );
        assert_eq!(m.header(data, "call-id"), Some(&b"a84b4c76e66710"[..]));
        let body = &data[m.body.clone()];
        assert!(body.starts_with(b"v=0"));
        let media = parse_sdp(body).unwrap();
        // The video stream has port 0: inactive, skipped.
        assert_eq!(media.len(), 1);
        let a = &media[0];
        assert_eq!(
            (a.kind, a.port, a.rtp_port(), a.rtcp_port()),
            (MediaKind::Audio, 49170, 49170, 49171)
        );
        assert_eq!(a.addr, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(&body[a.port_at.clone()], b"49170");
        assert_eq!(&body[a.addr_at.clone()], b"10.0.0.2");
    }

    #[test]
    fn via_parameters_as_the_kernel_reads_them() {
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        let p = ";MAddr=[2001:db8::1];received=2001:db8::2;rport=5062;x=1";
        let range = |what: &str| {
            let at = p.find(what).unwrap();
            at..at + what.len()
        };
        // maddr= wants its IPv6 address in brackets, and the range covers them.
        assert_eq!(
            address_param(p, "maddr=", true),
            Some((range("[2001:db8::1]"), a("2001:db8::1")))
        );
        assert_eq!(
            address_param(p, "received=", false),
            Some((range("2001:db8::2"), a("2001:db8::2")))
        );
        assert_eq!(address_param(";maddr=2001:db8::1", "maddr=", true), None);
        assert_eq!(
            address_param(";received=10.0.0.2;rport", "received=", false),
            Some((10..18, a("10.0.0.2")))
        );
        assert_eq!(numerical_param(p, "rport="), Some((range("5062"), 5062)));
        // A bare rport (the client's request for one) has no value.
        assert_eq!(numerical_param(";rport;branch=z9", "rport="), None);
        assert_eq!(address_param(";received=", "received=", false), None);
        assert_eq!(address_param(";received=x", "received=", false), None);
        assert_eq!(
            addr_text(a("2001:db8::1"), true),
            "[2001:db8::1]".to_string()
        );
        assert_eq!(addr_text(a("10.0.0.1"), true), "10.0.0.1".to_string());
        // host:port with a port below 1024 or above 65535 is unusable.
        assert!(host_port_at("10.0.0.2:5060;x", 0).is_some());
        assert_eq!(host_port_at("10.0.0.2:80", 0), None);
        assert_eq!(host_port_at("10.0.0.2:70000", 0), None);
        assert_eq!(
            host_port_at("[2001:db8::1]:5070>", 0),
            Some((0..18, a("2001:db8::1"), 5070))
        );
    }

    #[test]
    fn responses_take_the_method_from_cseq() {
        let data = b"SIP/2.0 200 OK\r\nCSeq: 314159 INVITE\r\nl: 0\r\n\r\n";
        let m = parse_message(data).unwrap();
        assert_eq!(m.start, Start::Response { code: 200 });
        assert_eq!(m.method(), Some("INVITE"));
        assert_eq!(m.len, data.len());
    }

    #[test]
    fn media_level_connection_and_bad_ports() {
        let sdp = b"v=0\r\nc=IN IP4 10.0.0.2\r\nm=audio 5004 RTP/AVP 0\r\nc=IN IP4 10.0.0.9\r\n";
        let m = parse_sdp(sdp).unwrap();
        assert_eq!(m[0].addr, "10.0.0.9".parse::<IpAddr>().unwrap());
        assert_eq!(
            parse_sdp(b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 80 RTP/AVP 0\r\n"),
            Err(SipError::WrongPort(80))
        );
        assert_eq!(
            parse_sdp(b"v=0\r\nm=audio 5004 RTP/AVP 0\r\n"),
            Err(SipError::NoAddress)
        );
        let v6 = parse_sdp(b"v=0\r\nc=IN IP6 2001:db8::5\r\nm=image 6000 udptl t38\r\n").unwrap();
        assert_eq!(
            (v6[0].kind, v6[0].addr),
            (MediaKind::Image, "2001:db8::5".parse::<IpAddr>().unwrap())
        );
        // No SDP at all: nothing to expect.
        assert_eq!(parse_sdp(b""), Ok(vec![]));
    }

    #[test]
    fn continuation_lines_and_junk() {
        let data = b"REGISTER sip:reg.example SIP/2.0\r\nContact: <sip:a@10.0.0.2>\r\n ;expires=3600\r\nCSeq: 1 REGISTER\r\n\r\n";
        let m = parse_message(data).unwrap();
        let c = std::str::from_utf8(m.header(data, "contact").unwrap()).unwrap();
        assert!(c.contains("expires=3600"), "{c}");
        assert_eq!(parse_message(b"SIP/2.0"), Err(SipError::TooShort));
        // Any `WORD<space><letter>` is a request to the kernel; the handlers table decides.
        let hello = parse_message(b"HELLO world\r\n\r\n").unwrap();
        assert_eq!(hello.method(), Some("HELLO"));
        assert_eq!(
            parse_message(b"INVITE 123 SIP/2.0\r\n\r\n"),
            Err(SipError::NotSip)
        );
        assert_eq!(
            parse_message(b"INVITE sip:x SIP/2.0\r\nVia: x\r\n"),
            Err(SipError::Unterminated)
        );
        // Arbitrary bytes never panic.
        let mut x: u32 = 1;
        for len in 0..120 {
            let v: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    b"SIP/2.0 INVITE:\r\n v=cm=audio 1234 IN IP4 10.0.0.1 "[(x >> 16) as usize % 50]
                })
                .collect();
            if let Ok(m) = parse_message(&v) {
                let _ = parse_sdp(&v[m.body.clone()]);
            }
            let _ = parse_sdp(&v);
        }
    }
}
