//! Conversion benchmark: `cargo bench --bench convert`.
//!
//! On the debootstrap-built Debian image (tests/common builds and caches
//! it), converts with fixed 1 MiB chunks and with content-defined chunks
//! around 64 KiB, from gzip and from zstd layers, and prints throughput
//! (MB/s of uncompressed layer data) and bootstrap bytes per file. Then it
//! converts a layer holding one 3 GiB file and prints the converter's peak
//! RSS (skip with NAIAD_BENCH_SKIP_BIG=1).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use naiad_converter::{convert, Chunking, ConvertOptions};
use naiad_registry::ImageRef;
use sha2::{Digest, Sha256};

const RUNS: usize = 3;

fn main() {
    let deb = common::debian_image();
    let scratch = tempfile::Builder::new().prefix("naiad-bench-").tempdir_in("/tmp").expect("scratch dir");
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
                let opts = ConvertOptions { chunking, ..Default::default() };
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
            .args(["convert", &format!("oci:{}:latest", layout.display()), &format!("oci:{}:naiad", out.display()), "--quiet"])
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
