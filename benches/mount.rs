//! Mount benchmark: `cargo bench --bench mount` (as root, needs FUSE).
//!
//! Two images, each against the same tree on tmpfs, in one run:
//! - the debootstrap-built Debian python3 image (local OCI layout);
//! - a generated image of 100,000 small files (one gzip layer).
//!
//! Per image: the time `naiad mount` takes to return a ready mount (median
//! of 5; the bootstrap decoded from the local layout, and mapped from the
//! bootstrap cache of an earlier mount); reading every file with 4 parallel readers
//! (cold: empty caches; disk-warm: a new daemon on the filled disk cache,
//! which by then holds the backing files passthrough serves; page-warm: the
//! same mount again), also with `--passthrough`; `ls -lR` on a fresh mount
//! and warm. Each row is the
//! median of 3 rounds, each round on a fresh cache; ratios are to tmpfs.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MOUNT_RUNS: usize = 5;
const ROUNDS: usize = 3;
const READERS: usize = 4;

fn naiad(args: &[&str]) -> String {
    let out = common::naiad().args(args).output().expect("run naiad");
    assert!(out.status.success(), "naiad {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads every regular file under `root` with [`READERS`] threads; returns bytes read.
fn read_all(root: &Path) -> u64 {
    let files: Vec<PathBuf> = common::regular_files(root).into_iter().map(|(rel, _)| root.join(rel)).collect();
    common::read_files(&files, READERS)
}

fn timed<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let t = Instant::now();
    let v = f();
    (t.elapsed().as_secs_f64(), v)
}

fn ls_lr(root: &Path) -> f64 {
    timed(|| {
        let st = Command::new("ls").arg("-lR").arg(root).stdout(std::process::Stdio::null()).status().expect("ls");
        assert!(st.success());
    })
    .0
}

struct Mounts<'a> {
    image: String,
    mnt: PathBuf,
    run_dir: PathBuf,
    dir: &'a Path,
}

impl Mounts<'_> {
    fn mount(&self, cache: &str) {
        self.mount_with(cache, &[]);
    }
    fn mount_with(&self, cache: &str, extra: &[&str]) {
        let cache = self.dir.join(cache);
        let mut args = vec!["mount", &self.image, self.mnt.to_str().unwrap(), "--cache-dir", cache.to_str().unwrap(), "--run-dir", self.run_dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        naiad(&args);
    }
    fn umount(&self) {
        naiad(&["umount", self.mnt.to_str().unwrap(), "--run-dir", self.run_dir.to_str().unwrap()]);
    }
    fn counter(&self, name: &str) -> u64 {
        let s: serde_json::Value = serde_json::from_str(&naiad(&["stats", "--json", "--run-dir", self.run_dir.to_str().unwrap(), self.mnt.to_str().unwrap()])).expect("stats json");
        s["counters"][name].as_u64().unwrap_or(0)
    }
    /// Waits until the backing-file writer has been idle for half a second.
    fn settle_backing_files(&self) {
        let mut last = self.counter("backing_writes");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            let now = self.counter("backing_writes");
            if now == last {
                break;
            }
            last = now;
        }
    }
}

