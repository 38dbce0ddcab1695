//! `keepstate lab demo`: the product shown end to end in a throwaway lab. Brings the lab up,
//! runs the appliance (`keepstate run`, this very binary, in the firewall's namespace) with
//! examples/home-router.nft, drives real traffic with real tools (ping, curl, python3's
//! http.server), prints per scenario what is expected and what was observed, shows the box's
//! own view through the control socket (`ct list`, `stats`), then a second short run with
//! examples/office-ftp-sip.nft for FTP (curl and pyftpdlib: the office's clients through the
//! SNAT pool, and the office's own server behind the port forward, with its helper and,
//! reloaded without it, failing) and a SIP call with RTP both ways (sipp as the phone and as
//! the provider) through the helpers and NAT, the call again without the sip helper to show
//! its media fail. Tears everything down on every way out:
//! success, failure, a panic, Ctrl-C.
//!
//! ```text
//!  lan host 192.168.1.10 ── [lan] keepstate [wan] ── wan host 198.51.100.254
//!   (the home server: :80)   192.168.1.1  198.51.100.1    (the internet: 203.0.113.7)
//! ```
//!
//! Owns only its lab (namespaces of its prefix), its processes and its temporary directory.
//! Verdicts come from what the tools saw, never from the engine's own word.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::control::client::{Client, End};
use super::control::proto::{Answer, ListFilter, Request};
use super::lab::{Lab, FW_LAN, FW_WAN, INTERNET, LAN_HOST, WAN_HOST};

/// The size of the large download.
const BIG: usize = 64 * 1024 * 1024;
/// The LAN host's address in the office run (examples/office-ftp-sip.nft's LAN_NET).
const OFFICE_HOST: &str = "10.10.1.10";
const OFFICE_FW: &str = "10.10.0.1";
/// The office's own FTP server, which the port forward publishes on the box's WAN address
/// (examples/office-ftp-sip.nft's FTP_SERVER): a second address of the LAN host.
const FTP_SERVER: &str = "10.10.5.21";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the demo needs root (network namespaces, AF_XDP)")]
    NotRoot,
    #[error("the demo needs `{0}`; scripts/setup.sh installs it")]
    Missing(&'static str),
    #[error("{0} not found: run the demo from the repository's root, or give --examples DIR")]
    NoExamples(PathBuf),
    #[error("cannot {what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error(transparent)]
    Lab(#[from] super::lab::LabError),
    #[error("the appliance did not start: {0}")]
    NoStart(String),
    #[error("interrupted")]
    Interrupted,
}

/// How the demo ended.
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |err| DemoError::Io { what, err }
}

/// `keepstate run` in the firewall's namespace, its stderr collected line by line.
struct Appliance {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    control: PathBuf,
}

impl Appliance {
    fn lines_with(&self, what: &str) -> Vec<String> {
        let l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        l.iter().filter(|x| x.contains(what)).cloned().collect()
    }

