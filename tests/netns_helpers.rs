//! Differential test of keepstate's FTP and SIP helpers (and their NAT rewrites) against
//! the Linux kernel's `nf_conntrack_ftp`/`nf_nat_ftp` and `nf_conntrack_sip`/`nf_nat_sip`.
//! Needs root, `nft`, `conntrack`, `tcpdump`, `ping` and `ethtool` (scripts/setup.sh
//! installs them); skipped with a message otherwise.
//!
//! The lab of `netns_conntrack` (tests/common/netns.rs): a router namespace between a LAN
//! namespace and a WAN namespace, running [`RULES`] with `nft -f`: `ct helper` objects of
//! type "ftp" (tcp) and "sip" (udp) set on tcp/21 and udp/5060 in a prerouting filter chain,
//! a forward chain with per-state counters (established, related, new LAN->WAN, new
//! port-forwarded, policy drop), `oifname "wan" masquerade`, and a port forward of tcp/21
//! on the router's WAN address to an FTP server on the LAN. The LAN host speaks from
//! [`HOST`] (10.77.1.100), longer than the router's WAN address 10.77.2.1, so every
//! rewrite changes the payload's length: the TCP sequence adjustment and SIP's
//! `Content-Length` are exercised. The peers are threads of this test that entered a
//! namespace ([`spawn_in_netns`]), with std sockets: a minimal FTP server and client
//! (USER, PASS, TYPE, PASV, EPSV, PORT, EPRT, RETR of [`SIZE`] bytes checked on arrival,
//! QUIT) and a SIP phone and registrar over UDP. The scenarios, in order:
//!
//! 1. **FTP client behind masquerade**: one control connection to the WAN server's port 21
//!    with four transfers, PASV, EPSV, PORT and EPRT. The kernel rewrites the PORT and EPRT
//!    text to the router's address (two bytes shorter each) and adjusts the sequence numbers
//!    of everything after;
//! 2. **FTP server behind the port forward**: from the WAN side to the router's port 21,
//!    answered by the LAN server on [`HOST`]:21; PASV (the 227's inside address rewritten)
//!    and EPSV;
//! 3. **no helper**: the same active-mode transfer (PORT) to the WAN server's port
//!    [`FTP_PLAIN`], which `ct helper set` does not match: the server's data connection is
//!    dropped by the policy in the kernel (the server answers 425) and must be in keepstate,
//!    which shows scenario 1 passes only thanks to the helper;
//! 4. **SIP through masquerade**: a REGISTER with Contact and its 200 OK, after which the
//!    registrar sends an OPTIONS from another port to the registered contact (the
//!    REGISTER's signalling expectation); then an INVITE with SDP, a 200 OK with SDP, ACK,
//!    RTP both ways (started by the far end, to the rewritten SDP address) and RTCP both
//!    ways (started by the phone), and BYE with its 200 OK.
//!
//! Compared, after the router's ingress (tcpdump on `lan` and `wan`, merged) is replayed
//! through keepstate with the same ruleset:
//!
//! * `conntrack -L` with `nf_conntrack_acct=1`, line by line, normalised only in the
//!   remaining timeout and `use=` ([`normalise`]). No port the kernel picks at random
//!   appears: masquerade keeps the hosts' source ports (no clashes), `nf_nat_ftp`'s port
//!   search (`nf_nat_exp_find_port`) and `nf_nat_sip`'s RTP/RTCP pair and signalling port
//!   searches start at the announced port and move only when an *expectation* already
//!   holds it, which none does here, so every choice is deterministic;
//! * `/proc/net/nf_conntrack_expect` at the end (the REGISTER's permanent expectation),
//!   without the remaining timeout;
//! * the nft counters (the helper rules, established, RELATED, new, policy drop);
//! * every frame forwarded out of each port, byte for byte but for the checksum fields,
//!   whose values are recomputed from scratch and must verify ([`frame_key`]): the FTP and
//!   SIP payloads keepstate rewrites must be the kernel's, sequence numbers and
//!   `Content-Length` included. The hosts' veths have checksum offload off.

