//! Startup (issue #5) through real FUSE mounts (/dev/fuse, root):
//!
//! - `--record-trace` writes the files and ranges read, in first-access
//!   order, as JSON lines `naiad convert --prefetch-list` accepts (generated
//!   image: exact order and ranges; Debian image: `naiad run --record-trace`
//!   of `python3 -c 'import json'`);
//! - a mount of the image converted with that trace prefetches the startup
//!   set in a few requests, after which replaying the traced reads (and
//!   running python again) reads nothing more from the store;
//! - 16 threads reading random files and ranges while the prefetch and
//!   `--fetch-all` run get the right bytes, and no chunk is fetched twice;
//! - `naiad stats --json`, `--prometheus` and the `--api-socket` HTTP
//!   endpoint agree on the counters, and the read-latency histogram counts
//!   every read.
//!
//! Every mount is under the test's own temporary directory and is
//! unmounted (its daemon killed if need be) by a guard even when the test
//! fails.

mod common;
mod mount_support;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use mount_support::*;
use serde_json::Value;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("naiad-startup-test-").tempdir_in("/tmp").expect("tempdir")
}

/// The largest request the daemon makes (by default).
const MAX_REQUEST: u64 = naiad_reader::MergeLimits::DEFAULT_MAX_REQUEST;

/// One trace record.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    path: String,
    offset: u64,
    length: u64,
}

/// Parses a trace file; every line must be a record with exactly the
/// fields `path`, `offset`, `length`.
fn parse_trace(path: &Path) -> Vec<Rec> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("trace {}: {e}", path.display()));
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("trace line {l:?} is not JSON: {e}"));
            let o = v.as_object().unwrap_or_else(|| panic!("trace line {l:?} is not an object"));
            assert_eq!(o.len(), 3, "trace line {l:?} has other fields");
            Rec {
                path: o["path"].as_str().unwrap_or_else(|| panic!("{l:?}: path")).to_string(),
                offset: o["offset"].as_u64().unwrap_or_else(|| panic!("{l:?}: offset")),
                length: o["length"].as_u64().unwrap_or_else(|| panic!("{l:?}: length")),
            }
        })
        .collect()
}

/// Checks what holds for every trace: absolute paths of regular files of
/// `root` (the reference tree), ranges within the file, and no record
/// covered by the earlier records of its file.
fn check_trace_invariants(recs: &[Rec], root: &Path) {
    assert!(!recs.is_empty(), "empty trace");
    let mut seen: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    for r in recs {
        assert!(r.path.starts_with('/') && !r.path.contains("//"), "{r:?}: not a clean absolute path");
        let meta = fs::symlink_metadata(root.join(&r.path[1..])).unwrap_or_else(|e| panic!("{r:?}: not in the image: {e}"));
        assert!(meta.is_file(), "{r:?}: not a regular file");
        assert!(r.length > 0 && r.offset + r.length <= meta.len(), "{r:?}: outside the file ({} bytes)", meta.len());
        let earlier = seen.entry(&r.path).or_default();
        // Covered by the union of earlier ranges?
        let mut pos = r.offset;
        let mut ranges = earlier.clone();
        ranges.sort();
        for (s, e) in ranges {
            if s <= pos && e > pos {
                pos = e;
            }
        }
        assert!(pos < r.offset + r.length, "{r:?} is covered by earlier records of the file: {earlier:?}");
        earlier.push((r.offset, r.offset + r.length));
    }
}

/// `pread` of `len` bytes at `offset` with readahead off (POSIX_FADV_RANDOM),
/// so the kernel asks the daemon for just the pages read.
fn pread_exact(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: posix_fadvise on a descriptor we own.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    assert_eq!(rc, 0, "posix_fadvise");
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = f.read_at(&mut buf[got..], offset + got as u64).unwrap_or_else(|e| panic!("read {} at {}: {e}", path.display(), offset + got as u64));
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    buf
}

fn naiad_inspect_json(image: &str) -> Value {
    let text = check(naiad().arg("inspect").arg("--json").arg(image));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("inspect --json printed invalid JSON ({e}): {text}"))
}

