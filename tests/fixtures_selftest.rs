//! Self-tests of the shared test support in `tests/common`: the generated OCI
//! image is accepted by umoci and unpacks as designed, generation is
//! deterministic, and `compare_trees` reports exactly the differences made.
//! These need root (umoci raw unpack keeps owners and creates devices).

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("naiad-selftest-").tempdir_in("/tmp").expect("tempdir")
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn skip_unless_root() -> bool {
    !running_as_root() && !cannot_run("needs root")
}

/// Checks the notable cases of the generated image in an unpacked tree.
fn check_generated_tree(root: &Path) {
    let md = |p: &str| fs::symlink_metadata(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let read = |p: &str| fs::read(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));

    // Sizes around the chunk size; dedup copies.
    assert_eq!(md(gen_paths::BIG).len(), 3 * GENERATED_CHUNK as u64 + 12345);
    assert_eq!(md(gen_paths::EXACT_CHUNK).len(), GENERATED_CHUNK as u64);
    assert_eq!(read(gen_paths::BIG), read(gen_paths::BIG_COPY));
    assert_eq!(read(gen_paths::DUP1), read(gen_paths::DUP2));
    assert_eq!(md(gen_paths::BIG).ino(), md(gen_paths::BIG_HARDLINK).ino());
    let empty = md(gen_paths::EMPTY);
    assert_eq!((empty.len(), empty.mode() & 0o7777, empty.uid()), (0, 0o600, 1000));

    // Hardlinks: within a layer (one member whited out), to a lower layer,
    // and to a file of layer 2 from layer 4.
    for group in [gen_paths::HL_GROUP, gen_paths::LOWER_HL_GROUP, gen_paths::LATE_HL_GROUP] {
        let (a, b) = (md(group[0]), md(group[1]));
        assert_eq!(a.ino(), b.ino(), "{group:?} should be one inode");
        assert_eq!(a.nlink(), 2, "{group:?} nlink");
    }
    assert!(!root.join("data/hl-link2").exists());

    // Whiteouts, whiteout + recreate, opaque directory.
    assert!(!root.join("etc/group").exists());
    assert!(!root.join("gone-dir").exists());
    assert!(!root.join("gone-file").exists());
    assert_eq!(read("etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\n");
    let mut opaque: Vec<String> =
        fs::read_dir(root.join(gen_paths::OPAQUE_DIR)).expect("read opaque dir").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    opaque.sort();
    assert_eq!(opaque, ["new-before", "new-sub"], "opaque dir contents");

    // Type changes.
    assert!(md("replace/file-to-dir").is_dir());
    assert!(md("replace/dir-to-file").is_file());
    assert!(md("replace/dir-to-symlink").file_type().is_symlink());
    assert!(md("bin/sh-rel").is_file());
    assert!(md("lower/target2.bin").file_type().is_symlink());

    // Special files, modes, owners.
    assert_eq!(major(md(gen_paths::CHAR_DEV).rdev()), 1);
    assert_eq!(minor(md(gen_paths::CHAR_DEV).rdev()), 3);
    assert_eq!(major(md(gen_paths::BLOCK_DEV).rdev()), 7);
    assert_eq!(md("bin/suid").mode() & 0o7777, 0o4755);
    assert_eq!(md("bin/sgid").mode() & 0o7777, 0o2755);
    assert_eq!(md("tmp").mode() & 0o7777, 0o1777);
    assert_eq!((md("home/nobody").uid(), md("home/nobody").gid()), (65534, 65534));

    // Nanosecond mtimes (file, dir with a child, symlink).
    let pm = md(gen_paths::PRECISE_MTIME);
    assert_eq!((pm.mtime(), pm.mtime_nsec()), (1_700_000_000, 123_456_789));
    let pd = md("precise-dir");
    assert_eq!((pd.mtime(), pd.mtime_nsec()), (1_700_000_100, 987_654_321));
    let ps = md("etc/precise-symlink");
    assert_eq!((ps.mtime(), ps.mtime_nsec()), (1_700_000_300, 500_000_000));

    // xattrs.
    let x = |p: &str, n: &str| xattr::get(root.join(p), n).expect("getxattr");
    assert_eq!(x(gen_paths::XATTR_FILE, "user.naiad").as_deref(), Some(&b"test"[..]));
    assert_eq!(x(gen_paths::XATTR_FILE, "user.binary").as_deref(), Some(&[0u8, 1, 0xfe, 0xff][..]));
    assert_eq!(x(gen_paths::XATTR_DIR, "user.dir").as_deref(), Some(&b"yes"[..]));

    // Sparse files.
    let simple = read(gen_paths::SPARSE_SIMPLE);
    assert_eq!(simple.len(), 8 << 20);
    assert_eq!(simple[4 << 20], b'x');
    assert_eq!(simple.iter().filter(|&&b| b != 0).count(), 1);
    assert_eq!(md(gen_paths::SPARSE_MANY).len(), (7 << 20) + 123);

    // Long names and link targets.
    let long_file = format!("long/{}/{}", "d".repeat(120), "f".repeat(60));
    assert_eq!(read(&long_file), b"long name file\n");
    assert_eq!(md("long/hardlink-long-target").ino(), md(&long_file).ino());
    assert_eq!(read(&format!("long/{}", "p".repeat(150))), b"pax path file\n");
    assert_eq!(fs::read_link(root.join("long/pax-linkpath")).expect("readlink"), Path::new("/").join(&long_file));
    assert_eq!(read("long/symlink-long-target"), b"long name file\n");

    // Implicit parents exist as directories.
    for d in GENERATED_IMPLICIT_DIRS {
        assert!(md(d).is_dir(), "{d}");
    }
}

#[test]
fn generated_image_unpacks_with_umoci_uncompressed_and_gzip() {
    if skip_unless_root() {
        return;
    }
    let tmp = tempdir();
    let plain = generate_image(tmp.path(), Compression::None);
    let gzip = generate_image(tmp.path(), Compression::Gzip);
    assert_eq!(plain.layers.len(), 4);
    for (p, g) in plain.layers.iter().zip(&gzip.layers) {
        assert_eq!(p.diff_id, g.diff_id, "same tars whatever the compression");
        assert_eq!(p.digest, p.diff_id, "uncompressed blob digest is its diff_id");
    }

    // umoci 0.4.7 rejects the GNU sparse layer; if this starts to pass, umoci
    // learnt sparse files and the real layout can serve as reference.
    let direct = tmp.path().join("rootfs-direct");
    let err = std::panic::catch_unwind(|| umoci_unpack(&plain.layout, GENERATED_TAG, &direct)).expect_err("umoci 0.4.7 was expected to reject GNU sparse entries");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("unknown typeflag"), "unexpected umoci error: {msg}");

    let plain_root = tmp.path().join("rootfs-none");
    let gzip_root = tmp.path().join("rootfs-gzip");
    umoci_unpack(&plain.reference_layout, GENERATED_TAG, &plain_root);
    umoci_unpack(&gzip.reference_layout, GENERATED_TAG, &gzip_root);
    check_generated_tree(&plain_root);

    let diffs = compare_trees(&plain_root, &gzip_root, &generated_compare_options());
    assert!(diffs.is_empty(), "plain vs gzip unpack differ:\n{}", diffs.join("\n"));
}

