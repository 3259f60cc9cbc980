//! The serving daemon of a mount: [`run_daemon`] takes its [`Handoff`]
//! from the supervisor (configuration and the mount's `/dev/fuse`
//! descriptor), opens the image, sets up a fuser session on the connection
//! ([`crate::fuse_device::start_session`]) and serves it until the
//! filesystem is unmounted, then flushes the disk cache and removes its
//! stats socket.
//!
//! Alongside the session: the [`Prefetcher`] fetches the image's startup
//! set (chunks already in the disk cache count as done, so a restarted
//! daemon continues a prefetch rather than starting it over), the
//! [`TraceRecorder`] writes the reads to a trace file (`--record-trace`;
//! final write after unmount), and the stats socket and the HTTP API socket
//! (`--api-socket`) serve the counters, which live in the mount's shared
//! counters file.
//!
//! The daemon holds no state that a successor needs: inode numbers and file
//! handles are the bootstrap's own; the caches (chunks, backing files,
//! decoded bootstraps), the counters and the passthrough open table are on
//! disk. That is what lets [`crate::supervisor`] replace it at any moment.
//!
//! Reads: from the kernel's page cache (opens are zero-message, so nothing
//! reaches the daemon for what it holds), else from a file's backing file
//! ([`BackingFiles`]), else from its chunks ([`ChunkCache`]); with
//! `--passthrough`, opens of files with a backing file go to the kernel
//! ([`Passthrough`]).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::fd::OwnedFd;

use fuser::{Config, SessionACL};
use naiad_reader::{BootstrapCache, ChunkReader, MergeLimits, NaiadImage};
use naiad_registry::{BlobRange, ImageRef};
use nix::mount::MntFlags;
use serde::{Deserialize, Serialize};

use crate::backing_files::BackingFiles;
use crate::chunk_cache::ChunkCache;
use crate::counters::Counters;
use crate::disk_cache::DiskCache;
use crate::error::FuseError;
use crate::filesystem::NaiadFs;
use crate::fuse_device;
use crate::handoff::{self, DaemonMessage, Handoff, StartCause};
use crate::memory_cache::MemoryCache;
use crate::metrics_server::MetricsServer;
use crate::page_push::PagePusher;
use crate::passthrough::Passthrough;
use crate::prefetcher::{PrefetchConfig, Prefetcher};
use crate::program_loads::{self, ProgramLoad};
use crate::read_ahead::BackgroundLoads;
use crate::read_pool::ReadPool;
use crate::runtime_paths::RuntimePaths;
use crate::stats_server::{CacheUsage, StatsReport, StatsServer};
use crate::trace_recorder::TraceRecorder;

/// Threads serving reads that wait for the store (the kernel bounds how
/// many reads are outstanding; these bound how many wait at once).
const READ_POOL_THREADS: usize = 16;
/// How long an exiting daemon waits for read-ahead loads to finish, so
/// what they fetched reaches the disk cache.
const READ_AHEAD_EXIT_WAIT: Duration = Duration::from_secs(10);

/// How the filesystem is mounted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountConfig {
    /// FUSE worker threads.
    pub threads: usize,
    /// How long the kernel may cache entries and attributes.
    pub ttl: Duration,
    /// Let every user (not only the daemon's) use the mount.
    pub allow_other: bool,
    /// Honor setuid/setgid bits (off by default: `nosuid`).
    pub suid: bool,
    /// Allow device nodes to be opened as devices (off by default: `nodev`).
    pub dev: bool,
    /// Serve opens of files with a backing file by kernel passthrough
    /// (`--passthrough`); otherwise opens are zero-message and the daemon
    /// reads backing files itself.
    #[serde(default)]
    pub passthrough: bool,
    /// Largest sequential read-ahead window (`--read-ahead-max`); 0: none.
    #[serde(default = "default_read_ahead_max")]
    pub read_ahead_max: u64,
    /// The program the mount is about to run, loaded ahead with the
    /// libraries it needs ([`crate::program_loads`]; lazy mounts only).
    #[serde(default)]
    pub program: ProgramLoad,
}

