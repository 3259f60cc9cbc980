//! `naiad unpack`: the merged root filesystem of a naiad image written back
//! out, as a directory tree or as a tar file, with every chunk verified.
//! Output goes to a temporary name beside the destination and is renamed
//! into place only when complete.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use naiad_format::{InodeKind, InodeRecord, ROOT_INO};
use naiad_reader::{ChunkReader, NaiadImage};

use crate::error::{ConvertError, Result};

fn io_at(path: &Path) -> impl Fn(io::Error) -> ConvertError + '_ {
    move |source| ConvertError::Io { path: path.to_path_buf(), source }
}

/// Stored bytes of chunks fetched together (across files): a few of the
/// reader's largest requests, which it runs at once.
const READ_AHEAD_STORED: u64 = 32 << 20;
/// Decoded bytes one batch may hold in memory.
const READ_AHEAD_DECODED: u64 = 64 << 20;

/// The decoded pieces (chunks, or a small file's share of a chunk group) of
/// every regular file, in the order the unpack
/// writes the files, read ahead in batches of up to [`READ_AHEAD_STORED`] stored bytes (and
/// [`READ_AHEAD_DECODED`] decoded ones)
/// across file boundaries: a batch is one [`ChunkReader::read_chunks`] call,
/// which merges near chunks into requests of up to its `max_request`, so a
/// tree of small files costs a request per few MiB rather than one per file. Each chunk's
/// result is kept until its file takes it, so an error names the file it
/// belongs to. Holds one batch at a time.
pub struct ChunkStream<'a> {
    reader: &'a ChunkReader,
    image: &'a NaiadImage,
    /// Regular files in the order they are written, and where the next
    /// batch starts: (file, chunk of that file).
    files: Vec<u32>,
    next: (usize, u32),
    /// How many files have taken (or are taking) their chunks.
    taken: usize,
    ready: VecDeque<std::result::Result<Vec<u8>, String>>,
}

impl<'a> ChunkStream<'a> {
    /// A stream over the chunks of `files` (inode numbers), in that order.
    pub fn new(reader: &'a ChunkReader, files: Vec<u32>) -> Self {
        ChunkStream { reader, image: reader.image(), files, next: (0, 0), taken: 0, ready: VecDeque::new() }
    }

    /// The regular files of the image in walk order, each once (the first
    /// path of a hardlinked inode is the one written).
    pub fn walk_order(image: &NaiadImage) -> Result<Vec<u32>> {
        let mut seen = std::collections::HashSet::new();
        let mut files = Vec::new();
        image.bootstrap.walk(|_, ino, inode| -> Result<()> {
            if inode.kind() == Some(InodeKind::RegularFile) && seen.insert(ino) {
                files.push(ino);
            }
            Ok(())
        })?;
        Ok(files)
    }

    /// The next piece's bytes (or why its chunk could not be read).
    fn next_chunk(&mut self) -> io::Result<Vec<u8>> {
        if self.ready.is_empty() {
            self.fetch_batch()?;
        }
        match self.ready.pop_front() {
            Some(Ok(d)) => Ok(d),
            Some(Err(e)) => Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no more chunks in the image")),
        }
    }

    fn fetch_batch(&mut self) -> io::Result<()> {
        let b = &self.image.bootstrap;
        let bad = |e: naiad_format::FormatError| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
        let mut batch: Vec<naiad_format::FileChunk> = Vec::new();
        // A chunk several files share (a chunk group) is read, decoded and
        // counted once per batch.
        let mut unique: Vec<naiad_format::ChunkRecord> = Vec::new();
        let mut index: HashMap<naiad_format::ChunkDigest, usize> = HashMap::new();
        let (mut stored, mut decoded) = (0u64, 0u64);
        while let Some(&ino) = self.files.get(self.next.0) {
            let count = b.file_chunk_len(ino).map_err(bad)?;
            if self.next.1 >= count {
                self.next = (self.next.0 + 1, 0);
                continue;
            }
            let piece = b.file_chunk(ino, self.next.1).map_err(bad)?;
            let c = piece.chunk;
            if let std::collections::hash_map::Entry::Vacant(slot) = index.entry(c.digest) {
                if !batch.is_empty() && (stored + c.compressed_size as u64 > READ_AHEAD_STORED || decoded + c.uncompressed_size as u64 > READ_AHEAD_DECODED) {
                    break;
                }
                stored += c.compressed_size as u64;
                decoded += c.uncompressed_size as u64;
                slot.insert(unique.len());
                unique.push(c);
            }
            batch.push(piece);
            self.next.1 += 1;
        }
        let results: Vec<_> = self.reader.read_chunks(&unique).into_iter().map(|r| r.map(|c| c.data).map_err(|e| e.to_string())).collect();
        for piece in &batch {
            let bytes = match &results[index[&piece.chunk.digest]] {
                Ok(data) => piece.slice(data).map(<[u8]>::to_vec).ok_or_else(|| format!("chunk {} is shorter than its piece", piece.chunk_index)),
                Err(e) => Err(e.clone()),
            };
            self.ready.push_back(bytes);
        }
        Ok(())
    }
}

