//! The local provider's system-call allowlist: the host's container profile (the JSON format
//! of containers/common, `/usr/share/containers/seccomp.json` from Debian's
//! `golang-github-containers-common`), turned into the OCI runtime spec's `linux.seccomp` for
//! one instance, plus kiln's namespace rules.
//!
//! The conversion is the one containers/common and Docker do: the host architecture and its
//! sub-architectures from `archMap`; each rule kept only when its `includes` hold (every
//! capability in the instance's bounding set, the host architecture listed, the kernel new
//! enough) and its `excludes` do not (any capability held, the architecture listed, the kernel
//! that new).
//!
//! kiln's namespace rules: the containers/common profile allows `unshare`, `clone` and
//! `clone3` outright, so an unprivileged process could still make user namespaces and, inside
//! them, whatever namespaces and mounts it likes. An instance without `CAP_SYS_ADMIN` (every
//! kiln instance) gets those narrowed as Docker's own profile does: `unshare` fails with
//! `EPERM`, `clone` is allowed only without namespace flags, and `clone3`, whose flags a filter
//! cannot read, fails with `ENOSYS` so libc falls back to `clone`. The rules only narrow: a
//! call the host profile did not allow stays refused.
//!
//! kiln carries no profile of its own: without the host's file a sealed instance does not
//! start (the caller says how to fix that). Pure: the caller reads the file.

use std::collections::HashSet;

use oci_spec::runtime::{
    Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompFilterFlag, LinuxSeccompOperator, LinuxSyscall,
};
use serde::Deserialize;

/// Where Debian (and Fedora) install the containers/common profile.
pub const HOST_PROFILE: &str = "/usr/share/containers/seccomp.json";

/// The package that installs [`HOST_PROFILE`] on Debian.
pub const HOST_PROFILE_PACKAGE: &str = "golang-github-containers-common";

