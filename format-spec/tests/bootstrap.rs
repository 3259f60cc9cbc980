//! Bootstrap round trips and corruption: every decoder must return a typed
//! error, never panic, whatever bytes it is given.

use naiad_format::*;

/// A small tree: / with a dir `d` holding file `f` (2 chunks) and its
/// hardlink `g`, a symlink `l`, a char device `c`, an xattr on `f`, and a
/// small file `s` that is a piece of the chunk `f` ends with (a chunk group).
fn sample() -> Vec<u8> {
    let mut b = BootstrapBuilder::new(Some(ChunkingParams::Fixed { size: 4096 }));
    b.blobs.push(BlobRecord { sha256: [7; 32], size: 300 });
    b.chunks.push(ChunkRecord { digest: [1; 32], compressed_offset: 0, blob_index: 0, compressed_size: 100, uncompressed_size: 4096 });
    b.chunks.push(ChunkRecord { digest: [2; 32], compressed_offset: 100, blob_index: 0, compressed_size: 200, uncompressed_size: 200 });
    // ino 1 = /, 2 = /d, 3 = /d/c, 4 = /d/f (+ /d/g), 5 = /d/l, 6 = /d/s
    let root_dirents = b.dirents.len() as u32;
    b.push_dirent(b"d", 2);
    let d_dirents = b.dirents.len() as u32;
    for (name, ino) in [(&b"c"[..], 3), (b"f", 4), (b"g", 4), (b"l", 5), (b"s", 6)] {
        b.push_dirent(name, ino);
    }
    b.file_chunks.push(FileChunkRecord { file_offset: 0, chunk_index: 0, chunk_offset: 0 });
    b.file_chunks.push(FileChunkRecord { file_offset: 4096, chunk_index: 1, chunk_offset: 0 });
    b.file_chunks.push(FileChunkRecord { file_offset: 0, chunk_index: 1, chunk_offset: 100 });
    b.push_xattr(4, b"user.k", b"v");
    let target = b.intern(b"f");
    let dir = |first, count, nlink, parent| InodeRecord { mode: 0o040755, nlink, data_first: first, data_count: count, parent, ..Default::default() };
    b.inodes.push(dir(root_dirents, 1, 3, 1));
    b.inodes.push(dir(d_dirents, 5, 2, 1));
    b.inodes.push(InodeRecord { mode: 0o020644, nlink: 1, parent: 2, data_first: 1, data_count: 3, ..Default::default() });
    b.inodes.push(InodeRecord { mode: 0o104755, nlink: 2, uid: 1000, gid: 100, size: 4296, mtime_sec: 1_700_000_000, mtime_nsec: 5, parent: 2, data_first: 0, data_count: 2 });
    b.inodes.push(InodeRecord { mode: 0o120777, nlink: 1, size: 1, parent: 2, data_first: target, data_count: 1, ..Default::default() });
    b.inodes.push(InodeRecord { mode: 0o100644, nlink: 1, size: 50, parent: 2, data_first: 2, data_count: 1, ..Default::default() });
    b.prefetch.push(1);
    b.finish().expect("sample bootstrap is valid")
}

