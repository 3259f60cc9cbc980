//! `naiad mount`, `naiad umount`, `naiad stats`.
//!
//! `naiad mount SRC MOUNTPOINT` starts a daemon (this binary again, with
//! `--foreground`, in its own session) and returns once the mount is ready.
//! The daemon's stderr is a pipe to the parent until the mount is up, so an
//! early failure (bad image, missing /dev/fuse, ...) is reported by the
//! parent with a non-zero exit; after that the daemon logs to a file in the
//! run directory. `naiad umount` unmounts and waits for the daemon to exit;
//! `naiad stats` asks the daemon's control socket for its counters.
//!
//! Startup options (shared with `naiad run`): the daemon prefetches the
//! image's prefetch table at mount (`--no-prefetch`, `--prefetch-threads`,
//! `--prefetch-rate`, `--fetch-all`), can record the reads as a trace for
//! `naiad convert --prefetch-list` (`--record-trace`), and can serve its
//! metrics over HTTP on a unix socket (`--api-socket`).

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use naiad_fuse::daemon::{self, CacheConfig, MountConfig, ServeConfig};
use naiad_fuse::PrefetchConfig;
use naiad_fuse::runtime_paths::{canonical_mountpoint, RuntimePaths, DEFAULT_RUN_DIR};
use naiad_fuse::{mountinfo, FSTYPE};

use crate::cmd::parse_size;
use naiad_registry::{ImageRef, NaiadImage};

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
            ..PrefetchConfig::default()
        }
    }

    /// The arguments that give a daemon these startup options, with paths
    /// made absolute against `abs`.
    fn startup_args(&self, abs: impl Fn(&Path) -> PathBuf) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--prefetch-threads".into(), self.prefetch_threads.to_string().into(), "--prefetch-rate".into(), self.prefetch_rate.to_string().into()];
        for (on, flag) in [(self.no_prefetch, "--no-prefetch"), (self.fetch_all, "--fetch-all")] {
            if on {
                args.push(flag.into());
            }
        }
        for (path, flag) in [(&self.record_trace, "--record-trace"), (&self.api_socket, "--api-socket")] {
            if let Some(p) = path {
                args.push(flag.into());
                args.push(abs(p).into_os_string());
            }
        }
        args
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
    /// Do not ask fusermount3 to unmount if the daemon dies.
    #[arg(long)]
    pub no_auto_unmount: bool,
    /// Log file of the background daemon (default: RUN_DIR/<id>.log).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Seconds to wait for the mount to become ready.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
    /// Internal: this process is the daemon a background mount started.
    #[arg(long, hide = true)]
    pub daemon_child: bool,
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
    let reference = ImageRef::parse(&a.source).with_context(|| format!("image {}", a.source))?;
    let mp = prepare_mountpoint(&a.mountpoint)?;
    daemon::check_fuse_device()?;
    if a.foreground {
        return serve_foreground(&a, &reference, &mp);
    }
    let paths = RuntimePaths::new(&a.daemon.run_dir(), &mp);
    let log = a.log_file.clone().unwrap_or_else(|| paths.log_file.clone());
    let spawn = DaemonSpawn {
        source: a.source.clone(),
        mountpoint: mp.clone(),
        options: a.daemon.clone(),
        extra: [(a.suid, "--suid"), (a.dev, "--dev"), (a.private, "--private"), (a.no_auto_unmount, "--no-auto-unmount")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, f)| OsString::from(f))
            .collect(),
        log_file: log,
        timeout: Duration::from_secs(a.timeout),
    };
    spawn_daemon(&spawn)?;
    Ok(0)
}

