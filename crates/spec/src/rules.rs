//! The rules a value must keep, as small functions of the value alone.
//!
//! The spec's two passes call them for `kiln.toml`, and `kiln_control`'s
//! `ReleaseConfig::validate` calls them for a release configuration that arrives through the
//! API or from the ledger instead, so the two can never disagree on what is allowed. A rule
//! says what is wrong ([`Broken::message`], naming the value) and, for someone editing
//! `kiln.toml`, what to write instead ([`Broken::hint`]); the caller says where.
//!
//! **API boundary:** no I/O, no spans, no key paths: where a value is belongs to the caller.
//! Rules that need a fact only the spec file has (was a key written, does a file exist) stay
//! in [`crate::validate`].

use std::fmt;
use std::time::Duration;

use crate::types::{Capability, CountOrPercent, ProviderKind};

/// A rule a value breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// What is wrong: lowercase, no trailing period.
    pub message: String,
    /// What to write in `kiln.toml` instead, when there is something useful to say.
    pub hint: Option<&'static str>,
}

impl Broken {
    pub(crate) fn new(message: impl Into<String>) -> Broken {
        Broken {
            message: message.into(),
            hint: None,
        }
    }

    pub(crate) fn hint(mut self, hint: &'static str) -> Broken {
        self.hint = Some(hint);
        self
    }
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The inclusive range a whole-number key must be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Smallest allowed value.
    pub min: i64,
    /// Largest allowed value.
    pub max: i64,
}

impl Bounds {
    /// Whether `n` is in range. Takes any integer type the value may be stored as.
    pub fn check(self, n: impl Into<i128>) -> Result<(), Broken> {
        let n = n.into();
        if (i128::from(self.min)..=i128::from(self.max)).contains(&n) {
            Ok(())
        } else {
            Err(Broken::new(format!(
                "must be between {} and {}, got {n}",
                self.min, self.max
            )))
        }
    }
}

/// `[service] port`.
pub const PORT: Bounds = Bounds { min: 1, max: 65535 };
/// `[service] replicas`: more than a thousand instances of one app is a typo, not a plan.
pub const REPLICAS: Bounds = Bounds { min: 1, max: 1000 };
/// `[service.health] healthy_threshold` and `unhealthy_threshold`.
pub const HEALTH_THRESHOLD: Bounds = Bounds { min: 1, max: 100 };
/// `[[deploy.steps]] weight`, a percentage of traffic.
pub const CANARY_WEIGHT: Bounds = Bounds { min: 1, max: 100 };
/// `[deploy.analysis] min_requests`.
pub const MIN_REQUESTS: Bounds = Bounds {
    min: 1,
    max: 1_000_000_000,
};
/// `[deploy.migrate] schema` and `compatible_from`.
pub const SCHEMA_VERSION: Bounds = Bounds {
    min: 0,
    max: 1_000_000,
};

/// `[service] pids`: at least the one process, at most the kernel's `PID_MAX_LIMIT`.
pub const PIDS: Bounds = Bounds {
    min: 1,
    max: 4_194_304,
};

/// A duration key: zero would mean "never wait" or "never finish", so it is always a mistake.
pub fn duration(d: Duration) -> Result<(), Broken> {
    if d.is_zero() {
        Err(Broken::new("must be greater than zero"))
    } else {
        Ok(())
    }
}

/// A size in bytes (`memory`, `max_body_size`), given as whatever integer type holds it.
pub fn size(n: impl Into<i128>) -> Result<(), Broken> {
    let n = n.into();
    if n > 0 {
        Ok(())
    } else {
        Err(Broken::new(format!("must be greater than zero, got {n}")))
    }
}

/// A number that must be greater than zero and finite (`cpus`).
pub fn positive(n: f64) -> Result<(), Broken> {
    if n > 0.0 && n.is_finite() {
        Ok(())
    } else {
        Err(Broken::new(format!("must be greater than 0, got {n}")))
    }
}

/// A fraction (`max_error_rate`).
pub fn ratio(r: f64) -> Result<(), Broken> {
    if (0.0..=1.0).contains(&r) {
        Ok(())
    } else {
        Err(Broken::new("must be between 0 and 1"))
    }
}

