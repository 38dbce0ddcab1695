//! `keepstate check [--print] FILE...`: each file parsed, checked and compiled, as `run` and
//! `reload` would.

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
                // What `run` does next: a ruleset the checker passes but the decision tree
                // cannot be built from is refused here, not at start.
                if let Err(e) = crate::engine::Compiled::new(&loaded) {
                    ok = false;
                    eprintln!("{}: {e}", f.display());
                    continue;
                }
                for w in crate::engine::kernel_differences(&loaded.ruleset) {
                    eprintln!("{}: warning: {w}", f.display());
                }
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
