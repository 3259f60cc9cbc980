//! Loading the program a mount is about to run, before it runs: the
//! program file (found on the image's `PATH`), its ELF interpreter and the
//! shared libraries it needs (`DT_NEEDED`, transitively) are looked up in
//! the bootstrap at mount, and loaded in the background, the files of each
//! level side by side. A file of at most [`WHOLE_FILE_MAX`] has every
//! loadable segment loaded: the process faults its code and read-only data
//! in all over, each fault a round trip of its own otherwise (loading them
//! halved the demand requests of `node -e` and `python3 -c 'import
//! numpy'` for about 2% more bytes). Of a larger one (node's `libnode`, the
//! 30 MB `libicudata` of which node reads 0.6 MB) only what the dynamic
//! loader touches first: the headers, the first loadable segment with the
//! symbol and relocation tables, and the writable segments it relocates.
//! Without this the dynamic loader opens one library after the other, and
//! each first read is a cold round trip to the registry.
//!
//! Only for lazy mounts: an image with a recorded startup set (a prefetch
//! table) knows better and loads that instead. Anything that is not a
//! 64-bit little-endian ELF file, or not found, is skipped quietly.

use std::collections::HashSet;
use std::sync::Arc;

use naiad_format::{ChunkRecord, InodeKind};
use naiad_reader::NaiadImage;
use naiad_runtime::{image_path, CommandOverrides};
use serde::{Deserialize, Serialize};

use crate::chunk_cache::ChunkCache;
use crate::counters::Origin;

/// Which program a mount loads ahead ([`crate::MountConfig::program`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProgramLoad {
    /// None (`naiad mount`).
    #[default]
    Off,
    /// The program of the command line that these overrides make of the
    /// image's Entrypoint and Cmd (`naiad run`; containerd image mounts
    /// with no overrides).
    Command(CommandOverrides),
    /// This program: a path in the image, or a name looked up on the image's
    /// `PATH`.
    Named(String),
}

/// Files loaded at most, program and libraries together.
const MAX_FILES: usize = 64;
/// Library levels followed at most.
const MAX_DEPTH: usize = 8;
/// Bytes of a file read to find its ELF and program headers.
const HEAD_BYTES: u64 = 64 << 10;
/// Bytes loaded of one segment at most.
const SEGMENT_LOAD_MAX: u64 = 16 << 20;
/// Largest file whose loadable segments are all loaded.
const WHOLE_FILE_MAX: u64 = 8 << 20;
/// Where the dynamic loader looks for libraries (no `DT_RUNPATH`, no
/// `ld.so.cache`: the usual places of Debian-like and other images).
const LIBRARY_DIRS: [&str; 8] =
    ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"];

/// Starts loading `program` of `image` into `cache` on a thread of its own
/// (detached: it ends with its last load, or with the daemon); not when
/// background loads are off (`background_loads`: no prefetch, no
/// read-ahead) or the image has a startup set.
pub fn start(image: Arc<NaiadImage>, cache: Arc<ChunkCache>, program: &ProgramLoad, background_loads: bool) {
    if !background_loads || !image.startup_set().is_empty() {
        return;
    }
    let name = match program {
        ProgramLoad::Off => return,
        ProgramLoad::Command(overrides) => match overrides.command_line(image.config.get("config")).into_iter().next() {
            Some(n) => n,
            None => return,
        },
        ProgramLoad::Named(n) => n.clone(),
    };
    let _ = std::thread::Builder::new().name("naiad-program".into()).spawn(move || {
        let t = std::time::Instant::now();
        let loaded = load_program(&image, &cache, &name);
        tracing::debug!("program {name}: loaded {loaded} files ahead in {:?}", t.elapsed());
    });
}

/// Loads `name` and the libraries it needs, level by level; returns how
/// many files it loaded.
fn load_program(image: &NaiadImage, cache: &ChunkCache, name: &str) -> usize {
    let candidates: Vec<String> = if name.contains('/') {
        vec![name.to_string()]
    } else {
        image_path(image.config.get("config")).split(':').filter(|d| !d.is_empty()).map(|d| format!("{d}/{name}")).collect()
    };
    let Some(first) = candidates.iter().find_map(|p| resolve(image, p.as_bytes())) else { return 0 };
    let mut seen: HashSet<u32> = HashSet::from([first]);
    let mut level = vec![first];
    for _ in 0..MAX_DEPTH {
        if level.is_empty() {
            break;
        }
        let wants: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
            let loads: Vec<_> = level.iter().map(|&ino| s.spawn(move || load_elf(image, cache, ino))).collect();
            loads.into_iter().map(|h| h.join().unwrap_or_default()).collect()
        });
        let mut next = Vec::new();
        for name in wants.into_iter().flatten() {
            let found = if name.contains(&b'/') { resolve(image, &name) } else { LIBRARY_DIRS.iter().find_map(|d| resolve(image, &[d.as_bytes(), b"/", &name].concat())) };
            if let Some(ino) = found {
                if seen.len() < MAX_FILES && seen.insert(ino) {
                    next.push(ino);
                }
            }
        }
        level = next;
    }
    seen.len()
}

