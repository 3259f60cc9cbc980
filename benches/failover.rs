//! Failover benchmark: `cargo bench --bench failover` (as root, needs FUSE).
//!
//! The debootstrap-built Debian image, converted with python's standard
//! library as its startup set, mounted from a local layout with a 4 MiB
//! memory cache. A reader loops over every regular file, dropping each from
//! the page cache after reading it (so every read reaches the daemon), and
//! checks it against the reference unpack. In one run:
//!
//! 1. **kill -9**: the daemon is killed 10 times at random moments, the
//!    first right after the mount (during the startup prefetch);
//! 2. **baseline**: the reader alone, as long as phase 1 took;
//! 3. **upgrade**: 3 live upgrades (`naiad daemon upgrade`) to another copy
//!    of the binary and back.
//!
//! Printed per phase: read errors, and the distribution of the reader's
//! open/read call times (the longest is the longest stall it saw); for the
//! kills, the time from each death until the next daemon served, as the
//! daemons logged it.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/failover_support/mod.rs"]
mod failover_support;
#[path = "../tests/mount_support/mod.rs"]
mod mount_support;

use std::path::Path;
use std::time::{Duration, Instant};

use failover_support::*;
use mount_support::*;

const KILLS: usize = 10;

/// "62.242859ms" (a Duration's Debug) in milliseconds.
fn parse_debug_duration(s: &str) -> Option<f64> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "ns" => v / 1e6,
        "µs" | "us" => v / 1e3,
        "ms" => v,
        "s" => v * 1e3,
        _ => return None,
    })
}

fn phase(name: &str, report: &ReaderReport) {
    println!(
        "| {name} | {} | {} | {:.3} | {:.3} | {:.3} | {:.1} |",
        report.latencies.len(),
        report.failures.len(),
        ms(report.quantile(0.5)),
        ms(report.quantile(0.99)),
        ms(report.quantile(0.999)),
        ms(report.quantile(1.0))
    );
}

fn main() {
    if !fuse_available() {
        return;
    }
    let scratch = tempfile::Builder::new().prefix("naiad-bench-failover-").tempdir_in("/tmp").expect("scratch");
    let dir = scratch.path();
    let (image, files) = debian_with_prefetch(dir);
    let m = MountGuard::mount_with(&image, dir, &dir.join("cache"), &["--memory-cache".as_ref(), "4M".as_ref()]);
    let mut rng = Rng(Instant::now().elapsed().as_nanos() as u64 | 0x9e37_79b9_7f4a_7c15);

    // 1. kill -9 under load.
    let start = Instant::now();
    let reader = Reader::start(&m.mountpoint, files.clone());
    let mut daemon = serving_pid(&m);
    for i in 0..KILLS {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
        }
        // SAFETY: kill(2) of the daemon of our own mount.
        unsafe { libc::kill(daemon as i32, libc::SIGKILL) };
        daemon = wait_for_new_daemon(&m, daemon);
        reader.wait_for_reads(20);
    }
    let kills = reader.finish();
    let kill_time = start.elapsed();

    // 2. The same reader alone, as long.
    let reader = Reader::start(&m.mountpoint, files.clone());
    std::thread::sleep(kill_time);
    let baseline = reader.finish();

    // 3. Live upgrades.
    let copy = dir.join("naiad-copy");
    std::fs::copy(env!("CARGO_BIN_EXE_naiad"), &copy).expect("copy the binary");
    let reader = Reader::start(&m.mountpoint, files.clone());
    for binary in [copy.as_path(), Path::new(env!("CARGO_BIN_EXE_naiad")), copy.as_path()] {
        std::thread::sleep(Duration::from_millis(300));
        let out =
            common::naiad().arg("daemon").arg("upgrade").arg("--run-dir").arg(&m.run_dir).arg("--binary").arg(binary).arg(&m.mountpoint).output().expect("naiad daemon upgrade");
        assert!(out.status.success(), "upgrade: {}", String::from_utf8_lossy(&out.stderr));
        reader.wait_for_reads(20);
    }
    std::thread::sleep(Duration::from_millis(300));
    let upgrades = reader.finish();

    let mut recovery: Vec<f64> =
        m.log().lines().filter_map(|l| l.split_once(" again, ").and_then(|(_, rest)| rest.split_whitespace().next()).and_then(parse_debug_duration)).collect();
    recovery.sort_by(f64::total_cmp);
    let stats = m.stats();
    m.umount();

    println!("naiad failover benchmark: Debian image, {} files, release build, one run", files.len());
    println!();
    println!("| phase | open/read calls | errors | p50 ms | p99 ms | p99.9 ms | max ms |");
    println!("|---|---|---|---|---|---|---|");
    phase(&format!("{KILLS} x kill -9 ({:.1} s)", kill_time.as_secs_f64()), &kills);
    phase("no kills (as long)", &baseline);
    phase("3 live upgrades", &upgrades);
    println!();
    let q = |f: f64| recovery.get(((recovery.len() as f64 - 1.0) * f) as usize).copied().unwrap_or(f64::NAN);
    println!(
        "death to serving again, {} restarts: min {:.1} ms, median {:.1} ms, max {:.1} ms (daemon_restarts_total {}, daemon_upgrades_total {})",
        recovery.len(),
        q(0.0),
        q(0.5),
        q(1.0),
        stats["counters"]["daemon_restarts"],
        stats["counters"]["daemon_upgrades"]
    );
    println!("longest stall with kills / without: {:.1}x", ms(kills.quantile(1.0)) / ms(baseline.quantile(1.0)).max(1e-9));
    let failures: Vec<_> = kills.failures.iter().chain(&baseline.failures).chain(&upgrades.failures).collect();
    assert!(failures.is_empty(), "{} reads failed: {:?}", failures.len(), &failures[..failures.len().min(5)]);
}
