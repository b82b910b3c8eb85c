//! End-to-end tests of signing (`kiln key generate`, `kiln sign`, `kiln build --sign`): the
//! real `kiln` binary, checked by other people's tools. `ssh-keygen` (openssh-client) must
//! agree on fingerprints, read kiln's keys, and verify the SSH signatures kiln attaches, which
//! the tests dig out of the OCI layout themselves; securesystemslib (the pinned venv that
//! scripts/ci-setup.sh makes) must verify the DSSE envelopes. Both tools are required under
//! `CI=true`; elsewhere a test without them says so and checks nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command as Std;

use predicates::prelude::*;
use serde_json::Value;

use common::{kiln, sslib_verify};

const PYTHON: &str = "/opt/kiln-ci/attest/bin/python";
const SIGNATURE: &str = "application/vnd.kiln.signature.v1+sshsig";
const DSSE: &str = "application/vnd.dsse.envelope.v1+json";
const IN_TOTO: &str = "application/vnd.in-toto+json";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether `ssh-keygen` can run; a panic under `CI=true` when it cannot.
fn ssh_keygen_present(what: &str) -> bool {
    let ok = Std::new("ssh-keygen")
        .arg("-?")
        .output()
        .is_ok_and(|o| !o.stderr.is_empty());
    if !ok {
        assert!(
            !in_ci(),
            "{what} needs ssh-keygen (openssh-client): install it"
        );
        eprintln!("skipping {what}: no ssh-keygen (apt-get install openssh-client)");
    }
    ok
}

/// Whether the pinned securesystemslib venv is there; a panic under `CI=true` when not.
fn securesystemslib_present(what: &str) -> bool {
    let ok = Std::new(PYTHON)
        .args(["-c", "import securesystemslib.dsse"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !in_ci(),
            "{what} needs securesystemslib in {PYTHON}: run scripts/ci-setup.sh"
        );
        eprintln!("skipping {what}: no {PYTHON} (scripts/ci-setup.sh makes it)");
    }
    ok
}

fn ssh_keygen(args: &[&str]) -> std::process::Output {
    Std::new("ssh-keygen").args(args).output().unwrap()
}

/// A state directory with the example app built into it: (state, spec, image digest).
fn built(dir: &Path) -> (PathBuf, PathBuf, String) {
    let state = dir.join("state");
    let spec = common::write_spec(dir, common::free_port(), "v1", 1);
    let image = common::build(&state, &spec);
    assert!(image.starts_with("sha256:"), "{image}");
    (state, spec, image)
}

fn generate(state: &Path, path: &Path) -> String {
    let out = kiln(state)
        .args(["key", "generate", "--comment", "ci@kiln"])
        .arg(path)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    String::from_utf8(out).unwrap()
}

fn blob(state: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap();
    fs::read(state.join("images/blobs/sha256").join(hex)).unwrap()
}

/// A referrer of `image` as the OCI layout holds it, read without kiln.
#[derive(Debug)]
struct Referrer {
    artifact_type: String,
    annotations: Value,
    payload: Vec<u8>,
}

/// Every manifest in the store's `index.json` whose `subject` is `image`.
fn referrers(state: &Path, image: &str) -> Vec<Referrer> {
    let index: Value =
        serde_json::from_slice(&fs::read(state.join("images/index.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for desc in index["manifests"].as_array().unwrap() {
        let digest = desc["digest"].as_str().unwrap();
        let manifest: Value = serde_json::from_slice(&blob(state, digest)).unwrap();
        if manifest["subject"]["digest"].as_str() != Some(image) {
            continue;
        }
        let layer = &manifest["layers"][0];
        out.push(Referrer {
            artifact_type: manifest["artifactType"].as_str().unwrap().to_owned(),
            annotations: manifest["annotations"].clone(),
            payload: blob(state, layer["digest"].as_str().unwrap()),
        });
    }
    out
}

fn of_type<'a>(all: &'a [Referrer], artifact_type: &str) -> Vec<&'a Referrer> {
    all.iter()
        .filter(|r| r.artifact_type == artifact_type)
        .collect()
}

