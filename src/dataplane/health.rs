//! Health of the dataplane: a worker that dies or gets stuck, and a port whose frames no
//! longer reach the workers, are reported, never silently lost.
//!
//! ```text
//!  worker w, every turn of its loop (at least every 100 ms when idle):  beat = now
//!  worker w's thread, when it ends:  ending = Stopped (asked to) | Died(panic message)
//!  start, once every socket is bound:  per port, the id of the XDP program that steers its
//!                                      frames to the sockets (ours, or libxdp's)
//!  main loop, every tick:    Shared::health()      -> [Health]   -> Supervisor::observe
//!             every second:  Shared::watch_ports() -> [Steering] -> Supervisor::observe_ports
//!                                 (bpf_xdp_query)        -> log lines
//!                                                        -> cli/run.rs: exit, or keep going
//!  keepstate stats:  "worker 1: stuck 5.2s; rx ..."   "worker 1: died: MESSAGE; rx ..."
//!                    "port lan (lan): XDP program 42; rx ..."
//!                    "port lan (lan): bypassed: XDP program 42 detached; rx ..."
//! ```
//!
//! A worker that blocks anywhere (a lock, a syscall, a loop in the engine) stops beating, so
//! one heartbeat covers "no progress while its rings have work" and "no heartbeat for N
//! seconds" alike: an idle worker wakes from poll(2) every 100 ms and beats then too.
//!
//! A worker that beats but receives nothing is healthy as far as its heartbeat goes; the way
//! that happens on a real box is its port's XDP program going away: an operator's `ip link
//! set dev lan xdp off`, or another tool attaching its own program. Then the port's frames
//! go to the kernel's stack (forwarded or dropped by it) or to that program, bypassing the
//! firewall, so the program's id is watched too: any other id, or none, fails the port.
//!
//! The test knob [`FAULT_ENV`] makes a worker panic or stall on purpose, so the reports can
//! be shown live (`tests/netns_reliability.rs`); unset, it costs a worker one predictable
//! branch per turn of its loop (not per frame).
//!
//! Owns what a heartbeat and a changed program id mean, and the words of the reports; asks
//! the kernel nothing (the queries are [`super::iface`]'s). What the appliance does about a
//! failure (exit, or keep going) is `cli/run.rs`'s, by `[dataplane] worker_failure`.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

/// Nanoseconds per second, for the reports' durations.
const NS: u64 = 1_000_000_000;

/// What the main loop knows of one worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// It beat within the stall timeout.
    Running,
    /// Its thread is alive but has not beaten for this long (past the stall timeout).
    Stuck { for_ns: u64 },
    /// Its thread ended without being asked to: a panic (its message), or its loop returned.
    Died(String),
    /// It ended because the appliance is stopping.
    Stopped,
}

impl Health {
    /// Whether the worker's queues have gone unserved.
    pub fn failed(&self) -> bool {
        matches!(self, Health::Stuck { .. } | Health::Died(_))
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Health::Running => f.write_str("running"),
            Health::Stuck { for_ns } => write!(f, "stuck {}", secs(*for_ns)),
            Health::Died(m) => write!(f, "died: {m}"),
            Health::Stopped => f.write_str("stopped"),
        }
    }
}

/// `5.2s`.
fn secs(ns: u64) -> String {
    format!("{:.1}s", ns as f64 / NS as f64)
}

/// How a worker thread ended, as its thread records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    Stopped,
    Died(String),
}

/// Records a worker's ending where the main loop reads it.
pub type Recorder = Arc<dyn Fn(Ending) + Send + Sync>;

thread_local! {
    /// Where this thread records its ending, if it is a worker ([`record_panics_in`]).
    static ENDING: std::cell::RefCell<Option<Recorder>> = const { std::cell::RefCell::new(None) };
}

