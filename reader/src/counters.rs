//! [`Counters`]: what one mount has done, as lock-free atomics the read path
//! bumps, and the copies that render them: [`CounterSnapshot`] (monotonic
//! counters), [`PrefetchSnapshot`] (progress of the startup prefetch and of
//! `--fetch-all`, gauges) and the read-latency histogram.
//!
//! Store traffic is counted per origin: `demand` (a FUSE read needed the
//! chunk), `prefetch` (the image's prefetch table) and `background`
//! (`--fetch-all`). `store_*` are the totals over all three.
//!
//! A supervised mount keeps its counters in a file of its run directory
//! that every daemon generation maps ([`Counters::open_shared`]): a daemon
//! killed with SIGKILL loses no count, and its successor counts on, so the
//! counters stay monotonic across restarts and upgrades.

use std::ops::Deref;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::StorageError;
use crate::shared_mapping::SharedMapping;

use crate::histogram::Histogram;
use crate::size::format_size;

/// Who asked for a chunk to be read from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A FUSE read is waiting for it.
    Demand,
    /// The image's prefetch table (startup set).
    Prefetch,
    /// `--fetch-all`: the rest of the image, at low priority.
    Background,
    /// Sequential read-ahead (the FUSE daemon's `read_ahead`).
    ReadAhead,
}

/// Requests, chunks and stored bytes read from the store for one origin.
#[derive(Debug, Default)]
#[repr(C)]
pub struct OriginCounters {
    pub requests: AtomicU64,
    pub chunks: AtomicU64,
    pub bytes: AtomicU64,
    /// Uncompressed bytes of those chunks.
    pub raw_bytes: AtomicU64,
}

/// The counters of one mount: atomics only, `repr(C)`, so that they can
/// live in a file every daemon generation of the mount maps (see
/// [`Counters::open_shared`]). Every field only grows, except the prefetch
/// progress gauges.
#[derive(Debug, Default)]
#[repr(C)]
pub struct CounterBlock {
    /// Chunks read from the store (the fetcher), successful or not verified.
    pub store_chunks: AtomicU64,
    /// Stored (compressed) bytes of the chunks read from the store.
    pub store_bytes: AtomicU64,
    /// Requests made to the store (one per merged range read).
    pub store_requests: AtomicU64,
    /// Bytes the store requests spanned, gaps between merged chunks included.
    pub store_span_bytes: AtomicU64,
    pub demand: OriginCounters,
    pub prefetch: OriginCounters,
    pub background: OriginCounters,
    /// Chunks read from the store again after this mount had already read
    /// them successfully (only legitimate once both caches evicted them).
    pub refetches: AtomicU64,
    /// Chunk lookups answered from the in-memory cache.
    pub memory_hits: AtomicU64,
    /// Chunk lookups answered from the on-disk cache.
    pub disk_hits: AtomicU64,
    /// Chunk lookups that had to go to the store.
    pub misses: AtomicU64,
    /// Lookups that waited for a load another reader (or the prefetcher)
    /// had already started.
    pub coalesced: AtomicU64,
    /// Chunk loads that failed (store unavailable or chunk corrupt).
    pub errors: AtomicU64,
    /// Loads a reader retried itself after the load it waited for failed.
    pub retries: AtomicU64,
    /// Chunks of the on-disk cache that failed to read, decode or verify
    /// and were dropped (then fetched again).
    pub disk_corrupt: AtomicU64,
    /// Chunks written to the on-disk cache.
    pub disk_writes: AtomicU64,
    /// Chunks evicted from the on-disk cache to stay under its size cap
    /// (whole blobs go at once; each of their chunks counts).
    pub disk_evictions: AtomicU64,
    /// FUSE read requests served.
    pub reads: AtomicU64,
    /// Bytes returned to the kernel by read requests (what the workload read).
    pub read_bytes: AtomicU64,
    /// FUSE read requests answered with an error.
    pub read_errors: AtomicU64,
    /// Records written to the access trace (`--record-trace`).
    pub trace_records: AtomicU64,
    /// Daemons started on this mount after the first: restarts after a
    /// daemon died, and live upgrades.
    pub daemon_restarts: AtomicU64,
    /// Of those, live upgrades (`naiad daemon upgrade`).
    pub daemon_upgrades: AtomicU64,
    /// Opens answered with kernel passthrough to a backing file.
    pub passthrough_opens: AtomicU64,
    /// Backing files written (whole files assembled from verified chunks).
    pub backing_writes: AtomicU64,
    /// FUSE reads served from a backing file.
    pub backing_reads: AtomicU64,
    /// Backing files that failed verification and were removed.
    pub backing_corrupt: AtomicU64,
    /// Backing files evicted to stay under the disk cache's cap.
    pub backing_evictions: AtomicU64,
    /// Time the FUSE read handler took, per request.
    pub read_latency: Histogram,
    /// Time from a daemon's death until its successor served the mount.
    pub daemon_recovery: Histogram,
    pub progress: PrefetchProgress,
    /// Store traffic of sequential read-ahead (last: the layout grew).
    pub read_ahead: OriginCounters,
    /// Bytes of the startup set handed to the kernel's page cache
    /// (FUSE_NOTIFY_STORE) before the workload read them.
    pub pushed_bytes: AtomicU64,
}

