//! `naiad mount`, `naiad umount` and `naiad stats` through real FUSE mounts
//! (/dev/fuse, root): the mounted tree equals a reference unpack of the
//! source image; reads are lazy; a corrupted chunk gives EIO for what needs
//! it and nothing else; a restarted daemon serves what was read before from
//! its disk cache; errors are clear and leave no mount behind; SIGTERM
//! unmounts. Every mount is under the test's own temporary directory and is
//! unmounted by a guard even when the test fails.

mod common;
mod mount_support;

use std::ffi::CString;
use std::fs;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use mount_support::*;
use naiad_reader::NaiadImage;
use naiad_registry::ImageRef;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("naiad-mount-test-").tempdir_in("/tmp").expect("tempdir")
}

/// The generated image, converted; returns (tempdir, naiad image ref, the
/// umoci-compatible source layout).
fn converted_generated(dir: &Path) -> (String, std::path::PathBuf) {
    let img = generate_image(&dir.join("src"), Compression::Gzip);
    let reference = convert(&img.layout, img.tag, &dir.join("naiad"));
    (reference, img.reference_layout)
}

fn read_all(p: &Path) -> std::io::Result<Vec<u8>> {
    fs::read(p)
}

/// Every path under `root` (not following symlinks).
fn walkdir_all(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// Waits until counter `name` of `m` reaches `at_least` (a background
/// thread moves it), for at most 20 s.
fn wait_for_counter(m: &MountGuard, name: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = m.counter(name);
        if v >= at_least || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The backing files in `cache` (data files, not markers).
fn backing_files(cache: &Path) -> Vec<std::path::PathBuf> {
    let Ok(rd) = fs::read_dir(cache.join("files")) else { return Vec::new() };
    rd.flatten().map(|e| e.path()).filter(|p| p.file_name().is_some_and(|n| n.len() == 64)).collect()
}

#[test]
fn fully_cached_files_are_served_from_backing_files_and_a_corrupt_one_never() {
    backing_file_round_trip(false);
}

#[test]
fn fully_cached_files_are_served_by_passthrough_and_a_corrupt_backing_file_never() {
    backing_file_round_trip(true);
}

/// A file read once gets a backing file; later reads come from it (by the
/// kernel with `--passthrough`, else by the daemon); a backing file changed
/// on disk is detected, removed and rebuilt, never served.
fn backing_file_round_trip(passthrough: bool) {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let (image, reference_layout) = converted_generated(tmp.path());
    let expected_dir = tmp.path().join("expected");
    umoci_unpack(&reference_layout, GENERATED_TAG, &expected_dir);
    let expected = fs::read(expected_dir.join(gen_paths::BIG)).unwrap();
    let cache = tmp.path().join("cache");
    let extra: &[&std::ffi::OsStr] = if passthrough { &["--passthrough".as_ref()] } else { &[] };
    // What serves a file from its backing file in this mode.
    let served = if passthrough { "passthrough_opens" } else { "backing_reads" };

    // A first read goes through the chunks and leaves a backing file.
    let m = MountGuard::mount_with(&image, tmp.path(), &cache, extra);
    assert_eq!(fs::read(m.path(gen_paths::BIG)).unwrap(), expected);
    assert_eq!(m.counter(served), 0);
    assert!(wait_for_counter(&m, "backing_writes", 1) >= 1, "no backing file was written: {}", m.stats());
    assert_eq!(backing_files(&cache).len(), 1);
    m.umount();

    // A new daemon (empty page cache) reads it from the backing file.
    let m = MountGuard::mount_with(&image, tmp.path(), &cache, extra);
    let reads = m.counter("reads");
    assert_eq!(fs::read(m.path(gen_paths::BIG)).unwrap(), expected);
    let f = fs::File::open(m.path(gen_paths::BIG)).unwrap();
    let mut buf = vec![0u8; 100_000];
    use std::os::unix::fs::FileExt;
    let n = f.read_at(&mut buf, (1 << 20) - 77).unwrap();
    assert_eq!(&buf[..n], &expected[(1 << 20) - 77..(1 << 20) - 77 + n]);
    // mmap maps the same bytes.
    let len = expected.len();
    // SAFETY: a private read-only mapping of an open file, unmapped below.
    let map = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, std::os::fd::AsRawFd::as_raw_fd(&f), 0) };
    assert_ne!(map, libc::MAP_FAILED);
    // SAFETY: the mapping is `len` readable bytes.
    let mapped = unsafe { std::slice::from_raw_parts(map as *const u8, len) }.to_vec();
    unsafe { libc::munmap(map, len) };
    assert!(mapped == expected, "mmap of a file with a backing file differs");
    drop(f);
    let s = m.stats();
    assert!(s["counters"][served].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(s["counters"]["disk_hits"], 0, "read its chunks instead: {s}");
    assert_eq!(s["counters"]["store_chunks"], 0, "{s}");
    if passthrough {
        assert_eq!(m.counter("reads"), reads, "passthrough reads reached the daemon");
    }
    // The daemon (not only its supervisor) is gone before the file is
    // changed: one still draining its backing-file queue could write the
    // file anew after the change.
    let daemon = s["pid"].as_i64().unwrap() as i32;
    m.umount();
    assert!(wait_until(Duration::from_secs(10), || !process_alive(daemon)), "daemon {daemon} still running after naiad umount");

    // A backing file changed on disk is detected, removed and rebuilt from
    // the chunk cache, and its bytes are never served.
    let mut files = backing_files(&cache);
    assert_eq!(files.len(), 1, "one backing file, BIG's: {files:?}");
    let backing = files.pop().unwrap();
    let mut bytes = fs::read(&backing).unwrap();
    bytes[12345] ^= 0xff;
    fs::OpenOptions::new().write(true).open(&backing).unwrap().write_all_at(&bytes[12345..12346], 12345).unwrap();
    let m = MountGuard::mount_with(&image, tmp.path(), &cache, extra);
    assert_eq!(fs::read(m.path(gen_paths::BIG)).unwrap(), expected);
    let s = m.stats();
    assert_eq!(s["counters"]["backing_corrupt"], 1, "{s}");
    assert_eq!(s["counters"][served], 0, "{s}");
    assert!(wait_for_counter(&m, "backing_writes", 1) >= 1, "the backing file was not rebuilt: {}", m.stats());
    assert_eq!(m.counter("store_chunks"), 0, "rebuilt from the chunk cache, not the store");
    m.umount();
    let m = MountGuard::mount_with(&image, tmp.path(), &cache, extra);
    assert_eq!(fs::read(m.path(gen_paths::BIG)).unwrap(), expected);
    assert!(m.counter(served) >= 1, "{}", m.stats());
    assert_eq!(m.counter("backing_corrupt"), 0);
    m.umount();
}

#[test]
fn backing_files_count_toward_the_cache_cap() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let (image, _) = converted_generated(tmp.path());
    let cache = tmp.path().join("cache");
    // 6 MiB: the chunks (compressed) and backing files (whole) of the big
    // files cannot all stay.
    let cap: u64 = 6 << 20;
    let m = MountGuard::mount_with(&image, tmp.path(), &cache, &["--cache-size".as_ref(), "6M".as_ref()]);
    let files = [gen_paths::BIG, gen_paths::DUP1, gen_paths::EXACT_CHUNK];
    let mut first = Vec::new();
    for (i, f) in files.iter().enumerate() {
        first.push(fs::read(m.path(f)).unwrap());
        wait_for_counter(&m, "backing_writes", i as u64 + 1);
    }
    let s = m.stats();
    let on_disk: u64 = backing_files(&cache).iter().map(|p| fs::metadata(p).unwrap().len()).sum();
    let held = s["disk_cache"]["bytes"].as_u64().unwrap();
    assert!(held <= cap, "the cache holds {held} bytes, over its {cap}-byte cap: {s}");
    assert!(on_disk <= held, "backing files on disk ({on_disk} bytes) are not all counted ({held}): {s}");
    assert!(s["counters"]["backing_evictions"].as_u64().unwrap() + s["counters"]["disk_evictions"].as_u64().unwrap() > 0, "nothing was evicted: {s}");
    m.umount();
    // A new daemon (empty page cache) serves every file right, from what
    // stayed and from the store.
    let m = MountGuard::mount_with(&image, tmp.path(), &cache, &["--cache-size".as_ref(), "6M".as_ref()]);
    for (f, bytes) in files.iter().zip(&first) {
        assert!(fs::read(m.path(f)).unwrap() == *bytes, "{f} differs after evictions");
    }
    m.umount();
}

