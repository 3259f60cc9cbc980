//! Running a command in a mounted image with an OCI runtime (`crun` or
//! `runc`), as `naiad run` does.
//!
//! ```text
//! naiad run ── spawn ──> runtime (`run --bundle B ID`), started in a new
//!                        mount namespace that holds the overlay (the image
//!                        mount as lower dir, upper and work dirs on the host)
//!                        ── creates ──> the container: PID 1 of new PID, IPC,
//!                        UTS and mount namespaces, rooted in the overlay
//! ```
//!
//! The overlay lives only in the runtime's mount namespace, so it goes away
//! with the runtime, however that ends. The runtime is the one process the
//! caller waits for: its exit code is the command's (signal N: 128+N), and
//! stop signals are passed on to it ([`crate::signals`]), which passes them
//! on to the container. A command that ignores them (PID 1 drops signals it
//! has no handler for) is killed [`KILL_GRACE`] later. Afterwards the
//! container is always deleted (`delete --force` when the runtime left its
//! state behind), also when the runtime itself was killed. Between fork and exec the runtime's child makes only
//! system calls with arguments prepared beforehand: the caller may have
//! other threads.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::bundle::{self, ProcessSpec};
use crate::error::RuntimeError;
use crate::signals;

/// How long the command has to exit after a stop signal before it is killed.
pub const KILL_GRACE: Duration = Duration::from_secs(5);
/// Exit code when the command is not found in the image.
pub const EXIT_NOT_FOUND: i32 = 127;

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// A private directory for `config.json` and the runtime's state.
    pub bundle: PathBuf,
    /// The read-only image (a naiad mount): the overlay's lower layer.
    pub lower: PathBuf,
    /// Empty directories on the host: the overlay's upper and work
    /// directories (one filesystem) and where the overlay is mounted.
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
    /// The process; its `rootfs` is `merged`.
    pub process: ProcessSpec,
}

/// The OCI runtime to use: `$NAIAD_OCI_RUNTIME` (a name or a path), else
/// crun where it can run here, else runc.
pub fn find_runtime() -> Result<PathBuf, RuntimeError> {
    if let Some(r) = std::env::var_os("NAIAD_OCI_RUNTIME").filter(|r| !r.is_empty()) {
        return which(Path::new(&r)).ok_or_else(|| RuntimeError::Runtime(format!("NAIAD_OCI_RUNTIME={}: not found", Path::new(&r).display())));
    }
    let crun = which(Path::new("crun")).filter(|_| crun_supports_cgroups());
    crun.or_else(|| which(Path::new("runc"))).ok_or_else(|| RuntimeError::Runtime("no OCI runtime found: install crun or runc (apt-get install crun runc)".into()))
}

/// crun refuses a hybrid cgroup layout whose cgroup2 hierarchy has
/// controllers ("cgroups in hybrid mode not supported"); runc copes.
fn crun_supports_cgroups() -> bool {
    std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers").map(|c| c.trim().is_empty()).unwrap_or(true)
}