/// Gauges of the prefetcher.
#[derive(Debug, Default)]
#[repr(C)]
pub struct PrefetchProgress {
    /// 0: no prefetch (disabled or empty table), 1: running, 2: done,
    /// 3: stopped before it finished.
    pub state: AtomicU64,
    pub chunks_total: AtomicU64,
    pub bytes_total: AtomicU64,
    /// Chunks of the prefetch set that are available (fetched by the
    /// prefetcher, already cached, or being fetched by a reader).
    pub chunks_done: AtomicU64,
    pub bytes_done: AtomicU64,
    /// Chunks of the prefetch set that could not be fetched.
    pub chunks_failed: AtomicU64,
    /// Milliseconds from the start of the mount until the set was done.
    pub millis: AtomicU64,
    /// `--fetch-all`: chunks outside the prefetch set, and how many of
    /// them are available.
    pub background_chunks_total: AtomicU64,
    pub background_chunks_done: AtomicU64,
    pub background_bytes_total: AtomicU64,
    pub background_bytes_done: AtomicU64,
    /// 0: off, 1: running, 2: done, 3: stopped.
    pub background_state: AtomicU64,
}

/// Values of [`PrefetchProgress::state`].
pub mod state {
    pub const NONE: u64 = 0;
    pub const RUNNING: u64 = 1;
    pub const DONE: u64 = 2;
    pub const STOPPED: u64 = 3;

    pub fn name(s: u64) -> &'static str {
        match s {
            RUNNING => "running",
            DONE => "done",
            STOPPED => "stopped",
            _ => "none",
        }
    }
}

/// A copy of [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CounterSnapshot {
    pub store_chunks: u64,
    pub store_bytes: u64,
    pub store_requests: u64,
    pub store_span_bytes: u64,
    pub demand_requests: u64,
    pub demand_chunks: u64,
    pub demand_bytes: u64,
    /// Uncompressed bytes of the chunks read for reads.
    pub demand_raw_bytes: u64,
    pub prefetch_requests: u64,
    pub prefetch_chunks: u64,
    pub prefetch_bytes: u64,
    pub background_requests: u64,
    pub background_chunks: u64,
    pub background_bytes: u64,
    #[serde(default)]
    pub read_ahead_requests: u64,
    #[serde(default)]
    pub read_ahead_chunks: u64,
    #[serde(default)]
    pub read_ahead_bytes: u64,
    #[serde(default)]
    pub pushed_bytes: u64,
    pub refetches: u64,
    pub memory_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub errors: u64,
    /// Retries: the daemon's own plus those the store reports (a registry
    /// retrying a request).
    pub retries: u64,
    pub disk_corrupt: u64,
    pub disk_writes: u64,
    pub disk_evictions: u64,
    pub reads: u64,
    pub read_bytes: u64,
    pub read_errors: u64,
    pub trace_records: u64,
    pub daemon_restarts: u64,
    pub daemon_upgrades: u64,
    pub passthrough_opens: u64,
    pub backing_writes: u64,
    pub backing_reads: u64,
    pub backing_corrupt: u64,
    pub backing_evictions: u64,
}

