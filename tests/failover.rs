//! Daemon failover and live upgrade, through real FUSE mounts of the Debian
//! fixture: a reader loops over every file of the mounted image, checking
//! each against the reference unpack, while the serving daemon is killed
//! with SIGKILL again and again (the first time during the startup
//! prefetch) and then upgraded to another copy of the binary. No read may
//! fail or return wrong bytes, and the mount must stay. `naiad run` keeps
//! its command running across daemon kills, and a killed supervisor leaves
//! the mount served until `naiad umount`, after which nothing is left.
//!
//! The stall figures these tests print are for information; the failover
//! benchmark (`cargo bench --bench failover`) measures them in release mode.

mod common;
mod failover_support;
mod mount_support;

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use failover_support::*;
use mount_support::*;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("naiad-failover-test-").tempdir_in("/tmp").expect("tempdir")
}

#[test]
fn kill_9_and_live_upgrade_under_load_fail_no_read() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let (image, files) = debian_with_prefetch(tmp.path());
    let m = MountGuard::mount_with(&image, tmp.path(), &tmp.path().join("cache"), &["--memory-cache".as_ref(), "4M".as_ref()]);
    let supervisor = m.pid as u64;
    let first = serving_pid(&m);
    assert_ne!(first, supervisor, "the daemon is not the supervisor");
    let reader = Reader::start(&m.mountpoint, files.clone());
    let mut rng = Rng(Instant::now().elapsed().as_nanos() as u64 | 0x9e37_79b9_7f4a_7c15);

    // kill -9, ten times, the first while the startup prefetch runs.
    let mut daemon = first;
    let mut reads_before = 0;
    for i in 0..10 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
        }
        let before = m.stats();
        let counted = before["counters"]["reads"].as_u64().expect("reads counter");
        assert!(counted >= reads_before, "the reads counter went back from {reads_before} to {counted}");
        reads_before = counted;
        if i == 0 {
            eprintln!("first kill with the prefetch {}", before["prefetch"]["state"]);
        }
        // SAFETY: kill(2) of the daemon this test's mount runs.
        assert_eq!(unsafe { libc::kill(daemon as i32, libc::SIGKILL) }, 0, "kill daemon {daemon}");
        daemon = wait_for_new_daemon(&m, daemon);
        reader.wait_for_reads(20);
    }
    let s = m.stats();
    assert_eq!(s["supervisor_pid"].as_u64(), Some(supervisor), "the supervisor stays");
    assert_eq!(s["generation"].as_u64(), Some(11), "{s}");
    assert_eq!(s["counters"]["daemon_restarts"].as_u64(), Some(10), "{s}");
    assert!(s["counters"]["reads"].as_u64().unwrap_or(0) >= reads_before, "counters stay monotonic across restarts");
    assert_eq!(s["daemon_recovery"]["count"].as_u64(), Some(10), "{s}");
    let prom = m.prometheus();
    let label = format!("{{mountpoint=\"{}\"}}", m.mountpoint.display());
    assert_eq!(prometheus_value(&prom, &format!("naiad_daemon_restarts_total{label}")), Some(10.0), "{prom}");
    assert_eq!(prometheus_value(&prom, &format!("naiad_supervisor_pid{label}")), Some(supervisor as f64));
    assert!(wait_until(Duration::from_secs(60), || m.stats()["prefetch"]["state"] == "done"), "the prefetch did not complete after the restarts: {}", m.stats());

    // Live upgrades to another copy of the binary, and back.
    let copy = tmp.path().join("naiad-copy");
    fs::copy(env!("CARGO_BIN_EXE_naiad"), &copy).expect("copy the binary");
    for (round, binary) in [copy.as_path(), Path::new(env!("CARGO_BIN_EXE_naiad")), copy.as_path()].into_iter().enumerate() {
        let out = check(naiad().arg("daemon").arg("upgrade").arg("--run-dir").arg(&m.run_dir).arg("--binary").arg(binary).arg(&m.mountpoint));
        let new: u64 = out.trim().parse().unwrap_or_else(|_| panic!("naiad daemon upgrade printed {out:?}"));
        assert_ne!(new, daemon, "upgrade {round} started a new daemon");
        assert_eq!(serving_pid(&m), new);
        let exe = fs::read_link(format!("/proc/{new}/exe")).expect("exe of the new daemon");
        assert_eq!(exe, binary.canonicalize().unwrap(), "upgrade {round} runs the binary it was given");
        assert!(wait_until(Duration::from_secs(10), || gone(daemon)), "the old daemon {daemon} still runs");
        daemon = new;
        reader.wait_for_reads(20);
    }
    let s = m.stats();
    assert_eq!(s["counters"]["daemon_upgrades"].as_u64(), Some(3), "{s}");
    // A bad upgrade is refused and leaves the daemon serving.
    let out = output(naiad().arg("daemon").arg("upgrade").arg("--run-dir").arg(&m.run_dir).arg("--binary").arg("/bin/false").arg(&m.mountpoint));
    assert!(!out.status.success(), "upgrading to /bin/false succeeded");
    assert!(String::from_utf8_lossy(&out.stderr).contains("exited before it was ready"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(serving_pid(&m), daemon);

    reader.wait_for_reads(files.len() as u64 / 2);
    let report = reader.finish();
    eprintln!("kill -9 x10 + 3 upgrades: {}", report.summary());
    assert!(report.failures.is_empty(), "{} of {} reads failed, first: {:?}", report.failures.len(), report.files_read, &report.failures[..report.failures.len().min(5)]);
    assert!(is_naiad_mount(&m.mountpoint), "the mount went away");
    m.umount();
}

#[test]
fn a_killed_supervisor_leaves_the_mount_served_until_umount() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let debian = debian_image();
    let image = convert(&debian.layout, "latest", &tmp.path().join("naiad"));
    let m = MountGuard::mount(&image, tmp.path(), &tmp.path().join("cache"));
    let daemon = serving_pid(&m);
    // SAFETY: kill(2) of the supervisor this test's mount runs.
    assert_eq!(unsafe { libc::kill(m.pid, libc::SIGKILL) }, 0);
    assert!(wait_until(Duration::from_secs(5), || !m.daemon_alive()), "supervisor still running");
    // The daemon keeps serving.
    let want = sha256_file(&debian.reference_rootfs.join("etc/os-release")).unwrap();
    assert_eq!(sha256_hex(&read_uncached(&m.path("etc/os-release"), &mut Vec::new()).expect("read after the supervisor died")), want);
    assert_eq!(serving_pid(&m), daemon);
    let run_dir = m.run_dir.clone();
    m.umount();
    assert!(wait_until(Duration::from_secs(5), || gone(daemon)), "daemon {daemon} still running after naiad umount");
    let left = run_dir_leftovers(&run_dir);
    assert!(left.is_empty(), "files left in the run directory: {left:?}");
}

