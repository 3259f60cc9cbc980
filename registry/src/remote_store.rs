//! [`RegistryBlobStore`]: a [`BlobStore`] reading blob ranges from a
//! registry with HTTP Range requests, so a naiad image is read lazily, a
//! chunk at a time, without downloading its blobs.
//!
//! A range answer must be 206 with the Content-Range asked for and a body
//! of exactly that length (shorter is retried). A server that ignores
//! Range and answers 200 with the whole blob is tolerated only for reads
//! within its first [`MAX_UNRANGED_PREFIX`] bytes (the prefix is read and
//! sliced); further in it is an error (a mirror doing so is skipped for
//! the origin). Each range asked for is one request (which ranges to read
//! together is decided by naiad's reader, not here), unless it lies within
//! a read started ahead ([`RegistryBlobStore::start_read`],
//! [`crate::started_reads`]): then it is served from that read's bytes.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use reqwest::blocking::Response;
use reqwest::header::{CONTENT_RANGE, RANGE};

use crate::digest::Digest;
use crate::docker_ref::DockerReference;
use crate::error::{RegistryError, Result};
use crate::registry_client::{AttemptError, RegistryClient, MAX_UNRANGED_PREFIX};
use crate::registry_options::RegistryOptions;
use crate::started_reads::{BlobRange, StartedReads};
use crate::store::BlobStore;

#[derive(Clone)]
pub struct RegistryBlobStore {
    client: RegistryClient,
    repository: String,
    /// Blob sizes from the manifest, to check ranges before asking.
    sizes: HashMap<Digest, u64>,
    /// Reads started ahead, which later reads within them are served from.
    started: Arc<StartedReads>,
}

impl RegistryBlobStore {
    /// A store for the blobs of `repository` served by `client`'s registry.
    pub fn new(client: RegistryClient, repository: &str) -> Self {
        RegistryBlobStore { client, repository: repository.to_string(), sizes: HashMap::new(), started: Arc::default() }
    }

    /// A store for the repository of `reference`.
    pub fn open(reference: &DockerReference, options: &RegistryOptions) -> Result<Self> {
        Ok(Self::new(RegistryClient::for_reference(reference, options)?, &reference.repository))
    }

    /// Records blob sizes (from a manifest) so out-of-range reads fail
    /// without a request.
    pub fn with_blob_sizes(mut self, sizes: impl IntoIterator<Item = (Digest, u64)>) -> Self {
        self.sizes.extend(sizes);
        self
    }

    /// Keeps this store's started reads in `started` (shared with the
    /// store that started them).
    pub fn with_started_reads(mut self, started: Arc<StartedReads>) -> Self {
        self.started = started;
        self
    }

    pub fn client(&self) -> &RegistryClient {
        &self.client
    }

    /// Starts reading `range` now, on a thread of its own, for reads of
    /// this store (or of one sharing its [`StartedReads`]) that will want
    /// bytes within it. A range outside its blob is not started.
    pub fn start_read(&self, range: BlobRange) {
        if range.len == 0 || self.check_bounds(&range.digest, range.offset, range.len).is_err() {
            return;
        }
        let read = self.started.add(range.clone());
        let (fed, store) = (read.clone(), self.clone());
        let spawned = std::thread::Builder::new().name("naiad-read-ahead".into()).spawn(move || {
            let outcome = store.fetch(&range.digest, range.offset, range.len, &mut |prefix| fed.arrived(prefix));
            fed.ended(outcome.map(|_| ()).map_err(|e| e.to_string()));
        });
        if let Err(e) = spawned {
            tracing::debug!("cannot start a read ahead: {e}");
            self.started.remove(&read);
        }
    }

    pub fn repository(&self) -> &str {
        &self.repository
    }