/// Streams one file's bytes from the [`ChunkStream`], every chunk verified.
pub struct FileReader<'s, 'a> {
    stream: &'s mut ChunkStream<'a>,
    /// Chunks of this file not taken yet.
    remaining: u32,
    current: io::Cursor<Vec<u8>>,
}

impl<'s, 'a> FileReader<'s, 'a> {
    /// The reader of regular file `ino`, which must be the stream's next file.
    pub fn new(stream: &'s mut ChunkStream<'a>, ino: u32) -> Result<Self> {
        // The chunks come in the stream's file order: any other order would
        // hand this file another file's (verified) bytes.
        if stream.files.get(stream.taken) != Some(&ino) {
            return Err(ConvertError::Invalid(format!("unpack: inode {ino} read out of order (expected {:?})", stream.files.get(stream.taken))));
        }
        stream.taken += 1;
        let remaining = stream.image.bootstrap.file_chunk_len(ino)?;
        Ok(FileReader { stream, remaining, current: io::Cursor::new(Vec::new()) })
    }
}

impl Read for FileReader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() || self.remaining == 0 {
                return Ok(n);
            }
            self.current = io::Cursor::new(self.stream.next_chunk()?);
            self.remaining -= 1;
        }
    }
}

fn sibling_temp(dest: &Path) -> Result<(PathBuf, String)> {
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    Ok((parent, name))
}

/// What a directory unpack may create. As root, by default, everything the
/// image holds, like `umoci raw unpack` and GNU tar; these turn parts off.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnpackOptions {
    /// Leave character and block devices out (`--no-devices`).
    pub no_devices: bool,
    /// Clear setuid and setgid bits (`--no-setuid`).
    pub no_setuid: bool,
}

/// Writes the image's tree into `dest`, which must not exist or be empty.
pub fn unpack_to_dir(reader: &ChunkReader, dest: &Path, options: UnpackOptions) -> Result<()> {
    if dest.exists() && (!dest.is_dir() || std::fs::read_dir(dest).map_err(io_at(dest))?.next().is_some()) {
        return Err(ConvertError::Invalid(format!("{}: exists and is not an empty directory", dest.display())));
    }
    let (parent, name) = sibling_temp(dest)?;
    let tmp = tempfile::Builder::new().prefix(&format!(".{name}.naiad-")).tempdir_in(&parent).map_err(io_at(&parent))?;
    write_tree(reader, tmp.path(), options)?;
    if dest.is_dir() {
        std::fs::remove_dir(dest).map_err(io_at(dest))?;
    }
    let tmp_path = tmp.keep();
    std::fs::rename(&tmp_path, dest).map_err(io_at(dest))?;
    Ok(())
}

