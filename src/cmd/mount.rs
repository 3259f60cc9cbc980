//! `naiad mount`, `naiad umount`, `naiad stats`, `naiad daemon ...`: flags
//! turned into one [`DaemonConfig`], handed whole to
//! `naiad_fuse::launcher` (which starts the mount's supervisor, `naiad
//! daemon supervise`, and returns once the mount is served, or with the
//! supervisor's error), as `naiad run` and the containerd snapshotter do.
//! The supervisor owns the `/dev/fuse` connection and runs, restarts and
//! upgrades the serving daemon (`naiad daemon serve`; see
//! `naiad_fuse::supervisor`). `naiad mount --foreground` runs the
//! supervisor in this process. `naiad umount` unmounts and waits for
//! supervisor and daemon to exit; `naiad stats` asks the daemon's stats
//! socket.
//!
//! Startup options (shared with `naiad run`): the daemon prefetches the
//! image's prefetch table at mount (`--no-prefetch`, `--prefetch-threads`,
//! `--prefetch-rate`, `--fetch-all`), can record the reads as a trace for
//! `naiad convert --prefetch-list` (`--record-trace`), and can serve its
//! metrics over HTTP on a unix socket (`--api-socket`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use naiad_fuse::daemon::{self, CacheConfig, MountConfig, ServeConfig};
use naiad_fuse::launcher;
use naiad_fuse::runtime_paths::{canonical_mountpoint, RuntimePaths, DEFAULT_RUN_DIR};
use naiad_fuse::supervisor::{self, SupervisorOptions};
use naiad_fuse::PrefetchConfig;
use naiad_fuse::{mountinfo, DaemonConfig, ProgramLoad, FSTYPE};

use crate::cmd::parse_size;
use naiad_registry::ImageRef;

/// Options shared by `mount` and `run`: caches and the daemon's files.
#[derive(Args, Clone, Debug)]
pub struct DaemonOptions {
    /// Persistent chunk cache directory (shared by mounts, survives restarts).
    #[arg(long, value_name = "DIR", default_value = "/var/cache/naiad")]
    pub cache_dir: PathBuf,
    /// Size cap of the persistent chunk cache, e.g. 2G; 0 disables it.
    #[arg(long, value_name = "SIZE", default_value = "2G", value_parser = parse_size)]
    pub cache_size: u64,
    /// Memory for decompressed chunks, e.g. 256M.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub memory_cache: u64,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
    /// Seconds the kernel may cache entries and attributes (the image never changes).
    #[arg(long, value_name = "SECS", default_value_t = 86400)]
    pub attr_timeout: u64,
    /// Directory for the daemon's control socket, pid file and log
    /// [default: $NAIAD_RUN_DIR or /run/naiad].
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Record the files and byte ranges read, in first-access order, to FILE
    /// (JSON lines, for `naiad convert --prefetch-list`); written while
    /// mounted and completed at unmount.
    #[arg(long, value_name = "FILE")]
    pub record_trace: Option<PathBuf>,
    /// How to reach the image's registry (docker:// images).
    #[command(flatten)]
    pub registry: crate::cmd::registry_flags::RegistryFlags,
    /// Do not fetch the image's prefetch table (startup set) at mount.
    #[arg(long)]
    pub no_prefetch: bool,
    /// Prefetch requests running at once.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub prefetch_threads: u16,
    /// Bandwidth cap of prefetching in bytes per second, e.g. 20M; 0: unlimited.
    #[arg(long, value_name = "RATE", default_value = "0", value_parser = parse_size)]
    pub prefetch_rate: u64,
    /// After the prefetch set, fetch the rest of the image into the caches
    /// in the background, at low priority.
    #[arg(long)]
    pub fetch_all: bool,
    /// Serve HTTP on this unix socket: GET /metrics (Prometheus text), GET /stats (JSON).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Kernel FUSE passthrough: opens of files whose backing file is in
    /// the cache are served by the kernel from it (each open then costs a
    /// round trip to the daemon; without this flag opens cost none).
    #[arg(long)]
    pub passthrough: bool,
    /// Largest window the daemon reads ahead of a file read sequentially
    /// (starting at 512K, doubling), e.g. 8M; 0 disables read-ahead.
    #[arg(long, value_name = "SIZE", default_value = "8M", value_parser = parse_size)]
    pub read_ahead_max: u64,
}

impl DaemonOptions {
    pub fn run_dir(&self) -> PathBuf {
        run_dir(&self.run_dir)
    }

    pub fn prefetch_config(&self) -> PrefetchConfig {
        PrefetchConfig {
            enabled: !self.no_prefetch,
            threads: self.prefetch_threads as usize,
            rate: (self.prefetch_rate > 0).then_some(self.prefetch_rate),
            fetch_all: self.fetch_all,
        }
    }

