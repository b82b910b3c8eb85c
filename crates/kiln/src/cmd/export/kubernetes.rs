//! The spec as Kubernetes objects: a pure function from a validated [`Spec`] and an image
//! reference to JSON values and the notes that say what did not map.
//!
//! Rolling specs become an `apps/v1` `Deployment`; blue-green and canary specs an Argo
//! Rollouts `Rollout` (`argoproj.io/v1alpha1`), blue-green with a second, preview `Service`;
//! a Rollout's `[deploy.migrate]` is an `AnalysisTemplate` whose Job runs before traffic moves.
//! The pod is sealed as kiln seals an instance: read-only root, no privilege escalation,
//! every capability dropped but those the spec adds, `RuntimeDefault` seccomp unless the spec
//! says `unconfined`, no service account token, a memory-backed `emptyDir` per `writable`
//! path, secrets from a `Secret` the operator creates (never its values).
//!
//! **Invariant:** every key of `kiln.toml` is in [`KEYS`] as mapped, carried by the image or
//! not mapped (a test walks the spec's JSON Schema to hold this), and every key not mapped is
//! named in the output's leading comment: nothing is dropped silently.
//!
//! **API boundary:** no I/O. The caller resolves the image (and, when it can, the image's
//! own `User`) and prints the result.

use kiln_spec::{
    Analysis, CanaryStep, CountOrPercent, HealthCheck, Network, Promote, Seccomp, SecretSource,
    Spec, Strategy,
};
use serde_json::{Map, Value, json};
use std::time::Duration;

/// What [`manifests`] needs besides the spec.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// The validated spec.
    pub spec: &'a Spec,
    /// The image reference the pods run, by digest (`registry/name@sha256:…`).
    pub image: String,
    /// The image config's `User`, when the caller could read it: `Some("")` when the
    /// image sets none, `None` when unknown.
    pub image_user: Option<String>,
    /// The namespace every object is put in (`None`: the one `kubectl` is given).
    pub namespace: Option<String>,
}

/// The objects and what the reader must know about them.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifests {
    /// Lines for the leading comment: mapping choices, and every key not mapped.
    pub notes: Vec<String>,
    /// The objects, in the order `kubectl apply` should see them.
    pub objects: Vec<Value>,
}

