//! Startup benchmark, in the manner of HelloBench: `cargo bench --bench
//! startup` (as root; needs FUSE, docker-registry, skopeo, umoci,
//! debootstrap).
//!
//! Four Debian bookworm images, built once with debootstrap and cached by
//! `scripts/build-bench-image.sh` (minbase, python3, nodejs, python3-numpy;
//! gzip layers, a shared base layer), each with its own command. Each is
//! pushed to a real CNCF Distribution registry on loopback, converted by
//! naiad, and optimized (`naiad optimize`: the command's startup reads
//! recorded and laid out first). Then, from an empty machine each time
//! (fresh caches, nothing mounted), the time to the exit of the command is
//! measured for:
//!   (a) full pull + unpack + run: `skopeo copy` to a local layout, `umoci
//!       raw unpack` onto a tmpfs, `chroot ... CMD`;
//!   (b) naiad lazy, no trace: `naiad run docker://.../NAME:naiad -- CMD`;
//!   (c) naiad optimized: the same on the optimized image (prefetch);
//! directly on loopback and over an emulated 100 Mbit/s, 20 ms RTT link (a
//! user-space TCP proxy: this kernel has no netem; bandwidth shared per
//! direction, RTT/2 each way, one RTT per new connection), with the bytes
//! and HTTP requests that crossed the link. Each figure is the median of
//! NAIAD_BENCH_RUNS runs (default 3). Output: a table on stdout, and
//! `target/naiad-bench/startup.{md,svg}` (override with NAIAD_BENCH_OUT).
//! NAIAD_BENCH_IMAGES=python3,nodejs picks images. NAIAD_BENCH_HOLD=FILE
//! sets everything up, writes the servers' addresses to FILE and waits
//! until FILE is removed, for looking at one case by hand.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/link_emulator.rs"]
mod link_emulator;
#[path = "../tests/common/registry_server.rs"]
mod registry_server;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use link_emulator::{LinkEmulator, LinkParams};
use registry_server::{skopeo_copy, Distribution, RegistryAuth};

/// The methods, in the order they run and are shown.
const METHODS: [&str; 3] = ["full pull + unpack + run", "naiad lazy, no trace", "naiad optimized (trace)"];

/// A benchmark image: its name (for `scripts/build-bench-image.sh` and the
/// registry repository), its command, and what the command prints.
struct BenchImage {
    name: &'static str,
    cmd: &'static [&'static str],
    prints: &'static str,
}

const IMAGES: [BenchImage; 4] = [
    BenchImage { name: "minbase", cmd: &["bash", "-c", "ls / >/dev/null && echo ok"], prints: "ok" },
    BenchImage { name: "python3", cmd: &["python3", "-c", "print(1)"], prints: "1" },
    BenchImage { name: "nodejs", cmd: &["node", "-e", "console.log(1)"], prints: "1" },
    BenchImage { name: "numpy", cmd: &["python3", "-c", "import numpy; print(1)"], prints: "1" },
];

struct Measure {
    image: &'static str,
    scenario: &'static str,
    method: &'static str,
    seconds: f64,
    down_bytes: u64,
    requests: u64,
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn naiad(args: &[String]) -> String {
    run_ok(common::naiad().args(args), &format!("naiad {args:?}"))
}

/// The cached layout of bench image `name`, built on first use.
fn bench_layout(name: &str) -> PathBuf {
    let out = run_ok(Command::new("bash").arg(common::repo_root().join("scripts/build-bench-image.sh")).arg(name).stderr(Stdio::inherit()), "build-bench-image.sh");
    let path = out.lines().find_map(|l| l.strip_prefix("layout: ")).unwrap_or_else(|| panic!("build-bench-image.sh {name} printed no layout: {out}"));
    PathBuf::from(path.trim())
}

/// (a): pull the whole image, unpack it onto a tmpfs, run the command in it.
fn full_pull(host: &str, image: &BenchImage, work: &Path) -> f64 {
    let layout = work.join("pulled");
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(&rootfs).expect("rootfs dir");
    run_ok(Command::new("mount").args(["-t", "tmpfs", "-o", "size=2g", "bench-rootfs"]).arg(&rootfs), "mount tmpfs");
    let t = Instant::now();
    run_ok(
        Command::new("skopeo").args(["copy", "--quiet", "--src-tls-verify=false", &format!("docker://{host}/{}:src", image.name), &format!("oci:{}:x", layout.display())]),
        "skopeo copy",
    );
    let unpacked = rootfs.join("r");
    run_ok(Command::new("umoci").args(["raw", "unpack", "--image", &format!("{}:x", layout.display())]).arg(&unpacked), "umoci raw unpack");
    let out = run_ok(Command::new("chroot").arg(&unpacked).args(image.cmd), "chroot run");
    let secs = t.elapsed().as_secs_f64();
    let _ = Command::new("umount").arg(&rootfs).status();
    assert_eq!(out.trim(), image.prints);
    secs
}

/// (b) and (c): `naiad run` straight from the registry with empty caches.
fn naiad_run(host: &str, image: &BenchImage, tag: &str, work: &Path) -> f64 {
    let mut args: Vec<String> = vec!["run".into(), "--cache-dir".into(), work.join("cache").display().to_string(), "--run-dir".into(), work.join("run").display().to_string()];
    args.extend([format!("docker://{host}/{}:{tag}", image.name), "--".into()]);
    args.extend(image.cmd.iter().map(|s| s.to_string()));
    let t = Instant::now();
    let out = naiad(&args);
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(out.trim(), image.prints);
    secs
}

/// Bytes the command read, from its trace.
fn traced_bytes(trace: &Path) -> u64 {
    std::fs::read_to_string(trace).expect("trace").lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).map(|v| v["length"].as_u64().unwrap_or(0)).sum()
}

