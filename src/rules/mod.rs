//! The ruleset front end: nftables-syntax text in, a checked and lowered [`ir::Ruleset`] out.
//!
//! `parse` (pest -> spanned [`ast`]) -> `check` (names, types, every error at once) ->
//! `lower` (checked model -> [`ir`]). `print` renders the checked model as `nft list ruleset`.

pub mod ast;
pub mod ir;
pub mod parse;
pub mod source;