/// How one `kiln.toml` key reaches Kubernetes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// Mapped to the field named.
    Mapped(&'static str),
    /// Part of the image the pods run (by digest), so nothing more to map.
    Image,
    /// Mapped for some specs, named in the notes for the others.
    Depends,
    /// No counterpart: always named in the notes, with this reason.
    NotMapped(&'static str),
}

/// Every key of `kiln.toml` (dotted, tables included) and how it maps.
pub const KEYS: &[(&str, Treatment)] = &[
    (
        "name",
        Treatment::Mapped("metadata.name and the app.kubernetes.io/name label"),
    ),
    ("image", Treatment::Image),
    ("image.base", Treatment::Image),
    ("image.entrypoint", Treatment::Image),
    ("image.cmd", Treatment::Image),
    ("image.env", Treatment::Image),
    ("image.workdir", Treatment::Image),
    (
        "image.user",
        Treatment::Mapped("securityContext.runAsUser/runAsGroup when [service] user is unset"),
    ),
    ("image.labels", Treatment::Image),
    ("image.compression", Treatment::Image),
    ("image.copy", Treatment::Image),
    ("image.copy.from", Treatment::Image),
    ("image.copy.to", Treatment::Image),
    ("image.copy.mode", Treatment::Image),
    ("image.copy.owner", Treatment::Image),
    ("image.copy.exclude", Treatment::Image),
    ("image.copy.closure", Treatment::Image),
    ("image.copy.allow_outside", Treatment::Image),
    (
        "image.test",
        Treatment::NotMapped(
            "kiln test runs it before a release; run `kiln test` on this image before applying",
        ),
    ),
    (
        "image.test.command",
        Treatment::NotMapped("part of [image.test]"),
    ),
    (
        "image.test.http",
        Treatment::NotMapped("part of [image.test]"),
    ),
    (
        "image.test.timeout",
        Treatment::NotMapped("part of [image.test]"),
    ),
    ("service", Treatment::Mapped("the pod template")),
    (
        "service.port",
        Treatment::Mapped("containerPort `http`, $PORT, the Service's targetPort"),
    ),
    ("service.network", Treatment::Depends),
    ("service.replicas", Treatment::Mapped("spec.replicas")),
    ("service.env", Treatment::Mapped("env")),
    (
        "service.writable",
        Treatment::Mapped("an emptyDir (medium Memory) volume each"),
    ),
    (
        "service.writable.path",
        Treatment::Mapped("volumeMounts[].mountPath"),
    ),
    (
        "service.writable.size",
        Treatment::Mapped("emptyDir.sizeLimit"),
    ),
    (
        "service.tmpfs_size",
        Treatment::Mapped("emptyDir.sizeLimit"),
    ),
    (
        "service.memory",
        Treatment::Mapped("resources limits and requests"),
    ),
    (
        "service.cpus",
        Treatment::Mapped("resources limits and requests"),
    ),
    (
        "service.stop_grace",
        Treatment::Mapped("terminationGracePeriodSeconds"),
    ),
    ("service.init", Treatment::Depends),
    ("service.user", Treatment::Depends),
    (
        "service.capabilities",
        Treatment::Mapped("securityContext.capabilities.add"),
    ),
    (
        "service.allow_dangerous_capabilities",
        Treatment::Mapped("securityContext.capabilities.add (the opt-in is the list itself)"),
    ),
    (
        "service.pids",
        Treatment::NotMapped("Kubernetes caps pids per node (kubelet podPidsLimit), not per pod"),
    ),
    (
        "service.seccomp",
        Treatment::Mapped("securityContext.seccompProfile"),
    ),
    (
        "service.health",
        Treatment::Mapped("startupProbe, readinessProbe, livenessProbe"),
    ),
    (
        "service.health.path",
        Treatment::Mapped("httpGet.path (tcpSocket without it)"),
    ),
    (
        "service.health.interval",
        Treatment::Mapped("periodSeconds"),
    ),
    (
        "service.health.timeout",
        Treatment::Mapped("timeoutSeconds"),
    ),
    (
        "service.health.healthy_threshold",
        Treatment::Mapped("readinessProbe.successThreshold"),
    ),
    (
        "service.health.unhealthy_threshold",
        Treatment::Mapped("readinessProbe/livenessProbe.failureThreshold"),
    ),
    (
        "service.health.start_period",
        Treatment::Mapped("startupProbe.failureThreshold × periodSeconds"),
    ),
    (
        "service.secrets",
        Treatment::Mapped("a Secret volume at /run/secrets"),
    ),
    ("service.secrets.file", Treatment::Depends),
    ("service.secrets.env", Treatment::Depends),
    ("service.secrets.command", Treatment::Depends),
    (
        "service.secrets.expose_env",
        Treatment::Mapped("env valueFrom secretKeyRef"),
    ),
    (
        "deploy",
        Treatment::Mapped("the Deployment's or Rollout's strategy"),
    ),
    (
        "deploy.strategy",
        Treatment::Mapped("Deployment RollingUpdate, Rollout blueGreen or canary"),
    ),
    ("deploy.max_surge", Treatment::Depends),
    ("deploy.max_unavailable", Treatment::Depends),
    (
        "deploy.progress_deadline",
        Treatment::Mapped("progressDeadlineSeconds"),
    ),
    ("deploy.keep_previous", Treatment::Depends),
    (
        "deploy.promote",
        Treatment::Mapped("blueGreen.autoPromotionEnabled, or a canary pause before the last step"),
    ),
    ("deploy.steps", Treatment::Mapped("canary.steps")),
    ("deploy.steps.weight", Treatment::Mapped("setWeight")),
    (
        "deploy.steps.pause",
        Treatment::Mapped("pause.duration (pause {} without it)"),
    ),
    ("deploy.analysis", Treatment::Depends),
    ("deploy.analysis.max_error_rate", Treatment::Depends),
    ("deploy.analysis.max_p99", Treatment::Depends),
    ("deploy.analysis.min_requests", Treatment::Depends),
    ("deploy.analysis.compare_to_stable", Treatment::Depends),
    ("deploy.analysis.on_inconclusive", Treatment::Depends),
    ("deploy.scale_stable", Treatment::Depends),
    ("deploy.migrate", Treatment::Depends),
    ("deploy.migrate.command", Treatment::Depends),
    ("deploy.migrate.schema", Treatment::Depends),
    ("deploy.migrate.compatible_from", Treatment::Depends),
    ("deploy.migrate.pause", Treatment::Depends),
    ("route", Treatment::Mapped("the Service")),
    (
        "route.listen",
        Treatment::Mapped("the Service's port (its address: see the notes)"),
    ),
    ("route.hosts", Treatment::Mapped("an Ingress rule per host")),
    (
        "route.tls",
        Treatment::Mapped("the Ingress's tls, from a Secret the operator creates"),
    ),
    (
        "route.tls.cert",
        Treatment::Mapped("the TLS Secret's tls.crt"),
    ),
    (
        "route.tls.key",
        Treatment::Mapped("the TLS Secret's tls.key"),
    ),
    (
        "route.sticky",
        Treatment::NotMapped(
            "cookie stickiness is an ingress controller's (a Service only has ClientIP affinity)",
        ),
    ),
    (
        "route.drain_timeout",
        Treatment::NotMapped(
            "the kubelet drains within terminationGracePeriodSeconds (from stop_grace)",
        ),
    ),
    (
        "route.request_timeout",
        Treatment::NotMapped("a proxy's setting (Ingress or Gateway)"),
    ),
    (
        "route.max_body_size",
        Treatment::NotMapped("a proxy's setting (Ingress or Gateway)"),
    ),
    (
        "route.max_header_size",
        Treatment::NotMapped("a proxy's setting (Ingress or Gateway)"),
    ),
    (
        "route.preview_header",
        Treatment::NotMapped(
            "kiln's router pins a release by header; blue-green has a preview Service instead",
        ),
    ),
    (
        "target",
        Treatment::NotMapped("Kubernetes is the target: where pods run is the cluster's choice"),
    ),
    (
        "target.provider",
        Treatment::NotMapped("the cluster replaces kiln's provider"),
    ),
    (
        "target.runtime",
        Treatment::NotMapped("the node's container runtime (a RuntimeClass) is the cluster's"),
    ),
    (
        "target.docker_host",
        Treatment::NotMapped("the cluster replaces the Docker Engine"),
    ),
    (
        "target.exec",
        Treatment::NotMapped(
            "who may `kubectl exec` is RBAC's (deny pods/exec to keep pods sealed)",
        ),
    ),
    (
        "target.placement",
        Treatment::NotMapped(
            "Swarm constraints; on Kubernetes placement is node affinity over the cluster's labels",
        ),
    ),
    (
        "target.registry",
        Treatment::Mapped("the image's repository (REGISTRY/NAME@sha256:…) unless --registry"),
    ),
    (
        "target.registry_insecure",
        Treatment::NotMapped(
            "plain HTTP to a registry is each node's container runtime configuration",
        ),
    ),
    (
        "policy",
        Treatment::NotMapped(
            "kiln's daemon enforces the deploy policy; on Kubernetes an admission controller's image policy does",
        ),
    ),
    (
        "policy.keys",
        Treatment::NotMapped(
            "kiln's daemon checks signatures; on Kubernetes an admission controller's image policy does",
        ),
    ),
    (
        "policy.require",
        Treatment::NotMapped(
            "kiln's daemon checks the image's proofs; on Kubernetes an admission controller's image policy does",
        ),
    ),
    (
        "policy.source",
        Treatment::NotMapped(
            "kiln's daemon reads the provenance; on Kubernetes an admission controller's image policy does",
        ),
    ),
];

/// The labels on every object and the selector of the pods.
fn labels(spec: &Spec) -> Value {
    json!({ "app.kubernetes.io/name": spec.name.as_str() })
}

/// The Secret the operator creates for `[service.secrets]`.
pub fn secret_name(spec: &Spec) -> String {
    format!("{}-secrets", spec.name)
}

/// The objects for `input`, with the notes for the leading comment.
pub fn manifests(input: &Input<'_>) -> Manifests {
    let spec = input.spec;
    let mut notes = Notes::default();
    notes.push(format!(
        "kiln export kubernetes: app {}, image {}",
        spec.name, input.image
    ));
    let pod = pod_template(input, &mut notes);
    let name = spec.name.as_str();
    let listen_port = spec.route.listen.port();
    let mut objects = Vec::new();
    let service = |service_name: String| {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(input, &service_name),
            "spec": {
                "type": "ClusterIP",
                "selector": labels(spec),
                "ports": [{
                    "name": "http",
                    "port": listen_port,
                    "targetPort": "http",
                    "protocol": "TCP",
                }],
            },
        })
    };
    notes.push(format!(
        "[route] listen = {}: the Service's port {listen_port}; the address is the cluster's (ClusterIP)",
        spec.route.listen
    ));
    objects.push(service(name.to_owned()));
    // A Rollout runs the migration before traffic moves, as an analysis whose one metric is
    // a Job; a Deployment has no such step.
    let migration = match (&spec.deploy.strategy, &spec.deploy.migrate) {
        (Strategy::Rolling, _) | (_, None) => None,
        (_, Some(m)) => {
            let template = migration_template(input, &pod, m, &mut notes);
            let template_name = template["metadata"]["name"].clone();
            objects.push(template);
            Some(json!({ "templates": [{ "templateName": template_name }] }))
        }
    };
    let workload = match &spec.deploy.strategy {
        Strategy::Rolling => deployment(input, pod, &mut notes),
        Strategy::BlueGreen { promote } => {
            let preview = format!("{name}-preview");
            objects.push(service(preview.clone()));
            blue_green(input, pod, *promote, &preview, migration, &mut notes)
        }
        Strategy::Canary {
            promote,
            steps,
            analysis,
            scale_stable,
        } => canary(
            input,
            pod,
            Canary {
                promote: *promote,
                steps,
                analysis,
                scale_stable: *scale_stable,
                migration,
            },
            &mut notes,
        ),
    };
    objects.push(workload);
    if let Some(ingress) = ingress(input, &mut notes) {
        objects.push(ingress);
    }
    for (key, treatment) in KEYS {
        // A table not mapped names its keys once, on its own line.
        let parent_named = key.rsplit_once('.').is_some_and(|(parent, _)| {
            KEYS.iter()
                .any(|(k, t)| *k == parent && matches!(t, Treatment::NotMapped(_)))
        });
        if let Treatment::NotMapped(why) = treatment
            && !parent_named
            && is_set(spec, key)
        {
            notes.push(format!("not mapped: {key}{}: {why}", children(key)));
        }
    }
    // What was mapped and how first, then what was not.
    let (not_mapped, mapped): (Vec<String>, Vec<String>) = notes
        .0
        .into_iter()
        .partition(|n| n.starts_with("not mapped: "));
    Manifests {
        notes: mapped.into_iter().chain(not_mapped).collect(),
        objects,
    }
}