mod common {
    pub mod capture;
    pub mod netns;
}

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::netns::{
    can_run, config, frame_key, frames, multiset, multiset_diff, nft_counters, normalise, replay,
    replay_ingress, rules_in_tempdir, run, spawn_in_netns, Lab, ROUTER_LAN, ROUTER_WAN, SERVER,
};

/// The LAN host's address for everything the test sends or serves there.
const HOST: &str = "10.77.1.100";
/// The WAN server's FTP port that `ct helper set` does not match (scenario 3).
const FTP_PLAIN: u16 = 2121;
/// The file every RETR transfers.
const SIZE: usize = 300 * 1024;
/// The phone's and the far end's RTP ports (RTCP one above).
const PHONE_RTP: u16 = 40000;
const FAR_RTP: u16 = 50000;
/// The registrar's port for the request it sends to the registered contact.
const REGISTRAR_OUT: u16 = 5070;

/// The ruleset both the kernel and keepstate run. Every rule counts.
const RULES: &str = r#"flush ruleset
table inet fw {
	ct helper ftp-std {
		type "ftp" protocol tcp;
		l3proto inet;
	}
	ct helper sip-std {
		type "sip" protocol udp;
		l3proto inet;
	}
	chain pre {
		type filter hook prerouting priority filter; policy accept;
		tcp dport 21 counter ct helper set "ftp-std"
		udp dport 5060 counter ct helper set "sip-std"
	}
	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state established counter accept
		ct state related counter accept
		ct state invalid counter drop
		iifname "lan" oifname "wan" ct state new counter accept
		iifname "wan" oifname "lan" ct status dnat ct state new counter accept
		counter
	}
}
table ip nat {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		iifname "wan" tcp dport 21 counter dnat to 10.77.1.100:21
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "wan" counter masquerade
	}
}
"#;

/// The index, among the rules with a counter, of `ct state related` and of the policy's.
const RELATED_COUNTER: usize = 3;
const POLICY_COUNTER: usize = 7;

const WAIT: Option<Duration> = Some(Duration::from_secs(5));

// FTP.

/// The file: a pattern that no shift or truncation keeps equal.
fn file() -> Vec<u8> {
    (0..SIZE).map(|i| (i * 31 + i / 251) as u8).collect()
}

/// How a transfer's data connection is set up.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Pasv,
    Epsv,
    Port,
    Eprt,
}

/// A control connection's lines.
struct Control {
    out: TcpStream,
    inp: BufReader<TcpStream>,
}

impl Control {
    fn new(s: TcpStream) -> Control {
        s.set_read_timeout(WAIT).unwrap();
        Control {
            inp: BufReader::new(s.try_clone().unwrap()),
            out: s,
        }
    }

    fn send(&mut self, line: &str) {
        self.out
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap();
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.inp.read_line(&mut l).unwrap();
        l.trim_end().to_string()
    }

    /// Sends a command, reads the answer and requires its code.
    fn ask(&mut self, cmd: &str, code: &str) -> String {
        self.send(cmd);
        let a = self.line();
        assert!(a.starts_with(code), "{cmd}: {a}");
        a
    }
}

/// Accepts on `l` within 3 s, or None.
fn accept_within(l: &TcpListener) -> Option<TcpStream> {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return Some(s);
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => return None,
        }
    }
}

