//! Test support for registry tests (include with
//! `#[path = "common/registry_server.rs"] mod registry_server;`):
//!
//! - [`Distribution`]: the real CNCF Distribution registry
//!   (`/usr/bin/docker-registry`, Debian package `docker-registry`) on
//!   127.0.0.1 at a free port, filesystem storage in a temp dir, optional
//!   htpasswd or token auth, optional pull-through-cache mode; killed on drop.
//! - [`TokenServer`]: a tiny std::net token server issuing RS256 JWTs
//!   (signed with the `openssl` CLI, certificate in the JWT's `x5c`) that
//!   Distribution's `auth: token:` verifies against `rootcertbundle`.
//! - [`TestProxy`]: an HTTP/1.1 proxy between client and registry that
//!   counts connections, requests and blob bytes, and can inject faults
//!   (resets, 500s, delays, stalls, truncated bodies) on a deterministic
//!   pseudo-random share of requests, demand Basic auth and redirect blob
//!   GETs to another host name, ignore Range headers, or serve a tag's
//!   manifest for any digest.
//!
//! Everything listens on loopback only. Helpers panic with clear messages.
#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0")
}

fn wait_for_port(port: u16, what: &str, timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not start listening on 127.0.0.1:{port} within {timeout:?}");
}

// ---------------------------------------------------------------------------
// Distribution
// ---------------------------------------------------------------------------

/// How a [`Distribution`] authenticates.
#[derive(Clone, Debug)]
pub enum RegistryAuth {
    None,
    /// `htpasswd -Bbn USER PASS`.
    Htpasswd {
        user: String,
        password: String,
    },
    /// Bearer tokens from a [`TokenServer`].
    Token {
        realm: String,
        service: String,
        issuer: String,
        cert_pem: PathBuf,
    },
}

pub struct Distribution {
    pub port: u16,
    dir: tempfile::TempDir,
    config: PathBuf,
    child: Option<Child>,
    paused: bool,
}

impl Distribution {
    /// Starts a registry; `proxy_remote`: pull-through cache of that URL.
    pub fn start(auth: RegistryAuth, proxy_remote: Option<&str>) -> Self {
        Self::start_with(auth, proxy_remote, None)
    }

    /// [`Distribution::start`], serving HTTPS with `tls` = (certificate, key) PEM files.
    pub fn start_with(auth: RegistryAuth, proxy_remote: Option<&str>, tls: Option<(&Path, &Path)>) -> Self {
        let dir = tempfile::Builder::new().prefix("naiad-registry-").tempdir_in("/tmp").expect("registry tempdir");
        let port = free_port();
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage).expect("storage dir");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: naiad-test-secret\n",
            storage.display()
        );
        if let Some((cert, key)) = tls {
            config.push_str(&format!("  tls:\n    certificate: {}\n    key: {}\n", cert.display(), key.display()));
        }
        match &auth {
            RegistryAuth::None => {}
            RegistryAuth::Htpasswd { user, password } => {
                let out = Command::new("htpasswd").args(["-Bbn", user, password]).output().expect("run htpasswd (apache2-utils; scripts/install-test-deps.sh)");
                assert!(out.status.success(), "htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
                let file = dir.path().join("htpasswd");
                fs::write(&file, &out.stdout).expect("write htpasswd");
                config.push_str(&format!("auth:\n  htpasswd:\n    realm: naiad-test\n    path: {}\n", file.display()));
            }
            RegistryAuth::Token { realm, service, issuer, cert_pem } => {
                config.push_str(&format!("auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n", cert_pem.display()));
            }
        }
        if let Some(remote) = proxy_remote {
            config.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).expect("write config.yml");
        let mut reg = Distribution { port, dir, config: config_path, child: None, paused: false };
        reg.spawn();
        reg
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("registry log");
        let log2 = log.try_clone().expect("registry log");
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("start /usr/bin/docker-registry (Debian package docker-registry; scripts/install-test-deps.sh)");
        self.child = Some(child);
        wait_for_port(self.port, "docker-registry", Duration::from_secs(20));
    }

    /// The registry's filesystem storage (`docker/registry/v2/...`).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Kills the registry (its storage stays).
    pub fn stop(&mut self) {
        if self.paused {
            self.resume();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// SIGSTOP: connections are accepted by the kernel but never answered.
    pub fn pause(&mut self) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, libc::SIGSTOP) };
            self.paused = true;
        }
    }

    pub fn resume(&mut self) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
        }
        self.paused = false;
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `skopeo copy` into a plain-HTTP registry, with `extra` arguments
/// (`--dest-creds U:P`, ...).
pub fn skopeo_copy(src: &str, dst: &str, extra: &[&str]) {
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .args(extra)
        .arg(src)
        .arg(dst)
        .stdin(Stdio::null())
        .output()
        .expect("run skopeo (scripts/install-test-deps.sh)");
    assert!(out.status.success(), "skopeo copy {src} {dst} failed: {}", String::from_utf8_lossy(&out.stderr));
}

