//! Support for the FUSE integration tests (`tests/mount.rs`, `tests/run.rs`):
//! converting fixture images with `naiad convert`, and [`MountGuard`], a
//! `naiad mount` that is always unmounted and whose daemon is always gone
//! when the guard is dropped, even when the test fails.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::naiad;

/// Tag the converted images get.
pub const NAIAD_TAG: &str = "naiad";

/// True unless the FUSE tests cannot run here (not root, no /dev/fuse);
/// then prints why.
pub fn fuse_available() -> bool {
    if !crate::common::running_as_root() {
        return crate::common::cannot_run("the FUSE tests need root");
    }
    if fs::OpenOptions::new().read(true).write(true).open("/dev/fuse").is_err() {
        return crate::common::cannot_run("/dev/fuse is not available");
    }
    true
}

/// Runs a command and returns its output, panicking if it cannot start.
pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn check(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(out.status.success(), "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `naiad convert oci:SRC:TAG oci:DST:naiad`; returns the image reference
/// of the result.
pub fn convert(src_layout: &Path, tag: &str, dst_layout: &Path) -> String {
    check(naiad().arg("convert").arg("--quiet").arg(format!("oci:{}:{tag}", src_layout.display())).arg(format!("oci:{}:{NAIAD_TAG}", dst_layout.display())));
    format!("oci:{}:{NAIAD_TAG}", dst_layout.display())
}

/// Whether a `fuse.naiad` filesystem is mounted exactly at `path`.
pub fn is_naiad_mount(path: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = path.to_string_lossy().replace(' ', "\\040");
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.len() > 4 && f[4] == want && l.contains(" - fuse.naiad ")
    })
}

pub fn process_alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'))).unwrap_or(false)
}

/// Waits up to `timeout` for `cond`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A naiad mount under a test's directory: `dir/mnt`, with its own run
/// directory `dir/run` (socket, pid file) and log `dir/daemon.log`.
pub struct MountGuard {
    pub mountpoint: PathBuf,
    pub run_dir: PathBuf,
    pub log_file: PathBuf,
    pub pid: i32,
    /// How long `naiad mount` took to return.
    pub mount_time: Duration,
}

impl MountGuard {
    /// `naiad mount` of `image` on `dir/mnt` with the disk cache in
    /// `cache_dir`; panics (with the daemon's log) if it fails.
    pub fn mount(image: &str, dir: &Path, cache_dir: &Path) -> MountGuard {
        Self::mount_with(image, dir, cache_dir, &[])
    }

    /// [`MountGuard::mount`] with more `naiad mount` options.
    pub fn mount_with(image: &str, dir: &Path, cache_dir: &Path, extra: &[&std::ffi::OsStr]) -> MountGuard {
        Self::mount_env(image, dir, cache_dir, extra, &[])
    }

    /// [`MountGuard::mount_with`] with environment variables for `naiad mount`.
    pub fn mount_env(image: &str, dir: &Path, cache_dir: &Path, extra: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> MountGuard {
        let mountpoint = dir.join("mnt");
        let run_dir = dir.join("run");
        let log_file = dir.join("daemon.log");
        fs::create_dir_all(&mountpoint).expect("create mountpoint");
        let start = Instant::now();
        let out = output(
            naiad()
                .arg("mount")
                .arg("--cache-dir")
                .arg(cache_dir)
                .arg("--run-dir")
                .arg(&run_dir)
                .arg("--log-file")
                .arg(&log_file)
                .args(extra)
                .envs(env.iter().copied())
                .arg(image)
                .arg(&mountpoint),
        );
        let mount_time = start.elapsed();
        let pid = read_pid(&run_dir);
        let guard = pid.map(|pid| MountGuard { mountpoint: mountpoint.clone(), run_dir: run_dir.clone(), log_file: log_file.clone(), pid, mount_time });
        assert!(
            out.status.success(),
            "naiad mount {image} failed ({}): {}\nlog:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(&log_file).unwrap_or_default()
        );
        let guard = guard.expect("the daemon wrote no pid file");
        assert!(is_naiad_mount(&mountpoint), "naiad mount returned but {} is not mounted", mountpoint.display());
        guard
    }

    /// `naiad stats --json` of this mount.
    pub fn stats(&self) -> Value {
        let text = check(naiad().arg("stats").arg("--json").arg("--run-dir").arg(&self.run_dir).arg(&self.mountpoint));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("naiad stats --json printed invalid JSON ({e}): {text}"))
    }