/// What the tar crate sees of one entry: (path, type, mode, uid, gid, mtime,
/// sha256 of the contents).
fn tar_entries(tar: &[u8]) -> Vec<(String, String, u32, u64, u64, u64, String)> {
    let mut out = Vec::new();
    let mut ar = tar::Archive::new(tar);
    for e in ar.entries().expect("entries") {
        let mut e = e.expect("entry");
        let h = e.header().clone();
        let kind = match h.entry_type() {
            tar::EntryType::GNUSparse => tar::EntryType::Regular,
            k => k,
        };
        let path = e.path().expect("path").to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).expect("read entry");
        out.push((path, format!("{kind:?}"), h.mode().unwrap(), h.uid().unwrap(), h.gid().unwrap(), h.mtime().unwrap(), sha256_hex(&data)));
    }
    out
}

#[test]
fn sparse_layer_reads_like_its_plain_twin_with_the_tar_crate() {
    let tmp = tempdir();
    let img = generate_image(tmp.path(), Compression::None);
    let blob = |layout: &Path, digest: &str| {
        let hex = digest.strip_prefix("sha256:").expect("digest");
        fs::read(layout.join("blobs/sha256").join(hex)).expect("read blob")
    };
    let sparse = blob(&img.layout, &img.layers[2].digest);
    // The reference layout's manifest lists its own layer 3.
    let index: serde_json::Value = serde_json::from_slice(&fs::read(img.reference_layout.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"].as_str().unwrap().to_string();
    let manifest: serde_json::Value = serde_json::from_slice(&blob(&img.reference_layout, &mdigest)).unwrap();
    let plain = blob(&img.reference_layout, manifest["layers"][2]["digest"].as_str().unwrap());

    // The sparse tar really uses old-GNU sparse headers, one of them extended.
    let mut ar = tar::Archive::new(&sparse[..]);
    let mut kinds = Vec::new();
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        let gnu_ext = e.header().as_gnu().map(|g| g.is_extended()).unwrap_or(false);
        kinds.push((e.path().unwrap().to_string_lossy().into_owned(), e.header().entry_type(), gnu_ext));
    }
    assert_eq!(
        kinds,
        vec![
            ("sparse/".to_string(), tar::EntryType::Directory, false),
            ("sparse/many".to_string(), tar::EntryType::GNUSparse, true),
            ("sparse/simple".to_string(), tar::EntryType::GNUSparse, false),
        ]
    );
    assert!(sparse.len() < 4 << 20, "sparse tar should be small, is {}", sparse.len());
    assert_eq!(tar_entries(&sparse), tar_entries(&plain));
}

#[test]
fn generated_image_is_deterministic_and_zstd_matches() {
    let a = tempdir();
    let b = tempdir();
    for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let x = generate_image(a.path(), c);
        let y = generate_image(b.path(), c);
        assert_eq!(x.manifest_digest, y.manifest_digest, "{c:?} not deterministic");
        for l in &x.layers {
            assert_eq!(l.media_type, c.media_type());
        }
    }
    // zstd layers decompress to the same tars (umoci cannot unpack zstd).
    let z = generate_image(a.path(), Compression::Zstd);
    for l in &z.layers {
        let hex = l.digest.strip_prefix("sha256:").expect("digest");
        let blob = fs::read(z.layout.join("blobs/sha256").join(hex)).expect("read blob");
        let tar = zstd::decode_all(&blob[..]).expect("zstd decode");
        assert_eq!(format!("sha256:{}", sha256_hex(&tar)), l.diff_id);
    }
}