/// The regular file `path` names in the image, symlinks followed.
fn resolve(image: &NaiadImage, path: &[u8]) -> Option<u32> {
    let b = &image.bootstrap;
    let ino = b.resolve_path_following(path).ok()??;
    (b.inode(ino).ok()?.kind()? == InodeKind::RegularFile).then_some(ino)
}

/// Bytes `[offset, offset + len)` of inode `ino` (short at the end of the
/// file), loading what no cache holds; `None` if a chunk cannot be had.
fn read(image: &NaiadImage, cache: &ChunkCache, ino: u32, offset: u64, len: u64) -> Option<Vec<u8>> {
    let pieces = image.bootstrap.file_chunks_in_range(ino, offset, len).ok()?;
    load(cache, pieces.iter().map(|p| p.chunk).collect());
    let end = offset.saturating_add(len);
    let mut out = Vec::new();
    for p in &pieces {
        let data = cache.get(&p.chunk).ok()?;
        let piece = p.slice(&data)?;
        let from = offset.max(p.file_offset);
        let to = end.min(p.file_end());
        if from < to {
            out.extend_from_slice(&piece[(from - p.file_offset) as usize..(to - p.file_offset) as usize]);
        }
    }
    Some(out)
}

/// Loads the chunks no cache holds, as one background batch.
fn load(cache: &ChunkCache, mut chunks: Vec<ChunkRecord>) {
    let mut seen = HashSet::new();
    chunks.retain(|c| seen.insert(c.digest) && !cache.is_cached(c));
    if !chunks.is_empty() {
        cache.load_batch(&chunks, Origin::ReadAhead, |_| {});
    }
}

/// Loads what the dynamic loader reads of ELF file `ino` first and
/// returns the names of the files it needs (its interpreter, its
/// `DT_NEEDED` libraries).
fn load_elf(image: &NaiadImage, cache: &ChunkCache, ino: u32) -> Vec<Vec<u8>> {
    let Ok(rec) = image.bootstrap.inode(ino) else { return Vec::new() };
    let Some(head) = read(image, cache, ino, 0, HEAD_BYTES.min(rec.size)) else { return Vec::new() };
    let Some(elf) = Elf::parse(&head) else { return Vec::new() };
    // Every loadable segment of a file of at most WHOLE_FILE_MAX; of a
    // larger one the first (headers, symbols, relocations) and the
    // writable ones (relocated at load time). The writable ones go in a
    // request of their own, beside the rest: the loader relocates them
    // first, and they come last in the file (python3's first fault there
    // waited 147 ms behind its whole file, 6.8 MB).
    let whole = rec.size <= WHOLE_FILE_MAX;
    let (mut writable, mut rest) = (Vec::new(), Vec::new());
    for (i, seg) in elf.loads.iter().enumerate() {
        if i == 0 || seg.writable || whole {
            if let Ok(pieces) = image.bootstrap.file_chunks_in_range(ino, seg.offset, seg.filesz.min(SEGMENT_LOAD_MAX)) {
                let to = if seg.writable { &mut writable } else { &mut rest };
                to.extend(pieces.iter().map(|p| p.chunk));
            }
        }
    }
    std::thread::scope(|s| {
        s.spawn(|| load(cache, writable));
        load(cache, rest);
    });
    let mut wants = Vec::new();
    if let Some((off, len)) = elf.interp {
        if let Some(bytes) = read(image, cache, ino, off, len.min(4096)) {
            wants.push(bytes.split(|&c| c == 0).next().unwrap_or_default().to_vec());
        }
    }
    if let Some((off, len)) = elf.dynamic {
        if let Some(dynamic) = read(image, cache, ino, off, len.min(1 << 20)) {
            wants.extend(elf.needed(&dynamic, |off, len| read(image, cache, ino, off, len)));
        }
    }
    wants.retain(|w| !w.is_empty());
    wants
}

/// A loadable segment of an ELF file.
struct Segment {
    offset: u64,
    vaddr: u64,
    filesz: u64,
    writable: bool,
}

