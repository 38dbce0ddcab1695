//! Live control: a Unix socket served by a thread of the appliance (never a packet worker),
//! for `keepstate reload`, `keepstate ct ...` and `keepstate stats`.
//!
//! ```text
//!  keepstate ct list ──connect──> [dataplane] control (root:GROUP 0660, or root 0600)
//!                                   accept thread: SO_PEERCRED -> root, the appliance's own
//!                                   user or a member of GROUP, else "fail permission denied"
//!                                   one thread per client (at most MAX_CLIENTS): read one
//!                                   request line (proto.rs), answer, close
//! ```
//!
//! The socket is bound under a temporary name, given its owner and mode, then renamed into
//! place, so it is never reachable with looser permissions. Owns the socket, its threads and
//! the answers' text (which is the tracker's and the printer's); the reload itself is the
//! caller's (`cli/run.rs` compiles the rules, here it is only called). Must not hold policy.

pub mod client;
pub mod proto;

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use proto::{Answer, ListFilter, ProtoError, Request};

use super::Shared;
use crate::conntrack::show::{self, ShowOpts};
use crate::conntrack::{expect, ConnRef, Timestamp};
use crate::engine::Compiled;

/// Clients served at once; more are told to come back later.
pub const MAX_CLIENTS: usize = 16;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop and an event stream look at the stop flag.
const POLL_MS: i32 = 200;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no appliance answers at {path} ({reason}): is `keepstate run` running, and is this its control socket? (--control PATH, or --config FILE to use the configuration's)")]
    NotRunning { path: PathBuf, reason: String },
    #[error("{path}: permission denied: the control socket is for root and the configuration's control_group")]
    Denied { path: PathBuf },
    #[error("the appliance closed {path} before it finished answering (did it stop?)")]
    Closed { path: PathBuf },
    #[error("cannot {what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("{0}")]
    Proto(#[from] ProtoError),
    #[error("another keepstate already answers on the control socket {0}; stop it or set another [dataplane] control path")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it (set another [dataplane] control path)")]
    NotASocket(PathBuf),
    #[error("control_group `{0}` is not a group on this system")]
    NoGroup(String),
}

/// What a reload returns: what to tell the operator, or the diagnostics of a refused file.
pub type ReloadFn = dyn Fn() -> Result<String, String> + Send + Sync;

/// The control socket, bound and with its permissions set, not yet served.
pub struct Bound {
    listener: UnixListener,
    path: PathBuf,
    group: Option<u32>,
}

/// The numeric id of group `name` (or a number given as is).
fn group_id(name: &str) -> Result<u32, ControlError> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let cname = CString::new(name).map_err(|_| ControlError::NoGroup(name.to_string()))?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: `grp` and `found` are ours, `buf` has the
    // length given; getgrnam_r writes only into them.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(ControlError::NoGroup(name.to_string()));
    }
    Ok(grp.gr_gid)
}

/// Binds the control socket at `path`: owner the appliance's user, group `group` and mode
/// 0660 when a group is given, else 0600. A stale socket (nobody answers) is replaced; a live
/// one or another kind of file is an error.
pub fn bind(path: &Path, group: Option<&str>) -> Result<Bound, ControlError> {
    let gid = group.map(group_id).transpose()?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ControlError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|err| ControlError::Io {
            what: format!("remove the stale socket {}", path.display()),
            err,
        })?;
    }
    let io = |what: String| move |err| ControlError::Io { what, err };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io(format!("bind {}", path.display())))?;
    let placed = (|| {
        if let Some(g) = gid {
            std::os::unix::fs::chown(&tmp, None, Some(g))
                .map_err(io(format!("give {} to group {g}", path.display())))?;
        }
        let mode = if gid.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(io(format!("set the mode of {}", path.display())))?;
        std::fs::rename(&tmp, path).map_err(io(format!("move the socket to {}", path.display())))
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    listener
        .set_nonblocking(true)
        .map_err(io("make the control socket non-blocking".into()))?;
    Ok(Bound {
        listener,
        path: path.to_path_buf(),
        group: gid,
    })
}

/// The served control socket; [`Server::stop`] ends its threads and removes the socket.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Server {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Ctx {
    shared: Arc<Shared>,
    reload: Arc<ReloadFn>,
    group: Option<u32>,
    stop: Arc<AtomicBool>,
    clients: AtomicUsize,
}

/// Starts the thread that accepts clients on `bound`.
pub fn serve(
    bound: Bound,
    shared: Arc<Shared>,
    reload: Arc<ReloadFn>,
) -> Result<Server, ControlError> {
    let stop = Arc::new(AtomicBool::new(false));
    let ctx = Arc::new(Ctx {
        shared,
        reload,
        group: bound.group,
        stop: stop.clone(),
        clients: AtomicUsize::new(0),
    });
    let path = bound.path.clone();
    let thread = std::thread::Builder::new()
        .name("keepstate-ctl".into())
        .spawn(move || accept_loop(bound.listener, ctx))
        .map_err(|err| ControlError::Io {
            what: "start the control thread".into(),
            err,
        })?;
    Ok(Server {
        stop,
        thread: Some(thread),
        path,
    })
}

