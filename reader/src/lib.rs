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
//!   [`ChunkFetcher`] interface the caches load through.
//! - [`chunk_cache`]: [`ChunkCache`], the tiered, single-flight read path
//!   of a mount: [`memory_cache`] ([`MemoryCache`], decoded chunks),
//!   [`disk_cache`] ([`DiskCache`], stored chunks, re-verified on every
//!   hit), then the chunk reader; loads in flight are shared through
//!   [`inflight`].
//! - [`counters`]: [`Counters`], what the read path (and the mount using
//!   it) has done, in a file every daemon generation of a mount maps
//!   ([`shared_mapping`]), with the read-latency [`histogram`].
//!
//! The `naiad-registry` crate below it fetches exactly the ranges it is
//! given and knows nothing of naiad's format.

pub mod bootstrap_cache;
pub mod chunk_cache;
pub mod chunk_reader;
pub mod counters;
pub mod disk_cache;
pub mod error;
pub mod fetch_plan;
pub mod histogram;
pub mod inflight;
pub mod memory_cache;
pub mod naiad_image;
pub mod shared_mapping;
pub mod size;

pub use bootstrap_cache::BootstrapCache;
pub use chunk_cache::ChunkCache;
pub use chunk_reader::{BlobSha256, ChunkFetcher, ChunkReader, FetchedChunk};
pub use counters::{CounterBlock, CounterSnapshot, Counters, Origin, PrefetchSnapshot};
pub use disk_cache::DiskCache;
pub use error::{ChunkError, ChunkErrorKind, StorageError};
pub use fetch_plan::{plan, MergeLimits, Request};
pub use histogram::{Histogram, HistogramSnapshot};
pub use memory_cache::MemoryCache;
pub use naiad_image::{NaiadImage, StartupSet};
