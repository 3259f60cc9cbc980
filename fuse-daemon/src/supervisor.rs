//! [`supervise`]: the process that owns a mount.
//!
//! The supervisor mounts the filesystem itself ([`fuse_device::mount`]),
//! keeps the `/dev/fuse` descriptor for the mount's whole life, and runs
//! the serving daemon as a child process that gets the descriptor and its
//! whole configuration by fd passing ([`crate::handoff`]). Because the
//! supervisor holds the descriptor, the connection outlives any daemon:
//!
//! - **A daemon dies** (crash, `kill -9`): the supervisor asks the kernel to
//!   queue again the requests it had read but not answered
//!   ([`fuse_device::notify_resend`]) and starts a new daemon on the same
//!   descriptor, bootstrap and caches. Readers wait, then get their data;
//!   the mount never goes away. A daemon that dies before it is ready five
//!   times in a row is not started again: the mount is detached.
//! - **Live upgrade** (`naiad daemon upgrade`, a line `upgrade PATH` on the
//!   control socket): the new binary is started on the same descriptor;
//!   once it serves, the old daemon is killed and its unanswered requests
//!   resent to the new one. No request fails in between.
//! - **Stop** (SIGTERM, SIGINT, SIGHUP to the supervisor): it unmounts
//!   (detaching when busy), waits for the daemon and exits.
//! - **Unmount** (`naiad umount`, `umount`): the daemon's session ends, and
//!   the supervisor sees the connection gone and exits.
//! - **The supervisor dies**: the daemon keeps serving the mount, without
//!   failover, until it is unmounted; then it exits too.
//!
//! State a new daemon needs comes from disk: the bootstrap, the disk cache
//! and the shared counters file; the prefetch continues from what the disk
//! cache holds.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::Pid;

use crate::daemon::unmount;
use crate::error::{FuseError, IoContext};
use crate::fuse_device;
use crate::handoff::{self, DaemonConfig, DaemonMessage, Handoff, StartCause, DAEMON_CHANNEL_FD};
use crate::socket_server::SocketServer;

/// The arguments that make the naiad binary a daemon (`naiad daemon serve`),
/// its channel at [`DAEMON_CHANNEL_FD`].
pub const DAEMON_ARGS: [&str; 2] = ["daemon", "serve"];
/// Daemons in a row that may die before they are ready.
const MAX_FAILED_STARTS: u32 = 5;
/// How long a stopping supervisor waits for its daemon after unmounting.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an upgrade request waits for the new daemon.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(120);

/// How the supervisor runs.
#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    /// The binary daemons are started from (an upgrade replaces it).
    pub exe: PathBuf,
    /// Detached: daemons write to the log file, and so does the
    /// supervisor once the mount is ready. Otherwise all output stays on
    /// the supervisor's stderr.
    pub log_to_file: bool,
}

enum Event {
    Ready { generation: u64, pid: u32, init_request: Vec<u8> },
    Failed { generation: u64, message: String },
    Exited { generation: u64, status: Option<ExitStatus> },
    Signal(Signal),
    Upgrade { binary: PathBuf, reply: mpsc::Sender<Result<u32, String>> },
}

/// One daemon process the supervisor started.
#[derive(Debug)]
struct Daemon {
    generation: u64,
    pid: u32,
    ready: bool,
    exe: PathBuf,
}

struct Supervisor {
    config: DaemonConfig,
    options: SupervisorOptions,
    fuse: OwnedFd,
    events: mpsc::Sender<Event>,
    init_request: Option<Vec<u8>>,
    next_generation: u64,
    /// The daemon serving (or starting to serve) the mount.
    current: Option<Daemon>,
    /// An upgrade's new daemon, not ready yet, and whom to tell.
    upgrade: Option<(Daemon, mpsc::Sender<Result<u32, String>>)>,
    /// An upgraded-away daemon, killed, not yet reaped.
    retiring: Option<Daemon>,
    stopping: Option<Instant>,
    failed_starts: u32,
    /// Why the first daemon could not serve.
    first_failure: Option<String>,
    log_to_file: bool,
}