/// The smallest and largest `[route] max_header_size`: the router parses no head in less,
/// and a head of more than a mebibyte is an attack, not a request.
pub const MIN_HEADER_SIZE: u64 = 8 * 1024;
/// See [`MIN_HEADER_SIZE`].
pub const MAX_HEADER_SIZE: u64 = 1024 * 1024;

/// `[route] max_header_size`, in bytes.
pub fn header_size(n: u64) -> Result<(), Broken> {
    if (MIN_HEADER_SIZE..=MAX_HEADER_SIZE).contains(&n) {
        Ok(())
    } else {
        Err(Broken::new(format!(
            "must be between 8KiB and 1MiB, got {n} bytes"
        )))
    }
}

/// One environment variable of an instance (`port_reserved`) or of the image.
///
/// A process's environment cannot carry a NUL byte: the runtime would refuse the instance
/// long after the release was accepted.
pub fn env_var(name: &str, value: &str, port_reserved: bool) -> Result<(), Broken> {
    let valid = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(
            Broken::new(format!("invalid environment variable name {name:?}"))
                .hint("use letters, digits and `_`, not starting with a digit"),
        );
    }
    if port_reserved && name == "PORT" {
        return Err(Broken::new("`PORT` is set by kiln for each instance")
            .hint("set [service] port instead"));
    }
    if value.contains('\0') {
        return Err(
            Broken::new(format!("the value of {name} contains a NUL byte"))
                .hint("a process's environment cannot carry NUL; remove it"),
        );
    }
    Ok(())
}

/// A command line (`key` names it in the message): a program, then its arguments, none of
/// them holding a NUL byte, which no `execve` can pass.
pub fn command<'a>(key: &str, args: impl IntoIterator<Item = &'a str>) -> Result<(), Broken> {
    let mut args = args.into_iter().peekable();
    if args.peek().is_none_or(|program| program.is_empty()) {
        return Err(Broken::new(format!("`{key}` must name a program")));
    }
    if args.any(|a| a.contains('\0')) {
        return Err(Broken::new(format!("`{key}` contains a NUL byte")));
    }
    Ok(())
}

/// `[target] runtime`: the OCI runtime's program name.
pub fn runtime(runtime: &str) -> Result<(), Broken> {
    command("runtime", [runtime])
}

/// `[service.health] path`: it becomes the target of an HTTP request line.
pub fn health_path(path: &str) -> Result<(), Broken> {
    if !path.starts_with('/') {
        return Err(Broken::new(format!(
            "health `path` must start with `/`, got {path:?}"
        )));
    }
    if path.contains('\0') {
        return Err(Broken::new(format!(
            "health `path` must not contain a NUL byte, got {path:?}"
        )));
    }
    Ok(())
}

/// `[service] writable`: each problem with the index of the path it is about.
pub fn writable<'a>(paths: impl IntoIterator<Item = &'a str>) -> Vec<(usize, Broken)> {
    let mut seen: Vec<&str> = Vec::new();
    let mut problems = Vec::new();
    for (i, w) in paths.into_iter().enumerate() {
        match normalised_absolute(w) {
            Some(n) if n != "/" => {
                if seen.contains(&w) {
                    problems.push((i, Broken::new(format!("{w:?} is listed twice"))));
                }
                seen.push(w);
            }
            Some(_) => problems.push((
                i,
                Broken::new("the root `/` cannot be writable")
                    .hint("list the directories the app writes to, e.g. \"/tmp\""),
            )),
            None => problems.push((
                i,
                Broken::new(format!(
                    "writable path {w:?} must be absolute and normalised"
                ))
                .hint("e.g. \"/tmp\" or \"/var/cache/app\"; no `.` or `..` parts, no trailing `/`"),
            )),
        }
    }
    problems
}

/// A `[service.secrets]` name: a file name under `/run/secrets/` and, with `expose_env`, a
/// variable of the instance: an environment variable name, at most 64 bytes, not `PORT`.
pub fn secret_name(name: &str, expose_env: bool) -> Result<(), Broken> {
    if name.len() > 64 {
        return Err(Broken::new(format!(
            "secret name {name:?} is longer than 64 bytes"
        )));
    }
    env_var(name, "", expose_env).map_err(|b| {
        if b.message.starts_with("invalid environment variable name") {
            Broken::new(format!("invalid secret name {name:?}"))
                .hint("use letters, digits and `_`, not starting with a digit")
        } else {
            b
        }
    })
}

