//! The live appliance in network namespaces (needs root): `keepstate run` on AF_XDP sockets
//! in a firewall namespace between a LAN host and a WAN host (the topology of `keepstate lab
//! up`, under a prefix of its own), with examples/lab.toml and examples/home-router.nft, and
//! real tools on the hosts: ping, curl against python3's http.server, a UDP exchange; and the
//! control socket's clients against the running appliance (`keepstate ct list`, `ct events`,
//! `ct flush`, `reload`, `stats`, a user who is not root refused).
//!
//! Skipped with a message when not root or a tool is missing. The namespaces are deleted on
//! Drop (also when an assertion fails) and by a watchdog if the test hangs.
//!
//! Run it alone with: `cargo test --test netns_dataplane -- --nocapture` (as root).

#[path = "common/live.rs"]
mod live;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keepstate::dataplane::lab::{FW_LAN, FW_LAN6, FW_WAN, INTERNET, INTERNET6, LAN_HOST, WAN_HOST};
use live::*;

/// How long the lab may live before the watchdog deletes it.
const LIMIT: Duration = Duration::from_secs(150);
/// What the tests run in the namespaces.
const TOOLS: &[&str] = &["ping", "curl", "python3", "ethtool"];

/// The size of the download: large enough for thousands of frames in each direction.
const BODY: usize = 6 * 1024 * 1024;

const UDP_SERVER: &str = "
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b'echo:' + data + b' from ' + peer[0].encode(), peer)
";

const UDP_REFUSED: &str = "
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b'x')
try:
    s.recv(100)
    print('answered')
except ConnectionRefusedError:
    print('refused')
except socket.timeout:
    print('timeout')
";

const UDP_CLIENT: &str = "
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
for i in range(5):
    s.sendto(b'hello %d' % i, (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recv(2048).decode())
        sys.exit(0)
    except socket.timeout:
        pass
sys.exit(1)
";

/// The client run as user nobody (uid 65534), with no groups.
fn ctl_as_nobody(sock: &Path) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_keepstate"))
        .args(["ct", "list", "--control"])
        .arg(sock)
        .output()
        .expect("setpriv")
}

const BRIDGE_RULES: &str = "table inet filter {
\tchain forward {
\t\ttype filter hook forward priority filter; policy drop;
\t\tct state vmap { established : accept, related : accept, invalid : drop }
\t\tiifname \"lan\" oifname \"wan\" accept
\t\tlog prefix \"forward drop: \" drop
\t}
}
";

