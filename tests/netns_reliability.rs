//! The live appliance under stress (needs root), in the lab of `keepstate lab up` under a
//! prefix of its own (`tests/common/live.rs`):
//!
//! - a worker that dies (panics) or gets stuck is reported in the log and by `keepstate stats`,
//!   and the appliance exits with status 1 (`worker_failure = "exit"`) or keeps going
//!   (`"report"`), as configured; the faults come from the test knob `KEEPSTATE_TEST_FAULT`;
//! - a port whose XDP program is detached (`ip link set dev IF xdp off`, or `xdpgeneric off`,
//!   as it was attached) or replaced by another tool's is reported the same ways, by the same
//!   policy, and the other tool's program is left in place when the appliance stops;
//! - a hundred reloads through the control socket, valid and invalid rules files alternating,
//!   while two downloads (IPv4 and IPv6) and a ping run the whole time: not one connection
//!   broken, every invalid file refused with its file:line:col, the last valid file in force.
//!
//! Skipped with a message when not root or a tool is missing.
//!
//! Run it alone with: `cargo test --test netns_reliability -- --nocapture` (as root).

#[path = "common/live.rs"]
mod live;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keepstate::dataplane::lab::{INTERNET, INTERNET6};

use live::{
    body, can_run, ctl, ctl_ok, in_ns, lab, ok, paced_http_server, router_config, signal, start,
    start_with, Guard, Lines,
};

/// How long a lab may live before the watchdog deletes it.
const LIMIT: Duration = Duration::from_secs(120);
/// What the tests run in the namespaces.
const TOOLS: &[&str] = &["ping", "curl", "python3", "ethtool"];
/// The size of the downloads.
const BODY: usize = 6 * 1024 * 1024;

/// A lab under `letter` with the home router's configuration, `dataplane` added to its
/// `[dataplane]`, in a temporary directory.
struct Setup {
    g: Guard,
    dir: tempfile::TempDir,
    /// The rules file (a copy of examples/home-router.nft, to be changed) and its text.
    rules: PathBuf,
    good: String,
    sock: PathBuf,
    cfg: PathBuf,
}

fn setup(letter: char, dataplane: &str) -> Setup {
    let g = lab(&letter.to_string(), 2, LIMIT);
    let dir = tempfile::tempdir().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let good = std::fs::read_to_string(root.join("examples/home-router.nft")).unwrap();
    let rules = dir.path().join("home-router.nft");
    std::fs::write(&rules, &good).unwrap();
    let sock = dir.path().join("control.sock");
    let cfg = router_config(dir.path(), &rules, &sock, dataplane);
    Setup {
        g,
        dir,
        rules,
        good,
        sock,
        cfg,
    }
}

/// The `worker N: ...` lines of `keepstate stats`.
fn worker_lines(sock: &Path) -> Vec<String> {
    ctl_ok(sock, &["stats"])
        .lines()
        .filter(|l| l.starts_with("worker "))
        .map(str::to_string)
        .collect()
}

/// Requires the `port NAME (...)` line of `keepstate stats` to start with `head`.
fn port_line_starts(sock: &Path, name: &str, head: &str) {
    let stats = ctl_ok(sock, &["stats"]);
    let line = stats
        .lines()
        .find(|l| l.starts_with(&format!("port {name} (")))
        .unwrap_or_else(|| panic!("no port {name}:\n{stats}"));
    assert!(line.starts_with(head), "wanted {head}...:\n{line}");
}