fn default_read_ahead_max() -> u64 {
    crate::read_ahead::MAX_WINDOW
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            threads: 4,
            ttl: Duration::from_secs(86400),
            allow_other: true,
            suid: false,
            dev: false,
            passthrough: false,
            read_ahead_max: default_read_ahead_max(),
            program: ProgramLoad::Off,
        }
    }
}

/// The chunk caches of a mount.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheConfig {
    /// Bytes of decompressed chunks kept in memory.
    pub memory_bytes: u64,
    /// Directory of the persistent chunk cache; `None` disables it.
    pub disk_dir: Option<PathBuf>,
    /// Size cap of the persistent chunk cache.
    pub disk_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { memory_bytes: 256 << 20, disk_dir: None, disk_bytes: 2 << 30 }
    }
}

/// How a daemon serves its mount.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServeConfig {
    /// Canonical path of the mountpoint.
    pub mountpoint: PathBuf,
    /// The image reference as the user gave it (for stats and logs).
    pub source: String,
    pub mount: MountConfig,
    pub cache: CacheConfig,
    /// The mount's files: stats socket, pid file, control socket, counters.
    pub runtime: RuntimePaths,
    /// Prefetch at mount and `--fetch-all`.
    pub prefetch: PrefetchConfig,
    /// How chunk ranges are merged into store requests (every request of
    /// the mount: reads, read-ahead, prefetch).
    #[serde(default)]
    pub merge: MergeLimits,
    /// Record the reads to this file (`--record-trace`).
    pub record_trace: Option<PathBuf>,
    /// Serve HTTP (`GET /metrics`) on this unix socket (`--api-socket`).
    pub api_socket: Option<PathBuf>,
}

/// Checks that `/dev/fuse` can be opened.
pub fn check_fuse_device() -> Result<(), FuseError> {
    OpenOptions::new().read(true).write(true).open("/dev/fuse").map(drop).map_err(FuseError::NoFuseDevice)
}

/// Unmounts `mountpoint`: a plain unmount, which fails if the mount is busy,
/// or with `lazy` a detach that completes when the last user goes away.
/// Falls back to `fusermount3 -u` when the kernel refuses (not root).
pub fn unmount(mountpoint: &Path, lazy: bool) -> Result<(), FuseError> {
    let flags = if lazy { MntFlags::MNT_DETACH } else { MntFlags::empty() };
    match nix::mount::umount2(mountpoint, flags) {
        Ok(()) => Ok(()),
        Err(nix::Error::EPERM) => {
            let mut cmd = std::process::Command::new("fusermount3");
            cmd.arg("-u").arg("-q");
            if lazy {
                cmd.arg("-z");
            }
            match cmd.arg("--").arg(mountpoint).status() {
                Ok(s) if s.success() => Ok(()),
                _ => Err(FuseError::Unmount { path: mountpoint.to_path_buf(), source: nix::Error::EPERM }),
            }
        }
        Err(source) => Err(FuseError::Unmount { path: mountpoint.to_path_buf(), source }),
    }
}

/// The fuser session settings of a daemon. One shared descriptor for all
/// worker threads (no FUSE_DEV_IOC_CLONE): requests read through a cloned
/// descriptor are aborted when it closes, so a daemon's death would fail
/// them instead of leaving them to be resent.
fn fuser_config(m: &MountConfig) -> (SessionACL, Config) {
    let acl = if m.allow_other { SessionACL::All } else { SessionACL::Owner };
    let mut c = Config::default();
    c.acl = acl;
    c.n_threads = Some(m.threads.max(1));
    c.clone_fd = false;
    (acl, c)
}

/// The daemon process: reads its [`Handoff`] from `channel`, serves the
/// mount until it is unmounted, and returns. A failure before the session
/// is up is also reported to the supervisor, which passes it on.
pub fn run_daemon(channel: OwnedFd) -> Result<(), FuseError> {
    raise_open_file_limit();
    let channel_err = |source: std::io::Error| FuseError::Io { path: "supervisor channel".into(), source };
    let (handoff, mut fds): (Handoff, _) = handoff::receive(&channel).map_err(channel_err)?.ok_or_else(|| channel_err(std::io::Error::other("closed before the handoff")))?;
    let Some(fuse) = fds.pop() else {
        return Err(channel_err(std::io::Error::other("the handoff carries no /dev/fuse descriptor")));
    };
    match start(&handoff, &fuse, &channel) {
        Ok(daemon) => daemon.serve(),
        Err(e) => {
            let _ = handoff::send(&channel, &DaemonMessage::Failed { message: e.to_string() }, &[]);
            Err(e)
        }
    }
}