/// Mounts `config.serve.mountpoint`, starts its daemon, calls `on_ready`
/// once the daemon serves, and supervises the mount until it is unmounted
/// or the supervisor is told to stop. Returns an error if the first daemon
/// cannot serve (the mount is removed again).
pub fn supervise(config: DaemonConfig, options: SupervisorOptions, on_ready: impl FnOnce()) -> Result<(), FuseError> {
    let mp = config.serve.mountpoint.clone();
    let rt = config.serve.runtime.clone();
    let signals = {
        let mut s = SigSet::empty();
        for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            s.add(sig);
        }
        s
    };
    // Blocked here and so in every thread started below; waited for by
    // one of them. Children start with a clean mask.
    signals.thread_block().map_err(|e| FuseError::Io { path: mp.clone(), source: e.into() })?;
    if let Some(dir) = rt.pid_file.parent() {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    // A fresh mount counts from zero and has nothing open.
    let _ = std::fs::remove_file(&rt.counters);
    let _ = std::fs::remove_file(&rt.opens);
    let fuse = fuse_device::mount(&mp, &config.serve.mount)?;
    tracing::info!("mounted {} on {} (supervisor {})", config.source, mp.display(), std::process::id());
    std::fs::write(&rt.pid_file, format!("{}\n", std::process::id())).at(&rt.pid_file)?;

    let (tx, rx) = mpsc::channel();
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("naiad-signals".into())
            .spawn(move || loop {
                if let Ok(sig) = signals.wait() {
                    if tx.send(Event::Signal(sig)).is_err() {
                        break;
                    }
                }
            })
            .at(&mp)?;
    }
    let control = {
        let tx = tx.clone();
        SocketServer::start(&rt.control, "naiad-control", move |conn| handle_control(conn, &tx))?
    };

    let log_to_file = options.log_to_file;
    let mut s = Supervisor {
        config,
        options,
        fuse,
        events: tx,
        init_request: None,
        next_generation: 1,
        current: None,
        upgrade: None,
        retiring: None,
        stopping: None,
        failed_starts: 0,
        first_failure: None,
        log_to_file,
    };
    let result = s.run(rx, on_ready);
    control.stop();
    s.kill_all();
    for path in [&rt.pid_file, &rt.counters, &rt.opens] {
        let _ = std::fs::remove_file(path);
    }
    result
}

impl Supervisor {
    fn mountpoint(&self) -> &Path {
        &self.config.serve.mountpoint
    }