/// Runs `ip ARGS` and requires success.
fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("ip");
    assert!(
        o.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The XDP program `interface` runs in `ns`, as `ip link` shows it (`prog/xdp id 42 ...` or
/// `prog/xdpgeneric id 42 ...`): the keyword of its mode, which `ip link set ... MODE off`
/// takes, and its id.
fn xdp_program(ns: &str, interface: &str) -> Option<(String, u32)> {
    let o = Command::new("ip")
        .args(["-n", ns, "link", "show", "dev", interface])
        .output()
        .expect("ip");
    let text = String::from_utf8_lossy(&o.stdout);
    let mut words = text.split("prog/").nth(1)?.split_whitespace();
    let mode = words.next()?.to_string();
    if words.next()? != "id" {
        return None;
    }
    Some((mode, words.next()?.parse().ok()?))
}

/// Waits for `keepstate run` (the guard's first child) to end by itself, and takes it from
/// the guard; its exit code.
fn exit_code(g: &mut Guard, limit: Duration) -> Option<i32> {
    let end = Instant::now() + limit;
    loop {
        if g.children[0].try_wait().expect("wait").is_some() {
            return g.children.remove(0).wait().expect("wait").code();
        }
        assert!(
            Instant::now() < end,
            "keepstate did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The tests run one after the other: each runs a box with two workers, downloads and
/// pings, and three at once on two cores starve the traffic whose timing they check.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn a_dead_or_stuck_worker_is_reported_and_kept_running_with_report() {
    let _serial = one_at_a_time();
    if !can_run("netns_reliability", TOOLS) {
        return;
    }
    let mut s = setup('h', "worker_failure = \"report\"\nstall_timeout = 1");
    // Worker 1 stops beating 2 s after it starts, worker 0 panics 4 s after.
    let (pid, lines) = start_with(
        &mut s.g,
        &s.cfg,
        &[("KEEPSTATE_TEST_FAULT", "1:stall@2000,0:panic@4000")],
    );
    let w = worker_lines(&s.sock);
    eprintln!("before: {w:?}");
    assert!(w[0].starts_with("worker 0: running; rx "), "{w:?}");
    assert!(w[1].starts_with("worker 1: running; rx "), "{w:?}");

    eprintln!("worker 1 stalls: reported stuck in the log and in stats");
    let at = lines.wait_for(
        "keepstate: worker 1 is stuck: no heartbeat for ",
        0,
        Duration::from_secs(10),
    );
    assert!(
        lines.lines.lock().unwrap()[at].ends_with("; its queues lan/1 wan/1 are not served"),
        "{:?}",
        lines.lines.lock().unwrap()[at]
    );
    std::thread::sleep(Duration::from_millis(500));
    let w = worker_lines(&s.sock);
    eprintln!("stuck: {w:?}");
    let stuck: f64 = w[1]
        .strip_prefix("worker 1: stuck ")
        .and_then(|s| s.split('s').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{w:?}"));
    assert!(stuck >= 1.0, "{w:?}");

    eprintln!("worker 0 panics: reported dead, with the panic's message");
    lines.wait_for(
        "keepstate: worker 0 died: worker 0 panics as KEEPSTATE_TEST_FAULT asks; its queues lan/0 wan/0 are not served",
        0,
        Duration::from_secs(10),
    );
    let w = worker_lines(&s.sock);
    eprintln!("dead: {w:?}");
    assert!(
        w[0].starts_with("worker 0: died: worker 0 panics as KEEPSTATE_TEST_FAULT asks; rx "),
        "{w:?}"
    );
    assert!(w[1].starts_with("worker 1: stuck "), "{w:?}");
    // Said once, not on every tick.
    std::thread::sleep(Duration::from_millis(500));
    let said = |what: &str| {
        let l = lines.lines.lock().unwrap();
        l.iter().filter(|l| l.contains(what)).count()
    };
    assert_eq!(said("worker 1 is stuck"), 1);
    assert_eq!(said("worker 0 died"), 1);

    eprintln!("stop: the stuck worker is left behind, and the exit status says a worker failed");
    signal(pid, "-TERM");
    assert_eq!(exit_code(&mut s.g, Duration::from_secs(10)), Some(1));
    lines.wait_for(
        "1 worker(s) did not stop within",
        0,
        Duration::from_secs(10),
    );
    assert!(!s.sock.exists(), "the control socket was left behind");
}

#[test]
fn a_dead_or_stuck_worker_ends_the_appliance_with_exit() {
    let _serial = one_at_a_time();
    if !can_run("netns_reliability", TOOLS) {
        return;
    }
    // The default policy, worker_failure = "exit". A 2 s stall timeout: a healthy worker of a
    // slow machine's appliance can miss its heartbeat for a second, and the appliance then
    // exits for the wrong worker.
    let mut s = setup('e', "stall_timeout = 2");
    for (fault, said) in [
        (
            "1:panic@500",
            "keepstate: worker 1 died: worker 1 panics as KEEPSTATE_TEST_FAULT asks",
        ),
        (
            "0:stall@500",
            "keepstate: worker 0 is stuck: no heartbeat for ",
        ),
    ] {
        eprintln!("{fault}: the appliance exits with status 1");
        let (_, lines) = start_with(&mut s.g, &s.cfg, &[("KEEPSTATE_TEST_FAULT", fault)]);
        assert_eq!(exit_code(&mut s.g, Duration::from_secs(15)), Some(1));
        let at = lines.wait_for(said, 0, Duration::from_secs(10));
        lines.wait_for(
            "keepstate: exiting with status 1 (worker_failure = \"exit\")",
            at,
            Duration::from_secs(10),
        );
        assert!(!s.sock.exists(), "the control socket was left behind");
    }
    eprintln!("and it starts again on the same interfaces, and forwards");
    start(&mut s.g, &s.cfg);
    ok(&s.g.lab.lan, &["ping", "-c", "2", "-W", "2", INTERNET]);
}

/// A lab with the appliance running, `dataplane` added to its configuration, whose LAN
/// port's XDP program an operator detaches, as `ip link` shows it attached (`xdp off` for a
/// native program, `xdpgeneric off` for a generic one); once the log says so: the appliance's
/// pid and lines, the program's id and the index of that line.
fn detach_lan(letter: char, dataplane: &str) -> (Setup, u32, Arc<Lines>, u32, usize) {
    let mut s = setup(letter, dataplane);
    let (pid, lines) = start(&mut s.g, &s.cfg);
    let (fw, lan) = (s.g.lab.fw.clone(), s.g.lab.links[0].clone());
    let (mode, id) = xdp_program(&fw, &lan).expect("no XDP program on the LAN port");
    port_line_starts(
        &s.sock,
        "lan",
        &format!("port lan ({lan}): XDP program {id}; rx "),
    );
    eprintln!("{lan} runs XDP program {id}; an operator: ip -n {fw} link set dev {lan} {mode} off");
    ip(&["-n", &fw, "link", "set", "dev", &lan, &mode, "off"]);
    assert_eq!(xdp_program(&fw, &lan), None, "still attached");
    let at = lines.wait_for(
        &format!(
            "keepstate: port lan (interface {lan}): keepstate's XDP program was detached (was \
             id {id}, now none): its frames bypass the workers"
        ),
        0,
        Duration::from_secs(10),
    );
    (s, pid, lines, id, at)
}

#[test]
fn a_port_whose_xdp_program_goes_is_reported_and_kept_running_with_report() {
    let _serial = one_at_a_time();
    if !can_run("netns_reliability", TOOLS) {
        return;
    }
    let (mut s, pid, lines, id, _) = detach_lan('x', "worker_failure = \"report\"");
    let (fw, [lan, wan]) = (s.g.lab.fw.clone(), s.g.lab.links.clone());
    port_line_starts(
        &s.sock,
        "lan",
        &format!("port lan ({lan}): bypassed: XDP program {id} detached; rx "),
    );

    eprintln!("another tool attaches its own program to the WAN port, in the same mode");
    let (mode, was) = xdp_program(&fw, &wan).expect("no XDP program on the WAN port");
    let other = s.dir.path().join("other.bpf.o");
    std::fs::write(&other, keepstate::dataplane::fastpath::OBJECT).unwrap();
    let attach = if mode == "xdpgeneric" {
        "xdpgeneric"
    } else {
        "xdpdrv"
    };
    ip(&[
        "-force",
        "-n",
        &fw,
        "link",
        "set",
        "dev",
        &wan,
        attach,
        "object",
        other.to_str().unwrap(),
        "program",
        "keepstate_pass",
    ]);
    let (_, now) = xdp_program(&fw, &wan).expect("the other tool's program is not attached");
    assert_ne!(now, was);
    lines.wait_for(
        &format!(
            "keepstate: port wan (interface {wan}): keepstate's XDP program was replaced (was \
             id {was}, now id {now}): its frames bypass the workers"
        ),
        0,
        Duration::from_secs(10),
    );
    port_line_starts(
        &s.sock,
        "wan",
        &format!("port wan ({wan}): bypassed: XDP program {was} replaced by {now}; rx "),
    );

    eprintln!("each said once; the appliance keeps running");
    std::thread::sleep(Duration::from_millis(2500));
    let said = |what: &str| {
        let l = lines.lines.lock().unwrap();
        l.iter().filter(|l| l.contains(what)).count()
    };
    assert_eq!(said("keepstate's XDP program was detached"), 1);
    assert_eq!(said("keepstate's XDP program was replaced"), 1);
    assert!(
        s.g.children[0].try_wait().unwrap().is_none(),
        "keepstate exited"
    );
    let w = worker_lines(&s.sock);
    assert!(w.iter().all(|l| l.contains(": running; rx ")), "{w:?}");

    eprintln!("stop: the exit status says a port failed; the other tool's program stays");
    signal(pid, "-TERM");
    assert_eq!(exit_code(&mut s.g, Duration::from_secs(10)), Some(1));
    assert_eq!(xdp_program(&fw, &wan).map(|(_, id)| id), Some(now));
    assert!(!s.sock.exists(), "the control socket was left behind");
}

#[test]
fn a_port_whose_xdp_program_goes_ends_the_appliance_with_exit() {
    let _serial = one_at_a_time();
    if !can_run("netns_reliability", TOOLS) {
        return;
    }
    // The default policy, worker_failure = "exit".
    let (mut s, _, lines, id, at) = detach_lan('y', "");
    let (fw, [lan, wan]) = (s.g.lab.fw.clone(), s.g.lab.links.clone());
    eprintln!("the appliance exits with status 1");
    assert_eq!(exit_code(&mut s.g, Duration::from_secs(10)), Some(1));
    let at = lines.wait_for(
        "keepstate: exiting with status 1 (worker_failure = \"exit\")",
        at,
        Duration::from_secs(10),
    );
    // The last counters say why.
    lines.wait_for(
        &format!("port lan ({lan}): bypassed: XDP program {id} detached; rx "),
        at,
        Duration::from_secs(10),
    );
    assert!(!s.sock.exists(), "the control socket was left behind");
    assert_eq!(xdp_program(&fw, &wan), None, "left attached to {wan}");

    eprintln!("and it starts again on the same interfaces, and forwards");
    start(&mut s.g, &s.cfg);
    ok(&s.g.lab.lan, &["ping", "-c", "2", "-W", "2", INTERNET]);
}

/// A download from `url` in `ns` into `to`, running in the background.
fn background_download(ns: &str, url: &str, to: &Path) -> Child {
    in_ns(ns, &["curl", "-sSf", "--max-time", "90"])
        .arg("-o")
        .arg(to)
        .arg(url)
        .stdout(Stdio::null())
        .spawn()
        .expect("curl")
}

/// The bad lines the invalid files carry, in turn, and the column of each one's error.
const BAD: [(&str, usize); 4] = [
    ("\t\ttcp dport @nope{i} accept", 13),
    ("\t\tip saddr 10.0.0.{300+i} accept", 12),
    ("\t\tct state establishd accept", 12),
    ("\t\tudp dport 20000 counter dorp", 27),
];

#[test]
fn a_hundred_reloads_under_traffic_break_nothing() {
    let _serial = one_at_a_time();
    if !can_run("netns_reliability", TOOLS) {
        return;
    }
    let Setup {
        mut g,
        dir,
        rules,
        good,
        sock,
        cfg,
    } = setup('l', "");
    let lab = g.lab.clone();
    let (_, lines) = start(&mut g, &cfg);

    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let want = body(BODY);
    std::fs::write(www.join("blob"), &want).unwrap();
    // Two downloads of 6 MiB paced by their servers over 40 s each, longer than the reloads
    // take (9 to 14 s on a slow virtual machine).
    let blob = www.join("blob");
    paced_http_server(&mut g, &lab.wan, INTERNET, 8000, &blob, 40.0);
    paced_http_server(&mut g, &lab.wan, INTERNET6, 8006, &blob, 40.0);
    let (got4, got6) = (dir.path().join("got4"), dir.path().join("got6"));
    let mut d4 = background_download(&lab.lan, &format!("http://{INTERNET}:8000/blob"), &got4);
    let mut d6 = background_download(&lab.lan, &format!("http://[{INTERNET6}]:8006/blob"), &got6);
    // And a ping every 100 ms, 15 s on a fast machine.
    let mut ping = in_ns(&lab.lan, &["ping", "-c", "150", "-i", "0.1", INTERNET])
        .stdout(Stdio::piped())
        .spawn()
        .expect("ping");
    std::thread::sleep(Duration::from_millis(500));

    // Rules are inserted before this line of the forward chain.
    let anchor = "\t\t# LAN hosts may open connections to the internet.\n";
    let anchor_line = good[..good.find(anchor).unwrap()].lines().count() + 1;
    let t = Instant::now();
    let mut last_valid = None;
    for i in 0..100usize {
        if i % 2 == 0 {
            // Valid: a rule of its own, so the listing says which file is in force.
            let text = good.replace(
                anchor,
                &format!("\t\tudp dport {} counter drop\n{anchor}", 20000 + i),
            );
            std::fs::write(&rules, text).unwrap();
            let o = ctl(&sock, &["reload"]);
            assert!(o.status.success(), "reload {i}: {o:?}");
            assert!(String::from_utf8_lossy(&o.stdout).contains("reloaded"));
            last_valid = Some(i);
        } else {
            // Invalid: one of the bad lines, after a few comment lines, so each file's
            // error is on a line of its own.
            let (bad, col) = BAD[(i / 2) % BAD.len()];
            let bad = bad
                .replace("{i}", &i.to_string())
                .replace("{300+i}", &(300 + i).to_string());
            let pad = i % 7;
            let text = good.replace(
                anchor,
                &format!("{}{bad}\n{anchor}", "\t\t# padding\n".repeat(pad)),
            );
            std::fs::write(&rules, text).unwrap();
            let o = ctl(&sock, &["reload"]);
            assert_eq!(o.status.code(), Some(1), "reload {i}: {o:?}");
            let err = String::from_utf8_lossy(&o.stderr);
            let at = format!("{}:{}:{col}: ", rules.display(), anchor_line + pad);
            assert!(err.contains(&at), "reload {i}: wanted {at} in {err}");
            assert!(
                err.contains("reload failed, keeping the old ruleset"),
                "{err}"
            );
        }
    }
    let took = t.elapsed();
    eprintln!("100 reloads in {took:?}");
    let ended: Vec<String> = [
        ("IPv4 download", &mut d4),
        ("IPv6 download", &mut d6),
        ("ping", &mut ping),
    ]
    .into_iter()
    .filter_map(|(what, c)| c.try_wait().unwrap().map(|st| format!("{what}: {st}")))
    .collect();
    assert!(
        ended.is_empty(),
        "the traffic ended before the reloads did ({took:?}): {ended:?}"
    );

    eprintln!("the last valid file is in force");
    let stats = ctl_ok(&sock, &["stats"]);
    let last = 20000 + last_valid.unwrap();
    assert!(
        stats.contains(&format!("udp dport {last} counter packets 0 bytes 0 drop")),
        "{stats}"
    );
    assert_eq!(stats.matches("udp dport 200").count(), 1, "{stats}");
    assert!(
        !stats.contains("dorp") && !stats.contains("@nope"),
        "{stats}"
    );

    eprintln!("both downloads arrive intact");
    for (d, got) in [(&mut d4, &got4), (&mut d6, &got6)] {
        let s = d.wait().expect("curl");
        assert!(s.success(), "a download across the reloads failed: {s}");
        assert!(
            std::fs::read(got).unwrap() == want,
            "a download across the reloads is damaged"
        );
    }
    eprintln!("the ping lost nothing");
    let out = ping.wait_with_output().expect("ping");
    let summary = String::from_utf8_lossy(&out.stdout);
    let summary = summary
        .lines()
        .find(|l| l.contains("packet loss"))
        .unwrap_or("");
    eprintln!("  {summary}");
    assert!(
        summary.starts_with("150 packets transmitted, 150 received, 0% packet loss"),
        "{summary}"
    );
    // Fifty refusals in the appliance's log too, fifty swaps.
    let count = |what: &str| {
        let l = lines.lines.lock().unwrap();
        l.iter().filter(|l| l.contains(what)).count()
    };
    assert_eq!(count("reload failed, keeping the old ruleset"), 50);
    assert_eq!(count("keepstate: reloaded "), 50);
}