/// An Ingress when `[route]` names hosts or TLS: a rule per host (one for any host without
/// them) to the Service's `http` port, TLS from a Secret the operator creates from the
/// spec's files. No class: the cluster's default ingress controller serves it.
fn ingress(input: &Input<'_>, notes: &mut Notes) -> Option<Value> {
    let spec = input.spec;
    let route = &spec.route;
    if route.hosts.is_empty() && route.tls.is_none() {
        return None;
    }
    let name = spec.name.as_str();
    let http = json!({ "paths": [{
        "path": "/",
        "pathType": "Prefix",
        "backend": { "service": { "name": name, "port": { "name": "http" } } },
    }]});
    let rules: Vec<Value> = if route.hosts.is_empty() {
        vec![json!({ "http": http })]
    } else {
        route
            .hosts
            .iter()
            .map(|h| json!({ "host": h, "http": http }))
            .collect()
    };
    let mut ingress_spec = Map::new();
    if let Some(tls) = &route.tls {
        let secret = format!("{name}-tls");
        let mut entry = Map::new();
        if !route.hosts.is_empty() {
            entry.insert("hosts".into(), json!(route.hosts));
        }
        entry.insert("secretName".into(), json!(secret));
        ingress_spec.insert("tls".into(), json!([entry]));
        notes.push(format!(
            "[route.tls]: create the TLS Secret {secret} (not written here): kubectl create \
             secret tls {secret} --cert={} --key={}",
            tls.cert.display(),
            tls.key.display()
        ));
    }
    ingress_spec.insert("rules".into(), Value::Array(rules));
    notes.push(
        "[route] hosts/tls: an Ingress for the cluster's default ingress controller (no \
         ingressClassName)"
            .to_owned(),
    );
    Some(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": metadata(input, name),
        "spec": ingress_spec,
    }))
}

/// ` (a, b)`: the keys under a table key, for its note.
fn children(key: &str) -> String {
    let prefix = format!("{key}.");
    let keys: Vec<&str> = KEYS
        .iter()
        .filter_map(|(k, _)| k.strip_prefix(&prefix))
        .filter(|k| !k.contains('.'))
        .collect();
    if keys.is_empty() {
        String::new()
    } else {
        format!(" ({})", keys.join(", "))
    }
}

/// Whether an optional table the spec can leave out is there (so its keys are worth a
/// note); keys of other tables always count, their defaults being kiln's behaviour too.
fn is_set(spec: &Spec, key: &str) -> bool {
    if key.starts_with("image.test") {
        return spec.image.test.is_some();
    }
    match key {
        "route.sticky" => spec.route.sticky == kiln_spec::Sticky::Cookie,
        "route.max_body_size" => spec.route.max_body_size.is_some(),
        "route.preview_header" => spec.route.preview_header.is_some(),
        "target.docker_host" => spec.target.docker_host.is_some(),
        _ => true,
    }
}

#[derive(Default)]
struct Notes(Vec<String>);

impl Notes {
    fn push(&mut self, line: String) {
        self.0.push(line);
    }
}

fn metadata(input: &Input<'_>, name: &str) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), json!(name));
    if let Some(ns) = &input.namespace {
        m.insert("namespace".into(), json!(ns));
    }
    m.insert("labels".into(), labels(input.spec));
    Value::Object(m)
}

/// Whole seconds, rounded up, at least `min`; a note when that changed the value.
fn seconds(d: Duration, min: u64, what: &str, notes: &mut Notes) -> u64 {
    let whole = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let s = whole.max(min);
    if Duration::from_secs(s) != d {
        notes.push(format!(
            "{what} = {}: {s}s (Kubernetes counts whole seconds here)",
            humantime::format_duration(d)
        ));
    }
    s
}

