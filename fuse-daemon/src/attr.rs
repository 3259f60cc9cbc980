//! Bootstrap inode records as the attributes FUSE reports, matching what a
//! local filesystem reports for the same tree:
//!
//! - inode numbers are the bootstrap's (root 1 is FUSE's root);
//! - times have nanoseconds; devices carry their number;
//! - symlinks have mode 0777, as on every Linux filesystem (the bootstrap
//!   keeps the tar header's bits, which Linux ignores for links);
//! - a directory's size follows ext4's linear layout ([`dir_size`]);
//! - `blocks` is `ceil(size / 512)`; for a regular file of several chunks
//!   the chunks that are all zeros (holes) do not count (see
//!   `NaiadFs::allocated_blocks`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};
use naiad_format::{InodeKind, InodeRecord};

/// Preferred I/O size reported by `stat`.
pub const BLOCK_SIZE: u32 = 4096;

pub fn file_type(kind: InodeKind) -> FileType {
    match kind {
        InodeKind::Directory => FileType::Directory,
        InodeKind::RegularFile => FileType::RegularFile,
        InodeKind::Symlink => FileType::Symlink,
        InodeKind::CharDevice => FileType::CharDevice,
        InodeKind::BlockDevice => FileType::BlockDevice,
        InodeKind::Fifo => FileType::NamedPipe,
        InodeKind::Socket => FileType::Socket,
    }
}

/// A timestamp as `SystemTime`, also before 1970; out-of-range values clamp
/// to the epoch rather than fail.
pub fn timestamp(sec: i64, nsec: u32) -> SystemTime {
    let nsec = nsec.min(999_999_999);
    if sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(sec as u64, nsec)).unwrap_or(UNIX_EPOCH)
    } else {
        // sec + nsec/1e9 with sec < 0: go back |sec| seconds, then forward nsec.
        UNIX_EPOCH.checked_sub(Duration::new(sec.unsigned_abs(), 0)).and_then(|t| t.checked_add(Duration::new(0, nsec))).unwrap_or(UNIX_EPOCH)
    }
}

/// The kernel's 32-bit device encoding (`new_encode_dev`), which FUSE uses
/// for `rdev`.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Bytes of a directory block, the unit of [`dir_size`].
pub const DIR_BLOCK: u64 = 4096;

/// The size of a directory whose entries (without `.` and `..`) have names
/// of `name_lens` bytes, as ext4 lays out a directory without an index:
/// each entry takes `8 + name_len` bytes rounded up to 4, `.` and `..`
/// included, packed into 4 KiB blocks (an entry never straddles two).
pub fn dir_size(name_lens: impl Iterator<Item = usize>) -> u64 {
    let rec_len = |n: usize| (8 + n as u64).div_ceil(4) * 4;
    let (mut blocks, mut used) = (1u64, rec_len(1) + rec_len(2));
    for n in name_lens {
        let r = rec_len(n);
        if used + r > DIR_BLOCK {
            blocks += 1;
            used = 0;
        }
        used += r;
    }
    blocks * DIR_BLOCK
}

/// The attributes of inode `ino`, whose record is `r` and kind `kind`; a
/// directory's size is the caller's to set ([`dir_size`]).
pub fn file_attr(ino: u32, r: &InodeRecord, kind: InodeKind) -> FileAttr {
    let t = timestamp(r.mtime_sec, r.mtime_nsec);
    let rdev = match kind {
        InodeKind::CharDevice | InodeKind::BlockDevice => {
            let (major, minor) = r.rdev();
            encode_dev(major, minor)
        }
        _ => 0,
    };
    FileAttr {
        ino: INodeNo(ino as u64),
        size: r.size,
        blocks: r.size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(kind),
        perm: if kind == InodeKind::Symlink { 0o777 } else { (r.mode & 0o7777) as u16 },
        nlink: r.nlink,
        uid: r.uid,
        gid: r.gid,
        rdev,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_devices_like_the_kernel() {
        // /dev/null is 1:3, /dev/sda1 8:1, a large minor 259:65536.
        assert_eq!(encode_dev(1, 3), 0x103);
        assert_eq!(encode_dev(8, 1), 0x801);
        assert_eq!(encode_dev(259, 65536), (259 << 8) | (65536 << 12));
    }

    #[test]
    fn timestamps_with_nanoseconds_and_before_epoch() {
        assert_eq!(timestamp(1, 5).duration_since(UNIX_EPOCH).unwrap(), Duration::new(1, 5));
        assert_eq!(UNIX_EPOCH.duration_since(timestamp(-2, 500_000_000)).unwrap(), Duration::new(1, 500_000_000));
    }

    #[test]
    fn directory_sizes_follow_ext4() {
        // An empty directory and a small one take one block.
        assert_eq!(dir_size(std::iter::empty()), 4096);
        assert_eq!(dir_size([3usize, 10, 200].into_iter()), 4096);
        // 340 entries of 4-byte names take 12 bytes each: 24 + 4080 = 4104 > 4096.
        assert_eq!(dir_size(std::iter::repeat_n(4usize, 339)), 4096);
        assert_eq!(dir_size(std::iter::repeat_n(4usize, 340)), 8192);
    }

    #[test]
    fn symlinks_are_0777() {
        let r = InodeRecord { mode: 0o120644, size: 3, nlink: 1, ..Default::default() };
        assert_eq!(file_attr(2, &r, InodeKind::Symlink).perm, 0o777);
    }

    #[test]
    fn blocks_round_up() {
        let r = InodeRecord { mode: 0o100644, size: 513, nlink: 1, ..Default::default() };
        let a = file_attr(5, &r, InodeKind::RegularFile);
        assert_eq!(a.blocks, 2);
        assert_eq!(a.perm, 0o644);
        assert_eq!(a.ino, INodeNo(5));
    }
}
