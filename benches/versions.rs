//! Successive versions benchmark: `cargo bench --bench versions` (as root;
//! needs FUSE, and PyPI once to download the wheels into the fixtures).
//!
//! Ten images: the debootstrap-built Debian python3 image (4 gzip layers)
//! plus an application layer holding one of 10 successive Django releases
//! (4.2.0 to 4.2.9, with asgiref and sqlparse, installed as files under
//! /usr/local/lib/python3.11/dist-packages), all in one OCI layout. They
//! are stored three ways: as OCI (gzip layers), converted by naiad one by
//! one, and converted with `--chunk-dict auto` (each version against the
//! one before). Reported, all in one run:
//!
//! - registry storage: the bytes of the unique blobs the 10 manifests
//!   name (layers and configs; for naiad also the bootstraps), and the
//!   application's share: that less what the base image alone takes;
//! - update pulls: `import django` and a few of its modules, through a
//!   fresh `naiad mount` of version N+1 from the layout, on a cache that
//!   holds what running version N fetched, against the same on an empty
//!   cache (bytes fetched and seconds, median of the 9 pairs);
//! - the base layer rebuilt: a tar of the base image's tree, and the same
//!   tree tarred again with new mtimes on a tenth of its files, converted
//!   with the first as chunk dictionary: what the second copy adds.
//!
//! Output: a table on stdout and `target/naiad-bench/versions.{md,svg}`
//! (override the directory with NAIAD_BENCH_OUT).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const DJANGO: [&str; 10] = ["4.2", "4.2.1", "4.2.2", "4.2.3", "4.2.4", "4.2.5", "4.2.6", "4.2.7", "4.2.8", "4.2.9"];
const DEPS: [&str; 2] = ["asgiref==3.8.1", "sqlparse==0.5.1"];
const CMD: &str = "import django; from django.conf import settings; settings.configure(); django.setup(); import django.db.models, django.forms, django.template, django.http, django.contrib.admin; print(django.get_version())";
const SITE: &str = "usr/local/lib/python3.11/dist-packages";

fn naiad(args: &[&str]) -> String {
    let out = common::naiad().args(args).output().expect("run naiad");
    assert!(out.status.success(), "naiad {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_file(p: &Path) -> Value {
    serde_json::from_slice(&fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).expect("json")
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
}

fn put_blob(layout: &Path, data: &[u8]) -> (String, u64) {
    let d = hex::encode(Sha256::digest(data));
    fs::write(layout.join("blobs/sha256").join(&d), data).expect("write blob");
    (format!("sha256:{d}"), data.len() as u64)
}

/// The manifest of `layout:tag`.
fn manifest(layout: &Path, tag: &str) -> Value {
    let index = json_file(&layout.join("index.json"));
    let m = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag} in {}", layout.display()));
    json_file(&blob(layout, m["digest"].as_str().expect("digest")))
}

/// Bytes of the unique blobs (config and layers) the manifests of `tags` name.
fn storage(layout: &Path, tags: &[String]) -> u64 {
    let mut blobs = BTreeMap::new();
    for t in tags {
        let m = manifest(layout, t);
        for d in std::iter::once(&m["config"]).chain(m["layers"].as_array().expect("layers")) {
            blobs.insert(d["digest"].as_str().expect("digest").to_string(), d["size"].as_u64().expect("size"));
        }
    }
    blobs.values().sum()
}

/// Downloads (once) the wheels of Django `version` and its dependencies.
fn wheels(version: &str) -> Vec<PathBuf> {
    let dir = common::fixtures_dir().join("django-wheels");
    fs::create_dir_all(&dir).expect("mkdir");
    let mut out = Vec::new();
    for spec in std::iter::once(format!("django=={version}")).chain(DEPS.iter().map(|s| s.to_string())) {
        let (name, v) = spec.split_once("==").expect("name==version");
        let find = || {
            fs::read_dir(&dir)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().to_lowercase().starts_with(&format!("{}-{v}-", name.to_lowercase()))))
        };
        if find().is_none() {
            let st = Command::new("python3").args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", &spec, "-d"]).arg(&dir).status().expect("pip");
            assert!(st.success(), "pip download {spec}");
        }
        out.push(find().unwrap_or_else(|| panic!("no wheel for {spec} in {}", dir.display())));
    }
    out
}

