//! `naiad convert`, `unpack`, `check` and `inspect` end to end, on real OCI
//! layouts: small generated layers covering every layer-merge case, and a
//! debootstrap-built Debian image. The reference is `umoci raw unpack`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

fn run(args: &[&str]) -> Output {
    let out = naiad().args(args).output().expect("run naiad");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "naiad panicked: {stderr}");
    out
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "naiad {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs naiad expecting failure; returns stderr.
fn fails(args: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "naiad {args:?} should have failed");
    assert_eq!(out.status.code(), Some(1), "exit code for {args:?}: {stderr}");
    stderr
}

fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("naiad-test-{name}-")).tempdir_in("/tmp").expect("tempdir")
}

fn oci(dir: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", dir.display())
}

const FIXED: &[&str] = &["--chunking", "fixed", "--chunk-size", "1M"];
const CDC: &[&str] = &["--chunking", "cdc", "--cdc-min", "4K", "--cdc-avg", "16K", "--cdc-max", "64K"];

fn convert(src: &str, dst: &str, chunking: &[&str]) -> serde_json::Value {
    let mut args = vec!["convert", src, dst, "--json"];
    args.extend_from_slice(chunking);
    serde_json::from_str(&ok(&args)).expect("convert --json prints JSON")
}

fn generated_round_trip(compression: Compression, chunking: &[&str]) {
    let tmp = scratch("gen");
    let image = generate_image(tmp.path(), compression);
    let out = tmp.path().join("out");
    let summary = convert(&oci(&image.layout, "latest"), &oci(&out, "naiad"), chunking);
    assert_eq!(summary["layers"], 4);
    assert!(summary["unique_chunks"].as_u64().unwrap() < summary["chunks"].as_u64().unwrap(), "the generated image repeats content: {summary}");

    let reference = tmp.path().join("reference");
    umoci_unpack(&image.reference_layout, "latest", &reference);
    let unpacked = tmp.path().join("unpacked");
    ok(&["unpack", &oci(&out, "naiad"), unpacked.to_str().unwrap()]);
    let diffs = compare_trees(&reference, &unpacked, &generated_compare_options());
    assert!(diffs.is_empty(), "naiad unpack differs from umoci:\n{}", diffs.join("\n"));

    // The tar output, extracted by GNU tar, is the same tree.
    let tar_file = tmp.path().join("rootfs.tar");
    ok(&["unpack", &oci(&out, "naiad"), "--tar", tar_file.to_str().unwrap()]);
    let from_tar = tmp.path().join("from-tar");
    fs::create_dir(&from_tar).unwrap();
    let st = std::process::Command::new("tar").args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"]).arg(&tar_file).arg("-C").arg(&from_tar).status().unwrap();
    assert!(st.success());
    let diffs = compare_trees(&reference, &from_tar, &generated_compare_options());
    assert!(diffs.is_empty(), "naiad unpack --tar differs from umoci:\n{}", diffs.join("\n"));

    ok(&["check", &oci(&out, "naiad")]);
    let stats: serde_json::Value = serde_json::from_str(&ok(&["inspect", &oci(&out, "naiad"), "--json"])).unwrap();
    assert_eq!(stats["files"], summary["files"]);
    assert_eq!(stats["unique_chunks"], summary["unique_chunks"]);
}

#[test]
fn generated_plain_tar_fixed_chunks() {
    generated_round_trip(Compression::None, FIXED);
}

#[test]
fn generated_gzip_cdc() {
    generated_round_trip(Compression::Gzip, CDC);
}

#[test]
fn generated_zstd_fixed_and_cdc() {
    generated_round_trip(Compression::Zstd, FIXED);
    generated_round_trip(Compression::Zstd, CDC);
}

#[test]
fn generated_dedup_and_layout_details() {
    let tmp = scratch("dedup");
    let image = generate_image(tmp.path(), Compression::Gzip);
    let out = tmp.path().join("out");
    convert(&oci(&image.layout, "latest"), &oci(&out, "naiad"), FIXED);
    let chunks = |p: &str| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&ok(&["inspect", &oci(&out, "naiad"), "--json", "--path", p])).unwrap();
        v.as_array().unwrap().iter().map(|c| c["digest"].as_str().unwrap().to_string()).collect()
    };
    let big = chunks(gen_paths::BIG);
    assert_eq!(big.len(), 4, "3 MiB + 12345 bytes in 1 MiB chunks");
    assert_eq!(chunks(gen_paths::BIG_COPY), big, "a copy in a later layer reuses the chunks");
    assert_eq!(chunks(gen_paths::DUP1), chunks(gen_paths::DUP2));
    assert_eq!(chunks(gen_paths::DUP1)[0], big[1]);
    assert!(chunks(gen_paths::EMPTY).is_empty());
    // Converting into the source layout keeps the source image.
    let before = fs::read(image.layout.join("index.json")).unwrap();
    convert(&oci(&image.layout, "latest"), &oci(&image.layout, "naiad"), CDC);
    let index: serde_json::Value = serde_json::from_slice(&fs::read(image.layout.join("index.json")).unwrap()).unwrap();
    let tags: Vec<&str> = index["manifests"].as_array().unwrap().iter().map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str().unwrap()).collect();
    assert_eq!(tags, vec!["latest", "naiad"]);
    let old: serde_json::Value = serde_json::from_slice(&before).unwrap();
    assert_eq!(index["manifests"][0], old["manifests"][0]);
}