fn median_by_seconds(mut runs: Vec<(f64, u64, u64)>) -> (f64, u64, u64) {
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    runs[runs.len() / 2]
}

fn main() {
    let out_dir = std::env::var_os("NAIAD_BENCH_OUT").map(PathBuf::from).unwrap_or_else(|| common::repo_root().join("target/naiad-bench"));
    std::fs::create_dir_all(&out_dir).expect("output dir");
    let runs: usize = std::env::var("NAIAD_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let picked: Option<Vec<String>> = std::env::var("NAIAD_BENCH_IMAGES").ok().map(|v| v.split(',').map(str::to_string).collect());
    let images: Vec<&BenchImage> = IMAGES.iter().filter(|i| picked.as_ref().is_none_or(|p| p.iter().any(|n| n == i.name))).collect();
    let registry = Distribution::start(RegistryAuth::None, None);
    let host = registry.host();
    let work = tempfile::Builder::new().prefix("naiad-bench-startup-").tempdir_in("/tmp").expect("work dir");

    // Per image: (image bytes as naiad blobs, bytes the command read).
    let mut sizes = Vec::new();
    for image in &images {
        eprintln!("startup bench: {}: building (cached), pushing, converting, optimizing", image.name);
        let layout = bench_layout(image.name);
        let repo = format!("docker://{host}/{}", image.name);
        skopeo_copy(&format!("oci:{}:latest", layout.display()), &format!("{repo}:src"), &[]);
        naiad(&["convert".into(), "--quiet".into(), format!("{repo}:src"), format!("{repo}:naiad")]);
        let trace = work.path().join(format!("{}.trace.jsonl", image.name));
        let mut opt: Vec<String> =
            vec!["optimize".into(), "--quiet".into(), "--trace".into(), trace.display().to_string(), format!("{repo}:src"), format!("{repo}:naiad-opt"), "--".into()];
        opt.extend(image.cmd.iter().map(|s| s.to_string()));
        naiad(&opt);
        let v: serde_json::Value = serde_json::from_str(&naiad(&["inspect".into(), "--json".into(), format!("{repo}:naiad")])).expect("inspect json");
        let blob_bytes: u64 = v["blobs"].as_array().map(|b| b.iter().map(|x| x["size"].as_u64().unwrap_or(0)).sum()).unwrap_or(0);
        sizes.push((image.name, blob_bytes, traced_bytes(&trace)));
    }

    let upstream: SocketAddr = host.parse().expect("registry address");
    let link = LinkEmulator::start(upstream, LinkParams { bits_per_second: 100_000_000, rtt: Duration::from_millis(20) }).expect("link emulator");
    let loopback = LinkEmulator::start(upstream, LinkParams { bits_per_second: 0, rtt: Duration::ZERO }).expect("counting proxy");
    if let Some(hold) = std::env::var_os("NAIAD_BENCH_HOLD") {
        // For looking at one case by hand: the servers stay up until the
        // file named by NAIAD_BENCH_HOLD is removed.
        std::fs::write(&hold, format!("registry {host}\nlink {}\nloopback {}\n", link.addr, loopback.addr)).expect("write NAIAD_BENCH_HOLD");
        eprintln!("startup bench: holding: registry {host}, 100 Mbit/s link {}, loopback {}; remove {} to stop", link.addr, loopback.addr, Path::new(&hold).display());
        while Path::new(&hold).exists() {
            std::thread::sleep(Duration::from_millis(500));
        }
        return;
    }
    let mut results = Vec::new();
    for (scenario, proxy) in [("loopback", &loopback), ("100 Mbit/s, 20 ms RTT", &link)] {
        let via = proxy.addr.to_string();
        for image in &images {
            for method in METHODS {
                let mut samples = Vec::new();
                for _ in 0..runs {
                    let dir = tempfile::Builder::new().prefix("naiad-bench-run-").tempdir_in("/tmp").expect("run dir");
                    proxy.counters.reset();
                    let seconds = match method {
                        "full pull + unpack + run" => full_pull(&via, image, dir.path()),
                        "naiad lazy, no trace" => naiad_run(&via, image, "naiad", dir.path()),
                        _ => naiad_run(&via, image, "naiad-opt", dir.path()),
                    };
                    let (down_bytes, _, requests) = proxy.counters.snapshot();
                    samples.push((seconds, down_bytes, requests));
                }
                let (seconds, down_bytes, requests) = median_by_seconds(samples);
                eprintln!("  {scenario:<22} {:<8} {method:<26} {seconds:.3} s, {:.2} MB, {requests} requests", image.name, down_bytes as f64 / 1e6);
                results.push(Measure { image: image.name, scenario, method, seconds, down_bytes, requests });
            }
        }
    }

    let mut md = String::new();
    let _ = writeln!(md, "Images (Debian bookworm, built by `scripts/build-bench-image.sh`), their commands, and the bytes each command read (its trace):\n");
    let _ = writeln!(md, "| image | command | naiad blobs MB | read MB |");
    let _ = writeln!(md, "|---|---|---|---|");
    for (image, (name, blobs, read)) in images.iter().zip(&sizes) {
        let _ = writeln!(md, "| {name} | `{}` | {:.1} | {:.2} |", image.cmd.join(" "), *blobs as f64 / 1e6, *read as f64 / 1e6);
    }
    let _ = writeln!(md, "\nMedian of {runs} runs each, from empty caches:\n");
    let _ = writeln!(md, "| link | image | method | seconds | vs full pull | MB fetched | fetched / read | requests |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for r in &results {
        let full = results.iter().find(|x| x.scenario == r.scenario && x.image == r.image && x.method == METHODS[0]).map(|x| x.seconds).unwrap_or(r.seconds);
        let read = sizes.iter().find(|s| s.0 == r.image).map(|s| s.2).unwrap_or(1).max(1);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.3} | {:.3}x | {:.2} | {:.2}x | {} |",
            r.scenario,
            r.image,
            r.method,
            r.seconds,
            r.seconds / full,
            r.down_bytes as f64 / 1e6,
            r.down_bytes as f64 / read as f64,
            r.requests
        );
    }
    println!("{md}");
    std::fs::write(out_dir.join("startup.md"), &md).expect("write startup.md");
    std::fs::write(out_dir.join("startup.svg"), svg(&results)).expect("write startup.svg");
    println!("wrote {} and {}", out_dir.join("startup.md").display(), out_dir.join("startup.svg").display());
    drop(registry);
}