/// Bytes read from the store per byte the workload read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Amplification {
    /// Stored bytes fetched for reads.
    pub demand: Option<f64>,
    /// Uncompressed bytes of the chunks fetched for reads.
    pub demand_raw: Option<f64>,
    /// Stored bytes of every fetch (prefetch and background too).
    pub all: Option<f64>,
}

/// A copy of [`PrefetchProgress`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PrefetchSnapshot {
    /// "none", "running", "done" or "stopped".
    pub state: String,
    pub chunks_total: u64,
    pub chunks_done: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub chunks_failed: u64,
    /// Milliseconds from the mount until the prefetch set was done.
    pub millis: u64,
    pub background_state: String,
    pub background_chunks_total: u64,
    pub background_chunks_done: u64,
    pub background_bytes_total: u64,
    pub background_bytes_done: u64,
}

/// Adds to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    add(c, 1)
}

/// Sets a gauge.
pub fn set(c: &AtomicU64, v: u64) {
    c.store(v, Ordering::Relaxed);
}

/// Reads a counter or gauge.
pub fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The [`CounterBlock`] of a mount: on this process's heap
/// ([`Counters::default`]) or in a shared file mapping
/// ([`Counters::open_shared`]). Dereferences to the block.
pub struct Counters {
    block: NonNull<CounterBlock>,
    /// The mapping the block lives in, when it lives in a file.
    mapping: Option<SharedMapping>,
}

// SAFETY: the block holds only atomics and stays valid (heap allocation or
// mapping) for as long as the `Counters` lives.
unsafe impl Send for Counters {}
// SAFETY: as above; every access is an atomic operation.
unsafe impl Sync for Counters {}

impl Default for Counters {
    fn default() -> Self {
        Counters { block: NonNull::from(Box::leak(Box::<CounterBlock>::default())), mapping: None }
    }
}

impl Deref for Counters {
    type Target = CounterBlock;
    fn deref(&self) -> &CounterBlock {
        // SAFETY: valid for our lifetime (see the Send impl).
        unsafe { self.block.as_ref() }
    }
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters").field("shared", &self.mapping.is_some()).field("block", &**self).finish()
    }
}

impl Drop for Counters {
    fn drop(&mut self) {
        if self.mapping.is_none() {
            // SAFETY: the box leaked in default(), freed once.
            unsafe { drop(Box::from_raw(self.block.as_ptr())) }
        }
    }
}

/// "naiadcnt": the first word of a shared counters file.
const SHARED_MAGIC: u64 = u64::from_le_bytes(*b"naiadcnt");

impl Counters {
    /// Maps the shared counters file at `path`, creating it (zeroed) when it
    /// is missing or has another size. A file written by a binary with
    /// another counter layout is reset to zero, with a warning.
    pub fn open_shared(path: &Path) -> Result<Counters, StorageError> {
        let block_len = std::mem::size_of::<CounterBlock>();
        let mapping = SharedMapping::open(path, block_len, SHARED_MAGIC, block_len as u64)?;
        // The body is 8-byte aligned and CounterBlock (atomics only) is
        // valid for any bit pattern, zeroes included.
        let block = mapping.body().cast::<CounterBlock>();
        Ok(Counters { block, mapping: Some(mapping) })
    }

    /// Zeroes the prefetch progress gauges, which a new daemon generation
    /// recomputes (chunks already cached count as done at once).
    pub fn reset_progress(&self) {
        let p = &self.progress;
        for g in [
            &p.state,
            &p.chunks_total,
            &p.bytes_total,
            &p.chunks_done,
            &p.bytes_done,
            &p.chunks_failed,
            &p.millis,
            &p.background_chunks_total,
            &p.background_chunks_done,
            &p.background_bytes_total,
            &p.background_bytes_done,
            &p.background_state,
        ] {
            set(g, 0);
        }
    }
}

