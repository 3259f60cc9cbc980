//! Pushing one blob to a registry: skip it if the repository has it
//! (HEAD); mount it from another repository of the same registry that is
//! known to have it (`POST ?mount=&from=`); otherwise upload it, in one
//! PUT if small, else in PATCH chunks (resuming from the registry's
//! recorded offset when a chunk fails), then commit with `PUT ?digest=`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use reqwest::blocking::Response;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, RANGE};
use reqwest::{Method, Url};
use serde::Serialize;

use crate::digest::Digest;
use crate::error::{IoContext, RegistryError, Result};
use crate::registry_client::{AttemptError, RegistryClient, RequestSpec};
use crate::retry::RetryPolicy;

/// What happened to one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobPushOutcome {
    /// The repository already had it.
    Existed,
    /// Mounted from another repository of the registry.
    Mounted,
    /// Uploaded in one PUT.
    UploadedWhole,
    /// Uploaded in this many PATCH chunks.
    UploadedChunked(u32),
}

/// An upload session: the URL to send the next part to.
struct Upload {
    location: Url,
}

impl RegistryClient {
    /// Pushes the blob stored in file `path` (`size` bytes, digest
    /// `digest`) to `repo`. `mount_from`: other repositories of this
    /// registry that may have it; the first that has it is mounted from.
    pub fn push_blob(&self, repo: &str, digest: &Digest, size: u64, path: &Path, mount_from: &[&str]) -> Result<BlobPushOutcome> {
        if self.head_blob(repo, digest)?.is_some() {
            return Ok(BlobPushOutcome::Existed);
        }
        let mut upload = None;
        for from in mount_from.iter().filter(|f| **f != repo) {
            if self.head_blob(from, digest)?.is_some() {
                match self.start_upload(repo, Some((digest, from)))? {
                    None => return Ok(BlobPushOutcome::Mounted),
                    Some(u) => upload = Some(u),
                }
                break;
            }
        }
        let upload = match upload {
            Some(u) => u,
            None => self.start_upload(repo, None)?.ok_or_else(|| self.bad_response(&format!("uploading blob {digest}"), "upload finished before it started"))?,
        };
        let chunk = self.options().upload_chunk_size.max(1);
        if size <= chunk {
            let mut data = Vec::with_capacity(size as usize);
            File::open(path).at(path)?.take(size).read_to_end(&mut data).at(path)?;
            if data.len() as u64 != size {
                return Err(RegistryError::Io { path: path.to_path_buf(), source: std::io::Error::other(format!("blob file is {} bytes, expected {size}", data.len())) });
            }
            self.finish_upload(repo, upload, digest, data)?;
            return Ok(BlobPushOutcome::UploadedWhole);
        }
        let parts = self.upload_chunks(repo, upload, digest, size, path, chunk)?;
        Ok(BlobPushOutcome::UploadedChunked(parts))
    }

    /// POSTs a new upload (or a mount). `None`: the mount succeeded.
    fn start_upload(&self, repo: &str, mount: Option<(&Digest, &str)>) -> Result<Option<Upload>> {
        let mut url = self.url(&format!("{repo}/blobs/uploads/"))?;
        let mut scopes = vec![Self::push_scope(repo)];
        if let Some((digest, from)) = mount {
            url.query_pairs_mut().append_pair("mount", digest.as_str()).append_pair("from", from);
            scopes.push(Self::pull_scope(from));
        }
        let what = match mount {
            Some((d, from)) => format!("mounting blob {d} from {from} into {}/{repo}", self.registry()),
            None => format!("starting a blob upload to {}/{repo}", self.registry()),
        };
        let spec = RequestSpec::new(Method::POST, url.clone(), scopes, what.clone()).header(CONTENT_LENGTH, "0").body(Vec::new());
        self.execute(&spec, self.retry_policy(), |resp| match resp.status().as_u16() {
            201 if mount.is_some() => Ok(None),
            202 => Ok(Some(Upload { location: self.resolve_location(&url, &resp, &what).map_err(AttemptError::Fatal)? })),
            _ => Err(AttemptError::Fatal(self.http_error(&what, resp))),
        })
    }

