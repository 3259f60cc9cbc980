//! [`ChunkCache`]: how the filesystem gets the decompressed bytes of
//! chunks. In order: the in-memory LRU, the on-disk cache (re-verified), and
//! finally the [`ChunkFetcher`], whose verified result is kept in the
//! caches (the disk cache gets the chunk's stored bytes, kept per blob).
//! Failures are logged and counted but not remembered: the next
//! request tries the store again.
//!
//! Every load from the store is single-flight: a chunk being loaded (for a
//! reader, or by the prefetcher as part of a batch) is registered in one
//! [`InFlight`] map, and whoever needs it meanwhile waits for that load
//! instead of starting another. [`ChunkCache::get`] loads one chunk;
//! [`ChunkCache::load_batch`] loads many, grouping those of one blob that lie
//! close together into one store request (see [`crate::fetch_plan`],
//! under the fetcher's [`MergeLimits`]); it
//! claims every chunk of a request before the request starts.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use naiad_format::bootstrap::hex;
use naiad_format::{ChunkDigest, ChunkRecord};

use crate::chunk_reader::{ChunkFetcher, FetchedChunk};
use crate::counters::{add, inc, CounterSnapshot, Counters, Origin};
use crate::disk_cache::{BlobSha256, DiskCache};
use crate::error::{ChunkError, ChunkErrorKind};
use crate::fetch_plan::{plan, MergeLimits};
use crate::inflight::InFlight;
use crate::memory_cache::MemoryCache;

/// The outcome of loading one chunk.
pub type Loaded = Result<Arc<Vec<u8>>, ChunkError>;

/// What [`ChunkCache::load_batch`] did with the chunks it was given
/// (duplicates counted once): (chunks, stored bytes) per outcome.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Read from the store by this call.
    pub fetched: (u64, u64),
    /// Already in memory or on disk.
    pub cached: (u64, u64),
    /// Being loaded by someone else.
    pub elsewhere: (u64, u64),
    /// Failed to load.
    pub failed: (u64, u64),
    /// Requests made.
    pub requests: u64,
    /// Results of the chunks this call loaded itself (fetched or found
    /// cached after claiming), for a caller that needs the bytes.
    pub loaded: Vec<(ChunkDigest, Loaded)>,
}

impl BatchOutcome {
    /// Chunks and bytes that are (or are about to be) available.
    pub fn available(&self) -> (u64, u64) {
        (self.fetched.0 + self.cached.0 + self.elsewhere.0, self.fetched.1 + self.cached.1 + self.elsewhere.1)
    }
}

/// The result of one chunk of a store request, with its stored bytes while
/// they still have to go to the disk cache.
struct Fetched {
    loaded: Loaded,
    stored: Option<Vec<u8>>,
}

fn bump(t: &mut (u64, u64), c: &ChunkRecord) {
    t.0 += 1;
    t.1 += c.compressed_size as u64;
}

/// The tiered, single-flight chunk read path of one mount.
pub struct ChunkCache {
    fetcher: Arc<dyn ChunkFetcher>,
    memory: MemoryCache,
    disk: Option<DiskCache>,
    inflight: InFlight<ChunkDigest, Loaded>,
    counters: Arc<Counters>,
    /// Every chunk this mount read from the store, to count refetches.
    fetched: Mutex<HashSet<ChunkDigest>>,
    /// Store requests for readers running now.
    demand_active: AtomicUsize,
}

/// Counts a demand request as running while it lives.
struct Active<'a>(&'a AtomicUsize);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn abandoned(chunk: &ChunkRecord) -> Loaded {
    Err(ChunkError {
        kind: ChunkErrorKind::Unavailable,
        digest: hex(&chunk.digest),
        blob: None,
        offset: chunk.compressed_offset,
        message: "the load of this chunk was abandoned".into(),
    })
}

impl ChunkCache {
    pub fn new(fetcher: Arc<dyn ChunkFetcher>, memory: MemoryCache, disk: Option<DiskCache>, counters: Arc<Counters>) -> Self {
        ChunkCache { fetcher, memory, disk, inflight: InFlight::new(), counters, fetched: Mutex::new(HashSet::new()), demand_active: AtomicUsize::new(0) }
    }

