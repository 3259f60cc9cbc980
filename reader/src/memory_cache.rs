//! [`MemoryCache`]: decompressed chunks kept in memory, least recently used
//! first out, bounded by their total size in bytes.

use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;
use naiad_format::ChunkDigest;

struct Inner {
    lru: LruCache<ChunkDigest, Arc<Vec<u8>>>,
    bytes: u64,
}

/// An LRU of decompressed chunks keyed by digest, capped at `capacity` bytes.
pub struct MemoryCache {
    inner: Mutex<Inner>,
    capacity: u64,
}

impl MemoryCache {
    /// A cache holding at most `capacity` bytes of chunk data (0 disables it).
    pub fn new(capacity: u64) -> Self {
        MemoryCache { inner: Mutex::new(Inner { lru: LruCache::unbounded(), bytes: 0 }), capacity }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent LRU (every
        // operation below completes or does nothing), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, digest: &ChunkDigest) -> Option<Arc<Vec<u8>>> {
        self.lock().lru.get(digest).cloned()
    }

    /// Whether the chunk is held, without making it more recent.
    pub fn contains(&self, digest: &ChunkDigest) -> bool {
        self.lock().lru.contains(digest)
    }

    /// Adds a chunk, evicting the least recently used ones to stay under the
    /// cap. A chunk larger than the whole cache is not kept.
    pub fn insert(&self, digest: ChunkDigest, data: Arc<Vec<u8>>) {
        let len = data.len() as u64;
        if len > self.capacity {
            return;
        }
        let mut g = self.lock();
        if let Some(old) = g.lru.put(digest, data) {
            g.bytes -= old.len() as u64;
        }
        g.bytes += len;
        while g.bytes > self.capacity {
            match g.lru.pop_lru() {
                Some((_, old)) => g.bytes -= old.len() as u64,
                None => break,
            }
        }
    }

    /// (bytes held, chunks held).
    pub fn usage(&self) -> (u64, u64) {
        let g = self.lock();
        (g.bytes, g.lru.len() as u64)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> ChunkDigest {
        [n; 32]
    }

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let c = MemoryCache::new(100);
        c.insert(d(1), Arc::new(vec![0; 40]));
        c.insert(d(2), Arc::new(vec![0; 40]));
        assert!(c.get(&d(1)).is_some()); // 1 is now most recent
        c.insert(d(3), Arc::new(vec![0; 40]));
        assert!(c.get(&d(2)).is_none());
        assert!(c.get(&d(1)).is_some());
        assert!(c.get(&d(3)).is_some());
        assert_eq!(c.usage(), (80, 2));
        c.insert(d(4), Arc::new(vec![0; 101]));
        assert!(c.get(&d(4)).is_none());
    }
}
