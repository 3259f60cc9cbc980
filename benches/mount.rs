//! Mount benchmark: `cargo bench --bench mount` (as root, needs FUSE).
//!
//! On the debootstrap-built Debian image, in one run: the time `naiad mount`
//! takes to return a ready mount; reading every file sequentially (cold:
//! empty caches; disk-warm: a new daemon on the filled disk cache; page-warm:
//! the same mount again) and `ls -lR` (cold and warm), each against the same
//! tree copied to tmpfs, reported as ratios.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const MOUNT_RUNS: usize = 5;

fn naiad(args: &[&str]) {
    let out = common::naiad().args(args).output().expect("run naiad");
    assert!(out.status.success(), "naiad {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Reads every regular file under `root` (not following symlinks); returns bytes read.
fn read_all(root: &Path) -> u64 {
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 20];
    for (rel, _) in common::regular_files(root) {
        let mut f = fs::File::open(root.join(rel)).expect("open");
        loop {
            let n = f.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    total
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

fn main() {
    let deb = common::debian_image();
    let scratch = tempfile::Builder::new().prefix("naiad-bench-mount-").tempdir_in("/tmp").expect("scratch");
    let dir = scratch.path();
    let image = format!("oci:{}:naiad", dir.join("store").display());
    naiad(&["convert", &format!("oci:{}:latest", deb.layout.display()), &image, "--quiet"]);

    // The reference tree on tmpfs.
    let tmpfs = dir.join("tmpfs");
    fs::create_dir(&tmpfs).expect("mkdir");
    let st = Command::new("mount").args(["-t", "tmpfs", "-o", "size=1G", "naiad-bench"]).arg(&tmpfs).status().expect("mount tmpfs");
    assert!(st.success());
    let st = Command::new("cp").arg("-a").arg(deb.reference_rootfs.join(".")).arg(&tmpfs).status().expect("cp");
    assert!(st.success());

    let mnt = dir.join("mnt");
    fs::create_dir(&mnt).expect("mkdir");
    let cache = dir.join("cache");
    let run_dir = dir.join("run");
    let mount = |cache: &Path| {
        naiad(&["mount", &image, mnt.to_str().unwrap(), "--cache-dir", cache.to_str().unwrap(), "--run-dir", run_dir.to_str().unwrap()]);
    };
    let umount = || naiad(&["umount", mnt.to_str().unwrap(), "--run-dir", run_dir.to_str().unwrap()]);

    // Mount-ready time: from invoking `naiad mount` to its return with the mount live.
    let mut ready = Vec::new();
    for i in 0..MOUNT_RUNS {
        let c = dir.join(format!("cache-ready-{i}"));
        ready.push(timed(|| mount(&c)).0);
        umount();
    }
    ready.sort_by(f64::total_cmp);

    let (tmpfs_read, bytes) = timed(|| read_all(&tmpfs));
    let tmpfs_ls = ls_lr(&tmpfs);

    mount(&cache);
    let cold_ls = ls_lr(&mnt);
    let (cold_read, cold_bytes) = timed(|| read_all(&mnt));
    let (page_read, _) = timed(|| read_all(&mnt));
    let warm_ls = ls_lr(&mnt);
    umount();
    mount(&cache);
    let (disk_read, _) = timed(|| read_all(&mnt));
    umount();
    let _ = Command::new("umount").arg(&tmpfs).status();
    assert_eq!(bytes, cold_bytes, "naiad and tmpfs trees hold the same bytes");

    println!("naiad mount benchmark: Debian bookworm + python3, {:.1} MB in regular files", bytes as f64 / 1e6);
    println!("mount ready (median of {MOUNT_RUNS}): {:.1} ms (min {:.1}, max {:.1})", ready[MOUNT_RUNS / 2] * 1e3, ready[0] * 1e3, ready[MOUNT_RUNS - 1] * 1e3);
    println!("{:<44} {:>9} {:>9} {:>9}", "operation", "seconds", "MB/s", "vs tmpfs");
    let row = |name: &str, secs: f64, base: f64, mb: bool| {
        let rate = if mb { format!("{:.0}", bytes as f64 / 1e6 / secs) } else { "-".into() };
        println!("{name:<44} {secs:>9.3} {rate:>9} {:>8.2}x", secs / base);
    };
    row("read every file, tmpfs", tmpfs_read, tmpfs_read, true);
    row("read every file, naiad cold (empty caches)", cold_read, tmpfs_read, true);
    row("read every file, naiad warm (disk cache)", disk_read, tmpfs_read, true);
    row("read every file, naiad warm (page cache)", page_read, tmpfs_read, true);
    row("ls -lR, tmpfs", tmpfs_ls, tmpfs_ls, false);
    row("ls -lR, naiad cold (fresh mount)", cold_ls, tmpfs_ls, false);
    row("ls -lR, naiad warm", warm_ls, tmpfs_ls, false);
}