/// Makes a panic of the calling thread record `Died(message)` through `record` as soon as it
/// starts, before the panic's report is printed: printing a backtrace can take seconds (a
/// debug build symbolises it), and a worker stops beating meanwhile, so the main loop would
/// call a dying worker stuck. Installs, once per process, a panic hook that does this ahead
/// of the hook that was there.
pub fn record_panics_in(record: Recorder) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let earlier = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // `try_with`: a panic while the thread's locals are torn down has none.
            let record = ENDING.try_with(|e| e.borrow().clone()).ok().flatten();
            if let Some(record) = record {
                record(Ending::Died(panic_message(info.payload())));
            }
            earlier(info);
        }));
    });
    ENDING.with(|e| *e.borrow_mut() = Some(record));
}

/// The text of a panic's payload, on one line (it is shown in `stats` and log lines).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    let text = if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.as_str()
    } else {
        "a panic without a message"
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The health of a worker from its record: how it ended, if it did; else from the age of
/// its last heartbeat.
pub fn judge(ending: Option<&Ending>, beat: u64, now: u64, stall_timeout_ns: u64) -> Health {
    match ending {
        Some(Ending::Stopped) => Health::Stopped,
        Some(Ending::Died(m)) => Health::Died(m.clone()),
        None => match now.saturating_sub(beat) {
            age if age >= stall_timeout_ns => Health::Stuck { for_ns: age },
            _ => Health::Running,
        },
    }
}

/// What the main loop knows of one port: whether the XDP program that hands its frames to
/// the workers' sockets is still the one that did when they started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Steering {
    /// Program `id` still runs there.
    Steered { id: u32 },
    /// Program `was` is gone: program `now` runs instead, or none (0). The port's frames go
    /// to the kernel's stack or to that program, not to the workers.
    Bypassed { was: u32, now: u32 },
    /// The kernel could not say which program runs (the interface is gone?).
    Unknown { was: u32, reason: String },
}

impl Steering {
    /// Whether the port's frames may bypass the workers.
    pub fn failed(&self) -> bool {
        !matches!(self, Steering::Steered { .. })
    }
}

impl fmt::Display for Steering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Steering::Steered { id } => write!(f, "XDP program {id}"),
            Steering::Bypassed { was, now: 0 } => {
                write!(f, "bypassed: XDP program {was} detached")
            }
            Steering::Bypassed { was, now } => {
                write!(f, "bypassed: XDP program {was} replaced by {now}")
            }
            Steering::Unknown { reason, .. } => {
                write!(
                    f,
                    "unknown: the kernel cannot say which XDP program runs ({reason})"
                )
            }
        }
    }
}

/// A port's steering from the id of the program that steered its frames when the workers
/// started (`was`) and the id that steers them now (0: none), or why the kernel could not
/// say.
pub fn judge_port(was: u32, now: Result<u32, String>) -> Steering {
    match now {
        Ok(id) if id == was && id != 0 => Steering::Steered { id },
        Ok(now) => Steering::Bypassed { was, now },
        Err(reason) => Steering::Unknown { was, reason },
    }
}

/// What the supervisor last said of a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Said {
    Nothing,
    Stuck { at: u64 },
    Died,
}

/// Turns the workers' health and the ports' steering into log lines: one when a worker gets
/// stuck, recovers or dies, and while it stays stuck a reminder every
/// [`Supervisor::REMIND_NS`], so a stuck worker cannot flood the log; one when a port's
/// program changes (detached, replaced, back).
#[derive(Debug)]
pub struct Supervisor {
    said: Vec<Said>,
    /// Per port: the failure last said, if any.
    ports: Vec<Option<Steering>>,
}

impl Supervisor {
    /// How often a worker that stays stuck is mentioned again.
    pub const REMIND_NS: u64 = 30 * NS;

    pub fn new(workers: usize, ports: usize) -> Supervisor {
        Supervisor {
            said: vec![Said::Nothing; workers],
            ports: vec![None; ports],
        }
    }