fn debian_round_trip(layout: &Path, chunking: &[&str]) {
    let deb = debian_image();
    let tmp = scratch("debian");
    let out = tmp.path().join("out");
    let summary = convert(&oci(layout, "latest"), &oci(&out, "naiad"), chunking);
    assert!(summary["files"].as_u64().unwrap() > 3000, "{summary}");
    let unpacked = tmp.path().join("unpacked");
    ok(&["unpack", &oci(&out, "naiad"), unpacked.to_str().unwrap()]);
    let opts = CompareOptions { skip_dir_mtime: false, ..CompareOptions::default() };
    let diffs = compare_trees(&deb.reference_rootfs, &unpacked, &opts);
    assert!(diffs.is_empty(), "naiad unpack differs from umoci:\n{}", diffs.join("\n"));
    ok(&["check", &oci(&out, "naiad")]);
}

#[test]
fn debian_gzip_cdc() {
    debian_round_trip(&debian_image().layout, &[]);
}

#[test]
fn debian_zstd_fixed() {
    debian_round_trip(&debian_image().layout_zstd, FIXED);
}

/// The stored blob file of layer `i` of the image tagged `tag`.
fn manifest_of(layout: &Path, tag: &str) -> (PathBuf, serde_json::Value) {
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let desc = index["manifests"].as_array().unwrap().iter().find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag).expect("tag").clone();
    let path = blob_path(layout, desc["digest"].as_str().unwrap());
    let manifest = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    (path, manifest)
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
}

#[test]
fn check_names_the_file_behind_a_flipped_byte() {
    let tmp = scratch("flip");
    let image = generate_image(tmp.path(), Compression::Gzip);
    let out = tmp.path().join("out");
    convert(&oci(&image.layout, "latest"), &oci(&out, "naiad"), FIXED);
    let v: serde_json::Value = serde_json::from_str(&ok(&["inspect", &oci(&out, "naiad"), "--json", "--path", gen_paths::EXACT_CHUNK])).unwrap();
    let chunk = &v[0];
    let (_, manifest) = manifest_of(&out, "naiad");
    let blob = manifest["layers"][chunk["blob_index"].as_u64().unwrap() as usize]["digest"].as_str().unwrap().to_string();
    let path = blob_path(&out, &blob);
    let mut data = fs::read(&path).unwrap();
    let at = (chunk["blob_offset"].as_u64().unwrap() + chunk["stored_size"].as_u64().unwrap() / 2) as usize;
    data[at] ^= 0x01;
    fs::write(&path, &data).unwrap();
    let err = fails(&["check", &oci(&out, "naiad")]);
    assert!(err.contains(gen_paths::EXACT_CHUNK), "check must name the file: {err}");
    assert!(err.contains("at offset 0"), "{err}");
    assert!(err.contains(&blob), "{err}");
}