fn which(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Runs `spec` to its end; returns the command's exit code.
pub fn run(spec: &RunSpec) -> Result<i32, RuntimeError> {
    let runtime = find_runtime()?;
    if !crate::user::command_exists(&spec.lower, &spec.process.argv[0], &spec.process.env) {
        eprintln!("naiad run: {}: command not found", spec.process.argv[0]);
        return Ok(EXIT_NOT_FOUND);
    }
    let config = bundle::config(&ProcessSpec { rootfs: spec.merged.clone(), ..spec.process.clone() })?;
    let config_path = spec.bundle.join("config.json");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RuntimeError::Io { path, source }
    };
    let text = serde_json::to_vec_pretty(&config).map_err(|e| RuntimeError::Runtime(format!("encoding config.json: {e}")))?;
    std::fs::write(&config_path, text).map_err(io(&config_path))?;
    let state = spec.bundle.join("runtime-state");
    let id = format!("naiad-{}-{}", std::process::id(), Instant::now().elapsed().subsec_nanos());
    let overlay = Overlay::new(spec)?;

    let mut cmd = Command::new(&runtime);
    cmd.arg("--root").arg(&state).arg("run").arg("--bundle").arg(&spec.bundle).arg(&id).stdin(Stdio::inherit()).stdout(Stdio::inherit()).stderr(Stdio::inherit());
    // SAFETY: the closure makes system calls only, on CStrings prepared
    // above (nothing allocates or locks between fork and exec).
    unsafe {
        cmd.pre_exec(move || overlay.mount_in_new_namespace());
    }
    let child = cmd.spawn().map_err(|e| RuntimeError::Runtime(format!("starting {}: {e}", runtime.display())))?;
    let pid = Pid::from_raw(child.id() as i32);
    signals::forward_to(Some(pid));
    let code = wait_or_kill(pid, &runtime, &state, &id);
    signals::forward_to(None);
    // The container goes whatever happened to the runtime. A runtime that
    // ended its `run` itself removed its state directory with the
    // container; one that was killed, or failed, left it behind.
    if state.join(&id).exists() {
        let _ = Command::new(&runtime).arg("--root").arg(&state).args(["delete", "--force"]).arg(&id).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
    code
}

/// Waits for the runtime; once a stop signal has been passed on, gives the
/// command [`KILL_GRACE`] and then kills the container. A thread of its own
/// waits for the runtime's exit, so the caller sees it at once; this one
/// looks at stop signals every 10 ms meanwhile.
fn wait_or_kill(pid: Pid, runtime: &Path, state: &Path, id: &str) -> Result<i32, RuntimeError> {
    let (exited, exit) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("naiad-runtime-wait".into())
        .spawn(move || {
            let outcome = loop {
                match waitpid(pid, None) {
                    Ok(WaitStatus::Exited(_, code)) => break Ok(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => break Ok(128 + sig as i32),
                    Ok(_) | Err(nix::Error::EINTR) => continue,
                    Err(e) => break Err(RuntimeError::Runtime(format!("waiting for the runtime: {e}"))),
                }
            };
            let _ = exited.send(outcome);
        })
        .map_err(|e| RuntimeError::Runtime(format!("waiting for the runtime: {e}")))?;
    let mut stop_seen: Option<Instant> = None;
    let mut killed = false;
    loop {
        match exit.recv_timeout(Duration::from_millis(10)) {
            Ok(outcome) => return outcome,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(RuntimeError::Runtime("waiting for the runtime: the waiting thread ended".into())),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if signals::stop_requested() {
            let since = *stop_seen.get_or_insert_with(Instant::now);
            if since.elapsed() >= KILL_GRACE && !killed {
                killed = true;
                let _ = Command::new(runtime).arg("--root").arg(state).args(["kill", id, "KILL"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
            }
        }
    }
}

/// The overlay mount, prepared so that the child can make it with plain
/// system calls.
struct Overlay {
    target: CString,
    options: CString,
}

impl Overlay {
    fn new(spec: &RunSpec) -> Result<Self, RuntimeError> {
        let mut o = Vec::new();
        for (key, dir) in [("lowerdir", &spec.lower), ("upperdir", &spec.upper), ("workdir", &spec.work)] {
            let b = dir.as_os_str().as_bytes();
            if b.iter().any(|&c| c == b',' || c == b':' || c == b'\\') {
                return Err(RuntimeError::Runtime(format!("{} cannot be used in overlay options (contains ',', ':' or '\\')", dir.display())));
            }
            if !o.is_empty() {
                o.push(b',');
            }
            o.extend_from_slice(key.as_bytes());
            o.push(b'=');
            o.extend_from_slice(b);
        }
        let nul = |what: &str| RuntimeError::Runtime(format!("{what} contains a NUL byte"));
        Ok(Overlay {
            target: CString::new(spec.merged.as_os_str().as_bytes()).map_err(|_| nul("the overlay path"))?,
            options: CString::new(o).map_err(|_| nul("the overlay options"))?,
        })
    }

    /// In the runtime's child, before exec: dies with its parent, gets a
    /// mount namespace of its own whose mounts do not propagate back, and
    /// mounts the overlay there.
    fn mount_in_new_namespace(&self) -> std::io::Result<()> {
        let check = |r: libc::c_int| if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
        // SAFETY: plain system calls with valid, NUL-terminated arguments.
        unsafe {
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(std::ptr::null(), c"/".as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()))?;
            check(libc::mount(c"overlay".as_ptr(), self.target.as_ptr(), c"overlay".as_ptr(), 0, self.options.as_ptr().cast()))?;
        }
        Ok(())
    }
}
