//! `keepstate check [--print] FILE...`

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::rules;

pub fn run(files: &[PathBuf], print: bool) -> anyhow::Result<ExitCode> {
    let mut ok = true;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for f in files {
        match rules::load_file(f) {
            Ok(loaded) => {
                if print {
                    out.write_all(loaded.listing().as_bytes())?;
                }
            }
            Err(diags) => {
                ok = false;
                eprint!("{diags}");
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