/// `[service] network`: `kiln`, `host`, or the name of a CNI network list, which CNI
/// limits to letters, digits, `_`, `.` and `-`.
pub fn network(name: &str) -> Result<(), Broken> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Broken::new(format!(
            "must be \"kiln\", \"host\" or the name of a CNI network list (letters, digits, \
             `_`, `.` and `-`, at most 64), got {name:?}"
        )))
    }
}

/// `[service] user`: `root`, `UID[:GID]` or `NAME[:GROUP]`, a name made of the characters
/// POSIX allows in portable user names and not starting with `-`, a number fitting 32 bits.
pub fn user(u: &str) -> Result<(), Broken> {
    let part_ok = |p: &str| {
        let name = !p.is_empty()
            && p.len() <= 64
            && !p.starts_with('-')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        let numeric = p.bytes().all(|b| b.is_ascii_digit());
        name && (!numeric || p.parse::<u32>().is_ok())
    };
    let ok = match u.split_once(':') {
        Some((user, group)) => part_ok(user) && part_ok(group),
        None => part_ok(u),
    };
    if ok {
        Ok(())
    } else {
        Err(Broken::new(format!("invalid user {u:?}")).hint(
            "write \"root\", \"UID[:GID]\" or \"NAME[:GROUP]\", e.g. \"1000:1000\" or \"app\"",
        ))
    }
}

/// Every Linux capability (capabilities(7), without `CAP_`), alphabetically, each with what
/// it lets a process reach beyond its instance when it is *dangerous*: granted only with
/// `[service] allow_dangerous_capabilities = true`.
///
/// The safe set is what Docker grants a container by default, less `NET_RAW`: raw sockets
/// forge and sniff traffic of the whole network the instance is on: kiln's bridge, shared
/// with every other app's instances, or the host's with `network = "host"` (Podman drops it
/// by default too). `SETFCAP`, `MKNOD` and
/// `AUDIT_WRITE` stay safe as in Docker: file capabilities do nothing on kiln's `nosuid`
/// mounts under no-new-privileges, the device cgroup refuses every node a `mknod` could
/// make, and namespace creation (where `SETFCAP` maps root) is refused by seccomp.
pub(crate) const CAPABILITIES: &[(&str, Option<&str>)] = &[
    (
        "AUDIT_CONTROL",
        Some("configures the host kernel's auditing"),
    ),
    ("AUDIT_READ", Some("reads the host's audit log")),
    ("AUDIT_WRITE", None),
    ("BLOCK_SUSPEND", Some("keeps the host from suspending")),
    ("BPF", Some("loads BPF programs into the host kernel")),
    (
        "CHECKPOINT_RESTORE",
        Some("reads other processes' memory maps and chooses pids"),
    ),
    ("CHOWN", None),
    ("DAC_OVERRIDE", None),
    (
        "DAC_READ_SEARCH",
        Some("opens files by handle, past its own root"),
    ),
    ("FOWNER", None),
    ("FSETID", None),
    ("IPC_LOCK", Some("locks memory in RAM")),
    (
        "IPC_OWNER",
        Some("bypasses permissions on System V IPC objects"),
    ),
    ("KILL", None),
    ("LEASE", Some("takes leases on files it does not own")),
    (
        "LINUX_IMMUTABLE",
        Some("sets the immutable and append-only flags of files"),
    ),
    (
        "MAC_ADMIN",
        Some("configures the host's mandatory access control"),
    ),
    (
        "MAC_OVERRIDE",
        Some("bypasses the host's mandatory access control"),
    ),
    ("MKNOD", None),
    (
        "NET_ADMIN",
        Some(
            "configures interfaces, routes and firewall of its network (the host's, on the local provider)",
        ),
    ),
    ("NET_BIND_SERVICE", None),
    ("NET_BROADCAST", Some("broadcasts and listens to multicast")),
    (
        "NET_RAW",
        Some("forges and sniffs packets of the other instances on its bridge, or the host's"),
    ),
    (
        "PERFMON",
        Some("reads performance data of the kernel and other processes"),
    ),
    ("SETFCAP", None),
    ("SETGID", None),
    ("SETPCAP", None),
    ("SETUID", None),
    ("SYSLOG", Some("reads and clears the host kernel's log")),
    (
        "SYS_ADMIN",
        Some(
            "mounts, makes namespaces and does most of what root does: the usual way out of a container",
        ),
    ),
    ("SYS_BOOT", Some("reboots the host")),
    ("SYS_CHROOT", None),
    ("SYS_MODULE", Some("loads modules into the host kernel")),
    (
        "SYS_NICE",
        Some("raises priorities and takes real-time scheduling from the host"),
    ),
    ("SYS_PACCT", Some("switches the host's process accounting")),
    (
        "SYS_PTRACE",
        Some("traces and reads the memory of other processes"),
    ),
    (
        "SYS_RAWIO",
        Some("does raw I/O on the host's ports and devices"),
    ),
    ("SYS_RESOURCE", Some("overrides resource limits and quotas")),
    ("SYS_TIME", Some("sets the host's clock")),
    ("SYS_TTY_CONFIG", Some("configures the host's terminals")),
    ("WAKE_ALARM", Some("sets alarms that wake the host")),
];

