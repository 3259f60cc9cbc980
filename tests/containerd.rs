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
        eprintln!("skipping: containerd, ctr, runc not installed (scripts/install-test-deps.sh installs them)");
        return false;
    }
    true
}

/// Converts the Debian python3 fixture into `docker://HOST/REPO:TAG`.
fn push_naiad_image(reg: &Distribution, repo_tag: &str) -> String {
    let deb = debian_image();
    let image = format!("{}/{repo_tag}", reg.host());
    let out = naiad().args(["convert", &format!("oci:{}:latest", deb.layout.display()), &format!("docker://{image}"), "--quiet"]).output().expect("naiad convert");
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

/// Mounts the rootfs of container `id` (its snapshot's mounts, as
/// containerd gives them to the runtime) on `target` and compares it with
/// the reference unpack of the fixture image.
fn assert_rootfs_is_the_reference(node: &Node, ns: &str, id: &str, target: &Path) {
    std::fs::create_dir_all(target).unwrap();
    let cmd = node.ctr_ok(&["-n", ns, "snapshots", "--snapshotter", "naiad", "mounts", &target.display().to_string(), id]);
    let st = Command::new("sh").arg("-c").arg(cmd.trim()).status().expect("mount the container's rootfs");
    assert!(st.success(), "{cmd}");
    let deb = debian_image();
    let diffs = compare_trees(&deb.reference_rootfs, target, &CompareOptions::default());
    let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
    assert!(diffs.is_empty(), "container rootfs differs from the reference unpack:\n{}", diffs.join("\n"));
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

    let out = node.ctr(&["-n", NAMESPACE, "run", "--rm", "--snapshotter", "naiad", &image, "c-print", "python3", "-c", "print(6*7)"]);
    assert!(out.status.success(), "ctr run: {}\n--- snapshotter:\n{}", String::from_utf8_lossy(&out.stderr), tail(&node.snapshotter_log(), 30));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    let out = node.ctr(&["-n", NAMESPACE, "run", "--rm", "--snapshotter", "naiad", &image, "c-exit", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "exit status: {}", String::from_utf8_lossy(&out.stderr));
    // `--rm` removed the containers, not the image's mount.
    assert_eq!(node.naiad_mounts().len(), 1);

    let s = image_mount_stats(&node);
    let (fetched, blobs) = (s["counters"]["store_bytes"].as_u64().unwrap(), s["blob_bytes"].as_u64().unwrap());
    eprintln!("two containers fetched {fetched} of {blobs} blob bytes");
    assert!(fetched * 2 < blobs, "fetched {fetched} of {blobs} blob bytes: {s}");

    node.ctr_ok(&["-n", NAMESPACE, "containers", "create", "--snapshotter", "naiad", &image, "c-rootfs"]);
    assert_rootfs_is_the_reference(&node, NAMESPACE, "c-rootfs", &node.dir.path().join("rootfs"));
    node.ctr_ok(&["-n", NAMESPACE, "containers", "rm", "c-rootfs"]);

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
}
