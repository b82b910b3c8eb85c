//! End-to-end tests of `kiln export kubernetes`: the real `kiln` binary exports every example
//! and fixture spec (and a few written here for what those lack: secrets, root, a user by
//! name, canary analysis, host network), and the output is validated for real, offline, by
//! `scripts/kubernetes-validate/check.py`: kubernetes-validate (pinned) against the Kubernetes
//! schemas in strict mode, Argo Rollouts objects against Argo's published API, and the YAML
//! read back by PyYAML equal to the JSON kiln printed. `scripts/ci-setup.sh` installs the
//! validator under /opt/kiln-ci; without it these checks are skipped with a note, and fail
//! under `CI=true`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};

use common::{kiln, root};

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.29.0";

const DIGEST: &str = "sha256:3f2a9c4b6d8e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192";

/// The validator's Python (a venv with kubernetes-validate) and the Argo models' directory.
struct Validator {
    python: PathBuf,
    argo_models: PathBuf,
}

fn validator() -> Option<Validator> {
    let base = std::env::var_os("KILN_CI_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/kiln-ci"));
    let python = base.join("venv/bin/python");
    let argo_models = base.join("argo");
    let has_validate = std::process::Command::new(&python)
        .args(["-c", "import kubernetes_validate, yaml"])
        .output()
        .is_ok_and(|o| o.status.success());
    let has_node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let has_models = argo_models
        .join("node_modules/@kubernetes-models/argo-rollouts")
        .is_dir();
    if has_validate && has_node && has_models {
        return Some(Validator {
            python,
            argo_models,
        });
    }
    let why = format!(
        "kubernetes-validate in {}={has_validate} node={has_node} Argo models in {}={has_models} \
         (bash scripts/ci-setup.sh installs them)",
        python.display(),
        argo_models.display()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the Kubernetes validator is missing: {why}");
    }
    eprintln!("note: not validating the manifests ({why})");
    None
}

/// `kiln export kubernetes -f spec ARGS`: the YAML, and the same objects as `--json`.
fn export(state: &Path, spec: &Path, args: &[&str]) -> (String, serde_json::Value) {
    let yaml = kiln(state)
        .args(["export", "kubernetes", "-f"])
        .arg(spec)
        .args(args)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let json = kiln(state)
        .args(["--json", "export", "kubernetes", "-f"])
        .arg(spec)
        .args(args)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    (
        String::from_utf8(yaml).unwrap(),
        serde_json::from_slice(&json).unwrap(),
    )
}

/// Runs the validator on one export; panics with its output when anything fails.
fn validate(v: &Validator, dir: &Path, name: &str, yaml: &str, json: &serde_json::Value) {
    let y = dir.join(format!("{name}.yaml"));
    let j = dir.join(format!("{name}.json"));
    std::fs::write(&y, yaml).unwrap();
    std::fs::write(&j, serde_json::to_vec(json).unwrap()).unwrap();
    let out = std::process::Command::new(&v.python)
        .arg(root().join("scripts/kubernetes-validate/check.py"))
        .args(["--kubernetes-version", KUBERNETES_VERSION, "--argo-models"])
        .arg(&v.argo_models)
        .arg("--json")
        .arg(&j)
        .arg(&y)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{name}: the manifests do not validate:\n{text}\n--- manifests ---\n{yaml}"
    );
    // Every object was checked against a schema, none passed for want of one.
    let objects = json["objects"].as_array().unwrap();
    assert_eq!(
        text.lines().filter(|l| l.starts_with("ok ")).count(),
        // A Rollout's pod template and an AnalysisTemplate's Job are checked on their own.
        objects.len()
            + objects
                .iter()
                .filter(|o| o["kind"] == "Rollout" || o["kind"] == "AnalysisTemplate")
                .count(),
        "{name}: {text}"
    );
}

/// The example and fixture specs of the repository: every `examples/*/kiln.toml` and every
/// valid spec fixture.
fn repository_specs() -> Vec<PathBuf> {
    let mut specs = Vec::new();
    for entry in std::fs::read_dir(root().join("examples")).unwrap() {
        let spec = entry.unwrap().path().join("kiln.toml");
        if spec.is_file() {
            specs.push(spec);
        }
    }
    for entry in std::fs::read_dir(root().join("crates/spec/tests/fixtures/valid")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            specs.push(path);
        }
    }
    specs.sort();
    assert!(specs.len() >= 4, "found too few specs: {specs:?}");
    specs
}

