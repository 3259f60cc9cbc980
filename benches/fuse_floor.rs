//! What a FUSE request costs on this machine, and how many a workload needs:
//! `cargo bench --bench fuse_floor` (as root, needs FUSE and tracefs).
//!
//! The mount benchmark compares reads through a new naiad mount with the
//! same tree on tmpfs. A new mount has an empty page cache and dentry
//! cache, so the kernel must ask the daemon at least once per file, and
//! each request is at least a sleep and a wakeup on each side. This
//! measures, in one run:
//! - two threads on one CPU, then on two, passing a byte back and forth
//!   over a socket pair (a round trip: two wakeups, no daemon at all);
//! - `stat` of names that do not exist under a naiad mount (one LOOKUP
//!   each, the daemon's cheapest answer), by 1, 2 and 4 threads;
//! - the FUSE requests, by opcode (kernel tracepoint
//!   `fuse:fuse_request_send`), of `ls -lR` on a fresh mount and of reading
//!   every file on a new daemon over a filled cache (the mount benchmark
//!   times that, without the tracepoint);
//! - the CPU time `naiad check` takes to decode and verify every chunk;
//! - reading every file of the tmpfs tree (4 readers),
//!
//! and prints the least time a FUSE mount could take to read every file if
//! the daemon cost nothing: the tmpfs time plus one round trip per file,
//! split over the CPUs.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const TRACING: &str = "/sys/kernel/tracing";

