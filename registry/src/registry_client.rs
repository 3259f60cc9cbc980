//! [`RegistryClient`]: one registry's HTTP API (OCI distribution spec) over
//! one reqwest client, so connections are reused and any number of threads
//! may have requests in flight.
//!
//! Every request goes through [`RegistryClient::execute`], which
//! - authorizes it ([`Authenticator`]: anonymous, Basic or bearer token),
//!   answering a 401 by (re)authenticating and trying again;
//! - follows redirects itself, sending `Authorization` only to the host the
//!   request was for, never to another one (blob storage behind a redirect
//!   gets its own signed URL);
//! - retries with exponential backoff and jitter on connection failures,
//!   timeouts, 429 (honouring Retry-After), 5xx, and whatever the caller's
//!   response handler calls retryable (a truncated body), a bounded number
//!   of times.
//!
//! Blob GETs try the configured mirrors first (one attempt each; a mirror
//! that cannot be reached is skipped for a while) and fall back to the
//! origin. Plain HTTP is used for loopback hosts and `--insecure-registry`
//! hosts, TLS (rustls, system and webpki roots plus `--ca-file`) otherwise.
//! Errors name host, repository and digest; never credentials or tokens.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, Response};
use reqwest::header::{HeaderName, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use reqwest::{Method, Url};

use crate::authenticator::{Authenticator, RealmPolicy, SentAuth};
use crate::credentials::CredentialStore;
use crate::digest::Digest;
use crate::docker_ref::{endpoint_host, host_without_port, is_loopback_host, DockerReference};
use crate::error::{RegistryError, Result};
use crate::layout::MAX_JSON_SIZE;
use crate::registry_options::RegistryOptions;
use crate::retry::{parse_retry_after, RetryPolicy};

/// Manifest media types naiad asks for, most wanted first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json";
const MAX_REDIRECTS: usize = 10;
/// Largest blob prefix read (and sliced) when a server ignores a Range header.
pub const MAX_UNRANGED_PREFIX: u64 = 8 << 20;

/// One request, rebuilt for every attempt.
#[derive(Clone)]
pub struct RequestSpec {
    pub method: Method,
    pub url: Url,
    pub headers: Vec<(HeaderName, String)>,
    pub body: Option<Vec<u8>>,
    /// Token scopes the request needs (`repository:NAME:pull`).
    pub scopes: Vec<String>,
    /// What the request is about, for errors and logs (`manifest img:1`).
    pub what: String,
}

impl RequestSpec {
    pub fn new(method: Method, url: Url, scopes: Vec<String>, what: impl Into<String>) -> Self {
        RequestSpec { method, url, headers: Vec::new(), body: None, scopes, what: what.into() }
    }
    pub fn header(mut self, name: HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
    pub fn body(mut self, body: Vec<u8>) -> Self {
        self.body = Some(body);
        self
    }
}

/// How a response handler's failure should be treated.
pub enum AttemptError {
    /// Try again (after backoff), e.g. a body shorter than announced.
    Retryable(RegistryError),
    /// Give up now.
    Fatal(RegistryError),
}

/// A manifest or index as the registry sent it.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    /// sha256 of `bytes` (verified against what was asked for).
    pub digest: Digest,
}

/// What [`RegistryClient`] has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// Requests sent (each attempt counts; redirects do not).
    pub requests: u64,
    /// Attempts that were retries after a failure.
    pub retries: u64,
    pub tokens_fetched: u64,
    /// Blob reads a mirror answered.
    pub mirror_reads: u64,
    /// Blob reads a mirror failed and the origin (or a later mirror) served.
    pub mirror_fallbacks: u64,
    /// Blob body bytes received, from mirrors and origin.
    pub blob_bytes_received: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    mirror_reads: AtomicU64,
    mirror_fallbacks: AtomicU64,
    blob_bytes: AtomicU64,
}

struct Mirror {
    base: Url,
    down_until: Mutex<Option<Instant>>,
}

impl Mirror {
    fn available(&self) -> bool {
        self.down_until.lock().map(|d| d.is_none_or(|t| Instant::now() >= t)).unwrap_or(true)
    }
    fn mark_down(&self, cooldown: Duration) {
        if let Ok(mut d) = self.down_until.lock() {
            *d = Some(Instant::now() + cooldown);
        }
    }
}