/// A minimal FTP server: one session on `l`, until QUIT.
fn ftp_server(l: TcpListener) {
    // Within a time limit, so that a failed client never leaves the test hanging.
    let s = accept_within(&l).expect("no control connection");
    let me = s.local_addr().unwrap().ip();
    let mut c = Control::new(s);
    c.send("220 keepstate test");
    let mut passive: Option<TcpListener> = None;
    let mut active: Option<SocketAddr> = None;
    loop {
        let line = c.line();
        let (cmd, arg) = line.split_once(' ').unwrap_or((&line, ""));
        match cmd {
            "USER" => c.send("331 Password required"),
            "PASS" => c.send("230 Logged in"),
            "TYPE" => c.send("200 Type set to I"),
            "PASV" | "EPSV" => {
                let l = TcpListener::bind((me, 0)).unwrap();
                let p = l.local_addr().unwrap().port();
                passive = Some(l);
                if cmd == "PASV" {
                    let IpAddr::V4(a) = me else { panic!() };
                    let [a, b, cc, d] = a.octets();
                    c.send(&format!(
                        "227 Entering Passive Mode ({a},{b},{cc},{d},{},{}).",
                        p >> 8,
                        p & 0xff
                    ));
                } else {
                    c.send(&format!("229 Entering Extended Passive Mode (|||{p}|)"));
                }
            }
            "PORT" => {
                let n: Vec<u16> = arg.split(',').map(|x| x.parse().unwrap()).collect();
                let ip = format!("{}.{}.{}.{}", n[0], n[1], n[2], n[3]);
                active = Some(SocketAddr::new(ip.parse().unwrap(), n[4] << 8 | n[5]));
                c.send("200 PORT command successful");
            }
            "EPRT" => {
                let f: Vec<&str> = arg.split('|').collect();
                active = Some(SocketAddr::new(
                    f[2].parse().unwrap(),
                    f[3].parse().unwrap(),
                ));
                c.send("200 EPRT command successful");
            }
            "RETR" => {
                c.send("150 Opening BINARY mode data connection");
                let data = match (passive.take(), active.take()) {
                    (Some(l), _) => accept_within(&l),
                    (None, Some(a)) => {
                        TcpStream::connect_timeout(&a, Duration::from_millis(1200)).ok()
                    }
                    _ => None,
                };
                match data {
                    Some(mut d) => {
                        // Paced, so that tcpdump keeps up: the replay needs every frame.
                        for chunk in file().chunks(32 * 1024) {
                            d.write_all(chunk).unwrap();
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        drop(d);
                        c.send("226 Transfer complete");
                    }
                    None => c.send("425 Can't open data connection"),
                }
            }
            "QUIT" => {
                c.send("221 Goodbye");
                // The client closes first; then this side.
                let _ = c.inp.read_to_end(&mut Vec::new());
                return;
            }
            _ => c.send("502 Command not implemented"),
        }
    }
}

/// A minimal FTP client: logs in to `to` and retrieves the file once per mode, checking it;
/// `refused`: the data connection must fail (425) instead.
fn ftp_client(to: (&str, u16), modes: &[Mode], refused: bool) {
    let s = TcpStream::connect(to).unwrap();
    let me = s.local_addr().unwrap().ip();
    let mut c = Control::new(s);
    assert!(c.line().starts_with("220"));
    c.ask("USER anonymous", "331");
    c.ask("PASS test@", "230");
    c.ask("TYPE I", "200");
    for &m in modes {
        let mut data: Option<TcpStream> = None;
        let mut listener: Option<TcpListener> = None;
        match m {
            Mode::Pasv => {
                let a = c.ask("PASV", "227");
                let inside = &a[a.find('(').unwrap() + 1..a.find(')').unwrap()];
                let n: Vec<u16> = inside.split(',').map(|x| x.parse().unwrap()).collect();
                let ip = format!("{}.{}.{}.{}", n[0], n[1], n[2], n[3]);
                data = Some(TcpStream::connect((ip.as_str(), n[4] << 8 | n[5])).unwrap());
            }
            Mode::Epsv => {
                let a = c.ask("EPSV", "229");
                let p: u16 = a.split('|').nth(3).unwrap().parse().unwrap();
                data = Some(TcpStream::connect((to.0, p)).unwrap());
            }
            Mode::Port | Mode::Eprt => {
                let l = TcpListener::bind((me, 0)).unwrap();
                let p = l.local_addr().unwrap().port();
                if let Mode::Port = m {
                    let IpAddr::V4(a) = me else { panic!() };
                    let [a, b, cc, d] = a.octets();
                    c.ask(
                        &format!("PORT {a},{b},{cc},{d},{},{}", p >> 8, p & 0xff),
                        "200",
                    );
                } else {
                    c.ask(&format!("EPRT |1|{me}|{p}|"), "200");
                }
                listener = Some(l);
            }
        }
        c.ask("RETR file", "150");
        if refused {
            let a = c.line();
            assert!(a.starts_with("425"), "{m:?} without the helper: {a}");
            continue;
        }
        let mut d = data
            .or_else(|| accept_within(listener.as_ref().unwrap()))
            .unwrap_or_else(|| panic!("{m:?}: no data connection"));
        d.set_read_timeout(WAIT).unwrap();
        let mut got = Vec::new();
        d.read_to_end(&mut got).unwrap();
        assert!(got == file(), "{m:?}: {} bytes, not the file", got.len());
        let a = c.line();
        assert!(a.starts_with("226"), "{m:?}: {a}");
    }
    c.ask("QUIT", "221");
}

// SIP.

/// A SIP message: the start line, the headers, and `Content-Length` of `body`.
fn sip(start: &str, headers: &[String], body: &str) -> Vec<u8> {
    let mut m = format!("{start}\r\n");
    for h in headers {
        m.push_str(h);
        m.push_str("\r\n");
    }
    if !body.is_empty() {
        m.push_str("Content-Type: application/sdp\r\n");
    }
    m.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    m.into_bytes()
}

/// An SDP body for audio at `addr`:`port`.
fn sdp(user: &str, addr: &str, port: u16) -> String {
    format!(
        "v=0\r\no={user} 1 1 IN IP4 {addr}\r\ns=call\r\nc=IN IP4 {addr}\r\nt=0 0\r\n\
         m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    )
}

/// The value of header `name` in a message.
fn header<'a>(m: &'a str, name: &str) -> &'a str {
    m.lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then_some(v.trim())
        })
        .unwrap_or_else(|| panic!("no {name} in {m}"))
}

