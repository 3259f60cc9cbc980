//! OCI image layers in, naiad image (bootstrap + chunk blobs) out; and the
//! tools that read a naiad image back without mounting it.
//!
//! Conversion streams: each layer is read once, decompressed on the fly,
//! its entries applied to an in-memory metadata [`tree`] with OCI layer
//! semantics, and each regular file's bytes cut into chunks ([`chunker`])
//! that are hashed, compressed and deduplicated in parallel
//! ([`chunk_sink`]) into one blob per layer. At the end the tree becomes a
//! bootstrap ([`bootstrap_writer`]) and the whole is packaged as an OCI
//! image ([`package`]).
//!
//! - [`convert()`]: the whole conversion, see [`ConvertOptions`].
//! - [`inspect`], [`check`], [`unpack`]: summarize, verify and extract a
//!   naiad image.

pub mod bootstrap_writer;
pub mod check;
pub mod chunk_dict;
pub mod chunk_sink;
pub mod chunker;
pub mod convert;
pub mod error;
pub mod inspect;
pub mod layer;
pub mod package;
pub mod prefetch;
pub mod read_ahead;
pub mod tree;
pub mod unpack;

pub use chunker::Chunking;
pub use convert::{convert, ChunkDictSource, ConvertOptions, ConvertSummary, Progress, DEFAULT_ZSTD_LEVEL};
pub use error::ConvertError;
pub use prefetch::{PrefetchList, TraceRecord};
