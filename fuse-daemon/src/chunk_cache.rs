//! [`ChunkCache`]: how the filesystem gets the decompressed bytes of one
//! chunk. In order: the in-memory LRU, the on-disk cache (re-verified), and
//! finally the [`ChunkFetcher`], whose verified result is kept in both
//! caches. Concurrent requests for a chunk that is being loaded wait for
//! that load instead of starting another. Failures are logged and counted
//! but not remembered: the next request tries the store again.

use std::sync::Arc;

use naiad_format::bootstrap::hex;
use naiad_format::{ChunkDigest, ChunkRecord};

use crate::counters::{add, inc, Counters};
use crate::disk_cache::DiskCache;
use crate::error::{ChunkError, ChunkErrorKind};
use crate::fetcher::ChunkFetcher;
use crate::inflight::InFlight;
use crate::memory_cache::MemoryCache;

type Loaded = Result<Arc<Vec<u8>>, ChunkError>;

/// The tiered, single-flight chunk read path of one mount.
pub struct ChunkCache {
    fetcher: Arc<dyn ChunkFetcher>,
    memory: MemoryCache,
    disk: Option<DiskCache>,
    inflight: InFlight<ChunkDigest, Loaded>,
    counters: Arc<Counters>,
}

impl ChunkCache {
    pub fn new(fetcher: Arc<dyn ChunkFetcher>, memory: MemoryCache, disk: Option<DiskCache>, counters: Arc<Counters>) -> Self {
        ChunkCache { fetcher, memory, disk, inflight: InFlight::new(), counters }
    }

    /// The verified, decompressed bytes of `chunk`.
    pub fn get(&self, chunk: &ChunkRecord) -> Loaded {
        if let Some(data) = self.memory.get(&chunk.digest) {
            inc(&self.counters.memory_hits);
            return Ok(data);
        }
        let abandoned = Err(ChunkError {
            kind: ChunkErrorKind::Unavailable,
            digest: hex(&chunk.digest),
            blob: None,
            offset: chunk.compressed_offset,
            message: "the load of this chunk was abandoned".into(),
        });
        let (result, waited) = self.inflight.run(chunk.digest, abandoned, || self.load(chunk));
        if waited {
            inc(&self.counters.coalesced);
        }
        result
    }

    fn load(&self, chunk: &ChunkRecord) -> Loaded {
        // Another load may have finished between our memory miss and now.
        if let Some(data) = self.memory.get(&chunk.digest) {
            inc(&self.counters.memory_hits);
            return Ok(data);
        }
        if let Some(disk) = &self.disk {
            if let Some(data) = disk.get(chunk) {
                inc(&self.counters.disk_hits);
                let data = Arc::new(data);
                self.memory.insert(chunk.digest, data.clone());
                return Ok(data);
            }
        }
        inc(&self.counters.misses);
        match self.fetcher.fetch(chunk) {
            Ok(data) => {
                inc(&self.counters.store_chunks);
                add(&self.counters.store_bytes, chunk.compressed_size as u64);
                let data = Arc::new(data);
                self.memory.insert(chunk.digest, data.clone());
                if let Some(disk) = &self.disk {
                    disk.put(chunk.digest, data.clone());
                }
                Ok(data)
            }
            Err(e) => {
                if e.kind == ChunkErrorKind::Corrupt {
                    inc(&self.counters.store_chunks);
                    add(&self.counters.store_bytes, chunk.compressed_size as u64);
                }
                inc(&self.counters.errors);
                tracing::error!(
                    blob = e.blob.as_deref().unwrap_or("?"),
                    offset = e.offset,
                    "cannot read chunk {} from {}: {}",
                    e.digest,
                    self.fetcher.describe(),
                    e.message
                );
                Err(e)
            }
        }
    }

    /// Waits until chunks queued for the disk cache are written.
    pub fn flush(&self) {
        if let Some(d) = &self.disk {
            d.flush();
        }
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    pub fn memory(&self) -> &MemoryCache {
        &self.memory
    }

    pub fn disk(&self) -> Option<&DiskCache> {
        self.disk.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    struct FakeFetcher {
        data: Vec<u8>,
        fail: AtomicBool,
        calls: AtomicUsize,
    }

    impl ChunkFetcher for FakeFetcher {
        fn fetch(&self, chunk: &ChunkRecord) -> Result<Vec<u8>, ChunkError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(50));
            if self.fail.load(Ordering::SeqCst) {
                return Err(ChunkError { kind: ChunkErrorKind::Corrupt, digest: hex(&chunk.digest), blob: Some("sha256:x".into()), offset: 0, message: "bad".into() });
            }
            Ok(self.data.clone())
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    #[test]
    fn tiers_single_flight_and_retry() {
        let data = vec![7u8; 4096];
        let chunk = ChunkRecord { digest: *blake3::hash(&data).as_bytes(), uncompressed_size: 4096, compressed_size: 100, ..Default::default() };
        let fetcher = Arc::new(FakeFetcher { data: data.clone(), fail: AtomicBool::new(true), calls: AtomicUsize::new(0) });
        let counters = Arc::new(Counters::default());
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskCache::open(dir.path(), 1 << 20, counters.clone()).unwrap();
        let cache = Arc::new(ChunkCache::new(fetcher.clone(), MemoryCache::new(1 << 20), Some(disk), counters.clone()));

        // A failure is reported and not remembered.
        assert!(cache.get(&chunk).is_err());
        assert_eq!(counters.snapshot().errors, 1);
        fetcher.fail.store(false, Ordering::SeqCst);

        // Concurrent readers share one fetch.
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (cache, chunk) = (cache.clone(), chunk);
                std::thread::spawn(move || cache.get(&chunk).map(|d| d.len()))
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap().unwrap(), 4096);
        }
        assert_eq!(fetcher.calls.load(Ordering::SeqCst), 2);
        assert_eq!(cache.get(&chunk).unwrap().as_slice(), &data[..]);
        cache.flush();
        let s = counters.snapshot();
        assert_eq!(s.store_chunks, 2);
        assert_eq!(s.misses, 2);
        assert!(s.memory_hits >= 1);
        assert_eq!(s.disk_writes, 1);

        // A fresh cache on the same directory serves it from disk.
        let counters2 = Arc::new(Counters::default());
        let disk2 = DiskCache::open(dir.path(), 1 << 20, counters2.clone()).unwrap();
        let cache2 = ChunkCache::new(fetcher.clone(), MemoryCache::new(1 << 20), Some(disk2), counters2.clone());
        assert_eq!(cache2.get(&chunk).unwrap().as_slice(), &data[..]);
        assert_eq!(counters2.snapshot().disk_hits, 1);
        assert_eq!(counters2.snapshot().store_chunks, 0);
        assert_eq!(fetcher.calls.load(Ordering::SeqCst), 2);
    }
}
