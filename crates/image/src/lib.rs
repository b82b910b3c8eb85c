//! `kiln-image`: reproducible, daemonless OCI image builds; the content-addressed image
//! store; safe layer unpacking; import and export.
//!
//! The CLI calls [`build()`], the [`Store`] (list, inspect, tag, gc, attestations) and the
//! [`archive`] functions (import, export); the runtime calls [`unpack_blob()`] on each layer
//! (it verifies the blob to its end; [`unpack()`] takes any tar stream).
//!
//! **API boundary:** this crate reads an `[image]` spec and files on this host and writes
//! only under the store and cache directories it is given (and export targets). It knows
//! nothing of providers, releases or routes: the caller passes in the digests that releases
//! retain when it asks for garbage collection.

// sha2 0.11 under its usual name: this crate needs its serializable hasher state, while the
// rest of the workspace stays on 0.10.
extern crate sha2_serializable as sha2;

pub mod archive;
pub mod attest;
mod base;
mod build;
mod cache;
mod closure;
mod digest;
mod entries;
mod layer;
mod limits;
pub mod oci;
mod receive;
mod referrers;
mod store;
mod tree;
mod unpack;

pub use build::{BuildError, BuildOptions, BuildOutput, Progress, build};
pub use cache::BuildCache;
pub use digest::{Digest, InvalidDigest};
pub use digest::{FileHashes, blake3_hex, file_hashes};
pub use layer::LayerReport;
pub use limits::ImportLimits;
pub use receive::{ReceiveError, ReceivedImage, UPLOAD_TTL, Upload};
pub use referrers::{MAX_REFERRER_MANIFEST, MAX_REFERRERS, Referrer, fallback_tag};
pub use store::{
    BlobWriter, CorruptBlob, GcReport, ImageInfo, ImageSummary, LockGuard, Store, StoreError,
    VerifiedReader, normalize_tag,
};
pub use unpack::{
    Limits, UnpackError, UnpackOptions, UnpackReport, WhiteoutMode, check, decompress, unpack,
    unpack_blob,
};
