//! [`DiskCache`]: decompressed chunks kept on disk across mounts and
//! restarts, keyed by their blake3 digest (so images sharing chunks share
//! cache entries), under a size cap with least-recently-used eviction.
//!
//! Layout: `<dir>/chunks/<first 2 hex>/<64 hex>`, each file the chunk's
//! uncompressed bytes. Files are written under a temporary name and renamed
//! into place, and every read re-verifies size and digest: a torn, truncated
//! or tampered file is deleted and treated as a miss, never served.
//!
//! Writes happen on a background thread so a read that missed does not wait
//! for the disk, unless the writer falls more than a queue's worth behind
//! (then readers wait: a burst of reads must not leave holes in the cache).
//! Chunks waiting to be written are served from the queue, so a chunk put
//! here is never missing in between. [`DiskCache::flush`] (and drop) waits
//! for queued writes.
//! Recency survives restarts through file modification times, which a hit
//! refreshes.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use naiad_format::bootstrap::hex;
use naiad_format::{ChunkDigest, ChunkRecord};

use crate::counters::{inc, Counters};
use crate::error::{FuseError, IoContext};

/// Chunks waiting to be written before readers have to wait for the writer.
const WRITE_QUEUE: usize = 64;
/// Temporary files older than this are leftovers of a crashed writer.
const STALE_TMP_AGE: Duration = Duration::from_secs(600);
const TMP_PREFIX: &str = ".tmp-";

#[derive(Default)]
struct Index {
    /// digest -> (size, recency tick)
    entries: HashMap<ChunkDigest, (u64, u64)>,
    /// recency tick -> digest, oldest first
    order: BTreeMap<u64, ChunkDigest>,
    bytes: u64,
    next_tick: u64,
}

impl Index {
    fn touch(&mut self, digest: ChunkDigest, size: u64) {
        let tick = self.next_tick;
        self.next_tick += 1;
        if let Some((old_size, old_tick)) = self.entries.insert(digest, (size, tick)) {
            self.order.remove(&old_tick);
            self.bytes -= old_size;
        }
        self.order.insert(tick, digest);
        self.bytes += size;
    }

    fn remove(&mut self, digest: &ChunkDigest) {
        if let Some((size, tick)) = self.entries.remove(digest) {
            self.order.remove(&tick);
            self.bytes -= size;
        }
    }

    fn pop_oldest(&mut self) -> Option<ChunkDigest> {
        let (_, digest) = self.order.pop_first()?;
        if let Some((size, _)) = self.entries.remove(&digest) {
            self.bytes -= size;
        }
        Some(digest)
    }
}

struct Shared {
    root: PathBuf,
    capacity: u64,
    index: Mutex<Index>,
    counters: Arc<Counters>,
    tmp_seq: AtomicU64,
    /// Chunks queued for writing, served by `get` until they are on disk.
    pending: Mutex<HashMap<ChunkDigest, Arc<Vec<u8>>>>,
}

enum Job {
    Put(ChunkDigest, Arc<Vec<u8>>),
    Flush(SyncSender<()>),
}

/// The on-disk chunk cache of one daemon (several daemons may share a
/// directory; each keeps its own view of what is there).
pub struct DiskCache {
    shared: Arc<Shared>,
    queue: Mutex<Option<SyncSender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn parse_hex32(s: &str) -> Option<ChunkDigest> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Shared {
    fn path(&self, digest: &ChunkDigest) -> PathBuf {
        let h = hex(digest);
        self.root.join(&h[..2]).join(h)
    }

    fn drop_file(&self, digest: &ChunkDigest, path: &Path) {
        lock(&self.index).remove(digest);
        if let Err(e) = fs::remove_file(path) {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!("disk cache: cannot remove {}: {e}", path.display());
            }
        }
    }

    fn write(&self, digest: ChunkDigest, data: &[u8]) {
        let path = self.path(&digest);
        if lock(&self.index).entries.contains_key(&digest) && path.exists() {
            return;
        }
        if let Err(e) = self.write_file(&path, data) {
            tracing::warn!("disk cache: cannot write {}: {e}", path.display());
            return;
        }
        inc(&self.counters.disk_writes);
        let mut evict = Vec::new();
        {
            let mut idx = lock(&self.index);
            idx.touch(digest, data.len() as u64);
            while idx.bytes > self.capacity {
                match idx.pop_oldest() {
                    Some(d) => evict.push(d),
                    None => break,
                }
            }
        }
        for d in evict {
            let p = self.path(&d);
            match fs::remove_file(&p) {
                Ok(()) => inc(&self.counters.disk_evictions),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("disk cache: cannot evict {}: {e}", p.display()),
            }
        }
    }