    /// The lines to log at `now` for `health` (one per worker); `queues[w]` names what worker
    /// w serves (`lan/1 wan/1`).
    pub fn observe(&mut self, now: u64, health: &[Health], queues: &[String]) -> Vec<String> {
        let mut lines = Vec::new();
        for (w, (h, said)) in health.iter().zip(&mut self.said).enumerate() {
            let q = queues.get(w).map_or("", String::as_str);
            match (h, *said) {
                (Health::Stuck { for_ns }, Said::Nothing) => {
                    lines.push(format!(
                        "worker {w} is stuck: no heartbeat for {}; its queues {q} are not served",
                        secs(*for_ns)
                    ));
                    *said = Said::Stuck { at: now };
                }
                (Health::Stuck { for_ns }, Said::Stuck { at })
                    if now.saturating_sub(at) >= Self::REMIND_NS =>
                {
                    lines.push(format!(
                        "worker {w} is still stuck: no heartbeat for {}",
                        secs(*for_ns)
                    ));
                    *said = Said::Stuck { at: now };
                }
                (Health::Running, Said::Stuck { .. }) => {
                    lines.push(format!("worker {w} runs again"));
                    *said = Said::Nothing;
                }
                (Health::Died(m), Said::Nothing | Said::Stuck { .. }) => {
                    lines.push(format!(
                        "worker {w} died: {m}; its queues {q} are not served"
                    ));
                    *said = Said::Died;
                }
                _ => {}
            }
        }
        lines
    }

    /// The lines to log for `steering` (one per port); `ports[p]` is port p's name and
    /// interface.
    pub fn observe_ports(
        &mut self,
        steering: &[Steering],
        ports: &[(String, String)],
    ) -> Vec<String> {
        let id = |id: u32| match id {
            0 => "none".to_string(),
            id => format!("id {id}"),
        };
        let mut lines = Vec::new();
        for ((s, said), (name, interface)) in steering.iter().zip(&mut self.ports).zip(ports) {
            let what = match s {
                Steering::Steered { id } => match said.take() {
                    Some(_) => format!(
                        "keepstate's XDP program (id {id}) runs again: its frames reach the \
                         workers"
                    ),
                    None => continue,
                },
                _ if said.as_ref() == Some(s) => continue,
                Steering::Bypassed { was, now } => format!(
                    "keepstate's XDP program was {} (was {}, now {}): its frames bypass the \
                     workers",
                    if *now == 0 { "detached" } else { "replaced" },
                    id(*was),
                    id(*now)
                ),
                Steering::Unknown { was, reason } => format!(
                    "the kernel cannot say whether keepstate's XDP program ({}) still runs \
                     ({reason}): its frames may bypass the workers",
                    id(*was)
                ),
            };
            if s.failed() {
                *said = Some(s.clone());
            }
            lines.push(format!("port {name} (interface {interface}): {what}"));
        }
        lines
    }
}

/// The test knob: `KEEPSTATE_TEST_FAULT=W:panic@MS` makes worker W panic, `W:stall@MS` makes
/// it stop beating for good (it sleeps and ignores the stop flag, as a thread caught in a
/// deadlock would), MS milliseconds after it starts; several, separated by commas.
pub const FAULT_ENV: &str = "KEEPSTATE_TEST_FAULT";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    Panic,
    Stall,
}

/// A fault for one worker to act out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    /// After this long from the worker's start.
    pub after_ns: u64,
}

