//! Conversion benchmark: `cargo bench --bench convert`.
//!
//! - The debootstrap-built Debian python3 image (tests/common builds and
//!   caches it), converted by the `naiad` binary with its defaults and with
//!   `--zstd-level 3`, from gzip and from zstd layers: median of 3 of the
//!   conversion time naiad reports, as MB/s of file data (uncompressed file
//!   bytes of all layers), and blob MB. With
//!   `NAIAD_BENCH_BASELINE=/path/to/naiad` (an older build, for example
//!   from `scripts/build-baseline.sh REV`), that binary is measured in the
//!   same run, runs interleaved, and the ratio printed.
//! - Chunking modes: fixed 1 MiB and content-defined around 64 KiB, through
//!   the library at zstd level 3 (what the chunking costs, not the
//!   compression), best of 3, with bootstrap bytes per inode.
//! - A layer holding one Django release (the wheel from PyPI installed as
//!   files, tar + gzip -6), converted alone: chunk blob + compressed
//!   bootstrap against the gzip layer, with chunk groups (the default) and
//!   without (`--small-files 0`). Skip with NAIAD_BENCH_SKIP_DJANGO=1.
//! - Batched unpack: the python3 image and the Django layer, converted
//!   into a real registry (CNCF Distribution on loopback) and unpacked
//!   from it by `naiad unpack` through a counting proxy: HTTP requests,
//!   seconds, and requests per 4 MiB of chunk blobs (skipped with the
//!   Django layer).
//! - A layer holding one 3 GiB file, at zstd level 3: the converter's peak
//!   RSS (skip with NAIAD_BENCH_SKIP_BIG=1).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/link_emulator.rs"]
mod link_emulator;
#[path = "../tests/common/registry_server.rs"]
mod registry_server;

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use naiad_converter::{convert, Chunking, ConvertOptions};
use naiad_registry::ImageRef;
use sha2::{Digest, Sha256};

const RUNS: usize = 3;

