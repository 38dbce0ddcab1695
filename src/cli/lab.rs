//! `keepstate lab up|down|demo|soak`: builds or removes the namespace topology of
//! [`crate::dataplane::lab`] and says how to use it, or runs [`crate::dataplane::demo`] or
//! [`crate::dataplane::soak`] in it. Wiring only.

use std::process::ExitCode;

use crate::dataplane::demo::{self, DemoError};
use crate::dataplane::lab::Lab;
use crate::dataplane::soak::{self, SoakError};

pub fn up(prefix: &str, queues: u32) -> anyhow::Result<ExitCode> {
    let lab = Lab::named(prefix)?;
    lab.up(queues)?;
    print!("{}", lab.usage("examples/lab.toml"));
    if prefix != "ks" {
        println!("  (with --prefix {prefix})");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn down(prefix: &str) -> anyhow::Result<ExitCode> {
    let lab = Lab::named(prefix)?;
    lab.down();
    println!("lab down: removed {}, {} and {}", lab.lan, lab.fw, lab.wan);
    Ok(ExitCode::SUCCESS)
}

/// Exit status of a demo that could not run here (the automake convention for "skipped").
const SKIPPED: u8 = 77;

pub fn demo(prefix: &str, examples: &std::path::Path) -> anyhow::Result<ExitCode> {
    match demo::run(prefix, examples) {
        Ok(s) if s.failed == 0 => Ok(ExitCode::SUCCESS),
        Ok(_) => Ok(ExitCode::from(1)),
        Err(
            e @ (DemoError::NotRoot
            | DemoError::Missing(_)
            | DemoError::NoStart(_)
            | DemoError::NoExamples(_)),
        ) => {
            eprintln!("keepstate: lab demo skipped: {e}");
            Ok(ExitCode::from(SKIPPED))
        }
        Err(DemoError::Interrupted) => {
            eprintln!("keepstate: lab demo interrupted; the lab is removed");
            Ok(ExitCode::from(130))
        }
        Err(e) => Err(e.into()),
    }
}

pub fn soak(
    prefix: &str,
    examples: &std::path::Path,
    rules: &std::path::Path,
    minutes: f64,
    every: Option<u64>,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        minutes > 0.0 && minutes <= 24.0 * 60.0,
        "--minutes must be more than 0 and at most a day"
    );
    let every = std::time::Duration::from_secs(every.unwrap_or((minutes * 3.0) as u64).max(5));
    match soak::run(
        prefix,
        examples,
        rules,
        minutes,
        every,
        &mut std::io::stdout(),
    ) {
        Ok(r) if r.passed() => Ok(ExitCode::SUCCESS),
        Ok(_) => Ok(ExitCode::from(1)),
        Err(e @ (SoakError::NotRoot | SoakError::Missing(_) | SoakError::NoExamples(_))) => {
            eprintln!("keepstate: lab soak skipped: {e}");
            Ok(ExitCode::from(SKIPPED))
        }
        Err(SoakError::Interrupted) => {
            eprintln!("keepstate: lab soak interrupted; the lab is removed");
            Ok(ExitCode::from(130))
        }
        Err(e) => Err(e.into()),
    }
}