/// Where an SDP body says to send the media: `c=` and `m=`.
fn media_of(m: &str) -> SocketAddr {
    let addr = m
        .lines()
        .find_map(|l| l.strip_prefix("c=IN IP4 "))
        .unwrap_or_else(|| panic!("no c= in {m}"));
    let port = m
        .lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|l| l.split(' ').next())
        .unwrap();
    SocketAddr::new(addr.trim().parse().unwrap(), port.parse().unwrap())
}

/// Receives a SIP message, which must start with `start`, and who sent it.
fn recv_starting(u: &UdpSocket, start: &str) -> (String, SocketAddr) {
    let mut buf = [0u8; 2048];
    let (n, from) = u.recv_from(&mut buf).unwrap();
    let m = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(m.starts_with(start), "not {start}: {m}");
    (m, from)
}

fn udp(addr: &str, port: u16) -> UdpSocket {
    let u = UdpSocket::bind((addr, port)).unwrap();
    u.set_read_timeout(WAIT).unwrap();
    u
}

/// The answer to `req`, which came from `from`: its Via (a bare `rport` filled in as RFC 3581
/// asks, with `received=`), From, To (tagged), Call-ID and CSeq, then `extra`.
fn answer(req: &str, from: SocketAddr, extra: &[String], body: &str) -> Vec<u8> {
    let via = header(req, "Via").replace(
        ";rport;",
        &format!(";received={};rport={};", from.ip(), from.port()),
    );
    let mut h = vec![
        format!("Via: {via}"),
        format!("From: {}", header(req, "From")),
    ];
    h.push(format!("To: {};tag=far", header(req, "To")));
    h.extend(
        ["Call-ID", "CSeq"]
            .iter()
            .map(|n| format!("{n}: {}", header(req, n))),
    );
    h.extend_from_slice(extra);
    sip("SIP/2.0 200 OK", &h, body)
}

