//! The command line: one file per subcommand, each only wiring the library together.

mod check;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// keepstate: a stateful edge firewall with nftables syntax and Linux conntrack semantics.
#[derive(Parser, Debug)]
#[command(name = "keepstate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check rules files; print every error as file:line:col with the line and a caret.
    Check {
        /// Print the ruleset as `nft list ruleset` would after `nft -f FILE`.
        #[arg(long)]
        print: bool,
        /// Rules files in nftables syntax.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check { print, files } => check::run(&files, print),
    }
}
