//! Signing through a running `ssh-agent` (`SSH_AUTH_SOCK`), for a key whose private half the
//! agent holds: kiln is given only the `.pub` file and never sees the private key.
//!
//! Only the two requests kiln needs of the agent protocol (draft-miller-ssh-agent) are spoken:
//! list identities (to refuse a key the agent does not hold before anything is signed) and
//! sign. Each request opens its own connection, as `ssh-keygen -Y sign` does.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::SignError;

const REQUEST_IDENTITIES: u8 = 11;
const IDENTITIES_ANSWER: u8 = 12;
const SIGN_REQUEST: u8 = 13;
const SIGN_RESPONSE: u8 = 14;
/// The most bytes an answer may have: a generous bound for a list of keys.
const MAX_MESSAGE: usize = 256 << 10;
/// An agent may ask its user to confirm a signature (`ssh-add -c`): give them time, but do
/// not wait for ever on an agent that went away without closing its socket.
const TIMEOUT: Duration = Duration::from_secs(120);

/// An ed25519 key held by the agent at `socket`, named by its wire-format public key blob.
#[derive(Clone)]
pub(crate) struct AgentKey {
    socket: PathBuf,
    blob: Vec<u8>,
}

impl AgentKey {
    /// The agent named by `SSH_AUTH_SOCK`, if it holds the key whose blob is `blob`.
    pub(crate) fn find(blob: Vec<u8>, fingerprint: &str) -> Result<AgentKey, SignError> {
        let socket = std::env::var_os("SSH_AUTH_SOCK")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| {
                SignError::Agent(format!(
                    "no SSH_AUTH_SOCK: a public key ({fingerprint}) signs only through a \
                     running ssh-agent holding its private half; give the private key file \
                     instead, or start an agent and `ssh-add` the key"
                ))
            })?;
        let key = AgentKey { socket, blob };
        let answer = key.request(&[REQUEST_IDENTITIES], IDENTITIES_ANSWER)?;
        let mut rest = answer.as_slice();
        let count = take_u32(&mut rest).ok_or_else(|| key.garbled("identities answer"))?;
        for _ in 0..count {
            let blob = take_string(&mut rest).ok_or_else(|| key.garbled("identities answer"))?;
            let _comment =
                take_string(&mut rest).ok_or_else(|| key.garbled("identities answer"))?;
            if blob == key.blob.as_slice() {
                return Ok(key);
            }
        }
        Err(SignError::Agent(format!(
            "the ssh-agent at {} does not hold {fingerprint} (`ssh-add` its private key file)",
            key.socket.display()
        )))
    }

    /// A raw 64-byte ed25519 signature of `msg`, made by the agent.
    pub(crate) fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, SignError> {
        let mut request = vec![SIGN_REQUEST];
        put_string(&mut request, &self.blob);
        put_string(&mut request, msg);
        request.extend_from_slice(&0u32.to_be_bytes()); // flags: none apply to ed25519
        let answer = self.request(&request, SIGN_RESPONSE)?;
        let mut rest = answer.as_slice();
        let mut sig = take_string(&mut rest).ok_or_else(|| self.garbled("signature"))?;
        let algorithm = take_string(&mut sig).ok_or_else(|| self.garbled("signature"))?;
        let raw = take_string(&mut sig).ok_or_else(|| self.garbled("signature"))?;
        if algorithm != b"ssh-ed25519" || raw.len() != 64 {
            return Err(self.garbled("signature (not a 64-byte ssh-ed25519 one)"));
        }
        Ok(raw.to_vec())
    }

    /// Sends one request on a new connection and returns the body of an answer of type
    /// `expected`; the agent's failure answer (or any other) is an error.
    fn request(&self, body: &[u8], expected: u8) -> Result<Vec<u8>, SignError> {
        let io = |e: std::io::Error| {
            SignError::Agent(format!("ssh-agent at {}: {e}", self.socket.display()))
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(io)?;
        stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
        let len = u32::try_from(body.len()).map_err(|_| self.garbled("request too large"))?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(body);
        stream.write_all(&framed).map_err(io)?;
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).map_err(io)?;
        let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
        if len == 0 || len > MAX_MESSAGE {
            return Err(self.garbled("answer length"));
        }
        let mut answer = vec![0u8; len];
        stream.read_exact(&mut answer).map_err(io)?;
        match answer.split_first() {
            Some((kind, rest)) if *kind == expected => Ok(rest.to_vec()),
            _ => Err(SignError::Agent(format!(
                "the ssh-agent at {} refused the request (does it need a confirmation, or is \
                 the key locked?)",
                self.socket.display()
            ))),
        }
    }

    fn garbled(&self, what: &str) -> SignError {
        SignError::Agent(format!(
            "the ssh-agent at {} sent a malformed {what}",
            self.socket.display()
        ))
    }
}

fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    // Callers pass a key blob or a message kiln made: far below 4 GiB.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

fn take_u32(input: &mut &[u8]) -> Option<u32> {
    let (n, rest) = input.split_first_chunk::<4>()?;
    *input = rest;
    Some(u32::from_be_bytes(*n))
}

/// One SSH `string` (u32 length, bytes) off the front of `input`.
pub(crate) fn take_string<'a>(input: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(take_u32(input)?).ok()?;
    let value = input.get(..len)?;
    *input = input.get(len..)?;
    Some(value)
}
