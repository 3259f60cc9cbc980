//! The image's user database, read as the container sees it: resolving
//! an OCI `User` (`name`, `uid`, `name:group`, `uid:gid`) to numeric ids,
//! groups and home directory, and merging environments.
//!
//! `/etc/passwd` and `/etc/group` are read inside the image root
//! ([`read_in_root`]): links in the image can never point the reader at a
//! host file, a FIFO or a device.

use std::fs;
use std::path::Path;

use crate::error::RuntimeError;
use crate::image_command::DEFAULT_PATH;

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
pub fn read_in_root(root: &Path, rel: &str) -> Result<Vec<u8>, RuntimeError> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    let dir = fs::File::open(root).map_err(|source| RuntimeError::Io { path: root.to_path_buf(), source })?;
    let how =
        OpenHow::new().flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY).resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let path = root.join(rel);
    let file = match openat2(&dir, rel, how) {
        Ok(fd) => fs::File::from(fd),
        Err(nix::Error::ENOENT) | Err(nix::Error::ENOTDIR) | Err(nix::Error::ELOOP) => return Ok(Vec::new()),
        Err(e) => return Err(RuntimeError::Io { path, source: e.into() }),
    };
    let meta = file.metadata().map_err(|source| RuntimeError::Io { path: path.clone(), source })?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(RuntimeError::Image(format!("the image's /{rel} is {what}")));
    }
    let mut data = Vec::new();
    file.take(MAX_USER_DB + 1).read_to_end(&mut data).map_err(|source| RuntimeError::Io { path: path.clone(), source })?;
    if data.len() as u64 > MAX_USER_DB {
        return Err(RuntimeError::Image(format!("the image's /{rel} is larger than {MAX_USER_DB} bytes")));
    }
    Ok(data)
}

/// Whether `argv0` names a file in the image rooted at `root`: as a path
/// when it has a `/`, else in the directories of `env`'s PATH (or
/// [`DEFAULT_PATH`]), looked up inside the image.
pub fn command_exists(root: &Path, argv0: &str, env: &[String]) -> bool {
    let exists = |rel: &str| {
        use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
        let Ok(dir) = fs::File::open(root) else { return false };
        let how = OpenHow::new().flags(OFlag::O_PATH | OFlag::O_CLOEXEC).resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        openat2(&dir, rel.trim_start_matches('/'), how).ok().map(fs::File::from).and_then(|f| f.metadata().ok()).is_some_and(|m| !m.is_dir())
    };
    if argv0.contains('/') {
        return exists(argv0);
    }
    let path = env.iter().find_map(|kv| kv.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
    path.split(':').any(|d| exists(&format!("{}/{argv0}", if d.is_empty() { "." } else { d })))
}

/// Resolves an OCI `User` value (`""`, `uid`, `uid:gid`, `name`,
/// `name:group`, ...) against the image rooted at `root`. A name must exist
/// in the image; a numeric id need not.
pub fn resolve_user(root: &Path, user: &str) -> Result<ResolvedUser, RuntimeError> {
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
        Some(pw_entries.iter().find(|f| f[0] == u).ok_or_else(|| RuntimeError::Image(format!("user {u:?} not found in the image's /etc/passwd")))?)
    };
    let uid = match u.parse::<u32>() {
        Ok(n) => n,
        Err(_) => pw.and_then(|f| f[2].parse().ok()).ok_or_else(|| RuntimeError::Image(format!("user {u:?} has an invalid uid in /etc/passwd")))?,
    };
    let gid = match g {
        Some(g) if !g.is_empty() => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => gr_entries
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| RuntimeError::Image(format!("group {g:?} not found in the image's /etc/group")))?,
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
pub fn merge_env(base: &[String], overrides: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for kv in base.iter().chain(overrides) {
        let key = kv.split_once('=').map(|(k, _)| k).unwrap_or(kv);
        out.retain(|e| e.split_once('=').map(|(k, _)| k).unwrap_or(e) != key);
        out.push(kv.clone());
    }
    out
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
        assert_eq!(env, ["PATH=/bin", "A=2", "B=3"]);
    }
}