/// `ssh-keygen -Y verify` of `sig` over `msg` by the key in `pub_line`, signer `kiln`.
fn ssh_verify(dir: &Path, pub_line: &str, namespace: &str, sig: &[u8], msg: &[u8]) -> bool {
    let allowed = dir.join("allowed_signers");
    let mut fields = pub_line.split_whitespace();
    let (kind, body) = (fields.next().unwrap(), fields.next().unwrap());
    fs::write(&allowed, format!("kiln {kind} {body}\n")).unwrap();
    let sig_path = dir.join("image.sig");
    fs::write(&sig_path, sig).unwrap();
    let msg_path = dir.join("manifest.json");
    fs::write(&msg_path, msg).unwrap();
    let out = Std::new("sh")
        .arg("-c")
        .arg(format!(
            "ssh-keygen -Y verify -f '{}' -I kiln -n {namespace} -s '{}' < '{}'",
            allowed.display(),
            sig_path.display(),
            msg_path.display()
        ))
        .output()
        .unwrap();
    eprintln!(
        "ssh-keygen -Y verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success()
}

/// A private key file and its `.pub` beside it.
struct SigningKeyFiles(PathBuf);

impl SigningKeyFiles {
    fn at(path: &Path) -> SigningKeyFiles {
        SigningKeyFiles(path.to_owned())
    }

    /// Both files are there, the private one 0600 and in OpenSSH format.
    fn complete(&self) -> bool {
        let private = fs::read_to_string(&self.0).unwrap_or_default();
        let mode = fs::metadata(&self.0).map_or(0, |m| m.permissions().mode() & 0o777);
        let public = fs::read_to_string(format!("{}.pub", self.0.display())).unwrap_or_default();
        private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
            && mode == 0o600
            && public.starts_with("ssh-ed25519 ")
    }
}

fn fingerprint_by_ssh_keygen(pub_path: &Path) -> String {
    let out = ssh_keygen(&["-l", "-f", pub_path.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    // "256 SHA256:… comment (ED25519)"
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned()
}

#[test]
fn a_generated_key_is_an_openssh_key_and_is_never_overwritten() {
    if !ssh_keygen_present("key generation interop") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let path = dir.path().join("signing.key");
    let printed = generate(&state, &path);
    let pub_line = printed.lines().next().unwrap();
    assert!(pub_line.starts_with("ssh-ed25519 AAAA"), "{printed}");
    assert!(pub_line.ends_with(" ci@kiln"), "{printed}");
    assert_eq!(
        fs::read_to_string(dir.path().join("signing.key.pub"))
            .unwrap()
            .trim_end(),
        pub_line
    );
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");

    // ssh-keygen names the key by the fingerprint kiln prints …
    let fp = fingerprint_by_ssh_keygen(&dir.path().join("signing.key.pub"));
    assert!(fp.starts_with("SHA256:"), "{fp}");
    assert!(
        printed.contains(&fp),
        "kiln printed {printed:?}, ssh-keygen {fp}"
    );
    // … and reads kiln's private key file, deriving the same public key from it.
    let derived = ssh_keygen(&["-y", "-f", path.to_str().unwrap()]);
    assert!(derived.status.success(), "{derived:?}");
    let derived = String::from_utf8(derived.stdout).unwrap();
    assert_eq!(
        derived.split_whitespace().take(2).collect::<Vec<_>>(),
        pub_line.split_whitespace().take(2).collect::<Vec<_>>()
    );

    // A second generate to the same path refuses and leaves both files as they were.
    let before = fs::read(&path).unwrap();
    kiln(&state)
        .args(["key", "generate"])
        .arg(&path)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("already exists"))
        .stderr(predicate::str::contains("signing.key"));
    assert_eq!(fs::read(&path).unwrap(), before);
    assert_eq!(
        fs::read_to_string(dir.path().join("signing.key.pub"))
            .unwrap()
            .trim_end(),
        pub_line
    );

    // Without a path: ./kiln-signing.key and ./kiln-signing.key.pub.
    let cwd = dir.path().join("project");
    fs::create_dir(&cwd).unwrap();
    kiln(&state)
        .current_dir(&cwd)
        .args(["key", "generate"])
        .assert()
        .success();
    assert!(SigningKeyFiles::at(&cwd.join("kiln-signing.key")).complete());

    // --json: the same facts, as data.
    let out = kiln(&state)
        .args(["--json", "key", "generate"])
        .arg(dir.path().join("second.key"))
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        v["fingerprint"].as_str().unwrap(),
        fingerprint_by_ssh_keygen(&dir.path().join("second.key.pub"))
    );
}

#[test]
fn ssh_keygen_verifies_the_image_signature_kiln_attached() {
    if !ssh_keygen_present("image signature interop") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (state, _, image) = built(dir.path());
    let key = dir.path().join("signing.key");
    let pub_line = generate(&state, &key).lines().next().unwrap().to_owned();
    let fp = fingerprint_by_ssh_keygen(&dir.path().join("signing.key.pub"));

    let out = kiln(&state)
        .args(["--json", "sign", &image, "--key"])
        .arg(&key)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let report: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(report["image"], image.as_str());
    assert_eq!(report["key"], fp.as_str());
    let attached = report["attached"].as_array().unwrap();
    assert!(attached.iter().all(|a| a["new"] == true), "{report}");
    assert_eq!(attached[0]["kind"], "signature");

    let all = referrers(&state, &image);
    let sigs = of_type(&all, SIGNATURE);
    assert_eq!(sigs.len(), 1, "{all:?}");
    assert_eq!(sigs[0].annotations["dev.kiln.key"], fp.as_str());
    let manifest = blob(&state, &image);
    assert!(ssh_verify(
        dir.path(),
        &pub_line,
        "kiln-image",
        &sigs[0].payload,
        &manifest
    ));

    // The signature is bound to the manifest's exact bytes, and to its namespace.
    let mut changed = manifest.clone();
    changed.push(b'\n');
    assert!(!ssh_verify(
        dir.path(),
        &pub_line,
        "kiln-image",
        &sigs[0].payload,
        &changed
    ));
    assert!(!ssh_verify(
        dir.path(),
        &pub_line,
        "kiln-ledger",
        &sigs[0].payload,
        &manifest
    ));
    // A signature changed in one byte of its signature field does not verify either.
    let armored = String::from_utf8(sigs[0].payload.clone()).unwrap();
    let mut lines: Vec<String> = armored.lines().map(str::to_owned).collect();
    let last_body = lines.len() - 2;
    let flipped: String = lines[last_body]
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i == 2 {
                if c == 'A' { 'B' } else { 'A' }
            } else {
                c
            }
        })
        .collect();
    lines[last_body] = flipped;
    let tampered = format!("{}\n", lines.join("\n"));
    assert!(!ssh_verify(
        dir.path(),
        &pub_line,
        "kiln-image",
        tampered.as_bytes(),
        &manifest
    ));

    // Signing again with the same key adds nothing: ed25519 is deterministic.
    let count = fs::read_dir(state.join("images/blobs/sha256"))
        .unwrap()
        .count();
    let out = kiln(&state)
        .args(["--json", "sign", &image])
        .env("KILN_SIGNING_KEY", &key)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let again: Value = serde_json::from_slice(&out).unwrap();
    assert!(
        again["attached"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["new"] == false),
        "{again}"
    );
    assert_eq!(
        fs::read_dir(state.join("images/blobs/sha256"))
            .unwrap()
            .count(),
        count
    );
    assert_eq!(referrers(&state, &image).len(), all.len());
}