/// Rewrites the image tagged `tag` so layer `i` is `data` (with matching
/// digest and size), or only changes its descriptor with `edit`.
fn rewrite_manifest(layout: &Path, tag: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let (_, mut manifest) = manifest_of(layout, tag);
    edit(&mut manifest);
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let digest = format!("sha256:{}", sha256_hex(&bytes));
    fs::write(blob_path(layout, &digest), &bytes).unwrap();
    let mut index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    for m in index["manifests"].as_array_mut().unwrap() {
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag {
            m["digest"] = digest.clone().into();
            m["size"] = bytes.len().into();
        }
    }
    fs::write(layout.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

fn replace_layer(layout: &Path, tag: &str, i: usize, data: &[u8]) {
    let digest = format!("sha256:{}", sha256_hex(data));
    fs::write(blob_path(layout, &digest), data).unwrap();
    rewrite_manifest(layout, tag, |m| {
        m["layers"][i]["digest"] = digest.clone().into();
        m["layers"][i]["size"] = data.len().into();
    });
}

/// Converting `src` must fail with a message containing each of `needles`,
/// exit 1, leave no destination behind, and leave an existing layout as it was.
fn convert_fails(src: &Path, needles: &[&str]) {
    let tmp = scratch("bad");
    let dst = tmp.path().join("dst");
    let err = fails(&["convert", &oci(src, "latest"), &oci(&dst, "naiad")]);
    for n in needles {
        assert!(err.contains(n), "error should mention {n:?}: {err}");
    }
    assert!(!dst.exists(), "nothing may be written at the destination");
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0, "no temporary files left");
    // Into an existing layout (the source itself): nothing changes there.
    let list = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(p.join("blobs/sha256")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    let blobs_before = list(src);
    let index_before = fs::read(src.join("index.json")).unwrap();
    fails(&["convert", &oci(src, "latest"), &oci(src, "naiad")]);
    assert_eq!(list(src), blobs_before, "blobs added by a failed conversion must be removed");
    assert_eq!(fs::read(src.join("index.json")).unwrap(), index_before);
}

fn layer_tar(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        // Write the name bytes directly: the tar crate refuses to build `..` paths.
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

#[test]
fn bad_inputs_give_clear_errors_and_write_nothing() {
    let tmp = scratch("inputs");
    let fresh = |name: &str, c: Compression| -> PathBuf {
        let image = generate_image(&tmp.path().join(name), c);
        image.layout
    };

    // A truncated gzip layer (its digest matches the truncated bytes).
    let layout = fresh("truncated", Compression::Gzip);
    let (_, m) = manifest_of(&layout, "latest");
    let l0 = fs::read(blob_path(&layout, m["layers"][0]["digest"].as_str().unwrap())).unwrap();
    replace_layer(&layout, "latest", 0, &l0[..l0.len() / 2]);
    let (_, m) = manifest_of(&layout, "latest");
    convert_fails(&layout, &[m["layers"][0]["digest"].as_str().unwrap(), "truncated"]);

    // Entries escaping the root.
    for (name, needle) in [(&b"../evil"[..], "'..'"), (b"/etc/evil", "absolute path")] {
        let layout = fresh("escape", Compression::None);
        replace_layer(&layout, "latest", 1, &layer_tar(&[(b"fine", b"ok"), (name, b"x")]));
        convert_fails(&layout, &[needle, &String::from_utf8_lossy(name)]);
    }

    // A layer whose content does not match the manifest's digest.
    let layout = fresh("mismatch", Compression::None);
    let (_, m) = manifest_of(&layout, "latest");
    let digest = m["layers"][0]["digest"].as_str().unwrap().to_string();
    let path = blob_path(&layout, &digest);
    let mut data = fs::read(&path).unwrap();
    let at = data.windows(4).position(|w| w == b"\0\0\0\0").unwrap_or(600) + 1024;
    data[at] ^= 0x20;
    fs::write(&path, &data).unwrap();
    convert_fails(&layout, &[&digest, "does not match"]);

    // A missing blob.
    let layout = fresh("missing", Compression::Gzip);
    let (_, m) = manifest_of(&layout, "latest");
    let digest = m["layers"][2]["digest"].as_str().unwrap().to_string();
    fs::remove_file(blob_path(&layout, &digest)).unwrap();
    convert_fails(&layout, &[&digest, "not found"]);

    // An unknown media type.
    let layout = fresh("mediatype", Compression::Gzip);
    rewrite_manifest(&layout, "latest", |m| m["layers"][1]["mediaType"] = "application/vnd.example.unknown".into());
    convert_fails(&layout, &["application/vnd.example.unknown", "media type"]);

    // Not a layout, and a missing tag.
    let err = fails(&["convert", "oci:/nonexistent/naiad:latest", &oci(&tmp.path().join("x"), "y")]);
    assert!(err.contains("/nonexistent/naiad"), "{err}");
    let layout = fresh("tag", Compression::None);
    let err = fails(&["convert", &oci(&layout, "nosuchtag"), &oci(&tmp.path().join("x"), "y")]);
    assert!(err.contains("nosuchtag") && err.contains("latest"), "{err}");
}

#[test]
fn corrupted_bootstrap_is_refused() {
    let tmp = scratch("boot");
    let image = generate_image(tmp.path(), Compression::Gzip);
    let out = tmp.path().join("out");
    convert(&oci(&image.layout, "latest"), &oci(&out, "naiad"), FIXED);
    let (_, m) = manifest_of(&out, "naiad");
    let layers = m["layers"].as_array().unwrap();
    let boot_index = layers.len() - 1;
    let boot_blob = fs::read(blob_path(&out, layers[boot_index]["digest"].as_str().unwrap())).unwrap();
    let raw = zstd::decode_all(&boot_blob[..]).unwrap();
    let strings_offset = u64::from_le_bytes(raw[56 + 6 * 16..64 + 6 * 16].try_into().unwrap()) as usize;
    let inode_table = u64::from_le_bytes(raw[56..64].try_into().unwrap()) as usize;
    for (what, at, needle) in [("header", 9usize, "version"), ("header", 60, "checksum"), ("tables", inode_table + 70, "checksum"), ("strings", strings_offset + 1, "checksum")] {
        let mut bad = raw.clone();
        bad[at] ^= 0x40;
        let tag = format!("bad-{at}");
        // Copy the good image under a new tag, then swap in the bad bootstrap.
        let (_, good) = manifest_of(&out, "naiad");
        let bytes = serde_json::to_vec(&good).unwrap();
        let d = format!("sha256:{}", sha256_hex(&bytes));
        fs::write(blob_path(&out, &d), &bytes).unwrap();
        let mut index: serde_json::Value = serde_json::from_slice(&fs::read(out.join("index.json")).unwrap()).unwrap();
        index["manifests"].as_array_mut().unwrap().push(serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": bytes.len(), "annotations": {"org.opencontainers.image.ref.name": tag}}));
        fs::write(out.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        replace_layer(&out, &tag, boot_index, &zstd::encode_all(&bad[..], 3).unwrap());
        // As a buggy writer would: the annotation agrees with the bad bytes,
        // so the format's own checks are what catch the damage.
        let raw_digest = format!("sha256:{}", sha256_hex(&bad));
        rewrite_manifest(&out, &tag, |m| m["layers"][boot_index]["annotations"]["org.naiad.bootstrap.uncompressed-digest"] = raw_digest.clone().into());
        for cmd in ["check", "inspect"] {
            let err = fails(&[cmd, &oci(&out, &tag)]);
            assert!(err.contains("bootstrap") && err.contains(needle), "{what} corruption, {cmd}: {err}");
            assert!(err.contains(&out.display().to_string()), "{err}");
        }
        let dest = tmp.path().join(format!("unpacked-{at}"));
        fails(&["unpack", &oci(&out, &tag), dest.to_str().unwrap()]);
        assert!(!dest.exists());
    }
    // A decompression bomb: a header that declares 3 GiB, then zeros. It is
    // refused from its header, before anything is inflated.
    let mut bomb = raw[..256].to_vec();
    bomb[16..24].copy_from_slice(&(3u64 << 30).to_le_bytes());
    let mut enc = zstd::Encoder::new(Vec::new(), 19).unwrap();
    std::io::Write::write_all(&mut enc, &bomb).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..256 {
        std::io::Write::write_all(&mut enc, &zeros).unwrap();
    }
    let bomb = enc.finish().unwrap();
    rewrite_manifest(&out, "naiad", |m| {
        let d = format!("sha256:{}", sha256_hex(&bomb));
        fs::write(blob_path(&out, &d), &bomb).unwrap();
        m["layers"][boot_index]["digest"] = d.into();
        m["layers"][boot_index]["size"] = bomb.len().into();
    });
    let err = fails(&["inspect", &oci(&out, "naiad")]);
    assert!(err.contains("declares 3221225472 bytes"), "{err}");
    // A stale uncompressed-digest annotation is caught before decoding.
    let mut bad = raw.clone();
    bad[strings_offset] ^= 0x01;
    rewrite_manifest(&out, "naiad", |m| {
        let data = zstd::encode_all(&bad[..], 3).unwrap();
        let d = format!("sha256:{}", sha256_hex(&data));
        fs::write(blob_path(&out, &d), &data).unwrap();
        m["layers"][boot_index]["digest"] = d.into();
        m["layers"][boot_index]["size"] = data.len().into();
    });
    let err = fails(&["inspect", &oci(&out, "naiad")]);
    assert!(err.contains("does not match its digest annotation"), "{err}");
    // A source image that is not a naiad image.
    let err = fails(&["inspect", &oci(&image.layout, "latest")]);
    assert!(err.contains("not a naiad image"), "{err}");
}

#[test]
fn prefetch_list_puts_the_startup_set_in_one_blob() {
    let tmp = scratch("prefetch");
    let image = generate_image(tmp.path(), Compression::Gzip);
    let list = tmp.path().join("startup.list");
    // The second MiB of the big file (as a trace records it), then every
    // file directly under /etc.
    fs::write(&list, format!("# startup set\n{{\"path\": \"/{}\", \"offset\": 1048576, \"length\": 4096}}\n/etc/*\n", gen_paths::BIG)).unwrap();
    let out = tmp.path().join("out");
    let mut args = vec!["convert", "--prefetch-list", list.to_str().unwrap()];
    let (src, dst) = (oci(&image.layout, "latest"), oci(&out, "naiad"));
    args.extend([src.as_str(), dst.as_str(), "--json"]);
    args.extend_from_slice(FIXED);
    let summary: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    let stats: serde_json::Value = serde_json::from_str(&ok(&["inspect", &dst, "--json"])).unwrap();
    let blobs = stats["blobs"].as_array().unwrap().len();
    assert_eq!(summary["blobs"].as_u64().unwrap() as usize, blobs);
    let prefetch_blob = (blobs - 1) as u64;
    let listing =
        |p: &str| -> Vec<serde_json::Value> { serde_json::from_str::<serde_json::Value>(&ok(&["inspect", &dst, "--json", "--path", p])).unwrap().as_array().unwrap().clone() };
    let u = |v: &serde_json::Value| v.as_u64().unwrap();
    // The traced page is a piece of its own in the prefetch blob; the rest
    // of its 1 MiB chunk stays in the layer's blob, named around it.
    let big = listing(gen_paths::BIG);
    // (The page is packed into a chunk group of the prefetch blob, so its
    // chunk offset is the group's business.)
    let shape: Vec<(u64, u64, bool)> = big.iter().map(|c| (u(&c["file_offset"]), u(&c["size"]), u(&c["blob_index"]) == prefetch_blob)).collect();
    assert_eq!(&shape[..3], &[(0, 1 << 20, false), (1 << 20, 4096, true), ((1 << 20) + 4096, (1 << 20) - 4096, false)], "{shape:?}");
    assert_eq!(u(&big[2]["chunk_offset"]), 4096, "the rest of the chunk: {}", big[2]);
    assert!(shape[3..].iter().all(|p| !p.2), "untraced chunks stay in their layer's blob: {shape:?}");
    // The prefetch blob holds the page, not its 1 MiB chunk.
    let prefetch_blob_size = u(&stats["blobs"][prefetch_blob as usize]["size"]);
    assert!(prefetch_blob_size < 256 << 10, "the prefetch blob holds {prefetch_blob_size} bytes");
    // The files under /etc are in it whole (packed into its chunk groups,
    // with the page).
    for p in [gen_paths::XATTR_FILE, gen_paths::PRECISE_MTIME] {
        assert!(listing(p).iter().all(|c| u(&c["blob_index"]) == prefetch_blob), "{p}");
    }
    assert!(u(&stats["prefetch_chunks"]) > 0, "{stats}");
    ok(&["check", &dst]);
    // Same tree as without a prefetch list.
    let reference = tmp.path().join("reference");
    umoci_unpack(&image.reference_layout, "latest", &reference);
    let unpacked = tmp.path().join("unpacked");
    ok(&["unpack", &dst, unpacked.to_str().unwrap()]);
    let diffs = compare_trees(&reference, &unpacked, &generated_compare_options());
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

/// The prefetch blob holds the startup set in the list's order (a trace's
/// first-access order), not in the layers' order, so a reader streaming it
/// gets first what the workload needs first.
#[test]
fn prefetch_blob_follows_the_list_order() {
    let tmp = scratch("prefetch-order");
    let mut rng = Prng(7);
    let files: Vec<(String, Vec<u8>)> = ["a.bin", "b.bin", "c.bin"].iter().map(|n| (n.to_string(), rng.bytes(200 << 10))).collect();
    let layout = tmp.path().join("src");
    files_layout(&layout, &files);
    let list = tmp.path().join("startup.list");
    fs::write(&list, "/c.bin\n/a.bin\n/b.bin\n").unwrap();
    let (src, dst) = (oci(&layout, "latest"), oci(&tmp.path().join("out"), "naiad"));
    ok(&["convert", "--prefetch-list", list.to_str().unwrap(), &src, &dst]);
    let first_offset = |p: &str| -> u64 {
        let pieces: serde_json::Value = serde_json::from_str(&ok(&["inspect", &dst, "--json", "--path", p])).unwrap();
        pieces[0]["blob_offset"].as_u64().unwrap()
    };
    let (a, b, c) = (first_offset("a.bin"), first_offset("b.bin"), first_offset("c.bin"));
    assert!(c == 0 && c < a && a < b, "prefetch blob offsets: a {a}, b {b}, c {c} (listed c, a, b)");
    // The manifest says how many bytes at the prefetch blob's start hold
    // the set (here all of it), for a reader to start reading before the
    // bootstrap is in; no other layer says so.
    let (_, manifest) = manifest_of(&tmp.path().join("out"), "naiad");
    let layers = manifest["layers"].as_array().unwrap();
    let annotated: Vec<&serde_json::Value> = layers.iter().filter(|l| l["annotations"].get("org.naiad.blob.startup-set").is_some()).collect();
    assert_eq!(annotated.len(), 1, "{manifest}");
    let stats: serde_json::Value = serde_json::from_str(&ok(&["inspect", &dst, "--json"])).unwrap();
    let prefetch_blob = stats["blobs"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(annotated[0]["size"], prefetch_blob["size"], "the annotated layer is the prefetch blob: {manifest}");
    assert_eq!(annotated[0]["annotations"]["org.naiad.blob.startup-set"], prefetch_blob["size"].as_u64().unwrap().to_string());
    ok(&["check", &dst]);
}

#[test]
fn docker_archive_source_round_trips() {
    let tmp = scratch("archive");
    let image = generate_image(tmp.path(), Compression::Gzip);
    // skopeo writes what `docker save` writes (uncompressed layers, manifest.json).
    let archive = tmp.path().join("saved.tar");
    let st = std::process::Command::new("skopeo")
        .args(["copy", "--quiet", &format!("oci:{}:latest", image.reference_layout.display()), &format!("docker-archive:{}:naiad/test:latest", archive.display())])
        .status()
        .expect("skopeo");
    assert!(st.success(), "skopeo copy to docker-archive failed");
    let out = tmp.path().join("out");
    let summary = convert(&format!("docker-archive:{}", archive.display()), &oci(&out, "naiad"), CDC);
    assert_eq!(summary["layers"], 4);
    let reference = tmp.path().join("reference");
    umoci_unpack(&image.reference_layout, "latest", &reference);
    let unpacked = tmp.path().join("unpacked");
    ok(&["unpack", &oci(&out, "naiad"), unpacked.to_str().unwrap()]);
    let diffs = compare_trees(&reference, &unpacked, &generated_compare_options());
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    // The config (Cmd, Env) is carried over.
    let (_, m) = manifest_of(&out, "naiad");
    let config: serde_json::Value = serde_json::from_slice(&fs::read(blob_path(&out, m["config"]["digest"].as_str().unwrap())).unwrap()).unwrap();
    assert_eq!(config["config"]["Cmd"][0], "/bin/sh");
    // A corrupted archive is refused with its name.
    let bad = tmp.path().join("bad.tar");
    let data = fs::read(&archive).unwrap();
    fs::write(&bad, &data[..data.len() / 3]).unwrap();
    let err = fails(&["convert", &format!("docker-archive:{}", bad.display()), &oci(&tmp.path().join("o2"), "x")]);
    assert!(err.contains("bad.tar"), "{err}");
}

/// A tar stream of `entries` built with the tar crate (PAX long names and
/// link targets as needed): (path, symlink target or None for a file, data).
fn tar_of(entries: &[(String, Option<String>, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, link, data) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        match link {
            Some(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, path, target).unwrap();
            }
            None => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, *data).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// `naiad convert` of `layout` with a deadline: a hostile layer must get a
/// result or an error, never hang or crash. Returns (exit code, stderr).
fn convert_with_deadline(layout: &Path, dst: &Path) -> (Option<i32>, String) {
    let mut child = naiad()
        .args(["convert", &oci(layout, "latest"), &oci(dst, "naiad")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn naiad convert");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("naiad convert of {} did not finish within 120 s", layout.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "naiad panicked: {stderr}");
    (out.status.code(), stderr)
}

#[test]
fn chained_symlinks_are_bounded_like_linux() {
    let tmp = scratch("links");
    let image = generate_image(&tmp.path().join("img"), Compression::None);
    // a{n} -> a{n-1}/../a{n-1}: resolving a{n} walks a{n-1} twice, so an
    // unbounded resolver does 2^n walks for a30/file.
    let mut entries: Vec<(String, Option<String>, &[u8])> = vec![("a0/keep".into(), None, b"x")];
    for n in 1..=30 {
        entries.push((format!("a{n}"), Some(format!("a{0}/../a{0}", n - 1)), b""));
    }
    entries.push(("a30/file".into(), None, b"deep"));
    replace_layer(&image.layout, "latest", 3, &tar_of(&entries));
    let (code, err) = convert_with_deadline(&image.layout, &tmp.path().join("out"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("too many levels of symbolic links") && err.contains("a30/file"), "{err}");

    // A path through a few links still resolves.
    let image = generate_image(&tmp.path().join("img2"), Compression::None);
    let short: Vec<(String, Option<String>, &[u8])> = entries[..4].iter().cloned().chain([("a3/file".to_string(), None, &b"deep"[..])]).collect();
    replace_layer(&image.layout, "latest", 3, &tar_of(&short));
    let out = tmp.path().join("out2");
    let (code, err) = convert_with_deadline(&image.layout, &out);
    assert_eq!(code, Some(0), "{err}");
    let listing: serde_json::Value = serde_json::from_str(&ok(&["inspect", &oci(&out, "naiad"), "--json", "--path", "/a0/file"])).unwrap();
    assert_eq!(listing[0]["size"], 4, "a3/file is a0/file, 4 bytes: {listing}");
}

#[test]
fn an_opaque_marker_over_a_very_deep_tree_does_not_overflow_the_stack() {
    let tmp = scratch("deep");
    let image = generate_image(&tmp.path().join("img"), Compression::None);
    let deep = format!("{}file", "d/".repeat(300_000));
    replace_layer(&image.layout, "latest", 2, &tar_of(&[(deep, None, b"x")]));
    replace_layer(&image.layout, "latest", 3, &tar_of(&[("d/.wh..wh..opq".into(), None, b""), ("d/new".into(), None, b"y")]));
    let (code, err) = convert_with_deadline(&image.layout, &tmp.path().join("out"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("nested deeper than 4096 levels") && err.len() < 2000, "{}", &err[..err.len().min(2000)]);

    // As deep as the format allows: converts, opaque marker applied.
    let image = generate_image(&tmp.path().join("img2"), Compression::None);
    let deep = format!("{}file", "d/".repeat(4000));
    replace_layer(&image.layout, "latest", 2, &tar_of(&[(deep, None, b"x")]));
    replace_layer(&image.layout, "latest", 3, &tar_of(&[("d/.wh..wh..opq".into(), None, b""), ("d/new".into(), None, b"y")]));
    let out = tmp.path().join("out2");
    let (code, err) = convert_with_deadline(&image.layout, &out);
    assert_eq!(code, Some(0), "{err}");
    let summary = ok(&["inspect", "--json", &oci(&out, "naiad")]);
    let s: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert!(s["directories"].as_u64().unwrap() < 100, "the opaque marker pruned the deep tree: {s}");
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let tmp = scratch("pipe");
    let image = generate_image(&tmp.path().join("img"), Compression::Gzip);
    let out = tmp.path().join("out");
    convert(&oci(&image.layout, "latest"), &oci(&out, "naiad"), FIXED);
    for args in [vec!["inspect", "--path", "/data/big.bin"], vec!["inspect", "--json"], vec!["inspect"]] {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills two descriptors we then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors are ours, each owned once.
        let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // The reader is gone before naiad writes: every write gets EPIPE.
        drop(read_end);
        let o = naiad().args(&args).arg(oci(&out, "naiad")).stdout(std::process::Stdio::from(write_end)).output().expect("run naiad");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.is_empty(), "naiad {args:?} into a closed pipe said: {stderr}");
        assert_eq!(o.status.code(), Some(0), "naiad {args:?} into a closed pipe");
    }
}

#[test]
fn unpack_can_leave_devices_and_setuid_bits_out() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let tmp = scratch("nodev");
    let image = generate_image(&tmp.path().join("img"), Compression::Gzip);
    let out = tmp.path().join("out");
    convert(&oci(&image.layout, "latest"), &oci(&out, "naiad"), FIXED);
    let scan = |dir: &Path| -> (usize, usize) {
        let (mut devices, mut setid) = (0, 0);
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let m = fs::symlink_metadata(e.path()).unwrap();
                let t = m.file_type();
                if t.is_dir() {
                    stack.push(e.path());
                }
                if t.is_char_device() || t.is_block_device() {
                    devices += 1;
                }
                if !t.is_symlink() && m.permissions().mode() & 0o6000 != 0 {
                    setid += 1;
                }
            }
        }
        (devices, setid)
    };
    let full = tmp.path().join("full");
    ok(&["unpack", &oci(&out, "naiad"), full.to_str().unwrap()]);
    let (devices, setid) = scan(&full);
    assert!(devices >= 2 && setid >= 1, "the generated image has devices and setuid files: {devices} {setid}");
    let safe = tmp.path().join("safe");
    ok(&["unpack", "--no-devices", "--no-setuid", &oci(&out, "naiad"), safe.to_str().unwrap()]);
    assert_eq!(scan(&safe), (0, 0), "devices or setuid bits left");
    assert!(safe.join("dev/fifo").exists(), "FIFOs stay");
}

/// Small files share chunk groups (SPEC 5.5): far fewer chunks than files,
/// each file a piece of its group, identical small files stored once, large
/// files still in chunks of their own; and the tree round-trips through
/// `unpack` and passes `check`. `--small-files 0` gives every file its own.
#[test]
fn small_files_share_chunk_groups() {
    let tmp = scratch("groups");
    let mut files: Vec<(String, Vec<u8>)> = (0..2000).map(|i| (format!("d/f{i:04}"), format!("small file {i}\n").repeat(i % 50 + 1).into_bytes())).collect();
    files.push(("d/same1".into(), b"identical bytes".to_vec()));
    files.push(("e/same2".into(), b"identical bytes".to_vec()));
    let mut x = 88172645463325252u64;
    let noise = (0..600_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    files.push(("d/big".into(), noise));
    let entries: Vec<(&[u8], &[u8])> = files.iter().map(|(p, d)| (p.as_bytes(), d.as_slice())).collect();
    let layout = tmp.path().join("src");
    write_layout(&layout, vec![("small files", layer_tar(&entries))], Compression::Gzip);
    let small_bytes: usize = files.iter().filter(|(_, d)| d.len() < 16 << 10).map(|(_, d)| d.len()).sum();

    let out = tmp.path().join("out");
    let summary = convert(&oci(&layout, "latest"), &oci(&out, "naiad"), &[]);
    let piece = |p: &str| -> Vec<serde_json::Value> {
        serde_json::from_str::<serde_json::Value>(&ok(&["inspect", &oci(&out, "naiad"), "--json", "--path", p])).unwrap().as_array().unwrap().clone()
    };
    let (a, b) = (&piece("d/f0001")[0], &piece("d/f0002")[0]);
    assert_eq!(a["digest"], b["digest"], "neighbouring small files share a group");
    assert_eq!(a["size"].as_u64().unwrap(), files[1].1.len() as u64);
    assert_eq!(b["chunk_offset"].as_u64().unwrap(), a["chunk_offset"].as_u64().unwrap() + a["size"].as_u64().unwrap(), "packed back to back");
    assert!(a["chunk_size"].as_u64().unwrap() > a["size"].as_u64().unwrap());
    assert_eq!(piece("d/same1"), piece("e/same2"), "identical small files are stored once");
    let big = piece("d/big");
    assert!(big.len() > 1 && big.iter().all(|c| c["chunk_offset"] == 0 && c["size"] == c["chunk_size"]), "a large file keeps whole chunks: {big:?}");
    // The groups: full ones of 64 KiB, and one at most partly filled
    // (the 2,000 files fill them in order).
    let unique = summary["unique_chunks"].as_u64().unwrap();
    let groups = unique - big.len() as u64;
    assert!(groups <= (small_bytes / (64 << 10)) as u64 + 2, "{groups} chunk groups for {small_bytes} bytes of small files: {summary}");

    let unpacked = tmp.path().join("unpacked");
    ok(&["unpack", &oci(&out, "naiad"), unpacked.to_str().unwrap()]);
    for (p, data) in &files {
        assert_eq!(&fs::read(unpacked.join(p)).unwrap(), data, "{p}");
    }
    ok(&["check", &oci(&out, "naiad")]);

    let alone = convert(&oci(&layout, "latest"), &oci(&tmp.path().join("alone"), "naiad"), &["--small-files", "0"]);
    assert!(alone["unique_chunks"].as_u64().unwrap() >= 2001, "{alone}");
    assert!(alone["bootstrap_bytes"].as_u64().unwrap() > summary["bootstrap_bytes"].as_u64().unwrap());
    let e = fails(&["convert", &oci(&layout, "latest"), &oci(&tmp.path().join("bad"), "naiad"), "--small-files", "128K", "--group-size", "64K"]);
    assert!(e.contains("cannot be packed into chunk groups"), "{e}");
    assert!(!tmp.path().join("bad").join("index.json").exists());
}

fn index_tags(layout: &Path) -> Vec<String> {
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"].as_array().unwrap().iter().map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str().unwrap().to_string()).collect()
}

/// `--chunk-dict`: version 2 references version 1's chunks (its blob is a
/// layer of version 2), stores only what changed, unpacks equal to its
/// source, passes `check`, and keeps working once version 1's tag is gone.
#[test]
fn chunk_dict_references_the_old_version_and_outlives_its_tag() {
    let tmp = scratch("dict");
    let (v1, v2) = two_versions();
    let (src1, src2) = (tmp.path().join("src1"), tmp.path().join("src2"));
    files_layout(&src1, &v1);
    files_layout(&src2, &v2);
    let store = tmp.path().join("store");
    let first = convert(&oci(&src1, "latest"), &oci(&store, "v1"), &[]);
    let alone = convert(&oci(&src2, "latest"), &oci(&tmp.path().join("alone"), "v2"), &[]);
    let second = convert(&oci(&src2, "latest"), &oci(&store, "v2"), &["--chunk-dict", "auto"]);
    assert_eq!(second["chunk_dicts"][0], oci(&store, "v1"), "auto picks the layout's naiad image: {second}");
    assert!(second["dict_chunks"].as_u64().unwrap() > 0 && second["dict_blobs"] == 1, "{second}");
    let (new, full) = (second["new_blob_bytes"].as_u64().unwrap(), alone["blob_bytes"].as_u64().unwrap());
    assert!(new * 5 < full, "version 2 stores {new} new bytes, {full} alone");
    let (_, m1) = manifest_of(&store, "v1");
    let (_, m2) = manifest_of(&store, "v2");
    assert!(m2["layers"].as_array().unwrap().iter().any(|l| l["digest"] == m1["layers"][0]["digest"]), "version 1's blob is a layer of version 2: {m2}");
    assert_eq!(first["blobs"], 1);

    let unpack_equal = |what: &str| {
        let (a, b) = (tmp.path().join(format!("{what}-a")), tmp.path().join(format!("{what}-b")));
        ok(&["unpack", &oci(&store, "v2"), a.to_str().unwrap()]);
        ok(&["unpack", &oci(&tmp.path().join("alone"), "v2"), b.to_str().unwrap()]);
        let diffs = compare_trees(&b, &a, &CompareOptions::default());
        assert!(diffs.is_empty(), "{what}: {}", diffs.join("\n"));
        ok(&["check", &oci(&store, "v2")]);
    };
    unpack_equal("with-v1");
    // Version 1's tag removed: version 2's manifest still names the blobs.
    rewrite_index(&store, |m| m["annotations"]["org.opencontainers.image.ref.name"] != "v1");
    assert_eq!(index_tags(&store), vec!["v2"]);
    unpack_equal("without-v1");

    // A dictionary in another layout: its blobs are copied in, verified.
    let elsewhere = tmp.path().join("elsewhere");
    let third = convert(&oci(&src2, "latest"), &oci(&elsewhere, "v2"), &["--chunk-dict", &oci(&store, "v2")]);
    assert!(third["dict_blobs"].as_u64().unwrap() >= 1, "{third}");
    let (_, m3) = manifest_of(&elsewhere, "v2");
    for l in m3["layers"].as_array().unwrap() {
        assert!(blob_path(&elsewhere, l["digest"].as_str().unwrap()).exists(), "layer {l} is in the destination layout");
    }
    ok(&["check", &oci(&elsewhere, "v2")]);
}

fn rewrite_index(layout: &Path, keep: impl Fn(&serde_json::Value) -> bool) {
    let path = layout.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    index["manifests"].as_array_mut().unwrap().retain(keep);
    fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
}

#[test]
fn bad_chunk_dictionaries_are_clear_errors_and_write_nothing() {
    let tmp = scratch("baddict");
    let (v1, v2) = two_versions();
    let (src1, src2) = (tmp.path().join("src1"), tmp.path().join("src2"));
    files_layout(&src1, &v1);
    files_layout(&src2, &v2);
    let dst = tmp.path().join("dst");
    let e = fails(&["convert", &oci(&src2, "latest"), &oci(&dst, "v2"), "--chunk-dict", &oci(&src1, "latest")]);
    assert!(e.contains("chunk dictionary") && e.contains("not a naiad image"), "{e}");
    assert!(!dst.exists(), "nothing written at DST");

    // A dictionary whose blob is corrupt (or missing) is refused at the
    // copy, and the destination stays as it was.
    let dict = tmp.path().join("dict");
    convert(&oci(&src1, "latest"), &oci(&dict, "v1"), &[]);
    let (_, m) = manifest_of(&dict, "v1");
    let blob = blob_path(&dict, m["layers"][0]["digest"].as_str().unwrap());
    let mut bytes = fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&blob, &bytes).unwrap();
    let e = fails(&["convert", &oci(&src2, "latest"), &oci(&dst, "v2"), "--chunk-dict", &oci(&dict, "v1")]);
    assert!(e.contains("chunk dictionary") && e.contains("corrupt"), "{e}");
    assert!(!dst.exists(), "nothing written at DST");
    fs::remove_file(&blob).unwrap();
    let e = fails(&["convert", &oci(&src2, "latest"), &oci(&dst, "v2"), "--chunk-dict", &oci(&dict, "v1")]);
    assert!(e.contains("chunk dictionary"), "{e}");
    assert!(!dst.exists(), "nothing written at DST");

    // A registry dictionary for a destination on another registry.
    let e = fails(&["convert", &oci(&src2, "latest"), "docker://127.0.0.1:9/app:v2", "--chunk-dict", "docker://127.0.0.1:8/app:v1"]);
    assert!(e.contains("is on 127.0.0.1:8, the destination on 127.0.0.1:9"), "{e}");
}
