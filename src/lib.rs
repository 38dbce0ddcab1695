//! keepstate: a stateful edge firewall with nftables syntax and Linux conntrack semantics.
//!
//! The layers, top to bottom; each may call only the ones below it:
//!
//! ```text
//!   cli        clap subcommands; wires the library together, holds no policy
//!   rules      rules file -> pest -> spanned AST -> checked -> lowered IR (rules::ir)
//!   classify   IR -> decision tree; `linear` is the obviously-right reference it is tested against
//! ```
//!
//! Data flows one way: text -> AST -> IR -> classifier. `rules` exports the IR and the
//! diagnostics; pest's `Rule` type never leaves `rules::parse`. `classify` knows the IR and a
//! packet's fields, never the parser.

pub mod classify;
pub mod rules;
