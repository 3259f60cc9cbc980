//! naiad's on-disk format, defined once: the bootstrap (all filesystem
//! metadata), the chunk encoding inside blobs, and the OCI packaging names.
//!
//! `SPEC.md` beside this crate is the normative byte-level description; this
//! crate is its only implementation. It does no I/O and knows no network:
//! callers hand it bytes and get typed records or typed errors back. Every
//! decoder validates what it reads and never panics on any input.
//!
//! - [`records`]: the fixed-size records (inode, dirent, chunk, ...) and their
//!   little-endian encodings.
//! - [`bootstrap`]: [`Bootstrap`], a validated, random-access view of a
//!   bootstrap file that answers lookups without decoding the whole file.
//! - [`builder`]: [`BootstrapBuilder`], which lays records out and writes a
//!   bootstrap file.
//! - [`chunk`]: compression and verification of one chunk in a blob.
//! - [`oci`]: media types and annotation keys of a naiad OCI image.

pub mod bootstrap;
pub mod builder;
pub mod chunk;
pub mod error;
pub mod oci;
pub mod records;

pub use bootstrap::{Bootstrap, DirEntry, FileChunk};
pub use builder::BootstrapBuilder;
pub use chunk::{decode_chunk, encode_chunk, encode_hashed_chunk, EncodedChunk};
pub use error::FormatError;
pub use records::{BlobRecord, ChunkDigest, ChunkRecord, ChunkingParams, DirentRecord, FileChunkRecord, InodeKind, InodeRecord, XattrRecord, MAX_BLOBS, MAX_BLOB_OFFSET, ROOT_INO};