    fn run(&mut self, events: mpsc::Receiver<Event>, on_ready: impl FnOnce()) -> Result<(), FuseError> {
        let mut on_ready = Some(on_ready);
        let exe = self.options.exe.clone();
        let first = self.start_daemon(&exe, StartCause::First).map_err(|e| self.give_up(e))?;
        self.current = Some(first);
        loop {
            let event = match self.stopping {
                Some(since) => match events.recv_timeout(Duration::from_millis(100)) {
                    Ok(e) => e,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if since.elapsed() > STOP_TIMEOUT {
                            tracing::warn!("the daemon has not exited {STOP_TIMEOUT:?} after the unmount; killing it");
                            self.kill_all();
                            return Ok(());
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
                },
                None => match events.recv() {
                    Ok(e) => e,
                    Err(_) => return Ok(()),
                },
            };
            match event {
                Event::Ready { generation, pid, init_request } => {
                    if self.current.as_ref().is_some_and(|d| d.generation == generation) {
                        let d = self.current.as_mut().expect("checked");
                        d.ready = true;
                        self.failed_starts = 0;
                        if self.init_request.is_none() {
                            self.init_request = Some(init_request);
                            tracing::info!("daemon {pid} serves {}", self.config.serve.mountpoint.display());
                            if let Some(f) = on_ready.take() {
                                f();
                            }
                        } else {
                            tracing::info!("daemon {pid} (generation {generation}) serves {} again", self.config.serve.mountpoint.display());
                        }
                    } else if self.upgrade.as_ref().is_some_and(|(d, _)| d.generation == generation) {
                        let (mut new, reply) = self.upgrade.take().expect("checked");
                        new.ready = true;
                        // The old daemon goes; what it had read but not
                        // answered is resent once it is gone.
                        if let Some(old) = self.current.take() {
                            kill(old.pid);
                            self.retiring = Some(old);
                        }
                        tracing::info!("upgraded: daemon {pid} ({}) serves {}", new.exe.display(), self.config.serve.mountpoint.display());
                        self.options.exe = new.exe.clone();
                        self.current = Some(new);
                        let _ = reply.send(Ok(pid));
                    }
                }
                Event::Failed { generation, message } => {
                    tracing::error!("daemon generation {generation} cannot serve: {message}");
                    if generation == 1 {
                        self.first_failure = Some(message);
                    } else if self.upgrade.as_ref().is_some_and(|(d, _)| d.generation == generation) {
                        if let Some((_, reply)) = self.upgrade.take() {
                            let _ = reply.send(Err(message));
                        }
                    }
                }
                Event::Exited { generation, status } => {
                    if let Some(old) = self.retiring.take_if(|d| d.generation == generation) {
                        tracing::info!("old daemon {} exited ({})", old.pid, describe(status));
                        self.resend();
                        continue;
                    }
                    if let Some((d, reply)) = self.upgrade.take_if(|(d, _)| d.generation == generation) {
                        let _ = reply.send(Err(format!("the new daemon {} exited before it was ready ({}); see the log", d.pid, describe(status))));
                        continue;
                    }
                    let Some(dead) = self.current.take_if(|d| d.generation == generation) else { continue };
                    let died_at_ns = handoff::monotonic_ns();
                    if self.stopping.is_some() || fuse_device::connection_aborted(&self.fuse) {
                        tracing::info!("daemon {} exited ({}); {} is unmounted", dead.pid, describe(status), self.mountpoint().display());
                        return Ok(());
                    }
                    if self.init_request.is_none() {
                        // The first daemon never served: nothing to fail over.
                        let why = self
                            .first_failure
                            .take()
                            .unwrap_or_else(|| format!("the daemon exited ({}) before the mount was ready; see {}", describe(status), self.config.log_file.display()));
                        return Err(self.give_up(FuseError::Image(why)));
                    }
                    tracing::warn!("daemon {} (generation {generation}) died ({}); starting another", dead.pid, describe(status));
                    self.resend();
                    if !dead.ready {
                        self.failed_starts += 1;
                        if self.failed_starts >= MAX_FAILED_STARTS {
                            tracing::error!("{MAX_FAILED_STARTS} daemons in a row died before serving; detaching {}", self.mountpoint().display());
                            let _ = unmount(self.mountpoint(), true);
                            return Err(FuseError::Image(format!("{MAX_FAILED_STARTS} daemons in a row died before serving {}", self.mountpoint().display())));
                        }
                        std::thread::sleep(Duration::from_millis(100) * self.failed_starts);
                    }
                    let exe = self.options.exe.clone();
                    match self.start_daemon(&exe, StartCause::Restart { died_at_ns }) {
                        Ok(d) => self.current = Some(d),
                        Err(e) => {
                            tracing::error!("cannot start a daemon: {e}; detaching {}", self.mountpoint().display());
                            let _ = unmount(self.mountpoint(), true);
                            return Err(e);
                        }
                    }
                }
                Event::Signal(sig) => {
                    if self.stopping.is_some() {
                        continue;
                    }
                    tracing::info!("{sig}: unmounting {}", self.mountpoint().display());
                    self.stopping = Some(Instant::now());
                    if let Err(e) = unmount(self.mountpoint(), false) {
                        tracing::warn!("{e}; detaching it instead (it goes away when no longer used)");
                        if let Err(e) = unmount(self.mountpoint(), true) {
                            tracing::error!("{e}");
                        }
                    }
                    if self.current.is_none() {
                        return Ok(());
                    }
                }
                Event::Upgrade { binary, reply } => {
                    let refused = if self.stopping.is_some() {
                        Some("the mount is being unmounted".to_string())
                    } else if self.upgrade.is_some() || self.retiring.is_some() {
                        Some("an upgrade is already under way".to_string())
                    } else if !self.current.as_ref().is_some_and(|d| d.ready) {
                        Some("no daemon is serving yet".to_string())
                    } else {
                        None
                    };
                    if let Some(why) = refused {
                        let _ = reply.send(Err(why));
                        continue;
                    }
                    tracing::info!("upgrade: starting {}", binary.display());
                    match self.start_daemon(&binary, StartCause::Upgrade) {
                        Ok(d) => self.upgrade = Some((d, reply)),
                        Err(e) => {
                            let _ = reply.send(Err(e.to_string()));
                        }
                    }
                }
            }
        }
    }

    /// Puts the requests a dead daemon had read back in the queue.
    fn resend(&self) {
        if let Err(e) = fuse_device::notify_resend(&self.fuse) {
            tracing::warn!("FUSE_NOTIFY_RESEND failed ({e}): requests the daemon had read may fail");
        }
    }

    /// Removes the mount after a failure that leaves nobody to serve it.
    fn give_up(&mut self, e: FuseError) -> FuseError {
        self.kill_all();
        let _ = unmount(self.mountpoint(), true);
        e
    }

    fn kill_all(&mut self) {
        for d in [self.current.take(), self.upgrade.take().map(|(d, _)| d), self.retiring.take()].into_iter().flatten() {
            kill(d.pid);
        }
    }

    /// Starts daemon generation `next_generation` from `exe` and hands it
    /// the mount. A thread reports its answer and its exit as events.
    fn start_daemon(&mut self, exe: &Path, cause: StartCause) -> Result<Daemon, FuseError> {
        let generation = self.next_generation;
        self.next_generation += 1;
        let channel_err = |source: std::io::Error| FuseError::Io { path: exe.to_path_buf(), source };
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).map_err(|e| channel_err(e.into()))?;
        let mut cmd = Command::new(exe);
        cmd.args(DAEMON_ARGS).stdin(Stdio::null());
        if self.log_to_file {
            let log = &self.config.log_file;
            let open = || OpenOptions::new().create(true).append(true).mode(0o640).open(log).at(log);
            cmd.stdout(open()?).stderr(open()?);
        }
        let theirs_fd = theirs.as_raw_fd();
        // SAFETY: dup2 and fcntl are async-signal-safe; they put the
        // channel at DAEMON_CHANNEL_FD without close-on-exec.
        unsafe {
            cmd.pre_exec(move || {
                if theirs_fd == DAEMON_CHANNEL_FD {
                    if libc::fcntl(theirs_fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(theirs_fd, DAEMON_CHANNEL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| channel_err(std::io::Error::new(e.kind(), format!("starting a daemon: {e}"))))?;
        drop(theirs);
        let pid = child.id();
        let handoff = Handoff { config: self.config.clone(), generation, supervisor_pid: std::process::id(), cause, init_request: self.init_request.clone() };
        if let Err(e) = handoff::send(&ours, &handoff, &[self.fuse.as_raw_fd()]) {
            tracing::warn!("handing the mount to daemon {pid}: {e}");
        }
        let events = self.events.clone();
        std::thread::Builder::new()
            .name(format!("naiad-daemon-{generation}"))
            .spawn(move || {
                let event = match handoff::receive::<DaemonMessage>(&ours) {
                    Ok(Some((DaemonMessage::Ready { pid, init_request }, _))) => Some(Event::Ready { generation, pid, init_request }),
                    Ok(Some((DaemonMessage::Failed { message }, _))) => Some(Event::Failed { generation, message }),
                    Ok(None) => None,
                    Err(e) => Some(Event::Failed { generation, message: format!("bad answer from the daemon: {e}") }),
                };
                if let Some(e) = event {
                    let _ = events.send(e);
                }
                let status = child.wait().ok();
                let _ = events.send(Event::Exited { generation, status });
            })
            .at(exe)?;
        tracing::debug!("started daemon {pid} (generation {generation}, {cause:?}) from {}", exe.display());
        Ok(Daemon { generation, pid, ready: false, exe: exe.to_path_buf() })
    }
}

fn kill(pid: u32) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

fn describe(status: Option<ExitStatus>) -> String {
    status.map(|s| s.to_string()).unwrap_or_else(|| "unknown status".into())
}

/// One request on the control socket: `upgrade PATH` answers `ok PID` once
/// the daemon started from PATH serves the mount, or `error MESSAGE`.
fn handle_control(mut conn: UnixStream, events: &mpsc::Sender<Event>) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new((&conn).take(4096)).read_line(&mut line)?;
    let answer = match line.trim().split_once(' ') {
        Some(("upgrade", path)) if Path::new(path).is_absolute() => {
            let (reply, answer) = mpsc::channel();
            let _ = events.send(Event::Upgrade { binary: PathBuf::from(path), reply });
            match answer.recv_timeout(UPGRADE_TIMEOUT) {
                Ok(Ok(pid)) => format!("ok {pid}\n"),
                Ok(Err(e)) => format!("error {e}\n"),
                Err(_) => "error the new daemon did not become ready in time\n".to_string(),
            }
        }
        _ => format!("error unknown request {:?}; expected `upgrade /absolute/path`\n", line.trim()),
    };
    conn.write_all(answer.as_bytes())
}

/// Asks the supervisor at `control` to upgrade its daemon to `binary`;
/// returns the new daemon's pid.
pub fn request_upgrade(control: &Path, binary: &Path) -> Result<u32, FuseError> {
    let err = |detail: String| FuseError::Stats { path: control.to_path_buf(), detail };
    let mut conn = UnixStream::connect(control).map_err(|e| err(format!("cannot connect to the supervisor: {e}")))?;
    conn.set_read_timeout(Some(UPGRADE_TIMEOUT + Duration::from_secs(5))).map_err(|e| err(e.to_string()))?;
    conn.write_all(format!("upgrade {}\n", binary.display()).as_bytes()).map_err(|e| err(format!("cannot send: {e}")))?;
    let mut answer = String::new();
    conn.take(64 << 10).read_to_string(&mut answer).map_err(|e| err(format!("cannot read the answer: {e}")))?;
    match answer.trim().split_once(' ') {
        Some(("ok", pid)) => pid.parse().map_err(|_| err(format!("bad answer {answer:?}"))),
        Some(("error", why)) => Err(FuseError::Image(format!("upgrade refused: {why}"))),
        _ => Err(err(format!("bad answer {answer:?}"))),
    }
}
