//! Secrets: values the daemon reads from their sources (a file, its own environment, a
//! command) whenever an instance needs them, and never writes anywhere. A release records
//! only each secret's source and a keyed fingerprint (HMAC-SHA-256 under `secrets.key`, 32
//! random bytes in the state directory, `0600`), so a changed value is a changed release
//! without the value being in the ledger, and a guess cannot be checked against a leaked
//! ledger without the key.
//!
//! Values live in this process only: read at apply (and kept for that release's instances),
//! or, after a restart, read again and checked against the recorded fingerprint, so an
//! instance is never started with a value other than the one its release was applied with.
//!
//! **Invariant:** no value is logged, serialised, or part of an error message.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_runtime::{Secret, SecretBytes};
use sha2::{Digest as _, Sha256};

use crate::config::{SecretConfig, SecretSourceConfig};
use crate::error::{ControlError, Result};

/// The largest value a source may give.
pub const VALUE_CAP: usize = 64 << 10;
/// How long a secret's command may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// The prefix of a fingerprint.
const FINGERPRINT_PREFIX: &str = "hmac-sha256:";
/// The prefix of a redacted value: what an env value whose name looks secret shows.
pub const REDACTED_PREFIX: &str = "redacted:";

/// The key fingerprints are made with.
#[derive(Clone)]
pub struct SecretKey([u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// The key in `<state>/secrets.key`, made (32 random bytes, `0600`) if there is none.
    pub fn load_or_create(state: &Path) -> std::io::Result<SecretKey> {
        let path = state.join("secrets.key");
        for _ in 0..2 {
            match std::fs::read(&path) {
                Ok(bytes) => {
                    let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("{} is not 32 bytes", path.display()),
                        )
                    })?;
                    return Ok(SecretKey(key));
                }
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                Err(_) => {}
            }
            // Made whole beside it, then linked into place: a crash leaves no partial key,
            // and of two processes making one, the first link wins and both read it.
            let mut key = [0u8; 32];
            std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
            let tmp = state.join(format!(".secrets.key.{}", std::process::id()));
            {
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(&key)?;
                f.sync_all()?;
            }
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    std::fs::File::open(state)?.sync_all()?;
                    return Ok(SecretKey(key));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other(format!(
            "{} could not be made or read",
            path.display()
        )))
    }

    /// HMAC-SHA-256 (RFC 2104) of `name`, a NUL, and `value`.
    fn mac(&self, name: &str, value: &[u8]) -> [u8; 32] {
        const BLOCK: usize = 64;
        let mut k = [0u8; BLOCK];
        k[..32].copy_from_slice(&self.0);
        let pad = |byte: u8| -> [u8; BLOCK] { k.map(|b| b ^ byte) };
        let inner = Sha256::new()
            .chain_update(pad(0x36))
            .chain_update(name.as_bytes())
            .chain_update([0])
            .chain_update(value)
            .finalize();
        Sha256::new()
            .chain_update(pad(0x5c))
            .chain_update(inner)
            .finalize()
            .into()
    }

    /// A secret's fingerprint as a release records it.
    pub fn fingerprint(&self, name: &str, value: &[u8]) -> String {
        format!("{FINGERPRINT_PREFIX}{}", hex(&self.mac(name, value)))
    }

    /// What an env value whose name looks secret shows instead of itself: enough to tell a
    /// change, nothing to check a guess against without the key.
    pub fn redact(&self, name: &str, value: &str) -> String {
        format!(
            "{REDACTED_PREFIX}{}",
            &hex(&self.mac(name, value.as_bytes()))[..16]
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the password of a URL with credentials (`scheme://user:password@host…`) is in
/// `value`, if it has one.
fn url_password(value: &str) -> Option<std::ops::Range<usize>> {
    let start = value.find("://")? + 3;
    let authority_end = value[start..]
        .find(['/', '?', '#'])
        .map_or(value.len(), |i| start + i);
    let at = value[start..authority_end].rfind('@')? + start;
    let colon = value[start..at].find(':')? + start;
    (colon + 1 < at).then_some(colon + 1..at)
}

/// Whether an environment variable's name says it holds a secret (`DB_PASSWORD`,
/// `API_TOKEN`, `AWS_SECRET_ACCESS_KEY`…), so its value is not shown.
pub fn looks_secret(name: &str) -> bool {
    const WORDS: &[&str] = &[
        "PASSWORD",
        "PASSWD",
        "PASS",
        "PWD",
        "SECRET",
        "TOKEN",
        "KEY",
        "CREDENTIAL",
        "CREDENTIALS",
        "PRIVATE",
        "AUTH",
        "DSN",
        "CERT",
        "SALT",
    ];
    name.to_ascii_uppercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|w| WORDS.contains(&w))
}

/// Reads a secret's value from its source. Errors name the secret and the source, never the
/// value.
pub fn read(name: &str, source: &SecretSourceConfig) -> Result<SecretBytes> {
    let bad = |why: String| ControlError::Invalid(format!("secret {name}: {why}"));
    let value = match source {
        SecretSourceConfig::File(path) => read_file(path).map_err(bad)?,
        SecretSourceConfig::Env(var) => std::env::var_os(var)
            .map(std::os::unix::ffi::OsStringExt::into_vec)
            .ok_or_else(|| bad(format!("the daemon's environment has no {var}")))?,
        SecretSourceConfig::Command { argv, dir } => run(argv, dir).map_err(bad)?,
    };
    if value.len() > VALUE_CAP {
        return Err(bad(format!(
            "its value is larger than {} KiB",
            VALUE_CAP >> 10
        )));
    }
    Ok(SecretBytes::new(chomp(value)))
}

/// `text` with every value of `secrets` (of 4 bytes or more, as text) replaced by
/// `<secret NAME>`: for output that is recorded or answered.
pub fn scrub(text: &str, secrets: &[Secret]) -> String {
    let mut out = text.to_owned();
    for s in secrets {
        if let Ok(value) = std::str::from_utf8(s.value.expose())
            && value.len() >= 4
        {
            out = out.replace(value, &format!("<secret {}>", s.name));
        }
    }
    out
}

/// Reads the secrets of a spec for a one-off instance this process starts itself (`kiln run`,
/// `kiln test`): no release, so no fingerprint to check.
pub fn read_spec(secrets: &[kiln_spec::Secret]) -> Result<Vec<Secret>> {
    secrets
        .iter()
        .map(|s| {
            Ok(Secret {
                name: s.name.clone(),
                value: read(&s.name, &(&s.source).into())?,
                expose_env: s.expose_env,
            })
        })
        .collect()
}

/// One trailing newline dropped (`echo`, editors and password managers add one).
fn chomp(mut v: Vec<u8>) -> Vec<u8> {
    if v.last() == Some(&b'\n') {
        v.pop();
        if v.last() == Some(&b'\r') {
            v.pop();
        }
    }
    v
}

fn read_file(path: &Path) -> std::result::Result<Vec<u8>, String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // Non-blocking, so a FIFO cannot hang the open; then only a regular file is read.
    const O_NONBLOCK: i32 = 0o4000;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let regular = f.metadata().map(|m| m.is_file()).unwrap_or(false);
    if !regular {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut out = Vec::new();
    f.take(VALUE_CAP as u64 + 2)
        .read_to_end(&mut out)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(out)
}

/// Runs a secret's command in a process group of its own, so that neither it nor anything
/// it leaves behind outlives [`COMMAND_TIMEOUT`]: the whole group is killed when the command
/// ends or times out, and its output is read with the same deadline.
fn run(argv: &[String], dir: &Path) -> std::result::Result<Vec<u8>, String> {
    use std::os::unix::process::CommandExt as _;
    use std::sync::mpsc;
    let (program, args) = argv.split_first().ok_or("its command is empty")?;
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program:?}: {e}"))?;
    let group = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
    let kill_group = || {
        if let Some(g) = group {
            let _ = rustix::process::kill_process_group(g, rustix::process::Signal::KILL);
        }
    };
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let (out_tx, out_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = (&mut stdout).take(VALUE_CAP as u64 + 2).read_to_end(&mut v);
        let _ = out_tx.send(v);
    });
    let (err_tx, err_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = (&mut stderr).take(2048).read_to_end(&mut v);
        // The rest is read and dropped: a command writing more must not die of SIGPIPE.
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        let _ = err_tx.send(v);
    });
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let timed_out = || {
        format!(
            "{program:?} did not finish within {} s",
            COMMAND_TIMEOUT.as_secs()
        )
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                kill_group();
                let _ = child.wait();
                return Err(timed_out());
            }
            Err(e) => {
                kill_group();
                return Err(format!("{program:?}: {e}"));
            }
        }
    };
    // Whatever it started in the background goes with it, and the pipes close.
    kill_group();
    let left = deadline.saturating_duration_since(Instant::now());
    let value = out_rx.recv_timeout(left).map_err(|_| timed_out())?;
    let stderr = err_rx
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .unwrap_or_default();
    if !status.success() {
        // Its stderr is the command's own words about why; its stdout is never shown.
        return Err(format!(
            "{program:?} failed ({status}): {}",
            String::from_utf8_lossy(&stderr).trim()
        ));
    }
    Ok(value)
}