/// Raises the soft limit of open descriptors to the hard one: the daemon
/// keeps cache files and backing files open (a soft limit of 1024 is
/// common).
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!("cannot raise the open file limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::debug!("cannot read the open file limit: {e}"),
    }
}

/// A daemon whose session is set up and announced, about to serve.
struct StartedDaemon {
    session: fuser::Session<NaiadFs>,
    config: ServeConfig,
    chunks: Arc<ChunkCache>,
    recorder: Option<Arc<TraceRecorder>>,
    prefetcher: Option<Prefetcher>,
    pusher: Option<Arc<PagePusher>>,
    stats: StatsServer,
    api: Option<MetricsServer>,
    start: Instant,
    bootstraps: Option<BootstrapCache>,
    read_ahead: Vec<BackgroundLoads>,
}

/// Removes the socket at `path` so that this daemon can listen there: the
/// predecessor's is dead, or (upgrade) about to be stopped. Anything but a
/// socket stays, and binding then fails with a clear error.
fn take_over_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Everything that can fail happens here, before the daemon tells its
/// supervisor it is ready: a daemon that cannot start is never counted as
/// serving (and the first one's error reaches the user).
fn start(handoff: &Handoff, fuse: &OwnedFd, channel: &OwnedFd) -> Result<StartedDaemon, FuseError> {
    let config = &handoff.config.serve;
    let mp = &config.mountpoint;
    let start = Instant::now();
    let source = &handoff.config.source;
    let reference = ImageRef::parse(source).map_err(|e| FuseError::Image(format!("image {source}: {e}")))?;
    let disk_dir = config.cache.disk_dir.as_ref().filter(|_| config.cache.disk_bytes > 0);
    // The decoded bootstrap is kept with the disk cache: a remount or a
    // restarted daemon maps it instead of decoding it again.
    let bootstraps = disk_dir.map(|d| BootstrapCache::new(&d.join("bootstraps")));
    // The startup set is read from the moment the manifest names it, unless
    // the disk cache already holds some of its blob (a warm start: the
    // prefetch then fetches only what is missing).
    let read_startup_set = |set: &BlobRange| config.prefetch.enabled && !disk_dir.is_some_and(|d| DiskCache::holds_any_of(d, &set.digest.bytes()));
    let image = NaiadImage::open_cached(&reference, &handoff.config.registry, bootstraps.as_ref(), &read_startup_set)
        .map_err(|e| FuseError::Image(format!("opening image {source}: {e}")))?;
    tracing::info!(
        "daemon {} (generation {}) opened {source} ({} inodes, {} chunks) in {:?}{}",
        std::process::id(),
        handoff.generation,
        image.bootstrap.inode_count(),
        image.bootstrap.chunk_count(),
        start.elapsed(),
        if image.bootstrap_cached { ", its bootstrap mapped from the cache" } else { "" }
    );

    let counters = Arc::new(Counters::open_shared(&config.runtime.counters)?);
    counters.reset_progress();
    let disk = match disk_dir {
        Some(dir) => Some(DiskCache::open(dir, config.cache.disk_bytes, counters.clone())?),
        None => None,
    };
    let image = Arc::new(image);
    let fetcher = Arc::new(ChunkReader::new(image.clone(), config.merge));
    let chunks = Arc::new(ChunkCache::new(fetcher, MemoryCache::new(config.cache.memory_bytes), disk, counters.clone()));
    let recorder = match &config.record_trace {
        Some(path) => Some(TraceRecorder::start(path, image.clone(), counters.clone())?),
        None => None,
    };
    let pool = Arc::new(ReadPool::new(READ_POOL_THREADS).map_err(|source| FuseError::Io { path: mp.clone(), source })?);
    // Backing files need a disk cache to live in.
    let backing = BackingFiles::start(image.clone(), chunks.clone()).map_err(|source| FuseError::Io { path: mp.clone(), source })?.map(Arc::new);
    // Kernel passthrough is off while recording a trace: every read must
    // reach the recorder.
    let passthrough = match &backing {
        Some(files) if config.mount.passthrough && recorder.is_none() => {
            let fuse_dup = fuse.try_clone().map_err(|source| FuseError::Io { path: "/dev/fuse".into(), source })?;
            Some(Arc::new(Passthrough::new(files.clone(), &config.runtime.opens, image.bootstrap.inode_count(), fuse_dup, counters.clone())?))
        }
        _ => None,
    };
    // A recording sees every read: nothing is put in the page cache ahead.
    let pusher = if recorder.is_none() { PagePusher::new(image.clone(), chunks.clone()) } else { None };
    let fs = NaiadFs::new(image.clone(), chunks.clone(), config.mount.ttl)
        .with_recorder(recorder.clone())
        .with_page_pusher(pusher.clone())
        .with_read_pool(pool)
        .with_backing_files(backing.clone(), passthrough)
        .with_read_ahead(config.mount.read_ahead_max);
    let read_ahead = fs.background_loads();

    let report = stats_report(config, &image, &chunks, &counters, start, handoff.supervisor_pid, handoff.generation);
    take_over_socket(&config.runtime.socket);
    let stats = {
        let report = report.clone();
        StatsServer::start(&config.runtime.socket, move || report())?
    };
    let api = match &config.api_socket {
        Some(path) => {
            let report = report.clone();
            if handoff.generation > 1 {
                take_over_socket(path);
            }
            Some(MetricsServer::start(path, move || report())?)
        }
        None => None,
    };

    let fuse_err = |source: std::io::Error| FuseError::Mount { path: mp.clone(), source };
    let first = handoff.init_request.is_none();
    let init = match &handoff.init_request {
        Some(init) => init.clone(),
        None => fuse_device::read_init(fuse).map_err(fuse_err)?,
    };
    let (acl, fuser) = fuser_config(&config.mount);
    let (session, reply) = fuse_device::start_session(fs, fuse, &init, acl, fuser).map_err(fuse_err)?;
    if let Some(p) = &pusher {
        p.attach(session.notifier()).map_err(|source| FuseError::Io { path: mp.clone(), source })?;
    }
    if first {
        fuse_device::write_reply(fuse, &reply).map_err(fuse_err)?;
    }
    // The prefetch starts with the session: chunks the disk cache holds
    // count as done at once.
    // Files the prefetch completed get their backing files.
    let on_done = backing.map(|b| Box::new(move || b.offer_all()) as Box<dyn Fn() + Send + Sync>);
    let prefetcher = Prefetcher::start(image.clone(), chunks.clone(), config.prefetch.clone(), start, on_done)?;
    program_loads::start(image.clone(), chunks.clone(), &config.mount.program, config.prefetch.enabled && config.mount.read_ahead_max > 0);
    handoff::send(channel, &DaemonMessage::Ready { pid: std::process::id(), init_request: init }, &[])
        .map_err(|source| FuseError::Io { path: "supervisor channel".into(), source })?;
    match handoff.cause {
        StartCause::First => tracing::info!("serving {source} on {} ({:?} after start)", mp.display(), start.elapsed()),
        StartCause::Restart { died_at_ns } => {
            let gap = Duration::from_nanos(handoff::monotonic_ns().saturating_sub(died_at_ns));
            crate::counters::inc(&counters.daemon_restarts);
            counters.daemon_recovery.observe(gap);
            tracing::info!("serving {} again, {gap:?} after the previous daemon died", mp.display());
        }
        StartCause::Upgrade => {
            crate::counters::inc(&counters.daemon_restarts);
            crate::counters::inc(&counters.daemon_upgrades);
            tracing::info!("serving {} as the upgraded daemon ({})", mp.display(), std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default());
        }
    }
    Ok(StartedDaemon { session, config: config.clone(), chunks, recorder, prefetcher, pusher, stats, api, start, bootstraps, read_ahead })
}

