//! Source files, spans and diagnostics: everything needed to say `file:line:col: message`,
//! show the line and put a caret under the column.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A byte range in one loaded file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Span {
    pub file: u32,
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn new(file: u32, start: usize, end: usize) -> Self {
        Span {
            file,
            start: start as u32,
            end: end as u32,
        }
    }
}

#[derive(Debug)]
pub struct SourceFile {
    /// The path as the user named it (or as an include resolved it).
    pub name: Arc<str>,
    pub path: PathBuf,
    pub text: String,
    /// Byte offset of the start of every line.
    line_starts: Vec<usize>,
}

impl SourceFile {
    pub fn new(name: &str, path: &Path, text: String) -> Self {
        let mut line_starts = vec![0];
        for (i, b) in text.bytes().enumerate() {
            if b == b'\n' {
                line_starts.push(i + 1);
            }
        }
        SourceFile {
            name: Arc::from(name),
            path: path.to_path_buf(),
            text,
            line_starts,
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (u32, u32) {
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1) - 1;
        let start = self.line_starts[line];
        let end = offset.min(self.text.len());
        let col = self.text.get(start..end).map_or(0, |s| s.chars().count());
        (line as u32 + 1, col as u32 + 1)
    }

    /// The text of a 1-based line, without its newline.
    pub fn line_text(&self, line: u32) -> &str {
        let i = (line as usize).saturating_sub(1);
        let start = self.line_starts.get(i).copied().unwrap_or(self.text.len());
        let end = self
            .line_starts
            .get(i + 1)
            .map_or(self.text.len(), |e| e.saturating_sub(1));
        self.text
            .get(start..end.max(start))
            .unwrap_or("")
            .trim_end_matches('\r')
    }
}

/// Every file loaded for one ruleset (the main file and its includes).
#[derive(Debug, Default)]
pub struct SourceMap {
    pub files: Vec<SourceFile>,
}

impl SourceMap {
    pub fn add(&mut self, file: SourceFile) -> u32 {
        self.files.push(file);
        (self.files.len() - 1) as u32
    }

    pub fn file(&self, id: u32) -> &SourceFile {
        &self.files[id as usize]
    }

    pub fn text(&self, span: Span) -> &str {
        let f = self.file(span.file);
        f.text
            .get(span.start as usize..span.end as usize)
            .unwrap_or("")
    }

    /// `file:line:col` of a span's start.
    pub fn loc(&self, span: Span) -> crate::rules::ir::SourceLoc {
        let f = self.file(span.file);
        let (line, col) = f.line_col(span.start as usize);
        crate::rules::ir::SourceLoc {
            file: f.name.clone(),
            line,
            col,
        }
    }
}

/// One error in a rules file, in the user's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: Arc<str>,
    pub line: u32,
    pub col: u32,
    /// The span's length in characters on its line (at least 1), for the carets.
    pub width: u32,
    pub message: String,
    /// The source line the error is on.
    pub source_line: String,
}

impl Diagnostic {
    pub fn at(map: &SourceMap, span: Span, message: impl Into<String>) -> Self {
        let f = map.file(span.file);
        let (line, col) = f.line_col(span.start as usize);
        let (eline, ecol) = f.line_col(span.end as usize);
        let width = if eline == line && ecol > col {
            ecol - col
        } else {
            1
        };
        Diagnostic {
            file: f.name.clone(),
            line,
            col,
            width,
            message: message.into(),
            source_line: f.line_text(line).to_string(),
        }
    }

    /// A diagnostic about a file as a whole (it cannot be read, ...).
    pub fn whole_file(name: &str, message: impl Into<String>) -> Self {
        Diagnostic {
            file: Arc::from(name),
            line: 0,
            col: 0,
            width: 0,
            message: message.into(),
            source_line: String::new(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            return writeln!(f, "{}: {}", self.file, self.message);
        }
        writeln!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )?;
        // Tabs are kept so the caret lines up under the same tab stops.
        let pad: String = self
            .source_line
            .chars()
            .take(self.col.saturating_sub(1) as usize)
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        writeln!(f, "{}", self.source_line)?;
        writeln!(f, "{}{}", pad, "^".repeat(self.width.max(1) as usize))
    }
}

/// Every diagnostic of a failed load, sorted by position.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn sorted(mut v: Vec<Diagnostic>) -> Self {
        v.sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
        v.dedup();
        Diagnostics(v)
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_and_caret() {
        let mut map = SourceMap::default();
        let id = map.add(SourceFile::new(
            "a.nft",
            Path::new("a.nft"),
            "table ip t {\n\tchain c {\n\t\tjump web\n\t}\n}\n".into(),
        ));
        let start = map.file(id).text.find("web").unwrap();
        let d = Diagnostic::at(&map, Span::new(id, start, start + 3), "unknown chain `web`");
        assert_eq!((d.line, d.col, d.width), (3, 8, 3));
        assert_eq!(
            d.to_string(),
            "a.nft:3:8: unknown chain `web`\n\t\tjump web\n\t\t     ^^^\n"
        );
    }
}