// ---------------------------------------------------------------------------
// Minimal HTTP/1.1 plumbing
// ---------------------------------------------------------------------------

/// A request or response head: first line and headers (names lower-cased).
#[derive(Clone, Debug, Default)]
pub struct Head {
    pub line: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    fn remove(&mut self, name: &str) {
        self.headers.retain(|(k, _)| k != name);
    }
    fn set(&mut self, name: &str, value: &str) {
        self.remove(name);
        self.headers.push((name.to_string(), value.to_string()));
    }
    fn to_bytes(&self) -> Vec<u8> {
        let mut s = format!("{}\r\n", self.line);
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {v}\r\n"));
        }
        s.push_str("\r\n");
        s.into_bytes()
    }
}

/// Reads a head; `None` at a clean end of stream.
fn read_head(r: &mut impl BufRead) -> Option<Head> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut head = Head { line: line.trim_end().to_string(), headers: Vec::new() };
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).ok()? == 0 {
            return None;
        }
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            head.headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Some(head)
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<()> {
    let mut s = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str("\r\n");
    let mut all = s.into_bytes();
    all.extend_from_slice(body);
    stream.write_all(&all)?;
    stream.flush()
}

/// Closes with RST instead of FIN (SO_LINGER 0): a "connection reset".
fn reset(stream: TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves `handle` on a loopback listener until the returned flag is set.
fn serve(listener: TcpListener, stop: Arc<AtomicBool>, handle: impl Fn(TcpStream) + Send + Sync + 'static) {
    let handle = Arc::new(handle);
    thread::spawn(move || {
        for conn in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            if let Ok(conn) = conn {
                let _ = conn.set_nodelay(true);
                let h = handle.clone();
                thread::spawn(move || h(conn));
            }
        }
    });
}

fn stop_listener(stop: &AtomicBool, port: u16) {
    stop.store(true, Ordering::SeqCst);
    let _ = TcpStream::connect(("127.0.0.1", port));
}

// ---------------------------------------------------------------------------
// Token server
// ---------------------------------------------------------------------------

/// Key and self-signed certificate for signing tokens.
pub struct SigningKey {
    pub key_pem: PathBuf,
    pub cert_pem: PathBuf,
    /// The certificate, DER, standard base64 (for the JWT `x5c` header).
    pub cert_b64: String,
}

/// A server certificate for 127.0.0.1 issued by a fresh test CA, made by
/// openssl in `dir`: (server key, server certificate, CA certificate).
pub fn make_server_cert(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |n: &str| dir.join(n);
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl (scripts/install-test-deps.sh)");
        assert!(out.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    };
    fs::write(p("server-ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n").expect("write ext file");
    openssl(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=naiad-test-ca", "-keyout", "ca-key.pem", "-out", "ca-cert.pem"]);
    openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server-key.pem", "-out", "server.csr"]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca-cert.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server-ext.cnf",
        "-out",
        "server-cert.pem",
    ]);
    (p("server-key.pem"), p("server-cert.pem"), p("ca-cert.pem"))
}

/// Generates an RSA key and certificate with the openssl CLI in `dir`.
pub fn make_signing_key(dir: &Path) -> SigningKey {
    let key_pem = dir.join("token-key.pem");
    let cert_pem = dir.join("token-cert.pem");
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=naiad-test-token-issuer", "-keyout"])
        .arg(&key_pem)
        .arg("-out")
        .arg(&cert_pem)
        .output()
        .expect("run openssl (scripts/install-test-deps.sh)");
    assert!(out.status.success(), "openssl req failed: {}", String::from_utf8_lossy(&out.stderr));
    let der = Command::new("openssl").args(["x509", "-outform", "DER", "-in"]).arg(&cert_pem).output().expect("openssl x509");
    assert!(der.status.success(), "openssl x509 failed");
    SigningKey { key_pem, cert_pem, cert_b64: base64::engine::general_purpose::STANDARD.encode(&der.stdout) }
}