#[test]
fn generated_image_mounts_like_its_reference_unpack() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let (image, reference_layout) = converted_generated(tmp.path());
    let expected = tmp.path().join("expected");
    umoci_unpack(&reference_layout, GENERATED_TAG, &expected);

    let m = MountGuard::mount(&image, tmp.path(), &tmp.path().join("cache"));
    let diffs = compare_trees(&expected, &m.mountpoint, &generated_compare_options());
    assert!(diffs.is_empty(), "mounted tree differs from the umoci unpack:\n{}", diffs.join("\n"));

    // Inode numbers: the root is 1, hardlinks share one and report nlink.
    assert_eq!(lstat(&m.mountpoint).ino(), 1);
    for group in [&gen_paths::HL_GROUP, &gen_paths::LOWER_HL_GROUP, &gen_paths::LATE_HL_GROUP] {
        let a = ino_nlink(&m.path(group[0]));
        let b = ino_nlink(&m.path(group[1]));
        assert_eq!(a, b, "{group:?} are one inode");
        assert_eq!(a.1, 2, "{group:?} nlink");
    }
    // Special files with type and device numbers.
    let null = lstat(&m.path(gen_paths::CHAR_DEV));
    assert!(null.file_type().is_char_device());
    assert_eq!((major(null.rdev()), minor(null.rdev())), (1, 3));
    let lp = lstat(&m.path(gen_paths::BLOCK_DEV));
    assert!(lp.file_type().is_block_device());
    assert_eq!((major(lp.rdev()), minor(lp.rdev())), (7, 0));
    assert!(lstat(&m.path(gen_paths::FIFO)).file_type().is_fifo());
    // Nanosecond mtime, blocks = ceil(size / 512).
    let precise = lstat(&m.path(gen_paths::PRECISE_MTIME));
    assert_eq!((precise.mtime(), precise.mtime_nsec()), (1_700_000_000, 123_456_789));
    let big = lstat(&m.path(gen_paths::BIG));
    assert_eq!(big.blocks(), big.len().div_ceil(512));
    // Attributes as a local filesystem reports them: sparse files count
    // only their data chunks (8 MiB with one byte of data: one chunk of at
    // most 256 KiB, the largest CDC chunk),
    // directories have ext4's block-sized sizes, symlinks mode 0777.
    let sparse = lstat(&m.path(gen_paths::SPARSE_SIMPLE));
    assert_eq!(sparse.len(), 8 << 20);
    assert!(sparse.blocks() > 0 && sparse.blocks() <= (256 << 10) / 512, "a sparse file's holes take no blocks: {} blocks", sparse.blocks());
    for dir in ["", "data", gen_paths::OPAQUE_DIR] {
        let d = lstat(&m.path(dir));
        assert!(d.len() >= 4096 && d.len().is_multiple_of(4096) && d.blocks() == d.len() / 512, "{dir:?}: size {} blocks {}", d.len(), d.blocks());
    }
    let mut links = 0;
    for e in walkdir_all(&m.mountpoint) {
        let md = lstat(&e);
        if md.file_type().is_symlink() {
            assert_eq!(md.mode() & 0o7777, 0o777, "{}", e.display());
            links += 1;
        }
    }
    assert!(links > 0, "the generated image has symlinks");
    // xattrs.
    assert_eq!(xattr::get(m.path(gen_paths::XATTR_FILE), "user.binary").unwrap(), Some(vec![0, 1, 0xfe, 0xff]));
    assert_eq!(xattr::get(m.path(gen_paths::XATTR_FILE), "user.missing").unwrap(), None);
    // Read-only: writes get EROFS.
    for r in [
        fs::OpenOptions::new().write(true).open(m.path(gen_paths::BIG)).map(drop),
        fs::OpenOptions::new().read(true).write(true).open(m.path(gen_paths::EMPTY)).map(drop),
        fs::File::create(m.path("new-file")).map(drop),
        fs::create_dir(m.path("new-dir")),
        fs::remove_file(m.path(gen_paths::BIG)),
        xattr::set(m.path(gen_paths::XATTR_FILE), "user.x", b"y"),
    ] {
        assert_eq!(r.expect_err("a write succeeded").raw_os_error(), Some(libc::EROFS));
    }
    // Reads at odd offsets spanning chunk boundaries (1 MiB chunks).
    let data = read_all(&m.path(gen_paths::BIG)).unwrap();
    let expected_big = fs::read(expected.join(gen_paths::BIG)).unwrap();
    assert_eq!(data, expected_big);
    let f = fs::File::open(m.path(gen_paths::BIG)).unwrap();
    let mut buf = vec![0u8; 300_000];
    use std::os::unix::fs::FileExt;
    for off in [0u64, (1 << 20) - 1000, 3 << 20, big.len() - 10] {
        let n = f.read_at(&mut buf, off).unwrap();
        let end = (off as usize + n).min(expected_big.len());
        assert_eq!(&buf[..n], &expected_big[off as usize..end], "read at {off}");
    }
    drop(f);
    // statfs answers.
    let c = CString::new(m.mountpoint.as_os_str().as_encoded_bytes()).unwrap();
    let mut sfs: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut sfs) }, 0);
    assert!(sfs.f_blocks > 0 && sfs.f_files > 0 && sfs.f_flag & libc::ST_RDONLY != 0);

    let s = m.stats();
    assert_eq!(s["counters"]["errors"], 0);
    assert!(s["counters"]["store_chunks"].as_u64().unwrap() > 0);
    m.umount();
}