/// `BIN convert SRC oci:DST:naiad --json ARGS`: its JSON summary.
fn convert_with(bin: &Path, src: &str, dst: &Path, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(bin).args(["convert", src, &format!("oci:{}:naiad", dst.display()), "--json", "--quiet"]).args(args).output().expect("run naiad");
    assert!(out.status.success(), "{} convert {src}: {}", bin.display(), String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(dst);
    serde_json::from_slice(&out.stdout).expect("convert --json")
}

/// The python3 image converted with the defaults and with `--zstd-level 3`
/// by this build, and (with NAIAD_BENCH_BASELINE) with the defaults by a
/// baseline build, interleaved; ratios against the first.
fn defaults_speed(deb: &common::DebianImage, scratch: &Path) {
    let current = std::path::PathBuf::from(env!("CARGO_BIN_EXE_naiad"));
    let baseline = std::env::var_os("NAIAD_BENCH_BASELINE").map(std::path::PathBuf::from);
    println!("python3 image, `naiad convert` (median of {RUNS}; MB/s of file data)");
    println!("{:<8} {:<22} {:>9} {:>9} {:>10} {:>9} {:>10}", "layers", "build", "MB in", "seconds", "MB/s", "blobs MB", "vs first");
    let mut builds: Vec<(&str, &Path, &[&str])> = vec![("current", current.as_path(), &[]), ("current, --zstd-level 3", current.as_path(), &["--zstd-level", "3"])];
    if let Some(b) = baseline.as_deref() {
        builds.push(("baseline", b, &[]));
    }
    for (name, layout) in [("gzip", &deb.layout), ("zstd", &deb.layout_zstd)] {
        let src = format!("oci:{}:latest", layout.display());
        // Per build: seconds of each run, bytes in, blob bytes.
        let mut times: Vec<(Vec<f64>, f64, f64)> = vec![(Vec::new(), 0.0, 0.0); builds.len()];
        for run in 0..RUNS {
            for (i, (_, bin, args)) in builds.iter().enumerate() {
                let s = convert_with(bin, &src, &scratch.join(format!("speed-{name}-{i}-{run}")), args);
                times[i].0.push(s["seconds"].as_f64().expect("seconds"));
                times[i].1 = s["bytes_in"].as_f64().expect("bytes_in");
                times[i].2 = s["blob_bytes"].as_f64().expect("blob_bytes");
            }
        }
        let first = common::median(times[0].0.clone());
        for ((label, _, _), (t, bytes, blobs)) in builds.iter().zip(&times) {
            let m = common::median(t.clone());
            println!("{:<8} {:<22} {:>9.1} {:>9.3} {:>10.1} {:>9.1} {:>9.2}x", name, label, bytes / 1e6, m, bytes / 1e6 / m, blobs / 1e6, first / m);
        }
    }
    println!();
}

/// A layout holding one layer: a Django release from PyPI (the wheel's
/// files under usr/local/lib/python3.11/site-packages), tar + gzip -6.
/// Cached under the fixtures directory.
fn django_layer() -> (std::path::PathBuf, u64, usize) {
    const VERSION: &str = "4.2.16";
    let dir = common::fixtures_dir().join(format!("django-{VERSION}"));
    let layout = dir.join("layout");
    if !layout.join("index.json").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let st = std::process::Command::new("python3")
            .args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", &format!("django=={VERSION}"), "-d"])
            .arg(&dir)
            .status()
            .expect("pip");
        assert!(st.success(), "pip download django=={VERSION} failed");
        let wheel = dir.join(format!("Django-{VERSION}-py3-none-any.whl"));
        let root = dir.join("root");
        let site = root.join("usr/local/lib/python3.11/site-packages");
        std::fs::create_dir_all(&site).expect("mkdir");
        let st = std::process::Command::new("python3").args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&site).status().expect("unzip");
        assert!(st.success(), "unpacking {}", wheel.display());
        let tar = dir.join("layer.tar");
        let st = std::process::Command::new("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner", "--mtime=@1700000000", "-C"])
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("usr")
            .status()
            .expect("tar");
        assert!(st.success());
        let tmp = dir.join("layout.tmp");
        common::write_layout(&tmp, vec![("django", std::fs::read(&tar).expect("read tar"))], common::Compression::Gzip);
        std::fs::rename(&tmp, &layout).expect("rename");
    }
    let json = |p: std::path::PathBuf| -> serde_json::Value { serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).expect("json") };
    let index = json(layout.join("index.json"));
    let digest = index["manifests"][0]["digest"].as_str().expect("manifest digest").trim_start_matches("sha256:").to_string();
    let gz = json(layout.join("blobs/sha256").join(digest))["layers"][0]["size"].as_u64().expect("layer size");
    let files = walkdir(&dir.join("root"));
    (layout, gz, files)
}

fn walkdir(p: &Path) -> usize {
    std::fs::read_dir(p).map(|rd| rd.flatten().map(|e| if e.file_type().is_ok_and(|t| t.is_dir()) { walkdir(&e.path()) } else { 1 }).sum()).unwrap_or(0)
}

fn django(scratch: &Path) {
    let (layout, gz, files) = django_layer();
    let current = std::path::PathBuf::from(env!("CARGO_BIN_EXE_naiad"));
    let src = format!("oci:{}:latest", layout.display());
    println!("Django 4.2.16 layer ({files} files), gzip -6 layer {:.2} MB", gz as f64 / 1e6);
    println!("{:<34} {:>10} {:>11} {:>8} {:>10}", "conversion", "blob MB", "bootz KB", "chunks", "vs gzip");
    for (name, args) in [("chunk groups (default)", &[][..]), ("one chunk per file (--small-files 0)", &["--small-files", "0"][..])] {
        let s = convert_with(&current, &src, &scratch.join("django"), args);
        let (blob, boot) = (s["blob_bytes"].as_u64().expect("blob"), s["bootstrap_compressed_bytes"].as_u64().expect("bootstrap"));
        println!("{:<34} {:>10.2} {:>11.1} {:>8} {:>9.3}x", name, blob as f64 / 1e6, boot as f64 / 1e3, s["unique_chunks"], (blob + boot) as f64 / gz as f64);
    }
    println!();
}