pub struct TokenServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
    /// Tokens issued (good and poisoned).
    pub issued: Arc<AtomicU64>,
    /// Token requests refused (bad or missing credentials).
    pub refused: Arc<AtomicU64>,
    /// The next this-many tokens get a broken signature.
    pub poison: Arc<AtomicU64>,
    /// Token requests whose `Authorization` was not Basic for the user.
    pub anonymous_requests: Arc<AtomicU64>,
    /// Lifetime (`expires_in`, seconds) of the tokens issued from now on.
    pub expires_in: Arc<AtomicU64>,
}

pub const TOKEN_SERVICE: &str = "naiad-test-registry";
pub const TOKEN_ISSUER: &str = "naiad-test-issuer";

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

impl TokenServer {
    /// Issues tokens valid `expires_in` seconds to `user`:`password` for
    /// whatever scope they ask; anonymous requests get a token with no access.
    pub fn start(key: &SigningKey, user: &str, password: &str, expires_in: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind token server");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let poison = Arc::new(AtomicU64::new(0));
        let anonymous = Arc::new(AtomicU64::new(0));
        let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")));
        let (key_pem, cert_b64) = (key.key_pem.clone(), key.cert_b64.clone());
        let expires = Arc::new(AtomicU64::new(expires_in));
        let (i2, r2, p2, a2, e2) = (issued.clone(), refused.clone(), poison.clone(), anonymous.clone(), expires.clone());
        let user = user.to_string();
        serve(listener, stop.clone(), move |mut conn| {
            let mut reader = BufReader::new(match conn.try_clone() {
                Ok(c) => c,
                Err(_) => return,
            });
            while let Some(head) = read_head(&mut reader) {
                let target = head.line.split(' ').nth(1).unwrap_or("").to_string();
                let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
                let mut scopes = Vec::new();
                let mut service = String::new();
                for pair in query.split('&') {
                    if let Some((k, v)) = pair.split_once('=') {
                        match k {
                            "scope" => scopes.push(percent_decode(v)),
                            "service" => service = percent_decode(v),
                            _ => {}
                        }
                    }
                }
                let mut auth = head.get("authorization").map(str::to_string);
                // OAuth2's password grant (containerd): a POSTed form with
                // the credentials and the scopes.
                if head.line.starts_with("POST ") {
                    let len: usize = head.get("content-length").and_then(|v| v.trim().parse().ok()).unwrap_or(0);
                    let mut body = vec![0u8; len.min(1 << 16)];
                    if reader.read_exact(&mut body).is_err() {
                        break;
                    }
                    let (mut form_user, mut form_password) = (None, None);
                    for pair in String::from_utf8_lossy(&body).split('&') {
                        if let Some((k, v)) = pair.split_once('=') {
                            let v = percent_decode(&v.replace('+', " "));
                            match k {
                                "scope" => scopes.extend(v.split(' ').filter(|s| !s.is_empty()).map(String::from)),
                                "service" => service = v,
                                "username" => form_user = Some(v),
                                "password" => form_password = Some(v),
                                _ => {}
                            }
                        }
                    }
                    if let (Some(u), Some(p)) = (form_user, form_password) {
                        auth = Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))));
                    }
                }
                let authenticated = auth.as_deref() == Some(expected.as_str());
                if auth.is_some() && !authenticated {
                    r2.fetch_add(1, Ordering::SeqCst);
                    let _ = respond(&mut conn, "401 Unauthorized", &[("Content-Type", "application/json")], br#"{"details":"incorrect username or password"}"#);
                    continue;
                }
                if !authenticated {
                    a2.fetch_add(1, Ordering::SeqCst);
                }
                let access: Vec<serde_json::Value> = if authenticated {
                    scopes
                        .iter()
                        .filter_map(|s| {
                            let mut parts = s.splitn(3, ':');
                            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                            Some(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let expires_in = e2.load(Ordering::SeqCst);
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                let n = i2.fetch_add(1, Ordering::SeqCst);
                let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [cert_b64]});
                let claims = serde_json::json!({
                    "iss": TOKEN_ISSUER, "sub": if authenticated { user.as_str() } else { "" }, "aud": service,
                    "exp": now + expires_in.clamp(1, 86400) + 5, "nbf": now - 10, "iat": now, "jti": format!("naiad-test-{n}"),
                    "access": access,
                });
                let signing_input = format!("{}.{}", b64url(header.to_string().as_bytes()), b64url(claims.to_string().as_bytes()));
                let mut sig = sign_rs256(&key_pem, signing_input.as_bytes());
                if p2.load(Ordering::SeqCst) > 0 {
                    p2.fetch_sub(1, Ordering::SeqCst);
                    if let Some(b) = sig.first_mut() {
                        *b ^= 0xff;
                    }
                }
                let token = format!("{signing_input}.{}", b64url(&sig));
                let body = serde_json::json!({"token": token, "access_token": token, "expires_in": expires_in, "issued_at": "2024-01-01T00:00:00Z"}).to_string();
                if respond(&mut conn, "200 OK", &[("Content-Type", "application/json")], body.as_bytes()).is_err() {
                    break;
                }
            }
        });
        TokenServer { port, stop, issued, refused, poison, anonymous_requests: anonymous, expires_in: expires }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        stop_listener(&self.stop, self.port);
    }
}

