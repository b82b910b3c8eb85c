//! `instance.json`: what the local provider records about an instance so that a new kiln
//! process can adopt it (a storage format, so its own serde type), plus the process identity
//! kiln uses to tell a live instance from a recycled pid.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use kiln_spec::HealthCheck;
use serde::{Deserialize, Serialize};

use crate::provider::ProviderError;
use crate::types::{Digest, InstanceId};

/// The record of one instance, written once at create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InstanceRecord {
    pub version: u32,
    pub id: String,
    pub app: String,
    pub image: String,
    pub layers: Vec<String>,
    /// Also read by `ports::on_record`, so no provider gives the port to another instance.
    pub port: u16,
    pub writable: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub stop_grace_ms: u64,
    pub health: Option<HealthRecord>,
    pub command: Option<Vec<String>>,
    /// The digest of the bundle's `config.json` as written.
    pub config_digest: String,
    pub created_unix_ms: u64,
    pub runtime: String,
    /// Added after version 1 records were first written; absent means none.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The root inode of the cached copy of each layer the instance runs on, in the order of
    /// `layers`: after an eviction it tells the evicted copy from the fresh one. Absent in
    /// records written before layers were evicted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_roots: Vec<u64>,
    /// The instance's address in its own network namespace; absent on the host network
    /// (where it listens on 127.0.0.1:`port`), as in records written before namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::Ipv4Addr>,
    /// The names of its secrets (never their values), mounted at `/run/secrets`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// The process runs under kiln's init, bound at `/.kiln/init` (a mount point, so not
    /// drift); absent in records written before it, which had none.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init: bool,
}

/// `[service.health]` as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthRecord {
    pub path: Option<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub start_period_ms: u64,
}

impl From<&HealthCheck> for HealthRecord {
    fn from(h: &HealthCheck) -> HealthRecord {
        HealthRecord {
            path: h.path.clone(),
            interval_ms: ms(h.interval),
            timeout_ms: ms(h.timeout),
            healthy_threshold: h.healthy_threshold,
            unhealthy_threshold: h.unhealthy_threshold,
            start_period_ms: ms(h.start_period),
        }
    }
}

impl From<&HealthRecord> for HealthCheck {
    fn from(h: &HealthRecord) -> HealthCheck {
        HealthCheck {
            path: h.path.clone(),
            interval: Duration::from_millis(h.interval_ms),
            timeout: Duration::from_millis(h.timeout_ms),
            healthy_threshold: h.healthy_threshold,
            unhealthy_threshold: h.unhealthy_threshold,
            start_period: Duration::from_millis(h.start_period_ms),
        }
    }
}

pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl InstanceRecord {
    /// Reads and checks a record.
    pub(crate) fn read(path: &Path) -> Result<InstanceRecord, ProviderError> {
        let bytes = std::fs::read(path).map_err(ProviderError::io("read", path))?;
        let bad = |message: String| ProviderError::Record {
            path: path.to_path_buf(),
            message,
        };
        let record: InstanceRecord =
            serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        record.id().map_err(|e| bad(e.to_string()))?;
        record.image().map_err(|e| bad(e.to_string()))?;
        record.layer_digests().map_err(|e| bad(e.to_string()))?;
        Digest::parse(&record.config_digest).map_err(|e| bad(e.to_string()))?;
        Ok(record)
    }

    pub(crate) fn id(&self) -> Result<InstanceId, crate::types::InvalidInstanceId> {
        InstanceId::new(&self.id)
    }

    pub(crate) fn image(&self) -> Result<Digest, crate::types::InvalidDigest> {
        Digest::parse(&self.image)
    }

    pub(crate) fn layer_digests(&self) -> Result<Vec<Digest>, crate::types::InvalidDigest> {
        self.layers.iter().map(|l| Digest::parse(l)).collect()
    }

    /// Each layer with the root inode of the copy the instance runs on, when recorded.
    pub(crate) fn cached_layers(
        &self,
    ) -> Result<Vec<(Digest, Option<u64>)>, crate::types::InvalidDigest> {
        let roots = self.layer_roots.iter().copied().map(Some);
        Ok(self
            .layer_digests()?
            .into_iter()
            .zip(roots.chain(std::iter::repeat(None)))
            .collect())
    }

    pub(crate) fn config_digest(&self) -> Digest {
        Digest::parse(&self.config_digest).unwrap_or_else(|_| Digest::of(b""))
    }

    /// Every path something is mounted on in the instance's root, besides the defaults: the
    /// writable tmpfs, `/run/secrets` when it has secrets, `/.kiln` when it has kiln's init.
    pub(crate) fn mount_destinations(&self) -> Vec<String> {
        let mut out = self.writable.clone();
        if !self.secrets.is_empty() {
            out.push(crate::types::SECRETS_DIR.to_owned());
        }
        if self.init {
            out.push(crate::types::INIT_DIR.to_owned());
        }
        out
    }

    /// Where the instance listens: its own address, else the host's loopback.
    pub(crate) fn addr(&self) -> std::net::SocketAddr {
        match self.address {
            Some(ip) => std::net::SocketAddr::from((ip, self.port)),
            None => crate::ports::local_addr(self.port),
        }
    }

    pub(crate) fn created(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(self.created_unix_ms)
    }
}

/// A process as the kernel knows it: pid plus start time (clock ticks since boot), so a pid
/// reused by another process after the instance exited is not mistaken for the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcIdentity {
    pub pid: u32,
    start_ticks: u64,
}

impl ProcIdentity {
    /// The identity of `pid` now, if it runs (zombies do not count).
    pub(crate) fn of(pid: u32) -> Option<ProcIdentity> {
        let (state, start_ticks) = proc_stat(pid)?;
        (state != 'Z' && state != 'X').then_some(ProcIdentity { pid, start_ticks })
    }

    /// Whether the same process still runs.
    pub(crate) fn alive(&self) -> bool {
        ProcIdentity::of(self.pid).is_some_and(|now| now == *self)
    }
}

/// `(state, starttime)` from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    if pid == 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = text.get(text.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 of the full line is starttime; `rest` starts at field 3.
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn this_process_has_a_stable_identity() {
        let me = ProcIdentity::of(std::process::id()).unwrap();
        assert!(me.alive());
        assert_eq!(ProcIdentity::of(0), None);
        let fake = ProcIdentity {
            pid: me.pid,
            start_ticks: me.start_ticks + 1,
        };
        assert!(
            !fake.alive(),
            "a different start time is a different process"
        );
    }
}