/// The `clone` flags that make namespaces: `CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS |
/// CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET`.
const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// A containers/common profile.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Profile {
    default_action: LinuxSeccompAction,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    default_errno: Option<String>,
    #[serde(default)]
    architectures: Vec<Arch>,
    #[serde(default)]
    arch_map: Vec<ArchMap>,
    syscalls: Vec<Rule>,
    #[serde(default)]
    flags: Vec<LinuxSeccompFilterFlag>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ArchMap {
    architecture: Arch,
    #[serde(default)]
    sub_architectures: Vec<Arch>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Rule {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    names: Vec<String>,
    action: LinuxSeccompAction,
    #[serde(default)]
    args: Option<Vec<Arg>>,
    #[serde(default, rename = "comment")]
    _comment: serde::de::IgnoredAny,
    #[serde(default)]
    includes: Filter,
    #[serde(default)]
    excludes: Filter,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    errno: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Filter {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    #[serde(default)]
    min_kernel: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Arg {
    index: usize,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: LinuxSeccompOperator,
}

/// The host a profile is converted for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Host {
    /// Go's name of the architecture, as profiles write it in `arches` (`amd64`, `arm64`).
    pub arch: &'static str,
    /// libseccomp's name of it, as in `archMap`.
    pub seccomp_arch: Arch,
    /// The kernel's version and major revision (`6.1`).
    pub kernel: (u32, u32),
}

impl Host {
    /// This machine; `None` on an architecture kiln does not know the names of.
    pub fn this() -> Option<Host> {
        let (arch, seccomp_arch) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", Arch::ScmpArchX86_64),
            "aarch64" => ("arm64", Arch::ScmpArchAarch64),
            "s390x" => ("s390x", Arch::ScmpArchS390x),
            "riscv64" => ("riscv64", Arch::ScmpArchRiscv64),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", Arch::ScmpArchPpc64le),
            _ => return None,
        };
        let release = rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned();
        Some(Host {
            arch,
            seccomp_arch,
            kernel: kernel_version(&release).unwrap_or((0, 0)),
        })
    }
}

/// `"6.1.0-18-amd64"` → `(6, 1)`: version and major revision, suffixes ignored.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

/// The errno a profile names (`"errno": "EPERM"`) when it gives no number.
fn errno_number(name: &str) -> Option<u32> {
    Some(match name {
        "EPERM" => EPERM,
        "ENOENT" => 2,
        "EACCES" => 13,
        "EINVAL" => 22,
        "ENOSYS" => ENOSYS,
        _ => return None,
    })
}

fn errno_of(number: Option<u32>, name: Option<&str>, what: &str) -> Result<Option<u32>, String> {
    match (number, name) {
        (Some(n), _) => Ok(Some(n)),
        (None, Some(name)) => errno_number(name)
            .map(Some)
            .ok_or_else(|| format!("{what}: unknown errno {name:?} without a number")),
        (None, None) => Ok(None),
    }
}

impl Filter {
    fn min_kernel(&self, what: &str) -> Result<Option<(u32, u32)>, String> {
        self.min_kernel
            .as_deref()
            .map(|k| kernel_version(k).ok_or_else(|| format!("{what}: bad minKernel {k:?}")))
            .transpose()
    }
}

/// `linux.seccomp` for an instance whose bounding set is `caps`, from the profile `json`.
pub(crate) fn from_profile(
    json: &[u8],
    host: &Host,
    caps: &HashSet<Capability>,
) -> Result<LinuxSeccomp, String> {
    let profile: Profile = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    if !profile.architectures.is_empty() && !profile.arch_map.is_empty() {
        return Err("both `architectures` and `archMap` are set".to_owned());
    }
    let mut architectures = profile.architectures.clone();
    if let Some(m) = profile
        .arch_map
        .iter()
        .find(|m| m.architecture == host.seccomp_arch)
    {
        architectures.push(m.architecture);
        architectures.extend(m.sub_architectures.iter().copied());
    }
    let cap_names: HashSet<String> = caps.iter().map(|c| format!("CAP_{c}")).collect();
    let mut syscalls = Vec::new();
    for (i, rule) in profile.syscalls.iter().enumerate() {
        let what = format!("syscalls[{i}]");
        let ex = &rule.excludes;
        let inc = &rule.includes;
        if ex.arches.iter().any(|a| a == host.arch)
            || ex.caps.iter().any(|c| cap_names.contains(c))
            || ex.min_kernel(&what)?.is_some_and(|k| host.kernel >= k)
        {
            continue;
        }
        if (!inc.arches.is_empty() && !inc.arches.iter().any(|a| a == host.arch))
            || !inc.caps.iter().all(|c| cap_names.contains(c))
            || inc.min_kernel(&what)?.is_some_and(|k| host.kernel < k)
        {
            continue;
        }
        let names: Vec<String> = match (&rule.name, rule.names.is_empty()) {
            (Some(_), false) => return Err(format!("{what}: both `name` and `names` are set")),
            (Some(n), true) => vec![n.clone()],
            (None, _) => rule.names.clone(),
        };
        let args = match rule.args.as_ref().filter(|a| !a.is_empty()) {
            Some(args) => Some(
                args.iter()
                    .map(|a| arg(a.index, a.value, a.value_two, a.op))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("{what}: {e}"))?,
            ),
            None => None,
        };
        let mut call = LinuxSyscall::default();
        call.set_names(names);
        call.set_action(rule.action);
        call.set_errno_ret(errno_of(rule.errno_ret, rule.errno.as_deref(), &what)?);
        call.set_args(args);
        syscalls.push(call);
    }
    if !caps.contains(&Capability::SysAdmin) {
        syscalls = without_namespaces(syscalls, host)?;
    }
    let mut seccomp = LinuxSeccomp::default();
    seccomp.set_default_action(profile.default_action);
    seccomp.set_default_errno_ret(errno_of(
        profile.default_errno_ret,
        profile.default_errno.as_deref(),
        "defaultErrno",
    )?);
    seccomp.set_architectures((!architectures.is_empty()).then_some(architectures));
    seccomp.set_flags((!profile.flags.is_empty()).then_some(profile.flags));
    seccomp.set_syscalls(Some(syscalls));
    Ok(seccomp)
}

fn arg(
    index: usize,
    value: u64,
    value_two: u64,
    op: LinuxSeccompOperator,
) -> Result<LinuxSeccompArg, String> {
    LinuxSeccompArgBuilder::default()
        .index(index)
        .value(value)
        .value_two(value_two)
        .op(op)
        .build()
        .map_err(|e| e.to_string())
}

