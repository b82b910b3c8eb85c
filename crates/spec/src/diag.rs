//! Diagnostics: what is wrong with a `kiln.toml`, where, and what to do about it.
//!
//! Every problem found in one run is collected (the decoder never stops at the first), then
//! sorted by position. A [`Report`] renders them for a person (a source snippet with a marker,
//! via `miette`) or as data (`--json`).

use std::fmt;
use std::ops::Range;

use serde::Serialize;

/// One problem in a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The dotted key the problem is about (`service.port`), empty for the file as a whole.
    pub key: String,
    /// What is wrong, lowercase, no trailing period.
    pub message: String,
    /// Byte range in the source, when there is one to point at.
    pub span: Option<Range<usize>>,
    /// What to do about it.
    pub hint: Option<String>,
}

impl Diagnostic {
    pub(crate) fn new(key: &str, span: Option<Range<usize>>, message: String) -> Diagnostic {
        Diagnostic {
            key: key.to_owned(),
            message,
            span,
            hint: None,
        }
    }

    pub(crate) fn with_hint(mut self, hint: impl Into<String>) -> Diagnostic {
        self.hint = Some(hint.into());
        self
    }
}

/// A 1-based line and column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Position {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
}

/// All the problems found in one spec file, with the source they point into.
#[derive(Debug, Clone)]
pub struct Report {
    /// The file name as the user gave it.
    pub file: String,
    /// The file's text (empty when it could not be read).
    pub source: String,
    /// The problems, in source order.
    pub diagnostics: Vec<Diagnostic>,
}

/// The `--json` form of one diagnostic.
#[derive(Debug, Serialize)]
pub struct DiagnosticJson<'a> {
    /// File name.
    pub file: &'a str,
    /// 1-based line, when the problem has a place.
    pub line: Option<usize>,
    /// 1-based column, when the problem has a place.
    pub column: Option<usize>,
    /// Dotted key.
    pub key: &'a str,
    /// What is wrong.
    pub message: &'a str,
    /// What to do.
    pub hint: Option<&'a str>,
}

impl Report {
    pub(crate) fn new(file: String, source: String, mut diagnostics: Vec<Diagnostic>) -> Report {
        diagnostics.sort_by_key(|d| d.span.as_ref().map_or((0, 0), |s| (s.start, s.end)));
        diagnostics.dedup();
        Report {
            file,
            source,
            diagnostics,
        }
    }

    /// The line and column of a byte offset in the source.
    pub fn position(&self, offset: usize) -> Position {
        let offset = offset.min(self.source.len());
        // Spans come from the TOML parser and fall on character boundaries; clamp anyway.
        let before = self.source.get(..offset).unwrap_or(&self.source);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Position { line, column }
    }

    /// The diagnostics as data, one object each.
    pub fn to_json(&self) -> Vec<DiagnosticJson<'_>> {
        self.diagnostics
            .iter()
            .map(|d| {
                let pos = d.span.as_ref().map(|s| self.position(s.start));
                DiagnosticJson {
                    file: &self.file,
                    line: pos.map(|p| p.line),
                    column: pos.map(|p| p.column),
                    key: &d.key,
                    message: &d.message,
                    hint: d.hint.as_deref(),
                }
            })
            .collect()
    }

    /// Renders every diagnostic with its source snippet, for a terminal or a log.
    pub fn render(&self, color: bool) -> String {
        let theme = if color {
            miette::GraphicalTheme::unicode()
        } else {
            miette::GraphicalTheme::unicode_nocolor()
        };
        let handler = miette::GraphicalReportHandler::new_themed(theme).with_context_lines(1);
        let mut out = String::new();
        for d in &self.diagnostics {
            let shown = Shown {
                report: self,
                diag: d,
                full: false,
            };
            if handler.render_report(&mut out, &shown).is_err() {
                // Rendering into a String only fails on a formatter bug; fall back to one line.
                out.push_str(&shown.to_string());
                out.push('\n');
            }
        }
        out
    }
}

impl fmt::Display for Report {
    /// One line per problem: `file:line:column: key: message`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.diagnostics {
            writeln!(
                f,
                "{}",
                Shown {
                    report: self,
                    diag: d,
                    full: true,
                }
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Report {}

/// One diagnostic bound to its report, so miette can render it with the source.
struct Shown<'a> {
    report: &'a Report,
    diag: &'a Diagnostic,
    /// With place and hint (one-line form); without, when miette shows both itself.
    full: bool,
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.diag;
        match &d.span {
            Some(_) if !self.full => {}
            Some(s) => {
                let p = self.report.position(s.start);
                write!(f, "{}:{}:{}: ", self.report.file, p.line, p.column)?;
            }
            None => write!(f, "{}: ", self.report.file)?,
        }
        if !d.key.is_empty() {
            write!(f, "{}: ", d.key)?;
        }
        f.write_str(&d.message)?;
        match &d.hint {
            Some(h) if self.full => write!(f, " ({h})")?,
            _ => {}
        }
        Ok(())
    }
}

impl fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Shown<'_> {}

impl miette::Diagnostic for Shown<'_> {
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.diag
            .hint
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.diag
            .span
            .as_ref()
            .map(|_| self as &dyn miette::SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        let span = self.diag.span.clone()?;
        let len = span.end.saturating_sub(span.start);
        Some(Box::new(std::iter::once(miette::LabeledSpan::new(
            Some("here".to_owned()),
            span.start,
            len,
        ))))
    }
}

impl miette::SourceCode for Shown<'_> {
    fn read_span<'a>(
        &'a self,
        span: &miette::SourceSpan,
        context_lines_before: usize,
        context_lines_after: usize,
    ) -> Result<Box<dyn miette::SpanContents<'a> + 'a>, miette::MietteError> {
        let inner =
            self.report
                .source
                .read_span(span, context_lines_before, context_lines_after)?;
        Ok(Box::new(miette::MietteSpanContents::new_named(
            self.report.file.clone(),
            inner.data(),
            *inner.span(),
            inner.line(),
            inner.column(),
            inner.line_count(),
        )))
    }
}