/// What `naiad stats` and the API socket report, computed on each request.
fn stats_report(
    config: &ServeConfig,
    image: &NaiadImage,
    chunks: &Arc<ChunkCache>,
    counters: &Arc<Counters>,
    start: Instant,
    supervisor_pid: u32,
    generation: u64,
) -> Arc<dyn Fn() -> StatsReport + Send + Sync> {
    let blob_bytes: u64 = image.bootstrap.blobs().map(|b| b.iter().map(|b| b.size).sum()).unwrap_or(0);
    let (chunks, counters, mountpoint, source) = (chunks.clone(), counters.clone(), config.mountpoint.display().to_string(), config.source.clone());
    let trace_file = config.record_trace.as_ref().map(|p| p.display().to_string());
    Arc::new(move || StatsReport {
        mountpoint: mountpoint.clone(),
        source: source.clone(),
        pid: std::process::id(),
        supervisor_pid: Some(supervisor_pid),
        generation,
        uptime_secs: start.elapsed().as_secs_f64(),
        blob_bytes,
        counters: chunks.snapshot(),
        read_latency: counters.read_latency.snapshot(),
        daemon_recovery: counters.daemon_recovery.snapshot(),
        prefetch: counters.prefetch_snapshot(),
        trace_file: trace_file.clone(),
        memory_cache: {
            let (bytes, entries) = chunks.memory().usage();
            CacheUsage { bytes, entries, capacity: chunks.memory().capacity(), dir: None }
        },
        disk_cache: chunks.disk().map(|d| {
            let (bytes, entries) = d.usage();
            CacheUsage { bytes, entries, capacity: d.capacity(), dir: Some(d.dir().display().to_string()) }
        }),
    })
}

