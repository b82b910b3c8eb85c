//! The catalog: every key `kiln.toml` accepts, with its kind, default and documentation.
//!
//! This table is the single source for three things that must never disagree: the decoder's
//! knowledge of which keys exist (unknown keys are errors with a "did you mean" hint), the JSON
//! Schema that `kiln schema` prints, and the reference in `docs/config.md` (a test regenerates
//! it and fails when the committed file differs).

use crate::rules::{self, Bounds};
use crate::types::OnInconclusive;

/// One key of a table.
#[derive(Debug)]
pub struct Field {
    /// The key as written in `kiln.toml`.
    pub key: &'static str,
    /// What the value must be.
    pub kind: Kind,
    /// Whether the key must be present.
    pub required: bool,
    /// The default as a TOML literal (`8080`, `"30s"`), used when the key is absent.
    pub default: Option<&'static str>,
    /// One or two sentences for the reference and the schema's `description`.
    pub doc: &'static str,
}

/// The kinds of values the decoder understands.
#[derive(Debug)]
pub enum Kind {
    /// Any string (further checks happen when the typed spec is built).
    String,
    /// A string matching a regular expression (also emitted in the JSON Schema).
    Pattern(&'static str),
    /// `true` or `false`.
    Bool,
    /// A whole number within bounds (the [`rules`](crate::rules) constants).
    Integer(Bounds),
    /// A number (integer or float) that must be greater than zero.
    Positive,
    /// A humane duration string: `"500ms"`, `"10s"`, `"2m"`, `"1h 30m"`.
    Duration,
    /// A humane size string (`"256MiB"`, `"1GiB"`) or a number of bytes.
    Size,
    /// One of a fixed set of strings.
    Enum(&'static [&'static str]),
    /// A list of strings.
    StringList,
    /// A table of string values (`env`, `labels`).
    StringMap,
    /// A whole number, or a percentage string like `"25%"`.
    CountOrPercent,
    /// A fraction between 0 and 1, or a percentage string like `"1%"`.
    Ratio,
    /// A sub-table.
    Table(&'static [Field]),
    /// An array of tables (`[[image.copy]]`).
    TableList(&'static [Field]),
    /// A list whose items are each a path string or an inline table of these fields, one of
    /// them a required `path` (`writable = ["/tmp", { path = "/var/cache", size = "1GiB" }]`).
    PathList(&'static [Field]),
    /// A table whose keys the user names, each value a table of these fields
    /// (`[service.secrets] DB_PASSWORD = { file = "db.txt" }`).
    NamedTables(&'static [Field]),
}

const fn field(key: &'static str, kind: Kind, doc: &'static str) -> Field {
    Field {
        key,
        kind,
        required: false,
        default: None,
        doc,
    }
}

const fn required(key: &'static str, kind: Kind, doc: &'static str) -> Field {
    Field {
        key,
        kind,
        required: true,
        default: None,
        doc,
    }
}

const fn default(key: &'static str, kind: Kind, default: &'static str, doc: &'static str) -> Field {
    Field {
        key,
        kind,
        required: false,
        default: Some(default),
        doc,
    }
}

/// The pattern an app name must match.
pub const NAME_PATTERN: &str = "^[a-z][a-z0-9-]{0,39}$";

/// The top level of `kiln.toml`.
pub const ROOT: &[Field] = &[
    required(
        "name",
        Kind::Pattern(NAME_PATTERN),
        "The app's name: a lowercase letter, then up to 39 lowercase letters, digits or `-`. \
         It names the image tag, the releases and the instances.",
    ),
    required("image", Kind::Table(IMAGE), "How to build the app's image."),
    required(
        "service",
        Kind::Table(SERVICE),
        "How to run an instance of the image.",
    ),
    field(
        "deploy",
        Kind::Table(DEPLOY),
        "How a new release replaces the current one.",
    ),
    field(
        "route",
        Kind::Table(ROUTE),
        "Where kiln's router listens for the app's traffic, and how. A running app keeps its \
         `[route]`: to change it, `kiln down` the app first.",
    ),
    field("target", Kind::Table(TARGET), "Where instances run."),
    field(
        "policy",
        Kind::Table(POLICY),
        "What the daemon requires of an image before it runs a release of this app, checked \
         at apply and again at every instance create. The daemon's own policy (`kiln serve \
         --policy`) applies too: a release must pass both.",
    ),
];

/// The daemon's policy file (`kiln serve --policy`): a `[policy]` table as in `kiln.toml`.
pub(crate) const DAEMON_POLICY: &[Field] = &[field(
    "policy",
    Kind::Table(POLICY),
    "What the daemon requires of every image it runs, whatever the app's spec says.",
)];

/// Proofs `[policy] require` accepts.
pub const PROOFS: &[&str] = &["signature", "tested", "provenance", "sbom"];

const POLICY: &[Field] = &[
    field(
        "keys",
        Kind::StringList,
        "Public keys trusted to sign this app's images and attestations: OpenSSH \
         `ssh-ed25519 AAAA…` lines, or paths (relative to kiln.toml) of files of such lines \
         (`.pub` files, `allowed_signers`-style lists without principals). With keys, an \
         attestation counts only when one of them signed it.",
    ),
    field(
        "require",
        Kind::StringList,
        "The proofs an image must carry: `signature` (`kiln sign` by one of `keys`), \
         `tested` (a passed `kiln test`), `provenance` (the SLSA provenance `kiln build` \
         writes), `sbom` (its SPDX SBOM).",
    ),
    default(
        "source",
        Kind::Enum(&["any", "git", "git-clean"]),
        "\"any\"",
        "What the image's provenance must say of its source: `git`, built from a git \
         commit; `git-clean`, from a commit with a clean work tree; `any`, nothing.",
    ),
];

/// Strategies `[deploy] strategy` accepts.
pub const STRATEGIES: &[&str] = &["rolling", "blue-green", "canary"];

const IMAGE: &[Field] = &[
    default(
        "base",
        Kind::String,
        "\"scratch\"",
        "The base image: `\"scratch\"` (empty), `\"oci:PATH[:TAG|@sha256:…]\"` (an OCI image \
         layout directory), `\"docker-archive:PATH\"` (`docker save` output) or \
         `\"rootfs:PATH\"` (a directory, `.tar` or `.tar.gz` used as the base layer). Paths are \
         relative to `kiln.toml`.",
    ),
    field(
        "entrypoint",
        Kind::StringList,
        "The program and its first arguments, e.g. `[\"/hello\"]`. Overrides the base's.",
    ),
    field(
        "cmd",
        Kind::StringList,
        "Arguments appended to the entrypoint. Overrides the base's.",
    ),
    field(
        "env",
        Kind::StringMap,
        "Environment baked into the image, added to (and overriding) the base's.",
    ),
    field(
        "workdir",
        Kind::String,
        "The working directory of the process (an absolute path).",
    ),
    field(
        "user",
        Kind::String,
        "The user the process runs as: `UID` or `UID:GID` (numbers, so the image needs no \
         `/etc/passwd`).",
    ),
    field(
        "labels",
        Kind::StringMap,
        "OCI labels recorded in the image config.",
    ),
    default(
        "compression",
        Kind::Enum(&["gzip", "zstd"]),
        "\"gzip\"",
        "How layers are compressed. `gzip` is read by every OCI tool and Docker.",
    ),
    field(
        "copy",
        Kind::TableList(COPY),
        "Files to put in the image; each `[[image.copy]]` becomes one layer.",
    ),
    field(
        "test",
        Kind::Table(IMAGE_TEST),
        "How `kiln test` proves the image works before it can be released.",
    ),
];

const COPY: &[Field] = &[
    required(
        "from",
        Kind::String,
        "A file or directory, relative to `kiln.toml`. It must exist, inside the directory of \
         `kiln.toml` unless `allow_outside` is set.",
    ),
    required(
        "to",
        Kind::String,
        "Where it goes in the image: an absolute, normalised path.",
    ),
    field(
        "mode",
        Kind::String,
        "Permission bits for copied files as an octal string, e.g. `\"0755\"`; default: the \
         source's bits.",
    ),
    default(
        "owner",
        Kind::String,
        "\"0:0\"",
        "Owner of copied files as `UID:GID` (numbers).",
    ),
    field(
        "exclude",
        Kind::StringList,
        "Glob patterns (relative to `from`) of files to leave out.",
    ),
    default(
        "closure",
        Kind::Bool,
        "false",
        "Also copy an ELF binary's shared-library closure (its `DT_NEEDED` libraries and the \
         dynamic loader), so a dynamically linked binary runs on `scratch`.",
    ),
    default(
        "allow_outside",
        Kind::Bool,
        "false",
        "Allow `from` to resolve (symlinks and `..` resolved) outside the directory of \
         `kiln.toml`, e.g. `\"/bin/busybox\"`. Without it such a `from` is an error, so a spec \
         cannot bake a host file such as `/etc/shadow` into an image unnoticed.",
    ),
];

const IMAGE_TEST: &[Field] = &[
    field(
        "command",
        Kind::StringList,
        "A command run once inside the image; it must exit 0.",
    ),
    field(
        "http",
        Kind::String,
        "A path (e.g. `\"/healthz\"`) that must answer 2xx on a started instance.",
    ),
    default(
        "timeout",
        Kind::Duration,
        "\"30s\"",
        "How long the test may take.",
    ),
];

const SERVICE: &[Field] = &[
    default(
        "port",
        Kind::Integer(rules::PORT),
        "8080",
        "The port the app listens on inside an instance's own network namespace; the router \
         reaches each instance at its own address on it. With `network = \"host\"` on the \
         local provider kiln picks a free port per instance instead. Either way kiln sets \
         `$PORT`; an app with a fixed port in its own config just sets this key to it.",
    ),
    default(
        "network",
        Kind::String,
        "\"kiln\"",
        "The network an instance joins. `kiln`: its own network namespace on kiln's bridge \
         (`kiln0`, 10.209.0.0/16, made with the CNI plugins `bridge` and `host-local`; on \
         docker, the engine's bridge). The instance cannot reach the host's \
         loopback services, and what it listens on is reachable from this host only (the \
         router, health checks), never from other machines. `host`: the host's network, an \
         explicit weakening (local provider only). Any other name: its own \
         namespace on the CNI network list of that name in `/etc/cni/net.d`.",
    ),
    default(
        "replicas",
        Kind::Integer(rules::REPLICAS),
        "1",
        "How many instances serve the live release.",
    ),
    field(
        "env",
        Kind::StringMap,
        "Environment for each instance, on top of the image's. `PORT` is set by kiln.",
    ),
    field(
        "writable",
        Kind::PathList(WRITABLE),
        "Absolute paths mounted as tmpfs, the only places an instance can write: `\"/tmp\"`, \
         or `{ path = \"/var/cache\", size = \"256MiB\" }` to give one its own size. \
         Everything else is read-only. Each is `nosuid,nodev`, writable by the instance's user \
         (mode `1777`), and capped at its size: a write past it fails with `ENOSPC`.",
    ),
    default(
        "tmpfs_size",
        Kind::Size,
        "\"64MiB\"",
        "The size cap of each `writable` tmpfs that sets no `size` of its own. What is written \
         there is memory, counted against `memory`.",
    ),
    field(
        "memory",
        Kind::Size,
        "Memory limit per instance, e.g. `\"256MiB\"`. The host must enforce it (the memory \
         cgroup controller), or the instance does not start.",
    ),
    field(
        "cpus",
        Kind::Positive,
        "CPU limit per instance, in cores (e.g. `0.5`). The host must enforce it (the cpu \
         cgroup controller), or the instance does not start.",
    ),
    default(
        "stop_grace",
        Kind::Duration,
        "\"10s\"",
        "How long an instance has to exit after SIGTERM before it is killed.",
    ),
    default(
        "init",
        Kind::Bool,
        "true",
        "Runs the app under a tiny init as PID 1 (kiln's own binary, mounted read-only at \
         `/.kiln/init`): it passes SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1/2 and SIGWINCH on \
         to the app, reaps orphaned processes, and exits with the app's status. Without it \
         the app is PID 1, which the kernel shields from every signal it has no handler for: \
         many programs then ignore SIGTERM and are killed only after `stop_grace`.",
    ),
    field(
        "user",
        Kind::String,
        "Who an instance's process runs as: `\"root\"`, `\"UID[:GID]\"` or \
         `\"NAME[:GROUP]\"` (names are looked up in the image's `/etc/passwd` and \
         `/etc/group`; on the local provider an image without them sees kiln's, naming \
         `root`, `nobody`/`nogroup` and the instance's own numeric ids as `app`). Default: the image's `User`, or the unprivileged `65534:65534` when it \
         sets none. An instance runs as uid 0 only when this key says so; root keeps one \
         capability (`NET_BIND_SERVICE`), any other user none, each plus `capabilities`.",
    ),
    field(
        "capabilities",
        Kind::StringList,
        "Linux capabilities added to the minimal set, named as in capabilities(7) with or \
         without `CAP_`, in any case: `[\"CHOWN\", \"SETUID\", \"SETGID\"]` for a server \
         whose master drops privileges. The process holds them whoever it runs as (a non-root \
         user as ambient capabilities, on the local provider; the docker provider refuses them \
         for a non-root user, whom the engine gives capabilities it cannot use). Safe, as \
         Docker grants by default less `NET_RAW`: `AUDIT_WRITE`, `CHOWN`, `DAC_OVERRIDE`, \
         `FOWNER`, `FSETID`, `KILL`, `MKNOD`, `NET_BIND_SERVICE`, `SETFCAP`, `SETGID`, \
         `SETPCAP`, `SETUID`, `SYS_CHROOT`. Any other (`SYS_ADMIN`, `NET_ADMIN`, `NET_RAW`, \
         `SYS_PTRACE`…) is dangerous: refused without `allow_dangerous_capabilities`.",
    ),
    default(
        "allow_dangerous_capabilities",
        Kind::Bool,
        "false",
        "Grants the dangerous capabilities `capabilities` lists (those that reach past the \
         instance: the host's network, kernel, clock or other processes). An explicit \
         weakening, refused when nothing listed needs it.",
    ),
    default(
        "pids",
        Kind::Integer(rules::PIDS),
        "512",
        "The most processes and threads an instance may have at once; a fork past it fails. \
         The host must enforce it (the pids cgroup controller), or the instance does not start.",
    ),
    default(
        "seccomp",
        Kind::Enum(SECCOMP),
        "\"default\"",
        "The system calls an instance may make. `default`: an allowlist — on the local \
         provider the host's container profile (`/usr/share/containers/seccomp.json`, from \
         Debian's `golang-github-containers-common`; without it instances do not start) with \
         namespace creation refused, on docker the engine's default profile. `unconfined`: no \
         filter at all, an explicit weakening.",
    ),
    field(
        "health",
        Kind::Table(HEALTH),
        "How kiln decides an instance may receive traffic.",
    ),
    field(
        "secrets",
        Kind::NamedTables(SECRET),
        "Secrets by name, each from one source the daemon reads whenever it starts an \
         instance: `DB_PASSWORD = { file = \"secrets/db\" }`, `{ env = \"DB_PASSWORD\" }` \
         or `{ command = [\"pass\", \"show\", \"db\"] }`. An instance finds each at \
         `/run/secrets/NAME` (a read-only tmpfs, the file 0400 and its own), and in its \
         environment only with `expose_env = true`. Values never reach the disk, the image, \
         the ledger, logs, `status`, `plan` or the API: the ledger keeps the source and a keyed \
         fingerprint, so `kiln plan` says when a value changed and `kiln apply` rolls it out. \
         A name is a valid environment variable name.",
    ),
];

/// Where a secret comes from: exactly one of `file`, `env`, `command`.
const SECRET: &[Field] = &[
    field(
        "file",
        Kind::String,
        "A file whose content is the value (one trailing newline dropped), relative to \
         `kiln.toml`, read by the daemon (as root) each time it starts an instance.",
    ),
    field(
        "env",
        Kind::String,
        "An environment variable of the daemon (`kiln serve`) whose value it is.",
    ),
    field(
        "command",
        Kind::StringList,
        "A command whose standard output is the value (one trailing newline dropped), run by \
         the daemon in the directory of `kiln.toml`, e.g. a password manager's. It must exit 0 \
         within 10 s and print at most 64 KiB.",
    ),
    default(
        "expose_env",
        Kind::Bool,
        "false",
        "Also set the value as the environment variable NAME of the instance's process \
         (local provider only: the Docker Engine keeps a container's environment on disk).",
    ),
];

/// What `[service] seccomp` accepts.
pub const SECCOMP: &[&str] = &["default", "unconfined"];

const WRITABLE: &[Field] = &[
    required(
        "path",
        Kind::String,
        "The absolute, normalised path to mount a tmpfs on.",
    ),
    field(
        "size",
        Kind::Size,
        "Its size cap, e.g. `\"256MiB\"`; default: `tmpfs_size`.",
    ),
];

const HEALTH: &[Field] = &[
    field(
        "path",
        Kind::String,
        "An HTTP path that must answer 2xx; without it the check is a TCP connect.",
    ),
    default("interval", Kind::Duration, "\"1s\"", "Time between checks."),
    default(
        "timeout",
        Kind::Duration,
        "\"1s\"",
        "How long one check may take.",
    ),
    default(
        "healthy_threshold",
        Kind::Integer(rules::HEALTH_THRESHOLD),
        "1",
        "Consecutive passes before an instance is healthy.",
    ),
    default(
        "unhealthy_threshold",
        Kind::Integer(rules::HEALTH_THRESHOLD),
        "3",
        "Consecutive failures before a healthy instance is unhealthy.",
    ),
    default(
        "start_period",
        Kind::Duration,
        "\"30s\"",
        "Grace time after start during which failures do not count; an instance still not \
         healthy after it has failed.",
    ),
];

const DEPLOY: &[Field] = &[
    default(
        "strategy",
        Kind::Enum(STRATEGIES),
        "\"rolling\"",
        "`rolling` replaces instances a few at a time; `blue-green` starts a full new set and \
         switches all traffic at once; `canary` shifts traffic in `[[deploy.steps]]`, judged by \
         `[deploy.analysis]`. A first release (none live yet) takes all traffic once healthy: no \
         steps, analysis or wait for `kiln promote`.",
    ),
    default(
        "max_surge",
        Kind::CountOrPercent,
        "1",
        "How many instances above `replicas` a rolling update may start (a number or `\"25%\"`).",
    ),
    default(
        "max_unavailable",
        Kind::CountOrPercent,
        "0",
        "How many of `replicas` may be unavailable during a rolling update (a number or \
         `\"25%\"`).",
    ),
    default(
        "progress_deadline",
        Kind::Duration,
        "\"5m\"",
        "A rollout that makes no progress for this long is rolled back.",
    ),
    default(
        "keep_previous",
        Kind::Duration,
        "\"10m\"",
        "How long the previous release's instances stay warm (running, out of the route) for \
         an instant rollback.",
    ),
    field(
        "promote",
        Kind::Enum(&["auto", "manual"]),
        "For `blue-green` and `canary`: switch or advance by itself (`auto`, the default) or \
         wait for `kiln promote` (`manual`).",
    ),
    field(
        "steps",
        Kind::TableList(STEP),
        "Canary only: the traffic steps, strictly increasing and ending at 100.",
    ),
    field(
        "analysis",
        Kind::Table(ANALYSIS),
        "Canary only: how each step is judged from the router's live measurements.",
    ),
    default(
        "scale_stable",
        Kind::Bool,
        "false",
        "Canary only: keep capacity neutral. The stable release scales down as the canary \
         scales up, never below what its share of the route needs (its weight × `replicas`, \
         rounded up, at least 1 while it has weight); an aborted canary restores it.",
    ),
    field(
        "migrate",
        Kind::Table(MIGRATE),
        "A migration that runs once, before the new release gets traffic.",
    ),
];

const STEP: &[Field] = &[
    required(
        "weight",
        Kind::Integer(rules::CANARY_WEIGHT),
        "Percent of traffic the canary receives in this step.",
    ),
    field(
        "pause",
        Kind::Duration,
        "How long the step lasts before it is judged; without it the step waits for \
         `kiln promote`.",
    ),
];

const ANALYSIS: &[Field] = &[
    default(
        "max_error_rate",
        Kind::Ratio,
        "\"1%\"",
        "The canary fails when more than this fraction of its requests fail (5xx or upstream \
         error): `0.01` or `\"1%\"`.",
    ),
    field(
        "max_p99",
        Kind::Duration,
        "The canary fails when its 99th percentile latency exceeds this.",
    ),
    default(
        "min_requests",
        Kind::Integer(rules::MIN_REQUESTS),
        "50",
        "Fewer canary requests than this in a step is inconclusive: the step extends, up to \
         three times its `pause`, then `on_inconclusive` decides.",
    ),
    default(
        "compare_to_stable",
        Kind::Bool,
        "true",
        "Also fail the canary when its error rate or p99 is clearly worse than the stable \
         release's over the same window.",
    ),
    default(
        "on_inconclusive",
        Kind::Enum(OnInconclusive::NAMES),
        "\"pause\"",
        "What a step that stays inconclusive leads to: `pause` waits at the step for \
         `kiln promote` or `kiln abort` (`kiln status` says why, with the requests seen and \
         needed); `abort` rolls back; `promote` proceeds as if the step passed.",
    ),
];

const MIGRATE: &[Field] = &[
    required(
        "command",
        Kind::StringList,
        "Run once in a one-shot instance of the new image; it must exit 0.",
    ),
    required(
        "schema",
        Kind::Integer(rules::SCHEMA_VERSION),
        "The schema version this release migrates to.",
    ),
    field(
        "compatible_from",
        Kind::Integer(rules::SCHEMA_VERSION),
        "The oldest schema version this release still works with; default: `schema`.",
    ),
    default(
        "pause",
        Kind::Bool,
        "false",
        "Hold the app's new requests in the router while the migration runs (as `kiln pause` \
         does: at most 30 s each, the oldest shed with 503 past 10000), and let them go when it \
         ends, whether it succeeded or failed. For a migration that cannot run under traffic.",
    ),
];

const ROUTE: &[Field] = &[
    default(
        "listen",
        Kind::String,
        "\"127.0.0.1:8080\"",
        "The socket address the router listens on, e.g. `\"0.0.0.0:80\"`.",
    ),
    field(
        "hosts",
        Kind::StringList,
        "Host names this app answers; apps sharing one `listen` address are told apart by \
         them.",
    ),
    field("tls", Kind::Table(TLS), "Terminate TLS with these files."),
    default(
        "sticky",
        Kind::Enum(&["none", "cookie"]),
        "\"none\"",
        "`cookie` keeps a client on the release it first reached (useful for canaries).",
    ),
    default(
        "drain_timeout",
        Kind::Duration,
        "\"30s\"",
        "How long in-flight requests to a leaving instance may take before it is stopped.",
    ),
    default(
        "request_timeout",
        Kind::Duration,
        "\"60s\"",
        "How long one proxied request may take.",
    ),
    field(
        "max_body_size",
        Kind::Size,
        "The largest request body the router passes on, e.g. `\"10MiB\"`; a bigger one gets \
         413 (at once when its `Content-Length` says so). No limit when absent.",
    ),
    default(
        "max_header_size",
        Kind::Size,
        "\"64KiB\"",
        "The largest request head (request line and headers) the router accepts for this app, \
         from 8KiB to 1MiB; a bigger one gets 431.",
    ),
    field(
        "preview_header",
        Kind::Pattern("^[A-Za-z0-9-]{1,64}$"),
        "A request header that pins a request to a release by name (`r3`), so a blue-green \
         \"green\" or a canary can be tried before it gets traffic, e.g. `\"X-Kiln-Release\"`. \
         Off when absent.",
    ),
];

const TLS: &[Field] = &[
    required(
        "cert",
        Kind::String,
        "PEM certificate chain, relative to `kiln.toml`.",
    ),
    required(
        "key",
        Kind::String,
        "PEM private key, relative to `kiln.toml`.",
    ),
];

const TARGET: &[Field] = &[
    default(
        "provider",
        Kind::Enum(&["local", "docker", "swarm"]),
        "\"local\"",
        "`local` runs instances on this host with an OCI runtime; `docker` on a Docker Engine; \
         `swarm` as Swarm services placed by a Swarm manager over its nodes, each instance \
         reached at its node's address (host-mode port), images pulled by digest from the \
         daemon's registry (`kiln serve --registry-listen`).",
    ),
    default(
        "runtime",
        Kind::String,
        "\"runc\"",
        "The OCI runtime binary for the local provider (`runc`, `crun`, `youki`).",
    ),
    field(
        "docker_host",
        Kind::String,
        "The Docker Engine address for the docker provider, the Swarm manager's for the swarm \
         provider; default: `$DOCKER_HOST` or the local socket.",
    ),
    default(
        "exec",
        Kind::Enum(&["taint", "allow"]),
        "\"taint\"",
        "What a `docker exec` into an instance means (docker provider): `taint` marks the \
         instance drifted and kiln replaces it (nobody patches a running instance); `allow` \
         lets it be.",
    ),
    field(
        "placement",
        Kind::StringList,
        "Swarm placement constraints (swarm provider), in Swarm's syntax: \
         `[\"node.role == worker\", \"node.labels.zone != b\"]`. Within them Swarm puts each \
         new instance on the node running the fewest tasks, so an app's instances spread.",
    ),
    field(
        "registry",
        Kind::String,
        "A registry of your own for the swarm provider, `HOST[:PORT][/PATH]`: before an \
         instance of an image is created, kiln pushes the image there (OCI Distribution, only \
         the blobs it lacks, by digest) and the nodes pull `HOST[:PORT]/PATH/<app>@sha256:…` \
         (`PATH` defaults to `kiln`) instead of from the daemon's registry endpoint; digests \
         stay the ones kiln built. The image's signatures and attestations go along as OCI \
         referrers, listed under the referrers tag `sha256-<hex>` (the daemon pushes an image \
         once per run: one signed after that goes with `kiln image push`). HTTPS verified against the system's CA roots (plus \
         `<state>/push/ca.crt` when the daemon's operator puts one there); plain HTTP only on \
         loopback or with `registry_insecure`. kiln sends no credentials: the registry must \
         take pushes from the daemon's address.",
    ),
    default(
        "registry_insecure",
        Kind::Bool,
        "false",
        "Talk plain HTTP to `registry` even off loopback (warned): anyone on the path can read \
         and alter what is pushed; each node's engine must then list the registry in its \
         `insecure-registries`.",
    ),
];

/// The fields of the table at a dotted path such as `deploy.analysis`, if there is one.
pub fn table_fields(path: &str) -> Option<&'static [Field]> {
    let mut fields = ROOT;
    if path.is_empty() {
        return Some(fields);
    }
    for part in path.split('.') {
        let f = fields.iter().find(|f| f.key == part)?;
        fields = match f.kind {
            Kind::Table(fs) | Kind::TableList(fs) | Kind::PathList(fs) | Kind::NamedTables(fs) => {
                fs
            }
            _ => return None,
        };
    }
    Some(fields)
}
