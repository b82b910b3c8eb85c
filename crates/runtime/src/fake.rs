//! An in-memory [`Provider`] for fast tests of the code above the trait (the controller):
//! instances are entries in a map, and the test drives what a real provider would observe —
//! health changes, exits, drift, vanishing — through [`FakeProvider`]'s own methods. It keeps
//! the real lifecycle rules (state checks, idempotent `stop`/`destroy`) so code tested against
//! it is not surprised by the local provider.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::{broadcast, watch};

use crate::ports::local_addr;
use crate::provider::{Provider, ProviderError};
use crate::types::{
    DriftFinding, DriftReport, Health, InstanceId, InstanceSpec, InstanceState, LogChunk,
    Observation,
};

struct FakeInstance {
    spec: InstanceSpec,
    state: InstanceState,
    exit_code: Option<i32>,
    health: watch::Sender<Health>,
    port: u16,
    logs: Vec<u8>,
    drift: Vec<DriftFinding>,
    created: SystemTime,
}

/// The in-memory provider.
pub struct FakeProvider {
    instances: Mutex<BTreeMap<InstanceId, FakeInstance>>,
    next_port: Mutex<u16>,
    drift_tx: broadcast::Sender<DriftReport>,
    /// When set, `start` makes instances healthy at once (the usual case in tests).
    auto_healthy: bool,
}

impl std::fmt::Debug for FakeProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeProvider").finish_non_exhaustive()
    }
}

impl Default for FakeProvider {
    fn default() -> FakeProvider {
        FakeProvider::new(true)
    }
}