/// `naiad convert --prefetch-list LIST oci:SRC:TAG oci:DST:naiad`.
fn convert_with_list(src_layout: &Path, tag: &str, dst_layout: &Path, list: &Path) -> String {
    check(
        naiad()
            .arg("convert")
            .arg("--quiet")
            .arg("--prefetch-list")
            .arg(list)
            .arg(format!("oci:{}:{tag}", src_layout.display()))
            .arg(format!("oci:{}:{NAIAD_TAG}", dst_layout.display())),
    );
    format!("oci:{}:{NAIAD_TAG}", dst_layout.display())
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Waits until the mount's prefetch is done; returns the stats then.
fn wait_prefetch_done(m: &MountGuard, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = m.stats();
        match s["prefetch"]["state"].as_str() {
            Some("done") => return s,
            Some("running") if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => panic!("prefetch not done: {}\nlog:\n{}", s["prefetch"], m.log()),
        }
    }
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// The generated image: reads in a known order are recorded in that order,
/// with their ranges, and the trace drives `naiad convert --prefetch-list`.
#[test]
fn trace_records_reads_in_first_access_order() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let img = generate_image(&tmp.path().join("src"), Compression::Gzip);
    let image = convert(&img.layout, img.tag, &tmp.path().join("naiad"));
    let expected = tmp.path().join("expected");
    umoci_unpack(&img.reference_layout, GENERATED_TAG, &expected);
    let trace = tmp.path().join("trace.jsonl");

    let m = MountGuard::mount_with(&image, tmp.path(), &tmp.path().join("cache"), &[os("--record-trace"), trace.as_os_str()]);
    // The trace exists (empty) as soon as the mount does.
    assert_eq!(fs::read_to_string(&trace).expect("trace file at mount"), "");
    // Recorded with the small kernel read-ahead a startup set is run with.
    assert_eq!(kernel_readahead_kb(&m.mountpoint), 4, "recording mount");
    let big_len = fs::metadata(expected.join(gen_paths::BIG)).unwrap().len();
    let at = (1u64 << 20) + 5000;
    let reads: [(&str, u64, usize); 5] = [
        (gen_paths::BIG, at, 100_000),
        (gen_paths::PRECISE_MTIME, 0, 1 << 20),
        (gen_paths::DUP1, 0, 4096),
        (gen_paths::BIG, 0, 4096),
        // Covered by the first: no new record.
        (gen_paths::BIG, at + 1000, 1000),
    ];
    for (rel, offset, len) in reads {
        let got = pread_exact(&m.path(rel), offset, len);
        let want = fs::read(expected.join(rel)).unwrap();
        let end = (offset as usize + len).min(want.len());
        assert_eq!(got, want[offset as usize..end], "{rel} at {offset}");
    }
    // Written out while mounted (periodically), complete at every moment.
    assert!(wait_until(Duration::from_secs(10), || parse_trace(&trace).len() == 4), "trace while mounted: {:?}", fs::read_to_string(&trace));
    assert_eq!(m.counter("trace_records"), 4);
    m.umount();

    let recs = parse_trace(&trace);
    eprintln!("trace: {recs:#?}");
    let paths: Vec<&str> = recs.iter().map(|r| r.path.as_str()).collect();
    let abs = |p: &str| format!("/{p}");
    assert_eq!(paths, [abs(gen_paths::BIG), abs(gen_paths::PRECISE_MTIME), abs(gen_paths::DUP1), abs(gen_paths::BIG)], "first-access order");
    check_trace_invariants(&recs, &expected);
    // Each record covers the read that caused it.
    let covers = |r: &Rec, offset: u64, len: u64| r.offset <= offset && r.offset + r.length >= offset + len;
    assert!(covers(&recs[0], at, 100_000) && recs[0].offset + recs[0].length <= big_len);
    let precise_len = fs::metadata(expected.join(gen_paths::PRECISE_MTIME)).unwrap().len();
    assert_eq!((recs[1].offset, recs[1].length), (0, precise_len));
    assert!(covers(&recs[2], 0, 4096));
    assert!(covers(&recs[3], 0, 4096) && recs[3].offset + recs[3].length <= recs[0].offset, "{:?}", recs[3]);

    // The converter takes it as a prefetch list.
    let optimized = convert_with_list(&img.layout, img.tag, &tmp.path().join("optimized"), &trace);
    let info = naiad_inspect_json(&optimized);
    assert!(u(&info["prefetch_chunks"]) > 0, "no prefetch chunks: {info}");

    // The optimized image runs with the read-ahead it was recorded with;
    // the plain one with the kernel's default.
    for (image, kb) in [(&optimized, 4), (&image, 128)] {
        let dir = tmp.path().join(format!("ra-{kb}"));
        fs::create_dir(&dir).unwrap();
        let m = MountGuard::mount(image, &dir, &dir.join("cache"));
        assert_eq!(kernel_readahead_kb(&m.mountpoint), kb, "{image}");
        m.umount();
    }

    // Reads of the recorded bytes follow the recording: no read-ahead.
    // Reading on past them (BIG's last MiB, not in the set) leaves it, and
    // reads ahead as any file does.
    let dir = tmp.path().join("off-recording");
    fs::create_dir(&dir).unwrap();
    let m = MountGuard::mount(&optimized, &dir, &dir.join("cache"));
    wait_prefetch_done(&m, Duration::from_secs(30));
    let want = fs::read(expected.join(gen_paths::BIG)).unwrap();
    let step = 32 << 10;
    let read_at = |offset: u64| {
        let got = pread_exact(&m.path(gen_paths::BIG), offset, step);
        assert!(got[..] == want[offset as usize..(offset as usize + step).min(want.len())], "BIG at {offset}");
    };
    for offset in (recs[0].offset..recs[0].offset + recs[0].length - step as u64).step_by(step) {
        read_at(offset);
    }
    assert_eq!(m.counter("read_ahead_requests"), 0, "read ahead within the recording: {}", m.stats()["counters"]);
    for offset in ((2u64 << 20)..big_len).step_by(step) {
        read_at(offset);
    }
    // Counted when its request is made, on a load's own thread.
    assert!(wait_until(Duration::from_secs(10), || m.counter("read_ahead_requests") > 0), "no read-ahead off the recording: {}", m.stats()["counters"]);
    m.umount();
}

