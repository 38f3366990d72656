//! Configuration problems with their file, line and column, and the collector
//! that gathers every problem of a load before it is reported.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One problem found in a configuration file. Lines and columns are 1-based;
/// columns count characters, not bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Every error and warning of one load. A load that returns this has at least
/// one error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl fmt::Display for Diagnostics {
    /// Writes one line per problem, errors first, warnings prefixed with
    /// `warning: `.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for error in &self.errors {
            writeln!(f, "{error}")?;
        }
        for warning in &self.warnings {
            writeln!(f, "warning: {warning}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// The file position of a configuration item, kept so that later stages can
/// report problems at the item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: Arc<Path>,
    pub line: usize,
    pub column: usize,
}

impl Origin {
    /// Returns the origin of items built in code rather than read from a file.
    pub fn unknown() -> Self {
        Origin {
            file: Arc::from(Path::new("<built-in>")),
            line: 1,
            column: 1,
        }
    }

    /// Returns a diagnostic at this origin.
    pub fn diagnostic(&self, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: self.file.to_path_buf(),
            line: self.line,
            column: self.column,
            message: message.into(),
        }
    }
}

impl Default for Origin {
    fn default() -> Self {
        Origin::unknown()
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// The text of one file read, used to turn byte offsets into lines and columns.
pub(crate) struct SourceText {
    pub path: Arc<Path>,
    pub text: String,
    line_starts: Vec<usize>,
}

impl SourceText {
    pub fn new(path: &Path, text: String) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(at, _)| at + 1));
        SourceText {
            path: Arc::from(path),
            text,
            line_starts,
        }
    }

    /// Returns the origin of the byte at `offset`; an offset past the end
    /// points after the last character.
    pub fn origin_at(&self, offset: usize) -> Origin {
        let offset = offset.min(self.text.len());
        let line_index = self.line_starts.partition_point(|&start| start <= offset) - 1;
        let line_start = self.line_starts[line_index];
        let column = self
            .text
            .get(line_start..offset)
            .map_or(offset - line_start, |prefix| prefix.chars().count());
        Origin {
            file: self.path.clone(),
            line: line_index + 1,
            column: column + 1,
        }
    }

    pub fn origin(&self, span: &Range<usize>) -> Origin {
        self.origin_at(span.start)
    }

    /// Returns the origin of the file itself, for problems without a position.
    pub fn start(&self) -> Origin {
        self.origin_at(0)
    }
}

/// Collects errors and warnings while a load goes on.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl Report {
    pub fn error(&mut self, at: &Origin, message: impl Into<String>) {
        self.errors.push(at.diagnostic(message));
    }

    pub fn warning(&mut self, at: &Origin, message: impl Into<String>) {
        self.warnings.push(at.diagnostic(message));
    }

    /// Ends a load that cannot go on: everything reported so far.
    pub fn into_diagnostics(self) -> Diagnostics {
        Diagnostics {
            errors: self.errors,
            warnings: self.warnings,
        }
    }

    /// Ends the load: the value when nothing failed, every problem otherwise.
    pub fn finish<T>(self, value: T) -> Result<(T, Vec<Diagnostic>), Diagnostics> {
        if self.errors.is_empty() {
            Ok((value, self.warnings))
        } else {
            Err(Diagnostics {
                errors: self.errors,
                warnings: self.warnings,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_counts_lines_and_characters_from_one() {
        let source = SourceText::new(Path::new("g.toml"), "a = 1\nname = \"é\" x\n".into());
        let at = source.origin_at(source.text.find('x').unwrap());
        assert_eq!(at.line, 2);
        assert_eq!(at.column, 12);
        assert_eq!(source.origin_at(0).to_string(), "g.toml:1:1");
    }

    #[test]
    fn diagnostic_displays_file_line_column_message() {
        let diagnostic = Diagnostic {
            file: PathBuf::from("rules/acme.toml"),
            line: 7,
            column: 13,
            message: "allow[2].device: unknown device".into(),
        };
        assert_eq!(
            diagnostic.to_string(),
            "rules/acme.toml:7:13: allow[2].device: unknown device"
        );
    }
}