    fn write_file(&self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir)?;
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("{TMP_PREFIX}{}-{seq}", std::process::id()));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            drop(f);
            fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Builds the index from what is on disk, oldest first, removes stale
    /// temporary files and evicts down to the cap.
    fn scan(&self) -> Result<(), FuseError> {
        let mut found: Vec<(SystemTime, ChunkDigest, u64)> = Vec::new();
        let now = SystemTime::now();
        for sub in fs::read_dir(&self.root).at(&self.root)? {
            let sub = sub.at(&self.root)?;
            let sub_path = sub.path();
            if !sub.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let entries = match fs::read_dir(&sub_path) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("disk cache: cannot list {}: {e}", sub_path.display());
                    continue;
                }
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                let Ok(meta) = e.metadata() else { continue };
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                if name.starts_with(TMP_PREFIX) {
                    if now.duration_since(mtime).unwrap_or_default() > STALE_TMP_AGE {
                        let _ = fs::remove_file(e.path());
                    }
                    continue;
                }
                if let Some(d) = parse_hex32(&name).filter(|_| meta.is_file()) {
                    found.push((mtime, d, meta.len()));
                }
            }
        }
        found.sort();
        let mut evict = Vec::new();
        {
            let mut idx = lock(&self.index);
            for (_, d, size) in found {
                idx.touch(d, size);
            }
            while idx.bytes > self.capacity {
                match idx.pop_oldest() {
                    Some(d) => evict.push(d),
                    None => break,
                }
            }
        }
        for d in evict {
            if fs::remove_file(self.path(&d)).is_ok() {
                inc(&self.counters.disk_evictions);
            }
        }
        Ok(())
    }
}

fn writer_loop(shared: Arc<Shared>, rx: Receiver<Job>) {
    for job in rx {
        match job {
            Job::Put(d, data) => {
                shared.write(d, &data);
                lock(&shared.pending).remove(&d);
            }
            Job::Flush(ack) => {
                let _ = ack.send(());
            }
        }
    }
}

impl DiskCache {
    /// Opens (creating if needed) the cache under `dir`, capped at
    /// `capacity` bytes, and indexes what a previous run left there.
    pub fn open(dir: &Path, capacity: u64, counters: Arc<Counters>) -> Result<Self, FuseError> {
        let root = dir.join("chunks");
        fs::create_dir_all(&root).at(&root)?;
        let shared = Arc::new(Shared { root, capacity, index: Mutex::new(Index::default()), counters, tmp_seq: AtomicU64::new(0), pending: Mutex::new(HashMap::new()) });
        shared.scan()?;
        let (tx, rx) = mpsc::sync_channel(WRITE_QUEUE);
        let s = shared.clone();
        let writer = std::thread::Builder::new()
            .name("naiad-cache-writer".into())
            .spawn(move || writer_loop(s, rx))
            .at(dir)?;
        Ok(DiskCache { shared, queue: Mutex::new(Some(tx)), writer: Mutex::new(Some(writer)) })
    }

    /// Whether the cache has (or is writing) chunk `digest`, as far as this
    /// daemon knows; [`DiskCache::get`] still verifies it.
    pub fn contains(&self, digest: &ChunkDigest) -> bool {
        lock(&self.shared.pending).contains_key(digest) || lock(&self.shared.index).entries.contains_key(digest)
    }

