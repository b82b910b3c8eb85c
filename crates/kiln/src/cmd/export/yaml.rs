//! A small YAML emitter for JSON values: block style, two-space indents, keys in the order
//! the value holds them.
//!
//! kiln needs YAML only to print manifests, so rather than a serializer crate it writes the
//! JSON data model in YAML's block syntax. The one hard part is scalars: a string is written
//! plain only when every YAML 1.1 and 1.2 reader sees it as that same string (letters,
//! digits and `_ . / -`, starting with a letter, `_` or `/`, and none of the words YAML 1.1
//! reads as a boolean or null), else double-quoted with escapes for everything a reader
//! could fold or reject. So `on`, `yes`, `1.0`, `0755`, `null`, `a: b` and `# c` stay
//! strings. A float is always written with a `.` so that YAML 1.1 readers (which want one)
//! read a float too.

use serde_json::Value;

/// A multi-document stream: `comment` lines first (each prefixed `# `), then each value as a
/// document opened by `---`.
pub fn stream(comment: &[String], documents: &[Value]) -> String {
    let mut out = String::new();
    for line in comment {
        if line.is_empty() {
            out.push_str("#\n");
        } else {
            // A comment runs to the end of its line: a line break inside one would start
            // YAML again, so each one is cut there.
            for part in line.split(['\n', '\r']) {
                out.push_str("# ");
                out.push_str(part);
                out.push('\n');
            }
        }
    }
    for doc in documents {
        out.push_str("---\n");
        document(&mut out, doc);
    }
    out
}

/// One document's body (a top-level scalar or empty collection on its own line).
fn document(out: &mut String, value: &Value) {
    match value {
        Value::Object(map) if !map.is_empty() => mapping(out, map, 0),
        Value::Array(items) if !items.is_empty() => sequence(out, items, 0),
        other => {
            out.push_str(&inline(other));
            out.push('\n');
        }
    }
}

/// A block mapping whose keys start at column `indent`.
fn mapping(out: &mut String, map: &serde_json::Map<String, Value>, indent: usize) {
    for (key, value) in map {
        pad(out, indent);
        out.push_str(&scalar_string(key));
        out.push(':');
        after_key(out, value, indent);
    }
}

/// What follows `key:` or `- key:`: an inline value, or a nested block on the next lines.
fn after_key(out: &mut String, value: &Value, indent: usize) {
    match value {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            mapping(out, m, indent + 2);
        }
        // Kubernetes' own style: a sequence under a key sits at the key's indent.
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            sequence(out, items, indent);
        }
        other => {
            out.push(' ');
            out.push_str(&inline(other));
            out.push('\n');
        }
    }
}

/// A block sequence whose dashes are at column `indent`.
fn sequence(out: &mut String, items: &[Value], indent: usize) {
    for item in items {
        pad(out, indent);
        out.push('-');
        match item {
            Value::Object(m) if !m.is_empty() => {
                // The first key shares the dash's line; the rest line up under it.
                let mut first = true;
                for (key, value) in m {
                    if first {
                        out.push(' ');
                        first = false;
                    } else {
                        pad(out, indent + 2);
                    }
                    out.push_str(&scalar_string(key));
                    out.push(':');
                    after_key(out, value, indent + 2);
                }
            }
            Value::Array(inner) if !inner.is_empty() => {
                out.push('\n');
                sequence(out, inner, indent + 2);
            }
            other => {
                out.push(' ');
                out.push_str(&inline(other));
                out.push('\n');
            }
        }
    }
}

fn pad(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

/// A scalar, or an empty collection, on one line.
fn inline(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => number(n),
        Value::String(s) => scalar_string(s),
        Value::Array(_) => "[]".to_owned(),
        Value::Object(_) => "{}".to_owned(),
    }
}