/// Secrets' values by (app, release).
type Kept = HashMap<(String, u64), Vec<Secret>>;

/// The daemon's secrets: the key, and the values of the releases applied since it started.
#[derive(Clone)]
pub(crate) struct Secrets {
    key: Option<SecretKey>,
    /// Values by (app, release).
    values: Arc<Mutex<Kept>>,
}

impl Secrets {
    /// `key` is `None` when the state directory has none and none could be made: then an
    /// app with secrets cannot be applied (nothing else needs it).
    pub fn new(key: Option<SecretKey>) -> Secrets {
        Secrets {
            key,
            values: Arc::default(),
        }
    }

    fn key(&self) -> Result<&SecretKey> {
        self.key.as_ref().ok_or_else(|| {
            ControlError::Invalid(
                "this daemon has no secrets key (<state>/secrets.key could not be made)".to_owned(),
            )
        })
    }

    /// Reads every secret of a release being applied and fills in its fingerprints; the
    /// values wait for the release's number ([`Secrets::keep`]).
    pub fn read_for_apply(
        &self,
        secrets: &mut BTreeMap<String, SecretConfig>,
    ) -> Result<Vec<Secret>> {
        if secrets.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.key()?;
        let mut out = Vec::new();
        for (name, s) in secrets.iter_mut() {
            let value = read(name, &s.source)?;
            s.fingerprint = Some(key.fingerprint(name, value.expose()));
            out.push(Secret {
                name: name.clone(),
                value,
                expose_env: s.expose_env,
            });
        }
        Ok(out)
    }

