//! The ruleset front end: nftables-syntax text in, a checked and lowered [`ir::Ruleset`] out.

pub mod ir;