    fn check_bounds(&self, digest: &Digest, offset: u64, len: u64) -> Result<()> {
        if let Some(&size) = self.sizes.get(digest) {
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(RegistryError::RangeOutOfBounds { digest: digest.to_string(), offset, len, size });
            }
        }
        Ok(())
    }

    /// One range GET (mirrors first), checked and read in full; `arrived`
    /// sees the body's prefix as it grows.
    fn fetch(&self, digest: &Digest, offset: u64, len: u64, arrived: &mut dyn FnMut(&[u8])) -> Result<Vec<u8>> {
        self.check_bounds(digest, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset + len - 1;
        let what = format!("blob {digest} of {}/{} bytes {offset}-{end}", self.client.registry(), self.repository);
        let headers = vec![(RANGE, format!("bytes={offset}-{end}"))];
        let data = self.client.blob_request(&self.repository, digest, &headers, &what, |resp| self.read_ranged(resp, digest, offset, len, &what, &mut *arrived))?;
        self.client.count_blob_bytes(data.len() as u64);
        Ok(data)
    }

    fn read_ranged(&self, resp: Response, digest: &Digest, offset: u64, len: u64, what: &str, arrived: &mut dyn FnMut(&[u8])) -> std::result::Result<Vec<u8>, AttemptError> {
        let host = self.client.registry().to_string();
        let truncated =
            |got: usize| AttemptError::Retryable(RegistryError::Network { host: host.clone(), what: what.to_string(), reason: format!("body truncated ({got} of {len} bytes)") });
        let read_error =
            |e: std::io::Error| AttemptError::Retryable(RegistryError::Network { host: host.clone(), what: what.to_string(), reason: format!("reading the body: {e}") });
        match resp.status().as_u16() {
            206 => {
                let content_range = resp.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()).map(str::to_string).unwrap_or_default();
                let (start, stop, total) = parse_content_range(&content_range)
                    .ok_or_else(|| AttemptError::Fatal(self.client.bad_response(what, format!("206 with a bad Content-Range {content_range:?}"))))?;
                if start != offset || stop != offset + len - 1 {
                    return Err(AttemptError::Fatal(self.client.bad_response(what, format!("asked for bytes {offset}-{}, got {content_range:?}", offset + len - 1))));
                }
                if let (Some(total), Some(&size)) = (total, self.sizes.get(digest)) {
                    if total != size {
                        return Err(AttemptError::Fatal(self.client.bad_response(what, format!("blob is {total} bytes, the manifest says {size}"))));
                    }
                }
                let mut data = Vec::with_capacity(len as usize);
                let deadline = self.client.options().body_deadline(len);
                read_progressively(crate::registry_client::DeadlineReader::new(resp, deadline).take(len + 1), &mut data, arrived).map_err(read_error)?;
                if (data.len() as u64) < len {
                    return Err(truncated(data.len()));
                }
                if data.len() as u64 > len {
                    return Err(AttemptError::Fatal(self.client.bad_response(what, "206 body longer than the range")));
                }
                Ok(data)
            }
            200 => {
                let need = offset + len;
                if need > MAX_UNRANGED_PREFIX {
                    return Err(AttemptError::Fatal(
                        self.client
                            .bad_response(what, format!("the server ignored the Range header (200 with the whole blob); reading {need} bytes of it for one range is refused")),
                    ));
                }
                tracing::debug!("{what}: server ignored Range; reading the first {need} bytes of the blob");
                let mut data = Vec::with_capacity(need as usize);
                let deadline = self.client.options().body_deadline(need);
                crate::registry_client::DeadlineReader::new(resp, deadline).take(need).read_to_end(&mut data).map_err(read_error)?;
                if (data.len() as u64) < need {
                    return Err(truncated(data.len().saturating_sub(offset as usize)));
                }
                let data = data.split_off(offset as usize);
                arrived(&data);
                Ok(data)
            }
            416 => {
                let size = resp.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()).and_then(|v| v.rsplit('/').next()).and_then(|v| v.parse().ok()).unwrap_or(0);
                Err(AttemptError::Fatal(RegistryError::RangeOutOfBounds { digest: digest.to_string(), offset, len, size }))
            }
            404 => Err(AttemptError::Fatal(RegistryError::BlobNotFound { digest: digest.to_string(), store: self.describe() })),
            _ => Err(AttemptError::Fatal(self.client.http_error(what, resp))),
        }
    }
}

/// How much of a body is read before the prefix is shown again.
const PROGRESS_STEP: usize = 64 << 10;

/// Reads `body` to its end into `data`, calling `arrived` with all of
/// `data` whenever another [`PROGRESS_STEP`] (or the last piece) is in.
fn read_progressively(mut body: impl Read, data: &mut Vec<u8>, arrived: &mut dyn FnMut(&[u8])) -> std::io::Result<()> {
    let mut shown = 0;
    loop {
        let start = data.len();
        data.resize(start + PROGRESS_STEP, 0);
        let read = body.read(&mut data[start..]);
        data.truncate(start + *read.as_ref().unwrap_or(&0));
        let n = match read {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 || data.len() - shown >= PROGRESS_STEP {
            if data.len() > shown {
                arrived(data);
                shown = data.len();
            }
            if n == 0 {
                return Ok(());
            }
        }
    }
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let total = if total == "*" { None } else { Some(total.parse().ok()?) };
    Some((a.parse().ok()?, b.parse().ok()?, total))
}

impl BlobStore for RegistryBlobStore {
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.read_range_progressive(digest, offset, len, &mut |_| {})
    }

    fn read_range_progressive(&self, digest: &Digest, offset: u64, len: u64, arrived: &mut dyn FnMut(&[u8])) -> Result<Vec<u8>> {
        if let Some(data) = self.started.serve(digest, offset, len, arrived) {
            return Ok(data);
        }
        self.fetch(digest, offset, len, arrived)
    }

    fn forget_started_reads(&self) {
        self.started.forget();
    }

    fn describe(&self) -> String {
        format!("docker://{}/{}", self.client.registry(), self.repository)
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_content_range, read_progressively, PROGRESS_STEP};

    /// A body that arrives in pieces of `piece` bytes.
    struct Trickle<'a> {
        rest: &'a [u8],
        piece: usize,
    }

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.piece.min(buf.len()).min(self.rest.len());
            buf[..n].copy_from_slice(&self.rest[..n]);
            self.rest = &self.rest[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_body_is_shown_as_growing_prefixes_while_it_arrives() {
        let body: Vec<u8> = (0..(5 * PROGRESS_STEP + 100)).map(|i| (i % 251) as u8).collect();
        let mut seen = Vec::new();
        let mut data = Vec::new();
        read_progressively(Trickle { rest: &body, piece: 10_000 }, &mut data, &mut |prefix| {
            assert_eq!(prefix, &body[..prefix.len()], "always a prefix of the body");
            seen.push(prefix.len());
        })
        .unwrap();
        assert_eq!(data, body);
        assert!(seen.len() >= 5, "shown while arriving, not only at the end: {seen:?}");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "growing: {seen:?}");
        assert_eq!(seen.last(), Some(&body.len()), "the whole body last");
    }

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("bytes 0-99/1000"), Some((0, 99, Some(1000))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }
}