    /// Keeps the values of `app`'s `release` for its instances.
    pub fn keep(&self, app: &str, release: u64, values: Vec<Secret>) {
        if values.is_empty() {
            return;
        }
        let mut v = self.values.lock().unwrap_or_else(|p| p.into_inner());
        v.insert((app.to_owned(), release), values);
    }

    /// Forgets every value of `app` (it went down).
    pub fn forget(&self, app: &str) {
        let mut v = self.values.lock().unwrap_or_else(|p| p.into_inner());
        v.retain(|(a, _), _| a != app);
    }

    /// The values an instance of `app`'s `release` gets: the ones kept at apply, else read
    /// again and checked against the fingerprints the release recorded.
    pub fn for_instance(
        &self,
        app: &str,
        release: u64,
        secrets: &BTreeMap<String, SecretConfig>,
    ) -> Result<Vec<Secret>> {
        if secrets.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(kept) = self
            .values
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(app.to_owned(), release))
        {
            return Ok(kept.clone());
        }
        let key = self.key()?;
        let mut out = Vec::new();
        for (name, s) in secrets {
            let value = read(name, &s.source)?;
            if s.fingerprint.as_deref() != Some(key.fingerprint(name, value.expose()).as_str()) {
                return Err(ControlError::Invalid(format!(
                    "secret {name} of {app} release {release}: its value changed since the \
                     release was applied ({}); `kiln apply` to roll the new value out",
                    s.source
                )));
            }
            out.push(Secret {
                name: name.clone(),
                value,
                expose_env: s.expose_env,
            });
        }
        self.keep(app, release, out.clone());
        Ok(out)
    }

    /// The fingerprints `secrets` would have now, and the redacted forms of `env`'s values
    /// whose names look secret: what `kiln plan` compares with the running release.
    pub fn fingerprints(
        &self,
        secrets: &BTreeMap<String, SecretConfig>,
        env: &BTreeMap<String, String>,
    ) -> Result<(BTreeMap<String, String>, BTreeMap<String, String>)> {
        let key = self.key()?;
        let mut prints = BTreeMap::new();
        for (name, s) in secrets {
            let value = read(name, &s.source)?;
            prints.insert(name.clone(), key.fingerprint(name, value.expose()));
        }
        Ok((prints, self.redacted_env(env)))
    }

    /// `env` with the values of secret-looking names redacted (to `redacted:` and a short
    /// keyed fingerprint, or only `redacted` without a key).
    pub fn redacted_env(&self, env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        env.iter()
            .map(|(k, v)| {
                let shown = match (&self.key, looks_secret(k)) {
                    (Some(key), true) => key.redact(k, v),
                    (None, true) => "redacted".to_owned(),
                    (key, false) => match url_password(v) {
                        // `postgres://app:PASSWORD@db/x` under any name.
                        Some(range) => {
                            let shown = match key {
                                Some(key) => key.redact(k, &v[range.clone()]),
                                None => "redacted".to_owned(),
                            };
                            format!("{}{shown}{}", &v[..range.start], &v[range.end..])
                        }
                        None => v.clone(),
                    },
                };
                (k.clone(), shown)
            })
            .collect()
    }

    /// A release's stored configuration (JSON) with its env redacted as above.
    pub fn redact_config_json(&self, config: &mut serde_json::Value) {
        let Some(env) = config
            .get_mut("service")
            .and_then(|s| s.get_mut("env"))
            .and_then(serde_json::Value::as_object_mut)
        else {
            return;
        };
        for (k, v) in env.iter_mut() {
            if let Some(text) = v.as_str() {
                let shown = self.redacted_env(&BTreeMap::from([(k.clone(), text.to_owned())]));
                if let Some(s) = shown.get(k) {
                    *v = serde_json::Value::String(s.clone());
                }
            }
        }
    }
}