fn sign_rs256(key_pem: &Path, data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key_pem)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run openssl dgst");
    child.stdin.take().expect("stdin").write_all(data).expect("write to openssl");
    let out = child.wait_with_output().expect("openssl dgst");
    assert!(out.status.success(), "openssl dgst -sign failed");
    out.stdout
}

// ---------------------------------------------------------------------------
// Counting, fault-injecting proxy
// ---------------------------------------------------------------------------

/// Fault shares in percent of eligible (GET/HEAD) requests.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    pub seed: u64,
    pub reset_pct: u32,
    pub error500_pct: u32,
    pub truncate_pct: u32,
    /// Answer after `delay`.
    pub delay_pct: u32,
    pub delay: Duration,
    /// Say nothing for `stall` (longer than the client's read timeout).
    pub stall_pct: u32,
    pub stall: Duration,
    /// 429 Too Many Requests with `Retry-After: 1`.
    pub error429_pct: u32,
}

#[derive(Clone, Debug, Default)]
pub struct ProxyConfig {
    pub faults: Option<FaultPlan>,
    /// Demand this user:password as Basic auth on every request, except
    /// redirected blob GETs; answer 401 with a Basic challenge otherwise.
    pub require_basic: Option<(String, String)>,
    /// Answer blob GETs with a 307 to the same path on `localhost:PORT`
    /// (this proxy under another host name).
    pub redirect_blobs: bool,
    /// Drop Range headers (the registry then answers 200 with the whole blob).
    pub ignore_range: bool,
    /// Serve `manifests/<this tag>` for any request of `manifests/sha256:...`.
    pub manifest_digest_to_tag: Option<String>,
    /// Answer ranged blob GETs one body byte per this interval (a server
    /// that trickles); the headers come at once.
    pub trickle_ranges: Option<Duration>,
    /// With `trickle_ranges`: only answers longer than this many bytes
    /// trickle (0: all).
    pub trickle_ranges_longer_than: u64,
}

#[derive(Debug, Default)]
pub struct ProxyStats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub blob_gets: AtomicU64,
    /// Body bytes of blob GET responses sent to the client.
    pub blob_body_bytes: AtomicU64,
    pub resets: AtomicU64,
    pub errors500: AtomicU64,
    pub truncations: AtomicU64,
    pub delays: AtomicU64,
    pub stalls: AtomicU64,
    pub errors429: AtomicU64,
    pub redirects: AtomicU64,
    /// Requests that arrived through a redirect and carried Authorization.
    pub redirected_with_auth: AtomicU64,
    pub redirected_requests: AtomicU64,
    /// `METHOD PATH [Range]` of every request.
    pub log: Mutex<Vec<String>>,
}