    /// The verified bytes of `chunk`, if the cache has a good copy. A copy
    /// that fails verification is deleted.
    pub fn get(&self, chunk: &ChunkRecord) -> Option<Arc<Vec<u8>>> {
        let s = &self.shared;
        if let Some(data) = lock(&s.pending).get(&chunk.digest) {
            return Some(data.clone());
        }
        let path = s.path(&chunk.digest);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                if e.kind() != ErrorKind::NotFound {
                    tracing::warn!("disk cache: cannot open {}: {e}", path.display());
                }
                lock(&s.index).remove(&chunk.digest);
                return None;
            }
        };
        let expected = chunk.uncompressed_size as u64;
        let mut data = Vec::with_capacity(expected as usize);
        let read = (&mut file).take(expected + 1).read_to_end(&mut data);
        let good = read.is_ok() && data.len() as u64 == expected && blake3::hash(&data).as_bytes() == &chunk.digest;
        if !good {
            tracing::warn!("disk cache: {} is corrupt or truncated; dropping it", path.display());
            inc(&s.counters.disk_corrupt);
            s.drop_file(&chunk.digest, &path);
            return None;
        }
        // Refresh recency, in memory and (for the next run) on disk.
        let _ = file.set_modified(SystemTime::now());
        lock(&s.index).touch(chunk.digest, expected);
        Some(Arc::new(data))
    }

    /// Queues `data` to be written as chunk `digest`, waiting if the writer
    /// is a full queue behind.
    pub fn put(&self, digest: ChunkDigest, data: Arc<Vec<u8>>) {
        if data.len() as u64 > self.shared.capacity {
            return;
        }
        let q = lock(&self.queue).clone();
        if let Some(q) = q {
            lock(&self.shared.pending).insert(digest, data.clone());
            if q.send(Job::Put(digest, data)).is_err() {
                lock(&self.shared.pending).remove(&digest);
                tracing::debug!("disk cache: writer gone, not caching {}", hex(&digest));
            }
        }
    }

    /// Waits until every queued write is on disk.
    pub fn flush(&self) {
        let q = lock(&self.queue).clone();
        if let Some(q) = q {
            let (tx, rx) = mpsc::sync_channel(1);
            if q.send(Job::Flush(tx)).is_ok() {
                let _ = rx.recv();
            }
        }
    }

    /// (bytes held, chunks held) as this daemon knows them.
    pub fn usage(&self) -> (u64, u64) {
        let idx = lock(&self.shared.index);
        (idx.bytes, idx.entries.len() as u64)
    }

    pub fn capacity(&self) -> u64 {
        self.shared.capacity
    }

    pub fn dir(&self) -> &Path {
        &self.shared.root
    }
}

impl Drop for DiskCache {
    fn drop(&mut self) {
        // Closing the queue ends the writer after it has drained it.
        lock(&self.queue).take();
        if let Some(t) = lock(&self.writer).take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(data: &[u8]) -> ChunkRecord {
        ChunkRecord { digest: *blake3::hash(data).as_bytes(), uncompressed_size: data.len() as u32, ..Default::default() }
    }

    #[test]
    fn persists_verifies_and_evicts() {
        let dir = tempfile::tempdir().unwrap();
        let counters = Arc::new(Counters::default());
        let a = vec![1u8; 1000];
        let b = vec![2u8; 1000];
        let c = vec![3u8; 1000];
        {
            let cache = DiskCache::open(dir.path(), 2500, counters.clone()).unwrap();
            assert!(cache.get(&record(&a)).is_none());
            cache.put(record(&a).digest, Arc::new(a.clone()));
            cache.put(record(&b).digest, Arc::new(b.clone()));
            cache.flush();
            assert_eq!(*cache.get(&record(&a)).unwrap(), a);
            cache.put(record(&c).digest, Arc::new(c.clone()));
            cache.flush();
            // b was the least recently used.
            assert!(cache.get(&record(&b)).is_none());
            assert_eq!(cache.usage(), (2000, 2));
        }
        assert_eq!(counters.snapshot().disk_evictions, 1);
        // A new instance finds what the old one left.
        let cache = DiskCache::open(dir.path(), 2500, counters.clone()).unwrap();
        assert_eq!(cache.usage(), (2000, 2));
        assert_eq!(*cache.get(&record(&c)).unwrap(), c);
        // A damaged file is dropped, not served.
        let path = cache.shared.path(&record(&a).digest);
        let mut bad = a.clone();
        bad[10] ^= 1;
        fs::write(&path, &bad).unwrap();
        assert!(cache.get(&record(&a)).is_none());
        assert!(!path.exists());
        assert_eq!(counters.snapshot().disk_corrupt, 1);
        // A truncated one too.
        let path = cache.shared.path(&record(&c).digest);
        fs::write(&path, &c[..500]).unwrap();
        assert!(cache.get(&record(&c)).is_none());
        assert_eq!(cache.usage(), (0, 0));
    }

    #[test]
    fn parses_hex_names() {
        let d = [0xabu8; 32];
        assert_eq!(parse_hex32(&hex(&d)), Some(d));
        assert_eq!(parse_hex32("xyz"), None);
        assert_eq!(parse_hex32(&"g".repeat(64)), None);
    }
}
