//! Where a mount keeps its files: the daemon's stats socket, the
//! supervisor's pid file and control socket, the shared counters and the
//! log, in a run directory (default `/run/naiad`) named after a hash of the
//! canonical mountpoint, so `naiad stats`, `naiad umount` and `naiad daemon
//! upgrade` find the mount's processes from the mountpoint alone.

use std::path::{Component, Path, PathBuf};

/// Default run directory; `NAIAD_RUN_DIR` or `--run-dir` override it.
pub const DEFAULT_RUN_DIR: &str = "/run/naiad";

/// The files of one mount's daemon.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuntimePaths {
    /// The serving daemon's stats socket (`naiad stats`).
    pub socket: PathBuf,
    /// The supervisor's pid.
    pub pid_file: PathBuf,
    pub log_file: PathBuf,
    /// The supervisor's control socket (`naiad daemon upgrade`).
    pub control: PathBuf,
    /// The counters every daemon generation maps.
    pub counters: PathBuf,
    /// The passthrough open table every daemon generation maps.
    pub opens: PathBuf,
}

/// 16 hex digits of the blake3 of the canonical mountpoint.
pub fn mount_id(canonical_mountpoint: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let h = blake3::hash(canonical_mountpoint.as_os_str().as_bytes());
    h.to_hex()[..16].to_string()
}

impl RuntimePaths {
    pub fn new(run_dir: &Path, canonical_mountpoint: &Path) -> Self {
        let id = mount_id(canonical_mountpoint);
        RuntimePaths {
            socket: run_dir.join(format!("{id}.sock")),
            pid_file: run_dir.join(format!("{id}.pid")),
            log_file: run_dir.join(format!("{id}.log")),
            control: run_dir.join(format!("{id}.ctl")),
            counters: run_dir.join(format!("{id}.counters")),
            opens: run_dir.join(format!("{id}.opens")),
        }
    }

    /// The pid written in the pid file, if there is one and it parses.
    pub fn read_pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok().filter(|&p: &i32| p > 0)
    }
}

/// The canonical form of a mountpoint path without touching the mounted
/// filesystem itself (a hung daemon must not hang `naiad umount`): the
/// parent is canonicalized and the last component appended, unless the
/// path is itself a symlink.
pub fn canonical_mountpoint(path: &Path) -> std::io::Result<PathBuf> {
    let abs = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) };
    let is_link = std::fs::symlink_metadata(&abs).map(|m| m.file_type().is_symlink()).unwrap_or(false);
    match (abs.parent(), abs.file_name(), abs.components().next_back()) {
        (Some(parent), Some(name), Some(Component::Normal(_))) if !is_link => Ok(parent.canonicalize()?.join(name)),
        _ => abs.canonicalize(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_depend_on_the_mountpoint() {
        let a = RuntimePaths::new(Path::new("/run/naiad"), Path::new("/mnt/a"));
        let b = RuntimePaths::new(Path::new("/run/naiad"), Path::new("/mnt/b"));
        assert_ne!(a.socket, b.socket);
        assert!(a.socket.to_string_lossy().ends_with(".sock"));
        assert_eq!(mount_id(Path::new("/mnt/a")).len(), 16);
    }

    #[test]
    fn canonicalizes_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("mnt");
        std::fs::create_dir(&sub).unwrap();
        let c = canonical_mountpoint(&sub.join("../mnt")).unwrap();
        assert_eq!(c, dir.path().canonicalize().unwrap().join("mnt"));
    }
}