/// Owner, xattrs, mode and mtime of `path`, none of it through a symlink:
/// owner and times with the `l` calls, the mode on a descriptor opened with
/// O_NOFOLLOW (files and directories) or on the node itself (the devices
/// and FIFOs `write_tree` just made).
fn apply_meta(path: &Path, inode: &InodeRecord, xattrs: &[(&[u8], &[u8])], options: UnpackOptions) -> Result<()> {
    let io = io_at(path);
    std::os::unix::fs::lchown(path, Some(inode.uid), Some(inode.gid)).map_err(&io)?;
    for (k, v) in xattrs {
        xattr::set(path, OsStr::from_bytes(k), v).map_err(&io)?;
    }
    let mode = if options.no_setuid { inode.mode & 0o1777 } else { inode.mode & 0o7777 };
    match inode.kind() {
        Some(InodeKind::Symlink) => {}
        Some(InodeKind::RegularFile) | Some(InodeKind::Directory) => {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK).open(path).map_err(&io)?;
            nix::sys::stat::fchmod(&f, nix::sys::stat::Mode::from_bits_truncate(mode)).map_err(|e| io(e.into()))?;
        }
        _ => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(&io)?;
        }
    }
    let t = filetime::FileTime::from_unix_time(inode.mtime_sec, inode.mtime_nsec);
    filetime::set_symlink_file_times(path, t, t).map_err(&io)?;
    Ok(())
}

fn write_tree(reader: &ChunkReader, root: &Path, options: UnpackOptions) -> Result<()> {
    let image = reader.image();
    let b = &image.bootstrap;
    let mut stream = ChunkStream::new(reader, ChunkStream::walk_order(image)?);
    let mut first_path: HashMap<u32, PathBuf> = HashMap::new();
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    b.walk(|path, ino, inode| -> Result<()> {
        let rel = Path::new(OsStr::from_bytes(&path[1..]));
        let full = root.join(rel);
        let io = io_at(&full);
        if ino == ROOT_INO {
            dirs.push((full.clone(), ino));
            return Ok(());
        }
        if let Some(first) = first_path.get(&ino) {
            return std::fs::hard_link(first, &full).map_err(&io);
        }
        let kind = inode.kind().ok_or_else(|| ConvertError::Invalid(format!("{}: unknown file type", full.display())))?;
        match kind {
            InodeKind::Directory => {
                std::fs::create_dir(&full).map_err(&io)?;
                dirs.push((full.clone(), ino));
                return Ok(());
            }
            InodeKind::RegularFile => {
                use std::os::unix::fs::OpenOptionsExt;
                // A new file, never one that is there already or a link.
                let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(nix::libc::O_NOFOLLOW).open(&full).map_err(&io)?;
                let mut out = BufWriter::with_capacity(1 << 20, file);
                io::copy(&mut FileReader::new(&mut stream, ino)?, &mut out)
                    .map_err(|e| ConvertError::Check { image: image.reference.to_string(), detail: format!("{}: {e}", String::from_utf8_lossy(path)) })?;
                out.flush().map_err(&io)?;
            }
            InodeKind::Symlink => std::os::unix::fs::symlink(OsStr::from_bytes(b.symlink_target(ino)?), &full).map_err(&io)?,
            InodeKind::CharDevice | InodeKind::BlockDevice if options.no_devices => {
                tracing::warn!("{}: a device, left out (--no-devices)", full.display());
                return Ok(());
            }
            InodeKind::CharDevice | InodeKind::BlockDevice | InodeKind::Fifo | InodeKind::Socket => {
                use nix::sys::stat::{makedev, mknod, Mode, SFlag};
                let (major, minor) = inode.rdev();
                let flag = match kind {
                    InodeKind::CharDevice => SFlag::S_IFCHR,
                    InodeKind::BlockDevice => SFlag::S_IFBLK,
                    InodeKind::Fifo => SFlag::S_IFIFO,
                    _ => SFlag::S_IFSOCK,
                };
                let dev = if matches!(kind, InodeKind::CharDevice | InodeKind::BlockDevice) { makedev(major as u64, minor as u64) } else { 0 };
                mknod(&full, flag, Mode::from_bits_truncate(0o600), dev).map_err(|e| ConvertError::Io { path: full.clone(), source: e.into() })?;
            }
        }
        apply_meta(&full, inode, &b.xattrs(ino)?, options)?;
        first_path.insert(ino, full.clone());
        Ok(())
    })?;
    // Directories last and deepest first, so adding entries does not undo their mtimes.
    for (path, ino) in dirs.iter().rev() {
        apply_meta(path, &b.inode(*ino)?, &b.xattrs(*ino)?, options)?;
    }
    Ok(())
}

