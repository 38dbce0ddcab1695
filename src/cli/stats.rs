//! `keepstate stats`: the running appliance's counters (ports, workers, the engine, the
//! tracker, NAT and helpers) and its ruleset with live rule counters. Wiring only.

use std::path::Path;
use std::process::ExitCode;

use crate::dataplane::control::proto::Request;

pub fn run(path: &Path) -> anyhow::Result<ExitCode> {
    super::ct::call(path, &Request::Stats, false)
}