/// The application layer of one Django version: its wheels' files under
/// [`SITE`], as a tar with fixed owners and times.
fn app_layer(version: &str, work: &Path) -> Vec<u8> {
    let root = work.join(format!("app-{version}"));
    let site = root.join(SITE);
    fs::create_dir_all(&site).expect("mkdir");
    for w in wheels(version) {
        let st = Command::new("python3").args(["-m", "zipfile", "-e"]).arg(&w).arg(&site).status().expect("unzip");
        assert!(st.success(), "unpacking {}", w.display());
    }
    let tar = work.join(format!("app-{version}.tar"));
    let st = Command::new("tar")
        .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner", "--mtime=@1700000000", "-C"])
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg("usr")
        .status()
        .expect("tar");
    assert!(st.success());
    let _ = fs::remove_dir_all(&root);
    fs::read(&tar).expect("read tar")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

/// Tags `tag` in `layout`: the base image with `app` (a tar) as one more
/// gzip layer. Returns the app layer's stored size.
fn add_version(layout: &Path, base: &Path, tag: &str, app: Option<&[u8]>) -> u64 {
    fs::create_dir_all(layout.join("blobs/sha256")).expect("mkdir");
    let base_manifest = manifest(base, "latest");
    let mut config = json_file(&blob(base, base_manifest["config"]["digest"].as_str().expect("config")));
    let mut layers = base_manifest["layers"].as_array().expect("layers").clone();
    for l in &layers {
        let d = l["digest"].as_str().expect("digest");
        if !blob(layout, d).exists() {
            fs::hard_link(blob(base, d), blob(layout, d)).or_else(|_| fs::copy(blob(base, d), blob(layout, d)).map(|_| ())).expect("copy base layer");
        }
    }
    let mut app_size = 0;
    if let Some(tar) = app {
        let (digest, size) = put_blob(layout, &gzip(tar));
        app_size = size;
        layers.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}));
        config["rootfs"]["diff_ids"].as_array_mut().expect("diff_ids").push(json!(format!("sha256:{}", hex::encode(Sha256::digest(tar)))));
    }
    let (cd, cs) = put_blob(layout, &serde_json::to_vec(&config).expect("config"));
    let m = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs}, "layers": layers});
    let (md, ms) = put_blob(layout, &serde_json::to_vec(&m).expect("manifest"));
    let index_path = layout.join("index.json");
    let mut index = if index_path.exists() { json_file(&index_path) } else { json!({"schemaVersion": 2, "manifests": []}) };
    let list = index["manifests"].as_array_mut().expect("manifests");
    list.retain(|e| e["annotations"]["org.opencontainers.image.ref.name"] != tag);
    list.push(json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": tag}}));
    fs::write(&index_path, serde_json::to_vec(&index).expect("index")).expect("write index");
    fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    app_size
}

fn convert(src: &str, dst: &str, extra: &[&str]) -> Value {
    let mut args = vec!["convert", src, dst, "--json", "--quiet"];
    args.extend_from_slice(extra);
    serde_json::from_str(&naiad(&args)).expect("convert json")
}

/// Mounts `image` on `cache`, runs [`CMD`] in it (chroot), unmounts.
/// Returns (seconds from mount to exit, bytes fetched, requests).
fn cold_start(image: &str, cache: &Path, work: &Path) -> (f64, u64, u64) {
    let mnt = work.join("mnt");
    let run = work.join("run");
    fs::create_dir_all(&mnt).expect("mkdir");
    let t = Instant::now();
    naiad(&["mount", image, mnt.to_str().expect("utf-8"), "--cache-dir", cache.to_str().expect("utf-8"), "--run-dir", run.to_str().expect("utf-8")]);
    let out = Command::new("chroot").arg(&mnt).args(["python3", "-c", CMD]).env("PYTHONDONTWRITEBYTECODE", "1").output().expect("chroot");
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "{CMD} in {image}: {}", String::from_utf8_lossy(&out.stderr));
    let stats: Value = serde_json::from_str(&naiad(&["stats", "--json", "--run-dir", run.to_str().expect("utf-8"), mnt.to_str().expect("utf-8")])).expect("stats");
    naiad(&["umount", mnt.to_str().expect("utf-8"), "--run-dir", run.to_str().expect("utf-8")]);
    let c = &stats["counters"];
    (secs, c["store_span_bytes"].as_u64().unwrap_or(0), c["store_requests"].as_u64().unwrap_or(0))
}