/// One `[service] capabilities` entry: a name of capabilities(7) in any case, with or
/// without `CAP_`.
pub fn capability(name: &str) -> Result<Capability, Broken> {
    Capability::parse(name).ok_or_else(|| {
        Broken::new(format!("unknown capability {name:?}")).hint(
            "a name from capabilities(7), with or without `CAP_`, e.g. \"CHOWN\" or \"CAP_SETUID\"",
        )
    })
}

/// `[service] capabilities` with `allow_dangerous_capabilities`: each problem with the index
/// of the capability it is about, or `None` when it is about the opt-in. The opt-in is
/// refused when nothing listed needs it: left behind, it would let a dangerous capability
/// added later pass review unnoticed.
pub fn capabilities(caps: &[Capability], allow_dangerous: bool) -> Vec<(Option<usize>, Broken)> {
    let mut problems = Vec::new();
    for (i, c) in caps.iter().enumerate() {
        if caps[..i].contains(c) {
            problems.push((
                Some(i),
                Broken::new(format!("capability {c} is listed twice")),
            ));
        } else if let Some(danger) = c.danger()
            && !allow_dangerous
        {
            problems.push((
                Some(i),
                Broken::new(format!(
                    "capability {c} is dangerous ({danger}) and needs \
                     `allow_dangerous_capabilities = true`"
                ))
                .hint("remove it, or opt in with [service] allow_dangerous_capabilities = true"),
            ));
        }
    }
    if allow_dangerous && !caps.iter().any(|c| c.danger().is_some()) {
        problems.push((
            None,
            Broken::new(
                "`allow_dangerous_capabilities` is set, but no capability listed is dangerous",
            )
            .hint("remove it; it only grants what `capabilities` lists"),
        ));
    }
    problems
}

/// `Some(path)` when `p` is absolute and already normalised (no `.`, `..`, `//` or trailing
/// `/`, except the root itself, and no NUL byte).
pub fn normalised_absolute(p: &str) -> Option<String> {
    if p == "/" {
        return Some("/".to_owned());
    }
    let rest = p.strip_prefix('/')?;
    let ok = rest
        .split('/')
        .all(|part| !part.is_empty() && part != "." && part != ".." && !part.contains('\0'));
    ok.then(|| p.to_owned())
}

/// Keys that only mean something with some strategies, given whether each was set: the
/// canary's `steps` and `analysis`, and `promote`, which a rolling update has no use for.
pub fn strategy_keys(strategy: &str, set: impl Fn(&str) -> bool) -> Vec<(&'static str, Broken)> {
    let mut problems = Vec::new();
    if strategy != "canary" {
        for key in ["steps", "analysis", "scale_stable"] {
            if set(key) {
                problems.push((
                    key,
                    Broken::new(format!(
                        "`{key}` only applies to the canary strategy, but strategy is \
                         {strategy:?}"
                    ))
                    .hint("remove it, or set strategy = \"canary\""),
                ));
            }
        }
    }
    if strategy == "rolling" && set("promote") {
        problems.push((
            "promote",
            Broken::new("`promote` only applies to blue-green and canary")
                .hint("a rolling update advances as instances become healthy"),
        ));
    }
    problems
}