/// The phone on the LAN: REGISTER, answers the registrar's OPTIONS, then calls.
fn phone() {
    let sig = udp(HOST, 5060);
    let rtp = udp(HOST, PHONE_RTP);
    let rtcp = udp(HOST, PHONE_RTP + 1);
    let far = (SERVER, 5060);
    let common = |method: &str, seq: u32, branch: &str, call: &str, to: &str| {
        // The phone asks for rport (RFC 3581); its INVITE names itself in maddr= too.
        let maddr = if method == "INVITE" {
            format!(";maddr={HOST}")
        } else {
            String::new()
        };
        vec![
            format!("Via: SIP/2.0/UDP {HOST}:5060{maddr};rport;branch=z9hG4bK-{branch}"),
            "Max-Forwards: 70".to_string(),
            format!("From: <sip:alice@{HOST}>;tag=ph1"),
            format!("To: <sip:{to}>"),
            format!("Call-ID: {call}@{HOST}"),
            format!("CSeq: {seq} {method}"),
            format!("Contact: <sip:alice@{HOST}:5060>"),
        ]
    };
    // REGISTER.
    let mut h = common("REGISTER", 1, "r1", "reg1", &format!("alice@{SERVER}"));
    h.push("Expires: 3600".into());
    sig.send_to(&sip(&format!("REGISTER sip:{SERVER} SIP/2.0"), &h, ""), far)
        .unwrap();
    recv_starting(&sig, "SIP/2.0 200");
    // The registrar's request to the registered contact, from another port.
    let (req, from) = recv_starting(&sig, "OPTIONS ");
    assert_eq!(
        from,
        SocketAddr::new(SERVER.parse().unwrap(), REGISTRAR_OUT)
    );
    sig.send_to(&answer(&req, from, &[], ""), from).unwrap();
    // The call.
    let invite = common("INVITE", 1, "i1", "call1", &format!("bob@{SERVER}"));
    let body = sdp("alice", HOST, PHONE_RTP);
    sig.send_to(
        &sip(&format!("INVITE sip:bob@{SERVER} SIP/2.0"), &invite, &body),
        far,
    )
    .unwrap();
    let (ok, _) = recv_starting(&sig, "SIP/2.0 200");
    let to_far = media_of(&ok);
    let ack = common("ACK", 1, "a1", "call1", &format!("bob@{SERVER}"));
    sig.send_to(
        &sip(&format!("ACK sip:bob@{SERVER}:5060 SIP/2.0"), &ack, ""),
        far,
    )
    .unwrap();
    // RTP: the far end starts, to what the INVITE's SDP said (rewritten by NAT).
    let mut buf = [0u8; 256];
    for i in 0..3u8 {
        let (n, _) = rtp.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[0x80, 0, 0, i, 1, 2, 3, 4][..]);
        rtp.send_to(&[0x80, 0, 1, i, 5, 6, 7, 8], to_far).unwrap();
    }
    // RTCP: the phone starts.
    let far_rtcp = SocketAddr::new(to_far.ip(), to_far.port() + 1);
    for i in 0..2u8 {
        rtcp.send_to(&[0x81, 200, 0, i], far_rtcp).unwrap();
        let (n, _) = rtcp.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[0x81, 201, 0, i][..]);
    }
    let bye = common("BYE", 2, "b1", "call1", &format!("bob@{SERVER}"));
    sig.send_to(
        &sip(&format!("BYE sip:bob@{SERVER}:5060 SIP/2.0"), &bye, ""),
        far,
    )
    .unwrap();
    recv_starting(&sig, "SIP/2.0 200");
}

