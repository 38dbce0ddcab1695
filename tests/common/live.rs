//! Test kit for the live appliance in network namespaces (`netns_dataplane`,
//! `netns_fastpath`, `netns_reliability`): a lab of `keepstate lab up`'s shape under a prefix of its own, with a
//! watchdog; `keepstate run` started in its firewall namespace with its stderr lines
//! collected; commands in the namespaces; the control socket's clients; a download checked
//! byte for byte.
//!
//! Everything started is killed, and the namespaces deleted, on [`Guard`]'s Drop (also when
//! an assertion fails).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use keepstate::dataplane::lab::Lab;

/// Whether the live tests can run here (root, `ip netns`, `tools`); says how to run `test`
/// when not.
pub fn can_run(test: &str, tools: &[&str]) -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let have = tools
        .iter()
        .all(|t| Command::new(t).arg("-V").output().is_ok());
    let netns = root && Command::new("ip").args(["netns", "list"]).output().is_ok();
    if !root || !have || !netns {
        eprintln!(
            "SKIPPED: needs root, ip netns and {} (scripts/setup.sh installs them); run as \
             root: cargo test --test {test}",
            tools.join(", ")
        );
        return false;
    }
    true
}

/// The lab and every process started in it: killed and deleted on Drop.
pub struct Guard {
    pub lab: Lab,
    pub children: Vec<Child>,
    /// Dropped with the guard, which calls off the watchdog of [`lab`].
    _dog: std::sync::mpsc::Sender<()>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.lab.down();
    }
}

pub fn in_ns(ns: &str, cmd: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(cmd);
    c
}

pub fn output(ns: &str, cmd: &[&str]) -> Output {
    in_ns(ns, cmd).output().expect("ip netns exec")
}

/// Runs `cmd` in `ns` and requires success.
pub fn ok(ns: &str, cmd: &[&str]) -> String {
    let o = output(ns, cmd);
    assert!(
        o.status.success(),
        "`{}` in {ns} failed: {}{}",
        cmd.join(" "),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The lines keepstate writes to stderr, as they come.
#[derive(Default)]
pub struct Lines {
    pub lines: Mutex<Vec<String>>,
    pub more: Condvar,
}

impl Lines {
    /// Whether a line so far contains `what`.
    pub fn contains(&self, what: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(what))
    }

    pub fn collect(self: &Arc<Self>, child: &mut Child) {
        let err = child.stderr.take().expect("stderr");
        let me = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("  keepstate| {line}");
                me.lines.lock().unwrap().push(line);
                me.more.notify_all();
            }
        });
    }

    /// Waits for a line containing `what` after the first `from` lines; its index.
    pub fn wait_for(&self, what: &str, from: usize, limit: Duration) -> usize {
        let end = Instant::now() + limit;
        let mut lines = self.lines.lock().unwrap();
        loop {
            if let Some(i) = lines.iter().skip(from).position(|l| l.contains(what)) {
                return from + i;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let said = lines[from.min(lines.len())..].join("\n");
                // Unlocked first: a panic holding the lock would poison it for the reader.
                drop(lines);
                panic!("keepstate did not say `{what}` within {limit:?}; it said:\n{said}");
            }
            lines = self.more.wait_timeout(lines, left).unwrap().0;
        }
    }

    pub fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }
}