/// A rolling update must be allowed to start or stop at least one instance at a time; the
/// problem is about `max_surge`.
pub fn rolling_progress(
    strategy: &str,
    max_surge: CountOrPercent,
    max_unavailable: CountOrPercent,
    replicas: u32,
) -> Result<(), Broken> {
    if strategy == "rolling"
        && max_surge.resolve(replicas, true) == 0
        && max_unavailable.resolve(replicas, false) == 0
    {
        return Err(Broken::new(
            "`max_surge` and `max_unavailable` are both 0, so a rolling update could never make \
             progress",
        )
        .hint("allow at least one: max_surge = 1"));
    }
    Ok(())
}

/// The canary strategy has at least one step (`count` of them).
pub fn canary_has_steps(count: usize) -> Result<(), Broken> {
    if count == 0 {
        return Err(
            Broken::new("the canary strategy needs at least one [[deploy.steps]]")
                .hint("e.g. steps of weight 10, 50 and 100"),
        );
    }
    Ok(())
}

/// A canary step's weight against the step before it: weights strictly increase.
pub fn canary_weight_follows(previous: i64, weight: i64) -> Result<(), Broken> {
    if weight <= previous {
        return Err(Broken::new(format!(
            "canary weights must strictly increase, but {weight} follows {previous}"
        )));
    }
    Ok(())
}

/// The last canary step's weight: the canary ends with all the traffic.
pub fn canary_last_weight(last: i64) -> Result<(), Broken> {
    if last != 100 {
        return Err(Broken::new(format!(
            "canary steps must end at weight 100, but the last step is {last}"
        ))
        .hint("add a final [[deploy.steps]] with weight = 100"));
    }
    Ok(())
}

/// `[deploy.migrate] compatible_from` against `schema`.
pub fn compatible_from(compatible_from: u32, schema: u32) -> Result<(), Broken> {
    if compatible_from > schema {
        return Err(Broken::new(format!(
            "`compatible_from` ({compatible_from}) is newer than `schema` ({schema})"
        ))
        .hint("a release cannot need a schema newer than the one it migrates to"));
    }
    Ok(())
}

/// One `[route] hosts` entry: a DNS name, or `*.` and one.
pub fn host(h: &str) -> Result<(), Broken> {
    if valid_host(h) {
        return Ok(());
    }
    Err(Broken::new(format!("invalid host name {h:?}"))
        .hint("a DNS name such as \"app.example.com\", without scheme, port or path"))
}

fn valid_host(h: &str) -> bool {
    let h = h.strip_prefix("*.").unwrap_or(h);
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// `[route] preview_header`: an HTTP header name.
pub fn preview_header(h: &str) -> Result<(), Broken> {
    if !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Ok(());
    }
    Err(Broken::new(format!("invalid header name {h:?}"))
        .hint("letters, digits and `-`, e.g. \"X-Kiln-Release\""))
}

/// Keys of `[target]` the provider does not read, given whether each was set.
pub fn target_keys(
    provider: ProviderKind,
    set: impl Fn(&str) -> bool,
) -> Vec<(&'static str, Broken)> {
    let engine = "provider = \"docker\" or \"swarm\"";
    let swarm = "provider = \"swarm\"";
    [
        ("docker_host", engine),
        ("exec", engine),
        ("placement", swarm),
        ("registry", swarm),
        ("registry_insecure", swarm),
    ]
    .into_iter()
    .filter(|(key, _)| set(key))
    .filter(|(key, _)| match provider {
        ProviderKind::Local => true,
        ProviderKind::Docker => ["placement", "registry", "registry_insecure"].contains(key),
        ProviderKind::Swarm => false,
    })
    .map(|(key, applies)| {
        (
            key,
            Broken::new(format!("`{key}` only applies to {applies}")),
        )
    })
    .collect()
}