impl FakeProvider {
    /// A provider whose started instances become healthy at once (`auto_healthy`) or stay
    /// `starting` until [`FakeProvider::set_health`].
    pub fn new(auto_healthy: bool) -> FakeProvider {
        let (drift_tx, _) = broadcast::channel(64);
        FakeProvider {
            instances: Mutex::new(BTreeMap::new()),
            next_port: Mutex::new(20_000),
            drift_tx,
            auto_healthy,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<InstanceId, FakeInstance>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets an instance's health, as a health check would.
    pub fn set_health(&self, id: &InstanceId, health: Health) {
        if let Some(i) = self.lock().get(id) {
            i.health.send_replace(health);
        }
    }

    /// Makes a running instance exit with `code`, as if its process ended.
    pub fn exit(&self, id: &InstanceId, code: i32) {
        if let Some(i) = self.lock().get_mut(id) {
            i.state = InstanceState::Exited;
            i.exit_code = Some(code);
            i.health.send_replace(Health::Failed);
        }
    }

    /// Makes an instance vanish, as if removed behind kiln's back.
    pub fn vanish(&self, id: &InstanceId) {
        if let Some(i) = self.lock().get_mut(id) {
            i.state = InstanceState::Vanished;
            i.health.send_replace(Health::Failed);
        }
    }

    /// Appends output to an instance's log.
    pub fn write_log(&self, id: &InstanceId, bytes: &[u8]) {
        if let Some(i) = self.lock().get_mut(id) {
            i.logs.extend_from_slice(bytes);
        }
    }

    /// Reports drift on an instance: published at once and returned by `check_drift`.
    pub fn drift(&self, id: &InstanceId, findings: Vec<DriftFinding>) {
        if let Some(i) = self.lock().get_mut(id) {
            i.drift.extend(findings);
            let _ = self.drift_tx.send(DriftReport {
                instance: id.clone(),
                findings: i.drift.clone(),
                at: SystemTime::now(),
            });
        }
    }

    /// The spec an instance was created from.
    pub fn spec(&self, id: &InstanceId) -> Option<InstanceSpec> {
        self.lock().get(id).map(|i| i.spec.clone())
    }

    fn observation(id: &InstanceId, i: &FakeInstance) -> Observation {
        Observation {
            id: id.clone(),
            image: i.spec.image.clone(),
            app: i.spec.app.clone(),
            state: i.state,
            exit_code: i.exit_code,
            health: *i.health.borrow(),
            addr: local_addr(i.port),
            pid: (i.state == InstanceState::Running).then_some(1),
            listening: None,
            created: i.created,
            labels: i.spec.labels.clone(),
        }
    }
}

#[async_trait]
impl Provider for FakeProvider {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn create(&self, spec: InstanceSpec) -> Result<InstanceId, ProviderError> {
        let id = InstanceId::generate(&spec.app);
        let port = match spec.port {
            Some(p) => p,
            None => {
                let mut next = self.next_port.lock().unwrap_or_else(|p| p.into_inner());
                *next = next.wrapping_add(1);
                *next
            }
        };
        let (health, _) = watch::channel(Health::Unknown);
        self.lock().insert(
            id.clone(),
            FakeInstance {
                spec,
                state: InstanceState::Created,
                exit_code: None,
                health,
                port,
                logs: Vec::new(),
                drift: Vec::new(),
                created: SystemTime::now(),
            },
        );
        Ok(id)
    }

    async fn start(&self, id: &InstanceId) -> Result<(), ProviderError> {
        let mut instances = self.lock();
        let i = instances
            .get_mut(id)
            .ok_or_else(|| ProviderError::NotFound(id.clone()))?;
        if i.state != InstanceState::Created {
            return Err(ProviderError::InvalidState {
                id: id.clone(),
                action: "start",
                state: i.state.as_str(),
            });
        }
        i.state = InstanceState::Running;
        let health = match (&i.spec.health, self.auto_healthy) {
            (None, _) => Health::Unknown,
            (Some(_), true) => Health::Healthy,
            (Some(_), false) => Health::Starting,
        };
        i.health.send_replace(health);
        Ok(())
    }

    async fn stop(&self, id: &InstanceId, _grace: Duration) -> Result<(), ProviderError> {
        let mut instances = self.lock();
        let i = instances
            .get_mut(id)
            .ok_or_else(|| ProviderError::NotFound(id.clone()))?;
        if i.state == InstanceState::Running {
            i.state = InstanceState::Exited;
            // SIGTERM'd processes that honour it exit 143 under runc.
            i.exit_code = Some(143);
            i.health.send_replace(Health::Failed);
        }
        Ok(())
    }

    async fn destroy(&self, id: &InstanceId) -> Result<(), ProviderError> {
        if let Some(i) = self.lock().remove(id) {
            i.health.send_replace(Health::Failed);
        }
        Ok(())
    }

    async fn observe(&self, id: &InstanceId) -> Result<Observation, ProviderError> {
        self.lock()
            .get(id)
            .map(|i| FakeProvider::observation(id, i))
            .ok_or_else(|| ProviderError::NotFound(id.clone()))
    }

    async fn list(&self) -> Result<Vec<Observation>, ProviderError> {
        Ok(self
            .lock()
            .iter()
            .map(|(id, i)| FakeProvider::observation(id, i))
            .collect())
    }

    async fn logs(&self, id: &InstanceId, from: u64) -> Result<LogChunk, ProviderError> {
        let instances = self.lock();
        let i = instances
            .get(id)
            .ok_or_else(|| ProviderError::NotFound(id.clone()))?;
        let start = usize::try_from(from)
            .unwrap_or(usize::MAX)
            .min(i.logs.len());
        Ok(LogChunk {
            data: i.logs[start..].to_vec(),
            next: i.logs.len() as u64,
        })
    }

    async fn check_drift(&self, id: &InstanceId) -> Result<Option<DriftReport>, ProviderError> {
        let instances = self.lock();
        let i = instances
            .get(id)
            .ok_or_else(|| ProviderError::NotFound(id.clone()))?;
        let mut findings = i.drift.clone();
        if i.state == InstanceState::Vanished {
            findings.push(DriftFinding::Vanished {
                what: "process".to_owned(),
            });
        }
        Ok((!findings.is_empty()).then(|| DriftReport {
            instance: id.clone(),
            findings,
            at: SystemTime::now(),
        }))
    }

    fn drift_events(&self) -> broadcast::Receiver<DriftReport> {
        self.drift_tx.subscribe()
    }

    async fn health(&self, id: &InstanceId) -> Result<watch::Receiver<Health>, ProviderError> {
        self.lock()
            .get(id)
            .map(|i| i.health.subscribe())
            .ok_or_else(|| ProviderError::NotFound(id.clone()))
    }

    async fn wait(&self, id: &InstanceId) -> Result<Option<i32>, ProviderError> {
        let mut health = self.health(id).await?;
        let _ = health.wait_for(|h| *h == Health::Failed).await;
        Ok(self.lock().get(id).and_then(|i| i.exit_code))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::BTreeMap;

    use super::*;
    use crate::types::Digest;

    fn spec() -> InstanceSpec {
        InstanceSpec {
            image: Digest::of(b"image"),
            app: "hello".to_owned(),
            env: BTreeMap::new(),
            writable: vec![crate::types::Tmpfs::new("/tmp", 64 << 20)],
            memory: None,
            cpus: None,
            stop_grace: Duration::from_secs(1),
            init: false,
            health: Some(kiln_spec::HealthCheck {
                path: Some("/healthz".to_owned()),
                interval: Duration::from_millis(500),
                timeout: Duration::from_millis(500),
                healthy_threshold: 1,
                unhealthy_threshold: 2,
                start_period: Duration::from_secs(1),
            }),
            port: None,
            container_port: None,
            command: None,
            labels: BTreeMap::new(),
            target: kiln_spec::TargetSpec::default(),
            user: None,
            pids: 512,
            seccomp: kiln_spec::Seccomp::Default,
            network: kiln_spec::Network::Kiln,
            capabilities: Vec::new(),
            secrets: Vec::new(),
        }
    }

    #[tokio::test]
    async fn the_fake_keeps_the_lifecycle_rules() {
        let p = FakeProvider::new(false);
        let id = p.create(spec()).await.unwrap();
        assert_eq!(p.observe(&id).await.unwrap().state, InstanceState::Created);
        p.start(&id).await.unwrap();
        assert!(matches!(
            p.start(&id).await,
            Err(ProviderError::InvalidState { .. })
        ));
        let mut health = p.health(&id).await.unwrap();
        assert_eq!(*health.borrow(), Health::Starting);
        p.set_health(&id, Health::Healthy);
        health.changed().await.unwrap();
        assert_eq!(*health.borrow(), Health::Healthy);

        let mut drift = p.drift_events();
        p.drift(
            &id,
            vec![DriftFinding::Write {
                path: "/etc/passwd".to_owned(),
            }],
        );
        let report = drift.recv().await.unwrap();
        assert_eq!(report.instance, id);
        assert_eq!(report.paths(), ["/etc/passwd"]);
        assert!(p.check_drift(&id).await.unwrap().is_some());

        p.write_log(&id, b"line\n");
        let chunk = p.logs(&id, 0).await.unwrap();
        assert_eq!((chunk.data.as_slice(), chunk.next), (&b"line\n"[..], 5));

        p.exit(&id, 3);
        assert_eq!(p.wait(&id).await.unwrap(), Some(3));
        let obs = p.observe(&id).await.unwrap();
        assert_eq!(
            (obs.state, obs.health),
            (InstanceState::Exited, Health::Failed)
        );
        p.stop(&id, Duration::ZERO).await.unwrap();
        p.destroy(&id).await.unwrap();
        p.destroy(&id).await.unwrap();
        assert!(matches!(
            p.observe(&id).await,
            Err(ProviderError::NotFound(_))
        ));
        assert!(p.list().await.unwrap().is_empty());
    }
}
