//! Signed checkpoints: the chain's head, signed with the daemon's ledger key and kept outside
//! the database, so a chain recomputed from an edit on (or cut short) no longer matches.
//!
//! A checkpoint signs `{"seq":N,"hash":"…","at_ms":T}` (plus `"reset":true` for the first
//! checkpoint after `--accept-broken-ledger`), that exact JSON, as an SSHSIG in namespace
//! [`NAMESPACE`], so `ssh-keygen -Y verify -n kiln-ledger` checks it with the public key. The
//! checkpoint file (`<state>/ledger.checkpoints`) is JSON lines, each line one [`Checkpoint`],
//! appended and fsynced; the key is `<state>/keys/ledger` (OpenSSH, `0600`) and its public
//! half `<state>/keys/ledger.pub`.
//!
//! **Invariant:** the checkpoint file is only appended to; the one cut it ever takes is of a
//! last line torn by a crash (no newline yet), which never verified.
//!
//! Current limitations: entries after the last checkpoint are held only by the chain; a
//! checkpoint file or key that an attacker with the state directory replaces as a whole is
//! caught only against a copy kept elsewhere (`kiln history --export`).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use kiln_sign::{PublicKey, SigningKey};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, VerifyError};

/// The SSHSIG namespace of a ledger checkpoint.
pub const NAMESPACE: &str = "kiln-ledger";

/// Where a state directory keeps the ledger's key and checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorFiles {
    /// The private key (OpenSSH format, `0600`).
    pub key: PathBuf,
    /// Its public half (`ssh-ed25519 AAAA… kiln-ledger`).
    pub public: PathBuf,
    /// The checkpoints, JSON lines.
    pub checkpoints: PathBuf,
}

impl AnchorFiles {
    /// The files of the state directory `state`.
    pub fn in_state(state: &Path) -> AnchorFiles {
        AnchorFiles {
            key: state.join("keys").join("ledger"),
            public: state.join("keys").join("ledger.pub"),
            checkpoints: state.join("ledger.checkpoints"),
        }
    }
}

/// The chain's head at one moment: what a checkpoint signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The last entry's sequence number (0: an empty chain).
    pub seq: u64,
    /// Its hash (hex), [`GENESIS`](crate::GENESIS) for an empty chain.
    pub hash: String,
    /// When it was signed, ms since the epoch.
    pub at_ms: i64,
    /// The first checkpoint after a broken ledger was accepted: the ones before are set aside.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
}

impl Head {
    /// The bytes signed: this head's JSON, fields in declaration order.
    pub fn message(&self) -> Vec<u8> {
        // A struct of numbers, strings and a bool always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// One line of the checkpoint file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// What was signed.
    #[serde(flatten)]
    pub head: Head,
    /// The signing key's fingerprint (`SHA256:…`), for people; the signature decides.
    pub key: String,
    /// The armored SSHSIG over [`Head::message`].
    pub signature: String,
}

/// What the checkpoints proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorReport {
    /// The ledger key's fingerprint.
    pub key: String,
    /// Checkpoints checked (signature and hash).
    pub checked: usize,
    /// Checkpoints before the last accepted break, not checked.
    pub set_aside: usize,
    /// The newest checkpoint checked.
    pub last: Option<Head>,
    /// Entries after it, held only by the chain.
    pub unsigned: u64,
}

/// The daemon's signer: the ledger key and the checkpoint file.
pub struct Notary {
    key: SigningKey,
    public: PublicKey,
    files: AnchorFiles,
    /// The head of the last checkpoint written (or read at load).
    last: Option<Head>,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { op, path, source }
}

fn sign_error(what: &Path) -> impl FnOnce(kiln_sign::SignError) -> Error {
    let what = what.display().to_string();
    move |e| Error::Corrupt {
        what,
        detail: e.to_string(),
    }
}

