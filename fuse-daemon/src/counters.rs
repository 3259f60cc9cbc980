//! [`Counters`]: what one mount has done, as lock-free atomics the read path
//! bumps, and [`CounterSnapshot`], a consistent-enough copy that renders as
//! JSON (serde), readable text, or Prometheus exposition text.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::size::format_size;

/// Counters of one mount. Every field only grows.
#[derive(Debug, Default)]
pub struct Counters {
    /// Chunks read from the store (the fetcher), successful or not verified.
    pub store_chunks: AtomicU64,
    /// Stored (compressed) bytes read from the store.
    pub store_bytes: AtomicU64,
    /// Chunk lookups answered from the in-memory cache.
    pub memory_hits: AtomicU64,
    /// Chunk lookups answered from the on-disk cache.
    pub disk_hits: AtomicU64,
    /// Chunk lookups that had to go to the store.
    pub misses: AtomicU64,
    /// Lookups that waited for a load another reader had already started.
    pub coalesced: AtomicU64,
    /// Chunk loads that failed (store unavailable or chunk corrupt).
    pub errors: AtomicU64,
    /// Files of the on-disk cache that failed verification and were dropped.
    pub disk_corrupt: AtomicU64,
    /// Chunks written to the on-disk cache.
    pub disk_writes: AtomicU64,
    /// Chunks evicted from the on-disk cache to stay under its size cap.
    pub disk_evictions: AtomicU64,
    /// FUSE read requests served.
    pub reads: AtomicU64,
    /// Bytes returned to the kernel by read requests.
    pub read_bytes: AtomicU64,
    /// FUSE read requests answered with EIO.
    pub read_errors: AtomicU64,
}

/// A copy of [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterSnapshot {
    pub store_chunks: u64,
    pub store_bytes: u64,
    pub memory_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub errors: u64,
    pub disk_corrupt: u64,
    pub disk_writes: u64,
    pub disk_evictions: u64,
    pub reads: u64,
    pub read_bytes: u64,
    pub read_errors: u64,
}

/// Adds to a counter.
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn inc(c: &AtomicU64) {
    add(c, 1)
}

impl Counters {
    pub fn snapshot(&self) -> CounterSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            store_chunks: g(&self.store_chunks),
            store_bytes: g(&self.store_bytes),
            memory_hits: g(&self.memory_hits),
            disk_hits: g(&self.disk_hits),
            misses: g(&self.misses),
            coalesced: g(&self.coalesced),
            errors: g(&self.errors),
            disk_corrupt: g(&self.disk_corrupt),
            disk_writes: g(&self.disk_writes),
            disk_evictions: g(&self.disk_evictions),
            reads: g(&self.reads),
            read_bytes: g(&self.read_bytes),
            read_errors: g(&self.read_errors),
        }
    }
}

impl CounterSnapshot {
    /// (name, help, value) of every counter, in display order.
    pub fn fields(&self) -> [(&'static str, &'static str, u64); 13] {
        [
            ("store_chunks", "chunks read from the store", self.store_chunks),
            ("store_bytes", "stored bytes read from the store", self.store_bytes),
            ("memory_hits", "chunk lookups served from memory", self.memory_hits),
            ("disk_hits", "chunk lookups served from the disk cache", self.disk_hits),
            ("misses", "chunk lookups that went to the store", self.misses),
            ("coalesced", "lookups that joined a load already in flight", self.coalesced),
            ("errors", "chunk loads that failed", self.errors),
            ("disk_corrupt", "disk cache files that failed verification", self.disk_corrupt),
            ("disk_writes", "chunks written to the disk cache", self.disk_writes),
            ("disk_evictions", "chunks evicted from the disk cache", self.disk_evictions),
            ("reads", "FUSE read requests", self.reads),
            ("read_bytes", "bytes returned by FUSE reads", self.read_bytes),
            ("read_errors", "FUSE reads answered with EIO", self.read_errors),
        ]
    }

    /// Readable multi-line text, one counter per line.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for (name, help, v) in self.fields() {
            let pretty = if name.ends_with("bytes") { format!(" ({})", format_size(v)) } else { String::new() };
            out.push_str(&format!("{name:<16}{v:>14}{pretty:<14}  {help}\n"));
        }
        out
    }

    /// Prometheus text exposition format, every counter as
    /// `naiad_<name>_total` labelled with the mountpoint.
    pub fn render_prometheus(&self, mountpoint: &str) -> String {
        let label = mountpoint.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let mut out = String::new();
        for (name, help, v) in self.fields() {
            out.push_str(&format!("# HELP naiad_{name}_total {help}\n# TYPE naiad_{name}_total counter\nnaiad_{name}_total{{mountpoint=\"{label}\"}} {v}\n"));
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
        let s = c.snapshot();
        assert_eq!(s.misses, 1);
        assert_eq!(s.store_bytes, 2048);
        assert!(s.render_text().contains("store_bytes"));
        assert!(s.render_prometheus("/mnt").contains("naiad_misses_total{mountpoint=\"/mnt\"} 1"));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<CounterSnapshot>(&json).unwrap(), s);
    }
}