impl Counters {
    pub fn origin(&self, o: Origin) -> &OriginCounters {
        match o {
            Origin::Demand => &self.demand,
            Origin::Prefetch => &self.prefetch,
            Origin::Background => &self.background,
            Origin::ReadAhead => &self.read_ahead,
        }
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        let g = get;
        CounterSnapshot {
            store_chunks: g(&self.store_chunks),
            store_bytes: g(&self.store_bytes),
            store_requests: g(&self.store_requests),
            store_span_bytes: g(&self.store_span_bytes),
            demand_requests: g(&self.demand.requests),
            demand_chunks: g(&self.demand.chunks),
            demand_bytes: g(&self.demand.bytes),
            demand_raw_bytes: g(&self.demand.raw_bytes),
            prefetch_requests: g(&self.prefetch.requests),
            prefetch_chunks: g(&self.prefetch.chunks),
            prefetch_bytes: g(&self.prefetch.bytes),
            background_requests: g(&self.background.requests),
            background_chunks: g(&self.background.chunks),
            background_bytes: g(&self.background.bytes),
            read_ahead_requests: g(&self.read_ahead.requests),
            read_ahead_chunks: g(&self.read_ahead.chunks),
            read_ahead_bytes: g(&self.read_ahead.bytes),
            pushed_bytes: g(&self.pushed_bytes),
            refetches: g(&self.refetches),
            memory_hits: g(&self.memory_hits),
            disk_hits: g(&self.disk_hits),
            misses: g(&self.misses),
            coalesced: g(&self.coalesced),
            errors: g(&self.errors),
            retries: g(&self.retries),
            disk_corrupt: g(&self.disk_corrupt),
            disk_writes: g(&self.disk_writes),
            disk_evictions: g(&self.disk_evictions),
            reads: g(&self.reads),
            read_bytes: g(&self.read_bytes),
            read_errors: g(&self.read_errors),
            trace_records: g(&self.trace_records),
            daemon_restarts: g(&self.daemon_restarts),
            daemon_upgrades: g(&self.daemon_upgrades),
            passthrough_opens: g(&self.passthrough_opens),
            backing_writes: g(&self.backing_writes),
            backing_reads: g(&self.backing_reads),
            backing_corrupt: g(&self.backing_corrupt),
            backing_evictions: g(&self.backing_evictions),
        }
    }

    pub fn prefetch_snapshot(&self) -> PrefetchSnapshot {
        let p = &self.progress;
        PrefetchSnapshot {
            state: state::name(get(&p.state)).to_string(),
            chunks_total: get(&p.chunks_total),
            chunks_done: get(&p.chunks_done),
            bytes_total: get(&p.bytes_total),
            bytes_done: get(&p.bytes_done),
            chunks_failed: get(&p.chunks_failed),
            millis: get(&p.millis),
            background_state: state::name(get(&p.background_state)).to_string(),
            background_chunks_total: get(&p.background_chunks_total),
            background_chunks_done: get(&p.background_chunks_done),
            background_bytes_total: get(&p.background_bytes_total),
            background_bytes_done: get(&p.background_bytes_done),
        }
    }
}