    /// The verified, decompressed bytes of `chunk`. If it is being loaded
    /// already, waits for that load; if that load fails, tries once itself.
    pub fn get(&self, chunk: &ChunkRecord) -> Loaded {
        if let Some(data) = self.memory.get(&chunk.digest) {
            inc(&self.counters.memory_hits);
            return Ok(data);
        }
        let mut attempt = 0;
        loop {
            let (result, waited) = self.inflight.run(chunk.digest, abandoned(chunk), || self.load(chunk));
            if !waited {
                return result;
            }
            inc(&self.counters.coalesced);
            if result.is_ok() || attempt > 0 {
                return result;
            }
            // The load we waited for (another reader's or the prefetcher's)
            // failed; it was logged there. Try ourselves once.
            attempt += 1;
            inc(&self.counters.retries);
        }
    }

    fn load(&self, chunk: &ChunkRecord) -> Loaded {
        // Another load may have finished between our memory miss and now.
        if let Some(data) = self.memory.get(&chunk.digest) {
            inc(&self.counters.memory_hits);
            return Ok(data);
        }
        if let Some(data) = self.disk_get(chunk, true) {
            return Ok(data);
        }
        inc(&self.counters.misses);
        let one = std::slice::from_ref(chunk);
        let mut results = self.fetch_request(one, Origin::Demand, &mut |_, _| {});
        self.persist(one, &mut results);
        results.into_iter().next().map(|f| f.loaded).unwrap_or_else(|| abandoned(chunk))
    }

    /// Queues fetched chunks whose stored bytes are still here for the disk
    /// cache (background ones were queued as they arrived).
    fn persist(&self, chunks: &[ChunkRecord], results: &mut [Fetched]) {
        for (c, f) in chunks.iter().zip(results) {
            if let (Ok(data), Some(stored)) = (&f.loaded, f.stored.take()) {
                if let Some((disk, blob)) = self.disk_for(c) {
                    disk.put(blob, c, stored, data.clone());
                }
            }
        }
    }

    /// The disk cache and the blob that would hold `chunk` there.
    fn disk_for(&self, chunk: &ChunkRecord) -> Option<(&DiskCache, BlobSha256)> {
        let disk = self.disk.as_ref()?;
        Some((disk, self.fetcher.blob_sha256(chunk.blob_index)?))
    }

    fn disk_contains(&self, chunk: &ChunkRecord) -> bool {
        self.disk_for(chunk).is_some_and(|(disk, blob)| disk.contains(&blob, chunk))
    }

    /// A verified copy from the disk cache, kept in memory too if `to_memory`.
    fn disk_get(&self, chunk: &ChunkRecord, to_memory: bool) -> Option<Arc<Vec<u8>>> {
        let (disk, blob) = self.disk_for(chunk)?;
        let data = disk.get(&blob, chunk)?;
        inc(&self.counters.disk_hits);
        if to_memory {
            self.memory.insert(chunk.digest, data.clone());
        }
        Some(data)
    }