impl StartedDaemon {
    fn serve(self) -> Result<(), FuseError> {
        let StartedDaemon { session, config, chunks, recorder, prefetcher, pusher, stats, api, start, bootstraps, read_ahead } = self;
        let mp = &config.mountpoint;
        let result = session.run().map_err(|source| FuseError::Session { path: mp.clone(), source });
        if let Some(p) = prefetcher {
            p.stop();
        }
        if let Some(p) = pusher {
            p.stop();
        }
        if let Some(r) = &recorder {
            match r.finish() {
                Ok(()) => tracing::info!("trace: {} records written to {}", r.records(), r.path().display()),
                Err(e) => tracing::error!("trace: {e}"),
            }
        }
        // The workload that wanted them is gone: loads ahead stop after
        // the request they are in, whose chunks still go to the disk cache.
        for loads in &read_ahead {
            loads.stop();
        }
        let deadline = std::time::Instant::now() + READ_AHEAD_EXIT_WAIT;
        if !read_ahead.iter().all(|loads| loads.wait_idle(deadline.saturating_duration_since(std::time::Instant::now()))) {
            tracing::warn!("{}: read-ahead still running after {:?}; its chunks are not cached", mp.display(), READ_AHEAD_EXIT_WAIT);
        }
        log_summary(mp, start, &chunks);
        chunks.flush();
        if let Some(b) = &bootstraps {
            b.wait();
        }
        stats.stop();
        if let Some(a) = api {
            a.stop();
        }
        result
    }
}

fn log_summary(mp: &Path, start: Instant, chunks: &ChunkCache) {
    let c = chunks.snapshot();
    let amp = c.amplification();
    tracing::info!(
        "{} unmounted after {:.1}s: {} reads ({} bytes); {} chunks ({} bytes) read from the store in {} requests ({} for reads, {} prefetch, {} background); amplification {} ({} uncompressed); {} memory hits, {} disk hits, {} errors",
        mp.display(),
        start.elapsed().as_secs_f64(),
        c.reads,
        c.read_bytes,
        c.store_chunks,
        c.store_bytes,
        c.store_requests,
        c.demand_requests,
        c.prefetch_requests,
        c.background_requests,
        amp.demand.map(|a| format!("{a:.2}")).unwrap_or_else(|| "-".into()),
        amp.demand_raw.map(|a| format!("{a:.2}")).unwrap_or_else(|| "-".into()),
        c.memory_hits,
        c.disk_hits,
        c.errors
    );
}
