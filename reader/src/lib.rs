//! naiad's read path, shared by every reader of a converted image (the FUSE
//! daemon, `naiad check`, `naiad unpack`, `naiad inspect`, the chunk
//! dictionary of `naiad convert`):
//!
//! - [`naiad_image`]: [`NaiadImage`], a converted image opened for reading
//!   (bootstrap found, checked and validated; config; blob table; the
//!   store its blobs are read from); [`bootstrap_cache`]: its decoded
//!   bootstrap kept on disk for the next open.
//! - [`fetch_plan`]: the only place chunk ranges are merged into requests,
//!   under one [`MergeLimits`].
//! - [`chunk_reader`]: [`ChunkReader`], reading planned requests from the
//!   store, cutting them into chunks, decoding and verifying each; and the
//!   [`ChunkFetcher`] interface the daemon's caches load through.
//!
//! The `naiad-registry` crate below it fetches exactly the ranges it is
//! given and knows nothing of naiad's format.

pub mod bootstrap_cache;
pub mod chunk_reader;
pub mod error;
pub mod fetch_plan;
pub mod naiad_image;

pub use bootstrap_cache::BootstrapCache;
pub use chunk_reader::{BlobSha256, ChunkFetcher, ChunkReader, FetchedChunk};
pub use error::{ChunkError, ChunkErrorKind};
pub use fetch_plan::{plan, MergeLimits, Request};
pub use naiad_image::NaiadImage;
