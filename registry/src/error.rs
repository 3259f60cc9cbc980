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
    /// A registry option or credential source is unusable (bad CA file,
    /// malformed `--creds`, unreadable docker config).
    #[error("registry configuration: {0}")]
    Config(String),
    /// The registry could not be reached or kept failing (after retries).
    #[error("registry {host}: {what}: {reason}")]
    Network { host: String, what: String, reason: String },
    /// The registry answered with a status naiad cannot work with.
    #[error("registry {host}: {what}: HTTP {status}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Http { host: String, what: String, status: u16, message: String },
    /// The registry refused the credentials, or wants some and has none.
    #[error("registry {host}: {what}: unauthorized: {reason}")]
    Unauthorized { host: String, what: String, reason: String },
    /// A manifest, tag or blob the registry does not have; `detail` is
    /// the registry's own word for it, if any.
    #[error("{reference}: {what} not found{}", if detail.is_empty() { String::new() } else { format!(" ({detail})") })]
    NotFound { reference: String, what: String, detail: String },
    /// A manifest pulled by digest (or announced with one) hashes to another.
    #[error("manifest {reference}: content does not match digest {expected} (got {actual})")]
    ManifestDigestMismatch { reference: String, expected: String, actual: String },
    /// The registry's answer is malformed or not what was asked for.
    #[error("registry {host}: {what}: {reason}")]
    BadResponse { host: String, what: String, reason: String },
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