/// A small tree with every file type, a hardlink pair and an xattr.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    fs::write(root.join("dir/file"), b"hello world\n").unwrap();
    fs::write(root.join("dir/sub/other"), b"other\n").unwrap();
    fs::write(root.join("hl-a"), b"linked\n").unwrap();
    fs::hard_link(root.join("hl-a"), root.join("dir/hl-b")).unwrap();
    std::os::unix::fs::symlink("../hl-a", root.join("dir/link")).unwrap();
    fs::set_permissions(root.join("dir/file"), fs::Permissions::from_mode(0o4755)).unwrap();
    xattr::set(root.join("dir/file"), "user.naiad", b"test").unwrap();
    run(Command::new("mkfifo").arg(root.join("fifo")));
    run(Command::new("mknod").arg(root.join("null")).args(["c", "1", "3"]));
    run(Command::new("chown").arg("1000:1000").arg(root.join("dir/sub/other")));
}

fn copy_tree(from: &Path, to: &Path) {
    run(Command::new("cp").arg("-a").arg(from).arg(to));
}

#[test]
fn compare_trees_reports_exactly_the_change() {
    if skip_unless_root() {
        return;
    }
    let tmp = tempdir();
    let orig = tmp.path().join("orig");
    make_tree(&orig);
    let opts = CompareOptions::default();
    assert_eq!(compare_trees(&orig, &orig, &opts), Vec::<String>::new());

    let copy = tmp.path().join("copy");
    copy_tree(&orig, &copy);
    let strict = CompareOptions { skip_dir_mtime: false, ..CompareOptions::default() };
    let d = compare_trees(&orig, &copy, &strict);
    assert!(d.is_empty(), "cp -a copy differs:\n{}", d.join("\n"));

    // One byte changed (size and mtime kept).
    let c1 = tmp.path().join("c1");
    copy_tree(&orig, &c1);
    fs::write(c1.join("dir/file"), b"hello_world\n").unwrap();
    run(Command::new("touch").arg("-r").arg(orig.join("dir/file")).arg(c1.join("dir/file")));
    let d = compare_trees(&orig, &c1, &opts);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].starts_with("dir/file: contents differ"), "{d:?}");

    // One mode changed.
    let c2 = tmp.path().join("c2");
    copy_tree(&orig, &c2);
    fs::set_permissions(c2.join("dir/sub/other"), fs::Permissions::from_mode(0o600)).unwrap();
    let d = compare_trees(&orig, &c2, &opts);
    assert_eq!(d, vec!["dir/sub/other: mode expected 0o644, actual 0o600".to_string()]);

    // One xattr changed.
    let c3 = tmp.path().join("c3");
    copy_tree(&orig, &c3);
    xattr::set(c3.join("dir/file"), "user.naiad", b"TEST").unwrap();
    let d = compare_trees(&orig, &c3, &opts);
    assert_eq!(d, vec![r#"dir/file: xattr user.naiad expected "test", actual "TEST""#.to_string()]);

    // One hardlink broken (same contents and metadata, new inode).
    let c4 = tmp.path().join("c4");
    copy_tree(&orig, &c4);
    run(Command::new("cp").arg("-a").arg(c4.join("dir/hl-b")).arg(c4.join("dir/hl-b.tmp")));
    fs::rename(c4.join("dir/hl-b.tmp"), c4.join("dir/hl-b")).unwrap();
    let d = compare_trees(&orig, &c4, &opts);
    assert_eq!(d, vec!["hardlink groups differ: expected [dir/hl-b, hl-a]; actual [dir/hl-b] [hl-a]".to_string()]);

    // Missing and extra entries; capped output.
    let c5 = tmp.path().join("c5");
    copy_tree(&orig, &c5);
    fs::remove_dir_all(c5.join("dir/sub")).unwrap();
    fs::write(c5.join("new"), b"").unwrap();
    let d = compare_trees(&orig, &c5, &opts);
    assert_eq!(d, vec!["dir/sub: missing in actual (directory, and 1 entries below it)".to_string(), "new: extra in actual (not in expected) (regular file)".to_string(),]);
    let capped = compare_trees(&orig, &c5, &CompareOptions { max_reported: 1, ..opts.clone() });
    assert_eq!(capped.len(), 2);
    assert!(capped[1].starts_with("... and 1 more"), "{capped:?}");
}
