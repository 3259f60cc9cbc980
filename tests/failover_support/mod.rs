//! Support for the failover test (`tests/failover.rs`) and benchmark
//! (`benches/failover.rs`): the Debian fixture converted with a startup
//! set, a [`Reader`] that loops over every file of a mount checking each
//! against the reference unpack and timing every `read()`, and waiting for
//! a mount's daemon to be replaced.
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::mount_support::*;

/// The Debian image converted with a startup set (python's standard
/// library), so that a mount starts with a prefetch; and the sha256 of
/// every regular file of the reference unpack.
pub fn debian_with_prefetch(dir: &Path) -> (String, Arc<Vec<(PathBuf, String)>>) {
    let debian = debian_image();
    let list = dir.join("prefetch-list");
    fs::write(&list, "/usr/lib/python3.11/*\n/usr/bin/python3.11\n").expect("write prefetch list");
    let dst = dir.join("naiad");
    check(
        naiad()
            .arg("convert")
            .arg("--quiet")
            .arg("--prefetch-list")
            .arg(&list)
            .arg(format!("oci:{}:latest", debian.layout.display()))
            .arg(format!("oci:{}:{NAIAD_TAG}", dst.display())),
    );
    let mut files: Vec<(PathBuf, String)> = regular_files(&debian.reference_rootfs)
        .into_iter()
        .map(|(rel, _)| {
            let sum = sha256_file(&debian.reference_rootfs.join(&rel)).expect("hash reference file");
            (rel, sum)
        })
        .collect();
    files.sort();
    (format!("oci:{}:{NAIAD_TAG}", dst.display()), Arc::new(files))
}

/// Reads `path` whole, then drops it from the page cache so that the next
/// read of it goes to the daemon again. The time of the open and of every
/// `read()` (1 MiB at most) is pushed to `times`.
pub fn read_uncached(path: &Path, times: &mut Vec<Duration>) -> std::io::Result<Vec<u8>> {
    let start = Instant::now();
    let mut f = fs::File::open(path)?;
    times.push(start.elapsed());
    let mut data = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let start = Instant::now();
        let n = f.read(&mut buf)?;
        times.push(start.elapsed());
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
    }
    // SAFETY: posix_fadvise on a descriptor we own.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(data)
}

/// A thread reading every file of the mount in a loop, checking each
/// against its reference digest, until told to stop.
pub struct Reader {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<ReaderReport>>,
}

#[derive(Debug, Default)]
pub struct ReaderReport {
    pub files_read: u64,
    pub passes: u64,
    pub failures: Vec<String>,
    /// How long each open and each `read()` took.
    pub latencies: Vec<Duration>,
}

impl Reader {
    pub fn start(mountpoint: &Path, files: Arc<Vec<(PathBuf, String)>>) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let (stop2, reads2, mp) = (stop.clone(), reads.clone(), mountpoint.to_path_buf());
        let thread = std::thread::spawn(move || {
            let mut report = ReaderReport::default();
            while !stop2.load(Ordering::SeqCst) {
                for (rel, want) in files.iter() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let got = read_uncached(&mp.join(rel), &mut report.latencies);
                    report.files_read += 1;
                    reads2.fetch_add(1, Ordering::SeqCst);
                    match got {
                        Ok(data) if &sha256_hex(&data) == want => {}
                        Ok(data) => report.failures.push(format!("{}: wrong bytes ({} bytes read)", rel.display(), data.len())),
                        Err(e) => report.failures.push(format!("{}: {e}", rel.display())),
                    }
                }
                report.passes += 1;
            }
            report
        });
        Reader { stop, reads, thread: Some(thread) }
    }

    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` more files have been read.
    pub fn wait_for_reads(&self, n: u64) {
        let target = self.reads() + n;
        assert!(wait_until(Duration::from_secs(60), || self.reads() >= target), "the reader made no progress ({} reads)", self.reads());
    }

    pub fn finish(mut self) -> ReaderReport {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().expect("running").join().expect("reader thread")
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl ReaderReport {
    /// The `q` quantile (0..=1) of the open and read times.
    pub fn quantile(&self, q: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(((l.len() as f64 - 1.0) * q.clamp(0.0, 1.0)) as usize).copied().unwrap_or_default()
    }

    /// One line: files, passes and the distribution of call times.
    pub fn summary(&self) -> String {
        format!(
            "{} files in {} passes, {} calls; open/read time p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
            self.files_read,
            self.passes,
            self.latencies.len(),
            ms(self.quantile(0.5)),
            ms(self.quantile(0.99)),
            ms(self.quantile(0.999)),
            ms(self.quantile(1.0))
        )
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn serving_pid(m: &MountGuard) -> u64 {
    m.stats()["pid"].as_u64().expect("stats pid")
}

/// Waits until a daemon other than `old` serves the mount; returns its pid.
pub fn wait_for_new_daemon(m: &MountGuard, old: u64) -> u64 {
    let mut new = old;
    let ok = wait_until(Duration::from_secs(20), || {
        new = naiad()
            .arg("stats")
            .arg("--json")
            .arg("--run-dir")
            .arg(&m.run_dir)
            .arg(&m.mountpoint)
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
            .and_then(|v| v["pid"].as_u64())
            .unwrap_or(old);
        new != old
    });
    assert!(ok, "no new daemon serves {} after {old} went; log:\n{}", m.mountpoint.display(), m.log());
    new
}

/// A small xorshift: random kill moments without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The stats report of the one mount whose socket is in `run_dir`.
pub fn stats_in(run_dir: &Path) -> Option<Value> {
    let sock = fs::read_dir(run_dir).ok()?.flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "sock"))?;
    let mut c = std::os::unix::net::UnixStream::connect(sock).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    c.write_all(b"stats\n").ok()?;
    let mut answer = String::new();
    c.read_to_string(&mut answer).ok()?;
    serde_json::from_str(&answer).ok()
}

/// Whether process `pid` has exited (a zombie has).
pub fn gone(pid: u64) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'))).unwrap_or(true)
}