#[test]
fn debian_image_is_lazy_and_mounts_like_its_reference_unpack() {
    if !fuse_available() {
        return;
    }
    let debian = debian_image();
    let tmp = tempdir();
    let image = convert(&debian.layout, "latest", &tmp.path().join("naiad"));

    let m = MountGuard::mount(&image, tmp.path(), &tmp.path().join("cache"));
    eprintln!("naiad mount returned after {:?}", m.mount_time);

    // Laziness: one small file costs a small fraction of the image.
    let t = Instant::now();
    let release = fs::read_to_string(m.path("etc/os-release")).unwrap();
    let first_read = t.elapsed();
    assert!(release.contains("Debian"));
    let s = m.stats();
    let blob_bytes = s["blob_bytes"].as_u64().unwrap();
    let store_bytes = s["counters"]["store_bytes"].as_u64().unwrap();
    eprintln!("after reading /etc/os-release ({first_read:?}): {store_bytes} of {blob_bytes} blob bytes read ({} chunks)", s["counters"]["store_chunks"]);
    assert!(store_bytes > 0);
    assert!(store_bytes * 100 < blob_bytes, "reading one small file read {store_bytes} of {blob_bytes} bytes");

    let t = Instant::now();
    let diffs = compare_trees(&debian.reference_rootfs, &m.mountpoint, &CompareOptions::default());
    eprintln!("compared the whole tree in {:?}", t.elapsed());
    assert!(diffs.is_empty(), "mounted Debian tree differs from the reference:\n{}", diffs.join("\n"));
    let s = m.stats();
    assert_eq!(s["counters"]["errors"], 0);
    eprintln!("after reading everything: {} of {blob_bytes} blob bytes read", s["counters"]["store_bytes"]);
    m.umount();
}

/// The first chunk of `rel` in the image and the path of its blob file.
fn first_chunk_of(image_ref: &str, rel: &str) -> (naiad_format::ChunkRecord, std::path::PathBuf) {
    let r = ImageRef::parse(image_ref).unwrap();
    let img = NaiadImage::open(&r).unwrap();
    let ino = img.bootstrap.resolve_path(rel.as_bytes()).unwrap().unwrap_or_else(|| panic!("{rel} not in the image"));
    let chunk = img.bootstrap.file_chunks(ino).unwrap()[0].chunk;
    let ImageRef::Layout { dir, .. } = r else { unreachable!() };
    let blob = dir.join("blobs/sha256").join(img.blob_digests[chunk.blob_index as usize].hex());
    (chunk, blob)
}