/// `[target] registry`: `HOST[:PORT][/PATH]`, an OCI Distribution registry and an optional
/// repository prefix, in the distribution reference grammar (a DNS name or `[IPv6]`, a port
/// of digits, path components of lowercase letters and digits joined by `.`, `_`, `__` or
/// runs of `-`). Returns the host (with its port) and the path.
pub fn registry(r: &str) -> Result<(&str, Option<&str>), Broken> {
    let hint = "HOST[:PORT][/PATH], e.g. \"registry.example.com\", \"10.0.0.5:5000/team\"";
    let bad = |why: String| Broken::new(format!("registry {r:?}: {why}")).hint(hint);
    if r.contains("://") {
        return Err(bad(
            "no scheme: kiln speaks HTTPS (plain HTTP only on loopback \
                        or with registry_insecure = true)"
                .to_owned(),
        ));
    }
    // The repository name the engine pulls (`PATH/<app>`) must stay under the spec's 255.
    if r.len() > 200 {
        return Err(bad("longer than 200 characters".to_owned()));
    }
    let (host, path) = match r.split_once('/') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return Err(bad("unclosed `[` in the host".to_owned()));
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad(format!("{v6:?} is not an IPv6 address")));
        }
        match after {
            "" => (None, None),
            p => match p.strip_prefix(':') {
                Some(p) => (None, Some(p)),
                None => return Err(bad(format!("unexpected {p:?} after the host"))),
            },
        }
    } else {
        match host.split_once(':') {
            Some((n, p)) => (Some(n), Some(p)),
            None => (Some(host), None),
        }
    };
    if let Some(n) = name
        && (n.starts_with("*.") || !valid_host(n))
    {
        return Err(bad(format!("invalid host {n:?}")));
    }
    if let Some(p) = port
        && (p.is_empty()
            || p.len() > 5
            || !p.bytes().all(|b| b.is_ascii_digit())
            || p.parse::<u16>().map_or(true, |n| n == 0))
    {
        return Err(bad(format!("invalid port {p:?}")));
    }
    if let Some(path) = path {
        for c in path.split('/') {
            if !path_component(c) {
                return Err(bad(format!(
                    "invalid path component {c:?} (lowercase letters and digits, joined by \
                     `.`, `_`, `__` or `-`)"
                )));
            }
        }
    }
    Ok((host, path))
}

/// One component of a repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub fn path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let (Some(&first), Some(&last)) = (b.first(), b.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__` or any number of `-`.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

/// One Swarm placement constraint: `ATTRIBUTE == VALUE` or `ATTRIBUTE != VALUE`, as Swarm
/// itself parses them (an attribute of `node.` or `engine.labels.`).
pub fn placement(c: &str) -> Result<(), Broken> {
    let hint = "e.g. \"node.role == worker\" or \"node.labels.zone != b\"";
    let Some((attr, value)) = c.split_once("==").or_else(|| c.split_once("!=")) else {
        return Err(Broken::new(format!("placement {c:?} has no `==` or `!=`")).hint(hint));
    };
    let (attr, value) = (attr.trim(), value.trim());
    let known = [
        "node.id",
        "node.hostname",
        "node.role",
        "node.platform.os",
        "node.platform.arch",
    ];
    let labelled = ["node.labels.", "engine.labels."]
        .iter()
        .any(|p| attr.strip_prefix(p).is_some_and(|l| !l.is_empty()));
    if !known.contains(&attr) && !labelled {
        return Err(
            Broken::new(format!("placement {c:?}: unknown attribute {attr:?}")).hint(
                "node.id, node.hostname, node.role, node.platform.os, node.platform.arch, \
             node.labels.NAME or engine.labels.NAME",
            ),
        );
    }
    let bad = |ch: char| ch.is_control() || ch == '=' || ch == '!';
    if value.is_empty() || value.chars().any(bad) {
        return Err(Broken::new(format!("placement {c:?}: bad value {value:?}")).hint(hint));
    }
    Ok(())
}

