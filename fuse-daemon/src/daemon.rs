//! [`serve`]: mounts an opened naiad image and runs its FUSE session until
//! the filesystem is unmounted (by `naiad umount`, `umount`, or SIGTERM /
//! SIGINT / SIGHUP, which make the daemon unmount itself), then flushes the
//! disk cache and removes its control socket and pid file.
//!
//! Alongside the session: the [`Prefetcher`] starts fetching the image's
//! startup set as soon as the mount exists, the [`TraceRecorder`] writes the
//! reads to a trace file (`--record-trace`; final write after unmount), and
//! the control socket and the HTTP API socket (`--api-socket`) serve the
//! counters.
//!
//! This is process-level code: with `handle_signals` it blocks those
//! signals in the calling thread (and so in every thread it starts) and
//! waits for them on a dedicated thread.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL};
use naiad_registry::NaiadImage;
use nix::mount::MntFlags;
use nix::sys::signal::{SigSet, Signal};

use crate::chunk_cache::ChunkCache;
use crate::counters::Counters;
use crate::disk_cache::DiskCache;
use crate::error::{FuseError, IoContext};
use crate::fetcher::StoreChunkFetcher;
use crate::filesystem::NaiadFs;
use crate::memory_cache::MemoryCache;
use crate::metrics_server::MetricsServer;
use crate::prefetcher::{PrefetchConfig, Prefetcher};
use crate::runtime_paths::RuntimePaths;
use crate::stats_server::{CacheUsage, StatsReport, StatsServer};
use crate::trace_recorder::TraceRecorder;
use crate::FSNAME;

/// How the filesystem is mounted.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// FUSE worker threads.
    pub threads: usize,
    /// How long the kernel may cache entries and attributes.
    pub ttl: Duration,
    /// Let every user (not only the daemon's) use the mount.
    pub allow_other: bool,
    /// Have fusermount3 unmount if the daemon dies (falls back to a plain
    /// mount if that does not work).
    pub auto_unmount: bool,
    /// Honor setuid/setgid bits (off by default: `nosuid`).
    pub suid: bool,
    /// Allow device nodes to be opened as devices (off by default: `nodev`).
    pub dev: bool,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig { threads: 4, ttl: Duration::from_secs(86400), allow_other: true, auto_unmount: true, suid: false, dev: false }
    }
}

/// The chunk caches of a mount.
#[derive(Debug, Clone)]
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

/// Everything [`serve`] needs besides the image.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Canonical path of the mountpoint.
    pub mountpoint: PathBuf,
    /// The image reference as the user gave it (for stats and logs).
    pub source: String,
    pub mount: MountConfig,
    pub cache: CacheConfig,
    /// Control socket and pid file; `None` runs without them.
    pub runtime: Option<RuntimePaths>,
    /// Unmount on SIGTERM, SIGINT and SIGHUP.
    pub handle_signals: bool,
    /// Prefetch at mount and `--fetch-all`.
    pub prefetch: PrefetchConfig,
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

fn fuser_config(m: &MountConfig, auto_unmount: bool) -> Config {
    let mut options = vec![
        MountOption::FSName(FSNAME.into()),
        // A kernel option (not fuser's Subtype, which only fusermount
        // honors) so the type reads fuse.naiad on every mount path.
        MountOption::CUSTOM(format!("subtype={FSNAME}")),
        MountOption::RO,
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        if m.suid { MountOption::Suid } else { MountOption::NoSuid },
        if m.dev { MountOption::Dev } else { MountOption::NoDev },
    ];
    if auto_unmount {
        options.push(MountOption::AutoUnmount);
    }
    let mut c = Config::default();
    c.mount_options = options;
    c.acl = if m.allow_other { SessionACL::All } else { SessionACL::Owner };
    c.n_threads = Some(m.threads.max(1));
    c.clone_fd = true;
    c
}

