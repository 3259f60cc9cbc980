//! naiad under a real containerd (Debian's 1.6, private instance) with
//! `naiad snapshotter` as its proxy plugin: images pulled through CRI as a
//! kubelet pulls them, containers started with `ctr run --snapshotter
//! naiad`, images served by the real Distribution registry.

mod common;
mod containerd_support;
mod mount_support;
#[path = "common/registry_server.rs"]
mod registry_server;

use std::path::Path;
use std::process::Command;

use common::*;
use containerd_support::*;
use mount_support::fuse_available;
use registry_server::{Distribution, RegistryAuth};

fn available() -> bool {
    if !fuse_available() {
        return false;
    }
    if !containerd_available() {
        return cannot_run("containerd, ctr, runc not installed (scripts/install-test-deps.sh installs them)");
    }
    true
}

/// Converts the Debian python3 fixture into `docker://HOST/REPO:TAG`.
fn push_naiad_image(reg: &Distribution, repo_tag: &str) -> String {
    push_naiad_image_with(reg, repo_tag, &[])
}

/// [`push_naiad_image`] with more `naiad convert` arguments.
fn push_naiad_image_with(reg: &Distribution, repo_tag: &str, extra: &[&str]) -> String {
    let deb = debian_image();
    let image = format!("{}/{repo_tag}", reg.host());
    let out = naiad().args(["convert", &format!("oci:{}:latest", deb.layout.display()), &format!("docker://{image}"), "--quiet"]).args(extra).output().expect("naiad convert");
    assert!(out.status.success(), "convert: {}", String::from_utf8_lossy(&out.stderr));
    image
}