fn accept_loop(listener: UnixListener, ctx: Arc<Ctx>) {
    let mut fds = [super::iface::pollfd(listener.as_raw_fd())];
    while !ctx.stop.load(Ordering::Relaxed) {
        super::iface::wait_readable(&mut fds, POLL_MS);
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) => continue,
        };
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        if ctx.clients.fetch_add(1, Ordering::Relaxed) >= MAX_CLIENTS {
            ctx.clients.fetch_sub(1, Ordering::Relaxed);
            let _ = (&stream).write_all(
                Answer::Fail(format!(
                    "busy: {MAX_CLIENTS} control clients are connected; try again"
                ))
                .to_lines()
                .as_bytes(),
            );
            continue;
        }
        let c = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("keepstate-ctl-client".into())
            .spawn(move || {
                client(&c, stream);
                c.clients.fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            ctx.clients.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The peer's user, group and process (SO_PEERCRED).
fn peer_cred(s: &UnixStream) -> Option<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a writable ucred and `len` its size, as SO_PEERCRED expects.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred)
}

/// Whether process `pid` has `gid` among its supplementary groups (/proc/PID/status).
fn in_group(pid: i32, gid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
    })
}

/// Who may talk to the appliance: root, the appliance's own user, and the control group.
fn allowed(cred: &libc::ucred, group: Option<u32>) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    cred.uid == 0 || cred.uid == me || group.is_some_and(|g| cred.gid == g || in_group(cred.pid, g))
}

