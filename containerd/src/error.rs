//! [`SnapshotterError`]: everything the snapshotter and `naiad pull
//! --containerd` can fail with, and the gRPC status each becomes
//! ([`SnapshotterError::to_status`]), which containerd maps to its own
//! error kinds (not found, already exists, failed precondition).

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SnapshotterError {
    #[error("snapshot {0:?} does not exist")]
    NotFound(String),
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("configuration {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("metadata database: {0}")]
    Database(String),
    #[error("image {image}: {reason}")]
    Image { image: String, reason: String },
    #[error("mounting image {image}: {reason}")]
    Mount { image: String, reason: String },
    #[error("socket {path}: {reason}")]
    Socket { path: PathBuf, reason: String },
    #[error("containerd at {socket}: {reason}")]
    Containerd { socket: PathBuf, reason: String },
}

impl SnapshotterError {
    /// The gRPC status containerd gets for this error.
    pub fn to_status(&self) -> tonic::Status {
        use containerd_snapshots::tonic::Status;
        let msg = self.to_string();
        match self {
            SnapshotterError::NotFound(_) => Status::not_found(msg),
            SnapshotterError::AlreadyExists(_) => Status::already_exists(msg),
            SnapshotterError::FailedPrecondition(_) => Status::failed_precondition(msg),
            SnapshotterError::InvalidArgument(_) | SnapshotterError::Config { .. } => Status::invalid_argument(msg),
            SnapshotterError::Image { .. } | SnapshotterError::Mount { .. } => Status::unavailable(msg),
            _ => Status::internal(msg),
        }
    }
}

impl From<SnapshotterError> for tonic::Status {
    fn from(e: SnapshotterError) -> Self {
        // Every error containerd gets is in the snapshotter's log too.
        match &e {
            SnapshotterError::NotFound(_) | SnapshotterError::AlreadyExists(_) => tracing::debug!("{e}"),
            _ => tracing::error!("{e}"),
        }
        e.to_status()
    }
}

impl From<redb::Error> for SnapshotterError {
    fn from(e: redb::Error) -> Self {
        SnapshotterError::Database(e.to_string())
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for SnapshotterError {
            fn from(e: $t) -> Self {
                SnapshotterError::Database(e.to_string())
            }
        }
    )*};
}
from_redb!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

/// Attaches a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, SnapshotterError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, SnapshotterError> {
        self.map_err(|source| SnapshotterError::Io { path: path.into(), source })
    }
}