/// Serves the mount in this process until it is unmounted.
fn serve_foreground(a: &MountArgs, reference: &ImageRef, mp: &Path) -> Result<i32> {
    let run_dir = a.daemon.run_dir();
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating run directory {}", run_dir.display()))?;
    let paths = RuntimePaths::new(&a.daemon.run_dir(), mp);
    let log_file = a.log_file.clone().unwrap_or_else(|| paths.log_file.clone());
    let start = Instant::now();
    let image = NaiadImage::open_with(reference, &a.daemon.registry.options()?).with_context(|| format!("opening image {}", a.source))?;
    tracing::info!("opened {} ({} inodes, {} chunks) in {:?}", a.source, image.bootstrap.inode_count(), image.bootstrap.chunk_count(), start.elapsed());
    let config = ServeConfig {
        mountpoint: mp.to_path_buf(),
        source: a.source.clone(),
        mount: MountConfig {
            threads: a.daemon.threads as usize,
            ttl: Duration::from_secs(a.daemon.attr_timeout),
            allow_other: !a.private,
            auto_unmount: !a.no_auto_unmount,
            suid: a.suid,
            dev: a.dev,
        },
        cache: CacheConfig {
            memory_bytes: a.daemon.memory_cache,
            disk_dir: (a.daemon.cache_size > 0).then(|| a.daemon.cache_dir.clone()),
            disk_bytes: a.daemon.cache_size,
        },
        runtime: Some(paths),
        handle_signals: true,
        prefetch: a.daemon.prefetch_config(),
        record_trace: a.daemon.record_trace.clone(),
        api_socket: a.daemon.api_socket.clone(),
    };
    let daemon_child = a.daemon_child;
    if daemon_child {
        // Keep no directory busy; every path we were given is absolute.
        std::env::set_current_dir("/").context("changing to /")?;
    }
    let mut redirect_error = None;
    let served = daemon::serve(image, &config, || {
        if daemon_child {
            // The parent is waiting for our stderr to close: from now on
            // everything goes to the log file.
            redirect_error = redirect_output(&log_file).err();
        }
    });
    served.with_context(|| format!("serving {} on {}", a.source, mp.display()))?;
    if let Some(e) = redirect_error {
        tracing::warn!("could not redirect output to {}: {e:#}", log_file.display());
    }
    reap_children();
    Ok(0)
}

/// Points stdout and stderr at `log` (append) and stdin at /dev/null.
fn redirect_output(log: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = OpenOptions::new().create(true).append(true).mode(0o640).open(log).with_context(|| format!("opening log file {}", log.display()))?;
    let null = OpenOptions::new().read(true).open("/dev/null").context("opening /dev/null")?;
    for (from, to) in [(file.as_raw_fd(), 1), (file.as_raw_fd(), 2), (null.as_raw_fd(), 0)] {
        // SAFETY: dup2 on descriptors we own; it closes `to` atomically.
        if unsafe { libc::dup2(from, to) } < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("redirecting fd {to} to {}", log.display()));
        }
    }
    Ok(())
}

/// Waits for children this process started (fusermount3's auto-unmount
/// helper), so that once the daemon has exited nothing of it acts on the
/// mountpoint any more.
fn reap_children() {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                if Instant::now() > deadline {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(_) => continue,
            Err(_) => return, // ECHILD: none left
        }
    }
}

/// A background daemon to start.
pub(crate) struct DaemonSpawn {
    pub source: String,
    pub mountpoint: PathBuf,
    pub options: DaemonOptions,
    pub extra: Vec<OsString>,
    pub log_file: PathBuf,
    pub timeout: Duration,
}

/// The daemon [`spawn_daemon`] started; it runs on after this process exits.
pub(crate) struct SpawnedDaemon {
    pub pid: i32,
}