#[test]
fn round_trip() {
    let boot = Bootstrap::from_bytes(sample()).unwrap();
    boot.validate().unwrap();
    assert_eq!(boot.inode_count(), 6);
    let f = boot.resolve_path(b"/d/f").unwrap().unwrap();
    assert_eq!(boot.resolve_path(b"d/g").unwrap(), Some(f));
    assert_eq!(boot.resolve_path(b"/d/nope").unwrap(), None);
    // Symlinks: kept by resolve_path, followed by resolve_path_following.
    assert_eq!(boot.resolve_path(b"/d/l").unwrap(), Some(5));
    assert_eq!(boot.resolve_path_following(b"/d/l").unwrap(), Some(f));
    assert_eq!(boot.resolve_path_following(b"/../d/./l").unwrap(), Some(f));
    assert_eq!(boot.resolve_path_following(b"/d/../d/s").unwrap(), Some(6));
    assert_eq!(boot.resolve_path_following(b"/d").unwrap(), Some(2));
    assert_eq!(boot.resolve_path_following(b"/d/l/x").unwrap(), None, "a file is no directory");
    assert_eq!(boot.resolve_path_following(b"/d/nope").unwrap(), None);
    let inode = boot.inode(f).unwrap();
    assert_eq!((inode.mode, inode.nlink, inode.uid, inode.size, inode.mtime_nsec), (0o104755, 2, 1000, 4296, 5));
    assert_eq!(boot.xattrs(f).unwrap(), vec![(&b"user.k"[..], &b"v"[..])]);
    assert_eq!(boot.symlink_target(5).unwrap(), b"f");
    assert_eq!(boot.inode(3).unwrap().rdev(), (1, 3));
    let names: Vec<_> = boot.dir_entries(2).unwrap().iter().map(|e| e.name.to_vec()).collect();
    assert_eq!(names, vec![b"c".to_vec(), b"f".to_vec(), b"g".to_vec(), b"l".to_vec(), b"s".to_vec()]);
    assert!(boot.xattrs(6).unwrap().is_empty());
    let pieces = boot.file_chunks(f).unwrap();
    assert_eq!(pieces.iter().map(|c| (c.file_offset, c.len, c.is_whole_chunk())).collect::<Vec<_>>(), vec![(0, 4096, true), (4096, 200, true)]);
    let small = boot.file_chunks(6).unwrap();
    assert_eq!((small.len(), small[0].chunk_index, small[0].chunk_offset, small[0].len, small[0].is_whole_chunk()), (1, 1, 100, 50, false));
    let group: Vec<u8> = (0..200u8).collect();
    assert_eq!(small[0].slice(&group), Some(&group[100..150]));
    assert_eq!(small[0].slice(&group[..120]), None);
    let range = boot.file_chunks_in_range(f, 4000, 200).unwrap();
    assert_eq!(range.iter().map(|c| c.chunk_index).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(boot.file_chunks_in_range(f, 4096, 1).unwrap().len(), 1);
    assert!(boot.file_chunks_in_range(f, 5000, 10).unwrap().is_empty());
    assert_eq!(boot.prefetch().unwrap(), vec![1]);
    let mut paths = Vec::new();
    boot.walk(|p, _, _| -> Result<(), FormatError> {
        paths.push(String::from_utf8_lossy(p).into_owned());
        Ok(())
    })
    .unwrap();
    assert_eq!(paths, vec!["/", "/d", "/d/c", "/d/f", "/d/g", "/d/l", "/d/s"]);
}

/// Recomputes the checksum so that corruption reaches the table checks.
fn reseal(data: &mut [u8]) {
    data[24..56].fill(0);
    let mut h = blake3::Hasher::new();
    h.update(data);
    let sum = *h.finalize().as_bytes();
    data[24..56].copy_from_slice(&sum);
}

fn open(data: Vec<u8>) -> Result<(), FormatError> {
    let b = Bootstrap::from_bytes(data)?;
    b.validate()?;
    b.walk(|_, ino, _| -> Result<(), FormatError> {
        let _ = b.xattrs(ino)?;
        Ok(())
    })
}

#[test]
fn any_flipped_byte_is_caught_by_the_checksum() {
    let good = sample();
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x5a;
        let err = open(bad).expect_err("corruption must be detected");
        assert!(matches!(err, FormatError::ChecksumMismatch | FormatError::BadMagic | FormatError::UnsupportedVersion { .. } | FormatError::Truncated { .. }), "byte {i}: {err}");
    }
}

#[test]
fn resealed_corruption_never_panics() {
    // With a valid checksum, corrupted fields must still give errors or a
    // consistent image; never a panic, and the header/table/string damage
    // below must be reported.
    let good = sample();
    for i in 0..good.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bad = good.clone();
            bad[i] ^= flip;
            reseal(&mut bad);
            let _ = open(bad);
        }
    }
    let header_damage = {
        let mut bad = good.clone();
        bad[56..64].copy_from_slice(&7u64.to_le_bytes()); // inode table offset inside the header
        reseal(&mut bad);
        open(bad).unwrap_err()
    };
    assert!(matches!(header_damage, FormatError::BadTable { .. }), "{header_damage}");
    let table_damage = {
        let mut bad = good.clone();
        let off = u64::from_le_bytes(bad[56..64].try_into().unwrap()) as usize; // inode table
        bad[off + InodeRecord::SIZE + 44..off + InodeRecord::SIZE + 48].copy_from_slice(&1000u32.to_le_bytes()); // /d claims 1000 entries
        reseal(&mut bad);
        open(bad).unwrap_err()
    };
    assert!(matches!(table_damage, FormatError::BadInode { .. } | FormatError::OutOfRange { .. }), "{table_damage}");
    let string_damage = {
        let mut bad = good.clone();
        let strings = u64::from_le_bytes(bad[56 + 6 * 16..64 + 6 * 16].try_into().unwrap()) as usize;
        bad[strings] = b'/'; // the first name ("d") becomes "/"
        reseal(&mut bad);
        open(bad).unwrap_err()
    };
    assert!(string_damage.to_string().contains("invalid entry name"), "{string_damage}");
    assert!(matches!(open(good[..100].to_vec()), Err(FormatError::Truncated { .. })));
    assert!(matches!(open(b"not a bootstrap".to_vec()), Err(FormatError::BadMagic)));
}

/// A one-file image whose file is `pieces` (file offset, chunk offset) of
/// one 200-byte chunk, `size` bytes long, with `xattr_inos` xattrs.
fn one_file(size: u64, pieces: &[(u64, u32)], xattr_inos: &[u32]) -> Result<(), FormatError> {
    let mut b = BootstrapBuilder::new(None);
    b.blobs.push(BlobRecord { sha256: [7; 32], size: 200 });
    b.chunks.push(ChunkRecord { digest: [1; 32], compressed_offset: 0, blob_index: 0, compressed_size: 200, uncompressed_size: 200 });
    for &(file_offset, chunk_offset) in pieces {
        b.file_chunks.push(FileChunkRecord { file_offset, chunk_index: 0, chunk_offset });
    }
    b.push_dirent(b"f", 2);
    b.inodes.push(InodeRecord { mode: 0o040755, nlink: 2, data_first: 0, data_count: 1, parent: 1, ..Default::default() });
    b.inodes.push(InodeRecord { mode: 0o100644, nlink: 1, size, parent: 1, data_first: 0, data_count: pieces.len() as u32, ..Default::default() });
    for &ino in xattr_inos {
        b.push_xattr(ino, b"user.a", b"1");
    }
    open(b.encode())
}