/// A size in bytes as a Kubernetes quantity: exact binary units when they divide it.
fn quantity(bytes: u64) -> String {
    for (shift, unit) in [(40, "Ti"), (30, "Gi"), (20, "Mi"), (10, "Ki")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

fn count_or_percent(v: CountOrPercent) -> Value {
    match v {
        CountOrPercent::Count(n) => json!(n),
        CountOrPercent::Percent(p) => json!(format!("{p}%")),
    }
}

/// Who the container runs as, as kiln decides it: `[service] user`, else the image's
/// `User` (from `[image] user`, or as read from the image), else 65534:65534 when the image
/// has none. Returns the pod security context's fields, whether it runs as root, and the
/// group secrets should be readable by.
fn run_as(input: &Input<'_>, notes: &mut Notes) -> (Map<String, Value>, bool, Option<u32>) {
    let spec = input.spec;
    let mut ctx = Map::new();
    let image_user = spec
        .image
        .user
        .map(|u| u.to_string())
        .or_else(|| input.image_user.clone().filter(|u| !u.is_empty()));
    let image_has_no_user = image_user.is_none()
        && (matches!(spec.image.base, kiln_spec::BaseImage::Scratch) || input.image_user.is_some());
    let (text, from) = match (&spec.service.user, &image_user) {
        (Some(u), _) => (u.clone(), "[service] user"),
        (None, Some(u)) => (u.clone(), "the image's User"),
        (None, None) if image_has_no_user => ("65534:65534".to_owned(), "kiln's default"),
        (None, None) => {
            ctx.insert("runAsNonRoot".into(), json!(true));
            notes.push(
                "user: the image's User is unknown here (its base sets it; build the image in \
                 this state directory to read it): runAsNonRoot only, as kiln refuses a root \
                 image user"
                    .to_owned(),
            );
            return (ctx, false, None);
        }
    };
    if text == "root" {
        ctx.insert("runAsUser".into(), json!(0));
        ctx.insert("runAsGroup".into(), json!(0));
        ctx.insert("runAsNonRoot".into(), json!(false));
        return (ctx, true, Some(0));
    }
    let (user, group) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (text.as_str(), None),
    };
    match user.parse::<u32>() {
        Ok(uid) => {
            ctx.insert("runAsUser".into(), json!(uid));
            ctx.insert("runAsNonRoot".into(), json!(uid != 0));
            // kiln gives a uid named without a group the group 0, as the runtimes do.
            let gid = match group {
                Some(g) => g.parse::<u32>().ok(),
                None => Some(0),
            };
            match (gid, group) {
                (Some(gid), _) => {
                    ctx.insert("runAsGroup".into(), json!(gid));
                }
                (None, Some(g)) => notes.push(format!(
                    "{from} = {text:?}: group {g:?} is a name; Kubernetes takes numeric ids \
                     only, so the image's /etc/passwd decides the group"
                )),
                (None, None) => {}
            }
            (ctx, uid == 0, gid)
        }
        Err(_) => {
            ctx.insert("runAsNonRoot".into(), json!(true));
            notes.push(format!(
                "{from} = {text:?} is a name: Kubernetes runs containers as numeric ids only \
                 (runAsUser), so this pod sets runAsNonRoot and the kubelet refuses to start it \
                 unless the image's User is a non-root uid; set [service] user to \"UID:GID\" \
                 to name it here"
            ));
            (ctx, false, None)
        }
    }
}

fn probe_action(health: &HealthCheck) -> Value {
    match &health.path {
        Some(path) => json!({ "httpGet": { "path": path, "port": "http", "scheme": "HTTP" } }),
        None => json!({ "tcpSocket": { "port": "http" } }),
    }
}

fn with(mut base: Value, extra: Value) -> Value {
    if let (Value::Object(b), Value::Object(e)) = (&mut base, extra) {
        b.extend(e);
    }
    base
}

/// Startup, readiness and liveness probes from `[service.health]`.
fn probes(health: &HealthCheck, notes: &mut Notes) -> (Value, Value, Value) {
    let period = seconds(health.interval, 1, "[service.health] interval", notes);
    let timeout = seconds(health.timeout, 1, "[service.health] timeout", notes);
    // kiln ignores failures for start_period; a startup probe holds the other two back and
    // restarts the container once it has failed for that long.
    let start = health.start_period.as_secs_f64();
    let startup_failures = ((start / period as f64).ceil() as u64).max(1);
    let action = probe_action(health);
    let startup = with(
        action.clone(),
        json!({
            "periodSeconds": period,
            "timeoutSeconds": timeout,
            "failureThreshold": startup_failures,
        }),
    );
    let readiness = with(
        action.clone(),
        json!({
            "periodSeconds": period,
            "timeoutSeconds": timeout,
            "successThreshold": health.healthy_threshold,
            "failureThreshold": health.unhealthy_threshold,
        }),
    );
    // Kubernetes requires a liveness probe's successThreshold to be 1.
    let liveness = with(
        action,
        json!({
            "periodSeconds": period,
            "timeoutSeconds": timeout,
            "failureThreshold": health.unhealthy_threshold,
        }),
    );
    (startup, readiness, liveness)
}

fn pod_template(input: &Input<'_>, notes: &mut Notes) -> Value {
    let spec = input.spec;
    let service = &spec.service;
    let name = spec.name.as_str();
    let (mut pod_security, root, group) = run_as(input, notes);
    pod_security.insert(
        "seccompProfile".into(),
        json!({ "type": match service.seccomp {
            Seccomp::Default => "RuntimeDefault",
            Seccomp::Unconfined => "Unconfined",
        }}),
    );
    let mut add: Vec<&str> = service.capabilities.iter().map(|c| c.as_str()).collect();
    if root && !add.contains(&"NET_BIND_SERVICE") {
        // kiln's root instance keeps this one capability without asking.
        add.insert(0, "NET_BIND_SERVICE");
    }
    if !root && !service.capabilities.is_empty() {
        notes.push(
            "[service] capabilities for a non-root user: Kubernetes adds them to the bounding \
             and permitted sets but not as ambient ones (as kiln's local provider does), so the \
             process holds them only through file capabilities"
                .to_owned(),
        );
    }
    let mut capabilities = Map::new();
    capabilities.insert("drop".into(), json!(["ALL"]));
    if !add.is_empty() {
        capabilities.insert("add".into(), json!(add));
    }
    let container_security = json!({
        "readOnlyRootFilesystem": true,
        "allowPrivilegeEscalation": false,
        "privileged": false,
        "capabilities": capabilities,
    });

    let mut env = vec![json!({ "name": "PORT", "value": service.port.to_string() })];
    env.extend(
        service
            .env
            .iter()
            .map(|(k, v)| json!({ "name": k, "value": v })),
    );
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    for (i, (path, size)) in service.tmpfs().enumerate() {
        let volume = format!("writable-{i}");
        volumes.push(json!({
            "name": volume,
            "emptyDir": { "medium": "Memory", "sizeLimit": quantity(size) },
        }));
        mounts.push(json!({ "name": volume, "mountPath": path }));
    }
    if !service.secrets.is_empty() {
        let secret = secret_name(spec);
        let items: Vec<Value> = service
            .secrets
            .iter()
            .map(|s| json!({ "key": s.name, "path": s.name }))
            .collect();
        // kiln makes each file 0400 and the instance's own; a Secret volume's files belong
        // to root, so the pod's group (fsGroup) gets read instead when it is known.
        let mode = match group {
            Some(gid) if !root => {
                pod_security.insert("fsGroup".into(), json!(gid));
                0o440
            }
            Some(_) => 0o400,
            None => {
                notes.push(
                    "[service.secrets]: the container's ids are unknown here, so the secret \
                     files are mode 0444 (kiln: 0400, the instance's own)"
                        .to_owned(),
                );
                0o444
            }
        };
        volumes.push(json!({
            "name": "secrets",
            "secret": { "secretName": secret, "defaultMode": mode, "items": items },
        }));
        mounts.push(json!({ "name": "secrets", "mountPath": "/run/secrets", "readOnly": true }));
        for s in service.secrets.iter().filter(|s| s.expose_env) {
            env.push(json!({
                "name": s.name,
                "valueFrom": { "secretKeyRef": { "name": secret, "key": s.name } },
            }));
        }
        let keys: Vec<String> = service
            .secrets
            .iter()
            .map(|s| format!("{} ({})", s.name, source(&s.source)))
            .collect();
        notes.push(format!(
            "[service.secrets]: create the Secret {secret} (not written here: values never \
             leave their sources) with the keys {}",
            keys.join(", ")
        ));
    }

    let mut resources = Map::new();
    if let Some(mem) = service.memory {
        resources.insert("memory".into(), json!(quantity(mem)));
    }
    if let Some(cpus) = service.cpus {
        let milli = ((cpus * 1000.0).round() as u64).max(1);
        resources.insert("cpu".into(), json!(format!("{milli}m")));
    }
    if !resources.is_empty() {
        notes.push(
            "[service] memory/cpus: limits, and requests equal to them (kiln reserves what an \
             instance may use)"
                .to_owned(),
        );
    }

    let (startup, readiness, liveness) = probes(&service.health, notes);
    let grace = seconds(service.stop_grace, 0, "[service] stop_grace", notes);

    let mut container = Map::new();
    container.insert("name".into(), json!(name));
    container.insert("image".into(), json!(input.image));
    container.insert("imagePullPolicy".into(), json!("IfNotPresent"));
    container.insert(
        "ports".into(),
        json!([{ "name": "http", "containerPort": service.port, "protocol": "TCP" }]),
    );
    container.insert("env".into(), Value::Array(env));
    if !resources.is_empty() {
        container.insert(
            "resources".into(),
            json!({ "limits": resources, "requests": resources }),
        );
    }
    container.insert("securityContext".into(), container_security);
    container.insert("startupProbe".into(), startup);
    container.insert("readinessProbe".into(), readiness);
    container.insert("livenessProbe".into(), liveness);
    if !mounts.is_empty() {
        container.insert("volumeMounts".into(), Value::Array(mounts));
    }

    let mut pod = Map::new();
    pod.insert("automountServiceAccountToken".into(), json!(false));
    // Only the spec's environment: no variables for the namespace's other Services.
    pod.insert("enableServiceLinks".into(), json!(false));
    pod.insert("terminationGracePeriodSeconds".into(), json!(grace));
    pod.insert("securityContext".into(), Value::Object(pod_security));
    pod.insert("containers".into(), json!([container]));
    if !volumes.is_empty() {
        pod.insert("volumes".into(), Value::Array(volumes));
    }
    if service.init {
        // kiln's init reaps orphans and keeps the app from being PID 1 (which the kernel
        // shields from unhandled signals); in a shared process namespace the pod's pause
        // process is PID 1 and does both.
        pod.insert("shareProcessNamespace".into(), json!(true));
        notes.push(
            "[service] init = true: shareProcessNamespace (the pod's pause process is PID 1 \
             and reaps orphans; kiln's init is not in the image)"
                .to_owned(),
        );
    }
    match &service.network {
        Network::Kiln => {}
        Network::Host => {
            pod.insert("hostNetwork".into(), json!(true));
            notes.push(
                "[service] network = \"host\": hostNetwork, an explicit weakening as in kiln"
                    .to_owned(),
            );
        }
        Network::Named(n) => notes.push(format!(
            "not mapped: service.network = {n:?}: a CNI network list of kiln's host; the pod \
             joins the cluster's pod network"
        )),
    }
    json!({
        "metadata": { "labels": labels(spec) },
        "spec": pod,
    })
}

fn source(s: &SecretSource) -> String {
    match s {
        SecretSource::File(p) => format!("kiln reads file {}", p.display()),
        SecretSource::Env(v) => format!("kiln reads ${v}"),
        SecretSource::Command { argv, .. } => format!("kiln runs {}", argv.join(" ")),
    }
}

/// The part of a Deployment's or Rollout's spec every strategy shares.
fn workload_spec(input: &Input<'_>, pod: Value, notes: &mut Notes) -> Map<String, Value> {
    let spec = input.spec;
    let mut s = Map::new();
    s.insert("replicas".into(), json!(spec.service.replicas));
    s.insert("selector".into(), json!({ "matchLabels": labels(spec) }));
    s.insert("template".into(), pod);
    s.insert(
        "progressDeadlineSeconds".into(),
        json!(seconds(
            spec.deploy.progress_deadline,
            1,
            "[deploy] progress_deadline",
            notes
        )),
    );
    s
}

/// `[deploy.migrate]` as an Argo Rollouts `AnalysisTemplate` whose one metric is a Job: the
/// command in the new image, sealed as the app's pods, never retried. Its pods carry no
/// label of the app's, so no Service sends them traffic.
fn migration_template(
    input: &Input<'_>,
    pod: &Value,
    m: &kiln_spec::Migrate,
    notes: &mut Notes,
) -> Value {
    let spec = input.spec;
    let name = format!("{}-migrate", spec.name);
    let mut job_pod = pod["spec"].clone();
    if let Some(c) = job_pod["containers"][0].as_object_mut() {
        for probe in ["startupProbe", "readinessProbe", "livenessProbe", "ports"] {
            c.remove(probe);
        }
        c.insert("name".into(), json!("migrate"));
        // `command` without `args`: the image's entrypoint and cmd both give way, as kiln's
        // one-shot command replaces them.
        c.insert("command".into(), json!(m.command));
    }
    if let Some(p) = job_pod.as_object_mut() {
        p.insert("restartPolicy".into(), json!("Never"));
    }
    let job_labels = json!({
        "app.kubernetes.io/part-of": spec.name.as_str(),
        "app.kubernetes.io/component": "migration",
    });
    notes.push(format!(
        "[deploy.migrate]: AnalysisTemplate {name} runs {:?} once as a Job (sealed as the \
         pods) before traffic moves; its failure aborts the rollout",
        m.command.join(" ")
    ));
    notes.push(format!(
        "not mapped: deploy.migrate.schema = {}, compatible_from = {}, pause = {}: kiln's \
         rollback refuses a release older than the schema, and its router holds requests \
         during a paused migration; Argo Rollouts does neither",
        m.schema, m.compatible_from, m.pause
    ));
    json!({
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AnalysisTemplate",
        "metadata": metadata(input, &name),
        "spec": {
            "metrics": [{
                "name": "migrate",
                "provider": { "job": { "spec": {
                    "backoffLimit": 0,
                    "template": { "metadata": { "labels": job_labels }, "spec": job_pod },
                }}},
            }],
        },
    })
}

fn deployment(input: &Input<'_>, pod: Value, notes: &mut Notes) -> Value {
    let spec = input.spec;
    let mut s = workload_spec(input, pod, notes);
    if let Some(m) = &spec.deploy.migrate {
        notes.push(format!(
            "not mapped: [deploy.migrate] (command {:?}, schema {} from {}{}): a Deployment \
             has no step before traffic moves; run it as a Job before applying",
            m.command.join(" "),
            m.schema,
            m.compatible_from,
            if m.pause { ", pause" } else { "" }
        ));
    }
    s.insert(
        "strategy".into(),
        json!({
            "type": "RollingUpdate",
            "rollingUpdate": {
                "maxSurge": count_or_percent(spec.deploy.max_surge),
                "maxUnavailable": count_or_percent(spec.deploy.max_unavailable),
            },
        }),
    );
    notes.push(format!(
        "not mapped: deploy.keep_previous = {}: a Deployment keeps no old pods warm (its old \
         ReplicaSets are scaled to 0); past progress_deadline it reports failure but does not \
         roll back",
        humantime::format_duration(spec.deploy.keep_previous)
    ));
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(input, spec.name.as_str()),
        "spec": s,
    })
}