/// Specs for what the repository's lack: written to `dir`, with a secret file beside them.
fn extra_specs(dir: &Path) -> Vec<PathBuf> {
    std::fs::write(dir.join("db.txt"), "s3cr3t-value-never-printed\n").unwrap();
    let specs = [
        (
            "secrets-root",
            "name = \"vault\"\n[image]\n[service]\nuser = \"root\"\nnetwork = \"host\"\n\
             init = false\ncapabilities = [\"NET_RAW\"]\nallow_dangerous_capabilities = true\n\
             env = { MODE = \"on\", OCTAL = \"0755\", VERSION = \"1.0\", NOTHING = \"null\", \
             TALK = \"a: b # c\", EMPTY = \"\", MULTI = \"line1\\nline2\", \
             ODD = \"tab\\there\\u0085nel\\u2028ls\\ufeffbom é ✓\", YES = \"Yes\", \
             TILDE = \"~\", STAR = \"*ref\" }\n\
             [service.health]\ninterval = \"3s\"\nstart_period = \"1s\"\n\
             [service.secrets]\nDB_PASSWORD = { file = \"db.txt\", expose_env = true }\n\
             API_KEY = { env = \"API_KEY\" }\n",
        ),
        (
            "named-user-canary",
            "name = \"shop\"\n[image]\n[service]\nuser = \"app:staff\"\nreplicas = 5\n\
             cpus = 1.5\nmemory = \"1GiB\"\n[service.secrets]\nTOKEN = { command = [\"echo\", \"x\"] }\n\
             [deploy]\nstrategy = \"canary\"\nmax_surge = \"25%\"\n\
             [[deploy.steps]]\nweight = 20\npause = \"90s\"\n[[deploy.steps]]\nweight = 100\n\
             [deploy.analysis]\nmax_error_rate = \"2%\"\nmax_p99 = \"250ms\"\n",
        ),
        (
            "manual-blue-green",
            "name = \"bluegreen\"\n[image]\nuser = \"1000\"\n[service]\nport = 9000\n\
             writable = [{ path = \"/var/cache\", size = \"1500KiB\" }]\n\
             [service.health]\npath = \"/ready\"\n\
             [deploy]\nstrategy = \"blue-green\"\npromote = \"manual\"\n\
             [deploy.migrate]\ncommand = [\"/migrate\"]\nschema = 2\n[route]\nlisten = \"[::]:443\"\n",
        ),
    ];
    specs
        .iter()
        .map(|(name, text)| {
            let path = dir.join(format!("{name}.toml"));
            std::fs::write(&path, text).unwrap();
            path
        })
        .collect()
}

#[test]
fn every_example_and_fixture_spec_exports_manifests_kubernetes_accepts() {
    let v = validator();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut specs = repository_specs();
    specs.extend(extra_specs(tmp.path()));
    for spec in &specs {
        let name = format!(
            "{}-{}",
            spec.parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy(),
            spec.file_stem().unwrap().to_string_lossy()
        );
        let (yaml, json) = export(&state, spec, &["--image", DIGEST]);
        // The image is referenced by digest, and only by digest.
        assert!(yaml.contains(&format!("@{DIGEST}\"")), "{name}:\n{yaml}");
        assert!(!yaml.contains(":latest"), "{name}:\n{yaml}");
        // The leading comment comes before the first document.
        assert!(yaml.starts_with("# kiln export kubernetes: app "), "{name}");
        for o in json["objects"].as_array().unwrap() {
            assert!(yaml.contains(&format!("\nkind: {}\n", o["kind"].as_str().unwrap())));
        }
        if let Some(v) = &v {
            validate(v, &out, &name, &yaml, &json);
        }
    }
    // Exporting wrote no state: it only reads a store that is there.
    assert!(!state.exists(), "export created {}", state.display());
}