/// Integers as written; floats always with a `.` (`1e+20` → `1.0e+20`) so that YAML 1.1
/// readers, whose float needs one, agree with YAML 1.2 ones.
fn number(n: &serde_json::Number) -> String {
    let text = n.to_string();
    if n.is_f64() && !text.contains('.') {
        match text.find(['e', 'E']) {
            Some(at) => format!("{}.0{}", &text[..at], &text[at..]),
            None => format!("{text}.0"),
        }
    } else {
        text
    }
}

/// Words YAML 1.1 reads as booleans or null (YAML 1.2's `true`, `false`, `null` among
/// them), compared without case: `Yes`, `OFF` and `nUlL` are quoted too.
const RESERVED: &[&str] = &["y", "n", "yes", "no", "on", "off", "true", "false", "null"];

/// A string as a YAML scalar: plain when that is unambiguous, else double-quoted.
pub fn scalar_string(s: &str) -> String {
    if is_plain_safe(s) {
        s.to_owned()
    } else {
        quoted(s)
    }
}

fn is_plain_safe(s: &str) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    (first.is_ascii_alphabetic() || first == '_' || first == '/')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-'))
        && !RESERVED.iter().any(|w| w.eq_ignore_ascii_case(s))
}

/// A double-quoted scalar. Escaped: `"` and `\`, every C0 and C1 control character and
/// DEL, and the characters a YAML reader may take as a line break or a byte-order mark
/// (U+2028, U+2029, U+FEFF). Anything else is written as it is (YAML is UTF-8).
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20
                || (0x7f..=0x9f).contains(&(c as u32))
                || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}') =>
            {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_yaml_would_retype_are_quoted() {
        for s in [
            "on",
            "On",
            "yes",
            "NO",
            "off",
            "y",
            "N",
            "true",
            "False",
            "null",
            "~",
            "1.0",
            "0755",
            "0x1F",
            "1e3",
            ".inf",
            "-1",
            "+1",
            "",
            " lead",
            "trail ",
            "a: b",
            "a #b",
            "#c",
            "- x",
            "[x]",
            "{x}",
            "*a",
            "&a",
            "!t",
            "|",
            ">",
            "%x",
            "@x",
            "`x",
            "'x'",
            "\"x\"",
            "2024-01-01",
            "12:30",
            "a,b",
            "?x",
            "sha256:ab",
        ] {
            let y = scalar_string(s);
            assert!(y.starts_with('"'), "{s:?} should be quoted, got {y}");
        }
        for s in [
            "hello",
            "app.kubernetes.io/name",
            "/healthz",
            "apps/v1",
            "RuntimeDefault",
        ] {
            assert_eq!(scalar_string(s), s);
        }
    }

    #[test]
    fn quoting_escapes_what_a_reader_would_fold() {
        assert_eq!(quoted("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(quoted("l1\nl2\t\u{7}"), r#""l1\nl2\t\u0007""#);
        assert_eq!(
            quoted("x\u{85}\u{2028}\u{feff}é"),
            "\"x\\u0085\\u2028\\ufeffé\""
        );
    }

    #[test]
    fn floats_always_carry_a_point() {
        assert_eq!(inline(&json!(1.0)), "1.0");
        assert_eq!(inline(&json!(0.5)), "0.5");
        // YAML 1.1 also wants the exponent's sign, which serde_json writes.
        assert_eq!(inline(&json!(1e20)), "1.0e+20");
        assert_eq!(inline(&json!(3)), "3");
    }

    #[test]
    fn block_layout() {
        let v = json!({
            "a": {"b": [1, {"c": "on", "d": []}, [2, 3]], "e": {}},
            "f": "x",
        });
        let text = stream(
            &["top\nsecond".to_owned(), String::new()],
            &[v, json!("doc")],
        );
        let expect = "# top\n# second\n#\n---\na:\n  b:\n  - 1\n  - c: \"on\"\n    d: []\n  -\n    - 2\n    - 3\n  e: {}\nf: x\n---\ndoc\n";
        assert_eq!(text, expect);
    }
}