impl Notary {
    /// The ledger key of `files`, or `None` when there is none yet.
    pub fn load(files: &AnchorFiles) -> Result<Option<Notary>> {
        match std::fs::metadata(&files.key) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("stat", &files.key)(e)),
        }
        let key = SigningKey::load(&files.key).map_err(sign_error(&files.key))?;
        let public = key.public();
        let last = match read_checkpoints(&files.checkpoints) {
            Ok(Some(all)) => all.last().map(|c| c.head.clone()),
            _ => None,
        };
        Ok(Some(Notary {
            key,
            public,
            files: files.clone(),
            last,
        }))
    }

    /// Makes a new ledger key (`0600`, in a `0700` directory) and writes its public half.
    pub fn create(files: &AnchorFiles) -> Result<Notary> {
        if let Some(dir) = files.key.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io("create", dir))?;
        }
        let key = SigningKey::generate();
        key.write(&files.key, "kiln-ledger")
            .map_err(sign_error(&files.key))?;
        let public = key.public();
        // `write` leaves `<key>.pub`; the public file is named on its own in case it differs.
        let pub_path = {
            let mut p = files.key.as_os_str().to_owned();
            p.push(".pub");
            PathBuf::from(p)
        };
        if pub_path != files.public {
            kiln_durable::write(
                &files.public,
                format!("{}\n", public.to_openssh()).as_bytes(),
            )
            .map_err(io("write", &files.public))?;
        }
        Ok(Notary {
            key,
            public,
            files: files.clone(),
            last: None,
        })
    }

    /// The key that signs.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Where this notary keeps its files.
    pub fn files(&self) -> &AnchorFiles {
        &self.files
    }

    /// The head of the last checkpoint written.
    pub fn last(&self) -> Option<&Head> {
        self.last.as_ref()
    }

    /// Signs `head` and appends the checkpoint to the file, durably.
    pub fn sign(&mut self, head: Head) -> Result<Checkpoint> {
        let signature = kiln_sign::sshsig::sign(&self.key, NAMESPACE, &head.message())
            .map_err(sign_error(&self.files.key))?;
        let checkpoint = Checkpoint {
            head,
            key: self.public.fingerprint(),
            signature,
        };
        append_line(&self.files.checkpoints, &checkpoint)?;
        self.last = Some(checkpoint.head.clone());
        Ok(checkpoint)
    }
}

/// Appends one JSON line and fsyncs it (and the directory when the file is new). A last line
/// a crash left without its newline is cut first: it was never a checkpoint.
fn append_line(path: &Path, checkpoint: &Checkpoint) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let is_new = !path.exists();
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io("open", path))?;
    let len = file.metadata().map_err(io("stat", path))?.len();
    if len > 0 {
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(io("read", path))?;
        if text.last() != Some(&b'\n') {
            let keep = text
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i as u64 + 1);
            file.set_len(keep).map_err(io("cut a torn line of", path))?;
        }
    }
    file.seek(SeekFrom::End(0)).map_err(io("seek", path))?;
    let mut line = serde_json::to_vec(checkpoint).map_err(|e| Error::Corrupt {
        what: "new checkpoint".to_owned(),
        detail: e.to_string(),
    })?;
    line.push(b'\n');
    file.write_all(&line).map_err(io("append to", path))?;
    file.sync_all().map_err(io("fsync", path))?;
    if is_new && let Some(dir) = path.parent() {
        kiln_durable::sync_dir(dir).map_err(io("fsync", dir))?;
    }
    Ok(())
}

/// The checkpoints in `path`, oldest first; `None` when there is no file. A line that is not
/// a checkpoint is an error naming it; a last line without its newline (a torn append) is
/// left out.
pub fn read_checkpoints(path: &Path) -> std::result::Result<Option<Vec<Checkpoint>>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| {
                format!(
                    "line {} of {} is not a checkpoint: {e}",
                    i + 1,
                    path.display()
                )
            })
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Some)
}

/// The public ledger key of `files`, or `None` when there is none.
pub fn read_public(files: &AnchorFiles) -> std::result::Result<Option<PublicKey>, String> {
    let text = match std::fs::read_to_string(&files.public) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", files.public.display())),
    };
    PublicKey::parse_openssh(text.trim())
        .map(Some)
        .map_err(|e| format!("{} is not a public key: {e}", files.public.display()))
}