struct ClientInner {
    /// The registry's name as references write it (`docker.io`, `127.0.0.1:5000`).
    registry: String,
    /// The host (and port) its API is served from.
    host: String,
    base: Url,
    http: Client,
    auth: Authenticator,
    retry: RetryPolicy,
    mirrors: Vec<Mirror>,
    options: RegistryOptions,
    counters: Counters,
}

/// A client for one registry. Cloning is cheap and shares connections,
/// tokens and counters.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient").field("registry", &self.inner.registry).field("base", &self.inner.base.as_str()).finish_non_exhaustive()
    }
}

/// `host[:port]` of a URL, as requests to it are authorized.
pub fn host_port(url: &Url) -> String {
    let host = url.host_str().unwrap_or("").to_ascii_lowercase();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host,
    }
}

/// A reqwest error as one line (cause chain included, URL left out).
pub fn describe_reqwest_error(e: &reqwest::Error) -> String {
    let mut msg = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else if e.is_body() || e.is_decode() {
        "reading the response failed".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    let mut seen = Vec::new();
    while let Some(s) = source {
        let text = s.to_string();
        let redundant = e.is_timeout() && text.contains("timed out");
        if !redundant && !seen.contains(&text) && !text.contains("://") {
            msg.push_str(": ");
            msg.push_str(&text);
            seen.push(text);
        }
        source = s.source();
    }
    msg
}

fn scope_pull(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

fn scope_push(repo: &str) -> String {
    format!("repository:{repo}:pull,push")
}

/// The short error text a registry puts in its JSON error body.
fn error_message(resp: Response) -> String {
    let mut body = Vec::new();
    let _ = resp.take(16 << 10).read_to_end(&mut body);
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let from_json = parsed.as_ref().and_then(|v| v.get("errors")).and_then(|e| e.as_array()).map(|errors| {
        errors
            .iter()
            .map(|e| {
                let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
                let message = e.get("message").and_then(|c| c.as_str()).unwrap_or("");
                format!("{code} {message}").trim().to_string()
            })
            .collect::<Vec<_>>()
            .join("; ")
    });
    let text = from_json.unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
    text.chars().filter(|c| !c.is_control()).take(300).collect()
}

impl RegistryClient {
    /// A client for `registry` (a name as references write it: `docker.io`,
    /// `host:port`), configured by `options`.
    pub fn new(registry: &str, options: &RegistryOptions) -> Result<Self> {
        let host = endpoint_host(registry).to_string();
        let insecure = is_loopback_host(&host) || options.insecure_registries.iter().any(|h| h.eq_ignore_ascii_case(&host) || h.eq_ignore_ascii_case(host_without_port(&host)));
        let scheme = if insecure { "http" } else { "https" };
        let base =
            Url::parse(&format!("{scheme}://{host}/")).map_err(|_| RegistryError::BadReference { reference: registry.into(), reason: "not a valid registry host".into() })?;
        let mut mirrors = Vec::new();
        for m in &options.mirrors {
            let mut text = m.trim().to_string();
            if !text.contains("://") {
                let scheme = if is_loopback_host(text.split('/').next().unwrap_or("")) { "http" } else { "https" };
                text = format!("{scheme}://{text}");
            }
            if !text.ends_with('/') {
                text.push('/');
            }
            let url = Url::parse(&text).map_err(|_| RegistryError::Config(format!("mirror {m:?} is not a URL")))?;
            if url.scheme() != "http" && url.scheme() != "https" {
                return Err(RegistryError::Config(format!("mirror {m:?}: only http and https are supported")));
            }
            mirrors.push(Mirror { base: url, down_until: Mutex::new(None) });
        }
        let all_loopback = is_loopback_host(&host) && mirrors.iter().all(|m| m.base.host_str().is_some_and(is_loopback_host));
        let http = build_http_client(options, all_loopback)?;
        let retry = RetryPolicy { max_attempts: options.max_attempts.max(1), base_delay: options.retry_base_delay, max_delay: options.retry_max_delay };
        Ok(RegistryClient {
            inner: Arc::new(ClientInner {
                registry: registry.to_string(),
                auth: Authenticator::new(
                    CredentialStore::new(&host, options.credentials.clone()),
                    RealmPolicy { https_registry: !insecure, insecure_hosts: options.insecure_registries.clone() },
                ),
                host,
                base,
                http,
                retry,
                mirrors,
                options: options.clone(),
                counters: Counters::default(),
            }),
        })
    }

    /// A client for the registry `reference` is in.
    pub fn for_reference(reference: &DockerReference, options: &RegistryOptions) -> Result<Self> {
        Self::new(&reference.registry, options)
    }

    pub fn registry(&self) -> &str {
        &self.inner.registry
    }

    /// The API's base URL (`https://host/`).
    pub fn base_url(&self) -> &Url {
        &self.inner.base
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.inner.options
    }

    pub fn stats(&self) -> RegistryStats {
        let c = &self.inner.counters;
        RegistryStats {
            requests: c.requests.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            tokens_fetched: self.inner.auth.tokens_fetched.load(Ordering::Relaxed),
            mirror_reads: c.mirror_reads.load(Ordering::Relaxed),
            mirror_fallbacks: c.mirror_fallbacks.load(Ordering::Relaxed),
            blob_bytes_received: c.blob_bytes.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn count_blob_bytes(&self, n: u64) {
        self.inner.counters.blob_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// `base` joined with `v2/PATH`.
    fn api_url(&self, base: &Url, path: &str) -> Result<Url> {
        base.join(&format!("v2/{path}")).map_err(|_| RegistryError::BadReference { reference: format!("{}/{path}", self.inner.registry), reason: "cannot form a URL".into() })
    }

    pub(crate) fn url(&self, path: &str) -> Result<Url> {
        self.api_url(&self.inner.base, path)
    }

    /// Resolves a `Location` header value against the URL it answered.
    pub(crate) fn resolve_location(&self, from: &Url, resp: &Response, what: &str) -> Result<Url> {
        let loc = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()).ok_or_else(|| self.bad_response(what, "no Location header"))?;
        from.join(loc).map_err(|_| self.bad_response(what, "Location header is not a URL"))
    }

    pub(crate) fn bad_response(&self, what: &str, reason: impl Into<String>) -> RegistryError {
        RegistryError::BadResponse { host: self.inner.host.clone(), what: what.to_string(), reason: reason.into() }
    }

    pub(crate) fn http_error(&self, what: &str, resp: Response) -> RegistryError {
        let status = resp.status().as_u16();
        RegistryError::Http { host: host_port(resp.url()), what: what.to_string(), status, message: error_message(resp) }
    }

    /// Sends `spec` with authorization, redirects and retries under
    /// `policy`, passing each usable response to `handle`.
    pub fn execute<T>(&self, spec: &RequestSpec, policy: &RetryPolicy, mut handle: impl FnMut(Response) -> std::result::Result<T, AttemptError>) -> Result<T> {
        let host = host_port(&spec.url);
        let mut scopes = spec.scopes.clone();
        let mut attempt = 0u32;
        let mut auth_rounds = 0u32;
        loop {
            attempt += 1;
            self.inner.counters.requests.fetch_add(1, Ordering::Relaxed);
            let (error, retry_after) = match self.send_following_redirects(spec, &host, &scopes) {
                Err(AttemptError::Fatal(e)) => return Err(e),
                Err(AttemptError::Retryable(e)) => (e, None),
                Ok((resp, sent, same_host)) => {
                    let status = resp.status().as_u16();
                    if status == 401 && same_host {
                        if auth_rounds < 3 && self.inner.auth.on_unauthorized(&host, &resp, &sent, &mut scopes)? {
                            auth_rounds += 1;
                            attempt -= 1;
                            continue;
                        }
                        return Err(self.unauthorized(&host, spec, &sent, resp));
                    }
                    if status == 429 || (status >= 500 && status != 501 && status != 505) {
                        let retry_after = resp.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
                        (self.http_error(&spec.what, resp), retry_after)
                    } else {
                        match handle(resp) {
                            Ok(v) => return Ok(v),
                            Err(AttemptError::Fatal(e)) => return Err(e),
                            Err(AttemptError::Retryable(e)) => (e, None),
                        }
                    }
                }
            };
            if attempt >= policy.max_attempts.max(1) {
                return Err(match error {
                    RegistryError::Network { host, what, reason } if attempt > 1 => {
                        RegistryError::Network { host, what, reason: format!("{reason} (gave up after {attempt} attempts)") }
                    }
                    e => e,
                });
            }
            let delay = policy.delay(attempt, retry_after);
            tracing::debug!("{}: {error}; retrying in {delay:?} (attempt {} of {})", spec.what, attempt + 1, policy.max_attempts);
            self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(delay);
        }
    }

    fn unauthorized(&self, host: &str, spec: &RequestSpec, sent: &SentAuth, resp: Response) -> RegistryError {
        let detail = error_message(resp);
        let reason = if sent.header().is_some() {
            if self.inner.auth.has_credentials(host) {
                "the registry refused the credentials".to_string()
            } else {
                "the registry refused anonymous access (use --creds or a docker config)".to_string()
            }
        } else if self.inner.auth.has_credentials(host) {
            "the registry refused the request".to_string()
        } else {
            "authentication required (use --creds or a docker config)".to_string()
        };
        let reason = if detail.is_empty() { reason } else { format!("{reason} ({detail})") };
        RegistryError::Unauthorized { host: host.to_string(), what: spec.what.clone(), reason }
    }

    fn send_following_redirects(&self, spec: &RequestSpec, host: &str, scopes: &[String]) -> std::result::Result<(Response, SentAuth, bool), AttemptError> {
        let sent = self.inner.auth.authorize(&self.inner.http, &self.inner.retry, host, scopes).map_err(AttemptError::Fatal)?;
        let mut url = spec.url.clone();
        let mut method = spec.method.clone();
        let mut body = spec.body.clone();
        for _ in 0..=MAX_REDIRECTS {
            let same_host = host_port(&url) == host && url.scheme() == spec.url.scheme();
            let mut req = self.inner.http.request(method.clone(), url.clone());
            for (k, v) in &spec.headers {
                req = req.header(k, v);
            }
            if same_host {
                if let Some(h) = sent.header() {
                    req = req.header(AUTHORIZATION, h);
                }
            }
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            let resp = req.send().map_err(|e| {
                let retryable = !e.is_builder();
                let err = RegistryError::Network { host: host_port(&url), what: spec.what.clone(), reason: describe_reqwest_error(&e) };
                if retryable {
                    AttemptError::Retryable(err)
                } else {
                    AttemptError::Fatal(err)
                }
            })?;
            let status = resp.status().as_u16();
            if matches!(status, 301 | 302 | 303 | 307 | 308) {
                let next = self.resolve_location(&url, &resp, &spec.what).map_err(AttemptError::Fatal)?;
                if next.scheme() != "http" && next.scheme() != "https" {
                    return Err(AttemptError::Fatal(self.bad_response(&spec.what, "redirect to a non-HTTP URL")));
                }
                if status == 303 {
                    method = Method::GET;
                    body = None;
                }
                tracing::debug!("{}: redirected from {} to {}", spec.what, host_port(&url), host_port(&next));
                url = next;
                continue;
            }
            return Ok((resp, sent, same_host));
        }
        Err(AttemptError::Fatal(self.bad_response(&spec.what, format!("more than {MAX_REDIRECTS} redirects"))))
    }

    /// The retry policy from the options.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.retry
    }

    /// Checks the registry answers (`GET /v2/`), authenticating if asked.
    pub fn ping(&self) -> Result<()> {
        let spec = RequestSpec::new(Method::GET, self.url("")?, vec![], format!("registry {}", self.inner.registry));
        self.execute(&spec, &self.inner.retry, |resp| if resp.status().is_success() { Ok(()) } else { Err(AttemptError::Fatal(self.http_error(&spec.what, resp))) })
    }

    /// Opens one more connection to the registry on a thread of its own
    /// (a `GET /v2/` whose answer, whatever it is, is thrown away), so that
    /// requests sent side by side soon after find it ready instead of
    /// waiting for a connection (and a TLS handshake) of their own.
    pub fn warm_connection(&self) {
        let Ok(url) = self.url("") else { return };
        let http = self.inner.http.clone();
        let _ = std::thread::Builder::new().name("naiad-warm-connection".into()).spawn(move || {
            if let Ok(resp) = http.get(url).send() {
                // Read to the end, so the connection goes back to the pool.
                let _ = resp.bytes();
            }
        });
    }

    /// Fetches manifest `reference` (tag or digest) of `repo`. Pulled by
    /// digest, the bytes must hash to it; pulled by tag, to the
    /// Docker-Content-Digest the registry announces, if it does.
    pub fn get_manifest(&self, repo: &str, reference: &str) -> Result<FetchedManifest> {
        let display = format!("docker://{}/{repo}{}{reference}", self.inner.registry, if reference.starts_with("sha256:") { "@" } else { ":" });
        let what = format!("manifest {display}");
        let wanted = if reference.starts_with("sha256:") { Some(Digest::parse(reference)?) } else { None };
        let spec = RequestSpec::new(Method::GET, self.url(&format!("{repo}/manifests/{reference}"))?, vec![scope_pull(repo)], what.clone()).header(ACCEPT, MANIFEST_ACCEPT);
        self.execute(&spec, &self.inner.retry, |resp| {
            let status = resp.status().as_u16();
            if status == 404 {
                let thing = if wanted.is_some() { "manifest" } else { "tag" };
                return Err(AttemptError::Fatal(RegistryError::NotFound { reference: display.clone(), what: thing.into(), detail: error_message(resp) }));
            }
            if status != 200 {
                return Err(AttemptError::Fatal(self.http_error(&what, resp)));
            }
            let announced = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_string);
            let content_type = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(|v| v.split(';').next().unwrap_or("").trim().to_string());
            let deadline = self.inner.options.body_deadline(resp.content_length().unwrap_or(MAX_JSON_SIZE));
            let bytes = read_body(resp, MAX_JSON_SIZE, deadline, &self.inner.host, &what)?;
            let digest = Digest::of(&bytes);
            if let Some(w) = &wanted {
                if &digest != w {
                    return Err(AttemptError::Fatal(RegistryError::ManifestDigestMismatch { reference: display.clone(), expected: w.to_string(), actual: digest.to_string() }));
                }
            } else if let Some(a) = announced.as_deref().filter(|a| a.starts_with("sha256:")) {
                if a != digest.as_str() {
                    return Err(AttemptError::Fatal(RegistryError::ManifestDigestMismatch {
                        reference: format!("{display} (Docker-Content-Digest)"),
                        expected: a.to_string(),
                        actual: digest.to_string(),
                    }));
                }
            }
            let body_type = serde_json::from_slice::<serde_json::Value>(&bytes).ok().and_then(|v| v.get("mediaType").and_then(|m| m.as_str()).map(str::to_string));
            let media_type = body_type.or(content_type).unwrap_or_default();
            Ok(FetchedManifest { bytes, media_type, digest })
        })
    }

    /// The tags of `repo` (the first page the registry gives: `tags/list`
    /// pages at 100 or more); a repository that does not exist has none.
    pub fn list_tags(&self, repo: &str) -> Result<Vec<String>> {
        let what = format!("tags of {}/{repo}", self.inner.registry);
        let spec = RequestSpec::new(Method::GET, self.url(&format!("{repo}/tags/list"))?, vec![scope_pull(repo)], what.clone());
        self.execute(&spec, &self.inner.retry, |resp| {
            match resp.status().as_u16() {
                200 => {}
                404 => return Ok(Vec::new()),
                _ => return Err(AttemptError::Fatal(self.http_error(&what, resp))),
            }
            let deadline = self.inner.options.body_deadline(resp.content_length().unwrap_or(MAX_JSON_SIZE));
            let bytes = read_body(resp, MAX_JSON_SIZE, deadline, &self.inner.host, &what)?;
            #[derive(serde::Deserialize)]
            struct TagList {
                tags: Option<Vec<String>>,
            }
            let list: TagList = serde_json::from_slice(&bytes).map_err(|source| AttemptError::Fatal(RegistryError::Json { what: what.clone(), source }))?;
            Ok(list.tags.unwrap_or_default())
        })
    }

    /// The size of blob `digest` in `repo`, or `None` if it is not there.
    pub fn head_blob(&self, repo: &str, digest: &Digest) -> Result<Option<u64>> {
        let what = format!("blob {digest} in {}/{repo}", self.inner.registry);
        let spec = RequestSpec::new(Method::HEAD, self.url(&format!("{repo}/blobs/{digest}"))?, vec![scope_pull(repo)], what.clone());
        self.execute(&spec, &self.inner.retry, |resp| match resp.status().as_u16() {
            200 => Ok(Some(resp.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0))),
            404 => Ok(None),
            _ => Err(AttemptError::Fatal(self.http_error(&what, resp))),
        })
    }

    /// Sends a blob GET to each available mirror in turn (one attempt
    /// each) and then to the origin (with retries), returning the first
    /// success. `headers` go with every request (a Range).
    pub fn blob_request<T>(
        &self,
        repo: &str,
        digest: &Digest,
        headers: &[(HeaderName, String)],
        what: &str,
        mut handle: impl FnMut(Response) -> std::result::Result<T, AttemptError>,
    ) -> Result<T> {
        let path = format!("{repo}/blobs/{digest}");
        let single = RetryPolicy { max_attempts: 1, ..self.inner.retry.clone() };
        let mut fell_back = false;
        for mirror in &self.inner.mirrors {
            if !mirror.available() {
                continue;
            }
            let url = self.api_url(&mirror.base, &path)?;
            let mut spec = RequestSpec::new(Method::GET, url, vec![scope_pull(repo)], format!("{what} (mirror {})", host_port(&mirror.base)));
            spec.headers = headers.to_vec();
            match self.execute(&spec, &single, &mut handle) {
                Ok(v) => {
                    self.inner.counters.mirror_reads.fetch_add(1, Ordering::Relaxed);
                    if fell_back {
                        self.inner.counters.mirror_fallbacks.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Err(e) => {
                    if matches!(e, RegistryError::Network { .. }) {
                        tracing::warn!("mirror {} unavailable ({e}); skipping it for {:?}", host_port(&mirror.base), self.inner.options.mirror_cooldown);
                        mirror.mark_down(self.inner.options.mirror_cooldown);
                    } else {
                        tracing::debug!("mirror {}: {e}; trying the next source", host_port(&mirror.base));
                    }
                    fell_back = true;
                }
            }
        }
        if fell_back {
            self.inner.counters.mirror_fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        let mut spec = RequestSpec::new(Method::GET, self.url(&path)?, vec![scope_pull(repo)], what.to_string());
        spec.headers = headers.to_vec();
        self.execute(&spec, &self.inner.retry, handle)
    }

    /// Reads a whole blob of at most `max` bytes and verifies its digest.
    pub fn get_blob(&self, repo: &str, digest: &Digest, max: u64) -> Result<Vec<u8>> {
        let what = format!("blob {digest} of {}/{repo}", self.inner.registry);
        let reference = format!("docker://{}/{repo}", self.inner.registry);
        self.blob_request(repo, digest, &[], &what, |resp| {
            match resp.status().as_u16() {
                200 => {}
                404 => return Err(AttemptError::Fatal(RegistryError::NotFound { reference: reference.clone(), what: format!("blob {digest}"), detail: String::new() })),
                _ => return Err(AttemptError::Fatal(self.http_error(&what, resp))),
            }
            let deadline = self.inner.options.body_deadline(resp.content_length().unwrap_or(max));
            let data = read_body(resp, max, deadline, &self.inner.host, &what)?;
            self.count_blob_bytes(data.len() as u64);
            let actual = Digest::of(&data);
            if &actual != digest {
                // A corrupted transfer and a lying server look the same: try again.
                return Err(AttemptError::Retryable(RegistryError::DigestMismatch { digest: format!("{digest} (from {})", reference), actual: actual.to_string() }));
            }
            Ok(data)
        })
    }

    /// Stores a manifest under `reference` (a tag or its digest) in `repo`;
    /// returns its digest.
    pub fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) -> Result<Digest> {
        let what = format!("pushing manifest docker://{}/{repo}:{reference}", self.inner.registry);
        let digest = Digest::of(bytes);
        let spec = RequestSpec::new(Method::PUT, self.url(&format!("{repo}/manifests/{reference}"))?, vec![scope_push(repo)], what.clone())
            .header(CONTENT_TYPE, media_type)
            .body(bytes.to_vec());
        self.execute(&spec, &self.inner.retry, |resp| {
            if resp.status().as_u16() != 201 && !resp.status().is_success() {
                return Err(AttemptError::Fatal(self.http_error(&what, resp)));
            }
            if let Some(a) = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()) {
                if a.starts_with("sha256:") && a != digest.as_str() {
                    return Err(AttemptError::Fatal(self.bad_response(&what, format!("registry stored digest {a}, expected {digest}"))));
                }
            }
            Ok(())
        })?;
        Ok(digest)
    }

    pub(crate) fn push_scope(repo: &str) -> String {
        scope_push(repo)
    }

    pub(crate) fn pull_scope(repo: &str) -> String {
        scope_pull(repo)
    }
}

/// A response body that fails once `deadline` has passed: the client's
/// timeout covers each read alone, so a server trickling a byte at a time
/// would otherwise hold a request (and a FUSE read waiting on it) forever.
pub(crate) struct DeadlineReader<R> {
    inner: R,
    deadline: std::time::Instant,
}

impl<R: Read> DeadlineReader<R> {
    pub(crate) fn new(inner: R, deadline: std::time::Instant) -> Self {
        DeadlineReader { inner, deadline }
    }
}

impl<R: Read> Read for DeadlineReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if std::time::Instant::now() > self.deadline {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the transfer is slower than the minimum rate (--min-transfer-rate) allows"));
        }
        self.inner.read(buf)
    }
}

