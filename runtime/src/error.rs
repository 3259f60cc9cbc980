//! [`RuntimeError`]: what can go wrong running a command in an image.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuntimeError {
    /// The image itself is unusable for this (a bad user database, ...).
    #[error("{0}")]
    Image(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// No OCI runtime, or it could not be started.
    #[error("{0}")]
    Runtime(String),
}