#[test]
fn live_bridge_passes_arp_and_filters() {
    if !can_run("netns_dataplane", TOOLS) {
        return;
    }
    let mut g = lab("b", 1, LIMIT);
    let lab = &g.lab.clone();
    // One subnet across the bridge: the WAN host becomes 192.168.1.20.
    ok(&lab.wan, &["ip", "-4", "addr", "flush", "dev", "eth0"]);
    ok(
        &lab.wan,
        &["ip", "addr", "add", "192.168.1.20/24", "dev", "eth0"],
    );
    let dir = tempfile::tempdir().unwrap();
    // A bridge's ruleset: stateful filtering, no NAT (a bridge has no address to
    // masquerade to, so home-router.nft's `masquerade` would drop everything).
    let rules = dir.path().join("bridge.nft");
    std::fs::write(&rules, BRIDGE_RULES).unwrap();
    // The control socket for the group nogroup (gid 65534), in a directory others may
    // traverse.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("control.sock");
    let cfg = format!(
        "rules = {:?}\n\n[[port]]\nname = \"lan\"\ninterface = \"ks-lan\"\n\n\
         [[port]]\nname = \"wan\"\ninterface = \"ks-wan\"\n\n\
         [dataplane]\nmode = \"bridge\"\nworkers = 1\ncontrol = {:?}\ncontrol_group = \"nogroup\"\n",
        rules.display().to_string(),
        sock.display().to_string()
    );
    let cfg_path = dir.path().join("bridge.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let (pid, lines) = start(&mut g, &cfg_path);

    eprintln!("control: root:nogroup 0660; the group is served, other users are not");
    let meta = std::fs::metadata(&sock).expect("control socket");
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!((meta.uid(), meta.gid()), (0, 65534));
    let as_user = |ids: &[&str]| {
        Command::new("setpriv")
            .args(ids)
            .arg(env!("CARGO_BIN_EXE_keepstate"))
            .args(["ct", "count", "--control"])
            .arg(&sock)
            .output()
            .expect("setpriv")
    };
    // nobody's group, as its primary group and as a supplementary one.
    for ids in [
        &["--reuid=65534", "--regid=65534", "--clear-groups"][..],
        &["--reuid=65533", "--regid=65533", "--groups=65534"][..],
    ] {
        let o = as_user(ids);
        assert!(o.status.success(), "{ids:?}: {o:?}");
        assert!(String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse::<u64>()
            .is_ok());
    }
    let o = as_user(&["--reuid=65533", "--regid=65533", "--clear-groups"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("permission denied"),
        "{o:?}"
    );

    eprintln!("bridge: ARP and ping across, lan -> wan");
    ok(&lab.lan, &["ping", "-c", "3", "-W", "2", "192.168.1.20"]);
    eprintln!("bridge: a download across");
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let want = body(BODY);
    std::fs::write(www.join("blob"), &want).unwrap();
    http_server(&mut g, &lab.wan, "192.168.1.20", 8000, &www);
    let got = dir.path().join("got");
    download(&lab.lan, "http://192.168.1.20:8000/blob", &got, &want);
    eprintln!("bridge: wan -> lan is dropped");
    http_server(&mut g, &lab.lan, LAN_HOST, 8001, &www);
    let url = format!("http://{LAN_HOST}:8001/blob");
    let o = output(&lab.wan, &["curl", "-s", "--max-time", "3", &url]);
    assert!(
        !o.status.success(),
        "an inbound connection crossed the bridge"
    );
    lines.wait_for("forward drop: IN=wan OUT=lan", 0, Duration::from_secs(10));
    signal(pid, "-TERM");
    let status = g.children.remove(0).wait().expect("wait");
    assert!(status.success(), "keepstate run ended with {status}");
}

#[test]
fn live_router_forwards_answers_drops_and_reloads() {
    if !can_run("netns_dataplane", TOOLS) {
        return;
    }
    let mut g = lab("r", 2, LIMIT);
    let lab = &g.lab.clone();

    // The lab's configuration and rules, copied so the rules file can be broken later.
    let dir = tempfile::tempdir().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let rules = dir.path().join("home-router.nft");
    let good = std::fs::read_to_string(root.join("examples/home-router.nft")).unwrap();
    std::fs::write(&rules, &good).unwrap();
    let sock = dir.path().join("control.sock");
    let cfg_path = router_config(dir.path(), &rules, &sock, "");

    let (pid, lines) = start(&mut g, &cfg_path);

    eprintln!("control: the socket is root's alone (no control_group), and nobody is refused");
    let meta = std::fs::metadata(&sock).expect("control socket");
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 0);
    let o = ctl_as_nobody(&sock);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("permission denied"), "{err}");
    // With the file opened to everyone, SO_PEERCRED still keeps nobody out.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = ctl_as_nobody(&sock);
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("permission denied: uid 65534"), "{err}");
    assert!(o.stdout.is_empty());

    eprintln!("control: malformed requests get an answer that says what is wrong");
    for (req, want) in [
        (&b"halt\n"[..], "fail unknown request `halt`"),
        (
            &b"ct list proto=tcpp\n"[..],
            "fail bad argument `proto=tcpp`",
        ),
        (&b"\xff\xfe\n"[..], "fail request is not UTF-8 text"),
        (&[b'x'; 5000][..], "fail request longer than 4096 bytes"),
    ] {
        use std::io::{Read, Write};
        let mut c = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        c.write_all(req).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with(want), "{answer}");
    }

    eprintln!("control: `ct events` streams conntrack -E lines");
    let mut events = Command::new(env!("CARGO_BIN_EXE_keepstate"))
        .args(["ct", "events", "--control"])
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ct events");
    let event_lines = Arc::new(Lines::default());
    {
        let out = events.stdout.take().expect("stdout");
        let me = event_lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                me.lines.lock().unwrap().push(line);
                me.more.notify_all();
            }
        });
    }
    g.children.push(events);
    std::thread::sleep(Duration::from_millis(300));

    eprintln!("ping: the firewall answers on its own address");
    ok(&lab.lan, &["ping", "-c", "2", "-W", "2", FW_LAN]);

    ok(&lab.lan, &["ping", "-c", "2", "-W", "2", FW_LAN6]);

    eprintln!("ping: lan -> internet, forwarded through the default routes (ARP, ND)");
    let out = ok(&lab.lan, &["ping", "-c", "3", "-W", "2", INTERNET]);
    // The engine took one off the TTL on the way back (the WAN host answers with 64).
    assert!(out.contains("ttl=63"), "{out}");
    ok(&lab.lan, &["ping", "-c", "3", "-W", "2", INTERNET6]);
    let new_icmp = format!("    [NEW] icmp     1 30 src={LAN_HOST} dst={INTERNET} type=8 code=0");
    event_lines.wait_for(&new_icmp, 0, Duration::from_secs(10));
    event_lines.wait_for(
        &format!("src={INTERNET} dst={FW_WAN} type=0 code=0"),
        0,
        Duration::from_secs(10),
    );

    eprintln!("tcp: a {BODY}-byte download, lan <- internet");
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let want = body(BODY);
    std::fs::write(www.join("blob"), &want).unwrap();
    http_server(&mut g, &lab.wan, INTERNET, 8000, &www);
    let url = format!("http://{INTERNET}:8000/blob");
    download(&lab.lan, &url, &dir.path().join("got"), &want);
    let www6 = dir.path().join("www6");
    std::fs::create_dir(&www6).unwrap();
    std::fs::write(www6.join("blob"), &want).unwrap();
    http_server(&mut g, &lab.wan, INTERNET6, 8006, &www6);
    let url6 = format!("http://[{INTERNET6}]:8006/blob");
    download(&lab.lan, &url6, &dir.path().join("got6"), &want);

    eprintln!("udp: a datagram out and its answer back");
    let server = in_ns(&lab.wan, &["python3", "-c", UDP_SERVER, INTERNET, "5353"])
        .stdout(Stdio::null())
        .spawn()
        .expect("udp server");
    g.children.push(server);
    std::thread::sleep(Duration::from_millis(300));
    let got = ok(&lab.lan, &["python3", "-c", UDP_CLIENT, INTERNET, "5353"]);
    assert!(got.starts_with("echo:hello"), "udp answer: {got}");
    // Masqueraded: the server saw the firewall's WAN address.
    assert!(
        got.trim().ends_with(&format!("from {FW_WAN}")),
        "udp answer: {got}"
    );

    eprintln!("fragments: 3000-byte pings through, judged whole, leaving as fragments");
    ok(
        &lab.lan,
        &["ping", "-c", "2", "-W", "2", "-s", "3000", INTERNET],
    );

    eprintln!("inbound: wan -> lan is dropped by the forward policy");
    let inside = dir.path().join("inside");
    std::fs::create_dir(&inside).unwrap();
    std::fs::write(inside.join("secret"), b"not for the internet").unwrap();
    http_server(&mut g, &lab.lan, LAN_HOST, 8001, &inside);
    let o = output(
        &lab.wan,
        &[
            "curl",
            "-s",
            "--max-time",
            "3",
            &format!("http://{LAN_HOST}:8001/secret"),
        ],
    );
    assert!(!o.status.success(), "an inbound connection got through");
    let o = output(&lab.wan, &["ping", "-c", "2", "-W", "1", LAN_HOST]);
    assert!(!o.status.success(), "an inbound ping got through");
    lines.wait_for("forward drop: IN=wan OUT=lan", 0, Duration::from_secs(10));

    eprintln!("port forward: wan tcp/8080 on the firewall reaches the LAN server's port 80");
    http_server(&mut g, &lab.lan, LAN_HOST, 80, &inside);
    let o = ok(
        &lab.wan,
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("http://{FW_WAN}:8080/secret"),
        ],
    );
    assert_eq!(o, "not for the internet");

    eprintln!("control: `ct list` shows the port forward with its translated reply tuple");
    let listed = ctl_ok(&sock, &["ct", "list", "-p", "tcp", "-d", FW_WAN]);
    assert!(
        listed.lines().any(|l| l.starts_with("tcp      6 ")
            && l.contains(&format!("dst={FW_WAN} sport="))
            && l.contains(&format!(
                "dport=8080 src={LAN_HOST} dst={WAN_HOST} sport=80 dport="
            ))),
        "{listed}"
    );

    eprintln!("control: `stats` shows ports, the tracker and live rule counters (reset by a reload, as nft's)");
    let stats = ctl_ok(&sock, &["stats"]);
    assert!(stats.contains("port lan (ks-lan): XDP program "), "{stats}");
    assert!(stats.contains("; rx "), "{stats}");
    assert!(stats.contains("conntrack: "), "{stats}");
    let drops = stats
        .lines()
        .find(|l| l.contains("log prefix \"forward drop: \""))
        .expect("the forward chain's counter");
    assert!(!drops.contains("counter packets 0 "), "{drops}");

    eprintln!(
        "reload: a broken rules file is refused (`keepstate reload`) and traffic keeps flowing"
    );
    std::fs::write(
        &rules,
        "table inet filter {\n\tchain forward {\n\t\ttype filter hook forward priority 0;\n\t\ttcp dport @nope accept\n\t}\n}\n",
    )
    .unwrap();
    let o = ctl(&sock, &["reload"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("@nope"), "{err}");
    assert!(
        err.contains("reload failed, keeping the old ruleset"),
        "{err}"
    );
    let from = lines.len();
    signal(pid, "-HUP");
    let at = lines.wait_for(
        "reload failed, keeping the old ruleset",
        from,
        Duration::from_secs(10),
    );
    lines.wait_for("@nope", at, Duration::from_secs(10));
    ok(&lab.lan, &["ping", "-c", "2", "-W", "2", INTERNET]);
    download(&lab.lan, &url, &dir.path().join("got2"), &want);
    let o = output(
        &lab.wan,
        &[
            "curl",
            "-s",
            "--max-time",
            "2",
            &format!("http://{LAN_HOST}:8001/secret"),
        ],
    );
    assert!(
        !o.status.success(),
        "the old ruleset stopped dropping inbound connections"
    );

    eprintln!("reload: the good file again, in the middle of a download");
    std::fs::write(&rules, &good).unwrap();
    let got3 = dir.path().join("got3");
    // Paced by its server over 4 s, so the reload lands in the middle of it.
    paced_http_server(&mut g, &lab.wan, INTERNET, 8009, &www.join("blob"), 4.0);
    let mut slow = in_ns(&lab.lan, &["curl", "-sSf", "--max-time", "30", "-o"])
        .arg(&got3)
        .arg(format!("http://{INTERNET}:8009/blob"))
        .spawn()
        .expect("curl");
    std::thread::sleep(Duration::from_millis(400));
    eprintln!("control: the download in progress is listed, masqueraded");
    // The server may have written the whole file into its socket and closed already while
    // curl still reads at its limited rate: then the connection is in CLOSE_WAIT, still in
    // progress. Asked again for up to 3 s, in case curl started late on a loaded machine.
    let in_progress = |listed: &str| {
        listed.lines().any(|l| {
            (l.contains(" ESTABLISHED src=") || l.contains(" CLOSE_WAIT src="))
                && l.contains(&format!(
                    "dport=8009 src={INTERNET} dst={FW_WAN} sport=8009 "
                ))
                && l.contains("[ASSURED]")
        })
    };
    let end = std::time::Instant::now() + Duration::from_secs(3);
    let mut listed = ctl_ok(&sock, &["ct", "list", "-s", LAN_HOST, "-p", "tcp"]);
    while !in_progress(&listed) && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
        listed = ctl_ok(&sock, &["ct", "list", "-s", LAN_HOST, "-p", "tcp"]);
    }
    assert!(in_progress(&listed), "{listed}");
    let o = ctl(&sock, &["reload"]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("reloaded"));
    let status = slow.wait().expect("curl");
    assert!(
        status.success(),
        "the download across the reload failed: {status}"
    );
    assert!(
        std::fs::read(&got3).unwrap() == want,
        "the download across the reload is damaged"
    );
    ok(&lab.lan, &["ping", "-c", "1", "-W", "2", INTERNET]);

    eprintln!("control: `ct flush` empties the table");
    assert!(
        ctl_ok(&sock, &["ct", "count"])
            .trim()
            .parse::<u64>()
            .unwrap()
            > 0
    );
    let o = ctl(&sock, &["ct", "flush"]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("table has been emptied"));
    let left = ctl(&sock, &["ct", "list", "-s", LAN_HOST]);
    assert!(left.stdout.is_empty(), "{left:?}");
    assert!(String::from_utf8_lossy(&left.stderr).contains(" 0 flow entries"));
    event_lines.wait_for("[DESTROY] tcp", 0, Duration::from_secs(10));
    // New connections are tracked again at once.
    ok(&lab.lan, &["ping", "-c", "1", "-W", "2", INTERNET]);
    let listed = ctl_ok(&sock, &["ct", "list", "-p", "icmp"]);
    assert!(
        listed.contains(&format!("src={LAN_HOST} dst={INTERNET} type=8")),
        "{listed}"
    );

    eprintln!("reject: a TCP reset and an ICMP port unreachable go back out of the ingress port");
    let anchor = "\t\t# LAN hosts may open connections to the internet.\n";
    assert!(good.contains(anchor));
    let rejecting = good.replace(
        anchor,
        &format!("\t\ttcp dport 9 reject with tcp reset\n\t\tudp dport 9 reject\n{anchor}"),
    );
    std::fs::write(&rules, rejecting).unwrap();
    let from = lines.len();
    signal(pid, "-HUP");
    lines.wait_for("keepstate: reloaded", from, Duration::from_secs(10));
    let t = Instant::now();
    let o = output(
        &lab.lan,
        &[
            "curl",
            "-s",
            "--max-time",
            "5",
            &format!("http://{INTERNET}:9/"),
        ],
    );
    // curl's exit status 7: the connection was refused (a reset), not timed out (28).
    assert_eq!(o.status.code(), Some(7), "curl to a rejected port: {o:?}");
    assert!(t.elapsed() < Duration::from_secs(2));
    let got = ok(&lab.lan, &["python3", "-c", UDP_REFUSED, INTERNET, "9"]);
    assert_eq!(got.trim(), "refused");
    // Other traffic is unaffected.
    ok(&lab.lan, &["ping", "-c", "1", "-W", "2", INTERNET]);

    eprintln!("stop: SIGTERM, then the counters");
    let from = lines.len();
    signal(pid, "-TERM");
    let status = g.children.remove(0).wait().expect("wait");
    assert!(status.success(), "keepstate run ended with {status}");
    assert!(!sock.exists(), "the control socket was left behind");
    let i = lines.wait_for("port lan (", from, Duration::from_secs(10));
    let all = lines.lines.lock().unwrap();
    let tx: u64 = all[i]
        .split("tx ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // Two downloads' worth of frames went out towards the LAN host.
    assert!(tx as usize > 2 * BODY / 1500, "lan tx counter: {}", all[i]);
}
