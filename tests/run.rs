//! `naiad run` on the Debian + python3 fixture: the command runs in the
//! lazily mounted image under a writable overlay, its exit code comes back,
//! the image's config (Cmd, Env, WorkingDir) applies, and nothing (mounts,
//! daemons, directories) is left behind, also when the command fails.

mod common;
mod mount_support;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;
use mount_support::*;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("naiad-run-test-").tempdir_in("/tmp").expect("tempdir")
}

/// `naiad run` with the cache under `dir`; returns its output and the
/// temporary directory it used (named after its pid).
fn run(dir: &Path, args: &[&str]) -> (Output, std::path::PathBuf) {
    let child = naiad()
        .arg("run")
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn naiad run");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for naiad run");
    (out, std::path::PathBuf::from(format!("/tmp/naiad-run-{pid}-")))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Nothing of a finished `naiad run` remains: no mount or directory whose
/// name starts with `prefix`, no daemon.
fn assert_cleaned_up(prefix: &Path) {
    let p = prefix.to_string_lossy().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = mounts.lines().filter(|l| l.contains(&p)).collect();
    assert!(left.is_empty(), "mounts left behind: {left:?}");
    let dirs: Vec<_> = std::fs::read_dir("/tmp").unwrap().flatten().filter(|e| e.path().to_string_lossy().starts_with(&p)).map(|e| e.path()).collect();
    assert!(dirs.is_empty(), "directories left behind: {dirs:?}");
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    assert!(!text(&ps.stdout).contains(&p), "a daemon for {p} is still running");
}