/// `naiad unpack` from a registry, through a counting proxy: requests and
/// seconds against the image's chunk blob bytes.
fn unpack_from_registry(images: &[(&str, String)], scratch: &Path) {
    use registry_server::{Distribution, RegistryAuth};
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_naiad"));
    let naiad = |args: &[&str]| {
        let out = std::process::Command::new(&bin).args(args).output().expect("run naiad");
        assert!(out.status.success(), "naiad {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let registry = Distribution::start(RegistryAuth::None, None);
    let proxy =
        link_emulator::LinkEmulator::start(registry.host().parse().expect("registry address"), link_emulator::LinkParams { bits_per_second: 0, rtt: std::time::Duration::ZERO })
            .expect("counting proxy");
    println!("`naiad unpack` from a registry on loopback (requests counted by a proxy)");
    println!("{:<22} {:>8} {:>10} {:>9} {:>9} {:>15}", "image", "files", "blobs MB", "requests", "seconds", "requests/4 MiB");
    for (name, src) in images {
        let dst = format!("docker://{}/{name}:naiad", registry.host());
        naiad(&["convert", "--quiet", src, &dst]);
        let v: serde_json::Value = serde_json::from_str(&naiad(&["inspect", "--json", &dst])).expect("inspect json");
        let blobs: u64 = v["blobs"].as_array().map(|b| b.iter().map(|x| x["size"].as_u64().unwrap_or(0)).sum()).unwrap_or(0);
        let files = v["files"].as_u64().unwrap_or(0);
        let out = scratch.join(format!("unpacked-{name}"));
        proxy.counters.reset();
        let t = Instant::now();
        naiad(&["unpack", &format!("docker://{}/{name}:naiad", proxy.addr), &out.display().to_string()]);
        let seconds = t.elapsed().as_secs_f64();
        let (_, _, requests) = proxy.counters.snapshot();
        let _ = std::fs::remove_dir_all(&out);
        println!("{:<22} {:>8} {:>10.2} {:>9} {:>9.2} {:>15.2}", name, files, blobs as f64 / 1e6, requests, seconds, requests as f64 / (blobs as f64 / (4 << 20) as f64).max(1.0));
    }
    println!();
}

fn main() {
    let deb = common::debian_image();
    let scratch = tempfile::Builder::new().prefix("naiad-bench-").tempdir_in("/tmp").expect("scratch dir");
    defaults_speed(&deb, scratch.path());
    let mut unpacked = vec![("python3", format!("oci:{}:latest", deb.layout.display()))];
    if std::env::var_os("NAIAD_BENCH_SKIP_DJANGO").is_none() {
        django(scratch.path());
        unpacked.push(("django", format!("oci:{}:latest", django_layer().0.display())));
    }
    unpack_from_registry(&unpacked, scratch.path());
    println!("naiad convert benchmark ({} runs each, best run shown)", RUNS);
    println!("{:<28} {:>9} {:>9} {:>10} {:>8} {:>9} {:>9} {:>10} {:>7}", "mode", "MB in", "seconds", "MB/s", "inodes", "boot B/f", "bootz B/f", "blobs MB", "dedup");
    let modes = [("fixed 1 MiB", Chunking::Fixed { size: 1 << 20 }), ("cdc 16K/64K/256K", Chunking::ContentDefined { min: 16 << 10, avg: 64 << 10, max: 256 << 10 })];
    for (source_name, layout) in [("gzip", &deb.layout), ("zstd", &deb.layout_zstd)] {
        for (mode_name, chunking) in modes {
            let src = ImageRef::Layout { dir: layout.clone(), tag: "latest".into() };
            let mut best = f64::MAX;
            let mut last = None;
            for run in 0..RUNS {
                let dst = scratch.path().join(format!("{source_name}-{run}-{}", mode_name.replace(' ', "_").replace('/', "-")));
                let dst_ref = ImageRef::Layout { dir: dst.clone(), tag: "naiad".into() };
                let opts = ConvertOptions { chunking, zstd_level: 3, ..Default::default() };
                let t = Instant::now();
                let s = convert(&src, &dst_ref, &opts).expect("convert");
                best = best.min(t.elapsed().as_secs_f64());
                last = Some(s);
                let _ = std::fs::remove_dir_all(&dst);
            }
            let s = last.expect("one run");
            let inodes = (s.tree.files + s.tree.directories + s.tree.symlinks + s.tree.special_files) as f64;
            println!(
                "{:<28} {:>9.1} {:>9.3} {:>10.1} {:>8} {:>9.1} {:>9.1} {:>10.1} {:>7.3}",
                format!("{source_name} -> {mode_name}"),
                s.bytes_in as f64 / 1e6,
                best,
                s.bytes_in as f64 / 1e6 / best,
                inodes,
                s.bootstrap_bytes as f64 / inodes,
                s.bootstrap_compressed_bytes as f64 / inodes,
                s.blob_bytes as f64 / 1e6,
                s.dedup_ratio
            );
        }
    }
    if std::env::var_os("NAIAD_BENCH_SKIP_BIG").is_none() {
        big_file(scratch.path());
    }
}

/// Writes an OCI layout whose one layer (plain tar) holds a 3 GiB file, then
/// converts it with the naiad binary and reports its peak RSS.
fn big_file(dir: &Path) {
    const SIZE: u64 = 3 << 30;
    let layout = dir.join("big");
    std::fs::create_dir_all(layout.join("blobs/sha256")).expect("mkdir");
    let tmp_blob = layout.join("blobs/layer.tmp");
    let mut hasher = Sha256::new();
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp_blob).expect("create"));
        let mut h = tar::Header::new_gnu();
        h.set_path("big.bin").expect("path");
        h.set_size(SIZE);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut put = |b: &[u8]| {
            hasher.update(b);
            out.write_all(b).expect("write");
        };
        put(h.as_bytes());
        // Half compressible text, half pseudo-random, in 1 MiB blocks.
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut block = vec![0u8; 1 << 20];
        for i in 0..(SIZE >> 20) {
            if i % 2 == 0 {
                for (j, b) in block.iter_mut().enumerate() {
                    *b = b"naiad lazy loading "[(j + i as usize) % 19];
                }
            } else {
                for b in block.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
            put(&block);
        }
        put(&[0u8; 1024]);
        out.flush().expect("flush");
    }
    let layer_digest = hex::encode(hasher.finalize());
    std::fs::rename(&tmp_blob, layout.join("blobs/sha256").join(&layer_digest)).expect("rename");
    let layer_size = std::fs::metadata(layout.join("blobs/sha256").join(&layer_digest)).expect("stat").len();
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]}});
    let put_json = |v: &serde_json::Value| -> (String, usize) {
        let bytes = serde_json::to_vec(v).expect("json");
        let d = hex::encode(Sha256::digest(&bytes));
        std::fs::write(layout.join("blobs/sha256").join(&d), &bytes).expect("write");
        (format!("sha256:{d}"), bytes.len())
    };
    let (cd, cs) = put_json(&config);
    let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{layer_digest}"), "size": layer_size}]});
    let (md, ms) = put_json(&manifest);
    std::fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("write");
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index).expect("json")).expect("write");

    for (name, chunking) in [("fixed 1 MiB", vec!["--chunking", "fixed"]), ("cdc 64K", vec!["--chunking", "cdc"])] {
        let out = dir.join(format!("big-out-{}", chunking[1]));
        let t = Instant::now();
        let mut child = common::naiad()
            .args(["convert", &format!("oci:{}:latest", layout.display()), &format!("oci:{}:naiad", out.display()), "--quiet", "--zstd-level", "3"])
            .args(&chunking)
            .spawn()
            .expect("spawn naiad");
        let pid = child.id() as i32;
        // wait4 gives the child's own peak RSS.
        let mut status = 0;
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        assert_eq!(r, pid, "wait4");
        let _ = child.try_wait();
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "naiad convert failed");
        let secs = t.elapsed().as_secs_f64();
        println!("3 GiB file, {name:<12}: {:.1} s, {:.0} MB/s, peak RSS {:.0} MiB", secs, SIZE as f64 / 1e6 / secs, usage.ru_maxrss as f64 / 1024.0);
        let _ = std::fs::remove_dir_all(&out);
    }
    let _ = std::fs::remove_dir_all(&layout);
}