/// The base image's tree tarred twice (the second time with new mtimes on
/// every tenth regular file); the second converted with the first as
/// chunk dictionary. Returns (first's naiad bytes, second's added bytes).
fn rebuilt_base(rootfs: &Path, work: &Path) -> (u64, u64) {
    let tree = work.join("rebuilt-tree");
    let st = Command::new("cp").arg("-a").arg(rootfs).arg(&tree).status().expect("cp");
    assert!(st.success());
    let tar_of = |name: &str| -> Vec<u8> {
        let tar = work.join(name);
        let st = Command::new("tar").args(["--sort=name", "--numeric-owner", "--xattrs", "-C"]).arg(&tree).arg("-cf").arg(&tar).arg(".").status().expect("tar");
        assert!(st.success());
        fs::read(&tar).expect("read tar")
    };
    let first = tar_of("base-1.tar");
    let files = common::regular_files(&tree);
    for (rel, _) in files.iter().step_by(10) {
        let st = Command::new("touch").arg("-h").arg("-d").arg("2026-01-02 03:04:05").arg(tree.join(rel)).status().expect("touch");
        assert!(st.success());
    }
    let second = tar_of("base-2.tar");
    assert_ne!(Sha256::digest(&first), Sha256::digest(&second), "the second tar differs");
    let layout = work.join("rebuilt");
    let scratch_base = work.join("rebuilt-empty");
    fs::create_dir_all(scratch_base.join("blobs/sha256")).expect("mkdir");
    for (tag, tar) in [("first", &first), ("second", &second)] {
        common::write_layout(&scratch_base, vec![("base tree", tar.clone())], common::Compression::Gzip);
        add_version(&layout, &scratch_base, tag, None);
    }
    let _ = fs::remove_dir_all(&tree);
    let out = work.join("rebuilt-naiad");
    let a = convert(&format!("oci:{}:first", layout.display()), &format!("oci:{}:first", out.display()), &[]);
    let b = convert(&format!("oci:{}:second", layout.display()), &format!("oci:{}:second", out.display()), &["--chunk-dict", "auto"]);
    let total = |s: &Value| s["blob_bytes"].as_u64().expect("blob bytes") + s["bootstrap_compressed_bytes"].as_u64().expect("bootstrap");
    let added = b["new_blob_bytes"].as_u64().expect("new blob bytes") + b["bootstrap_compressed_bytes"].as_u64().expect("bootstrap");
    (total(&a), added)
}

/// The 10 versions converted one after the other with `--chunk-dict
/// auto` and the chunking `args`, and their update pulls.
struct Series {
    name: String,
    total: u64,
    /// `total` less the base image converted alone with the same chunking.
    app: u64,
    secs: f64,
    /// Blobs the last image references.
    blobs: u64,
    after: Vec<f64>,
    alone: Vec<f64>,
    after_s: Vec<f64>,
    alone_s: Vec<f64>,
    after_req: Vec<f64>,
    alone_req: Vec<f64>,
}