/// One trusted key as `[policy] keys` holds it: an OpenSSH `ssh-ed25519 BASE64 [comment]`
/// line. The key bytes themselves are checked where they are used (`kiln-sign`).
pub fn trusted_key(line: &str) -> Result<(), Broken> {
    let hint = "write an OpenSSH public key line, `ssh-ed25519 AAAA… comment`, or the path of a \
                .pub file";
    let mut parts = line.split_ascii_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return Err(Broken::new(format!("{:?} is not a public key line", shown(line))).hint(hint));
    };
    let ssh_kind = ["ssh-", "ecdsa-", "sk-"]
        .iter()
        .any(|p| kind.starts_with(p));
    if !ssh_kind {
        return Err(Broken::new(format!("{:?} is not a public key line", shown(line))).hint(hint));
    }
    if kind != "ssh-ed25519" {
        return Err(Broken::new(format!(
            "{kind:?} keys are not supported: kiln signs and verifies with ssh-ed25519 keys"
        ))
        .hint("make one with `kiln key generate` or `ssh-keygen -t ed25519`"));
    }
    let base64 = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=');
    if !blob.starts_with("AAAAC3NzaC1lZDI1NTE5") || !blob.chars().all(base64) {
        return Err(Broken::new(format!(
            "{:?} is not an ssh-ed25519 public key",
            shown(line)
        ))
        .hint(hint));
    }
    Ok(())
}

