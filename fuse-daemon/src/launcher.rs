//! Starting and stopping background mounts: the one API `naiad mount`,
//! `naiad run` and the containerd snapshotter start daemons through.
//!
//! [`launch`] starts a mount's supervisor (the naiad binary as
//! `naiad daemon supervise`, in its own session, the whole
//! [`DaemonConfig`] as JSON on its stdin, never on a command line) and
//! returns once the mount is served, or with why it could not be. Its
//! stderr is a pipe until the mount is served, so an early failure (a bad
//! image, no /dev/fuse) comes back as the error; after that it logs to the
//! config's log file. The supervisor outlives the caller.
//!
//! [`supervise_from_stdin`] is the other end: the supervisor process
//! reading that config.
//!
//! [`unmount_and_wait`] unmounts and waits for the supervisor and daemon
//! to exit; [`serving`] tells whether a mount is still served by a live
//! daemon (a restarted snapshotter uses it to reattach).

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::daemon;
use crate::error::FuseError;
use crate::handoff::DaemonConfig;
use crate::runtime_paths::RuntimePaths;
use crate::{mountinfo, FSTYPE};

/// The arguments that make the naiad binary a mount's supervisor.
pub const SUPERVISE_ARGS: [&str; 2] = ["daemon", "supervise"];

/// A mount [`launch`] started; its supervisor runs on after the caller exits.
#[derive(Debug, Clone, Copy)]
pub struct LaunchedMount {
    /// The supervisor's pid.
    pub pid: i32,
}

/// Starts the supervisor of `config`'s mount from the naiad binary `exe`
/// and waits until the mount is served. `stop` is asked while waiting:
/// when it says so, the supervisor is stopped (it unmounts and ends its
/// daemon) and an error returned, as on `timeout`.
pub fn launch(config: &DaemonConfig, exe: &Path, timeout: Duration, stop: &dyn Fn() -> bool) -> Result<LaunchedMount, FuseError> {
    let mp = &config.serve.mountpoint;
    let log_file = &config.log_file;
    let fail = |msg: String| FuseError::Launch(msg);
    if let Some(dir) = config.serve.runtime.pid_file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("creating the run directory {}: {e}", dir.display())))?;
    }
    let mut cmd = Command::new(exe);
    cmd.args(SUPERVISE_ARGS).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    if std::env::var_os("RUST_LOG").is_none() {
        // The daemon's log file gets its lifecycle at least.
        let level = tracing::level_filters::LevelFilter::current();
        let level = if level < tracing::level_filters::LevelFilter::INFO { "info".to_string() } else { level.to_string().to_lowercase() };
        // fuser logs, as errors, replies the kernel no longer wants: a
        // request interrupted (a reader killed) or the mount gone. Nothing
        // to act on, and `naiad run` would report them as problems.
        cmd.env("RUST_LOG", format!("{level},fuser::reply=off"));
    }
    // Plain text in log files.
    cmd.env("NO_COLOR", "1");
    // SAFETY: setsid is async-signal-safe; it detaches the supervisor from
    // our terminal and process group so it outlives us undisturbed.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
    }
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| fail(format!("starting the supervisor ({}): {e}", exe.display())))?;
    let pid = child.id() as i32;
    // Never leave a supervisor or a mount behind once we give up on it.
    let abandon = |child: &mut std::process::Child, msg: String| -> FuseError {
        // SIGTERM: the supervisor unmounts and ends its daemon (SIGKILL
        // would leave the daemon serving).
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
        if !wait_for_exit(child.id() as i32, Duration::from_secs(15)) {
            let _ = child.kill();
        }
        let _ = child.wait();
        if is_naiad_mount(mp) {
            let _ = daemon::unmount(mp, true);
        }
        fail(msg)
    };
    {
        // The configuration (credentials included) travels on a pipe.
        let sent = serde_json::to_vec(config)
            .map_err(|e| format!("encoding the daemon configuration: {e}"))
            .and_then(|json| child.stdin.take().ok_or_else(|| "no supervisor stdin pipe".to_string()).map(|s| (json, s)))
            .and_then(|(json, mut stdin)| stdin.write_all(&json).map_err(|e| format!("sending the supervisor its configuration: {e}")));
        if let Err(msg) = sent {
            return Err(abandon(&mut child, msg));
        }
    }
    let Some(mut stderr) = child.stderr.take() else {
        return Err(abandon(&mut child, "no supervisor stderr pipe".into()));
    };
    // The pipe closes when the mount is served (the supervisor redirects to
    // its log) or it exits; read it on a thread so a hung supervisor cannot
    // hang us.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = (&mut stderr).take(1 << 20).read_to_end(&mut out);
        let _ = tx.send(out);
    });
    let deadline = Instant::now() + timeout;
    let output = loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(out) => break String::from_utf8_lossy(&out).into_owned(),
            Err(_) if stop() => return Err(abandon(&mut child, format!("mounting {} on {}: stopped", config.source, mp.display()))),
            Err(_) if Instant::now() > deadline => {
                return Err(abandon(
                    &mut child,
                    format!("mounting {} on {}: the daemon did not become ready within {}s (log: {})", config.source, mp.display(), timeout.as_secs(), log_file.display()),
                ))
            }
            Err(_) => {}
        }
    };
    // The supervisor's own error line, else all it said.
    let message = || match output.lines().rev().find_map(|l| l.strip_prefix("naiad: error: ")) {
        Some(line) => line.trim().to_string(),
        None => output.trim().to_string(),
    };
    // Served once the pipe closed; the supervisor has exited if it failed.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait().map_err(|e| fail(format!("waiting for the supervisor: {e}")))? {
            let msg = message();
            if msg.is_empty() {
                return Err(fail(format!(
                    "mounting {} on {}: the supervisor exited ({status}) before the mount was ready; see {}",
                    config.source,
                    mp.display(),
                    log_file.display()
                )));
            }
            return Err(fail(msg));
        }
        if is_naiad_mount(mp) {
            break;
        }
        if Instant::now() > deadline {
            let msg = message();
            let detail = if msg.is_empty() { String::new() } else { format!(": {msg}") };
            return Err(abandon(&mut child, format!("mounting {} on {}: the mount did not appear although the supervisor is running{detail}", config.source, mp.display())));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if !output.trim().is_empty() {
        // What the supervisor said before it was ready belongs in its log;
        // warnings and errors are shown here too.
        if let Ok(mut log) = OpenOptions::new().create(true).append(true).mode(0o640).open(log_file) {
            let _ = log.write_all(output.as_bytes());
        }
        for line in output.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")) {
            eprintln!("{line}");
        }
    }
    tracing::debug!("mount of {} on {} ready in {:?} (supervisor pid {pid})", config.source, mp.display(), start.elapsed());
    Ok(LaunchedMount { pid })
}