/// A grouped horizontal bar chart of seconds, one group per link and image.
fn svg(results: &[Measure]) -> String {
    let max = results.iter().map(|r| r.seconds).fold(0.0f64, f64::max).max(0.001);
    let (left, width, bar, gap) = (230.0, 520.0, 16.0, 4.0);
    let colors = ["#9e9e9e", "#4f81bd", "#2e7d32"];
    let mut y = 50.0;
    let mut body = String::new();
    let mut group = (String::new(), String::new());
    for r in results {
        if (r.scenario, r.image) != (group.0.as_str(), group.1.as_str()) {
            group = (r.scenario.to_string(), r.image.to_string());
            y += 12.0;
            let _ = writeln!(body, r#"<text x="10" y="{y}" font-weight="bold">{}, {}</text>"#, r.image, r.scenario);
            y += 6.0;
        }
        let i = METHODS.iter().position(|m| *m == r.method).unwrap_or(0);
        let w = (r.seconds / max * width).max(1.0);
        let _ = writeln!(body, r#"<text x="20" y="{}" font-size="12">{}</text>"#, y + bar * 0.75, r.method);
        let _ = writeln!(body, r#"<rect x="{left}" y="{y}" width="{w:.1}" height="{bar}" fill="{}"/>"#, colors[i]);
        let _ = writeln!(body, r#"<text x="{:.1}" y="{}" font-size="12">{:.2} s, {:.1} MB</text>"#, left + w + 6.0, y + bar * 0.75, r.seconds, r.down_bytes as f64 / 1e6);
        y += bar + gap;
    }
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="900" height="{h}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="24" font-size="16" font-weight="bold">Cold start to the command's exit (seconds, median; lower is better)</text>
{body}</svg>
"#,
        h = y + 20.0
    )
}
