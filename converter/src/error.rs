//! The converter's error type. Every variant names the input it is about:
//! the image, the layer digest, the path inside the layer.

use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConvertError {
    #[error(transparent)]
    Registry(#[from] naiad_registry::RegistryError),
    #[error("layer {layer}: {reason}")]
    Layer { layer: String, reason: String },
    #[error("layer {layer}: entry {path:?}: {reason}")]
    Entry { layer: String, path: String, reason: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("bootstrap: {0}")]
    Format(#[from] naiad_format::FormatError),
    #[error("{0}")]
    Invalid(String),
    #[error("{image}: {detail}")]
    Check { image: String, detail: String },
}

pub type Result<T> = std::result::Result<T, ConvertError>;
