//! [`Passthrough`]: which opens of a regular file the kernel serves itself
//! from a backing file (FUSE passthrough, Linux 6.9+), and the rules the
//! kernel imposes on them.
//!
//! The kernel refuses an open that mixes modes on one inode: while any
//! open of an inode reads through the daemon (cached I/O), a passthrough
//! open of it fails, and while it has passthrough opens, every further
//! open must name the same backing file (backing id). So for each inode
//! this module keeps how many opens of each kind are outstanding and the
//! backing id they share, in a slot of a file shared by every daemon
//! generation of the mount (`<run>/<id>.opens`, see
//! [`crate::shared_mapping`]): a daemon that replaces a dead one knows what
//! the kernel still has open, releases included. A slot packs
//! `backing id (32 bits) | passthrough opens (16) | cached opens (16)` and
//! changes only by compare-and-swap, so two daemons of a live upgrade agree.
//!
//! An open of an inode with no outstanding opens gets passthrough if
//! [`BackingFiles`] has a verified backing file for it; otherwise it is a
//! cached open, and a read of it offers the file for assembly. When the last
//! passthrough open of an inode is released, its backing id is closed.
//!
//! Passthrough is on with `--passthrough` only: without it, opens are
//! zero-message (see [`crate::filesystem`]) and the daemon reads backing
//! files itself, which measures faster for trees of small files.
//!
//! Passthrough is off when the kernel did not grant it at INIT, when the
//! daemon lacks the privilege to register backing files (the first failure
//! turns it off, logged once), or with `--record-trace` (the daemon must
//! see every read).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use fuser::{FileHandle, FopenFlags, ReplyOpen};

use crate::backing_files::BackingFiles;
use crate::counters::{inc, Counters};
use crate::error::FuseError;
use crate::shared_mapping::SharedMapping;

/// File handle of a cached open.
pub const FH_CACHED: u64 = 1;
/// File handle of a passthrough open.
pub const FH_PASSTHROUGH: u64 = 2;

/// "naiadopn": the first word of an open table.
const TABLE_MAGIC: u64 = u64::from_le_bytes(*b"naiadopn");
/// Opens of one kind an inode may have outstanding (16 bits each).
const MAX_OPENS: u64 = 0xffff;

/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = (1 << 30) | (4 << 16) | (229 << 8) | 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    backing_id: u32,
    passthrough: u64,
    cached: u64,
}

impl Slot {
    fn unpack(v: u64) -> Slot {
        Slot { backing_id: (v >> 32) as u32, passthrough: (v >> 16) & MAX_OPENS, cached: v & MAX_OPENS }
    }
    fn pack(self) -> u64 {
        ((self.backing_id as u64) << 32) | (self.passthrough.min(MAX_OPENS) << 16) | self.cached.min(MAX_OPENS)
    }
}

/// The passthrough state of one mount (see the module comment).
pub struct Passthrough {
    files: std::sync::Arc<BackingFiles>,
    table: SharedMapping,
    slots: usize,
    /// The mount's `/dev/fuse` connection, to close backing ids.
    fuse: OwnedFd,
    enabled: AtomicBool,
    counters: std::sync::Arc<Counters>,
}

/// What [`Passthrough::open`] did with the reply.
pub enum Opened {
    /// Answered (passthrough or cached).
    Done,
    /// Not answered: the caller answers with a cached open of its own.
    Declined(ReplyOpen),
}

impl Passthrough {
    /// The passthrough state of a mount with `inodes` inodes, its table at
    /// `table_path`; `fuse` is (a duplicate of) the mount's connection.
    pub fn new(files: std::sync::Arc<BackingFiles>, table_path: &Path, inodes: u32, fuse: OwnedFd, counters: std::sync::Arc<Counters>) -> Result<Self, FuseError> {
        let slots = inodes as usize + 1;
        let table = SharedMapping::open(table_path, slots * 8, TABLE_MAGIC, inodes as u64)?;
        Ok(Passthrough { files, table, slots, fuse, enabled: AtomicBool::new(true), counters })
    }

    /// Turns passthrough off for the rest of this daemon's life (the
    /// kernel did not grant it; `--record-trace`).
    pub fn disable(&self) {
        self.enabled.store(false, Ordering::SeqCst);
    }

    fn slot(&self, ino: u32) -> Option<&AtomicU64> {
        self.table.slots(self.slots).get(ino as usize)
    }

