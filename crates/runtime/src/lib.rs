//! `kiln-runtime`: instances. The [`Provider`] trait is the seam between kiln and whatever
//! runs instances; [`LocalProvider`] runs them on this host with an OCI runtime (runc) on
//! read-only overlayfs roots; [`FakeProvider`] runs them in memory for tests of the code
//! above. Health checks ([`health`]) and drift detection are part of every provider's
//! observations.
//!
//! **API boundary:** this crate knows images only through [`ImageSource`] (layers and config
//! by digest) and knows nothing of releases, routes or rollout strategies. It reports state,
//! health and drift; deciding to replace an instance is the controller's job.

mod announce;
pub mod docker;
pub mod engines;
pub mod fake;
pub mod health;
pub mod image;
pub mod local;
mod ports;
mod private;
pub mod provider;
pub mod push;
mod rescan;
mod secrets;
pub mod swarm;
pub mod types;
mod user;

pub use docker::{DockerConfig, DockerProvider};
pub use engines::Engines;
pub use fake::FakeProvider;
pub use image::{DirImageSource, ImageConfig, ImageSource, ResolvedImage};
pub use local::host::{Check, CheckStatus, doctor};
pub use local::{LocalConfig, LocalProvider};
pub use provider::{Provider, ProviderError};
pub use swarm::{SwarmConfig, SwarmProvider};
pub use types::{
    Digest, DriftFinding, DriftReport, Health, InstanceId, InstancePaths, InstanceSpec,
    InstanceState, InvalidDigest, InvalidInstanceId, LogChunk, Observation, Secret, SecretBytes,
    Tmpfs,
};