fn dict_series(src: &Path, tags: &[String], work: &Path, name: &str, args: &[&str]) -> Series {
    let dir = work.join(format!("naiad-dict-{}", name.split_whitespace().next().unwrap_or("x")));
    let _ = fs::remove_dir_all(&dir);
    let mut blobs = 0;
    let t = Instant::now();
    for tag in tags {
        let mut a = vec!["--chunk-dict", "auto"];
        a.extend_from_slice(args);
        let s = convert(&format!("oci:{}:{tag}", src.display()), &format!("oci:{}:{tag}", dir.display()), &a);
        blobs = s["blobs"].as_u64().unwrap_or(0);
    }
    let secs = t.elapsed().as_secs_f64() / tags.len() as f64;
    let base_dir = dir.with_extension("base");
    convert(&format!("oci:{}:base", src.display()), &format!("oci:{}:base", base_dir.display()), args);
    let total = storage(&dir, tags);
    let app = total - storage(&base_dir, &["base".to_string()]);
    let mut s = Series { name: name.to_string(), total, app, secs, blobs, after: vec![], alone: vec![], after_s: vec![], alone_s: vec![], after_req: vec![], alone_req: vec![] };
    // Update pulls: version N+1 after N, against N+1 alone.
    for n in 0..tags.len() - 1 {
        let (cache, fresh) = (work.join(format!("cache-after-{n}")), work.join(format!("cache-alone-{n}")));
        cold_start(&format!("oci:{}:{}", dir.display(), tags[n]), &cache, work);
        let (t1, b1, r1) = cold_start(&format!("oci:{}:{}", dir.display(), tags[n + 1]), &cache, work);
        let (t0, b0, r0) = cold_start(&format!("oci:{}:{}", dir.display(), tags[n + 1]), &fresh, work);
        s.after.push(b1 as f64);
        s.after_req.push(r1 as f64);
        s.after_s.push(t1);
        s.alone.push(b0 as f64);
        s.alone_req.push(r0 as f64);
        s.alone_s.push(t0);
        let _ = fs::remove_dir_all(&cache);
        let _ = fs::remove_dir_all(&fresh);
    }
    s
}