/// Writes the image's tree as a tar file at `dest` (GNU long names, PAX
/// records for xattrs and sub-second mtimes).
pub fn unpack_to_tar(reader: &ChunkReader, dest: &Path) -> Result<()> {
    let (parent, name) = sibling_temp(dest)?;
    let tmp = tempfile::Builder::new().prefix(&format!(".{name}.naiad-")).tempfile_in(&parent).map_err(io_at(&parent))?;
    {
        let mut builder = tar::Builder::new(BufWriter::with_capacity(1 << 20, tmp.as_file()));
        write_tar(reader, &mut builder)?;
        let mut w = builder.into_inner().map_err(io_at(dest))?;
        w.flush().map_err(io_at(dest))?;
    }
    tmp.as_file().sync_all().map_err(io_at(dest))?;
    tmp.persist(dest).map_err(|e| ConvertError::Io { path: dest.to_path_buf(), source: e.error })?;
    Ok(())
}

fn write_tar<W: Write>(reader: &ChunkReader, builder: &mut tar::Builder<W>) -> Result<()> {
    let image = reader.image();
    let b = &image.bootstrap;
    let mut stream = ChunkStream::new(reader, ChunkStream::walk_order(image)?);
    let mut first_path: HashMap<u32, Vec<u8>> = HashMap::new();
    b.walk(|path, ino, inode| -> Result<()> {
        let io = io_at(Path::new("tar"));
        let mut rel = if ino == ROOT_INO { b"./".to_vec() } else { path[1..].to_vec() };
        let kind = inode.kind().ok_or_else(|| ConvertError::Invalid("unknown file type".into()))?;
        // PAX records for what the plain header cannot say.
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        for (k, v) in b.xattrs(ino)? {
            pax.push((format!("SCHILY.xattr.{}", String::from_utf8_lossy(k)), v.to_vec()));
        }
        if inode.mtime_nsec != 0 {
            pax.push(("mtime".into(), format!("{}.{:09}", inode.mtime_sec, inode.mtime_nsec).into_bytes()));
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(inode.mode & 0o7777);
        h.set_uid(inode.uid as u64);
        h.set_gid(inode.gid as u64);
        h.set_mtime(inode.mtime_sec.max(0) as u64);
        h.set_size(0);
        if let Some(first) = first_path.get(&ino) {
            h.set_entry_type(tar::EntryType::Link);
            builder.append_link(&mut h, OsStr::from_bytes(&rel), OsStr::from_bytes(first)).map_err(&io)?;
            return Ok(());
        }
        if !pax.is_empty() {
            builder.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).map_err(&io)?;
        }
        match kind {
            InodeKind::Directory => {
                if !rel.ends_with(b"/") {
                    rel.push(b'/');
                }
                h.set_entry_type(tar::EntryType::Directory);
                builder.append_data(&mut h, OsStr::from_bytes(&rel), io::empty()).map_err(&io)?;
            }
            InodeKind::RegularFile => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(inode.size);
                builder
                    .append_data(&mut h, OsStr::from_bytes(&rel), FileReader::new(&mut stream, ino)?)
                    .map_err(|e| ConvertError::Check { image: image.reference.to_string(), detail: format!("{}: {e}", String::from_utf8_lossy(path)) })?;
            }
            InodeKind::Symlink => {
                h.set_entry_type(tar::EntryType::Symlink);
                builder.append_link(&mut h, OsStr::from_bytes(&rel), OsStr::from_bytes(b.symlink_target(ino)?)).map_err(&io)?;
            }
            InodeKind::Socket => {
                // tar has no socket type (GNU tar skips them too); writing
                // one as a FIFO would change what it is.
                tracing::warn!("{}: a socket, left out of the tar", String::from_utf8_lossy(path));
                return Ok(());
            }
            InodeKind::CharDevice | InodeKind::BlockDevice | InodeKind::Fifo => {
                h.set_entry_type(match kind {
                    InodeKind::CharDevice => tar::EntryType::Char,
                    InodeKind::BlockDevice => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                });
                let (major, minor) = inode.rdev();
                h.set_device_major(major).map_err(&io)?;
                h.set_device_minor(minor).map_err(&io)?;
                builder.append_data(&mut h, OsStr::from_bytes(&rel), io::empty()).map_err(&io)?;
            }
        }
        if ino != ROOT_INO {
            first_path.insert(ino, rel);
        }
        Ok(())
    })
}
