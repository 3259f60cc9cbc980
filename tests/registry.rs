//! naiad against a real OCI registry (CNCF Distribution, started per test
//! on 127.0.0.1): convert from and to `docker://`, unpack/check/inspect
//! lazily over HTTP range reads, with anonymous, Basic and token auth,
//! docker config credentials, a pull-through mirror, injected network
//! faults, registry outages and bad input. Images are pushed with skopeo;
//! the reference tree is `umoci raw unpack` of the source layout.

mod common;
mod mount_support;
#[path = "common/registry_server.rs"]
mod registry_server;

use std::fs;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mount_support::MountGuard;
use naiad_reader::{ChunkError, ChunkReader, MergeLimits, NaiadImage};
use naiad_registry::{BlobStore, Digest, ImageRef, RegistryBlobStore, RegistryClient, RegistryOptions};
use registry_server::*;

fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = naiad();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Keep the tests independent of the machine's docker login.
    if !env.iter().any(|(k, _)| *k == "DOCKER_CONFIG") {
        cmd.env("DOCKER_CONFIG", "/nonexistent-naiad-test-docker-config");
    }
    if !env.iter().any(|(k, _)| *k == "REGISTRY_AUTH_FILE") {
        cmd.env_remove("REGISTRY_AUTH_FILE");
    }
    let out = cmd.output().expect("run naiad");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "naiad panicked: {stderr}");
    out
}

fn ok_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = run_env(args, env);
    assert!(out.status.success(), "naiad {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ok(args: &[&str]) -> String {
    ok_env(args, &[])
}

/// Runs naiad expecting exit code 1; returns stderr.
fn fails_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = run_env(args, env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "naiad {args:?} should fail with exit code 1; stderr: {stderr}");
    stderr
}

fn fails(args: &[&str]) -> String {
    fails_env(args, &[])
}

fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("naiad-test-{name}-")).tempdir_in("/tmp").expect("tempdir")
}

const CDC: &[&str] = &["--chunking", "cdc", "--cdc-min", "4K", "--cdc-avg", "16K", "--cdc-max", "64K"];

fn convert_json(src: &str, dst: &str, extra: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let mut args = vec!["convert", src, dst, "--json", "--quiet"];
    args.extend_from_slice(CDC);
    args.extend_from_slice(extra);
    serde_json::from_str(&ok_env(&args, env)).expect("convert --json prints JSON")
}

/// The generated image pushed to `host` as `img:1`, and the umoci unpack
/// of its reference twin.
struct PushedImage {
    tmp: tempfile::TempDir,
    image: GeneratedImage,
    reference_tree: std::path::PathBuf,
}

fn push_generated(host: &str, skopeo_extra: &[&str]) -> PushedImage {
    let tmp = scratch("reg");
    let image = generate_image(tmp.path(), Compression::Gzip);
    skopeo_copy(&format!("oci:{}:latest", image.layout.display()), &format!("docker://{host}/img:1"), skopeo_extra);
    let reference_tree = tmp.path().join("reference");
    umoci_unpack(&image.reference_layout, "latest", &reference_tree);
    PushedImage { tmp, image, reference_tree }
}

fn assert_same_tree(expected: &Path, actual: &Path) {
    let diffs = compare_trees(expected, actual, &generated_compare_options());
    assert!(diffs.is_empty(), "unpacked tree differs from umoci's:\n{}", diffs.join("\n"));
}

