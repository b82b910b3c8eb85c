//! What `kiln run` and `kiln test` share: the seam between the image store and the runtime
//! ([`StoreImages`]), the local provider on kiln's state directory, and reading the spec
//! when there is one.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use kiln_image::{Store, UnpackOptions, WhiteoutMode};
use kiln_runtime::image::SourceError;
use kiln_runtime::{Digest, Engines, ImageConfig, ImageSource, ResolvedImage};
use kiln_spec::Spec;

use crate::output::Output;

/// The image store seen as the runtime's [`ImageSource`]: manifests and configs by digest,
/// and layers unpacked by the image crate's safe unpack with overlayfs whiteouts.
pub struct StoreImages {
    store: Store,
}

impl StoreImages {
    /// Opens the store at `<state>/images`.
    pub fn open(state: &Path) -> anyhow::Result<StoreImages> {
        let root = state.join("images");
        let store = Store::open(&root)
            .with_context(|| format!("cannot open the image store at {}", root.display()))?;
        Ok(StoreImages { store })
    }

    /// The manifest digest a tag or digest reference names.
    pub fn resolve_ref(&self, reference: &str) -> anyhow::Result<Digest> {
        match self.store.resolve(reference) {
            Ok(desc) => Ok(desc.digest),
            Err(kiln_image::StoreError::NotFound { .. }) => Err(anyhow::anyhow!(
                "no image {reference:?} in the store (run `kiln build`)"
            )),
            Err(e) => Err(e).with_context(|| format!("cannot look up image {reference:?}")),
        }
    }

    /// The store, for attestations.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

impl kiln_control::Attestations for StoreImages {
    fn passed(&self, image: &Digest) -> Result<bool, String> {
        let attestation = self
            .store
            .read_attestation(image)
            .map_err(|e| format!("cannot read the test attestation of {image}: {e}"))?;
        Ok(attestation.as_ref().and_then(|a| a["result"].as_str()) == Some("passed"))
    }

    fn evidence(
        &self,
        image: &Digest,
        keys: &[String],
    ) -> Result<kiln_control::policy::Evidence, String> {
        let trusted = crate::carried::parse_keys(keys)?;
        let carried = crate::carried::read(&self.store, image, &trusted)?;
        Ok(carried.evidence(!trusted.is_empty()))
    }

    /// Images sent by a remote client land in this store (`remote.rs`).
    fn image_store(self: Arc<Self>) -> Option<Arc<dyn kiln_control::blobs::ImageStore>> {
        Some(self)
    }
}

impl ImageSource for StoreImages {
    fn resolve(&self, image: &Digest) -> Result<ResolvedImage, SourceError> {
        let manifest = self.store.manifest(image)?;
        let config = self.store.config(&manifest.config.digest)?;
        let config = ImageConfig::from_oci_json(&config)?;
        Ok(ResolvedImage {
            digest: image.clone(),
            config_digest: manifest.config.digest,
            config,
            layers: manifest.layers.into_iter().map(|l| l.digest).collect(),
        })
    }

    fn export_docker_archive(
        &self,
        image: &Digest,
        tags: &[String],
        dest: &Path,
    ) -> Result<Digest, SourceError> {
        Ok(kiln_image::archive::export_docker_archive(
            &self.store,
            image,
            tags,
            dest,
        )?)
    }

    fn blob_path(&self, digest: &Digest) -> Result<Option<std::path::PathBuf>, SourceError> {
        let path = self.store.blob_path(digest);
        Ok(path.is_file().then_some(path))
    }

    fn referrers_index(&self, image: &Digest) -> Result<Option<Digest>, SourceError> {
        Ok(self.store.referrers_index(image)?)
    }

    fn unpack_layer(
        &self,
        _image: &Digest,
        layer: &Digest,
        dest: &Path,
    ) -> Result<(), SourceError> {
        let opts = UnpackOptions {
            whiteouts: WhiteoutMode::Overlay,
            ..UnpackOptions::default()
        };
        // `unpack_blob` reads the blob to its end and checks its digest: tar stops at its
        // end marker, so a plain unpack would never notice a corrupted tail.
        kiln_image::unpack_blob(&self.store, layer, dest, &opts)?;
        Ok(())
    }
}

/// The spec at `file` when it exists; `Ok(None)` when it does not (commands then use
/// defaults); `Err(code)` when it is invalid (its diagnostics are printed).
pub fn spec_if_present(
    file: &Path,
    out: &Output,
) -> anyhow::Result<Result<Option<Spec>, ExitCode>> {
    if !file.exists() {
        return Ok(Ok(None));
    }
    Ok(super::spec::load(file, out)?.map(Some))
}

/// The providers of `<state>` (local, and docker when an instance asks for it) with the
/// store as their image source. Call inside a tokio runtime.
pub async fn engines(
    state: &Path,
    runtime: &str,
    images: Arc<StoreImages>,
) -> anyhow::Result<Arc<Engines>> {
    Engines::new(state, runtime, images, init_binary())
        .await
        .context("cannot set up the providers (see `kiln doctor`)")
}

/// kiln's own binary, which instances with `[service] init` run as their init (it is static,
/// so it runs on any image). A binary replaced since it started (an upgrade, a rebuild) is
/// still reachable through this process's `/proc/PID/exe`; `None` when neither resolves, and
/// the providers then refuse such instances.
fn init_binary() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    if exe.is_file() {
        return Some(exe);
    }
    let own = std::path::PathBuf::from(format!("/proc/{}/exe", std::process::id()));
    own.is_file().then_some(own)
}

/// A tokio runtime for one command.
pub fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