#[test]
fn corrupted_chunk_gives_eio_and_the_daemon_stays_up() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let (image, _) = converted_generated(tmp.path());
    let (bad, blob) = first_chunk_of(&image, gen_paths::PRECISE_MTIME);
    let (other, _) = first_chunk_of(&image, gen_paths::BIG);
    assert_ne!(other.digest, bad.digest);
    // Flip one byte in the middle of the chunk's stored bytes.
    let mut bytes = fs::read(&blob).unwrap();
    let at = (bad.compressed_offset + bad.compressed_size as u64 / 2) as usize;
    bytes[at] ^= 0x55;
    fs::write(&blob, &bytes).unwrap();

    let m = MountGuard::mount(&image, tmp.path(), &tmp.path().join("cache"));
    let mut errors = 0;
    for attempt in 1..=2 {
        let err = fs::read(m.path(gen_paths::PRECISE_MTIME)).expect_err("a corrupted chunk was served");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "attempt {attempt}: {err}");
        // Not remembered: every attempt goes back to the store (the kernel
        // itself retries a failed readahead once).
        let now = m.counter("errors");
        assert!(now > errors, "attempt {attempt} did not try the store again");
        errors = now;
    }
    assert!(m.daemon_alive());
    // Other files still read fine.
    assert_eq!(fs::read(m.path(gen_paths::BIG)).unwrap().len() as u64, lstat(&m.path(gen_paths::BIG)).len());
    let log = m.log();
    let blob_hex = blob.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        log.lines().any(|l| l.contains("ERROR") && l.contains(&blob_hex) && l.contains(&bad.compressed_offset.to_string())),
        "no error line naming blob {blob_hex} and offset {} in the daemon log:\n{log}",
        bad.compressed_offset
    );
    // Repair the blob: the next read works (no negative caching).
    bytes[at] ^= 0x55;
    fs::write(&blob, &bytes).unwrap();
    assert!(fs::read(m.path(gen_paths::PRECISE_MTIME)).is_ok());
    m.umount();
}

#[test]
fn restarted_daemon_serves_from_the_disk_cache() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let (image, _) = converted_generated(tmp.path());
    let cache = tmp.path().join("cache");
    let files = [gen_paths::BIG, gen_paths::DUP1, gen_paths::PRECISE_MTIME, gen_paths::XATTR_FILE];

    let m = MountGuard::mount(&image, tmp.path(), &cache);
    let first: Vec<Vec<u8>> = files.iter().map(|f| fs::read(m.path(f)).unwrap()).collect();
    assert!(m.counter("store_chunks") > 0);
    m.umount();

    let m = MountGuard::mount(&image, tmp.path(), &cache);
    let second: Vec<Vec<u8>> = files.iter().map(|f| fs::read(m.path(f)).unwrap()).collect();
    assert_eq!(first, second);
    let s = m.stats();
    assert_eq!(s["counters"]["store_chunks"], 0, "the store was read: {s}");
    assert_eq!(s["counters"]["store_bytes"], 0);
    // From cached chunks, or the files completed before from their
    // backing files (passthrough).
    assert!(s["counters"]["disk_hits"].as_u64().unwrap() + s["counters"]["backing_reads"].as_u64().unwrap() > 0, "{s}");

    // Damaged cached chunks are detected, dropped and refetched, never
    // served. The cache keeps, per blob, `<sha256>.data` (stored bytes at
    // their blob offsets) and `<sha256>.index` (20-byte records: magic
    // "nxc1", offset u64 LE, stored size u32 LE, checksum).
    m.umount();
    let blobs = cache.join("blobs");
    let mut damaged = 0;
    for e in fs::read_dir(&blobs).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(sha) = name.strip_suffix(".index") else { continue };
        let index = fs::read(e.path()).unwrap();
        let data_path = blobs.join(format!("{sha}.data"));
        let mut data = fs::read(&data_path).unwrap();
        for record in index.chunks_exact(20) {
            assert_eq!(&record[..4], b"nxc1", "{name}");
            let offset = u64::from_le_bytes(record[4..12].try_into().unwrap());
            let size = u32::from_le_bytes(record[12..16].try_into().unwrap()) as u64;
            data[(offset + size / 2) as usize] ^= 1;
            damaged += 1;
        }
        fs::write(&data_path, data).unwrap();
    }
    assert!(damaged > 0);
    assert!(!cache.join("chunks").exists(), "the old per-chunk layout is not used");
    // Without the backing files, reads need the damaged chunks.
    fs::remove_dir_all(cache.join("files")).unwrap();
    let m = MountGuard::mount(&image, tmp.path(), &cache);
    let third: Vec<Vec<u8>> = files.iter().map(|f| fs::read(m.path(f)).unwrap()).collect();
    assert_eq!(first, third);
    let s = m.stats();
    assert!(s["counters"]["disk_corrupt"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["counters"]["disk_hits"], 0, "{s}");
    m.umount();
}

