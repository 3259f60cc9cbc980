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

/// Longest path an error message repeats whole.
const MAX_PATH_IN_MESSAGE: usize = 300;

/// `path` for an error message: a hostile layer's path can be megabytes
/// long, so a longer one keeps its start and end around an ellipsis.
pub fn shorten_path(path: &str) -> String {
    let chars = path.chars().count();
    if chars <= MAX_PATH_IN_MESSAGE {
        return path.to_string();
    }
    let keep = MAX_PATH_IN_MESSAGE / 2;
    let head: String = path.chars().take(keep).collect();
    let tail: String = path.chars().skip(chars - keep).collect();
    format!("{head}...({} characters)...{tail}", chars - 2 * keep)
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_paths_are_shortened() {
        assert_eq!(super::shorten_path("a/b"), "a/b");
        let long = format!("{}end", "d/".repeat(10_000));
        let s = super::shorten_path(&long);
        assert!(s.len() < 400 && s.starts_with("d/d/") && s.ends_with("/end") && s.contains("characters"), "{s}");
    }
}