    /// One store request for `chunks` (one blob), results kept in memory
    /// (background ones: queued for the disk cache) and counted. Each
    /// result goes to `on_result` as soon as its chunk has arrived, so
    /// whoever waits for it can go on while the rest of the request is
    /// still coming in; the caller then calls [`ChunkCache::persist`] on
    /// the returned results, so readers never wait for the disk writer.
    fn fetch_request(&self, chunks: &[ChunkRecord], origin: Origin, on_result: &mut dyn FnMut(&ChunkRecord, &Fetched)) -> Vec<Fetched> {
        let c = &self.counters;
        let _active = (origin == Origin::Demand).then(|| {
            self.demand_active.fetch_add(1, Ordering::SeqCst);
            Active(&self.demand_active)
        });
        let span_start = chunks.iter().map(|c| c.compressed_offset).min().unwrap_or(0);
        let span_end = chunks.iter().map(|c| c.compressed_offset.saturating_add(c.compressed_size as u64)).max().unwrap_or(0);
        inc(&c.store_requests);
        add(&c.store_span_bytes, span_end.saturating_sub(span_start));
        let o = c.origin(origin);
        inc(&o.requests);
        let mut out: Vec<Option<Fetched>> = chunks.iter().map(|_| None).collect();
        let mut failed = 0;
        // Result `i` (None: the fetcher gave none), counted, kept and
        // passed on; a second result for the same chunk is ignored.
        let mut take = |i: usize, r: Option<Result<FetchedChunk, ChunkError>>| {
            let (Some(chunk), Some(slot)) = (chunks.get(i), out.get_mut(i)) else { return };
            if slot.is_some() {
                return;
            }
            let r = r.unwrap_or_else(|| {
                let message = format!("{} returned no result for this chunk", self.fetcher.describe());
                Err(ChunkError { kind: ChunkErrorKind::Unavailable, digest: hex(&chunk.digest), blob: None, offset: chunk.compressed_offset, message })
            });
            let read = r.is_ok() || r.as_ref().is_err_and(|e| e.kind == ChunkErrorKind::Corrupt);
            if read {
                inc(&c.store_chunks);
                add(&c.store_bytes, chunk.compressed_size as u64);
                inc(&o.chunks);
                add(&o.bytes, chunk.compressed_size as u64);
                add(&o.raw_bytes, chunk.uncompressed_size as u64);
            }
            let fetched = match r {
                Ok(FetchedChunk { stored, data }) => {
                    let first = self.fetched.lock().unwrap_or_else(|p| p.into_inner()).insert(chunk.digest);
                    if !first {
                        inc(&c.refetches);
                        tracing::debug!("chunk {} read from the store again", hex(&chunk.digest));
                    }
                    let data = Arc::new(data);
                    let disk = self.disk_for(chunk);
                    let mut stored = disk.is_some().then_some(stored);
                    // --fetch-all fills the disk cache; memory is for what is read.
                    match disk {
                        Some((disk, blob)) if origin == Origin::Background => {
                            // Queued (and served from the queue) before its
                            // claim completes, so no reader misses it.
                            if let Some(stored) = stored.take() {
                                disk.put(blob, chunk, stored, data.clone());
                            }
                        }
                        _ => self.memory.insert(chunk.digest, data.clone()),
                    }
                    Fetched { loaded: Ok(data), stored }
                }
                Err(e) => {
                    inc(&c.errors);
                    let blob = e.blob.as_deref().unwrap_or("?");
                    if origin == Origin::Demand {
                        tracing::error!(blob, offset = e.offset, "cannot read chunk {} from {}: {}", e.digest, self.fetcher.describe(), e.message);
                    } else if failed == 0 {
                        // Once per request: a broken store fails them all.
                        tracing::warn!(blob, offset = e.offset, "{origin:?}: cannot read chunk {} from {}: {}", e.digest, self.fetcher.describe(), e.message);
                    }
                    failed += 1;
                    Fetched { loaded: Err(e), stored: None }
                }
            };
            on_result(chunk, &fetched);
            *slot = Some(fetched);
        };
        self.fetcher.fetch_many(chunks, &mut |i, r| take(i, Some(r)));
        for i in 0..chunks.len() {
            take(i, None);
        }
        if failed > 1 && origin != Origin::Demand {
            tracing::warn!("{origin:?}: {failed} of {} chunks of this request failed; readers will fetch them themselves", chunks.len());
        }
        out.into_iter().flatten().collect()
    }

    /// Loads `chunks` (most urgent first) into the caches with as few store
    /// requests as possible: chunks already cached or being loaded are
    /// skipped, the rest are claimed in the single-flight map and read in
    /// merged requests planned under the fetcher's [`MergeLimits`].
    /// `before_claim` gets the stored bytes about to be read before anything
    /// is claimed, so a caller that must wait (a rate limit) does so without
    /// making readers wait for it.
    pub fn load_batch(&self, chunks: &[ChunkRecord], origin: Origin, before_claim: impl FnOnce(u64)) -> BatchOutcome {
        self.load_batch_until(chunks, origin, before_claim, &|| false)
    }