#[test]
fn chunk_pieces_and_xattrs_are_checked() {
    one_file(150, &[(0, 50)], &[1, 2, 2]).expect("a piece inside its chunk, xattrs sorted by inode");
    one_file(150, &[(0, 0), (100, 0)], &[]).expect("two pieces of one chunk");
    let past_end = one_file(160, &[(0, 50)], &[]).unwrap_err();
    assert!(past_end.to_string().contains("past the end of chunk 0"), "{past_end}");
    let empty = one_file(100, &[(0, 0), (100, 0)], &[]).unwrap_err();
    assert!(empty.to_string().contains("is empty"), "{empty}");
    let overlap = one_file(100, &[(50, 0), (0, 0)], &[]).unwrap_err();
    assert!(overlap.to_string().contains("ends before it starts"), "{overlap}");
    let unsorted = one_file(10, &[(0, 0)], &[2, 1]).unwrap_err();
    assert!(unsorted.to_string().contains("sorted by inode"), "{unsorted}");
    let no_inode = one_file(10, &[(0, 0)], &[3]).unwrap_err();
    assert!(no_inode.to_string().contains("names inode 3"), "{no_inode}");
}

#[test]
fn chunks_verify() {
    let data = b"hello hello hello hello hello hello hello hello".repeat(100);
    let e = encode_chunk(&data, 3);
    assert!(e.stored.len() < data.len());
    let rec = ChunkRecord { digest: e.digest, compressed_offset: 0, blob_index: 0, compressed_size: e.stored.len() as u32, uncompressed_size: e.uncompressed_size };
    assert_eq!(decode_chunk(&e.stored, &rec).unwrap(), data);
    let mut bad = e.stored.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(decode_chunk(&bad, &rec).is_err());
    let mut x = 88172645463325252u64;
    let random: Vec<u8> = (0..1000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let raw = encode_chunk(&random, 3);
    assert_eq!(raw.stored.len(), random.len(), "incompressible data is stored raw");
    assert_eq!(raw.stored, random);
}

/// 200,000 files whose chunk lists all name one range of 200,000 records,
/// and as many directories sharing one dirent range: validating each
/// inode's range separately would take 4e10 steps. The overlap is refused
/// at once.
#[test]
fn shared_ranges_are_refused_in_linear_time() {
    const N: u32 = 200_000;
    let mut b = BootstrapBuilder::new(None);
    b.blobs.push(BlobRecord { sha256: [7; 32], size: 1 });
    b.chunks.push(ChunkRecord { digest: [1; 32], compressed_offset: 0, blob_index: 0, compressed_size: 1, uncompressed_size: 1 });
    for i in 0..N as u64 {
        b.file_chunks.push(FileChunkRecord { file_offset: i, chunk_index: 0, chunk_offset: 0 });
    }
    for i in 0..N {
        b.push_dirent(format!("f{i:07}").as_bytes(), i + 2);
    }
    b.inodes.push(InodeRecord { mode: 0o040755, nlink: 2, data_first: 0, data_count: N, parent: 1, ..Default::default() });
    for _ in 0..N {
        b.inodes.push(InodeRecord { mode: 0o100644, nlink: 1, size: N as u64, parent: 1, data_first: 0, data_count: N, ..Default::default() });
    }
    let start = std::time::Instant::now();
    let e = Bootstrap::from_bytes(b.encode()).and_then(|boot| boot.validate()).expect_err("shared chunk ranges are invalid");
    eprintln!("refused in {:?}: {e}", start.elapsed());
    assert!(e.to_string().contains("file-chunk range overlaps"), "{e}");

    // Directories sharing one dirent range: refused the same way.
    let mut b = BootstrapBuilder::new(None);
    let shared = b.dirents.len() as u32;
    b.push_dirent(b"x", 3);
    let mut root = Vec::new();
    for i in 0..1000u32 {
        root.push(b.push_dirent(format!("d{i:04}").as_bytes(), i + 2));
    }
    b.inodes.push(InodeRecord { mode: 0o040755, nlink: 1002, data_first: root[0], data_count: 1000, parent: 1, ..Default::default() });
    for _ in 0..1000 {
        b.inodes.push(InodeRecord { mode: 0o040755, nlink: 2, data_first: shared, data_count: 1, parent: 1, ..Default::default() });
    }
    let e = Bootstrap::from_bytes(b.encode()).and_then(|boot| boot.validate()).expect_err("shared dirent ranges are invalid");
    assert!(e.to_string().contains("dirent range overlaps"), "{e}");
}
