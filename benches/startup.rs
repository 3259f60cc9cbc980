//! Startup benchmark, in the manner of HelloBench: `cargo bench --bench
//! startup` (as root; needs FUSE, overlayfs, docker-registry, skopeo, umoci).
//!
//! A Debian bookworm + python3 image (debootstrap-built) is pushed to a real
//! CNCF Distribution registry on loopback, converted by naiad, and optimized
//! (`naiad optimize`: the command's startup reads recorded and laid out
//! first). Then, from an empty machine each time, the time to the exit of
//! the command is measured for:
//!   (a) full pull + unpack + run: `skopeo copy` to a local layout, `umoci
//!       raw unpack`, `chroot ... CMD`;
//!   (b) naiad lazy: `naiad run docker://.../python:naiad -- CMD`;
//!   (c) naiad lazy + prefetch: the same on the optimized image;
//!   (b) and (c) also with `--read-ahead-max 0` (no sequential read-ahead);
//! directly on loopback and over an emulated 100 Mbit/s, 20 ms RTT link (a
//! user-space proxy: this kernel has no netem), with the bytes and HTTP
//! requests that crossed the link. Output: a table on stdout, and
//! `target/naiad-bench/startup.{md,svg}` (override with NAIAD_BENCH_OUT).

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
const METHODS: [&str; 5] = ["full pull + unpack + run", "naiad lazy", "naiad lazy, no read-ahead", "naiad lazy + prefetch", "naiad lazy + prefetch, no read-ahead"];
/// `naiad run` without the daemon's sequential read-ahead.
const NO_READ_AHEAD: &[&str] = &["--read-ahead-max", "0"];

const CMD: &[&str] = &["python3", "-c", "import json, asyncio, urllib.request, email.parser; print(42)"];

struct Measure {
    scenario: &'static str,
    method: &'static str,
    seconds: f64,
    down_bytes: u64,
    requests: u64,
}

