//! Running a command in a mounted image, as `naiad run` does: a writable
//! overlayfs (upper and work directories on the host) over the read-only
//! image mount, then the command chrooted into it as PID 1 of new mount and
//! PID namespaces, with `/proc`, a minimal `/dev` and `/sys` mounted.
//!
//! Process layout:
//!
//! ```text
//! caller ── fork ──> setup child: unshare(NEWNS|NEWPID), mounts private,
//!                    overlay mounted ── fork ──> command: PID 1, mounts
//!                    /proc /dev /sys, chroot, chdir, setgid/setuid, exec
//! ```
//!
//! Every mount made for the command lives in the new mount namespace, so
//! it disappears when the command and its setup child have exited, whatever
//! way they exit; the caller only has to remove the directories. Exit
//! status is forwarded (killed by signal N: 128+N); SIGINT, SIGTERM, SIGHUP
//! and SIGQUIT sent to the caller are passed on to the command. Setup
//! failures inside the children exit with 125, a command that cannot be
//! found with 127, one that cannot be executed with 126.
//!
//! The caller must be single-threaded when it calls [`run`] (the children
//! allocate after fork), as the `naiad` CLI is.

use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chdir, chroot, execve, fork, setgid, setgroups, setuid, ForkResult, Gid, Pid, Uid};

use crate::error::FuseError;

/// Exit code of a setup failure before the command ran.
pub const EXIT_SETUP: i32 = 125;
/// Exit code when the command exists but cannot be executed.
pub const EXIT_CANNOT_EXEC: i32 = 126;
/// Exit code when the command is not found.
pub const EXIT_NOT_FOUND: i32 = 127;

/// PATH used when the image's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to run and where.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// The read-only image (a naiad mount): the overlay's lower layer.
    pub lower: PathBuf,
    /// Empty directories on the host: the overlay's upper and work dirs
    /// (same filesystem) and where the merged tree is mounted.
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
    /// The command and its arguments; a name without `/` is looked up in
    /// the container's PATH.
    pub argv: Vec<OsString>,
    /// `KEY=VALUE` environment of the command.
    pub env: Vec<OsString>,
    /// Working directory inside the container (created if missing).
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// The pid signals to the caller are forwarded to (0: none).
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

/// Set when a signal asking the command to stop was forwarded.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);
/// The last stop signal that arrived (0: none).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// How long the command has to exit after a forwarded stop signal before it
/// is killed. The command runs as PID 1 of its namespace, where the kernel
/// drops signals it installed no handler for, so a shell would ignore them.
const KILL_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

extern "C" fn forward_signal(sig: libc::c_int) {
    if sig != libc::SIGHUP {
        STOP_REQUESTED.store(true, Ordering::SeqCst);
    }
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
    let pid = FORWARD_TO.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

const FORWARDED: [Signal; 4] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT];

/// Forwards FORWARDED signals to `pid` until dropped, then restores the
/// previous handlers.
struct Forwarding {
    previous: Vec<(Signal, SigAction)>,
}

impl Forwarding {
    fn to(pid: Pid) -> Self {
        FORWARD_TO.store(pid.as_raw(), Ordering::SeqCst);
        let action = SigAction::new(SigHandler::Handler(forward_signal), SaFlags::SA_RESTART, SigSet::empty());
        let mut previous = Vec::new();
        for sig in FORWARDED {
            // SAFETY: the handler only calls kill(2) with an atomic's value.
            if let Ok(old) = unsafe { sigaction(sig, &action) } {
                previous.push((sig, old));
            }
        }
        Forwarding { previous }
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        for (sig, old) in self.previous.drain(..) {
            // SAFETY: restores what was installed before.
            let _ = unsafe { sigaction(sig, &old) };
        }
        FORWARD_TO.store(0, Ordering::SeqCst);
    }
}

/// Catches the stop signals (SIGINT, SIGTERM, SIGHUP, SIGQUIT) for a whole
/// `naiad run`, from before its setup until dropped: while nothing runs
/// yet, a signal is only noted ([`stop_signal`]), so the setup can stop
/// and clean up instead of dying with a mount half made; once the command
/// runs, [`run`] forwards them to it.
pub struct StopSignals {
    _forwarding: Forwarding,
}

impl StopSignals {
    pub fn catch() -> Self {
        StopSignals { _forwarding: Forwarding::to(Pid::from_raw(0)) }
    }
}