    /// [`ChunkCache::load_batch`] that makes no more requests once `stop`
    /// says so (asked before each): the chunks left are given up, and
    /// readers waiting for them fetch them themselves.
    pub fn load_batch_until(&self, chunks: &[ChunkRecord], origin: Origin, before_claim: impl FnOnce(u64), stop: &dyn Fn() -> bool) -> BatchOutcome {
        let mut out = BatchOutcome::default();
        let mut seen = HashSet::new();
        let mut wanted: Vec<ChunkRecord> = Vec::new();
        for c in chunks {
            if !seen.insert(c.digest) {
                continue;
            }
            if self.memory.contains(&c.digest) || self.disk_contains(c) {
                bump(&mut out.cached, c);
            } else {
                wanted.push(*c);
            }
        }
        if wanted.is_empty() {
            return out;
        }
        before_claim(wanted.iter().map(|c| c.compressed_size as u64).sum());
        let digests: Vec<ChunkDigest> = wanted.iter().map(|c| c.digest).collect();
        let by_digest: HashMap<ChunkDigest, ChunkRecord> = wanted.iter().map(|c| (c.digest, *c)).collect();
        let claims = self.inflight.claim_all(&digests, |d| by_digest.get(d).map(abandoned).unwrap_or_else(|| abandoned(&ChunkRecord::default())));
        let mut mine = HashMap::new();
        let mut to_fetch = Vec::new();
        for (c, claim) in wanted.iter().zip(claims) {
            let Some(claim) = claim else {
                bump(&mut out.elsewhere, c);
                continue;
            };
            // It may have been loaded between the check above and the claim.
            let cached = self.memory.get(&c.digest).or_else(|| self.disk_get(c, origin != Origin::Background));
            if let Some(data) = cached {
                bump(&mut out.cached, c);
                out.loaded.push((c.digest, Ok(data.clone())));
                claim.complete(Ok(data));
                continue;
            }
            mine.insert(c.digest, claim);
            to_fetch.push(*c);
        }
        for request in plan(&to_fetch, &self.fetcher.merge_limits()) {
            if stop() {
                break;
            }
            if origin == Origin::Demand {
                add(&self.counters.misses, request.chunks.len() as u64);
            }
            out.requests += 1;
            let mut results = self.fetch_request(&request.chunks, origin, &mut |c, f| {
                let r = &f.loaded;
                if r.is_ok() {
                    bump(&mut out.fetched, c);
                } else {
                    bump(&mut out.failed, c);
                }
                out.loaded.push((c.digest, r.clone()));
                if let Some(claim) = mine.remove(&c.digest) {
                    claim.complete(r.clone());
                }
            });
            self.persist(&request.chunks, &mut results);
        }
        // Anything left (stopped; plan itself keeps every chunk) is
        // abandoned when `mine` drops, and its readers retry themselves.
        out
    }

    /// [`ChunkCache::load_batch`] for the missing chunks of one FUSE read.
    pub fn load_for_read(&self, chunks: &[ChunkRecord]) -> HashMap<ChunkDigest, Loaded> {
        self.load_batch(chunks, Origin::Demand, |_| {}).loaded.into_iter().collect()
    }

    /// Whether a store request for a reader is running now.
    pub fn demand_active(&self) -> bool {
        self.demand_active.load(Ordering::SeqCst) > 0
    }

    /// The verified bytes of `chunk` if a cache holds them, without counting
    /// a hit (background work such as assembling backing files, which is
    /// not a reader's lookup) and without keeping a disk copy in memory.
    pub fn cached_copy(&self, chunk: &ChunkRecord) -> Option<Arc<Vec<u8>>> {
        if let Some(data) = self.memory.get(&chunk.digest) {
            return Some(data);
        }
        let (disk, blob) = self.disk_for(chunk)?;
        disk.get(&blob, chunk)
    }

    /// The limits every store request of this cache is planned under (the
    /// chunk source's).
    pub fn merge_limits(&self) -> MergeLimits {
        self.fetcher.merge_limits()
    }

    /// Whether the chunk is in memory or on disk (as far as this daemon knows).
    pub fn is_cached(&self, chunk: &ChunkRecord) -> bool {
        self.memory.contains(&chunk.digest) || self.disk_contains(chunk)
    }

