//! The second pass: a checked tree becomes a typed [`Spec`], with the rules that span keys.
//!
//! Kind checks already happened in [`crate::decode`]; this pass applies meaning: paths are
//! absolute and normalised, files exist, canary steps climb to 100, strategy-specific keys
//! appear only with their strategy. Problems are collected like the first pass's; a hole left
//! by an earlier error is filled with a harmless placeholder because the caller discards the
//! spec whenever any diagnostic exists.
//!
//! A rule that a value must keep on its own (a range, an env name, a host, canary weights)
//! lives in [`crate::rules`], which `kiln_control` applies to release configurations that
//! come through its API; only rules that need the file itself (was a key written, does a
//! path exist) are written here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::decode::{Entry, PathItem, Span, Table, Value};
use crate::diag::Diagnostic;
use crate::rules::{self, Broken, normalised_absolute};
use crate::types::*;

pub(crate) struct Validator<'a> {
    /// The directory relative paths are resolved against.
    pub dir: &'a Path,
    pub diags: Vec<Diagnostic>,
}

impl Table {
    fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    fn str(&self, key: &str) -> Option<(&str, Span)> {
        match self.entry(key) {
            Some(Entry {
                value: Value::Str(s),
                span,
                ..
            }) => Some((s.as_str(), span.clone())),
            _ => None,
        }
    }

    fn string(&self, key: &str) -> Option<String> {
        self.str(key).map(|(s, _)| s.to_owned())
    }

    fn bool(&self, key: &str) -> bool {
        matches!(
            self.entry(key),
            Some(Entry {
                value: Value::Bool(true),
                ..
            })
        )
    }

    fn int(&self, key: &str) -> Option<i64> {
        match self.entry(key)? {
            Entry {
                value: Value::Int(i),
                ..
            } => Some(*i),
            _ => None,
        }
    }

    fn duration(&self, key: &str) -> Option<Duration> {
        match self.entry(key)? {
            Entry {
                value: Value::Duration(d),
                ..
            } => Some(*d),
            _ => None,
        }
    }

    fn size(&self, key: &str) -> Option<u64> {
        match self.entry(key)? {
            Entry {
                value: Value::Size(n),
                ..
            } => Some(*n),
            _ => None,
        }
    }

    fn paths(&self, key: &str) -> &[PathItem] {
        match self.entry(key) {
            Some(Entry {
                value: Value::Paths(p),
                ..
            }) => p,
            _ => &[],
        }
    }

    fn list(&self, key: &str) -> Option<&[(String, Span)]> {
        match self.entry(key)? {
            Entry {
                value: Value::List(l),
                ..
            } => Some(l),
            _ => None,
        }
    }

    fn map(&self, key: &str) -> &[(String, String, Span)] {
        match self.entry(key) {
            Some(Entry {
                value: Value::Map(m),
                ..
            }) => m,
            _ => &[],
        }
    }

    fn named(&self, key: &str) -> &[(String, Span, Table)] {
        match self.entry(key) {
            Some(Entry {
                value: Value::Named(n),
                ..
            }) => n,
            _ => &[],
        }
    }

    fn table(&self, key: &str) -> Option<&Table> {
        match self.entry(key)? {
            Entry {
                value: Value::Table(t),
                ..
            } => Some(t),
            _ => None,
        }
    }

    fn tables(&self, key: &str) -> &[Table] {
        match self.entry(key) {
            Some(Entry {
                value: Value::Tables(t),
                ..
            }) => t,
            _ => &[],
        }
    }

    /// Where to point for `key`: its value, or the table when it is absent or defaulted.
    fn span_of(&self, key: &str) -> Span {
        self.entry(key)
            .filter(|e| !e.defaulted)
            .map_or_else(|| self.span.clone(), |e| e.span.clone())
    }

    fn written(&self, key: &str) -> bool {
        self.entry(key).is_some_and(|e| !e.defaulted)
    }
}

/// `[route] max_header_size` when absent or invalid.
const DEFAULT_HEADER_SIZE: u64 = 64 * 1024;

/// The diagnostic for a broken rule at `key` (a dotted path) and `span`.
fn broken_at(key: &str, span: Span, b: Broken) -> Diagnostic {
    let d = Diagnostic::new(key, Some(span), b.message);
    match b.hint {
        Some(h) => d.with_hint(h),
        None => d,
    }
}