#[test]
fn a_key_made_by_ssh_keygen_signs() {
    if !ssh_keygen_present("ssh-keygen key interop") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (state, _, image) = built(dir.path());
    let key = dir.path().join("id_ed25519");
    let made = ssh_keygen(&[
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "me@host",
        "-f",
        key.to_str().unwrap(),
    ]);
    assert!(made.status.success(), "{made:?}");
    let pub_line = fs::read_to_string(dir.path().join("id_ed25519.pub")).unwrap();
    let fp = fingerprint_by_ssh_keygen(&dir.path().join("id_ed25519.pub"));

    kiln(&state)
        .args(["sign", &image, "--key"])
        .arg(&key)
        .assert()
        .success()
        .stdout(predicate::str::contains(format!(
            "signed {image} with {fp}"
        )));
    let all = referrers(&state, &image);
    let sigs = of_type(&all, SIGNATURE);
    assert_eq!(sigs.len(), 1, "{all:?}");
    assert!(ssh_verify(
        dir.path(),
        pub_line.trim(),
        "kiln-image",
        &sigs[0].payload,
        &blob(&state, &image)
    ));
}

#[test]
fn securesystemslib_verifies_the_signed_attestations() {
    if !ssh_keygen_present("DSSE interop") || !securesystemslib_present("DSSE interop") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let spec = common::write_spec(dir.path(), common::free_port(), "v1", 1);
    let key = dir.path().join("signing.key");
    let pub_line = generate(&state, &key).lines().next().unwrap().to_owned();
    let fp = fingerprint_by_ssh_keygen(&dir.path().join("signing.key.pub"));

    // `kiln build --sign`: the build's attestations are signed as part of the build.
    let out = kiln(&state)
        .args(["build", "--sign", "--key"])
        .arg(&key)
        .arg("-f")
        .arg(&spec)
        .assert()
        .success()
        .stderr(predicate::str::contains("signed sha256:"))
        .get_output()
        .stdout
        .clone();
    let image = String::from_utf8(out).unwrap().trim().to_owned();

    let other_line = generate(&state, &dir.path().join("other.key"))
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let all = referrers(&state, &image);
    assert_eq!(of_type(&all, SIGNATURE).len(), 1, "{all:?}");
    let statements = of_type(&all, IN_TOTO);
    let envelopes = of_type(&all, DSSE);
    assert!(
        !statements.is_empty(),
        "every build attaches its SBOM and provenance: {all:?}"
    );
    assert_eq!(envelopes.len(), statements.len(), "{all:?}");
    for envelope in &envelopes {
        assert_eq!(envelope.annotations["dev.kiln.key"], fp.as_str());
        let predicate = envelope.annotations["in-toto.io/predicate-type"]
            .as_str()
            .unwrap();
        // The signed copy carries the very statement the unsigned one does.
        let parsed: Value = serde_json::from_slice(&envelope.payload).unwrap();
        assert_eq!(parsed["payloadType"], IN_TOTO);
        let statement = statements
            .iter()
            .find(|s| s.annotations["in-toto.io/predicate-type"] == predicate)
            .unwrap();
        let payload = python_b64decode(parsed["payload"].as_str().unwrap());
        assert_eq!(payload, statement.payload);

        assert!(sslib_verify(dir.path(), &envelope.payload, &pub_line, &fp).is_some());

        // Tampered: the payload changed (one more space in the statement) …
        let mut changed = parsed.clone();
        let mut text = statement.payload.clone();
        text.push(b' ');
        changed["payload"] = Value::String(python_b64encode(&text));
        let changed = serde_json::to_vec(&changed).unwrap();
        assert!(sslib_verify(dir.path(), &changed, &pub_line, &fp).is_none());
        // … or the signature changed.
        let mut forged = parsed.clone();
        let mut sig = python_b64decode(forged["signatures"][0]["sig"].as_str().unwrap());
        sig[0] ^= 1;
        forged["signatures"][0]["sig"] = Value::String(python_b64encode(&sig));
        let forged = serde_json::to_vec(&forged).unwrap();
        assert!(sslib_verify(dir.path(), &forged, &pub_line, &fp).is_none());
        // … or another key is the trusted one.
        assert!(sslib_verify(dir.path(), &envelope.payload, &other_line, &fp).is_none());
    }
}