#[test]
fn mount_errors_are_clear_and_leave_no_mount() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let (image, _) = converted_generated(tmp.path());
    let cache = tmp.path().join("cache");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let run_dir = tmp.path().join("run");
    let mount = |image: &str, mp: &Path| output(naiad().arg("mount").arg("--cache-dir").arg(&cache).arg("--run-dir").arg(&run_dir).arg(image).arg(mp));
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // Missing mountpoint.
    let missing = tmp.path().join("no-such-dir");
    let o = mount(&image, &missing);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no-such-dir"), "{}", stderr(&o));
    // A file as mountpoint.
    let file = tmp.path().join("file");
    fs::write(&file, b"x").unwrap();
    let o = mount(&image, &file);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a directory"), "{}", stderr(&o));
    // Not a naiad image: the source image itself. The error comes from the
    // daemon and is reported by `naiad mount`.
    let src = format!("oci:{}:latest", tmp.path().join("src/generated-gzip").display());
    let o = mount(&src, &mnt);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a naiad image"), "{}", stderr(&o));
    assert!(!is_naiad_mount(&mnt));
    // No such image.
    let o = mount(&format!("oci:{}:latest", tmp.path().join("nothing").display()), &mnt);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nothing"), "{}", stderr(&o));
    assert!(!is_naiad_mount(&mnt));
    // umount and stats of something that is not a naiad mount.
    let o = output(naiad().arg("umount").arg("--run-dir").arg(&run_dir).arg(&mnt));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not mounted"), "{}", stderr(&o));
    let o = output(naiad().arg("stats").arg("--run-dir").arg(&run_dir).arg(&mnt));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not mounted"), "{}", stderr(&o));

    // Mounting twice on the same mountpoint is refused; the first stays.
    let m = MountGuard::mount(&image, tmp.path(), &cache);
    let o = mount(&image, &m.mountpoint);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already a naiad mount"), "{}", stderr(&o));
    // A busy mount is not unmounted by a plain umount.
    let busy = fs::File::open(m.path(gen_paths::BIG)).unwrap();
    let o = output(naiad().arg("umount").arg("--run-dir").arg(&m.run_dir).arg(&m.mountpoint));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("busy"), "{}", stderr(&o));
    assert!(is_naiad_mount(&m.mountpoint) && m.daemon_alive());
    drop(busy);
    // Text stats name the counters.
    let text = check(naiad().arg("stats").arg("--run-dir").arg(&m.run_dir).arg(&m.mountpoint));
    assert!(text.contains("store_bytes") && text.contains("disk_hits"), "{text}");
    m.umount();
}