#[test]
fn naiad_run_survives_daemon_kills() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let debian = debian_image();
    let image = convert(&debian.layout, "latest", &tmp.path().join("naiad"));
    let run_dir = tmp.path().join("run");
    // Reads os.py again and again (dropping it from the page cache each
    // time, so every read reaches the daemon) for 4 seconds, then exits 7.
    let script = "import os, time\n\
        p = '/usr/lib/python3.11/os.py'\n\
        def read():\n\
        \x20   fd = os.open(p, os.O_RDONLY)\n\
        \x20   data = b''\n\
        \x20   while True:\n\
        \x20       b = os.read(fd, 65536)\n\
        \x20       if not b: break\n\
        \x20       data += b\n\
        \x20   os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)\n\
        \x20   os.close(fd)\n\
        \x20   return data\n\
        first = read()\n\
        n = 0\n\
        end = time.monotonic() + 4\n\
        while time.monotonic() < end:\n\
        \x20   assert read() == first\n\
        \x20   n += 1\n\
        print('reads', n, 'ok', flush=True)\n\
        raise SystemExit(7)\n";
    let child = naiad()
        .arg("run")
        .arg("--cache-dir")
        .arg(tmp.path().join("cache"))
        .arg("--run-dir")
        .arg(&run_dir)
        .arg(&image)
        .arg("--")
        .args(["python3", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn naiad run");
    let mut killed = Vec::new();
    let mut pid = None;
    assert!(
        wait_until(Duration::from_secs(60), || {
            pid = stats_in(&run_dir).and_then(|s| s["pid"].as_u64());
            pid.is_some()
        }),
        "naiad run's mount never served"
    );
    let supervisor = stats_in(&run_dir).and_then(|s| s["supervisor_pid"].as_u64()).expect("supervisor pid");
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(800));
        let daemon = pid.expect("a daemon");
        // SAFETY: kill(2) of the daemon of this test's naiad run.
        assert_eq!(unsafe { libc::kill(daemon as i32, libc::SIGKILL) }, 0);
        killed.push(daemon);
        assert!(
            wait_until(Duration::from_secs(20), || {
                pid = stats_in(&run_dir).and_then(|s| s["pid"].as_u64()).filter(|p| *p != daemon);
                pid.is_some()
            }),
            "no new daemon after killing {daemon}"
        );
    }
    let last = pid.expect("a daemon");
    let out = child.wait_with_output().expect("wait for naiad run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "exit code; stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" ok"), "{stdout}");
    eprintln!("naiad run across {} daemon kills: {}", killed.len(), stdout.trim());
    for p in killed.into_iter().chain([last, supervisor]) {
        assert!(wait_until(Duration::from_secs(5), || gone(p)), "process {p} of this naiad run is still running");
    }
}

#[test]
fn passthrough_opens_survive_a_daemon_kill() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let img = generate_image(&tmp.path().join("src"), Compression::Gzip);
    let image = convert(&img.layout, img.tag, &tmp.path().join("naiad"));
    let m = MountGuard::mount_with(&image, tmp.path(), &tmp.path().join("cache"), &["--passthrough".as_ref()]);
    let big = m.path(gen_paths::BIG);
    let expected = fs::read(&big).unwrap();
    assert!(wait_until(Duration::from_secs(20), || m.counter("backing_writes") >= 1), "no backing file: {}", m.stats());
    // An open the kernel serves by passthrough, held across the kill: the
    // next daemon must answer new opens of the same file with the same
    // backing file, or the kernel refuses them.
    let held = fs::File::open(&big).unwrap();
    assert_eq!(m.counter("passthrough_opens"), 1);
    let old = serving_pid(&m);
    // SAFETY: kill(2) of the daemon this test's mount runs.
    assert_eq!(unsafe { libc::kill(old as i32, libc::SIGKILL) }, 0);
    wait_for_new_daemon(&m, old);
    let again = fs::read(&big).expect("a new open of a file held open by passthrough across a restart");
    assert_eq!(again, expected);
    let mut from_held = Vec::new();
    std::io::Read::read_to_end(&mut &held, &mut from_held).unwrap();
    assert_eq!(from_held, expected);
    assert_eq!(m.counter("passthrough_opens"), 2);
    drop(held);
    // Released by the new daemon: the next open registers a new backing
    // file and reads right.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(fs::read(&big).unwrap(), expected);
    assert_eq!(m.counter("passthrough_opens"), 3);
    m.umount();
}
