//! `kiln export kubernetes`: the spec as Kubernetes manifests on stdout, for a cluster kiln
//! does not run (issue 17: "Kubernetes gets manifests, never a home-made scheduler").
//!
//! This module is the thin I/O shell: it reads the spec, finds the image digest (the flag,
//! else the spec's last build in this state directory's store, read without creating
//! anything) and prints. The mapping is [`kubernetes`] (pure), the YAML is [`yaml`].

pub mod kubernetes;
pub mod yaml;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use kiln_image::{Digest, Store};

use crate::output::Output;

/// `kiln export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(subcommand)]
    pub command: ExportCommand,
}

/// What to export to.
#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// Print Kubernetes manifests for the spec (YAML, `---` between objects): a Deployment
    /// (an Argo Rollouts Rollout for blue-green and canary specs) and its Service(s)
    ///
    /// The pod is sealed as kiln seals an instance; the image is referenced by digest.
    /// [route] hosts or tls add an Ingress; a Rollout's [deploy.migrate] is an Argo
    /// AnalysisTemplate whose Job runs before traffic moves. A leading comment names every
    /// key with no Kubernetes counterpart, and the Secrets to create for [service.secrets]
    /// and [route.tls] (their values are never printed). With --json: {notes, objects}.
    Kubernetes(KubernetesArgs),
}

/// `kiln export kubernetes`.
#[derive(Debug, Args)]
pub struct KubernetesArgs {
    /// The spec file
    #[arg(
        short = 'f',
        long = "file",
        default_value = "kiln.toml",
        value_name = "FILE"
    )]
    pub file: PathBuf,

    /// The image: a manifest digest kiln built (sha256:…) or a full reference
    /// (REGISTRY/NAME@sha256:…) [default: the digest of the spec's last `kiln build`, NAME:latest
    /// in the store]
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,

    /// The registry a bare digest is pulled from, e.g. registry.example.com:5000/team; the
    /// image becomes REGISTRY/NAME@sha256:… [default: where `[target] registry` has kiln push
    /// it (HOST[:PORT]/PATH, PATH defaulting to kiln); else none: the repository is the app's
    /// name]
    #[arg(long, value_name = "REGISTRY")]
    pub registry: Option<String>,

    /// The namespace of every object [default: none: kubectl's]
    #[arg(long, short = 'n', value_name = "NS")]
    pub namespace: Option<String>,
}

/// A command-line mistake: printed, exit 2.
#[derive(Debug)]
struct Usage(String);

/// Runs `kiln export`.
pub fn export(args: &ExportArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    match &args.command {
        ExportCommand::Kubernetes(k) => kubernetes_cmd(k, state, out),
    }
}

fn kubernetes_cmd(args: &KubernetesArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let spec = match super::spec::load(&args.file, out)? {
        Ok(spec) => spec,
        Err(code) => return Ok(code),
    };
    let checked = check_flags(args).and_then(|()| {
        let store = existing_store(state)?;
        let (image, digest, note) = image_reference(args, &spec, store.as_ref())?;
        Ok((store, image, digest, note))
    });
    let (store, image, digest, registry_note) = match checked {
        Ok(v) => v,
        Err(Usage(msg)) => {
            out.error(&anyhow::anyhow!(msg));
            return Ok(ExitCode::from(2));
        }
    };
    // The image's own `User` decides who the pod runs as when the spec does not say; it is
    // known when the image is in this store.
    let image_user = store.as_ref().and_then(|s| image_user(s, &digest));
    let manifests = kubernetes::manifests(&kubernetes::Input {
        spec: &spec,
        image,
        image_user,
        namespace: args.namespace.clone(),
    });
    let mut notes = manifests.notes;
    if let Some(n) = registry_note {
        notes.insert(1, n);
    }
    if out.json {
        out.data(&serde_json::json!({
            "notes": notes,
            "objects": manifests.objects,
        }))?;
    } else {
        out.print(&yaml::stream(&notes, &manifests.objects));
    }
    Ok(ExitCode::SUCCESS)
}

fn check_flags(args: &KubernetesArgs) -> Result<(), Usage> {
    if let Some(ns) = &args.namespace
        && !is_dns_label(ns)
    {
        return Err(Usage(format!(
            "--namespace {ns:?} is not a Kubernetes namespace name: up to 63 lowercase letters, \
             digits or `-`, starting and ending with a letter or digit"
        )));
    }
    if let Some(r) = &args.registry
        && !is_repository(r)
    {
        return Err(Usage(format!(
            "--registry {r:?} is not a registry: write HOST[:PORT][/PATH], e.g. \
             registry.example.com:5000/team, without a scheme, tag or digest"
        )));
    }
    Ok(())
}

