//! Generated views of the [catalog](crate::catalog): the JSON Schema of `kiln.toml` (for
//! editors, via `kiln schema`) and the Markdown reference in `docs/config.md`.

use serde_json::{Map, Value, json};

use crate::catalog::{Field, Kind, ROOT};
use crate::rules::Bounds;

/// Pattern for humane durations: one or more number-unit pairs (`"1h 30m"`).
const DURATION_PATTERN: &str = r"^\s*([0-9]+\s*[a-zA-Zµ]+\s*)+$";
/// Pattern for humane sizes (`"256MiB"`, `"1 GB"`).
const SIZE_PATTERN: &str = r"^\s*[0-9]+(\.[0-9]+)?\s*[A-Za-z]*\s*$";

/// The JSON Schema (draft 2020-12) of `kiln.toml`.
pub fn json_schema() -> Value {
    let mut root = table_schema(ROOT);
    if let Value::Object(o) = &mut root {
        o.insert(
            "$schema".into(),
            json!("https://json-schema.org/draft/2020-12/schema"),
        );
        o.insert("$id".into(), json!("https://kiln.invalid/kiln.schema.json"));
        o.insert("title".into(), json!("kiln.toml"));
        o.insert(
            "description".into(),
            json!("The desired state of one app deployed by kiln."),
        );
    }
    root
}