/// Starts `naiad mount --foreground` in a new session and waits until its
/// mount is ready, or reports why it failed.
pub(crate) fn spawn_daemon(s: &DaemonSpawn) -> Result<SpawnedDaemon> {
    let exe = std::env::current_exe().context("finding the naiad executable")?;
    // The daemon works from / (so it keeps no directory busy): give it
    // absolute paths.
    let cwd = std::env::current_dir().context("finding the current directory")?;
    let abs = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { cwd.join(p) };
    let source = match ImageRef::parse(&s.source) {
        Ok(ImageRef::Layout { dir, tag }) => ImageRef::Layout { dir: abs(&dir), tag }.to_string(),
        _ => s.source.clone(),
    };
    let mut options = s.options.clone();
    options.cache_dir = abs(&options.cache_dir);
    options.run_dir = Some(abs(&options.run_dir()));
    let o = &options;
    let mut cmd = Command::new(&exe);
    cmd.arg("mount")
        .arg("--foreground")
        .arg("--daemon-child")
        .arg("--cache-dir")
        .arg(&o.cache_dir)
        .arg("--cache-size")
        .arg(o.cache_size.to_string())
        .arg("--memory-cache")
        .arg(o.memory_cache.to_string())
        .arg("--threads")
        .arg(o.threads.to_string())
        .arg("--attr-timeout")
        .arg(o.attr_timeout.to_string())
        .arg("--run-dir")
        .arg(o.run_dir())
        .arg("--log-file")
        .arg(abs(&s.log_file))
        .args(o.startup_args(abs))
        .args(&s.extra)
        .arg("--")
        .arg(&source)
        .arg(&s.mountpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if std::env::var_os("RUST_LOG").is_none() {
        // The daemon's log file gets its lifecycle at least.
        let level = tracing::level_filters::LevelFilter::current();
        let level = if level < tracing::level_filters::LevelFilter::INFO { "info".to_string() } else { level.to_string().to_lowercase() };
        cmd.env("RUST_LOG", level);
    }
    // Plain text in log files.
    cmd.env("NO_COLOR", "1");
    // Registry options travel as environment variables, so credentials stay
    // off the daemon's command line.
    cmd.envs(o.registry.child_env());
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our
    // terminal and process group so it outlives us undisturbed.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
    }
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting the daemon ({})", exe.display()))?;
    let pid = child.id() as i32;
    let mut stderr = child.stderr.take().context("daemon stderr pipe")?;
    // The pipe closes when the daemon is ready (it redirects to its log) or
    // exits; read it on a thread so a hung daemon cannot hang us.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = (&mut stderr).take(1 << 20).read_to_end(&mut out);
        let _ = tx.send(out);
    });
    let fail = |child: &mut std::process::Child, msg: String| -> anyhow::Error {
        let _ = child.kill();
        let _ = child.wait();
        // Never leave a mount behind for a daemon we gave up on.
        if let Ok(Some(m)) = mountinfo::find(&s.mountpoint) {
            if m.fstype == FSTYPE {
                let _ = daemon::unmount(&s.mountpoint, true);
            }
        }
        anyhow::anyhow!(msg)
    };
    let output = match rx.recv_timeout(s.timeout) {
        Ok(out) => String::from_utf8_lossy(&out).into_owned(),
        Err(_) => return Err(fail(&mut child, format!("mounting {} on {}: the daemon did not become ready within {}s (log: {})", s.source, s.mountpoint.display(), s.timeout.as_secs(), s.log_file.display()))),
    };
    let message = || output.trim().trim_start_matches("naiad: error: ").to_string();
    // The daemon is ready once the mount shows up; it has exited if it failed.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait().context("waiting for the daemon")? {
            let msg = message();
            if msg.is_empty() {
                bail!("mounting {} on {}: the daemon exited ({status}) before the mount was ready; see {}", s.source, s.mountpoint.display(), s.log_file.display());
            }
            bail!("{msg}");
        }
        if mountinfo::find(&s.mountpoint).context("reading /proc/self/mountinfo")?.is_some_and(|m| m.fstype == FSTYPE) {
            break;
        }
        if Instant::now() > deadline {
            let msg = message();
            return Err(fail(&mut child, format!("mounting {} on {}: the mount did not appear although the daemon is running{}", s.source, s.mountpoint.display(), if msg.is_empty() { String::new() } else { format!(": {msg}") })));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if !output.trim().is_empty() {
        // What the daemon said before it was ready belongs in its log;
        // warnings and errors are shown here too.
        if let Ok(mut log) = OpenOptions::new().create(true).append(true).mode(0o640).open(&s.log_file) {
            let _ = log.write_all(output.as_bytes());
        }
        for line in output.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")) {
            eprintln!("{line}");
        }
    }
    tracing::debug!("mount of {} on {} ready in {:?} (daemon pid {pid})", s.source, s.mountpoint.display(), start.elapsed());
    Ok(SpawnedDaemon { pid })
}

fn process_alive(pid: i32) -> bool {
    // A zombie has exited too; its state letter in /proc/PID/stat is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits until process `pid` is gone; false on timeout.
pub(crate) fn wait_for_exit(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

pub fn umount(a: UmountArgs) -> Result<i32> {
    let mp = canonical_mountpoint(&a.mountpoint).with_context(|| format!("mountpoint {}", a.mountpoint.display()))?;
    match mountinfo::find(&mp).context("reading /proc/self/mountinfo")? {
        None => bail!("{} is not mounted", mp.display()),
        Some(m) if m.fstype != FSTYPE => bail!("{} is not a naiad mount (it is {})", mp.display(), m.fstype),
        Some(_) => {}
    }
    let paths = RuntimePaths::new(&run_dir(&a.run_dir), &mp);
    let pid = paths.read_pid();
    if let Err(e) = daemon::unmount(&mp, a.lazy) {
        if matches!(e, naiad_fuse::FuseError::Unmount { source: nix::Error::EBUSY, .. }) {
            bail!("{} is busy (files open or processes inside); close them, or detach it with `naiad umount --lazy`", mp.display());
        }
        return Err(e).context("unmounting");
    }
    if let Some(pid) = pid {
        if a.lazy && mountinfo::find(&mp).ok().flatten().is_none() && process_alive(pid) {
            // A detached mount stays served until its last user is gone.
            return Ok(0);
        }
        if !wait_for_exit(pid, Duration::from_secs(a.timeout)) {
            bail!("unmounted {}, but its daemon (pid {pid}) has not exited after {}s", mp.display(), a.timeout);
        }
    }
    Ok(0)
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
    print_stdout(&text)?;
    Ok(0)
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn print_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}