/// kiln's namespace rules (see the module doc): `unshare`, `clone` and `clone3` taken out of
/// the rules that allow them outright, and allowed back only without namespaces.
fn without_namespaces(
    syscalls: Vec<LinuxSyscall>,
    host: &Host,
) -> Result<Vec<LinuxSyscall>, String> {
    const NARROWED: [&str; 3] = ["clone", "clone3", "unshare"];
    let mut allowed: HashSet<&str> = HashSet::new();
    let mut out: Vec<LinuxSyscall> = Vec::new();
    for mut call in syscalls {
        let unconditional =
            call.action() == LinuxSeccompAction::ScmpActAllow && call.args().is_none();
        if unconditional {
            let names: Vec<String> = call
                .names()
                .iter()
                .filter(|n| match NARROWED.iter().find(|x| *x == n) {
                    Some(x) => {
                        allowed.insert(x);
                        false
                    }
                    None => true,
                })
                .cloned()
                .collect();
            if names.is_empty() {
                continue;
            }
            call.set_names(names);
        }
        out.push(call);
    }
    let rule = |name: &str, action, errno: Option<u32>, args: Option<Vec<LinuxSeccompArg>>| {
        let mut call = LinuxSyscall::default();
        call.set_names(vec![name.to_owned()]);
        call.set_action(action);
        call.set_errno_ret(errno);
        call.set_args(args);
        call
    };
    if allowed.contains("clone") {
        // s390x passes the flags second.
        let index = if host.arch == "s390x" { 1 } else { 0 };
        let flags = arg(
            index,
            CLONE_NAMESPACE_FLAGS,
            0,
            LinuxSeccompOperator::ScmpCmpMaskedEq,
        )?;
        out.push(rule(
            "clone",
            LinuxSeccompAction::ScmpActAllow,
            None,
            Some(vec![flags]),
        ));
    }
    if allowed.contains("clone3") {
        out.push(rule(
            "clone3",
            LinuxSeccompAction::ScmpActErrno,
            Some(ENOSYS),
            None,
        ));
    }
    if allowed.contains("unshare") {
        out.push(rule(
            "unshare",
            LinuxSeccompAction::ScmpActErrno,
            Some(EPERM),
            None,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// A profile in the containers/common format with one rule of each kind that matters.
    const PROFILE: &str = r#"{
      "defaultAction": "SCMP_ACT_ERRNO",
      "defaultErrnoRet": 38,
      "defaultErrno": "ENOSYS",
      "archMap": [
        {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
        {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}
      ],
      "syscalls": [
        {"names": ["kexec_load"], "action": "SCMP_ACT_ERRNO", "args": [], "comment": "",
         "includes": {}, "excludes": {}, "errnoRet": 1, "errno": "EPERM"},
        {"names": ["read", "write", "clone", "clone3", "unshare"], "action": "SCMP_ACT_ALLOW",
         "args": [], "comment": "", "includes": {}, "excludes": {}},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}],
         "comment": "", "includes": {}, "excludes": {}},
        {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "args": [], "comment": "",
         "includes": {"arches": ["amd64", "x32"]}, "excludes": {}},
        {"names": ["set_tls"], "action": "SCMP_ACT_ALLOW", "args": [], "comment": "",
         "includes": {"arches": ["arm", "arm64"]}, "excludes": {}},
        {"names": ["bind"], "action": "SCMP_ACT_ALLOW", "args": null, "comment": "",
         "includes": {"caps": ["CAP_NET_BIND_SERVICE"]}, "excludes": {}},
        {"names": ["mount", "setns"], "action": "SCMP_ACT_ALLOW", "args": [], "comment": "",
         "includes": {"caps": ["CAP_SYS_ADMIN"]}, "excludes": {}},
        {"names": ["mount", "setns"], "action": "SCMP_ACT_ERRNO", "args": [], "comment": "",
         "includes": {}, "excludes": {"caps": ["CAP_SYS_ADMIN"]}, "errno": "EPERM"},
        {"names": ["landlock_create_ruleset"], "action": "SCMP_ACT_ALLOW", "args": [],
         "comment": "", "includes": {"minKernel": "5.13"}, "excludes": {}}
      ]
    }"#;

    fn host(kernel: (u32, u32)) -> Host {
        Host {
            arch: "amd64",
            seccomp_arch: Arch::ScmpArchX86_64,
            kernel,
        }
    }

    /// Each rule as `ACTION[errno] names [args]`, for comparing whole filters at a glance.
    fn render(s: &LinuxSeccomp) -> Vec<String> {
        s.syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| {
                let mut line = format!("{:?}", c.action());
                if let Some(e) = c.errno_ret() {
                    line.push_str(&format!("({e})"));
                }
                line.push_str(&format!(" {}", c.names().join(",")));
                for a in c.args().iter().flatten() {
                    line.push_str(&format!(
                        " [{} {:?} {:#x} {:?}]",
                        a.index(),
                        a.op(),
                        a.value(),
                        a.value_two()
                    ));
                }
                line
            })
            .collect()
    }

    #[test]
    fn an_unprivileged_instance_gets_the_profile_without_namespaces() {
        let s = from_profile(PROFILE.as_bytes(), &host((6, 1)), &HashSet::new()).unwrap();
        assert_eq!(s.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(s.default_errno_ret(), Some(38));
        assert_eq!(
            s.architectures().clone().unwrap(),
            [Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
        );
        assert_eq!(
            render(&s),
            [
                "ScmpActErrno(1) kexec_load",
                "ScmpActAllow read,write",
                "ScmpActAllow personality [0 ScmpCmpEq 0x8 Some(0)]",
                "ScmpActAllow arch_prctl",
                "ScmpActErrno(1) mount,setns",
                "ScmpActAllow landlock_create_ruleset",
                "ScmpActAllow clone [0 ScmpCmpMaskedEq 0x7e020000 Some(0)]",
                "ScmpActErrno(38) clone3",
                "ScmpActErrno(1) unshare",
            ]
        );
    }

    #[test]
    fn capabilities_arches_and_kernels_select_rules() {
        let caps: HashSet<Capability> = [Capability::NetBindService, Capability::SysAdmin]
            .into_iter()
            .collect();
        let s = from_profile(PROFILE.as_bytes(), &host((5, 4)), &caps).unwrap();
        assert_eq!(
            render(&s),
            [
                "ScmpActErrno(1) kexec_load",
                // CAP_SYS_ADMIN: the namespace calls stay as the profile has them.
                "ScmpActAllow read,write,clone,clone3,unshare",
                "ScmpActAllow personality [0 ScmpCmpEq 0x8 Some(0)]",
                "ScmpActAllow arch_prctl",
                "ScmpActAllow bind",
                "ScmpActAllow mount,setns",
                // landlock needs 5.13.
            ]
        );
        let arm = Host {
            arch: "arm64",
            seccomp_arch: Arch::ScmpArchAarch64,
            kernel: (6, 1),
        };
        let s = from_profile(PROFILE.as_bytes(), &arm, &HashSet::new()).unwrap();
        assert_eq!(
            s.architectures().clone().unwrap(),
            [Arch::ScmpArchAarch64, Arch::ScmpArchArm]
        );
        let r = render(&s);
        assert!(r.contains(&"ScmpActAllow set_tls".to_owned()), "{r:?}");
        assert!(!r.iter().any(|l| l.contains("arch_prctl")), "{r:?}");
    }

    #[test]
    fn a_profile_that_does_not_allow_namespaces_is_not_widened() {
        let profile = r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}"#;
        let s = from_profile(profile.as_bytes(), &host((6, 1)), &HashSet::new()).unwrap();
        assert_eq!(render(&s), ["ScmpActAllow read"]);
        assert_eq!(s.architectures(), &None);
    }

    #[test]
    fn malformed_profiles_are_refused_with_the_reason() {
        for (profile, want) in [
            ("{", "EOF"),
            (
                r#"{"defaultAction": "SCMP_ACT_NOPE", "syscalls": []}"#,
                "unknown variant",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [], "surprise": 1}"#,
                "unknown field `surprise`",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["a"],
                   "action": "SCMP_ACT_ALLOW", "includes": {"sometimes": true}}]}"#,
                "unknown field `sometimes`",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"name": "a",
                   "names": ["b"], "action": "SCMP_ACT_ALLOW"}]}"#,
                "syscalls[0]: both `name` and `names` are set",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["a"],
                   "action": "SCMP_ACT_ERRNO", "errno": "EWHATEVER"}]}"#,
                "syscalls[0]: unknown errno \"EWHATEVER\"",
            ),
        ] {
            let err = from_profile(profile.as_bytes(), &host((6, 1)), &HashSet::new()).unwrap_err();
            assert!(err.contains(want), "{profile}: {err}");
        }
    }

    #[test]
    fn kernel_versions_ignore_suffixes() {
        assert_eq!(kernel_version("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("3.12-rc5"), Some((3, 12)));
        assert_eq!(kernel_version("5"), Some((5, 0)));
        assert_eq!(kernel_version("x"), None);
    }

    /// The profile this host has, when it has one, converts (CI installs it).
    #[test]
    fn the_host_profile_converts_when_installed() {
        let Ok(json) = std::fs::read(HOST_PROFILE) else {
            return;
        };
        let Some(h) = Host::this() else { return };
        let s = from_profile(&json, &h, &HashSet::new()).unwrap();
        let r = render(&s);
        assert!(r.contains(&"ScmpActErrno(1) unshare".to_owned()), "{r:?}");
    }
}
