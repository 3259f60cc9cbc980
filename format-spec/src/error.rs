//! The one error type of the format crate: everything that can be wrong with
//! bytes that claim to be a naiad bootstrap or chunk.

use thiserror::Error;

/// What is wrong with a bootstrap or a chunk. Each variant names the part of
/// the format that failed so a user can tell a truncated download from a
/// corrupted table.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a naiad bootstrap: bad magic")]
    BadMagic,
    #[error("unsupported bootstrap version {major}.{minor} (this build reads {supported}.x)")]
    UnsupportedVersion { major: u16, minor: u16, supported: u16 },
    #[error("bootstrap truncated: header says {expected} bytes, have {actual}")]
    Truncated { expected: u64, actual: u64 },
    #[error("bootstrap checksum mismatch: the file is corrupted")]
    ChecksumMismatch,
    #[error("bootstrap header is corrupted: {0}")]
    BadHeader(String),
    #[error("bootstrap {table} table is corrupted: {detail}")]
    BadTable { table: &'static str, detail: String },
    #[error("{table} index {index} out of range (table has {len} entries)")]
    OutOfRange { table: &'static str, index: u64, len: u64 },
    #[error("inode {ino}: {detail}")]
    BadInode { ino: u32, detail: String },
    #[error("string at offset {offset} with length {len} lies outside the string table ({table_len} bytes)")]
    BadString { offset: u64, len: u64, table_len: u64 },
    #[error("chunk {digest}: {detail}")]
    BadChunk { digest: String, detail: String },
    #[error("bootstrap too large: {0}")]
    TooLarge(String),
}

pub type Result<T> = std::result::Result<T, FormatError>;