/// The registrar and far end on the WAN; says `ready` once its sockets are bound.
fn far_end(ready: std::sync::mpsc::Sender<()>) {
    let sig = udp(SERVER, 5060);
    let out = udp(SERVER, REGISTRAR_OUT);
    let rtp = udp(SERVER, FAR_RTP);
    let rtcp = udp(SERVER, FAR_RTP + 1);
    ready.send(()).unwrap();
    // REGISTER: remember the contact as it arrived.
    let (reg, from) = recv_starting(&sig, "REGISTER ");
    let contact = header(&reg, "Contact").to_string();
    sig.send_to(
        &answer(
            &reg,
            from,
            &[format!("Contact: {contact};expires=3600")],
            "",
        ),
        from,
    )
    .unwrap();
    let uri = contact.trim_start_matches('<').trim_end_matches('>');
    let host_port = uri.split_once('@').unwrap().1;
    let h = vec![
        format!("Via: SIP/2.0/UDP {SERVER}:{REGISTRAR_OUT};branch=z9hG4bK-o1"),
        "Max-Forwards: 70".to_string(),
        format!("From: <sip:registrar@{SERVER}>;tag=rg1"),
        format!("To: <{uri}>"),
        format!("Call-ID: opt1@{SERVER}"),
        "CSeq: 1 OPTIONS".to_string(),
    ];
    out.send_to(&sip(&format!("OPTIONS {uri} SIP/2.0"), &h, ""), host_port)
        .unwrap();
    recv_starting(&out, "SIP/2.0 200");
    // INVITE.
    let (invite, from) = recv_starting(&sig, "INVITE ");
    let to_phone = media_of(&invite);
    let contact = format!("Contact: <sip:bob@{SERVER}:5060>");
    sig.send_to(
        &answer(&invite, from, &[contact], &sdp("bob", SERVER, FAR_RTP)),
        from,
    )
    .unwrap();
    recv_starting(&sig, "ACK ");
    let mut buf = [0u8; 256];
    for i in 0..3u8 {
        rtp.send_to(&[0x80, 0, 0, i, 1, 2, 3, 4], to_phone).unwrap();
        let (n, _) = rtp.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[0x80, 0, 1, i, 5, 6, 7, 8][..]);
    }
    for i in 0..2u8 {
        let (n, from) = rtcp.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[0x81, 200, 0, i][..]);
        rtcp.send_to(&[0x81, 201, 0, i], from).unwrap();
    }
    let (bye, from) = recv_starting(&sig, "BYE ");
    sig.send_to(&answer(&bye, from, &[], ""), from).unwrap();
}

// The test.

/// Runs `server` in namespace `sns` (its sockets bound first) and `client` in `cns`, and
/// waits for both.
fn scenario<S, C>(what: &str, sns: &str, server: S, cns: &str, client: C)
where
    S: FnOnce(std::sync::mpsc::Sender<()>) + Send + 'static,
    C: FnOnce() + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let s = spawn_in_netns(sns, move || server(tx));
    rx.recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| panic!("{what}: the server never got ready"));
    let c = spawn_in_netns(cns, client);
    let (c, s) = (c.join(), s.join());
    assert!(c.is_ok() && s.is_ok(), "{what} failed in the kernel's lab");
    eprintln!("netns_helpers: {what}: done");
    std::thread::sleep(Duration::from_millis(50));
}

fn ftp_listener(addr: &'static str, port: u16) -> impl FnOnce(std::sync::mpsc::Sender<()>) {
    move |ready| {
        let l = TcpListener::bind((addr, port)).unwrap();
        ready.send(()).unwrap();
        ftp_server(l);
    }
}

/// A listing compared: its name, its normalisation, the kernel's lines and keepstate's.
type Table<'a> = (&'a str, fn(&str) -> String, Vec<&'a str>, Vec<&'a str>);

/// Strips the remaining timeout (the first word) of a `/proc/net/nf_conntrack_expect` line.
fn expect_line(l: &str) -> String {
    l.split_once(' ')
        .map_or(l, |(_, rest)| rest)
        .trim()
        .to_string()
}