fn table_schema(fields: &[Field]) -> Value {
    let mut properties = Map::new();
    let mut required = Vec::new();
    for f in fields {
        let mut s = kind_schema(&f.kind);
        if let Value::Object(o) = &mut s {
            o.insert("description".into(), json!(f.doc));
            if let Some(d) = f.default.and_then(default_json) {
                o.insert("default".into(), d);
            }
        }
        properties.insert(f.key.to_owned(), s);
        if f.required {
            required.push(json!(f.key));
        }
    }
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

fn kind_schema(kind: &Kind) -> Value {
    match kind {
        Kind::String => json!({"type": "string"}),
        Kind::Pattern(p) => json!({"type": "string", "pattern": p}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::Integer(Bounds { min, max }) => {
            json!({"type": "integer", "minimum": min, "maximum": max})
        }
        Kind::Positive => json!({"type": "number", "exclusiveMinimum": 0}),
        Kind::Duration => json!({"type": "string", "pattern": DURATION_PATTERN}),
        Kind::Size => json!({"oneOf": [
            {"type": "integer", "minimum": 1},
            {"type": "string", "pattern": SIZE_PATTERN},
        ]}),
        Kind::Enum(options) => json!({"type": "string", "enum": options}),
        Kind::StringList => json!({"type": "array", "items": {"type": "string"}}),
        Kind::StringMap => json!({"type": "object", "additionalProperties": {"type": "string"}}),
        Kind::CountOrPercent => json!({"oneOf": [
            {"type": "integer", "minimum": 0},
            {"type": "string", "pattern": r"^\s*[0-9]+\s*%$"},
        ]}),
        Kind::Ratio => json!({"oneOf": [
            {"type": "number", "minimum": 0, "maximum": 1},
            {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*%$"},
        ]}),
        Kind::Table(fields) => table_schema(fields),
        Kind::TableList(fields) => json!({"type": "array", "items": table_schema(fields)}),
        Kind::PathList(fields) => json!({"type": "array", "items": {"oneOf": [
            {"type": "string"},
            table_schema(fields),
        ]}}),
        Kind::NamedTables(fields) => {
            json!({"type": "object", "additionalProperties": table_schema(fields)})
        }
    }
}

/// A catalog default (a TOML literal) as JSON.
fn default_json(literal: &str) -> Option<Value> {
    if let Some(s) = literal.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        return Some(json!(s));
    }
    match literal {
        "true" => Some(json!(true)),
        "false" => Some(json!(false)),
        n => n.parse::<i64>().ok().map(|n| json!(n)),
    }
}

/// The Markdown reference of every key, as committed in `docs/config.md`.
pub fn reference_markdown() -> String {
    let mut out = String::from(
        "# `kiln.toml` reference\n\n\
         <!-- Generated from crates/spec/src/catalog.rs by `kiln schema --markdown`; \
         a test fails when this file is stale. Regenerate with \
         `UPDATE_EXPECT=1 cargo test -p kiln-spec reference`. -->\n\n\
         Durations are strings such as `\"500ms\"`, `\"10s\"`, `\"2m\"`, `\"1h 30m\"`; sizes are \
         strings such as `\"256MiB\"` or `\"1GiB\"`. Unknown keys are errors. Paths in the file \
         are relative to the directory of `kiln.toml`.\n",
    );
    section(&mut out, "", ROOT, Nesting::Table);
    out
}

/// How a table of fields is nested in its parent.
#[derive(Clone, Copy)]
enum Nesting {
    /// `[a.b]`.
    Table,
    /// `[[a.b]]`.
    TableList,
    /// The inline tables of a [`Kind::PathList`].
    PathList,
    /// The tables of a [`Kind::NamedTables`].
    Named,
}

fn section(out: &mut String, path: &str, fields: &[Field], list: Nesting) {
    out.push('\n');
    match (path.is_empty(), list) {
        (true, _) => out.push_str("## Top level\n\n"),
        (false, Nesting::Table) => out.push_str(&format!("## `[{path}]`\n\n")),
        (false, Nesting::TableList) => out.push_str(&format!("## `[[{path}]]`\n\n")),
        (false, Nesting::PathList) => {
            let (table, key) = path.rsplit_once('.').unwrap_or(("", path));
            out.push_str(&format!(
                "## `[{table}] {key}` items\n\nAn item is a path string, or an inline table of \
                 these keys.\n\n"
            ));
        }
        (false, Nesting::Named) => {
            let (table, key) = path.rsplit_once('.').unwrap_or(("", path));
            out.push_str(&format!(
                "## `[{table}.{key}]` entries\n\nEach `NAME = {{ … }}` is an inline table of \
                 these keys.\n\n"
            ));
        }
    }
    out.push_str("| key | type | default | description |\n| --- | --- | --- | --- |\n");
    let mut nested = Vec::new();
    for f in fields {
        let default = match (f.required, f.default) {
            (true, _) => "required".to_owned(),
            (false, Some(d)) => format!("`{d}`"),
            (false, None) => "—".to_owned(),
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            f.key,
            kind_name(&f.kind),
            default,
            f.doc.replace('|', "\\|")
        ));
        let sub = if path.is_empty() {
            f.key.to_owned()
        } else {
            format!("{path}.{}", f.key)
        };
        match &f.kind {
            Kind::Table(fs) => nested.push((sub, *fs, Nesting::Table)),
            Kind::TableList(fs) => nested.push((sub, *fs, Nesting::TableList)),
            Kind::PathList(fs) => nested.push((sub, *fs, Nesting::PathList)),
            Kind::NamedTables(fs) => nested.push((sub, *fs, Nesting::Named)),
            _ => {}
        }
    }
    for (sub, fs, list) in nested {
        section(out, &sub, fs, list);
    }
}

fn kind_name(kind: &Kind) -> String {
    match kind {
        Kind::String => "string".into(),
        Kind::Pattern(p) => format!("string matching `{p}`"),
        Kind::Bool => "boolean".into(),
        Kind::Integer(Bounds { min, max }) => format!("integer {min}–{max}"),
        Kind::Positive => "number > 0".into(),
        Kind::Duration => "duration".into(),
        Kind::Size => "size".into(),
        Kind::Enum(o) => o
            .iter()
            .map(|o| format!("`\"{o}\"`"))
            .collect::<Vec<_>>()
            .join(" \\| "),
        Kind::StringList => "list of strings".into(),
        Kind::StringMap => "table of strings".into(),
        Kind::CountOrPercent => "integer or `\"N%\"`".into(),
        Kind::Ratio => "fraction or `\"N%\"`".into(),
        Kind::Table(_) => "table".into(),
        Kind::TableList(_) => "array of tables".into(),
        Kind::PathList(_) => "list of paths or tables".into(),
        Kind::NamedTables(_) => "table of tables".into(),
    }
}
