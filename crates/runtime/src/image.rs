//! The seam to the image store: what the runtime needs from an image, and nothing more.
//!
//! The runtime does not depend on the image crate. It asks an [`ImageSource`] for an image's
//! ordered layer digests and its config, and to unpack one layer (overlay form: OCI
//! whiteouts already turned into overlayfs whiteouts) into a directory it names. The binary
//! implements the trait over the real store; tests and the benchmark use [`DirImageSource`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::types::Digest;

/// An error from the image store, passed through with its chain.
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// Where the runtime gets images from.
pub trait ImageSource: Send + Sync {
    /// The image's config and its layers, base first.
    fn resolve(&self, image: &Digest) -> Result<ResolvedImage, SourceError>;

    /// Unpacks `layer` of `image` into `dest` (an existing, empty directory), converting OCI
    /// whiteouts to overlayfs whiteouts, refusing paths that escape `dest`.
    fn unpack_layer(&self, image: &Digest, layer: &Digest, dest: &Path) -> Result<(), SourceError>;

    /// Writes `image` as a `docker save`-style archive at `dest` (which must not exist),
    /// tagged `tags`, and returns its config digest (the image ID a Docker Engine reports).
    /// Sources that cannot do this say so.
    fn export_docker_archive(
        &self,
        image: &Digest,
        tags: &[String],
        dest: &Path,
    ) -> Result<Digest, SourceError> {
        let _ = (tags, dest);
        Err(format!("image {image}: this image source cannot export docker archives").into())
    }

    /// The file holding blob `digest` (a manifest, a config or a layer, as stored), for
    /// pushing it to a registry; `Ok(None)` when the source has no such blob. Sources that
    /// keep no blob files say so.
    fn blob_path(&self, digest: &Digest) -> Result<Option<PathBuf>, SourceError> {
        Err(format!("blob {digest}: this image source keeps no blob files").into())
    }

    /// The digest of the referrers-tag index of `image` (the OCI image index of its
    /// signatures and attestations, tagged `sha256-<hex>`), its referrers checked; `Ok(None)`
    /// when it has none. A push sends its manifests and then it as that tag. Sources that
    /// keep no referrers have none.
    fn referrers_index(&self, image: &Digest) -> Result<Option<Digest>, SourceError> {
        let _ = image;
        Ok(None)
    }
}

/// What the runtime needs to know about one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedImage {
    /// The image (manifest) digest.
    pub digest: Digest,
    /// The process defaults from its config.
    pub config: ImageConfig,
    /// The digest of its config document (the image ID a Docker Engine reports).
    pub config_digest: Digest,
    /// Layer (blob) digests, base first.
    pub layers: Vec<Digest>,
}

/// The process defaults of an OCI image config (`config` in the config JSON).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=VALUE`.
    pub env: Vec<String>,
    /// `User`: `uid`, `uid:gid` (names are not resolved).
    pub user: Option<String>,
    /// `WorkingDir`.
    pub workdir: Option<String>,
}

impl ImageConfig {
    /// Reads the process defaults from an OCI image config document; absent fields are
    /// empty, wrongly typed ones are an error naming the field.
    pub fn from_oci_json(doc: &serde_json::Value) -> Result<ImageConfig, String> {
        let Some(config) = doc.get("config") else {
            return Ok(ImageConfig::default());
        };
        let strings = |key: &str| -> Result<Vec<String>, String> {
            match config.get(key) {
                None | Some(serde_json::Value::Null) => Ok(Vec::new()),
                Some(serde_json::Value::Array(items)) => items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| format!("config.{key} must hold strings"))
                    })
                    .collect(),
                Some(_) => Err(format!("config.{key} must be an array of strings")),
            }
        };
        let string = |key: &str| -> Result<Option<String>, String> {
            match config.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) if s.is_empty() => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("config.{key} must be a string")),
            }
        };
        Ok(ImageConfig {
            entrypoint: strings("Entrypoint")?,
            cmd: strings("Cmd")?,
            env: strings("Env")?,
            user: string("User")?,
            workdir: string("WorkingDir")?,
        })
    }
}

/// An image source whose layers are plain directories, copied on unpack. For tests and the
/// benchmark, where building a real image would need the image store.
#[derive(Debug, Clone, Default)]
pub struct DirImageSource {
    images: BTreeMap<Digest, (ImageConfig, Vec<(Digest, PathBuf)>)>,
}

impl DirImageSource {
    /// An empty source.
    pub fn new() -> DirImageSource {
        DirImageSource::default()
    }

    /// Adds an image made of `layers` (directories, base first) and returns its digest,
    /// derived from the config and the layer paths. A layer's digest is derived from its path.
    pub fn add(&mut self, config: ImageConfig, layers: &[PathBuf]) -> Digest {
        let layers: Vec<(Digest, PathBuf)> = layers
            .iter()
            .map(|p| (Digest::of(p.as_os_str().as_encoded_bytes()), p.clone()))
            .collect();
        let mut key = format!("{config:?}");
        for (d, _) in &layers {
            key.push_str(d.as_str());
        }
        let digest = Digest::of(key.as_bytes());
        self.images.insert(digest.clone(), (config, layers));
        digest
    }
}

impl ImageSource for DirImageSource {
    fn resolve(&self, image: &Digest) -> Result<ResolvedImage, SourceError> {
        let (config, layers) = self
            .images
            .get(image)
            .ok_or_else(|| format!("image {image} not known"))?;
        Ok(ResolvedImage {
            digest: image.clone(),
            config_digest: Digest::of(format!("{config:?}").as_bytes()),
            config: config.clone(),
            layers: layers.iter().map(|(d, _)| d.clone()).collect(),
        })
    }

    fn unpack_layer(&self, image: &Digest, layer: &Digest, dest: &Path) -> Result<(), SourceError> {
        let (_, layers) = self
            .images
            .get(image)
            .ok_or_else(|| format!("image {image} not known"))?;
        let (_, src) = layers
            .iter()
            .find(|(d, _)| d == layer)
            .ok_or_else(|| format!("layer {layer} not in image {image}"))?;
        copy_tree(src, dest)?;
        Ok(())
    }
}

/// Copies the tree under `src` into the existing directory `dest`, keeping modes and
/// symlinks.
fn copy_tree(src: &Path, dest: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let from = entry.path();
        let to = dest.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            std::fs::create_dir(&to)?;
            std::fs::set_permissions(&to, std::fs::metadata(&from)?.permissions())?;
            copy_tree(&from, &to)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        } else {
            std::fs::copy(&from, &to)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn reads_process_defaults_from_an_oci_config() {
        let doc = serde_json::json!({
            "architecture": "amd64",
            "config": {
                "Entrypoint": ["/hello"],
                "Cmd": null,
                "Env": ["PATH=/bin", "A=b"],
                "User": "1000:1000",
                "WorkingDir": "",
                "ExposedPorts": {"8080/tcp": {}}
            }
        });
        let c = ImageConfig::from_oci_json(&doc).unwrap();
        assert_eq!(c.entrypoint, ["/hello"]);
        assert!(c.cmd.is_empty());
        assert_eq!(c.env, ["PATH=/bin", "A=b"]);
        assert_eq!(c.user.as_deref(), Some("1000:1000"));
        assert_eq!(c.workdir, None);
        let bad = serde_json::json!({"config": {"Cmd": "sh"}});
        assert_eq!(
            ImageConfig::from_oci_json(&bad).unwrap_err(),
            "config.Cmd must be an array of strings"
        );
        assert_eq!(
            ImageConfig::from_oci_json(&serde_json::json!({})).unwrap(),
            ImageConfig::default()
        );
    }
}
