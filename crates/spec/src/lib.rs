//! `kiln.toml`: the whole desired state of one app, validated once at the door.
//!
//! [`Spec::parse`] runs two passes over the text — [`decode`] checks every key against the
//! [`catalog`] and converts values, [`validate`] applies the rules that give them meaning — and
//! returns either a [`Spec`] that the rest of kiln trusts without re-checking, or a
//! [`Report`] with *every* problem found, each with its place and a hint.
//!
//! **API boundary:** this crate reads the spec file and checks that the files it names exist;
//! it does no other I/O and knows nothing of images, instances or routes.

mod catalog;
mod decode;
mod diag;
pub mod rules;
mod schema;
mod types;
mod validate;

use std::path::{Path, PathBuf};

pub use catalog::{Field, Kind, NAME_PATTERN, SECCOMP, STRATEGIES};
pub use diag::{Diagnostic, DiagnosticJson, Position, Report};
pub use rules::normalised_absolute;
pub use schema::{json_schema, reference_markdown};
pub use types::*;

/// Why a spec file could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// The file could not be read.
    Read {
        /// The path as given.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file was read and has problems.
    Invalid(Report),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Read { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            LoadError::Invalid(r) => {
                let n = r.diagnostics.len();
                write!(
                    f,
                    "{} has {n} problem{}",
                    r.file,
                    if n == 1 { "" } else { "s" }
                )
            }
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadError::Read { source, .. } => Some(source),
            LoadError::Invalid(_) => None,
        }
    }
}

impl PolicySpec {
    /// Validates the daemon's policy file: `source`, shown as `file`, with key paths
    /// relative to `dir`. A file without `[policy]` asks for nothing.
    pub fn parse(source: &str, file: &str, dir: &Path) -> Result<PolicySpec, Report> {
        let mut diags = Vec::new();
        let policy = decode::decode_with(source, catalog::DAEMON_POLICY, &mut diags).map(|tree| {
            let mut v = validate::Validator {
                dir,
                diags: Vec::new(),
            };
            let policy = v.daemon_policy(&tree);
            diags.extend(v.diags);
            policy
        });
        match policy {
            Some(p) if diags.is_empty() => Ok(p),
            _ => Err(Report::new(file.to_owned(), source.to_owned(), diags)),
        }
    }
}

impl Spec {
    /// Validates `source`, the text of the file shown to the user as `file`; relative paths
    /// in it are resolved against `dir`.
    pub fn parse(source: &str, file: &str, dir: &Path) -> Result<Spec, Report> {
        let mut diags = Vec::new();
        let spec = decode::decode(source, &mut diags).map(|tree| {
            let mut v = validate::Validator {
                dir,
                diags: Vec::new(),
            };
            let spec = v.spec(&tree);
            diags.extend(v.diags);
            spec
        });
        match spec {
            Some(spec) if diags.is_empty() => Ok(spec),
            _ => Err(Report::new(file.to_owned(), source.to_owned(), diags)),
        }
    }

    /// Reads and validates the spec file at `path`.
    pub fn load(path: &Path) -> Result<Spec, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file = path.display().to_string();
        let source = match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                let text = String::from_utf8_lossy(e.as_bytes()).into_owned();
                return Err(LoadError::Invalid(Report::new(
                    file,
                    text,
                    vec![Diagnostic::new(
                        "",
                        Some(at..at),
                        "the file is not valid UTF-8".to_owned(),
                    )],
                )));
            }
        };
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        Spec::parse(&source, &file, &dir).map_err(LoadError::Invalid)
    }
}