#[test]
fn sigterm_unmounts_and_the_daemon_exits() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let (image, _) = converted_generated(tmp.path());
    let m = MountGuard::mount(&image, tmp.path(), &tmp.path().join("cache"));
    let mut f = fs::File::open(m.path(gen_paths::PRECISE_MTIME)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    drop(f);
    // SAFETY: kill(2) of the daemon this test started.
    assert_eq!(unsafe { libc::kill(m.pid, libc::SIGTERM) }, 0);
    assert!(wait_until(Duration::from_secs(10), || !is_naiad_mount(&m.mountpoint)), "still mounted after SIGTERM");
    assert!(wait_until(Duration::from_secs(10), || !m.daemon_alive()), "daemon still running after SIGTERM");
    // The socket and pid file are gone too.
    let left: Vec<_> = fs::read_dir(&m.run_dir).unwrap().flatten().map(|e| e.file_name()).filter(|n| !n.to_string_lossy().ends_with(".log")).collect();
    assert!(left.is_empty(), "left in the run dir: {left:?}");
    // The mountpoint is a plain empty directory again.
    let e = fs::File::open(m.path(gen_paths::PRECISE_MTIME)).expect_err("file visible after unmount");
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

/// A tmpfs of `size` at `path`, unmounted when dropped.
struct SmallTmpfs(std::path::PathBuf);

impl SmallTmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        fs::create_dir_all(path).unwrap();
        let st = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(path).status().expect("mount tmpfs");
        assert!(st.success(), "mounting a tmpfs on {}", path.display());
        SmallTmpfs(path.to_path_buf())
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_under_the_cache_only_costs_the_cache() {
    if !fuse_available() {
        return;
    }
    let debian = debian_image();
    let tmp = tempdir();
    let image = convert(&debian.layout, "latest", &tmp.path().join("naiad"));
    // 256 KiB of disk for a cache capped at 2 GiB: writes fail with ENOSPC.
    let cache = SmallTmpfs::mount(&tmp.path().join("cache"), "256k");
    let m = MountGuard::mount(&image, tmp.path(), &cache.0);
    let want = regular_files(&debian.reference_rootfs).into_iter().filter(|(p, _)| p.starts_with("usr/lib/python3.11/json")).collect::<Vec<_>>();
    assert!(!want.is_empty());
    for (rel, _) in &want {
        let got = fs::read(m.mountpoint.join(rel)).unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
        assert_eq!(sha256_hex(&got), sha256_file(&debian.reference_rootfs.join(rel)).unwrap(), "{}", rel.display());
    }
    let big = fs::read(m.path("usr/bin/python3.11")).expect("a file larger than the cache disk reads from the store");
    assert_eq!(sha256_hex(&big), sha256_file(&debian.reference_rootfs.join("usr/bin/python3.11")).unwrap());
    let s = m.stats();
    assert_eq!(s["counters"]["read_errors"], 0, "{s}");
    m.umount();
    let log = fs::read_to_string(tmp.path().join("daemon.log")).unwrap_or_default();
    assert!(log.contains("disk cache") && log.to_lowercase().contains("no space"), "the daemon says why it cannot cache:\n{log}");
}

#[test]
fn an_api_socket_path_that_is_a_file_is_refused_and_kept() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let (image, _) = converted_generated(tmp.path());
    let precious = tmp.path().join("precious");
    fs::write(&precious, b"keep me").unwrap();
    let mountpoint = tmp.path().join("mnt");
    fs::create_dir_all(&mountpoint).unwrap();
    let out = output(
        naiad()
            .arg("mount")
            .arg("--cache-dir")
            .arg(tmp.path().join("cache"))
            .arg("--run-dir")
            .arg(tmp.path().join("run"))
            .arg("--api-socket")
            .arg(&precious)
            .arg(&image)
            .arg(&mountpoint),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not a socket") && stderr.contains(&precious.display().to_string()), "{stderr}");
    assert_eq!(fs::read(&precious).unwrap(), b"keep me");
    assert!(!is_naiad_mount(&mountpoint), "a mount was left behind");
}

#[test]
fn a_remount_maps_its_bootstrap_from_the_cache_and_a_changed_one_is_not_trusted() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let (image, reference_layout) = converted_generated(tmp.path());
    let expected = tmp.path().join("expected");
    umoci_unpack(&reference_layout, GENERATED_TAG, &expected);
    let cache = tmp.path().join("cache");
    let opened_from_cache = |m: &MountGuard| fs::read_to_string(&m.log_file).unwrap().contains("its bootstrap mapped from the cache");

    let m = MountGuard::mount(&image, tmp.path(), &cache);
    assert!(!opened_from_cache(&m), "a first mount decodes its bootstrap");
    m.umount();
    let stored: Vec<_> = fs::read_dir(cache.join("bootstraps")).unwrap().flatten().map(|e| e.path()).filter(|p| p.file_name().unwrap().len() == 64).collect();
    assert_eq!(stored.len(), 1, "{stored:?}");

    let _ = fs::remove_file(tmp.path().join("daemon.log"));
    let m = MountGuard::mount(&image, tmp.path(), &cache);
    assert!(opened_from_cache(&m), "the remount decoded its bootstrap again");
    let diffs = compare_trees(&expected, &m.mountpoint, &generated_compare_options());
    assert!(diffs.is_empty(), "mounted from the cached bootstrap, the tree differs:\n{}", diffs.join("\n"));
    m.umount();

    // A cached bootstrap written to since it was marked is not trusted:
    // decoded from the image again (and the tree is right).
    let mut bytes = fs::read(&stored[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    use std::os::unix::fs::FileExt;
    fs::OpenOptions::new().write(true).open(&stored[0]).unwrap().write_all_at(&bytes[mid..mid + 1], mid as u64).unwrap();
    let _ = fs::remove_file(tmp.path().join("daemon.log"));
    let m = MountGuard::mount(&image, tmp.path(), &cache);
    assert!(!opened_from_cache(&m), "a changed cached bootstrap was used");
    let diffs = compare_trees(&expected, &m.mountpoint, &generated_compare_options());
    assert!(diffs.is_empty(), "the tree differs after the cached bootstrap changed:\n{}", diffs.join("\n"));
    m.umount();
}

/// An image converted with a chunk dictionary mounts equal to its source;
/// on a cache that served the dictionary image, reading it fetches only
/// the chunks that are new (the cache is keyed by blob and offset).
#[test]
fn a_chunk_dict_image_mounts_like_its_source_and_reuses_the_old_cache() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let (v1, v2) = two_versions();
    let (src1, src2) = (tmp.path().join("src1"), tmp.path().join("src2"));
    files_layout(&src1, &v1);
    files_layout(&src2, &v2);
    let store = tmp.path().join("store");
    let (img1, img2) = (format!("oci:{}:v1", store.display()), format!("oci:{}:v2", store.display()));
    let run = |args: &[&str]| {
        let out = naiad().args(args).output().expect("naiad");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["convert", &format!("oci:{}:latest", src1.display()), &img1, "--quiet"]);
    run(&["convert", &format!("oci:{}:latest", src2.display()), &img2, "--quiet", "--chunk-dict", &img1]);
    let cache = tmp.path().join("cache");
    let read_everything = |m: &MountGuard, files: &Files| {
        for (p, data) in files {
            assert_eq!(&fs::read(m.path(p)).unwrap(), data, "{p}");
        }
    };
    let m1 = MountGuard::mount(&img1, &tmp.path().join("a"), &cache);
    read_everything(&m1, &v1);
    let first = m1.counter("store_bytes");
    drop(m1);
    let m2 = MountGuard::mount(&img2, &tmp.path().join("b"), &cache);
    read_everything(&m2, &v2);
    let second = m2.counter("store_bytes");
    assert!(second * 5 < first, "version 2 fetched {second} bytes after version 1's {first}");
}

/// `files` as a one-layer image under `dir/src`, converted with fixed 1 MiB
/// chunks into `dir/naiad`; returns the converted image's reference.
fn fixed_chunk_image(dir: &Path, files: &[(String, Vec<u8>)]) -> String {
    files_layout(&dir.join("src"), files);
    let store = dir.join("naiad");
    check(
        naiad()
            .args(["convert", "--quiet", "--chunking", "fixed", "--chunk-size", "1M"])
            .arg(format!("oci:{}:latest", dir.join("src").display()))
            .arg(format!("oci:{}:{NAIAD_TAG}", store.display())),
    );
    format!("oci:{}:{NAIAD_TAG}", store.display())
}

/// `files` as a one-layer image under `dir/src`, converted with the
/// defaults into `dir/naiad` and mounted with its cache in `dir/cache`.
fn mount_files(dir: &Path, files: &[(String, Vec<u8>)]) -> MountGuard {
    let src = dir.join("src");
    files_layout(&src, files);
    let image = convert(&src, "latest", &dir.join("naiad"));
    MountGuard::mount(&image, dir, &dir.join("cache"))
}

/// Waits until a background load has been asked for, and until it has
/// finished.
fn wait_for_background_loads(m: &MountGuard) {
    wait_until(Duration::from_secs(20), || m.counter("read_ahead_requests") > 0);
    m.settled_stats();
}

/// A package's modules are read one after another: the first small file
/// of a directory read from the store loads the directory's other small
/// files in the background, and another directory's files are left alone.
#[test]
fn the_first_cold_small_file_of_a_directory_loads_the_rest_of_it() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let mut files: Vec<(String, Vec<u8>)> = vec![("other/x.py".to_string(), Prng(0x6f74).bytes(100 << 10))];
    files.extend((0..16u64).map(|i| (format!("pkg/m{i:02}.py"), Prng(0x706b_6700 + i).bytes(20 << 10))));
    let m = mount_files(tmp.path(), &files);

    assert!(fs::read(m.path("pkg/m00.py")).unwrap() == files[1].1);
    wait_for_background_loads(&m);
    assert!(m.counter("read_ahead_chunks") >= 2, "the directory's other chunk groups were loaded");
    let requests = m.counter("store_requests");
    for (name, data) in &files[1..] {
        assert!(&fs::read(m.path(name)).unwrap() == data, "{name}");
    }
    assert_eq!(m.counter("store_requests"), requests, "the whole directory was local after its first file");
    assert!(fs::read(m.path("other/x.py")).unwrap() == files[0].1);
    assert!(m.counter("store_requests") > requests, "another directory was not loaded with it");
    m.umount();
}