fn rollout(input: &Input<'_>, mut s: Map<String, Value>, strategy: Value) -> Value {
    s.insert("strategy".into(), strategy);
    // As kiln: a rollout that stops progressing is undone, not only reported.
    s.insert("progressDeadlineAbort".into(), json!(true));
    json!({
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": metadata(input, input.spec.name.as_str()),
        "spec": s,
    })
}

fn blue_green(
    input: &Input<'_>,
    pod: Value,
    promote: Promote,
    preview: &str,
    migration: Option<Value>,
    notes: &mut Notes,
) -> Value {
    let spec = input.spec;
    let s = workload_spec(input, pod, notes);
    let keep = seconds(
        spec.deploy.keep_previous,
        0,
        "[deploy] keep_previous",
        notes,
    );
    notes.push(format!(
        "blue-green: Service {} is active, {preview} previews the new pods before the switch",
        spec.name
    ));
    notes.push(
        "not mapped: deploy.max_surge, deploy.max_unavailable: blue-green starts a full new \
         set, in kiln and in Argo Rollouts"
            .to_owned(),
    );
    let mut strategy = json!({
        "activeService": spec.name.as_str(),
        "previewService": preview,
        "autoPromotionEnabled": promote == Promote::Auto,
        "scaleDownDelaySeconds": keep,
    });
    if let (Some(m), Some(o)) = (migration, strategy.as_object_mut()) {
        // Before the switch, once the new set is up behind the preview Service.
        o.insert("prePromotionAnalysis".into(), m);
    }
    rollout(input, s, json!({ "blueGreen": strategy }))
}