fn to_u32(i: Option<i64>, fallback: u32) -> u32 {
    i.and_then(|i| u32::try_from(i).ok()).unwrap_or(fallback)
}

impl Validator<'_> {
    fn error(&mut self, t: &Table, key: &str, message: String) -> &mut Diagnostic {
        let span = t.span_of(key);
        self.diags
            .push(Diagnostic::new(&t.key_path(key), Some(span), message));
        let last = self.diags.len() - 1;
        &mut self.diags[last]
    }

    /// Reports a broken rule at `key` of `t`, pointing at its value.
    fn broken(&mut self, t: &Table, key: &str, b: Broken) {
        self.diags
            .push(broken_at(&t.key_path(key), t.span_of(key), b));
    }

    pub(crate) fn spec(&mut self, root: &Table) -> Spec {
        let name = match root.str("name") {
            Some((s, _)) => AppName::new(s).unwrap_or_else(|| {
                self.error(root, "name", format!("invalid app name {s:?}"))
                    .hint = Some(
                    "use a lowercase letter, then up to 39 lowercase letters, digits or `-`"
                        .to_owned(),
                );
                AppName::default()
            }),
            None => AppName::default(),
        };
        let section = |key: &str| root.table(key).cloned().unwrap_or_else(|| defaults_of(key));
        let service = self.service(&section("service"));
        Spec {
            name,
            image: self.image(&section("image")),
            deploy: self.deploy(&section("deploy"), &service),
            route: self.route(&section("route")),
            target: self.target(&section("target")),
            policy: self.policy(
                &section("policy"),
                Some(
                    root.table("image")
                        .is_some_and(|i| i.table("test").is_some()),
                ),
            ),
            service,
        }
    }

    fn image(&mut self, t: &Table) -> ImageSpec {
        let base = match t.str("base") {
            Some((s, _)) => self.base(t, s),
            None => BaseImage::Scratch,
        };
        let user = t.str("user").and_then(|(s, _)| match parse_user(s) {
            Some(u) => Some(u),
            None => {
                self.error(t, "user", format!("invalid user {s:?}")).hint =
                    Some("write a numeric `UID` or `UID:GID`, e.g. \"1000:1000\"".to_owned());
                None
            }
        });
        if let Some((w, _)) = t.str("workdir")
            && normalised_absolute(w).is_none()
        {
            self.error(
                t,
                "workdir",
                format!("workdir {w:?} must be an absolute, normalised path"),
            );
        }
        let copies = t.tables("copy").iter().map(|c| self.copy(c)).collect();
        let test = t.table("test").map(|tt| self.image_test(tt));
        ImageSpec {
            base,
            entrypoint: self.command(t, "entrypoint"),
            cmd: t
                .list("cmd")
                .map(|l| l.iter().map(|(s, _)| s.clone()).collect()),
            env: self.env(t, "env", false),
            workdir: t.string("workdir"),
            user,
            labels: t
                .map("labels")
                .iter()
                .map(|(k, v, _)| (k.clone(), v.clone()))
                .collect(),
            compression: match t.str("compression") {
                Some(("zstd", _)) => Compression::Zstd,
                _ => Compression::Gzip,
            },
            copies,
            test,
        }
    }

    fn base(&mut self, t: &Table, s: &str) -> BaseImage {
        if s == "scratch" {
            return BaseImage::Scratch;
        }
        let hint = "use \"scratch\", \"oci:PATH[:TAG|@sha256:…]\", \"docker-archive:PATH\" or \
                    \"rootfs:PATH\"";
        let (scheme, rest) = match s.split_once(':') {
            Some((scheme, rest)) if !rest.is_empty() => (scheme, rest),
            _ => {
                self.error(t, "base", format!("invalid base {s:?}")).hint = Some(hint.to_owned());
                return BaseImage::Scratch;
            }
        };
        let (path, reference) = if scheme == "oci" {
            match split_oci_reference(rest) {
                Ok(split) => split,
                Err(msg) => {
                    self.error(t, "base", msg).hint = Some(
                        "a digest is `@sha256:` and 64 lowercase hex digits; a tag follows `:`"
                            .to_owned(),
                    );
                    return BaseImage::Scratch;
                }
            }
        } else {
            (rest, None)
        };
        let abs = self.dir.join(path);
        let base = match scheme {
            "oci" => BaseImage::Oci {
                path: abs.clone(),
                reference,
            },
            "docker-archive" => BaseImage::DockerArchive(abs.clone()),
            "rootfs" => BaseImage::Rootfs(abs.clone()),
            other => {
                let d = self.error(t, "base", format!("unknown base kind `{other}:`"));
                d.hint = Some(
                    match crate::decode::closest(
                        other,
                        ["oci", "docker-archive", "rootfs"].into_iter(),
                    ) {
                        Some(best) => format!("did you mean `{best}:`?"),
                        None => hint.to_owned(),
                    },
                );
                return BaseImage::Scratch;
            }
        };
        if !abs.exists() {
            self.error(t, "base", format!("base {path:?} does not exist"))
                .hint = Some("paths are relative to the directory of kiln.toml".to_owned());
        }
        base
    }

    fn copy(&mut self, t: &Table) -> CopySpec {
        let from = match t.str("from") {
            Some((f, _)) => {
                let abs = self.dir.join(f);
                if !abs.exists() {
                    self.error(t, "from", format!("{f:?} does not exist")).hint =
                        Some("paths are relative to the directory of kiln.toml; build the file first if it is a build output".to_owned());
                } else if !t.bool("allow_outside")
                    && let Some(resolved) = outside_of(self.dir, &abs)
                {
                    self.error(
                        t,
                        "from",
                        format!(
                            "{f:?} resolves to {}, outside the spec's directory",
                            resolved.display()
                        ),
                    )
                    .hint = Some(
                        "copy from files of the project, or set `allow_outside = true` on this \
                         [[image.copy]] to bake a host path into the image on purpose"
                            .to_owned(),
                    );
                }
                abs
            }
            None => PathBuf::new(),
        };
        let to = match t.str("to") {
            Some((to, _)) => match normalised_absolute(to) {
                Some(n) => n,
                None => {
                    self.error(
                        t,
                        "to",
                        format!("`to` must be an absolute, normalised path, got {to:?}"),
                    )
                    .hint = Some("e.g. \"/app/server\"; no `.` or `..` parts".to_owned());
                    String::new()
                }
            },
            None => String::new(),
        };
        let mode = t.str("mode").and_then(|(m, _)| {
            let digits = m.strip_prefix("0o").unwrap_or(m);
            match u32::from_str_radix(digits, 8) {
                Ok(bits) if bits <= 0o7777 && !digits.is_empty() => Some(bits),
                _ => {
                    self.error(t, "mode", format!("invalid mode {m:?}")).hint =
                        Some("write octal permission bits as a string, e.g. \"0755\"".to_owned());
                    None
                }
            }
        });
        let owner = match t.str("owner") {
            Some((o, _)) => match parse_user(o) {
                Some(u) => Owner {
                    uid: u.uid,
                    gid: u.gid.unwrap_or(u.uid),
                },
                None => {
                    self.error(t, "owner", format!("invalid owner {o:?}")).hint =
                        Some("write numeric `UID:GID`, e.g. \"0:0\"".to_owned());
                    Owner::default()
                }
            },
            None => Owner::default(),
        };
        let exclude = t
            .list("exclude")
            .map(|l| l.iter().map(|(s, _)| s.clone()).collect())
            .unwrap_or_default();
        CopySpec {
            from,
            to,
            mode,
            owner,
            exclude,
            closure: t.bool("closure"),
        }
    }

    fn image_test(&mut self, t: &Table) -> ImageTest {
        let command = self.command(t, "command");
        let http = t.string("http");
        if let Some((p, _)) = t.str("http")
            && !p.starts_with('/')
        {
            self.error(
                t,
                "http",
                format!("`http` must be a path starting with `/`, got {p:?}"),
            );
        }
        if command.is_none() && http.is_none() {
            self.error(
                t,
                "command",
                "[image.test] needs `command`, `http` or both".to_owned(),
            );
        }
        ImageTest {
            command,
            http,
            timeout: t.duration("timeout").unwrap_or(Duration::from_secs(30)),
        }
    }

    /// A non-empty list of strings whose first element is the program.
    fn command(&mut self, t: &Table, key: &str) -> Option<Vec<String>> {
        let list = t.list(key)?;
        if let Err(b) = rules::command(key, list.iter().map(|(s, _)| s.as_str())) {
            self.broken(t, key, b);
            return None;
        }
        Some(list.iter().map(|(s, _)| s.clone()).collect())
    }

    fn env(&mut self, t: &Table, key: &str, port_reserved: bool) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (k, v, span) in t.map(key) {
            if let Err(b) = rules::env_var(k, v, port_reserved) {
                let path = format!("{}.{k}", t.key_path(key));
                self.diags.push(broken_at(&path, span.clone(), b));
            }
            out.insert(k.clone(), v.clone());
        }
        out
    }

    fn service(&mut self, t: &Table) -> ServiceSpec {
        let listed = t.paths("writable");
        for (i, b) in rules::writable(listed.iter().map(|w| w.path.as_str())) {
            if let Some(w) = listed.get(i) {
                self.diags
                    .push(broken_at(&t.key_path("writable"), w.span.clone(), b));
            }
        }
        let writable = listed
            .iter()
            .map(|w| Writable {
                path: w.path.clone(),
                size: w.table.as_ref().and_then(|t| t.size("size")),
            })
            .collect();
        if let Some((u, _)) = t.str("user")
            && let Err(b) = rules::user(u)
        {
            self.broken(t, "user", b);
        }
        if let Some((n, _)) = t.str("network")
            && let Err(b) = rules::network(n)
        {
            self.broken(t, "network", b);
        }
        ServiceSpec {
            port: t
                .int("port")
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(8080),
            replicas: to_u32(t.int("replicas"), 1),
            env: self.env(t, "env", true),
            writable,
            memory: t.size("memory"),
            cpus: match t.entry("cpus") {
                Some(Entry {
                    value: Value::Num(n),
                    ..
                }) => Some(*n),
                _ => None,
            },
            stop_grace: t.duration("stop_grace").unwrap_or(Duration::from_secs(10)),
            init: t.bool("init"),
            health: self.health(
                &t.table("health")
                    .cloned()
                    .unwrap_or_else(|| defaults_of("service.health")),
            ),
            tmpfs_size: t
                .size("tmpfs_size")
                .unwrap_or(ServiceSpec::DEFAULT_TMPFS_SIZE),
            user: t.string("user"),
            pids: to_u32(t.int("pids"), ServiceSpec::DEFAULT_PIDS),
            seccomp: match t.str("seccomp") {
                Some(("unconfined", _)) => Seccomp::Unconfined,
                _ => Seccomp::Default,
            },
            network: t
                .str("network")
                .map_or(Network::Kiln, |(n, _)| Network::from_name(n)),
            capabilities: self.capabilities(t),
            allow_dangerous_capabilities: t.bool("allow_dangerous_capabilities"),
            secrets: self.secrets(t),
        }
    }

    /// `[service.secrets]`: each name with exactly one source; a file made absolute.
    fn secrets(&mut self, t: &Table) -> Vec<Secret> {
        let env = t.map("env");
        let mut out = Vec::new();
        for (name, span, s) in t.named("secrets") {
            let path = format!("{}.{name}", t.key_path("secrets"));
            let expose_env = s.bool("expose_env");
            if let Err(b) = rules::secret_name(name, expose_env) {
                self.diags.push(broken_at(&path, span.clone(), b));
            }
            if expose_env && env.iter().any(|(k, _, _)| k == name) {
                self.diags.push(
                    Diagnostic::new(
                        &path,
                        Some(span.clone()),
                        format!("{name} is also set in [service] env"),
                    )
                    .with_hint("keep it in one place: the secret"),
                );
            }
            let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            let sources: Vec<&str> = ["file", "env", "command"]
                .into_iter()
                .filter(|k| s.entry(k).is_some())
                .collect();
            let source = match sources.as_slice() {
                ["file"] => s
                    .str("file")
                    .map(|(f, _)| SecretSource::File(absolute(&self.dir.join(f)))),
                ["env"] => s.str("env").map(|(var, _)| {
                    if let Err(b) = rules::env_var(var, "", false) {
                        self.broken(s, "env", b);
                    }
                    SecretSource::Env(var.to_owned())
                }),
                ["command"] => {
                    let argv: Vec<String> = s
                        .list("command")
                        .unwrap_or_default()
                        .iter()
                        .map(|(a, _)| a.clone())
                        .collect();
                    if let Err(b) = rules::command("command", argv.iter().map(String::as_str)) {
                        self.broken(s, "command", b);
                    }
                    Some(SecretSource::Command {
                        argv,
                        dir: absolute(self.dir),
                    })
                }
                _ => {
                    self.diags.push(
                        Diagnostic::new(
                            &path,
                            Some(span.clone()),
                            "a secret needs exactly one of `file`, `env` and `command`".to_owned(),
                        )
                        .with_hint("e.g. DB_PASSWORD = { file = \"secrets/db\" }"),
                    );
                    None
                }
            };
            if let Some(source) = source {
                out.push(Secret {
                    name: name.clone(),
                    source,
                    expose_env,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// `capabilities`, each normalised (`cap_chown` is `CHOWN`); problems point at the name
    /// they are about, or at `allow_dangerous_capabilities`.
    fn capabilities(&mut self, t: &Table) -> Vec<Capability> {
        let key = t.key_path("capabilities");
        let mut parsed: Vec<(Capability, Span)> = Vec::new();
        for (name, span) in t.list("capabilities").unwrap_or_default() {
            match rules::capability(name) {
                Ok(c) => parsed.push((c, span.clone())),
                Err(b) => self.diags.push(broken_at(&key, span.clone(), b)),
            }
        }
        let caps: Vec<Capability> = parsed.iter().map(|(c, _)| *c).collect();
        let allow = t.bool("allow_dangerous_capabilities");
        for (i, b) in rules::capabilities(&caps, allow) {
            match i.and_then(|i| parsed.get(i)) {
                Some((_, span)) => self.diags.push(broken_at(&key, span.clone(), b)),
                None => self.broken(t, "allow_dangerous_capabilities", b),
            }
        }
        caps
    }

    fn health(&mut self, t: &Table) -> HealthCheck {
        if let Some((p, _)) = t.str("path")
            && let Err(b) = rules::health_path(p)
        {
            self.broken(t, "path", b);
        }
        let interval = t.duration("interval").unwrap_or(Duration::from_secs(1));
        let timeout = t.duration("timeout").unwrap_or(Duration::from_secs(1));
        if timeout > interval && t.written("timeout") {
            self.error(
                t,
                "timeout",
                format!(
                    "health `timeout` ({}) is longer than `interval` ({})",
                    humantime::format_duration(timeout),
                    humantime::format_duration(interval)
                ),
            )
            .hint = Some("a check must finish before the next one starts".to_owned());
        }
        HealthCheck {
            path: t.string("path"),
            interval,
            timeout,
            healthy_threshold: to_u32(t.int("healthy_threshold"), 1),
            unhealthy_threshold: to_u32(t.int("unhealthy_threshold"), 3),
            start_period: t
                .duration("start_period")
                .unwrap_or(Duration::from_secs(30)),
        }
    }

    fn deploy(&mut self, t: &Table, service: &ServiceSpec) -> DeploySpec {
        let strategy_name = t.str("strategy").map_or("rolling", |(s, _)| s);
        let promote = match t.str("promote") {
            Some(("manual", _)) => Promote::Manual,
            _ => Promote::Auto,
        };
        for (key, b) in rules::strategy_keys(strategy_name, |key| t.written(key)) {
            self.broken(t, key, b);
        }
        let max_surge = self.count(t, "max_surge", CountOrPercent::Count(1));
        let max_unavailable = self.count(t, "max_unavailable", CountOrPercent::Count(0));
        if let Err(b) =
            rules::rolling_progress(strategy_name, max_surge, max_unavailable, service.replicas)
        {
            self.broken(t, "max_surge", b);
        }
        let strategy = match strategy_name {
            "blue-green" => Strategy::BlueGreen { promote },
            "canary" => Strategy::Canary {
                promote,
                steps: self.steps(t),
                analysis: self.analysis(
                    &t.table("analysis")
                        .cloned()
                        .unwrap_or_else(|| defaults_of("deploy.analysis")),
                ),
                scale_stable: t.bool("scale_stable"),
            },
            _ => Strategy::Rolling,
        };
        DeploySpec {
            strategy,
            max_surge,
            max_unavailable,
            progress_deadline: t
                .duration("progress_deadline")
                .unwrap_or(Duration::from_secs(300)),
            keep_previous: t
                .duration("keep_previous")
                .unwrap_or(Duration::from_secs(600)),
            migrate: t.table("migrate").map(|m| self.migrate(m)),
        }
    }

    fn count(&mut self, t: &Table, key: &str, fallback: CountOrPercent) -> CountOrPercent {
        match t.entry(key) {
            Some(Entry {
                value: Value::CountOrPercent(c),
                ..
            }) => *c,
            _ => fallback,
        }
    }

    fn steps(&mut self, t: &Table) -> Vec<CanaryStep> {
        let tables = t.tables("steps");
        if let Err(b) = rules::canary_has_steps(tables.len()) {
            self.broken(t, "steps", b);
            return Vec::new();
        }
        let mut steps = Vec::new();
        let mut previous: Option<i64> = None;
        for s in tables {
            let Some(weight) = s.int("weight") else {
                continue;
            };
            if let Some(p) = previous
                && let Err(b) = rules::canary_weight_follows(p, weight)
            {
                self.broken(s, "weight", b);
            }
            previous = Some(weight);
            steps.push(CanaryStep {
                weight: u8::try_from(weight).unwrap_or(100),
                pause: s.duration("pause"),
            });
        }
        if let (Some(last), Some(last_table)) = (previous, tables.last())
            && let Err(b) = rules::canary_last_weight(last)
        {
            self.broken(last_table, "weight", b);
        }
        steps
    }

    fn analysis(&mut self, t: &Table) -> Analysis {
        let max_error_rate = match t.entry("max_error_rate") {
            Some(Entry {
                value: Value::Ratio(r),
                ..
            }) => *r,
            _ => 0.01,
        };
        Analysis {
            max_error_rate,
            max_p99: t.duration("max_p99"),
            min_requests: t
                .int("min_requests")
                .and_then(|i| u64::try_from(i).ok())
                .unwrap_or(50),
            compare_to_stable: t.bool("compare_to_stable"),
            on_inconclusive: t
                .str("on_inconclusive")
                .and_then(|(name, _)| OnInconclusive::from_name(name))
                .unwrap_or(OnInconclusive::Pause),
        }
    }

    fn migrate(&mut self, t: &Table) -> Migrate {
        let schema = to_u32(t.int("schema"), 0);
        let compatible_from = match t.int("compatible_from") {
            Some(c) => {
                let c = to_u32(Some(c), 0);
                if let Err(b) = rules::compatible_from(c, schema) {
                    self.broken(t, "compatible_from", b);
                }
                c
            }
            None => schema,
        };
        Migrate {
            command: self.command(t, "command").unwrap_or_default(),
            schema,
            compatible_from,
            pause: t.bool("pause"),
        }
    }

    fn route(&mut self, t: &Table) -> RouteSpec {
        let listen = match t.str("listen") {
            Some((l, _)) => match l.parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    self.error(t, "listen", format!("invalid listen address {l:?}"))
                        .hint =
                        Some("write IP:PORT, e.g. \"127.0.0.1:8080\" or \"[::]:443\"".to_owned());
                    SocketAddr::from(([127, 0, 0, 1], 8080))
                }
            },
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
        };
        let mut hosts = Vec::new();
        for (h, span) in t.list("hosts").unwrap_or_default() {
            match rules::host(h) {
                Ok(()) => hosts.push(h.to_ascii_lowercase()),
                Err(b) => self
                    .diags
                    .push(broken_at(&t.key_path("hosts"), span.clone(), b)),
            }
        }
        let tls = t.table("tls").map(|tls| {
            let mut file = |key: &str| {
                let rel = tls.string(key).unwrap_or_default();
                let abs = self.dir.join(&rel);
                if !rel.is_empty() && !abs.is_file() {
                    self.error(tls, key, format!("TLS {key} file {rel:?} does not exist"))
                        .hint = Some("paths are relative to the directory of kiln.toml".to_owned());
                }
                abs
            };
            TlsFiles {
                cert: file("cert"),
                key: file("key"),
            }
        });
        RouteSpec {
            listen,
            hosts,
            tls,
            sticky: match t.str("sticky") {
                Some(("cookie", _)) => Sticky::Cookie,
                _ => Sticky::None,
            },
            drain_timeout: t
                .duration("drain_timeout")
                .unwrap_or(Duration::from_secs(30)),
            request_timeout: t
                .duration("request_timeout")
                .unwrap_or(Duration::from_secs(60)),
            max_body_size: t.size("max_body_size"),
            max_header_size: match t.size("max_header_size") {
                Some(n) => match rules::header_size(n) {
                    Ok(()) => n,
                    Err(b) => {
                        self.broken(t, "max_header_size", b);
                        DEFAULT_HEADER_SIZE
                    }
                },
                None => DEFAULT_HEADER_SIZE,
            },
            preview_header: match t.str("preview_header") {
                Some((h, _)) => match rules::preview_header(h) {
                    Ok(()) => Some(h.to_ascii_lowercase()),
                    Err(b) => {
                        self.broken(t, "preview_header", b);
                        None
                    }
                },
                None => None,
            },
        }
    }

    /// The daemon's policy file.
    pub(crate) fn daemon_policy(&mut self, root: &Table) -> PolicySpec {
        match root.table("policy") {
            Some(t) => self.policy(t, None),
            None => PolicySpec::default(),
        }
    }

    /// `[policy]`; `has_test`: whether the spec has `[image.test]` (`None`: the daemon's
    /// policy file, which has no image).
    pub(crate) fn policy(&mut self, t: &Table, has_test: Option<bool>) -> PolicySpec {
        let key_path = t.key_path("keys");
        let mut keys = Vec::new();
        for (k, span) in t.list("keys").unwrap_or_default() {
            let inline = k.trim_start().starts_with("ssh-");
            let found = if inline {
                rules::trusted_key(k.trim()).map(|()| vec![k.trim().to_owned()])
            } else {
                self.key_file(k)
            };
            match found {
                Ok(lines) => {
                    for line in lines {
                        if !keys.contains(&line) {
                            keys.push(line);
                        }
                    }
                }
                Err(b) => self.diags.push(broken_at(&key_path, span.clone(), b)),
            }
        }
        let require_path = t.key_path("require");
        let mut require = Vec::new();
        for (r, span) in t.list("require").unwrap_or_default() {
            match Proof::parse(r) {
                Some(p) if require.contains(&p) => self.diags.push(Diagnostic::new(
                    &require_path,
                    Some(span.clone()),
                    format!("{r:?} is listed twice"),
                )),
                Some(p) => require.push(p),
                None => self.diags.push(
                    Diagnostic::new(
                        &require_path,
                        Some(span.clone()),
                        format!("unknown proof {r:?}"),
                    )
                    .with_hint(format!("one of {}", crate::catalog::PROOFS.join(", "))),
                ),
            }
        }
        if require.contains(&Proof::Signature)
            && keys.is_empty()
            && t.list("keys").is_none_or(<[_]>::is_empty)
        {
            self.error(
                t,
                "require",
                "`signature` needs at least one trusted key in `keys`".to_owned(),
            )
            .hint = Some(
                "list the public keys whose signatures count, e.g. keys = [\"ci.pub\"]".to_owned(),
            );
        }
        if require.contains(&Proof::Tested) && has_test == Some(false) {
            self.error(
                t,
                "require",
                "`tested` needs an [image.test] to run".to_owned(),
            )
            .hint = Some("add [image.test], or leave `tested` to the daemon's policy".to_owned());
        }
        let source = match t.str("source") {
            Some(("git", _)) => SourceRule::Git,
            Some(("git-clean", _)) => SourceRule::GitClean,
            _ => SourceRule::Any,
        };
        PolicySpec {
            keys,
            require,
            source,
        }
    }

    /// The key lines of a file `[policy] keys` names: every line that is not blank or a
    /// `#` comment.
    fn key_file(&self, path: &str) -> Result<Vec<String>, Broken> {
        /// A public key file is a few lines; anything larger is not one.
        const MAX_KEY_FILE: u64 = 64 * 1024;
        let abs = self.dir.join(path);
        let hint = "paths are relative to the directory of kiln.toml";
        let meta = std::fs::metadata(&abs)
            .map_err(|e| Broken::new(format!("cannot read key file {path:?}: {e}")).hint(hint))?;
        if !meta.is_file() || meta.len() > MAX_KEY_FILE {
            return Err(Broken::new(format!(
                "key file {path:?} is not a public key file (a regular file of at most 64 KiB)"
            ))
            .hint(hint));
        }
        let text = std::fs::read_to_string(&abs)
            .map_err(|e| Broken::new(format!("cannot read key file {path:?}: {e}")).hint(hint))?;
        let mut lines = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            rules::trusted_key(line).map_err(|b| Broken {
                message: format!("key file {path:?} line {}: {}", n + 1, b.message),
                hint: b.hint,
            })?;
            lines.push(line.to_owned());
        }
        if lines.is_empty() {
            return Err(Broken::new(format!("key file {path:?} holds no key")).hint(hint));
        }
        Ok(lines)
    }

    fn target(&mut self, t: &Table) -> TargetSpec {
        let provider = match t.str("provider") {
            Some(("docker", _)) => ProviderKind::Docker,
            Some(("swarm", _)) => ProviderKind::Swarm,
            _ => ProviderKind::Local,
        };
        for (key, b) in rules::target_keys(provider, |key| t.written(key)) {
            self.broken(t, key, b);
        }
        let runtime = t.string("runtime").unwrap_or_else(|| "runc".to_owned());
        if let Err(b) = rules::runtime(&runtime) {
            self.broken(t, "runtime", b);
        }
        let key = t.key_path("placement");
        let mut placement = Vec::new();
        for (c, span) in t.list("placement").unwrap_or_default() {
            if let Err(b) = rules::placement(c) {
                self.diags.push(broken_at(&key, span.clone(), b));
            }
            placement.push(c.clone());
        }
        let registry = t.string("registry");
        if let Some(r) = &registry
            && let Err(b) = rules::registry(r)
        {
            self.broken(t, "registry", b);
        }
        let registry_insecure = t.bool("registry_insecure");
        if registry_insecure && registry.is_none() && provider == ProviderKind::Swarm {
            self.broken(
                t,
                "registry_insecure",
                rules::Broken {
                    message: "`registry_insecure` needs `registry`".to_owned(),
                    hint: Some(
                        "the daemon's own endpoint is set by kiln serve --registry-insecure",
                    ),
                },
            );
        }
        TargetSpec {
            provider,
            runtime,
            placement,
            registry,
            registry_insecure,
            docker_host: t.string("docker_host"),
            exec: match t.str("exec") {
                Some(("allow", _)) => ExecPolicy::Allow,
                _ => ExecPolicy::Taint,
            },
        }
    }
}

/// A table of `path` holding only its defaults, for sections the user left out.
fn defaults_of(path: &str) -> Table {
    let fields = crate::catalog::table_fields(path).unwrap_or(&[]);
    let mut scratch = Vec::new();
    crate::decode::defaults_table(path, fields, &mut scratch)
}

/// `"1000"` or `"1000:1000"`.
fn parse_user(s: &str) -> Option<UserSpec> {
    match s.split_once(':') {
        Some((u, g)) => Some(UserSpec {
            uid: u.parse().ok()?,
            gid: Some(g.parse().ok()?),
        }),
        None => Some(UserSpec {
            uid: s.parse().ok()?,
            gid: None,
        }),
    }
}

/// `PATH[:TAG|@sha256:HEX]` → (path, reference).
fn split_oci_reference(rest: &str) -> Result<(&str, Option<OciReference>), String> {
    if let Some((path, digest)) = rest.rsplit_once('@') {
        let hex = digest.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64
            || !hex
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        {
            return Err(format!("invalid digest {digest:?} in base"));
        }
        return Ok((path, Some(OciReference::Digest(digest.to_owned()))));
    }
    // A tag follows the last `:` unless that `:` is part of the path (a `/` after it).
    match rest.rsplit_once(':') {
        Some((path, tag)) if !tag.contains('/') && !tag.is_empty() && !path.is_empty() => {
            Ok((path, Some(OciReference::Tag(tag.to_owned()))))
        }
        _ => Ok((rest, None)),
    }
}

/// Where `path` resolves to (every symlink and `..` resolved) when that is outside `dir`
/// (resolved the same way); `None` when it is inside. A build copies what `from` resolves
/// to, so a project symlink to `/etc/shadow` is as far outside as `/etc/shadow` itself.
fn outside_of(dir: &Path, path: &Path) -> Option<PathBuf> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let resolved = std::fs::canonicalize(path).ok()?;
    let root = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    (!resolved.starts_with(&root)).then_some(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_references() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            split_oci_reference(&format!("img@{d}")),
            Ok(("img", Some(OciReference::Digest(d.clone()))))
        );
        assert_eq!(
            split_oci_reference("dir/img:v1"),
            Ok(("dir/img", Some(OciReference::Tag("v1".into()))))
        );
        assert_eq!(split_oci_reference("dir/img"), Ok(("dir/img", None)));
        assert!(split_oci_reference("img@sha256:abc").is_err());
    }

    #[test]
    fn percent_resolution() {
        assert_eq!(CountOrPercent::Percent(25).resolve(10, true), 3);
        assert_eq!(CountOrPercent::Percent(25).resolve(10, false), 2);
        assert_eq!(CountOrPercent::Count(2).resolve(10, true), 2);
    }
}