/// The kernel read-ahead of the mount at `mountpoint`, in KiB (its
/// backing device's `read_ahead_kb`).
fn kernel_readahead_kb(mountpoint: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(mountpoint).unwrap().dev();
    let path = format!("/sys/class/bdi/{}:{}/read_ahead_kb", major(dev), minor(dev));
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}")).trim().parse().unwrap()
}

/// The Debian image: `naiad run --record-trace` of `python3 -c 'import
/// json'`, converted with that trace; the startup set is then prefetched
/// in a few requests and the startup reads nothing more from the store.
#[test]
fn python_startup_is_recorded_and_prefetched() {
    if !fuse_available() {
        return;
    }
    let debian = debian_image();
    let tmp = tempdir();
    let plain = convert(&debian.layout, "latest", &tmp.path().join("naiad"));
    let trace = tmp.path().join("python.trace");

    // (a) Record.
    let out = output(
        naiad()
            .arg("run")
            .arg("--cache-dir")
            .arg(tmp.path().join("cache-record"))
            .arg("--run-dir")
            .arg(tmp.path().join("run-record"))
            .arg("--record-trace")
            .arg(&trace)
            .arg(&plain)
            .arg("--")
            .args(["python3", "-c", "import json; print(json.dumps({'ok': 1}))"]),
    );
    assert!(out.status.success(), "naiad run failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "{\"ok\": 1}");
    let recs = parse_trace(&trace);
    check_trace_invariants(&recs, &debian.reference_rootfs);
    let first = |p: &str| recs.iter().position(|r| r.path == p).unwrap_or_else(|| panic!("{p} not in the trace"));
    let python = first("/usr/bin/python3.11");
    let libc = first("/usr/lib/x86_64-linux-gnu/libc.so.6");
    let json = first("/usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc");
    assert!(python < libc && libc < json, "not in access order: python {python}, libc {libc}, json {json}");
    let traced_bytes: u64 = recs.iter().map(|r| r.length).sum();
    eprintln!("trace: {} records, {} files, {traced_bytes} bytes", recs.len(), recs.iter().map(|r| &r.path).collect::<std::collections::HashSet<_>>().len());

    // On demand, without prefetch: requests and amplification of the plain image.
    let cold_dir = tmp.path().join("cold");
    fs::create_dir(&cold_dir).unwrap();
    let m = MountGuard::mount_with(&plain, &cold_dir, &cold_dir.join("cache"), &[os("--no-prefetch")]);
    let t = Instant::now();
    let st = Command::new("chroot").arg(&m.mountpoint).args(["/usr/bin/python3", "-c", "import json"]).status().expect("chroot python3");
    let cold_time = t.elapsed();
    assert!(st.success());
    let s = m.stats();
    let c = &s["counters"];
    eprintln!(
        "on demand (plain image): python3 -c 'import json' in {cold_time:?}: {} reads ({} bytes), {} store requests for {} chunks ({} stored bytes, {} uncompressed): amplification {:.2} stored, {:.2} uncompressed",
        c["reads"],
        c["read_bytes"],
        c["demand_requests"],
        c["demand_chunks"],
        c["demand_bytes"],
        c["demand_raw_bytes"],
        u(&c["demand_bytes"]) as f64 / u(&c["read_bytes"]) as f64,
        u(&c["demand_raw_bytes"]) as f64 / u(&c["read_bytes"]) as f64,
    );
    // Merged reads: fewer requests than chunks, and the chunks fetched are
    // not much more than what was read.
    assert!(u(&c["demand_requests"]) < u(&c["demand_chunks"]), "{c}");
    assert!(u(&c["demand_raw_bytes"]) < 2 * u(&c["read_bytes"]), "{c}");
    assert_eq!(u(&c["prefetch_requests"]), 0);
    m.umount();

    // (b) The optimized image.
    let optimized = convert_with_list(&debian.layout, "latest", &tmp.path().join("optimized"), &trace);
    let info = naiad_inspect_json(&optimized);
    let prefetch_chunks = u(&info["prefetch_chunks"]);
    assert!(prefetch_chunks > 0, "{info}");
    let m = MountGuard::mount(&optimized, tmp.path(), &tmp.path().join("cache"));
    let s = wait_prefetch_done(&m, Duration::from_secs(60));
    let (p, c) = (&s["prefetch"], &s["counters"]);
    eprintln!("prefetch: {p}\ncounters after prefetch: {c}");
    assert_eq!(u(&p["chunks_total"]), prefetch_chunks);
    assert_eq!(u(&p["chunks_done"]), prefetch_chunks);
    assert_eq!(u(&p["chunks_failed"]), 0);
    let set_bytes = u(&p["bytes_total"]);
    assert_eq!(u(&c["prefetch_bytes"]), set_bytes, "every chunk of the set fetched by the prefetch");
    // A few requests: the set is contiguous in the prefetch blob, except
    // chunks deduplicated into earlier blobs (one request per run of them).
    let requests = u(&c["prefetch_requests"]);
    let minimum = set_bytes.div_ceil(MAX_REQUEST);
    assert!(requests >= minimum && requests <= minimum + 3, "{requests} prefetch requests for {set_bytes} bytes");
    assert_eq!(u(&c["demand_requests"]), 0);
    let store_chunks = u(&c["store_chunks"]);
    assert_eq!(store_chunks, prefetch_chunks);

    // A first read of each traced file has the daemon put the file's pages
    // of the set in the kernel's page cache (FUSE_NOTIFY_STORE).
    let mut seen = std::collections::HashSet::new();
    for r in recs.iter().filter(|r| seen.insert(r.path.clone())) {
        pread_exact(&m.path(&r.path[1..]), r.offset, 1);
    }
    let mut pushed = 0;
    assert!(
        wait_until(Duration::from_secs(20), || {
            let (before, now) = (pushed, m.counter("pushed_bytes"));
            pushed = now;
            std::thread::sleep(Duration::from_millis(100));
            now > 0 && now == before
        }),
        "no startup set pages pushed: {}",
        m.stats()["counters"]
    );
    let reads_before = m.counter("reads");
    // Replay the traced reads: the right bytes, all from those pages (no
    // FUSE read), nothing from the store.
    for r in &recs {
        let got = pread_exact(&m.path(&r.path[1..]), r.offset, r.length as usize);
        let want = pread_exact(&debian.reference_rootfs.join(&r.path[1..]), r.offset, r.length as usize);
        assert!(got == want, "{r:?}: wrong bytes");
    }
    let s = m.stats();
    let replay_reads = u(&s["counters"]["reads"]) - reads_before;
    eprintln!("replay of {} records after {pushed} bytes pushed: {replay_reads} FUSE reads", recs.len());
    assert!(replay_reads * 20 <= recs.len() as u64, "{replay_reads} of {} replayed reads reached the daemon: {}", recs.len(), s["counters"]);
    assert_eq!(u(&s["counters"]["store_chunks"]), store_chunks, "the replay read from the store: {}", s["counters"]);
    assert_eq!(u(&s["counters"]["demand_requests"]), 0);
    m.umount();

    // A fresh mount (empty caches): python itself starts without a store
    // read once the prefetch is done.
    let warm_dir = tmp.path().join("again");
    fs::create_dir(&warm_dir).unwrap();
    let m = MountGuard::mount(&optimized, &warm_dir, &warm_dir.join("cache"));
    let s = wait_prefetch_done(&m, Duration::from_secs(60));
    let before = u(&s["counters"]["store_chunks"]);
    let t = Instant::now();
    let st = Command::new("chroot").arg(&m.mountpoint).args(["/usr/bin/python3", "-c", "import json"]).status().expect("chroot python3");
    let warm_time = t.elapsed();
    assert!(st.success());
    let s = m.stats();
    let c = &s["counters"];
    eprintln!(
        "optimized: prefetch of {prefetch_chunks} chunks ({set_bytes} bytes) in {requests} requests done {} ms after mount; python3 -c 'import json' then took {warm_time:?} (cold on demand: {cold_time:?}) with {} more store chunks",
        s["prefetch"]["millis"],
        u(&c["store_chunks"]) - before
    );
    // The set holds the very pages the recorded run read (one page of
    // read-ahead), and this run is not that one (another command, the
    // test's environment, outside `naiad run`): it faults in a few pages
    // the set does not hold, each fetching its chunk. Never much of the
    // set's size.
    assert!(u(&c["demand_chunks"]) <= 4 && u(&c["demand_bytes"]) * 5 < set_bytes, "python read much from the store after the prefetch: {c}");
    m.umount();

    // --no-prefetch: nothing is fetched until read; the startup set's
    // layout still makes the on-demand reads cheaper.
    let off_dir = tmp.path().join("no-prefetch");
    fs::create_dir(&off_dir).unwrap();
    let m = MountGuard::mount_with(&optimized, &off_dir, &off_dir.join("cache"), &[os("--no-prefetch")]);
    let s = m.stats();
    assert_eq!(s["prefetch"]["state"], "none");
    assert_eq!(u(&s["counters"]["store_requests"]), 0);
    let st = Command::new("chroot").arg(&m.mountpoint).args(["/usr/bin/python3", "-c", "import json"]).status().expect("chroot python3");
    assert!(st.success());
    let s = m.stats();
    let c = &s["counters"];
    assert_eq!(u(&c["prefetch_requests"]), 0);
    eprintln!("optimized image, --no-prefetch: {} store requests for {} chunks on demand", c["demand_requests"], c["demand_chunks"]);
    m.umount();
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// 16 threads read random files (whole, compared by SHA-256) and random
/// ranges while the prefetch (rate-capped so it lasts) and `--fetch-all`
/// run: every byte is right, nothing fails, and no chunk is fetched twice.
#[test]
fn parallel_readers_during_prefetch_get_correct_data_and_no_chunk_twice() {
    if !fuse_available() {
        return;
    }
    let debian = debian_image();
    let tmp = tempdir();
    let list = tmp.path().join("startup.list");
    fs::write(&list, "# python's library and the binaries\n/usr/lib/python3.11/**\n/usr/bin/*\n").unwrap();
    let image = convert_with_list(&debian.layout, "latest", &tmp.path().join("naiad"), &list);
    let info = naiad_inspect_json(&image);
    let unique_chunks = u(&info["unique_chunks"]);
    assert!(u(&info["prefetch_chunks"]) > 100, "{info}");

    let m = MountGuard::mount_with(
        &image,
        tmp.path(),
        &tmp.path().join("cache"),
        &[os("--prefetch-rate"), os("4M"), os("--prefetch-threads"), os("2"), os("--fetch-all"), os("--threads"), os("8")],
    );
    let s = m.stats();
    assert_eq!(s["prefetch"]["state"], "running", "the prefetch should still be running: {}", s["prefetch"]);

    let files = Arc::new(regular_files(&debian.reference_rootfs));
    let reference_sha: Arc<Mutex<HashMap<PathBuf, String>>> = Arc::default();
    let checked = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(4);
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let (files, reference_sha, checked) = (files.clone(), reference_sha.clone(), checked.clone());
            let (mnt, reference) = (m.mountpoint.clone(), debian.reference_rootfs.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1).wrapping_mul(0x1234_5678_9abc_def1));
                let mut n = 0;
                while Instant::now() < deadline || n < 20 {
                    let (rel, len) = &files[rng.below(files.len() as u64) as usize];
                    let (on_mount, on_ref) = (mnt.join(rel), reference.join(rel));
                    if rng.below(2) == 0 {
                        let got = sha256_file(&on_mount).unwrap_or_else(|e| panic!("thread {t}: read {}: {e}", rel.display()));
                        let want = {
                            let cached = reference_sha.lock().unwrap().get(rel).cloned();
                            match cached {
                                Some(w) => w,
                                None => {
                                    let w = sha256_file(&on_ref).expect("reference sha256");
                                    reference_sha.lock().unwrap().insert(rel.clone(), w.clone());
                                    w
                                }
                            }
                        };
                        assert_eq!(got, want, "thread {t}: {} differs from the reference", rel.display());
                    } else {
                        let offset = rng.below(*len);
                        let size = 1 + rng.below(300_000) as usize;
                        let f = fs::File::open(&on_mount).unwrap_or_else(|e| panic!("thread {t}: open {}: {e}", rel.display()));
                        let mut got = vec![0u8; size];
                        let mut have = 0;
                        while have < size {
                            match f.read_at(&mut got[have..], offset + have as u64) {
                                Ok(0) => break,
                                Ok(k) => have += k,
                                Err(e) => panic!("thread {t}: read {} at {}: {e}", rel.display(), offset + have as u64),
                            }
                        }
                        got.truncate(have);
                        let want = pread_exact(&on_ref, offset, size);
                        assert!(got == want, "thread {t}: {} bytes {offset}+{size} differ from the reference", rel.display());
                    }
                    n += 1;
                }
                checked.fetch_add(n, Ordering::SeqCst);
            })
        })
        .collect();
    let mut failed = Vec::new();
    for t in threads {
        if let Err(e) = t.join() {
            failed.push(e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default());
        }
    }
    assert!(failed.is_empty(), "reader threads failed:\n{}\nlog:\n{}", failed.join("\n"), m.log());
    let s = m.stats();
    let c = &s["counters"];
    eprintln!("{} checks by 16 threads; prefetch {}; counters {c}", checked.load(Ordering::SeqCst), s["prefetch"]);
    assert_eq!(u(&c["errors"]), 0, "{c}");
    assert_eq!(u(&c["read_errors"]), 0, "{c}");
    assert_eq!(u(&c["refetches"]), 0, "a chunk was fetched twice: {c}");
    let fetched = u(&c["store_chunks"]);
    assert_eq!(fetched, u(&c["demand_chunks"]) + u(&c["prefetch_chunks"]) + u(&c["background_chunks"]) + u(&c["read_ahead_chunks"]));
    assert!(fetched <= unique_chunks, "{fetched} chunks fetched, the image has {unique_chunks}");
    assert!(u(&c["demand_chunks"]) > 0 && u(&c["prefetch_chunks"]) > 0, "readers and prefetch did not overlap: {c}");
    // The prefetch finishes (the readers did not break it), no faster than
    // its bandwidth cap allows.
    let s = wait_prefetch_done(&m, Duration::from_secs(120));
    let prefetched = u(&s["counters"]["prefetch_bytes"]);
    let min_millis = prefetched.saturating_sub(MAX_REQUEST) as f64 / (4u64 << 20) as f64 * 1000.0 * 0.9;
    assert!(u(&s["prefetch"]["millis"]) as f64 >= min_millis, "{prefetched} bytes prefetched in {} ms at 4 MiB/s", s["prefetch"]["millis"]);
    assert_eq!(s["prefetch"]["chunks_done"], s["prefetch"]["chunks_total"]);
    assert_eq!(u(&s["prefetch"]["chunks_failed"]), 0);
    assert_eq!(u(&s["counters"]["refetches"]), 0);
    m.umount();
}

