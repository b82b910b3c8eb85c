//! Data-driven tests: every `fixtures/valid/*.toml` parses; every `fixtures/invalid/*.toml`
//! produces exactly the diagnostics in its `.expected` file (one line each, in source order).
//! Run with `UPDATE_EXPECT=1` to rewrite the `.expected` files after an intended change, then
//! review the diff.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use kiln_spec::Spec;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tomls(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no fixtures in {dir}");
    v
}

fn parse(path: &Path) -> Result<Spec, kiln_spec::Report> {
    let source = std::fs::read_to_string(path).unwrap();
    let name = format!(
        "{}/{}",
        path.parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy(),
        path.file_name().unwrap().to_string_lossy()
    );
    // As `kiln validate` does: relative paths resolve against the spec file's directory.
    Spec::parse(&source, &name, path.parent().unwrap())
}

#[test]
fn valid_fixtures_parse() {
    for path in tomls("valid") {
        if let Err(report) = parse(&path) {
            panic!("{} should be valid:\n{report}", path.display());
        }
    }
}

#[test]
fn invalid_fixtures_match_expected_diagnostics() {
    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    let mut failures = Vec::new();
    for path in tomls("invalid") {
        let got = match parse(&path) {
            Ok(_) => "(no problems)\n".to_owned(),
            Err(report) => report.to_string(),
        };
        let expected_path = path.with_extension("expected");
        if update {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if got != want {
            failures.push(format!(
                "{}\n--- expected\n{want}--- got\n{got}",
                path.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n(rerun with UPDATE_EXPECT=1 to accept)",
        failures.join("\n")
    );
}

#[test]
fn full_fixture_has_every_value() {
    use kiln_spec::*;
    let spec = parse(&fixtures().join("valid/full.toml")).unwrap();
    assert_eq!(spec.name.as_str(), "full-app");
    assert_eq!(
        spec.image.base,
        BaseImage::Rootfs(fixtures().join("valid/../files"))
    );
    assert_eq!(spec.image.compression, Compression::Zstd);
    assert_eq!(
        spec.image.user,
        Some(UserSpec {
            uid: 1000,
            gid: Some(1000)
        })
    );
    assert_eq!(spec.image.copies[0].mode, Some(0o755));
    assert!(spec.image.copies[0].closure);
    assert_eq!(spec.image.copies[1].to, "/srv/static");
    assert_eq!(spec.service.port, 3000);
    assert_eq!(spec.service.memory, Some(256 * 1024 * 1024));
    assert_eq!(spec.service.cpus, Some(0.5));
    assert_eq!(spec.service.health.start_period.as_secs(), 60);
    assert_eq!(
        spec.service.tmpfs().collect::<Vec<_>>(),
        [("/tmp", 16 << 20), ("/var/cache/app", 256 << 20)]
    );
    assert_eq!(spec.service.user.as_deref(), Some("app:staff"));
    assert_eq!(spec.service.pids, 100);
    assert_eq!(spec.service.seccomp, Seccomp::Unconfined);
    assert_eq!(spec.deploy.max_surge, CountOrPercent::Percent(25));
    assert_eq!(spec.deploy.keep_previous.as_secs(), 3600);
    let Strategy::Canary {
        promote,
        steps,
        analysis,
        scale_stable,
    } = &spec.deploy.strategy
    else {
        panic!("expected canary, got {:?}", spec.deploy.strategy);
    };
    assert_eq!(*promote, Promote::Manual);
    assert_eq!(
        steps.iter().map(|s| s.weight).collect::<Vec<_>>(),
        [10, 50, 100]
    );
    assert_eq!(steps[2].pause, None);
    assert!((analysis.max_error_rate - 0.01).abs() < 1e-12);
    assert_eq!(analysis.max_p99.map(|d| d.as_millis()), Some(300));
    assert_eq!(analysis.on_inconclusive, OnInconclusive::Abort);
    assert!(*scale_stable);
    let m = spec.deploy.migrate.as_ref().unwrap();
    assert_eq!((m.schema, m.compatible_from), (3, 2));
    assert_eq!(spec.route.hosts, ["app.example.com", "*.app.example.com"]);
    assert_eq!(spec.route.sticky, Sticky::Cookie);
    assert_eq!(spec.route.max_body_size, Some(10 << 20));
    assert_eq!(spec.route.max_header_size, 16 << 10);
    assert_eq!(spec.target.provider, ProviderKind::Docker);
}

#[test]
fn defaults_come_from_the_catalog() {
    use kiln_spec::*;
    let spec = parse(&fixtures().join("valid/minimal.toml")).unwrap();
    assert_eq!(spec.image.base, BaseImage::Scratch);
    assert_eq!(spec.image.compression, Compression::Gzip);
    assert_eq!(spec.service.port, 8080);
    assert_eq!(spec.service.replicas, 1);
    assert_eq!(spec.service.stop_grace.as_secs(), 10);
    assert_eq!(spec.service.health.path, None);
    assert_eq!(spec.service.health.unhealthy_threshold, 3);
    // Sealed unless the spec says otherwise; the catalog's literals are the constants.
    assert_eq!(spec.service.tmpfs_size, ServiceSpec::DEFAULT_TMPFS_SIZE);
    assert_eq!(spec.service.pids, ServiceSpec::DEFAULT_PIDS);
    assert_eq!(spec.service.user, None);
    assert_eq!(spec.service.seccomp, Seccomp::Default);
    assert_eq!(spec.deploy.strategy, Strategy::Rolling);
    assert_eq!(spec.deploy.max_surge, CountOrPercent::Count(1));
    assert_eq!(spec.deploy.progress_deadline.as_secs(), 300);
    assert_eq!(spec.route.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(spec.route.request_timeout.as_secs(), 60);
    assert_eq!(spec.route.max_body_size, None);
    assert_eq!(spec.route.max_header_size, 64 << 10);
    assert_eq!(spec.target.runtime, "runc");
}

#[test]
fn three_independent_mistakes_are_all_reported_with_positions() {
    let report = parse(&fixtures().join("invalid/three-mistakes.toml")).unwrap_err();
    let json = report.to_json();
    let got: Vec<(Option<usize>, Option<usize>, &str)> =
        json.iter().map(|d| (d.line, d.column, d.key)).collect();
    assert_eq!(
        got,
        [
            (Some(8), Some(8), "service.port"),
            (Some(10), Some(1), "service.writeable"),
            (Some(20), Some(10), "deploy.steps[1].weight"),
        ]
    );
}

#[test]
fn a_canary_pauses_when_inconclusive_and_keeps_stable_unless_told() {
    use kiln_spec::*;
    let source = "name = \"c\"\n[image]\n[service]\n[deploy]\nstrategy = \"canary\"\n\
                  [[deploy.steps]]\nweight = 10\npause = \"30s\"\n[[deploy.steps]]\nweight = 100\n";
    let spec = Spec::parse(source, "canary.toml", &fixtures()).unwrap();
    let Strategy::Canary {
        analysis,
        scale_stable,
        ..
    } = &spec.deploy.strategy
    else {
        panic!("expected canary, got {:?}", spec.deploy.strategy);
    };
    assert_eq!(analysis.on_inconclusive, OnInconclusive::Pause);
    assert!(!scale_stable);
}