/// Importing a Python package goes on to its subpackages: the first cold
/// read of a package's compiled `__init__` loads the bytecode directories
/// of its subpackages too, but not of its test suites.
#[test]
fn a_packages_compiled_init_loads_its_subpackages_bytecode_but_not_its_tests() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    // Files of 40 KiB (chunks of their own, not packed into groups), each
    // behind a spacer that no request merges across.
    let files: Vec<(String, Vec<u8>)> = vec![
        ("pkg/__pycache__/__init__.cpython-311.pyc".to_string(), Prng(0x7079_0001).bytes(40 << 10)),
        ("pkg/a_spacer.bin".to_string(), Prng(0x7079_0005).bytes(600 << 10)),
        ("pkg/sub/__pycache__/m.cpython-311.pyc".to_string(), Prng(0x7079_0002).bytes(40 << 10)),
        ("pkg/t_spacer.bin".to_string(), Prng(0x7079_0003).bytes(600 << 10)),
        ("pkg/tests/__pycache__/t.cpython-311.pyc".to_string(), Prng(0x7079_0004).bytes(40 << 10)),
    ];
    let m = mount_files(tmp.path(), &files);

    assert!(fs::read(m.path(&files[0].0)).unwrap() == files[0].1);
    wait_for_background_loads(&m);
    let requests = m.counter("store_requests");
    assert!(fs::read(m.path(&files[2].0)).unwrap() == files[2].1);
    assert_eq!(m.counter("store_requests"), requests, "the subpackage's bytecode was local after the package's __init__");
    assert!(fs::read(m.path(&files[4].0)).unwrap() == files[4].1);
    assert!(m.counter("store_requests") > requests, "the package's tests were not loaded with it");
    m.umount();
}

/// A directory's load takes the files of the kind of the read that starts
/// it: a data file beside libraries (glibc's `gconv-modules.cache`) loads
/// no libraries, and the first library read loads the others.
#[test]
fn a_directory_load_takes_the_files_of_the_kind_read() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    // 40 KiB files (chunks of their own), each behind 1.5 MiB of padding
    // (no small file, and no request merges across it).
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, name) in ["lib/a.so", "lib/b.so", "lib/modules.cache"].iter().enumerate() {
        files.push((name.to_string(), Prng(0x6b69_6e00 + i as u64).bytes(40 << 10)));
        files.push((format!("lib/{i}_pad.bin"), Prng(0x7061_6400 + i as u64).bytes(1536 << 10)));
    }
    let m = mount_files(tmp.path(), &files);
    let read = |i: usize| assert!(fs::read(m.path(&files[i].0)).unwrap() == files[i].1, "{}", files[i].0);

    read(4);
    let requests = m.settled_stats()["counters"]["store_requests"].as_u64().expect("store_requests");
    read(0);
    assert!(m.counter("store_requests") > requests, "reading the data file loaded no library");
    wait_for_background_loads(&m);
    let requests = m.counter("store_requests");
    read(2);
    assert_eq!(m.counter("store_requests"), requests, "the first library read loaded the other");
    m.umount();
}

/// `path` opened with POSIX_FADV_RANDOM, as a random-access program asks:
/// the kernel's own readahead is off, so each read reaches the daemon as
/// it is.
fn open_for_random_reads(path: &Path) -> fs::File {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(path).unwrap();
    // SAFETY: advice on a descriptor we own.
    assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) }, 0);
    f
}

/// Read-ahead: 4 KiB reads at random offsets of a 256 MiB file fetch at
/// most one chunk each (the kernel's own readahead off, as a random-access
/// program asks with POSIX_FADV_RANDOM); reading it straight through makes
/// at most size / 4 MiB + 8 store requests, the daemon reading ahead in
/// growing windows.
#[test]
fn random_reads_fetch_one_chunk_each_and_sequential_reads_read_ahead() {
    use std::os::unix::fs::FileExt;
    if !fuse_available() {
        return;
    }
    const SIZE: usize = 256 << 20;
    let tmp = tempdir();
    let data = Prng(0x7265_6164).bytes(SIZE);
    let image = fixed_chunk_image(tmp.path(), &[("big.bin".to_string(), data.clone())]);
    let counter = |m: &MountGuard, name: &str| m.counter(name);

    let m = MountGuard::mount(&image, tmp.path(), &tmp.path().join("cache-random"));
    let f = open_for_random_reads(&m.path("big.bin"));
    let mut rng = Prng(42);
    let mut buf = vec![0u8; 4096];
    for _ in 0..48 {
        let off = (rng.next_u64() % (SIZE as u64 / 4096)) * 4096;
        let before = counter(&m, "store_chunks");
        f.read_exact_at(&mut buf, off).unwrap();
        assert_eq!(buf, data[off as usize..off as usize + 4096], "bytes at {off}");
        let fetched = counter(&m, "store_chunks") - before;
        assert!(fetched <= 1, "a 4 KiB read at {off} fetched {fetched} chunks");
    }
    drop(f);
    m.umount();

    let m = MountGuard::mount(&image, tmp.path(), &tmp.path().join("cache-sequential"));
    let mut f = fs::File::open(m.path("big.bin")).unwrap();
    let mut read = Vec::with_capacity(SIZE);
    std::io::Read::read_to_end(&mut f, &mut read).unwrap();
    assert!(read == data, "sequential read returns the file's bytes");
    let requests = counter(&m, "store_requests");
    eprintln!("sequential read of {SIZE} bytes: {requests} store requests");
    assert!(requests <= (SIZE as u64 >> 22) + 8, "{requests} requests for a sequential read of 256 MiB");
    drop(f);
    m.umount();
}