    /// `naiad stats --prometheus` of this mount.
    pub fn prometheus(&self) -> String {
        check(naiad().arg("stats").arg("--prometheus").arg("--run-dir").arg(&self.run_dir).arg(&self.mountpoint))
    }

    /// [`MountGuard::stats`] once two snapshots 300 ms apart show the same
    /// counters: the loads that reads started in the background have
    /// finished (panics if they are still going after 30 s).
    pub fn settled_stats(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = self.stats();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let s = self.stats();
            if s["counters"] == last["counters"] {
                return s;
            }
            assert!(Instant::now() < deadline, "counters still changing after 30 s: {}", s["counters"]);
            last = s;
        }
    }

    /// One counter of [`MountGuard::stats`].
    pub fn counter(&self, name: &str) -> u64 {
        let s = self.stats();
        s["counters"][name].as_u64().unwrap_or_else(|| panic!("no counter {name} in {s}"))
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    pub fn daemon_alive(&self) -> bool {
        process_alive(self.pid)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// `naiad umount`, which must succeed and leave no daemon.
    pub fn umount(self) {
        check(naiad().arg("umount").arg("--run-dir").arg(&self.run_dir).arg(&self.mountpoint));
        assert!(!is_naiad_mount(&self.mountpoint), "still mounted after naiad umount");
        assert!(!process_alive(self.pid), "daemon {} still running after naiad umount", self.pid);
        // Drop finds nothing left to do.
    }
}

fn read_pid(run_dir: &Path) -> Option<i32> {
    for e in fs::read_dir(run_dir).ok()?.flatten() {
        if e.path().extension().is_some_and(|x| x == "pid") {
            return fs::read_to_string(e.path()).ok()?.trim().parse().ok();
        }
    }
    None
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if is_naiad_mount(&self.mountpoint) {
            let _ = output(naiad().arg("umount").arg("--timeout").arg("5").arg("--run-dir").arg(&self.run_dir).arg(&self.mountpoint));
        }
        if is_naiad_mount(&self.mountpoint) {
            if let Ok(c) = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes()) {
                // SAFETY: a valid C string; MNT_DETACH never blocks.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        if process_alive(self.pid) && !wait_until(Duration::from_secs(2), || !process_alive(self.pid)) {
            // SAFETY: plain kill(2) of the daemon this guard started.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            wait_until(Duration::from_secs(2), || !process_alive(self.pid));
        }
    }
}

/// What is left in a run directory besides logs: a mount's socket, pid
/// file, control socket or counters that nobody removed.
pub fn run_dir_leftovers(run_dir: &Path) -> Vec<std::ffi::OsString> {
    fs::read_dir(run_dir).map(|d| d.flatten().map(|e| e.file_name()).filter(|n| !n.to_string_lossy().ends_with(".log")).collect()).unwrap_or_default()
}

/// Inode number, link count, mode and rdev of a path (lstat).
pub fn lstat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

/// `(ino, nlink)` of a path.
pub fn ino_nlink(p: &Path) -> (u64, u64) {
    let m = lstat(p);
    (m.ino(), m.nlink())
}

/// One HTTP/1.1 GET over a unix socket: (status code, headers, body).
pub fn http_get(socket: &Path, target: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut c = std::os::unix::net::UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(c, "GET {target} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n").expect("send request");
    let mut answer = String::new();
    c.read_to_string(&mut answer).expect("read answer");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end in {answer:?}"));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad status line in {head:?}"));
    (status, head.to_string(), body.to_string())
}

/// The value of the Prometheus sample `name{labels}` (exact series text
/// before the value, e.g. `naiad_reads_total{mountpoint="/m"}`).
pub fn prometheus_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| l.rsplit_once(' ').filter(|(s, _)| *s == series).and_then(|(_, v)| v.parse().ok()))
}
