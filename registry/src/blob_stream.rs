//! [`BlobStream`]: a whole blob read straight from a registry's HTTP
//! response, as it arrives. When the connection breaks or the body ends
//! early it asks again for the rest (`Range: bytes=POS-`), so one dropped
//! connection does not restart a large layer. It does not verify the
//! digest: the reader above it does ([`crate::DigestReader`]).

use std::io::{self, Read};

use reqwest::blocking::Response;
use reqwest::header::{HeaderName, CONTENT_RANGE, RANGE};

use crate::digest::Digest;
use crate::error::{RegistryError, Result};
use crate::registry_client::{AttemptError, RegistryClient};

pub struct BlobStream {
    client: RegistryClient,
    repository: String,
    digest: Digest,
    size: u64,
    pos: u64,
    current: Option<Response>,
    /// Consecutive failures without progress; bounded by the retry policy.
    failures: u32,
    /// Times the stream was reopened after a failure, for statistics.
    pub resumes: u32,
    /// When the whole blob must have arrived ([`RegistryOptions::body_deadline`]).
    ///
    /// [`RegistryOptions::body_deadline`]: crate::RegistryOptions::body_deadline
    deadline: std::time::Instant,
}

impl BlobStream {
    /// Starts reading blob `digest` (of `size` bytes) of `repository`.
    pub fn open(client: &RegistryClient, repository: &str, digest: &Digest, size: u64) -> Result<Self> {
        let deadline = client.options().body_deadline(size);
        let mut s =
            BlobStream { client: client.clone(), repository: repository.to_string(), digest: digest.clone(), size, pos: 0, current: None, failures: 0, resumes: 0, deadline };
        s.current = Some(s.request_from(0)?);
        Ok(s)
    }

    /// A response whose body starts at blob offset `pos`.
    fn request_from(&self, pos: u64) -> Result<Response> {
        let what = format!("blob {} of {}/{}", self.digest, self.client.registry(), self.repository);
        let headers: Vec<(HeaderName, String)> = if pos > 0 { vec![(RANGE, format!("bytes={pos}-"))] } else { vec![] };
        let reference = format!("docker://{}/{}", self.client.registry(), self.repository);
        let digest = self.digest.clone();
        self.client.blob_request(&self.repository, &self.digest, &headers, &what, |mut resp| match resp.status().as_u16() {
            200 => {
                // Whole blob: skip what was already read.
                if pos > 0 {
                    io::copy(&mut (&mut resp).take(pos), &mut io::sink())
                        .map_err(|e| AttemptError::Retryable(RegistryError::Network { host: self.client.registry().into(), what: what.clone(), reason: e.to_string() }))?;
                }
                Ok(resp)
            }
            206 if pos > 0 => {
                let start = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if start != Some(pos) {
                    return Err(AttemptError::Fatal(self.client.bad_response(&what, format!("asked for bytes from {pos}, got Content-Range starting at {start:?}"))));
                }
                Ok(resp)
            }
            404 => Err(AttemptError::Fatal(RegistryError::NotFound { reference: reference.clone(), what: format!("blob {digest}"), detail: String::new() })),
            _ => Err(AttemptError::Fatal(self.client.http_error(&what, resp))),
        })
    }
}

impl Read for BlobStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pos >= self.size {
                return Ok(0);
            }
            if std::time::Instant::now() > self.deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "blob {} of {}/{}: at byte {} of {}, slower than the minimum transfer rate (--min-transfer-rate)",
                        self.digest,
                        self.client.registry(),
                        self.repository,
                        self.pos,
                        self.size
                    ),
                ));
            }
            let want = buf.len().min((self.size - self.pos).min(usize::MAX as u64) as usize);
            let problem = match self.current.as_mut() {
                Some(resp) => match resp.read(&mut buf[..want]) {
                    Ok(0) => format!("connection closed at byte {} of {}", self.pos, self.size),
                    Ok(n) => {
                        self.pos += n as u64;
                        self.failures = 0;
                        self.client.count_blob_bytes(n as u64);
                        return Ok(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => format!("at byte {} of {}: {e}", self.pos, self.size),
                },
                None => "no response".to_string(),
            };
            self.current = None;
            self.failures += 1;
            let policy = self.client.retry_policy().clone();
            if self.failures >= policy.max_attempts.max(1) {
                return Err(io::Error::other(format!("blob {} of {}/{}: {problem} (gave up after {} tries)", self.digest, self.client.registry(), self.repository, self.failures)));
            }
            tracing::debug!("blob {}: {problem}; resuming", self.digest);
            std::thread::sleep(policy.delay(self.failures, None));
            self.resumes += 1;
            match self.request_from(self.pos) {
                Ok(r) => self.current = Some(r),
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
    }
}