    /// The whole configuration of a daemon serving `source` on the
    /// canonical `mountpoint`, every path made absolute (daemons work from /).
    pub fn daemon_config(&self, source: &str, mountpoint: &Path, mount: MountConfig, log_file: Option<&Path>) -> Result<DaemonConfig> {
        let cwd = std::env::current_dir().context("finding the current directory")?;
        let abs = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { cwd.join(p) };
        let source = match ImageRef::parse(source).with_context(|| format!("image {source}"))? {
            ImageRef::Layout { dir, tag } => ImageRef::Layout { dir: abs(&dir), tag }.to_string(),
            _ => source.to_string(),
        };
        let runtime = RuntimePaths::new(&abs(&self.run_dir()), mountpoint);
        let log_file = log_file.map(abs).unwrap_or_else(|| runtime.log_file.clone());
        Ok(DaemonConfig {
            source: source.clone(),
            registry: self.registry.options()?,
            serve: ServeConfig {
                mountpoint: mountpoint.to_path_buf(),
                source,
                mount: MountConfig {
                    threads: self.threads as usize,
                    ttl: Duration::from_secs(self.attr_timeout),
                    passthrough: self.passthrough,
                    read_ahead_max: self.read_ahead_max,
                    ..mount
                },
                cache: CacheConfig { memory_bytes: self.memory_cache, disk_dir: (self.cache_size > 0).then(|| abs(&self.cache_dir)), disk_bytes: self.cache_size },
                runtime,
                prefetch: self.prefetch_config(),
                merge: self.registry.merge_limits(),
                record_trace: self.record_trace.as_deref().map(abs),
                api_socket: self.api_socket.as_deref().map(abs),
            },
            log_file,
        })
    }
}

/// `--run-dir`, else `$NAIAD_RUN_DIR`, else /run/naiad.
pub(crate) fn run_dir(arg: &Option<PathBuf>) -> PathBuf {
    match (arg, std::env::var_os("NAIAD_RUN_DIR")) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(DEFAULT_RUN_DIR),
    }
}

#[derive(Args)]
pub struct MountArgs {
    /// The image: oci:DIR[:TAG]
    pub source: String,
    /// An existing directory to mount on.
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub daemon: DaemonOptions,
    /// Stay attached: serve in this process until unmounted (SIGINT/SIGTERM unmount).
    #[arg(long)]
    pub foreground: bool,
    /// Honor setuid/setgid bits of the image's files (default: nosuid).
    #[arg(long)]
    pub suid: bool,
    /// Let device nodes in the image be opened as devices (default: nodev).
    #[arg(long)]
    pub dev: bool,
    /// Only the mounting user may access the mount (default: allow_other).
    #[arg(long)]
    pub private: bool,
    /// Log file of the background daemon (default: RUN_DIR/<id>.log).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Seconds to wait for the mount to become ready.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
    /// Load this program (a path in the image, or a name on the image's
    /// PATH) and the shared libraries it needs at mount, as `naiad run`
    /// does for its command; not for an image with a startup set.
    #[arg(long, value_name = "PROGRAM")]
    pub load_program: Option<String>,
}

#[derive(Subcommand)]
pub enum DaemonCommand {
    /// Replace the daemon serving a mount with one started from another
    /// binary, without interrupting the mount's users.
    Upgrade(UpgradeArgs),
    /// Internal: the supervisor of a mount (its configuration as JSON on stdin).
    #[command(hide = true)]
    Supervise,
    /// Internal: a daemon started by a supervisor (its channel on fd 3).
    #[command(hide = true)]
    Serve,
}