/// `naiad stats --json`, `--prometheus` and `GET /metrics` on the
/// `--api-socket` show the same counters; the read-latency histogram counts
/// every read; bytes read match what the test read.
#[test]
fn stats_prometheus_and_api_socket_show_the_counters() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let img = generate_image(&tmp.path().join("src"), Compression::Gzip);
    let image = convert(&img.layout, img.tag, &tmp.path().join("naiad"));
    let api = tmp.path().join("api.sock");
    let m = MountGuard::mount_with(&image, tmp.path(), &tmp.path().join("cache"), &[os("--api-socket"), api.as_os_str()]);
    let files = [gen_paths::BIG, gen_paths::DUP1, gen_paths::PRECISE_MTIME, gen_paths::XATTR_FILE, gen_paths::EXACT_CHUNK];
    let mut total = 0u64;
    for f in files {
        total += fs::read(m.path(f)).unwrap().len() as u64;
    }
    // Read again: the page cache answers, the daemon sees nothing new.
    for f in files {
        fs::read(m.path(f)).unwrap();
    }

    let s = m.settled_stats();
    let c = &s["counters"];
    let reads = u(&c["reads"]);
    assert!(reads >= files.len() as u64, "{c}");
    assert_eq!(u(&c["read_bytes"]), total, "bytes served to the kernel: {c}");
    assert_eq!(u(&c["read_errors"]), 0);
    // Every store request is a reader's or read-ahead's (no prefetch here).
    assert!(u(&c["store_requests"]) > 0 && u(&c["store_requests"]) == u(&c["demand_requests"]) + u(&c["read_ahead_requests"]), "{c}");
    assert!(u(&c["misses"]) > 0 && u(&c["store_bytes"]) > 0);
    let lat = &s["read_latency"];
    assert_eq!(u(&lat["count"]), reads, "histogram count vs reads: {lat}");
    let buckets = lat["buckets"].as_array().expect("buckets");
    assert!(buckets.windows(2).all(|w| u(&w[0]["count"]) <= u(&w[1]["count"]) && w[0]["le"].as_f64() < w[1]["le"].as_f64()), "{lat}");
    assert!(u(&buckets[buckets.len() - 1]["count"]) <= reads);
    assert!(lat["sum_seconds"].as_f64().expect("sum") > 0.0);
    assert_eq!(s["prefetch"]["state"], "none", "the generated image has no prefetch table");

    // Prometheus from `naiad stats --prometheus`.
    let mp = m.mountpoint.display().to_string();
    let series = |name: &str| format!("{name}{{mountpoint=\"{mp}\"}}");
    let prom = m.prometheus();
    assert!(prom.contains("# TYPE naiad_read_latency_seconds histogram\n"), "{prom}");
    assert!(prom.contains("# TYPE naiad_reads_total counter\n"));
    for (name, key) in [
        ("naiad_reads_total", "reads"),
        ("naiad_read_bytes_total", "read_bytes"),
        ("naiad_store_requests_total", "store_requests"),
        ("naiad_memory_hits_total", "memory_hits"),
        ("naiad_disk_hits_total", "disk_hits"),
        ("naiad_misses_total", "misses"),
        ("naiad_errors_total", "errors"),
        ("naiad_retries_total", "retries"),
    ] {
        assert_eq!(prometheus_value(&prom, &series(name)), Some(u(&c[key]) as f64), "{name} in:\n{prom}");
    }
    assert_eq!(prometheus_value(&prom, &series("naiad_read_latency_seconds_count")), Some(reads as f64));
    assert_eq!(prometheus_value(&prom, &format!("naiad_read_latency_seconds_bucket{{mountpoint=\"{mp}\",le=\"+Inf\"}}")), Some(reads as f64));
    assert_eq!(prometheus_value(&prom, &series("naiad_prefetch_state")), Some(0.0));

    // The same over HTTP on the API socket.
    let (status, head, body) = http_get(&api, "/metrics");
    assert_eq!(status, 200, "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    assert_eq!(prometheus_value(&body, &series("naiad_reads_total")), Some(reads as f64));
    assert_eq!(prometheus_value(&body, &series("naiad_read_latency_seconds_count")), Some(reads as f64));
    let (status, _, body) = http_get(&api, "/stats");
    assert_eq!(status, 200);
    let j: Value = serde_json::from_str(&body).expect("stats JSON over HTTP");
    assert_eq!(j["counters"]["reads"], c["reads"]);
    assert_eq!(http_get(&api, "/nope").0, 404);
    // And with curl, as documented, when it is installed.
    if let Ok(out) = Command::new("curl").args(["-sS", "--unix-socket"]).arg(&api).arg("http://localhost/metrics").output() {
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(prometheus_value(&text, &series("naiad_reads_total")), Some(reads as f64), "curl got:\n{text}");
        }
    }

    // Text output names the new sections.
    let text = check(naiad().arg("stats").arg("--run-dir").arg(&m.run_dir).arg(&m.mountpoint));
    for want in ["read latency", "amplification", "prefetch", "store_requests"] {
        assert!(text.contains(want), "{want} not in:\n{text}");
    }
    m.umount();
    assert!(!api.exists(), "the API socket is left behind");
}
