//! End-to-end tests of what a build and a test attach to an image (issue 18): the SBOM
//! (validated by spdx-tools), the provenance (parsed by the in-toto attestation reference
//! bindings, SLSA v1 predicate included), both deterministic across state directories and
//! checkouts; the referrers carried by `skopeo copy` (the referrers-tag fallback), by
//! `kiln image export`/`import`, kept and collected by `kiln gc`; and `kiln test`'s statement.
//! They run the real `kiln` binary. The checkers live in the venv `scripts/ci-setup.sh`
//! installs (`/opt/kiln-ci/attest`); skopeo is Debian's. With `CI=true` a missing one fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command as Std;

use common::{hello_binary, kiln, runc_prerequisites};
use serde_json::Value;

const VENV: &str = "/opt/kiln-ci/attest/bin";
const SBOM: &str = "https://spdx.dev/Document/v2.3";
const PROVENANCE: &str = "https://slsa.dev/provenance/v1";
const TEST: &str = "https://kiln.dev/attestation/test/v1";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether `path` (a tool) is there; in CI its absence is a failure, not a skip.
fn have(path: &str) -> bool {
    let found = Std::new("sh")
        .args(["-c", &format!("command -v {path}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(!in_ci(), "CI must install {path} (scripts/ci-setup.sh)");
        eprintln!("skipped: {path} is not installed");
    }
    found
}

/// A checkout of an app at `dir`: the example's binary, a small tree (with a hardlink), and
/// a closure copy of a dynamically linked host binary, so the SBOM has Debian packages.
fn checkout(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir.join("static/css")).unwrap();
    fs::copy(hello_binary(), dir.join("hello")).unwrap();
    fs::write(dir.join("static/index.html"), "<h1>hi</h1>\n").unwrap();
    fs::write(dir.join("static/css/site.css"), "h1{}\n").unwrap();
    fs::hard_link(dir.join("static/index.html"), dir.join("static/again.html")).unwrap();
    let spec = dir.join("kiln.toml");
    fs::write(
        &spec,
        r#"name = "web"

[image]
base = "scratch"
entrypoint = ["/hello"]

[[image.copy]]
from = "hello"
to = "/hello"
mode = "0755"

[[image.copy]]
from = "static"
to = "/srv/static"

[[image.copy]]
from = "/usr/bin/true"
to = "/bin/true"
closure = true
allow_outside = true

[service]
port = 8080

[route]
listen = "127.0.0.1:18091"
"#,
    )
    .unwrap();
    spec
}

/// Builds the spec at `dir/kiln.toml`, named relatively from `dir` as a user would.
fn build_in(dir: &Path, state: &Path, epoch: &str) -> String {
    let out = kiln(state)
        .current_dir(dir)
        .env("SOURCE_DATE_EPOCH", epoch)
        .args(["build", "-q", "-f", "kiln.toml"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    String::from_utf8(out).unwrap().trim().to_owned()
}

fn inspect(state: &Path, reference: &str) -> Value {
    let out = kiln(state)
        .args(["image", "inspect", "--json", reference])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    serde_json::from_slice(&out).unwrap()
}

fn blob(state: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.trim_start_matches("sha256:");
    fs::read(state.join("images/blobs/sha256").join(hex)).unwrap()
}

/// The payload of the referrer of `image` whose predicate type is `predicate`.
fn statement_bytes(state: &Path, image: &str, predicate: &str) -> Vec<u8> {
    let info = inspect(state, image);
    let found: Vec<&Value> = info["referrers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["annotations"]["in-toto.io/predicate-type"] == predicate)
        .collect();
    assert_eq!(found.len(), 1, "{info}");
    assert_eq!(found[0]["artifact_type"], "application/vnd.in-toto+json");
    blob(state, found[0]["payload"].as_str().unwrap())
}

fn statement(state: &Path, image: &str, predicate: &str) -> Value {
    serde_json::from_slice(&statement_bytes(state, image, predicate)).unwrap()
}

/// BLAKE3 as the SBOM lists it: 1,024 bits of its extendable output, computed here apart
/// from kiln's own code.
fn sbom_blake3(bytes: &[u8]) -> String {
    let mut out = [0u8; 128];
    blake3::Hasher::new()
        .update(bytes)
        .finalize_xof()
        .fill(&mut out);
    assert!(hex::encode(out).starts_with(blake3::hash(bytes).to_hex().as_str()));
    hex::encode(out)
}

/// Every regular file of the image, by path, with its BLAKE3 (from a rootfs export).
fn image_files(state: &Path, image: &str, scratch: &Path) -> Vec<(String, String)> {
    let rootfs = scratch.join("rootfs");
    kiln(state)
        .args(["image", "export", image, "--format", "rootfs", "-o"])
        .arg(&rootfs)
        .assert()
        .success();
    let mut out = Vec::new();
    let mut stack = vec![rootfs.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                let rel = e
                    .path()
                    .strip_prefix(&rootfs)
                    .unwrap()
                    .display()
                    .to_string();
                let digest = sbom_blake3(&fs::read(e.path()).unwrap());
                out.push((format!("./{rel}"), digest));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_build_carries_an_sbom_spdx_tools_accepts_and_slsa_provenance() {
    if !have(&format!("{VENV}/pyspdxtools")) || !have(&format!("{VENV}/python")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("app");
    checkout(&app);
    let state = tmp.path().join("state");
    let image = build_in(&app, &state, "1700000000");

    // The SBOM: SPDX 2.3 that spdx-tools validates, every file of the image with SHA1 and
    // BLAKE3, the image as the described package, libc6 for the closure's host files.
    let sbom = statement(&state, &image, SBOM);
    assert_eq!(sbom["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(
        sbom["subject"][0]["digest"]["sha256"],
        image.trim_start_matches("sha256:")
    );
    let doc = &sbom["predicate"];
    let doc_path = tmp.path().join("sbom.spdx.json");
    fs::write(&doc_path, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
    common::assert_spdx_tools_accept(&doc_path);
    let mut listed: Vec<(String, String)> = doc["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let sums = f["checksums"].as_array().unwrap();
            assert_eq!(sums[0]["algorithm"], "SHA1");
            assert_eq!(sums[0]["checksumValue"].as_str().unwrap().len(), 40);
            assert_eq!(sums[1]["algorithm"], "BLAKE3");
            (
                f["fileName"].as_str().unwrap().to_owned(),
                sums[1]["checksumValue"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    listed.sort();
    assert_eq!(listed, image_files(&state, &image, tmp.path()));
    assert!(listed.iter().any(|(p, _)| p == "./srv/static/again.html"));
    assert_eq!(doc["creationInfo"]["created"], "2023-11-14T22:13:20Z");
    assert!(
        doc["documentNamespace"]
            .as_str()
            .unwrap()
            .ends_with(image.trim_start_matches("sha256:"))
    );
    let packages = doc["packages"].as_array().unwrap();
    assert_eq!(packages[0]["versionInfo"], image.as_str());
    let libc = packages
        .iter()
        .find(|p| p["name"] == "libc6")
        .unwrap_or_else(|| panic!("no libc6 package in {packages:?}"));
    assert!(
        libc["externalRefs"][0]["referenceLocator"]
            .as_str()
            .unwrap()
            .starts_with("pkg:deb/debian/libc6@")
    );
    let libc_id = libc["SPDXID"].as_str().unwrap();
    let libc_files: Vec<&str> = doc["relationships"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["spdxElementId"] == libc_id && r["relationshipType"] == "CONTAINS")
        .map(|r| r["relatedSpdxElement"].as_str().unwrap())
        .collect();
    let libc_so = doc["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fileName"].as_str().unwrap().ends_with("/libc.so.6"))
        .unwrap();
    assert!(libc_files.contains(&libc_so["SPDXID"].as_str().unwrap()));

    // The provenance: the in-toto reference bindings parse the statement and validate it,
    // and parse the predicate strictly as SLSA v1 Provenance (an unknown field fails).
    let prov_path = tmp.path().join("provenance.json");
    fs::write(&prov_path, statement_bytes(&state, &image, PROVENANCE)).unwrap();
    common::assert_in_toto_accepts_provenance(&prov_path, true);
    let prov: Value = serde_json::from_slice(&fs::read(&prov_path).unwrap()).unwrap();
    let def = &prov["predicate"]["buildDefinition"];
    assert_eq!(def["externalParameters"]["spec"]["path"], "kiln.toml");
    assert_eq!(
        def["externalParameters"]["spec"]["digest"]["sha256"],
        kiln_image::Digest::of(&fs::read(app.join("kiln.toml")).unwrap()).hex()
    );
    let deps = def["resolvedDependencies"].as_array().unwrap();
    // Three input trees and the closure's host files (the binary's interpreter and libc).
    assert_eq!(
        deps.iter()
            .filter(|d| d["name"].as_str().is_some_and(|n| n.starts_with("copy #")))
            .count(),
        3
    );
    // A host file is named by its SHA-256 (and SHA1, BLAKE3) of the file as it is on the host.
    for d in deps {
        if let Some(host) = d["uri"].as_str().and_then(|u| u.strip_prefix("file://")) {
            let bytes = fs::read(host).unwrap();
            assert_eq!(
                d["digest"]["sha256"],
                kiln_image::Digest::of(&bytes).hex(),
                "{host}"
            );
            assert_eq!(d["digest"]["blake3"], sbom_blake3(&bytes), "{host}");
        }
    }
    assert!(deps.iter().any(|d| {
        d["uri"].as_str().is_some_and(|u| u.ends_with("/libc.so.6"))
            && d["annotations"]["debianPackage"]
                .as_str()
                .is_some_and(|p| p.contains("libc6"))
    }));
    assert_eq!(
        prov["predicate"]["runDetails"]["byproducts"][0]["annotations"]["sourceDateEpoch"],
        1_700_000_000
    );

    // `image inspect` lists both, as text too.
    kiln(&state)
        .args(["image", "inspect", &image])
        .assert()
        .success()
        .stdout(predicates::str::contains(SBOM))
        .stdout(predicates::str::contains(PROVENANCE));

    // --no-attest: the same image, nothing attached.
    let bare = tmp.path().join("bare");
    let out = kiln(&bare)
        .current_dir(&app)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .args(["build", "-q", "--no-attest", "-f", "kiln.toml"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    assert_eq!(String::from_utf8(out).unwrap().trim(), image);
    assert_eq!(inspect(&bare, &image)["referrers"], serde_json::json!([]));
}

#[test]
fn the_same_inputs_in_two_states_and_checkouts_give_the_same_attestations() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (
        tmp.path().join("one/app"),
        tmp.path().join("two/elsewhere/app"),
    );
    checkout(&a);
    checkout(&b);
    let (sa, sb) = (tmp.path().join("state-a"), tmp.path().join("state-b"));
    let image = build_in(&a, &sa, "1700000000");
    assert_eq!(build_in(&b, &sb, "1700000000"), image);
    assert_eq!(
        statement_bytes(&sa, &image, SBOM),
        statement_bytes(&sb, &image, SBOM),
        "SBOM bytes differ"
    );
    let mut pa = statement(&sa, &image, PROVENANCE);
    let mut pb = statement(&sb, &image, PROVENANCE);
    // Only the declared build-time fields differ.
    let ida = pa["predicate"]["runDetails"]["metadata"]["invocationId"].clone();
    assert_ne!(
        ida,
        pb["predicate"]["runDetails"]["metadata"]["invocationId"]
    );
    pa["predicate"]["runDetails"]["metadata"] = Value::Null;
    pb["predicate"]["runDetails"]["metadata"] = Value::Null;
    assert_eq!(pa, pb);
    // A rebuild attaches nothing new: the same SBOM, and the first provenance stays.
    let before = inspect(&sa, &image)["referrers"].clone();
    build_in(&a, &sa, "1700000000");
    assert_eq!(inspect(&sa, &image)["referrers"], before);
}

/// The referrers of `image` in `state`, as (manifest, artifact type) pairs.
fn referrers(state: &Path, image: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = inspect(state, image)["referrers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["manifest"].as_str().unwrap().to_owned(),
                r["artifact_type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn skopeo_carries_the_referrers_by_the_fallback_tag_and_kiln_imports_them() {
    if !have("skopeo") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("app");
    checkout(&app);
    let state = tmp.path().join("state");
    let image = build_in(&app, &state, "0");
    let want = referrers(&state, &image);
    assert_eq!(want.len(), 2);
    let store = state.join("images").display().to_string();
    let copy = tmp.path().join("copy").display().to_string();
    let fallback = format!("sha256-{}", image.trim_start_matches("sha256:"));
    for (from, to, all) in [
        (
            format!("oci:{store}:{fallback}"),
            format!("oci:{copy}:{fallback}"),
            true,
        ),
        (
            format!("oci:{store}:web:latest"),
            format!("oci:{copy}:web:latest"),
            false,
        ),
    ] {
        let mut cmd = Std::new("skopeo");
        cmd.arg("copy");
        if all {
            cmd.arg("--all");
        }
        let out = cmd.args([&from, &to]).output().unwrap();
        assert!(
            out.status.success(),
            "skopeo copy {from} {to}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let second = tmp.path().join("second");
    kiln(&second)
        .args(["image", "import", &copy])
        .assert()
        .success();
    assert_eq!(referrers(&second, &image), want);
    assert_eq!(
        statement_bytes(&second, &image, SBOM),
        statement_bytes(&state, &image, SBOM)
    );
}

#[test]
fn export_and_import_round_trip_the_referrers_and_gc_keeps_or_collects_them() {
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("app");
    checkout(&app);
    let state = tmp.path().join("state");
    let image = build_in(&app, &state, "0");
    let want = referrers(&state, &image);
    let archive = tmp.path().join("web.tar");
    kiln(&state)
        .args(["image", "export", "web", "--format", "oci-archive", "-o"])
        .arg(&archive)
        .assert()
        .success();
    let second = tmp.path().join("second");
    kiln(&second)
        .args(["image", "import"])
        .arg(&archive)
        .assert()
        .success();
    assert_eq!(referrers(&second, &image), want);

    // gc keeps the referrers of a kept image…
    kiln(&state).args(["gc"]).assert().success();
    assert_eq!(referrers(&state, &image), want);
    let payloads: Vec<String> = inspect(&state, &image)["referrers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["payload"].as_str().unwrap().to_owned())
        .collect();
    // …and collects them with their image.
    fs::write(app.join("static/index.html"), "<h1>changed</h1>\n").unwrap();
    let next = build_in(&app, &state, "0");
    assert_ne!(next, image);
    let gc = kiln(&state)
        .args(["--json", "gc"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let gc: Value = serde_json::from_slice(&gc).unwrap();
    let removed = gc["removed"].to_string();
    for (manifest, _) in &want {
        assert!(removed.contains(manifest.as_str()), "{manifest} kept: {gc}");
    }
    for p in &payloads {
        let hex = p.trim_start_matches("sha256:");
        assert!(!state.join("images/blobs/sha256").join(hex).exists());
    }
    let index = fs::read_to_string(state.join("images/index.json")).unwrap();
    assert!(
        !index.contains(image.trim_start_matches("sha256:")),
        "{index}"
    );
    assert_eq!(referrers(&state, &next).len(), 2);
}

#[test]
fn kiln_test_attaches_its_result_as_an_in_toto_statement() {
    if !runc_prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let spec = common::root().join("examples/hello/kiln.toml");
    let image = common::build(&state, &spec);
    kiln(&state)
        .args(["test", "-q", "-f"])
        .arg(&spec)
        .assert()
        .success();
    let s = statement(&state, &image, TEST);
    assert_eq!(s["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(
        s["subject"][0]["digest"]["sha256"],
        image.trim_start_matches("sha256:")
    );
    assert_eq!(s["predicate"]["result"], "passed");
    assert_eq!(s["predicate"]["checks"][0]["kind"], "http");
    assert_eq!(s["predicate"]["checks"][0]["status"], 200);
    assert!(s["predicate"]["kilnVersion"].is_string());
    // The file the daemon's tested gate reads is still written, with the same result.
    let file = state.join(format!(
        "images/attestations/sha256-{}.json",
        image.trim_start_matches("sha256:")
    ));
    let file: Value = serde_json::from_slice(&fs::read(file).unwrap()).unwrap();
    assert_eq!(file["result"], "passed");
}