#[test]
fn kernel_and_keepstate_helpers_agree() {
    if !can_run("netns_helpers") {
        return;
    }
    let started = Instant::now();
    let (dir, rules_file) = rules_in_tempdir(RULES);
    let mut lab = Lab::new("kshelp", Duration::from_secs(120));
    let (c, r, s) = (lab.c.clone(), lab.r.clone(), lab.s.clone());
    // The LAN host speaks from HOST (its TCP connections by the route's source).
    lab.sh(&c, &format!("ip addr add {HOST}/24 dev eth0"));
    lab.sh(
        &c,
        &format!("ip route replace default via {ROUTER_LAN} src {HOST}"),
    );
    // The router's veths too: where the kernel rewrites a payload it recomputes the
    // checksum (nf_nat_csum_recalc), and on a device that offloads it leaves only the
    // pseudo-header sum for the device to finish, which a capture would show as wrong.
    lab.sh(&r, "ethtool -K lan tx off");
    lab.sh(&r, "ethtool -K wan tx off");
    lab.sh(&r, &format!("nft -f {}", rules_file.display()));
    lab.sh(&r, "sysctl -qw net.netfilter.nf_conntrack_acct=1");
    lab.start_captures(dir.path());
    eprintln!("netns_helpers: lab up, captures running");

    // 1. FTP client behind masquerade, passive and active.
    scenario(
        "1. ftp through masquerade (PASV, EPSV, PORT, EPRT)",
        &s,
        ftp_listener(SERVER, 21),
        &c,
        || {
            ftp_client(
                (SERVER, 21),
                &[Mode::Pasv, Mode::Epsv, Mode::Port, Mode::Eprt],
                false,
            )
        },
    );
    // 2. FTP server behind the port forward.
    scenario(
        "2. ftp server behind the port forward (PASV, EPSV)",
        &c,
        ftp_listener(HOST, 21),
        &s,
        || ftp_client((ROUTER_WAN, 21), &[Mode::Pasv, Mode::Epsv], false),
    );
    // 3. Active FTP on a port without the helper: refused.
    scenario(
        "3. active ftp without the helper (refused)",
        &s,
        ftp_listener(SERVER, FTP_PLAIN),
        &c,
        || ftp_client((SERVER, FTP_PLAIN), &[Mode::Port], true),
    );
    // 4. SIP through masquerade.
    scenario(
        "4. sip: register, call-back, call with rtp",
        &s,
        far_end,
        &c,
        phone,
    );
    std::thread::sleep(Duration::from_millis(100));

    let kernel_ct = run(&["ip", "netns", "exec", &r, "conntrack", "-L"]).unwrap();
    let kernel_nft = lab.sh(&r, "nft list ruleset");
    let kernel_exp = lab.sh(&r, "cat /proc/net/nf_conntrack_expect");
    lab.stop_captures();

    let ours = replay_ingress(
        dir.path(),
        replay(&rules_file, &config(&rules_file, ""), true, false),
        |_, _| {},
    );
    let context = format!(
        "--- keepstate trace\n{}\n--- kernel conntrack -L\n{kernel_ct}--- keepstate\n{}\n\
         --- kernel expectations\n{kernel_exp}--- keepstate\n{}\n--- nft\n{kernel_nft}",
        ours.trace.join("\n"),
        ours.listing.join("\n"),
        ours.expect.join("\n"),
    );
    std::fs::write(dir.path().join("context.txt"), &context).unwrap();
    let mut failures = Vec::new();

    // 1. The connection tables, then the expectations left.
    let tables: [Table; 2] = [
        (
            "conntrack -L",
            normalise,
            kernel_ct.lines().collect(),
            ours.listing.iter().map(String::as_str).collect(),
        ),
        (
            "nf_conntrack_expect",
            expect_line,
            kernel_exp.lines().collect(),
            ours.expect.iter().map(String::as_str).collect(),
        ),
    ];
    for (what, norm, theirs, mine) in tables {
        let theirs = multiset(theirs.into_iter().map(norm));
        let mine = multiset(mine.into_iter().map(norm));
        for l in theirs.keys() {
            eprintln!("netns_helpers: kernel {what}: {l}");
        }
        if theirs != mine {
            failures.push(format!(
                "{what} differs (- the kernel only, + keepstate only):\n{}",
                multiset_diff(&theirs, &mine)
            ));
        }
    }

    // 2. The counters.
    let kernel_counters = nft_counters(&kernel_nft);
    eprintln!("netns_helpers: kernel counters {kernel_counters:?}");
    assert!(
        kernel_counters[RELATED_COUNTER].0 > 0 && kernel_counters[POLICY_COUNTER].0 > 0,
        "the kernel's related and policy-drop counters must count\n{kernel_nft}"
    );
    // An expected connection of a translated master is bound from its expectation when it is
    // created (nf_nat_follow_master, nf_nat_sip_expected), so no nat chain counts it: the
    // masquerade counter must agree too.
    let expected = kernel_counters.clone();
    if expected != ours.counters {
        failures.push(format!(
            "rule counters differ (helper ftp, helper sip, established, related, invalid, \
             new lan->wan, new dnat, policy, dnat, masquerade):\n  kernel    {expected:?}\n  \
             keepstate {:?}",
            ours.counters
        ));
    }

    // Scenario 3: the server's data connection without the helper, dropped by keepstate
    // (by the policy, as the kernel's policy counter says it did there).
    let refused: Vec<&String> = ours
        .trace
        .iter()
        .filter(|l| {
            l.contains(&format!(" wan tcp {SERVER}:"))
                && l.contains(&format!(" > {HOST}:"))
                && l.contains(" [S] ")
        })
        .collect();
    for l in &refused {
        eprintln!("netns_helpers: scenario 3 in keepstate: {l}");
    }
    assert!(
        !refused.is_empty()
            && refused.len() as u64 == kernel_counters[POLICY_COUNTER].0
            && refused.iter().all(|l| l.contains("-> drop")),
        "scenario 3: the data connection must be dropped, every SYN\n{context}"
    );

    // The rewrites happened (so the frame comparison below covers them): the kernel's
    // frames out of wan carry the router's address in PORT, EPRT and the SIP messages,
    // the port forward's 227 the router's too, and what comes back to the phone its own
    // address.
    let text = |name: &str| -> String {
        frames(&Lab::capture_file(dir.path(), name, "out"))
            .iter()
            .map(|f| String::from_utf8_lossy(&f.data).into_owned())
            .collect()
    };
    let (wan_text, lan_text) = (text("wan"), text("lan"));
    for (what, hay, needle) in [
        ("PORT rewritten", &wan_text, "PORT 10,77,2,1,"),
        ("EPRT rewritten", &wan_text, "EPRT |1|10.77.2.1|"),
        (
            "227 of the port forward rewritten",
            &wan_text,
            "(10,77,2,1,",
        ),
        (
            "INVITE's SDP rewritten",
            &wan_text,
            "c=IN IP4 10.77.2.1\r\n",
        ),
        (
            "INVITE's Contact rewritten",
            &wan_text,
            "Contact: <sip:alice@10.77.2.1:5060>",
        ),
        (
            "the phone's own Via back",
            &lan_text,
            "Via: SIP/2.0/UDP 10.77.1.100:5060",
        ),
        (
            "the INVITE's maddr= rewritten",
            &wan_text,
            "Via: SIP/2.0/UDP 10.77.2.1:5060;maddr=10.77.2.1;rport;",
        ),
        (
            "received= back as the phone's own",
            &lan_text,
            ";received=10.77.1.100;rport=5060;",
        ),
    ] {
        assert!(
            hay.contains(needle),
            "{what}: no {needle:?} in the kernel's frames"
        );
    }
    // nf_nat_sip leaves Call-ID alone (the phone put its address there): nothing else
    // leaves by wan with the inside address.
    let leaks: Vec<&str> = wan_text
        .split("\r\n")
        .filter(|l| l.contains(HOST) && !l.starts_with("Call-ID: "))
        .collect();
    assert!(
        leaks.is_empty(),
        "the inside address left by wan: {leaks:?}"
    );

    // 3. Every forwarded frame, per egress.
    let replay_engine = replay(&rules_file, &config(&rules_file, ""), true, false);
    for name in ["lan", "wan"] {
        let port = replay_engine.engine().port_index(name).unwrap();
        let cap = Lab::capture_file(dir.path(), name, "out");
        let theirs = multiset(
            frames(&cap)
                .iter()
                .filter_map(|f| frame_key(&f.data, |_| {})),
        );
        let mine = multiset(
            ours.out
                .get(&port)
                .into_iter()
                .flatten()
                .filter_map(|f| frame_key(f, |_| {})),
        );
        let bad: Vec<&String> = theirs
            .keys()
            .filter(|k| !k.contains("checksums-ok"))
            .collect();
        assert!(
            bad.is_empty(),
            "the kernel's frames out of {name} must verify (checksum offload off?): {bad:#?}"
        );
        if theirs != mine {
            failures.push(format!(
                "frames forwarded out of {name} differ (- the kernel only, + keepstate only):\n{}",
                multiset_diff(&theirs, &mine)
            ));
        } else {
            eprintln!(
                "netns_helpers: {} frames out of {name} agree",
                theirs.values().sum::<usize>()
            );
        }
    }
    let took = started.elapsed();
    eprintln!("netns_helpers: took {took:?}");
    assert!(failures.is_empty(), "{}\n{context}", failures.join("\n"));
}
