//! Cold start through containerd: `cargo bench --bench cri` (as root;
//! needs FUSE, containerd, runc, docker-registry, skopeo).
//!
//! The Debian bookworm + python3 image, converted by naiad, on a real
//! Distribution registry behind an emulated 100 Mbit/s, 20 ms RTT link
//! (the user-space link emulator of the startup benchmark). Each round,
//! from empty caches, alternately:
//!   (a) `naiad run docker://.../python:naiad -- CMD`;
//!   (b) a private containerd with `naiad snapshotter` as its proxy plugin:
//!       CRI PullImage (as a kubelet sends it), then `ctr -n k8s.io run
//!       --rm --snapshotter naiad IMAGE ID CMD`, timed from the pull to the
//!       command's exit (containerd's own start is not counted).
//! Medians of 3 rounds, with the bytes and requests that crossed the link.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/containerd_support/mod.rs"]
mod containerd_support;
#[path = "support/link_emulator.rs"]
mod link_emulator;
#[path = "../tests/common/registry_server.rs"]
mod registry_server;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use containerd_support::{Node, NAMESPACE};
use link_emulator::{LinkEmulator, LinkParams};
use registry_server::{Distribution, RegistryAuth};

const CMD: &[&str] = &["python3", "-c", "import json, asyncio, urllib.request, email.parser; print(42)"];
const ROUNDS: usize = 3;

fn main() {
    let deb = common::debian_image();
    let registry = Distribution::start(RegistryAuth::None, None);
    let host = registry.host();
    let out =
        common::naiad().args(["convert", "--quiet", &format!("oci:{}:latest", deb.layout.display()), &format!("docker://{host}/python:naiad")]).output().expect("naiad convert");
    assert!(out.status.success(), "convert: {}", String::from_utf8_lossy(&out.stderr));
    let upstream: SocketAddr = host.parse().expect("registry address");
    let link = LinkEmulator::start(upstream, LinkParams { bits_per_second: 100_000_000, rtt: Duration::from_millis(20) }).expect("link emulator");
    let via = link.addr.to_string();
    let image = format!("{via}/python:naiad");

    let (mut run_s, mut cri_s, mut pull_s) = (Vec::new(), Vec::new(), Vec::new());
    let (mut run_traffic, mut cri_traffic) = ((0, 0), (0, 0));
    for round in 0..ROUNDS {
        // (a) naiad run, cold.
        let dir = tempfile::Builder::new().prefix("naiad-bench-cri-run-").tempdir_in("/tmp").expect("dir");
        link.counters.reset();
        let t = Instant::now();
        let out = common::naiad()
            .arg("run")
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .arg(format!("docker://{image}"))
            .arg("--")
            .args(CMD)
            .stdin(Stdio::null())
            .output()
            .expect("naiad run");
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "naiad run: {}", String::from_utf8_lossy(&out.stderr));
        let (down, _, requests) = link.counters.snapshot();
        run_traffic = (down, requests);
        run_s.push(secs);

        // (b) CRI pull + ctr run on a fresh node.
        let node = Node::start(&[&via]);
        link.counters.reset();
        let t = Instant::now();
        node.cri_pull(&image, None).unwrap_or_else(|e| panic!("CRI pull: {e}"));
        let pulled = t.elapsed().as_secs_f64();
        let id = format!("bench-{round}");
        let mut args = vec!["-n", NAMESPACE, "run", "--rm", "--snapshotter", "naiad", &image, &id];
        args.extend_from_slice(CMD);
        let out = node.ctr(&args);
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "ctr run: {}", String::from_utf8_lossy(&out.stderr));
        let (down, _, requests) = link.counters.snapshot();
        cri_traffic = (down, requests);
        cri_s.push(secs);
        pull_s.push(pulled);
        eprintln!("round {round}: naiad run {:.3} s; CRI pull {pulled:.3} s + ctr run = {secs:.3} s", run_s[round]);
        drop(node);
    }
    let (run, cri) = (common::median(run_s), common::median(cri_s));
    println!("\nCold start of `{}` over 100 Mbit/s, 20 ms RTT (medians of {ROUNDS}, one run)\n", CMD.join(" "));
    println!("| method | seconds | vs naiad run | MB fetched (last round) | requests |");
    println!("|---|---|---|---|---|");
    println!("| naiad run | {run:.3} | 1.00x | {:.2} | {} |", run_traffic.0 as f64 / 1e6, run_traffic.1);
    println!("| CRI pull ({:.3} s) + ctr run, naiad snapshotter | {cri:.3} | {:.2}x | {:.2} | {} |", common::median(pull_s), cri / run, cri_traffic.0 as f64 / 1e6, cri_traffic.1);
    drop(registry);
}
