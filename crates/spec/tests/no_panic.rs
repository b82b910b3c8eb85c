//! Whatever bytes or TOML arrive, the parser answers with a spec or a report: never a panic,
//! and every reported position lies inside the source.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use proptest::prelude::*;

fn check(source: &str) {
    match kiln_spec::Spec::parse(source, "fuzz.toml", Path::new("/nonexistent")) {
        Ok(_) => {}
        Err(report) => {
            assert!(!report.diagnostics.is_empty());
            for d in &report.diagnostics {
                if let Some(span) = &d.span {
                    assert!(span.start <= source.len() && span.end <= source.len());
                }
            }
            // Both renderings must work on any input.
            let _ = report.render(false);
            let _ = report.to_string();
        }
    }
}

/// Keys and values drawn from kiln's own vocabulary, so random documents reach deep into the
/// decoder instead of failing on the first line.
fn key() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "name",
        "image",
        "service",
        "deploy",
        "route",
        "target",
        "base",
        "port",
        "replicas",
        "env",
        "writable",
        "tmpfs_size",
        "size",
        "user",
        "pids",
        "seccomp",
        "memory",
        "cpus",
        "health",
        "path",
        "interval",
        "strategy",
        "steps",
        "weight",
        "pause",
        "analysis",
        "max_error_rate",
        "listen",
        "hosts",
        "tls",
        "cert",
        "copy",
        "from",
        "to",
        "mode",
        "owner",
        "migrate",
        "schema",
        "compatible_from",
        "max_surge",
        "timeout",
        "sticky",
        "provider",
        "bogus",
    ])
    .prop_map(str::to_owned)
}

fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}").replace("inf", "1.0").replace("NaN", "nan")),
        any::<bool>().prop_map(|b| b.to_string()),
        "[a-z0-9%:./ -]{0,12}".prop_map(|s| format!("{s:?}")),
        prop::sample::select(vec![
            "\"10s\"",
            "\"0s\"",
            "\"256MiB\"",
            "\"25%\"",
            "\"canary\"",
            "\"rolling\"",
            "\"/tmp\"",
            "\"127.0.0.1:80\"",
            "\"oci:x@sha256:00\"",
            "\"rootfs:/\"",
            "100",
            "0",
            "70000",
            "-1",
        ])
        .prop_map(str::to_owned),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec((key(), inner), 0..4).prop_map(|kv| {
                let body: Vec<String> = kv.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", body.join(", "))
            }),
        ]
    })
}

fn document() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        (key(), value()).prop_map(|(k, v)| format!("{k} = {v}")),
        (key(), prop::option::of(key())).prop_map(|(a, b)| match b {
            Some(b) => format!("[{a}.{b}]"),
            None => format!("[{a}]"),
        }),
        (key(), key()).prop_map(|(a, b)| format!("[[{a}.{b}]]")),
    ];
    prop::collection::vec(line, 0..24).prop_map(|lines| lines.join("\n"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn random_toml_never_panics(doc in document()) {
        check(&doc);
    }
}