    fn wait_for(&self, what: &str, limit: Duration) -> Option<String> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(l) = self.lines_with(what).pop() {
                return Some(l);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGTERM, then wait for it to print its counters and end.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// Everything the demo made: removed on drop, whatever happened.
struct Stage {
    lab: Lab,
    /// The lab is this demo's (it built it): only then is it removed.
    built: bool,
    dir: PathBuf,
    children: Vec<Child>,
    box_: Option<Appliance>,
}

impl Drop for Stage {
    fn drop(&mut self) {
        if let Some(a) = self.box_.take() {
            a.stop();
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.built {
            self.lab.down();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

fn run_in(ns: &str, args: &[&str]) -> Output {
    in_ns(ns, args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| Output {
            status: ExitStatus::default(),
            stdout: Vec::new(),
            stderr: e.to_string().into_bytes(),
        })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Deterministic bytes that do not compress (xorshift).
fn blob(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Prints the scenarios and keeps the score.
struct Show {
    n: usize,
    passed: usize,
    failed: usize,
    skipped: usize,
    stop: Arc<AtomicBool>,
}

impl Show {
    fn check(&self) -> Result<(), DemoError> {
        if self.stop.load(Ordering::Relaxed) {
            Err(DemoError::Interrupted)
        } else {
            Ok(())
        }
    }

    fn scenario(
        &mut self,
        title: &str,
        expected: &str,
        run: impl FnOnce() -> (bool, String),
    ) -> Result<(), DemoError> {
        self.check()?;
        self.n += 1;
        println!("\n[{}] {title}", self.n);
        println!("    expected: {expected}");
        let _ = std::io::stdout().flush();
        let t = Instant::now();
        let (ok, observed) = run();
        self.check()?;
        let mut lines = observed.lines();
        println!("    observed: {}", lines.next().unwrap_or(""));
        for l in lines {
            println!("              {l}");
        }
        println!(
            "    {}  ({:.1} s)",
            if ok { "PASS" } else { "FAIL" },
            t.elapsed().as_secs_f64()
        );
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
        Ok(())
    }

    fn skip(&mut self, title: &str, why: &str) {
        self.n += 1;
        self.skipped += 1;
        println!("\n[{}] {title}\n    SKIPPED: {why}", self.n);
    }
}

/// Asks the appliance `req` over its control socket; returns the stdout lines, unprinted.
fn query(a: &Appliance, req: &Request) -> Vec<String> {
    super::control::client::out_lines(&a.control, req)
}

/// Asks the appliance `req` over its control socket and prints the answer as the command
/// line a person would type would print it; returns the stdout lines.
fn ask(a: &Appliance, req: &Request, shown: &str) -> Vec<String> {
    println!("\n$ keepstate {shown} --control {}", a.control.display());
    let mut out = Vec::new();
    let r = Client::connect(&a.control).and_then(|c| {
        c.call(req, |ans| {
            match ans {
                Answer::Out(l) => {
                    println!("{l}");
                    out.push(l.clone());
                }
                Answer::Err(l) => println!("{l}"),
                _ => {}
            }
            Ok(())
        })
    });
    match r {
        Ok(End::Ok) => {}
        Ok(End::Failed(m)) => println!("(refused: {m})"),
        Err(e) => println!("(no answer: {e})"),
    }
    out
}

/// `keepstate ct list -p tcp` (6) or `-p udp` (17), printed; the lines.
fn ct_list(a: &Appliance, proto: u8) -> Vec<String> {
    let name = if proto == 6 { "tcp" } else { "udp" };
    let filter = ListFilter {
        proto: Some(proto),
        ..ListFilter::default()
    };
    let req = Request::CtList {
        filter,
        json: false,
    };
    ask(a, &req, &format!("ct list -p {name}"))
}

/// python3's http.server (`python3 -m http.server --bind ADDR PORT --directory DIR`), less
/// its start-up `getfqdn()`: a reverse lookup of the address, which in the lab goes to a
/// resolver nobody answers and holds the server up for ten seconds or more.
const HTTP_SERVER: &str = "
import functools, http.server, socketserver, sys
class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[3])
Server((sys.argv[1], int(sys.argv[2])), handler).serve_forever()
";

/// `keepstate ct events` run as a person would, its lines collected.
struct Events {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Events {
    fn start(control: &Path) -> Option<Events> {
        let exe = std::env::current_exe().ok()?;
        let mut child = Command::new(exe)
            .args(["ct", "events", "--control"])
            .arg(control)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let out = child.stdout.take()?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        // Subscribed once the appliance has accepted it.
        std::thread::sleep(Duration::from_millis(300));
        Some(Events { child, lines })
    }

    /// Stops the client (as Ctrl-C would) and returns what it printed.
    fn finish(mut self) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(50));
        let l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        l.clone()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts python3's http.server in `ns`, its log in `log`; waits until it answers.
fn http_server(
    st: &mut Stage,
    ns: &str,
    addr: &str,
    port: u16,
    dir: &Path,
    log: &Path,
) -> Result<bool, DemoError> {
    let log = std::fs::File::create(log).map_err(io("create the server's log"))?;
    let port_s = port.to_string();
    let child = in_ns(ns, &["python3", "-u", "-c", HTTP_SERVER, addr, &port_s])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(io("start python3 -m http.server"))?;
    st.children.push(child);
    let url = format!("http://{addr}:{port}/");
    for _ in 0..50 {
        let o = run_in(
            ns,
            &["curl", "-s", "-o", "/dev/null", "--max-time", "1", &url],
        );
        if o.status.success() {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(false)
}

/// Starts `keepstate run --config cfg` in the firewall's namespace and waits until it runs.
fn start_box(st: &Stage, cfg: &Path, control: &Path) -> Result<Appliance, DemoError> {
    let exe = std::env::current_exe().map_err(io("find the keepstate binary"))?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &st.lab.fw])
        .arg(&exe)
        .arg("run")
        .arg("--config")
        .arg(cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("start keepstate run"))?;
    let lines = Arc::new(Mutex::new(Vec::new()));
    if let Some(err) = child.stderr.take() {
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
    }
    let a = Appliance {
        child,
        lines,
        control: control.to_path_buf(),
    };
    let end = Instant::now() + Duration::from_secs(20);
    let mut a = a;
    while Instant::now() < end {
        if a.wait_for("keepstate: running", Duration::from_millis(100))
            .is_some()
        {
            return Ok(a);
        }
        if let Ok(Some(status)) = a.child.try_wait() {
            std::thread::sleep(Duration::from_millis(100));
            let said: Vec<String> = a
                .lines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|l| !l.starts_with("libxdp:") && !l.starts_with("libbpf:"))
                .cloned()
                .collect();
            return Err(DemoError::NoStart(format!(
                "{status}: {}",
                said.join(" / ")
            )));
        }
    }
    a.stop();
    Err(DemoError::NoStart(
        "it did not say it runs within 20 s".into(),
    ))
}

/// The configuration of examples/lab.toml with an absolute rules path and the control
/// socket in the demo's directory.
fn lab_config(examples: &Path, rules: &str, control: &Path) -> Result<String, DemoError> {
    super::lab::config(examples, Path::new(rules), control)
        .map_err(io(format!("read {}", examples.join("lab.toml").display())))
}

/// Runs the whole demo; the lab is named by `prefix`.
pub fn run(prefix: &str, examples: &Path) -> Result<Summary, DemoError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(DemoError::NotRoot);
    }
    for t in ["ip", "ping", "curl", "python3", "ethtool"] {
        if !have(t) {
            return Err(DemoError::Missing(t));
        }
    }
    let examples = std::fs::canonicalize(examples)
        .map_err(|_| DemoError::NoExamples(examples.join("home-router.nft")))?;
    for f in ["home-router.nft", "office-ftp-sip.nft", "lab.toml"] {
        if !examples.join(f).exists() {
            return Err(DemoError::NoExamples(examples.join(f)));
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    for s in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(s, stop.clone()).map_err(io("handle Ctrl-C"))?;
    }
    let lab = Lab::named(prefix)?;
    let dir = std::env::temp_dir().join(format!("keepstate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    let mut st = Stage {
        lab: lab.clone(),
        built: false,
        dir: dir.clone(),
        children: Vec::new(),
        box_: None,
    };
    let mut show = Show {
        n: 0,
        passed: 0,
        failed: 0,
        skipped: 0,
        stop,
    };
    println!("== keepstate lab demo: a home router on AF_XDP, in network namespaces");
    println!(
        "   {} (LAN host {LAN_HOST}, the home server) -- {} (keepstate: lan {FW_LAN}, wan {FW_WAN}) -- {} (WAN host {WAN_HOST}; \"the internet\" {INTERNET})",
        lab.lan, lab.fw, lab.wan
    );
    // A lab of the same name that is already there is someone else's: `up` refuses it, and
    // it is left alone.
    lab.up(2)?;
    st.built = true;
    home_router(&mut st, &mut show, &examples)?;
    show.check()?;
    office(&mut st, &mut show, &examples)?;
    println!(
        "\n== tearing the lab down ({}, {}, {})",
        lab.lan, lab.fw, lab.wan
    );
    drop(st);
    println!(
        "== demo: {} passed, {} failed, {} skipped",
        show.passed, show.failed, show.skipped
    );
    Ok(Summary {
        passed: show.passed,
        failed: show.failed,
        skipped: show.skipped,
    })
}

fn home_router(st: &mut Stage, show: &mut Show, examples: &Path) -> Result<(), DemoError> {
    let lab = st.lab.clone();
    let dir = st.dir.clone();
    let control = dir.join("control.sock");
    let cfg = dir.join("lab.toml");
    std::fs::write(&cfg, lab_config(examples, "home-router.nft", &control)?)
        .map_err(io("write the lab's configuration"))?;
    println!(
        "\n== run 1: keepstate run --config examples/lab.toml (rules examples/home-router.nft)"
    );
    let a = start_box(st, &cfg, &control)?;
    for l in a.lines_with("keepstate: ") {
        println!("   {l}");
    }
    st.box_ = Some(a);

    // The internet's web server, and the home server on the LAN.
    let www = dir.join("www");
    let home = dir.join("home");
    for d in [&www, &home] {
        std::fs::create_dir_all(d).map_err(io("create the servers' directories"))?;
    }
    let big = blob(BIG);
    std::fs::write(www.join("big.bin"), &big).map_err(io("write the download"))?;
    std::fs::write(www.join("index.html"), "hello from the internet\n")
        .map_err(io("write index.html"))?;
    let home_page = format!("hello from the home server {LAN_HOST}\n");
    std::fs::write(home.join("index.html"), &home_page).map_err(io("write index.html"))?;
    let wan_log = dir.join("wan-http.log");
    let lan_log = dir.join("lan-http.log");
    let web_up = http_server(st, &lab.wan, INTERNET, 8000, &www, &wan_log)?;
    let home_up = http_server(st, &lab.lan, LAN_HOST, 80, &home, &lan_log)?;
    let a = st.box_.as_ref().ok_or(DemoError::Interrupted)?;

    show.scenario(
        &format!("ping the box itself: {LAN_HOST} -> {FW_LAN}"),
        "answered by keepstate's own small stack (home-router.nft's input chain accepts echo-request)",
        || {
            let o = run_in(&lab.lan, &["ping", "-c", "3", "-i", "0.2", "-W", "2", FW_LAN]);
            let out = text(&o.stdout);
            let sum = out.lines().find(|l| l.contains("packets transmitted")).unwrap_or("no answer");
            (o.status.success(), sum.to_string())
        },
    )?;

    show.scenario(
        &format!("ping through the box: {LAN_HOST} -> {INTERNET}"),
        "forwarded and masqueraded; the reply comes back with TTL 63 (the box took one off)",
        || {
            let o = run_in(
                &lab.lan,
                &["ping", "-c", "3", "-i", "0.2", "-W", "2", INTERNET],
            );
            let out = text(&o.stdout);
            let sum = out
                .lines()
                .find(|l| l.contains("packets transmitted"))
                .unwrap_or("no answer");
            let ttl = out.contains("ttl=63");
            (
                o.status.success() && ttl,
                format!("{sum}; {}", if ttl { "ttl=63" } else { "TTL not 63" }),
            )
        },
    )?;

    show.scenario(
        &format!("HTTP: curl on the LAN host -> python3's http.server on {INTERNET}:8000"),
        &format!("200 OK, and the server sees the box's WAN address {FW_WAN} (masquerade), never {LAN_HOST}"),
        || {
            if !web_up {
                return (false, "the web server did not start".into());
            }
            let url = format!("http://{INTERNET}:8000/index.html");
            let o = run_in(&lab.lan, &["curl", "-sS", "--max-time", "5", "-w", " [%{http_code}]", &url]);
            let body = text(&o.stdout).replace('\n', "");
            std::thread::sleep(Duration::from_millis(200));
            let log = std::fs::read_to_string(&wan_log).unwrap_or_default();
            let seen = log.lines().rev().find(|l| l.contains("GET /index.html")).unwrap_or("").to_string();
            let ok = o.status.success()
                && body.ends_with("[200]")
                && seen.starts_with(&format!("{FW_WAN} "))
                && !log.contains(LAN_HOST);
            (ok, format!("curl got \"{body}\"\nserver log: {seen}"))
        },
    )?;

    show.scenario(
        &format!(
            "a {} MiB download through the box, checked byte for byte",
            BIG >> 20
        ),
        "every byte arrives intact",
        || {
            let got = dir.join("got.bin");
            let url = format!("http://{INTERNET}:8000/big.bin");
            let t = Instant::now();
            let o = in_ns(&lab.lan, &["curl", "-sS", "--max-time", "60", "-o"])
                .arg(&got)
                .arg(&url)
                .stdin(Stdio::null())
                .output();
            let secs = t.elapsed().as_secs_f64();
            let data = std::fs::read(&got).unwrap_or_default();
            let _ = std::fs::remove_file(&got);
            let intact = data == big;
            let ok = o.is_ok_and(|o| o.status.success()) && intact;
            (
                ok,
                format!(
                    "{} bytes in {secs:.2} s ({:.0} MB/s), {}",
                    data.len(),
                    data.len() as f64 / secs / 1e6,
                    if intact {
                        "identical to the original"
                    } else {
                        "DIFFERENT from the original"
                    }
                ),
            )
        },
    )?;

    show.scenario(
        &format!("a blocked inbound attempt: WAN host -> the home server {LAN_HOST}:80 directly"),
        "no answer (the forward chain drops what nobody on the LAN asked for), and the box logs it",
        || {
            if !home_up {
                return (false, "the home server did not start".into());
            }
            let url = format!("http://{LAN_HOST}/");
            let o = run_in(&lab.wan, &["curl", "-s", "--max-time", "2", &url]);
            let logged = a.wait_for("forward drop: IN=wan OUT=lan", Duration::from_secs(3));
            let blocked = !o.status.success();
            let what = match o.status.code() {
                Some(28) => "curl timed out after 2 s (exit 28)".to_string(),
                Some(c) => format!("curl exit {c}"),
                None => "curl killed".to_string(),
            };
            let line = logged.clone().unwrap_or_else(|| "nothing logged".into());
            let short: String = line.chars().take(150).collect();
            (
                blocked && logged.is_some(),
                format!("{what}\nthe box logged: {short}"),
            )
        },
    )?;

    // `keepstate ct events` (this binary, a client of the control socket) watches the port
    // forward's connection come and go.
    let watcher = Events::start(&a.control);
    show.scenario(
        &format!("the port forward: WAN host -> {FW_WAN}:8080"),
        &format!("DNAT to the home server {LAN_HOST}:80; its page comes back"),
        || {
            let url = format!("http://{FW_WAN}:8080/");
            let o = run_in(&lab.wan, &["curl", "-sS", "--max-time", "5", &url]);
            let body = String::from_utf8_lossy(&o.stdout).to_string();
            std::thread::sleep(Duration::from_millis(200));
            let log = std::fs::read_to_string(&lan_log).unwrap_or_default();
            let seen = log
                .lines()
                .rev()
                .find(|l| l.contains("GET / "))
                .unwrap_or("")
                .to_string();
            let ok = o.status.success() && body == home_page;
            (
                ok,
                format!("curl got \"{}\"\nhome server log: {seen}", body.trim()),
            )
        },
    )?;
    show.check()?;
    if let Some(w) = watcher {
        println!(
            "\n$ keepstate ct events --control {}    # while the port forward ran",
            a.control.display()
        );
        for l in w.finish() {
            println!("{l}");
        }
    }

    println!("\n== the box's own view, through its control socket");
    ask(
        a,
        &Request::CtList {
            filter: ListFilter::default(),
            json: false,
        },
        "ct list",
    );
    ask(a, &Request::Stats, "stats");
    println!("\n== stopping run 1");
    if let Some(a) = st.box_.take() {
        a.stop();
    }
    for mut c in st.children.drain(..) {
        let _ = c.kill();
        let _ = c.wait();
    }
    Ok(())
}

/// The interpreter that has pyftpdlib, if any.
fn pyftpdlib() -> Option<&'static str> {
    ["python3", "/usr/bin/python3"].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import pyftpdlib"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Appended to office-ftp-sip.nft for the demo: a base chain that only counts (no verdict,
/// policy accept, after the office's forward chain), so the listing shows how many packets
/// the helper let in as RELATED. A drop anywhere still drops; an accept here changes nothing.
const OFFICE_WATCH: &str = "
table inet demo_watch {
\tchain forward {
\t\ttype filter hook forward priority filter + 10; policy accept;
\t\tmeta l4proto tcp ct state related counter comment \"data connections let in by the ftp helper\"
\t\tmeta l4proto udp ct state related counter comment \"media (RTP) let in by the sip helper\"
\t}
}
";

fn office(st: &mut Stage, show: &mut Show, examples: &Path) -> Result<(), DemoError> {
    let title = "FTP through the ftp helper and NAT (examples/office-ftp-sip.nft)";
    let py = pyftpdlib();
    let sip = sipp();
    if py.is_none() {
        show.skip(
            title,
            "no FTP server: pyftpdlib is not installed (apt-get install python3-pyftpdlib, or pip install pyftpdlib)",
        );
    }
    if let Err(why) = &sip {
        show.skip(SIP_TITLE, why);
    }
    if py.is_none() && sip.is_err() {
        return Ok(());
    }
    let lab = st.lab.clone();
    let dir = st.dir.clone();
    println!("\n== run 2: the office firewall, examples/office-ftp-sip.nft (plus a chain that only counts): the ftp helper on tcp/21, the sip helper on udp/5060, SNAT to 198.51.100.10-14");
    // The LAN host moves into the office's network, and is the office's FTP server too (a
    // second address); the box owns the SNAT pool's addresses.
    let (host, server) = (format!("{OFFICE_HOST}/16"), format!("{FTP_SERVER}/16"));
    for cmd in [
        vec!["ip", "-4", "addr", "flush", "dev", "eth0"],
        vec!["ip", "addr", "add", &host, "dev", "eth0"],
        vec!["ip", "addr", "add", &server, "dev", "eth0"],
        vec!["ip", "route", "add", "default", "via", OFFICE_FW],
    ] {
        let o = run_in(&lab.lan, &cmd);
        if !o.status.success() {
            return Err(DemoError::NoStart(format!(
                "{}: {}",
                cmd.join(" "),
                text(&o.stderr)
            )));
        }
    }
    let control = dir.join("control2.sock");
    let rules = dir.join("office-watched.nft");
    std::fs::write(
        &rules,
        format!(
            "include {:?}\n{OFFICE_WATCH}",
            examples.join("office-ftp-sip.nft").display().to_string()
        ),
    )
    .map_err(io("write the office ruleset"))?;
    let pool: Vec<String> = (10..=14)
        .map(|i| format!("\"198.51.100.{i}/24\""))
        .collect();
    let cfg_text = format!(
        "rules = {:?}\n\n[[port]]\nname = \"lan\"\ninterface = \"ks-lan\"\naddresses = [\"{OFFICE_FW}/16\"]\n\n\
         [[port]]\nname = \"wan\"\ninterface = \"ks-wan\"\naddresses = [\"{FW_WAN}/24\", {}]\n\n\
         [[route]]\nto = \"default\"\nvia = \"{WAN_HOST}\"\n\n\
         [dataplane]\nworkers = 2\ncontrol = {:?}\n",
        rules.display().to_string(),
        pool.join(", "),
        control.display().to_string()
    );
    let cfg = dir.join("office.toml");
    std::fs::write(&cfg, cfg_text).map_err(io("write the office configuration"))?;
    // The first run showed AF_XDP works here: a second run that does not start is a failure.
    let a = match start_box(st, &cfg, &control) {
        Ok(a) => a,
        Err(e) => {
            let why = e.to_string();
            return show.scenario(title, "the appliance starts with the office rules", || {
                (false, why)
            });
        }
    };
    st.box_ = Some(a);
    if let Some(py) = py {
        office_ftp(st, show, py)?;
        office_ftp_forward(st, show, py, &rules, examples)?;
    }
    if let Ok(audio) = sip {
        office_sip(st, show, &rules, examples, &audio)?;
    }
    let a = st.box_.as_ref().ok_or(DemoError::Interrupted)?;
    ask(a, &Request::CtExpect, "ct expect");
    println!("\n== stopping run 2");
    if let Some(a) = st.box_.take() {
        a.stop();
    }
    Ok(())
}

/// FTP in passive and active mode through the office box (run 2), with pyftpdlib.
fn office_ftp(st: &mut Stage, show: &mut Show, py: &str) -> Result<(), DemoError> {
    let lab = st.lab.clone();
    let dir = st.dir.clone();
    let ftp_dir = dir.join("ftp");
    std::fs::create_dir_all(&ftp_dir).map_err(io("create the FTP directory"))?;
    let report = blob(3 * 1024 * 1024);
    std::fs::write(ftp_dir.join("report.bin"), &report).map_err(io("write the FTP file"))?;
    let up = ftp_server(st, py, &lab.wan, INTERNET, &ftp_dir)?;
    let a = st.box_.as_ref().ok_or(DemoError::Interrupted)?;
    for (mode, active, expected) in [
        (
            "passive",
            false,
            "the data connection the server announces (EPSV) is expected by the helper, RELATED, and allowed; the file arrives intact",
        ),
        (
            "active",
            true,
            "the client's EPRT names its private address; the helper rewrites it to the SNAT address, the server connects back to it, and the connection is translated to the client; the file arrives intact",
        ),
    ] {
        show.scenario(
            &format!("FTP, {mode} mode: curl on the LAN host {OFFICE_HOST} -> pyftpdlib on {INTERNET}:21"),
            expected,
            || {
                if !up {
                    return (false, "the FTP server did not start".into());
                }
                let got = dir.join(format!("ftp-{mode}.bin"));
                let url = format!("ftp://{INTERNET}/report.bin");
                ftp_get(&lab.lan, &url, active, 20, &got).intact(&report)
            },
        )?;
    }
    let conns = ct_list(a, 6);
    show.scenario(
        "the box's table after the two transfers",
        "the control connections carry helper=ftp, the data connections are there, translated (SNAT pool on the way out, back to the LAN host for the active one)",
        || {
            let helper = conns.iter().filter(|l| l.contains("dport=21 ") && l.contains("helper=ftp")).count();
            let data = conns.iter().filter(|l| !l.contains("dport=21 ")).count();
            let pool = conns.iter().any(|l| l.contains(" dst=198.51.100.1") && l.contains(&format!("src={OFFICE_HOST}")));
            (
                helper >= 2 && data >= 2 && pool,
                format!("{helper} control connections with helper=ftp, {data} data connections"),
            )
        },
    )?;
    let stats = ask(a, &Request::Stats, "stats");
    show.scenario(
        "rule counters: the data connections were let in as RELATED",
        "the demo's counting chain (table inet demo_watch, appended to the office rules) counted RELATED packets",
        || {
            let (packets, line) = rule_counter(&stats, "meta l4proto tcp ct state related")
                .unwrap_or((0, "the demo_watch chain is not in the listing".into()));
            (packets > 0, line)
        },
    )?;
    Ok(())
}

/// Starts pyftpdlib in `ns` on `addr`:21, serving `dir`; true once it greets (asked from
/// its own namespace).
fn ftp_server(
    st: &mut Stage,
    py: &str,
    ns: &str,
    addr: &str,
    dir: &Path,
) -> Result<bool, DemoError> {
    let server = in_ns(ns, &[py, "-m", "pyftpdlib", "-i", addr, "-p", "21", "-d"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("start pyftpdlib"))?;
    st.children.push(server);
    let url = format!("ftp://{addr}/");
    for _ in 0..50 {
        if run_in(ns, &["curl", "-s", "--max-time", "1", &url])
            .status
            .success()
        {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(false)
}

/// What one curl transfer did: its exit code, the bytes that arrived, what it complained.
struct Fetch {
    code: Option<i32>,
    data: Vec<u8>,
    err: String,
}

/// curl in `ns` fetches `url` within `secs` seconds, in passive mode (EPSV) or in active
/// mode (`-P -`: EPRT with the control connection's own address).
fn ftp_get(ns: &str, url: &str, active: bool, secs: u32, scratch: &Path) -> Fetch {
    let secs = secs.to_string();
    let mut args = vec!["curl", "-sS", "--max-time", &secs];
    if active {
        args.extend(["-P", "-"]);
    }
    args.push("-o");
    let o = in_ns(ns, &args)
        .arg(scratch)
        .arg(url)
        .stdin(Stdio::null())
        .output();
    let data = std::fs::read(scratch).unwrap_or_default();
    let _ = std::fs::remove_file(scratch);
    Fetch {
        code: o.as_ref().ok().and_then(|o| o.status.code()),
        err: o.as_ref().map(|o| text(&o.stderr)).unwrap_or_default(),
        data,
    }
}

impl Fetch {
    /// Whether curl succeeded with exactly `want`, and the observation's words.
    fn intact(&self, want: &[u8]) -> (bool, String) {
        let intact = self.data == want;
        let said = format!(
            "{} bytes, {}{}",
            self.data.len(),
            if intact {
                "identical to the server's file"
            } else {
                "NOT the server's file"
            },
            if self.err.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.err)
            }
        );
        (self.code == Some(0) && intact, said)
    }
}

/// FTP to the office's own server behind the port forward (run 2): curl on the WAN host asks
/// the box's WAN address, the port forward takes the control connection to pyftpdlib on
/// the LAN, and the ftp helper (set on tcp/21 after the DNAT) handles the data connections
/// of both modes; then the same transfers with the helper's rule reloaded away, which fail,
/// the box logging and counting the data connection it drops.
fn office_ftp_forward(
    st: &mut Stage,
    show: &mut Show,
    py: &str,
    rules: &Path,
    examples: &Path,
) -> Result<(), DemoError> {
    let lab = st.lab.clone();
    let dir = st.dir.clone();
    let srv_dir = dir.join("ftp-office");
    std::fs::create_dir_all(&srv_dir).map_err(io("create the FTP directory"))?;
    let file = blob(5 * 1024 * 1024);
    std::fs::write(srv_dir.join("plans.bin"), &file).map_err(io("write the FTP file"))?;
    let up = ftp_server(st, py, &lab.lan, FTP_SERVER, &srv_dir)?;
    let url = format!("ftp://{FW_WAN}/plans.bin");
    let scratch = dir.join("ftp-forward.bin");
    let a = st.box_.as_ref().ok_or(DemoError::Interrupted)?;
    let title = |mode: &str| {
        format!(
            "FTP through the port forward, {mode} mode: curl on the WAN host {WAN_HOST} -> {FW_WAN}:21, DNAT to pyftpdlib on {FTP_SERVER}:21"
        )
    };
    for (mode, active, expected) in [
        (
            "passive",
            false,
            format!("the server's EPSV answer names a port of its own; the helper (set on the forwarded control connection) expects the client's data connection to {FW_WAN} on that port and translates it to the server; the file ({} MiB) arrives intact", file.len() >> 20),
        ),
        (
            "active",
            true,
            format!("the client's EPRT names its own address {WAN_HOST}; the helper expects the server's connection back to it, which leaves translated to {FW_WAN} (the address the client called); the file arrives intact"),
        ),
    ] {
        show.scenario(&title(mode), &expected, || {
            if !up {
                return (false, "the FTP server did not start".into());
            }
            ftp_get(&lab.wan, &url, active, 20, &scratch).intact(&file)
        })?;
    }
    let conns = ct_list(a, 6);
    show.scenario(
        "the box's table after the forwarded transfers",
        &format!("the control connection from {WAN_HOST} to {FW_WAN}:21 is translated to {FTP_SERVER} and carries helper=ftp; the passive data connection is translated the same way, the active one (from {FTP_SERVER} to {WAN_HOST}) to come from {FW_WAN}"),
        || {
            let called = format!("src={WAN_HOST} dst={FW_WAN} ");
            let control = conns.iter().any(|l| {
                l.contains(&called)
                    && l.contains("dport=21 ")
                    && l.contains(&format!("src={FTP_SERVER} "))
                    && l.contains("helper=ftp")
            });
            let passive = conns.iter().any(|l| {
                l.contains(&called)
                    && !l.contains("dport=21 ")
                    && l.contains(&format!("src={FTP_SERVER} dst={WAN_HOST} "))
            });
            let active = conns.iter().any(|l| {
                l.contains(&format!("src={FTP_SERVER} dst={WAN_HOST} "))
                    && l.contains(&format!("src={WAN_HOST} dst={FW_WAN} "))
                    && !l.contains("port=21 ")
            });
            let yes = |b: bool| if b { "there" } else { "MISSING" };
            (
                control && passive && active,
                format!(
                    "control connection with helper=ftp: {}; passive data connection: {}; active data connection: {}",
                    yes(control),
                    yes(passive),
                    yes(active)
                ),
            )
        },
    )?;

    println!(
        "\n== the same transfers without the ftp helper: the rules again less `tcp dport 21 ct helper set \"ftp-standard\"`, reloaded; the table flushed"
    );
    let watched = reload_without(a, rules, examples, &dir, "ct helper set \"ftp-standard\"")?;
    for (mode, active, expected, prefix, drop) in [
        (
            "passive",
            false,
            format!("the control connection is forwarded as before, but nobody reads the server's EPSV answer: the client's data connection to {FW_WAN} is nobody's expectation and no port forward's, so it is for the box itself, whose input chain counts, logs and drops it; curl gives up (3 s limit)"),
            "office input drop: ",
            format!("SRC={WAN_HOST} DST={FW_WAN} "),
        ),
        (
            "active",
            true,
            format!("the server's connection back to {WAN_HOST} is nobody's expectation: a new connection from the LAN on a port the office does not allow out, which the forward chain counts, logs and drops; curl gives up (3 s limit)"),
            "office forward drop: ",
            format!("SRC={FTP_SERVER} DST={WAN_HOST} "),
        ),
    ] {
        show.scenario(&format!("{} without the ftp helper", title(mode)), &expected, || {
            let counted = |s: &[String]| rule_counter(s, prefix);
            let before = counted(&query(a, &Request::Stats)).map_or(0, |c| c.0);
            let seen = a.lines_with(prefix).len();
            let f = ftp_get(&lab.wan, &url, active, 3, &scratch);
            std::thread::sleep(Duration::from_millis(200));
            let logged: Vec<String> = a
                .lines_with(prefix)
                .into_iter()
                .skip(seen)
                .filter(|l| l.contains(&drop) && l.contains("PROTO=TCP"))
                .collect();
            let (after, line) = counted(&query(a, &Request::Stats))
                .unwrap_or((0, format!("no counted rule with `{prefix}` in the listing")));
            let failed = f.code != Some(0) && f.data != file;
            let mut said = match f.code {
                Some(0) => "curl succeeded".to_string(),
                Some(28) => "curl timed out (exit 28)".to_string(),
                Some(c) => format!("curl failed, exit {c} ({})", f.err),
                None => "curl killed".to_string(),
            };
            said.push_str(&format!(", {} bytes arrived", f.data.len()));
            match logged.first() {
                Some(l) => said.push_str(&format!(
                    "\nthe box logged ({} lines): {}",
                    logged.len(),
                    log_fields(l)
                )),
                None => said.push_str("\nthe box logged nothing for it"),
            }
            said.push_str(&format!("\nthe rule counted {} packets more: {line}", after.saturating_sub(before)));
            (failed && !logged.is_empty() && after > before, said)
        })?;
    }
    reload_original(a, rules, watched)
}

const SIP_TITLE: &str = "a SIP call with RTP both ways through the sip helper and NAT (sipp, examples/office-ftp-sip.nft)";
/// The audio both sides play: a G.711 A-law stream that sip-tester ships (7 s, 30 ms a packet).
const SIP_AUDIO: &str = "/usr/share/sip-tester/g711a.pcap";
/// The phone's (UAC's) and the provider's (UAS's) RTP ports, as their SDP announces them.
const PHONE_RTP: u16 = 7078;
const PROVIDER_RTP: u16 = 6000;
/// How long the phone keeps the call up while both sides play the audio.
const CALL_MS: u64 = 2000;

/// sipp with the RTP playback this demo uses, or why not.
fn sipp() -> Result<PathBuf, String> {
    let o = Command::new("sipp")
        .arg("-v")
        .stdin(Stdio::null())
        .output()
        .map_err(|_| {
            "no sipp: sip-tester is not installed (scripts/setup.sh installs it)".to_string()
        })?;
    let v = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    if !v.contains("PCAP") {
        return Err(format!(
            "this sipp cannot play RTP (built without PCAP play): {}",
            v.trim()
        ));
    }
    let audio = PathBuf::from(SIP_AUDIO);
    if !audio.exists() {
        return Err(format!(
            "{SIP_AUDIO} (sip-tester's G.711 sample) is not there"
        ));
    }
    if !have("nft") {
        return Err(
            "no nft: the hosts count the RTP packets that arrive with nftables counters".into(),
        );
    }
    Ok(audio)
}

/// The phone's side (sipp's UAC): INVITE with an SDP offer (PCMA on [media_port]), ACK,
/// plays AUDIO to the address and port the answer names while the call is up, BYE.
const SIP_UAC: &str = r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="keepstate demo: the office phone calls the provider">
  <send retrans="500">
    <![CDATA[

      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: phone <sip:phone@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: provider <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: sip:phone@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=phone 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 8
      a=rtpmap:8 PCMA/8000

    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="200" rtd="true"/>
  <send>
    <![CDATA[

      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: phone <sip:phone@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: provider <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Contact: sip:phone@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <nop><action><exec play_pcap_audio="AUDIO"/></action></nop>
  <pause milliseconds="CALL_MS"/>
  <send retrans="500">
    <![CDATA[

      BYE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: phone <sip:phone@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: provider <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Contact: sip:phone@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" crlf="true"/>
</scenario>
"#;

/// The provider's side (sipp's UAS): answers with an SDP of its own ([media_port]), plays
/// AUDIO to the address and port the offer names once the ACK is in, until the BYE.
const SIP_UAS: &str = r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="keepstate demo: the provider answers">
  <recv request="INVITE" crlf="true"/>
  <send>
    <![CDATA[

      SIP/2.0 180 Ringing
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Length: 0

    ]]>
  </send>
  <send retrans="500">
    <![CDATA[

      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=provider 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 8
      a=rtpmap:8 PCMA/8000

    ]]>
  </send>
  <recv request="ACK" rtd="true" crlf="true"/>
  <nop><action><exec play_pcap_audio="AUDIO"/></action></nop>
  <recv request="BYE"/>
  <send>
    <![CDATA[

      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Length: 0

    ]]>
  </send>
</scenario>
"#;

/// The hosts' own count of what arrives (nftables in their namespaces, input hook): RTP
/// packets that reached the phone's and the provider's media ports.
fn rtp_counters(ns: &str, port: u16) -> bool {
    let rules = format!(
        "table inet demo_rtp {{\n\tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n\t\tudp dport {port} counter\n\t}}\n}}\n"
    );
    let mut c = in_ns(ns, &["nft", "-f", "-"]);
    let Ok(mut child) = c
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(rules.as_bytes());
    }
    child.wait().is_ok_and(|s| s.success())
}

/// The packets a host's counter of `rtp_counters` has seen so far.
fn rtp_count(ns: &str, port: u16) -> u64 {
    let o = run_in(ns, &["nft", "list", "chain", "inet", "demo_rtp", "input"]);
    let out = text(&o.stdout);
    let key = format!("udp dport {port} counter packets ");
    out.lines()
        .find_map(|l| l.split(&key).nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// What one sipp said at its end: successful and failed calls (`-trace_stat` CSV, last row).
fn sipp_calls(stf: &Path) -> Option<(u64, u64)> {
    let csv = std::fs::read_to_string(stf).ok()?;
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty());
    let head: Vec<&str> = lines.next()?.split(';').collect();
    let last: Vec<&str> = lines.next_back()?.split(';').collect();
    let col = |name: &str| -> Option<u64> {
        let i = head.iter().position(|h| *h == name)?;
        last.get(i)?.trim().parse().ok()
    };
    Some((col("SuccessfulCall(C)")?, col("FailedCall(C)")?))
}

/// What one call showed: each sipp's (successful, failed) calls, the RTP packets that
/// arrived at the provider and at the phone, and the first lines of sipp's error logs.
struct Call {
    phone: Option<(u64, u64)>,
    provider: Option<(u64, u64)>,
    at_provider: u64,
    at_phone: u64,
    err: String,
}

/// One call: the provider's sipp (UAS) on INTERNET:5060, then the phone's (UAC) on the LAN
/// host calling it (the UAC retransmits its INVITE should the UAS not listen yet).
fn sip_call(st: &Stage, uac: &Path, uas: &Path, tag: &str) -> Call {
    let lab = &st.lab;
    let dir = &st.dir;
    let (p0, h0) = (
        rtp_count(&lab.wan, PROVIDER_RTP),
        rtp_count(&lab.lan, PHONE_RTP),
    );
    let uas_stf = dir.join(format!("uas-{tag}.csv"));
    let uac_stf = dir.join(format!("uac-{tag}.csv"));
    let uas_log = dir.join(format!("uas-{tag}.log"));
    let uac_log = dir.join(format!("uac-{tag}.log"));
    let pr = PROVIDER_RTP.to_string();
    let ph = PHONE_RTP.to_string();
    let server = in_ns(&lab.wan, &["sipp", "-sf"])
        .arg(uas)
        .args(["-i", INTERNET, "-p", "5060", "-mi", INTERNET, "-mp", &pr])
        .args([
            "-m",
            "1",
            "-timeout",
            "15s",
            "-nostdin",
            "-trace_stat",
            "-stf",
        ])
        .arg(&uas_stf)
        .args(["-trace_err", "-error_file"])
        .arg(&uas_log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut server) = server else {
        return Call {
            phone: None,
            provider: None,
            at_provider: 0,
            at_phone: 0,
            err: "the UAS did not start".into(),
        };
    };
    std::thread::sleep(Duration::from_millis(500));
    let _ = in_ns(&lab.lan, &["sipp", "-sf"])
        .arg(uac)
        .args([
            "-i",
            OFFICE_HOST,
            "-p",
            "5060",
            "-mi",
            OFFICE_HOST,
            "-mp",
            &ph,
        ])
        .args([
            "-m",
            "1",
            "-timeout",
            "15s",
            "-nostdin",
            "-trace_stat",
            "-stf",
        ])
        .arg(&uac_stf)
        .args(["-trace_err", "-error_file"])
        .arg(&uac_log)
        .arg(format!("{INTERNET}:5060"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    // The provider ends with the call (-m 1); one that still waits is stopped.
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end && matches!(server.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = server.kill();
    let _ = server.wait();
    let err = [&uac_log, &uas_log]
        .iter()
        .filter_map(|l| std::fs::read_to_string(l).ok())
        .flat_map(|t| {
            t.lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with("sipp:"))
                .map(|l| l.trim().to_string())
                .collect::<Vec<_>>()
        })
        .take(2)
        .collect::<Vec<_>>()
        .join(" / ");
    Call {
        phone: sipp_calls(&uac_stf),
        provider: sipp_calls(&uas_stf),
        at_provider: rtp_count(&lab.wan, PROVIDER_RTP).saturating_sub(p0),
        at_phone: rtp_count(&lab.lan, PHONE_RTP).saturating_sub(h0),
        err,
    }
}

fn calls(c: Option<(u64, u64)>) -> String {
    match c {
        Some((ok, failed)) => format!("{ok} successful call, {failed} failed"),
        None => "no statistics (sipp did not finish)".into(),
    }
}

/// The office phone calls the provider through the box (run 2), with the sip helper and,
/// for contrast, without it.
fn office_sip(
    st: &mut Stage,
    show: &mut Show,
    rules: &Path,
    examples: &Path,
    audio: &Path,
) -> Result<(), DemoError> {
    let lab = st.lab.clone();
    let dir = st.dir.clone();
    let audio = audio.display().to_string();
    let uac = dir.join("sip-uac.xml");
    let uas = dir.join("sip-uas.xml");
    for (path, xml) in [(&uac, SIP_UAC), (&uas, SIP_UAS)] {
        let xml = xml
            .replace("AUDIO", &audio)
            .replace("CALL_MS", &CALL_MS.to_string());
        std::fs::write(path, xml).map_err(io("write the sipp scenarios"))?;
    }
    let counting = rtp_counters(&lab.wan, PROVIDER_RTP) && rtp_counters(&lab.lan, PHONE_RTP);
    let st_ = &*st;
    show.scenario(
        &format!("a SIP call: sipp as the phone (UAC) on {OFFICE_HOST} -> sipp as the provider (UAS) on {INTERNET}:5060, both playing G.711 audio"),
        &format!(
            "the call completes (1 successful call on each side); the sip helper rewrites the phone's SDP (c={OFFICE_HOST}, m={PHONE_RTP}) to the SNAT address and expects the media: RTP arrives at the provider's {INTERNET}:{PROVIDER_RTP} and at the phone's {OFFICE_HOST}:{PHONE_RTP} (counted by nftables counters in the hosts' own namespaces)"
        ),
        || {
            let call = sip_call(st_, &uac, &uas, "helper");
            let ok = counting
                && call.phone == Some((1, 0))
                && call.provider == Some((1, 0))
                && call.at_provider > 0
                && call.at_phone > 0;
            let mut s = format!(
                "phone (UAC): {}; provider (UAS): {}\nRTP arrived: {} packets at the provider, {} at the phone (each side played {:.1} s of 30 ms packets)",
                calls(call.phone),
                calls(call.provider),
                call.at_provider,
                call.at_phone,
                CALL_MS as f64 / 1000.0,
            );
            if !counting {
                s.push_str("\nthe hosts' nftables counters could not be set up");
            }
            if !call.err.is_empty() {
                s.push_str(&format!("\nsipp: {}", call.err));
            }
            (ok, s)
        },
    )?;
    let a = st.box_.as_ref().ok_or(DemoError::Interrupted)?;
    let conns = ct_list(a, 17);
    let stats = query(a, &Request::Stats);
    show.scenario(
        "the box's view of the call",
        &format!(
            "the SIP connection carries helper=sip; the RTP connection between {OFFICE_HOST}:{PHONE_RTP} and {INTERNET}:{PROVIDER_RTP} is there, translated to the SNAT pool; the counting chain (`keepstate stats`) counted the packet that opened it as RELATED (`ct list`, like `conntrack -L`, does not print that)"
        ),
        || {
            let sig = conns
                .iter()
                .find(|l| l.contains("dport=5060 ") && l.contains("helper=sip"));
            let rtp = conns.iter().find(|l| {
                !l.contains("port=5060 ")
                    && l.contains(&format!("={OFFICE_HOST} "))
                    && l.contains(&format!("port={PROVIDER_RTP} "))
                    && l.contains("=198.51.100.1")
            });
            let (related, line) = rule_counter(&stats, "meta l4proto udp ct state related")
                .unwrap_or((0, "the demo_watch chain is not in the listing".into()));
            let cut = |l: Option<&String>| {
                l.map(|l| l.chars().take(200).collect::<String>())
                    .unwrap_or_else(|| "none".into())
            };
            (
                sig.is_some() && rtp.is_some() && related > 0,
                format!(
                    "signalling: {}\nmedia: {}\nRELATED: {line}",
                    cut(sig),
                    cut(rtp)
                ),
            )
        },
    )?;

    // The same call with the helper taken out of the rules.
    println!(
        "\n== the same call without the sip helper: the rules again less `udp dport 5060 ct helper set \"sip-5060\"`, reloaded; the table flushed, so no connection keeps the helper it had"
    );
    let watched = reload_without(a, rules, examples, &dir, "ct helper set \"sip-5060\"")?;
    let st_ = &*st;
    show.scenario(
        "the same SIP call without the sip helper",
        &format!(
            "the signalling still gets through (the provider answers where the INVITE came from), but the media does not: the phone's SDP still names {OFFICE_HOST}, which the provider cannot reach, and the phone's RTP to {INTERNET}:{PROVIDER_RTP} is nobody's expectation, so the forward chain drops it: no RTP arrives on either side"
        ),
        || {
            let call = sip_call(st_, &uac, &uas, "bare");
            let dropped = a
                .wait_for(&format!("DPT={PROVIDER_RTP} "), Duration::from_secs(1))
                .filter(|l| l.contains("office forward drop:"));
            let ok = call.at_provider == 0 && call.at_phone == 0;
            let mut s = format!(
                "phone (UAC): {}; provider (UAS): {}\nRTP arrived: {} packets at the provider, {} at the phone",
                calls(call.phone),
                calls(call.provider),
                call.at_provider,
                call.at_phone,
            );
            if let Some(l) = &dropped {
                s.push_str(&format!("\nthe box logged: {}", log_fields(l)));
            }
            (ok, s)
        },
    )?;
    reload_original(a, rules, watched)
}

/// Reloads the office rules less the lines that contain `rule` (the watched rules file
/// includes a copy of examples/office-ftp-sip.nft without them, written to `dir`), then
/// flushes the table, so that no connection keeps a helper it had. Returns the watched
/// file as it was, for [`reload_original`].
fn reload_without(
    a: &Appliance,
    rules: &Path,
    examples: &Path,
    dir: &Path,
    rule: &str,
) -> Result<String, DemoError> {
    let office = examples.join("office-ftp-sip.nft");
    let original = std::fs::read_to_string(&office).map_err(io("read the office rules"))?;
    let bare: String = original
        .lines()
        .filter(|l| !l.contains(rule))
        .map(|l| format!("{l}\n"))
        .collect();
    let bare_path = dir.join("office-less-a-helper.nft");
    std::fs::write(&bare_path, bare).map_err(io("write the rules without the helper"))?;
    let watched = std::fs::read_to_string(rules).map_err(io("read the office ruleset"))?;
    let office_s = office.display().to_string();
    std::fs::write(
        rules,
        watched.replace(
            &format!("{office_s:?}"),
            &format!("{:?}", bare_path.display().to_string()),
        ),
    )
    .map_err(io("write the office ruleset"))?;
    ask(a, &Request::Reload, "reload");
    ask(a, &Request::CtFlush, "ct flush");
    Ok(watched)
}

/// Puts the watched rules file of [`reload_without`] back and reloads it.
fn reload_original(a: &Appliance, rules: &Path, watched: String) -> Result<(), DemoError> {
    std::fs::write(rules, watched).map_err(io("write the office ruleset"))?;
    println!("\n== the original rules back");
    ask(a, &Request::Reload, "reload");
    Ok(())
}

/// A log line less its MAC, TOS, TTL, ID and length fields.
fn log_fields(l: &str) -> String {
    let short: Vec<&str> = l
        .split(' ')
        .filter(|w| {
            (!w.contains('=') && *w != "DF")
                || ["IN=", "OUT=", "SRC=", "DST=", "PROTO=", "SPT=", "DPT="]
                    .iter()
                    .any(|k| w.starts_with(k))
        })
        .collect();
    short.join(" ")
}

/// The packets a rule of `keepstate stats`'s listing has counted (the first rule line that
/// contains `what` and a counter), with the line.
fn rule_counter(stats: &[String], what: &str) -> Option<(u64, String)> {
    let line = stats
        .iter()
        .find(|l| l.contains(what) && l.contains("counter packets "))?;
    let packets = line
        .split("counter packets ")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()?;
    Some((packets, line.trim().to_string()))
}