fn naiad(args: &[&str]) -> String {
    let out = common::naiad().args(args).stdin(Stdio::null()).output().expect("run naiad");
    assert!(out.status.success(), "naiad {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (a): pull the whole image, unpack it, run the command in it.
fn full_pull(host: &str, work: &Path) -> f64 {
    let layout = work.join("pulled");
    let rootfs = work.join("rootfs");
    let t = Instant::now();
    run_ok(
        Command::new("skopeo").args(["copy", "--quiet", "--src-tls-verify=false", &format!("docker://{host}/python:src"), &format!("oci:{}:x", layout.display())]),
        "skopeo copy",
    );
    run_ok(Command::new("umoci").args(["raw", "unpack", "--image", &format!("{}:x", layout.display())]).arg(&rootfs), "umoci raw unpack");
    let out = run_ok(Command::new("chroot").arg(&rootfs).args(CMD), "chroot run");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(out.trim(), "42");
    secs
}

/// (b) and (c): `naiad run` straight from the registry with empty caches.
fn naiad_run(host: &str, tag: &str, work: &Path, extra: &[&str]) -> f64 {
    let image = format!("docker://{host}/python:{tag}");
    let cache = work.join(format!("cache-{tag}"));
    let run_dir = work.join("run");
    let t = Instant::now();
    let mut args = vec!["run".to_string(), "--cache-dir".into(), cache.display().to_string(), "--run-dir".into(), run_dir.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend([image, "--".into()]);
    args.extend(CMD.iter().map(|s| s.to_string()));
    let out = common::naiad().args(&args).stdin(Stdio::null()).output().expect("naiad run");
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "naiad run: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    secs
}

fn main() {
    let out_dir = std::env::var_os("NAIAD_BENCH_OUT").map(PathBuf::from).unwrap_or_else(|| common::repo_root().join("target/naiad-bench"));
    std::fs::create_dir_all(&out_dir).expect("output dir");
    let deb = common::debian_image();
    let registry = Distribution::start(RegistryAuth::None, None);
    let host = registry.host();
    let work = tempfile::Builder::new().prefix("naiad-bench-startup-").tempdir_in("/tmp").expect("work dir");

    eprintln!("startup bench: pushing, converting and optimizing the image");
    skopeo_copy(&format!("oci:{}:latest", deb.layout.display()), &format!("docker://{host}/python:src"), &[]);
    naiad(&["convert", "--quiet", &format!("docker://{host}/python:src"), &format!("docker://{host}/python:naiad")]);
    let trace = work.path().join("trace.jsonl");
    let mut opt = vec![
        "optimize".to_string(),
        "--quiet".into(),
        "--trace".into(),
        trace.display().to_string(),
        format!("docker://{host}/python:src"),
        format!("docker://{host}/python:naiad-opt"),
        "--".into(),
    ];
    opt.extend(CMD.iter().map(|s| s.to_string()));
    let opt_refs: Vec<&str> = opt.iter().map(String::as_str).collect();
    naiad(&opt_refs);
    let read_bytes: u64 =
        std::fs::read_to_string(&trace).expect("trace").lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).map(|v| v["length"].as_u64().unwrap_or(0)).sum();
    let image_bytes: u64 = {
        let v: serde_json::Value = serde_json::from_str(&naiad(&["inspect", "--json", &format!("docker://{host}/python:naiad")])).expect("inspect json");
        v["blobs"].as_array().map(|b| b.iter().map(|x| x["size"].as_u64().unwrap_or(0)).sum()).unwrap_or(0)
    };

    let upstream: SocketAddr = host.parse().expect("registry address");
    let link = LinkEmulator::start(upstream, LinkParams { bits_per_second: 100_000_000, rtt: Duration::from_millis(20) }).expect("link emulator");
    let loopback = LinkEmulator::start(upstream, LinkParams { bits_per_second: 0, rtt: Duration::ZERO }).expect("counting proxy");
    let mut results = Vec::new();
    for (scenario, proxy) in [("loopback", &loopback), ("100 Mbit/s, 20 ms RTT", &link)] {
        let via = proxy.addr.to_string();
        for method in METHODS {
            let dir = tempfile::Builder::new().prefix("naiad-bench-run-").tempdir_in("/tmp").expect("run dir");
            proxy.counters.reset();
            let seconds = match method {
                "full pull + unpack + run" => full_pull(&via, dir.path()),
                "naiad lazy" => naiad_run(&via, "naiad", dir.path(), &[]),
                "naiad lazy, no read-ahead" => naiad_run(&via, "naiad", dir.path(), NO_READ_AHEAD),
                "naiad lazy + prefetch" => naiad_run(&via, "naiad-opt", dir.path(), &[]),
                _ => naiad_run(&via, "naiad-opt", dir.path(), NO_READ_AHEAD),
            };
            let (down_bytes, _, requests) = proxy.counters.snapshot();
            eprintln!("  {scenario:<24} {method:<26} {seconds:.3} s, {:.2} MB, {requests} requests", down_bytes as f64 / 1e6);
            results.push(Measure { scenario, method, seconds, down_bytes, requests });
        }
    }

    let mut md = String::new();
    let _ = writeln!(
        md,
        "Command: `{}`. Image: Debian bookworm + python3, {:.1} MB of naiad blobs; the command read {:.2} MB of it (its trace).\n",
        CMD.join(" "),
        image_bytes as f64 / 1e6,
        read_bytes as f64 / 1e6
    );
    let _ = writeln!(md, "| link | method | seconds | vs full pull | MB fetched | fetched / read | requests |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for r in &results {
        let full = results.iter().find(|x| x.scenario == r.scenario && x.method.starts_with("full")).map(|x| x.seconds).unwrap_or(r.seconds);
        let _ = writeln!(
            md,
            "| {} | {} | {:.3} | {:.3}x | {:.2} | {:.2}x | {} |",
            r.scenario,
            r.method,
            r.seconds,
            r.seconds / full,
            r.down_bytes as f64 / 1e6,
            r.down_bytes as f64 / read_bytes.max(1) as f64,
            r.requests
        );
    }
    println!("{md}");
    std::fs::write(out_dir.join("startup.md"), &md).expect("write startup.md");
    std::fs::write(out_dir.join("startup.svg"), svg(&results)).expect("write startup.svg");
    println!("wrote {} and {}", out_dir.join("startup.md").display(), out_dir.join("startup.svg").display());
    drop(registry);
}

/// A grouped horizontal bar chart of seconds, one group per link.
fn svg(results: &[Measure]) -> String {
    let max = results.iter().map(|r| r.seconds).fold(0.0f64, f64::max).max(0.001);
    let (left, width, bar, gap) = (230.0, 520.0, 22.0, 6.0);
    let colors = ["#9e9e9e", "#4f81bd", "#9fb7d9", "#2e7d32", "#8fc492"];
    let mut y = 50.0;
    let mut body = String::new();
    let mut scenario = "";
    for r in results {
        if r.scenario != scenario {
            scenario = r.scenario;
            y += 14.0;
            let _ = writeln!(body, r#"<text x="10" y="{y}" font-weight="bold">{}</text>"#, scenario);
            y += 8.0;
        }
        let i = METHODS.iter().position(|m| *m == r.method).unwrap_or(0);
        let w = (r.seconds / max * width).max(1.0);
        let _ = writeln!(body, r#"<text x="20" y="{}" font-size="13">{}</text>"#, y + bar * 0.7, r.method);
        let _ = writeln!(body, r#"<rect x="{left}" y="{y}" width="{w:.1}" height="{bar}" fill="{}"/>"#, colors[i]);
        let _ = writeln!(body, r#"<text x="{:.1}" y="{}" font-size="13">{:.2} s, {:.1} MB</text>"#, left + w + 6.0, y + bar * 0.7, r.seconds, r.down_bytes as f64 / 1e6);
        y += bar + gap;
    }
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="900" height="{h}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="24" font-size="16" font-weight="bold">Cold start to exit of `{cmd}` (seconds; lower is better)</text>
{body}</svg>
"#,
        h = y + 20.0,
        cmd = CMD[0]
    )
}
