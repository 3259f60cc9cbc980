//! Turning the merged [`Tree`] and the chunk table into a bootstrap.
//! Inodes are numbered breadth-first from the root, so a directory's
//! children sit near each other; a node reached by several names
//! (hardlinks) gets one inode.

use std::collections::VecDeque;

use naiad_format::{BootstrapBuilder, FileChunkRecord, InodeKind, InodeRecord, ROOT_INO};
use serde::Serialize;

use crate::chunk_sink::ChunkSink;
use crate::error::{ConvertError, Result};
use crate::tree::{NodeKind, Tree, ROOT};

/// What the tree held, counted while writing it.
#[derive(Debug, Default, Clone, Serialize)]
pub struct TreeCounts {
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    /// Names beyond the first of hardlinked files.
    pub hardlinks: u64,
    pub special_files: u64,
    /// Sum of the sizes of distinct regular files.
    pub file_bytes: u64,
    /// Entries in all files' chunk lists.
    pub chunk_refs: u64,
}

/// Builds the bootstrap bytes. `sink` must be flushed.
/// `prefetch` is the prefetch table (chunk indexes in fetch order).
pub fn write_bootstrap(tree: &Tree, sink: &ChunkSink, chunking: naiad_format::ChunkingParams, prefetch: Vec<u32>) -> Result<(Vec<u8>, TreeCounts)> {
    let mut b = BootstrapBuilder::new(Some(chunking));
    b.prefetch = prefetch;
    b.chunks = sink.chunks.clone();
    b.blobs = sink.blobs.clone();
    let mut counts = TreeCounts::default();

    // Number inodes breadth-first and lay out each directory's entries.
    let mut ino_of = vec![0u32; tree.nodes.len()];
    let mut order = vec![ROOT];
    let mut parent = vec![ROOT_INO];
    let mut refs = vec![0u32; tree.nodes.len()];
    let mut subdirs = vec![0u32; tree.nodes.len()];
    let mut dir_span = vec![(0u32, 0u32); tree.nodes.len()];
    ino_of[ROOT] = ROOT_INO;
    let mut queue = VecDeque::from([ROOT]);
    while let Some(dir) = queue.pop_front() {
        let NodeKind::Dir { children } = &tree.nodes[dir].kind else { continue };
        let first = u32::try_from(b.dirents.len()).map_err(|_| ConvertError::Invalid("more than 2^32 directory entries".into()))?;
        for (name, entry) in children {
            let child = entry.node;
            if ino_of[child] == 0 {
                order.push(child);
                parent.push(ino_of[dir]);
                ino_of[child] = u32::try_from(order.len()).map_err(|_| ConvertError::Invalid("too many inodes".into()))?;
                if tree.nodes[child].is_dir() {
                    queue.push_back(child);
                    subdirs[dir] += 1;
                }
            } else if tree.nodes[child].is_dir() {
                return Err(ConvertError::Invalid("a directory is linked twice".into()));
            }
            refs[child] += 1;
            b.push_dirent(name, ino_of[child]);
        }
        dir_span[dir] = (first, children.len() as u32);
    }

    for (i, &id) in order.iter().enumerate() {
        let node = &tree.nodes[id];
        let m = &node.meta;
        // Inodes are visited in number order, so the xattr table comes out
        // sorted by inode as the format requires.
        for (k, v) in &m.xattrs {
            b.push_xattr(i as u32 + 1, k, v);
        }
        let mut rec = InodeRecord {
            mode: m.mode & 0o7777,
            nlink: refs[id],
            uid: m.uid,
            gid: m.gid,
            mtime_sec: m.mtime_sec,
            mtime_nsec: m.mtime_nsec,
            parent: parent[i],
            ..Default::default()
        };
        let kind = match &node.kind {
            NodeKind::Dir { .. } => {
                counts.directories += 1;
                rec.nlink = 2 + subdirs[id];
                (rec.data_first, rec.data_count) = dir_span[id];
                InodeKind::Directory
            }
            NodeKind::File { size, pieces } => {
                counts.files += 1;
                counts.hardlinks += refs[id].saturating_sub(1) as u64;
                counts.file_bytes += size;
                counts.chunk_refs += pieces.len() as u64;
                rec.size = *size;
                rec.data_first = u32::try_from(b.file_chunks.len()).map_err(|_| ConvertError::Invalid("more than 2^32 chunk pieces".into()))?;
                rec.data_count = pieces.len() as u32;
                let mut offset = 0u64;
                for p in pieces {
                    let chunk_index = sink.chunk_index(p.seq).ok_or_else(|| ConvertError::Invalid(format!("chunk {} was never flushed", p.seq)))?;
                    b.file_chunks.push(FileChunkRecord { file_offset: offset, chunk_index, chunk_offset: p.chunk_offset });
                    offset += p.len as u64;
                }
                InodeKind::RegularFile
            }
            NodeKind::Symlink { target } => {
                counts.symlinks += 1;
                counts.hardlinks += refs[id].saturating_sub(1) as u64;
                rec.size = target.len() as u64;
                rec.data_first = b.intern(target);
                rec.data_count = target.len() as u32;
                InodeKind::Symlink
            }
            NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
                counts.special_files += 1;
                (rec.data_first, rec.data_count) = (*major, *minor);
                if matches!(node.kind, NodeKind::CharDevice { .. }) {
                    InodeKind::CharDevice
                } else {
                    InodeKind::BlockDevice
                }
            }
            NodeKind::Fifo => {
                counts.special_files += 1;
                InodeKind::Fifo
            }
        };
        rec.mode |= kind.mode_bits();
        b.inodes.push(rec);
    }
    Ok((b.finish()?, counts))
}
