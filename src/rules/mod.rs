//! The ruleset front end: nftables-syntax text in, a checked and lowered [`ir::Ruleset`] out.
//!
//! `parse` (pest -> spanned [`ast`], includes expanded) -> `check` (names, types, every error
//! at once, into the [`model`]) -> `lower` (model -> [`ir`]). `print` renders the model as
//! `nft list ruleset` does. Only [`ir`], [`source::Diagnostics`] and [`Loaded`] are meant for
//! the layers above.

pub mod ast;
pub mod check;
pub mod ir;
pub mod lower;
pub mod model;
pub mod parse;
pub mod print;
pub mod source;
pub mod types;

use std::path::Path;

use source::{Diagnostics, SourceMap};

/// A ruleset that loaded without errors.
#[derive(Debug)]
pub struct Loaded {
    /// As the user wrote it, checked: what `check --print` prints.
    pub model: model::Model,
    /// What the classifier and engine run.
    pub ruleset: ir::Ruleset,
}

impl Loaded {
    /// The ruleset as `nft list ruleset` would print it.
    pub fn listing(&self) -> String {
        print::print_model(&self.model)
    }
}

/// Loads a rules file (and its includes): parse, check, lower. Every error is returned at once.
pub fn load_file(path: &Path) -> Result<Loaded, Diagnostics> {
    let mut map = SourceMap::default();
    let mut commands = Vec::new();
    let mut diags = Vec::new();
    let name = path.display().to_string();
    parse::parse_path(&mut map, &name, path, &mut commands, &mut diags);
    finish(&map, commands, diags)
}

/// Loads rules from a string, named `name` in diagnostics; includes resolve against the
/// current directory.
pub fn load_str(name: &str, text: &str) -> Result<Loaded, Diagnostics> {
    let mut map = SourceMap::default();
    let mut commands = Vec::new();
    let mut diags = Vec::new();
    parse::parse_text(
        &mut map,
        name,
        Path::new(name),
        text.to_string(),
        0,
        &mut commands,
        &mut diags,
    );
    finish(&map, commands, diags)
}

fn finish(
    map: &SourceMap,
    commands: Vec<ast::Command>,
    mut diags: Vec<source::Diagnostic>,
) -> Result<Loaded, Diagnostics> {
    let (model, check_diags) = check::check(map, commands);
    diags.extend(check_diags);
    if !diags.is_empty() {
        return Err(Diagnostics::sorted(diags));
    }
    let ruleset = lower::lower(&model);
    Ok(Loaded { model, ruleset })
}