impl Fault {
    /// Acts the fault out in worker `w`: never returns.
    pub fn act(&self, w: usize) -> ! {
        match self.kind {
            FaultKind::Panic => panic!("worker {w} panics as {FAULT_ENV} asks"),
            FaultKind::Stall => {
                eprintln!("keepstate: worker {w} stalls for good as {FAULT_ENV} asks");
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
        }
    }
}

/// Each worker's fault from the knob's value (`None`: no fault).
pub fn parse_faults(spec: &str, workers: usize) -> Result<Vec<Option<Fault>>, String> {
    let mut faults = vec![None; workers];
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = || format!("{FAULT_ENV}: `{item}` is not W:panic@MS or W:stall@MS");
        let (w, rest) = item.split_once(':').ok_or_else(bad)?;
        let (kind, ms) = rest.split_once('@').ok_or_else(bad)?;
        let w: usize = w.parse().map_err(|_| bad())?;
        let kind = match kind {
            "panic" => FaultKind::Panic,
            "stall" => FaultKind::Stall,
            _ => return Err(bad()),
        };
        let ms: u64 = ms.parse().map_err(|_| bad())?;
        let slot = faults
            .get_mut(w)
            .ok_or_else(|| format!("{FAULT_ENV}: there is no worker {w} ({workers} run)"))?;
        *slot = Some(Fault {
            kind,
            after_ns: ms.saturating_mul(1_000_000),
        });
    }
    Ok(faults)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_older_than_the_timeout_is_stuck() {
        let t = 5 * NS;
        assert_eq!(judge(None, 10 * NS, 14 * NS, t), Health::Running);
        assert_eq!(
            judge(None, 10 * NS, 15 * NS + NS / 5, t),
            Health::Stuck {
                for_ns: 5 * NS + NS / 5
            }
        );
        assert_eq!(
            judge(None, 10 * NS, 15 * NS + NS / 5, t).to_string(),
            "stuck 5.2s"
        );
        let died = Ending::Died("boom".into());
        assert_eq!(judge(Some(&died), 0, 100 * NS, t).to_string(), "died: boom");
        assert_eq!(
            judge(Some(&Ending::Stopped), 0, 100 * NS, t),
            Health::Stopped
        );
        // A beat from a clock read just after `now` is not an age.
        assert_eq!(judge(None, 11 * NS, 10 * NS, t), Health::Running);
    }

    #[test]
    fn the_supervisor_says_each_change_once_and_reminds_rarely() {
        let mut s = Supervisor::new(2, 0);
        let q = vec!["lan/0 wan/0".to_string(), "lan/1 wan/1".to_string()];
        let stuck = |s: u64| Health::Stuck { for_ns: s * NS };
        assert!(s
            .observe(NS, &[Health::Running, Health::Running], &q)
            .is_empty());
        let l = s.observe(6 * NS, &[Health::Running, stuck(5)], &q);
        assert_eq!(
            l,
            ["worker 1 is stuck: no heartbeat for 5.0s; its queues lan/1 wan/1 are not served"]
        );
        // Every tick while it stays stuck: silence, then one reminder after 30 s.
        for t in 7..36 {
            assert!(s
                .observe(t * NS, &[Health::Running, stuck(t - 1)], &q)
                .is_empty());
        }
        let l = s.observe(36 * NS, &[Health::Running, stuck(35)], &q);
        assert_eq!(l, ["worker 1 is still stuck: no heartbeat for 35.0s"]);
        let l = s.observe(37 * NS, &[Health::Running, Health::Running], &q);
        assert_eq!(l, ["worker 1 runs again"]);
        let died = Health::Died("worker 0 panics".into());
        let l = s.observe(38 * NS, &[died.clone(), Health::Running], &q);
        assert_eq!(
            l,
            ["worker 0 died: worker 0 panics; its queues lan/0 wan/0 are not served"]
        );
        assert!(s.observe(99 * NS, &[died, Health::Stopped], &q).is_empty());
    }

    #[test]
    fn a_port_whose_program_changed_is_bypassed() {
        assert_eq!(judge_port(42, Ok(42)), Steering::Steered { id: 42 });
        assert_eq!(
            judge_port(42, Ok(0)),
            Steering::Bypassed { was: 42, now: 0 }
        );
        assert_eq!(
            judge_port(42, Ok(57)),
            Steering::Bypassed { was: 42, now: 57 }
        );
        // No program at the start is no program.
        assert!(judge_port(0, Ok(0)).failed());
        let gone = judge_port(42, Err("No such device".into()));
        assert!(gone.failed());
        assert!(!judge_port(42, Ok(42)).failed());
        assert_eq!(judge_port(42, Ok(42)).to_string(), "XDP program 42");
        assert_eq!(
            judge_port(42, Ok(0)).to_string(),
            "bypassed: XDP program 42 detached"
        );
        assert_eq!(
            judge_port(42, Ok(57)).to_string(),
            "bypassed: XDP program 42 replaced by 57"
        );
        assert_eq!(
            gone.to_string(),
            "unknown: the kernel cannot say which XDP program runs (No such device)"
        );
    }