/// Benchmarks one image: `source` (an `oci:` reference to convert) against
/// the tree `fill_tmpfs` puts on a tmpfs.
fn bench(title: &str, source: &str, fill_tmpfs: impl FnOnce(&Path)) {
    let scratch = tempfile::Builder::new().prefix("naiad-bench-mount-").tempdir_in("/tmp").expect("scratch");
    let dir = scratch.path();
    let image = format!("oci:{}:naiad", dir.join("store").display());
    naiad(&["convert", source, &image, "--quiet"]);

    let tmpfs = dir.join("tmpfs");
    fs::create_dir(&tmpfs).expect("mkdir");
    let st = Command::new("mount").args(["-t", "tmpfs", "-o", "size=2G,nr_inodes=0", "naiad-bench"]).arg(&tmpfs).status().expect("mount tmpfs");
    assert!(st.success());
    fill_tmpfs(&tmpfs);

    let mnt = dir.join("mnt");
    fs::create_dir(&mnt).expect("mkdir");
    let m = Mounts { image, mnt: mnt.clone(), run_dir: dir.join("run"), dir };

    // Mount ready: with a fresh cache (the bootstrap decoded from the
    // layout), and on one cache after a first mount (the bootstrap mapped
    // from the bootstrap cache).
    let mut ready_fresh = Vec::new();
    for i in 0..MOUNT_RUNS {
        ready_fresh.push(timed(|| m.mount(&format!("cache-ready-{i}"))).0);
        m.umount();
    }
    ready_fresh.sort_by(f64::total_cmp);
    m.mount("cache-ready-0");
    m.umount();
    let mut ready = Vec::new();
    for _ in 0..MOUNT_RUNS {
        ready.push(timed(|| m.mount("cache-ready-0")).0);
        m.umount();
    }
    ready.sort_by(f64::total_cmp);

    let (mut tmpfs_read, mut tmpfs_ls, mut cold, mut disk, mut page, mut fresh_ls, mut warm_ls) = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut pt_disk, mut pt_page) = (vec![], vec![]);
    let mut bytes = 0;
    let mut passthrough = 0;
    for round in 0..ROUNDS {
        let (t, b) = timed(|| read_all(&tmpfs));
        tmpfs_read.push(t);
        bytes = b;
        tmpfs_ls.push(ls_lr(&tmpfs));

        let cache = format!("cache-{round}");
        m.mount(&cache);
        fresh_ls.push(ls_lr(&mnt));
        let (t, b) = timed(|| read_all(&mnt));
        assert_eq!(b, bytes, "naiad and tmpfs trees hold the same bytes");
        cold.push(t);
        page.push(timed(|| read_all(&mnt)).0);
        warm_ls.push(ls_lr(&mnt));
        m.settle_backing_files();
        m.umount();

        m.mount(&cache);
        disk.push(timed(|| read_all(&mnt)).0);
        m.umount();

        // The same with kernel passthrough (`--passthrough`).
        m.mount_with(&cache, &["--passthrough"]);
        pt_disk.push(timed(|| read_all(&mnt)).0);
        pt_page.push(timed(|| read_all(&mnt)).0);
        passthrough = m.counter("passthrough_opens");
        m.umount();
    }
    let _ = Command::new("umount").arg(&tmpfs).status();

    let files = common::regular_files(&mnt).len();
    println!();
    println!("naiad mount benchmark: {title}, {:.1} MB in regular files (medians of {ROUNDS} rounds)", bytes as f64 / 1e6);
    let _ = files;
    let ms = |v: &[f64]| format!("{:.1} ms (min {:.1}, max {:.1})", v[MOUNT_RUNS / 2] * 1e3, v[0] * 1e3, v[MOUNT_RUNS - 1] * 1e3);
    println!("mount ready, bootstrap decoded from the layout (median of {MOUNT_RUNS}): {}", ms(&ready_fresh));
    println!("mount ready, bootstrap in the bootstrap cache (median of {MOUNT_RUNS}): {}", ms(&ready));
    println!("--passthrough rounds: {passthrough} opens served by passthrough in the last");
    println!("{:<58} {:>9} {:>9} {:>9}", "operation", "seconds", "MB/s", "vs tmpfs");
    let (tr, tl) = (common::median(tmpfs_read), common::median(tmpfs_ls));
    let row = |name: &str, secs: f64, base: f64, mb: bool| {
        let rate = if mb { format!("{:.0}", bytes as f64 / 1e6 / secs) } else { "-".into() };
        println!("{name:<58} {secs:>9.3} {rate:>9} {:>8.2}x", secs / base);
    };
    row("read every file (4 readers), tmpfs", tr, tr, true);
    row("read every file, naiad cold (empty caches, local layout)", common::median(cold), tr, true);
    row("read every file, naiad disk cache warm, new daemon", common::median(disk), tr, true);
    row("read every file, naiad page cache warm", common::median(page), tr, true);
    row("  with --passthrough: disk cache warm, new daemon", common::median(pt_disk), tr, true);
    row("  with --passthrough: page cache warm", common::median(pt_page), tr, true);
    row("ls -lR, tmpfs", tl, tl, false);
    row("ls -lR, naiad fresh mount", common::median(fresh_ls), tl, false);
    row("ls -lR, naiad warm", common::median(warm_ls), tl, false);
}

fn main() {
    let deb = common::debian_image();
    bench("Debian bookworm + python3", &format!("oci:{}:latest", deb.layout.display()), |tmpfs| {
        let st = Command::new("cp").arg("-a").arg(deb.reference_rootfs.join(".")).arg(tmpfs).status().expect("cp");
        assert!(st.success());
    });

    let gen = tempfile::Builder::new().prefix("naiad-bench-100k-").tempdir_in("/tmp").expect("scratch");
    let (layout, tar) = common::many_files_image(gen.path(), 100_000);
    let tar_path = gen.path().join("layer.tar");
    fs::write(&tar_path, tar).expect("write tar");
    bench("generated, 100,000 small files", &format!("oci:{}:latest", layout.display()), |tmpfs| {
        let st = Command::new("tar").arg("-xf").arg(&tar_path).arg("-C").arg(tmpfs).status().expect("tar");
        assert!(st.success());
    });
}