#[test]
fn run_python_and_forward_exit_codes() {
    if !fuse_available() {
        return;
    }
    let debian = debian_image();
    let tmp = tempdir();
    let image = convert(&debian.layout, "latest", &tmp.path().join("naiad"));

    let (out, prefix) = run(tmp.path(), &[&image, "--", "python3", "-c", "import json; print(42)"]);
    assert!(out.status.success(), "python3 failed ({}): {}", out.status, text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "42");
    assert_cleaned_up(&prefix);

    let (out, prefix) = run(tmp.path(), &[&image, "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_cleaned_up(&prefix);

    // Without a command: the image's Cmd (python3 -c 'print(42)').
    let (out, prefix) = run(tmp.path(), &[&image]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "42");
    assert_cleaned_up(&prefix);

    // A command that does not exist: 127, and still cleaned up.
    let (out, prefix) = run(tmp.path(), &[&image, "--", "no-such-command"]);
    assert_eq!(out.status.code(), Some(127), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no-such-command"), "{}", text(&out.stderr));
    assert_cleaned_up(&prefix);
}

#[test]
fn run_applies_config_user_and_isolates_writes() {
    if !fuse_available() {
        return;
    }
    let debian = debian_image();
    let tmp = tempdir();
    let image = convert(&debian.layout, "latest", &tmp.path().join("naiad"));

    // PID 1 of its own namespace, /proc and /dev inside, the image's Env,
    // a writable root whose changes do not reach the image.
    let script = "echo pid=$$; echo env=$NAIAD_TEST; echo cwd=$(pwd); \
                  test -c /dev/null && test -r /proc/self/status && echo dev-proc-ok; \
                  echo changed > /etc/naiad-release && cat /etc/naiad-release";
    let (out, prefix) = run(tmp.path(), &[&image, "-w", "/usr", "--", "sh", "-c", script]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}\n{}", stdout, text(&out.stderr));
    for want in ["pid=1", "env=1", "cwd=/usr", "dev-proc-ok", "changed"] {
        assert!(stdout.lines().any(|l| l == want), "missing {want:?} in:\n{stdout}");
    }
    assert_cleaned_up(&prefix);
    let (out, _) = run(tmp.path(), &[&image, "--", "cat", "/etc/naiad-release"]);
    assert!(text(&out.stdout).contains("layer=2"), "the image was changed: {}", text(&out.stdout));

    // Users by name (from the image's /etc/passwd) and by number.
    let (out, _) = run(tmp.path(), &[&image, "-u", "nobody", "--", "id", "-u"]);
    assert_eq!(text(&out.stdout).trim(), "65534", "{}", text(&out.stderr));
    let (out, _) = run(tmp.path(), &[&image, "-u", "1234:5678", "--", "sh", "-c", "echo $(id -u):$(id -g)"]);
    assert_eq!(text(&out.stdout).trim(), "1234:5678", "{}", text(&out.stderr));
    let (out, prefix) = run(tmp.path(), &[&image, "-u", "no-such-user", "--", "true"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no-such-user"), "{}", text(&out.stderr));
    assert_cleaned_up(&prefix);
}

#[test]
fn optimize_records_the_startup_set_and_lays_it_out_first() {
    if !fuse_available() {
        return;
    }
    let deb = debian_image();
    let dir = tempdir();
    let src = format!("oci:{}:latest", deb.layout.display());
    let dst = format!("oci:{}:opt", dir.path().join("out").display());
    let trace = dir.path().join("trace.jsonl");
    let out = naiad()
        .args(["optimize", "--quiet", "--json", "--timeout", "120", "--trace", trace.to_str().unwrap(), &src, &dst, "--", "python3", "-c", "import json; print(42)"])
        .stdin(Stdio::null())
        .output()
        .expect("naiad optimize");
    assert!(out.status.success(), "optimize failed: {}", text(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&trace).unwrap().lines().map(|l| serde_json::from_str(l).expect("trace record")).collect();
    assert!(records.iter().any(|r| r["path"].as_str().unwrap().starts_with("/usr/bin/python3")), "python's binary is in the trace");
    assert!(records.iter().any(|r| r["path"].as_str().unwrap().contains("/json/")), "the json package is in the trace");
    let inspect: serde_json::Value = serde_json::from_str(&check(naiad().args(["inspect", "--json", &dst]))).unwrap();
    assert!(inspect["prefetch_chunks"].as_u64().unwrap() > 10, "{inspect}");
    assert_eq!(inspect["blobs"].as_array().unwrap().len() as u64, summary["blobs"].as_u64().unwrap());
    check(naiad().args(["check", &dst]));

    // A workload that does not exit is stopped at --timeout; what it read counts.
    let t = std::time::Instant::now();
    let trace2 = dir.path().join("trace2.jsonl");
    let out = naiad()
        .args([
            "optimize",
            "--quiet",
            "--timeout",
            "3",
            "--trace",
            trace2.to_str().unwrap(),
            &src,
            &format!("oci:{}:opt2", dir.path().join("out").display()),
            "--",
            "sh",
            "-c",
            "cat /etc/os-release >/dev/null; sleep 600",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("naiad optimize");
    assert!(out.status.success(), "optimize failed: {}", text(&out.stderr));
    assert!(t.elapsed() < std::time::Duration::from_secs(90), "the workload was stopped");
    assert!(std::fs::read_to_string(&trace2).unwrap().contains("\"/usr/lib/os-release\""), "the symlink target is what was read");
}

/// The image's config is read while the daemon mounts it: when the image
/// cannot be opened, the error names it and what is wrong, and nothing is
/// left behind.
#[test]
fn an_image_that_cannot_be_opened_fails_naming_it() {
    if !fuse_available() {
        return;
    }
    let tmp = tempdir();
    let missing = format!("oci:{}:latest", tmp.path().join("no-such-layout").display());
    let (out, prefix) = run(tmp.path(), &[&missing, "--", "true"]);
    assert!(!out.status.success(), "naiad run of a missing image exited {}", out.status);
    let err = text(&out.stderr);
    assert!(err.contains(&format!("opening image {missing}")), "{err}");
    assert_cleaned_up(&prefix);
}

#[test]
fn a_stop_signal_during_setup_leaves_nothing_behind() {
    if !fuse_available() {
        return;
    }
    let debian = debian_image();
    let tmp = tempdir();
    let image = convert(&debian.layout, "latest", &tmp.path().join("naiad"));
    let run_dir = tmp.path().join("run");
    for delay_ms in [0u64, 20, 60] {
        let child = naiad()
            .arg("run")
            .arg("--cache-dir")
            .arg(tmp.path().join("cache"))
            .arg("--run-dir")
            .arg(&run_dir)
            .args([&image, "--", "sleep", "30"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn naiad run");
        let pid = child.id();
        // Once the supervisor exists, the mount is being set up.
        assert!(
            wait_until(std::time::Duration::from_secs(60), || std::fs::read_dir(&run_dir).is_ok_and(|d| d.flatten().any(|e| e.path().extension().is_some_and(|x| x == "pid")))),
            "no supervisor started"
        );
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        // SAFETY: kill(2) of the naiad run this test started.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
        let out = child.wait_with_output().expect("wait for naiad run");
        assert!(!out.status.success(), "naiad run was stopped, yet exited {}", out.status);
        assert_cleaned_up(Path::new(&format!("/tmp/naiad-run-{pid}-")));
        let left = run_dir_leftovers(&run_dir);
        assert!(left.is_empty(), "files left in the run directory after SIGTERM {delay_ms} ms into the setup: {left:?}");
    }
}

#[test]
fn the_container_is_isolated_like_a_docker_one() {
    if !fuse_available() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let debian = debian_image();
    let tmp = tempdir();
    let image = convert(&debian.layout, "latest", &tmp.path().join("naiad"));
    let secret_dir = tmp.path().join("host-secret");
    std::fs::create_dir(&secret_dir).unwrap();
    std::fs::write(secret_dir.join("secret"), "HOST-SECRET").unwrap();
    let script = "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; \
                  echo fds: $(ls /proc/self/fd); \
                  cat /proc/self/fd/7/secret 2>/dev/null || echo no-fd-7; \
                  (echo x > /proc/sys/kernel/domainname) 2>/dev/null && echo proc-sys-writable || echo proc-sys-read-only; \
                  test -s /proc/kcore && echo kcore-visible || echo kcore-masked; \
                  (unshare -m true) 2>/dev/null && echo unshare-allowed || echo unshare-denied";
    let dir = std::fs::File::open(&secret_dir).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&dir);
    let mut cmd = naiad();
    cmd.arg("run").arg("--cache-dir").arg(tmp.path().join("cache")).arg("--run-dir").arg(tmp.path().join("run")).args([&image, "--", "sh", "-c", script]);
    // SAFETY: dup2 in the child: the descriptor naiad run inherits as fd 7.
    unsafe {
        cmd.pre_exec(move || if libc::dup2(fd, 7) < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
    }
    let out = cmd.stdin(Stdio::null()).output().expect("naiad run");
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    for want in ["CapEff:\t00000000a80425fb", "NoNewPrivs:\t1", "Seccomp:\t2", "no-fd-7", "proc-sys-read-only", "kcore-masked", "unshare-denied"] {
        assert!(stdout.lines().any(|l| l.trim_end() == want), "missing {want:?} in:\n{stdout}");
    }
    let fds: Vec<&str> = stdout.lines().find_map(|l| l.strip_prefix("fds: ")).expect("fd list").split_whitespace().collect();
    // 0, 1, 2, and the directory ls itself has open.
    assert!(fds.len() <= 4 && fds.iter().all(|f| ["0", "1", "2", "3"].contains(f)), "descriptors in the container: {fds:?}");
    assert!(!stdout.contains("HOST-SECRET"));
}
