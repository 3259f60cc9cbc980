//! [`Prefetcher`]: fetches an image's startup set as soon as it is mounted,
//! alongside the workload's own reads.
//!
//! The set is the bootstrap's prefetch table (chunk indexes in the order a
//! recorded workload first needed them). Its chunks are grouped into runs
//! of chunks of one blob lying close together, each run read with one range
//! request planned under the chunk source's [`naiad_reader::MergeLimits`]
//! (a longer run is split), most urgent run first, by [`PrefetchConfig::threads`] workers.
//! The set's bytes may already be on their way: the image was opened
//! reading them ahead ([`NaiadImage::open_cached`]), and the requests
//! planned here are then served from that read by the store.
//! Every request goes through [`ChunkCache::load_batch`], which claims its
//! chunks in the single-flight map before the request starts: a reader
//! needing one of them waits for that request instead of fetching again,
//! and the prefetcher skips chunks a reader is already fetching. Readers
//! never wait for the prefetch *queue*: nothing is claimed until its request
//! is about to start, and the bandwidth cap (`rate`) is waited for before
//! claiming.
//!
//! With `fetch_all`, the rest of the image follows, one request at a time,
//! each waiting until no reader's request is running (low priority), into
//! the disk cache.
//!
//! Progress (totals, done, failed, state, duration) is published in
//! [`crate::counters::PrefetchProgress`].

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use naiad_format::{ChunkDigest, ChunkRecord};
use naiad_reader::NaiadImage;

use crate::chunk_cache::ChunkCache;
use crate::counters::{add, get, set, state, Origin};
use crate::error::FuseError;
use crate::size::format_size;
use naiad_reader::{plan, Request};

/// How and whether a mount prefetches.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PrefetchConfig {
    /// Fetch the prefetch table at mount.
    pub enabled: bool,
    /// Prefetch requests running at once.
    pub threads: usize,
    /// Bandwidth cap in stored bytes per second (`None`: unlimited).
    pub rate: Option<u64>,
    /// Afterwards, fetch every other chunk of the image in the background.
    pub fetch_all: bool,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig { enabled: true, threads: 2, rate: None, fetch_all: false }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Spaces requests so that on average at most `rate` bytes per second go
/// out. The first request goes at once; each one delays the next by its
/// size over the rate.
struct RateLimiter {
    rate: u64,
    next: Mutex<Instant>,
}

impl RateLimiter {
    fn acquire(&self, bytes: u64, stop: &AtomicBool) {
        let at = {
            let mut next = lock(&self.next);
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / self.rate.max(1) as f64);
            start
        };
        sleep_until(at, stop);
    }
}

/// Sleeps until `at` or until `stop` is set.
fn sleep_until(at: Instant, stop: &AtomicBool) {
    loop {
        let now = Instant::now();
        if now >= at || stop.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep((at - now).min(Duration::from_millis(50)));
    }
}

/// The prefetch of one mount, running on its own threads until done or
/// stopped.
pub struct Prefetcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Job {
    image: Arc<NaiadImage>,
    chunks: Arc<ChunkCache>,
    config: PrefetchConfig,
    stop: Arc<AtomicBool>,
    limiter: Option<RateLimiter>,
    mounted: Instant,
    on_done: Option<Box<dyn Fn() + Send + Sync>>,
}