impl std::fmt::Display for SecretSourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSourceConfig::File(p) => write!(f, "file {}", p.display()),
            SecretSourceConfig::Env(v) => write!(f, "the daemon's ${v}"),
            SecretSourceConfig::Command { argv, .. } => write!(f, "command {argv:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_shape_and_keys_differ() {
        // RFC 4231 test case 2 has a 4-byte key; ours are 32 bytes, so check the
        // construction against a known answer computed with a 32-byte key of 0x0b.
        let key = SecretKey([0x0b; 32]);
        let a = key.fingerprint("A", b"v");
        assert!(a.starts_with("hmac-sha256:") && a.len() == 12 + 64, "{a}");
        assert_eq!(a, key.fingerprint("A", b"v"));
        assert_ne!(a, key.fingerprint("B", b"v"), "the name is part of it");
        assert_ne!(a, SecretKey([0x0c; 32]).fingerprint("A", b"v"));
        assert!(key.redact("DB_PASSWORD", "x").starts_with("redacted:"));
    }

    #[test]
    fn scrub_replaces_values_and_leaves_short_ones() {
        let s = |name: &str, v: &str| Secret {
            name: name.to_owned(),
            value: SecretBytes::new(v.as_bytes().to_vec()),
            expose_env: false,
        };
        let out = scrub(
            "connect postgres://app:hunter22@db failed; key abc",
            &[s("DB_PASSWORD", "hunter22"), s("SHORT", "abc")],
        );
        assert_eq!(
            out,
            "connect postgres://app:<secret DB_PASSWORD>@db failed; key abc"
        );
    }

    #[test]
    fn a_url_s_password_is_redacted_whatever_the_name() {
        let s = Secrets::new(Some(SecretKey([7; 32])));
        let env = BTreeMap::from([
            (
                "DATABASE_URL".to_owned(),
                "postgres://app:hunter22@db:5432/x".to_owned(),
            ),
            ("HOME_PAGE".to_owned(), "https://example.com/a@b".to_owned()),
        ]);
        let shown = s.redacted_env(&env);
        let db = &shown["DATABASE_URL"];
        assert!(
            db.starts_with("postgres://app:redacted:") && db.ends_with("@db:5432/x"),
            "{db}"
        );
        assert!(!db.contains("hunter22"));
        assert_eq!(shown["HOME_PAGE"], "https://example.com/a@b");
        assert_eq!(url_password("redis://:pw@h"), Some(9..11));
        assert_eq!(url_password("redis://user@h"), None);
    }

    #[test]
    fn names_that_look_secret() {
        for n in [
            "DB_PASSWORD",
            "api_token",
            "AWS_SECRET_ACCESS_KEY",
            "STRIPE_KEY",
            "DSN",
        ] {
            assert!(looks_secret(n), "{n}");
        }
        for n in ["PORT", "GREETING", "KEYBOARD_LAYOUT", "HELLO_DELAY_MS"] {
            assert!(!looks_secret(n), "{n}");
        }
    }

    #[test]
    fn sources_are_read_with_one_trailing_newline_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("db");
        std::fs::write(&file, "s3cr3t\n").unwrap();
        let v = read("DB", &SecretSourceConfig::File(file)).unwrap();
        assert_eq!(v.expose(), b"s3cr3t");
        let v = read(
            "T",
            &SecretSourceConfig::Command {
                argv: vec!["sh".into(), "-c".into(), "printf 'a\\nb\\n'".into()],
                dir: dir.path().to_owned(),
            },
        )
        .unwrap();
        assert_eq!(v.expose(), b"a\nb");
        let err = read(
            "T",
            &SecretSourceConfig::Command {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo hunter2; echo nope >&2; exit 3".into(),
                ],
                dir: dir.path().to_owned(),
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("secret T") && err.contains("nope"), "{err}");
        assert!(!err.contains("hunter2"), "stdout is never shown: {err}");
        let err = read(
            "M",
            &SecretSourceConfig::Env("KILN_TEST_NO_SUCH_VAR".into()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no KILN_TEST_NO_SUCH_VAR"), "{err}");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; VALUE_CAP + 10]).unwrap();
        assert!(read("B", &SecretSourceConfig::File(big)).is_err());
    }

    #[test]
    fn the_key_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = SecretKey::load_or_create(dir.path()).unwrap();
        let b = SecretKey::load_or_create(dir.path()).unwrap();
        assert_eq!(a.0, b.0);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("secrets.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
