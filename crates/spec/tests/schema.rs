//! The JSON Schema printed by `kiln schema` agrees with the decoder: it accepts every valid
//! fixture and the example app's spec, and rejects specs with kind-level mistakes. The
//! committed `docs/config.md` is what the catalog generates.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn validator() -> (boon::Schemas, boon::SchemaIndex) {
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler
        .add_resource("kiln.schema.json", kiln_spec::json_schema())
        .unwrap();
    let idx = compiler.compile("kiln.schema.json", &mut schemas).unwrap();
    (schemas, idx)
}

fn toml_as_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    let value: toml::Table = toml::from_str(&text).unwrap();
    serde_json::to_value(value).unwrap()
}

fn check(path: &Path) -> Result<(), String> {
    let (schemas, idx) = validator();
    schemas
        .validate(&toml_as_json(path), idx)
        .map_err(|e| format!("{e:#}"))
}

#[test]
fn schema_accepts_valid_specs() {
    let mut paths: Vec<PathBuf> =
        std::fs::read_dir(root().join("crates/spec/tests/fixtures/valid"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
    paths.push(root().join("examples/hello/kiln.toml"));
    for p in paths {
        if let Err(e) = check(&p) {
            panic!("schema rejects {}: {e}", p.display());
        }
    }
}

#[test]
fn schema_rejects_kind_mistakes() {
    for name in [
        "three-mistakes",
        "bad-values",
        "canary-steps",
        "wrong-shapes",
        "missing",
    ] {
        let p = root().join(format!("crates/spec/tests/fixtures/invalid/{name}.toml"));
        assert!(check(&p).is_err(), "schema accepts {name}");
    }
}

#[test]
fn reference_doc_is_current() {
    let path = root().join("docs/config.md");
    let want = kiln_spec::reference_markdown();
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let got = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        got == want,
        "docs/config.md is stale: rerun with UPDATE_EXPECT=1 and commit it"
    );
}