/// Escapes a Prometheus label value.
pub fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl CounterSnapshot {
    /// (name, help, value) of every counter, in display order.
    pub fn fields(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![
            ("store_requests", "requests made to the store (merged range reads)", self.store_requests),
            ("store_chunks", "chunks read from the store", self.store_chunks),
            ("store_bytes", "stored bytes of the chunks read from the store", self.store_bytes),
            ("store_span_bytes", "bytes spanned by store requests, gaps included", self.store_span_bytes),
            ("demand_requests", "store requests for chunks a read was waiting for", self.demand_requests),
            ("demand_chunks", "chunks read from the store for reads", self.demand_chunks),
            ("demand_bytes", "stored bytes read from the store for reads", self.demand_bytes),
            ("demand_raw_bytes", "uncompressed bytes of the chunks read for reads", self.demand_raw_bytes),
            ("prefetch_requests", "store requests of the startup prefetch", self.prefetch_requests),
            ("prefetch_chunks", "chunks read from the store by the prefetch", self.prefetch_chunks),
            ("prefetch_bytes", "stored bytes read from the store by the prefetch", self.prefetch_bytes),
            ("background_requests", "store requests of --fetch-all", self.background_requests),
            ("background_chunks", "chunks read from the store by --fetch-all", self.background_chunks),
            ("background_bytes", "stored bytes read from the store by --fetch-all", self.background_bytes),
            ("read_ahead_requests", "store requests of sequential read-ahead", self.read_ahead_requests),
            ("read_ahead_chunks", "chunks read from the store by read-ahead", self.read_ahead_chunks),
            ("read_ahead_bytes", "stored bytes read from the store by read-ahead", self.read_ahead_bytes),
            ("pushed_bytes", "startup set bytes put into the kernel page cache before they were read", self.pushed_bytes),
            ("refetches", "chunks read from the store more than once", self.refetches),
            ("memory_hits", "chunk lookups served from memory", self.memory_hits),
            ("disk_hits", "chunk lookups served from the disk cache", self.disk_hits),
            ("misses", "chunk lookups that went to the store", self.misses),
            ("coalesced", "lookups that joined a load already in flight", self.coalesced),
            ("errors", "chunk loads that failed", self.errors),
            ("retries", "loads retried (by the daemon or the store client)", self.retries),
            ("disk_corrupt", "disk cache chunks that failed verification", self.disk_corrupt),
            ("disk_writes", "chunks written to the disk cache", self.disk_writes),
            ("disk_evictions", "chunks evicted from the disk cache", self.disk_evictions),
            ("reads", "FUSE read requests", self.reads),
            ("read_bytes", "bytes returned by FUSE reads", self.read_bytes),
            ("read_errors", "FUSE reads answered with an error", self.read_errors),
            ("trace_records", "records written to the access trace", self.trace_records),
            ("daemon_restarts", "daemons started on this mount after the first (restarts and upgrades)", self.daemon_restarts),
            ("daemon_upgrades", "live upgrades of this mount's daemon", self.daemon_upgrades),
            ("passthrough_opens", "opens served by kernel passthrough to a backing file", self.passthrough_opens),
            ("backing_writes", "backing files assembled from verified chunks", self.backing_writes),
            ("backing_reads", "FUSE reads served from a backing file", self.backing_reads),
            ("backing_corrupt", "backing files that failed verification and were removed", self.backing_corrupt),
            ("backing_evictions", "backing files evicted from the disk cache", self.backing_evictions),
        ]
    }

    /// Read amplification: bytes read from the store per byte the workload
    /// read; `None` before anything was read.
    pub fn amplification(&self) -> Amplification {
        let per_read = |b: u64| (self.read_bytes > 0).then(|| b as f64 / self.read_bytes as f64);
        Amplification { demand: per_read(self.demand_bytes), demand_raw: per_read(self.demand_raw_bytes), all: per_read(self.store_bytes) }
    }

    /// Readable multi-line text, one counter per line.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for (name, help, v) in self.fields() {
            let pretty = if name.ends_with("bytes") { format!(" ({})", format_size(v)) } else { String::new() };
            out.push_str(&format!("{name:<20}{v:>14}{pretty:<14}  {help}\n"));
        }
        let a = self.amplification();
        let f = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<20}{:>14}{:<14}  stored bytes fetched for reads per byte read (uncompressed: {}; all fetches: {})\n",
            "amplification",
            f(a.demand),
            "",
            f(a.demand_raw),
            f(a.all)
        ));
        out
    }

    /// Prometheus text exposition format, every counter as
    /// `naiad_<name>_total` labelled with the mountpoint.
    pub fn render_prometheus(&self, mountpoint: &str) -> String {
        let label = label_value(mountpoint);
        let mut out = String::new();
        for (name, help, v) in self.fields() {
            out.push_str(&format!("# HELP naiad_{name}_total {help}\n# TYPE naiad_{name}_total counter\nnaiad_{name}_total{{mountpoint=\"{label}\"}} {v}\n"));
        }
        out
    }
}

