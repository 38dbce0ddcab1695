//! `keepstate reload`: asks the running appliance to compile its rules file again and swap
//! it in (as SIGHUP does). Exit status 0: the new ruleset runs; 1: the file was refused (its
//! diagnostics on stderr) and the old ruleset keeps running. Wiring only.

use std::path::Path;
use std::process::ExitCode;

use crate::dataplane::control::proto::Request;

pub fn run(path: &Path) -> anyhow::Result<ExitCode> {
    super::ct::call(path, &Request::Reload, false)
}