/// Mounts `image` on `config.mountpoint`, calls `on_ready` once the kernel
/// has initialized the mount, and serves it until it is unmounted.
pub fn serve(image: NaiadImage, config: &ServeConfig, on_ready: impl FnOnce()) -> Result<(), FuseError> {
    let mp = &config.mountpoint;
    check_fuse_device()?;
    let meta = std::fs::metadata(mp).map_err(|source| FuseError::Mountpoint { path: mp.clone(), source })?;
    if !meta.is_dir() {
        return Err(FuseError::NotADirectory(mp.clone()));
    }
    let signals = {
        let mut s = SigSet::empty();
        s.add(Signal::SIGTERM);
        s.add(Signal::SIGINT);
        s.add(Signal::SIGHUP);
        s
    };
    if config.handle_signals {
        signals.thread_block().map_err(|e| FuseError::Io { path: mp.clone(), source: e.into() })?;
    }

    let start = Instant::now();
    let counters = Arc::new(Counters::default());
    let disk = match &config.cache.disk_dir {
        Some(dir) if config.cache.disk_bytes > 0 => Some(DiskCache::open(dir, config.cache.disk_bytes, counters.clone())?),
        _ => None,
    };
    let image = Arc::new(image);
    let blob_bytes: u64 = image.bootstrap.blobs().map(|b| b.iter().map(|b| b.size).sum()).unwrap_or(0);
    let fetcher = Arc::new(StoreChunkFetcher::new(image.clone()));
    let chunks = Arc::new(ChunkCache::new(fetcher, MemoryCache::new(config.cache.memory_bytes), disk, counters.clone()));
    let recorder = match &config.record_trace {
        Some(path) => Some(TraceRecorder::start(path, image.clone(), counters.clone())?),
        None => None,
    };
    let new_fs = || NaiadFs::new(image.clone(), chunks.clone(), config.mount.ttl).with_recorder(recorder.clone());

    let session = match Session::new(new_fs(), mp, &fuser_config(&config.mount, config.mount.auto_unmount)) {
        Ok(s) => s,
        Err(e) if config.mount.auto_unmount => {
            tracing::warn!("mounting with auto_unmount failed ({e}); mounting without it");
            Session::new(new_fs(), mp, &fuser_config(&config.mount, false)).map_err(|source| FuseError::Mount { path: mp.clone(), source })?
        }
        Err(source) => return Err(FuseError::Mount { path: mp.clone(), source }),
    };
    tracing::info!("mounted {} on {} in {:?}", config.source, mp.display(), start.elapsed());

    // From here on, an early return drops the session, which unmounts (and
    // the prefetcher and servers, which stop).
    let prefetcher = Prefetcher::start(image.clone(), chunks.clone(), config.prefetch.clone(), start)?;
    let report = {
        let (chunks, mountpoint, source) = (chunks.clone(), mp.display().to_string(), config.source.clone());
        let trace_file = config.record_trace.as_ref().map(|p| p.display().to_string());
        Arc::new(move || StatsReport {
            mountpoint: mountpoint.clone(),
            source: source.clone(),
            pid: std::process::id(),
            uptime_secs: start.elapsed().as_secs_f64(),
            blob_bytes,
            counters: chunks.snapshot(),
            read_latency: chunks.counters().read_latency.snapshot(),
            prefetch: chunks.counters().prefetch_snapshot(),
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
    };
    let mut stats = None;
    if let Some(rt) = &config.runtime {
        let report = report.clone();
        stats = Some(StatsServer::start(&rt.socket, move || report())?);
        std::fs::write(&rt.pid_file, format!("{}\n", std::process::id())).at(&rt.pid_file)?;
    }
    let api = match &config.api_socket {
        Some(path) => {
            let report = report.clone();
            Some(MetricsServer::start(path, move || report())?)
        }
        None => None,
    };

    if config.handle_signals {
        let target = mp.clone();
        std::thread::Builder::new()
            .name("naiad-signals".into())
            .spawn(move || loop {
                let Ok(sig) = signals.wait() else { continue };
                tracing::info!("{sig}: unmounting {}", target.display());
                match unmount(&target, false) {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!("{e}; detaching it instead (it goes away when no longer used)");
                        match unmount(&target, true) {
                            Ok(()) => break,
                            Err(e) => tracing::error!("{e}"),
                        }
                    }
                }
            })
            .at(mp)?;
    }

    on_ready();
    let result = session.run().map_err(|source| FuseError::Session { path: mp.clone(), source });
    if let Some(p) = prefetcher {
        p.stop();
    }
    if let Some(r) = &recorder {
        match r.finish() {
            Ok(()) => tracing::info!("trace: {} records written to {}", r.records(), r.path().display()),
            Err(e) => tracing::error!("trace: {e}"),
        }
    }
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
    chunks.flush();
    if let Some(s) = stats {
        s.stop();
    }
    if let Some(a) = api {
        a.stop();
    }
    if let Some(rt) = &config.runtime {
        let _ = std::fs::remove_file(&rt.pid_file);
    }
    result
}
