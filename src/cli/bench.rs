//! `keepstate bench classify`: builds the decision tree for a ruleset and measures it against
//! the rule-by-rule reference in the same run (see `classify::bench`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use crate::classify::{bench, classbench};

pub fn classify(
    rules: Option<&Path>,
    cb: Option<&PathBuf>,
    trace: Option<&Path>,
    packets: usize,
) -> anyhow::Result<ExitCode> {
    let ruleset = match (rules, cb) {
        (Some(r), None) => match crate::rules::load_file(r) {
            Ok(l) => l.ruleset,
            Err(d) => {
                eprint!("{d}");
                return Ok(ExitCode::from(1));
            }
        },
        (None, Some(c)) => {
            let rules =
                classbench::load(c).with_context(|| format!("cannot load {}", c.display()))?;
            classbench::to_ruleset(&c.display().to_string(), &rules)
        }
        _ => anyhow::bail!("give exactly one of --rules FILE or --classbench FILE"),
    };
    let stdout = std::io::stdout();
    bench::bench_classify(&ruleset, trace, packets, &mut stdout.lock())?;
    Ok(ExitCode::SUCCESS)
}