    /// Sends the last bytes (possibly none) and commits the upload.
    fn finish_upload(&self, repo: &str, upload: Upload, digest: &Digest, data: Vec<u8>) -> Result<()> {
        let what = format!("uploading blob {digest} to {}/{repo}", self.registry());
        let mut url = upload.location;
        url.query_pairs_mut().append_pair("digest", digest.as_str());
        let spec = RequestSpec::new(Method::PUT, url, vec![Self::push_scope(repo)], what.clone()).header(CONTENT_TYPE, "application/octet-stream").body(data);
        self.execute(&spec, self.retry_policy(), |resp| self.check_created(resp, digest, &what))
    }

    fn check_created(&self, resp: Response, digest: &Digest, what: &str) -> std::result::Result<(), AttemptError> {
        if resp.status().as_u16() != 201 {
            return Err(AttemptError::Fatal(self.http_error(what, resp)));
        }
        if let Some(d) = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()) {
            if d.starts_with("sha256:") && d != digest.as_str() {
                return Err(AttemptError::Fatal(self.bad_response(what, format!("registry stored digest {d}"))));
            }
        }
        Ok(())
    }

    fn upload_chunks(&self, repo: &str, mut upload: Upload, digest: &Digest, size: u64, path: &Path, chunk: u64) -> Result<u32> {
        let what = format!("uploading blob {digest} to {}/{repo}", self.registry());
        let mut file = File::open(path).at(path)?;
        let mut offset = 0u64;
        let mut parts = 0u32;
        let mut failures = 0u32;
        let policy = self.retry_policy().clone();
        let once = RetryPolicy { max_attempts: 1, ..policy.clone() };
        while offset < size {
            let len = chunk.min(size - offset);
            file.seek(SeekFrom::Start(offset)).at(path)?;
            let mut data = Vec::with_capacity(len as usize);
            (&mut file).take(len).read_to_end(&mut data).at(path)?;
            if data.len() as u64 != len {
                return Err(RegistryError::Io { path: path.to_path_buf(), source: std::io::Error::other("blob file shrank while uploading") });
            }
            let end = offset + len - 1;
            let spec = RequestSpec::new(Method::PATCH, upload.location.clone(), vec![Self::push_scope(repo)], format!("{what} (bytes {offset}-{end})"))
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(reqwest::header::CONTENT_RANGE, format!("{offset}-{end}"))
                .body(data);
            let location = upload.location.clone();
            let sent = self.execute(&spec, &once, |resp| match resp.status().as_u16() {
                202 => self.resolve_location(&location, &resp, &spec.what).map_err(AttemptError::Fatal),
                _ => Err(AttemptError::Fatal(self.http_error(&spec.what, resp))),
            });
            match sent {
                Ok(next) => {
                    upload.location = next;
                    offset += len;
                    parts += 1;
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    if failures >= policy.max_attempts.max(1) {
                        return Err(e);
                    }
                    tracing::debug!("{what}: chunk at {offset} failed ({e}); asking the registry where to resume");
                    std::thread::sleep(policy.delay(failures, None));
                    let (resume_at, location) = self.upload_status(&upload.location, repo, &what)?;
                    upload.location = location;
                    offset = resume_at;
                }
            }
        }
        self.finish_upload(repo, upload, digest, Vec::new())?;
        Ok(parts)
    }

    /// Where an interrupted upload stands: the next offset, and its URL.
    fn upload_status(&self, location: &Url, repo: &str, what: &str) -> Result<(u64, Url)> {
        let spec = RequestSpec::new(Method::GET, location.clone(), vec![Self::push_scope(repo)], format!("{what} (upload status)"));
        self.execute(&spec, self.retry_policy(), |resp| {
            if resp.status().as_u16() != 204 {
                return Err(AttemptError::Fatal(self.http_error(&spec.what, resp)));
            }
            // Range: 0-LAST, LAST inclusive. Distribution also says 0-0 for an
            // empty upload; a single stored byte is far less likely, so 0-0 means 0.
            let next = resp
                .headers()
                .get(RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().trim_start_matches("bytes=").split_once('-').map(|(_, b)| b.to_string()))
                .and_then(|b| b.parse::<u64>().ok())
                .map(|last| if last == 0 { 0 } else { last + 1 })
                .unwrap_or(0);
            let loc = self.resolve_location(location, &resp, &spec.what).unwrap_or_else(|_| location.clone());
            Ok((next, loc))
        })
    }
}