/// The supervisor's side of [`launch`] (`naiad daemon supervise`, the
/// naiad binary `exe`): reads the [`DaemonConfig`] from stdin, serves the
/// mount, and once it is served sends its output to the log file (which
/// closes the pipe [`launch`] waits on).
pub fn supervise_from_stdin(exe: PathBuf) -> Result<(), FuseError> {
    let mut json = Vec::new();
    std::io::stdin().lock().take(16 << 20).read_to_end(&mut json).map_err(|e| FuseError::Launch(format!("reading the daemon configuration from stdin: {e}")))?;
    let config: DaemonConfig = serde_json::from_slice(&json).map_err(|e| FuseError::Launch(format!("parsing the daemon configuration: {e}")))?;
    std::env::set_current_dir("/").map_err(|e| FuseError::Launch(format!("changing to /: {e}")))?;
    let log_file = config.log_file.clone();
    let options = crate::supervisor::SupervisorOptions { exe, log_to_file: true };
    let mut redirect_error = None;
    crate::supervisor::supervise(config, options, || redirect_error = redirect_output(&log_file).err())?;
    if let Some(e) = redirect_error {
        tracing::warn!("could not redirect output to {}: {e}", log_file.display());
    }
    Ok(())
}

/// Points stdout and stderr at `log` (append) and stdin at /dev/null.
fn redirect_output(log: &Path) -> Result<(), FuseError> {
    use std::os::fd::AsRawFd;
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(|source| FuseError::Io { path: dir.to_path_buf(), source })?;
    }
    let file = OpenOptions::new().create(true).append(true).mode(0o640).open(log).map_err(|source| FuseError::Io { path: log.to_path_buf(), source })?;
    let null = OpenOptions::new().read(true).open("/dev/null").map_err(|source| FuseError::Io { path: "/dev/null".into(), source })?;
    for (from, to) in [(file.as_raw_fd(), 1), (file.as_raw_fd(), 2), (null.as_raw_fd(), 0)] {
        // SAFETY: dup2 on descriptors we own; it closes `to` atomically.
        if unsafe { libc::dup2(from, to) } < 0 {
            return Err(FuseError::Io { path: log.to_path_buf(), source: std::io::Error::last_os_error() });
        }
    }
    Ok(())
}