    /// Answers the open of regular file `ino`: passthrough when the inode's
    /// state allows it and a backing file exists, else a cached open.
    pub fn open(&self, ino: u32, reply: ReplyOpen) -> Opened {
        let Some(slot) = self.slot(ino) else { return Opened::Declined(reply) };
        let mut fresh: Option<u32> = None;
        loop {
            let cur = slot.load(Ordering::SeqCst);
            let s = Slot::unpack(cur);
            if s.passthrough > 0 && s.passthrough < MAX_OPENS {
                // Join the inode's backing file.
                if let Some(id) = fresh.take() {
                    self.close_backing(id);
                }
                let next = Slot { passthrough: s.passthrough + 1, ..s };
                if slot.compare_exchange(cur, next.pack(), Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                    self.reply_passthrough(reply, s.backing_id);
                    return Opened::Done;
                }
                continue;
            }
            let want_backing = s.passthrough == 0 && s.cached == 0 && self.enabled.load(Ordering::SeqCst);
            if want_backing && fresh.is_none() {
                fresh = self.register(ino, &reply);
                if fresh.is_some() {
                    continue;
                }
            }
            match fresh {
                Some(id) if s.passthrough == 0 && s.cached == 0 => {
                    let next = Slot { backing_id: id, passthrough: 1, cached: 0 };
                    if slot.compare_exchange(cur, next.pack(), Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                        self.reply_passthrough(reply, id);
                        return Opened::Done;
                    }
                }
                _ => {
                    if let Some(id) = fresh.take() {
                        self.close_backing(id);
                    }
                    if s.passthrough > 0 {
                        // The inode's passthrough opens are at their limit.
                        return Opened::Declined(reply);
                    }
                    let next = Slot { cached: s.cached + 1, ..s };
                    if slot.compare_exchange(cur, next.pack(), Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                        return Opened::Declined(reply);
                    }
                }
            }
        }
    }

    /// Registers the backing file of `ino` with the kernel: its id, if it
    /// has a verified backing file and the kernel takes it.
    fn register(&self, ino: u32, reply: &ReplyOpen) -> Option<u32> {
        let (file, _key): (File, _) = self.files.open_verified(ino)?;
        match reply.open_backing(&file) {
            Ok(id) => Some(id.into_raw()),
            Err(e) => {
                if self.enabled.swap(false, Ordering::SeqCst) {
                    tracing::warn!("passthrough off: the kernel refused a backing file ({e}); files are read through the daemon");
                }
                None
            }
        }
    }

    fn reply_passthrough(&self, reply: ReplyOpen, id: u32) {
        // SAFETY: `id` is registered on this connection and stays so while
        // the slot counts a passthrough open (closed only after the count
        // drops to zero); into_raw keeps this wrapper from closing it.
        let backing = unsafe { reply.wrap_backing(id) };
        reply.opened_passthrough(FileHandle(FH_PASSTHROUGH), FopenFlags::empty(), &backing);
        backing.into_raw();
        inc(&self.counters.passthrough_opens);
    }

    fn close_backing(&self, id: u32) {
        // SAFETY: FUSE_DEV_IOC_BACKING_CLOSE reads one u32 from the pointer.
        let rc = unsafe { libc::ioctl(self.fuse.as_raw_fd(), FUSE_DEV_IOC_BACKING_CLOSE as _, &id as *const u32) };
        if rc < 0 {
            tracing::debug!("closing backing id {id}: {}", std::io::Error::last_os_error());
        }
    }

    /// The release of an open of `ino` with file handle `fh`.
    pub fn release(&self, ino: u32, fh: u64) {
        let Some(slot) = self.slot(ino) else { return };
        let mut closed = None;
        let _ = slot.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
            let s = Slot::unpack(v);
            closed = None;
            Some(match fh {
                FH_PASSTHROUGH if s.passthrough == 1 => {
                    closed = Some(s.backing_id);
                    Slot { backing_id: 0, passthrough: 0, ..s }.pack()
                }
                FH_PASSTHROUGH if s.passthrough > 0 && s.passthrough < MAX_OPENS => Slot { passthrough: s.passthrough - 1, ..s }.pack(),
                FH_CACHED if s.cached > 0 && s.cached < MAX_OPENS => Slot { cached: s.cached - 1, ..s }.pack(),
                // A count at its limit stays (the inode keeps its mode).
                _ => v,
            })
        });
        if let Some(id) = closed {
            self.close_backing(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_pack_and_unpack() {
        let s = Slot { backing_id: 0xdead_beef, passthrough: 3, cached: 0 };
        assert_eq!(Slot::unpack(s.pack()), s);
        let s = Slot { backing_id: 0, passthrough: 0, cached: 70000 };
        assert_eq!(Slot::unpack(s.pack()).cached, MAX_OPENS);
    }

    #[test]
    fn the_close_ioctl_number_is_the_kernels() {
        // _IOW(229, 2, uint32_t) on x86_64 and aarch64.
        assert_eq!(FUSE_DEV_IOC_BACKING_CLOSE, 0x4004_e502);
    }
}