/// What [`load_elf`] needs of an ELF file's program headers.
struct Elf {
    loads: Vec<Segment>,
    /// File offset and size of the interpreter's path (`PT_INTERP`).
    interp: Option<(u64, u64)>,
    /// File offset and size of the dynamic section (`PT_DYNAMIC`).
    dynamic: Option<(u64, u64)>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl Elf {
    /// Parses a 64-bit little-endian ELF file's program headers from its
    /// first bytes; `None` for anything else.
    fn parse(head: &[u8]) -> Option<Elf> {
        if head.get(..6)? != b"\x7fELF\x02\x01" {
            return None;
        }
        let phoff = u64_at(head, 32)? as usize;
        let phentsize = u16_at(head, 54)? as usize;
        let phnum = u16_at(head, 56)? as usize;
        if phentsize < 56 {
            return None;
        }
        let mut elf = Elf { loads: Vec::new(), interp: None, dynamic: None };
        for i in 0..phnum.min(64) {
            let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
            let (kind, flags, offset, vaddr, filesz) = (u32_at(head, at)?, u32_at(head, at + 4)?, u64_at(head, at + 8)?, u64_at(head, at + 16)?, u64_at(head, at + 32)?);
            match kind {
                1 => elf.loads.push(Segment { offset, vaddr, filesz, writable: flags & 2 != 0 }),
                2 => elf.dynamic = Some((offset, filesz)),
                3 => elf.interp = Some((offset, filesz)),
                _ => {}
            }
        }
        Some(elf)
    }

    /// The file offset of virtual address `vaddr`.
    fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.loads.iter().find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.filesz).map(|s| s.offset + (vaddr - s.vaddr))
    }

    /// The `DT_NEEDED` names of the dynamic section `dynamic`, their
    /// string table read by `read(offset, len)`.
    fn needed(&self, dynamic: &[u8], read: impl Fn(u64, u64) -> Option<Vec<u8>>) -> Vec<Vec<u8>> {
        let (mut needed, mut strtab, mut strsz) = (Vec::new(), None, None);
        for entry in dynamic.chunks_exact(16) {
            let (tag, val) = (u64_at(entry, 0).unwrap_or(0), u64_at(entry, 8).unwrap_or(0));
            match tag {
                0 => break,
                1 => needed.push(val),
                5 => strtab = Some(val),
                10 => strsz = Some(val),
                _ => {}
            }
        }
        let (Some(strtab), Some(strsz)) = (strtab, strsz) else { return Vec::new() };
        let Some(table) = self.file_offset(strtab).and_then(|off| read(off, strsz.min(16 << 20))) else { return Vec::new() };
        needed.iter().filter_map(|&at| table.get(at as usize..)).map(|s| s.split(|&c| c == 0).next().unwrap_or_default().to_vec()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF header with the given program headers
    /// (type, flags, offset, vaddr, filesz).
    fn elf_with(phdrs: &[(u32, u32, u64, u64, u64)]) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56 * phdrs.len()];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for (i, &(kind, flags, offset, vaddr, filesz)) in phdrs.iter().enumerate() {
            let at = 64 + 56 * i;
            b[at..at + 4].copy_from_slice(&kind.to_le_bytes());
            b[at + 4..at + 8].copy_from_slice(&flags.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&offset.to_le_bytes());
            b[at + 16..at + 24].copy_from_slice(&vaddr.to_le_bytes());
            b[at + 32..at + 40].copy_from_slice(&filesz.to_le_bytes());
        }
        b
    }

    #[test]
    fn program_headers_and_needed_libraries_are_read() {
        let head = elf_with(&[(3, 4, 0x200, 0x200, 28), (1, 4, 0, 0, 0x1000), (1, 5, 0x1000, 0x401000, 0x2000), (1, 6, 0x3000, 0x603000, 0x800), (2, 6, 0x3100, 0x603100, 64)]);
        let elf = Elf::parse(&head).expect("an ELF file");
        assert_eq!(elf.loads.len(), 3);
        assert_eq!(elf.loads.iter().map(|s| s.writable).collect::<Vec<_>>(), [false, false, true]);
        assert_eq!(elf.interp, Some((0x200, 28)));
        assert_eq!(elf.dynamic, Some((0x3100, 64)));
        assert_eq!(elf.file_offset(0x603010), Some(0x3010));
        assert_eq!(elf.file_offset(0x900000), None);

        // DT_NEEDED at 1 and 7 of a string table at vaddr 0x500 (file 0x500).
        let strtab = b"\0libc.so.6\0libm.so.6\0".to_vec();
        let mut dynamic = Vec::new();
        for (tag, val) in [(1u64, 1u64), (5, 0x500), (1, 11), (10, strtab.len() as u64), (0, 0), (1, 99)] {
            dynamic.extend_from_slice(&tag.to_le_bytes());
            dynamic.extend_from_slice(&val.to_le_bytes());
        }
        let needed = elf.needed(&dynamic, |off, len| (off == 0x500).then(|| strtab[..len as usize].to_vec()));
        assert_eq!(needed, [b"libc.so.6".to_vec(), b"libm.so.6".to_vec()]);
    }

    #[test]
    fn anything_but_a_64_bit_little_endian_elf_file_is_skipped() {
        assert!(Elf::parse(b"#!/bin/sh\n").is_none());
        let mut big_endian = elf_with(&[]);
        big_endian[5] = 2;
        assert!(Elf::parse(&big_endian).is_none());
        // Program headers beyond the bytes read: not readable.
        let mut cut = elf_with(&[(1, 4, 0, 0, 10)]);
        cut[56..58].copy_from_slice(&1000u16.to_le_bytes());
        assert!(Elf::parse(&cut).is_none());
        assert!(Elf::parse(&[]).is_none());
    }
}