/// Serves one client: check it, read its request, answer.
fn client(ctx: &Ctx, stream: UnixStream) {
    let mut out = &stream;
    let send = |a: Answer| (&stream).write_all(a.to_lines().as_bytes());
    match peer_cred(&stream) {
        Some(c) if allowed(&c, ctx.group) => {}
        Some(c) => {
            let _ = send(Answer::Fail(format!(
                "permission denied: uid {} is not root{}",
                c.uid,
                if ctx.group.is_some() {
                    " and not in the control group"
                } else {
                    " (the control socket has no control_group)"
                }
            )));
            return;
        }
        None => return,
    }
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let mut line = Vec::new();
    let read = BufReader::new(&stream)
        .take(proto::MAX_REQUEST as u64 + 1)
        .read_until(b'\n', &mut line);
    if let Err(e) = read {
        let _ = send(Answer::Fail(format!("no request received: {e}")));
        return;
    }
    if line.ends_with(b"\n") {
        line.pop();
    } else if line.len() > proto::MAX_REQUEST {
        let _ = send(Answer::Fail(ProtoError::TooLong.to_string()));
        return;
    }
    let req = match Request::parse(&line) {
        Ok(r) => r,
        Err(e) => {
            let _ = send(Answer::Fail(e.to_string()));
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    let _ = answer(ctx, &req, &mut out, stream.as_raw_fd());
}

fn write(w: &mut impl Write, a: Answer) -> std::io::Result<()> {
    w.write_all(a.to_lines().as_bytes())
}

/// Writes the answer to `req`.
fn answer(ctx: &Ctx, req: &Request, w: &mut impl Write, fd: RawFd) -> std::io::Result<()> {
    let shared = &ctx.shared;
    let engine = &shared.engine;
    let now = shared.now();
    match req {
        Request::Reload => match (ctx.reload)() {
            Ok(msg) => {
                write(w, Answer::Out(msg))?;
                write(w, Answer::Ok)
            }
            Err(diag) => {
                write(w, Answer::Err(diag))?;
                write(
                    w,
                    Answer::Fail("reload failed, keeping the old ruleset".into()),
                )
            }
        },
        Request::CtList { filter, json } => {
            // The fast path's counters and timeouts into the connections first.
            shared.flow_sync();
            let conns = listed(engine.tracker().listed(now), filter);
            let mut text = String::new();
            for c in &conns {
                if *json {
                    text.push_str(&conn_json(c, now));
                } else {
                    text.push_str(&show::list_line(c, now, ShowOpts::default()));
                }
                text.push('\n');
            }
            if !text.is_empty() {
                write(w, Answer::Out(text))?;
            }
            write(w, Answer::Err(show::list_summary(conns.len())))?;
            write(w, Answer::Ok)
        }
        Request::CtCount => {
            write(w, Answer::Out(show::count_line(engine.tracker().count())))?;
            write(w, Answer::Ok)
        }
        Request::FlowCount => {
            // Two entries per flow; a flow leaves the map when it is torn down.
            let n = engine.flows().len() / 2;
            write(w, Answer::Out(show::count_line(n)))?;
            write(w, Answer::Ok)
        }
        Request::CtFlush => {
            let conns = engine.tracker().conns();
            for c in &conns {
                engine.tracker().kill(c);
            }
            write(
                w,
                Answer::Err(
                    "conntrack v1.4.8 (conntrack-tools): connection tracking table has been emptied."
                        .into(),
                ),
            )?;
            write(w, Answer::Ok)
        }
        Request::CtExpect => {
            let exps = engine.tracker().expectations().list(now.0);
            let text: String = exps
                .iter()
                .map(|e| expect::proc_line(e, now.0) + "\n")
                .collect();
            if !text.is_empty() {
                write(w, Answer::Out(text))?;
            }
            write(
                w,
                Answer::Err(format!(
                    "conntrack v1.4.8 (conntrack-tools): {} expectations have been shown.",
                    exps.len()
                )),
            )?;
            write(w, Answer::Ok)
        }
        Request::Stats => {
            let mut text = shared.render_stats();
            let compiled = engine.compiled();
            text.push_str("\n# the ruleset in force, as `nft list ruleset` shows it\n");
            text.push_str(&listing_with_counters(&compiled));
            write(w, Answer::Out(text))?;
            write(w, Answer::Ok)
        }
        Request::CtEvents => events(ctx, w, fd),
    }
}

/// Streams `conntrack -E` lines until the client goes away or the appliance stops.
fn events(ctx: &Ctx, w: &mut impl Write, fd: RawFd) -> std::io::Result<()> {
    let sub = ctx.shared.events.subscribe();
    let mut reported = 0;
    loop {
        if ctx.stop.load(Ordering::Relaxed) {
            return write(w, Answer::Fail("the appliance is stopping".into()));
        }
        match sub.rx.recv_timeout(Duration::from_millis(POLL_MS as u64)) {
            Ok(line) => write(w, Answer::Out(line))?,
            Err(RecvTimeoutError::Timeout) => {
                // Nothing to say: has the client gone away?
                if peer_closed(fd) {
                    return Ok(());
                }
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
        let lost = sub.lost.load(Ordering::Relaxed);
        if lost != reported {
            write(
                w,
                Answer::Err(format!(
                    "WARNING: {} events lost: this client reads more slowly than they come",
                    lost - reported
                )),
            )?;
            reported = lost;
        }
    }
}

/// True when the other end of a stream socket has closed it (a peek reads end of file).
fn peer_closed(fd: RawFd) -> bool {
    let mut b = 0u8;
    // SAFETY: a one-byte peek into a byte we own; nothing is consumed.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut b as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
        || (n < 0
            && !matches!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EAGAIN) | Some(libc::EINTR)
            ))
}

/// The connections `filter` selects, in the order they started (the kernel lists in hash
/// order; this order is stable from one listing to the next).
pub fn listed(mut conns: Vec<ConnRef>, filter: &ListFilter) -> Vec<ConnRef> {
    conns.retain(|c| {
        let o = c.orig();
        filter.matches(o.src_ip(), o.dst_ip(), o.proto)
    });
    conns.sort_by_key(|c| c.start());
    conns
}

fn tuple_json(t: &crate::conntrack::tuple::Tuple) -> serde_json::Value {
    let mut v = serde_json::json!({ "src": t.src_ip().to_string(), "dst": t.dst_ip().to_string() });
    if t.is_icmp() {
        v["type"] = t.icmp_type().into();
        v["code"] = t.icmp_code().into();
        v["id"] = t.icmp_id().into();
    } else if crate::conntrack::tuple::has_ports(t.proto) {
        v["sport"] = t.sport().into();
        v["dport"] = t.dport().into();
    }
    v
}

/// One connection as a JSON object on one line: the fields of its `conntrack -L` line.
pub fn conn_json(c: &ConnRef, now: Timestamp) -> String {
    use crate::conntrack::status;
    let o = c.orig();
    let st = c.status();
    let mut v = serde_json::json!({
        "proto": show::l4_name(o.proto, o.l3),
        "protonum": o.proto,
        "timeout": c.timeout_secs(now),
        "original": tuple_json(o),
        "reply": tuple_json(&c.reply()),
        "unreplied": st & status::SEEN_REPLY == 0,
        "assured": st & status::ASSURED != 0,
        "mark": c.mark(),
    });
    if let Some(s) = c.tcp_state() {
        v["state"] = s.name().into();
    }
    if let Some(h) = c.helper() {
        v["helper"] = h.as_str().into();
    }
    v.to_string()
}

/// The ruleset's listing with each `counter` statement showing its rule's live packets and
/// bytes, as `nft list ruleset` shows a running ruleset. A rule's printed line is its
/// `text`, and the listing prints the rules in rule-id order, so each rule's line is found
/// by walking both in step.
pub fn listing_with_counters(c: &Compiled) -> String {
    let mut rules = c.ruleset.rules().peekable();
    let mut out = String::with_capacity(c.listing.len() + 64);
    for line in c.listing.lines() {
        let body = line.trim_start_matches('\t');
        match rules.peek() {
            Some(r) if r.text == body => {
                let live = c
                    .counters
                    .get(r.id as usize)
                    .map(|k| (k[0].load(Ordering::Relaxed), k[1].load(Ordering::Relaxed)));
                out.push_str(&line[..line.len() - body.len()]);
                out.push_str(&match live {
                    Some((p, b)) => with_counter(body, p, b),
                    None => body.to_string(),
                });
                rules.next();
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// `text` with the values of its `counter packets N bytes N` statement replaced.
fn with_counter(text: &str, packets: u64, bytes: u64) -> String {
    const KEY: &str = "counter packets ";
    let Some(at) = text.find(KEY) else {
        return text.to_string();
    };
    let rest = &text[at + KEY.len()..];
    // "N bytes N" then the rest of the rule.
    let mut words = rest.splitn(4, ' ');
    let (Some(_), Some("bytes"), Some(_)) = (words.next(), words.next(), words.next()) else {
        return text.to_string();
    };
    let tail = words.next().map(|t| format!(" {t}")).unwrap_or_default();
    format!(
        "{}counter packets {packets} bytes {bytes}{tail}",
        &text[..at]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_in_the_listing() {
        let loaded = crate::rules::load_str(
            "t.nft",
            "table inet f {\n chain c {\n  type filter hook forward priority 0; policy drop;\n  \
             tcp dport 22 counter accept\n  udp dport 53 accept\n  counter log prefix \"x \" drop\n }\n}\n",
        )
        .unwrap();
        let c = Compiled::new(&loaded).unwrap();
        assert_eq!(listing_with_counters(&c), c.listing);
        c.counters[0][0].store(7, Ordering::Relaxed);
        c.counters[0][1].store(420, Ordering::Relaxed);
        c.counters[1][0].store(3, Ordering::Relaxed);
        c.counters[2][0].store(1, Ordering::Relaxed);
        c.counters[2][1].store(60, Ordering::Relaxed);
        let l = listing_with_counters(&c);
        assert!(
            l.contains("\t\ttcp dport 22 counter packets 7 bytes 420 accept\n"),
            "{l}"
        );
        assert!(l.contains("\t\tudp dport 53 accept\n"), "{l}");
        assert!(
            l.contains("\t\tcounter packets 1 bytes 60 log prefix \"x \" drop\n"),
            "{l}"
        );
        assert_eq!(l.lines().count(), c.listing.lines().count());
    }

    #[test]
    fn every_rule_of_the_examples_is_found_in_its_listing() {
        for f in ["home-router.nft", "office-ftp-sip.nft", "sets-maps.nft"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples")
                .join(f);
            let loaded = crate::rules::load_file(&path).unwrap();
            let c = Compiled::new(&loaded).unwrap();
            for k in &c.counters {
                k[0].store(123_456, Ordering::Relaxed);
            }
            let l = listing_with_counters(&c);
            let counters = c.listing.matches("counter packets").count();
            assert_eq!(
                l.matches("counter packets 123456 ").count(),
                counters,
                "{f}:\n{l}"
            );
        }
    }

    #[test]
    fn the_socket_is_placed_with_its_mode_and_never_over_a_live_one_or_a_file() {
        let dir = std::env::temp_dir().join(format!("ks-ctl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let b = bind(&path, None).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Someone answers there: refused.
        assert!(matches!(bind(&path, None), Err(ControlError::InUse(_))));
        // Nobody answers any more (a killed appliance): the stale socket is replaced.
        drop(b);
        let b = bind(&path, None).unwrap();
        drop(b);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "not a socket").unwrap();
        assert!(matches!(
            bind(&path, None),
            Err(ControlError::NotASocket(_))
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
        assert!(matches!(
            bind(&dir.join("d.sock"), Some("no-such-group-here")),
            Err(ControlError::NoGroup(_))
        ));
        assert!(!dir.join("d.sock").exists());
        // A client that finds nobody says so in words.
        let e = client::Client::connect(&dir.join("none.sock"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("is `keepstate run` running"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_counter_in_the_middle_keeps_the_rest() {
        assert_eq!(
            with_counter("ip saddr 1.2.3.4 counter packets 0 bytes 0 drop", 5, 6),
            "ip saddr 1.2.3.4 counter packets 5 bytes 6 drop"
        );
        assert_eq!(
            with_counter("counter packets 0 bytes 0", 1, 2),
            "counter packets 1 bytes 2"
        );
        assert_eq!(with_counter("accept", 1, 2), "accept");
    }
}