impl Prefetcher {
    /// Starts prefetching `image` into `chunks`; `mounted` is when the mount
    /// started (progress reports the time since). Returns `None` when there
    /// is nothing to do (prefetch disabled or no prefetch table, and no
    /// `fetch_all`). `on_done` runs once everything was fetched (not when
    /// stopped before).
    pub fn start(
        image: Arc<NaiadImage>,
        chunks: Arc<ChunkCache>,
        config: PrefetchConfig,
        mounted: Instant,
        on_done: Option<Box<dyn Fn() + Send + Sync>>,
    ) -> Result<Option<Prefetcher>, FuseError> {
        // The set is known (and its progress published) before this returns.
        let set_chunks = if config.enabled { prefetch_set(&image) } else { Vec::new() };
        if set_chunks.is_empty() && !config.fetch_all {
            image.store.forget_started_reads();
            return Ok(None);
        }
        if !set_chunks.is_empty() {
            let p = &chunks.counters().progress;
            set(&p.chunks_total, set_chunks.len() as u64);
            set(&p.bytes_total, set_chunks.iter().map(|c| c.compressed_size as u64).sum());
            set(&p.state, state::RUNNING);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let limiter = config.rate.filter(|&r| r > 0).map(|rate| RateLimiter { rate, next: Mutex::new(Instant::now()) });
        let job = Job { image, chunks, config, stop: stop.clone(), limiter, mounted, on_done };
        let thread = std::thread::Builder::new()
            .name("naiad-prefetch".into())
            .spawn(move || job.run(set_chunks))
            .map_err(|e| FuseError::Io { path: "prefetch thread".into(), source: e })?;
        Ok(Some(Prefetcher { stop, thread: Some(thread) }))
    }

    /// Stops after the requests running now and waits for that.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The chunks of the image's prefetch table, in order, each once.
fn prefetch_set(image: &NaiadImage) -> Vec<ChunkRecord> {
    let b = &image.bootstrap;
    let mut seen: HashSet<ChunkDigest> = HashSet::new();
    let mut out = Vec::new();
    for &index in &image.startup_set().order {
        match b.chunk(index) {
            Ok(c) if seen.insert(c.digest) => out.push(c),
            Ok(_) => {}
            Err(e) => tracing::warn!("prefetch: chunk {index} of the prefetch table: {e}"),
        }
    }
    out
}

impl Job {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn run(&self, set_chunks: Vec<ChunkRecord>) {
        if !set_chunks.is_empty() {
            self.prefetch_set(&set_chunks);
        }
        // What the set's requests did not take of a read started for it
        // at open (none, when the bootstrap and the manifest agree).
        self.image.store.forget_started_reads();
        if self.config.fetch_all && !self.stopped() {
            let b = &self.image.bootstrap;
            let mut seen: HashSet<ChunkDigest> = set_chunks.iter().map(|c| c.digest).collect();
            let mut rest = Vec::new();
            for index in 0..b.chunk_count() {
                match b.chunk(index) {
                    Ok(c) if seen.insert(c.digest) => rest.push(c),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("fetch-all: chunk {index}: {e}"),
                }
            }
            self.fetch_rest(&rest);
        }
        if let Some(done) = self.on_done.as_ref().filter(|_| !self.stopped()) {
            done();
        }
    }

    fn prefetch_set(&self, set_chunks: &[ChunkRecord]) {
        let counters = self.chunks.counters();
        let p = &counters.progress;
        let bytes: u64 = set_chunks.iter().map(|c| c.compressed_size as u64).sum();
        let requests = plan(set_chunks, &self.chunks.merge_limits());
        let planned = requests.len();
        let start = Instant::now();
        let before = counters.snapshot();
        let queue = Mutex::new(VecDeque::from(requests));
        let threads = self.config.threads.max(1);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    while !self.stopped() {
                        let Some(r) = lock(&queue).pop_front() else { break };
                        self.run_request(&r, Origin::Prefetch);
                    }
                });
            }
        });
        let stopped = self.stopped() && get(&p.chunks_done) + get(&p.chunks_failed) < set_chunks.len() as u64;
        set(&p.millis, self.mounted.elapsed().as_millis() as u64);
        set(&p.state, if stopped { state::STOPPED } else { state::DONE });
        let after = counters.snapshot();
        tracing::info!(
            "prefetch {}: {}/{} chunks ({} of {}) available, {} fetched in {} requests ({} planned, {}), {} failed, in {:?} ({:?} after mount)",
            if stopped { "stopped" } else { "done" },
            get(&p.chunks_done),
            set_chunks.len(),
            format_size(get(&p.bytes_done)),
            format_size(bytes),
            after.prefetch_chunks - before.prefetch_chunks,
            after.prefetch_requests - before.prefetch_requests,
            planned,
            format_size(after.prefetch_bytes - before.prefetch_bytes),
            get(&p.chunks_failed),
            start.elapsed(),
            self.mounted.elapsed()
        );
    }

    fn fetch_rest(&self, rest: &[ChunkRecord]) {
        let counters = self.chunks.counters();
        let p = &counters.progress;
        let bytes: u64 = rest.iter().map(|c| c.compressed_size as u64).sum();
        set(&p.background_chunks_total, rest.len() as u64);
        set(&p.background_bytes_total, bytes);
        set(&p.background_state, state::RUNNING);
        let start = Instant::now();
        let requests = plan(rest, &self.chunks.merge_limits());
        for r in &requests {
            // Low priority: let readers' requests go first.
            while self.chunks.demand_active() && !self.stopped() {
                std::thread::sleep(Duration::from_millis(2));
            }
            if self.stopped() {
                break;
            }
            self.run_request(r, Origin::Background);
        }
        let done = get(&p.background_chunks_done);
        set(&p.background_state, if done < rest.len() as u64 && self.stopped() { state::STOPPED } else { state::DONE });
        tracing::info!("fetch-all: {done}/{} chunks ({}) available after {:?}", rest.len(), format_size(bytes), start.elapsed());
    }

    /// One planned request: waits for the rate limit, then loads it.
    fn run_request(&self, r: &Request, origin: Origin) {
        let stop = &*self.stop;
        let limiter = self.limiter.as_ref();
        let out = self.chunks.load_batch(&r.chunks, origin, |bytes| {
            if let Some(l) = limiter {
                l.acquire(bytes, stop);
            }
        });
        let p = &self.chunks.counters().progress;
        let (chunks, bytes) = out.available();
        match origin {
            Origin::Background => {
                add(&p.background_chunks_done, chunks);
                add(&p.background_bytes_done, bytes);
            }
            _ => {
                add(&p.chunks_done, chunks);
                add(&p.bytes_done, bytes);
                add(&p.chunks_failed, out.failed.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_spaces_requests() {
        let l = RateLimiter { rate: 1000, next: Mutex::new(Instant::now()) };
        let stop = AtomicBool::new(false);
        let t = Instant::now();
        l.acquire(100, &stop); // at once
        assert!(t.elapsed() < Duration::from_millis(50));
        l.acquire(100, &stop); // 0.1 s later
        assert!(t.elapsed() >= Duration::from_millis(95));
        stop.store(true, Ordering::SeqCst);
        let t = Instant::now();
        l.acquire(1_000_000, &stop);
        l.acquire(1_000_000, &stop); // would be 1000 s; stop ends the wait
        assert!(t.elapsed() < Duration::from_millis(100));
    }
}