/// Whether `mp` (canonical) carries a naiad mount now.
pub fn is_naiad_mount(mp: &Path) -> bool {
    matches!(mountinfo::find(mp), Ok(Some(m)) if m.fstype == FSTYPE)
}

/// Whether `mp` is a naiad mount whose daemon answers on its stats socket.
pub fn serving(run_dir: &Path, mp: &Path) -> bool {
    is_naiad_mount(mp) && crate::query_stats(&RuntimePaths::new(run_dir, mp).socket).is_ok()
}

/// Whether process `pid` is alive (a zombie is not).
pub fn process_alive(pid: i32) -> bool {
    // A zombie has exited too; its state letter in /proc/PID/stat is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits until process `pid` is gone; false on timeout. Wakes as soon as
/// it exits (polling a pidfd of it), or checks every 10 ms where a pidfd
/// cannot be had.
pub fn wait_for_exit(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    // SAFETY: pidfd_open takes a pid and flags, and returns a new file
    // descriptor (owned from here on) or -1.
    let pidfd = match unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } {
        fd if fd >= 0 => Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
        _ => None,
    };
    while process_alive(pid) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match &pidfd {
            // Readable once the process has exited.
            Some(fd) => {
                let wait = PollTimeout::try_from(left.min(Duration::from_millis(100))).unwrap_or(PollTimeout::MAX);
                let _ = poll(&mut [PollFd::new(fd.as_fd(), PollFlags::POLLIN)], wait);
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    true
}

/// How [`unmount_and_wait`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// Unmounted, and its supervisor and daemon have exited.
    Done,
    /// Detached (`lazy`) while in use: served until its last user is gone.
    Detached,
}

/// Unmounts the naiad mount on `mp` (canonical) and waits up to `timeout`
/// for its supervisor and daemon to exit; then removes the run files a
/// killed supervisor could not.
pub fn unmount_and_wait(run_dir: &Path, mp: &Path, lazy: bool, timeout: Duration) -> Result<Unmounted, FuseError> {
    match mountinfo::find(mp).map_err(|source| FuseError::Io { path: PathBuf::from("/proc/self/mountinfo"), source })? {
        None => return Err(FuseError::NotMounted(mp.to_path_buf())),
        Some(m) if m.fstype != FSTYPE => return Err(FuseError::NotNaiad { path: mp.to_path_buf(), fstype: m.fstype }),
        Some(_) => {}
    }
    let paths = RuntimePaths::new(run_dir, mp);
    // The supervisor, and the daemon serving now (it outlives a dead
    // supervisor until the unmount).
    let supervisor = paths.read_pid();
    let serving = crate::query_stats(&paths.socket).ok().map(|r| r.pid as i32);
    daemon::unmount(mp, lazy)?;
    let pids: Vec<i32> = supervisor.into_iter().chain(serving).collect();
    if lazy && !is_naiad_mount(mp) && pids.iter().any(|&p| process_alive(p)) {
        return Ok(Unmounted::Detached);
    }
    for pid in pids {
        if !wait_for_exit(pid, timeout) {
            return Err(FuseError::Launch(format!("unmounted {}, but its daemon (pid {pid}) has not exited after {}s", mp.display(), timeout.as_secs())));
        }
    }
    for path in [&paths.pid_file, &paths.control, &paths.counters, &paths.opens, &paths.socket] {
        let _ = std::fs::remove_file(path);
    }
    Ok(Unmounted::Done)
}