    /// The counters, with the retries the store reports added.
    pub fn snapshot(&self) -> CounterSnapshot {
        let mut s = self.counters.snapshot();
        s.retries += self.fetcher.retries();
        s
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
        fn fetch(&self, chunk: &ChunkRecord) -> Result<FetchedChunk, ChunkError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(50));
            if self.fail.load(Ordering::SeqCst) {
                return Err(ChunkError { kind: ChunkErrorKind::Corrupt, digest: hex(&chunk.digest), blob: Some("sha256:x".into()), offset: 0, message: "bad".into() });
            }
            // Stored raw (no zstd flag): the stored bytes are the data.
            Ok(FetchedChunk { stored: self.data.clone(), data: self.data.clone() })
        }
        fn blob_sha256(&self, _: u32) -> Option<BlobSha256> {
            Some([1; 32])
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    #[test]
    fn tiers_single_flight_and_retry() {
        let data = vec![7u8; 4096];
        let chunk = ChunkRecord { digest: *blake3::hash(&data).as_bytes(), uncompressed_size: 4096, compressed_size: 4096, ..Default::default() };
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
        assert_eq!(s.store_requests, 2);
        assert_eq!(s.demand_requests, 2);
        assert_eq!(s.misses, 2);
        assert_eq!(s.refetches, 0);
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

    /// Chunks as stored bytes of one blob; fetch_many counts requests and
    /// can be held so readers arrive while a batch is in flight, or hold
    /// the rest of a request after its first chunk until `gate` opens.
    struct BlobFetcher {
        chunks: HashMap<ChunkDigest, Vec<u8>>,
        requests: AtomicUsize,
        fetched: Mutex<Vec<ChunkDigest>>,
        delay: std::time::Duration,
        gate: Option<Mutex<std::sync::mpsc::Receiver<()>>>,
    }

    impl BlobFetcher {
        fn new(chunks: HashMap<ChunkDigest, Vec<u8>>, delay: std::time::Duration) -> Self {
            BlobFetcher { chunks, requests: AtomicUsize::new(0), fetched: Mutex::new(Vec::new()), delay, gate: None }
        }
    }

    impl ChunkFetcher for BlobFetcher {
        fn fetch(&self, chunk: &ChunkRecord) -> Result<FetchedChunk, ChunkError> {
            let mut out = None;
            self.fetch_many(std::slice::from_ref(chunk), &mut |_, r| out = Some(r));
            out.unwrap()
        }
        fn blob_sha256(&self, _: u32) -> Option<BlobSha256> {
            Some([2; 32])
        }
        /// Requests of at most 8 of its 1000-byte chunks, gaps not bridged.
        fn merge_limits(&self) -> MergeLimits {
            MergeLimits { gap: 0, max_request: 8000 }
        }
        fn fetch_many(&self, chunks: &[ChunkRecord], each: &mut dyn FnMut(usize, Result<FetchedChunk, ChunkError>)) {
            self.requests.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            for (i, c) in chunks.iter().enumerate() {
                if i == 1 {
                    if let Some(gate) = &self.gate {
                        let _ = gate.lock().unwrap().recv_timeout(std::time::Duration::from_secs(10));
                    }
                }
                self.fetched.lock().unwrap().push(c.digest);
                let data = self.chunks[&c.digest].clone();
                each(i, Ok(FetchedChunk { stored: data.clone(), data }));
            }
        }
        fn describe(&self) -> String {
            "blob".into()
        }
    }

    fn blob_of(n: usize) -> (Vec<ChunkRecord>, HashMap<ChunkDigest, Vec<u8>>) {
        let mut records = Vec::new();
        let mut map = HashMap::new();
        for i in 0..n {
            let data = vec![i as u8; 1000];
            let digest = *blake3::hash(&data).as_bytes();
            records.push(ChunkRecord { digest, compressed_offset: i as u64 * 1000, compressed_size: 1000, uncompressed_size: 1000, blob_index: 0 });
            map.insert(digest, data);
        }
        (records, map)
    }

    #[test]
    fn batches_merge_and_readers_wait_for_them() {
        let (records, map) = blob_of(20);
        let fetcher = Arc::new(BlobFetcher::new(map, std::time::Duration::from_millis(200)));
        let counters = Arc::new(Counters::default());
        let cache = Arc::new(ChunkCache::new(fetcher.clone(), MemoryCache::new(1 << 20), None, counters.clone()));
        // Chunk 3 is already cached.
        cache.get(&records[3]).unwrap();
        assert_eq!(fetcher.requests.load(Ordering::SeqCst), 1);

        let (c2, r2) = (cache.clone(), records.clone());
        let batch = std::thread::spawn(move || c2.load_batch(&r2, Origin::Prefetch, |_| {}));
        std::thread::sleep(std::time::Duration::from_millis(50));
        // Readers of chunks in flight wait instead of fetching.
        let readers: Vec<_> = [0usize, 7, 19]
            .into_iter()
            .map(|i| {
                let (c, r) = (cache.clone(), records[i]);
                std::thread::spawn(move || c.get(&r).unwrap().len())
            })
            .collect();
        for r in readers {
            assert_eq!(r.join().unwrap(), 1000);
        }
        let out = batch.join().unwrap();
        assert_eq!(out.cached, (1, 1000));
        assert_eq!(out.fetched, (19, 19000));
        // 0..=2 (3 is cached) are one request; 4..=19 are 16 chunks, 8 per request.
        assert_eq!(out.requests, 3);
        let s = counters.snapshot();
        assert_eq!((s.prefetch_requests, s.prefetch_chunks), (3, 19));
        assert_eq!(s.store_chunks, 20);
        assert_eq!(s.refetches, 0);
        assert_eq!(s.coalesced, 3);
        let fetched = fetcher.fetched.lock().unwrap().clone();
        assert_eq!(fetched.len(), HashSet::<ChunkDigest>::from_iter(fetched.iter().copied()).len(), "a chunk was fetched twice");
        // A second batch finds everything cached.
        let again = cache.load_batch(&records, Origin::Prefetch, |_| panic!("nothing to fetch"));
        assert_eq!(again.cached.0, 20);
    }

    /// Chunks stored as the converter stores them (zstd where it helps).
    struct EncodedFetcher {
        chunks: HashMap<ChunkDigest, FetchedChunk>,
    }

    impl ChunkFetcher for EncodedFetcher {
        fn fetch(&self, chunk: &ChunkRecord) -> Result<FetchedChunk, ChunkError> {
            Ok(self.chunks[&chunk.digest].clone())
        }
        fn blob_sha256(&self, blob_index: u32) -> Option<BlobSha256> {
            Some([blob_index as u8 + 10; 32])
        }
        fn describe(&self) -> String {
            "encoded".into()
        }
    }

    #[test]
    fn a_stopped_batch_makes_no_more_requests_and_gives_its_chunks_up() {
        let mut records = Vec::new();
        let mut chunks = HashMap::new();
        for i in 0..4u32 {
            let data = vec![i as u8; 3000];
            let enc = naiad_format::encode_chunk(&data, 3);
            // One blob each: one request each.
            records.push(ChunkRecord {
                digest: enc.digest,
                blob_index: i,
                compressed_offset: 0,
                compressed_size: enc.stored.len() as u32,
                uncompressed_size: enc.uncompressed_size,
            });
            chunks.insert(enc.digest, FetchedChunk { stored: enc.stored, data });
        }
        let counters = Arc::new(Counters::default());
        let cache = ChunkCache::new(Arc::new(EncodedFetcher { chunks }), MemoryCache::new(1 << 20), None, counters.clone());
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let out = cache.load_batch_until(&records, Origin::ReadAhead, |_| {}, &|| asked.fetch_add(1, Ordering::Relaxed) >= 1);
        assert_eq!((out.requests, out.fetched.0), (1, 1));
        assert_eq!(records.iter().filter(|c| cache.is_cached(c)).count(), 1);
        // The chunks given up are not left claimed: a reader fetches them.
        for c in &records {
            assert_eq!(cache.get(c).unwrap().len(), 3000);
        }
        assert_eq!(counters.snapshot().store_requests, 4);
    }

    #[test]
    fn background_loads_fill_the_disk_cache_with_stored_bytes() {
        let mut records = Vec::new();
        let mut chunks = HashMap::new();
        let mut offset = 0;
        for i in 0..6u32 {
            let data: Vec<u8> = (0..5000u32).map(|j| if i % 2 == 0 { i as u8 } else { (j.wrapping_mul(2654435761) >> (i + 8)) as u8 }).collect();
            let enc = naiad_format::encode_chunk(&data, 3);
            let rec = ChunkRecord {
                digest: enc.digest,
                blob_index: i % 2,
                compressed_offset: offset,
                compressed_size: enc.stored.len() as u32,
                uncompressed_size: enc.uncompressed_size,
            };
            offset += enc.stored.len() as u64;
            records.push(rec);
            chunks.insert(enc.digest, FetchedChunk { stored: enc.stored, data });
        }
        let fetcher = Arc::new(EncodedFetcher { chunks });
        let dir = tempfile::tempdir().unwrap();
        let counters = Arc::new(Counters::default());
        let disk = DiskCache::open(dir.path(), 1 << 20, counters.clone()).unwrap();
        let cache = ChunkCache::new(fetcher.clone(), MemoryCache::new(1 << 20), Some(disk), counters.clone());
        let blob0: Vec<ChunkRecord> = records.iter().filter(|c| c.blob_index == 0).copied().collect();
        let out = cache.load_batch(&blob0, Origin::Background, |_| {});
        assert_eq!(out.fetched.0, 3);
        // Into the disk cache (served from its queue at once), not memory.
        assert!(blob0.iter().all(|c| !cache.memory().contains(&c.digest) && cache.is_cached(c)));
        // Readers of other chunks fill memory and, through it, the disk.
        for c in records.iter().filter(|c| c.blob_index == 1) {
            assert_eq!(cache.get(c).unwrap().len(), 5000);
        }
        cache.flush();
        assert_eq!(counters.snapshot().disk_writes, 6);
        let stored_total: u64 = records.iter().map(|c| c.compressed_size as u64).sum();
        assert_eq!(cache.disk().unwrap().usage(), (stored_total, 6));
        drop(cache);

        let counters = Arc::new(Counters::default());
        let disk = DiskCache::open(dir.path(), 1 << 20, counters.clone()).unwrap();
        let cache = ChunkCache::new(fetcher, MemoryCache::new(1 << 20), Some(disk), counters.clone());
        for c in &records {
            let want = blake3::hash(&cache.get(c).unwrap()).as_bytes().to_owned();
            assert_eq!(want, c.digest);
        }
        let s = counters.snapshot();
        assert_eq!((s.disk_hits, s.store_chunks, s.disk_corrupt), (6, 0, 0));
    }

    #[test]
    fn reads_merge_missing_chunks() {
        let (records, map) = blob_of(16);
        let fetcher = Arc::new(BlobFetcher::new(map, std::time::Duration::ZERO));
        let counters = Arc::new(Counters::default());
        let cache = ChunkCache::new(fetcher.clone(), MemoryCache::new(1 << 20), None, counters.clone());
        let loaded = cache.load_for_read(&records);
        assert_eq!(loaded.len(), 16);
        assert!(loaded.values().all(|r| r.as_ref().is_ok_and(|d| d.len() == 1000)));
        // Under the fetcher's limits (8 chunks a request).
        assert_eq!(fetcher.requests.load(Ordering::SeqCst), 2);
        let s = counters.snapshot();
        assert_eq!((s.demand_requests, s.demand_chunks, s.misses, s.store_span_bytes), (2, 16, 16, 16000));
    }

    #[test]
    fn a_reader_gets_its_chunk_while_the_rest_of_the_request_is_coming() {
        let (records, map) = blob_of(8);
        let (open_gate, gate) = std::sync::mpsc::channel();
        let fetcher = Arc::new(BlobFetcher { gate: Some(Mutex::new(gate)), ..BlobFetcher::new(map, std::time::Duration::ZERO) });
        let cache = Arc::new(ChunkCache::new(fetcher.clone(), MemoryCache::new(1 << 20), None, Arc::new(Counters::default())));
        let (c2, r2) = (cache.clone(), records.clone());
        // One request of 8 chunks; the fetcher holds after the first.
        let batch = std::thread::spawn(move || c2.load_batch(&r2, Origin::Prefetch, |_| {}));
        while fetcher.fetched.lock().unwrap().is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let (done, got) = std::sync::mpsc::channel();
        let (c3, first) = (cache.clone(), records[0]);
        std::thread::spawn(move || done.send(c3.get(&first).map(|d| d.len())));
        let first_result = got.recv_timeout(std::time::Duration::from_secs(5));
        let handed_over = fetcher.fetched.lock().unwrap().len();
        open_gate.send(()).unwrap();
        assert_eq!(first_result.expect("the reader of chunk 0 waited for the whole request").unwrap(), 1000);
        assert_eq!(handed_over, 1, "the request was still held after its first chunk");
        let out = batch.join().unwrap();
        assert_eq!((out.requests, out.fetched.0), (1, 8));
        assert_eq!(fetcher.requests.load(Ordering::SeqCst), 1, "the reader did not fetch itself");
    }
}