#[test]
fn the_pod_is_sealed_and_secret_values_never_printed() {
    let tmp = tempfile::tempdir().unwrap();
    let specs = extra_specs(tmp.path());
    let (yaml, json) = export(&tmp.path().join("state"), &specs[0], &["--image", DIGEST]);
    assert!(!yaml.contains("s3cr3t"), "{yaml}");
    assert!(!json.to_string().contains("s3cr3t"));
    assert!(!yaml.contains("kind: Secret"), "{yaml}");
    assert!(
        yaml.contains("# [service.secrets]: create the Secret vault-secrets"),
        "{yaml}"
    );
    let pod = &json["objects"][1]["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["securityContext"]["runAsUser"], 0);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        c["securityContext"]["capabilities"],
        serde_json::json!({"drop": ["ALL"], "add": ["NET_BIND_SERVICE", "NET_RAW"]})
    );
    assert_eq!(
        c["volumeMounts"][0],
        serde_json::json!({"name": "secrets", "mountPath": "/run/secrets", "readOnly": true})
    );
    // Strings a YAML reader would retype are quoted.
    for line in [
        "value: \"on\"",
        "value: \"0755\"",
        "value: \"1.0\"",
        "value: \"null\"",
        "value: \"a: b # c\"",
        "value: \"\"",
        "value: \"line1\\nline2\"",
    ] {
        assert!(yaml.contains(line), "{line} not in\n{yaml}");
    }
}

#[test]
fn namespace_and_registry_reach_every_object() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = root().join("crates/spec/tests/fixtures/valid/blue-green.toml");
    let (_, json) = export(
        &tmp.path().join("state"),
        &spec,
        &[
            "--image",
            DIGEST,
            "--registry",
            "registry.example:5000/team",
            "-n",
            "shop",
        ],
    );
    let objects = json["objects"].as_array().unwrap();
    assert_eq!(objects.len(), 3);
    for o in objects {
        assert_eq!(o["metadata"]["namespace"], "shop", "{o}");
    }
    assert_eq!(
        objects[2]["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("registry.example:5000/team/bg@{DIGEST}")
    );
    // A full reference is used as it is.
    let full = format!("ghcr.example/acme/bg@{DIGEST}");
    let (yaml, _) = export(&tmp.path().join("state"), &spec, &["--image", &full]);
    assert!(yaml.contains(&format!("image: \"{full}\"")), "{yaml}");
}

#[test]
fn usage_mistakes_exit_2_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let spec = root().join("crates/spec/tests/fixtures/valid/minimal.toml");
    let cases: &[(&[&str], &str)] = &[
        (&[], "--image"),
        (&["--image", "min:latest"], "--image"),
        (&["--image", "sha256:abc"], "--image"),
        (&["--image", "r/min@sha256:abc"], "--image"),
        (&["--image", DIGEST, "-n", "Prod"], "--namespace"),
        (
            &["--image", DIGEST, "--registry", "https://r.example"],
            "--registry",
        ),
    ];
    for (args, flag) in cases {
        let out = kiln(&state)
            .args(["export", "kubernetes", "-f"])
            .arg(&spec)
            .args(*args)
            .assert()
            .code(2)
            .get_output()
            .clone();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} printed manifests");
    }
    // A spec with problems is reported as `validate` reports it: exit 1.
    kiln(&state)
        .args(["export", "kubernetes", "--image", DIGEST, "-f"])
        .arg(root().join("crates/spec/tests/fixtures/invalid/missing.toml"))
        .assert()
        .code(1);
}

#[test]
fn without_image_the_last_build_is_exported() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::write(tmp.path().join("index.html"), "hello\n").unwrap();
    // A rootfs base: whether the image sets a User is known only from the image itself.
    std::fs::create_dir_all(tmp.path().join("rootfs/etc")).unwrap();
    std::fs::write(tmp.path().join("rootfs/etc/motd"), "hi\n").unwrap();
    let spec = tmp.path().join("kiln.toml");
    std::fs::write(
        &spec,
        "name = \"site\"\n[image]\nbase = \"rootfs:rootfs\"\n[[image.copy]]\nfrom = \"index.html\"\n\
         to = \"/index.html\"\n[service]\n",
    )
    .unwrap();
    let built = common::build(&state, &spec);
    assert!(built.starts_with("sha256:"), "{built}");
    let (yaml, json) = export(&state, &spec, &[]);
    let pod = &json["objects"][1]["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["image"], format!("site@{built}"));
    // No registry: said so, not guessed.
    assert!(
        yaml.contains("# image: no registry given (--registry)"),
        "{yaml}"
    );
    // The image's config, read from the store, sets no User: kiln's unprivileged default.
    assert_eq!(pod["securityContext"]["runAsUser"], 65534);
    // An image not in this store: its User is unknown, so only non-root is required.
    let (yaml, json) = export(&state, &spec, &["--image", DIGEST]);
    let pod = &json["objects"][1]["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"].get("runAsUser"), None, "{yaml}");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(yaml.contains("the image's User is unknown here"), "{yaml}");
    if let Some(v) = validator() {
        validate(&v, tmp.path(), "built", &yaml, &json);
    }
}