/// RFC 1123 label: what a namespace name must be.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first().is_some_and(|c| *c != b'-')
        && b.last().is_some_and(|c| *c != b'-')
}

/// A registry host with optional port and path, or a repository (`host:5000/team/app`):
/// no scheme, no whitespace, no tag or digest, no empty path component.
fn is_repository(s: &str) -> bool {
    !s.is_empty()
        && !s.contains("://")
        && !s.contains('@')
        && s.split('/').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"._-:".contains(&c))
        })
        // A `:` is a port in the host, a tag anywhere else.
        && s.split('/').skip(1).all(|part| !part.contains(':'))
}

/// The store of `state`, if one is there; nothing is created.
fn existing_store(state: &Path) -> Result<Option<Store>, Usage> {
    let root = state.join("images");
    if !root.join("index.json").is_file() {
        return Ok(None);
    }
    Store::open(&root).map(Some).map_err(|e| {
        Usage(format!(
            "cannot open the image store at {}: {e}",
            root.display()
        ))
    })
}

/// The reference the pods pull, its digest, and a note when the repository is a guess.
fn image_reference(
    args: &KubernetesArgs,
    spec: &kiln_spec::Spec,
    store: Option<&Store>,
) -> Result<(String, Digest, Option<String>), Usage> {
    let app = spec.name.as_str();
    let digest = match &args.image {
        Some(image) => {
            if let Some((repo, digest)) = image.rsplit_once('@') {
                let digest = Digest::parse(digest).map_err(|e| Usage(format!("--image: {e}")))?;
                if !is_repository(repo) {
                    return Err(Usage(format!(
                        "--image {image:?}: {repo:?} is not a repository (REGISTRY/NAME)"
                    )));
                }
                if args.registry.is_some() {
                    return Err(Usage(
                        "--registry names the registry of a bare digest; --image already \
                         names one"
                            .to_owned(),
                    ));
                }
                return Ok((image.clone(), digest, None));
            }
            Digest::parse(image).map_err(|_| {
                Usage(format!(
                    "--image {image:?} is not a digest: give the manifest digest kiln built \
                     (sha256:…, see `kiln images`) or REGISTRY/NAME@sha256:…; a tag could \
                     change under the cluster"
                ))
            })?
        }
        None => {
            let tag = format!("{app}:latest");
            let found = store.and_then(|s| s.resolve(&tag).ok());
            match found {
                Some(desc) => desc.digest,
                None => {
                    return Err(Usage(format!(
                        "no image of {app} to export: give --image sha256:… (or \
                         REGISTRY/NAME@sha256:…), or run `kiln build` first so that {tag} \
                         names one in this state directory"
                    )));
                }
            }
        }
    };
    // Where the swarm provider pushes the app's images, when `[target] registry` names one.
    let pushed = (spec.target.registry.as_deref())
        .and_then(|r| kiln_runtime::push::Repository::for_app(r, app).ok());
    Ok(match (&args.registry, pushed) {
        (Some(r), _) => (format!("{r}/{app}@{digest}"), digest, None),
        (None, Some(repo)) => (repo.reference(&digest), digest, None),
        (None, None) => (
            format!("{app}@{digest}"),
            digest,
            Some(format!(
                "image: no registry given (--registry), so the repository is the app's name \
                 {app}; the cluster's nodes must be able to pull {app}@sha256:… as it is"
            )),
        ),
    })
}

/// The `User` of an image in the store (`Some("")` when the image sets none).
fn image_user(store: &Store, digest: &Digest) -> Option<String> {
    let manifest = store.manifest(digest).ok()?;
    let config = store.config(&manifest.config.digest).ok()?;
    Some(
        config
            .get("config")
            .and_then(|c| c.get("User"))
            .and_then(|u| u.as_str())
            .unwrap_or_default()
            .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_and_registries() {
        assert!(is_dns_label("prod-1"));
        for bad in ["", "-a", "a-", "A", "a_b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad:?}");
        }
        for good in [
            "registry.example.com:5000/team",
            "localhost:5000",
            "ghcr.io/a/b",
        ] {
            assert!(is_repository(good), "{good:?}");
        }
        for bad in ["https://r", "r/a:tag", "r//a", "", "r@sha256:x", "a b"] {
            assert!(!is_repository(bad), "{bad:?}");
        }
    }
}