impl ProxyStats {
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::SeqCst)
    }
    pub fn faults(&self) -> u64 {
        [&self.resets, &self.errors500, &self.truncations, &self.stalls, &self.errors429].iter().map(|v| v.load(Ordering::SeqCst)).sum()
    }
    pub fn summary(&self) -> String {
        let g = |v: &AtomicU64| v.load(Ordering::SeqCst);
        format!(
            "connections {} requests {} blob_gets {} blob_bytes {} resets {} 500s {} truncations {} delays {} stalls {}",
            g(&self.connections),
            g(&self.requests),
            g(&self.blob_gets),
            g(&self.blob_body_bytes),
            g(&self.resets),
            g(&self.errors500),
            g(&self.truncations),
            g(&self.delays),
            g(&self.stalls)
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    Reset,
    Error500,
    Truncate,
    Delay,
    Stall,
    TooMany,
}

struct FaultDice {
    plan: FaultPlan,
    state: u64,
    /// Faults in a row, capped so no request is starved of attempts.
    streak: u32,
}

impl FaultDice {
    fn roll(&mut self) -> Fault {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let x = (self.state % 100) as u32;
        let p = &self.plan;
        let mut edge = 0;
        let mut pick = Fault::None;
        for (pct, f) in [
            (p.reset_pct, Fault::Reset),
            (p.error500_pct, Fault::Error500),
            (p.truncate_pct, Fault::Truncate),
            (p.delay_pct, Fault::Delay),
            (p.stall_pct, Fault::Stall),
            (p.error429_pct, Fault::TooMany),
        ] {
            edge += pct;
            if x < edge {
                pick = f;
                break;
            }
        }
        if pick != Fault::None && pick != Fault::Delay {
            if self.streak >= 2 {
                self.streak = 0;
                return Fault::None;
            }
            self.streak += 1;
        } else {
            self.streak = 0;
        }
        pick
    }
}

pub struct TestProxy {
    pub port: u16,
    pub stats: Arc<ProxyStats>,
    stop: Arc<AtomicBool>,
}

impl TestProxy {
    /// A proxy on 127.0.0.1 forwarding to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16, config: ProxyConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let stats = Arc::new(ProxyStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let dice = Arc::new(Mutex::new(config.faults.clone().map(|plan| FaultDice { state: plan.seed | 1, plan, streak: 0 })));
        let s2 = stats.clone();
        let config = Arc::new(config);
        serve(listener, stop.clone(), move |conn| {
            s2.connections.fetch_add(1, Ordering::SeqCst);
            proxy_connection(conn, upstream, port, &config, &s2, &dice);
        });
        TestProxy { port, stats, stop }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        stop_listener(&self.stop, self.port);
    }
}

