//! Errors of the FUSE side: [`FuseError`] for setting a mount up and running
//! it, [`ChunkError`] for one chunk that could not be served.

use std::path::PathBuf;

use thiserror::Error;

/// What can go wrong mounting, serving or unmounting an image.
#[derive(Debug, Error)]
pub enum FuseError {
    #[error("mountpoint {path}: {source}")]
    Mountpoint { path: PathBuf, source: std::io::Error },
    #[error("mountpoint {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("/dev/fuse is not usable ({0}); load the fuse module (modprobe fuse) or give the container the device")]
    NoFuseDevice(std::io::Error),
    #[error("cannot mount on {path}: {source}")]
    Mount { path: PathBuf, source: std::io::Error },
    #[error("cannot unmount {path}: {source}")]
    Unmount { path: PathBuf, source: nix::Error },
    #[error("FUSE session on {path} failed: {source}")]
    Session { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("invalid size {0:?}: expected a number with an optional K, M, G or T suffix")]
    BadSize(String),
    #[error("stats socket {path}: {detail}")]
    Stats { path: PathBuf, detail: String },
    #[error("{0}")]
    Container(String),
    #[error("{0}")]
    Image(String),
    #[error("{0}")]
    Launch(String),
    #[error("{0} is not mounted")]
    NotMounted(PathBuf),
    #[error("{path} is not a naiad mount (it is {fstype})")]
    NotNaiad { path: PathBuf, fstype: String },
}

/// Attaches a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, FuseError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, FuseError> {
        self.map_err(|source| FuseError::Io { path: path.into(), source })
    }
}

pub use naiad_reader::{ChunkError, ChunkErrorKind};

impl From<naiad_reader::StorageError> for FuseError {
    fn from(e: naiad_reader::StorageError) -> Self {
        FuseError::Io { path: e.path, source: e.source }
    }
}