/// Programs and shared libraries are loaded by 2 MiB window at the first
/// read in each (a process faults their pages in all over the file), their
/// end with their headers, and the windows never touched are not fetched;
/// other files are not: a 4 KiB read of a data file fetches one chunk.
#[test]
fn libraries_are_loaded_by_window_at_the_first_read_in_each() {
    use std::os::unix::fs::FileExt;
    if !fuse_available() {
        return;
    }
    const SIZE: usize = 6 << 20;
    let tmp = tempdir();
    let lib = Prng(0x006c_6962).bytes(SIZE);
    let data = Prng(0x6461_7461).bytes(SIZE);
    let image = fixed_chunk_image(tmp.path(), &[("libbig.so.1".to_string(), lib.clone()), ("data.bin".to_string(), data.clone())]);
    let counter = |m: &MountGuard, name: &str| m.counter(name);
    let m = MountGuard::mount(&image, tmp.path(), &tmp.path().join("cache"));
    let read_4k = |name: &str, at: usize| {
        let f = open_for_random_reads(&m.path(name));
        let mut buf = vec![0u8; 4096];
        f.read_exact_at(&mut buf, at as u64).unwrap();
        buf
    };
    let wait_for_chunks = |n: u64| {
        wait_until(Duration::from_secs(20), || counter(&m, "store_chunks") >= n);
        std::thread::sleep(Duration::from_millis(200));
        counter(&m, "store_chunks")
    };

    // Listed first, as an interpreter lists a package directory (the
    // kernel then knows the names from readdirplus, without lookups).
    for e in fs::read_dir(m.path("")).unwrap() {
        e.unwrap().metadata().unwrap();
    }
    // The library's 6 chunks are 3 windows of 2; a read of its first
    // bytes (its headers) loads chunks 0 and 1 and the one at its end (5:
    // what the loader relocates next), one in the last window loads 4.
    assert_eq!(read_4k("libbig.so.1", 0), lib[..4096]);
    assert_eq!(wait_for_chunks(3), 3, "a read of the headers loads their window and the file's end, 3 of the library's 6 chunks");
    // (The load may claim the first chunk before the reader does.)
    assert!(counter(&m, "read_ahead_chunks") >= 1, "the rest of the window came by read-ahead");
    let at = (4 << 20) + 100;
    assert_eq!(read_4k("libbig.so.1", at), lib[at..at + 4096]);
    assert_eq!(wait_for_chunks(4), 4, "a read in the last window loads it, and nothing between");

    assert_eq!(read_4k("data.bin", 0), data[..4096]);
    assert_eq!(wait_for_chunks(5), 5, "a data file's 4 KiB read fetches its one chunk");

    // The library is whole once read through (its middle window now).
    assert!(fs::read(m.path("libbig.so.1")).unwrap() == lib);
    assert_eq!(counter(&m, "store_chunks"), 7);
    m.umount();
}

/// `--load-program` (what `naiad run` does for its command): at mount the
/// program, its ELF interpreter and the libraries it needs are loaded, so
/// the dynamic loader's first reads of each are local, and so is the
/// middle of each (code or read-only data, which the process faults in
/// later: files of at most 8 MiB are loaded whole); without it each is a
/// cold read.
#[test]
fn a_program_and_its_libraries_are_loaded_at_mount() {
    use std::os::unix::fs::FileExt;
    if !fuse_available() {
        return;
    }
    let debian = debian_image();
    let tmp = tempdir();
    let image = convert(&debian.layout, "latest", &tmp.path().join("naiad"));
    let heads = ["usr/bin/python3.11", "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "usr/lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-gnu/libm.so.6"];
    // Store requests made by reading the first page of each, and the page
    // in its middle.
    let cold_page_requests = |m: &MountGuard| -> u64 {
        let before = m.counter("store_requests");
        for rel in heads {
            let want_file = fs::File::open(debian.reference_rootfs.join(rel)).unwrap();
            let middle = want_file.metadata().unwrap().len() / 2 / 4096 * 4096;
            let got_file = open_for_random_reads(&m.path(rel));
            for offset in [0, middle] {
                let mut page = vec![0u8; 4096];
                let n = got_file.read_at(&mut page, offset).unwrap();
                let mut want = vec![0u8; 4096];
                let w = want_file.read_at(&mut want, offset).unwrap();
                assert!(n == w && page[..n] == want[..w], "{rel} at {offset}");
            }
        }
        m.counter("store_requests") - before
    };

    let m = MountGuard::mount(&image, tmp.path(), &tmp.path().join("cache-plain"));
    assert!(cold_page_requests(&m) >= 2, "without --load-program the pages are cold reads");
    m.umount();

    let m = MountGuard::mount_with(&image, tmp.path(), &tmp.path().join("cache-program"), &["--load-program".as_ref(), "python3".as_ref()]);
    let mut last = u64::MAX;
    let settled = wait_until(Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(300));
        let now = m.counter("read_ahead_requests");
        std::mem::replace(&mut last, now) == now && now > 0
    });
    assert!(settled, "the program was not loaded: {}", m.stats());
    assert_eq!(cold_page_requests(&m), 0, "the program, its interpreter and its libraries were loaded at mount");
    m.umount();
}