/// Reads a response body of at most `max` bytes, complete by `deadline`;
/// a read error or a body shorter than its Content-Length is retryable.
pub(crate) fn read_body(resp: Response, max: u64, deadline: std::time::Instant, host: &str, what: &str) -> std::result::Result<Vec<u8>, AttemptError> {
    let announced = resp.content_length();
    if announced.is_some_and(|n| n > max) {
        return Err(AttemptError::Fatal(RegistryError::BadResponse { host: host.into(), what: what.into(), reason: format!("larger than {max} bytes") }));
    }
    let mut data = Vec::new();
    DeadlineReader::new(resp, deadline)
        .take(max + 1)
        .read_to_end(&mut data)
        .map_err(|e| AttemptError::Retryable(RegistryError::Network { host: host.into(), what: what.into(), reason: format!("reading the body: {e}") }))?;
    if data.len() as u64 > max {
        return Err(AttemptError::Fatal(RegistryError::BadResponse { host: host.into(), what: what.into(), reason: format!("larger than {max} bytes") }));
    }
    if let Some(n) = announced {
        if (data.len() as u64) < n {
            return Err(AttemptError::Retryable(RegistryError::Network { host: host.into(), what: what.into(), reason: format!("body truncated ({} of {n} bytes)", data.len()) }));
        }
    }
    Ok(data)
}

fn build_http_client(options: &RegistryOptions, all_loopback: bool) -> Result<Client> {
    let mut builder = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(options.connect_timeout)
        .timeout(options.read_timeout)
        .user_agent(concat!("naiad/", env!("CARGO_PKG_VERSION")))
        .tls_built_in_root_certs(true);
    for file in &options.ca_files {
        let pem = std::fs::read(file).map_err(|e| RegistryError::Config(format!("CA file {}: {e}", file.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|_| RegistryError::Config(format!("CA file {}: not PEM certificates", file.display())))?;
        if certs.is_empty() {
            return Err(RegistryError::Config(format!("CA file {}: no certificates in it", file.display())));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    if all_loopback {
        // A proxy from the environment cannot reach this machine's loopback.
        builder = builder.no_proxy();
    }
    builder.build().map_err(|e| RegistryError::Config(format!("cannot set up the HTTP client: {}", describe_reqwest_error(&e))))
}
