//! `keepstate lab up|down`: builds or removes the namespace topology of
//! [`crate::dataplane::lab`] and says how to use it. Wiring only.

use std::process::ExitCode;

use crate::dataplane::lab::Lab;

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