/// A ledger time (ms since the epoch) as RFC 3339. Clamped to 0000–9999 years: a hostile
/// checkpoint line or export may carry any number, and a later year cannot be formatted.
pub fn when(ms: i64) -> String {
    /// 9999-12-31T23:59:59.999Z.
    const LAST: u64 = 253_402_300_799_999;
    let ms = u64::try_from(ms).unwrap_or(0).min(LAST);
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

fn short(hash: &str) -> &str {
    hash.get(..16).unwrap_or(hash)
}

/// Checks `checkpoints` against the chain's stored `hashes` (entry `i + 1`'s at `i`): from
/// the last reset checkpoint whose signature holds (or the first) on, every signature must
/// verify with `key` and every checkpointed entry must be there with that hash.
pub(crate) fn check(
    hashes: &[String],
    key: &PublicKey,
    checkpoints: &[Checkpoint],
    file: &Path,
) -> std::result::Result<AnchorReport, VerifyError> {
    let verifies = |c: &Checkpoint| {
        kiln_sign::sshsig::verify(
            &c.signature,
            NAMESPACE,
            &c.head.message(),
            std::slice::from_ref(key),
        )
        .is_ok()
    };
    let start = checkpoints
        .iter()
        .rposition(|c| c.head.reset && verifies(c))
        .unwrap_or(0);
    let head_seq = hashes.len() as u64;
    let mut good: Option<&Checkpoint> = None;
    for (i, c) in checkpoints.iter().enumerate().skip(start) {
        let signed_at = when(c.head.at_ms);
        if !verifies(c) {
            return Err(VerifyError {
                seq: c.head.seq,
                what: format!("checkpoint on line {} of {}", i + 1, file.display()),
                reason: format!(
                    "its signature does not verify with the ledger key {}: the checkpoint was forged or the key replaced",
                    key.fingerprint()
                ),
            });
        }
        let trusted = match good {
            Some(g) => format!(
                "entries after {}, the last checkpoint that matches, cannot be trusted",
                g.head.seq
            ),
            None => "no earlier checkpoint matches, so no entry can be trusted".to_owned(),
        };
        if c.head.seq > head_seq {
            let first = head_seq + 1;
            let range = if first == c.head.seq {
                format!("entry {first} is missing")
            } else {
                format!("entries {first}–{} are missing", c.head.seq)
            };
            return Err(VerifyError {
                seq: first,
                what: "end of the chain".to_owned(),
                reason: format!(
                    "{range}: the checkpoint signed at {signed_at} says the chain reached {} (hash {}…); {trusted}",
                    c.head.seq,
                    short(&c.head.hash)
                ),
            });
        }
        let stored = match c.head.seq {
            0 => crate::GENESIS,
            n => hashes
                .get(usize::try_from(n - 1).unwrap_or(usize::MAX))
                .map_or("", String::as_str),
        };
        if stored != c.head.hash {
            let from = good.map_or(1, |g| g.head.seq + 1);
            return Err(VerifyError {
                seq: c.head.seq,
                what: "checkpointed entry".to_owned(),
                reason: format!(
                    "entry {} does not match the checkpoint signed at {signed_at} (hash {}…, stored {}…): \
                     the chain was rewritten from an entry between {from} and {}; {trusted}",
                    c.head.seq,
                    short(&c.head.hash),
                    short(stored),
                    c.head.seq
                ),
            });
        }
        good = Some(c);
    }
    let last = checkpoints.get(start..).and_then(<[Checkpoint]>::last);
    Ok(AnchorReport {
        key: key.fingerprint(),
        checked: checkpoints.len().saturating_sub(start),
        set_aside: start,
        last: last.map(|c| c.head.clone()),
        unsigned: head_seq.saturating_sub(last.map_or(0, |c| c.head.seq)),
    })
}