/// The first 60 characters of `s`, for a message.
fn shown(s: &str) -> String {
    s.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn normalised_paths() {
        for ok in ["/", "/tmp", "/var/cache/app"] {
            assert_eq!(normalised_absolute(ok).as_deref(), Some(ok));
        }
        for bad in ["tmp", "/tmp/", "/a//b", "/a/./b", "/a/../b", "", "/a\0b"] {
            assert_eq!(normalised_absolute(bad), None, "{bad}");
        }
    }

    #[test]
    fn hosts() {
        assert!(valid_host("app.example.com"));
        assert!(valid_host("*.example.com"));
        assert!(!valid_host("http://x"));
        assert!(!valid_host("a..b"));
        assert!(!valid_host("x:80"));
        assert!(!valid_host("a\0b"));
    }

    #[test]
    fn bounds_take_any_integer_type() {
        assert_eq!(REPLICAS.check(1000_u32), Ok(()));
        assert_eq!(
            REPLICAS.check(1_000_000_u32).map_err(|b| b.message),
            Err("must be between 1 and 1000, got 1000000".to_owned())
        );
        assert!(MIN_REQUESTS.check(u64::MAX).is_err());
        assert!(PORT.check(0_u16).is_err());
    }

    #[test]
    fn commands_name_a_program_and_hold_no_nul() {
        assert_eq!(command("command", ["/bin/migrate", "--up"]), Ok(()));
        for (args, want) in [
            (&[][..], "`command` must name a program"),
            (&[""][..], "`command` must name a program"),
            (&["/bin/m", "a\0b"][..], "`command` contains a NUL byte"),
        ] {
            assert_eq!(
                command("command", args.iter().copied()).map_err(|b| b.message),
                Err(want.to_owned())
            );
        }
    }

    #[test]
    fn users_are_root_ids_or_portable_names() {
        for ok in [
            "root",
            "0",
            "1000:1000",
            "app",
            "app:staff",
            "www-data",
            "65534:0",
            "a.b_c",
        ] {
            assert_eq!(user(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ":",
            "1000:",
            ":1000",
            "a:b:c",
            "-x",
            "4294967296",
            "1:4294967296",
            "a b",
            "a\0",
            "ä",
            &"a".repeat(65),
        ] {
            assert!(user(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn capabilities_parse_in_any_spelling_and_refuse_unknown_names() {
        for (written, want) in [
            ("CHOWN", "CHOWN"),
            ("chown", "CHOWN"),
            ("CAP_SETUID", "SETUID"),
            ("cap_net_bind_service", "NET_BIND_SERVICE"),
            ("Sys_Admin", "SYS_ADMIN"),
        ] {
            assert_eq!(capability(written).map(Capability::as_str), Ok(want));
        }
        for bad in ["", "CAP_", "CHOWNN", "cap-chown", "ALL", " CHOWN"] {
            let b = capability(bad).unwrap_err();
            assert_eq!(b.message, format!("unknown capability {bad:?}"));
        }
        // Stored names are canonical only.
        assert_eq!(
            Capability::canonical("CHOWN").map(Capability::as_str),
            Some("CHOWN")
        );
        assert_eq!(Capability::canonical("chown"), None);
        assert_eq!(Capability::canonical("CAP_CHOWN"), None);
    }

    #[test]
    fn the_safe_set_is_docker_s_default_less_net_raw() {
        let mut safe: Vec<&str> = Capability::all()
            .filter(|c| c.danger().is_none())
            .map(Capability::as_str)
            .collect();
        safe.sort_unstable();
        assert_eq!(
            safe,
            [
                "AUDIT_WRITE",
                "CHOWN",
                "DAC_OVERRIDE",
                "FOWNER",
                "FSETID",
                "KILL",
                "MKNOD",
                "NET_BIND_SERVICE",
                "SETFCAP",
                "SETGID",
                "SETPCAP",
                "SETUID",
                "SYS_CHROOT",
            ]
        );
        assert_eq!(
            Capability::all().count(),
            41,
            "capabilities(7) up to Linux 6.x"
        );
        let names: Vec<&str> = CAPABILITIES.iter().map(|(n, _)| *n).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted, "kept alphabetical");
    }

    #[test]
    fn dangerous_capabilities_need_the_opt_in_and_the_opt_in_needs_one() {
        let caps = |names: &[&str]| -> Vec<Capability> {
            names.iter().map(|n| capability(n).unwrap()).collect()
        };
        let problems = |names: &[&str], allow: bool| -> Vec<(Option<usize>, String)> {
            capabilities(&caps(names), allow)
                .into_iter()
                .map(|(i, b)| (i, b.message))
                .collect()
        };
        assert_eq!(problems(&["CHOWN", "SETUID", "SETGID"], false), []);
        assert_eq!(problems(&[], false), []);
        assert_eq!(problems(&["NET_ADMIN", "CHOWN"], true), []);
        let got = problems(&["CHOWN", "SYS_ADMIN", "NET_RAW", "CAP_CHOWN"], false);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0].0, Some(1));
        assert!(
            got[0]
                .1
                .starts_with("capability SYS_ADMIN is dangerous (mounts")
                && got[0]
                    .1
                    .ends_with("needs `allow_dangerous_capabilities = true`"),
            "{}",
            got[0].1
        );
        assert_eq!(got[1].0, Some(2));
        assert_eq!(
            got[2],
            (Some(3), "capability CHOWN is listed twice".to_owned())
        );
        assert_eq!(
            problems(&["CHOWN"], true),
            [(
                None,
                "`allow_dangerous_capabilities` is set, but no capability listed is dangerous"
                    .to_owned()
            )]
        );
    }

    #[test]
    fn writable_paths_report_each_problem_by_index() {
        let got: Vec<(usize, String)> = writable(["/tmp", "tmp", "/", "/tmp"])
            .into_iter()
            .map(|(i, b)| (i, b.message))
            .collect();
        assert_eq!(
            got,
            [
                (
                    1,
                    "writable path \"tmp\" must be absolute and normalised".to_owned()
                ),
                (2, "the root `/` cannot be writable".to_owned()),
                (3, "\"/tmp\" is listed twice".to_owned()),
            ]
        );
    }

    #[test]
    fn registries_follow_the_distribution_grammar() {
        for (ok, host, path) in [
            ("registry.example.com", "registry.example.com", None),
            ("localhost:5000", "localhost:5000", None),
            ("10.0.0.5:5000/team", "10.0.0.5:5000", Some("team")),
            ("[::1]:5000/a/b-c", "[::1]:5000", Some("a/b-c")),
            ("[fd00::1]", "[fd00::1]", None),
            (
                "r.io/a__b/c.d/e---f/g_h",
                "r.io",
                Some("a__b/c.d/e---f/g_h"),
            ),
        ] {
            assert_eq!(registry(ok).unwrap(), (host, path), "{ok}");
        }
        for bad in [
            "",
            "https://r.io",
            "r.io/",
            "r.io/Team",
            "r.io/a//b",
            "r.io/a___b",
            "r.io/-a",
            "r.io/a.",
            "r.io/a._b",
            "r.io:",
            "r.io:0",
            "r.io:65536",
            "r.io:50x",
            "-r.io",
            "*.r.io",
            "[::1",
            "[nope]:5000",
            "[::1]x",
            "r.io/a b",
        ] {
            assert!(registry(bad).is_err(), "{bad:?} accepted");
        }
        let e = registry("r.io/Team").unwrap_err();
        assert_eq!(
            e.message,
            "registry \"r.io/Team\": invalid path component \"Team\" (lowercase letters and \
             digits, joined by `.`, `_`, `__` or `-`)"
        );
    }
}