/// The stop signal that arrived while [`StopSignals`] were caught, if any.
pub fn stop_signal() -> Option<i32> {
    Some(STOP_SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// Waits for `pid` and turns its end into an exit code (signal N: 128+N).
fn wait_exit_code(pid: Pid) -> Result<i32, nix::Error> {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// [`wait_exit_code`] for the command itself: once a stop signal has been
/// forwarded, the command gets [`KILL_GRACE`] to exit and is then killed
/// (taking its whole PID namespace with it).
fn wait_exit_code_or_kill(pid: Pid) -> Result<i32, nix::Error> {
    let mut stop_seen: Option<std::time::Instant> = None;
    loop {
        match waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                if STOP_REQUESTED.load(Ordering::SeqCst) {
                    let since = *stop_seen.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= KILL_GRACE {
                        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Runs `spec` and returns the command's exit code. Errors are failures to
/// start; failures inside the container are reported on stderr and give
/// [`EXIT_SETUP`], [`EXIT_CANNOT_EXEC`] or [`EXIT_NOT_FOUND`].
pub fn run(spec: &ContainerSpec) -> Result<i32, FuseError> {
    for d in [&spec.lower, &spec.upper, &spec.work, &spec.merged] {
        if !d.is_dir() {
            return Err(FuseError::Container(format!("{} is not a directory", d.display())));
        }
    }
    if spec.argv.is_empty() {
        return Err(FuseError::Container("no command to run: the image has no Entrypoint or Cmd, and none was given".into()));
    }
    // SAFETY: the caller is single-threaded (module docs), so the child may
    // do anything a normal process does.
    match unsafe { fork() } {
        Err(e) => Err(FuseError::Container(format!("fork: {e}"))),
        Ok(ForkResult::Child) => {
            let code = match setup_child(spec) {
                Ok(code) => code,
                Err(msg) => {
                    eprintln!("naiad run: {msg}");
                    EXIT_SETUP
                }
            };
            // SAFETY: leave without running the parent's atexit handlers or
            // destructors (they belong to the parent).
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => {
            let _fwd = Forwarding::to(child);
            wait_exit_code(child).map_err(|e| FuseError::Container(format!("waiting for the container: {e}")))
        }
    }
}

/// The setup child: new namespaces, the overlay, then the command as PID 1.
fn setup_child(spec: &ContainerSpec) -> Result<i32, String> {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID).map_err(|e| format!("unshare(mount, pid namespaces): {e} (naiad run needs root)"))?;
    // Nothing we mount may propagate back to the host.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>).map_err(|e| format!("making mounts private: {e}"))?;
    let opts = overlay_options(spec)?;
    mount(Some("overlay"), &spec.merged, Some("overlay"), MsFlags::empty(), Some(opts.as_bytes()))
        .map_err(|e| format!("mounting overlay on {} ({}): {e}", spec.merged.display(), String::from_utf8_lossy(opts.as_bytes())))?;
    // SAFETY: still single-threaded.
    match unsafe { fork() } {
        Err(e) => Err(format!("fork: {e}")),
        Ok(ForkResult::Child) => {
            let e = exec_command(spec);
            eprintln!("naiad run: {}", e.1);
            // SAFETY: as above.
            unsafe { libc::_exit(e.0) }
        }
        Ok(ForkResult::Parent { child }) => {
            let _fwd = Forwarding::to(child);
            wait_exit_code_or_kill(child).map_err(|e| format!("waiting for the command: {e}"))
        }
    }
}

fn overlay_options(spec: &ContainerSpec) -> Result<CString, String> {
    let mut o = Vec::new();
    for (key, dir) in [("lowerdir", &spec.lower), ("upperdir", &spec.upper), ("workdir", &spec.work)] {
        let b = dir.as_os_str().as_bytes();
        if b.iter().any(|&c| c == b',' || c == b':' || c == b'\\') {
            return Err(format!("{} cannot be used in overlay options (contains ',', ':' or '\\')", dir.display()));
        }
        if !o.is_empty() {
            o.push(b',');
        }
        o.extend_from_slice(key.as_bytes());
        o.push(b'=');
        o.extend_from_slice(b);
    }
    CString::new(o).map_err(|_| "overlay options contain a NUL byte".into())
}

/// The command process, PID 1 of the new namespace. Returns only on
/// failure, with the exit code and message.
fn exec_command(spec: &ContainerSpec) -> (i32, String) {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if let Err(e) = prepare_root(&spec.merged) {
        return (EXIT_SETUP, e);
    }
    if let Err(e) = chroot(&spec.merged).and_then(|_| chdir("/")) {
        return (EXIT_SETUP, format!("chroot {}: {e}", spec.merged.display()));
    }
    if let Err(e) = fs::create_dir_all(&spec.cwd) {
        return (EXIT_SETUP, format!("working directory {}: {e}", spec.cwd.display()));
    }
    if let Err(e) = chdir(&spec.cwd) {
        return (EXIT_SETUP, format!("working directory {}: {e}", spec.cwd.display()));
    }
    let groups: Vec<Gid> = spec.groups.iter().map(|&g| Gid::from_raw(g)).collect();
    if let Err(e) = setgroups(&groups).and_then(|_| setgid(Gid::from_raw(spec.gid))).and_then(|_| setuid(Uid::from_raw(spec.uid))) {
        return (EXIT_SETUP, format!("switching to uid {} gid {}: {e}", spec.uid, spec.gid));
    }
    let cstr = |s: &OsStr| CString::new(s.as_bytes()).map_err(|_| format!("{:?} contains a NUL byte", s));
    let args: Result<Vec<CString>, String> = spec.argv.iter().map(|a| cstr(a)).collect();
    let env: Result<Vec<CString>, String> = spec.env.iter().map(|a| cstr(a)).collect();
    let (args, env) = match (args, env) {
        (Ok(a), Ok(e)) => (a, e),
        (Err(m), _) | (_, Err(m)) => return (EXIT_SETUP, m),
    };
    let name = spec.argv[0].as_bytes();
    let candidates: Vec<PathBuf> = if name.contains(&b'/') {
        vec![PathBuf::from(OsStr::from_bytes(name))]
    } else {
        let path = spec.env.iter().find_map(|kv| kv.as_bytes().strip_prefix(b"PATH=").map(|p| p.to_vec())).unwrap_or_else(|| DEFAULT_PATH.as_bytes().to_vec());
        path.split(|&c| c == b':').map(|d| if d.is_empty() { PathBuf::from(".") } else { PathBuf::from(OsStr::from_bytes(d)) }).map(|d| d.join(OsStr::from_bytes(name))).collect()
    };
    let mut result = (EXIT_NOT_FOUND, format!("{}: command not found", String::from_utf8_lossy(name)));
    for c in candidates {
        let Ok(path) = CString::new(c.as_os_str().as_bytes()) else { continue };
        let err = match execve(&path, &args, &env) {
            Err(e) => e,
            Ok(never) => match never {},
        };
        match err {
            nix::Error::ENOENT | nix::Error::ENOTDIR => {
                if name.contains(&b'/') {
                    result = (EXIT_NOT_FOUND, format!("{}: no such file or directory", c.display()));
                }
            }
            e => {
                // Remember the most telling failure but keep searching, as execvp does.
                result = (EXIT_CANNOT_EXEC, format!("{}: {e}", c.display()));
            }
        }
    }
    result
}

/// Devices bind-mounted from the host into the container's /dev.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Mounts /proc, a minimal /dev and /sys under `root`.
fn prepare_root(root: &Path) -> Result<(), String> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let dir = |rel: &str, mode: u32| -> Result<PathBuf, String> {
        let p = root.join(rel);
        if !p.is_dir() {
            fs::create_dir_all(&p).map_err(|e| format!("creating {}: {e}", p.display()))?;
            let _ = fs::set_permissions(&p, fs::Permissions::from_mode(mode));
        }
        Ok(p)
    };

    // /proc of the new PID namespace.
    let proc_dir = dir("proc", 0o555)?;
    mount(Some("proc"), &proc_dir, Some("proc"), nosuid_nodev_noexec, None::<&str>).map_err(|e| format!("mounting /proc: {e}"))?;

    // A small /dev: tmpfs with the usual devices bound from the host.
    let dev = dir("dev", 0o755)?;
    mount(Some("tmpfs"), &dev, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=755,size=65536k")).map_err(|e| format!("mounting /dev: {e}"))?;
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        if !host.exists() {
            continue;
        }
        let target = dev.join(name);
        fs::write(&target, b"").map_err(|e| format!("creating {}: {e}", target.display()))?;
        mount(Some(&host), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(|e| format!("bind-mounting {}: {e}", host.display()))?;
    }
    for (link, target) in [("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"), ("core", "/proc/kcore")] {
        let _ = symlink(target, dev.join(link));
    }
    let shm = dev.join("shm");
    let pts = dev.join("pts");
    for d in [&shm, &pts] {
        fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let _ = fs::set_permissions(&shm, fs::Permissions::from_mode(0o1777));
    if let Err(e) = mount(Some("shm"), &shm, Some("tmpfs"), nosuid_nodev_noexec, Some("mode=1777,size=65536k")) {
        eprintln!("naiad run: warning: mounting /dev/shm: {e}");
    }
    if mount(Some("devpts"), &pts, Some("devpts"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("newinstance,ptmxmode=0666,mode=0620")).is_ok() {
        let _ = symlink("pts/ptmx", dev.join("ptmx"));
    }

    // /sys, read-only; not every environment allows it, and most programs
    // do without.
    let sys = dir("sys", 0o555)?;
    if let Err(e) = mount(Some("sysfs"), &sys, Some("sysfs"), nosuid_nodev_noexec | MsFlags::MS_RDONLY, None::<&str>) {
        tracing::debug!("mounting /sys: {e}");
    }
    Ok(())
}

/// A user as an image's `/etc/passwd` and `/etc/group` define it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: Option<String>,
}

/// Largest /etc/passwd or /etc/group read from an image.
const MAX_USER_DB: u64 = 4 << 20;

/// Reads `rel` of the image rooted at `root` as the container would see
/// it: symlinks, absolute ones included, resolve inside `root`
/// (openat2 RESOLVE_IN_ROOT), never to the host. Only a regular file of at
/// most [`MAX_USER_DB`] bytes is read (a FIFO or device is not even
/// opened for reading); a missing one reads as empty.
pub fn read_in_root(root: &Path, rel: &str) -> Result<Vec<u8>, FuseError> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    let dir = fs::File::open(root).map_err(|source| FuseError::Io { path: root.to_path_buf(), source })?;
    let how =
        OpenHow::new().flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY).resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let path = root.join(rel);
    let file = match openat2(&dir, rel, how) {
        Ok(fd) => fs::File::from(fd),
        Err(nix::Error::ENOENT) | Err(nix::Error::ENOTDIR) | Err(nix::Error::ELOOP) => return Ok(Vec::new()),
        Err(e) => return Err(FuseError::Io { path, source: e.into() }),
    };
    let meta = file.metadata().map_err(|source| FuseError::Io { path: path.clone(), source })?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(FuseError::Container(format!("the image's /{rel} is {what}")));
    }
    let mut data = Vec::new();
    file.take(MAX_USER_DB + 1).read_to_end(&mut data).map_err(|source| FuseError::Io { path: path.clone(), source })?;
    if data.len() as u64 > MAX_USER_DB {
        return Err(FuseError::Container(format!("the image's /{rel} is larger than {MAX_USER_DB} bytes")));
    }
    Ok(data)
}

/// Resolves an OCI `User` value (`""`, `uid`, `uid:gid`, `name`,
/// `name:group`, ...) against the image rooted at `root`. A name must exist
/// in the image; a numeric id need not.
pub fn resolve_user(root: &Path, user: &str) -> Result<ResolvedUser, FuseError> {
    let passwd = read_in_root(root, "etc/passwd")?;
    let group = read_in_root(root, "etc/group")?;
    let passwd = String::from_utf8_lossy(&passwd);
    let group = String::from_utf8_lossy(&group);
    // name:x:uid:gid:gecos:home:shell
    let pw_entries: Vec<Vec<&str>> = passwd.lines().map(|l| l.split(':').collect::<Vec<_>>()).filter(|f| f.len() >= 7).collect();
    let gr_entries: Vec<Vec<&str>> = group.lines().map(|l| l.split(':').collect::<Vec<_>>()).filter(|f| f.len() >= 4).collect();

    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let u = if u.is_empty() { "0" } else { u };
    let pw = if let Ok(uid) = u.parse::<u32>() {
        pw_entries.iter().find(|f| f[2].parse::<u32>().ok() == Some(uid))
    } else {
        Some(pw_entries.iter().find(|f| f[0] == u).ok_or_else(|| FuseError::Container(format!("user {u:?} not found in the image's /etc/passwd")))?)
    };
    let uid = match u.parse::<u32>() {
        Ok(n) => n,
        Err(_) => pw.and_then(|f| f[2].parse().ok()).ok_or_else(|| FuseError::Container(format!("user {u:?} has an invalid uid in /etc/passwd")))?,
    };
    let gid = match g {
        Some(g) if !g.is_empty() => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => gr_entries
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| FuseError::Container(format!("group {g:?} not found in the image's /etc/group")))?,
        },
        // A uid the image does not know gets group 0, as with Docker.
        _ => pw.and_then(|f| f[3].parse().ok()).unwrap_or(0),
    };
    let name = pw.map(|f| f[0]);
    let mut groups = vec![gid];
    if let (Some(name), None) = (name, g) {
        for f in &gr_entries {
            if f[3].split(',').any(|m| m == name) {
                if let Ok(n) = f[2].parse::<u32>() {
                    if !groups.contains(&n) {
                        groups.push(n);
                    }
                }
            }
        }
    }
    Ok(ResolvedUser { uid, gid, groups, home: pw.map(|f| f[5].to_string()).filter(|h| !h.is_empty()) })
}

/// Helper for callers building [`ContainerSpec::env`]: `KEY=VALUE` entries
/// with later ones replacing earlier ones of the same key, order kept.
pub fn merge_env(base: &[String], overrides: &[String]) -> Vec<OsString> {
    let mut out: Vec<String> = Vec::new();
    for kv in base.iter().chain(overrides) {
        let key = kv.split_once('=').map(|(k, _)| k).unwrap_or(kv);
        out.retain(|e| e.split_once('=').map(|(k, _)| k).unwrap_or(e) != key);
        out.push(kv.clone());
    }
    out.into_iter().map(|s| OsString::from_vec(s.into_bytes())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_users_and_groups() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("etc")).unwrap();
        fs::write(dir.path().join("etc/passwd"), "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1001::/home/alice:/bin/sh\n").unwrap();
        fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:1001:\naudio:x:29:alice,bob\n").unwrap();
        let r = |u: &str| resolve_user(dir.path(), u);
        assert_eq!(r("").unwrap(), ResolvedUser { uid: 0, gid: 0, groups: vec![0], home: Some("/root".into()) });
        assert_eq!(r("alice").unwrap(), ResolvedUser { uid: 1000, gid: 1001, groups: vec![1001, 29], home: Some("/home/alice".into()) });
        assert_eq!(r("1000").unwrap().gid, 1001);
        assert_eq!(r("1000:5").unwrap().gid, 5);
        assert_eq!(r("alice:staff").unwrap().groups, vec![1001]);
        // A uid the image does not know: group 0, as Docker does.
        assert_eq!(r("4242").unwrap(), ResolvedUser { uid: 4242, gid: 0, groups: vec![0], home: None });
        assert!(r("mallory").is_err());
        assert!(r("alice:nogroup").is_err());
    }

    #[test]
    fn user_databases_are_read_inside_the_image() {
        let host = tempfile::tempdir().unwrap();
        fs::write(host.path().join("secret"), "evil:x:0:0:HOST-SECRET:/host-home:/bin/sh\n").unwrap();
        nix::unistd::mkfifo(&host.path().join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let image = tempfile::tempdir().unwrap();
        fs::create_dir(image.path().join("etc")).unwrap();
        fs::write(image.path().join("etc/real"), "app:x:7:7::/in-image:/bin/sh\n").unwrap();
        let link = |target: &Path| {
            let _ = fs::remove_file(image.path().join("etc/passwd"));
            std::os::unix::fs::symlink(target, image.path().join("etc/passwd")).unwrap();
        };
        // An absolute link to a host file resolves inside the image: no such file there.
        link(&host.path().join("secret"));
        assert_eq!(resolve_user(image.path(), "0").unwrap().home, None, "the host file was read");
        assert!(resolve_user(image.path(), "evil").is_err());
        // An absolute link within the image is followed inside it.
        link(Path::new("/etc/real"));
        assert_eq!(resolve_user(image.path(), "app").unwrap().home.as_deref(), Some("/in-image"));
        // Escapes with .. stay inside too.
        link(Path::new("../../../../../../../../dev/zero"));
        assert!(resolve_user(image.path(), "0").is_ok(), "/dev/zero of the host is not read");
        // A FIFO or a device is refused without blocking.
        fs::remove_file(image.path().join("etc/passwd")).unwrap();
        nix::unistd::mkfifo(&image.path().join("etc/passwd"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = resolve_user(image.path(), "0").unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
        fs::remove_file(image.path().join("etc/passwd")).unwrap();
        fs::write(image.path().join("etc/passwd"), vec![b'a'; (MAX_USER_DB + 1) as usize]).unwrap();
        assert!(resolve_user(image.path(), "0").unwrap_err().to_string().contains("larger than"));
    }

    #[test]
    fn merges_environment() {
        let env = merge_env(&["PATH=/bin".into(), "A=1".into()], &["A=2".into(), "B=3".into()]);
        assert_eq!(env, vec![OsString::from("PATH=/bin"), OsString::from("A=2"), OsString::from("B=3")]);
    }
}
