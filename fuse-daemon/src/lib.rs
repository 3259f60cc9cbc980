//! naiad-fuse: the read side of naiad. It serves a converted image as a
//! read-only FUSE filesystem, fetching, verifying and caching chunks on
//! demand.
//!
//! The pieces, one concept per module:
//!
//! - [`filesystem`]: [`NaiadFs`], the `fuser::Filesystem` over a
//!   [`naiad_format::Bootstrap`]: metadata comes from the bootstrap, file
//!   bytes from the chunk cache.
//! - [`attr`]: bootstrap inode records as FUSE attributes.
//! - The read path is crate `naiad-reader`'s: its [`ChunkCache`] (memory,
//!   then disk, then the image's [`ChunkReader`], single-flight, with
//!   batches read in planned requests) is what the filesystem, the
//!   prefetcher and the loads ahead read chunks through, and its
//!   [`Counters`] count what the mount does. Its modules are re-exported
//!   here under their names ([`chunk_cache`], [`memory_cache`],
//!   [`disk_cache`], [`inflight`], [`counters`], [`histogram`],
//!   [`shared_mapping`]).
//! - [`passthrough`], [`backing_files`]: opens the kernel serves itself
//!   from whole-file backing files in the cache (FUSE passthrough).
//! - [`read_ahead`]: [`read_ahead::ReadAhead`], per-file sequential
//!   read-ahead with a growing window.
//! - [`read_pool`]: [`read_pool::ReadPool`], the threads that serve reads
//!   waiting for the store, so FUSE workers stay free for metadata.
//! - [`prefetcher`]: [`Prefetcher`], the startup set fetched at mount, and
//!   `--fetch-all`.
//! - [`program_loads`]: without a startup set, the program a mount is about
//!   to run and the libraries it needs, loaded at mount.
//! - [`trace_recorder`]: [`TraceRecorder`], `--record-trace`.
//! - [`socket_server`], [`stats_server`], [`metrics_server`]: the unix
//!   sockets `naiad stats` asks for counters and HTTP clients scrape.
//! - [`runtime_paths`]: where a mount's socket, pid file and log live.
//! - [`mountinfo`]: reading `/proc/self/mountinfo`.
//! - [`launcher`]: [`launcher::launch`], starting a mount's supervisor in
//!   the background and waiting until it serves, and unmounting it; the one
//!   way `naiad mount`, `naiad run` and the snapshotter start daemons.
//! - [`supervisor`]: [`supervise`], the process that owns a mount's
//!   `/dev/fuse` connection and runs, restarts and upgrades its daemon;
//!   [`fuse_device`], that connection (mount, INIT, resend); [`handoff`],
//!   what supervisor and daemon tell each other ([`DaemonConfig`]).
//! - [`daemon`]: [`run_daemon`], the daemon process, which serves the mount
//!   its supervisor hands it until it is unmounted.
//! - [`size`]: parsing and printing byte sizes ("2G").

pub mod attr;
pub mod backing_files;
pub mod daemon;
pub mod error;
pub mod filesystem;
pub mod fuse_device;
pub mod handoff;
pub mod launcher;
pub mod metrics_server;
pub mod mountinfo;
pub mod page_push;
pub mod passthrough;
pub mod prefetcher;
pub mod program_loads;
pub mod read_ahead;
pub mod read_pool;
pub mod runtime_paths;
pub mod size;
pub mod socket_server;
pub mod stats_server;
pub mod supervisor;
pub mod trace_recorder;

// The read path's caches, single-flight and counters (naiad-reader),
// under their module names.
pub use naiad_reader::{chunk_cache, counters, disk_cache, histogram, inflight, memory_cache, shared_mapping};

pub use chunk_cache::ChunkCache;
pub use counters::{CounterBlock, CounterSnapshot, Counters, Origin, PrefetchSnapshot};
pub use daemon::{run_daemon, CacheConfig, MountConfig, ServeConfig};
pub use disk_cache::DiskCache;
pub use error::{ChunkError, FuseError};
pub use filesystem::NaiadFs;
pub use handoff::DaemonConfig;
pub use histogram::{Histogram, HistogramSnapshot};
pub use memory_cache::MemoryCache;
pub use metrics_server::MetricsServer;
pub use naiad_reader::{ChunkFetcher, ChunkReader, FetchedChunk, MergeLimits};
pub use prefetcher::{PrefetchConfig, Prefetcher};
pub use program_loads::ProgramLoad;
pub use runtime_paths::RuntimePaths;
pub use stats_server::{query_stats, StatsReport, StatsServer};
pub use supervisor::{supervise, SupervisorOptions};
pub use trace_recorder::TraceRecorder;

/// The `fsname` and `subtype` of every naiad mount; `/proc/self/mountinfo`
/// shows such a mount as type [`FSTYPE`].
pub const FSNAME: &str = "naiad";
/// The filesystem type of a naiad mount as the kernel reports it.
pub const FSTYPE: &str = "fuse.naiad";