/// A canary strategy's settings, as the spec has them.
struct Canary<'a> {
    promote: Promote,
    steps: &'a [CanaryStep],
    analysis: &'a Analysis,
    scale_stable: bool,
    /// The migration's analysis, when the spec has one.
    migration: Option<Value>,
}

fn canary(input: &Input<'_>, pod: Value, c: Canary<'_>, notes: &mut Notes) -> Value {
    let spec = input.spec;
    let Canary {
        promote,
        steps,
        analysis,
        scale_stable,
        migration,
    } = c;
    let s = workload_spec(input, pod, notes);
    let mut out = Vec::new();
    if let Some(m) = migration {
        // The first step: before any traffic reaches a canary pod.
        out.push(json!({ "analysis": m }));
    }
    let last = steps.len().saturating_sub(1);
    for (i, step) in steps.iter().enumerate() {
        if i == last && promote == Promote::Manual {
            // kiln's manual canary waits for `kiln promote` before its last step.
            out.push(json!({ "pause": {} }));
        }
        out.push(json!({ "setWeight": step.weight }));
        match step.pause {
            Some(d) => {
                let secs = seconds(d, 1, "[[deploy.steps]] pause", notes);
                out.push(json!({ "pause": { "duration": format!("{secs}s") } }));
            }
            None => out.push(json!({ "pause": {} })),
        }
    }
    notes.push(
        "canary: without a traffic router Argo Rollouts approximates each setWeight by the \
         share of canary pods behind the Service, scaling stable down as the canary scales \
         up"
        .to_owned(),
    );
    notes.push(if scale_stable {
        "deploy.scale_stable = true: as above, the total stays at replicas (kiln's \
         capacity-neutral canary)"
            .to_owned()
    } else {
        "not mapped: deploy.scale_stable = false: kiln keeps stable at full size while the \
         canary runs; Argo without a traffic router always scales it down as above"
            .to_owned()
    });
    notes.push(format!(
        "not mapped: [deploy.analysis] (max_error_rate {}, max_p99 {}, min_requests {}, \
         compare_to_stable {}, on_inconclusive {}): kiln judges each step on its router's \
         live measurements; on Kubernetes that needs an AnalysisTemplate over metrics your \
         cluster has (e.g. an ingress controller's in Prometheus), which kiln cannot name",
        analysis.max_error_rate,
        analysis
            .max_p99
            .map(|d| humantime::format_duration(d).to_string())
            .unwrap_or_else(|| "none".to_owned()),
        analysis.min_requests,
        analysis.compare_to_stable,
        analysis.on_inconclusive.as_str(),
    ));
    notes.push(format!(
        "not mapped: deploy.keep_previous = {}: Argo keeps canary stable pods warm only with \
         a traffic router (scaleDownDelaySeconds)",
        humantime::format_duration(spec.deploy.keep_previous)
    ));
    rollout(
        input,
        s,
        json!({
            "canary": {
                "maxSurge": count_or_percent(spec.deploy.max_surge),
                "maxUnavailable": count_or_percent(spec.deploy.max_unavailable),
                "steps": out,
            },
        }),
    )
}

