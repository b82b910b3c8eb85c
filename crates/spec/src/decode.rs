//! The first pass: a parsed TOML tree checked against the [catalog](crate::catalog).
//!
//! Every key is looked up in the catalog (unknown keys get a "did you mean"), every value is
//! checked against its [`Kind`] and converted (durations, sizes, percentages), and absent keys
//! with a default get the default decoded by the same code. Errors are collected, never
//! returned early: a bad key leaves a hole in the tree and the walk goes on.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::catalog::{Field, Kind, ROOT};
use crate::diag::Diagnostic;
use crate::rules::{self, Bounds};
use crate::types::CountOrPercent;

pub(crate) type Span = Range<usize>;

/// A value that passed its kind's check.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    Str(String),
    Bool(bool),
    Int(i64),
    Num(f64),
    Duration(Duration),
    Size(u64),
    List(Vec<(String, Span)>),
    Map(Vec<(String, String, Span)>),
    CountOrPercent(CountOrPercent),
    Ratio(f64),
    Table(Table),
    Tables(Vec<Table>),
    Paths(Vec<PathItem>),
    /// A [`Kind::NamedTables`]: each name the user wrote, where, and its table.
    Named(Vec<(String, Span, Table)>),
}

/// One item of a [`Kind::PathList`]: a path, written alone or in a table with more fields.
#[derive(Debug, Clone)]
pub(crate) struct PathItem {
    pub path: String,
    /// Where the path string is.
    pub span: Span,
    /// The item's table when it was written as one (its `path` is checked to be there).
    pub table: Option<Table>,
}

/// One present (or defaulted) key.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Where the value is; for a default, the enclosing table.
    pub span: Span,
    /// True when the user did not write the key.
    pub defaulted: bool,
    pub value: Value,
}

/// A checked table: only catalog keys, only values of the right kind.
#[derive(Debug, Clone, Default)]
pub(crate) struct Table {
    /// Dotted path, `""` for the top level, `image.copy[2]` inside arrays.
    pub path: String,
    pub span: Span,
    pub entries: BTreeMap<&'static str, Entry>,
}

impl Table {
    pub fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }
}

/// Parses `source` as TOML and checks it against the catalog.
pub(crate) fn decode(source: &str, diags: &mut Vec<Diagnostic>) -> Option<Table> {
    decode_with(source, ROOT, diags)
}

/// Parses `source` as TOML and checks it against the table `root` (a file other than
/// `kiln.toml` that shares its syntax: the daemon's policy file).
pub(crate) fn decode_with(
    source: &str,
    root: &'static [Field],
    diags: &mut Vec<Diagnostic>,
) -> Option<Table> {
    let (doc, errors) = DeTable::parse_recoverable(source);
    if !errors.is_empty() {
        for e in errors {
            let message = e.message().trim_end_matches('\n').to_owned();
            diags.push(Diagnostic::new(
                "",
                e.span(),
                format!("invalid TOML: {message}"),
            ));
        }
        return None;
    }
    let span = doc.span();
    Some(decode_table("", root, doc.get_ref(), span, diags))
}

fn decode_table(
    path: &str,
    fields: &'static [Field],
    table: &DeTable<'_>,
    span: Span,
    diags: &mut Vec<Diagnostic>,
) -> Table {
    let mut out = Table {
        path: path.to_owned(),
        span: span.clone(),
        entries: BTreeMap::new(),
    };
    for (key, value) in table {
        let name = key.get_ref().as_ref();
        let key_span = key.span();
        let Some(field) = fields.iter().find(|f| f.key == name) else {
            diags.push(unknown_key(&out, name, key_span, fields));
            continue;
        };
        let key_path = out.key_path(name);
        if let Some(v) = decode_value(&key_path, &field.kind, value, diags) {
            out.entries.insert(
                field.key,
                Entry {
                    span: value.span(),
                    defaulted: false,
                    value: v,
                },
            );
        }
    }
    for field in fields {
        if table.contains_key(field.key) {
            continue;
        }
        if field.required {
            let header = if path.is_empty() {
                "the top level".to_owned()
            } else {
                format!("[{path}]")
            };
            let at = if path.is_empty() { 0..0 } else { span.clone() };
            diags.push(
                Diagnostic::new(
                    &out.key_path(field.key),
                    Some(at),
                    format!("missing required key `{}` in {header}", field.key),
                )
                .with_hint(hint_from_doc(field.doc)),
            );
        } else if let Some(literal) = field.default {
            // Defaults go through the same decoder as user input, so the catalog's text and
            // the value kiln uses cannot disagree.
            if let Ok(parsed) = DeValue::parse(literal) {
                let mut scratch = Vec::new();
                if let Some(v) =
                    decode_value(&out.key_path(field.key), &field.kind, &parsed, &mut scratch)
                {
                    out.entries.insert(
                        field.key,
                        Entry {
                            span: span.clone(),
                            defaulted: true,
                            value: v,
                        },
                    );
                }
            }
        }
    }
    out
}

