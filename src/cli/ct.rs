//! `keepstate ct list|events|count|flush|expect`: the live connection table of a running
//! appliance, through its control socket, printed as the conntrack tool prints it. Also the
//! client wiring `reload` and `stats` share ([`call`]). Wiring only.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::{Config, Dataplane};
use crate::dataplane::control::client::{Client, End};
use crate::dataplane::control::proto::{Answer, ListFilter, Request};

/// Where the control socket is: `--control`, else the `--config` file's `[dataplane]
/// control`, else the configuration's default (/run/keepstate.sock).
pub fn control_path(control: Option<PathBuf>, config: Option<&Path>) -> anyhow::Result<PathBuf> {
    Ok(match (control, config) {
        (Some(p), _) => p,
        (None, Some(c)) => Config::load(c)?.dataplane.control,
        (None, None) => Dataplane::default().control,
    })
}

/// Sends `req` to the appliance at `path`; `out` lines go to stdout (flushed at once when
/// `stream`), `err` lines to stderr. Exit status 0 when the appliance says `ok`, 1 when it
/// refuses (its reason on stderr).
pub fn call(path: &Path, req: &Request, stream: bool) -> anyhow::Result<ExitCode> {
    let mut collect = |_: &str| {};
    call_with(path, req, stream, &mut collect)
}

fn call_with(
    path: &Path,
    req: &Request,
    stream: bool,
    json: &mut dyn FnMut(&str),
) -> anyhow::Result<ExitCode> {
    let client = Client::connect(path)?;
    let stdout = std::io::stdout();
    let json_mode = matches!(req, Request::CtList { json: true, .. });
    let end = client.call(req, |a| {
        match a {
            Answer::Out(l) if json_mode => json(l),
            Answer::Out(l) => {
                let mut o = stdout.lock();
                writeln!(o, "{l}")?;
                if stream {
                    o.flush()?;
                }
            }
            Answer::Err(l) => eprintln!("{l}"),
            Answer::Ok | Answer::Fail(_) => {}
        }
        Ok(())
    })?;
    Ok(match end {
        End::Ok => ExitCode::SUCCESS,
        End::Failed(m) => {
            eprintln!("keepstate: {m}");
            ExitCode::from(1)
        }
    })
}

/// `ct list`: `conntrack -L` lines (the summary on stderr), or with `json` one JSON array.
pub fn list(path: &Path, filter: ListFilter, json: bool) -> anyhow::Result<ExitCode> {
    let req = Request::CtList { filter, json };
    if !json {
        return call(path, &req, false);
    }
    let mut objects = Vec::new();
    let code = call_with(path, &req, false, &mut |l| objects.push(l.to_string()))?;
    if code == ExitCode::SUCCESS {
        if objects.is_empty() {
            println!("[]");
        } else {
            println!("[\n  {}\n]", objects.join(",\n  "));
        }
    }
    Ok(code)
}

pub fn events(path: &Path) -> anyhow::Result<ExitCode> {
    call(path, &Request::CtEvents, true)
}

pub fn count(path: &Path) -> anyhow::Result<ExitCode> {
    call(path, &Request::CtCount, false)
}

pub fn flush(path: &Path) -> anyhow::Result<ExitCode> {
    call(path, &Request::CtFlush, false)
}

pub fn expect(path: &Path) -> anyhow::Result<ExitCode> {
    call(path, &Request::CtExpect, false)
}
