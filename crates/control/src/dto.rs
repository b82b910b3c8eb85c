//! The API's data: what `kiln status`, `apply` and `rollback` send and receive. Wire formats,
//! so their own serde types; the controller builds them from its domain state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::ReleaseConfig;

/// The schema a migration left live, and the oldest schema code may expect and still work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveSchema {
    /// The schema version.
    pub schema: u32,
    /// Releases written for a schema older than this cannot run against it.
    pub compatible_from: u32,
    /// The release whose migration set it.
    pub release: u64,
}

impl LiveSchema {
    /// The stored form of the planner's live schema.
    pub fn from_domain(s: kiln_deploy::LiveSchema) -> LiveSchema {
        LiveSchema {
            schema: s.schema,
            compatible_from: s.compatible_from,
            release: s.release,
        }
    }

    /// The planner's form.
    pub fn into_domain(self) -> kiln_deploy::LiveSchema {
        kiln_deploy::LiveSchema {
            schema: self.schema,
            compatible_from: self.compatible_from,
            release: self.release,
        }
    }
}

/// A release's status line for `kiln status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Instance id.
    pub id: String,
    /// Release it runs.
    pub release: Option<u64>,
    /// created / running / exited / vanished.
    pub state: String,
    /// unknown / starting / healthy / unhealthy / failed.
    pub health: String,
    /// Where it listens.
    pub addr: String,
    /// Age in milliseconds.
    pub age_ms: u64,
    /// Whether it is in the route.
    pub routed: bool,
    /// Drift found, if any.
    pub drift: Option<String>,
}

/// `kiln status APP` as data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppStatus {
    /// The app.
    pub app: String,
    /// The release taking traffic (after a completed rollout: the rolled-out one).
    pub live: Option<u64>,
    /// The release being (or last) rolled out.
    pub release: u64,
    /// The release before it.
    pub stable: Option<u64>,
    /// progressing / completed / aborted.
    pub phase: String,
    /// Why it aborted.
    pub reason: Option<String>,
    /// The strategy of the release being rolled out.
    pub strategy: String,
    /// Canary: 1-based step.
    pub step: Option<usize>,
    /// Waiting for `kiln promote` (or `kiln abort`).
    pub awaiting_promotion: bool,
    /// Why it waits, when a person must decide rather than merely promote: e.g. `step 1
    /// (10%) inconclusive: 0 of 50 requests needed in 15s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting_decision: Option<String>,
    /// Desired instances.
    pub replicas: u32,
    /// Percent of traffic per release.
    pub weights: BTreeMap<u64, u32>,
    /// Where the router listens.
    pub listen: String,
    /// Why the router does not serve `listen` (the address could not be bound when the daemon
    /// started); retried on each reconcile pass.
    pub unserved: Option<String>,
    /// The image of the release being rolled out.
    pub image: String,
    /// Its runtime configuration.
    pub config: ReleaseConfig,
    /// Every instance.
    pub instances: Vec<InstanceStatus>,
    /// The live database schema, when migrations set one.
    #[serde(default)]
    pub schema: Option<LiveSchema>,
    /// What the router does with new requests: forwards, holds or answers a maintenance page.
    #[serde(default)]
    pub gate: GateStatus,
    /// The git source that follows this app (`kiln source`), when one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceStatus>,
}

/// A commit, as the git follower names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitBrief {
    /// 40 hex digits.
    pub id: String,
    /// `Name <email>`.
    pub author: String,
    /// The message's first line.
    pub summary: String,
    /// Author time, seconds since the epoch.
    pub time: i64,
}

/// A step the follower took for a commit (also the `source.step` event).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStep {
    /// The commit.
    pub commit: CommitBrief,
    /// `seen`, `build`, `test`, `plan`, `apply` or `rollout`.
    pub step: String,
    /// `passed`, `failed`, `skipped` or `waiting`.
    pub result: String,
    /// What it made or found (an image, a release, the changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Why it failed: the output's tail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// A planned commit waiting for `kiln sync` (`sync = "manual"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceWaiting {
    /// The commit.
    pub commit: CommitBrief,
    /// Its image, built and tested.
    pub image: String,
    /// What applying it changes, as `kiln plan` lists it.
    pub changes: Vec<String>,
}

/// A followed git source, as `kiln source list` and `kiln status` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// Its name.
    pub name: String,
    /// The repository, without credentials.
    pub url: String,
    /// The branch followed.
    pub branch: String,
    /// The spec's path in the repository.
    pub path: String,
    /// Milliseconds between polls.
    pub interval_ms: u64,
    /// `auto` or `manual`.
    pub sync: String,
    /// `new-commit` or `manual`.
    pub resume: String,
    /// Whether its spec may use secret sources and copy from outside the checkout.
    pub trusted: bool,
    /// Whether a webhook secret is set.
    pub webhook: bool,
    /// The app its spec names (once built).
    pub app: Option<String>,
    /// The branch's head at the last fetch.
    pub latest: Option<CommitBrief>,
    /// The commit of the app's live release.
    pub live_commit: Option<String>,
    /// The head is not what runs.
    pub differs: bool,
    /// Why the follower holds the app back after a rollback, while it does.
    pub pinned: Option<String>,
    /// Commits rolled back from, never applied again.
    #[serde(default)]
    pub bad: Vec<String>,
    /// A commit planned and waiting for `kiln sync`.
    pub waiting: Option<SourceWaiting>,
    /// The step running now.
    pub busy: Option<String>,
    /// Why the last fetch failed.
    pub error: Option<String>,
    /// The last step taken.
    pub last: Option<SourceStep>,
    /// Webhook calls refused since the daemon started (all sources).
    pub webhook_refused: u64,
}

/// What the router does with an app's new requests (`kiln pause`, `kiln maintenance`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum GateStatus {
    /// Forwards them.
    #[default]
    Open,
    /// Holds them.
    Paused {
        /// A request held longer is answered 503.
        max_hold_ms: u64,
        /// At most this many are held; past it the oldest is answered 503.
        max_held: usize,
        /// Held now.
        #[serde(default)]
        held: usize,
    },
    /// Answers them 503 with a message.
    Maintenance {
        /// The page's message.
        message: String,
        /// The 503's `Retry-After`, in seconds.
        retry_after_s: u64,
    },
}

/// What `apply` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyRequest {
    /// Manifest digest of a built (and, if the spec asks, tested) image.
    pub image: String,
    /// The runtime configuration.
    pub config: ReleaseConfig,
    /// Digest of the spec text.
    pub spec_digest: String,
    /// Git commit of the spec's tree.
    pub source_commit: Option<String>,
    /// Who applies. The API sets it from the connection (the socket peer's user, or the TCP
    /// token), whatever a client sends; only an in-process caller names it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub actor: String,
}

/// What a rollback did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackOutcome {
    /// The release that was live.
    pub from: u64,
    /// The release now live (or rolling out).
    pub to: u64,
    /// Whether the target was warm (a route swap) or is rolled out anew.
    pub warm: bool,
    /// Microseconds from the request to the route swap (warm only).
    pub switch_us: Option<u64>,
}

/// `POST /v1/fingerprints`: secrets and env as `kiln plan` would apply them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FingerprintRequest {
    /// Secrets by name (their fingerprints are ignored).
    #[serde(default)]
    pub secrets: BTreeMap<String, crate::config::SecretConfig>,
    /// The service's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// The answer to a [`FingerprintRequest`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Fingerprints {
    /// Each secret's fingerprint, as a release would record it.
    pub secrets: BTreeMap<String, String>,
    /// The env as `status` shows it: values of secret-looking names redacted.
    pub env: BTreeMap<String, String>,
}
