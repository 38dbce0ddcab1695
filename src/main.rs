//! The `keepstate` command: clap parsing only; each subcommand lives in `keepstate::cli`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = keepstate::cli::Cli::parse();
    match keepstate::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keepstate: {e:#}");
            ExitCode::from(2)
        }
    }
}
