//! The registry crate's error type: every failure names the image, blob or
//! file it concerns.

use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{what}: invalid JSON: {source}")]
    Json { what: String, source: serde_json::Error },
    #[error("{path}: not an OCI image layout: {reason}")]
    NotALayout { path: PathBuf, reason: String },
    #[error("image {reference}: tag {tag:?} not found (available: {available})")]
    TagNotFound { reference: String, tag: String, available: String },
    #[error("image {reference}: {reason}")]
    BadImage { reference: String, reason: String },
    #[error("blob {digest} not found in {store}")]
    BlobNotFound { digest: String, store: String },
    #[error("blob {digest}: content does not match its digest (got {actual})")]
    DigestMismatch { digest: String, actual: String },
    #[error("invalid digest {0:?}")]
    BadDigest(String),
    #[error("blob {digest}: range {offset}+{len} lies past its end ({size} bytes)")]
    RangeOutOfBounds { digest: String, offset: u64, len: u64, size: u64 },
    #[error("layer {digest}: unsupported media type {media_type:?}")]
    UnsupportedMediaType { digest: String, media_type: String },
}

pub type Result<T> = std::result::Result<T, RegistryError>;

/// Attaches a path to an `io::Error`.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| RegistryError::Io { path: path.into(), source })
    }
}