/// Base64 through Python's standard library, so the test relies on no codec of kiln's.
fn python_b64decode(text: &str) -> Vec<u8> {
    let out = Std::new(PYTHON)
        .args([
            "-c",
            "import base64,sys; sys.stdout.buffer.write(base64.b64decode(sys.argv[1]))",
            text,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    out.stdout
}

fn python_b64encode(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let out = Std::new(PYTHON)
        .args([
            "-c",
            "import base64,sys; print(base64.b64encode(bytes.fromhex(sys.argv[1])).decode())",
            &hex,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn bad_keys_are_refused_with_a_clear_error() {
    if !ssh_keygen_present("bad key errors") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (state, _, image) = built(dir.path());
    let path = |name: &str| dir.path().join(name);
    let keygen = |args: &[&str], name: &str| {
        let mut all = vec!["-q", "-C", ""];
        all.extend_from_slice(args);
        let p = path(name);
        all.extend_from_slice(&["-f", p.to_str().unwrap()]);
        let made = ssh_keygen(&all);
        assert!(made.status.success(), "{made:?}");
    };
    keygen(&["-t", "ed25519", "-N", "correct horse"], "encrypted");
    keygen(&["-t", "rsa", "-b", "2048", "-N", ""], "rsa");
    fs::write(
        path("malformed"),
        "-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n-----END OPENSSH PRIVATE KEY-----\n",
    )
    .unwrap();

    let cases: [(&str, &[&str]); 5] = [
        (
            "encrypted",
            &["encrypted", "passphrase", "unencrypted ed25519 key"],
        ),
        ("missing", &["missing", "No such file"]),
        ("rsa", &["rsa", "ssh-rsa", "only with ed25519"]),
        ("malformed", &["malformed", "not an OpenSSH key"]),
        ("rsa.pub", &["rsa.pub", "ssh-rsa", "only with ed25519"]),
    ];
    for (name, expected) in cases {
        let mut assert = kiln(&state)
            .args(["sign", &image, "--key"])
            .arg(path(name))
            .assert()
            .code(1)
            .stderr(predicate::str::contains("cannot load the signing key"));
        for e in expected {
            assert = assert.stderr(predicate::str::contains(*e));
        }
        // The build is not signed either, and says so before doing anything else.
        kiln(&state)
            .args(["build", "--sign", "--key"])
            .arg(path(name))
            .arg("-f")
            .arg(dir.path().join("kiln.toml"))
            .assert()
            .code(1)
            .stderr(predicate::str::contains(name));
    }
    assert!(of_type(&referrers(&state, &image), SIGNATURE).is_empty());

    // No key at all is a usage error.
    kiln(&state)
        .args(["sign", &image])
        .env_remove("KILN_SIGNING_KEY")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--key"));
    kiln(&state)
        .args(["build", "--sign", "-f"])
        .arg(dir.path().join("kiln.toml"))
        .env_remove("KILN_SIGNING_KEY")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--key"));
}

/// An `ssh-agent` on a socket of the test's own; killed (`ssh-agent -k`) when dropped.
struct Agent {
    pid: String,
    socket: PathBuf,
}

impl Agent {
    fn start(dir: &Path) -> Agent {
        let socket = dir.join("agent.sock");
        let out = Std::new("ssh-agent")
            .arg("-s")
            .arg("-a")
            .arg(&socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        // "SSH_AUTH_SOCK=…; export SSH_AUTH_SOCK;\nSSH_AGENT_PID=1234; export SSH_AGENT_PID;"
        let text = String::from_utf8(out.stdout).unwrap();
        let pid = text
            .split("SSH_AGENT_PID=")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .unwrap()
            .to_owned();
        Agent { pid, socket }
    }

    fn add(&self, key: &Path) {
        let out = Std::new("ssh-add")
            .arg(key)
            .env("SSH_AUTH_SOCK", &self.socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Std::new("ssh-agent")
            .arg("-k")
            .env("SSH_AGENT_PID", &self.pid)
            .output();
    }
}

#[test]
fn ssh_agent_signs_for_a_public_key_file() {
    if !ssh_keygen_present("ssh-agent signing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (state, _, image) = built(dir.path());
    let key = dir.path().join("id_ed25519");
    let made = ssh_keygen(&[
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "agent@host",
        "-f",
        key.to_str().unwrap(),
    ]);
    assert!(made.status.success(), "{made:?}");
    let pub_path = dir.path().join("id_ed25519.pub");
    let pub_line = fs::read_to_string(&pub_path).unwrap();
    let agent = Agent::start(dir.path());
    agent.add(&key);

    // The agent signs: kiln is given only the public half.
    let sign = |key: &Path, sock: Option<&Path>| {
        let mut cmd = kiln(&state);
        cmd.args(["--json", "sign", &image, "--key"]).arg(key);
        match sock {
            Some(s) => cmd.env("SSH_AUTH_SOCK", s),
            None => cmd.env_remove("SSH_AUTH_SOCK"),
        };
        cmd.assert()
    };
    let out = sign(&pub_path, Some(&agent.socket))
        .success()
        .get_output()
        .stdout
        .clone();
    let report: Value = serde_json::from_slice(&out).unwrap();
    let attached = report["attached"].as_array().unwrap();
    assert!(
        attached.len() >= 3,
        "a signature and the build's attestations: {report}"
    );
    assert!(attached.iter().all(|a| a["new"] == true), "{report}");
    let all = referrers(&state, &image);
    let sigs = of_type(&all, SIGNATURE);
    assert_eq!(sigs.len(), 1, "{all:?}");
    assert!(ssh_verify(
        dir.path(),
        pub_line.trim(),
        "kiln-image",
        &sigs[0].payload,
        &blob(&state, &image)
    ));

    // The same key from its file makes the very same bytes: nothing new is attached.
    let out = sign(&key, None).success().get_output().stdout.clone();
    let again: Value = serde_json::from_slice(&out).unwrap();
    assert!(
        again["attached"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["new"] == false),
        "{again}"
    );

    // A key the agent does not hold, and no agent at all: clear errors, nothing signed.
    let other = dir.path().join("other");
    let made = ssh_keygen(&[
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "",
        "-f",
        other.to_str().unwrap(),
    ]);
    assert!(made.status.success(), "{made:?}");
    let other_pub = dir.path().join("other.pub");
    sign(&other_pub, Some(&agent.socket))
        .code(1)
        .stderr(predicate::str::contains("other.pub"))
        .stderr(predicate::str::contains("does not hold"));
    sign(&other_pub, None)
        .code(1)
        .stderr(predicate::str::contains("no SSH_AUTH_SOCK"));
    assert_eq!(referrers(&state, &image).len(), all.len());
}
