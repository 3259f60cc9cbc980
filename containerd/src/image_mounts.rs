//! [`ImageMounts`]: the naiad mounts behind image snapshots. One mount per
//! image (manifest digest), on `ROOT/mounts/<id>`, shared by every
//! snapshot and container of that image and started through
//! [`naiad_fuse::launcher`], so its daemon is an ordinary naiad mount:
//! `naiad stats --run-dir ROOT/run ROOT/mounts/<id>` answers for it, and it
//! outlives a snapshotter that is killed or restarted. A restarted
//! snapshotter [`ImageMounts::ensure`]s each image snapshot's mount again:
//! one still served is kept, one whose daemon is gone is mounted anew.

use std::path::{Path, PathBuf};
use std::time::Duration;

use naiad_fuse::launcher::{self, Unmounted};

use crate::config::SnapshotterConfig;
use crate::error::{IoContext, SnapshotterError};

/// How long a mount may take to become ready (the bootstrap is fetched).
const MOUNT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an unmount waits for the daemon to exit.
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ImageMounts {
    config: SnapshotterConfig,
    /// The naiad binary daemons are started from.
    exe: PathBuf,
    /// One launch or unmount at a time.
    lock: std::sync::Mutex<()>,
}

/// The mount directory of the image `source` (`...@sha256:HEX`).
pub fn mountpoint_for(root: &Path, source: &str) -> PathBuf {
    let digest = source.rsplit_once('@').map_or(source, |(_, d)| d);
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let mut name: String = hex.chars().filter(char::is_ascii_hexdigit).take(24).collect();
    if name.len() < 24 {
        use sha2::Digest;
        name = sha2::Sha256::digest(source.as_bytes()).iter().take(12).map(|b| format!("{b:02x}")).collect();
    }
    root.join("mounts").join(name)
}

impl ImageMounts {
    pub fn new(config: SnapshotterConfig, exe: PathBuf) -> Self {
        ImageMounts { config, exe, lock: std::sync::Mutex::new(()) }
    }

    /// Makes sure `source` is served on `mountpoint` (blocking): kept if a
    /// daemon serves it, mounted otherwise (a dead mount is detached first).
    pub fn ensure(&self, source: &str, mountpoint: &Path) -> Result<(), SnapshotterError> {
        let _one = self.lock.lock().map_err(|_| SnapshotterError::Mount { image: source.into(), reason: "mount lock poisoned".into() })?;
        let run_dir = self.config.run_dir();
        if launcher::serving(&run_dir, mountpoint) {
            return Ok(());
        }
        let fail = |reason: String| SnapshotterError::Mount { image: source.into(), reason };
        if launcher::is_naiad_mount(mountpoint) {
            tracing::warn!("{}: naiad mount without a serving daemon; mounting it again", mountpoint.display());
            let _ = naiad_fuse::daemon::unmount(mountpoint, true);
        }
        std::fs::create_dir_all(mountpoint).at(mountpoint)?;
        let config = self.config.daemon_config(source, mountpoint).map_err(fail)?;
        launcher::launch(&config, &self.exe, MOUNT_TIMEOUT, &|| false).map_err(|e| fail(e.to_string()))?;
        tracing::info!("{source}: mounted on {}", mountpoint.display());
        Ok(())
    }

    /// Unmounts the image mount on `mountpoint` and removes its directory
    /// (blocking). A mount still in use is detached: it goes away with its
    /// last user.
    pub fn release(&self, mountpoint: &Path) -> Result<(), SnapshotterError> {
        let _one = self.lock.lock().map_err(|_| SnapshotterError::Mount { image: mountpoint.display().to_string(), reason: "mount lock poisoned".into() })?;
        if launcher::is_naiad_mount(mountpoint) {
            let run_dir = self.config.run_dir();
            let outcome = match launcher::unmount_and_wait(&run_dir, mountpoint, false, UNMOUNT_TIMEOUT) {
                Err(naiad_fuse::FuseError::Unmount { source: nix::Error::EBUSY, .. }) => launcher::unmount_and_wait(&run_dir, mountpoint, true, UNMOUNT_TIMEOUT),
                other => other,
            };
            match outcome {
                Ok(Unmounted::Done) => tracing::info!("{}: unmounted", mountpoint.display()),
                Ok(Unmounted::Detached) => tracing::info!("{}: busy, detached", mountpoint.display()),
                Err(e) => return Err(SnapshotterError::Mount { image: mountpoint.display().to_string(), reason: format!("unmounting: {e}") }),
            }
        }
        match std::fs::remove_dir(mountpoint) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SnapshotterError::Io { path: mountpoint.to_path_buf(), source: e }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_mount_directory_per_manifest() {
        let root = Path::new("/r");
        let a = mountpoint_for(root, "docker://h/x@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
        assert_eq!(a, Path::new("/r/mounts/0123456789abcdef01234567"));
        // A hostile name cannot leave ROOT/mounts.
        let odd = mountpoint_for(root, "docker://h/x@sha256:../../etc");
        assert_eq!(odd.parent(), Some(Path::new("/r/mounts")));
        assert_eq!(odd.file_name().map(|n| n.len()), Some(24));
    }
}