fn main() {
    let deb = common::debian_image();
    let scratch = tempfile::Builder::new().prefix("naiad-bench-versions-").tempdir_in("/tmp").expect("scratch");
    let work = scratch.path();
    let src = work.join("oci");
    let tags: Vec<String> = (0..DJANGO.len()).map(|i| format!("v{i}")).collect();
    let mut app_layers = 0;
    for (i, v) in DJANGO.iter().enumerate() {
        app_layers += add_version(&src, &deb.layout, &tags[i], Some(&app_layer(v, work)));
    }
    add_version(&src, &deb.layout, "base", None);

    let base = ["base".to_string()];
    let oci_total = storage(&src, &tags);
    let oci_app = oci_total - storage(&src, &base);

    // naiad, each version alone (the default chunking).
    let plain = work.join("naiad");
    let t = Instant::now();
    for tag in &tags {
        convert(&format!("oci:{}:{tag}", src.display()), &format!("oci:{}:{tag}", plain.display()), &[]);
    }
    let plain_secs = t.elapsed().as_secs_f64() / tags.len() as f64;
    convert(&format!("oci:{}:base", src.display()), &format!("oci:{}:base", plain.display()), &[]);
    let plain_total = storage(&plain, &tags);
    let plain_app = plain_total - storage(&plain, &base);

    // naiad with --chunk-dict auto, for each chunking mode.
    let modes: [(&str, &[&str]); 3] =
        [("CDC 16K/64K/256K (default)", &[]), ("fixed 64 KiB", &["--chunking", "fixed", "--chunk-size", "64K"]), ("fixed 1 MiB", &["--chunking", "fixed", "--chunk-size", "1M"])];
    let series: Vec<Series> = modes.iter().map(|(name, args)| dict_series(&src, &tags, work, name, args)).collect();
    let d = &series[0];
    let (dict_total, dict_app, dict_secs, dict_blobs) = (d.total, d.app, d.secs, d.blobs);
    let (after, alone, after_s, alone_s, after_req) = (d.after.clone(), d.alone.clone(), d.after_s.clone(), d.alone_s.clone(), d.after_req.clone());
    let (rb_first, rb_added) = rebuilt_base(&deb.reference_rootfs, work);

    let mb = |b: u64| b as f64 / 1e6;
    let mut md = String::new();
    let _ = writeln!(md, "Django {} .. {} (10 successive releases, with {}) on the Debian python3 image; one run.\n", DJANGO[0], DJANGO[9], DEPS.join(", "));
    let _ = writeln!(md, "| storage of the 10 images | all blobs, MB | application's share, MB | vs OCI |");
    let _ = writeln!(md, "|---|---|---|---|");
    for (name, total, app) in
        [("OCI, gzip layers", oci_total, oci_app), ("naiad, each converted alone", plain_total, plain_app), ("naiad, `--chunk-dict auto`", dict_total, dict_app)]
    {
        let _ = writeln!(md, "| {name} | {:.2} | {:.2} | {:.3}x |", mb(total), mb(app), app as f64 / oci_app as f64);
    }
    let _ = writeln!(md, "\nOCI application layers alone: {:.2} MB. Conversion took {plain_secs:.2} s per version alone and {dict_secs:.2} s with the dictionary; the last image references {dict_blobs} blobs.\n", mb(app_layers));
    let (a, b) = (common::median(after.clone()), common::median(alone.clone()));
    let _ = writeln!(md, "| cold start of version N+1 (`import django` and 5 of its modules, median of 9 pairs) | MB fetched | seconds |");
    let _ = writeln!(md, "|---|---|---|");
    let _ = writeln!(md, "| on an empty cache | {:.2} | {:.3} |", b / 1e6, common::median(alone_s.clone()));
    let _ = writeln!(md, "| on the cache version N left | {:.2} ({:.3}x) | {:.3} |", a / 1e6, a / b, common::median(after_s.clone()));
    let _ = writeln!(md, "\nRequests after N: median {:.0}.\n", common::median(after_req));
    let _ = writeln!(md, "Chunking modes, each with `--chunk-dict auto` (application's share of the storage; cold start of N+1, medians of the 9 pairs):\n");
    let _ = writeln!(md, "| chunking | storage, MB | vs OCI | N+1 alone: MB fetched | requests | after N: MB fetched | blobs in the last image |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for m in &series {
        let _ = writeln!(
            md,
            "| {} | {:.2} | {:.3}x | {:.2} | {:.0} | {:.2} | {} |",
            m.name,
            mb(m.app),
            m.app as f64 / oci_app as f64,
            common::median(m.alone.clone()) / 1e6,
            common::median(m.alone_req.clone()),
            common::median(m.after.clone()) / 1e6,
            m.blobs
        );
    }
    let _ = writeln!(md);
    let _ = writeln!(md, "Base layer rebuilt (same tree, new mtimes on a tenth of its files), second copy converted with the first as dictionary: it adds {:.3} MB to the first's {:.2} MB ({:.2} %).", mb(rb_added), mb(rb_first), rb_added as f64 * 100.0 / rb_first as f64);
    println!("{md}");

    let out_dir = std::env::var_os("NAIAD_BENCH_OUT").map(PathBuf::from).unwrap_or_else(|| common::repo_root().join("target/naiad-bench"));
    fs::create_dir_all(&out_dir).expect("mkdir");
    fs::write(out_dir.join("versions.md"), &md).expect("write md");
    let bars = [("OCI, gzip layers", oci_app), ("naiad alone", plain_app), ("naiad --chunk-dict auto", dict_app)];
    let max = bars.iter().map(|b| b.1).max().unwrap_or(1).max(1) as f64;
    let mut body = String::new();
    for (i, (name, v)) in bars.iter().enumerate() {
        let y = 50.0 + i as f64 * 34.0;
        let w = (*v as f64 / max * 480.0).max(1.0);
        let _ = writeln!(
            body,
            r##"<text x="10" y="{}" font-size="13">{name}</text><rect x="200" y="{y}" width="{w:.1}" height="24" fill="{}"/><text x="{:.1}" y="{}" font-size="13">{:.1} MB</text>"##,
            y + 17.0,
            ["#9e9e9e", "#4f81bd", "#2e7d32"][i],
            206.0 + w,
            y + 17.0,
            mb(*v)
        );
    }
    let svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="820" height="170" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/><text x="10" y="24" font-size="16" font-weight="bold">Registry storage of 10 Django versions beyond the base image (lower is better)</text>
{body}</svg>
"#
    );
    fs::write(out_dir.join("versions.svg"), svg).expect("write svg");
    println!("wrote {} and {}", out_dir.join("versions.md").display(), out_dir.join("versions.svg").display());
}