#[cfg(test)]
#[allow(clippy::panic, clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::Path;

    fn spec(text: &str) -> Spec {
        match Spec::parse(text, "kiln.toml", Path::new("/")) {
            Ok(s) => s,
            Err(r) => panic!("{}", r.render(false)),
        }
    }

    fn export(text: &str) -> Manifests {
        let spec = spec(text);
        manifests(&Input {
            spec: &spec,
            image: "registry.example/app@sha256:0000000000000000000000000000000000000000000000000000000000000000".to_owned(),
            image_user: None,
            namespace: None,
        })
    }

    fn kind<'a>(m: &'a Manifests, kind: &str) -> &'a Value {
        match m.objects.iter().find(|o| o["kind"] == kind) {
            Some(o) => o,
            None => panic!("no {kind} in {:#?}", m.objects),
        }
    }

    const MINIMAL: &str = "name = \"app\"\n[image]\n[service]\n";

    /// Every dotted key path the spec's JSON Schema knows.
    fn schema_keys(schema: &Value, prefix: &str, out: &mut BTreeSet<String>) {
        let props = schema
            .get("properties")
            .or_else(|| schema.get("items").and_then(|i| i.get("properties")))
            .or_else(|| {
                schema
                    .get("additionalProperties")
                    .and_then(|a| a.get("properties"))
            });
        let Some(Value::Object(props)) = props else {
            // Path lists: a string or a table; the table is in `items.anyOf`/`oneOf`.
            for alt in ["anyOf", "oneOf"] {
                if let Some(Value::Array(alts)) = schema.get("items").and_then(|i| i.get(alt)) {
                    for a in alts {
                        schema_keys(a, prefix, out);
                    }
                }
            }
            return;
        };
        for (k, v) in props {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            out.insert(path.clone());
            schema_keys(v, &path, out);
        }
    }

    #[test]
    fn every_spec_key_has_a_treatment() {
        let mut keys = BTreeSet::new();
        schema_keys(&kiln_spec::json_schema(), "", &mut keys);
        let listed: BTreeSet<String> = KEYS.iter().map(|(k, _)| (*k).to_owned()).collect();
        assert!(keys.len() > 60, "walked too few keys: {keys:?}");
        let missing: Vec<_> = keys.difference(&listed).collect();
        let stale: Vec<_> = listed.difference(&keys).collect();
        assert!(missing.is_empty(), "keys with no treatment: {missing:?}");
        assert!(
            stale.is_empty(),
            "treatments of keys that do not exist: {stale:?}"
        );
    }

    #[test]
    fn keys_not_mapped_are_named_when_set() {
        let m = export(
            "name = \"app\"\n[image]\n[image.test]\nhttp = \"/\"\n[service]\n\
             [route]\nhosts = [\"a.example\"]\nsticky = \"cookie\"\n",
        );
        for key in [
            "image.test (command, http, timeout)",
            "route.sticky",
            "service.pids",
            "target (provider",
        ] {
            assert!(
                m.notes
                    .iter()
                    .any(|n| n.starts_with(&format!("not mapped: {key}"))),
                "{key} not in {:#?}",
                m.notes
            );
        }
        // Defaults with no effect are not named: no stickiness, no body limit.
        let m = export(MINIMAL);
        assert!(!m.notes.iter().any(|n| n.contains("route.sticky")));
        assert!(!m.notes.iter().any(|n| n.contains("route.max_body_size")));
    }

    #[test]
    fn minimal_is_a_sealed_deployment_and_service() {
        let m = export(MINIMAL);
        let kinds: Vec<_> = m.objects.iter().map(|o| o["kind"].clone()).collect();
        assert_eq!(kinds, [json!("Service"), json!("Deployment")]);
        let d = kind(&m, "Deployment");
        let pod = &d["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(
            c["securityContext"]["capabilities"],
            json!({"drop": ["ALL"]})
        );
        assert_eq!(pod["automountServiceAccountToken"], false);
        // Scratch with no user: kiln's unprivileged default.
        assert_eq!(pod["securityContext"]["runAsUser"], 65534);
        assert_eq!(pod["securityContext"]["runAsGroup"], 65534);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        assert_eq!(c["env"][0], json!({"name": "PORT", "value": "8080"}));
        assert_eq!(
            d["spec"]["strategy"]["rollingUpdate"],
            json!({"maxSurge": 1, "maxUnavailable": 0})
        );
        let svc = kind(&m, "Service");
        assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http");
    }

    #[test]
    fn service_settings_map_to_the_pod() {
        let m = export(
            "name = \"app\"\n[image]\n[service]\nport = 3000\nreplicas = 3\nuser = \"1000:2000\"\n\
             writable = [\"/tmp\", { path = \"/var/cache\", size = \"1GiB\" }]\ntmpfs_size = \"16MiB\"\n\
             memory = \"256MiB\"\ncpus = 0.25\nstop_grace = \"1500ms\"\nseccomp = \"unconfined\"\n\
             capabilities = [\"chown\"]\nenv = { A = \"on\" }\n\
             [service.health]\npath = \"/h\"\ninterval = \"2s\"\ntimeout = \"500ms\"\n\
             healthy_threshold = 2\nunhealthy_threshold = 4\nstart_period = \"9s\"\n\
             [service.secrets]\nDB = { env = \"DB\", expose_env = true }\n\
             [route]\nlisten = \"0.0.0.0:80\"\n",
        );
        let d = kind(&m, "Deployment");
        assert_eq!(d["spec"]["replicas"], 3);
        let pod = &d["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert_eq!(pod["securityContext"]["runAsUser"], 1000);
        assert_eq!(pod["securityContext"]["runAsGroup"], 2000);
        assert_eq!(pod["securityContext"]["fsGroup"], 2000);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "Unconfined"
        );
        assert_eq!(pod["terminationGracePeriodSeconds"], 2);
        assert_eq!(
            c["securityContext"]["capabilities"]["add"],
            json!(["CHOWN"])
        );
        assert_eq!(
            c["resources"]["limits"],
            json!({"memory": "256Mi", "cpu": "250m"})
        );
        assert_eq!(c["resources"]["requests"], c["resources"]["limits"]);
        assert_eq!(
            pod["volumes"],
            json!([
                {"name": "writable-0", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
                {"name": "writable-1", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
                {"name": "secrets", "secret": {"secretName": "app-secrets", "defaultMode": 0o440,
                    "items": [{"key": "DB", "path": "DB"}]}},
            ])
        );
        assert_eq!(
            c["volumeMounts"][2],
            json!({"name": "secrets", "mountPath": "/run/secrets", "readOnly": true})
        );
        assert_eq!(
            c["env"],
            json!([
                {"name": "PORT", "value": "3000"},
                {"name": "A", "value": "on"},
                {"name": "DB", "valueFrom": {"secretKeyRef": {"name": "app-secrets", "key": "DB"}}},
            ])
        );
        assert_eq!(c["startupProbe"]["failureThreshold"], 5);
        assert_eq!(c["readinessProbe"]["successThreshold"], 2);
        assert_eq!(c["readinessProbe"]["failureThreshold"], 4);
        assert_eq!(c["readinessProbe"]["timeoutSeconds"], 1);
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/h");
        assert_eq!(kind(&m, "Service")["spec"]["ports"][0]["port"], 80);
        assert!(
            m.notes
                .iter()
                .any(|n| n.contains("create the Secret app-secrets"))
        );
        assert!(m.notes.iter().any(|n| n.contains("timeout = 500ms: 1s")));
    }

    #[test]
    fn users_as_kiln_decides_them() {
        let root = export("name = \"app\"\n[image]\n[service]\nuser = \"root\"\n");
        let pod = &kind(&root, "Deployment")["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsUser"], 0);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], false);
        assert_eq!(
            pod["containers"][0]["securityContext"]["capabilities"]["add"],
            json!(["NET_BIND_SERVICE"])
        );
        let named = export("name = \"app\"\n[image]\n[service]\nuser = \"app:staff\"\n");
        let pod = &kind(&named, "Deployment")["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"].get("runAsUser"), None);
        assert!(named.notes.iter().any(|n| n.contains("is a name")));
        let image = export("name = \"app\"\n[image]\nuser = \"10:20\"\n[service]\n");
        let pod = &kind(&image, "Deployment")["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsUser"], 10);
        assert_eq!(pod["securityContext"]["runAsGroup"], 20);
    }

    #[test]
    fn canary_is_a_rollout_with_steps() {
        let m = export(
            "name = \"app\"\n[image]\n[service]\n[deploy]\nstrategy = \"canary\"\npromote = \"manual\"\n\
             [[deploy.steps]]\nweight = 10\npause = \"1m\"\n[[deploy.steps]]\nweight = 50\n\
             [[deploy.steps]]\nweight = 100\npause = \"30s\"\n",
        );
        let r = kind(&m, "Rollout");
        assert_eq!(r["apiVersion"], "argoproj.io/v1alpha1");
        assert_eq!(
            r["spec"]["strategy"]["canary"]["steps"],
            json!([
                {"setWeight": 10}, {"pause": {"duration": "60s"}},
                {"setWeight": 50}, {"pause": {}},
                {"pause": {}}, {"setWeight": 100}, {"pause": {"duration": "30s"}},
            ])
        );
        assert!(
            m.notes
                .iter()
                .any(|n| n.starts_with("not mapped: [deploy.analysis]"))
        );
        assert_eq!(
            m.objects.iter().filter(|o| o["kind"] == "Service").count(),
            1
        );
    }

    #[test]
    fn blue_green_has_a_preview_service() {
        let m = export(
            "name = \"app\"\n[image]\n[service]\n[deploy]\nstrategy = \"blue-green\"\n\
             promote = \"manual\"\nkeep_previous = \"5m\"\n",
        );
        let r = kind(&m, "Rollout");
        assert_eq!(
            r["spec"]["strategy"]["blueGreen"],
            json!({"activeService": "app", "previewService": "app-preview",
                   "autoPromotionEnabled": false, "scaleDownDelaySeconds": 300})
        );
        let names: Vec<_> = m
            .objects
            .iter()
            .filter(|o| o["kind"] == "Service")
            .map(|o| o["metadata"]["name"].clone())
            .collect();
        assert_eq!(names, [json!("app"), json!("app-preview")]);
    }

    #[test]
    fn a_migration_runs_before_traffic_moves_and_gets_none() {
        let migrate = "[deploy.migrate]\ncommand = [\"/app\", \"migrate\"]\nschema = 2\n";
        let m = export(&format!(
            "name = \"app\"\n[image]\n[service]\n[deploy]\nstrategy = \"canary\"\n\
             [[deploy.steps]]\nweight = 100\n{migrate}"
        ));
        let kinds: Vec<_> = m.objects.iter().map(|o| o["kind"].clone()).collect();
        assert_eq!(
            kinds,
            [
                json!("Service"),
                json!("AnalysisTemplate"),
                json!("Rollout")
            ]
        );
        let t = kind(&m, "AnalysisTemplate");
        assert_eq!(t["metadata"]["name"], "app-migrate");
        let job = &t["spec"]["metrics"][0]["provider"]["job"]["spec"];
        assert_eq!(job["backoffLimit"], 0);
        let c = &job["template"]["spec"]["containers"][0];
        assert_eq!(c["command"], json!(["/app", "migrate"]));
        assert_eq!(c.get("readinessProbe"), None);
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(job["template"]["spec"]["restartPolicy"], "Never");
        // The Service never selects the migration's pod.
        let labels = &job["template"]["metadata"]["labels"];
        let selector = kind(&m, "Service")["spec"]["selector"].as_object().unwrap();
        assert!(selector.iter().any(|(k, v)| labels.get(k) != Some(v)));
        let steps = &kind(&m, "Rollout")["spec"]["strategy"]["canary"]["steps"];
        assert_eq!(
            steps[0],
            json!({"analysis": {"templates": [{"templateName": "app-migrate"}]}})
        );
        let bg = export(&format!(
            "name = \"app\"\n[image]\n[service]\n[deploy]\nstrategy = \"blue-green\"\n{migrate}"
        ));
        assert_eq!(
            kind(&bg, "Rollout")["spec"]["strategy"]["blueGreen"]["prePromotionAnalysis"],
            json!({"templates": [{"templateName": "app-migrate"}]})
        );
        let rolling = export(&format!("name = \"app\"\n[image]\n[service]\n{migrate}"));
        assert!(
            rolling
                .objects
                .iter()
                .all(|o| o["kind"] != "AnalysisTemplate")
        );
        assert!(
            rolling
                .notes
                .iter()
                .any(|n| n.starts_with("not mapped: [deploy.migrate]"))
        );
    }

    #[test]
    fn hosts_and_tls_make_an_ingress() {
        // The spec checks that the files exist; any will do.
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let m = export(&format!(
            "name = \"app\"\n[image]\n[service]\n[route]\nlisten = \"0.0.0.0:443\"\n\
             hosts = [\"a.example\", \"*.b.example\"]\n[route.tls]\ncert = {file:?}\nkey = {file:?}\n",
        ));
        let i = kind(&m, "Ingress");
        assert_eq!(
            i["spec"]["tls"],
            json!([{"hosts": ["a.example", "*.b.example"], "secretName": "app-tls"}])
        );
        assert_eq!(i["spec"]["rules"][1]["host"], "*.b.example");
        assert_eq!(
            i["spec"]["rules"][0]["http"]["paths"][0]["backend"],
            json!({"service": {"name": "app", "port": {"name": "http"}}})
        );
        assert!(
            m.notes
                .iter()
                .any(|n| n.contains(&format!("secret tls app-tls --cert={file} --key={file}")))
        );
        assert!(
            export(MINIMAL)
                .objects
                .iter()
                .all(|o| o["kind"] != "Ingress")
        );
    }

    #[test]
    fn quantities_are_exact() {
        assert_eq!(quantity(64 << 20), "64Mi");
        assert_eq!(quantity(1 << 30), "1Gi");
        assert_eq!(quantity(1500), "1500");
        assert_eq!(quantity(3 << 10), "3Ki");
    }
}