fn proxy_connection(client: TcpStream, upstream: u16, own_port: u16, config: &ProxyConfig, stats: &ProxyStats, dice: &Mutex<Option<FaultDice>>) {
    let mut client_w = match client.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    let mut reader = BufReader::new(client);
    while let Some(mut head) = read_head(&mut reader) {
        let mut body = vec![0u8; head.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0)];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        stats.requests.fetch_add(1, Ordering::SeqCst);
        let mut parts = head.line.splitn(3, ' ');
        let method = parts.next().unwrap_or("").to_string();
        let mut target = parts.next().unwrap_or("").to_string();
        let version = parts.next().unwrap_or("HTTP/1.1").to_string();
        let is_blob_get = method == "GET" && target.contains("/blobs/sha256:");
        let redirected = target.contains("naiad-redirected=1");
        if let Ok(mut log) = stats.log.lock() {
            log.push(format!("{method} {target} {}", head.get("range").unwrap_or("")).trim_end().to_string());
        }
        if redirected {
            stats.redirected_requests.fetch_add(1, Ordering::SeqCst);
            if head.get("authorization").is_some() {
                stats.redirected_with_auth.fetch_add(1, Ordering::SeqCst);
            }
        }
        if let Some((u, p)) = &config.require_basic {
            let want = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")));
            if !redirected && head.get("authorization") != Some(want.as_str()) {
                if respond(
                    &mut client_w,
                    "401 Unauthorized",
                    &[("WWW-Authenticate", "Basic realm=\"naiad-proxy\""), ("Content-Type", "application/json")],
                    br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
                )
                .is_err()
                {
                    return;
                }
                continue;
            }
        }
        if config.redirect_blobs && is_blob_get && !redirected {
            stats.redirects.fetch_add(1, Ordering::SeqCst);
            let sep = if target.contains('?') { '&' } else { '?' };
            let location = format!("http://localhost:{own_port}{target}{sep}naiad-redirected=1");
            if respond(&mut client_w, "307 Temporary Redirect", &[("Location", &location)], b"").is_err() {
                return;
            }
            continue;
        }
        if let Some(tag) = &config.manifest_digest_to_tag {
            if let Some(i) = target.find("/manifests/sha256:") {
                target = format!("{}/manifests/{tag}", &target[..i]);
            }
        }
        if redirected {
            head.remove("authorization");
        }
        if config.ignore_range {
            head.remove("range");
        }
        let fault = if method == "GET" || method == "HEAD" { dice.lock().ok().and_then(|mut d| d.as_mut().map(FaultDice::roll)).unwrap_or(Fault::None) } else { Fault::None };
        let plan = config.faults.clone().unwrap_or_default();
        if fault == Fault::Reset {
            stats.resets.fetch_add(1, Ordering::SeqCst);
            if let Ok(c) = client_w.try_clone() {
                reset(c);
            }
            let _ = client_w.shutdown(Shutdown::Both);
            return;
        }
        if fault == Fault::TooMany {
            stats.errors429.fetch_add(1, Ordering::SeqCst);
            if respond(
                &mut client_w,
                "429 Too Many Requests",
                &[("Retry-After", "1"), ("Content-Type", "application/json")],
                br#"{"errors":[{"code":"TOOMANYREQUESTS","message":"injected"}]}"#,
            )
            .is_err()
            {
                return;
            }
            continue;
        }
        if fault == Fault::Error500 {
            stats.errors500.fetch_add(1, Ordering::SeqCst);
            if respond(&mut client_w, "500 Internal Server Error", &[("Content-Type", "application/json")], br#"{"errors":[{"code":"UNKNOWN","message":"injected fault"}]}"#)
                .is_err()
            {
                return;
            }
            continue;
        }
        // Forward on a fresh upstream connection that closes after the response.
        head.line = format!("{method} {target} {version}");
        head.set("connection", "close");
        head.set("host", &format!("127.0.0.1:{upstream}"));
        let response = (|| -> std::io::Result<Vec<u8>> {
            let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
            up.set_nodelay(true)?;
            up.set_read_timeout(Some(Duration::from_secs(60)))?;
            let mut request = head.to_bytes();
            request.extend_from_slice(&body);
            up.write_all(&request)?;
            let mut all = Vec::new();
            up.read_to_end(&mut all)?;
            Ok(all)
        })();
        let Ok(raw) = response else {
            let _ = respond(&mut client_w, "502 Bad Gateway", &[], b"");
            return;
        };
        let mut cursor = std::io::Cursor::new(&raw[..]);
        let Some(mut rhead) = read_head(&mut cursor) else {
            let _ = respond(&mut client_w, "502 Bad Gateway", &[], b"");
            return;
        };
        let rbody = &raw[cursor.position() as usize..];
        let delimited = rhead.get("content-length").is_some() || rhead.get("transfer-encoding").is_some() || method == "HEAD";
        rhead.remove("connection");
        if !delimited {
            rhead.set("connection", "close");
        }
        match fault {
            Fault::Delay => {
                stats.delays.fetch_add(1, Ordering::SeqCst);
                thread::sleep(plan.delay);
            }
            Fault::Stall => {
                stats.stalls.fetch_add(1, Ordering::SeqCst);
                thread::sleep(plan.stall);
                let _ = client_w.shutdown(Shutdown::Both);
                return;
            }
            _ => {}
        }
        if fault == Fault::Truncate && rbody.len() > 1 {
            stats.truncations.fetch_add(1, Ordering::SeqCst);
            let _ = client_w.write_all(&rhead.to_bytes());
            let _ = client_w.write_all(&rbody[..rbody.len() / 2]);
            let _ = client_w.flush();
            let _ = client_w.shutdown(Shutdown::Both);
            return;
        }
        if is_blob_get {
            stats.blob_gets.fetch_add(1, Ordering::SeqCst);
            stats.blob_body_bytes.fetch_add(rbody.len() as u64, Ordering::SeqCst);
        }
        let trickles = is_blob_get && head.get("range").is_some() && rbody.len() as u64 > config.trickle_ranges_longer_than;
        if let (Some(interval), true) = (config.trickle_ranges, trickles) {
            if client_w.write_all(&rhead.to_bytes()).and_then(|_| client_w.flush()).is_err() {
                return;
            }
            for b in rbody {
                thread::sleep(interval);
                // Ends when the client gives up and closes.
                if client_w.write_all(&[*b]).and_then(|_| client_w.flush()).is_err() {
                    return;
                }
            }
            continue;
        }
        let mut answer = rhead.to_bytes();
        answer.extend_from_slice(rbody);
        if client_w.write_all(&answer).and_then(|_| client_w.flush()).is_err() {
            return;
        }
        if !delimited {
            let _ = client_w.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// Lines of `text` containing `needle` (for registry logs).
pub fn count_lines(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}