    #[test]
    fn the_supervisor_says_each_change_of_a_ports_program_once() {
        let mut s = Supervisor::new(1, 2);
        let ports = [
            ("lan".to_string(), "eth1".to_string()),
            ("wan".to_string(), "eth0".to_string()),
        ];
        let (lan, wan) = (Steering::Steered { id: 42 }, Steering::Steered { id: 43 });
        assert!(s
            .observe_ports(&[lan.clone(), wan.clone()], &ports)
            .is_empty());
        let off = Steering::Bypassed { was: 42, now: 0 };
        let l = s.observe_ports(&[off.clone(), wan.clone()], &ports);
        assert_eq!(
            l,
            [
                "port lan (interface eth1): keepstate's XDP program was detached (was id 42, \
              now none): its frames bypass the workers"
            ]
        );
        // Said once, however many seconds it lasts.
        for _ in 0..5 {
            assert!(s
                .observe_ports(&[off.clone(), wan.clone()], &ports)
                .is_empty());
        }
        // Another tool attaches its own: a change, said.
        let other = Steering::Bypassed { was: 42, now: 57 };
        let l = s.observe_ports(&[other, wan.clone()], &ports);
        assert_eq!(
            l,
            [
                "port lan (interface eth1): keepstate's XDP program was replaced (was id 42, \
              now id 57): its frames bypass the workers"
            ]
        );
        let gone = Steering::Unknown {
            was: 43,
            reason: "No such device".into(),
        };
        let l = s.observe_ports(&[lan.clone(), gone], &ports);
        assert_eq!(
            l,
            [
                "port lan (interface eth1): keepstate's XDP program (id 42) runs again: its \
                 frames reach the workers",
                "port wan (interface eth0): the kernel cannot say whether keepstate's XDP \
                 program (id 43) still runs (No such device): its frames may bypass the workers"
            ]
        );
    }

    #[test]
    fn a_worker_panic_is_recorded_as_it_starts() {
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = got.clone();
        let ended = std::thread::spawn(move || {
            record_panics_in(Arc::new(move |e| g.lock().unwrap().push(e)));
            panic!("worker 3 panics\n  on two lines");
        })
        .join();
        assert!(ended.is_err());
        assert_eq!(
            *got.lock().unwrap(),
            [Ending::Died("worker 3 panics on two lines".into())]
        );
        // A thread that did not ask records nothing.
        let ended = std::thread::spawn(|| panic!("not a worker")).join();
        assert!(ended.is_err());
        assert_eq!(got.lock().unwrap().len(), 1);
    }

    #[test]
    fn panic_messages_on_one_line() {
        let p: Box<dyn Any + Send> = Box::new("static\nmessage");
        assert_eq!(panic_message(&*p), "static message");
        let p: Box<dyn Any + Send> = Box::new(format!("index {} out of range", 7));
        assert_eq!(panic_message(&*p), "index 7 out of range");
        let p: Box<dyn Any + Send> = Box::new(7u8);
        assert_eq!(panic_message(&*p), "a panic without a message");
    }

    #[test]
    fn the_fault_knob() {
        let f = parse_faults("1:stall@2000, 0:panic@0", 2).unwrap();
        assert_eq!(
            f,
            [
                Some(Fault {
                    kind: FaultKind::Panic,
                    after_ns: 0
                }),
                Some(Fault {
                    kind: FaultKind::Stall,
                    after_ns: 2 * NS
                })
            ]
        );
        assert_eq!(parse_faults("", 2).unwrap(), [None, None]);
        assert!(parse_faults("2:panic@0", 2)
            .unwrap_err()
            .contains("no worker 2"));
        assert!(parse_faults("1:explode@0", 2)
            .unwrap_err()
            .contains("`1:explode@0` is not"));
        assert!(parse_faults("1:panic", 2).is_err());
    }
}