/// The counters of the one image mount of `node`.
fn image_mount_stats(node: &Node) -> serde_json::Value {
    let mounts = node.naiad_mounts();
    assert_eq!(mounts.len(), 1, "one naiad mount per image: {mounts:?}");
    let out = naiad().arg("stats").arg("--json").arg("--run-dir").arg(node.snapshotter_root.join("run")).arg(&mounts[0]).output().expect("naiad stats");
    assert!(out.status.success(), "naiad stats: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("stats json")
}

/// Creates container `c-rootfs` of `image` in namespace `ns`, mounts its
/// rootfs (its snapshot's mounts, as containerd gives them to the runtime)
/// and compares it with the reference unpack of the fixture image; then
/// removes the container.
fn assert_rootfs_is_the_reference(node: &Node, ns: &str, image: &str) {
    node.ctr_ok(&["-n", ns, "containers", "create", "--snapshotter", "naiad", image, "c-rootfs"]);
    let target = node.dir.path().join("rootfs");
    std::fs::create_dir_all(&target).unwrap();
    let cmd = node.ctr_ok(&["-n", ns, "snapshots", "--snapshotter", "naiad", "mounts", &target.display().to_string(), "c-rootfs"]);
    let st = Command::new("sh").arg("-c").arg(cmd.trim()).status().expect("mount the container's rootfs");
    assert!(st.success(), "{cmd}");
    let deb = debian_image();
    let diffs = compare_trees(&deb.reference_rootfs, &target, &CompareOptions::default());
    let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
    assert!(diffs.is_empty(), "container rootfs differs from the reference unpack:\n{}", diffs.join("\n"));
    node.ctr_ok(&["-n", ns, "containers", "rm", "c-rootfs"]);
}

/// The checks both pulls (CRI, `naiad pull`) must pass in namespace `ns`:
/// `print(6*7)` prints 42, `exit 7` exits 7, `--rm` leaves the image mount,
/// those two containers fetched less than half of the blobs, and a
/// container's rootfs is the reference unpack.
fn assert_image_runs_lazily(node: &Node, ns: &str, image: &str) {
    let run = |id: &str, cmd: &[&str]| {
        let mut args = vec!["-n", ns, "run", "--rm", "--snapshotter", "naiad", image, id];
        args.extend_from_slice(cmd);
        node.ctr(&args)
    };
    let out = run("c-print", &["python3", "-c", "print(6*7)"]);
    assert!(out.status.success(), "ctr run: {}\n--- snapshotter:\n{}", String::from_utf8_lossy(&out.stderr), tail(&node.snapshotter_log(), 30));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let out = run("c-exit", &["sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "exit status: {}", String::from_utf8_lossy(&out.stderr));
    // `--rm` removed the containers, not the image's mount.
    assert_eq!(node.naiad_mounts().len(), 1);

    let s = image_mount_stats(node);
    let (fetched, blobs) = (s["counters"]["store_bytes"].as_u64().unwrap(), s["blob_bytes"].as_u64().unwrap());
    eprintln!("two containers fetched {fetched} of {blobs} blob bytes");
    assert!(fetched * 2 < blobs, "fetched {fetched} of {blobs} blob bytes: {s}");

    assert_rootfs_is_the_reference(node, ns, image);
}

#[test]
fn cri_pull_runs_a_naiad_image_lazily() {
    if !available() {
        return;
    }
    let reg = Distribution::start(RegistryAuth::None, None);
    let image = push_naiad_image(&reg, "py:naiad");
    let node = Node::start(&[&reg.host()]);

    let pulled = node.cri_pull(&image, None);
    assert!(pulled.is_ok(), "CRI pull: {pulled:?}\n--- snapshotter:\n{}\n--- containerd:\n{}", tail(&node.snapshotter_log(), 30), tail(&node.containerd_log(), 30));
    assert_eq!(node.naiad_mounts().len(), 1, "the pull mounted the image once");

    assert_image_runs_lazily(&node, NAMESPACE, &image);

    // Removing the image removes its snapshots (containerd's GC), the
    // mount and its daemon.
    node.cri_remove(&image).expect("CRI remove");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while (!node.naiad_mounts().is_empty() || !node.snapshots(NAMESPACE).is_empty()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(node.snapshots(NAMESPACE).is_empty(), "snapshots left: {:?}", node.snapshots(NAMESPACE));
    assert!(node.naiad_mounts().is_empty(), "mounts left: {:?}", node.naiad_mounts());
    assert!(node.daemons().is_empty(), "daemons left: {:?}", node.daemons());
    let cache = dir_bytes(&node.dir.path().join("cache"));
    assert!(cache <= 1 << 30, "the cache ({cache} bytes) stays within its configured 1G cap");
}

/// Bytes of the regular files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    regular_files(dir).iter().map(|(_, len)| len).sum()
}

#[test]
fn an_ordinary_image_runs_through_the_same_snapshotter() {
    if !available() {
        return;
    }
    let reg = Distribution::start(RegistryAuth::None, None);
    let deb = debian_image();
    let image = format!("{}/py:oci", reg.host());
    registry_server::skopeo_copy(&format!("oci:{}:latest", deb.layout.display()), &format!("docker://{image}"), &[]);
    let node = Node::start(&[&reg.host()]);
    node.cri_pull(&image, None).unwrap_or_else(|e| panic!("CRI pull: {e}\n{}", tail(&node.snapshotter_log(), 30)));
    assert!(node.naiad_mounts().is_empty(), "an ordinary image needs no naiad mount");
    let out = node.ctr(&["-n", NAMESPACE, "run", "--rm", "--snapshotter", "naiad", &image, "c-oci", "python3", "-c", "print(6*7)"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "ctr run: {}", String::from_utf8_lossy(&out.stderr));
    assert_rootfs_is_the_reference(&node, NAMESPACE, &image);
}

#[test]
fn a_restarted_snapshotter_keeps_snapshots_mounts_and_running_containers() {
    if !available() {
        return;
    }
    let reg = Distribution::start(RegistryAuth::None, None);
    let image = push_naiad_image(&reg, "py:restart");
    let mut node = Node::start(&[&reg.host()]);
    node.cri_pull(&image, None).unwrap_or_else(|e| panic!("CRI pull: {e}"));
    node.ctr_ok(&["-n", NAMESPACE, "run", "-d", "--snapshotter", "naiad", &image, "c-long", "sleep", "600"]);
    let snapshots = node.snapshots(NAMESPACE);
    let daemons = node.daemons();
    assert!(!daemons.is_empty(), "the image mount has its daemon");

    node.kill_snapshotter();
    // The running container reads through the image mount meanwhile.
    let exec = |node: &Node, id: &str| node.ctr(&["-n", NAMESPACE, "tasks", "exec", "--exec-id", id, "c-long", "python3", "-c", "import json; print(6*7)"]);
    let out = exec(&node, "e1");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "exec with the snapshotter down: {}", String::from_utf8_lossy(&out.stderr));

    node.start_snapshotter();
    assert_eq!(node.snapshots(NAMESPACE), snapshots, "the same snapshots after a restart");
    let out = exec(&node, "e2");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let out = node.ctr(&["-n", NAMESPACE, "run", "--rm", "--snapshotter", "naiad", &image, "c-new", "python3", "-c", "print(6*7)"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "new container after restart: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(node.daemons(), daemons, "no new daemon: the restarted snapshotter reattached to the running one");
    assert!(node.snapshotter_log().contains("served"), "{}", node.snapshotter_log());
}

#[test]
fn bad_input_gets_clear_errors_and_the_snapshotter_stays_up() {
    if !available() {
        return;
    }
    let reg = Distribution::start(RegistryAuth::None, None);
    let good = push_naiad_image(&reg, "py:good");
    // containerd reaches `unreachable.invalid:5000` through a mirror the
    // snapshotter does not know: to it, that registry is unreachable.
    let endpoint = format!("http://{}", reg.host());
    let node = Node::start_with_mirrors(&[&reg.host()], &[("unreachable.invalid:5000", &endpoint)]);
    let e = node.cri_pull(&good.replace(&reg.host(), "unreachable.invalid:5000"), None).expect_err("unreachable for the snapshotter");
    eprintln!("unreachable for the snapshotter: {e}");
    assert!(e.contains("unreachable.invalid:5000") && e.contains("image"), "{e}");
    assert!(node.snapshotter_log().contains("unreachable.invalid"), "the snapshotter logs it");

    // An image that is not there; a registry unreachable for containerd.
    let e = node.cri_pull(&format!("{}/py:missing", reg.host()), None).expect_err("missing tag");
    assert!(e.contains("not found"), "{e}");
    let e = node.cri_pull("127.0.0.1:1/py:x", None).expect_err("unreachable");
    assert!(e.contains("127.0.0.1:1") && e.contains("refused"), "{e}");

    // A corrupt bootstrap: its blob in the registry's storage overwritten.
    // (Converted otherwise than the good image, so no blob is shared.)
    let corrupt = push_naiad_image_with(&reg, "py:corrupt", &["--small-files", "0"]);
    let manifest: serde_json::Value = serde_json::from_slice(&registry_get(&reg, "py", "corrupt")).unwrap();
    let bootstrap = manifest["layers"].as_array().unwrap().iter().find(|l| l["mediaType"].as_str().unwrap().contains("bootstrap")).unwrap()["digest"].as_str().unwrap().to_string();
    let hex = bootstrap.trim_start_matches("sha256:");
    let data = reg.storage_dir().join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]));
    let len = std::fs::metadata(&data).unwrap().len() as usize;
    std::fs::write(&data, vec![0x5a; len]).unwrap();
    let e = node.cri_pull(&corrupt, None).expect_err("corrupt bootstrap");
    assert!(e.contains("mounting image") && e.contains("does not match its digest"), "{e}");
    assert!(!e.contains(" INFO "), "the error is the daemon's error, not its log: {e}");
    assert!(node.snapshotter_log().contains("mounting image"), "the snapshotter logs it too");
    assert!(node.naiad_mounts().is_empty(), "no mount is left for the corrupt image");

    // Still serving: a good image pulls and runs.
    node.cri_pull(&good, None).unwrap_or_else(|e| panic!("good pull after bad ones: {e}"));
    let out = node.ctr(&["-n", NAMESPACE, "run", "--rm", "--snapshotter", "naiad", &good, "c-ok", "python3", "-c", "print(6*7)"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    // A second snapshotter on the same socket; a malformed config.
    let out = naiad().arg("snapshotter").arg("--config").arg(&node.snapshotter_config).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already in use") && err.contains("snapshotter.sock"), "{err}");
    let bad = node.dir.path().join("bad.toml");
    std::fs::write(&bad, "root = \"/tmp/x\"\n[cache]\nsize = \"huge\"\n").unwrap();
    let out = naiad().arg("snapshotter").arg("--config").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("cache.size"), "{err}");
    let out = node.ctr(&["-n", NAMESPACE, "run", "--rm", "--snapshotter", "naiad", &good, "c-ok2", "true"]);
    assert!(out.status.success(), "the first snapshotter still serves: {}", String::from_utf8_lossy(&out.stderr));
}

/// The raw manifest of `repo:tag` (skopeo inspect --raw).
fn registry_get(reg: &Distribution, repo: &str, tag: &str) -> Vec<u8> {
    let out = Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false"]).arg(format!("docker://{}/{repo}:{tag}", reg.host())).output().expect("skopeo inspect");
    assert!(out.status.success(), "skopeo inspect: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

#[test]
fn naiad_pull_into_plain_containerd_then_ctr_run() {
    if !available() {
        return;
    }
    let reg = Distribution::start(RegistryAuth::None, None);
    let image = push_naiad_image(&reg, "py:pull");
    let node = Node::start(&[&reg.host()]);
    let out = naiad().arg("pull").arg("--containerd").arg(&node.socket).arg(&image).output().unwrap();
    assert!(out.status.success(), "naiad pull: {}\n{}", String::from_utf8_lossy(&out.stderr), tail(&node.snapshotter_log(), 30));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&image), "{}", String::from_utf8_lossy(&out.stdout));
    let listed = node.ctr_ok(&["images", "ls", "-q"]);
    assert!(listed.lines().any(|l| l == image), "ctr images ls: {listed}");

    assert_image_runs_lazily(&node, "default", &image);

    // Pulling again is fine; an ordinary image is refused clearly.
    let again = naiad().arg("pull").arg("--containerd").arg(&node.socket).arg(&image).output().unwrap();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let deb = debian_image();
    let plain = format!("{}/py:plain", reg.host());
    registry_server::skopeo_copy(&format!("oci:{}:latest", deb.layout.display()), &format!("docker://{plain}"), &[]);
    let out = naiad().arg("pull").arg("--containerd").arg(&node.socket).arg(&plain).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a naiad image"), "{}", String::from_utf8_lossy(&out.stderr));

    // Removing the image lets containerd's GC take the snapshots; the
    // snapshotter then releases the mount.
    node.ctr_ok(&["images", "rm", "--sync", &image]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !node.naiad_mounts().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(node.naiad_mounts().is_empty(), "mounts left: {:?}", node.naiad_mounts());
    assert!(node.snapshots("default").is_empty(), "{:?}", node.snapshots("default"));
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Pulls (CRI, with the kubelet's credentials) and runs an image of a
/// registry that wants `user:password`; the snapshotter has them from its
/// config.json. Without them the pull fails, clearly.
fn private_registry_pull_and_run(reg: &Distribution, user: &str, password: &str) {
    let creds = format!("{user}:{password}");
    let image = push_naiad_image_with(reg, "private/py:naiad", &["--creds", &creds]);
    let node = Node::start(&[&reg.host()]);

    // No credentials anywhere: containerd's own request is refused.
    let e = node.cri_pull(&image, None).expect_err("no credentials");
    assert!(e.to_lowercase().contains("authoriz") || e.contains("401"), "{e}");
    // The kubelet's credentials, but none for the snapshotter.
    let e = node.cri_pull(&image, Some((user, password))).expect_err("snapshotter without credentials");
    assert!(e.contains("private/py") && (e.contains("401") || e.to_lowercase().contains("authoriz") || e.to_lowercase().contains("credentials")), "{e}");
    assert!(node.naiad_mounts().is_empty());

    std::fs::write(node.docker_config.join("config.json"), format!(r#"{{"auths":{{"{}":{{"auth":"{}"}}}}}}"#, reg.host(), base64_of(&creds))).unwrap();
    node.cri_pull(&image, Some((user, password))).unwrap_or_else(|e| panic!("CRI pull with credentials: {e}\n{}", tail(&node.snapshotter_log(), 20)));
    let out = node.ctr(&["-n", NAMESPACE, "run", "--rm", "--snapshotter", "naiad", &image, "c-private", "python3", "-c", "print(6*7)"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "ctr run: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn private_registries_basic_and_token_auth() {
    if !available() {
        return;
    }
    let (user, password) = ("alice", "pw-basic-7d1e");
    let basic = Distribution::start(RegistryAuth::Htpasswd { user: user.into(), password: password.into() }, None);
    private_registry_pull_and_run(&basic, user, password);

    let tmp = tempfile::Builder::new().prefix("naiad-containerd-token-").tempdir_in("/tmp").unwrap();
    let key = registry_server::make_signing_key(tmp.path());
    let (user, password) = ("tokenuser", "pw-token-51c0");
    let ts = registry_server::TokenServer::start(&key, user, password, 3600);
    let token = Distribution::start(
        RegistryAuth::Token { realm: ts.realm(), service: registry_server::TOKEN_SERVICE.into(), issuer: registry_server::TOKEN_ISSUER.into(), cert_pem: key.cert_pem.clone() },
        None,
    );
    private_registry_pull_and_run(&token, user, password);
}
