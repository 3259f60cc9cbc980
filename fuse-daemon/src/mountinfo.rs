//! Reading `/proc/self/mountinfo`: which filesystem is mounted where, to
//! tell when a mount is ready, whether a path is a naiad mount, and what to
//! clean up.

use std::path::{Path, PathBuf};

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub mount_point: PathBuf,
    /// Filesystem type, e.g. `fuse.naiad`, `overlay`.
    pub fstype: String,
    /// The mount source, e.g. `naiad`.
    pub source: String,
    /// Per-mount options (`ro,nosuid,...`).
    pub options: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    use std::os::unix::ffi::OsStringExt;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 6 || r.len() < 2 {
            continue;
        }
        let Ok(mount_id) = l[0].parse() else { continue };
        out.push(MountEntry {
            mount_id,
            mount_point: PathBuf::from(std::ffi::OsString::from_vec(unescape(l[4]))),
            fstype: r[0].to_string(),
            source: String::from_utf8_lossy(&unescape(r[1])).into_owned(),
            options: l[5].to_string(),
        });
    }
    out
}

/// All mounts of this process's mount namespace.
pub fn mounts() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The topmost mount exactly at `path` (already canonical), if any.
pub fn find(path: &Path) -> std::io::Result<Option<MountEntry>> {
    Ok(mounts()?.into_iter().rfind(|m| m.mount_point == path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines() {
        let text = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                    90 27 0:50 / /tmp/a\\040b rw,nosuid,nodev,relatime shared:5 - fuse.naiad naiad ro,user_id=0\n\
                    garbage\n";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].mount_point, PathBuf::from("/tmp/a b"));
        assert_eq!(m[1].fstype, "fuse.naiad");
        assert_eq!(m[1].source, "naiad");
        assert_eq!(m[1].mount_id, 90);
    }
}