/// Deterministic bytes that compress badly (xorshift).
pub fn body(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Starts `python3 -m http.server` in `ns` on `addr:port` serving `dir`; returns when it
/// answers (asked from inside its own namespace, so the firewall is not involved).
pub fn http_server(g: &mut Guard, ns: &str, addr: &str, port: u16, dir: &Path) {
    let child = in_ns(ns, &["python3", "-m", "http.server", &port.to_string()])
        .args(["--bind", addr, "--directory"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("http.server");
    g.children.push(child);
    wait_http(ns, addr, port, "/");
}

/// Waits until `path` on the HTTP server at `addr`:`port` in `ns` answers.
fn wait_http(ns: &str, addr: &str, port: u16, path: &str) {
    let host = if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr.to_string()
    };
    let url = format!("http://{host}:{port}{path}");
    for _ in 0..100 {
        let o = output(
            ns,
            &["curl", "-sf", "-o", "/dev/null", "--max-time", "1", &url],
        );
        if o.status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the http server at {url} in {ns} did not start");
}

/// An HTTP server on `addr`:`port` in `ns` whose every GET answers `file`, paced by the server
/// over `secs` seconds (each chunk at its time); `/ready` answers at once. A download from it
/// lasts that long whatever the client does. curl's `--limit-rate` paces by the time it
/// measures, and in CI two downloads paced that way (15 s and 1 s) ended within 3 s and 0.4 s,
/// complete (cause not established; this VM's clocks jump, which would do it).
pub fn paced_http_server(g: &mut Guard, ns: &str, addr: &str, port: u16, file: &Path, secs: f64) {
    let child = in_ns(
        ns,
        &["python3", "-c", PACED_SERVER, addr, &port.to_string()],
    )
    .arg(file)
    .arg(secs.to_string())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("paced http server");
    g.children.push(child);
    wait_http(ns, addr, port, "/ready");
}

const PACED_SERVER: &str = r#"
import http.server, socket, socketserver, sys, time
addr, port, path, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
data = open(path, 'rb').read()
CHUNK = 65536
pause = secs / max(1, (len(data) + CHUNK - 1) // CHUNK)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'' if self.path == '/ready' else data
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        start = time.monotonic()
        for n, i in enumerate(range(0, len(body), CHUNK)):
            # Each chunk on the clock, not after a sleep: a slow VM oversleeps (a 42 ms
            # sleep took 130 to 340 ms, and a 4 s download took 30 s and more).
            time.sleep(max(0, start + n * pause - time.monotonic()))
            self.wfile.write(body[i:i + CHUNK])
    def log_message(self, *a):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    address_family = socket.AF_INET6 if ':' in addr else socket.AF_INET
S((addr, port), H).serve_forever()
"#;

/// Downloads `url` from `ns` into `to` and requires it to equal `want`.
pub fn download(ns: &str, url: &str, to: &Path, want: &[u8]) {
    let t = Instant::now();
    ok(
        ns,
        &[
            "curl",
            "-sS",
            "--max-time",
            "30",
            "-o",
            to.to_str().unwrap(),
            url,
        ],
    );
    let got = std::fs::read(to).expect("downloaded file");
    assert_eq!(
        got.len(),
        want.len(),
        "download of {url} has the wrong length"
    );
    assert!(got == want, "download of {url} is damaged");
    eprintln!("  {} bytes intact in {:?}", got.len(), t.elapsed());
}

/// Runs `keepstate ARGS --control SOCK` (outside the lab: the socket is a file) and returns
/// its output, whatever its exit status.
pub fn ctl(sock: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keepstate"))
        .args(args)
        .arg("--control")
        .arg(sock)
        .output()
        .expect("keepstate client")
}

/// `ctl` that must succeed; its stdout.
pub fn ctl_ok(sock: &Path, args: &[&str]) -> String {
    let o = ctl(sock, args);
    assert!(
        o.status.success(),
        "keepstate {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn signal(pid: u32, sig: &str) {
    let s = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(s.success(), "kill {sig} {pid}");
}

/// Builds a lab under `tag` and this process's id, with `queues` queues per veth, and a
/// watchdog that deletes it (and ends the test binary) if the test takes longer than `limit`.
/// The watchdog is called off when the guard drops: tests that run one after another must
/// not be ended by an earlier test's watchdog.
pub fn lab(tag: &str, queues: u32, limit: Duration) -> Guard {
    let lab = Lab::named(&format!("k{tag}{}", std::process::id() % 1_000_000)).unwrap();
    let dog = lab.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if rx.recv_timeout(limit) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            // Printed to the terminal: the test harness's capture dies with the process.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "timed out after {limit:?}; deleting the lab {}",
                dog.fw
            );
            dog.down();
            std::process::exit(101);
        }
    });
    let g = Guard {
        lab,
        children: Vec::new(),
        _dog: tx,
    };
    g.lab.up(queues).expect("lab up");
    g
}

/// Starts the built `keepstate run --config cfg` in the lab's firewall namespace; returns
/// once it runs, with its pid and its stderr lines.
pub fn start(g: &mut Guard, cfg: &Path) -> (u32, Arc<Lines>) {
    start_with(g, cfg, &[])
}

/// [`start`] with environment variables set for the appliance.
pub fn start_with(g: &mut Guard, cfg: &Path, env: &[(&str, &str)]) -> (u32, Arc<Lines>) {
    let mut fw = in_ns(
        &g.lab.fw,
        &[env!("CARGO_BIN_EXE_keepstate"), "run", "--config"],
    )
    .arg(cfg)
    .envs(env.iter().copied())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("keepstate run");
    let pid = fw.id();
    let lines = Arc::new(Lines::default());
    lines.collect(&mut fw);
    g.children.push(fw);
    lines.wait_for("keepstate: running", 0, Duration::from_secs(20));
    (pid, lines)
}

/// examples/lab.toml (the home router) written to `dir`, with `rules` for its rules file, the
/// control socket `sock`, and `dataplane` (lines) added to its `[dataplane]` section; its
/// path.
pub fn router_config(dir: &Path, rules: &Path, sock: &Path, dataplane: &str) -> PathBuf {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let control = format!("control = {:?}", sock.display().to_string());
    let cfg = keepstate::dataplane::lab::config(&examples, rules, sock)
        .unwrap()
        .replace(&control, &format!("{control}\n{dataplane}"));
    assert!(cfg.contains(&rules.display().to_string()));
    assert!(cfg.contains(&control));
    let path = dir.join("lab.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}