#[derive(Args)]
pub struct UpgradeArgs {
    pub mountpoint: PathBuf,
    /// The naiad binary to serve the mount from now on [default: this one].
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Directory of the mount's control socket [default: $NAIAD_RUN_DIR or /run/naiad].
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct UmountArgs {
    pub mountpoint: PathBuf,
    /// Detach even if busy; the daemon exits when the last user is gone.
    #[arg(long, short = 'l')]
    pub lazy: bool,
    /// Seconds to wait for the daemon to exit.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
    /// Directory of the daemon's control socket and pid file [default: $NAIAD_RUN_DIR or /run/naiad].
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct StatsArgs {
    pub mountpoint: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Print the counters in Prometheus text format instead.
    #[arg(long, conflicts_with = "json")]
    pub prometheus: bool,
    /// Directory of the daemon's control socket [default: $NAIAD_RUN_DIR or /run/naiad].
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
}

/// Resolves and checks a mountpoint for mounting: it must exist, be a
/// directory and not already carry a naiad mount.
pub(crate) fn prepare_mountpoint(path: &Path) -> Result<PathBuf> {
    let mp = path.canonicalize().with_context(|| format!("mountpoint {}", path.display()))?;
    if !mp.is_dir() {
        bail!("mountpoint {} is not a directory", path.display());
    }
    if let Some(m) = mountinfo::find(&mp).context("reading /proc/self/mountinfo")? {
        if m.fstype == FSTYPE {
            bail!("{} is already a naiad mount; unmount it first (naiad umount {})", mp.display(), mp.display());
        }
    }
    Ok(mp)
}

pub fn mount(a: MountArgs) -> Result<i32> {
    ImageRef::parse(&a.source).with_context(|| format!("image {}", a.source))?;
    let mp = prepare_mountpoint(&a.mountpoint)?;
    daemon::check_fuse_device()?;
    let program = a.load_program.clone().map(ProgramLoad::Named).unwrap_or_default();
    let mount = MountConfig { allow_other: !a.private, suid: a.suid, dev: a.dev, program, ..MountConfig::default() };
    let config = a.daemon.daemon_config(&a.source, &mp, mount, a.log_file.as_deref())?;
    if a.foreground {
        let options = SupervisorOptions { exe: std::env::current_exe().context("finding the naiad executable")?, log_to_file: false };
        supervisor::supervise(config, options, || {}).with_context(|| format!("serving {} on {}", a.source, mp.display()))?;
        return Ok(0);
    }
    let exe = std::env::current_exe().context("finding the naiad executable")?;
    launcher::launch(&config, &exe, Duration::from_secs(a.timeout), &|| false)?;
    Ok(0)
}

/// `naiad daemon ...`.
pub fn daemon_command(c: DaemonCommand) -> Result<i32> {
    match c {
        DaemonCommand::Upgrade(a) => upgrade(a),
        DaemonCommand::Supervise => {
            launcher::supervise_from_stdin(std::env::current_exe().context("finding the naiad executable")?)?;
            Ok(0)
        }
        DaemonCommand::Serve => {
            use std::os::fd::{FromRawFd, OwnedFd};
            // SAFETY: the supervisor started us with our channel as this
            // descriptor, and nothing else in this process owns it.
            let channel = unsafe { OwnedFd::from_raw_fd(naiad_fuse::handoff::DAEMON_CHANNEL_FD) };
            // Keep no directory busy; every path in the handoff is absolute.
            std::env::set_current_dir("/").context("changing to /")?;
            naiad_fuse::run_daemon(channel)?;
            Ok(0)
        }
    }
}

fn upgrade(a: UpgradeArgs) -> Result<i32> {
    let mp = canonical_mountpoint(&a.mountpoint).with_context(|| format!("mountpoint {}", a.mountpoint.display()))?;
    let binary = match &a.binary {
        Some(b) => b.canonicalize().with_context(|| format!("binary {}", b.display()))?,
        None => std::env::current_exe().context("finding the naiad executable")?,
    };
    let paths = RuntimePaths::new(&run_dir(&a.run_dir), &mp);
    let pid = supervisor::request_upgrade(&paths.control, &binary).with_context(|| format!("upgrading the daemon of {}", mp.display()))?;
    outln!("{pid}");
    Ok(0)
}

pub fn umount(a: UmountArgs) -> Result<i32> {
    let mp = canonical_mountpoint(&a.mountpoint).with_context(|| format!("mountpoint {}", a.mountpoint.display()))?;
    match launcher::unmount_and_wait(&run_dir(&a.run_dir), &mp, a.lazy, Duration::from_secs(a.timeout)) {
        Ok(_) => Ok(0),
        Err(naiad_fuse::FuseError::Unmount { source: nix::Error::EBUSY, .. }) => {
            bail!("{} is busy (files open or processes inside); close them, or detach it with `naiad umount --lazy`", mp.display())
        }
        Err(e) => Err(e.into()),
    }
}

pub fn stats(a: StatsArgs) -> Result<i32> {
    let mp = canonical_mountpoint(&a.mountpoint).with_context(|| format!("mountpoint {}", a.mountpoint.display()))?;
    let paths = RuntimePaths::new(&run_dir(&a.run_dir), &mp);
    let not_naiad = || match mountinfo::find(&mp) {
        Ok(Some(m)) if m.fstype == FSTYPE => format!("the daemon of {} does not answer on {}", mp.display(), paths.socket.display()),
        Ok(Some(m)) => format!("{} is not a naiad mount (it is {})", mp.display(), m.fstype),
        _ => format!("{} is not mounted", mp.display()),
    };
    let text = if a.prometheus {
        naiad_fuse::stats_server::query(&paths.socket, "metrics").with_context(not_naiad)?
    } else {
        let report = naiad_fuse::query_stats(&paths.socket).with_context(not_naiad)?;
        if a.json {
            serde_json::to_string_pretty(&report).context("encoding JSON")? + "\n"
        } else {
            report.render_text()
        }
    };
    outln!("{}", text.trim_end_matches('\n'));
    Ok(0)
}
