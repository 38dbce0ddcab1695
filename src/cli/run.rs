//! `keepstate run --config FILE`: the live appliance. Wiring only: loads the configuration
//! and the rules, builds the engine, starts the dataplane's workers, and turns signals into
//! actions: SIGHUP reloads the rules file (compiled here, off the workers' path; on an error
//! the diagnostics are printed and the old ruleset keeps running), SIGUSR1 prints the
//! counters, SIGTERM and SIGINT stop. It opens the control socket (`keepstate reload`, `ct`,
//! `stats`), whose reload is the same as SIGHUP's. Between signals it runs the tracker's
//! expiry, publishes DESTROY events, and watches the workers' health and, once a second, the
//! ports' XDP programs: a worker that died or is stuck, and a port whose program was
//! detached or replaced (its frames bypass the workers), are logged, and with
//! `worker_failure = "exit"` (the default) the appliance exits with status 1 for its
//! supervisor to restart it; with `"report"` it keeps going and exits with 1 when stopped
//! if a failure remains.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::{Config, WorkerFailure};
use crate::dataplane::health::Supervisor;
use crate::dataplane::{self, control};
use crate::engine::{Compiled, Engine};
use crate::rules;

/// How often the main thread looks at the signals and runs a step of expiry.
const TICK: Duration = Duration::from_millis(50);
/// A pass of the tracker's GC is spread over this many ticks (2 s); passes start 1-60 s
/// apart, as the kernel paces them (`Table::gc_paced`).
const TICKS_PER_GC_PASS: usize = 40;
/// How often the ports' XDP programs are checked.
const PORT_CHECK: Duration = Duration::from_secs(1);

fn compile(path: &Path) -> anyhow::Result<Compiled> {
    let loaded = rules::load_file(path).map_err(|d| anyhow::anyhow!("{}:\n{d}", path.display()))?;
    let compiled = Compiled::new(&loaded)?;
    for w in crate::engine::kernel_differences(&loaded.ruleset) {
        eprintln!("keepstate: warning: {}: {w}", path.display());
    }
    Ok(compiled)
}

pub fn run(config: &Path) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(config)?;
    let rules_path = cfg.rules.clone().with_context(|| {
        format!(
            "{} names no rules file (add `rules = \"FILE.nft\"`)",
            config.display()
        )
    })?;
    let compiled = compile(&rules_path)?;
    let plan = dataplane::plan(&cfg)?;
    // A statistics slot per worker; destroyed connections kept for `keepstate ct events`
    // (the main loop below takes them every tick).
    let engine = Arc::new(Engine::with_compiled(&cfg, compiled, plan.workers()));

    // One reload at a time, whether a signal or the control socket asks.
    let reload: Arc<control::ReloadFn> = {
        let (engine, path, lock) = (engine.clone(), rules_path.clone(), Mutex::new(()));
        Arc::new(move || {
            let _one = lock.lock().unwrap_or_else(|p| p.into_inner());
            match compile(&path) {
                Ok(c) => {
                    engine.reload(c);
                    let msg = format!("reloaded {}", path.display());
                    eprintln!("keepstate: {msg}");
                    Ok(msg)
                }
                Err(e) => {
                    let e = format!("{e:#}");
                    eprintln!("keepstate: reload failed, keeping the old ruleset: {e}");
                    Err(e)
                }
            }
        })
    };
    let control_path = &cfg.dataplane.control;
    let bound = control::bind(control_path, cfg.dataplane.control_group.as_deref())
        .with_context(|| format!("control socket {}", control_path.display()))?;

    let hup = Arc::new(AtomicBool::new(false));
    let usr1 = Arc::new(AtomicBool::new(false));
    let term = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, usr1.clone())?;
    for s in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(s, term.clone())?;
    }

    let running = match dataplane::start(plan, engine.clone()) {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(control_path);
            return Err(e.into());
        }
    };
    let shared = running.shared.clone();
    let server = match control::serve(bound, shared.clone(), reload.clone()) {
        Ok(s) => s,
        Err(e) => {
            running.stop();
            let _ = std::fs::remove_file(control_path);
            return Err(e.into());
        }
    };
    for w in &running.warnings {
        eprintln!("keepstate: warning: {w}");
    }
    for (w, queues) in shared.worker_queues.iter().enumerate() {
        eprintln!("keepstate: worker {w}: queues {queues}");
    }
    eprintln!(
        "keepstate: running ({:?} mode, {} ports, rules {}, control {}); SIGHUP reloads the rules, SIGUSR1 prints counters",
        cfg.dataplane.mode,
        shared.ports.len(),
        rules_path.display(),
        server.path().display()
    );

    let buckets = engine
        .tracker()
        .table()
        .buckets()
        .div_ceil(TICKS_PER_GC_PASS)
        .max(1);
    let mut supervisor = Supervisor::new(shared.worker_stats.len(), shared.ports.len());
    let port_names: Vec<(String, String)> = shared
        .ports
        .iter()
        .map(|p| (p.name.clone(), p.interface.clone()))
        .collect();
    let mut steering = Vec::new();
    let mut failed = false;
    let (mut last_tick, mut last_port_check) = (Instant::now(), Instant::now());
    while !term.load(Ordering::Relaxed) {
        std::thread::sleep(TICK);
        // The ticks due since the last: more than one when the sleep overslept (a loaded box,
        // or a virtual machine whose host stops it: one here overslept 50 ms sleeps by up to
        // 0.3 s), so that expiry keeps to the clock; at most a whole gc pass.
        let woke = Instant::now();
        let due = ((woke - last_tick).as_nanos() / TICK.as_nanos())
            .clamp(1, TICKS_PER_GC_PASS as u128) as usize;
        last_tick = woke;
        if hup.swap(false, Ordering::Relaxed) {
            // Its outcome is printed by the reload itself.
            let _ = reload();
        }
        if usr1.swap(false, Ordering::Relaxed) {
            eprint!("{}", shared.render_stats());
        }
        engine.housekeeping_paced(shared.now(), buckets * due);
        // A slice of the flowtable gc a tick due (one of its 20, so a pass a second, as the
        // kernel's): it looks at the flows due to expire, which first take what the XDP fast
        // path counted for them, and at the start of a pass for the flows of removed
        // connections.
        for _ in 0..due.min(crate::conntrack::flowtable::GC_SLICES) {
            shared.flow_gc();
        }
        shared.publish_destroyed();
        let health = shared.health();
        for line in supervisor.observe(shared.now().0, &health, &shared.worker_queues) {
            eprintln!("keepstate: {line}");
        }
        if woke - last_port_check >= PORT_CHECK {
            last_port_check = woke;
            steering = shared.watch_ports();
            for line in supervisor.observe_ports(&steering, &port_names) {
                eprintln!("keepstate: {line}");
            }
        }
        failed = health.iter().any(|h| h.failed()) || steering.iter().any(|s| s.failed());
        if failed && cfg.dataplane.worker_failure == WorkerFailure::Exit {
            eprintln!(
                "keepstate: exiting with status 1 (worker_failure = \"exit\"): a supervisor \
                 such as systemd starts the appliance again"
            );
            break;
        }
    }
    server.stop();
    running.stop();
    eprint!("{}", shared.render_stats());
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