fn naiad(args: &[&str]) {
    let out = common::naiad().args(args).output().expect("run naiad");
    assert!(out.status.success(), "naiad {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Microseconds per round trip of one byte between two threads pinned to
/// `a` and `b`.
fn ping_pong(a: usize, b: usize, rounds: usize) -> f64 {
    let (mut left, mut right) = UnixStream::pair().expect("socket pair");
    let echo = std::thread::spawn(move || {
        pin(b);
        let mut byte = [0u8; 1];
        for _ in 0..rounds {
            right.read_exact(&mut byte).expect("read");
            right.write_all(&byte).expect("write");
        }
    });
    pin(a);
    let mut byte = [7u8; 1];
    let t = Instant::now();
    for _ in 0..rounds {
        left.write_all(&byte).expect("write");
        left.read_exact(&mut byte).expect("read");
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    echo.join().expect("echo thread");
    us
}

/// Microseconds of wall time per LOOKUP: `threads` threads each `stat`
/// `per_thread` names that do not exist under `dir`.
fn negative_lookups(dir: &Path, threads: usize, per_thread: usize) -> f64 {
    let tag = std::process::id();
    let t = Instant::now();
    std::thread::scope(|s| {
        for k in 0..threads {
            s.spawn(move || {
                for i in 0..per_thread {
                    let _ = fs::symlink_metadata(dir.join(format!("missing-{tag}-{threads}-{k}-{i}")));
                }
            });
        }
    });
    t.elapsed().as_secs_f64() * 1e6 / (threads * per_thread) as f64
}

/// CPU seconds (user and system) the children of this process used so far.
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut u);
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// The FUSE requests `f` makes, by opcode name.
fn fuse_requests(f: impl FnOnce()) -> BTreeMap<String, u64> {
    let event = format!("{TRACING}/events/fuse/fuse_request_send/enable");
    fs::write(format!("{TRACING}/trace"), "").expect("clear the trace buffer");
    fs::write(format!("{TRACING}/buffer_size_kb"), "65536").expect("trace buffer size");
    fs::write(&event, "1").expect("enable fuse:fuse_request_send (tracefs mounted?)");
    f();
    fs::write(&event, "0").expect("disable the tracepoint");
    let trace = fs::read_to_string(format!("{TRACING}/trace")).expect("read the trace");
    let mut counts = BTreeMap::new();
    for line in trace.lines().filter(|l| l.contains("fuse_request_send:")) {
        if let Some(name) = line.split('(').nth(1).and_then(|r| r.split(')').next()) {
            *counts.entry(name.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

/// Seconds to read every file of `files` with 4 readers.
fn read_every_file(files: &[PathBuf]) -> f64 {
    let t = Instant::now();
    common::read_files(files, 4);
    t.elapsed().as_secs_f64()
}

fn main() {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let deb = common::debian_image();
    let scratch = tempfile::Builder::new().prefix("naiad-bench-floor-").tempdir_in("/tmp").expect("scratch");
    let dir = scratch.path();
    let image = format!("oci:{}:naiad", dir.join("store").display());
    naiad(&["convert", &format!("oci:{}:latest", deb.layout.display()), &image, "--quiet"]);
    let tmpfs = dir.join("tmpfs");
    let mnt = dir.join("mnt");
    fs::create_dir(&tmpfs).expect("mkdir");
    fs::create_dir(&mnt).expect("mkdir");
    assert!(Command::new("mount").args(["-t", "tmpfs", "-o", "size=2G", "naiad-floor"]).arg(&tmpfs).status().expect("mount tmpfs").success());
    assert!(Command::new("cp").arg("-a").arg(deb.reference_rootfs.join(".")).arg(&tmpfs).status().expect("cp").success());
    let rel: Vec<PathBuf> = common::regular_files(&tmpfs).into_iter().map(|(r, _)| r).collect();
    let on_tmpfs: Vec<PathBuf> = rel.iter().map(|r| tmpfs.join(r)).collect();
    let on_mount: Vec<PathBuf> = rel.iter().map(|r| mnt.join(r)).collect();
    let (m, run) = (mnt.to_str().expect("path"), dir.join("run"));
    let run = run.to_str().expect("path");
    let cache = dir.join("cache");
    let mount = || naiad(&["mount", &image, m, "--cache-dir", cache.to_str().expect("path"), "--run-dir", run]);
    let umount = || naiad(&["umount", m, "--run-dir", run]);

    println!("\nFUSE request floor, {} regular files, {cpus} CPUs", rel.len());
    let same = common::median((0..3).map(|_| ping_pong(0, 0, 50_000)).collect());
    let across = if cpus > 1 { common::median((0..3).map(|_| ping_pong(0, 1, 20_000)).collect()) } else { f64::NAN };
    println!("round trip between two threads, same CPU:      {same:>8.2} us");
    println!("round trip between two threads, two CPUs:      {across:>8.2} us");

    mount();
    for threads in [1, 2, 4] {
        let us = negative_lookups(&mnt.join("usr"), threads, 5000);
        println!("negative LOOKUP through naiad, {threads} thread(s):    {us:>8.2} us of wall time per request");
    }
    umount();

    // A fresh mount: ls -lR. Then every file read twice (fills the cache);
    // then a new daemon on the filled cache reads every file again.
    mount();
    let ls = fuse_requests(|| {
        let st = Command::new("ls").arg("-lR").arg(&mnt).stdout(Stdio::null()).status().expect("ls");
        assert!(st.success());
    });
    read_every_file(&on_mount);
    umount();
    mount();
    let warm = fuse_requests(|| {
        read_every_file(&on_mount);
    });
    umount();
    let _ = Command::new("umount").arg(&mnt).stderr(Stdio::null()).status();

    // What a cold read must at least add: decoding and verifying every
    // chunk once (`naiad check` does that, and nothing else, on one core).
    let before = children_cpu();
    naiad(&["check", &image]);
    let decode_cpu = children_cpu() - before;

    let tmpfs_time = common::median((0..5).map(|_| read_every_file(&on_tmpfs)).collect());
    let _ = Command::new("umount").arg(&tmpfs).status();
    let show = |what: &str, c: &BTreeMap<String, u64>| {
        let total: u64 = c.values().sum();
        let list: Vec<String> = c.iter().map(|(k, v)| format!("{v} {k}")).collect();
        println!("{what}: {total} requests ({})", list.join(", "));
        total
    };
    show("ls -lR, fresh mount", &ls);
    let warm_requests = show("read every file, new daemon on a filled cache", &warm);
    let files = rel.len() as f64;
    let floor = tmpfs_time + files * same * 1e-6 / cpus as f64;
    println!("read every file (4 readers), tmpfs: {tmpfs_time:.3} s");
    println!("CPU to decode and verify every chunk of the image (naiad check): {decode_cpu:.3} s");
    println!(
        "least a FUSE mount could take (tmpfs time + one same-CPU round trip per file over {cpus} CPUs, a daemon costing nothing): {floor:.3} s ({:.2}x tmpfs); with this run's {:.1} requests per file: {:.3} s ({:.2}x)",
        floor / tmpfs_time,
        warm_requests as f64 / files,
        tmpfs_time + warm_requests as f64 * same * 1e-6 / cpus as f64,
        (tmpfs_time + warm_requests as f64 * same * 1e-6 / cpus as f64) / tmpfs_time
    );
    let cold = tmpfs_time + (warm_requests as f64 * same * 1e-6 + decode_cpu) / cpus as f64;
    println!("least a cold read of every file could take (the same, plus decoding every chunk over {cpus} CPUs): {cold:.3} s ({:.2}x tmpfs)", cold / tmpfs_time);
}