/// Unpacks `image` with naiad into a fresh dir under `tmp` and compares.
fn unpack_and_compare(image: &str, pushed: &PushedImage, name: &str, extra: &[&str], env: &[(&str, &str)]) {
    let dir = pushed.tmp.path().join(name);
    let mut args = vec!["unpack", image, dir.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    ok_env(&args, env);
    assert_same_tree(&pushed.reference_tree, &dir);
}

/// Mounts `image` lazily with naiad (daemon in the background), compares
/// the mounted tree with the reference and unmounts.
fn mount_and_compare(image: &str, pushed: &PushedImage, name: &str, extra: &[&str], env: &[(&str, &str)]) {
    let dir = pushed.tmp.path().join(name);
    fs::create_dir_all(&dir).unwrap();
    let extra: Vec<&std::ffi::OsStr> = extra.iter().map(std::ffi::OsStr::new).collect();
    let m = MountGuard::mount_env(image, &dir, &dir.join("cache"), &extra, env);
    assert_same_tree(&pushed.reference_tree, &m.mountpoint);
    m.umount();
}

fn options() -> RegistryOptions {
    RegistryOptions { retry_base_delay: Duration::from_millis(20), ..RegistryOptions::default() }
}

#[test]
fn round_trip_push_pull_mount_and_digest_refs() {
    let reg = Distribution::start(RegistryAuth::None, None);
    let h = reg.host();
    let pushed = push_generated(&h, &[]);
    let src = format!("docker://{h}/img:1");
    let dst = format!("docker://{h}/img:1-naiad");

    // Registry to registry, with 1 MiB upload chunks so large blobs go up in PATCHes.
    let s = convert_json(&src, &dst, &["--upload-chunk-size", "1M"], &[]);
    let push = &s["push"];
    eprintln!("convert docker->docker: {}", serde_json::to_string(push).unwrap_or_default());
    assert_eq!(s["layers"], 4);
    let blobs = s["blobs"].as_u64().unwrap() as usize;
    assert_eq!(push["blobs_uploaded"].as_u64().unwrap() as usize, blobs + 2, "chunk blobs + bootstrap + config: {push}");
    assert!(push["blobs_chunked"].as_u64().unwrap() >= 1, "a blob above 1 MiB goes up in chunks: {push}");
    let manifest_digest = s["manifest_digest"].as_str().unwrap().to_string();
    assert_eq!(push["manifest_digest"], manifest_digest.as_str());

    unpack_and_compare(&dst, &pushed, "unpacked", &[], &[]);
    let out = ok(&["check", &dst]);
    assert!(out.contains("ok ("), "{out}");
    let inspect: serde_json::Value = serde_json::from_str(&ok(&["inspect", &dst, "--json"])).unwrap();
    assert_eq!(inspect["blobs"].as_array().unwrap().len(), blobs);

    // By digest.
    let by_digest = format!("docker://{h}/img@{manifest_digest}");
    unpack_and_compare(&by_digest, &pushed, "by-digest", &[], &[]);

    // Converting again changes nothing: every blob is already there.
    let again = convert_json(&src, &dst, &[], &[]);
    assert_eq!(again["push"]["blobs_existing"].as_u64().unwrap() as usize, blobs + 2, "{}", again["push"]);
    assert_eq!(again["push"]["blobs_uploaded"], 0);
    assert_eq!(again["manifest_digest"], manifest_digest.as_str(), "conversion is deterministic");

    // Into another repository: the blobs the source repository has are mounted.
    let other = format!("docker://{h}/other/copy:naiad");
    let mounted = convert_json(&src, &other, &[], &[]);
    eprintln!("convert into another repository: {}", mounted["push"]);
    assert_eq!(mounted["push"]["blobs_mounted"].as_u64().unwrap() as usize, blobs + 2, "{}", mounted["push"]);
    assert_eq!(mounted["push"]["bytes_uploaded"], 0);
    unpack_and_compare(&other, &pushed, "from-other", &[], &[]);

    // Registry to layout, and layout to registry.
    let layout = pushed.tmp.path().join("pulled");
    let to_layout = convert_json(&src, &format!("oci:{}:n", layout.display()), &[], &[]);
    assert_eq!(to_layout["manifest_digest"], manifest_digest.as_str());
    let from_layout = convert_json(&format!("oci:{}:latest", pushed.image.layout.display()), &format!("docker://{h}/fromlayout:v1"), &[], &[]);
    assert_eq!(from_layout["push"]["blobs_uploaded"].as_u64().unwrap() as usize, blobs + 2);
    unpack_and_compare(&format!("docker://{h}/fromlayout:v1"), &pushed, "from-layout", &[], &[]);
    // The source image's manifest digest is recorded (the same whatever the transport).
    assert_eq!(from_layout["manifest_digest"], manifest_digest.as_str());
}

/// A registry holding the generated image as `img:1` and its conversion as `img:1-naiad`.
fn registry_with_converted() -> (Distribution, PushedImage) {
    let reg = Distribution::start(RegistryAuth::None, None);
    let pushed = push_generated(&reg.host(), &[]);
    convert_json(&format!("docker://{}/img:1", reg.host()), &format!("docker://{}/img:1-naiad", reg.host()), &[], &[]);
    (reg, pushed)
}

/// An opened image and naiad's chunk reader over it.
struct Opened {
    image: Arc<NaiadImage>,
    reader: ChunkReader,
}

impl std::ops::Deref for Opened {
    type Target = NaiadImage;
    fn deref(&self) -> &NaiadImage {
        &self.image
    }
}

impl Opened {
    fn read_chunk(&self, index: u32) -> Result<Vec<u8>, ChunkError> {
        self.reader.read_chunk(index)
    }
}

fn open_image(host: &str, opts: &RegistryOptions) -> Opened {
    let r = ImageRef::parse(&format!("docker://{host}/img:1-naiad")).expect("reference");
    let image = Arc::new(NaiadImage::open_with(&r, opts).unwrap_or_else(|e| panic!("open {r}: {e}")));
    Opened { reader: ChunkReader::new(image.clone(), MergeLimits::default()), image }
}

/// Chunk indices of blob `blob`, sorted by offset.
fn chunks_of_blob(image: &NaiadImage, blob: u32) -> Vec<u32> {
    let b = &image.bootstrap;
    let mut v: Vec<(u64, u32)> = (0..b.chunk_count()).filter_map(|i| b.chunk(i).ok().filter(|c| c.blob_index == blob).map(|c| (c.compressed_offset, i))).collect();
    v.sort();
    v.into_iter().map(|(_, i)| i).collect()
}

#[test]
fn range_reads_are_lazy_merged_and_reuse_connections() {
    let (reg, _pushed) = registry_with_converted();
    let proxy = TestProxy::start(reg.port, ProxyConfig::default());
    let st = proxy.stats.clone();
    let image = open_image(&proxy.host(), &options());
    assert!(image.store.describe().starts_with("docker://"), "{}", image.store.describe());
    let open_bytes = ProxyStats::get(&st.blob_body_bytes);
    let blob_sizes: Vec<u64> = image.bootstrap.blobs().unwrap().iter().map(|b| b.size).collect();
    let total: u64 = blob_sizes.iter().sum();
    let source = naiad_registry::open_source(&ImageRef::parse(&format!("docker://{}/img:1-naiad", reg.host())).unwrap()).unwrap();
    assert_eq!(open_bytes, image.bootstrap_layer_size + source.manifest.config.size, "opening fetches the bootstrap layer and the config, no chunk blob");

    // Three chunks from the largest blob.
    let largest = (0..blob_sizes.len()).max_by_key(|&i| blob_sizes[i]).unwrap() as u32;
    let chunks = chunks_of_blob(&image, largest);
    let picks = [chunks[0], chunks[chunks.len() / 2], chunks[chunks.len() - 1]];
    let gets_before = ProxyStats::get(&st.blob_gets);
    let mut expected = 0u64;
    for &i in &picks {
        let c = image.bootstrap.chunk(i).unwrap();
        expected += c.compressed_size as u64;
        let data = image.read_chunk(i).expect("chunk reads and verifies");
        assert_eq!(data.len() as u64, c.uncompressed_size as u64);
    }
    let fetched = ProxyStats::get(&st.blob_body_bytes) - open_bytes;
    eprintln!(
        "laziness: 3 chunks fetched {fetched} bytes of a {} byte blob ({} bytes in all blobs, {:.2}%); opening fetched {open_bytes} bytes (bootstrap layer {} + config)",
        blob_sizes[largest as usize],
        total,
        100.0 * fetched as f64 / total as f64,
        image.bootstrap_layer_size
    );
    assert_eq!(fetched, expected, "exactly the chunks' stored bytes travel");
    assert_eq!(ProxyStats::get(&st.blob_gets) - gets_before, 3);
    assert!(fetched * 20 < total, "a few chunks are a small fraction of the blobs");

    // The chunk reader: consecutive chunks are one merged request, cut
    // back into the chunks; the store fetches exactly the range planned.
    let run: Vec<naiad_format::ChunkRecord> = chunks.iter().copied().skip(1).take(8).map(|i| image.bootstrap.chunk(i).unwrap()).collect();
    let before = ProxyStats::get(&st.blob_gets);
    let parts = image.reader.read_chunks(&run);
    assert_eq!(ProxyStats::get(&st.blob_gets) - before, 1, "8 adjacent chunks in one request");
    let run_bytes: u64 = run.iter().map(|c| c.compressed_size as u64).sum();
    for (c, part) in run.iter().zip(&parts) {
        let part = part.as_ref().expect("merged chunk reads and verifies");
        assert_eq!(part.stored.len() as u64, c.compressed_size as u64);
        assert_eq!(part.data.len() as u64, c.uncompressed_size as u64);
    }
    // Far apart chunks are not merged (first and last chunk of the blob).
    let far = [run[0], image.bootstrap.chunk(*chunks.last().unwrap()).unwrap()];
    let before = ProxyStats::get(&st.blob_gets);
    assert!(image.reader.read_chunks(&far).iter().all(Result::is_ok));
    assert_eq!(ProxyStats::get(&st.blob_gets) - before, 2);
    eprintln!("chunk reader: 8 adjacent chunks ({run_bytes} bytes) in 1 request; 2 distant chunks in 2");

    // A RegistryBlobStore of its own.
    let docker_ref = naiad_registry::DockerReference::parse(&format!("{}/img:1-naiad", proxy.host())).unwrap();
    let sizes = image.blob_digests.iter().cloned().zip(blob_sizes.iter().copied());
    let store = RegistryBlobStore::open(&docker_ref, &options()).unwrap().with_blob_sizes(sizes);
    let digest = &image.blob_digests[largest as usize];

    // Out-of-range reads fail without a request.
    let before = ProxyStats::get(&st.requests);
    assert!(store.read_range(digest, blob_sizes[largest as usize], 1).is_err());
    assert_eq!(ProxyStats::get(&st.requests), before);

    // Connections are reused: many requests, few connections.
    let (conns, reqs) = (ProxyStats::get(&st.connections), ProxyStats::get(&st.requests));
    eprintln!("connection reuse: {reqs} requests over {conns} connections");
    assert!(conns <= 3 && reqs >= 8, "{conns} connections for {reqs} requests");

    // Concurrent readers share the store (several requests in flight).
    let image = Arc::new(image);
    let all: Vec<u32> = chunks.clone();
    std::thread::scope(|s| {
        for part in all.chunks(all.len().div_ceil(4)) {
            let image = image.clone();
            s.spawn(move || {
                for &i in part {
                    image.read_chunk(i).expect("concurrent chunk read");
                }
            });
        }
    });
    let stats = image.registry_stats().expect("registry image has stats");
    eprintln!("registry stats after concurrent reads: {stats:?}");
    assert_eq!(stats.retries, 0);
}

#[test]
fn redirects_drop_authorization_and_unranged_answers_are_sliced() {
    let (reg, _pushed) = registry_with_converted();
    // The proxy demands Basic auth and redirects blob GETs to localhost:PORT
    // (another host name); the client must not send its credentials there.
    let proxy = TestProxy::start(reg.port, ProxyConfig { require_basic: Some(("carol".into(), "redirect-secret".into())), redirect_blobs: true, ..Default::default() });
    let creds = naiad_registry::Credentials::parse("carol:redirect-secret").unwrap();
    let opts = RegistryOptions { credentials: Some(creds), ..options() };
    let image = open_image(&proxy.host(), &opts);
    for i in chunks_of_blob(&image, 0).into_iter().take(5) {
        image.read_chunk(i).expect("chunk through a redirect");
    }
    let st = &proxy.stats;
    eprintln!("redirects: {} redirected requests, {} of them with Authorization", ProxyStats::get(&st.redirected_requests), ProxyStats::get(&st.redirected_with_auth));
    assert!(ProxyStats::get(&st.redirected_requests) >= 6, "bootstrap, config and chunks went through the redirect");
    assert_eq!(ProxyStats::get(&st.redirected_with_auth), 0, "Authorization must not follow a redirect to another host");
    // Without credentials the proxy refuses.
    let r = ImageRef::parse(&format!("docker://{}/img:1-naiad", proxy.host())).unwrap();
    let err = NaiadImage::open_with(&r, &options()).err().expect("needs credentials").to_string();
    assert!(err.contains("unauthorized") && err.contains("authentication required"), "{err}");

    // A server that ignores Range: reads near the start of a blob are cut
    // from the whole-blob answer.
    let plain = TestProxy::start(reg.port, ProxyConfig { ignore_range: true, ..Default::default() });
    let image = open_image(&plain.host(), &options());
    let chunks = chunks_of_blob(&image, 0);
    for &i in chunks.iter().take(3) {
        image.read_chunk(i).expect("chunk from an unranged answer");
    }
}

#[test]
fn basic_auth_with_creds_flag_and_auth_file() {
    let (user, password) = ("alice", "pw-basic-7f3a9");
    let reg = Distribution::start(RegistryAuth::Htpasswd { user: user.into(), password: password.into() }, None);
    let h = reg.host();
    let creds = format!("{user}:{password}");
    let pushed = push_generated(&h, &["--dest-creds", &creds]);
    let src = format!("docker://{h}/img:1");
    let dst = format!("docker://{h}/img:1-naiad");
    convert_json(&src, &dst, &["--creds", &creds], &[]);
    unpack_and_compare(&dst, &pushed, "unpacked", &["--creds", &creds], &[]);

    // REGISTRY_AUTH_FILE with username/password fields.
    let auth_file = pushed.tmp.path().join("auth.json");
    fs::write(&auth_file, format!(r#"{{"auths":{{"{h}":{{"username":"{user}","password":"{password}"}}}}}}"#)).unwrap();
    let auth_env = [("REGISTRY_AUTH_FILE", auth_file.to_str().unwrap())];
    ok_env(&["check", &dst], &auth_env);
    mount_and_compare(&dst, &pushed, "mounted-creds", &["--creds", &creds], &[]);
    mount_and_compare(&dst, &pushed, "mounted-auth-file", &[], &auth_env);

    // No credentials, wrong credentials: clear errors, no secret in them (even with -v).
    let e = fails(&["inspect", &dst]);
    assert!(e.contains("unauthorized") && e.contains("authentication required") && e.contains(&h), "{e}");
    eprintln!("no credentials: {}", e.trim());
    let e = fails(&["-v", "unpack", &dst, pushed.tmp.path().join("x").to_str().unwrap(), "--creds", "alice:wrong-secret-value"]);
    eprintln!("wrong credentials: {}", e.lines().last().unwrap_or(""));
    assert!(e.contains("refused the credentials"), "{e}");
    assert!(!e.contains("wrong-secret-value") && !e.contains(&base64_of("alice:wrong-secret-value")), "secret leaked: {e}");
    let e = fails(&["convert", &src, &format!("docker://{h}/img:x"), "--creds", "alice:wrong-secret-value"]);
    assert!(e.contains("unauthorized") && !e.contains("wrong-secret-value"), "{e}");
}

fn base64_of(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn token_auth_with_docker_config_and_token_renewal() {
    let tmp = scratch("token");
    let key = make_signing_key(tmp.path());
    let (user, password) = ("tokenuser", "pw-token-51c0");
    let ts = TokenServer::start(&key, user, password, 3600);
    let reg = Distribution::start(RegistryAuth::Token { realm: ts.realm(), service: TOKEN_SERVICE.into(), issuer: TOKEN_ISSUER.into(), cert_pem: key.cert_pem.clone() }, None);
    let h = reg.host();
    let creds = format!("{user}:{password}");
    let pushed = push_generated(&h, &["--dest-creds", &creds]);

    // Credentials from $DOCKER_CONFIG/config.json (base64 "auth").
    let docker_dir = tmp.path().join("docker");
    fs::create_dir_all(&docker_dir).unwrap();
    fs::write(docker_dir.join("config.json"), format!(r#"{{"auths":{{"http://{h}":{{"auth":"{}"}}}}}}"#, base64_of(&creds))).unwrap();
    let env = [("DOCKER_CONFIG", docker_dir.to_str().unwrap())];
    let src = format!("docker://{h}/img:1");
    let dst = format!("docker://{h}/img:1-naiad");
    let issued_before = ts.issued.load(std::sync::atomic::Ordering::SeqCst);
    convert_json(&src, &dst, &[], &env);
    // Into another repository: the mount needs a token for both repositories.
    let mounted = convert_json(&src, &format!("docker://{h}/mirror/img:1-naiad"), &[], &env);
    assert_eq!(mounted["push"]["blobs_uploaded"], 0, "{}", mounted["push"]);
    unpack_and_compare(&dst, &pushed, "unpacked", &[], &env);
    ok_env(&["check", &dst], &env);
    mount_and_compare(&dst, &pushed, "mounted", &[], &env);
    let issued = ts.issued.load(std::sync::atomic::Ordering::SeqCst) - issued_before;
    eprintln!("token auth: {issued} tokens issued for 2 conversions, an unpack and a check");
    assert!(issued >= 4);

    // Anonymous: the token server gives a token without access; the registry refuses.
    let e = fails(&["inspect", &dst]);
    assert!(e.contains("unauthorized"), "{e}");
    // Wrong password in the docker config.
    fs::write(docker_dir.join("config.json"), format!(r#"{{"auths":{{"{h}":{{"auth":"{}"}}}}}}"#, base64_of("tokenuser:bad-token-pw"))).unwrap();
    let e = fails_env(&["inspect", &dst], &env);
    assert!(e.contains("token server refused the credentials") && !e.contains("bad-token-pw"), "{e}");

    // Token cache: reused while valid, renewed on expiry and when refused.
    ts.expires_in.store(2, std::sync::atomic::Ordering::SeqCst);
    let opts = RegistryOptions { credentials: Some(naiad_registry::Credentials::parse(&creds).unwrap()), ..options() };
    let image = open_image(&h, &opts);
    let chunks = chunks_of_blob(&image, 0);
    let count = || ts.issued.load(std::sync::atomic::Ordering::SeqCst);
    let t0 = count();
    image.read_chunk(chunks[0]).unwrap();
    image.read_chunk(chunks[1]).unwrap();
    assert_eq!(count(), t0, "the cached token serves further reads");
    std::thread::sleep(Duration::from_millis(2300));
    image.read_chunk(chunks[2]).unwrap();
    assert_eq!(count(), t0 + 1, "an expired token is renewed before use");
    ts.poison.store(1, std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(2300));
    image.read_chunk(chunks[3]).unwrap();
    assert_eq!(count(), t0 + 3, "a refused token (401) is dropped and a new one fetched");
    let stats = image.registry_stats().unwrap();
    eprintln!("token renewal: {stats:?}");

    // A token server that says its token never expires crashes nothing.
    ts.expires_in.store(i64::MAX as u64, std::sync::atomic::Ordering::SeqCst);
    ok(&["inspect", "--creds", &creds, &dst]);
}

#[test]
fn debian_image_through_registry() {
    let deb = debian_image();
    let reg = Distribution::start(RegistryAuth::None, None);
    let h = reg.host();
    skopeo_copy(&format!("oci:{}:latest", deb.layout.display()), &format!("docker://{h}/debian:12"), &[]);
    let tmp = scratch("reg-debian");
    let started = Instant::now();
    let out = ok(&["convert", &format!("docker://{h}/debian:12"), &format!("docker://{h}/debian:12-naiad"), "--json", "--quiet"]);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    eprintln!("debian docker->docker convert: {:.1}s, {} files, push {}", started.elapsed().as_secs_f64(), s["files"], s["push"]);
    assert!(s["files"].as_u64().unwrap() > 3000);
    let dir = tmp.path().join("unpacked");
    let started = Instant::now();
    ok(&["unpack", &format!("docker://{h}/debian:12-naiad"), dir.to_str().unwrap()]);
    eprintln!("debian unpack over range reads: {:.1}s", started.elapsed().as_secs_f64());
    let opts = CompareOptions { skip_dir_mtime: false, ..CompareOptions::default() };
    let diffs = compare_trees(&deb.reference_rootfs, &dir, &opts);
    assert!(diffs.is_empty(), "naiad unpack differs from umoci:\n{}", diffs.join("\n"));
    ok(&["check", &format!("docker://{h}/debian:12-naiad")]);

    // Mounted lazily from the registry: the same tree; and a program runs from it.
    let m = MountGuard::mount(&format!("docker://{h}/debian:12-naiad"), tmp.path(), &tmp.path().join("cache"));
    let diffs = compare_trees(&deb.reference_rootfs, &m.mountpoint, &opts);
    assert!(diffs.is_empty(), "mounted tree differs from umoci:\n{}", diffs.join("\n"));
    m.umount();
    let run_dir = tmp.path().join("run-dir");
    let out = ok(&[
        "run",
        "--cache-dir",
        tmp.path().join("run-cache").to_str().unwrap(),
        "--run-dir",
        run_dir.to_str().unwrap(),
        &format!("docker://{h}/debian:12-naiad"),
        "--",
        "python3",
        "-c",
        "import json; print(json.dumps(42))",
    ]);
    assert_eq!(out.trim(), "42");
    let code = run_env(
        &[
            "run",
            "--cache-dir",
            tmp.path().join("run-cache").to_str().unwrap(),
            "--run-dir",
            run_dir.to_str().unwrap(),
            &format!("docker://{h}/debian:12-naiad"),
            "--",
            "sh",
            "-c",
            "exit 7",
        ],
        &[],
    );
    assert_eq!(code.status.code(), Some(7));
}

#[test]
fn mirror_serves_blobs_and_origin_takes_over_when_it_stops() {
    let (origin, pushed) = registry_with_converted();
    let mut mirror = Distribution::start(RegistryAuth::None, Some(&origin.url()));
    let origin_proxy = TestProxy::start(origin.port, ProxyConfig::default());
    let mirror_proxy = TestProxy::start(mirror.port, ProxyConfig::default());
    let image = format!("docker://{}/img:1-naiad", origin_proxy.host());
    let mirror_url = format!("http://{}", mirror_proxy.host());
    // A pull-through mirror may fail a request while it is still filling
    // its cache (naiad then falls back to the origin for that request), so
    // the first pass only warms it; the second must be served by it alone.
    unpack_and_compare(&image, &pushed, "warming-mirror", &["--mirror", &mirror_url], &[]);
    let (warm_origin, warm_mirror) = (ProxyStats::get(&origin_proxy.stats.blob_gets), ProxyStats::get(&mirror_proxy.stats.blob_gets));
    assert!(warm_mirror > 5 * warm_origin.max(1), "the mirror serves most blob reads while warming: origin {warm_origin}, mirror {warm_mirror}");
    origin_proxy.stats.blob_gets.store(0, std::sync::atomic::Ordering::SeqCst);
    mirror_proxy.stats.blob_gets.store(0, std::sync::atomic::Ordering::SeqCst);
    unpack_and_compare(&image, &pushed, "via-mirror", &["--mirror", &mirror_url], &[]);
    let (o, m) = (&origin_proxy.stats, &mirror_proxy.stats);
    eprintln!(
        "with mirror: origin saw {} blob GETs, mirror {} blob GETs ({} bytes)",
        ProxyStats::get(&o.blob_gets),
        ProxyStats::get(&m.blob_gets),
        ProxyStats::get(&m.blob_body_bytes)
    );
    assert_eq!(ProxyStats::get(&o.blob_gets), 0, "blobs come from the mirror");
    assert!(ProxyStats::get(&m.blob_gets) > 5);
    assert!(count_lines(&mirror.log(), "/v2/img/blobs/sha256:") > 0, "the mirror's access log shows the blob reads");

    // Mirror gone: reads fall back to the origin.
    mirror.stop();
    drop(mirror_proxy);
    let started = Instant::now();
    unpack_and_compare(&image, &pushed, "after-mirror", &["--mirror", &mirror_url], &[]);
    eprintln!("mirror down: unpack took {:.2}s, origin served {} blob GETs", started.elapsed().as_secs_f64(), ProxyStats::get(&o.blob_gets));
    assert!(ProxyStats::get(&o.blob_gets) > 5);
}

#[test]
fn injected_faults_are_retried_and_every_file_reads_correctly() {
    let (reg, pushed) = registry_with_converted();
    let plan = FaultPlan {
        seed: 0x6e_6169_6164,
        // unpack batches the chunks of many files into a few range
        // requests (about ten per unpack here), so the shares are high
        // and there are three unpacks; the retries are many enough that
        // no request meets a fault on every attempt.
        reset_pct: 12,
        error500_pct: 12,
        truncate_pct: 12,
        delay_pct: 5,
        delay: Duration::from_millis(100),
        stall_pct: 2,
        stall: Duration::from_millis(2000),
        error429_pct: 0,
    };
    let proxy = TestProxy::start(reg.port, ProxyConfig { faults: Some(plan.clone()), ..Default::default() });
    let flags = ["--read-timeout", "0.5", "--retries", "10", "--retry-delay", "0.02"];
    let image = format!("docker://{}/img:1-naiad", proxy.host());
    let started = Instant::now();
    for round in 0..3 {
        unpack_and_compare(&image, &pushed, &format!("unpacked-{round}"), &flags, &[]);
    }
    eprintln!("faults, 3 unpacks: {:.1}s; proxy: {}", started.elapsed().as_secs_f64(), proxy.stats.summary());
    assert!(proxy.stats.faults() >= 6, "enough faults were injected: {}", proxy.stats.summary());

    // Streaming the source layers through frequent truncations and resets:
    // the layer streams resume where they broke off.
    let harsh = FaultPlan { seed: 7, reset_pct: 20, truncate_pct: 40, ..Default::default() };
    let harsh_proxy = TestProxy::start(reg.port, ProxyConfig { faults: Some(harsh), ..Default::default() });
    let out = pushed.tmp.path().join("converted");
    let direct = convert_json(&format!("docker://{}/img:1", reg.host()), &format!("oci:{}:a", out.display()), &[], &[]);
    let faulty = convert_json(&format!("docker://{}/img:1", harsh_proxy.host()), &format!("oci:{}:b", out.display()), &flags, &[]);
    assert_eq!(faulty["manifest_digest"], direct["manifest_digest"], "the same image despite faults");
    let log = harsh_proxy.stats.log.lock().unwrap().clone();
    let resumed = log.iter().filter(|l| l.contains("/blobs/") && l.contains("bytes=")).count();
    eprintln!("faults, convert: {} resumed layer requests; proxy: {}", resumed, harsh_proxy.stats.summary());
    assert!(harsh_proxy.stats.faults() >= 2, "{}", harsh_proxy.stats.summary());

    // Library level: count retries.
    let opts = RegistryOptions { read_timeout: Duration::from_secs(1), max_attempts: 7, ..options() };
    let img = open_image(&proxy.host(), &opts);
    for i in 0..img.bootstrap.chunk_count() {
        img.read_chunk(i).unwrap_or_else(|e| panic!("chunk {i}: {e}"));
    }
    let stats = img.registry_stats().unwrap();
    eprintln!("faults, all {} chunks: {stats:?}", img.bootstrap.chunk_count());
    assert!(stats.retries > 0);

    // 429 with Retry-After: 1 is waited out.
    let busy = TestProxy::start(reg.port, ProxyConfig { faults: Some(FaultPlan { seed: 3, error429_pct: 40, ..Default::default() }), ..Default::default() });
    let img = open_image(&busy.host(), &options());
    let before = ProxyStats::get(&busy.stats.errors429);
    let t = Instant::now();
    for &i in chunks_of_blob(&img, 0).iter().take(6) {
        img.read_chunk(i).expect("read despite 429s");
    }
    let n429 = ProxyStats::get(&busy.stats.errors429) - before;
    eprintln!("429s: {n429} answered, 6 chunks read in {:.2}s", t.elapsed().as_secs_f64());
    assert!(n429 >= 1 && t.elapsed() >= Duration::from_secs(n429), "each 429 waits its Retry-After second");
}

#[test]
fn registry_outage_fails_within_the_timeout_and_recovers() {
    let (mut reg, _pushed) = registry_with_converted();
    let opts = RegistryOptions {
        connect_timeout: Duration::from_secs(1),
        read_timeout: Duration::from_secs(1),
        max_attempts: 3,
        retry_base_delay: Duration::from_millis(100),
        retry_max_delay: Duration::from_millis(400),
        ..RegistryOptions::default()
    };
    let image = open_image(&reg.host(), &opts);
    let chunks = chunks_of_blob(&image, 0);
    image.read_chunk(chunks[0]).unwrap();

    // Hung registry: every attempt times out.
    reg.pause();
    let t = Instant::now();
    let e = image.read_chunk(chunks[1]).expect_err("a hung registry fails the read").to_string();
    let hung = t.elapsed();
    eprintln!("hung registry: read failed after {:.2}s: {e}", hung.as_secs_f64());
    assert!(hung >= Duration::from_secs(3) && hung < Duration::from_secs(6), "3 attempts of 1 s plus backoff, took {hung:?}");
    assert!(e.contains(&reg.host()) && e.contains("timed out") && e.contains("3 attempts"), "{e}");
    reg.resume();
    image.read_chunk(chunks[1]).expect("reads work again once the registry answers");

    // Stopped registry: refused at once.
    reg.stop();
    let t = Instant::now();
    let e = image.read_chunk(chunks[2]).expect_err("a stopped registry fails the read").to_string();
    let down = t.elapsed();
    eprintln!("stopped registry: read failed after {:.2}s: {e}", down.as_secs_f64());
    assert!(down < Duration::from_secs(2), "{down:?}");
    assert!(e.contains("cannot connect"), "{e}");
    reg.restart();
    image.read_chunk(chunks[2]).expect("reads work again after a restart");
}

#[test]
fn bad_input_gives_clear_errors() {
    let (reg, _pushed) = registry_with_converted();
    let h = reg.host();
    let tmp = scratch("reg-bad");
    let dir = tmp.path().join("out");
    let d = dir.to_str().unwrap();

    // Nothing listens there.
    let dead = format!("127.0.0.1:{}", free_port());
    let e = fails(&["unpack", &format!("docker://{dead}/img:1"), d, "--retries", "1"]);
    eprintln!("nothing listening: {}", e.trim());
    assert!(e.contains(&dead) && e.contains("cannot connect"), "{e}");
    // Missing tag, missing repository.
    let e = fails(&["unpack", &format!("docker://{h}/img:nope"), d]);
    eprintln!("missing tag: {}", e.trim());
    assert!(e.contains("img:nope") && e.contains("not found"), "{e}");
    let e = fails(&["convert", &format!("docker://{h}/absent:1"), &format!("oci:{d}")]);
    assert!(e.contains("absent") && e.contains("not found"), "{e}");
    // A plain image given where a naiad image is expected.
    for cmd in ["inspect", "check"] {
        let e = fails(&[cmd, &format!("docker://{h}/img:1")]);
        eprintln!("{cmd} of a plain image: {}", e.trim());
        assert!(e.contains("not a naiad image"), "{cmd}: {e}");
    }
    // A digest the registry does not have.
    let zero = format!("sha256:{}", "0".repeat(64));
    let e = fails(&["unpack", &format!("docker://{h}/img@{zero}"), d]);
    assert!(e.contains("not found"), "{e}");
    // A manifest that does not hash to the digest asked for.
    let naiad_digest = naiad_registry::open_source(&ImageRef::parse(&format!("docker://{h}/img:1-naiad")).unwrap()).unwrap().manifest_digest.unwrap();
    let liar = TestProxy::start(reg.port, ProxyConfig { manifest_digest_to_tag: Some("1".into()), ..Default::default() });
    let e = fails(&["unpack", &format!("docker://{}/img@{naiad_digest}", liar.host()), d]);
    eprintln!("lying registry: {}", e.trim());
    assert!(e.contains("does not match digest") && e.contains(naiad_digest.as_str()), "{e}");
    // Malformed references and destinations.
    let e = fails(&["inspect", "docker://UPPER/x"]);
    assert!(e.contains("invalid image reference"), "{e}");
    let e = fails(&["convert", &format!("docker://{h}/img:1"), &format!("docker://{h}/img@{zero}")]);
    assert!(e.contains("give a tag"), "{e}");
    assert!(!dir.exists(), "failed commands leave no output");
    // The library says the same.
    let client = RegistryClient::new(&h, &options()).unwrap();
    client.ping().expect("ping");
    assert!(client.head_blob("img", &Digest::parse(&zero).unwrap()).unwrap().is_none());
}

#[test]
fn tls_mirror_with_ca_file() {
    let (origin, pushed) = registry_with_converted();
    let origin_proxy = TestProxy::start(origin.port, ProxyConfig::default());
    let (key, cert, ca_cert) = make_server_cert(pushed.tmp.path());
    let mirror = Distribution::start_with(RegistryAuth::None, Some(&origin.url()), Some((&cert, &key)));
    let image = format!("docker://{}/img:1-naiad", origin_proxy.host());
    let mirror_url = format!("https://{}", mirror.host());
    let ca = ca_cert.to_str().unwrap();
    // The first pass warms the pull-through mirror (see the mirror test).
    unpack_and_compare(&image, &pushed, "tls-mirror-warming", &["--mirror", &mirror_url, "--ca-file", ca], &[]);
    origin_proxy.stats.blob_gets.store(0, std::sync::atomic::Ordering::SeqCst);
    unpack_and_compare(&image, &pushed, "tls-mirror", &["--mirror", &mirror_url, "--ca-file", ca], &[]);
    assert_eq!(ProxyStats::get(&origin_proxy.stats.blob_gets), 0, "all blobs came over TLS from the mirror");
    assert!(count_lines(&mirror.log(), "/v2/img/blobs/sha256:") > 0);

    // Without the CA the certificate is refused; the origin serves instead.
    let out = run_env(&["unpack", &image, pushed.tmp.path().join("no-ca").to_str().unwrap(), "--mirror", &mirror_url], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    eprintln!("mirror without its CA: {}", stderr.trim());
    assert!(stderr.contains("mirror") && stderr.to_lowercase().contains("certificate"), "{stderr}");
    assert!(ProxyStats::get(&origin_proxy.stats.blob_gets) > 0);
}

/// The descriptor `tag` names in `layout`'s index.json.
fn tagged_descriptor(layout: &Path, tag: &str) -> serde_json::Value {
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"].as_array().unwrap().iter().find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag).expect("tag").clone()
}

#[test]
fn index_platform_selection_and_docker_schema2() {
    let reg = Distribution::start(RegistryAuth::None, None);
    let h = reg.host();
    let pushed = push_generated(&h, &[]);
    // A two-platform index: this host's architecture -> the generated
    // image; another architecture -> its (differently built) reference twin.
    let multi = pushed.tmp.path().join("multi");
    let st = std::process::Command::new("cp").arg("-a").arg(&pushed.image.layout).arg(&multi).status().unwrap();
    assert!(st.success());
    for e in fs::read_dir(pushed.image.reference_layout.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        let to = multi.join("blobs/sha256").join(e.file_name());
        if !to.exists() {
            fs::copy(e.path(), to).unwrap();
        }
    }
    let host_arch = naiad_registry::Platform::host().architecture;
    let other_arch = if host_arch == "s390x" { "riscv64" } else { "s390x" };
    let mut a = tagged_descriptor(&pushed.image.layout, "latest");
    let mut b = tagged_descriptor(&pushed.image.reference_layout, "latest");
    for d in [&mut a, &mut b] {
        d.as_object_mut().unwrap().remove("annotations");
    }
    a["platform"] = serde_json::json!({"os": "linux", "architecture": host_arch});
    b["platform"] = serde_json::json!({"os": "linux", "architecture": other_arch});
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [b, a]});
    let index_bytes = serde_json::to_vec(&index).unwrap();
    let index_digest = Digest::of(&index_bytes);
    fs::write(multi.join("blobs/sha256").join(index_digest.hex()), &index_bytes).unwrap();
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_digest.as_str(), "size": index_bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": "multi"}}]});
    fs::write(multi.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    skopeo_copy(&format!("oci:{}:multi", multi.display()), &format!("docker://{h}/multi:1"), &["--all"]);

    let r = ImageRef::parse(&format!("docker://{h}/multi:1")).unwrap();
    let mine = naiad_registry::open_source(&r).expect("open index for this host");
    assert_eq!(mine.manifest_digest.as_ref().unwrap().as_str(), a["digest"].as_str().unwrap(), "default: this host's platform");
    let opts = RegistryOptions { platform: Some(naiad_registry::Platform::parse(&format!("linux/{other_arch}")).unwrap()), ..options() };
    let other = naiad_registry::open_source_with(&r, &opts).expect("open index for the other platform");
    assert_eq!(other.manifest_digest.as_ref().unwrap().as_str(), b["digest"].as_str().unwrap());
    // Converted for the other platform through the CLI: the same tree.
    let dst = format!("docker://{h}/multi:1-naiad-{other_arch}");
    convert_json(&format!("docker://{h}/multi:1"), &dst, &["--platform", &format!("linux/{other_arch}")], &[]);
    unpack_and_compare(&dst, &pushed, "other-platform", &[], &[]);
    let e = fails(&["convert", &format!("docker://{h}/multi:1"), &format!("oci:{}", pushed.tmp.path().join("x").display()), "--platform", "linux/mips64"]);
    assert!(e.contains("no manifest for linux/mips64") && e.contains(other_arch), "{e}");

    // Docker schema 2 manifest and manifest list (skopeo converts the formats).
    skopeo_copy(&format!("oci:{}:latest", pushed.image.layout.display()), &format!("docker://{h}/img:v2s2"), &["--format", "v2s2"]);
    let v2 = naiad_registry::open_source(&ImageRef::parse(&format!("docker://{h}/img:v2s2")).unwrap()).unwrap();
    assert_eq!(v2.manifest.media_type.as_deref(), Some("application/vnd.docker.distribution.manifest.v2+json"));
    convert_json(&format!("docker://{h}/img:v2s2"), &format!("docker://{h}/img:v2s2-naiad"), &[], &[]);
    unpack_and_compare(&format!("docker://{h}/img:v2s2-naiad"), &pushed, "from-v2s2", &[], &[]);
    skopeo_copy(&format!("oci:{}:multi", multi.display()), &format!("docker://{h}/list:1"), &["--all", "--format", "v2s2"]);
    let list = naiad_registry::open_source(&ImageRef::parse(&format!("docker://{h}/list:1")).unwrap()).expect("open a manifest list");
    assert_eq!(list.manifest.media_type.as_deref(), Some("application/vnd.docker.distribution.manifest.v2+json"));
    assert_eq!(list.layers.len(), 4);
}

#[test]
fn a_read_its_daemon_died_serving_is_resent_to_the_next_daemon() {
    if !mount_support::fuse_available() {
        return;
    }
    let (mut reg, pushed) = registry_with_converted();
    let dir = pushed.tmp.path().join("resend");
    fs::create_dir_all(&dir).unwrap();
    let image = format!("docker://{}/img:1-naiad", reg.host());
    let m = MountGuard::mount_with(&image, &dir, &dir.join("cache"), &["--no-prefetch".as_ref()]);
    let (rel, _) = regular_files(&pushed.reference_tree).into_iter().max_by_key(|(_, size)| *size).expect("a regular file");
    let want = fs::read(pushed.reference_tree.join(&rel)).unwrap();
    let old = m.stats()["pid"].as_u64().expect("daemon pid");
    let misses = m.counter("misses");

    // The registry hangs, so the daemon holds the read: it has taken the
    // request from the kernel and waits for the chunk.
    reg.pause();
    let path = m.path(rel.to_str().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(fs::read(&path));
    });
    assert!(mount_support::wait_until(Duration::from_secs(10), || m.counter("misses") > misses), "the read never reached the store");
    // SAFETY: kill(2) of the daemon this test's mount runs.
    assert_eq!(unsafe { libc::kill(old as i32, libc::SIGKILL) }, 0);
    std::thread::sleep(Duration::from_millis(300));
    reg.resume();

    // The kernel gives the request to the next daemon, which answers it.
    let got = rx.recv_timeout(Duration::from_secs(60)).expect("the read never returned: it was not resent");
    assert_eq!(got.expect("the read failed"), want, "the read returned wrong bytes");
    let new = m.stats()["pid"].as_u64().expect("daemon pid");
    assert_ne!(new, old, "a new daemon serves the mount");
    assert_eq!(m.stats()["counters"]["daemon_restarts"].as_u64(), Some(1));
    m.umount();
}

#[test]
fn metadata_stays_fast_while_reads_wait_on_a_trickling_registry() {
    if !mount_support::fuse_available() {
        return;
    }
    let (reg, pushed) = registry_with_converted();
    // Ranged blob reads get one byte every 2 s; the manifest, config and
    // bootstrap come at once.
    let proxy = TestProxy::start(reg.port, ProxyConfig { trickle_ranges: Some(Duration::from_secs(2)), ..Default::default() });
    let dir = pushed.tmp.path().join("trickle");
    fs::create_dir_all(&dir).unwrap();
    let image = format!("docker://{}/img:1-naiad", proxy.host());
    // A range of N bytes must arrive within 6 s + N / 1 MiB/s.
    let flags: Vec<&std::ffi::OsStr> = ["--no-prefetch", "--retries", "0", "--read-timeout", "6", "--min-transfer-rate", "1M"].iter().map(std::ffi::OsStr::new).collect();
    let m = MountGuard::mount_with(&image, &dir, &dir.join("cache"), &flags);
    let mut files: Vec<_> = regular_files(&pushed.reference_tree).into_iter().filter(|(_, size)| *size > 0).map(|(p, _)| p).collect();
    files.sort();
    assert!(files.len() >= 9, "{files:?}");
    let (readers, rest) = files.split_at(8);

    // 8 readers, more than the daemon's 4 FUSE workers, all wait on the store.
    let (tx, rx) = std::sync::mpsc::channel();
    for rel in readers {
        let (path, tx) = (m.path(rel.to_str().unwrap()), tx.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            let r = fs::read(&path);
            let _ = tx.send((path, r.map(|d| d.len()), start.elapsed()));
        });
    }
    // And one more reader, killed while it waits.
    let mut victim = std::process::Command::new("cat").arg(m.path(rest[0].to_str().unwrap())).stdout(std::process::Stdio::null()).spawn().unwrap();
    assert!(mount_support::wait_until(Duration::from_secs(10), || m.counter("misses") >= 9), "the reads never reached the store");

    // Metadata the kernel has not cached yet is answered by the daemon
    // while every read waits: lookups, getattr, readdir.
    let start = Instant::now();
    for rel in rest {
        fs::symlink_metadata(m.path(rel.to_str().unwrap())).expect("stat while reads wait");
    }
    let listed: Vec<_> = fs::read_dir(m.path("etc")).expect("ls while reads wait").flatten().map(|e| e.file_name()).collect();
    let metadata_time = start.elapsed();
    eprintln!("stat of {} files and ls of /etc ({} entries) while 9 reads wait: {metadata_time:?}", rest.len(), listed.len());
    assert!(!listed.is_empty());
    assert!(metadata_time < Duration::from_secs(1), "metadata waited for the reads: {metadata_time:?}");
    victim.kill().unwrap();

    // The readers fail with EIO once the transfer deadline has passed.
    for _ in 0..readers.len() {
        let (path, r, took) = rx.recv_timeout(Duration::from_secs(90)).expect("a reader still hangs 90 s later");
        let e = r.expect_err("a trickled read cannot succeed in time");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{}: {e}", path.display());
        assert!(took < Duration::from_secs(60), "{}: EIO only after {took:?}", path.display());
    }
    // The killed reader is gone too (not stuck in D state).
    let (tx, rx2) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(victim.wait());
    });
    rx2.recv_timeout(Duration::from_secs(60)).expect("the killed reader is still there").unwrap();
    assert!(m.log().contains("minimum rate"), "the daemon logs why the reads failed:\n{}", m.log());
    m.umount();
}

/// The read that starts its directory's load is answered from its own
/// request: the load leaves out the chunks that read fetches itself, so
/// the read is not held behind the load's larger request (which here
/// trickles for far longer than the read may take).
#[test]
fn the_read_that_starts_a_directory_load_is_not_held_behind_it() {
    if !mount_support::fuse_available() {
        return;
    }
    let tmp = scratch("dirload-first-read");
    // One chunk per file (--small-files 0): the first file's read asks for
    // its 20 KiB, the directory's load for the other 15 in one request of
    // about 300 KiB.
    let files: Vec<(String, Vec<u8>)> = (0..16u64).map(|i| (format!("pkg/m{i:02}.py"), Prng(0x6469_7200 + i).bytes(20 << 10))).collect();
    let src = tmp.path().join("src");
    files_layout(&src, &files);
    let reg = Distribution::start(RegistryAuth::None, None);
    ok(&["convert", "--quiet", "--small-files", "0", &format!("oci:{}:latest", src.display()), &format!("docker://{}/pkg:naiad", reg.host())]);
    // Answers longer than 64 KiB trickle, a byte every 100 ms; a request
    // may take 60 s.
    let proxy = TestProxy::start(reg.port, ProxyConfig { trickle_ranges: Some(Duration::from_millis(100)), trickle_ranges_longer_than: 64 << 10, ..Default::default() });
    let dir = tmp.path().join("mnt");
    fs::create_dir_all(&dir).unwrap();
    let flags: Vec<&std::ffi::OsStr> = ["--retries", "0", "--read-timeout", "60"].iter().map(std::ffi::OsStr::new).collect();
    let m = MountGuard::mount_with(&format!("docker://{}/pkg:naiad", proxy.host()), &dir, &dir.join("cache"), &flags);

    let (tx, rx) = std::sync::mpsc::channel();
    let path = m.path("pkg/m00.py");
    std::thread::spawn(move || {
        let _ = tx.send(fs::read(path));
    });
    let got = rx.recv_timeout(Duration::from_secs(30)).expect("the first read was held behind its directory's load");
    assert!(got.expect("the first read failed") == files[0].1, "pkg/m00.py: wrong bytes");
    let long_ranges = || {
        let log = proxy.stats.log.lock().unwrap().clone();
        log.iter()
            .filter_map(|l| l.split("bytes=").nth(1)?.split_once('-').and_then(|(a, b)| Some(b.parse::<u64>().ok()? + 1 - a.parse::<u64>().ok()?)))
            .filter(|&n| n > 64 << 10)
            .count()
    };
    assert!(mount_support::wait_until(Duration::from_secs(10), || long_ranges() > 0), "the directory's load never asked for the rest: {:?}", proxy.stats.log.lock().unwrap());
    m.umount();
}

#[test]
fn unpack_from_a_registry_batches_its_requests_across_small_files() {
    let reg = Distribution::start(RegistryAuth::None, None);
    let tmp = scratch("many");
    // 3,000 files of a few bytes: one request each before batching.
    let (layout, _) = many_files_image(tmp.path(), 3000);
    let dst = format!("docker://{}/many:1", reg.host());
    ok(&["convert", &format!("oci:{}:latest", layout.display()), &dst, "--quiet"]);
    let proxy = TestProxy::start(reg.port, ProxyConfig::default());
    let st = proxy.stats.clone();
    let image = NaiadImage::open_with(&ImageRef::parse(&format!("docker://{}/many:1", proxy.host())).unwrap(), &options()).unwrap();
    let blob_bytes: u64 = image.bootstrap.blobs().unwrap().iter().map(|b| b.size).sum();
    let before = ProxyStats::get(&st.blob_gets);

    for (name, tar) in [("dir", false), ("tar", true)] {
        let out = tmp.path().join(name);
        let gets = ProxyStats::get(&st.blob_gets);
        let src = format!("docker://{}/many:1", proxy.host());
        let out_s = out.to_str().unwrap();
        if tar {
            ok(&["unpack", &src, "--tar", out_s]);
        } else {
            ok(&["unpack", &src, out_s]);
        }
        let gets = ProxyStats::get(&st.blob_gets) - gets;
        // The bootstrap layer, and one request per 4 MiB of chunk blob plus a few.
        let allowed = 1 + blob_bytes.div_ceil(4 << 20) + 3;
        eprintln!("unpack to a {name}: {gets} blob GETs for 3,000 files ({blob_bytes} bytes of chunk blobs)");
        assert!(gets <= allowed, "unpack to a {name} made {gets} blob GETs, more than {allowed}");
        if !tar {
            for i in [0usize, 1, 999, 1000, 2999] {
                let p = out.join(format!("d{:04}/f{:03}", i / 1000, i % 1000));
                assert_eq!(fs::read_to_string(&p).unwrap(), format!("file {i}\n"), "{}", p.display());
            }
            assert_eq!(regular_files(&out).len(), 3000);
        } else {
            let listed = std::process::Command::new("tar").arg("-tf").arg(&out).output().unwrap();
            assert!(listed.status.success());
            assert_eq!(String::from_utf8_lossy(&listed.stdout).lines().filter(|l| l.contains("/f")).count(), 3000);
            let x = tmp.path().join("from-tar");
            fs::create_dir(&x).unwrap();
            assert!(std::process::Command::new("tar").arg("-xf").arg(&out).arg("-C").arg(&x).status().unwrap().success());
            assert_eq!(fs::read_to_string(x.join("d0002/f999")).unwrap(), "file 2999\n");
        }
    }
    assert!(ProxyStats::get(&st.blob_gets) > before);
}

/// `--chunk-dict` against a registry: `auto` finds the newest naiad tag of
/// the destination repository, the dictionary's blobs are not uploaded
/// again (already there, or mounted from the dictionary's repository), and
/// the result unpacks equal to the same version converted alone.
#[test]
fn chunk_dict_on_a_registry_reuses_the_old_blobs() {
    let reg = Distribution::start(RegistryAuth::None, None);
    let h = reg.host();
    let tmp = tempfile::Builder::new().prefix("naiad-test-regdict-").tempdir_in("/tmp").unwrap();
    let (v1, v2) = two_versions();
    let (src1, src2) = (tmp.path().join("src1"), tmp.path().join("src2"));
    files_layout(&src1, &v1);
    files_layout(&src2, &v2);
    let oci = |d: &std::path::Path| format!("oci:{}:latest", d.display());
    convert_json(&oci(&src1), &format!("docker://{h}/app:1.9"), &[], &[]);
    convert_json(&oci(&src1), &format!("docker://{h}/app:1.10"), &[], &[]);
    let s = convert_json(&oci(&src2), &format!("docker://{h}/app:1.11"), &["--chunk-dict", "auto"], &[]);
    assert_eq!(s["chunk_dicts"][0], format!("docker://{h}/app:1.10"), "the newest tag, as a version: {s}");
    assert!(s["dict_blobs"].as_u64().unwrap() >= 1 && s["dict_chunks"].as_u64().unwrap() > 0, "{s}");
    assert!(s["push"]["blobs_existing"].as_u64().unwrap() >= s["dict_blobs"].as_u64().unwrap(), "the dictionary's blobs are not uploaded again: {}", s["push"]);

    let other = convert_json(&oci(&src2), &format!("docker://{h}/other:2"), &["--chunk-dict", &format!("docker://{h}/app:1.10")], &[]);
    assert!(other["push"]["blobs_mounted"].as_u64().unwrap() >= other["dict_blobs"].as_u64().unwrap(), "mounted from the dictionary's repository: {}", other["push"]);

    let alone = tmp.path().join("alone");
    convert_json(&oci(&src2), &format!("oci:{}:2", alone.display()), &[], &[]);
    let expected = tmp.path().join("expected");
    ok(&["unpack", &format!("oci:{}:2", alone.display()), expected.to_str().unwrap()]);
    for image in [format!("docker://{h}/app:1.11"), format!("docker://{h}/other:2")] {
        ok(&["check", &image]);
        let got = tmp.path().join(format!("got-{}", image.len()));
        ok(&["unpack", &image, got.to_str().unwrap()]);
        let diffs = compare_trees(&expected, &got, &CompareOptions::default());
        assert!(diffs.is_empty(), "{image}: {}", diffs.join("\n"));
    }
}

/// A mount that will prefetch the startup set starts reading it as soon as
/// the manifest names it (`org.naiad.blob.startup-set`), beside the
/// bootstrap: the set's planned requests are then served from that one
/// read, verified chunk by chunk as always. Without it, each planned
/// request is a GET of its own.
#[test]
fn the_startup_set_is_read_from_the_manifest_on_in_one_request() {
    let reg = Distribution::start(RegistryAuth::None, None);
    let tmp = scratch("startup-set");
    let files: Vec<(String, Vec<u8>)> = (0..6u64).map(|i| (format!("app/f{i}.bin"), Prng(0x5e70 + i).bytes(100 << 10))).collect();
    let src = tmp.path().join("src");
    files_layout(&src, &files);
    let list = tmp.path().join("startup.list");
    fs::write(&list, "/app/*\n").unwrap();
    ok(&["convert", "--quiet", "--prefetch-list", list.to_str().unwrap(), &format!("oci:{}:latest", src.display()), &format!("docker://{}/set:1", reg.host())]);
    let proxy = TestProxy::start(reg.port, ProxyConfig::default());
    let r = ImageRef::parse(&format!("docker://{}/set:1", proxy.host())).unwrap();
    // Small requests, so that the set is planned as several.
    let limits = MergeLimits { max_request: 128 << 10, ..MergeLimits::default() };
    for ahead in [false, true] {
        let gets_of = |digest: &Digest| proxy.stats.log.lock().unwrap().iter().filter(|l| l.starts_with("GET ") && l.contains(digest.as_str())).count();
        let image = Arc::new(NaiadImage::open_cached(&r, &options(), None, &|_| ahead).unwrap_or_else(|e| panic!("open {r}: {e}")));
        let set: Vec<naiad_format::ChunkRecord> = image.bootstrap.prefetch().unwrap().iter().map(|&i| image.bootstrap.chunk(i).unwrap()).collect();
        let set_blob = image.blob_digests[set[0].blob_index as usize].clone();
        assert!(set.iter().all(|c| c.blob_index == set[0].blob_index), "the set is in one blob");
        let planned = naiad_reader::plan(&set, &limits).len();
        assert!(planned >= 3, "the set is planned as {planned} requests");
        let reader = ChunkReader::new(image.clone(), limits);
        let before = gets_of(&set_blob);
        let read = reader.read_chunks(&set);
        assert!(read.iter().all(Result::is_ok), "every chunk of the set reads and verifies");
        let stored: u64 = set.iter().map(|c| c.compressed_size as u64).sum();
        if ahead {
            // The started read went out while the image was opened.
            assert_eq!(gets_of(&set_blob), 1, "one GET for the whole set: {:?}", proxy.stats.log.lock().unwrap());
            assert_eq!(before, 1);
            // Its bytes are not kept once reads have taken each of them:
            // the set read again is fetched again.
            assert!(reader.read_chunks(&set).iter().all(Result::is_ok));
            assert_eq!(gets_of(&set_blob), 1 + planned, "the started read was forgotten after use");
        } else {
            assert_eq!(gets_of(&set_blob) - before, planned, "one GET per planned request");
        }
        eprintln!("startup set of {stored} bytes, {planned} planned requests: {} GETs of its blob (read ahead: {ahead})", gets_of(&set_blob));
        proxy.stats.log.lock().unwrap().clear();
    }
}