impl PrefetchSnapshot {
    /// (name, help, value) of the numeric gauges.
    pub fn gauges(&self) -> Vec<(&'static str, &'static str, u64)> {
        let code = |s: &str| match s {
            "running" => state::RUNNING,
            "done" => state::DONE,
            "stopped" => state::STOPPED,
            _ => state::NONE,
        };
        vec![
            ("prefetch_state", "prefetch state: 0 none, 1 running, 2 done, 3 stopped", code(&self.state)),
            ("prefetch_set_chunks", "chunks in the prefetch set", self.chunks_total),
            ("prefetch_done_chunks", "chunks of the prefetch set available", self.chunks_done),
            ("prefetch_set_bytes", "stored bytes of the prefetch set", self.bytes_total),
            ("prefetch_done_bytes", "stored bytes of the prefetch set available", self.bytes_done),
            ("prefetch_failed_chunks", "chunks of the prefetch set that could not be fetched", self.chunks_failed),
            ("prefetch_duration_milliseconds", "time from mount until the prefetch set was done", self.millis),
            ("background_state", "--fetch-all state: 0 off, 1 running, 2 done, 3 stopped", code(&self.background_state)),
            ("background_set_chunks", "chunks --fetch-all fetches", self.background_chunks_total),
            ("background_done_chunks", "chunks --fetch-all has made available", self.background_chunks_done),
            ("background_set_bytes", "stored bytes --fetch-all fetches", self.background_bytes_total),
            ("background_done_bytes", "stored bytes --fetch-all has made available", self.background_bytes_done),
        ]
    }

    pub fn render_text(&self) -> String {
        let pct = |done: u64, total: u64| if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
        let mut out = format!(
            "prefetch        {}: {}/{} chunks, {} of {} ({:.0}%)",
            self.state,
            self.chunks_done,
            self.chunks_total,
            format_size(self.bytes_done),
            format_size(self.bytes_total),
            pct(self.bytes_done, self.bytes_total)
        );
        if self.chunks_failed > 0 {
            out.push_str(&format!(", {} failed", self.chunks_failed));
        }
        if self.state == "done" {
            out.push_str(&format!(", done {:.3}s after mount", self.millis as f64 / 1000.0));
        }
        out.push('\n');
        if self.background_state != "none" {
            out.push_str(&format!(
                "fetch-all       {}: {}/{} chunks, {} of {}\n",
                self.background_state,
                self.background_chunks_done,
                self.background_chunks_total,
                format_size(self.background_bytes_done),
                format_size(self.background_bytes_total)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_and_render() {
        let c = Counters::default();
        inc(&c.misses);
        add(&c.store_bytes, 2048);
        add(&c.demand.bytes, 2048);
        add(&c.read_bytes, 1024);
        let s = c.snapshot();
        assert_eq!(s.misses, 1);
        assert_eq!(s.store_bytes, 2048);
        assert_eq!(s.amplification(), Amplification { demand: Some(2.0), demand_raw: Some(0.0), all: Some(2.0) });
        assert!(s.render_text().contains("store_bytes"));
        assert!(s.render_text().contains("amplification"));
        assert!(s.render_prometheus("/mnt").contains("naiad_misses_total{mountpoint=\"/mnt\"} 1"));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<CounterSnapshot>(&json).unwrap(), s);
        set(&c.progress.state, state::DONE);
        let p = c.prefetch_snapshot();
        assert_eq!(p.state, "done");
        assert!(p.gauges().iter().any(|g| g.0 == "prefetch_state" && g.2 == state::DONE));
    }

    #[test]
    fn shared_counters_outlive_their_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.counters");
        let first = Counters::open_shared(&path).unwrap();
        let second = Counters::open_shared(&path).unwrap();
        add(&first.reads, 5);
        first.read_latency.observe(std::time::Duration::from_millis(1));
        set(&first.progress.chunks_done, 9);
        assert_eq!(get(&second.reads), 5, "two mappings share one block");
        drop(first);
        drop(second);
        let third = Counters::open_shared(&path).unwrap();
        assert_eq!(third.snapshot().reads, 5, "counts survive the processes that made them");
        assert_eq!(third.read_latency.snapshot().count, 1);
        third.reset_progress();
        assert_eq!(third.prefetch_snapshot().chunks_done, 0);
        assert_eq!(third.snapshot().reads, 5);
        drop(third);
        // A file of another layout starts from zero.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[8] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Counters::open_shared(&path).unwrap().snapshot().reads, 0);
        // So does a file of another size.
        std::fs::write(&path, b"short").unwrap();
        assert_eq!(Counters::open_shared(&path).unwrap().snapshot().reads, 0);
    }
}