/// A table holding only the defaults of `fields`, for a section the user left out.
pub(crate) fn defaults_table(
    path: &str,
    fields: &'static [Field],
    diags: &mut Vec<Diagnostic>,
) -> Table {
    decode_table(path, fields, &DeTable::new(), 0..0, diags)
}

fn unknown_key(table: &Table, name: &str, span: Span, fields: &[Field]) -> Diagnostic {
    let where_ = if table.path.is_empty() {
        "at the top level".to_owned()
    } else {
        format!("in [{}]", table.path)
    };
    let d = Diagnostic::new(
        &table.key_path(name),
        Some(span),
        format!("unknown key `{name}` {where_}"),
    );
    if let Some(best) = closest(name, fields.iter().map(|f| f.key)) {
        return d.with_hint(format!("did you mean `{best}`?"));
    }
    if let Some(home) = home_of(name) {
        return d.with_hint(format!("`{name}` belongs in [{home}]"));
    }
    let known: Vec<&str> = fields.iter().map(|f| f.key).collect();
    d.with_hint(format!("known keys here: {}", known.join(", ")))
}

/// The known key closest to `name`, when it is close enough to be a typo.
pub(crate) fn closest<'a>(name: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.len() / 3).max(1);
    known
        .map(|k| (strsim::damerau_levenshtein(name, k), k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// The table path that does know `name`, for keys written in the wrong section.
fn home_of(name: &str) -> Option<String> {
    fn walk(path: &str, fields: &[Field], name: &str) -> Option<String> {
        for f in fields {
            if let Kind::Table(sub)
            | Kind::TableList(sub)
            | Kind::PathList(sub)
            | Kind::NamedTables(sub) = &f.kind
            {
                let p = if path.is_empty() {
                    f.key.to_owned()
                } else {
                    format!("{path}.{}", f.key)
                };
                if sub.iter().any(|s| s.key == name) {
                    return Some(p);
                }
                if let Some(found) = walk(&p, sub, name) {
                    return Some(found);
                }
            }
        }
        None
    }
    walk("", ROOT, name)
}

fn type_error(key: &str, span: Span, want: &str, got: &DeValue<'_>) -> Diagnostic {
    Diagnostic::new(
        key,
        Some(span),
        format!("expected {want}, found {}", got.type_str()),
    )
}

fn int_of(v: &DeValue<'_>) -> Option<i64> {
    let i = v.as_integer()?;
    i64::from_str_radix(i.as_str(), i.radix()).ok()
}

fn float_of(v: &DeValue<'_>) -> Option<f64> {
    let f = v.as_float()?;
    f.as_str().replace('_', "").parse::<f64>().ok()
}

fn decode_value(
    key: &str,
    kind: &'static Kind,
    value: &Spanned<DeValue<'_>>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Value> {
    let span = value.span();
    let v = value.get_ref();
    let bad = |diags: &mut Vec<Diagnostic>, msg: String, hint: Option<&str>| {
        let mut d = Diagnostic::new(key, Some(span.clone()), msg);
        if let Some(h) = hint {
            d = d.with_hint(h);
        }
        diags.push(d);
        None
    };
    match kind {
        Kind::String | Kind::Pattern(_) => match v.as_str() {
            Some(s) => Some(Value::Str(s.to_owned())),
            None => {
                diags.push(type_error(key, span, "a string", v));
                None
            }
        },
        Kind::Bool => match v.as_bool() {
            Some(b) => Some(Value::Bool(b)),
            None => {
                diags.push(type_error(key, span, "`true` or `false`", v));
                None
            }
        },
        Kind::Integer(bounds) => match int_of(v) {
            Some(i) => match bounds.check(i) {
                Ok(()) => Some(Value::Int(i)),
                Err(b) => bad(diags, b.message, None),
            },
            None if v.is_integer() => {
                let Bounds { min, max } = bounds;
                bad(diags, format!("must be between {min} and {max}"), None)
            }
            None => {
                diags.push(type_error(key, span, "a whole number", v));
                None
            }
        },
        Kind::Positive => match int_of(v).map(|i| i as f64).or_else(|| float_of(v)) {
            Some(n) => match rules::positive(n) {
                Ok(()) => Some(Value::Num(n)),
                Err(b) => bad(diags, b.message, None),
            },
            None => {
                diags.push(type_error(key, span, "a number", v));
                None
            }
        },
        Kind::Duration => match v.as_str() {
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) => match rules::duration(d) {
                    Ok(()) => Some(Value::Duration(d)),
                    Err(b) => bad(diags, b.message, None),
                },
                Err(e) => bad(
                    diags,
                    format!("invalid duration {s:?}: {e}"),
                    Some("write a number and a unit, e.g. \"500ms\", \"10s\", \"2m\", \"1h\""),
                ),
            },
            None => bad(
                diags,
                format!("expected a duration string, found {}", v.type_str()),
                Some("write a number and a unit in quotes, e.g. \"10s\""),
            ),
        },
        Kind::Size => {
            if let Some(i) = int_of(v) {
                return match rules::size(i) {
                    // Positive, so the same number.
                    Ok(()) => Some(Value::Size(i.unsigned_abs())),
                    Err(b) => bad(diags, b.message, None),
                };
            }
            match v.as_str() {
                Some(s) => match s.trim().parse::<bytesize::ByteSize>() {
                    Ok(b) if b.as_u64() > 0 => Some(Value::Size(b.as_u64())),
                    Ok(_) => bad(diags, "must be greater than zero".to_owned(), None),
                    Err(_) => bad(
                        diags,
                        format!("invalid size {s:?}"),
                        Some("write a number and a unit, e.g. \"256MiB\", \"1GiB\""),
                    ),
                },
                None => {
                    diags.push(type_error(key, span, "a size such as \"256MiB\"", v));
                    None
                }
            }
        }
        Kind::Enum(options) => match v.as_str() {
            Some(s) if options.contains(&s) => Some(Value::Str(s.to_owned())),
            Some(s) => {
                let hint =
                    closest(s, options.iter().copied()).map(|b| format!("did you mean {b:?}?"));
                bad(
                    diags,
                    format!("unknown value {s:?}, expected one of {}", quoted(options)),
                    hint.as_deref(),
                )
            }
            None => {
                diags.push(type_error(
                    key,
                    span,
                    &format!("one of {}", quoted(options)),
                    v,
                ));
                None
            }
        },
        Kind::StringList => match v.as_array() {
            Some(items) => {
                let mut out = Vec::new();
                let mut ok = true;
                for item in items.iter() {
                    match item.get_ref().as_str() {
                        Some(s) => out.push((s.to_owned(), item.span())),
                        None => {
                            diags.push(type_error(key, item.span(), "a string", item.get_ref()));
                            ok = false;
                        }
                    }
                }
                ok.then_some(Value::List(out))
            }
            None => bad(
                diags,
                format!("expected a list of strings, found {}", v.type_str()),
                Some("write it as [\"a\", \"b\"]"),
            ),
        },
        Kind::StringMap => match v.as_table() {
            Some(t) => {
                let mut out = Vec::new();
                let mut ok = true;
                for (k, item) in t {
                    match item.get_ref().as_str() {
                        Some(s) => out.push((k.get_ref().to_string(), s.to_owned(), k.span())),
                        None => {
                            let sub = format!("{key}.{}", k.get_ref());
                            diags.push(
                                type_error(&sub, item.span(), "a string", item.get_ref())
                                    .with_hint("quote the value, e.g. \"1\""),
                            );
                            ok = false;
                        }
                    }
                }
                ok.then_some(Value::Map(out))
            }
            None => {
                diags.push(type_error(key, span, "a table of strings", v));
                None
            }
        },
        Kind::CountOrPercent => {
            if let Some(i) = int_of(v) {
                return match u32::try_from(i) {
                    Ok(n) => Some(Value::CountOrPercent(CountOrPercent::Count(n))),
                    Err(_) => bad(diags, format!("must be 0 or more, got {i}"), None),
                };
            }
            match v.as_str().map(percent) {
                Some(Some(p)) if p <= 100.0 && p.fract() == 0.0 => {
                    Some(Value::CountOrPercent(CountOrPercent::Percent(p as u8)))
                }
                _ => bad(
                    diags,
                    "expected a whole number or a whole percentage such as \"25%\"".to_owned(),
                    None,
                ),
            }
        }
        Kind::Ratio => {
            let n = int_of(v).map(|i| i as f64).or_else(|| float_of(v));
            let r = match (n, v.as_str()) {
                (Some(n), _) => Some(n),
                (None, Some(s)) => percent(s).map(|p| p / 100.0),
                _ => None,
            };
            match r.map(|r| (r, rules::ratio(r))) {
                Some((r, Ok(()))) => Some(Value::Ratio(r)),
                Some((_, Err(b))) => bad(
                    diags,
                    format!("{} (or between \"0%\" and \"100%\")", b.message),
                    None,
                ),
                None => bad(
                    diags,
                    format!(
                        "expected a fraction or a percentage, found {}",
                        v.type_str()
                    ),
                    Some("write 0.01 or \"1%\""),
                ),
            }
        }
        Kind::Table(fields) => match v.as_table() {
            Some(t) => Some(Value::Table(decode_table(key, fields, t, span, diags))),
            None => {
                diags.push(type_error(key, span, "a table", v));
                None
            }
        },
        Kind::PathList(fields) => match v.as_array() {
            Some(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    if let Some(s) = item.get_ref().as_str() {
                        out.push(PathItem {
                            path: s.to_owned(),
                            span: item.span(),
                            table: None,
                        });
                        continue;
                    }
                    let path = format!("{key}[{i}]");
                    let Some(t) = item.get_ref().as_table() else {
                        diags.push(
                            type_error(&path, item.span(), "a path or a table", item.get_ref())
                                .with_hint(
                                    "write \"/tmp\" or { path = \"/tmp\", size = \"64MiB\" }",
                                ),
                        );
                        continue;
                    };
                    let table = decode_table(&path, fields, t, item.span(), diags);
                    // A missing `path` was reported by `decode_table`: the item is a hole.
                    if let Some(Entry {
                        value: Value::Str(p),
                        span,
                        ..
                    }) = table.entries.get("path")
                    {
                        out.push(PathItem {
                            path: p.clone(),
                            span: span.clone(),
                            table: Some(table.clone()),
                        });
                    }
                }
                Some(Value::Paths(out))
            }
            None => bad(
                diags,
                format!("expected a list of paths, found {}", v.type_str()),
                Some("write it as [\"/tmp\", { path = \"/var/cache\", size = \"256MiB\" }]"),
            ),
        },
        Kind::NamedTables(fields) => match v.as_table() {
            Some(t) => {
                let mut out = Vec::new();
                for (name, item) in t {
                    let path = format!("{key}.{}", name.get_ref());
                    match item.get_ref().as_table() {
                        Some(sub) => out.push((
                            name.get_ref().to_string(),
                            name.span(),
                            decode_table(&path, fields, sub, item.span(), diags),
                        )),
                        None => {
                            diags.push(type_error(&path, item.span(), "a table", item.get_ref()))
                        }
                    }
                }
                Some(Value::Named(out))
            }
            None => {
                diags.push(type_error(key, span, "a table of tables", v));
                None
            }
        },
        Kind::TableList(fields) => match v.as_array() {
            Some(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let path = format!("{key}[{i}]");
                    match item.get_ref().as_table() {
                        Some(t) => out.push(decode_table(&path, fields, t, item.span(), diags)),
                        None => {
                            diags.push(type_error(&path, item.span(), "a table", item.get_ref()))
                        }
                    }
                }
                Some(Value::Tables(out))
            }
            None => bad(
                diags,
                format!("expected an array of tables, found {}", v.type_str()),
                Some(&format!("write each entry as [[{key}]]")),
            ),
        },
    }
}

/// The first sentence of a catalog doc, as a lowercase hint without a trailing period.
fn hint_from_doc(doc: &str) -> String {
    let first = doc.split(". ").next().unwrap_or(doc).trim_end_matches('.');
    let mut chars = first.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// `"25%"` → 25.0.
fn percent(s: &str) -> Option<f64> {
    let n: f64 = s.trim().strip_suffix('%')?.trim().parse().ok()?;
    (n >= 0.0 && n.is_finite()).then_some(n)
}

fn quoted(options: &[&str]) -> String {
    options
        .iter()
        .map(|o| format!("{o:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}
